//! Drift end to end through the real binary: shifted NAB readings over a
//! real broker -> the agent's drift monitor (two-second windows) -> the
//! durable queue -> cloud-sync (in process, SQLite) -> a device alert in
//! the fleet view and a fleet alert at `GET /v1/alerts`.

use std::time::{Duration, Instant};

use edge_agent::demo::nab;
use tokio_util::sync::CancellationToken;

use super::util;

const DEVICE: &str = "it-drift";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shifted_series_reaches_the_cloud_as_a_fleet_alert() {
    let broker = edge_agent::demo::broker::start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let cloud = cloud_sync::start(
        cloud_sync::Settings::for_database(dir.path().join("cloud.db")),
        stop.clone(),
    )
    .await
    .unwrap();
    let token = cloud.store().add_device(DEVICE).await.unwrap();
    let operator = cloud.store().add_operator("ops").await.unwrap();
    std::fs::write(dir.path().join("token"), &token).unwrap();
    let base = format!("http://{}", cloud.addr);
    let text = util::config(dir.path(), &format!("mqtt://{broker}"), "it-drift")
        .replace(
            "# Set to false to keep everything local.\nenabled = false",
            "enabled = true",
        )
        .replace("http://127.0.0.1:8443", &base)
        .replace(
            "/etc/edge-agent/token",
            &dir.path().join("token").display().to_string(),
        )
        .replace(
            "device_id = \"edge-0001\"",
            &format!("device_id = \"{DEVICE}\""),
        )
        .replace(
            "heartbeat_interval_secs = 60",
            "heartbeat_interval_secs = 0",
        )
        .replace(
            "enabled = false\nwindow_secs = 86400",
            "enabled = true\nwindow_secs = 2",
        )
        .replace("horizon_windows = 7", "horizon_windows = 1");
    assert!(text.contains("window_secs = 2") && text.contains(&base));
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, text).unwrap();

    let agent = util::Agent::start(&cfg);
    assert!(
        tokio::task::block_in_place(|| agent.wait_for("ingest subscribed", Duration::from_secs(30))),
        "agent never subscribed"
    );
    // Three baseline standard deviations (13.75) above the NAB series.
    let series = nab::series().unwrap();
    let payloads: Vec<String> = series
        .iter()
        .take(600)
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{{\"id\":{},\"ts\":{},\"value\":{}}}",
                i + 1,
                p.ts,
                p.value + 3.0 * 13.747_622
            )
        })
        .collect();
    util::publish_all(broker, "sensors/m1/temperature", payloads).await;

    edge_agent::install_crypto_provider();
    let client = reqwest::Client::new();
    let alerts_url = format!("{base}{}", sync_protocol::drift::alerts_path());
    let deadline = Instant::now() + Duration::from_secs(60);
    let alerts: Vec<sync_protocol::drift::FleetAlert> = loop {
        let got: Vec<sync_protocol::drift::FleetAlert> = client
            .get(&alerts_url)
            .bearer_auth(&operator)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "no fleet alert within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alerts[0].model, "nab-machine-temp");
    assert_eq!(
        (alerts[0].devices_reporting, alerts[0].devices_alerting),
        (1, 1)
    );

    let fleet: sync_protocol::drift::FleetDrift = client
        .get(format!(
            "{base}{}",
            sync_protocol::drift::model_drift_path("nab-machine-temp")
        ))
        .bearer_auth(&operator)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet.devices_alerting, 1);
    let psi = fleet.features[0].mean_psi.unwrap();
    let shift = fleet.features[0].mean_shift.unwrap();
    assert!(psi > 3.0 && shift > 2.0, "psi {psi} shift {shift}");

    let stopped = agent.stop(Duration::from_secs(20));
    let _ = stopped;
    stop.cancel();
}
