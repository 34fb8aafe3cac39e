//! Fixture reading and comparison against onnxruntime's recorded outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edge_onnx_ml::onnx_with_ml;
use serde::Deserialize;
use tract_onnx::tract_hir::internal::*;

/// Floats match when `|tract - ort| <= REL_TOL * |ort| + ABS_TOL`.
pub const REL_TOL: f64 = 1e-4;
/// See [`REL_TOL`]; keeps values that are zero up to rounding comparable.
pub const ABS_TOL: f64 = 1e-5;

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fixtures")
}

#[derive(Debug, Deserialize)]
pub struct Fixture {
    pub model: String,
    pub about: String,
    pub inputs: BTreeMap<String, Json>,
    pub outputs: Vec<Json>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Json {
    #[serde(default)]
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<serde_json::Value>,
}

impl Json {
    /// The first row (index 0 of the first axis), keeping the axis.
    pub fn first_row(&self) -> Json {
        let mut shape = self.shape.clone();
        let per_row: usize = shape.iter().skip(1).product();
        if let Some(n) = shape.first_mut() {
            *n = 1;
        }
        Json {
            name: self.name.clone(),
            dtype: self.dtype.clone(),
            shape,
            data: self.data[..per_row].to_vec(),
        }
    }

    pub fn to_tensor(&self) -> Tensor {
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        let i = |v: &serde_json::Value| v.as_i64().expect("integer fixture value");
        match self.dtype.as_str() {
            "float32" => {
                let d: Vec<f32> = self.data.iter().map(|v| f(v) as f32).collect();
                Tensor::from_shape(&self.shape, &d).unwrap()
            }
            "float64" => {
                let d: Vec<f64> = self.data.iter().map(f).collect();
                Tensor::from_shape(&self.shape, &d).unwrap()
            }
            "int64" => {
                let d: Vec<i64> = self.data.iter().map(i).collect();
                Tensor::from_shape(&self.shape, &d).unwrap()
            }
            "int32" => {
                let d: Vec<i32> = self
                    .data
                    .iter()
                    .map(|v| i32::try_from(i(v)).expect("int32 fixture value"))
                    .collect();
                Tensor::from_shape(&self.shape, &d).unwrap()
            }
            "string" => {
                let d: Vec<String> = self
                    .data
                    .iter()
                    .map(|v| v.as_str().expect("string fixture value").to_owned())
                    .collect();
                tract_ndarray::ArrayD::from_shape_vec(self.shape.clone(), d)
                    .unwrap()
                    .into_tensor()
            }
            other => panic!("fixture dtype {other} not handled"),
        }
    }
}

pub fn read(name: &str) -> Fixture {
    let path = fixtures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Loads the fixture's model with the given inputs' shapes and runs it.
pub fn run(fx: &Fixture, inputs: &BTreeMap<String, Json>) -> TractResult<TVec<TValue>> {
    let path = fixtures_dir().join(&fx.model);
    let mut model = onnx_with_ml().model_for_path(&path)?;
    let outlets = model.input_outlets()?.to_vec();
    let mut values = TVec::new();
    for (ix, o) in outlets.iter().enumerate() {
        let name = model.node(o.node).name.clone();
        let t = inputs
            .get(&name)
            .unwrap_or_else(|| panic!("fixture has no input {name}"))
            .to_tensor();
        model.set_input_fact(ix, t.datum_type().fact(t.shape()).into())?;
        values.push(t.into_tvalue());
    }
    let plan = model.into_optimized()?.into_runnable()?;
    plan.run(values)
}

/// Compares tract's outputs with onnxruntime's; returns every mismatch.
pub fn compare(got: &[TValue], want: &[Json]) -> Vec<String> {
    compare_tol(got, want, ABS_TOL)
}

/// [`compare`] with another absolute tolerance for floats.
pub fn compare_tol(got: &[TValue], want: &[Json], abs_tol: f64) -> Vec<String> {
    let mut problems = Vec::new();
    if got.len() != want.len() {
        problems.push(format!(
            "{} outputs, onnxruntime has {}",
            got.len(),
            want.len()
        ));
        return problems;
    }
    for (g, w) in got.iter().zip(want) {
        if g.shape() != w.shape.as_slice() {
            problems.push(format!(
                "{}: shape {:?}, onnxruntime {:?}",
                w.name,
                g.shape(),
                w.shape
            ));
            continue;
        }
        match w.dtype.as_str() {
            "float32" | "float64" => {
                let g = g.cast_to::<f64>().unwrap();
                let g = g
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f64>()
                    .unwrap()
                    .to_vec();
                let mut bad = 0;
                let mut first = None;
                for (k, (a, b)) in g.iter().zip(&w.data).enumerate() {
                    let ok = match b.as_f64() {
                        Some(b) => (a - b).abs() <= REL_TOL * b.abs() + abs_tol,
                        None => a.is_nan(),
                    };
                    if !ok {
                        bad += 1;
                        first.get_or_insert((k, *a, b.clone()));
                    }
                }
                if let Some((k, a, b)) = first {
                    problems.push(format!(
                        "{}: {bad} of {} values differ, first at {k}: tract {a}, onnxruntime {b}",
                        w.name,
                        g.len()
                    ));
                }
            }
            "int64" | "int32" => {
                let g = g.cast_to::<i64>().unwrap();
                let g = g
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<i64>()
                    .unwrap()
                    .to_vec();
                let want: Vec<i64> = w.data.iter().map(|v| v.as_i64().unwrap()).collect();
                let bad = g.iter().zip(&want).filter(|(a, b)| a != b).count();
                if bad > 0 {
                    problems.push(format!(
                        "{}: {bad} of {} labels differ: tract {g:?}, onnxruntime {want:?}",
                        w.name,
                        g.len()
                    ));
                }
            }
            "string" => {
                let g = g
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<String>()
                    .unwrap()
                    .to_vec();
                let want: Vec<&str> = w.data.iter().map(|v| v.as_str().unwrap()).collect();
                let bad = g.iter().zip(&want).filter(|(a, b)| a != *b).count();
                if bad > 0 {
                    problems.push(format!(
                        "{}: {bad} of {} strings differ: tract {g:?}, onnxruntime {want:?}",
                        w.name,
                        g.len()
                    ));
                }
            }
            other => problems.push(format!("{}: dtype {other} not handled", w.name)),
        }
    }
    problems
}

/// Runs the fixture batched and on its first row alone; panics listing
/// every mismatch.
pub fn check(name: &str) {
    check_tol(name, ABS_TOL);
}

/// [`check`] with another absolute tolerance for floats.
pub fn check_tol(name: &str, abs_tol: f64) {
    let fx = read(name);
    let mut problems = Vec::new();
    match run(&fx, &fx.inputs) {
        Ok(out) => problems.extend(
            compare_tol(&out, &fx.outputs, abs_tol)
                .into_iter()
                .map(|p| format!("batch: {p}")),
        ),
        Err(e) => problems.push(format!("batch: tract failed: {e:#}")),
    }
    let first: BTreeMap<String, Json> = fx
        .inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.first_row()))
        .collect();
    let want: Vec<Json> = fx.outputs.iter().map(Json::first_row).collect();
    match run(&fx, &first) {
        Ok(out) => problems.extend(
            compare_tol(&out, &want, abs_tol)
                .into_iter()
                .map(|p| format!("row 0: {p}")),
        ),
        Err(e) => problems.push(format!("row 0: tract failed: {e:#}")),
    }
    assert!(
        problems.is_empty(),
        "{name} ({}):\n  {}",
        fx.about,
        problems.join("\n  ")
    );
}

/// Runs an operator builder on a parsing context of `onnx_with_ml()` at
/// ONNX opset `opset` (for node-level tests without a whole model).
pub fn with_parsing_context<T>(
    opset: i64,
    f: impl FnOnce(&tract_onnx::model::ParsingContext) -> TractResult<T>,
) -> TractResult<T> {
    let onnx = edge_onnx_ml::onnx_with_ml();
    let proto = tract_onnx::pb::ModelProto::default();
    let ctx = tract_onnx::model::ParsingContext {
        onnx_operator_set_version: opset,
        framework: &onnx,
        model: &proto,
        parent_graphs: vec![],
        model_dir: None,
        template: InferenceModel::default(),
    };
    f(&ctx)
}
