//! Model packages: a directory with `model.onnx` and `model.toml`.
//!
//! Owns reading and verifying a package before anything runs it: the
//! manifest parses with unknown keys refused, the ONNX file's sha256 matches
//! the manifest, and (in [`super::runtime`]) the model loads with the
//! manifest's input shape and reproduces every golden pair. The format is
//! documented in `docs/model-package.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::features::{Feature, InputPlan, Layout, NanPolicy, Stat, Transform};
use super::output::{OutputKind, OutputPlan};

/// Largest ONNX file accepted, so a hostile package cannot exhaust memory.
pub const MAX_MODEL_BYTES: u64 = 256 * 1024 * 1024;

/// Why a package was refused.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid TOML for this format.
    #[error("invalid manifest {path}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A manifest value is unusable.
    #[error("invalid manifest {path}: {key}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The ONNX file is larger than [`MAX_MODEL_BYTES`].
    #[error("model file {path} is {size} bytes, above the {MAX_MODEL_BYTES}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The ONNX file's hash differs from the manifest's.
    #[error("sha256 mismatch for {path}: manifest says {expected}, file is {actual}")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
}

/// Result alias for this module.
pub type Result<T, E = PackageError> = std::result::Result<T, E>;

/// `model.toml` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Model name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Semver version.
    pub version: String,
    /// sha256 of `model.onnx`, lowercase hex.
    pub sha256: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// What the model reads.
    pub input: InputSpec,
    /// What the model writes.
    pub output: OutputSpec,
    /// Training baseline statistics (for drift monitoring).
    pub baseline: Baseline,
    /// Golden input/output pairs, run before the model goes live.
    #[serde(default)]
    pub golden: Vec<Golden>,
}

/// `[input]`: which streams feed the model and how windows are cut.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// ONNX input tensor name.
    pub tensor: String,
    /// Time steps per window.
    pub window: usize,
    /// Time steps between consecutive windows.
    pub hop: usize,
    /// Most windows per tract run (rows of the input tensor); default 1.
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Device-time gap between consecutive time steps above which the
    /// window restarts empty; 0 (default) never restarts.
    #[serde(default)]
    pub max_gap_ms: u64,
    /// Readings of the clock stream held back to put out-of-order arrivals
    /// back in device-time order; 0 (default) holds none.
    #[serde(default)]
    pub reorder_readings: usize,
    /// `drop` (default) or `accept`: what a reading older than the last
    /// time step gets (dropped and counted, or taken in arrival order).
    #[serde(default = "drop_late")]
    pub late_policy: String,
    /// `skip` (default) or `impute`: what a window holding a missing value gets.
    #[serde(default = "skip")]
    pub nan_policy: String,
    /// `flat` (default: `[batch, width]`), `channels_first`
    /// (`[batch, features, window]`) or `channels_last`
    /// (`[batch, window, features]`): the shape of the input tensor.
    #[serde(default = "flat")]
    pub layout: String,
    /// Features, in input-tensor order; the first one's stream is the clock.
    pub features: Vec<FeatureSpec>,
}

fn flat() -> String {
    "flat".into()
}

fn drop_late() -> String {
    "drop".into()
}

fn one() -> usize {
    1
}

fn skip() -> String {
    "skip".into()
}

/// `[[input.features]]`: one value per time step, transformed per window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Stream name (from the topic template).
    pub stream: String,
    /// Field within the reading's values.
    pub field: String,
    /// `raw`, `zscore`, `minmax` or `stats`.
    pub transform: String,
    /// `zscore`: mean subtracted.
    pub mean: Option<f64>,
    /// `zscore`: standard deviation divided by.
    pub std: Option<f64>,
    /// `minmax`: maps to 0.
    pub min: Option<f64>,
    /// `minmax`: maps to 1.
    pub max: Option<f64>,
    /// `stats`: per-window statistics, in order: `mean`, `std`, `min`, `max`, `slope`.
    #[serde(default)]
    pub stats: Vec<String>,
}

/// `[output]`: what the model's output means.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// ONNX output tensor name.
    pub tensor: String,
    /// `anomaly_score`, `class_probabilities` or `regression`.
    pub kind: String,
    /// Alert threshold on the (post-processed) score; required for
    /// `anomaly_score`, optional otherwise.
    pub threshold: Option<f64>,
    /// `above` (default) or `below`: which side of the threshold alerts.
    #[serde(default = "above")]
    pub alert_when: String,
    /// `class_probabilities`: one label per output column.
    #[serde(default)]
    pub labels: Vec<String>,
    /// `class_probabilities`: labels whose summed probability is the score.
    #[serde(default)]
    pub alert_labels: Vec<String>,
    /// `class_probabilities`: apply softmax to the output first (logits).
    #[serde(default)]
    pub softmax: bool,
    /// `regression`: value = output * scale + offset; default 1.
    pub scale: Option<f64>,
    /// `regression`: see `scale`; default 0.
    pub offset: Option<f64>,
}

fn above() -> String {
    "above".into()
}

/// `[baseline]`: statistics of the training data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// Median training score.
    pub score_p50: Option<f64>,
    /// 99th percentile training score.
    pub score_p99: Option<f64>,
    /// One entry per input feature.
    pub features: Vec<FeatureBaseline>,
}

/// `[[baseline.features]]`: training statistics of one input feature.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeatureBaseline {
    /// Stream of the feature.
    pub stream: String,
    /// Field of the feature.
    pub field: String,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

/// `[[golden]]`: an input row and the output the model must reproduce.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// One input-tensor row (after the feature transforms).
    pub input: Vec<f32>,
    /// Expected single output value (from onnxruntime at packaging time).
    pub score: Option<f32>,
    /// Expected output row, for outputs of several values.
    pub output: Option<Vec<f32>>,
}

impl Golden {
    /// The expected output row.
    #[must_use]
    pub fn expected(&self) -> Vec<f32> {
        match (&self.output, self.score) {
            (Some(o), _) => o.clone(),
            (None, Some(s)) => vec![s],
            (None, None) => Vec::new(),
        }
    }
}

/// A package whose manifest parsed and whose ONNX bytes match its hash.
#[derive(Debug, Clone)]
pub struct Package {
    /// Directory it came from.
    pub dir: PathBuf,
    /// The manifest as written.
    pub manifest: Manifest,
    /// The validated `[input]`.
    pub input: InputPlan,
    /// The validated `[output]`.
    pub output: OutputPlan,
    /// The verified ONNX bytes.
    pub onnx: Vec<u8>,
}

impl Package {
    /// Reads `dir/model.toml` and `dir/model.onnx` and checks the hash and
    /// manifest values. Does not parse the ONNX graph.
    ///
    /// # Errors
    /// [`PackageError`] naming the file and key at fault.
    pub fn read(dir: &Path) -> Result<Self> {
        let manifest_path = dir.join("model.toml");
        let text =
            std::fs::read_to_string(&manifest_path).map_err(|source| PackageError::Read {
                path: manifest_path.clone(),
                source,
            })?;
        let manifest: Manifest =
            toml::from_str(&text).map_err(|source| PackageError::Manifest {
                path: manifest_path.clone(),
                source,
            })?;
        let (input, output) =
            validate(&manifest).map_err(|(key, problem)| PackageError::Invalid {
                path: manifest_path.clone(),
                key,
                problem,
            })?;

        let onnx_path = dir.join("model.onnx");
        let read_err = |source| PackageError::Read {
            path: onnx_path.clone(),
            source,
        };
        let size = std::fs::metadata(&onnx_path).map_err(read_err)?.len();
        if size > MAX_MODEL_BYTES {
            return Err(PackageError::TooLarge {
                path: onnx_path,
                size,
            });
        }
        let onnx = std::fs::read(&onnx_path).map_err(read_err)?;
        let actual = hex::encode(Sha256::digest(&onnx));
        if actual != manifest.sha256.to_ascii_lowercase() {
            return Err(PackageError::HashMismatch {
                path: onnx_path,
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            input,
            output,
            onnx,
        })
    }
}

type Invalid = (&'static str, String);

fn finite(key: &'static str, v: f64) -> std::result::Result<f64, Invalid> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err((key, "must be a finite number".into()))
    }
}

fn required(key: &'static str, v: Option<f64>, why: &str) -> std::result::Result<f64, Invalid> {
    finite(key, v.ok_or_else(|| (key, format!("is required {why}")))?)
}

/// Checks every manifest value and returns the typed input and output plans.
///
/// # Errors
/// `(key, problem)` for the first unusable value.
pub fn validate(
    m: &Manifest,
) -> std::result::Result<(InputPlan, OutputPlan), (&'static str, String)> {
    if m.name.is_empty()
        || !m
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err((
            "name",
            format!("{:?} must use letters, digits, '-', '_', '.'", m.name),
        ));
    }
    if parse_version(&m.version).is_none() {
        return Err((
            "version",
            format!("{:?} is not MAJOR.MINOR.PATCH", m.version),
        ));
    }
    if m.sha256.len() != 64 || !m.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(("sha256", "must be 64 hex digits".into()));
    }
    let i = &m.input;
    if !(1..=65_536).contains(&i.window) {
        return Err(("input.window", "must be between 1 and 65536".into()));
    }
    if !(1..=i.window).contains(&i.hop) {
        return Err(("input.hop", "must be between 1 and input.window".into()));
    }
    if !(1..=1024).contains(&i.batch_size) {
        return Err(("input.batch_size", "must be between 1 and 1024".into()));
    }
    if i.reorder_readings > 1024 {
        return Err(("input.reorder_readings", "must be at most 1024".into()));
    }
    let nan_policy = match i.nan_policy.as_str() {
        "skip" => NanPolicy::Skip,
        "impute" => NanPolicy::Impute,
        other => {
            return Err((
                "input.nan_policy",
                format!("{other:?} is not one of \"skip\", \"impute\""),
            ));
        }
    };
    let accept_late = match i.late_policy.as_str() {
        "drop" => false,
        "accept" => true,
        other => {
            return Err((
                "input.late_policy",
                format!("{other:?} is not one of \"drop\", \"accept\""),
            ));
        }
    };
    let layout = Layout::parse(&i.layout).ok_or_else(|| {
        (
            "input.layout",
            format!(
                "{:?} is not one of \"flat\", \"channels_first\", \"channels_last\"",
                i.layout
            ),
        )
    })?;
    if i.features.is_empty() || i.features.len() > 256 {
        return Err((
            "input.features",
            "must list between 1 and 256 features".into(),
        ));
    }
    let b = &m.baseline;
    if b.features.len() != i.features.len() {
        return Err((
            "baseline.features",
            format!(
                "has {} entries, input.features has {}",
                b.features.len(),
                i.features.len()
            ),
        ));
    }
    let mut features = Vec::with_capacity(i.features.len());
    for (ix, (f, fb)) in i.features.iter().zip(&b.features).enumerate() {
        if f.stream.is_empty() || f.field.is_empty() {
            return Err((
                "input.features.stream",
                format!("feature {ix}: stream and field must not be empty"),
            ));
        }
        if i.features[..ix]
            .iter()
            .any(|g| g.stream == f.stream && g.field == f.field)
        {
            return Err((
                "input.features",
                format!("{}.{} is listed twice", f.stream, f.field),
            ));
        }
        if fb.stream != f.stream || fb.field != f.field {
            return Err((
                "baseline.features",
                format!(
                    "entry {ix} is {}.{}, input.features[{ix}] is {}.{}",
                    fb.stream, fb.field, f.stream, f.field
                ),
            ));
        }
        for v in [fb.mean, fb.std, fb.min, fb.max] {
            finite("baseline.features", v)?;
        }
        if fb.std < 0.0 || fb.min > fb.max || fb.mean < fb.min || fb.mean > fb.max {
            return Err((
                "baseline.features",
                format!(
                    "{}.{}: needs std >= 0 and min <= mean <= max",
                    f.stream, f.field
                ),
            ));
        }
        let check_unused = |used: &[&str]| -> std::result::Result<(), Invalid> {
            for (name, set) in [
                ("mean", f.mean.is_some()),
                ("std", f.std.is_some()),
                ("min", f.min.is_some()),
                ("max", f.max.is_some()),
                ("stats", !f.stats.is_empty()),
            ] {
                if set && !used.contains(&name) {
                    return Err((
                        "input.features",
                        format!(
                            "{}.{}: {name} does not apply to transform {:?}",
                            f.stream, f.field, f.transform
                        ),
                    ));
                }
            }
            Ok(())
        };
        let transform = match f.transform.as_str() {
            "raw" => {
                check_unused(&[])?;
                Transform::Raw
            }
            "zscore" => {
                check_unused(&["mean", "std"])?;
                let mean = required("input.features.mean", f.mean, "for transform \"zscore\"")?;
                let std = required("input.features.std", f.std, "for transform \"zscore\"")?;
                if std <= 0.0 {
                    return Err(("input.features.std", "must be positive".into()));
                }
                Transform::ZScore { mean, std }
            }
            "minmax" => {
                check_unused(&["min", "max"])?;
                let min = required("input.features.min", f.min, "for transform \"minmax\"")?;
                let max = required("input.features.max", f.max, "for transform \"minmax\"")?;
                if max <= min {
                    return Err((
                        "input.features.max",
                        "must be above input.features.min".into(),
                    ));
                }
                Transform::MinMax { min, max }
            }
            "stats" => {
                check_unused(&["stats"])?;
                if f.stats.is_empty() {
                    return Err((
                        "input.features.stats",
                        "must list at least one statistic for transform \"stats\"".into(),
                    ));
                }
                let mut stats = Vec::new();
                for s in &f.stats {
                    stats.push(Stat::parse(s).ok_or_else(|| {
                        (
                            "input.features.stats",
                            format!(
                                "{s:?} is not one of \"mean\", \"std\", \"min\", \"max\", \"slope\""
                            ),
                        )
                    })?);
                }
                Transform::Stats(stats)
            }
            other => {
                return Err((
                    "input.features.transform",
                    format!("{other:?} is not one of \"raw\", \"zscore\", \"minmax\", \"stats\""),
                ));
            }
        };
        features.push(Feature {
            stream: f.stream.clone(),
            field: f.field.clone(),
            transform,
            baseline_mean: fb.mean,
        });
    }
    // Design: refusing per-window statistics is what makes a rank-3 row hold
    // exactly fields x window values (every other transform yields one value
    // per time step), so `tensor_shape` always covers `row_width`.
    if layout != Layout::Flat
        && let Some(f) = features
            .iter()
            .find(|f| matches!(f.transform, Transform::Stats(_)))
    {
        return Err((
            "input.layout",
            format!(
                "{:?} needs one value per time step from every feature, but {}.{} uses transform \"stats\" (use \"raw\", \"zscore\" or \"minmax\", or layout \"flat\")",
                layout.name(),
                f.stream,
                f.field
            ),
        ));
    }
    let input = InputPlan {
        features,
        window: i.window,
        hop: i.hop,
        batch_size: i.batch_size,
        max_gap_ms: i.max_gap_ms,
        reorder_readings: i.reorder_readings,
        accept_late,
        nan_policy,
        layout,
    };

    let o = &m.output;
    let alert_below = match o.alert_when.as_str() {
        "above" => false,
        "below" => true,
        other => {
            return Err((
                "output.alert_when",
                format!("{other:?} is not one of \"above\", \"below\""),
            ));
        }
    };
    let classes_only = !o.labels.is_empty() || !o.alert_labels.is_empty() || o.softmax;
    let regression_only = o.scale.is_some() || o.offset.is_some();
    let (kind, threshold) = match o.kind.as_str() {
        "anomaly_score" | "regression" if classes_only => {
            return Err((
                "output.labels",
                format!(
                    "labels, alert_labels and softmax apply to class_probabilities, not {:?}",
                    o.kind
                ),
            ));
        }
        "anomaly_score" if regression_only => {
            return Err((
                "output.scale",
                "scale and offset apply to regression only".into(),
            ));
        }
        "anomaly_score" => (
            OutputKind::AnomalyScore,
            required(
                "output.threshold",
                o.threshold,
                "for kind \"anomaly_score\"",
            )?,
        ),
        "regression" => (
            OutputKind::Regression {
                scale: finite("output.scale", o.scale.unwrap_or(1.0))?,
                offset: finite("output.offset", o.offset.unwrap_or(0.0))?,
            },
            required("output.threshold", o.threshold, "for kind \"regression\"")?,
        ),
        "class_probabilities" => {
            if regression_only {
                return Err((
                    "output.scale",
                    "scale and offset apply to regression only".into(),
                ));
            }
            if o.labels.len() < 2 {
                return Err((
                    "output.labels",
                    "class_probabilities needs at least 2 labels".into(),
                ));
            }
            if o.labels
                .iter()
                .enumerate()
                .any(|(ix, l)| o.labels[..ix].contains(l))
            {
                return Err(("output.labels", "labels must be unique".into()));
            }
            let mut alert = Vec::new();
            for l in &o.alert_labels {
                let ix = o.labels.iter().position(|x| x == l).ok_or_else(|| {
                    (
                        "output.alert_labels",
                        format!("{l:?} is not in output.labels"),
                    )
                })?;
                alert.push(ix);
            }
            (
                OutputKind::Classes {
                    labels: o.labels.clone(),
                    alert,
                    softmax: o.softmax,
                },
                finite("output.threshold", o.threshold.unwrap_or(0.5))?,
            )
        }
        other => {
            return Err((
                "output.kind",
                format!(
                    "{other:?} is not one of \"anomaly_score\", \"class_probabilities\", \"regression\""
                ),
            ));
        }
    };
    let output = OutputPlan {
        kind,
        threshold,
        alert_below,
    };
    for (key, v) in [
        ("baseline.score_p50", b.score_p50),
        ("baseline.score_p99", b.score_p99),
    ] {
        if let Some(v) = v {
            finite(key, v)?;
        }
    }

    if m.golden.is_empty() {
        return Err(("golden", "at least one golden pair is required".into()));
    }
    let width = input.row_width();
    for (ix, g) in m.golden.iter().enumerate() {
        if g.input.len() != width {
            return Err((
                "golden.input",
                format!(
                    "pair {ix} has {} values, the input row has {width}",
                    g.input.len()
                ),
            ));
        }
        let expected = match (&g.output, g.score) {
            (Some(o), None) => o.len(),
            (None, Some(_)) => 1,
            _ => {
                return Err((
                    "golden.output",
                    format!("pair {ix} needs exactly one of score and output"),
                ));
            }
        };
        if expected != output.width() {
            return Err((
                "golden.output",
                format!(
                    "pair {ix} has {expected} values, the output row has {}",
                    output.width()
                ),
            ));
        }
        if g.input
            .iter()
            .chain(g.expected().iter())
            .any(|v| !v.is_finite())
        {
            return Err((
                "golden.input",
                format!("pair {ix} holds a non-finite value"),
            ));
        }
    }
    Ok((input, output))
}

/// Parses `MAJOR.MINOR.PATCH`.
#[must_use]
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.split('.').map(str::parse::<u64>);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Ok(a)), Some(Ok(b)), Some(Ok(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp")
    }

    fn copy_shipped() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in ["model.toml", "model.onnx"] {
            std::fs::copy(shipped().join(f), dir.path().join(f)).unwrap();
        }
        dir
    }

    #[test]
    fn shipped_package_reads() {
        let p = Package::read(&shipped()).unwrap();
        assert_eq!(p.manifest.name, "nab-machine-temp");
        assert_eq!(p.manifest.input.window, p.manifest.golden[0].input.len());
    }

    #[test]
    fn tampered_model_is_refused() {
        let dir = copy_shipped();
        let path = dir.path().join("model.onnx");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Package::read(dir.path()),
            Err(PackageError::HashMismatch { .. })
        ));
    }

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
    }

    /// Copies package `name` to a temp dir with `edit` applied to its manifest.
    fn edited(name: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            models().join(name).join("model.onnx"),
            dir.path().join("model.onnx"),
        )
        .unwrap();
        let text = std::fs::read_to_string(models().join(name).join("model.toml")).unwrap();
        std::fs::write(dir.path().join("model.toml"), edit(text)).unwrap();
        dir
    }

    fn refusal(dir: &tempfile::TempDir) -> String {
        Package::read(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn rank_3_packages_read_with_their_layout() {
        let cnn = Package::read(&models().join("wave-cnn")).unwrap();
        assert_eq!(cnn.input.layout, Layout::ChannelsFirst);
        assert_eq!(cnn.input.tensor_shape(1), vec![1, 1, 64]);
        let lstm = Package::read(&models().join("motor-lstm")).unwrap();
        assert_eq!(lstm.input.layout, Layout::ChannelsLast);
        assert_eq!(lstm.input.tensor_shape(4), vec![4, 32, 3]);
        assert_eq!(lstm.manifest.golden[0].input.len(), 96);
        // No `layout` key: flat, as before the key existed.
        assert_eq!(
            Package::read(&shipped()).unwrap().input.layout,
            Layout::Flat
        );
    }

    #[test]
    fn layout_refusals_name_the_key() {
        let unknown = edited("wave-cnn", |t| {
            t.replace("layout = \"channels_first\"", "layout = \"time_major\"")
        });
        let err = refusal(&unknown);
        assert!(err.contains("input.layout"), "{err}");
        assert!(err.contains("\"time_major\" is not one of"), "{err}");

        // Per-window statistics have no time axis to lay out.
        for layout in ["channels_first", "channels_last"] {
            let stats = edited("machine-state", |t| {
                t.replace("[input]\n", &format!("[input]\nlayout = \"{layout}\"\n"))
            });
            let err = refusal(&stats);
            assert!(err.contains("input.layout"), "{err}");
            assert!(
                err.contains("vibration.rms uses transform \"stats\""),
                "{err}"
            );
        }
        // The same package is fine flat, spelled out.
        let flat = edited("machine-state", |t| {
            t.replace("[input]\n", "[input]\nlayout = \"flat\"\n")
        });
        Package::read(flat.path()).unwrap();
    }

    #[test]
    fn rank_3_golden_rows_must_hold_fields_times_window_values() {
        // motor-lstm: 3 features x window 32 = 96 values per golden row; a
        // row of one time step too few is refused.
        let short = edited("motor-lstm", |t| {
            let at = t.find("input = [").unwrap();
            let end = at + t[at..].find(", ").unwrap();
            format!("{}input = [{}", &t[..at], &t[end + 2..])
        });
        let err = refusal(&short);
        assert!(
            err.contains("golden.input: pair 0 has 95 values, the input row has 96"),
            "{err}"
        );
    }

    #[test]
    fn bad_manifest_values_name_the_key() {
        let dir = copy_shipped();
        let path = dir.path().join("model.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("hop = 6", "hop = 0")).unwrap();
        let err = Package::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("input.hop"), "{err}");
        std::fs::write(&path, text.replace("[input]", "[input]\nsurprise = 1")).unwrap();
        let err = format!(
            "{:#}",
            anyhow::Error::from(Package::read(dir.path()).unwrap_err())
        );
        assert!(err.contains("surprise"), "{err}");
    }
}
