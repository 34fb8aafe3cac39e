//! The NAB comparison the training script prints: how a detector's flags
//! line up with NAB's labeled anomaly windows.
//!
//! Pure arithmetic over window end timestamps, flags and label spans; the
//! scores come from tract (the caller runs the model), so the shipped and
//! the retrained model are compared on exactly what the agent would compute.

use serde::Serialize;

/// The figures `train_nab_window_detector.py` prints, plus the lift.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NabScore {
    /// Windows scored.
    pub windows: usize,
    /// Windows flagged (score above the threshold).
    pub flagged: usize,
    /// Flags whose window ends inside a labeled span (ends inclusive).
    pub in_labeled: usize,
    /// Flags outside every labeled span.
    pub outside: usize,
    /// Labeled spans holding at least one flag.
    pub detected: usize,
    /// Labeled spans.
    pub spans: usize,
    /// Share of all windows that end inside a labeled span.
    pub labeled_share: f64,
    /// `(in_labeled / flagged) / labeled_share`: how much likelier a flag
    /// falls inside a labeled span than a random window (0 with no flags).
    pub lift: f64,
}

/// Scores flags (`scores > threshold`) of windows ending at `end_ts_ms`
/// against `spans` (`(start_ms, end_ms)`, inclusive).
#[must_use]
pub fn score(end_ts_ms: &[i64], scores: &[f64], threshold: f64, spans: &[(i64, i64)]) -> NabScore {
    let inside = |ts: i64| spans.iter().any(|&(a, b)| ts >= a && ts <= b);
    let flags: Vec<bool> = scores.iter().map(|&s| s > threshold).collect();
    let windows = end_ts_ms.len().min(flags.len());
    let flagged = flags.iter().take(windows).filter(|f| **f).count();
    let in_labeled = (0..windows)
        .filter(|&i| flags[i] && inside(end_ts_ms[i]))
        .count();
    let inside_windows = (0..windows).filter(|&i| inside(end_ts_ms[i])).count();
    let detected = spans
        .iter()
        .filter(|&&(a, b)| (0..windows).any(|i| flags[i] && end_ts_ms[i] >= a && end_ts_ms[i] <= b))
        .count();
    let labeled_share = if windows == 0 {
        0.0
    } else {
        inside_windows as f64 / windows as f64
    };
    let lift = if flagged == 0 || labeled_share == 0.0 {
        0.0
    } else {
        (in_labeled as f64 / flagged as f64) / labeled_share
    };
    NabScore {
        windows,
        flagged,
        in_labeled,
        outside: flagged - in_labeled,
        detected,
        spans: spans.len(),
        labeled_share,
        lift,
    }
}

impl std::fmt::Display for NabScore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "windows={} flagged={} in_labeled={} outside={} labeled_windows_detected={}/{} \
             labeled_share={:.3} lift={:.2}x",
            self.windows,
            self.flagged,
            self.in_labeled,
            self.outside,
            self.detected,
            self.spans,
            self.labeled_share,
            self.lift
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        // 10 windows at t = 0..10; span [2, 3] holds 2 windows (share 0.2), span [8, 8] one.
        let ts: Vec<i64> = (0..10).collect();
        let scores = [0.0, 0.0, 5.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let s = score(&ts, &scores, 1.0, &[(2, 3), (8, 8)]);
        assert_eq!(
            (s.windows, s.flagged, s.in_labeled, s.outside),
            (10, 2, 1, 1)
        );
        assert_eq!((s.detected, s.spans), (1, 2));
        assert!((s.labeled_share - 0.3).abs() < 1e-12);
        assert!((s.lift - 0.5 / 0.3).abs() < 1e-12);
        assert_eq!(score(&ts, &scores, 10.0, &[(2, 3)]).lift, 0.0);
    }
}
