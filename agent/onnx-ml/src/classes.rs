//! What the scoring operators (tree ensembles, linear models) share about
//! their outputs: class labels, the shape rules of `[N, F]` (or `[F]`)
//! input to `[N]` labels and `[N, C]` scores, and the label tensor.

use tract_onnx::tract_hir::internal::*;

/// Class labels of a classifier node (`classlabels_*` attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Labels {
    Int(Vec<i64>),
    Str(Vec<String>),
}

impl Labels {
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Int(v) => v.len(),
            Self::Str(v) => v.len(),
        }
    }

    pub(crate) fn datum_type(&self) -> DatumType {
        match self {
            Self::Int(_) => i64::datum_type(),
            Self::Str(_) => String::datum_type(),
        }
    }

    /// The `[N]` label tensor for the winning class index of each row; an
    /// index past the labels (never made by a validated node) gives the
    /// type's default.
    pub(crate) fn tensor(&self, winners: impl Iterator<Item = usize>) -> Tensor {
        match self {
            Self::Int(v) => tract_ndarray::Array1::from_iter(
                winners.map(|w| v.get(w).copied().unwrap_or_default()),
            )
            .into_tensor(),
            Self::Str(v) => tract_ndarray::Array1::from_iter(
                winners.map(|w| v.get(w).cloned().unwrap_or_default()),
            )
            .into_tensor(),
        }
    }
}

/// Inference rules: one input; with `label` a label output of that type
/// and rank 1 before the scores; float32 scores of rank 2 with `n_scores`
/// columns when known; every output has one row per input row (one for a
/// rank-1 input).
pub(crate) fn rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    label: Option<DatumType>,
    n_scores: Option<usize>,
) -> InferenceResult {
    check_input_arity(inputs, 1)?;
    let scores = match label {
        Some(dt) => {
            check_output_arity(outputs, 2)?;
            s.equals(&outputs[0].datum_type, dt)?;
            s.equals(&outputs[0].rank, 1)?;
            1
        }
        None => {
            check_output_arity(outputs, 1)?;
            0
        }
    };
    s.equals(&outputs[scores].datum_type, f32::datum_type())?;
    s.equals(&outputs[scores].rank, 2)?;
    if let Some(n) = n_scores {
        s.equals(&outputs[scores].shape[1], n.to_dim())?;
    }
    s.given(&inputs[0].rank, move |s, rank| {
        for o in outputs {
            if rank == 1 {
                s.equals(&o.shape[0], 1.to_dim())?;
            } else {
                s.equals(&o.shape[0], &inputs[0].shape[0])?;
            }
        }
        Ok(())
    })
}

/// Typed output facts for input `x`, `n_scores` score columns and an
/// optional label output of type `label`.
///
/// # Errors
/// When `x` is neither `[N, F]` nor `[F]`.
pub(crate) fn output_facts(
    x: &TypedFact,
    n_scores: usize,
    label: Option<DatumType>,
) -> TractResult<TVec<TypedFact>> {
    let n = match x.rank() {
        1 => 1.to_dim(),
        2 => x.shape[0].clone(),
        r => bail!("input of rank {r}; expected [N, F] or [F]"),
    };
    let scores = f32::fact([n.clone(), n_scores.to_dim()]);
    Ok(match label {
        None => tvec!(scores),
        Some(dt) => tvec!(dt.fact([n]), scores),
    })
}

/// `(rows, features)` of a `[N, F]` or `[F]` input tensor.
///
/// # Errors
/// On any other rank.
pub(crate) fn rows_and_features(x: &Tensor) -> TractResult<(usize, usize)> {
    match *x.shape() {
        [f] => Ok((1, f)),
        [n, f] => Ok((n, f)),
        _ => bail!("input shape {:?} is neither [N, F] nor [F]", x.shape()),
    }
}
