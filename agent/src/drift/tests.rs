#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::*;

const NAB_CSV: &str = include_str!("../../../data/nab/machine_temperature_system_failure.csv");
/// Start of NAB's last labeled window: the failure.
const FAILURE: &str = "2014-02-07 14:55";

fn settings(dir: &Path) -> DriftSettings {
    let mut errs = Vec::new();
    let s = validate(&RawDrift::default(), dir, &mut errs).unwrap();
    assert!(errs.is_empty(), "{errs:?}");
    s
}

fn nab_before_failure() -> Vec<f64> {
    NAB_CSV
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(','))
        .take_while(|(ts, _)| *ts < FAILURE)
        .map(|(_, v)| v.trim().parse::<f64>().unwrap())
        .collect()
}

fn nab_model() -> LoadedModel {
    LoadedModel::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp"))
        .unwrap()
}

fn reading(source: &str, v: f64) -> CommittedReading {
    CommittedReading {
        source: source.into(),
        stream: "temperature".into(),
        seq: 0,
        device_ts_ms: None,
        values: BTreeMap::from([("value".to_owned(), v)]),
    }
}

/// Replays `values` through the real monitor, one day (288 readings at the
/// NAB cadence) per window of the default config; returns the summaries.
async fn replay(values: &[f64]) -> Vec<DriftSummary> {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let window = s.window;
    let (monitor, tap) = monitor(s).unwrap();
    let queue = monitor.queue();
    let metrics = monitor.metrics();
    let token = CancellationToken::new();
    let task = tokio::spawn(monitor.run(token.clone()));
    tokio::task::yield_now().await;
    let model = nab_model();
    for (day, chunk) in values.chunks(288).enumerate() {
        for &v in chunk {
            tap.reading(&model, &reading("machine-1", v), 0);
        }
        tokio::time::advance(window).await;
        let started = std::time::Instant::now();
        while metrics.summaries.load(Ordering::Relaxed) < day as u64 + 1 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no summary for day {day}"
            );
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(metrics.events_dropped.load(Ordering::Relaxed), 0);
    token.cancel();
    task.await.unwrap();
    queue.pending().into_iter().map(|(_, s)| s).collect()
}

#[tokio::test(start_paused = true)]
async fn nab_before_the_failure_raises_no_alert() {
    let values = nab_before_failure();
    assert!(values.len() > 19_000, "{}", values.len());
    let summaries = replay(&values).await;
    assert_eq!(summaries.len(), values.len().div_ceil(288));
    let judged: Vec<&DriftSummary> = summaries
        .iter()
        .filter(|s| s.features[0].psi.is_some())
        .collect();
    assert!(judged.len() > 50, "judged {}", judged.len());
    for s in &summaries {
        assert!(!s.alert, "unexpected alert: {:?}", s.reasons);
        assert!(s.window_end_ms > s.window_start_ms);
    }
    let worst = judged
        .iter()
        .filter_map(|s| s.features[0].psi)
        .fold(0.0, f64::max);
    assert!(worst < 3.0 && worst > 0.1, "worst psi {worst}");
}

#[tokio::test(start_paused = true)]
async fn a_shifted_nab_series_raises_the_alert() {
    // Three baseline standard deviations (13.75) up.
    let values: Vec<f64> = nab_before_failure()
        .into_iter()
        .map(|v| v + 3.0 * 13.747_622)
        .collect();
    let summaries = replay(&values).await;
    let judged: Vec<&DriftSummary> = summaries
        .iter()
        .filter(|s| s.features[0].psi.is_some())
        .collect();
    assert!(judged.len() > 50);
    for s in &judged {
        assert!(s.alert, "no alert: {:?}", s.features[0]);
        assert!(
            s.reasons.iter().any(|r| r.contains("psi")),
            "{:?}",
            s.reasons
        );
        assert!(s.features[0].mean_shift.unwrap() > 2.0);
    }
    assert!(
        summaries
            .iter()
            .filter(|s| s.features[0].psi.is_none())
            .all(|s| !s.alert),
        "windows before the horizon filled are not judged"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_sensor_is_stale_while_others_report() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let baseline = ModelBaseline::read(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/nab-machine-temp"),
    )
    .unwrap();
    let mut m = ModelDrift::new("nab-machine-temp", "1.0.0", baseline);
    let values = BTreeMap::from([("value".to_owned(), 85.0)]);
    for _ in 0..10 {
        m.reading("a", "temperature", &values, Instant::now());
        m.reading("b", "temperature", &values, Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert!(m.stale(Instant::now(), s.stale_after).is_empty());
    // b goes silent; a keeps reporting.
    for _ in 0..20 {
        m.reading("a", "temperature", &values, Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    assert_eq!(m.stale(Instant::now(), s.stale_after), ["b/temperature"]);
    let summary = m.close(0, 1, Instant::now(), &s).unwrap();
    assert!(summary.alert);
    assert_eq!(summary.stale, ["b/temperature"]);
    // Everyone silent: nobody is stale (the plant may be off).
    tokio::time::advance(s.stale_after).await;
    assert!(m.stale(Instant::now(), s.stale_after).is_empty());
}

#[test]
fn missing_data_and_scores_are_summarised() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let baseline = ModelBaseline {
        features: vec![FeatureBaseline {
            stream: "t".into(),
            field: "v".into(),
            mean: 0.0,
            std: 1.0,
        }],
        score_p50: Some(1.0),
        score_p99: Some(5.0),
    };
    let mut m = ModelDrift::new("m", "1.0.0", baseline);
    let now = Instant::now();
    m.reading("a", "t", &BTreeMap::from([("v".to_owned(), 0.5)]), now);
    m.reading("a", "t", &BTreeMap::from([("other".to_owned(), 0.5)]), now);
    m.nan_skipped += 1;
    m.gap_resets += 2;
    for (score, anomaly) in [(1.0, false), (2.0, false), (6.0, true), (7.0, true)] {
        m.score(score, anomaly);
    }
    let summary = m.close(10, 20, now, &s).unwrap();
    assert_eq!(summary.features[0].count, 1);
    assert_eq!(summary.features[0].missing, 1);
    assert_eq!((summary.nan_skipped, summary.gap_resets), (1, 2));
    assert_eq!(summary.scores.count, 4);
    assert_eq!(summary.scores.over_p99_share, Some(0.5));
    assert_eq!(summary.scores.anomaly_share, Some(0.5));
    assert_eq!(summary.scores.median, Some(4.0));
    assert!(!summary.alert, "one window is not judged");
    assert!(
        m.close(20, 30, now, &s).is_none(),
        "an idle model sends nothing"
    );
}

#[test]
fn bad_drift_keys_are_named() {
    let raw = RawDrift {
        window_secs: 0,
        horizon_windows: 0,
        min_samples: 0,
        psi_alert: -1.0,
        mean_shift_alert: f64::NAN,
        stale_after_secs: 0,
        max_queued: 0,
        ..RawDrift::default()
    };
    let mut errs = Vec::new();
    let _ = validate(&raw, Path::new("/tmp"), &mut errs);
    for key in [
        "drift.window_secs",
        "drift.horizon_windows",
        "drift.min_samples",
        "drift.psi_alert",
        "drift.mean_shift_alert",
        "drift.stale_after_secs",
        "drift.max_queued",
    ] {
        assert!(
            errs.iter().any(|e| e.starts_with(key)),
            "{key} not named in {errs:?}"
        );
    }
    let off = RawDrift {
        enabled: false,
        ..RawDrift::default()
    };
    let mut errs = Vec::new();
    assert!(validate(&off, Path::new("/tmp"), &mut errs).is_none());
    assert!(errs.is_empty());
}
