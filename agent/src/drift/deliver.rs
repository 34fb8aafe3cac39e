//! Delivery of queued drift summaries to cloud-sync
//! (`POST /v1/devices/{device}/drift`, the `[sync]` URL, token and TLS).
//!
//! Owns nothing but its HTTP client; the queue ([`super::queue`]) owns the
//! files. A summary leaves the queue only after a 2xx; a permanent refusal
//! (400, 404, 413, 415, 422) sets it aside in `refused/`; anything else
//! (network, 401/403, 408, 429, 5xx) stops the pass and retries after a
//! backoff, oldest first, so delivery order is queue order.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::queue::DriftQueue;
use super::{DriftError, DriftMetrics, Result};
use crate::config::{Secret, SyncSettings};
use crate::sync::{Class, build_client, classify};
use crate::telemetry::Counters;

/// Posts queued summaries; see the module docs.
pub struct Deliverer {
    client: reqwest::Client,
    url: String,
    token: Secret,
    queue: DriftQueue,
    metrics: Arc<DriftMetrics>,
    /// Pause between passes while the queue is empty or after a success.
    interval: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

/// Outcome of one pass over the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Every queued summary was delivered or set aside.
    Drained,
    /// A summary could not be delivered now; try again later.
    Retry,
}

impl Deliverer {
    /// A deliverer for `device` using the `[sync]` settings.
    ///
    /// # Errors
    /// [`DriftError::Client`] when the HTTP client cannot be built (TLS files).
    pub fn new(
        sync: &SyncSettings,
        device: &str,
        queue: DriftQueue,
        metrics: Arc<DriftMetrics>,
    ) -> Result<Self> {
        let client = build_client(sync).map_err(DriftError::Client)?;
        Ok(Self {
            client,
            url: format!(
                "{}{}",
                sync.url.trim_end_matches('/'),
                sync_protocol::drift::drift_path(device)
            ),
            token: sync.token.clone(),
            queue,
            metrics,
            interval: sync.interval.max(Duration::from_secs(1)),
            backoff_min: sync.backoff_min.max(Duration::from_millis(100)),
            backoff_max: sync.backoff_max.max(sync.backoff_min),
        })
    }

    /// Delivers in passes until `shutdown`: every `interval` while the
    /// queue drains, with exponential backoff while it cannot.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = self.backoff_min;
        loop {
            let wait = match self.pass().await {
                Pass::Drained => {
                    backoff = self.backoff_min;
                    self.interval
                }
                Pass::Retry => {
                    let w = backoff;
                    backoff = (backoff * 2).min(self.backoff_max);
                    w
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass: posts queued summaries oldest first; stops at the first
    /// one that may succeed later.
    pub async fn pass(&self) -> Pass {
        let pending = tokio::task::spawn_blocking({
            let queue = self.queue.clone();
            move || queue.pending()
        })
        .await
        .unwrap_or_default();
        for (path, summary) in pending {
            let sent = self
                .client
                .post(&self.url)
                .bearer_auth(self.token.expose())
                .json(&summary)
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    Counters::add(&self.metrics.send_failures, 1);
                    tracing::warn!(error = %e, "drift summary not delivered; retrying");
                    return Pass::Retry;
                }
            };
            let status = response.status();
            match classify(status) {
                Class::Success => {
                    Counters::add(&self.metrics.sent, 1);
                    let queue = self.queue.clone();
                    let _ = tokio::task::spawn_blocking(move || queue.done(&path)).await;
                }
                Class::Refused => {
                    let body = response.text().await.unwrap_or_default();
                    let why = format!("{status}: {}", body.chars().take(512).collect::<String>());
                    let queue = self.queue.clone();
                    let _ = tokio::task::spawn_blocking(move || queue.set_aside(&path, &why)).await;
                }
                Class::Retriable | Class::Config => {
                    Counters::add(&self.metrics.send_failures, 1);
                    tracing::warn!(%status, "drift summary not delivered; retrying");
                    return Pass::Retry;
                }
            }
        }
        Pass::Drained
    }
}
