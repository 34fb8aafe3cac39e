//! Wire types shared by `edge-agent` and `cloud-sync`, and the layout of a
//! model artifact ([`archive`]): pure data, no I/O.
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

pub mod archive;
pub mod codec;
pub mod drift;
pub mod layout;
pub mod registry;

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

/// Path of the heartbeat endpoint for one device (`POST` a [`Heartbeat`]).
#[must_use]
pub fn heartbeat_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/heartbeats")
}

/// Path of the per-device summary endpoint.
#[must_use]
pub fn summary_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/summary")
}

/// Path listing a device's stored readings (`GET`, a [`ReadingsPage`]).
#[must_use]
pub fn readings_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/readings")
}

/// Path listing a device's stored predictions (`GET`, a [`PredictionsPage`]).
#[must_use]
pub fn predictions_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/predictions")
}

/// Path listing a device's stored dead letters (`GET`, a [`DeadLettersPage`]).
#[must_use]
pub fn dead_letters_path(device: &str) -> String {
    format!("/{API_VERSION}/devices/{device}/dead-letters")
}

/// Path of the fleet summary (`GET`, a [`FleetSummary`]; operators only).
pub const FLEET_PATH: &str = "/v1/fleet";

/// Path of the OpenAPI 3.1 document describing the API.
pub const OPENAPI_PATH: &str = "/openapi.json";

/// Media type of JSON bodies.
pub const JSON_MEDIA_TYPE: &str = "application/json";

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
    /// Class label the model predicted (`kind = "classes"` packages with
    /// `labels`); absent for anomaly scores and in bodies from older agents.
    /// Never serialized when absent, so clouds that predate it still parse
    /// label-free bodies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Per-class probabilities, in the order of the package's `labels`;
    /// empty when the model gives none (and in bodies from older agents).
    /// Never serialized when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probabilities: Vec<f64>,
}

/// `probabilities` as stored in a `BLOB`/`BYTEA` column (agent buffer and
/// cloud store): each value as 8 little-endian bytes, in order; `None` for
/// an empty list (stored as NULL).
///
/// Design: raw `f64` bits rather than JSON text: bit-exact (what the wire
/// carries), 8 bytes a class instead of ~20 characters, and NaN or
/// infinities cannot make a stored row unreadable.
#[must_use]
pub fn probabilities_to_bytes(probabilities: &[f64]) -> Option<Vec<u8>> {
    if probabilities.is_empty() {
        return None;
    }
    Some(probabilities.iter().flat_map(|p| p.to_le_bytes()).collect())
}

/// Reverse of [`probabilities_to_bytes`] (NULL gives an empty list).
///
/// # Errors
/// [`BadProbabilities`] when the length is not a multiple of 8.
pub fn probabilities_from_bytes(bytes: Option<&[u8]>) -> Result<Vec<f64>, BadProbabilities> {
    let Some(bytes) = bytes else {
        return Ok(Vec::new());
    };
    let chunks = bytes.chunks_exact(8);
    if !chunks.remainder().is_empty() {
        return Err(BadProbabilities { len: bytes.len() });
    }
    Ok(chunks
        .map(|c| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(c);
            f64::from_le_bytes(raw)
        })
        .collect())
}

/// A stored `probabilities` value whose length is not a multiple of 8.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored probabilities of {len} bytes are not a whole number of f64 values")]
pub struct BadProbabilities {
    /// Length found.
    pub len: usize,
}

/// A message the agent could not turn into readings (malformed, oversized,
/// unmatched topic, ...), kept so operators can see what their devices send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterRecord {
    /// Per-device dead-letter sequence number, assigned durably by the
    /// agent, starting at 1, never reused. Identity: `(device, seq)`.
    pub seq: u64,
    /// MQTT topic it arrived on.
    pub topic: String,
    /// Stable reason code: `oversized`, `unmatched_topic`, `malformed`,
    /// `wrong_type`, `non_finite` or `empty`.
    pub reason: String,
    /// Human-readable detail from the decoder.
    pub detail: String,
    /// The payload's first bytes (the agent caps what it keeps), base64
    /// (standard alphabet, padded).
    pub payload_b64: String,
    /// Size of the whole payload as received, bytes.
    pub payload_len: u64,
    /// When the agent received it (Unix ms, agent clock).
    pub recv_ts_ms: i64,
}

/// Body of `POST /v1/devices/{device}/batches`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadBatch {
    /// Readings, any order.
    pub readings: Vec<Reading>,
    /// Predictions, any order.
    pub predictions: Vec<Prediction>,
    /// Dead letters, any order (absent in bodies from older agents).
    #[serde(default)]
    pub dead_letters: Vec<DeadLetterRecord>,
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
    /// Dead letters newly inserted by this request.
    #[serde(default)]
    pub dead_letters_inserted: u64,
    /// Dead letters that were already stored (replays).
    #[serde(default)]
    pub dead_letters_duplicate: u64,
    /// Dead-letter sequence ranges the batch touched (key `dead_letters`).
    #[serde(default)]
    pub dead_letters: Vec<SeqRange>,
}

/// A model the agent is serving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveModel {
    /// Package name.
    pub name: String,
    /// Package version (semver).
    pub version: String,
    /// sha256 of its ONNX file.
    pub sha256: String,
}

/// What the agent holds that the cloud does not have yet.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backlog {
    /// Unsynced readings.
    pub readings: u64,
    /// Unsynced predictions.
    pub predictions: u64,
    /// Unsynced dead letters.
    pub dead_letters: u64,
    /// Bytes the buffer uses on disk (database and WAL).
    pub bytes: u64,
    /// The buffer's byte quota.
    pub quota_bytes: u64,
    /// Age of the oldest unsynced row by its receive time, ms (`None` when
    /// nothing is waiting).
    pub oldest_unsynced_age_ms: Option<u64>,
}

/// Body of `POST /v1/devices/{device}/heartbeats`: the agent's state, sent
/// periodically and after start-up. Heartbeats are kept as a time series;
/// they carry no sequence number and a replay is just another sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// `edge-agent` version.
    pub agent_version: String,
    /// When the agent sent it (Unix ms, agent clock).
    pub sent_ms: i64,
    /// When the agent process started (Unix ms, agent clock).
    pub started_ms: i64,
    /// Models being served.
    pub models: Vec<ActiveModel>,
    /// Unsynced data.
    pub backlog: Backlog,
    /// Agent clock minus cloud clock, ms, as estimated from the last
    /// [`HeartbeatAck`] (`None` before the first one).
    pub clock_offset_ms: Option<i64>,
    /// Readings stored since start-up whose device timestamp looked wrong
    /// against the agent clock.
    pub clock_suspect_readings: u64,
    /// Monotonic counters since the agent started (received, committed,
    /// acked, `dead_letters.{reason}`, `evicted.{stream}.{reason}`,
    /// sync failures, quarantined batches, ...). Names are stable API.
    pub counters: BTreeMap<String, u64>,
}

/// Response to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatAck {
    /// Cloud clock when the heartbeat was stored (Unix ms), so the agent can
    /// estimate its clock offset.
    pub server_ms: i64,
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

/// Page size used when a read request sets no `limit`.
pub const DEFAULT_PAGE_LIMIT: u32 = 100;

/// Largest accepted `limit` of a read request.
pub const MAX_PAGE_LIMIT: u32 = 1000;

/// Query string of the read endpoints (`GET .../readings`, `.../predictions`,
/// `.../dead-letters`, `.../heartbeats`). Every field is optional; a filter
/// that does not apply to the endpoint (e.g. `model` on readings) is refused.
///
/// Rows come in a fixed order per endpoint (time, then identity), and a page
/// continues strictly after the row its `cursor` names (keyset pagination):
/// rows inserted while a client pages through can only appear after its
/// position or not at all, never twice, and no row stored before the first
/// page is skipped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// Only rows at or after this time (Unix ms, inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    /// Only rows before this time (Unix ms, exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<i64>,
    /// Readings and predictions: only this sensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Readings and predictions: only this stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Predictions: only this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Rows per page, 1 to [`MAX_PAGE_LIMIT`] (default [`DEFAULT_PAGE_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// A reading as stored by the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredReading {
    /// When the cloud stored it (Unix ms, cloud clock).
    pub stored_ms: i64,
    /// The reading as the first upload carrying it had it.
    pub reading: Reading,
}

/// A prediction as stored by the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPrediction {
    /// When the cloud stored it (Unix ms, cloud clock).
    pub stored_ms: i64,
    /// The prediction as the first upload carrying it had it.
    pub prediction: Prediction,
}

/// A dead letter as stored by the cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredDeadLetter {
    /// When the cloud stored it (Unix ms, cloud clock).
    pub stored_ms: i64,
    /// The dead letter as the first upload carrying it had it.
    pub dead_letter: DeadLetterRecord,
}

/// A heartbeat as stored by the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredHeartbeat {
    /// When the cloud received it (Unix ms, cloud clock; the
    /// [`HeartbeatAck::server_ms`] it answered with).
    pub received_ms: i64,
    /// The heartbeat as sent.
    pub heartbeat: Heartbeat,
}

/// Body of `GET /v1/devices/{device}/readings`: ordered by `recv_ts_ms`,
/// `source`, `stream`, `seq` (strings in byte order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingsPage {
    /// Device id.
    pub device: String,
    /// At most `limit` rows.
    pub readings: Vec<StoredReading>,
    /// Cursor for the next page; `None` when this page is the last.
    pub next_cursor: Option<String>,
}

/// Body of `GET /v1/devices/{device}/predictions`: ordered by `created_ms`,
/// `model`, `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionsPage {
    /// Device id.
    pub device: String,
    /// At most `limit` rows.
    pub predictions: Vec<StoredPrediction>,
    /// Cursor for the next page; `None` when this page is the last.
    pub next_cursor: Option<String>,
}

/// Body of `GET /v1/devices/{device}/dead-letters`: ordered by
/// `recv_ts_ms`, `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersPage {
    /// Device id.
    pub device: String,
    /// At most `limit` rows.
    pub dead_letters: Vec<StoredDeadLetter>,
    /// Cursor for the next page; `None` when this page is the last.
    pub next_cursor: Option<String>,
}

/// Body of `GET /v1/devices/{device}/heartbeats`: ordered by `received_ms`,
/// then arrival.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatsPage {
    /// Device id.
    pub device: String,
    /// At most `limit` rows.
    pub heartbeats: Vec<StoredHeartbeat>,
    /// Cursor for the next page; `None` when this page is the last.
    pub next_cursor: Option<String>,
}

/// One device in the [`FleetSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetDevice {
    /// Device id.
    pub device: String,
    /// Whether the device is revoked.
    pub revoked: bool,
    /// When the device was registered (Unix ms, cloud clock).
    pub created_ms: i64,
    /// Last time the cloud stored anything from it: a batch row or a
    /// heartbeat (Unix ms, cloud clock); `None` if never.
    pub last_seen_ms: Option<i64>,
    /// When its last heartbeat arrived (Unix ms, cloud clock).
    pub last_heartbeat_ms: Option<i64>,
    /// `agent_version` of its last heartbeat.
    pub agent_version: Option<String>,
    /// Backlog reported by its last heartbeat.
    pub backlog: Option<Backlog>,
    /// Models its last heartbeat reported (empty without heartbeats).
    pub models: Vec<ActiveModel>,
    /// Readings stored.
    pub readings: u64,
    /// Predictions stored.
    pub predictions: u64,
    /// Dead letters stored.
    pub dead_letters: u64,
    /// Heartbeats stored.
    pub heartbeats: u64,
}

/// Body of `GET /v1/fleet`: one page of the registered devices, in id
/// order (query parameters `limit` and `cursor` as for the other reads).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSummary {
    /// Cloud clock when the page was taken (Unix ms).
    pub server_ms: i64,
    /// Devices, in id order (byte order).
    pub devices: Vec<FleetDevice>,
    /// Cursor for the next page; `None` when this page is the last.
    #[serde(default)]
    pub next_cursor: Option<String>,
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
    fn bodies_without_dead_letters_still_parse() {
        let body = r#"{"readings":[],"predictions":[]}"#;
        let batch: UploadBatch = serde_json::from_str(body).unwrap_or_default();
        assert!(batch.dead_letters.is_empty());
        let ack = r#"{"readings_inserted":1,"readings_duplicate":0,"predictions_inserted":0,
            "predictions_duplicate":0,"readings":[],"predictions":[]}"#;
        let ack: UploadAck = serde_json::from_str(ack).unwrap_or_default();
        assert_eq!(ack.readings_inserted, 1);
        assert_eq!(ack.dead_letters_inserted, 0);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let body = r#"{"readings":[],"predictions":[],"extra":1}"#;
        assert!(serde_json::from_str::<UploadBatch>(body).is_err());
    }

    fn labelled() -> Prediction {
        Prediction {
            model: "bearing".into(),
            model_version: "1.0.0".into(),
            model_sha256: "ab".repeat(32),
            seq: 1,
            source: "m1".into(),
            stream: "vibration".into(),
            window_end_seq: 9,
            window_end_ts_ms: None,
            score: 0.75,
            threshold: 0.5,
            is_anomaly: true,
            created_ms: 5,
            label: Some("wear".into()),
            probabilities: vec![0.25, 0.75],
        }
    }

    /// A label-free prediction serializes exactly as before the fields
    /// existed (an old cloud with `deny_unknown_fields` parses it), and a
    /// body from an old agent parses with no label.
    #[test]
    fn labels_are_optional_both_ways() {
        let mut p = labelled();
        let json = serde_json::to_string(&p).unwrap_or_default();
        assert!(
            json.contains(r#""label":"wear","probabilities":[0.25,0.75]"#),
            "{json}"
        );
        let back: Prediction = serde_json::from_str(&json).unwrap_or_else(|_| p.clone());
        assert_eq!(back.probabilities, vec![0.25, 0.75]);
        assert_eq!(back.label.as_deref(), Some("wear"));
        p.label = None;
        p.probabilities.clear();
        let json = serde_json::to_string(&p).unwrap_or_default();
        assert!(
            !json.contains("label") && !json.contains("probabilities"),
            "{json}"
        );
        let old = r#"{"model":"m","model_version":"1","model_sha256":"x","seq":1,"source":"s",
            "stream":"t","window_end_seq":1,"window_end_ts_ms":null,"score":0.5,
            "threshold":1.0,"is_anomaly":false,"created_ms":1}"#;
        let old: Prediction = serde_json::from_str(old).unwrap_or_else(|_| labelled());
        assert_eq!(old.label, None);
        assert!(old.probabilities.is_empty());
        assert!(serde_json::from_str::<Prediction>(r#"{"label":3}"#).is_err());
    }

    #[test]
    fn probabilities_bytes_round_trip() {
        let values = [0.25, -0.0, f64::INFINITY, 1e-310];
        let bytes = probabilities_to_bytes(&values).unwrap_or_default();
        assert_eq!(bytes.len(), 32);
        let back = probabilities_from_bytes(Some(&bytes)).unwrap_or_default();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&values));
        assert_eq!(probabilities_to_bytes(&[]), None);
        assert_eq!(probabilities_from_bytes(None), Ok(vec![]));
        assert_eq!(
            probabilities_from_bytes(Some(&bytes[..7])),
            Err(BadProbabilities { len: 7 })
        );
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
            predictions: vec![labelled()],
            dead_letters: vec![DeadLetterRecord {
                seq: 1,
                topic: "sensors/m1/temperature".into(),
                reason: "malformed".into(),
                detail: "expected value".into(),
                payload_b64: "e30=".into(),
                payload_len: 2,
                recv_ts_ms: 1_700_000_000_000,
            }],
        };
        let json = serde_json::to_string(&batch).unwrap_or_default();
        let back: UploadBatch = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, batch);
    }
}
