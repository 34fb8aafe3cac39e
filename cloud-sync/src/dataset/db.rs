//! The `datasets` table, on the database the store uses (the same SQLite
//! file or PostgreSQL database), with its own migration table
//! `dataset_migrations`.
//!
//! Design: like the registry, its own connections and migrations instead of
//! commands in [`crate::store`]; dataset traffic is a few operator calls, so
//! each operation opens a connection (SQLite: on a blocking thread) rather
//! than keeping a pool. This module is the only code touching `datasets`.
//!
//! Invariant: `id` is the primary key and rows are only inserted (`ON
//! CONFLICT DO NOTHING`), never updated: a registered dataset never changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use tokio_postgres::NoTls;

use super::manifest::Manifest;
use crate::config::{PostgresSettings, StorageSettings};

/// How long a SQLite statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a dataset database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The SQLite file could not be opened.
    #[error("cannot open dataset database {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A SQLite statement failed.
    #[error("dataset database error")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL statement or connection failed.
    #[error("dataset database error")]
    Postgres(#[from] tokio_postgres::Error),
    /// The schema could not be migrated, or is newer than this build.
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
    /// A stored manifest does not parse or cannot be encoded.
    #[error("stored manifest of dataset {id} is invalid")]
    Manifest {
        /// Dataset id.
        id: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A blocking task failed.
    #[error("dataset database task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Result alias for this module.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

const SQLITE_MIGRATIONS: &[&str] = &[
    // 1: datasets.
    "CREATE TABLE datasets (
        id            TEXT PRIMARY KEY NOT NULL,
        name          TEXT,
        created_ms    INTEGER NOT NULL,
        readings      INTEGER NOT NULL,
        predictions   INTEGER NOT NULL,
        bytes         INTEGER NOT NULL,
        manifest_json TEXT NOT NULL
    ) STRICT;
    CREATE INDEX datasets_by_time ON datasets (created_ms, id);",
];

const PG_MIGRATIONS: &[&str] = &[
    // 1: datasets.
    "CREATE TABLE datasets (
        id            TEXT PRIMARY KEY,
        name          TEXT,
        created_ms    BIGINT NOT NULL,
        readings      BIGINT NOT NULL,
        predictions   BIGINT NOT NULL,
        bytes         BIGINT NOT NULL,
        manifest_json TEXT NOT NULL
    );
    CREATE INDEX datasets_by_time ON datasets (created_ms, id);",
];

const PG_MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(
    hashtextextended('cloud-sync dataset migrations ' || COALESCE(current_schema(), ''), 0))";

/// What an insert found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// The row was added.
    New,
    /// A dataset with this id was registered: its manifest as stored.
    Existing(Box<Manifest>),
}

/// Handle to the `datasets` table.
#[derive(Debug, Clone)]
pub enum Db {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database.
    Postgres(Box<PostgresSettings>),
}

fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn parse(id: &str, json: &str) -> Result<Manifest> {
    serde_json::from_str(json).map_err(|source| DbError::Manifest {
        id: id.to_owned(),
        source,
    })
}

impl Db {
    /// Opens the database `storage` names and applies dataset migrations.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be opened or migrated.
    pub async fn open(storage: &StorageSettings) -> Result<Db> {
        let db = match storage {
            StorageSettings::Sqlite { path } => Db::Sqlite(path.clone()),
            StorageSettings::Postgres(settings) => Db::Postgres(settings.clone()),
        };
        match &db {
            Db::Sqlite(path) => {
                let path = path.clone();
                blocking(move || sqlite_open(&path).map(drop)).await?;
            }
            Db::Postgres(settings) => pg_migrate(settings).await?,
        }
        Ok(db)
    }

    /// Inserts the dataset unless its id is registered.
    ///
    /// # Errors
    /// A database failure.
    pub async fn insert(&self, manifest: &Manifest) -> Result<Inserted> {
        let json = serde_json::to_string(manifest).map_err(|source| DbError::Manifest {
            id: manifest.id.clone(),
            source,
        })?;
        let (readings, predictions, bytes) = (
            i64_of(manifest.readings()),
            i64_of(manifest.predictions()),
            i64_of(manifest.bytes()),
        );
        match self {
            Db::Sqlite(path) => {
                let (path, m) = (path.clone(), manifest.clone());
                blocking(move || {
                    let mut c = sqlite_open(&path)?;
                    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    let inserted = tx.execute(
                        "INSERT INTO datasets
                           (id, name, created_ms, readings, predictions, bytes, manifest_json)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                        params![
                            m.id,
                            m.name,
                            m.created_ms,
                            readings,
                            predictions,
                            bytes,
                            json
                        ],
                    )?;
                    let outcome = if inserted == 1 {
                        Inserted::New
                    } else {
                        let stored: String = tx.query_row(
                            "SELECT manifest_json FROM datasets WHERE id = ?1",
                            [&m.id],
                            |r| r.get(0),
                        )?;
                        Inserted::Existing(Box::new(parse(&m.id, &stored)?))
                    };
                    tx.commit()?;
                    Ok(outcome)
                })
                .await
            }
            Db::Postgres(settings) => {
                let client = pg_connect(settings).await?;
                let inserted = client
                    .execute(
                        "INSERT INTO datasets
                           (id, name, created_ms, readings, predictions, bytes, manifest_json)
                         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                        &[
                            &manifest.id,
                            &manifest.name,
                            &manifest.created_ms,
                            &readings,
                            &predictions,
                            &bytes,
                            &json,
                        ],
                    )
                    .await?;
                if inserted == 1 {
                    return Ok(Inserted::New);
                }
                let stored: String = client
                    .query_one(
                        "SELECT manifest_json FROM datasets WHERE id = $1",
                        &[&manifest.id],
                    )
                    .await?
                    .try_get(0)?;
                Ok(Inserted::Existing(Box::new(parse(&manifest.id, &stored)?)))
            }
        }
    }

    /// The manifest of dataset `id`, if registered.
    ///
    /// # Errors
    /// A database failure.
    pub async fn get(&self, id: &str) -> Result<Option<Manifest>> {
        let id = id.to_owned();
        let stored: Option<String> = match self {
            Db::Sqlite(path) => {
                let (path, id) = (path.clone(), id.clone());
                blocking(move || {
                    let c = sqlite_open(&path)?;
                    Ok(c.query_row(
                        "SELECT manifest_json FROM datasets WHERE id = ?1",
                        [&id],
                        |r| r.get(0),
                    )
                    .optional()?)
                })
                .await?
            }
            Db::Postgres(settings) => pg_connect(settings)
                .await?
                .query_opt("SELECT manifest_json FROM datasets WHERE id = $1", &[&id])
                .await?
                .map(|r| r.try_get(0))
                .transpose()?,
        };
        stored.map(|json| parse(&id, &json)).transpose()
    }

    /// Every registered dataset, oldest first.
    ///
    /// # Errors
    /// A database failure.
    pub async fn list(&self) -> Result<Vec<Manifest>> {
        const SQL: &str = "SELECT id, manifest_json FROM datasets ORDER BY created_ms, id";
        let rows: Vec<(String, String)> = match self {
            Db::Sqlite(path) => {
                let path = path.clone();
                blocking(move || {
                    let c = sqlite_open(&path)?;
                    let mut stmt = c.prepare(SQL)?;
                    let rows = stmt
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await?
            }
            Db::Postgres(settings) => pg_connect(settings)
                .await?
                .query(SQL, &[])
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>>>()?,
        };
        rows.iter().map(|(id, json)| parse(id, json)).collect()
    }
}

async fn blocking<T: Send + 'static>(
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(job)
        .await
        .map_err(DbError::Task)?
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
    crate::migrate::sqlite(&mut conn, "dataset", SQLITE_MIGRATIONS)?;
    Ok(conn)
}

async fn pg_connect(settings: &PostgresSettings) -> Result<tokio_postgres::Client> {
    let (client, connection) = settings.config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "dataset postgresql connection failed");
        }
    });
    Ok(client)
}

async fn pg_migrate(settings: &PostgresSettings) -> Result<()> {
    let mut client = pg_connect(settings).await?;
    crate::migrate::postgres(&mut client, "dataset", PG_MIGRATION_LOCK, PG_MIGRATIONS).await?;
    Ok(())
}
