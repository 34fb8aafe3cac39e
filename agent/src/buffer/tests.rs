#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::BufferSettings;

fn settings(dir: &Path) -> BufferSettings {
    BufferSettings {
        commit_max_rows: 64,
        commit_max_delay: Duration::from_millis(2),
        ..BufferSettings::for_path(dir.join("buffer.db"))
    }
}

fn reading(source: &str, stream: &str, ident: Option<&str>, v: f64) -> Item {
    Item::Reading(NewReading {
        source: source.into(),
        stream: stream.into(),
        ident: ident.map(str::to_owned),
        device_ts_ms: Some(1000),
        recv_ts_ms: 2000,
        clock_ok: false,
        values: BTreeMap::from([("value".into(), v)]),
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[tokio::test]
async fn sequences_are_per_stream_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    {
        let (b, t) = Buffer::open(&s).unwrap();
        let out = b
            .append(vec![
                reading("m1", "t", None, 1.0),
                reading("m1", "t", None, 2.0),
                reading("m2", "t", None, 3.0),
                reading("m1", "h", None, 4.0),
            ])
            .await
            .unwrap();
        assert_eq!(
            out,
            vec![
                Outcome::Stored(1),
                Outcome::Stored(2),
                Outcome::Stored(1),
                Outcome::Stored(1)
            ]
        );
        drop(b);
        t.join();
    }
    let (b, t) = Buffer::open(&s).unwrap();
    let out = b.append(vec![reading("m1", "t", None, 5.0)]).await.unwrap();
    assert_eq!(out, vec![Outcome::Stored(3)]);
    assert_eq!(b.stats().await.unwrap().readings, 5);
    drop(b);
    t.join();
}

#[tokio::test]
async fn producer_identity_absorbs_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = Buffer::open(&settings(dir.path())).unwrap();
    let first = b
        .append(vec![reading("m1", "t", Some("a"), 1.0)])
        .await
        .unwrap();
    let again = b
        .append(vec![
            reading("m1", "t", Some("a"), 1.0),
            reading("m1", "t", Some("b"), 2.0),
            reading("m2", "t", Some("a"), 1.0),
        ])
        .await
        .unwrap();
    assert_eq!(first, vec![Outcome::Stored(1)]);
    assert_eq!(
        again,
        vec![Outcome::Duplicate, Outcome::Stored(2), Outcome::Stored(1)]
    );
    drop(b);
    t.join();
}

#[tokio::test]
async fn dead_letters_are_stored_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = Buffer::open(&settings(dir.path())).unwrap();
    let out = b
        .append(vec![Item::DeadLetter(DeadLetter {
            topic: "x".into(),
            reason: "malformed",
            detail: "bad".into(),
            payload: vec![7; DEAD_LETTER_MAX_BYTES * 2],
            payload_len: DEAD_LETTER_MAX_BYTES * 2,
            recv_ts_ms: 1,
        })])
        .await
        .unwrap();
    assert_eq!(out, vec![Outcome::DeadLettered]);
    let stats = b.stats().await.unwrap();
    assert_eq!((stats.dead_letters, stats.readings), (1, 0));
    drop(b);
    t.join();
}

#[tokio::test]
async fn unsynced_then_mark_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = Buffer::open(&settings(dir.path())).unwrap();
    let items = (0..10)
        .map(|i| reading("m1", "t", None, f64::from(i)))
        .collect();
    b.append(items).await.unwrap();
    let pred = NewPrediction {
        model: "m".into(),
        model_version: "1.0.0".into(),
        model_sha256: "00".into(),
        source: "m1".into(),
        stream: "t".into(),
        window_end_seq: 10,
        window_end_ts_ms: None,
        score: 3.0,
        threshold: 2.0,
        is_anomaly: true,
        created_ms: 5,
    };
    assert_eq!(
        b.append_predictions(vec![pred.clone(), pred])
            .await
            .unwrap(),
        vec![1, 2]
    );
    let u = b.unsynced(4).await.unwrap();
    assert_eq!(u.readings.len(), 4);
    assert_eq!(
        u.readings.iter().map(|(_, r)| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(u.predictions.len(), 2);
    let ids = u.readings.iter().map(|(id, _)| *id).collect();
    b.mark_synced(ids, vec![u.predictions[0].0]).await.unwrap();
    let next = b.unsynced(100).await.unwrap();
    assert_eq!(next.readings.first().map(|(_, r)| r.seq), Some(5));
    assert_eq!(next.readings.len(), 6);
    assert_eq!(next.predictions.len(), 1);
    let stats = b.stats().await.unwrap();
    assert_eq!(stats.readings_unsynced, 6);
    assert_eq!(stats.anomalies, 2);
    assert_eq!(b.anomalies().await.unwrap().len(), 2);
    drop(b);
    t.join();
}

#[test]
fn corrupt_database_is_moved_aside_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    std::fs::write(&s.path, vec![0x42; 8192]).unwrap();
    let (b, t) = Buffer::open(&s).unwrap();
    let out = rt()
        .block_on(b.append(vec![reading("m1", "t", None, 1.0)]))
        .unwrap();
    assert_eq!(out, vec![Outcome::Stored(1)]);
    drop(b);
    t.join();
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is kept for inspection");
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, Option<u8>)>),
    SyncSome(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec((0u8..3, proptest::option::of(0u8..20)), 1..8).prop_map(Op::Append),
        2 => (0usize..10).prop_map(Op::SyncSome),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Model test: random appends (with and without producer ids), partial
    /// syncs and restarts. Every append reported Stored is in the database
    /// exactly once with a gap-free sequence per stream; duplicates are
    /// exactly the repeated ids; synced rows never come back as unsynced.
    #[test]
    fn buffer_matches_model(ops in proptest::collection::vec(op(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path());
        let rt = rt();
        let (mut b, mut t) = Buffer::open(&s).unwrap();
        let mut seen_ids: BTreeSet<(u8, u8)> = BTreeSet::new();
        let mut next_seq: BTreeMap<u8, u64> = BTreeMap::new();
        let mut stored: BTreeSet<(u8, u64)> = BTreeSet::new();
        let mut synced: BTreeSet<(u8, u64)> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Append(items) => {
                    let batch = items.iter().map(|(stream, id)| {
                        reading("m", &format!("s{stream}"), id.map(|i| format!("id{i}")).as_deref(), 1.0)
                    }).collect();
                    let out = rt.block_on(b.append(batch)).unwrap();
                    for ((stream, id), o) in items.iter().zip(out) {
                        let dup = id.is_some_and(|i| !seen_ids.insert((*stream, i)));
                        if dup {
                            prop_assert_eq!(o, Outcome::Duplicate);
                        } else {
                            let n = next_seq.entry(*stream).or_insert(1);
                            prop_assert_eq!(o, Outcome::Stored(*n));
                            stored.insert((*stream, *n));
                            *n += 1;
                        }
                    }
                }
                Op::SyncSome(n) => {
                    let u = rt.block_on(b.unsynced(n)).unwrap();
                    for (_, r) in &u.readings {
                        let key = (r.stream[1..].parse::<u8>().unwrap(), r.seq);
                        prop_assert!(!synced.contains(&key), "synced row came back");
                        synced.insert(key);
                    }
                    rt.block_on(b.mark_synced(u.readings.iter().map(|(id, _)| *id).collect(), vec![])).unwrap();
                }
                Op::Restart => {
                    drop(b);
                    t.join();
                    (b, t) = Buffer::open(&s).unwrap();
                }
            }
        }
        let rest = rt.block_on(b.unsynced(usize::MAX / 2)).unwrap();
        let mut all = synced.clone();
        for (_, r) in &rest.readings {
            prop_assert!(all.insert((r.stream[1..].parse::<u8>().unwrap(), r.seq)), "duplicate row");
        }
        prop_assert_eq!(all, stored);
        drop(b);
        t.join();
    }
}
