//! Training input: readings as plain rows, grouped into per-source series.
//!
//! Owns the input types ([`Reading`], [`Series`], [`TrainingData`]) and the
//! two ways in: [`TrainingData::from_readings`] (any iterator of rows; the
//! adapter for dataset snapshots goes through it) and
//! [`TrainingData::from_nab_csv`] (the repository's NAB file). It does not
//! validate values: non-finite values are refused where windows are cut
//! ([`crate::windows`]), so the error can name the window.
//!
//! Invariant: points of a series keep the order they were given in (a
//! snapshot yields each source's readings in device sequence order, the NAB
//! file in file order); nothing is sorted by timestamp, so windows are cut as
//! the agent cuts them with `late_policy = "accept"`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Result alias for this module.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Why input data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A CSV line is malformed.
    #[error("{}:{line}: {problem}", path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// The label file is not NAB's `anomaly_windows.json` format.
    #[error("invalid label file {}", path.display())]
    Labels {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The label file has no entry for the series.
    #[error("label file {} has no entry {key:?}", path.display())]
    NoLabels {
        /// The file.
        path: PathBuf,
        /// The key looked up.
        key: String,
    },
    /// A timestamp is not `YYYY-MM-DD HH:MM:SS`.
    #[error("invalid timestamp {text:?}: expected YYYY-MM-DD HH:MM:SS")]
    Timestamp {
        /// The text.
        text: String,
    },
}

/// One reading: a device's message on one stream, with its field values.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Device id (the uploader).
    pub device: String,
    /// Source within the device (the machine a reading describes).
    pub source: String,
    /// Stream name.
    pub stream: String,
    /// Device sequence number.
    pub seq: i64,
    /// Device timestamp, Unix milliseconds.
    pub ts_ms: i64,
    /// Field values by name.
    pub fields: BTreeMap<String, f64>,
}

/// One value of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Device sequence number of the reading.
    pub seq: i64,
    /// Device timestamp, Unix milliseconds.
    pub ts_ms: i64,
    /// The field's value (may be non-finite; refused when windows are cut).
    pub value: f64,
}

/// The values of one field of one stream from one (device, source), in the
/// order they were given.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Device id.
    pub device: String,
    /// Source.
    pub source: String,
    /// Stream.
    pub stream: String,
    /// Field.
    pub field: String,
    /// The values.
    pub points: Vec<Point>,
}

/// Everything a training run reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingData {
    /// One entry per (device, source, stream, field), in first-seen order.
    pub series: Vec<Series>,
}

impl TrainingData {
    /// Groups rows into series, one per (device, source, stream, field),
    /// keeping the order of the rows within each series.
    #[must_use]
    pub fn from_readings(rows: impl IntoIterator<Item = Reading>) -> TrainingData {
        let mut index: BTreeMap<(String, String, String, String), usize> = BTreeMap::new();
        let mut series: Vec<Series> = Vec::new();
        for row in rows {
            for (field, value) in row.fields {
                let key = (
                    row.device.clone(),
                    row.source.clone(),
                    row.stream.clone(),
                    field,
                );
                let at = *index.entry(key.clone()).or_insert_with(|| {
                    series.push(Series {
                        device: key.0.clone(),
                        source: key.1.clone(),
                        stream: key.2.clone(),
                        field: key.3.clone(),
                        points: Vec::new(),
                    });
                    series.len() - 1
                });
                if let Some(s) = series.get_mut(at) {
                    s.points.push(Point {
                        seq: row.seq,
                        ts_ms: row.ts_ms,
                        value,
                    });
                }
            }
        }
        TrainingData { series }
    }

    /// The series of `stream`/`field`, one per (device, source).
    pub fn select<'a>(
        &'a self,
        stream: &'a str,
        field: &'a str,
    ) -> impl Iterator<Item = &'a Series> {
        self.series
            .iter()
            .filter(move |s| s.stream == stream && s.field == field)
    }

    /// The series for (device, source, stream, field), if any.
    #[must_use]
    pub fn find(&self, device: &str, source: &str, stream: &str, field: &str) -> Option<&Series> {
        self.series.iter().find(|s| {
            s.device == device && s.source == source && s.stream == stream && s.field == field
        })
    }

    /// Reads a NAB data file (`timestamp,value` with a header line, UTC
    /// timestamps `YYYY-MM-DD HH:MM:SS`) as stream `stream`, field `value`,
    /// of `device`/`source`; `seq` is the 1-based row number.
    ///
    /// # Errors
    /// [`DataError::Read`] or [`DataError::Csv`] naming the line.
    pub fn from_nab_csv(
        path: &Path,
        device: &str,
        source: &str,
        stream: &str,
    ) -> Result<TrainingData> {
        let text = std::fs::read_to_string(path).map_err(|source| DataError::Read {
            path: path.to_owned(),
            source,
        })?;
        let csv_err = |line: usize, problem: String| DataError::Csv {
            path: path.to_owned(),
            line,
            problem,
        };
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate().skip(1) {
            if line.trim().is_empty() {
                continue;
            }
            let (ts, value) = line
                .split_once(',')
                .ok_or_else(|| csv_err(i + 1, "expected timestamp,value".to_owned()))?;
            let ts_ms = parse_timestamp_ms(ts).map_err(|e| csv_err(i + 1, e.to_string()))?;
            let value: f64 = value
                .trim()
                .parse()
                .map_err(|_| csv_err(i + 1, format!("value {value:?} is not a number")))?;
            let seq = i64::try_from(i).unwrap_or(i64::MAX);
            rows.push(Reading {
                device: device.to_owned(),
                source: source.to_owned(),
                stream: stream.to_owned(),
                seq,
                ts_ms,
                fields: BTreeMap::from([("value".to_owned(), value)]),
            });
        }
        Ok(TrainingData::from_readings(rows))
    }

    /// Adds a label series (stream `stream`, field `field`, value 1.0 inside
    /// one of `spans`, 0.0 outside; both ends inclusive) beside every series
    /// of `of_stream`, with the same timestamps and sequence numbers. For
    /// tests and experiments with NAB's labeled windows.
    pub fn add_span_labels(
        &mut self,
        of_stream: &str,
        spans: &[(i64, i64)],
        stream: &str,
        field: &str,
    ) {
        let labels: Vec<Series> = self
            .series
            .iter()
            .filter(|s| s.stream == of_stream)
            .map(|s| Series {
                device: s.device.clone(),
                source: s.source.clone(),
                stream: stream.to_owned(),
                field: field.to_owned(),
                points: s
                    .points
                    .iter()
                    .map(|p| Point {
                        seq: p.seq,
                        ts_ms: p.ts_ms,
                        value: if spans.iter().any(|&(a, b)| p.ts_ms >= a && p.ts_ms <= b) {
                            1.0
                        } else {
                            0.0
                        },
                    })
                    .collect(),
            })
            .collect();
        self.series.extend(labels);
    }
}

/// Reads NAB's `anomaly_windows.json` entry `key` (e.g.
/// `realKnownCause/machine_temperature_system_failure.csv`) as
/// `(start_ms, end_ms)` spans.
///
/// # Errors
/// [`DataError::Read`], [`DataError::Labels`], [`DataError::NoLabels`] or
/// [`DataError::Timestamp`].
pub fn read_nab_labels(path: &Path, key: &str) -> Result<Vec<(i64, i64)>> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Read {
        path: path.to_owned(),
        source,
    })?;
    let all: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&text).map_err(|source| DataError::Labels {
            path: path.to_owned(),
            source,
        })?;
    let spans = all.get(key).ok_or_else(|| DataError::NoLabels {
        path: path.to_owned(),
        key: key.to_owned(),
    })?;
    spans
        .iter()
        .map(|(a, b)| {
            let cut = |s: &str| s.get(..19).unwrap_or(s).to_owned();
            Ok((parse_timestamp_ms(&cut(a))?, parse_timestamp_ms(&cut(b))?))
        })
        .collect()
}

/// Parses `YYYY-MM-DD HH:MM:SS` (UTC) to Unix milliseconds.
///
/// # Errors
/// [`DataError::Timestamp`] for any other text or an impossible date.
pub fn parse_timestamp_ms(text: &str) -> Result<i64> {
    let bad = || DataError::Timestamp {
        text: text.to_owned(),
    };
    let t = text.trim();
    let b = t.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        let s = t.get(r).ok_or_else(bad)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    Ok((days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s) * 1000)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp_ms("1970-01-01 00:00:00").unwrap(), 0);
        // date -u -d '2013-12-02 21:15:00' +%s
        assert_eq!(
            parse_timestamp_ms("2013-12-02 21:15:00").unwrap(),
            1_386_018_900_000
        );
        assert_eq!(
            parse_timestamp_ms("2000-03-01 00:00:01").unwrap(),
            951_868_801_000
        );
        for bad in [
            "2013-13-02 21:15:00",
            "2013-12-02T21:15:00",
            "x",
            "2013-12-02 21:15",
        ] {
            assert!(parse_timestamp_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn readings_group_by_series_in_given_order() {
        let row = |device: &str, seq: i64, v: f64| Reading {
            device: device.to_owned(),
            source: "m".to_owned(),
            stream: "t".to_owned(),
            seq,
            ts_ms: 100 - seq,
            fields: BTreeMap::from([("value".to_owned(), v), ("aux".to_owned(), -v)]),
        };
        let data =
            TrainingData::from_readings([row("a", 1, 1.0), row("b", 1, 5.0), row("a", 2, 2.0)]);
        assert_eq!(data.series.len(), 4);
        let a = data.find("a", "m", "t", "value").unwrap();
        assert_eq!(
            a.points.iter().map(|p| p.value).collect::<Vec<_>>(),
            [1.0, 2.0]
        );
        assert_eq!(data.select("t", "aux").count(), 2);
    }
}
