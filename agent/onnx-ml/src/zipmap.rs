//! `ZipMap` (ai.onnx.ml opset 1), passed through as its input.
//!
//! ZipMap turns the `[N, C]` probability tensor into a sequence of
//! `{label: probability}` maps, a type tract does not have. The map values
//! are exactly the tensor's columns in `classlabels_*` order, so the
//! operator is wired as the identity: the output is the `[N, C]` tensor.
//! Export with `options={id(model): {"zipmap": False}}` (skl2onnx) to have
//! onnxruntime produce the same tensor.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Builder for `ZipMap`.
///
/// # Errors
/// When neither or both label lists are set.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ints = node.get_attr_opt_slice::<i64>("classlabels_int64s")?;
    let strs = node.get_attr_opt_vec::<String>("classlabels_strings")?;
    let n = match (ints, strs) {
        (Some(i), None) => i.len(),
        (None, Some(s)) => s.len(),
        _ => bail!(
            "node {} (ZipMap): exactly one of classlabels_int64s and classlabels_strings must be set",
            node.name
        ),
    };
    Ok((expand(ZipMap { n_classes: n }), vec![]))
}

#[derive(Debug, Clone)]
struct ZipMap {
    n_classes: usize,
}

impl Expansion for ZipMap {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&inputs[0].shape[1], self.n_classes.to_dim())?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        _prefix: &str,
        _model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        Ok(inputs.into())
    }
}
