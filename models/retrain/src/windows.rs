//! Windows as the agent cuts them (`docs/model-package.md`, "Features and
//! windows"): per series, the first window closes at the `window`-th point,
//! then one every `hop` points; window statistics with the agent's
//! definitions; labels joined as of the window's end; the chronological
//! train / held-out split.
//!
//! Owns no state. Refuses non-finite values with an error naming the series
//! and sequence number, instead of skipping them (a snapshot with NaN is a
//! data problem the operator must see, not silently thinner training data).

use crate::data::{Point, Series};

/// Result alias for this module.
pub type Result<T, E = WindowError> = std::result::Result<T, E>;

/// Why windows could not be cut.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WindowError {
    /// A value is NaN or infinite.
    #[error("non-finite value {value} in {device}/{source_name} {stream}.{field} at seq {seq}")]
    NonFinite {
        /// Device.
        device: String,
        /// Source.
        source_name: String,
        /// Stream.
        stream: String,
        /// Field.
        field: String,
        /// Sequence number of the reading.
        seq: i64,
        /// The value.
        value: f64,
    },
}

/// One window of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Index of the series in the input.
    pub series: usize,
    /// Position of the window within its series (0-based).
    pub index: usize,
    /// Sequence number of the last point.
    pub end_seq: i64,
    /// Timestamp of the last point (Unix ms).
    pub end_ts_ms: i64,
    /// The values, oldest first.
    pub values: Vec<f64>,
}

/// Cuts every window of `series` (index `series_ix`): ends at points
/// `window - 1, window - 1 + hop, …`.
///
/// # Errors
/// [`WindowError::NonFinite`] for the first non-finite value.
pub fn cut(series_ix: usize, series: &Series, window: usize, hop: usize) -> Result<Vec<Window>> {
    if let Some(p) = series.points.iter().find(|p| !p.value.is_finite()) {
        return Err(WindowError::NonFinite {
            device: series.device.clone(),
            source_name: series.source.clone(),
            stream: series.stream.clone(),
            field: series.field.clone(),
            seq: p.seq,
            value: p.value,
        });
    }
    let points = &series.points;
    if window == 0 || hop == 0 || points.len() < window {
        return Ok(Vec::new());
    }
    Ok((window - 1..points.len())
        .step_by(hop)
        .enumerate()
        .map(|(index, end)| {
            let slice: &[Point] = &points[end + 1 - window..=end];
            Window {
                series: series_ix,
                index,
                end_seq: points[end].seq,
                end_ts_ms: points[end].ts_ms,
                values: slice.iter().map(|p| p.value).collect(),
            }
        })
        .collect())
}

/// The window statistics a `stats` feature can list, in the manifest's names.
pub const STATS: [&str; 5] = ["mean", "std", "min", "max", "slope"];

/// `[mean, std, min, max, slope]` of `values`, as the agent computes them:
/// population std (divides by n); slope by least squares against the step
/// index, in value units per step (0 for one value).
#[must_use]
pub fn stats(values: &[f64]) -> [f64; 5] {
    let n = values.len() as f64;
    if values.is_empty() {
        return [f64::NAN; 5];
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ibar = (n - 1.0) / 2.0;
    let sxx: f64 = (0..values.len()).map(|i| (i as f64 - ibar).powi(2)).sum();
    let slope = if sxx > 0.0 {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64 - ibar) * (v - mean))
            .sum::<f64>()
            / sxx
    } else {
        0.0
    };
    [mean, var.sqrt(), min, max, slope]
}

/// The label of a window: the last label point at or before the window's
/// end timestamp (`None` before the first label), positive when above 0.5.
#[must_use]
pub fn label_at(labels: &[Point], end_ts_ms: i64) -> Option<bool> {
    labels
        .iter()
        .filter(|p| p.ts_ms <= end_ts_ms && p.value.is_finite())
        .max_by_key(|p| p.ts_ms)
        .map(|p| p.value > 0.5)
}

/// Splits each series' windows chronologically: the first
/// `floor(n * train_fraction)` windows of every series train, the rest are
/// held out. Returns `(train, held_out)` indices into `windows`.
#[must_use]
pub fn split(windows: &[Window], train_fraction: f64) -> (Vec<usize>, Vec<usize>) {
    let mut per_series: std::collections::BTreeMap<usize, usize> =
        std::collections::BTreeMap::new();
    for w in windows {
        *per_series.entry(w.series).or_default() += 1;
    }
    let mut train = Vec::new();
    let mut held = Vec::new();
    for (i, w) in windows.iter().enumerate() {
        let n = per_series.get(&w.series).copied().unwrap_or(0);
        let cut = (n as f64 * train_fraction).floor() as usize;
        if w.index < cut {
            train.push(i);
        } else {
            held.push(i);
        }
    }
    (train, held)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn series(values: &[f64]) -> Series {
        Series {
            device: "d".to_owned(),
            source: "s".to_owned(),
            stream: "t".to_owned(),
            field: "v".to_owned(),
            points: values
                .iter()
                .enumerate()
                .map(|(i, &value)| Point {
                    seq: i as i64 + 1,
                    ts_ms: i as i64 * 1000,
                    value,
                })
                .collect(),
        }
    }

    #[test]
    fn windows_close_like_the_agent() {
        let s = series(&(0..10).map(f64::from).collect::<Vec<_>>());
        let w = cut(0, &s, 4, 3).unwrap();
        // Ends at steps 4, 7, 10 (points 3, 6, 9).
        assert_eq!(w.iter().map(|w| w.end_seq).collect::<Vec<_>>(), [4, 7, 10]);
        assert_eq!(w[1].values, [3.0, 4.0, 5.0, 6.0]);
        assert!(cut(0, &series(&[1.0, 2.0]), 4, 3).unwrap().is_empty());
    }

    #[test]
    fn non_finite_is_named() {
        let err = cut(0, &series(&[1.0, f64::NAN, 2.0]), 2, 1).unwrap_err();
        assert!(err.to_string().contains("at seq 2"), "{err}");
    }

    #[test]
    fn stats_by_hand() {
        // 1, 2, 4: mean 7/3, population var ((4/3)^2 + (1/3)^2 + (5/3)^2)/3 = 14/9;
        // slope: sum (i-1)(x-mean) / 2 = ((-1)(-4/3) + (1)(5/3)) / 2 = 1.5.
        let [mean, std, min, max, slope] = stats(&[1.0, 2.0, 4.0]);
        assert!((mean - 7.0 / 3.0).abs() < 1e-12);
        assert!((std - (14.0f64 / 9.0).sqrt()).abs() < 1e-12);
        assert_eq!((min, max), (1.0, 4.0));
        assert!((slope - 1.5).abs() < 1e-12);
        assert_eq!(stats(&[3.0])[4], 0.0);
    }

    #[test]
    fn split_is_chronological_per_series() {
        let s = series(&(0..20).map(f64::from).collect::<Vec<_>>());
        let mut w = cut(0, &s, 2, 2).unwrap();
        w.extend(cut(1, &s, 2, 2).unwrap());
        let (train, held) = split(&w, 0.7);
        assert_eq!(train.len(), 14);
        assert!(held.iter().all(|&i| w[i].index >= 7));
        assert_eq!(label_at(&s.points, 2500), Some(true));
        assert_eq!(label_at(&s.points, -1), None);
    }
}
