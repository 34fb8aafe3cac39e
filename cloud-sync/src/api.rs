//! HTTP API: the axum [`Router`] built by [`app`], its handlers, and the
//! mapping of every failure to a JSON [`ErrorBody`] with the right status.
//!
//! Owns request decoding (content type and encoding, size caps, JSON or the
//! compact codec), query strings and status codes; storage semantics belong
//! to [`crate::store`], credential checks to [`crate::auth`], the OpenAPI
//! document to [`crate::openapi`]. Invariants: no input can make a handler
//! panic; a body is only read after the device is authenticated; a zstd
//! body is never decompressed past `max_body_bytes` (+1 byte to detect the
//! overflow); every route served is listed by [`routes`], which the OpenAPI
//! test compares with the document.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRef, FromRequest, Query, Request, State};
use axum::http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use sync_protocol::codec::{self, CodecError};
use sync_protocol::{
    DeadLettersPage, DeviceSummary, ErrorBody, FLEET_PATH, FleetSummary, Heartbeat, HeartbeatAck,
    HeartbeatsPage, JSON_MEDIA_TYPE, OPENAPI_PATH, PredictionsPage, ReadQuery, ReadingsPage,
    UploadAck, UploadBatch, ZSTD_ENCODING,
};

use crate::auth::{AuthError, DeviceAuth, OperatorAuth, ReadAuth};
use crate::config::Settings;
use crate::dataset::Datasets;
use crate::metrics::{ErrorCode, Metrics};
use crate::registry::Registry;
use crate::store::{BatchError, QueryError, Store, StoreError};

/// `Accept-Post` sent with a 415 on the batch endpoint.
const BATCH_MEDIA_TYPES: &str = "application/json, application/vnd.edge-batch.v3, \
     application/vnd.edge-batch.v2, application/vnd.edge-batch.v1";

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    store: Store,
    max_body_bytes: usize,
    request_timeout: Duration,
    registry: Option<Registry>,
    metrics: Arc<Metrics>,
    drift: Option<crate::drift::Drift>,
    retrainer: Option<crate::retrain::Retrainer>,
    datasets: Option<Datasets>,
}

impl AppState {
    /// State serving `store` with the limits from `settings`.
    #[must_use]
    pub fn new(store: Store, settings: &Settings) -> Self {
        Self {
            store,
            max_body_bytes: settings.max_body_bytes,
            request_timeout: settings.request_timeout,
            registry: None,
            metrics: Arc::default(),
            drift: None,
            retrainer: None,
            datasets: None,
        }
    }

    /// The counters [`app`] bumps (served by [`crate::metrics`]).
    #[must_use]
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The same state serving the drift routes from `drift` (without it
    /// they answer 503 `drift_unavailable`).
    #[must_use]
    pub fn with_drift(mut self, drift: crate::drift::Drift) -> Self {
        self.drift = Some(drift);
        self
    }

    /// Drift storage, when the state has it.
    #[must_use]
    pub fn drift(&self) -> Option<&crate::drift::Drift> {
        self.drift.as_ref()
    }

    /// The same state serving the retrain routes from `retrainer` (without
    /// it they answer 503 `retrain_unavailable`).
    #[must_use]
    pub fn with_retrainer(mut self, retrainer: crate::retrain::Retrainer) -> Self {
        self.retrainer = Some(retrainer);
        self
    }

    /// The retrainer, when the state has one.
    #[must_use]
    pub fn retrainer(&self) -> Option<&crate::retrain::Retrainer> {
        self.retrainer.as_ref()
    }

    /// The same state serving the dataset routes from `datasets` (without
    /// it they answer 503 `datasets_unavailable`).
    #[must_use]
    pub fn with_datasets(mut self, datasets: Datasets) -> Self {
        self.datasets = Some(datasets);
        self
    }

    /// The datasets, when the state has them.
    #[must_use]
    pub fn datasets(&self) -> Option<&Datasets> {
        self.datasets.as_ref()
    }

    /// The same state serving the model registry's routes from `registry`
    /// (without it they answer 503 `registry_unavailable`).
    #[must_use]
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The model registry, when the state has one.
    #[must_use]
    pub fn registry(&self) -> Option<&Registry> {
        self.registry.as_ref()
    }

    /// The store handle.
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl FromRef<AppState> for Store {
    fn from_ref(state: &AppState) -> Store {
        state.store.clone()
    }
}

/// Every way a request can fail; each maps to one status and error code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Authentication or authorization failed (401 or 403).
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The path parameters could not be decoded (400).
    #[error("invalid path")]
    BadPath(#[source] PathRejection),
    /// The request body could not be read (400), e.g. the client hung up.
    #[error("cannot read request body")]
    BadBody(#[source] BytesRejection),
    /// The body is not valid JSON of the expected type (400).
    #[error("body is not valid JSON for this endpoint")]
    MalformedJson(#[source] serde_json::Error),
    /// The body is not a valid compact batch (400).
    #[error("body is not a valid compact batch")]
    MalformedBatch(#[source] CodecError),
    /// A `Content-Type` this endpoint does not take (415).
    #[error("unsupported content type {content_type:?}; use {accepted}")]
    UnsupportedMediaType {
        /// The header value as received (lossy).
        content_type: String,
        /// The media types the endpoint accepts.
        accepted: &'static str,
    },
    /// The query string does not parse (unknown parameter, wrong type) (400).
    #[error("invalid query string")]
    BadQuery(#[source] QueryRejection),
    /// The query parsed but is not acceptable (limit, range, filter, cursor) (400).
    #[error("invalid query")]
    InvalidQuery(#[source] QueryError),
    /// The path names no registered device (404; operators only, since a
    /// device can only name itself).
    #[error("unknown device {id:?}")]
    UnknownDevice {
        /// The device id from the path.
        id: String,
    },
    /// The body is not valid zstd (400).
    #[error("body is not valid zstd")]
    BadCompression(#[source] std::io::Error),
    /// The batch parsed but failed validation (400); nothing was stored.
    #[error("invalid batch")]
    InvalidBatch(#[source] BatchError),
    /// The raw or decompressed body is larger than `max_body_bytes` (413).
    #[error("request body exceeds {limit} bytes")]
    PayloadTooLarge {
        /// The configured cap.
        limit: usize,
    },
    /// A `Content-Encoding` other than `zstd` or `identity` (415).
    #[error("unsupported content encoding {encoding:?}; use zstd or none")]
    UnsupportedEncoding {
        /// The header value as received (lossy).
        encoding: String,
    },
    /// The request did not complete within `request_timeout_secs` (408).
    #[error("request not completed within {} s", timeout.as_secs())]
    Timeout {
        /// The configured limit.
        timeout: Duration,
    },
    /// No route matches the path (404).
    #[error("no such endpoint")]
    NotFound,
    /// The route exists but not for this method (405).
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// The store answered with an error or is unreachable (500).
    #[error("storage failure")]
    Store(#[source] StoreError),
    /// The store does not answer a trivial query (503).
    #[error("store not ready")]
    NotReady(#[source] StoreError),
    /// A decoding task panicked or was cancelled (500).
    #[error("decoding task failed")]
    TaskFailed(#[source] tokio::task::JoinError),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::InvalidBatch(err) => ApiError::InvalidBatch(err),
            // The device was revoked (or removed) between authentication and storage.
            StoreError::UnknownDevice { .. } | StoreError::DeviceRevoked { .. } => {
                ApiError::Auth(AuthError::InvalidToken)
            }
            other => ApiError::Store(other),
        }
    }
}

impl ApiError {
    /// HTTP status and stable machine-readable code.
    #[must_use]
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Auth(AuthError::MissingHeader) => (StatusCode::UNAUTHORIZED, "missing_token"),
            ApiError::Auth(AuthError::MalformedHeader) => {
                (StatusCode::UNAUTHORIZED, "malformed_token")
            }
            ApiError::Auth(AuthError::InvalidToken) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            ApiError::Auth(AuthError::InvalidCertificate { .. }) => {
                (StatusCode::UNAUTHORIZED, "invalid_certificate")
            }
            ApiError::Auth(
                AuthError::WrongDevice { .. }
                | AuthError::OperatorCannotUpload { .. }
                | AuthError::NotAnOperator { .. },
            ) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Auth(AuthError::Store(_)) | ApiError::Store(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage_error")
            }
            ApiError::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path"),
            ApiError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_body"),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::MalformedBatch(_) => (StatusCode::BAD_REQUEST, "malformed_batch"),
            ApiError::UnsupportedMediaType { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::BadQuery(_) | ApiError::InvalidQuery(_) => {
                (StatusCode::BAD_REQUEST, "bad_query")
            }
            ApiError::UnknownDevice { .. } => (StatusCode::NOT_FOUND, "unknown_device"),
            ApiError::BadCompression(_) => (StatusCode::BAD_REQUEST, "bad_compression"),
            ApiError::InvalidBatch(_) => (StatusCode::BAD_REQUEST, "invalid_batch"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UnsupportedEncoding { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_encoding")
            }
            ApiError::Timeout { .. } => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            ApiError::TaskFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    /// The message sent to the client: the error chain, except for server-side
    /// failures whose details stay in the log.
    fn client_message(&self) -> String {
        match self {
            ApiError::Auth(AuthError::Store(_))
            | ApiError::Store(_)
            | ApiError::NotReady(_)
            | ApiError::TaskFailed(_) => self.to_string(),
            _ => error_chain(self),
        }
    }
}

/// `err: source: source...`, one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(code, error = %error_chain(&self), "request failed");
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(code, error = %error_chain(&self), "request failed");
        } else if status == StatusCode::FORBIDDEN {
            tracing::warn!(code, error = %error_chain(&self), "request refused");
        } else {
            tracing::debug!(code, error = %error_chain(&self), "request refused");
        }
        let body = ErrorBody {
            code: code.to_owned(),
            message: self.client_message(),
        };
        let accept_post = match &self {
            ApiError::UnsupportedMediaType { accepted, .. } => Some(*accepted),
            _ => None,
        };
        let mut response = (status, Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(code));
        let headers = response.headers_mut();
        match status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(ZSTD_ENCODING));
                if let Some(accepted) = accept_post {
                    headers.insert(
                        HeaderName::from_static("accept-post"),
                        HeaderValue::from_static(accepted),
                    );
                }
            }
            _ => {}
        }
        response
    }
}

/// Every route the API serves: method, path template (as in the OpenAPI
/// document, `{device}` for the path parameter) and handler. [`app`] serves
/// exactly these.
fn route_table() -> Vec<(Method, String, MethodRouter<AppState>)> {
    let device = "{device}";
    vec![
        (
            Method::POST,
            sync_protocol::batch_path(device),
            post(upload_batch),
        ),
        (
            Method::POST,
            sync_protocol::heartbeat_path(device),
            post(upload_heartbeat),
        ),
        (
            Method::GET,
            sync_protocol::heartbeat_path(device),
            get(list_heartbeats),
        ),
        (
            Method::GET,
            sync_protocol::summary_path(device),
            get(summary),
        ),
        (
            Method::GET,
            sync_protocol::readings_path(device),
            get(list_readings),
        ),
        (
            Method::GET,
            sync_protocol::predictions_path(device),
            get(list_predictions),
        ),
        (
            Method::GET,
            sync_protocol::dead_letters_path(device),
            get(list_dead_letters),
        ),
        (Method::GET, FLEET_PATH.to_owned(), get(fleet)),
        (Method::GET, OPENAPI_PATH.to_owned(), get(openapi)),
        (Method::GET, "/healthz".to_owned(), get(healthz)),
        (Method::GET, "/readyz".to_owned(), get(readyz)),
    ]
    .into_iter()
    .chain(crate::registry::http::routes())
    .chain(crate::drift::http::routes())
    .chain(crate::retrain::http::routes())
    .chain(crate::dataset::http::routes())
    .collect()
}

/// The `(method, path template)` of every route [`app`] serves.
#[must_use]
pub fn routes() -> Vec<(Method, String)> {
    route_table()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

/// The API router with its state, body limit, timeout, JSON fallbacks and
/// request counting ([`AppState::metrics`]); it serves exactly [`routes`].
pub fn app(state: AppState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    let timeout = state.request_timeout;
    let metrics = state.metrics.clone();
    let mut router = Router::new();
    for (_, path, handler) in route_table() {
        router = router.route(&path, handler);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(timeout, request_timeout))
        .layer(middleware::from_fn_with_state(
            metrics,
            crate::metrics::track,
        ))
        .with_state(state)
}

async fn request_timeout(
    State(timeout): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_elapsed) => ApiError::Timeout { timeout }.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.store.ping().await.map_err(ApiError::NotReady)?;
    Ok("ready")
}

async fn openapi() -> Json<serde_json::Value> {
    Json(crate::openapi::document())
}

/// Maps a store error of a read: an unknown device is 404 here (an operator
/// named it), a refused query 400.
fn read_error(err: StoreError) -> ApiError {
    match err {
        StoreError::UnknownDevice { id } => ApiError::UnknownDevice { id },
        StoreError::InvalidQuery(err) => ApiError::InvalidQuery(err),
        other => ApiError::from(other),
    }
}

async fn summary(
    State(state): State<AppState>,
    auth: ReadAuth,
) -> Result<Json<DeviceSummary>, ApiError> {
    let summary = state
        .store
        .summary(&auth.device)
        .await
        .map_err(read_error)?;
    Ok(Json(summary))
}

async fn list_readings(
    State(state): State<AppState>,
    auth: ReadAuth,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<ReadingsPage>, ApiError> {
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let page = state.store.readings(&auth.device, &query).await;
    Ok(Json(page.map_err(read_error)?))
}

async fn list_predictions(
    State(state): State<AppState>,
    auth: ReadAuth,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<PredictionsPage>, ApiError> {
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let page = state.store.predictions(&auth.device, &query).await;
    Ok(Json(page.map_err(read_error)?))
}

async fn list_dead_letters(
    State(state): State<AppState>,
    auth: ReadAuth,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<DeadLettersPage>, ApiError> {
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let page = state.store.dead_letters(&auth.device, &query).await;
    Ok(Json(page.map_err(read_error)?))
}

async fn list_heartbeats(
    State(state): State<AppState>,
    auth: ReadAuth,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<HeartbeatsPage>, ApiError> {
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let page = state.store.heartbeats(&auth.device, &query).await;
    Ok(Json(page.map_err(read_error)?))
}

async fn fleet(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<FleetSummary>, ApiError> {
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    Ok(Json(state.store.fleet(&query).await.map_err(read_error)?))
}

/// Body formats accepted on uploads (`Content-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    Json,
    Compact,
}

/// The body format named by `Content-Type`; a missing header means JSON
/// (older agents). `accepted` lists what the endpoint takes, for the 415.
fn body_format(headers: &HeaderMap, accepted: &'static str) -> Result<BodyFormat, ApiError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(BodyFormat::Json);
    };
    let unsupported = || ApiError::UnsupportedMediaType {
        content_type: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        accepted,
    };
    let text = value.to_str().map_err(|_| unsupported())?;
    let essence = text.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(JSON_MEDIA_TYPE) {
        Ok(BodyFormat::Json)
    } else if (essence.eq_ignore_ascii_case(codec::MEDIA_TYPE)
        || essence.eq_ignore_ascii_case(codec::MEDIA_TYPE_V2)
        || essence.eq_ignore_ascii_case(codec::MEDIA_TYPE_V1))
        && accepted == BATCH_MEDIA_TYPES
    {
        Ok(BodyFormat::Compact)
    } else {
        Err(unsupported())
    }
}

/// Body encodings accepted on uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Zstd,
}

fn content_encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let mut codings = Vec::new();
    for value in headers.get_all(CONTENT_ENCODING) {
        let unsupported = || ApiError::UnsupportedEncoding {
            encoding: String::from_utf8_lossy(value.as_bytes()).into_owned(),
        };
        let text = value.to_str().map_err(|_| unsupported())?;
        for coding in text.split(',').map(str::trim) {
            if coding.is_empty() || coding.eq_ignore_ascii_case("identity") {
                continue;
            }
            if !coding.eq_ignore_ascii_case(ZSTD_ENCODING) {
                return Err(unsupported());
            }
            codings.push(Encoding::Zstd);
        }
    }
    match codings.len() {
        0 => Ok(Encoding::Identity),
        1 => Ok(Encoding::Zstd),
        _ => Err(ApiError::UnsupportedEncoding {
            encoding: "zstd applied more than once".to_owned(),
        }),
    }
}

/// Smallest window the decoder accepts: what zstd levels up to 19 use.
const MIN_WINDOW_LOG: u32 = 23;
/// zstd's own default cap for decoders (128 MiB).
const MAX_WINDOW_LOG: u32 = 27;

/// Decompresses a zstd body, reading at most `cap + 1` bytes of output.
fn decompress_zstd(raw: &[u8], cap: usize) -> Result<Vec<u8>, ApiError> {
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(raw).map_err(ApiError::BadCompression)?;
    // Design: bound the window too, so a frame header cannot make the decoder
    // allocate far more than the output cap.
    let window_log = usize::BITS - cap.leading_zeros();
    decoder
        .window_log_max(window_log.clamp(MIN_WINDOW_LOG, MAX_WINDOW_LOG))
        .map_err(ApiError::BadCompression)?;
    let limit = u64::try_from(cap).unwrap_or(u64::MAX).saturating_add(1);
    let mut out = Vec::new();
    decoder
        .take(limit)
        .read_to_end(&mut out)
        .map_err(ApiError::BadCompression)?;
    if out.len() > cap {
        return Err(ApiError::PayloadTooLarge { limit: cap });
    }
    Ok(out)
}

/// Decodes an upload body: decompression (if any), then JSON or the compact codec.
fn decode_body<T: serde::de::DeserializeOwned>(
    raw: &[u8],
    encoding: Encoding,
    format: BodyFormat,
    cap: usize,
    compact: fn(&[u8]) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let decompressed;
    let plain = match encoding {
        Encoding::Identity => raw,
        Encoding::Zstd => {
            decompressed = decompress_zstd(raw, cap)?;
            &decompressed[..]
        }
    };
    match format {
        BodyFormat::Json => serde_json::from_slice(plain).map_err(ApiError::MalformedJson),
        BodyFormat::Compact => compact(plain),
    }
}

fn decode_compact_batch(plain: &[u8]) -> Result<UploadBatch, ApiError> {
    codec::decode_batch(plain).map_err(ApiError::MalformedBatch)
}

/// Bodies other than batches have no compact form ([`body_format`] refuses it).
pub(crate) fn no_compact_form<T>(_plain: &[u8]) -> Result<T, ApiError> {
    Err(ApiError::UnsupportedMediaType {
        content_type: codec::MEDIA_TYPE.to_owned(),
        accepted: JSON_MEDIA_TYPE,
    })
}

/// Reads, decompresses and decodes a request body within the size caps.
pub(crate) async fn read_body<T: serde::de::DeserializeOwned + Send + 'static>(
    state: &AppState,
    request: Request,
    accepted: &'static str,
    compact: fn(&[u8]) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let encoding = content_encoding(request.headers())?;
    let format = body_format(request.headers(), accepted)?;
    let raw = Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.max_body_bytes,
                }
            } else {
                ApiError::BadBody(rejection)
            }
        })?;
    let cap = state.max_body_bytes;
    // Design: decompression and parsing of up to `max_body_bytes` is CPU work;
    // keep it off the async workers.
    tokio::task::spawn_blocking(move || decode_body(&raw, encoding, format, cap, compact))
        .await
        .map_err(ApiError::TaskFailed)?
}

async fn upload_batch(
    State(state): State<AppState>,
    auth: DeviceAuth,
    request: Request,
) -> Result<Json<UploadAck>, ApiError> {
    let batch: UploadBatch =
        read_body(&state, request, BATCH_MEDIA_TYPES, decode_compact_batch).await?;
    let (readings, predictions, dead_letters) = (
        batch.readings.len(),
        batch.predictions.len(),
        batch.dead_letters.len(),
    );
    let ack = state.store.store_batch(&auth.device, batch).await?;
    state.metrics.batch_stored(&ack);
    tracing::debug!(
        device = %auth.device,
        readings,
        predictions,
        dead_letters,
        readings_inserted = ack.readings_inserted,
        readings_duplicate = ack.readings_duplicate,
        predictions_inserted = ack.predictions_inserted,
        predictions_duplicate = ack.predictions_duplicate,
        dead_letters_inserted = ack.dead_letters_inserted,
        dead_letters_duplicate = ack.dead_letters_duplicate,
        "stored batch"
    );
    Ok(Json(ack))
}

async fn upload_heartbeat(
    State(state): State<AppState>,
    auth: DeviceAuth,
    request: Request,
) -> Result<Json<HeartbeatAck>, ApiError> {
    let heartbeat: Heartbeat = read_body(&state, request, JSON_MEDIA_TYPE, no_compact_form).await?;
    let server_ms = state
        .store
        .store_heartbeat(&auth.device, &heartbeat)
        .await?;
    state.metrics.heartbeat_stored();
    tracing::debug!(device = %auth.device, agent_version = %heartbeat.agent_version, "stored heartbeat");
    Ok(Json(HeartbeatAck { server_ms }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn encoding_of(values: &[&'static str]) -> Result<Encoding, ApiError> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(CONTENT_ENCODING, HeaderValue::from_static(value));
        }
        content_encoding(&headers)
    }

    #[test]
    fn content_encodings() {
        assert_eq!(encoding_of(&[]).unwrap(), Encoding::Identity);
        assert_eq!(encoding_of(&["identity"]).unwrap(), Encoding::Identity);
        assert_eq!(encoding_of(&["zstd"]).unwrap(), Encoding::Zstd);
        assert_eq!(encoding_of(&[" ZSTD "]).unwrap(), Encoding::Zstd);
        for bad in [&["gzip"][..], &["zstd, gzip"], &["zstd", "zstd"], &["br"]] {
            assert!(
                matches!(encoding_of(bad), Err(ApiError::UnsupportedEncoding { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn decompression_is_capped() {
        let plain = vec![b'x'; 10_000];
        let packed = zstd::encode_all(&plain[..], 3).unwrap();
        assert_eq!(decompress_zstd(&packed, 10_000).unwrap(), plain);
        assert!(matches!(
            decompress_zstd(&packed, 9_999),
            Err(ApiError::PayloadTooLarge { limit: 9_999 })
        ));
        assert!(matches!(
            decompress_zstd(b"not zstd at all", 10_000),
            Err(ApiError::BadCompression(_))
        ));
        let truncated = &packed[..packed.len() - 3];
        assert!(matches!(
            decompress_zstd(truncated, 10_000),
            Err(ApiError::BadCompression(_))
        ));
    }

    #[test]
    fn content_types() {
        let format = |value: Option<&'static str>, accepted| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            }
            body_format(&headers, accepted)
        };
        for (value, expected) in [
            (None, BodyFormat::Json),
            (Some("application/json"), BodyFormat::Json),
            (Some("Application/JSON; charset=utf-8"), BodyFormat::Json),
            (Some("application/vnd.edge-batch.v1"), BodyFormat::Compact),
            (Some("application/vnd.edge-batch.v2"), BodyFormat::Compact),
            (Some("application/vnd.edge-batch.v3"), BodyFormat::Compact),
        ] {
            assert_eq!(
                format(value, BATCH_MEDIA_TYPES).unwrap(),
                expected,
                "{value:?}"
            );
        }
        for bad in [
            "text/plain",
            "application/cbor",
            "application/vnd.edge-batch.v4",
            "",
        ] {
            assert!(matches!(
                format(Some(bad), BATCH_MEDIA_TYPES),
                Err(ApiError::UnsupportedMediaType { .. })
            ));
        }
        assert!(matches!(
            format(Some("application/vnd.edge-batch.v1"), JSON_MEDIA_TYPE),
            Err(ApiError::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn statuses_and_codes() {
        let cases = [
            (ApiError::from(AuthError::MissingHeader), 401),
            (ApiError::from(AuthError::InvalidToken), 401),
            (
                ApiError::from(AuthError::WrongDevice {
                    token_device: "a".into(),
                    path_device: "b".into(),
                }),
                403,
            ),
            (ApiError::PayloadTooLarge { limit: 1 }, 413),
            (
                ApiError::UnsupportedEncoding {
                    encoding: "gzip".into(),
                },
                415,
            ),
            (ApiError::from(StoreError::Closed), 500),
            (
                ApiError::from(StoreError::InvalidBatch(BatchError::ZeroSeq {
                    list: "readings",
                    index: 0,
                })),
                400,
            ),
        ];
        for (err, status) in cases {
            assert_eq!(err.status_and_code().0.as_u16(), status, "{err:?}");
        }
    }
}
