//! The store contract for dead letters, heartbeats, operators, paged reads
//! and the fleet summary, on every backend (SQLite always, PostgreSQL when
//! `EDGE_TEST_POSTGRES` is set).

use std::collections::BTreeSet;

use anyhow::Result;
use cloud_sync::StoreError;
use cloud_sync::store::{BatchError, Principal, QueryError};
use cloud_sync::sync_protocol::{ReadQuery, SeqRange, UploadBatch};

use crate::backends::each_backend;
use crate::util::{dead_letter, heartbeat, prediction, reading, sample_batch};

fn with_dead_letters(seqs: impl IntoIterator<Item = u64>) -> UploadBatch {
    UploadBatch {
        dead_letters: seqs.into_iter().map(dead_letter).collect(),
        ..UploadBatch::default()
    }
}

#[tokio::test]
async fn dead_letters_are_stored_exactly_once() -> Result<()> {
    for t in each_backend("dead_letters_are_stored_exactly_once").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let mut batch = sample_batch(1..=3, 1..=1);
        batch.dead_letters = (1..=5).map(dead_letter).collect();
        let ack = store.store_batch("dev-1", batch.clone()).await?;
        assert_eq!(
            (ack.dead_letters_inserted, ack.dead_letters_duplicate),
            (5, 0),
            "{name}"
        );
        assert_eq!(
            ack.dead_letters,
            [SeqRange {
                key: "dead_letters".into(),
                first: 1,
                last: 5
            }],
            "{name}"
        );
        assert_eq!(ack.readings_inserted, 3, "{name}");

        let replay = store.store_batch("dev-1", batch).await?;
        assert_eq!(
            (replay.dead_letters_inserted, replay.dead_letters_duplicate),
            (0, 5),
            "{name}"
        );

        // Overlap, and a key twice in one batch: the first stored copy wins.
        let mut overlap = with_dead_letters(4..=8);
        for d in &mut overlap.dead_letters {
            d.detail = "second copy".into();
        }
        overlap.dead_letters.push(dead_letter(8));
        let ack = store.store_batch("dev-1", overlap).await?;
        assert_eq!(
            (ack.dead_letters_inserted, ack.dead_letters_duplicate),
            (3, 3),
            "{name}"
        );

        let page = store.dead_letters("dev-1", &ReadQuery::default()).await?;
        let seqs: Vec<u64> = page
            .dead_letters
            .iter()
            .map(|d| d.dead_letter.seq)
            .collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "{name}");
        assert_eq!(page.dead_letters[0].dead_letter, dead_letter(1), "{name}");
        assert_eq!(page.dead_letters[4].dead_letter, dead_letter(5), "{name}");
        assert_eq!(
            page.dead_letters[5].dead_letter.detail, "second copy",
            "{name}"
        );
        // Seq 8 came twice in the overlap batch; its first copy there wins.
        assert_eq!(
            page.dead_letters[7].dead_letter.detail, "second copy",
            "{name}"
        );
        assert_eq!(page.next_cursor, None, "{name}");

        // Invalid dead letters refuse the whole batch.
        let mut bad = sample_batch(10..=11, []);
        bad.dead_letters = vec![dead_letter(9), dead_letter(0)];
        match store.store_batch("dev-1", bad).await {
            Err(StoreError::InvalidBatch(BatchError::ZeroSeq { list, index })) => {
                assert_eq!((list, index), ("dead_letters", 1), "{name}");
            }
            other => panic!("{name}: {other:?}"),
        }
        let mut bad = with_dead_letters([9]);
        bad.dead_letters[0].payload_len = u64::MAX;
        assert!(
            matches!(
                store.store_batch("dev-1", bad).await,
                Err(StoreError::InvalidBatch(BatchError::SeqTooLarge { .. }))
            ),
            "{name}"
        );
        let summary = store.summary("dev-1").await?;
        assert_eq!(summary.readings[0].rows, 3, "{name}");
        let page = store.dead_letters("dev-1", &ReadQuery::default()).await?;
        assert_eq!(page.dead_letters.len(), 8, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn heartbeats_are_a_time_series() -> Result<()> {
    for t in each_backend("heartbeats_are_a_time_series").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let mut received = Vec::new();
        for i in 0..5 {
            received.push(
                store
                    .store_heartbeat("dev-1", &heartbeat(i, 100 + i as u64))
                    .await?,
            );
        }
        assert!(received.windows(2).all(|w| w[0] <= w[1]), "{name}");
        // The same heartbeat twice is two samples.
        store.store_heartbeat("dev-1", &heartbeat(4, 104)).await?;

        let mut seen = Vec::new();
        let mut query = ReadQuery {
            limit: Some(2),
            ..ReadQuery::default()
        };
        loop {
            let page = store.heartbeats("dev-1", &query).await?;
            assert!(page.heartbeats.len() <= 2, "{name}");
            seen.extend(page.heartbeats);
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => break,
            }
        }
        let sent: Vec<i64> = seen.iter().map(|h| h.heartbeat.sent_ms).collect();
        assert_eq!(sent, [0, 1, 2, 3, 4, 4], "{name}");
        assert_eq!(seen[3].heartbeat, heartbeat(3, 103), "{name}");
        assert_eq!(seen[0].received_ms, received[0], "{name}");

        assert!(matches!(
            store.store_heartbeat("ghost", &heartbeat(0, 0)).await,
            Err(StoreError::UnknownDevice { .. })
        ));
        store.revoke_device("dev-1").await?;
        assert!(
            matches!(
                store.store_heartbeat("dev-1", &heartbeat(9, 0)).await,
                Err(StoreError::DeviceRevoked { .. })
            ),
            "{name}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn operators_authenticate_until_revoked() -> Result<()> {
    for t in each_backend("operators_authenticate_until_revoked").await? {
        let (store, name) = (&t.store, t.name());
        let device = store.add_device("alice").await?;
        let operator = store.add_operator("alice").await?;
        assert_eq!(operator.len(), 64, "{name}");
        assert_eq!(
            store.authenticate_principal(&operator).await?,
            Some(Principal::Operator("alice".into())),
            "{name}"
        );
        assert_eq!(
            store.authenticate_principal(&device).await?,
            Some(Principal::Device("alice".into())),
            "{name}"
        );
        // The device-only lookup never returns an operator.
        assert_eq!(store.authenticate(&operator).await?, None, "{name}");
        assert_eq!(t.stored_operator_digest("alice").await?.len(), 64, "{name}");
        assert_ne!(t.stored_operator_digest("alice").await?, operator);

        assert!(matches!(
            store.add_operator("alice").await,
            Err(StoreError::OperatorExists { .. })
        ));
        assert!(matches!(
            store.add_operator("a b").await,
            Err(StoreError::InvalidOperatorName { .. })
        ));
        assert!(matches!(
            store.revoke_operator("bob").await,
            Err(StoreError::UnknownOperator { .. })
        ));
        store.revoke_operator("alice").await?;
        assert_eq!(
            store.authenticate_principal(&operator).await?,
            None,
            "{name}"
        );
        assert!(store.device_is_active("alice").await?, "{name}");
        store.revoke_device("alice").await?;
        assert!(!store.device_is_active("alice").await?, "{name}");
        assert!(!store.device_is_active("nobody").await?, "{name}");
        assert!(!store.device_is_active("../x").await?, "{name}");
    }
    Ok(())
}

/// Key of a stored reading in page order.
fn key(r: &cloud_sync::sync_protocol::StoredReading) -> (i64, String, String, u64) {
    let r = &r.reading;
    (r.recv_ts_ms, r.source.clone(), r.stream.clone(), r.seq)
}

#[tokio::test]
async fn pages_are_stable_under_concurrent_inserts() -> Result<()> {
    for t in each_backend("pages_are_stable_under_concurrent_inserts").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        // Equal timestamps on purpose: ties are broken by source, stream, seq
        // (byte order: "M2" < "m1").
        let mut batch = sample_batch(1..=120, []);
        let mut other = sample_batch(1..=60, []);
        for r in &mut other.readings {
            r.source = "M2".into();
            r.recv_ts_ms += i64::try_from(r.seq % 3)?;
        }
        batch.readings.extend(other.readings);
        store.store_batch("dev-1", batch).await?;
        let before: BTreeSet<_> = {
            let all = store
                .readings(
                    "dev-1",
                    &ReadQuery {
                        limit: Some(1000),
                        ..ReadQuery::default()
                    },
                )
                .await?;
            all.readings.iter().map(key).collect()
        };
        assert_eq!(before.len(), 180, "{name}");

        let mut seen = Vec::new();
        let mut query = ReadQuery {
            limit: Some(17),
            ..ReadQuery::default()
        };
        let mut next_seq = 1000;
        loop {
            let page = store.readings("dev-1", &query).await?;
            seen.extend(page.readings.iter().map(key));
            // Concurrent writers: rows before the cursor, among the rows
            // still to come, and after everything.
            let mut late = sample_batch(next_seq..next_seq + 3, []);
            late.readings[0].recv_ts_ms = 1_600_000_000_000;
            late.readings[1].recv_ts_ms = 1_700_000_000_001;
            late.readings[2].recv_ts_ms = 1_800_000_000_000;
            next_seq += 3;
            store.store_batch("dev-1", late).await?;
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => break,
            }
        }
        let unique: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{name}: a row was returned twice");
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "{name}: pages out of order"
        );
        assert!(
            before.is_subset(&unique),
            "{name}: {} rows present before paging were skipped",
            before.difference(&unique).count()
        );
    }
    Ok(())
}

#[tokio::test]
async fn reads_filter_by_time_stream_and_model() -> Result<()> {
    for t in each_backend("reads_filter_by_time_stream_and_model").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("dev-1").await?;
        let mut batch = UploadBatch::default();
        for seq in 1..=10u64 {
            let mut r = reading("m1", if seq % 2 == 0 { "even" } else { "odd" }, seq);
            r.recv_ts_ms = 1000 + i64::try_from(seq)? * 10;
            batch.readings.push(r);
            let mut p = prediction(if seq <= 4 { "a" } else { "b" }, seq, seq == 7);
            p.created_ms = 5000 + i64::try_from(seq)?;
            batch.predictions.push(p);
        }
        store.store_batch("dev-1", batch).await?;

        let q = |edit: fn(&mut ReadQuery)| {
            let mut query = ReadQuery::default();
            edit(&mut query);
            query
        };
        let seqs = |page: cloud_sync::sync_protocol::ReadingsPage| -> Vec<u64> {
            page.readings.iter().map(|r| r.reading.seq).collect()
        };
        let page = store
            .readings(
                "dev-1",
                &q(|q| {
                    q.from_ms = Some(1030);
                    q.to_ms = Some(1080);
                }),
            )
            .await?;
        assert_eq!(seqs(page), [3, 4, 5, 6, 7], "{name}");
        let page = store
            .readings("dev-1", &q(|q| q.stream = Some("even".into())))
            .await?;
        assert_eq!(seqs(page), [2, 4, 6, 8, 10], "{name}");
        let page = store
            .readings("dev-1", &q(|q| q.source = Some("nope".into())))
            .await?;
        assert!(page.readings.is_empty(), "{name}");

        let page = store
            .predictions(
                "dev-1",
                &q(|q| {
                    q.model = Some("b".into());
                    q.limit = Some(4);
                }),
            )
            .await?;
        let got: Vec<(String, u64)> = page
            .predictions
            .iter()
            .map(|p| (p.prediction.model.clone(), p.prediction.seq))
            .collect();
        assert_eq!(
            got,
            [
                ("b".to_owned(), 5),
                ("b".to_owned(), 6),
                ("b".to_owned(), 7),
                ("b".to_owned(), 8)
            ],
            "{name}"
        );
        assert!(page.next_cursor.is_some(), "{name}");
        assert!(page.predictions[2].prediction.is_anomaly, "{name}");
        let next = store
            .predictions(
                "dev-1",
                &ReadQuery {
                    model: Some("b".into()),
                    cursor: page.next_cursor,
                    ..ReadQuery::default()
                },
            )
            .await?;
        assert_eq!(next.predictions.len(), 2, "{name}");
        assert_eq!(next.next_cursor, None, "{name}");

        // Refused queries and unknown devices.
        assert!(matches!(
            store.readings("dev-1", &q(|q| q.limit = Some(0))).await,
            Err(StoreError::InvalidQuery(QueryError::LimitOutOfRange { .. }))
        ));
        assert!(matches!(
            store.readings("ghost", &ReadQuery::default()).await,
            Err(StoreError::UnknownDevice { .. })
        ));
    }
    Ok(())
}

#[tokio::test]
async fn fleet_lists_every_device_with_its_activity() -> Result<()> {
    for t in each_backend("fleet_lists_every_device_with_its_activity").await? {
        let (store, name) = (&t.store, t.name());
        store.add_device("b-dev").await?;
        store.add_device("a-dev").await?;
        store.add_device("Z-old").await?;
        store.revoke_device("Z-old").await?;
        let mut batch = sample_batch(1..=4, 1..=2);
        batch.dead_letters = vec![dead_letter(1)];
        store.store_batch("b-dev", batch).await?;
        store.store_heartbeat("b-dev", &heartbeat(1, 7)).await?;
        let last = store.store_heartbeat("b-dev", &heartbeat(2, 9)).await?;

        let fleet = store.fleet(&ReadQuery::default()).await?;
        assert_eq!(fleet.next_cursor, None, "{name}");
        let ids: Vec<&str> = fleet.devices.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(ids, ["Z-old", "a-dev", "b-dev"], "{name}");
        let (old, idle, busy) = (&fleet.devices[0], &fleet.devices[1], &fleet.devices[2]);
        assert!(old.revoked && !idle.revoked, "{name}");
        assert_eq!(idle.last_seen_ms, None, "{name}");
        assert_eq!(idle.backlog, None, "{name}");
        assert!(idle.models.is_empty(), "{name}");
        assert_eq!(
            (
                busy.readings,
                busy.predictions,
                busy.dead_letters,
                busy.heartbeats
            ),
            (4, 2, 1, 2),
            "{name}"
        );
        assert_eq!(busy.last_heartbeat_ms, Some(last), "{name}");
        assert!(busy.last_seen_ms >= Some(last), "{name}");
        assert_eq!(busy.backlog.as_ref().map(|b| b.readings), Some(9), "{name}");
        assert_eq!(busy.agent_version.as_deref(), Some("0.1.0"), "{name}");
        assert_eq!(busy.models, heartbeat(0, 0).models, "{name}");
        assert!(fleet.server_ms >= last, "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn fleet_pages_by_device_id() -> Result<()> {
    for t in each_backend("fleet_pages_by_device_id").await? {
        let (store, name) = (&t.store, t.name());
        // Byte order: upper case before lower case, '-' before '.' before digits.
        for id in ["b", "a-1", "a.1", "A", "a1", "c"] {
            store.add_device(id).await?;
        }
        let mut seen = Vec::new();
        let mut query = ReadQuery {
            limit: Some(2),
            ..ReadQuery::default()
        };
        let mut pages = 0;
        loop {
            let page = store.fleet(&query).await?;
            assert!(page.devices.len() <= 2, "{name}");
            seen.extend(page.devices.into_iter().map(|d| d.device));
            pages += 1;
            if pages == 2 {
                // Added meanwhile: after the cursor, so it shows up; before
                // it, so it does not.
                store.add_device("bb").await?;
                store.add_device("0").await?;
            }
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => break,
            }
        }
        assert_eq!(seen, ["A", "a-1", "a.1", "a1", "b", "bb", "c"], "{name}");
        assert_eq!(pages, 4, "{name}");
        for bad in [
            ReadQuery {
                limit: Some(0),
                ..ReadQuery::default()
            },
            ReadQuery {
                from_ms: Some(1),
                ..ReadQuery::default()
            },
            ReadQuery {
                source: Some("x".into()),
                ..ReadQuery::default()
            },
            ReadQuery {
                cursor: Some("00".into()),
                ..ReadQuery::default()
            },
        ] {
            assert!(
                matches!(store.fleet(&bad).await, Err(StoreError::InvalidQuery(_))),
                "{name}: {bad:?}"
            );
        }
        // A cursor of another endpoint is refused too.
        store.store_batch("b", sample_batch(1..=3, [])).await?;
        let readings = store
            .readings(
                "b",
                &ReadQuery {
                    limit: Some(1),
                    ..ReadQuery::default()
                },
            )
            .await?;
        let wrong = ReadQuery {
            cursor: readings.next_cursor,
            ..ReadQuery::default()
        };
        assert!(
            matches!(store.fleet(&wrong).await, Err(StoreError::InvalidQuery(_))),
            "{name}"
        );
    }
    Ok(())
}
