//! SQLite storage: devices and their tokens, readings and predictions.
//!
//! The only module that touches rusqlite. The [`rusqlite::Connection`] lives on
//! one dedicated worker thread; async code holds a cloneable [`Store`] handle
//! that sends commands over a bounded channel, each carrying a
//! [`tokio::sync::oneshot`] sender for its reply.
//!
//! Invariants:
//! - A reading is identified by `(device, source, stream, seq)` and a
//!   prediction by `(device, model, seq)` (the [`sync_protocol`] identity
//!   contract; `device` is the authenticated agent, `source` the sensor it
//!   heard the reading from). Both are primary keys and inserts use
//!   `ON CONFLICT DO NOTHING`, so replaying a batch never creates a duplicate
//!   row and never overwrites the row stored first.
//! - A batch is validated whole before anything is written and stored in one
//!   transaction: it is either entirely durable (WAL, `synchronous=FULL`) when
//!   the ack is returned, or not written at all.
//! - Only the sha256 of a device token is stored; the token itself is shown
//!   once, by [`Store::add_device`].

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};
use sync_protocol::{
    DeviceSummary, Prediction, Reading, StreamSummary, UploadAck, UploadBatch, ranges,
};
use tokio::sync::{mpsc, oneshot};

/// Capacity of the command queue in front of the worker thread.
// Design: small on purpose; callers wait (backpressure) rather than queueing
// unbounded work behind a slow disk.
pub const COMMAND_QUEUE_CAPACITY: usize = 64;

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// How long a statement waits for a lock held by another connection (for
/// example `cloud-sync devices add` while the server runs).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Schema migrations; migration `i` moves `PRAGMA user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE devices (
        id           TEXT PRIMARY KEY NOT NULL,
        token_sha256 TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        revoked      INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE UNIQUE INDEX devices_token_sha256 ON devices (token_sha256);
    CREATE TABLE readings (
        device       TEXT NOT NULL REFERENCES devices (id),
        source       TEXT NOT NULL,
        stream       TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        device_ts_ms INTEGER,
        recv_ts_ms   INTEGER NOT NULL,
        clock_ok     INTEGER NOT NULL,
        values_json  TEXT NOT NULL,
        stored_ms    INTEGER NOT NULL,
        PRIMARY KEY (device, source, stream, seq)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE predictions (
        device           TEXT NOT NULL REFERENCES devices (id),
        model            TEXT NOT NULL,
        seq              INTEGER NOT NULL,
        model_version    TEXT NOT NULL,
        model_sha256     TEXT NOT NULL,
        source           TEXT NOT NULL,
        stream           TEXT NOT NULL,
        window_end_seq   INTEGER NOT NULL,
        window_end_ts_ms INTEGER,
        score            REAL NOT NULL,
        threshold        REAL NOT NULL,
        is_anomaly       INTEGER NOT NULL,
        created_ms       INTEGER NOT NULL,
        stored_ms        INTEGER NOT NULL,
        PRIMARY KEY (device, model, seq)
    ) STRICT, WITHOUT ROWID;",
];

/// Result alias for this module.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or configured.
    #[error("cannot open database {}", path.display())]
    Open {
        /// Database file.
        path: PathBuf,
        /// Underlying SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// A schema migration failed; the database is left at the previous version.
    #[error("schema migration to version {version} failed")]
    Migrate {
        /// Version the migration would have reached.
        version: usize,
        /// Underlying SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer cloud-sync.
    #[error("database schema version {found} is newer than supported version {supported}")]
    SchemaTooNew {
        /// `PRAGMA user_version` found in the file.
        found: i64,
        /// Highest version this build knows.
        supported: usize,
    },
    /// The worker thread could not be started.
    #[error("cannot start store worker thread")]
    SpawnWorker {
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread has stopped ([`Store::close`] was called, or it died).
    #[error("store is closed")]
    Closed,
    /// A SQLite statement failed.
    #[error("sqlite statement failed")]
    Sqlite(#[from] rusqlite::Error),
    /// Reading values could not be encoded as JSON.
    #[error("cannot encode reading values")]
    EncodeValues(#[source] serde_json::Error),
    /// Closing the connection failed.
    #[error("cannot close database")]
    CloseFailed(#[source] rusqlite::Error),
    /// The device id is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid device id {id:?}: use 1 to 128 characters from [A-Za-z0-9._-]")]
    InvalidDeviceId {
        /// The rejected id.
        id: String,
    },
    /// [`Store::add_device`] for an id that is already registered (revoked or not).
    #[error("device {id:?} already exists")]
    DeviceExists {
        /// The device id.
        id: String,
    },
    /// No device with this id is registered.
    #[error("unknown device {id:?}")]
    UnknownDevice {
        /// The device id.
        id: String,
    },
    /// The device is registered but revoked.
    #[error("device {id:?} is revoked")]
    DeviceRevoked {
        /// The device id.
        id: String,
    },
    /// The batch failed validation; nothing was written.
    #[error(transparent)]
    InvalidBatch(#[from] BatchError),
}

/// Why an [`UploadBatch`] was rejected; names the offending item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// A sequence number was 0 (they start at 1).
    #[error("{list}[{index}]: seq must be >= 1")]
    ZeroSeq {
        /// `readings` or `predictions`.
        list: &'static str,
        /// Position in the list.
        index: usize,
    },
    /// A sequence number does not fit SQLite's signed 64-bit integer.
    #[error("{list}[{index}]: {field} {value} is larger than {}", i64::MAX)]
    SeqTooLarge {
        /// `readings` or `predictions`.
        list: &'static str,
        /// Position in the list.
        index: usize,
        /// `seq` or `window_end_seq`.
        field: &'static str,
        /// The rejected value.
        value: u64,
    },
    /// A source, stream or model name was empty.
    #[error("{list}[{index}]: {field} must not be empty")]
    EmptyName {
        /// `readings` or `predictions`.
        list: &'static str,
        /// Position in the list.
        index: usize,
        /// `source`, `stream` or `model`.
        field: &'static str,
    },
    /// A value, score or threshold was NaN or infinite.
    #[error("{list}[{index}]: {field} must be a finite number")]
    NotFinite {
        /// `readings` or `predictions`.
        list: &'static str,
        /// Position in the list.
        index: usize,
        /// `values.<name>`, `score` or `threshold`.
        field: String,
    },
}

/// Checks a batch before anything is written.
///
/// # Errors
/// The first [`BatchError`] found, in list order.
pub fn validate_batch(batch: &UploadBatch) -> Result<(), BatchError> {
    for (index, reading) in batch.readings.iter().enumerate() {
        validate_reading(index, reading)?;
    }
    for (index, prediction) in batch.predictions.iter().enumerate() {
        validate_prediction(index, prediction)?;
    }
    Ok(())
}

fn validate_seq(
    list: &'static str,
    index: usize,
    field: &'static str,
    value: u64,
) -> Result<(), BatchError> {
    if i64::try_from(value).is_err() {
        return Err(BatchError::SeqTooLarge {
            list,
            index,
            field,
            value,
        });
    }
    Ok(())
}

fn validate_reading(index: usize, reading: &Reading) -> Result<(), BatchError> {
    const LIST: &str = "readings";
    for (field, name) in [("source", &reading.source), ("stream", &reading.stream)] {
        if name.is_empty() {
            return Err(BatchError::EmptyName {
                list: LIST,
                index,
                field,
            });
        }
    }
    if reading.seq == 0 {
        return Err(BatchError::ZeroSeq { list: LIST, index });
    }
    validate_seq(LIST, index, "seq", reading.seq)?;
    if let Some((name, _)) = reading.values.iter().find(|(_, v)| !v.is_finite()) {
        return Err(BatchError::NotFinite {
            list: LIST,
            index,
            field: format!("values.{name}"),
        });
    }
    Ok(())
}

fn validate_prediction(index: usize, prediction: &Prediction) -> Result<(), BatchError> {
    const LIST: &str = "predictions";
    for (field, name) in [
        ("model", &prediction.model),
        ("source", &prediction.source),
        ("stream", &prediction.stream),
    ] {
        if name.is_empty() {
            return Err(BatchError::EmptyName {
                list: LIST,
                index,
                field,
            });
        }
    }
    if prediction.seq == 0 {
        return Err(BatchError::ZeroSeq { list: LIST, index });
    }
    validate_seq(LIST, index, "seq", prediction.seq)?;
    validate_seq(LIST, index, "window_end_seq", prediction.window_end_seq)?;
    for (field, value) in [
        ("score", prediction.score),
        ("threshold", prediction.threshold),
    ] {
        if !value.is_finite() {
            return Err(BatchError::NotFinite {
                list: LIST,
                index,
                field: field.to_owned(),
            });
        }
    }
    Ok(())
}

/// Key of a reading sequence in [`UploadAck::readings`] and
/// [`DeviceSummary::readings`]: `"{source}/{stream}"`, since sequence numbers
/// are per `(source, stream)`.
#[must_use]
pub fn reading_key(source: &str, stream: &str) -> String {
    format!("{source}/{stream}")
}

/// Whether `id` is acceptable as a device id (it appears in URL paths).
#[must_use]
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_BYTES
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Hex sha256 of a bearer token, as stored in `devices.token_sha256`.
fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Whether `token` has the shape [`Store::add_device`] hands out (64 hex chars).
fn is_token_shaped(token: &str) -> bool {
    token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A validated sequence number as SQLite's signed integer.
fn sql_seq(value: u64) -> rusqlite::Result<i64> {
    i64::try_from(value).map_err(|err| rusqlite::Error::ToSqlConversionFailure(Box::new(err)))
}

/// A non-negative integer column as `u64`.
fn get_u64(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(idx)?;
    u64::try_from(value).map_err(|err| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Integer,
            Box::new(err),
        )
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Command {
    AddDevice {
        id: String,
        reply: Reply<String>,
    },
    RevokeDevice {
        id: String,
        reply: Reply<()>,
    },
    Authenticate {
        token: String,
        reply: Reply<Option<String>>,
    },
    StoreBatch {
        device: String,
        batch: UploadBatch,
        reply: Reply<UploadAck>,
    },
    Summary {
        device: String,
        reply: Reply<DeviceSummary>,
    },
    Ping {
        reply: Reply<()>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// Cloneable handle to the SQLite worker thread.
///
/// The worker stops when [`Store::close`] is called or when the last handle
/// is dropped.
#[derive(Debug, Clone)]
pub struct Store {
    tx: mpsc::Sender<Command>,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies pending
    /// migrations and starts the worker thread.
    ///
    /// # Errors
    /// [`StoreError::Open`], [`StoreError::Migrate`] or
    /// [`StoreError::SchemaTooNew`] if the database cannot be used;
    /// [`StoreError::SpawnWorker`] if the thread cannot be started.
    pub async fn open(path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref().to_owned();
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE_CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("cloud-sync-store".to_owned())
            .spawn(move || match open_connection(&path) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    Worker { conn }.run(rx);
                }
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                }
            })
            .map_err(|source| StoreError::SpawnWorker { source })?;
        ready_rx.await.map_err(|_| StoreError::Closed)??;
        Ok(Store { tx })
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Registers a device and returns its new bearer token (64 hex chars).
    ///
    /// The token is not stored, only its sha256: show it to the operator once.
    ///
    /// # Errors
    /// [`StoreError::InvalidDeviceId`], [`StoreError::DeviceExists`] (also for
    /// a revoked id), or a storage failure.
    pub async fn add_device(&self, id: &str) -> Result<String> {
        if !is_valid_device_id(id) {
            return Err(StoreError::InvalidDeviceId { id: id.to_owned() });
        }
        let id = id.to_owned();
        self.call(|reply| Command::AddDevice { id, reply }).await
    }

    /// Revokes a device: its token stops authenticating. Its data is kept.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`], or a storage failure.
    pub async fn revoke_device(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call(|reply| Command::RevokeDevice { id, reply }).await
    }

    /// The id of the non-revoked device owning `token`, if any.
    ///
    /// # Errors
    /// Only on a storage failure; an unknown or revoked token is `Ok(None)`.
    pub async fn authenticate(&self, token: &str) -> Result<Option<String>> {
        if !is_token_shaped(token) {
            return Ok(None);
        }
        let token = token.to_owned();
        self.call(|reply| Command::Authenticate { token, reply })
            .await
    }

    /// Stores a batch for `device` exactly once, in one transaction.
    ///
    /// Rows already present (same `(device, source, stream, seq)` or
    /// `(device, model, seq)`) are counted as duplicates and left unchanged.
    ///
    /// # Errors
    /// [`StoreError::InvalidBatch`] (nothing written),
    /// [`StoreError::UnknownDevice`], [`StoreError::DeviceRevoked`], or a
    /// storage failure (nothing written).
    pub async fn store_batch(&self, device: &str, batch: UploadBatch) -> Result<UploadAck> {
        validate_batch(&batch)?;
        let device = device.to_owned();
        self.call(|reply| Command::StoreBatch {
            device,
            batch,
            reply,
        })
        .await
    }

    /// Totals stored for `device`.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`], or a storage failure.
    pub async fn summary(&self, device: &str) -> Result<DeviceSummary> {
        let device = device.to_owned();
        self.call(|reply| Command::Summary { device, reply }).await
    }

    /// Runs a trivial query (readiness probe).
    ///
    /// # Errors
    /// A storage failure, or [`StoreError::Closed`].
    pub async fn ping(&self) -> Result<()> {
        self.call(|reply| Command::Ping { reply }).await
    }

    /// Stops the worker and closes the database. Other handles then fail with
    /// [`StoreError::Closed`].
    ///
    /// # Errors
    /// [`StoreError::CloseFailed`], or [`StoreError::Closed`] if the worker had
    /// already stopped.
    pub async fn close(self) -> Result<()> {
        self.call(|reply| Command::Close { reply }).await
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), %mode, "database is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(open_err)?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    loop {
        // Design: the version is re-read inside an IMMEDIATE transaction so two
        // processes opening a fresh file cannot both apply the same migration.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let current = usize::try_from(found)
            .ok()
            .filter(|v| *v <= MIGRATIONS.len())
            .ok_or(StoreError::SchemaTooNew {
                found,
                supported: MIGRATIONS.len(),
            })?;
        let Some(sql) = MIGRATIONS.get(current) else {
            return Ok(());
        };
        let version = current + 1;
        let migrate_err = |source| StoreError::Migrate { version, source };
        tx.execute_batch(sql).map_err(migrate_err)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(version).unwrap_or(i64::MAX),
        )
        .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
        tracing::info!(version, "applied schema migration");
    }
}

struct Worker {
    conn: Connection,
}

impl Worker {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // A failed reply send means the caller gave up (e.g. request timeout);
        // the operation itself has completed or rolled back either way.
        while let Some(command) = rx.blocking_recv() {
            match command {
                Command::AddDevice { id, reply } => {
                    let _ = reply.send(self.add_device(&id));
                }
                Command::RevokeDevice { id, reply } => {
                    let _ = reply.send(self.revoke_device(&id));
                }
                Command::Authenticate { token, reply } => {
                    let _ = reply.send(self.authenticate(&token));
                }
                Command::StoreBatch {
                    device,
                    batch,
                    reply,
                } => {
                    let _ = reply.send(self.store_batch(&device, &batch));
                }
                Command::Summary { device, reply } => {
                    let _ = reply.send(self.summary(&device));
                }
                Command::Ping { reply } => {
                    let _ = reply.send(self.ping());
                }
                Command::Close { reply } => {
                    rx.close();
                    let result = self
                        .conn
                        .close()
                        .map_err(|(_, err)| StoreError::CloseFailed(err));
                    let _ = reply.send(result);
                    return;
                }
            }
        }
    }

    fn add_device(&mut self, id: &str) -> Result<String> {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let inserted = self.conn.execute(
            "INSERT INTO devices (id, token_sha256, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO NOTHING",
            params![id, token_digest(&token), now_ms()],
        )?;
        if inserted == 0 {
            return Err(StoreError::DeviceExists { id: id.to_owned() });
        }
        Ok(token)
    }

    fn revoke_device(&mut self, id: &str) -> Result<()> {
        let updated = self
            .conn
            .execute("UPDATE devices SET revoked = 1 WHERE id = ?1", [id])?;
        if updated == 0 {
            return Err(StoreError::UnknownDevice { id: id.to_owned() });
        }
        Ok(())
    }

    fn authenticate(&mut self, token: &str) -> Result<Option<String>> {
        let id = self
            .conn
            .prepare_cached("SELECT id FROM devices WHERE token_sha256 = ?1 AND revoked = 0")?
            .query_row([token_digest(token)], |row| row.get(0))
            .optional()?;
        Ok(id)
    }

    fn check_device(tx: &rusqlite::Transaction<'_>, device: &str) -> Result<()> {
        let revoked: Option<bool> = tx
            .prepare_cached("SELECT revoked FROM devices WHERE id = ?1")?
            .query_row([device], |row| row.get(0))
            .optional()?;
        match revoked {
            None => Err(StoreError::UnknownDevice {
                id: device.to_owned(),
            }),
            Some(true) => Err(StoreError::DeviceRevoked {
                id: device.to_owned(),
            }),
            Some(false) => Ok(()),
        }
    }

    fn store_batch(&mut self, device: &str, batch: &UploadBatch) -> Result<UploadAck> {
        validate_batch(batch)?;
        let stored_ms = now_ms();
        let mut ack = UploadAck::default();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Self::check_device(&tx, device)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO readings
                   (device, source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values_json,
                    stored_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT DO NOTHING",
            )?;
            for r in &batch.readings {
                let values_json =
                    serde_json::to_string(&r.values).map_err(StoreError::EncodeValues)?;
                let changed = insert.execute(params![
                    device,
                    r.source,
                    r.stream,
                    sql_seq(r.seq)?,
                    r.device_ts_ms,
                    r.recv_ts_ms,
                    r.clock_ok,
                    values_json,
                    stored_ms,
                ])?;
                if changed == 0 {
                    ack.readings_duplicate += 1;
                } else {
                    ack.readings_inserted += 1;
                }
            }
        }
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO predictions
                   (device, model, seq, model_version, model_sha256, source, stream,
                    window_end_seq, window_end_ts_ms, score, threshold, is_anomaly, created_ms,
                    stored_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT DO NOTHING",
            )?;
            for p in &batch.predictions {
                let changed = insert.execute(params![
                    device,
                    p.model,
                    sql_seq(p.seq)?,
                    p.model_version,
                    p.model_sha256,
                    p.source,
                    p.stream,
                    sql_seq(p.window_end_seq)?,
                    p.window_end_ts_ms,
                    p.score,
                    p.threshold,
                    p.is_anomaly,
                    p.created_ms,
                    stored_ms,
                ])?;
                if changed == 0 {
                    ack.predictions_duplicate += 1;
                } else {
                    ack.predictions_inserted += 1;
                }
            }
        }
        tx.commit()?;
        let reading_keys: Vec<(String, u64)> = batch
            .readings
            .iter()
            .map(|r| (reading_key(&r.source, &r.stream), r.seq))
            .collect();
        ack.readings = ranges(reading_keys.iter().map(|(key, seq)| (key.as_str(), *seq)));
        ack.predictions = ranges(batch.predictions.iter().map(|p| (p.model.as_str(), p.seq)));
        Ok(ack)
    }

    fn summary(&mut self, device: &str) -> Result<DeviceSummary> {
        // A read transaction gives one consistent snapshot across the queries.
        let tx = self.conn.transaction()?;
        let known: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE id = ?1)",
            [device],
            |row| row.get(0),
        )?;
        if !known {
            return Err(StoreError::UnknownDevice {
                id: device.to_owned(),
            });
        }
        let per_key = |sql: &str| -> Result<Vec<StreamSummary>> {
            let mut stmt = tx.prepare_cached(sql)?;
            let rows = stmt.query_map([device], |row| {
                Ok(StreamSummary {
                    key: row.get(0)?,
                    rows: get_u64(row, 1)?,
                    min_seq: get_u64(row, 2)?,
                    max_seq: get_u64(row, 3)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        };
        let readings = per_key(
            "SELECT source || '/' || stream, COUNT(*), MIN(seq), MAX(seq) FROM readings
             WHERE device = ?1 GROUP BY source, stream ORDER BY 1",
        )?;
        let predictions = per_key(
            "SELECT model, COUNT(*), MIN(seq), MAX(seq) FROM predictions
             WHERE device = ?1 GROUP BY model ORDER BY model",
        )?;
        let anomalies = tx.query_row(
            "SELECT COUNT(*) FROM predictions WHERE device = ?1 AND is_anomaly = 1",
            [device],
            |row| get_u64(row, 0),
        )?;
        tx.commit()?;
        Ok(DeviceSummary {
            device: device.to_owned(),
            readings,
            predictions,
            anomalies,
        })
    }

    fn ping(&mut self) -> Result<()> {
        let one: i64 = self.conn.query_row("SELECT 1", [], |row| row.get(0))?;
        debug_assert_eq!(one, 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use sync_protocol::SeqRange;

    use super::*;

    fn reading(stream: &str, seq: u64, value: f64) -> Reading {
        Reading {
            source: "m1".to_owned(),
            stream: stream.to_owned(),
            seq,
            device_ts_ms: Some(1_700_000_000_000 + i64::try_from(seq).unwrap()),
            recv_ts_ms: 1_700_000_000_500,
            clock_ok: true,
            values: BTreeMap::from([("value".to_owned(), value)]),
        }
    }

    fn prediction(model: &str, seq: u64, score: f64, is_anomaly: bool) -> Prediction {
        Prediction {
            model: model.to_owned(),
            model_version: "1.0.0".to_owned(),
            model_sha256: "ab".repeat(32),
            seq,
            source: "m1".to_owned(),
            stream: "temperature".to_owned(),
            window_end_seq: seq,
            window_end_ts_ms: None,
            score,
            threshold: 0.5,
            is_anomaly,
            created_ms: 1_700_000_001_000,
        }
    }

    fn batch(
        readings: impl IntoIterator<Item = u64>,
        predictions: impl IntoIterator<Item = u64>,
    ) -> UploadBatch {
        UploadBatch {
            readings: readings
                .into_iter()
                .map(|s| reading("temperature", s, 20.0 + s as f64))
                .collect(),
            predictions: predictions
                .into_iter()
                .map(|s| prediction("iforest", s, 0.1, s % 2 == 0))
                .collect(),
        }
    }

    async fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("cloud.db")).await.unwrap();
        (dir, store)
    }

    fn readings_dump(path: &Path) -> Vec<(String, i64, String, i64)> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT stream, seq, values_json, stored_ms FROM readings ORDER BY stream, seq",
            )
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    #[tokio::test]
    async fn stores_a_batch_and_summarises_it() {
        let (_dir, store) = open().await;
        store.add_device("dev-1").await.unwrap();
        let ack = store
            .store_batch("dev-1", batch(1..=5, 1..=4))
            .await
            .unwrap();
        assert_eq!(ack.readings_inserted, 5);
        assert_eq!(ack.readings_duplicate, 0);
        assert_eq!(ack.predictions_inserted, 4);
        assert_eq!(
            ack.readings,
            vec![SeqRange {
                key: "m1/temperature".into(),
                first: 1,
                last: 5
            }]
        );
        assert_eq!(
            ack.predictions,
            vec![SeqRange {
                key: "iforest".into(),
                first: 1,
                last: 4
            }]
        );

        let summary = store.summary("dev-1").await.unwrap();
        assert_eq!(summary.device, "dev-1");
        assert_eq!(
            summary.readings,
            vec![StreamSummary {
                key: "m1/temperature".into(),
                rows: 5,
                min_seq: 1,
                max_seq: 5
            }]
        );
        assert_eq!(summary.predictions[0].rows, 4);
        assert_eq!(summary.anomalies, 2);
    }

    #[tokio::test]
    async fn replaying_the_same_batch_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let store = Store::open(&path).await.unwrap();
        store.add_device("dev-1").await.unwrap();
        let first = store
            .store_batch("dev-1", batch(1..=3, 1..=2))
            .await
            .unwrap();
        let before = readings_dump(&path);

        let again = store
            .store_batch("dev-1", batch(1..=3, 1..=2))
            .await
            .unwrap();
        assert_eq!(again.readings_inserted, 0);
        assert_eq!(again.readings_duplicate, 3);
        assert_eq!(again.predictions_inserted, 0);
        assert_eq!(again.predictions_duplicate, 2);
        assert_eq!(again.readings, first.readings);
        assert_eq!(again.predictions, first.predictions);
        assert_eq!(readings_dump(&path), before);
    }

    #[tokio::test]
    async fn replay_keeps_the_first_stored_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let store = Store::open(&path).await.unwrap();
        store.add_device("dev-1").await.unwrap();
        store
            .store_batch(
                "dev-1",
                UploadBatch {
                    readings: vec![reading("t", 1, 1.0)],
                    predictions: vec![],
                },
            )
            .await
            .unwrap();
        let ack = store
            .store_batch(
                "dev-1",
                UploadBatch {
                    readings: vec![reading("t", 1, 99.0)],
                    predictions: vec![],
                },
            )
            .await
            .unwrap();
        assert_eq!(ack.readings_duplicate, 1);
        assert_eq!(readings_dump(&path)[0].2, r#"{"value":1.0}"#);
    }

    #[tokio::test]
    async fn overlapping_batch_inserts_only_new_rows() {
        let (_dir, store) = open().await;
        store.add_device("dev-1").await.unwrap();
        store
            .store_batch("dev-1", batch(1..=10, 1..=5))
            .await
            .unwrap();
        let ack = store
            .store_batch("dev-1", batch(6..=15, 4..=8))
            .await
            .unwrap();
        assert_eq!((ack.readings_inserted, ack.readings_duplicate), (5, 5));
        assert_eq!(
            (ack.predictions_inserted, ack.predictions_duplicate),
            (3, 2)
        );
        assert_eq!(ack.readings[0].first, 6);
        assert_eq!(ack.readings[0].last, 15);

        let summary = store.summary("dev-1").await.unwrap();
        assert_eq!(summary.readings[0].rows, 15);
        assert_eq!(summary.readings[0].max_seq, 15);
        assert_eq!(summary.predictions[0].rows, 8);
    }

    #[tokio::test]
    async fn sources_have_their_own_sequences() {
        let (_dir, store) = open().await;
        store.add_device("dev-1").await.unwrap();
        let mut other = batch(1..=3, []);
        for r in &mut other.readings {
            r.source = "m2".into();
        }
        store.store_batch("dev-1", batch(1..=3, [])).await.unwrap();
        let ack = store.store_batch("dev-1", other).await.unwrap();
        assert_eq!((ack.readings_inserted, ack.readings_duplicate), (3, 0));
        assert_eq!(ack.readings[0].key, "m2/temperature");
        let summary = store.summary("dev-1").await.unwrap();
        let keys: Vec<_> = summary
            .readings
            .iter()
            .map(|s| (s.key.as_str(), s.rows, s.max_seq))
            .collect();
        assert_eq!(keys, [("m1/temperature", 3, 3), ("m2/temperature", 3, 3)]);
    }

    #[tokio::test]
    async fn devices_do_not_share_sequence_spaces() {
        let (_dir, store) = open().await;
        store.add_device("a").await.unwrap();
        store.add_device("b").await.unwrap();
        store.store_batch("a", batch(1..=3, [])).await.unwrap();
        let ack = store.store_batch("b", batch(1..=3, [])).await.unwrap();
        assert_eq!(ack.readings_inserted, 3);
    }

    #[tokio::test]
    async fn invalid_batch_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let store = Store::open(&path).await.unwrap();
        store.add_device("dev-1").await.unwrap();

        let cases: Vec<(UploadBatch, BatchError)> = vec![
            (
                {
                    let mut b = batch(1..=3, 1..=1);
                    b.readings[2].seq = 0;
                    b
                },
                BatchError::ZeroSeq {
                    list: "readings",
                    index: 2,
                },
            ),
            (
                {
                    let mut b = batch(1..=3, 1..=1);
                    b.readings[1].stream.clear();
                    b
                },
                BatchError::EmptyName {
                    list: "readings",
                    index: 1,
                    field: "stream",
                },
            ),
            (
                {
                    let mut b = batch(1..=3, 1..=1);
                    b.readings[2].source.clear();
                    b
                },
                BatchError::EmptyName {
                    list: "readings",
                    index: 2,
                    field: "source",
                },
            ),
            (
                {
                    let mut b = batch(1..=3, 1..=2);
                    b.predictions[1].model.clear();
                    b
                },
                BatchError::EmptyName {
                    list: "predictions",
                    index: 1,
                    field: "model",
                },
            ),
            (
                {
                    let mut b = batch(1..=3, 1..=1);
                    b.readings[0].values.insert("bad".into(), f64::NAN);
                    b
                },
                BatchError::NotFinite {
                    list: "readings",
                    index: 0,
                    field: "values.bad".into(),
                },
            ),
            (
                {
                    let mut b = batch(1..=3, 1..=1);
                    b.predictions[0].score = f64::INFINITY;
                    b
                },
                BatchError::NotFinite {
                    list: "predictions",
                    index: 0,
                    field: "score".into(),
                },
            ),
            (
                {
                    let mut b = batch(1..=3, 1..=1);
                    b.predictions[0].seq = u64::MAX;
                    b
                },
                BatchError::SeqTooLarge {
                    list: "predictions",
                    index: 0,
                    field: "seq",
                    value: u64::MAX,
                },
            ),
        ];
        for (bad, expected) in cases {
            match store.store_batch("dev-1", bad).await {
                Err(StoreError::InvalidBatch(got)) => assert_eq!(got, expected),
                other => panic!("expected {expected:?}, got {other:?}"),
            }
        }
        assert!(readings_dump(&path).is_empty());
        let summary = store.summary("dev-1").await.unwrap();
        assert!(summary.readings.is_empty());
        assert!(summary.predictions.is_empty());
    }

    #[tokio::test]
    async fn batch_for_unknown_device_is_refused() {
        let (_dir, store) = open().await;
        let err = store.store_batch("ghost", batch(1..=1, [])).await;
        assert!(
            matches!(err, Err(StoreError::UnknownDevice { .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn tokens_authenticate_their_device_until_revoked() {
        let (_dir, store) = open().await;
        let a = store.add_device("dev-a").await.unwrap();
        let b = store.add_device("dev-b").await.unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(
            store.authenticate(&a).await.unwrap().as_deref(),
            Some("dev-a")
        );
        assert_eq!(
            store.authenticate(&b).await.unwrap().as_deref(),
            Some("dev-b")
        );
        assert_eq!(store.authenticate(&"0".repeat(64)).await.unwrap(), None);
        assert_eq!(store.authenticate("not a token").await.unwrap(), None);
        assert_eq!(store.authenticate("").await.unwrap(), None);

        store.revoke_device("dev-a").await.unwrap();
        assert_eq!(store.authenticate(&a).await.unwrap(), None);
        assert_eq!(
            store.authenticate(&b).await.unwrap().as_deref(),
            Some("dev-b")
        );
        let err = store.store_batch("dev-a", batch(1..=1, [])).await;
        assert!(
            matches!(err, Err(StoreError::DeviceRevoked { .. })),
            "{err:?}"
        );
        // Data stays readable after revocation.
        assert!(store.summary("dev-a").await.is_ok());
    }

    #[tokio::test]
    async fn device_ids_are_unique_and_checked() {
        let (_dir, store) = open().await;
        store.add_device("dev-1").await.unwrap();
        store.revoke_device("dev-1").await.unwrap();
        let err = store.add_device("dev-1").await;
        assert!(
            matches!(err, Err(StoreError::DeviceExists { .. })),
            "{err:?}"
        );
        for bad in ["", "a/b", "..", "has space", &"x".repeat(129)] {
            let err = store.add_device(bad).await;
            assert!(
                matches!(err, Err(StoreError::InvalidDeviceId { .. })),
                "{bad:?}: {err:?}"
            );
        }
        let err = store.revoke_device("ghost").await;
        assert!(
            matches!(err, Err(StoreError::UnknownDevice { .. })),
            "{err:?}"
        );
        let err = store.summary("ghost").await;
        assert!(
            matches!(err, Err(StoreError::UnknownDevice { .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn token_is_stored_only_as_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let store = Store::open(&path).await.unwrap();
        let token = store.add_device("dev-1").await.unwrap();
        let conn = Connection::open(&path).unwrap();
        let stored: String = conn
            .query_row(
                "SELECT token_sha256 FROM devices WHERE id = 'dev-1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_ne!(stored, token);
        assert_eq!(stored, token_digest(&token));
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let store = Store::open(&path).await.unwrap();
        let token = store.add_device("dev-1").await.unwrap();
        store.store_batch("dev-1", batch(1..=4, [])).await.unwrap();
        store.clone().close().await.unwrap();
        assert!(matches!(store.ping().await, Err(StoreError::Closed)));

        let store = Store::open(&path).await.unwrap();
        store.ping().await.unwrap();
        assert_eq!(
            store.authenticate(&token).await.unwrap().as_deref(),
            Some("dev-1")
        );
        assert_eq!(store.summary("dev-1").await.unwrap().readings[0].rows, 4);

        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, i64::try_from(MIGRATIONS.len()).unwrap());
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).await;
        assert!(
            matches!(err, Err(StoreError::SchemaTooNew { found: 99, .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn unopenable_path_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Store::open(dir.path().join("missing-dir").join("cloud.db")).await;
        assert!(matches!(err, Err(StoreError::Open { .. })), "{err:?}");
    }
}
