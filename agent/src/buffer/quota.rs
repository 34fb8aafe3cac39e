//! Disk quota, eviction and the max-age sweep.
//!
//! Owns: measuring the bytes the buffer uses, keeping the WAL bounded,
//! choosing and deleting rows to make room, deleting rows older than
//! `max_age`, and the durable eviction counters (table `evictions`). It runs
//! inside the writer thread's transactions and never opens one itself, so an
//! eviction commits or rolls back together with the append that needed it.
//!
//! Accounting: `used = (page_count - freelist_count) * page_size + WAL size`.
//! Pages on the freelist are reused before the file grows, so they are free
//! space even though the file does not shrink. The WAL gets a fixed share of
//! the quota ([`Quota::wal_budget`]); rows may use the rest, or less when the
//! WAL is larger than its share (a reader blocking checkpoints).
//!
//! Invariants:
//! - every deleted row is counted once, in the transaction that deletes it,
//!   under `(kind, name, reason)`;
//! - for quota, rows are taken oldest first (by row id) from the first tier
//!   that has any: dead letters, synced readings, synced predictions,
//!   quarantined readings, quarantined predictions, unsynced readings of
//!   `drop_oldest` streams, unsynced predictions of `drop_oldest` streams. Unsynced rows of `reject_new` streams are never evicted for
//!   quota; the max-age sweep removes every row older than `max_age`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{Connection, params};

use super::Result;
use crate::config::{BufferSettings, FullPolicy};

/// Eviction reason: the quota was reached.
pub(super) const REASON_QUOTA: &str = "quota";
/// Eviction reason: the row was older than `max_age`.
pub(super) const REASON_MAX_AGE: &str = "max_age";
/// Name dead-letter evictions are counted under.
pub(super) const DEAD_LETTERS: &str = "dead_letters";
/// Prefix of the stats key prediction evictions are reported under.
pub(super) const MODEL_PREFIX: &str = "model:";

/// The WAL's share of the quota is `max_bytes / WAL_SHARE`, clamped.
const WAL_SHARE: u64 = 8;
const MIN_WAL_BUDGET: u64 = 64 << 10;
const MAX_WAL_BUDGET: u64 = 64 << 20;
/// SQLite's default auto-checkpoint threshold; larger budgets do not raise it.
const MAX_AUTOCHECKPOINT_PAGES: u64 = 1000;
/// How long a forced checkpoint waits for readers before giving up.
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// Estimated bytes a stored reading takes: the table cell, its index entries
/// (`(source, stream, seq)`, unsynced/synced, `recv_ts_ms`, and `ident` when
/// present) and slack for partly filled pages. Mirrors [`reading_cost`].
const READING_COST_SQL: &str = "((80 + 2 * (octet_length(source) + octet_length(stream))
    + octet_length(values_json)
    + coalesce(16 + octet_length(source) + octet_length(stream) + 2 * octet_length(ident), 0))
    * 9 / 8)";
/// Mirrors [`prediction_cost`].
const PREDICTION_COST_SQL: &str = "((112 + 2 * octet_length(model) + octet_length(model_version)
    + octet_length(model_sha256) + octet_length(source) + octet_length(stream)
    + coalesce(octet_length(label), 0) + coalesce(octet_length(probabilities), 0)) * 9 / 8)";
/// Mirrors [`dead_letter_cost`].
const DEAD_LETTER_COST_SQL: &str = "((64 + octet_length(topic) + octet_length(reason)
    + octet_length(detail) + length(payload)) * 9 / 8)";

fn len(s: &str) -> i64 {
    i64::try_from(s.len()).unwrap_or(i64::MAX)
}

/// Estimated bytes of a reading; see [`READING_COST_SQL`].
pub(super) fn reading_cost(
    source: &str,
    stream: &str,
    ident: Option<&str>,
    values_json: &str,
) -> i64 {
    let key = len(source) + len(stream);
    let ident = ident.map_or(0, |i| 16 + key + 2 * len(i));
    (80 + 2 * key + len(values_json) + ident) * 9 / 8
}

/// Estimated bytes of a prediction; see [`PREDICTION_COST_SQL`].
pub(super) fn prediction_cost(p: &super::NewPrediction) -> i64 {
    (112 + 2 * len(&p.model)
        + len(&p.model_version)
        + len(&p.model_sha256)
        + len(&p.source)
        + len(&p.stream)
        + p.label.as_deref().map_or(0, len)
        + i64::try_from(8 * p.probabilities.len()).unwrap_or(i64::MAX))
        * 9
        / 8
}

/// Estimated bytes of a dead letter; see [`DEAD_LETTER_COST_SQL`].
pub(super) fn dead_letter_cost(topic: &str, reason: &str, detail: &str, payload: &[u8]) -> i64 {
    let payload = i64::try_from(payload.len()).unwrap_or(i64::MAX);
    (64 + len(topic) + len(reason) + len(detail) + payload) * 9 / 8
}

/// What kind of row was evicted; stored in `evictions.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Kind {
    Reading,
    Prediction,
    DeadLetter,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Reading => "reading",
            Kind::Prediction => "prediction",
            Kind::DeadLetter => "dead_letter",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Kind::Reading => "readings",
            Kind::Prediction => "predictions",
            Kind::DeadLetter => "dead_letters",
        }
    }

    /// The `BufferStats::evicted` key for a row of this kind named `name`.
    fn stats_key(kind: &str, name: &str) -> String {
        match kind {
            "prediction" => format!("{MODEL_PREFIX}{name}"),
            "dead_letter" => DEAD_LETTERS.to_owned(),
            _ => name.to_owned(),
        }
    }
}

/// Evictions made in the current transaction; written by [`Evicted::write`]
/// before the commit.
#[derive(Debug, Default)]
pub(super) struct Evicted {
    counts: BTreeMap<(Kind, String, &'static str), u64>,
    /// Unsynced readings and predictions among them: data the cloud never got.
    pub(super) unsynced: u64,
}

impl Evicted {
    fn add(&mut self, kind: Kind, name: &str, reason: &'static str, n: u64) {
        if n > 0 {
            *self
                .counts
                .entry((kind, name.to_owned(), reason))
                .or_default() += n;
        }
    }

    /// Rows evicted in this transaction.
    pub(super) fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Adds the counts to the `evictions` table.
    pub(super) fn write(&self, conn: &Connection) -> Result<()> {
        let mut up = conn.prepare_cached(
            "INSERT INTO evictions (kind, name, reason, evicted) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (kind, name, reason) DO UPDATE SET evicted = evicted + excluded.evicted",
        )?;
        for ((kind, name, reason), n) in &self.counts {
            up.execute(params![
                kind.as_str(),
                name,
                reason,
                i64::try_from(*n).unwrap_or(i64::MAX)
            ])?;
        }
        Ok(())
    }
}

/// Every eviction counted so far, keyed `(stream, reason)`: readings under
/// their stream, predictions under `model:<name>`, dead letters under
/// `dead_letters`.
pub(super) fn load_evicted(conn: &Connection) -> Result<BTreeMap<(String, String), u64>> {
    let mut st = conn.prepare_cached("SELECT kind, name, reason, evicted FROM evictions")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (kind, name, reason, n) = row?;
        // A stream literally named `dead_letters` or `model:x` shares the key.
        *out.entry((Kind::stats_key(&kind, &name), reason))
            .or_default() += u64::try_from(n).unwrap_or(0);
    }
    Ok(out)
}

/// Room left for rows in the current transaction.
#[derive(Debug, Default)]
pub(super) struct Space {
    /// Bytes of live pages allowed: the quota minus the WAL's share.
    limit: i64,
    /// `limit` minus live bytes at the last measurement, minus the estimated
    /// cost of rows inserted since.
    room: i64,
}

/// Which rows are taken for quota, in order.
#[derive(Debug, Clone, Copy)]
enum Tier {
    DeadLetters,
    SyncedReadings,
    SyncedPredictions,
    QuarantinedReadings,
    QuarantinedPredictions,
    UnsyncedReadings,
    UnsyncedPredictions,
}

impl Tier {
    fn kind(self) -> Kind {
        match self {
            Tier::DeadLetters => Kind::DeadLetter,
            Tier::SyncedReadings | Tier::QuarantinedReadings | Tier::UnsyncedReadings => {
                Kind::Reading
            }
            Tier::SyncedPredictions | Tier::QuarantinedPredictions | Tier::UnsyncedPredictions => {
                Kind::Prediction
            }
        }
    }
}

const TIERS: [Tier; 7] = [
    Tier::DeadLetters,
    Tier::SyncedReadings,
    Tier::SyncedPredictions,
    Tier::QuarantinedReadings,
    Tier::QuarantinedPredictions,
    Tier::UnsyncedReadings,
    Tier::UnsyncedPredictions,
];

#[derive(Debug)]
struct Victim {
    id: i64,
    kind: Kind,
    name: String,
    cost: i64,
    unsynced: bool,
}

/// Quota settings and measurements for one database.
#[derive(Debug)]
pub(super) struct Quota {
    max_bytes: u64,
    wal_budget: u64,
    page_size: u64,
    wal_path: PathBuf,
    default_policy: FullPolicy,
    stream_policies: BTreeMap<String, FullPolicy>,
    /// JSON array of the streams whose policy differs from the default.
    exceptions_json: String,
    max_age: Option<Duration>,
}

impl Quota {
    /// Reads the page size and sets the WAL pragmas on `conn`.
    pub(super) fn new(conn: &Connection, settings: &BufferSettings) -> Result<Self> {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let page_size = u64::try_from(page_size).unwrap_or(4096).max(512);
        let wal_budget = (settings.max_bytes / WAL_SHARE).clamp(MIN_WAL_BUDGET, MAX_WAL_BUDGET);
        // Design: checkpoint at a quarter of the budget, so the WAL (which
        // only grows past the threshold by the frames of one transaction)
        // stays under the budget; a reset WAL is truncated to half of it.
        let autocheckpoint = (wal_budget / 4 / page_size).clamp(4, MAX_AUTOCHECKPOINT_PAGES);
        conn.pragma_update(None, "wal_autocheckpoint", to_i64(autocheckpoint))?;
        let _: i64 = conn.query_row(
            &format!("PRAGMA journal_size_limit = {}", wal_budget / 2),
            [],
            |r| r.get(0),
        )?;
        let mut wal_path = settings.path.as_os_str().to_owned();
        wal_path.push("-wal");
        let exceptions: Vec<&String> = settings
            .stream_policies
            .iter()
            .filter(|(_, p)| **p != settings.full_policy)
            .map(|(s, _)| s)
            .collect();
        Ok(Self {
            max_bytes: settings.max_bytes,
            wal_budget,
            page_size,
            wal_path: wal_path.into(),
            default_policy: settings.full_policy,
            stream_policies: settings.stream_policies.clone(),
            exceptions_json: serde_json::to_string(&exceptions)?,
            max_age: settings.max_age,
        })
    }

    /// The quota in bytes.
    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Whether a max-age sweep is configured.
    pub(super) fn max_age(&self) -> Option<Duration> {
        self.max_age
    }

    fn policy_for(&self, stream: &str) -> FullPolicy {
        self.stream_policies
            .get(stream)
            .copied()
            .unwrap_or(self.default_policy)
    }

    fn live_bytes(&self, conn: &Connection) -> Result<i64> {
        let pages: i64 = conn
            .prepare_cached("PRAGMA page_count")?
            .query_row([], |r| r.get(0))?;
        let free: i64 = conn
            .prepare_cached("PRAGMA freelist_count")?
            .query_row([], |r| r.get(0))?;
        Ok((pages - free).max(0).saturating_mul(to_i64(self.page_size)))
    }

    fn wal_bytes(&self) -> u64 {
        std::fs::metadata(&self.wal_path).map_or(0, |m| m.len())
    }

    /// Bytes in use: live pages of the database plus the WAL file.
    pub(super) fn bytes_used(&self, conn: &Connection) -> Result<u64> {
        let live = u64::try_from(self.live_bytes(conn)?).unwrap_or(0);
        Ok(live + self.wal_bytes())
    }

    /// Measures the room at the start of a transaction.
    pub(super) fn space(&self, conn: &Connection) -> Result<Space> {
        let wal = self.wal_bytes().max(self.wal_budget);
        let mut space = Space {
            limit: to_i64(self.max_bytes.saturating_sub(wal)),
            room: 0,
        };
        self.measure(conn, &mut space)?;
        Ok(space)
    }

    fn measure(&self, conn: &Connection, space: &mut Space) -> Result<()> {
        space.room = space.limit - self.live_bytes(conn)?;
        Ok(())
    }

    /// Makes room for a row of estimated `cost` bytes, evicting if needed.
    /// Returns `false` when no room can be made; nothing is then charged.
    /// `pairs` are the `(source, stream)` pairs that may hold readings.
    pub(super) fn reserve<V>(
        &self,
        conn: &Connection,
        space: &mut Space,
        cost: i64,
        pairs: &HashMap<(String, String), V>,
        evicted: &mut Evicted,
    ) -> Result<bool> {
        if space.room < cost {
            self.measure(conn, space)?;
            if space.room < cost {
                self.evict_until(conn, space, cost, pairs, evicted)?;
            }
        }
        if space.room < cost {
            return Ok(false);
        }
        space.room -= cost;
        Ok(true)
    }

    /// Charges a row stored although no room could be made for it.
    pub(super) fn charge(space: &mut Space, cost: i64) {
        space.room -= cost;
    }

    /// Evicts until the live pages fit the quota again; run after a group's
    /// inserts, whose cost estimates may have been low.
    pub(super) fn enforce<V>(
        &self,
        conn: &Connection,
        space: &mut Space,
        pairs: &HashMap<(String, String), V>,
        evicted: &mut Evicted,
    ) -> Result<bool> {
        self.measure(conn, space)?;
        if space.room < 0 {
            self.evict_until(conn, space, 0, pairs, evicted)?;
        }
        Ok(space.room >= 0)
    }

    fn evict_until<V>(
        &self,
        conn: &Connection,
        space: &mut Space,
        want: i64,
        pairs: &HashMap<(String, String), V>,
        evicted: &mut Evicted,
    ) -> Result<()> {
        let mut tiers = TIERS.iter();
        let mut tier = tiers.next();
        while space.room < want {
            let Some(t) = tier else { break };
            // Design: take at least a page's worth of rows per step; freeing
            // happens per page, and one step then serves several inserts.
            let chunk = (want - space.room).max(to_i64(self.page_size));
            let victims = self.victims(conn, *t, chunk, pairs)?;
            if victims.is_empty() {
                tier = tiers.next();
                continue;
            }
            let mut del =
                conn.prepare_cached(&format!("DELETE FROM {} WHERE id = ?1", t.kind().table()))?;
            for v in &victims {
                if del.execute([v.id])? == 1 {
                    evicted.add(v.kind, &v.name, REASON_QUOTA, 1);
                    if v.unsynced {
                        evicted.unsynced += 1;
                    }
                }
            }
            self.measure(conn, space)?;
        }
        Ok(())
    }

    /// The oldest rows of `tier` whose estimated cost adds up to `chunk`
    /// (fewer if the tier has less).
    fn victims<V>(
        &self,
        conn: &Connection,
        tier: Tier,
        chunk: i64,
        pairs: &HashMap<(String, String), V>,
    ) -> Result<Vec<Victim>> {
        let limit = (chunk / 64 + 1).min(1024);
        let mut found = Vec::new();
        let mut collect = |sql: &str, kind: Kind, unsynced: bool, args: &[&dyn rusqlite::ToSql]| {
            let mut st = conn.prepare_cached(sql)?;
            let rows = st.query_map(args, |r| {
                Ok(Victim {
                    id: r.get(0)?,
                    kind,
                    name: r.get(1)?,
                    cost: r.get(2)?,
                    unsynced,
                })
            })?;
            for row in rows {
                found.push(row?);
            }
            Ok::<_, super::BufferError>(())
        };
        match tier {
            Tier::DeadLetters => collect(
                &format!(
                    "SELECT id, '{DEAD_LETTERS}', {DEAD_LETTER_COST_SQL} FROM dead_letters
                     ORDER BY id LIMIT ?1"
                ),
                Kind::DeadLetter,
                false,
                &[&limit],
            )?,
            Tier::SyncedReadings => collect(
                &format!(
                    "SELECT id, stream, {READING_COST_SQL} FROM readings
                     WHERE synced = 1 ORDER BY id LIMIT ?1"
                ),
                Kind::Reading,
                false,
                &[&limit],
            )?,
            Tier::SyncedPredictions => collect(
                &format!(
                    "SELECT id, model, {PREDICTION_COST_SQL} FROM predictions
                     WHERE synced = 1 ORDER BY id LIMIT ?1"
                ),
                Kind::Prediction,
                false,
                &[&limit],
            )?,
            // Quarantined rows never reached the cloud: counted as unsynced.
            Tier::QuarantinedReadings => collect(
                &format!(
                    "SELECT id, stream, {READING_COST_SQL} FROM readings
                     WHERE synced = 2 ORDER BY id LIMIT ?1"
                ),
                Kind::Reading,
                true,
                &[&limit],
            )?,
            Tier::QuarantinedPredictions => collect(
                &format!(
                    "SELECT id, model, {PREDICTION_COST_SQL} FROM predictions
                     WHERE synced = 2 ORDER BY id LIMIT ?1"
                ),
                Kind::Prediction,
                true,
                &[&limit],
            )?,
            Tier::UnsyncedReadings => {
                // Design: one index range per drop_oldest (source, stream)
                // over the unique (source, stream, seq) index, merged by id,
                // instead of a scan of the unsynced index that would step
                // over every unsynced reject_new row on each eviction. This
                // tier is only reached once no synced reading is left.
                let sql = format!(
                    "SELECT id, stream, {READING_COST_SQL} FROM readings
                     WHERE source = ?1 AND stream = ?2 AND synced = 0 ORDER BY seq LIMIT ?3"
                );
                for (source, stream) in pairs.keys() {
                    if self.policy_for(stream) == FullPolicy::DropOldest {
                        collect(&sql, Kind::Reading, true, &[source, stream, &limit])?;
                    }
                }
                found.sort_by_key(|v| v.id);
            }
            Tier::UnsyncedPredictions => {
                let filter = match self.default_policy {
                    FullPolicy::DropOldest => "NOT IN",
                    FullPolicy::RejectNew => "IN",
                };
                collect(
                    &format!(
                        "SELECT id, model, {PREDICTION_COST_SQL} FROM predictions
                         WHERE synced = 0 AND stream {filter} (SELECT value FROM json_each(?1))
                         ORDER BY id LIMIT ?2"
                    ),
                    Kind::Prediction,
                    true,
                    &[&self.exceptions_json, &limit],
                )?;
            }
        }
        let mut sum = 0;
        let keep = found
            .iter()
            .take_while(|v| {
                let take = sum < chunk;
                sum += v.cost.max(1);
                take
            })
            .count();
        found.truncate(keep);
        Ok(found)
    }

    /// Deletes every row older than `max_age` (readings and dead letters by
    /// `recv_ts_ms`, predictions by `created_ms`), synced or not.
    pub(super) fn sweep(
        &self,
        conn: &Connection,
        now_ms: i64,
        evicted: &mut Evicted,
    ) -> Result<()> {
        let Some(age) = self.max_age else {
            return Ok(());
        };
        let cutoff = now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        for (kind, sql) in [
            (
                Kind::Reading,
                "DELETE FROM readings WHERE recv_ts_ms < ?1 RETURNING stream, synced = 1",
            ),
            (
                Kind::Prediction,
                "DELETE FROM predictions WHERE created_ms < ?1 RETURNING model, synced = 1",
            ),
            (
                Kind::DeadLetter,
                "DELETE FROM dead_letters WHERE recv_ts_ms < ?1 RETURNING 'dead_letters', 1",
            ),
        ] {
            let mut st = conn.prepare_cached(sql)?;
            let mut rows = st.query([cutoff])?;
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            while let Some(r) = rows.next()? {
                *counts.entry(r.get(0)?).or_default() += 1;
                if !r.get::<_, bool>(1)? {
                    evicted.unsynced += 1;
                }
            }
            for (name, n) in counts {
                evicted.add(kind, &name, REASON_MAX_AGE, n);
            }
        }
        Ok(())
    }

    /// Truncates the WAL when it outgrew its budget (a long transaction, or
    /// a reader that held back the automatic checkpoints). Returns whether
    /// the WAL is within budget afterwards.
    pub(super) fn after_commit(&self, conn: &Connection, busy_timeout: Duration) -> Result<bool> {
        if self.wal_bytes() <= self.wal_budget {
            return Ok(true);
        }
        conn.busy_timeout(CHECKPOINT_BUSY_TIMEOUT)?;
        let res = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        });
        conn.busy_timeout(busy_timeout)?;
        let blocked = res? != 0;
        Ok(!blocked && self.wal_bytes() <= self.wal_budget)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
