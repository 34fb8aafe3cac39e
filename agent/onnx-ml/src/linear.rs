//! `LinearClassifier` and `LinearRegressor` (ai.onnx.ml opset 1) as single
//! operators.
//!
//! Owns parsing and validating the nodes and the typed operator that scores
//! `[N, F]` (or `[F]`) rows: `scores = X · Wᵀ + b`, then the label and the
//! post-transform, in one pass with no intermediate tensors. They replace
//! tract's, which expand into an einsum, a bias add, the transform, an
//! argmax, a cast and a lookup (six to nine plan nodes for a product of a
//! few hundred multiply-adds) and refuse `PROBIT` and `SOFTMAX_ZERO`.
//!
//! Semantics are onnxruntime's (1.32) where the specification leaves them
//! open, checked by the `lc_*`/`lr_*` fixtures:
//! - one score per row and two class labels: the scores are `[1 - p, p]`
//!   with `p` the logistic of the score under `LOGISTIC` and the raw score
//!   otherwise, and the label is the second class when the score is
//!   positive; `PROBIT` there is refused (onnxruntime writes a corrupt
//!   tensor);
//! - one score per row and no labels: the label is 1 or 0 by the score's
//!   sign, the scores stay one column, and only `PROBIT` is applied (as for
//!   a single-target regressor);
//! - several classes: the label is the first class of highest raw score,
//!   then the transform is applied to the row.
//!
//! A node whose coefficient count is not (classes or targets) × input
//! features is refused when the plan is built; onnxruntime silently reads
//! a prefix of a longer list.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::attrs::strings;
use crate::classes::{self, Labels};
use crate::transform::{PostTransform, logistic, probit};

/// Builder for `LinearClassifier`.
///
/// # Errors
/// When coefficients are missing, labels are inconsistent with the
/// intercepts, or the post-transform is unknown.
pub fn classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    parse_classifier(node).with_context(|| format!("node {} (LinearClassifier)", node.name))
}

/// Builder for `LinearRegressor`.
///
/// # Errors
/// When coefficients are missing or `targets` and `intercepts` disagree.
pub fn regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    parse_regressor(node).with_context(|| format!("node {} (LinearRegressor)", node.name))
}

fn coefficients(node: &NodeProto) -> TractResult<Vec<f32>> {
    let c = node
        .get_attr_opt_vec::<f32>("coefficients")?
        .unwrap_or_default();
    ensure!(!c.is_empty(), "coefficients are missing or empty");
    ensure!(
        c.iter().all(|v| v.is_finite()),
        "coefficients hold NaN or infinite values"
    );
    Ok(c)
}

fn intercepts(node: &NodeProto) -> TractResult<Option<Vec<f32>>> {
    let i = node.get_attr_opt_vec::<f32>("intercepts")?;
    if let Some(v) = &i {
        ensure!(
            v.iter().all(|x| x.is_finite()),
            "intercepts hold NaN or infinite values"
        );
    }
    Ok(i.filter(|v| !v.is_empty()))
}

fn parse_classifier(node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let coefficients = coefficients(node)?;
    let intercepts = intercepts(node)?;
    let ints = node.get_attr_opt_slice::<i64>("classlabels_ints")?;
    let strs = strings(node, "classlabels_strings")?;
    let labels = match (ints, strs) {
        (Some(_), Some(_)) => {
            bail!("only one of classlabels_ints and classlabels_strings may be set")
        }
        (Some(i), None) if !i.is_empty() => Some(Labels::Int(i.to_vec())),
        (None, Some(s)) if !s.is_empty() => Some(Labels::Str(s)),
        _ => None,
    };
    let post = PostTransform::parse(node.get_attr_opt::<&str>("post_transform")?)?;
    if let Some(b) = &intercepts {
        ensure!(
            coefficients.len().is_multiple_of(b.len()),
            "{} coefficients are not a multiple of the {} classes the intercepts define",
            coefficients.len(),
            b.len()
        );
        check_labels(labels.as_ref(), b.len(), post)?;
    }
    let spec = Spec {
        kind: Kind::Classifier(Arc::new(labels)),
        coefficients: Arc::new(coefficients),
        intercepts,
        post,
    };
    Ok((expand(spec), vec![]))
}

/// Checks the labels against the class count the weights give.
fn check_labels(labels: Option<&Labels>, classes: usize, post: PostTransform) -> TractResult<()> {
    let n = labels.map_or(0, Labels::len);
    if classes == 1 {
        ensure!(
            n == 0 || n == 2,
            "one score per row needs two class labels or none, got {n}"
        );
        ensure!(
            !(n == 2 && post == PostTransform::Probit),
            "post_transform PROBIT with one score and two class labels has no two-column layout"
        );
    } else {
        ensure!(
            n >= classes,
            "{n} class label(s) for {classes} classes (one score per class)"
        );
    }
    Ok(())
}

fn parse_regressor(node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let coefficients = coefficients(node)?;
    let intercepts = intercepts(node)?;
    let targets: i64 = node.get_attr_opt("targets")?.unwrap_or(1);
    let targets = usize::try_from(targets)
        .ok()
        .filter(|t| *t >= 1)
        .with_context(|| format!("targets must be at least 1, got {targets}"))?;
    ensure!(
        coefficients.len().is_multiple_of(targets),
        "{} coefficients are not a multiple of targets = {targets}",
        coefficients.len()
    );
    if let Some(b) = &intercepts {
        ensure!(
            b.len() == targets,
            "{} intercepts for targets = {targets}",
            b.len()
        );
    }
    let spec = Spec {
        kind: Kind::Regressor { targets },
        coefficients: Arc::new(coefficients),
        intercepts,
        post: PostTransform::parse(node.get_attr_opt::<&str>("post_transform")?)?,
    };
    Ok((expand(spec), vec![]))
}

#[derive(Debug, Clone)]
enum Kind {
    /// `None`: no label attribute, labels are 1 and 0 (one score only).
    Classifier(Arc<Option<Labels>>),
    Regressor {
        targets: usize,
    },
}

/// The parsed node; the input's feature count fixes the weight layout.
#[derive(Debug, Clone)]
struct Spec {
    kind: Kind,
    coefficients: Arc<Vec<f32>>,
    intercepts: Option<Vec<f32>>,
    post: PostTransform,
}

impl Spec {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Classifier(_) => "LinearClassifier",
            Kind::Regressor { .. } => "LinearRegressor",
        }
    }

    fn label_type(&self) -> Option<DatumType> {
        match &self.kind {
            Kind::Classifier(labels) => Some(label_type(labels.as_ref().as_ref())),
            Kind::Regressor { .. } => None,
        }
    }

    /// Scores per row when known before the input's shape is.
    fn known_scores(&self) -> Option<usize> {
        match &self.kind {
            Kind::Regressor { targets } => Some(*targets),
            Kind::Classifier(labels) => self
                .intercepts
                .as_ref()
                .map(|b| columns(b.len(), labels.as_ref().as_ref().map_or(0, Labels::len))),
        }
    }

    /// The operator for inputs of `n_features` features.
    fn build(&self, n_features: usize) -> TractResult<Linear> {
        ensure!(n_features >= 1, "input has no features");
        let total = self.coefficients.len();
        let n_scores = match &self.kind {
            Kind::Regressor { targets } => *targets,
            Kind::Classifier(_) => self
                .intercepts
                .as_ref()
                .map_or(total / n_features, Vec::len),
        };
        ensure!(
            n_scores >= 1 && n_scores * n_features == total,
            "{total} coefficients do not make {} rows of {n_features} input features",
            if n_scores == 0 {
                "any".to_owned()
            } else {
                n_scores.to_string()
            }
        );
        let layout = match &self.kind {
            Kind::Regressor { .. } => Layout::Scores,
            Kind::Classifier(labels) => {
                check_labels(labels.as_ref().as_ref(), n_scores, self.post)?;
                match (n_scores, labels.as_ref()) {
                    (1, None) => Layout::SignLabel,
                    (1, _) => Layout::Binary,
                    _ => Layout::Argmax,
                }
            }
        };
        Ok(Linear {
            weights: self.coefficients.clone(),
            bias: Arc::new(
                self.intercepts
                    .clone()
                    .unwrap_or_else(|| vec![0.0; n_scores]),
            ),
            n_features,
            n_scores,
            layout,
            labels: match &self.kind {
                Kind::Classifier(l) => Some(l.clone()),
                Kind::Regressor { .. } => None,
            },
            post: self.post,
        })
    }
}

/// The label output's type: sign labels are int64.
fn label_type(labels: Option<&Labels>) -> DatumType {
    labels.map_or(i64::datum_type(), Labels::datum_type)
}

/// Output columns for `n_scores` scores per row and `n_labels` labels.
fn columns(n_scores: usize, n_labels: usize) -> usize {
    if n_scores == 1 && n_labels == 2 {
        2
    } else {
        n_scores
    }
}

impl Expansion for Spec {
    fn name(&self) -> StaticName {
        Spec::name(self).into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(match self.kind {
            Kind::Classifier(_) => 2,
            Kind::Regressor { .. } => 1,
        })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        classes::rules(s, inputs, outputs, self.label_type(), self.known_scores())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        ensure!(
            fact.datum_type.is_number(),
            "{} input must be numeric, got {:?}",
            self.name(),
            fact.datum_type
        );
        ensure!(
            matches!(fact.rank(), 1 | 2),
            "{} input of rank {}; expected [N, F] or [F]",
            self.name(),
            fact.rank()
        );
        let features = fact
            .shape
            .last()
            .and_then(TDim::as_i64)
            .and_then(|f| usize::try_from(f).ok())
            .with_context(|| {
                format!(
                    "{} needs a fixed feature count, the input's last axis is {:?}",
                    self.name(),
                    fact.shape.last()
                )
            })?;
        let op = self
            .build(features)
            .with_context(|| format!("{} {prefix}", self.name()))?;
        model.wire_node(prefix, op, inputs)
    }
}

/// How the scores of a row become outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Regressor: the scores, transformed when there are several.
    Scores,
    /// One score, two labels: `[1 - p, p]`, label by the score's sign.
    Binary,
    /// One score, no labels: label 1 or 0 by the sign, one column.
    SignLabel,
    /// Several classes: label of the top raw score, then the transform.
    Argmax,
}

/// The typed operator.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[n_scores][n_features]`, row-major.
    weights: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    n_features: usize,
    n_scores: usize,
    layout: Layout,
    /// `None` for a regressor; `Some(None)` for sign labels.
    labels: Option<Arc<Option<Labels>>>,
    post: PostTransform,
}

impl PartialEq for Linear {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && Arc::ptr_eq(&self.bias, &other.bias)
            && self.n_features == other.n_features
            && self.layout == other.layout
            && self.post == other.post
    }
}

impl Eq for Linear {}

impl Linear {
    fn columns(&self) -> usize {
        if self.layout == Layout::Binary {
            2
        } else {
            self.n_scores
        }
    }

    /// Scores `rows` (row-major, `n_features` each) into `z` (`columns()`
    /// per row) and the winning class index per row into `winners`.
    fn score(&self, x: &[f32], z: &mut [f32], winners: &mut [usize]) {
        let f = self.n_features;
        let k = self.n_scores;
        let cols = self.columns();
        for ((row, out), win) in x.chunks_exact(f).zip(z.chunks_exact_mut(cols)).zip(winners) {
            for ((o, w), b) in out
                .iter_mut()
                .zip(self.weights.chunks_exact(f))
                .zip(self.bias.iter())
            {
                *o = dot(row, w) + b;
            }
            match self.layout {
                Layout::Scores | Layout::SignLabel => {
                    *win = usize::from(out[0] > 0.0);
                    if k > 1 {
                        self.post.apply_row(out);
                    } else if self.post == PostTransform::Probit {
                        out[0] = probit(out[0]);
                    }
                }
                Layout::Binary => {
                    let s = out[0];
                    *win = usize::from(s > 0.0);
                    let p = if self.post == PostTransform::Logistic {
                        logistic(s)
                    } else {
                        s
                    };
                    out[0] = 1.0 - p;
                    out[1] = p;
                }
                Layout::Argmax => {
                    let mut best = 0;
                    for (j, v) in out.iter().enumerate().skip(1) {
                        if *v > out[best] {
                            best = j;
                        }
                    }
                    *win = best;
                    self.post.apply_row(out);
                }
            }
        }
    }
}

/// Four independent sums, so the loop vectorizes without reassociating a
/// single chain.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..4 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

impl Op for Linear {
    fn name(&self) -> StaticName {
        if self.labels.is_some() {
            "LinearClassifier".into()
        } else {
            "LinearRegressor".into()
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} scores of {} features, {:?}, post-transform {:?}",
            self.n_scores, self.n_features, self.layout, self.post
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let (n_rows, n_cols) = classes::rows_and_features(&x)?;
        ensure!(
            n_cols == self.n_features,
            "input has {n_cols} features, the model takes {}",
            self.n_features
        );
        let x = x.cast_to::<f32>()?;
        let x = x.try_as_plain_ram()?.as_slice::<f32>()?;
        ensure!(x.len() == n_rows * n_cols, "input is not contiguous");
        let cols = self.columns();
        let mut z = vec![0f32; n_rows * cols];
        let mut winners = vec![0usize; n_rows];
        self.score(x, &mut z, &mut winners);
        let scores = tract_ndarray::Array2::from_shape_vec((n_rows, cols), z)?
            .into_tensor()
            .into_tvalue();
        let Some(labels) = &self.labels else {
            return Ok(tvec!(scores));
        };
        let labels = match labels.as_ref() {
            Some(names) => names.tensor(winners.into_iter()),
            #[allow(clippy::cast_possible_wrap)]
            None => {
                tract_ndarray::Array1::from_iter(winners.iter().map(|&w| w as i64)).into_tensor()
            }
        };
        Ok(tvec!(labels.into_tvalue(), scores))
    }
}

impl TypedOp for Linear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let label = self.labels.as_deref().map(|l| label_type(l.as_ref()));
        classes::output_facts(inputs[0], self.columns(), label)
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn op(
        layout: Layout,
        weights: Vec<f32>,
        bias: Vec<f32>,
        f: usize,
        post: PostTransform,
    ) -> Linear {
        let n_scores = bias.len();
        Linear {
            weights: Arc::new(weights),
            bias: Arc::new(bias),
            n_features: f,
            n_scores,
            layout,
            labels: None,
            post,
        }
    }

    #[test]
    fn dot_matches_the_naive_sum_for_every_tail_length() {
        for n in 0..11 {
            let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let b: Vec<f32> = (0..n).map(|i| 2.0 - i as f32 * 0.25).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn argmax_takes_the_first_top_raw_score_before_the_transform() {
        let lin = op(
            Layout::Argmax,
            vec![1.0, 1.0, 0.0],
            vec![0.0, 0.0, 0.5],
            1,
            PostTransform::Softmax,
        );
        let mut z = [0.0; 3];
        let mut w = [9];
        lin.score(&[2.0], &mut z, &mut w);
        assert_eq!(w, [0]);
        assert!((z.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn binary_layout_is_one_minus_p_and_p() {
        let lin = op(
            Layout::Binary,
            vec![1.0],
            vec![0.0],
            1,
            PostTransform::Logistic,
        );
        let mut z = [0.0; 4];
        let mut w = [0; 2];
        lin.score(&[0.0, -3.0], &mut z, &mut w);
        assert_eq!(w, [0, 0]);
        assert!((z[0] - 0.5).abs() < 1e-6 && (z[1] - 0.5).abs() < 1e-6);
        assert!((z[2] + z[3] - 1.0).abs() < 1e-6 && z[3] < 0.1);
    }

    #[test]
    fn a_single_score_takes_only_probit() {
        let lin = op(
            Layout::Scores,
            vec![1.0],
            vec![0.0],
            1,
            PostTransform::Logistic,
        );
        let mut z = [0.0];
        lin.score(&[3.0], &mut z, &mut [0]);
        assert_eq!(z, [3.0]);
        let lin = op(
            Layout::Scores,
            vec![1.0],
            vec![0.0],
            1,
            PostTransform::Probit,
        );
        lin.score(&[0.5], &mut z, &mut [0]);
        assert!(z[0].abs() < 1e-6);
    }

    #[test]
    fn without_intercepts_the_input_fixes_the_class_count() {
        let spec = Spec {
            kind: Kind::Classifier(Arc::new(Some(Labels::Int(vec![1, 2, 3])))),
            coefficients: Arc::new(vec![1.0; 6]),
            intercepts: None,
            post: PostTransform::None,
        };
        assert_eq!(spec.known_scores(), None);
        let lin = spec.build(2).unwrap();
        assert_eq!((lin.n_scores, lin.layout), (3, Layout::Argmax));
        assert!(spec.build(4).is_err(), "6 coefficients are not rows of 4");
        let err = format!("{:#}", spec.build(6).unwrap_err());
        assert!(err.contains("two class labels or none, got 3"), "{err}");
    }

    #[test]
    fn label_counts_are_checked_against_the_scores() {
        let two = Labels::Int(vec![0, 1]);
        assert!(check_labels(Some(&Labels::Int(vec![1])), 1, PostTransform::None).is_err());
        assert!(check_labels(None, 1, PostTransform::Probit).is_ok());
        assert!(check_labels(Some(&two), 1, PostTransform::Probit).is_err());
        assert!(check_labels(Some(&two), 3, PostTransform::None).is_err());
        assert!(check_labels(None, 2, PostTransform::None).is_err());
    }
}
