//! `Idempotency-Key` on POST /v1/generate, as a layer of that route: a request with the header
//! is claimed (infer/idempotency.rs) before the handler runs; a repeat gets the first response
//! (with the first request's `X-Request-Id` and `Idempotent-Replayed: true`) without running or
//! paying again. Requests without the header pass straight through.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::context::X_REQUEST_ID;
use super::error::ApiError;
use super::extract::MAX_BODY_BYTES;
use super::AppState;
use crate::infer::{Idempotent, InferError, RequestId};

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = req.headers().get(&IDEMPOTENCY_KEY) else {
        return next.run(req).await;
    };
    let Ok(key) = key.to_str().map(|k| k.trim().to_string()) else {
        return ApiError::from(InferError::InvalidIdempotencyKey).into_response();
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // Keys are per caller; a caller that is refused is answered by the handler (401).
    let Ok(caller) = state.facade.authenticate(authorization.as_deref()).await else {
        return next.run(req).await;
    };
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|id| id.as_str().to_string())
        .unwrap_or_default();
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return ApiError::TooLarge.into_response();
    };
    let run = match state.facade.idempotent(&caller, &key, &bytes, &id).await {
        Err(e) => return ApiError::from(e).into_response(),
        Ok(Idempotent::Replay { request_id, body }) => return replay(&request_id, body),
        Ok(Idempotent::Run(run)) => run,
    };
    let res = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if res.status() != StatusCode::OK {
        run.finish(None).await;
        return res;
    }
    let (parts, body) = res.into_parts();
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => {
            run.finish(std::str::from_utf8(&bytes).ok()).await;
            Response::from_parts(parts, Body::from(bytes))
        }
        Err(e) => {
            run.finish(None).await;
            ApiError::from(InferError::Internal(format!("reading the response: {e}")))
                .into_response()
        }
    }
}

/// The first request's response, again.
fn replay(request_id: &str, body: String) -> Response {
    let mut res = Response::new(Body::from(body));
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(IDEMPOTENT_REPLAYED.clone(), HeaderValue::from_static("true"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    res
}
