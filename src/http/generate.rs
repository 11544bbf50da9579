//! POST /v1/generate.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};

use super::dto::GenerateResponse;
use super::error::ApiError;
use super::extract::{Authed, GenerateBody};
use super::hangup::{unless_closed, Hangup};
use super::AppState;
use crate::infer::RequestId;

pub async fn generate(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    hangup: Option<Extension<Hangup>>,
    headers: HeaderMap,
    Authed(caller): Authed,
    GenerateBody(raw): GenerateBody,
) -> Result<Json<GenerateResponse>, ApiError> {
    // A client that goes away mid-generation cancels it and is refunded (see hangup.rs).
    let work = state.facade.generate(&caller, &id, raw);
    let generated = unless_closed(hangup.as_ref().map(|h| &h.0), work).await??;
    let base = state.public_url.base(&headers);
    Ok(Json(GenerateResponse::new(&base, generated)))
}
