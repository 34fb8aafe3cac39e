//! Agent sync -> fault-injection proxy -> cloud-sync (SQLite), over real
//! HTTP: resets, dropped answers (the cloud stored the batch, the agent
//! never heard), stalls, latency and 503 storms lose and duplicate nothing;
//! an agent offline for days resumes exactly where it stopped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::proxy::{Faults, Proxy, Stats};
use edge_agent::buffer::{Buffer, BufferThread, Item, NewReading};
use edge_agent::config::{BufferSettings, Secret, SyncSettings};
use edge_agent::sync::SyncStage;
use edge_agent::telemetry::Counters;
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "e2e-sync";
const DAY_MS: i64 = 86_400_000;

struct Cloud {
    server: cloud_sync::Server,
    stop: CancellationToken,
    token: String,
    store: cloud_sync::Store,
}

impl Cloud {
    async fn start(db: &Path) -> Cloud {
        let stop = CancellationToken::new();
        let server = cloud_sync::start(cloud_sync::Settings::for_database(db), stop.clone())
            .await
            .unwrap();
        let store = server.store().clone();
        let token = store.add_device(DEVICE).await.unwrap();
        Cloud {
            server,
            stop,
            token,
            store,
        }
    }

    /// `key -> (rows, holds exactly 1..=rows)`.
    async fn readings(&self) -> BTreeMap<String, (u64, bool)> {
        let summary = self.store.summary(DEVICE).await.unwrap();
        summary
            .readings
            .into_iter()
            .map(|s| (s.key, (s.rows, s.min_seq == 1 && s.max_seq == s.rows)))
            .collect()
    }

    async fn total(&self) -> u64 {
        self.readings().await.values().map(|(n, _)| n).sum()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.join().await.unwrap();
        self.store.close().await.unwrap();
    }
}

fn settings(url: String, token: &str) -> SyncSettings {
    SyncSettings {
        url,
        token: Secret::new(token.to_owned()),
        batch_max_rows: 200,
        interval: Duration::from_millis(20),
        request_timeout: Duration::from_millis(1000),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        batch_max_bytes: 1 << 20,
        batch_max_delay: Duration::from_millis(20),
        backlog_rows_per_sec: None,
        heartbeat_interval: None,
        tls: None,
    }
}

fn open(dir: &Path) -> (Buffer, BufferThread) {
    Buffer::open(&BufferSettings::for_path(dir.join("buffer.db"))).unwrap()
}

async fn append(buffer: &Buffer, stream: &str, n: u64, recv_ts_ms: i64) {
    let items = (0..n)
        .map(|i| {
            Item::Reading(NewReading {
                source: "dev".into(),
                stream: stream.into(),
                ident: None,
                device_ts_ms: Some(recv_ts_ms),
                recv_ts_ms,
                clock_ok: true,
                values: BTreeMap::from([("a".into(), i as f64), ("b".into(), 1.5)]),
            })
        })
        .collect();
    buffer.append(items).await.unwrap();
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<edge_agent::sync::Result<()>>,
    counters: Arc<Counters>,
}

fn start(settings: SyncSettings, buffer: &Buffer) -> Running {
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let stage = SyncStage::new(settings, DEVICE.into(), buffer.clone(), counters.clone());
    Running {
        task: tokio::spawn(stage.run(stop.clone())),
        stop,
        counters,
    }
}

impl Running {
    async fn stop(self) -> Arc<Counters> {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.counters
    }
}

/// Polls `$cond` (an expression that may `.await`) every few ms until it
/// holds; panics naming `$what` after `$timeout`.
macro_rules! wait_until {
    ($what:expr, $timeout:expr, $cond:expr) => {{
        let deadline = Instant::now() + $timeout;
        while !$cond {
            assert!(Instant::now() < deadline, "timed out waiting for {}", $what);
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }};
}

fn seed() -> u64 {
    let seed = std::env::var("EDGE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| edge_agent::now_ms() as u64);
    println!("seed {seed} (EDGE_TEST_SEED={seed} replays the fault sequence)");
    seed
}

/// Every kind of fault, while a backlog drains and live rows arrive: the
/// cloud ends with every reading exactly once, and each fault was injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_between_agent_and_cloud_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db")).await;
    let faults = Faults {
        reset: 0.06,
        drop_response: 0.12,
        stall: 0.03,
        storm: 0.03,
        burst_len: 8,
        slow: 0.1,
        latency: Duration::from_millis(150),
        down: false,
    };
    let proxy = Proxy::start(cloud.server.addr, faults, seed())
        .await
        .unwrap();
    proxy.inject_each_once();
    let (buffer, thread) = open(dir.path());
    let now = edge_agent::now_ms();
    for s in ["s1", "s2", "s3"] {
        append(&buffer, s, 2000, now).await;
    }
    let sync = start(
        settings(format!("http://{}", proxy.addr), &cloud.token),
        &buffer,
    );
    // Live rows keep arriving while the backlog drains.
    for _ in 0..30 {
        append(&buffer, "live", 100, edge_agent::now_ms()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until!(
        "every reading in the cloud",
        Duration::from_secs(180),
        cloud.total().await == 9000
    );
    // The cloud can hold every row before the agent has marked the last
    // batch (its answer may have been dropped and the batch is being
    // replayed): wait for the agent's side to settle
    // while its sync still runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let stats = loop {
        let stats = buffer.sync_stats(0).await.unwrap();
        if stats.readings_unsynced == 0 || std::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let counters = sync.stop().await;
    let all = cloud.readings().await;
    for (key, rows) in [
        ("dev/s1", 2000),
        ("dev/s2", 2000),
        ("dev/s3", 2000),
        ("dev/live", 3000),
    ] {
        assert_eq!(all[key], (rows, true), "{key}");
    }
    let st = proxy.stats();
    println!(
        "requests {} forwarded {} resets {} dropped answers {} stalls {} injected 503 {} delayed {}; agent failures {}",
        Stats::get(&st.requests),
        Stats::get(&st.forwarded),
        Stats::get(&st.resets),
        Stats::get(&st.dropped_responses),
        Stats::get(&st.stalls),
        Stats::get(&st.injected_503),
        Stats::get(&st.delayed),
        Counters::get(&counters.sync_failures),
    );
    for (name, n) in [
        ("resets", Stats::get(&st.resets)),
        ("dropped answers", Stats::get(&st.dropped_responses)),
        ("stalls", Stats::get(&st.stalls)),
        ("503 answers", Stats::get(&st.injected_503)),
        ("delays", Stats::get(&st.delayed)),
    ] {
        assert!(n > 0, "no {name} injected: the test did not test them");
    }
    // Replayed batches were absorbed by the cloud, not marked twice.
    assert!(Counters::get(&counters.synced_readings) >= 9000);
    assert_eq!((stats.readings_unsynced, stats.quarantine_batches), (0, 0));
    drop(buffer);
    thread.join();
    drop(proxy);
    cloud.stop().await;
}

/// Offline for "three days" (rows received then), across a restart: the
/// agent keeps retrying, reports the backlog's age, and once the cloud is
/// reachable uploads everything once; stopped halfway and restarted, it
/// continues with the first unacknowledged row instead of starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_for_days_then_resumes_exactly_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db")).await;
    let down = Faults {
        down: true,
        ..Faults::default()
    };
    let proxy = Proxy::start(cloud.server.addr, down, 1).await.unwrap();
    let (buffer, thread) = open(dir.path());
    let three_days_ago = edge_agent::now_ms() - 3 * DAY_MS;
    append(&buffer, "old", 3000, three_days_ago).await;
    let mut s = settings(format!("http://{}", proxy.addr), &cloud.token);
    s.backlog_rows_per_sec = Some(2000);
    let sync = start(s.clone(), &buffer);
    let counters = sync.counters.clone();
    wait_until!(
        "retries while offline",
        Duration::from_secs(10),
        Counters::get(&counters.sync_failures) >= 5
    );
    let stats = buffer.sync_stats(0).await.unwrap();
    let age = edge_agent::now_ms() - stats.oldest_unsynced_ms.unwrap();
    assert!(age >= 3 * DAY_MS, "oldest unsynced row is {age} ms old");
    sync.stop().await;
    append(&buffer, "old", 1000, three_days_ago + DAY_MS).await;

    // Back online, paced: stop the agent halfway through the backlog.
    proxy.set_faults(Faults::default());
    let sync = start(s.clone(), &buffer);
    wait_until!(
        "part of the backlog",
        Duration::from_secs(20),
        cloud.total().await >= 1000
    );
    let first = sync.stop().await;
    let sent_before = Counters::get(&first.synced_readings);
    let in_cloud = cloud.total().await;
    assert!(in_cloud < 4000, "the backlog was not paced");
    assert_eq!(
        in_cloud, sent_before,
        "what the cloud holds was marked synced"
    );

    let forwarded_before = Stats::get(&proxy.stats().forwarded);
    let sync = start(s, &buffer);
    wait_until!(
        "the whole backlog",
        Duration::from_secs(30),
        cloud.total().await == 4000
    );
    let second = sync.stop().await;
    assert_eq!(
        Counters::get(&second.synced_readings),
        4000 - sent_before,
        "the restarted agent re-sent rows the cloud had acknowledged"
    );
    assert!(Stats::get(&proxy.stats().forwarded) > forwarded_before);
    assert_eq!(cloud.readings().await["dev/old"], (4000, true));
    drop(buffer);
    thread.join();
    drop(proxy);
    cloud.stop().await;
}

/// A classifier end to end: the real inference stage scores the
/// `machine-state` package (labels `normal`, `worn`, `failing`), the buffer
/// stores the label and probabilities, the real sync stage uploads them
/// (compact layout v3, zstd) to a real cloud-sync, and the cloud holds the
/// same label and bit-identical probabilities for every prediction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classifiers_labels_and_probabilities_reach_the_cloud() {
    use edge_agent::inference::{InferenceStage, LoadedModel};
    use edge_agent::ingest::CommittedReading;

    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db")).await;
    let (buffer, thread) = open(dir.path());
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/machine-state");
    let model = LoadedModel::load(&package).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(256);
    let stage = InferenceStage::new(
        vec![model],
        rx,
        buffer.clone(),
        events_tx,
        Arc::new(Counters::default()),
    )
    .with_batch_max_wait(Duration::from_millis(5));
    let stop_inference = CancellationToken::new();
    let inference = tokio::spawn(stage.run(stop_inference.clone()));
    let mut seq = 0;
    for t in 0..10u64 {
        for (stream, field, value) in [
            ("vibration", "rms", ((t * 3) % 11) as f64 * 0.6 - 2.0),
            ("current", "amps", ((t * t) % 13) as f64 * 0.5 - 3.0),
        ] {
            seq += 1;
            tx.send(CommittedReading {
                source: "press-1".into(),
                stream: stream.into(),
                seq,
                device_ts_ms: Some(1_000_000 + t as i64 * 1000),
                values: BTreeMap::from([(field.to_owned(), value)]),
            })
            .await
            .unwrap();
        }
    }
    drop(tx);
    // Windows of 4 steps every 2 end at steps 4, 6, 8 and 10.
    let mut events = Vec::new();
    while events.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(20), events_rx.recv())
            .await
            .expect("four predictions within 20 s")
            .expect("the inference stage is running");
        events.push(event);
    }
    stop_inference.cancel();
    inference.await.unwrap().unwrap();

    let sync = start(
        settings(format!("http://{}", cloud.server.addr), &cloud.token),
        &buffer,
    );
    wait_until!(
        "four predictions in the cloud",
        Duration::from_secs(20),
        cloud
            .store
            .summary(DEVICE)
            .await
            .unwrap()
            .predictions
            .first()
            .is_some_and(|s| s.rows == 4)
    );
    sync.stop().await;
    let page = cloud
        .store
        .predictions(DEVICE, &cloud_sync::sync_protocol::ReadQuery::default())
        .await
        .unwrap();
    assert_eq!(page.predictions.len(), 4);
    let bits = |v: &[f64]| v.iter().map(|p| p.to_bits()).collect::<Vec<_>>();
    for event in &events {
        let stored = page
            .predictions
            .iter()
            .map(|s| &s.prediction)
            .find(|p| p.seq == event.seq)
            .expect("every prediction reached the cloud");
        let label = event.label.as_deref().expect("a classifier labels");
        assert!(["normal", "worn", "failing"].contains(&label));
        assert_eq!(stored.label.as_deref(), Some(label), "seq {}", event.seq);
        assert_eq!(event.probabilities.len(), 3);
        assert_eq!(
            bits(&stored.probabilities),
            bits(&event.probabilities),
            "seq {}",
            event.seq
        );
        assert_eq!(stored.score.to_bits(), event.prediction.score.to_bits());
    }
    drop(buffer);
    thread.join();
    cloud.stop().await;
}
