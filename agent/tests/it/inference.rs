//! Inference: `model check`, cross-device batching, several models, NaN
//! policies and safe hot swap, with the real binary as the verifier.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use edge_agent::buffer::{Buffer, BufferThread};
use edge_agent::config::BufferSettings;
use edge_agent::inference::check::{VerifyError, VerifySettings, find_prlimit, verify_in_child};
use edge_agent::inference::package::Package;
use edge_agent::inference::publish::PredictionEvent;
use edge_agent::inference::runtime::Runner;
use edge_agent::inference::shadow::ShadowUpdate;
use edge_agent::inference::swap::{self, Watcher};
use edge_agent::inference::trial::TrialSettings;
use edge_agent::inference::{InferenceMetrics, InferenceStage, LoadedModel};
use edge_agent::ingest::CommittedReading;
use edge_agent::telemetry::Counters;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::util;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

pub(super) fn shipped() -> PathBuf {
    models().join("nab-machine-temp")
}

fn machine_state() -> PathBuf {
    models().join("machine-state")
}

pub(super) fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    Counters::get(c)
}

/// Copies a package to `dir`, then applies `edit` to the manifest text and
/// `onnx` to the graph bytes, fixing the manifest's sha256.
pub(super) fn package_copy(
    from: &Path,
    dir: &Path,
    edit: impl Fn(String) -> String,
    onnx: impl Fn(Vec<u8>) -> Vec<u8>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let old = std::fs::read(from.join("model.onnx")).unwrap();
    let new = onnx(old.clone());
    let text = std::fs::read_to_string(from.join("model.toml")).unwrap();
    let text = edit(text).replace(
        &hex::encode(Sha256::digest(&old)),
        &hex::encode(Sha256::digest(&new)),
    );
    std::fs::write(dir.join("model.onnx"), new).unwrap();
    std::fs::write(dir.join("model.toml"), text).unwrap();
}

type Edit = fn(String) -> String;
type Bytes = fn(Vec<u8>) -> Vec<u8>;

fn same(t: String) -> String {
    t
}

pub(super) fn keep(b: Vec<u8>) -> Vec<u8> {
    b
}

fn truncate(mut b: Vec<u8>) -> Vec<u8> {
    b.truncate(b.len() / 2);
    b
}

fn corrupt(mut b: Vec<u8>) -> Vec<u8> {
    let mid = b.len() / 3;
    for x in &mut b[mid..mid + 64] {
        *x = 0xff;
    }
    b
}

/// Renames the graph's `ReduceSum` node type: a valid protobuf that tract
/// cannot build.
fn unknown_op(b: Vec<u8>) -> Vec<u8> {
    let needle = b"ReduceSum";
    let at = b.windows(needle.len()).position(|w| w == needle).unwrap();
    let mut b = b;
    b[at..at + needle.len()].copy_from_slice(b"ReduceSux");
    b
}

/// A manifest that feeds 6-value windows to a graph declaring 12.
fn window_6(t: String) -> String {
    let mut out = String::new();
    for line in t.lines() {
        if line.starts_with("window = ") {
            out.push_str("window = 6\n");
        } else if line.starts_with("hop = ") {
            out.push_str("hop = 3\n");
        } else if let Some(rest) = line.strip_prefix("input = [") {
            let vals: Vec<&str> = rest.trim_end_matches(']').split(", ").take(6).collect();
            out.push_str(&format!("input = [{}]\n", vals.join(", ")));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub(super) fn version(v: &'static str) -> impl Fn(String) -> String {
    move |t| t.replace("version = \"1.0.0\"", &format!("version = \"{v}\""))
}

fn check_cli(dir: &Path, json: bool) -> (Option<i32>, String) {
    let mut cmd = Command::new(util::bin());
    cmd.args(["model", "check"]).arg(dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn model_check_accepts_the_shipped_packages_and_prints_shapes_and_latency() {
    let (code, out) = check_cli(&shipped(), false);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("graph declares [?, 12], runs as [1, 12]"),
        "{out}"
    );
    assert!(out.contains("[1, 1] per batch-1 run"), "{out}");
    assert!(out.contains("3 pair(s) reproduced"), "{out}");
    assert!(out.contains("latency  batch 1: median"), "{out}");
    assert!(out.trim_end().ends_with("fit to go live"), "{out}");

    let (code, out) = check_cli(&machine_state(), true);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["shapes"]["input"], serde_json::json!([1, 8]));
    assert_eq!(v["shapes"]["output"], serde_json::json!([1, 3]));
    assert_eq!(v["shapes"]["batch_size"], 4);
    let rows: Vec<u64> = v["latency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["rows"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, vec![1, 4], "batch-1 and full-batch latency");
}

#[test]
fn model_check_refuses_broken_packages_with_clear_messages() {
    let d = tempfile::tempdir().unwrap();
    let cases: [(&str, Edit, Bytes, &str); 5] = [
        ("truncated", same, truncate, "tract refused the model"),
        // Which check refuses it depends on where the damage lands (the
        // graph, or weights that then yield non-finite scores).
        ("corrupt", same, corrupt, "NOT fit to go live"),
        ("unknown-op", same, unknown_op, "tract refused the model"),
        (
            "wrong-shape",
            window_6,
            keep,
            "graph input \"window\" is [?, 12], the manifest's features make rows of 6 values",
        ),
        (
            "bad-golden",
            |t| t.replace("score = 9.495649", "score = 10.5"),
            keep,
            "golden pair 0: expected 10.5",
        ),
    ];
    for (name, edit, onnx, expected) in cases {
        let dir = d.path().join(name);
        package_copy(&shipped(), &dir, edit, onnx);
        let (code, out) = check_cli(&dir, false);
        assert_eq!(code, Some(1), "{name}: {out}");
        assert!(out.contains("NOT fit to go live"), "{name}: {out}");
        assert!(out.contains(expected), "{name}: {out}");
    }
    // Tampered bytes without a fixed hash never reach tract.
    let dir = d.path().join("tampered");
    package_copy(&shipped(), &dir, same, keep);
    std::fs::write(
        dir.join("model.onnx"),
        truncate(std::fs::read(shipped().join("model.onnx")).unwrap()),
    )
    .unwrap();
    let (code, out) = check_cli(&dir, false);
    assert_eq!(code, Some(1));
    assert!(out.contains("sha256 mismatch"), "{out}");
}

async fn open_buffer(dir: &Path) -> (Buffer, BufferThread) {
    Buffer::open(&BufferSettings::for_path(dir.join("buffer.db"))).unwrap()
}

fn reading(
    source: &str,
    stream: &str,
    seq: u64,
    ts: i64,
    values: &[(&str, f64)],
) -> CommittedReading {
    CommittedReading {
        source: source.into(),
        stream: stream.into(),
        seq,
        device_ts_ms: Some(ts),
        values: values
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect::<BTreeMap<_, _>>(),
    }
}

pub(super) struct Running {
    tx: mpsc::Sender<CommittedReading>,
    pub(super) events: mpsc::Receiver<PredictionEvent>,
    pub(super) metrics: Arc<InferenceMetrics>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    _buffer: BufferThread,
}

pub(super) async fn start(
    dir: &Path,
    models: Vec<LoadedModel>,
    wait: Duration,
    swaps: Option<mpsc::Receiver<LoadedModel>>,
    configure: impl FnOnce(InferenceStage) -> InferenceStage,
) -> Running {
    let (buffer, thread) = open_buffer(dir).await;
    let (tx, rx) = mpsc::channel(4096);
    let (out_tx, events) = mpsc::channel(4096);
    let mut stage = InferenceStage::new(models, rx, buffer, out_tx, Arc::new(Counters::default()))
        .with_batch_max_wait(wait);
    if let Some(s) = swaps {
        stage = stage.with_swaps(s);
    }
    stage = configure(stage);
    let metrics = stage.metrics();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let handle = tokio::spawn(async move { stage.run(token).await.unwrap() });
    Running {
        tx,
        events,
        metrics,
        stop,
        handle,
        _buffer: thread,
    }
}

impl Running {
    pub(super) async fn finish(self) -> Vec<PredictionEvent> {
        let Running {
            tx,
            mut events,
            stop,
            handle,
            ..
        } = self;
        drop(tx);
        stop.cancel();
        handle.await.unwrap();
        let mut out = Vec::new();
        while let Some(e) = events.recv().await {
            out.push(e);
        }
        out
    }
}

fn vib(d: u64, t: u64) -> f64 {
    ((d * 7 + t * 3) % 11) as f64 * 0.3 - 1.0
}

fn amps(d: u64, t: u64) -> f64 {
    ((d * 5 + t * t) % 13) as f64 * 0.25 - 1.5
}

/// mean, population std, min, max, computed here independently of the agent.
fn stats4(v: &[f64]) -> [f32; 4] {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    [mean as f32, var.sqrt() as f32, min as f32, max as f32]
}

/// Windows of 4 steps every 2 (`machine-state`), on 4 devices that report
/// in lock-step: every window shares a tract run with the 3 other devices'
/// windows, and each batched output equals the batch-1 output of the same
/// row, whose stats the test computes itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_of_several_devices_share_one_run_with_batch_one_results() {
    let d = tempfile::tempdir().unwrap();
    let model = LoadedModel::load(&machine_state()).unwrap();
    assert_eq!(model.input.batch_size, 4);
    let run = start(d.path(), vec![model], Duration::from_secs(30), None, |s| s).await;
    let mut seq = 0;
    for t in 0..10u64 {
        for dev in 0..4u64 {
            let ts = 1_000_000 + t as i64 * 1000;
            seq += 1;
            run.tx
                .send(reading(
                    &format!("m{dev}"),
                    "current",
                    seq,
                    ts,
                    &[("amps", amps(dev, t))],
                ))
                .await
                .unwrap();
            seq += 1;
            run.tx
                .send(reading(
                    &format!("m{dev}"),
                    "vibration",
                    seq,
                    ts,
                    &[("rms", vib(dev, t))],
                ))
                .await
                .unwrap();
        }
    }
    let metrics = run.metrics.clone();
    let events = run.finish().await;
    // Windows end at steps 4, 6, 8 and 10 on each of 4 devices.
    assert_eq!(get(&metrics.windows), 16);
    assert_eq!(events.len(), 16);
    assert_eq!(get(&metrics.runs), 4, "16 windows in 4 runs of 4");
    assert_eq!(get(&metrics.rows), 16);

    let runner = Runner::build(&Package::read(&machine_state()).unwrap()).unwrap();
    for e in &events {
        let dev: u64 = e.prediction.source[1..].parse().unwrap();
        let end_t = (e.prediction.window_end_ts_ms.unwrap() - 1_000_000) as u64 / 1000;
        let ts: Vec<u64> = (end_t - 3..=end_t).collect();
        let v: Vec<f64> = ts.iter().map(|t| vib(dev, *t)).collect();
        let a: Vec<f64> = ts.iter().map(|t| amps(dev, *t)).collect();
        let row: Vec<f32> = stats4(&v).into_iter().chain(stats4(&a)).collect();
        let alone = runner.run(&[row]).unwrap().remove(0);
        let probs: Vec<f64> = alone.iter().map(|p| f64::from(*p)).collect();
        // Batched matrix kernels may sum in another order than batch 1:
        // equal to float rounding, not bit for bit.
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1e-3);
        assert_eq!(e.probabilities.len(), probs.len());
        assert!(
            e.probabilities
                .iter()
                .zip(&probs)
                .all(|(x, y)| close(*x, *y)),
            "batched output equals the batch-1 output: {:?} vs {probs:?}",
            e.probabilities
        );
        assert!(close(e.prediction.score, probs[2]), "score is P(failing)");
        assert_eq!(e.prediction.is_anomaly, probs[2] > 0.5);
        let top = ["normal", "worn", "failing"]
            [(0..3).fold(0, |b, i| if probs[i] > probs[b] { i } else { b })];
        assert_eq!(e.label.as_deref(), Some(top));
        assert_eq!(e.prediction.stream, "vibration");
    }

    // The stored rows hold the same label and probabilities as published.
    let (buffer, thread) = open_buffer(d.path()).await;
    let stored = buffer.unsynced(100).await.unwrap().predictions;
    assert_eq!(stored.len(), 16);
    for e in &events {
        let (_, row) = stored
            .iter()
            .find(|(_, p)| p.seq == e.seq)
            .expect("every published prediction is stored");
        assert_eq!(row.label, e.label, "seq {}", e.seq);
        assert!(row.label.is_some());
        assert_eq!(row.probabilities, e.probabilities, "seq {}", e.seq);
        assert_eq!(row.probabilities.len(), 3);
    }
    drop(buffer);
    thread.join();
}

/// A lone window is scored once `batch_max_wait` has passed, not before.
#[tokio::test(start_paused = true)]
async fn a_lone_window_waits_at_most_the_batch_max_wait() {
    let d = tempfile::tempdir().unwrap();
    let model = LoadedModel::load(&machine_state()).unwrap();
    let run = start(
        d.path(),
        vec![model],
        Duration::from_millis(200),
        None,
        |s| s,
    )
    .await;
    for t in 0..4u64 {
        let ts = 1_000_000 + t as i64 * 1000;
        run.tx
            .send(reading(
                "m0",
                "current",
                2 * t + 1,
                ts,
                &[("amps", amps(0, t))],
            ))
            .await
            .unwrap();
        run.tx
            .send(reading(
                "m0",
                "vibration",
                2 * t + 2,
                ts,
                &[("rms", vib(0, t))],
            ))
            .await
            .unwrap();
    }
    while get(&run.metrics.windows) < 1 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(199)).await;
    assert_eq!(get(&run.metrics.runs), 0, "still waiting for company");
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(get(&run.metrics.runs), 1, "run once the wait is over");
    let events = run.finish().await;
    assert_eq!(events.len(), 1);
}

/// Two packages at once: temperature feeds only the NAB model, vibration and
/// current only `machine-state`; each gets exactly its own windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_are_each_fed_by_their_own_streams() {
    let d = tempfile::tempdir().unwrap();
    let nab = LoadedModel::load(&shipped()).unwrap();
    let ms = LoadedModel::load(&machine_state()).unwrap();
    let golden = Package::read(&shipped()).unwrap().manifest.golden;
    let run = start(d.path(), vec![nab, ms], Duration::ZERO, None, |s| s).await;
    let mut seq = 0;
    // 24 temperature readings (windows at 12 and 18 and 24) and 6 steps of
    // the other two streams (windows at steps 4 and 6), interleaved.
    for i in 0..24u64 {
        let ts = 1_000_000 + i as i64 * 1000;
        seq += 1;
        let v = f64::from(golden[0].input[(i % 12) as usize]);
        run.tx
            .send(reading("m1", "temperature", seq, ts, &[("value", v)]))
            .await
            .unwrap();
        if i < 6 {
            seq += 1;
            run.tx
                .send(reading("m1", "current", seq, ts, &[("amps", amps(1, i))]))
                .await
                .unwrap();
            seq += 1;
            run.tx
                .send(reading("m1", "vibration", seq, ts, &[("rms", vib(1, i))]))
                .await
                .unwrap();
        }
    }
    let events = run.finish().await;
    let by = |m: &str| events.iter().filter(|e| e.prediction.model == m).count();
    assert_eq!(by("nab-machine-temp"), 3);
    assert_eq!(by("machine-state"), 2);
    // The first NAB window is golden pair 0 exactly.
    let first = events
        .iter()
        .find(|e| e.prediction.model == "nab-machine-temp")
        .unwrap();
    let expected = f64::from(golden[0].score.unwrap());
    assert!(
        (first.prediction.score - expected).abs() < 1e-3 + 1e-4 * expected,
        "{}",
        first.prediction.score
    );
    assert_eq!(first.prediction.stream, "temperature");
    assert!(events.iter().all(|e| e.prediction.model_sha256.len() == 64));
}

/// NaN in a window: `skip` scores nothing and counts it; `impute` carries
/// the last value forward and scores what the imputed window scores alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_windows_are_skipped_or_imputed_per_model_policy() {
    let golden = Package::read(&shipped()).unwrap().manifest.golden[0]
        .input
        .clone();
    let runner = Runner::build(&Package::read(&shipped()).unwrap()).unwrap();
    for policy in ["skip", "impute"] {
        let d = tempfile::tempdir().unwrap();
        let pkg = d.path().join("pkg");
        package_copy(
            &shipped(),
            &pkg,
            |t| {
                t.replace(
                    "nan_policy = \"skip\"",
                    &format!("nan_policy = \"{policy}\""),
                )
            },
            keep,
        );
        let model = LoadedModel::load(&pkg).unwrap();
        let run = start(d.path(), vec![model], Duration::ZERO, None, |s| s).await;
        for (i, v) in golden.iter().enumerate() {
            let v = if i == 5 { f64::NAN } else { f64::from(*v) };
            run.tx
                .send(reading(
                    "m1",
                    "temperature",
                    i as u64 + 1,
                    i as i64 * 1000,
                    &[("value", v)],
                ))
                .await
                .unwrap();
        }
        let metrics = run.metrics.clone();
        let events = run.finish().await;
        assert_eq!(get(&metrics.windows), 1);
        if policy == "skip" {
            assert_eq!(get(&metrics.nan_skipped), 1);
            assert!(events.is_empty());
        } else {
            assert_eq!(get(&metrics.nan_skipped), 0);
            let mut filled = golden.clone();
            filled[5] = filled[4];
            let alone = f64::from(runner.run(&[filled]).unwrap()[0][0]);
            assert_eq!(events.len(), 1);
            assert_eq!(events[0].prediction.score, alone);
        }
    }
}

/// A rank-3 fixture package and the PyTorch fixture it was built from.
struct Sequence {
    dir: PathBuf,
    stream: &'static str,
    /// Per feature: field name, and `reading = value * scale + offset`
    /// (the inverse of the package's transform).
    fields: Vec<(&'static str, f64, f64)>,
    /// Fixture input `[row][step][feature]`, as the model reads it.
    x: Vec<Vec<Vec<f32>>>,
    /// onnxruntime's output for each row.
    y: Vec<f32>,
}

/// Reads `models/fixtures/NAME.json` (input `x`, output `y`) into
/// `[row][step][feature]`, from `[N, C, L]` (`channels_first`) or
/// `[N, L, C]`.
fn fixture_rows(name: &str, channels_first: bool) -> (Vec<Vec<Vec<f32>>>, Vec<f32>) {
    let path = models().join("fixtures").join(format!("{name}.json"));
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dims: Vec<usize> = fx["inputs"]["x"]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data: Vec<f32> = fx["inputs"]["x"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let (n, steps, fields) = if channels_first {
        (dims[0], dims[2], dims[1])
    } else {
        (dims[0], dims[1], dims[2])
    };
    let at = |i: usize, t: usize, c: usize| {
        if channels_first {
            data[(i * fields + c) * steps + t]
        } else {
            data[(i * steps + t) * fields + c]
        }
    };
    let x = (0..n)
        .map(|i| {
            (0..steps)
                .map(|t| (0..fields).map(|c| at(i, t, c)).collect())
                .collect()
        })
        .collect();
    let y = fx["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    (x, y)
}

fn wave_cnn() -> Sequence {
    let (x, y) = fixture_rows("torch_cnn1d", true);
    Sequence {
        dir: models().join("wave-cnn"),
        stream: "vibration",
        fields: vec![("accel", 1.0, 0.0)],
        x,
        y,
    }
}

fn motor_lstm() -> Sequence {
    let (x, y) = fixture_rows("torch_lstm", false);
    Sequence {
        dir: models().join("motor-lstm"),
        stream: "motor",
        fields: vec![
            ("current", 1.0, 0.0),
            ("speed", 100.0, 1500.0),
            ("temp", 60.0, 20.0),
        ],
        x,
        y,
    }
}

impl Sequence {
    /// Fixture row `i` in feature order (the golden-input order).
    fn feature_row(&self, i: usize) -> Vec<f32> {
        let fields = self.fields.len();
        (0..fields)
            .flat_map(|c| self.x[i].iter().map(move |step| step[c]))
            .collect()
    }

    /// The reading whose transformed values are fixture row `i`, step `t`.
    fn reading(&self, source: &str, seq: u64, ts: i64, i: usize, t: usize) -> CommittedReading {
        let values: Vec<(&str, f64)> = self
            .fields
            .iter()
            .zip(&self.x[i][t])
            .map(|((f, scale, offset), v)| (*f, f64::from(*v) * scale + offset))
            .collect();
        reading(source, self.stream, seq, ts, &values)
    }
}

fn within_package_tolerance(actual: f32, expected: f32) -> bool {
    (actual - expected).abs()
        <= edge_agent::inference::runtime::GOLDEN_ABS_TOL
            + edge_agent::inference::runtime::GOLDEN_REL_TOL * expected.abs()
}

/// `model check` accepts both rank-3 packages and reports their real
/// shapes; their golden pairs are onnxruntime's rows and outputs (the
/// LSTM's transposed to feature order), and every one of the fixture's 64
/// rows, not only the golden ones, reproduces onnxruntime through the
/// package's runner.
#[test]
fn rank_3_packages_pass_model_check_and_reproduce_onnxruntime() {
    let (code, out) = check_cli(&models().join("wave-cnn"), false);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(
            "\"x\": graph declares [?, 1, 64], runs as [1, 1, 64] and [4, 1, 64] (partial batches padded)"
        ),
        "{out}"
    );
    assert!(
        out.contains("y (anomaly_score): [1, 1] per batch-1 run"),
        "{out}"
    );
    assert!(out.contains("6 pair(s) reproduced"), "{out}");
    let (code, out) = check_cli(&models().join("motor-lstm"), true);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["shapes"]["declared_input"], "[?, 32, 3]");
    assert_eq!(v["shapes"]["input"], serde_json::json!([1, 32, 3]));
    assert_eq!(v["shapes"]["output"], serde_json::json!([1, 1]));
    assert_eq!(v["golden"], 6);
    let rows: Vec<u64> = v["latency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["rows"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, vec![1, 4]);

    for seq in [wave_cnn(), motor_lstm()] {
        let package = Package::read(&seq.dir).unwrap();
        for (i, g) in package.manifest.golden.iter().enumerate() {
            assert_eq!(g.input, seq.feature_row(i), "{:?} golden {i}", seq.dir);
            assert_eq!(g.score, Some(seq.y[i]), "{:?} golden {i}", seq.dir);
        }
        let runner = Runner::build(&package).unwrap();
        let rows: Vec<Vec<f32>> = (0..seq.y.len()).map(|i| seq.feature_row(i)).collect();
        for (c, chunk) in rows.chunks(runner.batch_size()).enumerate() {
            for (k, out) in runner.run(chunk).unwrap().iter().enumerate() {
                let i = c * runner.batch_size() + k;
                assert!(
                    within_package_tolerance(out[0], seq.y[i]),
                    "{:?} row {i}: tract {} vs onnxruntime {}",
                    seq.dir,
                    out[0],
                    seq.y[i]
                );
            }
        }
    }
}

/// Readings in, predictions out, for both rank-3 packages: 4 devices in
/// lock-step, each sending one fixture row's window (so its first window
/// is that row, which onnxruntime scored) and then `hop` steps of another
/// row (a second window mixing both). Run with the shipped `batch_size = 4`
/// (every run holds 4 devices' windows) and with `batch_size = 1`: the same
/// windows get the same scores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_3_packages_score_live_windows_batched_like_batch_one() {
    for seq in [wave_cnn(), motor_lstm()] {
        let package = Package::read(&seq.dir).unwrap();
        let (window, hop) = (package.input.window, package.input.hop);
        let name = package.manifest.name.clone();
        let mut scores: Vec<BTreeMap<(String, u64), f64>> = Vec::new();
        for batch in [4usize, 1] {
            let d = tempfile::tempdir().unwrap();
            let pkg = d.path().join("pkg");
            package_copy(
                &seq.dir,
                &pkg,
                |t| t.replace("batch_size = 4", &format!("batch_size = {batch}")),
                keep,
            );
            let model = LoadedModel::load(&pkg).unwrap();
            assert_eq!(model.input.batch_size, batch);
            let run = start(d.path(), vec![model], Duration::from_secs(30), None, |s| s).await;
            let mut n = 0;
            for step in 0..window + hop {
                for dev in 0..4usize {
                    let (row, t) = if step < window {
                        (dev, step)
                    } else {
                        (dev + 4, step - window)
                    };
                    n += 1;
                    let ts = 1_000_000 + step as i64 * 1000;
                    run.tx
                        .send(seq.reading(&format!("d{dev}"), n, ts, row, t))
                        .await
                        .unwrap();
                }
            }
            let metrics = run.metrics.clone();
            let events = run.finish().await;
            assert_eq!(get(&metrics.windows), 8, "{name}: 2 windows x 4 devices");
            assert_eq!(events.len(), 8, "{name}");
            assert_eq!(get(&metrics.rows), 8);
            assert_eq!(get(&metrics.runs), 8 / batch as u64, "{name} batch {batch}");
            for e in &events {
                assert_eq!(e.prediction.model, name);
                assert_eq!(e.prediction.stream, seq.stream);
            }
            // The first window of device d is fixture row d: onnxruntime's score.
            for dev in 0..4usize {
                let first = events
                    .iter()
                    .filter(|e| e.prediction.source == format!("d{dev}"))
                    .min_by_key(|e| e.prediction.window_end_seq)
                    .unwrap();
                assert!(
                    within_package_tolerance(first.prediction.score as f32, seq.y[dev]),
                    "{name} batch {batch} device {dev}: {} vs onnxruntime {}",
                    first.prediction.score,
                    seq.y[dev]
                );
                assert_eq!(
                    first.prediction.is_anomaly,
                    first.prediction.score > first.prediction.threshold
                );
            }
            scores.push(
                events
                    .iter()
                    .map(|e| {
                        (
                            (e.prediction.source.clone(), e.prediction.window_end_seq),
                            e.prediction.score,
                        )
                    })
                    .collect(),
            );
        }
        let (batched, alone) = (&scores[0], &scores[1]);
        assert_eq!(
            batched.keys().collect::<Vec<_>>(),
            alone.keys().collect::<Vec<_>>()
        );
        for (k, b) in batched {
            // Batched kernels may sum in another order: equal to rounding.
            let a = alone[k];
            assert!(
                (a - b).abs() <= 1e-6 * a.abs().max(1e-3),
                "{name} {k:?}: batch 4 {b} vs batch 1 {a}"
            );
        }
    }
}

pub(super) fn verify_settings() -> VerifySettings {
    VerifySettings {
        checker: util::bin(),
        timeout: Duration::from_secs(60),
        max_memory_bytes: 1 << 30,
        prlimit: find_prlimit(),
    }
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The verifier child: a crash, a hang and the memory limit all end in a
/// refusal, never in the caller's death.
#[test]
fn the_child_verifier_survives_crashes_hangs_and_memory_limits() {
    let d = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let ok = verify_in_child(&shipped(), &verify_settings(), &cancel).unwrap();
    assert_eq!(ok.name.as_deref(), Some("nab-machine-temp"));

    let mut s = verify_settings();
    s.checker = script(d.path(), "segv", "kill -SEGV $$");
    let err = verify_in_child(&shipped(), &s, &cancel).unwrap_err();
    assert!(matches!(err, VerifyError::Crashed { .. }), "{err}");
    assert!(err.to_string().contains("signal: 11"), "{err}");

    s.checker = script(d.path(), "hang", "exec sleep 30");
    s.timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let err = verify_in_child(&shipped(), &s, &cancel).unwrap_err();
    assert!(matches!(err, VerifyError::Timeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    if find_prlimit().is_some() {
        let mut s = verify_settings();
        s.max_memory_bytes = 8 << 20;
        let err = verify_in_child(&shipped(), &s, &cancel).unwrap_err();
        assert!(matches!(err, VerifyError::Crashed { .. }), "{err}");
    }
}

pub(super) async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Exactly one window, from a source of its own.
pub(super) async fn one_window(run: &Running, first_seq: u64) -> u64 {
    let golden = Package::read(&shipped()).unwrap().manifest.golden[0]
        .input
        .clone();
    let source = format!("m{first_seq}");
    for (i, v) in golden.iter().enumerate() {
        run.tx
            .send(reading(
                &source,
                "temperature",
                first_seq + i as u64,
                first_seq as i64 + i as i64,
                &[("value", f64::from(*v))],
            ))
            .await
            .unwrap();
    }
    first_seq + 12
}

/// The agent's hot swap: new versions are verified in the real binary
/// before the swap; truncated, corrupt, wrongly shaped and tract-refused
/// packages are refused while the old version keeps serving; removing the
/// new version rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_verifies_refuses_keeps_serving_and_rolls_back() {
    let d = tempfile::tempdir().unwrap();
    let packages = d.path().join("packages");
    let nab = packages.join("nab-machine-temp");
    package_copy(&shipped(), &nab.join("1.0.0"), same, keep);

    let initial = LoadedModel::load(&shipped()).unwrap();
    let (swap_tx, swap_rx) = mpsc::channel(4);
    let mut run = start(
        d.path(),
        vec![initial.clone()],
        Duration::ZERO,
        Some(swap_rx),
        |s| s,
    )
    .await;
    let metrics = run.metrics.clone();
    let mut watcher = Watcher::new(
        packages.clone(),
        Duration::from_secs(3600),
        verify_settings(),
        &[initial],
        swap_tx,
        metrics.clone(),
    );
    let stop = CancellationToken::new();
    let mut seq = 1;
    // The packages directory's 1.0.0 replaces the configured copy.
    watcher.poll(&stop).await;
    wait_until("first swap", || get(&metrics.swaps) == 1).await;

    let broken: [(&str, Edit, Bytes); 4] = [
        (
            "1.0.1",
            |t| t.replace("version = \"1.0.0\"", "version = \"1.0.1\""),
            truncate,
        ),
        (
            "1.0.2",
            |t| t.replace("version = \"1.0.0\"", "version = \"1.0.2\""),
            corrupt,
        ),
        (
            "1.0.3",
            |t| window_6(t.replace("version = \"1.0.0\"", "version = \"1.0.3\"")),
            keep,
        ),
        (
            "1.0.4",
            |t| t.replace("version = \"1.0.0\"", "version = \"1.0.4\""),
            unknown_op,
        ),
    ];
    for (i, (v, edit, onnx)) in broken.into_iter().enumerate() {
        package_copy(&shipped(), &nab.join(v), edit, onnx);
        watcher.poll(&stop).await;
        assert_eq!(get(&metrics.swap_failures), i as u64 + 1, "{v} refused");
        // A refused directory is not retried on the next scan.
        watcher.poll(&stop).await;
        assert_eq!(get(&metrics.swap_failures), i as u64 + 1);
        assert_eq!(get(&metrics.swaps), 1, "{v} never swapped in");
        seq = one_window(&run, seq).await;
        let e = run.events.recv().await.unwrap();
        assert_eq!(
            e.prediction.model_version, "1.0.0",
            "old model keeps serving after {v}"
        );
    }
    // A package whose directory disagrees with its manifest is refused too.
    package_copy(&shipped(), &nab.join("1.0.5"), same, keep);
    watcher.poll(&stop).await;
    assert_eq!(get(&metrics.swap_failures), 5);

    package_copy(&shipped(), &nab.join("1.1.0"), version("1.1.0"), keep);
    watcher.poll(&stop).await;
    wait_until("swap to 1.1.0", || get(&metrics.swaps) == 2).await;
    seq = one_window(&run, seq).await;
    let e = run.events.recv().await.unwrap();
    assert_eq!(e.prediction.model_version, "1.1.0");

    // Rollback: the newer directory goes away, the highest good one serves.
    std::fs::remove_dir_all(nab.join("1.1.0")).unwrap();
    watcher.poll(&stop).await;
    wait_until("rollback", || get(&metrics.swaps) == 3).await;
    one_window(&run, seq).await;
    let e = run.events.recv().await.unwrap();
    assert_eq!(e.prediction.model_version, "1.0.0");
    assert!(
        nab.join("1.0.0").join("model.onnx").is_file(),
        "nothing deleted"
    );
    drop(watcher);
    run.finish().await;
}

/// Hot swap of a rank-3 package, verified in the child process like any
/// other: a version whose layout disagrees with its graph is refused and the
/// running version keeps serving; a good one is swapped in and scores a live
/// window as onnxruntime does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rank_3_package_hot_swaps_through_the_child_verifier() {
    let seq = motor_lstm();
    let d = tempfile::tempdir().unwrap();
    let packages = d.path().join("packages");
    let dir = packages.join("motor-lstm");
    let initial = LoadedModel::load(&seq.dir).unwrap();
    let (swap_tx, swap_rx) = mpsc::channel(4);
    let mut run = start(
        d.path(),
        vec![initial.clone()],
        Duration::ZERO,
        Some(swap_rx),
        |s| s,
    )
    .await;
    let metrics = run.metrics.clone();
    let mut watcher = Watcher::new(
        packages.clone(),
        Duration::from_secs(3600),
        verify_settings(),
        &[initial],
        swap_tx,
        metrics.clone(),
    );
    let stop = CancellationToken::new();
    package_copy(
        &seq.dir,
        &dir.join("1.0.1"),
        |t| {
            version("1.0.1")(t).replace("layout = \"channels_last\"", "layout = \"channels_first\"")
        },
        keep,
    );
    watcher.poll(&stop).await;
    assert_eq!(
        get(&metrics.swap_failures),
        1,
        "layout disagreeing with the graph"
    );
    assert_eq!(get(&metrics.swaps), 0);

    package_copy(&seq.dir, &dir.join("1.1.0"), version("1.1.0"), keep);
    watcher.poll(&stop).await;
    wait_until("swap to 1.1.0", || get(&metrics.swaps) == 1).await;
    let window = Package::read(&seq.dir).unwrap().input.window;
    for t in 0..window {
        run.tx
            .send(seq.reading("d0", t as u64 + 1, 1_000_000 + t as i64 * 1000, 5, t))
            .await
            .unwrap();
    }
    let e = run.events.recv().await.unwrap();
    assert_eq!(e.prediction.model_version, "1.1.0");
    assert!(
        within_package_tolerance(e.prediction.score as f32, seq.y[5]),
        "{} vs onnxruntime {}",
        e.prediction.score,
        seq.y[5]
    );
    drop(watcher);
    run.finish().await;
}

/// Trials: a bad-but-valid version (every package check passes, but it
/// flags every window) is rolled back within its trial while the previous
/// version takes over at once; the rejection is on disk, so a restarted
/// agent never serves it again; a version that keeps getting interrupted
/// on trial is rejected instead of crash-looping; a good version passes its
/// trial and is adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_but_valid_version_is_rolled_back_on_trial_and_stays_rejected() {
    let d = tempfile::tempdir().unwrap();
    let packages = d.path().join("packages");
    let nab = packages.join("nab-machine-temp");
    package_copy(&shipped(), &nab.join("1.0.0"), same, keep);
    swap::write_marker(&nab.join("1.0.0"), swap::ACCEPTED, "{}").unwrap();
    let trial = TrialSettings {
        duration: Duration::from_millis(500),
        min_windows: 5,
        max_p99_latency: Duration::from_secs(10),
        ..TrialSettings::default()
    };

    let initial = LoadedModel::load(&nab.join("1.0.0")).unwrap();
    let (swap_tx, swap_rx) = mpsc::channel(4);
    let (outcome_tx, outcome_rx) = mpsc::channel(16);
    let mut run = start(
        d.path(),
        vec![initial.clone()],
        Duration::ZERO,
        Some(swap_rx),
        |s| s.with_trial(trial.clone(), outcome_tx),
    )
    .await;
    let metrics = run.metrics.clone();
    let watcher = Watcher::new(
        packages.clone(),
        Duration::from_millis(100),
        verify_settings(),
        std::slice::from_ref(&initial),
        swap_tx,
        metrics.clone(),
    )
    .with_trials(outcome_rx);
    let stop = CancellationToken::new();
    let watching = tokio::spawn(watcher.run(stop.clone()));

    // Same graph, same golden pairs; only the threshold is absurd.
    package_copy(
        &shipped(),
        &nab.join("1.1.0"),
        |t| version("1.1.0")(t).replace("threshold = 49.569885", "threshold = 0.000001"),
        keep,
    );
    wait_until("1.1.0 on trial", || get(&metrics.trials) == 1).await;
    let mut seq = 1;
    let mut served = Vec::new();
    while get(&metrics.rollbacks) == 0 {
        assert!(
            served.len() < 50,
            "no rollback after {} windows",
            served.len()
        );
        seq = one_window(&run, seq).await;
        served.push(run.events.recv().await.unwrap().prediction.model_version);
    }
    assert!(served.iter().any(|v| v == "1.1.0"), "{served:?}");
    assert!(
        served.len() <= 6,
        "rolled back once min_windows (5) were seen: {served:?}"
    );
    for _ in 0..3 {
        seq = one_window(&run, seq).await;
        let e = run.events.recv().await.unwrap();
        assert_eq!(
            e.prediction.model_version, "1.0.0",
            "previous version serves"
        );
    }
    wait_until("rejection on disk", || {
        nab.join("1.1.0").join(swap::REJECTED).is_file()
    })
    .await;
    let why = std::fs::read_to_string(nab.join("1.1.0").join(swap::REJECTED)).unwrap();
    assert!(why.contains("flagged anomalous"), "{why}");
    assert_eq!(get(&metrics.swap_failures), 0);
    stop.cancel();
    watching.await.unwrap();
    run.finish().await;

    // A restart: the rejected version is never selected again, and one
    // that was on trial too often is rejected without being loaded.
    let dir_113 = nab.join("1.1.3");
    package_copy(&shipped(), &dir_113, version("1.1.3"), keep);
    std::fs::write(dir_113.join(swap::TRIAL), "3\n").unwrap();
    let (swap_tx, mut swap_rx) = mpsc::channel(4);
    let mut watcher = Watcher::new(
        packages.clone(),
        Duration::from_secs(3600),
        verify_settings(),
        std::slice::from_ref(&initial),
        swap_tx,
        Arc::new(InferenceMetrics::default()),
    )
    .with_trials(mpsc::channel(1).1);
    watcher.poll(&CancellationToken::new()).await;
    assert!(swap_rx.try_recv().is_err(), "nothing swapped in");
    let why = std::fs::read_to_string(dir_113.join(swap::REJECTED)).unwrap();
    assert!(why.contains("still on trial after 3 starts"), "{why}");

    // A good version passes its trial and is adopted.
    let (swap_tx, swap_rx) = mpsc::channel(4);
    let (outcome_tx, outcome_rx) = mpsc::channel(16);
    let mut run = start(
        d.path(),
        vec![initial.clone()],
        Duration::ZERO,
        Some(swap_rx),
        |s| s.with_trial(trial, outcome_tx),
    )
    .await;
    let metrics = run.metrics.clone();
    let watcher = Watcher::new(
        packages.clone(),
        Duration::from_millis(100),
        verify_settings(),
        std::slice::from_ref(&initial),
        swap_tx,
        metrics.clone(),
    )
    .with_trials(outcome_rx);
    let stop = CancellationToken::new();
    let watching = tokio::spawn(watcher.run(stop.clone()));
    package_copy(&shipped(), &nab.join("1.2.0"), version("1.2.0"), keep);
    wait_until("1.2.0 on trial", || get(&metrics.trials) == 1).await;
    let started = std::time::Instant::now();
    let mut seq = 1000;
    while !nab.join("1.2.0").join(swap::ACCEPTED).is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "1.2.0 never adopted"
        );
        seq = one_window(&run, seq).await;
        let e = run.events.recv().await.unwrap();
        assert_eq!(e.prediction.model_version, "1.2.0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&metrics.trials_passed), 1);
    assert_eq!(get(&metrics.rollbacks), 0);
    assert!(!nab.join("1.2.0").join(swap::TRIAL).exists());
    stop.cancel();
    watching.await.unwrap();
    run.finish().await;
}

/// Shadow mode: the candidate scores the same windows as the active model,
/// its outputs are compared and summarised, never published; stopping it
/// sends the final summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_candidate_is_compared_never_published() {
    let d = tempfile::tempdir().unwrap();
    let candidate_dir = d.path().join("shadow/nab-machine-temp/1.1.0");
    package_copy(
        &shipped(),
        &candidate_dir,
        |t| version("1.1.0")(t).replace("threshold = 49.569885", "threshold = 0.000001"),
        keep,
    );
    let active = LoadedModel::load(&shipped()).unwrap();
    let candidate = LoadedModel::load(&candidate_dir).unwrap();
    let (shadow_tx, shadow_rx) = mpsc::channel(4);
    let (summary_tx, mut summaries) = mpsc::channel(16);
    let mut run = start(d.path(), vec![active], Duration::ZERO, None, |s| {
        s.with_shadows(shadow_rx, summary_tx)
    })
    .await;
    shadow_tx
        .send(ShadowUpdate {
            name: "nab-machine-temp".into(),
            model: Some(candidate),
        })
        .await
        .unwrap();
    let mut seq = 1;
    for _ in 0..100 {
        seq = one_window(&run, seq).await;
        let e = run.events.recv().await.unwrap();
        assert_eq!(
            e.prediction.model_version, "1.0.0",
            "only the active model publishes"
        );
        assert!(!e.prediction.is_anomaly);
    }
    let (name, version, summary) = tokio::time::timeout(Duration::from_secs(30), summaries.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (name.as_str(), version.as_str()),
        ("nab-machine-temp", "1.1.0")
    );
    assert_eq!(summary.windows, 100);
    assert_eq!(summary.candidate_errors, 0);
    assert!(summary.max_abs_diff < 1e-6, "same graph: {summary:?}");
    assert!(
        summary.agreement.abs() < 1e-12,
        "the candidate flags every window: {summary:?}"
    );

    for _ in 0..5 {
        seq = one_window(&run, seq).await;
        run.events.recv().await.unwrap();
    }
    shadow_tx
        .send(ShadowUpdate {
            name: "nab-machine-temp".into(),
            model: None,
        })
        .await
        .unwrap();
    let (_, _, last) = tokio::time::timeout(Duration::from_secs(30), summaries.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.windows, 105);
    drop(shadow_tx);
    run.finish().await;
}
