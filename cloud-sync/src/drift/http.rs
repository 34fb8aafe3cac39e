//! Drift API handlers: devices post [`DriftSummary`] bodies; operators read
//! a model's fleet view and the fleet alerts.
//!
//! Owns status codes of these routes only; routing is [`crate::api`]'s (see
//! [`routes`]), credentials [`crate::auth`]'s: a device posts only under its
//! own id (another device's path is 403, as for batches), reads are for
//! operators.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::Deserialize;
use sync_protocol::drift::{
    DriftAck, DriftSummary, FleetAlert, FleetDrift, alerts_path, drift_path, model_drift_path,
};
use sync_protocol::{ErrorBody, JSON_MEDIA_TYPE};

use super::{Drift, DriftError};
use crate::api::{ApiError, AppState};
use crate::auth::{DeviceAuth, OperatorAuth};

/// Drift routes: method, path template, handler.
pub fn routes() -> Vec<(Method, String, MethodRouter<AppState>)> {
    vec![
        (Method::POST, drift_path("{device}"), post(post_summary)),
        (Method::GET, model_drift_path("{model}"), get(model_drift)),
        (Method::GET, alerts_path(), get(list_alerts)),
    ]
}

/// A failed drift request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Authentication, path, query or body problems, as elsewhere in the API.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The server runs without drift storage (503).
    #[error("drift monitoring not available on this server")]
    Unavailable,
    /// Storing or reading failed, or the summary was refused.
    #[error(transparent)]
    Drift(#[from] DriftError),
}

impl HttpError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            HttpError::Api(err) => err.status_and_code(),
            HttpError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "drift_unavailable"),
            HttpError::Drift(DriftError::Invalid(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_summary")
            }
            HttpError::Drift(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if let HttpError::Api(err) = self {
            return err.into_response();
        }
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(code, error = %error_chain(&self), "drift request failed");
        } else {
            tracing::debug!(code, error = %error_chain(&self), "drift request refused");
        }
        // Server-side details stay in the log.
        let message = self.to_string();
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

fn drift(state: &AppState) -> Result<&Drift, HttpError> {
    state.drift().ok_or(HttpError::Unavailable)
}

/// Query of the read routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinceQuery {
    /// Windows starting at or after this time (Unix ms); 0 when absent.
    pub since_ms: Option<i64>,
}

async fn post_summary(
    State(state): State<AppState>,
    auth: DeviceAuth,
    request: Request,
) -> Result<Json<DriftAck>, HttpError> {
    let drift = drift(&state)?.clone();
    let summary: DriftSummary = crate::api::read_body(
        &state,
        request,
        JSON_MEDIA_TYPE,
        crate::api::no_compact_form,
    )
    .await?;
    let stored = drift.store(&auth.device, &summary).await?;
    if let (Some(alert), Some(retrainer), Some(datasets)) =
        (stored.raised.clone(), state.retrainer(), state.datasets())
    {
        retrainer.spawn_for_alert(
            alert,
            drift.clone(),
            state.store().clone(),
            datasets.clone(),
        );
    }
    tracing::debug!(device = %auth.device, model = %summary.model, stored = stored.stored, "drift summary");
    Ok(Json(DriftAck {
        stored: stored.stored,
    }))
}

async fn model_drift(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    model: Result<Path<String>, PathRejection>,
    query: Result<Query<SinceQuery>, QueryRejection>,
) -> Result<Json<FleetDrift>, HttpError> {
    let Path(model) = model.map_err(ApiError::BadPath)?;
    let Query(q) = query.map_err(ApiError::BadQuery)?;
    Ok(Json(
        drift(&state)?
            .fleet(&model, q.since_ms.unwrap_or(0))
            .await?,
    ))
}

async fn list_alerts(
    State(state): State<AppState>,
    _auth: OperatorAuth,
    query: Result<Query<SinceQuery>, QueryRejection>,
) -> Result<Json<Vec<FleetAlert>>, HttpError> {
    let Query(q) = query.map_err(ApiError::BadQuery)?;
    Ok(Json(drift(&state)?.alerts(q.since_ms.unwrap_or(0)).await?))
}
