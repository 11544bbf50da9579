//! POST /v1/generate.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};

use super::dto::GenerateResponse;
use super::error::ApiError;
use super::extract::{Authed, GenerateBody};
use super::AppState;
use crate::infer::RequestId;

pub async fn generate(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    Authed(caller): Authed,
    GenerateBody(raw): GenerateBody,
) -> Result<Json<GenerateResponse>, ApiError> {
    let generated = state.facade.generate(&caller, &id, raw).await?;
    let base = state.public_url.base(&headers);
    Ok(Json(GenerateResponse::new(&base, generated)))
}
