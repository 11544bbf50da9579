//! The hub weights path, end to end, without the internet: a small fake of the hub's
//! `resolve` endpoint on 127.0.0.1 serves the tiny reference checkout, and the real hf-hub
//! client code downloads it into a fresh cache (HF_HOME), with the progress bar, then loads the
//! pipeline. Then: the cache alone serves it offline (HF_HUB_OFFLINE=1); a repo missing from the
//! cache fails offline naming the file; an unreachable hub fails naming the file.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use diffusiond::pipeline::{self, DeviceSpec, Family, RunOptions};

/// Load a source on the CPU in f32, the family from its `model_index.json`.
fn load(source: &str) -> pipeline::Result<Box<dyn Family>> {
    let opts = RunOptions {
        device: DeviceSpec::Cpu,
        ..RunOptions::default()
    }
    .open()?;
    pipeline::load(&source.parse()?, None, &opts)
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Answer one request of the hub's `GET /{org}/{repo}/resolve/{rev}/{file}` with a byte range.
fn serve(mut stream: TcpStream, root: &Path, hits: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range_start = 0usize;
    let mut range_end: Option<usize> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(r) = lower.strip_prefix("range: bytes=") {
            let r = r.trim();
            let (a, b) = r.split_once('-').unwrap();
            range_start = a.parse().unwrap_or(0);
            range_end = b.parse().ok();
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let rel = path.split("/resolve/main/").nth(1).map(str::to_string);
    let file = rel
        .filter(|r| r.split('/').all(|p| p != ".."))
        .map(|r| root.join(r))
        .filter(|p| p.is_file());
    let Some(file) = file else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    hits.fetch_add(1, Ordering::SeqCst);
    let data = std::fs::read(&file).unwrap();
    let end = range_end.unwrap_or(data.len() - 1).min(data.len() - 1);
    let body = &data[range_start.min(data.len())..=end];
    let etag = format!("{:x}", data.len() * 31 + path.len());
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        body.len(),
        range_start,
        end,
        data.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

#[test]
fn hub_download_cache_offline_and_errors() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let root = common::tiny_dir();
    let hits = Arc::new(AtomicUsize::new(0));
    {
        let hits = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream, &root, &hits);
            }
        });
    }
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", format!("http://{addr}"));
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::remove_var("HF_TOKEN");

    // Online: downloads through hf-hub into the cache, then loads.
    let model = load("hf:test-org/tiny-z-image").unwrap();
    assert!(
        hits.load(Ordering::SeqCst) >= 10,
        "files were not fetched from the hub"
    );
    let snapshot = home
        .path()
        .join("hub/models--test-org--tiny-z-image/snapshots")
        .join(COMMIT);
    for f in [
        "model_index.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "text_encoder/model-00003-of-00003.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/tokenizer.json",
    ] {
        assert!(snapshot.join(f).exists(), "{f} not in the hub cache");
    }
    drop(model);

    // Offline: the cache alone is enough, and the server sees no request.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let before = hits.load(Ordering::SeqCst);
    load("hf:test-org/tiny-z-image").unwrap();
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before,
        "offline load went to the network"
    );

    // Offline and not cached: a clear error naming the file.
    let err = load("hf:test-org/other").err().unwrap().to_string();
    assert!(
        err.contains("model_index.json") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    // Online but the hub is unreachable: a clear error naming the file.
    std::env::remove_var("HF_HUB_OFFLINE");
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    std::env::set_var("HF_ENDPOINT", format!("http://{dead_addr}"));
    let err = load("hf:test-org/unreachable").err().unwrap().to_string();
    assert!(
        err.contains("cannot fetch model_index.json from hf:test-org/unreachable"),
        "{err}"
    );
}
