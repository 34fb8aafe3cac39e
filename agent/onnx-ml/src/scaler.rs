//! `Scaler` (ai.onnx.ml opset 1): `Y = (X - offset) * scale` as float32.
//!
//! Wired as tract's own cast, sub and mul with constant operands, so the
//! optimizer can fold it into what follows (a `MatMul`, a linear model).
//! `offset` and `scale` hold one value (applied to every element) or one per
//! feature of the last axis.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::tract_core::ops::{cast::cast, math};

/// Builder for `Scaler`.
///
/// # Errors
/// When `offset` or `scale` is missing, empty, or their lengths differ.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset = node.get_attr_opt_vec::<f32>("offset")?.unwrap_or_default();
    let scale = node.get_attr_opt_vec::<f32>("scale")?.unwrap_or_default();
    ensure!(
        !scale.is_empty() && scale.len() == offset.len(),
        "node {} (Scaler): offset ({}) and scale ({}) must be non-empty and the same length",
        node.name,
        offset.len(),
        scale.len()
    );
    Ok((expand(Scaler { offset, scale }), vec![]))
}

#[derive(Debug, Clone)]
struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
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
        let fact = model.outlet_fact(inputs[0])?.clone();
        let n = self.offset.len();
        if n > 1 {
            let last = fact.shape.last().and_then(TDim::as_i64);
            ensure!(
                last.is_none_or(|l| usize::try_from(l).is_ok_and(|l| l == n)),
                "Scaler has {n} offsets, the input's last axis is {:?}",
                fact.shape.last()
            );
        }
        let mut x = inputs[0];
        if fact.datum_type != f32::datum_type() {
            x = model.wire_node(format!("{prefix}.cast"), cast(f32::datum_type()), &[x])?[0];
        }
        let offset = model.add_const(format!("{prefix}.offset"), rctensor1(&self.offset))?;
        let scale = model.add_const(format!("{prefix}.scale"), rctensor1(&self.scale))?;
        let shifted =
            wire_with_rank_broadcast(format!("{prefix}.sub"), model, math::sub(), &[x, offset])?;
        wire_with_rank_broadcast(
            format!("{prefix}.mul"),
            model,
            math::mul(),
            &[shifted[0], scale],
        )
    }
}
