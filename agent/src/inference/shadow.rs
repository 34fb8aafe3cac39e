//! Shadow mode: a candidate version scored on the same windows as the
//! active model, compared, never stored or published.
//!
//! Owns the comparison statistics of one candidate. The stage runs the
//! candidate right after the active model on the same rows and feeds both
//! results here; every [`REPORT_EVERY`] compared windows (and when the
//! candidate leaves) it yields a cumulative [`ShadowSummary`] that the
//! watcher queues as a `shadow` rollout report.

use sync_protocol::registry::ShadowSummary;

use super::LoadedModel;

/// Compared windows between two summaries.
pub const REPORT_EVERY: u64 = 100;

/// A change of one model's shadow candidate, sent by the watcher.
pub struct ShadowUpdate {
    /// The active model's name.
    pub name: String,
    /// The new candidate (verified like any version), or `None` to stop.
    pub model: Option<LoadedModel>,
}

/// A summary for the registry: `(model, candidate version, summary)`.
pub type ShadowReport = (String, String, ShadowSummary);

/// A running shadow candidate.
pub struct Shadow {
    /// The candidate.
    pub model: LoadedModel,
    windows: u64,
    sum_abs_diff: f64,
    max_abs_diff: f64,
    agree: u64,
    errors: u64,
    reported_at: u64,
}

impl Shadow {
    /// Starts comparing `model`.
    #[must_use]
    pub fn new(model: LoadedModel) -> Self {
        Self {
            model,
            windows: 0,
            sum_abs_diff: 0.0,
            max_abs_diff: 0.0,
            agree: 0,
            errors: 0,
            reported_at: 0,
        }
    }

    /// One window: the active model's `(score, is_anomaly)` and the
    /// candidate's, `None` when the candidate failed to score it.
    pub fn compare(&mut self, active: (f64, bool), candidate: Option<(f64, bool)>) {
        let Some((score, anomaly)) = candidate else {
            self.errors += 1;
            return;
        };
        let diff = (score - active.0).abs();
        self.windows += 1;
        self.sum_abs_diff += diff;
        self.max_abs_diff = self.max_abs_diff.max(diff);
        self.agree += u64::from(anomaly == active.1);
    }

    /// The `rows` windows of a run the candidate could not score at all.
    pub fn failed(&mut self, rows: u64) {
        self.errors += rows;
    }

    /// The cumulative summary so far.
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn summary(&self) -> ShadowSummary {
        let n = self.windows.max(1) as f64;
        ShadowSummary {
            windows: self.windows,
            mean_abs_diff: self.sum_abs_diff / n,
            max_abs_diff: self.max_abs_diff,
            agreement: if self.windows == 0 {
                0.0
            } else {
                self.agree as f64 / n
            },
            candidate_errors: self.errors,
        }
    }

    /// A summary when [`REPORT_EVERY`] more windows were compared (or
    /// failed) since the last one.
    pub fn due(&mut self) -> Option<ShadowSummary> {
        let seen = self.windows + self.errors;
        if seen >= self.reported_at + REPORT_EVERY {
            self.reported_at = seen;
            Some(self.summary())
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn summary_is_cumulative_and_due_every_hundred() {
        let mut s = Shadow::new(fake());
        for i in 0..99 {
            s.compare((1.0, false), Some((1.5, i % 3 == 0)));
        }
        assert!(s.due().is_none());
        s.compare((1.0, true), None);
        let sum = s.due().unwrap();
        assert_eq!(sum.windows, 99);
        assert_eq!(sum.candidate_errors, 1);
        assert!((sum.mean_abs_diff - 0.5).abs() < 1e-12);
        assert!((sum.max_abs_diff - 0.5).abs() < 1e-12);
        assert!((sum.agreement - 66.0 / 99.0).abs() < 1e-12);
        assert!(s.due().is_none());
    }

    fn fake() -> LoadedModel {
        LoadedModel::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp"),
        )
        .unwrap()
    }
}
