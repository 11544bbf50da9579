//! Retention: with `--retention 2s` a stored image answers 200 at first and 404 once it is
//! older than that; without the flag images stay. The real binary with the tiny reference model.
#![allow(clippy::unwrap_used)]

mod server_support;

use std::time::{Duration, Instant};

use serde_json::json;
use server_support::Workspace;

fn body() -> String {
    json!({"prompt": "an old photograph", "model": "z-image-turbo", "width": 64, "height": 64,
           "steps": 2, "seed": 7})
    .to_string()
}

#[test]
fn images_older_than_the_retention_answer_404() {
    let ws = Workspace::new();
    let server = ws.serve(&["--retention", "2s"]);
    let v = server.post(&body(), None).success();
    let url = v["images"][0]["url"].as_str().unwrap().to_string();
    assert_eq!(server.get_url(&url).status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.get_url(&url).status;
        if status == 404 {
            break;
        }
        assert_eq!(status, 200);
        assert!(
            Instant::now() < deadline,
            "image still served 30 s after a 2 s retention"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The log line follows the deletion that the 404 saw: give it a moment to be written.
    let logged = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("retention: deleted old images") {
        assert!(Instant::now() < logged, "{}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn without_retention_images_stay() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let v = server.post(&body(), None).success();
    let url = v["images"][0]["url"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(server.get_url(&url).status, 200);
}
