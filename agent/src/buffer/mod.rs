//! The durable buffer: the only place in the agent that touches rusqlite.
//!
//! One writer thread owns the SQLite connection; async code holds a cloneable
//! [`Buffer`] handle that sends commands over a bounded channel and awaits a
//! oneshot reply. Appends are group-committed: a transaction closes at
//! `commit_max_rows` rows or `commit_max_delay`, whichever comes first, and
//! every caller in the group is answered only after `COMMIT` returned, so a
//! reply of `Ok` means the rows are durable (to the `synchronous` level).
//!
//! Invariants:
//! - sequence numbers per `(source, stream)` and per model start at 1, are
//!   assigned inside the committing transaction and never reused;
//! - a reading with a producer identity is stored at most once per
//!   `(source, stream, ident)` among the rows present, so broker redeliveries
//!   are absorbed (one arriving after the first copy was evicted is stored);
//! - `synced` is a row state: 0 unsynced, 1 synced (only through
//!   [`Buffer::mark_synced`] / [`Buffer::mark_rows_synced`], never back),
//!   2 quarantined (only through [`Buffer::quarantine`], back to 0 only
//!   through [`Buffer::requeue_quarantine`]); see `outbox.rs`;
//! - dead letters carry a sequence number from the durable `sequences`
//!   table, never reused even when their rowid is;
//! - the database plus its WAL stay within `max_bytes` (see `quota.rs`): an
//!   append that does not fit evicts in the same transaction, or is answered
//!   [`Outcome::Rejected`] and not stored when only unsynced rows of
//!   `reject_new` streams are left to evict;
//! - a row leaves the database only by eviction (quota or `max_age`), and
//!   every eviction is counted durably in the transaction that deletes it
//!   ([`BufferStats::evicted`]).

mod outbox;
mod quota;
mod schema;
mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;

use crate::config::BufferSettings;

pub use schema::MigrateError;

/// Raw bytes of a dead-lettered payload are kept up to this size.
pub const DEAD_LETTER_MAX_BYTES: usize = 4096;

/// Why a buffer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The database could not be opened or prepared.
    #[error("cannot open buffer database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The schema could not be migrated.
    #[error("cannot migrate buffer database {path}")]
    Migrate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: MigrateError,
    },
    /// The state directory could not be created, or a corrupt file not moved aside.
    #[error("cannot prepare buffer file {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A statement failed; the transaction was rolled back.
    #[error("buffer statement failed")]
    Sqlite(#[from] rusqlite::Error),
    /// Values could not be encoded.
    #[error("cannot encode values")]
    Encode(#[from] serde_json::Error),
    /// The writer thread has stopped.
    #[error("buffer writer thread has stopped")]
    Closed,
}

/// Result alias for this module.
pub type Result<T, E = BufferError> = std::result::Result<T, E>;

/// Column `idx` of a predictions row as probabilities (see
/// `sync_protocol::probabilities_to_bytes`); a blob of the wrong length is a
/// conversion error of that column.
fn read_probabilities(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Vec<f64>> {
    let bytes: Option<Vec<u8>> = row.get(idx)?;
    sync_protocol::probabilities_from_bytes(bytes.as_deref()).map_err(|err| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Blob, Box::new(err))
    })
}

/// A reading to store; the buffer assigns its sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReading {
    /// Sensor device (from the topic).
    pub source: String,
    /// Stream (from the topic).
    pub stream: String,
    /// Producer-side identity used to absorb redeliveries; `None` disables dedupe.
    pub ident: Option<String>,
    /// Device timestamp, Unix ms.
    pub device_ts_ms: Option<i64>,
    /// Receive time, Unix ms.
    pub recv_ts_ms: i64,
    /// Whether the device clock looked sane.
    pub clock_ok: bool,
    /// Values.
    pub values: BTreeMap<String, f64>,
}

/// A message that could not become a reading, kept for inspection.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Topic it arrived on.
    pub topic: String,
    /// Stable reason code (e.g. `malformed`).
    pub reason: &'static str,
    /// Human-readable detail.
    pub detail: String,
    /// Payload, truncated to [`DEAD_LETTER_MAX_BYTES`].
    pub payload: Vec<u8>,
    /// Original payload length.
    pub payload_len: usize,
    /// Receive time, Unix ms.
    pub recv_ts_ms: i64,
}

/// One item of an ingest append.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A decoded reading.
    Reading(NewReading),
    /// A rejected message.
    DeadLetter(DeadLetter),
}

/// What happened to one appended item.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Stored with this sequence number.
    Stored(u64),
    /// Already stored earlier (same producer identity); nothing written.
    Duplicate,
    /// Stored in the dead-letter table.
    DeadLettered,
    /// Not stored: the quota is reached and no room can be made without
    /// evicting unsynced rows of `reject_new` streams. Do not acknowledge the
    /// message, so the broker keeps it.
    Rejected,
}

/// A prediction to store; the buffer assigns its per-model sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPrediction {
    /// Model name.
    pub model: String,
    /// Model version.
    pub model_version: String,
    /// sha256 of the ONNX file.
    pub model_sha256: String,
    /// Sensor device of the window.
    pub source: String,
    /// Stream of the window.
    pub stream: String,
    /// Last reading's sequence number.
    pub window_end_seq: u64,
    /// Last reading's device timestamp.
    pub window_end_ts_ms: Option<i64>,
    /// Score.
    pub score: f64,
    /// Threshold.
    pub threshold: f64,
    /// Whether the score crossed the threshold.
    pub is_anomaly: bool,
    /// When it was made, Unix ms.
    pub created_ms: i64,
    /// Class label of a classifier package (`None` for anomaly scores).
    pub label: Option<String>,
    /// Per-class probabilities, in the package's label order (empty when
    /// the model gives none).
    pub probabilities: Vec<f64>,
}

/// Rows not yet acknowledged by the cloud, oldest first, with their row ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unsynced {
    /// `(row id, reading)`.
    pub readings: Vec<(i64, sync_protocol::Reading)>,
    /// `(row id, prediction)`.
    pub predictions: Vec<(i64, sync_protocol::Prediction)>,
}

/// Next row ids at one moment: rows stored later have ids at or above them.
/// Sync uses it to tell live rows from the backlog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watermark {
    /// First reading row id after the moment.
    pub readings: i64,
    /// First prediction row id after the moment.
    pub predictions: i64,
}

/// Which unsynced rows a [`Fetch`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Readings and predictions stored after the watermark.
    Live(Watermark),
    /// Readings and predictions stored before the watermark.
    Backlog(Watermark),
    /// All unsynced readings and predictions.
    All,
    /// Unsynced dead letters (always a batch of their own).
    DeadLetters,
}

/// One request for unsynced rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetch {
    /// Which rows.
    pub part: Part,
    /// At most this many rows (predictions take at most half).
    pub max_rows: usize,
    /// At most about this many bytes of JSON (estimated); one row always fits.
    pub max_bytes: usize,
}

/// Unsynced rows for one upload, oldest first, with their row ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outbox {
    /// `(row id, reading)`.
    pub readings: Vec<(i64, sync_protocol::Reading)>,
    /// `(row id, prediction)`.
    pub predictions: Vec<(i64, sync_protocol::Prediction)>,
    /// `(row id, dead letter)`.
    pub dead_letters: Vec<(i64, sync_protocol::DeadLetterRecord)>,
    /// Estimated JSON size of the rows, bytes.
    pub est_bytes: usize,
    /// Rows of the same part were left out by the row or byte limit.
    pub more: bool,
    /// Oldest receive (or creation) time among the rows, Unix ms.
    pub oldest_ms: Option<i64>,
}

impl Outbox {
    /// Rows in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.readings.len() + self.predictions.len() + self.dead_letters.len()
    }

    /// Whether the batch holds no row.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Row ids by table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowIds {
    /// Reading row ids.
    pub readings: Vec<i64>,
    /// Prediction row ids.
    pub predictions: Vec<i64>,
    /// Dead-letter row ids.
    pub dead_letters: Vec<i64>,
}

/// What [`Buffer::requeue_quarantine`] moved back to unsynced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Quarantine records removed.
    pub batches: u64,
    /// Readings re-queued.
    pub readings: u64,
    /// Predictions re-queued.
    pub predictions: u64,
    /// Dead letters re-queued.
    pub dead_letters: u64,
}

/// What the cloud does not have yet, for heartbeats and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Unsynced readings.
    pub readings_unsynced: u64,
    /// Unsynced predictions.
    pub predictions_unsynced: u64,
    /// Unsynced dead letters.
    pub dead_letters_unsynced: u64,
    /// Quarantined readings.
    pub readings_quarantined: u64,
    /// Quarantined predictions.
    pub predictions_quarantined: u64,
    /// Quarantined dead letters.
    pub dead_letters_quarantined: u64,
    /// Quarantine records (refused batches) on disk.
    pub quarantine_batches: u64,
    /// Receive time of the oldest unsynced row, Unix ms.
    pub oldest_unsynced_ms: Option<i64>,
    /// Readings received since the given time whose device clock looked wrong.
    pub clock_suspect_readings: u64,
    /// Bytes in use (database and WAL).
    pub bytes_used: u64,
    /// The quota.
    pub max_bytes: u64,
    /// Eviction counters, as in [`BufferStats::evicted`].
    pub evicted: BTreeMap<(String, String), u64>,
}

/// Row counts, eviction counters and disk use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BufferStats {
    /// Readings stored.
    pub readings: u64,
    /// Readings not yet synced.
    pub readings_unsynced: u64,
    /// Predictions stored.
    pub predictions: u64,
    /// Predictions not yet synced.
    pub predictions_unsynced: u64,
    /// Anomalous predictions stored.
    pub anomalies: u64,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Rows evicted since the database was created, by `(stream, reason)`;
    /// reason is `quota` or `max_age`. Predictions count under
    /// `model:<model name>`, dead letters under `dead_letters`.
    pub evicted: BTreeMap<(String, String), u64>,
    /// Bytes in use: live database pages plus the WAL file.
    pub bytes_used: u64,
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Command {
    Append(Vec<Item>, Reply<Vec<Outcome>>),
    AppendPredictions(Vec<NewPrediction>, Reply<Vec<u64>>),
    Unsynced(usize, Reply<Unsynced>),
    MarkSynced(RowIds, Reply<()>),
    Stats(Reply<BufferStats>),
    Fetch(Fetch, Reply<Outbox>),
    Watermark(Reply<Watermark>),
    Quarantine(RowIds, u16, String, Reply<i64>),
    Requeue(Reply<Requeued>),
    SyncStats(i64, Reply<SyncStats>),
    Anomalies(Reply<Vec<sync_protocol::Prediction>>),
}

/// Cloneable handle to the writer thread. The thread exits when every handle
/// is dropped, after committing what it holds.
#[derive(Clone)]
pub struct Buffer {
    tx: flume::Sender<Command>,
}

/// The writer thread; join it after dropping every [`Buffer`] handle.
pub struct BufferThread {
    handle: std::thread::JoinHandle<()>,
}

impl BufferThread {
    /// Waits for the writer thread to finish its last transaction.
    pub fn join(self) {
        if self.handle.join().is_err() {
            tracing::error!("buffer writer thread panicked");
        }
    }
}

/// A future reply from the writer thread; resolves after the commit.
pub struct Pending<T>(oneshot::Receiver<Result<T>>);

impl<T> Pending<T> {
    /// Waits for the transaction holding the request to commit.
    ///
    /// # Errors
    /// The transaction's error, or [`BufferError::Closed`].
    pub async fn wait(self) -> Result<T> {
        self.0.await.map_err(|_| BufferError::Closed)?
    }
}

impl Buffer {
    /// Opens (creating or migrating) the database and starts the writer thread.
    ///
    /// A file that SQLite reports as corrupt or not a database is renamed to
    /// `<name>.corrupt-<unix ms>` and replaced by a fresh one; this is logged
    /// at ERROR because the rows it held are no longer served.
    ///
    /// # Errors
    /// [`BufferError`] when the file cannot be created or migrated.
    pub fn open(settings: &BufferSettings) -> Result<(Buffer, BufferThread)> {
        let conn = worker::open_or_replace(settings)?;
        let capacity = settings.commit_max_rows.max(64) * 2;
        let (tx, rx) = flume::bounded(capacity);
        let w = worker::Worker::new(conn, settings)?;
        let handle = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || w.run(&rx))
            .map_err(|source| BufferError::Io {
                path: settings.path.clone(),
                source,
            })?;
        Ok((Buffer { tx }, BufferThread { handle }))
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<Pending<T>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(make(reply))
            .await
            .map_err(|_| BufferError::Closed)?;
        Ok(Pending(rx))
    }

    /// Queues items for the next group commit without waiting for it; await
    /// the returned [`Pending`] to learn when they are durable.
    ///
    /// # Errors
    /// [`BufferError::Closed`] when the writer has stopped.
    pub async fn submit(&self, items: Vec<Item>) -> Result<Pending<Vec<Outcome>>> {
        self.request(|r| Command::Append(items, r)).await
    }

    /// Appends items and waits until they are committed.
    ///
    /// # Errors
    /// The transaction's error; nothing of the group was stored then.
    pub async fn append(&self, items: Vec<Item>) -> Result<Vec<Outcome>> {
        self.submit(items).await?.wait().await
    }

    /// Queues predictions for the next group commit without waiting for it;
    /// the [`Pending`] resolves to their sequence numbers after the commit.
    ///
    /// # Errors
    /// [`BufferError::Closed`] when the writer has stopped.
    pub async fn submit_predictions(&self, items: Vec<NewPrediction>) -> Result<Pending<Vec<u64>>> {
        self.request(|r| Command::AppendPredictions(items, r)).await
    }

    /// Stores predictions and returns their sequence numbers, after commit.
    ///
    /// # Errors
    /// The transaction's error.
    pub async fn append_predictions(&self, items: Vec<NewPrediction>) -> Result<Vec<u64>> {
        self.submit_predictions(items).await?.wait().await
    }

    /// Up to `limit` unsynced readings and up to `limit` unsynced predictions, oldest first.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn unsynced(&self, limit: usize) -> Result<Unsynced> {
        self.request(|r| Command::Unsynced(limit, r))
            .await?
            .wait()
            .await
    }

    /// Marks rows as acknowledged by the cloud.
    ///
    /// # Errors
    /// SQLite errors; then no row was marked.
    pub async fn mark_synced(&self, readings: Vec<i64>, predictions: Vec<i64>) -> Result<()> {
        self.mark_rows_synced(RowIds {
            readings,
            predictions,
            dead_letters: Vec::new(),
        })
        .await
    }

    /// Marks rows of every table as acknowledged by the cloud, in one
    /// transaction.
    ///
    /// # Errors
    /// SQLite errors; then no row was marked.
    pub async fn mark_rows_synced(&self, ids: RowIds) -> Result<()> {
        self.request(|r| Command::MarkSynced(ids, r))
            .await?
            .wait()
            .await
    }

    /// Unsynced rows for one upload; see [`Fetch`].
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn fetch_unsynced(&self, fetch: Fetch) -> Result<Outbox> {
        self.request(|r| Command::Fetch(fetch, r))
            .await?
            .wait()
            .await
    }

    /// The next row ids (see [`Watermark`]).
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn watermark(&self) -> Result<Watermark> {
        self.request(Command::Watermark).await?.wait().await
    }

    /// Moves unsynced rows to quarantine, recording the cloud's `status` and
    /// `error` body; they are no longer fetched for upload, stay on disk
    /// (evicted before unsynced rows) and return with
    /// [`Buffer::requeue_quarantine`]. Returns the quarantine record's id.
    ///
    /// # Errors
    /// SQLite errors; then nothing changed.
    pub async fn quarantine(&self, ids: RowIds, status: u16, error: String) -> Result<i64> {
        self.request(|r| Command::Quarantine(ids, status, error, r))
            .await?
            .wait()
            .await
    }

    /// Moves every quarantined row back to unsynced (they are then uploaded
    /// as backlog) and removes the quarantine records.
    ///
    /// # Errors
    /// SQLite errors; then nothing changed.
    pub async fn requeue_quarantine(&self) -> Result<Requeued> {
        self.request(Command::Requeue).await?.wait().await
    }

    /// Backlog and quarantine figures; `clock_suspect_readings` counts
    /// readings received at or after `since_ms`.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn sync_stats(&self, since_ms: i64) -> Result<SyncStats> {
        self.request(|r| Command::SyncStats(since_ms, r))
            .await?
            .wait()
            .await
    }

    /// Row counts.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn stats(&self) -> Result<BufferStats> {
        self.request(Command::Stats).await?.wait().await
    }

    /// Every stored prediction that crossed its threshold, in storage order.
    ///
    /// # Errors
    /// SQLite errors.
    pub async fn anomalies(&self) -> Result<Vec<sync_protocol::Prediction>> {
        self.request(Command::Anomalies).await?.wait().await
    }
}

/// Opens the buffer at `settings.path` (alongside a running agent if need
/// be: SQLite serialises the writers), re-queues every quarantined row and
/// closes it again.
///
/// # Errors
/// [`BufferError`] when the database cannot be opened or updated.
pub async fn requeue_quarantine(settings: &BufferSettings) -> Result<Requeued> {
    let (buffer, thread) = Buffer::open(settings)?;
    let out = buffer.requeue_quarantine().await;
    drop(buffer);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    out
}

/// Path a corrupt database is moved to.
fn quarantine_path(path: &Path, now_ms: i64) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{now_ms}"));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests;
