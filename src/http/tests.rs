#![allow(clippy::unwrap_used)]
//! Router tests without a socket or a model (the fake generator); the end-to-end tests with the
//! real binary and the tiny model are in tests/server_*.rs.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::extract::MAX_BODY_BYTES;
use super::*;
use crate::accounts::{Accounts, NewKey};
use crate::catalog::Catalog;
use crate::infer::fake::{Fake, Mode};
use crate::infer::{AuthPolicy, WorkerState};
use crate::store::FileStore;

pub(super) struct T {
    pub _dir: tempfile::TempDir,
    pub app: Router,
    pub key: String,
    pub fake: Arc<Fake>,
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
    let fake = Fake::new(Mode::Succeed);
    let facade = Facade::new(
        Catalog::builtin().unwrap(),
        policy,
        FileStore::open(dir.path()).unwrap(),
        fake.clone(),
    );
    let url = PublicUrl::new(
        Some("http://example.test:9/"),
        "127.0.0.1:1".parse().unwrap(),
    );
    T {
        _dir: dir,
        app: router(AppState::new(Arc::new(facade), url)),
        key,
        fake,
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
    // How steps and guidance change the price (issue 15, finding 3).
    assert_eq!(gpt["default_steps"], 8);
    assert_eq!(gpt["pricing"]["quality_steps"]["low"], 4);
    assert_eq!(gpt["guidance_doubles_price"], true);
    assert!(gpt["price_rule"]
        .as_str()
        .unwrap()
        .contains("x 2 with guidance_scale"));
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

/// `/health` follows the device worker: 503 once it stopped.
#[tokio::test]
async fn health_reports_the_worker_state() {
    let t = app(false).await;
    for (state, status, word) in [
        (
            WorkerState::Stopped,
            StatusCode::SERVICE_UNAVAILABLE,
            "stopped",
        ),
        (WorkerState::Ready, StatusCode::OK, "ok"),
    ] {
        *t.fake.state.lock().unwrap() = state;
        let r = send(&t.app, get("/health")).await;
        assert_eq!(r.status, status, "{state:?}");
        assert_eq!(r.json()["status"], word, "{state:?}");
    }
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

/// Finding 1 of issue 15: with the accounts database full, keys-mode requests fail and /health is
/// 503 with the reason; once space is freed /health is 200 again and every request succeeds.
#[tokio::test]
async fn a_full_database_is_reported_and_recovered_from() {
    use crate::accounts::test_util::{fill_up, free_space, open_small};
    let dir = tempfile::tempdir().unwrap();
    let accounts = open_small(dir.path()).await;
    let key = accounts
        .create_key(NewKey {
            name: String::new(),
            credits: 1_000_000,
            daily_quota: None,
        })
        .await
        .unwrap()
        .secret;
    let facade = Facade::new(
        Catalog::builtin().unwrap(),
        AuthPolicy::Keys(accounts.clone()),
        FileStore::open(dir.path()).unwrap(),
        Fake::new(Mode::Succeed),
    );
    let url = PublicUrl::new(None, "127.0.0.1:1".parse().unwrap());
    let app = router(AppState::new(Arc::new(facade), url));
    let auth = format!("Bearer {key}");
    let body = json!({"prompt": "a cat", "model": "flux-2-pro", "width": 256, "height": 256});

    fill_up(&accounts).await;
    let mut ok = 0;
    let failed = loop {
        let r = send(&app, post(body.to_string(), Some(&auth))).await;
        if r.status != StatusCode::OK {
            break r;
        }
        ok += 1;
        assert!(ok < 10_000, "the database never filled up");
    };
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.code(), "internal_error");
    let h = send(&app, get("/health")).await;
    assert_eq!(h.status, StatusCode::SERVICE_UNAVAILABLE);
    let reason = h.json()["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("full"), "{reason}");

    free_space(&accounts).await;
    let h = send(&app, get("/health")).await;
    assert_eq!(h.status, StatusCode::OK, "{:?}", h.json());
    for i in 0..10 {
        let r = send(&app, post(body.to_string(), Some(&auth))).await;
        assert_eq!(r.status, StatusCode::OK, "request {i} after freeing space");
    }
    let info = accounts.list_keys().await.unwrap();
    assert_eq!(info[0].balance, 1_000_000 - 250 * (ok + 10));
    assert_eq!(info[0].used_today, ok + 10);
}

/// Finding 2 of issue 15: stored files are served as a file server serves them: an ETag,
/// If-None-Match answered 304, single byte ranges answered 206, an unsatisfiable one 416.
#[tokio::test]
async fn files_have_etags_and_ranges() {
    let t = app(false).await;
    let body = json!({"prompt": "a cat", "model": "flux-2-pro", "width": 256, "height": 256, "output_format": "png"});
    let v = send(&t.app, post(body.to_string(), None)).await.json();
    let uri = format!(
        "/files/gen/{}/image_0.png",
        v["request_id"].as_str().unwrap()
    );
    let whole = send(&t.app, get(&uri)).await;
    assert_eq!(whole.status, StatusCode::OK);
    let len = whole.bytes.len();
    assert!(len > 100);
    assert_eq!(whole.headers["content-length"], len.to_string().as_str());
    assert_eq!(whole.headers["accept-ranges"], "bytes");
    let tag = whole.headers["etag"].to_str().unwrap().to_string();

    let with = |name: &str, value: &str| {
        Request::get(&uri)
            .header(name, value)
            .body(Body::empty())
            .unwrap()
    };
    let r = send(&t.app, with("if-none-match", &tag)).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.bytes.is_empty());
    let r = send(&t.app, with("if-none-match", "\"other\"")).await;
    assert_eq!((r.status, r.bytes.len()), (StatusCode::OK, len));

    let r = send(&t.app, with("range", "bytes=10-19")).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes, whole.bytes[10..20]);
    assert_eq!(
        r.headers["content-range"],
        format!("bytes 10-19/{len}").as_str()
    );
    let r = send(&t.app, with("range", "bytes=-5")).await;
    assert_eq!(r.bytes, whole.bytes[len - 5..]);
    let r = send(&t.app, with("range", &format!("bytes={len}-"))).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.code(), "range_not_satisfiable");
    assert_eq!(
        r.headers["content-range"],
        format!("bytes */{len}").as_str()
    );
    // If-Range with another version: the whole (new) file.
    let r = Request::get(&uri)
        .header("range", "bytes=0-9")
        .header("if-range", "\"old\"")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&t.app, r).await.bytes.len(), len);
}

/// Finding 6 of issue 15: a page on another site could drive an open server through the
/// browser (a `text/plain` POST needs no preflight) and, through DNS rebinding, read the answer.
#[tokio::test]
async fn json_routes_need_a_json_content_type() {
    let t = app(false).await;
    let body = json!({"prompt": "a cat", "model": "flux-2-pro", "width": 256, "height": 256});
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut b = Request::post("/v1/generate");
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        let r = send(&t.app, b.body(Body::from(body.to_string())).unwrap()).await;
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        assert_eq!(r.code(), "unsupported_media_type");
    }
    let r = Request::post("/v1/generate")
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(Body::from(body.to_string()))
        .unwrap();
    assert_eq!(send(&t.app, r).await.status, StatusCode::OK);
}

#[tokio::test]
async fn foreign_hosts_and_origins_are_refused() {
    let t = app(false).await;
    let state_app = |web: WebPolicy| {
        let facade = Facade::new(
            Catalog::builtin().unwrap(),
            AuthPolicy::Open,
            FileStore::open(t._dir.path()).unwrap(),
            Fake::new(Mode::Succeed),
        );
        let url = PublicUrl::new(None, "127.0.0.1:8080".parse().unwrap());
        router(AppState::new(Arc::new(facade), url).with_web_policy(web))
    };
    let loopback = state_app(WebPolicy {
        allowed_hosts: Some(vec!["localhost".into(), "127.0.0.1".into()]),
        cors_origins: vec!["https://app.example".into()],
    });
    let req = |host: &str, origin: Option<&str>| {
        let mut b = Request::get("/v1/models").header("host", host);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(Body::empty()).unwrap()
    };
    // DNS rebinding: the page's own host name.
    let r = send(&loopback, req("evil.example:8080", None)).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "host_not_allowed".into())
    );
    assert!(r.headers.get("x-request-id").is_some());
    assert_eq!(
        send(&loopback, req("LOCALHOST:8080", None)).await.status,
        StatusCode::OK
    );
    // Cross-origin: refused; same origin (the playground): fine; a listed origin: CORS.
    let r = send(
        &loopback,
        req("127.0.0.1:8080", Some("http://evil.example")),
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::FORBIDDEN, "origin_not_allowed".into())
    );
    let r = send(&loopback, req("127.0.0.1:8080", Some("null"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = send(
        &loopback,
        req("127.0.0.1:8080", Some("http://127.0.0.1:8080")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        &loopback,
        req("127.0.0.1:8080", Some("https://app.example")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example"
    );
    let pre = Request::options("/v1/generate")
        .header("host", "127.0.0.1:8080")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .body(Body::empty())
        .unwrap();
    let r = send(&loopback, pre).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("content-type"));
    // A cross-site POST is refused before it reaches the generator.
    let post = Request::post("/v1/generate")
        .header("host", "127.0.0.1:8080")
        .header("origin", "http://evil.example")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"prompt":"x","model":"flux-2-pro"}"#))
        .unwrap();
    assert_eq!(send(&loopback, post).await.status, StatusCode::FORBIDDEN);
    // Without a host list (keys mode, or not loopback) any Host is fine.
    let any = state_app(WebPolicy::default());
    assert_eq!(
        send(&any, req("img.example", None)).await.status,
        StatusCode::OK
    );
}

/// A request body that never arrives, or breaks: what a client may send after its headers.
struct TestBody(bool);

impl http_body::Body for TestBody {
    type Data = axum::body::Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.0 {
            std::task::Poll::Ready(Some(Err(std::io::Error::other("invalid chunk size"))))
        } else {
            std::task::Poll::Pending
        }
    }
}

fn json_post(body: TestBody, content_length: Option<usize>) -> Request<Body> {
    let mut b = Request::post("/v1/generate").header("content-type", "application/json");
    if let Some(n) = content_length {
        b = b.header("content-length", n);
    }
    b.body(Body::new(body)).unwrap()
}

/// Issue 15, finding 7: a declared length over the limit was read (waited for) before the 413.
#[tokio::test]
async fn a_declared_length_over_64_kib_is_413_before_reading() {
    let t = app(false).await;
    // The body never comes: only the declared length can answer (the timeout guards a hang).
    let req = json_post(TestBody(false), Some(MAX_BODY_BYTES + 1));
    let r = tokio::time::timeout(std::time::Duration::from_secs(60), send(&t.app, req))
        .await
        .expect("the server waited for a body it had to refuse");
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "request_too_large");
    assert!(r.headers.get("x-request-id").is_some());
}

/// Issue 15, finding 7: a malformed body (bad chunk) was answered 413.
#[tokio::test]
async fn a_malformed_body_is_400_not_413() {
    let t = app(false).await;
    let r = send(&t.app, json_post(TestBody(true), None)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "invalid_request");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not be read"));
}

/// Issue 15, finding 7: /metrics was open to anyone in keys mode; `--metrics-auth` asks for a key.
#[tokio::test]
async fn metrics_can_require_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let accounts = Accounts::open(dir.path()).await.unwrap();
    let key = accounts
        .create_key(NewKey {
            name: String::new(),
            credits: 10,
            daily_quota: None,
        })
        .await
        .unwrap()
        .secret;
    let facade = Facade::new(
        Catalog::builtin().unwrap(),
        AuthPolicy::Keys(accounts),
        FileStore::open(dir.path()).unwrap(),
        Fake::new(Mode::Succeed),
    );
    let url = PublicUrl::new(None, "127.0.0.1:1".parse().unwrap());
    let state = AppState::new(Arc::new(facade), url);
    let open = router(state.clone());
    let guarded = router(state.with_metrics_auth(true));
    let metrics = |key: Option<&str>| {
        let mut b = Request::get("/metrics");
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(Body::empty()).unwrap()
    };
    assert_eq!(send(&open, metrics(None)).await.status, StatusCode::OK);
    let r = send(&guarded, metrics(None)).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "invalid_api_key".into())
    );
    let r = send(&guarded, metrics(Some("dk_wrong"))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = send(&guarded, metrics(Some(&key))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8(r.bytes).unwrap().contains("diffusiond_"));
}

#[tokio::test]
async fn models_show_the_quantization() {
    let text = r#"
[pipelines.zq]
family = "z-image"
weights = "hf:Tongyi-MAI/Z-Image-Turbo"
transformer = "hf:someone/Z-Image-GGUF/z_image-Q4_K_M.gguf"
quantize = "q8_0"
steps = 8
guidance_scale = 0.0

[pipelines.plain]
weights = "/models/z"
steps = 8
guidance_scale = 0.0

[[models]]
id = "zq"
pipeline = "zq"
price = 1
min_size = 64
max_size = 1024
size_step = 16
default_size = 512

[[models]]
id = "plain"
pipeline = "plain"
price = 1
min_size = 64
max_size = 1024
size_step = 16
default_size = 512
"#;
    let dir = tempfile::tempdir().unwrap();
    let facade = Facade::new(
        Catalog::parse("test", text).unwrap(),
        AuthPolicy::Open,
        FileStore::open(dir.path()).unwrap(),
        Fake::new(Mode::Succeed),
    );
    let url = PublicUrl::new(None, "127.0.0.1:1".parse().unwrap());
    let app = router(AppState::new(Arc::new(facade), url));
    let v = send(&app, get("/v1/models")).await.json();
    let q = &v["models"][0]["quantization"];
    assert_eq!(
        q["transformer"],
        "gguf hf:someone/Z-Image-GGUF/z_image-Q4_K_M.gguf"
    );
    assert_eq!(q["text_encoder"], "q8_0 at load");
    assert!(v["models"][1]["quantization"].is_null());
}
