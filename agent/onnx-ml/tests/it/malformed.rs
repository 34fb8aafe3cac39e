//! Malformed ONNX-ML nodes are load errors naming the problem, never panics.

use edge_onnx_ml::onnx_with_ml;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, NodeProto};
use tract_onnx::tract_hir::internal::*;

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn floats(name: &str, v: &[f32]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Floats as i32,
        floats: v.to_vec(),
        ..Default::default()
    }
}

fn strings(name: &str, v: &[&str]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Strings as i32,
        strings: v.iter().map(|s| s.as_bytes().to_vec()).collect(),
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

/// A valid one-split regressor; `edit` breaks it.
fn regressor(edit: impl FnOnce(&mut Vec<AttributeProto>)) -> NodeProto {
    let mut attrs = vec![
        int("n_targets", 1),
        ints("nodes_treeids", &[0, 0, 0]),
        ints("nodes_nodeids", &[0, 1, 2]),
        ints("nodes_featureids", &[0, 0, 0]),
        strings("nodes_modes", &["BRANCH_LEQ", "LEAF", "LEAF"]),
        floats("nodes_values", &[0.5, 0.0, 0.0]),
        ints("nodes_truenodeids", &[1, 0, 0]),
        ints("nodes_falsenodeids", &[2, 0, 0]),
        ints("target_treeids", &[0, 0]),
        ints("target_nodeids", &[1, 2]),
        ints("target_ids", &[0, 0]),
        floats("target_weights", &[1.0, 2.0]),
    ];
    edit(&mut attrs);
    NodeProto {
        name: "t".into(),
        op_type: "TreeEnsembleRegressor".into(),
        domain: "ai.onnx.ml".into(),
        input: vec!["X".into()],
        output: vec!["Y".into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn set(attrs: &mut [AttributeProto], a: AttributeProto) {
    if let Some(slot) = attrs.iter_mut().find(|x| x.name == a.name) {
        *slot = a;
    }
}

fn build(node: &NodeProto) -> TractResult<()> {
    crate::util::with_parsing_context(17, |ctx| {
        edge_onnx_ml::tree::regressor(ctx, node).map(|_| ())
    })
}

#[test]
fn valid_regressor_builds() {
    build(&regressor(|_| {})).unwrap();
}

type Edit = Box<dyn FnOnce(&mut Vec<AttributeProto>)>;

#[test]
fn broken_regressors_are_errors_naming_the_problem() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "dangling child",
            Box::new(|a| set(a, ints("nodes_truenodeids", &[7, 0, 0]))),
        ),
        (
            "self loop",
            Box::new(|a| set(a, ints("nodes_falsenodeids", &[0, 0, 0]))),
        ),
        (
            "short list",
            Box::new(|a| set(a, floats("nodes_values", &[0.5]))),
        ),
        (
            "bad mode",
            Box::new(|a| set(a, strings("nodes_modes", &["BRANCH_XX", "LEAF", "LEAF"]))),
        ),
        (
            "bad target",
            Box::new(|a| set(a, ints("target_ids", &[0, 3]))),
        ),
        (
            "negative feature",
            Box::new(|a| set(a, ints("nodes_featureids", &[-4, 0, 0]))),
        ),
        (
            "no n_targets",
            Box::new(|a| a.retain(|x| x.name != "n_targets")),
        ),
        (
            "wrong type",
            Box::new(|a| set(a, floats("nodes_nodeids", &[0.0, 1.0, 2.0]))),
        ),
        (
            "bad aggregate",
            Box::new(|a| {
                a.push(AttributeProto {
                    name: "aggregate_function".into(),
                    r#type: AttributeType::String as i32,
                    s: b"MEDIAN".to_vec(),
                    ..Default::default()
                })
            }),
        ),
    ];
    for (what, edit) in cases {
        let err = build(&regressor(edit)).err();
        let msg = err.map(|e| format!("{e:#}"));
        assert!(msg.is_some(), "{what}: accepted");
        assert!(
            msg.as_deref().is_some_and(|m| m.contains("node t")),
            "{what}: {msg:?} does not name the node"
        );
    }
}

/// A `LinearClassifier` node with `attrs`.
fn linear_classifier(attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: "lc".into(),
        op_type: "LinearClassifier".into(),
        domain: "ai.onnx.ml".into(),
        input: vec!["X".into()],
        output: vec!["label".into(), "scores".into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn build_linear(node: &NodeProto) -> TractResult<()> {
    crate::util::with_parsing_context(17, |ctx| match node.op_type.as_str() {
        "LinearClassifier" => edge_onnx_ml::linear::classifier(ctx, node).map(|_| ()),
        _ => edge_onnx_ml::linear::regressor(ctx, node).map(|_| ()),
    })
}

fn post(v: &str) -> AttributeProto {
    AttributeProto {
        name: "post_transform".into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

#[test]
fn broken_linear_models_are_errors_naming_the_problem() {
    let coef = floats("coefficients", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let cases = [
        (
            linear_classifier(vec![
                floats("intercepts", &[0.0, 0.0]),
                ints("classlabels_ints", &[0, 1]),
            ]),
            "coefficients are missing",
        ),
        (
            linear_classifier(vec![
                coef.clone(),
                floats("intercepts", &[0.0; 4]),
                ints("classlabels_ints", &[0, 1, 2, 3]),
            ]),
            "not a multiple of the 4 classes",
        ),
        (
            linear_classifier(vec![
                coef.clone(),
                floats("intercepts", &[0.0; 3]),
                ints("classlabels_ints", &[0, 1]),
            ]),
            "2 class label(s) for 3 classes",
        ),
        (
            linear_classifier(vec![
                coef.clone(),
                floats("intercepts", &[0.0; 3]),
                ints("classlabels_ints", &[0, 1, 2]),
                strings("classlabels_strings", &["a", "b", "c"]),
            ]),
            "only one of classlabels_ints and classlabels_strings",
        ),
        (
            linear_classifier(vec![
                coef.clone(),
                floats("intercepts", &[0.0]),
                ints("classlabels_ints", &[4]),
            ]),
            "two class labels or none, got 1",
        ),
        (
            linear_classifier(vec![
                coef.clone(),
                floats("intercepts", &[0.0]),
                ints("classlabels_ints", &[0, 1]),
                post("PROBIT"),
            ]),
            "PROBIT with one score and two class labels",
        ),
        (
            linear_classifier(vec![
                floats("coefficients", &[1.0, f32::NAN]),
                floats("intercepts", &[0.0]),
            ]),
            "NaN or infinite",
        ),
        (
            linear_classifier(vec![
                coef.clone(),
                floats("intercepts", &[0.0; 3]),
                ints("classlabels_ints", &[0, 1, 2]),
                post("CUBE"),
            ]),
            "\"CUBE\"",
        ),
        (
            NodeProto {
                op_type: "LinearRegressor".into(),
                ..linear_classifier(vec![
                    coef.clone(),
                    int("targets", 2),
                    floats("intercepts", &[0.0; 3]),
                ])
            },
            "3 intercepts for targets = 2",
        ),
        (
            NodeProto {
                op_type: "LinearRegressor".into(),
                ..linear_classifier(vec![coef.clone(), int("targets", 4)])
            },
            "not a multiple of targets = 4",
        ),
        (
            NodeProto {
                op_type: "LinearRegressor".into(),
                ..linear_classifier(vec![coef, int("targets", 0)])
            },
            "targets must be at least 1",
        ),
    ];
    for (node, want) in cases {
        let err = build_linear(&node).expect_err(want);
        let msg = format!("{err:#}");
        assert!(msg.contains(want), "{want:?} not in {msg:?}");
    }
}

/// Coefficients that do not fit the input's feature count are refused
/// when the plan is built (onnxruntime reads a prefix of them).
#[test]
fn linear_coefficients_must_fit_the_input_features() {
    for name in ["lc_multi_probit", "lr_multi_softmax"] {
        let path = crate::util::fixtures_dir().join(format!("{name}.onnx"));
        let err = onnx_with_ml()
            .model_for_path(&path)
            .and_then(|m| m.with_input_fact(0, f32::fact([4, 3]).into()))
            .and_then(|m| m.into_optimized())
            .expect_err("5-feature weights on 3-feature rows");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("15 coefficients do not make 3 rows of 3 input features"),
            "{name}: {msg}"
        );
    }
}
