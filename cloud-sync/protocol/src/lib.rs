//! Wire types shared by `edge-agent` and `cloud-sync`: serde only, no I/O.
//!
//! Owns the shape of every HTTP body that crosses between a device and the
//! cloud. Both sides depend on this crate, so a change here is a protocol
//! change: bump [`API_VERSION`] when an old peer could misread a new body.
//!
//! Identity contract: a reading is identified by `(device, source, stream, seq)`
//! and a prediction by `(device, model, seq)`, where `device` is the
//! authenticated agent (from the URL path) and `source` the sensor the agent
//! heard it from (from the MQTT topic). Sequence numbers are assigned durably
//! by the agent's buffer and never reused, so replaying a batch (after a crash
//! between upload and marking rows synced) can never create a duplicate row.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version segment of every API path (`/v1/...`).
pub const API_VERSION: &str = "v1";

/// Header value for zstd-compressed request bodies (`Content-Encoding`).
pub const ZSTD_ENCODING: &str = "zstd";

/// Path of the batch upload endpoint for one device.
#[must_use]
pub fn batch_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/batches")
}

/// Path of the per-device summary endpoint.
#[must_use]
pub fn summary_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/summary")
}

/// One sensor reading as stored by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    /// Sensor device the reading came from (from the topic template's `{device}`).
    pub source: String,
    /// Stream name within the device (e.g. `temperature`).
    pub stream: String,
    /// Per-(source, stream) sequence number, assigned durably by the agent, starting at 1.
    pub seq: u64,
    /// Timestamp the device put in the payload, if any (Unix ms).
    pub device_ts_ms: Option<i64>,
    /// When the agent received the message (Unix ms, agent clock).
    pub recv_ts_ms: i64,
    /// Whether the device timestamp looked plausible against the agent clock.
    pub clock_ok: bool,
    /// Named numeric values carried by the reading.
    pub values: BTreeMap<String, f64>,
}

/// One model output for one feature window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prediction {
    /// Model package name.
    pub model: String,
    /// Model package version (semver).
    pub model_version: String,
    /// sha256 of the ONNX file that produced it (lineage).
    pub model_sha256: String,
    /// Per-(device, model) sequence number, assigned durably by the agent, starting at 1.
    pub seq: u64,
    /// Sensor device the window was built from.
    pub source: String,
    /// Stream the window was built from.
    pub stream: String,
    /// Sequence number of the last reading in the window.
    pub window_end_seq: u64,
    /// Device timestamp of the last reading in the window, if it had one (Unix ms).
    pub window_end_ts_ms: Option<i64>,
    /// Model score (for anomaly models: higher is more anomalous).
    pub score: f64,
    /// Threshold in force when the prediction was made.
    pub threshold: f64,
    /// Whether the score crossed the threshold.
    pub is_anomaly: bool,
    /// When the agent made the prediction (Unix ms).
    pub created_ms: i64,
}

/// Body of `POST /v1/devices/{device}/batches`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadBatch {
    /// Readings, any order.
    pub readings: Vec<Reading>,
    /// Predictions, any order.
    pub predictions: Vec<Prediction>,
}

/// An inclusive range of sequence numbers on one stream or model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqRange {
    /// Stream name (readings) or model name (predictions).
    pub key: String,
    /// First sequence number covered.
    pub first: u64,
    /// Last sequence number covered.
    pub last: u64,
}

/// Response to a successful batch upload: everything in the batch is durably
/// stored (either inserted now or already present from an earlier upload).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadAck {
    /// Readings newly inserted by this request.
    pub readings_inserted: u64,
    /// Readings that were already stored (replays); not inserted again.
    pub readings_duplicate: u64,
    /// Predictions newly inserted by this request.
    pub predictions_inserted: u64,
    /// Predictions that were already stored (replays).
    pub predictions_duplicate: u64,
    /// Sequence ranges per stream that the batch touched, now all stored.
    pub readings: Vec<SeqRange>,
    /// Sequence ranges per model that the batch touched, now all stored.
    pub predictions: Vec<SeqRange>,
}

/// Per-stream totals held by the cloud for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSummary {
    /// Stream or model name.
    pub key: String,
    /// Rows stored.
    pub rows: u64,
    /// Lowest sequence number stored.
    pub min_seq: u64,
    /// Highest sequence number stored.
    pub max_seq: u64,
}

/// Body of `GET /v1/devices/{device}/summary`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSummary {
    /// Device id.
    pub device: String,
    /// Readings stored per stream.
    pub readings: Vec<StreamSummary>,
    /// Predictions stored per model.
    pub predictions: Vec<StreamSummary>,
    /// Predictions stored with `is_anomaly = true`.
    pub anomalies: u64,
}

/// JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable machine-readable code (e.g. `payload_too_large`).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

/// Group `(key, seq)` pairs into maximal inclusive ranges of consecutive numbers.
///
/// Output is sorted by key, then by first sequence number.
#[must_use]
pub fn ranges<'a>(items: impl IntoIterator<Item = (&'a str, u64)>) -> Vec<SeqRange> {
    let mut per_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (key, seq) in items {
        per_key.entry(key).or_default().push(seq);
    }
    let mut out = Vec::new();
    for (key, mut seqs) in per_key {
        seqs.sort_unstable();
        seqs.dedup();
        let mut iter = seqs.into_iter();
        let Some(mut first) = iter.next() else {
            continue;
        };
        let mut last = first;
        for seq in iter {
            if seq == last + 1 {
                last = seq;
            } else {
                out.push(SeqRange {
                    key: key.to_owned(),
                    first,
                    last,
                });
                first = seq;
                last = seq;
            }
        }
        out.push(SeqRange {
            key: key.to_owned(),
            first,
            last,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_consecutive_and_split_gaps() {
        let got = ranges([("a", 3), ("a", 1), ("a", 2), ("a", 5), ("b", 7), ("a", 2)]);
        assert_eq!(
            got,
            vec![
                SeqRange {
                    key: "a".into(),
                    first: 1,
                    last: 3
                },
                SeqRange {
                    key: "a".into(),
                    first: 5,
                    last: 5
                },
                SeqRange {
                    key: "b".into(),
                    first: 7,
                    last: 7
                },
            ]
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let body = r#"{"readings":[],"predictions":[],"extra":1}"#;
        assert!(serde_json::from_str::<UploadBatch>(body).is_err());
    }

    #[test]
    fn batch_round_trips() {
        let batch = UploadBatch {
            readings: vec![Reading {
                source: "m1".into(),
                stream: "temperature".into(),
                seq: 1,
                device_ts_ms: Some(1_386_019_200_000),
                recv_ts_ms: 1_700_000_000_000,
                clock_ok: false,
                values: BTreeMap::from([("value".into(), 73.5)]),
            }],
            predictions: vec![],
        };
        let json = serde_json::to_string(&batch).unwrap_or_default();
        let back: UploadBatch = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, batch);
    }
}
