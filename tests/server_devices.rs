//! Several devices in one server: `--device cpu,cpu` starts two workers that take jobs from one
//! queue; concurrent requests run on both, and every image has the same bytes per seed as the
//! same request on a one-device server. The real binary with the tiny reference model.
#![allow(clippy::unwrap_used)]

mod server_support;

use serde_json::json;
use server_support::{Reply, Server, Workspace};

fn worker_images(server: &Server) -> Vec<(String, f64)> {
    let text = String::from_utf8(server.get("/metrics", None).bytes).unwrap();
    text.lines()
        .filter(|l| l.starts_with("diffusiond_worker_images_total{"))
        .map(|l| {
            let (labels, n) = l.rsplit_once(' ').unwrap();
            (labels.to_string(), n.parse().unwrap())
        })
        .collect()
}

fn body(i: usize) -> String {
    json!({"prompt": format!("a lighthouse, variant {i}"), "model": "z-image-turbo",
           "width": 64, "height": 64, "steps": 20, "seed": 1000 + i})
    .to_string()
}

fn image_bytes(server: &Server, reply: &Reply) -> Vec<u8> {
    let v = reply.success();
    let url = v["images"][0]["url"].as_str().unwrap();
    let r = server.get_url(url);
    assert_eq!(r.status, 200);
    r.bytes
}

fn run_concurrently(server: &Server, n: usize) -> Vec<Vec<u8>> {
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|i| s.spawn(move || server.post(&body(i), None)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    replies.iter().map(|r| image_bytes(server, r)).collect()
}

#[test]
fn two_cpu_workers_share_concurrent_requests_with_the_same_bytes_per_seed() {
    const N: usize = 8;
    let two = Workspace::new();
    let server = two.serve(&["--device", "cpu,cpu", "--max-batch-images", "8"]);
    let before = worker_images(&server);
    assert_eq!(before.len(), 2, "two workers expected: {before:?}");
    assert!(before.iter().all(|(l, _)| l.contains("device=\"cpu\"")));
    let on_two = run_concurrently(&server, N);
    let after = worker_images(&server);
    let total: f64 = after.iter().map(|(_, n)| n).sum();
    assert_eq!(total, N as f64, "{after:?}");
    assert!(
        after.iter().all(|(_, n)| *n > 0.0),
        "concurrent requests should run on both workers: {after:?}"
    );
    drop(server);

    let one = Workspace::new();
    let server = one.serve(&["--device", "cpu", "--max-batch-images", "1"]);
    for (i, bytes) in on_two.iter().enumerate() {
        let alone = image_bytes(&server, &server.post(&body(i), None));
        assert!(
            alone == *bytes,
            "seed {}: the two-worker image differs from the one-worker image",
            1000 + i
        );
    }
}

#[test]
fn a_device_that_cannot_open_stops_the_start_with_its_name() {
    // This build has no CUDA (or no 8th card): the second worker fails while the first loads;
    // the server must exit with that device named instead of serving on half its devices.
    let ws = Workspace::new();
    let out = std::process::Command::new(server_support::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu,cuda:7"])
        .arg("--catalog")
        .arg(&ws.catalog)
        .arg("--weights")
        .arg(format!(
            "z-image-turbo={}",
            server_support::tiny_model().display()
        ))
        .arg("--data-dir")
        .arg(ws.data())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("device 1 (cuda:7)"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
}
