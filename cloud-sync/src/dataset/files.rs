//! The dataset Parquet files: their fixed schemas, the deterministic writer
//! and the reader.
//!
//! Owns the byte layout of `readings` and `predictions` files and nothing
//! else (no I/O: bytes in, bytes out). Invariants:
//! - The same rows in the same order give the same bytes: fixed writer
//!   properties (format 1.0 data pages, Snappy, dictionary on, row groups of
//!   [`ROW_GROUP_ROWS`] rows, a fixed `created_by`), no key-value metadata
//!   and no timestamps of creation.
//! - Columns are flat with Parquet logical types (UTF8 strings, INT64,
//!   DOUBLE, BOOLEAN, `TIMESTAMP(MILLIS, UTC)`), so pandas, polars and DuckDB
//!   open them without conversion; the one exception is a prediction's
//!   `probabilities`, a standard three-level `LIST` of `DOUBLE` (one list per
//!   prediction, null when the model gave none), which the same tools read
//!   as a list column.
//! - Predictions files of format 1 (before `label` and `probabilities`)
//!   are still read, with no labels.
//! - Readings are in long format: one row per value field (`field`,
//!   `value`), since streams carry different fields; a reading without
//!   values has one row with `field` and `value` null. Rows are ordered by
//!   `(device, source, stream, seq, field)`.
//! - The reader refuses a file whose schema is not exactly one it knows.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::{WriterProperties, WriterVersion};
use parquet::file::reader::{FileReader as _, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::Field;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::Type;
use sync_protocol::Prediction;

use super::manifest::Column;

/// Rows per Parquet row group.
pub const ROW_GROUP_ROWS: usize = 65_536;

/// `created_by` of every file: fixed, so the bytes do not depend on the
/// parquet crate's version string.
const CREATED_BY: &str = "cloud-sync datasets format 2";

const READINGS_SCHEMA: &str = "message readings {
    REQUIRED BYTE_ARRAY device (STRING);
    REQUIRED BYTE_ARRAY source (STRING);
    REQUIRED BYTE_ARRAY stream (STRING);
    REQUIRED INT64 seq;
    OPTIONAL INT64 ts_ms (TIMESTAMP(MILLIS,true));
    REQUIRED INT64 received_ms (TIMESTAMP(MILLIS,true));
    REQUIRED BOOLEAN clock_ok;
    OPTIONAL BYTE_ARRAY field (STRING);
    OPTIONAL DOUBLE value;
}";

/// Predictions of format 1 (snapshots taken before labels were kept).
const PREDICTIONS_SCHEMA_V1: &str = "message predictions {
    REQUIRED BYTE_ARRAY device (STRING);
    REQUIRED BYTE_ARRAY model (STRING);
    REQUIRED INT64 seq;
    REQUIRED BYTE_ARRAY model_version (STRING);
    REQUIRED BYTE_ARRAY model_sha256 (STRING);
    REQUIRED BYTE_ARRAY source (STRING);
    REQUIRED BYTE_ARRAY stream (STRING);
    REQUIRED INT64 window_end_seq;
    OPTIONAL INT64 window_end_ts_ms (TIMESTAMP(MILLIS,true));
    REQUIRED DOUBLE score;
    REQUIRED DOUBLE threshold;
    REQUIRED BOOLEAN is_anomaly;
    REQUIRED INT64 created_ms (TIMESTAMP(MILLIS,true));
}";

const PREDICTIONS_SCHEMA: &str = "message predictions {
    REQUIRED BYTE_ARRAY device (STRING);
    REQUIRED BYTE_ARRAY model (STRING);
    REQUIRED INT64 seq;
    REQUIRED BYTE_ARRAY model_version (STRING);
    REQUIRED BYTE_ARRAY model_sha256 (STRING);
    REQUIRED BYTE_ARRAY source (STRING);
    REQUIRED BYTE_ARRAY stream (STRING);
    REQUIRED INT64 window_end_seq;
    OPTIONAL INT64 window_end_ts_ms (TIMESTAMP(MILLIS,true));
    REQUIRED DOUBLE score;
    REQUIRED DOUBLE threshold;
    REQUIRED BOOLEAN is_anomaly;
    REQUIRED INT64 created_ms (TIMESTAMP(MILLIS,true));
    OPTIONAL BYTE_ARRAY label (STRING);
    OPTIONAL group probabilities (LIST) {
        REPEATED group list {
            REQUIRED DOUBLE element;
        }
    }
}";

/// Why a file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The Parquet library refused to write or read.
    #[error("parquet error")]
    Parquet(#[from] ParquetError),
    /// The file's schema is not the one this build writes.
    #[error("unexpected schema; expected {expected}")]
    Schema {
        /// The expected schema (message type).
        expected: &'static str,
    },
    /// A value does not fit its column (a sequence number above `i64::MAX`,
    /// a negative one on read, or a null where none is allowed).
    #[error("row {row}: invalid value in column {column}")]
    Value {
        /// Row index in the file.
        row: usize,
        /// Column name.
        column: &'static str,
    },
}

/// Result alias for this module.
pub type Result<T, E = FileError> = std::result::Result<T, E>;

/// A reading as a dataset holds it: the stored reading and the device that
/// uploaded it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetReading {
    /// The uploading device (agent).
    pub device: String,
    /// The sensor the agent heard it from.
    pub source: String,
    /// Stream name.
    pub stream: String,
    /// Per-(device, source, stream) sequence number.
    pub seq: u64,
    /// The timestamp in the sensor's payload (Unix ms), if any.
    pub device_ts_ms: Option<i64>,
    /// When the agent received it (Unix ms, agent clock).
    pub recv_ts_ms: i64,
    /// Whether the device timestamp looked plausible to the agent.
    pub clock_ok: bool,
    /// Named values.
    pub values: BTreeMap<String, f64>,
}

/// A prediction as a dataset holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetPrediction {
    /// The uploading device (agent).
    pub device: String,
    /// The prediction.
    pub prediction: Prediction,
}

fn schema(text: &'static str) -> Result<Arc<Type>> {
    Ok(Arc::new(parse_message_type(text)?))
}

fn properties() -> Arc<WriterProperties> {
    Arc::new(
        WriterProperties::builder()
            .set_created_by(CREATED_BY.to_owned())
            .set_writer_version(WriterVersion::PARQUET_1_0)
            .set_compression(Compression::SNAPPY)
            .set_dictionary_enabled(true)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_data_page_row_count_limit(20_000)
            .build(),
    )
}

/// The columns of the readings file, for the manifest.
#[must_use]
pub fn readings_columns() -> Vec<Column> {
    columns(&[
        ("device", "string", false),
        ("source", "string", false),
        ("stream", "string", false),
        ("seq", "int64", false),
        ("ts_ms", "timestamp[ms, UTC]", true),
        ("received_ms", "timestamp[ms, UTC]", false),
        ("clock_ok", "bool", false),
        ("field", "string", true),
        ("value", "float64", true),
    ])
}

/// The columns of the predictions file, for the manifest.
#[must_use]
pub fn predictions_columns() -> Vec<Column> {
    columns(&[
        ("device", "string", false),
        ("model", "string", false),
        ("seq", "int64", false),
        ("model_version", "string", false),
        ("model_sha256", "string", false),
        ("source", "string", false),
        ("stream", "string", false),
        ("window_end_seq", "int64", false),
        ("window_end_ts_ms", "timestamp[ms, UTC]", true),
        ("score", "float64", false),
        ("threshold", "float64", false),
        ("is_anomaly", "bool", false),
        ("created_ms", "timestamp[ms, UTC]", false),
        ("label", "string", true),
        ("probabilities", "list<float64>", true),
    ])
}

fn columns(list: &[(&str, &str, bool)]) -> Vec<Column> {
    list.iter()
        .map(|(name, kind, nullable)| Column {
            name: (*name).to_owned(),
            kind: (*kind).to_owned(),
            nullable: *nullable,
        })
        .collect()
}

fn seq_i64(row: usize, column: &'static str, value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| FileError::Value { row, column })
}

/// Writes `readings` (already in `(device, source, stream, seq)` order) as a
/// readings file; returns the bytes and the number of Parquet rows.
///
/// # Errors
/// [`FileError::Value`] for a sequence number above `i64::MAX`, or a
/// Parquet failure.
pub fn write_readings(readings: &[DatasetReading]) -> Result<(Vec<u8>, u64)> {
    // One Parquet row per value; a reading without values is one null row.
    let mut rows: Vec<(&DatasetReading, Option<(&String, f64)>)> = Vec::new();
    for reading in readings {
        if reading.values.is_empty() {
            rows.push((reading, None));
        }
        for (field, value) in &reading.values {
            rows.push((reading, Some((field, *value))));
        }
    }
    let mut out = Vec::new();
    let mut writer = SerializedFileWriter::new(&mut out, schema(READINGS_SCHEMA)?, properties())?;
    for (group, chunk) in rows.chunks(ROW_GROUP_ROWS).enumerate() {
        let base = group * ROW_GROUP_ROWS;
        let text = |f: fn(&DatasetReading) -> &str| -> Vec<ByteArray> {
            chunk.iter().map(|(r, _)| ByteArray::from(f(r))).collect()
        };
        let seqs = chunk
            .iter()
            .enumerate()
            .map(|(i, (r, _))| seq_i64(base + i, "seq", r.seq))
            .collect::<Result<Vec<_>>>()?;
        let (ts_defs, ts): (Vec<i16>, Vec<i64>) = levels(chunk.iter().map(|(r, _)| r.device_ts_ms));
        let received: Vec<i64> = chunk.iter().map(|(r, _)| r.recv_ts_ms).collect();
        let clock_ok: Vec<bool> = chunk.iter().map(|(r, _)| r.clock_ok).collect();
        let field_defs: Vec<i16> = chunk.iter().map(|(_, v)| i16::from(v.is_some())).collect();
        let fields: Vec<ByteArray> = chunk
            .iter()
            .filter_map(|(_, v)| v.map(|(f, _)| ByteArray::from(f.as_str())))
            .collect();
        let values: Vec<f64> = chunk
            .iter()
            .filter_map(|(_, v)| v.map(|(_, x)| x))
            .collect();

        let mut rg = writer.next_row_group()?;
        let mut n = 0;
        while let Some(mut col) = rg.next_column()? {
            match n {
                0 => write_strings(&mut col, &text(|r| &r.device), None)?,
                1 => write_strings(&mut col, &text(|r| &r.source), None)?,
                2 => write_strings(&mut col, &text(|r| &r.stream), None)?,
                3 => write_longs(&mut col, &seqs, None)?,
                4 => write_longs(&mut col, &ts, Some(&ts_defs))?,
                5 => write_longs(&mut col, &received, None)?,
                6 => write_bools(&mut col, &clock_ok)?,
                7 => write_strings(&mut col, &fields, Some(&field_defs))?,
                _ => write_doubles(&mut col, &values, Some(&field_defs))?,
            }
            col.close()?;
            n += 1;
        }
        rg.close()?;
    }
    writer.close()?;
    Ok((out, u64::try_from(rows.len()).unwrap_or(u64::MAX)))
}

/// Writes `predictions` (already in `(device, model, seq)` order) as a
/// predictions file; returns the bytes and the number of rows.
///
/// # Errors
/// [`FileError::Value`] for a sequence number above `i64::MAX`, or a
/// Parquet failure.
pub fn write_predictions(predictions: &[DatasetPrediction]) -> Result<(Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut writer =
        SerializedFileWriter::new(&mut out, schema(PREDICTIONS_SCHEMA)?, properties())?;
    for (group, chunk) in predictions.chunks(ROW_GROUP_ROWS).enumerate() {
        let base = group * ROW_GROUP_ROWS;
        let text = |f: fn(&DatasetPrediction) -> &str| -> Vec<ByteArray> {
            chunk.iter().map(|p| ByteArray::from(f(p))).collect()
        };
        let seqs = |column: &'static str, f: fn(&Prediction) -> u64| -> Result<Vec<i64>> {
            chunk
                .iter()
                .enumerate()
                .map(|(i, p)| seq_i64(base + i, column, f(&p.prediction)))
                .collect()
        };
        let seq = seqs("seq", |p| p.seq)?;
        let window_end_seq = seqs("window_end_seq", |p| p.window_end_seq)?;
        let (end_defs, end_ts) = levels(chunk.iter().map(|p| p.prediction.window_end_ts_ms));
        let score: Vec<f64> = chunk.iter().map(|p| p.prediction.score).collect();
        let threshold: Vec<f64> = chunk.iter().map(|p| p.prediction.threshold).collect();
        let anomaly: Vec<bool> = chunk.iter().map(|p| p.prediction.is_anomaly).collect();
        let created: Vec<i64> = chunk.iter().map(|p| p.prediction.created_ms).collect();
        let label_defs: Vec<i16> = chunk
            .iter()
            .map(|p| i16::from(p.prediction.label.is_some()))
            .collect();
        let labels: Vec<ByteArray> = chunk
            .iter()
            .filter_map(|p| p.prediction.label.as_deref().map(ByteArray::from))
            .collect();
        let (prob_defs, prob_reps, probs) =
            list_levels(chunk.iter().map(|p| p.prediction.probabilities.as_slice()));

        let mut rg = writer.next_row_group()?;
        let mut n = 0;
        while let Some(mut col) = rg.next_column()? {
            match n {
                0 => write_strings(&mut col, &text(|p| &p.device), None)?,
                1 => write_strings(&mut col, &text(|p| &p.prediction.model), None)?,
                2 => write_longs(&mut col, &seq, None)?,
                3 => write_strings(&mut col, &text(|p| &p.prediction.model_version), None)?,
                4 => write_strings(&mut col, &text(|p| &p.prediction.model_sha256), None)?,
                5 => write_strings(&mut col, &text(|p| &p.prediction.source), None)?,
                6 => write_strings(&mut col, &text(|p| &p.prediction.stream), None)?,
                7 => write_longs(&mut col, &window_end_seq, None)?,
                8 => write_longs(&mut col, &end_ts, Some(&end_defs))?,
                9 => write_doubles(&mut col, &score, None)?,
                10 => write_doubles(&mut col, &threshold, None)?,
                11 => write_bools(&mut col, &anomaly)?,
                12 => write_longs(&mut col, &created, None)?,
                13 => write_strings(&mut col, &labels, Some(&label_defs))?,
                _ => {
                    col.typed::<DoubleType>().write_batch(
                        &probs,
                        Some(&prob_defs),
                        Some(&prob_reps),
                    )?;
                }
            }
            col.close()?;
            n += 1;
        }
        rg.close()?;
    }
    writer.close()?;
    Ok((out, u64::try_from(predictions.len()).unwrap_or(u64::MAX)))
}

/// Definition levels, repetition levels and the values of the
/// `probabilities` list column: an empty list is written as null (level 0),
/// each element at definition level 2; repetition level 0 starts a row.
fn list_levels<'a>(lists: impl Iterator<Item = &'a [f64]>) -> (Vec<i16>, Vec<i16>, Vec<f64>) {
    let (mut defs, mut reps, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for list in lists {
        if list.is_empty() {
            defs.push(0);
            reps.push(0);
        }
        for (i, v) in list.iter().enumerate() {
            defs.push(2);
            reps.push(i16::from(i > 0));
            values.push(*v);
        }
    }
    (defs, reps, values)
}

/// Definition levels and the non-null values of an optional column.
fn levels(values: impl Iterator<Item = Option<i64>>) -> (Vec<i16>, Vec<i64>) {
    let mut defs = Vec::new();
    let mut present = Vec::new();
    for value in values {
        defs.push(i16::from(value.is_some()));
        present.extend(value);
    }
    (defs, present)
}

type ColumnWriter<'a> = parquet::file::writer::SerializedColumnWriter<'a>;

fn write_strings(col: &mut ColumnWriter<'_>, v: &[ByteArray], d: Option<&[i16]>) -> Result<()> {
    col.typed::<ByteArrayType>().write_batch(v, d, None)?;
    Ok(())
}

fn write_longs(col: &mut ColumnWriter<'_>, v: &[i64], d: Option<&[i16]>) -> Result<()> {
    col.typed::<Int64Type>().write_batch(v, d, None)?;
    Ok(())
}

fn write_doubles(col: &mut ColumnWriter<'_>, v: &[f64], d: Option<&[i16]>) -> Result<()> {
    col.typed::<DoubleType>().write_batch(v, d, None)?;
    Ok(())
}

fn write_bools(col: &mut ColumnWriter<'_>, v: &[bool]) -> Result<()> {
    col.typed::<BoolType>().write_batch(v, None, None)?;
    Ok(())
}

/// Opens `bytes` as Parquet and checks its schema is exactly `expected`
/// (or, when given, `older`); returns every row's fields.
fn rows(
    bytes: Bytes,
    expected: &'static str,
    older: Option<&'static str>,
) -> Result<Vec<Vec<Field>>> {
    let reader = SerializedFileReader::new(bytes)?;
    let schema = reader.metadata().file_metadata().schema();
    let known = *schema == schema_of(expected)?
        || older
            .map(schema_of)
            .transpose()?
            .is_some_and(|s| *schema == s);
    if !known {
        return Err(FileError::Schema { expected });
    }
    reader
        .get_row_iter(None)?
        .map(|row| Ok(row?.into_columns().into_iter().map(|(_, f)| f).collect()))
        .collect()
}

fn schema_of(text: &'static str) -> Result<Type> {
    Ok(parse_message_type(text)?)
}

/// Typed access to one row's fields; any mismatch is [`FileError::Value`].
struct RowFields<'a> {
    row: usize,
    fields: &'a [Field],
}

impl RowFields<'_> {
    fn field(&self, i: usize, column: &'static str) -> Result<&Field> {
        self.fields.get(i).ok_or(FileError::Value {
            row: self.row,
            column,
        })
    }

    fn bad(&self, column: &'static str) -> FileError {
        FileError::Value {
            row: self.row,
            column,
        }
    }

    fn string(&self, i: usize, column: &'static str) -> Result<String> {
        match self.field(i, column)? {
            Field::Str(s) => Ok(s.clone()),
            _ => Err(self.bad(column)),
        }
    }

    fn opt_string(&self, i: usize, column: &'static str) -> Result<Option<String>> {
        match self.field(i, column)? {
            Field::Null => Ok(None),
            _ => self.string(i, column).map(Some),
        }
    }

    fn seq(&self, i: usize, column: &'static str) -> Result<u64> {
        match self.field(i, column)? {
            Field::Long(v) => u64::try_from(*v).map_err(|_| self.bad(column)),
            _ => Err(self.bad(column)),
        }
    }

    fn millis(&self, i: usize, column: &'static str) -> Result<i64> {
        match self.field(i, column)? {
            Field::TimestampMillis(v) | Field::Long(v) => Ok(*v),
            _ => Err(self.bad(column)),
        }
    }

    fn opt_millis(&self, i: usize, column: &'static str) -> Result<Option<i64>> {
        match self.field(i, column)? {
            Field::Null => Ok(None),
            _ => self.millis(i, column).map(Some),
        }
    }

    fn double(&self, i: usize, column: &'static str) -> Result<f64> {
        match self.field(i, column)? {
            Field::Double(v) => Ok(*v),
            _ => Err(self.bad(column)),
        }
    }

    fn opt_double(&self, i: usize, column: &'static str) -> Result<Option<f64>> {
        match self.field(i, column)? {
            Field::Null => Ok(None),
            _ => self.double(i, column).map(Some),
        }
    }

    /// A list of doubles; null reads as empty.
    fn doubles(&self, i: usize, column: &'static str) -> Result<Vec<f64>> {
        match self.field(i, column)? {
            Field::Null => Ok(Vec::new()),
            Field::ListInternal(list) => list
                .elements()
                .iter()
                .map(|e| match e {
                    Field::Double(v) => Ok(*v),
                    _ => Err(self.bad(column)),
                })
                .collect(),
            _ => Err(self.bad(column)),
        }
    }

    fn boolean(&self, i: usize, column: &'static str) -> Result<bool> {
        match self.field(i, column)? {
            Field::Bool(v) => Ok(*v),
            _ => Err(self.bad(column)),
        }
    }
}

/// Reads a readings file back into readings (consecutive rows of one
/// `(device, source, stream, seq)` form one reading).
///
/// # Errors
/// [`FileError::Parquet`] for bytes that are not Parquet,
/// [`FileError::Schema`] for another schema, [`FileError::Value`] for a
/// value that cannot be a reading.
pub fn read_readings(bytes: Bytes) -> Result<Vec<DatasetReading>> {
    let mut out: Vec<DatasetReading> = Vec::new();
    for (row, fields) in rows(bytes, READINGS_SCHEMA, None)?.iter().enumerate() {
        let f = RowFields { row, fields };
        let device = f.string(0, "device")?;
        let source = f.string(1, "source")?;
        let stream = f.string(2, "stream")?;
        let seq = f.seq(3, "seq")?;
        let field = f.opt_string(7, "field")?;
        let value = f.opt_double(8, "value")?;
        let same = out.last().is_some_and(|r| {
            r.seq == seq && r.device == device && r.source == source && r.stream == stream
        });
        if !same {
            out.push(DatasetReading {
                device,
                source,
                stream,
                seq,
                device_ts_ms: f.opt_millis(4, "ts_ms")?,
                recv_ts_ms: f.millis(5, "received_ms")?,
                clock_ok: f.boolean(6, "clock_ok")?,
                values: BTreeMap::new(),
            });
        }
        match (field, value, out.last_mut()) {
            (Some(field), Some(value), Some(reading)) => {
                reading.values.insert(field, value);
            }
            (None, None, _) => {}
            _ => return Err(f.bad("value")),
        }
    }
    Ok(out)
}

/// Reads a predictions file back, of either format (format 1 files give
/// no labels).
///
/// # Errors
/// As [`read_readings`].
pub fn read_predictions(bytes: Bytes) -> Result<Vec<DatasetPrediction>> {
    rows(bytes, PREDICTIONS_SCHEMA, Some(PREDICTIONS_SCHEMA_V1))?
        .iter()
        .enumerate()
        .map(|(row, fields)| {
            let f = RowFields { row, fields };
            Ok(DatasetPrediction {
                device: f.string(0, "device")?,
                prediction: Prediction {
                    model: f.string(1, "model")?,
                    seq: f.seq(2, "seq")?,
                    model_version: f.string(3, "model_version")?,
                    model_sha256: f.string(4, "model_sha256")?,
                    source: f.string(5, "source")?,
                    stream: f.string(6, "stream")?,
                    window_end_seq: f.seq(7, "window_end_seq")?,
                    window_end_ts_ms: f.opt_millis(8, "window_end_ts_ms")?,
                    score: f.double(9, "score")?,
                    threshold: f.double(10, "threshold")?,
                    is_anomaly: f.boolean(11, "is_anomaly")?,
                    created_ms: f.millis(12, "created_ms")?,
                    label: match fields.get(13) {
                        None => None,
                        Some(_) => f.opt_string(13, "label")?,
                    },
                    probabilities: match fields.get(14) {
                        None => Vec::new(),
                        Some(_) => f.doubles(14, "probabilities")?,
                    },
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn reading(device: &str, seq: u64, values: &[(&str, f64)]) -> DatasetReading {
        DatasetReading {
            device: device.to_owned(),
            source: "m1".to_owned(),
            stream: "temperature".to_owned(),
            seq,
            device_ts_ms: seq.is_multiple_of(2).then_some(1_700_000_000_000),
            recv_ts_ms: 1_700_000_000_500,
            clock_ok: !seq.is_multiple_of(3),
            values: values.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    #[test]
    fn readings_round_trip_in_long_format_and_deterministically() {
        let readings = vec![
            reading("a", 1, &[("value", 1.5)]),
            reading("a", 2, &[("humidity", 40.0), ("value", 2.5)]),
            reading("a", 3, &[]),
            reading("b", 1, &[("value", -3.0)]),
        ];
        let (bytes, rows) = write_readings(&readings).unwrap();
        assert_eq!(rows, 5);
        assert_eq!(write_readings(&readings).unwrap().0, bytes);
        assert_eq!(read_readings(Bytes::from(bytes)).unwrap(), readings);
    }

    fn prediction(
        device: &str,
        seq: u64,
        label: Option<&str>,
        probabilities: &[f64],
    ) -> DatasetPrediction {
        DatasetPrediction {
            device: device.to_owned(),
            prediction: Prediction {
                model: "bearing".to_owned(),
                model_version: "1.0.0".to_owned(),
                model_sha256: "ab".repeat(32),
                seq,
                source: "m1".to_owned(),
                stream: "vibration".to_owned(),
                window_end_seq: seq * 10,
                window_end_ts_ms: None,
                score: 0.5,
                threshold: 0.75,
                is_anomaly: false,
                created_ms: 1_700_000_000_000,
                label: label.map(str::to_owned),
                probabilities: probabilities.to_vec(),
            },
        }
    }

    /// Labels and probability lists (single, several, none, next to each
    /// other across rows) round-trip, deterministically.
    #[test]
    fn predictions_keep_labels_and_probabilities() {
        let predictions = vec![
            prediction("a", 1, Some("normal"), &[0.875, 0.125]),
            prediction("a", 2, None, &[]),
            prediction("a", 3, Some("wear"), &[0.25]),
            prediction("b", 1, Some("outer race"), &[]),
            prediction("b", 2, None, &[0.1, 0.2, 0.7]),
        ];
        let (bytes, rows) = write_predictions(&predictions).unwrap();
        assert_eq!(rows, 5);
        assert_eq!(write_predictions(&predictions).unwrap().0, bytes);
        assert_eq!(read_predictions(Bytes::from(bytes)).unwrap(), predictions);
    }

    /// A format 1 predictions file (written here with the old schema and
    /// the old writer's columns) is still read, with no labels.
    #[test]
    fn format_1_predictions_are_still_read() {
        let mut out = Vec::new();
        let mut writer = SerializedFileWriter::new(
            &mut out,
            schema(PREDICTIONS_SCHEMA_V1).unwrap(),
            properties(),
        )
        .unwrap();
        let mut rg = writer.next_row_group().unwrap();
        let mut n = 0;
        while let Some(mut col) = rg.next_column().unwrap() {
            let text = |s: &str| vec![ByteArray::from(s)];
            match n {
                0 => write_strings(&mut col, &text("a"), None).unwrap(),
                1 => write_strings(&mut col, &text("bearing"), None).unwrap(),
                3 => write_strings(&mut col, &text("1.0.0"), None).unwrap(),
                4 => write_strings(&mut col, &text(&"ab".repeat(32)), None).unwrap(),
                5 => write_strings(&mut col, &text("m1"), None).unwrap(),
                6 => write_strings(&mut col, &text("vibration"), None).unwrap(),
                2 => write_longs(&mut col, &[1], None).unwrap(),
                7 => write_longs(&mut col, &[10], None).unwrap(),
                8 => write_longs(&mut col, &[], Some(&[0])).unwrap(),
                9 => write_doubles(&mut col, &[0.5], None).unwrap(),
                10 => write_doubles(&mut col, &[0.75], None).unwrap(),
                11 => write_bools(&mut col, &[false]).unwrap(),
                _ => write_longs(&mut col, &[1_700_000_000_000], None).unwrap(),
            }
            col.close().unwrap();
            n += 1;
        }
        rg.close().unwrap();
        writer.close().unwrap();
        let read = read_predictions(Bytes::from(out)).unwrap();
        assert_eq!(read, vec![prediction("a", 1, None, &[])]);
    }

    #[test]
    fn empty_files_are_valid() {
        let (bytes, rows) = write_readings(&[]).unwrap();
        assert_eq!(rows, 0);
        assert!(read_readings(Bytes::from(bytes)).unwrap().is_empty());
        let (bytes, _) = write_predictions(&[]).unwrap();
        assert!(read_predictions(Bytes::from(bytes)).unwrap().is_empty());
    }

    #[test]
    fn wrong_schema_and_garbage_are_refused() {
        let (bytes, _) = write_predictions(&[]).unwrap();
        assert!(matches!(
            read_readings(Bytes::from(bytes)),
            Err(FileError::Schema { .. })
        ));
        assert!(matches!(
            read_readings(Bytes::from_static(b"PAR1 not really PAR1")),
            Err(FileError::Parquet(_))
        ));
    }
}
