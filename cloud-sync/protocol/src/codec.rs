//! Compact binary encoding of an [`UploadBatch`] (media type [`MEDIA_TYPE`]),
//! meant to be zstd-compressed on the wire (`Content-Encoding: zstd`).
//!
//! Owns the byte layout only: no I/O, no compression. Invariants:
//! - `decode_batch(&encode_batch(b)) == b` for every batch, bit-exact for
//!   every `f64` (including `-0.0`, infinities, subnormals and NaN payloads),
//!   with readings, predictions and dead letters in their original order.
//! - [`decode_batch`] never panics and never allocates in proportion to a
//!   count it has not seen the bytes for: every count is checked against
//!   the bytes that remain (each counted item needs at least one byte) and
//!   against [`MAX_ROWS`].
//!
//! # Layout (version 1)
//!
//! Integers are LEB128 varints (`uvarint`, at most 10 bytes); signed ones
//! are zigzag-mapped first (`svarint`); arithmetic on deltas wraps, so every
//! 64-bit value round-trips. A `str` is a `uvarint` byte length and UTF-8.
//!
//! ```text
//! batch        = "EDGB" version:u8(=1) readings predictions dead_letters
//! readings     = rows:uvarint groups:uvarint group* order
//! group        = source:str stream:str n:uvarint(>=1)
//!                seq:svarint-delta[n] recv_ts_ms:svarint-dod[n]
//!                device_ts_ms:(flags[n] svarint-dod[present])
//!                clock_ok:flags[n]
//!                names:uvarint name:str*        (strictly ascending, byte order)
//!                per name: flags[n] floats[present]
//! order        = 0                               (groups are contiguous, in order)
//!              | 1 group_index:uvarint[rows]     (the group of each reading, in batch order)
//! flags[n]     = 0 (all false) | 1 (all true) | 2 bitmap:ceil(n/8) bytes, LSB first
//! floats[m]    = 0 scale:u8 svarint-delta[m]     (value = integer / 10^scale, exact)
//!              | 1 xor[m]                        (bits XOR previous bits, Gorilla-style:
//!                                                 control byte = leading_zero_bytes << 4
//!                                                 | trailing_zero_bytes, then the
//!                                                 remaining bytes, most significant first)
//! predictions  = rows:uvarint (model:str model_version:str model_sha256:str seq:uvarint
//!                source:str stream:str window_end_seq:uvarint window_end_ts_ms:opt
//!                score:f64le threshold:f64le is_anomaly:u8 created_ms:svarint)*
//! dead_letters = rows:uvarint (seq:uvarint topic:str reason:str detail:str
//!                payload_b64:str payload_len:uvarint recv_ts_ms:svarint)*
//! opt          = 0 | 1 svarint
//! ```
//!
//! `svarint-delta` stores each value minus the previous one (the first minus
//! 0); `svarint-dod` stores the first value, the first delta, then each
//! delta minus the previous delta, so regularly sampled timestamps cost one
//! byte each before compression. Readings are grouped per `(source,
//! stream)` in order of first appearance; a group's value names are the
//! union of its readings' names. Decimal scaling is used for a column only
//! when every value in it round-trips exactly through `integer / 10^scale`;
//! otherwise the XOR form keeps the raw bits.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{DeadLetterRecord, Prediction, Reading, UploadBatch};

/// Media type of a compact batch body (`Content-Type`).
pub const MEDIA_TYPE: &str = "application/vnd.edge-batch.v1";

/// Layout version written by [`encode_batch`] and the only one decoded.
pub const VERSION: u8 = 1;

/// Most readings, predictions or dead letters one compact batch may carry
/// (each list separately): bounds what a small, dense body can make the
/// decoder allocate.
pub const MAX_ROWS: usize = 200_000;

/// First bytes of every compact batch.
const MAGIC: &[u8; 4] = b"EDGB";

/// Largest decimal scale tried (`10^18` is exact in `f64`).
const MAX_SCALE: u8 = 18;

/// `10^i`, exact in `f64` for every index.
const POW10: [f64; MAX_SCALE as usize + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18,
];

/// Integers up to this magnitude are exact in `f64`.
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;

const FLAGS_NONE: u8 = 0;
const FLAGS_ALL: u8 = 1;
const FLAGS_BITMAP: u8 = 2;
const FLOATS_DECIMAL: u8 = 0;
const FLOATS_XOR: u8 = 1;
const ORDER_CONTIGUOUS: u8 = 0;
const ORDER_INDEXED: u8 = 1;

/// Why a body is not a valid compact batch. `offset` is where in the body
/// the problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The body does not start with the compact batch magic bytes.
    #[error("not a compact batch: missing magic bytes")]
    BadMagic,
    /// The body is a compact batch of another layout version.
    #[error("unsupported compact batch version {version} (supported: {VERSION})")]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// The body ended in the middle of an item.
    #[error("body truncated in {what} at offset {offset}")]
    Truncated {
        /// The item being read.
        what: &'static str,
        /// Body length.
        offset: usize,
    },
    /// A varint is longer than 10 bytes or does not fit 64 bits.
    #[error("invalid varint in {what} at offset {offset}")]
    BadVarint {
        /// The item being read.
        what: &'static str,
        /// Where the varint starts.
        offset: usize,
    },
    /// A count is larger than the remaining bytes could hold, or than [`MAX_ROWS`].
    #[error("{what} count {count} at offset {offset} exceeds the limit of {limit}")]
    TooMany {
        /// The counted item.
        what: &'static str,
        /// The count found.
        count: u64,
        /// The limit it broke.
        limit: u64,
        /// Where the count was read.
        offset: usize,
    },
    /// A string is not UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    BadUtf8 {
        /// The string being read.
        what: &'static str,
        /// Where its bytes start.
        offset: usize,
    },
    /// A mode or flag byte has an unknown value.
    #[error("unknown {what} mode {mode} at offset {offset}")]
    BadMode {
        /// The item whose mode it is.
        what: &'static str,
        /// The byte found.
        mode: u8,
        /// Where it was read.
        offset: usize,
    },
    /// A value is outside its allowed range (decimal scale, group index,
    /// control byte, zero-row group, row totals that do not add up).
    #[error("{what} value {value} at offset {offset} is out of range")]
    OutOfRange {
        /// The item being read.
        what: &'static str,
        /// The value found.
        value: u64,
        /// Where it was read.
        offset: usize,
    },
    /// Value names of a group are not strictly ascending (or repeat).
    #[error("value name {name:?} at offset {offset} is out of order or repeated")]
    UnsortedNames {
        /// The offending name.
        name: String,
        /// Where it was read.
        offset: usize,
    },
    /// Bytes remain after the batch.
    #[error("{count} unexpected bytes after the batch")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}

/// Encodes a batch in the compact layout (see the module docs).
#[must_use]
pub fn encode_batch(batch: &UploadBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + batch.readings.len() * 8);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    encode_readings(&mut out, &batch.readings);
    put_uvarint(&mut out, len_u64(batch.predictions.len()));
    for p in &batch.predictions {
        put_str(&mut out, &p.model);
        put_str(&mut out, &p.model_version);
        put_str(&mut out, &p.model_sha256);
        put_uvarint(&mut out, p.seq);
        put_str(&mut out, &p.source);
        put_str(&mut out, &p.stream);
        put_uvarint(&mut out, p.window_end_seq);
        put_opt_i64(&mut out, p.window_end_ts_ms);
        out.extend_from_slice(&p.score.to_le_bytes());
        out.extend_from_slice(&p.threshold.to_le_bytes());
        out.push(u8::from(p.is_anomaly));
        put_svarint(&mut out, p.created_ms);
    }
    put_uvarint(&mut out, len_u64(batch.dead_letters.len()));
    for d in &batch.dead_letters {
        put_uvarint(&mut out, d.seq);
        put_str(&mut out, &d.topic);
        put_str(&mut out, &d.reason);
        put_str(&mut out, &d.detail);
        put_str(&mut out, &d.payload_b64);
        put_uvarint(&mut out, d.payload_len);
        put_svarint(&mut out, d.recv_ts_ms);
    }
    out
}

/// Decodes a compact batch.
///
/// # Errors
/// A [`CodecError`] naming what is wrong and where; the input is never
/// trusted (see the module invariants).
pub fn decode_batch(bytes: &[u8]) -> Result<UploadBatch, CodecError> {
    let mut r = Reader { bytes, pos: 0 };
    if r.take(MAGIC.len(), "magic").ok() != Some(&MAGIC[..]) {
        return Err(CodecError::BadMagic);
    }
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(CodecError::UnsupportedVersion { version });
    }
    let readings = decode_readings(&mut r)?;
    let count = r.count("predictions", 1)?;
    let mut predictions = Vec::new();
    for _ in 0..count {
        predictions.push(Prediction {
            model: r.string("prediction model")?,
            model_version: r.string("prediction model_version")?,
            model_sha256: r.string("prediction model_sha256")?,
            seq: r.uvarint("prediction seq")?,
            source: r.string("prediction source")?,
            stream: r.string("prediction stream")?,
            window_end_seq: r.uvarint("prediction window_end_seq")?,
            window_end_ts_ms: r.opt_i64("prediction window_end_ts_ms")?,
            score: r.f64_le("prediction score")?,
            threshold: r.f64_le("prediction threshold")?,
            is_anomaly: r.bool("prediction is_anomaly")?,
            created_ms: r.svarint("prediction created_ms")?,
        });
    }
    let count = r.count("dead_letters", 1)?;
    let mut dead_letters = Vec::new();
    for _ in 0..count {
        dead_letters.push(DeadLetterRecord {
            seq: r.uvarint("dead letter seq")?,
            topic: r.string("dead letter topic")?,
            reason: r.string("dead letter reason")?,
            detail: r.string("dead letter detail")?,
            payload_b64: r.string("dead letter payload_b64")?,
            payload_len: r.uvarint("dead letter payload_len")?,
            recv_ts_ms: r.svarint("dead letter recv_ts_ms")?,
        });
    }
    if r.remaining() > 0 {
        return Err(CodecError::TrailingBytes {
            count: r.remaining(),
        });
    }
    Ok(UploadBatch {
        readings,
        predictions,
        dead_letters,
    })
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- readings

fn encode_readings(out: &mut Vec<u8>, readings: &[Reading]) {
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    let mut groups: Vec<Vec<&Reading>> = Vec::new();
    let mut order = Vec::with_capacity(readings.len());
    for r in readings {
        let next = groups.len();
        let g = *index
            .entry((r.source.as_str(), r.stream.as_str()))
            .or_insert(next);
        if g == next {
            groups.push(Vec::new());
        }
        if let Some(group) = groups.get_mut(g) {
            group.push(r);
        }
        order.push(g);
    }
    put_uvarint(out, len_u64(readings.len()));
    put_uvarint(out, len_u64(groups.len()));
    for group in &groups {
        encode_group(out, group);
    }
    // Groups are numbered by first appearance, so the readings are
    // contiguous per group exactly when the indices never decrease.
    if order.windows(2).all(|w| w[0] <= w[1]) {
        out.push(ORDER_CONTIGUOUS);
    } else {
        out.push(ORDER_INDEXED);
        for g in order {
            put_uvarint(out, len_u64(g));
        }
    }
}

fn encode_group(out: &mut Vec<u8>, rows: &[&Reading]) {
    let Some(first) = rows.first() else {
        return;
    };
    put_str(out, &first.source);
    put_str(out, &first.stream);
    put_uvarint(out, len_u64(rows.len()));
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq as i64).collect();
    put_deltas(out, &seqs);
    let recv: Vec<i64> = rows.iter().map(|r| r.recv_ts_ms).collect();
    put_dod(out, &recv);
    put_flags(out, rows.iter().map(|r| r.device_ts_ms.is_some()));
    let device_ts: Vec<i64> = rows.iter().filter_map(|r| r.device_ts_ms).collect();
    put_dod(out, &device_ts);
    put_flags(out, rows.iter().map(|r| r.clock_ok));
    let names: BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.values.keys().map(String::as_str))
        .collect();
    put_uvarint(out, len_u64(names.len()));
    for name in &names {
        put_str(out, name);
    }
    for name in &names {
        put_flags(out, rows.iter().map(|r| r.values.contains_key(*name)));
        let values: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.values.get(*name).copied())
            .collect();
        put_floats(out, &values);
    }
}

fn decode_readings(r: &mut Reader<'_>) -> Result<Vec<Reading>, CodecError> {
    let total_at = r.pos;
    let total = r.count("readings", 1)?;
    let group_count = r.count("reading groups", 3)?;
    let mut groups: Vec<std::vec::IntoIter<Reading>> = Vec::new();
    let mut sum = 0usize;
    for _ in 0..group_count {
        let group = decode_group(r, total - sum)?;
        sum += group.len();
        groups.push(group.into_iter());
    }
    if sum != total {
        return Err(CodecError::OutOfRange {
            what: "reading total",
            value: len_u64(total),
            offset: total_at,
        });
    }
    let order_at = r.pos;
    let mode = r.u8("reading order")?;
    match mode {
        ORDER_CONTIGUOUS => Ok(groups.into_iter().flatten().collect()),
        ORDER_INDEXED => {
            let mut readings = Vec::new();
            for _ in 0..total {
                let at = r.pos;
                let g = r.uvarint("reading group index")?;
                let next = usize::try_from(g)
                    .ok()
                    .and_then(|g| groups.get_mut(g))
                    .and_then(Iterator::next)
                    .ok_or(CodecError::OutOfRange {
                        what: "reading group index",
                        value: g,
                        offset: at,
                    })?;
                readings.push(next);
            }
            Ok(readings)
        }
        mode => Err(CodecError::BadMode {
            what: "reading order",
            mode,
            offset: order_at,
        }),
    }
}

fn decode_group(r: &mut Reader<'_>, rows_left: usize) -> Result<Vec<Reading>, CodecError> {
    let source = r.string("reading source")?;
    let stream = r.string("reading stream")?;
    let n_at = r.pos;
    let n = r.count("group rows", 1)?;
    if n == 0 || n > rows_left {
        return Err(CodecError::OutOfRange {
            what: "group rows",
            value: len_u64(n),
            offset: n_at,
        });
    }
    let seqs = r.deltas(n, "reading seq")?;
    let recv = r.dod(n, "reading recv_ts_ms")?;
    let has_device_ts = r.flags(n, "reading device_ts_ms")?;
    let present = has_device_ts.iter().filter(|p| **p).count();
    let device_ts = r.dod(present, "reading device_ts_ms")?;
    let clock_ok = r.flags(n, "reading clock_ok")?;
    let name_count = r.count("value names", 1)?;
    let mut names: Vec<String> = Vec::new();
    for _ in 0..name_count {
        let at = r.pos;
        let name = r.string("value name")?;
        if names.last().is_some_and(|last| *last >= name) {
            return Err(CodecError::UnsortedNames { name, offset: at });
        }
        names.push(name);
    }
    let mut values: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); n];
    for name in &names {
        let has = r.flags(n, "value presence")?;
        let present = has.iter().filter(|p| **p).count();
        let column = r.floats(present, "values")?;
        let mut column = column.into_iter();
        for (map, _) in values.iter_mut().zip(&has).filter(|(_, has)| **has) {
            if let Some(value) = column.next() {
                map.insert(name.clone(), value);
            }
        }
    }
    let mut device_ts = device_ts.into_iter();
    let rows = seqs
        .into_iter()
        .zip(recv)
        .zip(has_device_ts)
        .zip(clock_ok)
        .zip(values)
        .map(
            |((((seq, recv_ts_ms), has_ts), clock_ok), values)| Reading {
                source: source.clone(),
                stream: stream.clone(),
                seq: seq as u64,
                device_ts_ms: if has_ts { device_ts.next() } else { None },
                recv_ts_ms,
                clock_ok,
                values,
            },
        )
        .collect();
    Ok(rows)
}

// ----------------------------------------------------------------- writing

fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

fn put_svarint(out: &mut Vec<u8>, value: i64) {
    put_uvarint(out, zigzag(value));
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_uvarint(out, len_u64(text.len()));
    out.extend_from_slice(text.as_bytes());
}

fn put_opt_i64(out: &mut Vec<u8>, value: Option<i64>) {
    match value {
        None => out.push(0),
        Some(value) => {
            out.push(1);
            put_svarint(out, value);
        }
    }
}

fn put_deltas(out: &mut Vec<u8>, values: &[i64]) {
    let mut prev = 0i64;
    for &v in values {
        put_svarint(out, v.wrapping_sub(prev));
        prev = v;
    }
}

fn put_dod(out: &mut Vec<u8>, values: &[i64]) {
    let (mut prev, mut prev_delta) = (0i64, 0i64);
    for (i, &v) in values.iter().enumerate() {
        let delta = v.wrapping_sub(prev);
        if i < 2 {
            put_svarint(out, delta);
        } else {
            put_svarint(out, delta.wrapping_sub(prev_delta));
        }
        prev = v;
        prev_delta = delta;
    }
}

fn put_flags(out: &mut Vec<u8>, flags: impl Iterator<Item = bool> + Clone) {
    if flags.clone().all(|f| !f) {
        out.push(FLAGS_NONE);
    } else if flags.clone().all(|f| f) {
        out.push(FLAGS_ALL);
    } else {
        out.push(FLAGS_BITMAP);
        let mut byte = 0u8;
        let mut bit = 0;
        for flag in flags {
            byte |= u8::from(flag) << bit;
            bit += 1;
            if bit == 8 {
                out.push(byte);
                byte = 0;
                bit = 0;
            }
        }
        if bit > 0 {
            out.push(byte);
        }
    }
}

/// `integer / 10^scale`, the decoder's formula for decimal columns.
fn from_decimal(integer: i64, scale: u8) -> f64 {
    integer as f64 / POW10[usize::from(scale.min(MAX_SCALE))]
}

/// The integer that `value` is at `scale`, if it round-trips bit-exactly.
fn to_decimal(value: f64, scale: u8) -> Option<i64> {
    let scaled = (value * POW10[usize::from(scale)]).round();
    if scaled.is_nan() || scaled.abs() > MAX_EXACT_INT {
        return None;
    }
    let integer = scaled as i64;
    (from_decimal(integer, scale).to_bits() == value.to_bits()).then_some(integer)
}

/// The smallest scale at which every value is an exact decimal, if any.
fn decimal_scale(values: &[f64]) -> Option<(u8, Vec<i64>)> {
    (0..=MAX_SCALE).find_map(|scale| {
        let integers: Option<Vec<i64>> = values.iter().map(|v| to_decimal(*v, scale)).collect();
        integers.map(|integers| (scale, integers))
    })
}

fn put_floats(out: &mut Vec<u8>, values: &[f64]) {
    if let Some((scale, integers)) = decimal_scale(values) {
        out.push(FLOATS_DECIMAL);
        out.push(scale);
        put_deltas(out, &integers);
        return;
    }
    out.push(FLOATS_XOR);
    let mut prev = 0u64;
    for v in values {
        let bits = v.to_bits();
        let xor = bits ^ prev;
        prev = bits;
        if xor == 0 {
            out.push(8 << 4);
            continue;
        }
        let leading = (xor.leading_zeros() / 8) as u8;
        let trailing = (xor.trailing_zeros() / 8) as u8;
        out.push((leading << 4) | trailing);
        let bytes = xor.to_be_bytes();
        out.extend_from_slice(&bytes[usize::from(leading)..8 - usize::from(trailing)]);
    }
}

// ----------------------------------------------------------------- reading

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(CodecError::Truncated {
                what,
                offset: self.bytes.len(),
            })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }

    fn bool(&mut self, what: &'static str) -> Result<bool, CodecError> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            mode => Err(CodecError::BadMode {
                what,
                mode,
                offset: at,
            }),
        }
    }

    fn uvarint(&mut self, what: &'static str) -> Result<u64, CodecError> {
        let start = self.pos;
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.u8(what)?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(CodecError::BadVarint {
                    what,
                    offset: start,
                });
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::BadVarint {
            what,
            offset: start,
        })
    }

    fn svarint(&mut self, what: &'static str) -> Result<i64, CodecError> {
        Ok(unzigzag(self.uvarint(what)?))
    }

    fn opt_i64(&mut self, what: &'static str) -> Result<Option<i64>, CodecError> {
        if self.bool(what)? {
            Ok(Some(self.svarint(what)?))
        } else {
            Ok(None)
        }
    }

    fn f64_le(&mut self, what: &'static str) -> Result<f64, CodecError> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8, what)?);
        Ok(f64::from_le_bytes(buf))
    }

    /// A count of items that each take at least `min_bytes` bytes.
    fn count(&mut self, what: &'static str, min_bytes: usize) -> Result<usize, CodecError> {
        let at = self.pos;
        let count = self.uvarint(what)?;
        let fits = self.remaining() / min_bytes.max(1);
        let limit = fits.min(MAX_ROWS);
        match usize::try_from(count) {
            Ok(n) if n <= limit => Ok(n),
            _ => Err(CodecError::TooMany {
                what,
                count,
                limit: len_u64(limit),
                offset: at,
            }),
        }
    }

    fn string(&mut self, what: &'static str) -> Result<String, CodecError> {
        let at = self.pos;
        let len = self.uvarint(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= self.remaining())
            .ok_or(CodecError::Truncated {
                what,
                offset: self.bytes.len(),
            })?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| CodecError::BadUtf8 { what, offset: at })
    }

    /// `n` items, each at least one byte: checked before anything is allocated.
    fn check_items(&self, n: usize, what: &'static str) -> Result<(), CodecError> {
        if n > self.remaining() {
            return Err(CodecError::Truncated {
                what,
                offset: self.bytes.len(),
            });
        }
        Ok(())
    }

    fn deltas(&mut self, n: usize, what: &'static str) -> Result<Vec<i64>, CodecError> {
        self.check_items(n, what)?;
        let mut out = Vec::with_capacity(n);
        let mut prev = 0i64;
        for _ in 0..n {
            prev = prev.wrapping_add(self.svarint(what)?);
            out.push(prev);
        }
        Ok(out)
    }

    fn dod(&mut self, n: usize, what: &'static str) -> Result<Vec<i64>, CodecError> {
        self.check_items(n, what)?;
        let mut out = Vec::with_capacity(n);
        let (mut prev, mut delta) = (0i64, 0i64);
        for i in 0..n {
            let read = self.svarint(what)?;
            delta = if i < 2 {
                read
            } else {
                delta.wrapping_add(read)
            };
            prev = prev.wrapping_add(delta);
            out.push(prev);
        }
        Ok(out)
    }

    /// `n` flags; `n` is already bounded by [`MAX_ROWS`].
    fn flags(&mut self, n: usize, what: &'static str) -> Result<Vec<bool>, CodecError> {
        let at = self.pos;
        match self.u8(what)? {
            FLAGS_NONE => Ok(vec![false; n]),
            FLAGS_ALL => Ok(vec![true; n]),
            FLAGS_BITMAP => {
                let bytes = self.take(n.div_ceil(8), what)?;
                Ok((0..n)
                    .map(|i| bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1))
                    .collect())
            }
            mode => Err(CodecError::BadMode {
                what,
                mode,
                offset: at,
            }),
        }
    }

    fn floats(&mut self, n: usize, what: &'static str) -> Result<Vec<f64>, CodecError> {
        let at = self.pos;
        match self.u8(what)? {
            FLOATS_DECIMAL => {
                let scale_at = self.pos;
                let scale = self.u8(what)?;
                if scale > MAX_SCALE {
                    return Err(CodecError::OutOfRange {
                        what: "decimal scale",
                        value: u64::from(scale),
                        offset: scale_at,
                    });
                }
                Ok(self
                    .deltas(n, what)?
                    .into_iter()
                    .map(|i| from_decimal(i, scale))
                    .collect())
            }
            FLOATS_XOR => {
                self.check_items(n, what)?;
                let mut out = Vec::with_capacity(n);
                let mut prev = 0u64;
                for _ in 0..n {
                    let control_at = self.pos;
                    let control = self.u8(what)?;
                    let (leading, trailing) =
                        (usize::from(control >> 4), usize::from(control & 0xf));
                    if leading + trailing > 8 {
                        return Err(CodecError::OutOfRange {
                            what: "xor control byte",
                            value: u64::from(control),
                            offset: control_at,
                        });
                    }
                    let mut bytes = [0u8; 8];
                    bytes[leading..8 - trailing]
                        .copy_from_slice(self.take(8 - leading - trailing, what)?);
                    prev ^= u64::from_be_bytes(bytes);
                    out.push(f64::from_bits(prev));
                }
                Ok(out)
            }
            mode => Err(CodecError::BadMode {
                what,
                mode,
                offset: at,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    fn reading(source: &str, stream: &str, seq: u64, ts: i64, values: &[(&str, f64)]) -> Reading {
        Reading {
            source: source.into(),
            stream: stream.into(),
            seq,
            device_ts_ms: Some(ts - 3),
            recv_ts_ms: ts,
            clock_ok: true,
            values: values.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    fn sample() -> UploadBatch {
        let mut readings = Vec::new();
        for i in 0..50u64 {
            let ts = 1_700_000_000_000 + i as i64 * 1000;
            let v = 20.0 + (i % 7) as f64 * 0.01;
            readings.push(reading("dev-001", "s", i + 1, ts, &[("a", v), ("b", -5.5)]));
            readings.push(reading("dev-002", "s", i + 1, ts + 1, &[("a", v * 3.0)]));
        }
        readings[7].device_ts_ms = None;
        readings[9].clock_ok = false;
        readings[11].values.insert("odd".into(), f64::MIN_POSITIVE);
        UploadBatch {
            readings,
            predictions: vec![Prediction {
                model: "iforest".into(),
                model_version: "1.0.0".into(),
                model_sha256: "ab".repeat(32),
                seq: 4,
                source: "dev-001".into(),
                stream: "s".into(),
                window_end_seq: 50,
                window_end_ts_ms: None,
                score: 0.25,
                threshold: f64::NEG_INFINITY,
                is_anomaly: true,
                created_ms: -1,
            }],
            dead_letters: vec![DeadLetterRecord {
                seq: 9,
                topic: "sensors/x/y".into(),
                reason: "malformed".into(),
                detail: "expected value ü".into(),
                payload_b64: "e30=".into(),
                payload_len: u64::MAX,
                recv_ts_ms: i64::MIN,
            }],
        }
    }

    #[test]
    fn sample_round_trips_and_is_small() {
        let batch = sample();
        let bytes = encode_batch(&batch);
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
        let json = serde_json::to_vec(&batch).unwrap();
        assert!(
            bytes.len() * 5 < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
        assert_eq!(
            decode_batch(&encode_batch(&UploadBatch::default())).unwrap(),
            UploadBatch::default()
        );
    }

    #[test]
    fn decimals_are_chosen_only_when_exact() {
        assert_eq!(decimal_scale(&[20.37, 1.5, -3.0]).map(|d| d.0), Some(2));
        assert_eq!(decimal_scale(&[73.967_322_07]).map(|d| d.0), Some(8));
        assert!(decimal_scale(&[-0.0]).is_none());
        assert!(decimal_scale(&[f64::NAN]).is_none());
        assert!(decimal_scale(&[f64::INFINITY]).is_none());
        assert!(decimal_scale(&[1e300]).is_none());
    }

    #[test]
    fn every_truncation_and_bad_header_is_an_error() {
        let bytes = encode_batch(&sample());
        for len in 0..bytes.len() {
            assert!(
                decode_batch(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode_batch(&longer),
            Err(CodecError::TrailingBytes { count: 1 })
        );
        assert_eq!(
            decode_batch(b"{\"readings\":[]}"),
            Err(CodecError::BadMagic)
        );
        assert_eq!(
            decode_batch(b"EDGB\x02"),
            Err(CodecError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn lying_counts_fail_without_allocating() {
        // 2^62 readings in a handful of bytes.
        let mut body = b"EDGB\x01".to_vec();
        put_uvarint(&mut body, 1 << 62);
        body.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_batch(&body),
            Err(CodecError::TooMany { .. })
        ));
        // A plausible count, but one huge group claiming all of it.
        let mut body = b"EDGB\x01".to_vec();
        put_uvarint(&mut body, 3);
        put_uvarint(&mut body, 1);
        put_str(&mut body, "a");
        put_str(&mut body, "b");
        put_uvarint(&mut body, 150_000);
        assert!(decode_batch(&body).is_err());
        // Overlong varint.
        let mut body = b"EDGB\x01".to_vec();
        body.extend_from_slice(&[0xff; 11]);
        assert!(matches!(
            decode_batch(&body),
            Err(CodecError::BadVarint { .. })
        ));
    }

    fn edge_f64() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>().prop_filter("NaN-free", |v| !v.is_nan()),
            (-1_000_000i64..1_000_000, 0u32..6).prop_map(|(i, e)| i as f64 / 10f64.powi(e as i32)),
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(f64::MAX),
            Just(f64::MIN),
            Just(f64::MIN_POSITIVE),
            Just(f64::EPSILON),
            Just(5e-324),
            Just(9_007_199_254_740_993.0),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("ü".to_owned()),
            ".{0,4}"
        ]
    }

    fn reading_strategy() -> impl Strategy<Value = Reading> {
        (
            prop_oneof![Just("dev-1".to_owned()), Just("dev-2".to_owned()), ".{0,3}"],
            prop_oneof![Just("s".to_owned()), Just("t".to_owned())],
            prop_oneof![any::<u64>(), 1u64..100],
            proptest::option::of(any::<i64>()),
            prop_oneof![any::<i64>(), 1_700_000_000_000i64..1_700_000_100_000],
            any::<bool>(),
            proptest::collection::btree_map(name(), edge_f64(), 0..4),
        )
            .prop_map(
                |(source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values)| Reading {
                    source,
                    stream,
                    seq,
                    device_ts_ms,
                    recv_ts_ms,
                    clock_ok,
                    values,
                },
            )
    }

    fn prediction_strategy() -> impl Strategy<Value = Prediction> {
        (
            (name(), name(), name(), any::<u64>(), name(), name()),
            (
                any::<u64>(),
                proptest::option::of(any::<i64>()),
                edge_f64(),
                edge_f64(),
                any::<bool>(),
                any::<i64>(),
            ),
        )
            .prop_map(
                |(
                    (model, model_version, model_sha256, seq, source, stream),
                    (window_end_seq, window_end_ts_ms, score, threshold, is_anomaly, created_ms),
                )| Prediction {
                    model,
                    model_version,
                    model_sha256,
                    seq,
                    source,
                    stream,
                    window_end_seq,
                    window_end_ts_ms,
                    score,
                    threshold,
                    is_anomaly,
                    created_ms,
                },
            )
    }

    fn dead_letter_strategy() -> impl Strategy<Value = DeadLetterRecord> {
        (
            any::<u64>(),
            name(),
            name(),
            ".{0,20}",
            name(),
            any::<u64>(),
            any::<i64>(),
        )
            .prop_map(
                |(seq, topic, reason, detail, payload_b64, payload_len, recv_ts_ms)| {
                    DeadLetterRecord {
                        seq,
                        topic,
                        reason,
                        detail,
                        payload_b64,
                        payload_len,
                        recv_ts_ms,
                    }
                },
            )
    }

    fn batch_strategy() -> impl Strategy<Value = UploadBatch> {
        (
            proptest::collection::vec(reading_strategy(), 0..40),
            proptest::collection::vec(prediction_strategy(), 0..4),
            proptest::collection::vec(dead_letter_strategy(), 0..4),
        )
            .prop_map(|(readings, predictions, dead_letters)| UploadBatch {
                readings,
                predictions,
                dead_letters,
            })
    }

    /// Bit-exact comparison (so `-0.0` and `0.0` differ).
    fn bits(batch: &UploadBatch) -> String {
        let mut text = format!("{batch:?}");
        for r in &batch.readings {
            for v in r.values.values() {
                text.push_str(&format!(",{:x}", v.to_bits()));
            }
        }
        for p in &batch.predictions {
            text.push_str(&format!(
                ",{:x},{:x}",
                p.score.to_bits(),
                p.threshold.to_bits()
            ));
        }
        text
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trips_bit_exact(batch in batch_strategy()) {
            let decoded = decode_batch(&encode_batch(&batch));
            prop_assert_eq!(decoded.as_ref().map(bits), Ok(bits(&batch)));
            prop_assert_eq!(decoded, Ok(batch));
        }

        #[test]
        fn sorted_regular_series_round_trip(
            start in any::<i64>(), step in 0i64..100_000, n in 1usize..300, seq0 in any::<u64>()
        ) {
            let readings: Vec<Reading> = (0..n)
                .map(|i| {
                    let ts = start.wrapping_add(step.wrapping_mul(i as i64));
                    reading("d", "s", seq0.wrapping_add(i as u64), ts, &[("v", i as f64 * 0.25)])
                })
                .collect();
            let batch = UploadBatch { readings, ..UploadBatch::default() };
            prop_assert_eq!(decode_batch(&encode_batch(&batch)), Ok(batch));
        }

        #[test]
        fn corrupted_bodies_never_panic(
            batch in batch_strategy(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut bytes = encode_batch(&batch);
            for (at, byte) in flips {
                let len = bytes.len();
                bytes[at % len] ^= byte;
            }
            let _ = decode_batch(&bytes);
            let len = bytes.len();
            let _ = decode_batch(&bytes[..cut % (len + 1)]);
        }

        #[test]
        fn random_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = b"EDGB\x01".to_vec();
            bytes.extend(tail);
            let _ = decode_batch(&bytes);
        }
    }
}
