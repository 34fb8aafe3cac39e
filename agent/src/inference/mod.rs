//! Inference: committed readings -> feature windows -> tract -> predictions.
//!
//! Owns the set of loaded models and their per-source windows. A prediction
//! is stored in the buffer (durable, synced like readings) before it is
//! handed to the publisher, so a publish failure never loses a prediction.
//! Invariant: inference only ever sees readings that are already committed.

pub mod package;
pub mod publish;
pub mod runtime;
pub mod window;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError, NewPrediction, Pending};
use crate::ingest::CommittedReading;
use crate::telemetry::Counters;
use package::{Package, PackageError};
use runtime::{ModelHandle, RuntimeError};
use window::Windower;

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

/// A model that passed every check and is ready to serve.
#[derive(Clone)]
pub struct LoadedModel {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// sha256 of the ONNX file.
    pub sha256: String,
    /// Stream it reads.
    pub stream: String,
    /// Field it reads.
    pub field: String,
    /// Window length.
    pub window: usize,
    /// Hop.
    pub hop: usize,
    /// Anomaly threshold.
    pub threshold: f64,
    handle: ModelHandle,
}

impl LoadedModel {
    /// Reads, verifies (hash, load, golden pairs) and starts a package.
    ///
    /// # Errors
    /// [`InferenceError::Package`] or [`InferenceError::Runtime`]; nothing runs then.
    pub fn load(dir: &std::path::Path) -> Result<Self> {
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
            stream: m.input.stream,
            field: m.input.field,
            window: m.input.window,
            hop: m.input.hop,
            threshold: m.output.threshold,
            handle,
        })
    }

    /// Scores one window.
    ///
    /// # Errors
    /// [`RuntimeError`] from the model thread.
    pub async fn score(&self, window: Vec<f32>) -> Result<f32, RuntimeError> {
        self.handle.score(window).await
    }
}

/// The inference stage.
pub struct InferenceStage {
    models: Vec<LoadedModel>,
    input: mpsc::Receiver<CommittedReading>,
    buffer: Buffer,
    output: mpsc::Sender<publish::PredictionEvent>,
    counters: Arc<Counters>,
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
        Self {
            models,
            input,
            buffer,
            output,
            counters,
        }
    }

    /// Runs until the input channel closes or `shutdown`; on shutdown it
    /// stops accepting readings and scores what is already queued.
    ///
    /// # Errors
    /// [`InferenceError::Buffer`] when predictions cannot be stored.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        let mut windows: HashMap<(usize, String), Windower> = HashMap::new();
        // Design: predictions are submitted to the group commit without
        // waiting; this FIFO task awaits each commit in order and only then
        // hands the prediction to the publisher (store before publish).
        let (stored_tx, stored_rx) = mpsc::channel(1024);
        let forwarder = tokio::spawn(forward_stored(
            stored_rx,
            self.output.clone(),
            self.counters.clone(),
        ));
        let result = self.consume(&mut windows, &stored_tx, &shutdown).await;
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

    async fn consume(
        &mut self,
        windows: &mut HashMap<(usize, String), Windower>,
        stored: &mpsc::Sender<(Pending<Vec<u64>>, NewPrediction)>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        loop {
            let reading = tokio::select! {
                r = self.input.recv() => r,
                () = shutdown.cancelled() => {
                    self.input.close();
                    self.input.recv().await
                }
            };
            let Some(reading) = reading else { break };
            self.process(windows, stored, reading).await?;
        }
        Ok(())
    }

    async fn process(
        &mut self,
        windows: &mut HashMap<(usize, String), Windower>,
        stored: &mpsc::Sender<(Pending<Vec<u64>>, NewPrediction)>,
        reading: CommittedReading,
    ) -> Result<()> {
        for (ix, model) in self.models.iter().enumerate() {
            if model.stream != reading.stream {
                continue;
            }
            let Some(value) = reading.values.get(&model.field) else {
                continue;
            };
            let w = windows
                .entry((ix, reading.source.clone()))
                .or_insert_with(|| Windower::new(model.window, model.hop));
            #[allow(clippy::cast_possible_truncation)]
            let Some(win) = w.push(*value as f32, reading.seq, reading.device_ts_ms) else {
                continue;
            };
            let score = match model.score(win.values).await {
                Ok(s) => f64::from(s),
                Err(e) => {
                    Counters::add(&self.counters.inference_errors, 1);
                    tracing::warn!(model = %model.name, source = %reading.source, error = %e, "window not scored");
                    continue;
                }
            };
            let prediction = NewPrediction {
                model: model.name.clone(),
                model_version: model.version.clone(),
                model_sha256: model.sha256.clone(),
                source: reading.source.clone(),
                stream: reading.stream.clone(),
                window_end_seq: win.end_seq,
                window_end_ts_ms: win.end_ts_ms,
                score,
                threshold: model.threshold,
                is_anomaly: score > model.threshold,
                created_ms: crate::now_ms(),
            };
            let pending = self
                .buffer
                .submit_predictions(vec![prediction.clone()])
                .await?;
            if stored.send((pending, prediction)).await.is_err() {
                return Err(InferenceError::Buffer(BufferError::Closed));
            }
        }
        Ok(())
    }
}

async fn forward_stored(
    mut rx: mpsc::Receiver<(Pending<Vec<u64>>, NewPrediction)>,
    output: mpsc::Sender<publish::PredictionEvent>,
    counters: Arc<Counters>,
) -> Result<()> {
    while let Some((pending, prediction)) = rx.recv().await {
        let seqs = pending.wait().await?;
        Counters::add(&counters.predictions, 1);
        if prediction.is_anomaly {
            Counters::add(&counters.anomalies, 1);
            tracing::debug!(model = %prediction.model, source = %prediction.source, score = prediction.score, "anomaly");
        }
        let event = publish::PredictionEvent {
            seq: seqs.first().copied().unwrap_or(0),
            prediction,
        };
        if output.try_send(event).is_err() {
            Counters::add(&counters.publish_dropped, 1);
        }
    }
    Ok(())
}
