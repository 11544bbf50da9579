//! End to end, open mode (the default on 127.0.0.1): the hosted API's example request, the success
//! shape and the image behind each URL, every validation row of the error table, /v1/models,
//! /health, /metrics and /files. The real binary with the tiny reference model.
#![allow(clippy::unwrap_used)]

mod server_support;

use serde_json::{json, Value};
use server_support::{decode, Server, Workspace, HOSTED_EXAMPLE};

#[test]
fn hosted_example_request_works_with_only_the_base_url_changed() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    assert!(server.banner.contains("auth: open"), "{}", server.banner);

    // Byte for byte what a hosted-API client sends, with its (here ignored) key.
    let r = server.post(HOSTED_EXAMPLE, Some("YOUR_API_KEY"));
    let v = r.success();
    assert_eq!(v["credits_used"], 250);
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let id = v["request_id"].as_str().unwrap();
    let url = images[0]["url"].as_str().unwrap();
    assert_eq!(url, format!("{}/files/gen/{id}/image_0.jpg", server.base));
    assert!(images[0]["seed"].is_u64());

    let file = server.get_url(url);
    assert_eq!(file.status, 200);
    assert_eq!(file.header("content-type").as_deref(), Some("image/jpeg"));
    // The test catalog's default size (the shipped one says 1024).
    assert_eq!(decode(&file.bytes), (image::ImageFormat::Jpeg, 64, 64));
}

#[test]
fn every_format_has_its_content_type_and_exact_size() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    for (format, ext, mime, kind) in [
        ("jpeg", "jpg", "image/jpeg", image::ImageFormat::Jpeg),
        ("png", "png", "image/png", image::ImageFormat::Png),
        ("webp", "webp", "image/webp", image::ImageFormat::WebP),
    ] {
        let body = json!({"prompt": "a red fox", "model": "seedream-v4", "width": 96, "height": 64,
            "num_images": 2, "seed": 7, "output_format": format});
        let v = server.post(&body.to_string(), None).success();
        assert_eq!(v["credits_used"], 400);
        let images = v["images"].as_array().unwrap();
        assert_eq!(images.len(), 2);
        for (i, img) in images.iter().enumerate() {
            assert_eq!(img["seed"], 7 + i as u64);
            let url = img["url"].as_str().unwrap();
            assert!(url.ends_with(&format!("/image_{i}.{ext}")), "{url}");
            let file = server.get_url(url);
            assert_eq!(file.status, 200);
            assert_eq!(file.header("content-type").as_deref(), Some(mime));
            assert_eq!(decode(&file.bytes), (kind, 96, 64), "{format}");
        }
    }
}

#[test]
fn same_seed_gives_the_same_image_whatever_the_batch() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let fetch = |v: &Value, i: usize| {
        server
            .get_url(v["images"][i]["url"].as_str().unwrap())
            .bytes
    };
    let one = |seed: u64| {
        let body = json!({"prompt": "a lighthouse", "model": "z-image-turbo", "seed": seed, "output_format": "png"});
        server.post(&body.to_string(), None).success()
    };
    let a = one(42);
    let b = one(42);
    assert_eq!(fetch(&a, 0), fetch(&b, 0));
    let c = one(43);
    assert_ne!(fetch(&a, 0), fetch(&c, 0));
    // Image 1 of a batch seeded 42 has seed 43: the same image as a lone request seeded 43.
    let body = json!({"prompt": "a lighthouse", "model": "z-image-turbo", "seed": 42, "num_images": 2, "output_format": "png"});
    let batch = server.post(&body.to_string(), None).success();
    assert_eq!(fetch(&batch, 0), fetch(&a, 0));
    assert_eq!(fetch(&batch, 1), fetch(&c, 0));
    // Without a seed, every request gets its own.
    let r1 = server.post(HOSTED_EXAMPLE, None).success();
    let r2 = server.post(HOSTED_EXAMPLE, None).success();
    assert_ne!(r1["images"][0]["seed"], r2["images"][0]["seed"]);
    assert_ne!(r1["request_id"], r2["request_id"]);
}

#[test]
fn unknown_fields_and_nulls_are_ignored() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let body = json!({"prompt": "a cat", "model": "nano-banana-pro", "style": "vivid", "webhook": {"url": "x"},
        "aspect_ratio": "1:1", "width": null, "seed": null, "output_format": null});
    let v = server.post(&body.to_string(), None).success();
    assert_eq!(v["credits_used"], 800);
    // A JSON body sent with another Content-Type (what `curl -d` without -H sends, or a page on
    // another site posting `text/plain`) is refused with 415 in the contract's JSON (issue 15,
    // finding 6): a form type is what a browser sends cross-site without a preflight.
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/generate", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(HOSTED_EXAMPLE)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "unsupported_media_type", "{v}");
}

#[test]
fn gpt_image_2_resolution_and_quality_set_size_and_price() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    for (extra, credits, size) in [
        (json!({}), 200, 64),
        (json!({"quality": "low"}), 50, 64),
        (json!({"resolution": "2k", "quality": "high"}), 1600, 128),
        (
            json!({"resolution": "4k", "quality": "medium", "num_images": 2}),
            1600,
            256,
        ),
    ] {
        let mut body = json!({"prompt": "a bowl of fruit", "model": "gpt-image-2"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let v = server.post(&body.to_string(), None).success();
        assert_eq!(v["credits_used"], credits, "{body}");
        let file = server.get_url(v["images"][0]["url"].as_str().unwrap());
        assert_eq!(decode(&file.bytes).1, size, "{body}");
    }
}

/// (body, status, code) for every validation row of the error table.
fn validation_cases() -> Vec<(String, u16, &'static str)> {
    let ok = |extra: Value| {
        let mut b = json!({"prompt": "a cat", "model": "z-image-turbo"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    let mut cases = vec![
        (
            json!({"model": "z-image-turbo"}).to_string(),
            400,
            "missing_prompt",
        ),
        (ok(json!({"prompt": null})), 400, "missing_prompt"),
        (ok(json!({"prompt": ""})), 400, "missing_prompt"),
        (ok(json!({"prompt": " \t\n "})), 400, "missing_prompt"),
        (
            ok(json!({"prompt": "a".repeat(4001)})),
            400,
            "prompt_too_long",
        ),
        (
            ok(json!({"prompt": "é".repeat(4001)})),
            400,
            "prompt_too_long",
        ),
        (json!({"prompt": "a cat"}).to_string(), 400, "invalid_model"),
        (ok(json!({"model": "dall-e-9"})), 400, "invalid_model"),
        (ok(json!({"model": null})), 400, "invalid_model"),
        (ok(json!({"width": 100})), 400, "invalid_dimensions"),
        (ok(json!({"height": 4096})), 400, "invalid_dimensions"),
        (ok(json!({"width": 0})), 400, "invalid_dimensions"),
        (ok(json!({"width": -64})), 400, "invalid_dimensions"),
        (ok(json!({"width": 32})), 400, "invalid_dimensions"),
        (ok(json!({"num_images": 0})), 400, "invalid_num_images"),
        (ok(json!({"num_images": 5})), 400, "invalid_num_images"),
        (ok(json!({"num_images": -1})), 400, "invalid_num_images"),
        (
            ok(json!({"model": "gpt-image-2", "resolution": "8k"})),
            400,
            "invalid_parameter",
        ),
        (
            ok(json!({"model": "gpt-image-2", "quality": "ultra"})),
            400,
            "invalid_parameter",
        ),
        (ok(json!({"steps": 0})), 400, "invalid_parameter"),
        (ok(json!({"steps": 101})), 400, "invalid_parameter"),
        (ok(json!({"guidance_scale": -1})), 400, "invalid_parameter"),
        (
            ok(json!({"guidance_scale": 20.5})),
            400,
            "invalid_parameter",
        ),
        (ok(json!({"seed": -1})), 400, "invalid_parameter"),
        (ok(json!({"seed": 1e20})), 400, "invalid_parameter"),
        (
            ok(json!({"output_format": "gif"})),
            400,
            "invalid_parameter",
        ),
        (
            "{\"prompt\": \"a cat\", ".to_string(),
            400,
            "invalid_request",
        ),
        ("not json at all".to_string(), 400, "invalid_request"),
        (String::new(), 400, "invalid_request"),
        (
            "[{\"prompt\": \"a cat\"}]".to_string(),
            400,
            "invalid_request",
        ),
        ("\"a cat\"".to_string(), 400, "invalid_request"),
        ("null".to_string(), 400, "invalid_request"),
        (ok(json!({"prompt": 42})), 400, "invalid_request"),
        (ok(json!({"width": "512"})), 400, "invalid_request"),
        (ok(json!({"num_images": 1.5})), 400, "invalid_request"),
        (ok(json!({"seed": "42"})), 400, "invalid_request"),
        (
            ok(json!({"output_format": ["png"]})),
            400,
            "invalid_request",
        ),
        (
            ok(json!({"guidance_scale": "high"})),
            400,
            "invalid_request",
        ),
        (
            ok(json!({"pad": "x".repeat(64 * 1024)})),
            413,
            "request_too_large",
        ),
    ];
    // Checks run in order: a body with several faults reports the first.
    cases.push((
        json!({"prompt": "", "model": "nope", "width": 1}).to_string(),
        400,
        "missing_prompt",
    ));
    cases.push((
        json!({"prompt": "x", "model": "nope", "width": 1}).to_string(),
        400,
        "invalid_model",
    ));
    cases.push((
        ok(json!({"width": 1, "num_images": 9})),
        400,
        "invalid_dimensions",
    ));
    cases
}

#[test]
fn every_validation_row_of_the_error_table() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    for (body, status, code) in validation_cases() {
        let r = server.post(&body, None);
        let shown: String = body.chars().take(120).collect();
        assert_eq!(
            r.status,
            status,
            "{shown}: {}",
            String::from_utf8_lossy(&r.bytes)
        );
        assert_eq!(r.error_code(), code, "{shown}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
    }
    // A wrong JSON type names the field.
    let r = server.post(
        &json!({"prompt": "a", "model": "z-image-turbo", "height": true}).to_string(),
        None,
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("'height'"));
    // The unknown model message lists what is served.
    let r = server.post(&json!({"prompt": "a", "model": "foo"}).to_string(), None);
    let m = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.contains("'foo'") && m.contains("flux-2-pro"), "{m}");
    // 4,000 characters (not bytes) is still fine.
    let r = server.post(
        &json!({"prompt": "é".repeat(4000), "model": "z-image-turbo"}).to_string(),
        None,
    );
    r.success();
}

#[test]
fn a_pipeline_failure_is_500_generation_failed_without_internals() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    // test-broken-size lets 72x72 through; the pipeline needs multiples of 16.
    let r = server.post(
        &json!({"prompt": "a cat", "model": "test-broken-size"}).to_string(),
        None,
    );
    assert_eq!(r.status, 500);
    assert_eq!(r.error_code(), "generation_failed");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        !message.contains("multiple") && !message.contains('/'),
        "{message}"
    );
    // The server keeps serving.
    server.post(HOSTED_EXAMPLE, None).success();
}

#[test]
fn models_health_and_metrics() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let health = server.get("/health", None);
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");

    let r = server.get("/v1/models", None);
    assert_eq!(r.status, 200);
    assert!(r.header("x-request-id").is_some());
    let v = r.json();
    let models = v["models"].as_array().unwrap();
    let ids: Vec<&str> = models.iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in [
        "z-image-turbo",
        "artsyn-light",
        "flux-2-pro",
        "seedream-v4",
        "seedream-v4.5",
        "nano-banana-pro",
        "nano-banana-pro-ultra",
        "gpt-image-2",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    // flux-2-pro is served by FLUX.2 [klein], loaded when first asked for; the rest by
    // Z-Image-Turbo, loaded (and warmed) at start.
    for m in models {
        if m["id"] == "flux-2-pro" {
            assert_eq!(m["pipeline"], "flux2-klein");
            assert_eq!(m["family"], "flux2-klein");
            assert_eq!(m["loaded"], false);
        } else {
            assert_eq!(m["pipeline"], "z-image-turbo");
            assert_eq!(m["family"], "z-image");
            assert_eq!(m["loaded"], true);
        }
    }
    let flux = models.iter().find(|m| m["id"] == "flux-2-pro").unwrap();
    assert_eq!(flux["credits_per_image"], 250);
    assert_eq!(flux["size_step"], 16);
    let gpt = models.iter().find(|m| m["id"] == "gpt-image-2").unwrap();
    assert_eq!(gpt["pricing"]["credits_per_image"]["2k"]["low"], 100);
    assert_eq!(health.json()["pipelines_loaded"], json!(["z-image-turbo"]));

    server.post(HOSTED_EXAMPLE, None).success();
    let v = server.get("/v1/models", None).json();
    let flux = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "flux-2-pro")
        .unwrap()
        .clone();
    assert_eq!(flux["loaded"], true, "FLUX.2 loaded for the request");
    let loaded = server.get("/health", None).json()["pipelines_loaded"].clone();
    assert_eq!(
        loaded[0], "flux2-klein",
        "most recently used first: {loaded}"
    );
    let metrics = server.get("/metrics", None);
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8(metrics.bytes).unwrap();
    assert!(
        text.contains("route=\"/v1/generate\",status=\"200\""),
        "{text}"
    );
    assert!(
        text.contains("diffusiond_images_generated_total 1"),
        "{text}"
    );
}

#[test]
fn files_serve_only_stored_images() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let v = server.post(HOSTED_EXAMPLE, None).success();
    let id = v["request_id"].as_str().unwrap();
    let good = format!("/files/gen/{id}/image_0.jpg");
    assert_eq!(server.raw_get_status(&good), 200);
    // Plant files the store must never serve.
    std::fs::write(ws.data().join("secret.txt"), "secret").unwrap();
    std::fs::write(ws.data().join(format!("files/gen/{id}/notes.txt")), "x").unwrap();
    for path in [
        "/files".to_string(),
        "/files/".to_string(),
        "/files/gen".to_string(),
        "/files/gen/".to_string(),
        format!("/files/gen/{id}"),
        format!("/files/gen/{id}/"),
        format!("/files/gen/{id}/image_1.jpg"),
        format!("/files/gen/{id}/image_0.png"),
        format!("/files/gen/{id}/image_00.jpg"),
        format!("/files/gen/{id}/notes.txt"),
        format!("/files/gen/{id}/image_0.jpg/.."),
        format!("/files/gen/{id}/../../../accounts.db"),
        format!("/files/gen/{id}/..%2F..%2F..%2Faccounts.db"),
        format!("/files/gen/{id}/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt"),
        "/files/gen/../../secret.txt".to_string(),
        "/files/gen/..%2F..%2F/secret.txt".to_string(),
        "/files/gen/%2e%2e/%2e%2e/secret.txt".to_string(),
        "/files/../secret.txt".to_string(),
        "/files/accounts.db".to_string(),
        "/files/gen/req_0123456789abcdef/image_0.jpg".to_string(),
        format!("/files/gen/{id}%00/image_0.jpg"),
        format!("/files/gen/{id}/image_0.jpg%00"),
        "/files/gen/%FF%FE/image_0.jpg".to_string(),
        "/accounts.db".to_string(),
        "/secret.txt".to_string(),
    ] {
        assert_eq!(server.raw_get_status(&path), 404, "{path}");
    }
    // Wrong method on a /v1 route: JSON too.
    let r = server.get("/v1/generate", None);
    assert_eq!(r.status, 405);
    assert_eq!(r.error_code(), "method_not_allowed");
}

#[test]
fn auth_defaults_to_keys_off_loopback() {
    let ws = Workspace::new();
    let server = Server::start(
        &ws.data(),
        &[
            "--listen".into(),
            "0.0.0.0:0".into(),
            "--catalog".into(),
            ws.catalog.display().to_string(),
        ],
    );
    assert!(server.banner.contains("auth: keys"), "{}", server.banner);
    let port = server.addr().rsplit(':').next().unwrap().to_string();
    let local = Server::base_for_port(&port);
    let r = reqwest::blocking::Client::new()
        .post(format!("{local}/v1/generate"))
        .body(HOSTED_EXAMPLE)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let key = ws.create_key(1000, None);
    let r = reqwest::blocking::Client::new()
        .post(format!("{local}/v1/generate"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(HOSTED_EXAMPLE)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().unwrap();
    // Listening on 0.0.0.0, image URLs follow the Host the client used.
    assert!(
        v["images"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{local}/files/gen/")),
        "{v}"
    );
}

#[test]
fn builtin_catalog_sizes() {
    let ws = Workspace::new();
    let server = Server::start(&ws.data(), &[]);
    let v = server.get("/v1/models", None).json();
    for m in v["models"].as_array().unwrap() {
        assert_eq!(m["default_width"], 1024, "{m}");
        assert_eq!(m["min_size"], 256, "{m}");
    }
    let r = server.post(
        &json!({"prompt": "a", "model": "flux-2-pro", "width": 64, "height": 64}).to_string(),
        None,
    );
    assert_eq!(r.error_code(), "invalid_dimensions");
    let body = json!({"prompt": "a", "model": "gpt-image-2", "resolution": "1k", "quality": "low", "width": 256, "height": 256});
    let v = server.post(&body.to_string(), None).success();
    assert_eq!(v["credits_used"], 50);
    let file = server.get_url(v["images"][0]["url"].as_str().unwrap());
    assert_eq!(decode(&file.bytes), (image::ImageFormat::Jpeg, 256, 256));
}

#[test]
fn a_malformed_catalog_fails_at_start_naming_the_line() {
    let ws = Workspace::new();
    let bad = ws.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[pipelines.z-image-turbo]\nweights = \"x\"\nsteps = = 8\n",
    )
    .unwrap();
    let out = std::process::Command::new(server_support::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--catalog"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(ws.data())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("line 3"), "{err}");
}
