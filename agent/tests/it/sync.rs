//! Cloud sync against the real cloud-sync (in process, SQLite) over real
//! HTTP, with the real buffer: batching by rows and time, quarantine of
//! refused rows (and re-queueing them with the CLI), auth failures that
//! quarantine nothing, live rows before a paced backlog, TLS with a pinned
//! CA and a client certificate, and SIGKILLs of the real binary while it
//! syncs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_agent::buffer::{Buffer, BufferThread, Item, NewReading};
use edge_agent::config::{BufferSettings, MqttTls, Secret, SyncSettings};
use edge_agent::sync::SyncStage;
use edge_agent::telemetry::Counters;
use tokio_util::sync::CancellationToken;

use super::util;

const DEVICE: &str = "it-sync";

/// cloud-sync on `127.0.0.1:0` with a registered device.
struct Cloud {
    server: Option<cloud_sync::Server>,
    stop: CancellationToken,
    addr: SocketAddr,
    token: String,
    store: cloud_sync::Store,
}

impl Cloud {
    async fn start(db: &Path, max_body_bytes: usize) -> Cloud {
        Cloud::start_with(db, max_body_bytes, None).await
    }

    /// With `token`, the device was registered by an earlier run on `db`.
    async fn start_with(db: &Path, max_body_bytes: usize, token: Option<String>) -> Cloud {
        let mut settings = cloud_sync::Settings::for_database(db);
        settings.max_body_bytes = max_body_bytes;
        let stop = CancellationToken::new();
        let server = cloud_sync::start(settings, stop.clone()).await.unwrap();
        let store = server.store().clone();
        let token = match token {
            Some(t) => t,
            None => store.add_device(DEVICE).await.unwrap(),
        };
        Cloud {
            addr: server.addr,
            server: Some(server),
            stop,
            token,
            store,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Rows per reading key (`source/stream`) and whether each key holds
    /// exactly `1..=rows`.
    async fn readings(&self) -> BTreeMap<String, (u64, bool)> {
        let summary = self.store.summary(DEVICE).await.unwrap();
        summary
            .readings
            .into_iter()
            .map(|s| (s.key, (s.rows, s.min_seq == 1 && s.max_seq == s.rows)))
            .collect()
    }

    async fn count(&self, key: &str) -> u64 {
        self.readings().await.get(key).map_or(0, |(n, _)| *n)
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            server.join().await.unwrap();
        }
        self.store.clone().close().await.unwrap();
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

pub(super) fn sync_settings(url: &str, token: &str) -> SyncSettings {
    SyncSettings {
        url: url.to_owned(),
        token: Secret::new(token.to_owned()),
        batch_max_rows: 500,
        interval: ms(50),
        request_timeout: ms(5000),
        backoff_min: ms(20),
        backoff_max: ms(200),
        batch_max_bytes: 1 << 20,
        batch_max_delay: ms(50),
        backlog_rows_per_sec: None,
        heartbeat_interval: None,
        tls: None,
    }
}

fn open_buffer(dir: &Path) -> (Buffer, BufferThread) {
    Buffer::open(&BufferSettings::for_path(dir.join("buffer.db"))).unwrap()
}

fn reading(stream: &str, i: u64, values: BTreeMap<String, f64>) -> Item {
    Item::Reading(NewReading {
        source: "m1".into(),
        stream: stream.into(),
        ident: None,
        device_ts_ms: None,
        recv_ts_ms: edge_agent::now_ms(),
        clock_ok: true,
        values: if values.is_empty() {
            BTreeMap::from([("v".into(), i as f64)])
        } else {
            values
        },
    })
}

async fn append(buffer: &Buffer, stream: &str, n: u64) {
    let items = (0..n)
        .map(|i| reading(stream, i, BTreeMap::new()))
        .collect();
    buffer.append(items).await.unwrap();
}

/// A running sync stage.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<edge_agent::sync::Result<()>>,
    counters: Arc<Counters>,
}

fn start_sync(settings: SyncSettings, buffer: &Buffer) -> Running {
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let stage = SyncStage::new(settings, DEVICE.into(), buffer.clone(), counters.clone());
    let task = tokio::spawn(stage.run(stop.clone()));
    Running {
        stop,
        task,
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
            tokio::time::sleep(ms(20)).await;
        }
    }};
}

/// A batch is sent when it is full (rows) without waiting, and a partial
/// batch of live rows only once its oldest row has waited
/// `batch_max_delay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_close_on_rows_or_delay() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db"), 8 << 20).await;
    let (buffer, thread) = open_buffer(dir.path());
    let mut s = sync_settings(&cloud.url(), &cloud.token);
    s.batch_max_rows = 500;
    s.batch_max_delay = ms(1500);
    // The first row is backlog (stored before start-up) and goes at once:
    // once it is in the cloud the stage has taken its watermark.
    append(&buffer, "warmup", 1).await;
    let sync = start_sync(s, &buffer);
    wait_until!(
        "warm-up row",
        Duration::from_secs(10),
        cloud.count("m1/warmup").await == 1
    );

    let appended = Instant::now();
    append(&buffer, "live", 600).await;
    wait_until!(
        "the full batch",
        Duration::from_secs(5),
        cloud.count("m1/live").await >= 500
    );
    let n = cloud.count("m1/live").await;
    if appended.elapsed() < ms(1200) {
        assert_eq!(n, 500, "only the full batch leaves before the delay");
    }
    wait_until!(
        "the partial batch",
        Duration::from_secs(10),
        cloud.count("m1/live").await == 600
    );
    assert!(
        appended.elapsed() >= ms(1400),
        "the partial batch left after {:?}, before batch_max_delay",
        appended.elapsed()
    );
    assert_eq!(cloud.readings().await["m1/live"], (600, true));
    sync.stop().await;
    drop(buffer);
    thread.join();
    cloud.stop().await;
}

/// One row the cloud refuses for good (413: larger than its body limit;
/// 400: empty stream name) is quarantined on its own after the batch is
/// split; its neighbours are synced and newer rows are not blocked. The CLI
/// re-queues it, and a cloud that accepts it then gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_rows_are_quarantined_alone_and_can_be_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let cloud_db = dir.path().join("cloud.db");
    let cloud = Cloud::start(&cloud_db, 16 * 1024).await;
    let (buffer, thread) = open_buffer(dir.path());
    append(&buffer, "t", 20).await;
    let huge: BTreeMap<String, f64> = (0..1500)
        .map(|i| (format!("field_{i}"), f64::from(i)))
        .collect();
    buffer.append(vec![reading("t", 0, huge)]).await.unwrap();
    append(&buffer, "t", 20).await;
    buffer
        .append(vec![reading("", 0, BTreeMap::new())])
        .await
        .unwrap();
    append(&buffer, "t", 9).await;

    let sync = start_sync(sync_settings(&cloud.url(), &cloud.token), &buffer);
    wait_until!(
        "every other row",
        Duration::from_secs(20),
        cloud.count("m1/t").await == 49
    );
    wait_until!(
        "two quarantine records",
        Duration::from_secs(10),
        buffer.sync_stats(0).await.unwrap().quarantine_batches == 2
    );
    // Newer rows still flow.
    append(&buffer, "t", 5).await;
    wait_until!(
        "newer rows",
        Duration::from_secs(10),
        cloud.count("m1/t").await == 54
    );
    let counters = sync.stop().await;
    assert_eq!(Counters::get(&counters.sync_quarantined_batches), 2);
    assert_eq!(Counters::get(&counters.sync_quarantined_rows), 2);
    let stats = buffer.sync_stats(0).await.unwrap();
    assert_eq!(
        (stats.readings_quarantined, stats.readings_unsynced),
        (2, 0)
    );
    // seq 21 (the huge row) is missing from the cloud's stream.
    let summary = cloud.store.summary(DEVICE).await.unwrap();
    let t = summary.readings.iter().find(|s| s.key == "m1/t").unwrap();
    assert_eq!((t.rows, t.min_seq, t.max_seq), (54, 1, 55));
    drop(buffer);
    thread.join();
    let token = cloud.token.clone();
    cloud.stop().await;

    // Re-queue with the CLI, as an operator would after fixing the cloud.
    std::fs::write(dir.path().join("token"), "unused").unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        util::config(dir.path(), "mqtt://127.0.0.1:1883", "it-requeue").replace(
            "/etc/edge-agent/token",
            &dir.path().join("token").display().to_string(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(util::bin())
        .args(["buffer", "requeue-quarantine", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("re-queued 2 readings"), "{text}");

    let cloud = Cloud::start_with(&cloud_db, 8 << 20, Some(token)).await;
    let (buffer, thread) = open_buffer(dir.path());
    let sync = start_sync(sync_settings(&cloud.url(), &cloud.token), &buffer);
    wait_until!(
        "the re-queued big row",
        Duration::from_secs(20),
        cloud.count("m1/t").await == 55
    );
    // The empty-stream row is refused again and quarantined again.
    wait_until!(
        "the empty-stream row back in quarantine",
        Duration::from_secs(10),
        buffer.sync_stats(0).await.unwrap().readings_quarantined == 1
    );
    sync.stop().await;
    assert_eq!(cloud.readings().await["m1/t"], (55, true));
    drop(buffer);
    thread.join();
    cloud.stop().await;
}

/// Dead letters go in batches of their own: whether or not this cloud
/// stores them yet, readings are never held back or quarantined with them,
/// and no dead letter is lost (synced or quarantined).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_never_hold_back_readings() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db"), 8 << 20).await;
    let (buffer, thread) = open_buffer(dir.path());
    let dead = (0..3u8).map(|i| {
        Item::DeadLetter(edge_agent::buffer::DeadLetter {
            topic: format!("sensors/m1/{i}"),
            reason: "malformed",
            detail: "expected JSON".into(),
            payload: vec![b'x', i],
            payload_len: 2,
            recv_ts_ms: edge_agent::now_ms(),
        })
    });
    buffer.append(dead.collect()).await.unwrap();
    append(&buffer, "t", 100).await;
    let sync = start_sync(sync_settings(&cloud.url(), &cloud.token), &buffer);
    wait_until!(
        "readings",
        Duration::from_secs(20),
        cloud.count("m1/t").await == 100
    );
    wait_until!(
        "dead letters handled",
        Duration::from_secs(20),
        buffer.sync_stats(0).await.unwrap().dead_letters_unsynced == 0
    );
    let counters = sync.stop().await;
    let stats = buffer.sync_stats(0).await.unwrap();
    assert_eq!(stats.readings_quarantined, 0);
    assert_eq!(
        Counters::get(&counters.synced_dead_letters) + stats.dead_letters_quarantined,
        3
    );
    println!(
        "dead letters: {} synced, {} quarantined by this cloud",
        Counters::get(&counters.synced_dead_letters),
        stats.dead_letters_quarantined
    );
    drop(buffer);
    thread.join();
    cloud.stop().await;
}

/// A wrong token is a configuration error: logged and retried, counted,
/// nothing quarantined, nothing marked synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failure_quarantines_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db"), 8 << 20).await;
    let (buffer, thread) = open_buffer(dir.path());
    append(&buffer, "t", 50).await;
    let sync = start_sync(sync_settings(&cloud.url(), "not-the-token"), &buffer);
    let counters = sync.counters.clone();
    wait_until!(
        "three refused attempts",
        Duration::from_secs(10),
        Counters::get(&counters.sync_auth_failures) >= 3
    );
    sync.stop().await;
    let stats = buffer.sync_stats(0).await.unwrap();
    assert_eq!(stats.quarantine_batches, 0);
    assert_eq!(stats.readings_unsynced, 50);
    assert_eq!(cloud.count("m1/t").await, 0);
    drop(buffer);
    thread.join();
    cloud.stop().await;
}

/// Bodies of each compact layout version that reached [`refuse_v2`]'s
/// inner router.
static V1_BODIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static V2_BODIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static V3_BODIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Makes the real router answer like a cloud that predates compact layout
/// version 2 (and so version 3): 415 with `Accept-Post` listing v1.
async fn refuse_v2(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use std::sync::atomic::Ordering;
    let content_type = request
        .headers()
        .get("content-type")
        .map(|v| v.as_bytes().to_vec());
    match content_type.as_deref() {
        Some(v @ (b"application/vnd.edge-batch.v3" | b"application/vnd.edge-batch.v2")) => {
            if v.ends_with(b"v3") {
                V3_BODIES.fetch_add(1, Ordering::Relaxed);
            } else {
                V2_BODIES.fetch_add(1, Ordering::Relaxed);
            }
            (
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                [(
                    "accept-post",
                    "application/json, application/vnd.edge-batch.v1",
                )],
                r#"{"code":"unsupported_media_type","message":"content type not accepted"}"#,
            )
                .into_response()
        }
        Some(b"application/vnd.edge-batch.v1") => {
            V1_BODIES.fetch_add(1, Ordering::Relaxed);
            next.run(request).await
        }
        _ => next.run(request).await,
    }
}

/// Against a cloud that only knows compact layout version 1 the agent steps
/// down to it once (the refused batch is resent, nothing is quarantined)
/// and keeps it for the rest of the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_cloud_gets_compact_v1() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let store = cloud_sync::Store::open(dir.path().join("cloud.db"))
        .await
        .unwrap();
    let token = store.add_device(DEVICE).await.unwrap();
    let settings = cloud_sync::Settings::for_database("unused.db");
    let app = cloud_sync::app(cloud_sync::AppState::new(store.clone(), &settings))
        .layer(axum::middleware::from_fn(refuse_v2));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let _ = axum::serve(tcp, app).await;
    });
    let (buffer, thread) = open_buffer(dir.path());
    append(&buffer, "t", 1200).await;
    let sync = start_sync(sync_settings(&format!("http://{addr}"), &token), &buffer);
    let counters = sync.counters.clone();
    wait_until!(
        "every row synced",
        Duration::from_secs(20),
        Counters::get(&counters.synced_readings) >= 1200
    );
    sync.stop().await;
    let stats = buffer.sync_stats(0).await.unwrap();
    assert_eq!((stats.readings_unsynced, stats.quarantine_batches), (0, 0));
    let summary = store.summary(DEVICE).await.unwrap();
    assert_eq!(summary.readings[0].rows, 1200);
    assert_eq!(V3_BODIES.load(Ordering::Relaxed), 1);
    assert_eq!(V2_BODIES.load(Ordering::Relaxed), 1);
    assert!(V1_BODIES.load(Ordering::Relaxed) >= 3);
    drop(buffer);
    thread.join();
    server.abort();
    store.close().await.unwrap();
}

/// After a restart with a backlog, rows arriving while it drains reach the
/// cloud first, and the backlog never drains faster than
/// `backlog_rows_per_sec` (plus one batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_rows_overtake_a_paced_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db"), 8 << 20).await;
    let (buffer, thread) = open_buffer(dir.path());
    append(&buffer, "old", 3000).await;
    let mut s = sync_settings(&cloud.url(), &cloud.token);
    s.backlog_rows_per_sec = Some(1000);
    s.batch_max_rows = 1000;
    s.batch_max_delay = ms(100);
    let rate = 1000.0;
    let batch = 1000.0;
    let started = Instant::now();
    let sync = start_sync(s, &buffer);
    wait_until!(
        "the first backlog batch",
        Duration::from_secs(10),
        cloud.count("m1/old").await > 0
    );
    append(&buffer, "new", 20).await;
    let mut live_done_with_old = None;
    loop {
        let old = cloud.count("m1/old").await;
        let new = cloud.count("m1/new").await;
        let bound = rate * started.elapsed().as_secs_f64() + batch;
        assert!(
            (old as f64) <= bound,
            "{old} backlog rows after {:?}",
            started.elapsed()
        );
        if new == 20 && live_done_with_old.is_none() {
            live_done_with_old = Some(old);
        }
        if old == 3000 && new == 20 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "drain too slow"
        );
        tokio::time::sleep(ms(50)).await;
    }
    let old_when_live_done = live_done_with_old.unwrap();
    assert!(
        old_when_live_done < 3000,
        "live rows waited for the whole backlog ({old_when_live_done} old rows first)"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "3000 rows at 1000/s drained in {:?}",
        started.elapsed()
    );
    sync.stop().await;
    let all = cloud.readings().await;
    assert_eq!((all["m1/old"], all["m1/new"]), ((3000, true), (20, true)));
    drop(buffer);
    thread.join();
    cloud.stop().await;
}

/// Heartbeats reach the cloud at start-up and then every interval, with the
/// agent version, the models, the backlog and, from the second one on, the
/// clock offset estimated from the previous round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_report_models_backlog_and_clock() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db"), 8 << 20).await;
    let (buffer, thread) = open_buffer(dir.path());
    append(&buffer, "t", 10).await;
    let mut s = sync_settings(&cloud.url(), &cloud.token);
    s.heartbeat_interval = Some(ms(300));
    let model = sync_protocol::ActiveModel {
        name: "nab".into(),
        version: "1.2.3".into(),
        sha256: "ab".repeat(32),
    };
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let stage = SyncStage::new(s, DEVICE.into(), buffer.clone(), counters.clone())
        .with_models(tokio::sync::watch::channel(vec![model.clone()]).1);
    let task = tokio::spawn(stage.run(stop.clone()));
    edge_agent::install_crypto_provider();
    let client = reqwest::Client::new();
    let url = format!("{}{}", cloud.url(), sync_protocol::heartbeat_path(DEVICE));
    let deadline = Instant::now() + Duration::from_secs(20);
    let beats = loop {
        let resp = client
            .get(&url)
            .bearer_auth(&cloud.token)
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "heartbeat list: {}",
            resp.status()
        );
        let page: sync_protocol::HeartbeatsPage = resp.json().await.unwrap();
        if page.heartbeats.len() >= 3 {
            break page.heartbeats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for three heartbeats"
        );
        tokio::time::sleep(ms(50)).await;
    };
    stop.cancel();
    task.await.unwrap().unwrap();
    let first = &beats[0].heartbeat;
    assert_eq!(first.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(first.models, vec![model]);
    assert_eq!(first.backlog.quota_bytes, 1 << 30);
    assert!(
        first.clock_offset_ms.is_none(),
        "no estimate before the first answer"
    );
    let last = &beats[beats.len() - 1];
    let offset = last
        .heartbeat
        .clock_offset_ms
        .expect("offset after the first ack");
    assert!(offset.abs() < 2000, "same machine, offset {offset} ms");
    assert!(last.heartbeat.counters.contains_key("synced_readings"));
    assert!(Counters::get(&counters.heartbeats_sent) >= 3);
    drop(buffer);
    thread.join();
    cloud.stop().await;
}

// ---- TLS ----

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Two CAs; `ca.pem` signs `server.pem` (localhost, 127.0.0.1) and
/// `client.pem`; `other-ca.pem` signs `other-server.pem`.
fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
    for (prefix, cn) in [("", "edge sync test CA"), ("other-", "some other CA")] {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = |cn: &str, sans: Vec<String>| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(sans).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        write(&format!("{prefix}ca.pem"), ca.pem());
        let (cert, key) = leaf("localhost", vec!["localhost".into(), "127.0.0.1".into()]);
        write(&format!("{prefix}server.pem"), cert);
        write(&format!("{prefix}server.key"), key);
        let (cert, key) = leaf("edge-agent", vec![]);
        write(&format!("{prefix}client.pem"), cert);
        write(&format!("{prefix}client.key"), key);
    }
    Pki { dir }
}

/// A TLS listener for `axum::serve`.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A failed handshake (the point of some tests) just drops the connection.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The cloud-sync router over HTTPS with `server.pem` from `pki`
/// (`prefix` picks the CA); with `client_ca` it requires client
/// certificates signed by that CA.
async fn https_cloud(
    pki: &Pki,
    prefix: &str,
    client_ca: Option<&str>,
    store: cloud_sync::Store,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    edge_agent::install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.path(&format!("{prefix}server.pem")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{prefix}server.key"))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(pki.path(ca)).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    };
    let settings = cloud_sync::Settings::for_database("unused.db");
    let app = cloud_sync::app(cloud_sync::AppState::new(store, &settings));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

async fn healthz(settings: &SyncSettings) -> Result<String, String> {
    let client = edge_agent::sync::build_client(settings).map_err(|e| format!("{e:?}"))?;
    let response = client
        .get(format!("{}/healthz", settings.url))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    response.text().await.map_err(|e| format!("{e:?}"))
}

/// `sync.ca_file` pins the CA: a server certificate from another CA is
/// refused even though it is valid for the host; with the right CA the
/// handshake works; a server that requires a client certificate gets the
/// configured one, and the agent's uploads arrive over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_pins_the_ca_and_presents_the_client_certificate() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let store = cloud_sync::Store::open(dir.path().join("cloud.db"))
        .await
        .unwrap();
    let token = store.add_device(DEVICE).await.unwrap();

    // Server with a certificate from another CA.
    let (addr, other) = https_cloud(&pki, "other-", None, store.clone()).await;
    let mut s = sync_settings(&format!("https://localhost:{}", addr.port()), &token);
    s.tls = Some(MqttTls {
        ca_file: Some(pki.path("ca.pem")),
        client_auth: None,
    });
    let err = healthz(&s).await.unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("Certificate") || err.contains("UnknownIssuer"),
        "{err}"
    );
    other.abort();

    // Server from the pinned CA.
    let (addr, plain) = https_cloud(&pki, "", None, store.clone()).await;
    s.url = format!("https://localhost:{}", addr.port());
    assert_eq!(healthz(&s).await.unwrap(), "ok");
    plain.abort();

    // Mutual TLS: without the client certificate the handshake fails...
    let (addr, mtls) = https_cloud(&pki, "", Some("ca.pem"), store.clone()).await;
    s.url = format!("https://localhost:{}", addr.port());
    assert!(
        healthz(&s).await.is_err(),
        "server accepted a client without certificate"
    );
    // ...and a certificate from another CA is refused too...
    s.tls = Some(MqttTls {
        ca_file: Some(pki.path("ca.pem")),
        client_auth: Some((pki.path("other-client.pem"), pki.path("other-client.key"))),
    });
    assert!(
        healthz(&s).await.is_err(),
        "server accepted a foreign client certificate"
    );
    // ...with the right one, uploads arrive.
    s.tls = Some(MqttTls {
        ca_file: Some(pki.path("ca.pem")),
        client_auth: Some((pki.path("client.pem"), pki.path("client.key"))),
    });
    assert_eq!(healthz(&s).await.unwrap(), "ok");
    let (buffer, thread) = open_buffer(dir.path());
    append(&buffer, "tls", 30).await;
    let sync = start_sync(s, &buffer);
    wait_until!(
        "rows over mutual TLS",
        Duration::from_secs(20),
        store
            .summary(DEVICE)
            .await
            .unwrap()
            .readings
            .iter()
            .any(|r| r.key == "m1/tls" && r.rows == 30)
    );
    sync.stop().await;
    mtls.abort();
    drop(buffer);
    thread.join();
}

// ---- crash between upload and mark ----

/// The real binary syncs QoS 1 messages to the cloud and is SIGKILLed
/// several times while batches are in flight (small batches, so many kills
/// land between the cloud's answer and the mark): after a last restart the
/// cloud holds every reading exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_syncing_leaves_every_row_once_in_the_cloud() {
    use rand::{Rng, SeedableRng};
    let broker = edge_agent::demo::broker::start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&dir.path().join("cloud.db"), 8 << 20).await;
    std::fs::write(dir.path().join("token"), &cloud.token).unwrap();
    let cfg = dir.path().join("agent.toml");
    let text = util::config(dir.path(), &format!("mqtt://{broker}"), "it-sync-kill")
        .replace("enabled = false", "enabled = true")
        // Sync and metrics on; the registry rollout stays off.
        .replace(
            "enabled = true\nmodels = [\"nab-machine-temp\"]",
            "enabled = false\nmodels = [\"nab-machine-temp\"]",
        )
        .replace("http://127.0.0.1:8443", &cloud.url())
        .replace(
            "/etc/edge-agent/token",
            &dir.path().join("token").display().to_string(),
        )
        .replace(
            "device_id = \"edge-0001\"",
            &format!("device_id = \"{DEVICE}\""),
        )
        .replace("batch_max_rows = 1000", "batch_max_rows = 20")
        .replace("batch_max_delay_ms = 1000", "batch_max_delay_ms = 5")
        .replace("interval_ms = 1000", "interval_ms = 20")
        .replace("backlog_rows_per_sec = 20000", "backlog_rows_per_sec = 0")
        .replace(
            "heartbeat_interval_secs = 60",
            "heartbeat_interval_secs = 0",
        );
    std::fs::write(&cfg, text).unwrap();

    let seed = std::env::var("EDGE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| edge_agent::now_ms() as u64);
    println!("sigkill_while_syncing: seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = 3000u64;
    let payloads: Vec<String> = (1..=n).map(util::id_payload).collect();
    let mut agent = util::Agent::start(&cfg);
    assert!(
        tokio::task::block_in_place(|| agent.wait_for("ingest subscribed", Duration::from_secs(30))),
        "agent never subscribed"
    );
    util::publish_all(broker, "sensors/m1/temperature", payloads).await;
    for kill in 0..4 {
        let before = cloud.count("m1/temperature").await;
        // Kill while uploads are going on: a little after progress was seen.
        wait_until!(
            "sync progress",
            Duration::from_secs(30),
            cloud.count("m1/temperature").await > before || before == n
        );
        tokio::time::sleep(ms(rng.random_range(0..40))).await;
        util::kill9(&mut agent);
        println!(
            "kill {kill}: cloud had {} rows",
            cloud.count("m1/temperature").await
        );
        agent = util::Agent::start(&cfg);
    }
    wait_until!(
        "every reading in the cloud",
        Duration::from_secs(60),
        cloud.count("m1/temperature").await == n
    );
    assert_eq!(
        tokio::task::block_in_place(|| agent.terminate(Duration::from_secs(10))),
        Some(0)
    );
    let all = cloud.readings().await;
    assert_eq!(
        all["m1/temperature"],
        (n, true),
        "every row exactly once, no gap"
    );
    cloud.stop().await;
}
