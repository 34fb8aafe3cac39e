//! Reconnect backoff shared by the ingest connection, the prediction
//! publisher and sync. Owns nothing stateful.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with full jitter: a uniform delay in
/// `[min, min(max, min * 2^attempt)]`.
#[must_use]
pub fn backoff_with_jitter(min: Duration, max: Duration, attempt: u32) -> Duration {
    let cap = min
        .saturating_mul(1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX))
        .min(max)
        .max(min);
    let lo = u64::try_from(min.as_millis()).unwrap_or(u64::MAX);
    let hi = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(lo..=hi.max(lo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        for attempt in 0..40 {
            let d = backoff_with_jitter(min, max, attempt);
            assert!(d >= min && d <= max, "{attempt}: {d:?}");
        }
        assert_eq!(backoff_with_jitter(min, max, 0), min);
        let late: Vec<_> = (0..50).map(|_| backoff_with_jitter(min, max, 10)).collect();
        assert!(late.iter().any(|d| *d > Duration::from_millis(500)));
    }
}
