//! A real server from `start()` on a port-0 socket, spoken to with raw HTTP/1.1.

use anyhow::{Context as _, Result};
use cloud_sync::sync_protocol::{DeviceSummary, ErrorBody, UploadAck, batch_path, summary_path};
use cloud_sync::{Settings, start};
use tokio_util::sync::CancellationToken;

use crate::util::{raw_http, sample_batch, zstd_json};

#[tokio::test]
async fn serves_over_a_real_socket_and_shuts_down_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let settings = Settings::for_database(dir.path().join("cloud.db"));
    let shutdown = CancellationToken::new();
    let server = start(settings.clone(), shutdown.clone()).await?;
    assert!(server.addr.ip().is_loopback());
    assert_ne!(server.addr.port(), 0);
    let token = server.store().add_device("dev-1").await?;
    let bearer = format!("Bearer {token}");

    let (status, body) = raw_http(server.addr, "GET", "/healthz", &[], b"").await?;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    let (status, _) = raw_http(server.addr, "GET", "/readyz", &[], b"").await?;
    assert_eq!(status, 200);

    let body = zstd_json(&sample_batch(1..=30, 1..=5))?;
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
        ("content-encoding", "zstd"),
    ];
    let (status, reply) =
        raw_http(server.addr, "POST", &batch_path("dev-1"), &headers, &body).await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
    let ack: UploadAck = serde_json::from_slice(&reply)?;
    assert_eq!((ack.readings_inserted, ack.predictions_inserted), (30, 5));

    let (status, reply) =
        raw_http(server.addr, "POST", &batch_path("dev-1"), &headers, &body).await?;
    assert_eq!(status, 200);
    let ack: UploadAck = serde_json::from_slice(&reply)?;
    assert_eq!((ack.readings_duplicate, ack.predictions_duplicate), (30, 5));

    let (status, reply) = raw_http(server.addr, "POST", &batch_path("dev-1"), &[], &body).await?;
    assert_eq!(status, 401);
    let error: ErrorBody = serde_json::from_slice(&reply)?;
    assert_eq!(error.code, "missing_token");

    let auth = [("authorization", bearer.as_str())];
    let (status, reply) = raw_http(server.addr, "GET", &summary_path("dev-1"), &auth, b"").await?;
    assert_eq!(status, 200);
    let summary: DeviceSummary = serde_json::from_slice(&reply)?;
    assert_eq!(summary.readings[0].rows, 30);

    let addr = server.addr;
    shutdown.cancel();
    server.join().await?;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );

    // Restart on the same database: the data and the token survive.
    let mut settings = settings;
    settings.listen_addr = "127.0.0.1:0".parse()?;
    let shutdown = CancellationToken::new();
    let server = start(settings, shutdown.clone()).await?;
    let (status, reply) = raw_http(server.addr, "GET", &summary_path("dev-1"), &auth, b"").await?;
    assert_eq!(status, 200);
    let again: DeviceSummary = serde_json::from_slice(&reply)?;
    assert_eq!(again, summary);
    shutdown.cancel();
    server.join().await.context("second join")?;
    Ok(())
}

#[tokio::test]
async fn bind_failure_is_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut settings = Settings::for_database(dir.path().join("cloud.db"));
    settings.listen_addr = taken.local_addr()?;
    let err = start(settings, CancellationToken::new()).await;
    assert!(
        matches!(err, Err(cloud_sync::ServeError::Bind { .. })),
        "{err:?}"
    );
    Ok(())
}
