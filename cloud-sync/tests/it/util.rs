//! Shared helpers: a store in a temp dir, sample batches, request builders,
//! and a minimal HTTP/1.1 client over a raw `TcpStream`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use cloud_sync::sync_protocol::{
    ActiveModel, Backlog, DeadLetterRecord, ErrorBody, Heartbeat, Prediction, Reading, UploadBatch,
    batch_path,
};
use cloud_sync::{AppState, Settings, Store, app};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

/// A store in a temp dir and the settings the router is built with.
pub struct Env {
    /// Keeps the database directory alive.
    pub _dir: tempfile::TempDir,
    pub store: Store,
    pub settings: Settings,
}

impl Env {
    pub async fn new(max_body_bytes: usize) -> Result<Env> {
        let dir = tempfile::tempdir()?;
        let mut settings = Settings::for_database(dir.path().join("cloud.db"));
        settings.max_body_bytes = max_body_bytes;
        let store = Store::connect(&settings.storage).await?;
        Ok(Env {
            _dir: dir,
            store,
            settings,
        })
    }

    pub fn router(&self) -> Router {
        app(AppState::new(self.store.clone(), &self.settings))
    }
}

pub fn reading(source: &str, stream: &str, seq: u64) -> Reading {
    Reading {
        source: source.to_owned(),
        stream: stream.to_owned(),
        seq,
        device_ts_ms: Some(1_700_000_000_000 + i64::try_from(seq).unwrap_or(0)),
        recv_ts_ms: 1_700_000_000_000,
        clock_ok: true,
        values: BTreeMap::from([("value".to_owned(), 20.5)]),
    }
}

pub fn prediction(model: &str, seq: u64, is_anomaly: bool) -> Prediction {
    Prediction {
        model: model.to_owned(),
        model_version: "1.2.0".to_owned(),
        model_sha256: "cd".repeat(32),
        seq,
        source: "m1".to_owned(),
        stream: "temperature".to_owned(),
        window_end_seq: seq + 10,
        window_end_ts_ms: Some(1_700_000_000_000),
        score: if is_anomaly { 0.9 } else { 0.1 },
        threshold: 0.5,
        is_anomaly,
        created_ms: 1_700_000_000_100,
        label: None,
        probabilities: Vec::new(),
    }
}

/// Readings `readings` on `m1/temperature`, predictions `predictions` of
/// `iforest` (every third one anomalous).
pub fn sample_batch(
    readings: impl IntoIterator<Item = u64>,
    predictions: impl IntoIterator<Item = u64>,
) -> UploadBatch {
    UploadBatch {
        readings: readings
            .into_iter()
            .map(|s| reading("m1", "temperature", s))
            .collect(),
        predictions: predictions
            .into_iter()
            .map(|s| prediction("iforest", s, s % 3 == 0))
            .collect(),
        dead_letters: vec![],
    }
}

pub fn zstd_json(batch: &UploadBatch) -> Result<Vec<u8>> {
    Ok(zstd::bulk::compress(&serde_json::to_vec(batch)?, 3)?)
}

/// `POST` to the batch endpoint of `device`.
pub fn upload(
    device: &str,
    token: Option<&str>,
    encoding: Option<&str>,
    body: impl Into<Body>,
) -> Result<Request<Body>> {
    let mut builder = Request::post(batch_path(device)).header("content-type", "application/json");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if let Some(encoding) = encoding {
        builder = builder.header("content-encoding", encoding);
    }
    Ok(builder.body(body.into())?)
}

/// `GET` with an optional bearer token.
pub fn get(path: &str, token: Option<&str>) -> Result<Request<Body>> {
    let mut builder = Request::get(path);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    Ok(builder.body(Body::empty())?)
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `code` of an error body, checking the body is an [`ErrorBody`].
    pub fn error_code(&self) -> Result<String> {
        Ok(self.json::<ErrorBody>()?.code)
    }
}

pub async fn send(router: &Router, request: Request<Body>) -> Result<Reply> {
    let response = router.clone().oneshot(request).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// One HTTP/1.1 exchange over a fresh TCP connection (`Connection: close`).
pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;

    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = std::str::from_utf8(&response[..split])?;
    let payload = &response[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().context("no status line")?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .context("no status code")?
        .parse()?;
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(payload)?
    } else {
        payload.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

pub fn dead_letter(seq: u64) -> DeadLetterRecord {
    DeadLetterRecord {
        seq,
        topic: "sensors/m1/temperature".to_owned(),
        reason: "malformed".to_owned(),
        detail: format!("expected a number ({seq})"),
        payload_b64: "e30=".to_owned(),
        payload_len: 2,
        recv_ts_ms: 1_700_000_000_000 + i64::try_from(seq).unwrap_or(0),
    }
}

pub fn heartbeat(sent_ms: i64, backlog_readings: u64) -> Heartbeat {
    Heartbeat {
        agent_version: "0.1.0".to_owned(),
        sent_ms,
        started_ms: 1_700_000_000_000,
        models: vec![ActiveModel {
            name: "iforest".to_owned(),
            version: "1.2.0".to_owned(),
            sha256: "cd".repeat(32),
        }],
        backlog: Backlog {
            readings: backlog_readings,
            predictions: 1,
            dead_letters: 0,
            bytes: 4096,
            quota_bytes: 1 << 30,
            oldest_unsynced_age_ms: Some(1500),
        },
        clock_offset_ms: None,
        clock_suspect_readings: 0,
        counters: BTreeMap::from([("received".to_owned(), 10), ("acked".to_owned(), 9)]),
    }
}

/// `POST` `body` to `path` with a bearer token, content type and encoding.
pub fn post(
    path: &str,
    token: Option<&str>,
    content_type: &str,
    encoding: Option<&str>,
    body: impl Into<Body>,
) -> Result<Request<Body>> {
    let mut builder = Request::post(path).header("content-type", content_type);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if let Some(encoding) = encoding {
        builder = builder.header("content-encoding", encoding);
    }
    Ok(builder.body(body.into())?)
}
