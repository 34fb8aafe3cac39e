//! The store contract, run against every backend: SQLite always, PostgreSQL
//! when `EDGE_TEST_POSTGRES` is set.

use anyhow::Result;
use cloud_sync::store::BatchError;
use cloud_sync::sync_protocol::{SeqRange, StreamSummary, UploadBatch};
use cloud_sync::{Store, StoreError};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::backends::{PgSchema, each_backend};
use crate::util::{prediction, reading, sample_batch};

#[tokio::test]
async fn stores_a_batch_and_summarises_it() -> Result<()> {
    for t in each_backend("stores_a_batch_and_summarises_it").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let ack = store
            .store_batch("dev-1", sample_batch(1..=5, 1..=4))
            .await?;
        assert_eq!(
            (
                ack.readings_inserted,
                ack.readings_duplicate,
                ack.predictions_inserted,
                ack.predictions_duplicate
            ),
            (5, 0, 4, 0),
            "{name}"
        );
        assert_eq!(
            ack.readings,
            [SeqRange {
                key: "m1/temperature".into(),
                first: 1,
                last: 5
            }],
            "{name}"
        );
        assert_eq!(
            ack.predictions,
            [SeqRange {
                key: "iforest".into(),
                first: 1,
                last: 4
            }],
            "{name}"
        );

        let summary = store.summary("dev-1").await?;
        assert_eq!(summary.device, "dev-1");
        assert_eq!(
            summary.readings,
            [StreamSummary {
                key: "m1/temperature".into(),
                rows: 5,
                min_seq: 1,
                max_seq: 5
            }],
            "{name}"
        );
        assert_eq!(
            summary.predictions,
            [StreamSummary {
                key: "iforest".into(),
                rows: 4,
                min_seq: 1,
                max_seq: 4
            }],
            "{name}"
        );
        assert_eq!(summary.anomalies, 1, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn replaying_the_same_batch_changes_nothing() -> Result<()> {
    for t in each_backend("replaying_the_same_batch_changes_nothing").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let first = store
            .store_batch("dev-1", sample_batch(1..=3, 1..=2))
            .await?;
        let before = t.readings().await?;
        assert_eq!(before.len(), 3, "{name}");

        let again = store
            .store_batch("dev-1", sample_batch(1..=3, 1..=2))
            .await?;
        assert_eq!(
            (
                again.readings_inserted,
                again.readings_duplicate,
                again.predictions_inserted,
                again.predictions_duplicate
            ),
            (0, 3, 0, 2),
            "{name}"
        );
        assert_eq!(again.readings, first.readings, "{name}");
        assert_eq!(again.predictions, first.predictions, "{name}");
        assert_eq!(t.readings().await?, before, "{name}");
    }
    Ok(())
}

fn one_reading(seq: u64, value: f64) -> UploadBatch {
    let mut r = reading("m1", "t", seq);
    r.values = [("value".to_owned(), value)].into();
    UploadBatch {
        readings: vec![r],
        predictions: vec![],
        dead_letters: vec![],
    }
}

#[tokio::test]
async fn replay_keeps_the_first_stored_row() -> Result<()> {
    for t in each_backend("replay_keeps_the_first_stored_row").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        store.store_batch("dev-1", one_reading(1, 1.0)).await?;
        let ack = store.store_batch("dev-1", one_reading(1, 99.0)).await?;
        assert_eq!(ack.readings_duplicate, 1, "{name}");
        let rows = t.readings().await?;
        assert_eq!(rows.len(), 1, "{name}");
        assert_eq!(rows[0].values, json!({"value": 1.0}), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn a_key_twice_in_one_batch_is_stored_once_first_copy_wins() -> Result<()> {
    for t in each_backend("a_key_twice_in_one_batch").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let mut batch = one_reading(2, 1.0);
        batch.readings.extend(one_reading(1, 5.0).readings);
        batch.readings.extend(one_reading(2, 7.0).readings);
        batch.predictions = vec![
            prediction("iforest", 4, true),
            prediction("iforest", 4, false),
        ];
        let ack = store.store_batch("dev-1", batch).await?;
        assert_eq!(
            (
                ack.readings_inserted,
                ack.readings_duplicate,
                ack.predictions_inserted,
                ack.predictions_duplicate
            ),
            (2, 1, 1, 1),
            "{name}"
        );
        let rows = t.readings().await?;
        let values: Vec<_> = rows.iter().map(|r| (r.seq, r.values.clone())).collect();
        assert_eq!(
            values,
            [(1, json!({"value": 5.0})), (2, json!({"value": 1.0}))],
            "{name}"
        );
        assert_eq!(store.summary("dev-1").await?.anomalies, 1, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn overlapping_batch_inserts_only_new_rows() -> Result<()> {
    for t in each_backend("overlapping_batch_inserts_only_new_rows").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        store
            .store_batch("dev-1", sample_batch(1..=10, 1..=5))
            .await?;
        let ack = store
            .store_batch("dev-1", sample_batch(6..=15, 4..=8))
            .await?;
        assert_eq!(
            (ack.readings_inserted, ack.readings_duplicate),
            (5, 5),
            "{name}"
        );
        assert_eq!(
            (ack.predictions_inserted, ack.predictions_duplicate),
            (3, 2),
            "{name}"
        );
        assert_eq!((ack.readings[0].first, ack.readings[0].last), (6, 15));

        let summary = store.summary("dev-1").await?;
        assert_eq!(summary.readings[0].rows, 15, "{name}");
        assert_eq!(summary.readings[0].max_seq, 15, "{name}");
        assert_eq!(summary.predictions[0].rows, 8, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn sources_have_their_own_sequences_in_byte_order() -> Result<()> {
    for t in each_backend("sources_have_their_own_sequences").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        // "M2" sorts before "m1" in byte order (but not in most locales).
        let mut other = sample_batch(1..=3, []);
        for r in &mut other.readings {
            r.source = "M2".into();
        }
        store.store_batch("dev-1", sample_batch(1..=3, [])).await?;
        let ack = store.store_batch("dev-1", other).await?;
        assert_eq!(
            (ack.readings_inserted, ack.readings_duplicate),
            (3, 0),
            "{name}"
        );
        assert_eq!(ack.readings[0].key, "M2/temperature", "{name}");
        let summary = store.summary("dev-1").await?;
        let keys: Vec<_> = summary
            .readings
            .iter()
            .map(|s| (s.key.as_str(), s.rows, s.max_seq))
            .collect();
        assert_eq!(
            keys,
            [("M2/temperature", 3, 3), ("m1/temperature", 3, 3)],
            "{name}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn devices_do_not_share_sequence_spaces() -> Result<()> {
    for t in each_backend("devices_do_not_share_sequence_spaces").await? {
        let store = &t.store;
        store.add_device("a").await?;
        store.add_device("b").await?;
        store.store_batch("a", sample_batch(1..=3, [])).await?;
        let ack = store.store_batch("b", sample_batch(1..=3, [])).await?;
        assert_eq!(ack.readings_inserted, 3, "{}", t.name());
    }
    Ok(())
}

#[tokio::test]
async fn a_large_batch_is_one_transaction() -> Result<()> {
    for t in each_backend("a_large_batch_is_one_transaction").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let ack = store
            .store_batch("dev-1", sample_batch(1..=5000, 1..=1000))
            .await?;
        assert_eq!(
            (ack.readings_inserted, ack.predictions_inserted),
            (5000, 1000),
            "{name}"
        );
        let ack = store
            .store_batch("dev-1", sample_batch(2501..=7500, 501..=1500))
            .await?;
        assert_eq!(
            (
                ack.readings_inserted,
                ack.readings_duplicate,
                ack.predictions_inserted,
                ack.predictions_duplicate
            ),
            (2500, 2500, 500, 500),
            "{name}"
        );
        let summary = store.summary("dev-1").await?;
        assert_eq!(summary.readings[0].rows, 7500, "{name}");
        assert_eq!(summary.predictions[0].rows, 1500, "{name}");
        assert_eq!(summary.anomalies, 500, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn invalid_batch_writes_nothing() -> Result<()> {
    fn broken(edit: impl FnOnce(&mut UploadBatch)) -> UploadBatch {
        let mut batch = sample_batch(1..=3, 1..=2);
        edit(&mut batch);
        batch
    }
    for t in each_backend("invalid_batch_writes_nothing").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let cases = [
            (
                broken(|b| b.readings[2].seq = 0),
                BatchError::ZeroSeq {
                    list: "readings",
                    index: 2,
                },
            ),
            (
                broken(|b| b.readings[1].stream.clear()),
                BatchError::EmptyName {
                    list: "readings",
                    index: 1,
                    field: "stream",
                },
            ),
            (
                broken(|b| b.readings[2].source.clear()),
                BatchError::EmptyName {
                    list: "readings",
                    index: 2,
                    field: "source",
                },
            ),
            (
                broken(|b| b.predictions[1].model.clear()),
                BatchError::EmptyName {
                    list: "predictions",
                    index: 1,
                    field: "model",
                },
            ),
            (
                broken(|b| {
                    b.readings[0].values.insert("bad".into(), f64::NAN);
                }),
                BatchError::NotFinite {
                    list: "readings",
                    index: 0,
                    field: "values.bad".into(),
                },
            ),
            (
                broken(|b| b.predictions[0].score = f64::INFINITY),
                BatchError::NotFinite {
                    list: "predictions",
                    index: 0,
                    field: "score".into(),
                },
            ),
            (
                broken(|b| b.predictions[0].seq = u64::MAX),
                BatchError::SeqTooLarge {
                    list: "predictions",
                    index: 0,
                    field: "seq",
                    value: u64::MAX,
                },
            ),
            (
                broken(|b| b.predictions[1].window_end_seq = u64::MAX),
                BatchError::SeqTooLarge {
                    list: "predictions",
                    index: 1,
                    field: "window_end_seq",
                    value: u64::MAX,
                },
            ),
        ];
        for (bad, expected) in cases {
            match store.store_batch("dev-1", bad).await {
                Err(StoreError::InvalidBatch(got)) => assert_eq!(got, expected, "{name}"),
                other => panic!("{name}: expected {expected:?}, got {other:?}"),
            }
        }
        assert!(t.readings().await?.is_empty(), "{name}");
        let summary = store.summary("dev-1").await?;
        assert!(summary.readings.is_empty(), "{name}");
        assert!(summary.predictions.is_empty(), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn batch_for_unknown_device_is_refused() -> Result<()> {
    for t in each_backend("batch_for_unknown_device_is_refused").await? {
        let err = t.store.store_batch("ghost", sample_batch(1..=1, [])).await;
        assert!(
            matches!(err, Err(StoreError::UnknownDevice { .. })),
            "{}: {err:?}",
            t.name()
        );
    }
    Ok(())
}

#[tokio::test]
async fn tokens_authenticate_their_device_until_revoked() -> Result<()> {
    for t in each_backend("tokens_authenticate_their_device_until_revoked").await? {
        let (store, name) = (&t.store, t.name());
        let a = store.add_device("dev-a").await?;
        let b = store.add_device("dev-b").await?;
        assert_eq!(a.len(), 64, "{name}");
        assert_ne!(a, b, "{name}");
        assert_eq!(store.authenticate(&a).await?.as_deref(), Some("dev-a"));
        assert_eq!(store.authenticate(&b).await?.as_deref(), Some("dev-b"));
        assert_eq!(store.authenticate(&"0".repeat(64)).await?, None, "{name}");
        assert_eq!(store.authenticate("not a token").await?, None, "{name}");
        assert_eq!(store.authenticate("").await?, None, "{name}");

        store.revoke_device("dev-a").await?;
        assert_eq!(store.authenticate(&a).await?, None, "{name}");
        assert_eq!(store.authenticate(&b).await?.as_deref(), Some("dev-b"));
        let err = store.store_batch("dev-a", sample_batch(1..=1, [])).await;
        assert!(
            matches!(err, Err(StoreError::DeviceRevoked { .. })),
            "{name}: {err:?}"
        );
        // Data stays readable after revocation.
        assert!(store.summary("dev-a").await.is_ok(), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn device_ids_are_unique_and_checked() -> Result<()> {
    for t in each_backend("device_ids_are_unique_and_checked").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        store.revoke_device("dev-1").await?;
        let err = store.add_device("dev-1").await;
        assert!(
            matches!(err, Err(StoreError::DeviceExists { .. })),
            "{name}: {err:?}"
        );
        for bad in ["", "a/b", "..", "has space", &"x".repeat(129)] {
            let err = store.add_device(bad).await;
            assert!(
                matches!(err, Err(StoreError::InvalidDeviceId { .. })),
                "{name}: {bad:?}: {err:?}"
            );
        }
        let err = store.revoke_device("ghost").await;
        assert!(
            matches!(err, Err(StoreError::UnknownDevice { .. })),
            "{name}: {err:?}"
        );
        let err = store.summary("ghost").await;
        assert!(
            matches!(err, Err(StoreError::UnknownDevice { .. })),
            "{name}: {err:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn token_is_stored_only_as_its_digest() -> Result<()> {
    for t in each_backend("token_is_stored_only_as_its_digest").await? {
        let token = t.store.add_device("dev-1").await?;
        let stored = t.stored_token_digest("dev-1").await?;
        assert_ne!(stored, token, "{}", t.name());
        assert_eq!(stored, hex::encode(Sha256::digest(token.as_bytes())));
    }
    Ok(())
}

#[tokio::test]
async fn closing_refuses_further_calls_and_reopening_keeps_data() -> Result<()> {
    for t in each_backend("closing_refuses_further_calls").await? {
        let (store, name) = (&t.store, t.name());
        let token = store.add_device("dev-1").await?;
        store.store_batch("dev-1", sample_batch(1..=4, [])).await?;
        store.clone().close().await?;
        assert!(
            matches!(store.ping().await, Err(StoreError::Closed)),
            "{name}"
        );
        assert!(
            matches!(store.clone().close().await, Err(StoreError::Closed)),
            "{name}"
        );

        let reopened = t.reopen().await?;
        reopened.ping().await?;
        assert_eq!(
            reopened.authenticate(&token).await?.as_deref(),
            Some("dev-1"),
            "{name}"
        );
        assert_eq!(reopened.summary("dev-1").await?.readings[0].rows, 4);
        reopened.close().await?;
    }
    Ok(())
}

#[tokio::test]
async fn postgres_instances_starting_together_migrate_once() -> Result<()> {
    let Some(schema) = PgSchema::create("postgres_instances_starting_together").await? else {
        return Ok(());
    };
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let settings = schema.settings();
        opening.spawn(async move { Store::open_postgres(&settings).await });
    }
    let mut stores = Vec::new();
    while let Some(opened) = opening.join_next().await {
        stores.push(opened??);
    }
    let client = schema.client().await?;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3]);
    stores[0].add_device("dev-1").await?;
    for store in &stores {
        assert!(store.summary("dev-1").await?.readings.is_empty());
    }
    Ok(())
}

#[tokio::test]
async fn postgres_newer_schema_is_refused() -> Result<()> {
    let Some(schema) = PgSchema::create("postgres_newer_schema_is_refused").await? else {
        return Ok(());
    };
    schema
        .client()
        .await?
        .batch_execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL);
             INSERT INTO schema_migrations VALUES (99, 0);",
        )
        .await?;
    let err = Store::open_postgres(&schema.settings()).await;
    assert!(
        matches!(err, Err(StoreError::SchemaTooNew { found: 99, .. })),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn postgres_unreachable_is_a_connect_error() -> Result<()> {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let settings =
        cloud_sync::PostgresSettings::from_url(&format!("postgres://nobody@127.0.0.1:{port}/x"))?;
    let err = Store::open_postgres(&settings).await;
    assert!(matches!(err, Err(StoreError::Connect(_))), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn postgres_store_recovers_when_its_sessions_are_killed() -> Result<()> {
    let Some(schema) = PgSchema::create("postgres_store_recovers").await? else {
        return Ok(());
    };
    let store = Store::open_postgres(&schema.settings()).await?;
    store.add_device("dev-1").await?;
    store.store_batch("dev-1", sample_batch(1..=3, [])).await?;
    // As a database restart would: every session of the store ends.
    let killed = schema
        .client()
        .await?
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&schema.name],
        )
        .await?;
    assert!(killed >= 1);
    // The first call may still meet the dead connection (and discard it).
    if let Err(err) = store.ping().await {
        assert!(matches!(err, StoreError::Postgres(_)), "{err:?}");
    }
    store.ping().await?;
    let ack = store.store_batch("dev-1", sample_batch(1..=6, [])).await?;
    assert_eq!((ack.readings_inserted, ack.readings_duplicate), (3, 3));
    Ok(())
}

/// A classifier's label and probabilities are stored with the prediction,
/// once (a replay with another label keeps the first), read back bit-exact,
/// and a prediction without them reads back without them; non-finite
/// probabilities are refused.
#[tokio::test]
async fn labels_and_probabilities_are_stored_once_and_read_back() -> Result<()> {
    use cloud_sync::sync_protocol::ReadQuery;
    for t in each_backend("labels_and_probabilities_are_stored_once").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let mut labelled = prediction("bearing", 1, true);
        labelled.label = Some("outer race ü".to_owned());
        labelled.probabilities = vec![0.125, -0.0, 0.875, 1e-310];
        let plain = prediction("bearing", 2, false);
        let batch = UploadBatch {
            predictions: vec![labelled.clone(), plain.clone()],
            ..UploadBatch::default()
        };
        let ack = store.store_batch("dev-1", batch).await?;
        assert_eq!(ack.predictions_inserted, 2, "{name}");
        let mut replay = labelled.clone();
        replay.label = Some("other".to_owned());
        replay.probabilities = vec![1.0];
        let ack = store
            .store_batch(
                "dev-1",
                UploadBatch {
                    predictions: vec![replay],
                    ..UploadBatch::default()
                },
            )
            .await?;
        assert_eq!(ack.predictions_duplicate, 1, "{name}");
        let page = store.predictions("dev-1", &ReadQuery::default()).await?;
        let got: Vec<_> = page.predictions.into_iter().map(|p| p.prediction).collect();
        assert_eq!(got, [labelled.clone(), plain], "{name}");
        let bits: Vec<u64> = got[0].probabilities.iter().map(|p| p.to_bits()).collect();
        let want: Vec<u64> = labelled.probabilities.iter().map(|p| p.to_bits()).collect();
        assert_eq!(bits, want, "{name}");
        let mut bad = prediction("bearing", 3, false);
        bad.probabilities = vec![0.5, f64::NAN];
        let refused = store
            .store_batch(
                "dev-1",
                UploadBatch {
                    predictions: vec![bad],
                    ..UploadBatch::default()
                },
            )
            .await;
        assert!(
            matches!(
                refused,
                Err(StoreError::InvalidBatch(BatchError::NotFinite { .. }))
            ),
            "{name}: {refused:?}"
        );
    }
    Ok(())
}
