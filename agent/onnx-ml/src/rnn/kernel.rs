//! The recurrence of [`super::Rnn`]: float32, every direction, one call.
//!
//! Per direction: `X·Wᵀ + bias` for a chunk of time steps in one product
//! (chunks sized to stay in cache), then per step the recurrent product
//! `H·Rᵀ`, the activations in as few passes as possible (LSTM: one sigmoid
//! over all gates, its c gate doubled in the weights; GRU: gate-major
//! blocks, one pass per gate for the whole batch), and the state update.
//! Every buffer is allocated once per call, none per step.
//!
//! Invariant: every input shape and value (`sequence_lens`) is validated
//! before the loops, which then index within bounds; a bad input is an
//! error, not a panic.

use tract_onnx::tract_hir::internal::tract_ndarray::{
    self, ArrayView2, ArrayViewMut2, ShapeBuilder,
};
use tract_onnx::tract_hir::internal::*;

use super::{Cell, Config, Rnn};

/// One direction's weights in the layout the kernel reads.
#[derive(Debug, Clone)]
struct DirWeights {
    /// `Wᵀ`, `[input, gates*hidden]` (LSTM: c gate doubled, see `prepare`).
    wt: Vec<f32>,
    /// `Rᵀ`, `[hidden, gates*hidden]` (LSTM: c gate doubled).
    rt: Vec<f32>,
    /// Added to `X·Wᵀ`: `Wb + Rb` per gate, except the GRU `h` gate with
    /// `linear_before_reset`, which gets `Wbh` alone. Zeros without `B`.
    /// LSTM: c gate doubled.
    bias_x: Vec<f32>,
    /// `Rbh` (GRU with `linear_before_reset`), zeros otherwise.
    bias_rh: Vec<f32>,
    /// Peepholes `[i, o, f]` of `hidden` each; empty without `P`.
    p: Vec<f32>,
}

/// W, R, B and P of every direction, prepared for the kernel.
#[derive(Debug, Clone)]
pub struct Weights {
    dirs: Vec<DirWeights>,
    input: usize,
}

fn f32s<'a>(t: &'a Tensor, what: &str) -> TractResult<&'a [f32]> {
    ensure!(
        t.datum_type() == f32::datum_type(),
        "{what} is {:?}; only float32 is supported",
        t.datum_type()
    );
    t.try_as_plain_ram()?.as_slice::<f32>()
}

impl Weights {
    /// Checks the shapes of W `[D, G*H, I]`, R `[D, G*H, H]`, B `[D, 2*G*H]`
    /// and P `[D, 3*H]` and lays them out for the kernel.
    ///
    /// # Errors
    /// On a shape or element type that does not fit `config` and `hidden`.
    pub(super) fn prepare(
        config: &Config,
        hidden: usize,
        w: &Tensor,
        r: &Tensor,
        b: Option<&Tensor>,
        p: Option<&Tensor>,
    ) -> TractResult<Weights> {
        let dirs = config.direction.count();
        let g = config.cell.gates();
        let gh = g * hidden;
        ensure!(hidden > 0, "hidden size is 0");
        ensure!(
            w.rank() == 3 && w.shape()[0] == dirs && w.shape()[1] == gh,
            "W has shape {:?}; expected [{dirs}, {gh}, input]",
            w.shape()
        );
        let input = w.shape()[2];
        ensure!(
            r.shape() == [dirs, gh, hidden],
            "R has shape {:?}; expected [{dirs}, {gh}, {hidden}]",
            r.shape()
        );
        if let Some(b) = b {
            ensure!(
                b.shape() == [dirs, 2 * gh],
                "B has shape {:?}; expected [{dirs}, {}]",
                b.shape(),
                2 * gh
            );
        }
        if let Some(p) = p {
            ensure!(
                p.shape() == [dirs, 3 * hidden],
                "P has shape {:?}; expected [{dirs}, {}]",
                p.shape(),
                3 * hidden
            );
        }
        let w = f32s(w, "W")?;
        let r = f32s(r, "R")?;
        let b = b.map(|b| f32s(b, "B")).transpose()?;
        let p = p.map(|p| f32s(p, "P")).transpose()?;
        let lbr = matches!(
            config.cell,
            Cell::Gru {
                linear_before_reset: true
            }
        );
        let mut out = Vec::with_capacity(dirs);
        for d in 0..dirs {
            let wd = &w[d * gh * input..(d + 1) * gh * input];
            let rd = &r[d * gh * hidden..(d + 1) * gh * hidden];
            let mut wt = vec![0f32; input * gh];
            for (row, w_row) in wd.chunks_exact(input.max(1)).enumerate().take(gh) {
                for (k, v) in w_row.iter().enumerate() {
                    wt[k * gh + row] = *v;
                }
            }
            let mut rt = vec![0f32; hidden * gh];
            for (row, r_row) in rd.chunks_exact(hidden).enumerate() {
                for (k, v) in r_row.iter().enumerate() {
                    rt[k * gh + row] = *v;
                }
            }
            let mut bias_x = vec![0f32; gh];
            let mut bias_rh = vec![0f32; hidden];
            if let Some(b) = b {
                let bd = &b[d * 2 * gh..(d + 1) * 2 * gh];
                let (wb, rb) = bd.split_at(gh);
                for j in 0..gh {
                    let in_h_gate = j >= 2 * hidden;
                    bias_x[j] = if lbr && in_h_gate {
                        wb[j]
                    } else {
                        wb[j] + rb[j]
                    };
                }
                if lbr {
                    bias_rh.copy_from_slice(&rb[2 * hidden..]);
                }
            }
            let p = p.map_or_else(Vec::new, |p| {
                p[d * 3 * hidden..(d + 1) * 3 * hidden].to_vec()
            });
            if let Cell::Lstm { .. } = config.cell {
                // Design: the c gate's columns are doubled (exact in binary
                // floating point) so one sigmoid pass covers all four gates:
                // tanh(x) = 2·σ(2x) − 1.
                let c_cols = 3 * hidden..gh;
                for row in wt.chunks_exact_mut(gh).chain(rt.chunks_exact_mut(gh)) {
                    row[c_cols.clone()].iter_mut().for_each(|v| *v *= 2.0);
                }
                bias_x[c_cols].iter_mut().for_each(|v| *v *= 2.0);
            }
            out.push(DirWeights {
                wt,
                rt,
                bias_x,
                bias_rh,
                p,
            });
        }
        Ok(Weights { dirs: out, input })
    }
}

/// Offsets into X, Y and the state tensors for either `layout`.
#[derive(Debug, Clone, Copy)]
struct Layout {
    batch_first: bool,
    seq: usize,
    batch: usize,
    dirs: usize,
    hidden: usize,
}

impl Layout {
    /// Row of X (and of `X·Wᵀ`) holding step `t` of batch row `b`.
    fn x_row(self, t: usize, b: usize) -> usize {
        if self.batch_first {
            b * self.seq + t
        } else {
            t * self.batch + b
        }
    }

    fn y_offset(self, t: usize, d: usize, b: usize) -> usize {
        let h = self.hidden;
        if self.batch_first {
            ((b * self.seq + t) * self.dirs + d) * h
        } else {
            ((t * self.dirs + d) * self.batch + b) * h
        }
    }

    /// Offset of `[d, b]` in `initial_*`/`Y_*`.
    fn state_offset(self, d: usize, b: usize) -> usize {
        if self.batch_first {
            (b * self.dirs + d) * self.hidden
        } else {
            (d * self.batch + b) * self.hidden
        }
    }
}

/// Buffers reused across steps and directions.
struct Scratch {
    /// The X rows of the current chunk of steps, `[chunk*batch, input]`.
    xa: Vec<f32>,
    /// Their projection `X·Wᵀ + bias`, `[chunk*batch, gates*hidden]`.
    xw: Vec<f32>,
    rec: Vec<f32>,
    pre: Vec<f32>,
    h: Vec<f32>,
    c: Vec<f32>,
    tmp: Vec<f32>,
    tmp2: Vec<f32>,
}

/// Runs the op on its inputs.
pub(super) fn run(op: &Rnn, inputs: &[TValue]) -> TractResult<TVec<TValue>> {
    let c = &op.config;
    let hidden = op.hidden;
    let owned;
    let weights: &Weights = match &op.weights {
        Some(w) => w,
        None => {
            let opt = |slot: Option<usize>| slot.and_then(|s| inputs.get(s)).map(|t| &**t);
            owned = Weights::prepare(
                c,
                hidden,
                &inputs[1],
                &inputs[2],
                opt(c.inputs.b),
                opt(c.inputs.p),
            )?;
            &owned
        }
    };
    let x_t = &inputs[0];
    let x = f32s(x_t, "X")?;
    let &[a0, a1, input] = x_t.shape() else {
        bail!("X has shape {:?}; expected rank 3", x_t.shape());
    };
    ensure!(
        input == weights.input,
        "X has {input} features, W expects {}",
        weights.input
    );
    let (seq, batch) = if c.batch_first { (a1, a0) } else { (a0, a1) };
    let dirs = c.direction.count();
    let lay = Layout {
        batch_first: c.batch_first,
        seq,
        batch,
        dirs,
        hidden,
    };
    let lens: Vec<usize> = match c.inputs.seq_lens {
        None => vec![seq; batch],
        Some(s) => {
            let l = inputs[s].cast_to::<i64>()?;
            let l = l.try_as_plain_ram()?.as_slice::<i64>()?;
            ensure!(
                l.len() == batch,
                "sequence_lens has {} values for batch {batch}",
                l.len()
            );
            l.iter()
                .map(|&v| {
                    usize::try_from(v)
                        .ok()
                        .filter(|v| *v <= seq)
                        .with_context(|| format!("sequence_lens value {v} is outside 0..={seq}"))
                })
                .collect::<TractResult<_>>()?
        }
    };
    let state_len = dirs * batch * hidden;
    let state_input = |slot: Option<usize>, what: &str| -> TractResult<Option<&[f32]>> {
        let Some(s) = slot else { return Ok(None) };
        let v = f32s(&inputs[s], what)?;
        ensure!(
            v.len() == state_len,
            "{what} has {} values; expected {state_len}",
            v.len()
        );
        Ok(Some(v))
    };
    let h0 = state_input(c.inputs.initial_h, "initial_h")?;
    let c0 = state_input(c.inputs.initial_c, "initial_c")?;

    let g = c.cell.gates();
    let gh = g * hidden;
    // Design: the projection runs over chunks of steps whose result stays in
    // cache (~64 KiB): over the whole sequence at once it is written to and
    // read back from memory, which cost more than the product itself.
    let chunk = (16 * 1024 / (batch * gh).max(1)).clamp(1, seq.max(1));
    let mut s = Scratch {
        xa: vec![0f32; chunk * batch * input],
        xw: vec![0f32; chunk * batch * gh],
        rec: vec![0f32; batch * gh],
        pre: vec![0f32; batch * gh],
        h: vec![0f32; batch * hidden],
        c: vec![0f32; batch * hidden],
        tmp: vec![0f32; batch * hidden],
        tmp2: vec![0f32; batch * hidden],
    };
    let mut y = if c.outputs.y {
        vec![0f32; seq * dirs * batch * hidden]
    } else {
        Vec::new()
    };
    let mut y_h = vec![0f32; state_len];
    let mut y_c = vec![0f32; if c.outputs.y_c { state_len } else { 0 }];
    for (d, w) in weights.dirs.iter().enumerate() {
        let dir = Direction {
            d,
            reversed: c.direction.reversed(d),
            lens: &lens,
            lay,
            x,
            input,
            chunk,
        };
        clear_upper_vector_state();
        for b in 0..batch {
            let off = lay.state_offset(d, b);
            let hb = &mut s.h[b * hidden..(b + 1) * hidden];
            match h0 {
                Some(h0) => hb.copy_from_slice(&h0[off..off + hidden]),
                None => hb.fill(0.0),
            }
            let cb = &mut s.c[b * hidden..(b + 1) * hidden];
            match c0 {
                Some(c0) => cb.copy_from_slice(&c0[off..off + hidden]),
                None => cb.fill(0.0),
            }
        }
        match c.cell {
            Cell::Lstm { input_forget } => lstm(&dir, w, input_forget, c.clip, &mut s, &mut y)?,
            Cell::Gru {
                linear_before_reset,
            } => gru(&dir, w, linear_before_reset, c.clip, &mut s, &mut y)?,
        }
        for (b, &len) in lens.iter().enumerate() {
            let off = lay.state_offset(d, b);
            let live = len > 0;
            let src = &s.h[b * hidden..(b + 1) * hidden];
            let dst = &mut y_h[off..off + hidden];
            if live {
                dst.copy_from_slice(src);
            } else {
                dst.fill(0.0);
            }
            if c.outputs.y_c {
                let dst = &mut y_c[off..off + hidden];
                if live {
                    dst.copy_from_slice(&s.c[b * hidden..(b + 1) * hidden]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
    }
    let state_shape = if c.batch_first {
        vec![batch, dirs, hidden]
    } else {
        vec![dirs, batch, hidden]
    };
    let mut out = tvec!();
    if c.outputs.y {
        let shape = if c.batch_first {
            vec![batch, seq, dirs, hidden]
        } else {
            vec![seq, dirs, batch, hidden]
        };
        out.push(tract_ndarray::ArrayD::from_shape_vec(shape, y)?.into_tvalue());
    }
    if c.outputs.y_h {
        out.push(tract_ndarray::ArrayD::from_shape_vec(state_shape.clone(), y_h)?.into_tvalue());
    }
    if c.outputs.y_c {
        out.push(tract_ndarray::ArrayD::from_shape_vec(state_shape, y_c)?.into_tvalue());
    }
    Ok(out)
}

/// What one direction's loop needs to know about time and X.
struct Direction<'a> {
    d: usize,
    reversed: bool,
    lens: &'a [usize],
    lay: Layout,
    x: &'a [f32],
    input: usize,
    /// Steps projected at once.
    chunk: usize,
}

impl Direction<'_> {
    /// The time index batch row `b` is at in `step`, if it still runs.
    fn time(&self, step: usize, b: usize) -> Option<usize> {
        let len = self.lens[b];
        (step < len).then(|| if self.reversed { len - 1 - step } else { step })
    }

    fn steps(&self) -> usize {
        self.lens.iter().copied().max().unwrap_or(0)
    }

    /// Row of `s.xw` holding `step` of batch row `b`.
    fn xw_row(&self, step: usize, b: usize) -> usize {
        (step % self.chunk) * self.lay.batch + b
    }

    /// At the first step of a chunk, fills `s.xw` with `X·Wᵀ + bias` for the
    /// chunk's steps (zeros for rows that no longer run).
    fn project(&self, step: usize, w: &DirWeights, s: &mut Scratch) -> TractResult<()> {
        if !step.is_multiple_of(self.chunk) {
            return Ok(());
        }
        let (batch, input) = (self.lay.batch, self.input);
        let gh = w.bias_x.len();
        let steps = self.chunk.min(self.steps() - step);
        for k in 0..steps {
            for b in 0..batch {
                let row = k * batch + b;
                let xa = &mut s.xa[row * input..(row + 1) * input];
                let xw = &mut s.xw[row * gh..(row + 1) * gh];
                match self.time(step + k, b) {
                    Some(t) => {
                        let src = self.lay.x_row(t, b) * input;
                        xa.copy_from_slice(&self.x[src..src + input]);
                        xw.copy_from_slice(&w.bias_x);
                    }
                    None => {
                        xa.fill(0.0);
                        xw.fill(0.0);
                    }
                }
            }
        }
        matmul_acc(
            steps * batch,
            input,
            gh,
            &s.xa,
            input,
            &w.wt,
            gh,
            &mut s.xw,
            gh,
        )
    }
}

fn clip_all(v: &mut [f32], clip: Option<f32>) {
    if let Some(c) = clip {
        for x in v {
            *x = x.clamp(-c, c);
        }
    }
}

/// One LSTM direction. `pre` holds each batch row's `i, o, f, c`
/// pre-activations side by side (`[batch, 4*hidden]`, the layout of the
/// products), the c gate doubled so that one sigmoid pass serves all gates.
fn lstm(
    dir: &Direction,
    w: &DirWeights,
    input_forget: bool,
    clip: Option<f32>,
    s: &mut Scratch,
    y: &mut [f32],
) -> TractResult<()> {
    let lay = dir.lay;
    let (batch, h) = (lay.batch, lay.hidden);
    let gh = 4 * h;
    let peep = !w.p.is_empty();
    let (i_r, o_r, f_r, c_r) = (0..h, h..2 * h, 2 * h..3 * h, 3 * h..gh);
    for step in 0..dir.steps() {
        dir.project(step, w, s)?;
        // Rows that stopped read zeros from the projection; their values
        // are computed and ignored.
        let first = dir.xw_row(step, 0) * gh;
        s.pre.copy_from_slice(&s.xw[first..first + batch * gh]);
        matmul_acc(batch, h, gh, &s.h, h, &w.rt, gh, &mut s.pre, gh)?;
        if peep {
            for b in 0..batch {
                let row = &mut s.pre[b * gh..(b + 1) * gh];
                let cprev = &s.c[b * h..(b + 1) * h];
                for (gate, p) in [(i_r.clone(), &w.p[..h]), (f_r.clone(), &w.p[2 * h..])] {
                    for ((v, p), cp) in row[gate].iter_mut().zip(p).zip(cprev) {
                        *v += p * cp;
                    }
                }
            }
        }
        if let Some(cl) = clip {
            for row in s.pre.chunks_exact_mut(gh) {
                let sig_gates = if peep { 0..h } else { 0..3 * h };
                clip_all(&mut row[sig_gates], Some(cl));
                clip_all(&mut row[f_r.clone()], Some(cl));
                clip_all(&mut row[c_r.clone()], Some(2.0 * cl));
            }
        }
        if peep {
            for row in s.pre.chunks_exact_mut(gh) {
                sigmoid(&mut row[i_r.clone()]);
                sigmoid(&mut row[2 * h..]);
            }
        } else {
            sigmoid(&mut s.pre);
        }
        for b in 0..batch {
            if dir.time(step, b).is_none() {
                continue;
            }
            let row = &mut s.pre[b * gh..(b + 1) * gh];
            let cb = &mut s.c[b * h..(b + 1) * h];
            let (iof, cg) = row.split_at_mut(3 * h);
            if input_forget {
                let (i_g, of) = iof.split_at_mut(h);
                for (f, i) in of[h..].iter_mut().zip(i_g.iter()) {
                    *f = 1.0 - i;
                }
            }
            let (i_g, of) = iof.split_at(h);
            let f_g = &of[h..];
            for (((cv, f), i), g) in cb.iter_mut().zip(f_g).zip(i_g).zip(cg.iter()) {
                *cv = f * *cv + i * (2.0 * g - 1.0);
            }
            if peep {
                let o_g = &mut row[o_r.clone()];
                for ((o, p), cv) in o_g.iter_mut().zip(&w.p[h..2 * h]).zip(cb.iter()) {
                    *o += p * cv;
                }
                clip_all(o_g, clip);
                sigmoid(o_g);
            }
        }
        s.tmp.copy_from_slice(&s.c);
        tanh(&mut s.tmp);
        for b in 0..batch {
            let Some(t) = dir.time(step, b) else { continue };
            let r = b * h..(b + 1) * h;
            let o_g = &s.pre[b * gh + h..b * gh + 2 * h];
            for ((hv, o), tc) in s.h[r.clone()].iter_mut().zip(o_g).zip(&s.tmp[r.clone()]) {
                *hv = o * tc;
            }
            if !y.is_empty() {
                let off = lay.y_offset(t, dir.d, b);
                y[off..off + h].copy_from_slice(&s.h[r]);
            }
        }
    }
    Ok(())
}

/// One GRU direction. Gate-major `pre` holds `z, r, h` blocks of
/// `[batch, hidden]`.
fn gru(
    dir: &Direction,
    w: &DirWeights,
    linear_before_reset: bool,
    clip: Option<f32>,
    s: &mut Scratch,
    y: &mut [f32],
) -> TractResult<()> {
    let lay = dir.lay;
    let (batch, h) = (lay.batch, lay.hidden);
    let gh = 3 * h;
    let bh = batch * h;
    // Without linear_before_reset the h gate's product waits for r.
    let rec_cols = if linear_before_reset { gh } else { 2 * h };
    for step in 0..dir.steps() {
        dir.project(step, w, s)?;
        s.rec.fill(0.0);
        matmul_acc(batch, h, rec_cols, &s.h, h, &w.rt, gh, &mut s.rec, gh)?;
        for b in 0..batch {
            let Some(_) = dir.time(step, b) else {
                for gate in 0..3 {
                    s.pre[gate * bh + b * h..gate * bh + (b + 1) * h].fill(0.0);
                }
                continue;
            };
            let xr = &s.xw[dir.xw_row(step, b) * gh..][..gh];
            let rr = &s.rec[b * gh..][..gh];
            for gate in 0..2 {
                let dst = &mut s.pre[gate * bh + b * h..][..h];
                for ((d, x), r) in dst
                    .iter_mut()
                    .zip(&xr[gate * h..][..h])
                    .zip(&rr[gate * h..][..h])
                {
                    *d = x + r;
                }
            }
        }
        let (zr, hg) = s.pre.split_at_mut(2 * bh);
        clip_all(zr, clip);
        sigmoid(zr);
        let (z_g, r_g) = zr.split_at_mut(bh);
        if linear_before_reset {
            for b in 0..batch {
                let Some(_) = dir.time(step, b) else {
                    hg[b * h..(b + 1) * h].fill(0.0);
                    continue;
                };
                let xh = &s.xw[dir.xw_row(step, b) * gh + 2 * h..][..h];
                let rh = &s.rec[b * gh + 2 * h..][..h];
                let rgate = &r_g[b * h..][..h];
                for ((((d, x), rv), rb), rg) in hg[b * h..][..h]
                    .iter_mut()
                    .zip(xh)
                    .zip(rh)
                    .zip(&w.bias_rh)
                    .zip(rgate)
                {
                    *d = x + rg * (rv + rb);
                }
            }
        } else {
            for ((t, r), hp) in s.tmp.iter_mut().zip(r_g.iter()).zip(&s.h) {
                *t = r * hp;
            }
            s.tmp2.fill(0.0);
            matmul_acc(batch, h, h, &s.tmp, h, &w.rt[2 * h..], gh, &mut s.tmp2, h)?;
            for b in 0..batch {
                let Some(_) = dir.time(step, b) else {
                    hg[b * h..(b + 1) * h].fill(0.0);
                    continue;
                };
                let xh = &s.xw[dir.xw_row(step, b) * gh + 2 * h..][..h];
                for ((d, x), p) in hg[b * h..][..h]
                    .iter_mut()
                    .zip(xh)
                    .zip(&s.tmp2[b * h..][..h])
                {
                    *d = x + p;
                }
            }
        }
        clip_all(hg, clip);
        tanh(hg);
        for b in 0..batch {
            let Some(t) = dir.time(step, b) else { continue };
            let r = b * h..(b + 1) * h;
            for ((hv, z), cand) in s.h[r.clone()]
                .iter_mut()
                .zip(&z_g[r.clone()])
                .zip(&hg[r.clone()])
            {
                *hv = cand + z * (*hv - cand);
            }
            if !y.is_empty() {
                let off = lay.y_offset(t, dir.d, b);
                y[off..off + h].copy_from_slice(&s.h[r]);
            }
        }
    }
    Ok(())
}

/// Leaves the CPU's wide vector registers clean before the step loops.
///
/// Design: tract's hand-written AVX kernels (the other nodes of a plan)
/// can return with the upper halves of the vector registers dirty; every
/// SSE instruction of the portable loops here then waits on them, which
/// made a batch-1 LSTM 3x slower. Compiled AVX code ends with
/// `vzeroupper`, so one tiny product through `matrixmultiply` (AVX kernels
/// picked at run time) cleans the state without `unsafe`.
fn clear_upper_vector_state() {
    let a = [0f32; 1];
    let b = [0f32; 1];
    let mut c = [0f32; 1];
    if let (Ok(av), Ok(bv), Ok(mut cv)) = (
        ArrayView2::from_shape((1, 1), &a[..]),
        ArrayView2::from_shape((1, 1), &b[..]),
        ArrayViewMut2::from_shape((1, 1), &mut c[..]),
    ) {
        tract_ndarray::linalg::general_mat_mul(1.0, &av, &bv, 0.0, &mut cv);
    }
}

/// Up to this many rows the hand-written product runs; above it the
/// `matrixmultiply` GEMM behind ndarray (packing pays off, and it picks
/// AVX/FMA kernels at run time).
const SMALL_M: usize = 4;
/// Products over at most this many terms also run by hand: GEMM packing
/// does not pay off for them.
const SMALL_K: usize = 8;

/// `c[m×n] += a[m×k] · b[k×n]`, all row-major with the given row strides.
#[allow(clippy::too_many_arguments)]
fn matmul_acc(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) -> TractResult<()> {
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    ensure!(
        a.len() >= (m - 1) * lda + k
            && b.len() >= (k - 1) * ldb + n
            && c.len() >= (m - 1) * ldc + n,
        "matrix product operands too short"
    );
    if m > SMALL_M && k > SMALL_K {
        let av = ArrayView2::from_shape((m, k).strides((lda, 1)), a)?;
        let bv = ArrayView2::from_shape((k, n).strides((ldb, 1)), b)?;
        let mut cv = ArrayViewMut2::from_shape((m, n).strides((ldc, 1)), c)?;
        tract_ndarray::linalg::general_mat_mul(1.0, &av, &bv, 1.0, &mut cv);
        return Ok(());
    }
    small_matmul(m, k, n, a, lda, b, ldb, c, ldc);
    Ok(())
}

/// The hand-written product of [`matmul_acc`], bounds already checked.
// Design: never inlined, so its loops are compiled (and vectorized) the same
// way whatever calls it; inlined into the step loops they were not.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn small_matmul(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    for i in 0..m {
        let arow = &a[i * lda..i * lda + k];
        let crow = &mut c[i * ldc..i * ldc + n];
        let mut j = 0;
        // Design: 32 columns keep 8 independent SSE accumulator chains, enough
        // to hide the add latency that bounds a 16-column block.
        while j + 32 <= n {
            block::<32>(arow, b, ldb, j, &mut crow[j..j + 32]);
            j += 32;
        }
        while j + 16 <= n {
            block::<16>(arow, b, ldb, j, &mut crow[j..j + 16]);
            j += 16;
        }
        while j + 4 <= n {
            block::<4>(arow, b, ldb, j, &mut crow[j..j + 4]);
            j += 4;
        }
        while j < n {
            block::<1>(arow, b, ldb, j, &mut crow[j..j + 1]);
            j += 1;
        }
    }
}

/// `out[0..N] += Σₖ arow[k] · b[k, j..j+N]`, accumulated in registers.
#[inline(always)]
fn block<const N: usize>(arow: &[f32], b: &[f32], ldb: usize, j: usize, out: &mut [f32]) {
    let mut acc = [0f32; N];
    for (kk, av) in arow.iter().enumerate() {
        let Some(brow) = b.get(kk * ldb + j..kk * ldb + j + N) else {
            return;
        };
        for (a, bv) in acc.iter_mut().zip(brow) {
            *a += av * bv;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o += a;
    }
}

// Rational approximation of tanh on [-9, 9] (odd degree-13 over even
// degree-6 polynomial; the form Eigen and onnxruntime's MLAS use), written
// so the loops vectorize. Absolute error below 1e-6.
const TANH_BOUND: f32 = 9.0;
const A1: f32 = 4.893_524_6e-3;
const A3: f32 = 6.372_619_3e-4;
const A5: f32 = 1.485_722_4e-5;
const A7: f32 = 5.122_297e-8;
const A9: f32 = -8.604_672e-11;
const A11: f32 = 2.000_188e-13;
const A13: f32 = -2.760_768_5e-16;
const B0: f32 = 4.893_525e-3;
const B2: f32 = 2.268_434_6e-3;
const B4: f32 = 1.185_347_1e-4;
const B6: f32 = 1.198_258_4e-6;

#[inline(always)]
fn tanh1(x: f32) -> f32 {
    let x = x.clamp(-TANH_BOUND, TANH_BOUND);
    let x2 = x * x;
    let p = ((((((A13 * x2 + A11) * x2 + A9) * x2 + A7) * x2 + A5) * x2 + A3) * x2 + A1) * x;
    let q = ((B6 * x2 + B4) * x2 + B2) * x2 + B0;
    p / q
}

/// From this many elements on, the activations run on tract-linalg's
/// kernels (AVX2/AVX-512/NEON picked at run time); below it their per-call
/// overhead costs more than the portable loops here.
const LINALG_MIN: usize = 256;

type Ew = Box<dyn tract_linalg::element_wise::ElementWise<f32>>;

/// tract-linalg's sigmoid and tanh for this CPU, if it has them.
fn linalg_kernels() -> Option<&'static (Ew, Ew)> {
    static KERNELS: std::sync::OnceLock<Option<(Ew, Ew)>> = std::sync::OnceLock::new();
    KERNELS
        .get_or_init(|| {
            use tract_linalg::routines::Func;
            Some((Func::Sigmoid.ew_f32().ok()?, Func::Tanh.ew_f32().ok()?))
        })
        .as_ref()
}

/// `tanh` in place.
fn tanh(v: &mut [f32]) {
    if v.len() >= LINALG_MIN
        && let Some((_, k)) = linalg_kernels()
        && k.run(v).is_ok()
    {
        clear_upper_vector_state();
        return;
    }
    for x in v {
        *x = tanh1(*x);
    }
}

/// The logistic function in place, as `(1 + tanh(x/2)) / 2`.
fn sigmoid(v: &mut [f32]) {
    if v.len() >= LINALG_MIN
        && let Some((k, _)) = linalg_kernels()
        && k.run(v).is_ok()
    {
        clear_upper_vector_state();
        return;
    }
    for x in v {
        *x = 0.5 + 0.5 * tanh1(0.5 * *x);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rnn::{Direction as Dirs, InputSlots, OutputSet};

    /// A small deterministic generator of values in [-1, 1).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    #[test]
    fn tanh_and_sigmoid_approximations_are_accurate() {
        let mut worst = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 * 1e-3;
            let mut v = [x];
            tanh(&mut v);
            worst = worst.max((f64::from(v[0]) - f64::from(x).tanh()).abs());
            let mut v = [x];
            sigmoid(&mut v);
            let want = 1.0 / (1.0 + (-f64::from(x)).exp());
            worst = worst.max((f64::from(v[0]) - want).abs());
        }
        assert!(worst < 2e-6, "worst absolute error {worst}");
    }

    #[test]
    fn small_and_gemm_products_agree_with_the_definition() {
        let mut rng = Lcg(3);
        for (m, k, n) in [
            (1, 24, 96),
            (3, 5, 21),
            (4, 7, 33),
            (9, 24, 72),
            (64, 3, 96),
        ] {
            let (lda, ldb, ldc) = (k + 1, n + 3, n + 2);
            let a = rng.vec(m * lda);
            let b = rng.vec(k * ldb);
            let mut c = rng.vec(m * ldc);
            let mut want = c.clone();
            for i in 0..m {
                for j in 0..n {
                    let dot: f32 = (0..k).map(|kk| a[i * lda + kk] * b[kk * ldb + j]).sum();
                    want[i * ldc + j] += dot;
                }
            }
            matmul_acc(m, k, n, &a, lda, &b, ldb, &mut c, ldc).unwrap();
            for (g, w) in c.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{m}x{k}x{n}: {g} vs {w}");
            }
        }
    }

    /// One test configuration.
    #[derive(Debug, Clone, Copy)]
    struct Case {
        cell: Cell,
        dirs: Dirs,
        clip: Option<f32>,
        peepholes: bool,
        batch: usize,
        seq_lens: bool,
        initial: bool,
        batch_first: bool,
    }

    struct Data {
        seq: usize,
        input: usize,
        hidden: usize,
        /// Time-major X `[S, B, I]`.
        x: Vec<f32>,
        w: Vec<f32>,
        r: Vec<f32>,
        b: Vec<f32>,
        p: Vec<f32>,
        lens: Vec<usize>,
        /// `[D, B, H]`.
        h0: Vec<f32>,
        c0: Vec<f32>,
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// The ONNX formulas in f64, one row and direction at a time; returns
    /// time-major `Y [S, D, B, H]`, `Y_h` and `Y_c` `[D, B, H]`.
    fn reference(case: &Case, d: &Data) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (s, bsz, h, i_n) = (d.seq, case.batch, d.hidden, d.input);
        let dirs = case.dirs.count();
        let g = case.cell.gates();
        let clip = |v: f64| {
            case.clip
                .map_or(v, |c| v.clamp(-f64::from(c), f64::from(c)))
        };
        let mut y = vec![0f64; s * dirs * bsz * h];
        let mut yh = vec![0f64; dirs * bsz * h];
        let mut yc = vec![0f64; dirs * bsz * h];
        for dir in 0..dirs {
            let w = |row: usize, col: usize| f64::from(d.w[(dir * g * h + row) * i_n + col]);
            let r = |row: usize, col: usize| f64::from(d.r[(dir * g * h + row) * h + col]);
            let wb = |row: usize| f64::from(d.b[dir * 2 * g * h + row]);
            let rb = |row: usize| f64::from(d.b[dir * 2 * g * h + g * h + row]);
            let p = |row: usize| {
                if case.peepholes {
                    f64::from(d.p[dir * 3 * h + row])
                } else {
                    0.0
                }
            };
            for b in 0..bsz {
                let len = d.lens[b];
                let mut hs: Vec<f64> = (0..h)
                    .map(|j| f64::from(d.h0[(dir * bsz + b) * h + j]))
                    .collect();
                let mut cs: Vec<f64> = (0..h)
                    .map(|j| f64::from(d.c0[(dir * bsz + b) * h + j]))
                    .collect();
                for step in 0..len {
                    let t = if case.dirs.reversed(dir) {
                        len - 1 - step
                    } else {
                        step
                    };
                    let xt: Vec<f64> = (0..i_n)
                        .map(|k| f64::from(d.x[(t * bsz + b) * i_n + k]))
                        .collect();
                    let xw = |gate: usize, j: usize| {
                        (0..i_n).map(|k| xt[k] * w(gate * h + j, k)).sum::<f64>()
                    };
                    let hr = |hv: &[f64], gate: usize, j: usize| {
                        (0..h).map(|k| hv[k] * r(gate * h + j, k)).sum::<f64>()
                    };
                    match case.cell {
                        Cell::Lstm { input_forget } => {
                            let pre = |gate: usize, j: usize| {
                                xw(gate, j) + hr(&hs, gate, j) + wb(gate * h + j) + rb(gate * h + j)
                            };
                            let mut nc = vec![0f64; h];
                            let mut nh = vec![0f64; h];
                            for j in 0..h {
                                let it = sig(clip(pre(0, j) + p(j) * cs[j]));
                                let ft = if input_forget {
                                    1.0 - it
                                } else {
                                    sig(clip(pre(2, j) + p(2 * h + j) * cs[j]))
                                };
                                let ct = clip(pre(3, j)).tanh();
                                nc[j] = ft * cs[j] + it * ct;
                                let ot = sig(clip(pre(1, j) + p(h + j) * nc[j]));
                                nh[j] = ot * nc[j].tanh();
                            }
                            hs = nh;
                            cs = nc;
                        }
                        Cell::Gru {
                            linear_before_reset,
                        } => {
                            let mut nh = vec![0f64; h];
                            let zt: Vec<f64> = (0..h)
                                .map(|j| sig(clip(xw(0, j) + hr(&hs, 0, j) + wb(j) + rb(j))))
                                .collect();
                            let rt: Vec<f64> = (0..h)
                                .map(|j| {
                                    sig(clip(xw(1, j) + hr(&hs, 1, j) + wb(h + j) + rb(h + j)))
                                })
                                .collect();
                            let rh: Vec<f64> = (0..h).map(|j| rt[j] * hs[j]).collect();
                            for j in 0..h {
                                let rec = if linear_before_reset {
                                    rt[j] * (hr(&hs, 2, j) + rb(2 * h + j))
                                } else {
                                    hr(&rh, 2, j) + rb(2 * h + j)
                                };
                                let ht = clip(xw(2, j) + rec + wb(2 * h + j)).tanh();
                                nh[j] = (1.0 - zt[j]) * ht + zt[j] * hs[j];
                            }
                            hs = nh;
                        }
                    }
                    for j in 0..h {
                        y[((t * dirs + dir) * bsz + b) * h + j] = hs[j];
                    }
                }
                for j in 0..h {
                    let live = len > 0;
                    yh[(dir * bsz + b) * h + j] = if live { hs[j] } else { 0.0 };
                    yc[(dir * bsz + b) * h + j] = if live { cs[j] } else { 0.0 };
                }
            }
        }
        (y, yh, yc)
    }

    /// `[A, B, C]` to `[B, A, C]`.
    fn swap01<T: Copy>(v: &[T], a: usize, b: usize, c: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(v.len());
        for j in 0..b {
            for i in 0..a {
                out.extend_from_slice(&v[(i * b + j) * c..(i * b + j + 1) * c]);
            }
        }
        out
    }

    fn check(case: Case, rng: &mut Lcg) {
        let (seq, input, hidden) = (5, 3, 6);
        let dirs = case.dirs.count();
        let g = case.cell.gates();
        let bsz = case.batch;
        let lens: Vec<usize> = if case.seq_lens {
            (0..bsz).map(|b| [seq, 2, 0, 4, 1][b % 5]).collect()
        } else {
            vec![seq; bsz]
        };
        let lstm = matches!(case.cell, Cell::Lstm { .. });
        let d = Data {
            seq,
            input,
            hidden,
            x: rng.vec(seq * bsz * input),
            w: rng.vec(dirs * g * hidden * input),
            r: rng.vec(dirs * g * hidden * hidden),
            b: rng.vec(dirs * 2 * g * hidden),
            p: if case.peepholes {
                rng.vec(dirs * 3 * hidden)
            } else {
                vec![]
            },
            lens,
            h0: if case.initial {
                rng.vec(dirs * bsz * hidden)
            } else {
                vec![0.0; dirs * bsz * hidden]
            },
            c0: if case.initial && lstm {
                rng.vec(dirs * bsz * hidden)
            } else {
                vec![0.0; dirs * bsz * hidden]
            },
        };
        let (y, yh, yc) = reference(&case, &d);

        let bf = case.batch_first;
        let mut inputs: TVec<TValue> = tvec!();
        let x = if bf {
            swap01(&d.x, seq, bsz, input)
        } else {
            d.x.clone()
        };
        let x_shape = if bf {
            [bsz, seq, input]
        } else {
            [seq, bsz, input]
        };
        inputs.push(Tensor::from_shape(&x_shape, &x).unwrap().into_tvalue());
        inputs.push(
            Tensor::from_shape(&[dirs, g * hidden, input], &d.w)
                .unwrap()
                .into_tvalue(),
        );
        inputs.push(
            Tensor::from_shape(&[dirs, g * hidden, hidden], &d.r)
                .unwrap()
                .into_tvalue(),
        );
        let mut slots = InputSlots::default();
        let push = |t: Tensor, inputs: &mut TVec<TValue>| {
            inputs.push(t.into_tvalue());
            Some(inputs.len() - 1)
        };
        slots.b = push(
            Tensor::from_shape(&[dirs, 2 * g * hidden], &d.b).unwrap(),
            &mut inputs,
        );
        if case.seq_lens {
            let l: Vec<i32> = d.lens.iter().map(|&l| i32::try_from(l).unwrap()).collect();
            slots.seq_lens = push(Tensor::from_shape(&[bsz], &l).unwrap(), &mut inputs);
        }
        let state = |v: &[f32]| {
            if bf {
                Tensor::from_shape(&[bsz, dirs, hidden], &swap01(v, dirs, bsz, hidden)).unwrap()
            } else {
                Tensor::from_shape(&[dirs, bsz, hidden], v).unwrap()
            }
        };
        if case.initial {
            slots.initial_h = push(state(&d.h0), &mut inputs);
            if lstm {
                slots.initial_c = push(state(&d.c0), &mut inputs);
            }
        }
        if case.peepholes {
            slots.p = push(
                Tensor::from_shape(&[dirs, 3 * hidden], &d.p).unwrap(),
                &mut inputs,
            );
        }
        let config = Config {
            cell: case.cell,
            direction: case.dirs,
            hidden_size: Some(hidden),
            clip: case.clip,
            batch_first: bf,
            inputs: slots,
            outputs: OutputSet {
                y: true,
                y_h: true,
                y_c: lstm,
            },
        };
        let unpacked = Rnn {
            config,
            hidden,
            weights: None,
        };
        let opt = |s: Option<usize>| s.map(|s| &*inputs[s]);
        let packed = Rnn {
            weights: Some(Arc::new(
                Weights::prepare(
                    &config,
                    hidden,
                    &inputs[1],
                    &inputs[2],
                    opt(slots.b),
                    opt(slots.p),
                )
                .unwrap(),
            )),
            ..unpacked.clone()
        };
        for op in [unpacked, packed] {
            let out = run(&op, &inputs).unwrap();
            let got = |ix: usize| {
                out[ix]
                    .try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec()
            };
            let (gy, gyh) = (got(0), got(1));
            let cmp = |what: &str, got: &[f32], want: &[f64]| {
                assert_eq!(got.len(), want.len(), "{case:?} {what} length");
                for (ix, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (f64::from(*g) - w).abs() < 1e-4,
                        "{case:?} {what}[{ix}]: {g} vs {w}"
                    );
                }
            };
            let y_bm = |v: &[f64]| -> Vec<f64> {
                // time-major [S, D, B, H] to batch-major [B, S, D, H]
                let mut out = vec![0f64; v.len()];
                for t in 0..seq {
                    for dd in 0..dirs {
                        for b in 0..bsz {
                            for j in 0..hidden {
                                out[((b * seq + t) * dirs + dd) * hidden + j] =
                                    v[((t * dirs + dd) * bsz + b) * hidden + j];
                            }
                        }
                    }
                }
                out
            };
            if bf {
                cmp("Y", &gy, &y_bm(&y));
                cmp("Y_h", &gyh, &swap01(&yh, dirs, bsz, hidden));
                if lstm {
                    cmp("Y_c", &got(2), &swap01(&yc, dirs, bsz, hidden));
                }
            } else {
                cmp("Y", &gy, &y);
                cmp("Y_h", &gyh, &yh);
                if lstm {
                    cmp("Y_c", &got(2), &yc);
                }
            }
        }
    }

    #[test]
    fn every_attribute_combination_matches_the_formulas() {
        let mut rng = Lcg(11);
        let cells = [
            Cell::Lstm {
                input_forget: false,
            },
            Cell::Lstm { input_forget: true },
            Cell::Gru {
                linear_before_reset: false,
            },
            Cell::Gru {
                linear_before_reset: true,
            },
        ];
        for cell in cells {
            for dirs in [Dirs::Forward, Dirs::Reverse, Dirs::Bidirectional] {
                for (clip, peepholes, batch, seq_lens, initial, batch_first) in [
                    (None, false, 1, false, false, false),
                    (Some(0.4), true, 3, true, true, false),
                    (None, true, 7, true, false, true),
                    (Some(0.8), false, 2, false, true, true),
                    (None, false, 9, true, true, false),
                ] {
                    let peepholes = peepholes && matches!(cell, Cell::Lstm { .. });
                    check(
                        Case {
                            cell,
                            dirs,
                            clip,
                            peepholes,
                            batch,
                            seq_lens,
                            initial,
                            batch_first,
                        },
                        &mut rng,
                    );
                }
            }
        }
    }
}
