//! The self-contained demo: an embedded broker, an in-process `cloud-sync`
//! and the real agent, fed by a simulated sensor replaying NAB's
//! machine-temperature series, ending with a report built from the agent's
//! buffer and the cloud's store (not from in-memory counters).
//!
//! Owns only orchestration and the report; every number it prints comes from
//! the stages doing their real jobs.

pub mod broker;
pub mod nab;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{Event, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError};
use crate::config::{ConfigError, DEFAULT_CONFIG, RawConfig};
use crate::supervisor::AgentError;
use crate::telemetry::Counters;

/// The shipped model package, embedded so the demo runs from any directory.
const MODEL_TOML: &str = include_str!("../../../models/nab-machine-temp/model.toml");
const MODEL_ONNX: &[u8] = include_bytes!("../../../models/nab-machine-temp/model.onnx");
/// Device id the demo agent uses towards the cloud.
pub const DEMO_DEVICE: &str = "demo-gateway";

/// Command-line options of `edge-agent demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Readings published per second (the series has 22,695 points; the
    /// default replays it in about 45 s).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Replay only the first N points of the series.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Simulated machines, each replaying the series on its own topic.
    #[arg(long, default_value_t = 1)]
    pub machines: usize,
    /// Use this broker (mqtt://host:port) instead of the embedded one.
    #[arg(long)]
    pub broker: Option<String>,
    /// Keep the databases here (default: a new temporary directory, kept).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Print no progress lines, only the report.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            rate: 500,
            limit: None,
            machines: 1,
            broker: None,
            state_dir: None,
            quiet: false,
        }
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A flag is out of range.
    #[error("invalid demo option: {0}")]
    Args(String),
    /// The embedded data did not parse.
    #[error("embedded NAB data")]
    Nab(#[from] nab::NabError),
    /// The embedded broker did not start.
    #[error("embedded broker")]
    Broker(#[from] broker::BrokerError),
    /// The cloud endpoint did not start.
    #[error("in-process cloud-sync")]
    Cloud(#[from] cloud_sync::ServeError),
    /// The cloud store failed.
    #[error("cloud store")]
    CloudStore(#[from] cloud_sync::StoreError),
    /// Files could not be written.
    #[error("cannot write {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The generated agent config was refused.
    #[error("agent config")]
    Config(#[from] ConfigError),
    /// The agent failed.
    #[error("agent")]
    Agent(#[source] Box<AgentError>),
    /// The buffer could not be read for the report.
    #[error("buffer")]
    Buffer(#[from] BufferError),
    /// The simulated sensor could not publish.
    #[error("sensor publisher: {0}")]
    Sensor(String),
    /// The data did not arrive in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The replay did not complete in time; the counts say where it stopped.
    #[error("{0}")]
    Stalled(String),
}

impl From<AgentError> for DemoError {
    fn from(e: AgentError) -> Self {
        Self::Agent(Box::new(e))
    }
}

/// How the flagged windows line up with one NAB labeled window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledWindow {
    /// Start, Unix seconds.
    pub start: i64,
    /// End, Unix seconds.
    pub end: i64,
    /// Anomalies flagged inside it.
    pub flagged: u64,
}

/// Everything the demo measured. Counts come from the agent's SQLite buffer
/// and the cloud's store after the agent stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoReport {
    /// Readings the simulated sensors published (and the broker acknowledged).
    pub published: u64,
    /// Readings in the agent's buffer.
    pub readings_stored: u64,
    /// Predictions in the agent's buffer.
    pub predictions: u64,
    /// Predictions expected from the window/hop arithmetic.
    pub predictions_expected: u64,
    /// Predictions flagged as anomalies.
    pub anomalies: u64,
    /// Anomalies whose window ends inside a labeled NAB window.
    pub anomalies_in_labeled: u64,
    /// Share of all predictions whose window ends inside a labeled window (base rate).
    pub labeled_share: f64,
    /// Per labeled window.
    pub windows: Vec<LabeledWindow>,
    /// Dead letters in the agent's buffer.
    pub dead_letters: u64,
    /// Readings not yet synced when the agent stopped.
    pub unsynced_readings: u64,
    /// Readings stored in the cloud for this device.
    pub cloud_readings: u64,
    /// Predictions stored in the cloud for this device.
    pub cloud_predictions: u64,
    /// Per-stream contiguous check: every stream in the cloud holds seq 1..=rows.
    pub cloud_contiguous: bool,
    /// Agent buffer database.
    pub agent_db: PathBuf,
    /// Cloud database.
    pub cloud_db: PathBuf,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl DemoReport {
    /// Labeled windows with at least one flag.
    #[must_use]
    pub fn windows_detected(&self) -> usize {
        self.windows.iter().filter(|w| w.flagged > 0).count()
    }
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                100.0 * a as f64 / b as f64
            }
        };
        writeln!(f, "\n=== edge-agent demo report ===")?;
        writeln!(f, "readings published by sensors : {}", self.published)?;
        writeln!(
            f,
            "readings committed on device  : {}  (dead letters: {})",
            self.readings_stored, self.dead_letters
        )?;
        writeln!(
            f,
            "predictions made              : {}  (expected from window/hop: {})",
            self.predictions, self.predictions_expected
        )?;
        writeln!(
            f,
            "anomalies flagged             : {}  ({:.2}% of predictions)",
            self.anomalies,
            pct(self.anomalies, self.predictions)
        )?;
        writeln!(
            f,
            "NAB labeled anomaly windows   : {} of {} contain at least one flag",
            self.windows_detected(),
            self.windows.len()
        )?;
        for w in &self.windows {
            writeln!(
                f,
                "  {} .. {} : {} flagged",
                fmt_ts(w.start),
                fmt_ts(w.end),
                w.flagged
            )?;
        }
        let inside = pct(self.anomalies_in_labeled, self.anomalies);
        let base = 100.0 * self.labeled_share;
        writeln!(
            f,
            "flags inside labeled windows  : {} of {} ({inside:.1}%), against {base:.1}% of all windows ({:.1}x lift)",
            self.anomalies_in_labeled,
            self.anomalies,
            if base > 0.0 { inside / base } else { 0.0 }
        )?;
        writeln!(
            f,
            "rows synced to the cloud      : {} readings, {} predictions (unsynced on device: {}; sequences contiguous: {})",
            self.cloud_readings,
            self.cloud_predictions,
            self.unsynced_readings,
            self.cloud_contiguous
        )?;
        writeln!(
            f,
            "agent buffer database         : {}",
            self.agent_db.display()
        )?;
        writeln!(
            f,
            "cloud database                : {}",
            self.cloud_db.display()
        )?;
        write!(
            f,
            "elapsed                       : {:.1} s",
            self.elapsed.as_secs_f64()
        )
    }
}

fn fmt_ts(ts: i64) -> String {
    let days = ts.div_euclid(86_400);
    let secs = ts.rem_euclid(86_400);
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), DemoError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DemoError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    std::fs::write(path, bytes).map_err(|source| DemoError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Runs the demo and prints progress and the report to stdout.
///
/// # Errors
/// [`DemoError`] when a component fails to start or data does not arrive
/// within a generous timeout.
pub async fn run(args: DemoArgs) -> Result<DemoReport, DemoError> {
    crate::telemetry::init("warn,rumqttd=off");
    crate::install_crypto_provider();
    let started = Instant::now();
    if args.rate == 0 || args.machines == 0 || args.machines > 1000 {
        return Err(DemoError::Args(
            "--rate must be at least 1 and --machines between 1 and 1000".into(),
        ));
    }
    let mut series = nab::series()?;
    if let Some(limit) = args.limit {
        series.truncate(limit);
    }
    let labeled = nab::labeled_windows()?;

    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => tempfile::Builder::new()
            .prefix("edge-agent-demo-")
            .tempdir()
            .map_err(|source| DemoError::Io {
                path: std::env::temp_dir(),
                source,
            })?
            .keep(),
    };
    let model_dir = state_dir.join("models/nab-machine-temp");
    write_file(&model_dir.join("model.toml"), MODEL_TOML.as_bytes())?;
    write_file(&model_dir.join("model.onnx"), MODEL_ONNX)?;

    let run_id = format!("{}-{}", std::process::id(), crate::now_ms());
    let (broker_url, prefix) = match &args.broker {
        Some(url) => (url.clone(), format!("demo-{run_id}/")),
        None => {
            let addr = broker::start_embedded_broker()?;
            (format!("mqtt://{addr}"), String::new())
        }
    };

    let cloud_db = state_dir.join("cloud.db");
    let cloud_stop = CancellationToken::new();
    let cloud = cloud_sync::start(
        cloud_sync::Settings::for_database(&cloud_db),
        cloud_stop.clone(),
    )
    .await?;
    let token = cloud.store().add_device(DEMO_DEVICE).await?;
    write_file(&state_dir.join("token"), token.as_bytes())?;

    let mut raw = RawConfig::parse(DEFAULT_CONFIG)?;
    raw.agent.device_id = DEMO_DEVICE.into();
    raw.agent.state_dir.clone_from(&state_dir);
    raw.mqtt.broker_url.clone_from(&broker_url);
    raw.mqtt.client_id = format!("edge-agent-demo-{run_id}");
    // A one-off client id on a shared broker must not leave a session behind.
    raw.mqtt.clean_session = args.broker.is_some();
    raw.mqtt.subscriptions[0].topic = format!("{prefix}sensors/+/+");
    raw.mqtt.subscriptions[0].template = format!("{prefix}sensors/{{device}}/{{stream}}");
    raw.inference.models = vec![model_dir.clone()];
    raw.publish.prediction_topic = format!("{prefix}predictions/{{device}}/{{model}}");
    raw.publish.alert_topic = format!("{prefix}alerts/{{device}}/{{model}}");
    raw.sync.url = format!("http://{}", cloud.addr);
    raw.sync.token_file = state_dir.join("token");
    raw.sync.interval_ms = 200;
    raw.shutdown.deadline_ms = 30_000;
    // A free port: several demos (and a real agent) may run side by side.
    raw.metrics.listen = "127.0.0.1:0".into();
    let settings = raw.validate()?;
    let agent_db = settings.buffer.path.clone();
    let (window, hop) = {
        let pkg = crate::inference::package::Package::read(&model_dir)
            .map_err(|e| DemoError::Sensor(format!("shipped model package: {e}")))?;
        (pkg.manifest.input.window, pkg.manifest.input.hop)
    };
    let per_machine = if series.len() >= window {
        (series.len() - window) / hop + 1
    } else {
        0
    };
    let predictions_expected = (per_machine * args.machines) as u64;

    if !args.quiet {
        println!(
            "edge-agent demo: replaying {} NAB machine-temperature readings x {} machine(s) at {} readings/s",
            series.len(),
            args.machines,
            args.rate
        );
        println!(
            "  broker {broker_url}, cloud http://{}, state {}",
            cloud.addr,
            state_dir.display()
        );
    }

    let counters = Arc::new(Counters::default());
    let agent_stop = CancellationToken::new();
    let agent = tokio::spawn(crate::supervisor::run(
        settings,
        counters.clone(),
        agent_stop.clone(),
    ));
    wait_for(
        || Counters::get(&counters.subscribed) > 0,
        Duration::from_secs(30),
        "the agent to subscribe",
    )
    .await?;

    let total = (series.len() * args.machines) as u64;
    let sensor = tokio::spawn(replay(
        broker_url.clone(),
        prefix.clone(),
        run_id.clone(),
        series.clone(),
        args.machines,
        args.rate,
        counters.clone(),
    ));
    let progress_every = Duration::from_secs(2);
    let mut next_progress = Instant::now() + progress_every;
    let publish_budget =
        Duration::from_secs_f64(total as f64 / f64::from(args.rate)) + Duration::from_secs(120);
    let deadline = Instant::now() + publish_budget;
    let mut published = None;
    let mut sensor = Some(sensor);
    loop {
        if let Some(handle) = sensor.as_ref().filter(|h| h.is_finished()) {
            let _ = handle;
            if let Some(h) = sensor.take() {
                published = Some(h.await.map_err(|e| DemoError::Sensor(e.to_string()))??);
            }
        }
        let c = &counters;
        let stored = handled(c);
        let done = published.is_some_and(|p| stored >= p)
            && Counters::get(&c.predictions) >= predictions_expected
            && Counters::get(&c.synced_readings) >= Counters::get(&c.committed)
            && Counters::get(&c.synced_predictions) >= Counters::get(&c.predictions);
        if !args.quiet && (Instant::now() >= next_progress || done) {
            next_progress += progress_every;
            println!(
                "[{:>5.1}s] received {:>6}/{total}  committed {:>6}  predictions {:>5}  anomalies {:>3}  synced {:>6} readings {:>5} predictions",
                started.elapsed().as_secs_f64(),
                Counters::get(&c.received),
                Counters::get(&c.committed),
                Counters::get(&c.predictions),
                Counters::get(&c.anomalies),
                Counters::get(&c.synced_readings),
                Counters::get(&c.synced_predictions),
            );
        }
        if done {
            break;
        }
        if Instant::now() > deadline {
            agent_stop.cancel();
            return Err(DemoError::Stalled(format!(
                "the replayed data was not committed, scored and synced in time: sensor {}, agent received {} and stored {stored}, predictions {} of {predictions_expected}, synced {} readings and {} predictions",
                published.map_or_else(
                    || "still publishing".to_owned(),
                    |p| format!("published {p}")
                ),
                Counters::get(&c.received),
                Counters::get(&c.predictions),
                Counters::get(&c.synced_readings),
                Counters::get(&c.synced_predictions),
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    agent_stop.cancel();
    agent.await.map_err(|_| AgentError::Join("supervisor"))??;

    // The agent has stopped: read the report from its buffer and the cloud store.
    let buffer_settings = crate::config::BufferSettings::for_path(&agent_db);
    let (buffer, thread) = Buffer::open(&buffer_settings)?;
    let stats = buffer.stats().await?;
    let anomalies = buffer.anomalies().await?;
    drop(buffer);
    thread.join();
    let summary = cloud.store().summary(DEMO_DEVICE).await?;
    cloud_stop.cancel();
    let _ = cloud.join().await;

    let inside = |ts: i64| labeled.iter().any(|(a, b)| (*a..=*b).contains(&ts));
    let ends: Vec<i64> = (0..per_machine)
        .map(|k| series[window - 1 + k * hop].ts)
        .collect();
    let labeled_share = if ends.is_empty() {
        0.0
    } else {
        ends.iter().filter(|t| inside(**t)).count() as f64 / ends.len() as f64
    };
    let anomaly_ts: Vec<i64> = anomalies
        .iter()
        .filter_map(|p| p.window_end_ts_ms.map(|ms| ms / 1000))
        .collect();
    let windows = labeled
        .iter()
        .map(|(a, b)| LabeledWindow {
            start: *a,
            end: *b,
            flagged: anomaly_ts.iter().filter(|t| (*a..=*b).contains(*t)).count() as u64,
        })
        .collect();
    let cloud_contiguous = summary
        .readings
        .iter()
        .chain(&summary.predictions)
        .all(|s| s.min_seq == 1 && s.max_seq == s.rows);
    let report = DemoReport {
        published: published.unwrap_or(0),
        readings_stored: stats.readings,
        predictions: stats.predictions,
        predictions_expected,
        anomalies: stats.anomalies,
        anomalies_in_labeled: anomaly_ts.iter().filter(|t| inside(**t)).count() as u64,
        labeled_share,
        windows,
        dead_letters: stats.dead_letters,
        unsynced_readings: stats.readings_unsynced,
        cloud_readings: summary.readings.iter().map(|s| s.rows).sum(),
        cloud_predictions: summary.predictions.iter().map(|s| s.rows).sum(),
        cloud_contiguous,
        agent_db,
        cloud_db,
        elapsed: started.elapsed(),
    };
    println!("{report}");
    Ok(report)
}

async fn wait_for(
    cond: impl Fn() -> bool,
    timeout: Duration,
    what: &'static str,
) -> Result<(), DemoError> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return Err(DemoError::Timeout(what));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Publishes the series for each machine at `rate` readings/s with QoS 1 and
/// returns how many the broker acknowledged (all of them, or an error).
/// How many published readings the demo sensor may be ahead of the agent's
/// commits: far below Mosquitto's default `max_queued_messages` (1000);
/// Debian's 2.0.11 was seen dropping with 500 ahead.
const MAX_AHEAD: u64 = 100;

/// Messages the agent has finished with: stored, recognised as duplicates or
/// dead-lettered.
fn handled(c: &Counters) -> u64 {
    Counters::get(&c.committed) + Counters::get(&c.duplicates) + Counters::get(&c.dead_letters)
}

async fn replay(
    broker_url: String,
    prefix: String,
    run_id: String,
    series: Vec<nab::Point>,
    machines: usize,
    rate: u32,
    agent: Arc<Counters>,
) -> Result<u64, DemoError> {
    let url = broker_url
        .strip_prefix("mqtt://")
        .ok_or_else(|| DemoError::Sensor(format!("{broker_url:?} is not mqtt://host:port")))?;
    let addr: SocketAddr = tokio::net::lookup_host(url)
        .await
        .map_err(|e| DemoError::Sensor(e.to_string()))?
        .next()
        .ok_or_else(|| DemoError::Sensor(format!("{url} does not resolve")))?;
    let mut opts = rumqttc::MqttOptions::new(
        format!("demo-sensor-{run_id}"),
        addr.ip().to_string(),
        addr.port(),
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(200);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
    let total = (series.len() * machines) as u64;
    let poller = tokio::spawn(async move {
        let mut acked = 0u64;
        let mut errors = 0u32;
        while acked < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(e) => {
                    errors += 1;
                    if errors > 50 {
                        return Err(DemoError::Sensor(format!("broker unreachable: {e}")));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(acked)
    });
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    for point in &series {
        for m in 1..=machines {
            // Design: a shared broker with Debian's defaults drops QoS 1
            // messages queued past 1000 for a slow subscriber, so the demo
            // never runs more than MAX_AHEAD readings ahead of the agent.
            while sent.saturating_sub(handled(&agent)) >= MAX_AHEAD {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let topic = format!("{prefix}sensors/machine-{m}/temperature");
            let payload = format!("{{\"ts\":{},\"value\":{}}}", point.ts, point.value);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| DemoError::Sensor(e.to_string()))?;
            sent += 1;
            let due = start + Duration::from_secs_f64(sent as f64 / f64::from(rate));
            if due > tokio::time::Instant::now() + Duration::from_millis(5) {
                tokio::time::sleep_until(due).await;
            }
        }
    }
    let acked = poller
        .await
        .map_err(|e| DemoError::Sensor(e.to_string()))??;
    let _ = client.disconnect().await;
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_dates_render() {
        assert_eq!(fmt_ts(1_386_656_700), "2013-12-10 06:25");
        assert_eq!(fmt_ts(0), "1970-01-01 00:00");
    }
}
