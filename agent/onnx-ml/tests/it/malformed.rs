//! Malformed ONNX-ML nodes are load errors naming the problem, never panics.

use edge_onnx_ml::onnx_with_ml;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto};
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
    let onnx = onnx_with_ml();
    let proto = ModelProto::default();
    let ctx = ParsingContext {
        onnx_operator_set_version: 17,
        framework: &onnx,
        model: &proto,
        parent_graphs: vec![],
        model_dir: None,
        template: InferenceModel::default(),
    };
    edge_onnx_ml::tree::regressor(&ctx, node).map(|_| ())
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
