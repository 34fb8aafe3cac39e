//! Two cloud-sync servers on one PostgreSQL database, with concurrent
//! uploaders posting overlapping batches to both over real HTTP: every row is
//! stored exactly once and every stored row was acknowledged as inserted
//! exactly once. Gated on `EDGE_TEST_POSTGRES`.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::{Result, ensure};
use cloud_sync::sync_protocol::{DeviceSummary, UploadAck, batch_path, summary_path};
use cloud_sync::{Settings, StorageSettings, start};
use tokio_util::sync::CancellationToken;

use crate::backends::PgSchema;
use crate::util::{raw_http, sample_batch};

const UPLOADERS: u64 = 4;
const BATCHES: u64 = 50;
const READINGS_PER_BATCH: u64 = 200;
const PREDICTIONS_PER_BATCH: u64 = 20;
/// Batches are windows onto `1..=SPAN`, so they overlap heavily.
const SPAN: u64 = 1000;

/// First seq of uploader `task`'s batch `i`. Uploaders `2k` and `2k + 1` send
/// the same batches at the same time, each to the other server.
fn window_start(task: u64, i: u64) -> u64 {
    1 + ((task / 2) * 389 + i * 97) % (SPAN - READINGS_PER_BATCH + 1)
}

async fn uploader(task: u64, servers: [SocketAddr; 2], token: String) -> Result<Vec<UploadAck>> {
    let bearer = format!("Bearer {token}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let mut acks = Vec::new();
    for i in 0..BATCHES {
        let start = window_start(task, i);
        let batch = sample_batch(
            start..start + READINGS_PER_BATCH,
            start..start + PREDICTIONS_PER_BATCH,
        );
        let server = servers[usize::from((task + i) % 2 == 1)];
        let body = serde_json::to_vec(&batch)?;
        let (status, reply) =
            raw_http(server, "POST", &batch_path("dev-1"), &headers, &body).await?;
        ensure!(
            status == 200,
            "uploader {task} batch {i}: {status} {}",
            String::from_utf8_lossy(&reply)
        );
        let ack: UploadAck = serde_json::from_slice(&reply)?;
        ensure!(ack.readings_inserted + ack.readings_duplicate == READINGS_PER_BATCH);
        ensure!(ack.predictions_inserted + ack.predictions_duplicate == PREDICTIONS_PER_BATCH);
        acks.push(ack);
    }
    Ok(acks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_database_store_each_row_once() -> Result<()> {
    let Some(schema) = PgSchema::create("two_servers_on_one_database").await? else {
        println!("skipped");
        return Ok(());
    };
    let mut settings = Settings::for_database("unused.db");
    settings.storage = StorageSettings::Postgres(Box::new(schema.settings()));
    let shutdown = CancellationToken::new();
    // Started together: both run the migrations against an empty schema.
    let (a, b) = tokio::join!(
        start(settings.clone(), shutdown.clone()),
        start(settings, shutdown.clone())
    );
    let (a, b) = (a?, b?);
    let token = a.store().add_device("dev-1").await?;
    let servers = [a.addr, b.addr];

    let mut uploads = tokio::task::JoinSet::new();
    for task in 0..UPLOADERS {
        uploads.spawn(uploader(task, servers, token.clone()));
    }
    let mut acks = Vec::new();
    while let Some(joined) = uploads.join_next().await {
        acks.extend(joined??);
    }
    assert_eq!(acks.len() as u64, UPLOADERS * BATCHES);

    let mut sent_readings = BTreeSet::new();
    let mut sent_predictions = BTreeSet::new();
    for task in 0..UPLOADERS {
        for i in 0..BATCHES {
            let start = window_start(task, i);
            sent_readings.extend(start..start + READINGS_PER_BATCH);
            sent_predictions.extend(start..start + PREDICTIONS_PER_BATCH);
        }
    }
    let readings_inserted: u64 = acks.iter().map(|a| a.readings_inserted).sum();
    let predictions_inserted: u64 = acks.iter().map(|a| a.predictions_inserted).sum();
    let readings_duplicate: u64 = acks.iter().map(|a| a.readings_duplicate).sum();
    assert!(
        readings_duplicate > readings_inserted,
        "too little overlap to mean anything: {readings_duplicate} duplicates"
    );

    let client = schema.client().await?;
    let seqs = |sql: &'static str| {
        let client = &client;
        async move {
            let rows = client.query(sql, &[]).await?;
            rows.iter()
                .map(|row| Ok(u64::try_from(row.try_get::<_, i64>(0)?)?))
                .collect::<Result<Vec<u64>>>()
        }
    };
    // Every key present exactly once (the primary key guarantees no duplicate
    // can exist; this checks nothing sent is missing and nothing extra is
    // there), and the acks counted each stored row as inserted exactly once.
    let stored_readings = seqs(
        "SELECT seq FROM readings WHERE device = 'dev-1' AND source = 'm1'
         AND stream = 'temperature' ORDER BY seq",
    )
    .await?;
    assert_eq!(
        stored_readings,
        sent_readings.iter().copied().collect::<Vec<_>>()
    );
    assert_eq!(readings_inserted, stored_readings.len() as u64);
    let stored_predictions = seqs(
        "SELECT seq FROM predictions WHERE device = 'dev-1' AND model = 'iforest' ORDER BY seq",
    )
    .await?;
    assert_eq!(
        stored_predictions,
        sent_predictions.iter().copied().collect::<Vec<_>>()
    );
    assert_eq!(predictions_inserted, stored_predictions.len() as u64);
    let totals = client
        .query_one(
            "SELECT (SELECT COUNT(*) FROM readings), (SELECT COUNT(*) FROM predictions)",
            &[],
        )
        .await?;
    assert_eq!(
        (totals.get::<_, i64>(0), totals.get::<_, i64>(1)),
        (
            i64::try_from(stored_readings.len())?,
            i64::try_from(stored_predictions.len())?
        )
    );

    // Both servers report the same totals.
    let auth = [("authorization", format!("Bearer {token}"))];
    let auth = [(auth[0].0, auth[0].1.as_str())];
    let mut summaries = Vec::new();
    for server in servers {
        let (status, reply) = raw_http(server, "GET", &summary_path("dev-1"), &auth, b"").await?;
        assert_eq!(status, 200);
        summaries.push(serde_json::from_slice::<DeviceSummary>(&reply)?);
    }
    assert_eq!(summaries[0], summaries[1]);
    assert_eq!(summaries[0].readings[0].rows, sent_readings.len() as u64);

    shutdown.cancel();
    a.join().await?;
    b.join().await?;
    Ok(())
}
