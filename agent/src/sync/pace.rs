//! The backlog's drain rate: a pacer that lets at most `rows_per_sec` rows
//! (plus one batch) leave per second. Pure timing on [`tokio::time::Instant`],
//! so tests drive it with a paused clock.

use std::time::Duration;

use tokio::time::Instant;

/// Paces backlog uploads; `None` rate = unlimited.
#[derive(Debug)]
pub struct Pace {
    rows_per_sec: Option<u64>,
    next: Instant,
}

impl Pace {
    /// A pacer that is ready now.
    #[must_use]
    pub fn new(rows_per_sec: Option<u64>) -> Self {
        Self {
            rows_per_sec,
            next: Instant::now(),
        }
    }

    /// When the next backlog batch may leave.
    #[must_use]
    pub fn ready_at(&self) -> Instant {
        self.next
    }

    /// Whether a backlog batch may leave now.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        Instant::now() >= self.next
    }

    /// Rows in one backlog batch: at most a second's worth, so the rate holds
    /// within each second, not just on average.
    #[must_use]
    pub fn batch_rows(&self, max_rows: usize) -> usize {
        self.rows_per_sec.map_or(max_rows, |r| {
            max_rows
                .min(usize::try_from(r).unwrap_or(usize::MAX))
                .max(1)
        })
    }

    /// Records that `rows` backlog rows left; the next batch waits for
    /// their share of the rate. Idle time earns no credit, so a burst after
    /// a pause is still one batch.
    pub fn spent(&mut self, rows: usize) {
        if let Some(r) = self.rows_per_sec {
            let cost = Duration::from_secs_f64(rows as f64 / r as f64);
            self.next = self.next.max(Instant::now()) + cost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under a paused clock, a greedy sender that sends whenever the pacer
    /// is ready moves at most `rate * t + one batch` rows in `t`.
    #[tokio::test(start_paused = true)]
    async fn rate_holds_under_a_greedy_sender() {
        let mut pace = Pace::new(Some(500));
        let batch = pace.batch_rows(1000);
        assert_eq!(batch, 500);
        let start = Instant::now();
        let mut sent = 0usize;
        while start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep_until(pace.ready_at()).await;
            if start.elapsed() >= Duration::from_secs(10) {
                break;
            }
            sent += batch;
            pace.spent(batch);
            let bound = 500.0 * start.elapsed().as_secs_f64() + batch as f64;
            assert!(
                sent as f64 <= bound,
                "{sent} rows after {:?}",
                start.elapsed()
            );
        }
        assert_eq!(sent, 5000, "the pacer also lets the full rate through");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_earns_no_burst() {
        let mut pace = Pace::new(Some(100));
        pace.spent(100);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(pace.is_ready());
        pace.spent(100);
        assert!(!pace.is_ready());
        assert_eq!(pace.ready_at() - Instant::now(), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn unlimited_is_always_ready() {
        let mut pace = Pace::new(None);
        pace.spent(1_000_000);
        assert!(pace.is_ready());
        assert_eq!(pace.batch_rows(1000), 1000);
    }
}
