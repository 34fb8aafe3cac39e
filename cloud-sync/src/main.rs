//! `cloud-sync` binary: parse the CLI, initialise tracing, load and validate
//! the config, call the library, map the outcome to an exit code.
//!
//! Exit codes: 0 success, 78 (`EX_CONFIG`) bad or unreadable config, 1 any
//! other failure.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloud_sync::config::DEFAULT_CONFIG_TOML;
use cloud_sync::sync_protocol::registry::DEFAULT_GROUP;
use cloud_sync::{Config, Settings, Store};
use tokio_util::sync::CancellationToken;

/// Exit code for configuration errors (sysexits `EX_CONFIG`).
const EXIT_CONFIG: u8 = 78;

/// Cloud endpoint for edge agents: authenticated, exactly-once batch ingest.
#[derive(Debug, Parser)]
#[command(name = "cloud-sync", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP API until SIGINT or SIGTERM.
    Serve {
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the commented default config to stdout.
    PrintDefaultConfig,
    /// Parse and validate a config file; report every problem.
    CheckConfig {
        /// Config file (TOML).
        file: PathBuf,
    },
    /// Manage device registrations.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Manage operators (read every device and the fleet summary; never upload).
    Operators {
        #[command(subcommand)]
        command: OperatorsCommand,
    },
    /// Manage the model registry's ed25519 signing key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Register, list, promote and archive model versions.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Snapshot readings and predictions into versioned datasets; list, show and verify them.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Fleet drift monitoring (docs/drift.md).
    Drift {
        #[command(subcommand)]
        command: DriftCommand,
    },
    /// Train a model now (recorded as a run; registered as staging unless
    /// --no-register), or with --enqueue queue it for the server's worker.
    Retrain {
        /// Model name.
        #[arg(long)]
        model: String,
        /// NAB-format CSV (`timestamp,value`) to train on.
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "dataset",
            conflicts_with = "dataset"
        )]
        csv: Option<PathBuf>,
        /// Dataset snapshot id (`dataset snapshot`): trains on its readings
        /// of the training config's stream/field (default temperature/value).
        #[arg(long, value_name = "ID")]
        dataset: Option<String>,
        /// Training config TOML (window, hop, train_fraction, ridge,
        /// threshold_quantile, version, [label], ...).
        #[arg(long, value_name = "FILE")]
        train_config: Option<PathBuf>,
        /// Package version (default: next patch after the registered ones).
        #[arg(long)]
        version: Option<String>,
        /// Device group to register for.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// Do not register the package.
        #[arg(long)]
        no_register: bool,
        /// Queue the job for the server's worker instead of training here;
        /// prints the job id.
        #[arg(long)]
        enqueue: bool,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List, show and compare training runs.
    Runs {
        #[command(subcommand)]
        command: RunsCommand,
    },
    /// Show a retrain job's status.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DriftCommand {
    /// List fleet drift alerts (the retraining hook), oldest first.
    Alerts {
        /// Only fleet windows starting at or after this time (Unix ms).
        #[arg(long, default_value_t = 0)]
        since_ms: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// List runs, newest first.
    List {
        /// Only runs of this model.
        #[arg(long)]
        model: Option<String>,
        /// Most runs listed.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print one run as JSON.
    Show {
        /// Run id.
        id: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Compare two runs: differing parameters and every metric.
    Compare {
        /// First run id.
        a: String,
        /// Second run id.
        b: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Print one job as JSON (exit 0 whatever its status).
    Show {
        /// Job id.
        id: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DatasetCommand {
    /// Freeze the readings and predictions a selection matches into Parquet
    /// files and a manifest; prints the dataset id.
    Snapshot {
        /// Streams, comma-separated: NAME (any source) or SOURCE/NAME.
        #[arg(long, value_delimiter = ',', required = true)]
        streams: Vec<String>,
        /// Device ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        devices: Vec<String>,
        /// Window start (Unix ms, inclusive; agent receive time).
        #[arg(long, allow_hyphen_values = true)]
        from_ms: i64,
        /// Window end (Unix ms, exclusive).
        #[arg(long, allow_hyphen_values = true)]
        to_ms: i64,
        /// Label kept with the dataset (not part of its id).
        #[arg(long)]
        name: Option<String>,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List registered datasets, oldest first.
    List {
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a dataset's manifest (JSON), checked against its id.
    Show {
        /// Dataset id.
        id: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Read a dataset back, verifying every hash, and print its row counts.
    Verify {
        /// Dataset id.
        id: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create the first signing key (refused when one exists).
    Generate {
        /// Config file (TOML) naming the key files.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Replace the signing key; old public keys stay listed.
    Rotate {
        /// Config file (TOML) naming the key files.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print every public key (current first) for the agents' config.
    ShowPublic {
        /// Config file (TOML) naming the key files.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Validate a package directory, store and sign its artifact, register it as staging.
    Push {
        /// Package directory (model.toml + model.onnx).
        dir: PathBuf,
        /// Device group to register for.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// Training run that produced the model.
        #[arg(long, value_name = "ID")]
        training_run: Option<String>,
        /// Dataset the model was trained on.
        #[arg(long, value_name = "ID")]
        dataset: Option<String>,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List registered versions (of one model when NAME is given).
    List {
        /// Model name.
        name: Option<String>,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Make a version the production one of a group (archives the previous
    /// one), or, with --percent below 100, start a staged rollout of it.
    Promote {
        /// Model name.
        name: String,
        /// Version (MAJOR.MINOR.PATCH).
        version: String,
        /// Device group.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// Share of the group's devices (1-100) that get the version, chosen
        /// by their canary bucket; below 100 starts a staged rollout.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
        percent: u8,
        /// The rollout halts once more than this share (0.0-1.0) of the
        /// reporting devices rolled the version back.
        #[arg(long, default_value_t = 0.5)]
        halt_share: f64,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Widen (or narrow) the active staged rollout of a model; 100 completes it.
    Rollout {
        /// Model name.
        name: String,
        /// Device group.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// New share of the group's devices (1-100).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
        percent: u8,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Halt the active rollout of a model, or promote its previous production
    /// version again; devices are told to downgrade.
    Rollback {
        /// Model name.
        name: String,
        /// Device group.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run a version in shadow mode beside the active one (or --clear).
    Shadow {
        /// Model name.
        name: String,
        /// Version to shadow (MAJOR.MINOR.PATCH); omit with --clear.
        #[arg(required_unless_present = "clear")]
        version: Option<String>,
        /// Device group.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// Share of the group's devices (1-100) that run the shadow.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
        percent: u8,
        /// Remove the shadow target.
        #[arg(long, conflicts_with = "version")]
        clear: bool,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the rollout state of a model: counts and recent rollback reasons.
    Status {
        /// Model name.
        name: String,
        /// Device group.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Archive a version.
    Archive {
        /// Model name.
        name: String,
        /// Version (MAJOR.MINOR.PATCH).
        version: String,
        /// Device group.
        #[arg(long, default_value = DEFAULT_GROUP)]
        group: String,
        /// Config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorsCommand {
    /// Register an operator and print its bearer token (shown only once).
    Add {
        /// Operator name: 1 to 128 characters from [A-Za-z0-9._-].
        name: String,
        /// Config file (TOML) naming the database.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Revoke an operator's token.
    Revoke {
        /// Operator name.
        name: String,
        /// Config file (TOML) naming the database.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Register a device and print its bearer token (shown only once).
    Add {
        /// Device id: 1 to 128 characters from [A-Za-z0-9._-].
        id: String,
        /// Config file (TOML) naming the database.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Revoke a device's token; its stored data is kept.
    Revoke {
        /// Device id.
        id: String,
        /// Config file (TOML) naming the database.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Assign a device to a model group (overrides the group it names), or --clear.
    SetGroup {
        /// Device id.
        id: String,
        /// Group: 1 to 128 characters from [A-Za-z0-9._-]; omit with --clear.
        #[arg(required_unless_present = "clear")]
        group: Option<String>,
        /// Remove the assignment: the group the device names applies again.
        #[arg(long, conflicts_with = "group")]
        clear: bool,
        /// Config file (TOML) naming the database.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG_TOML}");
            ExitCode::SUCCESS
        }
        Command::CheckConfig { file } => match load_settings(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve { config } => with_settings(&config, |settings| run(serve(settings))),
        Command::Devices {
            command: DevicesCommand::Add { id, config },
        } => with_settings(&config, |settings| run(add_device(settings, id))),
        Command::Devices {
            command: DevicesCommand::Revoke { id, config },
        } => with_settings(&config, |settings| run(revoke_device(settings, id))),
        Command::Devices {
            command: DevicesCommand::SetGroup {
                id, group, config, ..
            },
        } => with_settings(&config, |settings| {
            run(registry_cli::set_group(settings, id, group))
        }),
        Command::Operators {
            command: OperatorsCommand::Add { name, config },
        } => with_settings(&config, |settings| run(add_operator(settings, name))),
        Command::Operators {
            command: OperatorsCommand::Revoke { name, config },
        } => with_settings(&config, |settings| run(revoke_operator(settings, name))),
        Command::Keys { command } => registry_cli::keys(command),
        Command::Models { command } => registry_cli::models(command),
        Command::Dataset { command } => dataset_cli(command),
        Command::Drift {
            command:
                DriftCommand::Alerts {
                    since_ms,
                    json,
                    config,
                },
        } => with_settings(&config, |settings| {
            run(drift_alerts(settings, since_ms, json))
        }),
        Command::Retrain {
            model,
            csv,
            dataset,
            train_config,
            version,
            group,
            no_register,
            enqueue,
            config,
        } => with_settings(&config, |s| {
            run(retrain_cli::retrain(
                s,
                retrain_cli::Request {
                    model,
                    csv,
                    dataset,
                    train_config,
                    version,
                    group,
                    register: !no_register,
                    enqueue,
                },
            ))
        }),
        Command::Runs { command } => retrain_cli::runs(command),
        Command::Jobs {
            command: JobsCommand::Show { id, config },
        } => with_settings(&config, |s| run(retrain_cli::show_job(s, id))),
    }
}

/// `dataset` subcommands: each loads the config, then calls [`cloud_sync::dataset`].
fn dataset_cli(command: DatasetCommand) -> ExitCode {
    use cloud_sync::Datasets;
    use cloud_sync::dataset::Selection;

    async fn open(settings: &Settings) -> anyhow::Result<Datasets> {
        Datasets::open(&settings.datasets, &settings.storage)
            .await
            .with_context(|| format!("database {}", settings.storage))
    }

    match command {
        DatasetCommand::Snapshot {
            streams,
            devices,
            from_ms,
            to_ms,
            name,
            config,
        } => with_settings(&config, |s| {
            run(async move {
                let datasets = open(&s).await?;
                let store = open_store(&s).await?;
                let selection = Selection {
                    streams,
                    devices,
                    from_ms,
                    to_ms,
                };
                let done = datasets
                    .snapshot(&store, selection, name)
                    .await
                    .context("cannot snapshot");
                let closed = store.close().await.context("cannot close database");
                let done = done?;
                closed?;
                let m = &done.manifest;
                println!("{}", m.id);
                let what = if done.created {
                    "stored"
                } else {
                    "already registered (identical content); nothing written"
                };
                eprintln!(
                    "cloud-sync: dataset {} {what}: {} readings, {} predictions, {} bytes",
                    m.id,
                    m.readings(),
                    m.predictions(),
                    m.bytes()
                );
                Ok(())
            })
        }),
        DatasetCommand::List { config } => with_settings(&config, |s| {
            run(async move {
                println!("id\tname\tcreated_ms\treadings\tpredictions\tbytes");
                for m in open(&s).await?.list().await? {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        m.id,
                        m.name.as_deref().unwrap_or("-"),
                        m.created_ms,
                        m.readings(),
                        m.predictions(),
                        m.bytes()
                    );
                }
                Ok(())
            })
        }),
        DatasetCommand::Show { id, config } => with_settings(&config, |s| {
            run(async move {
                let manifest = open(&s)
                    .await?
                    .manifest(&id)
                    .await
                    .with_context(|| format!("cannot show dataset {id}"))?;
                println!("{}", serde_json::to_string_pretty(&manifest)?);
                Ok(())
            })
        }),
        DatasetCommand::Verify { id, config } => with_settings(&config, |s| {
            run(async move {
                let snapshot = open(&s)
                    .await?
                    .read(&id)
                    .await
                    .with_context(|| format!("cannot verify dataset {id}"))?;
                println!(
                    "{id}: ok: {} readings, {} predictions",
                    snapshot.readings.len(),
                    snapshot.predictions.len()
                );
                Ok(())
            })
        }),
    }
}

/// `retrain`, `runs` and `jobs` subcommands over [`cloud_sync::retrain`].
mod retrain_cli {
    use std::path::PathBuf;

    use anyhow::Context as _;
    use cloud_sync::Settings;
    use cloud_sync::registry::Registry;
    use cloud_sync::retrain::{
        JobSpec, Retrainer, RunStatus, compare, read_train_config, runs_table,
    };

    use super::{RunsCommand, run, with_settings};

    /// What `cloud-sync retrain` was asked.
    pub(super) struct Request {
        pub model: String,
        pub csv: Option<PathBuf>,
        pub dataset: Option<String>,
        pub train_config: Option<PathBuf>,
        pub version: Option<String>,
        pub group: String,
        pub register: bool,
        pub enqueue: bool,
    }

    async fn open(settings: &Settings) -> anyhow::Result<Retrainer> {
        let registry = Registry::open(&settings.registry, &settings.storage)
            .await
            .with_context(|| format!("database {}", settings.storage))?;
        Retrainer::open(settings, registry)
            .await
            .with_context(|| format!("database {}", settings.storage))
    }

    pub(super) async fn retrain(settings: Settings, request: Request) -> anyhow::Result<()> {
        let mut train = request
            .train_config
            .as_deref()
            .map(read_train_config)
            .transpose()?
            .unwrap_or_default();
        if let Some(version) = request.version {
            train.insert("version".to_owned(), serde_json::Value::String(version));
        }
        let spec = JobSpec {
            model: request.model,
            csv: request.csv,
            dataset: request.dataset,
            train: Some(train),
            group: request.group,
            register: request.register,
        };
        let retrainer = open(&settings).await?;
        if request.enqueue {
            let job = retrainer.enqueue(spec).await?;
            println!("{}", job.id);
            eprintln!(
                "cloud-sync: retrain job {} queued for {}",
                job.id, job.spec.model
            );
            return Ok(());
        }
        let run = retrainer.execute(&spec, None).await?;
        println!("{}", run.id);
        match run.status {
            RunStatus::Succeeded => {
                eprintln!(
                    "cloud-sync: run {} succeeded: {} {} ({}) in {}; {}",
                    run.id,
                    run.model,
                    run.version.as_deref().unwrap_or("?"),
                    run.family,
                    run.package_dir.as_deref().unwrap_or("?"),
                    if run.registered {
                        "registered as staging"
                    } else {
                        "not registered"
                    }
                );
                for (key, value) in &run.metrics {
                    eprintln!("  {key:<24} {value}");
                }
                Ok(())
            }
            _ => anyhow::bail!(
                "run {} failed: {}",
                run.id,
                run.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }

    pub(super) fn runs(command: RunsCommand) -> std::process::ExitCode {
        match command {
            RunsCommand::List {
                model,
                limit,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    let runs = open(&s).await?.runs(model.as_deref(), limit).await?;
                    print!("{}", runs_table(&runs));
                    Ok(())
                })
            }),
            RunsCommand::Show { id, config } => with_settings(&config, |s| {
                run(async move {
                    let run = open(&s)
                        .await?
                        .run(&id)
                        .await?
                        .with_context(|| format!("no training run {id:?}"))?;
                    println!("{}", serde_json::to_string_pretty(&run)?);
                    Ok(())
                })
            }),
            RunsCommand::Compare { a, b, config } => with_settings(&config, |s| {
                run(async move {
                    let retrainer = open(&s).await?;
                    let ra = retrainer
                        .run(&a)
                        .await?
                        .with_context(|| format!("no training run {a:?}"))?;
                    let rb = retrainer
                        .run(&b)
                        .await?
                        .with_context(|| format!("no training run {b:?}"))?;
                    print!("{}", compare(&ra, &rb));
                    Ok(())
                })
            }),
        }
    }

    pub(super) async fn show_job(settings: Settings, id: String) -> anyhow::Result<()> {
        let job = open(&settings)
            .await?
            .job(&id)
            .await?
            .with_context(|| format!("no retrain job {id:?}"))?;
        println!("{}", serde_json::to_string_pretty(&job)?);
        Ok(())
    }
}

/// Loads and validates `path`; on failure prints the problem (naming the key)
/// and returns exit code 78.
fn load_settings(path: &Path) -> Result<Settings, ExitCode> {
    Config::load(path)
        .and_then(|config| config.validate())
        .map_err(|err| {
            eprintln!(
                "cloud-sync: {}: {:#}",
                path.display(),
                anyhow::Error::from(err)
            );
            ExitCode::from(EXIT_CONFIG)
        })
}

fn with_settings(path: &Path, f: impl FnOnce(Settings) -> ExitCode) -> ExitCode {
    match load_settings(path) {
        Ok(settings) => f(settings),
        Err(code) => code,
    }
}

/// Initialises tracing, runs `job` on a multi-threaded runtime, maps errors to exit 1.
fn run(job: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_tracing();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start tokio runtime")
        .and_then(|runtime| runtime.block_on(job));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cloud-sync: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown_signal().context("cannot install signal handlers")?;
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        match signals.await {
            Ok(name) => tracing::info!(signal = name, "shutting down"),
            Err(err) => tracing::error!(error = %err, "signal handler failed; shutting down"),
        }
        on_signal.cancel();
    });
    cloud_sync::serve(settings, shutdown).await?;
    Ok(())
}

/// Installs SIGINT and SIGTERM handlers now; the returned future resolves with
/// the name of the first signal received.
fn shutdown_signal()
-> std::io::Result<impl Future<Output = std::io::Result<&'static str>> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => Ok("SIGINT"),
                _ = terminate.recv() => Ok("SIGTERM"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            tokio::signal::ctrl_c().await?;
            Ok("ctrl-c")
        })
    }
}

async fn drift_alerts(settings: Settings, since_ms: i64, json: bool) -> anyhow::Result<()> {
    let drift = cloud_sync::drift::Drift::open(&settings.storage, settings.drift.clone())
        .await
        .with_context(|| format!("database {}", settings.storage))?;
    let alerts = drift
        .alerts(since_ms)
        .await
        .context("cannot list drift alerts")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&alerts)?);
    } else {
        print!("{}", cloud_sync::drift::alerts_table(&alerts));
    }
    Ok(())
}

async fn add_device(settings: Settings, id: String) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let added = store
        .add_device(&id)
        .await
        .with_context(|| format!("cannot add device {id:?}"));
    let closed = store.close().await.context("cannot close database");
    let token = added?;
    // The device is registered once `added` is Ok: print its token even if closing fails.
    println!("{token}");
    eprintln!("cloud-sync: device {id:?} added; the token above is shown only once");
    closed?;
    Ok(())
}

async fn revoke_device(settings: Settings, id: String) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let revoked = store
        .revoke_device(&id)
        .await
        .with_context(|| format!("cannot revoke device {id:?}"));
    let closed = store.close().await.context("cannot close database");
    revoked?;
    closed?;
    eprintln!("cloud-sync: device {id:?} revoked");
    Ok(())
}

async fn add_operator(settings: Settings, name: String) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let added = store
        .add_operator(&name)
        .await
        .with_context(|| format!("cannot add operator {name:?}"));
    let closed = store.close().await.context("cannot close database");
    let token = added?;
    println!("{token}");
    eprintln!("cloud-sync: operator {name:?} added; the token above is shown only once");
    closed?;
    Ok(())
}

async fn revoke_operator(settings: Settings, name: String) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let revoked = store
        .revoke_operator(&name)
        .await
        .with_context(|| format!("cannot revoke operator {name:?}"));
    let closed = store.close().await.context("cannot close database");
    revoked?;
    closed?;
    eprintln!("cloud-sync: operator {name:?} revoked");
    Ok(())
}

/// `keys` and `models` subcommands: each loads the config, then calls
/// [`cloud_sync::registry`].
mod registry_cli {
    use anyhow::Context as _;
    use cloud_sync::Settings;
    use cloud_sync::registry::rollout::overview_text;
    use cloud_sync::registry::{PushOptions, Registry, Signer, keys, table};
    use cloud_sync::sync_protocol::registry::RolloutState;

    use super::{KeysCommand, ModelsCommand, open_store, run, with_settings};

    /// `devices set-group`: the device must be registered and not revoked.
    pub(super) async fn set_group(
        settings: Settings,
        id: String,
        group: Option<String>,
    ) -> anyhow::Result<()> {
        let store = open_store(&settings).await?;
        let active = store
            .device_is_active(&id)
            .await
            .with_context(|| format!("cannot look up device {id:?}"));
        let closed = store.close().await.context("cannot close database");
        if !active? {
            anyhow::bail!("cannot set the group of device {id:?}: unknown or revoked device");
        }
        closed?;
        let previous = open(&settings)
            .await?
            .set_device_group(&id, group.as_deref())
            .await
            .with_context(|| format!("cannot set the group of device {id:?}"))?;
        let was = previous
            .map(|g| format!(" (was {g:?})"))
            .unwrap_or_default();
        match group {
            Some(group) => eprintln!("cloud-sync: device {id:?} assigned to group {group:?}{was}"),
            None => eprintln!(
                "cloud-sync: device {id:?} has no assigned group{was}; the group it names applies"
            ),
        }
        Ok(())
    }

    pub(super) fn keys(command: KeysCommand) -> std::process::ExitCode {
        match command {
            KeysCommand::Generate { config } => with_settings(&config, |s| {
                run(async move {
                    let entry = keys::generate(&s.registry)?;
                    eprintln!("cloud-sync: signing key {} generated", entry.id);
                    Ok::<(), anyhow::Error>(())
                })
            }),
            KeysCommand::Rotate { config } => with_settings(&config, |s| {
                run(async move {
                    let entry = keys::rotate(&s.registry)?;
                    eprintln!(
                        "cloud-sync: signing key rotated; new key {} (old keys stay listed in {})",
                        entry.id,
                        s.registry.public_keys_file.display()
                    );
                    Ok::<(), anyhow::Error>(())
                })
            }),
            KeysCommand::ShowPublic { config } => with_settings(&config, |s| {
                run(async move {
                    print!(
                        "{}",
                        keys::agent_config_snippet(&keys::public_keys(&s.registry)?)
                    );
                    Ok::<(), anyhow::Error>(())
                })
            }),
        }
    }

    async fn open(settings: &Settings) -> anyhow::Result<Registry> {
        Registry::open(&settings.registry, &settings.storage)
            .await
            .with_context(|| format!("database {}", settings.storage))
    }

    pub(super) fn models(command: ModelsCommand) -> std::process::ExitCode {
        match command {
            ModelsCommand::Push {
                dir,
                group,
                training_run,
                dataset,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    let signer = Signer::load(&s.registry)?;
                    let registry = open(&s).await?;
                    let options = PushOptions {
                        group,
                        training_run,
                        dataset,
                    };
                    let pushed = registry
                        .push(&dir, &signer, options)
                        .await
                        .with_context(|| format!("cannot push {}", dir.display()))?;
                    let v = &pushed.version;
                    let what = if pushed.created {
                        "registered as staging"
                    } else {
                        "already registered (identical content)"
                    };
                    println!("{}", v.sha256);
                    eprintln!(
                        "cloud-sync: {} {} for group {:?} {what}; {} golden pairs passed; signed by key {}",
                        v.name, v.version, v.group, pushed.golden, v.key_id
                    );
                    Ok::<(), anyhow::Error>(())
                })
            }),
            ModelsCommand::List { name, config } => with_settings(&config, |s| {
                run(async move {
                    let versions = open(&s).await?.list(name.as_deref()).await?;
                    print!("{}", table(&versions));
                    Ok::<(), anyhow::Error>(())
                })
            }),
            ModelsCommand::Promote {
                name,
                version,
                group,
                percent,
                halt_share,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    let promotion = open(&s)
                        .await?
                        .promote_staged(&name, &version, &group, percent, halt_share)
                        .await
                        .with_context(|| format!("cannot promote {name} {version}"))?;
                    if let Some(r) = promotion.rollout {
                        eprintln!(
                            "cloud-sync: staged rollout of {name} {version} to {}% of group {group:?} \
                             started; the others keep {}; halts above {} rolled back",
                            r.percent,
                            r.previous.as_deref().unwrap_or("none"),
                            r.halt_share
                        );
                        return Ok(());
                    }
                    let archived = promotion
                        .archived
                        .map(|v| format!("; {v} archived"))
                        .unwrap_or_default();
                    eprintln!(
                        "cloud-sync: {name} {version} is production for group {group:?}{archived}"
                    );
                    Ok::<(), anyhow::Error>(())
                })
            }),
            ModelsCommand::Rollout {
                name,
                group,
                percent,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    let (r, archived) = open(&s)
                        .await?
                        .rollout(&name, &group, percent)
                        .await
                        .with_context(|| format!("cannot change the rollout of {name}"))?;
                    if r.state == RolloutState::Complete {
                        let archived = archived
                            .map(|v| format!("; {v} archived"))
                            .unwrap_or_default();
                        eprintln!(
                            "cloud-sync: rollout complete: {name} {} is production for group {group:?}{archived}",
                            r.version
                        );
                    } else {
                        eprintln!(
                            "cloud-sync: rollout of {name} {} now at {}% of group {group:?}",
                            r.version, r.percent
                        );
                    }
                    Ok::<(), anyhow::Error>(())
                })
            }),
            ModelsCommand::Rollback {
                name,
                group,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    let done = open(&s)
                        .await?
                        .rollback(&name, &group)
                        .await
                        .with_context(|| format!("cannot roll back {name}"))?;
                    let r = &done.rollout;
                    let previous = r.previous.as_deref().unwrap_or("none");
                    if !done.changed {
                        eprintln!(
                            "cloud-sync: {name} {} already rolled back in group {group:?}; {previous} serves",
                            r.version
                        );
                    } else if done.restored {
                        eprintln!(
                            "cloud-sync: {name} {previous} is production again for group {group:?} \
                             ({} archived); devices are told to downgrade",
                            r.version
                        );
                    } else {
                        eprintln!(
                            "cloud-sync: rollout of {name} {} halted in group {group:?}; \
                             every device goes back to {previous}",
                            r.version
                        );
                    }
                    Ok::<(), anyhow::Error>(())
                })
            }),
            ModelsCommand::Shadow {
                name,
                version,
                group,
                percent,
                clear,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    let target = if clear {
                        None
                    } else {
                        version.as_deref().map(|v| (v, percent))
                    };
                    open(&s)
                        .await?
                        .set_shadow(&name, &group, target)
                        .await
                        .with_context(|| format!("cannot set the shadow of {name}"))?;
                    match target {
                        Some((v, p)) => eprintln!(
                            "cloud-sync: {name} {v} runs in shadow on {p}% of group {group:?}"
                        ),
                        None => eprintln!("cloud-sync: no shadow for {name} in group {group:?}"),
                    }
                    Ok::<(), anyhow::Error>(())
                })
            }),
            ModelsCommand::Status {
                name,
                group,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    let overview = open(&s)
                        .await?
                        .overview(&name, &group)
                        .await
                        .with_context(|| format!("cannot read the rollout of {name}"))?;
                    print!("{}", overview_text(&overview));
                    Ok::<(), anyhow::Error>(())
                })
            }),
            ModelsCommand::Archive {
                name,
                version,
                group,
                config,
            } => with_settings(&config, |s| {
                run(async move {
                    open(&s)
                        .await?
                        .archive(&name, &version, &group)
                        .await
                        .with_context(|| format!("cannot archive {name} {version}"))?;
                    eprintln!("cloud-sync: {name} {version} archived for group {group:?}");
                    Ok::<(), anyhow::Error>(())
                })
            }),
        }
    }
}

async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    Store::connect(&settings.storage)
        .await
        .with_context(|| format!("database {}", settings.storage))
}
