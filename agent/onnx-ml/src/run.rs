//! Running any ONNX model on JSON input rows, with no model package around
//! it: the engine of `edge-agent model run MODEL.onnx --input FILE.json`.
//!
//! Input: a JSON array of rows for a model with one input, or an object
//! mapping each input name to its array of rows. A row is a number, string
//! or boolean, or a nested array for inputs of higher rank; the whole array
//! must be rectangular and its nesting gives the tensor's shape (the outer
//! length is the batch). The element type is the model's declared input
//! type (float32 when undeclared, string when the rows are strings);
//! `null` stands for NaN in float inputs.
//!
//! Output: a JSON array with one entry per graph output, in graph order,
//! each nested like the tensor's shape. Non-finite floats print as `null`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tract_onnx::tract_hir::internal::*;

use crate::onnx_with_ml;

/// Why a model could not be run on the given input.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The input is not JSON.
    #[error("input is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// The input is neither an array of rows nor an object of them.
    #[error("input must be a JSON array of rows, or an object mapping input names to arrays")]
    NotRows,
    /// A model with several inputs was given a bare array.
    #[error("the model has {0} inputs: give an object mapping each input name to its rows")]
    NeedNames(usize),
    /// The object lacks one of the model's inputs.
    #[error("no rows for model input {0:?}")]
    MissingInput(String),
    /// The object names something that is not an input.
    #[error("{0:?} is not an input of the model")]
    UnknownInput(String),
    /// The rows of one input cannot form a tensor of its type.
    #[error("input {input:?}: {problem}")]
    BadRows {
        /// The model input.
        input: String,
        /// What is wrong.
        problem: String,
    },
    /// tract refused the model or failed to run it.
    #[error("tract: {0}")]
    Tract(String),
}

/// Result alias for this module.
pub type Result<T, E = RunError> = std::result::Result<T, E>;

fn tract_err(e: &TractError) -> RunError {
    RunError::Tract(format!("{e:#}"))
}

/// Reads the model and the input file (`-` for standard input) and runs
/// the model; see the module documentation for the formats.
///
/// # Errors
/// [`RunError`] naming the file, input or tract failure.
pub fn run_files(model: &Path, input: &Path) -> Result<Value> {
    let text = if input == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(input)
    }
    .map_err(|source| RunError::Read {
        path: input.to_owned(),
        source,
    })?;
    let rows: Value = serde_json::from_str(&text).map_err(RunError::Json)?;
    run_model(model, &rows)
}

/// Runs the ONNX file `model` on the rows in `input`.
///
/// # Errors
/// [`RunError`] naming the input or tract failure.
pub fn run_model(model: &Path, input: &Value) -> Result<Value> {
    if let Err(source) = std::fs::metadata(model) {
        return Err(RunError::Read {
            path: model.to_owned(),
            source,
        });
    }
    let mut m = onnx_with_ml()
        .model_for_path(model)
        .map_err(|e| tract_err(&e))?;
    let outlets = m.input_outlets().map_err(|e| tract_err(&e))?.to_vec();
    let names: Vec<String> = outlets
        .iter()
        .map(|o| m.node(o.node).name.clone())
        .collect();
    let rows: Vec<&Value> = match input {
        Value::Array(_) if names.len() == 1 => vec![input],
        Value::Array(_) => return Err(RunError::NeedNames(names.len())),
        Value::Object(map) => {
            if let Some(k) = map.keys().find(|k| !names.contains(k)) {
                return Err(RunError::UnknownInput(k.clone()));
            }
            names
                .iter()
                .map(|n| map.get(n).ok_or_else(|| RunError::MissingInput(n.clone())))
                .collect::<Result<_>>()?
        }
        _ => return Err(RunError::NotRows),
    };
    let mut tensors = TVec::new();
    for (ix, (name, rows)) in names.iter().zip(rows).enumerate() {
        let declared = m
            .input_fact(ix)
            .map_err(|e| tract_err(&e))?
            .datum_type
            .concretize();
        let t = rows_to_tensor(rows, declared).map_err(|problem| RunError::BadRows {
            input: name.clone(),
            problem,
        })?;
        m.set_input_fact(ix, t.datum_type().fact(t.shape()).into())
            .map_err(|e| tract_err(&e))?;
        tensors.push(t.into_tvalue());
    }
    let plan = m
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(|e| tract_err(&e))?;
    let outputs = plan.run(tensors).map_err(|e| tract_err(&e))?;
    let json = outputs
        .iter()
        .map(|t| tensor_to_json(t))
        .collect::<TractResult<Vec<_>>>()
        .map_err(|e| tract_err(&e))?;
    Ok(Value::Array(json))
}

fn collect<'a>(
    v: &'a Value,
    depth: usize,
    shape: &[usize],
    leaves: &mut Vec<&'a Value>,
) -> Result<(), String> {
    match v {
        Value::Array(items) => {
            if shape.get(depth) != Some(&items.len()) {
                return Err("rows are not rectangular (nested arrays differ in length)".into());
            }
            items
                .iter()
                .try_for_each(|i| collect(i, depth + 1, shape, leaves))
        }
        leaf if depth == shape.len() => {
            leaves.push(leaf);
            Ok(())
        }
        _ => Err("rows are not rectangular (a value where an array was expected)".into()),
    }
}

/// Builds a tensor from nested JSON arrays; `declared` is the model's input
/// type when it declares one.
///
/// # Errors
/// A description of the first problem: ragged nesting, a value of the wrong
/// kind for the type, an unsupported type.
pub fn rows_to_tensor(rows: &Value, declared: Option<DatumType>) -> Result<Tensor, String> {
    let mut shape = Vec::new();
    let mut probe = rows;
    while let Value::Array(items) = probe {
        shape.push(items.len());
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    let mut leaves = Vec::new();
    collect(rows, 0, &shape, &mut leaves)?;
    let dt = declared.unwrap_or(if leaves.first().is_some_and(|v| v.is_string()) {
        DatumType::String
    } else {
        DatumType::F32
    });
    let bad = |v: &Value| format!("{v} is not a valid {dt:?} value");
    #[allow(clippy::cast_possible_truncation)]
    let t = match dt {
        DatumType::F32 | DatumType::F64 | DatumType::F16 => {
            let v = leaves
                .iter()
                .map(|v| match v {
                    Value::Null => Ok(f64::NAN),
                    v => v.as_f64().ok_or_else(|| bad(v)),
                })
                .collect::<Result<Vec<f64>, _>>()?;
            let t = Tensor::from_shape(&shape, &v).map_err(|e| e.to_string())?;
            t.cast_to_dt(dt).map_err(|e| e.to_string())?.into_owned()
        }
        DatumType::I64 | DatumType::I32 | DatumType::I16 | DatumType::I8 | DatumType::U8 => {
            let v = leaves
                .iter()
                .map(|v| v.as_i64().ok_or_else(|| bad(v)))
                .collect::<Result<Vec<i64>, _>>()?;
            let t = Tensor::from_shape(&shape, &v).map_err(|e| e.to_string())?;
            t.cast_to_dt(dt).map_err(|e| e.to_string())?.into_owned()
        }
        DatumType::Bool => {
            let v = leaves
                .iter()
                .map(|v| v.as_bool().ok_or_else(|| bad(v)))
                .collect::<Result<Vec<bool>, _>>()?;
            Tensor::from_shape(&shape, &v).map_err(|e| e.to_string())?
        }
        DatumType::String => {
            let v = leaves
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<String>, _>>()?;
            tract_ndarray::ArrayD::from_shape_vec(shape, v)
                .map_err(|e| e.to_string())?
                .into_tensor()
        }
        dt => return Err(format!("inputs of type {dt:?} are not supported")),
    };
    Ok(t)
}

fn float(v: f64) -> Value {
    if v.is_finite() {
        Value::from(v)
    } else {
        Value::Null
    }
}

/// Shortest decimal that round-trips the f32 (0.1f32 prints as 0.1).
fn float32(v: f32) -> Value {
    if v.is_finite() {
        v.to_string()
            .parse::<f64>()
            .map_or(Value::Null, Value::from)
    } else {
        Value::Null
    }
}

fn nest(flat: Vec<Value>, shape: &[usize]) -> Value {
    match shape {
        [] => flat.into_iter().next().unwrap_or(Value::Null),
        [_] => Value::Array(flat),
        [_, rest @ ..] => {
            let inner: usize = rest.iter().product();
            if inner == 0 {
                return Value::Array(vec![]);
            }
            let mut it = flat.into_iter();
            let mut out = Vec::new();
            loop {
                let chunk: Vec<Value> = it.by_ref().take(inner).collect();
                if chunk.is_empty() {
                    break;
                }
                out.push(nest(chunk, rest));
            }
            Value::Array(out)
        }
    }
}

/// A tensor as nested JSON arrays.
///
/// # Errors
/// For element types JSON cannot hold (complex, opaque).
pub fn tensor_to_json(t: &Tensor) -> TractResult<Value> {
    let flat: Vec<Value> = match t.datum_type() {
        DatumType::F32 => t
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .iter()
            .map(|v| float32(*v))
            .collect(),
        DatumType::String => t
            .try_as_plain_ram()?
            .as_slice::<String>()?
            .iter()
            .map(|v| Value::from(v.as_str()))
            .collect(),
        DatumType::Bool => t
            .try_as_plain_ram()?
            .as_slice::<bool>()?
            .iter()
            .map(|v| Value::from(*v))
            .collect(),
        dt if dt.is_integer() => {
            let c = t.cast_to::<i64>()?;
            c.try_as_plain_ram()?
                .as_slice::<i64>()?
                .iter()
                .map(|v| Value::from(*v))
                .collect()
        }
        dt if dt.is_float() => {
            let c = t.cast_to::<f64>()?;
            c.try_as_plain_ram()?
                .as_slice::<f64>()?
                .iter()
                .map(|v| float(*v))
                .collect()
        }
        dt => bail!("outputs of type {dt:?} cannot be printed as JSON"),
    };
    Ok(nest(flat, t.shape()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_become_tensors_of_the_declared_type() {
        let t = rows_to_tensor(&json!([[1, 2.5], [null, 4]]), None).unwrap();
        assert_eq!(t.shape(), &[2, 2]);
        assert!(t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap()[2].is_nan());
        let t = rows_to_tensor(&json!([3, 4]), Some(DatumType::I64)).unwrap();
        assert_eq!(t, tensor1(&[3i64, 4]));
        let t = rows_to_tensor(&json!(["a", "b"]), None).unwrap();
        assert_eq!(t.datum_type(), DatumType::String);
    }

    #[test]
    fn ragged_and_mistyped_rows_are_refused() {
        assert!(rows_to_tensor(&json!([[1, 2], [3]]), None).is_err());
        assert!(rows_to_tensor(&json!([[1, 2], 3]), None).is_err());
        assert!(rows_to_tensor(&json!([1.5]), Some(DatumType::I64)).is_err());
        assert!(rows_to_tensor(&json!(["x"]), Some(DatumType::F32)).is_err());
    }

    #[test]
    fn tensors_print_nested_with_short_floats() {
        let t = tensor2(&[[0.1f32, f32::NAN], [2.0, 3.0]]);
        assert_eq!(
            tensor_to_json(&t).unwrap(),
            json!([[0.1, null], [2.0, 3.0]])
        );
        let t = tensor1(&["x".to_string()]);
        assert_eq!(tensor_to_json(&t).unwrap(), json!(["x"]));
        assert_eq!(tensor_to_json(&tensor0(7i64)).unwrap(), json!(7));
    }
}
