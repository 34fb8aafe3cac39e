//! The HTTP side of sync: the reqwest client (rustls, optional CA pinning
//! and client certificate), encoding one batch (the compact columnar codec
//! of [`sync_protocol::codec`] or JSON, zstd on top), and classifying the
//! answer.
//!
//! Owns no state beyond the client; never touches the buffer.

use std::collections::BTreeMap;
use std::sync::Arc;

use reqwest::StatusCode;
use serde::Serialize;

use super::{Result, SyncError};
use crate::buffer::Outbox;
use crate::config::SyncSettings;

/// Longest error body kept for logs and the quarantine record.
const MAX_ERROR_BODY: usize = 2048;

/// Builds the client: request timeout, user agent, and for `https://` the
/// configured trust (`ca_file` replaces the system's roots) and identity.
///
/// # Errors
/// [`SyncError::Tls`] when a PEM file cannot be used, [`SyncError::Client`]
/// when reqwest refuses the configuration.
pub fn build_client(settings: &SyncSettings) -> Result<reqwest::Client> {
    crate::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .connect_timeout(settings.request_timeout)
        .user_agent(concat!("edge-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = &settings.tls {
        let config = crate::ingest::conn::tls_config(tls).map_err(SyncError::Tls)?;
        builder = builder.tls_backend_preconfigured(Arc::unwrap_or_clone(config));
    }
    builder.build().map_err(SyncError::Client)
}

/// What an HTTP status means for the batch that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Success,
    /// 408, 425, 429, 5xx: try the same rows again after a backoff.
    Retriable,
    /// 401, 403, 404, 405, 407 and redirects: the agent's configuration
    /// (token, device id, URL) is wrong; retried slowly, never quarantined,
    /// because every batch would get the same answer.
    Config,
    /// Any other 4xx (400, 413, 415, 422, ...): the cloud refuses these rows.
    Refused,
}

/// Classifies a response status.
#[must_use]
pub fn classify(status: StatusCode) -> Class {
    match status.as_u16() {
        200..=299 => Class::Success,
        408 | 425 | 429 | 500..=599 => Class::Retriable,
        401 | 403 | 404 | 405 | 407 => Class::Config,
        400..=499 => Class::Refused,
        _ => Class::Config,
    }
}

/// How a batch body is encoded before zstd, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// [`sync_protocol::codec`] layout version 3 (`Content-Type:
    /// application/vnd.edge-batch.v3`): carries prediction labels.
    Compact,
    /// [`sync_protocol::codec`] layout version 2 (`Content-Type:
    /// application/vnd.edge-batch.v2`), for clouds that predate version 3;
    /// prediction labels and probabilities are left out (such a cloud has
    /// nowhere to store them).
    CompactV2,
    /// [`sync_protocol::codec`] layout version 1 (`Content-Type:
    /// application/vnd.edge-batch.v1`), for clouds that predate version 2;
    /// no labels either.
    CompactV1,
    /// `application/json`, for clouds that predate the codec.
    Json,
}

impl BodyFormat {
    /// The `Content-Type` of this format.
    #[must_use]
    pub fn media_type(self) -> &'static str {
        match self {
            BodyFormat::Compact => sync_protocol::codec::MEDIA_TYPE,
            BodyFormat::CompactV2 => sync_protocol::codec::MEDIA_TYPE_V2,
            BodyFormat::CompactV1 => sync_protocol::codec::MEDIA_TYPE_V1,
            BodyFormat::Json => sync_protocol::JSON_MEDIA_TYPE,
        }
    }

    /// The next older format to try when the cloud does not know this one.
    #[must_use]
    pub fn fallback(self) -> Self {
        match self {
            BodyFormat::Compact => BodyFormat::CompactV2,
            BodyFormat::CompactV2 => BodyFormat::CompactV1,
            BodyFormat::CompactV1 | BodyFormat::Json => BodyFormat::Json,
        }
    }

    /// A small number for an atomic (see [`BodyFormat::from_index`]).
    #[must_use]
    pub fn index(self) -> u8 {
        match self {
            BodyFormat::Compact => 0,
            BodyFormat::CompactV2 => 1,
            BodyFormat::CompactV1 => 2,
            BodyFormat::Json => 3,
        }
    }

    /// The format of [`BodyFormat::index`] `i` (JSON for anything unknown).
    #[must_use]
    pub fn from_index(i: u8) -> Self {
        match i {
            0 => BodyFormat::Compact,
            1 => BodyFormat::CompactV2,
            2 => BodyFormat::CompactV1,
            _ => BodyFormat::Json,
        }
    }
}

/// Whether a refusal of a compact body means the cloud does not know this
/// layout version or the codec at all (415, or an older cloud that read the
/// body as JSON), so the agent should fall back to an older format rather
/// than quarantine anything.
#[must_use]
pub fn codec_unsupported(format: BodyFormat, status: StatusCode, body: &str) -> bool {
    format != BodyFormat::Json
        && (status == StatusCode::UNSUPPORTED_MEDIA_TYPE
            || (status == StatusCode::BAD_REQUEST && body.contains("malformed_json")))
}

/// How many of `batch`'s predictions lose their class label and
/// probabilities when encoded in `format` (only v2 and v1 leave them out).
#[must_use]
pub fn labels_left_out(batch: &Outbox, format: BodyFormat) -> u64 {
    match format {
        BodyFormat::CompactV2 | BodyFormat::CompactV1 => batch
            .predictions
            .iter()
            .filter(|(_, p)| p.label.is_some() || !p.probabilities.is_empty())
            .count() as u64,
        BodyFormat::Compact | BodyFormat::Json => 0,
    }
}

/// Borrowed view of an [`sync_protocol::UploadBatch`], so a batch can be
/// encoded again (after a split) without copying rows.
#[derive(Serialize)]
struct BatchRef<'a> {
    readings: Vec<&'a sync_protocol::Reading>,
    predictions: Vec<&'a sync_protocol::Prediction>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    dead_letters: Vec<&'a sync_protocol::DeadLetterRecord>,
}

/// The batch in `format`, zstd-compressed: `(body, length before zstd)`.
///
/// # Errors
/// [`SyncError::Encode`].
pub fn encode(batch: &Outbox, format: BodyFormat) -> Result<(Vec<u8>, usize)> {
    let plain = match format {
        BodyFormat::Json => {
            let body = BatchRef {
                readings: batch.readings.iter().map(|(_, r)| r).collect(),
                predictions: batch.predictions.iter().map(|(_, p)| p).collect(),
                dead_letters: batch.dead_letters.iter().map(|(_, d)| d).collect(),
            };
            serde_json::to_vec(&body).map_err(|e| SyncError::Encode(e.into()))?
        }
        BodyFormat::Compact | BodyFormat::CompactV2 | BodyFormat::CompactV1 => {
            let body = sync_protocol::UploadBatch {
                readings: batch.readings.iter().map(|(_, r)| r.clone()).collect(),
                predictions: batch.predictions.iter().map(|(_, p)| p.clone()).collect(),
                dead_letters: batch.dead_letters.iter().map(|(_, d)| d.clone()).collect(),
            };
            match format {
                BodyFormat::Compact => sync_protocol::codec::encode_batch(&body),
                BodyFormat::CompactV2 => sync_protocol::codec::encode_batch_v2(&body),
                _ => sync_protocol::codec::encode_batch_v1(&body),
            }
        }
    };
    let compressed = zstd::bulk::compress(&plain, 3).map_err(SyncError::Encode)?;
    Ok((compressed, plain.len()))
}

/// Whether `ack` covers every row of `batch`: each `(key, seq)` lies in one
/// of the acknowledged ranges of its list.
#[must_use]
pub fn ack_covers(ack: &sync_protocol::UploadAck, batch: &Outbox) -> bool {
    fn index(ranges: &[sync_protocol::SeqRange]) -> BTreeMap<&str, Vec<(u64, u64)>> {
        let mut out: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
        for r in ranges {
            out.entry(r.key.as_str())
                .or_default()
                .push((r.first, r.last));
        }
        out
    }
    fn inside(index: &BTreeMap<&str, Vec<(u64, u64)>>, key: &str, seq: u64) -> bool {
        index
            .get(key)
            .is_some_and(|v| v.iter().any(|(a, b)| (*a..=*b).contains(&seq)))
    }
    let readings = index(&ack.readings);
    let predictions = index(&ack.predictions);
    let dead = index(&ack.dead_letters);
    let mut key = String::new();
    batch.readings.iter().all(|(_, r)| {
        key.clear();
        key.push_str(&r.source);
        key.push('/');
        key.push_str(&r.stream);
        inside(&readings, &key, r.seq)
    }) && batch
        .predictions
        .iter()
        .all(|(_, p)| inside(&predictions, &p.model, p.seq))
        && batch
            .dead_letters
            .iter()
            .all(|(_, d)| inside(&dead, "dead_letters", d.seq))
}

/// POSTs one batch and returns the acknowledgement with the body's size
/// on the wire.
///
/// # Errors
/// [`SyncError::Transport`], [`SyncError::Retriable`], [`SyncError::Config`],
/// [`SyncError::Refused`], [`SyncError::BadAck`] (also when the ack does not
/// cover the batch), [`SyncError::Encode`].
pub async fn post_batch(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    batch: &Outbox,
    format: BodyFormat,
) -> Result<(sync_protocol::UploadAck, usize)> {
    let (body, _plain) = encode(batch, format)?;
    let sent = body.len();
    let response = client
        .post(url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_TYPE, format.media_type())
        .header(
            reqwest::header::CONTENT_ENCODING,
            sync_protocol::ZSTD_ENCODING,
        )
        .body(body)
        .send()
        .await
        .map_err(SyncError::Transport)?;
    let status = response.status();
    match classify(status) {
        Class::Success => {
            let bytes = response.bytes().await.map_err(SyncError::Transport)?;
            let ack: sync_protocol::UploadAck =
                serde_json::from_slice(&bytes).map_err(SyncError::BadAck)?;
            if !ack_covers(&ack, batch) {
                return Err(SyncError::AckMismatch);
            }
            Ok((ack, sent))
        }
        Class::Retriable => {
            let retry_after = retry_after(response.headers(), std::time::SystemTime::now());
            Err(SyncError::Retriable {
                status,
                retry_after,
            })
        }
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

/// `Retry-After` (RFC 9110, section 10.2.3) as a delay: either form,
/// delay-seconds or an HTTP-date (measured from `now`; a date already past
/// means no wait). `None` when absent or unparsable. The caller caps it.
#[must_use]
pub fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<std::time::Duration> {
    let text = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(date.duration_since(now).unwrap_or_default())
}

/// The response body, truncated, for logs and quarantine records.
pub async fn error_body(response: reqwest::Response) -> String {
    match response.text().await {
        Ok(text) => text.chars().take(MAX_ERROR_BODY).collect(),
        Err(e) => format!("(body unreadable: {e})"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn statuses_are_classified() {
        for (code, class) in [
            (200, Class::Success),
            (204, Class::Success),
            (408, Class::Retriable),
            (429, Class::Retriable),
            (500, Class::Retriable),
            (503, Class::Retriable),
            (401, Class::Config),
            (403, Class::Config),
            (404, Class::Config),
            (400, Class::Refused),
            (413, Class::Refused),
            (415, Class::Refused),
            (422, Class::Refused),
            (302, Class::Config),
        ] {
            assert_eq!(
                classify(StatusCode::from_u16(code).unwrap()),
                class,
                "{code}"
            );
        }
    }

    fn reading(stream: &str, seq: u64) -> (i64, sync_protocol::Reading) {
        (
            i64::try_from(seq).unwrap(),
            sync_protocol::Reading {
                source: "m".into(),
                stream: stream.into(),
                seq,
                device_ts_ms: None,
                recv_ts_ms: 1,
                clock_ok: true,
                values: BTreeMap::from([("v".into(), 1.0)]),
            },
        )
    }

    #[test]
    fn ack_must_cover_every_row() {
        let batch = Outbox {
            readings: vec![reading("a", 1), reading("a", 2), reading("b", 7)],
            ..Outbox::default()
        };
        let range = |key: &str, first, last| sync_protocol::SeqRange {
            key: key.into(),
            first,
            last,
        };
        let mut ack = sync_protocol::UploadAck {
            readings: vec![range("m/a", 1, 2), range("m/b", 7, 7)],
            ..Default::default()
        };
        assert!(ack_covers(&ack, &batch));
        ack.readings = vec![range("m/a", 1, 1), range("m/b", 7, 7)];
        assert!(!ack_covers(&ack, &batch));
        ack.readings = vec![range("m/a", 1, 2)];
        assert!(!ack_covers(&ack, &batch));
        assert!(ack_covers(&ack, &Outbox::default()));
    }

    #[test]
    fn compact_encoding_round_trips_and_is_smaller() {
        let batch = Outbox {
            readings: (1..=100).map(|i| reading("a", i)).collect(),
            ..Outbox::default()
        };
        let (compact, compact_plain) = encode(&batch, BodyFormat::Compact).unwrap();
        let (json, json_plain) = encode(&batch, BodyFormat::Json).unwrap();
        assert!(compact_plain < json_plain && compact.len() <= json.len());
        let plain = zstd::bulk::decompress(&compact, 1 << 20).unwrap();
        let back = sync_protocol::codec::decode_batch(&plain).unwrap();
        assert_eq!(back.readings.len(), 100);
        assert_eq!(back.readings[7], batch.readings[7].1);
        assert!(codec_unsupported(
            BodyFormat::Compact,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ""
        ));
        assert!(codec_unsupported(
            BodyFormat::Compact,
            StatusCode::BAD_REQUEST,
            r#"{"code":"malformed_json"}"#
        ));
        assert!(!codec_unsupported(
            BodyFormat::Json,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ""
        ));
        assert!(!codec_unsupported(
            BodyFormat::Compact,
            StatusCode::BAD_REQUEST,
            r#"{"code":"invalid_batch"}"#
        ));
    }

    /// The ladder steps v3, v2, v1, JSON, and only v3 carries labels.
    #[test]
    fn formats_step_down_and_only_v3_keeps_labels() {
        let mut ladder = vec![BodyFormat::Compact];
        while let Some(last) = ladder.last().copied().filter(|f| *f != BodyFormat::Json) {
            ladder.push(last.fallback());
        }
        assert_eq!(
            ladder,
            [
                BodyFormat::Compact,
                BodyFormat::CompactV2,
                BodyFormat::CompactV1,
                BodyFormat::Json
            ]
        );
        for f in &ladder {
            assert_eq!(BodyFormat::from_index(f.index()), *f);
        }
        let mut batch = Outbox::default();
        batch.predictions.push((
            1,
            sync_protocol::Prediction {
                model: "c".into(),
                model_version: "1".into(),
                model_sha256: String::new(),
                seq: 1,
                source: "m".into(),
                stream: "t".into(),
                window_end_seq: 1,
                window_end_ts_ms: None,
                score: 0.9,
                threshold: 0.5,
                is_anomaly: true,
                created_ms: 0,
                label: Some("wear".into()),
                probabilities: vec![0.1, 0.9],
            },
        ));
        let decoded = |format| {
            let (body, _) = encode(&batch, format).unwrap();
            let plain = zstd::bulk::decompress(&body, 1 << 20).unwrap();
            if format == BodyFormat::Json {
                serde_json::from_slice::<sync_protocol::UploadBatch>(&plain).unwrap()
            } else {
                sync_protocol::codec::decode_batch(&plain).unwrap()
            }
        };
        assert_eq!(
            decoded(BodyFormat::Compact).predictions[0],
            batch.predictions[0].1
        );
        assert_eq!(
            decoded(BodyFormat::Json).predictions[0],
            batch.predictions[0].1
        );
        let v2 = decoded(BodyFormat::CompactV2);
        assert_eq!(v2.predictions[0].label, None);
        assert!(v2.predictions[0].probabilities.is_empty());
        // What is left out is counted; an unlabelled prediction loses nothing.
        let mut plain = batch.predictions[0].1.clone();
        plain.label = None;
        plain.probabilities.clear();
        batch.predictions.push((2, plain));
        let lost = |f| labels_left_out(&batch, f);
        assert_eq!(
            ladder.iter().map(|f| lost(*f)).collect::<Vec<_>>(),
            [0, 1, 1, 0]
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            retry_after(&h, now)
        };
        assert_eq!(with("120"), Some(Duration::from_secs(120)));
        assert_eq!(with(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            with("Wed, 21 Oct 2015 07:29:30 GMT"),
            Some(Duration::from_secs(90))
        );
        // The two obsolete HTTP-date forms a server may still send.
        assert_eq!(
            with("Wednesday, 21-Oct-15 07:28:10 GMT"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            with("Wed Oct 21 07:28:05 2015"),
            Some(Duration::from_secs(5))
        );
        // A date in the past: retry now.
        assert_eq!(with("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(with("soon"), None);
        assert_eq!(with("-5"), None);
        assert_eq!(retry_after(&HeaderMap::new(), SystemTime::now()), None);
    }

    #[test]
    fn encoding_leaves_out_empty_dead_letters() {
        let batch = Outbox {
            readings: vec![reading("a", 1)],
            ..Outbox::default()
        };
        let (body, raw) = encode(&batch, BodyFormat::Json).unwrap();
        let json = zstd::bulk::decompress(&body, 1 << 20).unwrap();
        assert_eq!(json.len(), raw);
        let text = String::from_utf8(json).unwrap();
        assert!(!text.contains("dead_letters"), "{text}");
        let parsed: sync_protocol::UploadBatch = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.readings.len(), 1);
    }
}
