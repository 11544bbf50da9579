//! POST /v1/generate; with `Accept: text/event-stream`, the same request as Server-Sent Events
//! (http/sse.rs).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::dto::{self, GenerateResponse};
use super::error::ApiError;
use super::extract::{Authed, JsonObject};
use super::hangup::{unless_closed, Hangup};
use super::sse::{self, Style};
use super::AppState;
use crate::infer::{InferError, RequestId, ValidationError};
use crate::scheduler::{ProgressTx, MAX_PREVIEWS};

/// POST /v1/generate.
#[utoipa::path(
    post,
    path = "/v1/generate",
    tag = "hosted",
    request_body(content = super::openapi::GenerateRequestDoc, description = "The hosted contract's request; unknown fields are ignored"),
    responses(
        (status = 200, description = "The images. With `Accept: text/event-stream`: Server-Sent Events `queued`, `started`, `step`, `preview` (when `partial_images` > 0), then `completed` (data: this same body) or `error` (data: the error body)", body = GenerateResponse),
        (status = 400, description = "missing_prompt, prompt_too_long, invalid_model, invalid_dimensions, invalid_num_images, invalid_parameter, invalid_request", body = super::openapi::ErrorDoc),
        (status = 401, description = "invalid_api_key", body = super::openapi::ErrorDoc),
        (status = 402, description = "insufficient_credits", body = super::openapi::ErrorDoc),
        (status = 413, description = "request_too_large", body = super::openapi::ErrorDoc),
        (status = 429, description = "rate_limit_exceeded (Retry-After)", body = super::openapi::ErrorDoc),
        (status = 503, description = "server_busy (Retry-After)", body = super::openapi::ErrorDoc),
        (status = 500, description = "generation_failed", body = super::openapi::ErrorDoc),
    ),
    security((), ("bearer" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    hangup: Option<Extension<Hangup>>,
    headers: HeaderMap,
    Authed(caller): Authed,
    JsonObject(mut obj): JsonObject,
) -> Result<Response, ApiError> {
    let stream = sse::wants_events(&headers);
    // Local extension of the event stream: previews of the image being made.
    let previews = dto::integer("partial_images", obj.remove("partial_images"))?;
    let raw = dto::raw_request(obj)?;
    let base = state.public_url.base(&headers);
    if !stream {
        // A client that goes away mid-generation cancels it and is refunded (see hangup.rs);
        // an event stream notices by its writes.
        let work = state.facade.generate(&caller, &id, raw);
        let generated = unless_closed(hangup.as_ref().map(|h| &h.0), work).await??;
        return Ok(Json(GenerateResponse::new(&base, generated)).into_response());
    }
    let previews = match previews {
        None => 0,
        Some(p) => usize::try_from(p)
            .ok()
            .filter(|p| *p <= MAX_PREVIEWS)
            .ok_or_else(|| {
                ApiError::Infer(InferError::Invalid(ValidationError::InvalidParameter(
                    format!("partial_images is {p}; it must be 0 to 3"),
                )))
            })?,
    };
    let (tx, rx) = ProgressTx::channel(previews);
    let running = state.facade.start(&caller, &id, raw, Some(tx)).await?;
    Ok(sse::respond(state, id, running, rx, Style::Hosted { base }))
}
