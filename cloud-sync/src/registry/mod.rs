//! Model registry: versions with stages per device group, content-addressed
//! signed artifacts, and the push / promote / archive operations behind the
//! `cloud-sync models` CLI and the registry API (`docs/model-registry.md`).
//!
//! Modules:
//! - `validate`: the package checks run before anything is registered;
//! - `archive`: the deterministic tar agents download;
//! - `artifacts`: the content-addressed files (`artifact_dir`);
//! - `keys`: the ed25519 signing key and the public keys list;
//! - `db`: the `model_versions` table on SQLite or PostgreSQL;
//! - `http`: the API handlers; `openapi`: their part of `/openapi.json`.
//!
//! Invariants:
//! - Nothing is half registered: a push validates the package, writes and
//!   signs the artifact, then inserts the row; if the insert fails or is
//!   refused, an artifact file this push created is removed. A row exists
//!   only once its artifact is durable under its final name.
//! - A registered version never changes content: re-pushing identical
//!   content is a no-op, different content under the same (name, version,
//!   group) is refused.
//! - At most one production version per (model, group); a promotion
//!   archives the previous one in the same transaction.

pub use sync_protocol::archive;
pub mod artifacts;
pub mod db;
pub mod http;
pub mod keys;
pub mod openapi;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sync_protocol::registry::{ModelVersion, Promotion, Stage, artifact_path};

pub use artifacts::ArtifactStore;
use db::{Changed, Db, DbError, Inserted, VersionRow};
pub use keys::{KeyError, Signer};
pub use validate::{ValidPackage, ValidationError};

use crate::config::{RegistrySettings, StorageSettings};

/// Result alias for this module.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The package failed validation; nothing was registered.
    #[error("package refused")]
    Invalid(#[source] ValidationError),
    /// The signing key could not be used; nothing was registered.
    #[error("cannot sign")]
    Key(#[source] KeyError),
    /// A group name is not valid.
    #[error("invalid device group {group:?}: use 1-128 characters from [A-Za-z0-9._-]")]
    InvalidGroup {
        /// The group.
        group: String,
    },
    /// The same (name, version, group) holds other content.
    #[error(
        "{name} {version} is already registered for group {group:?} with artifact {existing}; \
         this package's artifact is {pushed}: bump the version"
    )]
    Conflict {
        /// Model name.
        name: String,
        /// Version.
        version: String,
        /// Group.
        group: String,
        /// Registered artifact sha256.
        existing: String,
        /// Pushed artifact sha256.
        pushed: String,
    },
    /// No such version in that group.
    #[error(
        "unknown version {name} {version} in group {group:?}{}",
        known_groups(groups)
    )]
    UnknownVersion {
        /// Model name.
        name: String,
        /// Version.
        version: String,
        /// Group.
        group: String,
        /// Groups the version is registered in.
        groups: Vec<String>,
    },
    /// The artifact could not be written or removed.
    #[error("cannot store artifact in {}", dir.display())]
    Artifact {
        /// `artifact_dir`.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The archive could not be built.
    #[error("cannot build the artifact")]
    Archive(#[source] archive::ArchiveError),
    /// The database failed.
    #[error("registry database failure")]
    Db(#[source] DbError),
    /// A blocking task failed.
    #[error("validation task failed")]
    Task(#[source] tokio::task::JoinError),
}

fn known_groups(groups: &[String]) -> String {
    if groups.is_empty() {
        " (no such version in any group)".to_owned()
    } else {
        format!(" (registered for groups: {})", groups.join(", "))
    }
}

impl From<DbError> for RegistryError {
    fn from(err: DbError) -> Self {
        RegistryError::Db(err)
    }
}

/// Options of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOptions {
    /// Device group to register for.
    pub group: String,
    /// Training run that produced the model.
    pub training_run: Option<String>,
    /// Dataset it was trained on.
    pub dataset: Option<String>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            group: sync_protocol::registry::DEFAULT_GROUP.to_owned(),
            training_run: None,
            dataset: None,
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// The registered version.
    pub version: ModelVersion,
    /// False when identical content was already registered.
    pub created: bool,
    /// Golden pairs reproduced.
    pub golden: usize,
}

/// Handle to the registry: its database tables and artifact directory.
#[derive(Debug, Clone)]
pub struct Registry {
    db: Db,
    artifacts: Arc<ArtifactStore>,
    settings: RegistrySettings,
}

/// Whether `group` is a valid device group name.
#[must_use]
pub fn is_valid_group(group: &str) -> bool {
    crate::store::is_valid_device_id(group)
}

fn check_group(group: &str) -> Result<()> {
    if is_valid_group(group) {
        Ok(())
    } else {
        Err(RegistryError::InvalidGroup {
            group: group.to_owned(),
        })
    }
}

impl Registry {
    /// Opens the artifact directory and the registry tables (migrating them).
    ///
    /// # Errors
    /// [`RegistryError::Artifact`] or [`RegistryError::Db`].
    pub async fn open(settings: &RegistrySettings, storage: &StorageSettings) -> Result<Registry> {
        let artifacts = ArtifactStore::open(&settings.artifact_dir).map_err(|source| {
            RegistryError::Artifact {
                dir: settings.artifact_dir.clone(),
                source,
            }
        })?;
        let db = Db::open(storage).await?;
        Ok(Registry {
            db,
            artifacts: Arc::new(artifacts),
            settings: settings.clone(),
        })
    }

    /// The settings it was opened with.
    #[must_use]
    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    /// Where the artifact `sha256` is stored, if the name is well-formed.
    #[must_use]
    pub fn artifact_file(&self, sha256: &str) -> Option<PathBuf> {
        self.artifacts.path(sha256)
    }

    /// Validates the package in `dir`, stores its artifact, signs it with
    /// `signer` and registers it as `staging` for `options.group`.
    ///
    /// # Errors
    /// [`RegistryError::Invalid`] (nothing written), [`RegistryError::Conflict`],
    /// or a storage failure; in every case nothing stays registered.
    pub async fn push(&self, dir: &Path, signer: &Signer, options: PushOptions) -> Result<Pushed> {
        check_group(&options.group)?;
        let dir = dir.to_owned();
        let package = tokio::task::spawn_blocking(move || validate::validate_dir(&dir))
            .await
            .map_err(RegistryError::Task)?
            .map_err(RegistryError::Invalid)?;
        let bytes =
            archive::write(&package.manifest, &package.onnx).map_err(RegistryError::Archive)?;
        let size_bytes = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let store = Arc::clone(&self.artifacts);
        let (sha256, created) = tokio::task::spawn_blocking(move || store.put(&bytes))
            .await
            .map_err(RegistryError::Task)?
            .map_err(|source| self.artifact_error(source))?;
        let now = now_ms();
        let row = VersionRow {
            name: package.name.clone(),
            version: package.version.clone(),
            device_group: options.group.clone(),
            stage: Stage::Staging,
            signature: signer.sign(&sha256),
            key_id: signer.key_id().to_owned(),
            archive_sha256: sha256.clone(),
            model_sha256: package.model_sha256.clone(),
            size_bytes,
            created_ms: now,
            stage_changed_ms: now,
            training_run: options.training_run,
            dataset: options.dataset,
        };
        let outcome = match self.db.insert(row.clone()).await {
            Ok(Inserted::New) => Ok(Pushed {
                version: to_wire(row),
                created: true,
                golden: package.golden,
            }),
            Ok(Inserted::Existing(existing)) if existing.archive_sha256 == sha256 => Ok(Pushed {
                version: to_wire(*existing),
                created: false,
                golden: package.golden,
            }),
            Ok(Inserted::Existing(existing)) => Err(RegistryError::Conflict {
                name: package.name,
                version: package.version,
                group: options.group,
                existing: existing.archive_sha256,
                pushed: sha256.clone(),
            }),
            Err(err) => Err(RegistryError::Db(err)),
        };
        if outcome.is_err() && created {
            self.remove_unreferenced(&sha256).await;
        }
        outcome
    }

    /// Removes an artifact this push created if no row references it.
    async fn remove_unreferenced(&self, sha256: &str) {
        match self.db.references(sha256).await {
            Ok(0) => {
                if let Err(err) = self.artifacts.remove(sha256) {
                    tracing::error!(sha256, error = %err, "cannot remove unregistered artifact");
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::error!(sha256, error = %err, "cannot check artifact references; artifact kept");
            }
        }
    }

    fn artifact_error(&self, source: std::io::Error) -> RegistryError {
        RegistryError::Artifact {
            dir: self.settings.artifact_dir.clone(),
            source,
        }
    }

    /// Every registered version (of `name` when given), by name, group,
    /// then version (numerically).
    ///
    /// # Errors
    /// A database failure.
    pub async fn list(&self, name: Option<&str>) -> Result<Vec<ModelVersion>> {
        let mut rows = self.db.list(name).await?;
        rows.sort_by(|a, b| {
            (
                &a.name,
                &a.device_group,
                validate::parse_version(&a.version),
            )
                .cmp(&(
                    &b.name,
                    &b.device_group,
                    validate::parse_version(&b.version),
                ))
        });
        Ok(rows.into_iter().map(to_wire).collect())
    }

    /// The production version of `name` for `group`, if any.
    ///
    /// # Errors
    /// [`RegistryError::InvalidGroup`] or a database failure.
    pub async fn production(&self, name: &str, group: &str) -> Result<Option<ModelVersion>> {
        check_group(group)?;
        Ok(self.db.production(name, group).await?.map(to_wire))
    }

    /// Promotes a version to production for `group`, archiving the previous
    /// production version of that group in the same transaction. Promoting
    /// the current production version changes nothing.
    ///
    /// # Errors
    /// [`RegistryError::UnknownVersion`], [`RegistryError::InvalidGroup`] or
    /// a database failure.
    pub async fn promote(&self, name: &str, version: &str, group: &str) -> Result<Promotion> {
        let (promoted, archived) = self
            .set_stage(name, version, group, Stage::Production)
            .await?;
        Ok(Promotion { promoted, archived })
    }

    /// Archives a version (agents of its group then have no production
    /// version of the model, if it was the production one).
    ///
    /// # Errors
    /// As [`Registry::promote`].
    pub async fn archive(&self, name: &str, version: &str, group: &str) -> Result<ModelVersion> {
        Ok(self
            .set_stage(name, version, group, Stage::Archived)
            .await?
            .0)
    }

    async fn set_stage(
        &self,
        name: &str,
        version: &str,
        group: &str,
        stage: Stage,
    ) -> Result<(ModelVersion, Option<String>)> {
        check_group(group)?;
        match self
            .db
            .set_stage(name, version, group, stage, now_ms())
            .await?
        {
            Changed::Done { row, archived } => Ok((to_wire(*row), archived)),
            Changed::Unknown { groups } => Err(RegistryError::UnknownVersion {
                name: name.to_owned(),
                version: version.to_owned(),
                group: group.to_owned(),
                groups,
            }),
        }
    }
}

fn to_wire(row: VersionRow) -> ModelVersion {
    ModelVersion {
        artifact_url: artifact_path(&row.archive_sha256),
        name: row.name,
        version: row.version,
        group: row.device_group,
        stage: row.stage,
        sha256: row.archive_sha256,
        model_sha256: row.model_sha256,
        size_bytes: row.size_bytes,
        signature: row.signature,
        key_id: row.key_id,
        created_ms: row.created_ms,
        stage_changed_ms: row.stage_changed_ms,
        training_run: row.training_run,
        dataset: row.dataset,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A plain-text table of versions (for `cloud-sync models list`).
#[must_use]
pub fn table(versions: &[ModelVersion]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "VERSION".to_owned(),
        "GROUP".to_owned(),
        "STAGE".to_owned(),
        "SHA256".to_owned(),
        "SIZE".to_owned(),
        "KEY".to_owned(),
        "TRAINING_RUN".to_owned(),
        "DATASET".to_owned(),
    ]];
    for v in versions {
        rows.push([
            v.name.clone(),
            v.version.clone(),
            v.group.clone(),
            v.stage.as_str().to_owned(),
            v.sha256.get(..16).unwrap_or(&v.sha256).to_owned(),
            v.size_bytes.to_string(),
            v.key_id.clone(),
            v.training_run.clone().unwrap_or_else(|| "-".to_owned()),
            v.dataset.clone().unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
