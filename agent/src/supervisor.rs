//! The supervisor: builds every stage from validated settings, wires them
//! with bounded channels, and owns shutdown.
//!
//! Shutdown runs in data-flow order under one deadline: stop ingest (it
//! commits and acks what it holds), then inference drains its queue, then
//! the publisher, then a final sync pass, then the buffer thread commits and
//! exits. A stage that misses the deadline is aborted and logged at ERROR;
//! because acks only follow commits, an aborted stage loses nothing the
//! broker was told is safe.
//!
//! Under systemd it sends `READY=1` once every stage is spawned, `STOPPING=1`
//! when shutdown starts, and runs the health-gated watchdog
//! ([`crate::systemd`]) until the last stage has stopped.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError};
use crate::config::Settings;
use crate::inference::check::VerifySettings;
use crate::inference::publish::PublishStage;
use crate::inference::swap::Watcher;
use crate::inference::{InferenceError, InferenceStage, LoadedModel};
use crate::ingest::{IngestError, IngestStage};
use crate::rollout::reports::ReportQueue;
use crate::rollout::{RolloutError, RolloutStage};
use crate::sync::{SyncError, SyncStage};
use crate::telemetry::Counters;

/// Why the agent stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The buffer could not be opened.
    #[error("buffer unavailable")]
    Buffer(#[from] BufferError),
    /// Ingest failed.
    #[error("ingest failed")]
    Ingest(#[from] IngestError),
    /// Inference failed.
    #[error("inference failed")]
    Inference(#[from] InferenceError),
    /// Sync failed.
    #[error("sync failed")]
    Sync(#[from] SyncError),
    /// Drift monitoring could not start.
    #[error("drift monitoring failed to start")]
    Drift(#[from] crate::drift::DriftError),
    /// The rollout stage could not start.
    #[error("rollout failed to start")]
    Rollout(#[from] RolloutError),
    /// A stage panicked.
    #[error("stage {0} panicked or was aborted")]
    Join(&'static str),
    /// Stages missed the shutdown deadline and were aborted.
    #[error("stages {0:?} missed the shutdown deadline and were aborted")]
    Deadline(Vec<&'static str>),
}

/// Result alias for this module.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Loads every configured model package; a package that fails its checks is
/// logged at ERROR and skipped, so ingest keeps running without it.
#[must_use]
pub fn load_models(settings: &Settings) -> Vec<LoadedModel> {
    let mut models = Vec::new();
    for dir in &settings.inference.models {
        match LoadedModel::load(dir) {
            Ok(m) => {
                tracing::info!(model = %m.name, version = %m.version, sha256 = %m.sha256, "model loaded and verified");
                models.push(m);
            }
            Err(e) => {
                tracing::error!(error = %format!("{:#}", anyhow_chain(&e)), "model not loaded; ingest continues without it");
            }
        }
    }
    models
}

fn anyhow_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct Stage {
    name: &'static str,
    token: CancellationToken,
    handle: JoinHandle<Result<()>>,
}

fn spawn_stage<F, E>(
    name: &'static str,
    fatal: &CancellationToken,
    fut: F,
) -> (JoinHandle<Result<()>>, &'static str)
where
    F: std::future::Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<AgentError>,
{
    let fatal = fatal.clone();
    let handle = tokio::spawn(async move {
        let r = fut.await.map_err(Into::into);
        if let Err(e) = &r {
            tracing::error!(stage = name, error = %anyhow_chain(e), "stage failed; shutting down");
            fatal.cancel();
        }
        r
    });
    (handle, name)
}

impl From<crate::ingest::TlsError> for AgentError {
    fn from(e: crate::ingest::TlsError) -> Self {
        Self::Ingest(IngestError::Tls(e))
    }
}

/// Runs the agent until `shutdown` is cancelled or a stage fails, then shuts
/// down in data-flow order within `settings.shutdown_deadline`.
///
/// # Errors
/// The first stage failure, or [`AgentError::Deadline`].
pub async fn run(
    settings: Settings,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (buffer, buffer_thread) = Buffer::open(&settings.buffer)?;
    tracing::info!(path = %settings.buffer.path.display(), "buffer open");
    let models = load_models(&settings);
    let (active_tx, active_models) = tokio::sync::watch::channel(Vec::new());

    let (ingest_tx, ingest_rx) = mpsc::channel(settings.inference.queue_capacity);
    let (publish_tx, publish_rx) = mpsc::channel(1024);
    let fatal = CancellationToken::new();
    let mut stages = Vec::new();

    let token = CancellationToken::new();
    let ingest = IngestStage::new(
        settings.mqtt.clone(),
        buffer.clone(),
        ingest_tx,
        counters.clone(),
    );
    let (handle, name) = spawn_stage("ingest", &fatal, ingest.run(token.clone()));
    stages.push(Stage {
        name,
        token,
        handle,
    });

    let token = CancellationToken::new();
    let drift_tap = crate::drift::spawn(&settings, &token)?;
    let drift_metrics = drift_tap.metrics();
    let inference = InferenceStage::new(
        models.clone(),
        ingest_rx,
        buffer.clone(),
        publish_tx,
        counters.clone(),
    )
    .with_batch_max_wait(settings.inference.batch_max_wait)
    .with_active_models(active_tx)
    .with_drift(drift_tap);
    let (inference_metrics, model_registry) = (inference.metrics(), inference.model_registry());
    let inference = match settings.inference.watch_interval {
        Some(interval) => {
            let (swap_tx, swap_rx) = mpsc::channel(4);
            let inf = &settings.inference;
            let mut verify =
                VerifySettings::for_current_exe(inf.verify_timeout, inf.verify_max_memory_bytes);
            if let Some(checker) = &inf.checker {
                verify.checker.clone_from(checker);
            }
            if verify.prlimit.is_none() {
                tracing::warn!(
                    "prlimit not found: new model packages are verified in a child process without a memory limit"
                );
            }
            let mut watcher = Watcher::new(
                inf.packages_dir.clone(),
                interval,
                verify,
                &models,
                swap_tx,
                inference.metrics(),
            );
            let mut inference = inference.with_swaps(swap_rx);
            if let Some(trial) = settings.trial.clone() {
                let (outcome_tx, outcome_rx) = mpsc::channel(64);
                inference = inference.with_trial(trial, outcome_tx);
                watcher = watcher.with_trials(outcome_rx);
            }
            if let (Some(rollout), Some(sync)) = (settings.rollout.clone(), settings.sync.as_ref())
            {
                let reports = ReportQueue::open(&rollout.reports_dir).map_err(|source| {
                    RolloutError::Dir {
                        dir: rollout.reports_dir.clone(),
                        source,
                    }
                })?;
                watcher = watcher.with_reports(reports.clone());
                let (shadow_tx, shadow_rx) = mpsc::channel(4);
                let (summary_tx, summary_rx) = mpsc::channel(16);
                inference = inference.with_shadows(shadow_rx, summary_tx);
                watcher = watcher.with_shadows(rollout.shadow_dir.clone(), shadow_tx, summary_rx);
                let stage = RolloutStage::new(
                    rollout,
                    sync,
                    inf.packages_dir.clone(),
                    reports,
                    counters.clone(),
                )?;
                tokio::spawn(stage.run(token.clone()));
            }
            tokio::spawn(watcher.run(token.clone()));
            inference
        }
        None => inference,
    };
    let (handle, name) = spawn_stage("inference", &fatal, inference.run(token.clone()));
    stages.push(Stage {
        name,
        token,
        handle,
    });

    let token = CancellationToken::new();
    let publish = PublishStage::new(
        settings.mqtt.clone(),
        settings.publish.clone(),
        publish_rx,
        counters.clone(),
    );
    let (handle, name) = spawn_stage("publish", &fatal, publish.run(token.clone()));
    stages.push(Stage {
        name,
        token,
        handle,
    });

    if let Some(sync) = settings.sync.clone() {
        let token = CancellationToken::new();
        let stage = SyncStage::new(
            sync,
            settings.device_id.clone(),
            buffer.clone(),
            counters.clone(),
        )
        .with_models(active_models);
        let (handle, name) = spawn_stage("sync", &fatal, stage.run(token.clone()));
        stages.push(Stage {
            name,
            token,
            handle,
        });
    }
    // Design: last in the stop order, so it answers while the others drain.
    if let Some(metrics) = settings.metrics.clone() {
        let sources = crate::metrics::Sources {
            counters: counters.clone(),
            inference: inference_metrics,
            models: model_registry,
            buffer: Some(buffer.clone()),
            drift: drift_metrics,
            started_ms: crate::now_ms(),
        };
        let token = CancellationToken::new();
        let serve = crate::metrics::serve(metrics, sources, token.clone());
        let handle = tokio::spawn(async move {
            serve.await;
            Ok(())
        });
        stages.push(Stage {
            name: "metrics",
            token,
            handle,
        });
    }
    drop(buffer);
    tracing::info!(device = %settings.device_id, "agent running");

    // Design: READY once every stage is spawned, not once the broker is
    // reached: the agent is useful offline (it reconnects on its own), and a
    // start that waits for the network would fail the unit on a flaky link.
    crate::systemd::ready("running");
    let stopping = CancellationToken::new();
    let watchdog_done = CancellationToken::new();
    let watchdog = crate::systemd::watchdog_interval().map(|interval| {
        tokio::spawn(crate::systemd::watchdog(
            interval,
            counters.clone(),
            stopping.clone(),
            watchdog_done.clone(),
        ))
    });

    tokio::select! {
        () = shutdown.cancelled() => tracing::info!("shutdown requested"),
        () = fatal.cancelled() => {}
    }
    stopping.cancel();
    crate::systemd::stopping("draining");
    let deadline = tokio::time::Instant::now() + settings.shutdown_deadline;
    let mut first_error: Option<AgentError> = None;
    let mut missed = Vec::new();
    for mut stage in stages {
        stage.token.cancel();
        match tokio::time::timeout_at(deadline, &mut stage.handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                first_error.get_or_insert(e);
            }
            Ok(Err(_)) => {
                first_error.get_or_insert(AgentError::Join(stage.name));
            }
            Err(_) => {
                tracing::error!(
                    stage = stage.name,
                    "stage missed the shutdown deadline; aborting it"
                );
                stage.handle.abort();
                missed.push(stage.name);
            }
        }
    }
    // Every Buffer handle is gone once the stages are; the writer commits and exits.
    let joined = tokio::task::spawn_blocking(move || buffer_thread.join());
    if tokio::time::timeout_at(deadline + std::time::Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        tracing::error!("buffer writer did not stop in time");
    }
    watchdog_done.cancel();
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    tracing::info!(
        received = Counters::get(&counters.received),
        handled = Counters::get(&counters.handled),
        acked = Counters::get(&counters.acked),
        committed = Counters::get(&counters.committed),
        duplicates = Counters::get(&counters.duplicates),
        dead_letters = Counters::get(&counters.dead_letters),
        "agent stopped"
    );
    if let Some(e) = first_error {
        return Err(e);
    }
    if !missed.is_empty() {
        return Err(AgentError::Deadline(missed));
    }
    Ok(())
}
