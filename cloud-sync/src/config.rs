//! Configuration: the raw TOML shape ([`Config`]) and the validated, typed
//! [`Settings`] the rest of the crate runs on.
//!
//! Owns parsing and validation only; it opens no sockets and no database.
//! Invariant: a [`Settings`] value has passed [`Config::validate`] (or was
//! built by [`Settings::for_database`] from known-good defaults), so nothing
//! downstream re-checks ranges.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// The commented example configuration, printed by `print-default-config`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

/// Default for `listen_addr`.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:8443";
/// Default for `database_path`.
pub const DEFAULT_DATABASE_PATH: &str = "cloud-sync.db";
/// Default for `database_max_connections`.
pub const DEFAULT_DATABASE_MAX_CONNECTIONS: usize = 8;
/// Default for `max_body_bytes` (8 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
/// Default for `request_timeout_secs`.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;

/// Largest accepted `database_max_connections`.
pub const MAX_DATABASE_MAX_CONNECTIONS: u64 = 256;
/// Largest accepted `max_body_bytes` (1 GiB): one request body is held in memory.
pub const MAX_MAX_BODY_BYTES: u64 = 1024 * 1024 * 1024;
/// Largest accepted `request_timeout_secs` (1 hour).
pub const MAX_REQUEST_TIMEOUT_SECS: u64 = 3600;

/// Result alias for this module.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// File that was being read.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("invalid config{}", key.as_deref().map(|k| format!(" at key `{k}`")).unwrap_or_default())]
    Parse {
        /// Key the error points at, when it could be located.
        key: Option<String>,
        /// Underlying TOML error (with line and column).
        #[source]
        source: toml::de::Error,
    },
    /// The file parsed but some values are out of range; lists every problem.
    #[error("invalid config: {}", DisplayProblems(problems))]
    Invalid {
        /// Every problem found, in key order.
        problems: Vec<ConfigProblem>,
    },
}

/// One invalid value found by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The offending key.
    pub key: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

struct DisplayProblems<'a>(&'a [ConfigProblem]);

impl fmt::Display for DisplayProblems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Raw configuration file, as written by the operator.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Socket address the HTTP API listens on (`IP:port`; port 0 picks a free port).
    #[serde(default = "default_listen_addr")]
    pub listen_addr: String,
    /// Socket address of the Prometheus `/metrics` listener (plain HTTP,
    /// unauthenticated); unset, there is none.
    #[serde(default)]
    pub metrics_listen_addr: Option<String>,
    /// SQLite database file; created on first start. Ignored when
    /// `database_url` is set.
    #[serde(default = "default_database_path")]
    pub database_path: PathBuf,
    /// PostgreSQL connection URL (`postgres://user:password@host:5432/dbname`);
    /// when set, PostgreSQL is used instead of SQLite.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Most PostgreSQL connections one instance opens at once.
    #[serde(default = "default_database_max_connections")]
    pub database_max_connections: u64,
    /// Largest accepted request body in bytes, raw and (for zstd) decompressed.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Time allowed for one request, in seconds; also bounds shutdown draining.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// PEM certificate chain (leaf first); with `tls_key_file`, the API is
    /// served over HTTPS only.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificate(s); when set, devices may authenticate with a
    /// client certificate signed by one of them (subject CN = device id)
    /// instead of a bearer token. Requires `tls_cert_file`.
    #[serde(default)]
    pub tls_client_ca_file: Option<PathBuf>,
    /// The model registry (`docs/model-registry.md`).
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Fleet drift alerts (`docs/drift.md`).
    #[serde(default)]
    pub drift: crate::drift::DriftConfig,
    /// Retraining: packages, worker, schedule (`docs/retraining.md`).
    #[serde(default)]
    pub retrain: RetrainConfig,
    /// The dataset store (`docs/datasets.md`).
    #[serde(default)]
    pub datasets: DatasetsConfig,
}

/// Where dataset files live: `local` or `s3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetStoreKind {
    /// A local directory (`datasets.dir`).
    #[default]
    Local,
    /// An S3-compatible bucket (`datasets.bucket`, ...).
    S3,
}

/// `[datasets]`: the content-addressed dataset store.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsConfig {
    /// `local` (default) or `s3`.
    #[serde(default)]
    pub store: DatasetStoreKind,
    /// `local`: the directory (created if missing).
    #[serde(default = "default_datasets_dir")]
    pub dir: PathBuf,
    /// `s3`: bucket name.
    #[serde(default)]
    pub bucket: Option<String>,
    /// `s3`: region (default `us-east-1`, or `AWS_REGION`).
    #[serde(default)]
    pub region: Option<String>,
    /// `s3`: endpoint URL of an S3-compatible service (MinIO, Ceph, ...);
    /// unset for AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `s3`: key prefix inside the bucket.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `s3`: allow a plain `http://` endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// `s3`: TOML file with `access_key_id`, `secret_access_key` and an
    /// optional `session_token`; unset: the `AWS_*` environment variables.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

/// Default for `datasets.dir`.
pub const DEFAULT_DATASETS_DIR: &str = "datasets";

fn default_datasets_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATASETS_DIR)
}

impl Default for DatasetsConfig {
    fn default() -> Self {
        Self {
            store: DatasetStoreKind::Local,
            dir: default_datasets_dir(),
            bucket: None,
            region: None,
            endpoint: None,
            prefix: None,
            allow_http: false,
            credentials_file: None,
        }
    }
}

impl DatasetsConfig {
    /// Checks the keys of the chosen store; reports problems through `problem`.
    fn validate(&self, mut problem: impl FnMut(&'static str, String)) -> DatasetSettings {
        match self.store {
            DatasetStoreKind::Local => {
                if self.dir.as_os_str().is_empty() {
                    problem("datasets.dir", "must not be empty".to_owned());
                }
                for (key, set) in [
                    ("datasets.bucket", self.bucket.is_some()),
                    ("datasets.region", self.region.is_some()),
                    ("datasets.endpoint", self.endpoint.is_some()),
                    ("datasets.prefix", self.prefix.is_some()),
                    ("datasets.allow_http", self.allow_http),
                    ("datasets.credentials_file", self.credentials_file.is_some()),
                ] {
                    if set {
                        problem(key, "applies only with store = \"s3\"".to_owned());
                    }
                }
                DatasetSettings::Local {
                    dir: self.dir.clone(),
                }
            }
            DatasetStoreKind::S3 => {
                let bucket = self.bucket.clone().unwrap_or_default();
                if bucket.trim().is_empty() {
                    problem(
                        "datasets.bucket",
                        "must be set with store = \"s3\"".to_owned(),
                    );
                }
                if let Some(endpoint) = &self.endpoint
                    && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
                {
                    problem(
                        "datasets.endpoint",
                        format!("{endpoint:?} is not an http:// or https:// URL"),
                    );
                }
                if self
                    .endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://"))
                    && !self.allow_http
                {
                    problem(
                        "datasets.allow_http",
                        "must be true for an http:// endpoint".to_owned(),
                    );
                }
                DatasetSettings::S3(Box::new(S3Settings {
                    bucket,
                    region: self.region.clone(),
                    endpoint: self.endpoint.clone(),
                    prefix: self.prefix.clone().unwrap_or_default(),
                    allow_http: self.allow_http,
                    credentials_file: self.credentials_file.clone(),
                }))
            }
        }
    }
}

/// Validated `[datasets]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetSettings {
    /// Files in a local directory.
    Local {
        /// `datasets.dir`.
        dir: PathBuf,
    },
    /// Objects in an S3-compatible bucket.
    S3(Box<S3Settings>),
}

/// Validated S3 settings (no secrets: credentials are read when the store
/// is opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// `datasets.bucket`.
    pub bucket: String,
    /// `datasets.region`.
    pub region: Option<String>,
    /// `datasets.endpoint`.
    pub endpoint: Option<String>,
    /// `datasets.prefix` (empty: none).
    pub prefix: String,
    /// `datasets.allow_http`.
    pub allow_http: bool,
    /// `datasets.credentials_file`.
    pub credentials_file: Option<PathBuf>,
}

/// `[retrain]`: where retrained packages go, the worker and the schedule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainConfig {
    /// Directory retrained packages are written to, as `<name>/<version>/`.
    #[serde(default = "default_retrain_output_dir")]
    pub output_dir: PathBuf,
    /// Run the job worker in `serve` (enable it on one instance only when
    /// several share a PostgreSQL database).
    #[serde(default = "default_true")]
    pub worker: bool,
    /// Seconds between scheduled retrain jobs; 0 disables the schedule.
    #[serde(default)]
    pub schedule_secs: u64,
    /// The job the schedule enqueues (required when `schedule_secs > 0`).
    #[serde(default)]
    pub scheduled: Option<ScheduledJob>,
    /// On a fleet drift alert, snapshot the alerting model's data and
    /// enqueue one retrain job for it (`docs/retraining.md`).
    #[serde(default)]
    pub on_fleet_alert: bool,
    /// What a fleet alert snapshots and how its job trains.
    #[serde(default)]
    pub fleet_alert: FleetAlertJob,
}

/// `[retrain.fleet_alert]`: the snapshot and job a fleet alert triggers
/// (with `retrain.on_fleet_alert = true`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetAlertJob {
    /// How far before the alert the snapshot reaches, seconds (by the
    /// readings' receive time).
    #[serde(default = "default_lookback_secs")]
    pub lookback_secs: u64,
    /// Streams to snapshot (`NAME` or `SOURCE/NAME`); empty: the streams of
    /// the model's drift features.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Training config TOML; without `stream`, the model's drift feature is
    /// used when the summaries name exactly one.
    #[serde(default)]
    pub train_config: Option<PathBuf>,
    /// Device group to register for.
    #[serde(default = "default_group")]
    pub group: String,
    /// Register the verified package as staging.
    #[serde(default = "default_true")]
    pub register: bool,
}

fn default_lookback_secs() -> u64 {
    7 * 86_400
}

impl Default for FleetAlertJob {
    fn default() -> Self {
        Self {
            lookback_secs: default_lookback_secs(),
            streams: Vec::new(),
            train_config: None,
            group: default_group(),
            register: true,
        }
    }
}

/// `[retrain.scheduled]`: one job the schedule enqueues.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledJob {
    /// Model name.
    pub model: String,
    /// NAB-format CSV (`timestamp,value`) to train on.
    pub csv: PathBuf,
    /// Training config TOML (keys of the retrainer's training config).
    #[serde(default)]
    pub train_config: Option<PathBuf>,
    /// Device group to register for.
    #[serde(default = "default_group")]
    pub group: String,
    /// Register the verified package as staging.
    #[serde(default = "default_true")]
    pub register: bool,
}

/// Default for `retrain.output_dir`.
pub const DEFAULT_RETRAIN_OUTPUT_DIR: &str = "retrained";

fn default_retrain_output_dir() -> PathBuf {
    PathBuf::from(DEFAULT_RETRAIN_OUTPUT_DIR)
}

fn default_true() -> bool {
    true
}

fn default_group() -> String {
    sync_protocol::registry::DEFAULT_GROUP.to_owned()
}

impl Default for RetrainConfig {
    fn default() -> Self {
        Self {
            output_dir: default_retrain_output_dir(),
            worker: true,
            schedule_secs: 0,
            scheduled: None,
            on_fleet_alert: false,
            fleet_alert: FleetAlertJob::default(),
        }
    }
}

impl RetrainConfig {
    fn validate(&self, mut problem: impl FnMut(&'static str, String)) -> RetrainSettings {
        if self.output_dir.as_os_str().is_empty() {
            problem("retrain.output_dir", "must not be empty".to_owned());
        }
        if self.schedule_secs > 0 && self.scheduled.is_none() {
            problem(
                "retrain.scheduled",
                "is required when retrain.schedule_secs is above 0".to_owned(),
            );
        }
        if let Some(job) = &self.scheduled
            && !crate::store::is_valid_device_id(&job.model)
        {
            problem(
                "retrain.scheduled.model",
                "must be 1-128 characters from [A-Za-z0-9._-]".to_owned(),
            );
        }
        let alert = &self.fleet_alert;
        if alert.lookback_secs == 0 || alert.lookback_secs > 366 * 86_400 {
            problem(
                "retrain.fleet_alert.lookback_secs",
                format!(
                    "must be between 1 and 31622400, got {}",
                    alert.lookback_secs
                ),
            );
        }
        if !crate::registry::is_valid_group(&alert.group) {
            problem(
                "retrain.fleet_alert.group",
                "must be 1-128 characters from [A-Za-z0-9._-]".to_owned(),
            );
        }
        if alert.streams.iter().any(|s| s.is_empty()) {
            problem(
                "retrain.fleet_alert.streams",
                "must not contain an empty stream".to_owned(),
            );
        }
        RetrainSettings {
            output_dir: self.output_dir.clone(),
            worker: self.worker,
            schedule_secs: self.schedule_secs,
            scheduled: self.scheduled.clone(),
            on_fleet_alert: self.on_fleet_alert,
            fleet_alert: self.fleet_alert.clone(),
        }
    }
}

/// Validated `[retrain]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrainSettings {
    /// `retrain.output_dir`.
    pub output_dir: PathBuf,
    /// `retrain.worker`.
    pub worker: bool,
    /// `retrain.schedule_secs` (0: off).
    pub schedule_secs: u64,
    /// `retrain.scheduled`.
    pub scheduled: Option<ScheduledJob>,
    /// `retrain.on_fleet_alert`.
    pub on_fleet_alert: bool,
    /// `retrain.fleet_alert`.
    pub fleet_alert: FleetAlertJob,
}

impl RetrainSettings {
    /// Defaults with packages under `dir` (tests, demos).
    #[must_use]
    pub fn in_dir(dir: &Path) -> RetrainSettings {
        RetrainSettings {
            output_dir: dir.join(DEFAULT_RETRAIN_OUTPUT_DIR),
            worker: true,
            schedule_secs: 0,
            scheduled: None,
            on_fleet_alert: false,
            fleet_alert: FleetAlertJob::default(),
        }
    }
}

/// `[registry]`: where artifacts and signing keys live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Directory of the content-addressed artifacts (created if missing).
    #[serde(default = "default_artifact_dir")]
    pub artifact_dir: PathBuf,
    /// The registry's ed25519 private key (PKCS#8 PEM, mode 0600), made by
    /// `cloud-sync keys generate`.
    #[serde(default = "default_signing_key_file")]
    pub signing_key_file: PathBuf,
    /// Every public key the registry has signed with (current and retired).
    #[serde(default = "default_public_keys_file")]
    pub public_keys_file: PathBuf,
}

/// Default for `registry.artifact_dir`.
pub const DEFAULT_ARTIFACT_DIR: &str = "artifacts";
/// Default for `registry.signing_key_file`.
pub const DEFAULT_SIGNING_KEY_FILE: &str = "registry-signing-key.pem";
/// Default for `registry.public_keys_file`.
pub const DEFAULT_PUBLIC_KEYS_FILE: &str = "registry-public-keys.toml";

fn default_artifact_dir() -> PathBuf {
    PathBuf::from(DEFAULT_ARTIFACT_DIR)
}

fn default_signing_key_file() -> PathBuf {
    PathBuf::from(DEFAULT_SIGNING_KEY_FILE)
}

fn default_public_keys_file() -> PathBuf {
    PathBuf::from(DEFAULT_PUBLIC_KEYS_FILE)
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            artifact_dir: default_artifact_dir(),
            signing_key_file: default_signing_key_file(),
            public_keys_file: default_public_keys_file(),
        }
    }
}

impl RegistryConfig {
    /// Checks the paths; reports problems through `problem`.
    fn validate(&self, mut problem: impl FnMut(&'static str, String)) -> RegistrySettings {
        for (key, path) in [
            ("registry.artifact_dir", &self.artifact_dir),
            ("registry.signing_key_file", &self.signing_key_file),
            ("registry.public_keys_file", &self.public_keys_file),
        ] {
            if path.as_os_str().is_empty() {
                problem(key, "must not be empty".to_owned());
            }
        }
        if self.signing_key_file == self.public_keys_file {
            problem(
                "registry.public_keys_file",
                "must differ from registry.signing_key_file".to_owned(),
            );
        }
        RegistrySettings {
            artifact_dir: self.artifact_dir.clone(),
            signing_key_file: self.signing_key_file.clone(),
            public_keys_file: self.public_keys_file.clone(),
        }
    }
}

/// Validated `[registry]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySettings {
    /// `registry.artifact_dir`.
    pub artifact_dir: PathBuf,
    /// `registry.signing_key_file`.
    pub signing_key_file: PathBuf,
    /// `registry.public_keys_file`.
    pub public_keys_file: PathBuf,
}

impl RegistrySettings {
    /// The default file names inside `dir` (tests, demos).
    #[must_use]
    pub fn in_dir(dir: &Path) -> RegistrySettings {
        RegistrySettings {
            artifact_dir: dir.join(DEFAULT_ARTIFACT_DIR),
            signing_key_file: dir.join(DEFAULT_SIGNING_KEY_FILE),
            public_keys_file: dir.join(DEFAULT_PUBLIC_KEYS_FILE),
        }
    }
}

fn default_listen_addr() -> String {
    DEFAULT_LISTEN_ADDR.to_owned()
}

fn default_database_path() -> PathBuf {
    PathBuf::from(DEFAULT_DATABASE_PATH)
}

fn default_database_max_connections() -> u64 {
    DEFAULT_DATABASE_MAX_CONNECTIONS as u64
}

fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

fn default_request_timeout_secs() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_SECS
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: default_listen_addr(),
            metrics_listen_addr: None,
            database_path: default_database_path(),
            database_url: None,
            database_max_connections: default_database_max_connections(),
            max_body_bytes: default_max_body_bytes(),
            request_timeout_secs: default_request_timeout_secs(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            registry: RegistryConfig::default(),
            datasets: DatasetsConfig::default(),
            drift: crate::drift::DriftConfig::default(),
            retrain: RetrainConfig::default(),
        }
    }
}

impl Config {
    /// Parses a TOML document.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] on invalid TOML, an unknown key or a value of the
    /// wrong type; the error names the key when it can be located.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            key: key_at(text, source.span()),
            source,
        })
    }

    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read, otherwise as
    /// [`Config::from_toml_str`].
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Checks every value and builds [`Settings`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] listing every problem at once, each naming its key.
    pub fn validate(&self) -> Result<Settings> {
        let mut problems = Vec::new();
        let mut problem = |key: &'static str, message: String| {
            problems.push(ConfigProblem { key, message });
        };

        let listen_addr = match self.listen_addr.trim().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problem(
                    "listen_addr",
                    format!(
                        "{:?} is not a socket address like \"127.0.0.1:8443\"",
                        self.listen_addr
                    ),
                );
                None
            }
        };

        let metrics_listen_addr = self.metrics_listen_addr.as_deref().and_then(|text| {
            let parsed = text.trim().parse::<SocketAddr>().ok();
            if parsed.is_none() {
                problem(
                    "metrics_listen_addr",
                    format!("{text:?} is not a socket address like \"127.0.0.1:9465\""),
                );
            }
            parsed
        });

        if self.database_path.as_os_str().is_empty() {
            problem("database_path", "must not be empty".to_owned());
        }

        let postgres = match self.database_url.as_deref().map(parse_database_url) {
            None => None,
            Some(Ok(config)) => Some(config),
            Some(Err(message)) => {
                problem("database_url", message);
                None
            }
        };

        let max_connections =
            if (1..=MAX_DATABASE_MAX_CONNECTIONS).contains(&self.database_max_connections) {
                usize::try_from(self.database_max_connections).ok()
            } else {
                None
            };
        if max_connections.is_none() {
            problem(
                "database_max_connections",
                format!(
                    "{} is out of range 1..={MAX_DATABASE_MAX_CONNECTIONS}",
                    self.database_max_connections
                ),
            );
        }

        let max_body_bytes = if (1..=MAX_MAX_BODY_BYTES).contains(&self.max_body_bytes) {
            usize::try_from(self.max_body_bytes).ok()
        } else {
            None
        };
        if max_body_bytes.is_none() {
            problem(
                "max_body_bytes",
                format!(
                    "{} is out of range 1..={MAX_MAX_BODY_BYTES}",
                    self.max_body_bytes
                ),
            );
        }

        if !(1..=MAX_REQUEST_TIMEOUT_SECS).contains(&self.request_timeout_secs) {
            problem(
                "request_timeout_secs",
                format!(
                    "{} is out of range 1..={MAX_REQUEST_TIMEOUT_SECS}",
                    self.request_timeout_secs
                ),
            );
        }

        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => {
                if self.tls_client_ca_file.is_some() {
                    problem(
                        "tls_client_ca_file",
                        "requires tls_cert_file and tls_key_file (client certificates need HTTPS)"
                            .to_owned(),
                    );
                }
                None
            }
            (Some(_), None) => {
                problem(
                    "tls_key_file",
                    "must be set together with tls_cert_file".to_owned(),
                );
                None
            }
            (None, Some(_)) => {
                problem(
                    "tls_cert_file",
                    "must be set together with tls_key_file".to_owned(),
                );
                None
            }
            (Some(cert_file), Some(key_file)) => {
                let client_ca_file = self.tls_client_ca_file.as_deref();
                match crate::tls::server_config(cert_file, key_file, client_ca_file) {
                    Ok(config) => Some(TlsSettings {
                        cert_file: cert_file.clone(),
                        key_file: key_file.clone(),
                        client_ca_file: client_ca_file.map(Path::to_owned),
                        server_config: ServerConfigHandle(config),
                    }),
                    Err(err) => {
                        problem(err.key(), format!("{:#}", anyhow::Error::from(err)));
                        None
                    }
                }
            }
        };

        let registry = self.registry.validate(&mut problem);
        let datasets = self.datasets.validate(&mut problem);
        let drift = self.drift.validate(&mut problem);
        let retrain = self.retrain.validate(&mut problem);

        match (listen_addr, max_connections, max_body_bytes) {
            (Some(listen_addr), Some(max_connections), Some(max_body_bytes))
                if problems.is_empty() =>
            {
                let storage = match postgres {
                    Some(config) => StorageSettings::Postgres(Box::new(PostgresSettings {
                        config,
                        max_connections,
                    })),
                    None => StorageSettings::Sqlite {
                        path: self.database_path.clone(),
                    },
                };
                Ok(Settings {
                    listen_addr,
                    metrics_listen_addr,
                    storage,
                    max_body_bytes,
                    request_timeout: Duration::from_secs(self.request_timeout_secs),
                    tls,
                    registry,
                    datasets,
                    drift,
                    retrain,
                })
            }
            _ => Err(ConfigError::Invalid { problems }),
        }
    }
}

/// Parses `database_url`; the error message never repeats the URL (it may
/// hold a password).
fn parse_database_url(url: &str) -> std::result::Result<tokio_postgres::Config, String> {
    let config: tokio_postgres::Config = url
        .trim()
        .parse()
        .map_err(|err| format!("is not a PostgreSQL connection URL: {err}"))?;
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        return Err("names no host, as in \"postgres://user@host:5432/dbname\"".to_owned());
    }
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(
            "sslmode=require is not supported: cloud-sync connects to PostgreSQL without TLS"
                .to_owned(),
        );
    }
    Ok(config)
}

/// Best effort: the key on the line a TOML error points at (`key = value`).
fn key_at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let start = span?.start;
    let line_start = text.get(..start)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    bare.then(|| key.to_owned())
}

/// Validated settings the server runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Address to bind (port 0 allowed).
    pub listen_addr: SocketAddr,
    /// Address of the `/metrics` listener (port 0 allowed); `None`: no listener.
    pub metrics_listen_addr: Option<SocketAddr>,
    /// The database to store into.
    pub storage: StorageSettings,
    /// Cap on the raw and the decompressed request body, in bytes.
    pub max_body_bytes: usize,
    /// Time allowed for one request.
    pub request_timeout: Duration,
    /// HTTPS, when `tls_cert_file` and `tls_key_file` are set.
    pub tls: Option<TlsSettings>,
    /// The model registry's files.
    pub registry: RegistrySettings,
    /// The dataset store.
    pub datasets: DatasetSettings,
    /// Fleet drift alerts.
    pub drift: crate::drift::DriftSettings,
    /// Retraining.
    pub retrain: RetrainSettings,
}

/// HTTPS settings, loaded and checked by [`Config::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `tls_cert_file`.
    pub cert_file: PathBuf,
    /// `tls_key_file`.
    pub key_file: PathBuf,
    /// `tls_client_ca_file`: client certificates are accepted when set.
    pub client_ca_file: Option<PathBuf>,
    /// The rustls configuration built from those files.
    pub server_config: ServerConfigHandle,
}

/// A shared rustls server configuration; equal only to itself (clones of
/// the same handle).
#[derive(Clone)]
pub struct ServerConfigHandle(pub Arc<rustls::ServerConfig>);

impl PartialEq for ServerConfigHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ServerConfigHandle {}

impl fmt::Debug for ServerConfigHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfigHandle")
            .field("alpn_protocols", &self.0.alpn_protocols)
            .finish_non_exhaustive()
    }
}

/// Which database the server stores into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageSettings {
    /// A SQLite file (`database_path`), used by one process at a time.
    Sqlite {
        /// Database file; created on first start.
        path: PathBuf,
    },
    /// A PostgreSQL database (`database_url`), which several cloud-sync
    /// instances may share.
    Postgres(Box<PostgresSettings>),
}

impl fmt::Display for StorageSettings {
    /// Where the data goes, for logs: never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageSettings::Sqlite { path } => write!(f, "sqlite {}", path.display()),
            StorageSettings::Postgres(settings) => {
                let config = &settings.config;
                f.write_str("postgresql ")?;
                if let Some(user) = config.get_user() {
                    write!(f, "{user}@")?;
                }
                let ports = config.get_ports();
                let hosts = config.get_hosts().iter().map(|host| match host {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                });
                let addrs = config.get_hostaddrs().iter().map(ToString::to_string);
                for (i, host) in hosts.chain(addrs).enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    f.write_str(&host)?;
                    if let Some(port) = ports.get(i).or(ports.first()) {
                        write!(f, ":{port}")?;
                    }
                }
                write!(f, "/{}", config.get_dbname().unwrap_or_default())
            }
        }
    }
}

/// How to reach PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// Parsed `database_url`. Its `Debug` output hides the password.
    pub config: tokio_postgres::Config,
    /// Most connections open at once (`database_max_connections`).
    pub max_connections: usize,
}

impl PostgresSettings {
    /// Settings for a `postgres://` URL or `key=value` connection string,
    /// with the default `database_max_connections`.
    ///
    /// # Errors
    /// The connection string does not parse.
    pub fn from_url(url: &str) -> std::result::Result<PostgresSettings, tokio_postgres::Error> {
        Ok(PostgresSettings {
            config: url.parse()?,
            max_connections: DEFAULT_DATABASE_MAX_CONNECTIONS,
        })
    }
}

impl Settings {
    /// Default settings for `path`, listening on `127.0.0.1:0` (tests, demos).
    #[must_use]
    pub fn for_database(path: impl Into<PathBuf>) -> Settings {
        let path = path.into();
        let dir = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Settings {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen_addr: None,
            registry: RegistrySettings::in_dir(dir),
            datasets: DatasetSettings::Local {
                dir: dir.join(DEFAULT_DATASETS_DIR),
            },
            drift: crate::drift::DriftSettings::default(),
            retrain: RetrainSettings::in_dir(dir),
            storage: StorageSettings::Sqlite { path },
            max_body_bytes: usize::try_from(DEFAULT_MAX_BODY_BYTES).unwrap_or(usize::MAX),
            request_timeout: Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS),
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_and_matches_defaults() -> anyhow::Result<()> {
        let config = Config::from_toml_str(DEFAULT_CONFIG_TOML)?;
        assert_eq!(config, Config::default());
        let settings = config.validate()?;
        assert_eq!(settings.listen_addr.to_string(), DEFAULT_LISTEN_ADDR);
        assert_eq!(settings.max_body_bytes, 8 * 1024 * 1024);
        assert_eq!(settings.request_timeout, Duration::from_secs(30));
        assert_eq!(
            settings.storage,
            StorageSettings::Sqlite {
                path: PathBuf::from(DEFAULT_DATABASE_PATH)
            }
        );
        Ok(())
    }

    #[test]
    fn database_url_selects_postgres() -> anyhow::Result<()> {
        let config = Config::from_toml_str(
            "database_path = \"ignored.db\"\n\
             database_url = \"postgres://sync:s3cret@db.example:6432/cloud\"\n\
             database_max_connections = 3\n",
        )?;
        let settings = config.validate()?;
        let StorageSettings::Postgres(pg) = &settings.storage else {
            panic!("expected postgres, got {:?}", settings.storage);
        };
        assert_eq!(pg.max_connections, 3);
        assert_eq!(pg.config.get_user(), Some("sync"));
        assert_eq!(pg.config.get_dbname(), Some("cloud"));
        assert_eq!(pg.config.get_ports(), [6432]);
        let shown = format!("{} {:?}", settings.storage, settings);
        assert!(
            shown.starts_with("postgresql sync@db.example:6432/cloud "),
            "{shown}"
        );
        assert!(!shown.contains("s3cret"), "{shown}");

        // The schema option the default config documents.
        let config = Config {
            database_url: Some("postgres://u@h/db?options=-c%20search_path%3Dsync".into()),
            ..Config::default()
        };
        let StorageSettings::Postgres(pg) = config.validate()?.storage else {
            panic!("expected postgres");
        };
        assert_eq!(pg.config.get_options(), Some("-c search_path=sync"));
        Ok(())
    }

    #[test]
    fn bad_database_urls_are_named_without_the_password() {
        for url in [
            "postgres://u:s3cret@h:notaport/db",
            "postgres://u:s3cret@/db",
            "postgres://u:s3cret@h/db?sslmode=require",
            "not a url at all s3cret",
        ] {
            let config = Config {
                database_url: Some(url.to_owned()),
                ..Config::default()
            };
            let Err(ConfigError::Invalid { problems }) = config.validate() else {
                panic!("{url}: expected invalid config");
            };
            assert_eq!(problems.len(), 1, "{url}: {problems:?}");
            assert_eq!(problems[0].key, "database_url");
            assert!(!problems[0].message.contains("s3cret"), "{problems:?}");
        }
    }

    #[test]
    fn empty_file_uses_defaults() -> anyhow::Result<()> {
        assert_eq!(Config::from_toml_str("")?, Config::default());
        Ok(())
    }

    #[test]
    fn unknown_key_is_rejected_and_named() {
        let err = Config::from_toml_str("listen_addr = \"127.0.0.1:1\"\nmax_body = 5\n");
        match err {
            Err(ConfigError::Parse { key, .. }) => assert_eq!(key.as_deref(), Some("max_body")),
            other => panic!("expected parse error, got {other:?}"),
        }
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::from_toml_str("max_body_bytes = \"big\"\n");
        match err {
            Err(ConfigError::Parse { key, .. }) => {
                assert_eq!(key.as_deref(), Some("max_body_bytes"));
            }
            other => panic!("expected parse error, got {other:?}"),
        }
    }

    #[test]
    fn validate_reports_every_problem() {
        let config = Config {
            listen_addr: "localhost".into(),
            metrics_listen_addr: Some("9465".into()),
            database_path: PathBuf::new(),
            database_url: Some("postgres://u@h:notaport/db".into()),
            database_max_connections: 0,
            max_body_bytes: 0,
            request_timeout_secs: 0,
            tls_cert_file: Some("cert.pem".into()),
            tls_key_file: None,
            tls_client_ca_file: None,
            registry: RegistryConfig::default(),
            datasets: DatasetsConfig::default(),
            drift: crate::drift::DriftConfig::default(),
            retrain: RetrainConfig::default(),
        };
        let Err(ConfigError::Invalid { problems }) = config.validate() else {
            panic!("expected invalid config");
        };
        let keys: Vec<_> = problems.iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "listen_addr",
                "metrics_listen_addr",
                "database_path",
                "database_url",
                "database_max_connections",
                "max_body_bytes",
                "request_timeout_secs",
                "tls_key_file"
            ]
        );
        let text = ConfigError::Invalid { problems }.to_string();
        assert!(text.contains("key `request_timeout_secs`"), "{text}");
    }

    #[test]
    fn datasets_store_keys_are_checked_and_named() -> anyhow::Result<()> {
        let settings = Config::from_toml_str(
            "[datasets]\nstore = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\n\
             allow_http = true\nprefix = \"ds\"\n",
        )?
        .validate()?;
        let DatasetSettings::S3(s3) = settings.datasets else {
            panic!("expected s3");
        };
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str()), ("b", "ds"));
        for (text, key) in [
            ("[datasets]\nstore = \"s3\"\n", "datasets.bucket"),
            ("[datasets]\nbucket = \"b\"\n", "datasets.bucket"),
            (
                "[datasets]\nstore = \"s3\"\nbucket = \"b\"\nendpoint = \"http://h\"\n",
                "datasets.allow_http",
            ),
        ] {
            let Err(ConfigError::Invalid { problems }) = Config::from_toml_str(text)?.validate()
            else {
                panic!("{text}: expected invalid");
            };
            assert_eq!(problems[0].key, key, "{text}");
        }
        match Config::from_toml_str("[datasets]\nstore = \"ftp\"\n") {
            Err(ConfigError::Parse { .. }) => {}
            other => panic!("expected parse error, got {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn for_database_listens_on_port_zero() {
        let settings = Settings::for_database("x.db");
        assert_eq!(settings.listen_addr.port(), 0);
        assert_eq!(
            settings.storage,
            StorageSettings::Sqlite {
                path: PathBuf::from("x.db")
            }
        );
    }
}
