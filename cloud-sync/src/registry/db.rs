//! The registry's tables, on the database the store uses (the same SQLite
//! file or PostgreSQL database), through the registry's own connections.
//!
//! Design: the registry keeps its own connections and its own migration
//! table (`registry_migrations`) instead of adding commands to
//! [`crate::store`]: registry traffic is small (pushes, promotions, and one
//! indexed lookup per agent poll), and the two schemas evolve independently.
//! This module is the only code touching the registry's tables:
//! `model_versions`, `device_groups`, `rollouts`, `rollout_history`,
//! `rollout_reports` and `shadows`.
//!
//! Invariants (both backends):
//! - `(name, version, device_group)` is the primary key: a version is
//!   registered once per group, and never changes content (the artifact
//!   hash is fixed at insert).
//! - At most one version per `(name, device_group)` is in production: a
//!   partial unique index enforces it, and a promotion archives the previous
//!   production version and promotes the new one in one transaction
//!   (PostgreSQL: under a transaction-level advisory lock on the pair, so
//!   concurrent promotions through several instances serialise).
//! - At most one active rollout per `(name, device_group)` (a partial
//!   unique index), and an active rollout always has a previous version.
//!   Every operation that reads then changes the rollouts or production
//!   version of a pair (promote, archive, widen, rollback, a rollout
//!   report) runs in one transaction under the same advisory lock, so a
//!   halt is decided and recorded exactly once however many instances
//!   receive reports.
//! - Every change of a pair's production version through a promotion, a
//!   completed rollout or a rollback adds a `rollouts` row, so the pair's
//!   latest rollout tells whether its production version is a rollback
//!   (halted) or a regular promotion (complete).
//! - A report is one row per `(device, name, version, event)`: repeating it
//!   updates that row and never counts twice.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use sync_protocol::registry::{DEFAULT_GROUP, RolloutEvent, RolloutReport, RolloutState, Stage};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

use super::rollout::{
    DEFAULT_HALT_SHARE, FULL_PERCENT, RECENT_REASONS, ReportReason, RolloutRow, ShadowTarget,
    parse_state, should_halt, state_str,
};
use crate::config::{PostgresSettings, StorageSettings};

/// Result alias for this module.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// Capacity of the command queue in front of the SQLite worker.
const QUEUE_CAPACITY: usize = 16;
/// How long a SQLite statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most PostgreSQL connections the registry opens at once.
const MAX_PG_CONNECTIONS: usize = 4;

/// Why a registry database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The SQLite file could not be opened.
    #[error("cannot open registry database {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A SQLite statement failed.
    #[error("registry database error")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL statement or connection failed.
    #[error("registry database error")]
    Postgres(#[from] tokio_postgres::Error),
    /// The worker thread could not be started.
    #[error("cannot start the registry database thread")]
    Spawn(#[source] std::io::Error),
    /// The worker stopped.
    #[error("registry database closed")]
    Closed,
    /// The schema could not be migrated, or is newer than this build.
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    /// A stored value is not valid.
    #[error("invalid stored value in {column}: {value:?}")]
    Stored {
        /// Column.
        column: &'static str,
        /// Value.
        value: String,
    },
}

/// One row of `model_versions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    /// Model name.
    pub name: String,
    /// `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// Device group.
    pub device_group: String,
    /// Stage.
    pub stage: Stage,
    /// sha256 of the artifact.
    pub archive_sha256: String,
    /// sha256 of `model.onnx`.
    pub model_sha256: String,
    /// Artifact size.
    pub size_bytes: u64,
    /// Signature (hex).
    pub signature: String,
    /// Signing key id.
    pub key_id: String,
    /// Registration time (Unix ms).
    pub created_ms: i64,
    /// Last stage change (Unix ms).
    pub stage_changed_ms: i64,
    /// Training run id.
    pub training_run: Option<String>,
    /// Dataset id.
    pub dataset: Option<String>,
}

/// What an insert found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The row was added.
    New,
    /// The same key existed: the stored row (same or different content).
    Existing(Box<VersionRow>),
}

/// What a stage change found.
#[derive(Debug, Clone, PartialEq)]
pub enum Changed {
    /// No row with that key; the groups the version exists in.
    Unknown {
        /// Groups holding `(name, version)`.
        groups: Vec<String>,
    },
    /// Refused: a rollout of the pair is active (and, for an archive,
    /// involves the version).
    InProgress(Box<RolloutRow>),
    /// Done: the row after the change, and the version archived by a
    /// promotion.
    Done {
        /// The row after the change.
        row: Box<VersionRow>,
        /// The previous production version of the group, now archived.
        archived: Option<String>,
        /// The staged rollout a promotion started.
        rollout: Option<Box<RolloutRow>>,
    },
}

/// What widening or narrowing a rollout found.
#[derive(Debug, Clone, PartialEq)]
pub enum Widened {
    /// No active rollout of the pair.
    NoActive,
    /// Done: the rollout after the change (complete at 100 %), and the
    /// version its completion archived.
    Done {
        /// The rollout after the change.
        rollout: Box<RolloutRow>,
        /// Previous production version archived by the completion.
        archived: Option<String>,
    },
}

/// What a rollback did.
#[derive(Debug, Clone, PartialEq)]
pub enum RolledBack {
    /// No production version, or none to go back to.
    Nothing,
    /// The active rollout is now halted.
    Halted(Box<RolloutRow>),
    /// The latest rollout was already halted with its previous version in
    /// production; nothing changed.
    AlreadyHalted(Box<RolloutRow>),
    /// The previous production version was promoted again; the returned
    /// (halted) rollout records the rollback.
    Restored(Box<RolloutRow>),
}

/// What setting a shadow target found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowSet {
    /// No such version in the group; the groups it exists in.
    Unknown {
        /// Groups holding `(name, version)`.
        groups: Vec<String>,
    },
    /// Set or cleared.
    Done,
}

/// What storing a rollout report found.
#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    /// `(model, version)` is registered in no group.
    Unknown,
    /// Stored.
    Stored {
        /// The group resolved for the device.
        group: String,
        /// The pair's latest rollout when it is of the reported version,
        /// after recounting.
        rollout: Option<Box<RolloutRow>>,
        /// Whether this report halted it.
        halted_now: bool,
    },
}

/// The rows a deployment is computed from (see [`super::rollout::deployment`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewRows {
    /// The resolved group.
    pub group: String,
    /// Its production version.
    pub production: Option<VersionRow>,
    /// Its latest rollout.
    pub rollout: Option<RolloutRow>,
    /// The version of `rollout` when active.
    pub candidate: Option<VersionRow>,
    /// Its shadow target and that version.
    pub shadow: Option<(ShadowTarget, VersionRow)>,
}

/// The rows of the operator view of one (model, group).
#[derive(Debug, Clone, PartialEq)]
pub struct OverviewRows {
    /// Production version.
    pub production: Option<String>,
    /// Latest rollout.
    pub rollout: Option<RolloutRow>,
    /// Devices per event on the rollout's (else production's) version.
    pub events: Vec<(String, u64)>,
    /// Shadow target.
    pub shadow: Option<ShadowTarget>,
    /// Recent reasons, newest first.
    pub reasons: Vec<ReportReason>,
}

/// A report with its shadow summary already serialised (JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// The reporting device.
    pub device: String,
    /// The `group` query of the request.
    pub query_group: Option<String>,
    /// The report.
    pub report: RolloutReport,
    /// `report.shadow` as JSON.
    pub shadow_json: Option<String>,
}

const COLUMNS: &str = "name, version, device_group, stage, archive_sha256, model_sha256, \
     size_bytes, signature, key_id, created_ms, stage_changed_ms, training_run, dataset";

const SQLITE_MIGRATIONS: &[&str] = &[
    // 1: model versions.
    "CREATE TABLE model_versions (
        name             TEXT NOT NULL,
        version          TEXT NOT NULL,
        device_group     TEXT NOT NULL,
        stage            TEXT NOT NULL CHECK (stage IN ('staging', 'production', 'archived')),
        archive_sha256   TEXT NOT NULL,
        model_sha256     TEXT NOT NULL,
        size_bytes       INTEGER NOT NULL,
        signature        TEXT NOT NULL,
        key_id           TEXT NOT NULL,
        created_ms       INTEGER NOT NULL,
        stage_changed_ms INTEGER NOT NULL,
        training_run     TEXT,
        dataset          TEXT,
        PRIMARY KEY (name, version, device_group)
    ) STRICT;
    CREATE UNIQUE INDEX model_versions_one_production
        ON model_versions (name, device_group) WHERE stage = 'production';
    CREATE INDEX model_versions_by_artifact ON model_versions (archive_sha256);",
    // 2: device groups, staged rollouts, rollout reports, shadow targets.
    "CREATE TABLE device_groups (
        device       TEXT PRIMARY KEY NOT NULL,
        device_group TEXT NOT NULL,
        assigned_ms  INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE rollouts (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        name         TEXT NOT NULL,
        device_group TEXT NOT NULL,
        version      TEXT NOT NULL,
        previous     TEXT,
        percent      INTEGER NOT NULL CHECK (percent BETWEEN 1 AND 100),
        peak_percent INTEGER NOT NULL CHECK (peak_percent BETWEEN percent AND 100),
        halt_share   REAL NOT NULL CHECK (halt_share >= 0.0 AND halt_share <= 1.0),
        state        TEXT NOT NULL CHECK (state IN ('active', 'halted', 'complete')),
        adopted      INTEGER NOT NULL DEFAULT 0,
        rolled_back  INTEGER NOT NULL DEFAULT 0,
        started_ms   INTEGER NOT NULL,
        updated_ms   INTEGER NOT NULL,
        CHECK (state <> 'active' OR (previous IS NOT NULL AND previous <> version)),
        FOREIGN KEY (name, version, device_group)
            REFERENCES model_versions (name, version, device_group)
    ) STRICT;
    CREATE UNIQUE INDEX rollouts_one_active ON rollouts (name, device_group)
        WHERE state = 'active';
    CREATE INDEX rollouts_by_pair ON rollouts (name, device_group, id);
    CREATE TABLE rollout_history (
        rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
        at_ms      INTEGER NOT NULL,
        state      TEXT NOT NULL,
        percent    INTEGER NOT NULL,
        actor      TEXT NOT NULL,
        note       TEXT NOT NULL
    ) STRICT;
    CREATE INDEX rollout_history_by_rollout ON rollout_history (rollout_id);
    CREATE TABLE rollout_reports (
        device       TEXT NOT NULL,
        name         TEXT NOT NULL,
        version      TEXT NOT NULL,
        event        TEXT NOT NULL
            CHECK (event IN ('adopted', 'rolled_back', 'refused', 'shadow')),
        device_group TEXT NOT NULL,
        rollout_id   INTEGER REFERENCES rollouts (id),
        sha256       TEXT,
        reason       TEXT,
        at_ms        INTEGER NOT NULL,
        received_ms  INTEGER NOT NULL,
        shadow       TEXT,
        PRIMARY KEY (device, name, version, event)
    ) STRICT;
    CREATE INDEX rollout_reports_by_rollout ON rollout_reports (rollout_id, event);
    CREATE INDEX rollout_reports_by_version ON rollout_reports (name, version, device_group);
    CREATE TABLE shadows (
        name         TEXT NOT NULL,
        device_group TEXT NOT NULL,
        version      TEXT NOT NULL,
        percent      INTEGER NOT NULL CHECK (percent BETWEEN 1 AND 100),
        set_ms       INTEGER NOT NULL,
        PRIMARY KEY (name, device_group),
        FOREIGN KEY (name, version, device_group)
            REFERENCES model_versions (name, version, device_group)
    ) STRICT;",
];

const PG_MIGRATIONS: &[&str] = &[
    // 1: model versions (mirrors SQLite).
    "CREATE TABLE model_versions (
        name             TEXT NOT NULL,
        version          TEXT NOT NULL,
        device_group     TEXT NOT NULL,
        stage            TEXT NOT NULL CHECK (stage IN ('staging', 'production', 'archived')),
        archive_sha256   TEXT NOT NULL,
        model_sha256     TEXT NOT NULL,
        size_bytes       BIGINT NOT NULL,
        signature        TEXT NOT NULL,
        key_id           TEXT NOT NULL,
        created_ms       BIGINT NOT NULL,
        stage_changed_ms BIGINT NOT NULL,
        training_run     TEXT,
        dataset          TEXT,
        PRIMARY KEY (name, version, device_group)
    );
    CREATE UNIQUE INDEX model_versions_one_production
        ON model_versions (name, device_group) WHERE stage = 'production';
    CREATE INDEX model_versions_by_artifact ON model_versions (archive_sha256);",
    // 2: device groups, staged rollouts, rollout reports, shadow targets
    // (mirrors SQLite).
    "CREATE TABLE device_groups (
        device       TEXT PRIMARY KEY,
        device_group TEXT NOT NULL,
        assigned_ms  BIGINT NOT NULL
    );
    CREATE TABLE rollouts (
        id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name         TEXT NOT NULL,
        device_group TEXT NOT NULL,
        version      TEXT NOT NULL,
        previous     TEXT,
        percent      INTEGER NOT NULL CHECK (percent BETWEEN 1 AND 100),
        peak_percent INTEGER NOT NULL CHECK (peak_percent BETWEEN percent AND 100),
        halt_share   DOUBLE PRECISION NOT NULL CHECK (halt_share >= 0.0 AND halt_share <= 1.0),
        state        TEXT NOT NULL CHECK (state IN ('active', 'halted', 'complete')),
        adopted      BIGINT NOT NULL DEFAULT 0,
        rolled_back  BIGINT NOT NULL DEFAULT 0,
        started_ms   BIGINT NOT NULL,
        updated_ms   BIGINT NOT NULL,
        CHECK (state <> 'active' OR (previous IS NOT NULL AND previous <> version)),
        FOREIGN KEY (name, version, device_group)
            REFERENCES model_versions (name, version, device_group)
    );
    CREATE UNIQUE INDEX rollouts_one_active ON rollouts (name, device_group)
        WHERE state = 'active';
    CREATE INDEX rollouts_by_pair ON rollouts (name, device_group, id);
    CREATE TABLE rollout_history (
        rollout_id BIGINT NOT NULL REFERENCES rollouts (id),
        at_ms      BIGINT NOT NULL,
        state      TEXT NOT NULL,
        percent    INTEGER NOT NULL,
        actor      TEXT NOT NULL,
        note       TEXT NOT NULL
    );
    CREATE INDEX rollout_history_by_rollout ON rollout_history (rollout_id);
    CREATE TABLE rollout_reports (
        device       TEXT NOT NULL,
        name         TEXT NOT NULL,
        version      TEXT NOT NULL,
        event        TEXT NOT NULL
            CHECK (event IN ('adopted', 'rolled_back', 'refused', 'shadow')),
        device_group TEXT NOT NULL,
        rollout_id   BIGINT REFERENCES rollouts (id),
        sha256       TEXT,
        reason       TEXT,
        at_ms        BIGINT NOT NULL,
        received_ms  BIGINT NOT NULL,
        shadow       TEXT,
        PRIMARY KEY (device, name, version, event)
    );
    CREATE INDEX rollout_reports_by_rollout ON rollout_reports (rollout_id, event);
    CREATE INDEX rollout_reports_by_version ON rollout_reports (name, version, device_group);
    CREATE TABLE shadows (
        name         TEXT NOT NULL,
        device_group TEXT NOT NULL,
        version      TEXT NOT NULL,
        percent      INTEGER NOT NULL CHECK (percent BETWEEN 1 AND 100),
        set_ms       BIGINT NOT NULL,
        PRIMARY KEY (name, device_group),
        FOREIGN KEY (name, version, device_group)
            REFERENCES model_versions (name, version, device_group)
    );",
];

/// Handle to the registry's tables.
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite: one worker thread with its own connection.
    Sqlite(SqliteDb),
    /// PostgreSQL: a few pooled connections.
    Postgres(Box<PgDb>),
}

impl Db {
    /// Opens the database `storage` names and applies registry migrations.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be opened or migrated.
    pub async fn open(storage: &StorageSettings) -> Result<Db> {
        match storage {
            StorageSettings::Sqlite { path } => Ok(Db::Sqlite(SqliteDb::open(path).await?)),
            StorageSettings::Postgres(settings) => {
                Ok(Db::Postgres(Box::new(PgDb::open(settings).await?)))
            }
        }
    }

    /// Inserts `row` unless its key exists.
    ///
    /// # Errors
    /// A database failure.
    pub async fn insert(&self, row: VersionRow) -> Result<Inserted> {
        match self {
            Db::Sqlite(db) => db.run(move |c| sqlite_insert(c, &row)).await,
            Db::Postgres(db) => db.insert(&row).await,
        }
    }

    /// Every version (of `name` when given), unordered.
    ///
    /// # Errors
    /// A database failure.
    pub async fn list(&self, name: Option<&str>) -> Result<Vec<VersionRow>> {
        let name = name.map(str::to_owned);
        match self {
            Db::Sqlite(db) => db.run(move |c| sqlite_list(c, name.as_deref())).await,
            Db::Postgres(db) => db.list(name.as_deref()).await,
        }
    }

    /// The production version of `name` for `group`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn production(&self, name: &str, group: &str) -> Result<Option<VersionRow>> {
        let (name, group) = (name.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => db.run(move |c| sqlite_production(c, &name, &group)).await,
            Db::Postgres(db) => db.production(&name, &group).await,
        }
    }

    /// Promotes a version for `group`. With `percent` below 100 and another
    /// version in production, starts an active rollout instead (the version
    /// keeps its stage); otherwise archives the previous production version
    /// and promotes this one in the same transaction, recording a complete
    /// rollout. Refused while a rollout of the pair is active.
    ///
    /// # Errors
    /// A database failure.
    pub async fn promote(
        &self,
        name: &str,
        version: &str,
        group: &str,
        percent: u8,
        halt_share: f64,
        now_ms: i64,
    ) -> Result<Changed> {
        let key = (name.to_owned(), version.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| {
                    sqlite_promote(c, &key.0, &key.1, &key.2, percent, halt_share, now_ms)
                })
                .await
            }
            Db::Postgres(db) => {
                db.promote(&key.0, &key.1, &key.2, percent, halt_share, now_ms)
                    .await
            }
        }
    }

    /// Archives a version; refused while an active rollout of the pair
    /// involves it.
    ///
    /// # Errors
    /// A database failure.
    pub async fn archive(
        &self,
        name: &str,
        version: &str,
        group: &str,
        now_ms: i64,
    ) -> Result<Changed> {
        let key = (name.to_owned(), version.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| sqlite_archive(c, &key.0, &key.1, &key.2, now_ms))
                    .await
            }
            Db::Postgres(db) => db.archive(&key.0, &key.1, &key.2, now_ms).await,
        }
    }

    /// Sets the active rollout of the pair to `percent`; at 100 it
    /// completes (the version becomes production, the previous one is
    /// archived).
    ///
    /// # Errors
    /// A database failure.
    pub async fn widen(
        &self,
        name: &str,
        group: &str,
        percent: u8,
        now_ms: i64,
    ) -> Result<Widened> {
        let key = (name.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| sqlite_widen(c, &key.0, &key.1, percent, now_ms))
                    .await
            }
            Db::Postgres(db) => db.widen(&key.0, &key.1, percent, now_ms).await,
        }
    }

    /// Halts the active rollout of the pair, or promotes the previous
    /// production version again (recording a halted rollout).
    ///
    /// # Errors
    /// A database failure.
    pub async fn rollback(&self, name: &str, group: &str, now_ms: i64) -> Result<RolledBack> {
        let key = (name.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| sqlite_rollback(c, &key.0, &key.1, now_ms))
                    .await
            }
            Db::Postgres(db) => db.rollback(&key.0, &key.1, now_ms).await,
        }
    }

    /// Sets (`Some((version, percent))`) or clears the shadow target of the
    /// pair.
    ///
    /// # Errors
    /// A database failure.
    pub async fn set_shadow(
        &self,
        name: &str,
        group: &str,
        target: Option<(String, u8)>,
        now_ms: i64,
    ) -> Result<ShadowSet> {
        let key = (name.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| sqlite_set_shadow(c, &key.0, &key.1, target, now_ms))
                    .await
            }
            Db::Postgres(db) => db.set_shadow(&key.0, &key.1, target, now_ms).await,
        }
    }

    /// The group assigned to `device`, if any.
    ///
    /// # Errors
    /// A database failure.
    pub async fn device_group(&self, device: &str) -> Result<Option<String>> {
        let device = device.to_owned();
        match self {
            Db::Sqlite(db) => db.run(move |c| sqlite_device_group(c, &device)).await,
            Db::Postgres(db) => db.device_group(&device).await,
        }
    }

    /// Assigns `device` to `group` (`None`: removes its assignment);
    /// returns the previous assignment.
    ///
    /// # Errors
    /// A database failure.
    pub async fn set_device_group(
        &self,
        device: &str,
        group: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<String>> {
        let (device, group) = (device.to_owned(), group.map(str::to_owned));
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| sqlite_set_device_group(c, &device, group.as_deref(), now_ms))
                    .await
            }
            Db::Postgres(db) => db.set_device_group(&device, group.as_deref(), now_ms).await,
        }
    }

    /// The rows a deployment of `name` is computed from, for `device`
    /// (`None`: device-less) whose request named `query_group`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn view(
        &self,
        name: &str,
        device: Option<&str>,
        query_group: Option<&str>,
    ) -> Result<ViewRows> {
        let name = name.to_owned();
        let device = device.map(str::to_owned);
        let query_group = query_group.map(str::to_owned);
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| sqlite_view(c, &name, device.as_deref(), query_group.as_deref()))
                    .await
            }
            Db::Postgres(db) => {
                db.view(&name, device.as_deref(), query_group.as_deref())
                    .await
            }
        }
    }

    /// Stores a rollout report (upsert per device, model, version and
    /// event), recounts the rollout it belongs to and halts it when
    /// [`should_halt`] says so.
    ///
    /// # Errors
    /// A database failure.
    pub async fn report(&self, report: ReportRow, now_ms: i64) -> Result<Reported> {
        match self {
            Db::Sqlite(db) => db.run(move |c| sqlite_report(c, &report, now_ms)).await,
            Db::Postgres(db) => db.report(&report, now_ms).await,
        }
    }

    /// The rows of the operator view of a pair.
    ///
    /// # Errors
    /// A database failure.
    pub async fn overview(&self, name: &str, group: &str) -> Result<OverviewRows> {
        let key = (name.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => db.run(move |c| sqlite_overview(c, &key.0, &key.1)).await,
            Db::Postgres(db) => db.overview(&key.0, &key.1).await,
        }
    }

    /// How many `rollout_history` entries of the pair's rollouts are in
    /// `state` (an audit count: each halt is recorded once).
    ///
    /// # Errors
    /// A database failure.
    pub async fn history_count(&self, name: &str, group: &str, state: RolloutState) -> Result<u64> {
        let key = (name.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| {
                    let n: i64 = c.query_row(
                        "SELECT COUNT(*) FROM rollout_history h JOIN rollouts r ON r.id = h.rollout_id
                         WHERE r.name = ?1 AND r.device_group = ?2 AND h.state = ?3",
                        params![key.0, key.1, state_str(state)],
                        |r| r.get(0),
                    )?;
                    Ok(u64::try_from(n).unwrap_or(0))
                })
                .await
            }
            Db::Postgres(db) => db.history_count(&key.0, &key.1, state).await,
        }
    }

    /// How many rows reference the artifact `archive_sha256`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn references(&self, archive_sha256: &str) -> Result<u64> {
        let sha = archive_sha256.to_owned();
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| {
                    let n: i64 = c.query_row(
                        "SELECT COUNT(*) FROM model_versions WHERE archive_sha256 = ?1",
                        [&sha],
                        |r| r.get(0),
                    )?;
                    Ok(u64::try_from(n).unwrap_or(0))
                })
                .await
            }
            Db::Postgres(db) => db.references(&sha).await,
        }
    }
}

fn parse_stage(text: String) -> Result<Stage> {
    Stage::parse(&text).ok_or(DbError::Stored {
        column: "model_versions.stage",
        value: text,
    })
}

// ---------------------------------------------------------------- SQLite

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Cloneable handle to the registry's SQLite worker thread; the thread ends
/// when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct SqliteDb {
    tx: mpsc::Sender<Job>,
}

impl SqliteDb {
    async fn open(path: &Path) -> Result<SqliteDb> {
        let path = path.to_owned();
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE_CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("cloud-sync-registry".to_owned())
            .spawn(move || match sqlite_open(&path) {
                Ok(mut conn) => {
                    let _ = ready_tx.send(Ok(()));
                    while let Some(job) = rx.blocking_recv() {
                        job(&mut conn);
                    }
                }
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                }
            })
            .map_err(DbError::Spawn)?;
        ready_rx.await.map_err(|_| DbError::Closed)??;
        Ok(SqliteDb { tx })
    }

    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |conn| {
                let _ = reply.send(job(conn));
            }))
            .await
            .map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }
}

fn sqlite_open(path: &Path) -> Result<Connection> {
    let open_err = |source| DbError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let _mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    crate::migrate::sqlite(&mut conn, "registry", SQLITE_MIGRATIONS)?;
    Ok(conn)
}

fn sqlite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(VersionRow, String)> {
    let stage: String = r.get(3)?;
    let size: i64 = r.get(6)?;
    Ok((
        VersionRow {
            name: r.get(0)?,
            version: r.get(1)?,
            device_group: r.get(2)?,
            stage: Stage::Staging,
            archive_sha256: r.get(4)?,
            model_sha256: r.get(5)?,
            size_bytes: u64::try_from(size).unwrap_or(0),
            signature: r.get(7)?,
            key_id: r.get(8)?,
            created_ms: r.get(9)?,
            stage_changed_ms: r.get(10)?,
            training_run: r.get(11)?,
            dataset: r.get(12)?,
        },
        stage,
    ))
}

fn with_stage((mut row, stage): (VersionRow, String)) -> Result<VersionRow> {
    row.stage = parse_stage(stage)?;
    Ok(row)
}

fn sqlite_get(
    c: &Connection,
    name: &str,
    version: &str,
    group: &str,
) -> Result<Option<VersionRow>> {
    c.query_row(
        &format!(
            "SELECT {COLUMNS} FROM model_versions
             WHERE name = ?1 AND version = ?2 AND device_group = ?3"
        ),
        params![name, version, group],
        sqlite_row,
    )
    .optional()?
    .map(with_stage)
    .transpose()
}

fn sqlite_insert(c: &mut Connection, row: &VersionRow) -> Result<Inserted> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(existing) = sqlite_get(&tx, &row.name, &row.version, &row.device_group)? {
        return Ok(Inserted::Existing(Box::new(existing)));
    }
    tx.execute(
        &format!(
            "INSERT INTO model_versions ({COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ),
        params![
            row.name,
            row.version,
            row.device_group,
            row.stage.as_str(),
            row.archive_sha256,
            row.model_sha256,
            i64::try_from(row.size_bytes).unwrap_or(i64::MAX),
            row.signature,
            row.key_id,
            row.created_ms,
            row.stage_changed_ms,
            row.training_run,
            row.dataset,
        ],
    )?;
    tx.commit()?;
    Ok(Inserted::New)
}

fn sqlite_list(c: &mut Connection, name: Option<&str>) -> Result<Vec<VersionRow>> {
    let mut stmt = c.prepare(&format!(
        "SELECT {COLUMNS} FROM model_versions WHERE ?1 IS NULL OR name = ?1"
    ))?;
    let rows = stmt
        .query_map([name], sqlite_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(with_stage).collect()
}

fn sqlite_production(c: &Connection, name: &str, group: &str) -> Result<Option<VersionRow>> {
    c.query_row(
        &format!(
            "SELECT {COLUMNS} FROM model_versions
             WHERE name = ?1 AND device_group = ?2 AND stage = 'production'"
        ),
        params![name, group],
        sqlite_row,
    )
    .optional()?
    .map(with_stage)
    .transpose()
}

fn sqlite_groups_of(c: &Connection, name: &str, version: &str) -> Result<Vec<String>> {
    let mut stmt = c.prepare(
        "SELECT device_group FROM model_versions WHERE name = ?1 AND version = ?2
         ORDER BY device_group",
    )?;
    let groups = stmt
        .query_map(params![name, version], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(groups)
}

const ROLLOUT_COLUMNS: &str = "id, name, device_group, version, previous, percent, halt_share, \
     state, adopted, rolled_back, started_ms, updated_ms, peak_percent";

/// A `rollouts` row as read, before its state and numbers are checked.
type RawRollout = (
    i64,
    String,
    String,
    String,
    Option<String>,
    i64,
    f64,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
);

fn rollout_from(raw: RawRollout) -> Result<RolloutRow> {
    let (id, name, device_group, version, previous, percent, halt_share, state, a, b, s, u, peak) =
        raw;
    let stored = |column: &'static str, value: String| DbError::Stored { column, value };
    Ok(RolloutRow {
        id,
        name,
        device_group,
        version,
        previous,
        percent: u8::try_from(percent)
            .map_err(|_| stored("rollouts.percent", percent.to_string()))?,
        peak_percent: u8::try_from(peak)
            .map_err(|_| stored("rollouts.peak_percent", peak.to_string()))?,
        halt_share,
        state: parse_state(&state).ok_or_else(|| stored("rollouts.state", state.clone()))?,
        adopted: u64::try_from(a).unwrap_or(0),
        rolled_back: u64::try_from(b).unwrap_or(0),
        started_ms: s,
        updated_ms: u,
    })
}

fn sqlite_raw_rollout(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRollout> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
    ))
}

fn sqlite_rollout_where(
    c: &Connection,
    condition: &str,
    args: impl rusqlite::Params,
) -> Result<Option<RolloutRow>> {
    c.query_row(
        &format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE {condition} ORDER BY id DESC LIMIT 1"
        ),
        args,
        sqlite_raw_rollout,
    )
    .optional()?
    .map(rollout_from)
    .transpose()
}

fn sqlite_latest_rollout(c: &Connection, name: &str, group: &str) -> Result<Option<RolloutRow>> {
    sqlite_rollout_where(c, "name = ?1 AND device_group = ?2", params![name, group])
}

fn sqlite_active_rollout(c: &Connection, name: &str, group: &str) -> Result<Option<RolloutRow>> {
    sqlite_rollout_where(
        c,
        "name = ?1 AND device_group = ?2 AND state = 'active'",
        params![name, group],
    )
}

fn sqlite_rollout_by_id(c: &Connection, id: i64) -> Result<RolloutRow> {
    sqlite_rollout_where(c, "id = ?1", params![id])?.ok_or(DbError::Closed)
}

/// A new `rollouts` row and its first history entry.
struct NewRollout<'a> {
    name: &'a str,
    group: &'a str,
    version: &'a str,
    previous: Option<&'a str>,
    percent: u8,
    halt_share: f64,
    state: RolloutState,
    note: &'a str,
}

fn sqlite_insert_rollout(c: &Connection, new: &NewRollout<'_>, now_ms: i64) -> Result<RolloutRow> {
    let row = c
        .query_row(
            &format!(
                "INSERT INTO rollouts (name, device_group, version, previous, percent, peak_percent,
                     halt_share, state, started_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8, ?8)
                 RETURNING {ROLLOUT_COLUMNS}"
            ),
            params![
                new.name,
                new.group,
                new.version,
                new.previous,
                i64::from(new.percent),
                new.halt_share,
                state_str(new.state),
                now_ms
            ],
            sqlite_raw_rollout,
        )
        .map_err(DbError::from)
        .and_then(rollout_from)?;
    sqlite_history(c, &row, now_ms, "operator", new.note)?;
    Ok(row)
}

fn sqlite_history(
    c: &Connection,
    row: &RolloutRow,
    now_ms: i64,
    actor: &str,
    note: &str,
) -> Result<()> {
    c.execute(
        "INSERT INTO rollout_history (rollout_id, at_ms, state, percent, actor, note)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            row.id,
            now_ms,
            state_str(row.state),
            i64::from(row.percent),
            actor,
            note
        ],
    )?;
    Ok(())
}

/// Archives the pair's production version and promotes `version`, in the
/// caller's transaction; returns the archived version.
fn sqlite_promote_in(
    c: &Connection,
    name: &str,
    version: &str,
    group: &str,
    now_ms: i64,
) -> Result<Option<String>> {
    let archived = c
        .query_row(
            "UPDATE model_versions SET stage = 'archived', stage_changed_ms = ?3
             WHERE name = ?1 AND device_group = ?2 AND stage = 'production'
             RETURNING version",
            params![name, group, now_ms],
            |r| r.get::<_, String>(0),
        )
        .optional()?;
    c.execute(
        "UPDATE model_versions SET stage = 'production', stage_changed_ms = ?4
         WHERE name = ?1 AND version = ?2 AND device_group = ?3",
        params![name, version, group, now_ms],
    )?;
    Ok(archived)
}

fn sqlite_promote(
    c: &mut Connection,
    name: &str,
    version: &str,
    group: &str,
    percent: u8,
    halt_share: f64,
    now_ms: i64,
) -> Result<Changed> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(current) = sqlite_get(&tx, name, version, group)? else {
        let groups = sqlite_groups_of(&tx, name, version)?;
        return Ok(Changed::Unknown { groups });
    };
    if let Some(active) = sqlite_active_rollout(&tx, name, group)? {
        return Ok(Changed::InProgress(Box::new(active)));
    }
    let previous = sqlite_production(&tx, name, group)?.map(|p| p.version);
    if previous.as_deref() == Some(version) {
        return Ok(Changed::Done {
            row: Box::new(current),
            archived: None,
            rollout: None,
        });
    }
    let mut new = NewRollout {
        name,
        group,
        version,
        previous: previous.as_deref(),
        percent,
        halt_share,
        state: RolloutState::Active,
        note: "staged rollout started",
    };
    if percent < FULL_PERCENT && previous.is_some() {
        let rollout = sqlite_insert_rollout(&tx, &new, now_ms)?;
        tx.commit()?;
        return Ok(Changed::Done {
            row: Box::new(current),
            archived: None,
            rollout: Some(Box::new(rollout)),
        });
    }
    let archived = sqlite_promote_in(&tx, name, version, group, now_ms)?;
    new.percent = FULL_PERCENT;
    new.state = RolloutState::Complete;
    new.note = "promoted";
    sqlite_insert_rollout(&tx, &new, now_ms)?;
    let row = sqlite_get(&tx, name, version, group)?.ok_or(DbError::Closed)?;
    tx.commit()?;
    Ok(Changed::Done {
        row: Box::new(row),
        archived,
        rollout: None,
    })
}

fn involves(rollout: &RolloutRow, version: &str) -> bool {
    rollout.version == version || rollout.previous.as_deref() == Some(version)
}

fn sqlite_archive(
    c: &mut Connection,
    name: &str,
    version: &str,
    group: &str,
    now_ms: i64,
) -> Result<Changed> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(current) = sqlite_get(&tx, name, version, group)? else {
        let groups = sqlite_groups_of(&tx, name, version)?;
        return Ok(Changed::Unknown { groups });
    };
    if let Some(active) = sqlite_active_rollout(&tx, name, group)?
        && involves(&active, version)
    {
        return Ok(Changed::InProgress(Box::new(active)));
    }
    if current.stage != Stage::Archived {
        tx.execute(
            "UPDATE model_versions SET stage = 'archived', stage_changed_ms = ?4
             WHERE name = ?1 AND version = ?2 AND device_group = ?3",
            params![name, version, group, now_ms],
        )?;
    }
    let row = sqlite_get(&tx, name, version, group)?.ok_or(DbError::Closed)?;
    tx.commit()?;
    Ok(Changed::Done {
        row: Box::new(row),
        archived: None,
        rollout: None,
    })
}

fn sqlite_widen(
    c: &mut Connection,
    name: &str,
    group: &str,
    percent: u8,
    now_ms: i64,
) -> Result<Widened> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(active) = sqlite_active_rollout(&tx, name, group)? else {
        return Ok(Widened::NoActive);
    };
    let mut archived = None;
    let (state, note) = if percent >= FULL_PERCENT {
        archived = sqlite_promote_in(&tx, name, &active.version, group, now_ms)?;
        (RolloutState::Complete, "rollout complete")
    } else {
        (RolloutState::Active, "rollout percentage changed")
    };
    tx.execute(
        "UPDATE rollouts SET percent = ?2, peak_percent = MAX(peak_percent, ?2), state = ?3,
             updated_ms = ?4
         WHERE id = ?1",
        params![
            active.id,
            i64::from(percent.min(FULL_PERCENT)),
            state_str(state),
            now_ms
        ],
    )?;
    let rollout = sqlite_rollout_by_id(&tx, active.id)?;
    sqlite_history(&tx, &rollout, now_ms, "operator", note)?;
    tx.commit()?;
    Ok(Widened::Done {
        rollout: Box::new(rollout),
        archived,
    })
}

fn sqlite_rollback(c: &mut Connection, name: &str, group: &str, now_ms: i64) -> Result<RolledBack> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let latest = sqlite_latest_rollout(&tx, name, group)?;
    let production = sqlite_production(&tx, name, group)?.map(|p| p.version);
    let Some(production) = production else {
        return Ok(RolledBack::Nothing);
    };
    match &latest {
        Some(r) if r.state == RolloutState::Active => {
            tx.execute(
                "UPDATE rollouts SET state = 'halted', updated_ms = ?2 WHERE id = ?1",
                params![r.id, now_ms],
            )?;
            let halted = sqlite_rollout_by_id(&tx, r.id)?;
            sqlite_history(&tx, &halted, now_ms, "operator", "rolled back by operator")?;
            tx.commit()?;
            return Ok(RolledBack::Halted(Box::new(halted)));
        }
        Some(r)
            if r.state == RolloutState::Halted
                && r.previous.as_deref() == Some(production.as_str()) =>
        {
            return Ok(RolledBack::AlreadyHalted(Box::new(r.clone())));
        }
        _ => {}
    }
    let target = match &latest {
        Some(r) if r.state == RolloutState::Complete && r.version == production => {
            r.previous.clone()
        }
        _ => None,
    };
    let target = match target {
        Some(target) => Some(target),
        None => tx
            .query_row(
                "SELECT version FROM model_versions
                 WHERE name = ?1 AND device_group = ?2 AND stage = 'archived' AND version <> ?3
                 ORDER BY stage_changed_ms DESC, created_ms DESC LIMIT 1",
                params![name, group, production],
                |r| r.get::<_, String>(0),
            )
            .optional()?,
    };
    let Some(target) = target else {
        return Ok(RolledBack::Nothing);
    };
    sqlite_promote_in(&tx, name, &target, group, now_ms)?;
    let new = NewRollout {
        name,
        group,
        version: &production,
        previous: Some(&target),
        percent: FULL_PERCENT,
        halt_share: latest.as_ref().map_or(DEFAULT_HALT_SHARE, |r| r.halt_share),
        state: RolloutState::Halted,
        note: "rolled back by operator",
    };
    let rollout = sqlite_insert_rollout(&tx, &new, now_ms)?;
    tx.commit()?;
    Ok(RolledBack::Restored(Box::new(rollout)))
}

fn sqlite_set_shadow(
    c: &mut Connection,
    name: &str,
    group: &str,
    target: Option<(String, u8)>,
    now_ms: i64,
) -> Result<ShadowSet> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    match target {
        None => {
            tx.execute(
                "DELETE FROM shadows WHERE name = ?1 AND device_group = ?2",
                params![name, group],
            )?;
        }
        Some((version, percent)) => {
            if sqlite_get(&tx, name, &version, group)?.is_none() {
                let groups = sqlite_groups_of(&tx, name, &version)?;
                return Ok(ShadowSet::Unknown { groups });
            }
            tx.execute(
                "INSERT INTO shadows (name, device_group, version, percent, set_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name, device_group) DO UPDATE
                 SET version = excluded.version, percent = excluded.percent, set_ms = excluded.set_ms",
                params![name, group, version, i64::from(percent), now_ms],
            )?;
        }
    }
    tx.commit()?;
    Ok(ShadowSet::Done)
}

fn sqlite_device_group(c: &Connection, device: &str) -> Result<Option<String>> {
    Ok(c.query_row(
        "SELECT device_group FROM device_groups WHERE device = ?1",
        [device],
        |r| r.get(0),
    )
    .optional()?)
}

fn sqlite_set_device_group(
    c: &mut Connection,
    device: &str,
    group: Option<&str>,
    now_ms: i64,
) -> Result<Option<String>> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let previous = sqlite_device_group(&tx, device)?;
    match group {
        Some(group) => tx.execute(
            "INSERT INTO device_groups (device, device_group, assigned_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (device) DO UPDATE
             SET device_group = excluded.device_group, assigned_ms = excluded.assigned_ms",
            params![device, group, now_ms],
        )?,
        None => tx.execute("DELETE FROM device_groups WHERE device = ?1", [device])?,
    };
    tx.commit()?;
    Ok(previous)
}

/// The group of a device: its assignment, else the query, else the default.
fn resolve_group(assigned: Option<String>, query_group: Option<&str>) -> String {
    assigned
        .or_else(|| query_group.map(str::to_owned))
        .unwrap_or_else(|| DEFAULT_GROUP.to_owned())
}

/// The group a report counts in: the device's assignment, else the query,
/// else the only group the reported version is registered in, else the
/// default group.
// Design: the report body names no group; the fallback to the version's only
// group keeps reports of agents that do not send `group` counting.
fn report_group(
    assigned: Option<String>,
    query_group: Option<&str>,
    mut version_groups: Vec<String>,
) -> String {
    if assigned.is_none() && query_group.is_none() && version_groups.len() == 1 {
        return version_groups
            .pop()
            .unwrap_or_else(|| DEFAULT_GROUP.to_owned());
    }
    resolve_group(assigned, query_group)
}

fn sqlite_view(
    c: &mut Connection,
    name: &str,
    device: Option<&str>,
    query_group: Option<&str>,
) -> Result<ViewRows> {
    // A read transaction: one snapshot for every statement.
    let tx = c.transaction()?;
    let assigned = match device {
        Some(device) => sqlite_device_group(&tx, device)?,
        None => None,
    };
    let group = resolve_group(assigned, query_group);
    let production = sqlite_production(&tx, name, &group)?;
    let rollout = sqlite_latest_rollout(&tx, name, &group)?;
    let candidate = match &rollout {
        Some(r) if r.state == RolloutState::Active => sqlite_get(&tx, name, &r.version, &group)?,
        _ => None,
    };
    let target = tx
        .query_row(
            "SELECT version, percent FROM shadows WHERE name = ?1 AND device_group = ?2",
            params![name, group],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()?;
    let shadow = match target {
        Some((version, percent)) => sqlite_get(&tx, name, &version, &group)?.map(|row| {
            (
                ShadowTarget {
                    version,
                    percent: u8::try_from(percent).unwrap_or(FULL_PERCENT),
                },
                row,
            )
        }),
        None => None,
    };
    tx.commit()?;
    Ok(ViewRows {
        group,
        production,
        rollout,
        candidate,
        shadow,
    })
}

const COUNTS_SQL_SQLITE: &str = "SELECT
    (SELECT COUNT(*) FROM rollout_reports a WHERE a.rollout_id = ?1 AND a.event = 'adopted'
        AND NOT EXISTS (SELECT 1 FROM rollout_reports b WHERE b.rollout_id = ?1
            AND b.event = 'rolled_back' AND b.device = a.device)),
    (SELECT COUNT(*) FROM rollout_reports WHERE rollout_id = ?1 AND event = 'rolled_back')";

fn sqlite_report(c: &mut Connection, row: &ReportRow, now_ms: i64) -> Result<Reported> {
    let report = &row.report;
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let groups = sqlite_groups_of(&tx, &report.model, &report.version)?;
    if groups.is_empty() {
        return Ok(Reported::Unknown);
    }
    let group = report_group(
        sqlite_device_group(&tx, &row.device)?,
        row.query_group.as_deref(),
        groups,
    );
    let rollout =
        sqlite_latest_rollout(&tx, &report.model, &group)?.filter(|r| r.version == report.version);
    tx.execute(
        "INSERT INTO rollout_reports (device, name, version, event, device_group, rollout_id,
             sha256, reason, at_ms, received_ms, shadow)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (device, name, version, event) DO UPDATE SET
             device_group = excluded.device_group, rollout_id = excluded.rollout_id,
             sha256 = excluded.sha256, reason = excluded.reason, at_ms = excluded.at_ms,
             received_ms = excluded.received_ms, shadow = excluded.shadow",
        params![
            row.device,
            report.model,
            report.version,
            report.event.as_str(),
            group,
            rollout.as_ref().map(|r| r.id),
            report.sha256,
            report.reason,
            report.at_ms,
            now_ms,
            row.shadow_json,
        ],
    )?;
    let mut halted_now = false;
    let rollout = match rollout {
        None => None,
        Some(r) => {
            let (adopted, rolled_back): (i64, i64) =
                tx.query_row(COUNTS_SQL_SQLITE, [r.id], |x| Ok((x.get(0)?, x.get(1)?)))?;
            halted_now = r.state == RolloutState::Active
                && should_halt(
                    u64::try_from(adopted).unwrap_or(0),
                    u64::try_from(rolled_back).unwrap_or(0),
                    r.halt_share,
                );
            let state = if halted_now {
                RolloutState::Halted
            } else {
                r.state
            };
            tx.execute(
                "UPDATE rollouts SET adopted = ?2, rolled_back = ?3, state = ?4, updated_ms = ?5
                 WHERE id = ?1",
                params![r.id, adopted, rolled_back, state_str(state), now_ms],
            )?;
            let updated = sqlite_rollout_by_id(&tx, r.id)?;
            if halted_now {
                sqlite_history(&tx, &updated, now_ms, "reports", "rollback share exceeded")?;
            }
            Some(Box::new(updated))
        }
    };
    tx.commit()?;
    Ok(Reported::Stored {
        group,
        rollout,
        halted_now,
    })
}

fn event_of(text: String) -> Result<RolloutEvent> {
    RolloutEvent::parse(&text).ok_or(DbError::Stored {
        column: "rollout_reports.event",
        value: text,
    })
}

fn sqlite_overview(c: &mut Connection, name: &str, group: &str) -> Result<OverviewRows> {
    let tx = c.transaction()?;
    let production = sqlite_production(&tx, name, group)?.map(|p| p.version);
    let rollout = sqlite_latest_rollout(&tx, name, group)?;
    let version = rollout
        .as_ref()
        .map(|r| r.version.clone())
        .or_else(|| production.clone());
    let mut events = Vec::new();
    let mut reasons = Vec::new();
    if let Some(version) = &version {
        let mut stmt = tx.prepare(
            "SELECT event, COUNT(*) FROM rollout_reports
             WHERE name = ?1 AND version = ?2 AND device_group = ?3 GROUP BY event ORDER BY event",
        )?;
        for item in stmt.query_map(params![name, version, group], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (event, n) = item?;
            events.push((event, u64::try_from(n).unwrap_or(0)));
        }
        let mut stmt = tx.prepare(
            "SELECT device, version, event, reason, at_ms FROM rollout_reports
             WHERE name = ?1 AND version = ?2 AND device_group = ?3
               AND event IN ('rolled_back', 'refused') AND reason IS NOT NULL
             ORDER BY received_ms DESC, at_ms DESC, device LIMIT ?4",
        )?;
        let limit = i64::try_from(RECENT_REASONS).unwrap_or(10);
        let rows = stmt
            .query_map(params![name, version, group, limit], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (device, version, event, reason, at_ms) in rows {
            reasons.push(ReportReason {
                device,
                version,
                event: event_of(event)?,
                reason,
                at_ms,
            });
        }
    }
    let shadow = tx
        .query_row(
            "SELECT version, percent FROM shadows WHERE name = ?1 AND device_group = ?2",
            params![name, group],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()?
        .map(|(version, percent)| ShadowTarget {
            version,
            percent: u8::try_from(percent).unwrap_or(FULL_PERCENT),
        });
    tx.commit()?;
    Ok(OverviewRows {
        production,
        rollout,
        events,
        shadow,
        reasons,
    })
}

// ------------------------------------------------------------ PostgreSQL

const PG_MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(
    hashtextextended('cloud-sync registry migrations ' || COALESCE(current_schema(), ''), 0))";
const PG_GROUP_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('cloud-sync model ' || $1 || '/' || $2, 0))";

/// Handle to a few pooled PostgreSQL connections.
#[derive(Clone)]
pub struct PgDb {
    config: tokio_postgres::Config,
    permits: Arc<Semaphore>,
    idle: Arc<Mutex<Vec<Client>>>,
}

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDb")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn pg_row(r: &tokio_postgres::Row) -> Result<VersionRow> {
    let size: i64 = r.try_get(6)?;
    Ok(VersionRow {
        name: r.try_get(0)?,
        version: r.try_get(1)?,
        device_group: r.try_get(2)?,
        stage: parse_stage(r.try_get(3)?)?,
        archive_sha256: r.try_get(4)?,
        model_sha256: r.try_get(5)?,
        size_bytes: u64::try_from(size).unwrap_or(0),
        signature: r.try_get(7)?,
        key_id: r.try_get(8)?,
        created_ms: r.try_get(9)?,
        stage_changed_ms: r.try_get(10)?,
        training_run: r.try_get(11)?,
        dataset: r.try_get(12)?,
    })
}

impl PgDb {
    async fn open(settings: &PostgresSettings) -> Result<PgDb> {
        let db = PgDb {
            config: settings.config.clone(),
            permits: Arc::new(Semaphore::new(
                MAX_PG_CONNECTIONS.min(settings.max_connections.max(1)),
            )),
            idle: Arc::new(Mutex::new(Vec::new())),
        };
        let (mut conn, permit) = db.lease().await?;
        let result: Result<()> = async {
            let client = &mut conn;
            crate::migrate::postgres(client, "registry", PG_MIGRATION_LOCK, PG_MIGRATIONS).await?;
            Ok(())
        }
        .await;
        db.give_back(conn, &result);
        drop(permit);
        result?;
        Ok(db)
    }

    /// A pooled connection (opened on demand) and the permit allowing it.
    async fn lease(&self) -> Result<(Client, tokio::sync::SemaphorePermit<'_>)> {
        let permit = self.permits.acquire().await.map_err(|_| DbError::Closed)?;
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match idle {
            Some(client) => client,
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::warn!(error = %err, "registry postgresql connection failed");
                    }
                });
                client
            }
        };
        Ok((client, permit))
    }

    /// Returns a connection after its operation ended with `result`; a
    /// connection whose operation failed is closed, not reused (one whose
    /// future was dropped mid-way is never returned at all).
    fn give_back<T>(&self, client: Client, result: &Result<T>) {
        if result.is_ok() && !client.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(client);
        }
    }

    async fn insert(&self, row: &VersionRow) -> Result<Inserted> {
        let (mut conn, _permit) = self.lease().await?;
        let result: Result<_> = async {
            let client = &mut conn;
            let tx = client.transaction().await?;
            tx.execute(PG_GROUP_LOCK, &[&row.name, &row.device_group])
                .await?;
            let existing = tx
                .query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM model_versions
                         WHERE name = $1 AND version = $2 AND device_group = $3"
                    ),
                    &[&row.name, &row.version, &row.device_group],
                )
                .await?;
            if let Some(existing) = existing {
                return Ok(Inserted::Existing(Box::new(pg_row(&existing)?)));
            }
            let size = i64::try_from(row.size_bytes).unwrap_or(i64::MAX);
            tx.execute(
                &format!(
                    "INSERT INTO model_versions ({COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
                ),
                &[
                    &row.name,
                    &row.version,
                    &row.device_group,
                    &row.stage.as_str(),
                    &row.archive_sha256,
                    &row.model_sha256,
                    &size,
                    &row.signature,
                    &row.key_id,
                    &row.created_ms,
                    &row.stage_changed_ms,
                    &row.training_run,
                    &row.dataset,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(Inserted::New)
        }
        .await;
        self.give_back(conn, &result);
        result
    }

    async fn list(&self, name: Option<&str>) -> Result<Vec<VersionRow>> {
        let (mut conn, _permit) = self.lease().await?;
        let result: Result<_> = async {
            let client = &mut conn;
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM model_versions
                         WHERE $1::text IS NULL OR name = $1"
                    ),
                    &[&name],
                )
                .await?;
            rows.iter().map(pg_row).collect()
        }
        .await;
        self.give_back(conn, &result);
        result
    }

    async fn production(&self, name: &str, group: &str) -> Result<Option<VersionRow>> {
        let (mut conn, _permit) = self.lease().await?;
        let result: Result<_> = async {
            let client = &mut conn;
            let row = client
                .query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM model_versions
                         WHERE name = $1 AND device_group = $2 AND stage = 'production'"
                    ),
                    &[&name, &group],
                )
                .await?;
            row.as_ref().map(pg_row).transpose()
        }
        .await;
        self.give_back(conn, &result);
        result
    }

    async fn references(&self, sha: &str) -> Result<u64> {
        let (mut conn, _permit) = self.lease().await?;
        let result: Result<_> = async {
            let client = &mut conn;
            let n: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM model_versions WHERE archive_sha256 = $1",
                    &[&sha],
                )
                .await?
                .try_get(0)?;
            Ok(u64::try_from(n).unwrap_or(0))
        }
        .await;
        self.give_back(conn, &result);
        result
    }

    /// Runs `job` on a leased connection and gives the connection back.
    async fn with<T, F>(&self, job: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut Client) -> Result<T>,
    {
        let (mut conn, _permit) = self.lease().await?;
        let result = job(&mut conn).await;
        self.give_back(conn, &result);
        result
    }

    async fn promote(
        &self,
        name: &str,
        version: &str,
        group: &str,
        percent: u8,
        halt_share: f64,
        now_ms: i64,
    ) -> Result<Changed> {
        self.with(async |client| {
            let tx = client.transaction().await?;
            // Design: READ COMMITTED statements after the lock see every
            // promotion of this (name, group) committed before it.
            tx.execute(PG_GROUP_LOCK, &[&name, &group]).await?;
            let Some(current) = pg_get(&tx, name, version, group).await? else {
                let groups = pg_groups_of(&tx, name, version).await?;
                return Ok(Changed::Unknown { groups });
            };
            if let Some(active) = pg_active_rollout(&tx, name, group).await? {
                return Ok(Changed::InProgress(Box::new(active)));
            }
            let previous = pg_production(&tx, name, group).await?.map(|p| p.version);
            if previous.as_deref() == Some(version) {
                return Ok(Changed::Done {
                    row: Box::new(current),
                    archived: None,
                    rollout: None,
                });
            }
            let mut new = NewRollout {
                name,
                group,
                version,
                previous: previous.as_deref(),
                percent,
                halt_share,
                state: RolloutState::Active,
                note: "staged rollout started",
            };
            if percent < FULL_PERCENT && previous.is_some() {
                let rollout = pg_insert_rollout(&tx, &new, now_ms).await?;
                tx.commit().await?;
                return Ok(Changed::Done {
                    row: Box::new(current),
                    archived: None,
                    rollout: Some(Box::new(rollout)),
                });
            }
            let archived = pg_promote_in(&tx, name, version, group, now_ms).await?;
            new.percent = FULL_PERCENT;
            new.state = RolloutState::Complete;
            new.note = "promoted";
            pg_insert_rollout(&tx, &new, now_ms).await?;
            let row = pg_get(&tx, name, version, group)
                .await?
                .ok_or(DbError::Closed)?;
            tx.commit().await?;
            Ok(Changed::Done {
                row: Box::new(row),
                archived,
                rollout: None,
            })
        })
        .await
    }

    async fn archive(
        &self,
        name: &str,
        version: &str,
        group: &str,
        now_ms: i64,
    ) -> Result<Changed> {
        self.with(async |client| {
            let tx = client.transaction().await?;
            tx.execute(PG_GROUP_LOCK, &[&name, &group]).await?;
            let Some(current) = pg_get(&tx, name, version, group).await? else {
                let groups = pg_groups_of(&tx, name, version).await?;
                return Ok(Changed::Unknown { groups });
            };
            if let Some(active) = pg_active_rollout(&tx, name, group).await?
                && involves(&active, version)
            {
                return Ok(Changed::InProgress(Box::new(active)));
            }
            if current.stage != Stage::Archived {
                tx.execute(
                    "UPDATE model_versions SET stage = 'archived', stage_changed_ms = $4
                     WHERE name = $1 AND version = $2 AND device_group = $3",
                    &[&name, &version, &group, &now_ms],
                )
                .await?;
            }
            let row = pg_get(&tx, name, version, group)
                .await?
                .ok_or(DbError::Closed)?;
            tx.commit().await?;
            Ok(Changed::Done {
                row: Box::new(row),
                archived: None,
                rollout: None,
            })
        })
        .await
    }

    async fn widen(&self, name: &str, group: &str, percent: u8, now_ms: i64) -> Result<Widened> {
        self.with(async |client| {
            let tx = client.transaction().await?;
            tx.execute(PG_GROUP_LOCK, &[&name, &group]).await?;
            let Some(active) = pg_active_rollout(&tx, name, group).await? else {
                return Ok(Widened::NoActive);
            };
            let mut archived = None;
            let (state, note) = if percent >= FULL_PERCENT {
                archived = pg_promote_in(&tx, name, &active.version, group, now_ms).await?;
                (RolloutState::Complete, "rollout complete")
            } else {
                (RolloutState::Active, "rollout percentage changed")
            };
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE rollouts SET percent = $2, peak_percent = GREATEST(peak_percent, $2),
                             state = $3, updated_ms = $4
                         WHERE id = $1 RETURNING {ROLLOUT_COLUMNS}"
                    ),
                    &[
                        &active.id,
                        &i32::from(percent.min(FULL_PERCENT)),
                        &state_str(state),
                        &now_ms,
                    ],
                )
                .await?;
            let rollout = pg_rollout(&row)?;
            pg_history(&tx, &rollout, now_ms, "operator", note).await?;
            tx.commit().await?;
            Ok(Widened::Done {
                rollout: Box::new(rollout),
                archived,
            })
        })
        .await
    }

    async fn rollback(&self, name: &str, group: &str, now_ms: i64) -> Result<RolledBack> {
        self.with(async |client| {
            let tx = client.transaction().await?;
            tx.execute(PG_GROUP_LOCK, &[&name, &group]).await?;
            let latest = pg_latest_rollout(&tx, name, group).await?;
            let Some(production) = pg_production(&tx, name, group).await?.map(|p| p.version) else {
                return Ok(RolledBack::Nothing);
            };
            match &latest {
                Some(r) if r.state == RolloutState::Active => {
                    let row = tx
                        .query_one(
                            &format!(
                                "UPDATE rollouts SET state = 'halted', updated_ms = $2 WHERE id = $1
                                 RETURNING {ROLLOUT_COLUMNS}"
                            ),
                            &[&r.id, &now_ms],
                        )
                        .await?;
                    let halted = pg_rollout(&row)?;
                    pg_history(&tx, &halted, now_ms, "operator", "rolled back by operator").await?;
                    tx.commit().await?;
                    return Ok(RolledBack::Halted(Box::new(halted)));
                }
                Some(r)
                    if r.state == RolloutState::Halted
                        && r.previous.as_deref() == Some(production.as_str()) =>
                {
                    return Ok(RolledBack::AlreadyHalted(Box::new(r.clone())));
                }
                _ => {}
            }
            let target = match &latest {
                Some(r) if r.state == RolloutState::Complete && r.version == production => {
                    r.previous.clone()
                }
                _ => None,
            };
            let target = match target {
                Some(target) => Some(target),
                None => tx
                    .query_opt(
                        "SELECT version FROM model_versions
                         WHERE name = $1 AND device_group = $2 AND stage = 'archived'
                           AND version <> $3
                         ORDER BY stage_changed_ms DESC, created_ms DESC LIMIT 1",
                        &[&name, &group, &production],
                    )
                    .await?
                    .map(|r| r.try_get::<_, String>(0))
                    .transpose()?,
            };
            let Some(target) = target else {
                return Ok(RolledBack::Nothing);
            };
            pg_promote_in(&tx, name, &target, group, now_ms).await?;
            let new = NewRollout {
                name,
                group,
                version: &production,
                previous: Some(&target),
                percent: FULL_PERCENT,
                halt_share: latest.as_ref().map_or(DEFAULT_HALT_SHARE, |r| r.halt_share),
                state: RolloutState::Halted,
                note: "rolled back by operator",
            };
            let rollout = pg_insert_rollout(&tx, &new, now_ms).await?;
            tx.commit().await?;
            Ok(RolledBack::Restored(Box::new(rollout)))
        })
        .await
    }

    async fn set_shadow(
        &self,
        name: &str,
        group: &str,
        target: Option<(String, u8)>,
        now_ms: i64,
    ) -> Result<ShadowSet> {
        self.with(async |client| {
            let tx = client.transaction().await?;
            tx.execute(PG_GROUP_LOCK, &[&name, &group]).await?;
            match target {
                None => {
                    tx.execute(
                        "DELETE FROM shadows WHERE name = $1 AND device_group = $2",
                        &[&name, &group],
                    )
                    .await?;
                }
                Some((version, percent)) => {
                    if pg_get(&tx, name, &version, group).await?.is_none() {
                        let groups = pg_groups_of(&tx, name, &version).await?;
                        return Ok(ShadowSet::Unknown { groups });
                    }
                    tx.execute(
                        "INSERT INTO shadows (name, device_group, version, percent, set_ms)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (name, device_group) DO UPDATE
                         SET version = excluded.version, percent = excluded.percent,
                             set_ms = excluded.set_ms",
                        &[&name, &group, &version, &i32::from(percent), &now_ms],
                    )
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(ShadowSet::Done)
        })
        .await
    }

    async fn device_group(&self, device: &str) -> Result<Option<String>> {
        self.with(async |client| pg_device_group(&*client, device).await)
            .await
    }

    async fn set_device_group(
        &self,
        device: &str,
        group: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<String>> {
        self.with(async |client| {
            let tx = client.transaction().await?;
            let previous = tx
                .query_opt(
                    "SELECT device_group FROM device_groups WHERE device = $1 FOR UPDATE",
                    &[&device],
                )
                .await?
                .map(|r| r.try_get::<_, String>(0))
                .transpose()?;
            match group {
                Some(group) => {
                    tx.execute(
                        "INSERT INTO device_groups (device, device_group, assigned_ms)
                         VALUES ($1, $2, $3)
                         ON CONFLICT (device) DO UPDATE
                         SET device_group = excluded.device_group,
                             assigned_ms = excluded.assigned_ms",
                        &[&device, &group, &now_ms],
                    )
                    .await?;
                }
                None => {
                    tx.execute("DELETE FROM device_groups WHERE device = $1", &[&device])
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(previous)
        })
        .await
    }

    async fn view(
        &self,
        name: &str,
        device: Option<&str>,
        query_group: Option<&str>,
    ) -> Result<ViewRows> {
        self.with(async |client| {
            // One snapshot for every statement.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let assigned = match device {
                Some(device) => pg_device_group(&tx, device).await?,
                None => None,
            };
            let group = resolve_group(assigned, query_group);
            let production = pg_production(&tx, name, &group).await?;
            let rollout = pg_latest_rollout(&tx, name, &group).await?;
            let candidate = match &rollout {
                Some(r) if r.state == RolloutState::Active => {
                    pg_get(&tx, name, &r.version, &group).await?
                }
                _ => None,
            };
            let shadow = match pg_shadow(&tx, name, &group).await? {
                Some(target) => pg_get(&tx, name, &target.version, &group)
                    .await?
                    .map(|row| (target, row)),
                None => None,
            };
            tx.commit().await?;
            Ok(ViewRows {
                group,
                production,
                rollout,
                candidate,
                shadow,
            })
        })
        .await
    }

    async fn report(&self, row: &ReportRow, now_ms: i64) -> Result<Reported> {
        let report = &row.report;
        self.with(async |client| {
            let tx = client.transaction().await?;
            let groups = pg_groups_of(&tx, &report.model, &report.version).await?;
            if groups.is_empty() {
                return Ok(Reported::Unknown);
            }
            let group = report_group(
                pg_device_group(&tx, &row.device).await?,
                row.query_group.as_deref(),
                groups,
            );
            // Design: the lock serialises reports and operator changes of the
            // pair across instances, so the recount below sees every report
            // committed before it and exactly one report halts a rollout.
            tx.execute(PG_GROUP_LOCK, &[&report.model, &group]).await?;
            let rollout = pg_latest_rollout(&tx, &report.model, &group)
                .await?
                .filter(|r| r.version == report.version);
            tx.execute(
                "INSERT INTO rollout_reports (device, name, version, event, device_group,
                     rollout_id, sha256, reason, at_ms, received_ms, shadow)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (device, name, version, event) DO UPDATE SET
                     device_group = excluded.device_group, rollout_id = excluded.rollout_id,
                     sha256 = excluded.sha256, reason = excluded.reason, at_ms = excluded.at_ms,
                     received_ms = excluded.received_ms, shadow = excluded.shadow",
                &[
                    &row.device,
                    &report.model,
                    &report.version,
                    &report.event.as_str(),
                    &group,
                    &rollout.as_ref().map(|r| r.id),
                    &report.sha256,
                    &report.reason,
                    &report.at_ms,
                    &now_ms,
                    &row.shadow_json,
                ],
            )
            .await?;
            let mut halted_now = false;
            let rollout = match rollout {
                None => None,
                Some(r) => {
                    let counts = tx.query_one(COUNTS_SQL_PG, &[&r.id]).await?;
                    let adopted: i64 = counts.try_get(0)?;
                    let rolled_back: i64 = counts.try_get(1)?;
                    halted_now = r.state == RolloutState::Active
                        && should_halt(
                            u64::try_from(adopted).unwrap_or(0),
                            u64::try_from(rolled_back).unwrap_or(0),
                            r.halt_share,
                        );
                    let state = if halted_now {
                        RolloutState::Halted
                    } else {
                        r.state
                    };
                    let updated = tx
                        .query_one(
                            &format!(
                                "UPDATE rollouts SET adopted = $2, rolled_back = $3, state = $4,
                                     updated_ms = $5
                                 WHERE id = $1 RETURNING {ROLLOUT_COLUMNS}"
                            ),
                            &[&r.id, &adopted, &rolled_back, &state_str(state), &now_ms],
                        )
                        .await?;
                    let updated = pg_rollout(&updated)?;
                    if halted_now {
                        pg_history(&tx, &updated, now_ms, "reports", "rollback share exceeded")
                            .await?;
                    }
                    Some(Box::new(updated))
                }
            };
            tx.commit().await?;
            Ok(Reported::Stored {
                group,
                rollout,
                halted_now,
            })
        })
        .await
    }

    async fn overview(&self, name: &str, group: &str) -> Result<OverviewRows> {
        self.with(async |client| {
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let production = pg_production(&tx, name, group).await?.map(|p| p.version);
            let rollout = pg_latest_rollout(&tx, name, group).await?;
            let version = rollout
                .as_ref()
                .map(|r| r.version.clone())
                .or_else(|| production.clone());
            let mut events = Vec::new();
            let mut reasons = Vec::new();
            if let Some(version) = &version {
                for r in tx
                    .query(
                        "SELECT event, COUNT(*) FROM rollout_reports
                         WHERE name = $1 AND version = $2 AND device_group = $3
                         GROUP BY event ORDER BY event COLLATE \"C\"",
                        &[&name, version, &group],
                    )
                    .await?
                {
                    let n: i64 = r.try_get(1)?;
                    events.push((r.try_get::<_, String>(0)?, u64::try_from(n).unwrap_or(0)));
                }
                let limit = i64::try_from(RECENT_REASONS).unwrap_or(10);
                for r in tx
                    .query(
                        "SELECT device, version, event, reason, at_ms FROM rollout_reports
                         WHERE name = $1 AND version = $2 AND device_group = $3
                           AND event IN ('rolled_back', 'refused') AND reason IS NOT NULL
                         ORDER BY received_ms DESC, at_ms DESC, device COLLATE \"C\" LIMIT $4",
                        &[&name, version, &group, &limit],
                    )
                    .await?
                {
                    reasons.push(ReportReason {
                        device: r.try_get(0)?,
                        version: r.try_get(1)?,
                        event: event_of(r.try_get(2)?)?,
                        reason: r.try_get(3)?,
                        at_ms: r.try_get(4)?,
                    });
                }
            }
            let shadow = pg_shadow(&tx, name, group).await?;
            tx.commit().await?;
            Ok(OverviewRows {
                production,
                rollout,
                events,
                shadow,
                reasons,
            })
        })
        .await
    }

    async fn history_count(&self, name: &str, group: &str, state: RolloutState) -> Result<u64> {
        self.with(async |client| {
            let n: i64 = client
                .query_one(
                    "SELECT COUNT(*) FROM rollout_history h JOIN rollouts r ON r.id = h.rollout_id
                     WHERE r.name = $1 AND r.device_group = $2 AND h.state = $3",
                    &[&name, &group, &state_str(state)],
                )
                .await?
                .try_get(0)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
        .await
    }
}

const COUNTS_SQL_PG: &str = "SELECT
    (SELECT COUNT(*) FROM rollout_reports a WHERE a.rollout_id = $1 AND a.event = 'adopted'
        AND NOT EXISTS (SELECT 1 FROM rollout_reports b WHERE b.rollout_id = $1
            AND b.event = 'rolled_back' AND b.device = a.device)),
    (SELECT COUNT(*) FROM rollout_reports WHERE rollout_id = $1 AND event = 'rolled_back')";

type PgTx<'a> = tokio_postgres::Transaction<'a>;

async fn pg_get(
    tx: &PgTx<'_>,
    name: &str,
    version: &str,
    group: &str,
) -> Result<Option<VersionRow>> {
    tx.query_opt(
        &format!(
            "SELECT {COLUMNS} FROM model_versions
             WHERE name = $1 AND version = $2 AND device_group = $3"
        ),
        &[&name, &version, &group],
    )
    .await?
    .as_ref()
    .map(pg_row)
    .transpose()
}

async fn pg_production(tx: &PgTx<'_>, name: &str, group: &str) -> Result<Option<VersionRow>> {
    tx.query_opt(
        &format!(
            "SELECT {COLUMNS} FROM model_versions
             WHERE name = $1 AND device_group = $2 AND stage = 'production'"
        ),
        &[&name, &group],
    )
    .await?
    .as_ref()
    .map(pg_row)
    .transpose()
}

async fn pg_groups_of(tx: &PgTx<'_>, name: &str, version: &str) -> Result<Vec<String>> {
    Ok(tx
        .query(
            "SELECT device_group FROM model_versions
             WHERE name = $1 AND version = $2 ORDER BY device_group COLLATE \"C\"",
            &[&name, &version],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<Vec<String>, _>>()?)
}

async fn pg_device_group(
    client: &impl tokio_postgres::GenericClient,
    device: &str,
) -> Result<Option<String>> {
    Ok(client
        .query_opt(
            "SELECT device_group FROM device_groups WHERE device = $1",
            &[&device],
        )
        .await?
        .map(|r| r.try_get::<_, String>(0))
        .transpose()?)
}

async fn pg_shadow(tx: &PgTx<'_>, name: &str, group: &str) -> Result<Option<ShadowTarget>> {
    tx.query_opt(
        "SELECT version, percent FROM shadows WHERE name = $1 AND device_group = $2",
        &[&name, &group],
    )
    .await?
    .map(|r| -> Result<ShadowTarget> {
        let percent: i32 = r.try_get(1)?;
        Ok(ShadowTarget {
            version: r.try_get(0)?,
            percent: u8::try_from(percent).unwrap_or(FULL_PERCENT),
        })
    })
    .transpose()
}

fn pg_rollout(r: &tokio_postgres::Row) -> Result<RolloutRow> {
    let percent: i32 = r.try_get(5)?;
    let peak: i32 = r.try_get(12)?;
    rollout_from((
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
        i64::from(percent),
        r.try_get(6)?,
        r.try_get(7)?,
        r.try_get(8)?,
        r.try_get(9)?,
        r.try_get(10)?,
        r.try_get(11)?,
        i64::from(peak),
    ))
}

async fn pg_rollout_where(
    tx: &PgTx<'_>,
    condition: &str,
    args: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<RolloutRow>> {
    tx.query_opt(
        &format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE {condition} ORDER BY id DESC LIMIT 1"
        ),
        args,
    )
    .await?
    .as_ref()
    .map(pg_rollout)
    .transpose()
}

async fn pg_latest_rollout(tx: &PgTx<'_>, name: &str, group: &str) -> Result<Option<RolloutRow>> {
    pg_rollout_where(tx, "name = $1 AND device_group = $2", &[&name, &group]).await
}

async fn pg_active_rollout(tx: &PgTx<'_>, name: &str, group: &str) -> Result<Option<RolloutRow>> {
    pg_rollout_where(
        tx,
        "name = $1 AND device_group = $2 AND state = 'active'",
        &[&name, &group],
    )
    .await
}

async fn pg_history(
    tx: &PgTx<'_>,
    row: &RolloutRow,
    now_ms: i64,
    actor: &str,
    note: &str,
) -> Result<()> {
    tx.execute(
        "INSERT INTO rollout_history (rollout_id, at_ms, state, percent, actor, note)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &row.id,
            &now_ms,
            &state_str(row.state),
            &i32::from(row.percent),
            &actor,
            &note,
        ],
    )
    .await?;
    Ok(())
}

async fn pg_insert_rollout(tx: &PgTx<'_>, new: &NewRollout<'_>, now_ms: i64) -> Result<RolloutRow> {
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO rollouts (name, device_group, version, previous, percent, peak_percent,
                     halt_share, state, started_ms, updated_ms)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $8)
                 RETURNING {ROLLOUT_COLUMNS}"
            ),
            &[
                &new.name,
                &new.group,
                &new.version,
                &new.previous,
                &i32::from(new.percent),
                &new.halt_share,
                &state_str(new.state),
                &now_ms,
            ],
        )
        .await?;
    let row = pg_rollout(&row)?;
    pg_history(tx, &row, now_ms, "operator", new.note).await?;
    Ok(row)
}

/// Archives the pair's production version and promotes `version`, in the
/// caller's transaction; returns the archived version.
async fn pg_promote_in(
    tx: &PgTx<'_>,
    name: &str,
    version: &str,
    group: &str,
    now_ms: i64,
) -> Result<Option<String>> {
    let archived = tx
        .query_opt(
            "UPDATE model_versions SET stage = 'archived', stage_changed_ms = $3
             WHERE name = $1 AND device_group = $2 AND stage = 'production'
             RETURNING version",
            &[&name, &group, &now_ms],
        )
        .await?
        .map(|r| r.try_get::<_, String>(0))
        .transpose()?;
    tx.execute(
        "UPDATE model_versions SET stage = 'production', stage_changed_ms = $4
         WHERE name = $1 AND version = $2 AND device_group = $3",
        &[&name, &version, &group, &now_ms],
    )
    .await?;
    Ok(archived)
}
