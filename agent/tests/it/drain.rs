//! SIGTERM while QoS 1 messages keep arriving: the real binary stops
//! ingesting, commits what it holds and exits 0 within 5 seconds, with
//! nothing it acknowledged missing from the buffer; a restart on the same
//! persistent session then stores every published id exactly once.
//!
//! `sigterm_drains_and_restart_resumes_the_session` (main.rs) stops an idle
//! agent after the broker acked everything; here the SIGTERM lands in the
//! middle of the load.

use std::path::Path;
use std::time::Duration;

use edge_agent::demo::broker::start_embedded_broker;

use super::crash::Verdict;
use super::util::{self, Agent};

/// Ids `1..=N`, published at about 2,500 msg/s (100 per 40 ms), so the load
/// is still running when the SIGTERM arrives.
const N: u64 = 12_000;
/// Readings stored before the SIGTERM: the agent is busy by then.
const BEFORE_SIGTERM: u64 = 2_000;
/// The bound for SIGTERM to exit.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

fn write_config(dir: &Path, broker: std::net::SocketAddr) -> std::path::PathBuf {
    let default = util::config(dir, &format!("mqtt://{broker}"), "it-drain");
    // JSON lines, so the counters of the last line can be read back exactly.
    let text = default.replace("format = \"auto\"", "format = \"json\"");
    assert_ne!(text, default, "default config lost format = \"auto\"");
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_commits_what_it_acked_and_exits_in_time() {
    let broker = start_embedded_broker().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), broker);
    let db = dir.path().join("buffer.db");

    let agent = Agent::start(&cfg);
    let subscribed = tokio::task::block_in_place(|| {
        agent.wait_for("ingest subscribed", Duration::from_secs(30))
    });
    assert!(subscribed, "agent never subscribed");
    let publisher = tokio::spawn(async move {
        util::publish_ids(
            broker,
            "it-drain-producer",
            "sensors/it-drain/temperature",
            1..=N,
            100,
            Duration::from_millis(40),
            Duration::from_secs(60),
        )
        .await
    });
    let busy = util::wait_for_readings(&db, BEFORE_SIGTERM, Duration::from_secs(30)).await;
    assert!(
        busy.readings >= BEFORE_SIGTERM,
        "agent stored only {busy:?}"
    );
    assert!(!publisher.is_finished(), "load ended before the SIGTERM");

    let stopped = tokio::task::block_in_place(|| agent.stop(Duration::from_secs(15)));
    let last = util::json_event(&stopped.lines, "agent stopped");
    assert_eq!(
        stopped.code,
        Some(0),
        "exit after SIGTERM under load; last lines:\n{}",
        stopped.lines[stopped.lines.len().saturating_sub(20)..].join("\n")
    );
    assert!(
        stopped.took < EXIT_WITHIN,
        "SIGTERM to exit took {:?}",
        stopped.took
    );
    let last = last.expect("an 'agent stopped' line with the counters");
    let counter = |k: &str| last[k].as_u64().unwrap_or_else(|| panic!("{k} in {last}"));
    let (received, handled, acked) = (counter("received"), counter("handled"), counter("acked"));
    println!(
        "SIGTERM after {} stored: exit in {} ms; received {received}, handled {handled}, acked {acked}",
        busy.readings,
        stopped.took.as_millis()
    );
    assert!(handled >= acked && received >= handled, "{last}");

    // Before any restart: every message the agent acknowledged is in the
    // buffer (one reading per message; no redelivery happened yet).
    let stored = util::read_readings(&db).await;
    let ids: std::collections::BTreeSet<u64> = stored.iter().map(util::reading_id).collect();
    assert_eq!(ids.len(), stored.len(), "a reading was stored twice");
    assert!(
        stored.len() as u64 >= acked,
        "{acked} messages acknowledged but only {} stored",
        stored.len()
    );

    // The rest waits in the broker's session; a restart takes it.
    let published = publisher.await.unwrap();
    assert_eq!(published.failed_attempts, 0);
    let agent = Agent::start(&cfg);
    let stats = util::wait_for_readings(&db, N, Duration::from_secs(60)).await;
    let stopped = tokio::task::block_in_place(|| agent.stop(Duration::from_secs(15)));
    assert_eq!(stopped.code, Some(0));
    let readings = util::read_readings(&db).await;
    let verdict = Verdict::of(&readings, N);
    assert!(
        verdict.is_clean(),
        "after the restart ({} readings): {verdict:?}",
        stats.readings
    );
}
