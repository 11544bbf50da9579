//! Middleware around every route: gives the request its ID, renders error payloads into the
//! contract's JSON body with that ID, sets `X-Request-Id`, and counts the response.

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ErrorPayload;
use super::openai::OPENAI_PREFIX;
use super::AppState;
use crate::infer::RequestId;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub async fn request_context(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = RequestId::generate();
    req.extensions_mut().insert(id.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let method = req.method().clone();

    let mut res = next.run(req).await;

    let code = res.extensions_mut().remove::<ErrorPayload>().map(|p| {
        if let Some(detail) = &p.detail {
            tracing::error!(request_id = %id, code = p.code, "{detail}");
        }
        // The OpenAI-compatible routes answer in OpenAI's error shape, the rest in the contract's.
        let body = if route
            .as_deref()
            .is_some_and(|r| r.starts_with(OPENAI_PREFIX))
        {
            p.openai_body()
        } else {
            p.hosted_body(id.as_str())
        };
        *res.body_mut() = Body::from(body.to_string());
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res.headers_mut().remove(header::CONTENT_LENGTH);
        p.code
    });
    // A replayed response (Idempotency-Key) keeps the first request's ID.
    if !res.headers().contains_key(&X_REQUEST_ID) {
        if let Ok(v) = HeaderValue::from_str(id.as_str()) {
            res.headers_mut().insert(X_REQUEST_ID.clone(), v);
        }
    }
    state.http_metrics.record(
        method.as_str(),
        route.as_deref(),
        res.status().as_u16(),
        code,
    );
    res
}
