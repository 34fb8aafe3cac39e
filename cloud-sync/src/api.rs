//! HTTP API: the axum [`Router`] built by [`app`], its handlers, and the
//! mapping of every failure to a JSON [`ErrorBody`] with the right status.
//!
//! Owns request decoding (content encoding, size caps, JSON) and status codes;
//! storage semantics belong to [`crate::store`], token checks to
//! [`crate::auth`]. Invariants: no input can make a handler panic; a body is
//! only read after the device is authenticated; a zstd body is never
//! decompressed past `max_body_bytes` (+1 byte to detect the overflow).

use std::io::Read;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRef, FromRequest, Request, State};
use axum::http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sync_protocol::{DeviceSummary, ErrorBody, UploadAck, UploadBatch, ZSTD_ENCODING};

use crate::auth::{AuthError, DeviceAuth};
use crate::config::Settings;
use crate::store::{BatchError, Store, StoreError};

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    store: Store,
    max_body_bytes: usize,
    request_timeout: Duration,
}

impl AppState {
    /// State serving `store` with the limits from `settings`.
    #[must_use]
    pub fn new(store: Store, settings: &Settings) -> Self {
        Self {
            store,
            max_body_bytes: settings.max_body_bytes,
            request_timeout: settings.request_timeout,
        }
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
    /// The body is not a JSON [`UploadBatch`] (400).
    #[error("body is not a valid upload batch")]
    MalformedJson(#[source] serde_json::Error),
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
            ApiError::Auth(AuthError::WrongDevice { .. }) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Auth(AuthError::Store(_)) | ApiError::Store(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage_error")
            }
            ApiError::BadPath(_) => (StatusCode::BAD_REQUEST, "bad_path"),
            ApiError::BadBody(_) => (StatusCode::BAD_REQUEST, "bad_body"),
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
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
        let mut response = (status, Json(body)).into_response();
        match status {
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                response
                    .headers_mut()
                    .insert(ACCEPT_ENCODING, HeaderValue::from_static(ZSTD_ENCODING));
            }
            _ => {}
        }
        response
    }
}

/// The API router with its state, body limit, timeout and JSON fallbacks.
///
/// Routes: `POST /v1/devices/{device}/batches`, `GET /v1/devices/{device}/summary`,
/// `GET /healthz`, `GET /readyz`.
pub fn app(state: AppState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    let timeout = state.request_timeout;
    Router::new()
        .route(&sync_protocol::batch_path("{device}"), post(upload_batch))
        .route(&sync_protocol::summary_path("{device}"), get(summary))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(timeout, request_timeout))
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

async fn summary(
    State(state): State<AppState>,
    auth: DeviceAuth,
) -> Result<Json<DeviceSummary>, ApiError> {
    Ok(Json(state.store.summary(&auth.device).await?))
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

/// Decodes an upload body: decompression (if any), then JSON.
fn decode_batch(raw: &[u8], encoding: Encoding, cap: usize) -> Result<UploadBatch, ApiError> {
    let batch = match encoding {
        Encoding::Identity => serde_json::from_slice(raw),
        Encoding::Zstd => serde_json::from_slice(&decompress_zstd(raw, cap)?),
    };
    batch.map_err(ApiError::MalformedJson)
}

async fn upload_batch(
    State(state): State<AppState>,
    auth: DeviceAuth,
    request: Request,
) -> Result<Json<UploadAck>, ApiError> {
    let encoding = content_encoding(request.headers())?;
    let raw = Bytes::from_request(request, &state)
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
    let batch = tokio::task::spawn_blocking(move || decode_batch(&raw, encoding, cap))
        .await
        .map_err(ApiError::TaskFailed)??;
    let (readings, predictions) = (batch.readings.len(), batch.predictions.len());
    let ack = state.store.store_batch(&auth.device, batch).await?;
    tracing::debug!(
        device = %auth.device,
        readings,
        predictions,
        readings_inserted = ack.readings_inserted,
        readings_duplicate = ack.readings_duplicate,
        predictions_inserted = ack.predictions_inserted,
        predictions_duplicate = ack.predictions_duplicate,
        "stored batch"
    );
    Ok(Json(ack))
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
