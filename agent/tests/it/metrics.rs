//! The real binary's `/metrics` endpoint, scraped after real traffic through
//! the embedded broker, parsed with a Prometheus text-format parser; and the
//! agent dashboard checked against what the endpoint exports.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use edge_agent::demo::broker::start_embedded_broker;

use crate::util;

/// `GET path` over a fresh connection: status, content type, body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

fn parse(body: &str) -> Scrape {
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
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

/// Metric names a PromQL-bearing JSON document references with `prefix`.
pub fn referenced_metrics(json: &str, prefix: &str) -> BTreeSet<String> {
    let doc: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&doc, &mut exprs);
    assert!(!exprs.is_empty(), "no PromQL expressions found");
    let mut names = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(i) = rest.find(prefix) {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone());
                    }
                    (_, v) => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Names a body exports: every `# TYPE` family, with a histogram's
/// `_bucket`, `_sum` and `_count` series.
pub fn exported_names(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split(' ');
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    names
}

/// Messages published through the broker show up in the scrape with their
/// exact counts: received, committed, acked, duplicates, dead letters by
/// reason, backlog (sync is off, so every reading is unsynced), the active
/// model, its latency histogram; other paths are 404; the endpoint closes on
/// SIGTERM; every metric the agent dashboard queries is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_reports_what_went_through() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    let text = util::config(dir.path(), &format!("mqtt://{broker}"), "it-metrics").replace(
        "enabled = false\nlisten = \"127.0.0.1:0\"",
        "enabled = true\nlisten = \"127.0.0.1:0\"",
    );
    assert!(text.contains("[metrics]\n") && text.contains("enabled = true\nlisten"));
    std::fs::write(&cfg, text).unwrap();

    let agent = util::Agent::start(&cfg);
    let (mut addr, mut subscribed) = (None, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while addr.is_none() || !subscribed {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .expect("agent never reported its metrics address and subscription");
        let line = agent.lines.recv_timeout(left).unwrap();
        subscribed |= line.contains("ingest subscribed");
        if line.contains("metrics endpoint listening") {
            let at = line.find("addr=").unwrap() + "addr=".len();
            let end = line[at..].find(' ').map_or(line.len(), |i| at + i);
            addr = Some(line[at..end].parse::<SocketAddr>().unwrap());
        }
    }
    let addr = addr.unwrap();

    let n = 300u64;
    let mut payloads: Vec<String> = (1..=n)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"ts\":{},\"value\":{}}}",
                1_386_018_900 + i * 300,
                70.0 + (i % 17) as f64
            )
        })
        .collect();
    payloads.push(payloads[0].clone()); // a redelivery of id 1: absorbed
    payloads.extend(["not json", "{\"value\":", "[1,"].map(String::from)); // malformed
    let total = payloads.len() as f64;
    util::publish_all(broker, "sensors/m1/temperature", payloads).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (body, scrape) = loop {
        let (status, content_type, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let scrape = parse(&body);
        let handled = value(&scrape, "edge_agent_messages_handled_total", &[]);
        let runs = value(&scrape, "edge_agent_inference_runs_total", &[]);
        if handled == Some(total) && runs.is_some_and(|r| r > 0.0) {
            break (body, scrape);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "handled {handled:?} of {total}, runs {runs:?}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let get = |name: &str, labels: &[(&str, &str)]| {
        value(&scrape, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} missing"))
    };
    let n = n as f64;
    assert_eq!(get("edge_agent_messages_received_total", &[]), total);
    assert_eq!(get("edge_agent_acks_total", &[]), total);
    assert_eq!(get("edge_agent_readings_committed_total", &[]), n);
    assert_eq!(get("edge_agent_duplicates_total", &[]), 1.0);
    assert_eq!(
        get("edge_agent_dead_letters_total", &[("reason", "malformed")]),
        3.0
    );
    assert_eq!(
        get("edge_agent_dead_letters_total", &[("reason", "oversized")]),
        0.0
    );
    assert_eq!(get("edge_agent_ingest_in_flight_messages", &[]), 0.0);
    assert_eq!(get("edge_agent_buffer_stats_ok", &[]), 1.0);
    assert_eq!(
        get("edge_agent_buffer_backlog_rows", &[("kind", "readings")]),
        n,
        "sync is off: every reading is backlog"
    );
    assert_eq!(
        get(
            "edge_agent_buffer_backlog_rows",
            &[("kind", "dead_letters")]
        ),
        3.0
    );
    assert!(get("edge_agent_buffer_oldest_unsynced_age_seconds", &[]) >= 0.0);
    assert!(get("edge_agent_buffer_bytes", &[]) > 0.0);
    assert_eq!(
        get(
            "edge_agent_model_info",
            &[
                ("model", "nab-machine-temp"),
                ("version", "1.0.0"),
                (
                    "sha256",
                    "fa8fc3ec1a74e89b3660c6e6cc5b8202595bc047e0db03f2d94e7ba4d4a5035e"
                )
            ]
        ),
        1.0
    );
    let runs = get("edge_agent_inference_runs_total", &[]);
    let latency_count = get(
        "edge_agent_inference_latency_seconds_count",
        &[("model", "nab-machine-temp")],
    );
    assert_eq!(latency_count, runs, "one latency observation per tract run");
    let buckets = scrape
        .samples
        .iter()
        .find_map(|s| match &s.value {
            Value::Histogram(b) if s.metric == "edge_agent_inference_latency_seconds" => {
                Some(b.clone())
            }
            _ => None,
        })
        .expect("latency histogram");
    let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
    assert_eq!(inf.count, runs);
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    for (name, doc) in &scrape.docs {
        assert!(name.starts_with("edge_agent_") && !doc.is_empty(), "{name}");
    }

    let dashboard = include_str!("../../../docs/grafana/agent.json");
    let exported = exported_names(&body);
    let referenced = referenced_metrics(dashboard, "edge_agent_");
    let missing: Vec<_> = referenced.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries unexported {missing:?}"
    );

    let (status, _, _) = http_get(addr, "/").await;
    assert_eq!(status, 404);

    let stopped = agent.stop(Duration::from_secs(10));
    assert_eq!(stopped.code, Some(0), "{}", stopped.lines.join("\n"));
    assert!(
        stopped
            .lines
            .iter()
            .any(|l| l.contains("metrics endpoint stopped")),
        "{}",
        stopped.lines.join("\n")
    );
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A metrics port already taken costs the endpoint, not the agent: it logs
/// an ERROR naming `metrics.listen`, still subscribes, and exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_costs_the_endpoint_not_the_agent() {
    let broker = start_embedded_broker().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    let text = util::config(dir.path(), &format!("mqtt://{broker}"), "it-metrics-taken").replace(
        "enabled = false\nlisten = \"127.0.0.1:0\"",
        &format!("enabled = true\nlisten = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&cfg, text).unwrap();

    let agent = util::Agent::start(&cfg);
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lines
        .iter()
        .any(|l: &String| l.contains("ingest subscribed"))
    {
        let left = deadline
            .checked_duration_since(std::time::Instant::now())
            .expect("agent never subscribed");
        lines.push(agent.lines.recv_timeout(left).unwrap());
    }
    let stopped = agent.stop(Duration::from_secs(10));
    lines.extend(stopped.lines);
    let log = lines.join("\n");
    assert_eq!(stopped.code, Some(0), "{log}");
    assert!(
        lines.iter().any(|l| l.contains("ERROR")
            && l.contains("metrics endpoint not available")
            && l.contains(&format!("metrics.listen 127.0.0.1:{port}"))),
        "{log}"
    );
    assert!(!log.contains("metrics endpoint listening"), "{log}");
    drop(taken);
}
