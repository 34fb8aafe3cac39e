//! The drift tables, on the database the store uses (the same SQLite file or
//! PostgreSQL database), through drift's own connection.
//!
//! Design: like the registry, drift keeps its own connection and its own
//! migration table (`drift_migrations`) instead of adding commands and
//! migrations to [`crate::store`]: the traffic is one small row per device,
//! model and window, and the schemas evolve independently. This module is
//! the only code touching `drift_summaries` and `fleet_alerts`.
//!
//! Invariants (both backends):
//! - `(device, model, window_start_ms)` is the primary key of
//!   `drift_summaries` and inserts use `ON CONFLICT DO NOTHING`: a re-posted
//!   summary is stored once and never overwrites the first copy.
//! - `(model, window_start_ms)` is the primary key of `fleet_alerts`: a
//!   fleet window raises at most one alert, even with several instances.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, params};
use sync_protocol::drift::FleetAlert;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_postgres::{Client, NoTls};

use crate::config::{PostgresSettings, StorageSettings};

/// Result alias for this module.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

const QUEUE_CAPACITY: usize = 64;
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a drift database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The SQLite file could not be opened.
    #[error("cannot open drift database {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A SQLite statement failed.
    #[error("drift database error")]
    Sqlite(#[from] rusqlite::Error),
    /// A PostgreSQL statement or connection failed.
    #[error("drift database error")]
    Postgres(#[from] tokio_postgres::Error),
    /// The worker thread could not be started.
    #[error("cannot start the drift database thread")]
    Spawn(#[source] std::io::Error),
    /// The worker stopped.
    #[error("drift database closed")]
    Closed,
    /// The schema could not be migrated, or is newer than this build.
    #[error(transparent)]
    Migrate(#[from] crate::migrate::MigrateError),
}

/// One stored summary, as aggregation reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// Device.
    pub device: String,
    /// Window start (device clock).
    pub window_start_ms: i64,
    /// The summary alerted.
    pub alert: bool,
    /// The summary as JSON.
    pub body: String,
}

const SQLITE_MIGRATIONS: &[&str] = &[
    // 1: summaries and fleet alerts.
    "CREATE TABLE drift_summaries (
        device          TEXT NOT NULL,
        model           TEXT NOT NULL,
        window_start_ms INTEGER NOT NULL,
        window_end_ms   INTEGER NOT NULL,
        version         TEXT NOT NULL,
        alert           INTEGER NOT NULL,
        body            TEXT NOT NULL,
        received_ms     INTEGER NOT NULL,
        PRIMARY KEY (device, model, window_start_ms)
    ) STRICT;
    CREATE INDEX drift_summaries_by_model ON drift_summaries (model, window_start_ms);
    CREATE TABLE fleet_alerts (
        model             TEXT NOT NULL,
        window_start_ms   INTEGER NOT NULL,
        devices_reporting INTEGER NOT NULL,
        devices_alerting  INTEGER NOT NULL,
        raised_ms         INTEGER NOT NULL,
        PRIMARY KEY (model, window_start_ms)
    ) STRICT;",
];

const PG_MIGRATIONS: &[&str] = &[
    // 1: summaries and fleet alerts (mirrors SQLite).
    "CREATE TABLE drift_summaries (
        device          TEXT NOT NULL,
        model           TEXT NOT NULL,
        window_start_ms BIGINT NOT NULL,
        window_end_ms   BIGINT NOT NULL,
        version         TEXT NOT NULL,
        alert           BIGINT NOT NULL,
        body            TEXT NOT NULL,
        received_ms     BIGINT NOT NULL,
        PRIMARY KEY (device, model, window_start_ms)
    );
    CREATE INDEX drift_summaries_by_model ON drift_summaries (model, window_start_ms);
    CREATE TABLE fleet_alerts (
        model             TEXT NOT NULL,
        window_start_ms   BIGINT NOT NULL,
        devices_reporting BIGINT NOT NULL,
        devices_alerting  BIGINT NOT NULL,
        raised_ms         BIGINT NOT NULL,
        PRIMARY KEY (model, window_start_ms)
    );",
];

const PG_MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(
    hashtextextended('cloud-sync drift migrations ' || COALESCE(current_schema(), ''), 0))";

/// A summary to insert.
#[derive(Debug, Clone)]
pub struct NewSummary {
    /// Device.
    pub device: String,
    /// Model.
    pub model: String,
    /// Window start.
    pub window_start_ms: i64,
    /// Window end.
    pub window_end_ms: i64,
    /// Model version.
    pub version: String,
    /// Alert flag.
    pub alert: bool,
    /// JSON body.
    pub body: String,
    /// Receipt time.
    pub received_ms: i64,
}

/// Handle to the drift tables.
#[derive(Debug, Clone)]
pub enum Db {
    /// SQLite: one worker thread with its own connection.
    Sqlite(mpsc::Sender<Job>),
    /// PostgreSQL: one connection, reopened when it closes.
    Postgres(Arc<PgDb>),
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The PostgreSQL side: a connection behind a lock (drift traffic is small).
pub struct PgDb {
    config: tokio_postgres::Config,
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDb").finish_non_exhaustive()
    }
}

impl Db {
    /// Opens the database `storage` names and applies drift migrations.
    ///
    /// # Errors
    /// [`DbError`] when the database cannot be opened or migrated.
    pub async fn open(storage: &StorageSettings) -> Result<Db> {
        match storage {
            StorageSettings::Sqlite { path } => sqlite_start(path).await,
            StorageSettings::Postgres(settings) => pg_open(settings).await,
        }
    }

    async fn sqlite<T: Send + 'static>(
        tx: &mpsc::Sender<Job>,
        job: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        tx.send(Box::new(move |conn| {
            let _ = reply.send(job(conn));
        }))
        .await
        .map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// Inserts `s` unless its key exists; true when inserted.
    ///
    /// # Errors
    /// A database failure.
    pub async fn insert(&self, s: NewSummary) -> Result<bool> {
        match self {
            Db::Sqlite(tx) => {
                Self::sqlite(tx, move |c| {
                    let n = c.execute(
                        "INSERT INTO drift_summaries (device, model, window_start_ms, window_end_ms,
                            version, alert, body, received_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                        params![
                            s.device,
                            s.model,
                            s.window_start_ms,
                            s.window_end_ms,
                            s.version,
                            i64::from(s.alert),
                            s.body,
                            s.received_ms
                        ],
                    )?;
                    Ok(n == 1)
                })
                .await
            }
            Db::Postgres(pg) => {
                let alert = i64::from(s.alert);
                let n = {
                    let guard = pg.lock().await?;
                    let c = guard.as_ref().ok_or(DbError::Closed)?;
                    c.execute(
                            "INSERT INTO drift_summaries (device, model, window_start_ms, window_end_ms,
                                version, alert, body, received_ms)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                            &[
                                &s.device,
                                &s.model,
                                &s.window_start_ms,
                                &s.window_end_ms,
                                &s.version,
                                &alert,
                                &s.body,
                                &s.received_ms,
                            ],
                        )
                        .await?
                };
                Ok(n == 1)
            }
        }
    }

    /// Summaries of `model` whose window starts in `[from_ms, to_ms)`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn summaries(
        &self,
        model: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<SummaryRow>> {
        let model = model.to_owned();
        match self {
            Db::Sqlite(tx) => {
                Self::sqlite(tx, move |c| {
                    let mut st = c.prepare_cached(
                        "SELECT device, window_start_ms, alert, body FROM drift_summaries
                         WHERE model = ?1 AND window_start_ms >= ?2 AND window_start_ms < ?3",
                    )?;
                    let rows = st
                        .query_map(params![model, from_ms, to_ms], |r| {
                            Ok(SummaryRow {
                                device: r.get(0)?,
                                window_start_ms: r.get(1)?,
                                alert: r.get::<_, i64>(2)? != 0,
                                body: r.get(3)?,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await
            }
            Db::Postgres(pg) => {
                let rows = {
                    let guard = pg.lock().await?;
                    let c = guard.as_ref().ok_or(DbError::Closed)?;
                    c.query(
                        "SELECT device, window_start_ms, alert, body FROM drift_summaries
                             WHERE model = $1 AND window_start_ms >= $2 AND window_start_ms < $3",
                        &[&model, &from_ms, &to_ms],
                    )
                    .await?
                };
                rows.iter()
                    .map(|r| {
                        Ok(SummaryRow {
                            device: r.try_get(0)?,
                            window_start_ms: r.try_get(1)?,
                            alert: r.try_get::<_, i64>(2)? != 0,
                            body: r.try_get(3)?,
                        })
                    })
                    .collect()
            }
        }
    }

    /// Stores `a` unless its `(model, window_start_ms)` exists; true when new.
    ///
    /// # Errors
    /// A database failure.
    pub async fn insert_alert(&self, a: FleetAlert) -> Result<bool> {
        let reporting = i64::try_from(a.devices_reporting).unwrap_or(i64::MAX);
        let alerting = i64::try_from(a.devices_alerting).unwrap_or(i64::MAX);
        match self {
            Db::Sqlite(tx) => {
                Self::sqlite(tx, move |c| {
                    let n = c.execute(
                        "INSERT INTO fleet_alerts (model, window_start_ms, devices_reporting,
                            devices_alerting, raised_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                        params![a.model, a.window_start_ms, reporting, alerting, a.raised_ms],
                    )?;
                    Ok(n == 1)
                })
                .await
            }
            Db::Postgres(pg) => {
                let n = {
                    let guard = pg.lock().await?;
                    let c = guard.as_ref().ok_or(DbError::Closed)?;
                    c.execute(
                        "INSERT INTO fleet_alerts (model, window_start_ms, devices_reporting,
                                devices_alerting, raised_ms)
                             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        &[
                            &a.model,
                            &a.window_start_ms,
                            &reporting,
                            &alerting,
                            &a.raised_ms,
                        ],
                    )
                    .await?
                };
                Ok(n == 1)
            }
        }
    }

    /// Fleet alerts of windows starting at or after `since_ms`, oldest
    /// first (then by model).
    ///
    /// # Errors
    /// A database failure.
    pub async fn alerts(&self, since_ms: i64) -> Result<Vec<FleetAlert>> {
        const SQL_TAIL: &str = "FROM fleet_alerts WHERE window_start_ms >= ";
        let cols = "SELECT model, window_start_ms, devices_reporting, devices_alerting, raised_ms ";
        let order = " ORDER BY window_start_ms, model";
        let to_u64 = |v: i64| u64::try_from(v).unwrap_or(0);
        match self {
            Db::Sqlite(tx) => {
                let sql = format!("{cols}{SQL_TAIL}?1{order}");
                Self::sqlite(tx, move |c| {
                    let mut st = c.prepare_cached(&sql)?;
                    let rows = st
                        .query_map([since_ms], |r| {
                            Ok(FleetAlert {
                                model: r.get(0)?,
                                window_start_ms: r.get(1)?,
                                devices_reporting: to_u64(r.get(2)?),
                                devices_alerting: to_u64(r.get(3)?),
                                raised_ms: r.get(4)?,
                            })
                        })?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await
            }
            Db::Postgres(pg) => {
                let sql = format!("{cols}{SQL_TAIL}$1{order}");
                let rows = {
                    let guard = pg.lock().await?;
                    let c = guard.as_ref().ok_or(DbError::Closed)?;
                    c.query(&sql, &[&since_ms]).await?
                };
                rows.iter()
                    .map(|r| {
                        Ok(FleetAlert {
                            model: r.try_get(0)?,
                            window_start_ms: r.try_get(1)?,
                            devices_reporting: to_u64(r.try_get(2)?),
                            devices_alerting: to_u64(r.try_get(3)?),
                            raised_ms: r.try_get(4)?,
                        })
                    })
                    .collect()
            }
        }
    }
}

async fn sqlite_start(path: &Path) -> Result<Db> {
    let path = path.to_owned();
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE_CAPACITY);
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("cloud-sync-drift".to_owned())
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
    Ok(Db::Sqlite(tx))
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
    crate::migrate::sqlite(&mut conn, "drift", SQLITE_MIGRATIONS)?;
    Ok(conn)
}

async fn pg_connect(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "drift postgresql connection failed");
        }
    });
    Ok(client)
}

async fn pg_open(settings: &PostgresSettings) -> Result<Db> {
    let mut client = pg_connect(&settings.config).await?;
    crate::migrate::postgres(&mut client, "drift", PG_MIGRATION_LOCK, PG_MIGRATIONS).await?;
    Ok(Db::Postgres(Arc::new(PgDb {
        config: settings.config.clone(),
        client: Mutex::new(Some(client)),
    })))
}

impl PgDb {
    /// The connection, reopened first when it closed.
    async fn lock(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(pg_connect(&self.config).await?);
        }
        Ok(guard)
    }
}
