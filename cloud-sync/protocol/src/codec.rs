//! Compact binary encoding of an [`UploadBatch`] (media type [`MEDIA_TYPE`],
//! layout version 3; versions 2 ([`MEDIA_TYPE_V2`]) and 1
//! ([`MEDIA_TYPE_V1`]) are still decoded and can still be written for clouds
//! that predate version 3 or 2), meant to be zstd-compressed on the wire
//! (`Content-Encoding: zstd`).
//!
//! Owns the byte layout only: no I/O, no compression. Invariants:
//! - `decode_batch(&encode_batch(b)) == b` for every batch, bit-exact for
//!   every `f64` (including `-0.0`, infinities, subnormals and NaN payloads),
//!   with readings, predictions and dead letters in their original order.
//!   Versions 1 and 2 have no place for a prediction's `label` and
//!   `probabilities`: [`encode_batch_v2`] and [`encode_batch_v1`] leave them
//!   out, and decoding those versions gives `None` and an empty list.
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
//!
//! # Layout (version 2)
//!
//! As version 1 (version byte 2), except inside a reading group, where the
//! device timestamps come before the receive timestamps, the receive
//! timestamps may be stored as lags behind the device timestamps, and value
//! columns have two more forms:
//!
//! ```text
//! group        = source:str stream:str n:uvarint(>=1)
//!                seq:svarint-delta[n]
//!                device_ts_ms:(flags[n] svarint-dod[present])
//!                recv_ts_ms:(0 svarint-dod[n]
//!                          | 1 base:svarint lag:uvarint[n])   (every row has a device_ts_ms;
//!                                                              recv = device + base + lag)
//!                clock_ok:flags[n]
//!                names:uvarint name:str*
//!                per name: flags[n] floats2[present]
//! floats2[m]   = 1 xor[m]                        (as version 1)
//!              | 2 scale:u8 svarint-delta[m] patches
//!              | 3 scale:u8 k:u8 len:uvarint rice[m]:len bytes patches
//! patches      = count:uvarint (gap:uvarint correction:svarint)[count]
//! rice         = per value, z = zigzag(delta): q = z >> k < 32: q one bits,
//!                a zero bit, the k low bits of z; otherwise 32 one bits and
//!                the 64 bits of z; most significant bit first, zero padded
//! ```
//!
//! A decimal column (forms 2 and 3) holds integers `I` (delta-coded); value
//! `i` is `f64::from_bits((I / 10^scale).to_bits() + correction)` (wrapping),
//! where the correction is 0 unless a patch names index `i` (`gap` is the
//! number of unpatched values since the previous patch). So every value is
//! stored exactly, and the few that are not short decimals (`-0.0`, NaN,
//! `74.93588199999998` next to eight-digit neighbours) cost a patch instead
//! of forcing the whole column to a larger scale or to raw bits. The
//! encoder picks the scale with the smallest estimated size, and Rice codes
//! (form 3) for noise-like columns where the deltas rarely repeat (real
//! sensor readings with many significant digits), whose bits zstd cannot
//! shrink; repetitive columns stay byte-aligned varints (form 2), which
//! zstd compresses further.
//!
//! # Layout (version 3)
//!
//! As version 2 (version byte 3), except that every prediction ends with
//! its class label and probabilities:
//!
//! ```text
//! predictions  = rows:uvarint (model:str model_version:str model_sha256:str seq:uvarint
//!                source:str stream:str window_end_seq:uvarint window_end_ts_ms:opt
//!                score:f64le threshold:f64le is_anomaly:u8 created_ms:svarint
//!                label:optstr probabilities:uvarint f64le*)
//! optstr       = 0 | 1 str
//! ```
//!
//! Design: a new version rather than an extension of version 2, because a
//! version 2 decoder rejects trailing bytes and has no per-row extension
//! point; the version byte (and media type) lets an older cloud answer 415
//! so the agent steps down instead of having its rows quarantined.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{DeadLetterRecord, Prediction, Reading, UploadBatch};

/// Media type of a compact batch body of layout version 3 (`Content-Type`).
pub const MEDIA_TYPE: &str = "application/vnd.edge-batch.v3";

/// Media type of a compact batch body of layout version 2, still accepted
/// (agents in the field send it; it carries no prediction labels).
pub const MEDIA_TYPE_V2: &str = "application/vnd.edge-batch.v2";

/// Media type of a compact batch body of layout version 1, still accepted
/// (agents in the field send it).
pub const MEDIA_TYPE_V1: &str = "application/vnd.edge-batch.v1";

/// Layout version written by [`encode_batch`].
pub const VERSION: u8 = 3;

/// Layout version written by [`encode_batch_v2`].
pub const VERSION_V2: u8 = 2;

/// Layout version written by [`encode_batch_v1`].
pub const VERSION_V1: u8 = 1;

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
const FLOATS_PATCHED_VARINT: u8 = 2;
const FLOATS_PATCHED_RICE: u8 = 3;
const RECV_DOD: u8 = 0;
const RECV_LAG: u8 = 1;
/// Rice quotients from this value on are escaped (the value follows raw).
const RICE_ESCAPE: u64 = 32;
/// Largest Rice parameter.
const MAX_RICE_K: u8 = 63;
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
    #[error(
        "unsupported compact batch version {version} (supported: {VERSION_V1}, {VERSION_V2}, {VERSION})"
    )]
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

/// Encodes a batch in the compact layout, version 3 ([`MEDIA_TYPE`]; see
/// the module docs).
#[must_use]
pub fn encode_batch(batch: &UploadBatch) -> Vec<u8> {
    encode_version(batch, VERSION)
}

/// Encodes a batch in the compact layout, version 2 ([`MEDIA_TYPE_V2`]), for
/// clouds that do not accept version 3. Prediction labels and probabilities
/// are left out (version 2 has no place for them).
#[must_use]
pub fn encode_batch_v2(batch: &UploadBatch) -> Vec<u8> {
    encode_version(batch, VERSION_V2)
}

/// Encodes a batch in the compact layout, version 1 ([`MEDIA_TYPE_V1`]), for
/// clouds that do not accept version 2. Prediction labels and probabilities
/// are left out.
#[must_use]
pub fn encode_batch_v1(batch: &UploadBatch) -> Vec<u8> {
    encode_version(batch, VERSION_V1)
}

fn encode_version(batch: &UploadBatch, version: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + batch.readings.len() * 8);
    out.extend_from_slice(MAGIC);
    out.push(version);
    encode_readings(&mut out, &batch.readings, version);
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
        if version >= VERSION {
            match &p.label {
                None => out.push(0),
                Some(label) => {
                    out.push(1);
                    put_str(&mut out, label);
                }
            }
            put_uvarint(&mut out, len_u64(p.probabilities.len()));
            for v in &p.probabilities {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
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

/// Decodes a compact batch of any supported layout version (the version
/// byte decides).
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
    if version != VERSION && version != VERSION_V2 && version != VERSION_V1 {
        return Err(CodecError::UnsupportedVersion { version });
    }
    let readings = decode_readings(&mut r, version)?;
    let count = r.count("predictions", 1)?;
    let mut predictions = Vec::new();
    for _ in 0..count {
        let mut p = Prediction {
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
            label: None,
            probabilities: Vec::new(),
        };
        if version >= VERSION {
            p.label = if r.bool("prediction label flag")? {
                Some(r.string("prediction label")?)
            } else {
                None
            };
            let n = r.count("prediction probabilities", 8)?;
            let mut probabilities = Vec::with_capacity(n);
            for _ in 0..n {
                probabilities.push(r.f64_le("prediction probability")?);
            }
            p.probabilities = probabilities;
        }
        predictions.push(p);
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

fn encode_readings(out: &mut Vec<u8>, readings: &[Reading], version: u8) {
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
        encode_group(out, group, version);
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

fn encode_group(out: &mut Vec<u8>, rows: &[&Reading], version: u8) {
    let Some(first) = rows.first() else {
        return;
    };
    put_str(out, &first.source);
    put_str(out, &first.stream);
    put_uvarint(out, len_u64(rows.len()));
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq as i64).collect();
    put_deltas(out, &seqs);
    let recv: Vec<i64> = rows.iter().map(|r| r.recv_ts_ms).collect();
    let device_ts: Vec<i64> = rows.iter().filter_map(|r| r.device_ts_ms).collect();
    if version == VERSION_V1 {
        put_dod(out, &recv);
        put_flags(out, rows.iter().map(|r| r.device_ts_ms.is_some()));
        put_dod(out, &device_ts);
    } else {
        put_flags(out, rows.iter().map(|r| r.device_ts_ms.is_some()));
        put_dod(out, &device_ts);
        put_recv(out, &recv, &device_ts);
    }
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
        if version == VERSION_V1 {
            put_floats(out, &values);
        } else {
            put_floats_v2(out, &values);
        }
    }
}

fn decode_readings(r: &mut Reader<'_>, version: u8) -> Result<Vec<Reading>, CodecError> {
    let total_at = r.pos;
    let total = r.count("readings", 1)?;
    let group_count = r.count("reading groups", 3)?;
    let mut groups: Vec<std::vec::IntoIter<Reading>> = Vec::new();
    let mut sum = 0usize;
    for _ in 0..group_count {
        let group = decode_group(r, total - sum, version)?;
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

fn decode_group(
    r: &mut Reader<'_>,
    rows_left: usize,
    version: u8,
) -> Result<Vec<Reading>, CodecError> {
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
    let (recv, has_device_ts, device_ts) = if version == VERSION_V1 {
        let recv = r.dod(n, "reading recv_ts_ms")?;
        let has_device_ts = r.flags(n, "reading device_ts_ms")?;
        let present = has_device_ts.iter().filter(|p| **p).count();
        (recv, has_device_ts, r.dod(present, "reading device_ts_ms")?)
    } else {
        let has_device_ts = r.flags(n, "reading device_ts_ms")?;
        let present = has_device_ts.iter().filter(|p| **p).count();
        let device_ts = r.dod(present, "reading device_ts_ms")?;
        (r.recv(n, &device_ts)?, has_device_ts, device_ts)
    };
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
        let column = if version == VERSION_V1 {
            r.floats(present, "values")?
        } else {
            r.floats_v2(present, "values")?
        };
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
    put_xor(out, values);
}

/// Bits of a non-negative integer's binary form (0 for 0): the size
/// estimate the encoder compares forms with.
fn bit_len(value: u64) -> u64 {
    u64::from(u64::BITS - value.leading_zeros())
}

/// Version 2 receive timestamps: lags behind the device timestamps when
/// every row has one and that is estimated smaller, else delta-of-delta.
fn put_recv(out: &mut Vec<u8>, recv: &[i64], device_ts: &[i64]) {
    if device_ts.len() == recv.len() {
        let lags: Vec<i64> = recv
            .iter()
            .zip(device_ts)
            .map(|(r, d)| r.wrapping_sub(*d))
            .collect();
        let base = lags.iter().copied().min().unwrap_or(0);
        let lag_cost: u64 = bit_len(zigzag(base))
            + lags
                .iter()
                .map(|l| bit_len(l.wrapping_sub(base) as u64))
                .sum::<u64>();
        if lag_cost <= dod_cost(recv) {
            out.push(RECV_LAG);
            put_svarint(out, base);
            for l in lags {
                put_uvarint(out, l.wrapping_sub(base) as u64);
            }
            return;
        }
    }
    out.push(RECV_DOD);
    put_dod(out, recv);
}

fn dod_cost(values: &[i64]) -> u64 {
    let (mut prev, mut prev_delta, mut cost) = (0i64, 0i64, 0u64);
    for (i, &v) in values.iter().enumerate() {
        let delta = v.wrapping_sub(prev);
        let stored = if i < 2 {
            delta
        } else {
            delta.wrapping_sub(prev_delta)
        };
        cost += bit_len(zigzag(stored));
        prev = v;
        prev_delta = delta;
    }
    cost
}

/// A decimal column: integers at `scale`, and the bit corrections of the
/// values that are not exactly `integer / 10^scale`.
struct DecimalPlan {
    scale: u8,
    integers: Vec<i64>,
    patches: Vec<(usize, i64)>,
    cost: u64,
}

/// Estimated bits of a patch beyond its correction: its gap and framing.
const PATCH_OVERHEAD_BITS: u64 = 16;

fn decimal_plan(values: &[f64], scale: u8) -> DecimalPlan {
    let mut integers = Vec::with_capacity(values.len());
    let mut patches = Vec::new();
    let mut prev = 0i64;
    let mut cost = 0u64;
    for (i, &v) in values.iter().enumerate() {
        let scaled = (v * POW10[usize::from(scale)]).round();
        // Design: a value with no nearby integer (NaN, infinities, huge
        // magnitudes) repeats the previous integer, so its delta is 0 and
        // the patch carries all of its bits.
        let integer = if scaled.is_finite() && scaled.abs() <= MAX_EXACT_INT {
            scaled as i64
        } else {
            prev
        };
        let correction = v
            .to_bits()
            .wrapping_sub(from_decimal(integer, scale).to_bits()) as i64;
        if correction != 0 {
            cost += PATCH_OVERHEAD_BITS + bit_len(zigzag(correction));
            patches.push((i, correction));
        }
        cost += bit_len(zigzag(integer.wrapping_sub(prev)));
        integers.push(integer);
        prev = integer;
    }
    DecimalPlan {
        scale,
        integers,
        patches,
        cost,
    }
}

/// The scale with the smallest estimated size; stops at the first scale
/// that needs no patch (larger ones only make the deltas wider).
fn best_decimal_plan(values: &[f64]) -> DecimalPlan {
    let mut best = decimal_plan(values, 0);
    for scale in 1..=MAX_SCALE {
        if best.patches.is_empty() {
            break;
        }
        let plan = decimal_plan(values, scale);
        let done = plan.patches.is_empty();
        if plan.cost < best.cost {
            best = plan;
        }
        if done {
            break;
        }
    }
    best
}

fn xor_cost(values: &[f64]) -> u64 {
    let mut prev = 0u64;
    let mut cost = 0u64;
    for v in values {
        let xor = v.to_bits() ^ prev;
        prev = v.to_bits();
        let bytes = if xor == 0 {
            0
        } else {
            8 - xor.leading_zeros() / 8 - xor.trailing_zeros() / 8
        };
        cost += 8 + 8 * u64::from(bytes);
    }
    cost
}

fn put_xor(out: &mut Vec<u8>, values: &[f64]) {
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

/// Whether zigzagged deltas look like noise: mostly distinct, so neither
/// zstd's matches nor its byte statistics can shrink their varints much.
fn noise_like(zigzags: &[u64]) -> bool {
    if zigzags.len() < 16 {
        return false;
    }
    let mut sorted = zigzags.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.len() * 2 > zigzags.len()
}

/// Bits of `z` in a Rice code with parameter `k` (escapes included).
fn rice_bits(z: u64, k: u8) -> u64 {
    let q = z >> k;
    if q < RICE_ESCAPE {
        q + 1 + u64::from(k)
    } else {
        RICE_ESCAPE + 64
    }
}

/// The Rice parameter with the fewest bits, searched around the one the
/// mean suggests.
fn rice_parameter(zigzags: &[u64]) -> u8 {
    let sum: u128 = zigzags.iter().map(|z| u128::from(*z)).sum();
    let mean = sum / zigzags.len().max(1) as u128;
    let guess = (u128::BITS - mean.leading_zeros()) as u8;
    let low = guess.saturating_sub(3);
    let high = guess.saturating_add(1).min(MAX_RICE_K);
    (low..=high)
        .min_by_key(|k| zigzags.iter().map(|z| rice_bits(*z, *k)).sum::<u64>())
        .unwrap_or(0)
}

/// Most significant bit first.
struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn put(&mut self, value: u64, bits: u32) {
        // Feed at most 32 bits at a time so `acc` never overflows.
        if bits > 32 {
            self.put(value >> 32, bits - 32);
            self.put(value & 0xffff_ffff, 32);
            return;
        }
        if bits == 0 {
            return;
        }
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        };
        self.acc = (self.acc << bits) | (value & mask);
        self.bits += bits;
        while self.bits >= 8 {
            self.bits -= 8;
            self.bytes.push((self.acc >> self.bits) as u8);
        }
        self.acc &= (1 << self.bits) - 1;
    }

    fn ones(&mut self, mut count: u64) {
        while count > 0 {
            let now = count.min(32);
            self.put((1 << now) - 1, now as u32);
            count -= now;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.bits > 0 {
            self.bytes.push((self.acc << (8 - self.bits)) as u8);
        }
        self.bytes
    }
}

fn put_rice(out: &mut Vec<u8>, zigzags: &[u64], k: u8) {
    let mut w = BitWriter {
        bytes: Vec::with_capacity(zigzags.len() * (usize::from(k) + 2) / 8 + 1),
        acc: 0,
        bits: 0,
    };
    for &z in zigzags {
        let q = z >> k;
        if q < RICE_ESCAPE {
            w.ones(q);
            w.put(0, 1);
            w.put(z, u32::from(k));
        } else {
            w.ones(RICE_ESCAPE);
            w.put(z, 64);
        }
    }
    let bytes = w.finish();
    put_uvarint(out, len_u64(bytes.len()));
    out.extend_from_slice(&bytes);
}

/// Version 2 value column: the smaller of the patched decimal form and
/// the XOR form (estimated), the decimal form Rice-coded when noise-like.
fn put_floats_v2(out: &mut Vec<u8>, values: &[f64]) {
    let plan = best_decimal_plan(values);
    if plan.cost >= xor_cost(values) {
        put_xor(out, values);
        return;
    }
    let mut prev = 0i64;
    let zigzags: Vec<u64> = plan
        .integers
        .iter()
        .map(|&i| {
            let z = zigzag(i.wrapping_sub(prev));
            prev = i;
            z
        })
        .collect();
    if noise_like(&zigzags) {
        let k = rice_parameter(&zigzags);
        out.push(FLOATS_PATCHED_RICE);
        out.push(plan.scale);
        out.push(k);
        put_rice(out, &zigzags, k);
    } else {
        out.push(FLOATS_PATCHED_VARINT);
        out.push(plan.scale);
        for z in zigzags {
            put_uvarint(out, z);
        }
    }
    put_uvarint(out, len_u64(plan.patches.len()));
    let mut next = 0usize;
    for (index, correction) in plan.patches {
        put_uvarint(out, len_u64(index - next));
        put_svarint(out, correction);
        next = index + 1;
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
            FLOATS_XOR => self.xor(n, what),
            mode => Err(CodecError::BadMode {
                what,
                mode,
                offset: at,
            }),
        }
    }

    fn xor(&mut self, n: usize, what: &'static str) -> Result<Vec<f64>, CodecError> {
        self.check_items(n, what)?;
        let mut out = Vec::with_capacity(n);
        let mut prev = 0u64;
        for _ in 0..n {
            let control_at = self.pos;
            let control = self.u8(what)?;
            let (leading, trailing) = (usize::from(control >> 4), usize::from(control & 0xf));
            if leading + trailing > 8 {
                return Err(CodecError::OutOfRange {
                    what: "xor control byte",
                    value: u64::from(control),
                    offset: control_at,
                });
            }
            let mut bytes = [0u8; 8];
            bytes[leading..8 - trailing].copy_from_slice(self.take(8 - leading - trailing, what)?);
            prev ^= u64::from_be_bytes(bytes);
            out.push(f64::from_bits(prev));
        }
        Ok(out)
    }

    /// Version 2 receive timestamps of `n` rows (`device_ts` as decoded).
    fn recv(&mut self, n: usize, device_ts: &[i64]) -> Result<Vec<i64>, CodecError> {
        let what = "reading recv_ts_ms";
        let at = self.pos;
        match self.u8(what)? {
            RECV_DOD => self.dod(n, what),
            RECV_LAG if device_ts.len() == n => {
                let base = self.svarint(what)?;
                self.check_items(n, what)?;
                let mut out = Vec::with_capacity(n);
                for device in device_ts {
                    let lag = base.wrapping_add(self.uvarint(what)? as i64);
                    out.push(device.wrapping_add(lag));
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

    /// A version 2 value column of `n` values.
    fn floats_v2(&mut self, n: usize, what: &'static str) -> Result<Vec<f64>, CodecError> {
        let at = self.pos;
        let mode = self.u8(what)?;
        if mode == FLOATS_XOR {
            return self.xor(n, what);
        }
        if mode != FLOATS_PATCHED_VARINT && mode != FLOATS_PATCHED_RICE {
            return Err(CodecError::BadMode {
                what,
                mode,
                offset: at,
            });
        }
        let scale_at = self.pos;
        let scale = self.u8(what)?;
        if scale > MAX_SCALE {
            return Err(CodecError::OutOfRange {
                what: "decimal scale",
                value: u64::from(scale),
                offset: scale_at,
            });
        }
        let zigzags = if mode == FLOATS_PATCHED_RICE {
            self.rice(n, what)?
        } else {
            self.check_items(n, what)?;
            (0..n)
                .map(|_| self.uvarint(what))
                .collect::<Result<Vec<u64>, _>>()?
        };
        let mut prev = 0i64;
        let mut out: Vec<f64> = zigzags
            .into_iter()
            .map(|z| {
                prev = prev.wrapping_add(unzigzag(z));
                from_decimal(prev, scale)
            })
            .collect();
        let count = self.count("value patches", 2)?;
        let mut next = 0usize;
        for _ in 0..count {
            let gap_at = self.pos;
            let gap = self.uvarint("value patch gap")?;
            let index = usize::try_from(gap)
                .ok()
                .and_then(|gap| next.checked_add(gap))
                .filter(|index| *index < out.len())
                .ok_or(CodecError::OutOfRange {
                    what: "value patch gap",
                    value: gap,
                    offset: gap_at,
                })?;
            let correction = self.svarint("value patch correction")?;
            if let Some(value) = out.get_mut(index) {
                *value = f64::from_bits(value.to_bits().wrapping_add(correction as u64));
            }
            next = index + 1;
        }
        Ok(out)
    }

    /// `n` Rice-coded zigzagged deltas (`k`, byte length, bits).
    fn rice(&mut self, n: usize, what: &'static str) -> Result<Vec<u64>, CodecError> {
        let k_at = self.pos;
        let k = self.u8(what)?;
        if k > MAX_RICE_K {
            return Err(CodecError::OutOfRange {
                what: "rice parameter",
                value: u64::from(k),
                offset: k_at,
            });
        }
        let len_at = self.pos;
        let len = self.uvarint(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= self.remaining())
            .ok_or(CodecError::Truncated {
                what,
                offset: self.bytes.len(),
            })?;
        // Each value takes at least one bit.
        if n > len.saturating_mul(8) {
            return Err(CodecError::TooMany {
                what,
                count: len_u64(n),
                limit: len_u64(len.saturating_mul(8)),
                offset: len_at,
            });
        }
        let mut bits = BitReader {
            bytes: self.take(len, what)?,
            pos: 0,
        };
        let truncated = CodecError::Truncated {
            what,
            offset: self.bytes.len(),
        };
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut q = 0u64;
            while q < RICE_ESCAPE && bits.bit().ok_or_else(|| truncated.clone())? {
                q += 1;
            }
            let z = if q == RICE_ESCAPE {
                bits.read(64).ok_or_else(|| truncated.clone())?
            } else {
                let low = bits.read(u32::from(k)).ok_or_else(|| truncated.clone())?;
                (q << k) | low
            };
            out.push(z);
        }
        Ok(out)
    }
}

/// Most significant bit first.
struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Option<bool> {
        let byte = self.bytes.get(self.pos / 8)?;
        let bit = byte >> (7 - self.pos % 8) & 1 == 1;
        self.pos += 1;
        Some(bit)
    }

    fn read(&mut self, bits: u32) -> Option<u64> {
        let mut value = 0u64;
        for _ in 0..bits {
            value = (value << 1) | u64::from(self.bit()?);
        }
        Some(value)
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
                label: Some("bearing wear ü".into()),
                probabilities: vec![0.125, -0.0, 1e-300, 0.875],
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

    /// A column in the style of NAB's machine temperature: eight decimals,
    /// with a few binary near-misses printed with 14 digits.
    fn nab_like(n: usize) -> UploadBatch {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut level = 7_396_732_207i64;
        let readings = (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                level += (state % 200_000_001) as i64 - 100_000_000;
                let mut value = level as f64 / 1e8;
                if i % 20 == 7 {
                    value = f64::from_bits(value.to_bits() + 1);
                }
                let ts = 1_386_018_900_000 + i as i64 * 300_000;
                let mut r = reading("m", "temp", i as u64 + 1, ts, &[("value", value)]);
                r.device_ts_ms = Some(ts);
                r.recv_ts_ms = ts + 1 + (state % 3) as i64;
                r
            })
            .collect();
        UploadBatch {
            readings,
            ..UploadBatch::default()
        }
    }

    #[test]
    fn noisy_decimals_use_rice_and_patches_and_recv_lags() {
        let batch = nab_like(1000);
        let v2 = encode_batch(&batch);
        assert_eq!(decode_batch(&v2).unwrap(), batch);
        let v1 = encode_batch_v1(&batch);
        assert_eq!(decode_batch(&v1).unwrap(), batch);
        // v1 falls back to 14 digits or raw bits; v2 keeps 8 digits, about
        // 29 bits per value plus a patch per near-miss (before zstd, which
        // removes most of the other columns' bytes).
        assert!(v2.len() * 4 < v1.len() * 3, "{} vs {}", v2.len(), v1.len());
        let plan = best_decimal_plan(
            &batch
                .readings
                .iter()
                .map(|r| r.values["value"])
                .collect::<Vec<_>>(),
        );
        assert_eq!((plan.scale, plan.patches.len()), (8, 50));
    }

    #[test]
    fn repetitive_columns_stay_varints() {
        let batch = sample();
        let bytes = encode_batch(&batch);
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
        assert!(!bytes.contains(&FLOATS_PATCHED_RICE) || bytes.len() < 2000);
        assert!(!noise_like(&[2; 100]));
        assert!(noise_like(&(0..100).collect::<Vec<u64>>()));
    }

    #[test]
    fn rice_codes_every_width() {
        for k in [0u8, 1, 7, 31, 62, 63] {
            let zigzags: Vec<u64> = [0, 1, 2, 31, 32, 1 << 40, u64::MAX, u64::MAX - 1, 12345]
                .into_iter()
                .collect();
            let mut out = Vec::new();
            out.push(k);
            put_rice(&mut out, &zigzags, k);
            let mut r = Reader {
                bytes: &out,
                pos: 0,
            };
            assert_eq!(r.rice(zigzags.len(), "test").unwrap(), zigzags, "k={k}");
            assert_eq!(r.remaining(), 0);
        }
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
            decode_batch(b"EDGB\x04"),
            Err(CodecError::UnsupportedVersion { version: 4 })
        );
        for (version, bytes) in [
            (1, encode_batch_v1(&sample())),
            (2, encode_batch_v2(&sample())),
        ] {
            for len in 0..bytes.len() {
                assert!(
                    decode_batch(&bytes[..len]).is_err(),
                    "v{version} prefix of {len}"
                );
            }
        }
    }

    fn without_labels(mut batch: UploadBatch) -> UploadBatch {
        for p in &mut batch.predictions {
            p.label = None;
            p.probabilities.clear();
        }
        batch
    }

    /// Versions 1 and 2 have no place for labels: they are left out, and
    /// a label-free batch gives the same version 2 bytes as before version
    /// 3 existed (what an old cloud parses).
    #[test]
    fn older_versions_leave_labels_out() {
        let batch = sample();
        let plain = without_labels(batch.clone());
        assert_eq!(decode_batch(&encode_batch_v2(&batch)).unwrap(), plain);
        assert_eq!(decode_batch(&encode_batch_v1(&batch)).unwrap(), plain);
        assert_eq!(encode_batch_v2(&batch), encode_batch_v2(&plain));
        let v2 = encode_batch_v2(&plain);
        assert_eq!(v2[4], 2);
        let v3 = encode_batch(&plain);
        assert_eq!(v3[4], 3);
        // Version 3 of a label-free prediction costs two bytes more.
        assert_eq!(v3.len(), v2.len() + 2);
    }

    /// Hostile label and probability fields: a bad flag, a count larger
    /// than the bytes left, a count past `MAX_ROWS`, a label that is not
    /// UTF-8, each cut at every byte.
    #[test]
    fn hostile_label_fields_are_errors() {
        let mut batch = sample();
        batch.readings.clear();
        batch.dead_letters.clear();
        let bytes = encode_batch(&batch);
        // The prediction's tail: label flag, label, count, 4 f64s, then the
        // dead-letter count (0).
        let label = "bearing wear ü".len();
        let flag_at = bytes.len() - 1 - 32 - 1 - label - 1 - 1;
        assert_eq!(bytes[flag_at], 1);
        let mut bad = bytes.clone();
        bad[flag_at] = 2;
        assert!(matches!(
            decode_batch(&bad),
            Err(CodecError::BadMode {
                what: "prediction label flag",
                mode: 2,
                ..
            })
        ));
        let count_at = bytes.len() - 1 - 32 - 1;
        assert_eq!(bytes[count_at], 4);
        let mut bad = bytes.clone();
        bad[count_at] = 5;
        assert!(matches!(
            decode_batch(&bad),
            Err(CodecError::TooMany {
                what: "prediction probabilities",
                count: 5,
                ..
            })
        ));
        let mut huge = bytes[..count_at].to_vec();
        put_uvarint(&mut huge, u64::MAX);
        huge.extend_from_slice(&[0; 40]);
        assert!(matches!(
            decode_batch(&huge),
            Err(CodecError::TooMany {
                what: "prediction probabilities",
                ..
            })
        ));
        let mut bad = bytes.clone();
        bad[flag_at + 2] = 0xff;
        assert!(matches!(
            decode_batch(&bad),
            Err(CodecError::BadUtf8 {
                what: "prediction label",
                ..
            })
        ));
        for len in 0..bytes.len() {
            assert!(
                decode_batch(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
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
            (-10_000_000_000i64..10_000_000_000, 0u32..9)
                .prop_map(|(i, e)| i as f64 / 10f64.powi(e as i32)),
            (-10_000_000_000i64..10_000_000_000, -3i64..4).prop_map(|(i, ulps)| f64::from_bits(
                (i as f64 / 1e8).to_bits().wrapping_add(ulps as u64)
            )),
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
            (
                proptest::option::of(name()),
                proptest::collection::vec(edge_f64(), 0..5),
            ),
        )
            .prop_map(
                |(
                    (model, model_version, model_sha256, seq, source, stream),
                    (window_end_seq, window_end_ts_ms, score, threshold, is_anomaly, created_ms),
                    (label, probabilities),
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
                    label,
                    probabilities,
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
            for v in &p.probabilities {
                text.push_str(&format!(",{:x}", v.to_bits()));
            }
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
        fn round_trips_bit_exact_v1(batch in batch_strategy()) {
            let batch = without_labels(batch);
            let decoded = decode_batch(&encode_batch_v1(&batch));
            prop_assert_eq!(decoded.as_ref().map(bits), Ok(bits(&batch)));
            prop_assert_eq!(decoded, Ok(batch));
        }

        #[test]
        fn round_trips_bit_exact_v2(batch in batch_strategy()) {
            let batch = without_labels(batch);
            let decoded = decode_batch(&encode_batch_v2(&batch));
            prop_assert_eq!(decoded.as_ref().map(bits), Ok(bits(&batch)));
            prop_assert_eq!(decoded, Ok(batch));
        }

        /// Long columns (where the Rice form and patches are chosen) of
        /// decimals with a few values off by some ulps or not decimal at all.
        #[test]
        fn noisy_decimal_columns_round_trip(
            scale in 0u32..9,
            start in -1_000_000_000i64..1_000_000_000,
            steps in proptest::collection::vec(-100_000_000i64..100_000_000, 16..400),
            odd in proptest::collection::vec((any::<usize>(), edge_f64()), 0..6),
            jitter in proptest::collection::vec(0i64..4, 16..400),
        ) {
            let mut level = start;
            let mut values: Vec<f64> = steps
                .iter()
                .map(|s| {
                    level = level.wrapping_add(*s);
                    level as f64 / 10f64.powi(scale as i32)
                })
                .collect();
            for (at, v) in odd {
                let len = values.len();
                values[at % len] = v;
            }
            let readings: Vec<Reading> = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let ts = 1_386_018_900_000 + i as i64 * 300_000;
                    let mut r = reading("d", "s", i as u64 + 1, ts, &[("value", *v)]);
                    r.device_ts_ms = Some(ts);
                    r.recv_ts_ms = ts + jitter[i % jitter.len()];
                    r
                })
                .collect();
            let batch = UploadBatch { readings, ..UploadBatch::default() };
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
        fn random_bytes_never_panic(
            version in 1u8..3,
            tail in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut bytes = b"EDGB".to_vec();
            bytes.push(version);
            bytes.extend(tail);
            let _ = decode_batch(&bytes);
        }
    }
}
