//! The `/metrics` HTTP listener: plain HTTP/1.1 on its own socket, apart
//! from MQTT and sync.
//!
//! Owns the listening socket. `GET /metrics` (and `HEAD`) answers the text
//! format; any other path is 404, another method on `/metrics` 405.
//! Invariant: a scrape only reads ([`super::scrape`]); it cannot slow ingest
//! beyond one queued buffer query.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::Sources;
use crate::config::MetricsSettings;

/// Path of the endpoint.
pub const METRICS_PATH: &str = "/metrics";

/// Why the endpoint could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics.listen` could not be bound.
    #[error("cannot bind metrics.listen {addr}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The accept loop failed.
    #[error("metrics listener failed")]
    Serve(#[source] std::io::Error),
}

/// Result alias for this module.
pub type Result<T, E = MetricsError> = std::result::Result<T, E>;

/// A bound, not yet serving, metrics endpoint.
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
    sources: Arc<Sources>,
}

impl MetricsServer {
    /// Binds `settings.listen` (port 0 picks a free port).
    ///
    /// # Errors
    /// [`MetricsError::Bind`] when the address cannot be bound.
    pub async fn bind(settings: &MetricsSettings, sources: Sources) -> Result<Self> {
        let bind_err = |source| MetricsError::Bind {
            addr: settings.listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Self {
            listener,
            addr,
            sources: Arc::new(sources),
        })
    }

    /// The address actually bound.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`, then lets requests in flight finish.
    ///
    /// # Errors
    /// [`MetricsError::Serve`] when the accept loop fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        tracing::info!(addr = %self.addr, "metrics endpoint listening");
        axum::serve(self.listener, router(self.sources))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(MetricsError::Serve)?;
        tracing::info!("metrics endpoint stopped");
        Ok(())
    }
}

/// Binds `settings.listen` and serves until `shutdown`. Never fails: a
/// port that cannot be bound, or a listener that fails, is logged at ERROR
/// and costs the endpoint, never the data path.
pub async fn serve(settings: MetricsSettings, sources: Sources, shutdown: CancellationToken) {
    let result = match MetricsServer::bind(&settings, sources).await {
        Ok(server) => server.run(shutdown).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        let mut msg = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            cause = c.source();
        }
        tracing::error!(error = %msg, "metrics endpoint not available; the agent runs without it");
    }
}

/// The endpoint's routes (exposed for `oneshot` tests).
pub fn router(sources: Arc<Sources>) -> Router {
    Router::new()
        .route(METRICS_PATH, get(metrics))
        .fallback(not_found)
        .with_state(sources)
}

async fn metrics(State(sources): State<Arc<Sources>>) -> impl IntoResponse {
    let body = super::scrape(&sources).await;
    ([(CONTENT_TYPE, super::text::CONTENT_TYPE)], body)
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found; try GET /metrics\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    fn app() -> Router {
        router(Arc::new(Sources {
            counters: Arc::default(),
            inference: Arc::default(),
            models: Arc::default(),
            buffer: None,
            drift: Arc::default(),
            started_ms: 0,
        }))
    }

    async fn status_of(method: &str, path: &str) -> (StatusCode, Option<String>) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let response = app().oneshot(request).await.unwrap();
        let ct = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        (response.status(), ct)
    }

    #[tokio::test]
    async fn metrics_is_text_format_and_nothing_else_is_served() {
        let (status, ct) = status_of("GET", "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ct.unwrap().starts_with("text/plain; version=0.0.4"));
        assert_eq!(status_of("GET", "/").await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            status_of("GET", "/metrics/x").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status_of("POST", "/metrics").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
