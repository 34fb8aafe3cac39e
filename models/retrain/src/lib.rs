//! Retrainer for the shipped model families, in Rust with no Python: from
//! readings to a verified model package (`docs/model-package.md`).
//!
//! Crate map:
//! - [`data`]: the input ([`Reading`] rows → [`TrainingData`] series), the
//!   NAB CSV and label readers;
//! - [`windows`]: windows and window statistics as the agent cuts them,
//!   label join, chronological split;
//! - [`linalg`]: mean, covariance, Cholesky, triangular inverse, SPD solve,
//!   quantiles (plain f64);
//! - [`detector`]: the Gaussian window detector (squared Mahalanobis
//!   distance), the demo's model family;
//! - [`classifier`]: logistic regression on window statistics, when the
//!   data carries a label stream;
//! - [`onnx`]: the ONNX graphs (tract-onnx's protobuf types, `prost`) and a
//!   tract runner through the agent's loader;
//! - [`package`]: `model.toml`, verification, atomic publication;
//! - [`nab`]: the NAB labeled-window comparison;
//! - this file: [`TrainConfig`], [`train`] and its [`TrainReport`].
//!
//! This crate does not know about runs, registries or databases: the caller
//! (cloud-sync) records the run and registers the package. [`train`]
//! returns success only for a package that passed [`package::verify`] and
//! whose tract outputs match the f64 scoring on every held-out window.

pub mod classifier;
pub mod data;
pub mod detector;
pub mod linalg;
pub mod nab;
pub mod onnx;
pub mod package;
pub mod windows;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use data::{Point, Reading, Series, TrainingData};
pub use package::PackageError;

/// Result alias for this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// The git commit given at build time in `EDGE_GIT_COMMIT`, else `unknown`.
pub const GIT_COMMIT: &str = match option_env!("EDGE_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// The code version recorded with each run: `edge-retrain <crate
/// version> (<git commit>)`.
#[must_use]
pub fn code_version() -> String {
    format!("edge-retrain {} ({GIT_COMMIT})", env!("CARGO_PKG_VERSION"))
}

/// Why a training run failed. Nothing is left at the package directory.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The config is unusable.
    #[error("invalid training config: `{key}` {problem}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No series of the configured stream and field.
    #[error("no series of stream {stream:?} field {field:?} in the training data")]
    NoSeries {
        /// Stream.
        stream: String,
        /// Field.
        field: String,
    },
    /// Too few windows to train and hold some out.
    #[error(
        "too little data: {windows} window(s) of {window} steps ({train} to train, {held_out} held out); \
         need at least {min_train} to train and 1 held out"
    )]
    TooLittleData {
        /// Windows cut.
        windows: usize,
        /// Window width.
        window: usize,
        /// Training windows.
        train: usize,
        /// Held-out windows.
        held_out: usize,
        /// Minimum training windows.
        min_train: usize,
    },
    /// Labeled training needs both classes among the training windows.
    #[error(
        "labels: the training windows hold {positives} positive and {negatives} negative label(s); both are needed"
    )]
    OneClass {
        /// Positive windows.
        positives: usize,
        /// Negative windows.
        negatives: usize,
    },
    /// A value is not finite.
    #[error("bad input")]
    Window(#[from] windows::WindowError),
    /// The fit failed numerically.
    #[error("cannot fit the model")]
    Fit(#[from] linalg::LinalgError),
    /// tract failed on the written graph.
    #[error("written model fails in tract")]
    Tract(#[from] onnx::OnnxError),
    /// tract's output disagrees with the f64 scoring.
    #[error(
        "written model disagrees with the training scores: window {window} gives {tract} in tract, {expected} in f64"
    )]
    Mismatch {
        /// Held-out window index.
        window: usize,
        /// tract's value.
        tract: f64,
        /// f64 value.
        expected: f64,
    },
    /// The package could not be written or failed verification.
    #[error("package failed")]
    Package(#[from] PackageError),
}

/// Labels for the supervised family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelConfig {
    /// Stream carrying the label (same device and source as the feature).
    pub stream: String,
    /// Field of the label: above 0.5 is the positive class (`anomaly`).
    pub field: String,
    /// L2 penalty on the standardized weights.
    #[serde(default = "default_l2")]
    pub l2: f64,
}

fn default_l2() -> f64 {
    1.0
}

/// What to train and how (`[train]` of a retrain config; every key has a
/// default except `name`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Package version `MAJOR.MINOR.PATCH`.
    #[serde(default = "default_version")]
    pub version: String,
    /// Stream of the feature (the clock stream of the package).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Field of the feature.
    #[serde(default = "default_field")]
    pub field: String,
    /// Time steps per window.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Steps between windows.
    #[serde(default = "default_hop")]
    pub hop: usize,
    /// Share of each series' windows (the oldest) used to fit; the rest is
    /// held out for the threshold and the metrics.
    #[serde(default = "default_train_fraction")]
    pub train_fraction: f64,
    /// Added to the covariance diagonal (detector).
    #[serde(default = "default_ridge")]
    pub ridge: f64,
    /// The detector's threshold is this quantile of the held-out scores.
    #[serde(default = "default_quantile")]
    pub threshold_quantile: f64,
    /// The package's `input.late_policy` (`accept`: windows were cut in the
    /// order given, as training did).
    #[serde(default = "default_late_policy")]
    pub late_policy: String,
    /// With labels: train the classifier instead of the detector.
    #[serde(default)]
    pub label: Option<LabelConfig>,
}

fn default_version() -> String {
    "1.0.0".to_owned()
}
fn default_stream() -> String {
    "temperature".to_owned()
}
fn default_field() -> String {
    "value".to_owned()
}
fn default_window() -> usize {
    12
}
fn default_hop() -> usize {
    6
}
fn default_train_fraction() -> f64 {
    0.7
}
fn default_ridge() -> f64 {
    1e-6
}
fn default_quantile() -> f64 {
    0.99
}
fn default_late_policy() -> String {
    "accept".to_owned()
}

/// Fewest training windows accepted.
pub const MIN_TRAIN_WINDOWS: usize = 2;

impl TrainConfig {
    /// The defaults for model `name`.
    #[must_use]
    pub fn new(name: &str) -> TrainConfig {
        TrainConfig {
            name: name.to_owned(),
            version: default_version(),
            stream: default_stream(),
            field: default_field(),
            window: default_window(),
            hop: default_hop(),
            train_fraction: default_train_fraction(),
            ridge: default_ridge(),
            threshold_quantile: default_quantile(),
            late_policy: default_late_policy(),
            label: None,
        }
    }

    /// Checks every key.
    ///
    /// # Errors
    /// [`TrainError::Config`] naming the first bad key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key, problem: &str| {
            Err(TrainError::Config {
                key,
                problem: problem.to_owned(),
            })
        };
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self.name != "."
            && self.name != ".."
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return bad("name", "must be 1-128 characters from [A-Za-z0-9._-]");
        }
        let parts: Vec<&str> = self.version.split('.').collect();
        if parts.len() != 3
            || parts.iter().any(|p| {
                p.is_empty()
                    || !p.bytes().all(|b| b.is_ascii_digit())
                    || (p.len() > 1 && p.starts_with('0'))
            })
        {
            return bad("version", "must be MAJOR.MINOR.PATCH");
        }
        if !(1..=65_536).contains(&self.window) {
            return bad("window", "must be 1..=65536");
        }
        if self.hop == 0 || self.hop > self.window {
            return bad("hop", "must be 1..=window");
        }
        if !(self.train_fraction > 0.0 && self.train_fraction < 1.0) {
            return bad("train_fraction", "must be above 0 and below 1");
        }
        if !(self.ridge.is_finite() && self.ridge > 0.0) {
            return bad("ridge", "must be finite and above 0");
        }
        if !(self.threshold_quantile > 0.0 && self.threshold_quantile <= 1.0) {
            return bad("threshold_quantile", "must be above 0 and at most 1");
        }
        if !["accept", "drop"].contains(&self.late_policy.as_str()) {
            return bad("late_policy", "must be \"accept\" or \"drop\"");
        }
        if let Some(label) = &self.label
            && !(label.l2.is_finite() && label.l2 >= 0.0)
        {
            return bad("label.l2", "must be finite and at least 0");
        }
        Ok(())
    }

    /// `window_detector` or `classifier`.
    #[must_use]
    pub fn family(&self) -> &'static str {
        if self.label.is_some() {
            "classifier"
        } else {
            "window_detector"
        }
    }
}

/// Where a run is, for progress reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Cutting windows.
    Windows,
    /// Fitting.
    Fit,
    /// Writing and checking the ONNX graph against the f64 scores.
    Export,
    /// Writing and verifying the package.
    Package,
}

impl Stage {
    /// The stage's name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Windows => "windows",
            Stage::Fit => "fit",
            Stage::Export => "export",
            Stage::Package => "package",
        }
    }

    /// Rough share of the run done when the stage starts (percent).
    #[must_use]
    pub fn percent(self) -> u8 {
        match self {
            Stage::Windows => 0,
            Stage::Fit => 20,
            Stage::Export => 50,
            Stage::Package => 80,
        }
    }
}

/// What a successful run produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    /// `window_detector` or `classifier`.
    pub family: String,
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// sha256 of `model.onnx`.
    pub sha256: String,
    /// The verified package directory.
    pub package_dir: PathBuf,
    /// Alert threshold written to the manifest.
    pub threshold: f64,
    /// Golden pairs verified.
    pub golden: usize,
    /// Metrics on held-out data (and fit sizes), by name.
    pub metrics: BTreeMap<String, f64>,
    /// The config, as trained.
    pub config: TrainConfig,
    /// [`code_version`].
    pub code_version: String,
    /// Wall time of the run, milliseconds.
    pub duration_ms: u64,
}

/// Trains `config`'s family on `data` and publishes a verified package at
/// `package_dir` (which must not exist). `progress` is called at the start
/// of each stage.
///
/// Detector: fitted on the oldest `train_fraction` of each series'
/// windows; threshold = the `threshold_quantile` quantile of the held-out
/// scores; `[baseline]` score percentiles are of the held-out scores,
/// feature statistics of the training windows' values.
///
/// Classifier: logistic regression on `[mean, std, min, max, slope]` of
/// each window, labelled by the label stream as of the window's end; alert
/// threshold 0.5 on `P(anomaly)`.
///
/// # Errors
/// [`TrainError`]; nothing is left at `package_dir` on error.
pub fn train(
    data: &TrainingData,
    config: &TrainConfig,
    package_dir: &Path,
    progress: &mut dyn FnMut(Stage),
) -> Result<TrainReport> {
    let started = Instant::now();
    config.validate()?;
    progress(Stage::Windows);
    let mut cut = Vec::new();
    let mut any = false;
    for (ix, series) in data.series.iter().enumerate() {
        if series.stream == config.stream && series.field == config.field {
            any = true;
            cut.extend(windows::cut(ix, series, config.window, config.hop)?);
        }
    }
    if !any {
        return Err(TrainError::NoSeries {
            stream: config.stream.clone(),
            field: config.field.clone(),
        });
    }
    let built = match &config.label {
        None => build_detector(config, &cut, progress)?,
        Some(label) => build_classifier(data, config, label, cut, progress)?,
    };
    progress(Stage::Package);
    let golden = package::publish(package_dir, &built.manifest, &built.onnx)?;
    let mut metrics = built.metrics;
    metrics.insert("golden_pairs".to_owned(), golden as f64);
    Ok(TrainReport {
        family: config.family().to_owned(),
        name: config.name.clone(),
        version: config.version.clone(),
        sha256: built.manifest.sha256.clone(),
        package_dir: package_dir.to_owned(),
        threshold: built.manifest.output.threshold,
        golden,
        metrics,
        config: config.clone(),
        code_version: code_version(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

struct Built {
    manifest: package::Manifest,
    onnx: Vec<u8>,
    metrics: BTreeMap<String, f64>,
}

fn split_checked(
    config: &TrainConfig,
    cut: &[windows::Window],
) -> Result<(Vec<usize>, Vec<usize>)> {
    let (train, held) = windows::split(cut, config.train_fraction);
    if train.len() < MIN_TRAIN_WINDOWS || held.is_empty() {
        return Err(TrainError::TooLittleData {
            windows: cut.len(),
            window: config.window,
            train: train.len(),
            held_out: held.len(),
            min_train: MIN_TRAIN_WINDOWS,
        });
    }
    Ok((train, held))
}

fn feature_baseline(config: &TrainConfig, rows: &[&[f64]]) -> package::BaselineFeature {
    let values: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    package::BaselineFeature {
        stream: config.stream.clone(),
        field: config.field.clone(),
        mean,
        std,
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// Runs every row through tract and checks it against `expected` within
/// the golden tolerance; returns the largest relative difference.
fn check_tract(runner: &onnx::Runner, rows: &[Vec<f64>], expected: &[Vec<f64>]) -> Result<f64> {
    let mut worst: f64 = 0.0;
    for (window, (row, exp)) in rows.iter().zip(expected).enumerate() {
        let got = runner.run(&onnx::to_f32(row))?;
        for (g, e) in got.iter().zip(exp) {
            let g = f64::from(*g);
            let tol =
                f64::from(package::GOLDEN_ABS_TOL) + f64::from(package::GOLDEN_REL_TOL) * e.abs();
            if !g.is_finite() || (g - e).abs() > tol {
                return Err(TrainError::Mismatch {
                    window,
                    tract: g,
                    expected: *e,
                });
            }
            worst = worst.max((g - e).abs() / e.abs().max(1e-12));
        }
    }
    Ok(worst)
}

fn build_detector(
    config: &TrainConfig,
    cut: &[windows::Window],
    progress: &mut dyn FnMut(Stage),
) -> Result<Built> {
    let (train, held) = split_checked(config, cut)?;
    progress(Stage::Fit);
    let train_rows: Vec<Vec<f64>> = train.iter().map(|&i| cut[i].values.clone()).collect();
    let held_rows: Vec<Vec<f64>> = held.iter().map(|&i| cut[i].values.clone()).collect();
    let det = detector::Detector::fit(&train_rows, config.ridge)?;
    let train_scores: Vec<f64> = train_rows.iter().map(|r| det.score(r)).collect();
    let held_scores: Vec<f64> = held_rows.iter().map(|r| det.score(r)).collect();
    let threshold = linalg::quantile(&held_scores, config.threshold_quantile);

    progress(Stage::Export);
    let onnx_bytes = det.onnx();
    let runner = onnx::Runner::load(&onnx_bytes, config.window)?;
    let expected: Vec<Vec<f64>> = held_scores.iter().map(|&s| vec![s]).collect();
    let worst = check_tract(&runner, &held_rows, &expected)?;

    // Golden pairs: the held-out window nearest the median score, the
    // highest-scoring held-out window, and a constant window at the mean.
    let median = linalg::quantile(&held_scores, 0.5);
    let typical = (0..held_scores.len())
        .min_by(|&a, &b| {
            (held_scores[a] - median)
                .abs()
                .total_cmp(&(held_scores[b] - median).abs())
        })
        .unwrap_or(0);
    let highest = (0..held_scores.len())
        .max_by(|&a, &b| held_scores[a].total_cmp(&held_scores[b]))
        .unwrap_or(0);
    let train_refs: Vec<&[f64]> = train_rows.iter().map(Vec::as_slice).collect();
    let base = feature_baseline(config, &train_refs);
    let constant = vec![base.mean; config.window];
    let mut golden = Vec::new();
    for row in [&held_rows[typical], &held_rows[highest], &constant] {
        let input = onnx::to_f32(row);
        let out = runner.run(&input)?;
        golden.push(package::Golden {
            input,
            score: out.first().copied(),
            output: None,
        });
    }

    let flagged = held_scores.iter().filter(|&&s| s > threshold).count();
    let metrics = BTreeMap::from([
        ("train_windows".to_owned(), train_rows.len() as f64),
        ("heldout_windows".to_owned(), held_rows.len() as f64),
        ("threshold".to_owned(), threshold),
        ("heldout_flagged".to_owned(), flagged as f64),
        (
            "heldout_flag_rate".to_owned(),
            flagged as f64 / held_rows.len() as f64,
        ),
        ("heldout_score_p50".to_owned(), median),
        (
            "heldout_score_p99".to_owned(),
            linalg::quantile(&held_scores, 0.99),
        ),
        (
            "train_score_p50".to_owned(),
            linalg::quantile(&train_scores, 0.5),
        ),
        (
            "train_score_p99".to_owned(),
            linalg::quantile(&train_scores, 0.99),
        ),
        ("tract_max_rel_diff".to_owned(), worst),
    ]);
    let manifest = package::Manifest {
        name: config.name.clone(),
        version: config.version.clone(),
        sha256: package::sha256_hex(&onnx_bytes),
        description: Some(format!(
            "Gaussian window detector (squared Mahalanobis distance) retrained by {} \
             on {} windows; threshold = {} quantile of {} held-out scores",
            code_version(),
            train_rows.len(),
            config.threshold_quantile,
            held_rows.len()
        )),
        input: package::Input {
            tensor: "window".to_owned(),
            window: config.window,
            hop: config.hop,
            batch_size: 1,
            late_policy: Some(config.late_policy.clone()),
            nan_policy: Some("skip".to_owned()),
            features: vec![package::Feature {
                stream: config.stream.clone(),
                field: config.field.clone(),
                transform: "raw".to_owned(),
                stats: None,
            }],
        },
        output: package::Output {
            tensor: "score".to_owned(),
            kind: "anomaly_score".to_owned(),
            threshold,
            labels: None,
            alert_labels: None,
        },
        baseline: package::Baseline {
            score_p50: Some(median),
            score_p99: Some(linalg::quantile(&held_scores, 0.99)),
            features: vec![base],
        },
        golden,
    };
    Ok(Built {
        manifest,
        onnx: onnx_bytes,
        metrics,
    })
}

fn build_classifier(
    data: &TrainingData,
    config: &TrainConfig,
    label: &LabelConfig,
    cut: Vec<windows::Window>,
    progress: &mut dyn FnMut(Stage),
) -> Result<Built> {
    // Windows without a label yet (before the label stream's first value) are dropped.
    let mut labelled = Vec::new();
    let mut labels = Vec::new();
    for w in cut {
        let Some(series) = data.series.get(w.series) else {
            continue;
        };
        let Some(ls) = data.find(&series.device, &series.source, &label.stream, &label.field)
        else {
            continue;
        };
        if let Some(y) = windows::label_at(&ls.points, w.end_ts_ms) {
            labels.push(y);
            labelled.push(w);
        }
    }
    // Re-index windows per series so the split stays chronological.
    let mut counters: BTreeMap<usize, usize> = BTreeMap::new();
    for w in &mut labelled {
        let c = counters.entry(w.series).or_default();
        w.index = *c;
        *c += 1;
    }
    let (train, held) = split_checked(config, &labelled)?;
    let positives = train.iter().filter(|&&i| labels[i]).count();
    if positives == 0 || positives == train.len() {
        return Err(TrainError::OneClass {
            positives,
            negatives: train.len() - positives,
        });
    }
    progress(Stage::Fit);
    let feats = |ix: &[usize]| -> Vec<Vec<f64>> {
        ix.iter()
            .map(|&i| windows::stats(&labelled[i].values).to_vec())
            .collect()
    };
    let train_x = feats(&train);
    let held_x = feats(&held);
    let train_y: Vec<bool> = train.iter().map(|&i| labels[i]).collect();
    let held_y: Vec<bool> = held.iter().map(|&i| labels[i]).collect();
    let clf = classifier::Classifier::fit(&train_x, &train_y, label.l2)?;

    progress(Stage::Export);
    let onnx_bytes = clf.onnx();
    let runner = onnx::Runner::load(&onnx_bytes, windows::STATS.len())?;
    let expected: Vec<Vec<f64>> = held_x
        .iter()
        .map(|f| {
            let p = clf.probability(f);
            vec![1.0 - p, p]
        })
        .collect();
    let worst = check_tract(&runner, &held_x, &expected)?;

    let probs: Vec<f64> = held_x.iter().map(|f| clf.probability(f)).collect();
    let (mut tp, mut fp, mut tn, mut fneg) = (0usize, 0usize, 0usize, 0usize);
    let mut log_loss = 0.0;
    for (&p, &y) in probs.iter().zip(&held_y) {
        match (p > 0.5, y) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fneg += 1,
        }
        let q = if y { p } else { 1.0 - p };
        log_loss -= q.clamp(1e-15, 1.0).ln();
    }
    let n = held_y.len() as f64;
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let metrics = BTreeMap::from([
        ("train_windows".to_owned(), train_x.len() as f64),
        ("heldout_windows".to_owned(), n),
        ("threshold".to_owned(), 0.5),
        ("heldout_accuracy".to_owned(), (tp + tn) as f64 / n),
        ("heldout_precision".to_owned(), ratio(tp, tp + fp)),
        ("heldout_recall".to_owned(), ratio(tp, tp + fneg)),
        ("heldout_log_loss".to_owned(), log_loss / n),
        (
            "heldout_positive_rate".to_owned(),
            ratio(tp + fneg, held_y.len()),
        ),
        (
            "train_positive_rate".to_owned(),
            ratio(positives, train_x.len()),
        ),
        ("tract_max_rel_diff".to_owned(), worst),
    ]);

    // Golden pairs: up to six held-out rows spread over the split, plus the
    // most confident positive when there is one.
    let mut picks: Vec<usize> = (0..6).map(|k| k * held_x.len() / 6).collect();
    if let Some(best) = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])) {
        picks.push(best);
    }
    picks.dedup();
    let mut golden = Vec::new();
    for &i in &picks {
        let input = onnx::to_f32(&held_x[i]);
        let out = runner.run(&input)?;
        golden.push(package::Golden {
            input,
            score: None,
            output: Some(out),
        });
    }
    let train_rows: Vec<&[f64]> = train
        .iter()
        .map(|&i| labelled[i].values.as_slice())
        .collect();
    let manifest = package::Manifest {
        name: config.name.clone(),
        version: config.version.clone(),
        sha256: package::sha256_hex(&onnx_bytes),
        description: Some(format!(
            "Logistic regression on window statistics retrained by {} \
             on {} labelled windows ({}.{} labels)",
            code_version(),
            train_x.len(),
            label.stream,
            label.field
        )),
        input: package::Input {
            tensor: "X".to_owned(),
            window: config.window,
            hop: config.hop,
            batch_size: 1,
            late_policy: Some(config.late_policy.clone()),
            nan_policy: Some("skip".to_owned()),
            features: vec![package::Feature {
                stream: config.stream.clone(),
                field: config.field.clone(),
                transform: "stats".to_owned(),
                stats: Some(windows::STATS.iter().map(|s| (*s).to_owned()).collect()),
            }],
        },
        output: package::Output {
            tensor: "probabilities".to_owned(),
            kind: "class_probabilities".to_owned(),
            threshold: 0.5,
            labels: Some(vec!["normal".to_owned(), "anomaly".to_owned()]),
            alert_labels: Some(vec!["anomaly".to_owned()]),
        },
        baseline: package::Baseline {
            score_p50: None,
            score_p99: None,
            features: vec![feature_baseline(config, &train_rows)],
        },
        golden,
    };
    Ok(Built {
        manifest,
        onnx: onnx_bytes,
        metrics,
    })
}

/// Scores every window of `series` with the detector package in `dir`
/// (run through tract, windows cut with the manifest's `window`/`hop`) and
/// compares its flags with `spans` (NAB's labeled windows).
///
/// # Errors
/// A package, tract or input error.
pub fn nab_evaluate(dir: &Path, series: &Series, spans: &[(i64, i64)]) -> Result<nab::NabScore> {
    let manifest = package::read_manifest(dir)?;
    let path = dir.join("model.onnx");
    let onnx_bytes = std::fs::read(&path).map_err(|source| PackageError::Io { path, source })?;
    let runner = onnx::Runner::load(&onnx_bytes, manifest.input.window)?;
    let cut = windows::cut(0, series, manifest.input.window, manifest.input.hop)?;
    let mut scores = Vec::with_capacity(cut.len());
    for w in &cut {
        let out = runner.run(&onnx::to_f32(&w.values))?;
        scores.push(out.first().map_or(f64::NAN, |v| f64::from(*v)));
    }
    let ends: Vec<i64> = cut.iter().map(|w| w.end_ts_ms).collect();
    Ok(nab::score(&ends, &scores, manifest.output.threshold, spans))
}
