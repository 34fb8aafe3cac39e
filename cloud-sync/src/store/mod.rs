//! Storage: devices and their tokens, readings and predictions.
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
//! - A reading is identified by `(device, source, stream, seq)` and a
//!   prediction by `(device, model, seq)` (the [`sync_protocol`] identity
//!   contract; `device` is the authenticated agent, `source` the sensor it
//!   heard the reading from). Both are primary keys and inserts use
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
//! - Only the sha256 of a device token is stored; the token itself is shown
//!   once, by [`Store::add_device`].
//! - A revoked device's batches are refused: no batch of the device commits
//!   after [`Store::revoke_device`] has returned.
//! - Summaries list keys in byte order on both backends.

mod postgres;
mod sqlite;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use sync_protocol::{DeviceSummary, Prediction, Reading, SeqRange, UploadAck, UploadBatch, ranges};

use postgres::PgStore;
pub use sqlite::COMMAND_QUEUE_CAPACITY;
use sqlite::SqliteStore;

use crate::config::{PostgresSettings, StorageSettings};

/// Longest accepted device id, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

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

    /// The id of the non-revoked device owning `token`, if any.
    ///
    /// # Errors
    /// Only on a storage failure; an unknown or revoked token is `Ok(None)`.
    pub async fn authenticate(&self, token: &str) -> Result<Option<String>> {
        if !is_token_shaped(token) {
            return Ok(None);
        }
        let digest = token_digest(token);
        match &self.backend {
            Backend::Sqlite(store) => store.authenticate(digest).await,
            Backend::Postgres(store) => store.authenticate(digest).await,
        }
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
        let (readings, predictions) = batch_ranges(&batch);
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
            ..UploadAck::default()
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
}

/// The sequence ranges a batch covers, for [`UploadAck::readings`] and
/// [`UploadAck::predictions`].
fn batch_ranges(batch: &UploadBatch) -> (Vec<SeqRange>, Vec<SeqRange>) {
    let reading_keys: Vec<(String, u64)> = batch
        .readings
        .iter()
        .map(|r| (reading_key(&r.source, &r.stream), r.seq))
        .collect();
    (
        ranges(reading_keys.iter().map(|(key, seq)| (key.as_str(), *seq))),
        ranges(batch.predictions.iter().map(|p| (p.model.as_str(), p.seq))),
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
    /// The batch carries dead letters, which this server cannot store yet;
    /// refused whole so nothing is acknowledged without being stored.
    #[error("dead_letters: not supported by this server yet")]
    DeadLettersUnsupported,
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
    if !batch.dead_letters.is_empty() {
        return Err(BatchError::DeadLettersUnsupported);
    }
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

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
