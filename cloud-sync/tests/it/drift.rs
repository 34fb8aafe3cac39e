//! Drift: summaries stored once per (device, model, window), device auth
//! (403 across devices), the fleet view, and the fleet alert raised above
//! the configured share and not at it, on SQLite and (gated on
//! `EDGE_TEST_POSTGRES`) PostgreSQL; the `drift alerts` CLI.

use anyhow::Result;
use axum::Router;
use axum::http::StatusCode;
use cloud_sync::drift::{Drift, DriftSettings};
use cloud_sync::sync_protocol::drift::{
    DriftAck, DriftSummary, FeatureDrift, FleetAlert, FleetDrift, ScoreStats, alerts_path,
    drift_path, model_drift_path,
};
use cloud_sync::{AppState, Settings, StorageSettings, Store, app};

use crate::backends::PgSchema;
use crate::util::{get, post, send};

const DAY_MS: i64 = 86_400_000;

struct Fixture {
    _dir: tempfile::TempDir,
    _schema: Option<PgSchema>,
    settings: Settings,
    router: Router,
    store: Store,
}

impl Fixture {
    async fn sqlite() -> Result<Fixture> {
        let dir = tempfile::tempdir()?;
        let settings = Settings::for_database(dir.path().join("cloud.db"));
        Fixture::open(dir, settings, None).await
    }

    async fn postgres(test: &str) -> Result<Option<Fixture>> {
        let Some(schema) = PgSchema::create(test).await? else {
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let mut settings = Settings::for_database(dir.path().join("unused.db"));
        settings.storage = StorageSettings::Postgres(Box::new(schema.settings()));
        Ok(Some(Fixture::open(dir, settings, Some(schema)).await?))
    }

    async fn open(
        dir: tempfile::TempDir,
        mut settings: Settings,
        schema: Option<PgSchema>,
    ) -> Result<Fixture> {
        settings.drift = DriftSettings {
            fleet_window_ms: DAY_MS,
            fleet_alert_percent: 50,
            min_devices: 2,
        };
        let store = Store::connect(&settings.storage).await?;
        let drift = Drift::open(&settings.storage, settings.drift.clone()).await?;
        // Opening twice finds the migrations applied.
        drop(Drift::open(&settings.storage, settings.drift.clone()).await?);
        let router = app(AppState::new(store.clone(), &settings).with_drift(drift));
        Ok(Fixture {
            _dir: dir,
            _schema: schema,
            settings,
            router,
            store,
        })
    }
}

fn summary(start_ms: i64, alert: bool, psi: f64, shift: f64) -> DriftSummary {
    DriftSummary {
        model: "nab-machine-temp".into(),
        version: "1.0.0".into(),
        window_start_ms: start_ms,
        window_end_ms: start_ms + 3_600_000,
        features: vec![FeatureDrift {
            stream: "temperature".into(),
            field: "value".into(),
            count: 288,
            missing: 0,
            mean: Some(85.0),
            std: Some(3.0),
            min: Some(80.0),
            max: Some(90.0),
            horizon_count: 2016,
            psi: Some(psi),
            mean_shift: Some(shift),
        }],
        scores: ScoreStats::default(),
        stale: vec![],
        nan_skipped: 0,
        gap_resets: 0,
        alert,
        reasons: if alert { vec!["psi".into()] } else { vec![] },
    }
}

async fn post_summary(
    f: &Fixture,
    path_device: &str,
    token: Option<&str>,
    s: &DriftSummary,
) -> Result<(StatusCode, Option<DriftAck>)> {
    let reply = send(
        &f.router,
        post(
            &drift_path(path_device),
            token,
            "application/json",
            None,
            serde_json::to_vec(s)?,
        )?,
    )
    .await?;
    let ack = (reply.status == StatusCode::OK)
        .then(|| reply.json::<DriftAck>())
        .transpose()?;
    Ok((reply.status, ack))
}

async fn alerts(f: &Fixture, token: &str) -> Result<Vec<FleetAlert>> {
    let reply = send(&f.router, get(&alerts_path(), Some(token))?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()
}

async fn scenario(f: &Fixture) -> Result<()> {
    let mut tokens = Vec::new();
    for d in ["d1", "d2", "d3", "d4"] {
        tokens.push(f.store.add_device(d).await?);
    }
    let op = f.store.add_operator("ops").await?;
    let w0 = 9 * DAY_MS;
    let w1 = 10 * DAY_MS;

    // Idempotent per (device, model, window_start_ms).
    let first = summary(w0 + 1000, false, 0.5, 0.2);
    let (status, ack) = post_summary(f, "d1", Some(&tokens[0]), &first).await?;
    assert_eq!(
        (status, ack),
        (StatusCode::OK, Some(DriftAck { stored: true }))
    );
    let mut replay = first.clone();
    replay.alert = true;
    let (status, ack) = post_summary(f, "d1", Some(&tokens[0]), &replay).await?;
    assert_eq!(
        (status, ack),
        (StatusCode::OK, Some(DriftAck { stored: false }))
    );

    // Device A cannot post as B; operators never post; no token is 401.
    let (status, _) = post_summary(f, "d2", Some(&tokens[0]), &first).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post_summary(f, "d1", Some(&op), &first).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post_summary(f, "d1", None, &first).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let mut bad = first.clone();
    bad.window_end_ms = bad.window_start_ms;
    let (status, _) = post_summary(f, "d1", Some(&tokens[0]), &bad).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Previous fleet window: every device reports, none alerts.
    for (i, d) in ["d2", "d3", "d4"].iter().enumerate() {
        post_summary(
            f,
            d,
            Some(&tokens[i + 1]),
            &summary(w0 + 1000, false, 0.5, 0.2),
        )
        .await?;
    }
    assert!(alerts(f, &op).await?.is_empty());

    // This fleet window: 2 of 4 alerting is 50 %, not more than 50 %.
    post_summary(f, "d1", Some(&tokens[0]), &summary(w1 + 5, true, 4.0, 2.5)).await?;
    post_summary(f, "d2", Some(&tokens[1]), &summary(w1 + 7, true, 6.0, 3.5)).await?;
    post_summary(f, "d3", Some(&tokens[2]), &summary(w1 + 9, false, 1.0, 0.5)).await?;
    assert!(
        alerts(f, &op).await?.is_empty(),
        "at the threshold: no fleet alert"
    );

    // The third alerting device crosses it.
    let (status, _) =
        post_summary(f, "d4", Some(&tokens[3]), &summary(w1 + 11, true, 5.0, 3.0)).await?;
    assert_eq!(status, StatusCode::OK);
    let raised = alerts(f, &op).await?;
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(
        (
            raised[0].model.as_str(),
            raised[0].window_start_ms,
            raised[0].devices_reporting,
            raised[0].devices_alerting
        ),
        ("nab-machine-temp", w1, 4, 3)
    );
    // Another alerting window in the same fleet window raises nothing new.
    post_summary(f, "d4", Some(&tokens[3]), &summary(w1 + 99, true, 5.0, 3.0)).await?;
    assert_eq!(alerts(f, &op).await?.len(), 1);
    let reply = send(
        &f.router,
        get(&format!("{}?since_ms={}", alerts_path(), w1 + 1), Some(&op))?,
    )
    .await?;
    assert_eq!(reply.json::<Vec<FleetAlert>>()?.len(), 0);

    // Aggregation over the fleet window.
    let path = format!("{}?since_ms={w1}", model_drift_path("nab-machine-temp"));
    let reply = send(&f.router, get(&path, Some(&op))?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let fleet: FleetDrift = reply.json()?;
    assert_eq!(
        (
            fleet.summaries,
            fleet.devices_reporting,
            fleet.devices_alerting
        ),
        (5, 4, 3)
    );
    assert_eq!(fleet.features.len(), 1);
    let psi = fleet.features[0].mean_psi.unwrap_or(f64::NAN);
    assert!(
        (psi - (4.0 + 6.0 + 1.0 + 5.0 + 5.0) / 5.0).abs() < 1e-9,
        "{psi}"
    );
    let shift = fleet.features[0].mean_shift.unwrap_or(f64::NAN);
    assert!(
        (shift - (2.5 + 3.5 + 0.5 + 3.0 + 3.0) / 5.0).abs() < 1e-9,
        "{shift}"
    );
    // Reads are for operators.
    let reply = send(&f.router, get(&path, Some(&tokens[0]))?).await?;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let reply = send(&f.router, get(&alerts_path(), Some(&tokens[0]))?).await?;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let _ = &f.settings;
    Ok(())
}

#[tokio::test]
async fn drift_on_sqlite() -> Result<()> {
    let f = Fixture::sqlite().await?;
    scenario(&f).await?;
    documented_bodies(&f).await
}

/// The OpenAPI schemas accept the real bodies of the drift routes.
async fn documented_bodies(f: &Fixture) -> Result<()> {
    use crate::openapi::{request_schema, response_schema, validate};
    let reply = send(
        &f.router,
        get(cloud_sync::sync_protocol::OPENAPI_PATH, None)?,
    )
    .await?;
    let doc: serde_json::Value = reply.json()?;
    let device_path = "/v1/devices/{device}/drift";
    let body = serde_json::to_value(summary(DAY_MS, true, 4.0, 2.5))?;
    validate(
        &doc,
        &request_schema(&doc, "post", device_path, "application/json")?,
        &body,
        "summary",
    )?;
    let ack = serde_json::to_value(DriftAck { stored: true })?;
    validate(
        &doc,
        &response_schema(&doc, "post", device_path, 200)?,
        &ack,
        "ack",
    )?;
    let op = f.store.add_operator("ops-openapi").await?;
    let fleet = send(
        &f.router,
        get(&model_drift_path("nab-machine-temp"), Some(&op))?,
    )
    .await?;
    let fleet: serde_json::Value = fleet.json()?;
    validate(
        &doc,
        &response_schema(&doc, "get", "/v1/models/{model}/drift", 200)?,
        &fleet,
        "fleet",
    )?;
    let alerts = send(&f.router, get(&alerts_path(), Some(&op))?).await?;
    let alerts: serde_json::Value = alerts.json()?;
    assert!(alerts.as_array().is_some_and(|a| !a.is_empty()));
    validate(
        &doc,
        &response_schema(&doc, "get", "/v1/alerts", 200)?,
        &alerts,
        "alerts",
    )?;
    let mut broken = body.clone();
    broken["surprise"] = serde_json::json!(1);
    assert!(
        validate(
            &doc,
            &request_schema(&doc, "post", device_path, "application/json")?,
            &broken,
            "broken"
        )
        .is_err(),
        "the schema must refuse unknown fields"
    );
    Ok(())
}

#[tokio::test]
async fn drift_on_postgres() -> Result<()> {
    let Some(f) = Fixture::postgres("drift_on_postgres").await? else {
        return Ok(());
    };
    scenario(&f).await
}

#[tokio::test]
async fn drift_alerts_cli_lists_the_fleet_alert() -> Result<()> {
    let f = Fixture::sqlite().await?;
    scenario(&f).await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cloud.toml");
    let StorageSettings::Sqlite { path } = &f.settings.storage else {
        anyhow::bail!("sqlite expected");
    };
    std::fs::write(
        &config,
        format!(
            "database_path = {:?}\n[drift]\nfleet_alert_percent = 50\n",
            path.display().to_string()
        ),
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-sync"))
        .args(["drift", "alerts", "--json", "--config"])
        .arg(&config)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<FleetAlert> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].devices_alerting, 3);
    std::fs::write(&config, "[drift]\nfleet_alert_percent = 100\n")?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-sync"))
        .args(["drift", "alerts", "--config"])
        .arg(&config)
        .output()?;
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("drift.fleet_alert_percent"));
    Ok(())
}
