//! LSTM and GRU through edge-onnx-ml's own operators: the fixtures of
//! `models/fixtures/rnn/` against onnxruntime, the PyTorch exports running
//! on our operator (not tract's Scan), and unsupported attributes refused at
//! load time.

use edge_onnx_ml::onnx_with_ml;
use edge_onnx_ml::rnn::Rnn;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

use crate::util;

/// Runs `models/fixtures/rnn/<name>` on its whole inputs (time-major
/// tensors do not fit the generic batch-of-one check).
fn check(name: &str) {
    let fx = util::read(&format!("rnn/{name}"));
    let out = util::run(&fx, &fx.inputs).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let problems = util::compare(&out, &fx.outputs);
    assert!(
        problems.is_empty(),
        "{name} ({}):\n  {}",
        fx.about,
        problems.join("\n  ")
    );
}

macro_rules! rnn_fixtures {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*

        const RNN_ALL: &[&str] = &[$(stringify!($name)),*];
    };
}

rnn_fixtures!(
    lstm_forward,
    lstm_no_bias_y_h,
    lstm_bidirectional,
    lstm_reverse,
    lstm_peepholes_clip,
    lstm_input_forget,
    lstm_layout1,
    lstm_batch16,
    gru_lbr0,
    gru_lbr1_reverse_clip,
    gru_layout1,
    gru_no_bias_y_h,
    gru_batch16,
    gru_batch16_lbr1,
);

#[test]
fn every_rnn_fixture_has_a_test() {
    let mut on_disk: Vec<String> = std::fs::read_dir(util::fixtures_dir().join("rnn"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str().map(str::to_owned))
        .filter_map(|f| f.strip_suffix(".json").map(str::to_owned))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = RNN_ALL.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}

/// The recurrent ops of the optimized model, by name, failing on any Scan.
fn recurrent_ops(name: &str, batch: usize) -> Vec<Rnn> {
    let fx = util::read(name);
    let path = util::fixtures_dir().join(&fx.model);
    let mut model = onnx_with_ml().model_for_path(&path).unwrap();
    let x = fx.inputs.values().next().unwrap();
    let mut shape = x.shape.clone();
    shape[0] = batch;
    model.set_input_fact(0, f32::fact(&shape).into()).unwrap();
    let model = model.into_optimized().unwrap();
    for node in model.nodes() {
        let op = node.op.name();
        assert!(
            !op.contains("Scan") && !op.contains("GruSeq"),
            "{name}: node {} runs tract's {op}",
            node.name
        );
    }
    model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<Rnn>().cloned())
        .collect()
}

#[test]
fn torch_models_run_on_our_operators() {
    for name in [
        "torch_lstm",
        "torch_dynamo_lstm",
        "torch_gru",
        "torch_dynamo_gru",
    ] {
        for batch in [1, 64] {
            let ops = recurrent_ops(name, batch);
            assert_eq!(ops.len(), 1, "{name}: {} recurrent ops", ops.len());
            let op = &ops[0];
            assert!(op.has_packed_weights(), "{name}: weights not packed");
            let outs = op.config().outputs;
            // The exports read Y only; Y_h and Y_c are not computed.
            assert!(outs.y && !outs.y_h && !outs.y_c, "{name}: outputs {outs:?}");
        }
    }
}

fn string_list(name: &str, v: &[&str]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Strings as i32,
        strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn node(op: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: "rnn".into(),
        op_type: op.into(),
        input: vec!["X".into(), "W".into(), "R".into()],
        output: vec!["Y".into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn build(node: &NodeProto) -> TractResult<()> {
    crate::util::with_parsing_context(20, |ctx| match node.op_type.as_str() {
        "LSTM" => edge_onnx_ml::rnn::lstm(ctx, node).map(|_| ()),
        _ => edge_onnx_ml::rnn::gru(ctx, node).map(|_| ()),
    })
}

#[test]
fn default_attributes_build() {
    build(&node("LSTM", vec![int("hidden_size", 4)])).unwrap();
    build(&node(
        "LSTM",
        vec![
            string_list("activations", &["Sigmoid", "Tanh", "Tanh"]),
            string("direction", "reverse"),
        ],
    ))
    .unwrap();
    build(&node(
        "GRU",
        vec![
            string_list("activations", &["Sigmoid", "Tanh", "sigmoid", "tanh"]),
            string("direction", "bidirectional"),
        ],
    ))
    .unwrap();
}

#[test]
fn unsupported_attributes_are_load_errors_naming_them() {
    let cases = [
        (
            node(
                "LSTM",
                vec![string_list("activations", &["Sigmoid", "Relu", "Tanh"])],
            ),
            "\"Relu\"",
        ),
        (
            node(
                "GRU",
                vec![string_list("activations", &["HardSigmoid", "Tanh"])],
            ),
            "\"HardSigmoid\"",
        ),
        (
            node(
                "GRU",
                vec![
                    string("direction", "bidirectional"),
                    string_list("activations", &["Sigmoid", "Tanh"]),
                ],
            ),
            "2 activations",
        ),
        (
            node("LSTM", vec![string("direction", "sideways")]),
            "sideways",
        ),
        (node("LSTM", vec![int("layout", 2)]), "layout 2"),
        (node("GRU", vec![int("hidden_size", 0)]), "hidden_size 0"),
    ];
    for (n, want) in cases {
        let err = build(&n).expect_err(want);
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }
}

#[test]
fn float64_is_refused_at_load_time() {
    let path = util::fixtures_dir().join("rnn/refused_lstm_float64.onnx");
    let err = onnx_with_ml()
        .model_for_path(&path)
        .and_then(|m| m.into_optimized())
        .expect_err("a float64 LSTM must not load");
    let msg = format!("{err:#}");
    assert!(msg.contains("only float32 is supported"), "{msg}");
}
