//! SQLite backend: the only code that touches rusqlite.
//!
//! The [`Connection`] lives on one dedicated worker thread; [`SqliteStore`]
//! is a cloneable handle that sends commands over a bounded channel, each
//! carrying a [`oneshot`] sender for its reply. Inputs arrive already checked
//! by [`super::Store`]. Durability: WAL with `synchronous=FULL`; one
//! `IMMEDIATE` transaction per batch, so writers are serialised.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sync_protocol::{
    DeadLetterRecord, DeviceSummary, FleetDevice, Prediction, Reading, StoredDeadLetter,
    StoredHeartbeat, StoredPrediction, StoredReading, StreamSummary, UploadBatch,
};
use tokio::sync::{mpsc, oneshot};

use super::query::{PredictionsQuery, ReadingsQuery, SeriesQuery};
use super::{
    FLEET_SQL_SQLITE, FleetRow, InsertCounts, Principal, Result, StoreError, now_ms,
    parse_heartbeat, parse_values, stored_u64, time_bounds, validate_batch,
};

/// Capacity of the command queue in front of the worker thread.
// Design: small on purpose; callers wait (backpressure) rather than queueing
// unbounded work behind a slow disk.
pub const COMMAND_QUEUE_CAPACITY: usize = 64;

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
    // 2: dead letters, heartbeats, operators; time-ordered read indexes.
    "CREATE TABLE dead_letters (
        device      TEXT NOT NULL REFERENCES devices (id),
        seq         INTEGER NOT NULL,
        topic       TEXT NOT NULL,
        reason      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        payload_b64 TEXT NOT NULL,
        payload_len INTEGER NOT NULL,
        recv_ts_ms  INTEGER NOT NULL,
        stored_ms   INTEGER NOT NULL,
        PRIMARY KEY (device, seq)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX dead_letters_by_time ON dead_letters (device, recv_ts_ms, seq);
    CREATE TABLE heartbeats (
        id          INTEGER PRIMARY KEY,
        device      TEXT NOT NULL REFERENCES devices (id),
        received_ms INTEGER NOT NULL,
        sent_ms     INTEGER NOT NULL,
        body_json   TEXT NOT NULL
    ) STRICT;
    CREATE INDEX heartbeats_by_time ON heartbeats (device, received_ms, id);
    CREATE TABLE operators (
        name         TEXT PRIMARY KEY NOT NULL,
        token_sha256 TEXT NOT NULL,
        created_ms   INTEGER NOT NULL,
        revoked      INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    CREATE UNIQUE INDEX operators_token_sha256 ON operators (token_sha256);
    CREATE INDEX readings_by_time ON readings (device, recv_ts_ms, source, stream, seq);
    CREATE INDEX predictions_by_time ON predictions (device, created_ms, model, seq);",
    // 3: what a classifier predicted: its label (NULL for anomaly scores)
    // and per-class probabilities as little-endian f64s, 8 bytes each (NULL
    // when none; `sync_protocol::probabilities_to_bytes`).
    "ALTER TABLE predictions ADD COLUMN label TEXT;
    ALTER TABLE predictions ADD COLUMN probabilities BLOB;",
];

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

/// A `probabilities` column (see `sync_protocol::probabilities_to_bytes`).
fn get_probabilities(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Vec<f64>> {
    let bytes: Option<Vec<u8>> = row.get(idx)?;
    sync_protocol::probabilities_from_bytes(bytes.as_deref()).map_err(|err| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Blob, Box::new(err))
    })
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Command {
    AddDevice {
        id: String,
        token_sha256: String,
        reply: Reply<()>,
    },
    RevokeDevice {
        id: String,
        reply: Reply<()>,
    },
    Authenticate {
        token_sha256: String,
        reply: Reply<Option<Principal>>,
    },
    StoreBatch {
        device: String,
        batch: UploadBatch,
        reply: Reply<InsertCounts>,
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
    /// Any other operation: the closure runs on the worker and sends its own reply.
    Job(Box<dyn FnOnce(&mut Worker) + Send>),
}

/// Cloneable handle to the SQLite worker thread.
///
/// The worker stops when [`SqliteStore::close`] is called or when the last
/// handle is dropped.
#[derive(Debug, Clone)]
pub(super) struct SqliteStore {
    tx: mpsc::Sender<Command>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending
    /// migrations and starts the worker thread.
    pub(super) async fn open(path: &Path) -> Result<SqliteStore> {
        let path = path.to_owned();
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
        Ok(SqliteStore { tx })
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub(super) async fn add_device(&self, id: &str, token_sha256: String) -> Result<()> {
        let id = id.to_owned();
        self.call(|reply| Command::AddDevice {
            id,
            token_sha256,
            reply,
        })
        .await
    }

    pub(super) async fn revoke_device(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.call(|reply| Command::RevokeDevice { id, reply }).await
    }

    /// Runs `job` on the worker thread.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Worker) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.call(|reply| {
            Command::Job(Box::new(move |worker| {
                let _ = reply.send(job(worker));
            }))
        })
        .await
    }

    pub(super) async fn device_is_active(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.run(move |w| w.device_is_active(&id)).await
    }

    pub(super) async fn add_operator(&self, name: &str, token_sha256: String) -> Result<()> {
        let name = name.to_owned();
        self.run(move |w| w.add_operator(&name, &token_sha256))
            .await
    }

    pub(super) async fn revoke_operator(&self, name: &str) -> Result<()> {
        let name = name.to_owned();
        self.run(move |w| w.revoke_operator(&name)).await
    }

    pub(super) async fn store_heartbeat(
        &self,
        device: &str,
        received_ms: i64,
        sent_ms: i64,
        body: String,
    ) -> Result<()> {
        let device = device.to_owned();
        self.run(move |w| w.store_heartbeat(&device, received_ms, sent_ms, &body))
            .await
    }

    pub(super) async fn readings(
        &self,
        device: &str,
        query: ReadingsQuery,
    ) -> Result<Vec<StoredReading>> {
        let device = device.to_owned();
        self.run(move |w| w.readings(&device, &query)).await
    }

    pub(super) async fn predictions(
        &self,
        device: &str,
        query: PredictionsQuery,
    ) -> Result<Vec<StoredPrediction>> {
        let device = device.to_owned();
        self.run(move |w| w.predictions(&device, &query)).await
    }

    pub(super) async fn dead_letters(
        &self,
        device: &str,
        query: SeriesQuery,
    ) -> Result<Vec<StoredDeadLetter>> {
        let device = device.to_owned();
        self.run(move |w| w.dead_letters(&device, &query)).await
    }

    pub(super) async fn heartbeats(
        &self,
        device: &str,
        query: SeriesQuery,
    ) -> Result<Vec<(i64, StoredHeartbeat)>> {
        let device = device.to_owned();
        self.run(move |w| w.heartbeats(&device, &query)).await
    }

    pub(super) async fn fleet(&self, after: String, fetch: i64) -> Result<Vec<FleetDevice>> {
        self.run(move |w| w.fleet(&after, fetch)).await
    }

    pub(super) async fn authenticate(&self, token_sha256: String) -> Result<Option<Principal>> {
        self.call(|reply| Command::Authenticate {
            token_sha256,
            reply,
        })
        .await
    }

    pub(super) async fn store_batch(
        &self,
        device: &str,
        batch: UploadBatch,
    ) -> Result<InsertCounts> {
        let device = device.to_owned();
        self.call(|reply| Command::StoreBatch {
            device,
            batch,
            reply,
        })
        .await
    }

    pub(super) async fn summary(&self, device: &str) -> Result<DeviceSummary> {
        let device = device.to_owned();
        self.call(|reply| Command::Summary { device, reply }).await
    }

    pub(super) async fn ping(&self) -> Result<()> {
        self.call(|reply| Command::Ping { reply }).await
    }

    pub(super) async fn close(self) -> Result<()> {
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
                Command::AddDevice {
                    id,
                    token_sha256,
                    reply,
                } => {
                    let _ = reply.send(self.add_device(&id, &token_sha256));
                }
                Command::RevokeDevice { id, reply } => {
                    let _ = reply.send(self.revoke_device(&id));
                }
                Command::Authenticate {
                    token_sha256,
                    reply,
                } => {
                    let _ = reply.send(self.authenticate(&token_sha256));
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
                Command::Job(job) => job(&mut self),
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

    fn add_device(&mut self, id: &str, token_sha256: &str) -> Result<()> {
        let inserted = self.conn.execute(
            "INSERT INTO devices (id, token_sha256, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO NOTHING",
            params![id, token_sha256, now_ms()],
        )?;
        if inserted == 0 {
            return Err(StoreError::DeviceExists { id: id.to_owned() });
        }
        Ok(())
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

    fn authenticate(&mut self, token_sha256: &str) -> Result<Option<Principal>> {
        let found: Option<(bool, String)> = self
            .conn
            .prepare_cached(
                "SELECT 0, id FROM devices WHERE token_sha256 = ?1 AND revoked = 0
                 UNION ALL
                 SELECT 1, name FROM operators WHERE token_sha256 = ?1 AND revoked = 0
                 LIMIT 1",
            )?
            .query_row([token_sha256], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        Ok(found.map(|(operator, id)| {
            if operator {
                Principal::Operator(id)
            } else {
                Principal::Device(id)
            }
        }))
    }

    fn device_is_active(&mut self, id: &str) -> Result<bool> {
        let revoked: Option<bool> = self
            .conn
            .prepare_cached("SELECT revoked FROM devices WHERE id = ?1")?
            .query_row([id], |row| row.get(0))
            .optional()?;
        Ok(revoked == Some(false))
    }

    fn add_operator(&mut self, name: &str, token_sha256: &str) -> Result<()> {
        let inserted = self.conn.execute(
            "INSERT INTO operators (name, token_sha256, created_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO NOTHING",
            params![name, token_sha256, now_ms()],
        )?;
        if inserted == 0 {
            return Err(StoreError::OperatorExists {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn revoke_operator(&mut self, name: &str) -> Result<()> {
        let updated = self
            .conn
            .execute("UPDATE operators SET revoked = 1 WHERE name = ?1", [name])?;
        if updated == 0 {
            return Err(StoreError::UnknownOperator {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn store_heartbeat(
        &mut self,
        device: &str,
        received_ms: i64,
        sent_ms: i64,
        body: &str,
    ) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Self::check_device(&tx, device)?;
        tx.prepare_cached(
            "INSERT INTO heartbeats (device, received_ms, sent_ms, body_json)
             VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![device, received_ms, sent_ms, body])?;
        tx.commit()?;
        Ok(())
    }

    /// [`StoreError::UnknownDevice`] unless `device` is registered (revoked or not).
    fn require_device(tx: &rusqlite::Transaction<'_>, device: &str) -> Result<()> {
        let known: bool = tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM devices WHERE id = ?1)")?
            .query_row([device], |row| row.get(0))?;
        if !known {
            return Err(StoreError::UnknownDevice {
                id: device.to_owned(),
            });
        }
        Ok(())
    }

    fn readings(&mut self, device: &str, q: &ReadingsQuery) -> Result<Vec<StoredReading>> {
        let tx = self.conn.transaction()?;
        Self::require_device(&tx, device)?;
        let (from, to) = time_bounds(&q.window);
        let (at, source, stream, seq) =
            q.after
                .clone()
                .unwrap_or((i64::MIN, String::new(), String::new(), i64::MIN));
        type Raw = (String, String, i64, Option<i64>, i64, bool, String, i64);
        let raw: Vec<Raw> = tx
            .prepare_cached(
                "SELECT source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values_json,
                        stored_ms
                 FROM readings
                 WHERE device = ?1 AND recv_ts_ms BETWEEN ?2 AND ?3
                   AND (recv_ts_ms, source, stream, seq) > (?4, ?5, ?6, ?7)
                   AND (?8 IS NULL OR source = ?8) AND (?9 IS NULL OR stream = ?9)
                 ORDER BY recv_ts_ms, source, stream, seq
                 LIMIT ?10",
            )?
            .query_map(
                params![
                    device,
                    from,
                    to,
                    at,
                    source,
                    stream,
                    seq,
                    q.source,
                    q.stream,
                    q.window.fetch()
                ],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                        row.get(6)?,
                        row.get(7)?,
                    ))
                },
            )?
            .collect::<rusqlite::Result<_>>()?;
        tx.commit()?;
        raw.into_iter()
            .map(
                |(source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values, stored_ms)| {
                    Ok(StoredReading {
                        stored_ms,
                        reading: Reading {
                            source,
                            stream,
                            seq: stored_u64("readings.seq", seq)?,
                            device_ts_ms,
                            recv_ts_ms,
                            clock_ok,
                            values: parse_values(&values)?,
                        },
                    })
                },
            )
            .collect()
    }

    fn predictions(&mut self, device: &str, q: &PredictionsQuery) -> Result<Vec<StoredPrediction>> {
        let tx = self.conn.transaction()?;
        Self::require_device(&tx, device)?;
        let (from, to) = time_bounds(&q.window);
        let (at, model, seq) = q
            .after
            .clone()
            .unwrap_or((i64::MIN, String::new(), i64::MIN));
        let rows: Vec<StoredPrediction> = tx
            .prepare_cached(
                "SELECT model, seq, model_version, model_sha256, source, stream, window_end_seq,
                        window_end_ts_ms, score, threshold, is_anomaly, created_ms, stored_ms,
                        label, probabilities
                 FROM predictions
                 WHERE device = ?1 AND created_ms BETWEEN ?2 AND ?3
                   AND (created_ms, model, seq) > (?4, ?5, ?6)
                   AND (?7 IS NULL OR model = ?7) AND (?8 IS NULL OR source = ?8)
                   AND (?9 IS NULL OR stream = ?9)
                 ORDER BY created_ms, model, seq
                 LIMIT ?10",
            )?
            .query_map(
                params![
                    device,
                    from,
                    to,
                    at,
                    model,
                    seq,
                    q.model,
                    q.source,
                    q.stream,
                    q.window.fetch()
                ],
                |row| {
                    Ok(StoredPrediction {
                        prediction: Prediction {
                            model: row.get(0)?,
                            seq: get_u64(row, 1)?,
                            model_version: row.get(2)?,
                            model_sha256: row.get(3)?,
                            source: row.get(4)?,
                            stream: row.get(5)?,
                            window_end_seq: get_u64(row, 6)?,
                            window_end_ts_ms: row.get(7)?,
                            score: row.get(8)?,
                            threshold: row.get(9)?,
                            is_anomaly: row.get(10)?,
                            created_ms: row.get(11)?,
                            label: row.get(13)?,
                            probabilities: get_probabilities(row, 14)?,
                        },
                        stored_ms: row.get(12)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<_>>()?;
        tx.commit()?;
        Ok(rows)
    }

    fn dead_letters(&mut self, device: &str, q: &SeriesQuery) -> Result<Vec<StoredDeadLetter>> {
        let tx = self.conn.transaction()?;
        Self::require_device(&tx, device)?;
        let (from, to) = time_bounds(&q.window);
        let (at, seq) = q.after.unwrap_or((i64::MIN, i64::MIN));
        let rows: Vec<StoredDeadLetter> = tx
            .prepare_cached(
                "SELECT seq, topic, reason, detail, payload_b64, payload_len, recv_ts_ms, stored_ms
                 FROM dead_letters
                 WHERE device = ?1 AND recv_ts_ms BETWEEN ?2 AND ?3
                   AND (recv_ts_ms, seq) > (?4, ?5)
                 ORDER BY recv_ts_ms, seq
                 LIMIT ?6",
            )?
            .query_map(
                params![device, from, to, at, seq, q.window.fetch()],
                |row| {
                    Ok(StoredDeadLetter {
                        dead_letter: DeadLetterRecord {
                            seq: get_u64(row, 0)?,
                            topic: row.get(1)?,
                            reason: row.get(2)?,
                            detail: row.get(3)?,
                            payload_b64: row.get(4)?,
                            payload_len: get_u64(row, 5)?,
                            recv_ts_ms: row.get(6)?,
                        },
                        stored_ms: row.get(7)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<_>>()?;
        tx.commit()?;
        Ok(rows)
    }

    fn heartbeats(&mut self, device: &str, q: &SeriesQuery) -> Result<Vec<(i64, StoredHeartbeat)>> {
        let tx = self.conn.transaction()?;
        Self::require_device(&tx, device)?;
        let (from, to) = time_bounds(&q.window);
        let (at, id) = q.after.unwrap_or((i64::MIN, i64::MIN));
        let raw: Vec<(i64, i64, String)> = tx
            .prepare_cached(
                "SELECT id, received_ms, body_json FROM heartbeats
                 WHERE device = ?1 AND received_ms BETWEEN ?2 AND ?3
                   AND (received_ms, id) > (?4, ?5)
                 ORDER BY received_ms, id
                 LIMIT ?6",
            )?
            .query_map(params![device, from, to, at, id, q.window.fetch()], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        tx.commit()?;
        raw.into_iter()
            .map(|(id, received_ms, body)| {
                Ok((
                    id,
                    StoredHeartbeat {
                        received_ms,
                        heartbeat: parse_heartbeat(&body)?,
                    },
                ))
            })
            .collect()
    }

    fn fleet(&mut self, after: &str, fetch: i64) -> Result<Vec<FleetDevice>> {
        let tx = self.conn.transaction()?;
        let rows: Vec<FleetRow> = tx
            .prepare_cached(FLEET_SQL_SQLITE)?
            .query_map(rusqlite::params![after, fetch], |row| {
                Ok(FleetRow {
                    device: row.get(0)?,
                    revoked: row.get(1)?,
                    created_ms: row.get(2)?,
                    readings: row.get(3)?,
                    readings_last_ms: row.get(4)?,
                    predictions: row.get(5)?,
                    predictions_last_ms: row.get(6)?,
                    dead_letters: row.get(7)?,
                    dead_letters_last_ms: row.get(8)?,
                    heartbeats: row.get(9)?,
                    last_heartbeat_ms: row.get(10)?,
                    last_heartbeat_json: row.get(11)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        tx.commit()?;
        rows.into_iter().map(FleetRow::into_device).collect()
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

    fn store_batch(&mut self, device: &str, batch: &UploadBatch) -> Result<InsertCounts> {
        validate_batch(batch)?;
        let stored_ms = now_ms();
        let mut ack = InsertCounts::default();
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
                    stored_ms, label, probabilities)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
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
                    p.label,
                    sync_protocol::probabilities_to_bytes(&p.probabilities),
                ])?;
                if changed == 0 {
                    ack.predictions_duplicate += 1;
                } else {
                    ack.predictions_inserted += 1;
                }
            }
        }
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO dead_letters
                   (device, seq, topic, reason, detail, payload_b64, payload_len, recv_ts_ms,
                    stored_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT DO NOTHING",
            )?;
            for d in &batch.dead_letters {
                let changed = insert.execute(params![
                    device,
                    sql_seq(d.seq)?,
                    d.topic,
                    d.reason,
                    d.detail,
                    d.payload_b64,
                    sql_seq(d.payload_len)?,
                    d.recv_ts_ms,
                    stored_ms,
                ])?;
                if changed == 0 {
                    ack.dead_letters_duplicate += 1;
                } else {
                    ack.dead_letters_inserted += 1;
                }
            }
        }
        tx.commit()?;
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
    //! SQLite specifics only; the store contract is tested on every backend
    //! in `tests/it/store.rs`.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use super::*;
    use crate::store::Store;
    use sync_protocol::Reading;

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

    fn batch(readings: impl IntoIterator<Item = u64>) -> UploadBatch {
        UploadBatch {
            readings: readings
                .into_iter()
                .map(|s| reading("temperature", s, 20.0 + s as f64))
                .collect(),
            predictions: vec![],
            dead_letters: vec![],
        }
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        let store = Store::open(&path).await.unwrap();
        let token = store.add_device("dev-1").await.unwrap();
        store.store_batch("dev-1", batch(1..=4)).await.unwrap();
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
