//! Registry API handlers: the production version of a model for a device
//! group and the per-device deployment (both with `ETag` /
//! `If-None-Match`), artifact downloads (with `Range`, for resuming over
//! poor links), promotion / archiving and the rollout view by operators, and
//! rollout reports by devices.
//!
//! Owns status codes and headers of these routes only; routing is
//! [`crate::api`]'s (see [`routes`]), credentials [`crate::auth`]'s. A device
//! or operator token may read; only operators may change stages or read the
//! rollout view; only devices may report. A device's group comes from its
//! server-side assignment before the `group` it names.

use std::io::SeekFrom;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRef, FromRequestParts, Path, Query, State};
use axum::http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    IF_RANGE, RANGE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use sync_protocol::registry::{
    ARTIFACT_MEDIA_TYPE, DEFAULT_GROUP, ModelVersion, Promotion, RolloutReport, RolloutReportAck,
    StageChange,
};
use sync_protocol::{API_VERSION, ErrorBody, JSON_MEDIA_TYPE};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::io::ReaderStream;

use super::rollout::{DEFAULT_HALT_SHARE, FULL_PERCENT, RolloutOverview};
use super::{Registry, RegistryError};
use crate::api::{ApiError, AppState};
use crate::auth::{AuthError, OperatorAuth, Principal};
use crate::store::Store;

/// The registry's routes: method, path template, handler.
pub fn routes() -> Vec<(Method, String, MethodRouter<AppState>)> {
    vec![
        (
            Method::GET,
            format!("/{API_VERSION}/models/{{model}}/production"),
            get(production),
        ),
        (
            Method::GET,
            format!("/{API_VERSION}/artifacts/{{sha256}}"),
            get(artifact),
        ),
        (
            Method::POST,
            format!("/{API_VERSION}/models/{{model}}/versions/{{version}}/promote"),
            post(promote),
        ),
        (
            Method::POST,
            format!("/{API_VERSION}/models/{{model}}/versions/{{version}}/archive"),
            post(archive),
        ),
        (
            Method::GET,
            format!("/{API_VERSION}/models/{{model}}/deployment"),
            get(deployment),
        ),
        (
            Method::GET,
            format!("/{API_VERSION}/models/{{model}}/rollouts"),
            get(rollouts),
        ),
        (
            Method::POST,
            format!("/{API_VERSION}/rollout/reports"),
            post(report),
        ),
    ]
}

/// A failed registry request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Authentication, path, query or body problems, as elsewhere in the API.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The server runs without a registry (503).
    #[error("model registry not available on this server")]
    Unavailable,
    /// No production version of that model for that group (404).
    #[error("no production version of model {name:?} for group {group:?}")]
    NoProduction {
        /// Model.
        name: String,
        /// Group.
        group: String,
    },
    /// No artifact with that hash (404).
    #[error("no artifact {sha256:?}")]
    UnknownArtifact {
        /// The path segment.
        sha256: String,
    },
    /// The `Range` starts past the end (416).
    #[error("range not satisfiable for an artifact of {len} bytes")]
    RangeNotSatisfiable {
        /// Artifact size.
        len: u64,
    },
    /// The artifact file could not be read (500).
    #[error("cannot read artifact")]
    Io(#[source] std::io::Error),
    /// The registry refused or failed the operation.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl HttpError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            HttpError::Api(err) => err.status_and_code(),
            HttpError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable"),
            HttpError::NoProduction { .. } => (StatusCode::NOT_FOUND, "no_production_version"),
            HttpError::UnknownArtifact { .. } => (StatusCode::NOT_FOUND, "unknown_artifact"),
            HttpError::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable")
            }
            HttpError::Registry(RegistryError::UnknownVersion { .. }) => {
                (StatusCode::NOT_FOUND, "unknown_version")
            }
            HttpError::Registry(RegistryError::UnknownModelVersion { .. }) => {
                (StatusCode::NOT_FOUND, "unknown_version")
            }
            HttpError::Registry(RegistryError::InvalidGroup { .. }) => {
                (StatusCode::BAD_REQUEST, "bad_query")
            }
            HttpError::Registry(
                RegistryError::InvalidPercent { .. } | RegistryError::InvalidHaltShare { .. },
            ) => (StatusCode::BAD_REQUEST, "invalid_rollout"),
            HttpError::Registry(
                RegistryError::InvalidReport { .. } | RegistryError::InvalidDevice { .. },
            ) => (StatusCode::BAD_REQUEST, "invalid_report"),
            HttpError::Registry(RegistryError::RolloutInProgress { .. }) => {
                (StatusCode::CONFLICT, "rollout_in_progress")
            }
            HttpError::Registry(RegistryError::NoActiveRollout { .. }) => {
                (StatusCode::CONFLICT, "no_active_rollout")
            }
            HttpError::Registry(RegistryError::NothingToRollBack { .. }) => {
                (StatusCode::CONFLICT, "nothing_to_roll_back")
            }
            HttpError::Io(_) | HttpError::Registry(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage_error")
            }
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if let HttpError::Api(err) = self {
            return err.into_response();
        }
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() {
            tracing::error!(code, error = %error_chain(&self), "registry request failed");
            self.to_string()
        } else {
            tracing::debug!(code, error = %error_chain(&self), "registry request refused");
            error_chain(&self)
        };
        let mut response = (
            status,
            Json(ErrorBody {
                code: code.to_owned(),
                message,
            }),
        )
            .into_response();
        if let HttpError::RangeNotSatisfiable { len } = self
            && let Ok(value) = HeaderValue::from_str(&format!("bytes */{len}"))
        {
            response.headers_mut().insert(CONTENT_RANGE, value);
        }
        response
    }
}

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

/// Any authenticated device or operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader(pub Principal);

impl<S> FromRequestParts<S> for Reader
where
    Store: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let store = Store::from_ref(state);
        Ok(Reader(crate::auth::principal(parts, &store).await?))
    }
}

fn registry(state: &AppState) -> Result<&Registry, HttpError> {
    state.registry().ok_or(HttpError::Unavailable)
}

/// Query of the production, deployment, rollouts and report endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupQuery {
    /// Device group; `default` when absent. A device's server-side
    /// assignment takes precedence (not for the operator-only rollouts view).
    pub group: Option<String>,
}

/// Whether an `If-None-Match` header matches `etag` (weak comparison).
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim())
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

fn header(value: &str) -> Result<HeaderValue, HttpError> {
    HeaderValue::from_str(value)
        .map_err(|err| HttpError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, err)))
}

async fn production(
    State(state): State<AppState>,
    reader: Reader,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<GroupQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let registry = registry(&state)?;
    let Path(name) = name.map_err(ApiError::BadPath)?;
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let group = registry
        .group_of(device_of(&reader), query.group.as_deref())
        .await?;
    let Some(version) = registry.production(&name, &group).await? else {
        return Err(HttpError::NoProduction { name, group });
    };
    let body = serde_json::to_vec(&version).map_err(|err| HttpError::Io(err.into()))?;
    cached_json(&headers, body)
}

/// The device a reader is, `None` for an operator (device-less view).
fn device_of(reader: &Reader) -> Option<&str> {
    match &reader.0 {
        Principal::Device(device) => Some(device),
        Principal::Operator(_) => None,
    }
}

/// A JSON body with an `ETag` over it; a bodiless 304 when `If-None-Match`
/// matches.
fn cached_json(headers: &HeaderMap, body: Vec<u8>) -> Result<Response, HttpError> {
    // Design: the ETag is a hash of the body, so any change (a promotion,
    // a rollback, another signature) changes it and nothing else does.
    let etag = format!("\"{}\"", &hex::encode(Sha256::digest(&body))[..32]);
    let mut response = if none_match(headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response()
    };
    let out = response.headers_mut();
    out.insert(ETAG, header(&etag)?);
    out.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The byte range to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// The whole artifact (no, an unsupported or an invalid `Range`).
    Full,
    /// `start..=end`.
    Part(u64, u64),
    /// Starts past the end.
    Unsatisfiable,
}

/// Parses a single `bytes=` range (RFC 9110 §14.1.2). Multiple ranges and
/// malformed values are ignored (the whole artifact is sent), as the RFC allows.
fn byte_range(value: Option<&HeaderValue>, len: u64) -> ByteRange {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let parse = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), parse(first), parse(last)) {
        (true, _, Some(suffix)) => {
            if suffix == 0 || len == 0 {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Part(len.saturating_sub(suffix), len - 1)
            }
        }
        (false, Some(start), end) if last.trim().is_empty() || end.is_some() => {
            if end.is_some_and(|end| end < start) {
                ByteRange::Full
            } else if start >= len {
                ByteRange::Unsatisfiable
            } else {
                ByteRange::Part(start, end.map_or(len - 1, |end| end.min(len - 1)))
            }
        }
        _ => ByteRange::Full,
    }
}

async fn artifact(
    State(state): State<AppState>,
    _reader: Reader,
    sha256: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let registry = registry(&state)?;
    let Path(sha256) = sha256.map_err(ApiError::BadPath)?;
    let unknown = || HttpError::UnknownArtifact {
        sha256: sha256.clone(),
    };
    let path = registry.artifact_file(&sha256).ok_or_else(unknown)?;
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(unknown()),
        Err(err) => return Err(HttpError::Io(err)),
    };
    let len = file.metadata().await.map_err(HttpError::Io)?.len();
    let etag = format!("\"{sha256}\"");
    let common = [
        (ETAG, header(&etag)?),
        (ACCEPT_RANGES, HeaderValue::from_static("bytes")),
        (
            CACHE_CONTROL,
            HeaderValue::from_static("private, max-age=31536000, immutable"),
        ),
    ];
    if none_match(&headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    // An `If-Range` that is not this artifact's ETag asks for the whole file.
    let if_range_ok = headers
        .get(IF_RANGE)
        .is_none_or(|v| v.to_str().is_ok_and(|v| v.trim() == etag));
    let range = if if_range_ok {
        byte_range(headers.get(RANGE), len)
    } else {
        ByteRange::Full
    };
    let (status, start, count) = match range {
        ByteRange::Full => (StatusCode::OK, 0, len),
        ByteRange::Part(start, end) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        ByteRange::Unsatisfiable => return Err(HttpError::RangeNotSatisfiable { len }),
    };
    file.seek(SeekFrom::Start(start))
        .await
        .map_err(HttpError::Io)?;
    let body = Body::from_stream(ReaderStream::new(file.take(count)));
    let mut response = (status, common, body).into_response();
    let out = response.headers_mut();
    out.insert(CONTENT_TYPE, HeaderValue::from_static(ARTIFACT_MEDIA_TYPE));
    out.insert(CONTENT_LENGTH, header(&count.to_string())?);
    if status == StatusCode::PARTIAL_CONTENT {
        out.insert(
            CONTENT_RANGE,
            header(&format!("bytes {start}-{}/{len}", start + count - 1))?,
        );
    }
    Ok(response)
}

fn stage_change(body: Result<Bytes, BytesRejection>) -> Result<StageChange, HttpError> {
    let body = body.map_err(ApiError::BadBody)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(StageChange::default());
    }
    Ok(serde_json::from_slice(&body).map_err(ApiError::MalformedJson)?)
}

async fn promote(
    State(state): State<AppState>,
    auth: OperatorAuth,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Promotion>, HttpError> {
    let registry = registry(&state)?;
    let Path((name, version)) = path.map_err(ApiError::BadPath)?;
    let change = stage_change(body)?;
    let group = change.group.unwrap_or_else(|| DEFAULT_GROUP.to_owned());
    let promotion = registry
        .promote_staged(
            &name,
            &version,
            &group,
            change.percent.unwrap_or(FULL_PERCENT),
            change.halt_share.unwrap_or(DEFAULT_HALT_SHARE),
        )
        .await?;
    tracing::info!(operator = %auth.operator, model = %name, %version, %group,
        archived = ?promotion.archived,
        rollout_percent = ?promotion.rollout.as_ref().map(|r| r.percent),
        "promoted model version");
    Ok(Json(promotion))
}

async fn archive(
    State(state): State<AppState>,
    auth: OperatorAuth,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ModelVersion>, HttpError> {
    let registry = registry(&state)?;
    let Path((name, version)) = path.map_err(ApiError::BadPath)?;
    // `percent` and `halt_share` are promotion options; archiving ignores them.
    let change = stage_change(body)?;
    let group = change.group.unwrap_or_else(|| DEFAULT_GROUP.to_owned());
    let archived = registry.archive(&name, &version, &group).await?;
    tracing::info!(operator = %auth.operator, model = %name, %version, %group, "archived model version");
    Ok(Json(archived))
}

async fn deployment(
    State(state): State<AppState>,
    reader: Reader,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<GroupQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let registry = registry(&state)?;
    let Path(name) = name.map_err(ApiError::BadPath)?;
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let device = device_of(&reader);
    let Some(deployment) = registry
        .deployment(&name, device, query.group.as_deref())
        .await?
    else {
        let group = registry.group_of(device, query.group.as_deref()).await?;
        return Err(HttpError::NoProduction { name, group });
    };
    let body = serde_json::to_vec(&deployment).map_err(|err| HttpError::Io(err.into()))?;
    cached_json(&headers, body)
}

async fn rollouts(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<GroupQuery>, QueryRejection>,
) -> Result<Json<RolloutOverview>, HttpError> {
    let registry = registry(&state)?;
    let Path(name) = name.map_err(ApiError::BadPath)?;
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let group = query.group.unwrap_or_else(|| DEFAULT_GROUP.to_owned());
    Ok(Json(registry.overview(&name, &group).await?))
}

async fn report(
    State(state): State<AppState>,
    reader: Reader,
    query: Result<Query<GroupQuery>, QueryRejection>,
    request: axum::extract::Request,
) -> Result<Json<RolloutReportAck>, HttpError> {
    let registry = registry(&state)?;
    let device = match reader.0 {
        Principal::Device(device) => device,
        Principal::Operator(operator) => {
            return Err(ApiError::from(AuthError::OperatorCannotUpload { operator }).into());
        }
    };
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let report: RolloutReport = crate::api::read_body(
        &state,
        request,
        JSON_MEDIA_TYPE,
        crate::api::no_compact_form,
    )
    .await?;
    Ok(Json(
        registry
            .report(&device, query.group.as_deref(), report)
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &'static str, len: u64) -> ByteRange {
        byte_range(Some(&HeaderValue::from_static(value)), len)
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range(None, 10), ByteRange::Full);
        assert_eq!(range("bytes=0-3", 10), ByteRange::Part(0, 3));
        assert_eq!(range("bytes=4-", 10), ByteRange::Part(4, 9));
        assert_eq!(range("bytes=4-100", 10), ByteRange::Part(4, 9));
        assert_eq!(range("bytes=-3", 10), ByteRange::Part(7, 9));
        assert_eq!(range("bytes=-30", 10), ByteRange::Part(0, 9));
        assert_eq!(range("bytes=10-", 10), ByteRange::Unsatisfiable);
        assert_eq!(range("bytes=-0", 10), ByteRange::Unsatisfiable);
        assert_eq!(range("bytes=5-2", 10), ByteRange::Full);
        assert_eq!(range("bytes=0-1,4-5", 10), ByteRange::Full);
        assert_eq!(range("items=0-1", 10), ByteRange::Full);
        assert_eq!(range("bytes=x-1", 10), ByteRange::Full);
        assert_eq!(range("bytes=-", 10), ByteRange::Full);
    }

    #[test]
    fn if_none_match() {
        let mut headers = HeaderMap::new();
        headers.insert(IF_NONE_MATCH, HeaderValue::from_static("\"a\", W/\"b\""));
        assert!(none_match(&headers, "\"a\""));
        assert!(none_match(&headers, "\"b\""));
        assert!(!none_match(&headers, "\"c\""));
        assert!(!none_match(&HeaderMap::new(), "\"a\""));
    }
}
