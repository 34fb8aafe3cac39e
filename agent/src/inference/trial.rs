//! Trial windows: the health targets a newly swapped-in model must meet
//! before it is adopted, and the verdict.
//!
//! Owns the statistics of one trial and the rules that turn them into a
//! [`Verdict`]; the stage ([`super::InferenceStage`]) feeds it every run and
//! acts on the verdict (swap back, or adopt), the watcher
//! ([`super::swap::Watcher`]) records the outcome on disk. Pure logic, no
//! I/O, driven by [`tokio::time::Instant`] so tests run under a paused clock.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

/// Health targets of a trial (`[rollout]` in the config).
#[derive(Debug, Clone, PartialEq)]
pub struct TrialSettings {
    /// How long a new version is on trial at least (`trial_secs`).
    pub duration: Duration,
    /// Windows a trial must see before it can pass (`trial_min_windows`).
    pub min_windows: u64,
    /// Largest share of windows that may fail to score: tract errors and
    /// outputs of the wrong width (`max_error_rate`).
    pub max_error_rate: f64,
    /// Largest share of windows whose output is NaN or infinite
    /// (`max_nonfinite_rate`; 0 = none at all).
    pub max_nonfinite_rate: f64,
    /// Budget of the 99th percentile of one tract run (`max_p99_latency_ms`).
    pub max_p99_latency: Duration,
    /// Largest share of windows flagged anomalous (`max_anomaly_rate`).
    pub max_anomaly_rate: f64,
    /// Largest share of scores beyond the training 99th percentile
    /// (`baseline.score_p99` in the package; about 0.01 is expected), when
    /// the package states one (`max_over_p99_share`).
    pub max_over_p99_share: f64,
}

impl Default for TrialSettings {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(600),
            min_windows: 30,
            max_error_rate: 0.01,
            max_nonfinite_rate: 0.0,
            max_p99_latency: Duration::from_millis(500),
            max_anomaly_rate: 0.5,
            max_over_p99_share: 0.25,
        }
    }
}

/// What a trial concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough evidence yet.
    Continue,
    /// Every target met over at least `duration` and `min_windows`.
    Pass,
    /// A target was broken; the reason names it with the figures.
    Fail(String),
}

/// The outcome of a trial, sent by the stage to the watcher.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialOutcome {
    /// Model name.
    pub name: String,
    /// Version that was on trial.
    pub version: String,
    /// Its package directory.
    pub dir: PathBuf,
    /// The version that serves now instead, when rolled back to one.
    pub restored: Option<(String, PathBuf)>,
    /// `None` when adopted, else why it was rolled back.
    pub failure: Option<String>,
}

/// Most run latencies kept for the percentile (the newest).
const MAX_LATENCIES: usize = 4096;

/// Statistics of one model's trial.
#[derive(Debug)]
pub struct Trial {
    started: Instant,
    /// Windows handed to the model.
    attempted: u64,
    /// Windows that failed to score (run error or wrong output width).
    errors: u64,
    /// Windows whose output was not finite.
    nonfinite: u64,
    /// Windows scored.
    scored: u64,
    /// Scored windows flagged anomalous.
    anomalies: u64,
    /// Scored windows beyond the baseline's 99th percentile.
    over_p99: u64,
    latencies: VecDeque<Duration>,
}

impl Trial {
    /// A trial starting at `now`.
    #[must_use]
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            attempted: 0,
            errors: 0,
            nonfinite: 0,
            scored: 0,
            anomalies: 0,
            over_p99: 0,
            latencies: VecDeque::new(),
        }
    }

    /// One tract run of `rows` windows took `latency`.
    pub fn record_run(&mut self, rows: u64, latency: Duration) {
        self.attempted += rows;
        if self.latencies.len() == MAX_LATENCIES {
            self.latencies.pop_front();
        }
        self.latencies.push_back(latency);
    }

    /// `rows` windows failed to score.
    pub fn record_errors(&mut self, rows: u64) {
        self.errors += rows;
    }

    /// One window's output was NaN or infinite.
    pub fn record_nonfinite(&mut self) {
        self.nonfinite += 1;
    }

    /// One window scored; `beyond_p99` when the score lies beyond the
    /// training 99th percentile in the alerting direction.
    pub fn record_score(&mut self, is_anomaly: bool, beyond_p99: bool) {
        self.scored += 1;
        self.anomalies += u64::from(is_anomaly);
        self.over_p99 += u64::from(beyond_p99);
    }

    /// The 99th percentile run latency so far (nearest rank).
    #[must_use]
    pub fn p99_latency(&self) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = self.latencies.iter().copied().collect();
        sorted.sort_unstable();
        let rank = (sorted.len() * 99).div_ceil(100).max(1);
        sorted.get(rank - 1).copied()
    }

    /// The verdict at `now`. Targets are judged once `min_windows` windows
    /// were attempted (so one slow first run or one bad window among few
    /// does not decide), except non-finite outputs under a zero tolerance,
    /// which fail at once. A trial passes once both `duration` has elapsed
    /// and `min_windows` were attempted with every target met; with no
    /// traffic it stays open.
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn verdict(&self, now: Instant, s: &TrialSettings, has_p99_baseline: bool) -> Verdict {
        if s.max_nonfinite_rate <= 0.0 && self.nonfinite > 0 {
            return Verdict::Fail(format!(
                "non-finite output in {} of {} windows",
                self.nonfinite, self.attempted
            ));
        }
        if self.attempted < s.min_windows.max(1) {
            return Verdict::Continue;
        }
        let attempted = self.attempted as f64;
        let share = |n: u64| n as f64 / attempted;
        if share(self.nonfinite) > s.max_nonfinite_rate {
            return Verdict::Fail(format!(
                "non-finite output in {} of {} windows (limit {:.1} %)",
                self.nonfinite,
                self.attempted,
                s.max_nonfinite_rate * 100.0
            ));
        }
        if share(self.errors) > s.max_error_rate {
            return Verdict::Fail(format!(
                "inference failed for {} of {} windows (limit {:.1} %)",
                self.errors,
                self.attempted,
                s.max_error_rate * 100.0
            ));
        }
        if let Some(p99) = self.p99_latency()
            && p99 > s.max_p99_latency
        {
            return Verdict::Fail(format!(
                "p99 run latency {} ms over the {} ms budget",
                p99.as_millis(),
                s.max_p99_latency.as_millis()
            ));
        }
        if self.scored > 0 {
            let scored = self.scored as f64;
            let anomaly_rate = self.anomalies as f64 / scored;
            if anomaly_rate > s.max_anomaly_rate {
                return Verdict::Fail(format!(
                    "{} of {} windows flagged anomalous ({:.1} %, limit {:.1} %)",
                    self.anomalies,
                    self.scored,
                    anomaly_rate * 100.0,
                    s.max_anomaly_rate * 100.0
                ));
            }
            let over = self.over_p99 as f64 / scored;
            if has_p99_baseline && over > s.max_over_p99_share {
                return Verdict::Fail(format!(
                    "output distribution shifted: {:.1} % of scores beyond the training p99 \
                     (about 1 % expected, limit {:.1} %)",
                    over * 100.0,
                    s.max_over_p99_share * 100.0
                ));
            }
        }
        if now.duration_since(self.started) >= s.duration {
            Verdict::Pass
        } else {
            Verdict::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TrialSettings {
        TrialSettings {
            duration: Duration::from_secs(60),
            min_windows: 10,
            ..TrialSettings::default()
        }
    }

    fn healthy(t: &mut Trial, n: u64) {
        for _ in 0..n {
            t.record_run(1, Duration::from_millis(2));
            t.record_score(false, false);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn passes_only_after_duration_and_min_windows() {
        let s = settings();
        let mut t = Trial::new(Instant::now());
        healthy(&mut t, 5);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.verdict(Instant::now(), &s, true), Verdict::Continue);
        healthy(&mut t, 5);
        assert_eq!(t.verdict(Instant::now(), &s, true), Verdict::Pass);

        let mut t = Trial::new(Instant::now());
        healthy(&mut t, 100);
        assert_eq!(t.verdict(Instant::now(), &s, true), Verdict::Continue);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(t.verdict(Instant::now(), &s, true), Verdict::Continue);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.verdict(Instant::now(), &s, true), Verdict::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn one_nan_fails_at_once_under_zero_tolerance() {
        let s = settings();
        let mut t = Trial::new(Instant::now());
        t.record_run(1, Duration::from_millis(1));
        t.record_nonfinite();
        let Verdict::Fail(reason) = t.verdict(Instant::now(), &s, false) else {
            panic!("NaN must fail");
        };
        assert!(reason.contains("non-finite"), "{reason}");

        let tolerant = TrialSettings {
            max_nonfinite_rate: 0.2,
            ..settings()
        };
        let mut t = Trial::new(Instant::now());
        healthy(&mut t, 9);
        t.record_run(1, Duration::from_millis(1));
        t.record_nonfinite();
        assert_eq!(
            t.verdict(Instant::now(), &tolerant, false),
            Verdict::Continue
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_target_fails_with_its_figures() {
        let s = settings();
        let mut t = Trial::new(Instant::now());
        healthy(&mut t, 8);
        t.record_run(2, Duration::from_millis(1));
        t.record_errors(2);
        let Verdict::Fail(r) = t.verdict(Instant::now(), &s, true) else {
            panic!("errors must fail");
        };
        assert!(r.contains("2 of 10"), "{r}");

        let mut t = Trial::new(Instant::now());
        for _ in 0..10 {
            t.record_run(1, Duration::from_millis(900));
            t.record_score(false, false);
        }
        let Verdict::Fail(r) = t.verdict(Instant::now(), &s, true) else {
            panic!("latency must fail");
        };
        assert!(r.contains("900 ms over the 500 ms budget"), "{r}");

        let mut t = Trial::new(Instant::now());
        for i in 0..10 {
            t.record_run(1, Duration::from_millis(1));
            t.record_score(i < 6, false);
        }
        let Verdict::Fail(r) = t.verdict(Instant::now(), &s, true) else {
            panic!("anomaly rate must fail");
        };
        assert!(r.contains("6 of 10 windows flagged"), "{r}");

        let mut t = Trial::new(Instant::now());
        for i in 0..10 {
            t.record_run(1, Duration::from_millis(1));
            t.record_score(false, i < 3);
        }
        let Verdict::Fail(r) = t.verdict(Instant::now(), &s, true) else {
            panic!("distribution shift must fail");
        };
        assert!(r.contains("30.0 % of scores beyond"), "{r}");
        // Without a p99 in the package the shift check does not apply.
        assert_eq!(t.verdict(Instant::now(), &s, false), Verdict::Continue);
    }

    #[test]
    fn p99_is_nearest_rank() {
        let mut t = Trial::new(Instant::now());
        assert_eq!(t.p99_latency(), None);
        for ms in 1..=100 {
            t.record_run(1, Duration::from_millis(ms));
        }
        assert_eq!(t.p99_latency(), Some(Duration::from_millis(99)));
        t.record_run(1, Duration::from_millis(5000));
        assert_eq!(t.p99_latency(), Some(Duration::from_millis(100)));
    }
}
