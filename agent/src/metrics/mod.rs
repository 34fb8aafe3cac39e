//! Metrics: the agent's Prometheus endpoint (`GET /metrics`, text format
//! 0.0.4) and what it exports.
//!
//! Owns the list of exported metrics ([`COUNTERS`], [`INFERENCE_COUNTERS`]
//! and [`render`]), the latency histograms and per-model registry
//! ([`histogram`]), the text format ([`text`]) and the HTTP listener
//! ([`server`]). It only reads: counters belong to the stages that bump
//! them ([`crate::telemetry::Counters`], [`crate::inference::InferenceMetrics`]),
//! backlog figures come from the buffer's own query
//! ([`crate::buffer::Buffer::sync_stats`], as the heartbeat uses). It never
//! touches SQLite or the MQTT connections; a scrape costs one buffer query.
//! Names: prefix `edge_agent_`, counters end in `_total`, units in names.

pub mod histogram;
pub mod server;
pub mod text;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::buffer::{Buffer, SyncStats};
use crate::inference::InferenceMetrics;
use crate::telemetry::Counters;
pub use histogram::{Histogram, ModelRegistry};
pub use server::{MetricsError, MetricsServer, serve};
use text::{Kind, TextWriter};

/// Longest a scrape waits for the buffer's backlog figures; past it the
/// backlog series are left out and `edge_agent_buffer_stats_ok` is 0.
pub const BUFFER_STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// A counter field, for the tables below.
type Field<T> = fn(&T) -> &AtomicU64;

/// Agent counters exported as `edge_agent_<name>`: `(name, help, field)`.
/// Adding a counter to [`Counters`] and a line here exports it.
#[rustfmt::skip]
pub const COUNTERS: &[(&str, &str, Field<Counters>)] = &[
    ("messages_received_total", "MQTT publishes received on the ingest connection.", |c| &c.received),
    ("messages_handled_total", "Messages ingest is done with (stored, absorbed or dead-lettered, acknowledged, handed to inference).", |c| &c.handled),
    ("readings_committed_total", "Readings committed to the buffer.", |c| &c.committed),
    ("duplicates_total", "Redeliveries absorbed by the producer identity (not stored twice).", |c| &c.duplicates),
    ("acks_total", "Acknowledgements handed to the MQTT client (QoS 1 and 2).", |c| &c.acked),
    ("stale_acks_total", "Acknowledgements not sent because their connection was gone (the broker redelivers).", |c| &c.stale_acks),
    ("ingest_pauses_total", "Deliberate ingest disconnects because no message could be taken for half the keep-alive.", |c| &c.ingest_pauses),
    ("subscriptions_acked_total", "Subscription acknowledgements received on the ingest connection.", |c| &c.subscribed),
    ("quota_waits_total", "Times ingest held messages because a reject_new stream was full.", |c| &c.quota_waits),
    ("quota_retries_total", "Retries of a message held for a full reject_new stream.", |c| &c.quota_retries),
    ("liveness_reconnects_total", "Reconnects forced because a subscription was idle past its timeout.", |c| &c.liveness_reconnects),
    ("ingest_reconnects_total", "MQTT connection errors on the ingest connection.", |c| &c.ingest_reconnects),
    ("predictions_total", "Predictions stored.", |c| &c.predictions),
    ("anomalies_total", "Predictions over their threshold.", |c| &c.anomalies),
    ("inference_errors_total", "Windows not scored because the model run or its output failed.", |c| &c.inference_errors),
    ("published_total", "Predictions published to MQTT.", |c| &c.published),
    ("publish_dropped_total", "Prediction events not published because the publish queue was full.", |c| &c.publish_dropped),
    ("sync_attempts_total", "Batch uploads attempted (each POST, halves of split batches included).", |c| &c.sync_attempts),
    ("sync_failures_total", "Failed batch uploads.", |c| &c.sync_failures),
    ("sync_auth_failures_total", "Uploads refused with 401/403.", |c| &c.sync_auth_failures),
    ("synced_readings_total", "Readings acknowledged by the cloud.", |c| &c.synced_readings),
    ("synced_predictions_total", "Predictions acknowledged by the cloud.", |c| &c.synced_predictions),
    ("sync_labels_dropped_total", "Synced predictions whose class label and probabilities were left out because the cloud only accepts an older batch format.", |c| &c.sync_labels_dropped),
    ("synced_dead_letters_total", "Dead letters acknowledged by the cloud.", |c| &c.synced_dead_letters),
    ("sync_quarantined_batches_total", "Batches the cloud refused for good, quarantined.", |c| &c.sync_quarantined_batches),
    ("sync_quarantined_rows_total", "Rows in quarantined batches.", |c| &c.sync_quarantined_rows),
    ("sync_sent_bytes_total", "Upload request bodies sent to the cloud (compressed), bytes.", |c| &c.sync_bytes_sent),
    ("heartbeats_sent_total", "Heartbeats the cloud acknowledged.", |c| &c.heartbeats_sent),
    ("heartbeat_failures_total", "Heartbeats that failed.", |c| &c.heartbeat_failures),
    ("rollout_poll_failures_total", "Registry polls that failed (network, status, body).", |c| &c.rollout_poll_failures),
    ("rollout_installs_total", "Model versions downloaded, verified and installed from the registry.", |c| &c.rollout_installs),
    ("rollout_refusals_total", "Registry versions refused before install (signature, sha256, size, downgrade, layout).", |c| &c.rollout_refusals),
    ("rollout_reports_sent_total", "Rollout reports delivered to the registry.", |c| &c.rollout_reports_sent),
];

/// Inference counters exported as `edge_agent_<name>`, as [`COUNTERS`].
#[rustfmt::skip]
pub const INFERENCE_COUNTERS: &[(&str, &str, Field<InferenceMetrics>)] = &[
    ("inference_windows_total", "Feature windows that closed (scored or not).", |m| &m.windows),
    ("inference_runs_total", "tract runs (a run scores a batch of windows).", |m| &m.runs),
    ("inference_rows_total", "Rows scored by tract runs; rows / runs is the mean batch.", |m| &m.rows),
    ("inference_late_dropped_total", "Readings dropped as late (older than the window already used).", |m| &m.late_dropped),
    ("inference_gap_resets_total", "Windows restarted by a gap over input.max_gap_ms.", |m| &m.gap_resets),
    ("inference_nan_skipped_total", "Windows not scored because of a missing value.", |m| &m.nan_skipped),
    ("model_swaps_total", "Models swapped in while running.", |m| &m.swaps),
    ("model_swap_failures_total", "Packages refused while running (the old model kept serving).", |m| &m.swap_failures),
    ("model_trials_total", "Model versions swapped in on trial.", |m| &m.trials),
    ("model_trials_passed_total", "Trials passed: the version was adopted.", |m| &m.trials_passed),
    ("model_rollbacks_total", "Versions rolled back for breaking a health target on trial (or rejected after too many starts on trial).", |m| &m.rollbacks),
];

/// Everything a scrape reads.
#[derive(Clone)]
pub struct Sources {
    /// The agent's counters.
    pub counters: Arc<Counters>,
    /// The inference stage's counters.
    pub inference: Arc<InferenceMetrics>,
    /// Latency histograms and active versions per model.
    pub models: Arc<ModelRegistry>,
    /// The buffer, for backlog figures; `None` leaves them out.
    pub buffer: Option<Buffer>,
    /// Drift monitoring's counters and latest figures.
    pub drift: Arc<crate::drift::DriftMetrics>,
    /// Process start, Unix ms (`edge_agent_start_time_seconds`; clock-suspect
    /// readings are counted from here).
    pub started_ms: i64,
}

/// Renders one scrape: reads the counters, asks the buffer for its backlog
/// (at most [`BUFFER_STATS_TIMEOUT`]) and formats everything.
pub async fn scrape(sources: &Sources) -> String {
    let stats = match &sources.buffer {
        Some(buffer) => {
            match tokio::time::timeout(BUFFER_STATS_TIMEOUT, buffer.sync_stats(sources.started_ms))
                .await
            {
                Ok(Ok(stats)) => Some(stats),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "metrics: buffer figures unavailable");
                    None
                }
                Err(_) => {
                    tracing::debug!("metrics: buffer figures timed out");
                    None
                }
            }
        }
        None => None,
    };
    render(sources, stats.as_ref(), crate::now_ms())
}

fn prefixed(name: &str) -> String {
    format!("edge_agent_{name}")
}

#[allow(clippy::cast_precision_loss)]
fn f(v: u64) -> f64 {
    v as f64
}

#[allow(clippy::cast_precision_loss)]
fn ms_to_seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Formats the exposition body from the counters and `stats` (backlog
/// series only when `Some`), with ages measured at `now_ms`.
#[must_use]
pub fn render(sources: &Sources, stats: Option<&SyncStats>, now_ms: i64) -> String {
    let mut w = TextWriter::default();
    let c = &sources.counters;

    w.header(
        "edge_agent_build_info",
        "Agent build; the value is always 1.",
        Kind::Gauge,
    );
    w.sample(
        "edge_agent_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    w.single(
        "edge_agent_start_time_seconds",
        "Process start, Unix seconds.",
        Kind::Gauge,
        ms_to_seconds(sources.started_ms),
    );

    for (name, help, field) in COUNTERS {
        w.single(
            &prefixed(name),
            help,
            Kind::Counter,
            f(Counters::get(field(c))),
        );
    }
    let name = "edge_agent_dead_letters_total";
    w.header(
        name,
        "Messages dead-lettered (stored with their reason and acknowledged), by reason.",
        Kind::Counter,
    );
    for (reason, n) in c.dead_letter_reasons.all() {
        w.sample(name, &[("reason", reason)], f(n));
    }
    w.single(
        "edge_agent_ingest_in_flight_messages",
        "Messages ingest holds: received but not yet handled.",
        Kind::Gauge,
        f(Counters::get(&c.received).saturating_sub(Counters::get(&c.handled))),
    );

    for (name, help, field) in INFERENCE_COUNTERS {
        w.single(
            &prefixed(name),
            help,
            Kind::Counter,
            f(Counters::get(field(&sources.inference))),
        );
    }

    let models = sources.models.snapshot();
    let name = "edge_agent_model_info";
    w.header(
        name,
        "Model serving now, by name, version and ONNX sha256; the value is always 1.",
        Kind::Gauge,
    );
    for m in &models {
        w.sample(
            name,
            &[
                ("model", &m.name),
                ("version", &m.version),
                ("sha256", &m.sha256),
            ],
            1.0,
        );
    }
    let series: Vec<_> = models
        .iter()
        .map(|m| (vec![("model", m.name.as_str())], m.latency.clone()))
        .collect();
    w.histogram(
        "edge_agent_inference_latency_seconds",
        "Wall time of one tract run (a batch of windows), by model.",
        &series,
    );

    render_drift(&mut w, &sources.drift);

    w.single(
        "edge_agent_buffer_stats_ok",
        "1 when this scrape read the buffer's backlog figures, 0 when the buffer did not answer.",
        Kind::Gauge,
        if stats.is_some() { 1.0 } else { 0.0 },
    );
    if let Some(s) = stats {
        render_buffer(&mut w, s, now_ms);
    }
    w.finish()
}

fn render_drift(w: &mut TextWriter, d: &crate::drift::DriftMetrics) {
    for (name, help, n) in [
        (
            "edge_agent_drift_summaries_total",
            "Drift summaries emitted (one per model and window).",
            &d.summaries,
        ),
        (
            "edge_agent_drift_alerts_total",
            "Drift summaries that crossed a threshold.",
            &d.alerts,
        ),
        (
            "edge_agent_drift_events_dropped_total",
            "Drift events dropped because the monitor was behind.",
            &d.events_dropped,
        ),
        (
            "edge_agent_drift_summaries_sent_total",
            "Drift summaries delivered to the cloud.",
            &d.sent,
        ),
        (
            "edge_agent_drift_send_failures_total",
            "Drift summary deliveries that failed (retried).",
            &d.send_failures,
        ),
    ] {
        w.single(name, help, Kind::Counter, f(Counters::get(n)));
    }
    let latest = d
        .latest
        .lock()
        .map(|l| l.clone())
        .unwrap_or_else(|p| p.into_inner().clone());
    for (name, help, pick) in [
        (
            "edge_agent_drift_psi",
            "Population stability index of a feature against the package baseline over the drift horizon (latest judged summary).",
            (|l: &crate::drift::LatestDrift| l.psi)
                as fn(&crate::drift::LatestDrift) -> Option<f64>,
        ),
        (
            "edge_agent_drift_mean_shift_sigmas",
            "Mean shift of a feature against the package baseline, in baseline standard deviations (latest judged summary).",
            |l: &crate::drift::LatestDrift| l.mean_shift,
        ),
    ] {
        w.header(name, help, Kind::Gauge);
        for ((model, stream, field), l) in &latest {
            if let Some(v) = pick(l) {
                w.sample(
                    name,
                    &[("model", model), ("stream", stream), ("field", field)],
                    v,
                );
            }
        }
    }
}

fn render_buffer(w: &mut TextWriter, s: &SyncStats, now_ms: i64) {
    let kinds = |w: &mut TextWriter, name: &str, help: &str, values: [u64; 3]| {
        w.header(name, help, Kind::Gauge);
        for (kind, v) in ["readings", "predictions", "dead_letters"]
            .iter()
            .zip(values)
        {
            w.sample(name, &[("kind", kind)], f(v));
        }
    };
    kinds(
        w,
        "edge_agent_buffer_backlog_rows",
        "Rows in the buffer not yet acknowledged by the cloud, by kind.",
        [
            s.readings_unsynced,
            s.predictions_unsynced,
            s.dead_letters_unsynced,
        ],
    );
    kinds(
        w,
        "edge_agent_buffer_quarantined_rows",
        "Rows the cloud refused for good, kept in the buffer, by kind.",
        [
            s.readings_quarantined,
            s.predictions_quarantined,
            s.dead_letters_quarantined,
        ],
    );
    w.single(
        "edge_agent_buffer_oldest_unsynced_age_seconds",
        "Age of the oldest row not yet synced (receive time); 0 when there is none.",
        Kind::Gauge,
        s.oldest_unsynced_ms
            .map_or(0.0, |t| ms_to_seconds(now_ms.saturating_sub(t).max(0))),
    );
    w.single(
        "edge_agent_buffer_bytes",
        "Disk used by the buffer (database and WAL), bytes.",
        Kind::Gauge,
        f(s.bytes_used),
    );
    w.single(
        "edge_agent_buffer_quota_bytes",
        "The buffer's disk quota (buffer.max_bytes), bytes.",
        Kind::Gauge,
        f(s.max_bytes),
    );
    let name = "edge_agent_buffer_evicted_rows_total";
    w.header(
        name,
        "Rows evicted since the buffer was created, by stream and reason (quota, max_age).",
        Kind::Counter,
    );
    for ((stream, reason), n) in &s.evicted {
        w.sample(name, &[("stream", stream), ("reason", reason)], f(*n));
    }
    w.single(
        "edge_agent_clock_suspect_readings_total",
        "Readings since start-up whose device clock was far from the agent's.",
        Kind::Counter,
        f(s.clock_suspect_readings),
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::{BTreeMap, HashSet};

    use super::*;

    fn sources() -> Sources {
        Sources {
            counters: Arc::default(),
            inference: Arc::default(),
            models: Arc::default(),
            buffer: None,
            drift: Arc::default(),
            started_ms: 1_700_000_000_000,
        }
    }

    /// `name{labels} value` lines, without comments.
    fn samples(body: &str) -> Vec<(&str, &str)> {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.rsplit_once(' ').unwrap())
            .collect()
    }

    #[test]
    fn every_counter_is_a_total_with_help_and_type_and_names_are_unique() {
        let body = render(&sources(), Some(&SyncStats::default()), 0);
        let mut families = HashSet::new();
        for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(families.insert(name.to_owned()), "{name} declared twice");
            assert!(name.starts_with("edge_agent_"), "{name}");
            assert_eq!(
                name.ends_with("_total"),
                kind == "counter",
                "{name} is a {kind}"
            );
            assert!(
                body.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
        }
        assert_eq!(
            families.len(),
            COUNTERS.len() + INFERENCE_COUNTERS.len() + 21,
            "{families:?}"
        );
    }

    #[test]
    fn every_family_is_documented() {
        let doc = include_str!("../../../docs/metrics.md");
        let body = render(&sources(), Some(&SyncStats::default()), 0);
        for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} missing from docs/metrics.md"
            );
        }
    }

    #[test]
    fn values_come_from_the_counters_the_registry_and_the_buffer() {
        let s = sources();
        Counters::add(&s.counters.received, 7);
        Counters::add(&s.counters.handled, 5);
        Counters::add(s.counters.dead_letter_reasons.counter("malformed"), 2);
        Counters::add(s.counters.dead_letter_reasons.counter("new_reason"), 1);
        Counters::add(&s.inference.runs, 3);
        s.models.set_active("nab \"temp\"", "1.0.0", "ab12");
        s.models.observe("nab \"temp\"", Duration::from_millis(2));
        let stats = SyncStats {
            readings_unsynced: 10,
            oldest_unsynced_ms: Some(4_000),
            bytes_used: 8192,
            evicted: BTreeMap::from([(("temp".to_owned(), "quota".to_owned()), 4)]),
            ..SyncStats::default()
        };
        let body = render(&s, Some(&stats), 10_000);
        let got: BTreeMap<&str, &str> = samples(&body).into_iter().collect();
        for (series, value) in [
            ("edge_agent_messages_received_total", "7"),
            ("edge_agent_ingest_in_flight_messages", "2"),
            ("edge_agent_dead_letters_total{reason=\"malformed\"}", "2"),
            ("edge_agent_dead_letters_total{reason=\"other\"}", "1"),
            ("edge_agent_inference_runs_total", "3"),
            (
                "edge_agent_model_info{model=\"nab \\\"temp\\\"\",version=\"1.0.0\",sha256=\"ab12\"}",
                "1",
            ),
            (
                "edge_agent_inference_latency_seconds_bucket{model=\"nab \\\"temp\\\"\",le=\"0.0025\"}",
                "1",
            ),
            (
                "edge_agent_inference_latency_seconds_bucket{model=\"nab \\\"temp\\\"\",le=\"0.001\"}",
                "0",
            ),
            ("edge_agent_buffer_backlog_rows{kind=\"readings\"}", "10"),
            ("edge_agent_buffer_oldest_unsynced_age_seconds", "6"),
            ("edge_agent_buffer_bytes", "8192"),
            (
                "edge_agent_buffer_evicted_rows_total{stream=\"temp\",reason=\"quota\"}",
                "4",
            ),
            ("edge_agent_buffer_stats_ok", "1"),
            ("edge_agent_start_time_seconds", "1700000000"),
        ] {
            assert_eq!(got.get(series), Some(&value), "{series} in\n{body}");
        }
    }

    #[test]
    fn without_buffer_figures_the_backlog_is_left_out_and_flagged() {
        let body = render(&sources(), None, 0);
        assert!(body.contains("edge_agent_buffer_stats_ok 0\n"));
        assert!(!body.contains("edge_agent_buffer_backlog_rows"));
    }
}
