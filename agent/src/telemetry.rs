//! Telemetry: tracing initialisation and the agent's counters.
//!
//! Owns the process-wide log format and the [`Counters`] every stage bumps.
//! Counters are monotonic and lock-free; the demo's progress line, the
//! report, the systemd watchdog, `/metrics` ([`crate::metrics`]) and the
//! heartbeat read them. Logs go to stderr as text or JSON lines, or to the
//! journal as structured fields (`[log]` in the config).

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

/// Initialises tracing from `RUST_LOG` (default `default_filter`) as text on
/// stderr, once per process.
pub fn init(default_filter: &str) {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::registry()
        .with(filter(default_filter))
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .try_init();
}

/// Where [`init_with`] sent the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// Text lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
    /// The systemd journal, with structured fields.
    Journald,
}

/// Initialises tracing from validated `[log]` settings, once per process;
/// `RUST_LOG`, when set and valid, overrides `log.filter`.
///
/// `auto` picks the journal when stderr is connected to it (systemd sets
/// `JOURNAL_STREAM`), text otherwise. When the journal socket cannot be
/// reached, logs fall back to text on stderr with a warning, so a missing
/// journal never silences the agent.
pub fn init_with(log: &LogSettings) -> LogOutput {
    let format = match log.format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    match format {
        LogFormat::Json => {
            let _ = tracing_subscriber::registry()
                .with(filter(&log.filter))
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_span_list(false)
                        .with_writer(std::io::stderr),
                )
                .try_init();
            LogOutput::Json
        }
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(journal) => {
                let _ = tracing_subscriber::registry()
                    .with(filter(&log.filter))
                    .with(journal)
                    .try_init();
                LogOutput::Journald
            }
            Err(e) => {
                init(&log.filter);
                tracing::warn!(error = %e, "journald socket unavailable; logging text to stderr");
                LogOutput::Text
            }
        },
        LogFormat::Auto | LogFormat::Text => {
            init(&log.filter);
            LogOutput::Text
        }
    }
}

/// `RUST_LOG` when set and valid, else `default`, else `info`.
///
/// Design: per-target directives (`Targets`), not `EnvFilter`: the span and
/// field directives EnvFilter adds pull in a regex engine that cost the
/// device binary about a megabyte of its 25 MB budget.
fn filter(default: &str) -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| parse_filter(&v).ok())
        .or_else(|| parse_filter(default).ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}

/// Parses filter directives: comma-separated `level` or `target=level`
/// (`"warn,edge_agent::ingest=debug"`).
///
/// # Errors
/// The parser's message when a directive is not `target=level` or a level.
pub fn parse_filter(directives: &str) -> Result<Targets, String> {
    directives.parse::<Targets>().map_err(|e| e.to_string())
}

/// Whether stderr is the journal stream systemd connected it to
/// (`JOURNAL_STREAM=<device>:<inode>` naming stderr itself, as in
/// systemd.exec(5)).
#[must_use]
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    journal_stream_names(&var.to_string_lossy(), meta.dev(), meta.ino())
}

/// Whether a `JOURNAL_STREAM` value names the file with `dev` and `ino`.
fn journal_stream_names(var: &str, dev: u64, ino: u64) -> bool {
    var.split_once(':').is_some_and(|(d, i)| {
        d.parse::<u64>().is_ok_and(|d| d == dev) && i.parse::<u64>().is_ok_and(|i| i == ino)
    })
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
    /// The same messages by reason; the reasons add up to `dead_letters`.
    pub dead_letter_reasons: DeadLetterReasons,
    /// Acknowledgements handed to the MQTT client (QoS 1 and 2).
    pub acked: AtomicU64,
    /// Acknowledgements not sent because the connection they belonged to
    /// was gone (the broker redelivers those messages).
    pub stale_acks: AtomicU64,
    /// Times ingest disconnected on purpose because no message could be
    /// taken for half the keep-alive (buffer full or too slow).
    pub ingest_pauses: AtomicU64,
    /// Subscription acknowledgements received on the ingest connection.
    pub subscribed: AtomicU64,
    /// Times ingest held messages because a `reject_new` stream was full.
    pub quota_waits: AtomicU64,
    /// Retries of a message held for a full `reject_new` stream: the buffer
    /// answered, so ingest is holding on purpose, not stuck.
    pub quota_retries: AtomicU64,
    /// Messages ingest is done with: stored, absorbed or dead-lettered,
    /// acknowledged when QoS > 0, and handed to inference. `received -
    /// handled` is what ingest holds; the systemd watchdog watches both.
    pub handled: AtomicU64,
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
    /// Synced predictions whose class label and probabilities were left
    /// out because the cloud only accepts an older batch format.
    pub sync_labels_dropped: AtomicU64,
    /// Batch uploads attempted (each POST, the halves of a split batch included).
    pub sync_attempts: AtomicU64,
    /// Failed uploads.
    pub sync_failures: AtomicU64,
    /// Dead letters acknowledged by the cloud.
    pub synced_dead_letters: AtomicU64,
    /// Uploads refused with 401/403 (a token or device configuration problem).
    pub sync_auth_failures: AtomicU64,
    /// Batches the cloud refused for good (non-retriable 4xx on a single
    /// row, or a batch that could not be split further), quarantined.
    pub sync_quarantined_batches: AtomicU64,
    /// Rows in those batches.
    pub sync_quarantined_rows: AtomicU64,
    /// Request bodies sent to the cloud (compressed), bytes.
    pub sync_bytes_sent: AtomicU64,
    /// Heartbeats the cloud acknowledged.
    pub heartbeats_sent: AtomicU64,
    /// Heartbeats that failed.
    pub heartbeat_failures: AtomicU64,
    /// Registry polls that failed (network, HTTP status, bad body).
    pub rollout_poll_failures: AtomicU64,
    /// Model versions downloaded, verified and installed from the registry.
    pub rollout_installs: AtomicU64,
    /// Model versions from the registry refused before install (signature,
    /// sha256, size, downgrade, layout).
    pub rollout_refusals: AtomicU64,
    /// Rollout reports delivered to the registry.
    pub rollout_reports_sent: AtomicU64,
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

/// Dead letters by reason: one counter per `reason` ingest writes to the
/// `dead_letters` table, plus `other` for a reason not listed here.
#[derive(Debug, Default)]
pub struct DeadLetterReasons {
    /// Payload over `mqtt.max_payload_bytes`.
    pub oversized: AtomicU64,
    /// Topic matched by no subscription template.
    pub unmatched_topic: AtomicU64,
    /// Payload that does not parse.
    pub malformed: AtomicU64,
    /// Payload that parses but has the wrong shape or types.
    pub wrong_type: AtomicU64,
    /// NaN or infinite values.
    pub non_finite: AtomicU64,
    /// Payload with no values.
    pub empty: AtomicU64,
    /// Any other reason.
    pub other: AtomicU64,
}

impl DeadLetterReasons {
    /// The counter for `reason` (`other` when the reason is not listed).
    #[must_use]
    pub fn counter(&self, reason: &str) -> &AtomicU64 {
        match reason {
            "oversized" => &self.oversized,
            "unmatched_topic" => &self.unmatched_topic,
            "malformed" => &self.malformed,
            "wrong_type" => &self.wrong_type,
            "non_finite" => &self.non_finite,
            "empty" => &self.empty,
            _ => &self.other,
        }
    }

    /// Every reason with its count, in a fixed order.
    #[must_use]
    pub fn all(&self) -> [(&'static str, u64); 7] {
        let get = Counters::get;
        [
            ("oversized", get(&self.oversized)),
            ("unmatched_topic", get(&self.unmatched_topic)),
            ("malformed", get(&self.malformed)),
            ("wrong_type", get(&self.wrong_type)),
            ("non_finite", get(&self.non_finite)),
            ("empty", get(&self.empty)),
            ("other", get(&self.other)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_the_same_file() {
        assert!(journal_stream_names("64769:1234", 64769, 1234));
        assert!(!journal_stream_names("64769:1234", 64769, 1235));
        assert!(!journal_stream_names("64768:1234", 64769, 1234));
        assert!(!journal_stream_names("", 0, 0));
        assert!(!journal_stream_names("64769", 64769, 0));
        assert!(!journal_stream_names("a:b", 0, 0));
    }
}
