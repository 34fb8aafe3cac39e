//! `OneHotEncoder` (ai.onnx.ml opset 1): each element becomes a row of
//! float32 zeros with a one at its category's index; the output has one
//! more axis than the input, of length the number of categories.
//!
//! String inputs look up `cats_strings`; numeric inputs are cast to int64
//! and look up `cats_int64s`. An unknown category yields all zeros when
//! `zeros` is 1 (the default) and is an error otherwise.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::attrs::strings;

/// Builder for `OneHotEncoder`.
///
/// # Errors
/// When neither or both category lists are set.
pub fn build(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ints = node.get_attr_opt_slice::<i64>("cats_int64s")?;
    let strs = strings(node, "cats_strings")?;
    // Design: the first occurrence of a repeated category wins; the output
    // axis keeps the list's length.
    let (cats, n_cats) = match (ints, strs) {
        (Some(i), None) => {
            let mut m = HashMap::new();
            for (ix, c) in i.iter().enumerate() {
                m.entry(*c).or_insert(ix);
            }
            (Cats::Int(m), i.len())
        }
        (None, Some(s)) => {
            let n = s.len();
            let mut m = HashMap::new();
            for (ix, c) in s.into_iter().enumerate() {
                m.entry(c).or_insert(ix);
            }
            (Cats::Str(m), n)
        }
        _ => bail!(
            "node {} (OneHotEncoder): exactly one of cats_int64s and cats_strings must be set",
            node.name
        ),
    };
    let zeros = node.get_attr_opt::<i64>("zeros")?.unwrap_or(1) != 0;
    Ok((
        expand(OneHot(OneHotEncoder {
            cats: Arc::new(cats),
            n_cats,
            zeros,
        })),
        vec![],
    ))
}

/// Category -> index (the first occurrence of a repeated category).
#[derive(Debug)]
enum Cats {
    Int(HashMap<i64, usize>),
    Str(HashMap<String, usize>),
}

#[derive(Debug, Clone)]
struct OneHot(OneHotEncoder);

/// The typed operator.
#[derive(Debug, Clone)]
pub struct OneHotEncoder {
    cats: Arc<Cats>,
    n_cats: usize,
    zeros: bool,
}

impl PartialEq for OneHotEncoder {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.cats, &other.cats) && self.zeros == other.zeros
    }
}

impl Eq for OneHotEncoder {}

impl Expansion for OneHot {
    fn name(&self) -> StaticName {
        "OneHotEncoder".into()
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
        s.equals(&outputs[0].rank, inputs[0].rank.bex() + 1)?;
        s.given(&inputs[0].shape, move |s, shape| {
            let mut out = shape.clone();
            out.push(self.0.n_cats.to_dim());
            s.equals(&outputs[0].shape, out)
        })
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

impl Op for OneHotEncoder {
    fn name(&self) -> StaticName {
        "OneHotEncoder".into()
    }

    op_as_typed_op!();
}

impl EvalOp for OneHotEncoder {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let index: Vec<Option<usize>> = match &*self.cats {
            Cats::Str(m) => x
                .try_as_plain_ram()?
                .as_slice::<String>()?
                .iter()
                .map(|c| m.get(c).copied())
                .collect(),
            Cats::Int(m) => {
                let c = x.cast_to::<i64>()?;
                c.try_as_plain_ram()?
                    .as_slice::<i64>()?
                    .iter()
                    .map(|c| m.get(c).copied())
                    .collect()
            }
        };
        let mut out = vec![0f32; index.len() * self.n_cats];
        for (row, ix) in index.iter().enumerate() {
            match ix {
                Some(ix) => out[row * self.n_cats + ix] = 1.0,
                None if self.zeros => {}
                None => bail!("OneHotEncoder: element {row} is not a known category"),
            }
        }
        let mut shape: TVec<usize> = x.shape().into();
        shape.push(self.n_cats);
        let y = tract_ndarray::ArrayD::from_shape_vec(&*shape, out)?.into_tensor();
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for OneHotEncoder {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape.push(self.n_cats.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}
