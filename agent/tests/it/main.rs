//! Integration tests of the `edge-agent` crate: the real binary, the real
//! buffer, an embedded broker.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod crash;
mod drain;
mod drift;
mod inference;
mod metrics;
mod mqtt;
mod rollout;
mod sync;
mod systemd;
mod util;

use std::process::Command;
use std::time::Duration;

use edge_agent::buffer::Buffer;
use edge_agent::config::{BufferSettings, RawConfig};
use edge_agent::demo::broker::start_embedded_broker;

#[test]
fn print_default_config_is_a_valid_config() {
    let out = Command::new(util::bin())
        .arg("print-default-config")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(RawConfig::parse(&text).is_ok());
}

#[test]
fn check_config_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        util::config(dir.path(), "mqtt://127.0.0.1:1883", "x"),
    )
    .unwrap();
    let ok = Command::new(util::bin())
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let bad = dir.path().join("bad.toml");
    let text = util::config(dir.path(), "mqtt://127.0.0.1:1883", "x")
        .replace("keep_alive_secs = 30", "keep_alive_secs = 0");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(util::bin())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mqtt.keep_alive_secs"));

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[agent]\ndevice_id = \"a\"\nsurprise_ms = 1\n").unwrap();
    let out = Command::new(util::bin())
        .args(["run", "--config"])
        .arg(&unknown)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "run with a bad config must exit 78"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("surprise_ms"));
}

#[test]
fn version_flag() {
    let out = Command::new(util::bin()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// The real binary ingests QoS 1 messages, exits 0 within the deadline on
/// SIGTERM, and a restart on the same persistent session picks up what the
/// broker kept: every message is in the buffer exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_restart_resumes_the_session() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        util::config(dir.path(), &format!("mqtt://{broker}"), "it-agent"),
    )
    .unwrap();

    let n = 3000u64;
    let payloads: Vec<String> = (1..=n)
        .map(|i| {
            format!(
                "{{\"id\":{i},\"ts\":{},\"value\":{}}}",
                1_386_018_900 + i * 300,
                70.0 + (i % 17) as f64
            )
        })
        .collect();
    let (first, second) = payloads.split_at(payloads.len() / 2);

    let agent = util::Agent::start(&cfg);
    assert!(
        agent.wait_for("ingest subscribed", Duration::from_secs(30)),
        "agent never subscribed"
    );
    util::publish_all(broker, "sensors/m1/temperature", first.to_vec()).await;
    let started = std::time::Instant::now();
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        Some(0),
        "clean exit on SIGTERM"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "shutdown took {:?}",
        started.elapsed()
    );

    // Published while the agent is down: the broker keeps them for the session.
    util::publish_all(broker, "sensors/m1/temperature", second.to_vec()).await;
    let agent = util::Agent::start(&cfg);
    assert!(agent.wait_for("ingest subscribed", Duration::from_secs(30)));

    let settings = BufferSettings::for_path(dir.path().join("buffer.db"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let stored = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The buffer is read through its own API (a second connection, WAL readers are safe).
        let (b, t) = Buffer::open(&settings).unwrap();
        let s = b.stats().await.unwrap();
        drop(b);
        tokio::task::spawn_blocking(move || t.join()).await.unwrap();
        if s.readings >= n || std::time::Instant::now() > deadline {
            break s;
        }
    };
    assert_eq!(agent.terminate(Duration::from_secs(10)), Some(0));
    assert_eq!(
        stored.readings, n,
        "every acknowledged message is stored exactly once"
    );
    assert_eq!(stored.dead_letters, 0);
    assert!(stored.predictions > 0, "the shipped model scored windows");
}
