//! Pure payload and topic decoders: bytes in, readings or a typed rejection out.
//!
//! Owns the mapping from an MQTT topic to `(device, stream)` and from a
//! payload to one or more readings of named numeric values. No I/O, no clocks
//! (the receive time is passed in), no panics on any input: every rejection is
//! a [`DecodeError`] that the ingest stage turns into a dead letter. A message
//! is accepted or rejected whole; one bad element rejects all of it.
//!
//! # Formats and how they are told apart
//! After the `max_bytes` check, in this order:
//! 1. **SenML CBOR** (RFC 8428 section 6) when the first byte is a CBOR array
//!    head (`0x80..=0x9f`). UTF-8 text never starts with those bytes, so no
//!    JSON or number payload is mistaken for CBOR.
//! 2. **Plain number**: the trimmed UTF-8 text parses as an `f64`; one reading
//!    whose value is named `value`, without a timestamp.
//! 3. **Flat JSON object** of numeric fields, plus an optional timestamp
//!    (`ts`, `timestamp` or `time`: seconds when below 1e11, else
//!    milliseconds), an optional producer id (`id` or `msg_id`) and an ignored
//!    `unit`; one reading.
//! 4. **SenML JSON** (RFC 8428 section 5): a JSON array in which some object
//!    has a field that only SenML gives that type (a string `bn`, `n`, `bu`,
//!    `u`, `vs` or `vd`, or a boolean `vb`; flat-object fields are numbers),
//!    or in which every element is an object and every key is a SenML label
//!    (so `[{"v": 1, "t": -5}]` is SenML).
//! 5. **JSON array of flat objects**: any other array; one reading per
//!    element, in order. An empty array is [`DecodeError::Empty`].
//!
//! # SenML
//! JSON and CBOR records are parsed into one intermediate record and resolved
//! by the same code, per RFC 8428 section 4: base fields apply to their own
//! record and every later one until overridden; name = `bn` + `n` (`value`
//! when that is empty); value = `bv` + `v`; time = `bt` + `t` in seconds,
//! where a time below 2^28 is relative to the receive time. Only `v` yields a
//! value: records with only `vs`, `vb`, `vd` or `s` (or no value, such as a
//! header carrying base fields) are skipped, and a pack without any `v` is
//! [`DecodeError::Empty`]. Values resolved to the same time form one reading,
//! and readings come out in time order. The rest is validated and dropped:
//! units, sums, update times. Rules beyond or instead of the RFC:
//! - two values with the same resolved name and time reject the pack (RFC
//!   8428 section 5.1.3 tells such records apart by unit only);
//! - unknown fields are ignored, except labels ending in `_` (which the RFC
//!   says must be understood) and unknown integer CBOR labels (Table 4 is
//!   closed), which reject the pack; a record with no SenML field at all is
//!   rejected rather than ignored, so a mix of SenML and flat objects fails
//!   loudly;
//! - CBOR maps must use the integer labels; text keys are extensions, as the
//!   RFC says, and CBOR numbers may be integers, floats or decimal fractions
//!   (tag 4);
//! - `bver` must be an integer in `1..=10`.

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
    /// The payload is not valid JSON, CBOR or a plain number.
    #[error("payload is not valid JSON, CBOR or a number: {0}")]
    Malformed(String),
    /// The JSON or CBOR is valid but not one of the supported shapes.
    #[error("unsupported payload shape: {0}")]
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

/// One reading decoded from a payload: values plus the optional identity and
/// timestamp the producer put in it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// Named finite values.
    pub values: BTreeMap<String, f64>,
    /// Device timestamp (Unix ms): from `ts`, `timestamp` or `time` in a flat
    /// object, or the resolved SenML time.
    pub device_ts_ms: Option<i64>,
    /// Producer-side message id from `id` or `msg_id`, if any (never set for
    /// SenML).
    pub producer_id: Option<String>,
    /// True when `device_ts_ms` is a SenML time relative to "now", resolved
    /// against the receive time: it then says nothing about the device clock
    /// and does not identify the message (a resent pack resolves to a new
    /// time, and an unchanged pack sent twice is two messages).
    pub relative_time: bool,
}

/// Field names read as the device timestamp rather than as values.
const TS_FIELDS: [&str; 3] = ["ts", "timestamp", "time"];
/// Field names read as the producer-side identity rather than as values.
const ID_FIELDS: [&str; 2] = ["id", "msg_id"];
/// Name of the value of a plain number, and of a SenML record whose resolved
/// name is empty.
const DEFAULT_NAME: &str = "value";
/// SenML times (s) below this are relative to "now" (RFC 8428 section 4.5.3).
const SENML_RELATIVE_BELOW_SECS: f64 = 268_435_456.0;
/// Times (ms) at or beyond this magnitude are rejected: 2^53, below which an
/// `f64` holds every integer exactly (about the year 287,000).
const MAX_TIME_MS: f64 = 9_007_199_254_740_992.0;
/// Highest SenML version understood (RFC 8428 section 4.4).
const SENML_VERSION: f64 = 10.0;
// Design: ciborium's default nesting limit (256) is far deeper than a SenML
// pack can be (array, map, tag 4, array); a shallow limit bounds stack use.
/// Deepest CBOR nesting accepted.
const CBOR_MAX_DEPTH: usize = 16;

/// Decodes a payload into one or more readings; see the module docs for the
/// formats and how they are detected.
///
/// `recv_ts_ms` (Unix ms) is "now" for SenML relative times; nothing else
/// reads it.
///
/// # Errors
/// A [`DecodeError`] naming what is wrong, for the whole payload; never
/// panics. Problems in one array element name its index (`element 2: ...` or
/// `record 2: ...`, and `[2].v` for a non-finite field).
pub fn decode_payload(payload: &[u8], max_bytes: usize, recv_ts_ms: i64) -> Result<Vec<Decoded>> {
    if payload.len() > max_bytes {
        return Err(DecodeError::Oversized {
            size: payload.len(),
            max: max_bytes,
        });
    }
    if matches!(payload.first(), Some(0x80..=0x9f)) {
        return decode_senml_cbor(payload, recv_ts_ms);
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| DecodeError::Malformed(format!("not UTF-8: {e}")))?
        .trim();
    if let Ok(v) = text.parse::<f64>() {
        if !v.is_finite() {
            return Err(DecodeError::NonFinite(DEFAULT_NAME.into()));
        }
        return Ok(vec![Decoded {
            values: BTreeMap::from([(DEFAULT_NAME.to_owned(), v)]),
            device_ts_ms: None,
            producer_id: None,
            relative_time: false,
        }]);
    }
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    match json {
        serde_json::Value::Object(map) => Ok(vec![decode_object(map)?]),
        serde_json::Value::Array(items) if items.is_empty() => Err(DecodeError::Empty),
        serde_json::Value::Array(items) if is_senml(&items) => {
            let records = items
                .into_iter()
                .enumerate()
                .map(|(i, item)| SenmlRecord::from_json(i, item))
                .collect::<Result<Vec<_>>>()?;
            resolve_senml(records, recv_ts_ms)
        }
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                serde_json::Value::Object(map) => decode_object(map).map_err(|e| in_element(i, e)),
                other => Err(DecodeError::Shape(format!(
                    "element {i} is {} not an object",
                    json_kind(&other)
                ))),
            })
            .collect(),
        other => Err(DecodeError::Shape(format!(
            "expected a JSON object or array, got {}",
            json_kind(&other)
        ))),
    }
}

/// Decodes one flat object of numeric fields.
fn decode_object(map: serde_json::Map<String, serde_json::Value>) -> Result<Decoded> {
    let mut out = Decoded {
        values: BTreeMap::new(),
        device_ts_ms: None,
        producer_id: None,
        relative_time: false,
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
                        json_kind(&other)
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

/// Places an error from array element `i` within the message.
fn in_element(i: usize, err: DecodeError) -> DecodeError {
    match err {
        DecodeError::Shape(msg) => DecodeError::Shape(format!("element {i}: {msg}")),
        DecodeError::NonFinite(field) => DecodeError::NonFinite(format!("[{i}].{field}")),
        DecodeError::Empty => DecodeError::Shape(format!("element {i} has no numeric values")),
        other @ (DecodeError::Oversized { .. }
        | DecodeError::UnmatchedTopic
        | DecodeError::Malformed(_)) => other,
    }
}

/// The SenML detection rule for JSON arrays (see the module docs).
fn is_senml(items: &[serde_json::Value]) -> bool {
    let objects = || items.iter().filter_map(serde_json::Value::as_object);
    objects().flatten().any(|(k, v)| senml_only(k, v))
        || (objects().count() == items.len()
            && objects()
                .flat_map(|o| o.keys())
                .all(|k| Label::from_json(k).is_some()))
}

/// Whether `value` has a type that only SenML gives a field named `key`.
fn senml_only(key: &str, value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(_) => matches!(key, "bn" | "n" | "bu" | "u" | "vs" | "vd"),
        serde_json::Value::Bool(_) => key == "vb",
        _ => false,
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Decodes a SenML CBOR pack.
fn decode_senml_cbor(payload: &[u8], recv_ts_ms: i64) -> Result<Vec<Decoded>> {
    use ciborium::de::Error;
    let mut rest = payload;
    let value: ciborium::Value =
        ciborium::de::from_reader_with_recursion_limit(&mut rest, CBOR_MAX_DEPTH).map_err(|e| {
            DecodeError::Malformed(match e {
                Error::Io(e) => format!("truncated CBOR: {e}"),
                Error::Syntax(at) => format!("invalid CBOR at byte {at}"),
                Error::Semantic(_, msg) => format!("invalid CBOR: {msg}"),
                Error::RecursionLimitExceeded => {
                    format!("CBOR nested deeper than {CBOR_MAX_DEPTH} levels")
                }
            })
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed(format!(
            "{} bytes after the CBOR array",
            rest.len()
        )));
    }
    let ciborium::Value::Array(items) = value else {
        return Err(DecodeError::Shape(format!(
            "expected a CBOR array, got {}",
            cbor_kind(&value)
        )));
    };
    if items.is_empty() {
        return Err(DecodeError::Empty);
    }
    let records = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| SenmlRecord::from_cbor(i, item))
        .collect::<Result<Vec<_>>>()?;
    resolve_senml(records, recv_ts_ms)
}

fn cbor_kind(v: &ciborium::Value) -> &'static str {
    match v {
        ciborium::Value::Integer(_) => "an integer",
        ciborium::Value::Bytes(_) => "a byte string",
        ciborium::Value::Float(_) => "a float",
        ciborium::Value::Text(_) => "a text string",
        ciborium::Value::Bool(_) => "a boolean",
        ciborium::Value::Null => "null",
        ciborium::Value::Tag(..) => "a tagged item",
        ciborium::Value::Array(_) => "an array",
        ciborium::Value::Map(_) => "a map",
        _ => "an unknown CBOR item",
    }
}

/// A SenML field (RFC 8428 Table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Version,
    BaseName,
    BaseTime,
    BaseUnit,
    BaseValue,
    BaseSum,
    Name,
    Unit,
    Value,
    StringValue,
    BoolValue,
    Sum,
    Time,
    UpdateTime,
    DataValue,
}

/// Each label with its JSON name and CBOR label (RFC 8428 Tables 2 and 4).
const LABELS: [(Label, &str, i8); 15] = [
    (Label::Version, "bver", -1),
    (Label::BaseName, "bn", -2),
    (Label::BaseTime, "bt", -3),
    (Label::BaseUnit, "bu", -4),
    (Label::BaseValue, "bv", -5),
    (Label::BaseSum, "bs", -6),
    (Label::Name, "n", 0),
    (Label::Unit, "u", 1),
    (Label::Value, "v", 2),
    (Label::StringValue, "vs", 3),
    (Label::BoolValue, "vb", 4),
    (Label::Sum, "s", 5),
    (Label::Time, "t", 6),
    (Label::UpdateTime, "ut", 7),
    (Label::DataValue, "vd", 8),
];

impl Label {
    fn from_json(key: &str) -> Option<Self> {
        LABELS.iter().find(|l| l.1 == key).map(|l| l.0)
    }

    fn from_cbor(key: i128) -> Option<Self> {
        LABELS.iter().find(|l| i128::from(l.2) == key).map(|l| l.0)
    }

    fn json_name(self) -> &'static str {
        LABELS.iter().find(|l| l.0 == self).map_or("?", |l| l.1)
    }
}

/// A field value from either encoding, before it is checked against its label.
#[derive(Debug)]
enum Field {
    Number(f64),
    Text(String),
    Bool,
    Bytes,
    Other(&'static str),
}

impl Field {
    fn from_json(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Number(n) => n
                .as_f64()
                .map_or(Self::Other("an unrepresentable number"), Self::Number),
            serde_json::Value::String(s) => Self::Text(s),
            serde_json::Value::Bool(_) => Self::Bool,
            other => Self::Other(json_kind(&other)),
        }
    }

    fn from_cbor(v: ciborium::Value) -> Self {
        match v {
            #[allow(clippy::cast_precision_loss)]
            ciborium::Value::Integer(n) => Self::Number(i128::from(n) as f64),
            ciborium::Value::Float(f) => Self::Number(f),
            ciborium::Value::Text(s) => Self::Text(s),
            ciborium::Value::Bool(_) => Self::Bool,
            ciborium::Value::Bytes(_) => Self::Bytes,
            ciborium::Value::Tag(4, inner) => {
                decimal_fraction(&inner).map_or(Self::Other("a bad decimal fraction"), Self::Number)
            }
            other => Self::Other(cbor_kind(&other)),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Number(_) => "a number",
            Self::Text(_) => "a string",
            Self::Bool => "a boolean",
            Self::Bytes => "a byte string",
            Self::Other(kind) => kind,
        }
    }
}

/// The value of a CBOR decimal fraction (tag 4: `[exponent, mantissa]`), for
/// exponents whose power of ten an `f64` holds exactly.
fn decimal_fraction(inner: &ciborium::Value) -> Option<f64> {
    let ciborium::Value::Array(parts) = inner else {
        return None;
    };
    let [
        ciborium::Value::Integer(exp),
        ciborium::Value::Integer(mantissa),
    ] = parts.as_slice()
    else {
        return None;
    };
    let exp = i32::try_from(i128::from(*exp))
        .ok()
        .filter(|e| e.abs() <= 22)?;
    #[allow(clippy::cast_precision_loss)]
    let mantissa = i128::from(*mantissa) as f64;
    let scale = 10f64.powi(exp.abs());
    Some(if exp < 0 {
        mantissa / scale
    } else {
        mantissa * scale
    })
}

/// One SenML record, decoded from JSON or CBOR but not yet resolved against
/// the base fields before it.
#[derive(Debug, Default)]
struct SenmlRecord {
    base_name: Option<String>,
    base_time: Option<f64>,
    base_value: Option<f64>,
    name: Option<String>,
    value: Option<f64>,
    time: Option<f64>,
    /// How many of `v`, `vs`, `vb`, `vd` the record has.
    value_fields: u8,
    /// How many SenML fields the record has.
    fields: usize,
}

impl SenmlRecord {
    fn from_json(i: usize, item: serde_json::Value) -> Result<Self> {
        let serde_json::Value::Object(map) = item else {
            return Err(DecodeError::Shape(format!(
                "record {i} is {} not an object",
                json_kind(&item)
            )));
        };
        let mut rec = Self::default();
        for (key, value) in map {
            match Label::from_json(&key) {
                Some(label) => rec.set(i, label, Field::from_json(value))?,
                None => extension(i, &key)?,
            }
        }
        rec.check(i)?;
        Ok(rec)
    }

    fn from_cbor(i: usize, item: ciborium::Value) -> Result<Self> {
        let ciborium::Value::Map(entries) = item else {
            return Err(DecodeError::Shape(format!(
                "record {i} is {} not a map",
                cbor_kind(&item)
            )));
        };
        let mut rec = Self::default();
        for (key, value) in entries {
            match key {
                ciborium::Value::Integer(n) => {
                    let n = i128::from(n);
                    let Some(label) = Label::from_cbor(n) else {
                        return Err(DecodeError::Shape(format!(
                            "record {i}: unknown SenML label {n}"
                        )));
                    };
                    rec.set(i, label, Field::from_cbor(value))?;
                }
                ciborium::Value::Text(key) => extension(i, &key)?,
                other => {
                    return Err(DecodeError::Shape(format!(
                        "record {i}: map key is {}",
                        cbor_kind(&other)
                    )));
                }
            }
        }
        rec.check(i)?;
        Ok(rec)
    }

    /// Checks `field` against `label` and stores what resolution needs.
    fn set(&mut self, i: usize, label: Label, field: Field) -> Result<()> {
        let key = label.json_name();
        let wrong = |want: &str, field: &Field| {
            DecodeError::Shape(format!(
                "record {i}: field {key:?} is {} not {want}",
                field.kind()
            ))
        };
        let text = |field: Field| match field {
            Field::Text(s) => Ok(s),
            other => Err(wrong("a string", &other)),
        };
        let number = |field: Field| match field {
            Field::Number(x) if x.is_finite() => Ok(x),
            Field::Number(_) => Err(DecodeError::NonFinite(format!("[{i}].{key}"))),
            other => Err(wrong("a number", &other)),
        };
        self.fields += 1;
        match label {
            Label::Version => {
                let version = number(field)?;
                if version.fract() != 0.0 || !(1.0..=SENML_VERSION).contains(&version) {
                    return Err(DecodeError::Shape(format!(
                        "record {i}: SenML version {version} is not an integer in 1..={SENML_VERSION}"
                    )));
                }
            }
            Label::BaseName => self.base_name = Some(text(field)?),
            Label::BaseTime => self.base_time = Some(number(field)?),
            Label::BaseValue => self.base_value = Some(number(field)?),
            Label::Name => self.name = Some(text(field)?),
            Label::Time => self.time = Some(number(field)?),
            Label::BaseUnit | Label::Unit => {
                text(field)?;
            }
            Label::BaseSum | Label::Sum | Label::UpdateTime => {
                number(field)?;
            }
            Label::Value => {
                self.value = Some(number(field)?);
                self.value_fields += 1;
            }
            Label::StringValue => {
                text(field)?;
                self.value_fields += 1;
            }
            Label::BoolValue => {
                if !matches!(field, Field::Bool) {
                    return Err(wrong("a boolean", &field));
                }
                self.value_fields += 1;
            }
            Label::DataValue => {
                if !matches!(field, Field::Text(_) | Field::Bytes) {
                    return Err(wrong("a string of data", &field));
                }
                self.value_fields += 1;
            }
        }
        Ok(())
    }

    fn check(&self, i: usize) -> Result<()> {
        if self.fields == 0 {
            return Err(DecodeError::Shape(format!("record {i} has no SenML field")));
        }
        if self.value_fields > 1 {
            return Err(DecodeError::Shape(format!(
                "record {i} has more than one of \"v\", \"vs\", \"vb\", \"vd\""
            )));
        }
        Ok(())
    }
}

/// Handles a field that is not a SenML label: ignored, unless its name ends
/// in `_` (must be understood, RFC 8428 section 4.4).
fn extension(i: usize, key: &str) -> Result<()> {
    if key.ends_with('_') {
        return Err(DecodeError::Shape(format!(
            "record {i}: unsupported must-understand field {key:?}"
        )));
    }
    Ok(())
}

/// Applies base fields (RFC 8428 section 4.6) and groups the numeric values by
/// resolved time, earliest first.
fn resolve_senml(records: Vec<SenmlRecord>, recv_ts_ms: i64) -> Result<Vec<Decoded>> {
    let mut base_name = String::new();
    let (mut base_time, mut base_value) = (0.0, 0.0);
    let mut groups: BTreeMap<(i64, bool), BTreeMap<String, f64>> = BTreeMap::new();
    for (i, rec) in records.into_iter().enumerate() {
        if let Some(b) = rec.base_name {
            base_name = b;
        }
        if let Some(b) = rec.base_time {
            base_time = b;
        }
        if let Some(b) = rec.base_value {
            base_value = b;
        }
        let Some(v) = rec.value else {
            continue;
        };
        let value = base_value + v;
        if !value.is_finite() {
            return Err(DecodeError::NonFinite(format!("[{i}].v")));
        }
        let mut name = base_name.clone();
        name.push_str(rec.name.as_deref().unwrap_or_default());
        if name.is_empty() {
            name = DEFAULT_NAME.to_owned();
        }
        let time = senml_time_ms(i, base_time + rec.time.unwrap_or(0.0), recv_ts_ms)?;
        match groups.entry(time).or_default().entry(name) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(value);
            }
            std::collections::btree_map::Entry::Occupied(slot) => {
                return Err(DecodeError::Shape(format!(
                    "record {i}: a second value for {:?} at the same time",
                    slot.key()
                )));
            }
        }
    }
    if groups.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(groups
        .into_iter()
        .map(|((ts, relative), values)| Decoded {
            values,
            device_ts_ms: Some(ts),
            producer_id: None,
            relative_time: relative,
        })
        .collect())
}

/// Resolves a SenML time in seconds to Unix ms, and whether it was relative.
fn senml_time_ms(i: usize, secs: f64, recv_ts_ms: i64) -> Result<(i64, bool)> {
    if !secs.is_finite() {
        return Err(DecodeError::NonFinite(format!("[{i}].t")));
    }
    let ms = (secs * 1000.0).round();
    if ms.abs() >= MAX_TIME_MS {
        return Err(DecodeError::Shape(format!(
            "record {i}: time {secs} s is out of range"
        )));
    }
    #[allow(clippy::cast_possible_truncation)]
    let ms = ms as i64;
    if secs >= SENML_RELATIVE_BELOW_SECS {
        return Ok((ms, false));
    }
    match recv_ts_ms.checked_add(ms) {
        Some(t) if t >= 0 => Ok((t, true)),
        _ => Err(DecodeError::Shape(format!(
            "record {i}: relative time {secs} s is before the Unix epoch"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ciborium::Value as Cbor;
    use proptest::prelude::*;
    use serde_json::json;

    /// "Now" for the SenML tests: 2023-11-14T22:13:20Z.
    const NOW_MS: i64 = 1_700_000_000_000;

    fn decode(payload: &[u8]) -> Result<Vec<Decoded>> {
        decode_payload(payload, 4096, NOW_MS)
    }

    fn one(payload: &[u8]) -> Decoded {
        let mut all = decode(payload).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    fn values(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn by_time(readings: Vec<Decoded>) -> Vec<(i64, BTreeMap<String, f64>)> {
        readings
            .into_iter()
            .map(|d| (d.device_ts_ms.unwrap(), d.values))
            .collect()
    }

    fn cbor(value: &Cbor) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(value, &mut out).unwrap();
        out
    }

    fn cbor_record(fields: Vec<(i64, Cbor)>) -> Cbor {
        Cbor::Map(
            fields
                .into_iter()
                .map(|(k, v)| (Cbor::Integer(k.into()), v))
                .collect(),
        )
    }

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
        let d = one(br#"{"ts": 1386021300, "value": 73.9, "id": 7}"#);
        assert_eq!(d.device_ts_ms, Some(1_386_021_300_000));
        assert_eq!(d.values.get("value"), Some(&73.9));
        assert_eq!(d.producer_id.as_deref(), Some("7"));
        assert!(!d.relative_time);
        let ms = one(br#"{"ts": 1386021300123, "a": 1, "b": -2.5, "unit": "C"}"#);
        assert_eq!(ms.device_ts_ms, Some(1_386_021_300_123));
        assert_eq!(ms.values.len(), 2);
    }

    #[test]
    fn plain_number() {
        let d = one(b" 21.5\n");
        assert_eq!(d.values, values(&[("value", 21.5)]));
        assert_eq!(d.device_ts_ms, None);
    }

    #[test]
    fn bad_inputs_are_typed() {
        assert!(matches!(
            decode_payload(b"{\"v\":1}", 3, NOW_MS),
            Err(DecodeError::Oversized { size: 7, max: 3 })
        ));
        assert!(matches!(
            decode_payload(&[0x81, 0xa1, 0x02, 0x01], 3, NOW_MS),
            Err(DecodeError::Oversized { .. })
        ));
        assert!(matches!(decode(b"{\"v\":"), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode(b"{\"v\":\"x\"}"),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(decode(b"NaN"), Err(DecodeError::NonFinite(_))));
        assert!(matches!(decode(b"-inf"), Err(DecodeError::NonFinite(_))));
        assert!(matches!(decode(b"{\"ts\":5}"), Err(DecodeError::Empty)));
        assert!(matches!(decode(b"\"text\""), Err(DecodeError::Shape(_))));
        assert!(matches!(decode(b"[1,2]"), Err(DecodeError::Shape(_))));
        assert!(matches!(
            decode(&[0xff, 0xfe]),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode(b""), Err(DecodeError::Malformed(_))));
        assert!(matches!(
            decode(b"{\"v\":1e400}"),
            Err(DecodeError::NonFinite(_) | DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn nested_json_is_rejected() {
        assert!(matches!(
            decode(br#"{"a": {"b": 1}}"#),
            Err(DecodeError::Shape(m)) if m.contains("\"a\" is an object")
        ));
        assert!(matches!(
            decode(br#"{"a": [1, 2]}"#),
            Err(DecodeError::Shape(_))
        ));
        assert!(matches!(
            decode(br#"[{"a": {"b": 1}}]"#),
            Err(DecodeError::Shape(m)) if m.starts_with("element 0:")
        ));
        assert!(matches!(
            decode(br#"[[{"a": 1}]]"#),
            Err(DecodeError::Shape(m)) if m.starts_with("element 0 is an array")
        ));
        assert!(matches!(
            decode(br#"[{"n": "a", "v": {"x": 1}}]"#),
            Err(DecodeError::Shape(m)) if m.contains("record 0")
        ));
        let deep = "[".repeat(10_000);
        assert!(matches!(
            decode_payload(deep.as_bytes(), deep.len(), NOW_MS),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn json_array_of_flat_objects() {
        let all =
            decode(br#"[{"ts": 1, "a": 1}, {"ts": 2, "a": 2, "b": 3, "id": "m2"}, {"c": 4}]"#)
                .unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].device_ts_ms, Some(1000));
        assert_eq!(all[0].values, values(&[("a", 1.0)]));
        assert_eq!(all[1].values, values(&[("a", 2.0), ("b", 3.0)]));
        assert_eq!(all[1].producer_id.as_deref(), Some("m2"));
        assert_eq!(all[2].device_ts_ms, None);
        assert!(all.iter().all(|d| !d.relative_time));
        // Numeric keys that are not all SenML labels keep the flat reading.
        assert_eq!(
            one(br#"[{"v": 1, "temp": 2}]"#).values,
            values(&[("temp", 2.0), ("v", 1.0)])
        );
    }

    #[test]
    fn one_bad_element_rejects_the_array() {
        let err = decode(br#"[{"a": 1}, {"a": 2}, {"a": "x"}]"#).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Shape(m) if m.starts_with("element 2:")),
            "{err}"
        );
        let err = decode(br#"[{"a": 1}, {"ts": 5}]"#).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Shape("element 1 has no numeric values".into())
        );
        let err = decode(br#"[{"a": 1}, 7]"#).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Shape("element 1 is a number not an object".into())
        );
        let err = decode(br#"[{"a": 1}, {"a": 2, "ts": -1}]"#).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Shape(m) if m.starts_with("element 1:")),
            "{err}"
        );
    }

    #[test]
    fn empty_arrays_are_empty() {
        assert_eq!(decode(b"[]"), Err(DecodeError::Empty));
        assert_eq!(decode(b" [ ] "), Err(DecodeError::Empty));
        assert_eq!(decode(&[0x80]), Err(DecodeError::Empty));
    }

    #[test]
    fn rfc8428_5_1_1_single_data_point() {
        let d = one(br#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#);
        assert_eq!(d.values, values(&[("urn:dev:ow:10e2073a01080063", 23.1)]));
        assert_eq!(d.device_ts_ms, Some(NOW_MS));
        assert!(d.relative_time);
        assert_eq!(d.producer_id, None);
    }

    #[test]
    fn rfc8428_5_1_2_multiple_data_points_now() {
        let d = one(br#"[
              {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
              {"n":"current","u":"A","v":1.2}
            ]"#);
        assert_eq!(
            d.values,
            values(&[
                ("urn:dev:ow:10e2073a01080063:current", 1.2),
                ("urn:dev:ow:10e2073a01080063:voltage", 120.1),
            ])
        );
        assert_eq!(d.device_ts_ms, Some(NOW_MS));
        assert!(d.relative_time);
    }

    /// RFC 8428 section 5.1.2, second example: base time plus relative `t`.
    const RFC_5_1_2_TIMED: &[u8] = br#"[
      {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
       "bu":"A","bver":5,
       "n":"voltage","u":"V","v":120.1},
      {"n":"current","t":-5,"v":1.2},
      {"n":"current","t":-4,"v":1.3},
      {"n":"current","t":-3,"v":1.4},
      {"n":"current","t":-2,"v":1.5},
      {"n":"current","t":-1,"v":1.6},
      {"n":"current","v":1.7}
    ]"#;

    /// The CBOR dump of the same pack in RFC 8428 section 6.
    const RFC_6_CBOR_HEX: &str = "
        87 a7 21 78 1b 75 72 6e 3a 64 65 76 3a 6f 77 3a
        31 30 65 32 30 37 33 61 30 31 30 38 30 30 36 3a
        22 fb 41 d3 03 a1 5b 00 10 62 23 61 41 20 05 00
        67 76 6f 6c 74 61 67 65 01 61 56 02 fb 40 5e 06
        66 66 66 66 66 a3 00 67 63 75 72 72 65 6e 74 06
        24 02 fb 3f f3 33 33 33 33 33 33 a3 00 67 63 75
        72 72 65 6e 74 06 23 02 fb 3f f4 cc cc cc cc cc
        cd a3 00 67 63 75 72 72 65 6e 74 06 22 02 fb 3f
        f6 66 66 66 66 66 66 a3 00 67 63 75 72 72 65 6e
        74 06 21 02 f9 3e 00 a3 00 67 63 75 72 72 65 6e
        74 06 20 02 fb 3f f9 99 99 99 99 99 9a a3 00 67
        63 75 72 72 65 6e 74 06 00 02 fb 3f fb 33 33 33
        33 33 33";

    fn rfc_timed_expected() -> Vec<(i64, BTreeMap<String, f64>)> {
        let current = "urn:dev:ow:10e2073a0108006:current";
        vec![
            (1_276_020_071_001, values(&[(current, 1.2)])),
            (1_276_020_072_001, values(&[(current, 1.3)])),
            (1_276_020_073_001, values(&[(current, 1.4)])),
            (1_276_020_074_001, values(&[(current, 1.5)])),
            (1_276_020_075_001, values(&[(current, 1.6)])),
            (
                1_276_020_076_001,
                values(&[
                    (current, 1.7),
                    ("urn:dev:ow:10e2073a0108006:voltage", 120.1),
                ]),
            ),
        ]
    }

    #[test]
    fn rfc8428_5_1_2_multiple_data_points_with_base_time() {
        let all = decode(RFC_5_1_2_TIMED).unwrap();
        assert!(
            all.iter()
                .all(|d| !d.relative_time && d.producer_id.is_none())
        );
        assert_eq!(by_time(all), rfc_timed_expected());
    }

    #[test]
    fn rfc8428_6_cbor_example() {
        let bytes = hex::decode(RFC_6_CBOR_HEX.split_whitespace().collect::<String>()).unwrap();
        assert_eq!(bytes.len(), 0xc3);
        let all = decode(&bytes).unwrap();
        assert_eq!(all, decode(RFC_5_1_2_TIMED).unwrap());
        assert_eq!(by_time(all), rfc_timed_expected());

        // The same records through ciborium's encoder.
        let text = |s: &str| Cbor::Text(s.into());
        let mut records = vec![cbor_record(vec![
            (-2, text("urn:dev:ow:10e2073a0108006:")),
            (-3, Cbor::Float(1_276_020_076.001)),
            (-4, text("A")),
            (-1, Cbor::Integer(5.into())),
            (0, text("voltage")),
            (1, text("V")),
            (2, Cbor::Float(120.1)),
        ])];
        for (t, v) in [
            (-5, 1.2),
            (-4, 1.3),
            (-3, 1.4),
            (-2, 1.5),
            (-1, 1.6),
            (0, 1.7),
        ] {
            records.push(cbor_record(vec![
                (0, text("current")),
                (6, Cbor::Integer(t.into())),
                (2, Cbor::Float(v)),
            ]));
        }
        assert_eq!(
            by_time(decode(&cbor(&Cbor::Array(records))).unwrap()),
            rfc_timed_expected()
        );
    }

    #[test]
    fn hand_written_cbor_labels() {
        // [{-2: "d/", 0: "t", 2: 21.5 (half float), 6: 1700000000},
        //  {0: "h", 2: 40, 6: 1700000000}]
        let bytes = [
            0x82, //
            0xa4, 0x21, 0x62, b'd', b'/', 0x00, 0x61, b't', 0x02, 0xf9, 0x4d, 0x60, 0x06, 0x1a,
            0x65, 0x53, 0xf1, 0x00, //
            0xa3, 0x00, 0x61, b'h', 0x02, 0x18, 0x28, 0x06, 0x1a, 0x65, 0x53, 0xf1, 0x00,
        ];
        let d = one(&bytes);
        assert_eq!(d.values, values(&[("d/h", 40.0), ("d/t", 21.5)]));
        assert_eq!(d.device_ts_ms, Some(1_700_000_000_000));
        assert!(!d.relative_time);

        // [{0: "a", 2: 4([-2, 2715])}]: a decimal fraction, 27.15, relative time.
        let d = one(&[
            0x81, 0xa2, 0x00, 0x61, b'a', 0x02, 0xc4, 0x82, 0x21, 0x19, 0x0a, 0x9b,
        ]);
        assert_eq!(d.values, values(&[("a", 27.15)]));
        assert_eq!(d.device_ts_ms, Some(NOW_MS));

        // An indefinite-length array: [_ {2: 1}].
        assert_eq!(
            one(&[0x9f, 0xa1, 0x02, 0x01, 0xff]).values,
            values(&[("value", 1.0)])
        );
        // [{2: 1, 9: 0}]: an integer label outside Table 4.
        assert!(matches!(
            decode(&[0x81, 0xa2, 0x02, 0x01, 0x09, 0x00]),
            Err(DecodeError::Shape(m)) if m.contains("unknown SenML label 9")
        ));
        // [{2: 1, "x": 0}]: a text key is an extension and ignored.
        assert_eq!(
            one(&[0x81, 0xa2, 0x02, 0x01, 0x61, b'x', 0x00]).values,
            values(&[("value", 1.0)])
        );
        // [{"v": 1}]: JSON names are not CBOR labels.
        assert!(matches!(
            decode(&[0x81, 0xa1, 0x61, b'v', 0x01]),
            Err(DecodeError::Shape(m)) if m.contains("no SenML field")
        ));
        // [{0: 1, 2: 1}]: a name that is not text.
        assert!(matches!(
            decode(&[0x81, 0xa2, 0x00, 0x01, 0x02, 0x01]),
            Err(DecodeError::Shape(m)) if m.contains("\"n\" is a number")
        ));
    }

    #[test]
    fn bad_cbor_is_malformed() {
        // Truncated: the array promises two records.
        assert!(matches!(
            decode(&[0x82, 0xa1, 0x02, 0x01]),
            Err(DecodeError::Malformed(_))
        ));
        // Trailing bytes after a complete array.
        assert!(matches!(
            decode(&[0x81, 0xa1, 0x02, 0x01, 0x00]),
            Err(DecodeError::Malformed(m)) if m.contains("1 bytes after")
        ));
        // A byte string claiming 2^63 bytes.
        let huge = [0x81, 0xa1, 0x08, 0x5b, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(decode(&huge), Err(DecodeError::Malformed(_))));
        // Nesting far past the limit.
        let deep = vec![0x81; 100_000];
        assert!(matches!(
            decode_payload(&deep, deep.len(), NOW_MS),
            Err(DecodeError::Malformed(m)) if m.contains("nested")
        ));
        // Records that are not maps.
        assert!(matches!(decode(&[0x81, 0x01]), Err(DecodeError::Shape(_))));
    }

    #[test]
    fn senml_relative_time() {
        let all = decode(br#"[{"n":"a","v":1,"t":-5},{"n":"a","v":2},{"n":"a","v":3,"t":0.25}]"#)
            .unwrap();
        assert!(all.iter().all(|d| d.relative_time));
        assert_eq!(
            by_time(all),
            vec![
                (NOW_MS - 5000, values(&[("a", 1.0)])),
                (NOW_MS, values(&[("a", 2.0)])),
                (NOW_MS + 250, values(&[("a", 3.0)])),
            ]
        );
        // bt + t just below 2^28 is still relative; at 2^28 it is absolute.
        let d = one(br#"[{"bt":268435455,"v":1}]"#);
        assert_eq!(d.device_ts_ms, Some(NOW_MS + 268_435_455_000));
        assert!(d.relative_time);
        let d = one(br#"[{"bt":268435457,"t":-1,"v":1}]"#);
        assert_eq!(d.device_ts_ms, Some(268_435_456_000));
        assert!(!d.relative_time);
        assert!(matches!(
            decode(br#"[{"t":-1e10,"v":1}]"#),
            Err(DecodeError::Shape(m)) if m.contains("before the Unix epoch")
        ));
        assert!(matches!(
            decode(br#"[{"bt":1e300,"v":1}]"#),
            Err(DecodeError::Shape(m)) if m.contains("out of range")
        ));
    }

    #[test]
    fn senml_base_name_and_value_resolution() {
        // RFC 8428 section 5.1.6: the last record keeps the second base name
        // and the first base time.
        let d = one(br#"[
              {"bn":"2001:db8::2/","bt":1.320078429e+09,"n":"temperature","u":"Cel","v":25.2},
              {"n":"humidity","u":"%RH","v":30},
              {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
              {"n":"humidity","u":"%RH","v":67}
            ]"#);
        assert_eq!(d.device_ts_ms, Some(1_320_078_429_000));
        assert_eq!(
            d.values,
            values(&[
                ("2001:db8::1/humidity", 67.0),
                ("2001:db8::1/temperature", 12.3),
                ("2001:db8::2/humidity", 30.0),
                ("2001:db8::2/temperature", 25.2),
            ])
        );
        // bv applies from its record on, until replaced; a header record
        // without a value only sets bases; no name at all reads as "value".
        let d = one(br#"[
              {"bn":"dev/","bv":100},
              {"n":"a","v":1},
              {"n":"b","v":-2.5},
              {"bv":-10,"n":"c","v":3},
              {"bn":"","v":4}
            ]"#);
        assert_eq!(
            d.values,
            values(&[
                ("dev/a", 101.0),
                ("dev/b", 97.5),
                ("dev/c", -7.0),
                ("value", -6.0)
            ])
        );
        // A record with bv but no v carries no value.
        assert_eq!(decode(br#"[{"n":"a","bv":5}]"#), Err(DecodeError::Empty));
    }

    #[test]
    fn senml_non_numeric_records() {
        // RFC 8428 section 5.1.5: only the numeric record is kept.
        let d = one(br#"[
              {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
              {"n":"label","vs":"Machine Room"},
              {"n":"open","vb":false},
              {"n":"nfv-reader","vd":"aGkgCg"}
            ]"#);
        assert_eq!(
            d.values,
            values(&[("urn:dev:ow:10e2073a01080063:temp", 23.1)])
        );
        assert_eq!(
            decode(br#"[{"n":"label","vs":"x"},{"n":"open","vb":true},{"n":"s","s":5}]"#),
            Err(DecodeError::Empty)
        );
        assert!(matches!(
            decode(br#"[{"n":"a","v":1,"vs":"x"}]"#),
            Err(DecodeError::Shape(m)) if m.contains("more than one")
        ));
        assert!(matches!(
            decode(br#"[{"n":"a","vb":"yes"}]"#),
            Err(DecodeError::Shape(m)) if m.contains("\"vb\" is a string")
        ));
    }

    #[test]
    fn senml_rules_beyond_resolution() {
        // Unknown fields are ignored, must-understand ones rejected.
        assert_eq!(
            one(br#"[{"n":"a","v":1,"x":"y"}]"#).values,
            values(&[("a", 1.0)])
        );
        assert!(matches!(
            decode(br#"[{"n":"a","v":1,"rt_":"y"}]"#),
            Err(DecodeError::Shape(m)) if m.contains("must-understand")
        ));
        // Version 5 (the RFC examples) is fine; above 10 is not.
        assert!(matches!(
            decode(br#"[{"bver":11,"n":"a","v":1}]"#),
            Err(DecodeError::Shape(m)) if m.contains("version")
        ));
        // Same name at the same time (RFC 8428 section 5.1.3 tells lon/lat
        // apart by unit only).
        assert!(matches!(
            decode(br#"[{"bn":"d","bt":1.320067464e+09,"bu":"%RH","v":20},{"u":"lon","v":24.30621}]"#),
            Err(DecodeError::Shape(m)) if m.contains("second value for \"d\"")
        ));
        // A flat object mixed into a pack.
        assert!(matches!(
            decode(br#"[{"n":"a","v":1},{"temp":2}]"#),
            Err(DecodeError::Shape(m)) if m.contains("record 1 has no SenML field")
        ));
        assert!(matches!(
            decode(br#"[{"n":"a","v":1},3]"#),
            Err(DecodeError::Shape(m)) if m.contains("record 1 is a number")
        ));
    }

    #[test]
    fn non_finite_numbers() {
        // SenML JSON: v + bv overflows.
        assert_eq!(
            decode(br#"[{"n":"a","bv":1e308,"v":1e308}]"#),
            Err(DecodeError::NonFinite("[0].v".into()))
        );
        assert_eq!(
            decode(br#"[{"n":"a","v":1},{"bt":1e308,"t":1e308,"v":1}]"#),
            Err(DecodeError::NonFinite("[1].t".into()))
        );
        // SenML CBOR: [{0: "a", 2: NaN}], [{0: "a", 2: -inf}], [{-5: inf}, ...].
        assert_eq!(
            decode(&[0x81, 0xa2, 0x00, 0x61, b'a', 0x02, 0xf9, 0x7e, 0x00]),
            Err(DecodeError::NonFinite("[0].v".into()))
        );
        assert_eq!(
            decode(&[0x81, 0xa2, 0x00, 0x61, b'a', 0x02, 0xf9, 0xfc, 0x00]),
            Err(DecodeError::NonFinite("[0].v".into()))
        );
        assert_eq!(
            decode(&[0x82, 0xa1, 0x24, 0xf9, 0x7c, 0x00, 0xa1, 0x02, 0x01]),
            Err(DecodeError::NonFinite("[0].bv".into()))
        );
        assert_eq!(
            decode(&[0x81, 0xa2, 0x02, 0x01, 0x06, 0xf9, 0x7e, 0x00]),
            Err(DecodeError::NonFinite("[0].t".into()))
        );
        assert!(matches!(decode(b"inf"), Err(DecodeError::NonFinite(_))));
    }

    /// One generated SenML record: `(JSON name, CBOR label, value)` per field.
    fn senml_record() -> impl Strategy<Value = Vec<(&'static str, i64, Field)>> {
        let time = prop_oneof![
            (-100i32..100).prop_map(f64::from),
            1.6e9f64..1.8e9,
            Just(0.5),
        ];
        (
            proptest::option::of("[a-z]{0,3}/?"),
            proptest::option::of(time),
            proptest::option::of(-1e6f64..1e6),
            proptest::option::of("[a-z]{0,3}"),
            proptest::option::of("[A-Za-z%]{1,3}"),
            proptest::option::weighted(0.8, -1e9f64..1e9),
            proptest::option::of(-1e3f64..1e3),
            proptest::option::weighted(0.1, "[a-z]{0,4}"),
        )
            .prop_map(|(bn, bt, bv, n, u, v, t, vs)| {
                let mut fields = Vec::new();
                let mut text = |name, label, s: Option<String>| {
                    if let Some(s) = s {
                        fields.push((name, label, Field::Text(s)));
                    }
                };
                text("bn", -2, bn);
                text("n", 0, n);
                text("u", 1, u);
                text("vs", 3, vs);
                for (name, label, x) in [("bt", -3, bt), ("bv", -5, bv), ("v", 2, v), ("t", 6, t)] {
                    if let Some(x) = x {
                        fields.push((name, label, Field::Number(x)));
                    }
                }
                fields
            })
    }

    fn senml_json(pack: &[Vec<(&'static str, i64, Field)>]) -> Vec<u8> {
        let records: Vec<serde_json::Value> = pack
            .iter()
            .map(|fields| {
                let mut obj = serde_json::Map::new();
                for (name, _, field) in fields {
                    let v = match field {
                        Field::Number(x) => json!(x),
                        Field::Text(s) => json!(s),
                        other => panic!("generator made {other:?}"),
                    };
                    obj.insert((*name).to_owned(), v);
                }
                serde_json::Value::Object(obj)
            })
            .collect();
        serde_json::to_vec(&records).unwrap()
    }

    fn senml_cbor(pack: &[Vec<(&'static str, i64, Field)>]) -> Vec<u8> {
        let records = pack
            .iter()
            .map(|fields| {
                cbor_record(
                    fields
                        .iter()
                        .map(|(_, label, field)| {
                            let v = match field {
                                Field::Number(x) => Cbor::Float(*x),
                                Field::Text(s) => Cbor::Text(s.clone()),
                                other => panic!("generator made {other:?}"),
                            };
                            (*label, v)
                        })
                        .collect(),
                )
            })
            .collect();
        cbor(&Cbor::Array(records))
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_payload(&bytes, 128, NOW_MS);
        }

        #[test]
        fn never_panics_on_arbitrary_cbor(
            head in 0x80u8..=0x9f,
            rest in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut bytes = vec![head];
            bytes.extend(rest);
            let _ = decode_payload(&bytes, 512, NOW_MS);
        }

        #[test]
        fn finite_object_round_trips(fields in proptest::collection::btree_map("[a-z]{1,8}", -1e12f64..1e12, 1..6)) {
            let fields: BTreeMap<String, f64> = fields
                .into_iter()
                .filter(|(k, _)| !TS_FIELDS.contains(&k.as_str()) && !ID_FIELDS.contains(&k.as_str()) && k != "unit")
                .collect();
            prop_assume!(!fields.is_empty());
            let body = serde_json::to_vec(&fields).unwrap();
            let d = decode_payload(&body, body.len(), NOW_MS).unwrap();
            prop_assert_eq!(d.len(), 1);
            prop_assert_eq!(&d[0].values, &fields);
        }

        #[test]
        fn flat_array_round_trips(
            objects in proptest::collection::vec(
                proptest::collection::btree_map("x[a-z]{0,6}", -1e12f64..1e12, 1..5),
                1..5,
            ),
        ) {
            let body = serde_json::to_vec(&objects).unwrap();
            let d = decode_payload(&body, body.len(), NOW_MS).unwrap();
            let got: Vec<_> = d.into_iter().map(|d| d.values).collect();
            prop_assert_eq!(got, objects);
        }

        #[test]
        fn senml_pack_decodes_to_records_grouped_by_time(
            records in proptest::collection::btree_map(("[a-z]{1,6}", 0u32..8), -1_000_000i32..1_000_000, 1..24)
                .prop_map(|m| m.into_iter().collect::<Vec<_>>())
                .prop_shuffle(),
            bt in 1_600_000_000u32..1_800_000_000,
            bv in -1000i32..1000,
        ) {
            let pack: Vec<serde_json::Value> = records
                .iter()
                .enumerate()
                .map(|(i, ((name, t), v))| {
                    let mut r = json!({"n": name, "t": t, "v": f64::from(*v) - f64::from(bv)});
                    if i == 0 {
                        r["bn"] = json!("dev/");
                        r["bt"] = json!(bt);
                        r["bv"] = json!(bv);
                    }
                    r
                })
                .collect();
            let body = serde_json::to_vec(&pack).unwrap();
            let mut want: BTreeMap<i64, BTreeMap<String, f64>> = BTreeMap::new();
            for ((name, t), v) in &records {
                want.entry((i64::from(bt) + i64::from(*t)) * 1000)
                    .or_default()
                    .insert(format!("dev/{name}"), f64::from(*v));
            }
            let got = decode_payload(&body, body.len(), NOW_MS).unwrap();
            prop_assert!(got.iter().all(|d| !d.relative_time && d.producer_id.is_none()));
            prop_assert_eq!(by_time(got), want.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn senml_cbor_decodes_like_json(
            pack in proptest::collection::vec(senml_record(), 0..8),
            now in 0i64..4_000_000_000_000,
        ) {
            let json = senml_json(&pack);
            let cbor = senml_cbor(&pack);
            let from_json = decode_payload(&json, json.len(), now);
            let from_cbor = decode_payload(&cbor, cbor.len(), now);
            prop_assert_eq!(from_cbor, from_json);
        }
    }
}
