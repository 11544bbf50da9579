//! End to end across restarts: balances, quota counts and stored images survive a restart; SIGTERM
//! lets a request in flight finish, and past `--shutdown-timeout` stops it at the next step and
//! refunds it before exiting; a crash mid-request is refunded at the next start.
#![allow(clippy::unwrap_used)]

mod server_support;

use std::time::Duration;

use serde_json::json;
use server_support::{Workspace, HOSTED_EXAMPLE};

/// A request that takes a few seconds on a CPU with the tiny model.
fn slow_body() -> String {
    json!({"prompt": "a slow one", "model": "z-image-turbo", "width": 512, "height": 512, "num_images": 2}).to_string()
}

/// Wait until a request in flight has reserved its credits (the key shows `expected`).
fn wait_for_reservation(ws: &Workspace, key: &str, expected: (i64, i64)) {
    for _ in 0..200 {
        if ws.balance_and_used(key) == expected {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the request never reserved its credits");
}

#[test]
fn restart_keeps_balances_quotas_and_files() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let key = ws.create_key(1000, Some(3));
    let a = server.post(HOSTED_EXAMPLE, Some(&key)).success();
    let b = server
        .post(
            &json!({"prompt": "b", "model": "flux-2-pro", "output_format": "png"}).to_string(),
            Some(&key),
        )
        .success();
    let paths: Vec<String> = [&a, &b]
        .iter()
        .map(|v| {
            let url = v["images"][0]["url"].as_str().unwrap();
            url.trim_start_matches(&server.base).to_string()
        })
        .collect();
    let before: Vec<Vec<u8>> = paths.iter().map(|p| server.get(p, None).bytes).collect();
    assert_eq!(ws.balance_and_used(&key), (500, 2));
    assert!(server.stop().success());

    let server = ws.serve(&["--auth", "keys"]);
    for (p, bytes) in paths.iter().zip(&before) {
        let r = server.get(p, None);
        assert_eq!(r.status, 200, "{p}");
        assert_eq!(&r.bytes, bytes, "{p}");
    }
    assert_eq!(ws.balance_and_used(&key), (500, 2));
    server.post(HOSTED_EXAMPLE, Some(&key)).success();
    // The quota count survived: this is the 4th request of the day with a quota of 3.
    let r = server.post(HOSTED_EXAMPLE, Some(&key));
    assert_eq!(r.error_code(), "rate_limit_exceeded");
    assert_eq!(ws.balance_and_used(&key), (250, 3));
}

#[test]
fn sigterm_lets_a_request_in_flight_finish() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let key = ws.create_key(1000, None);
    let body = slow_body();
    std::thread::scope(|s| {
        let pending = s.spawn(|| server.post(&body, Some(&key)));
        wait_for_reservation(&ws, &key, (800, 1));
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &server.pid().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let r = pending.join().unwrap();
        let v = r.success();
        assert_eq!(v["images"].as_array().unwrap().len(), 2);
        let id = v["request_id"].as_str().unwrap();
        assert!(ws
            .data()
            .join(format!("files/gen/{id}/image_1.jpg"))
            .is_file());
    });
    // (stop sends a second SIGTERM, harmless, and waits for the exit)
    assert!(server.stop().success());
    assert_eq!(ws.balance_and_used(&key), (800, 1));
}

#[test]
fn past_the_shutdown_timeout_the_running_batch_stops_and_is_refunded_before_exit() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys", "--shutdown-timeout", "0"]);
    let key = ws.create_key(100_000, None);
    // Far longer than the test: it can only end early if the deadline stops it.
    let body = json!({"prompt": "a very slow one", "model": "z-image-turbo", "width": 512,
                      "height": 512, "steps": 100, "num_images": 4})
    .to_string();
    std::thread::scope(|s| {
        let pending = s.spawn(|| server.post(&body, Some(&key)));
        for _ in 0..400 {
            if ws.balance_and_used(&key).1 == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(ws.balance_and_used(&key).1, 1, "the request never reserved");
        let pid = server.pid().to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(kill.success());
        let r = pending.join().unwrap();
        assert_eq!(r.status, 503, "{:?}", String::from_utf8_lossy(&r.bytes));
    });
    let log = server.log();
    assert!(server.stop().success());
    // Refunded by this process before it exited, not by the next start.
    assert_eq!(ws.balance_and_used(&key), (100_000, 0));
    assert!(log.contains("stopped by the shutdown deadline"), "{log}");
}

#[test]
fn a_crash_mid_request_is_refunded_at_the_next_start() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let key = ws.create_key(1000, Some(5));
    let body = slow_body();
    let addr = server.base.clone();
    let pending = std::thread::spawn({
        let key = key.clone();
        move || {
            reqwest::blocking::Client::new()
                .post(format!("{addr}/v1/generate"))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
        }
    });
    wait_for_reservation(&ws, &key, (800, 1));
    server.kill();
    assert!(
        pending.join().unwrap().is_err(),
        "the killed server answered"
    );
    assert_eq!(ws.balance_and_used(&key), (800, 1));

    let server = ws.serve(&["--auth", "keys"]);
    assert_eq!(ws.balance_and_used(&key), (1000, 0));
    assert!(
        server.log().contains("refunded 1 request"),
        "{}",
        server.log()
    );
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let ws = Workspace::new();
    let _first = ws.serve(&[]);
    let out = std::process::Command::new(server_support::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--catalog"])
        .arg(&ws.catalog)
        .arg("--data-dir")
        .arg(ws.data())
        .arg("--weights")
        .arg(format!(
            "z-image-turbo={}",
            server_support::tiny_model().display()
        ))
        .arg("--weights")
        .arg(format!(
            "flux2-klein={}",
            server_support::tiny_flux2_model().display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another `diffusiond serve`"), "{err}");
}
