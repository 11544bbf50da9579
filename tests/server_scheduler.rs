//! The scheduler seen through the server: a client that disconnects mid-generation is dropped
//! at the next step boundary and refunded; concurrent compatible requests share batches; the
//! Prometheus metrics report queue depth, batch sizes, latency and queue-wait histograms, images
//! generated and errors by code. The real binary with the tiny reference model.
#![allow(clippy::unwrap_used)]

mod server_support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use server_support::Workspace;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing:\n{text}"))
}

#[test]
fn a_client_that_disconnects_is_dropped_and_refunded() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let key = ws.create_key(10_000, None);
    // Many steps (100 of the default 8: 1250 credits an image, 5000 in all), so the job is still denoising when the client goes away.
    let body = json!({"prompt": "a slow one", "model": "z-image-turbo", "width": 128,
                      "height": 128, "steps": 100, "num_images": 4})
    .to_string();
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    write!(
        stream,
        "POST /v1/generate HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr(),
        body.len()
    )
    .unwrap();
    // Wait until the job is in the device loop, then hang up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = String::from_utf8(server.get("/metrics", None).bytes).unwrap();
        if metric(&m, "diffusiond_running_images") >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the job never started:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = String::from_utf8(server.get("/metrics", None).bytes).unwrap();
        if metric(&m, "diffusiond_jobs_cancelled_total") >= 1.0 {
            assert_eq!(
                metric(&m, "diffusiond_images_generated_total"),
                0.0,
                "nothing was generated"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the job was not cancelled:\n{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Refunded: the balance is whole again and the request counts against no quota.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ws.balance_and_used(&key) != (10_000, 0) {
        assert!(
            Instant::now() < deadline,
            "not refunded: {:?}",
            ws.balance_and_used(&key)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server still serves.
    let ok = server.post(
        &json!({"prompt": "after", "model": "z-image-turbo", "width": 64, "height": 64})
            .to_string(),
        Some(&key),
    );
    assert_eq!(ok.status, 200);
}

#[test]
fn concurrent_requests_share_batches_and_metrics_say_so() {
    let ws = Workspace::new();
    let server = ws.serve(&["--max-batch-images", "8"]);
    let body = |i: usize| {
        json!({"prompt": format!("prompt number {i}"), "model": "z-image-turbo", "width": 64,
               "height": 64, "steps": 30, "seed": i})
        .to_string()
    };
    let replies: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|i| {
                let b = body(i);
                let server = &server;
                s.spawn(move || server.post(&b, None))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(replies.iter().all(|r| r.status == 200));
    let m = String::from_utf8(server.get("/metrics", None).bytes).unwrap();
    let steps = metric(&m, "diffusiond_batch_size_count");
    let up_to_one = metric(&m, "diffusiond_batch_size_bucket{le=\"1\"}");
    assert!(steps > up_to_one, "no step ran more than one image:\n{m}");
    assert_eq!(metric(&m, "diffusiond_images_generated_total"), 6.0);
    assert_eq!(metric(&m, "diffusiond_queue_depth"), 0.0);
    assert!(metric(&m, "diffusiond_image_latency_seconds_count") >= 6.0);
    assert!(metric(&m, "diffusiond_queue_wait_seconds_count") >= 6.0);
    // The batched images equal the same requests run alone.
    let first = server.post(&body(0), None);
    let url =
        |r: &server_support::Reply| r.json()["images"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(
        server.get_url(&url(&first)).bytes,
        server.get_url(&url(&replies[0])).bytes
    );
}
