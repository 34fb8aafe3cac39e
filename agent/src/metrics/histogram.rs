//! Fixed-bucket latency histograms and the per-model registry that
//! inference writes and `/metrics` reads.
//!
//! Owns [`Histogram`] (lock-free: one atomic per bucket plus the sum) and
//! [`ModelRegistry`] (each model's latency histogram and active version).
//! Invariant: a model's histogram survives a swap to another version, so
//! its series stays one monotonic counter set per model name.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// Upper bounds of the latency buckets in microseconds (Prometheus `le`,
/// inclusive); a run slower than the last bound counts only in `+Inf`.
pub const LATENCY_BOUNDS_MICROS: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

const BUCKETS: usize = LATENCY_BOUNDS_MICROS.len() + 1;

/// A latency histogram with the fixed [`LATENCY_BOUNDS_MICROS`] buckets.
///
/// [`Histogram::observe`] is two relaxed atomic adds; a concurrent
/// [`Histogram::snapshot`] may see the count of an observation before its
/// sum, never a bucket count that goes down.
#[derive(Debug)]
pub struct Histogram {
    /// Non-cumulative counts; the last slot is above every bound.
    buckets: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

/// A point-in-time copy of a [`Histogram`], in Prometheus' terms.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(le in seconds, observations <= le)`, cumulative, bounds ascending,
    /// without `+Inf` (whose count is [`HistogramSnapshot::count`]).
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    /// Records one observation (saturating at `u64::MAX` microseconds).
    pub fn observe(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let ix = LATENCY_BOUNDS_MICROS.partition_point(|&le| le < micros);
        self.buckets[ix].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The cumulative view of the buckets; `count` equals the `+Inf` bucket.
    #[must_use]
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0u64;
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_MICROS.len());
        for (i, slot) in self.buckets.iter().enumerate() {
            total = total.saturating_add(slot.load(Ordering::Relaxed));
            if let Some(&le) = LATENCY_BOUNDS_MICROS.get(i) {
                buckets.push((micros_to_seconds(le), total));
            }
        }
        HistogramSnapshot {
            buckets,
            count: total,
            sum_seconds: micros_to_seconds(self.sum_micros.load(Ordering::Relaxed)),
        }
    }
}

#[allow(clippy::cast_precision_loss)]
fn micros_to_seconds(micros: u64) -> f64 {
    micros as f64 / 1e6
}

#[derive(Debug)]
struct ModelEntry {
    version: String,
    sha256: String,
    latency: Arc<Histogram>,
}

/// One model as [`ModelRegistry::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSnapshot {
    /// Model name.
    pub name: String,
    /// Version serving now (empty if the model only ever ran, never was
    /// announced with [`ModelRegistry::set_active`]).
    pub version: String,
    /// sha256 of the ONNX file serving now.
    pub sha256: String,
    /// Latency of its tract runs, across versions.
    pub latency: HistogramSnapshot,
}

/// Per-model latency histograms and active versions, shared by the
/// inference stage (writer) and the metrics endpoint (reader).
#[derive(Debug, Default)]
pub struct ModelRegistry {
    // Design: the lock only guards membership (a model added or swapped);
    // observations go to the histogram's atomics under a read lock.
    models: RwLock<BTreeMap<String, ModelEntry>>,
}

impl ModelRegistry {
    /// Records that `name` now serves `version` with ONNX digest `sha256`.
    pub fn set_active(&self, name: &str, version: &str, sha256: &str) {
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        let entry = models.entry(name.to_owned()).or_insert_with(|| ModelEntry {
            version: String::new(),
            sha256: String::new(),
            latency: Arc::default(),
        });
        version.clone_into(&mut entry.version);
        sha256.clone_into(&mut entry.sha256);
    }

    /// Records one tract run of `name` that took `elapsed`.
    pub fn observe(&self, name: &str, elapsed: Duration) {
        let latency = {
            let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
            models.get(name).map(|e| e.latency.clone())
        };
        match latency {
            Some(h) => h.observe(elapsed),
            None => {
                self.set_active(name, "", "");
                self.observe(name, elapsed);
            }
        }
    }

    /// Every model, by name.
    #[must_use]
    pub fn snapshot(&self) -> Vec<ModelSnapshot> {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        models
            .iter()
            .map(|(name, e)| ModelSnapshot {
                name: name.clone(),
                version: e.version.clone(),
                sha256: e.sha256.clone(),
                latency: e.latency.snapshot(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::float_cmp)]
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_whose_bound_they_do_not_exceed() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100)); // exactly on the first bound
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60)); // above every bound
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), LATENCY_BOUNDS_MICROS.len());
        let at = |le: f64| {
            s.buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map(|(_, n)| *n)
                .unwrap_or(u64::MAX)
        };
        assert_eq!(at(0.0001), 1);
        assert_eq!(at(0.00025), 2);
        assert_eq!(at(0.0025), 2);
        assert_eq!(at(0.005), 3);
        assert_eq!(at(5.0), 3, "the 60 s run is only in +Inf");
        let expected = 0.0001 + 0.000_101 + 0.003 + 60.0;
        assert!((s.sum_seconds - expected).abs() < 1e-9, "{}", s.sum_seconds);
        // Cumulative: never decreasing.
        assert!(
            s.buckets
                .windows(2)
                .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0)
        );
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let h = Arc::new(Histogram::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe(Duration::from_micros(t * 1_000 + i % 7));
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(h.snapshot().count, 40_000);
    }

    #[test]
    fn registry_keeps_latency_across_a_swap_and_reports_the_new_version() {
        let r = ModelRegistry::default();
        r.set_active("m", "1.0.0", "aa");
        r.observe("m", Duration::from_millis(1));
        r.set_active("m", "1.1.0", "bb");
        r.observe("m", Duration::from_millis(2));
        r.observe("unannounced", Duration::from_millis(2));
        let s = r.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].name.as_str(), s[0].version.as_str()), ("m", "1.1.0"));
        assert_eq!(s[0].sha256, "bb");
        assert_eq!(s[0].latency.count, 2);
        assert_eq!((s[1].name.as_str(), s[1].latency.count), ("unannounced", 1));
    }
}
