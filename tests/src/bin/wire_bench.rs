//! `wire-bench`: bytes on the wire per reading of upload batches, per body
//! format, against the raw JSON MQTT payloads the readings arrived as.
//!
//! Builds readings exactly as the agent stores them (the agent's own payload
//! decoder, per-source sequence numbers, receive times a few milliseconds
//! after the device time), cuts them into batches of `--batch-rows` in
//! arrival order as the sync stage does, and encodes every batch as JSON and
//! as compact layout versions 1 and 2, with and without zstd (level 3, as the
//! agent sends). Every compact batch is decoded again and compared bit for
//! bit. The baseline (raw payload bytes) comes from the same run. Not a
//! test: it asserts no target.
//!
//! Workloads: the standard workload of `ingest-bench` (100 devices, payload
//! `{ts,id,a,b,c}`, 1000 msg/s) and the NAB `machine_temperature_system_failure`
//! series embedded in the agent (22,695 points, `{"ts":s,"value":v}` as the
//! demo publishes them).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use cloud_sync::sync_protocol::{Reading, UploadBatch, codec};
use edge_agent::demo::nab;
use edge_agent::ingest::decode::decode_payload;

/// Command line of `wire-bench`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "wire-bench",
    about = "Bytes per reading on the wire per body format"
)]
struct Args {
    /// Readings per upload batch (`sync.batch_max_rows`, default 1000).
    #[arg(long, default_value_t = 1000)]
    batch_rows: usize,
    /// Messages of the standard workload.
    #[arg(long, default_value_t = 100_000)]
    standard_messages: u64,
    /// Devices of the standard workload.
    #[arg(long, default_value_t = 100)]
    devices: u64,
    /// zstd level (the agent uses 3).
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Also write every compact v2 batch (before zstd) into this directory,
    /// for looking at the bytes.
    #[arg(long)]
    dump_dir: Option<std::path::PathBuf>,
}

/// Deterministic jitter source (xorshift64).
struct Jitter(u64);

impl Jitter {
    /// 1-3 ms: the receive time behind the device time.
    fn lag_ms(&mut self) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        1 + (self.0 % 3) as i64
    }
}

/// A published message: its topic's device and stream, and its payload.
struct Message {
    source: String,
    stream: String,
    payload: String,
    recv_ts_ms: i64,
}

/// Readings as the agent stores them: decoded with the agent's decoder,
/// sequence numbers per `(source, stream)` in arrival order.
fn readings(messages: &[Message]) -> Result<Vec<Reading>> {
    let mut seqs: HashMap<(&str, &str), u64> = HashMap::new();
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let decoded = decode_payload(m.payload.as_bytes(), 1 << 20, m.recv_ts_ms)
            .with_context(|| format!("payload {}", m.payload))?;
        for d in decoded {
            let seq = seqs.entry((&m.source, &m.stream)).or_insert(0);
            *seq += 1;
            out.push(Reading {
                source: m.source.clone(),
                stream: m.stream.clone(),
                seq: *seq,
                device_ts_ms: d.device_ts_ms,
                recv_ts_ms: m.recv_ts_ms,
                clock_ok: true,
                values: d.values,
            });
        }
    }
    Ok(out)
}

/// The standard workload: message `n` at 1 ms intervals, round-robin over
/// the devices.
fn standard(args: &Args) -> Vec<Message> {
    let start_ms = 1_764_316_800_000i64;
    let mut jitter = Jitter(0x9e37_79b9_7f4a_7c15);
    (0..args.standard_messages)
        .map(|n| {
            let ts = start_ms + n as i64;
            Message {
                source: format!("dev-{:03}", n % args.devices),
                stream: "s".into(),
                payload: e2e_payload(n, ts),
                recv_ts_ms: ts + jitter.lag_ms(),
            }
        })
        .collect()
}

/// `ingest-bench`'s payload of message `n` (tests/src/bin/ingest_bench/workload.rs).
fn e2e_payload(n: u64, ts_ms: i64) -> String {
    let a = (n % 1000) as f64 / 10.0;
    let b = 20.0 + (n % 37) as f64 / 4.0;
    let c = 1000.0 - (n % 101) as f64;
    format!(r#"{{"ts":{ts_ms},"id":{n},"a":{a:.2},"b":{b:.2},"c":{c:.2}}}"#)
}

/// The NAB series as the demo publishes it; `jitter` adds 1-3 ms between
/// device and receive time, otherwise the agent receives at the device time.
fn nab_messages(jitter: bool) -> Result<Vec<Message>> {
    let mut lag = Jitter(0x2545_f491_4f6c_dd1d);
    Ok(nab::series()?
        .into_iter()
        .map(|p| Message {
            source: "machine-1".into(),
            stream: "temperature".into(),
            payload: format!("{{\"ts\":{},\"value\":{}}}", p.ts, p.value),
            recv_ts_ms: p.ts * 1000 + if jitter { lag.lag_ms() } else { 0 },
        })
        .collect())
}

/// Bytes of every batch in each form, summed.
#[derive(Default)]
struct Sizes {
    readings: u64,
    raw: u64,
    json: u64,
    json_zstd: u64,
    v1: u64,
    v1_zstd: u64,
    v2: u64,
    v2_zstd: u64,
    v2_encode_secs: f64,
    v2_decode_secs: f64,
}

/// Bit-exact comparison of two batches (`-0.0` differs from `0.0`, NaN
/// payloads count).
fn same_bits(a: &UploadBatch, b: &UploadBatch) -> bool {
    a.readings.len() == b.readings.len()
        && a.readings.iter().zip(&b.readings).all(|(x, y)| {
            x.source == y.source
                && x.stream == y.stream
                && x.seq == y.seq
                && x.device_ts_ms == y.device_ts_ms
                && x.recv_ts_ms == y.recv_ts_ms
                && x.clock_ok == y.clock_ok
                && x.values.len() == y.values.len()
                && x.values
                    .iter()
                    .zip(&y.values)
                    .all(|((kx, vx), (ky, vy))| kx == ky && vx.to_bits() == vy.to_bits())
        })
}

fn measure(args: &Args, name: &str, messages: &[Message]) -> Result<Sizes> {
    let readings = readings(messages)?;
    let mut s = Sizes {
        readings: readings.len() as u64,
        raw: messages.iter().map(|m| m.payload.len() as u64).sum(),
        ..Sizes::default()
    };
    let zstd = |bytes: &[u8]| -> Result<u64> {
        Ok(zstd::bulk::compress(bytes, args.zstd_level)?.len() as u64)
    };
    for (i, chunk) in readings.chunks(args.batch_rows.max(1)).enumerate() {
        let batch = UploadBatch {
            readings: chunk.to_vec(),
            ..UploadBatch::default()
        };
        let json = serde_json::to_vec(&batch)?;
        s.json += json.len() as u64;
        s.json_zstd += zstd(&json)?;
        let v1 = codec::encode_batch_v1(&batch);
        s.v1 += v1.len() as u64;
        s.v1_zstd += zstd(&v1)?;
        let started = Instant::now();
        let v2 = codec::encode_batch(&batch);
        s.v2_encode_secs += started.elapsed().as_secs_f64();
        s.v2 += v2.len() as u64;
        if let Some(dir) = &args.dump_dir {
            std::fs::write(dir.join(format!("{name}-{i:04}.edgb")), &v2)?;
        }
        s.v2_zstd += zstd(&v2)?;
        let started = Instant::now();
        let back = codec::decode_batch(&v2)?;
        s.v2_decode_secs += started.elapsed().as_secs_f64();
        ensure!(same_bits(&back, &batch), "v2 round trip differs");
        ensure!(
            same_bits(&codec::decode_batch(&v1)?, &batch),
            "v1 round trip differs"
        );
    }
    Ok(s)
}

fn report(name: &str, s: &Sizes) -> bool {
    let n = s.readings as f64;
    let per = |bytes: u64| bytes as f64 / n;
    let raw = per(s.raw);
    let cell = |bytes: u64| format!("{:.2} ({:.3}x)", per(bytes), per(bytes) / raw);
    println!("{name}: {} readings", s.readings);
    println!("  raw payload    {raw:>8.2} B/reading (baseline)");
    println!("  JSON batch     {}", cell(s.json));
    println!("  JSON + zstd    {}", cell(s.json_zstd));
    println!("  compact v1     {}", cell(s.v1));
    println!("  v1 + zstd      {}", cell(s.v1_zstd));
    println!("  compact v2     {}", cell(s.v2));
    println!("  v2 + zstd      {}", cell(s.v2_zstd));
    println!(
        "  v2 encode {:.0} ns/reading, decode {:.0} ns/reading",
        s.v2_encode_secs * 1e9 / n,
        s.v2_decode_secs * 1e9 / n
    );
    let ratio = per(s.v2_zstd) / raw;
    let met = ratio <= 0.1;
    println!(
        "  ratio v2+zstd / raw = {ratio:.3} (target <= 0.100: {})",
        if met { "met" } else { "missed" }
    );
    met
}

fn run(args: &Args) -> Result<()> {
    println!(
        "wire-bench: batches of {} readings, zstd level {}",
        args.batch_rows, args.zstd_level
    );
    report(
        &format!(
            "standard ({} devices, 1000 msg/s, receive 1-3 ms after ts)",
            args.devices
        ),
        &measure(args, "standard", &standard(args))?,
    );
    report(
        "NAB machine_temperature_system_failure (receive 1-3 ms after ts)",
        &measure(args, "nab-jitter", &nab_messages(true)?)?,
    );
    report(
        "NAB machine_temperature_system_failure (receive at ts)",
        &measure(args, "nab", &nab_messages(false)?)?,
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wire-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
