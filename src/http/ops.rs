//! Operations endpoints: GET /health and GET /metrics.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::infer::WorkerState;
use crate::metrics::{Exposition, CONTENT_TYPE};

/// 200 while the device worker takes jobs; 503 once it stopped.
pub async fn health(State(state): State<AppState>) -> Response {
    let (status, word) = match state.facade.worker_state() {
        WorkerState::Ready => (StatusCode::OK, "ok"),
        WorkerState::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped"),
    };
    let body = Json(json!({
        "status": word,
        "pipelines_loaded": state.facade.loaded_pipelines(),
        "models": state.facade.catalog().models().len(),
    }));
    (status, body).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = Exposition::default();
    state.facade.render_metrics(&mut out);
    state.http_metrics.render(&mut out);
    let mut res = out.finish().into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    res
}
