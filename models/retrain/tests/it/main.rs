//! Integration tests of `edge-retrain`: real NAB data, real tract, packages
//! written to temp dirs and verified as the agent loads them.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edge_retrain::data::read_nab_labels;
use edge_retrain::{
    LabelConfig, Point, Reading, Series, TrainConfig, TrainError, TrainingData, package, train,
};

const LABEL_KEY: &str = "realKnownCause/machine_temperature_system_failure.csv";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn nab_data() -> TrainingData {
    TrainingData::from_nab_csv(
        &repo().join("data/nab/machine_temperature_system_failure.csv"),
        "nab",
        "machine-1",
        "temperature",
    )
    .unwrap()
}

fn spans() -> Vec<(i64, i64)> {
    read_nab_labels(&repo().join("data/nab/anomaly_windows.json"), LABEL_KEY).unwrap()
}

fn series(values: &[f64]) -> TrainingData {
    TrainingData {
        series: vec![Series {
            device: "d".to_owned(),
            source: "s".to_owned(),
            stream: "temperature".to_owned(),
            field: "value".to_owned(),
            points: values
                .iter()
                .enumerate()
                .map(|(i, &value)| Point {
                    seq: i as i64 + 1,
                    ts_ms: i as i64 * 300_000,
                    value,
                })
                .collect(),
        }],
    }
}

fn no_progress() -> impl FnMut(edge_retrain::Stage) {
    |_| {}
}

#[test]
fn nab_retrained_detector_is_at_least_as_good_as_the_shipped_one() {
    let data = nab_data();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nab-machine-temp/1.1.0");
    let mut config = TrainConfig::new("nab-machine-temp");
    config.version = "1.1.0".to_owned();
    let mut stages = Vec::new();
    let report = train(&data, &config, &dir, &mut |s| stages.push(s)).unwrap();
    assert_eq!(stages.len(), 4);
    assert_eq!(package::verify(&dir).unwrap(), 3);
    assert!(
        report.metrics["tract_max_rel_diff"] < 1e-4,
        "{:?}",
        report.metrics
    );

    let series = data
        .find("nab", "machine-1", "temperature", "value")
        .unwrap();
    let shipped =
        edge_retrain::nab_evaluate(&repo().join("models/nab-machine-temp"), series, &spans())
            .unwrap();
    let retrained = edge_retrain::nab_evaluate(&dir, series, &spans()).unwrap();
    println!("shipped:   {shipped}");
    println!("retrained: {retrained}");
    println!("metrics:   {:?}", report.metrics);
    // The shipped model's printed figures (models/README.md), reproduced through tract.
    assert_eq!(
        (
            shipped.windows,
            shipped.flagged,
            shipped.in_labeled,
            shipped.detected
        ),
        (3781, 38, 11, 4)
    );
    assert!(
        retrained.detected >= shipped.detected,
        "{retrained} vs {shipped}"
    );
    assert!(retrained.lift >= shipped.lift, "{retrained} vs {shipped}");

    // The held-out period only (windows the retrained model never fitted;
    // the shipped model fitted them all): the same windows, cut from the
    // first held-out window's start.
    let train_windows = report.metrics["train_windows"] as usize;
    let start = train_windows * config.hop;
    let held = Series {
        points: series.points[start..].to_vec(),
        ..series.clone()
    };
    let shipped_held =
        edge_retrain::nab_evaluate(&repo().join("models/nab-machine-temp"), &held, &spans())
            .unwrap();
    let retrained_held = edge_retrain::nab_evaluate(&dir, &held, &spans()).unwrap();
    println!("held-out shipped:   {shipped_held}");
    println!("held-out retrained: {retrained_held}");
    assert_eq!(
        retrained_held.windows,
        report.metrics["heldout_windows"] as usize
    );
    assert_eq!(
        retrained_held.flagged,
        report.metrics["heldout_flagged"] as usize
    );
}

#[test]
fn too_little_data_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m/1.0.0");
    let config = TrainConfig::new("m");
    // 11 points: not one window of 12.
    let err = train(&series(&[1.0; 11]), &config, &dir, &mut no_progress()).unwrap_err();
    assert!(
        matches!(err, TrainError::TooLittleData { windows: 0, .. }),
        "{err}"
    );
    // 18 points: two windows, one to train: still too few.
    let err = train(
        &series(&(0..18).map(f64::from).collect::<Vec<_>>()),
        &config,
        &dir,
        &mut no_progress(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::TooLittleData {
                windows: 2,
                train: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("too little data"), "{err}");
    assert!(!dir.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path().join("m"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

#[test]
fn constant_series_trains_thanks_to_the_ridge() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flat");
    let report = train(
        &series(&[42.0; 600]),
        &TrainConfig::new("flat"),
        &dir,
        &mut no_progress(),
    )
    .unwrap();
    assert_eq!(package::verify(&dir).unwrap(), 3);
    assert_eq!(report.threshold, 0.0);
    let manifest = package::read_manifest(&dir).unwrap();
    assert_eq!(manifest.baseline.features[0].std, 0.0);
    // Any deviation from the constant is far above the threshold.
    assert!(manifest.golden.iter().all(|g| g.score.unwrap() == 0.0));
}

#[test]
fn non_finite_values_are_named() {
    let mut values: Vec<f64> = (0..300).map(|i| f64::from(i % 7)).collect();
    values[100] = f64::NAN;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nan");
    let err = train(
        &series(&values),
        &TrainConfig::new("nan"),
        &dir,
        &mut no_progress(),
    )
    .unwrap_err();
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(
        text.contains("non-finite value NaN") && text.contains("seq 101"),
        "{text}"
    );
    assert!(!dir.exists());
}

#[test]
fn missing_stream_and_bad_config_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = TrainConfig::new("m");
    config.stream = "pressure".to_owned();
    let err = train(
        &series(&[1.0; 100]),
        &config,
        &tmp.path().join("a"),
        &mut no_progress(),
    )
    .unwrap_err();
    assert!(matches!(err, TrainError::NoSeries { .. }), "{err}");
    let mut config = TrainConfig::new("m");
    config.hop = 13;
    let err = train(
        &series(&[1.0; 100]),
        &config,
        &tmp.path().join("b"),
        &mut no_progress(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("`hop`"), "{err}");
    let parsed: Result<TrainConfig, _> = toml::from_str("name = \"m\"\nwindows = 3\n");
    assert!(parsed.is_err());
}

#[test]
fn tampered_package_fails_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    let values: Vec<f64> = (0..400)
        .map(|i| (f64::from(i) * 0.3).sin() * 10.0 + 50.0)
        .collect();
    train(
        &series(&values),
        &TrainConfig::new("p"),
        &dir,
        &mut no_progress(),
    )
    .unwrap();
    let path = dir.join("model.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut manifest = package::read_manifest(&dir).unwrap();
    manifest.golden[1].score = Some(manifest.golden[1].score.unwrap() * 1.01 + 1.0);
    let tampered = toml::to_string(&manifest).unwrap();
    std::fs::write(&path, &tampered).unwrap();
    let err = package::verify(&dir).unwrap_err();
    assert!(
        matches!(err, package::PackageError::GoldenMismatch { index: 1, .. }),
        "{err}"
    );
    std::fs::write(&path, text).unwrap();
    std::fs::write(dir.join("model.onnx"), b"not onnx").unwrap();
    assert!(matches!(
        package::verify(&dir).unwrap_err(),
        package::PackageError::HashMismatch { .. }
    ));
    // An existing directory is never overwritten.
    let err = train(
        &series(&values),
        &TrainConfig::new("p"),
        &dir,
        &mut no_progress(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            TrainError::Package(package::PackageError::Exists { .. })
        ),
        "{err}"
    );
}

#[test]
fn classifier_on_labelled_readings() {
    // Two devices; the label stream says "anomaly" while the signal ramps up fast.
    let mut rows = Vec::new();
    for device in ["a", "b"] {
        for i in 0..2000i64 {
            let anomalous = (i / 100) % 4 == 3;
            let noise = ((i * 7919) % 13) as f64 / 13.0;
            let value = if anomalous {
                50.0 + (i % 100) as f64 * 0.8 + noise
            } else {
                50.0 + noise
            };
            rows.push(Reading {
                device: device.to_owned(),
                source: "m".to_owned(),
                stream: "temperature".to_owned(),
                seq: 2 * i,
                ts_ms: i * 1000,
                fields: BTreeMap::from([("value".to_owned(), value)]),
            });
            rows.push(Reading {
                device: device.to_owned(),
                source: "m".to_owned(),
                stream: "label".to_owned(),
                seq: 2 * i + 1,
                ts_ms: i * 1000,
                fields: BTreeMap::from([("anomaly".to_owned(), f64::from(u8::from(anomalous)))]),
            });
        }
    }
    let data = TrainingData::from_readings(rows);
    let mut config = TrainConfig::new("clf");
    config.label = Some(LabelConfig {
        stream: "label".to_owned(),
        field: "anomaly".to_owned(),
        l2: 1.0,
    });
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("clf");
    let report = train(&data, &config, &dir, &mut no_progress()).unwrap();
    assert_eq!(report.family, "classifier");
    assert!(
        report.metrics["heldout_accuracy"] > 0.9,
        "{:?}",
        report.metrics
    );
    assert!(
        report.metrics["heldout_recall"] > 0.8,
        "{:?}",
        report.metrics
    );
    let manifest = package::read_manifest(&dir).unwrap();
    assert_eq!(manifest.output.kind, "class_probabilities");
    assert!(package::verify(&dir).unwrap() >= 6);
    // One class only: refused.
    let mut one = data.clone();
    for s in &mut one.series {
        if s.stream == "label" {
            s.points.iter_mut().for_each(|p| p.value = 0.0);
        }
    }
    let err = train(&one, &config, &tmp.path().join("one"), &mut no_progress()).unwrap_err();
    assert!(
        matches!(err, TrainError::OneClass { positives: 0, .. }),
        "{err}"
    );
}

#[test]
fn classifier_on_nab_labels_verifies() {
    let mut data = nab_data();
    data.add_span_labels("temperature", &spans(), "label", "anomaly");
    let mut config = TrainConfig::new("nab-classifier");
    config.train_fraction = 0.5;
    config.label = Some(LabelConfig {
        stream: "label".to_owned(),
        field: "anomaly".to_owned(),
        l2: 1.0,
    });
    let tmp = tempfile::tempdir().unwrap();
    let report = train(&data, &config, &tmp.path().join("c"), &mut no_progress()).unwrap();
    println!("nab classifier: {:?}", report.metrics);
    assert!(report.metrics["tract_max_rel_diff"] < 1e-4);
}
