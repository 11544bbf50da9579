//! Operations endpoints: GET /health and GET /metrics.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// 200 once the server takes requests (it binds only after the pipelines are loaded and warm).
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "pipelines_loaded": state.facade.loaded_pipelines(),
        "models": state.facade.catalog().models().len(),
    }))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.facade.metrics_text();
    state.http_metrics.render(&mut text);
    let mut res = text.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    res
}
