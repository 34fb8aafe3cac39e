//! Model registry: versions with stages per device group, content-addressed
//! signed artifacts, and the push / promote / archive operations behind the
//! `cloud-sync models` CLI and the registry API (`docs/model-registry.md`).
//!
//! Modules:
//! - `validate`: the package checks run before anything is registered;
//! - `archive`: the deterministic tar agents download;
//! - `artifacts`: the content-addressed files (`artifact_dir`);
//! - `keys`: the ed25519 signing key and the public keys list;
//! - `db`: the registry's tables on SQLite or PostgreSQL;
//! - `rollout`: staged rollouts, shadow targets and device groups as pure
//!   rules (which version a device gets, when reports halt a rollout);
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
//! - At most one active rollout per (model, group); while it is active,
//!   promotions of the pair and archiving the versions it involves are
//!   refused.
//! - The group of a device is its server-side assignment when it has one,
//!   else the `group` it names, else `default`.

pub use sync_protocol::archive;
pub mod artifacts;
pub mod db;
pub mod http;
pub mod keys;
pub mod openapi;
pub mod rollout;
pub mod validate;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sync_protocol::registry::{
    Deployment, ModelVersion, Promotion, RolloutReport, RolloutReportAck, RolloutState,
    RolloutStatus, Stage, artifact_path,
};

pub use artifacts::ArtifactStore;
use db::{
    Changed, Db, DbError, Inserted, ReportRow, Reported, RolledBack, ShadowSet, VersionRow, Widened,
};
pub use keys::{KeyError, Signer};
use rollout::{DEFAULT_HALT_SHARE, DeploymentView, FULL_PERCENT, RolloutOverview};
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
    /// A rollout of the (model, group) is active.
    #[error(
        "a rollout of {name} {version} to group {group:?} is in progress at {percent}%: \
         change it with `models rollout`, or end it with `models rollback`"
    )]
    RolloutInProgress {
        /// Model name.
        name: String,
        /// Group.
        group: String,
        /// Version being rolled out.
        version: String,
        /// Its percentage.
        percent: u8,
    },
    /// No active rollout of the (model, group).
    #[error("no active rollout of {name} in group {group:?}")]
    NoActiveRollout {
        /// Model name.
        name: String,
        /// Group.
        group: String,
    },
    /// Nothing to roll back to.
    #[error(
        "nothing to roll back for {name} in group {group:?}: no production version, \
         or no previous version"
    )]
    NothingToRollBack {
        /// Model name.
        name: String,
        /// Group.
        group: String,
    },
    /// A percentage outside `1..=100`.
    #[error("invalid percentage {percent}: use 1 to 100")]
    InvalidPercent {
        /// The value given.
        percent: i64,
    },
    /// A halt share outside `0.0..=1.0`.
    #[error("invalid halt share {share}: use 0.0 to 1.0")]
    InvalidHaltShare {
        /// The value given.
        share: f64,
    },
    /// A device id is not valid.
    #[error("invalid device id {device:?}")]
    InvalidDevice {
        /// The id.
        device: String,
    },
    /// A rollout report is not acceptable.
    #[error("invalid rollout report: {reason}")]
    InvalidReport {
        /// What is wrong.
        reason: &'static str,
    },
    /// No such (model, version) in any group.
    #[error("unknown model version {name} {version}")]
    UnknownModelVersion {
        /// Model name.
        name: String,
        /// Version.
        version: String,
    },
    /// A shadow summary could not be serialised.
    #[error("cannot encode shadow summary")]
    Encode(#[source] serde_json::Error),
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
    /// As [`Registry::promote_staged`].
    pub async fn promote(&self, name: &str, version: &str, group: &str) -> Result<Promotion> {
        self.promote_staged(name, version, group, FULL_PERCENT, DEFAULT_HALT_SHARE)
            .await
    }

    /// Promotes a version for `group` to `percent` of its devices. Below
    /// 100 with another version in production, starts a staged rollout
    /// (returned in [`Promotion::rollout`]): devices whose
    /// [`sync_protocol::registry::canary_bucket`] is below `percent` get
    /// the version, the others keep the production version, and the
    /// rollout halts once more than `halt_share` of the reporting devices
    /// rolled it back. Otherwise as a full promotion.
    ///
    /// # Errors
    /// [`RegistryError::UnknownVersion`], [`RegistryError::InvalidGroup`],
    /// [`RegistryError::InvalidPercent`], [`RegistryError::InvalidHaltShare`],
    /// [`RegistryError::RolloutInProgress`] or a database failure.
    pub async fn promote_staged(
        &self,
        name: &str,
        version: &str,
        group: &str,
        percent: u8,
        halt_share: f64,
    ) -> Result<Promotion> {
        check_group(group)?;
        check_percent(i64::from(percent))?;
        if !(0.0..=1.0).contains(&halt_share) {
            return Err(RegistryError::InvalidHaltShare { share: halt_share });
        }
        let changed = self
            .db
            .promote(name, version, group, percent, halt_share, now_ms())
            .await?;
        let (promoted, archived, rollout) = changed_result(name, version, group, changed)?;
        Ok(Promotion {
            promoted,
            archived,
            rollout,
        })
    }

    /// Archives a version (agents of its group then have no production
    /// version of the model, if it was the production one).
    ///
    /// # Errors
    /// [`RegistryError::UnknownVersion`], [`RegistryError::InvalidGroup`],
    /// [`RegistryError::RolloutInProgress`] (the version is part of an
    /// active rollout) or a database failure.
    pub async fn archive(&self, name: &str, version: &str, group: &str) -> Result<ModelVersion> {
        check_group(group)?;
        let changed = self.db.archive(name, version, group, now_ms()).await?;
        Ok(changed_result(name, version, group, changed)?.0)
    }

    /// Sets the active rollout of `name` in `group` to `percent` (widening
    /// only adds devices, narrowing only removes some); at 100 the rollout
    /// completes: its version becomes production for the whole group and
    /// the previous one is archived. Returns the rollout and the version
    /// archived.
    ///
    /// # Errors
    /// [`RegistryError::NoActiveRollout`], [`RegistryError::InvalidPercent`],
    /// [`RegistryError::InvalidGroup`] or a database failure.
    pub async fn rollout(
        &self,
        name: &str,
        group: &str,
        percent: u8,
    ) -> Result<(RolloutStatus, Option<String>)> {
        check_group(group)?;
        check_percent(i64::from(percent))?;
        match self.db.widen(name, group, percent, now_ms()).await? {
            Widened::NoActive => Err(RegistryError::NoActiveRollout {
                name: name.to_owned(),
                group: group.to_owned(),
            }),
            Widened::Done { rollout, archived } => Ok((rollout.status(), archived)),
        }
    }

    /// Rolls back `name` in `group`: halts its active rollout (every device
    /// then gets the production version with `downgrade: true`), or, with
    /// no active rollout, promotes the previous production version again
    /// and records a halted rollout so that deployments carry
    /// `downgrade: true`. Rolling back twice changes nothing the second
    /// time.
    ///
    /// # Errors
    /// [`RegistryError::NothingToRollBack`], [`RegistryError::InvalidGroup`]
    /// or a database failure.
    pub async fn rollback(&self, name: &str, group: &str) -> Result<Rollback> {
        check_group(group)?;
        match self.db.rollback(name, group, now_ms()).await? {
            RolledBack::Nothing => Err(RegistryError::NothingToRollBack {
                name: name.to_owned(),
                group: group.to_owned(),
            }),
            RolledBack::Halted(r) => Ok(Rollback {
                rollout: r.status(),
                restored: false,
                changed: true,
            }),
            RolledBack::AlreadyHalted(r) => Ok(Rollback {
                rollout: r.status(),
                restored: false,
                changed: false,
            }),
            RolledBack::Restored(r) => Ok(Rollback {
                rollout: r.status(),
                restored: true,
                changed: true,
            }),
        }
    }

    /// Sets (`Some((version, percent))`) or clears (`None`) the shadow
    /// target of `name` in `group`: targeted devices (by
    /// [`sync_protocol::registry::canary_bucket`] of the shadow version)
    /// get it as `shadow` in their deployment.
    ///
    /// # Errors
    /// [`RegistryError::UnknownVersion`], [`RegistryError::InvalidPercent`],
    /// [`RegistryError::InvalidGroup`] or a database failure.
    pub async fn set_shadow(
        &self,
        name: &str,
        group: &str,
        target: Option<(&str, u8)>,
    ) -> Result<()> {
        check_group(group)?;
        if let Some((_, percent)) = target {
            check_percent(i64::from(percent))?;
        }
        let owned = target.map(|(v, p)| (v.to_owned(), p));
        match self.db.set_shadow(name, group, owned, now_ms()).await? {
            ShadowSet::Done => Ok(()),
            ShadowSet::Unknown { groups } => Err(RegistryError::UnknownVersion {
                name: name.to_owned(),
                version: target.map(|(v, _)| v.to_owned()).unwrap_or_default(),
                group: group.to_owned(),
                groups,
            }),
        }
    }

    /// Assigns `device` to `group` (`None`: removes the assignment, so the
    /// group it names applies again); returns the previous assignment. The
    /// caller checks that the device is registered.
    ///
    /// # Errors
    /// [`RegistryError::InvalidDevice`], [`RegistryError::InvalidGroup`] or
    /// a database failure.
    pub async fn set_device_group(
        &self,
        device: &str,
        group: Option<&str>,
    ) -> Result<Option<String>> {
        check_device(device)?;
        if let Some(group) = group {
            check_group(group)?;
        }
        Ok(self.db.set_device_group(device, group, now_ms()).await?)
    }

    /// The group of `device` (`None`: device-less, an operator) that names
    /// `query_group`: its assignment, else `query_group`, else `default`.
    ///
    /// # Errors
    /// [`RegistryError::InvalidGroup`] or a database failure.
    pub async fn group_of(
        &self,
        device: Option<&str>,
        query_group: Option<&str>,
    ) -> Result<String> {
        if let Some(group) = query_group {
            check_group(group)?;
        }
        let assigned = match device {
            Some(device) => self.db.device_group(device).await?,
            None => None,
        };
        Ok(assigned
            .or_else(|| query_group.map(str::to_owned))
            .unwrap_or_else(|| sync_protocol::registry::DEFAULT_GROUP.to_owned()))
    }

    /// What `device` (`None`: the device-less view of a group, as for a
    /// device outside every partial canary) should run for `name`; `None`
    /// when the resolved group has no production version.
    ///
    /// # Errors
    /// [`RegistryError::InvalidGroup`] or a database failure.
    pub async fn deployment(
        &self,
        name: &str,
        device: Option<&str>,
        query_group: Option<&str>,
    ) -> Result<Option<Deployment>> {
        if let Some(group) = query_group {
            check_group(group)?;
        }
        let rows = self.db.view(name, device, query_group).await?;
        let view = DeploymentView {
            group: rows.group,
            production: rows.production.map(to_wire),
            rollout: rows.rollout,
            candidate: rows.candidate.map(to_wire),
            shadow: rows.shadow.map(|(target, row)| (target, to_wire(row))),
        };
        Ok(rollout::deployment(view, device, name))
    }

    /// Stores `device`'s report (idempotent per device, model, version and
    /// event), recounts the rollout of that version in the device's group
    /// and halts it when more than its halt share of the reporting devices
    /// rolled it back (logged at WARN).
    ///
    /// # Errors
    /// [`RegistryError::InvalidReport`], [`RegistryError::InvalidGroup`],
    /// [`RegistryError::UnknownModelVersion`] or a database failure.
    pub async fn report(
        &self,
        device: &str,
        query_group: Option<&str>,
        report: RolloutReport,
    ) -> Result<RolloutReportAck> {
        check_device(device)?;
        if let Some(group) = query_group {
            check_group(group)?;
        }
        check_report(&report)?;
        let shadow_json = report
            .shadow
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(RegistryError::Encode)?;
        let (name, version, event) = (report.model.clone(), report.version.clone(), report.event);
        let row = ReportRow {
            device: device.to_owned(),
            query_group: query_group.map(str::to_owned),
            report,
            shadow_json,
        };
        match self.db.report(row, now_ms()).await? {
            Reported::Unknown => Err(RegistryError::UnknownModelVersion { name, version }),
            Reported::Stored {
                group,
                rollout,
                halted_now,
            } => {
                let rollout = rollout.map(|r| r.status());
                if halted_now && let Some(r) = &rollout {
                    tracing::warn!(
                        model = %name, %version, %group, adopted = r.adopted,
                        rolled_back = r.rolled_back, halt_share = r.halt_share,
                        previous = ?r.previous, %device,
                        "rollout halted: rollback share exceeded; devices go back to the previous version"
                    );
                } else {
                    tracing::debug!(model = %name, %version, %group, %device,
                        event = event.as_str(), "stored rollout report");
                }
                Ok(RolloutReportAck { rollout })
            }
        }
    }

    /// The operator view of `name` in `group`: production version, latest
    /// rollout, devices per event, shadow target, recent reasons.
    ///
    /// # Errors
    /// [`RegistryError::InvalidGroup`] or a database failure.
    pub async fn overview(&self, name: &str, group: &str) -> Result<RolloutOverview> {
        check_group(group)?;
        let rows = self.db.overview(name, group).await?;
        Ok(RolloutOverview {
            name: name.to_owned(),
            group: group.to_owned(),
            production: rows.production,
            rollout: rows.rollout.map(|r| r.status()),
            events: rows.events.into_iter().collect(),
            shadow: rows.shadow,
            recent_reasons: rows.reasons,
        })
    }

    /// How many times rollouts of `name` in `group` entered `state`
    /// (from the rollout history; e.g. each halt is recorded once).
    ///
    /// # Errors
    /// A database failure.
    pub async fn transitions(&self, name: &str, group: &str, state: RolloutState) -> Result<u64> {
        Ok(self.db.history_count(name, group, state).await?)
    }
}

/// What [`Registry::rollback`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollback {
    /// The halted rollout (the active one just halted, or the one recording
    /// the re-promotion).
    pub rollout: RolloutStatus,
    /// True when the previous production version was promoted again.
    pub restored: bool,
    /// False when the rollout was already halted (nothing changed).
    pub changed: bool,
}

fn changed_result(
    name: &str,
    version: &str,
    group: &str,
    changed: Changed,
) -> Result<(ModelVersion, Option<String>, Option<RolloutStatus>)> {
    match changed {
        Changed::Done {
            row,
            archived,
            rollout,
        } => Ok((to_wire(*row), archived, rollout.map(|r| r.status()))),
        Changed::Unknown { groups } => Err(RegistryError::UnknownVersion {
            name: name.to_owned(),
            version: version.to_owned(),
            group: group.to_owned(),
            groups,
        }),
        Changed::InProgress(active) => Err(in_progress(&active)),
    }
}

fn in_progress(active: &rollout::RolloutRow) -> RegistryError {
    RegistryError::RolloutInProgress {
        name: active.name.clone(),
        group: active.device_group.clone(),
        version: active.version.clone(),
        percent: active.percent,
    }
}

fn check_percent(percent: i64) -> Result<()> {
    if (1..=i64::from(FULL_PERCENT)).contains(&percent) {
        Ok(())
    } else {
        Err(RegistryError::InvalidPercent { percent })
    }
}

fn check_device(device: &str) -> Result<()> {
    if crate::store::is_valid_device_id(device) {
        Ok(())
    } else {
        Err(RegistryError::InvalidDevice {
            device: device.to_owned(),
        })
    }
}

/// Longest `reason` a report may carry, in bytes.
pub const MAX_REASON_BYTES: usize = 4096;

fn check_report(report: &RolloutReport) -> Result<()> {
    let invalid = |reason| Err(RegistryError::InvalidReport { reason });
    if report.model.is_empty() || report.model.len() > 128 {
        return invalid("model must be 1-128 bytes");
    }
    if validate::parse_version(&report.version).is_none() {
        return invalid("version must be MAJOR.MINOR.PATCH");
    }
    if report
        .sha256
        .as_ref()
        .is_some_and(|sha| sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return invalid("sha256 must be 64 hex digits");
    }
    if report
        .reason
        .as_ref()
        .is_some_and(|r| r.len() > MAX_REASON_BYTES)
    {
        return invalid("reason is longer than 4096 bytes");
    }
    if let Some(shadow) = &report.shadow {
        let finite = [shadow.mean_abs_diff, shadow.max_abs_diff, shadow.agreement];
        if !finite.iter().all(|v| v.is_finite()) || !(0.0..=1.0).contains(&shadow.agreement) {
            return invalid("shadow summary values must be finite, agreement within 0..=1");
        }
    }
    Ok(())
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
