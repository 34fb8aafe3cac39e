//! The broker under the benchmark: an existing one (`--broker`), or an own
//! Mosquitto on a free loopback port whose limits do not drop messages.
//!
//! Design: Debian's Mosquitto 2.0 defaults (`max_queued_messages 1000`,
//! `max_inflight_messages 20`) drop QoS 0 and QoS 1 messages for any
//! subscriber that falls behind a fast publisher, so the ceiling would
//! measure the broker's drop policy. The own broker queues up to
//! [`OWN_MAX_QUEUED`] messages per client (far more than a run publishes)
//! and allows 1000 unacknowledged messages per client (the agent's
//! `max_unacked`). Not `max_queued_messages 0` ("unlimited"): in 2.0.11 a
//! QoS 1 subscriber whose in-flight window fills then stops receiving
//! queued messages (fixed in Mosquitto 2.0.17). The own broker is killed
//! when [`Broker`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// `max_queued_messages` of the own broker.
pub const OWN_MAX_QUEUED: u64 = 100_000_000;
/// `max_inflight_messages` of the own broker.
pub const OWN_MAX_INFLIGHT: u32 = 1000;

/// Where the benchmark's MQTT traffic goes.
pub struct Broker {
    /// Host to connect to.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// One line saying which broker this is and its limits.
    pub description: String,
    /// Its process, when known (for CPU figures).
    pub pid: Option<u32>,
    own: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

/// `mosquitto -h`'s version line, e.g. `mosquitto version 2.0.11`.
#[must_use]
pub fn mosquitto_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .find(|l| l.contains("version"))
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| format!("unknown ({} -h failed)", bin.display()))
}

impl Broker {
    /// Uses an existing broker at `addr` (`host:port`).
    ///
    /// # Errors
    /// When `addr` is not `host:port` or nothing listens there.
    pub fn existing(addr: &str, pid: Option<u32>, version_hint: &str) -> Result<Self> {
        let (host, port) = addr
            .rsplit_once(':')
            .with_context(|| format!("--broker {addr}: expected host:port"))?;
        let port: u16 = port
            .parse()
            .with_context(|| format!("--broker {addr}: bad port"))?;
        std::net::TcpStream::connect((host, port))
            .with_context(|| format!("no broker answers at {addr}"))?;
        Ok(Self {
            host: host.to_owned(),
            port,
            description: format!(
                "existing broker at {addr} (--broker; its limits are its own; local {version_hint})"
            ),
            pid,
            own: None,
            _dir: None,
        })
    }

    /// Starts an own Mosquitto on `127.0.0.1` and a free port.
    ///
    /// # Errors
    /// When it cannot be started or does not listen within 10 s.
    pub fn spawn_own(bin: &Path, version: &str) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::Builder::new()
            .prefix("ingest-bench-mosquitto-")
            .tempdir()
            .context("cannot create a temp dir for mosquitto")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free port")?
            .port();
        let mut conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages {OWN_MAX_QUEUED}\nmax_inflight_messages {OWN_MAX_INFLIGHT}\n\
             log_dest stdout\nlog_type error\nlog_type warning\nlog_type notice\n"
        );
        // As root, Mosquitto would switch to its own user otherwise.
        if dir.path().metadata().map(|m| m.uid() == 0).unwrap_or(false) {
            conf.push_str("user root\n");
        }
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, &conf)
            .with_context(|| format!("cannot write {}", conf_path.display()))?;
        let log_path: PathBuf = dir.path().join("mosquitto.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let err = log.try_clone().context("cannot clone the log handle")?;
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "mosquitto exited ({status}): {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mosquitto is not listening on port {port} after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            host: "127.0.0.1".into(),
            port,
            description: format!(
                "own {version} on 127.0.0.1:{port} started by ingest-bench \
                 (max_queued_messages {OWN_MAX_QUEUED}, max_inflight_messages {OWN_MAX_INFLIGHT}, \
                 persistence false)"
            ),
            pid: Some(child.id()),
            own: Some(child),
            _dir: Some(dir),
        })
    }

    /// `mqtt://host:port` for the agent's config.
    #[must_use]
    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.own {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
