//! Extractors whose rejections are the contract's errors, never axum's plain text.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::AppState;
use crate::infer::Caller;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The authenticated caller under the server's auth mode. Runs before the body is read, so that
/// authentication is checked first.
pub struct Authed(pub Caller);

impl FromRequestParts<AppState> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or(""));
        Ok(Authed(state.facade.authenticate(header).await?))
    }
}

/// A request body that is a JSON object of at most 64 KiB, rejected with the contract's errors.
/// The Content-Type is not checked (`curl -d` sends a form type), only the bytes.
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        // Any failure to read is reported as too large: the limit is the only way reading a body
        // fails while the client still listens.
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|_| ApiError::TooLarge)?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::InvalidRequest(format!("the body is not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(ApiError::InvalidRequest(
                "the body must be a JSON object".into(),
            ));
        };
        Ok(JsonObject(obj))
    }
}
