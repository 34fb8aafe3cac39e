//! Integration tests of edge-onnx-ml: every fixture in `models/fixtures/`
//! loads through `onnx_with_ml()` and reproduces the outputs onnxruntime
//! recorded for it (floats within 1e-4 relative, labels exactly), batched
//! and on a single row; malformed nodes are errors; the JSON runner agrees.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod malformed;
mod rnn;
mod run_json;
mod util;

/// `fixtures!(names...; others...)`: a test per name checking the fixture
/// with [`util::check`]; `others` have hand-written tests below and are only
/// listed for [`every_fixture_has_a_test`].
macro_rules! fixtures {
    ($($name:ident),* $(,)?; $($other:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                util::check(stringify!($name));
            }
        )*

        const ALL: &[&str] = &[$(stringify!($name),)* $(stringify!($other)),*];
    };
}

fixtures!(
    // scikit-learn through skl2onnx
    rf_classifier,
    rf_classifier_zipmap,
    rf_classifier_strings,
    tree_classifier_multiclass,
    gb_classifier,
    gb_classifier_multiclass,
    gb_regressor,
    rf_regressor,
    hist_gb_regressor,
    isolation_forest,
    logreg_pipeline,
    logreg_multiclass,
    imputer_pipeline,
    linear_regressor,
    normalizer_l1,
    normalizer_l2,
    normalizer_max,
    binarizer,
    mlp_classifier,
    mlp_regressor,
    label_encoder,
    one_hot_encoder,
    // hand-built single operators
    lc_binary_single,
    lc_binary_single_strings,
    lc_multi_logistic,
    lc_multi_softmax_zero,
    lr_multi_softmax,
    lr_multi_logistic_no_intercepts,
    ter_sum_none_1,
    ter_average_none_1,
    ter_min_none_1,
    ter_max_none_1,
    ter_sum_probit_1,
    ter_sum_logistic_1,
    ter_sum_none_3,
    ter_average_softmax_3,
    ter_min_logistic_3,
    ter_max_softmax_zero_3,
    tec_binary_single_pos,
    tec_binary_single_margin,
    tec_binary_single_base1,
    tec_binary_single_base2,
    tec_multi_softmax,
    tec_multi_sparse,
    ter_double_tensor,
    scaler_int64_broadcast,
    imputer_int64,
    label_encoder_int_string,
    label_encoder_float,
    // PyTorch
    torch_mlp,
    torch_cnn1d,
    torch_gru,
    torch_lstm,
    torch_dynamo_mlp,
    torch_dynamo_cnn1d,
    torch_dynamo_gru,
    torch_dynamo_lstm;
    // hand-written below
    tec_binary_both,
    tec_binary_both_base2,
    tec_multi_probit,
    lc_single_probit,
    lc_multi_probit,
    lr_single_probit,
    lc_multi_none_rank1,
    label_encoder_tensor,
);

/// Probit near 0.5 is `sqrt(2) * erfinv(~0)`, where the approximation both
/// runtimes use cancels catastrophically: last-bit differences in `logf`
/// between builds show up as ~1e-4 absolute. Checked to 1e-3 absolute.
#[test]
fn tec_multi_probit() {
    util::check_tol("tec_multi_probit", 1e-3);
}

/// The linear models' probits, checked like [`tec_multi_probit`].
#[test]
fn linear_probits() {
    for name in ["lc_single_probit", "lc_multi_probit", "lr_single_probit"] {
        util::check_tol(name, 1e-3);
    }
}

/// A rank-1 input is one row already (there is no first row to cut).
#[test]
fn lc_multi_none_rank1() {
    let fx = util::read("lc_multi_none_rank1");
    let out = util::run(&fx, &fx.inputs).unwrap();
    let problems = util::compare(&out, &fx.outputs);
    assert!(problems.is_empty(), "{problems:?}");
}

/// Two classes with leaf weights for both: onnxruntime labels such rows 1
/// or 0 by the sign of the class-1 score, values outside the class labels
/// (10, 20). edge-onnx-ml labels them with the top class, as the
/// specification says; the scores must still equal onnxruntime's.
fn check_top_class(name: &str) {
    let fx = util::read(name);
    let out = util::run(&fx, &fx.inputs).unwrap();
    let problems = util::compare(&out[1..], &fx.outputs[1..]);
    assert!(problems.is_empty(), "{name}: {problems:?}");
    let probs: Vec<f64> = fx.outputs[1]
        .data
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let want: Vec<i64> = probs
        .chunks(2)
        .map(|p| if p[1] > p[0] { 20 } else { 10 })
        .collect();
    let got = out[0].cast_to::<i64>().unwrap();
    let got = got
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<i64>()
        .unwrap()
        .to_vec();
    assert_eq!(got, want, "{name}: labels are not the top class");
}

/// Opset 4 says a repeated key's last value wins ("y" -> 8 of
/// `[x, y, z, y] -> [5, 6, 7, 8]`); onnxruntime keeps the first (6).
/// edge-onnx-ml follows the specification; every other row must equal
/// onnxruntime's.
#[test]
fn label_encoder_tensor() {
    let fx = util::read("label_encoder_tensor");
    let out = util::run(&fx, &fx.inputs).unwrap();
    let got = out[0]
        .try_as_plain_ram()
        .unwrap()
        .as_slice::<i64>()
        .unwrap()
        .to_vec();
    let keys: Vec<&str> = fx.inputs["X"]
        .data
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let ort: Vec<i64> = fx.outputs[0]
        .data
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert!(keys.contains(&"y"), "fixture lacks the repeated key");
    for ((k, g), o) in keys.iter().zip(&got).zip(&ort) {
        let want = if *k == "y" { 8 } else { *o };
        assert_eq!(*g, want, "key {k}");
    }
}

#[test]
fn tec_binary_both() {
    check_top_class("tec_binary_both");
}

#[test]
fn tec_binary_both_base2() {
    check_top_class("tec_binary_both_base2");
}

#[test]
fn every_fixture_has_a_test() {
    let mut on_disk: Vec<String> = std::fs::read_dir(util::fixtures_dir())
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str().map(str::to_owned))
        .filter_map(|f| f.strip_suffix(".json").map(str::to_owned))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = ALL.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}
