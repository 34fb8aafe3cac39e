//! PostgreSQL backend: the only code that touches tokio-postgres.
//!
//! [`PgStore`] is a cloneable handle to a small pool of connections (at most
//! `database_max_connections`, opened on demand, kept while healthy). Inputs
//! arrive already checked by [`super::Store`].
//!
//! Invariants:
//! - Several cloud-sync instances may share one database. Exactly-once
//!   storage is enforced by the database alone (primary keys, `ON CONFLICT DO
//!   NOTHING`, one transaction per batch), never by state in this process.
//! - Migrations run at start in one transaction holding a transaction-level
//!   advisory lock, so instances starting together apply each one once.
//! - A connection whose operation was interrupted (the request timed out and
//!   its future was dropped) is closed, never returned to the pool, so no
//!   half-finished transaction can leak into the next request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sync_protocol::{
    DeadLetterRecord, DeviceSummary, FleetDevice, Prediction, Reading, StoredDeadLetter,
    StoredHeartbeat, StoredPrediction, StoredReading, StreamSummary, UploadBatch,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, IsolationLevel, NoTls, Row, Statement};

use super::query::{PredictionsQuery, ReadingsQuery, SeriesQuery};
use super::{
    BatchError, FLEET_SQL_POSTGRES, FleetRow, InsertCounts, Principal, Result, StoreError, now_ms,
    parse_heartbeat, parse_values, reading_key, time_bounds,
};
use crate::config::PostgresSettings;

/// Connect timeout used when `database_url` sets none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `application_name` used when `database_url` sets none (shows in `pg_stat_activity`).
const APPLICATION_NAME: &str = "cloud-sync";

/// Attempts for a batch transaction aborted by a deadlock or serialization failure.
const MAX_BATCH_ATTEMPTS: u32 = 3;

/// Schema migrations; migration `i` takes `schema_migrations` from version `i`
/// to `i + 1`. The tables mirror the SQLite schema.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE devices (
        id           TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL,
        created_ms   BIGINT NOT NULL,
        revoked      BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE UNIQUE INDEX devices_token_sha256 ON devices (token_sha256);
    CREATE TABLE readings (
        device       TEXT NOT NULL REFERENCES devices (id),
        source       TEXT NOT NULL,
        stream       TEXT NOT NULL,
        seq          BIGINT NOT NULL,
        device_ts_ms BIGINT,
        recv_ts_ms   BIGINT NOT NULL,
        clock_ok     BOOLEAN NOT NULL,
        values_json  JSONB NOT NULL,
        stored_ms    BIGINT NOT NULL,
        PRIMARY KEY (device, source, stream, seq)
    );
    CREATE TABLE predictions (
        device           TEXT NOT NULL REFERENCES devices (id),
        model            TEXT NOT NULL,
        seq              BIGINT NOT NULL,
        model_version    TEXT NOT NULL,
        model_sha256     TEXT NOT NULL,
        source           TEXT NOT NULL,
        stream           TEXT NOT NULL,
        window_end_seq   BIGINT NOT NULL,
        window_end_ts_ms BIGINT,
        score            DOUBLE PRECISION NOT NULL,
        threshold        DOUBLE PRECISION NOT NULL,
        is_anomaly       BOOLEAN NOT NULL,
        created_ms       BIGINT NOT NULL,
        stored_ms        BIGINT NOT NULL,
        PRIMARY KEY (device, model, seq)
    );",
    // 2: dead letters, heartbeats, operators; time-ordered read indexes
    // (strings in byte order, as the reads sort them).
    "CREATE TABLE dead_letters (
        device      TEXT NOT NULL REFERENCES devices (id),
        seq         BIGINT NOT NULL,
        topic       TEXT NOT NULL,
        reason      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        payload_b64 TEXT NOT NULL,
        payload_len BIGINT NOT NULL,
        recv_ts_ms  BIGINT NOT NULL,
        stored_ms   BIGINT NOT NULL,
        PRIMARY KEY (device, seq)
    );
    CREATE INDEX dead_letters_by_time ON dead_letters (device, recv_ts_ms, seq);
    CREATE TABLE heartbeats (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        device      TEXT NOT NULL REFERENCES devices (id),
        received_ms BIGINT NOT NULL,
        sent_ms     BIGINT NOT NULL,
        body_json   JSONB NOT NULL
    );
    CREATE INDEX heartbeats_by_time ON heartbeats (device, received_ms, id);
    CREATE TABLE operators (
        name         TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL,
        created_ms   BIGINT NOT NULL,
        revoked      BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE UNIQUE INDEX operators_token_sha256 ON operators (token_sha256);
    CREATE INDEX readings_by_time
        ON readings (device, recv_ts_ms, source COLLATE \"C\", stream COLLATE \"C\", seq);
    CREATE INDEX predictions_by_time
        ON predictions (device, created_ms, model COLLATE \"C\", seq);",
    // 3: what a classifier predicted (as SQLite's migration 3; the
    // probabilities are the same little-endian f64 bytes).
    "ALTER TABLE predictions ADD COLUMN label TEXT;
    ALTER TABLE predictions ADD COLUMN probabilities BYTEA;",
];

/// Serialises migrations per schema: the key is derived from the schema the
/// tables are created in, so instances on different schemas do not wait for
/// each other.
const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock(
    hashtextextended('cloud-sync schema migrations ' || COALESCE(current_schema(), ''), 0))";

const ADD_DEVICE: &str = "INSERT INTO devices (id, token_sha256, created_ms) VALUES ($1, $2, $3)
     ON CONFLICT (id) DO NOTHING";
const REVOKE_DEVICE: &str = "UPDATE devices SET revoked = TRUE WHERE id = $1";
const AUTHENTICATE: &str = "SELECT FALSE, id FROM devices WHERE token_sha256 = $1 AND NOT revoked
     UNION ALL
     SELECT TRUE, name FROM operators WHERE token_sha256 = $1 AND NOT revoked
     LIMIT 1";
const DEVICE_REVOKED: &str = "SELECT revoked FROM devices WHERE id = $1";
const ADD_OPERATOR: &str = "INSERT INTO operators (name, token_sha256, created_ms)
     VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING";
const REVOKE_OPERATOR: &str = "UPDATE operators SET revoked = TRUE WHERE name = $1";
const INSERT_HEARTBEAT: &str = "INSERT INTO heartbeats (device, received_ms, sent_ms, body_json)
     VALUES ($1, $2, $3, $4::text::jsonb)";
const INSERT_DEAD_LETTERS: &str = "INSERT INTO dead_letters
       (device, seq, topic, reason, detail, payload_b64, payload_len, recv_ts_ms, stored_ms)
     SELECT $1, d.seq, d.topic, d.reason, d.detail, d.payload_b64, d.payload_len, d.recv_ts_ms, $2
     FROM UNNEST($3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int8[],
                 $9::int8[])
          WITH ORDINALITY
          AS d (seq, topic, reason, detail, payload_b64, payload_len, recv_ts_ms, ord)
     ORDER BY d.seq, d.ord
     ON CONFLICT DO NOTHING";
const SELECT_READINGS: &str = "SELECT source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok,
            values_json::text, stored_ms
     FROM readings
     WHERE device = $1 AND recv_ts_ms BETWEEN $2 AND $3
       AND (recv_ts_ms, source COLLATE \"C\", stream COLLATE \"C\", seq) > ($4, $5, $6, $7)
       AND ($8::text IS NULL OR source = $8) AND ($9::text IS NULL OR stream = $9)
     ORDER BY recv_ts_ms, source COLLATE \"C\", stream COLLATE \"C\", seq
     LIMIT $10";
const SELECT_PREDICTIONS: &str = "SELECT model, seq, model_version, model_sha256, source, stream,
            window_end_seq, window_end_ts_ms, score, threshold, is_anomaly, created_ms, stored_ms,
            label, probabilities
     FROM predictions
     WHERE device = $1 AND created_ms BETWEEN $2 AND $3
       AND (created_ms, model COLLATE \"C\", seq) > ($4, $5, $6)
       AND ($7::text IS NULL OR model = $7) AND ($8::text IS NULL OR source = $8)
       AND ($9::text IS NULL OR stream = $9)
     ORDER BY created_ms, model COLLATE \"C\", seq
     LIMIT $10";
const SELECT_DEAD_LETTERS: &str = "SELECT seq, topic, reason, detail, payload_b64, payload_len,
            recv_ts_ms, stored_ms
     FROM dead_letters
     WHERE device = $1 AND recv_ts_ms BETWEEN $2 AND $3 AND (recv_ts_ms, seq) > ($4, $5)
     ORDER BY recv_ts_ms, seq
     LIMIT $6";
const SELECT_HEARTBEATS: &str = "SELECT id, received_ms, body_json::text FROM heartbeats
     WHERE device = $1 AND received_ms BETWEEN $2 AND $3 AND (received_ms, id) > ($4, $5)
     ORDER BY received_ms, id
     LIMIT $6";
// Design: `FOR SHARE` makes a concurrent revocation wait for batches already
// past this check (and later batches see it), as SQLite's write lock does.
const CHECK_DEVICE: &str = "SELECT revoked FROM devices WHERE id = $1 FOR SHARE";
// Design: one statement per table whatever the batch size: the columns are
// sent as arrays and `UNNEST`ed, so there is no parameter-count limit and one
// round trip. Rows are inserted in key order (byte order, then position in
// the batch) so concurrent overlapping batches wait on each other's keys in
// the same order and cannot deadlock; within one batch the first copy of a
// key wins, as in SQLite. The row count is the number inserted.
const INSERT_READINGS: &str = "INSERT INTO readings
       (device, source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values_json, stored_ms)
     SELECT $1, r.source, r.stream, r.seq, r.device_ts_ms, r.recv_ts_ms, r.clock_ok,
            r.values_json::jsonb, $2
     FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::bool[],
                 $9::text[])
          WITH ORDINALITY
          AS r (source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values_json, ord)
     ORDER BY r.source COLLATE \"C\", r.stream COLLATE \"C\", r.seq, r.ord
     ON CONFLICT DO NOTHING";
const INSERT_PREDICTIONS: &str = "INSERT INTO predictions
       (device, model, seq, model_version, model_sha256, source, stream, window_end_seq,
        window_end_ts_ms, score, threshold, is_anomaly, created_ms, stored_ms, label,
        probabilities)
     SELECT $1, p.model, p.seq, p.model_version, p.model_sha256, p.source, p.stream,
            p.window_end_seq, p.window_end_ts_ms, p.score, p.threshold, p.is_anomaly,
            p.created_ms, $2, p.label, p.probabilities
     FROM UNNEST($3::text[], $4::int8[], $5::text[], $6::text[], $7::text[], $8::text[],
                 $9::int8[], $10::int8[], $11::float8[], $12::float8[], $13::bool[],
                 $14::int8[], $15::text[], $16::bytea[])
          WITH ORDINALITY
          AS p (model, seq, model_version, model_sha256, source, stream, window_end_seq,
                window_end_ts_ms, score, threshold, is_anomaly, created_ms, label,
                probabilities, ord)
     ORDER BY p.model COLLATE \"C\", p.seq, p.ord
     ON CONFLICT DO NOTHING";
const DEVICE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM devices WHERE id = $1)";
const READING_TOTALS: &str = "SELECT source, stream, COUNT(*), MIN(seq), MAX(seq) FROM readings
     WHERE device = $1 GROUP BY source, stream";
const PREDICTION_TOTALS: &str = "SELECT model, COUNT(*), MIN(seq), MAX(seq) FROM predictions
     WHERE device = $1 GROUP BY model";
const ANOMALIES: &str = "SELECT COUNT(*) FROM predictions WHERE device = $1 AND is_anomaly";

/// Cloneable handle to the connection pool.
#[derive(Debug, Clone)]
pub(super) struct PgStore {
    pool: Arc<Pool>,
}

struct Pool {
    config: tokio_postgres::Config,
    max_connections: usize,
    /// One permit per connection that may be open; closed by [`PgStore::close`].
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres' Config hides the password in its Debug output.
        f.debug_struct("Pool")
            .field("config", &self.config)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// One connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    async fn connect(config: &tokio_postgres::Config) -> Result<Conn> {
        let (client, connection) = config.connect(NoTls).await.map_err(StoreError::Connect)?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::warn!(error = %err, "postgresql connection failed");
            }
        });
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    /// `sql` prepared on this connection, from the cache after the first use.
    async fn prepare(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// A connection taken from the pool, with the permit that allowed it.
///
/// Dropping it closes the connection; [`Pool::put`] returns it instead.
struct Leased {
    conn: Conn,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    async fn get(&self) -> Result<Leased> {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            idle.retain(|conn| !conn.client.is_closed());
            idle.pop()
        };
        let conn = match idle {
            Some(conn) => conn,
            None => Conn::connect(&self.config).await?,
        };
        Ok(Leased {
            conn,
            _permit: permit,
        })
    }

    /// Returns a connection after a completed operation with its `result`.
    ///
    /// Design: after a database error the connection is closed rather than
    /// reused: its cached statements may be stale (a newer instance migrated
    /// the schema) or the session otherwise unusable. Refusals decided by
    /// this code (unknown device, ...) keep it.
    fn put<T>(&self, leased: Leased, result: &Result<T>) {
        let Leased { conn, _permit } = leased;
        let failed = matches!(
            result,
            Err(StoreError::Postgres(_) | StoreError::Connect(_))
        );
        if failed || conn.client.is_closed() || self.permits.is_closed() {
            return;
        }
        // The connection is idle before the permit is released, so the next
        // waiter finds it instead of opening another.
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }
}

/// Whether `err` aborted a transaction that may succeed if simply retried.
fn is_transient(err: &tokio_postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
    )
}

impl PgStore {
    /// Connects, applies pending migrations and keeps that connection pooled.
    pub(super) async fn open(settings: &PostgresSettings) -> Result<PgStore> {
        let mut config = settings.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        let mut conn = Conn::connect(&config).await?;
        migrate(&mut conn.client).await?;
        let max_connections = settings.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let pool = Pool {
            config,
            max_connections,
            permits: Arc::new(Semaphore::new(max_connections)),
            idle: Mutex::new(vec![conn]),
        };
        Ok(PgStore {
            pool: Arc::new(pool),
        })
    }

    pub(super) async fn add_device(&self, id: &str, token_sha256: String) -> Result<()> {
        let mut leased = self.pool.get().await?;
        let result = add_device(&mut leased.conn, id, &token_sha256).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn revoke_device(&self, id: &str) -> Result<()> {
        let mut leased = self.pool.get().await?;
        let result = revoke_device(&mut leased.conn, id).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn authenticate(&self, token_sha256: String) -> Result<Option<Principal>> {
        let mut leased = self.pool.get().await?;
        let result = authenticate(&mut leased.conn, &token_sha256).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn device_is_active(&self, id: &str) -> Result<bool> {
        let mut leased = self.pool.get().await?;
        let result = device_is_active(&mut leased.conn, id).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn add_operator(&self, name: &str, token_sha256: String) -> Result<()> {
        let mut leased = self.pool.get().await?;
        let result = add_operator(&mut leased.conn, name, &token_sha256).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn revoke_operator(&self, name: &str) -> Result<()> {
        let mut leased = self.pool.get().await?;
        let result = revoke_operator(&mut leased.conn, name).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn store_heartbeat(
        &self,
        device: &str,
        received_ms: i64,
        sent_ms: i64,
        body: String,
    ) -> Result<()> {
        let mut leased = self.pool.get().await?;
        let result = store_heartbeat(&mut leased.conn, device, received_ms, sent_ms, &body).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn readings(
        &self,
        device: &str,
        query: &ReadingsQuery,
    ) -> Result<Vec<StoredReading>> {
        let mut leased = self.pool.get().await?;
        let result = readings(&mut leased.conn, device, query).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn predictions(
        &self,
        device: &str,
        query: &PredictionsQuery,
    ) -> Result<Vec<StoredPrediction>> {
        let mut leased = self.pool.get().await?;
        let result = predictions(&mut leased.conn, device, query).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn dead_letters(
        &self,
        device: &str,
        query: &SeriesQuery,
    ) -> Result<Vec<StoredDeadLetter>> {
        let mut leased = self.pool.get().await?;
        let result = dead_letters(&mut leased.conn, device, query).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn heartbeats(
        &self,
        device: &str,
        query: &SeriesQuery,
    ) -> Result<Vec<(i64, StoredHeartbeat)>> {
        let mut leased = self.pool.get().await?;
        let result = heartbeats(&mut leased.conn, device, query).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn fleet(&self, after: &str, fetch: i64) -> Result<Vec<FleetDevice>> {
        let mut leased = self.pool.get().await?;
        let result = fleet(&mut leased.conn, after, fetch).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn store_batch(
        &self,
        device: &str,
        batch: UploadBatch,
    ) -> Result<InsertCounts> {
        let columns = BatchColumns::new(&batch)?;
        let mut leased = self.pool.get().await?;
        let mut attempt = 1;
        let result = loop {
            match store_batch(&mut leased.conn, device, &columns).await {
                Err(StoreError::Postgres(err))
                    if attempt < MAX_BATCH_ATTEMPTS && is_transient(&err) =>
                {
                    tracing::debug!(device, attempt, error = %err, "retrying batch transaction");
                    attempt += 1;
                }
                result => break result,
            }
        };
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn summary(&self, device: &str) -> Result<DeviceSummary> {
        let mut leased = self.pool.get().await?;
        let result = summary(&mut leased.conn, device).await;
        self.pool.put(leased, &result);
        result
    }

    pub(super) async fn ping(&self) -> Result<()> {
        let leased = self.pool.get().await?;
        let result = match leased.conn.client.simple_query("SELECT 1").await {
            Ok(_) => Ok(()),
            Err(err) => Err(StoreError::Postgres(err)),
        };
        self.pool.put(leased, &result);
        result
    }

    /// Closes the idle connections and refuses further operations on every
    /// handle; connections in use close when their operation ends.
    pub(super) async fn close(self) -> Result<()> {
        if self.pool.permits.is_closed() {
            return Err(StoreError::Closed);
        }
        self.pool.permits.close();
        self.pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }
}

async fn migrate(client: &mut Client) -> Result<()> {
    let supported = MIGRATIONS.len();
    let tx = client.transaction().await?;
    // Design: the lock is held until commit, so a second instance starting
    // now waits here and then finds the migrations already recorded.
    tx.execute(MIGRATION_LOCK, &[]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            applied_ms BIGINT NOT NULL
        )",
    )
    .await?;
    let found: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .try_get(0)?;
    let current = usize::try_from(found)
        .ok()
        .filter(|v| *v <= supported)
        .ok_or(StoreError::SchemaTooNew {
            found: i64::from(found),
            supported,
        })?;
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let version = index + 1;
        let migrate_err = |source| StoreError::PostgresMigrate { version, source };
        tx.batch_execute(sql).await.map_err(migrate_err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
            &[&i32::try_from(version).unwrap_or(i32::MAX), &now_ms()],
        )
        .await
        .map_err(migrate_err)?;
        tracing::info!(version, "applied postgresql schema migration");
    }
    tx.commit().await?;
    Ok(())
}

async fn add_device(conn: &mut Conn, id: &str, token_sha256: &str) -> Result<()> {
    let statement = conn.prepare(ADD_DEVICE).await?;
    let inserted = conn
        .client
        .execute(&statement, &[&id, &token_sha256, &now_ms()])
        .await?;
    if inserted == 0 {
        return Err(StoreError::DeviceExists { id: id.to_owned() });
    }
    Ok(())
}

async fn revoke_device(conn: &mut Conn, id: &str) -> Result<()> {
    let statement = conn.prepare(REVOKE_DEVICE).await?;
    if conn.client.execute(&statement, &[&id]).await? == 0 {
        return Err(StoreError::UnknownDevice { id: id.to_owned() });
    }
    Ok(())
}

async fn authenticate(conn: &mut Conn, token_sha256: &str) -> Result<Option<Principal>> {
    let statement = conn.prepare(AUTHENTICATE).await?;
    let Some(row) = conn.client.query_opt(&statement, &[&token_sha256]).await? else {
        return Ok(None);
    };
    let operator: bool = row.try_get(0)?;
    let id: String = row.try_get(1)?;
    Ok(Some(if operator {
        Principal::Operator(id)
    } else {
        Principal::Device(id)
    }))
}

async fn device_is_active(conn: &mut Conn, id: &str) -> Result<bool> {
    let statement = conn.prepare(DEVICE_REVOKED).await?;
    let revoked: Option<bool> = conn
        .client
        .query_opt(&statement, &[&id])
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
    Ok(revoked == Some(false))
}

async fn add_operator(conn: &mut Conn, name: &str, token_sha256: &str) -> Result<()> {
    let statement = conn.prepare(ADD_OPERATOR).await?;
    let inserted = conn
        .client
        .execute(&statement, &[&name, &token_sha256, &now_ms()])
        .await?;
    if inserted == 0 {
        return Err(StoreError::OperatorExists {
            name: name.to_owned(),
        });
    }
    Ok(())
}

async fn revoke_operator(conn: &mut Conn, name: &str) -> Result<()> {
    let statement = conn.prepare(REVOKE_OPERATOR).await?;
    if conn.client.execute(&statement, &[&name]).await? == 0 {
        return Err(StoreError::UnknownOperator {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks, inside `tx`, that `device` exists and is not revoked; the row
/// stays share-locked until the transaction ends (see [`CHECK_DEVICE`]).
async fn check_device(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &Statement,
    device: &str,
) -> Result<()> {
    let revoked: Option<bool> = tx
        .query_opt(statement, &[&device])
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
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

async fn store_heartbeat(
    conn: &mut Conn,
    device: &str,
    received_ms: i64,
    sent_ms: i64,
    body: &str,
) -> Result<()> {
    let check = conn.prepare(CHECK_DEVICE).await?;
    let insert = conn.prepare(INSERT_HEARTBEAT).await?;
    let tx = conn.client.transaction().await?;
    check_device(&tx, &check, device).await?;
    tx.execute(&insert, &[&device, &received_ms, &sent_ms, &body])
        .await?;
    tx.commit().await?;
    Ok(())
}

/// A read-only snapshot transaction in which `device` is known to exist.
async fn read_tx<'a>(conn: &'a mut Conn, device: &str) -> Result<tokio_postgres::Transaction<'a>> {
    let exists = conn.prepare(DEVICE_EXISTS).await?;
    let tx = conn
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let known: bool = tx.query_one(&exists, &[&device]).await?.try_get(0)?;
    if !known {
        return Err(StoreError::UnknownDevice {
            id: device.to_owned(),
        });
    }
    Ok(tx)
}

async fn readings(conn: &mut Conn, device: &str, q: &ReadingsQuery) -> Result<Vec<StoredReading>> {
    let select = conn.prepare(SELECT_READINGS).await?;
    let (from, to) = time_bounds(&q.window);
    let (at, source, stream, seq) =
        q.after
            .clone()
            .unwrap_or((i64::MIN, String::new(), String::new(), i64::MIN));
    let tx = read_tx(conn, device).await?;
    let rows = tx
        .query(
            &select,
            &[
                &device,
                &from,
                &to,
                &at,
                &source,
                &stream,
                &seq,
                &q.source,
                &q.stream,
                &q.window.fetch(),
            ],
        )
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|row| {
            let values: String = row.try_get(6)?;
            Ok(StoredReading {
                reading: Reading {
                    source: row.try_get(0)?,
                    stream: row.try_get(1)?,
                    seq: get_u64(row, 2, "readings.seq")?,
                    device_ts_ms: row.try_get(3)?,
                    recv_ts_ms: row.try_get(4)?,
                    clock_ok: row.try_get(5)?,
                    values: parse_values(&values)?,
                },
                stored_ms: row.try_get(7)?,
            })
        })
        .collect()
}

async fn predictions(
    conn: &mut Conn,
    device: &str,
    q: &PredictionsQuery,
) -> Result<Vec<StoredPrediction>> {
    let select = conn.prepare(SELECT_PREDICTIONS).await?;
    let (from, to) = time_bounds(&q.window);
    let (at, model, seq) = q
        .after
        .clone()
        .unwrap_or((i64::MIN, String::new(), i64::MIN));
    let tx = read_tx(conn, device).await?;
    let rows = tx
        .query(
            &select,
            &[
                &device,
                &from,
                &to,
                &at,
                &model,
                &seq,
                &q.model,
                &q.source,
                &q.stream,
                &q.window.fetch(),
            ],
        )
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|row| {
            Ok(StoredPrediction {
                prediction: Prediction {
                    model: row.try_get(0)?,
                    seq: get_u64(row, 1, "predictions.seq")?,
                    model_version: row.try_get(2)?,
                    model_sha256: row.try_get(3)?,
                    source: row.try_get(4)?,
                    stream: row.try_get(5)?,
                    window_end_seq: get_u64(row, 6, "predictions.window_end_seq")?,
                    window_end_ts_ms: row.try_get(7)?,
                    score: row.try_get(8)?,
                    threshold: row.try_get(9)?,
                    is_anomaly: row.try_get(10)?,
                    created_ms: row.try_get(11)?,
                    label: row.try_get(13)?,
                    probabilities: sync_protocol::probabilities_from_bytes(
                        row.try_get::<_, Option<&[u8]>>(14)?,
                    )?,
                },
                stored_ms: row.try_get(12)?,
            })
        })
        .collect()
}

async fn dead_letters(
    conn: &mut Conn,
    device: &str,
    q: &SeriesQuery,
) -> Result<Vec<StoredDeadLetter>> {
    let select = conn.prepare(SELECT_DEAD_LETTERS).await?;
    let (from, to) = time_bounds(&q.window);
    let (at, seq) = q.after.unwrap_or((i64::MIN, i64::MIN));
    let tx = read_tx(conn, device).await?;
    let rows = tx
        .query(
            &select,
            &[&device, &from, &to, &at, &seq, &q.window.fetch()],
        )
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|row| {
            Ok(StoredDeadLetter {
                dead_letter: DeadLetterRecord {
                    seq: get_u64(row, 0, "dead_letters.seq")?,
                    topic: row.try_get(1)?,
                    reason: row.try_get(2)?,
                    detail: row.try_get(3)?,
                    payload_b64: row.try_get(4)?,
                    payload_len: get_u64(row, 5, "dead_letters.payload_len")?,
                    recv_ts_ms: row.try_get(6)?,
                },
                stored_ms: row.try_get(7)?,
            })
        })
        .collect()
}

async fn heartbeats(
    conn: &mut Conn,
    device: &str,
    q: &SeriesQuery,
) -> Result<Vec<(i64, StoredHeartbeat)>> {
    let select = conn.prepare(SELECT_HEARTBEATS).await?;
    let (from, to) = time_bounds(&q.window);
    let (at, id) = q.after.unwrap_or((i64::MIN, i64::MIN));
    let tx = read_tx(conn, device).await?;
    let rows = tx
        .query(&select, &[&device, &from, &to, &at, &id, &q.window.fetch()])
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|row| {
            let body: String = row.try_get(2)?;
            Ok((
                row.try_get(0)?,
                StoredHeartbeat {
                    received_ms: row.try_get(1)?,
                    heartbeat: parse_heartbeat(&body)?,
                },
            ))
        })
        .collect()
}

async fn fleet(conn: &mut Conn, after: &str, fetch: i64) -> Result<Vec<FleetDevice>> {
    let select = conn.prepare(FLEET_SQL_POSTGRES).await?;
    let tx = conn
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let rows = tx.query(&select, &[&after, &fetch]).await?;
    tx.commit().await?;
    rows.iter()
        .map(|row| {
            FleetRow {
                device: row.try_get(0)?,
                revoked: row.try_get(1)?,
                created_ms: row.try_get(2)?,
                readings: row.try_get(3)?,
                readings_last_ms: row.try_get(4)?,
                predictions: row.try_get(5)?,
                predictions_last_ms: row.try_get(6)?,
                dead_letters: row.try_get(7)?,
                dead_letters_last_ms: row.try_get(8)?,
                heartbeats: row.try_get(9)?,
                last_heartbeat_ms: row.try_get(10)?,
                last_heartbeat_json: row.try_get(11)?,
            }
            .into_device()
        })
        .collect()
}

/// A batch as one array per column, the parameters of the `UNNEST` inserts.
struct BatchColumns<'a> {
    stored_ms: i64,
    r_source: Vec<&'a str>,
    r_stream: Vec<&'a str>,
    r_seq: Vec<i64>,
    r_device_ts_ms: Vec<Option<i64>>,
    r_recv_ts_ms: Vec<i64>,
    r_clock_ok: Vec<bool>,
    r_values_json: Vec<String>,
    p_model: Vec<&'a str>,
    p_seq: Vec<i64>,
    p_model_version: Vec<&'a str>,
    p_model_sha256: Vec<&'a str>,
    p_source: Vec<&'a str>,
    p_stream: Vec<&'a str>,
    p_window_end_seq: Vec<i64>,
    p_window_end_ts_ms: Vec<Option<i64>>,
    p_score: Vec<f64>,
    p_threshold: Vec<f64>,
    p_is_anomaly: Vec<bool>,
    p_created_ms: Vec<i64>,
    p_label: Vec<Option<&'a str>>,
    p_probabilities: Vec<Option<Vec<u8>>>,
    d_seq: Vec<i64>,
    d_topic: Vec<&'a str>,
    d_reason: Vec<&'a str>,
    d_detail: Vec<&'a str>,
    d_payload_b64: Vec<&'a str>,
    d_payload_len: Vec<i64>,
    d_recv_ts_ms: Vec<i64>,
}

/// A validated sequence number as PostgreSQL's `BIGINT`.
fn pg_seq(list: &'static str, index: usize, field: &'static str, value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| {
        StoreError::InvalidBatch(BatchError::SeqTooLarge {
            list,
            index,
            field,
            value,
        })
    })
}

impl<'a> BatchColumns<'a> {
    fn new(batch: &'a UploadBatch) -> Result<Self> {
        let readings = &batch.readings;
        let predictions = &batch.predictions;
        let dead_letters = &batch.dead_letters;
        let mut columns = BatchColumns {
            stored_ms: now_ms(),
            r_source: Vec::with_capacity(readings.len()),
            r_stream: Vec::with_capacity(readings.len()),
            r_seq: Vec::with_capacity(readings.len()),
            r_device_ts_ms: Vec::with_capacity(readings.len()),
            r_recv_ts_ms: Vec::with_capacity(readings.len()),
            r_clock_ok: Vec::with_capacity(readings.len()),
            r_values_json: Vec::with_capacity(readings.len()),
            p_model: Vec::with_capacity(predictions.len()),
            p_seq: Vec::with_capacity(predictions.len()),
            p_model_version: Vec::with_capacity(predictions.len()),
            p_model_sha256: Vec::with_capacity(predictions.len()),
            p_source: Vec::with_capacity(predictions.len()),
            p_stream: Vec::with_capacity(predictions.len()),
            p_window_end_seq: Vec::with_capacity(predictions.len()),
            p_window_end_ts_ms: Vec::with_capacity(predictions.len()),
            p_score: Vec::with_capacity(predictions.len()),
            p_threshold: Vec::with_capacity(predictions.len()),
            p_is_anomaly: Vec::with_capacity(predictions.len()),
            p_created_ms: Vec::with_capacity(predictions.len()),
            p_label: Vec::with_capacity(predictions.len()),
            p_probabilities: Vec::with_capacity(predictions.len()),
            d_seq: Vec::with_capacity(dead_letters.len()),
            d_topic: Vec::with_capacity(dead_letters.len()),
            d_reason: Vec::with_capacity(dead_letters.len()),
            d_detail: Vec::with_capacity(dead_letters.len()),
            d_payload_b64: Vec::with_capacity(dead_letters.len()),
            d_payload_len: Vec::with_capacity(dead_letters.len()),
            d_recv_ts_ms: Vec::with_capacity(dead_letters.len()),
        };
        for (index, r) in readings.iter().enumerate() {
            columns.r_source.push(&r.source);
            columns.r_stream.push(&r.stream);
            columns.r_seq.push(pg_seq("readings", index, "seq", r.seq)?);
            columns.r_device_ts_ms.push(r.device_ts_ms);
            columns.r_recv_ts_ms.push(r.recv_ts_ms);
            columns.r_clock_ok.push(r.clock_ok);
            columns
                .r_values_json
                .push(serde_json::to_string(&r.values).map_err(StoreError::EncodeValues)?);
        }
        for (index, p) in predictions.iter().enumerate() {
            columns.p_model.push(&p.model);
            columns
                .p_seq
                .push(pg_seq("predictions", index, "seq", p.seq)?);
            columns.p_model_version.push(&p.model_version);
            columns.p_model_sha256.push(&p.model_sha256);
            columns.p_source.push(&p.source);
            columns.p_stream.push(&p.stream);
            columns.p_window_end_seq.push(pg_seq(
                "predictions",
                index,
                "window_end_seq",
                p.window_end_seq,
            )?);
            columns.p_window_end_ts_ms.push(p.window_end_ts_ms);
            columns.p_score.push(p.score);
            columns.p_threshold.push(p.threshold);
            columns.p_is_anomaly.push(p.is_anomaly);
            columns.p_created_ms.push(p.created_ms);
            columns.p_label.push(p.label.as_deref());
            columns
                .p_probabilities
                .push(sync_protocol::probabilities_to_bytes(&p.probabilities));
        }
        for (index, d) in dead_letters.iter().enumerate() {
            columns
                .d_seq
                .push(pg_seq("dead_letters", index, "seq", d.seq)?);
            columns.d_topic.push(&d.topic);
            columns.d_reason.push(&d.reason);
            columns.d_detail.push(&d.detail);
            columns.d_payload_b64.push(&d.payload_b64);
            columns.d_payload_len.push(pg_seq(
                "dead_letters",
                index,
                "payload_len",
                d.payload_len,
            )?);
            columns.d_recv_ts_ms.push(d.recv_ts_ms);
        }
        Ok(columns)
    }
}

/// Stores one batch in one transaction.
///
/// Design: READ COMMITTED (set explicitly, whatever the server default) is
/// enough for exactly-once across instances sharing the database. `INSERT ...
/// ON CONFLICT DO NOTHING` decides per key against the unique index, not
/// against a snapshot: when another transaction has inserted the same key and
/// not yet committed, this insert waits for it, then skips the row if it
/// committed or inserts it if it rolled back. So every key is inserted by
/// exactly one committed transaction, and that transaction's row count (its
/// ack's `inserted`) includes it while every other ack counts it as a
/// duplicate: no duplicates, and no row acknowledged that is not stored.
/// Nothing is read and then written, so the anomalies stricter isolation
/// prevents cannot occur here.
async fn store_batch(
    conn: &mut Conn,
    device: &str,
    columns: &BatchColumns<'_>,
) -> Result<InsertCounts> {
    let check = conn.prepare(CHECK_DEVICE).await?;
    let insert_readings = conn.prepare(INSERT_READINGS).await?;
    let insert_predictions = conn.prepare(INSERT_PREDICTIONS).await?;
    let insert_dead_letters = conn.prepare(INSERT_DEAD_LETTERS).await?;
    let tx = conn
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await?;
    check_device(&tx, &check, device).await?;
    let c = columns;
    let mut counts = InsertCounts::default();
    if !c.r_seq.is_empty() {
        let inserted = tx
            .execute(
                &insert_readings,
                &[
                    &device,
                    &c.stored_ms,
                    &c.r_source,
                    &c.r_stream,
                    &c.r_seq,
                    &c.r_device_ts_ms,
                    &c.r_recv_ts_ms,
                    &c.r_clock_ok,
                    &c.r_values_json,
                ],
            )
            .await?;
        counts.readings_inserted = inserted;
        counts.readings_duplicate = len_u64(&c.r_seq).saturating_sub(inserted);
    }
    if !c.p_seq.is_empty() {
        let inserted = tx
            .execute(
                &insert_predictions,
                &[
                    &device,
                    &c.stored_ms,
                    &c.p_model,
                    &c.p_seq,
                    &c.p_model_version,
                    &c.p_model_sha256,
                    &c.p_source,
                    &c.p_stream,
                    &c.p_window_end_seq,
                    &c.p_window_end_ts_ms,
                    &c.p_score,
                    &c.p_threshold,
                    &c.p_is_anomaly,
                    &c.p_created_ms,
                    &c.p_label,
                    &c.p_probabilities,
                ],
            )
            .await?;
        counts.predictions_inserted = inserted;
        counts.predictions_duplicate = len_u64(&c.p_seq).saturating_sub(inserted);
    }
    if !c.d_seq.is_empty() {
        let inserted = tx
            .execute(
                &insert_dead_letters,
                &[
                    &device,
                    &c.stored_ms,
                    &c.d_seq,
                    &c.d_topic,
                    &c.d_reason,
                    &c.d_detail,
                    &c.d_payload_b64,
                    &c.d_payload_len,
                    &c.d_recv_ts_ms,
                ],
            )
            .await?;
        counts.dead_letters_inserted = inserted;
        counts.dead_letters_duplicate = len_u64(&c.d_seq).saturating_sub(inserted);
    }
    tx.commit().await?;
    Ok(counts)
}

fn len_u64<T>(items: &[T]) -> u64 {
    u64::try_from(items.len()).unwrap_or(u64::MAX)
}

/// A non-negative `BIGINT` column as `u64`.
fn get_u64(row: &Row, idx: usize, column: &'static str) -> Result<u64> {
    let value: i64 = row.try_get(idx)?;
    u64::try_from(value).map_err(|_| StoreError::NegativeValue { column, value })
}

fn stream_summary(key: String, row: &Row, first: usize) -> Result<StreamSummary> {
    Ok(StreamSummary {
        key,
        rows: get_u64(row, first, "count")?,
        min_seq: get_u64(row, first + 1, "min(seq)")?,
        max_seq: get_u64(row, first + 2, "max(seq)")?,
    })
}

async fn summary(conn: &mut Conn, device: &str) -> Result<DeviceSummary> {
    let exists = conn.prepare(DEVICE_EXISTS).await?;
    let reading_totals = conn.prepare(READING_TOTALS).await?;
    let prediction_totals = conn.prepare(PREDICTION_TOTALS).await?;
    let anomalies = conn.prepare(ANOMALIES).await?;
    // One snapshot across the queries, as SQLite's read transaction gives.
    let tx = conn
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let known: bool = tx.query_one(&exists, &[&device]).await?.try_get(0)?;
    if !known {
        return Err(StoreError::UnknownDevice {
            id: device.to_owned(),
        });
    }
    let mut readings = Vec::new();
    for row in tx.query(&reading_totals, &[&device]).await? {
        let key = reading_key(row.try_get(0)?, row.try_get(1)?);
        readings.push(stream_summary(key, &row, 2)?);
    }
    let mut predictions = Vec::new();
    for row in tx.query(&prediction_totals, &[&device]).await? {
        predictions.push(stream_summary(row.try_get(0)?, &row, 1)?);
    }
    // Byte order of the key, as SQLite's `ORDER BY` gives (independent of the
    // database's collation).
    readings.sort_by(|a, b| a.key.cmp(&b.key));
    predictions.sort_by(|a, b| a.key.cmp(&b.key));
    let anomalies = get_u64(&tx.query_one(&anomalies, &[&device]).await?, 0, "count")?;
    tx.commit().await?;
    Ok(DeviceSummary {
        device: device.to_owned(),
        readings,
        predictions,
        anomalies,
    })
}
