//! Shared harness of the end-to-end tests: starts the real `diffusiond serve` binary on
//! 127.0.0.1 port 0 with the tiny reference model, talks HTTP to it, and runs `diffusiond keys`.
//!
//! The reference directory comes from `DIFFUSIOND_REFERENCE` (default: `../shared/reference` next
//! to the crate); its `tiny/` model is a random-weight Z-Image in the published layout.
#![allow(clippy::unwrap_used, dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_diffusiond");

/// The hosted API's own example body: a client changes only the base URL.
pub const HOSTED_EXAMPLE: &str =
    r#"{"prompt": "A serene mountain landscape at sunset", "model": "flux-2-pro"}"#;

pub fn reference_dir() -> PathBuf {
    std::env::var_os("DIFFUSIOND_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"))
}

pub fn tiny_model() -> PathBuf {
    let tiny = reference_dir().join("tiny");
    assert!(
        tiny.join("model_index.json").is_file(),
        "tiny reference model not found at {} (set DIFFUSIOND_REFERENCE)",
        tiny.display()
    );
    tiny
}

/// The tiny random-weight FLUX.2 [klein] of `$DIFFUSIOND_REFERENCE_FLUX2` (default
/// `../shared/reference-flux2`), which serves `flux-2-pro` in the shipped catalog.
pub fn tiny_flux2_model() -> PathBuf {
    let dir = std::env::var("DIFFUSIOND_REFERENCE_FLUX2")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference-flux2")
        });
    let tiny = dir.join("tiny");
    assert!(
        tiny.join("model_index.json").is_file(),
        "tiny FLUX.2 reference model not found at {} (set DIFFUSIOND_REFERENCE_FLUX2)",
        tiny.display()
    );
    tiny
}

/// The shipped catalog with sizes scaled down for a CPU and the tiny model (defaults 64, minimum
/// 64; gpt-image-2 1k/2k/4k = 64/128/256), plus `test-broken-size`, whose size step (8) lets a
/// size through that the pipeline refuses: the real pipeline's failure path.
pub fn write_test_catalog(dir: &Path) -> PathBuf {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/catalog.toml"))
            .unwrap();
    let mut text = shipped.clone();
    for (from, to) in [
        ("min_size = 256", "min_size = 64"),
        ("default_size = 1024", "default_size = 64"),
        ("\"1k\" = 1024", "\"1k\" = 64"),
        ("\"2k\" = 2048", "\"2k\" = 128"),
        ("\"4k\" = 4096", "\"4k\" = 256"),
    ] {
        assert!(text.contains(from), "the shipped catalog has no '{from}'");
        text = text.replace(from, to);
    }
    text.push_str(
        "\n[[models]]\nid = \"test-broken-size\"\npipeline = \"z-image-turbo\"\nprice = 10\n\
         default_size = 72\nmin_size = 8\nmax_size = 256\nsize_step = 8\n",
    );
    let path = dir.join("test-catalog.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A running server; killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// The line the server printed when ready.
    pub banner: String,
    pub data_dir: PathBuf,
    log: PathBuf,
}

/// A temporary data directory with the test catalog in it.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub catalog: PathBuf,
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let catalog = write_test_catalog(dir.path());
        Self { dir, catalog }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start a server on this workspace with the test catalog; `extra` are more `serve` options.
    pub fn serve(&self, extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec!["--catalog".into(), self.catalog.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::start(&self.data(), &args)
    }

    /// Run `diffusiond keys ARGS --data-dir DATA`; panics unless it succeeds. Returns stdout.
    pub fn keys(&self, args: &[&str]) -> String {
        let out = self.keys_raw(args);
        assert!(
            out.status.success(),
            "keys {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn keys_raw(&self, args: &[&str]) -> std::process::Output {
        clean_command(BIN)
            .arg("keys")
            .args(args)
            .arg("--data-dir")
            .arg(self.data())
            .output()
            .unwrap()
    }

    /// Create a key; returns the key (the last line of stdout).
    pub fn create_key(&self, credits: i64, daily_quota: Option<i64>) -> String {
        let credits = credits.to_string();
        let quota = daily_quota.map(|q| q.to_string());
        let mut args = vec!["create", "--credits", &credits, "--name", "test"];
        if let Some(q) = &quota {
            args.extend(["--daily-quota", q]);
        }
        let out = self.keys(&args);
        let key = out.lines().last().unwrap().trim().to_string();
        assert!(key.starts_with("dk_") && !key.contains(' '), "{out}");
        key
    }

    /// (balance, used_today) of a key, read with `keys list`.
    pub fn balance_and_used(&self, key: &str) -> (i64, i64) {
        let list = self.keys(&["list"]);
        assert!(!list.contains(key), "keys list shows a whole key");
        let prefix = format!("{}...", &key[..8]);
        let row = list
            .lines()
            .find(|l| l.contains(&prefix))
            .unwrap_or_else(|| panic!("{prefix} not in:\n{list}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        (cols[2].parse().unwrap(), cols[4].parse().unwrap())
    }
}

/// A command without the DIFFUSIOND_* variables of the environment running the tests.
fn clean_command(bin: &str) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DIFFUSIOND_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

impl Server {
    /// Start `diffusiond serve --listen 127.0.0.1:0` (unless `args` has a --listen) with the tiny
    /// model, and wait until it prints its address.
    pub fn start(data_dir: &Path, args: &[String]) -> Server {
        Self::start_with_env(data_dir, args, &[])
    }

    /// [`Server::start`] with more environment variables (e.g. `AWS_*` for a bucket).
    pub fn start_with_env(data_dir: &Path, args: &[String], env: &[(&str, String)]) -> Server {
        std::fs::create_dir_all(data_dir).unwrap();
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let log = data_dir.join(format!(
            "server-{}.log",
            STARTS.fetch_add(1, Ordering::SeqCst)
        ));
        let mut cmd = clean_command(BIN);
        cmd.arg("serve").arg("--data-dir").arg(data_dir);
        if !args.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.arg("--weights")
            .arg(format!("z-image-turbo={}", tiny_model().display()))
            .arg("--weights")
            .arg(format!("flux2-klein={}", tiny_flux2_model().display()))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on http://") {
                    let _ = tx.send(line);
                }
            }
        });
        let banner = match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the server did not start:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let addr = banner
            .split("http://")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        Server {
            child: Some(child),
            base: format!("http://{addr}"),
            banner: banner.clone(),
            data_dir: data_dir.to_path_buf(),
            log,
        }
    }

    /// The loopback base URL of a port (for servers listening on 0.0.0.0).
    pub fn base_for_port(port: &str) -> String {
        format!("http://127.0.0.1:{port}")
    }

    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn post(&self, body: &str, key: Option<&str>) -> Reply {
        self.post_to("/v1/generate", body, key)
    }

    pub fn post_to(&self, path: &str, body: &str, key: Option<&str>) -> Reply {
        let mut req = client()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        Reply::from(req.body(body.to_string()).send().unwrap())
    }

    pub fn get(&self, path: &str, key: Option<&str>) -> Reply {
        let mut req = client().get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        Reply::from(req.send().unwrap())
    }

    pub fn get_url(&self, url: &str) -> Reply {
        Reply::from(client().get(url).send().unwrap())
    }

    /// GET a path sent byte for byte (no client-side normalisation of `..` or `%2e`); the status.
    pub fn raw_get_status(&self, path: &str) -> u16 {
        let mut s = TcpStream::connect(self.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr()
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out)
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, then wait for the process to exit (graceful shutdown).
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the server did not stop within 60 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("--- server log ---\n{}", self.log());
            }
        }
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub bytes: Vec<u8>,
}

impl From<reqwest::blocking::Response> for Reply {
    fn from(r: reqwest::blocking::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let bytes = r.bytes().unwrap().to_vec();
        Reply {
            status,
            headers,
            bytes,
        }
    }
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    /// Check the contract's error shape and the request ID header; returns the error code.
    pub fn error_code(&self) -> String {
        let v = self.json();
        assert_eq!(v["success"], false, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        self.assert_request_id(&v);
        v["error"]["code"].as_str().unwrap().to_string()
    }

    /// `request_id` is `req_` + at least 12 URL-safe characters and equals `X-Request-Id`.
    pub fn assert_request_id(&self, v: &Value) {
        let id = v["request_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no request_id: {v}"));
        assert!(id.starts_with("req_") && id.len() >= 16, "{id}");
        assert!(
            id[4..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{id}"
        );
        assert_eq!(self.header("x-request-id").as_deref(), Some(id));
    }

    /// Expect a 200 generation answer; returns its JSON.
    pub fn success(&self) -> Value {
        assert_eq!(self.status, 200, "{}", String::from_utf8_lossy(&self.bytes));
        let v = self.json();
        assert_eq!(v["success"], true);
        self.assert_request_id(&v);
        v
    }
}

/// Decode an image and return (format, width, height).
pub fn decode(bytes: &[u8]) -> (image::ImageFormat, u32, u32) {
    let format = image::guess_format(bytes).unwrap();
    let img = image::load_from_memory(bytes).unwrap();
    (format, img.width(), img.height())
}
