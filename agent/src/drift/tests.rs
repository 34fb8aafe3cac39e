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

/// Delivery to a real in-process cloud-sync on a port-0 socket.
#[cfg(feature = "demo")]
#[tokio::test]
async fn summaries_are_delivered_once_refused_ones_set_aside_and_bad_tokens_retried() {
    use crate::config::{Secret, SyncSettings};
    use sync_protocol::drift::ScoreStats;

    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let cloud = cloud_sync::start(
        cloud_sync::Settings::for_database(dir.path().join("cloud.db")),
        stop.clone(),
    )
    .await
    .unwrap();
    let token = cloud.store().add_device("dev-1").await.unwrap();
    let operator = cloud.store().add_operator("ops").await.unwrap();
    let sync = |token: &str| SyncSettings {
        url: format!("http://{}", cloud.addr),
        token: Secret::new(token.to_owned()),
        batch_max_rows: 500,
        interval: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        batch_max_bytes: 1 << 20,
        batch_max_delay: Duration::from_millis(50),
        backlog_rows_per_sec: None,
        heartbeat_interval: None,
        tls: None,
    };
    let summary = |start: i64| DriftSummary {
        model: "nab-machine-temp".into(),
        version: "1.0.0".into(),
        window_start_ms: start,
        window_end_ms: start + 1000,
        features: vec![],
        scores: ScoreStats::default(),
        stale: vec![],
        nan_skipped: 0,
        gap_resets: 0,
        alert: true,
        reasons: vec!["test".into()],
    };
    let queue = DriftQueue::open(&dir.path().join("q")).unwrap();
    let metrics = Arc::new(DriftMetrics::default());

    queue.push(summary(1000)).await;
    let wrong = deliver::Deliverer::new(
        &sync("0".repeat(64).as_str()),
        "dev-1",
        queue.clone(),
        metrics.clone(),
    )
    .unwrap();
    assert_eq!(wrong.pass().await, deliver::Pass::Retry, "401 is retried");
    assert_eq!(queue.pending().len(), 1, "nothing leaves the queue on 401");

    let right =
        deliver::Deliverer::new(&sync(&token), "dev-1", queue.clone(), metrics.clone()).unwrap();
    queue.push(summary(1000)).await; // the same window again (a replay)
    let mut bad = summary(5000);
    bad.window_end_ms = bad.window_start_ms;
    queue.push(bad).await;
    queue.push(summary(9000)).await;
    assert_eq!(right.pass().await, deliver::Pass::Drained);
    assert!(queue.pending().is_empty());
    assert_eq!(metrics.sent.load(Ordering::Relaxed), 3);
    assert_eq!(
        std::fs::read_dir(dir.path().join("q/refused"))
            .unwrap()
            .count(),
        1,
        "the 422 is set aside"
    );

    let reply = reqwest::Client::new()
        .get(format!(
            "http://{}{}",
            cloud.addr,
            sync_protocol::drift::model_drift_path("nab-machine-temp")
        ))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap();
    let fleet: sync_protocol::drift::FleetDrift = reply.json().await.unwrap();
    assert_eq!(
        (fleet.summaries, fleet.devices_alerting),
        (2, 1),
        "the replay is stored once"
    );
    stop.cancel();
}

/// The real inference stage feeds the monitor: readings, a skipped window
/// and the scores of the shipped NAB model.
#[tokio::test(start_paused = true)]
async fn the_inference_stage_feeds_readings_skips_and_scores() {
    use crate::buffer::Buffer;
    use crate::config::BufferSettings;
    use crate::inference::InferenceStage;

    let dir = tempfile::tempdir().unwrap();
    let s = DriftSettings {
        horizon_windows: 1,
        min_samples: 1,
        ..settings(dir.path())
    };
    let window = s.window;
    let (monitor, tap) = monitor(s).unwrap();
    let queue = monitor.queue();
    let metrics = monitor.metrics();
    let stop_monitor = CancellationToken::new();
    let monitor_task = tokio::spawn(monitor.run(stop_monitor.clone()));
    tokio::task::yield_now().await;

    let (buffer, thread) =
        Buffer::open(&BufferSettings::for_path(dir.path().join("buffer.db"))).unwrap();
    let (tx, rx) = mpsc::channel(4096);
    let (out_tx, mut out_rx) = mpsc::channel(4096);
    let stage = InferenceStage::new(
        vec![nab_model()],
        rx,
        buffer,
        out_tx,
        Arc::new(Counters::default()),
    )
    .with_drift(tap.clone());
    let stage_task = tokio::spawn(stage.run(CancellationToken::new()));
    let values = nab_before_failure();
    for (i, &v) in values.iter().take(300).enumerate() {
        let mut r = reading("machine-1", v);
        r.seq = i as u64 + 1;
        r.device_ts_ms = Some(1_000_000 + i as i64 * 300_000);
        if i == 100 {
            r.values.insert("value".into(), f64::NAN);
        }
        tx.send(r).await.unwrap();
    }
    drop(tx);
    stage_task.await.unwrap().unwrap();
    let mut published = 0;
    while out_rx.recv().await.is_some() {
        published += 1;
    }
    drop(thread);

    // Design: the paused clock auto-advances while the buffer thread
    // commits, so the series may span several windows; totals must match.
    let started = std::time::Instant::now();
    let summaries: Vec<DriftSummary> = loop {
        tokio::time::advance(window).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let queued: Vec<DriftSummary> = queue.pending().into_iter().map(|(_, s)| s).collect();
        let seen: u64 = queued
            .iter()
            .map(|s| s.features[0].count + s.features[0].missing)
            .sum();
        if seen >= 300 {
            break queued;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {seen} values summarised"
        );
    };
    stop_monitor.cancel();
    monitor_task.await.unwrap();
    assert_eq!(metrics.events_dropped.load(Ordering::Relaxed), 0);
    let total = |f: &dyn Fn(&DriftSummary) -> u64| summaries.iter().map(f).sum::<u64>();
    for s in &summaries {
        assert_eq!(
            (s.model.as_str(), s.version.as_str()),
            ("nab-machine-temp", "1.0.0")
        );
        assert_eq!(s.scores.baseline_p50, Some(9.495_649));
    }
    assert_eq!(total(&|s| s.features[0].count), 299);
    assert_eq!(total(&|s| s.features[0].missing), 1);
    assert!(
        total(&|s| s.nan_skipped) >= 1,
        "windows over the NaN are skipped"
    );
    assert_eq!(
        total(&|s| s.scores.count),
        published,
        "every published score is seen"
    );
    assert!(published > 40);
    assert!(summaries.iter().any(|s| s.scores.median.is_some()));
    assert!(
        summaries.iter().any(|s| s.features[0].psi.is_some()),
        "a one-window horizon with values is judged"
    );
}
