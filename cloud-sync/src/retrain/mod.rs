//! Retraining in the cloud (`docs/retraining.md`): tracked training runs,
//! a persistent job queue with one worker, an optional schedule, and the
//! registration of a run's verified package in the model registry.
//!
//! Modules:
//! - `db`: the `training_runs` and `retrain_jobs` tables (SQLite or
//!   PostgreSQL, own migrations);
//! - `http`: `GET /v1/runs`, `GET /v1/runs/{id}`, `POST /v1/retrain`,
//!   `GET /v1/jobs/{id}` (operators only); `openapi`: their documentation;
//! - `snapshot`: the adapter from a verified dataset snapshot to training
//!   input;
//! - `alert`: retraining triggered by a fleet drift alert (snapshot, then
//!   one job per alert).
//!
//! Training itself is `edge_retrain`'s; this module owns what surrounds it.
//! Invariants:
//! - Every run attempted is recorded before training starts and updated
//!   when it ends (`succeeded` or `failed` with the error chain); its
//!   `progress` names the stage it is in.
//! - A package is registered only after `edge_retrain` verified it in
//!   tract, and the registry validates it again; a run whose registration
//!   is refused is `failed` and nothing is registered.
//! - Training runs on a blocking thread, never on the async workers; the
//!   worker runs one job at a time.
//! - A job or run that was `running` when its process stopped is marked
//!   `failed` at the next worker start, never re-queued.
//! - A run on a dataset trains only on the snapshot its id names, read back
//!   and verified (every hash) by the dataset reader; the run and the
//!   registered version record that id.
//! - A fleet alert enqueues at most one job (its id is derived from the
//!   alert).

pub mod alert;
pub mod db;
pub mod http;
pub mod openapi;
pub mod snapshot;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_retrain::{TrainConfig, TrainingData};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use db::{RetrainDb, RetrainDbError};

use crate::config::{DatasetSettings, RetrainSettings, ScheduledJob, StorageSettings};
use crate::dataset::{DatasetError, Datasets, Snapshot};
use crate::registry::{PushOptions, Registry, RegistryError, Signer, validate};

/// Result alias for this module.
pub type Result<T, E = RetrainError> = std::result::Result<T, E>;

/// How often the worker looks at the queue when nothing woke it (another
/// instance, or the CLI, may have enqueued).
const POLL: Duration = Duration::from_secs(5);
/// Most runs `GET /v1/runs` returns.
pub const MAX_RUNS_LISTED: u32 = 1000;

/// Why a retrain operation failed (training failures are recorded on the
/// run instead).
#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    /// The database failed.
    #[error("retrain database failure")]
    Db(#[from] RetrainDbError),
    /// The registry could not be opened or read.
    #[error("model registry failure")]
    Registry(#[from] RegistryError),
    /// The job specification is unusable.
    #[error("invalid retrain job: {problem}")]
    InvalidSpec {
        /// What is wrong.
        problem: String,
    },
    /// A training config file could not be read.
    #[error("cannot read training config {}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A training config file is not valid TOML of the training config.
    #[error("invalid training config {}", path.display())]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// The dataset store could not be opened, or a snapshot not taken.
    #[error("dataset failure")]
    Dataset(#[from] DatasetError),
    /// The drift tables could not be read.
    #[error("drift storage failure")]
    Drift(#[from] crate::drift::DriftError),
}

/// State of a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Training or registering.
    Running,
    /// Package verified (and registered when asked).
    Succeeded,
    /// See `error`.
    Failed,
}

impl RunStatus {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<RunStatus> {
        Some(match text {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            _ => return None,
        })
    }
}

/// State of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for the worker.
    Queued,
    /// Its run is in progress.
    Running,
    /// Its run succeeded.
    Succeeded,
    /// Its run failed (or the process stopped while it ran).
    Failed,
}

impl JobStatus {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<JobStatus> {
        Some(match text {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            _ => return None,
        })
    }
}

/// What to retrain: the body of `POST /v1/retrain`, and what the CLI and
/// the schedule build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Model name (the package's `name`).
    pub model: String,
    /// A NAB-format CSV (`timestamp,value`) readable by the server; the
    /// values become the configured stream's `value` field.
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// A dataset snapshot id (`cloud-sync dataset snapshot`): the run
    /// trains on the readings of the training config's `stream`/`field` in
    /// it, read back and verified.
    #[serde(default)]
    pub dataset: Option<String>,
    /// Training config keys (`edge_retrain::TrainConfig` without `name`);
    /// defaults apply to missing keys. Without `version` the next patch
    /// version after the registered and written ones is used.
    #[serde(default)]
    pub train: Option<serde_json::Map<String, serde_json::Value>>,
    /// Device group to register for.
    #[serde(default = "default_group")]
    pub group: String,
    /// Register the verified package as staging.
    #[serde(default = "yes")]
    pub register: bool,
}

fn default_group() -> String {
    sync_protocol::registry::DEFAULT_GROUP.to_owned()
}

fn yes() -> bool {
    true
}

/// One training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// `run-<ms>-<hex>`.
    pub id: String,
    /// Model name.
    pub model: String,
    /// `window_detector` or `classifier`.
    pub family: String,
    /// State.
    pub status: RunStatus,
    /// The stage it is in or ended in (`started`, `windows`, `fit`,
    /// `export`, `package`, `register`, `done`).
    pub progress: String,
    /// Parameters: the training config, the data source, group, register.
    pub params: serde_json::Value,
    /// Metrics on held-out data, by name.
    pub metrics: BTreeMap<String, f64>,
    /// Hash of the training data: `sha256:<hex>` of a CSV, or the dataset
    /// snapshot's id (the sha256 of its manifest content, 64 hex digits).
    pub dataset: Option<String>,
    /// `edge-retrain <version> (<git commit>)`.
    pub code_version: String,
    /// Start, Unix ms.
    pub started_ms: i64,
    /// End, Unix ms.
    pub finished_ms: Option<i64>,
    /// Duration, ms.
    pub duration_ms: Option<i64>,
    /// Package directory written.
    pub package_dir: Option<String>,
    /// Package version.
    pub version: Option<String>,
    /// sha256 of `model.onnx`.
    pub sha256: Option<String>,
    /// Registered in the registry with `training_run` = this id.
    pub registered: bool,
    /// Error chain of a failed run.
    pub error: Option<String>,
    /// The job that ran it, if any.
    pub job_id: Option<String>,
}

/// One queued job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `job-<ms>-<hex>`.
    pub id: String,
    /// What to do.
    pub spec: JobSpec,
    /// State.
    pub status: JobStatus,
    /// Its run, once started.
    pub run_id: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Enqueued, Unix ms.
    pub created_ms: i64,
    /// Claimed by the worker, Unix ms.
    pub started_ms: Option<i64>,
    /// Ended, Unix ms.
    pub finished_ms: Option<i64>,
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}-{:08x}", now_ms(), rand::random::<u32>())
}

/// The current time in Unix ms, as the retrainer records it (for tests
/// driving [`db::RetrainDb`] directly).
#[must_use]
pub fn now_ms_for_tests() -> i64 {
    now_ms()
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Reads a training config TOML file (keys of `edge_retrain::TrainConfig`;
/// `name` is optional and replaced by the job's model) as job keys.
///
/// # Errors
/// [`RetrainError::ConfigFile`] or [`RetrainError::ConfigParse`].
pub fn read_train_config(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| RetrainError::ConfigFile {
        path: path.to_owned(),
        source,
    })?;
    let table: serde_json::Map<String, serde_json::Value> =
        toml::from_str(&text).map_err(|source| RetrainError::ConfigParse {
            path: path.to_owned(),
            source,
        })?;
    Ok(table)
}

impl JobSpec {
    /// The spec a schedule entry enqueues (reads its training config file).
    ///
    /// # Errors
    /// As [`read_train_config`].
    pub fn from_scheduled(job: &ScheduledJob) -> Result<JobSpec> {
        Ok(JobSpec {
            model: job.model.clone(),
            csv: Some(job.csv.clone()),
            dataset: None,
            train: job
                .train_config
                .as_deref()
                .map(read_train_config)
                .transpose()?,
            group: job.group.clone(),
            register: job.register,
        })
    }

    /// The training config with `model` as its name (version not yet chosen
    /// when absent).
    ///
    /// # Errors
    /// [`RetrainError::InvalidSpec`] naming the problem.
    pub fn train_config(&self) -> Result<(TrainConfig, bool)> {
        let mut keys = self.train.clone().unwrap_or_default();
        let has_version = keys.contains_key("version");
        keys.insert(
            "name".to_owned(),
            serde_json::Value::String(self.model.clone()),
        );
        let config: TrainConfig =
            serde_json::from_value(serde_json::Value::Object(keys)).map_err(|err| {
                RetrainError::InvalidSpec {
                    problem: format!("train: {err}"),
                }
            })?;
        config.validate().map_err(|err| RetrainError::InvalidSpec {
            problem: err.to_string(),
        })?;
        Ok((config, has_version))
    }

    /// Checks the spec without touching data.
    ///
    /// # Errors
    /// [`RetrainError::InvalidSpec`].
    pub fn check(&self) -> Result<()> {
        let invalid = |problem: &str| {
            Err(RetrainError::InvalidSpec {
                problem: problem.to_owned(),
            })
        };
        if !validate::is_valid_name(&self.model) {
            return invalid("model must be 1-128 characters from [A-Za-z0-9._-]");
        }
        if !crate::registry::is_valid_group(&self.group) {
            return invalid("group must be 1-128 characters from [A-Za-z0-9._-]");
        }
        match (&self.csv, &self.dataset) {
            (Some(_), None) => {}
            // Design: an unknown or corrupt dataset is found when the run
            // reads it, so the failure is recorded on the run.
            (None, Some(id)) if id.is_empty() => return invalid("dataset must not be empty"),
            (None, Some(_)) => {}
            _ => return invalid("give exactly one of csv and dataset"),
        }
        self.train_config().map(|_| ())
    }
}

/// The retrainer: runs, jobs, and registration of its packages.
#[derive(Debug, Clone)]
pub struct Retrainer {
    db: RetrainDb,
    registry: Registry,
    settings: RetrainSettings,
    signer_settings: crate::config::RegistrySettings,
    dataset_settings: DatasetSettings,
    storage: StorageSettings,
    datasets: Option<Datasets>,
    wake: Arc<Notify>,
}

impl Retrainer {
    /// Opens the retrainer's tables on `settings`' database, with
    /// `registry` for registration.
    ///
    /// # Errors
    /// [`RetrainError::Db`].
    pub async fn open(settings: &crate::Settings, registry: Registry) -> Result<Retrainer> {
        Ok(Retrainer {
            db: RetrainDb::open(&settings.storage).await?,
            registry,
            settings: settings.retrain.clone(),
            signer_settings: settings.registry.clone(),
            dataset_settings: settings.datasets.clone(),
            storage: settings.storage.clone(),
            datasets: None,
            wake: Arc::new(Notify::new()),
        })
    }

    /// The same retrainer reading snapshots through `datasets` (without
    /// it, each run on a dataset opens the configured dataset store).
    #[must_use]
    pub fn with_datasets(mut self, datasets: Datasets) -> Self {
        self.datasets = Some(datasets);
        self
    }

    /// Reads and verifies dataset `id`.
    async fn read_dataset(&self, id: &str) -> Result<Snapshot, DatasetError> {
        match &self.datasets {
            Some(datasets) => datasets.read(id).await,
            None => {
                Datasets::open(&self.dataset_settings, &self.storage)
                    .await?
                    .read(id)
                    .await
            }
        }
    }

    /// The settings it was opened with.
    #[must_use]
    pub fn settings(&self) -> &RetrainSettings {
        &self.settings
    }

    /// Checks and enqueues `spec`; wakes the worker.
    ///
    /// # Errors
    /// [`RetrainError::InvalidSpec`] or a database failure.
    pub async fn enqueue(&self, spec: JobSpec) -> Result<Job> {
        spec.check()?;
        let job = Job {
            id: new_id("job"),
            spec,
            status: JobStatus::Queued,
            run_id: None,
            error: None,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
        };
        self.db.insert_job(&job).await?;
        tracing::info!(job = %job.id, model = %job.spec.model, "retrain job queued");
        self.wake.notify_one();
        Ok(job)
    }

    /// The job `id`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn job(&self, id: &str) -> Result<Option<Job>> {
        Ok(self.db.job(id).await?)
    }

    /// The run `id`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn run(&self, id: &str) -> Result<Option<Run>> {
        Ok(self.db.run(id).await?)
    }

    /// The newest `limit` runs (of `model`), newest first.
    ///
    /// # Errors
    /// A database failure.
    pub async fn runs(&self, model: Option<&str>, limit: u32) -> Result<Vec<Run>> {
        Ok(self.db.runs(model, limit.min(MAX_RUNS_LISTED)).await?)
    }

    /// The next version for `model`: one patch above the highest version
    /// registered or written under `output_dir/<model>/`; `1.0.0` if none.
    async fn next_version(&self, model: &str) -> Result<String> {
        let mut highest: Option<(u64, u64, u64)> = None;
        for v in self.registry.list(Some(model)).await? {
            highest = highest.max(validate::parse_version(&v.version));
        }
        if let Ok(entries) = std::fs::read_dir(self.settings.output_dir.join(model)) {
            for entry in entries.flatten() {
                highest = highest.max(validate::parse_version(
                    &entry.file_name().to_string_lossy(),
                ));
            }
        }
        Ok(match highest {
            Some((a, b, c)) => format!("{a}.{b}.{}", c + 1),
            None => "1.0.0".to_owned(),
        })
    }

    /// Runs `spec` now (training on a blocking thread) and records the run;
    /// returns it, `succeeded` or `failed`. Errors are only for an invalid
    /// spec (nothing recorded) or a database failure.
    ///
    /// # Errors
    /// [`RetrainError::InvalidSpec`] or [`RetrainError::Db`].
    pub async fn execute(&self, spec: &JobSpec, job_id: Option<&str>) -> Result<Run> {
        spec.check()?;
        let (mut config, has_version) = spec.train_config()?;
        if !has_version {
            config.version = self.next_version(&spec.model).await?;
        }
        let mut run = Run {
            id: new_id("run"),
            model: spec.model.clone(),
            family: config.family().to_owned(),
            status: RunStatus::Running,
            progress: "started".to_owned(),
            params: serde_json::json!({
                "train": config,
                "csv": spec.csv,
                "dataset_id": spec.dataset,
                "group": spec.group,
                "register": spec.register,
            }),
            metrics: BTreeMap::new(),
            dataset: None,
            code_version: edge_retrain::code_version(),
            started_ms: now_ms(),
            finished_ms: None,
            duration_ms: None,
            package_dir: None,
            version: Some(config.version.clone()),
            sha256: None,
            registered: false,
            error: None,
            job_id: job_id.map(str::to_owned),
        };
        self.db.put_run(&run).await?;
        tracing::info!(run = %run.id, model = %run.model, version = %config.version, "training run started");
        let outcome = self.train_and_register(&mut run, spec, config).await;
        run.finished_ms = Some(now_ms());
        run.duration_ms = run.finished_ms.map(|f| f - run.started_ms);
        match outcome {
            Ok(()) => {
                run.status = RunStatus::Succeeded;
                run.progress = "done".to_owned();
                tracing::info!(run = %run.id, model = %run.model, version = ?run.version,
                    registered = run.registered, "training run succeeded");
            }
            Err(message) => {
                run.status = RunStatus::Failed;
                tracing::warn!(run = %run.id, model = %run.model, error = %message, "training run failed");
                run.error = Some(message);
            }
        }
        self.db.put_run(&run).await?;
        Ok(run)
    }

    async fn train_and_register(
        &self,
        run: &mut Run,
        spec: &JobSpec,
        config: TrainConfig,
    ) -> std::result::Result<(), String> {
        let input = match (&spec.csv, &spec.dataset) {
            (Some(csv), _) => Input::Csv(csv.clone()),
            (None, Some(id)) => {
                let snapshot = self
                    .read_dataset(id)
                    .await
                    .map_err(|e| format!("cannot read the training data: {}", chain(&e)))?;
                // Recorded before training: a failed run names the snapshot it read.
                run.dataset = Some(snapshot.manifest.id.clone());
                if let Err(err) = self.db.put_run(run).await {
                    tracing::warn!(run = %run.id, error = %chain(&err), "cannot record the run's dataset");
                }
                Input::Snapshot(Box::new(snapshot))
            }
            (None, None) => return Err("no data source".to_owned()),
        };
        let dir = self
            .settings
            .output_dir
            .join(&config.name)
            .join(&config.version);
        let db = self.db.clone();
        let run_id = run.id.clone();
        let handle = tokio::runtime::Handle::current();
        let trained = tokio::task::spawn_blocking(move || {
            let (dataset, data) = match input {
                Input::Csv(csv) => {
                    let bytes = std::fs::read(&csv)
                        .map_err(|e| format!("cannot read {}: {e}", csv.display()))?;
                    let dataset = format!(
                        "sha256:{}",
                        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
                    );
                    drop(bytes);
                    let source = csv
                        .file_stem()
                        .map_or_else(|| "csv".to_owned(), |s| s.to_string_lossy().into_owned());
                    let data = TrainingData::from_nab_csv(&csv, "csv", &source, &config.stream)
                        .map_err(|e| chain(&e))?;
                    (dataset, data)
                }
                Input::Snapshot(snapshot) => {
                    let data =
                        snapshot::training_data(&snapshot, &config).map_err(|e| chain(&e))?;
                    (snapshot.manifest.id.clone(), data)
                }
            };
            let mut progress = |stage: edge_retrain::Stage| {
                tracing::info!(run = %run_id, stage = stage.as_str(), percent = stage.percent(), "training progress");
                if let Err(err) = handle.block_on(db.set_progress(&run_id, stage.as_str())) {
                    tracing::warn!(run = %run_id, error = %err, "cannot record training progress");
                }
            };
            let report = edge_retrain::train(&data, &config, &dir, &mut progress)
                .map_err(|e| chain(&e))?;
            Ok::<_, String>((dataset, report))
        })
        .await
        .map_err(|e| format!("training task failed: {e}"))?;
        let (dataset, report) = trained?;
        run.dataset = Some(dataset.clone());
        run.family = report.family.clone();
        run.metrics = report.metrics.clone();
        run.package_dir = Some(report.package_dir.display().to_string());
        run.version = Some(report.version.clone());
        run.sha256 = Some(report.sha256.clone());
        if !spec.register {
            return Ok(());
        }
        run.progress = "register".to_owned();
        let _ = self.db.set_progress(&run.id, "register").await;
        let signer = Signer::load(&self.signer_settings)
            .map_err(|e| format!("cannot register: {}", chain(&e)))?;
        let options = PushOptions {
            group: spec.group.clone(),
            training_run: Some(run.id.clone()),
            dataset: Some(dataset),
        };
        self.registry
            .push(&report.package_dir, &signer, options)
            .await
            .map_err(|e| format!("registration refused: {}", chain(&e)))?;
        run.registered = true;
        Ok(())
    }

    /// Runs the claimed `job` and records its end.
    async fn process(&self, job: Job) -> Result<()> {
        tracing::info!(job = %job.id, model = %job.spec.model, "retrain job started");
        let (status, run_id, error) = match self.execute(&job.spec, Some(&job.id)).await {
            Ok(run) if run.status == RunStatus::Succeeded => {
                (JobStatus::Succeeded, Some(run.id), None)
            }
            Ok(run) => (JobStatus::Failed, Some(run.id), run.error),
            Err(RetrainError::Db(err)) => return Err(RetrainError::Db(err)),
            Err(err) => (JobStatus::Failed, None, Some(chain(&err))),
        };
        self.db
            .finish_job(
                &job.id,
                status,
                run_id.as_deref(),
                error.as_deref(),
                now_ms(),
            )
            .await?;
        tracing::info!(job = %job.id, status = status.as_str(), "retrain job ended");
        Ok(())
    }

    /// Runs every job queued now, one at a time; returns how many ran.
    ///
    /// # Errors
    /// A database failure.
    pub async fn drain(&self) -> Result<usize> {
        let mut ran = 0;
        while let Some(job) = self.db.claim(now_ms()).await? {
            self.process(job).await?;
            ran += 1;
        }
        Ok(ran)
    }

    /// Marks work interrupted by a previous process `failed`.
    ///
    /// # Errors
    /// A database failure.
    pub async fn recover(&self) -> Result<u64> {
        let marked = self.db.recover(now_ms()).await?;
        if marked > 0 {
            tracing::warn!(
                jobs = marked,
                "retrain jobs interrupted by a restart marked failed"
            );
        }
        Ok(marked)
    }

    /// The worker: recovers interrupted work, then runs queued jobs one at
    /// a time until `shutdown`, enqueuing the scheduled job every
    /// `schedule_secs`. A job in progress at shutdown finishes its current
    /// step only if the process lives long enough; otherwise the next start
    /// marks it failed.
    pub async fn work(self, shutdown: CancellationToken) {
        if let Err(err) = self.recover().await {
            tracing::error!(error = %chain(&err), "retrain worker cannot recover interrupted jobs");
        }
        let schedule = self
            .settings
            .scheduled
            .clone()
            .filter(|_| self.settings.schedule_secs > 0);
        let period = Duration::from_secs(self.settings.schedule_secs.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(err) = self.drain().await {
                tracing::error!(error = %chain(&err), "retrain worker cannot read the queue");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                _ = tick.tick(), if schedule.is_some() => {
                    if let Some(job) = &schedule {
                        let queued = JobSpec::from_scheduled(job).map(|spec| self.enqueue(spec));
                        match queued {
                            Ok(fut) => if let Err(err) = fut.await {
                                tracing::error!(error = %chain(&err), "cannot enqueue the scheduled retrain job");
                            },
                            Err(err) => tracing::error!(error = %chain(&err), "cannot enqueue the scheduled retrain job"),
                        }
                    }
                }
            }
        }
    }
}

/// What a run trains on, moved to the blocking thread.
enum Input {
    Csv(PathBuf),
    Snapshot(Box<Snapshot>),
}

/// A plain-text table of runs (for `cloud-sync runs list`).
#[must_use]
pub fn runs_table(runs: &[Run]) -> String {
    let mut out = format!(
        "{:<28}  {:<20}  {:<9}  {:<15}  {:<8}  {:>9}  {:>10}  REGISTERED\n",
        "ID", "MODEL", "STATUS", "FAMILY", "VERSION", "THRESHOLD", "DURATION"
    );
    for r in runs {
        out.push_str(&format!(
            "{:<28}  {:<20}  {:<9}  {:<15}  {:<8}  {:>9}  {:>10}  {}\n",
            r.id,
            r.model,
            r.status.as_str(),
            r.family,
            r.version.as_deref().unwrap_or("-"),
            r.metrics
                .get("threshold")
                .map_or_else(|| "-".to_owned(), |t| format!("{t:.4}")),
            r.duration_ms
                .map_or_else(|| "-".to_owned(), |d| format!("{d} ms")),
            if r.registered { "yes" } else { "no" }
        ));
    }
    out
}

/// A side-by-side comparison of two runs: parameters that differ, every
/// metric with its difference (for `cloud-sync runs compare`).
#[must_use]
pub fn compare(a: &Run, b: &Run) -> String {
    let mut out = format!("{:<24}  {:>22}  {:>22}  {:>12}\n", "", a.id, b.id, "B - A");
    let row = |out: &mut String, key: &str, x: String, y: String| {
        out.push_str(&format!("{key:<24}  {x:>22}  {y:>22}\n"));
    };
    row(&mut out, "model", a.model.clone(), b.model.clone());
    row(
        &mut out,
        "status",
        a.status.as_str().to_owned(),
        b.status.as_str().to_owned(),
    );
    row(
        &mut out,
        "version",
        a.version.clone().unwrap_or_default(),
        b.version.clone().unwrap_or_default(),
    );
    row(
        &mut out,
        "dataset",
        short(a.dataset.as_deref()),
        short(b.dataset.as_deref()),
    );
    row(
        &mut out,
        "code_version",
        a.code_version.clone(),
        b.code_version.clone(),
    );
    let flat = |run: &Run| -> BTreeMap<String, String> {
        run.params
            .get("train")
            .and_then(serde_json::Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect())
            .unwrap_or_default()
    };
    let (pa, pb) = (flat(a), flat(b));
    for key in pa
        .keys()
        .chain(pb.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (x, y) = (
            pa.get(key).cloned().unwrap_or_default(),
            pb.get(key).cloned().unwrap_or_default(),
        );
        if x != y {
            row(&mut out, &format!("param {key}"), x, y);
        }
    }
    let keys: std::collections::BTreeSet<&String> =
        a.metrics.keys().chain(b.metrics.keys()).collect();
    for key in keys {
        let (x, y) = (a.metrics.get(key), b.metrics.get(key));
        let diff = match (x, y) {
            (Some(x), Some(y)) => format!("{:+.6}", y - x),
            _ => "-".to_owned(),
        };
        out.push_str(&format!(
            "{:<24}  {:>22}  {:>22}  {diff:>12}\n",
            key,
            x.map_or_else(|| "-".to_owned(), |v| format!("{v:.6}")),
            y.map_or_else(|| "-".to_owned(), |v| format!("{v:.6}")),
        ));
    }
    out
}

fn short(text: Option<&str>) -> String {
    text.map_or_else(|| "-".to_owned(), |t| t.chars().take(22).collect())
}
