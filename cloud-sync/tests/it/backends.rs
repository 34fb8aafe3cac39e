//! Test databases: a SQLite file in a temp dir, and a fresh schema in the
//! PostgreSQL database named by `EDGE_TEST_POSTGRES` (dropped afterwards), so
//! parallel tests and reruns never see each other's rows.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use cloud_sync::{PostgresSettings, Store};
use tokio_postgres::{Client, NoTls};

/// Names the PostgreSQL database for the gated tests (a `postgres://` URL).
pub const POSTGRES_ENV: &str = "EDGE_TEST_POSTGRES";

/// The base PostgreSQL config, or `None` after printing that `test` skips it.
pub fn postgres_config(test: &str) -> Result<Option<tokio_postgres::Config>> {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) => {
            Ok(Some(url.parse().with_context(|| {
                format!("{POSTGRES_ENV} is not a PostgreSQL URL")
            })?))
        }
        Err(_) => {
            println!("{test}: PostgreSQL skipped ({POSTGRES_ENV} is unset)");
            Ok(None)
        }
    }
}

/// Connects and drives the connection on the current runtime.
pub async fn pg_connect(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("test postgresql connection failed: {err}");
        }
    });
    Ok(client)
}

/// A schema of its own in the test database; dropped with everything in it
/// when this value is dropped.
pub struct PgSchema {
    base: tokio_postgres::Config,
    pub name: String,
}

impl PgSchema {
    /// A fresh schema, or `None` (after printing "skipped") when
    /// `EDGE_TEST_POSTGRES` is unset.
    pub async fn create(test: &str) -> Result<Option<PgSchema>> {
        let Some(base) = postgres_config(test)? else {
            return Ok(None);
        };
        let name = format!("cloud_sync_t_{:016x}", rand::random::<u64>());
        pg_connect(&base)
            .await
            .with_context(|| format!("{POSTGRES_ENV}: cannot connect"))?
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await?;
        Ok(Some(PgSchema { base, name }))
    }

    /// Connection config whose `search_path` is this schema; its sessions
    /// carry the schema's name as `application_name`.
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = self.base.clone();
        config
            .options(format!("-c search_path={}", self.name))
            .application_name(&self.name);
        config
    }

    pub fn settings(&self) -> PostgresSettings {
        PostgresSettings {
            config: self.config(),
            max_connections: 8,
        }
    }

    /// A direct connection for inspecting the tables.
    pub async fn client(&self) -> Result<Client> {
        pg_connect(&self.config()).await
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let base = self.base.clone();
        let name = self.name.clone();
        // Drop cannot await: run the cleanup on a runtime of its own.
        let dropped = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = pg_connect(&base).await?;
                // Sessions left open by the test (their tasks may never run
                // again once its runtime stops) could hold locks on the schema.
                client
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await?;
                client
                    .batch_execute(&format!(
                        "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {name} CASCADE"
                    ))
                    .await?;
                Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("cannot drop test schema {}: {dropped:?}", self.name);
        }
    }
}

/// Where a [`TestStore`] keeps its data.
pub enum Backend {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres(Box<PgSchema>),
}

/// A reading as stored, for comparing rows directly.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    pub source: String,
    pub stream: String,
    pub seq: i64,
    pub values: serde_json::Value,
    pub stored_ms: i64,
}

/// An open store and the database behind it. Field order matters: the store
/// closes before its database is removed.
pub struct TestStore {
    pub store: Store,
    pub backend: Backend,
}

/// A store on SQLite, plus one on PostgreSQL when `EDGE_TEST_POSTGRES` is set.
pub async fn each_backend(test: &str) -> Result<Vec<TestStore>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cloud.db");
    let mut stores = vec![TestStore {
        store: Store::open(&path).await?,
        backend: Backend::Sqlite { _dir: dir, path },
    }];
    if let Some(schema) = PgSchema::create(test).await? {
        stores.push(TestStore {
            store: Store::open_postgres(&schema.settings()).await?,
            backend: Backend::Postgres(Box::new(schema)),
        });
    }
    Ok(stores)
}

impl TestStore {
    pub fn name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// A second, independent handle on the same database.
    pub async fn reopen(&self) -> Result<Store> {
        Ok(match &self.backend {
            Backend::Sqlite { path, .. } => Store::open(path).await?,
            Backend::Postgres(schema) => Store::open_postgres(&schema.settings()).await?,
        })
    }

    /// Every stored reading, in key order.
    pub async fn readings(&self) -> Result<Vec<StoredReading>> {
        let mut rows = Vec::new();
        match &self.backend {
            Backend::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path)?;
                let mut stmt = conn.prepare(
                    "SELECT source, stream, seq, values_json, stored_ms FROM readings
                     ORDER BY source, stream, seq",
                )?;
                let mut query = stmt.query([])?;
                while let Some(row) = query.next()? {
                    let values: String = row.get(3)?;
                    rows.push(StoredReading {
                        source: row.get(0)?,
                        stream: row.get(1)?,
                        seq: row.get(2)?,
                        values: serde_json::from_str(&values)?,
                        stored_ms: row.get(4)?,
                    });
                }
            }
            Backend::Postgres(schema) => {
                let client = schema.client().await?;
                let query = "SELECT source, stream, seq, values_json::text, stored_ms
                     FROM readings ORDER BY source COLLATE \"C\", stream COLLATE \"C\", seq";
                for row in client.query(query, &[]).await? {
                    let values: String = row.try_get(3)?;
                    rows.push(StoredReading {
                        source: row.try_get(0)?,
                        stream: row.try_get(1)?,
                        seq: row.try_get(2)?,
                        values: serde_json::from_str(&values)?,
                        stored_ms: row.try_get(4)?,
                    });
                }
            }
        }
        Ok(rows)
    }

    /// `operators.token_sha256` of `name`.
    pub async fn stored_operator_digest(&self, name: &str) -> Result<String> {
        let query = "SELECT token_sha256 FROM operators WHERE name = $1";
        Ok(match &self.backend {
            Backend::Sqlite { path, .. } => {
                rusqlite::Connection::open(path)?.query_row(query, [name], |r| r.get(0))?
            }
            Backend::Postgres(schema) => schema
                .client()
                .await?
                .query_one(query, &[&name])
                .await?
                .try_get(0)?,
        })
    }

    /// `devices.token_sha256` of `device`.
    pub async fn stored_token_digest(&self, device: &str) -> Result<String> {
        let query = "SELECT token_sha256 FROM devices WHERE id = $1";
        Ok(match &self.backend {
            Backend::Sqlite { path, .. } => {
                rusqlite::Connection::open(path)?.query_row(query, [device], |r| r.get(0))?
            }
            Backend::Postgres(schema) => schema
                .client()
                .await?
                .query_one(query, &[&device])
                .await?
                .try_get(0)?,
        })
    }
}
