//! ONNX graphs of the two model families, built with tract-onnx's protobuf
//! types (`tract_onnx::pb`) and encoded with `prost`, plus running a
//! written graph in tract (through `edge_onnx_ml::onnx_with_ml()`, the
//! agent's loader).
//!
//! Graphs use standard operators only (opset 13, IR version 8), one float
//! input `[N, width]` with a symbolic batch dimension and one float output:
//! - detector: `Sub -> MatMul -> Mul -> ReduceSum`, output `[N, 1]`
//!   (the shipped NAB graph, same tensor names);
//! - classifier: `MatMul -> Add -> Softmax`, output `[N, 2]`.

use prost::Message as _;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Result alias for this module.
pub type Result<T, E = OnnxError> = std::result::Result<T, E>;

/// Why a graph could not be run.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// tract refused the graph.
    #[error("tract cannot load the model: {message}")]
    Load {
        /// tract's error chain.
        message: String,
    },
    /// tract failed to run it.
    #[error("tract cannot run the model: {message}")]
    Run {
        /// tract's error chain.
        message: String,
    },
}

/// Opset of the written graphs.
pub const OPSET: i64 = 13;
/// ONNX IR version of the written graphs.
pub const IR_VERSION: i64 = 8;

fn float_tensor(
    name: &str,
    dims: &[usize],
    values: impl IntoIterator<Item = f64>,
) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_owned(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        #[allow(clippy::cast_possible_truncation)]
        float_data: values.into_iter().map(|v| v as f32).collect(),
        ..Default::default()
    }
}

fn int64_tensor(name: &str, values: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, batch: &str, width: usize) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{Dimension, dimension::Value};
    pb::ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: Some(Value::DimParam(batch.to_owned())),
                            ..Default::default()
                        },
                        Dimension {
                            value: Some(Value::DimValue(width as i64)),
                            ..Default::default()
                        },
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.to_owned(),
        name: output.to_owned(),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.to_owned()],
        attribute,
        ..Default::default()
    }
}

fn int_attribute(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_owned(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn model(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "edge-retrain".to_owned(),
        producer_version: env!("CARGO_PKG_VERSION").to_owned(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The detector graph: input `window` `[N, width]`, output `score` `[N, 1]`
/// `= ReduceSum(((window - mu) @ whiten)², axis 1, keepdims)`.
#[must_use]
pub fn detector_graph(mu: &[f64], whiten: &[Vec<f64>]) -> Vec<u8> {
    let width = mu.len();
    let graph = pb::GraphProto {
        name: "window_detector".to_owned(),
        node: vec![
            node("Sub", &["window", "mu"], "centered", vec![]),
            node("MatMul", &["centered", "whiten"], "white", vec![]),
            node("Mul", &["white", "white"], "sq", vec![]),
            node(
                "ReduceSum",
                &["sq", "axes"],
                "score",
                vec![int_attribute("keepdims", 1)],
            ),
        ],
        initializer: vec![
            float_tensor("mu", &[1, width], mu.iter().copied()),
            float_tensor("whiten", &[width, width], whiten.iter().flatten().copied()),
            int64_tensor("axes", &[1]),
        ],
        input: vec![value_info("window", "N", width)],
        output: vec![value_info("score", "N", 1)],
        ..Default::default()
    };
    model(graph)
}

/// The classifier graph: input `X` `[N, width]`, output `probabilities`
/// `[N, 2]` `= Softmax(X @ weights + bias)`; `weights` is `[width, 2]`
/// row-major.
#[must_use]
pub fn classifier_graph(weights: &[[f64; 2]], bias: [f64; 2]) -> Vec<u8> {
    let width = weights.len();
    let graph = pb::GraphProto {
        name: "window_classifier".to_owned(),
        node: vec![
            node("MatMul", &["X", "weights"], "logits_raw", vec![]),
            node("Add", &["logits_raw", "bias"], "logits", vec![]),
            node(
                "Softmax",
                &["logits"],
                "probabilities",
                vec![int_attribute("axis", 1)],
            ),
        ],
        initializer: vec![
            float_tensor("weights", &[width, 2], weights.iter().flatten().copied()),
            float_tensor("bias", &[2], bias),
        ],
        input: vec![value_info("X", "N", width)],
        output: vec![value_info("probabilities", "N", 2)],
        ..Default::default()
    };
    model(graph)
}

/// A graph loaded in tract, optimized for `[1, width]` float32 rows.
#[derive(Debug)]
pub struct Runner {
    plan: std::sync::Arc<TypedSimplePlan>,
    width: usize,
}

impl Runner {
    /// Loads `onnx` with the agent's loader and optimizes it for one row
    /// of `width` values.
    ///
    /// # Errors
    /// [`OnnxError::Load`].
    pub fn load(onnx: &[u8], width: usize) -> Result<Runner> {
        let load = |e: TractError| OnnxError::Load {
            message: format!("{e:#}"),
        };
        let plan = edge_onnx_ml::onnx_with_ml()
            .model_for_read(&mut &onnx[..])
            .map_err(load)?
            .with_input_fact(0, f32::fact([1, width]).into())
            .map_err(load)?
            .into_optimized()
            .map_err(load)?
            .into_runnable()
            .map_err(load)?;
        Ok(Runner { plan, width })
    }

    /// Runs one row (rounded to f32), returns the first output's values.
    ///
    /// # Errors
    /// [`OnnxError::Run`] (including a row of the wrong width).
    pub fn run(&self, row: &[f32]) -> Result<Vec<f32>> {
        let run = |e: TractError| OnnxError::Run {
            message: format!("{e:#}"),
        };
        let tensor = Tensor::from_shape(&[1, self.width], row).map_err(run)?;
        let outputs = self.plan.run(tvec!(tensor.into())).map_err(run)?;
        let out = outputs.first().ok_or_else(|| OnnxError::Run {
            message: "no output".to_owned(),
        })?;
        Ok(out
            .to_plain_array_view::<f32>()
            .map_err(run)?
            .iter()
            .copied()
            .collect())
    }
}

/// `values` as the f32 row tract is fed.
#[must_use]
#[allow(clippy::cast_possible_truncation)]
pub fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::classifier::Classifier;
    use crate::detector::Detector;

    #[test]
    fn detector_graph_matches_f64_scoring() {
        // Windows of a noisy sine, width 6.
        let rows: Vec<Vec<f64>> = (0..200)
            .map(|i| {
                (0..6)
                    .map(|k| {
                        f64::from(i * 3 + k).sin() * 5.0 + 80.0 + f64::from((i * 31 + k) % 7) * 0.1
                    })
                    .collect()
            })
            .collect();
        let det = Detector::fit(&rows, 1e-6).unwrap();
        let runner = Runner::load(&det.onnx(), 6).unwrap();
        for row in rows.iter().take(50) {
            // Compare on the f32-rounded row both sides see.
            let row32: Vec<f64> = to_f32(row).into_iter().map(f64::from).collect();
            let expected = det.score(&row32);
            let got = f64::from(runner.run(&to_f32(row)).unwrap()[0]);
            assert!(
                (got - expected).abs() <= 1e-4 * expected.abs(),
                "{got} vs {expected}"
            );
        }
    }

    #[test]
    fn classifier_graph_matches_f64_probability() {
        let c = Classifier {
            weights: vec![0.5, -1.25, 2.0],
            bias: -0.75,
        };
        let runner = Runner::load(&c.onnx(), 3).unwrap();
        for f in [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-4.0, 1.0, 0.5]] {
            let p = c.probability(&f);
            let got = runner.run(&to_f32(&f)).unwrap();
            assert!((f64::from(got[1]) - p).abs() <= 1e-4 * p, "{got:?} vs {p}");
            assert!((f64::from(got[0]) - (1.0 - p)).abs() <= 1e-4 * (1.0 - p) + 1e-7);
        }
        // A width the graph does not declare is refused by tract.
        assert!(Runner::load(&c.onnx(), 4).is_err());
    }
}
