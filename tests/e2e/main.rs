//! End-to-end: sensor -> broker -> agent (SQLite, tract, MQTT publish) ->
//! HTTP sync -> cloud-sync (SQLite), checked from both databases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod mlops;
mod sync;

use edge_agent::demo::{DemoArgs, DemoReport, run};

fn check(report: &DemoReport, expect_published: u64) {
    // Every published reading is in the agent's SQLite and in the cloud's, once.
    assert_eq!(report.published, expect_published);
    assert_eq!(report.readings_stored, report.published);
    assert_eq!(report.dead_letters, 0);
    assert_eq!(report.unsynced_readings, 0);
    assert_eq!(report.cloud_readings, report.published);
    assert!(
        report.cloud_contiguous,
        "cloud sequences have gaps or duplicates"
    );
    // Every window was scored, stored and synced.
    assert!(report.predictions > 0);
    assert_eq!(report.predictions, report.predictions_expected);
    assert_eq!(report.cloud_predictions, report.predictions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_path_on_embedded_broker_matches_nab_labels() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(DemoArgs {
        rate: 50_000,
        quiet: true,
        state_dir: Some(dir.path().to_owned()),
        ..DemoArgs::default()
    })
    .await
    .unwrap();
    check(&report, 22_695);
    // The model flags something, but far from everything...
    assert!(report.anomalies > 0);
    assert!(report.anomalies * 20 < report.predictions, "{report}");
    // ...and its flags concentrate in NAB's labeled failure windows.
    assert!(report.windows_detected() >= 3, "{report}");
    let inside = report.anomalies_in_labeled as f64 / report.anomalies as f64;
    assert!(
        inside > 2.0 * report.labeled_share,
        "flags are not concentrated in labeled windows: {report}"
    );
    assert!(report.agent_db.starts_with(dir.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_machines_keep_separate_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let report = run(DemoArgs {
        rate: 50_000,
        limit: Some(600),
        machines: 3,
        quiet: true,
        state_dir: Some(dir.path().to_owned()),
        ..DemoArgs::default()
    })
    .await
    .unwrap();
    check(&report, 1_800);
}

/// Same path through the machine's Mosquitto (gated: `.ci/run` sets
/// `EDGE_TEST_MOSQUITTO`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_path_on_real_mosquitto() {
    let Some(addr) = e2e::mosquitto() else {
        eprintln!(
            "skipped: set {} to run against Mosquitto",
            e2e::MOSQUITTO_ENV
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let report = run(DemoArgs {
        rate: 5_000,
        limit: Some(5_000),
        broker: Some(format!("mqtt://{addr}")),
        quiet: true,
        state_dir: Some(dir.path().to_owned()),
        ..DemoArgs::default()
    })
    .await
    .unwrap();
    check(&report, 5_000);
}
