//! `Normalizer` (ai.onnx.ml opset 1): each row of a `[N, C]` (or `[C]`)
//! input divided by its maximum, its L1 norm, or (L2) scaled to unit
//! Euclidean norm; a row whose divisor is 0 is copied unchanged. Output is
//! float32.
//!
//! Replaces tract's, whose `MAX` divides by the largest absolute value: the
//! specification (and onnxruntime) divide by the largest value.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Builder for `Normalizer`.
///
/// # Errors
/// When `norm` is not `MAX`, `L1` or `L2`.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let norm = match node.get_attr_opt::<&str>("norm")?.unwrap_or("MAX") {
        "MAX" => Norm::Max,
        "L1" => Norm::L1,
        "L2" => Norm::L2,
        other => bail!(
            "node {} (Normalizer): norm {other:?} is not one of MAX, L1, L2",
            node.name
        ),
    };
    Ok((expand(Expand(Normalizer { norm })), vec![]))
}

/// The normalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Divide by the row's maximum.
    Max,
    /// Divide by the sum of absolute values.
    L1,
    /// `sign(x) * sqrt(x^2 / sum(x^2))`.
    L2,
}

/// The typed operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalizer {
    norm: Norm,
}

#[derive(Debug, Clone)]
struct Expand(Normalizer);

impl Expansion for Expand {
    fn name(&self) -> StaticName {
        "Normalizer".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
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

impl Normalizer {
    fn row(&self, row: &mut [f32]) {
        match self.norm {
            Norm::Max => {
                let max = row.iter().copied().fold(f32::MIN, f32::max);
                if max != 0.0 {
                    row.iter_mut().for_each(|v| *v /= max);
                }
            }
            Norm::L1 => {
                let sum: f32 = row.iter().map(|v| v.abs()).sum();
                if sum != 0.0 {
                    row.iter_mut().for_each(|v| *v /= sum);
                }
            }
            Norm::L2 => {
                let sum: f32 = row.iter().map(|v| v * v).sum();
                if sum != 0.0 {
                    for v in row.iter_mut() {
                        let n = (*v * *v / sum).sqrt();
                        *v = if *v < 0.0 { -n } else { n };
                    }
                }
            }
        }
    }
}

impl Op for Normalizer {
    fn name(&self) -> StaticName {
        "Normalizer".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Normalizer {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let width = match *x.shape() {
            [c] | [_, c] => c,
            _ => bail!(
                "Normalizer input must be [N, C] or [C], got {:?}",
                x.shape()
            ),
        };
        let mut y = x.cast_to::<f32>()?.into_owned();
        if width > 0 {
            let mut view = y.try_as_plain_ram_mut()?;
            view.as_slice_mut::<f32>()?
                .chunks_mut(width)
                .for_each(|r| self.row(r));
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Normalizer {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        ensure!(
            x.rank() == 1 || x.rank() == 2,
            "Normalizer input must be [N, C] or [C]"
        );
        Ok(tvec!(f32::fact(x.shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_divides_by_the_largest_value_and_zero_rows_pass_through() {
        let op = Normalizer { norm: Norm::Max };
        let mut r = [-4.0, 2.0];
        op.row(&mut r);
        assert_eq!(r, [-2.0, 1.0]);
        let mut z = [0.0, -1.0];
        op.row(&mut z);
        assert_eq!(z, [0.0, -1.0]);
    }

    #[test]
    fn l2_keeps_signs() {
        let op = Normalizer { norm: Norm::L2 };
        let mut r = [-3.0, 4.0];
        op.row(&mut r);
        assert!((r[0] + 0.6).abs() < 1e-6 && (r[1] - 0.8).abs() < 1e-6);
    }
}
