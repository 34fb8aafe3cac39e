//! The sync side of the buffer: which rows the cloud still needs, marking
//! them synced or quarantined, re-queueing quarantined rows, and the figures
//! heartbeats report. Runs on the writer thread like everything else here.
//!
//! Row states (column `synced`): 0 unsynced, 1 synced, 2 quarantined.
//! Invariants: a row leaves state 0 only through [`mark_synced`] (to 1) or
//! [`quarantine`] (to 2, with a `quarantine` row holding the cloud's status
//! and error); only [`requeue`] moves rows from 2 back to 0. Nothing here
//! deletes a row.

use std::collections::BTreeMap;

use rusqlite::{Connection, params};

use super::quota::{self, Quota};
use super::{Fetch, Outbox, Part, Requeued, Result, RowIds, SyncStats, Watermark};

/// Quarantine state of `synced`.
pub(super) const QUARANTINED: i64 = 2;

/// Estimated JSON bytes of one reading besides its names and values: keys,
/// punctuation, sequence and timestamps.
const READING_JSON_OVERHEAD: usize = 110;
/// Same for a prediction besides its names.
const PREDICTION_JSON_OVERHEAD: usize = 230;
/// JSON bytes of `"label":"",` and `"probabilities":[],` besides the label
/// itself and the numbers.
const LABEL_JSON_OVERHEAD: usize = 30;
/// Longest JSON form of one `f64` and its comma.
const PROBABILITY_JSON_BYTES: usize = 25;
/// Same for a dead letter besides topic, detail and payload.
const DEAD_LETTER_JSON_OVERHEAD: usize = 130;

/// The next row ids: rows stored from now on have ids at or above them.
pub(super) fn watermark(conn: &Connection) -> Result<Watermark> {
    let next = |table: &str| -> Result<i64> {
        Ok(conn.query_row(
            &format!("SELECT coalesce(max(id), 0) + 1 FROM {table}"),
            [],
            |r| r.get(0),
        )?)
    };
    Ok(Watermark {
        readings: next("readings")?,
        predictions: next("predictions")?,
    })
}

/// `[lo, hi)` of row ids for a part, in the readings table or (with
/// `readings` false) the predictions table.
fn id_range(part: Part, readings: bool) -> (i64, i64) {
    let mark = |w: Watermark| if readings { w.readings } else { w.predictions };
    match part {
        Part::Live(w) => (mark(w), i64::MAX),
        Part::Backlog(w) => (0, mark(w)),
        Part::All | Part::DeadLetters => (0, i64::MAX),
    }
}

/// Unsynced rows of `fetch.part`, oldest first, within its row and byte
/// limits (at least one row when any is waiting).
pub(super) fn fetch(conn: &Connection, fetch: &Fetch) -> Result<Outbox> {
    let mut out = Outbox::default();
    let max_rows = fetch.max_rows.max(1);
    if fetch.part == Part::DeadLetters {
        dead_letters(conn, max_rows, fetch.max_bytes, &mut out)?;
        return Ok(out);
    }
    // Design: predictions are few (one per window) and may take at most
    // half of a batch, so a deep reading backlog cannot starve them.
    let (lo, hi) = id_range(fetch.part, false);
    let pred_rows = (max_rows / 2).max(1);
    predictions(conn, lo, hi, pred_rows, fetch.max_bytes, &mut out)?;
    let left = max_rows.saturating_sub(out.predictions.len());
    if left > 0 && !(out.more && out.est_bytes >= fetch.max_bytes) {
        let (lo, hi) = id_range(fetch.part, true);
        readings(conn, lo, hi, left, fetch.max_bytes, &mut out)?;
    } else {
        out.more = true;
    }
    Ok(out)
}

/// Adds `cost` to the batch unless that passes `max_bytes` (a first row is
/// always taken). Returns whether the row was taken.
fn take(out: &mut Outbox, rows_so_far: usize, cost: usize, max_bytes: usize) -> bool {
    if rows_so_far > 0 && out.est_bytes + cost > max_bytes {
        out.more = true;
        return false;
    }
    out.est_bytes += cost;
    true
}

fn note_time(out: &mut Outbox, ms: i64) {
    out.oldest_ms = Some(out.oldest_ms.map_or(ms, |o| o.min(ms)));
}

fn to_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn readings(
    conn: &Connection,
    lo: i64,
    hi: i64,
    limit: usize,
    max_bytes: usize,
    out: &mut Outbox,
) -> Result<()> {
    let mut st = conn.prepare_cached(
        "SELECT id, source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values_json
         FROM readings WHERE synced = 0 AND id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3",
    )?;
    let mut rows = st.query(params![lo, hi, to_i64(limit + 1)])?;
    let taken_before = out.readings.len() + out.predictions.len();
    while let Some(r) = rows.next()? {
        if out.readings.len() == limit {
            out.more = true;
            break;
        }
        let source: String = r.get(1)?;
        let stream: String = r.get(2)?;
        let values: String = r.get(7)?;
        let cost = READING_JSON_OVERHEAD + source.len() + stream.len() + values.len();
        if !take(out, taken_before + out.readings.len(), cost, max_bytes) {
            break;
        }
        let recv_ts_ms: i64 = r.get(5)?;
        note_time(out, recv_ts_ms);
        out.readings.push((
            r.get(0)?,
            sync_protocol::Reading {
                source,
                stream,
                seq: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                device_ts_ms: r.get(4)?,
                recv_ts_ms,
                clock_ok: r.get(6)?,
                values: serde_json::from_str(&values)?,
            },
        ));
    }
    Ok(())
}

fn predictions(
    conn: &Connection,
    lo: i64,
    hi: i64,
    limit: usize,
    max_bytes: usize,
    out: &mut Outbox,
) -> Result<()> {
    let mut st = conn.prepare_cached(
        "SELECT id, model, seq, model_version, model_sha256, source, stream, window_end_seq,
                window_end_ts_ms, score, threshold, is_anomaly, created_ms, label, probabilities
         FROM predictions WHERE synced = 0 AND id >= ?1 AND id < ?2 ORDER BY id LIMIT ?3",
    )?;
    let mut rows = st.query(params![lo, hi, to_i64(limit + 1)])?;
    while let Some(r) = rows.next()? {
        if out.predictions.len() == limit {
            out.more = true;
            break;
        }
        let p = sync_protocol::Prediction {
            model: r.get(1)?,
            seq: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            model_version: r.get(3)?,
            model_sha256: r.get(4)?,
            source: r.get(5)?,
            stream: r.get(6)?,
            window_end_seq: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
            window_end_ts_ms: r.get(8)?,
            score: r.get(9)?,
            threshold: r.get(10)?,
            is_anomaly: r.get(11)?,
            created_ms: r.get(12)?,
            label: r.get(13)?,
            probabilities: super::read_probabilities(r, 14)?,
        };
        let labelled = p.label.is_some() || !p.probabilities.is_empty();
        let cost = PREDICTION_JSON_OVERHEAD
            + p.model.len()
            + p.model_version.len()
            + p.model_sha256.len()
            + p.source.len()
            + p.stream.len()
            + if labelled { LABEL_JSON_OVERHEAD } else { 0 }
            + p.label.as_ref().map_or(0, String::len)
            + PROBABILITY_JSON_BYTES * p.probabilities.len();
        if !take(out, out.predictions.len(), cost, max_bytes) {
            break;
        }
        note_time(out, p.created_ms);
        out.predictions.push((r.get(0)?, p));
    }
    Ok(())
}

fn dead_letters(conn: &Connection, limit: usize, max_bytes: usize, out: &mut Outbox) -> Result<()> {
    let mut st = conn.prepare_cached(
        "SELECT id, seq, topic, reason, detail, payload, payload_len, recv_ts_ms
         FROM dead_letters WHERE synced = 0 ORDER BY id LIMIT ?1",
    )?;
    let mut rows = st.query([to_i64(limit + 1)])?;
    while let Some(r) = rows.next()? {
        if out.dead_letters.len() == limit {
            out.more = true;
            break;
        }
        let payload: Vec<u8> = r.get(5)?;
        let d = sync_protocol::DeadLetterRecord {
            seq: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
            topic: r.get(2)?,
            reason: r.get(3)?,
            detail: r.get(4)?,
            payload_b64: base64(&payload),
            payload_len: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
            recv_ts_ms: r.get(7)?,
        };
        let cost = DEAD_LETTER_JSON_OVERHEAD + d.topic.len() + d.detail.len() + d.payload_b64.len();
        if !take(out, out.dead_letters.len(), cost, max_bytes) {
            break;
        }
        note_time(out, d.recv_ts_ms);
        out.dead_letters.push((r.get(0)?, d));
    }
    Ok(())
}

/// Standard base64 with padding (RFC 4648 section 4).
pub(super) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Sets `synced = 1` on the rows, in the caller's transaction.
pub(super) fn mark_synced(conn: &Connection, ids: &RowIds) -> Result<()> {
    for (table, list) in [
        ("readings", &ids.readings),
        ("predictions", &ids.predictions),
        ("dead_letters", &ids.dead_letters),
    ] {
        let mut st =
            conn.prepare_cached(&format!("UPDATE {table} SET synced = 1 WHERE id = ?1"))?;
        for id in list {
            st.execute([id])?;
        }
    }
    Ok(())
}

/// Moves unsynced rows to the quarantine state under a new `quarantine`
/// row; returns its id. Rows no longer unsynced are left alone.
pub(super) fn quarantine(
    conn: &Connection,
    ids: &RowIds,
    status: u16,
    error: &str,
    now_ms: i64,
) -> Result<i64> {
    let qid: i64 = conn.query_row(
        "INSERT INTO quarantine (status, error, quarantined_ms, readings, predictions, dead_letters)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
        params![
            status,
            error,
            now_ms,
            to_i64(ids.readings.len()),
            to_i64(ids.predictions.len()),
            to_i64(ids.dead_letters.len())
        ],
        |r| r.get(0),
    )?;
    for (table, list) in [
        ("readings", &ids.readings),
        ("predictions", &ids.predictions),
        ("dead_letters", &ids.dead_letters),
    ] {
        let mut st = conn.prepare_cached(&format!(
            "UPDATE {table} SET synced = {QUARANTINED}, quarantine_id = ?2
             WHERE id = ?1 AND synced = 0"
        ))?;
        for id in list {
            st.execute(params![id, qid])?;
        }
    }
    Ok(qid)
}

/// Moves every quarantined row back to unsynced and forgets the quarantine
/// records.
pub(super) fn requeue(conn: &Connection) -> Result<Requeued> {
    let mut out = Requeued::default();
    for (table, n) in [
        ("readings", &mut out.readings),
        ("predictions", &mut out.predictions),
        ("dead_letters", &mut out.dead_letters),
    ] {
        let changed = conn.execute(
            &format!(
                "UPDATE {table} SET synced = 0, quarantine_id = NULL WHERE synced = {QUARANTINED}"
            ),
            [],
        )?;
        *n = changed as u64;
    }
    out.batches = conn.execute("DELETE FROM quarantine", [])? as u64;
    Ok(out)
}

/// Backlog figures for heartbeats and metrics.
pub(super) fn stats(conn: &Connection, quota: &Quota, since_ms: i64) -> Result<SyncStats> {
    let count = |sql: &str| -> Result<u64> {
        let n: i64 = conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let mut by_state: BTreeMap<(&str, i64), u64> = BTreeMap::new();
    for table in ["readings", "predictions", "dead_letters"] {
        let mut st = conn.prepare_cached(&format!(
            "SELECT synced, count(*) FROM {table} WHERE synced != 1 GROUP BY synced"
        ))?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (state, n) = row?;
            by_state.insert((table, state), u64::try_from(n).unwrap_or(0));
        }
    }
    let get = |t: &str, s: i64| by_state.get(&(t, s)).copied().unwrap_or(0);
    let oldest = |sql: &str| -> Result<Option<i64>> {
        let mut st = conn.prepare_cached(sql)?;
        let mut rows = st.query([])?;
        Ok(match rows.next()? {
            Some(r) => r.get(0)?,
            None => None,
        })
    };
    let oldest_unsynced_ms = [
        oldest("SELECT recv_ts_ms FROM readings WHERE synced = 0 ORDER BY id LIMIT 1")?,
        oldest("SELECT created_ms FROM predictions WHERE synced = 0 ORDER BY id LIMIT 1")?,
        oldest("SELECT recv_ts_ms FROM dead_letters WHERE synced = 0 ORDER BY id LIMIT 1")?,
    ]
    .into_iter()
    .flatten()
    .min();
    let clock_suspect: i64 = conn
        .prepare_cached("SELECT count(*) FROM readings WHERE recv_ts_ms >= ?1 AND clock_ok = 0")?
        .query_row([since_ms], |r| r.get(0))?;
    Ok(SyncStats {
        readings_unsynced: get("readings", 0),
        predictions_unsynced: get("predictions", 0),
        dead_letters_unsynced: get("dead_letters", 0),
        readings_quarantined: get("readings", QUARANTINED),
        predictions_quarantined: get("predictions", QUARANTINED),
        dead_letters_quarantined: get("dead_letters", QUARANTINED),
        quarantine_batches: count("SELECT count(*) FROM quarantine")?,
        oldest_unsynced_ms,
        clock_suspect_readings: u64::try_from(clock_suspect).unwrap_or(0),
        bytes_used: quota.bytes_used(conn)?,
        max_bytes: quota.max_bytes(),
        evicted: quota::load_evicted(conn)?,
    })
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }
}
