//! Drift and data-quality monitoring (`docs/drift.md`).
//!
//! Owns the per-model drift state: streaming statistics of every input
//! feature compared with the package's `[baseline]` ([`stats`]), the score
//! distribution, stale sensors and missing data, summarised over tumbling
//! windows of `[drift] window_secs`; the durable queue of summaries
//! ([`queue`]) and their delivery to cloud-sync ([`deliver`]).
//!
//! It must not slow inference down: the inference stage hands events to a
//! [`DriftTap`] that never waits (a full channel drops the event and counts
//! it); the statistics run on the monitor task, file I/O on blocking
//! threads. Invariant: a summary is queued durably before it is counted as
//! emitted; windows live in memory and restart empty with the agent.

pub mod deliver;
pub mod queue;
pub mod stats;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Deserialize;
use sync_protocol::drift::{DriftSummary, FeatureDrift, ScoreStats};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::inference::LoadedModel;
use crate::ingest::CommittedReading;
use crate::telemetry::Counters;
use queue::DriftQueue;
use stats::{FeatureBaseline, FeatureState, ScoreWindow};

/// Events buffered between the inference stage and the monitor.
pub const EVENT_CAPACITY: usize = 4096;

/// Why drift monitoring could not start.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// The summary queue directory cannot be used.
    #[error("drift summary queue {dir} unusable")]
    Queue {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client for delivery could not be built.
    #[error("drift delivery client")]
    Client(#[source] crate::sync::SyncError),
}

/// Result alias for this module.
pub type Result<T, E = DriftError> = std::result::Result<T, E>;

/// `[drift]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDrift {
    /// Monitor drift at all.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Length of one summary window.
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Windows (this one and the ones before it) feature drift is judged over.
    #[serde(default = "default_horizon_windows")]
    pub horizon_windows: u64,
    /// Values a horizon needs before it is judged.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// PSI at or above which a feature alerts.
    #[serde(default = "default_psi_alert")]
    pub psi_alert: f64,
    /// |mean shift| (baseline std) at or above which a feature alerts.
    #[serde(default = "default_mean_shift_alert")]
    pub mean_shift_alert: f64,
    /// Silence after which a sensor is stale while others report.
    #[serde(default = "default_stale_after_secs")]
    pub stale_after_secs: u64,
    /// Most summaries queued for delivery; the oldest are dropped past it.
    #[serde(default = "default_max_queued")]
    pub max_queued: u64,
}

impl Default for RawDrift {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            window_secs: default_window_secs(),
            horizon_windows: default_horizon_windows(),
            min_samples: default_min_samples(),
            psi_alert: default_psi_alert(),
            mean_shift_alert: default_mean_shift_alert(),
            stale_after_secs: default_stale_after_secs(),
            max_queued: default_max_queued(),
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_window_secs() -> u64 {
    86_400
}
fn default_horizon_windows() -> u64 {
    7
}
fn default_min_samples() -> u64 {
    100
}
fn default_psi_alert() -> f64 {
    3.0
}
fn default_mean_shift_alert() -> f64 {
    2.0
}
fn default_stale_after_secs() -> u64 {
    900
}
fn default_max_queued() -> u64 {
    1000
}

/// Validated `[drift]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftSettings {
    /// Summary window.
    pub window: Duration,
    /// Windows per judged horizon (>= 1).
    pub horizon_windows: usize,
    /// Values a horizon needs before it is judged (>= 1).
    pub min_samples: u64,
    /// PSI alert threshold (> 0).
    pub psi_alert: f64,
    /// Mean-shift alert threshold in baseline std (> 0).
    pub mean_shift_alert: f64,
    /// Stale-sensor silence.
    pub stale_after: Duration,
    /// Queue bound.
    pub max_queued: usize,
    /// Queue directory (`<state_dir>/drift/summaries`).
    pub queue_dir: PathBuf,
}

/// Validates `[drift]`; every problem is pushed to `errs` naming its key.
/// `None` when disabled.
pub fn validate(r: &RawDrift, state_dir: &Path, errs: &mut Vec<String>) -> Option<DriftSettings> {
    if r.window_secs == 0 || r.window_secs > 30 * 86_400 {
        errs.push(format!(
            "drift.window_secs: must be between 1 and 2592000, got {}",
            r.window_secs
        ));
    }
    if r.horizon_windows == 0 || r.horizon_windows > 1000 {
        errs.push(format!(
            "drift.horizon_windows: must be between 1 and 1000, got {}",
            r.horizon_windows
        ));
    }
    if r.min_samples == 0 {
        errs.push("drift.min_samples: must be at least 1".into());
    }
    for (key, v) in [
        ("drift.psi_alert", r.psi_alert),
        ("drift.mean_shift_alert", r.mean_shift_alert),
    ] {
        if !(v.is_finite() && v > 0.0) {
            errs.push(format!("{key}: must be a finite number above 0, got {v}"));
        }
    }
    if r.stale_after_secs == 0 {
        errs.push("drift.stale_after_secs: must be at least 1".into());
    }
    if r.max_queued == 0 || r.max_queued > 1_000_000 {
        errs.push(format!(
            "drift.max_queued: must be between 1 and 1000000, got {}",
            r.max_queued
        ));
    }
    r.enabled.then(|| DriftSettings {
        window: Duration::from_secs(r.window_secs),
        horizon_windows: usize::try_from(r.horizon_windows).unwrap_or(1),
        min_samples: r.min_samples,
        psi_alert: r.psi_alert,
        mean_shift_alert: r.mean_shift_alert,
        stale_after: Duration::from_secs(r.stale_after_secs),
        max_queued: usize::try_from(r.max_queued).unwrap_or(1000),
        queue_dir: state_dir.join("drift").join("summaries"),
    })
}

/// Counters of drift monitoring (monotonic).
#[derive(Debug, Default)]
pub struct DriftMetrics {
    /// Summaries emitted (queued).
    pub summaries: AtomicU64,
    /// Summaries that crossed a threshold.
    pub alerts: AtomicU64,
    /// Events dropped because the monitor was behind.
    pub events_dropped: AtomicU64,
    /// Summaries delivered (2xx).
    pub sent: AtomicU64,
    /// Delivery attempts that failed (retried).
    pub send_failures: AtomicU64,
    /// The latest judged figures per (model, stream, field): PSI and mean
    /// shift over the horizon, from the last summary that had them.
    pub latest: std::sync::Mutex<std::collections::BTreeMap<(String, String, String), LatestDrift>>,
}

/// The latest judged drift of one feature (exported as gauges).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LatestDrift {
    /// Population stability index over the horizon.
    pub psi: Option<f64>,
    /// Mean shift over the horizon, in baseline standard deviations.
    pub mean_shift: Option<f64>,
    /// Whether that summary alerted.
    pub alert: bool,
}

impl DriftMetrics {
    fn record(&self, s: &sync_protocol::drift::DriftSummary) {
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for f in &s.features {
            if f.psi.is_some() || f.mean_shift.is_some() {
                latest.insert(
                    (s.model.clone(), f.stream.clone(), f.field.clone()),
                    LatestDrift {
                        psi: f.psi,
                        mean_shift: f.mean_shift,
                        alert: s.alert,
                    },
                );
            }
        }
    }
}

/// What the inference stage reports.
#[derive(Debug)]
enum Event {
    Reading {
        model: ModelKey,
        source: String,
        stream: String,
        values: std::collections::BTreeMap<String, f64>,
        gap_resets: u64,
    },
    NanSkipped {
        model: ModelKey,
    },
    Scores {
        model: ModelKey,
        scores: Vec<(f64, bool)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ModelKey {
    name: String,
    version: String,
    dir: PathBuf,
}

impl ModelKey {
    fn of(m: &LoadedModel) -> Self {
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            dir: m.dir.clone(),
        }
    }
}

/// The inference stage's side: never waits, never fails. A disabled tap
/// (the default) does nothing.
#[derive(Debug, Clone, Default)]
pub struct DriftTap {
    tx: Option<mpsc::Sender<Event>>,
    metrics: Arc<DriftMetrics>,
}

impl DriftTap {
    /// The monitor's counters and latest figures (shared with the metrics
    /// endpoint).
    #[must_use]
    pub fn metrics(&self) -> Arc<DriftMetrics> {
        self.metrics.clone()
    }

    fn send(&self, e: Event) {
        if let Some(tx) = &self.tx
            && tx.try_send(e).is_err()
        {
            Counters::add(&self.metrics.events_dropped, 1);
        }
    }

    /// A committed reading that `model` reads, and the window restarts
    /// (gaps) it caused.
    pub fn reading(&self, model: &LoadedModel, r: &CommittedReading, gap_resets: u64) {
        if self.tx.is_none() {
            return;
        }
        self.send(Event::Reading {
            model: ModelKey::of(model),
            source: r.source.clone(),
            stream: r.stream.clone(),
            values: r.values.clone(),
            gap_resets,
        });
    }

    /// A window of `model` not scored for a missing value.
    pub fn nan_skipped(&self, model: &LoadedModel) {
        if self.tx.is_some() {
            self.send(Event::NanSkipped {
                model: ModelKey::of(model),
            });
        }
    }

    /// Scores `(score, anomaly)` of `model`.
    pub fn scores(&self, model: &LoadedModel, scores: impl Iterator<Item = (f64, bool)>) {
        if self.tx.is_some() {
            self.send(Event::Scores {
                model: ModelKey::of(model),
                scores: scores.collect(),
            });
        }
    }
}

/// The baseline of one model version, as the monitor uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelBaseline {
    /// Features in package order.
    pub features: Vec<FeatureBaseline>,
    /// Median training score.
    pub score_p50: Option<f64>,
    /// 99th percentile training score.
    pub score_p99: Option<f64>,
}

impl ModelBaseline {
    /// Reads `dir/model.toml`'s `[baseline]` (blocking).
    ///
    /// # Errors
    /// A message naming the file when it cannot be read or parsed.
    pub fn read(dir: &Path) -> std::result::Result<Self, String> {
        let path = dir.join("model.toml");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let m: crate::inference::package::Manifest =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            features: m
                .baseline
                .features
                .into_iter()
                .map(|f| FeatureBaseline {
                    stream: f.stream,
                    field: f.field,
                    mean: f.mean,
                    std: f.std,
                })
                .collect(),
            score_p50: m.baseline.score_p50,
            score_p99: m.baseline.score_p99,
        })
    }
}

/// One model's drift state for the open window.
#[derive(Debug)]
pub struct ModelDrift {
    name: String,
    version: String,
    baseline: ModelBaseline,
    features: Vec<FeatureState>,
    scores: ScoreWindow,
    /// `(source, stream)` -> last reading.
    last_seen: HashMap<(String, String), Instant>,
    nan_skipped: u64,
    gap_resets: u64,
    readings: u64,
}

impl ModelDrift {
    /// Fresh state for `name` `version` judged against `baseline`.
    #[must_use]
    pub fn new(name: &str, version: &str, baseline: ModelBaseline) -> Self {
        Self {
            name: name.to_owned(),
            version: version.to_owned(),
            features: baseline
                .features
                .iter()
                .cloned()
                .map(FeatureState::new)
                .collect(),
            baseline,
            scores: ScoreWindow::default(),
            last_seen: HashMap::new(),
            nan_skipped: 0,
            gap_resets: 0,
            readings: 0,
        }
    }

    /// One reading of `source`/`stream` at `now`.
    pub fn reading(
        &mut self,
        source: &str,
        stream: &str,
        values: &std::collections::BTreeMap<String, f64>,
        now: Instant,
    ) {
        self.readings += 1;
        self.last_seen
            .insert((source.to_owned(), stream.to_owned()), now);
        for f in &mut self.features {
            if f.base.stream == stream {
                let v = values.get(&f.base.field).copied();
                f.observe(v);
            }
        }
    }

    /// One score.
    pub fn score(&mut self, score: f64, anomaly: bool) {
        self.scores.push(score, anomaly, self.baseline.score_p99);
    }

    /// Sensors silent for at least `stale_after` at `now` while another
    /// sensor of this model reported within it; sorted `source/stream`.
    #[must_use]
    pub fn stale(&self, now: Instant, stale_after: Duration) -> Vec<String> {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < stale_after;
        if !self.last_seen.values().any(fresh) {
            return Vec::new();
        }
        let mut out: Vec<String> = self
            .last_seen
            .iter()
            .filter(|(_, t)| !fresh(t))
            .map(|((src, stream), _)| format!("{src}/{stream}"))
            .collect();
        out.sort();
        out
    }

    /// Closes the window `[start_ms, end_ms)` at `now`: the summary, or
    /// `None` when the model saw nothing and has no stale sensor.
    pub fn close(
        &mut self,
        start_ms: i64,
        end_ms: i64,
        now: Instant,
        s: &DriftSettings,
    ) -> Option<DriftSummary> {
        let stale = self.stale(now, s.stale_after);
        // Design: sensors silent for a whole horizon are forgotten, so a
        // decommissioned sensor stops being reported eventually.
        let forget = s.stale_after + s.window * u32::try_from(s.horizon_windows).unwrap_or(1);
        self.last_seen
            .retain(|_, t| now.saturating_duration_since(*t) < forget);
        let active = self.readings > 0 || self.scores.count > 0 || !stale.is_empty();
        let mut reasons = Vec::new();
        let mut features = Vec::with_capacity(self.features.len());
        for f in &mut self.features {
            let j = f.close(s.horizon_windows, s.min_samples);
            let name = format!("{}.{}", f.base.stream, f.base.field);
            if let Some(p) = j.psi
                && p >= s.psi_alert
            {
                reasons.push(format!("{name} psi {p:.3} >= {}", s.psi_alert));
            }
            if let Some(m) = j.mean_shift
                && m.abs() >= s.mean_shift_alert
            {
                reasons.push(format!(
                    "{name} mean shift {m:+.3} std, |shift| >= {}",
                    s.mean_shift_alert
                ));
            }
            features.push(FeatureDrift {
                stream: f.base.stream.clone(),
                field: f.base.field.clone(),
                count: j.window.count,
                missing: j.missing,
                mean: j.window.mean(),
                std: j.window.std(),
                min: j.window.min,
                max: j.window.max,
                horizon_count: j.horizon_count,
                psi: j.psi,
                mean_shift: j.mean_shift,
            });
        }
        if !stale.is_empty() {
            reasons.push(format!("stale sensors: {}", stale.join(", ")));
        }
        let sc = std::mem::take(&mut self.scores);
        let share = |k: u64| (sc.count > 0).then(|| k as f64 / sc.count as f64);
        let summary = DriftSummary {
            model: self.name.clone(),
            version: self.version.clone(),
            window_start_ms: start_ms,
            window_end_ms: end_ms,
            features,
            scores: ScoreStats {
                count: sc.count,
                over_p99_share: self.baseline.score_p99.and_then(|_| share(sc.over_p99)),
                anomaly_share: share(sc.anomalies),
                median: sc.median(),
                baseline_p50: self.baseline.score_p50,
            },
            stale,
            nan_skipped: std::mem::take(&mut self.nan_skipped),
            gap_resets: std::mem::take(&mut self.gap_resets),
            alert: !reasons.is_empty(),
            reasons,
        };
        self.readings = 0;
        active.then_some(summary)
    }
}

/// The monitor task: owns every model's [`ModelDrift`], closes windows,
/// logs alerts and queues summaries.
pub struct DriftMonitor {
    settings: DriftSettings,
    rx: mpsc::Receiver<Event>,
    queue: DriftQueue,
    metrics: Arc<DriftMetrics>,
    models: HashMap<String, ModelDrift>,
    /// Versions whose baseline could not be read (logged once).
    unreadable: std::collections::HashSet<ModelKey>,
}

/// Builds a monitor and the tap that feeds it.
///
/// # Errors
/// [`DriftError::Queue`] when the queue directory cannot be created.
pub fn monitor(settings: DriftSettings) -> Result<(DriftMonitor, DriftTap)> {
    let queue = DriftQueue::open(&settings.queue_dir)
        .map_err(|source| DriftError::Queue {
            dir: settings.queue_dir.clone(),
            source,
        })?
        .with_limit(settings.max_queued);
    let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
    let metrics = Arc::new(DriftMetrics::default());
    let tap = DriftTap {
        tx: Some(tx),
        metrics: metrics.clone(),
    };
    Ok((
        DriftMonitor {
            settings,
            rx,
            queue,
            metrics,
            models: HashMap::new(),
            unreadable: std::collections::HashSet::new(),
        },
        tap,
    ))
}

impl DriftMonitor {
    /// The queue summaries go to (for [`deliver`]).
    #[must_use]
    pub fn queue(&self) -> DriftQueue {
        self.queue.clone()
    }

    /// The counters.
    #[must_use]
    pub fn metrics(&self) -> Arc<DriftMetrics> {
        self.metrics.clone()
    }

    /// Runs until `shutdown` or until every tap is dropped. A window still
    /// open then is not summarised (it is partial).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let window = self.settings.window;
        // Design: window times are the wall clock at start plus the
        // monotonic time since, so windows never overlap or repeat even if
        // the wall clock is stepped, and tests under a paused clock work.
        let anchor = (Instant::now(), crate::now_ms());
        let to_ms = |t: Instant| {
            anchor.1
                + i64::try_from(t.saturating_duration_since(anchor.0).as_millis())
                    .unwrap_or(i64::MAX / 2)
        };
        let mut start = Instant::now();
        let mut tick = tokio::time::interval_at(start + window, window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                e = self.rx.recv() => match e {
                    Some(e) => self.handle(e).await,
                    None => break,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.close_all(to_ms(start), to_ms(now), now).await;
                    start = now;
                }
            }
        }
        tracing::info!("drift monitor stopped");
    }

    async fn handle(&mut self, e: Event) {
        let now = Instant::now();
        let key = match &e {
            Event::Reading { model, .. }
            | Event::NanSkipped { model }
            | Event::Scores { model, .. } => model.clone(),
        };
        let Some(m) = self.model(&key).await else {
            return;
        };
        match e {
            Event::Reading {
                source,
                stream,
                values,
                gap_resets,
                ..
            } => {
                m.gap_resets += gap_resets;
                m.reading(&source, &stream, &values, now);
            }
            Event::NanSkipped { .. } => m.nan_skipped += 1,
            Event::Scores { scores, .. } => {
                for (s, a) in scores {
                    m.score(s, a);
                }
            }
        }
    }

    /// The state of `key`'s model, (re)built when its version changed.
    async fn model(&mut self, key: &ModelKey) -> Option<&mut ModelDrift> {
        let current = self
            .models
            .get(&key.name)
            .is_some_and(|m| m.version == key.version);
        if !current {
            if self.unreadable.contains(key) {
                return None;
            }
            let dir = key.dir.clone();
            let read = tokio::task::spawn_blocking(move || ModelBaseline::read(&dir)).await;
            match read {
                Ok(Ok(b)) => {
                    tracing::info!(model = %key.name, version = %key.version, features = b.features.len(), "drift monitoring against the package baseline");
                    self.models.insert(
                        key.name.clone(),
                        ModelDrift::new(&key.name, &key.version, b),
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(model = %key.name, version = %key.version, error = %e, "no drift monitoring: baseline unreadable");
                    self.unreadable.insert(key.clone());
                    return None;
                }
                Err(_) => return None,
            }
        }
        self.models.get_mut(&key.name)
    }

    async fn close_all(&mut self, start_ms: i64, end_ms: i64, now: Instant) {
        let mut summaries = Vec::new();
        for m in self.models.values_mut() {
            if let Some(s) = m.close(start_ms, end_ms, now, &self.settings) {
                summaries.push(s);
            }
        }
        summaries.sort_by(|a, b| a.model.cmp(&b.model));
        for s in summaries {
            if s.alert {
                Counters::add(&self.metrics.alerts, 1);
                let figures: Vec<String> = s
                    .features
                    .iter()
                    .map(|f| {
                        format!(
                            "{}.{}: n={} psi={} shift={}",
                            f.stream,
                            f.field,
                            f.horizon_count,
                            f.psi.map_or("-".into(), |p| format!("{p:.3}")),
                            f.mean_shift.map_or("-".into(), |m| format!("{m:+.3}"))
                        )
                    })
                    .collect();
                tracing::warn!(
                    model = %s.model,
                    version = %s.version,
                    reasons = %s.reasons.join("; "),
                    figures = %figures.join("; "),
                    "drift alert"
                );
            } else {
                tracing::debug!(model = %s.model, "drift window closed");
            }
            self.metrics.record(&s);
            self.queue.push(s).await;
            Counters::add(&self.metrics.summaries, 1);
        }
    }
}

/// Starts the monitor (and, with `[sync]`, the deliverer) for `settings`,
/// both stopping with `shutdown`; a disabled tap when `[drift]` is off.
///
/// # Errors
/// [`DriftError`] when the queue or the HTTP client cannot be set up.
pub fn spawn(settings: &crate::config::Settings, shutdown: &CancellationToken) -> Result<DriftTap> {
    let Some(drift) = settings.drift.clone() else {
        return Ok(DriftTap::default());
    };
    let (monitor, tap) = monitor(drift)?;
    if let Some(sync) = &settings.sync {
        let deliverer = deliver::Deliverer::new(
            sync,
            &settings.device_id,
            monitor.queue(),
            monitor.metrics(),
        )?;
        tokio::spawn(deliverer.run(shutdown.clone()));
    }
    tokio::spawn(monitor.run(shutdown.clone()));
    Ok(tap)
}

#[cfg(test)]
mod tests;
