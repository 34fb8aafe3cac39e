//! The dataset manifest: what a snapshot holds and how its id is computed.
//!
//! Owns the JSON shape of `manifests/<id>.json` (also the body of
//! `GET /v1/datasets/{id}`) and the content hash. Invariant: the id is the
//! sha256 of [`content_bytes`] of [`Manifest::content`], which holds the
//! selection, the files (each with its own sha256) and the lineage, and
//! nothing that depends on when or by whom the snapshot was taken
//! (`created_ms` and `name` are outside it).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Version of the dataset layout (`content.format`) written by this build.
/// 2 added the predictions' `label` and `probabilities` columns; snapshots
/// of format 1 are still read.
pub const FORMAT_VERSION: u32 = 2;

/// What a snapshot selects: readings whose stream is one of `streams`, of
/// one of `devices`, received (agent clock, `recv_ts_ms`) in
/// `[from_ms, to_ms)`, and the predictions of those devices on those
/// streams created in the same window.
///
/// A stream is `NAME` (any source) or `SOURCE/NAME`. Normalized (sorted,
/// deduplicated) before hashing, so the order given does not matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Streams: `NAME` or `SOURCE/NAME`.
    pub streams: Vec<String>,
    /// Device ids.
    pub devices: Vec<String>,
    /// Start of the window (Unix ms, inclusive).
    pub from_ms: i64,
    /// End of the window (Unix ms, exclusive).
    pub to_ms: i64,
}

impl Selection {
    /// The same selection with `streams` and `devices` sorted and deduplicated.
    #[must_use]
    pub fn normalized(mut self) -> Selection {
        self.streams.sort();
        self.streams.dedup();
        self.devices.sort();
        self.devices.dedup();
        self
    }
}

/// One column of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `string`, `int64`, `float64`, `bool`, `timestamp[ms, UTC]` or
    /// `list<float64>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether the column may be null.
    pub nullable: bool,
}

/// One Parquet file of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableFile {
    /// `readings` or `predictions`.
    pub table: String,
    /// Object path in the dataset store (`parquet/<sha256>.parquet`).
    pub path: String,
    /// sha256 of the file (hex).
    pub sha256: String,
    /// File size.
    pub bytes: u64,
    /// Parquet rows (readings: one per value field).
    pub rows: u64,
    /// Records: readings or predictions.
    pub records: u64,
    /// Schema.
    pub columns: Vec<Column>,
}

/// An inclusive range of sequence numbers held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeqSpan {
    /// First seq.
    pub first: u64,
    /// Last seq (inclusive).
    pub last: u64,
}

/// The readings held for one `(device, source, stream)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadingLineage {
    /// Device id.
    pub device: String,
    /// Sensor.
    pub source: String,
    /// Stream.
    pub stream: String,
    /// Readings held.
    pub records: u64,
    /// The exact sequence numbers held, as maximal runs, ascending.
    pub ranges: Vec<SeqSpan>,
}

/// The predictions held for one `(device, model)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictionLineage {
    /// Device id.
    pub device: String,
    /// Model name.
    pub model: String,
    /// Predictions held.
    pub records: u64,
    /// The exact sequence numbers held, as maximal runs, ascending.
    pub ranges: Vec<SeqSpan>,
}

/// Where every row of a dataset came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// Per `(device, source, stream)`, in that order.
    pub readings: Vec<ReadingLineage>,
    /// Per `(device, model)`, in that order.
    pub predictions: Vec<PredictionLineage>,
}

/// The hashed part of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestContent {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// The normalized selection.
    pub selection: Selection,
    /// `readings` then `predictions`.
    pub files: Vec<TableFile>,
    /// Sequence ranges held.
    pub lineage: Lineage,
}

/// A dataset's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The dataset id: sha256 (hex) of [`content_bytes`] of `content`.
    pub id: String,
    /// Label given by the first snapshot with this content (not hashed).
    pub name: Option<String>,
    /// When the first snapshot with this content was taken (Unix ms; not hashed).
    pub created_ms: i64,
    /// Everything the id covers.
    pub content: ManifestContent,
}

impl Manifest {
    /// The file of `table` (`readings` or `predictions`).
    #[must_use]
    pub fn file(&self, table: &str) -> Option<&TableFile> {
        self.content.files.iter().find(|f| f.table == table)
    }

    /// Readings held.
    #[must_use]
    pub fn readings(&self) -> u64 {
        self.file("readings").map_or(0, |f| f.records)
    }

    /// Predictions held.
    #[must_use]
    pub fn predictions(&self) -> u64 {
        self.file("predictions").map_or(0, |f| f.records)
    }

    /// Total size of the files.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.content.files.iter().map(|f| f.bytes).sum()
    }
}

/// The canonical bytes of `content` (compact JSON, fields in declaration
/// order): what the id hashes.
///
/// # Errors
/// Only if serialization fails (it cannot for these types).
pub fn content_bytes(content: &ManifestContent) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(content)
}

/// sha256 (hex) of `bytes`.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Maximal runs of consecutive values in an ascending sequence.
#[must_use]
pub fn spans(seqs: impl IntoIterator<Item = u64>) -> Vec<SeqSpan> {
    let mut out: Vec<SeqSpan> = Vec::new();
    for seq in seqs {
        match out.last_mut() {
            Some(span) if span.last.checked_add(1) == Some(seq) => span.last = seq,
            Some(span) if span.last == seq => {}
            _ => out.push(SeqSpan {
                first: seq,
                last: seq,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_maximal_runs() {
        let got = spans([1, 2, 3, 5, 7, 8]);
        let want = [(1, 3), (5, 5), (7, 8)].map(|(first, last)| SeqSpan { first, last });
        assert_eq!(got, want);
        assert!(spans([]).is_empty());
    }
}
