//! A throwaway S3-compatible server: `s3s-fs` 0.14.1 from crates.io (`DIFFUSIOND_S3S_FS`, else
//! `~/.cache/diffusiond/s3s-fs/bin/s3s-fs`, else on the PATH; `.ci/run` installs it there), one
//! per test process, serving a temporary directory on a free loopback port. A bucket is a
//! directory of it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use super::{free_port, missing, wait_until, Keepalive};

pub const ACCESS_KEY: &str = "diffusiond-test";
pub const SECRET_KEY: &str = "diffusiond-test-secret";
pub const REGION: &str = "us-east-1";

struct Server {
    root: PathBuf,
    endpoint: String,
    _keepalive: Keepalive,
}

/// A fresh bucket on the test server.
pub struct Bucket {
    pub name: String,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    /// Where the server keeps the bucket's objects (a test may look, never write).
    pub dir: PathBuf,
}

impl Bucket {
    /// The `AWS_*` variables a server needs to reach the bucket.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// Objects in the bucket (relative paths), sorted.
    pub fn objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&self.dir) {
                    let rel = rel.to_string_lossy().to_string();
                    // s3s-fs keeps metadata and uploads in hidden files beside the objects.
                    if !rel.split('/').any(|c| c.starts_with('.')) {
                        out.push(rel);
                    }
                }
            }
        }
        out.sort();
        out
    }
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();

/// A fresh, empty bucket, or `None` (said loudly; a panic under CI) without s3s-fs.
pub fn bucket(test: &str) -> Option<Bucket> {
    let server = match SERVER.get_or_init(start) {
        Ok(s) => s,
        Err(why) => return missing(test, why),
    };
    static N: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        "bucket-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let dir = server.root.join(&name);
    std::fs::create_dir(&dir).unwrap();
    Some(Bucket {
        name,
        endpoint: server.endpoint.clone(),
        dir,
    })
}

fn find_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DIFFUSIOND_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let cached = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/diffusiond/s3s-fs/bin/s3s-fs"))
        .filter(|p| p.is_file());
    cached.or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("s3s-fs"))
                .find(|p| p.is_file())
        })
    })
}

fn start() -> Result<Server, String> {
    let bin = find_bin().ok_or(
        "no s3s-fs (cargo install s3s-fs --version 0.14.1 --features binary --root \
         ~/.cache/diffusiond/s3s-fs, or DIFFUSIOND_S3S_FS=PATH)",
    )?;
    let root = tempfile::Builder::new()
        .prefix("diffusiond-s3-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let port = free_port();
    let script = format!(
        "'{bin}' --host 127.0.0.1 --port {port} --access-key {ACCESS_KEY} --secret-key \
         {SECRET_KEY} '{root}' >'{root}.log' 2>&1",
        bin = bin.display(),
        root = root.display(),
    );
    let cleanup = format!("rm -rf '{0}' '{0}.log'", root.display());
    let keepalive = Keepalive::spawn(Command::new("env"), &script, "TERM", &cleanup);
    let ready = wait_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    if !ready {
        let log = std::fs::read_to_string(format!("{}.log", root.display())).unwrap_or_default();
        return Err(format!("s3s-fs did not start on port {port}: {log}"));
    }
    Ok(Server {
        root,
        endpoint: format!("http://127.0.0.1:{port}"),
        _keepalive: keepalive,
    })
}
