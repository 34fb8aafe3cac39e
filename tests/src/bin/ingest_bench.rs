//! `ingest-bench`: measures MQTT ingest throughput of a bare rumqttc
//! subscriber (the ceiling) and of the real `edge-agent` binary on the same
//! workload, at QoS 0 and QoS 1, and prints a table with the ratios, the
//! agent's peak RSS and its CPU seconds per million messages.
//!
//! Not a test: it asserts no target, it prints figures (misses included).
//! What each figure measures is documented in `docs/benchmarks.md`.
//! Modules: `broker` (own Mosquitto), `workload` (publishers, bare
//! subscriber), `agent` (the agent process and its buffer), `procfs`
//! (CPU and memory from /proc), `report` (the table).

// Design: a crate root resolves `mod x;` next to itself, so the modules of
// this binary, which live in `ingest_bench/`, are named by path.
#[path = "ingest_bench/agent.rs"]
mod agent;
#[path = "ingest_bench/broker.rs"]
mod broker;
#[path = "ingest_bench/procfs.rs"]
mod procfs;
#[path = "ingest_bench/report.rs"]
mod report;
#[path = "ingest_bench/run.rs"]
mod run;
#[path = "ingest_bench/workload.rs"]
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Command line of `ingest-bench`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ingest-bench",
    about = "Ingest benchmark: bare MQTT subscriber vs edge-agent, QoS 0 and 1"
)]
pub struct Args {
    /// Messages per phase (each QoS runs a bare phase and an agent phase).
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Simulated devices; topics are `bench-<run>/dev-NNN/s`.
    #[arg(long, default_value_t = 100)]
    pub devices: u32,
    /// Publishing MQTT clients (each owns a share of the devices).
    #[arg(long, default_value_t = 2)]
    pub publishers: u32,
    /// Total publish rate in messages/s; 0 publishes as fast as the broker accepts.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// QoS levels to measure, in order.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0u8, 1])]
    pub qos: Vec<u8>,
    /// Use this broker (host:port) instead of starting an own Mosquitto.
    #[arg(long)]
    pub broker: Option<String>,
    /// PID of the `--broker` process, to report its CPU use (optional).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Mosquitto binary for the own broker.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// The agent binary (build it with `cargo build --release -p edge-agent`);
    /// a relative path is tried in the current directory, then in the workspace.
    #[arg(long, default_value = "target/release/edge-agent")]
    pub agent_bin: PathBuf,
    /// Model package the agent loads (relative: as for `--agent-bin`).
    #[arg(long, default_value = "models/nab-machine-temp")]
    pub model: PathBuf,
    /// The agent's `mqtt.max_unacked`.
    #[arg(long, default_value_t = 1000)]
    pub max_unacked: u32,
    /// A phase ends (and reports lost messages) when nothing new arrives for this long.
    #[arg(long, default_value_t = 15)]
    pub idle_timeout_secs: u64,
    /// Hard bound on each phase.
    #[arg(long, default_value_t = 900)]
    pub phase_timeout_secs: u64,
    /// `RUST_LOG` of the agent; `info,edge_agent::buffer=debug` adds a
    /// summary of its group commits (one debug line per commit).
    #[arg(long, default_value = "info")]
    pub agent_log: String,
    /// Keep the agents' state directories (printed) instead of deleting them.
    #[arg(long)]
    pub keep_state: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ingest-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ingest-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
