//! Telemetry: tracing initialisation and the agent's counters.
//!
//! Owns the process-wide log format and the [`Counters`] every stage bumps.
//! Counters are monotonic and lock-free; the demo's progress line, the
//! report and (later) `/metrics` and the cloud metrics report read them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Initialises tracing from `RUST_LOG` (default `info`), once per process.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Monotonic counters shared by every stage.
#[derive(Debug, Default)]
pub struct Counters {
    /// MQTT publishes received on the ingest connection.
    pub received: AtomicU64,
    /// Readings committed to the buffer.
    pub committed: AtomicU64,
    /// Redeliveries absorbed by the producer identity.
    pub duplicates: AtomicU64,
    /// Messages dead-lettered.
    pub dead_letters: AtomicU64,
    /// Acknowledgements sent to the broker (QoS 1 and 2).
    pub acked: AtomicU64,
    /// Subscription acknowledgements received on the ingest connection.
    pub subscribed: AtomicU64,
    /// Times ingest held messages because a `reject_new` stream was full.
    pub quota_waits: AtomicU64,
    /// Reconnects forced because a subscription was idle past its timeout.
    pub liveness_reconnects: AtomicU64,
    /// MQTT connection errors on the ingest connection.
    pub ingest_reconnects: AtomicU64,
    /// Predictions stored.
    pub predictions: AtomicU64,
    /// Predictions over their threshold.
    pub anomalies: AtomicU64,
    /// Inference failures.
    pub inference_errors: AtomicU64,
    /// Predictions published to MQTT.
    pub published: AtomicU64,
    /// Prediction events not published because the publish queue was full.
    pub publish_dropped: AtomicU64,
    /// Readings acknowledged by the cloud.
    pub synced_readings: AtomicU64,
    /// Predictions acknowledged by the cloud.
    pub synced_predictions: AtomicU64,
    /// Failed uploads.
    pub sync_failures: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
