//! The `/metrics` listener of a real server (`metrics_listen_addr`), scraped
//! after real requests and parsed with a Prometheus text-format parser; the
//! fleet dashboard checked against what it exports.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use cloud_sync::sync_protocol::{batch_path, heartbeat_path};
use cloud_sync::{Settings, start};
use prometheus_parse::{Scrape, Value};
use tokio_util::sync::CancellationToken;

use crate::util::{heartbeat, raw_http, sample_batch, zstd_json};

fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            Value::Histogram(_) | Value::Summary(_) => None,
        })
}

/// `cloud_sync_*` names in every `expr` / variable `definition` of a dashboard.
fn referenced(dashboard: &str) -> Result<BTreeSet<String>> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone());
                        }
                        (_, v) => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&serde_json::from_str(dashboard)?, &mut exprs);
    anyhow::ensure!(!exprs.is_empty(), "no PromQL in the dashboard");
    let mut names = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("cloud_sync_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    Ok(names)
}

/// Requests of every kind show up with their exact counts: batches, rows,
/// duplicates, heartbeats, rejections by code, requests by route template
/// and status, per-device gauges (revoked devices left out); `/metrics` is
/// not on the API listener; the listener closes with the server.
#[tokio::test]
async fn scrape_reports_requests_rows_and_devices() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut settings = Settings::for_database(dir.path().join("cloud.db"));
    settings.metrics_listen_addr = Some("127.0.0.1:0".parse()?);
    let shutdown = CancellationToken::new();
    let server = start(settings, shutdown.clone()).await?;
    let metrics_addr = server.metrics_addr.context("metrics listener")?;
    assert_ne!(metrics_addr, server.addr);
    let token = server.store().add_device("dev-1").await?;
    server.store().add_device("gone").await?;
    server.store().revoke_device("gone").await?;
    let bearer = format!("Bearer {token}");

    let body = zstd_json(&sample_batch(1..=30, 1..=5))?;
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
        ("content-encoding", "zstd"),
    ];
    for _ in 0..2 {
        let (status, reply) =
            raw_http(server.addr, "POST", &batch_path("dev-1"), &headers, &body).await?;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    }
    let (status, _) = raw_http(server.addr, "POST", &batch_path("dev-1"), &[], &body).await?;
    assert_eq!(status, 401);
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let hb = serde_json::to_vec(&heartbeat(now, 42))?;
    let json = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, reply) =
        raw_http(server.addr, "POST", &heartbeat_path("dev-1"), &json, &hb).await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let (status, _) = raw_http(server.addr, "GET", "/metrics", &[], b"").await?;
    assert_eq!(status, 404, "/metrics is not served on the API listener");

    let (status, text) = raw_http(metrics_addr, "GET", "/metrics", &[], b"").await?;
    assert_eq!(status, 200);
    let text = String::from_utf8(text)?;
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&scrape, name, labels).with_context(|| format!("{name} {labels:?} in\n{text}"))
    };
    let batches = "/v1/devices/{device}/batches";
    assert_eq!(get("cloud_sync_batches_stored_total", &[])?, 2.0);
    assert_eq!(
        get("cloud_sync_rows_stored_total", &[("kind", "readings")])?,
        30.0
    );
    assert_eq!(
        get("cloud_sync_rows_stored_total", &[("kind", "predictions")])?,
        5.0
    );
    assert_eq!(
        get("cloud_sync_rows_duplicate_total", &[("kind", "readings")])?,
        30.0
    );
    assert_eq!(
        get(
            "cloud_sync_rows_duplicate_total",
            &[("kind", "predictions")]
        )?,
        5.0
    );
    assert_eq!(get("cloud_sync_heartbeats_total", &[])?, 1.0);
    assert_eq!(
        get("cloud_sync_rejections_total", &[("code", "missing_token")])?,
        1.0
    );
    assert_eq!(
        get("cloud_sync_rejections_total", &[("code", "not_found")])?,
        1.0
    );
    // Route templates hold braces, which prometheus-parse cuts label sets
    // at (the format allows them in quoted values); these lines are matched
    // exactly instead.
    for line in [
        format!(
            "cloud_sync_http_requests_total{{method=\"POST\",route=\"{batches}\",status=\"200\"}} 2"
        ),
        format!(
            "cloud_sync_http_requests_total{{method=\"POST\",route=\"{batches}\",status=\"401\"}} 1"
        ),
        "cloud_sync_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1"
            .to_owned(),
        format!("cloud_sync_http_request_duration_seconds_count{{route=\"{batches}\"}} 3"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
    assert_eq!(get("cloud_sync_fleet_stats_ok", &[])?, 1.0);
    assert_eq!(get("cloud_sync_devices", &[("state", "active")])?, 1.0);
    assert_eq!(get("cloud_sync_devices", &[("state", "revoked")])?, 1.0);
    let age = get(
        "cloud_sync_device_last_seen_age_seconds",
        &[("device", "dev-1")],
    )?;
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(
        get(
            "cloud_sync_device_backlog_rows",
            &[("device", "dev-1"), ("kind", "readings")]
        )?,
        42.0
    );
    assert_eq!(
        get(
            "cloud_sync_device_rows",
            &[("device", "dev-1"), ("kind", "readings")]
        )?,
        30.0
    );
    assert!(
        scrape
            .samples
            .iter()
            .all(|s| s.labels.get("device") != Some("gone")),
        "revoked devices get no series"
    );
    assert!(
        !text.contains("dev-1/batches"),
        "raw paths never become labels"
    );

    // Every `# TYPE` family, with a histogram's `_bucket`, `_sum`, `_count`.
    let mut exported = BTreeSet::new();
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = family.split_once(' ').context("TYPE line")?;
        exported.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        }
    }
    let dashboard = include_str!("../../../docs/grafana/fleet.json");
    let missing: Vec<_> = referenced(dashboard)?
        .difference(&exported)
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "fleet dashboard queries unexported {missing:?}"
    );

    let (status, _) = raw_http(metrics_addr, "GET", "/", &[], b"").await?;
    assert_eq!(status, 404);

    shutdown.cancel();
    server.join().await?;
    assert!(
        tokio::net::TcpStream::connect(metrics_addr).await.is_err(),
        "metrics listener still open"
    );
    Ok(())
}

#[tokio::test]
async fn metrics_bind_failure_is_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut settings = Settings::for_database(dir.path().join("cloud.db"));
    settings.metrics_listen_addr = Some(taken.local_addr()?);
    let err = start(settings, CancellationToken::new())
        .await
        .err()
        .context("start must fail")?;
    assert!(err.to_string().contains("metrics_listen_addr"), "{err}");
    Ok(())
}
