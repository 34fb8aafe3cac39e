//! The writer thread: owns the rusqlite connection, group-commits appends,
//! answers queries between transactions, and runs the quota and max-age
//! housekeeping ([`super::quota`]) inside those transactions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use super::quota::{self, Evicted, Quota, Space};
use super::{
    BufferError, BufferStats, Command, DEAD_LETTER_MAX_BYTES, Item, NewPrediction, Outcome, Result,
    RowIds, Unsynced, outbox, quarantine_path, schema,
};
use crate::config::{BufferSettings, Synchronous};

/// Opens the database; a corrupt file is moved aside and replaced.
pub(super) fn open_or_replace(settings: &BufferSettings) -> Result<Connection> {
    if let Some(dir) = settings.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| BufferError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    match open(settings) {
        Ok(c) => Ok(c),
        Err(e) if is_corruption(&e) => {
            let aside = quarantine_path(&settings.path, crate::now_ms());
            tracing::error!(
                path = %settings.path.display(),
                moved_to = %aside.display(),
                error = %format!("{e:#}"),
                "buffer database is corrupt; moved aside and starting a new one"
            );
            std::fs::rename(&settings.path, &aside).map_err(|source| BufferError::Io {
                path: settings.path.clone(),
                source,
            })?;
            for suffix in ["-wal", "-shm"] {
                let mut side = settings.path.as_os_str().to_owned();
                side.push(suffix);
                let _ = std::fs::remove_file(side);
            }
            open(settings)
        }
        Err(e) => Err(e),
    }
}

fn is_corruption(e: &BufferError) -> bool {
    let code = |s: &rusqlite::Error| s.sqlite_error_code();
    let bad = |c: Option<rusqlite::ErrorCode>| {
        matches!(
            c,
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
    };
    match e {
        BufferError::Open { source, .. } | BufferError::Sqlite(source) => bad(code(source)),
        BufferError::Migrate {
            source: schema::MigrateError::Sqlite(s),
            ..
        } => bad(code(s)),
        _ => false,
    }
}

fn open(settings: &BufferSettings) -> Result<Connection> {
    let path = &settings.path;
    let wrap = |source| BufferError::Open {
        path: path.clone(),
        source,
    };
    let mut conn = Connection::open(path).map_err(wrap)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(wrap)?;
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(wrap)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(
            mode,
            "SQLite refused WAL mode; durability is unchanged, concurrency lower"
        );
    }
    let sync = match settings.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(wrap)?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(wrap)?;
    if check != "ok" {
        return Err(wrap(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(check),
        )));
    }
    schema::migrate(&mut conn).map_err(|source| BufferError::Migrate {
        path: path.clone(),
        source,
    })?;
    Ok(conn)
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The max-age sweep runs at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Data-loss warnings (unsynced rows evicted, items rejected) are logged at
/// most this often; the counters in [`BufferStats`] are exact.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

pub(super) struct Worker {
    conn: Connection,
    max_rows: usize,
    max_delay: Duration,
    stream_seqs: HashMap<(String, String), u64>,
    model_seqs: HashMap<String, u64>,
    /// Next dead-letter sequence number (table `sequences`).
    dead_seq: u64,
    quota: Quota,
    last_sweep: Option<Instant>,
    pressure: Pressure,
}

/// Quota pressure since the last warning.
#[derive(Debug, Default)]
struct Pressure {
    evicted_unsynced: u64,
    rejected: u64,
    stored_over_quota: u64,
    wal_over_budget: bool,
    warned: Option<Instant>,
}

impl Pressure {
    fn note(&mut self, evicted_unsynced: u64, rejected: u64, stored_over_quota: u64) {
        self.evicted_unsynced += evicted_unsynced;
        self.rejected += rejected;
        self.stored_over_quota += stored_over_quota;
        self.flush(false);
    }

    fn wal(&mut self, within_budget: bool) {
        if !within_budget {
            self.wal_over_budget = true;
            self.flush(false);
        }
    }

    fn flush(&mut self, force: bool) {
        let pending = self.evicted_unsynced + self.rejected + self.stored_over_quota > 0
            || self.wal_over_budget;
        let due = self.warned.is_none_or(|t| t.elapsed() >= WARN_INTERVAL);
        if pending && (due || force) {
            tracing::warn!(
                evicted_unsynced = self.evicted_unsynced,
                rejected = self.rejected,
                stored_over_quota = self.stored_over_quota,
                wal_over_budget = self.wal_over_budget,
                "buffer dropped data: unsynced rows evicted (quota or max_age) or new rows rejected (quota)"
            );
            *self = Self {
                warned: Some(Instant::now()),
                ..Self::default()
            };
        }
    }
}

enum GroupResult {
    Append(Vec<Outcome>),
    Predictions(Vec<u64>),
}

enum Batchable {
    Append(Vec<Item>, super::Reply<Vec<Outcome>>),
    Predictions(Vec<NewPrediction>, super::Reply<Vec<u64>>),
}

impl Worker {
    pub(super) fn new(conn: Connection, settings: &BufferSettings) -> Result<Self> {
        let quota = Quota::new(&conn, settings)?;
        let mut w = Self {
            conn,
            max_rows: settings.commit_max_rows,
            max_delay: settings.commit_max_delay,
            stream_seqs: HashMap::new(),
            model_seqs: HashMap::new(),
            dead_seq: 1,
            quota,
            last_sweep: None,
            pressure: Pressure::default(),
        };
        w.load_seqs()?;
        Ok(w)
    }

    fn load_seqs(&mut self) -> Result<()> {
        self.stream_seqs.clear();
        self.model_seqs.clear();
        let mut st = self
            .conn
            .prepare("SELECT source, stream, next_seq FROM streams")?;
        let rows = st.query_map([], |r| {
            Ok((
                (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (k, v) = row?;
            self.stream_seqs.insert(k, u64::try_from(v).unwrap_or(1));
        }
        let mut st = self
            .conn
            .prepare("SELECT model, next_seq FROM model_seqs")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (k, v) = row?;
            self.model_seqs.insert(k, u64::try_from(v).unwrap_or(1));
        }
        let dead: Option<i64> = self
            .conn
            .query_row(
                "SELECT next_seq FROM sequences WHERE name = 'dead_letters'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        self.dead_seq = dead.and_then(|v| u64::try_from(v).ok()).unwrap_or(1);
        Ok(())
    }

    pub(super) fn run(mut self, rx: &flume::Receiver<Command>) {
        self.housekeeping();
        let mut carry: Option<Command> = None;
        loop {
            let cmd = match carry.take() {
                Some(c) => c,
                None => match self.recv(rx) {
                    Some(c) => c,
                    None => break,
                },
            };
            let first = match cmd {
                Command::Append(items, reply) => Batchable::Append(items, reply),
                Command::AppendPredictions(items, reply) => Batchable::Predictions(items, reply),
                other => {
                    self.query(other);
                    continue;
                }
            };
            let mut group = vec![first];
            let mut rows = group_rows(&group);
            let deadline = Instant::now() + self.max_delay;
            while rows < self.max_rows {
                match rx.recv_deadline(deadline) {
                    Ok(Command::Append(items, reply)) => {
                        rows += items.len();
                        group.push(Batchable::Append(items, reply));
                    }
                    Ok(Command::AppendPredictions(items, reply)) => {
                        rows += items.len();
                        group.push(Batchable::Predictions(items, reply));
                    }
                    Ok(other) => {
                        carry = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
        self.pressure.flush(true);
        tracing::debug!("buffer writer stopped");
    }

    /// The next command; while idle, runs the max-age sweep when it is due.
    fn recv(&mut self, rx: &flume::Receiver<Command>) -> Option<Command> {
        loop {
            if self.quota.max_age().is_none() {
                return rx.recv().ok();
            }
            let wait = self.last_sweep.map_or(Duration::ZERO, |t| {
                SWEEP_INTERVAL.saturating_sub(t.elapsed())
            });
            match rx.recv_timeout(wait) {
                Ok(c) => return Some(c),
                Err(flume::RecvTimeoutError::Timeout) => self.housekeeping(),
                Err(flume::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn sweep_due(&self) -> bool {
        self.quota.max_age().is_some()
            && self
                .last_sweep
                .is_none_or(|t| t.elapsed() >= SWEEP_INTERVAL)
    }

    /// Its own transaction: the max-age sweep (when due) and evictions down
    /// to the quota (after a restart with a smaller quota, or when the WAL
    /// grew past its share).
    fn housekeeping(&mut self) {
        let sweep = self.sweep_due();
        let stream_seqs = &self.stream_seqs;
        let quota = &self.quota;
        let result = (|| -> Result<(Evicted, bool)> {
            let tx = self.conn.transaction()?;
            let mut evicted = Evicted::default();
            if sweep {
                quota.sweep(&tx, crate::now_ms(), &mut evicted)?;
            }
            let mut space = quota.space(&tx)?;
            let within = quota.enforce(&tx, &mut space, stream_seqs, &mut evicted)?;
            evicted.write(&tx)?;
            tx.commit()?;
            Ok((evicted, within))
        })();
        if sweep {
            self.last_sweep = Some(Instant::now());
        }
        match result {
            Ok((evicted, within)) => {
                if evicted.total() > 0 {
                    tracing::debug!(
                        evicted = evicted.total(),
                        "buffer housekeeping evicted rows"
                    );
                }
                self.pressure.note(evicted.unsynced, 0, u64::from(!within));
                self.checkpoint();
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "buffer housekeeping failed; rolled back");
            }
        }
    }

    fn checkpoint(&mut self) {
        match self.quota.after_commit(&self.conn, BUSY_TIMEOUT) {
            Ok(within) => self.pressure.wal(within),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "buffer WAL checkpoint failed");
            }
        }
    }

    fn commit_group(&mut self, group: Vec<Batchable>) {
        let started = Instant::now();
        let mut stream_seqs = self.stream_seqs.clone();
        let mut model_seqs = self.model_seqs.clone();
        let mut dead_seq = self.dead_seq;
        let sweep = self.sweep_due();
        let quota = &self.quota;
        let result = (|| -> Result<(Vec<GroupResult>, Tally)> {
            let tx = self.conn.transaction()?;
            let mut ctx = Room {
                quota,
                evicted: Evicted::default(),
                space: Space::default(),
                tally: Tally::default(),
            };
            // Design: the sweep, the evictions and the appends share one
            // transaction, so a row is never evicted for an append that then
            // rolls back, and counters move with the rows they count.
            if sweep {
                quota.sweep(&tx, crate::now_ms(), &mut ctx.evicted)?;
            }
            ctx.space = quota.space(&tx)?;
            let mut results = Vec::with_capacity(group.len());
            for g in &group {
                match g {
                    Batchable::Append(items, _) => {
                        results.push(GroupResult::Append(append_items(
                            &tx,
                            &mut stream_seqs,
                            &mut dead_seq,
                            items,
                            &mut ctx,
                        )?));
                    }
                    Batchable::Predictions(items, _) => {
                        results.push(GroupResult::Predictions(append_predictions(
                            &tx,
                            &mut model_seqs,
                            &stream_seqs,
                            items,
                            &mut ctx,
                        )?));
                    }
                }
            }
            if !quota.enforce(&tx, &mut ctx.space, &stream_seqs, &mut ctx.evicted)? {
                ctx.tally.over_quota = true;
            }
            ctx.evicted.write(&tx)?;
            ctx.tally.evicted = ctx.evicted.total();
            ctx.tally.evicted_unsynced = ctx.evicted.unsynced;
            {
                let mut up = tx.prepare_cached(
                    "INSERT INTO streams (source, stream, next_seq) VALUES (?1, ?2, ?3)
                     ON CONFLICT (source, stream) DO UPDATE SET next_seq = excluded.next_seq",
                )?;
                for ((source, stream), next) in &stream_seqs {
                    if self.stream_seqs.get(&(source.clone(), stream.clone())) != Some(next) {
                        up.execute(params![source, stream, to_i64(*next)])?;
                    }
                }
                let mut up = tx.prepare_cached(
                    "INSERT INTO model_seqs (model, next_seq) VALUES (?1, ?2)
                     ON CONFLICT (model) DO UPDATE SET next_seq = excluded.next_seq",
                )?;
                for (model, next) in &model_seqs {
                    if self.model_seqs.get(model) != Some(next) {
                        up.execute(params![model, to_i64(*next)])?;
                    }
                }
                if dead_seq != self.dead_seq {
                    tx.prepare_cached(
                        "INSERT INTO sequences (name, next_seq) VALUES ('dead_letters', ?1)
                         ON CONFLICT (name) DO UPDATE SET next_seq = excluded.next_seq",
                    )?
                    .execute([to_i64(dead_seq)])?;
                }
            }
            tx.commit()?;
            Ok((results, ctx.tally))
        })();
        if sweep {
            self.last_sweep = Some(Instant::now());
        }
        match result {
            Ok((results, tally)) => {
                self.stream_seqs = stream_seqs;
                self.model_seqs = model_seqs;
                self.dead_seq = dead_seq;
                tracing::debug!(
                    groups = group.len(),
                    evicted = tally.evicted,
                    rejected = tally.rejected,
                    elapsed_us = started.elapsed().as_micros(),
                    "buffer group committed"
                );
                self.pressure.note(
                    tally.evicted_unsynced,
                    tally.rejected,
                    tally.stored_over_quota + u64::from(tally.over_quota),
                );
                self.checkpoint();
                for (g, r) in group.into_iter().zip(results) {
                    match (g, r) {
                        (Batchable::Append(_, reply), GroupResult::Append(out)) => {
                            let _ = reply.send(Ok(out));
                        }
                        (Batchable::Predictions(_, reply), GroupResult::Predictions(seqs)) => {
                            let _ = reply.send(Ok(seqs));
                        }
                        _ => tracing::error!("buffer group result mismatch"),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "buffer group commit failed; rolled back");
                let msg = e.to_string();
                for g in group {
                    let err = || {
                        BufferError::Sqlite(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                            Some(msg.clone()),
                        ))
                    };
                    match g {
                        Batchable::Append(_, reply) => {
                            let _ = reply.send(Err(err()));
                        }
                        Batchable::Predictions(_, reply) => {
                            let _ = reply.send(Err(err()));
                        }
                    }
                }
            }
        }
    }

    fn query(&mut self, cmd: Command) {
        match cmd {
            Command::Unsynced(limit, reply) => {
                let _ = reply.send(self.unsynced(limit));
            }
            Command::MarkSynced(ids, reply) => {
                let _ = reply.send(self.mark_synced(&ids));
            }
            Command::Fetch(fetch, reply) => {
                let _ = reply.send(outbox::fetch(&self.conn, &fetch));
            }
            Command::Watermark(reply) => {
                let _ = reply.send(outbox::watermark(&self.conn));
            }
            Command::Quarantine(ids, status, error, reply) => {
                let _ = reply.send(self.in_transaction(|tx| {
                    outbox::quarantine(tx, &ids, status, &error, crate::now_ms())
                }));
            }
            Command::Requeue(reply) => {
                let _ = reply.send(self.in_transaction(|tx| outbox::requeue(tx)));
            }
            Command::SyncStats(since_ms, reply) => {
                let _ = reply.send(outbox::stats(&self.conn, &self.quota, since_ms));
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::Anomalies(reply) => {
                let _ = reply.send(self.predictions_where("is_anomaly = 1", i64::MAX));
            }
            Command::Append(..) | Command::AppendPredictions(..) => {
                tracing::error!("append routed to query path");
            }
        }
    }

    fn unsynced(&self, limit: usize) -> Result<Unsynced> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut out = Unsynced::default();
        let mut st = self.conn.prepare_cached(
            "SELECT id, source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values_json
             FROM readings WHERE synced = 0 ORDER BY id LIMIT ?1",
        )?;
        let rows = st.query_map([limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, bool>(6)?,
                r.get::<_, String>(7)?,
            ))
        })?;
        for row in rows {
            let (id, source, stream, seq, device_ts_ms, recv_ts_ms, clock_ok, values) = row?;
            out.readings.push((
                id,
                sync_protocol::Reading {
                    source,
                    stream,
                    seq: u64::try_from(seq).unwrap_or(0),
                    device_ts_ms,
                    recv_ts_ms,
                    clock_ok,
                    values: serde_json::from_str(&values)?,
                },
            ));
        }
        out.predictions = self.predictions_where_with_ids("synced = 0", limit)?;
        Ok(out)
    }

    fn predictions_where(
        &self,
        filter: &str,
        limit: i64,
    ) -> Result<Vec<sync_protocol::Prediction>> {
        Ok(self
            .predictions_where_with_ids(filter, limit)?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    /// `filter` is a fixed SQL condition from this file, never user input.
    fn predictions_where_with_ids(
        &self,
        filter: &str,
        limit: i64,
    ) -> Result<Vec<(i64, sync_protocol::Prediction)>> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT id, model, seq, model_version, model_sha256, source, stream, window_end_seq,
                    window_end_ts_ms, score, threshold, is_anomaly, created_ms, label,
                    probabilities
             FROM predictions WHERE {filter} ORDER BY id LIMIT ?1"
        ))?;
        let rows = st.query_map([limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                sync_protocol::Prediction {
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
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?);
        }
        Ok(out)
    }

    /// Runs `f` in its own transaction, then keeps the quota like
    /// [`Self::mark_synced`] does.
    fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>,
    ) -> Result<T> {
        let tx = self.conn.transaction()?;
        let out = f(&tx)?;
        let mut evicted = Evicted::default();
        let mut space = self.quota.space(&tx)?;
        let within = self
            .quota
            .enforce(&tx, &mut space, &self.stream_seqs, &mut evicted)?;
        evicted.write(&tx)?;
        tx.commit()?;
        self.pressure.note(evicted.unsynced, 0, u64::from(!within));
        self.checkpoint();
        Ok(out)
    }

    fn mark_synced(&mut self, ids: &RowIds) -> Result<()> {
        let tx = self.conn.transaction()?;
        outbox::mark_synced(&tx, ids)?;
        // Moving rows between the synced and unsynced indexes can take a
        // page; every transaction ends within the quota.
        let mut evicted = Evicted::default();
        let mut space = self.quota.space(&tx)?;
        let within = self
            .quota
            .enforce(&tx, &mut space, &self.stream_seqs, &mut evicted)?;
        evicted.write(&tx)?;
        tx.commit()?;
        self.pressure.note(evicted.unsynced, 0, u64::from(!within));
        self.checkpoint();
        Ok(())
    }

    fn stats(&self) -> Result<BufferStats> {
        let count = |sql: &str| -> Result<u64> {
            let n: i64 = self.conn.query_row(sql, [], |r| r.get(0))?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(BufferStats {
            readings: count("SELECT count(*) FROM readings")?,
            readings_unsynced: count("SELECT count(*) FROM readings WHERE synced = 0")?,
            predictions: count("SELECT count(*) FROM predictions")?,
            predictions_unsynced: count("SELECT count(*) FROM predictions WHERE synced = 0")?,
            anomalies: count("SELECT count(*) FROM predictions WHERE is_anomaly = 1")?,
            dead_letters: count("SELECT count(*) FROM dead_letters")?,
            evicted: quota::load_evicted(&self.conn)?,
            bytes_used: self.quota.bytes_used(&self.conn)?,
        })
    }
}

fn group_rows(group: &[Batchable]) -> usize {
    group
        .iter()
        .map(|g| match g {
            Batchable::Append(i, _) => i.len(),
            Batchable::Predictions(i, _) => i.len(),
        })
        .sum()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Quota state threaded through one group transaction.
struct Room<'q> {
    quota: &'q Quota,
    space: Space,
    evicted: Evicted,
    tally: Tally,
}

/// What one group transaction did beyond storing rows.
#[derive(Debug, Default)]
struct Tally {
    evicted: u64,
    evicted_unsynced: u64,
    rejected: u64,
    stored_over_quota: u64,
    over_quota: bool,
}

fn append_items(
    tx: &rusqlite::Transaction<'_>,
    seqs: &mut HashMap<(String, String), u64>,
    dead_seq: &mut u64,
    items: &[Item],
    room: &mut Room<'_>,
) -> Result<Vec<Outcome>> {
    let mut out = Vec::with_capacity(items.len());
    let mut find = tx.prepare_cached(
        "SELECT seq FROM readings WHERE source = ?1 AND stream = ?2 AND ident = ?3",
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO readings (source, stream, seq, ident, device_ts_ms, recv_ts_ms, clock_ok, values_json)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut dead = tx.prepare_cached(
        "INSERT INTO dead_letters (topic, reason, detail, payload, payload_len, recv_ts_ms, seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for item in items {
        match item {
            Item::Reading(r) => {
                if let Some(ident) = &r.ident {
                    let existing: Option<i64> = find
                        .query_row(params![r.source, r.stream, ident], |row| row.get(0))
                        .optional()?;
                    if existing.is_some() {
                        out.push(Outcome::Duplicate);
                        continue;
                    }
                }
                let values = serde_json::to_string(&r.values)?;
                let cost = quota::reading_cost(&r.source, &r.stream, r.ident.as_deref(), &values);
                if !room
                    .quota
                    .reserve(tx, &mut room.space, cost, seqs, &mut room.evicted)?
                {
                    room.tally.rejected += 1;
                    out.push(Outcome::Rejected);
                    continue;
                }
                let next = seqs
                    .entry((r.source.clone(), r.stream.clone()))
                    .or_insert(1);
                let seq = *next;
                insert.execute(params![
                    r.source,
                    r.stream,
                    to_i64(seq),
                    r.ident,
                    r.device_ts_ms,
                    r.recv_ts_ms,
                    r.clock_ok,
                    values,
                ])?;
                *next = seq + 1;
                out.push(Outcome::Stored(seq));
            }
            Item::DeadLetter(d) => {
                let keep = &d.payload[..d.payload.len().min(DEAD_LETTER_MAX_BYTES)];
                let cost = quota::dead_letter_cost(&d.topic, d.reason, &d.detail, keep);
                if !room
                    .quota
                    .reserve(tx, &mut room.space, cost, seqs, &mut room.evicted)?
                {
                    room.tally.rejected += 1;
                    out.push(Outcome::Rejected);
                    continue;
                }
                dead.execute(params![
                    d.topic,
                    d.reason,
                    d.detail,
                    keep,
                    i64::try_from(d.payload_len).unwrap_or(i64::MAX),
                    d.recv_ts_ms,
                    to_i64(*dead_seq),
                ])?;
                *dead_seq += 1;
                out.push(Outcome::DeadLettered);
            }
        }
    }
    Ok(out)
}

/// Predictions are always stored: they are small, derived from readings that
/// were stored, and the caller has no way to retry them. When no room can be
/// made they are stored over the quota (bounded: no new readings, hence no
/// new predictions, are stored until room is made) and reported in a warning.
fn append_predictions(
    tx: &rusqlite::Transaction<'_>,
    seqs: &mut HashMap<String, u64>,
    stream_seqs: &HashMap<(String, String), u64>,
    items: &[NewPrediction],
    room: &mut Room<'_>,
) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(items.len());
    let mut insert = tx.prepare_cached(
        "INSERT INTO predictions (model, seq, model_version, model_sha256, source, stream,
             window_end_seq, window_end_ts_ms, score, threshold, is_anomaly, created_ms,
             label, probabilities)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?;
    for p in items {
        let cost = quota::prediction_cost(p);
        if !room
            .quota
            .reserve(tx, &mut room.space, cost, stream_seqs, &mut room.evicted)?
        {
            Quota::charge(&mut room.space, cost);
            room.tally.stored_over_quota += 1;
        }
        let next = seqs.entry(p.model.clone()).or_insert(1);
        let seq = *next;
        insert.execute(params![
            p.model,
            to_i64(seq),
            p.model_version,
            p.model_sha256,
            p.source,
            p.stream,
            to_i64(p.window_end_seq),
            p.window_end_ts_ms,
            p.score,
            p.threshold,
            p.is_anomaly,
            p.created_ms,
            p.label,
            sync_protocol::probabilities_to_bytes(&p.probabilities),
        ])?;
        *next = seq + 1;
        out.push(seq);
    }
    Ok(out)
}
