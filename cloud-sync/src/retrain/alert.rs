//! Retraining triggered by a fleet drift alert (`[retrain] on_fleet_alert`).
//!
//! Owns the steps from a raised [`FleetAlert`] to a queued job: the scope
//! (the devices the alert was judged on, the model's drift features), the
//! snapshot over `[raised_ms - lookback_secs, raised_ms]`, and the job on
//! that snapshot. It never trains: the worker runs the job like any other.
//!
//! Invariant: at most one job per alert. The job's id is derived from the
//! alert's `(model, window_start_ms)` and inserted only when absent, so a
//! repeated trigger (another instance, a retry) enqueues nothing; the
//! snapshot of the same rows is the same dataset.

use sync_protocol::drift::FleetAlert;

use super::{Job, JobSpec, JobStatus, Result, RetrainError, Retrainer, chain, now_ms};
use crate::dataset::{Datasets, Selection};
use crate::drift::Drift;
use crate::store::Store;

/// The id of the job the fleet alert of `model` for the fleet window
/// starting at `window_start_ms` enqueues.
#[must_use]
pub fn job_id(model: &str, window_start_ms: i64) -> String {
    format!("alert-{model}-{window_start_ms}")
}

impl Retrainer {
    /// Snapshots the data `alert` concerns and enqueues one retrain job on
    /// it, when `retrain.on_fleet_alert` is set. Returns the job, or `None`
    /// when disabled or when the alert already has its job.
    ///
    /// # Errors
    /// A refused snapshot ([`RetrainError::Dataset`], e.g. nothing received
    /// in the lookback), no stream to snapshot or an invalid training
    /// config ([`RetrainError::InvalidSpec`]), storage failures.
    pub async fn retrain_for_alert(
        &self,
        alert: &FleetAlert,
        drift: &Drift,
        store: &Store,
        datasets: &Datasets,
    ) -> Result<Option<Job>> {
        if !self.settings.on_fleet_alert {
            return Ok(None);
        }
        let id = job_id(&alert.model, alert.window_start_ms);
        if self.db.job(&id).await?.is_some() {
            return Ok(None);
        }
        let job = &self.settings.fleet_alert;
        let scope = drift.alert_scope(alert).await?;
        let mut streams = job.streams.clone();
        if streams.is_empty() {
            streams = scope.features.iter().map(|(s, _)| s.clone()).collect();
            streams.dedup();
        }
        if streams.is_empty() {
            return Err(RetrainError::InvalidSpec {
                problem: format!(
                    "the drift summaries of {} name no feature; set retrain.fleet_alert.streams",
                    alert.model
                ),
            });
        }
        let lookback_ms = i64::try_from(job.lookback_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let selection = Selection {
            streams,
            devices: scope.devices.clone(),
            from_ms: alert.raised_ms.saturating_sub(lookback_ms),
            to_ms: alert.raised_ms.saturating_add(1),
        };
        let name = format!("fleet alert {} {}", alert.model, alert.window_start_ms);
        let snapshot = datasets.snapshot(store, selection, Some(name)).await?;
        let mut train = job
            .train_config
            .as_deref()
            .map(super::read_train_config)
            .transpose()?
            .unwrap_or_default();
        if !train.contains_key("stream")
            && let [(stream, field)] = scope.features.as_slice()
        {
            train.insert("stream".to_owned(), stream.clone().into());
            train.insert("field".to_owned(), field.clone().into());
        }
        let spec = JobSpec {
            model: alert.model.clone(),
            csv: None,
            dataset: Some(snapshot.manifest.id.clone()),
            train: Some(train),
            group: job.group.clone(),
            register: job.register,
        };
        spec.check()?;
        let job = Job {
            id,
            spec,
            status: JobStatus::Queued,
            run_id: None,
            error: None,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
        };
        if !self.db.insert_job_once(&job).await? {
            return Ok(None);
        }
        tracing::info!(
            job = %job.id,
            model = %alert.model,
            window_start_ms = alert.window_start_ms,
            dataset = %snapshot.manifest.id,
            devices = scope.devices.len(),
            readings = snapshot.manifest.readings(),
            "retrain job queued for a fleet drift alert"
        );
        self.wake.notify_one();
        Ok(Some(job))
    }

    /// Runs [`Retrainer::retrain_for_alert`] on a task of its own (the
    /// device that raised the alert does not wait for the snapshot); a
    /// failure is logged at ERROR, naming the alert.
    pub fn spawn_for_alert(
        &self,
        alert: FleetAlert,
        drift: Drift,
        store: Store,
        datasets: Datasets,
    ) {
        if !self.settings.on_fleet_alert {
            return;
        }
        let retrainer = self.clone();
        tokio::spawn(async move {
            if let Err(err) = retrainer
                .retrain_for_alert(&alert, &drift, &store, &datasets)
                .await
            {
                tracing::error!(
                    model = %alert.model,
                    window_start_ms = alert.window_start_ms,
                    error = %chain(&err),
                    "cannot enqueue the retrain job of a fleet drift alert"
                );
            }
        });
    }
}
