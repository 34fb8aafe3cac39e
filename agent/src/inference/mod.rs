//! Inference: committed readings -> feature windows -> tract -> predictions.
//!
//! Owns the set of loaded models and their per-source windows. A prediction
//! is stored in the buffer (durable, synced like readings) before it is
//! handed to the publisher, so a publish failure never loses a prediction.
//! Invariant: inference only ever sees readings that are already committed.

pub mod check;
pub mod features;
pub mod output;
pub mod package;
pub mod publish;
pub mod runtime;
pub mod shadow;
pub mod swap;
pub mod trial;
pub mod window;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError, NewPrediction, Pending};
use crate::ingest::CommittedReading;
use crate::metrics::ModelRegistry;
use crate::telemetry::Counters;
use features::{InputPlan, SourceState};
use output::{OutputPlan, Scored};
use package::{Package, PackageError};
use runtime::{ModelHandle, RuntimeError};
use shadow::{Shadow, ShadowReport, ShadowUpdate};
use trial::{Trial, TrialOutcome, TrialSettings, Verdict};

/// Why inference could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// A package was refused.
    #[error("model package {dir} refused")]
    Package {
        /// The package directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Box<PackageError>,
    },
    /// A model failed to load or to reproduce its golden pairs.
    #[error("model package {dir} failed its checks")]
    Runtime {
        /// The package directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: RuntimeError,
    },
    /// Predictions could not be stored.
    #[error("cannot store predictions")]
    Buffer(#[from] BufferError),
}

/// Result alias for this module.
pub type Result<T, E = InferenceError> = std::result::Result<T, E>;

/// Counters of the inference stage (monotonic).
#[derive(Debug, Default)]
pub struct InferenceMetrics {
    /// Windows that closed (scored or not).
    pub windows: AtomicU64,
    /// tract runs; `rows / runs` is the mean batch.
    pub runs: AtomicU64,
    /// Rows scored by those runs.
    pub rows: AtomicU64,
    /// Readings dropped as late (older than the window already used).
    pub late_dropped: AtomicU64,
    /// Windows restarted by a gap over `input.max_gap_ms`.
    pub gap_resets: AtomicU64,
    /// Windows not scored because of a missing value (`nan_policy = "skip"`).
    pub nan_skipped: AtomicU64,
    /// Models swapped in while running.
    pub swaps: AtomicU64,
    /// Packages refused while running (the old model kept serving).
    pub swap_failures: AtomicU64,
    /// Trials started (a new version swapped in on trial).
    pub trials: AtomicU64,
    /// Trials passed (the version adopted).
    pub trials_passed: AtomicU64,
    /// Versions rolled back because they broke a health target on trial.
    pub rollbacks: AtomicU64,
}

/// A model that passed every check and is ready to serve.
#[derive(Clone)]
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// sha256 of the ONNX file.
    pub sha256: String,
    /// Package directory.
    pub dir: PathBuf,
    /// Validated input side.
    pub input: Arc<InputPlan>,
    /// Validated output side.
    pub output: Arc<OutputPlan>,
    /// 99th percentile training score (`baseline.score_p99`), if stated.
    pub score_p99: Option<f64>,
    /// Serve it on trial ([`trial`]): set by the watcher for versions not
    /// yet adopted; the stage keeps the model it replaces ready to swap
    /// back while the trial runs.
    pub on_trial: bool,
    handle: ModelHandle,
}

impl LoadedModel {
    /// Reads, verifies (hash, load, input shape, golden pairs) and starts a
    /// package in this process.
    ///
    /// # Errors
    /// [`InferenceError::Package`] or [`InferenceError::Runtime`]; nothing runs then.
    pub fn load(dir: &Path) -> Result<Self> {
        let package = Package::read(dir).map_err(|source| InferenceError::Package {
            dir: dir.to_owned(),
            source: Box::new(source),
        })?;
        let handle = runtime::load(&package).map_err(|source| InferenceError::Runtime {
            dir: dir.to_owned(),
            source,
        })?;
        let m = package.manifest;
        Ok(Self {
            name: m.name,
            version: m.version,
            sha256: m.sha256,
            dir: dir.to_owned(),
            input: Arc::new(package.input),
            output: Arc::new(package.output),
            score_p99: m.baseline.score_p99,
            on_trial: false,
            handle,
        })
    }

    /// Runs up to `input.batch_size` rows in one tract run.
    ///
    /// # Errors
    /// [`RuntimeError`] from the model thread.
    pub async fn run(&self, rows: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, RuntimeError> {
        self.handle.run(rows).await
    }
}

struct Row {
    source: String,
    end_seq: u64,
    end_ts_ms: Option<i64>,
    values: Vec<f32>,
}

struct Slot {
    model: LoadedModel,
    sources: HashMap<String, SourceState>,
    pending: Vec<Row>,
    since: Option<Instant>,
    /// The running trial of `model`, and the model to swap back to.
    trial: Option<(Trial, Option<LoadedModel>)>,
    /// `model` failed its trial with nothing to restore: it scores nothing
    /// until a new version arrives.
    suspended: bool,
    /// A candidate scored beside `model`, compared, never published.
    shadow: Option<Shadow>,
}

impl Slot {
    fn new(model: LoadedModel) -> Self {
        Self {
            model,
            sources: HashMap::new(),
            pending: Vec::new(),
            since: None,
            trial: None,
            suspended: false,
            shadow: None,
        }
    }
}

type Stored = (Pending<Vec<u64>>, Vec<(NewPrediction, Scored)>);

/// The inference stage.
pub struct InferenceStage {
    slots: Vec<Slot>,
    input: mpsc::Receiver<CommittedReading>,
    swaps: Option<mpsc::Receiver<LoadedModel>>,
    batch_max_wait: Duration,
    buffer: Buffer,
    output: mpsc::Sender<publish::PredictionEvent>,
    counters: Arc<Counters>,
    metrics: Arc<InferenceMetrics>,
    trial: Option<(TrialSettings, mpsc::Sender<TrialOutcome>)>,
    shadows: Option<mpsc::Receiver<ShadowUpdate>>,
    shadow_reports: Option<mpsc::Sender<ShadowReport>>,
    active: Option<tokio::sync::watch::Sender<Vec<sync_protocol::ActiveModel>>>,
    models: Arc<ModelRegistry>,
    drift: crate::drift::DriftTap,
}

impl InferenceStage {
    /// Builds the stage around models that already passed their checks.
    #[must_use]
    pub fn new(
        models: Vec<LoadedModel>,
        input: mpsc::Receiver<CommittedReading>,
        buffer: Buffer,
        output: mpsc::Sender<publish::PredictionEvent>,
        counters: Arc<Counters>,
    ) -> Self {
        let registry = Arc::new(ModelRegistry::default());
        for m in &models {
            registry.set_active(&m.name, &m.version, &m.sha256);
        }
        Self {
            slots: models.into_iter().map(Slot::new).collect(),
            input,
            swaps: None,
            batch_max_wait: Duration::ZERO,
            buffer,
            output,
            counters,
            metrics: Arc::new(InferenceMetrics::default()),
            trial: None,
            shadows: None,
            shadow_reports: None,
            active: None,
            models: registry,
            drift: crate::drift::DriftTap::default(),
        }
    }

    /// Reports readings, skipped windows and scores to drift monitoring.
    #[must_use]
    pub fn with_drift(mut self, drift: crate::drift::DriftTap) -> Self {
        self.drift = drift;
        self
    }

    /// Longest a closed window waits for others to share its tract run
    /// (`inference.batch_max_wait_ms`); default 0: only windows already
    /// queued together share a run.
    #[must_use]
    pub fn with_batch_max_wait(mut self, wait: Duration) -> Self {
        self.batch_max_wait = wait;
        self
    }

    /// Models verified while running (see [`swap`]) replace the model of the
    /// same name, or are added, between two batches.
    #[must_use]
    pub fn with_swaps(mut self, swaps: mpsc::Receiver<LoadedModel>) -> Self {
        self.swaps = Some(swaps);
        self
    }

    /// Models swapped in with [`LoadedModel::on_trial`] serve on trial
    /// under `settings`: the replaced model stays loaded, and when the new
    /// one breaks a target it is swapped back at once. Every verdict is sent
    /// to `outcomes` (the watcher records it on disk). Without this, models
    /// swap in without a trial.
    #[must_use]
    pub fn with_trial(
        mut self,
        settings: TrialSettings,
        outcomes: mpsc::Sender<TrialOutcome>,
    ) -> Self {
        self.trial = Some((settings, outcomes));
        self
    }

    /// Shadow candidates ([`shadow`]) arrive on `updates`; cumulative
    /// comparisons go to `reports` every [`shadow::REPORT_EVERY`] windows
    /// and when a candidate leaves.
    #[must_use]
    pub fn with_shadows(
        mut self,
        updates: mpsc::Receiver<ShadowUpdate>,
        reports: mpsc::Sender<ShadowReport>,
    ) -> Self {
        self.shadows = Some(updates);
        self.shadow_reports = Some(reports);
        self
    }

    /// Keeps `active` holding the models that serve (name, version,
    /// sha256), updated on every swap, rollback and suspension; heartbeats
    /// report it.
    #[must_use]
    pub fn with_active_models(
        mut self,
        active: tokio::sync::watch::Sender<Vec<sync_protocol::ActiveModel>>,
    ) -> Self {
        self.active = Some(active);
        self.publish_active();
        self
    }

    fn publish_active(&self) {
        if let Some(tx) = &self.active {
            let models = self
                .slots
                .iter()
                .filter(|s| !s.suspended)
                .map(|s| sync_protocol::ActiveModel {
                    name: s.model.name.clone(),
                    version: s.model.version.clone(),
                    sha256: s.model.sha256.clone(),
                })
                .collect();
            tx.send_replace(models);
        }
    }

    /// Uses `metrics` instead of a private set (to share them with [`swap`]).
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<InferenceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The stage's counters.
    #[must_use]
    pub fn metrics(&self) -> Arc<InferenceMetrics> {
        self.metrics.clone()
    }

    /// Latency per model and the versions serving, kept current across swaps.
    #[must_use]
    pub fn model_registry(&self) -> Arc<ModelRegistry> {
        self.models.clone()
    }

    /// Runs until the input channel closes or `shutdown`; on shutdown it
    /// stops accepting readings and scores what is already queued.
    ///
    /// # Errors
    /// [`InferenceError::Buffer`] when predictions cannot be stored.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        // Design: predictions are submitted to the group commit without
        // waiting; this FIFO task awaits each commit in order and only then
        // hands the predictions to the publisher (store before publish).
        let (stored_tx, stored_rx) = mpsc::channel(1024);
        let forwarder = tokio::spawn(forward_stored(
            stored_rx,
            self.output.clone(),
            self.counters.clone(),
        ));
        let result = self.consume(&stored_tx, &shutdown).await;
        drop(stored_tx);
        let forwarded = forwarder.await;
        result?;
        match forwarded {
            Ok(r) => r?,
            Err(_) => return Err(InferenceError::Buffer(BufferError::Closed)),
        }
        tracing::info!("inference stopped");
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| s.since)
            .min()
            .map(|t| t + self.batch_max_wait)
    }

    async fn consume(
        &mut self,
        stored: &mpsc::Sender<Stored>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        let mut swaps_open = self.swaps.is_some();
        let mut shadows_open = self.shadows.is_some();
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.input.close();
                    while let Some(r) = self.input.recv().await {
                        self.process(stored, r).await?;
                    }
                    break;
                }
                // Control before data: a swap or shadow sent before a
                // reading applies to that reading, however the task is woken.
                m = recv_swap(self.swaps.as_mut()), if swaps_open => match m {
                    Some(m) => self.swap(stored, m).await?,
                    None => swaps_open = false,
                },
                u = recv_swap(self.shadows.as_mut()), if shadows_open => match u {
                    Some(u) => self.set_shadow(u),
                    None => shadows_open = false,
                },
                r = self.input.recv() => {
                    let Some(r) = r else { break };
                    self.process(stored, r).await?;
                    self.flush_due(stored).await?;
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.flush_due(stored).await?;
                }
            }
        }
        for ix in 0..self.slots.len() {
            self.flush(stored, ix).await?;
        }
        Ok(())
    }

    async fn swap(&mut self, stored: &mpsc::Sender<Stored>, model: LoadedModel) -> Result<()> {
        Counters::add(&self.metrics.swaps, 1);
        self.models
            .set_active(&model.name, &model.version, &model.sha256);
        if let Some(ix) = self.slots.iter().position(|s| s.model.name == model.name) {
            self.flush(stored, ix).await?;
            let slot = &mut self.slots[ix];
            tracing::info!(
                model = %model.name,
                from = %slot.model.version,
                to = %model.version,
                sha256 = %model.sha256,
                "model swapped"
            );
            // Design: windows survive a swap only when the new version reads
            // exactly the same features the same way.
            if slot.model.input != model.input {
                slot.sources.clear();
            }
            let on_trial = model.on_trial && self.trial.is_some();
            let was_suspended = std::mem::replace(&mut slot.suspended, false);
            let old = std::mem::replace(&mut slot.model, model);
            // Design: a version replaced while itself on trial was never
            // adopted, so the fallback stays the last model not on trial.
            let fallback = match slot.trial.take() {
                Some((_, fallback)) => fallback,
                None if was_suspended => None,
                None => Some(old),
            };
            if on_trial {
                Counters::add(&self.metrics.trials, 1);
                slot.trial = Some((Trial::new(Instant::now()), fallback));
            }
        } else {
            tracing::info!(model = %model.name, version = %model.version, sha256 = %model.sha256, "model added");
            let on_trial = model.on_trial && self.trial.is_some();
            let mut slot = Slot::new(model);
            if on_trial {
                Counters::add(&self.metrics.trials, 1);
                slot.trial = Some((Trial::new(Instant::now()), None));
            }
            self.slots.push(slot);
        }
        self.publish_active();
        Ok(())
    }

    fn set_shadow(&mut self, update: ShadowUpdate) {
        let Some(ix) = self.slots.iter().position(|s| s.model.name == update.name) else {
            tracing::warn!(model = %update.name, "shadow candidate for a model that is not served; ignored");
            return;
        };
        if let Some(old) = self.slots[ix].shadow.take() {
            self.report_shadow(&old.model.name, &old.model.version, old.summary());
            tracing::info!(model = %update.name, version = %old.model.version, "shadow candidate stopped");
        }
        if let Some(model) = update.model {
            tracing::info!(model = %update.name, version = %model.version, "shadow candidate running beside the active model");
            self.slots[ix].shadow = Some(Shadow::new(model));
        }
    }

    fn report_shadow(
        &self,
        name: &str,
        version: &str,
        summary: sync_protocol::registry::ShadowSummary,
    ) {
        tracing::info!(
            model = %name,
            version = %version,
            windows = summary.windows,
            mean_abs_diff = summary.mean_abs_diff,
            agreement = summary.agreement,
            candidate_errors = summary.candidate_errors,
            "shadow comparison"
        );
        if let Some(tx) = &self.shadow_reports
            && tx
                .try_send((name.to_owned(), version.to_owned(), summary))
                .is_err()
        {
            tracing::warn!(model = %name, "shadow summary not reported: the watcher is busy");
        }
    }

    /// Runs slot `ix`'s shadow candidate on `rows` and compares it with the
    /// active model's `active` results (one per row, `None` when the active
    /// model did not score it).
    async fn run_shadow(&mut self, ix: usize, rows: Vec<Vec<f32>>, active: &[Option<(f64, bool)>]) {
        let Some(candidate) = self.slots[ix].shadow.as_ref().map(|s| s.model.clone()) else {
            return;
        };
        let n = rows.len() as u64;
        let result = candidate.run(rows).await;
        let Some(shadow) = self.slots[ix].shadow.as_mut() else {
            return;
        };
        match result {
            Ok(outputs) => {
                for (a, out) in active.iter().zip(outputs) {
                    let Some(a) = a else { continue };
                    let c = candidate
                        .output
                        .apply(&out)
                        .ok()
                        .map(|s| (s.score, s.is_anomaly));
                    shadow.compare(*a, c);
                }
            }
            Err(e) => {
                tracing::debug!(model = %candidate.name, version = %candidate.version, error = %e, "shadow run failed");
                shadow.failed(n);
            }
        }
        if let Some(summary) = shadow.due() {
            self.report_shadow(&candidate.name, &candidate.version, summary);
        }
    }

    /// Judges slot `ix`'s trial after a run; swaps back or adopts.
    fn judge(&mut self, ix: usize) {
        let Some((settings, outcomes)) = &self.trial else {
            return;
        };
        let slot = &mut self.slots[ix];
        let Some((trial, _)) = &slot.trial else {
            return;
        };
        let has_p99 = slot.model.score_p99.is_some() && !slot.model.output.alert_below;
        let failure = match trial.verdict(Instant::now(), settings, has_p99) {
            Verdict::Continue => return,
            Verdict::Pass => None,
            Verdict::Fail(reason) => Some(reason),
        };
        let Some((_, fallback)) = slot.trial.take() else {
            return;
        };
        let mut outcome = TrialOutcome {
            name: slot.model.name.clone(),
            version: slot.model.version.clone(),
            dir: slot.model.dir.clone(),
            restored: None,
            failure: failure.clone(),
        };
        match failure {
            None => {
                Counters::add(&self.metrics.trials_passed, 1);
                tracing::info!(model = %outcome.name, version = %outcome.version, "model passed its trial; adopted");
            }
            Some(reason) => {
                Counters::add(&self.metrics.rollbacks, 1);
                match fallback {
                    Some(previous) => {
                        tracing::error!(
                            model = %outcome.name,
                            version = %outcome.version,
                            restored = %previous.version,
                            reason = %reason,
                            "model broke a health target on trial; rolled back"
                        );
                        if slot.model.input != previous.input {
                            slot.sources.clear();
                        }
                        outcome.restored = Some((previous.version.clone(), previous.dir.clone()));
                        slot.model = previous;
                    }
                    None => {
                        tracing::error!(
                            model = %outcome.name,
                            version = %outcome.version,
                            reason = %reason,
                            "model broke a health target on trial; no earlier version to restore, it stops serving"
                        );
                        slot.suspended = true;
                        slot.sources.clear();
                        slot.pending.clear();
                    }
                }
            }
        }
        if outcomes.try_send(outcome).is_err() {
            tracing::error!("trial outcome not recorded: the watcher is not listening");
        }
        self.publish_active();
    }

    async fn flush_due(&mut self, stored: &mpsc::Sender<Stored>) -> Result<()> {
        let now = Instant::now();
        for ix in 0..self.slots.len() {
            if self.slots[ix]
                .since
                .is_some_and(|t| t + self.batch_max_wait <= now)
            {
                self.flush(stored, ix).await?;
            }
        }
        Ok(())
    }

    async fn process(
        &mut self,
        stored: &mpsc::Sender<Stored>,
        reading: CommittedReading,
    ) -> Result<()> {
        for ix in 0..self.slots.len() {
            let slot = &mut self.slots[ix];
            let plan = slot.model.input.clone();
            if slot.suspended || !plan.reads(&reading.stream) {
                continue;
            }
            let pushed = slot
                .sources
                .entry(reading.source.clone())
                .or_insert_with(|| SourceState::new(&plan))
                .push(
                    &plan,
                    &reading.stream,
                    reading.seq,
                    reading.device_ts_ms,
                    &reading.values,
                );
            if pushed.late > 0 {
                Counters::add(&self.metrics.late_dropped, pushed.late);
                tracing::debug!(model = %slot.model.name, source = %reading.source, seq = reading.seq, "late reading dropped");
            }
            Counters::add(&self.metrics.gap_resets, pushed.gap_resets);
            self.drift.reading(&slot.model, &reading, pushed.gap_resets);
            for w in pushed.windows {
                Counters::add(&self.metrics.windows, 1);
                let slot = &mut self.slots[ix];
                match features::build_row(&plan, &w.values) {
                    Ok(values) => {
                        slot.pending.push(Row {
                            source: reading.source.clone(),
                            end_seq: w.end_seq,
                            end_ts_ms: w.end_ts_ms,
                            values,
                        });
                        slot.since.get_or_insert_with(Instant::now);
                    }
                    Err(e) => {
                        Counters::add(&self.metrics.nan_skipped, 1);
                        self.drift.nan_skipped(&slot.model);
                        tracing::debug!(model = %slot.model.name, source = %reading.source, end_seq = w.end_seq, error = %e, "window not scored");
                    }
                }
                if self.slots[ix].pending.len() >= plan.batch_size {
                    self.flush(stored, ix).await?;
                }
            }
        }
        Ok(())
    }

    async fn flush(&mut self, stored: &mpsc::Sender<Stored>, ix: usize) -> Result<()> {
        let slot = &mut self.slots[ix];
        slot.since = None;
        if slot.pending.is_empty() {
            return Ok(());
        }
        let rows: Vec<Row> = std::mem::take(&mut slot.pending);
        let model = slot.model.clone();
        let n = rows.len() as u64;
        Counters::add(&self.metrics.runs, 1);
        Counters::add(&self.metrics.rows, n);
        let started = Instant::now();
        let result = model
            .run(rows.iter().map(|r| r.values.clone()).collect())
            .await;
        self.models.observe(&model.name, started.elapsed());
        let slot = &mut self.slots[ix];
        if let Some((trial, _)) = &mut slot.trial {
            trial.record_run(n, started.elapsed());
        }
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                Counters::add(&self.counters.inference_errors, n);
                tracing::warn!(model = %model.name, windows = n, error = %e, "windows not scored");
                if let Some((trial, _)) = &mut slot.trial {
                    trial.record_errors(n);
                }
                self.judge(ix);
                return Ok(());
            }
        };
        let stream = model.input.clock().to_owned();
        let mut predictions = Vec::with_capacity(rows.len());
        let mut active = Vec::with_capacity(rows.len());
        let mut trial = slot.trial.as_mut().map(|(t, _)| t);
        for (row, out) in rows.iter().zip(outputs) {
            let scored = match model.output.apply(&out) {
                Ok(s) => s,
                Err(e) => {
                    active.push(None);
                    Counters::add(&self.counters.inference_errors, 1);
                    tracing::warn!(model = %model.name, source = %row.source, error = %e, "window not scored");
                    if let Some(t) = trial.as_deref_mut() {
                        if matches!(e, output::OutputError::NonFinite) {
                            t.record_nonfinite();
                        } else {
                            t.record_errors(1);
                        }
                    }
                    continue;
                }
            };
            if let Some(t) = trial.as_deref_mut() {
                let beyond = model.score_p99.is_some_and(|p99| scored.score > p99);
                t.record_score(scored.is_anomaly, beyond);
            }
            active.push(Some((scored.score, scored.is_anomaly)));
            let prediction = NewPrediction {
                model: model.name.clone(),
                model_version: model.version.clone(),
                model_sha256: model.sha256.clone(),
                source: row.source.clone(),
                stream: stream.clone(),
                window_end_seq: row.end_seq,
                window_end_ts_ms: row.end_ts_ms,
                score: scored.score,
                threshold: model.output.threshold,
                is_anomaly: scored.is_anomaly,
                created_ms: crate::now_ms(),
                label: scored.label.clone(),
                probabilities: scored.probabilities.clone(),
            };
            predictions.push((prediction, scored));
        }
        if self.slots[ix].shadow.is_some() {
            self.run_shadow(ix, rows.into_iter().map(|r| r.values).collect(), &active)
                .await;
        }
        self.judge(ix);
        self.drift.scores(
            &model,
            predictions.iter().map(|(p, _)| (p.score, p.is_anomaly)),
        );
        if predictions.is_empty() {
            return Ok(());
        }
        let pending = self
            .buffer
            .submit_predictions(predictions.iter().map(|(p, _)| p.clone()).collect())
            .await?;
        if stored.send((pending, predictions)).await.is_err() {
            return Err(InferenceError::Buffer(BufferError::Closed));
        }
        Ok(())
    }
}

async fn recv_swap<T>(rx: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn forward_stored(
    mut rx: mpsc::Receiver<Stored>,
    output: mpsc::Sender<publish::PredictionEvent>,
    counters: Arc<Counters>,
) -> Result<()> {
    while let Some((pending, predictions)) = rx.recv().await {
        let seqs = pending.wait().await?;
        for (i, (prediction, scored)) in predictions.into_iter().enumerate() {
            Counters::add(&counters.predictions, 1);
            if prediction.is_anomaly {
                Counters::add(&counters.anomalies, 1);
                tracing::debug!(model = %prediction.model, source = %prediction.source, score = prediction.score, "anomaly");
            }
            let event = publish::PredictionEvent {
                seq: seqs.get(i).copied().unwrap_or(0),
                prediction,
                label: scored.label,
                probabilities: scored.probabilities,
            };
            if output.try_send(event).is_err() {
                Counters::add(&counters.publish_dropped, 1);
            }
        }
    }
    Ok(())
}
