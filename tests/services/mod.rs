//! Real engines for the tests, started on a free loopback port in a temporary directory and
//! stopped when the test process exits (however it exits): Postgres from Debian's package and
//! the S3-compatible `s3s-fs` from crates.io. Shared by the library's unit tests (through
//! `#[path]`) and the end-to-end tests; only std and tempfile.
//!
//! A missing engine makes the test say so loudly on stderr (`SKIPPED ...`) and return `None`;
//! under `CI=true` it panics instead, so CI never passes without checking.
#![allow(clippy::unwrap_used, dead_code)]

pub mod postgres;
pub mod s3;

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// No engine: loud locally, a failure under CI.
pub fn missing<T>(test: &str, why: &str) -> Option<T> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let message = format!("SKIPPED {test}: {why}");
    if ci {
        panic!("{message} (CI=true: every engine must be installed; .ci/run installs them)");
    }
    eprintln!("\n!!!!!!!!!! {message} !!!!!!!!!!\n");
    None
}

/// A free loopback port (bound, then released for the service to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A service that lives as long as this process: `script` (sh) runs it in the background, waits
/// for this process's end (its stdin closing), then stops it with `signal` (a background job of
/// a non-interactive shell ignores SIGINT unless it sets its own handler: Postgres does, for a
/// fast shutdown; others get TERM) and runs `cleanup`.
pub struct Keepalive {
    _child: Child,
    _stdin: ChildStdin,
}

impl Keepalive {
    pub fn spawn(mut command: Command, script: &str, signal: &str, cleanup: &str) -> Keepalive {
        let full = format!("{script} & p=$!; read _ignored; kill -{signal} $p; wait $p; {cleanup}");
        let mut child = command
            .arg("sh")
            .arg("-c")
            .arg(full)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        Keepalive {
            _child: child,
            _stdin: stdin,
        }
    }

    /// Stop the service now (the test process goes on).
    pub fn stop(mut self) {
        let _ = self._stdin.write_all(b"\n");
        let _ = self._child.wait();
    }
}

/// Poll `ready` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}
