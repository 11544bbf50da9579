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
    let res = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let streamed = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
    if res.status() != StatusCode::OK || streamed {
        // Not kept for replay (an event stream is not answered twice): a retry runs again.
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
    headers.insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    res
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use super::super::{router, AppState, PublicUrl};
    use crate::accounts::{Accounts, NewKey};
    use crate::catalog::Catalog;
    use crate::infer::fake::{Fake, Mode};
    use crate::infer::{AuthPolicy, Facade};
    use crate::store::FileStore;

    async fn send(
        app: &axum::Router,
        body: &str,
        key: &str,
        idem: Option<&str>,
    ) -> (u16, axum::http::HeaderMap, Vec<u8>) {
        let mut b = Request::post("/v1/generate")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"));
        if let Some(k) = idem {
            b = b.header("idempotency-key", k);
        }
        let res = app
            .clone()
            .oneshot(b.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let (status, headers) = (res.status().as_u16(), res.headers().clone());
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, bytes.to_vec())
    }

    /// The same key and body: the first response again, charged once; another body: 409; a
    /// failed first request: the retry runs (and is charged once, when it succeeds).
    #[tokio::test]
    async fn repeats_are_answered_once_and_charged_once() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::open(dir.path()).await.unwrap();
        let accounts = accounts.register_instance().await.unwrap();
        let created = accounts
            .create_key(NewKey {
                name: String::new(),
                credits: 10_000,
                daily_quota: None,
            })
            .await
            .unwrap();
        let (key, id) = (created.secret, created.info.id);
        let fake = Fake::new(Mode::Succeed);
        let facade = Facade::new(
            Catalog::builtin().unwrap(),
            AuthPolicy::Keys(accounts.clone()),
            FileStore::open(dir.path()).unwrap(),
            fake.clone(),
        )
        .with_idempotency(accounts.clone());
        let url = PublicUrl::new(None, "127.0.0.1:1".parse().unwrap());
        let app = router(AppState::new(Arc::new(facade), url));
        let body = json!({"prompt": "a cat", "model": "flux-2-pro", "width": 256, "height": 256})
            .to_string();
        let balance = || async { accounts.key_info(&id).await.unwrap().balance };

        let (s1, h1, b1) = send(&app, &body, &key, Some("order-1")).await;
        assert_eq!(s1, 200, "{}", String::from_utf8_lossy(&b1));
        let after_first = balance().await;
        assert!(after_first < 10_000);
        let (s2, h2, b2) = send(&app, &body, &key, Some("order-1")).await;
        assert_eq!((s2, &b2), (200, &b1));
        assert_eq!(h2["idempotent-replayed"], "true");
        assert_eq!(h2["x-request-id"], h1["x-request-id"]);
        assert_eq!(balance().await, after_first, "charged once");

        let other = json!({"prompt": "a dog", "model": "flux-2-pro", "width": 256, "height": 256})
            .to_string();
        let (s3, _, b3) = send(&app, &other, &key, Some("order-1")).await;
        assert_eq!(s3, 409);
        let v: Value = serde_json::from_slice(&b3).unwrap();
        assert_eq!(v["error"]["code"], "idempotency_key_reused");
        assert_eq!(v["success"], false);
        assert_eq!(balance().await, after_first);

        let (s4, _, b4) = send(&app, &body, &key, Some("  ")).await;
        assert_eq!(s4, 400);
        let v: Value = serde_json::from_slice(&b4).unwrap();
        assert_eq!(v["error"]["code"], "invalid_idempotency_key");

        // A failed first request forgets the key: the retry runs, and pays once.
        *fake.mode.lock().unwrap() = Mode::Fail;
        let (s5, _, _) = send(&app, &body, &key, Some("order-2")).await;
        assert_eq!(s5, 500);
        assert_eq!(balance().await, after_first, "the failure was refunded");
        *fake.mode.lock().unwrap() = Mode::Succeed;
        let (s6, _, _) = send(&app, &body, &key, Some("order-2")).await;
        assert_eq!(s6, 200);
        let price = 10_000 - after_first;
        assert_eq!(balance().await, after_first - price);

        // Without the header every request runs and pays.
        send(&app, &body, &key, None).await;
        send(&app, &body, &key, None).await;
        assert_eq!(balance().await, after_first - 3 * price);
    }
}
