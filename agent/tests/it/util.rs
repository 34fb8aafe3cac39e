//! Helpers for the agent's integration tests: configs on temp dirs, the real
//! binary as a child process, an MQTT test publisher.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use edge_agent::config::DEFAULT_CONFIG;

/// Path of the built `edge-agent` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edge-agent"))
}

/// A config for `dir` against `broker`, sync and the metrics endpoint
/// disabled (re-enabled, it binds a free port), the shipped model.
pub fn config(dir: &Path, broker: &str, client_id: &str) -> String {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp");
    DEFAULT_CONFIG
        .replace(
            "state_dir = \"/var/lib/edge-agent\"",
            &format!("state_dir = {:?}", dir.display().to_string()),
        )
        .replace("mqtt://127.0.0.1:1883", broker)
        .replace(
            "client_id = \"edge-agent-edge-0001\"",
            &format!("client_id = {client_id:?}"),
        )
        .replace(
            "models = [\"models/nab-machine-temp\"]",
            &format!("models = [{:?}]", models.display().to_string()),
        )
        .replace("enabled = true", "enabled = false")
        .replace("listen = \"127.0.0.1:9464\"", "listen = \"127.0.0.1:0\"")
}

/// A running agent whose stderr lines arrive on a channel.
pub struct Agent {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Agent {
    pub fn start(config: &Path) -> Agent {
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--config"]).arg(config);
        Agent::spawn(cmd)
    }

    /// Starts `cmd` (an `edge-agent run` command line, possibly wrapped)
    /// with `RUST_LOG=info` and stderr captured.
    pub fn spawn(mut cmd: Command) -> Agent {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edge-agent");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent { child, lines }
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self, timeout: Duration) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How an agent stopped after [`Agent::stop`].
#[derive(Debug)]
pub struct Stopped {
    /// Exit code; `None` when it had to be killed or died by a signal.
    pub code: Option<i32>,
    /// From SIGTERM to exit.
    pub took: Duration,
    /// Every stderr line not consumed before the SIGTERM.
    pub lines: Vec<String>,
}

impl Agent {
    /// Sends SIGTERM, waits up to `timeout` for the exit (killing the agent
    /// after that), and collects the rest of its stderr.
    pub fn stop(mut self, timeout: Duration) -> Stopped {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the agent") {
                break Some(status);
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = started.elapsed();
        // The reader thread ends at EOF, which follows the exit.
        let lines = self.lines.iter().collect();
        Stopped {
            code: status.and_then(|s| s.code()),
            took,
            lines,
        }
    }
}

/// The JSON log line (`[log] format = "json"`) whose message is `message`.
pub fn json_event(lines: &[String], message: &str) -> Option<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == message)
}

/// Publishes `payloads` with QoS 1 and returns once the broker acked all.
pub async fn publish_all(addr: std::net::SocketAddr, topic: &str, payloads: Vec<String>) {
    use rumqttc::{Event, Packet, QoS};
    let mut opts = rumqttc::MqttOptions::new(
        format!("it-pub-{}", std::process::id()),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
    let total = payloads.len();
    let topic = topic.to_owned();
    let sender = tokio::spawn(async move {
        for p in payloads {
            client
                .publish(&topic, QoS::AtLeastOnce, false, p)
                .await
                .expect("publish");
        }
        client
    });
    let mut acked = 0;
    while acked < total {
        if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("broker") {
            acked += 1;
        }
    }
    let _ = sender.await;
}

// Crash and broker-restart helpers (used by crash.rs).

/// Sends SIGKILL to the agent and reaps it. Panics, with its last log lines,
/// when the agent had already exited on its own: that is a crash the test
/// did not cause.
pub fn kill9(agent: &mut Agent) {
    use std::os::unix::process::ExitStatusExt;
    if let Ok(Some(status)) = agent.child.try_wait() {
        let tail: Vec<String> = agent.lines.try_iter().collect();
        panic!(
            "agent exited on its own ({status}); last lines:\n{}",
            tail[tail.len().saturating_sub(20)..].join("\n")
        );
    }
    // Not reaped yet, so the pid cannot have been reused.
    let pid = agent.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -KILL {pid} failed");
    let status = agent.child.wait().expect("reap the agent");
    assert_eq!(status.signal(), Some(9), "agent {pid} ended by {status}");
}

/// A producer message: `id` is the producer identity the agent dedupes on,
/// repeated as the numeric field `n` so it can be read back from the buffer.
pub fn id_payload(id: u64) -> String {
    format!(
        "{{\"id\":{id},\"n\":{id},\"ts\":{},\"value\":{}}}",
        1_386_018_900 + id * 300,
        70.0 + (id % 17) as f64
    )
}

/// What [`publish_ids`] went through.
#[derive(Debug, Default)]
pub struct PublishReport {
    /// Batches whose connection failed before every PUBACK arrived.
    pub failed_attempts: u64,
    /// Messages published again after such a failure.
    pub republished: u64,
    /// `(last id of a batch, when its last PUBACK arrived)`, in id order.
    pub acked_at: Vec<(u64, std::time::Instant)>,
}

/// Publishes [`id_payload`] for every id in `ids` with QoS 1, `batch` at a
/// time, one batch per `pace`, and returns once the broker acked every one.
///
/// A batch whose connection fails (broker restart) is published again in
/// full on a fresh connection: the ids make that safe, and a fresh
/// connection means no PUBACK of an earlier attempt is miscounted.
pub async fn publish_ids(
    addr: std::net::SocketAddr,
    client_id: &str,
    topic: &str,
    ids: std::ops::RangeInclusive<u64>,
    batch: u64,
    pace: Duration,
    timeout: Duration,
) -> PublishReport {
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
    let connect = || {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5))
            .set_inflight(u16::try_from(batch).expect("batch fits u16"));
        AsyncClient::new(opts, usize::try_from(batch).expect("batch fits usize") + 8)
    };
    async fn acked(eventloop: &mut EventLoop, want: u64) -> Result<(), String> {
        let mut got = 0;
        while got < want {
            match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => got += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no progress for 5 s ({got}/{want} acked)")),
            }
        }
        Ok(())
    }

    let deadline = std::time::Instant::now() + timeout;
    let mut report = PublishReport::default();
    let mut conn: Option<(AsyncClient, EventLoop)> = None;
    let mut tick = tokio::time::interval(pace);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut next, last) = (*ids.start(), *ids.end());
    while next <= last {
        tick.tick().await;
        let end = (next + batch - 1).min(last);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "publisher: ids {next}..={end} not acknowledged within {timeout:?}"
            );
            let (client, eventloop) = conn.get_or_insert_with(&connect);
            for id in next..=end {
                client
                    .try_publish(topic, QoS::AtLeastOnce, false, id_payload(id))
                    .expect("request queue holds a batch");
            }
            match acked(eventloop, end - next + 1).await {
                Ok(()) => break,
                Err(_) => {
                    conn = None;
                    report.failed_attempts += 1;
                    report.republished += end - next + 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        report.acked_at.push((end, std::time::Instant::now()));
        next = end + 1;
    }
    if let Some((client, mut eventloop)) = conn {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    report
}

/// Opens the agent's buffer through its own API (a second connection; WAL
/// readers are safe next to the running agent), runs `f`, and closes it.
async fn with_buffer<T>(path: &Path, f: impl AsyncFnOnce(&edge_agent::buffer::Buffer) -> T) -> T {
    let settings = edge_agent::config::BufferSettings::for_path(path);
    let (buffer, thread) = edge_agent::buffer::Buffer::open(&settings).expect("open buffer");
    let out = f(&buffer).await;
    drop(buffer);
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .expect("join buffer thread");
    out
}

/// Row counts of the buffer at `path`.
pub async fn buffer_stats(path: &Path) -> edge_agent::buffer::BufferStats {
    with_buffer(path, async |b| b.stats().await.expect("buffer stats")).await
}

/// Every unsynced reading of the buffer at `path`, oldest first (with sync
/// disabled, that is every reading).
pub async fn read_readings(path: &Path) -> Vec<sync_protocol::Reading> {
    with_buffer(path, async |b| {
        b.unsynced(usize::MAX / 2)
            .await
            .expect("read readings")
            .readings
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    })
    .await
}

/// The producer id of a reading written from [`id_payload`] (its `n` field).
pub fn reading_id(r: &sync_protocol::Reading) -> u64 {
    let n = r.values.get("n").copied().expect("reading has an n field");
    assert!(n >= 0.0 && n.fract() == 0.0, "n = {n} is not an id");
    n as u64
}

/// Polls the buffer at `path` until it holds at least `n` readings or
/// `timeout` passes; returns the last counts either way.
pub async fn wait_for_readings(
    path: &Path,
    n: u64,
    timeout: Duration,
) -> edge_agent::buffer::BufferStats {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let stats = buffer_stats(path).await;
        if stats.readings >= n || std::time::Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resident set size of process `pid` in KiB (`VmRSS` of /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Number of open file descriptors of process `pid` (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fd dir")
        .count()
}

/// Path of the Mosquitto binary the gated tests start themselves.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// Whether the Mosquitto tests run: `EDGE_TEST_MOSQUITTO` is set (CI sets
/// it) and [`MOSQUITTO`] exists. Prints why not otherwise.
pub fn mosquitto_enabled(test: &str) -> bool {
    if std::env::var_os("EDGE_TEST_MOSQUITTO").is_none() {
        println!("skipped: {test}: EDGE_TEST_MOSQUITTO is not set");
        return false;
    }
    if !Path::new(MOSQUITTO).exists() {
        println!("skipped: {test}: {MOSQUITTO} not found");
        return false;
    }
    true
}

/// A Mosquitto of the test's own on a free loopback port; killed on drop.
///
/// Design: the machine's Mosquitto keeps Debian's `max_queued_messages
/// 1000`, which drops QoS 1 messages for an offline session, so tests that
/// need every message start their own with room for all of them.
pub struct Mosquitto {
    child: Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    conf: PathBuf,
    log: PathBuf,
}

/// Starts Mosquitto on `127.0.0.1` and a free port with its config and log
/// in `dir`; with `persistence`, its database too (so queued messages and
/// sessions survive [`Mosquitto::restart`]).
pub fn spawn_mosquitto(dir: &Path, persistence: bool) -> Mosquitto {
    use std::os::unix::fs::MetadataExt;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut conf = format!(
        "listener {} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n\
         max_inflight_messages 100\nlog_dest stdout\nlog_type all\npersistence {persistence}\n",
        addr.port()
    );
    if persistence {
        conf.push_str(&format!("persistence_location {}/\n", dir.display()));
    }
    // As root, Mosquitto would switch to its own user, which cannot write in `dir`.
    if dir.metadata().expect("stat dir").uid() == 0 {
        conf.push_str("user root\n");
    }
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, conf).expect("write mosquitto.conf");
    let child = launch_mosquitto(&path, &dir.join("mosquitto.log"), addr);
    Mosquitto {
        child,
        addr,
        conf: path,
        log: dir.join("mosquitto.log"),
    }
}

fn launch_mosquitto(conf: &Path, log: &Path, addr: std::net::SocketAddr) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open mosquitto log");
    let err = out.try_clone().expect("clone log handle");
    let mut child = Command::new(MOSQUITTO)
        .arg("-c")
        .arg(conf)
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn mosquitto");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "mosquitto exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return child;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto not listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Mosquitto {
    /// Stops the broker with SIGTERM (it saves its database when persistent)
    /// and starts it again on the same port and config.
    pub fn restart(&mut self) {
        self.terminate();
        self.child = launch_mosquitto(&self.conf, &self.log, self.addr);
    }

    /// Stops the broker with SIGTERM and returns its whole log.
    pub fn stop(mut self) -> String {
        self.terminate();
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("wait mosquitto").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
