//! Attribute readers shared by the operators.
//!
//! Owns the ONNX-ML attribute conventions tract's helpers do not know: float
//! lists that may instead come as a double tensor (`*_as_tensor`, opset 3),
//! and "exactly one of" attribute groups. Everything returns a tract error
//! naming the node and attribute; nothing here panics on a malformed model.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// A float list read from `name` or from the tensor `name_as_tensor`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Floats {
    /// The values, widened to f64 (exact for both sources).
    pub values: Vec<f64>,
    /// True when they came from a tensor that is not float32.
    pub wide: bool,
}

/// Reads the list attribute `name`, or `name_as_tensor` when the list is
/// absent. `Ok(None)` when neither is set.
pub(crate) fn floats_or_tensor(
    ctx: &ParsingContext,
    node: &NodeProto,
    name: &str,
) -> TractResult<Option<Floats>> {
    let list = node.get_attr_opt_slice::<f32>(name)?;
    let tensor_name = format!("{name}_as_tensor");
    let tensor = node.get_attr_opt::<&tract_onnx::pb::TensorProto>(&tensor_name)?;
    match (list, tensor) {
        (Some(_), Some(_)) => bail!(
            "node {} ({}): only one of {name} and {tensor_name} may be set",
            node.name,
            node.op_type
        ),
        (Some(list), None) => Ok(Some(Floats {
            values: list.iter().map(|&v| f64::from(v)).collect(),
            wide: false,
        })),
        (None, Some(proto)) => {
            let t = ctx
                .load_tensor(proto)
                .with_context(|| format!("node {}: attribute {tensor_name}", node.name))?;
            let wide = t.datum_type() != f32::datum_type();
            let values = tensor_to_f64(&t)
                .with_context(|| format!("node {}: attribute {tensor_name}", node.name))?;
            Ok(Some(Floats { values, wide }))
        }
        (None, None) => Ok(None),
    }
}

/// The elements of a numeric tensor as f64.
pub(crate) fn tensor_to_f64(t: &Tensor) -> TractResult<Vec<f64>> {
    let c = t.cast_to::<f64>()?;
    Ok(c.try_as_plain_ram()?.as_slice::<f64>()?.to_vec())
}

/// An int list attribute, or an empty list when absent.
pub(crate) fn ints(node: &NodeProto, name: &str) -> TractResult<Vec<i64>> {
    Ok(node
        .get_attr_opt_slice::<i64>(name)?
        .map(<[i64]>::to_vec)
        .unwrap_or_default())
}

/// A string list attribute, if present.
pub(crate) fn strings(node: &NodeProto, name: &str) -> TractResult<Option<Vec<String>>> {
    node.get_attr_opt_vec::<String>(name)
}
