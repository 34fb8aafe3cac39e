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
use std::time::Duration;

use serde::Deserialize;

/// The commented example configuration, printed by `print-default-config`.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

/// Default for `listen_addr`.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:8443";
/// Default for `database_path`.
pub const DEFAULT_DATABASE_PATH: &str = "cloud-sync.db";
/// Default for `max_body_bytes` (8 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
/// Default for `request_timeout_secs`.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;

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
    /// SQLite database file; created on first start.
    #[serde(default = "default_database_path")]
    pub database_path: PathBuf,
    /// Largest accepted request body in bytes, raw and (for zstd) decompressed.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Time allowed for one request, in seconds; also bounds shutdown draining.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_listen_addr() -> String {
    DEFAULT_LISTEN_ADDR.to_owned()
}

fn default_database_path() -> PathBuf {
    PathBuf::from(DEFAULT_DATABASE_PATH)
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
            database_path: default_database_path(),
            max_body_bytes: default_max_body_bytes(),
            request_timeout_secs: default_request_timeout_secs(),
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

        if self.database_path.as_os_str().is_empty() {
            problem("database_path", "must not be empty".to_owned());
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

        match (listen_addr, max_body_bytes) {
            (Some(listen_addr), Some(max_body_bytes)) if problems.is_empty() => Ok(Settings {
                listen_addr,
                database_path: self.database_path.clone(),
                max_body_bytes,
                request_timeout: Duration::from_secs(self.request_timeout_secs),
            }),
            _ => Err(ConfigError::Invalid { problems }),
        }
    }
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
    /// SQLite database file.
    pub database_path: PathBuf,
    /// Cap on the raw and the decompressed request body, in bytes.
    pub max_body_bytes: usize,
    /// Time allowed for one request.
    pub request_timeout: Duration,
}

impl Settings {
    /// Default settings for `path`, listening on `127.0.0.1:0` (tests, demos).
    #[must_use]
    pub fn for_database(path: impl Into<PathBuf>) -> Settings {
        Settings {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_path: path.into(),
            max_body_bytes: usize::try_from(DEFAULT_MAX_BODY_BYTES).unwrap_or(usize::MAX),
            request_timeout: Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS),
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
        Ok(())
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
            database_path: PathBuf::new(),
            max_body_bytes: 0,
            request_timeout_secs: 0,
        };
        let Err(ConfigError::Invalid { problems }) = config.validate() else {
            panic!("expected invalid config");
        };
        let keys: Vec<_> = problems.iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "listen_addr",
                "database_path",
                "max_body_bytes",
                "request_timeout_secs"
            ]
        );
        let text = ConfigError::Invalid { problems }.to_string();
        assert!(text.contains("key `request_timeout_secs`"), "{text}");
    }

    #[test]
    fn for_database_listens_on_port_zero() {
        let settings = Settings::for_database("x.db");
        assert_eq!(settings.listen_addr.port(), 0);
        assert_eq!(settings.database_path, PathBuf::from("x.db"));
    }
}
