//! `LSTM` and `GRU` (ONNX opsets 7-22) as single tract operators.
//!
//! Replaces tract's own, which expand into a `Scan` whose body runs as a
//! graph once per time step, and which ignore `clip`, `input_forget`,
//! `activations` and most of `sequence_lens`. Owns parsing the node,
//! shape inference, packing the weights once when they are constants, and
//! the recurrence itself (module `kernel`).
//!
//! Semantics follow the ONNX specification; where it is silent they follow
//! onnxruntime, whose outputs the fixtures `models/fixtures/rnn_*` record:
//! - `clip` bounds every gate's pre-activation (after bias and peephole
//!   terms), not the cell state fed to `h`;
//! - a batch row whose `sequence_lens` is shorter than the sequence stops
//!   there: its `Y` rows after that are zero and `Y_h`/`Y_c` are its state
//!   at its last step (zero for a length of 0); `reverse` runs each row from
//!   its own last step back to 0;
//! - the state starts from `initial_h`/`initial_c` on every call (tract's
//!   fused GRU carries it across calls instead).
//!
//! Refused at load time with an error naming the feature: activations other
//! than the defaults (sigmoid, tanh, tanh for LSTM; sigmoid, tanh for GRU),
//! and element types other than float32.

mod kernel;

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

pub use kernel::Weights;

/// The recurrent cell and its cell-specific attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cell {
    /// LSTM, gates `iofc`.
    Lstm {
        /// Couple the forget gate to the input gate: `f = 1 - i`.
        input_forget: bool,
    },
    /// GRU, gates `zrh`.
    Gru {
        /// Apply the reset gate after the recurrent product (PyTorch's form).
        linear_before_reset: bool,
    },
}

impl Cell {
    /// Gates per direction: 4 for LSTM, 3 for GRU.
    #[must_use]
    pub fn gates(self) -> usize {
        match self {
            Cell::Lstm { .. } => 4,
            Cell::Gru { .. } => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Cell::Lstm { .. } => "LSTM",
            Cell::Gru { .. } => "GRU",
        }
    }
}

/// The `direction` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Time steps 0, 1, ...
    Forward,
    /// Time steps from the last back to 0.
    Reverse,
    /// Both, forward as direction 0 and reverse as direction 1.
    Bidirectional,
}

impl Direction {
    /// Number of directions (the leading axis of W, R, B, P, `initial_h`).
    #[must_use]
    pub fn count(self) -> usize {
        if self == Direction::Bidirectional {
            2
        } else {
            1
        }
    }

    /// Whether direction `d` runs backwards in time.
    #[must_use]
    pub fn reversed(self, d: usize) -> bool {
        self == Direction::Reverse || (self == Direction::Bidirectional && d == 1)
    }
}

/// Positions of the optional inputs in the node's (compacted) input list;
/// X, W and R are always 0, 1, 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct InputSlots {
    /// `B`.
    pub b: Option<usize>,
    /// `sequence_lens`.
    pub seq_lens: Option<usize>,
    /// `initial_h`.
    pub initial_h: Option<usize>,
    /// `initial_c` (LSTM only).
    pub initial_c: Option<usize>,
    /// `P` (LSTM only).
    pub p: Option<usize>,
}

/// Which of `Y`, `Y_h`, `Y_c` the operator produces, in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutputSet {
    /// `Y`: every step's hidden state.
    pub y: bool,
    /// `Y_h`: the last hidden state.
    pub y_h: bool,
    /// `Y_c`: the last cell state (LSTM only).
    pub y_c: bool,
}

impl OutputSet {
    fn count(self) -> usize {
        usize::from(self.y) + usize::from(self.y_h) + usize::from(self.y_c)
    }
}

/// Everything the node's attributes and input list say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// LSTM or GRU.
    pub cell: Cell,
    /// `direction`.
    pub direction: Direction,
    /// `hidden_size`, when the attribute is set (else taken from R).
    pub hidden_size: Option<usize>,
    /// `clip`, if set.
    pub clip: Option<f32>,
    /// `layout == 1`: batch is the leading axis of X, Y, `initial_*`, `Y_*`.
    pub batch_first: bool,
    /// Optional inputs present.
    pub inputs: InputSlots,
    /// Outputs produced.
    pub outputs: OutputSet,
}

/// Builder for `LSTM`.
///
/// # Errors
/// When an attribute is invalid or names an unsupported feature.
pub fn lstm(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let input_forget = node.get_attr_opt::<i64>("input_forget")?.unwrap_or(0) != 0;
    parse(node, Cell::Lstm { input_forget }).with_context(|| format!("node {} (LSTM)", node.name))
}

/// Builder for `GRU`.
///
/// # Errors
/// When an attribute is invalid or names an unsupported feature.
pub fn gru(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let linear_before_reset = node
        .get_attr_opt::<i64>("linear_before_reset")?
        .unwrap_or(0)
        != 0;
    parse(
        node,
        Cell::Gru {
            linear_before_reset,
        },
    )
    .with_context(|| format!("node {} (GRU)", node.name))
}

fn parse(node: &NodeProto, cell: Cell) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let direction = match node.get_attr_opt::<&str>("direction")?.unwrap_or("forward") {
        "forward" => Direction::Forward,
        "reverse" => Direction::Reverse,
        "bidirectional" => Direction::Bidirectional,
        other => bail!("direction {other:?} is not forward, reverse or bidirectional"),
    };
    let defaults: &[&str] = match cell {
        Cell::Lstm { .. } => &["sigmoid", "tanh", "tanh"],
        Cell::Gru { .. } => &["sigmoid", "tanh"],
    };
    if let Some(acts) = node.get_attr_opt_vec::<String>("activations")? {
        ensure!(
            acts.len() == defaults.len() * direction.count(),
            "{} activations for {} direction(s); expected {}",
            acts.len(),
            direction.count(),
            defaults.len() * direction.count()
        );
        for (ix, act) in acts.iter().enumerate() {
            let want = defaults[ix % defaults.len()];
            ensure!(
                act.eq_ignore_ascii_case(want),
                "activation {act:?} (position {ix}) is not supported: only the defaults ({}) are implemented",
                defaults.join(", ")
            );
        }
    }
    let hidden_size = match node.get_attr_opt::<i64>("hidden_size")? {
        Some(h) => Some(
            usize::try_from(h)
                .ok()
                .filter(|h| *h > 0)
                .with_context(|| format!("hidden_size {h} must be positive"))?,
        ),
        None => None,
    };
    let clip = node.get_attr_opt::<f32>("clip")?;
    if let Some(c) = clip {
        ensure!(c > 0.0, "clip {c} must be positive");
    }
    let batch_first = match node.get_attr_opt::<i64>("layout")?.unwrap_or(0) {
        0 => false,
        1 => true,
        other => bail!("layout {other} is neither 0 nor 1"),
    };

    let present = |i: usize| node.input.get(i).is_some_and(|s| !s.is_empty());
    for i in 0..3 {
        ensure!(present(i), "required input {i} (X, W, R) is missing");
    }
    ensure!(
        node.input.len() <= 8,
        "{} inputs; at most 8",
        node.input.len()
    );
    let mut next = 3;
    let mut slot = |i: usize| {
        present(i).then(|| {
            next += 1;
            next - 1
        })
    };
    let inputs = InputSlots {
        b: slot(3),
        seq_lens: slot(4),
        initial_h: slot(5),
        initial_c: slot(6),
        p: slot(7),
    };
    let out = |i: usize| node.output.get(i).is_some_and(|s| !s.is_empty());
    let outputs = OutputSet {
        y: out(0),
        y_h: out(1),
        y_c: out(2),
    };
    if let Cell::Gru { .. } = cell {
        ensure!(
            inputs.initial_c.is_none() && inputs.p.is_none() && !outputs.y_c,
            "GRU has no initial_c, P or Y_c"
        );
    }
    ensure!(
        node.output.len() <= 3,
        "{} outputs; at most 3",
        node.output.len()
    );
    let config = Config {
        cell,
        direction,
        hidden_size,
        clip,
        batch_first,
        inputs,
        outputs,
    };
    Ok((expand(RnnExpansion(config)), vec![]))
}

#[derive(Debug, Clone)]
struct RnnExpansion(Config);

impl Expansion for RnnExpansion {
    fn name(&self) -> StaticName {
        self.0.cell.name().into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.0.outputs.count())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let c = &self.0;
        let slots = c.inputs;
        let n_in = 3 + [
            slots.b,
            slots.seq_lens,
            slots.initial_h,
            slots.initial_c,
            slots.p,
        ]
        .iter()
        .flatten()
        .count();
        check_input_arity(inputs, n_in)?;
        check_output_arity(outputs, c.outputs.count())?;
        let g = c.cell.gates() as i64;
        let dirs = c.direction.count() as i64;
        let (b_ax, s_ax) = if c.batch_first { (0, 1) } else { (1, 0) };
        // [dirs, batch] axes of initial_h/Y_h, and Y's [seq, dirs, batch].
        let (d_ax, bh_ax) = if c.batch_first { (1, 0) } else { (0, 1) };
        let (ys, yd, yb) = if c.batch_first { (1, 2, 0) } else { (0, 1, 2) };
        // Design: element types are checked in `wire`, where the error can
        // say that only float32 is supported.
        let dt = &inputs[0].datum_type;
        s.equals(&inputs[0].rank, 3)?;
        for w in &inputs[1..3] {
            s.equals(&w.rank, 3)?;
            s.equals(&w.shape[0], dirs.to_dim())?;
        }
        s.equals(&inputs[1].shape[2], &inputs[0].shape[2])?;
        s.equals(&inputs[1].shape[1], g * inputs[2].shape[2].bex())?;
        s.equals(&inputs[2].shape[1], g * inputs[2].shape[2].bex())?;
        if let Some(h) = c.hidden_size {
            s.equals(&inputs[2].shape[2], h.to_dim())?;
        }
        let hidden = &inputs[2].shape[2];
        if let Some(b) = slots.b {
            s.equals(&inputs[b].rank, 2)?;
            s.equals(&inputs[b].shape[0], dirs.to_dim())?;
            s.equals(&inputs[b].shape[1], 2 * g * inputs[2].shape[2].bex())?;
        }
        if let Some(l) = slots.seq_lens {
            s.equals(&inputs[l].rank, 1)?;
            s.equals(&inputs[l].shape[0], &inputs[0].shape[b_ax])?;
        }
        for state in [slots.initial_h, slots.initial_c].into_iter().flatten() {
            s.equals(&inputs[state].rank, 3)?;
            s.equals(&inputs[state].shape[d_ax], dirs.to_dim())?;
            s.equals(&inputs[state].shape[bh_ax], &inputs[0].shape[b_ax])?;
            s.equals(&inputs[state].shape[2], hidden)?;
        }
        if let Some(p) = slots.p {
            s.equals(&inputs[p].rank, 2)?;
            s.equals(&inputs[p].shape[0], dirs.to_dim())?;
            s.equals(&inputs[p].shape[1], 3 * inputs[2].shape[2].bex())?;
        }
        let mut ix = 0;
        if c.outputs.y {
            let y = &outputs[ix];
            s.equals(&y.datum_type, dt)?;
            s.equals(&y.rank, 4)?;
            s.equals(&y.shape[ys], &inputs[0].shape[s_ax])?;
            s.equals(&y.shape[yd], dirs.to_dim())?;
            s.equals(&y.shape[yb], &inputs[0].shape[b_ax])?;
            s.equals(&y.shape[3], hidden)?;
            ix += 1;
        }
        for _ in 0..usize::from(c.outputs.y_h) + usize::from(c.outputs.y_c) {
            let o = &outputs[ix];
            s.equals(&o.datum_type, dt)?;
            s.equals(&o.rank, 3)?;
            s.equals(&o.shape[d_ax], dirs.to_dim())?;
            s.equals(&o.shape[bh_ax], &inputs[0].shape[b_ax])?;
            s.equals(&o.shape[2], hidden)?;
            ix += 1;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let c = self.0;
        let name = c.cell.name();
        let slots = c.inputs;
        for (what, slot) in [
            ("X", Some(0)),
            ("W", Some(1)),
            ("R", Some(2)),
            ("B", slots.b),
            ("initial_h", slots.initial_h),
            ("initial_c", slots.initial_c),
            ("P", slots.p),
        ] {
            if let Some(s) = slot {
                let dt = model.outlet_fact(inputs[s])?.datum_type;
                ensure!(
                    dt == f32::datum_type(),
                    "{name}: {what} is {dt:?}; only float32 is supported"
                );
            }
        }
        let r = model.outlet_fact(inputs[2])?.clone();
        let hidden = r.shape[2]
            .to_usize()
            .with_context(|| format!("{name}: hidden size {} is not concrete", r.shape[2]))?;
        ensure!(hidden > 0, "{name}: hidden size is 0");
        let op = Rnn {
            config: c,
            hidden,
            weights: None,
        };
        let op = op.with_packed_weights(model, inputs)?.unwrap_or(op);
        model.wire_node(prefix, op, inputs)
    }
}

/// The typed operator: the whole recurrence, every direction, in one op.
#[derive(Debug, Clone)]
pub struct Rnn {
    config: Config,
    hidden: usize,
    /// W, R, B and P prepared once, when they are constants; `None` reads
    /// them from the inputs on every call.
    weights: Option<Arc<Weights>>,
}

impl PartialEq for Rnn {
    fn eq(&self, other: &Self) -> bool {
        let same_weights = match (&self.weights, &other.weights) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.config == other.config && self.hidden == other.hidden && same_weights
    }
}

impl Eq for Rnn {}

impl Rnn {
    /// The operator's configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether W, R, B and P were packed into the operator at load time.
    #[must_use]
    pub fn has_packed_weights(&self) -> bool {
        self.weights.is_some()
    }

    /// This op with W, R, B and P packed in, when all are constants and it
    /// has not been done.
    fn with_packed_weights(
        &self,
        model: &TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<Option<Rnn>> {
        if self.weights.is_some() {
            return Ok(None);
        }
        let konst = |slot: Option<usize>| -> TractResult<Option<Option<Arc<Tensor>>>> {
            match slot {
                None => Ok(Some(None)),
                Some(s) => Ok(model.outlet_fact(inputs[s])?.konst.clone().map(Some)),
            }
        };
        let slots = self.config.inputs;
        let (Some(Some(w)), Some(Some(r)), Some(b), Some(p)) = (
            konst(Some(1))?,
            konst(Some(2))?,
            konst(slots.b)?,
            konst(slots.p)?,
        ) else {
            return Ok(None);
        };
        let weights = Weights::prepare(
            &self.config,
            self.hidden,
            &w,
            &r,
            b.as_deref(),
            p.as_deref(),
        )?;
        Ok(Some(Rnn {
            weights: Some(Arc::new(weights)),
            ..self.clone()
        }))
    }
}

impl Op for Rnn {
    fn name(&self) -> StaticName {
        self.config.cell.name().into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let c = &self.config;
        Ok(vec![format!(
            "{:?}, hidden {}, {:?}, clip {:?}, layout {}, outputs {:?}, weights {}",
            c.cell,
            self.hidden,
            c.direction,
            c.clip,
            u8::from(c.batch_first),
            c.outputs,
            if self.weights.is_some() {
                "packed"
            } else {
                "read per call"
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Rnn {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        kernel::run(self, &inputs)
    }
}

impl TypedOp for Rnn {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let c = &self.config;
        let x = &inputs[0].shape;
        ensure!(x.rank() == 3, "X must have rank 3, has {}", x.rank());
        let (seq, batch) = if c.batch_first {
            (x[1].clone(), x[0].clone())
        } else {
            (x[0].clone(), x[1].clone())
        };
        let dirs = c.direction.count().to_dim();
        let h = self.hidden.to_dim();
        let mut facts = tvec!();
        if c.outputs.y {
            facts.push(if c.batch_first {
                f32::fact([batch.clone(), seq, dirs.clone(), h.clone()])
            } else {
                f32::fact([seq, dirs.clone(), batch.clone(), h.clone()])
            });
        }
        let state = if c.batch_first {
            f32::fact([batch, dirs, h])
        } else {
            f32::fact([dirs, batch, h])
        };
        for _ in 0..usize::from(c.outputs.y_h) + usize::from(c.outputs.y_c) {
            facts.push(state.clone());
        }
        Ok(facts)
    }

    /// Packs the weights once they are constants, and stops computing the
    /// outputs nothing reads.
    fn declutter(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TypedModelPatch>> {
        let model_outputs = model.output_outlets()?;
        let used: Vec<bool> = (0..node.outputs.len())
            .map(|ix| {
                !node.outputs[ix].successors.is_empty()
                    || model_outputs.contains(&OutletId::new(node.id, ix))
            })
            .collect();
        if !used.iter().any(|u| *u) {
            return Ok(None);
        }
        let packed = self.with_packed_weights(model, &node.inputs)?;
        if used.iter().all(|u| *u) && packed.is_none() {
            return Ok(None);
        }
        let mut op = packed.unwrap_or_else(|| self.clone());
        let mut flags = [
            self.config.outputs.y,
            self.config.outputs.y_h,
            self.config.outputs.y_c,
        ];
        let mut ix = 0;
        for present in &mut flags {
            if *present {
                *present = used.get(ix).copied().unwrap_or(false);
                ix += 1;
            }
        }
        op.config.outputs = OutputSet {
            y: flags[0],
            y_h: flags[1],
            y_c: flags[2],
        };
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(model, &node.inputs)?;
        let new_outs = patch.wire_node(&node.name, op, &taps)?;
        for (new_ix, old_ix) in (0..used.len()).filter(|ix| used[*ix]).enumerate() {
            patch.shunt_outside(model, OutletId::new(node.id, old_ix), new_outs[new_ix])?;
        }
        Ok(Some(patch))
    }

    as_op!();
}
