//! edge-onnx-ml: the ONNX-ML (`ai.onnx.ml`) operators classic tabular
//! models need, as tract operators registered with tract's ONNX loader.
//!
//! [`onnx_with_ml`] is `tract_onnx::onnx()` plus these operators; load every
//! model through it. Semantics follow the ONNX-ML specification and, where
//! the specification is vague (binary classifiers, single-target
//! post-transforms), onnxruntime, against whose outputs the fixtures in
//! `models/fixtures/` are checked.
//!
//! Crate map:
//! - [`tree`] — `TreeEnsembleRegressor`, `TreeEnsembleClassifier` (replaces
//!   tract's, whose labels are wrong for single-score binary forests);
//! - [`scaler`] — `Scaler`;
//! - [`elementwise`] — `Imputer`, `Binarizer`;
//! - [`label_encoder`] — `LabelEncoder` (opsets 1, 2, 4);
//! - [`one_hot`] — `OneHotEncoder`;
//! - [`normalizer`] — `Normalizer` (replaces tract's, whose `MAX` divides by
//!   the largest absolute value);
//! - [`zipmap`] — `ZipMap`, passed through as the probability tensor;
//! - [`rnn`] — `LSTM` and `GRU` as single operators (replace tract's,
//!   which run a graph per time step);
//! - [`linear`] — `LinearClassifier`, `LinearRegressor` as single
//!   operators (replace tract's, which expand into six to nine nodes and
//!   refuse `PROBIT` and `SOFTMAX_ZERO`);
//! - [`transform`] — the `post_transform` functions;
//! - [`run`] — run any ONNX model on JSON rows (`edge-agent model run`).
//!
//! tract itself already provides, and the fixtures check against
//! onnxruntime: `ArrayFeatureExtractor`.
//!
//! Invariant: a malformed model is a tract error while loading, never a
//! panic (no `unsafe`, no unchecked indexing on attribute data).

mod attrs;
mod classes;
pub mod elementwise;
pub mod label_encoder;
pub mod linear;
pub mod normalizer;
pub mod one_hot;
pub mod rnn;
pub mod run;
pub mod scaler;
pub mod transform;
pub mod tree;
pub mod zipmap;

use tract_onnx::Onnx;
use tract_onnx::model::OnnxOpRegister;

/// The operators this crate registers, by ONNX `op_type`.
pub const OPERATORS: &[&str] = &[
    "TreeEnsembleRegressor",
    "TreeEnsembleClassifier",
    "Scaler",
    "Imputer",
    "Binarizer",
    "LabelEncoder",
    "OneHotEncoder",
    "Normalizer",
    "ZipMap",
    "LinearClassifier",
    "LinearRegressor",
    "LSTM",
    "GRU",
];

/// Adds this crate's operators to `reg`, replacing tract's
/// `TreeEnsembleClassifier`, `Normalizer`, `LinearClassifier`,
/// `LinearRegressor`, `LSTM` and `GRU`.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("TreeEnsembleRegressor", tree::regressor);
    reg.insert("TreeEnsembleClassifier", tree::classifier);
    reg.insert("Scaler", scaler::build);
    reg.insert("Imputer", elementwise::imputer);
    reg.insert("Binarizer", elementwise::binarizer);
    reg.insert("LabelEncoder", label_encoder::build);
    reg.insert("OneHotEncoder", one_hot::build);
    reg.insert("Normalizer", normalizer::build);
    reg.insert("ZipMap", zipmap::build);
    reg.insert("LinearClassifier", linear::classifier);
    reg.insert("LinearRegressor", linear::regressor);
    reg.insert("LSTM", rnn::lstm);
    reg.insert("GRU", rnn::gru);
}

/// `tract_onnx::onnx()` with this crate's operators registered.
///
/// Intermediate `value_info` shapes are ignored: exporters write them with
/// symbolic batch sizes (torch.export names it `n`) that would contradict a
/// concrete input shape set later; tract infers them anyway.
#[must_use]
pub fn onnx_with_ml() -> Onnx {
    let mut onnx = tract_onnx::onnx().with_ignore_value_info(true);
    register(&mut onnx.op_register);
    onnx
}
