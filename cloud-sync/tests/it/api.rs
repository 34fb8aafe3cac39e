//! The router driven in-process with `oneshot`.

use std::io::Read as _;

use anyhow::Result;
use axum::http::StatusCode;
use cloud_sync::sync_protocol::{
    DeviceSummary, SeqRange, UploadAck, UploadBatch, ZSTD_ENCODING, batch_path, summary_path,
};

use crate::util::{Env, get, reading, sample_batch, send, upload, zstd_json};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn zstd_upload_is_stored_and_summarised() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    let router = env.router();

    let batch = sample_batch(1..=20, 1..=6);
    let reply = send(
        &router,
        upload(
            "dev-1",
            Some(&token),
            Some(ZSTD_ENCODING),
            zstd_json(&batch)?,
        )?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let ack: UploadAck = reply.json()?;
    assert_eq!(ack.readings_inserted, 20);
    assert_eq!(ack.readings_duplicate, 0);
    assert_eq!(ack.predictions_inserted, 6);
    assert_eq!(
        ack.readings,
        [SeqRange {
            key: "m1/temperature".into(),
            first: 1,
            last: 20
        }]
    );
    assert_eq!(
        ack.predictions,
        [SeqRange {
            key: "iforest".into(),
            first: 1,
            last: 6
        }]
    );

    let reply = send(&router, get(&summary_path("dev-1"), Some(&token))?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let summary: DeviceSummary = reply.json()?;
    assert_eq!(summary, env.store.summary("dev-1").await?);
    assert_eq!(summary.readings[0].rows, 20);
    assert_eq!(summary.predictions[0].rows, 6);
    assert_eq!(summary.anomalies, 2);
    Ok(())
}

#[tokio::test]
async fn plain_json_upload_is_accepted() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    let body = serde_json::to_vec(&sample_batch(1..=3, []))?;
    for encoding in [None, Some("identity")] {
        let reply = send(
            &env.router(),
            upload("dev-1", Some(&token), encoding, body.clone())?,
        )
        .await?;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(env.store.summary("dev-1").await?.readings[0].rows, 3);
    Ok(())
}

#[tokio::test]
async fn replay_and_overlap_store_nothing_twice() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    let router = env.router();
    let body = zstd_json(&sample_batch(1..=10, 1..=4))?;

    let first: UploadAck = send(
        &router,
        upload("dev-1", Some(&token), Some("zstd"), body.clone())?,
    )
    .await?
    .json()?;
    let before = env.store.summary("dev-1").await?;
    let replay = send(&router, upload("dev-1", Some(&token), Some("zstd"), body)?).await?;
    assert_eq!(replay.status, StatusCode::OK);
    let replay: UploadAck = replay.json()?;
    assert_eq!(
        (replay.readings_inserted, replay.readings_duplicate),
        (0, 10)
    );
    assert_eq!(
        (replay.predictions_inserted, replay.predictions_duplicate),
        (0, 4)
    );
    assert_eq!(replay.readings, first.readings);
    assert_eq!(env.store.summary("dev-1").await?, before);

    let overlap = zstd_json(&sample_batch(8..=15, 3..=5))?;
    let ack: UploadAck = send(
        &router,
        upload("dev-1", Some(&token), Some("zstd"), overlap)?,
    )
    .await?
    .json()?;
    assert_eq!((ack.readings_inserted, ack.readings_duplicate), (5, 3));
    assert_eq!(
        (ack.predictions_inserted, ack.predictions_duplicate),
        (1, 2)
    );
    let summary = env.store.summary("dev-1").await?;
    assert_eq!(
        (summary.readings[0].rows, summary.readings[0].max_seq),
        (15, 15)
    );
    Ok(())
}

#[tokio::test]
async fn auth_matrix() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token_a = env.store.add_device("dev-a").await?;
    let token_b = env.store.add_device("dev-b").await?;
    let revoked = env.store.add_device("dev-old").await?;
    env.store.revoke_device("dev-old").await?;
    let router = env.router();
    let body = || zstd_json(&sample_batch(1..=2, []));

    // Missing and malformed headers.
    let reply = send(&router, upload("dev-a", None, Some("zstd"), body()?)?).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_code()?, "missing_token");
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    let mut request = upload("dev-a", None, Some("zstd"), body()?)?;
    request
        .headers_mut()
        .insert("authorization", format!("Basic {token_a}").parse()?);
    let reply = send(&router, request).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_code()?, "malformed_token");

    // Unknown and revoked tokens look the same.
    for bad in ["0".repeat(64), "short".to_owned(), revoked.clone()] {
        let reply = send(&router, upload("dev-a", Some(&bad), Some("zstd"), body()?)?).await?;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(reply.error_code()?, "invalid_token");
        let reply = send(&router, get(&summary_path("dev-old"), Some(&bad))?).await?;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{bad}");
    }

    // A valid token on another device's paths, existing or not.
    for other in ["dev-b", "dev-old", "nobody"] {
        let reply = send(
            &router,
            upload(other, Some(&token_a), Some("zstd"), body()?)?,
        )
        .await?;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{other}");
        assert_eq!(reply.error_code()?, "forbidden");
        let reply = send(&router, get(&summary_path(other), Some(&token_a))?).await?;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{other}");
    }

    // Nothing was stored by any refused request; the right token still works.
    for device in ["dev-a", "dev-b", "dev-old"] {
        assert!(env.store.summary(device).await?.readings.is_empty());
    }
    let reply = send(
        &router,
        upload("dev-b", Some(&token_b), Some("zstd"), body()?)?,
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn malformed_bodies_are_400_and_store_nothing() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    let router = env.router();

    let cases: Vec<(Option<&str>, Vec<u8>, &str)> = vec![
        (None, b"{not json".to_vec(), "malformed_json"),
        (None, Vec::new(), "malformed_json"),
        (
            None,
            br#"{"readings":[],"predictions":[],"extra":1}"#.to_vec(),
            "malformed_json",
        ),
        (
            Some("zstd"),
            zstd::bulk::compress(b"[1, 2", 3)?,
            "malformed_json",
        ),
        (
            Some("zstd"),
            b"definitely not zstd".to_vec(),
            "bad_compression",
        ),
        (
            Some("zstd"),
            {
                let mut packed = zstd_json(&sample_batch(1..=50, []))?;
                packed.truncate(packed.len() / 2);
                packed
            },
            "bad_compression",
        ),
        (
            Some("zstd"),
            zstd_json(&UploadBatch {
                readings: vec![
                    reading("m1", "temperature", 1),
                    reading("m1", "temperature", 0),
                ],
                predictions: vec![],
                dead_letters: vec![],
            })?,
            "invalid_batch",
        ),
        (
            None,
            serde_json::to_vec(&UploadBatch {
                readings: vec![reading("m1", "", 1)],
                predictions: vec![],
                dead_letters: vec![],
            })?,
            "invalid_batch",
        ),
    ];
    for (encoding, body, code) in cases {
        let reply = send(&router, upload("dev-1", Some(&token), encoding, body)?).await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{code}");
        assert_eq!(reply.error_code()?, code);
    }
    // NaN cannot be written as JSON; a `null` value is malformed.
    let body = br#"{"readings":[{"source":"m1","stream":"t","seq":1,"device_ts_ms":null,"recv_ts_ms":1,"clock_ok":true,"values":{"v":null}}],"predictions":[]}"#;
    let reply = send(&router, upload("dev-1", Some(&token), None, body.to_vec())?).await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    assert!(env.store.summary("dev-1").await?.readings.is_empty());
    Ok(())
}

#[tokio::test]
async fn compression_bomb_is_refused_with_413() -> Result<()> {
    let cap = 64 * 1024;
    let env = Env::new(cap).await?;
    let token = env.store.add_device("dev-1").await?;
    let router = env.router();

    let zeros = vec![0u8; 100 * MIB];
    let bomb = zstd::bulk::compress(&zeros, 3)?;
    drop(zeros);
    assert!(bomb.len() < cap, "bomb is {} bytes", bomb.len());
    let reply = send(&router, upload("dev-1", Some(&token), Some("zstd"), bomb)?).await?;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error_code()?, "payload_too_large");

    // A stream-compressed bomb (no content size in the frame header) too.
    let bomb = zstd::stream::encode_all(std::io::repeat(b'{').take(100 << 20), 3)?;
    let reply = send(&router, upload("dev-1", Some(&token), Some("zstd"), bomb)?).await?;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);

    // Just under the cap decompresses and then fails as JSON, not as size.
    let reply = send(
        &router,
        upload(
            "dev-1",
            Some(&token),
            Some("zstd"),
            zstd::bulk::compress(&vec![b' '; cap], 3)?,
        )?,
    )
    .await?;
    assert_eq!(reply.error_code()?, "malformed_json");
    Ok(())
}

#[tokio::test]
async fn oversized_raw_body_is_413() -> Result<()> {
    let cap = 4 * 1024;
    let env = Env::new(cap).await?;
    let token = env.store.add_device("dev-1").await?;
    let body = serde_json::to_vec(&sample_batch(1..=200, []))?;
    assert!(body.len() > cap);
    let reply = send(&env.router(), upload("dev-1", Some(&token), None, body)?).await?;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.error_code()?, "payload_too_large");
    Ok(())
}

#[tokio::test]
async fn unsupported_encoding_is_415() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let token = env.store.add_device("dev-1").await?;
    for encoding in ["gzip", "br", "zstd, gzip", "x-unknown"] {
        let reply = send(
            &env.router(),
            upload("dev-1", Some(&token), Some(encoding), b"{}".to_vec())?,
        )
        .await?;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{encoding}"
        );
        assert_eq!(reply.error_code()?, "unsupported_encoding");
        assert_eq!(reply.headers["accept-encoding"], ZSTD_ENCODING);
    }
    Ok(())
}

#[tokio::test]
async fn probes_and_fallbacks() -> Result<()> {
    let env = Env::new(8 * MIB).await?;
    let router = env.router();

    let reply = send(&router, get("/healthz", None)?).await?;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (StatusCode::OK, &b"ok"[..])
    );
    let reply = send(&router, get("/readyz", None)?).await?;
    assert_eq!(reply.status, StatusCode::OK);

    let reply = send(&router, get("/v2/nothing", None)?).await?;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code()?, "not_found");
    let reply = send(&router, get(&batch_path("dev-1"), None)?).await?;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error_code()?, "method_not_allowed");

    env.store.clone().close().await?;
    let reply = send(&router, get("/readyz", None)?).await?;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code()?, "not_ready");
    let reply = send(&router, get(&summary_path("dev-1"), Some(&"a".repeat(64)))?).await?;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.error_code()?, "storage_error");
    Ok(())
}
