//! Operations endpoints: GET /health and GET /metrics.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::infer::WorkerState;
use crate::metrics::{Exposition, CONTENT_TYPE};

/// 200 once the server takes requests (it binds only after the first pipeline is loaded and
/// warm); 503 with the reason once the device worker stopped, or while the accounts database
/// cannot be written (a full disk, say), until a write goes through again.
pub async fn health(State(state): State<AppState>) -> Response {
    let (status, label, reason) = match state.facade.worker_state() {
        WorkerState::Stopped => (
            StatusCode::SERVICE_UNAVAILABLE,
            "stopped",
            Some("the device worker stopped".to_string()),
        ),
        WorkerState::Ready => match state.facade.check_writable().await {
            Ok(()) => (StatusCode::OK, "ok", None),
            Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(reason)),
        },
    };
    let mut body = json!({
        "status": label,
        "pipelines_loaded": state.facade.loaded_pipelines(),
        "models": state.facade.catalog().models().len(),
    });
    if let Some(reason) = reason {
        body["reason"] = json!(reason);
    }
    (status, Json(body)).into_response()
}

/// Prometheus text. With `--metrics-auth` in keys mode it needs a valid key, like the API (401
/// in the contract's JSON otherwise); in open mode there are no keys to ask for.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if state.metrics_auth {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        if let Err(e) = state.facade.authenticate(authorization).await {
            return ApiError::from(e).into_response();
        }
    }
    let mut out = Exposition::default();
    state.facade.render_metrics(&mut out);
    state.http_metrics.render(&mut out);
    let mut res = out.finish().into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    res
}
