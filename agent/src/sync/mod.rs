//! Cloud sync: uploads unsynced readings and predictions to `cloud-sync`.
//!
//! Owns the HTTP client and the retry policy. Invariant: rows are marked
//! synced only after a 2xx response whose body parses as an
//! [`sync_protocol::UploadAck`]; anything else leaves them unsynced to be sent
//! again. Replays are harmless because the cloud stores rows by
//! `(device, source, stream, seq)` and `(device, model, seq)`.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError, Unsynced};
use crate::config::SyncSettings;
use crate::ingest::backoff_with_jitter;
use crate::telemetry::Counters;

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The buffer failed.
    #[error("buffer failed during sync")]
    Buffer(#[from] BufferError),
    /// The HTTP client could not be built.
    #[error("cannot build HTTP client")]
    Client(#[source] reqwest::Error),
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
    /// The cloud refused the batch; retried slowly and reported as an error.
    #[error("cloud refused the batch with {status}: {body}")]
    Refused {
        /// HTTP status.
        status: StatusCode,
        /// Response body (truncated).
        body: String,
    },
    /// The 2xx body was not an acknowledgement.
    #[error("cloud acknowledgement unreadable")]
    BadAck(#[source] reqwest::Error),
    /// The batch could not be encoded.
    #[error("cannot encode batch")]
    Encode(#[source] std::io::Error),
}

/// Result alias for this module.
pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// The sync stage.
pub struct SyncStage {
    settings: SyncSettings,
    device_id: String,
    buffer: Buffer,
    counters: Arc<Counters>,
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
        }
    }

    /// Uploads until `shutdown`, then makes a final pass that stops at the
    /// first failure (the supervisor's deadline bounds it).
    ///
    /// # Errors
    /// [`SyncError::Client`] when no HTTP client can be built, or buffer failures.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(self.settings.request_timeout)
            .user_agent(concat!("edge-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(SyncError::Client)?;
        let url = format!(
            "{}{}",
            self.settings.url,
            sync_protocol::batch_path(&self.device_id)
        );
        let mut attempt = 0u32;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let batch = self.buffer.unsynced(self.settings.batch_max_rows).await?;
            if batch.readings.is_empty() && batch.predictions.is_empty() {
                tokio::select! {
                    () = tokio::time::sleep(self.settings.interval) => {}
                    () = shutdown.cancelled() => {}
                }
                continue;
            }
            match self.upload(&client, &url, batch).await {
                Ok(()) => attempt = 0,
                Err(SyncError::Buffer(e)) => return Err(SyncError::Buffer(e)),
                Err(e) => {
                    Counters::add(&self.counters.sync_failures, 1);
                    let mut delay = backoff_with_jitter(
                        self.settings.backoff_min,
                        self.settings.backoff_max,
                        attempt,
                    );
                    attempt = attempt.saturating_add(1);
                    match &e {
                        SyncError::Retriable {
                            retry_after: Some(after),
                            ..
                        } => delay = (*after).min(self.settings.backoff_max),
                        SyncError::Refused { .. } => {
                            tracing::error!(error = %e, "cloud refused a batch; rows stay unsynced and will be retried");
                        }
                        _ => {}
                    }
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis(), "sync upload failed");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => {}
                    }
                }
            }
        }
        // Final pass: push what is left while the cloud keeps answering.
        loop {
            let batch = self.buffer.unsynced(self.settings.batch_max_rows).await?;
            if batch.readings.is_empty() && batch.predictions.is_empty() {
                break;
            }
            if let Err(e) = self.upload(&client, &url, batch).await {
                tracing::info!(error = %format!("{e:#}"), "final sync stopped; remaining rows stay buffered");
                break;
            }
        }
        tracing::info!("sync stopped");
        Ok(())
    }

    async fn upload(&self, client: &reqwest::Client, url: &str, batch: Unsynced) -> Result<()> {
        let (reading_ids, readings): (Vec<i64>, Vec<_>) = batch.readings.into_iter().unzip();
        let (prediction_ids, predictions): (Vec<i64>, Vec<_>) =
            batch.predictions.into_iter().unzip();
        let body = sync_protocol::UploadBatch {
            readings,
            predictions,
            dead_letters: Vec::new(),
        };
        let json = serde_json::to_vec(&body).map_err(|e| SyncError::Encode(e.into()))?;
        let compressed = zstd::bulk::compress(&json, 3).map_err(SyncError::Encode)?;
        let response = client
            .post(url)
            .bearer_auth(self.settings.token.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::CONTENT_ENCODING,
                sync_protocol::ZSTD_ENCODING,
            )
            .body(compressed)
            .send()
            .await
            .map_err(SyncError::Transport)?;
        let status = response.status();
        if status.is_success() {
            let ack: sync_protocol::UploadAck = response.json().await.map_err(SyncError::BadAck)?;
            self.buffer
                .mark_synced(reading_ids.clone(), prediction_ids.clone())
                .await?;
            Counters::add(&self.counters.synced_readings, reading_ids.len() as u64);
            Counters::add(
                &self.counters.synced_predictions,
                prediction_ids.len() as u64,
            );
            tracing::debug!(
                readings = reading_ids.len(),
                predictions = prediction_ids.len(),
                inserted = ack.readings_inserted,
                duplicate = ack.readings_duplicate,
                "batch synced"
            );
            return Ok(());
        }
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::SERVICE_UNAVAILABLE
            || status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
        {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(SyncError::Retriable {
                status,
                retry_after,
            });
        }
        let text = response.text().await.unwrap_or_default();
        Err(SyncError::Refused {
            status,
            body: text.chars().take(512).collect(),
        })
    }
}
