//! `TreeEnsembleRegressor` and `TreeEnsembleClassifier` (ai.onnx.ml opsets
//! 1 and 3).
//!
//! Owns reading the node attributes (float lists or `*_as_tensor` doubles),
//! validating them into a [`forest::Forest`] at load time, and the tract
//! operator that scores a `[N, F]` (or `[F]`) input. Semantics follow
//! onnxruntime, including its binary-classifier conventions; see
//! [`eval`]. The classifier replaces tract's own, whose labels are wrong
//! for single-score binary forests.

pub(crate) mod eval;
pub(crate) mod forest;

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::attrs::{floats_or_tensor, ints, strings};
use crate::classes::{self, Labels};
use crate::transform::PostTransform;
use eval::{Aggregate, Config, Kind, score_rows};
use forest::{Forest, TreeAttrs, Value};

/// Builder for `TreeEnsembleRegressor`.
///
/// # Errors
/// When an attribute is missing, inconsistent or out of range.
pub fn regressor(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    parse(ctx, node, false).with_context(|| format!("node {} (TreeEnsembleRegressor)", node.name))
}

/// Builder for `TreeEnsembleClassifier`.
///
/// # Errors
/// When an attribute is missing, inconsistent or out of range.
pub fn classifier(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    parse(ctx, node, true).with_context(|| format!("node {} (TreeEnsembleClassifier)", node.name))
}

fn parse(
    ctx: &ParsingContext,
    node: &NodeProto,
    is_classifier: bool,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let prefix = if is_classifier { "class" } else { "target" };
    let values = floats_or_tensor(ctx, node, "nodes_values")?;
    let weights = floats_or_tensor(ctx, node, &format!("{prefix}_weights"))?;
    let attrs = TreeAttrs {
        tree_ids: ints(node, "nodes_treeids")?,
        node_ids: ints(node, "nodes_nodeids")?,
        feature_ids: ints(node, "nodes_featureids")?,
        modes: strings(node, "nodes_modes")?.unwrap_or_default(),
        values: values.map(|v| v.values).unwrap_or_default(),
        true_ids: ints(node, "nodes_truenodeids")?,
        false_ids: ints(node, "nodes_falsenodeids")?,
        missing_true: ints(node, "nodes_missing_value_tracks_true")?,
        leaf_tree_ids: ints(node, &format!("{prefix}_treeids"))?,
        leaf_node_ids: ints(node, &format!("{prefix}_nodeids"))?,
        leaf_targets: ints(node, &format!("{prefix}_ids"))?,
        leaf_weights: weights.map(|w| w.values).unwrap_or_default(),
    };
    #[allow(clippy::cast_possible_truncation)]
    let base_values: Vec<f32> = floats_or_tensor(ctx, node, "base_values")?
        .map(|b| b.values.iter().map(|&v| v as f32).collect())
        .unwrap_or_default();
    let post = PostTransform::parse(node.get_attr_opt::<&str>("post_transform")?)?;

    let (kind, n_out) = if is_classifier {
        let ints = node.get_attr_opt_slice::<i64>("classlabels_int64s")?;
        let strs = strings(node, "classlabels_strings")?;
        let labels = match (ints, strs) {
            (Some(i), None) => Labels::Int(i.to_vec()),
            (None, Some(s)) => Labels::Str(s),
            _ => bail!("exactly one of classlabels_int64s and classlabels_strings must be set"),
        };
        let n = labels.len();
        ensure!(n >= 2, "{n} class label(s); a classifier needs at least 2");
        ensure!(
            base_values.len() <= n,
            "base_values has {} values for {n} classes",
            base_values.len()
        );
        let mut classes = attrs.leaf_targets.clone();
        classes.sort_unstable();
        classes.dedup();
        let kind = Kind::Classifier {
            labels,
            binary_case: n == 2 && classes.len() == 1,
            all_positive: attrs.leaf_weights.iter().all(|w| *w >= 0.0),
        };
        (kind, n)
    } else {
        let n: usize = node.get_attr("n_targets")?;
        ensure!(n >= 1, "n_targets must be at least 1");
        ensure!(
            matches!(base_values.len(), 0 | 1) || base_values.len() == n,
            "base_values has {} values for {n} targets",
            base_values.len()
        );
        let aggregate = Aggregate::parse(node.get_attr_opt::<&str>("aggregate_function")?)?;
        (Kind::Regressor { aggregate }, n)
    };
    let forest = Forest::build(&attrs, n_out)?;
    let spec = Spec {
        forest: Arc::new(forest),
        config: Arc::new(Config {
            kind,
            n_out,
            base_values,
            post,
        }),
    };
    Ok((expand(spec), vec![]))
}

/// The parsed node, before the input type picks the threshold width.
#[derive(Debug, Clone)]
struct Spec {
    forest: Arc<Forest<f64>>,
    config: Arc<Config>,
}

impl Spec {
    fn is_classifier(&self) -> bool {
        matches!(self.config.kind, Kind::Classifier { .. })
    }

    fn label_type(&self) -> Option<DatumType> {
        label_type(&self.config)
    }
}

impl Expansion for Spec {
    fn name(&self) -> StaticName {
        if self.is_classifier() {
            "TreeEnsembleClassifier".into()
        } else {
            "TreeEnsembleRegressor".into()
        }
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if self.is_classifier() { 2 } else { 1 })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        classes::rules(
            s,
            inputs,
            outputs,
            self.label_type(),
            Some(self.config.n_out),
        )
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let dt = model.outlet_fact(inputs[0])?.datum_type;
        ensure!(
            dt.is_number(),
            "{} input must be numeric, got {dt:?}",
            self.name()
        );
        let forest = match self.forest.to_f32() {
            Some(f) if dt == f32::datum_type() => Forests::F32(Arc::new(f)),
            _ => Forests::F64(self.forest.clone()),
        };
        model.wire_node(
            prefix,
            TreeEnsemble {
                forest,
                config: self.config.clone(),
            },
            inputs,
        )
    }
}

#[derive(Debug, Clone)]
enum Forests {
    F32(Arc<Forest<f32>>),
    F64(Arc<Forest<f64>>),
}

/// The typed operator: scores rows with a flattened forest.
#[derive(Debug, Clone)]
pub struct TreeEnsemble {
    forest: Forests,
    config: Arc<Config>,
}

impl PartialEq for TreeEnsemble {
    fn eq(&self, other: &Self) -> bool {
        let same_forest = match (&self.forest, &other.forest) {
            (Forests::F32(a), Forests::F32(b)) => Arc::ptr_eq(a, b),
            (Forests::F64(a), Forests::F64(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_forest && Arc::ptr_eq(&self.config, &other.config)
    }
}

impl Eq for TreeEnsemble {}

impl TreeEnsemble {
    fn n_features(&self) -> usize {
        match &self.forest {
            Forests::F32(f) => f.n_features,
            Forests::F64(f) => f.n_features,
        }
    }

    fn n_trees(&self) -> usize {
        match &self.forest {
            Forests::F32(f) => f.n_trees(),
            Forests::F64(f) => f.n_trees(),
        }
    }
}

fn score_all<T: Value + Datum>(
    forest: &Forest<T>,
    cfg: &Config,
    x: &Tensor,
    n_rows: usize,
    n_cols: usize,
    z: &mut [f32],
    labels: &mut [u32],
) -> TractResult<()> {
    let x = x.cast_to::<T>()?;
    let x = x.try_as_plain_ram()?.as_slice::<T>()?;
    ensure!(x.len() == n_rows * n_cols, "input is not contiguous");
    score_rows(forest, cfg, x, n_cols, 0..n_rows, z, labels);
    Ok(())
}

impl Op for TreeEnsemble {
    fn name(&self) -> StaticName {
        if matches!(self.config.kind, Kind::Classifier { .. }) {
            "TreeEnsembleClassifier".into()
        } else {
            "TreeEnsembleRegressor".into()
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} trees, {} outputs, reads {} features",
            self.n_trees(),
            self.config.n_out,
            self.n_features()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for TreeEnsemble {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let (n_rows, n_cols) = classes::rows_and_features(&x)?;
        ensure!(
            n_cols >= self.n_features(),
            "input has {n_cols} features, the trees read {}",
            self.n_features()
        );
        let n_out = self.config.n_out;
        let mut z = vec![0f32; n_rows * n_out];
        let mut labels = vec![0u32; n_rows];
        match &self.forest {
            Forests::F32(f) => score_all(f, &self.config, &x, n_rows, n_cols, &mut z, &mut labels)?,
            Forests::F64(f) => score_all(f, &self.config, &x, n_rows, n_cols, &mut z, &mut labels)?,
        }
        let scores = tract_ndarray::Array2::from_shape_vec((n_rows, n_out), z)?
            .into_tensor()
            .into_tvalue();
        let Kind::Classifier { labels: names, .. } = &self.config.kind else {
            return Ok(tvec!(scores));
        };
        let labels = names.tensor(labels.iter().map(|&i| i as usize));
        Ok(tvec!(labels.into_tvalue(), scores))
    }
}

fn label_type(config: &Config) -> Option<DatumType> {
    match &config.kind {
        Kind::Classifier { labels, .. } => Some(labels.datum_type()),
        Kind::Regressor { .. } => None,
    }
}

impl TypedOp for TreeEnsemble {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        classes::output_facts(inputs[0], self.config.n_out, label_type(&self.config))
    }

    as_op!();
}
