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

/// `[input]`: which stream feeds the model and how windows are cut.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// ONNX input tensor name.
    pub tensor: String,
    /// Stream name to read (any source device).
    pub stream: String,
    /// Field within the reading's values.
    pub field: String,
    /// Readings per window.
    pub window: usize,
    /// Readings between consecutive windows.
    pub hop: usize,
    /// Feature transform; only `raw` (the window as is) so far.
    pub transform: String,
}

/// `[output]`: what the model's output means.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// ONNX output tensor name.
    pub tensor: String,
    /// Only `anomaly_score` so far: one score per window, higher is worse.
    pub kind: String,
    /// Scores above this are anomalies.
    pub threshold: f64,
}

/// `[baseline]`: statistics of the training data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// Mean of the input field.
    pub mean: f64,
    /// Standard deviation of the input field.
    pub std: f64,
    /// Minimum of the input field.
    pub min: f64,
    /// Maximum of the input field.
    pub max: f64,
    /// Median training score.
    pub score_p50: f64,
    /// 99th percentile training score.
    pub score_p99: f64,
}

/// `[[golden]]`: an input window and the score the model must reproduce.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    /// Input window, `input.window` values.
    pub input: Vec<f32>,
    /// Expected score (from onnxruntime at packaging time).
    pub score: f32,
}

/// A package whose manifest parsed and whose ONNX bytes match its hash.
#[derive(Debug, Clone)]
pub struct Package {
    /// Directory it came from.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
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
        validate(&manifest, &manifest_path)?;

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
            onnx,
        })
    }
}

fn validate(m: &Manifest, path: &Path) -> Result<()> {
    let bad = |key: &'static str, problem: String| {
        Err(PackageError::Invalid {
            path: path.to_owned(),
            key,
            problem,
        })
    };
    if m.name.is_empty()
        || !m
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return bad(
            "name",
            format!("{:?} must use letters, digits, '-', '_', '.'", m.name),
        );
    }
    let parts: Vec<&str> = m.version.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.parse::<u64>().is_err()) {
        return bad(
            "version",
            format!("{:?} is not MAJOR.MINOR.PATCH", m.version),
        );
    }
    if m.sha256.len() != 64 || !m.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        return bad("sha256", "must be 64 hex digits".into());
    }
    if !(1..=65_536).contains(&m.input.window) {
        return bad("input.window", "must be between 1 and 65536".into());
    }
    if !(1..=m.input.window).contains(&m.input.hop) {
        return bad("input.hop", "must be between 1 and input.window".into());
    }
    if m.input.transform != "raw" {
        return bad(
            "input.transform",
            format!(
                "{:?} is not supported (supported: \"raw\")",
                m.input.transform
            ),
        );
    }
    if m.output.kind != "anomaly_score" {
        return bad(
            "output.kind",
            format!(
                "{:?} is not supported (supported: \"anomaly_score\")",
                m.output.kind
            ),
        );
    }
    if !m.output.threshold.is_finite() {
        return bad("output.threshold", "must be a finite number".into());
    }
    if m.golden.is_empty() {
        return bad("golden", "at least one golden pair is required".into());
    }
    for g in &m.golden {
        if g.input.len() != m.input.window {
            return bad(
                "golden.input",
                format!(
                    "has {} values, input.window is {}",
                    g.input.len(),
                    m.input.window
                ),
            );
        }
    }
    Ok(())
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
