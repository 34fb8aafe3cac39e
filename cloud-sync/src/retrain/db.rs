//! The retrainer's tables, `training_runs` and `retrain_jobs`, on the
//! database the store uses (the same SQLite file or PostgreSQL database),
//! with their own migration table `retrain_migrations`.
//!
//! Design: like the registry, the retrainer keeps its own connection and
//! schema version so that it evolves independently of the store and the
//! registry. Traffic is tiny (a few rows per training run), so SQLite runs
//! on one connection behind a mutex inside `spawn_blocking`, and PostgreSQL
//! on one connection behind an async mutex (reopened when it closed).
//!
//! Invariants:
//! - Jobs run in the order they were enqueued (`created_ms`, then the
//!   insertion order: SQLite's `rowid`, PostgreSQL's `seq`).
//! - A job is claimed by one worker: the claim is one `UPDATE … WHERE
//!   status = 'queued' … RETURNING`, so two workers never run the same job.
//! - [`RetrainDb::recover`] marks every `running` job and run `failed`
//!   (the process that ran them is gone); jobs are never re-queued
//!   automatically (a job that crashed the process must not crash-loop it).
//! - JSON columns (`params`, `metrics`, `spec`) hold what the service wrote;
//!   nothing else interprets them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use tokio_postgres::{Client, NoTls};

use super::{Job, JobStatus, Run, RunStatus};
use crate::config::{PostgresSettings, StorageSettings};

/// Result alias for this module.
pub type Result<T, E = RetrainDbError> = std::result::Result<T, E>;

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a retrainer database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RetrainDbError {
    /// The SQLite file could not be opened.
    #[error("cannot open retrain database {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A SQLite statement failed.
    #[error("retrain database error")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL statement or connection failed.
    #[error("retrain database error")]
    Postgres(#[from] tokio_postgres::Error),
    /// The schema could not be migrated, or is newer than this build.
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    /// A stored JSON value does not decode.
    #[error("invalid stored value in {column}")]
    Json {
        /// Column.
        column: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored status is unknown.
    #[error("invalid stored status {0:?}")]
    Status(String),
    /// A blocking task failed.
    #[error("retrain database task failed")]
    Task(#[source] tokio::task::JoinError),
}

const RUN_COLUMNS: &str = "id, model, family, status, progress, params, metrics, dataset, \
     code_version, started_ms, finished_ms, duration_ms, package_dir, version, sha256, \
     registered, error, job_id";
const JOB_COLUMNS: &str = "id, spec, status, run_id, error, created_ms, started_ms, finished_ms";

const SQLITE_MIGRATIONS: &[&str] = &["CREATE TABLE training_runs (
        id           TEXT PRIMARY KEY NOT NULL,
        model        TEXT NOT NULL,
        family       TEXT NOT NULL,
        status       TEXT NOT NULL,
        progress     TEXT NOT NULL,
        params       TEXT NOT NULL,
        metrics      TEXT NOT NULL,
        dataset      TEXT,
        code_version TEXT NOT NULL,
        started_ms   INTEGER NOT NULL,
        finished_ms  INTEGER,
        duration_ms  INTEGER,
        package_dir  TEXT,
        version      TEXT,
        sha256       TEXT,
        registered   INTEGER NOT NULL,
        error        TEXT,
        job_id       TEXT
    ) STRICT;
    CREATE INDEX training_runs_started ON training_runs (started_ms);
    CREATE TABLE retrain_jobs (
        id          TEXT PRIMARY KEY NOT NULL,
        spec        TEXT NOT NULL,
        status      TEXT NOT NULL,
        run_id      TEXT,
        error       TEXT,
        created_ms  INTEGER NOT NULL,
        started_ms  INTEGER,
        finished_ms INTEGER
    ) STRICT;
    CREATE INDEX retrain_jobs_queue ON retrain_jobs (status, created_ms);"];

const PG_MIGRATIONS: &[&str] = &["CREATE TABLE training_runs (
        id           TEXT PRIMARY KEY,
        model        TEXT NOT NULL,
        family       TEXT NOT NULL,
        status       TEXT NOT NULL,
        progress     TEXT NOT NULL,
        params       TEXT NOT NULL,
        metrics      TEXT NOT NULL,
        dataset      TEXT,
        code_version TEXT NOT NULL,
        started_ms   BIGINT NOT NULL,
        finished_ms  BIGINT,
        duration_ms  BIGINT,
        package_dir  TEXT,
        version      TEXT,
        sha256       TEXT,
        registered   BOOLEAN NOT NULL,
        error        TEXT,
        job_id       TEXT
    );
    CREATE INDEX training_runs_started ON training_runs (started_ms);
    CREATE TABLE retrain_jobs (
        id          TEXT PRIMARY KEY,
        seq         BIGSERIAL NOT NULL,
        spec        TEXT NOT NULL,
        status      TEXT NOT NULL,
        run_id      TEXT,
        error       TEXT,
        created_ms  BIGINT NOT NULL,
        started_ms  BIGINT,
        finished_ms BIGINT
    );
    CREATE INDEX retrain_jobs_queue ON retrain_jobs (status, created_ms);"];

const PG_MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(
    hashtextextended('cloud-sync retrain migrations ' || COALESCE(current_schema(), ''), 0))";

/// Handle to the retrainer's tables.
#[derive(Clone)]
pub enum RetrainDb {
    /// SQLite: one connection, used from blocking tasks.
    Sqlite(Arc<Mutex<Connection>>),
    /// PostgreSQL: one connection, reopened when it broke.
    Postgres(Arc<PgConn>),
}

impl std::fmt::Debug for RetrainDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RetrainDb::Sqlite(_) => "RetrainDb::Sqlite",
            RetrainDb::Postgres(_) => "RetrainDb::Postgres",
        })
    }
}

/// One PostgreSQL connection, reopened on the next use after it closed.
pub struct PgConn {
    config: tokio_postgres::Config,
    client: tokio::sync::Mutex<Client>,
}

async fn pg_connect(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "retrain postgresql connection failed");
        }
    });
    Ok(client)
}

impl PgConn {
    /// The connection, reconnecting first when it closed.
    async fn lock(&self) -> Result<tokio::sync::MutexGuard<'_, Client>> {
        let mut client = self.client.lock().await;
        if client.is_closed() {
            *client = pg_connect(&self.config).await?;
        }
        Ok(client)
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn from_json<T: serde::de::DeserializeOwned>(column: &'static str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|source| RetrainDbError::Json { column, source })
}

struct RawRun {
    id: String,
    model: String,
    family: String,
    status: String,
    progress: String,
    params: String,
    metrics: String,
    dataset: Option<String>,
    code_version: String,
    started_ms: i64,
    finished_ms: Option<i64>,
    duration_ms: Option<i64>,
    package_dir: Option<String>,
    version: Option<String>,
    sha256: Option<String>,
    registered: bool,
    error: Option<String>,
    job_id: Option<String>,
}

impl RawRun {
    fn decode(self) -> Result<Run> {
        Ok(Run {
            status: RunStatus::parse(&self.status)
                .ok_or_else(|| RetrainDbError::Status(self.status.clone()))?,
            params: from_json("params", &self.params)?,
            metrics: from_json("metrics", &self.metrics)?,
            id: self.id,
            model: self.model,
            family: self.family,
            progress: self.progress,
            dataset: self.dataset,
            code_version: self.code_version,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            duration_ms: self.duration_ms,
            package_dir: self.package_dir,
            version: self.version,
            sha256: self.sha256,
            registered: self.registered,
            error: self.error,
            job_id: self.job_id,
        })
    }
}

struct RawJob {
    id: String,
    spec: String,
    status: String,
    run_id: Option<String>,
    error: Option<String>,
    created_ms: i64,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
}

impl RawJob {
    fn decode(self) -> Result<Job> {
        Ok(Job {
            status: JobStatus::parse(&self.status)
                .ok_or_else(|| RetrainDbError::Status(self.status.clone()))?,
            spec: from_json("spec", &self.spec)?,
            id: self.id,
            run_id: self.run_id,
            error: self.error,
            created_ms: self.created_ms,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
        })
    }
}

fn sqlite_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        id: r.get(0)?,
        model: r.get(1)?,
        family: r.get(2)?,
        status: r.get(3)?,
        progress: r.get(4)?,
        params: r.get(5)?,
        metrics: r.get(6)?,
        dataset: r.get(7)?,
        code_version: r.get(8)?,
        started_ms: r.get(9)?,
        finished_ms: r.get(10)?,
        duration_ms: r.get(11)?,
        package_dir: r.get(12)?,
        version: r.get(13)?,
        sha256: r.get(14)?,
        registered: r.get::<_, i64>(15)? != 0,
        error: r.get(16)?,
        job_id: r.get(17)?,
    })
}

fn sqlite_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob {
        id: r.get(0)?,
        spec: r.get(1)?,
        status: r.get(2)?,
        run_id: r.get(3)?,
        error: r.get(4)?,
        created_ms: r.get(5)?,
        started_ms: r.get(6)?,
        finished_ms: r.get(7)?,
    })
}

fn pg_run(r: &tokio_postgres::Row) -> Result<RawRun> {
    Ok(RawRun {
        id: r.try_get(0)?,
        model: r.try_get(1)?,
        family: r.try_get(2)?,
        status: r.try_get(3)?,
        progress: r.try_get(4)?,
        params: r.try_get(5)?,
        metrics: r.try_get(6)?,
        dataset: r.try_get(7)?,
        code_version: r.try_get(8)?,
        started_ms: r.try_get(9)?,
        finished_ms: r.try_get(10)?,
        duration_ms: r.try_get(11)?,
        package_dir: r.try_get(12)?,
        version: r.try_get(13)?,
        sha256: r.try_get(14)?,
        registered: r.try_get(15)?,
        error: r.try_get(16)?,
        job_id: r.try_get(17)?,
    })
}

fn pg_job(r: &tokio_postgres::Row) -> Result<RawJob> {
    Ok(RawJob {
        id: r.try_get(0)?,
        spec: r.try_get(1)?,
        status: r.try_get(2)?,
        run_id: r.try_get(3)?,
        error: r.try_get(4)?,
        created_ms: r.try_get(5)?,
        started_ms: r.try_get(6)?,
        finished_ms: r.try_get(7)?,
    })
}

/// A message recorded on work that was running when its process stopped.
pub const INTERRUPTED: &str =
    "interrupted: the process stopped while this was running (not retried; enqueue it again)";

impl RetrainDb {
    /// Opens the database `storage` names and applies the retrainer's migrations.
    ///
    /// # Errors
    /// [`RetrainDbError`] when the database cannot be opened or migrated.
    pub async fn open(storage: &StorageSettings) -> Result<RetrainDb> {
        match storage {
            StorageSettings::Sqlite { path } => {
                let path = path.clone();
                let conn = tokio::task::spawn_blocking(move || sqlite_open(&path))
                    .await
                    .map_err(RetrainDbError::Task)??;
                Ok(RetrainDb::Sqlite(Arc::new(Mutex::new(conn))))
            }
            StorageSettings::Postgres(settings) => pg_open(settings).await,
        }
    }

    async fn sqlite<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        job: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = Arc::clone(conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            job(&mut guard)
        })
        .await
        .map_err(RetrainDbError::Task)?
    }

    /// Inserts or replaces `run` (by id).
    ///
    /// # Errors
    /// A database failure.
    pub async fn put_run(&self, run: &Run) -> Result<()> {
        let params = to_json(&run.params);
        let metrics = to_json(&run.metrics);
        let run = run.clone();
        match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    c.execute(
                        &format!(
                            "INSERT OR REPLACE INTO training_runs ({RUN_COLUMNS}) VALUES \
                             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
                        ),
                        params![
                            run.id,
                            run.model,
                            run.family,
                            run.status.as_str(),
                            run.progress,
                            params,
                            metrics,
                            run.dataset,
                            run.code_version,
                            run.started_ms,
                            run.finished_ms,
                            run.duration_ms,
                            run.package_dir,
                            run.version,
                            run.sha256,
                            i64::from(run.registered),
                            run.error,
                            run.job_id,
                        ],
                    )?;
                    Ok(())
                })
                .await
            }
            RetrainDb::Postgres(client) => {
                let client = client.lock().await?;
                client
                    .execute(
                        &format!(
                            "INSERT INTO training_runs ({RUN_COLUMNS}) VALUES \
                             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
                             ON CONFLICT (id) DO UPDATE SET model = EXCLUDED.model, family = EXCLUDED.family, \
                             status = EXCLUDED.status, progress = EXCLUDED.progress, params = EXCLUDED.params, \
                             metrics = EXCLUDED.metrics, dataset = EXCLUDED.dataset, \
                             code_version = EXCLUDED.code_version, started_ms = EXCLUDED.started_ms, \
                             finished_ms = EXCLUDED.finished_ms, duration_ms = EXCLUDED.duration_ms, \
                             package_dir = EXCLUDED.package_dir, version = EXCLUDED.version, \
                             sha256 = EXCLUDED.sha256, registered = EXCLUDED.registered, \
                             error = EXCLUDED.error, job_id = EXCLUDED.job_id"
                        ),
                        &[
                            &run.id,
                            &run.model,
                            &run.family,
                            &run.status.as_str(),
                            &run.progress,
                            &params,
                            &metrics,
                            &run.dataset,
                            &run.code_version,
                            &run.started_ms,
                            &run.finished_ms,
                            &run.duration_ms,
                            &run.package_dir,
                            &run.version,
                            &run.sha256,
                            &run.registered,
                            &run.error,
                            &run.job_id,
                        ],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// Sets the progress text of a run.
    ///
    /// # Errors
    /// A database failure.
    pub async fn set_progress(&self, id: &str, progress: &str) -> Result<()> {
        let (id, progress) = (id.to_owned(), progress.to_owned());
        match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    c.execute(
                        "UPDATE training_runs SET progress = ?2 WHERE id = ?1",
                        params![id, progress],
                    )?;
                    Ok(())
                })
                .await
            }
            RetrainDb::Postgres(client) => {
                client
                    .lock()
                    .await?
                    .execute(
                        "UPDATE training_runs SET progress = $2 WHERE id = $1",
                        &[&id, &progress],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// The run `id`, if any.
    ///
    /// # Errors
    /// A database failure or an undecodable row.
    pub async fn run(&self, id: &str) -> Result<Option<Run>> {
        let id = id.to_owned();
        let raw = match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    Ok(c.query_row(
                        &format!("SELECT {RUN_COLUMNS} FROM training_runs WHERE id = ?1"),
                        [id],
                        sqlite_run,
                    )
                    .optional()?)
                })
                .await?
            }
            RetrainDb::Postgres(client) => client
                .lock()
                .await?
                .query_opt(
                    &format!("SELECT {RUN_COLUMNS} FROM training_runs WHERE id = $1"),
                    &[&id],
                )
                .await?
                .as_ref()
                .map(pg_run)
                .transpose()?,
        };
        raw.map(RawRun::decode).transpose()
    }

    /// The newest `limit` runs (of `model` when given), newest first.
    ///
    /// # Errors
    /// A database failure or an undecodable row.
    pub async fn runs(&self, model: Option<&str>, limit: u32) -> Result<Vec<Run>> {
        let model = model.map(str::to_owned);
        let raws = match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    let mut stmt = c.prepare(&format!(
                        "SELECT {RUN_COLUMNS} FROM training_runs WHERE (?1 IS NULL OR model = ?1) \
                         ORDER BY started_ms DESC, id DESC LIMIT ?2"
                    ))?;
                    let rows = stmt
                        .query_map(params![model, i64::from(limit)], sqlite_run)?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await?
            }
            RetrainDb::Postgres(client) => client
                .lock()
                .await?
                .query(
                    &format!(
                        "SELECT {RUN_COLUMNS} FROM training_runs WHERE ($1::text IS NULL OR model = $1) \
                         ORDER BY started_ms DESC, id DESC LIMIT $2"
                    ),
                    &[&model, &i64::from(limit)],
                )
                .await?
                .iter()
                .map(pg_run)
                .collect::<Result<Vec<_>>>()?,
        };
        raws.into_iter().map(RawRun::decode).collect()
    }

    /// Inserts a new job.
    ///
    /// # Errors
    /// A database failure (also when the id exists).
    pub async fn insert_job(&self, job: &Job) -> Result<()> {
        self.insert_job_with(job, "").await.map(|_| ())
    }

    /// Inserts `job` unless a job with its id exists; returns whether it
    /// was inserted.
    ///
    /// # Errors
    /// A database failure.
    pub async fn insert_job_once(&self, job: &Job) -> Result<bool> {
        self.insert_job_with(job, " ON CONFLICT (id) DO NOTHING")
            .await
    }

    async fn insert_job_with(&self, job: &Job, conflict: &'static str) -> Result<bool> {
        let spec = to_json(&job.spec);
        let job = job.clone();
        match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    let n = c.execute(
                        &format!("INSERT INTO retrain_jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8){conflict}"),
                        params![
                            job.id,
                            spec,
                            job.status.as_str(),
                            job.run_id,
                            job.error,
                            job.created_ms,
                            job.started_ms,
                            job.finished_ms
                        ],
                    )?;
                    Ok(n > 0)
                })
                .await
            }
            RetrainDb::Postgres(client) => {
                let n = client
                    .lock()
                    .await?
                    .execute(
                        &format!("INSERT INTO retrain_jobs ({JOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8){conflict}"),
                        &[
                            &job.id,
                            &spec,
                            &job.status.as_str(),
                            &job.run_id,
                            &job.error,
                            &job.created_ms,
                            &job.started_ms,
                            &job.finished_ms,
                        ],
                    )
                    .await?;
                Ok(n > 0)
            }
        }
    }

    /// The job `id`, if any.
    ///
    /// # Errors
    /// A database failure or an undecodable row.
    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        let id = id.to_owned();
        let raw = match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    Ok(c.query_row(
                        &format!("SELECT {JOB_COLUMNS} FROM retrain_jobs WHERE id = ?1"),
                        [id],
                        sqlite_job,
                    )
                    .optional()?)
                })
                .await?
            }
            RetrainDb::Postgres(client) => client
                .lock()
                .await?
                .query_opt(
                    &format!("SELECT {JOB_COLUMNS} FROM retrain_jobs WHERE id = $1"),
                    &[&id],
                )
                .await?
                .as_ref()
                .map(pg_job)
                .transpose()?,
        };
        raw.map(RawJob::decode).transpose()
    }

    /// Claims the oldest queued job: marks it `running` at `now_ms` and
    /// returns it; `None` when the queue is empty.
    ///
    /// # Errors
    /// A database failure or an undecodable row.
    pub async fn claim(&self, now_ms: i64) -> Result<Option<Job>> {
        let raw = match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let raw = tx
                        .query_row(
                            &format!(
                                "UPDATE retrain_jobs SET status = 'running', started_ms = ?1 \
                                 WHERE id = (SELECT id FROM retrain_jobs WHERE status = 'queued' \
                                 ORDER BY created_ms, rowid LIMIT 1) RETURNING {JOB_COLUMNS}"
                            ),
                            [now_ms],
                            sqlite_job,
                        )
                        .optional()?;
                    tx.commit()?;
                    Ok(raw)
                })
                .await?
            }
            RetrainDb::Postgres(client) => client
                .lock()
                .await?
                .query_opt(
                    &format!(
                        "UPDATE retrain_jobs SET status = 'running', started_ms = $1 \
                         WHERE id = (SELECT id FROM retrain_jobs WHERE status = 'queued' \
                         ORDER BY created_ms, seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING {JOB_COLUMNS}"
                    ),
                    &[&now_ms],
                )
                .await?
                .as_ref()
                .map(pg_job)
                .transpose()?,
        };
        raw.map(RawJob::decode).transpose()
    }

    /// Records the end of job `id`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn finish_job(
        &self,
        id: &str,
        status: JobStatus,
        run_id: Option<&str>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        let (id, run_id, error) = (
            id.to_owned(),
            run_id.map(str::to_owned),
            error.map(str::to_owned),
        );
        match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    c.execute(
                        "UPDATE retrain_jobs SET status = ?2, run_id = ?3, error = ?4, finished_ms = ?5 WHERE id = ?1",
                        params![id, status.as_str(), run_id, error, now_ms],
                    )?;
                    Ok(())
                })
                .await
            }
            RetrainDb::Postgres(client) => {
                client
                    .lock()
                    .await?
                    .execute(
                        "UPDATE retrain_jobs SET status = $2, run_id = $3, error = $4, finished_ms = $5 WHERE id = $1",
                        &[&id, &status.as_str(), &run_id, &error, &now_ms],
                    )
                    .await?;
                Ok(())
            }
        }
    }

    /// Marks every `running` job and run `failed` with [`INTERRUPTED`];
    /// returns how many jobs were marked.
    ///
    /// # Errors
    /// A database failure.
    pub async fn recover(&self, now_ms: i64) -> Result<u64> {
        match self {
            RetrainDb::Sqlite(conn) => {
                Self::sqlite(conn, move |c| {
                    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let jobs = tx.execute(
                        "UPDATE retrain_jobs SET status = 'failed', error = ?1, finished_ms = ?2 WHERE status = 'running'",
                        params![INTERRUPTED, now_ms],
                    )?;
                    tx.execute(
                        "UPDATE training_runs SET status = 'failed', error = ?1, finished_ms = ?2 WHERE status = 'running'",
                        params![INTERRUPTED, now_ms],
                    )?;
                    tx.commit()?;
                    Ok(u64::try_from(jobs).unwrap_or(0))
                })
                .await
            }
            RetrainDb::Postgres(client) => {
                let mut client = client.lock().await?;
                let tx = client.transaction().await?;
                let jobs = tx
                    .execute(
                        "UPDATE retrain_jobs SET status = 'failed', error = $1, finished_ms = $2 WHERE status = 'running'",
                        &[&INTERRUPTED, &now_ms],
                    )
                    .await?;
                tx.execute(
                    "UPDATE training_runs SET status = 'failed', error = $1, finished_ms = $2 WHERE status = 'running'",
                    &[&INTERRUPTED, &now_ms],
                )
                .await?;
                tx.commit().await?;
                Ok(jobs)
            }
        }
    }
}

fn sqlite_open(path: &Path) -> Result<Connection> {
    let open_err = |source| RetrainDbError::Open {
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
    crate::migrate::sqlite(&mut conn, "retrain", SQLITE_MIGRATIONS)?;
    Ok(conn)
}

async fn pg_open(settings: &PostgresSettings) -> Result<RetrainDb> {
    let mut client = pg_connect(&settings.config).await?;
    crate::migrate::postgres(&mut client, "retrain", PG_MIGRATION_LOCK, PG_MIGRATIONS).await?;
    Ok(RetrainDb::Postgres(Arc::new(PgConn {
        config: settings.config.clone(),
        client: tokio::sync::Mutex::new(client),
    })))
}
