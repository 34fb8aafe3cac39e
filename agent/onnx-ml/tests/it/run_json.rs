//! `edge_onnx_ml::run`: JSON rows in, JSON outputs out, equal to
//! onnxruntime's recorded outputs.

use edge_onnx_ml::run::{RunError, run_files, run_model};
use serde_json::{Value, json};

use crate::util::{ABS_TOL, REL_TOL, fixtures_dir, read};

/// Nests a fixture's flat data like its shape (rank 1 or 2).
fn rows(j: &crate::util::Json) -> Value {
    match j.shape.as_slice() {
        [_] => Value::Array(j.data.clone()),
        [_, c] => Value::Array(
            j.data
                .chunks(*c)
                .map(|r| Value::Array(r.to_vec()))
                .collect(),
        ),
        s => panic!("shape {s:?}"),
    }
}

fn close(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| close(a, b))
        }
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            (a - b).abs() <= REL_TOL * b.abs() + ABS_TOL
        }
        (a, b) => a == b,
    }
}

#[test]
fn classifier_rows_give_onnxruntime_labels_and_probabilities() {
    let fx = read("rf_classifier");
    let out = run_model(&fixtures_dir().join(&fx.model), &rows(&fx.inputs["X"])).unwrap();
    let want = Value::Array(fx.outputs.iter().map(rows).collect());
    assert!(close(&out, &want), "{out}\n!=\n{want}");
}

#[test]
fn string_inputs_and_named_inputs_work() {
    let fx = read("label_encoder");
    let named = json!({ "X": rows(&fx.inputs["X"]) });
    let out = run_model(&fixtures_dir().join(&fx.model), &named).unwrap();
    assert_eq!(out, Value::Array(fx.outputs.iter().map(rows).collect()));
}

#[test]
fn files_are_read_and_problems_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rows.json");
    std::fs::write(&input, "[[1, 2, 3, 4, 5, 6, 7, 8]]").unwrap();
    let model = fixtures_dir().join("rf_classifier.onnx");
    let out = run_files(&model, &input).unwrap();
    assert_eq!(out.as_array().map(Vec::len), Some(2));

    std::fs::write(&input, "[[1, 2], [3]]").unwrap();
    assert!(matches!(
        run_files(&model, &input),
        Err(RunError::BadRows { .. })
    ));
    std::fs::write(&input, "{\"nope\": [[1]]}").unwrap();
    assert!(matches!(
        run_files(&model, &input),
        Err(RunError::UnknownInput(_))
    ));
    std::fs::write(&input, "not json").unwrap();
    assert!(matches!(run_files(&model, &input), Err(RunError::Json(_))));
    std::fs::write(&input, "[[1, 2, 3]]").unwrap();
    assert!(matches!(
        run_files(&dir.path().join("missing.onnx"), &input),
        Err(RunError::Read { .. })
    ));
    assert!(matches!(run_files(&model, &input), Err(RunError::Tract(_))));
}
