//! Heartbeats: the agent's state (version, models, backlog, clock, counters)
//! posted to `heartbeat_path(device)` at start-up and every
//! `heartbeat_interval`. Best effort: a failed heartbeat is counted and
//! logged, never retried early, and never affects data sync.
//!
//! Clock offset: with `t0`/`t1` the agent clock before and after the request
//! and `server_ms` the cloud's clock from [`sync_protocol::HeartbeatAck`],
//! the offset (agent minus cloud) is `(t0 + t1) / 2 - server_ms`, accurate
//! to half the round trip; the next heartbeat carries it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::client::{Class, classify, error_body};
use super::{Result, SyncError};
use crate::buffer::{Buffer, SyncStats};
use crate::telemetry::Counters;

/// Sends heartbeats until cancelled.
pub struct Heartbeats {
    /// HTTP client shared with the uploads.
    pub client: reqwest::Client,
    /// Full heartbeat URL.
    pub url: String,
    /// Bearer token.
    pub token: crate::config::Secret,
    /// Buffer for the backlog figures.
    pub buffer: Buffer,
    /// Counters to report.
    pub counters: Arc<Counters>,
    /// Models being served (latest value at each beat).
    pub models: tokio::sync::watch::Receiver<Vec<sync_protocol::ActiveModel>>,
    /// Period.
    pub interval: Duration,
    /// Process start, Unix ms.
    pub started_ms: i64,
}

impl Heartbeats {
    /// Posts one heartbeat now and then one per interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut offset: Option<i64> = None;
        let mut failures_in_a_row = 0u32;
        loop {
            match self.beat(offset).await {
                Ok(o) => {
                    offset = Some(o);
                    failures_in_a_row = 0;
                    Counters::add(&self.counters.heartbeats_sent, 1);
                    tracing::debug!(clock_offset_ms = o, "heartbeat acknowledged");
                }
                Err(SyncError::Buffer(e)) => {
                    tracing::warn!(error = %super::chain(&e), "heartbeat skipped: buffer unavailable");
                }
                Err(e) => {
                    Counters::add(&self.counters.heartbeat_failures, 1);
                    let msg = super::chain(&e);
                    if failures_in_a_row == 0 {
                        tracing::warn!(error = %msg, "heartbeat failed; will try again next interval");
                    } else {
                        tracing::debug!(error = %msg, "heartbeat failed");
                    }
                    failures_in_a_row = failures_in_a_row.saturating_add(1);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }

    async fn beat(&self, offset: Option<i64>) -> Result<i64> {
        let stats = self.buffer.sync_stats(self.started_ms).await?;
        let now = crate::now_ms();
        let models = self.models.borrow().clone();
        let body = build(
            &stats,
            &self.counters,
            &models,
            self.started_ms,
            now,
            offset,
        );
        let t0 = crate::now_ms();
        let response = self
            .client
            .post(&self.url)
            .bearer_auth(self.token.expose())
            .json(&body)
            .send()
            .await
            .map_err(SyncError::Transport)?;
        let t1 = crate::now_ms();
        let status = response.status();
        match classify(status) {
            Class::Success => {
                let bytes = response.bytes().await.map_err(SyncError::Transport)?;
                let ack: sync_protocol::HeartbeatAck =
                    serde_json::from_slice(&bytes).map_err(SyncError::BadAck)?;
                Ok(offset_ms(t0, t1, ack.server_ms))
            }
            Class::Retriable => Err(SyncError::Retriable {
                status,
                retry_after: None,
            }),
            Class::Config => Err(SyncError::Config {
                status,
                body: error_body(response).await,
            }),
            Class::Refused => Err(SyncError::Refused {
                status,
                body: error_body(response).await,
            }),
        }
    }
}

/// Agent clock minus cloud clock, from a request sent at `t0` and answered
/// at `t1` (agent clock) by a cloud reading `server_ms`.
#[must_use]
pub fn offset_ms(t0: i64, t1: i64, server_ms: i64) -> i64 {
    t0 + (t1 - t0) / 2 - server_ms
}

/// Counter names reported in [`sync_protocol::Heartbeat::counters`]; stable API.
fn counters_map(c: &Counters, stats: &SyncStats) -> BTreeMap<String, u64> {
    let get = Counters::get;
    let mut out: BTreeMap<String, u64> = [
        ("received", get(&c.received)),
        ("committed", get(&c.committed)),
        ("duplicates", get(&c.duplicates)),
        ("dead_letters", get(&c.dead_letters)),
        ("acked", get(&c.acked)),
        ("stale_acks", get(&c.stale_acks)),
        ("quota_waits", get(&c.quota_waits)),
        ("ingest_reconnects", get(&c.ingest_reconnects)),
        ("liveness_reconnects", get(&c.liveness_reconnects)),
        ("predictions", get(&c.predictions)),
        ("anomalies", get(&c.anomalies)),
        ("inference_errors", get(&c.inference_errors)),
        ("published", get(&c.published)),
        ("publish_dropped", get(&c.publish_dropped)),
        ("synced_readings", get(&c.synced_readings)),
        ("synced_predictions", get(&c.synced_predictions)),
        ("synced_dead_letters", get(&c.synced_dead_letters)),
        ("sync_failures", get(&c.sync_failures)),
        ("sync_auth_failures", get(&c.sync_auth_failures)),
        ("sync_quarantined_batches", get(&c.sync_quarantined_batches)),
        ("sync_quarantined_rows", get(&c.sync_quarantined_rows)),
        ("sync_bytes_sent", get(&c.sync_bytes_sent)),
        ("heartbeat_failures", get(&c.heartbeat_failures)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    // Durable since the buffer was created, not since start-up: the drop
    // counters must survive restarts to mean anything.
    for ((stream, reason), n) in &stats.evicted {
        out.insert(format!("evicted.{stream}.{reason}"), *n);
    }
    out.insert("quarantined_rows".into(), quarantined(stats));
    out
}

fn quarantined(stats: &SyncStats) -> u64 {
    stats.readings_quarantined + stats.predictions_quarantined + stats.dead_letters_quarantined
}

/// The heartbeat body.
#[must_use]
pub fn build(
    stats: &SyncStats,
    counters: &Counters,
    models: &[sync_protocol::ActiveModel],
    started_ms: i64,
    now_ms: i64,
    clock_offset_ms: Option<i64>,
) -> sync_protocol::Heartbeat {
    sync_protocol::Heartbeat {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        sent_ms: now_ms,
        started_ms,
        models: models.to_vec(),
        backlog: sync_protocol::Backlog {
            readings: stats.readings_unsynced,
            predictions: stats.predictions_unsynced,
            dead_letters: stats.dead_letters_unsynced,
            bytes: stats.bytes_used,
            quota_bytes: stats.max_bytes,
            oldest_unsynced_age_ms: stats
                .oldest_unsynced_ms
                .map(|t| u64::try_from(now_ms.saturating_sub(t)).unwrap_or(0)),
        },
        clock_offset_ms,
        clock_suspect_readings: stats.clock_suspect_readings,
        counters: counters_map(counters, stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_is_agent_minus_cloud_at_the_midpoint() {
        // Request left at 1000, answer back at 1100; the cloud read 900 at
        // the midpoint (1050): the agent is 150 ms ahead.
        assert_eq!(offset_ms(1000, 1100, 900), 150);
        assert_eq!(offset_ms(1000, 1000, 1000), 0);
        assert_eq!(offset_ms(1000, 1020, 5000), -3990);
    }

    #[test]
    fn body_reports_backlog_clock_and_counters() {
        let counters = Counters::default();
        Counters::add(&counters.received, 7);
        Counters::add(&counters.sync_quarantined_batches, 2);
        let stats = SyncStats {
            readings_unsynced: 10,
            predictions_unsynced: 2,
            dead_letters_unsynced: 1,
            readings_quarantined: 3,
            oldest_unsynced_ms: Some(4_000),
            clock_suspect_readings: 5,
            bytes_used: 8192,
            max_bytes: 1 << 20,
            evicted: BTreeMap::from([(("t".to_owned(), "quota".to_owned()), 4)]),
            ..SyncStats::default()
        };
        let model = sync_protocol::ActiveModel {
            name: "m".into(),
            version: "1.0.0".into(),
            sha256: "ab".into(),
        };
        let hb = build(
            &stats,
            &counters,
            std::slice::from_ref(&model),
            1_000,
            10_000,
            Some(-3),
        );
        assert_eq!(hb.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(hb.models, vec![model]);
        assert_eq!(hb.backlog.readings, 10);
        assert_eq!(hb.backlog.oldest_unsynced_age_ms, Some(6_000));
        assert_eq!(hb.backlog.quota_bytes, 1 << 20);
        assert_eq!(hb.clock_offset_ms, Some(-3));
        assert_eq!(hb.clock_suspect_readings, 5);
        assert_eq!(hb.counters["received"], 7);
        assert_eq!(hb.counters["sync_quarantined_batches"], 2);
        assert_eq!(hb.counters["evicted.t.quota"], 4);
        assert_eq!(hb.counters["quarantined_rows"], 3);
        // The body is valid protocol JSON.
        let json = serde_json::to_string(&hb).unwrap_or_default();
        assert!(serde_json::from_str::<sync_protocol::Heartbeat>(&json).is_ok());
    }
}
