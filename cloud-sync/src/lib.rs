//! Cloud endpoint for edge agents: authenticated, exactly-once batch ingest.
//!
//! Crate map:
//! - [`config`]: TOML [`Config`] → validated [`Settings`], including which
//!   database ([`StorageSettings`]: a SQLite file, or PostgreSQL when
//!   `database_url` is set); the embedded example config.
//! - [`store`]: the only module touching a database. [`Store`] is one
//!   cloneable handle over two backends: SQLite (one worker thread, one
//!   process per file) and PostgreSQL (a small connection pool; several
//!   instances may share one database). Either way a batch is stored in one
//!   transaction, deduplicated on `(device, source, stream, seq)` /
//!   `(device, model, seq)` by the database's primary keys.
//!   Also dead letters (exactly once on `(device, seq)`), heartbeats (a time
//!   series), operators, and keyset-paginated reads.
//! - [`auth`]: who a request comes from (device or operator token, device
//!   client certificate) and what it may do.
//! - [`api`]: the axum router ([`app`]), request decoding (JSON or the
//!   compact codec, optionally zstd) and error responses.
//! - [`openapi`]: the OpenAPI 3.1 document served at `/openapi.json`.
//! - [`registry`]: the model registry: signed, content-addressed model
//!   versions with stages per device group, and its API handlers.
//! - [`drift`]: devices' drift summaries (stored once per device, model
//!   and window), the fleet view per model and fleet alerts.
//! - [`retrain`]: training runs, the retrain job queue and its worker,
//!   registration of retrained packages (`edge_retrain` trains).
//! - [`dataset`]: versioned datasets: snapshots of readings and predictions
//!   as Parquet files with a manifest in a content-addressed store (local
//!   directory or S3), the `datasets` table, readers and API handlers.
//! - [`migrate`]: the schema-migration loop the registry, drift, retrain
//!   and dataset databases share (SQLite and PostgreSQL).
//! - [`tls`]: HTTPS with rustls, client certificates, the TLS accept loop.
//! - [`metrics`]: API counters and the Prometheus `/metrics` listener
//!   (`metrics_listen_addr`, separate from the API).
//! - this file: [`start`] / [`Server`] for in-process use (tests, demos) and
//!   [`serve`] for the binary.
//!
//! Wire types come from [`sync_protocol`] and are used unchanged.

pub mod api;
pub mod auth;
pub mod config;
pub mod dataset;
pub mod drift;
pub mod metrics;
pub mod migrate;
pub mod openapi;
pub mod registry;
pub mod retrain;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use api::{ApiError, AppState, app};
pub use config::{Config, ConfigError, PostgresSettings, Settings, StorageSettings, TlsSettings};
pub use dataset::{DatasetError, Datasets};
pub use registry::{Registry, RegistryError};
pub use store::{Store, StoreError};
pub use sync_protocol;

/// Extra time, beyond `request_timeout`, that shutdown waits for requests in flight.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be opened.
    #[error("cannot open store")]
    Store(#[from] StoreError),
    /// The model registry (its tables or artifact directory) could not be opened.
    #[error("cannot open model registry")]
    Registry(#[from] RegistryError),
    /// The drift tables could not be opened.
    #[error("cannot open drift storage")]
    Drift(#[from] drift::DriftError),
    /// The retrainer's tables could not be opened.
    #[error("cannot open the retrainer")]
    Retrain(#[source] Box<retrain::RetrainError>),
    /// The dataset store (its table or object store) could not be opened.
    #[error("cannot open dataset store")]
    Datasets(#[from] DatasetError),
    /// The listen address could not be bound.
    #[error("cannot bind listen_addr {addr}")]
    Bind {
        /// Address from `listen_addr`.
        addr: SocketAddr,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// `metrics_listen_addr` could not be bound.
    #[error("cannot bind metrics_listen_addr {addr}")]
    MetricsBind {
        /// Address from `metrics_listen_addr`.
        addr: SocketAddr,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bound socket has no local address.
    #[error("cannot read the bound address")]
    LocalAddr(#[source] std::io::Error),
    /// The accept loop failed.
    #[error("server failed")]
    Serve(#[source] std::io::Error),
    /// The server task panicked.
    #[error("server task panicked")]
    Panicked(#[source] tokio::task::JoinError),
}

/// A running server (see [`start`]).
#[derive(Debug)]
pub struct Server {
    /// The address actually bound (resolves port 0).
    pub addr: SocketAddr,
    /// The `/metrics` listener's address, when `metrics_listen_addr` is set.
    pub metrics_addr: Option<SocketAddr>,
    store: Store,
    task: JoinHandle<std::io::Result<()>>,
    metrics: Option<(CancellationToken, JoinHandle<std::io::Result<()>>)>,
    shutdown: CancellationToken,
    drain_timeout: Duration,
}

/// Opens the store, binds `settings.listen_addr` (port 0 allowed), spawns the
/// server on the current tokio runtime and returns once listening.
///
/// The server stops accepting when `shutdown` is cancelled and finishes the
/// requests in flight; await [`Server::join`] for that.
///
/// # Errors
/// [`ServeError::Store`] if the database cannot be opened, [`ServeError::Bind`]
/// if the address cannot be bound.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> Result<Server, ServeError> {
    let store = Store::connect(&settings.storage).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen_addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let registry = Registry::open(&settings.registry, &settings.storage).await?;
    let datasets = Datasets::open(&settings.datasets, &settings.storage).await?;
    let retrainer = retrain::Retrainer::open(&settings, registry.clone())
        .await
        .map_err(|err| ServeError::Retrain(Box::new(err)))?
        .with_datasets(datasets.clone());
    if settings.retrain.worker {
        // Design: the worker is not drained at shutdown; a job it was
        // running is marked failed at the next start (docs/retraining.md).
        tokio::spawn(retrainer.clone().work(shutdown.clone()));
    }
    let drift = drift::Drift::open(&settings.storage, settings.drift.clone()).await?;
    let state = AppState::new(store.clone(), &settings)
        .with_registry(registry)
        .with_drift(drift)
        .with_retrainer(retrainer)
        .with_datasets(datasets);
    let (metrics_addr, metrics_listener) = match settings.metrics_listen_addr {
        Some(addr) => {
            let bind_err = |source| ServeError::MetricsBind { addr, source };
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_err)?;
            let bound = listener.local_addr().map_err(bind_err)?;
            let metrics_state = metrics::MetricsState {
                metrics: state.metrics().clone(),
                store: store.clone(),
            };
            let stop = shutdown.child_token();
            let task = tokio::spawn(metrics::serve(listener, metrics_state, stop.clone()));
            (Some(bound), Some((stop, task)))
        }
        None => (None, None),
    };
    let router = app(state);
    let task = match &settings.tls {
        None => {
            let signal = shutdown.clone().cancelled_owned();
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(signal)
                    .await
            })
        }
        Some(tls) => tokio::spawn(tls::serve(
            listener,
            router,
            tls.server_config.0.clone(),
            shutdown.clone(),
        )),
    };
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let client_certificates = settings
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_ca_file.is_some());
    tracing::info!(%addr, scheme, client_certificates, database = %settings.storage, "cloud-sync listening");
    Ok(Server {
        addr,
        metrics_addr,
        store,
        task,
        metrics: metrics_listener,
        shutdown,
        drain_timeout: settings.request_timeout + DRAIN_GRACE,
    })
}

impl Server {
    /// The store the server writes to (for inspection in tests and demos).
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits until the server has stopped: after the shutdown token is
    /// cancelled and requests in flight finished, or were aborted once
    /// `request_timeout` plus a grace period had passed (logged at WARN).
    ///
    /// The store stays open while any [`Store`] handle lives.
    ///
    /// # Errors
    /// [`ServeError::Serve`] if the server failed, [`ServeError::Panicked`] if
    /// its task panicked.
    pub async fn join(self) -> Result<(), ServeError> {
        let Server {
            addr,
            mut task,
            metrics,
            shutdown,
            drain_timeout,
            ..
        } = self;

        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain_timeout).await;
        };
        let result = tokio::select! {
            joined = &mut task => match joined {
                Err(e) => Err(ServeError::Panicked(e)),
                Ok(Err(e)) => Err(ServeError::Serve(e)),
                Ok(Ok(())) => {
                    tracing::info!(%addr, "cloud-sync stopped");
                    Ok(())
                }
            },
            () = deadline => {
                task.abort();
                tracing::warn!(%addr, ?drain_timeout, "requests still in flight at shutdown deadline; aborted");
                Ok(())
            }
        };
        // The metrics listener goes with the API, whichever way it stopped.
        if let Some((stop, mut metrics_task)) = metrics {
            stop.cancel();
            match tokio::time::timeout(DRAIN_GRACE, &mut metrics_task).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "metrics listener failed"),
                Ok(_) => {}
                Err(_) => metrics_task.abort(),
            }
        }
        result
    }
}

/// Runs the server until `shutdown` is cancelled, then drains and closes the store.
///
/// # Errors
/// As [`start`] and [`Server::join`]; [`ServeError::Store`] if the database
/// cannot be closed cleanly.
pub async fn serve(settings: Settings, shutdown: CancellationToken) -> Result<(), ServeError> {
    let server = start(settings, shutdown).await?;
    let store = server.store().clone();
    server.join().await?;
    store.close().await?;
    Ok(())
}
