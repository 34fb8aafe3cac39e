//! `LabelEncoder` (ai.onnx.ml opsets 1, 2 and 4): maps each element through
//! a key -> value table, with a default for unknown keys.
//!
//! - opset 1: `classes_strings`; strings map to their index (int64, default
//!   `default_int64`), int64 indices map to strings (default `default_string`),
//!   chosen by the input type;
//! - opset 2: one of `keys_strings` / `keys_int64s` / `keys_floats` and one of
//!   `values_strings` / `values_int64s` / `values_floats`, defaults
//!   `default_string` ("_Unused"), `default_int64` (-1), `default_float` (-0.0);
//! - opset 4: `keys_tensor` / `values_tensor` / `default_tensor` (string,
//!   int64, int32, int16, float, double).
//!
//! Float keys match by value: NaN matches NaN, -0.0 matches 0.0. When a key
//! is repeated, the last one wins from opset 4 on (as its specification
//! says) and the first before (as onnxruntime does; earlier opsets do not
//! say).

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{NodeProto, TensorProto};
use tract_onnx::tract_hir::internal::*;

use crate::attrs::{strings, tensor_to_f64};

/// Builder for `LabelEncoder`.
///
/// # Errors
/// When the keys or values are missing, ambiguous or of different lengths.
pub fn build(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let spec = parse(ctx, node).with_context(|| format!("node {} (LabelEncoder)", node.name))?;
    Ok((expand(spec), vec![]))
}

/// A key column.
#[derive(Debug, Clone)]
enum Keys {
    Str(Vec<String>),
    Int(Vec<i64>),
    Float(Vec<f64>),
}

/// A value column and its default, as a 1-D tensor and a scalar tensor.
#[derive(Debug, Clone)]
struct Values {
    table: Arc<Tensor>,
    default: Arc<Tensor>,
}

#[derive(Debug, Clone)]
enum Spec {
    /// Opset 1: direction chosen by the input type.
    Classes {
        classes: Vec<String>,
        default_int64: i64,
        default_string: String,
    },
    Mapping {
        keys: Keys,
        values: Values,
        /// Opset 4 says a repeated key's last value wins; before that the
        /// specification is silent and onnxruntime keeps the first.
        last_key_wins: bool,
    },
}

fn load(ctx: &ParsingContext, node: &NodeProto, name: &str) -> TractResult<Option<Tensor>> {
    node.get_attr_opt::<&TensorProto>(name)?
        .map(|p| {
            ctx.load_tensor(p)
                .with_context(|| format!("attribute {name}"))
        })
        .transpose()
}

/// The model's `ai.onnx.ml` opset version (0 when it imports none).
fn ml_opset(ctx: &ParsingContext) -> i64 {
    ctx.model
        .opset_import
        .iter()
        .find(|o| o.domain == "ai.onnx.ml")
        .map_or(0, |o| o.version)
}

fn parse(ctx: &ParsingContext, node: &NodeProto) -> TractResult<Spec> {
    if let Some(classes) = strings(node, "classes_strings")? {
        return Ok(Spec::Classes {
            classes,
            default_int64: node.get_attr_opt("default_int64")?.unwrap_or(-1),
            default_string: node
                .get_attr_opt::<String>("default_string")?
                .unwrap_or_else(|| "_Unused".into()),
        });
    }

    let mut found = Vec::new();
    if let Some(k) = strings(node, "keys_strings")? {
        found.push(Keys::Str(k));
    }
    if let Some(k) = node.get_attr_opt_slice::<i64>("keys_int64s")? {
        found.push(Keys::Int(k.to_vec()));
    }
    if let Some(k) = node.get_attr_opt_slice::<f32>("keys_floats")? {
        found.push(Keys::Float(k.iter().map(|&v| f64::from(v)).collect()));
    }
    if let Some(t) = load(ctx, node, "keys_tensor")? {
        found.push(keys_from_tensor(&t)?);
    }
    ensure!(
        found.len() == 1,
        "exactly one of keys_strings, keys_int64s, keys_floats, keys_tensor must be set"
    );
    let keys = found.remove(0);

    let mut tables: Vec<Tensor> = Vec::new();
    if let Some(v) = strings(node, "values_strings")? {
        tables.push(tensor1(&v));
    }
    if let Some(v) = node.get_attr_opt_slice::<i64>("values_int64s")? {
        tables.push(tensor1(v));
    }
    if let Some(v) = node.get_attr_opt_slice::<f32>("values_floats")? {
        tables.push(tensor1(v));
    }
    let from_tensor = load(ctx, node, "values_tensor")?;
    if let Some(t) = from_tensor {
        let n = t.len();
        tables.push(t.into_shape(&[n])?);
    }
    ensure!(
        tables.len() == 1,
        "exactly one of values_strings, values_int64s, values_floats, values_tensor must be set"
    );
    let table = tables.remove(0);
    let n_keys = match &keys {
        Keys::Str(k) => k.len(),
        Keys::Int(k) => k.len(),
        Keys::Float(k) => k.len(),
    };
    ensure!(
        n_keys == table.len(),
        "{n_keys} keys but {} values",
        table.len()
    );

    let dt = table.datum_type();
    let default = match load(ctx, node, "default_tensor")? {
        Some(d) => {
            ensure!(
                d.len() == 1 && d.datum_type() == dt,
                "default_tensor must hold one {dt:?} value, like the values"
            );
            d.into_shape(&[])?
        }
        None => default_of(node, dt)?,
    };
    Ok(Spec::Mapping {
        keys,
        values: Values {
            table: table.into_arc_tensor(),
            default: default.into_arc_tensor(),
        },
        last_key_wins: ml_opset(ctx) >= 4,
    })
}

fn keys_from_tensor(t: &Tensor) -> TractResult<Keys> {
    Ok(match t.datum_type() {
        DatumType::String => Keys::Str(t.try_as_plain_ram()?.as_slice::<String>()?.to_vec()),
        DatumType::I64 | DatumType::I32 | DatumType::I16 => {
            let c = t.cast_to::<i64>()?;
            Keys::Int(c.try_as_plain_ram()?.as_slice::<i64>()?.to_vec())
        }
        DatumType::F32 | DatumType::F64 => Keys::Float(tensor_to_f64(t)?),
        dt => bail!("keys_tensor of type {dt:?} is not supported"),
    })
}

fn default_of(node: &NodeProto, dt: DatumType) -> TractResult<Tensor> {
    Ok(match dt {
        DatumType::String => tensor0(
            node.get_attr_opt::<String>("default_string")?
                .unwrap_or_else(|| "_Unused".into()),
        ),
        DatumType::I64 => tensor0(node.get_attr_opt::<i64>("default_int64")?.unwrap_or(-1)),
        DatumType::I32 | DatumType::I16 => tensor0(-1i64).cast_to_dt(dt)?.into_owned(),
        DatumType::F32 => tensor0(node.get_attr_opt::<f32>("default_float")?.unwrap_or(-0.0)),
        DatumType::F64 => tensor0(-0.0f64),
        dt => bail!("values of type {dt:?} are not supported"),
    })
}

impl Spec {
    /// The table for an input of type `input`, and whether the last of
    /// repeated keys wins.
    fn resolve(&self, input: DatumType) -> TractResult<(Keys, Values, bool)> {
        match self {
            Self::Mapping {
                keys,
                values,
                last_key_wins,
            } => Ok((keys.clone(), values.clone(), *last_key_wins)),
            Self::Classes {
                classes,
                default_int64,
                default_string,
            } => {
                if input == DatumType::String {
                    let idx: Vec<i64> = (0..classes.len() as i64).collect();
                    Ok((
                        Keys::Str(classes.clone()),
                        Values {
                            table: rctensor1(&idx),
                            default: rctensor0(*default_int64),
                        },
                        false,
                    ))
                } else {
                    Ok((
                        Keys::Int((0..classes.len() as i64).collect()),
                        Values {
                            table: rctensor1(classes),
                            default: rctensor0(default_string.clone()),
                        },
                        false,
                    ))
                }
            }
        }
    }

    fn output_type(&self, input: DatumType) -> DatumType {
        match self {
            Self::Mapping { values, .. } => values.table.datum_type(),
            Self::Classes { .. } if input == DatumType::String => DatumType::I64,
            Self::Classes { .. } => DatumType::String,
        }
    }
}

impl Expansion for Spec {
    fn name(&self) -> StaticName {
        "LabelEncoder".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        s.given(&inputs[0].datum_type, move |s, dt| {
            s.equals(&outputs[0].datum_type, self.output_type(dt))
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let dt = model.outlet_fact(inputs[0])?.datum_type;
        let (keys, values, last_key_wins) = self.resolve(dt)?;
        let index = Index::build(&keys, dt, last_key_wins)?;
        model.wire_node(
            prefix,
            LabelEncoder {
                index: Arc::new(index),
                values,
            },
            inputs,
        )
    }
}

/// Canonical bits of a float key: all NaNs equal, -0.0 equals 0.0.
fn float_key(v: f64) -> u64 {
    if v.is_nan() {
        f64::NAN.to_bits()
    } else if v == 0.0 {
        0
    } else {
        v.to_bits()
    }
}

/// Key -> row of the value table.
#[derive(Debug)]
enum Index {
    Str(HashMap<String, usize>),
    Int(HashMap<i64, usize>),
    Float(HashMap<u64, usize>),
}

fn index_of<K: std::hash::Hash + Eq>(
    keys: impl Iterator<Item = K>,
    last_key_wins: bool,
) -> HashMap<K, usize> {
    let mut m = HashMap::new();
    for (i, k) in keys.enumerate() {
        if last_key_wins {
            m.insert(k, i);
        } else {
            m.entry(k).or_insert(i);
        }
    }
    m
}

impl Index {
    fn build(keys: &Keys, input: DatumType, last_key_wins: bool) -> TractResult<Self> {
        let ok = match keys {
            Keys::Str(_) => input == DatumType::String,
            // tract types some int64 tensors computed from shapes as TDim.
            Keys::Int(_) => matches!(
                input,
                DatumType::I64 | DatumType::I32 | DatumType::I16 | DatumType::TDim
            ),
            Keys::Float(_) => matches!(input, DatumType::F32 | DatumType::F64),
        };
        ensure!(ok, "LabelEncoder keys do not match its {input:?} input");
        Ok(match keys {
            Keys::Str(k) => Self::Str(index_of(k.iter().cloned(), last_key_wins)),
            Keys::Int(k) => Self::Int(index_of(k.iter().copied(), last_key_wins)),
            Keys::Float(k) => Self::Float(index_of(k.iter().map(|k| float_key(*k)), last_key_wins)),
        })
    }

    /// Row of each input element, `None` for unknown keys.
    fn rows(&self, x: &Tensor) -> TractResult<Vec<Option<usize>>> {
        Ok(match self {
            Self::Str(m) => x
                .try_as_plain_ram()?
                .as_slice::<String>()?
                .iter()
                .map(|k| m.get(k).copied())
                .collect(),
            Self::Int(m) => {
                let c = x.cast_to::<i64>()?;
                c.try_as_plain_ram()?
                    .as_slice::<i64>()?
                    .iter()
                    .map(|k| m.get(k).copied())
                    .collect()
            }
            Self::Float(m) => tensor_to_f64(x)?
                .into_iter()
                .map(|k| m.get(&float_key(k)).copied())
                .collect(),
        })
    }
}

/// The typed operator.
#[derive(Debug, Clone)]
pub struct LabelEncoder {
    index: Arc<Index>,
    values: Values,
}

impl PartialEq for LabelEncoder {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.index, &other.index)
    }
}

impl Eq for LabelEncoder {}

fn gather<T: Datum + Clone>(
    rows: &[Option<usize>],
    table: &Tensor,
    default: &Tensor,
    shape: &[usize],
) -> TractResult<Tensor> {
    let table = table.try_as_plain_ram()?.as_slice::<T>()?;
    let default = default.try_as_plain_ram()?.to_scalar::<T>()?;
    let out: Vec<T> = rows
        .iter()
        .map(|r| r.and_then(|r| table.get(r)).unwrap_or(default).clone())
        .collect();
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, out)?.into_tensor())
}

impl Op for LabelEncoder {
    fn name(&self) -> StaticName {
        "LabelEncoder".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LabelEncoder {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let rows = self.index.rows(&x)?;
        let (t, d) = (&*self.values.table, &*self.values.default);
        let y = match t.datum_type() {
            DatumType::String => gather::<String>(&rows, t, d, x.shape())?,
            DatumType::I64 => gather::<i64>(&rows, t, d, x.shape())?,
            DatumType::I32 => gather::<i32>(&rows, t, d, x.shape())?,
            DatumType::I16 => gather::<i16>(&rows, t, d, x.shape())?,
            DatumType::F32 => gather::<f32>(&rows, t, d, x.shape())?,
            DatumType::F64 => gather::<f64>(&rows, t, d, x.shape())?,
            dt => bail!("values of type {dt:?} are not supported"),
        };
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for LabelEncoder {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(
            self.values.table.datum_type().fact(inputs[0].shape.clone())
        ))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn op(keys: Keys, table: Tensor, default: Tensor, input: DatumType) -> LabelEncoder {
        LabelEncoder {
            index: Arc::new(Index::build(&keys, input, true).unwrap()),
            values: Values {
                table: table.into_arc_tensor(),
                default: default.into_arc_tensor(),
            },
        }
    }

    fn run(op: &LabelEncoder, x: Tensor) -> Tensor {
        let mut out = op
            .eval(&EvalContext::out_of_plan(), tvec!(x.into_tvalue()))
            .unwrap();
        out.remove(0).into_tensor()
    }

    #[test]
    fn strings_to_ints_with_default_and_last_key_winning() {
        let keys = Keys::Str(vec!["a".into(), "b".into(), "a".into()]);
        let le = op(
            keys,
            tensor1(&[1i64, 2, 3]),
            tensor0(-1i64),
            DatumType::String,
        );
        let x = tensor1(&["a".to_string(), "z".into(), "b".into()]);
        assert_eq!(run(&le, x), tensor1(&[3i64, -1, 2]));
    }

    #[test]
    fn float_keys_match_nan_and_signed_zero() {
        let keys = Keys::Float(vec![f64::NAN, 0.0, 1.5]);
        let table = tensor1(&["nan".to_string(), "zero".into(), "x".into()]);
        let le = op(keys, table, tensor0("_Unused".to_string()), DatumType::F32);
        let x = tensor1(&[-0.0f32, f32::NAN, 1.5, 2.0]);
        let y = run(&le, x);
        let y = y
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<String>()
            .unwrap()
            .to_vec();
        assert_eq!(y, ["zero", "nan", "x", "_Unused"]);
    }

    #[test]
    fn keys_of_the_wrong_type_for_the_input_are_an_error() {
        assert!(Index::build(&Keys::Str(vec![]), DatumType::I64, true).is_err());
    }
}
