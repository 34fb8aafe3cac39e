//! The real binary as a systemd service sees it, without systemd: a unix
//! datagram socket set as `NOTIFY_SOCKET` receives `READY=1` after start-up,
//! `WATCHDOG=1` while ingest is healthy and `STOPPING=1` on SIGTERM; logs
//! come as JSON lines, or as journal fields on a journal socket of the
//! test's own (in a private mount namespace, where the machine allows it).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edge_agent::demo::broker::start_embedded_broker;

use super::util::{self, Agent};

/// A datagram socket playing systemd's end of a protocol.
struct Listener {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Listener {
    fn bind(path: PathBuf) -> Self {
        let sock = UnixDatagram::bind(&path).expect("bind datagram socket");
        Self { sock, path }
    }

    /// The next datagram, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.sock
            .set_read_timeout(Some(timeout))
            .expect("set timeout");
        let mut buf = vec![0u8; 64 * 1024];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(_) => None,
        }
    }

    /// Every datagram already queued.
    fn drain(&self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.recv(Duration::from_millis(50))).collect()
    }
}

fn text(datagram: &[u8]) -> String {
    String::from_utf8_lossy(datagram).into_owned()
}

fn has_line(datagram: &[u8], line: &str) -> bool {
    text(datagram).lines().any(|l| l == line)
}

fn write_config(
    dir: &Path,
    broker: std::net::SocketAddr,
    client_id: &str,
    format: &str,
) -> PathBuf {
    let default = util::config(dir, &format!("mqtt://{broker}"), client_id);
    assert!(
        default.contains("format = \"auto\""),
        "default config lost format = \"auto\""
    );
    let text = default.replace("format = \"auto\"", &format!("format = {format:?}"));
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn payloads(n: u64) -> Vec<String> {
    (1..=n).map(util::id_payload).collect()
}

/// READY=1 first, WATCHDOG=1 pings while messages flow, STOPPING=1 on
/// SIGTERM, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_gets_ready_watchdog_and_stopping() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), broker, "it-notify", "text");
    let notify = Listener::bind(dir.path().join("notify.sock"));
    let mut cmd = Command::new(util::bin());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID");
    let agent = Agent::spawn(cmd);

    let first = tokio::task::block_in_place(|| notify.recv(Duration::from_secs(30)))
        .expect("no notification within 30 s");
    assert!(
        has_line(&first, "READY=1"),
        "first notification: {}",
        text(&first)
    );
    assert!(has_line(&first, "STATUS=running"), "{}", text(&first));

    util::publish_all(broker, "sensors/m1/temperature", payloads(500)).await;
    // Pings every WATCHDOG_USEC / 4 = 100 ms while the data moves.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pings = 0;
    let mut statuses = Vec::new();
    while pings < 5 {
        assert!(
            Instant::now() < deadline,
            "only {pings} watchdog pings in 10 s"
        );
        let Some(d) = tokio::task::block_in_place(|| notify.recv(Duration::from_secs(1))) else {
            continue;
        };
        assert!(!has_line(&d, "READY=1"), "READY=1 sent twice");
        if has_line(&d, "WATCHDOG=1") {
            pings += 1;
            statuses.push(text(&d));
        }
    }
    assert!(
        statuses.iter().all(|s| s.contains("STATUS=running: ")),
        "{statuses:?}"
    );

    let stopped = tokio::task::block_in_place(|| agent.stop(Duration::from_secs(15)));
    assert_eq!(stopped.code, Some(0), "{:?}", stopped.lines);
    let after = notify.drain();
    assert!(
        after.iter().any(|d| has_line(d, "STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {:?}",
        after.iter().map(|d| text(d)).collect::<Vec<_>>()
    );
    assert!(
        stopped
            .lines
            .iter()
            .any(|l| l.contains("systemd watchdog enabled")),
        "{:?}",
        stopped.lines
    );
}

/// `WATCHDOG_PID` naming another process means the watchdog is not ours:
/// READY=1 and STOPPING=1, but no pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_for_another_pid_sends_no_pings() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), broker, "it-notify-pid", "text");
    let notify = Listener::bind(dir.path().join("notify.sock"));
    let mut cmd = Command::new(util::bin());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1");
    let agent = Agent::spawn(cmd);
    let subscribed = tokio::task::block_in_place(|| {
        agent.wait_for("ingest subscribed", Duration::from_secs(30))
    });
    assert!(subscribed, "agent never subscribed");
    // Long enough for several pings at 50 ms, had the watchdog been enabled.
    util::publish_all(broker, "sensors/m1/temperature", payloads(500)).await;
    let db = dir.path().join("buffer.db");
    let stats = util::wait_for_readings(&db, 500, Duration::from_secs(30)).await;
    assert_eq!(stats.readings, 500);
    let stopped = tokio::task::block_in_place(|| agent.stop(Duration::from_secs(15)));
    assert_eq!(stopped.code, Some(0), "{:?}", stopped.lines);
    let all = notify.drain();
    let texts: Vec<String> = all.iter().map(|d| text(d)).collect();
    assert!(
        all.first().is_some_and(|d| has_line(d, "READY=1")),
        "{texts:?}"
    );
    assert!(all.iter().any(|d| has_line(d, "STOPPING=1")), "{texts:?}");
    assert!(!all.iter().any(|d| has_line(d, "WATCHDOG=1")), "{texts:?}");
}

/// `[log] format = "json"`: every stderr line is one JSON object with the
/// event's fields at the top level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), broker, "it-json", "json");
    let agent = Agent::start(&cfg);
    let subscribed = tokio::task::block_in_place(|| {
        agent.wait_for("ingest subscribed", Duration::from_secs(30))
    });
    assert!(subscribed, "agent never subscribed");
    util::publish_all(broker, "sensors/m1/temperature", payloads(100)).await;
    let db = dir.path().join("buffer.db");
    assert_eq!(
        util::wait_for_readings(&db, 100, Duration::from_secs(30))
            .await
            .readings,
        100
    );
    let stopped = tokio::task::block_in_place(|| agent.stop(Duration::from_secs(15)));
    assert_eq!(stopped.code, Some(0));
    for line in &stopped.lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "message"] {
            assert!(v.get(key).is_some(), "{key} missing: {line}");
        }
    }
    let last = util::json_event(&stopped.lines, "agent stopped").expect("agent stopped line");
    assert_eq!(last["level"], "INFO");
    assert_eq!(last["committed"], 100, "{last}");
    assert_eq!(last["acked"], 100, "{last}");
}

/// Parses one datagram of the journal's native protocol
/// (systemd.io/JOURNAL_NATIVE_PROTOCOL): `KEY=value\n`, or `KEY\n` followed
/// by a 64-bit little-endian length, the value and `\n`.
fn journal_fields(mut d: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !d.is_empty() {
        let nl = d.iter().position(|&b| b == b'\n').unwrap_or(d.len());
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.insert(text(&line[..eq]), text(&line[eq + 1..]));
            d = &d[(nl + 1).min(d.len())..];
        } else {
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            out.insert(text(line), text(&rest[8..8 + len]));
            d = &rest[(8 + len + 1).min(rest.len())..];
        }
    }
    out
}

/// Whether this process may make a private mount namespace (root with
/// CAP_SYS_ADMIN and `unshare` from util-linux).
fn can_unshare_mounts() -> bool {
    Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `format = "auto"` under systemd (stderr is the stream `JOURNAL_STREAM`
/// names) logs to the journal socket with structured fields. The test's own
/// socket is bind-mounted over `/run/systemd` in a private mount namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_format_logs_structured_fields_to_the_journal() {
    if !can_unshare_mounts() {
        println!(
            "skipped: auto_format_logs_structured_fields_to_the_journal: cannot unshare a mount namespace here"
        );
        return;
    }
    if !Path::new("/run/systemd").is_dir() {
        println!(
            "skipped: auto_format_logs_structured_fields_to_the_journal: no /run/systemd to mount over"
        );
        return;
    }
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::MetadataExt;
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), broker, "it-journal", "auto");
    let run_systemd = dir.path().join("run-systemd");
    std::fs::create_dir_all(run_systemd.join("journal")).unwrap();
    let journal = Listener::bind(run_systemd.join("journal/socket"));

    let (reader, writer) = std::io::pipe().unwrap();
    let meta = std::fs::File::from(OwnedFd::from(writer.try_clone().unwrap()))
        .metadata()
        .unwrap();
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /run/systemd && exec "$2" run --config "$3""#)
        .arg("sh")
        .arg(&run_systemd)
        .arg(util::bin())
        .arg(&cfg)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .unwrap();
    // Only the child holds the write end now, so EOF follows its exit.
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let mut running = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while running.is_none() && Instant::now() < deadline {
        if let Some(d) = tokio::task::block_in_place(|| journal.recv(Duration::from_secs(1))) {
            let f = journal_fields(&d);
            if f.get("MESSAGE").is_some_and(|m| m == "agent running") {
                running = Some(f);
            }
        } else if let Ok(Some(status)) = child.try_wait() {
            let out: Vec<String> = lines.try_iter().collect();
            panic!("agent exited ({status}) before logging to the journal: {out:?}");
        }
    }
    let agent = Agent { child, lines };
    let stopped = tokio::task::block_in_place(|| agent.stop(Duration::from_secs(15)));
    let running = running.expect("no 'agent running' entry on the journal socket");
    assert_eq!(
        running.get("F_DEVICE").map(String::as_str),
        Some("edge-0001"),
        "{running:?}"
    );
    assert_eq!(
        running.get("PRIORITY").map(String::as_str),
        Some("5"),
        "{running:?}"
    );
    assert_eq!(
        running.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("edge-agent"),
        "{running:?}"
    );
    assert_eq!(stopped.code, Some(0), "{:?}", stopped.lines);
    assert!(
        !stopped.lines.iter().any(|l| l.contains("agent running")),
        "logged to stderr as well: {:?}",
        stopped.lines
    );
    let rest: Vec<_> = journal.drain().iter().map(|d| journal_fields(d)).collect();
    assert!(
        rest.iter()
            .any(|f| f.get("MESSAGE").is_some_and(|m| m == "agent stopped")
                && f.contains_key("F_ACKED")),
        "{rest:?}"
    );
}

/// `format = "journald"` with no journal to reach falls back to text on
/// stderr and says so, instead of going silent.
#[test]
fn journald_without_a_journal_falls_back_to_stderr() {
    if Path::new("/run/systemd/journal/socket").exists() {
        println!(
            "skipped: journald_without_a_journal_falls_back_to_stderr: this machine has a journal"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No broker is needed: the agent logs its start and keeps reconnecting.
    let cfg = write_config(
        dir.path(),
        "127.0.0.1:9".parse().unwrap(),
        "it-nojournal",
        "journald",
    );
    let agent = Agent::start(&cfg);
    assert!(
        agent.wait_for("journald socket unavailable", Duration::from_secs(30)),
        "no fallback warning"
    );
    assert!(agent.wait_for("agent running", Duration::from_secs(30)));
    let stopped = agent.stop(Duration::from_secs(15));
    assert_eq!(stopped.code, Some(0), "{:?}", stopped.lines);
}
