//! Model packages (`docs/model-package.md`): writing `model.toml` next to
//! `model.onnx`, and verifying a package directory the way the agent loads
//! it (sha256, tract through `edge_onnx_ml::onnx_with_ml()`, golden pairs
//! within `1e-3 + 1e-4·|expected|`).
//!
//! Owns the manifest's serialized form for the families this crate trains.
//! Publishing is atomic: [`publish`] writes into a hidden sibling, verifies
//! it there, then renames it to the final directory, so a package directory
//! that exists has passed verification.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::onnx::{OnnxError, Runner};

/// Result alias for this module.
pub type Result<T, E = PackageError> = std::result::Result<T, E>;

/// Golden tolerance, absolute part (as the agent).
pub const GOLDEN_ABS_TOL: f32 = 1e-3;
/// Golden tolerance, relative part (as the agent).
pub const GOLDEN_REL_TOL: f32 = 1e-4;

/// Why a package could not be written or failed verification.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// A file could not be read or written.
    #[error("cannot access {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The target directory already exists.
    #[error("package directory {} already exists", path.display())]
    Exists {
        /// The directory.
        path: PathBuf,
    },
    /// The manifest could not be serialized.
    #[error("cannot serialize model.toml")]
    Serialize(#[source] toml::ser::Error),
    /// The manifest does not parse.
    #[error("invalid model.toml in {}", dir.display())]
    Manifest {
        /// The package directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// `model.onnx` does not hash to the manifest's `sha256`.
    #[error("sha256 mismatch for model.onnx: manifest says {expected}, file is {actual}")]
    HashMismatch {
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
    /// The manifest has no golden pairs, or rows of different widths.
    #[error("manifest golden pairs unusable: {problem}")]
    Golden {
        /// What is wrong.
        problem: &'static str,
    },
    /// tract failed on the graph.
    #[error("model.onnx failed in tract")]
    Tract(#[source] OnnxError),
    /// A golden pair was not reproduced.
    #[error(
        "golden pair {index} not reproduced: model gave {actual:?}, manifest says {expected:?}"
    )]
    GoldenMismatch {
        /// Position of the pair (0-based).
        index: usize,
        /// From tract.
        actual: Vec<f32>,
        /// From the manifest.
        expected: Vec<f32>,
    },
}

/// `model.toml` as this crate writes it (a subset of the format).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Model name.
    pub name: String,
    /// `MAJOR.MINOR.PATCH`.
    pub version: String,
    /// sha256 of `model.onnx`.
    pub sha256: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `[input]`.
    pub input: Input,
    /// `[output]`.
    pub output: Output,
    /// `[baseline]`.
    pub baseline: Baseline,
    /// `[[golden]]`.
    #[serde(default)]
    pub golden: Vec<Golden>,
}

/// `[input]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Input {
    /// ONNX input name.
    pub tensor: String,
    /// Time steps per window.
    pub window: usize,
    /// Steps between windows.
    pub hop: usize,
    /// Rows per tract run.
    #[serde(default = "one")]
    pub batch_size: usize,
    /// `drop` or `accept`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_policy: Option<String>,
    /// `skip` or `impute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nan_policy: Option<String>,
    /// `[[input.features]]`.
    pub features: Vec<Feature>,
}

fn one() -> usize {
    1
}

/// `[[input.features]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feature {
    /// Stream.
    pub stream: String,
    /// Field.
    pub field: String,
    /// `raw` or `stats` here.
    pub transform: String,
    /// Statistics of a `stats` feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Vec<String>>,
}

/// `[output]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Output {
    /// ONNX output name.
    pub tensor: String,
    /// `anomaly_score` or `class_probabilities` here.
    pub kind: String,
    /// Alert threshold.
    pub threshold: f64,
    /// Class labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// Labels that alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_labels: Option<Vec<String>>,
}

/// `[baseline]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    /// Median score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_p50: Option<f64>,
    /// 99th percentile score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_p99: Option<f64>,
    /// One per input feature.
    pub features: Vec<BaselineFeature>,
}

/// `[[baseline.features]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaselineFeature {
    /// Stream.
    pub stream: String,
    /// Field.
    pub field: String,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

/// `[[golden]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Golden {
    /// One input row.
    pub input: Vec<f32>,
    /// Expected single output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// Expected outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Vec<f32>>,
}

impl Golden {
    fn expected(&self) -> Vec<f32> {
        self.output
            .clone()
            .or_else(|| self.score.map(|s| vec![s]))
            .unwrap_or_default()
    }
}

/// Lowercase hex sha256 of `bytes`.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the manifest of the package in `dir`.
///
/// # Errors
/// [`PackageError::Io`] or [`PackageError::Manifest`].
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("model.toml");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    toml::from_str(&text).map_err(|source| PackageError::Manifest {
        dir: dir.to_owned(),
        source,
    })
}

/// Checks the package in `dir` as the agent loads it: manifest parses,
/// sha256 matches, tract loads the graph for `[1, width]`, every golden
/// pair is reproduced and finite. Returns the number of golden pairs.
///
/// # Errors
/// The first check that fails.
pub fn verify(dir: &Path) -> Result<usize> {
    let manifest = read_manifest(dir)?;
    let path = dir.join("model.onnx");
    let onnx = std::fs::read(&path).map_err(io_err(&path))?;
    let actual = sha256_hex(&onnx);
    if actual != manifest.sha256 {
        return Err(PackageError::HashMismatch {
            expected: manifest.sha256,
            actual,
        });
    }
    let width = manifest
        .golden
        .first()
        .map(|g| g.input.len())
        .ok_or(PackageError::Golden {
            problem: "no [[golden]] pair",
        })?;
    if width == 0 || manifest.golden.iter().any(|g| g.input.len() != width) {
        return Err(PackageError::Golden {
            problem: "rows must be non-empty and of one width",
        });
    }
    let runner = Runner::load(&onnx, width).map_err(PackageError::Tract)?;
    for (index, golden) in manifest.golden.iter().enumerate() {
        let actual = runner.run(&golden.input).map_err(PackageError::Tract)?;
        let expected = golden.expected();
        let ok = actual.len() == expected.len()
            && actual.iter().zip(&expected).all(|(a, e)| {
                a.is_finite() && (a - e).abs() <= GOLDEN_ABS_TOL + GOLDEN_REL_TOL * e.abs()
            });
        if !ok {
            return Err(PackageError::GoldenMismatch {
                index,
                actual,
                expected,
            });
        }
    }
    Ok(manifest.golden.len())
}

/// Writes `manifest` and `onnx` into a hidden sibling of `dir`, verifies
/// it there, and renames it to `dir` (which must not exist). On any
/// failure nothing is left at `dir` and the sibling is removed.
///
/// # Errors
/// [`PackageError::Exists`], an I/O error, or a verification failure.
pub fn publish(dir: &Path, manifest: &Manifest, onnx: &[u8]) -> Result<usize> {
    if dir.exists() {
        return Err(PackageError::Exists {
            path: dir.to_owned(),
        });
    }
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let leaf = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".incoming-{leaf}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = write_and_verify(&staging, manifest, onnx).and_then(|golden| {
        std::fs::rename(&staging, dir).map_err(io_err(dir))?;
        Ok(golden)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn write_and_verify(staging: &Path, manifest: &Manifest, onnx: &[u8]) -> Result<usize> {
    std::fs::create_dir_all(staging).map_err(io_err(staging))?;
    let text = format!(
        "# Model package manifest (docs/model-package.md), written by edge-retrain {}.\n{}",
        env!("CARGO_PKG_VERSION"),
        toml::to_string(manifest).map_err(PackageError::Serialize)?
    );
    let toml_path = staging.join("model.toml");
    std::fs::write(&toml_path, text).map_err(io_err(&toml_path))?;
    let onnx_path = staging.join("model.onnx");
    std::fs::write(&onnx_path, onnx).map_err(io_err(&onnx_path))?;
    verify(staging)
}
