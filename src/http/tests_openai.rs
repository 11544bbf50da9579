#![allow(clippy::unwrap_used)]
//! Router tests of the OpenAI route, the event streams, the OpenAPI document and the playground,
//! with the fake generator (no model). End to end with the real binary: tests/server_openai*.rs.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use serde_json::{json, Value};

use super::tests::{app, get, send};
use super::*;

fn post_to(path: &str, body: Value, headers: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::post(path).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

/// (event name, data) of a text/event-stream body.
fn events(bytes: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            Some((name?, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test]
async fn openai_b64_json_is_raw_base64_of_a_png() {
    let t = app(false).await;
    let body = json!({"prompt": "a cat", "model": "flux-2-pro", "n": 2, "size": "256x256", "seed": 9,
        "moderation": "auto", "user": "someone", "quality": "high"});
    let r = send(&t.app, post_to("/v1/images/generations", body, &[])).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["size"], "256x256");
    assert_eq!(v["output_format"], "png");
    assert_eq!(v["background"], "opaque");
    assert_eq!(v["quality"], "high");
    assert_eq!(
        v["credits_used"], 500,
        "the catalog price of flux-2-pro x 2"
    );
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, d) in data.iter().enumerate() {
        assert!(d.get("url").is_none());
        assert_eq!(d["seed"], 9 + i as u64);
        let b64 = d["b64_json"].as_str().unwrap();
        assert!(!b64.starts_with("data:"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!(
            image::guess_format(&bytes).unwrap(),
            image::ImageFormat::Png
        );
        assert_eq!((img.width(), img.height()), (256, 256));
    }
}

#[tokio::test]
async fn openai_url_points_into_the_store() {
    let t = app(false).await;
    let body = json!({"prompt": "a cat", "size": "256x256", "response_format": "url",
        "output_format": "jpeg", "output_compression": 40});
    let r = send(&t.app, post_to("/v1/images/generations", body, &[])).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    let url = v["data"][0]["url"].as_str().unwrap();
    let id = v["request_id"].as_str().unwrap();
    assert_eq!(
        url,
        format!("http://example.test:9/files/gen/{id}/image_0.jpg")
    );
    assert!(v["data"][0].get("b64_json").is_none());
    let f = send(&t.app, get(&format!("/files/gen/{id}/image_0.jpg"))).await;
    assert_eq!(f.status, StatusCode::OK);
}

#[tokio::test]
async fn openai_errors_have_openai_shape() {
    let t = app(true).await;
    // No key in keys mode.
    let r = send(
        &t.app,
        post_to("/v1/images/generations", json!({"prompt": "x"}), &[]),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "authentication_error");
    assert_eq!(e["code"], "invalid_api_key");
    assert!(r.json().get("success").is_none());
    assert!(r.headers.get("x-request-id").is_some());

    let auth = format!("Bearer {}", t.key);
    for (body, status, code, param) in [
        (
            json!({"model": "flux-2-pro"}),
            400,
            "missing_prompt",
            json!("prompt"),
        ),
        (
            json!({"prompt": "x", "model": "nope"}),
            400,
            "invalid_model",
            json!("model"),
        ),
        (
            json!({"prompt": "x", "n": 5}),
            400,
            "invalid_num_images",
            json!("n"),
        ),
        (
            json!({"prompt": "x", "size": "100x100"}),
            400,
            "invalid_dimensions",
            json!("size"),
        ),
        (
            json!({"prompt": "x", "background": "transparent"}),
            400,
            "invalid_parameter",
            json!("background"),
        ),
        (
            json!({"prompt": "x", "n": "2"}),
            400,
            "invalid_request",
            json!("n"),
        ),
        // 1000 credits on the key; 4 x 800 is more.
        (
            json!({"prompt": "x", "model": "seedream-v4.5", "n": 4, "size": "256x256"}),
            402,
            "insufficient_credits",
            Value::Null,
        ),
    ] {
        let r = send(
            &t.app,
            post_to(
                "/v1/images/generations",
                body.clone(),
                &[("authorization", &auth)],
            ),
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "{body}");
        let e = &r.json()["error"];
        assert_eq!(e["code"], code, "{body}");
        assert_eq!(e["param"], param, "{body}");
        let expected_type = if status == 402 {
            "insufficient_quota"
        } else {
            "invalid_request_error"
        };
        assert_eq!(e["type"], expected_type, "{body}");
        assert!(!e["message"].as_str().unwrap().is_empty());
    }
    // The hosted route keeps the contract's shape.
    let r = send(
        &t.app,
        post_to(
            "/v1/generate",
            json!({"model": "flux-2-pro"}),
            &[("authorization", &auth)],
        ),
    )
    .await;
    assert_eq!(r.json()["success"], false);
    assert_eq!(r.code(), "missing_prompt");
}

#[tokio::test]
async fn models_answer_in_both_shapes() {
    let t = app(false).await;
    let v = send(&t.app, get("/v1/models")).await.json();
    assert_eq!(v["success"], true);
    assert_eq!(v["object"], "list");
    let models = v["models"].as_array().unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(models.len(), data.len());
    for (m, d) in models.iter().zip(data) {
        assert_eq!(m["id"], d["id"]);
        assert_eq!(d["object"], "model");
        assert!(d["created"].is_u64());
        assert_eq!(
            d["owned_by"],
            format!("diffusiond:{}", m["pipeline"].as_str().unwrap())
        );
    }
}

#[tokio::test]
async fn hosted_event_stream_ends_with_the_plain_body() {
    let t = app(false).await;
    let body = json!({"prompt": "a cat", "model": "flux-2-pro", "width": 256, "height": 256,
        "num_images": 2, "seed": 4, "steps": 3});
    let r = send(
        &t.app,
        post_to(
            "/v1/generate",
            body.clone(),
            &[("accept", "text/event-stream")],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = events(&r.bytes);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["queued", "started", "step", "step", "step", "completed"]
    );
    assert_eq!(ev[0].1, json!({"position": 1}));
    assert_eq!(ev[4].1, json!({"step": 3, "steps": 3}));
    let done = &ev[5].1;
    let id = done["request_id"].as_str().unwrap();
    assert_eq!(r.headers["x-request-id"], id);
    // Exactly what the plain call answers: same keys, same values but the request's own ID.
    let plain = send(&t.app, post_to("/v1/generate", body, &[]))
        .await
        .json();
    let pid = plain["request_id"].as_str().unwrap();
    let expected: Value = serde_json::from_str(&plain.to_string().replace(pid, id)).unwrap();
    assert_eq!(done, &expected);
}

#[tokio::test]
async fn stream_refusals_keep_their_status() {
    let t = app(true).await;
    let r = send(
        &t.app,
        post_to(
            "/v1/generate",
            json!({"prompt": "x", "model": "flux-2-pro"}),
            &[("accept", "text/event-stream")],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "invalid_api_key");
    let auth = format!("Bearer {}", t.key);
    let r = send(
        &t.app,
        post_to(
            "/v1/generate",
            json!({"prompt": "x", "model": "flux-2-pro", "partial_images": 9}),
            &[("accept", "text/event-stream"), ("authorization", &auth)],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "invalid_parameter");
}

#[tokio::test]
async fn openai_stream_sends_completed_per_image() {
    let t = app(false).await;
    let body = json!({"prompt": "a cat", "size": "256x256", "n": 2, "stream": true,
        "output_format": "webp"});
    let r = send(&t.app, post_to("/v1/images/generations", body, &[])).await;
    assert_eq!(r.status, StatusCode::OK);
    let ev = events(&r.bytes);
    assert_eq!(ev.len(), 2, "{ev:?}");
    for (i, (name, data)) in ev.iter().enumerate() {
        assert_eq!(name, "image_generation.completed");
        assert_eq!(data["type"], "image_generation.completed");
        assert_eq!(data["image_index"], i);
        assert_eq!(data["output_format"], "webp");
        assert_eq!(data["size"], "256x256");
        assert_eq!(data["usage"]["total_tokens"], 0);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data["b64_json"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            image::guess_format(&bytes).unwrap(),
            image::ImageFormat::WebP
        );
    }
}

/// (method, path) of every operation in the document.
fn documented() -> BTreeSet<(String, String)> {
    let doc: Value = serde_json::from_str(openapi::document()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            out.insert((method.clone(), path.clone()));
        }
    }
    out
}

#[tokio::test]
async fn the_document_lists_exactly_the_routes() {
    let doc: Value = serde_json::from_str(openapi::document()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let routed: BTreeSet<(String, String)> = routes()
        .into_iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented(), routed);
    // And each documented operation is served by the router with that method (a wrong method
    // answers 405, an unrouted path the 404 fallback).
    let t = app(false).await;
    for (method, path) in documented() {
        let concrete = path
            .replace("{request_id}", "req_AAAAAAAAAAAAAAAA")
            .replace("{file}", "image_0.png")
            .replace("{asset}", "app.js");
        let wrong = if method == "get" { "DELETE" } else { "GET" };
        let r = send(
            &t.app,
            Request::builder()
                .method(wrong)
                .uri(&concrete)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
    }
}

/// Every documented request field is one the route's parser reads: a value of the wrong JSON type
/// is refused naming that field.
#[tokio::test]
async fn documented_request_fields_are_parsed() {
    let doc: Value = serde_json::from_str(openapi::document()).unwrap();
    let t = app(false).await;
    for (path, schema, ignored) in [
        ("/v1/generate", "GenerateRequestDoc", &[][..]),
        (
            "/v1/images/generations",
            "OpenAiImagesRequestDoc",
            &["moderation", "user"][..],
        ),
    ] {
        let props = doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{schema} not in the document"));
        assert!(props.len() > 10, "{schema}");
        for name in props.keys().filter(|n| !ignored.contains(&n.as_str())) {
            let mut body = json!({"prompt": "x", "model": "flux-2-pro"});
            body[name] = json!([[]]);
            let headers: &[(&str, &str)] = if name == "partial_images" {
                &[("accept", "text/event-stream")]
            } else {
                &[]
            };
            let r = send(&t.app, post_to(path, body, headers)).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path} {name}");
            let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
            assert!(msg.contains(&format!("'{name}'")), "{path} {name}: {msg}");
        }
    }
}

#[tokio::test]
async fn playground_and_docs_are_served_from_the_binary() {
    let t = app(false).await;
    let page = send(&t.app, get("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = String::from_utf8(page.bytes).unwrap();
    assert!(html.contains("/playground/app.js") && html.contains("id=\"prompt\""));
    assert!(!html.contains("https://"), "no CDN");
    for (asset, kind) in [("app.js", "text/javascript"), ("app.css", "text/css")] {
        let r = send(&t.app, get(&format!("/playground/{asset}"))).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with(kind));
    }
    assert_eq!(
        send(&t.app, get("/playground/x.js")).await.status,
        StatusCode::NOT_FOUND
    );
    let docs = send(&t.app, get("/docs")).await;
    assert_eq!(docs.status, StatusCode::OK);
    assert!(String::from_utf8(docs.bytes)
        .unwrap()
        .contains("/openapi.json"));
    let j = send(&t.app, get("/openapi.json")).await;
    assert_eq!(j.headers["content-type"], "application/json");
    assert_eq!(j.json()["info"]["title"], "diffusiond");
}

#[tokio::test]
async fn account_shows_the_keys_credits() {
    let t = app(true).await;
    let auth = format!("Bearer {}", t.key);
    let r = send(
        &t.app,
        Request::get("/v1/account")
            .header("authorization", &auth)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.json()["credits"], 1000);
    assert_eq!(r.json()["auth"], "keys");
    assert_eq!(
        send(&t.app, get("/v1/account")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let open = app(false).await;
    assert_eq!(
        send(&open.app, get("/v1/account")).await.json()["auth"],
        "open"
    );
}
