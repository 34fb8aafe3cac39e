//! Dataset API handlers: `POST /v1/datasets` (snapshot), `GET /v1/datasets`
//! (list) and `GET /v1/datasets/{id}` (manifest). Operators only; a device
//! token is 403.
//!
//! Owns status codes of these routes only; routing is [`crate::api`]'s
//! (see [`routes`]), credentials [`crate::auth`]'s.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::{Deserialize, Serialize};
use sync_protocol::{API_VERSION, ErrorBody, JSON_MEDIA_TYPE};

use super::{DatasetError, Datasets, Manifest, Selection};
use crate::api::{ApiError, AppState, no_compact_form, read_body};
use crate::auth::OperatorAuth;

/// Body of `POST /v1/datasets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Streams: `NAME` or `SOURCE/NAME`.
    pub streams: Vec<String>,
    /// Device ids.
    pub devices: Vec<String>,
    /// Window start (Unix ms, inclusive).
    pub from_ms: i64,
    /// Window end (Unix ms, exclusive).
    pub to_ms: i64,
    /// Optional label (not part of the id).
    #[serde(default)]
    pub name: Option<String>,
}

/// Body of `GET /v1/datasets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetList {
    /// Every registered dataset, oldest first.
    pub datasets: Vec<Manifest>,
}

/// The dataset routes: method, path template, handler.
pub fn routes() -> Vec<(Method, String, MethodRouter<AppState>)> {
    vec![
        (
            Method::POST,
            format!("/{API_VERSION}/datasets"),
            post(snapshot),
        ),
        (Method::GET, format!("/{API_VERSION}/datasets"), get(list)),
        (
            Method::GET,
            format!("/{API_VERSION}/datasets/{{id}}"),
            get(manifest),
        ),
    ]
}

/// A failed dataset request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Authentication, path or body problems, as elsewhere in the API.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The server runs without a dataset store (503).
    #[error("datasets not available on this server")]
    Unavailable,
    /// The dataset operation was refused or failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

impl HttpError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            HttpError::Api(err) => err.status_and_code(),
            HttpError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "datasets_unavailable"),
            HttpError::Dataset(err) => match err {
                DatasetError::InvalidSelection { .. } => {
                    (StatusCode::BAD_REQUEST, "invalid_selection")
                }
                DatasetError::UnknownDevice { .. } => (StatusCode::BAD_REQUEST, "unknown_device"),
                DatasetError::UnknownStream { .. } => (StatusCode::BAD_REQUEST, "unknown_stream"),
                DatasetError::Empty { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "empty_selection"),
                DatasetError::UnknownDataset { .. } => (StatusCode::NOT_FOUND, "unknown_dataset"),
                DatasetError::Corrupt { .. } => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "corrupt_dataset")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
            },
        }
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

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if let HttpError::Api(err) = self {
            return err.into_response();
        }
        let (status, code) = self.status_and_code();
        let message = if code == "storage_error" {
            tracing::error!(code, error = %error_chain(&self), "dataset request failed");
            self.to_string()
        } else {
            if status.is_server_error() {
                tracing::error!(code, error = %error_chain(&self), "dataset request failed");
            } else {
                tracing::debug!(code, error = %error_chain(&self), "dataset request refused");
            }
            error_chain(&self)
        };
        (
            status,
            Json(ErrorBody {
                code: code.to_owned(),
                message,
            }),
        )
            .into_response()
    }
}

fn datasets(state: &AppState) -> Result<&Datasets, HttpError> {
    state.datasets().ok_or(HttpError::Unavailable)
}

async fn snapshot(
    State(state): State<AppState>,
    auth: OperatorAuth,
    request: Request,
) -> Result<Response, HttpError> {
    let datasets = datasets(&state)?;
    let body: SnapshotRequest =
        read_body(&state, request, JSON_MEDIA_TYPE, no_compact_form).await?;
    let selection = Selection {
        streams: body.streams,
        devices: body.devices,
        from_ms: body.from_ms,
        to_ms: body.to_ms,
    };
    let done = datasets
        .snapshot(state.store(), selection, body.name)
        .await?;
    tracing::info!(
        operator = %auth.operator,
        id = %done.manifest.id,
        created = done.created,
        "dataset snapshot"
    );
    let status = if done.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(done.manifest)).into_response())
}

async fn list(
    State(state): State<AppState>,
    _auth: OperatorAuth,
) -> Result<Json<DatasetList>, HttpError> {
    Ok(Json(DatasetList {
        datasets: datasets(&state)?.list().await?,
    }))
}

async fn manifest(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Manifest>, HttpError> {
    let Path(id) = id.map_err(ApiError::BadPath)?;
    Ok(Json(datasets(&state)?.manifest(&id).await?))
}
