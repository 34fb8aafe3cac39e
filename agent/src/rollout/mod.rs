//! Rollout: follows the registry's deployment of each configured model and
//! installs what it directs, verified, into the packages directory.
//!
//! Owns the downloads directory and the rollout report queue; writes into
//! the packages directory only by atomic rename of a complete, verified
//! package (`<name>/.incoming-*` to `<name>/<version>`) and by `.retired`
//! markers. Loading, golden checks, the swap itself and the trial are the
//! inference side's ([`crate::inference::swap`], [`crate::inference::trial`]).
//!
//! Order of checks for a new version, each refusal reported to the
//! registry and logged at ERROR, nothing installed:
//! 1. the deployment names the model asked for; not a downgrade below the
//!    newest version installed, unless the registry marks it `downgrade`
//!    (or `allow_downgrade`); announced size within `max_artifact_bytes`;
//! 2. the signing key is one of `trusted_keys` and the ed25519 signature
//!    over [`sync_protocol::registry::signed_message`] verifies (strict);
//! 3. download, resumable with `Range`, never past the announced size;
//! 4. the file's sha256 equals the signed one (only now is it read);
//! 5. the archive has exactly the artifact layout, its manifest names the
//!    same model and version, and `model.onnx` has the announced sha256.
//!
//! tract never sees a byte before step 4 passed.

pub mod fetch;
pub mod reports;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::SyncSettings;
use crate::telemetry::Counters;
use fetch::Fetcher;
use reports::ReportQueue;

/// Why the rollout stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The HTTP client could not be built.
    #[error("cannot build the registry client")]
    Client(#[source] crate::sync::SyncError),
    /// A state directory could not be created.
    #[error("cannot create {dir}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A trusted registry signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    /// First 16 hex digits of the sha256 of the public key.
    pub id: String,
    /// The ed25519 public key.
    pub key: ed25519_dalek::VerifyingKey,
}

impl TrustedKey {
    /// Parses 64 hex digits of an ed25519 public key.
    ///
    /// # Errors
    /// A message saying what is wrong with `hex_key`.
    pub fn parse(hex_key: &str) -> Result<Self, String> {
        use sha2::Digest;
        let bytes: [u8; 32] = hex::decode(hex_key.trim())
            .map_err(|e| format!("not hex: {e}"))?
            .try_into()
            .map_err(|_| "must be 64 hex digits (32 bytes)".to_owned())?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| "not a valid ed25519 public key".to_owned())?;
        let id = hex::encode(sha2::Sha256::digest(bytes))[..16].to_owned();
        Ok(Self { id, key })
    }
}

/// Validated `[rollout]` fetch settings.
#[derive(Debug, Clone)]
pub struct RolloutSettings {
    /// Models to follow.
    pub models: Vec<String>,
    /// Device group asked for (the registry may assign another).
    pub group: String,
    /// Registry poll period.
    pub poll_interval: Duration,
    /// Keys whose signatures are accepted.
    pub trusted_keys: Vec<TrustedKey>,
    /// Largest artifact downloaded.
    pub max_artifact_bytes: u64,
    /// Install older versions than the newest installed without the
    /// registry's `downgrade` flag.
    pub allow_downgrade: bool,
    /// Partial and complete downloads.
    pub downloads_dir: PathBuf,
    /// Durable report queue.
    pub reports_dir: PathBuf,
    /// Shadow candidates: `<name>/<version>/`, at most one per model.
    pub shadow_dir: PathBuf,
}

/// The rollout stage: polls the registry, installs, delivers reports.
pub struct RolloutStage {
    fetcher: Fetcher,
    reports: ReportQueue,
    interval: Duration,
}

impl RolloutStage {
    /// Builds the stage; `packages_dir` is the watcher's.
    ///
    /// # Errors
    /// [`RolloutError`] when the client or a directory cannot be made.
    pub fn new(
        settings: RolloutSettings,
        sync: &SyncSettings,
        packages_dir: PathBuf,
        reports: ReportQueue,
        counters: Arc<Counters>,
    ) -> Result<Self, RolloutError> {
        for dir in [&settings.downloads_dir, &packages_dir] {
            std::fs::create_dir_all(dir).map_err(|source| RolloutError::Dir {
                dir: dir.clone(),
                source,
            })?;
        }
        let client = crate::sync::build_client(sync).map_err(RolloutError::Client)?;
        let interval = settings.poll_interval;
        Ok(Self {
            fetcher: Fetcher::new(
                client,
                sync.url.clone(),
                sync.token.clone(),
                settings,
                packages_dir,
                reports.clone(),
                counters,
            ),
            reports,
            interval,
        })
    }

    /// Polls every model and delivers queued reports now, then every
    /// `poll_interval` (with up to 10 % jitter, so a fleet spreads out),
    /// until `shutdown`. Errors are logged and retried at the next poll:
    /// the agent serves from disk while the registry is unreachable.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.poll_once() => {}
            }
            let jitter = self.interval.mul_f64(rand::random::<f64>() * 0.1);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.interval + jitter) => {}
            }
        }
    }

    /// One round: every model, then the report queue.
    pub async fn poll_once(&mut self) {
        self.fetcher.poll_all().await;
        self.fetcher.deliver_reports(&self.reports).await;
    }
}
