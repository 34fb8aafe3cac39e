//! Storage: devices and operators with their tokens; readings,
//! predictions, dead letters and heartbeats; the paged reads over them.
//!
//! [`Store`] is the one handle the rest of the crate uses. It checks inputs
//! (device ids, token shape, [`validate_batch`]), computes the ack's sequence
//! ranges, and dispatches each operation to one of two backends:
//! - `sqlite.rs`, the only code touching rusqlite: the [`rusqlite::Connection`]
//!   lives on one dedicated worker thread and the handle sends commands over
//!   a bounded channel, each carrying a [`tokio::sync::oneshot`] sender for
//!   its reply. One process per database file.
//! - `postgres.rs`, the only code touching tokio-postgres: a small pool of
//!   connections (`database_max_connections`), migrations versioned in a
//!   `schema_migrations` table and applied under an advisory lock. Several
//!   cloud-sync instances may share one database.
//!
//! Invariants (both backends):
//! - A reading is identified by `(device, source, stream, seq)`, a
//!   prediction by `(device, model, seq)` and a dead letter by `(device,
//!   seq)` (the [`sync_protocol`] identity contract; `device` is the
//!   authenticated agent, `source` the sensor it heard the reading from).
//!   All three are primary keys and inserts use
//!   `ON CONFLICT DO NOTHING`, so replaying a batch never creates a duplicate
//!   row and never overwrites the row stored first (within one batch, the
//!   first copy of a key wins).
//! - Exactly-once is enforced by the database (keys and transactions), never
//!   by state in this process, so it holds with several instances on one
//!   PostgreSQL database: each stored row is counted as inserted by exactly
//!   one ack, and as a duplicate by every other.
//! - A batch is validated whole before anything is written and stored in one
//!   transaction: it is either entirely durable when the ack is returned
//!   (SQLite: WAL, `synchronous=FULL`; PostgreSQL: committed), or not written
//!   at all.
//! - Heartbeats have no identity: each one stored is a new sample, keyed by
//!   the database's own id.
//! - Only the sha256 of a device or operator token is stored; the token
//!   itself is shown once, by [`Store::add_device`] / [`Store::add_operator`].
//! - A revoked device's batches and heartbeats are refused: none commits
//!   after [`Store::revoke_device`] has returned.
//! - Summaries and pages order strings in byte order on both backends.
//! - Reads are keyset-paginated on a sort key ending in the row's identity
//!   (see `query.rs`), so concurrent inserts never make a page repeat or
//!   skip a row that existed when paging started.

mod postgres;
mod query;
mod sqlite;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use sync_protocol::{
    DeadLetterRecord, DeadLettersPage, DeviceSummary, FleetSummary, Heartbeat, HeartbeatsPage,
    Prediction, PredictionsPage, ReadQuery, Reading, ReadingsPage, SeqRange, UploadAck,
    UploadBatch, ranges,
};

pub use query::QueryError;
use query::{CursorKey, FleetQuery, PredictionsQuery, ReadingsQuery, SeriesQuery, page};

use postgres::PgStore;
pub use sqlite::COMMAND_QUEUE_CAPACITY;
use sqlite::SqliteStore;

use crate::config::{PostgresSettings, StorageSettings};

/// Longest accepted device id (and operator name), in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// Key of the dead-letter range in [`UploadAck::dead_letters`].
pub const DEAD_LETTERS_KEY: &str = "dead_letters";

/// Who a credential belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A device: uploads to, and reads, its own paths only.
    Device(String),
    /// An operator: reads every device and the fleet summary; never uploads.
    Operator(String),
}

/// Cloneable handle to the database.
///
/// Every operation validates its input here, then runs on the backend. The
/// backend stops when [`Store::close`] is called or when the last handle is
/// dropped.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
}

// Design: an enum, not a trait object: two known backends, no `dyn` or boxed
// futures, and the compiler checks every operation is implemented for both.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path`, applies
    /// pending migrations and starts the worker thread.
    ///
    /// # Errors
    /// [`StoreError::Open`], [`StoreError::Migrate`] or
    /// [`StoreError::SchemaTooNew`] if the database cannot be used;
    /// [`StoreError::SpawnWorker`] if the thread cannot be started.
    pub async fn open(path: impl AsRef<Path>) -> Result<Store> {
        let backend = Backend::Sqlite(SqliteStore::open(path.as_ref()).await?);
        Ok(Store { backend })
    }

    /// Connects to PostgreSQL and applies pending migrations (under an
    /// advisory lock, so instances starting together apply each once).
    ///
    /// # Errors
    /// [`StoreError::Connect`] if no connection can be opened;
    /// [`StoreError::PostgresMigrate`] or [`StoreError::SchemaTooNew`] if the
    /// schema cannot be used; [`StoreError::Postgres`] on another failure.
    pub async fn open_postgres(settings: &PostgresSettings) -> Result<Store> {
        let backend = Backend::Postgres(PgStore::open(settings).await?);
        Ok(Store { backend })
    }

    /// Opens the backend `settings` selects: [`Store::open`] or
    /// [`Store::open_postgres`].
    ///
    /// # Errors
    /// As the function called.
    pub async fn connect(settings: &StorageSettings) -> Result<Store> {
        match settings {
            StorageSettings::Sqlite { path } => Store::open(path).await,
            StorageSettings::Postgres(settings) => Store::open_postgres(settings).await,
        }
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
        let token = hex::encode(rand::random::<[u8; 32]>());
        let digest = token_digest(&token);
        match &self.backend {
            Backend::Sqlite(store) => store.add_device(id, digest).await?,
            Backend::Postgres(store) => store.add_device(id, digest).await?,
        }
        Ok(token)
    }

    /// Revokes a device: its token stops authenticating. Its data is kept.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`], or a storage failure.
    pub async fn revoke_device(&self, id: &str) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(store) => store.revoke_device(id).await,
            Backend::Postgres(store) => store.revoke_device(id).await,
        }
    }

    /// The id of the non-revoked device owning `token`, if any (operator
    /// tokens are `None` here; see [`Store::authenticate_principal`]).
    ///
    /// # Errors
    /// Only on a storage failure; an unknown or revoked token is `Ok(None)`.
    pub async fn authenticate(&self, token: &str) -> Result<Option<String>> {
        Ok(match self.authenticate_principal(token).await? {
            Some(Principal::Device(id)) => Some(id),
            _ => None,
        })
    }

    /// The non-revoked device or operator owning `token`, if any.
    ///
    /// # Errors
    /// Only on a storage failure; an unknown or revoked token is `Ok(None)`.
    pub async fn authenticate_principal(&self, token: &str) -> Result<Option<Principal>> {
        if !is_token_shaped(token) {
            return Ok(None);
        }
        let digest = token_digest(token);
        match &self.backend {
            Backend::Sqlite(store) => store.authenticate(digest).await,
            Backend::Postgres(store) => store.authenticate(digest).await,
        }
    }

    /// Whether `id` is a registered, non-revoked device (client-certificate
    /// authentication: the certificate names the device, the store decides
    /// whether it may still connect).
    ///
    /// # Errors
    /// Only on a storage failure.
    pub async fn device_is_active(&self, id: &str) -> Result<bool> {
        if !is_valid_device_id(id) {
            return Ok(false);
        }
        match &self.backend {
            Backend::Sqlite(store) => store.device_is_active(id).await,
            Backend::Postgres(store) => store.device_is_active(id).await,
        }
    }

    /// Registers an operator and returns its new bearer token (64 hex
    /// chars); only its sha256 is stored. Operators read every device and
    /// the fleet summary and can never upload.
    ///
    /// # Errors
    /// [`StoreError::InvalidOperatorName`], [`StoreError::OperatorExists`]
    /// (also for a revoked name), or a storage failure.
    pub async fn add_operator(&self, name: &str) -> Result<String> {
        if !is_valid_device_id(name) {
            return Err(StoreError::InvalidOperatorName {
                name: name.to_owned(),
            });
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        let digest = token_digest(&token);
        match &self.backend {
            Backend::Sqlite(store) => store.add_operator(name, digest).await?,
            Backend::Postgres(store) => store.add_operator(name, digest).await?,
        }
        Ok(token)
    }

    /// Revokes an operator: its token stops authenticating.
    ///
    /// # Errors
    /// [`StoreError::UnknownOperator`], or a storage failure.
    pub async fn revoke_operator(&self, name: &str) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(store) => store.revoke_operator(name).await,
            Backend::Postgres(store) => store.revoke_operator(name).await,
        }
    }

    /// Stores one heartbeat of `device` as a new sample and returns the
    /// cloud time it was stored at (Unix ms).
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`], [`StoreError::DeviceRevoked`], or a
    /// storage failure.
    pub async fn store_heartbeat(&self, device: &str, heartbeat: &Heartbeat) -> Result<i64> {
        let body = serde_json::to_string(heartbeat).map_err(StoreError::EncodeValues)?;
        let received_ms = now_ms();
        match &self.backend {
            Backend::Sqlite(store) => {
                store
                    .store_heartbeat(device, received_ms, heartbeat.sent_ms, body)
                    .await?;
            }
            Backend::Postgres(store) => {
                store
                    .store_heartbeat(device, received_ms, heartbeat.sent_ms, body)
                    .await?;
            }
        }
        Ok(received_ms)
    }

    /// One page of `device`'s readings, ordered by `(recv_ts_ms, source,
    /// stream, seq)`; the time window applies to `recv_ts_ms`.
    ///
    /// # Errors
    /// [`StoreError::InvalidQuery`], [`StoreError::UnknownDevice`], or a
    /// storage failure.
    pub async fn readings(&self, device: &str, query: &ReadQuery) -> Result<ReadingsPage> {
        let query = ReadingsQuery::new(query)?;
        let rows = match &self.backend {
            Backend::Sqlite(store) => store.readings(device, query.clone()).await?,
            Backend::Postgres(store) => store.readings(device, &query).await?,
        };
        let (readings, next_cursor) = page(rows, &query.window, |row| CursorKey::Reading {
            t: row.reading.recv_ts_ms,
            src: row.reading.source.clone(),
            st: row.reading.stream.clone(),
            s: i64::try_from(row.reading.seq).unwrap_or(i64::MAX),
        });
        Ok(ReadingsPage {
            device: device.to_owned(),
            readings,
            next_cursor,
        })
    }

    /// One page of `device`'s predictions, ordered by `(created_ms, model,
    /// seq)`; the time window applies to `created_ms`.
    ///
    /// # Errors
    /// As [`Store::readings`].
    pub async fn predictions(&self, device: &str, query: &ReadQuery) -> Result<PredictionsPage> {
        let query = PredictionsQuery::new(query)?;
        let rows = match &self.backend {
            Backend::Sqlite(store) => store.predictions(device, query.clone()).await?,
            Backend::Postgres(store) => store.predictions(device, &query).await?,
        };
        let (predictions, next_cursor) = page(rows, &query.window, |row| CursorKey::Prediction {
            t: row.prediction.created_ms,
            m: row.prediction.model.clone(),
            s: i64::try_from(row.prediction.seq).unwrap_or(i64::MAX),
        });
        Ok(PredictionsPage {
            device: device.to_owned(),
            predictions,
            next_cursor,
        })
    }

    /// One page of `device`'s dead letters, ordered by `(recv_ts_ms, seq)`;
    /// the time window applies to `recv_ts_ms`.
    ///
    /// # Errors
    /// As [`Store::readings`].
    pub async fn dead_letters(&self, device: &str, query: &ReadQuery) -> Result<DeadLettersPage> {
        let query = SeriesQuery::dead_letters(query)?;
        let rows = match &self.backend {
            Backend::Sqlite(store) => store.dead_letters(device, query.clone()).await?,
            Backend::Postgres(store) => store.dead_letters(device, &query).await?,
        };
        let (dead_letters, next_cursor) = page(rows, &query.window, |row| CursorKey::DeadLetter {
            t: row.dead_letter.recv_ts_ms,
            s: i64::try_from(row.dead_letter.seq).unwrap_or(i64::MAX),
        });
        Ok(DeadLettersPage {
            device: device.to_owned(),
            dead_letters,
            next_cursor,
        })
    }

    /// One page of `device`'s heartbeats, ordered by `received_ms`, then
    /// arrival; the time window applies to `received_ms`.
    ///
    /// # Errors
    /// As [`Store::readings`].
    pub async fn heartbeats(&self, device: &str, query: &ReadQuery) -> Result<HeartbeatsPage> {
        let query = SeriesQuery::heartbeats(query)?;
        let rows = match &self.backend {
            Backend::Sqlite(store) => store.heartbeats(device, query.clone()).await?,
            Backend::Postgres(store) => store.heartbeats(device, &query).await?,
        };
        let (rows, next_cursor) = page(rows, &query.window, |(id, row)| CursorKey::Heartbeat {
            t: row.received_ms,
            id: *id,
        });
        Ok(HeartbeatsPage {
            device: device.to_owned(),
            heartbeats: rows.into_iter().map(|(_, row)| row).collect(),
            next_cursor,
        })
    }

    /// One page of the registered devices with their activity, rows
    /// stored and last heartbeat, in id order (byte order), keyset-paged on
    /// the id (`limit` and `cursor` of `query`; any other parameter is
    /// refused).
    ///
    /// # Errors
    /// [`StoreError::InvalidQuery`] or a storage failure.
    pub async fn fleet(&self, query: &ReadQuery) -> Result<FleetSummary> {
        let q = FleetQuery::new(query)?;
        let rows = match &self.backend {
            Backend::Sqlite(store) => store.fleet(q.after.clone(), q.window.fetch()).await?,
            Backend::Postgres(store) => store.fleet(&q.after, q.window.fetch()).await?,
        };
        let (devices, next_cursor) = page(rows, &q.window, |d| CursorKey::Device {
            id: d.device.clone(),
        });
        Ok(FleetSummary {
            server_ms: now_ms(),
            devices,
            next_cursor,
        })
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
        let (readings, predictions, dead_letters) = batch_ranges(&batch);
        let counts = match &self.backend {
            Backend::Sqlite(store) => store.store_batch(device, batch).await?,
            Backend::Postgres(store) => store.store_batch(device, batch).await?,
        };
        Ok(UploadAck {
            readings_inserted: counts.readings_inserted,
            readings_duplicate: counts.readings_duplicate,
            predictions_inserted: counts.predictions_inserted,
            predictions_duplicate: counts.predictions_duplicate,
            readings,
            predictions,
            dead_letters_inserted: counts.dead_letters_inserted,
            dead_letters_duplicate: counts.dead_letters_duplicate,
            dead_letters,
        })
    }

    /// Totals stored for `device`.
    ///
    /// # Errors
    /// [`StoreError::UnknownDevice`], or a storage failure.
    pub async fn summary(&self, device: &str) -> Result<DeviceSummary> {
        match &self.backend {
            Backend::Sqlite(store) => store.summary(device).await,
            Backend::Postgres(store) => store.summary(device).await,
        }
    }

    /// Runs a trivial query (readiness probe).
    ///
    /// # Errors
    /// A storage failure, or [`StoreError::Closed`].
    pub async fn ping(&self) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(store) => store.ping().await,
            Backend::Postgres(store) => store.ping().await,
        }
    }

    /// Stops the backend and closes the database. Other handles then fail with
    /// [`StoreError::Closed`].
    ///
    /// # Errors
    /// [`StoreError::CloseFailed`], or [`StoreError::Closed`] if the backend
    /// had already stopped.
    pub async fn close(self) -> Result<()> {
        match self.backend {
            Backend::Sqlite(store) => store.close().await,
            Backend::Postgres(store) => store.close().await,
        }
    }
}

/// How many rows of a batch were new and how many were already stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InsertCounts {
    readings_inserted: u64,
    readings_duplicate: u64,
    predictions_inserted: u64,
    predictions_duplicate: u64,
    dead_letters_inserted: u64,
    dead_letters_duplicate: u64,
}

/// The sequence ranges a batch covers, for [`UploadAck::readings`],
/// [`UploadAck::predictions`] and [`UploadAck::dead_letters`].
fn batch_ranges(batch: &UploadBatch) -> (Vec<SeqRange>, Vec<SeqRange>, Vec<SeqRange>) {
    let reading_keys: Vec<(String, u64)> = batch
        .readings
        .iter()
        .map(|r| (reading_key(&r.source, &r.stream), r.seq))
        .collect();
    (
        ranges(reading_keys.iter().map(|(key, seq)| (key.as_str(), *seq))),
        ranges(batch.predictions.iter().map(|p| (p.model.as_str(), p.seq))),
        ranges(batch.dead_letters.iter().map(|d| (DEAD_LETTERS_KEY, d.seq))),
    )
}

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
        /// Version found: SQLite's `PRAGMA user_version`, PostgreSQL's highest
        /// `schema_migrations.version`.
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
    /// No connection to PostgreSQL could be opened.
    #[error("cannot connect to postgresql")]
    Connect(#[source] tokio_postgres::Error),
    /// A PostgreSQL schema migration failed; no migration of this start was applied.
    #[error("postgresql schema migration to version {version} failed")]
    PostgresMigrate {
        /// Version the migration would have reached.
        version: usize,
        /// Underlying PostgreSQL error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A PostgreSQL statement failed (or its connection broke).
    #[error("postgresql statement failed")]
    Postgres(#[from] tokio_postgres::Error),
    /// The database returned a negative number where a count or sequence
    /// number was expected.
    #[error("database returned {value} for {column}, expected a non-negative integer")]
    NegativeValue {
        /// The column or aggregate.
        column: &'static str,
        /// The value returned.
        value: i64,
    },
    /// Reading values or a heartbeat could not be encoded as JSON.
    #[error("cannot encode reading values")]
    EncodeValues(#[source] serde_json::Error),
    /// A stored JSON column (reading values, heartbeat) does not parse.
    #[error("stored {column} does not parse")]
    DecodeStored {
        /// The column.
        column: &'static str,
        /// Underlying JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored `probabilities` blob is not a whole number of `f64`s.
    #[error("stored predictions.probabilities does not decode")]
    DecodeProbabilities(#[from] sync_protocol::BadProbabilities),
    /// A read query was refused; nothing was read.
    #[error("invalid query")]
    InvalidQuery(#[from] QueryError),
    /// The operator name is empty, too long or has characters outside `[A-Za-z0-9._-]`.
    #[error("invalid operator name {name:?}: use 1 to 128 characters from [A-Za-z0-9._-]")]
    InvalidOperatorName {
        /// The rejected name.
        name: String,
    },
    /// [`Store::add_operator`] for a name that is already registered (revoked or not).
    #[error("operator {name:?} already exists")]
    OperatorExists {
        /// The name.
        name: String,
    },
    /// No operator with this name is registered.
    #[error("unknown operator {name:?}")]
    UnknownOperator {
        /// The name.
        name: String,
    },
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
        /// `readings`, `predictions` or `dead_letters`.
        list: &'static str,
        /// Position in the list.
        index: usize,
    },
    /// A sequence number (or dead-letter `payload_len`) does not fit the
    /// databases' signed 64-bit integer.
    #[error("{list}[{index}]: {field} {value} is larger than {}", i64::MAX)]
    SeqTooLarge {
        /// `readings`, `predictions` or `dead_letters`.
        list: &'static str,
        /// Position in the list.
        index: usize,
        /// `seq`, `window_end_seq` or `payload_len`.
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
    for (index, dead_letter) in batch.dead_letters.iter().enumerate() {
        validate_dead_letter(index, dead_letter)?;
    }
    Ok(())
}

fn validate_dead_letter(index: usize, dead_letter: &DeadLetterRecord) -> Result<(), BatchError> {
    const LIST: &str = "dead_letters";
    if dead_letter.seq == 0 {
        return Err(BatchError::ZeroSeq { list: LIST, index });
    }
    validate_seq(LIST, index, "seq", dead_letter.seq)?;
    validate_seq(LIST, index, "payload_len", dead_letter.payload_len)
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
    if let Some(i) = prediction.probabilities.iter().position(|p| !p.is_finite()) {
        return Err(BatchError::NotFinite {
            list: LIST,
            index,
            field: format!("probabilities[{i}]"),
        });
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

/// A device row with its aggregates, as both backends read it for the
/// fleet summary.
struct FleetRow {
    device: String,
    revoked: bool,
    created_ms: i64,
    readings: i64,
    readings_last_ms: Option<i64>,
    predictions: i64,
    predictions_last_ms: Option<i64>,
    dead_letters: i64,
    dead_letters_last_ms: Option<i64>,
    heartbeats: i64,
    last_heartbeat_ms: Option<i64>,
    last_heartbeat_json: Option<String>,
}

/// The columns of a [`FleetRow`], in order, for either backend, over `d`:
/// the page's devices (so the aggregates run for them only).
macro_rules! fleet_select {
    () => {
        "SELECT d.id, d.revoked, d.created_ms,
       (SELECT COUNT(*) FROM readings WHERE device = d.id),
       (SELECT MAX(stored_ms) FROM readings WHERE device = d.id),
       (SELECT COUNT(*) FROM predictions WHERE device = d.id),
       (SELECT MAX(stored_ms) FROM predictions WHERE device = d.id),
       (SELECT COUNT(*) FROM dead_letters WHERE device = d.id),
       (SELECT MAX(stored_ms) FROM dead_letters WHERE device = d.id),
       (SELECT COUNT(*) FROM heartbeats WHERE device = d.id),
       (SELECT received_ms FROM heartbeats WHERE device = d.id
        ORDER BY received_ms DESC, id DESC LIMIT 1),
       (SELECT CAST(body_json AS TEXT) FROM heartbeats WHERE device = d.id
        ORDER BY received_ms DESC, id DESC LIMIT 1)
     FROM "
    };
}

/// One fleet page on SQLite (ids compare in byte order): after `?1`, at most `?2` rows.
const FLEET_SQL_SQLITE: &str = concat!(
    fleet_select!(),
    "(SELECT id, revoked, created_ms FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2) d
     ORDER BY d.id"
);

/// One fleet page on PostgreSQL, in byte order whatever the database's collation.
const FLEET_SQL_POSTGRES: &str = concat!(
    fleet_select!(),
    "(SELECT id, revoked, created_ms FROM devices WHERE id COLLATE \"C\" > $1
      ORDER BY id COLLATE \"C\" LIMIT $2) d
     ORDER BY d.id COLLATE \"C\""
);

impl FleetRow {
    fn into_device(self) -> Result<sync_protocol::FleetDevice> {
        let count = |column: &'static str, value: i64| {
            u64::try_from(value).map_err(|_| StoreError::NegativeValue { column, value })
        };
        let last = self
            .last_heartbeat_json
            .as_deref()
            .map(parse_heartbeat)
            .transpose()?;
        let last_seen_ms = [
            self.readings_last_ms,
            self.predictions_last_ms,
            self.dead_letters_last_ms,
            self.last_heartbeat_ms,
        ]
        .into_iter()
        .flatten()
        .max();
        Ok(sync_protocol::FleetDevice {
            device: self.device,
            revoked: self.revoked,
            created_ms: self.created_ms,
            last_seen_ms,
            last_heartbeat_ms: self.last_heartbeat_ms,
            agent_version: last.as_ref().map(|h| h.agent_version.clone()),
            models: last.as_ref().map(|h| h.models.clone()).unwrap_or_default(),
            backlog: last.map(|h| h.backlog),
            readings: count("count(readings)", self.readings)?,
            predictions: count("count(predictions)", self.predictions)?,
            dead_letters: count("count(dead_letters)", self.dead_letters)?,
            heartbeats: count("count(heartbeats)", self.heartbeats)?,
        })
    }
}

fn parse_heartbeat(json: &str) -> Result<Heartbeat> {
    serde_json::from_str(json).map_err(|source| StoreError::DecodeStored {
        column: "heartbeats.body_json",
        source,
    })
}

fn parse_values(json: &str) -> Result<std::collections::BTreeMap<String, f64>> {
    serde_json::from_str(json).map_err(|source| StoreError::DecodeStored {
        column: "readings.values_json",
        source,
    })
}

/// A stored non-negative `BIGINT` as `u64`.
fn stored_u64(column: &'static str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| StoreError::NegativeValue { column, value })
}

/// Inclusive time bounds of a read window (`to_ms` is exclusive in the API).
fn time_bounds(window: &query::Window) -> (i64, i64) {
    (
        window.from_ms.unwrap_or(i64::MIN),
        window.to_ms.map_or(i64::MAX, |to| to.saturating_sub(1)),
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
