//! Features: the typed input side of a validated manifest, and the pure
//! functions that turn per-source readings into input-tensor rows.
//!
//! Owns aligning several streams of one source into time steps (the first
//! feature's stream is the clock), late and out-of-order handling, the gap
//! policy, missing-value (NaN) policy and the per-window transforms. No I/O,
//! no tract: everything here is deterministic and unit-tested.
//!
//! Invariants: a row always has [`InputPlan::row_width`] values, in feature
//! order (all of feature 0's values, then feature 1's, ...); only
//! [`InputPlan::lay_out`] reorders them, into the tensor order of the
//! model's [`Layout`]. A time step never goes backwards in device time (late
//! readings are dropped and counted, never reordered past what was already
//! emitted).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use super::window::{Window, Windower};

/// A per-window statistic of one feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// Arithmetic mean.
    Mean,
    /// Population standard deviation (divides by n).
    Std,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Least-squares slope against the step index (value units per step).
    Slope,
}

impl Stat {
    /// Parses a manifest name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "mean" => Self::Mean,
            "std" => Self::Std,
            "min" => Self::Min,
            "max" => Self::Max,
            "slope" => Self::Slope,
            _ => return None,
        })
    }
}

/// How one feature's window becomes part of the input row.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// The window as is (`window` values).
    Raw,
    /// `(x - mean) / std` for each value (`window` values).
    ZScore {
        /// Subtracted.
        mean: f64,
        /// Divided by; positive.
        std: f64,
    },
    /// `(x - min) / (max - min)` for each value (`window` values).
    MinMax {
        /// Maps to 0.
        min: f64,
        /// Maps to 1; above `min`.
        max: f64,
    },
    /// One value per statistic, in the listed order.
    Stats(Vec<Stat>),
}

/// One validated input feature.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    /// Stream.
    pub stream: String,
    /// Field within the stream's readings.
    pub field: String,
    /// Transform.
    pub transform: Transform,
    /// Training mean (from the baseline), used when imputing a window with
    /// no finite value at all.
    pub baseline_mean: f64,
}

pub use sync_protocol::layout::{InputShape, Layout};

/// What a window holding a missing value gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NanPolicy {
    /// Not scored; counted.
    Skip,
    /// Last value carried forward (leading gaps: next value carried back; a
    /// feature with no value in the window: its baseline mean).
    Impute,
}

/// The validated `[input]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct InputPlan {
    /// Features, in row order; `features[0].stream` is the clock.
    pub features: Vec<Feature>,
    /// Time steps per window.
    pub window: usize,
    /// Time steps between windows.
    pub hop: usize,
    /// Rows per tract run.
    pub batch_size: usize,
    /// Gap in device time that restarts the window; 0 = never.
    pub max_gap_ms: u64,
    /// Clock readings held back for reordering.
    pub reorder_readings: usize,
    /// Take late readings in arrival order instead of dropping them.
    pub accept_late: bool,
    /// Missing-value policy.
    pub nan_policy: NanPolicy,
    /// Shape of the input tensor. A rank-3 layout implies every transform
    /// yields one value per time step (checked when the manifest is read).
    pub layout: Layout,
}

impl InputPlan {
    /// The clock stream.
    #[must_use]
    pub fn clock(&self) -> &str {
        self.features.first().map_or("", |f| f.stream.as_str())
    }

    /// Whether readings of `stream` feed this model.
    #[must_use]
    pub fn reads(&self, stream: &str) -> bool {
        self.features.iter().any(|f| f.stream == stream)
    }

    /// Values per input row.
    #[must_use]
    pub fn row_width(&self) -> usize {
        self.features
            .iter()
            .map(|f| match &f.transform {
                Transform::Stats(s) => s.len(),
                _ => self.window,
            })
            .sum()
    }

    /// The input this plan feeds, without the batch dimension.
    #[must_use]
    pub fn input_shape(&self) -> InputShape {
        InputShape {
            layout: self.layout,
            width: self.row_width(),
            fields: self.features.len(),
            window: self.window,
        }
    }

    /// Shape of the input tensor for `rows` rows: `[rows, width]`,
    /// `[rows, fields, window]` or `[rows, window, fields]` per [`Layout`].
    #[must_use]
    pub fn tensor_shape(&self, rows: usize) -> Vec<usize> {
        self.input_shape().dims(rows)
    }

    /// Appends one row (in feature order, as [`build_row`] makes it) to
    /// `out` in the tensor's row-major order. `row` must hold
    /// [`InputPlan::row_width`] values.
    pub fn lay_out(&self, row: &[f32], out: &mut Vec<f32>) {
        self.input_shape().lay_out(row, out);
    }
}

/// Why a window produced no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// The window holds a missing value and the policy is `skip`.
    #[error("window holds a missing or non-finite value (nan_policy = \"skip\")")]
    Missing,
}

/// Builds the input row of one window: imputation (per policy), then each
/// feature's transform, concatenated in feature order.
///
/// # Errors
/// [`RowError::Missing`] under [`NanPolicy::Skip`] when a value is missing.
pub fn build_row(plan: &InputPlan, steps: &[Vec<f32>]) -> Result<Vec<f32>, RowError> {
    let mut row = Vec::with_capacity(plan.row_width());
    for (i, feature) in plan.features.iter().enumerate() {
        let mut col: Vec<f64> = steps
            .iter()
            .map(|s| s.get(i).map_or(f64::NAN, |v| f64::from(*v)))
            .collect();
        if col.iter().any(|v| !v.is_finite()) {
            match plan.nan_policy {
                NanPolicy::Skip => return Err(RowError::Missing),
                NanPolicy::Impute => impute(&mut col, feature.baseline_mean),
            }
        }
        #[allow(clippy::cast_possible_truncation)]
        match &feature.transform {
            Transform::Raw => row.extend(col.iter().map(|v| *v as f32)),
            Transform::ZScore { mean, std } => {
                row.extend(col.iter().map(|v| ((v - mean) / std) as f32));
            }
            Transform::MinMax { min, max } => {
                row.extend(col.iter().map(|v| ((v - min) / (max - min)) as f32));
            }
            Transform::Stats(stats) => {
                row.extend(stats.iter().map(|s| stat(*s, &col) as f32));
            }
        }
    }
    Ok(row)
}

fn impute(col: &mut [f64], fallback: f64) {
    let Some(first) = col.iter().copied().find(|v| v.is_finite()) else {
        col.fill(fallback);
        return;
    };
    let mut last = first;
    for v in col.iter_mut() {
        if v.is_finite() {
            last = *v;
        } else {
            *v = last;
        }
    }
}

/// One statistic of a column (non-empty, finite).
#[must_use]
#[allow(clippy::cast_precision_loss)]
pub fn stat(s: Stat, col: &[f64]) -> f64 {
    let n = col.len() as f64;
    let mean = col.iter().sum::<f64>() / n;
    match s {
        Stat::Mean => mean,
        Stat::Std => (col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt(),
        Stat::Min => col.iter().copied().fold(f64::INFINITY, f64::min),
        Stat::Max => col.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Stat::Slope => {
            let t_mean = (n - 1.0) / 2.0;
            let (mut num, mut den) = (0.0, 0.0);
            for (t, v) in col.iter().enumerate() {
                let dt = t as f64 - t_mean;
                num += dt * (v - mean);
                den += dt * dt;
            }
            if den == 0.0 { 0.0 } else { num / den }
        }
    }
}

/// What one reading did to a source's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pushed {
    /// Windows that closed, oldest first.
    pub windows: Vec<Window<Vec<f32>>>,
    /// 1 when the reading was older than what was already used (dropped).
    pub late: u64,
    /// Windows restarted because of a device-time gap.
    pub gap_resets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    ts: i64,
    seq: u64,
    has_ts: bool,
    values: Vec<OrdF32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct OrdF32(f32);

impl Eq for OrdF32 {}

impl PartialOrd for OrdF32 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrdF32 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The state of one model for one source device: latest values of the
/// non-clock streams, the reorder buffer, and the window of time steps.
#[derive(Debug, Clone)]
pub struct SourceState {
    windower: Windower<Vec<f32>>,
    /// Per feature: latest `(value, ts)` for features off the clock stream.
    latest: Vec<Option<(f32, Option<i64>)>>,
    held: BinaryHeap<Reverse<Held>>,
    last_ts: Option<i64>,
}

impl SourceState {
    /// Empty state for `plan`.
    #[must_use]
    pub fn new(plan: &InputPlan) -> Self {
        Self {
            windower: Windower::new(plan.window, plan.hop),
            latest: vec![None; plan.features.len()],
            held: BinaryHeap::new(),
            last_ts: None,
        }
    }

    /// Offers one committed reading.
    ///
    /// Readings of a non-clock stream update that stream's latest values.
    /// A clock reading becomes a time step (after at most
    /// `reorder_readings` others arrived, in device-time order); a reading
    /// whose device time is before the last time step's is late: dropped
    /// and reported in [`Pushed::late`].
    pub fn push(
        &mut self,
        plan: &InputPlan,
        stream: &str,
        seq: u64,
        ts: Option<i64>,
        values: &BTreeMap<String, f64>,
    ) -> Pushed {
        let mut out = Pushed::default();
        let is_late = |held_ts: Option<i64>| {
            !plan.accept_late && matches!((ts, held_ts), (Some(t), Some(h)) if t < h)
        };
        if stream != plan.clock() {
            for (i, f) in plan.features.iter().enumerate() {
                if f.stream != stream {
                    continue;
                }
                let Some(v) = values.get(&f.field) else {
                    continue;
                };
                if is_late(self.latest[i].and_then(|(_, t)| t)) {
                    out.late = 1;
                    continue;
                }
                #[allow(clippy::cast_possible_truncation)]
                let value = *v as f32;
                self.latest[i] = Some((value, ts));
            }
            return out;
        }
        #[allow(clippy::cast_possible_truncation)]
        let clock_values: Vec<Option<f32>> = plan
            .features
            .iter()
            .map(|f| (f.stream == stream).then(|| values.get(&f.field).map(|v| *v as f32)))
            .map(Option::flatten)
            .collect();
        if clock_values.iter().all(Option::is_none) {
            return out;
        }
        if is_late(self.last_ts) {
            out.late = 1;
            return out;
        }
        self.held.push(Reverse(Held {
            ts: ts.unwrap_or(i64::MIN),
            seq,
            has_ts: ts.is_some(),
            values: clock_values
                .iter()
                .map(|v| OrdF32(v.unwrap_or(f32::NAN)))
                .collect(),
        }));
        while self.held.len() > plan.reorder_readings {
            let Some(Reverse(h)) = self.held.pop() else {
                break;
            };
            self.step(plan, h, &mut out);
        }
        out
    }

    fn step(&mut self, plan: &InputPlan, h: Held, out: &mut Pushed) {
        let ts = h.has_ts.then_some(h.ts);
        if let (Some(t), Some(last)) = (ts, self.last_ts)
            && plan.max_gap_ms > 0
            && t.saturating_sub(last) > i64::try_from(plan.max_gap_ms).unwrap_or(i64::MAX)
        {
            self.windower.reset();
            out.gap_resets += 1;
        }
        if ts.is_some() {
            self.last_ts = ts;
        }
        let clock = plan.clock();
        let max_gap = i64::try_from(plan.max_gap_ms).unwrap_or(i64::MAX);
        let step: Vec<f32> = plan
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if f.stream == clock {
                    return h.values.get(i).map_or(f32::NAN, |v| v.0);
                }
                match self.latest[i] {
                    Some((v, vts)) => match (ts, vts) {
                        (Some(t), Some(vt))
                            if plan.max_gap_ms > 0
                                && t.saturating_sub(vt).saturating_abs() > max_gap =>
                        {
                            f32::NAN
                        }
                        _ => v,
                    },
                    None => f32::NAN,
                }
            })
            .collect();
        if let Some(w) = self.windower.push(step, h.seq, ts) {
            out.windows.push(w);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn feature(stream: &str, field: &str, transform: Transform) -> Feature {
        Feature {
            stream: stream.into(),
            field: field.into(),
            transform,
            baseline_mean: 50.0,
        }
    }

    fn plan(features: Vec<Feature>, window: usize, hop: usize) -> InputPlan {
        InputPlan {
            features,
            window,
            hop,
            batch_size: 1,
            max_gap_ms: 0,
            reorder_readings: 0,
            accept_late: false,
            nan_policy: NanPolicy::Skip,
            layout: Layout::Flat,
        }
    }

    fn vals(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn stats_match_hand_computed_values() {
        let col = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert_eq!(stat(Stat::Mean, &col), 5.0);
        assert_eq!(stat(Stat::Std, &col), 2.0);
        assert_eq!(stat(Stat::Min, &col), 2.0);
        assert_eq!(stat(Stat::Max, &col), 9.0);
        // y = 3 + 2t exactly.
        assert_eq!(stat(Stat::Slope, &[3.0, 5.0, 7.0, 9.0]), 2.0);
        assert_eq!(stat(Stat::Slope, &[4.0]), 0.0);
    }

    #[test]
    fn transforms_build_the_row_in_feature_order() {
        let p = plan(
            vec![
                feature("a", "x", Transform::Raw),
                feature(
                    "a",
                    "y",
                    Transform::ZScore {
                        mean: 10.0,
                        std: 2.0,
                    },
                ),
                feature("a", "z", Transform::MinMax { min: 0.0, max: 4.0 }),
                feature(
                    "a",
                    "w",
                    Transform::Stats(vec![Stat::Max, Stat::Mean, Stat::Slope]),
                ),
            ],
            2,
            1,
        );
        let steps = vec![vec![1.0, 12.0, 1.0, 3.0], vec![2.0, 8.0, 4.0, 5.0]];
        let row = build_row(&p, &steps).unwrap();
        assert_eq!(row, vec![1.0, 2.0, 1.0, -1.0, 0.25, 1.0, 5.0, 4.0, 2.0]);
        assert_eq!(row.len(), p.row_width());
    }

    /// Distinct values per (feature, step) pin both orders: value `10 * f + t`
    /// for feature `f` at step `t`.
    #[test]
    fn layouts_order_a_multi_field_window() {
        let mut p = plan(
            vec![
                feature("a", "x", Transform::Raw),
                feature("a", "y", Transform::Raw),
            ],
            3,
            1,
        );
        let steps = vec![vec![0.0, 10.0], vec![1.0, 11.0], vec![2.0, 12.0]];
        let row = build_row(&p, &steps).unwrap();
        assert_eq!(row, vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0], "feature order");
        let laid = |p: &InputPlan| {
            let mut out = Vec::new();
            p.lay_out(&row, &mut out);
            out
        };
        assert_eq!(laid(&p), row);
        assert_eq!(p.tensor_shape(4), vec![4, 6]);
        p.layout = Layout::ChannelsFirst;
        assert_eq!(laid(&p), row, "[fields][window]");
        assert_eq!(p.tensor_shape(4), vec![4, 2, 3]);
        p.layout = Layout::ChannelsLast;
        assert_eq!(
            laid(&p),
            vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0],
            "[window][fields]"
        );
        assert_eq!(p.tensor_shape(1), vec![1, 3, 2]);
        for l in [Layout::Flat, Layout::ChannelsFirst, Layout::ChannelsLast] {
            assert_eq!(Layout::parse(l.name()), Some(l));
        }
        assert_eq!(Layout::parse("time_major"), None);
    }

    #[test]
    fn nan_policy_skip_refuses_and_impute_fills() {
        let mut p = plan(
            vec![
                feature("a", "x", Transform::Raw),
                feature("a", "y", Transform::Raw),
            ],
            4,
            1,
        );
        let steps = vec![
            vec![f32::NAN, f32::NAN],
            vec![2.0, f32::NAN],
            vec![f32::NAN, f32::NAN],
            vec![4.0, f32::NAN],
        ];
        assert_eq!(build_row(&p, &steps), Err(RowError::Missing));
        p.nan_policy = NanPolicy::Impute;
        assert_eq!(
            build_row(&p, &steps).unwrap(),
            vec![2.0, 2.0, 2.0, 4.0, 50.0, 50.0, 50.0, 50.0]
        );
    }

    #[test]
    fn two_streams_align_on_the_clock_stream() {
        let p = plan(
            vec![
                feature("temp", "value", Transform::Raw),
                feature("vib", "rms", Transform::Raw),
            ],
            2,
            1,
        );
        let mut s = SourceState::new(&p);
        // No vibration yet: the first step has a missing vibration value.
        assert!(
            s.push(&p, "temp", 1, Some(1000), &vals(&[("value", 1.0)]))
                .windows
                .is_empty()
        );
        s.push(&p, "vib", 2, Some(1500), &vals(&[("rms", 0.5)]));
        let w = s.push(&p, "temp", 3, Some(2000), &vals(&[("value", 2.0)]));
        assert_eq!(w.windows.len(), 1);
        assert_eq!(w.windows[0].values[0][0], 1.0);
        assert!(w.windows[0].values[0][1].is_nan());
        assert_eq!(w.windows[0].values[1], vec![2.0, 0.5]);
        assert_eq!(w.windows[0].end_seq, 3);
        // A reading of another stream or without the field is no time step.
        assert!(
            s.push(&p, "other", 4, Some(2100), &vals(&[("value", 9.0)]))
                .windows
                .is_empty()
        );
        assert!(
            s.push(&p, "temp", 5, Some(2200), &vals(&[("nope", 9.0)]))
                .windows
                .is_empty()
        );
        let w = s.push(&p, "temp", 6, Some(3000), &vals(&[("value", 3.0)]));
        assert_eq!(w.windows[0].values, vec![vec![2.0, 0.5], vec![3.0, 0.5]]);
    }

    #[test]
    fn late_readings_are_dropped_and_counted() {
        let p = plan(vec![feature("t", "v", Transform::Raw)], 2, 1);
        let mut s = SourceState::new(&p);
        s.push(&p, "t", 1, Some(1000), &vals(&[("v", 1.0)]));
        let late = s.push(&p, "t", 2, Some(999), &vals(&[("v", 9.0)]));
        assert_eq!(late.late, 1);
        assert!(late.windows.is_empty());
        // Same device time is not late.
        let w = s.push(&p, "t", 3, Some(1000), &vals(&[("v", 2.0)]));
        assert_eq!(w.late, 0);
        assert_eq!(w.windows[0].values, vec![vec![1.0], vec![2.0]]);
        // late_policy = "accept": taken in arrival order.
        let mut p = p;
        p.accept_late = true;
        let mut s = SourceState::new(&p);
        s.push(&p, "t", 1, Some(1000), &vals(&[("v", 1.0)]));
        let r = s.push(&p, "t", 2, Some(999), &vals(&[("v", 9.0)]));
        assert_eq!(r.late, 0);
        assert_eq!(r.windows[0].values, vec![vec![1.0], vec![9.0]]);
    }

    #[test]
    fn out_of_order_within_the_reorder_buffer_is_reordered() {
        let mut p = plan(vec![feature("t", "v", Transform::Raw)], 3, 1);
        p.reorder_readings = 1;
        let mut s = SourceState::new(&p);
        let mut windows = Vec::new();
        let mut late = 0;
        for (seq, ts) in [(1, 100), (2, 300), (3, 200), (4, 400), (5, 150), (6, 500)] {
            #[allow(clippy::cast_precision_loss)]
            let r = s.push(&p, "t", seq, Some(ts), &vals(&[("v", ts as f64)]));
            late += r.late;
            windows.extend(r.windows);
        }
        // 150 arrives after 200 was used: late. 200 and 300 are swapped back.
        assert_eq!(late, 1);
        let got: Vec<Vec<f32>> = windows
            .iter()
            .map(|w| w.values.iter().map(|s| s[0]).collect())
            .collect();
        assert_eq!(
            got,
            vec![vec![100.0, 200.0, 300.0], vec![200.0, 300.0, 400.0]]
        );
    }

    #[test]
    fn a_gap_restarts_the_window() {
        let mut p = plan(vec![feature("t", "v", Transform::Raw)], 2, 1);
        p.max_gap_ms = 500;
        let mut s = SourceState::new(&p);
        s.push(&p, "t", 1, Some(0), &vals(&[("v", 1.0)]));
        let r = s.push(&p, "t", 2, Some(1000), &vals(&[("v", 2.0)]));
        assert_eq!(r.gap_resets, 1);
        assert!(r.windows.is_empty());
        let r = s.push(&p, "t", 3, Some(1400), &vals(&[("v", 3.0)]));
        assert_eq!(r.windows[0].values, vec![vec![2.0], vec![3.0]]);
    }

    #[test]
    fn stale_secondary_values_count_as_missing() {
        let mut p = plan(
            vec![
                feature("t", "v", Transform::Raw),
                feature("u", "w", Transform::Raw),
            ],
            1,
            1,
        );
        p.max_gap_ms = 100;
        let mut s = SourceState::new(&p);
        s.push(&p, "u", 1, Some(0), &vals(&[("w", 7.0)]));
        let r = s.push(&p, "t", 2, Some(50), &vals(&[("v", 1.0)]));
        assert_eq!(r.windows[0].values, vec![vec![1.0, 7.0]]);
        let r = s.push(&p, "t", 3, Some(120), &vals(&[("v", 2.0)]));
        assert!(r.windows[0].values[0][1].is_nan());
    }
}
