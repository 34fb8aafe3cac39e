//! The agent under test: the real `edge-agent` binary as a child process,
//! its generated config, its stderr, and its buffer read through
//! `edge_agent::buffer::Buffer` (never SQLite directly).
//!
//! The child is killed when [`AgentProcess`] is dropped, so an error in the
//! benchmark never leaves an agent running.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edge_agent::buffer::{Buffer, BufferStats, BufferThread};
use edge_agent::config::BufferSettings;
use toml::{Table, Value};

/// Log lines kept for error messages.
const TAIL_LINES: usize = 30;
/// Rows read per page when collecting latencies after the run.
const PAGE_ROWS: usize = 20_000;

/// What the generated config says, beyond the defaults.
pub struct AgentConfig<'a> {
    /// The agent's `state_dir`.
    pub state_dir: &'a Path,
    /// `mqtt://host:port`.
    pub broker_url: String,
    /// `mqtt.client_id`.
    pub client_id: String,
    /// Subscription filter, e.g. `bench-x/+/+`.
    pub filter: String,
    /// Template, e.g. `bench-x/{device}/{stream}`.
    pub template: String,
    /// Subscription QoS.
    pub qos: u8,
    /// `mqtt.max_unacked`.
    pub max_unacked: u32,
    /// Absolute path of the model package.
    pub model: &'a Path,
}

fn section<'t>(t: &'t mut Table, name: &str) -> Result<&'t mut Table> {
    t.get_mut(name)
        .and_then(Value::as_table_mut)
        .with_context(|| format!("default config has no [{name}] table"))
}

/// Writes `<state_dir>/agent.toml`: the agent's own
/// `print-default-config` output with the benchmark's changes.
///
/// # Errors
/// When the agent cannot print its config, or it does not parse.
pub fn write_config(agent_bin: &Path, c: &AgentConfig<'_>) -> Result<PathBuf> {
    let out = Command::new(agent_bin)
        .arg("print-default-config")
        .output()
        .with_context(|| format!("cannot run {} print-default-config", agent_bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} print-default-config: {}",
            agent_bin.display(),
            out.status
        );
    }
    let text = String::from_utf8(out.stdout).context("default config is not UTF-8")?;
    let mut t: Table = text.parse().context("default config does not parse")?;
    let path_str = |p: &Path| Value::String(p.display().to_string());

    let agent = section(&mut t, "agent")?;
    agent.insert("state_dir".into(), path_str(c.state_dir));
    agent.insert("device_id".into(), Value::String("ingest-bench".into()));

    let mqtt = section(&mut t, "mqtt")?;
    mqtt.insert("broker_url".into(), Value::String(c.broker_url.clone()));
    mqtt.insert("client_id".into(), Value::String(c.client_id.clone()));
    // A clean session leaves nothing behind in a shared broker.
    mqtt.insert("clean_session".into(), Value::Boolean(true));
    mqtt.insert(
        "max_unacked".into(),
        Value::Integer(i64::from(c.max_unacked)),
    );
    let mut sub = Table::new();
    sub.insert("topic".into(), Value::String(c.filter.clone()));
    sub.insert("qos".into(), Value::Integer(i64::from(c.qos)));
    sub.insert("template".into(), Value::String(c.template.clone()));
    sub.insert("idle_timeout_secs".into(), Value::Integer(0));
    mqtt.insert(
        "subscriptions".into(),
        Value::Array(vec![Value::Table(sub)]),
    );

    let inference = section(&mut t, "inference")?;
    inference.insert("models".into(), Value::Array(vec![path_str(c.model)]));

    let sync = section(&mut t, "sync")?;
    sync.insert("enabled".into(), Value::Boolean(false));

    let path = c.state_dir.join("agent.toml");
    let body = toml::to_string(&t).context("cannot serialize the config")?;
    std::fs::write(&path, body).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

enum LogEvent {
    Subscribed,
    ModelLoaded,
    ModelFailed,
}

/// A running `edge-agent run --config FILE`.
pub struct AgentProcess {
    child: Child,
    /// Process id.
    pub pid: u32,
    events: mpsc::Receiver<LogEvent>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Whether the "model loaded and verified" line was seen.
    pub model_loaded: Option<bool>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent with `RUST_LOG=filter`; its stderr is copied to
    /// `log` and watched.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn(agent_bin: &Path, config: &Path, log: &Path, filter: &str) -> Result<Self> {
        let mut child = Command::new(agent_bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", agent_bin.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().context("agent stderr not piped")?;
        let mut file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let (tx, events) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let tail_w = tail.clone();
        std::thread::Builder::new()
            .name("agent-stderr".into())
            .spawn(move || {
                for line in BufReader::new(stderr)
                    .lines()
                    .map_while(std::result::Result::ok)
                {
                    let _ = writeln!(file, "{line}");
                    let ev = if line.contains("ingest subscribed") {
                        Some(LogEvent::Subscribed)
                    } else if line.contains("model loaded and verified") {
                        Some(LogEvent::ModelLoaded)
                    } else if line.contains("model not loaded") {
                        Some(LogEvent::ModelFailed)
                    } else {
                        None
                    };
                    if let Some(ev) = ev {
                        let _ = tx.send(ev);
                    }
                    if let Ok(mut t) = tail_w.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            })
            .context("cannot spawn the stderr reader")?;
        Ok(Self {
            child,
            pid,
            events,
            tail,
            model_loaded: None,
            log: log.to_owned(),
        })
    }

    /// The last lines of its stderr.
    #[must_use]
    pub fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Waits for the "ingest subscribed" log line.
    ///
    /// # Errors
    /// When the agent exits first or `timeout` passes.
    pub async fn wait_subscribed(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(ev) = self.events.try_recv() {
                match ev {
                    LogEvent::Subscribed => return Ok(()),
                    LogEvent::ModelLoaded => self.model_loaded = Some(true),
                    LogEvent::ModelFailed => self.model_loaded = Some(false),
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "agent exited ({status}) before subscribing:\n{}",
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not log \"ingest subscribed\" within {} s:\n{}",
                    timeout.as_secs(),
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; kills it after.
    /// Returns how it ended.
    pub async fn terminate(&mut self, timeout: Duration) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return format!("killed: no exit within {} s of SIGTERM", timeout.as_secs());
                }
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A second handle on the agent's buffer database, through the agent's own
/// buffer code (its writer thread only answers queries here).
pub struct BufferReader {
    buffer: Buffer,
    thread: BufferThread,
}

impl BufferReader {
    /// Opens `path`; do it while the database is still small (before the
    /// workload), because opening runs `PRAGMA quick_check`.
    ///
    /// # Errors
    /// The buffer's open error.
    pub fn open(path: &Path) -> Result<Self> {
        let (buffer, thread) = Buffer::open(&BufferSettings::for_path(path))
            .with_context(|| format!("cannot open the agent's buffer {}", path.display()))?;
        Ok(Self { buffer, thread })
    }

    /// Row counts.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn stats(&self) -> Result<BufferStats> {
        self.buffer.stats().await.context("buffer stats failed")
    }

    /// Every stored reading's `recv_ts_ms - device_ts_ms`, and the first and
    /// last `recv_ts_ms`. Pages through the unsynced rows and marks each page
    /// synced to reach the next one, so call it only after the agent stopped.
    ///
    /// # Errors
    /// SQLite errors, or `timeout` passed.
    pub async fn latencies(&self, timeout: Duration) -> Result<Latencies> {
        let deadline = Instant::now() + timeout;
        let mut out = Latencies::default();
        loop {
            if Instant::now() > deadline {
                bail!("reading latencies took over {} s", timeout.as_secs());
            }
            let page = self
                .buffer
                .unsynced(PAGE_ROWS)
                .await
                .context("cannot read readings")?;
            if page.readings.is_empty() {
                break;
            }
            let mut ids = Vec::with_capacity(page.readings.len());
            for (id, r) in page.readings {
                ids.push(id);
                out.first_recv_ms = Some(
                    out.first_recv_ms
                        .map_or(r.recv_ts_ms, |f: i64| f.min(r.recv_ts_ms)),
                );
                out.last_recv_ms = Some(
                    out.last_recv_ms
                        .map_or(r.recv_ts_ms, |l: i64| l.max(r.recv_ts_ms)),
                );
                match r.device_ts_ms {
                    Some(ts) => out.ms.push(r.recv_ts_ms - ts),
                    None => out.without_ts += 1,
                }
            }
            let predictions = page.predictions.iter().map(|(id, _)| *id).collect();
            self.buffer
                .mark_synced(ids, predictions)
                .await
                .context("cannot page through readings")?;
        }
        Ok(out)
    }

    /// Closes the handle and waits for its writer thread.
    pub async fn close(self) {
        drop(self.buffer);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Publish-to-receive figures read back from the buffer.
#[derive(Debug, Default)]
pub struct Latencies {
    /// `recv_ts_ms - device_ts_ms` per reading.
    pub ms: Vec<i64>,
    /// Readings without a device timestamp (should be 0).
    pub without_ts: u64,
    /// Earliest receive time.
    pub first_recv_ms: Option<i64>,
    /// Latest receive time.
    pub last_recv_ms: Option<i64>,
}
