//! Retrain API handlers (operators only): list and read training runs,
//! enqueue a retrain job, read a job's status.
//!
//! Owns status codes of these routes only; routing is [`crate::api`]'s,
//! credentials [`crate::auth`]'s. Without a retrainer (servers started
//! without one) every route answers 503 `retrain_unavailable`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use sync_protocol::{API_VERSION, ErrorBody};

use super::{Job, JobSpec, RetrainError, Retrainer, Run};
use crate::api::{ApiError, AppState};
use crate::auth::OperatorAuth;

/// The retrainer's routes: method, path template, handler.
pub fn routes() -> Vec<(Method, String, MethodRouter<AppState>)> {
    vec![
        (Method::GET, format!("/{API_VERSION}/runs"), get(list_runs)),
        (
            Method::GET,
            format!("/{API_VERSION}/runs/{{id}}"),
            get(get_run),
        ),
        (
            Method::POST,
            format!("/{API_VERSION}/retrain"),
            post(enqueue),
        ),
        (
            Method::GET,
            format!("/{API_VERSION}/jobs/{{id}}"),
            get(get_job),
        ),
    ]
}

/// Why a retrain request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Authentication, path, query or body problems, as elsewhere.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The server runs without a retrainer (503).
    #[error("retraining not available on this server")]
    Unavailable,
    /// No run with that id (404).
    #[error("no training run {id:?}")]
    UnknownRun {
        /// The id.
        id: String,
    },
    /// No job with that id (404).
    #[error("no retrain job {id:?}")]
    UnknownJob {
        /// The id.
        id: String,
    },
    /// The body is not a job specification (400).
    #[error("invalid retrain job body")]
    Body(#[source] serde_json::Error),
    /// The retrainer refused or failed.
    #[error(transparent)]
    Retrain(#[from] RetrainError),
}

impl HttpError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            HttpError::Api(err) => err.status_and_code(),
            HttpError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "retrain_unavailable"),
            HttpError::UnknownRun { .. } => (StatusCode::NOT_FOUND, "unknown_run"),
            HttpError::UnknownJob { .. } => (StatusCode::NOT_FOUND, "unknown_job"),
            HttpError::Body(_) | HttpError::Retrain(RetrainError::InvalidSpec { .. }) => {
                (StatusCode::BAD_REQUEST, "invalid_job")
            }
            HttpError::Retrain(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if let HttpError::Api(err) = self {
            return err.into_response();
        }
        let (status, code) = self.status_and_code();
        let message = super::chain(&self);
        if status.is_server_error() {
            tracing::error!(code, error = %message, "retrain request failed");
        }
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

fn retrainer(state: &AppState) -> Result<&Retrainer, HttpError> {
    state.retrainer().ok_or(HttpError::Unavailable)
}

/// Query of `GET /v1/runs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    model: Option<String>,
    limit: Option<u32>,
}

async fn list_runs(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    query: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Json<Vec<Run>>, HttpError> {
    let retrainer = retrainer(&state)?;
    let Query(query) = query.map_err(ApiError::BadQuery)?;
    let limit = query.limit.unwrap_or(100);
    Ok(Json(retrainer.runs(query.model.as_deref(), limit).await?))
}

async fn get_run(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Run>, HttpError> {
    let retrainer = retrainer(&state)?;
    let Path(id) = id.map_err(ApiError::BadPath)?;
    match retrainer.run(&id).await? {
        Some(run) => Ok(Json(run)),
        None => Err(HttpError::UnknownRun { id }),
    }
}

async fn enqueue(
    State(state): State<AppState>,
    auth: OperatorAuth,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let retrainer = retrainer(&state)?;
    let body = body.map_err(ApiError::BadBody)?;
    let spec: JobSpec = serde_json::from_slice(&body).map_err(HttpError::Body)?;
    let job = retrainer.enqueue(spec).await?;
    tracing::info!(operator = %auth.operator, job = %job.id, model = %job.spec.model, "retrain job enqueued");
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn get_job(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Job>, HttpError> {
    let retrainer = retrainer(&state)?;
    let Path(id) = id.map_err(ApiError::BadPath)?;
    match retrainer.job(&id).await? {
        Some(job) => Ok(Json(job)),
        None => Err(HttpError::UnknownJob { id }),
    }
}
