//! Flattened tree ensembles and their traversal.
//!
//! Owns turning the ONNX-ML `nodes_*` / `*_treeids` attribute tuples into a
//! compact array layout, and walking it. It knows nothing about aggregation
//! or post-transforms (see [`super::eval`]).
//!
//! Layout invariants, established by [`Forest::build`] and relied on by the
//! walks:
//! - the nodes of every tree are laid out in preorder, true child first, so
//!   a branch's children always have a larger index than the branch;
//! - a leaf is a node whose two children are itself, so a walk of exactly
//!   `depth[tree]` steps from the root ends on the leaf, with no test for
//!   leaves inside the loop (this is what lets several walks run in
//!   lockstep), and an open-ended walk stops when a step does not move;
//! - every node of a tree is reachable from its root, every reference is in
//!   bounds, and every branch's feature index is below `n_features`.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use tract_onnx::tract_hir::internal::*;

const FEATURE_BITS: u32 = 28;
const FEATURE_MASK: u32 = (1 << FEATURE_BITS) - 1;
const MODE_MASK: u32 = 0b111;
const MISSING_BIT: u32 = 1 << 31;

/// Branch comparison, `feature OP threshold` leads to the true child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Mode {
    Leq = 0,
    Lt = 1,
    Gte = 2,
    Gt = 3,
    Eq = 4,
    Neq = 5,
}

const MIXED: u8 = 6;

impl Mode {
    fn parse(s: &str) -> TractResult<Option<Self>> {
        Ok(Some(match s {
            "BRANCH_LEQ" => Self::Leq,
            "BRANCH_LT" => Self::Lt,
            "BRANCH_GTE" => Self::Gte,
            "BRANCH_GT" => Self::Gt,
            "BRANCH_EQ" => Self::Eq,
            "BRANCH_NEQ" => Self::Neq,
            "LEAF" => return Ok(None),
            other => bail!("unknown node mode {other:?}"),
        }))
    }
}

/// Input and threshold element type of a walk.
pub(crate) trait Value: Copy + PartialOrd + std::fmt::Debug + Send + Sync + 'static {
    fn is_nan(self) -> bool;
}

impl Value for f32 {
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Value for f64 {
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// One branch node: 16 bytes with f32 thresholds, so four share a cache line.
///
/// `key` packs the feature index (bits 0..28), the comparison of a
/// mixed-mode forest (bits 28..31) and the missing-value-goes-true flag
/// (bit 31).
// Design: array-of-structs for the node itself, since a step of the walk
// reads all four fields; leaves are struct-of-arrays (CSR) because their
// entry count varies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Node<T> {
    pub key: u32,
    pub children: [u32; 2],
    pub threshold: T,
}

/// The attribute tuples of one ONNX tree-ensemble node, as read.
#[derive(Debug, Default)]
pub(crate) struct TreeAttrs {
    pub tree_ids: Vec<i64>,
    pub node_ids: Vec<i64>,
    pub feature_ids: Vec<i64>,
    pub modes: Vec<String>,
    pub values: Vec<f64>,
    pub true_ids: Vec<i64>,
    pub false_ids: Vec<i64>,
    /// Empty when the attribute is absent.
    pub missing_true: Vec<i64>,
    pub leaf_tree_ids: Vec<i64>,
    pub leaf_node_ids: Vec<i64>,
    pub leaf_targets: Vec<i64>,
    pub leaf_weights: Vec<f64>,
}

/// A flattened forest with thresholds of type `T`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Forest<T> {
    /// Branches and leaves, each tree in preorder.
    pub nodes: Vec<Node<T>>,
    /// Root node of each tree, in the order trees first appear.
    pub roots: Vec<u32>,
    /// Depth of each tree's deepest leaf (0 for a lone leaf).
    pub depth: Vec<u32>,
    /// Whether a lockstep walk of `depth` steps suits the tree, i.e. its
    /// leaves are not much shallower than its deepest one.
    pub lockstep: Vec<bool>,
    /// CSR over nodes: the (target, weight) entries of node `n` are
    /// `entry_start[n]..entry_start[n + 1]`, empty for branches.
    pub entry_start: Vec<u32>,
    pub entry_target: Vec<u32>,
    pub entry_weight: Vec<f32>,
    /// The comparison every branch uses, or `None` when they differ.
    pub mode: Option<Mode>,
    /// Whether any branch sends missing values (NaN) to its true child.
    pub has_missing: bool,
    /// One more than the largest feature index any branch reads.
    pub n_features: usize,
}

fn lookup(
    index: &HashMap<(i64, i64), usize>,
    tree: i64,
    node: i64,
    what: &str,
) -> TractResult<usize> {
    index.get(&(tree, node)).copied().ok_or_else(|| {
        format_err!("{what} refers to node {node} of tree {tree}, which does not exist")
    })
}

fn check_len(name: &str, len: usize, expected: usize) -> TractResult<()> {
    ensure!(
        len == expected,
        "attribute {name} has {len} values, expected {expected}"
    );
    Ok(())
}

impl Forest<f64> {
    /// Flattens the attribute tuples; `n_outputs` bounds the leaf target ids.
    ///
    /// # Errors
    /// On inconsistent lengths, unknown modes, dangling or shared child
    /// references, cycles, out-of-range feature or target ids.
    #[allow(clippy::too_many_lines)]
    pub(crate) fn build(a: &TreeAttrs, n_outputs: usize) -> TractResult<Self> {
        let n = a.tree_ids.len();
        ensure!(n > 0, "the ensemble has no nodes");
        check_len("nodes_nodeids", a.node_ids.len(), n)?;
        check_len("nodes_featureids", a.feature_ids.len(), n)?;
        check_len("nodes_modes", a.modes.len(), n)?;
        check_len("nodes_values", a.values.len(), n)?;
        check_len("nodes_truenodeids", a.true_ids.len(), n)?;
        check_len("nodes_falsenodeids", a.false_ids.len(), n)?;
        if !a.missing_true.is_empty() {
            check_len("nodes_missing_value_tracks_true", a.missing_true.len(), n)?;
        }
        let n_entries = a.leaf_tree_ids.len();
        check_len("*_nodeids", a.leaf_node_ids.len(), n_entries)?;
        check_len("*_ids", a.leaf_targets.len(), n_entries)?;
        check_len("*_weights", a.leaf_weights.len(), n_entries)?;

        let mut index = HashMap::with_capacity(n);
        for i in 0..n {
            if index.insert((a.tree_ids[i], a.node_ids[i]), i).is_some() {
                bail!(
                    "node {} of tree {} is defined twice",
                    a.node_ids[i],
                    a.tree_ids[i]
                );
            }
        }
        let modes = a
            .modes
            .iter()
            .map(|m| Mode::parse(m))
            .collect::<TractResult<Vec<_>>>()?;

        // Children of every branch, validated once.
        let mut children = vec![[0usize; 2]; n];
        let mut has_parent = vec![false; n];
        for i in 0..n {
            if modes[i].is_some() {
                let t = lookup(&index, a.tree_ids[i], a.true_ids[i], "nodes_truenodeids")?;
                let f = lookup(&index, a.tree_ids[i], a.false_ids[i], "nodes_falsenodeids")?;
                children[i] = [t, f];
                has_parent[t] = true;
                has_parent[f] = true;
            }
        }

        // Leaf entries grouped by node position (counting sort, stable).
        let mut entry_pos = Vec::with_capacity(n_entries);
        let mut count = vec![0u32; n + 1];
        for k in 0..n_entries {
            let pos = lookup(
                &index,
                a.leaf_tree_ids[k],
                a.leaf_node_ids[k],
                "leaf weights",
            )?;
            let target = a.leaf_targets[k];
            ensure!(
                usize::try_from(target).is_ok_and(|t| t < n_outputs),
                "leaf weight target/class id {target} is outside 0..{n_outputs}"
            );
            entry_pos.push(pos);
            count[pos + 1] += 1;
        }
        for i in 0..n {
            count[i + 1] += count[i];
        }
        let mut cursor = count.clone();
        let mut sorted = vec![0usize; n_entries];
        for (k, &pos) in entry_pos.iter().enumerate() {
            sorted[cursor[pos] as usize] = k;
            cursor[pos] += 1;
        }

        // Roots: per tree (in order of first appearance), the first listed
        // node that no branch points to.
        let mut tree_order = Vec::new();
        let mut seen = HashSet::new();
        let mut root_of: HashMap<i64, usize> = HashMap::new();
        for (i, (&t, &parented)) in a.tree_ids.iter().zip(&has_parent).enumerate() {
            if seen.insert(t) {
                tree_order.push(t);
            }
            if !parented {
                root_of.entry(t).or_insert(i);
            }
        }

        // Preorder layout, true child first; `order` lists node positions
        // in their new order.
        let unset = u32::MAX;
        let mut slot = vec![unset; n];
        let mut order = Vec::with_capacity(n);
        let mut roots = Vec::with_capacity(tree_order.len());
        let mut depth = Vec::with_capacity(tree_order.len());
        let mut lockstep = Vec::with_capacity(tree_order.len());
        let mut stack = Vec::new();
        for t in &tree_order {
            let Some(&root) = root_of.get(t) else {
                bail!("tree {t} has no root (its nodes form a cycle)");
            };
            let (mut deepest, mut leaf_depths, mut n_leaves) = (0u32, 0u64, 0u64);
            stack.push((root, 0u32));
            while let Some((p, d)) = stack.pop() {
                if slot[p] != unset {
                    bail!(
                        "node {} of tree {t} is reached twice (shared child or cycle)",
                        a.node_ids[p]
                    );
                }
                slot[p] = u32::try_from(order.len())?;
                order.push(p);
                if modes[p].is_some() {
                    stack.push((children[p][1], d + 1));
                    stack.push((children[p][0], d + 1));
                } else {
                    deepest = deepest.max(d);
                    leaf_depths += u64::from(d);
                    n_leaves += 1;
                }
            }
            roots.push(slot[root]);
            depth.push(deepest);
            // Design: walking every row `deepest` steps wastes the steps a
            // row would have stopped early; worth it (no branch per step,
            // several walks in flight) unless leaves are much shallower
            // than the deepest on average.
            lockstep.push(u64::from(deepest) * n_leaves <= 2 * leaf_depths + 4 * n_leaves);
        }
        if let Some(p) = slot.iter().position(|s| *s == unset) {
            bail!(
                "node {} of tree {} is unreachable from its tree's root",
                a.node_ids[p],
                a.tree_ids[p]
            );
        }

        let mut nodes = Vec::with_capacity(n);
        let mut entry_start = Vec::with_capacity(n + 1);
        let mut entry_target = Vec::with_capacity(n_entries);
        let mut entry_weight = Vec::with_capacity(n_entries);
        let mut n_features = 0usize;
        let mut uniform: Option<Option<Mode>> = None;
        let mut has_missing = false;
        entry_start.push(0);
        for (ix, &p) in order.iter().enumerate() {
            let me = u32::try_from(ix)?;
            let Some(mode) = modes[p] else {
                nodes.push(Node {
                    key: 0,
                    children: [me, me],
                    threshold: 0.0,
                });
                for &k in &sorted[count[p] as usize..count[p + 1] as usize] {
                    entry_target.push(u32::try_from(a.leaf_targets[k])?);
                    #[allow(clippy::cast_possible_truncation)]
                    entry_weight.push(a.leaf_weights[k] as f32);
                }
                entry_start.push(u32::try_from(entry_target.len())?);
                continue;
            };
            entry_start.push(u32::try_from(entry_target.len())?);
            let feature = a.feature_ids[p];
            let feature = u32::try_from(feature)
                .ok()
                .filter(|f| *f <= FEATURE_MASK)
                .ok_or_else(|| format_err!("feature id {feature} is out of range"))?;
            n_features = n_features.max(feature as usize + 1);
            let missing = a.missing_true.get(p).is_some_and(|m| *m != 0);
            has_missing |= missing;
            uniform = match uniform {
                None => Some(Some(mode)),
                Some(Some(m)) if m == mode => Some(Some(m)),
                Some(_) => Some(None),
            };
            let key =
                feature | ((mode as u32) << FEATURE_BITS) | if missing { MISSING_BIT } else { 0 };
            nodes.push(Node {
                key,
                children: [slot[children[p][0]], slot[children[p][1]]],
                threshold: a.values[p],
            });
        }

        Ok(Forest {
            nodes,
            roots,
            depth,
            lockstep,
            entry_start,
            entry_target,
            entry_weight,
            mode: uniform.flatten(),
            has_missing,
            n_features,
        })
    }

    /// The same forest with f32 thresholds, if every threshold is exactly
    /// representable in f32 (always true for thresholds from a float list).
    pub(crate) fn to_f32(&self) -> Option<Forest<f32>> {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            #[allow(clippy::cast_possible_truncation)]
            let t = n.threshold as f32;
            if f64::from(t) != n.threshold && !(t.is_nan() && n.threshold.is_nan()) {
                return None;
            }
            nodes.push(Node {
                key: n.key,
                children: n.children,
                threshold: t,
            });
        }
        Some(Forest {
            nodes,
            roots: self.roots.clone(),
            depth: self.depth.clone(),
            lockstep: self.lockstep.clone(),
            entry_start: self.entry_start.clone(),
            entry_target: self.entry_target.clone(),
            entry_weight: self.entry_weight.clone(),
            mode: self.mode,
            has_missing: self.has_missing,
            n_features: self.n_features,
        })
    }
}

#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
fn mode_of(key: u32) -> u8 {
    ((key >> FEATURE_BITS) & MODE_MASK) as u8
}

#[inline(always)]
fn compare<T: Value>(mode: u8, v: T, t: T) -> bool {
    match mode {
        0 => v <= t,
        1 => v < t,
        2 => v >= t,
        3 => v > t,
        4 => v == t,
        _ => v != t,
    }
}

/// Walks run in lockstep, several at a time, so that their dependent
/// loads overlap.
pub(crate) const LANES: usize = 8;

/// Expands to a call of `$self.$method::<MODE, MISSING>(args)` for the
/// forest's comparison and missing-value setting, so each combination gets
/// its own compiled loop.
macro_rules! by_mode {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match ($self.mode, $self.has_missing) {
            (Some(Mode::Leq), false) => $self.$method::<0, false>($($arg),*),
            (Some(Mode::Leq), true) => $self.$method::<0, true>($($arg),*),
            (Some(Mode::Lt), false) => $self.$method::<1, false>($($arg),*),
            (Some(Mode::Lt), true) => $self.$method::<1, true>($($arg),*),
            (Some(Mode::Gte), false) => $self.$method::<2, false>($($arg),*),
            (Some(Mode::Gte), true) => $self.$method::<2, true>($($arg),*),
            (Some(Mode::Gt), false) => $self.$method::<3, false>($($arg),*),
            (Some(Mode::Gt), true) => $self.$method::<3, true>($($arg),*),
            (Some(Mode::Eq), false) => $self.$method::<4, false>($($arg),*),
            (Some(Mode::Eq), true) => $self.$method::<4, true>($($arg),*),
            (Some(Mode::Neq), false) => $self.$method::<5, false>($($arg),*),
            (Some(Mode::Neq), true) => $self.$method::<5, true>($($arg),*),
            (None, _) => $self.$method::<MIXED, true>($($arg),*),
        }
    };
}

impl<T: Value> Forest<T> {
    /// Number of trees.
    pub(crate) fn n_trees(&self) -> usize {
        self.roots.len()
    }

    /// Entries (target, weight) of leaf node `node`, as an index range.
    #[inline(always)]
    pub(crate) fn entries(&self, node: u32) -> Range<usize> {
        let n = node as usize;
        self.entry_start[n] as usize..self.entry_start[n + 1] as usize
    }

    /// One step from node `r`; a leaf steps to itself.
    #[inline(always)]
    fn step<const M: u8, const MISSING: bool>(&self, r: u32, row: &[T]) -> u32 {
        let n = &self.nodes[r as usize];
        let v = row[(n.key & FEATURE_MASK) as usize];
        let mode = if M == MIXED { mode_of(n.key) } else { M };
        let go_true =
            compare(mode, v, n.threshold) || (MISSING && n.key & MISSING_BIT != 0 && v.is_nan());
        n.children[usize::from(!go_true)]
    }

    /// Walks from `r` until a leaf, testing for it at every node.
    #[inline(always)]
    fn walk<const M: u8, const MISSING: bool>(&self, mut r: u32, row: &[T]) -> u32 {
        while self.nodes[r as usize].children[0] != r {
            r = self.step::<M, MISSING>(r, row);
        }
        r
    }

    /// `LANES` walks of exactly `steps` steps, interleaved.
    #[inline(always)]
    fn walk_lanes<const M: u8, const MISSING: bool>(
        &self,
        mut r: [u32; LANES],
        rows: [&[T]; LANES],
        steps: u32,
    ) -> [u32; LANES] {
        for _ in 0..steps {
            for k in 0..LANES {
                r[k] = self.step::<M, MISSING>(r[k], rows[k]);
            }
        }
        r
    }

    fn rows_of<const M: u8, const MISSING: bool>(
        &self,
        tree: usize,
        x: &[T],
        n_cols: usize,
        rows: Range<usize>,
        out: &mut [u32],
    ) {
        let root = self.roots[tree];
        let base = rows.start;
        let row = |r: usize| &x[r * n_cols..(r + 1) * n_cols];
        let mut r = rows.start;
        if self.lockstep[tree] {
            let steps = self.depth[tree];
            while r + LANES <= rows.end {
                let lanes = std::array::from_fn(|k| row(r + k));
                let leaves = self.walk_lanes::<M, MISSING>([root; LANES], lanes, steps);
                out[r - base..r - base + LANES].copy_from_slice(&leaves);
                r += LANES;
            }
        }
        for r in r..rows.end {
            out[r - base] = self.walk::<M, MISSING>(root, row(r));
        }
    }

    fn trees_of<const M: u8, const MISSING: bool>(&self, row: &[T], out: &mut [u32]) {
        let n = self.n_trees();
        let mut t = 0;
        while t + LANES <= n {
            let group = t..t + LANES;
            let steps = self.depth[group.clone()].iter().copied().max().unwrap_or(0);
            let shallowest = self.depth[group.clone()].iter().copied().min().unwrap_or(0);
            if self.lockstep[group.clone()].iter().all(|l| *l) && 2 * shallowest + 2 >= steps {
                let roots = std::array::from_fn(|k| self.roots[t + k]);
                let leaves = self.walk_lanes::<M, MISSING>(roots, [row; LANES], steps);
                out[t..t + LANES].copy_from_slice(&leaves);
            } else {
                for tree in group {
                    out[tree] = self.walk::<M, MISSING>(self.roots[tree], row);
                }
            }
            t += LANES;
        }
        for (o, &root) in out[t..n].iter_mut().zip(&self.roots[t..]) {
            *o = self.walk::<M, MISSING>(root, row);
        }
    }

    /// Writes to `out[i]` the leaf node that row `rows.start + i` reaches in
    /// tree `tree`. `x` is row-major with `n_cols >= n_features` columns
    /// (checked by the caller); `out` holds at least `rows.len()` values.
    pub(crate) fn leaves_of_rows(
        &self,
        tree: usize,
        x: &[T],
        n_cols: usize,
        rows: Range<usize>,
        out: &mut [u32],
    ) {
        by_mode!(self.rows_of(tree, x, n_cols, rows, out));
    }

    /// Writes to `out[t]` the leaf node `row` reaches in tree `t`
    /// (`row.len() >= n_features`, `out.len() >= n_trees`).
    pub(crate) fn leaves_of_trees(&self, row: &[T], out: &mut [u32]) {
        by_mode!(self.trees_of(row, out));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Tree 0: x0 <= 0.5 ? leaf(w=1) : (x1 < 2 ? leaf(w=2) : leaf(w=3)),
    /// listed in a scrambled order with non-contiguous node ids.
    fn attrs(mode1: &str) -> TreeAttrs {
        TreeAttrs {
            tree_ids: vec![0, 0, 0, 0, 0],
            node_ids: vec![7, 0, 3, 4, 9],
            feature_ids: vec![0, 0, 1, 0, 0],
            modes: vec![
                "LEAF".into(),
                "BRANCH_LEQ".into(),
                mode1.into(),
                "LEAF".into(),
                "LEAF".into(),
            ],
            values: vec![0.0, 0.5, 2.0, 0.0, 0.0],
            true_ids: vec![0, 7, 4, 0, 0],
            false_ids: vec![0, 3, 9, 0, 0],
            missing_true: vec![],
            leaf_tree_ids: vec![0, 0, 0],
            leaf_node_ids: vec![7, 4, 9],
            leaf_targets: vec![0, 0, 0],
            leaf_weights: vec![1.0, 2.0, 3.0],
        }
    }

    fn leaf_weight(f: &Forest<f32>, row: &[f32]) -> f32 {
        let mut by_rows = vec![0];
        f.leaves_of_rows(0, row, row.len(), 0..1, &mut by_rows);
        let mut by_trees = vec![0];
        f.leaves_of_trees(row, &mut by_trees);
        assert_eq!(by_rows, by_trees);
        f.entry_weight[f.entries(by_rows[0]).start]
    }

    #[test]
    fn root_is_found_even_when_not_listed_first_and_walks_are_right() {
        let f = Forest::build(&attrs("BRANCH_LT"), 1)
            .unwrap()
            .to_f32()
            .unwrap();
        assert_eq!(f.mode, None);
        assert_eq!(leaf_weight(&f, &[0.5, 9.0]), 1.0);
        assert_eq!(leaf_weight(&f, &[0.6, 1.9]), 2.0);
        assert_eq!(leaf_weight(&f, &[0.6, 2.0]), 3.0);
        // NaN fails every comparison but NEQ: false branch, twice.
        assert_eq!(leaf_weight(&f, &[f32::NAN, f32::NAN]), 3.0);
    }

    #[test]
    fn missing_value_tracks_send_nan_to_the_true_child() {
        let mut a = attrs("BRANCH_LEQ");
        a.missing_true = vec![0, 1, 0, 0, 0];
        let f = Forest::build(&a, 1).unwrap().to_f32().unwrap();
        assert_eq!(f.mode, Some(Mode::Leq));
        assert!(f.has_missing);
        assert_eq!(leaf_weight(&f, &[f32::NAN, 0.0]), 1.0);
    }

    #[test]
    fn malformed_trees_are_errors_not_panics() {
        let mut cyc = attrs("BRANCH_LT");
        cyc.true_ids[2] = 0; // points back to the root
        assert!(Forest::build(&cyc, 1).is_err());
        let mut dangling = attrs("BRANCH_LT");
        dangling.false_ids[1] = 42;
        assert!(Forest::build(&dangling, 1).is_err());
        let mut shared = attrs("BRANCH_LT");
        shared.false_ids[2] = 4;
        assert!(Forest::build(&shared, 1).is_err());
        let mut short = attrs("BRANCH_LT");
        short.values.pop();
        assert!(Forest::build(&short, 1).is_err());
        let mut target = attrs("BRANCH_LT");
        target.leaf_targets[0] = 1;
        assert!(Forest::build(&target, 1).is_err());
        assert!(Forest::build(&attrs("BRANCH_SOMETIMES"), 1).is_err());
        let mut feature = attrs("BRANCH_LT");
        feature.feature_ids[1] = -1;
        assert!(Forest::build(&feature, 1).is_err());
    }

    #[test]
    fn double_thresholds_that_do_not_fit_f32_stay_f64() {
        let mut a = attrs("BRANCH_LT");
        a.values[1] = 0.1;
        assert!(Forest::build(&a, 1).unwrap().to_f32().is_none());
    }
}
