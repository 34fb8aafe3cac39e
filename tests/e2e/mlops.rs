//! The MLOps loop on NAB data: sensor -> embedded broker -> agent (buffer,
//! tract, sync) -> cloud-sync stores the readings -> dataset snapshot ->
//! retrain from the snapshot -> registered as staging -> promoted -> the
//! agent's rollout fetches the signed version, swaps it in, and its
//! predictions reach the cloud. The lineage chain is checked from the
//! registered version back to the device sequence ranges the agent holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_sync::dataset::{PredictionLineage, ReadingLineage, Selection, SeqSpan};
use cloud_sync::registry::keys::{self, Signer};
use cloud_sync::retrain::{JobSpec, Retrainer, RunStatus};
use cloud_sync::sync_protocol::ReadQuery;
use cloud_sync::{Datasets, Registry};
use edge_agent::buffer::Buffer;
use edge_agent::config::{BufferSettings, DEFAULT_CONFIG, RawConfig};
use edge_agent::demo::nab;
use edge_agent::telemetry::Counters;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "e2e-loop";
const MODEL: &str = "nab-machine-temp";
const SOURCE: &str = "machine-1";
/// Readings the snapshot trains on: 498 windows of 12, hop 6.
const FIRST: usize = 3000;
/// Readings scored after the swap.
const SECOND: usize = 240;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp")
}

/// The `edge-agent` binary next to this test's directory (`target/debug/`),
/// which the agent runs to verify a package before a swap.
fn agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("edge-agent");
    bin.is_file().then_some(bin)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn wait(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publishes `points` as the demo's sensor does (QoS 1) and waits for every
/// acknowledgement.
async fn publish(broker: std::net::SocketAddr, points: &[nab::Point]) {
    let mut opts = MqttOptions::new(
        format!("e2e-loop-sensor-{}", edge_agent::now_ms()),
        broker.ip().to_string(),
        broker.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(200);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let total = points.len();
    let poller = tokio::spawn(async move {
        let mut acked = 0;
        while acked < total {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acked += 1;
            }
        }
    });
    for p in points {
        client
            .publish(
                format!("sensors/{SOURCE}/temperature"),
                QoS::AtLeastOnce,
                false,
                format!("{{\"ts\":{},\"value\":{}}}", p.ts, p.value),
            )
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), poller)
        .await
        .unwrap()
        .unwrap();
    let _ = client.disconnect().await;
}

fn span(first: u64, last: u64) -> SeqSpan {
    SeqSpan { first, last }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_become_a_snapshot_a_retrained_model_and_a_swap_with_lineage() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let broker = edge_agent::demo::broker::start_embedded_broker().unwrap();

    // The cloud: store, registry with a signing key, datasets, retrainer.
    let mut cloud = cloud_sync::Settings::for_database(dir.path().join("cloud.db"));
    cloud.registry.artifact_dir = dir.path().join("artifacts");
    cloud.registry.signing_key_file = dir.path().join("key.pem");
    cloud.registry.public_keys_file = dir.path().join("keys.toml");
    cloud.retrain.worker = false;
    keys::generate(&cloud.registry).unwrap();
    let public_key = hex(Signer::load(&cloud.registry)
        .unwrap()
        .public_key()
        .as_bytes());
    let cloud_stop = CancellationToken::new();
    let server = cloud_sync::start(cloud.clone(), cloud_stop.clone())
        .await
        .unwrap();
    let store = server.store().clone();
    let registry = Registry::open(&cloud.registry, &cloud.storage)
        .await
        .unwrap();
    let datasets = Datasets::open(&cloud.datasets, &cloud.storage)
        .await
        .unwrap();
    let retrainer = Retrainer::open(&cloud, registry.clone())
        .await
        .unwrap()
        .with_datasets(datasets.clone());

    // The agent: the shipped 1.0.0, sync to the cloud, rollout following
    // the registry with its public key, no trial (the swap is what we check).
    let state = dir.path().join("agent");
    let model_dir = state.join("models").join(MODEL);
    std::fs::create_dir_all(&model_dir).unwrap();
    for file in ["model.toml", "model.onnx"] {
        std::fs::copy(shipped().join(file), model_dir.join(file)).unwrap();
    }
    let token = store.add_device(DEVICE).await.unwrap();
    std::fs::write(state.join("token"), &token).unwrap();
    let mut raw = RawConfig::parse(DEFAULT_CONFIG).unwrap();
    raw.agent.device_id = DEVICE.into();
    raw.agent.state_dir.clone_from(&state);
    raw.mqtt.broker_url = format!("mqtt://{broker}");
    raw.mqtt.client_id = "e2e-loop-agent".into();
    raw.inference.models = vec![model_dir];
    raw.inference.watch_interval_ms = 200;
    raw.sync.url = format!("http://{}", server.addr);
    raw.sync.token_file = state.join("token");
    raw.sync.interval_ms = 100;
    raw.shutdown.deadline_ms = 30_000;
    raw.metrics.listen = "127.0.0.1:0".into();
    raw.rollout.enabled = true;
    raw.rollout.poll_interval_secs = 1;
    raw.rollout.trusted_keys = vec![public_key];
    raw.rollout.trial_secs = 0;
    let mut settings = raw.validate().unwrap();
    let checker = agent_binary();
    settings.inference.checker.clone_from(&checker);
    let agent_db = settings.buffer.path.clone();
    let counters = Arc::new(Counters::default());
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::supervisor::run(
        settings,
        counters.clone(),
        agent_stop.clone(),
    ));
    wait("the agent to subscribe", Duration::from_secs(30), || {
        Counters::get(&counters.subscribed) > 0
    })
    .await;

    // 1. NAB readings through the broker, committed, scored and synced.
    let series = nab::series().unwrap();
    publish(broker, &series[..FIRST]).await;
    let windows = ((FIRST - 12) / 6 + 1) as u64;
    let c = counters.clone();
    wait(
        "the readings and predictions in the cloud",
        Duration::from_secs(60),
        move || {
            Counters::get(&c.committed) == FIRST as u64
                && Counters::get(&c.predictions) == windows
                && Counters::get(&c.synced_readings) == FIRST as u64
                && Counters::get(&c.synced_predictions) == windows
        },
    )
    .await;

    // 2. Snapshot what the cloud stored.
    let selection = Selection {
        streams: vec!["temperature".into()],
        devices: vec![DEVICE.into()],
        from_ms: 0,
        to_ms: edge_agent::now_ms() + 1,
    };
    let snapshot = datasets
        .snapshot(&store, selection, Some("e2e loop".into()))
        .await
        .unwrap();
    assert!(snapshot.created);
    let dataset_id = snapshot.manifest.id.clone();

    // 3. Retrain from the snapshot, registered as staging.
    let spec = JobSpec {
        model: MODEL.into(),
        csv: None,
        dataset: Some(dataset_id.clone()),
        train: Some(serde_json::from_value(serde_json::json!({ "version": "1.1.0" })).unwrap()),
        group: "default".into(),
        register: true,
    };
    let run = retrainer.execute(&spec, None).await.unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert!(run.registered);

    // 4. The lineage chain, from the registered version back to the rows.
    let versions = registry.list(Some(MODEL)).await.unwrap();
    assert_eq!(versions.len(), 1);
    let version = &versions[0];
    assert_eq!(
        (version.version.as_str(), version.stage.as_str()),
        ("1.1.0", "staging")
    );
    let run_id = version.training_run.clone().expect("version names its run");
    let recorded = retrainer.run(&run_id).await.unwrap().expect("run stored");
    let run_dataset = recorded.dataset.clone().expect("run names its dataset");
    assert_eq!(run_dataset, dataset_id);
    assert_eq!(version.dataset.as_deref(), Some(run_dataset.as_str()));
    let manifest = datasets.manifest(&run_dataset).await.unwrap();
    let lineage = &manifest.content.lineage;
    // What the agent holds: every reading it committed (seq 1..=n of its
    // one series) and every prediction it made, all acknowledged by the cloud.
    let held = Counters::get(&counters.committed);
    let made = Counters::get(&counters.predictions);
    assert_eq!(
        lineage.readings,
        [ReadingLineage {
            device: DEVICE.into(),
            source: SOURCE.into(),
            stream: "temperature".into(),
            records: held,
            ranges: vec![span(1, held)],
        }]
    );
    assert_eq!(
        lineage.predictions,
        [PredictionLineage {
            device: DEVICE.into(),
            model: MODEL.into(),
            records: made,
            ranges: vec![span(1, made)],
        }]
    );
    // ...and the cloud's stored rows say the same.
    let summary = store.summary(DEVICE).await.unwrap();
    let stored = summary
        .readings
        .iter()
        .find(|s| s.key == format!("{SOURCE}/temperature"))
        .expect("stored stream");
    assert_eq!(
        (stored.min_seq, stored.max_seq, stored.rows),
        (1, held, held)
    );

    // 5. Promote; the agent fetches, verifies and swaps it in.
    registry.promote(MODEL, "1.1.0", "default").await.unwrap();
    let c = counters.clone();
    wait(
        "the agent to install 1.1.0",
        Duration::from_secs(30),
        move || Counters::get(&c.rollout_installs) >= 1,
    )
    .await;
    let installed = state.join("packages").join(MODEL).join("1.1.0");
    assert!(installed.join("model.onnx").is_file());
    if checker.is_some() {
        // New readings are scored by the swapped-in version and synced.
        tokio::time::sleep(Duration::from_millis(800)).await;
        publish(broker, &series[FIRST..FIRST + SECOND]).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let page = store
                .predictions(
                    DEVICE,
                    &ReadQuery {
                        model: Some(MODEL.into()),
                        from_ms: Some(0),
                        to_ms: None,
                        source: None,
                        stream: None,
                        limit: Some(1000),
                        cursor: None,
                    },
                )
                .await
                .unwrap();
            let mut all = page.predictions;
            let mut cursor = page.next_cursor;
            while let Some(next) = cursor {
                let more = store
                    .predictions(
                        DEVICE,
                        &ReadQuery {
                            model: Some(MODEL.into()),
                            from_ms: Some(0),
                            to_ms: None,
                            source: None,
                            stream: None,
                            limit: Some(1000),
                            cursor: Some(next),
                        },
                    )
                    .await
                    .unwrap();
                all.extend(more.predictions);
                cursor = more.next_cursor;
            }
            if all.iter().any(|p| p.prediction.model_version == "1.1.0") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no prediction of 1.1.0 reached the cloud"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        println!(
            "swap not checked: build edge-agent (cargo build -p edge-agent) to verify packages"
        );
    }

    agent_stop.cancel();
    agent.await.unwrap().unwrap();
    // The agent's buffer holds the snapshot's readings (seq 1..=held) and
    // those published after it, and nothing else.
    let after = if checker.is_some() { SECOND as u64 } else { 0 };
    let (buffer, thread) = Buffer::open(&BufferSettings::for_path(&agent_db)).unwrap();
    let stats = buffer.stats().await.unwrap();
    assert_eq!(stats.readings, held + after);
    drop(buffer);
    thread.join();
    cloud_stop.cancel();
    server.join().await.unwrap();
    println!(
        "mlops loop: {FIRST} readings, dataset {dataset_id}, run {run_id}, swap checked: {}, {:.1} s",
        checker.is_some(),
        started.elapsed().as_secs_f64()
    );
}
