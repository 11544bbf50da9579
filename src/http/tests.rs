#![allow(clippy::unwrap_used)]
//! Router tests without a socket or a model (the fake generator); the end-to-end tests with the
//! real binary and the tiny model are in tests/server_*.rs.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::accounts::{Accounts, NewKey};
use crate::catalog::Catalog;
use crate::infer::fake::{Fake, Mode};
use crate::infer::AuthPolicy;
use crate::store::FileStore;

pub(super) struct T {
    pub _dir: tempfile::TempDir,
    pub app: Router,
    pub key: String,
}

pub(super) async fn app(keys: bool) -> T {
    let dir = tempfile::tempdir().unwrap();
    let accounts = Accounts::open(dir.path()).await.unwrap();
    let key = accounts
        .create_key(NewKey {
            name: String::new(),
            credits: 1000,
            daily_quota: None,
        })
        .await
        .unwrap()
        .secret;
    let policy = if keys {
        AuthPolicy::Keys(accounts)
    } else {
        AuthPolicy::Open
    };
    let facade = Facade::new(
        Catalog::builtin().unwrap(),
        policy,
        FileStore::open(dir.path()).unwrap(),
        Fake::new(Mode::Succeed),
    );
    let url = PublicUrl::new(
        Some("http://example.test:9/"),
        "127.0.0.1:1".parse().unwrap(),
    );
    T {
        _dir: dir,
        app: router(AppState::new(Arc::new(facade), url)),
        key,
    }
}

pub(super) struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.bytes)))
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap().to_string()
    }
}

pub(super) async fn send(app: &Router, req: Request<Body>) -> Reply {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Reply {
        status,
        headers,
        bytes,
    }
}

fn post(body: impl Into<Body>, auth: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/v1/generate").header("content-type", "application/json");
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(body.into()).unwrap()
}

pub(super) fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn success_shape_and_request_id() {
    let t = app(false).await;
    let body = json!({"prompt": "a cat", "model": "flux-2-pro", "width": 256, "height": 256, "num_images": 2});
    let r = send(&t.app, post(body.to_string(), None)).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["success"], true);
    assert_eq!(v["credits_used"], 500);
    let id = v["request_id"].as_str().unwrap();
    assert_eq!(r.headers["x-request-id"], id);
    let url = v["images"][1]["url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("http://example.test:9/files/gen/{id}/image_1.jpg")
    );
    let f = send(&t.app, get(&format!("/files/gen/{id}/image_1.jpg"))).await;
    assert_eq!(f.status, StatusCode::OK);
    assert_eq!(f.headers["content-type"], "image/jpeg");
    assert!(f.headers.get("x-request-id").is_some());
}

#[tokio::test]
async fn body_errors_are_contract_json() {
    let t = app(false).await;
    for (body, needle) in [
        ("{not json".to_string(), "JSON"),
        ("".to_string(), "JSON"),
        ("[1,2]".to_string(), "object"),
        ("\"text\"".to_string(), "object"),
        (
            json!({"prompt": "x", "model": "flux-2-pro", "width": "512"}).to_string(),
            "'width'",
        ),
    ] {
        let r = send(&t.app, post(body.clone(), None)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(r.code(), "invalid_request", "{body}");
        let v = r.json();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
        assert_eq!(v["success"], false);
        assert_eq!(r.headers["x-request-id"], v["request_id"].as_str().unwrap());
        assert_eq!(r.headers["content-type"], "application/json");
    }
}

#[tokio::test]
async fn body_over_64_kib_is_413_json() {
    let t = app(false).await;
    let prompt = "a".repeat(MAX_BODY_BYTES);
    let r = send(
        &t.app,
        post(
            json!({"prompt": prompt, "model": "flux-2-pro"}).to_string(),
            None,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "request_too_large");
    // Just under the limit is fine as far as size goes (then the prompt is too long).
    let prompt = "a".repeat(MAX_BODY_BYTES - 100);
    let r = send(
        &t.app,
        post(
            json!({"prompt": prompt, "model": "flux-2-pro"}).to_string(),
            None,
        ),
    )
    .await;
    assert_eq!(r.code(), "prompt_too_long");
}

#[tokio::test]
async fn auth_is_checked_before_the_body() {
    let t = app(true).await;
    let r = send(&t.app, post("{not json", None)).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_api_key".to_string())
    );
    let r = send(&t.app, post("{not json", Some("Bearer dk_wrong"))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let auth = format!("Bearer {}", t.key);
    let r = send(&t.app, post("{not json", Some(&auth))).await;
    assert_eq!(r.code(), "invalid_request");
    let r = send(
        &t.app,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(
        &t.app,
        Request::get("/v1/models")
            .header("authorization", &auth)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn models_lists_the_catalog() {
    let t = app(false).await;
    let r = send(&t.app, get("/v1/models")).await;
    let v = r.json();
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 8);
    assert_eq!(models[0]["id"], "z-image-turbo");
    assert_eq!(models[0]["loaded"], true);
    let gpt = models.iter().find(|m| m["id"] == "gpt-image-2").unwrap();
    assert_eq!(gpt["pricing"]["credits_per_image"]["4k"]["high"], 3200);
    assert_eq!(gpt["credits_per_image"], 200);
}

#[tokio::test]
async fn other_paths_are_404_and_wrong_methods_405() {
    let t = app(false).await;
    for uri in [
        "/files",
        "/files/",
        "/files/gen",
        "/files/gen/",
        "/files/gen/req_0123456789abcdef",
        "/files/gen/req_0123456789abcdef/image_0.jpg",
        "/files/gen/..%2F..%2Faccounts.db/image_0.jpg",
        "/files/gen/req_0123456789abcdef/..%2F..%2F..%2Faccounts.db",
        "/files/accounts.db",
        "/files/../accounts.db",
        "/files/gen/%FF/image_0.jpg",
        "/v1/nothing",
    ] {
        let r = send(&t.app, get(uri)).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(r.code(), "not_found", "{uri}");
    }
    let r = send(&t.app, get("/v1/generate")).await;
    assert_eq!(
        (r.status, r.code()),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed".to_string()
        )
    );
    assert!(r.headers.get("x-request-id").is_some());
}

#[tokio::test]
async fn health_and_metrics() {
    let t = app(false).await;
    let r = send(&t.app, get("/health")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "ok");
    send(&t.app, post("{}", None)).await;
    let r = send(&t.app, get("/metrics")).await;
    let text = String::from_utf8(r.bytes).unwrap();
    assert!(text.contains("diffusiond_http_responses_total{method=\"POST\",route=\"/v1/generate\",status=\"400\",code=\"missing_prompt\"} 1"), "{text}");
}

#[test]
fn public_url_rules() {
    let h = |host: &str| {
        let mut m = HeaderMap::new();
        m.insert("host", host.parse().unwrap());
        m
    };
    let any = PublicUrl::new(None, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(any.base(&h("img.example:8080")), "http://img.example:8080");
    assert_eq!(any.base(&h("evil/path")), "http://0.0.0.0:8080");
    let local = PublicUrl::new(None, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(local.base(&h("other")), "http://127.0.0.1:8080");
    let fixed = PublicUrl::new(Some("https://x.test/base/"), "127.0.0.1:1".parse().unwrap());
    assert_eq!(fixed.base(&HeaderMap::new()), "https://x.test/base");
}
