//! Pure payload and topic decoders: bytes in, readings or a typed rejection out.
//!
//! Owns the mapping from an MQTT topic to `(device, stream)` and from a
//! payload to numeric values. No I/O, no clocks (the receive time is passed
//! in), no panics on any input: every rejection is a [`DecodeError`] that the
//! ingest stage turns into a dead letter.

use std::collections::BTreeMap;

/// Why a message could not become a reading.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is larger than `mqtt.max_payload_bytes`.
    #[error("payload of {size} bytes exceeds the {max}-byte limit")]
    Oversized {
        /// Payload size.
        size: usize,
        /// Configured limit.
        max: usize,
    },
    /// No subscription template matches the topic.
    #[error("topic matches no template")]
    UnmatchedTopic,
    /// The payload is neither JSON nor a plain number.
    #[error("payload is not valid JSON or a number: {0}")]
    Malformed(String),
    /// The JSON is valid but not an object of numeric fields.
    #[error("unsupported JSON shape: {0}")]
    Shape(String),
    /// A value is NaN or infinite.
    #[error("field {0:?} is not a finite number")]
    NonFinite(String),
    /// The payload carries no numeric value.
    #[error("payload has no numeric values")]
    Empty,
}

/// Result alias for this module.
pub type Result<T, E = DecodeError> = std::result::Result<T, E>;

/// A topic template such as `sensors/{device}/{stream}`.
///
/// Each `/`-separated level is a literal, `{device}`, `{stream}` or `{_}`
/// (matches any single level). Both `{device}` and `{stream}` are required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Device,
    Stream,
    Any,
}

impl TopicTemplate {
    /// Parses a template.
    ///
    /// # Errors
    /// A message when a placeholder is unknown, repeated or missing.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut levels = Vec::new();
        let (mut dev, mut stream) = (0, 0);
        for level in text.split('/') {
            let l = match level {
                "{device}" => {
                    dev += 1;
                    Level::Device
                }
                "{stream}" => {
                    stream += 1;
                    Level::Stream
                }
                "{_}" => Level::Any,
                other if other.contains('{') || other.contains('}') => {
                    return Err(format!("unknown placeholder in level {other:?}"));
                }
                other if other.contains('+') || other.contains('#') => {
                    return Err(format!("wildcard {other:?} not allowed; use {{_}}"));
                }
                other => Level::Literal(other.to_owned()),
            };
            levels.push(l);
        }
        if dev != 1 || stream != 1 {
            return Err(format!(
                "{text:?} must contain {{device}} and {{stream}} exactly once each"
            ));
        }
        Ok(Self { levels })
    }

    /// Returns `(device, stream)` when the topic matches.
    #[must_use]
    pub fn matches<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let mut parts = topic.split('/');
        let (mut device, mut stream) = (None, None);
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(l) if l == part => {}
                Level::Literal(_) => return None,
                Level::Device if !part.is_empty() => device = Some(part),
                Level::Stream if !part.is_empty() => stream = Some(part),
                Level::Device | Level::Stream => return None,
                Level::Any => {}
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((device?, stream?))
    }
}

/// A decoded payload: values plus the optional identity and timestamp the
/// producer put in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Named finite values.
    pub values: BTreeMap<String, f64>,
    /// Device timestamp (Unix ms), from `ts`, `timestamp` or `time`.
    pub device_ts_ms: Option<i64>,
    /// Producer-side message id from `id` or `msg_id`, if any.
    pub producer_id: Option<String>,
}

/// Field names read as the device timestamp rather than as values.
const TS_FIELDS: [&str; 3] = ["ts", "timestamp", "time"];
/// Field names read as the producer-side identity rather than as values.
const ID_FIELDS: [&str; 2] = ["id", "msg_id"];

/// Decodes a payload: a flat JSON object of numeric fields (with optional
/// timestamp and id fields), or plain numeric text (value named `value`).
///
/// Timestamps are numbers: seconds when below 1e11, else milliseconds.
///
/// # Errors
/// A [`DecodeError`] naming what is wrong; never panics.
pub fn decode_payload(payload: &[u8], max_bytes: usize) -> Result<Decoded> {
    if payload.len() > max_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            max: max_bytes,
        });
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| DecodeError::Malformed(format!("not UTF-8: {e}")))?
        .trim();
    if let Ok(v) = text.parse::<f64>() {
        if !v.is_finite() {
            return Err(DecodeError::NonFinite("value".into()));
        }
        return Ok(Decoded {
            values: BTreeMap::from([("value".to_owned(), v)]),
            device_ts_ms: None,
            producer_id: None,
        });
    }
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let serde_json::Value::Object(map) = json else {
        return Err(DecodeError::Shape("expected a JSON object".into()));
    };
    let mut out = Decoded {
        values: BTreeMap::new(),
        device_ts_ms: None,
        producer_id: None,
    };
    for (key, value) in map {
        if TS_FIELDS.contains(&key.as_str()) {
            let Some(t) = value.as_f64().filter(|t| t.is_finite() && *t >= 0.0) else {
                return Err(DecodeError::Shape(format!(
                    "timestamp field {key:?} must be a non-negative number"
                )));
            };
            #[allow(clippy::cast_possible_truncation)]
            let ms = if t < 1e11 { t * 1000.0 } else { t } as i64;
            out.device_ts_ms = Some(ms);
        } else if ID_FIELDS.contains(&key.as_str()) {
            out.producer_id = match value {
                serde_json::Value::String(s) if !s.is_empty() && s.len() <= 128 => Some(s),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => {
                    return Err(DecodeError::Shape(format!(
                        "id field {key:?} must be a number or a string of 1..=128 bytes"
                    )));
                }
            };
        } else if key == "unit" {
            // Units are accepted and ignored until the schema carries them.
        } else {
            match value {
                serde_json::Value::Number(n) => {
                    let Some(v) = n.as_f64().filter(|v| v.is_finite()) else {
                        return Err(DecodeError::NonFinite(key));
                    };
                    out.values.insert(key, v);
                }
                other => {
                    return Err(DecodeError::Shape(format!(
                        "field {key:?} is {} not a number",
                        kind(&other)
                    )));
                }
            }
        }
    }
    if out.values.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(out)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn template_matches_and_rejects() {
        let t = TopicTemplate::parse("sensors/{device}/{stream}").unwrap();
        assert_eq!(t.matches("sensors/m1/temp"), Some(("m1", "temp")));
        assert_eq!(t.matches("sensors/m1"), None);
        assert_eq!(t.matches("sensors/m1/temp/extra"), None);
        assert_eq!(t.matches("other/m1/temp"), None);
        assert_eq!(t.matches("sensors//temp"), None);
        let any = TopicTemplate::parse("site/{_}/{stream}/{device}").unwrap();
        assert_eq!(any.matches("site/a/rpm/d9"), Some(("d9", "rpm")));
        assert!(TopicTemplate::parse("sensors/{device}").is_err());
        assert!(TopicTemplate::parse("sensors/{device}/{stream}/{x}").is_err());
        assert!(TopicTemplate::parse("sensors/+/{device}/{stream}").is_err());
    }

    #[test]
    fn json_object_with_timestamp_and_id() {
        let d = decode_payload(br#"{"ts": 1386021300, "value": 73.9, "id": 7}"#, 1024).unwrap();
        assert_eq!(d.device_ts_ms, Some(1_386_021_300_000));
        assert_eq!(d.values.get("value"), Some(&73.9));
        assert_eq!(d.producer_id.as_deref(), Some("7"));
        let ms = decode_payload(br#"{"ts": 1386021300123, "a": 1, "b": -2.5}"#, 1024).unwrap();
        assert_eq!(ms.device_ts_ms, Some(1_386_021_300_123));
        assert_eq!(ms.values.len(), 2);
    }

    #[test]
    fn plain_number() {
        let d = decode_payload(b" 21.5\n", 1024).unwrap();
        assert_eq!(d.values.get("value"), Some(&21.5));
    }

    #[test]
    fn bad_inputs_are_typed() {
        assert!(matches!(
            decode_payload(b"{\"v\":1}", 3),
            Err(DecodeError::Oversized { .. })
        ));
        assert!(matches!(
            decode_payload(b"{\"v\":", 64),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_payload(b"{\"v\":\"x\"}", 64),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode_payload(b"NaN", 64),
            Err(DecodeError::NonFinite(_))
        ));
        assert!(matches!(
            decode_payload(b"{\"ts\":5}", 64),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            decode_payload(b"[1,2]", 64),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode_payload(&[0xff, 0xfe], 64),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_payload(b"{\"v\":1e400}", 64),
            Err(DecodeError::NonFinite(_) | DecodeError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_payload(&bytes, 128);
        }

        #[test]
        fn finite_object_round_trips(fields in proptest::collection::btree_map("[a-z]{1,8}", -1e12f64..1e12, 1..6)) {
            let fields: BTreeMap<String, f64> = fields
                .into_iter()
                .filter(|(k, _)| !TS_FIELDS.contains(&k.as_str()) && !ID_FIELDS.contains(&k.as_str()) && k != "unit")
                .collect();
            prop_assume!(!fields.is_empty());
            let body = serde_json::to_vec(&fields).unwrap();
            let d = decode_payload(&body, body.len()).unwrap();
            prop_assert_eq!(d.values, fields);
        }
    }
}
