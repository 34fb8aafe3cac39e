//! Pure drift statistics: per-feature window accumulators, the horizon they
//! are judged over, PSI against bins derived from the package baseline, and
//! per-window score statistics. No I/O, no clocks: callers pass time in.
//!
//! Design: a package's `[[baseline.features]]` holds only mean, std, min and
//! max, so the expected distribution is the normal one they imply. Bin
//! edges are `mean + k * std` for `k = -3..=3` (eight bins, the outer two
//! open-ended) and the expected share of each bin is the standard normal's
//! mass between those edges (`EXPECTED`). An empty live bin counts as
//! [`PSI_EPSILON`] so the logarithm stays finite.

use std::collections::VecDeque;

use rand::Rng;

/// Bin edges in baseline standard deviations from the baseline mean.
pub const EDGES_STD: [f64; 7] = [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0];

/// Standard normal mass of each bin between [`EDGES_STD`] (sums to 1).
pub const EXPECTED: [f64; 8] = [
    0.001_349_898_031_630_1,
    0.021_400_233_916_549_1,
    0.135_905_121_983_278_4,
    0.341_344_746_068_542_9,
    0.341_344_746_068_542_9,
    0.135_905_121_983_278_4,
    0.021_400_233_916_549_1,
    0.001_349_898_031_630_1,
];

/// Share counted for an empty live bin.
pub const PSI_EPSILON: f64 = 1e-4;

/// Scores kept per window for the approximate median.
const RESERVOIR: usize = 512;

/// One feature's training statistics (from the package).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureBaseline {
    /// Stream.
    pub stream: String,
    /// Field.
    pub field: String,
    /// Training mean.
    pub mean: f64,
    /// Training standard deviation (no PSI or mean shift when 0).
    pub std: f64,
}

/// Population stability index of `counts` (one per bin of [`EDGES_STD`])
/// against [`EXPECTED`]: `sum((a - e) * ln(a / e))` over bins, where `a` is
/// the live share (at least [`PSI_EPSILON`]). `None` for no values.
#[must_use]
pub fn psi(counts: &[u64; 8]) -> Option<f64> {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return None;
    }
    let n = n as f64;
    Some(
        counts
            .iter()
            .zip(EXPECTED)
            .map(|(&c, e)| {
                let a = (c as f64 / n).max(PSI_EPSILON);
                (a - e) * (a / e).ln()
            })
            .sum(),
    )
}

/// The bin of `x` for a baseline of `mean`, `std > 0`.
#[must_use]
pub fn bin(x: f64, mean: f64, std: f64) -> usize {
    let z = (x - mean) / std;
    EDGES_STD.iter().take_while(|&&e| z >= e).count()
}

/// Sums of one window of one feature (mergeable over the horizon).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moments {
    /// Finite values.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Sum of squared deviations from the running mean (Welford).
    m2: f64,
    mean: f64,
    /// Smallest value.
    pub min: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
    /// Values per baseline bin.
    pub bins: [u64; 8],
}

impl Moments {
    /// Adds one finite value.
    pub fn push(&mut self, x: f64, base: &FeatureBaseline) {
        self.count += 1;
        self.sum += x;
        let d = x - self.mean;
        self.mean += d / self.count as f64;
        self.m2 += d * (x - self.mean);
        self.min = Some(self.min.map_or(x, |m| m.min(x)));
        self.max = Some(self.max.map_or(x, |m| m.max(x)));
        if base.std > 0.0 {
            self.bins[bin(x, base.mean, base.std)] += 1;
        }
    }

    /// Mean, `None` without values.
    #[must_use]
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// Population standard deviation, `None` without values.
    #[must_use]
    pub fn std(&self) -> Option<f64> {
        (self.count > 0).then(|| (self.m2 / self.count as f64).max(0.0).sqrt())
    }
}

/// One feature: the open window and the closed windows of the horizon.
#[derive(Debug, Clone)]
pub struct FeatureState {
    /// The baseline it is judged against.
    pub base: FeatureBaseline,
    /// The open window.
    pub window: Moments,
    /// Values missing or non-finite in the open window.
    pub missing: u64,
    horizon: VecDeque<Moments>,
}

/// A feature's figures for one closed window.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    /// The window's own moments.
    pub window: Moments,
    /// Values missing in the window.
    pub missing: u64,
    /// Values in the horizon (this window and up to `horizon - 1` before).
    pub horizon_count: u64,
    /// PSI over the horizon, when judged.
    pub psi: Option<f64>,
    /// Mean shift over the horizon in baseline std, when judged.
    pub mean_shift: Option<f64>,
}

impl FeatureState {
    /// An empty state for `base`.
    #[must_use]
    pub fn new(base: FeatureBaseline) -> Self {
        Self {
            base,
            window: Moments::default(),
            missing: 0,
            horizon: VecDeque::new(),
        }
    }

    /// Adds one reading's value of this feature (`None` or non-finite is
    /// missing).
    pub fn observe(&mut self, v: Option<f64>) {
        match v {
            Some(x) if x.is_finite() => self.window.push(x, &self.base),
            _ => self.missing += 1,
        }
    }

    /// Closes the open window into the horizon (`horizon` windows long) and
    /// judges the horizon once it holds `horizon` windows and at least
    /// `min_samples` values; opens a new window.
    pub fn close(&mut self, horizon: usize, min_samples: u64) -> Judged {
        let window = std::mem::take(&mut self.window);
        let missing = std::mem::take(&mut self.missing);
        self.horizon.push_back(window.clone());
        while self.horizon.len() > horizon.max(1) {
            self.horizon.pop_front();
        }
        let count: u64 = self.horizon.iter().map(|m| m.count).sum();
        let judge = self.horizon.len() >= horizon.max(1) && count >= min_samples.max(1);
        let (psi_v, shift) = if judge && self.base.std > 0.0 {
            let mut bins = [0u64; 8];
            for m in &self.horizon {
                for (b, c) in bins.iter_mut().zip(m.bins) {
                    *b += c;
                }
            }
            let mean = self.horizon.iter().map(|m| m.sum).sum::<f64>() / count as f64;
            (psi(&bins), Some((mean - self.base.mean) / self.base.std))
        } else {
            (None, None)
        };
        Judged {
            window,
            missing,
            horizon_count: count,
            psi: psi_v,
            mean_shift: shift,
        }
    }
}

/// Scores of one window.
#[derive(Debug, Clone, Default)]
pub struct ScoreWindow {
    /// Scores seen.
    pub count: u64,
    /// Scores over the baseline p99.
    pub over_p99: u64,
    /// Scores flagged anomalous.
    pub anomalies: u64,
    sample: Vec<f64>,
}

impl ScoreWindow {
    /// Adds one score.
    pub fn push(&mut self, score: f64, anomaly: bool, p99: Option<f64>) {
        self.count += 1;
        self.over_p99 += u64::from(p99.is_some_and(|p| score > p));
        self.anomalies += u64::from(anomaly);
        // Design: reservoir sampling (algorithm R) bounds memory per window.
        if self.sample.len() < RESERVOIR {
            self.sample.push(score);
        } else {
            let j = rand::rng().random_range(0..self.count);
            if let Some(slot) = usize::try_from(j).ok().and_then(|j| self.sample.get_mut(j)) {
                *slot = score;
            }
        }
    }

    /// Median of the sample, `None` without scores.
    #[must_use]
    pub fn median(&self) -> Option<f64> {
        let mut s: Vec<f64> = self
            .sample
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let n = s.len();
        Some(if n % 2 == 1 {
            s[n / 2]
        } else {
            f64::midpoint(s[n / 2 - 1], s[n / 2])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> FeatureBaseline {
        FeatureBaseline {
            stream: "t".into(),
            field: "value".into(),
            mean: 10.0,
            std: 2.0,
        }
    }

    /// Deterministic standard-normal-ish values (Box-Muller over a LCG).
    fn normal(n: usize, mean: f64, std: f64) -> Vec<f64> {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut u = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let z = (-2.0 * u().ln()).sqrt() * (2.0 * std::f64::consts::PI * u()).cos();
                mean + std * z
            })
            .collect()
    }

    #[test]
    fn expected_shares_sum_to_one() {
        assert!((EXPECTED.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psi_of_the_baseline_distribution_is_about_zero_and_of_a_shifted_one_large() {
        let mut same = FeatureState::new(base());
        for x in normal(20_000, 10.0, 2.0) {
            same.observe(Some(x));
        }
        let j = same.close(1, 100);
        let p = j.psi.unwrap_or(f64::NAN);
        assert!(p < 0.01, "psi of identical distributions {p}");
        assert!(j.mean_shift.is_some_and(|m| m.abs() < 0.05));

        let mut shifted = FeatureState::new(base());
        for x in normal(20_000, 10.0 + 2.0 * 2.0, 2.0) {
            shifted.observe(Some(x));
        }
        let j = shifted.close(1, 100);
        assert!(j.psi.is_some_and(|p| p > 1.0), "psi {:?}", j.psi);
        let shift = j.mean_shift.unwrap_or(f64::NAN);
        assert!((shift - 2.0).abs() < 0.05, "mean shift {shift}");
    }

    #[test]
    fn the_horizon_must_fill_and_hold_min_samples_before_judging() {
        let mut f = FeatureState::new(base());
        f.observe(Some(10.0));
        f.observe(None);
        f.observe(Some(f64::NAN));
        let j = f.close(2, 1);
        assert_eq!((j.window.count, j.missing), (1, 2));
        assert!(j.psi.is_none(), "one window of two is not judged");
        f.observe(Some(12.0));
        let j = f.close(2, 3);
        assert!(j.psi.is_none(), "two values < min_samples 3");
        assert_eq!(j.horizon_count, 2);
        f.observe(Some(14.0));
        f.observe(Some(14.0));
        let j = f.close(2, 3);
        assert_eq!(j.horizon_count, 3, "the first window left the horizon");
        let shift = j.mean_shift.unwrap_or(f64::NAN);
        assert!((shift - (40.0 / 3.0 - 10.0) / 2.0).abs() < 1e-9, "{shift}");
    }

    #[test]
    fn a_zero_std_baseline_is_never_judged() {
        let mut f = FeatureState::new(FeatureBaseline { std: 0.0, ..base() });
        f.observe(Some(50.0));
        let j = f.close(1, 1);
        assert_eq!((j.psi, j.mean_shift), (None, None));
        assert_eq!(j.window.mean(), Some(50.0));
    }

    #[test]
    fn bins_and_window_moments() {
        assert_eq!(bin(10.0 - 7.0, 10.0, 2.0), 0);
        assert_eq!(bin(10.0, 10.0, 2.0), 4);
        assert_eq!(bin(10.0 + 7.0, 10.0, 2.0), 7);
        let mut m = Moments::default();
        for x in [1.0, 2.0, 3.0, 4.0] {
            m.push(x, &base());
        }
        assert_eq!(m.mean(), Some(2.5));
        assert!((m.std().unwrap_or(0.0) - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!((m.min, m.max), (Some(1.0), Some(4.0)));
    }

    #[test]
    fn score_window_shares_and_median() {
        let mut s = ScoreWindow::default();
        for i in 0..101 {
            s.push(f64::from(i), i >= 99, Some(97.5));
        }
        assert_eq!((s.count, s.over_p99, s.anomalies), (101, 3, 2));
        assert_eq!(s.median(), Some(50.0));
    }
}
