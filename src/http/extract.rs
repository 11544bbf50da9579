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

/// A request body: `Content-Type: application/json`, at most 64 KiB of JSON holding an object.
/// The type is required because the others (a form, `text/plain`) are what a page on another
/// site may make a browser send without asking the server first.
pub struct JsonObject(pub Map<String, Value>);

/// 415 unless the request says its body is JSON (`application/json`, parameters allowed).
pub fn require_json(headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        require_json(req.headers())?;
        // A declared length over the limit is refused before a byte of the body is read.
        let declared = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return Err(ApiError::TooLarge);
        }
        let bytes = read_body(req.into_body(), MAX_BODY_BYTES).await?;
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

/// The body's bytes, at most `limit`: 413 beyond it, 400 when the body itself is malformed (a bad
/// chunk, a connection cut mid-body), which is the client's error, not its size.
async fn read_body(mut body: axum::body::Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body::Body as _;
    let mut buf = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| {
            ApiError::InvalidRequest(format!("the request body could not be read: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ApiError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}
