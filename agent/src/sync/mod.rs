//! Cloud sync: uploads unsynced readings, predictions and dead letters to
//! `cloud-sync`, and sends heartbeats.
//!
//! Owns the HTTP client (`client.rs`: rustls, CA pinning, client
//! certificate, status classes), the upload loop and retry policy (this
//! file), the backlog pacer (`pace.rs`) and heartbeats (`heartbeat.rs`).
//! Touches the buffer only through [`Buffer`].
//!
//! Invariants:
//! - rows are marked synced only after a 2xx response whose body parses as
//!   an [`sync_protocol::UploadAck`] covering every row of the batch;
//!   anything else leaves them unsynced to be sent again. Replays are
//!   harmless: the cloud stores rows by `(device, source, stream, seq)`,
//!   `(device, model, seq)` and `(device, seq)` for dead letters;
//! - a batch refused with a non-retriable 4xx is split in half and the
//!   halves retried; a single row still refused is quarantined in the buffer
//!   (counted, logged at ERROR), never dropped. 401/403 and other
//!   configuration answers quarantine nothing;
//! - live rows (stored since the current connection came up) go before the
//!   backlog, which drains at most `backlog_rows_per_sec`;
//! - the cursor is the buffer's row state, so a restart resumes exactly
//!   where the last acknowledged batch ended.

mod client;
mod heartbeat;
mod pace;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError, Fetch, Outbox, Part, RowIds, Watermark};
use crate::config::SyncSettings;
use crate::ingest::backoff_with_jitter;
use crate::telemetry::Counters;

pub use client::{BodyFormat, Class, ack_covers, build_client, classify};
pub use heartbeat::offset_ms;
pub use pace::Pace;

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The buffer failed.
    #[error("buffer failed during sync")]
    Buffer(#[from] BufferError),
    /// The HTTP client could not be built.
    #[error("cannot build HTTP client")]
    Client(#[source] reqwest::Error),
    /// The TLS files could not be used.
    #[error("cannot set up TLS for sync")]
    Tls(#[source] crate::ingest::TlsError),
    /// Network failure or timeout; retried.
    #[error("upload failed")]
    Transport(#[source] reqwest::Error),
    /// The cloud asked us to slow down or is unavailable; retried.
    #[error("cloud answered {status}; retrying")]
    Retriable {
        /// HTTP status.
        status: StatusCode,
        /// Delay from `Retry-After`, if given.
        retry_after: Option<Duration>,
    },
    /// The cloud refused the request in a way every request would be
    /// refused (401, 403, 404, ...): the token, device id or URL is wrong.
    #[error(
        "cloud refused the agent with {status} (check sync.url, the token and agent.device_id): {body}"
    )]
    Config {
        /// HTTP status.
        status: StatusCode,
        /// Response body (truncated).
        body: String,
    },
    /// The cloud refused these rows (non-retriable 4xx).
    #[error("cloud refused the batch with {status}: {body}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// Response body (truncated).
        body: String,
    },
    /// The 2xx body was not an acknowledgement.
    #[error("cloud acknowledgement unreadable")]
    BadAck(#[source] serde_json::Error),
    /// The acknowledgement does not cover every row of the batch.
    #[error("cloud acknowledgement does not cover the batch")]
    AckMismatch,
    /// The batch could not be encoded.
    #[error("cannot encode batch")]
    Encode(#[source] std::io::Error),
}

/// Result alias for this module.
pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// `error: cause: cause`, one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The sync stage.
pub struct SyncStage {
    settings: SyncSettings,
    device_id: String,
    buffer: Buffer,
    counters: Arc<Counters>,
    models: tokio::sync::watch::Receiver<Vec<sync_protocol::ActiveModel>>,
    /// The body format in use ([`BodyFormat::index`]): steps down when the
    /// cloud turns out not to know the newest compact layout, or the codec.
    format: AtomicU8,
}

/// Where the upload loop stands.
struct Cursor {
    /// Rows at or above it are live.
    watermark: Watermark,
    /// The last upload succeeded (the connection is up).
    healthy: bool,
    /// Failed uploads in a row.
    attempt: u32,
    pace: Pace,
}

impl SyncStage {
    /// Builds the stage.
    #[must_use]
    pub fn new(
        settings: SyncSettings,
        device_id: String,
        buffer: Buffer,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            settings,
            device_id,
            buffer,
            counters,
            models: tokio::sync::watch::channel(Vec::new()).1,
            format: AtomicU8::new(BodyFormat::Compact.index()),
        }
    }

    /// Uses JSON bodies from the start instead of the compact codec (for
    /// clouds that predate it; the stage also falls back on its own).
    #[must_use]
    pub fn with_json_bodies(self) -> Self {
        self.format
            .store(BodyFormat::Json.index(), Ordering::Relaxed);
        self
    }

    /// Uses compact layout version 1 bodies from the start (for clouds that
    /// predate version 2; the stage also falls back on its own).
    #[must_use]
    pub fn with_compact_v1_bodies(self) -> Self {
        self.format
            .store(BodyFormat::CompactV1.index(), Ordering::Relaxed);
        self
    }

    fn format(&self) -> BodyFormat {
        BodyFormat::from_index(self.format.load(Ordering::Relaxed))
    }

    /// The models reported in heartbeats: the latest value at each beat
    /// (the inference stage updates it on every swap and rollback).
    #[must_use]
    pub fn with_models(
        mut self,
        models: tokio::sync::watch::Receiver<Vec<sync_protocol::ActiveModel>>,
    ) -> Self {
        self.models = models;
        self
    }

    /// Uploads until `shutdown`, then makes a final pass over the live rows
    /// and dead letters that stops at the first failure (the supervisor's
    /// deadline bounds it; the backlog stays buffered for the next start).
    ///
    /// # Errors
    /// [`SyncError::Client`] or [`SyncError::Tls`] when no HTTP client can be
    /// built, or buffer failures.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let client = build_client(&self.settings)?;
        let base = &self.settings.url;
        let url = format!("{base}{}", sync_protocol::batch_path(&self.device_id));
        let beats = self.settings.heartbeat_interval.map(|interval| {
            let hb = heartbeat::Heartbeats {
                client: client.clone(),
                url: format!("{base}{}", sync_protocol::heartbeat_path(&self.device_id)),
                token: self.settings.token.clone(),
                buffer: self.buffer.clone(),
                counters: self.counters.clone(),
                models: self.models.clone(),
                interval,
                started_ms: crate::now_ms(),
            };
            let token = shutdown.child_token();
            (tokio::spawn(hb.run(token.clone())), token)
        });
        let result = self.upload_loop(&client, &url, &shutdown).await;
        if let Some((task, token)) = beats {
            token.cancel();
            let _ = task.await;
        }
        tracing::info!("sync stopped");
        result
    }

    async fn upload_loop(
        &self,
        client: &reqwest::Client,
        url: &str,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let s = &self.settings;
        // Design: everything stored before start-up is backlog, so a restart
        // after a long outage drains at the configured rate too.
        let mut cur = Cursor {
            watermark: self.buffer.watermark().await?,
            healthy: true,
            attempt: 0,
            pace: Pace::new(s.backlog_rows_per_sec),
        };
        let mut wake_reason;
        while !shutdown.is_cancelled() {
            let now = tokio::time::Instant::now();
            let mut wake = now + s.interval;
            wake_reason = "idle";

            let live = self
                .fetch(Part::Live(cur.watermark), s.batch_max_rows)
                .await?;
            if !live.is_empty() {
                let age = live
                    .oldest_ms
                    .map_or(Duration::ZERO, |t| ms(crate::now_ms().saturating_sub(t)));
                if live.more || age >= s.batch_max_delay {
                    self.attempt(client, url, live, &mut cur, false, shutdown)
                        .await?;
                    continue;
                }
                wake = wake.min(now + (s.batch_max_delay - age));
                wake_reason = "live batch filling";
            }

            let dead = self.fetch(Part::DeadLetters, s.batch_max_rows).await?;
            if !dead.is_empty() {
                self.attempt(client, url, dead, &mut cur, false, shutdown)
                    .await?;
                continue;
            }

            if cur.pace.is_ready() {
                let rows = cur.pace.batch_rows(s.batch_max_rows);
                let backlog = self.fetch(Part::Backlog(cur.watermark), rows).await?;
                if !backlog.is_empty() {
                    self.attempt(client, url, backlog, &mut cur, true, shutdown)
                        .await?;
                    continue;
                }
            } else if cur.pace.ready_at() < wake {
                wake = cur.pace.ready_at();
                wake_reason = "backlog paced";
            }
            tracing::trace!(reason = wake_reason, "sync waiting");
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = shutdown.cancelled() => {}
            }
        }
        // Final pass: live rows and dead letters while the cloud answers;
        // none when the last upload failed (it would only wait for the
        // request timeout inside the shutdown deadline).
        if !cur.healthy {
            return Ok(());
        }
        for part in [Part::Live(cur.watermark), Part::DeadLetters] {
            loop {
                let batch = self.fetch(part, s.batch_max_rows).await?;
                if batch.is_empty() {
                    break;
                }
                if let Err(e) = self.deliver(client, url, batch).await {
                    if let SyncError::Buffer(e) = e {
                        return Err(SyncError::Buffer(e));
                    }
                    tracing::info!(error = %chain(&e), "final sync stopped; remaining rows stay buffered");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    async fn fetch(&self, part: Part, max_rows: usize) -> Result<Outbox> {
        Ok(self
            .buffer
            .fetch_unsynced(Fetch {
                part,
                max_rows,
                max_bytes: self.settings.batch_max_bytes,
            })
            .await?)
    }

    /// Delivers one batch and updates the cursor: on success the backlog
    /// pacer is charged and a recovered connection moves the watermark; on
    /// failure it waits out the backoff (or `Retry-After`).
    async fn attempt(
        &self,
        client: &reqwest::Client,
        url: &str,
        batch: Outbox,
        cur: &mut Cursor,
        backlog: bool,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let rows = batch.len();
        match self.deliver(client, url, batch).await {
            Ok(()) => {
                if backlog {
                    cur.pace.spent(rows);
                }
                cur.attempt = 0;
                if !cur.healthy {
                    cur.healthy = true;
                    // Design: what piled up during the outage is backlog now;
                    // rows stored from here on are live and go first.
                    cur.watermark = self.buffer.watermark().await?;
                    tracing::info!("cloud reachable again; backlog drains behind live rows");
                }
                Ok(())
            }
            Err(SyncError::Buffer(e)) => Err(SyncError::Buffer(e)),
            Err(e) => {
                cur.healthy = false;
                Counters::add(&self.counters.sync_failures, 1);
                let s = &self.settings;
                let mut delay = backoff_with_jitter(s.backoff_min, s.backoff_max, cur.attempt);
                cur.attempt = cur.attempt.saturating_add(1);
                match &e {
                    SyncError::Retriable {
                        retry_after: Some(after),
                        ..
                    } => delay = retry_delay(*after, s.backoff_max),
                    SyncError::Config { .. } => {
                        Counters::add(&self.counters.sync_auth_failures, 1);
                        tracing::error!(error = %chain(&e), retry_in_ms = delay.as_millis(), "cloud refuses this agent; nothing is uploaded until the configuration is fixed");
                    }
                    SyncError::BadAck(_) | SyncError::AckMismatch => {
                        tracing::error!(error = %chain(&e), retry_in_ms = delay.as_millis(), "cloud answered 2xx without a valid acknowledgement; rows stay unsynced");
                    }
                    _ => {}
                }
                if !matches!(
                    e,
                    SyncError::Config { .. } | SyncError::BadAck(_) | SyncError::AckMismatch
                ) {
                    tracing::warn!(error = %chain(&e), retry_in_ms = delay.as_millis(), "sync upload failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => {}
                }
                Ok(())
            }
        }
    }

    /// Uploads `batch`; a refused batch is split and its halves retried, a
    /// single refused row quarantined. Returns `Ok` once every row is synced
    /// or quarantined.
    ///
    /// # Errors
    /// The first retriable, configuration or transport failure (rows not yet
    /// delivered stay unsynced), or buffer failures.
    async fn deliver(&self, client: &reqwest::Client, url: &str, batch: Outbox) -> Result<()> {
        let mut todo = vec![batch];
        while let Some(batch) = todo.pop() {
            let format = self.format();
            Counters::add(&self.counters.sync_attempts, 1);
            match client::post_batch(client, url, self.settings.token.expose(), &batch, format)
                .await
            {
                Ok((ack, sent)) => {
                    let ids = row_ids(&batch);
                    self.buffer.mark_rows_synced(ids).await?;
                    let c = &self.counters;
                    Counters::add(&c.synced_readings, batch.readings.len() as u64);
                    Counters::add(&c.synced_predictions, batch.predictions.len() as u64);
                    Counters::add(
                        &c.sync_labels_dropped,
                        client::labels_left_out(&batch, format),
                    );
                    Counters::add(&c.synced_dead_letters, batch.dead_letters.len() as u64);
                    Counters::add(&c.sync_bytes_sent, sent as u64);
                    tracing::debug!(
                        readings = batch.readings.len(),
                        predictions = batch.predictions.len(),
                        dead_letters = batch.dead_letters.len(),
                        bytes = sent,
                        inserted = ack.readings_inserted,
                        duplicate = ack.readings_duplicate,
                        "batch synced"
                    );
                }
                Err(SyncError::Refused { status, body })
                    if client::codec_unsupported(format, status, &body) =>
                {
                    let next = format.fallback();
                    tracing::warn!(%status, error = %body, from = format.media_type(), to = next.media_type(), "cloud does not accept this batch encoding; using an older one from now on");
                    self.format.store(next.index(), Ordering::Relaxed);
                    todo.push(batch);
                }
                Err(SyncError::Refused { status, body }) if batch.len() > 1 => {
                    tracing::warn!(%status, rows = batch.len(), error = %body, "cloud refused a batch; retrying its halves");
                    let (first, second) = split(batch);
                    todo.push(second);
                    todo.push(first);
                }
                Err(SyncError::Refused { status, body }) => {
                    self.quarantine(batch, status, body).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn quarantine(&self, batch: Outbox, status: StatusCode, body: String) -> Result<()> {
        let what = describe(&batch);
        let rows = batch.len() as u64;
        let id = self
            .buffer
            .quarantine(row_ids(&batch), status.as_u16(), body.clone())
            .await?;
        Counters::add(&self.counters.sync_quarantined_batches, 1);
        Counters::add(&self.counters.sync_quarantined_rows, rows);
        tracing::error!(
            %status,
            error = %body,
            rows,
            row = %what,
            quarantine_id = id,
            "cloud refused a row for good; quarantined in the buffer (re-queue with `edge-agent buffer requeue-quarantine`)"
        );
        Ok(())
    }
}

/// The wait a `Retry-After` asks for, capped at the longest backoff so a
/// far-off date (or a clock far behind the cloud's) cannot park the agent.
fn retry_delay(after: Duration, backoff_max: Duration) -> Duration {
    after.min(backoff_max)
}

fn ms(v: i64) -> Duration {
    Duration::from_millis(u64::try_from(v).unwrap_or(0))
}

fn row_ids(batch: &Outbox) -> RowIds {
    RowIds {
        readings: batch.readings.iter().map(|(id, _)| *id).collect(),
        predictions: batch.predictions.iter().map(|(id, _)| *id).collect(),
        dead_letters: batch.dead_letters.iter().map(|(id, _)| *id).collect(),
    }
}

/// The first row's identity, for logs.
fn describe(batch: &Outbox) -> String {
    if let Some((_, r)) = batch.readings.first() {
        format!("reading {}/{} seq {}", r.source, r.stream, r.seq)
    } else if let Some((_, p)) = batch.predictions.first() {
        format!("prediction {} seq {}", p.model, p.seq)
    } else if let Some((_, d)) = batch.dead_letters.first() {
        format!("dead letter seq {}", d.seq)
    } else {
        "nothing".into()
    }
}

/// Splits a batch into two halves by row count, in order (readings, then
/// predictions, then dead letters).
fn split(mut batch: Outbox) -> (Outbox, Outbox) {
    fn take<T>(from: &mut Vec<T>, want: usize) -> Vec<T> {
        let n = want.min(from.len());
        from.drain(..n).collect()
    }
    let half = batch.len() / 2;
    let mut first = Outbox {
        readings: take(&mut batch.readings, half),
        ..Outbox::default()
    };
    let left = half - first.readings.len();
    first.predictions = take(&mut batch.predictions, left);
    let left = left - first.predictions.len();
    first.dead_letters = take(&mut batch.dead_letters, left);
    batch.est_bytes = 0;
    batch.more = false;
    (first, batch)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn outbox(readings: usize, predictions: usize) -> Outbox {
        let reading = |i: usize| {
            (
                i64::try_from(i).unwrap_or(0),
                sync_protocol::Reading {
                    source: "m".into(),
                    stream: "t".into(),
                    seq: i as u64 + 1,
                    device_ts_ms: None,
                    recv_ts_ms: 0,
                    clock_ok: true,
                    values: BTreeMap::new(),
                },
            )
        };
        let prediction = |i: usize| {
            (
                i64::try_from(i).unwrap_or(0),
                sync_protocol::Prediction {
                    model: "m".into(),
                    model_version: "1".into(),
                    model_sha256: String::new(),
                    seq: i as u64 + 1,
                    source: "m".into(),
                    stream: "t".into(),
                    window_end_seq: 1,
                    window_end_ts_ms: None,
                    score: 0.0,
                    threshold: 1.0,
                    is_anomaly: false,
                    created_ms: 0,
                    label: None,
                    probabilities: Vec::new(),
                },
            )
        };
        Outbox {
            readings: (0..readings).map(reading).collect(),
            predictions: (0..predictions).map(prediction).collect(),
            ..Outbox::default()
        }
    }

    #[test]
    fn retry_after_dates_are_capped_by_the_longest_backoff() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let max = Duration::from_secs(30);
        let now = std::time::SystemTime::now();
        let mut headers = HeaderMap::new();
        let in_an_hour = httpdate::fmt_http_date(now + Duration::from_secs(3600));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&in_an_hour).unwrap_or_else(|_| HeaderValue::from_static("x")),
        );
        let after = client::retry_after(&headers, now);
        assert!(
            after.is_some_and(|a| a > Duration::from_secs(3590)),
            "{after:?}"
        );
        assert_eq!(after.map(|a| retry_delay(a, max)), Some(max));
        let in_ten = httpdate::fmt_http_date(now + Duration::from_secs(10));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_str(&in_ten).unwrap_or_else(|_| HeaderValue::from_static("x")),
        );
        let after = client::retry_after(&headers, now).map(|a| retry_delay(a, max));
        // The date has whole seconds: between 9 and 10 s from `now`.
        assert!(
            after.is_some_and(|a| a > Duration::from_secs(8) && a <= Duration::from_secs(10)),
            "{after:?}"
        );
        assert_eq!(
            retry_delay(Duration::from_secs(3), max),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn split_halves_in_order_and_keeps_every_row() {
        let (a, b) = split(outbox(3, 2));
        assert_eq!((a.readings.len(), a.predictions.len()), (2, 0));
        assert_eq!((b.readings.len(), b.predictions.len()), (1, 2));
        let (a, b) = split(outbox(1, 4));
        assert_eq!((a.readings.len(), a.predictions.len()), (1, 1));
        assert_eq!((b.readings.len(), b.predictions.len()), (0, 3));
        let (a, b) = split(outbox(2, 0));
        assert_eq!((a.len(), b.len()), (1, 1));
        assert_eq!(b.readings[0].1.seq, 2);
    }
}
