//! `Binarizer` and `Imputer` (ai.onnx.ml opset 1): element-wise operators
//! whose output has the input's type and shape.
//!
//! Owns their attribute parsing and evaluation for float32, float64, int64
//! and int32 inputs. The imputed values hold one value (for every element)
//! or one per feature of the last axis; a mismatch is an error at load when
//! the shape is known, at run time otherwise.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Builder for `Binarizer`.
///
/// # Errors
/// When `threshold` is not a float.
pub fn binarizer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let threshold = node.get_attr_opt::<f32>("threshold")?.unwrap_or(0.0);
    Ok((
        expand(SameShape(ElementOp::Binarizer(Binarizer { threshold }))),
        vec![],
    ))
}

/// Builder for `Imputer`.
///
/// # Errors
/// When neither or both of the imputed value lists are set, or one is empty.
pub fn imputer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let floats = node.get_attr_opt_vec::<f32>("imputed_value_floats")?;
    let ints = node.get_attr_opt_slice::<i64>("imputed_value_int64s")?;
    let imputer = match (floats, ints) {
        (Some(values), None) if !values.is_empty() => Imputer::Float {
            values,
            replaced: node
                .get_attr_opt::<f32>("replaced_value_float")?
                .unwrap_or(0.0),
        },
        (None, Some(values)) if !values.is_empty() => Imputer::Int {
            values: values.to_vec(),
            replaced: node
                .get_attr_opt::<i64>("replaced_value_int64")?
                .unwrap_or(0),
        },
        _ => bail!(
            "node {} (Imputer): exactly one of imputed_value_floats and imputed_value_int64s must be set and non-empty",
            node.name
        ),
    };
    Ok((expand(SameShape(ElementOp::Imputer(imputer))), vec![]))
}

/// `Y = X > threshold ? 1 : 0`.
#[derive(Debug, Clone, Copy)]
pub struct Binarizer {
    threshold: f32,
}

/// Replaces elements equal to the replaced value (NaN matches NaN) by the
/// imputed value of their feature.
#[derive(Debug, Clone)]
pub enum Imputer {
    /// For float inputs.
    Float {
        /// One value, or one per feature.
        values: Vec<f32>,
        /// The value to replace.
        replaced: f32,
    },
    /// For integer inputs.
    Int {
        /// One value, or one per feature.
        values: Vec<i64>,
        /// The value to replace.
        replaced: i64,
    },
}

/// The typed operator.
#[derive(Debug, Clone)]
pub enum ElementOp {
    /// See [`Binarizer`].
    Binarizer(Binarizer),
    /// See [`Imputer`].
    Imputer(Imputer),
}

impl PartialEq for ElementOp {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Binarizer(a), Self::Binarizer(b)) => {
                a.threshold.to_bits() == b.threshold.to_bits()
            }
            (
                Self::Imputer(Imputer::Float {
                    values: a,
                    replaced: ra,
                }),
                Self::Imputer(Imputer::Float {
                    values: b,
                    replaced: rb,
                }),
            ) => {
                ra.to_bits() == rb.to_bits()
                    && a.iter()
                        .map(|v| v.to_bits())
                        .eq(b.iter().map(|v| v.to_bits()))
            }
            (
                Self::Imputer(Imputer::Int {
                    values: a,
                    replaced: ra,
                }),
                Self::Imputer(Imputer::Int {
                    values: b,
                    replaced: rb,
                }),
            ) => ra == rb && a == b,
            _ => false,
        }
    }
}

impl Eq for ElementOp {}

#[derive(Debug, Clone)]
struct SameShape(ElementOp);

impl Expansion for SameShape {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}

fn per_feature<T: Copy>(values: &[T], len: usize, shape: &[usize]) -> TractResult<()> {
    if values.len() > 1 {
        let last = shape.last().copied().unwrap_or(1);
        ensure!(
            values.len() == last && len.is_multiple_of(last),
            "{} imputed values, the input's last axis is {last}",
            values.len()
        );
    }
    Ok(())
}

fn impute<T: Datum + Copy + PartialEq>(x: &mut [T], values: &[T], is_replaced: impl Fn(T) -> bool) {
    if values.len() == 1 {
        let v = values[0];
        x.iter_mut()
            .filter(|e| is_replaced(**e))
            .for_each(|e| *e = v);
    } else {
        for row in x.chunks_mut(values.len()) {
            for (e, v) in row.iter_mut().zip(values) {
                if is_replaced(*e) {
                    *e = *v;
                }
            }
        }
    }
}

impl ElementOp {
    fn eval_tensor(&self, x: Tensor) -> TractResult<Tensor> {
        let dt = x.datum_type();
        let shape: TVec<usize> = x.shape().into();
        let mut x = x;
        match self {
            Self::Binarizer(b) => {
                let t = f64::from(b.threshold);
                match dt {
                    DatumType::F32 => binarize::<f32>(&mut x, |v| f64::from(v) > t)?,
                    DatumType::F64 => binarize::<f64>(&mut x, |v| v > t)?,
                    #[allow(clippy::cast_precision_loss)]
                    DatumType::I64 => binarize::<i64>(&mut x, |v| v as f64 > t)?,
                    DatumType::I32 => binarize::<i32>(&mut x, |v| f64::from(v) > t)?,
                    _ => bail!("Binarizer does not take {dt:?} input"),
                }
            }
            Self::Imputer(Imputer::Float { values, replaced }) => {
                let r = *replaced;
                let nan = r.is_nan();
                let len = x.len();
                match dt {
                    DatumType::F32 => {
                        per_feature(values, len, &shape)?;
                        let mut view = x.try_as_plain_ram_mut()?;
                        let xs = view.as_slice_mut::<f32>()?;
                        impute(xs, values, |v| if nan { v.is_nan() } else { v == r });
                    }
                    DatumType::F64 => {
                        per_feature(values, len, &shape)?;
                        let wide: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
                        let r = f64::from(r);
                        let mut view = x.try_as_plain_ram_mut()?;
                        let xs = view.as_slice_mut::<f64>()?;
                        impute(xs, &wide, |v| if nan { v.is_nan() } else { v == r });
                    }
                    _ => bail!("Imputer with float values does not take {dt:?} input"),
                }
            }
            Self::Imputer(Imputer::Int { values, replaced }) => {
                let len = x.len();
                per_feature(values, len, &shape)?;
                match dt {
                    DatumType::I64 => {
                        let mut view = x.try_as_plain_ram_mut()?;
                        let xs = view.as_slice_mut::<i64>()?;
                        impute(xs, values, |v| v == *replaced);
                    }
                    DatumType::I32 => {
                        let narrow = values
                            .iter()
                            .map(|&v| i32::try_from(v))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|_| format_err!("imputed value does not fit int32"))?;
                        let mut view = x.try_as_plain_ram_mut()?;
                        let xs = view.as_slice_mut::<i32>()?;
                        impute(xs, &narrow, |v| i64::from(v) == *replaced);
                    }
                    _ => bail!("Imputer with int64 values does not take {dt:?} input"),
                }
            }
        }
        Ok(x)
    }
}

fn binarize<T: Datum + Copy + num_traits_like::OneZero>(
    x: &mut Tensor,
    above: impl Fn(T) -> bool,
) -> TractResult<()> {
    let mut view = x.try_as_plain_ram_mut()?;
    for e in view.as_slice_mut::<T>()? {
        *e = if above(*e) { T::ONE } else { T::ZERO };
    }
    Ok(())
}

mod num_traits_like {
    pub trait OneZero {
        const ONE: Self;
        const ZERO: Self;
    }
    impl OneZero for f32 {
        const ONE: Self = 1.0;
        const ZERO: Self = 0.0;
    }
    impl OneZero for f64 {
        const ONE: Self = 1.0;
        const ZERO: Self = 0.0;
    }
    impl OneZero for i64 {
        const ONE: Self = 1;
        const ZERO: Self = 0;
    }
    impl OneZero for i32 {
        const ONE: Self = 1;
        const ZERO: Self = 0;
    }
}

impl Op for ElementOp {
    fn name(&self) -> StaticName {
        match self {
            Self::Binarizer(_) => "Binarizer".into(),
            Self::Imputer(_) => "Imputer".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for ElementOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs).into_tensor();
        Ok(tvec!(self.eval_tensor(x)?.into_tvalue()))
    }
}

impl TypedOp for ElementOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        if let (Self::Imputer(i), Some(last)) = (self, x.shape.last().and_then(TDim::as_i64)) {
            let n = match i {
                Imputer::Float { values, .. } => values.len(),
                Imputer::Int { values, .. } => values.len(),
            };
            ensure!(
                n == 1 || usize::try_from(last).is_ok_and(|l| l == n),
                "{n} imputed values, the input's last axis is {last}"
            );
        }
        Ok(tvec!(x.datum_type.fact(x.shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn binarizer_maps_above_threshold_to_one_and_nan_to_zero() {
        let op = ElementOp::Binarizer(Binarizer { threshold: 0.5 });
        let x = tensor1(&[0.5f32, 0.6, -1.0, f32::NAN]);
        let y = op.eval_tensor(x).unwrap();
        assert_eq!(y, tensor1(&[0f32, 1.0, 0.0, 0.0]));
        let y = op.eval_tensor(tensor1(&[0i64, 1, 2])).unwrap();
        assert_eq!(y, tensor1(&[0i64, 1, 1]));
    }

    #[test]
    fn imputer_replaces_nan_per_feature() {
        let op = ElementOp::Imputer(Imputer::Float {
            values: vec![10.0, 20.0],
            replaced: f32::NAN,
        });
        let x = tensor2(&[[f32::NAN, 1.0], [2.0, f32::NAN]]);
        let y = op.eval_tensor(x).unwrap();
        assert_eq!(y, tensor2(&[[10f32, 1.0], [2.0, 20.0]]));
        let bad = tensor2(&[[1f32, 2.0, 3.0]]);
        assert!(op.eval_tensor(bad).is_err());
    }

    #[test]
    fn integer_imputer_replaces_the_sentinel() {
        let op = ElementOp::Imputer(Imputer::Int {
            values: vec![7],
            replaced: -1,
        });
        let y = op.eval_tensor(tensor1(&[-1i64, 3, -1])).unwrap();
        assert_eq!(y, tensor1(&[7i64, 3, 7]));
    }
}
