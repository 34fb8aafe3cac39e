//! The registry's tables, on the database the store uses (the same SQLite
//! file or PostgreSQL database), through the registry's own connections.
//!
//! Design: the registry keeps its own connections and its own migration
//! table (`registry_migrations`) instead of adding commands to
//! [`crate::store`]: registry traffic is small (pushes, promotions, and one
//! indexed lookup per agent poll), and the two schemas evolve independently.
//! This module is the only code touching the `model_versions` table.
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

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use sync_protocol::registry::Stage;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

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
    /// The database holds registry migrations this build does not know.
    #[error("registry schema version {found} is newer than this build ({supported})")]
    SchemaTooNew {
        /// Version found.
        found: i64,
        /// Newest known.
        supported: usize,
    },
    /// A stored value is not valid.
    #[error("invalid stored value in model_versions.{column}: {value:?}")]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// No row with that key; the groups the version exists in.
    Unknown {
        /// Groups holding `(name, version)`.
        groups: Vec<String>,
    },
    /// Done: the row after the change, and the version archived by a
    /// promotion.
    Done {
        /// The row after the change.
        row: Box<VersionRow>,
        /// The previous production version of the group, now archived.
        archived: Option<String>,
    },
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

    /// Moves a version to `stage`; to production archives the group's
    /// previous production version in the same transaction.
    ///
    /// # Errors
    /// A database failure.
    pub async fn set_stage(
        &self,
        name: &str,
        version: &str,
        group: &str,
        stage: Stage,
        now_ms: i64,
    ) -> Result<Changed> {
        let key = (name.to_owned(), version.to_owned(), group.to_owned());
        match self {
            Db::Sqlite(db) => {
                db.run(move |c| sqlite_set_stage(c, &key.0, &key.1, &key.2, stage, now_ms))
                    .await
            }
            Db::Postgres(db) => db.set_stage(&key.0, &key.1, &key.2, stage, now_ms).await,
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
        column: "stage",
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
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS registry_migrations (
                version    INTEGER PRIMARY KEY NOT NULL,
                applied_ms INTEGER NOT NULL
            ) STRICT",
        )?;
        let found: i64 = tx.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM registry_migrations",
            [],
            |r| r.get(0),
        )?;
        let current = usize::try_from(found)
            .ok()
            .filter(|v| *v <= SQLITE_MIGRATIONS.len())
            .ok_or(DbError::SchemaTooNew {
                found,
                supported: SQLITE_MIGRATIONS.len(),
            })?;
        let Some(sql) = SQLITE_MIGRATIONS.get(current) else {
            tx.commit()?;
            return Ok(conn);
        };
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO registry_migrations (version, applied_ms) VALUES (?1, ?2)",
            params![found + 1, super::now_ms()],
        )?;
        tx.commit()?;
        tracing::info!(version = found + 1, "applied registry schema migration");
    }
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

fn sqlite_production(c: &mut Connection, name: &str, group: &str) -> Result<Option<VersionRow>> {
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

fn sqlite_set_stage(
    c: &mut Connection,
    name: &str,
    version: &str,
    group: &str,
    stage: Stage,
    now_ms: i64,
) -> Result<Changed> {
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(current) = sqlite_get(&tx, name, version, group)? else {
        let mut stmt = tx.prepare(
            "SELECT device_group FROM model_versions WHERE name = ?1 AND version = ?2
             ORDER BY device_group",
        )?;
        let groups = stmt
            .query_map(params![name, version], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        return Ok(Changed::Unknown { groups });
    };
    if current.stage == stage {
        return Ok(Changed::Done {
            row: Box::new(current),
            archived: None,
        });
    }
    let mut archived = None;
    if stage == Stage::Production {
        archived = tx
            .query_row(
                "UPDATE model_versions SET stage = 'archived', stage_changed_ms = ?3
                 WHERE name = ?1 AND device_group = ?2 AND stage = 'production'
                 RETURNING version",
                params![name, group, now_ms],
                |r| r.get::<_, String>(0),
            )
            .optional()?;
    }
    tx.execute(
        "UPDATE model_versions SET stage = ?4, stage_changed_ms = ?5
         WHERE name = ?1 AND version = ?2 AND device_group = ?3",
        params![name, version, group, stage.as_str(), now_ms],
    )?;
    let row = sqlite_get(&tx, name, version, group)?.ok_or(DbError::Closed)?;
    tx.commit()?;
    Ok(Changed::Done {
        row: Box::new(row),
        archived,
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
            loop {
                let tx = client.transaction().await?;
                tx.batch_execute(PG_MIGRATION_LOCK).await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS registry_migrations (
                        version    BIGINT PRIMARY KEY,
                        applied_ms BIGINT NOT NULL
                    )",
                )
                .await?;
                let found: i64 = tx
                    .query_one(
                        "SELECT COALESCE(MAX(version), 0)::int8 FROM registry_migrations",
                        &[],
                    )
                    .await?
                    .try_get(0)?;
                let current = usize::try_from(found)
                    .ok()
                    .filter(|v| *v <= PG_MIGRATIONS.len())
                    .ok_or(DbError::SchemaTooNew {
                        found,
                        supported: PG_MIGRATIONS.len(),
                    })?;
                let Some(sql) = PG_MIGRATIONS.get(current) else {
                    return Ok(());
                };
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO registry_migrations (version, applied_ms) VALUES ($1, $2)",
                    &[&(found + 1), &super::now_ms()],
                )
                .await?;
                tx.commit().await?;
                tracing::info!(version = found + 1, "applied registry schema migration");
            }
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

    async fn set_stage(
        &self,
        name: &str,
        version: &str,
        group: &str,
        stage: Stage,
        now_ms: i64,
    ) -> Result<Changed> {
        let (mut conn, _permit) = self.lease().await?;
        let result: Result<_> = async {
            let client = &mut conn;
            let tx = client.transaction().await?;
            // Design: READ COMMITTED statements after the lock see every
            // promotion of this (name, group) committed before it.
            tx.execute(PG_GROUP_LOCK, &[&name, &group]).await?;
            let current = tx
                .query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM model_versions
                         WHERE name = $1 AND version = $2 AND device_group = $3"
                    ),
                    &[&name, &version, &group],
                )
                .await?;
            let Some(current) = current else {
                let groups = tx
                    .query(
                        "SELECT device_group FROM model_versions
                         WHERE name = $1 AND version = $2 ORDER BY device_group COLLATE \"C\"",
                        &[&name, &version],
                    )
                    .await?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<std::result::Result<Vec<String>, _>>()?;
                return Ok(Changed::Unknown { groups });
            };
            let current = pg_row(&current)?;
            if current.stage == stage {
                return Ok(Changed::Done {
                    row: Box::new(current),
                    archived: None,
                });
            }
            let mut archived = None;
            if stage == Stage::Production {
                archived = tx
                    .query_opt(
                        "UPDATE model_versions SET stage = 'archived', stage_changed_ms = $3
                         WHERE name = $1 AND device_group = $2 AND stage = 'production'
                         RETURNING version",
                        &[&name, &group, &now_ms],
                    )
                    .await?
                    .map(|r| r.try_get::<_, String>(0))
                    .transpose()?;
            }
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE model_versions SET stage = $4, stage_changed_ms = $5
                         WHERE name = $1 AND version = $2 AND device_group = $3
                         RETURNING {COLUMNS}"
                    ),
                    &[&name, &version, &group, &stage.as_str(), &now_ms],
                )
                .await?;
            let row = pg_row(&row)?;
            tx.commit().await?;
            Ok(Changed::Done {
                row: Box::new(row),
                archived,
            })
        }
        .await;
        self.give_back(conn, &result);
        result
    }
}
