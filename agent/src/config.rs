//! Configuration: raw TOML as written by the operator, and the validated
//! [`Settings`] every stage is built from.
//!
//! Owns parsing and validation only; nothing here opens sockets or files other
//! than the config file and the token file it names. Validation reports every
//! problem at once, each naming its key, so one edit fixes a broken config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Smallest accepted `buffer.max_bytes`.
pub const MIN_BUFFER_BYTES: u64 = 1 << 20;

/// The commented example configuration printed by `print-default-config`.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse or has unknown or mistyped keys.
    #[error("invalid config: {0}")]
    Parse(#[from] toml::de::Error),
    /// One or more keys hold unusable values.
    #[error("invalid config: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// Result alias for this module.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[agent]`
    pub agent: RawAgent,
    /// `[mqtt]`
    pub mqtt: RawMqtt,
    /// `[buffer]`
    pub buffer: RawBuffer,
    /// `[inference]`
    pub inference: RawInference,
    /// `[publish]`
    pub publish: RawPublish,
    /// `[sync]`
    pub sync: RawSync,
    /// `[shutdown]`
    pub shutdown: RawShutdown,
    /// `[log]`; optional, the defaults apply when it is absent.
    #[serde(default)]
    pub log: RawLog,
    /// `[metrics]`; optional, the defaults apply when it is absent.
    #[serde(default)]
    pub metrics: RawMetrics,
    /// `[rollout]`; optional, the defaults apply when it is absent.
    #[serde(default)]
    pub rollout: RawRollout,
    /// `[drift]`; optional, the defaults apply when it is absent.
    #[serde(default)]
    pub drift: crate::drift::RawDrift,
}

/// `[rollout]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// Follow the registry.
    #[serde(default)]
    pub enabled: bool,
    /// Models to follow.
    #[serde(default)]
    pub models: Vec<String>,
    /// Device group asked for.
    #[serde(default = "default_group")]
    pub group: String,
    /// Registry poll period.
    #[serde(default = "default_poll_interval_secs")]
    pub poll_interval_secs: u64,
    /// Trusted ed25519 public keys, 64 hex digits each.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Largest artifact downloaded.
    #[serde(default = "default_max_artifact_bytes")]
    pub max_artifact_bytes: u64,
    /// Install older versions without the registry's `downgrade` flag.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Trial length; 0 disables trials.
    #[serde(default = "default_trial_secs")]
    pub trial_secs: u64,
    /// Windows a trial must see.
    #[serde(default = "default_trial_min_windows")]
    pub trial_min_windows: u64,
    /// Largest share of windows failing to score.
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    /// Largest share of non-finite outputs.
    #[serde(default)]
    pub max_nonfinite_rate: f64,
    /// p99 budget of one tract run.
    #[serde(default = "default_max_p99_latency_ms")]
    pub max_p99_latency_ms: u64,
    /// Largest share of windows flagged anomalous.
    #[serde(default = "default_max_anomaly_rate")]
    pub max_anomaly_rate: f64,
    /// Largest share of scores beyond the baseline's p99.
    #[serde(default = "default_max_over_p99_share")]
    pub max_over_p99_share: f64,
}

impl Default for RawRollout {
    fn default() -> Self {
        Self {
            enabled: false,
            models: Vec::new(),
            group: default_group(),
            poll_interval_secs: default_poll_interval_secs(),
            trusted_keys: Vec::new(),
            max_artifact_bytes: default_max_artifact_bytes(),
            allow_downgrade: false,
            trial_secs: default_trial_secs(),
            trial_min_windows: default_trial_min_windows(),
            max_error_rate: default_max_error_rate(),
            max_nonfinite_rate: 0.0,
            max_p99_latency_ms: default_max_p99_latency_ms(),
            max_anomaly_rate: default_max_anomaly_rate(),
            max_over_p99_share: default_max_over_p99_share(),
        }
    }
}

fn default_group() -> String {
    sync_protocol::registry::DEFAULT_GROUP.into()
}
fn default_poll_interval_secs() -> u64 {
    300
}
fn default_max_artifact_bytes() -> u64 {
    256 << 20
}
fn default_trial_secs() -> u64 {
    600
}
fn default_trial_min_windows() -> u64 {
    30
}
fn default_max_error_rate() -> f64 {
    0.01
}
fn default_max_p99_latency_ms() -> u64 {
    500
}
fn default_max_anomaly_rate() -> f64 {
    0.5
}
fn default_max_over_p99_share() -> f64 {
    0.25
}

/// `[agent]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Identity towards the cloud.
    pub device_id: String,
    /// Directory for state; relative paths resolve against it.
    pub state_dir: PathBuf,
}

/// `[mqtt]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    /// `mqtt://host:port`.
    pub broker_url: String,
    /// Stable client id.
    pub client_id: String,
    /// Whether the broker discards the session on disconnect.
    pub clean_session: bool,
    /// MQTT keep-alive.
    pub keep_alive_secs: u64,
    /// Bound on received-but-unacknowledged messages.
    pub max_unacked: usize,
    /// Payloads above this go to dead letters.
    pub max_payload_bytes: usize,
    /// First reconnect delay.
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay.
    pub reconnect_max_ms: u64,
    /// `"3.1.1"` or `"5"`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Username, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (first line); mutually exclusive with `password_env`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// PEM CA bundle for `mqtts://` (default: the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key for mutual TLS.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Subscriptions.
    pub subscriptions: Vec<RawSubscription>,
}

fn default_protocol() -> String {
    "3.1.1".into()
}

/// One `[[mqtt.subscriptions]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    /// MQTT filter.
    pub topic: String,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Topic template with `{device}` and `{stream}`.
    pub template: String,
    /// Reconnect when this subscription is quiet this long; 0 disables.
    #[serde(default)]
    pub idle_timeout_secs: u64,
}

/// `[buffer]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuffer {
    /// Database path.
    pub path: PathBuf,
    /// `normal` or `full`.
    pub synchronous: String,
    /// Group commit row bound.
    pub commit_max_rows: usize,
    /// Group commit delay bound.
    pub commit_max_delay_ms: u64,
    /// Quota for the database including its WAL.
    pub max_bytes: u64,
    /// Rows older than this are evicted; 0 disables.
    #[serde(default)]
    pub max_age_secs: u64,
    /// `drop_oldest` or `reject_new`, for streams without their own policy.
    pub full_policy: String,
    /// Per-stream overrides of `full_policy`.
    #[serde(default)]
    pub stream_policies: Vec<RawStreamPolicy>,
}

/// One `[[buffer.stream_policies]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStreamPolicy {
    /// Stream name (from the topic template's `{stream}`).
    pub stream: String,
    /// `drop_oldest` or `reject_new`.
    pub full_policy: String,
}

/// `[inference]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInference {
    /// Model package directories.
    pub models: Vec<PathBuf>,
    /// Channel capacity from ingest to inference.
    pub queue_capacity: usize,
    /// Longest a closed window waits for others to share its tract run.
    #[serde(default = "default_batch_max_wait_ms")]
    pub batch_max_wait_ms: u64,
    /// Hot-swap directory: `<name>/<version>/` packages, relative to state_dir.
    #[serde(default = "default_packages_dir")]
    pub packages_dir: PathBuf,
    /// How often the packages directory is scanned; 0 disables hot swap.
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// Wall-clock limit of a package verification (child process).
    #[serde(default = "default_verify_timeout_ms")]
    pub verify_timeout_ms: u64,
    /// Address-space limit of the verifying child process.
    #[serde(default = "default_verify_max_memory_bytes")]
    pub verify_max_memory_bytes: u64,
}

fn default_batch_max_wait_ms() -> u64 {
    20
}

fn default_packages_dir() -> PathBuf {
    PathBuf::from("packages")
}

fn default_watch_interval_ms() -> u64 {
    5_000
}

fn default_verify_timeout_ms() -> u64 {
    30_000
}

fn default_verify_max_memory_bytes() -> u64 {
    1 << 30
}

/// `[publish]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    /// Topic template for predictions.
    pub prediction_topic: String,
    /// Topic template for alerts.
    pub alert_topic: String,
    /// QoS for both.
    pub qos: u8,
}

/// `[sync]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    /// Whether to upload at all.
    pub enabled: bool,
    /// Base URL of cloud-sync.
    pub url: String,
    /// File holding the device token.
    pub token_file: PathBuf,
    /// Rows per upload.
    pub batch_max_rows: usize,
    /// Idle pause between uploads.
    pub interval_ms: u64,
    /// Per-request timeout.
    pub request_timeout_ms: u64,
    /// First retry delay.
    pub backoff_min_ms: u64,
    /// Largest retry delay.
    pub backoff_max_ms: u64,
    /// Largest upload body before compression (estimated JSON), bytes.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// A batch of live rows smaller than the limits waits at most this long
    /// (from its oldest row's receipt) for more rows.
    #[serde(default = "default_batch_max_delay_ms")]
    pub batch_max_delay_ms: u64,
    /// Rows per second the backlog (rows stored before the current
    /// connection came up) drains at; 0 = unlimited.
    #[serde(default = "default_backlog_rows_per_sec")]
    pub backlog_rows_per_sec: u64,
    /// Heartbeat period; 0 disables heartbeats.
    #[serde(default = "default_heartbeat_interval_secs")]
    pub heartbeat_interval_secs: u64,
    /// PEM CA bundle to trust instead of the system's roots (pinning); https only.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS; https only.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key for mutual TLS.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

fn default_batch_max_bytes() -> usize {
    1 << 20
}

fn default_batch_max_delay_ms() -> u64 {
    1000
}

fn default_backlog_rows_per_sec() -> u64 {
    20_000
}

fn default_heartbeat_interval_secs() -> u64 {
    60
}

/// `[shutdown]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    /// Drain deadline.
    pub deadline_ms: u64,
}

/// `[log]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// `"auto"`, `"text"`, `"json"` or `"journald"`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// tracing filter directives (`"info"`, `"warn,edge_agent::ingest=debug"`);
    /// `RUST_LOG` overrides them.
    #[serde(default = "default_log_filter")]
    pub filter: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            filter: default_log_filter(),
        }
    }
}

fn default_log_format() -> String {
    "auto".into()
}

fn default_log_filter() -> String {
    "info".into()
}

/// `[metrics]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Whether to serve the Prometheus endpoint.
    #[serde(default = "default_metrics_enabled")]
    pub enabled: bool,
    /// Socket address (`IP:port`) of the endpoint; port 0 picks a free port.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for RawMetrics {
    fn default() -> Self {
        Self {
            enabled: default_metrics_enabled(),
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_enabled() -> bool {
    true
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".into()
}

/// Validated settings for the whole agent.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Identity towards the cloud.
    pub device_id: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Ingest connection.
    pub mqtt: MqttSettings,
    /// Buffer database.
    pub buffer: BufferSettings,
    /// Inference.
    pub inference: InferenceSettings,
    /// Prediction publishing.
    pub publish: PublishSettings,
    /// Cloud sync; `None` when disabled.
    pub sync: Option<SyncSettings>,
    /// Drain deadline on shutdown.
    pub shutdown_deadline: Duration,
    /// Logging.
    pub log: LogSettings,
    /// Registry rollout; `None` when disabled.
    pub rollout: Option<crate::rollout::RolloutSettings>,
    /// Trials of swapped-in versions; `None` when disabled.
    pub trial: Option<crate::inference::trial::TrialSettings>,
    /// Drift monitoring; `None` when disabled.
    pub drift: Option<crate::drift::DriftSettings>,
    /// The Prometheus endpoint; `None` when disabled.
    pub metrics: Option<MetricsSettings>,
}

/// Validated `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Address the `/metrics` listener binds (port 0 allowed).
    pub listen: SocketAddr,
}

/// Validated MQTT settings (shared by ingest and the publisher).
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Protocol version.
    pub protocol: MqttProtocol,
    /// TLS, when the URL is `mqtts://`.
    pub tls: Option<MqttTls>,
    /// Username and password (never logged).
    pub credentials: Option<(String, Secret)>,
    /// Client id for the ingest connection (the publisher appends `-pub`).
    pub client_id: String,
    /// Whether to start a clean session.
    pub clean_session: bool,
    /// Keep-alive interval (at least 1 s).
    pub keep_alive: Duration,
    /// Bound on unacknowledged messages.
    pub max_unacked: usize,
    /// Payload size bound.
    pub max_payload_bytes: usize,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Subscriptions.
    pub subscriptions: Vec<Subscription>,
}

/// A validated subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// MQTT filter.
    pub filter: String,
    /// QoS level 0..=2.
    pub qos: u8,
    /// Topic template.
    pub template: crate::ingest::decode::TopicTemplate,
    /// Liveness: reconnect when nothing arrives on this filter for this long.
    pub idle_timeout: Option<Duration>,
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    V311,
    /// MQTT 5.
    V5,
}

/// TLS material for `mqtts://` brokers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MqttTls {
    /// PEM CA bundle; `None` uses the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

/// How hard SQLite syncs to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// WAL + `synchronous=NORMAL`: durable against process crashes; a power
    /// cut may lose the most recent transactions but never corrupts.
    Normal,
    /// WAL + `synchronous=FULL`: every commit is fsynced.
    Full,
}

/// What the buffer does with a stream's new rows when the quota is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Evict the oldest rows (synced ones first, then unsynced) to make room.
    DropOldest,
    /// Refuse new rows: ingest stops acknowledging, so the broker keeps the
    /// data and applies backpressure.
    RejectNew,
}

impl FullPolicy {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "drop_oldest" => Some(Self::DropOldest),
            "reject_new" => Some(Self::RejectNew),
            _ => None,
        }
    }
}

/// Validated buffer settings.
#[derive(Debug, Clone)]
pub struct BufferSettings {
    /// Database file.
    pub path: PathBuf,
    /// Sync mode.
    pub synchronous: Synchronous,
    /// Group commit row bound.
    pub commit_max_rows: usize,
    /// Group commit delay bound.
    pub commit_max_delay: Duration,
    /// Quota in bytes, database plus WAL.
    pub max_bytes: u64,
    /// Rows older than this (by receive time) are evicted.
    pub max_age: Option<Duration>,
    /// Policy for streams not listed in `stream_policies`.
    pub full_policy: FullPolicy,
    /// Per-stream policies.
    pub stream_policies: std::collections::BTreeMap<String, FullPolicy>,
}

impl BufferSettings {
    /// Defaults for a database at `path` (as in the default config): 1 GiB
    /// quota, `drop_oldest`, no max age, `synchronous = normal`.
    #[must_use]
    pub fn for_path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            synchronous: Synchronous::Normal,
            commit_max_rows: 512,
            commit_max_delay: Duration::from_millis(10),
            max_bytes: 1 << 30,
            max_age: None,
            full_policy: FullPolicy::DropOldest,
            stream_policies: std::collections::BTreeMap::new(),
        }
    }

    /// The policy in force for `stream`.
    #[must_use]
    pub fn policy_for(&self, stream: &str) -> FullPolicy {
        self.stream_policies
            .get(stream)
            .copied()
            .unwrap_or(self.full_policy)
    }
}

/// Validated inference settings.
#[derive(Debug, Clone)]
pub struct InferenceSettings {
    /// Model package directories.
    pub models: Vec<PathBuf>,
    /// Channel capacity from ingest.
    pub queue_capacity: usize,
    /// Longest a closed window waits for a batch.
    pub batch_max_wait: Duration,
    /// Hot-swap directory.
    pub packages_dir: PathBuf,
    /// Scan interval of `packages_dir`; `None` disables hot swap.
    pub watch_interval: Option<Duration>,
    /// Wall-clock limit of a package verification.
    pub verify_timeout: Duration,
    /// Address-space limit of the verifying child process.
    pub verify_max_memory_bytes: u64,
    /// Binary that verifies packages (`model check --json`); `None` is this
    /// process's own executable.
    pub checker: Option<PathBuf>,
}

/// Validated publish settings.
#[derive(Debug, Clone)]
pub struct PublishSettings {
    /// Prediction topic template.
    pub prediction_topic: String,
    /// Alert topic template.
    pub alert_topic: String,
    /// QoS.
    pub qos: u8,
}

/// Validated sync settings.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Base URL, without trailing slash.
    pub url: String,
    /// Device token (never logged).
    pub token: Secret,
    /// Rows per upload.
    pub batch_max_rows: usize,
    /// Idle pause.
    pub interval: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// First retry delay.
    pub backoff_min: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Largest estimated JSON body of one upload, bytes.
    pub batch_max_bytes: usize,
    /// How long a non-full batch of live rows waits for more.
    pub batch_max_delay: Duration,
    /// Backlog drain rate in rows per second; `None` = unlimited.
    pub backlog_rows_per_sec: Option<u64>,
    /// Heartbeat period; `None` = no heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// TLS trust and client identity for `https://` (same shape as MQTT's):
    /// `None` uses the system's roots and no client certificate.
    pub tls: Option<MqttTls>,
}

/// A secret string whose `Debug` does not reveal it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }
    /// The secret itself; do not log it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// The journal when stderr is connected to it (started by systemd),
    /// text otherwise.
    Auto,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// The systemd journal, each event field a journal field.
    Journald,
}

/// Validated `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// tracing filter directives (already checked to parse).
    pub filter: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl RawConfig {
    /// Parses TOML text.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] on syntax errors, unknown or mistyped keys.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Checks every key and builds [`Settings`]; reads `sync.token_file`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing every problem, each naming its key.
    pub fn validate(self) -> Result<Settings> {
        let mut errs = Vec::new();
        let a = &self.agent;
        if a.device_id.is_empty()
            || !a
                .device_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            errs.push(format!(
                "agent.device_id: {:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                a.device_id
            ));
        }
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                a.state_dir.join(p)
            }
        };

        let m = &self.mqtt;
        let (host, port, use_tls) = match parse_mqtt_url(&m.broker_url) {
            Ok(hp) => hp,
            Err(e) => {
                errs.push(format!("mqtt.broker_url: {e}"));
                (String::new(), 0, false)
            }
        };
        let protocol = match m.protocol.as_str() {
            "3.1.1" | "3" | "4" => MqttProtocol::V311,
            "5" | "5.0" => MqttProtocol::V5,
            other => {
                errs.push(format!(
                    "mqtt.protocol: {other:?} is not one of \"3.1.1\", \"5\""
                ));
                MqttProtocol::V311
            }
        };
        let file_check = |key: &str, p: &Option<PathBuf>, errs: &mut Vec<String>| {
            if let Some(p) = p {
                let p = resolve(p);
                if let Err(e) = std::fs::metadata(&p) {
                    errs.push(format!("{key}: cannot read {}: {e}", p.display()));
                }
            }
        };
        file_check("mqtt.ca_file", &m.ca_file, &mut errs);
        file_check("mqtt.client_cert_file", &m.client_cert_file, &mut errs);
        file_check("mqtt.client_key_file", &m.client_key_file, &mut errs);
        let client_auth = match (&m.client_cert_file, &m.client_key_file) {
            (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
            (None, None) => None,
            _ => {
                errs.push(
                    "mqtt.client_cert_file: client_cert_file and client_key_file go together"
                        .into(),
                );
                None
            }
        };
        let tls = if use_tls {
            Some(MqttTls {
                ca_file: m.ca_file.as_deref().map(resolve),
                client_auth,
            })
        } else {
            if m.ca_file.is_some() || client_auth.is_some() {
                errs.push("mqtt.broker_url: TLS files are set but the URL is not mqtts://".into());
            }
            None
        };
        let password = match (&m.password_file, &m.password_env) {
            (Some(_), Some(_)) => {
                errs.push("mqtt.password_file: set password_file or password_env, not both".into());
                None
            }
            (Some(f), None) => {
                let f = resolve(f);
                match std::fs::read_to_string(&f) {
                    Ok(t) => Some(t.lines().next().unwrap_or_default().to_owned()),
                    Err(e) => {
                        errs.push(format!(
                            "mqtt.password_file: cannot read {}: {e}",
                            f.display()
                        ));
                        None
                    }
                }
            }
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) => Some(v),
                Err(_) => {
                    errs.push(format!(
                        "mqtt.password_env: environment variable {var:?} is not set"
                    ));
                    None
                }
            },
            (None, None) => None,
        };
        let credentials = match (&m.username, password) {
            (Some(u), p) => Some((u.clone(), Secret(p.unwrap_or_default()))),
            (None, Some(_)) => {
                errs.push("mqtt.username: a password is configured without a username".into());
                None
            }
            (None, None) => None,
        };
        if m.client_id.is_empty() || m.client_id.len() > 200 {
            errs.push("mqtt.client_id: must be 1..=200 characters".into());
        }
        if !(1..=65_535).contains(&m.keep_alive_secs) {
            errs.push("mqtt.keep_alive_secs: must be between 1 and 65535".into());
        }
        if !(1..=65_535).contains(&m.max_unacked) {
            errs.push("mqtt.max_unacked: must be between 1 and 65535".into());
        }
        if !(16..=256 * 1024 * 1024).contains(&m.max_payload_bytes) {
            errs.push("mqtt.max_payload_bytes: must be between 16 and 268435456".into());
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            errs.push(
                "mqtt.reconnect_min_ms: must be at least 1 and not above mqtt.reconnect_max_ms"
                    .into(),
            );
        }
        if m.subscriptions.is_empty() {
            errs.push("mqtt.subscriptions: at least one subscription is required".into());
        }
        let mut subscriptions = Vec::new();
        for (i, s) in m.subscriptions.iter().enumerate() {
            if s.qos > 2 {
                errs.push(format!("mqtt.subscriptions[{i}].qos: must be 0, 1 or 2"));
            }
            if s.topic.is_empty() {
                errs.push(format!("mqtt.subscriptions[{i}].topic: must not be empty"));
            }
            match crate::ingest::decode::TopicTemplate::parse(&s.template) {
                Ok(template) => subscriptions.push(Subscription {
                    filter: s.topic.clone(),
                    qos: s.qos.min(2),
                    template,
                    idle_timeout: (s.idle_timeout_secs > 0)
                        .then(|| Duration::from_secs(s.idle_timeout_secs)),
                }),
                Err(e) => errs.push(format!("mqtt.subscriptions[{i}].template: {e}")),
            }
        }

        let b = &self.buffer;
        let synchronous = match b.synchronous.as_str() {
            "normal" => Synchronous::Normal,
            "full" => Synchronous::Full,
            other => {
                errs.push(format!(
                    "buffer.synchronous: {other:?} is not one of \"normal\", \"full\""
                ));
                Synchronous::Normal
            }
        };
        if !(1..=100_000).contains(&b.commit_max_rows) {
            errs.push("buffer.commit_max_rows: must be between 1 and 100000".into());
        }
        if b.commit_max_delay_ms > 10_000 {
            errs.push("buffer.commit_max_delay_ms: must be at most 10000".into());
        }
        if b.max_bytes < MIN_BUFFER_BYTES {
            errs.push(format!(
                "buffer.max_bytes: must be at least {MIN_BUFFER_BYTES} (1 MiB)"
            ));
        }
        let full_policy = FullPolicy::parse(&b.full_policy).unwrap_or_else(|| {
            errs.push(format!(
                "buffer.full_policy: {:?} is not one of \"drop_oldest\", \"reject_new\"",
                b.full_policy
            ));
            FullPolicy::DropOldest
        });
        let mut stream_policies = std::collections::BTreeMap::new();
        for (i, sp) in b.stream_policies.iter().enumerate() {
            match FullPolicy::parse(&sp.full_policy) {
                Some(p) => {
                    if stream_policies.insert(sp.stream.clone(), p).is_some() {
                        errs.push(format!(
                            "buffer.stream_policies[{i}].stream: {:?} is listed twice",
                            sp.stream
                        ));
                    }
                }
                None => errs.push(format!(
                    "buffer.stream_policies[{i}].full_policy: {:?} is not one of \"drop_oldest\", \"reject_new\"",
                    sp.full_policy
                )),
            }
        }

        let inf = &self.inference;
        if !(1..=1_000_000).contains(&inf.queue_capacity) {
            errs.push("inference.queue_capacity: must be between 1 and 1000000".into());
        }
        if inf.batch_max_wait_ms > 60_000 {
            errs.push("inference.batch_max_wait_ms: must be at most 60000".into());
        }
        if inf.watch_interval_ms > 0 && inf.watch_interval_ms < 100 {
            errs.push("inference.watch_interval_ms: must be 0 (off) or at least 100".into());
        }
        if !(100..=600_000).contains(&inf.verify_timeout_ms) {
            errs.push("inference.verify_timeout_ms: must be between 100 and 600000".into());
        }
        if inf.verify_max_memory_bytes < (64 << 20) {
            errs.push(
                "inference.verify_max_memory_bytes: must be at least 67108864 (64 MiB)".into(),
            );
        }

        let p = &self.publish;
        if p.qos > 2 {
            errs.push("publish.qos: must be 0, 1 or 2".into());
        }
        for (key, t) in [
            ("publish.prediction_topic", &p.prediction_topic),
            ("publish.alert_topic", &p.alert_topic),
        ] {
            if t.is_empty() || t.contains('+') || t.contains('#') {
                errs.push(format!(
                    "{key}: must be a non-empty topic without wildcards"
                ));
            }
        }

        let s = &self.sync;
        let sync = if s.enabled {
            if !(s.url.starts_with("http://") || s.url.starts_with("https://")) {
                errs.push(format!(
                    "sync.url: {:?} must start with http:// or https://",
                    s.url
                ));
            }
            if !(1..=100_000).contains(&s.batch_max_rows) {
                errs.push("sync.batch_max_rows: must be between 1 and 100000".into());
            }
            if s.request_timeout_ms == 0 {
                errs.push("sync.request_timeout_ms: must be at least 1".into());
            }
            if s.backoff_min_ms == 0 || s.backoff_min_ms > s.backoff_max_ms {
                errs.push(
                    "sync.backoff_min_ms: must be at least 1 and not above sync.backoff_max_ms"
                        .into(),
                );
            }
            if !(1024..=64 << 20).contains(&s.batch_max_bytes) {
                errs.push("sync.batch_max_bytes: must be between 1024 and 67108864".into());
            }
            if s.batch_max_delay_ms > 3_600_000 {
                errs.push("sync.batch_max_delay_ms: must be at most 3600000".into());
            }
            if s.heartbeat_interval_secs > 86_400 {
                errs.push("sync.heartbeat_interval_secs: must be at most 86400".into());
            }
            file_check("sync.ca_file", &s.ca_file, &mut errs);
            file_check("sync.client_cert_file", &s.client_cert_file, &mut errs);
            file_check("sync.client_key_file", &s.client_key_file, &mut errs);
            let sync_client_auth = match (&s.client_cert_file, &s.client_key_file) {
                (Some(c), Some(k)) => Some((resolve(c), resolve(k))),
                (None, None) => None,
                _ => {
                    errs.push(
                        "sync.client_cert_file: client_cert_file and client_key_file go together"
                            .into(),
                    );
                    None
                }
            };
            let sync_tls = (s.ca_file.is_some() || sync_client_auth.is_some()).then(|| MqttTls {
                ca_file: s.ca_file.as_deref().map(resolve),
                client_auth: sync_client_auth,
            });
            if sync_tls.is_some() && !s.url.starts_with("https://") {
                errs.push("sync.url: TLS files are set but the URL is not https://".into());
            }
            let token_path = resolve(&s.token_file);
            let token = match std::fs::read_to_string(&token_path) {
                Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
                Ok(_) => {
                    errs.push(format!(
                        "sync.token_file: {} is empty",
                        token_path.display()
                    ));
                    String::new()
                }
                Err(e) => {
                    errs.push(format!(
                        "sync.token_file: cannot read {}: {e}",
                        token_path.display()
                    ));
                    String::new()
                }
            };
            Some(SyncSettings {
                url: s.url.trim_end_matches('/').to_owned(),
                token: Secret(token),
                batch_max_rows: s.batch_max_rows,
                interval: Duration::from_millis(s.interval_ms),
                request_timeout: Duration::from_millis(s.request_timeout_ms),
                backoff_min: Duration::from_millis(s.backoff_min_ms),
                backoff_max: Duration::from_millis(s.backoff_max_ms),
                batch_max_bytes: s.batch_max_bytes,
                batch_max_delay: Duration::from_millis(s.batch_max_delay_ms),
                backlog_rows_per_sec: (s.backlog_rows_per_sec > 0)
                    .then_some(s.backlog_rows_per_sec),
                heartbeat_interval: (s.heartbeat_interval_secs > 0)
                    .then(|| Duration::from_secs(s.heartbeat_interval_secs)),
                tls: sync_tls,
            })
        } else {
            None
        };
        if self.shutdown.deadline_ms == 0 || self.shutdown.deadline_ms > 600_000 {
            errs.push("shutdown.deadline_ms: must be between 1 and 600000".into());
        }

        let log = validate_log(&self.log, &mut errs);
        let (rollout, trial) = validate_rollout(
            &self.rollout,
            sync.is_some(),
            self.inference.watch_interval_ms > 0,
            &a.state_dir,
            &mut errs,
        );
        let metrics = validate_metrics(&self.metrics, &mut errs);
        let drift = crate::drift::validate(&self.drift, &a.state_dir, &mut errs);

        if !errs.is_empty() {
            return Err(ConfigError::Invalid(errs));
        }
        Ok(Settings {
            device_id: a.device_id.clone(),
            state_dir: a.state_dir.clone(),
            mqtt: MqttSettings {
                host,
                port,
                protocol,
                tls,
                credentials,
                client_id: m.client_id.clone(),
                clean_session: m.clean_session,
                keep_alive: Duration::from_secs(m.keep_alive_secs),
                max_unacked: m.max_unacked,
                max_payload_bytes: m.max_payload_bytes,
                reconnect_min: Duration::from_millis(m.reconnect_min_ms),
                reconnect_max: Duration::from_millis(m.reconnect_max_ms),
                subscriptions,
            },
            buffer: BufferSettings {
                path: resolve(&b.path),
                synchronous,
                commit_max_rows: b.commit_max_rows,
                commit_max_delay: Duration::from_millis(b.commit_max_delay_ms),
                max_bytes: b.max_bytes,
                max_age: (b.max_age_secs > 0).then(|| Duration::from_secs(b.max_age_secs)),
                full_policy,
                stream_policies,
            },
            inference: InferenceSettings {
                models: inf.models.iter().map(|p| resolve(p)).collect(),
                queue_capacity: inf.queue_capacity,
                batch_max_wait: Duration::from_millis(inf.batch_max_wait_ms),
                packages_dir: resolve(&inf.packages_dir),
                watch_interval: (inf.watch_interval_ms > 0)
                    .then(|| Duration::from_millis(inf.watch_interval_ms)),
                verify_timeout: Duration::from_millis(inf.verify_timeout_ms),
                verify_max_memory_bytes: inf.verify_max_memory_bytes,
                checker: None,
            },
            publish: PublishSettings {
                prediction_topic: p.prediction_topic.clone(),
                alert_topic: p.alert_topic.clone(),
                qos: p.qos,
            },
            sync,
            shutdown_deadline: Duration::from_millis(self.shutdown.deadline_ms),
            log,
            rollout,
            trial,
            metrics,
            drift,
        })
    }
}

fn validate_rollout(
    r: &RawRollout,
    sync_enabled: bool,
    watching: bool,
    state_dir: &Path,
    errs: &mut Vec<String>,
) -> (
    Option<crate::rollout::RolloutSettings>,
    Option<crate::inference::trial::TrialSettings>,
) {
    for (key, v) in [
        ("rollout.max_error_rate", r.max_error_rate),
        ("rollout.max_nonfinite_rate", r.max_nonfinite_rate),
        ("rollout.max_anomaly_rate", r.max_anomaly_rate),
        ("rollout.max_over_p99_share", r.max_over_p99_share),
    ] {
        if !(0.0..=1.0).contains(&v) {
            errs.push(format!("{key}: must be between 0.0 and 1.0, got {v}"));
        }
    }
    if r.trial_secs > 30 * 86_400 {
        errs.push("rollout.trial_secs: must be at most 2592000 (30 days)".into());
    }
    if r.max_p99_latency_ms == 0 {
        errs.push("rollout.max_p99_latency_ms: must be at least 1".into());
    }
    let trial = (r.trial_secs > 0).then(|| crate::inference::trial::TrialSettings {
        duration: Duration::from_secs(r.trial_secs),
        min_windows: r.trial_min_windows,
        max_error_rate: r.max_error_rate,
        max_nonfinite_rate: r.max_nonfinite_rate,
        max_p99_latency: Duration::from_millis(r.max_p99_latency_ms),
        max_anomaly_rate: r.max_anomaly_rate,
        max_over_p99_share: r.max_over_p99_share,
    });
    if !r.enabled {
        return (None, trial);
    }
    if !sync_enabled {
        errs.push("rollout.enabled: needs [sync] enabled (the registry is cloud-sync's: same URL, token and TLS)".into());
    }
    if !watching {
        errs.push("rollout.enabled: needs inference.watch_interval_ms > 0 (installed versions are swapped in by the watcher)".into());
    }
    if r.models.is_empty() {
        errs.push("rollout.models: name at least one model to follow".into());
    }
    for m in &r.models {
        if m.is_empty()
            || m.len() > 128
            || !m
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            errs.push(format!(
                "rollout.models: {m:?} is not a model name ([A-Za-z0-9._-], 1-128)"
            ));
        }
    }
    if r.group.is_empty() || r.group.len() > 128 {
        errs.push("rollout.group: must be 1-128 characters".into());
    }
    if r.poll_interval_secs == 0 || r.poll_interval_secs > 86_400 {
        errs.push("rollout.poll_interval_secs: must be between 1 and 86400".into());
    }
    if r.max_artifact_bytes < 1024 {
        errs.push("rollout.max_artifact_bytes: must be at least 1024".into());
    }
    if r.trusted_keys.is_empty() {
        errs.push("rollout.trusted_keys: list at least one registry public key (`cloud-sync keys show-public`); unsigned models are never installed".into());
    }
    let mut trusted_keys = Vec::new();
    for (i, k) in r.trusted_keys.iter().enumerate() {
        match crate::rollout::TrustedKey::parse(k) {
            Ok(k) => trusted_keys.push(k),
            Err(e) => errs.push(format!("rollout.trusted_keys[{i}]: {e}")),
        }
    }
    let rollout_dir = state_dir.join("rollout");
    (
        Some(crate::rollout::RolloutSettings {
            models: r.models.clone(),
            group: r.group.clone(),
            poll_interval: Duration::from_secs(r.poll_interval_secs),
            trusted_keys,
            max_artifact_bytes: r.max_artifact_bytes,
            allow_downgrade: r.allow_downgrade,
            downloads_dir: rollout_dir.join("downloads"),
            reports_dir: rollout_dir.join("reports"),
            shadow_dir: rollout_dir.join("shadow"),
        }),
        trial,
    )
}

fn validate_log(l: &RawLog, errs: &mut Vec<String>) -> LogSettings {
    let format = match l.format.as_str() {
        "auto" => LogFormat::Auto,
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        "journald" => LogFormat::Journald,
        other => {
            errs.push(format!(
                "log.format: {other:?} is not one of \"auto\", \"text\", \"json\", \"journald\""
            ));
            LogFormat::Auto
        }
    };
    if let Err(e) = crate::telemetry::parse_filter(&l.filter) {
        errs.push(format!(
            "log.filter: {:?} is not a valid filter: {e}",
            l.filter
        ));
    }
    LogSettings {
        format,
        filter: l.filter.clone(),
    }
}

fn validate_metrics(m: &RawMetrics, errs: &mut Vec<String>) -> Option<MetricsSettings> {
    match m.listen.trim().parse::<SocketAddr>() {
        Ok(listen) => m.enabled.then_some(MetricsSettings { listen }),
        Err(_) => {
            errs.push(format!(
                "metrics.listen: {:?} is not a socket address like \"127.0.0.1:9464\"",
                m.listen
            ));
            None
        }
    }
}

/// Splits `mqtt://host:port` or `mqtts://host:port` (ports default to 1883
/// and 8883); the flag says whether TLS is on.
fn parse_mqtt_url(url: &str) -> std::result::Result<(String, u16, bool), String> {
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
    };
    let default_port = if tls { 8883 } else { 1883 };
    let rest = rest.trim_end_matches('/');
    if let Ok(addr) = rest.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port(), tls));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?} has an invalid port"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() || port == 0 {
        return Err(format!("{url:?} needs a host and a non-zero port"));
    }
    Ok((host.to_owned(), port, tls))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn with_token(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "abc\n").unwrap();
        let text = text
            .replace(
                "state_dir = \"/var/lib/edge-agent\"",
                &format!("state_dir = {:?}", dir.path()),
            )
            .replace("/etc/edge-agent/token", "token");
        (dir, text)
    }

    #[test]
    fn default_config_parses_and_validates() {
        let (_dir, text) = with_token(DEFAULT_CONFIG);
        let s = RawConfig::parse(&text).unwrap().validate().unwrap();
        assert_eq!(s.mqtt.port, 1883);
        assert_eq!(s.sync.unwrap().token.expose(), "abc");
        assert!(s.buffer.path.ends_with("buffer.db"));
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let text = DEFAULT_CONFIG.replace("[shutdown]", "[shutdown]\nbogus_ms = 3");
        let err = RawConfig::parse(&text).unwrap_err().to_string();
        assert!(err.contains("bogus_ms"), "{err}");
    }

    #[test]
    fn every_bad_key_is_reported_at_once() {
        let (_dir, text) = with_token(DEFAULT_CONFIG);
        let text = text
            .replace("keep_alive_secs = 30", "keep_alive_secs = 0")
            .replace("synchronous = \"normal\"", "synchronous = \"sometimes\"")
            .replace("qos = 1\n# Maps", "qos = 3\n# Maps")
            .replace(
                "template = \"sensors/{device}/{stream}\"",
                "template = \"x\"",
            );
        let err = RawConfig::parse(&text).unwrap().validate().unwrap_err();
        let msg = err.to_string();
        for key in [
            "mqtt.keep_alive_secs",
            "buffer.synchronous",
            "mqtt.subscriptions[0].qos",
            "mqtt.subscriptions[0].template",
        ] {
            assert!(msg.contains(key), "{key} missing from {msg}");
        }
    }

    #[test]
    fn rollout_keys_are_checked_and_trials_apply_without_the_registry() {
        let (_dir, text) = with_token(DEFAULT_CONFIG);
        let s = RawConfig::parse(&text).unwrap().validate().unwrap();
        assert!(s.rollout.is_none());
        let trial = s.trial.unwrap();
        assert_eq!(trial.duration, Duration::from_secs(600));
        assert_eq!(trial.max_p99_latency, Duration::from_millis(500));

        let enabled = text
            .replace("[rollout]\n# Follow", "[rollout]\nenabled = true\n# Follow")
            .replace("\nenabled = false\nmodels", "\nmodels");
        let err = RawConfig::parse(&enabled).unwrap().validate().unwrap_err();
        assert!(
            err.to_string()
                .contains("rollout.trusted_keys: list at least one"),
            "{err}"
        );

        let key = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let good = enabled.replace("trusted_keys = []", &format!("trusted_keys = [\"{key}\"]"));
        let s = RawConfig::parse(&good).unwrap().validate().unwrap();
        let r = s.rollout.unwrap();
        assert_eq!(r.trusted_keys.len(), 1);
        assert_eq!(r.trusted_keys[0].id.len(), 16);
        assert!(r.downloads_dir.ends_with("rollout/downloads"));

        let bad = enabled
            .replace("trusted_keys = []", "trusted_keys = [\"abcd\"]")
            .replace("max_anomaly_rate = 0.5", "max_anomaly_rate = 1.5")
            .replace("poll_interval_secs = 300", "poll_interval_secs = 0")
            .replace(
                "[sync]\n# Set to false to keep everything local.\nenabled = true",
                "[sync]\nenabled = false",
            );
        let msg = RawConfig::parse(&bad)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for key in [
            "rollout.trusted_keys[0]: must be 64 hex digits",
            "rollout.max_anomaly_rate",
            "rollout.poll_interval_secs",
            "rollout.enabled: needs [sync] enabled",
        ] {
            assert!(msg.contains(key), "{key} missing from {msg}");
        }

        let off = text.replace("trial_secs = 600", "trial_secs = 0");
        assert!(
            RawConfig::parse(&off)
                .unwrap()
                .validate()
                .unwrap()
                .trial
                .is_none()
        );
    }

    #[test]
    fn missing_token_file_names_the_key() {
        let text = DEFAULT_CONFIG.replace("/etc/edge-agent/token", "/nonexistent/token");
        let err = RawConfig::parse(&text).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("sync.token_file"), "{err}");
    }

    #[test]
    fn password_comes_from_file_or_env_never_the_config() {
        let (dir, text) = with_token(DEFAULT_CONFIG);
        std::fs::write(dir.path().join("pw"), "s3cret\nignored\n").unwrap();
        let from_file = text.replace(
            "# username = \"edge\"\n# password_file = \"/etc/edge-agent/mqtt-password\"",
            "username = \"edge\"\npassword_file = \"pw\"",
        );
        let s = RawConfig::parse(&from_file).unwrap().validate().unwrap();
        let (user, pass) = s.mqtt.credentials.clone().unwrap();
        assert_eq!((user.as_str(), pass.expose()), ("edge", "s3cret"));
        assert!(
            !format!("{s:?}").contains("s3cret"),
            "password leaked into Debug"
        );

        let var = format!("EDGE_TEST_PW_{}", std::process::id());
        let from_env = text.replace(
            "# username = \"edge\"",
            &format!("username = \"edge\"\npassword_env = \"{var}\""),
        );
        let err = RawConfig::parse(&from_env).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("mqtt.password_env"), "{err}");

        let both = from_file.replace(
            "password_file = \"pw\"",
            &format!("password_file = \"pw\"\npassword_env = \"{var}\""),
        );
        let err = RawConfig::parse(&both).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("mqtt.password_file"), "{err}");
    }

    #[test]
    fn several_subscriptions_and_tls_keys() {
        let (dir, text) = with_token(DEFAULT_CONFIG);
        let two = text.replace(
            "idle_timeout_secs = 0\n",
            "idle_timeout_secs = 0\n\n[[mqtt.subscriptions]]\ntopic = \"site/+/+/+\"\nqos = 2\ntemplate = \"site/{_}/{device}/{stream}\"\nidle_timeout_secs = 30\n",
        );
        let s = RawConfig::parse(&two).unwrap().validate().unwrap();
        assert_eq!(s.mqtt.subscriptions.len(), 2);
        assert_eq!(s.mqtt.subscriptions[1].qos, 2);
        assert_eq!(
            s.mqtt.subscriptions[1].idle_timeout,
            Some(Duration::from_secs(30))
        );
        assert!(s.mqtt.tls.is_none());

        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let tls = text
            .replace("mqtt://127.0.0.1:1883", "mqtts://broker.example")
            .replace(
                "# ca_file = \"/etc/edge-agent/ca.pem\"",
                "ca_file = \"ca.pem\"",
            )
            .replace(
                "# client_cert_file = \"/etc/edge-agent/client.pem\"",
                "client_cert_file = \"missing.pem\"",
            );
        let err = RawConfig::parse(&tls)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("mqtt.client_cert_file"), "{err}");
        let plain_with_ca = text.replace(
            "# ca_file = \"/etc/edge-agent/ca.pem\"",
            "ca_file = \"ca.pem\"",
        );
        let err = RawConfig::parse(&plain_with_ca)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("not mqtts://"), "{err}");
    }

    #[test]
    fn secret_is_not_debug_printed() {
        assert_eq!(
            format!("{:?}", Secret::new("hunter2".into())),
            "Secret(***)"
        );
    }

    #[test]
    fn log_section_is_optional_and_checked() {
        let (_dir, text) = with_token(DEFAULT_CONFIG);
        let s = RawConfig::parse(&text).unwrap().validate().unwrap();
        assert_eq!(s.log.format, LogFormat::Auto);
        assert_eq!(s.log.filter, "info");

        let start = text.find("[log]").expect("default config has [log]");
        let end = text[start..]
            .find("\n[")
            .map_or(text.len(), |i| start + i + 1);
        let without = format!("{}{}", &text[..start], &text[end..]);
        let s = RawConfig::parse(&without).unwrap().validate().unwrap();
        assert_eq!(
            s.log,
            LogSettings {
                format: LogFormat::Auto,
                filter: "info".into()
            }
        );

        let json = text.replace("format = \"auto\"", "format = \"json\"");
        let s = RawConfig::parse(&json).unwrap().validate().unwrap();
        assert_eq!(s.log.format, LogFormat::Json);

        let bad = text
            .replace("format = \"auto\"", "format = \"xml\"")
            .replace("filter = \"info\"", "filter = \"edge_agent=loud\"");
        let err = RawConfig::parse(&bad)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("log.format") && err.contains("log.filter"),
            "{err}"
        );

        let unknown = text.replace("[log]", "[log]\nlevel = \"info\"");
        let err = RawConfig::parse(&unknown).unwrap_err().to_string();
        assert!(err.contains("level"), "{err}");
    }

    #[test]
    fn metrics_section_is_optional_and_checked() {
        let (_dir, text) = with_token(DEFAULT_CONFIG);
        let s = RawConfig::parse(&text).unwrap().validate().unwrap();
        let listen: SocketAddr = "127.0.0.1:9464".parse().unwrap();
        assert_eq!(s.metrics, Some(MetricsSettings { listen }));

        let start = text
            .find("[metrics]")
            .expect("default config has [metrics]");
        let end = text[start..]
            .find("\n[")
            .map_or(text.len(), |i| start + i + 1);
        let without = format!("{}{}", &text[..start], &text[end..]);
        let s = RawConfig::parse(&without).unwrap().validate().unwrap();
        assert_eq!(s.metrics, Some(MetricsSettings { listen }));

        let section = &text[start..end];
        let off = section.replace("enabled = true", "enabled = false");
        let s = RawConfig::parse(&text.replace(section, &off))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(s.metrics, None);

        let bad = section.replace("127.0.0.1:9464", "localhost:http");
        let err = RawConfig::parse(&text.replace(section, &bad))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics.listen"), "{err}");

        let unknown = text.replace("[metrics]", "[metrics]\nport = 9464");
        let err = RawConfig::parse(&unknown).unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn sync_batching_pace_heartbeat_and_tls_keys() {
        let (dir, text) = with_token(DEFAULT_CONFIG);
        let s = RawConfig::parse(&text).unwrap().validate().unwrap();
        let sync = s.sync.unwrap();
        assert_eq!(sync.batch_max_bytes, 1 << 20);
        assert_eq!(sync.batch_max_delay, Duration::from_secs(1));
        assert_eq!(sync.backlog_rows_per_sec, Some(20_000));
        assert_eq!(sync.heartbeat_interval, Some(Duration::from_secs(60)));
        assert!(sync.tls.is_none());

        let off = text
            .replace("backlog_rows_per_sec = 20000", "backlog_rows_per_sec = 0")
            .replace(
                "heartbeat_interval_secs = 60",
                "heartbeat_interval_secs = 0",
            );
        let sync = RawConfig::parse(&off)
            .unwrap()
            .validate()
            .unwrap()
            .sync
            .unwrap();
        assert_eq!(
            (sync.backlog_rows_per_sec, sync.heartbeat_interval),
            (None, None)
        );

        let bad = text
            .replace("batch_max_bytes = 1048576", "batch_max_bytes = 10")
            .replace("batch_max_delay_ms = 1000", "batch_max_delay_ms = 99999999")
            .replace(
                "# ca_file = \"/etc/edge-agent/cloud-ca.pem\"",
                "ca_file = \"missing.pem\"",
            )
            .replace(
                "# client_key_file = \"/etc/edge-agent/cloud-client.key\"",
                "client_key_file = \"k.pem\"",
            );
        std::fs::write(dir.path().join("k.pem"), "x").unwrap();
        let err = RawConfig::parse(&bad)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for key in [
            "sync.batch_max_bytes",
            "sync.batch_max_delay_ms",
            "sync.ca_file",
            "sync.client_cert_file",
            "sync.url",
        ] {
            assert!(err.contains(key), "{key} missing from {err}");
        }

        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let tls = text
            .replace("http://127.0.0.1:8443", "https://cloud.example")
            .replace(
                "# ca_file = \"/etc/edge-agent/cloud-ca.pem\"",
                "ca_file = \"ca.pem\"",
            );
        let sync = RawConfig::parse(&tls)
            .unwrap()
            .validate()
            .unwrap()
            .sync
            .unwrap();
        let tls = sync.tls.unwrap();
        assert_eq!(tls.ca_file, Some(dir.path().join("ca.pem")));
        assert!(tls.client_auth.is_none());
    }

    #[test]
    fn mqtt_urls() {
        assert_eq!(
            parse_mqtt_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_mqtt_url("mqtt://broker.local").unwrap(),
            ("broker.local".into(), 1883, false)
        );
        assert_eq!(
            parse_mqtt_url("mqtts://broker.local").unwrap(),
            ("broker.local".into(), 8883, true)
        );
        assert!(parse_mqtt_url("http://x").is_err());
        assert!(parse_mqtt_url("mqtt://x:notaport").is_err());
    }
}
