//! tract runtime: each model runs on its own thread behind a cloneable handle.
//!
//! Owns turning verified ONNX bytes into an optimized tract plan with the
//! manifest's fixed input shape, checking the golden pairs, and running
//! windows. tract's errors (`anyhow`) are wrapped here; a panic inside tract
//! while loading or running is caught and reported as an error, so a bad
//! model cannot take the agent down.

use std::panic::AssertUnwindSafe;

use tokio::sync::oneshot;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::features::InputPlan;
use super::package::Package;

/// Golden outputs must match within `GOLDEN_ABS_TOL + GOLDEN_REL_TOL * |expected|`.
pub const GOLDEN_REL_TOL: f32 = 1e-4;
/// See [`GOLDEN_REL_TOL`].
pub const GOLDEN_ABS_TOL: f32 = 1e-3;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// tract refused the model or failed to run it.
    #[error("tract: {0}")]
    Tract(String),
    /// tract panicked; the model is unusable, the agent is unaffected.
    #[error("tract panicked: {0}")]
    Panic(String),
    /// The graph's inputs or outputs disagree with the manifest.
    #[error("model does not match its manifest: {0}")]
    Shape(String),
    /// A golden pair did not reproduce.
    #[error("golden pair {index}: expected {expected}, got {actual}")]
    Golden {
        /// Index in the manifest.
        index: usize,
        /// From the manifest.
        expected: f32,
        /// From tract.
        actual: f32,
    },
    /// The window holds NaN or infinity.
    #[error("window contains a non-finite value")]
    NonFiniteInput,
    /// The model produced NaN or infinity.
    #[error("model produced a non-finite score")]
    NonFiniteOutput,
    /// The model thread has stopped.
    #[error("model thread has stopped")]
    Closed,
}

/// Result alias for this module.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

type Plan = Arc<TypedRunnableModel>;

struct Job {
    rows: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

/// Handle to a loaded model's thread. The thread exits when every handle is dropped.
#[derive(Clone)]
pub struct ModelHandle {
    tx: flume::Sender<Job>,
}

fn tract_err(e: &TractError) -> RuntimeError {
    RuntimeError::Tract(format!("{e:#}"))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Shapes of a loaded model, as `model check` prints them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shapes {
    /// The graph's declared input shape (`?` for a symbolic dimension).
    pub declared_input: String,
    /// Input shape of the batch-1 plan (rank 2 or 3, per `input.layout`).
    pub input: Vec<usize>,
    /// Output shape of the batch-1 plan (`output.tensor`).
    pub output: Vec<usize>,
    /// Rows of the batched plan; 1 when there is none.
    pub batch_size: usize,
}

/// The optimized plans of one model: one for a single row and, when
/// `input.batch_size > 1`, one for a full batch (partial batches are padded).
pub struct Runner {
    one: Plan,
    batch: Option<(Plan, usize)>,
    out_ix: usize,
    input: InputPlan,
    row_width: usize,
    out_width: usize,
    /// Shapes for reports.
    pub shapes: Shapes,
}

fn build_plan(package: &Package, rows: usize) -> Result<(Plan, usize, String)> {
    let m = &package.manifest;
    let mut model = edge_onnx_ml::onnx_with_ml()
        .model_for_read(&mut package.onnx.as_slice())
        .map_err(|e| tract_err(&e))?;
    let inputs = model.input_outlets().map_err(|e| tract_err(&e))?.to_vec();
    if inputs.len() != 1 {
        return Err(RuntimeError::Shape(format!(
            "graph has {} inputs, the manifest describes 1",
            inputs.len()
        )));
    }
    let input_name = &model.node(inputs[0].node).name;
    if *input_name != m.input.tensor {
        return Err(RuntimeError::Shape(format!(
            "graph input is {input_name:?}, manifest input.tensor is {:?}",
            m.input.tensor
        )));
    }
    let declared = model.input_fact(0).map_err(|e| tract_err(&e))?.clone();
    let dims: Vec<Option<i64>> = declared
        .shape
        .dims()
        .map(|d| d.concretize().and_then(|d| d.to_i64().ok()))
        .collect();
    let declared_text = sync_protocol::layout::declared_text(&dims);
    let shape = package.input.tensor_shape(rows);
    package
        .input
        .input_shape()
        .check_declared(input_name, &dims, declared.shape.is_open(), Some(rows))
        .map_err(RuntimeError::Shape)?;
    let outputs = model.output_outlets().map_err(|e| tract_err(&e))?.to_vec();
    let out_ix = outputs
        .iter()
        .position(|o| {
            model.outlet_label(*o) == Some(m.output.tensor.as_str())
                || model.node(o.node).name == m.output.tensor
        })
        .ok_or_else(|| {
            RuntimeError::Shape(format!(
                "graph has no output named {:?} (output.tensor)",
                m.output.tensor
            ))
        })?;
    model = model
        .with_input_fact(0, f32::fact(shape).into())
        .map_err(|e| tract_err(&e))?;
    let plan = model
        .into_optimized()
        .map_err(|e| tract_err(&e))?
        .into_runnable()
        .map_err(|e| tract_err(&e))?;
    Ok((plan, out_ix, declared_text))
}

impl Runner {
    /// Parses and optimizes the package's graph (once per plan), checking
    /// its input against the manifest. A tract panic becomes an error.
    ///
    /// # Errors
    /// [`RuntimeError`] when tract refuses the graph or it disagrees with the manifest.
    pub fn build(package: &Package) -> Result<Self> {
        std::panic::catch_unwind(AssertUnwindSafe(|| Self::build_inner(package)))
            .map_err(|p| RuntimeError::Panic(panic_message(p.as_ref())))?
    }

    fn build_inner(package: &Package) -> Result<Self> {
        let b = package.input.batch_size;
        let (one, out_ix, declared_input) = build_plan(package, 1)?;
        let batch = if b > 1 {
            let (plan, _, _) = build_plan(package, b)?;
            Some((plan, b))
        } else {
            None
        };
        let row_width = package.input.row_width();
        let out_width = package.output.width();
        let output = one
            .model()
            .output_fact(out_ix)
            .ok()
            .and_then(|f| f.shape.as_concrete().map(<[usize]>::to_vec))
            .unwrap_or_default();
        Ok(Self {
            one,
            batch,
            out_ix,
            input: package.input.clone(),
            row_width,
            out_width,
            shapes: Shapes {
                declared_input,
                input: package.input.tensor_shape(1),
                output,
                batch_size: b,
            },
        })
    }

    /// Largest number of rows one [`Runner::run`] takes.
    #[must_use]
    pub fn batch_size(&self) -> usize {
        self.batch.as_ref().map_or(1, |(_, b)| *b)
    }

    /// Runs up to [`Runner::batch_size`] rows in one tract run and returns
    /// one raw output row per input row. Rows are in feature order (as
    /// `features::build_row` makes them and golden inputs are written); they
    /// are laid out per `input.layout` here.
    ///
    /// # Errors
    /// [`RuntimeError`] for bad rows, tract failures or panics, or an output
    /// of the wrong size.
    pub fn run(&self, rows: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let n = rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if rows.iter().any(|r| r.len() != self.row_width) {
            return Err(RuntimeError::Shape(format!(
                "input rows must have {} values",
                self.row_width
            )));
        }
        if rows.iter().flatten().any(|v| !v.is_finite()) {
            return Err(RuntimeError::NonFiniteInput);
        }
        let (plan, capacity) = match &self.batch {
            _ if n == 1 => (&self.one, 1),
            Some((plan, b)) if n <= *b => (plan, *b),
            _ => {
                return Err(RuntimeError::Shape(format!(
                    "{n} rows exceed input.batch_size {}",
                    self.batch_size()
                )));
            }
        };
        // Design: partial batches are padded with copies of the first row
        // (always a valid input), so each plan keeps one fixed shape.
        let mut data = Vec::with_capacity(capacity * self.row_width);
        for r in rows
            .iter()
            .chain(std::iter::repeat_n(&rows[0], capacity - n))
        {
            self.input.lay_out(r, &mut data);
        }
        let input = Tensor::from_shape(&self.input.tensor_shape(capacity), &data)
            .map_err(|e| tract_err(&e))?;
        let outputs = std::panic::catch_unwind(AssertUnwindSafe(|| plan.run(tvec!(input.into()))))
            .map_err(|p| RuntimeError::Panic(panic_message(p.as_ref())))?
            .map_err(|e| tract_err(&e))?;
        let out = outputs
            .get(self.out_ix)
            .ok_or_else(|| RuntimeError::Shape("output missing at run time".into()))?;
        let out = out.cast_to::<f32>().map_err(|e| tract_err(&e))?;
        let view = out
            .to_plain_array_view::<f32>()
            .map_err(|e| tract_err(&e))?;
        if view.len() != capacity * self.out_width {
            return Err(RuntimeError::Shape(format!(
                "output {:?} has {} values for {capacity} rows, the manifest expects {} per row",
                out.shape(),
                view.len(),
                self.out_width
            )));
        }
        let flat: Vec<f32> = view.iter().copied().collect();
        let rows_out: Vec<Vec<f32>> = flat
            .chunks(self.out_width)
            .take(n)
            .map(<[f32]>::to_vec)
            .collect();
        if rows_out.iter().flatten().any(|v| !v.is_finite()) {
            return Err(RuntimeError::NonFiniteOutput);
        }
        Ok(rows_out)
    }

    /// Runs every golden pair alone, then (with a batched plan) all of them
    /// in batches, and compares each output with the manifest.
    ///
    /// # Errors
    /// [`RuntimeError::Golden`] naming the first pair that does not reproduce.
    pub fn check_golden(&self, package: &Package) -> Result<()> {
        let golden = &package.manifest.golden;
        let compare = |index: usize, actual: &[f32]| -> Result<()> {
            let expected = golden[index].expected();
            for (e, a) in expected.iter().zip(actual) {
                if (a - e).abs() > GOLDEN_ABS_TOL + GOLDEN_REL_TOL * e.abs() {
                    return Err(RuntimeError::Golden {
                        index,
                        expected: *e,
                        actual: *a,
                    });
                }
            }
            Ok(())
        };
        for (index, g) in golden.iter().enumerate() {
            let out = self.run(std::slice::from_ref(&g.input))?;
            compare(index, out.first().map_or(&[][..], Vec::as_slice))?;
        }
        if self.batch.is_some() {
            let rows: Vec<Vec<f32>> = golden.iter().map(|g| g.input.clone()).collect();
            for (c, chunk) in rows.chunks(self.batch_size()).enumerate() {
                let out = self.run(chunk)?;
                for (k, o) in out.iter().enumerate() {
                    compare(c * self.batch_size() + k, o)?;
                }
            }
        }
        Ok(())
    }
}

/// Loads the package into tract, checks every golden pair, and starts the
/// model's thread. Returns only once the model is fit to serve.
///
/// # Errors
/// [`RuntimeError`] describing why the model is not fit; nothing is started then.
pub fn load(package: &Package) -> Result<ModelHandle> {
    let runner = Runner::build(package)?;
    runner.check_golden(package)?;
    let (tx, rx) = flume::bounded::<Job>(256);
    let name = format!("model-{}", package.manifest.name);
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let _ = job.reply.send(runner.run(&job.rows));
            }
        })
        .map_err(|e| RuntimeError::Tract(format!("cannot start model thread: {e}")))?;
    Ok(ModelHandle { tx })
}

impl ModelHandle {
    /// Runs up to `input.batch_size` rows in one tract run on the model's
    /// thread; one raw output row per input row.
    ///
    /// # Errors
    /// [`RuntimeError`] for bad input, tract failures or non-finite output.
    pub async fn run(&self, rows: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Job { rows, reply })
            .await
            .map_err(|_| RuntimeError::Closed)?;
        rx.await.map_err(|_| RuntimeError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::inference::features::Layout;
    use std::path::Path;

    fn shipped() -> Package {
        Package::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp"))
            .unwrap()
    }

    #[tokio::test]
    async fn shipped_model_loads_and_scores_goldens() {
        let p = shipped();
        let h = load(&p).unwrap();
        for g in &p.manifest.golden {
            let s = h.run(vec![g.input.clone()]).await.unwrap()[0][0];
            let e = g.score.unwrap();
            assert!((s - e).abs() <= GOLDEN_ABS_TOL + GOLDEN_REL_TOL * e.abs());
        }
        let mut bad = p.manifest.golden[0].input.clone();
        bad[3] = f32::NAN;
        assert!(matches!(
            h.run(vec![bad]).await,
            Err(RuntimeError::NonFiniteInput)
        ));
    }

    #[test]
    fn wrong_golden_is_refused() {
        let mut p = shipped();
        p.manifest.golden[0].score = p.manifest.golden[0].score.map(|s| s + 1.0);
        assert!(matches!(
            load(&p),
            Err(RuntimeError::Golden { index: 0, .. })
        ));
    }

    #[test]
    fn manifest_window_disagreeing_with_graph_is_refused() {
        let mut p = shipped();
        p.input.window = 7;
        for g in &mut p.manifest.golden {
            g.input.truncate(7);
        }
        let err = load(&p).err().unwrap();
        assert!(matches!(err, RuntimeError::Shape(_)), "{err}");
        assert!(err.to_string().contains("rows of 7 values"), "{err}");
    }

    fn fixture(name: &str) -> Package {
        Package::read(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../models")
                .join(name),
        )
        .unwrap()
    }

    fn shape_error(p: &Package) -> String {
        match Runner::build(p) {
            Err(e @ RuntimeError::Shape(_)) => e.to_string(),
            Err(e) => panic!("expected a shape error, got {e}"),
            Ok(_) => panic!("expected a shape error, the model loaded"),
        }
    }

    #[test]
    fn rank_3_packages_build_rank_3_plans_and_reproduce_onnxruntime() {
        let cnn = fixture("wave-cnn");
        let r = Runner::build(&cnn).unwrap();
        assert_eq!(r.shapes.declared_input, "[?, 1, 64]");
        assert_eq!(r.shapes.input, vec![1, 1, 64]);
        assert_eq!(r.shapes.output, vec![1, 1]);
        assert_eq!(r.batch_size(), 4);
        r.check_golden(&cnn).unwrap();

        let lstm = fixture("motor-lstm");
        let r = Runner::build(&lstm).unwrap();
        assert_eq!(r.shapes.declared_input, "[?, 32, 3]");
        assert_eq!(r.shapes.input, vec![1, 32, 3]);
        r.check_golden(&lstm).unwrap();
        // Partial batch (padded) and full batch give the batch-1 outputs.
        let rows: Vec<Vec<f32>> = lstm
            .manifest
            .golden
            .iter()
            .map(|g| g.input.clone())
            .collect();
        let alone: Vec<f32> = rows
            .iter()
            .map(|row| r.run(std::slice::from_ref(row)).unwrap()[0][0])
            .collect();
        for n in [2, 4] {
            let batched = r.run(&rows[..n]).unwrap();
            for (b, a) in batched.iter().zip(&alone) {
                assert!((b[0] - a).abs() <= 1e-6, "{n} rows: {} vs {a}", b[0]);
            }
        }
    }

    /// Golden rows are in feature order; the LSTM reads `[steps, features]`.
    /// Feeding the row untransposed (as if it were already in tensor order)
    /// gives outputs far from onnxruntime's, so the golden check pins the
    /// transposition.
    #[test]
    fn channels_last_rows_are_transposed_before_the_run() {
        let mut p = fixture("motor-lstm");
        let r = Runner::build(&p).unwrap();
        let g = p.manifest.golden[0].clone();
        // The row laid out [window][fields] and read back as feature order is
        // what an untransposed tensor would hold.
        let mut wrong = Vec::new();
        p.input.lay_out(&g.input, &mut wrong);
        let out = r.run(&[wrong.clone()]).unwrap()[0][0];
        let e = g.score.unwrap();
        assert!(
            (out - e).abs() > 10.0 * (GOLDEN_ABS_TOL + GOLDEN_REL_TOL * e.abs()),
            "{out} vs {e}"
        );
        p.manifest.golden[0].input = wrong;
        assert!(matches!(
            r.check_golden(&p),
            Err(RuntimeError::Golden { index: 0, .. })
        ));
    }

    #[test]
    fn a_graph_disagreeing_with_the_layout_is_refused() {
        // CNN [?, 1, 64] fed [batch, 64, 1].
        let mut p = fixture("wave-cnn");
        p.input.layout = Layout::ChannelsLast;
        let err = shape_error(&p);
        assert!(
            err.contains("graph input \"x\" is [?, 1, 64], input.layout = \"channels_last\" feeds [batch, 64, 1]"),
            "{err}"
        );
        // CNN fed flat rows: rank 2 against rank 3, with a hint.
        p.input.layout = Layout::Flat;
        let err = shape_error(&p);
        assert!(
            err.contains("is [?, 1, 64], the manifest's features make rows of 64 values (input.layout = \"flat\" feeds [batch, 64]); a rank-3 input needs"),
            "{err}"
        );
        // LSTM [?, 32, 3] fed channels first.
        let mut q = fixture("motor-lstm");
        q.input.layout = Layout::ChannelsFirst;
        let err = shape_error(&q);
        assert!(
            err.contains("feeds [batch, 3, 32] (3 feature(s) x window 32)"),
            "{err}"
        );
        // LSTM with a window the graph does not declare.
        let mut w = fixture("motor-lstm");
        w.input.window = 16;
        let err = shape_error(&w);
        assert!(
            err.contains("is [?, 32, 3], input.layout = \"channels_last\" feeds [batch, 16, 3]"),
            "{err}"
        );
        // A rank-2 graph fed a rank-3 layout.
        let mut n = shipped();
        n.input.layout = Layout::ChannelsFirst;
        let err = shape_error(&n);
        assert!(err.contains("graph input \"window\" is [?, 12], input.layout = \"channels_first\" feeds [batch, 1, 12]"), "{err}");
    }

    #[test]
    fn garbage_and_truncated_onnx_are_refused_without_panic() {
        let mut p = shipped();
        p.onnx = b"definitely not a protobuf".to_vec();
        assert!(load(&p).is_err());
        let mut t = shipped();
        t.onnx.truncate(t.onnx.len() / 2);
        assert!(load(&t).is_err());
    }

    #[test]
    fn wrong_tensor_names_are_refused() {
        let mut p = shipped();
        p.manifest.input.tensor = "other".into();
        assert!(matches!(load(&p), Err(RuntimeError::Shape(_))));
        let mut q = shipped();
        q.manifest.output.tensor = "other".into();
        assert!(matches!(load(&q), Err(RuntimeError::Shape(_))));
    }
}
