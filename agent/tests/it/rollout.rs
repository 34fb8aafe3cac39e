//! Rollout against the real cloud-sync registry (in process, SQLite, port
//! 0): signed versions are downloaded, verified and installed; untrusted,
//! tampered, oversized and downgraded artifacts are refused before tract
//! sees a byte, and reported; a download resumes with `Range`; and a
//! simulated fleet under a canary rollout of a bad-but-valid version rolls
//! it back on trial until the registry halts the rollout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cloud_sync::registry::keys::{self, Signer};
use cloud_sync::registry::{PushOptions, Registry};
use cloud_sync::sync_protocol::registry::{RolloutEvent, RolloutState};
use edge_agent::inference::LoadedModel;
use edge_agent::inference::swap::{self, Watcher};
use edge_agent::inference::trial::TrialSettings;
use edge_agent::rollout::fetch::{FetchError, Fetcher, Polled};
use edge_agent::rollout::reports::ReportQueue;
use edge_agent::rollout::{RolloutSettings, TrustedKey};
use edge_agent::telemetry::Counters;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::inference::{
    get, keep, one_window, package_copy, shipped, start, verify_settings, version, wait_until,
};
use super::sync::sync_settings;

const NAME: &str = "nab-machine-temp";

/// cloud-sync with a registry (signing key generated), devices and an
/// operator.
struct Cloud {
    dir: tempfile::TempDir,
    server: Option<cloud_sync::Server>,
    stop: CancellationToken,
    addr: SocketAddr,
    registry: Registry,
    signer: Signer,
    settings: cloud_sync::Settings,
    store: cloud_sync::Store,
}

impl Cloud {
    async fn start() -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = cloud_sync::Settings::for_database(dir.path().join("cloud.db"));
        settings.registry.artifact_dir = dir.path().join("artifacts");
        settings.registry.signing_key_file = dir.path().join("key.pem");
        settings.registry.public_keys_file = dir.path().join("keys.toml");
        keys::generate(&settings.registry).unwrap();
        let signer = Signer::load(&settings.registry).unwrap();
        let stop = CancellationToken::new();
        let server = cloud_sync::start(settings.clone(), stop.clone())
            .await
            .unwrap();
        let store = server.store().clone();
        let registry = Registry::open(&settings.registry, &settings.storage)
            .await
            .unwrap();
        Cloud {
            dir,
            addr: server.addr,
            server: Some(server),
            stop,
            registry,
            signer,
            settings,
            store,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn trusted(&self) -> TrustedKey {
        TrustedKey::parse(&hex::encode(self.signer.public_key().as_bytes())).unwrap()
    }

    /// Pushes the shipped package as `v`, edited by `edit`; returns the
    /// artifact's sha256.
    async fn push(&self, v: &'static str, edit: impl Fn(String) -> String) -> String {
        let dir = self.dir.path().join("src").join(v);
        package_copy(&shipped(), &dir, |t| edit(version(v)(t)), keep);
        self.registry
            .push(&dir, &self.signer, PushOptions::default())
            .await
            .unwrap()
            .version
            .sha256
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(s) = self.server.take() {
            s.join().await.unwrap();
        }
    }
}

fn same(t: String) -> String {
    t
}

/// Valid, passes every package check, flags every window.
fn absurd_threshold(t: String) -> String {
    t.replace("threshold = 49.569885", "threshold = 0.000001")
}

fn settings(state: &Path, trusted: Vec<TrustedKey>) -> RolloutSettings {
    RolloutSettings {
        models: vec![NAME.into()],
        group: "default".into(),
        poll_interval: Duration::from_secs(1),
        trusted_keys: trusted,
        max_artifact_bytes: 16 << 20,
        allow_downgrade: false,
        downloads_dir: state.join("rollout/downloads"),
        reports_dir: state.join("rollout/reports"),
        shadow_dir: state.join("rollout/shadow"),
    }
}

struct Device {
    state: PathBuf,
    fetcher: Fetcher,
    reports: ReportQueue,
    counters: Arc<Counters>,
}

impl Device {
    fn new(cloud: &Cloud, state: &Path, token: &str, rollout: RolloutSettings) -> Device {
        std::fs::create_dir_all(&rollout.downloads_dir).unwrap();
        let sync = sync_settings(&cloud.url(), token);
        let client = edge_agent::sync::build_client(&sync).unwrap();
        let reports = ReportQueue::open(&rollout.reports_dir).unwrap();
        let counters = Arc::new(Counters::default());
        let fetcher = Fetcher::new(
            client,
            cloud.url(),
            sync.token.clone(),
            rollout,
            state.join("packages"),
            reports.clone(),
            counters.clone(),
        );
        Device {
            state: state.to_owned(),
            fetcher,
            reports,
            counters,
        }
    }

    fn packages(&self) -> PathBuf {
        self.state.join("packages").join(NAME)
    }

    fn queued(&self) -> Vec<(RolloutEvent, String, String)> {
        self.reports
            .pending()
            .into_iter()
            .map(|(_, r)| (r.event, r.version, r.reason.unwrap_or_default()))
            .collect()
    }
}

fn refused(polled: Result<Polled, FetchError>) -> String {
    match polled {
        Err(FetchError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Every refusal path the registry can provoke, in the order the agent
/// checks them, each reported and none installing anything; then a
/// trusted, intact version installs byte for byte, and a resumed download
/// appends to what an earlier attempt left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_trusted_intact_versions_are_installed_and_refusals_are_reported() {
    let cloud = Cloud::start().await;
    let token = cloud.store.add_device("edge-1").await.unwrap();
    let d = tempfile::tempdir().unwrap();

    // Nothing deployed yet.
    let mut dev = Device::new(
        &cloud,
        d.path(),
        &token,
        settings(d.path(), vec![cloud.trusted()]),
    );
    assert_eq!(
        dev.fetcher.poll(NAME).await.unwrap(),
        Polled::NothingDeployed
    );

    // 1.0.0: installed byte for byte, then a 304 costs nothing.
    let sha_100 = cloud.push("1.0.0", same).await;
    cloud
        .registry
        .promote(NAME, "1.0.0", "default")
        .await
        .unwrap();
    assert_eq!(
        dev.fetcher.poll(NAME).await.unwrap(),
        Polled::Installed("1.0.0".into())
    );
    let installed = dev.packages().join("1.0.0");
    assert_eq!(
        std::fs::read(installed.join("model.onnx")).unwrap(),
        std::fs::read(shipped().join("model.onnx")).unwrap()
    );
    LoadedModel::load(&installed).unwrap();
    assert_eq!(dev.fetcher.poll(NAME).await.unwrap(), Polled::Unchanged);
    assert_eq!(get(&dev.counters.rollout_installs), 1);
    assert!(
        !d.path()
            .join(format!("rollout/downloads/{sha_100}.part"))
            .exists()
    );

    // 1.1.0 for an agent that trusts another key only.
    let sha_110 = cloud.push("1.1.0", same).await;
    cloud
        .registry
        .promote(NAME, "1.1.0", "default")
        .await
        .unwrap();
    let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let other = TrustedKey::parse(&hex::encode(other.as_bytes())).unwrap();
    let e = tempfile::tempdir().unwrap();
    let mut stranger = Device::new(&cloud, e.path(), &token, settings(e.path(), vec![other]));
    let why = refused(stranger.fetcher.poll(NAME).await);
    assert!(why.contains("not in rollout.trusted_keys"), "{why}");
    assert!(!stranger.packages().join("1.1.0").exists());
    assert!(
        !e.path()
            .join("rollout/downloads")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "an untrusted artifact is not even downloaded"
    );

    // The artifact is tampered with on the server: same length, other bytes.
    let artifact = cloud.settings.registry.artifact_dir.join(&sha_110);
    let mut bytes = std::fs::read(&artifact).unwrap();
    let good = bytes.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();
    let why = refused(dev.fetcher.poll(NAME).await);
    assert!(why.contains("sha256"), "{why}");
    assert!(!dev.packages().join("1.1.0").exists());
    assert!(
        !d.path()
            .join(format!("rollout/downloads/{sha_110}.part"))
            .exists(),
        "a tampered download is discarded"
    );

    // The artifact is repaired; a fresh agent run (the refusal is
    // remembered per run) resumes a download that an earlier attempt left
    // half done: a garbage prefix proves the agent appended with Range.
    std::fs::write(&artifact, &good).unwrap();
    let part = d.path().join(format!("rollout/downloads/{sha_110}.part"));
    std::fs::write(&part, vec![0u8; good.len() / 2]).unwrap();
    let mut dev = Device::new(
        &cloud,
        d.path(),
        &token,
        settings(d.path(), vec![cloud.trusted()]),
    );
    let why = refused(dev.fetcher.poll(NAME).await);
    assert!(
        why.contains("sha256"),
        "resumed onto the garbage prefix: {why}"
    );
    std::fs::write(&part, &good[..good.len() / 2]).unwrap();
    let mut dev = Device::new(
        &cloud,
        d.path(),
        &token,
        settings(d.path(), vec![cloud.trusted()]),
    );
    assert_eq!(
        dev.fetcher.poll(NAME).await.unwrap(),
        Polled::Installed("1.1.0".into())
    );
    LoadedModel::load(&dev.packages().join("1.1.0")).unwrap();

    // Oversized for this agent.
    cloud.push("1.2.0", same).await;
    cloud
        .registry
        .promote(NAME, "1.2.0", "default")
        .await
        .unwrap();
    let mut small = settings(d.path(), vec![cloud.trusted()]);
    small.max_artifact_bytes = 1024;
    let mut tiny = Device::new(&cloud, d.path(), &token, small);
    let why = refused(tiny.fetcher.poll(NAME).await);
    assert!(why.contains("exceeds rollout.max_artifact_bytes"), "{why}");

    // A downgrade the registry does not direct: 1.0.0 promoted again by
    // hand while this agent has 1.1.0 (operators roll back with
    // `models rollback`, which marks the deployment a downgrade).
    cloud
        .registry
        .promote(NAME, "1.0.0", "default")
        .await
        .unwrap();
    std::fs::remove_dir_all(dev.packages().join("1.0.0")).unwrap();
    let why = refused(dev.fetcher.poll(NAME).await);
    assert!(
        why.contains("downgrade from 1.1.0 to 1.0.0 refused"),
        "{why}"
    );
    assert!(!dev.packages().join("1.0.0").exists());

    let events: Vec<(RolloutEvent, String)> = dev
        .queued()
        .into_iter()
        .chain(tiny.queued())
        .chain(stranger.queued())
        .map(|(e, v, _)| (e, v))
        .collect();
    for (event, v) in &events {
        assert_eq!(*event, RolloutEvent::Refused, "{v}");
    }
    assert!(events.len() >= 5, "{events:?}");

    // Reports reach the registry and leave the queue.
    dev.fetcher.deliver_reports(&dev.reports).await;
    assert!(dev.queued().is_empty());
    assert!(get(&dev.counters.rollout_reports_sent) >= 3);
    cloud.stop().await;
}

/// One agent of the simulated fleet: registry fetcher, watcher with trials
/// and reports, inference stage.
struct FleetAgent {
    device: Device,
    run: super::inference::Running,
    stop: CancellationToken,
    watching: tokio::task::JoinHandle<()>,
    seq: u64,
}

impl FleetAgent {
    async fn start(cloud: &Cloud, root: &Path, id: &str, trial: &TrialSettings) -> FleetAgent {
        let state = root.join(id);
        let token = cloud.store.add_device(id).await.unwrap();
        let device = Device::new(
            cloud,
            &state,
            &token,
            settings(&state, vec![cloud.trusted()]),
        );
        let mut device = device;
        assert_eq!(
            device.fetcher.poll(NAME).await.unwrap(),
            Polled::Installed("1.0.0".into())
        );
        let first = device.packages().join("1.0.0");
        swap::write_marker(&first, swap::ACCEPTED, "{}").unwrap();
        let initial = LoadedModel::load(&first).unwrap();
        let (swap_tx, swap_rx) = mpsc::channel(4);
        let (outcome_tx, outcome_rx) = mpsc::channel(16);
        let trial = trial.clone();
        let run = start(
            &state,
            vec![initial.clone()],
            Duration::ZERO,
            Some(swap_rx),
            |s| s.with_trial(trial, outcome_tx),
        )
        .await;
        let watcher = Watcher::new(
            state.join("packages"),
            Duration::from_millis(100),
            verify_settings(),
            std::slice::from_ref(&initial),
            swap_tx,
            run.metrics.clone(),
        )
        .with_trials(outcome_rx)
        .with_reports(device.reports.clone());
        let stop = CancellationToken::new();
        let watching = tokio::spawn(watcher.run(stop.clone()));
        FleetAgent {
            device,
            run,
            stop,
            watching,
            seq: 1,
        }
    }

    /// Scores `n` windows; returns the versions that served them.
    async fn windows(&mut self, n: usize) -> Vec<String> {
        let mut served = Vec::new();
        for _ in 0..n {
            self.seq = one_window(&self.run, self.seq).await;
            served.push(
                self.run
                    .events
                    .recv()
                    .await
                    .unwrap()
                    .prediction
                    .model_version,
            );
        }
        served
    }

    async fn finish(self) {
        self.stop.cancel();
        self.watching.await.unwrap();
        self.run.finish().await;
    }
}

/// A simulated fleet of 8 agents under a 50 % canary of a bad-but-valid
/// version, halting once more than 30 % of the reporting devices rolled it
/// back: canary devices install it, fail its trial, restore 1.0.0 and
/// report; the registry halts the rollout; devices outside the canary never
/// see it; after the halt every device is directed to 1.0.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_of_a_bad_model_is_rolled_back_on_devices_and_halted_by_the_registry() {
    let cloud = Cloud::start().await;
    let root = tempfile::tempdir().unwrap();
    cloud.push("1.0.0", same).await;
    cloud
        .registry
        .promote(NAME, "1.0.0", "default")
        .await
        .unwrap();
    let trial = TrialSettings {
        duration: Duration::from_secs(3600),
        min_windows: 3,
        max_p99_latency: Duration::from_secs(10),
        ..TrialSettings::default()
    };
    let mut agents = Vec::new();
    for i in 0..8 {
        agents.push(FleetAgent::start(&cloud, root.path(), &format!("fleet-{i}"), &trial).await);
    }
    cloud.push("1.1.0", absurd_threshold).await;
    let promotion = cloud
        .registry
        .promote_staged(NAME, "1.1.0", "default", 50, 0.3)
        .await
        .unwrap();
    assert_eq!(promotion.rollout.unwrap().state, RolloutState::Active);
    let in_canary: Vec<bool> = (0..8)
        .map(|i| {
            cloud_sync::sync_protocol::registry::canary_bucket(&format!("fleet-{i}"), NAME, "1.1.0")
                < 50
        })
        .collect();
    assert!(
        in_canary.iter().any(|c| *c) && in_canary.iter().any(|c| !c),
        "the test needs devices on both sides: {in_canary:?}"
    );

    let mut halted_after = None;
    for (i, agent) in agents.iter_mut().enumerate() {
        let polled = agent.device.fetcher.poll(NAME).await.unwrap();
        if !in_canary[i] {
            assert_eq!(
                polled,
                Polled::AlreadyInstalled("1.0.0".into()),
                "fleet-{i}"
            );
            let served = agent.windows(3).await;
            assert!(served.iter().all(|v| v == "1.0.0"), "fleet-{i}: {served:?}");
            continue;
        }
        if halted_after.is_some() {
            // The rollout is halted: canary devices that did not get it yet
            // never will.
            assert_eq!(
                polled,
                Polled::AlreadyInstalled("1.0.0".into()),
                "fleet-{i}"
            );
            continue;
        }
        assert_eq!(polled, Polled::Installed("1.1.0".into()), "fleet-{i}");
        let metrics = agent.run.metrics.clone();
        wait_until("trial starts", || get(&metrics.trials) == 1).await;
        let mut served = Vec::new();
        while get(&metrics.rollbacks) == 0 {
            assert!(served.len() < 20, "fleet-{i}: no rollback: {served:?}");
            served.extend(agent.windows(1).await);
        }
        assert!(
            served.contains(&"1.1.0".to_owned()),
            "fleet-{i}: {served:?}"
        );
        let after = agent.windows(2).await;
        assert!(
            after.iter().all(|v| v == "1.0.0"),
            "fleet-{i}: previous serves: {after:?}"
        );
        let rejected = agent.device.packages().join("1.1.0").join(swap::REJECTED);
        wait_until("rejection recorded", || rejected.is_file()).await;
        wait_until("report queued", || {
            agent
                .device
                .queued()
                .iter()
                .any(|(e, v, _)| *e == RolloutEvent::RolledBack && v == "1.1.0")
        })
        .await;
        agent
            .device
            .fetcher
            .deliver_reports(&agent.device.reports)
            .await;
        assert!(
            agent.device.queued().is_empty(),
            "fleet-{i}: reports delivered"
        );
        let overview = cloud.registry.overview(NAME, "default").await.unwrap();
        if overview.rollout.as_ref().map(|r| r.state) == Some(RolloutState::Halted) {
            halted_after = Some(i);
        }
    }
    assert!(halted_after.is_some(), "the registry halted the rollout");

    // After the halt every device is directed to 1.0.0 and serves it.
    for (i, agent) in agents.iter_mut().enumerate() {
        agent.device.fetcher.poll(NAME).await.unwrap();
        assert!(
            !agent.device.packages().join("1.1.0").is_dir()
                || agent
                    .device
                    .packages()
                    .join("1.1.0")
                    .join(swap::REJECTED)
                    .is_file(),
            "fleet-{i}: 1.1.0 is never selectable again"
        );
        let served = agent.windows(1).await;
        assert_eq!(served, ["1.0.0"], "fleet-{i}");
    }
    for agent in agents {
        agent.finish().await;
    }
    cloud.stop().await;
}

/// The real binary with the registry unreachable: it boots, logs the
/// failed poll, and serves the last good version on disk (1.1.0, adopted
/// earlier) instead of the configured 1.0.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_boots_offline_and_serves_the_last_good_version_on_disk() {
    let broker = edge_agent::demo::broker::start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("packages").join(NAME).join("1.1.0");
    package_copy(&shipped(), &good, version("1.1.0"), keep);
    swap::write_marker(&good, swap::ACCEPTED, "{}").unwrap();
    std::fs::write(dir.path().join("token"), "t0ken\n").unwrap();
    let key = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&[9; 32])
            .verifying_key()
            .as_bytes(),
    );
    let text = super::util::config(dir.path(), &format!("mqtt://{broker}"), "it-offline")
        .replace(
            "[sync]\n# Set to false to keep everything local.\nenabled = false",
            "[sync]\nenabled = true",
        )
        .replace("http://127.0.0.1:8443", "http://127.0.0.1:9")
        .replace("/etc/edge-agent/token", "token")
        .replace(
            "enabled = false\nmodels = [\"nab-machine-temp\"]",
            "enabled = true\nmodels = [\"nab-machine-temp\"]",
        )
        .replace("trusted_keys = []", &format!("trusted_keys = [\"{key}\"]"))
        .replace("watch_interval_ms = 5000", "watch_interval_ms = 200");
    assert!(text.contains("url = \"http://127.0.0.1:9\""), "{text}");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, text).unwrap();
    let agent = super::util::Agent::start(&cfg);
    // Either line may come first.
    let (mut poll_failed, mut swapped) = (false, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(poll_failed && swapped) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = agent.lines.recv_timeout(left) else {
            break;
        };
        poll_failed |= line.contains("registry poll failed");
        swapped |= line.contains("model swapped") && line.contains("to=1.1.0");
    }
    assert!(poll_failed, "the unreachable registry is logged");
    assert!(
        swapped,
        "the adopted version on disk is swapped in without the network"
    );
    assert_eq!(agent.terminate(Duration::from_secs(10)), Some(0));
}

/// Shadow mode through the registry: the deployment names a candidate, the
/// agent installs it beside the active version, runs it on the same
/// windows without publishing it, and reports the comparison, which the
/// registry counts; clearing the shadow removes the candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_candidate_from_the_registry_is_compared_and_reported() {
    let cloud = Cloud::start().await;
    let root = tempfile::tempdir().unwrap();
    cloud.push("1.0.0", same).await;
    cloud
        .registry
        .promote(NAME, "1.0.0", "default")
        .await
        .unwrap();
    cloud.push("1.1.0", absurd_threshold).await;
    let state = root.path().join("shadowed");
    let token = cloud.store.add_device("shadowed").await.unwrap();
    let rollout = settings(&state, vec![cloud.trusted()]);
    let shadow_dir = rollout.shadow_dir.clone();
    let mut device = Device::new(&cloud, &state, &token, rollout);
    assert_eq!(
        device.fetcher.poll(NAME).await.unwrap(),
        Polled::Installed("1.0.0".into())
    );
    let first = device.packages().join("1.0.0");
    swap::write_marker(&first, swap::ACCEPTED, "{}").unwrap();
    let initial = LoadedModel::load(&first).unwrap();

    let (swap_tx, swap_rx) = mpsc::channel(4);
    let (shadow_tx, shadow_rx) = mpsc::channel(4);
    let (summary_tx, summary_rx) = mpsc::channel(16);
    let mut run = start(
        &state,
        vec![initial.clone()],
        Duration::ZERO,
        Some(swap_rx),
        |s| s.with_shadows(shadow_rx, summary_tx),
    )
    .await;
    let watcher = Watcher::new(
        state.join("packages"),
        Duration::from_millis(100),
        verify_settings(),
        std::slice::from_ref(&initial),
        swap_tx,
        run.metrics.clone(),
    )
    .with_reports(device.reports.clone())
    .with_shadows(shadow_dir.clone(), shadow_tx, summary_rx);
    let stop = CancellationToken::new();
    let watching = tokio::spawn(watcher.run(stop.clone()));

    cloud
        .registry
        .set_shadow(NAME, "default", Some(("1.1.0", 100)))
        .await
        .unwrap();
    device.fetcher.poll(NAME).await.unwrap();
    assert!(
        shadow_dir
            .join(NAME)
            .join("1.1.0")
            .join("model.onnx")
            .is_file()
    );
    assert!(
        !device.packages().join("1.1.0").exists(),
        "a shadow candidate is never a serving version"
    );
    // Windows until the candidate has run beside the active model and a
    // comparison was queued.
    let mut seq = 1;
    let mut windows = 0;
    while !device
        .queued()
        .iter()
        .any(|(e, v, _)| *e == RolloutEvent::Shadow && v == "1.1.0")
    {
        assert!(windows < 400, "no shadow report after {windows} windows");
        seq = one_window(&run, seq).await;
        let e = run.events.recv().await.unwrap();
        assert_eq!(
            e.prediction.model_version, "1.0.0",
            "only the active version publishes"
        );
        windows += 1;
    }
    let shadow = device
        .reports
        .pending()
        .into_iter()
        .find_map(|(_, r)| r.shadow)
        .unwrap();
    assert_eq!(shadow.windows, 100);
    assert!(
        shadow.agreement < 0.01,
        "the candidate flags every window: {shadow:?}"
    );
    let sent = get(&device.counters.rollout_reports_sent);
    device.fetcher.deliver_reports(&device.reports).await;
    assert!(device.queued().is_empty());
    assert!(
        get(&device.counters.rollout_reports_sent) > sent,
        "the registry accepted the shadow report"
    );
    let overview = cloud.registry.overview(NAME, "default").await.unwrap();
    assert_eq!(overview.shadow.map(|s| s.version), Some("1.1.0".to_owned()));

    cloud
        .registry
        .set_shadow(NAME, "default", None)
        .await
        .unwrap();
    device.fetcher.poll(NAME).await.unwrap();
    assert!(
        !shadow_dir.join(NAME).join("1.1.0").exists(),
        "a cleared shadow is removed"
    );
    stop.cancel();
    watching.await.unwrap();
    run.finish().await;
    cloud.stop().await;
}
