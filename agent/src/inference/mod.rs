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
pub mod swap;
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
}

impl Slot {
    fn new(model: LoadedModel) -> Self {
        Self {
            model,
            sources: HashMap::new(),
            pending: Vec::new(),
            since: None,
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
    models: Arc<ModelRegistry>,
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
            models: registry,
        }
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
                r = self.input.recv() => {
                    let Some(r) = r else { break };
                    self.process(stored, r).await?;
                    self.flush_due(stored).await?;
                }
                m = recv_swap(self.swaps.as_mut()), if swaps_open => match m {
                    Some(m) => self.swap(stored, m).await?,
                    None => swaps_open = false,
                },
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
            slot.model = model;
        } else {
            tracing::info!(model = %model.name, version = %model.version, sha256 = %model.sha256, "model added");
            self.slots.push(Slot::new(model));
        }
        Ok(())
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
            if !plan.reads(&reading.stream) {
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
        let started = std::time::Instant::now();
        let ran = model
            .run(rows.iter().map(|r| r.values.clone()).collect())
            .await;
        self.models.observe(&model.name, started.elapsed());
        let outputs = match ran {
            Ok(o) => o,
            Err(e) => {
                Counters::add(&self.counters.inference_errors, n);
                tracing::warn!(model = %model.name, windows = n, error = %e, "windows not scored");
                return Ok(());
            }
        };
        let stream = model.input.clock().to_owned();
        let mut predictions = Vec::with_capacity(rows.len());
        for (row, out) in rows.iter().zip(outputs) {
            let scored = match model.output.apply(&out) {
                Ok(s) => s,
                Err(e) => {
                    Counters::add(&self.counters.inference_errors, 1);
                    tracing::warn!(model = %model.name, source = %row.source, error = %e, "window not scored");
                    continue;
                }
            };
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
            };
            predictions.push((prediction, scored));
        }
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

async fn recv_swap(rx: Option<&mut mpsc::Receiver<LoadedModel>>) -> Option<LoadedModel> {
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
