//! edge-agent: durable MQTT ingest, local ONNX inference and cloud sync for
//! small Linux devices.
//!
//! Crate map (data flows top to bottom):
//! - [`config`]: TOML -> validated [`config::Settings`]; the only input parser for operators.
//! - [`ingest`]: MQTT subscription, payload decoding, ack-after-commit.
//! - [`buffer`]: the SQLite buffer; the only module that touches rusqlite.
//! - [`inference`]: model packages, feature windows, tract, prediction publishing.
//! - [`drift`]: drift and data-quality summaries against the package baseline, queued and sent to `cloud-sync`.
//! - [`sync`]: uploads to `cloud-sync` (live rows first, paced backlog, quarantine of refused rows), heartbeats.
//! - [`supervisor`]: builds the stages, owns shutdown order and its deadline.
//! - [`systemd`]: sd_notify readiness, stopping and watchdog pings gated on ingest health.
//! - [`telemetry`]: tracing setup and counters.
//! - [`metrics`]: the Prometheus `/metrics` endpoint, latency histograms per model.
//! - `demo` (feature `demo`): the self-contained demo on NAB data.

pub mod buffer;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod drift;
pub mod inference;
pub mod ingest;
pub mod metrics;
pub mod rollout;
pub mod spool;
pub mod supervisor;
pub mod sync;
pub mod systemd;
pub mod telemetry;

use sha2::{Digest, Sha256};

/// Exit code for configuration errors (`EX_CONFIG` from sysexits.h); the
/// systemd unit lists it in `RestartPreventExitStatus` so a bad config does
/// not crash-loop.
pub const EXIT_CONFIG: u8 = 78;

/// Current wall-clock time as Unix milliseconds (0 if the clock is before 1970).
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// 128-bit hex digest of the concatenated parts (length-prefixed, so
/// `["ab","c"]` and `["a","bc"]` differ).
#[must_use]
pub fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..16])
}

/// Installs ring as rustls' process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Resolves when the process receives SIGINT or SIGTERM.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hash_is_length_prefixed() {
        assert_ne!(short_hash(&[b"ab", b"c"]), short_hash(&[b"a", b"bc"]));
        assert_eq!(short_hash(&[b"x"]).len(), 32);
    }
}
