//! `sync-bench`: endpoint ingest rows/s of cloud-sync on SQLite and, when
//! `EDGE_TEST_POSTGRES` names a database, on PostgreSQL.
//!
//! Per backend, on a fresh database each time, two phases with the same
//! devices, batches and concurrency:
//! - **baseline**: the batches stored directly through the store API
//!   (`Store::store_batch`, no HTTP, no decoding);
//! - **HTTP**: cloud-sync started in process on port 0, each device a client
//!   task uploading its batches as an agent does (compact codec v2, zstd,
//!   bearer token), one request at a time.
//!
//! Bodies are encoded before the clock starts, so the figures are the
//! endpoint's: HTTP, authentication, decompression, decoding, validation and
//! the database transaction. Every acknowledgement is checked, and so is the
//! row count stored at the end. Prints rows/s of both phases and their
//! ratio. Not a test: it asserts no target.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use cloud_sync::sync_protocol::{self, Reading, UploadAck, UploadBatch, codec};
use cloud_sync::{PostgresSettings, Settings, StorageSettings, Store};
use tokio_util::sync::CancellationToken;

/// Names the PostgreSQL database to benchmark (a `postgres://` URL).
const POSTGRES_ENV: &str = "EDGE_TEST_POSTGRES";

/// Command line of `sync-bench`.
#[derive(Parser, Debug, Clone)]
#[command(name = "sync-bench", about = "cloud-sync endpoint ingest rows/s")]
struct Args {
    /// Concurrent client devices.
    #[arg(long, default_value_t = 8)]
    devices: u64,
    /// Batches each device uploads.
    #[arg(long, default_value_t = 25)]
    batches: u64,
    /// Readings per batch (`sync.batch_max_rows`, default 1000).
    #[arg(long, default_value_t = 1000)]
    batch_rows: u64,
    /// PostgreSQL connections of cloud-sync's pool (`database_max_connections`).
    #[arg(long, default_value_t = 8)]
    pg_connections: usize,
}

/// Batch `b` of `device`: standard-workload readings (`a`, `b`, `c`), one
/// stream, consecutive sequence numbers, 10 ms apart.
fn batch(args: &Args, b: u64) -> UploadBatch {
    let start_ms = 1_764_316_800_000i64;
    let readings = (0..args.batch_rows)
        .map(|i| {
            let n = b * args.batch_rows + i;
            let ts = start_ms + n as i64 * 10;
            Reading {
                source: "dev".into(),
                stream: "s".into(),
                seq: n + 1,
                device_ts_ms: Some(ts),
                recv_ts_ms: ts + 2,
                clock_ok: true,
                values: BTreeMap::from([
                    ("a".into(), (n % 1000) as f64 / 10.0),
                    ("b".into(), 20.0 + (n % 37) as f64 / 4.0),
                    ("c".into(), 1000.0 - (n % 101) as f64),
                ]),
            }
        })
        .collect();
    UploadBatch {
        readings,
        ..UploadBatch::default()
    }
}

fn device_id(d: u64) -> String {
    format!("bench-{d:03}")
}

/// A fresh database: a SQLite file in a temp dir, or a schema of its own in
/// the PostgreSQL database (dropped by [`Database::drop_schema`]).
enum Database {
    Sqlite(tempfile::TempDir),
    Postgres {
        base: Box<tokio_postgres::Config>,
        schema: String,
    },
}

impl Database {
    async fn create(postgres: Option<&tokio_postgres::Config>, tag: &str) -> Result<Database> {
        let Some(base) = postgres else {
            return Ok(Database::Sqlite(tempfile::tempdir()?));
        };
        let schema = format!(
            "sync_bench_{}_{}_{tag}",
            std::process::id(),
            edge_agent::now_ms()
        );
        connect(base)
            .await?
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await?;
        Ok(Database::Postgres {
            base: Box::new(base.clone()),
            schema,
        })
    }

    fn storage(&self, args: &Args) -> StorageSettings {
        match self {
            Database::Sqlite(dir) => StorageSettings::Sqlite {
                path: dir.path().join("cloud.db"),
            },
            Database::Postgres { base, schema } => {
                let mut config = (**base).clone();
                config.options(format!("-c search_path={schema}"));
                StorageSettings::Postgres(Box::new(PostgresSettings {
                    config,
                    max_connections: args.pg_connections,
                }))
            }
        }
    }

    fn settings(&self, args: &Args) -> Settings {
        let mut settings = match self {
            Database::Sqlite(dir) => Settings::for_database(dir.path().join("cloud.db")),
            Database::Postgres { .. } => Settings::for_database(std::env::temp_dir().join("x.db")),
        };
        settings.storage = self.storage(args);
        settings
    }

    async fn drop_schema(self) -> Result<()> {
        if let Database::Postgres { base, schema } = self {
            connect(&base)
                .await?
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .await?;
        }
        Ok(())
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("{POSTGRES_ENV}: cannot connect"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("sync-bench: postgresql connection: {e}");
        }
    });
    Ok(client)
}

/// Rows stored for every bench device.
async fn stored_rows(store: &Store, args: &Args) -> Result<u64> {
    let mut rows = 0;
    for d in 0..args.devices {
        let summary = store.summary(&device_id(d)).await?;
        rows += summary.readings.iter().map(|s| s.rows).sum::<u64>();
    }
    Ok(rows)
}

/// Stores every batch through the store API; returns rows/s.
async fn baseline(args: &Args, db: &Database, batches: &[UploadBatch]) -> Result<f64> {
    let store = Store::connect(&db.storage(args)).await?;
    for d in 0..args.devices {
        store.add_device(&device_id(d)).await?;
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..args.devices {
        let store = store.clone();
        let batches = batches.to_vec();
        tasks.spawn(async move {
            for batch in batches {
                store.store_batch(&device_id(d), batch).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let secs = started.elapsed().as_secs_f64();
    let rows = stored_rows(&store, args).await?;
    ensure!(rows == total_rows(args), "baseline stored {rows} rows");
    store.close().await?;
    Ok(rows as f64 / secs)
}

fn total_rows(args: &Args) -> u64 {
    args.devices * args.batches * args.batch_rows
}

/// Uploads every batch over HTTP from one task per device; returns rows/s
/// and the mean body size per reading.
async fn over_http(args: &Args, db: &Database, batches: &[UploadBatch]) -> Result<(f64, f64)> {
    let stop = CancellationToken::new();
    let server = cloud_sync::start(db.settings(args), stop.clone()).await?;
    let mut tokens = Vec::new();
    for d in 0..args.devices {
        tokens.push(server.store().add_device(&device_id(d)).await?);
    }
    let bodies: Vec<Vec<u8>> = batches
        .iter()
        .map(|b| zstd::bulk::compress(&codec::encode_batch(b), 3))
        .collect::<Result<_, _>>()?;
    let body_bytes: usize = bodies.iter().map(Vec::len).sum();
    edge_agent::install_crypto_provider();
    let client = reqwest::Client::builder().build()?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (d, token) in (0..args.devices).zip(tokens) {
        let url = format!(
            "http://{}{}",
            server.addr,
            sync_protocol::batch_path(&device_id(d))
        );
        let client = client.clone();
        let bodies = bodies.clone();
        let rows = args.batch_rows;
        tasks.spawn(async move {
            for body in bodies {
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header(reqwest::header::CONTENT_TYPE, codec::MEDIA_TYPE)
                    .header(
                        reqwest::header::CONTENT_ENCODING,
                        sync_protocol::ZSTD_ENCODING,
                    )
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                let text = response.text().await?;
                ensure!(status.is_success(), "upload answered {status}: {text}");
                let ack: UploadAck = serde_json::from_str(&text)?;
                ensure!(
                    ack.readings_inserted == rows,
                    "ack stored {} of {rows}",
                    ack.readings_inserted
                );
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let secs = started.elapsed().as_secs_f64();
    let rows = stored_rows(server.store(), args).await?;
    ensure!(rows == total_rows(args), "cloud-sync stored {rows} rows");
    let store = server.store().clone();
    stop.cancel();
    server.join().await?;
    store.close().await?;
    Ok((
        rows as f64 / secs,
        body_bytes as f64 / (args.batches * args.batch_rows) as f64,
    ))
}

async fn bench(args: &Args, name: &str, postgres: Option<&tokio_postgres::Config>) -> Result<()> {
    let batches: Vec<UploadBatch> = (0..args.batches).map(|b| batch(args, b)).collect();
    let db = Database::create(postgres, "direct").await?;
    let direct = baseline(args, &db, &batches).await;
    db.drop_schema().await?;
    let direct = direct?;
    let db = Database::create(postgres, "http").await?;
    let http = over_http(args, &db, &batches).await;
    db.drop_schema().await?;
    let (http, body_per_row) = http?;
    println!("{name}:");
    println!("  baseline, store API direct  {direct:>10.0} rows/s");
    println!("  HTTP (compact v2 + zstd, {body_per_row:.2} B/row)  {http:>10.0} rows/s");
    println!("  ratio HTTP / direct = {:.2}", http / direct);
    Ok(())
}

async fn run(args: &Args) -> Result<()> {
    println!(
        "sync-bench: {} devices x {} batches x {} readings = {} rows per phase",
        args.devices,
        args.batches,
        args.batch_rows,
        total_rows(args)
    );
    bench(args, "SQLite", None).await?;
    match std::env::var(POSTGRES_ENV) {
        Ok(url) => {
            let config: tokio_postgres::Config = url
                .parse()
                .with_context(|| format!("{POSTGRES_ENV} is not a PostgreSQL URL"))?;
            bench(
                args,
                &format!("PostgreSQL ({} connections)", args.pg_connections),
                Some(&config),
            )
            .await?;
        }
        Err(_) => println!("PostgreSQL: skipped ({POSTGRES_ENV} is unset)"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sync-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sync-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
