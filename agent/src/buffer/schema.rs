//! Buffer schema and its migrations, applied in order and recorded in
//! `PRAGMA user_version`. Documented in `docs/buffer-schema.md`; change both
//! together, and only ever append a migration.

use rusqlite::Connection;

/// Each entry moves the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // v1: readings, per-stream sequences, predictions, dead letters.
    r"
    CREATE TABLE streams (
        source   TEXT NOT NULL,
        stream   TEXT NOT NULL,
        next_seq INTEGER NOT NULL,
        PRIMARY KEY (source, stream)
    ) WITHOUT ROWID;

    CREATE TABLE readings (
        id           INTEGER PRIMARY KEY,
        source       TEXT NOT NULL,
        stream       TEXT NOT NULL,
        seq          INTEGER NOT NULL,
        ident        TEXT,
        device_ts_ms INTEGER,
        recv_ts_ms   INTEGER NOT NULL,
        clock_ok     INTEGER NOT NULL,
        values_json  TEXT NOT NULL,
        synced       INTEGER NOT NULL DEFAULT 0,
        UNIQUE (source, stream, seq)
    );
    CREATE UNIQUE INDEX readings_ident ON readings (source, stream, ident) WHERE ident IS NOT NULL;
    CREATE INDEX readings_unsynced ON readings (id) WHERE synced = 0;

    CREATE TABLE model_seqs (
        model    TEXT PRIMARY KEY,
        next_seq INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE predictions (
        id               INTEGER PRIMARY KEY,
        model            TEXT NOT NULL,
        seq              INTEGER NOT NULL,
        model_version    TEXT NOT NULL,
        model_sha256     TEXT NOT NULL,
        source           TEXT NOT NULL,
        stream           TEXT NOT NULL,
        window_end_seq   INTEGER NOT NULL,
        window_end_ts_ms INTEGER,
        score            REAL NOT NULL,
        threshold        REAL NOT NULL,
        is_anomaly       INTEGER NOT NULL,
        created_ms       INTEGER NOT NULL,
        synced           INTEGER NOT NULL DEFAULT 0,
        UNIQUE (model, seq)
    );
    CREATE INDEX predictions_unsynced ON predictions (id) WHERE synced = 0;

    CREATE TABLE dead_letters (
        id          INTEGER PRIMARY KEY,
        topic       TEXT NOT NULL,
        reason      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        payload     BLOB NOT NULL,
        payload_len INTEGER NOT NULL,
        recv_ts_ms  INTEGER NOT NULL
    );
    ",
    // v2: durable eviction counters; indexes for quota eviction (synced rows
    // oldest first) and for the max-age sweep.
    r"
    CREATE TABLE evictions (
        kind    TEXT NOT NULL,
        name    TEXT NOT NULL,
        reason  TEXT NOT NULL,
        evicted INTEGER NOT NULL,
        PRIMARY KEY (kind, name, reason)
    ) WITHOUT ROWID;

    CREATE INDEX readings_synced ON readings (id) WHERE synced = 1;
    CREATE INDEX predictions_synced ON predictions (id) WHERE synced = 1;
    CREATE INDEX readings_recv ON readings (recv_ts_ms);
    CREATE INDEX predictions_created ON predictions (created_ms);
    CREATE INDEX dead_letters_recv ON dead_letters (recv_ts_ms);
    ",
    // v3: cloud sync of dead letters and quarantine. `synced` becomes a
    // state: 0 unsynced, 1 synced, 2 quarantined (refused by the cloud with a
    // non-retriable 4xx; see table `quarantine`). Dead letters get a durable
    // per-device sequence (`sequences`), never reused even when their rowid is.
    r"
    ALTER TABLE readings ADD COLUMN quarantine_id INTEGER;
    ALTER TABLE predictions ADD COLUMN quarantine_id INTEGER;
    ALTER TABLE dead_letters ADD COLUMN seq INTEGER;
    ALTER TABLE dead_letters ADD COLUMN synced INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE dead_letters ADD COLUMN quarantine_id INTEGER;
    UPDATE dead_letters SET seq = id;
    CREATE UNIQUE INDEX dead_letters_seq ON dead_letters (seq);
    CREATE INDEX dead_letters_unsynced ON dead_letters (id) WHERE synced = 0;
    CREATE INDEX readings_quarantined ON readings (id) WHERE synced = 2;
    CREATE INDEX predictions_quarantined ON predictions (id) WHERE synced = 2;

    CREATE TABLE sequences (
        name     TEXT PRIMARY KEY,
        next_seq INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO sequences (name, next_seq)
        SELECT 'dead_letters', coalesce(max(id), 0) + 1 FROM dead_letters;

    CREATE TABLE quarantine (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        status         INTEGER NOT NULL,
        error          TEXT NOT NULL,
        quarantined_ms INTEGER NOT NULL,
        readings       INTEGER NOT NULL,
        predictions    INTEGER NOT NULL,
        dead_letters   INTEGER NOT NULL
    );
    ",
    // v4: what a classifier predicted. `label` is the class label (NULL for
    // anomaly scores); `probabilities` the per-class probabilities as
    // little-endian f64s, 8 bytes each (NULL when the model gives none;
    // `sync_protocol::probabilities_to_bytes`). Rows stored before v4 keep
    // NULL in both.
    r"
    ALTER TABLE predictions ADD COLUMN label TEXT;
    ALTER TABLE predictions ADD COLUMN probabilities BLOB;
    ",
];

/// Brings `conn` to the newest schema version.
///
/// # Errors
/// SQLite errors, or a database newer than this binary understands
/// (reported as `SQLITE_MISMATCH`-style error text).
pub(crate) fn migrate(conn: &mut Connection) -> Result<u32, MigrateError> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let target = u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX);
    if current > target {
        return Err(MigrateError::TooNew {
            found: current,
            supported: target,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
    }
    Ok(target)
}

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// SQLite failed.
    #[error("schema migration failed")]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer agent.
    #[error("database schema version {found} is newer than supported version {supported}")]
    TooNew {
        /// Version in the file.
        found: u32,
        /// Newest version this binary knows.
        supported: u32,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn migrates_once_and_is_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), 4);
        assert_eq!(migrate(&mut conn).unwrap(), 4);
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name != 'sqlite_sequence'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 8);
    }

    #[test]
    fn migrates_a_v1_database_keeping_rows() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO readings (source, stream, seq, recv_ts_ms, clock_ok, values_json)
             VALUES ('m', 's', 1, 5, 1, '{}')",
            [],
        )
        .unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), 4);
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM readings WHERE recv_ts_ms < 10",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
        let e: i64 = conn
            .query_row("SELECT count(*) FROM evictions", [], |r| r.get(0))
            .unwrap();
        assert_eq!(e, 0);
    }

    /// Dead letters stored before v3 keep their row id as sequence, and new
    /// ones continue above it even when the newest old row is gone.
    #[test]
    fn v3_numbers_existing_dead_letters() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        for id in [3, 7] {
            conn.execute(
                "INSERT INTO dead_letters (id, topic, reason, detail, payload, payload_len, recv_ts_ms)
                 VALUES (?1, 't', 'malformed', '', x'', 0, 1)",
                [id],
            )
            .unwrap();
        }
        assert_eq!(migrate(&mut conn).unwrap(), 4);
        let seqs: Vec<i64> = conn
            .prepare("SELECT seq FROM dead_letters WHERE synced = 0 ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(seqs, vec![3, 7]);
        let next: i64 = conn
            .query_row(
                "SELECT next_seq FROM sequences WHERE name = 'dead_letters'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(next, 8);
    }

    /// Predictions stored before v4 read back with no label.
    #[test]
    fn v4_keeps_old_predictions_without_labels() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute(
            "INSERT INTO predictions (model, seq, model_version, model_sha256, source, stream,
                 window_end_seq, score, threshold, is_anomaly, created_ms)
             VALUES ('m', 1, '1', 'x', 's', 't', 1, 0.5, 1.0, 0, 1)",
            [],
        )
        .unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), 4);
        let (label, probabilities): (Option<String>, Option<Vec<u8>>) = conn
            .query_row("SELECT label, probabilities FROM predictions", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((label, probabilities), (None, None));
    }

    #[test]
    fn refuses_newer_schema() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(MigrateError::TooNew { found: 99, .. })
        ));
    }
}
