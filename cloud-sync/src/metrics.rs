//! Metrics: cloud-sync's Prometheus endpoint (`GET /metrics`, text format
//! 0.0.4) on its own listener (`metrics_listen_addr`), and the counters the
//! API bumps.
//!
//! Owns [`Metrics`] (request counts by route and status, request durations
//! by route, rejections by error code, batches, rows and duplicates stored,
//! heartbeats), the request
//! middleware [`track`], and the rendering, which adds per-device gauges read
//! from [`Store::fleet`] at scrape time. It never writes to the store.
//!
//! Design: a separate listener, off by default, rather than a route on the
//! API: the API is what devices reach (often from the internet, over TLS),
//! while the per-device gauges are operator data (`GET /v1/fleet` needs an
//! operator token). Bind it to loopback or an internal network only the
//! scraper reaches. Names: prefix `cloud_sync_`, counters end in `_total`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sync_protocol::{FleetSummary, UploadAck};

use crate::store::Store;

/// Content type of the exposition.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest a scrape waits for the fleet summary; past it the per-device
/// series are left out and `cloud_sync_fleet_stats_ok` is 0.
pub const FLEET_TIMEOUT: Duration = Duration::from_secs(10);

/// Route label of requests no route matched (bounded cardinality).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Upper bounds (seconds, inclusive) of the request duration buckets.
pub const DURATION_BOUNDS_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Non-cumulative bucket counts (the last one above every bound) and the sum.
#[derive(Debug, Default, Clone)]
struct Durations {
    buckets: [u64; DURATION_BOUNDS_SECONDS.len() + 1],
    sum_seconds: f64,
}

impl Durations {
    fn observe(&mut self, seconds: f64) {
        let ix = DURATION_BOUNDS_SECONDS.partition_point(|&le| le < seconds);
        self.buckets[ix] += 1;
        self.sum_seconds += seconds;
    }
}

/// Response extension carrying the stable error code of a refusal; set by
/// [`crate::api::ApiError`]'s response, read by [`track`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// Counters of the API (monotonic, since start-up).
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    durations: Mutex<BTreeMap<String, Durations>>,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    batches: AtomicU64,
    /// readings, predictions, dead letters.
    rows_stored: [AtomicU64; 3],
    rows_duplicate: [AtomicU64; 3],
    heartbeats: AtomicU64,
}

const KINDS: [&str; 3] = ["readings", "predictions", "dead_letters"];

impl Metrics {
    /// Counts one answered request that took `elapsed`.
    pub fn request(
        &self,
        method: &Method,
        route: &str,
        status: u16,
        code: Option<&'static str>,
        elapsed: Duration,
    ) {
        let method = method_label(method);
        {
            let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
            *requests
                .entry((method, route.to_owned(), status))
                .or_default() += 1;
        }
        {
            let mut durations = self
                .durations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            durations
                .entry(route.to_owned())
                .or_default()
                .observe(elapsed.as_secs_f64());
        }
        if let Some(code) = code {
            let mut rejections = self
                .rejections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *rejections.entry(code).or_default() += 1;
        }
    }

    /// Counts a stored batch from its acknowledgement.
    pub fn batch_stored(&self, ack: &UploadAck) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        let inserted = [
            ack.readings_inserted,
            ack.predictions_inserted,
            ack.dead_letters_inserted,
        ];
        let duplicate = [
            ack.readings_duplicate,
            ack.predictions_duplicate,
            ack.dead_letters_duplicate,
        ];
        for i in 0..KINDS.len() {
            self.rows_stored[i].fetch_add(inserted[i], Ordering::Relaxed);
            self.rows_duplicate[i].fetch_add(duplicate[i], Ordering::Relaxed);
        }
    }

    /// Counts a stored heartbeat.
    pub fn heartbeat_stored(&self) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }
}

/// Known methods by name, anything else `other` (clients choose methods).
fn method_label(method: &Method) -> &'static str {
    [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ]
    .iter()
    .find(|m| *m == method)
    .map_or("other", Method::as_str)
}

/// Middleware counting every request by method, route template (never the
/// raw path: device ids would make unbounded series) and status, and
/// refusals by their error code.
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    let status = response.status().as_u16();
    metrics.request(&method, &route, status, code, started.elapsed());
    response
}

/// What the metrics listener serves from.
#[derive(Debug, Clone)]
pub struct MetricsState {
    /// The API's counters.
    pub metrics: Arc<Metrics>,
    /// The store, for the per-device gauges.
    pub store: Store,
}

/// The metrics listener's routes: `GET /metrics`, 404 elsewhere.
pub fn router(state: MetricsState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; try GET /metrics\n") })
        .with_state(state)
}

async fn scrape(State(state): State<MetricsState>) -> impl IntoResponse {
    let fleet = match tokio::time::timeout(FLEET_TIMEOUT, whole_fleet(&state.store)).await {
        Ok(Ok(fleet)) => Some(fleet),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: fleet summary unavailable");
            None
        }
        Err(_) => {
            tracing::warn!("metrics: fleet summary timed out");
            None
        }
    };
    let body = render(&state.metrics, fleet.as_ref());
    ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], body)
}

/// Most devices listed in one scrape (per-device series beyond are left out).
const MAX_SCRAPED_DEVICES: usize = 10_000;

/// Every page of the fleet summary, up to [`MAX_SCRAPED_DEVICES`] devices.
async fn whole_fleet(store: &Store) -> Result<FleetSummary, crate::store::StoreError> {
    let mut query = sync_protocol::ReadQuery {
        limit: Some(sync_protocol::MAX_PAGE_LIMIT),
        ..sync_protocol::ReadQuery::default()
    };
    let mut all = FleetSummary::default();
    loop {
        let page = store.fleet(&query).await?;
        all.server_ms = page.server_ms;
        all.devices.extend(page.devices);
        match page.next_cursor {
            Some(cursor) if all.devices.len() < MAX_SCRAPED_DEVICES => query.cursor = Some(cursor),
            _ => return Ok(all),
        }
    }
}

/// Serves [`router`] on `listener` until `shutdown`.
///
/// # Errors
/// The accept loop's I/O error.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: MetricsState,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "cloud-sync metrics listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Formats the exposition: the counters, and per-device gauges when the
/// fleet summary is at hand.
#[must_use]
pub fn render(metrics: &Metrics, fleet: Option<&FleetSummary>) -> String {
    let mut w = Text::default();
    w.header(
        "cloud_sync_build_info",
        "cloud-sync build; the value is always 1.",
        "gauge",
    );
    w.sample(
        "cloud_sync_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    let name = "cloud_sync_http_requests_total";
    w.header(
        name,
        "HTTP requests answered, by method, route template and status.",
        "counter",
    );
    {
        let requests = metrics
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ((method, route, status), n) in requests.iter() {
            let status = status.to_string();
            w.sample(
                name,
                &[("method", method), ("route", route), ("status", &status)],
                *n,
            );
        }
    }
    let name = "cloud_sync_http_request_duration_seconds";
    w.header(
        name,
        "Time from the request reaching the router to its response, by route template.",
        "histogram",
    );
    {
        let durations = metrics
            .durations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (route, d) in &durations {
            let mut total = 0;
            for (i, n) in d.buckets.iter().enumerate() {
                total += n;
                let le = DURATION_BOUNDS_SECONDS
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), ToString::to_string);
                w.sample(
                    &format!("{name}_bucket"),
                    &[("route", route), ("le", &le)],
                    total,
                );
            }
            w.sample_f(&format!("{name}_sum"), &[("route", route)], d.sum_seconds);
            w.sample(&format!("{name}_count"), &[("route", route)], total);
        }
    }
    let name = "cloud_sync_rejections_total";
    w.header(
        name,
        "Requests refused with an API error, by stable error code.",
        "counter",
    );
    {
        let rejections = metrics
            .rejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (code, n) in rejections.iter() {
            w.sample(name, &[("code", code)], *n);
        }
    }
    w.header(
        "cloud_sync_batches_stored_total",
        "Upload batches stored (each in one transaction).",
        "counter",
    );
    w.sample(
        "cloud_sync_batches_stored_total",
        &[],
        metrics.batches.load(Ordering::Relaxed),
    );
    for (name, help, values) in [
        (
            "cloud_sync_rows_stored_total",
            "Rows newly stored from batches, by kind.",
            &metrics.rows_stored,
        ),
        (
            "cloud_sync_rows_duplicate_total",
            "Rows in batches that were already stored (replays, skipped), by kind.",
            &metrics.rows_duplicate,
        ),
    ] {
        w.header(name, help, "counter");
        for (kind, v) in KINDS.iter().zip(values) {
            w.sample(name, &[("kind", kind)], v.load(Ordering::Relaxed));
        }
    }
    w.header(
        "cloud_sync_heartbeats_total",
        "Heartbeats stored.",
        "counter",
    );
    w.sample(
        "cloud_sync_heartbeats_total",
        &[],
        metrics.heartbeats.load(Ordering::Relaxed),
    );

    w.header(
        "cloud_sync_fleet_stats_ok",
        "1 when this scrape read the fleet summary, 0 when the store did not answer.",
        "gauge",
    );
    w.sample("cloud_sync_fleet_stats_ok", &[], u64::from(fleet.is_some()));
    if let Some(fleet) = fleet {
        render_fleet(&mut w, fleet);
    }
    w.out
}

#[allow(clippy::cast_precision_loss)]
fn age_seconds(now_ms: i64, then_ms: i64) -> f64 {
    now_ms.saturating_sub(then_ms).max(0) as f64 / 1000.0
}

fn render_fleet(w: &mut Text, fleet: &FleetSummary) {
    let revoked = fleet.devices.iter().filter(|d| d.revoked).count() as u64;
    let active = fleet.devices.len() as u64 - revoked;
    w.header(
        "cloud_sync_devices",
        "Registered devices, by state.",
        "gauge",
    );
    w.sample("cloud_sync_devices", &[("state", "active")], active);
    w.sample("cloud_sync_devices", &[("state", "revoked")], revoked);
    // Design: revoked devices get no per-device series, so they never show
    // up as stale or backlogged.
    let devices: Vec<_> = fleet.devices.iter().filter(|d| !d.revoked).collect();
    let now = fleet.server_ms;
    let name = "cloud_sync_device_last_seen_age_seconds";
    w.header(name, "Seconds since the cloud last stored a batch row or heartbeat from the device (devices never seen are left out).", "gauge");
    for d in &devices {
        if let Some(t) = d.last_seen_ms {
            w.sample_f(name, &[("device", &d.device)], age_seconds(now, t));
        }
    }
    let name = "cloud_sync_device_last_heartbeat_age_seconds";
    w.header(
        name,
        "Seconds since the device's last heartbeat arrived.",
        "gauge",
    );
    for d in &devices {
        if let Some(t) = d.last_heartbeat_ms {
            w.sample_f(name, &[("device", &d.device)], age_seconds(now, t));
        }
    }
    let name = "cloud_sync_device_backlog_rows";
    w.header(
        name,
        "Rows not yet uploaded, as the device's last heartbeat reported them, by kind.",
        "gauge",
    );
    for d in &devices {
        if let Some(b) = &d.backlog {
            for (kind, v) in KINDS
                .iter()
                .zip([b.readings, b.predictions, b.dead_letters])
            {
                w.sample(name, &[("device", &d.device), ("kind", kind)], v);
            }
        }
    }
    let name = "cloud_sync_device_backlog_oldest_age_seconds";
    w.header(
        name,
        "Age of the device's oldest unsynced row when its last heartbeat was sent (0 when none).",
        "gauge",
    );
    for d in &devices {
        if let Some(b) = &d.backlog {
            let age = b.oldest_unsynced_age_ms.unwrap_or(0);
            #[allow(clippy::cast_precision_loss)]
            w.sample_f(name, &[("device", &d.device)], age as f64 / 1000.0);
        }
    }
    let name = "cloud_sync_device_rows";
    w.header(
        name,
        "Rows stored for the device, by kind (heartbeats included).",
        "gauge",
    );
    for d in &devices {
        for (kind, v) in KINDS.iter().chain(&["heartbeats"]).zip([
            d.readings,
            d.predictions,
            d.dead_letters,
            d.heartbeats,
        ]) {
            w.sample(name, &[("device", &d.device), ("kind", kind)], v);
        }
    }
}

/// A minimal text-format writer (the agent has its own; the two crates
/// share no code but the protocol).
#[derive(Debug, Default)]
struct Text {
    out: String,
}

impl Text {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
            }
            self.out.push('}');
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.labels(name, labels);
        let _ = writeln!(self.out, " {value}");
    }

    fn sample_f(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.labels(name, labels);
        let _ = writeln!(self.out, " {value}");
    }
}

/// Escapes a label value: backslash, double quote, line feed.
#[must_use]
pub fn escape_label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use sync_protocol::{Backlog, FleetDevice};

    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = Metrics::default();
        m.request(
            &Method::GET,
            "/v1/x/{device}",
            200,
            None,
            Duration::from_millis(3),
        );
        m.request(
            &Method::from_bytes(b"BREW").unwrap(),
            "un\"usual",
            404,
            Some("not_found"),
            Duration::from_secs(20),
        );
        let body = render(&m, None);
        assert!(body.contains(
            "cloud_sync_http_requests_total{method=\"other\",route=\"un\\\"usual\",status=\"404\"} 1\n"
        ), "{body}");
        assert!(body.contains("cloud_sync_rejections_total{code=\"not_found\"} 1\n"));
        for line in [
            "cloud_sync_http_request_duration_seconds_bucket{route=\"/v1/x/{device}\",le=\"0.0025\"} 0",
            "cloud_sync_http_request_duration_seconds_bucket{route=\"/v1/x/{device}\",le=\"0.005\"} 1",
            "cloud_sync_http_request_duration_seconds_bucket{route=\"un\\\"usual\",le=\"10\"} 0",
            "cloud_sync_http_request_duration_seconds_bucket{route=\"un\\\"usual\",le=\"+Inf\"} 1",
            "cloud_sync_http_request_duration_seconds_sum{route=\"un\\\"usual\"} 20",
            "cloud_sync_http_request_duration_seconds_count{route=\"/v1/x/{device}\"} 1",
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing:\n{body}");
        }
        assert!(body.contains("cloud_sync_fleet_stats_ok 0\n"));
        assert!(!body.contains("cloud_sync_devices"));
    }

    #[test]
    fn every_family_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        let fleet = FleetSummary {
            next_cursor: None,
            server_ms: 0,
            devices: Vec::new(),
        };
        let body = render(&Metrics::default(), Some(&fleet));
        for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} missing from docs/metrics.md"
            );
        }
    }

    #[test]
    fn fleet_gauges_leave_out_revoked_and_never_seen_devices() {
        let device = |id: &str, revoked, last_seen_ms| FleetDevice {
            device: id.into(),
            revoked,
            created_ms: 0,
            last_seen_ms,
            last_heartbeat_ms: last_seen_ms,
            agent_version: None,
            backlog: last_seen_ms.map(|_| Backlog {
                readings: 7,
                predictions: 1,
                dead_letters: 0,
                bytes: 0,
                quota_bytes: 0,
                oldest_unsynced_age_ms: Some(2_500),
            }),
            models: Vec::new(),
            readings: 30,
            predictions: 5,
            dead_letters: 0,
            heartbeats: 2,
        };
        let fleet = FleetSummary {
            next_cursor: None,
            server_ms: 100_000,
            devices: vec![
                device("a", false, Some(40_000)),
                device("b", true, Some(1)),
                device("c", false, None),
            ],
        };
        let body = render(&Metrics::default(), Some(&fleet));
        for line in [
            "cloud_sync_devices{state=\"active\"} 2",
            "cloud_sync_devices{state=\"revoked\"} 1",
            "cloud_sync_device_last_seen_age_seconds{device=\"a\"} 60",
            "cloud_sync_device_backlog_rows{device=\"a\",kind=\"readings\"} 7",
            "cloud_sync_device_backlog_oldest_age_seconds{device=\"a\"} 2.5",
            "cloud_sync_device_rows{device=\"c\",kind=\"heartbeats\"} 2",
            "cloud_sync_fleet_stats_ok 1",
        ] {
            assert!(
                body.contains(&format!("{line}\n")),
                "{line} missing:\n{body}"
            );
        }
        assert!(!body.contains("device=\"b\""), "{body}");
        assert!(
            !body.contains("last_seen_age_seconds{device=\"c\""),
            "{body}"
        );
    }
}
