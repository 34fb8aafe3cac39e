//! Scoring rows with a flattened forest: leaf weights aggregated over trees,
//! then base values, the binary-classifier conventions and the
//! post-transform, as onnxruntime does.
//!
//! Owns the per-row arithmetic only; the walk is [`super::forest`]'s and the
//! tensors are [`super`]'s. Rows are scored in blocks: for each block, trees
//! are the outer loop (one tree stays hot in cache while every row of the
//! block walks it) and scratch space is allocated once per call, never per
//! row.

use std::ops::Range;

use tract_onnx::tract_hir::internal::{TractResult, bail};

use super::forest::{Forest, LANES, Value};
use crate::classes::Labels;
use crate::transform::{PostTransform, logistic, probit};

/// How a regressor combines the weights its trees give one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

impl Aggregate {
    pub(crate) fn parse(s: Option<&str>) -> TractResult<Self> {
        Ok(match s.unwrap_or("SUM") {
            "SUM" => Self::Sum,
            "AVERAGE" => Self::Average,
            "MIN" => Self::Min,
            "MAX" => Self::Max,
            other => bail!("aggregate_function {other:?} is not one of SUM, AVERAGE, MIN, MAX"),
        })
    }
}

/// Class labels of a classifier.
/// Regressor or classifier, with what each needs to finish a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Regressor {
        aggregate: Aggregate,
    },
    Classifier {
        labels: Labels,
        /// Two classes and every leaf weight is for the same class: the
        /// trees give one score and the other class's is derived from it.
        binary_case: bool,
        /// No negative leaf weight (probabilities rather than margins).
        all_positive: bool,
    },
}

/// Everything but the trees.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    pub kind: Kind,
    /// Targets (regressor) or classes (classifier): columns of the scores.
    pub n_out: usize,
    pub base_values: Vec<f32>,
    pub post: PostTransform,
}

trait Combine {
    fn combine(acc: &mut f32, has: &mut bool, w: f32);
}

struct Add;
struct Least;
struct Most;

impl Combine for Add {
    #[inline(always)]
    fn combine(acc: &mut f32, has: &mut bool, w: f32) {
        *acc += w;
        *has = true;
    }
}

impl Combine for Least {
    #[inline(always)]
    fn combine(acc: &mut f32, has: &mut bool, w: f32) {
        if !*has || w < *acc {
            *acc = w;
        }
        *has = true;
    }
}

impl Combine for Most {
    #[inline(always)]
    fn combine(acc: &mut f32, has: &mut bool, w: f32) {
        if !*has || w > *acc {
            *acc = w;
        }
        *has = true;
    }
}

/// Rows scored together, trees in the outer loop.
const BLOCK: usize = 128;

/// Scores `rows` of the row-major input `x` (`n_cols` columns, at least
/// `forest.n_features`). `z` receives `rows.len() * cfg.n_out` scores and,
/// for a classifier, `labels` one class index per row.
pub(crate) fn score_rows<T: Value>(
    forest: &Forest<T>,
    cfg: &Config,
    x: &[T],
    n_cols: usize,
    rows: Range<usize>,
    z: &mut [f32],
    labels: &mut [u32],
) {
    let n_out = cfg.n_out;
    let cap = BLOCK.min(rows.len()) * n_out;
    let mut acc = vec![0f32; cap];
    let mut has = vec![false; cap];
    let mut start = rows.start;
    while start < rows.end {
        let end = (start + BLOCK).min(rows.end);
        let len = (end - start) * n_out;
        acc[..len].fill(0.0);
        has[..len].fill(false);
        accumulate(forest, cfg, x, n_cols, start..end, &mut acc, &mut has);
        for row in start..end {
            let i = (row - start) * n_out;
            let o = (row - rows.start) * n_out;
            let a = &mut acc[i..i + n_out];
            let h = &mut has[i..i + n_out];
            let out = &mut z[o..o + n_out];
            match &cfg.kind {
                Kind::Regressor { aggregate } => {
                    finish_regressor(cfg, *aggregate, forest.n_trees(), a, h, out);
                }
                Kind::Classifier {
                    binary_case,
                    all_positive,
                    ..
                } => {
                    labels[row - rows.start] =
                        finish_classifier(cfg, *binary_case, *all_positive, a, h, out);
                }
            }
        }
        start = end;
    }
}

fn accumulate<T: Value>(
    forest: &Forest<T>,
    cfg: &Config,
    x: &[T],
    n_cols: usize,
    rows: Range<usize>,
    acc: &mut [f32],
    has: &mut [bool],
) {
    // onnxruntime's one-target path adds only the first weight of a leaf.
    let (aggregate, first_only) = match cfg.kind {
        Kind::Regressor { aggregate } => (aggregate, cfg.n_out == 1),
        Kind::Classifier { .. } => (Aggregate::Sum, false),
    };
    match aggregate {
        Aggregate::Sum | Aggregate::Average => {
            accumulate_with::<T, Add>(forest, cfg.n_out, first_only, x, n_cols, rows, acc, has);
        }
        Aggregate::Min => {
            accumulate_with::<T, Least>(forest, cfg.n_out, first_only, x, n_cols, rows, acc, has);
        }
        Aggregate::Max => {
            accumulate_with::<T, Most>(forest, cfg.n_out, first_only, x, n_cols, rows, acc, has);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn accumulate_with<T: Value, C: Combine>(
    forest: &Forest<T>,
    n_out: usize,
    first_only: bool,
    x: &[T],
    n_cols: usize,
    rows: Range<usize>,
    acc: &mut [f32],
    has: &mut [bool],
) {
    let mut add = |i: usize, leaf: u32| {
        let e = forest.entries(leaf);
        if first_only {
            if e.start < e.end {
                C::combine(&mut acc[i], &mut has[i], forest.entry_weight[e.start]);
            }
        } else {
            let base = i * n_out;
            for k in e {
                let j = base + forest.entry_target[k] as usize;
                C::combine(&mut acc[j], &mut has[j], forest.entry_weight[k]);
            }
        }
    };
    // Design: with a block of at least LANES rows, walk each tree for every
    // row (rows in lockstep); with fewer, walk every tree for each row
    // (trees in lockstep). Either way a row's trees are added in tree order.
    if rows.len() >= LANES {
        let mut leaves = vec![0u32; rows.len()];
        for tree in 0..forest.n_trees() {
            forest.leaves_of_rows(tree, x, n_cols, rows.clone(), &mut leaves);
            for (i, leaf) in leaves.iter().enumerate() {
                add(i, *leaf);
            }
        }
    } else {
        let mut leaves = vec![0u32; forest.n_trees()];
        for (i, r) in rows.enumerate() {
            forest.leaves_of_trees(&x[r * n_cols..(r + 1) * n_cols], &mut leaves);
            for leaf in &leaves {
                add(i, *leaf);
            }
        }
    }
}

#[allow(clippy::cast_precision_loss)]
fn finish_regressor(
    cfg: &Config,
    aggregate: Aggregate,
    n_trees: usize,
    acc: &[f32],
    has: &[bool],
    z: &mut [f32],
) {
    let base = &cfg.base_values;
    let n_trees = n_trees as f32;
    if cfg.n_out == 1 {
        let origin = if base.len() == 1 { base[0] } else { 0.0 };
        let v = match aggregate {
            Aggregate::Sum => acc[0] + origin,
            Aggregate::Average => acc[0] / n_trees + origin,
            Aggregate::Min | Aggregate::Max if has[0] => acc[0] + origin,
            Aggregate::Min | Aggregate::Max => origin,
        };
        // onnxruntime applies only PROBIT to a single target.
        z[0] = if cfg.post == PostTransform::Probit {
            probit(v)
        } else {
            v
        };
        return;
    }
    // onnxruntime writes 0 for a target no leaf contributed to, base value
    // or not.
    let use_base = base.len() == cfg.n_out;
    for (j, out) in z.iter_mut().enumerate() {
        let b = if use_base { base[j] } else { 0.0 };
        *out = match aggregate {
            _ if !has[j] => 0.0,
            Aggregate::Sum => acc[j] + b,
            Aggregate::Average => acc[j] / n_trees + b,
            Aggregate::Min | Aggregate::Max => b + acc[j],
        };
    }
    cfg.post.apply_row(z);
}

/// How a single binary score becomes two columns (onnxruntime's
/// `add_second_class`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Probabilities: `[1 - s, s]`.
    Complement,
    /// Margins, positive class won: `[-s, s]` (or logistic of both).
    PositiveWon,
    /// Margins, negative class won: `[s, -s]` (or logistic of both).
    NegativeWon,
}

/// Returns the winning class index and writes the class scores.
fn finish_classifier(
    cfg: &Config,
    binary_case: bool,
    all_positive: bool,
    acc: &mut [f32],
    has: &mut [bool],
    z: &mut [f32],
) -> u32 {
    let base = &cfg.base_values;
    if cfg.n_out > 2 {
        for (k, b) in base.iter().enumerate() {
            if has[k] {
                acc[k] += b;
            } else {
                has[k] = true;
                acc[k] = *b;
            }
        }
        let mut best: Option<(usize, f32)> = None;
        for (k, (&s, &h)) in acc.iter().zip(has.iter()).enumerate() {
            if h && best.is_none_or(|(_, m)| s > m) {
                best = Some((k, s));
            }
        }
        for ((out, &s), &h) in z.iter_mut().zip(acc.iter()).zip(has.iter()) {
            *out = if h { s } else { 0.0 };
        }
        cfg.post.apply_row(z);
        #[allow(clippy::cast_possible_truncation)]
        return best.map_or(0, |(k, _)| k as u32);
    }

    // Two classes.
    let (mut s0, mut s1) = (acc[0], acc[1]);
    let (h0, mut h1) = (has[0], has[1]);
    let mut two = true;
    match base.len() {
        2 => {
            if h1 {
                s1 = base[1] + s0;
                s0 = -s1;
                h1 = true;
            } else {
                s1 += base[1];
                s0 += base[0];
            }
        }
        1 => {
            s0 += base[0];
            two = h1;
        }
        _ => two = h1,
    }
    let positive = if two && h1 {
        s1
    } else if h0 {
        s0
    } else {
        0.0
    };
    // Scores without any contribution are written as 0 (onnxruntime).
    let m0 = if h0 { s0 } else { 0.0 };
    let m1 = if h1 { s1 } else { 0.0 };

    // How one score becomes two columns; `None` leaves the second at 0.
    let (label, second) = if !binary_case {
        (None, base.is_empty().then_some(Layout::NegativeWon))
    } else if all_positive {
        (Some(positive > 0.5), Some(Layout::Complement))
    } else if positive > 0.0 {
        (Some(true), Some(Layout::PositiveWon))
    } else {
        (Some(false), Some(Layout::NegativeWon))
    };
    if two {
        z[0] = m0;
        z[1] = m1;
        cfg.post.apply_row(&mut z[..2]);
    } else {
        let logistic_post = cfg.post == PostTransform::Logistic;
        let (a, b) = match second {
            _ if cfg.post == PostTransform::Probit => (probit(m0), 0.0),
            None => (m0, 0.0),
            Some(Layout::Complement) => (1.0 - m0, m0),
            Some(Layout::PositiveWon | Layout::NegativeWon) if logistic_post => {
                (logistic(-m0), logistic(m0))
            }
            Some(Layout::PositiveWon) => (-m0, m0),
            Some(Layout::NegativeWon) => (m0, -m0),
        };
        z[0] = a;
        z[1] = b;
    }
    // Design: when both classes have leaf weights, onnxruntime labels a row
    // 1 or 0 by the sign of the class-1 score, not from the class labels;
    // here the label is the top written score, as the specification says.
    u32::from(label.unwrap_or(z[1] > z[0]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tree::forest::TreeAttrs;

    /// Two stumps on feature 0 (x <= 0 true), weights given per leaf.
    fn stumps(targets: &[i64], weights: &[f64]) -> Forest<f32> {
        let a = TreeAttrs {
            tree_ids: vec![0, 0, 0, 1, 1, 1],
            node_ids: vec![0, 1, 2, 0, 1, 2],
            feature_ids: vec![0; 6],
            modes: ["BRANCH_LEQ", "LEAF", "LEAF"]
                .iter()
                .cycle()
                .take(6)
                .map(|s| (*s).to_owned())
                .collect(),
            values: vec![0.0; 6],
            true_ids: vec![1, 0, 0, 1, 0, 0],
            false_ids: vec![2, 0, 0, 2, 0, 0],
            missing_true: vec![],
            leaf_tree_ids: vec![0, 0, 1, 1],
            leaf_node_ids: vec![1, 2, 1, 2],
            leaf_targets: targets.to_vec(),
            leaf_weights: weights.to_vec(),
        };
        let n_out = targets.iter().copied().max().unwrap() as usize + 1;
        Forest::build(&a, n_out.max(2)).unwrap().to_f32().unwrap()
    }

    fn regress(agg: Aggregate, base: Vec<f32>, x: f32) -> f32 {
        let f = stumps(&[0, 0, 0, 0], &[1.0, 2.0, 3.0, 5.0]);
        let cfg = Config {
            kind: Kind::Regressor { aggregate: agg },
            n_out: 1,
            base_values: base,
            post: PostTransform::None,
        };
        let mut z = [0.0];
        score_rows(&f, &cfg, &[x], 1, 0..1, &mut z, &mut []);
        z[0]
    }

    #[test]
    fn regressor_aggregates_and_adds_the_base_value() {
        assert_eq!(regress(Aggregate::Sum, vec![], -1.0), 4.0);
        assert_eq!(regress(Aggregate::Sum, vec![0.5], 1.0), 7.5);
        assert_eq!(regress(Aggregate::Average, vec![], 1.0), 3.5);
        assert_eq!(regress(Aggregate::Min, vec![], 1.0), 2.0);
        assert_eq!(regress(Aggregate::Max, vec![1.0], -1.0), 4.0);
    }

    #[test]
    fn binary_probability_forest_labels_by_the_positive_class() {
        // One class id (binary_case), positive weights: P(class 1) per tree / 2.
        let f = stumps(&[0, 0, 0, 0], &[0.1, 0.4, 0.2, 0.45]);
        let cfg = Config {
            kind: Kind::Classifier {
                labels: Labels::Int(vec![3, 7]),
                binary_case: true,
                all_positive: true,
            },
            n_out: 2,
            base_values: vec![],
            post: PostTransform::None,
        };
        let mut z = [0.0; 4];
        let mut labels = [9; 2];
        score_rows(&f, &cfg, &[-1.0, 1.0], 1, 0..2, &mut z, &mut labels);
        assert_eq!(labels, [0, 1]);
        let expect = [0.7, 0.3, 0.15, 0.85];
        for (a, b) in z.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{z:?}");
        }
    }
}
