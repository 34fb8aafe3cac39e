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
    window: Vec<f32>,
    reply: oneshot::Sender<Result<f32>>,
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

fn build_plan(package: &Package) -> Result<(Plan, usize)> {
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
        .with_input_fact(0, f32::fact([1, m.input.window]).into())
        .map_err(|e| tract_err(&e))?;
    let plan = model
        .into_optimized()
        .map_err(|e| tract_err(&e))?
        .into_runnable()
        .map_err(|e| tract_err(&e))?;
    Ok((plan, out_ix))
}

fn run_plan(plan: &Plan, out_ix: usize, window: &[f32]) -> Result<f32> {
    if window.iter().any(|v| !v.is_finite()) {
        return Err(RuntimeError::NonFiniteInput);
    }
    let input = Tensor::from_shape(&[1, window.len()], window).map_err(|e| tract_err(&e))?;
    let outputs = std::panic::catch_unwind(AssertUnwindSafe(|| plan.run(tvec!(input.into()))))
        .map_err(|p| RuntimeError::Panic(panic_message(p.as_ref())))?
        .map_err(|e| tract_err(&e))?;
    let out = outputs
        .get(out_ix)
        .ok_or_else(|| RuntimeError::Shape("output missing at run time".into()))?;
    let view = out
        .to_plain_array_view::<f32>()
        .map_err(|e| tract_err(&e))?;
    if view.len() != 1 {
        return Err(RuntimeError::Shape(format!(
            "output has {} values per window, an anomaly score needs 1",
            view.len()
        )));
    }
    let score = view.iter().next().copied().unwrap_or(f32::NAN);
    if !score.is_finite() {
        return Err(RuntimeError::NonFiniteOutput);
    }
    Ok(score)
}

/// Loads the package into tract, checks every golden pair, and starts the
/// model's thread. Returns only once the model is fit to serve.
///
/// # Errors
/// [`RuntimeError`] describing why the model is not fit; nothing is started then.
pub fn load(package: &Package) -> Result<ModelHandle> {
    let (plan, out_ix) = std::panic::catch_unwind(AssertUnwindSafe(|| build_plan(package)))
        .map_err(|p| RuntimeError::Panic(panic_message(p.as_ref())))??;
    for (index, g) in package.manifest.golden.iter().enumerate() {
        let actual = run_plan(&plan, out_ix, &g.input)?;
        if (actual - g.score).abs() > GOLDEN_ABS_TOL + GOLDEN_REL_TOL * g.score.abs() {
            return Err(RuntimeError::Golden {
                index,
                expected: g.score,
                actual,
            });
        }
    }
    let (tx, rx) = flume::bounded::<Job>(256);
    let name = format!("model-{}", package.manifest.name);
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let _ = job.reply.send(run_plan(&plan, out_ix, &job.window));
            }
        })
        .map_err(|e| RuntimeError::Tract(format!("cannot start model thread: {e}")))?;
    Ok(ModelHandle { tx })
}

impl ModelHandle {
    /// Scores one window on the model's thread.
    ///
    /// # Errors
    /// [`RuntimeError`] for bad input, tract failures or non-finite output.
    pub async fn score(&self, window: Vec<f32>) -> Result<f32> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send_async(Job { window, reply })
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
            let s = h.score(g.input.clone()).await.unwrap();
            assert!((s - g.score).abs() <= GOLDEN_ABS_TOL + GOLDEN_REL_TOL * g.score.abs());
        }
        let mut bad = p.manifest.golden[0].input.clone();
        bad[3] = f32::NAN;
        assert!(matches!(
            h.score(bad).await,
            Err(RuntimeError::NonFiniteInput)
        ));
    }

    #[test]
    fn wrong_golden_is_refused() {
        let mut p = shipped();
        p.manifest.golden[0].score += 1.0;
        assert!(matches!(
            load(&p),
            Err(RuntimeError::Golden { index: 0, .. })
        ));
    }

    #[test]
    fn manifest_window_disagreeing_with_graph_is_refused() {
        let mut p = shipped();
        p.manifest.input.window = 7;
        for g in &mut p.manifest.golden {
            g.input.truncate(7);
        }
        assert!(load(&p).is_err());
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
