//! Retraining through cloud-sync: runs recorded with their parameters,
//! metrics, dataset hash and code version; registration linked to the run;
//! the job queue over the API (operators only); restart recovery; the CLI;
//! training on dataset snapshots (and refusing unknown, corrupt or unfit
//! ones); a fleet drift alert enqueuing exactly one job on a snapshot.
//! SQLite always, PostgreSQL when `EDGE_TEST_POSTGRES` is set.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use cloud_sync::dataset::Selection;
use cloud_sync::registry::keys;
use cloud_sync::retrain::db::{INTERRUPTED, RetrainDb};
use cloud_sync::retrain::{JobSpec, JobStatus, Retrainer, RunStatus, compare};
use cloud_sync::sync_protocol::{Reading, UploadBatch};
use cloud_sync::{AppState, Datasets, Registry, Settings, StorageSettings, Store, app};
use serde_json::{Value, json};
use tower::ServiceExt as _;

use crate::backends::PgSchema;

fn nab_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/nab/machine_temperature_system_failure.csv")
}

/// A small synthetic CSV of `rows` readings at a 5-minute cadence.
fn small_csv(dir: &Path, rows: usize) -> Result<PathBuf> {
    let path = dir.join(format!("small-{rows}.csv"));
    let mut text = "timestamp,value\n".to_owned();
    for i in 0..rows {
        let minutes = i * 5;
        text.push_str(&format!(
            "2024-01-{:02} {:02}:{:02}:00,{}\n",
            1 + minutes / 1440,
            (minutes / 60) % 24,
            minutes % 60,
            50.0 + ((i * 37) % 11) as f64 * 0.5 + (i as f64 * 0.2).sin()
        ));
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

fn spec(model: &str, csv: &Path, version: Option<&str>, register: bool) -> JobSpec {
    let mut train = serde_json::Map::new();
    if let Some(v) = version {
        train.insert("version".to_owned(), json!(v));
    }
    JobSpec {
        model: model.to_owned(),
        csv: Some(csv.to_owned()),
        dataset: None,
        train: Some(train),
        group: "default".to_owned(),
        register,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    settings: Settings,
    store: Store,
    registry: Registry,
    retrainer: Retrainer,
    datasets: Datasets,
    _schema: Option<PgSchema>,
}

impl Fixture {
    async fn open(
        settings: Settings,
        dir: tempfile::TempDir,
        schema: Option<PgSchema>,
    ) -> Result<Fixture> {
        keys::generate(&settings.registry)?;
        let store = Store::connect(&settings.storage).await?;
        let registry = Registry::open(&settings.registry, &settings.storage).await?;
        let retrainer = Retrainer::open(&settings, registry.clone()).await?;
        let datasets = Datasets::open(&settings.datasets, &settings.storage).await?;
        Ok(Fixture {
            dir: dir.path().to_owned(),
            _dir: dir,
            settings,
            store,
            registry,
            retrainer,
            datasets,
            _schema: schema,
        })
    }

    async fn sqlite() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let settings = Settings::for_database(dir.path().join("cloud.db"));
        Fixture::open(settings, dir, None).await
    }

    async fn postgres(test: &str) -> Result<Option<Fixture>> {
        let Some(schema) = PgSchema::create(test).await? else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let mut settings = Settings::for_database(dir.path().join("unused.db"));
        settings.storage = StorageSettings::Postgres(Box::new(schema.settings()));
        Ok(Some(Fixture::open(settings, dir, Some(schema)).await?))
    }

    fn router(&self) -> axum::Router {
        app(AppState::new(self.store.clone(), &self.settings)
            .with_registry(self.registry.clone())
            .with_retrainer(self.retrainer.clone()))
    }
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(v) => {
            request = request.header("content-type", "application/json");
            Body::from(serde_json::to_vec(&v)?)
        }
        None => Body::empty(),
    };
    let reply = router.clone().oneshot(request.body(body)?).await?;
    let status = reply.status();
    let bytes = axum::body::to_bytes(reply.into_body(), usize::MAX).await?;
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)?
    };
    Ok((status, value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nab_run_is_recorded_verified_and_registered_with_its_run_and_dataset() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let run = f
        .retrainer
        .execute(
            &spec("nab-machine-temp", &nab_csv(), Some("1.1.0"), true),
            None,
        )
        .await?;
    ensure!(run.status == RunStatus::Succeeded, "{run:?}");
    assert!(run.registered);
    assert_eq!(run.family, "window_detector");
    assert_eq!(run.progress, "done");
    assert!(run.code_version.starts_with("edge-retrain "));
    assert!(run.duration_ms.is_some_and(|d| d >= 0));
    assert_eq!(run.metrics["heldout_windows"], 1135.0);
    assert!(run.metrics["threshold"] > 0.0);
    let dataset = run.dataset.clone().context("no dataset hash")?;
    assert!(dataset.starts_with("sha256:") && dataset.len() == 71);
    assert_eq!(run.params["train"]["window"], 12);

    let versions = f.registry.list(Some("nab-machine-temp")).await?;
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].version, "1.1.0");
    assert_eq!(versions[0].training_run.as_deref(), Some(run.id.as_str()));
    assert_eq!(versions[0].dataset.as_deref(), Some(dataset.as_str()));
    assert_eq!(Some(&versions[0].model_sha256), run.sha256.as_ref());

    // The next run without a version takes the next patch, and is comparable.
    let mut second = spec("nab-machine-temp", &nab_csv(), None, false);
    second.train = Some(serde_json::from_value(
        json!({ "threshold_quantile": 0.995 }),
    )?);
    let run2 = f.retrainer.execute(&second, None).await?;
    ensure!(run2.status == RunStatus::Succeeded, "{run2:?}");
    assert_eq!(run2.version.as_deref(), Some("1.1.1"));
    assert!(!run2.registered);
    assert!(run2.metrics["threshold"] > run.metrics["threshold"]);
    let text = compare(&run, &run2);
    assert!(
        text.contains("param threshold_quantile") && text.contains("heldout_flag_rate"),
        "{text}"
    );

    let listed = f.retrainer.runs(Some("nab-machine-temp"), 10).await?;
    assert_eq!(
        listed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [run2.id.as_str(), run.id.as_str()]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_runs_are_recorded_and_register_nothing() -> Result<()> {
    let f = Fixture::sqlite().await?;
    // Too little data for one window of 12.
    let tiny = small_csv(&f.dir, 10)?;
    let run = f
        .retrainer
        .execute(&spec("tiny", &tiny, Some("1.0.0"), true), None)
        .await?;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.clone().unwrap_or_default();
    assert!(error.contains("too little data"), "{error}");
    assert!(!run.registered);
    // Non-finite input.
    let nan = f.dir.join("nan.csv");
    let mut text = std::fs::read_to_string(small_csv(&f.dir, 300)?)?;
    text = text.replacen(",50", ",NaN", 1);
    std::fs::write(&nan, text)?;
    let run = f
        .retrainer
        .execute(&spec("nan", &nan, Some("1.0.0"), true), None)
        .await?;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error
            .as_deref()
            .unwrap_or_default()
            .contains("non-finite"),
        "{run:?}"
    );
    // A registration the registry refuses (the signing key is gone) fails the run.
    std::fs::remove_file(&f.settings.registry.signing_key_file)?;
    let ok_csv = small_csv(&f.dir, 400)?;
    let run = f
        .retrainer
        .execute(&spec("unsigned", &ok_csv, Some("1.0.0"), true), None)
        .await?;
    assert_eq!(run.status, RunStatus::Failed, "{run:?}");
    assert!(
        run.error
            .as_deref()
            .unwrap_or_default()
            .contains("cannot register"),
        "{run:?}"
    );
    assert!(f.registry.list(None).await?.is_empty());
    // Bad specs are refused before anything is recorded.
    let mut bad = spec("bad", &ok_csv, None, false);
    bad.train = Some(serde_json::from_value(json!({ "hop": 0 }))?);
    assert!(f.retrainer.execute(&bad, None).await.is_err());
    let mut both = spec("bad", &ok_csv, None, false);
    both.dataset = Some("ds-1".to_owned());
    assert!(f.retrainer.enqueue(both).await.is_err());
    assert_eq!(f.retrainer.runs(None, 100).await?.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_api_is_for_operators_and_the_worker_runs_jobs() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let router = f.router();
    let operator = f.store.add_operator("ops").await?;
    let device = f.store.add_device("dev-1").await?;
    let csv = small_csv(&f.dir, 600)?;
    let body = json!({ "model": "small", "csv": csv, "train": { "version": "2.0.0" } });

    let (status, _) = call(&router, "POST", "/v1/retrain", None, Some(body.clone())).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        &router,
        "POST",
        "/v1/retrain",
        Some(&device),
        Some(body.clone()),
    )
    .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, reply) = call(
        &router,
        "POST",
        "/v1/retrain",
        Some(&operator),
        Some(json!({ "model": "x" })),
    )
    .await?;
    assert_eq!(
        (status, reply["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_job"))
    );
    let (status, reply) = call(
        &router,
        "POST",
        "/v1/retrain",
        Some(&operator),
        Some(json!({ "model": "x", "csvv": "a" })),
    )
    .await?;
    assert_eq!(
        (status, reply["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_job"))
    );

    let (status, job) = call(&router, "POST", "/v1/retrain", Some(&operator), Some(body)).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    let id = job["id"].as_str().context("no job id")?.to_owned();
    assert_eq!(job["status"], "queued");
    let (status, job) = call(
        &router,
        "GET",
        &format!("/v1/jobs/{id}"),
        Some(&operator),
        None,
    )
    .await?;
    assert_eq!(
        (status, job["status"].as_str()),
        (StatusCode::OK, Some("queued"))
    );

    assert_eq!(f.retrainer.drain().await?, 1);
    let (_, job) = call(
        &router,
        "GET",
        &format!("/v1/jobs/{id}"),
        Some(&operator),
        None,
    )
    .await?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let run_id = job["run_id"].as_str().context("no run id")?.to_owned();
    let (status, run) = call(
        &router,
        "GET",
        &format!("/v1/runs/{run_id}"),
        Some(&operator),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (run["status"].as_str(), run["job_id"].as_str()),
        (Some("succeeded"), Some(id.as_str()))
    );
    assert_eq!(run["registered"], true);
    let (status, runs) = call(
        &router,
        "GET",
        "/v1/runs?model=small",
        Some(&operator),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(runs.as_array().map(Vec::len), Some(1));
    let (status, _) = call(&router, "GET", "/v1/runs", Some(&device), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, reply) = call(&router, "GET", "/v1/runs/run-nope", Some(&operator), None).await?;
    assert_eq!(
        (status, reply["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_run"))
    );
    let (status, reply) = call(&router, "GET", "/v1/jobs/job-nope", Some(&operator), None).await?;
    assert_eq!(
        (status, reply["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_job"))
    );

    // A failing job: the status API carries the error.
    let tiny = small_csv(&f.dir, 5)?;
    let (_, job) = call(
        &router,
        "POST",
        "/v1/retrain",
        Some(&operator),
        Some(json!({ "model": "tiny", "csv": tiny })),
    )
    .await?;
    f.retrainer.drain().await?;
    let (_, job) = call(
        &router,
        "GET",
        &format!("/v1/jobs/{}", job["id"].as_str().unwrap_or_default()),
        Some(&operator),
        None,
    )
    .await?;
    assert_eq!(job["status"], "failed");
    assert!(
        job["error"]
            .as_str()
            .unwrap_or_default()
            .contains("too little data"),
        "{job}"
    );
    Ok(())
}

async fn restart_marks_running_jobs_failed(f: &Fixture) -> Result<()> {
    let csv = small_csv(&f.dir, 300)?;
    let job = f
        .retrainer
        .enqueue(spec("crash", &csv, None, false))
        .await?;
    let queued = f
        .retrainer
        .enqueue(spec("later", &csv, None, false))
        .await?;
    // Another handle claims the first job, then "dies".
    let other = RetrainDb::open(&f.settings.storage).await?;
    let claimed = other
        .claim(cloud_sync::retrain::now_ms_for_tests())
        .await?
        .context("nothing claimed")?;
    assert_eq!(claimed.id, job.id);
    drop(other);
    // The next start: the running job is failed, the queued one stays queued and runs.
    let restarted = Retrainer::open(&f.settings, f.registry.clone()).await?;
    assert_eq!(restarted.recover().await?, 1);
    let failed = restarted.job(&job.id).await?.context("job gone")?;
    assert_eq!(
        (failed.status, failed.error.as_deref()),
        (JobStatus::Failed, Some(INTERRUPTED))
    );
    assert_eq!(restarted.drain().await?, 1);
    let done = restarted.job(&queued.id).await?.context("job gone")?;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_restart_marks_running_jobs_failed() -> Result<()> {
    restart_marks_running_jobs_failed(&Fixture::sqlite().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_runs_jobs_and_restart() -> Result<()> {
    let Some(f) = Fixture::postgres("postgres_runs_jobs_and_restart").await? else {
        return Ok(());
    };
    let csv = small_csv(&f.dir, 400)?;
    let run = f
        .retrainer
        .execute(&spec("pg-model", &csv, Some("1.0.0"), true), None)
        .await?;
    ensure!(run.status == RunStatus::Succeeded, "{run:?}");
    let stored = f.retrainer.run(&run.id).await?.context("run not stored")?;
    assert_eq!(stored, run);
    let versions = f.registry.list(Some("pg-model")).await?;
    assert_eq!(versions[0].training_run.as_deref(), Some(run.id.as_str()));
    restart_marks_running_jobs_failed(&f).await
}

#[test]
fn cli_retrain_runs_list_show_compare() -> Result<()> {
    const BIN: &str = env!("CARGO_BIN_EXE_cloud-sync");
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cloud-sync.toml");
    std::fs::write(
        &config,
        format!(
            "database_path = {:?}\n[registry]\nartifact_dir = {:?}\nsigning_key_file = {:?}\npublic_keys_file = {:?}\n[retrain]\noutput_dir = {:?}\n",
            dir.path().join("cloud.db"),
            dir.path().join("artifacts"),
            dir.path().join("key.pem"),
            dir.path().join("public.toml"),
            dir.path().join("retrained"),
        ),
    )?;
    let config = config.display().to_string();
    let csv = small_csv(dir.path(), 500)?.display().to_string();
    let train = dir.path().join("train.toml");
    std::fs::write(&train, "window = 6\nhop = 3\nthreshold_quantile = 0.95\n")?;
    let cli = |args: &[&str]| Command::new(BIN).args(args).env("NO_COLOR", "1").output();
    let out = cli(&["keys", "generate", "--config", &config])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "retrain",
        "--model",
        "cli-model",
        "--csv",
        &csv,
        "--train-config",
        &train.display().to_string(),
        "--config",
        &config,
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = String::from_utf8(out.stdout)?.trim().to_owned();
    let out = cli(&[
        "retrain",
        "--model",
        "cli-model",
        "--csv",
        &csv,
        "--no-register",
        "--config",
        &config,
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = String::from_utf8(out.stdout)?.trim().to_owned();
    let out = cli(&["runs", "list", "--config", &config])?;
    let list = String::from_utf8(out.stdout)?;
    assert!(list.contains(&first) && list.contains(&second), "{list}");
    let out = cli(&["runs", "show", &first, "--config", &config])?;
    let shown: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (shown["version"].as_str(), shown["registered"].as_bool()),
        (Some("1.0.0"), Some(true))
    );
    let out = cli(&["runs", "compare", &first, &second, "--config", &config])?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        text.contains("param window") && text.contains("threshold"),
        "{text}"
    );
    let out = cli(&["models", "list", "cli-model", "--config", &config])?;
    assert!(String::from_utf8(out.stdout)?.contains(&first));
    // Failure: exit 1 with the reason, run still recorded.
    let tiny = small_csv(dir.path(), 4)?.display().to_string();
    let out = cli(&[
        "retrain",
        "--model",
        "cli-model",
        "--csv",
        &tiny,
        "--config",
        &config,
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("too little data"));
    let out = cli(&[
        "retrain",
        "--model",
        "cli-model",
        "--dataset",
        "ds-1",
        "--config",
        &config,
    ])?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown dataset \"ds-1\""), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_enqueued_jobs_and_stops_on_shutdown() -> Result<()> {
    let f = Fixture::sqlite().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(f.retrainer.clone().work(shutdown.clone()));
    let csv = small_csv(&f.dir, 300)?;
    let job = f
        .retrainer
        .enqueue(spec("worked", &csv, None, true))
        .await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let done = loop {
        let current = f.retrainer.job(&job.id).await?.context("job gone")?;
        if matches!(current.status, JobStatus::Succeeded | JobStatus::Failed) {
            break current;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "job still {:?}",
            current.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    let run = f
        .retrainer
        .run(done.run_id.as_deref().unwrap_or_default())
        .await?
        .context("no run")?;
    assert_eq!(run.version.as_deref(), Some("1.0.0"));
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(10), worker).await??;
    Ok(())
}

#[test]
fn retrain_config_is_validated_with_key_names() -> Result<()> {
    use cloud_sync::config::{Config, ConfigError};
    let Err(ConfigError::Invalid { problems }) =
        Config::from_toml_str("[retrain]\nschedule_secs = 60\n")?.validate()
    else {
        anyhow::bail!("a schedule without a job must be refused");
    };
    assert!(
        problems.iter().any(|p| p.key == "retrain.scheduled"),
        "{problems:?}"
    );
    assert!(Config::from_toml_str("[retrain]\nschedul_secs = 60\n").is_err());
    let settings = Config::from_toml_str(
        "[retrain]\nschedule_secs = 60\n[retrain.scheduled]\nmodel = \"m\"\ncsv = \"data.csv\"\n",
    )?
    .validate()?;
    assert_eq!(settings.retrain.schedule_secs, 60);
    let job = settings.retrain.scheduled.context("no scheduled job")?;
    let spec = JobSpec::from_scheduled(&job)?;
    assert_eq!((spec.model.as_str(), spec.register), ("m", true));

    let Err(ConfigError::Invalid { problems }) = Config::from_toml_str(
        "[retrain]\non_fleet_alert = true\n[retrain.fleet_alert]\nlookback_secs = 0\ngroup = \"a b\"\n",
    )?
    .validate() else {
        anyhow::bail!("a zero lookback must be refused");
    };
    let keys: Vec<&str> = problems.iter().map(|p| p.key).collect();
    assert!(
        keys.contains(&"retrain.fleet_alert.lookback_secs")
            && keys.contains(&"retrain.fleet_alert.group"),
        "{problems:?}"
    );
    assert!(Config::from_toml_str("[retrain.fleet_alert]\nlookback = 1\n").is_err());
    let settings = Config::from_toml_str(
        "[retrain]\non_fleet_alert = true\n[retrain.fleet_alert]\nlookback_secs = 3600\nstreams = [\"temperature\"]\n",
    )?
    .validate()?;
    assert!(settings.retrain.on_fleet_alert);
    assert_eq!(settings.retrain.fleet_alert.lookback_secs, 3600);
    Ok(())
}

/// The first `rows` NAB readings as device `device` uploads them (source
/// `m1`, stream `temperature`, field `value`, seq 1..), received
/// `recv_step_ms` apart ending at `last_recv_ms`; plus a `humidity` stream.
async fn upload_nab(
    store: &Store,
    device: &str,
    rows: usize,
    last_recv_ms: i64,
) -> Result<Vec<Reading>> {
    let data = edge_retrain::TrainingData::from_nab_csv(&nab_csv(), device, "m1", "temperature")?;
    let series = data.series.first().context("no NAB series")?;
    let n = i64::try_from(rows)?;
    let mut readings: Vec<Reading> = series
        .points
        .iter()
        .take(rows)
        .map(|p| Reading {
            source: "m1".to_owned(),
            stream: "temperature".to_owned(),
            seq: u64::try_from(p.seq).unwrap_or(0),
            device_ts_ms: Some(p.ts_ms),
            recv_ts_ms: last_recv_ms - (n - p.seq) * 10,
            clock_ok: true,
            values: std::collections::BTreeMap::from([("value".to_owned(), p.value)]),
        })
        .collect();
    let nab = readings.clone();
    readings.extend((1..=20u64).map(|seq| Reading {
        source: "m1".to_owned(),
        stream: "humidity".to_owned(),
        seq,
        device_ts_ms: None,
        recv_ts_ms: last_recv_ms - 1000 + i64::try_from(seq).unwrap_or(0),
        clock_ok: true,
        values: std::collections::BTreeMap::from([("rh".to_owned(), 40.0)]),
    }));
    for part in readings.chunks(1000) {
        store
            .store_batch(
                device,
                UploadBatch {
                    readings: part.to_vec(),
                    predictions: vec![],
                    dead_letters: vec![],
                },
            )
            .await?;
    }
    Ok(nab)
}

fn dataset_spec(model: &str, id: &str, version: &str) -> JobSpec {
    JobSpec {
        model: model.to_owned(),
        csv: None,
        dataset: Some(id.to_owned()),
        train: Some(serde_json::from_value(json!({ "version": version })).unwrap_or_default()),
        group: "default".to_owned(),
        register: true,
    }
}

async fn snapshot_run_is_registered_with_its_dataset(f: &Fixture) -> Result<()> {
    const ROWS: usize = 2000;
    f.store.add_device("dev-1").await?;
    let nab = upload_nab(&f.store, "dev-1", ROWS, 1_700_000_000_000).await?;
    let selection = Selection {
        streams: vec!["temperature".into(), "humidity".into()],
        devices: vec!["dev-1".into()],
        from_ms: 0,
        to_ms: i64::MAX,
    };
    let id = f
        .datasets
        .snapshot(&f.store, selection, Some("nab".into()))
        .await?
        .manifest
        .id;
    let run = f
        .retrainer
        .execute(&dataset_spec("snap-model", &id, "1.1.0"), None)
        .await?;
    ensure!(run.status == RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.dataset.as_deref(), Some(id.as_str()));
    assert_eq!(run.params["dataset_id"], json!(id));
    // Windows of 12, hop 6, over the one temperature series.
    let windows = (ROWS - 12) / 6 + 1;
    assert_eq!(
        run.metrics["train_windows"] + run.metrics["heldout_windows"],
        windows as f64,
        "{:?}",
        run.metrics
    );
    let versions = f.registry.list(Some("snap-model")).await?;
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].dataset.as_deref(), Some(id.as_str()));
    assert_eq!(versions[0].training_run.as_deref(), Some(run.id.as_str()));

    // The snapshot yields the series in device order: the same rows from a
    // CSV train the very same graph.
    let csv = f.dir.join("first.csv");
    let text = std::fs::read_to_string(nab_csv())?;
    std::fs::write(
        &csv,
        text.lines().take(ROWS + 1).collect::<Vec<_>>().join("\n") + "\n",
    )?;
    let from_csv = f
        .retrainer
        .execute(&spec("csv-model", &csv, Some("1.0.0"), false), None)
        .await?;
    ensure!(from_csv.status == RunStatus::Succeeded, "{from_csv:?}");
    assert_eq!(from_csv.sha256, run.sha256, "same data, same model");
    assert_eq!(nab.len(), ROWS);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_snapshot_run_is_registered_with_its_dataset() -> Result<()> {
    snapshot_run_is_registered_with_its_dataset(&Fixture::sqlite().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_snapshot_run_is_registered_with_its_dataset() -> Result<()> {
    let Some(f) = Fixture::postgres("postgres_snapshot_run_registered").await? else {
        return Ok(());
    };
    snapshot_run_is_registered_with_its_dataset(&f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_corrupt_or_unfit_datasets_fail_the_run_and_register_nothing() -> Result<()> {
    let f = Fixture::sqlite().await?;
    f.store.add_device("dev-1").await?;
    upload_nab(&f.store, "dev-1", 300, 1_700_000_000_000).await?;
    let snapshot = |streams: &[&str]| Selection {
        streams: streams.iter().map(|s| (*s).to_owned()).collect(),
        devices: vec!["dev-1".into()],
        from_ms: 0,
        to_ms: i64::MAX,
    };
    let humidity = f
        .datasets
        .snapshot(&f.store, snapshot(&["humidity"]), None)
        .await?
        .manifest;
    let temperature = f
        .datasets
        .snapshot(&f.store, snapshot(&["temperature"]), None)
        .await?
        .manifest;
    // Corrupt the temperature snapshot's readings file: one flipped byte.
    let file = temperature
        .content
        .files
        .iter()
        .find(|file| file.table == "readings")
        .context("no readings file")?;
    let cloud_sync::config::DatasetSettings::Local { dir } = &f.settings.datasets else {
        anyhow::bail!("local datasets expected");
    };
    let path = dir.join(&file.path);
    let mut bytes = std::fs::read(&path)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&path, bytes)?;

    let unknown = "00".repeat(32);
    for (id, expected) in [
        (unknown.as_str(), format!("unknown dataset \"{unknown}\"")),
        ("ds-1", "unknown dataset \"ds-1\"".to_owned()),
        (
            humidity.id.as_str(),
            "has no stream \"temperature\" with field \"value\" (it holds m1/humidity.rh)"
                .to_owned(),
        ),
        (
            temperature.id.as_str(),
            format!("dataset {} is corrupt: {}", temperature.id, file.path),
        ),
    ] {
        let run = f
            .retrainer
            .execute(&dataset_spec("bad-data", id, "1.0.0"), None)
            .await?;
        assert_eq!(run.status, RunStatus::Failed, "{run:?}");
        let error = run.error.clone().unwrap_or_default();
        assert!(error.contains(&expected), "{error} lacks {expected}");
        assert!(!run.registered);
        let stored = f
            .retrainer
            .run(&run.id)
            .await?
            .context("run not recorded")?;
        assert_eq!(stored.status, RunStatus::Failed);
    }
    assert!(f.registry.list(None).await?.is_empty());
    assert_eq!(f.retrainer.runs(None, 100).await?.len(), 4);
    // An empty dataset id is refused before anything is recorded.
    assert!(
        f.retrainer
            .execute(&dataset_spec("bad-data", "", "1.0.0"), None)
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_fleet_alert_enqueues_exactly_one_job_on_a_snapshot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = Settings::for_database(dir.path().join("cloud.db"));
    fleet_alert_enqueues_exactly_one_job_on_a_snapshot(settings, dir, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_fleet_alert_enqueues_exactly_one_job_on_a_snapshot() -> Result<()> {
    let Some(schema) = PgSchema::create("postgres_fleet_alert_job").await? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let mut settings = Settings::for_database(dir.path().join("unused.db"));
    settings.storage = StorageSettings::Postgres(Box::new(schema.settings()));
    fleet_alert_enqueues_exactly_one_job_on_a_snapshot(settings, dir, Some(schema)).await
}

async fn fleet_alert_enqueues_exactly_one_job_on_a_snapshot(
    mut settings: Settings,
    dir: tempfile::TempDir,
    schema: Option<PgSchema>,
) -> Result<()> {
    use cloud_sync::drift::{Drift, DriftSettings};
    use cloud_sync::retrain::alert;
    use cloud_sync::sync_protocol::drift::{DriftSummary, FeatureDrift, ScoreStats, drift_path};

    const DAY_MS: i64 = 86_400_000;
    settings.retrain.on_fleet_alert = true;
    settings.retrain.fleet_alert.lookback_secs = 3600;
    settings.drift = DriftSettings {
        fleet_window_ms: DAY_MS,
        fleet_alert_percent: 50,
        min_devices: 1,
    };
    let f = Fixture::open(settings, dir, schema).await?;
    let drift = Drift::open(&f.settings.storage, f.settings.drift.clone()).await?;
    let retrainer = f.retrainer.clone().with_datasets(f.datasets.clone());
    let router = app(AppState::new(f.store.clone(), &f.settings)
        .with_registry(f.registry.clone())
        .with_drift(drift.clone())
        .with_retrainer(retrainer.clone())
        .with_datasets(f.datasets.clone()));
    let now = cloud_sync::retrain::now_ms_for_tests();
    let mut tokens = Vec::new();
    for device in ["dev-1", "dev-2"] {
        tokens.push(f.store.add_device(device).await?);
        upload_nab(&f.store, device, 600, now - 1000).await?;
    }
    // dev-3 never reported drift: not part of the snapshot.
    f.store.add_device("dev-3").await?;
    upload_nab(&f.store, "dev-3", 600, now - 1000).await?;
    let summary = |start_ms: i64, alert: bool| DriftSummary {
        model: "nab-machine-temp".into(),
        version: "1.0.0".into(),
        window_start_ms: start_ms,
        window_end_ms: start_ms + 3_600_000,
        features: vec![FeatureDrift {
            stream: "temperature".into(),
            field: "value".into(),
            count: 288,
            missing: 0,
            mean: Some(85.0),
            std: Some(3.0),
            min: Some(80.0),
            max: Some(90.0),
            horizon_count: 2016,
            psi: Some(if alert { 7.0 } else { 0.3 }),
            mean_shift: Some(0.1),
        }],
        scores: ScoreStats::default(),
        stale: vec![],
        nan_skipped: 0,
        gap_resets: 0,
        alert,
        reasons: if alert { vec!["psi".into()] } else { vec![] },
    };
    let window = now.div_euclid(DAY_MS) * DAY_MS;
    let post_summary = |device: &str, token: &str, s: &DriftSummary| {
        crate::util::post(
            &drift_path(device),
            Some(token),
            "application/json",
            None,
            serde_json::to_vec(s).unwrap_or_default(),
        )
    };
    // dev-1 reports normally, dev-2 alerts: 1 of 2 is not more than 50 %.
    for (i, (device, alert)) in [("dev-1", false), ("dev-2", true)].iter().enumerate() {
        let reply = crate::util::send(
            &router,
            post_summary(device, &tokens[i], &summary(window, *alert))?,
        )
        .await?;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let id = alert::job_id("nab-machine-temp", window);
    assert!(retrainer.job(&id).await?.is_none(), "no alert, no job");
    // dev-1 alerts too (next hour): the fleet alert is raised.
    let reply = crate::util::send(
        &router,
        post_summary("dev-1", &tokens[0], &summary(window + 3_600_000, true))?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let job = loop {
        if let Some(job) = retrainer.job(&id).await? {
            break job;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no job for the alert"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.spec.model, "nab-machine-temp");
    let dataset = job.spec.dataset.clone().context("no dataset on the job")?;
    let manifest = f.datasets.manifest(&dataset).await?;
    let selection = &manifest.content.selection;
    assert_eq!(selection.devices, ["dev-1", "dev-2"]);
    assert_eq!(selection.streams, ["temperature"]);
    assert_eq!(selection.to_ms - selection.from_ms, 3_600_000 + 1);
    assert_eq!(
        manifest
            .content
            .lineage
            .readings
            .iter()
            .map(|l| (l.device.as_str(), l.records))
            .collect::<Vec<_>>(),
        [("dev-1", 600), ("dev-2", 600)]
    );

    // Idempotent: the alert again (another instance, a retry) adds nothing.
    let alerts = drift.alerts(0).await?;
    assert_eq!(alerts.len(), 1);
    assert!(
        retrainer
            .retrain_for_alert(&alerts[0], &drift, &f.store, &f.datasets)
            .await?
            .is_none()
    );
    let reply = crate::util::send(
        &router,
        post_summary("dev-2", &tokens[1], &summary(window + 7_200_000, true))?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);

    // Exactly one job ran: on the snapshot, registered with it.
    assert_eq!(retrainer.drain().await?, 1);
    let done = retrainer.job(&id).await?.context("job gone")?;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    let run = retrainer
        .run(done.run_id.as_deref().unwrap_or_default())
        .await?
        .context("no run")?;
    assert_eq!(run.dataset.as_deref(), Some(dataset.as_str()));
    let versions = f.registry.list(Some("nab-machine-temp")).await?;
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].dataset.as_deref(), Some(dataset.as_str()));
    assert_eq!(retrainer.drain().await?, 0);
    Ok(())
}
