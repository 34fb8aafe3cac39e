//! Package validation before anything is registered: the checks the agent
//! runs when it loads a package (`docs/model-package.md`), in the same order,
//! so a package the registry accepts is one the agent will run.
//!
//! Design: cloud-sync cannot depend on `edge-agent` (the agent's `demo`
//! feature depends on cloud-sync: a cycle), so this module re-implements the
//! package-level checks on the agent's own loader, `edge-onnx-ml`:
//! 1. `model.toml` parses and names the model (`name`, `version`
//!    `MAJOR.MINOR.PATCH`, `sha256`), `input.tensor`, `output.tensor`,
//!    `input.layout` (`flat`, the default, `channels_first` or
//!    `channels_last`) and at least one `[[golden]]` pair; with a rank-3
//!    layout every golden row holds `fields x window` values (`fields` = the
//!    `[[input.features]]` entries, `window` = `input.window`);
//! 2. `model.onnx` is at most [`MAX_MODEL_BYTES`] and its sha256 equals
//!    `sha256` (before tract parses anything);
//! 3. tract loads the graph with the ML operators: one input named
//!    `input.tensor` whose declared rank and fixed non-batch dimensions
//!    agree with the layout, an output named `output.tensor`, optimized for
//!    a batch-1 float32 input of the layout's shape: `[1, width]` (`width` =
//!    the golden rows' length), `[1, fields, window]` or
//!    `[1, window, fields]`;
//! 4. every golden row reproduces its `output` (or `score`) within
//!    `1e-3 + 1e-4 * |expected|`, and all outputs are finite. Golden rows
//!    are written in feature order (`[fields][window]`, which is already the
//!    `channels_first` order) and transposed here for `channels_last`, as
//!    the agent lays out its rows.
//!
//! The agent's finer manifest rules (feature transforms, output kinds,
//! baselines) are not repeated here; it still checks them when it loads the
//! downloaded package. A tract panic is caught and reported as a refusal.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use sync_protocol::layout::{InputShape, Layout};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid as _;

/// Largest `model.onnx` accepted (as the agent).
pub const MAX_MODEL_BYTES: u64 = 256 * 1024 * 1024;
/// Largest `model.toml` accepted.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// Golden tolerance: absolute part.
pub const GOLDEN_ABS_TOL: f32 = 1e-3;
/// Golden tolerance: relative part.
pub const GOLDEN_REL_TOL: f32 = 1e-4;

/// Result alias for this module.
pub type Result<T, E = ValidationError> = std::result::Result<T, E>;

/// Why a package was refused.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    /// A package file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is over its size limit.
    #[error("{} is {size} bytes, above the {limit}-byte limit", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// `model.toml` is not valid TOML of the package format.
    #[error("invalid manifest {}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A manifest value is unusable.
    #[error("invalid manifest: key `{key}`: {problem}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// `model.onnx` does not hash to the manifest's `sha256`.
    #[error("sha256 mismatch for model.onnx: manifest says {expected}, file is {actual}")]
    HashMismatch {
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
    /// tract refused the graph or it disagrees with the manifest.
    #[error("model.onnx does not load: {message}")]
    Load {
        /// tract's error chain, or the disagreement.
        message: String,
    },
    /// A golden pair was not reproduced.
    #[error("golden pair {index} failed: {problem}")]
    Golden {
        /// Position of the `[[golden]]` entry (0-based).
        index: usize,
        /// What differed.
        problem: String,
    },
}

/// A package that passed every check.
#[derive(Debug, Clone)]
pub struct ValidPackage {
    /// `name`.
    pub name: String,
    /// `version`.
    pub version: String,
    /// sha256 of `model.onnx` (lowercase hex, verified).
    pub model_sha256: String,
    /// The manifest bytes as read.
    pub manifest: Vec<u8>,
    /// The ONNX bytes as read.
    pub onnx: Vec<u8>,
    /// Golden pairs reproduced.
    pub golden: usize,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    name: String,
    version: String,
    sha256: String,
    input: InputRef,
    output: TensorRef,
    #[serde(default)]
    golden: Vec<Golden>,
}

#[derive(Debug, Deserialize)]
struct TensorRef {
    tensor: String,
}

// Design: unknown keys stay ignored (no `deny_unknown_fields`), as before the
// layout keys were read: the agent enforces its own manifest rules on load.
#[derive(Debug, Deserialize)]
struct InputRef {
    tensor: String,
    #[serde(default = "flat")]
    layout: String,
    window: Option<usize>,
    #[serde(default)]
    features: Vec<serde::de::IgnoredAny>,
}

fn flat() -> String {
    "flat".to_owned()
}

#[derive(Debug, Deserialize)]
struct Golden {
    input: Vec<f32>,
    score: Option<f32>,
    output: Option<Vec<f32>>,
}

/// Whether `name` is a valid model name (letters, digits, `-`, `_`, `.`; 1
/// to 128 bytes; not `.` or `..`).
#[must_use]
pub fn is_valid_name(name: &str) -> bool {
    crate::store::is_valid_device_id(name)
}

/// `MAJOR.MINOR.PATCH` as numbers.
#[must_use]
pub fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let mut parts = text.split('.');
    let mut next = || -> Option<u64> {
        let part = parts.next()?;
        let canonical = !part.is_empty()
            && part.bytes().all(|b| b.is_ascii_digit())
            && (part == "0" || !part.starts_with('0'));
        canonical.then(|| part.parse().ok()).flatten()
    };
    let version = (next()?, next()?, next()?);
    parts.next().is_none().then_some(version)
}

fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let read_err = |source| ValidationError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > limit {
        return Err(ValidationError::TooLarge {
            path: path.to_owned(),
            size,
            limit,
        });
    }
    std::fs::read(path).map_err(read_err)
}

/// Validates the package in `dir` (blocking: reads files and runs tract).
///
/// # Errors
/// [`ValidationError`] for the first check that fails.
pub fn validate_dir(dir: &Path) -> Result<ValidPackage> {
    let manifest_path = dir.join("model.toml");
    let manifest_bytes = read_capped(&manifest_path, MAX_MANIFEST_BYTES)?;
    let text = String::from_utf8_lossy(&manifest_bytes);
    let manifest: Manifest = toml::from_str(&text).map_err(|source| ValidationError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    let invalid = |key, problem: &str| ValidationError::Invalid {
        key,
        problem: problem.to_owned(),
    };
    if !is_valid_name(&manifest.name) {
        return Err(invalid(
            "name",
            "must be 1-128 characters from [A-Za-z0-9._-]",
        ));
    }
    if parse_version(&manifest.version).is_none() {
        return Err(invalid("version", "must be MAJOR.MINOR.PATCH"));
    }
    let expected = manifest.sha256.to_ascii_lowercase();
    if !super::artifacts::is_sha256_hex(&expected) {
        return Err(invalid("sha256", "must be 64 hex digits"));
    }
    if manifest.golden.is_empty() {
        return Err(invalid(
            "golden",
            "at least one [[golden]] pair is required",
        ));
    }
    let width = manifest.golden[0].input.len();
    if width == 0 {
        return Err(invalid("golden.input", "must not be empty"));
    }
    if manifest.golden.iter().any(|g| g.input.len() != width) {
        return Err(invalid(
            "golden.input",
            "every row must have the same length",
        ));
    }
    if manifest
        .golden
        .iter()
        .any(|g| g.output.is_none() && g.score.is_none())
    {
        return Err(invalid("golden", "each pair needs `score` or `output`"));
    }
    let shape = input_shape(&manifest.input, width)?;

    let onnx = read_capped(&dir.join("model.onnx"), MAX_MODEL_BYTES)?;
    let actual = hex::encode(Sha256::digest(&onnx));
    if actual != expected {
        return Err(ValidationError::HashMismatch { expected, actual });
    }

    let golden = std::panic::catch_unwind(AssertUnwindSafe(|| run_golden(&manifest, &onnx, shape)))
        .map_err(|panic| ValidationError::Load {
            message: format!(
                "tract panicked: {}",
                panic
                    .downcast_ref::<&str>()
                    .map(ToString::to_string)
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            ),
        })??;
    Ok(ValidPackage {
        name: manifest.name,
        version: manifest.version,
        model_sha256: actual,
        manifest: manifest_bytes,
        onnx,
        golden,
    })
}

/// The golden rows' input shape per `input.layout`.
fn input_shape(input: &InputRef, width: usize) -> Result<InputShape> {
    let layout = Layout::parse(&input.layout).ok_or_else(|| ValidationError::Invalid {
        key: "input.layout",
        problem: format!(
            "{:?} is not one of \"flat\", \"channels_first\", \"channels_last\"",
            input.layout
        ),
    })?;
    if layout == Layout::Flat {
        return Ok(InputShape {
            layout,
            width,
            fields: 1,
            window: width,
        });
    }
    let fields = input.features.len();
    if fields == 0 {
        return Err(ValidationError::Invalid {
            key: "input.features",
            problem: format!(
                "input.layout = {:?} needs at least one [[input.features]] entry",
                layout.name()
            ),
        });
    }
    let window = input
        .window
        .filter(|w| *w > 0)
        .ok_or_else(|| ValidationError::Invalid {
            key: "input.window",
            problem: format!(
                "input.layout = {:?} needs a positive input.window",
                layout.name()
            ),
        })?;
    if fields.checked_mul(window) != Some(width) {
        return Err(ValidationError::Invalid {
            key: "golden.input",
            problem: format!(
                "input.layout = {:?} feeds {fields} feature(s) x window {window} values per row, golden rows hold {width}",
                layout.name()
            ),
        });
    }
    Ok(InputShape {
        layout,
        width,
        fields,
        window,
    })
}

/// Refuses a graph whose declared input disagrees with `shape` (the same
/// check as the agent's, batch dimension aside: the goldens run one row).
fn check_declared(model: &InferenceModel, input_name: &str, shape: InputShape) -> Result<()> {
    let declared = model.input_fact(0).map_err(|e| load_err(&e))?;
    let dims: Vec<Option<i64>> = declared
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_i64().ok()))
        .collect();
    shape
        .check_declared(input_name, &dims, declared.shape.is_open(), None)
        .map_err(|message| ValidationError::Load { message })
}

fn load_err(err: &impl std::fmt::Display) -> ValidationError {
    ValidationError::Load {
        message: format!("{err:#}"),
    }
}

fn run_golden(manifest: &Manifest, onnx: &[u8], shape: InputShape) -> Result<usize> {
    let mut model = edge_onnx_ml::onnx_with_ml()
        .model_for_read(&mut &onnx[..])
        .map_err(|e| load_err(&e))?;
    let inputs = model.input_outlets().map_err(|e| load_err(&e))?.to_vec();
    let [input] = inputs.as_slice() else {
        return Err(ValidationError::Load {
            message: format!("graph has {} inputs, a package feeds 1", inputs.len()),
        });
    };
    let input_name = model.node(input.node).name.clone();
    if input_name != manifest.input.tensor {
        return Err(ValidationError::Load {
            message: format!(
                "graph input is {input_name:?}, manifest input.tensor is {:?}",
                manifest.input.tensor
            ),
        });
    }
    check_declared(&model, &input_name, shape)?;
    let outputs = model.output_outlets().map_err(|e| load_err(&e))?.to_vec();
    let out_ix = outputs
        .iter()
        .position(|o| {
            model.outlet_label(*o) == Some(manifest.output.tensor.as_str())
                || model.node(o.node).name == manifest.output.tensor
        })
        .ok_or_else(|| ValidationError::Load {
            message: format!(
                "graph has no output named {:?} (output.tensor)",
                manifest.output.tensor
            ),
        })?;
    model = model
        .with_input_fact(0, f32::fact(shape.dims(1)).into())
        .map_err(|e| load_err(&e))?;
    let plan = model
        .into_optimized()
        .map_err(|e| load_err(&e))?
        .into_runnable()
        .map_err(|e| load_err(&e))?;
    for (index, golden) in manifest.golden.iter().enumerate() {
        let golden_err = |problem: String| ValidationError::Golden { index, problem };
        let expected = golden
            .output
            .clone()
            .or_else(|| golden.score.map(|s| vec![s]))
            .unwrap_or_default();
        let mut data = Vec::with_capacity(golden.input.len());
        shape.lay_out(&golden.input, &mut data);
        let tensor =
            Tensor::from_shape(&shape.dims(1), &data).map_err(|e| golden_err(e.to_string()))?;
        let outputs = plan
            .run(tvec!(tensor.into()))
            .map_err(|e| golden_err(format!("run failed: {e:#}")))?;
        let out = outputs
            .get(out_ix)
            .ok_or_else(|| golden_err("output missing at run time".to_owned()))?
            .cast_to::<f32>()
            .map_err(|e| golden_err(e.to_string()))?;
        let actual: Vec<f32> = out
            .to_plain_array_view::<f32>()
            .map_err(|e| golden_err(e.to_string()))?
            .iter()
            .copied()
            .collect();
        if actual.len() != expected.len() {
            return Err(golden_err(format!(
                "model gave {} values, expected {}",
                actual.len(),
                expected.len()
            )));
        }
        for (a, e) in actual.iter().zip(&expected) {
            if !a.is_finite() || (a - e).abs() > GOLDEN_ABS_TOL + GOLDEN_REL_TOL * e.abs() {
                return Err(golden_err(format!(
                    "model gave {actual:?}, expected {expected:?}"
                )));
            }
        }
    }
    Ok(manifest.golden.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.2.3"), Some((1, 2, 3)));
        assert_eq!(parse_version("0.10.0"), Some((0, 10, 0)));
        for bad in ["1.2", "1.2.3.4", "01.2.3", "1.x.3", "", "1..3", "-1.2.3"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
    }

    fn shipped(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(name)
    }

    /// A copy of the shipped package `name` with `from` replaced by `to` in
    /// its manifest (which must contain it).
    fn edited(name: &str, from: &str, to: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let src = shipped(name);
        std::fs::copy(src.join("model.onnx"), dir.path().join("model.onnx")).unwrap();
        let text = std::fs::read_to_string(src.join("model.toml")).unwrap();
        assert!(text.contains(from), "{from:?} not in {name}");
        std::fs::write(dir.path().join("model.toml"), text.replacen(from, to, 1)).unwrap();
        let path = dir.path().to_owned();
        (dir, path)
    }

    #[test]
    fn rank_3_packages_validate_with_their_layout() {
        let cnn = validate_dir(&shipped("wave-cnn")).unwrap();
        assert_eq!((cnn.name.as_str(), cnn.golden), ("wave-cnn", 6));
        let lstm = validate_dir(&shipped("motor-lstm")).unwrap();
        assert_eq!((lstm.name.as_str(), lstm.golden), ("motor-lstm", 6));
    }

    #[test]
    fn flat_packages_still_validate() {
        let nab = validate_dir(&shipped("nab-machine-temp")).unwrap();
        assert!(nab.golden > 0);
        let (_dir, explicit) = edited(
            "nab-machine-temp",
            "[input]\n",
            "[input]\nlayout = \"flat\"\n",
        );
        assert_eq!(validate_dir(&explicit).unwrap().golden, nab.golden);
    }

    #[test]
    fn a_flipped_layout_is_refused_naming_the_key() {
        for (name, from, to, text) in [
            (
                "wave-cnn",
                "layout = \"channels_first\"",
                "layout = \"channels_last\"",
                "graph input \"x\" is [?, 1, 64], input.layout = \"channels_last\" feeds [batch, 64, 1]",
            ),
            (
                "motor-lstm",
                "layout = \"channels_last\"",
                "layout = \"channels_first\"",
                "graph input \"x\" is [?, 32, 3], input.layout = \"channels_first\" feeds [batch, 3, 32]",
            ),
            (
                "wave-cnn",
                "layout = \"channels_first\"",
                "layout = \"flat\"",
                "input.layout = \"flat\" feeds [batch, 64]); a rank-3 input needs",
            ),
        ] {
            let (_dir, path) = edited(name, from, to);
            let err = validate_dir(&path).unwrap_err();
            assert!(matches!(err, ValidationError::Load { .. }), "{name}: {err}");
            assert!(err.to_string().contains(text), "{name}: {err}");
        }
        // A rank-2 graph fed a rank-3 layout.
        let (_dir, path) = edited(
            "nab-machine-temp",
            "[input]\n",
            "[input]\nlayout = \"channels_first\"\n",
        );
        let err = validate_dir(&path).unwrap_err();
        assert!(
            err.to_string()
                .contains("input.layout = \"channels_first\" feeds"),
            "{err}"
        );
    }

    #[test]
    fn bad_layout_keys_are_refused_naming_them() {
        let (_dir, path) = edited(
            "wave-cnn",
            "layout = \"channels_first\"",
            "layout = \"time_major\"",
        );
        let err = validate_dir(&path).unwrap_err();
        assert!(
            matches!(
                err,
                ValidationError::Invalid {
                    key: "input.layout",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("key `input.layout`: \"time_major\""),
            "{err}"
        );

        // Rows that do not hold fields x window values.
        let (_dir, path) = edited("motor-lstm", "window = 32", "window = 30");
        let err = validate_dir(&path).unwrap_err();
        assert!(
            matches!(
                err,
                ValidationError::Invalid {
                    key: "golden.input",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("3 feature(s) x window 30"),
            "{err}"
        );

        let (_dir, path) = edited("wave-cnn", "window = 64\n", "");
        let err = validate_dir(&path).unwrap_err();
        assert!(
            matches!(
                err,
                ValidationError::Invalid {
                    key: "input.window",
                    ..
                }
            ),
            "{err}"
        );
    }
}
