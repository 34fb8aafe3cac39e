//! Latency benchmark: every fixture model, tract (through edge-onnx-ml)
//! against onnxruntime on the same inputs, same machine, same run.
//!
//! ```sh
//! cargo bench -p edge-onnx-ml --bench latency            # all fixtures
//! cargo bench -p edge-onnx-ml --bench latency -- rf_     # names containing rf_
//! ```
//!
//! For each model and batch size (1 row, then the fixture's 64 rows) it
//! prints p50 and p99 latency per call, per row, and rows/s, first for
//! tract, then for onnxruntime as measured by `models/fixtures/bench_ort.py`
//! (run when `python3` with onnxruntime is available; its default session
//! uses every core, `ort 1t` pins it to one thread like tract). Figures are
//! printed, never asserted.

#[path = "../tests/it/util.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]
mod util;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use tract_onnx::tract_hir::internal::*;
use util::{Json, fixtures_dir, read};

/// Time spent measuring each (model, batch) case.
const BUDGET: Duration = Duration::from_millis(400);

struct Stats {
    p50_us: f64,
    p99_us: f64,
    rows_per_s: f64,
}

fn measure(batch: usize, mut call: impl FnMut()) -> Stats {
    for _ in 0..20 {
        call();
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < BUDGET || samples.len() < 50 {
        let t = Instant::now();
        call();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    Stats {
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        rows_per_s: batch as f64 / mean * 1e6,
    }
}

/// Rows in an input: its first axis, or 1 for a rank-1 input (one row).
fn batch_of(j: &Json) -> usize {
    if j.shape.len() > 1 { j.shape[0] } else { 1 }
}

fn tract_stats(name: &str, first_row_only: bool) -> TractResult<Stats> {
    let fx = read(name);
    let inputs: BTreeMap<String, Json> = if first_row_only {
        fx.inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.first_row()))
            .collect()
    } else {
        fx.inputs.clone()
    };
    let batch = inputs.values().next().map_or(1, batch_of);
    let mut model = edge_onnx_ml::onnx_with_ml().model_for_path(fixtures_dir().join(&fx.model))?;
    let outlets = model.input_outlets()?.to_vec();
    let mut values = TVec::new();
    for (ix, o) in outlets.iter().enumerate() {
        let t = inputs[&model.node(o.node).name].to_tensor();
        model.set_input_fact(ix, t.datum_type().fact(t.shape()).into())?;
        values.push(t.into_tvalue());
    }
    let plan = model.into_optimized()?.into_runnable()?;
    let mut failed = None;
    let stats = measure(batch, || {
        if let Err(e) = plan.run(values.clone()) {
            failed.get_or_insert(e);
        }
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

/// onnxruntime figures keyed by (model, batch, threads).
fn ort_stats(names: &[String]) -> Option<BTreeMap<(String, usize, String), Stats>> {
    let script = fixtures_dir().join("bench_ort.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("{}", BUDGET.as_secs_f64()))
        .args(names)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "onnxruntime benchmark unavailable: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    let mut map = BTreeMap::new();
    for r in rows {
        let key = (
            r["model"].as_str()?.to_owned(),
            usize::try_from(r["batch"].as_u64()?).ok()?,
            r["threads"].as_str()?.to_owned(),
        );
        map.insert(
            key,
            Stats {
                p50_us: r["p50_us"].as_f64()?,
                p99_us: r["p99_us"].as_f64()?,
                rows_per_s: r["rows_per_s"].as_f64()?,
            },
        );
    }
    Some(map)
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter_map(|f| f.strip_suffix(".json").map(str::to_owned))
                .filter(|n| filter.is_empty() || filter.iter().any(|f| n.contains(f)))
                .collect()
        })
        .unwrap_or_default();
    names.sort();

    let mut tract = BTreeMap::new();
    for name in &names {
        let batch = read(name).inputs.values().next().map_or(1, batch_of);
        // A rank-1 input is a single row already.
        let runs: &[bool] = if batch == 1 { &[false] } else { &[true, false] };
        for &first_row_only in runs {
            match tract_stats(name, first_row_only) {
                Ok(s) => {
                    tract.insert((name.clone(), if first_row_only { 1 } else { batch }), s);
                }
                Err(e) => eprintln!("{name}: tract failed: {e:#}"),
            }
        }
    }
    let ort = ort_stats(&names);

    println!(
        "{:<34} {:>5} | {:>9} {:>9} {:>9} {:>10} | {:>9} {:>9} {:>10} {:>6} | {:>9} {:>6}",
        "model",
        "batch",
        "tract p50",
        "p99",
        "p50/row",
        "rows/s",
        "ort p50",
        "p99",
        "rows/s",
        "ratio",
        "ort1t p50",
        "ratio"
    );
    for ((name, batch), s) in &tract {
        let o = ort
            .as_ref()
            .and_then(|m| m.get(&(name.clone(), *batch, "default".into())));
        let o1 = ort
            .as_ref()
            .and_then(|m| m.get(&(name.clone(), *batch, "1".into())));
        let (op50, op99, orps, ratio) =
            o.map_or(("-".into(), "-".into(), "-".into(), "-".into()), |o| {
                (
                    format!("{:.1}", o.p50_us),
                    format!("{:.1}", o.p99_us),
                    format!("{:.0}", o.rows_per_s),
                    format!("{:.2}", s.p50_us / o.p50_us),
                )
            });
        let (o1p50, ratio1) = o1.map_or(("-".into(), "-".into()), |o| {
            (
                format!("{:.1}", o.p50_us),
                format!("{:.2}", s.p50_us / o.p50_us),
            )
        });
        println!(
            "{:<34} {:>5} | {:>9.1} {:>9.1} {:>9.2} {:>10.0} | {:>9} {:>9} {:>10} {:>6} | {:>9} {:>6}",
            name,
            batch,
            s.p50_us,
            s.p99_us,
            s.p50_us / *batch as f64,
            s.rows_per_s,
            op50,
            op99,
            orps,
            ratio,
            o1p50,
            ratio1
        );
    }
    println!("latencies in microseconds per call; ratio = tract p50 / onnxruntime p50");
}
