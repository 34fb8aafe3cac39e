//! Heartbeats, compact and JSON bodies, dead letters, reads and operators,
//! driven through the router with `oneshot`.

use anyhow::Result;
use axum::http::StatusCode;
use cloud_sync::sync_protocol::codec::{self, MEDIA_TYPE};
use cloud_sync::sync_protocol::{
    DeadLettersPage, DeviceSummary, FLEET_PATH, FleetSummary, HeartbeatAck, HeartbeatsPage,
    PredictionsPage, ReadingsPage, UploadAck, batch_path, dead_letters_path, heartbeat_path,
    predictions_path, readings_path, summary_path,
};

use crate::util::{Env, dead_letter, get, heartbeat, post, sample_batch, send};

const MIB: usize = 1024 * 1024;
const JSON: &str = "application/json";

#[tokio::test]
async fn heartbeats_are_acked_with_server_time_and_listed() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    let other = env.store.add_device("dev-2").await?;
    let operator = env.store.add_operator("ops").await?;
    let router = env.router();
    let path = heartbeat_path("dev-1");

    let body = serde_json::to_vec(&heartbeat(1, 5))?;
    let reply = send(
        &router,
        post(&path, Some(&token), JSON, None, body.clone())?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let first: HeartbeatAck = reply.json()?;
    assert!(first.server_ms > 1_700_000_000_000);
    let packed = zstd::bulk::compress(&serde_json::to_vec(&heartbeat(2, 6))?, 3)?;
    let reply = send(
        &router,
        post(&path, Some(&token), JSON, Some("zstd"), packed)?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    let second: HeartbeatAck = reply.json()?;
    assert!(second.server_ms >= first.server_ms);

    // Only the device itself may send; no compact form; JSON must parse.
    for (who, code) in [(&other, "forbidden"), (&operator, "forbidden")] {
        let reply = send(&router, post(&path, Some(who), JSON, None, body.clone())?).await?;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        assert_eq!(reply.error_code()?, code);
    }
    let reply = send(
        &router,
        post(&path, Some(&token), MEDIA_TYPE, None, body.clone())?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(reply.error_code()?, "unsupported_media_type");
    assert_eq!(reply.headers["accept-post"], JSON);
    let reply = send(&router, post(&path, Some(&token), JSON, None, &b"{}"[..])?).await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code()?, "malformed_json");

    for reader in [&token, &operator] {
        let reply = send(&router, get(&path, Some(reader))?).await?;
        assert_eq!(reply.status, StatusCode::OK);
        let page: HeartbeatsPage = reply.json()?;
        let sent: Vec<i64> = page
            .heartbeats
            .iter()
            .map(|h| h.heartbeat.sent_ms)
            .collect();
        assert_eq!(sent, [1, 2]);
        assert_eq!(page.heartbeats[0].received_ms, first.server_ms);
    }
    let reply = send(&router, get(&path, Some(&other))?).await?;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    Ok(())
}

#[tokio::test]
async fn compact_batches_plain_and_zstd_are_stored_like_json() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    let router = env.router();
    let path = batch_path("dev-1");

    let mut batch = sample_batch(1..=40, 1..=4);
    batch.dead_letters = (1..=3).map(dead_letter).collect();
    let compact = codec::encode_batch(&batch);
    let reply = send(
        &router,
        post(&path, Some(&token), MEDIA_TYPE, None, compact.clone())?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let ack: UploadAck = reply.json()?;
    assert_eq!(
        (
            ack.readings_inserted,
            ack.predictions_inserted,
            ack.dead_letters_inserted
        ),
        (40, 4, 3)
    );

    // The same batch as zstd-compressed compact, then as JSON: all duplicates.
    let packed = zstd::bulk::compress(&compact, 3)?;
    let reply = send(
        &router,
        post(&path, Some(&token), MEDIA_TYPE, Some("zstd"), packed)?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    let ack: UploadAck = reply.json()?;
    assert_eq!(
        (
            ack.readings_duplicate,
            ack.predictions_duplicate,
            ack.dead_letters_duplicate
        ),
        (40, 4, 3)
    );
    let json = serde_json::to_vec(&batch)?;
    let reply = send(&router, post(&path, Some(&token), JSON, None, json)?).await?;
    let ack: UploadAck = reply.json()?;
    assert_eq!((ack.readings_inserted, ack.dead_letters_duplicate), (0, 3));

    // Agents in the field send layout version 1: still accepted, with more
    // rows stored from it.
    let older = sample_batch(41..=60, 5..=5);
    let v1 = zstd::bulk::compress(&codec::encode_batch_v1(&older), 3)?;
    let reply = send(
        &router,
        post(&path, Some(&token), codec::MEDIA_TYPE_V1, Some("zstd"), v1)?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let ack: UploadAck = reply.json()?;
    assert_eq!((ack.readings_inserted, ack.predictions_inserted), (20, 1));
    batch.readings.extend(older.readings);

    // What was stored reads back equal to what was sent.
    let reply = send(
        &router,
        get(
            &format!("{}?limit=1000", readings_path("dev-1")),
            Some(&token),
        )?,
    )
    .await?;
    let page: ReadingsPage = reply.json()?;
    let stored: Vec<_> = page.readings.into_iter().map(|r| r.reading).collect();
    assert_eq!(stored, batch.readings);

    // Corrupt compact bodies and foreign media types store nothing.
    let mut corrupt = compact.clone();
    corrupt.truncate(compact.len() - 1);
    let reply = send(
        &router,
        post(&path, Some(&token), MEDIA_TYPE, None, corrupt)?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code()?, "malformed_batch");
    for content_type in [
        "text/plain",
        "application/cbor",
        "application/vnd.edge-batch.v4",
    ] {
        let reply = send(
            &router,
            post(&path, Some(&token), content_type, None, compact.clone())?,
        )
        .await?;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type}"
        );
        assert_eq!(reply.error_code()?, "unsupported_media_type");
        assert_eq!(
            reply.headers["accept-post"],
            "application/json, application/vnd.edge-batch.v3, application/vnd.edge-batch.v2, \
             application/vnd.edge-batch.v1"
        );
    }
    // JSON sent as the compact type is a codec error, not a JSON one.
    let reply = send(
        &router,
        post(&path, Some(&token), MEDIA_TYPE, None, &b"{}"[..])?,
    )
    .await?;
    assert_eq!(reply.error_code()?, "malformed_batch");
    assert_eq!(env.store.summary("dev-1").await?.readings[0].rows, 60);
    Ok(())
}

#[tokio::test]
async fn operators_read_everything_and_upload_nothing() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let dev_a = env.store.add_device("dev-a").await?;
    let dev_b = env.store.add_device("dev-b").await?;
    let operator = env.store.add_operator("ops").await?;
    let retired = env.store.add_operator("retired").await?;
    env.store.revoke_operator("retired").await?;
    let router = env.router();
    let mut batch = sample_batch(1..=5, 1..=2);
    batch.dead_letters = vec![dead_letter(1)];
    env.store.store_batch("dev-b", batch.clone()).await?;
    env.store.store_heartbeat("dev-b", &heartbeat(1, 3)).await?;

    // Reads of any device.
    let reply = send(&router, get(&summary_path("dev-b"), Some(&operator))?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json::<DeviceSummary>()?.readings[0].rows, 5);
    let reply = send(&router, get(&readings_path("dev-b"), Some(&operator))?).await?;
    assert_eq!(reply.json::<ReadingsPage>()?.readings.len(), 5);
    let reply = send(&router, get(&predictions_path("dev-b"), Some(&operator))?).await?;
    assert_eq!(reply.json::<PredictionsPage>()?.predictions.len(), 2);
    let reply = send(&router, get(&dead_letters_path("dev-b"), Some(&operator))?).await?;
    assert_eq!(
        reply.json::<DeadLettersPage>()?.dead_letters[0].dead_letter,
        dead_letter(1)
    );
    let reply = send(&router, get(FLEET_PATH, Some(&operator))?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let fleet: FleetSummary = reply.json()?;
    assert_eq!(fleet.devices.len(), 2);
    assert_eq!(
        fleet.devices[1].backlog.as_ref().map(|b| b.readings),
        Some(3)
    );
    assert_eq!(fleet.next_cursor, None);

    // The fleet pages like the other reads: limit, cursor, 400 for the rest.
    let reply = send(
        &router,
        get(&format!("{FLEET_PATH}?limit=1"), Some(&operator))?,
    )
    .await?;
    let first: FleetSummary = reply.json()?;
    assert_eq!(first.devices.len(), 1);
    let cursor = first.next_cursor.clone().unwrap_or_default();
    let reply = send(
        &router,
        get(
            &format!("{FLEET_PATH}?limit=1&cursor={cursor}"),
            Some(&operator),
        )?,
    )
    .await?;
    let second: FleetSummary = reply.json()?;
    assert_eq!(second.next_cursor, None);
    assert_eq!(
        [
            first.devices[0].device.as_str(),
            second.devices[0].device.as_str()
        ],
        [
            fleet.devices[0].device.as_str(),
            fleet.devices[1].device.as_str()
        ]
    );
    for bad in [
        "limit=0",
        "from_ms=1",
        "source=x",
        "cursor=zz",
        "colour=red",
    ] {
        let reply = send(
            &router,
            get(&format!("{FLEET_PATH}?{bad}"), Some(&operator))?,
        )
        .await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(reply.error_code()?, "bad_query", "{bad}");
    }

    // An unregistered device is 404 for an operator.
    let reply = send(&router, get(&readings_path("ghost"), Some(&operator))?).await?;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code()?, "unknown_device");

    // Operators never upload.
    for path in [batch_path("dev-a"), heartbeat_path("dev-a")] {
        let body = if path.ends_with("batches") {
            serde_json::to_vec(&batch)?
        } else {
            serde_json::to_vec(&heartbeat(1, 1))?
        };
        let reply = send(&router, post(&path, Some(&operator), JSON, None, body)?).await?;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(reply.error_code()?, "forbidden");
    }
    assert!(env.store.summary("dev-a").await?.readings.is_empty());

    // Devices read only themselves and never the fleet; revoked operators are 401.
    let reply = send(&router, get(FLEET_PATH, Some(&dev_a))?).await?;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    for path in [
        readings_path("dev-b"),
        dead_letters_path("dev-b"),
        heartbeat_path("dev-b"),
    ] {
        let reply = send(&router, get(&path, Some(&dev_a))?).await?;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
    }
    let reply = send(&router, get(&readings_path("dev-b"), Some(&dev_b))?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = send(&router, get(FLEET_PATH, Some(&retired))?).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_code()?, "invalid_token");
    let reply = send(&router, get(FLEET_PATH, None)?).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn bad_queries_are_400() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    let router = env.router();
    let base = readings_path("dev-1");
    for query in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "from_ms=5&to_ms=5",
        "model=m",
        "cursor=zz",
        "unknown=1",
        "from_ms=1.5",
    ] {
        let reply = send(&router, get(&format!("{base}?{query}"), Some(&token))?).await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(reply.error_code()?, "bad_query", "{query}");
    }
    // A cursor of another endpoint is refused too.
    env.store.store_heartbeat("dev-1", &heartbeat(1, 1)).await?;
    env.store.store_heartbeat("dev-1", &heartbeat(2, 1)).await?;
    let reply = send(
        &router,
        get(
            &format!("{}?limit=1", heartbeat_path("dev-1")),
            Some(&token),
        )?,
    )
    .await?;
    let cursor = reply.json::<HeartbeatsPage>()?.next_cursor.unwrap();
    let reply = send(
        &router,
        get(&format!("{base}?cursor={cursor}"), Some(&token))?,
    )
    .await?;
    assert_eq!(reply.error_code()?, "bad_query");
    let reply = send(
        &router,
        get(
            &format!("{}?cursor={cursor}", heartbeat_path("dev-1")),
            Some(&token),
        )?,
    )
    .await?;
    assert_eq!(reply.json::<HeartbeatsPage>()?.heartbeats.len(), 1);
    Ok(())
}
