//! The adapter from a verified dataset snapshot to the retrainer's input.
//!
//! Owns which rows of a snapshot a training run reads: the readings of the
//! training config's `stream` (any source) that carry its `field`, plus the
//! label stream's readings when the config has `[label]`. Rows keep the
//! snapshot's identity order, so each (device, source) series is in device
//! sequence order, which is how the agent cut its windows. It never reads
//! the store or the database: the snapshot was verified by its reader.

use std::collections::BTreeSet;

use edge_retrain::{Reading, TrainConfig, TrainingData};

use crate::dataset::{DatasetReading, Snapshot};

/// Why a snapshot cannot be trained on.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot holds no reading of the stream with the field.
    #[error(
        "dataset {dataset} has no stream {stream:?} with field {field:?} (it holds {}); \
         set `stream`/`field` in the training config",
        list(available)
    )]
    MissingStream {
        /// Dataset id.
        dataset: String,
        /// Stream asked for.
        stream: String,
        /// Field asked for.
        field: String,
        /// `source/stream.field` keys the snapshot holds.
        available: Vec<String>,
    },
    /// A sequence number does not fit the retrainer's signed type.
    #[error("dataset {dataset}: sequence number {seq} of {series} is out of range")]
    Seq {
        /// Dataset id.
        dataset: String,
        /// `device/source/stream`.
        series: String,
        /// The value.
        seq: u64,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "no readings".to_owned()
    } else {
        items.join(", ")
    }
}

fn holds(snapshot: &Snapshot, stream: &str, field: &str) -> bool {
    snapshot
        .readings
        .iter()
        .any(|r| r.stream == stream && r.values.contains_key(field))
}

fn missing(snapshot: &Snapshot, stream: &str, field: &str) -> SnapshotError {
    let available: BTreeSet<String> = snapshot
        .readings
        .iter()
        .flat_map(|r| {
            r.values
                .keys()
                .map(move |f| format!("{}/{}.{f}", r.source, r.stream))
        })
        .collect();
    SnapshotError::MissingStream {
        dataset: snapshot.manifest.id.clone(),
        stream: stream.to_owned(),
        field: field.to_owned(),
        available: available.into_iter().collect(),
    }
}

fn row(dataset: &str, r: &DatasetReading) -> Result<Reading, SnapshotError> {
    let seq = i64::try_from(r.seq).map_err(|_| SnapshotError::Seq {
        dataset: dataset.to_owned(),
        series: format!("{}/{}/{}", r.device, r.source, r.stream),
        seq: r.seq,
    })?;
    Ok(Reading {
        device: r.device.clone(),
        source: r.source.clone(),
        stream: r.stream.clone(),
        seq,
        // Design: the device's own timestamp, as the agent's windows use;
        // the receive time when the sensor sent none.
        ts_ms: r.device_ts_ms.unwrap_or(r.recv_ts_ms),
        fields: r.values.clone(),
    })
}

/// The training input `config` reads from `snapshot`.
///
/// # Errors
/// [`SnapshotError::MissingStream`] when the snapshot has no reading of the
/// configured stream (or label stream) with its field.
pub fn training_data(
    snapshot: &Snapshot,
    config: &TrainConfig,
) -> Result<TrainingData, SnapshotError> {
    let mut wanted = vec![(config.stream.as_str(), config.field.as_str())];
    if let Some(label) = &config.label {
        wanted.push((label.stream.as_str(), label.field.as_str()));
    }
    for (stream, field) in &wanted {
        if !holds(snapshot, stream, field) {
            return Err(missing(snapshot, stream, field));
        }
    }
    let dataset = &snapshot.manifest.id;
    let rows = snapshot
        .readings
        .iter()
        .filter(|r| wanted.iter().any(|(stream, _)| r.stream == *stream))
        .map(|r| row(dataset, r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrainingData::from_readings(rows))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use super::*;
    use crate::dataset::{Lineage, Manifest, ManifestContent, Selection};

    fn reading(source: &str, stream: &str, seq: u64, value: f64) -> DatasetReading {
        DatasetReading {
            device: "dev-1".into(),
            source: source.into(),
            stream: stream.into(),
            seq,
            device_ts_ms: (seq != 2).then_some(1000 * seq as i64),
            recv_ts_ms: 7,
            clock_ok: true,
            values: BTreeMap::from([("value".to_owned(), value)]),
        }
    }

    fn snapshot(readings: Vec<DatasetReading>) -> Snapshot {
        Snapshot {
            manifest: Manifest {
                id: "ab".repeat(32),
                name: None,
                created_ms: 0,
                content: ManifestContent {
                    format: 1,
                    selection: Selection {
                        streams: vec![],
                        devices: vec![],
                        from_ms: 0,
                        to_ms: 1,
                    },
                    files: vec![],
                    lineage: Lineage {
                        readings: vec![],
                        predictions: vec![],
                    },
                },
            },
            readings,
            predictions: vec![],
        }
    }

    #[test]
    fn rows_of_the_configured_stream_in_sequence_order() {
        let s = snapshot(vec![
            reading("m1", "humidity", 1, 9.0),
            reading("m1", "temperature", 1, 1.0),
            reading("m1", "temperature", 2, 2.0),
            reading("m2", "temperature", 5, 3.0),
        ]);
        let data = training_data(&s, &TrainConfig::new("m")).unwrap();
        assert_eq!(data.series.len(), 2);
        let m1 = data.find("dev-1", "m1", "temperature", "value").unwrap();
        let seqs: Vec<(i64, i64)> = m1.points.iter().map(|p| (p.seq, p.ts_ms)).collect();
        assert_eq!(seqs, [(1, 1000), (2, 7)], "device time, else receive time");
        assert!(data.find("dev-1", "m1", "humidity", "value").is_none());
    }

    #[test]
    fn a_missing_stream_names_what_the_snapshot_holds() {
        let s = snapshot(vec![reading("m1", "humidity", 1, 9.0)]);
        let err = training_data(&s, &TrainConfig::new("m")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("no stream \"temperature\" with field \"value\"")
                && text.contains("m1/humidity.value"),
            "{text}"
        );
    }
}
