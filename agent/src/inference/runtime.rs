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
    /// Input shape of the batch-1 plan.
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
    row_width: usize,
    out_width: usize,
    /// Shapes for reports.
    pub shapes: Shapes,
}

fn build_plan(package: &Package, rows: usize) -> Result<(Plan, usize, String)> {
    let m = &package.manifest;
    let width = package.input.row_width();
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
    let declared_text = format!(
        "[{}]",
        dims.iter()
            .map(|d| d.map_or("?".to_owned(), |d| d.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !declared.shape.is_open() && dims.len() != 2 {
        return Err(RuntimeError::Shape(format!(
            "graph input {input_name:?} is {declared_text}, the manifest feeds [batch, {width}]"
        )));
    }
    if let Some(Some(last)) = dims.get(1)
        && usize::try_from(*last).ok() != Some(width)
    {
        return Err(RuntimeError::Shape(format!(
            "graph input {input_name:?} is {declared_text}, the manifest's features make rows of {width} values"
        )));
    }
    if let Some(Some(first)) = dims.first()
        && usize::try_from(*first).ok() != Some(rows)
    {
        return Err(RuntimeError::Shape(format!(
            "graph input {input_name:?} is {declared_text}: its batch dimension is fixed, input.batch_size must match it"
        )));
    }
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
        .with_input_fact(0, f32::fact([rows, width]).into())
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
            row_width,
            out_width,
            shapes: Shapes {
                declared_input,
                input: vec![1, row_width],
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
    /// one raw output row per input row.
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
        for r in rows {
            data.extend_from_slice(r);
        }
        for _ in n..capacity {
            data.extend_from_slice(&rows[0]);
        }
        let input =
            Tensor::from_shape(&[capacity, self.row_width], &data).map_err(|e| tract_err(&e))?;
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
