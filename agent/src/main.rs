//! `edge-agent` binary: parses the command line, initialises telemetry,
//! loads and validates config, runs the library, maps the result to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use edge_agent::config::{DEFAULT_CONFIG, RawConfig};
use edge_agent::telemetry::{self, Counters};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Edge ML agent: durable MQTT ingest, local ONNX inference, cloud sync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent with a config file.
    Run {
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 when valid, 78 when not).
    CheckConfig {
        /// Path to the TOML config.
        file: PathBuf,
    },
    /// Print a commented example config.
    PrintDefaultConfig,
    /// Work with ONNX models directly, without a model package.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Maintain the buffer database.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Replay real NAB sensor data through an embedded broker, the agent and
    /// an in-process cloud, then print a report.
    #[cfg(feature = "demo")]
    Demo(edge_agent::demo::DemoArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Run MODEL.onnx on JSON input rows and print its outputs as JSON: an
    /// array with one entry per graph output, in graph order.
    Run {
        /// The ONNX file.
        model: PathBuf,
        /// JSON rows: an array for a one-input model, or an object mapping
        /// input names to arrays; `-` reads standard input.
        #[arg(long)]
        input: PathBuf,
    },
    /// Check a model package (sha256, load, input shape, golden pairs) and
    /// print its shapes and per-run latency; exit 0 only when it is fit to
    /// go live.
    Check {
        /// The package directory (model.toml + model.onnx).
        dir: PathBuf,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Move rows the cloud refused (quarantined) back to the upload queue;
    /// the agent uploads them again as backlog. Safe while the agent runs.
    RequeueQuarantine {
        /// Path to the TOML config (for `buffer.path`).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Model(ModelCommand::Check { dir, json }) => {
            let (report, fit) = edge_agent::inference::check::cli(&dir, json);
            println!("{}", report.trim_end());
            if fit {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Model(ModelCommand::Run { model, input }) => {
            match edge_onnx_ml::run::run_files(&model, &input) {
                Ok(outputs) => {
                    println!("{outputs}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "edge-agent: {}: {:#}",
                        model.display(),
                        anyhow::Error::from(e)
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Buffer(BufferCommand::RequeueQuarantine { config }) => {
            let settings = match RawConfig::load(&config).and_then(RawConfig::validate) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(edge_agent::EXIT_CONFIG);
                }
            };
            runtime_then(|| async move {
                let r = edge_agent::buffer::requeue_quarantine(&settings.buffer).await?;
                println!(
                    "re-queued {} readings, {} predictions, {} dead letters from {} quarantined batches",
                    r.readings, r.predictions, r.dead_letters, r.batches
                );
                Ok(())
            })
        }
        Command::CheckConfig { file } => match RawConfig::load(&file).and_then(RawConfig::validate)
        {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(edge_agent::EXIT_CONFIG)
            }
        },
        Command::Run { config } => {
            let settings = match RawConfig::load(&config).and_then(RawConfig::validate) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(edge_agent::EXIT_CONFIG);
                }
            };
            let output = telemetry::init_with(&settings.log);
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %config.display(),
                log = ?output,
                "edge-agent starting"
            );
            runtime_then(|| async move {
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    match edge_agent::shutdown_signal().await {
                        Ok(name) => tracing::info!(signal = name, "stopping"),
                        Err(e) => tracing::error!(error = %e, "cannot install signal handlers"),
                    }
                    signal.cancel();
                });
                edge_agent::supervisor::run(settings, Arc::new(Counters::default()), shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => runtime_then(|| async move {
            edge_agent::demo::run(args)
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }),
    }
}

fn runtime_then<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
