//! `drain-bench`: how fast the agent drains a buffered backlog into a real
//! cloud-sync (SQLite, in process), and how many bytes a reading costs on
//! the wire compared with its MQTT JSON payload.
//!
//! Fills an agent buffer with a backlog of the standard workload (100
//! devices, readings `{ts,id,a,b,c}` as `ingest-bench` publishes them),
//! starts cloud-sync and a counting proxy (no faults) in front of it, runs
//! the agent's sync stage until the backlog is gone, and prints rows/s and
//! bytes per reading (request bodies, and whole requests with their HTTP
//! heads) per body format. The baseline measured in the same run is the
//! rate at which the buffer took the backlog in (`Buffer::append` in chunks
//! of 5000, the agent's storage path without MQTT, which `ingest-bench`
//! found to be the bottleneck of ingest): drain / fill is printed, and so
//! is drain / `--ingest-rate` (a recorded figure, not of this run). Not a
//! test: it asserts no target.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use e2e::proxy::{Faults, Proxy, Stats};
use edge_agent::buffer::{Buffer, Item, NewReading};
use edge_agent::config::{BufferSettings, Secret, SyncSettings};
use edge_agent::sync::SyncStage;
use edge_agent::telemetry::Counters;
use tokio_util::sync::CancellationToken;

/// Command line of `drain-bench`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "drain-bench",
    about = "Backlog drain rate and bytes per reading on the wire"
)]
struct Args {
    /// Readings in the backlog.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Simulated sensor devices (sources).
    #[arg(long, default_value_t = 100)]
    devices: u64,
    /// `sync.batch_max_rows`.
    #[arg(long, default_value_t = 1000)]
    batch_max_rows: usize,
    /// `sync.batch_max_bytes`.
    #[arg(long, default_value_t = 1 << 20)]
    batch_max_bytes: usize,
    /// `sync.backlog_rows_per_sec` (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    backlog_rows_per_sec: u64,
    /// Body formats to measure, in order: `compact` (layout v2), `compact-v1`, `json`.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["compact".to_owned(), "compact-v1".to_owned(), "json".to_owned()])]
    formats: Vec<String>,
    /// The agent's ingest rate to compare with, msg/s (docs/benchmarks.md:
    /// ingest-bench, QoS 1, quiet machine).
    #[arg(long, default_value_t = 61_881.0)]
    ingest_rate: f64,
    /// The standard workload's publish rate, msg/s (100 devices, one message
    /// per ms in all): the rate new data arrives while a backlog drains.
    #[arg(long, default_value_t = 1000.0)]
    workload_rate: f64,
}

/// The workload payload of `ingest-bench` for message `n` of `device`.
fn payload(ts_ms: i64, n: u64) -> String {
    let a = (n % 1000) as f64 / 10.0;
    let b = 20.0 + (n % 37) as f64 / 4.0;
    let c = 1000.0 - (n % 101) as f64;
    format!(r#"{{"ts":{ts_ms},"id":{n},"a":{a:.2},"b":{b:.2},"c":{c:.2}}}"#)
}

struct Run {
    format: String,
    rows: u64,
    fill_secs: f64,
    drain_secs: f64,
    payload_bytes: u64,
    body_bytes: u64,
    request_bytes: u64,
    requests: u64,
}

async fn run(args: &Args, format: &str) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let cloud = cloud_sync::start(
        cloud_sync::Settings::for_database(dir.path().join("cloud.db")),
        stop.clone(),
    )
    .await?;
    let token = cloud.store().add_device("bench").await?;
    let proxy = Proxy::start(cloud.addr, Faults::default(), 1).await?;

    let (buffer, thread) = Buffer::open(&BufferSettings::for_path(dir.path().join("buffer.db")))?;
    let filled = Instant::now();
    let mut payload_bytes = 0u64;
    let start_ms = edge_agent::now_ms() - 3_600_000;
    let chunk = 5000u64;
    let mut n = 0u64;
    while n < args.rows {
        let mut items = Vec::with_capacity(chunk as usize);
        for _ in 0..chunk.min(args.rows - n) {
            let ts = start_ms + (n / args.devices) as i64 * 10;
            let p = payload(ts, n);
            payload_bytes += p.len() as u64;
            let a = (n % 1000) as f64 / 10.0;
            let b = 20.0 + (n % 37) as f64 / 4.0;
            let c = 1000.0 - (n % 101) as f64;
            items.push(Item::Reading(NewReading {
                source: format!("dev-{:03}", n % args.devices),
                stream: "s".into(),
                ident: Some(n.to_string()),
                device_ts_ms: Some(ts),
                recv_ts_ms: ts,
                clock_ok: true,
                values: BTreeMap::from([("a".into(), a), ("b".into(), b), ("c".into(), c)]),
            }));
            n += 1;
        }
        buffer.append(items).await?;
    }
    let fill_secs = filled.elapsed().as_secs_f64();

    let settings = SyncSettings {
        url: format!("http://{}", proxy.addr),
        token: Secret::new(token),
        batch_max_rows: args.batch_max_rows,
        interval: Duration::from_millis(100),
        request_timeout: Duration::from_secs(30),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_secs(2),
        batch_max_bytes: args.batch_max_bytes,
        batch_max_delay: Duration::from_millis(100),
        backlog_rows_per_sec: (args.backlog_rows_per_sec > 0).then_some(args.backlog_rows_per_sec),
        heartbeat_interval: None,
        tls: None,
    };
    let counters = Arc::new(Counters::default());
    let mut stage = SyncStage::new(settings, "bench".into(), buffer.clone(), counters.clone());
    match format {
        "compact" => {}
        "compact-v1" => stage = stage.with_compact_v1_bodies(),
        "json" => stage = stage.with_json_bodies(),
        other => anyhow::bail!("unknown format {other}"),
    }
    let sync_stop = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(stage.run(sync_stop.clone()));
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if Counters::get(&counters.synced_readings) >= args.rows {
            break;
        }
        if task.is_finished() {
            anyhow::bail!("sync stopped early");
        }
    }
    let drain_secs = started.elapsed().as_secs_f64();
    sync_stop.cancel();
    task.await??;
    let left = buffer.sync_stats(0).await?.readings_unsynced;
    anyhow::ensure!(left == 0, "{left} rows left unsynced");
    let summary = cloud.store().summary("bench").await?;
    let in_cloud: u64 = summary.readings.iter().map(|s| s.rows).sum();
    anyhow::ensure!(in_cloud == args.rows, "cloud holds {in_cloud} rows");
    drop(buffer);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    let st = proxy.stats();
    let run = Run {
        format: format.to_owned(),
        rows: args.rows,
        fill_secs,
        drain_secs,
        payload_bytes,
        body_bytes: Stats::get(&st.body_bytes),
        request_bytes: Stats::get(&st.request_bytes),
        requests: Stats::get(&st.forwarded),
    };
    drop(proxy);
    let store = cloud.store().clone();
    stop.cancel();
    cloud.join().await?;
    store.close().await?;
    Ok(run)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drain-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "drain-bench: {} readings from {} devices, batch_max_rows {}, batch_max_bytes {}, backlog_rows_per_sec {}",
        args.rows,
        args.devices,
        args.batch_max_rows,
        args.batch_max_bytes,
        args.backlog_rows_per_sec
    );
    println!(
        "{:<10} {:>8} {:>10} {:>8} {:>9} {:>10} {:>10} {:>11} {:>11} {:>9}",
        "format",
        "drain s",
        "rows/s",
        "x fill",
        "x ingest",
        "x workload",
        "payload B",
        "body B/row",
        "wire B/row",
        "requests"
    );
    let mut failed = false;
    for format in &args.formats {
        match rt.block_on(run(&args, format)) {
            Ok(r) => {
                let rate = r.rows as f64 / r.drain_secs;
                let fill = r.rows as f64 / r.fill_secs;
                println!(
                    "{:<10} {:>8.2} {:>10.0} {:>8.2} {:>9.2} {:>10.1} {:>10.1} {:>11.2} {:>11.2} {:>9}",
                    r.format,
                    r.drain_secs,
                    rate,
                    rate / fill,
                    rate / args.ingest_rate,
                    rate / args.workload_rate,
                    r.payload_bytes as f64 / r.rows as f64,
                    r.body_bytes as f64 / r.rows as f64,
                    r.request_bytes as f64 / r.rows as f64,
                    r.requests
                );
                println!(
                    "           (baseline: buffer filled at {fill:.0} rows/s in this run; body = zstd request body, wire = body + HTTP head)"
                );
            }
            Err(e) => {
                eprintln!("drain-bench: {format}: {e:#}");
                failed = true;
            }
        }
    }
    println!(
        "target: drain >= 5x the standard workload's ingest rate (x workload = drain / {:.0} msg/s, --workload-rate); stricter: x fill = drain / this run's buffer fill rate, x ingest = drain / {:.0} msg/s (--ingest-rate, the agent's ingest ceiling recorded by ingest-bench)",
        args.workload_rate, args.ingest_rate
    );
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
