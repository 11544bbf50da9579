//! End to end, the HTTP side under slow, idle and many clients (issue 15, finding 2): files are
//! streamed, never held whole per client; connections are bounded and time out. The real binary
//! with the tiny reference model; the served file is planted in the store (a 12 MB stand-in for
//! a large PNG: serving does not look inside it).
#![allow(clippy::unwrap_used)]

mod server_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use server_support::{Server, Workspace};

const FILE_BYTES: usize = 12 * 1024 * 1024;

/// Plant `files/gen/<id>/image_0.png` of `FILE_BYTES` bytes; returns its URL path.
fn plant_file(data: &Path) -> String {
    let id = "req_0123456789abcdef";
    let dir = data.join("files/gen").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    let bytes: Vec<u8> = (0..FILE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("image_0.png"), bytes).unwrap();
    format!("/files/gen/{id}/image_0.png")
}

/// Resident memory of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Open a connection, send a GET and read nothing (a client that stalls).
fn stalled_get(server: &Server, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(server.addr()).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr()).unwrap();
    s
}

/// Read until the peer closes or `limit` passes; the bytes read and whether it closed.
fn drain(s: &mut TcpStream, limit: Duration) -> (usize, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (total, true),
        }
    }
    (total, false)
}

/// 100 clients that request a 12 MB file and never read it: the server streams, so it holds a
/// few chunks per client, not the file (before: every client held all 12 MB, 1.2 GB in all).
#[test]
fn slow_readers_do_not_hold_whole_files() {
    let ws = Workspace::new();
    let server = ws.serve(&["--write-timeout", "600"]);
    let path = plant_file(&ws.data());
    // Warm the route once (and check the file is served whole to a reader).
    let full = server.get(&path, None);
    assert_eq!((full.status, full.bytes.len()), (200, FILE_BYTES));
    let before = rss_bytes(server.pid());
    let clients: Vec<TcpStream> = (0..100).map(|_| stalled_get(&server, &path)).collect();
    // Give the server time to write what the sockets take (it would have read every file whole
    // by now).
    std::thread::sleep(Duration::from_secs(3));
    let during = rss_bytes(server.pid());
    // Others are still served meanwhile.
    assert_eq!(server.get("/health", None).status, 200);
    let grown_mb = (during.saturating_sub(before)) as f64 / 1e6;
    eprintln!(
        "RSS before {:.1} MB, with 100 stalled readers {:.1} MB (+{grown_mb:.1} MB)",
        before as f64 / 1e6,
        during as f64 / 1e6
    );
    assert!(
        grown_mb < 100.0,
        "100 stalled readers of a 12 MB file grew the server by {grown_mb:.0} MB"
    );
    drop(clients);
}

/// A client that stops reading is cut off after --write-timeout; one that stays idle, or never
/// finishes its headers, after --header-read-timeout; and --max-connections bounds how many are
/// open, while the timeouts keep the slots turning over for everyone else.
#[test]
fn stalled_idle_and_excess_connections_are_bounded() {
    let ws = Workspace::new();
    let server = ws.serve(&[
        "--write-timeout",
        "2",
        "--header-read-timeout",
        "2",
        "--max-connections",
        "4",
    ]);
    let path = plant_file(&ws.data());

    // Stops reading: closed before the whole file arrives.
    let mut reader = stalled_get(&server, &path);
    std::thread::sleep(Duration::from_secs(5));
    let (got, closed) = drain(&mut reader, Duration::from_secs(20));
    assert!(
        closed && got < FILE_BYTES,
        "read {got} bytes, closed: {closed}"
    );

    // Idle, and half a request head: both closed.
    let mut idle = TcpStream::connect(server.addr()).unwrap();
    let mut partial = TcpStream::connect(server.addr()).unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(
        drain(&mut idle, Duration::from_secs(10)).1,
        "idle connection left open"
    );
    assert!(
        drain(&mut partial, Duration::from_secs(10)).1,
        "slow headers left open"
    );
}

/// --max-connections: with every slot held, a further client waits (in the listen backlog, its
/// descriptor never opened by the server) until one is freed.
#[test]
fn max_connections_bounds_open_connections() {
    let ws = Workspace::new();
    let server = ws.serve(&["--max-connections", "4", "--header-read-timeout", "600"]);
    let hogs: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut waiting = TcpStream::connect(server.addr()).unwrap();
    write!(
        waiting,
        "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr()
    )
    .unwrap();
    let (got, _) = drain(&mut waiting, Duration::from_secs(2));
    assert_eq!(
        got, 0,
        "a fifth connection was served while 4 slots were taken"
    );
    drop(hogs);
    let (got, closed) = drain(&mut waiting, Duration::from_secs(30));
    assert!(got > 0 && closed, "not served after the slots were freed");
}

/// Read one connection to its end (the server closes it) and return everything as text.
fn read_to_close(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Issue 15, finding 7: a request with both `Transfer-Encoding` and `Content-Length` (request
/// smuggling's raw material) is refused with 400 in the contract's JSON, with its request ID,
/// and the connection is closed; an ordinary chunked request before it on the same connection
/// is served (before: hyper dropped `Content-Length` and served it as chunked, with 200).
#[test]
fn a_request_with_both_transfer_encoding_and_content_length_is_refused() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let host = server.addr();
    let body = r#"{"prompt": "Content-Length: 9 and Transfer-Encoding: chunked", "model": "z-image-turbo", "width": 64, "height": 64}"#;
    let mut s = TcpStream::connect(&host).unwrap();
    write!(
        s,
        "POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
    .unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    .unwrap();
    let text = read_to_close(&mut s);
    let responses: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(responses.len(), 2, "{text}");
    assert!(responses[0].starts_with("200"), "{}", responses[0]);
    assert!(
        responses[0].contains("\"success\":true"),
        "{}",
        responses[0]
    );
    let refused = responses[1].to_ascii_lowercase();
    assert!(refused.starts_with("400"), "{refused}");
    assert!(
        refused.contains("\"code\":\"invalid_request\""),
        "{refused}"
    );
    assert!(
        refused.contains("transfer-encoding and content-length"),
        "{refused}"
    );
    assert!(refused.contains("x-request-id: req_"), "{refused}");

    // The other order of the two headers, alone on a connection: refused the same way.
    let mut s = TcpStream::connect(&host).unwrap();
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
    )
    .unwrap();
    let text = read_to_close(&mut s);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

/// Issue 15, finding 7: what hyper refuses before any handler runs (a header line it cannot
/// parse (here a method with a character no method has), a header section over 64 KiB) is answered in the contract's JSON with an
/// `X-Request-Id`, like every other error (before: an empty 400 or 431 with neither).
#[test]
fn requests_hyper_cannot_parse_get_the_contracts_json() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let host = server.addr();
    let big = "a".repeat(70 * 1024);
    let cases = [
        (
            format!("G(T /health HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            "400",
            "invalid_request",
        ),
        (
            format!("GET /health HTTP/1.1\r\nHost: {host}\r\nX-Big: {big}\r\n\r\n"),
            "431",
            "request_too_large",
        ),
    ];
    for (request, status, code) in cases {
        let mut s = TcpStream::connect(&host).unwrap();
        let _ = s.write_all(request.as_bytes());
        let text = read_to_close(&mut s);
        let what = &request[..30];
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {text}"
        );
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("\r\nx-request-id: req_"), "{text}");
        assert!(lower.contains("content-type: application/json"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], code, "{text}");
        assert_eq!(v["success"], false);
        assert!(v["request_id"].as_str().unwrap().starts_with("req_"));
    }
}

/// Issue 15, finding 7: a client that shuts down its sending side after its request (a
/// half-close) still gets the whole response (before: hyper took the end of the client's stream
/// for a hang-up and closed the connection, so a response not ready at once was lost).
#[test]
fn a_client_that_half_closes_after_its_request_gets_its_response() {
    let ws = Workspace::new();
    let server = ws.serve(&["--auth", "keys"]);
    let host = server.addr();
    let path = plant_file(&ws.data());
    for (request, least) in [
        (
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            FILE_BYTES,
        ),
        (format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n"), 10),
    ] {
        let mut s = TcpStream::connect(&host).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let head = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200 "), "{request}: {head}");
        assert!(out.len() > least, "{request}: {} bytes", out.len());
    }
}
