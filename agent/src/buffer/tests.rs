#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::{BufferSettings, FullPolicy};

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
        label: None,
        probabilities: Vec::new(),
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

/// A classifier's label and probabilities survive a restart and come back
/// in the unsynced read (bit-exact), in the anomalies read, and cost quota
/// bytes; a prediction without them reads back with none.
#[tokio::test]
async fn labels_and_probabilities_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let labelled = NewPrediction {
        model: "bearing".into(),
        model_version: "1.0.0".into(),
        model_sha256: "00".into(),
        source: "m1".into(),
        stream: "vibration".into(),
        window_end_seq: 4,
        window_end_ts_ms: Some(9),
        score: 0.75,
        threshold: 0.5,
        is_anomaly: true,
        created_ms: 5,
        label: Some("outer race ü".into()),
        probabilities: vec![0.125, -0.0, 0.875, 1e-310],
    };
    let plain = NewPrediction {
        label: None,
        probabilities: Vec::new(),
        ..labelled.clone()
    };
    assert!(quota::prediction_cost(&labelled) > quota::prediction_cost(&plain) + 40);
    {
        let (b, t) = Buffer::open(&settings(dir.path())).unwrap();
        b.append_predictions(vec![labelled.clone(), plain.clone()])
            .await
            .unwrap();
        drop(b);
        t.join();
    }
    let (b, t) = Buffer::open(&settings(dir.path())).unwrap();
    let u = b.unsynced(10).await.unwrap();
    let got: Vec<_> = u.predictions.iter().map(|(_, p)| p).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].label.as_deref(), Some("outer race ü"));
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got[0].probabilities), bits(&labelled.probabilities));
    assert_eq!((got[0].seq, got[0].score), (1, 0.75));
    assert_eq!(got[1].label, None);
    assert!(got[1].probabilities.is_empty());
    let anomalies = b.anomalies().await.unwrap();
    assert_eq!(anomalies[0].label.as_deref(), Some("outer race ü"));
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

// ---- quota and eviction ----

const MIB: u64 = 1 << 20;

fn quota_settings(dir: &Path, max_bytes: u64, policy: FullPolicy) -> BufferSettings {
    BufferSettings {
        max_bytes,
        full_policy: policy,
        ..settings(dir)
    }
}

/// A reading with ~100 bytes of values.
fn sized_reading(stream: &str, i: u64, recv_ts_ms: i64) -> Item {
    let values = (0..6)
        .map(|k| (format!("v{k}"), i as f64 * 1.000_001 + f64::from(k) / 7.0))
        .collect();
    Item::Reading(NewReading {
        source: "dev".into(),
        stream: stream.into(),
        ident: None,
        device_ts_ms: Some(recv_ts_ms),
        recv_ts_ms,
        clock_ok: true,
        values,
    })
}

/// Database plus WAL size on disk.
fn disk_bytes(db: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    size(db) + size(Path::new(&wal))
}

/// Every reading in the file: `(stream, seq) -> (id, synced, ident)`, read
/// through a second connection.
fn rows_on_disk(db: &Path) -> BTreeMap<(String, u64), (i64, bool, Option<String>)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn
        .prepare("SELECT stream, seq, id, synced, ident FROM readings")
        .unwrap();
    let mut out = BTreeMap::new();
    let rows = st
        .query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64),
                (r.get(2)?, r.get(3)?, r.get(4)?),
            ))
        })
        .unwrap();
    for row in rows {
        let (k, v) = row.unwrap();
        assert!(out.insert(k, v).is_none(), "duplicate row");
    }
    out
}

fn quota_evicted(stats: &BufferStats, stream: &str) -> u64 {
    stats
        .evicted
        .get(&(stream.to_owned(), "quota".to_owned()))
        .copied()
        .unwrap_or(0)
}

/// Marks up to `n` of the oldest unsynced readings synced; returns them.
async fn sync_oldest(b: &Buffer, n: usize) -> Vec<(String, u64)> {
    let u = b.unsynced(n).await.unwrap();
    let keys = u
        .readings
        .iter()
        .map(|(_, r)| (r.stream.clone(), r.seq))
        .collect();
    b.mark_synced(u.readings.iter().map(|(id, _)| *id).collect(), vec![])
        .await
        .unwrap();
    keys
}

const STREAMS: [&str; 3] = ["a", "b", "c"];

#[tokio::test]
async fn drop_oldest_holds_quota_and_counts_every_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_settings(dir.path(), 2 * MIB, FullPolicy::DropOldest);
    let (b, t) = Buffer::open(&s).unwrap();
    let mut stored: BTreeMap<String, u64> = BTreeMap::new();
    let mut synced: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut max_disk = 0;
    let now = crate::now_ms();
    for batch in 0..300u64 {
        let items = (0..100)
            .map(|k| sized_reading(STREAMS[(k % 3) as usize], batch * 100 + k, now))
            .collect();
        for o in b.append(items).await.unwrap() {
            assert!(
                matches!(o, Outcome::Stored(_)),
                "drop_oldest never rejects: {o:?}"
            );
        }
        for k in 0..100 {
            *stored.entry(STREAMS[k % 3].to_owned()).or_default() += 1;
        }
        if batch % 4 == 0 {
            synced.extend(sync_oldest(&b, 150).await);
        }
        max_disk = max_disk.max(disk_bytes(&s.path));
    }
    let stats = b.stats().await.unwrap();
    drop(b);
    t.join();
    max_disk = max_disk.max(disk_bytes(&s.path));
    eprintln!(
        "drop_oldest: quota {} bytes, max on disk {max_disk} ({:.1}%), bytes_used {}, rows {}",
        s.max_bytes,
        max_disk as f64 * 100.0 / s.max_bytes as f64,
        stats.bytes_used,
        stats.readings
    );
    assert!(
        max_disk <= s.max_bytes * 105 / 100,
        "disk {max_disk} over quota"
    );
    assert!(
        max_disk >= s.max_bytes * 90 / 100,
        "the quota is used: {max_disk}"
    );
    assert!(stats.bytes_used <= s.max_bytes);

    let rows = rows_on_disk(&s.path);
    assert_eq!(stats.readings, rows.len() as u64);
    for stream in STREAMS {
        let present = rows.keys().filter(|(st, _)| st == stream).count() as u64;
        let evicted = quota_evicted(&stats, stream);
        assert!(evicted > 0);
        assert_eq!(stored[stream] - evicted, present, "stream {stream}");
        // Oldest first: what is left unsynced is the newest of the stream.
        let unsynced: Vec<u64> = rows
            .iter()
            .filter(|((st, _), (_, sy, _))| st == stream && !*sy)
            .map(|((_, seq), _)| *seq)
            .collect();
        assert_eq!(unsynced.last().copied(), Some(stored[stream]));
        assert!(
            unsynced.windows(2).all(|w| w[1] == w[0] + 1),
            "gap in unsynced rows"
        );
    }
    // Every synced row left is one this test marked.
    for (k, (_, sy, _)) in &rows {
        assert_eq!(*sy, synced.contains(k));
    }
}

#[tokio::test]
async fn reject_new_never_evicts_unsynced_and_resumes_after_sync() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_settings(dir.path(), 2 * MIB, FullPolicy::RejectNew);
    let (b, t) = Buffer::open(&s).unwrap();
    let mut stored: BTreeMap<(String, u64), ()> = BTreeMap::new();
    let mut synced: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut rejected = 0u64;
    let mut max_disk = 0;
    let now = crate::now_ms();
    for batch in 0..300u64 {
        let items: Vec<Item> = (0..100)
            .map(|k| sized_reading(STREAMS[(k % 3) as usize], batch * 100 + k, now))
            .collect();
        let streams: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::Reading(r) => r.stream.clone(),
                Item::DeadLetter(_) => unreachable!(),
            })
            .collect();
        for (stream, o) in streams.into_iter().zip(b.append(items).await.unwrap()) {
            match o {
                Outcome::Stored(seq) => {
                    stored.insert((stream, seq), ());
                }
                Outcome::Rejected => rejected += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        // Sync falls behind: the buffer fills with unsynced rows.
        if batch % 10 == 0 && batch < 150 {
            synced.extend(sync_oldest(&b, 200).await);
        }
        max_disk = max_disk.max(disk_bytes(&s.path));
    }
    let stats = b.stats().await.unwrap();
    eprintln!(
        "reject_new: quota {} bytes, max on disk {max_disk} ({:.1}%), bytes_used {}, rows {}, rejected {rejected}",
        s.max_bytes,
        max_disk as f64 * 100.0 / s.max_bytes as f64,
        stats.bytes_used,
        stats.readings
    );
    assert!(
        max_disk <= s.max_bytes * 105 / 100,
        "disk {max_disk} over quota"
    );
    assert!(
        max_disk >= s.max_bytes * 90 / 100,
        "the quota is used: {max_disk}"
    );
    assert!(rejected > 0, "the quota was reached");
    assert_eq!(stored.len() as u64 + rejected, 30_000);

    let rows = rows_on_disk(&s.path);
    for k in stored.keys() {
        if !synced.contains(k) {
            assert!(rows.contains_key(k), "unsynced row {k:?} was evicted");
        }
    }
    for stream in STREAMS {
        let stored_n = stored.keys().filter(|(st, _)| st == stream).count() as u64;
        let present = rows.keys().filter(|(st, _)| st == stream).count() as u64;
        assert_eq!(
            stored_n - quota_evicted(&stats, stream),
            present,
            "stream {stream}"
        );
    }
    assert!(stats.evicted.keys().all(|(_, reason)| reason == "quota"));

    // Still full: new rows are rejected and nothing is evicted.
    let again = b
        .append(vec![sized_reading("a", 0, now), sized_reading("b", 0, now)])
        .await
        .unwrap();
    assert_eq!(again, vec![Outcome::Rejected, Outcome::Rejected]);
    assert_eq!(b.stats().await.unwrap().evicted, stats.evicted);

    // Once the cloud has the rows, they make room again.
    while !sync_oldest(&b, 5000).await.is_empty() {}
    let items = (0..100).map(|k| sized_reading("a", k, now)).collect();
    let out = b.append(items).await.unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Stored(_))),
        "{out:?}"
    );
    let after = b.stats().await.unwrap();
    assert!(quota_evicted(&after, "a") > quota_evicted(&stats, "a"));
    drop(b);
    t.join();
    assert!(disk_bytes(&s.path) <= s.max_bytes * 105 / 100);
}

#[tokio::test]
async fn mixed_policies_keep_reject_new_rows_and_drop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = quota_settings(dir.path(), 2 * MIB, FullPolicy::DropOldest);
    s.stream_policies
        .insert("crit".to_owned(), FullPolicy::RejectNew);
    let (b, t) = Buffer::open(&s).unwrap();
    let mut crit: BTreeSet<u64> = BTreeSet::new();
    let mut bulk = 0u64;
    let mut crit_rejected = 0u64;
    let now = crate::now_ms();
    // Three bulk readings per critical one; no sync at all.
    for batch in 0..300u64 {
        let items: Vec<Item> = (0..100)
            .map(|k| {
                sized_reading(
                    if k % 4 == 0 { "crit" } else { "bulk" },
                    batch * 100 + k,
                    now,
                )
            })
            .collect();
        for (k, o) in b.append(items).await.unwrap().into_iter().enumerate() {
            match (k % 4 == 0, o) {
                (true, Outcome::Stored(seq)) => {
                    crit.insert(seq);
                }
                (true, Outcome::Rejected) => crit_rejected += 1,
                (false, Outcome::Stored(_)) => bulk += 1,
                (false, Outcome::Rejected) => {}
                (_, other) => panic!("unexpected {other:?}"),
            }
        }
    }
    let stats = b.stats().await.unwrap();
    drop(b);
    t.join();
    let disk = disk_bytes(&s.path);
    eprintln!(
        "mixed: disk {disk} ({:.1}%), bytes_used {}, crit stored {} rejected {crit_rejected}, bulk stored {bulk}, evicted {:?}",
        disk as f64 * 100.0 / s.max_bytes as f64,
        stats.bytes_used,
        crit.len(),
        stats.evicted
    );
    assert!(disk <= s.max_bytes * 105 / 100);
    let rows = rows_on_disk(&s.path);
    let crit_left: BTreeSet<u64> = rows
        .keys()
        .filter(|(st, _)| st == "crit")
        .map(|(_, seq)| *seq)
        .collect();
    assert_eq!(crit_left, crit, "no unsynced crit row is evicted");
    assert_eq!(quota_evicted(&stats, "crit"), 0);
    let bulk_left = rows.keys().filter(|(st, _)| st == "bulk").count() as u64;
    assert_eq!(bulk - quota_evicted(&stats, "bulk"), bulk_left);
    assert!(quota_evicted(&stats, "bulk") > 0);
}

#[tokio::test]
async fn dead_letters_are_evicted_first_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_settings(dir.path(), MIB, FullPolicy::RejectNew);
    let (b, t) = Buffer::open(&s).unwrap();
    let dead = |i: i64| {
        Item::DeadLetter(DeadLetter {
            topic: "x".into(),
            reason: "malformed",
            detail: "bad".into(),
            payload: vec![7; 1000],
            payload_len: 1000,
            recv_ts_ms: i,
        })
    };
    let mut stored = 0u64;
    for batch in 0..40 {
        let out = b
            .append((0..50).map(|i| dead(batch * 50 + i)).collect())
            .await
            .unwrap();
        assert!(out.iter().all(|o| *o == Outcome::DeadLettered));
        stored += 50;
    }
    let stats = b.stats().await.unwrap();
    let evicted = quota_evicted(&stats, "dead_letters");
    assert!(evicted > 0);
    assert_eq!(stored - evicted, stats.dead_letters);
    // Readings of a reject_new stream push dead letters out before being rejected.
    let now = crate::now_ms();
    let out = b
        .append((0..100).map(|k| sized_reading("a", k, now)).collect())
        .await
        .unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Stored(_))));
    let after = b.stats().await.unwrap();
    assert!(after.dead_letters < stats.dead_letters);
    assert_eq!(
        stored - quota_evicted(&after, "dead_letters"),
        after.dead_letters
    );
    assert!(after.bytes_used <= s.max_bytes);
    drop(b);
    t.join();
    assert!(disk_bytes(&s.path) <= s.max_bytes * 105 / 100);
}

#[tokio::test]
async fn max_age_evicts_old_rows_synced_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let s = BufferSettings {
        max_age: Some(Duration::from_secs(3600)),
        ..settings(dir.path())
    };
    let now = crate::now_ms();
    let old = now - 2 * 3600 * 1000;
    {
        let (b, t) = Buffer::open(&s).unwrap();
        let mut items: Vec<Item> = (0..40).map(|i| sized_reading("a", i, old)).collect();
        items.extend((0..10).map(|i| sized_reading("b", i, old)));
        items.extend((0..30).map(|i| sized_reading("a", i, now)));
        items.push(Item::DeadLetter(DeadLetter {
            topic: "x".into(),
            reason: "malformed",
            detail: "bad".into(),
            payload: vec![1; 10],
            payload_len: 10,
            recv_ts_ms: old,
        }));
        b.append(items).await.unwrap();
        let pred = |created_ms| NewPrediction {
            model: "m".into(),
            model_version: "1".into(),
            model_sha256: "00".into(),
            source: "dev".into(),
            stream: "a".into(),
            window_end_seq: 1,
            window_end_ts_ms: None,
            score: 1.0,
            threshold: 2.0,
            is_anomaly: false,
            created_ms,
            label: None,
            probabilities: Vec::new(),
        };
        b.append_predictions(vec![pred(old), pred(now)])
            .await
            .unwrap();
        // Some old rows are synced, some not: both go.
        sync_oldest(&b, 20).await;
        drop(b);
        t.join();
    }
    // The sweep runs when the writer starts (and then at most once a second).
    let (b, t) = Buffer::open(&s).unwrap();
    let stats = b.stats().await.unwrap();
    let age = |k: &str| {
        stats
            .evicted
            .get(&(k.to_owned(), "max_age".to_owned()))
            .copied()
    };
    assert_eq!(age("a"), Some(40));
    assert_eq!(age("b"), Some(10));
    assert_eq!(age("model:m"), Some(1));
    assert_eq!(age("dead_letters"), Some(1));
    assert_eq!(
        (stats.readings, stats.predictions, stats.dead_letters),
        (30, 1, 0)
    );
    let u = b.unsynced(1000).await.unwrap();
    assert!(u.readings.iter().all(|(_, r)| r.recv_ts_ms == now));
    assert_eq!(u.readings.len(), 30);
    // Counters are durable and only grow.
    drop(b);
    t.join();
    let (b, t) = Buffer::open(&s).unwrap();
    assert_eq!(b.stats().await.unwrap().evicted, stats.evicted);
    drop(b);
    t.join();
}

#[derive(Debug, Clone)]
enum QuotaOp {
    /// `(stream, producer id, big)`; big rows carry ~9 KB of values.
    Append(Vec<(u8, Option<u8>, bool)>),
    SyncSome(usize),
    Restart,
}

fn quota_op() -> impl Strategy<Value = QuotaOp> {
    prop_oneof![
        5 => proptest::collection::vec(
            (0u8..3, proptest::option::of(0u8..12), proptest::bool::weighted(0.6)),
            1..32
        )
        .prop_map(QuotaOp::Append),
        2 => (0usize..40).prop_map(QuotaOp::SyncSome),
        1 => Just(QuotaOp::Restart),
    ]
}

fn model_reading(stream: u8, ident: Option<u8>, big: bool, seqish: usize) -> Item {
    let n = if big { 800 } else { 2 };
    Item::Reading(NewReading {
        source: "m".into(),
        stream: format!("s{stream}"),
        ident: ident.map(|i| format!("id{i}")),
        device_ts_ms: None,
        recv_ts_ms: 1,
        clock_ok: false,
        values: (0..n)
            .map(|k| (format!("k{k:03}"), (seqish + k) as f64))
            .collect(),
    })
}

type Present = BTreeMap<(String, u64), (i64, bool, Option<String>)>;

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Model test under a 1 MiB quota with `drop_oldest`: random appends
    /// (with and without producer ids, small and big rows), partial syncs
    /// and restarts. After every step: each stored row is either present or
    /// counted as evicted exactly once (stored - evicted == present, per
    /// stream), nothing evicted comes back, no row is duplicated, synced
    /// flags match the model, unsynced rows go only once no synced row is
    /// left and oldest first, producer ids dedupe against present rows, and
    /// the files stay within 5% of the quota.
    #[test]
    fn eviction_matches_model(ops in proptest::collection::vec(quota_op(), 10..50)) {
        let dir = tempfile::tempdir().unwrap();
        let s = quota_settings(dir.path(), MIB, FullPolicy::DropOldest);
        let rt = rt();
        let (mut b, mut t) = Buffer::open(&s).unwrap();
        let mut next_seq: BTreeMap<String, u64> = BTreeMap::new();
        let mut stored: BTreeMap<String, u64> = BTreeMap::new();
        let mut synced: BTreeSet<(String, u64)> = BTreeSet::new();
        let mut gone: BTreeSet<(String, u64)> = BTreeSet::new();
        let mut present: Present = BTreeMap::new();
        let mut counter = 0usize;
        for op in ops {
            let before = present.clone();
            match op {
                QuotaOp::Append(items) => {
                    let batch = items.iter().map(|(st, id, big)| {
                        counter += 1;
                        model_reading(*st, *id, *big, counter)
                    }).collect();
                    let out = rt.block_on(b.append(batch)).unwrap();
                    let mut in_batch: BTreeMap<(String, String), u64> = BTreeMap::new();
                    let after = rows_on_disk(&s.path);
                    for ((st, id, _), o) in items.iter().zip(out) {
                        let stream = format!("s{st}");
                        let ident = id.map(|i| format!("id{i}"));
                        let earlier = ident.as_ref().and_then(|i| {
                            in_batch.get(&(stream.clone(), i.clone())).copied().or_else(|| {
                                before.iter().find(|((s2, _), (_, _, i2))| *s2 == stream && i2.as_ref() == Some(i)).map(|((_, q), _)| *q)
                            })
                        });
                        match o {
                            Outcome::Duplicate => prop_assert!(earlier.is_some(), "duplicate of nothing"),
                            Outcome::Stored(seq) => {
                                let n = next_seq.entry(stream.clone()).or_insert(1);
                                prop_assert_eq!(seq, *n);
                                *n += 1;
                                *stored.entry(stream.clone()).or_default() += 1;
                                if let (Some(_), Some(old)) = (&ident, earlier) {
                                    // Stored again only because the earlier row was evicted.
                                    prop_assert!(!after.contains_key(&(stream.clone(), old)));
                                }
                                if let Some(i) = ident {
                                    in_batch.insert((stream, i), seq);
                                }
                            }
                            other => prop_assert!(false, "unexpected outcome {:?}", other),
                        }
                    }
                    // Unsynced rows are evicted only when no synced row is left, oldest first.
                    let lost: Vec<i64> = before.iter()
                        .filter(|(k, (_, sy, _))| !*sy && !after.contains_key(*k))
                        .map(|(_, (id, _, _))| *id).collect();
                    if let Some(newest_lost) = lost.iter().max() {
                        prop_assert!(
                            before.iter().all(|(k, (_, sy, _))| !*sy || !after.contains_key(k)),
                            "unsynced row evicted while a synced one was kept"
                        );
                        prop_assert!(
                            before.iter().all(|(k, (id, sy, _))| *sy || !after.contains_key(k) || id > newest_lost),
                            "a newer unsynced row was evicted before an older one"
                        );
                    }
                }
                QuotaOp::SyncSome(n) => {
                    let u = rt.block_on(b.unsynced(n)).unwrap();
                    for (_, r) in &u.readings {
                        prop_assert!(synced.insert((r.stream.clone(), r.seq)), "synced row came back");
                    }
                    rt.block_on(b.mark_synced(u.readings.iter().map(|(id, _)| *id).collect(), vec![])).unwrap();
                }
                QuotaOp::Restart => {
                    drop(b);
                    t.join();
                    (b, t) = Buffer::open(&s).unwrap();
                }
            }
            present = rows_on_disk(&s.path);
            for k in before.keys() {
                if !present.contains_key(k) {
                    gone.insert(k.clone());
                }
            }
            let stats = rt.block_on(b.stats()).unwrap();
            for (stream, n) in &stored {
                let here = present.keys().filter(|(st, _)| st == stream).count() as u64;
                prop_assert_eq!(n - quota_evicted(&stats, stream), here, "stream {}", stream);
            }
            prop_assert!(stats.evicted.keys().all(|(st, r)| r == "quota" && stored.contains_key(st)));
            for (k, (_, sy, _)) in &present {
                prop_assert!(!gone.contains(k), "evicted row came back");
                prop_assert!(k.1 < next_seq[&k.0], "row never stored");
                prop_assert_eq!(*sy, synced.contains(k));
            }
            let disk = disk_bytes(&s.path);
            prop_assert!(disk <= s.max_bytes * 105 / 100, "disk {} over quota", disk);
            prop_assert!(stats.bytes_used <= s.max_bytes, "bytes_used {}", stats.bytes_used);
        }
        drop(b);
        t.join();
        prop_assert!(disk_bytes(&s.path) <= s.max_bytes * 105 / 100);
    }
}

// ---- sync outbox: parts, quarantine, dead-letter sequences ----

fn dead_letter(i: u8) -> Item {
    Item::DeadLetter(DeadLetter {
        topic: format!("bad/{i}"),
        reason: "malformed",
        detail: "not json".into(),
        payload: vec![i; 3],
        payload_len: 3,
        recv_ts_ms: 5,
    })
}

fn fetch(part: Part, max_rows: usize, max_bytes: usize) -> Fetch {
    Fetch {
        part,
        max_rows,
        max_bytes,
    }
}

/// Live rows are those stored after the watermark; the backlog the rest;
/// row and byte limits cut batches and say so.
#[tokio::test]
async fn fetch_splits_live_from_backlog_within_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (b, t) = Buffer::open(&settings(dir.path())).unwrap();
    b.append(
        (0..10)
            .map(|i| reading("m", "old", None, f64::from(i)))
            .collect(),
    )
    .await
    .unwrap();
    let mark = b.watermark().await.unwrap();
    b.append(
        (0..3)
            .map(|i| reading("m", "new", None, f64::from(i)))
            .collect(),
    )
    .await
    .unwrap();

    let live = b
        .fetch_unsynced(fetch(Part::Live(mark), 100, 1 << 20))
        .await
        .unwrap();
    assert_eq!(live.readings.len(), 3);
    assert!(live.readings.iter().all(|(_, r)| r.stream == "new"));
    assert!(!live.more);
    assert_eq!(live.oldest_ms, Some(2000));

    let back = b
        .fetch_unsynced(fetch(Part::Backlog(mark), 4, 1 << 20))
        .await
        .unwrap();
    assert_eq!(
        back.readings.iter().map(|(_, r)| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(back.more, "row limit reached");

    // A byte budget for about two rows; one row always fits.
    let two = b.fetch_unsynced(fetch(Part::All, 100, 300)).await.unwrap();
    assert_eq!(two.readings.len(), 2, "{two:?}");
    assert!(two.more && two.est_bytes <= 300);
    let one = b.fetch_unsynced(fetch(Part::All, 100, 1)).await.unwrap();
    assert_eq!(one.readings.len(), 1);
    drop(b);
    t.join();
}

/// Quarantined rows are no longer fetched, stay on disk, are reported,
/// and come back as unsynced after a re-queue (also across a restart).
#[tokio::test]
async fn quarantine_and_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let (b, t) = Buffer::open(&s).unwrap();
    b.append(
        (0..5)
            .map(|i| reading("m", "t", None, f64::from(i)))
            .collect(),
    )
    .await
    .unwrap();
    let all = b
        .fetch_unsynced(fetch(Part::All, 100, 1 << 20))
        .await
        .unwrap();
    let bad = all.readings[1].0;
    let qid = b
        .quarantine(
            RowIds {
                readings: vec![bad],
                ..RowIds::default()
            },
            422,
            "{\"code\":\"invalid_batch\"}".into(),
        )
        .await
        .unwrap();
    assert!(qid > 0);
    let left = b
        .fetch_unsynced(fetch(Part::All, 100, 1 << 20))
        .await
        .unwrap();
    assert_eq!(
        left.readings.iter().map(|(_, r)| r.seq).collect::<Vec<_>>(),
        vec![1, 3, 4, 5]
    );
    let st = b.sync_stats(0).await.unwrap();
    assert_eq!((st.readings_unsynced, st.readings_quarantined), (4, 1));
    assert_eq!(st.quarantine_batches, 1);
    assert_eq!(b.stats().await.unwrap().readings, 5, "still on disk");
    drop(b);
    t.join();

    let (b, t) = Buffer::open(&s).unwrap();
    let back = b.requeue_quarantine().await.unwrap();
    assert_eq!((back.batches, back.readings), (1, 1));
    let all = b
        .fetch_unsynced(fetch(Part::All, 100, 1 << 20))
        .await
        .unwrap();
    assert_eq!(all.readings.len(), 5);
    let st = b.sync_stats(0).await.unwrap();
    assert_eq!((st.readings_quarantined, st.quarantine_batches), (0, 0));
    drop(b);
    t.join();
}

/// Dead letters are numbered 1, 2, 3... durably; a number is not reused
/// after the row holding it was evicted and the rowid came free.
#[tokio::test]
async fn dead_letter_sequence_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    {
        let (b, t) = Buffer::open(&s).unwrap();
        b.append(vec![dead_letter(1), dead_letter(2)])
            .await
            .unwrap();
        let out = b
            .fetch_unsynced(fetch(Part::DeadLetters, 10, 1 << 20))
            .await
            .unwrap();
        assert_eq!(
            out.dead_letters
                .iter()
                .map(|(_, d)| d.seq)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(out.dead_letters[0].1.payload_b64, "AQEB");
        drop(b);
        t.join();
    }
    // Remove the newest row behind the buffer's back, so SQLite would hand
    // out its rowid again.
    let conn = rusqlite::Connection::open(&s.path).unwrap();
    conn.execute("DELETE FROM dead_letters WHERE seq = 2", [])
        .unwrap();
    drop(conn);
    let (b, t) = Buffer::open(&s).unwrap();
    b.append(vec![dead_letter(3)]).await.unwrap();
    let out = b
        .fetch_unsynced(fetch(Part::DeadLetters, 10, 1 << 20))
        .await
        .unwrap();
    assert_eq!(
        out.dead_letters
            .iter()
            .map(|(_, d)| d.seq)
            .collect::<Vec<_>>(),
        vec![1, 3]
    );
    b.mark_rows_synced(RowIds {
        dead_letters: vec![out.dead_letters[0].0],
        ..RowIds::default()
    })
    .await
    .unwrap();
    let st = b.sync_stats(0).await.unwrap();
    assert_eq!(st.dead_letters_unsynced, 1);
    drop(b);
    t.join();
}

/// Under quota pressure quarantined rows go before unsynced ones.
#[tokio::test]
async fn quarantined_rows_are_evicted_before_unsynced_rows() {
    let dir = tempfile::tempdir().unwrap();
    let s = quota_settings(dir.path(), MIB, FullPolicy::DropOldest);
    let (b, t) = Buffer::open(&s).unwrap();
    let now = crate::now_ms();
    b.append((0..2000).map(|i| sized_reading("q", i, now)).collect())
        .await
        .unwrap();
    let q = b
        .fetch_unsynced(fetch(Part::All, 2000, 64 << 20))
        .await
        .unwrap();
    b.quarantine(
        RowIds {
            readings: q.readings.iter().map(|(id, _)| *id).collect(),
            ..RowIds::default()
        },
        400,
        "bad".into(),
    )
    .await
    .unwrap();
    // Fill well past the quota with unsynced rows of another stream.
    for chunk in 0..20u64 {
        b.append(
            (0..500)
                .map(|i| sized_reading("u", chunk * 500 + i, now))
                .collect(),
        )
        .await
        .unwrap();
    }
    let stats = b.stats().await.unwrap();
    let q_gone = quota_evicted(&stats, "q");
    let u_gone = quota_evicted(&stats, "u");
    assert!(q_gone > 0, "{stats:?}");
    if u_gone > 0 {
        assert_eq!(
            q_gone, 2000,
            "unsynced rows went while quarantined remained"
        );
    }
    drop(b);
    t.join();
}
