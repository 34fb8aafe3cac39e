//! Owns the schema-migration loop that the dataset, drift, registry and
//! retrain databases share, on SQLite and on PostgreSQL: a
//! `<name>_migrations` table of applied versions; migration `i` takes the
//! schema from version `i` to `i + 1` and is applied and recorded in one
//! transaction; a schema newer than this build is refused, never touched.
//! (The batch store keeps its own `schema_migrations` loop.)

use rusqlite::{Connection, TransactionBehavior, params};

/// Why a schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A SQLite statement failed.
    #[error("{name} schema migration failed")]
    Sqlite {
        /// Which schema (`dataset`, `drift`, ...).
        name: &'static str,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A PostgreSQL statement failed.
    #[error("{name} schema migration failed")]
    Postgres {
        /// Which schema.
        name: &'static str,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The database holds migrations this build does not know.
    #[error("{name} schema version {found} is newer than this build ({supported})")]
    TooNew {
        /// Which schema.
        name: &'static str,
        /// Version found.
        found: i64,
        /// Newest known.
        supported: usize,
    },
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The index of the next migration to apply, or `TooNew`.
fn next(name: &'static str, found: i64, migrations: &[&str]) -> Result<usize, MigrateError> {
    usize::try_from(found)
        .ok()
        .filter(|v| *v <= migrations.len())
        .ok_or(MigrateError::TooNew {
            name,
            found,
            supported: migrations.len(),
        })
}

/// Applies `migrations` to `conn` (each in an immediate transaction, so two
/// processes opening one file cannot both apply one), tracked in
/// `<name>_migrations`.
///
/// # Errors
/// [`MigrateError::Sqlite`] or [`MigrateError::TooNew`]; migrations applied
/// before the failure stay applied.
pub(crate) fn sqlite(
    conn: &mut Connection,
    name: &'static str,
    migrations: &[&str],
) -> Result<(), MigrateError> {
    let err = |source| MigrateError::Sqlite { name, source };
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {name}_migrations (
                version    INTEGER PRIMARY KEY NOT NULL,
                applied_ms INTEGER NOT NULL
            ) STRICT"
        ))
        .map_err(err)?;
        let found: i64 = tx
            .query_row(
                &format!("SELECT COALESCE(MAX(version), 0) FROM {name}_migrations"),
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let Some(sql) = migrations.get(next(name, found, migrations)?) else {
            return tx.commit().map_err(err);
        };
        tx.execute_batch(sql).map_err(err)?;
        tx.execute(
            &format!("INSERT INTO {name}_migrations (version, applied_ms) VALUES (?1, ?2)"),
            params![found + 1, now_ms()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(version = found + 1, "applied {name} schema migration");
    }
}

/// Applies `migrations` through `client`, tracked in `<name>_migrations`;
/// every transaction first runs `lock` (an advisory-lock statement), so
/// several instances starting on one database apply each migration once.
///
/// # Errors
/// [`MigrateError::Postgres`] or [`MigrateError::TooNew`]; migrations
/// applied before the failure stay applied.
pub(crate) async fn postgres(
    client: &mut tokio_postgres::Client,
    name: &'static str,
    lock: &str,
    migrations: &[&str],
) -> Result<(), MigrateError> {
    let err = |source| MigrateError::Postgres { name, source };
    loop {
        let tx = client.transaction().await.map_err(err)?;
        tx.batch_execute(lock).await.map_err(err)?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {name}_migrations (
                version    BIGINT PRIMARY KEY,
                applied_ms BIGINT NOT NULL
            )"
        ))
        .await
        .map_err(err)?;
        let found: i64 = tx
            .query_one(
                &format!("SELECT COALESCE(MAX(version), 0)::int8 FROM {name}_migrations"),
                &[],
            )
            .await
            .map_err(err)?
            .try_get(0)
            .map_err(err)?;
        let Some(sql) = migrations.get(next(name, found, migrations)?) else {
            return tx.commit().await.map_err(err);
        };
        tx.batch_execute(sql).await.map_err(err)?;
        tx.execute(
            &format!("INSERT INTO {name}_migrations (version, applied_ms) VALUES ($1, $2)"),
            &[&(found + 1), &now_ms()],
        )
        .await
        .map_err(err)?;
        tx.commit().await.map_err(err)?;
        tracing::info!(
            version = found + 1,
            "applied {name} postgresql schema migration"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const V2: &[&str] = &[
        "CREATE TABLE a (x INTEGER) STRICT",
        "ALTER TABLE a ADD COLUMN y INTEGER",
    ];

    #[test]
    fn applies_each_migration_once_and_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = Connection::open(&path).unwrap();
        sqlite(&mut conn, "t", &V2[..1]).unwrap();
        sqlite(&mut conn, "t", V2).unwrap();
        // Idempotent: a second open applies nothing (ALTER would fail twice).
        sqlite(&mut conn, "t", V2).unwrap();
        conn.execute("INSERT INTO a (x, y) VALUES (1, 2)", [])
            .unwrap();
        let versions: i64 = conn
            .query_row("SELECT COUNT(*) FROM t_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(versions, 2);
        let older = sqlite(&mut conn, "t", &V2[..1]).unwrap_err();
        assert!(
            matches!(
                older,
                MigrateError::TooNew {
                    name: "t",
                    found: 2,
                    supported: 1
                }
            ),
            "{older:?}"
        );
        let broken = sqlite(&mut conn, "t", &[V2[0], V2[1], "NOT SQL"]).unwrap_err();
        assert!(matches!(broken, MigrateError::Sqlite { .. }), "{broken:?}");
    }
}
