//! End to end with the real binary and the tiny model: the hosted route's event stream
//! (`Accept: text/event-stream`), a client that disconnects mid-stream (cancelled and refunded),
//! and the generation parameters written into image files (and `--no-metadata`).
#![allow(clippy::unwrap_used)]

mod server_support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_support::{Server, Workspace};

/// POST with `Accept: text/event-stream`; returns the status and the events (name, data) read
/// until the stream ends, or until `stop_after` names an event (then the connection is dropped).
fn stream(
    server: &Server,
    body: &Value,
    key: Option<&str>,
    stop_after: Option<&str>,
) -> (u16, Vec<(String, Value)>) {
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let body = body.to_string();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "POST /v1/generate HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.addr(),
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut chunked = false;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        if h.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
        {
            chunked = true;
        }
        if h == "\r\n" {
            break;
        }
    }
    assert!(chunked || status != 200, "an event stream is sent chunked");
    let mut events = Vec::new();
    let (mut name, mut data) = (None::<String>, String::new());
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        let l = line.trim_end_matches(['\r', '\n']).to_string();
        line.clear();
        if let Some(n) = l.strip_prefix("event:") {
            name = Some(n.trim().to_string());
        } else if let Some(d) = l.strip_prefix("data:") {
            data.push_str(d.trim_start());
        } else if l.is_empty() {
            if let Some(n) = name.take() {
                let v: Value = serde_json::from_str(&data).unwrap();
                let stop = stop_after == Some(n.as_str());
                events.push((n, v));
                if stop {
                    return (status, events);
                }
            }
            data.clear();
        }
        // Other lines: chunk sizes, keep-alive comments.
    }
    (status, events)
}

#[test]
fn event_stream_reports_progress_and_ends_with_the_plain_body() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let body = json!({"prompt": "a red fox", "model": "flux-2-pro", "num_images": 2, "seed": 21,
        "steps": 4, "output_format": "png"});
    let (status, events) = stream(&server, &body, None, None);
    assert_eq!(status, 200);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "queued",
            "started",
            "step",
            "step",
            "step",
            "step",
            "completed"
        ],
        "{events:?}"
    );
    assert_eq!(events[0].1["position"], 1);
    for (k, (_, step)) in events[2..6].iter().enumerate() {
        assert_eq!(step, &json!({"step": k + 1, "steps": 4}));
    }
    let done = &events[6].1;
    assert_eq!(done["success"], true);
    assert_eq!(done["credits_used"], 500);
    // The same request without the stream: the same body but for the request's own ID, and the
    // same image bytes.
    let plain = server.post(&body.to_string(), None).success();
    let (sid, pid) = (
        done["request_id"].as_str().unwrap(),
        plain["request_id"].as_str().unwrap(),
    );
    let expected: Value = serde_json::from_str(&plain.to_string().replace(pid, sid)).unwrap();
    assert_eq!(done, &expected);
    for i in 0..2 {
        let a = server.get_url(done["images"][i]["url"].as_str().unwrap());
        let b = server.get_url(plain["images"][i]["url"].as_str().unwrap());
        assert_eq!(a.status, 200);
        assert_eq!(a.bytes, b.bytes, "image {i}");
    }
    // A refusal is a plain HTTP error, not a stream.
    let (status, events) = stream(&server, &json!({"model": "flux-2-pro"}), None, None);
    assert_eq!((status, events.len()), (400, 0));
}

#[test]
fn hosted_stream_sends_previews_of_the_real_state_when_asked() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let body = json!({"prompt": "a red fox", "model": "z-image-turbo", "num_images": 2, "seed": 5,
        "steps": 6, "partial_images": 2, "output_format": "png"});
    let (status, events) = stream(&server, &body, None, None);
    assert_eq!(status, 200);
    // Previews follow the step after which they were made: steps 2 and 4 of 6, one per image.
    let mut after_step = 0;
    let mut previews = Vec::new();
    for (name, data) in &events {
        match name.as_str() {
            "step" => after_step = data["step"].as_u64().unwrap(),
            "preview" => {
                assert_eq!(data["step"].as_u64().unwrap(), after_step, "{data}");
                assert_eq!(
                    (data["steps"].as_u64(), data["width"].as_u64()),
                    (Some(6), Some(64))
                );
                assert_eq!(data["output_format"], "jpeg");
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data["b64_json"].as_str().unwrap())
                    .unwrap();
                let img = image::load_from_memory(&bytes).unwrap();
                assert_eq!((img.width(), img.height()), (64, 64));
                previews.push((after_step, data["index"].as_u64().unwrap()));
            }
            _ => {}
        }
    }
    assert_eq!(previews, [(2, 0), (2, 1), (4, 0), (4, 1)], "{events:?}");
    assert_eq!(events.last().unwrap().0, "completed");
    // Asking for previews does not change the images.
    let mut plain_body = body.clone();
    plain_body.as_object_mut().unwrap().remove("partial_images");
    let plain = server.post(&plain_body.to_string(), None).success();
    let done = &events.last().unwrap().1;
    for i in 0..2 {
        let a = server
            .get_url(done["images"][i]["url"].as_str().unwrap())
            .bytes;
        let b = server
            .get_url(plain["images"][i]["url"].as_str().unwrap())
            .bytes;
        assert_eq!(a, b, "image {i}");
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_is_cancelled_and_refunded() {
    let ws = Workspace::new();
    let key = ws.create_key(100_000, None);
    let server = ws.serve(&["--auth", "keys"]);
    // Long enough that it is still running when the client leaves after the first step (the
    // price follows the steps: 4 x 250 x 100/4 = 25,000 credits reserved, all refunded).
    let body = json!({"prompt": "a long one", "model": "flux-2-pro", "width": 256, "height": 256,
        "num_images": 4, "steps": 100});
    let (status, events) = stream(&server, &body, Some(&key), Some("step"));
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap().0, "step");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = server.log();
        if log.contains("cancelled") && ws.balance_and_used(&key).0 == 100_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not cancelled and refunded: {:?}\n{log}",
            ws.balance_and_used(&key)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The server goes on serving.
    let v = server
        .post(
            &json!({"prompt": "x", "model": "flux-2-pro", "steps": 1}).to_string(),
            Some(&key),
        )
        .success();
    assert_eq!(v["credits_used"], 250);
    assert_eq!(ws.balance_and_used(&key).0, 100_000 - 250);
}

#[test]
fn images_carry_their_generation_parameters_unless_turned_off() {
    let ws = Workspace::new();
    let server = ws.serve(&[]);
    let prompt = "a red fox & a \"blue\" bird";
    for (format, ext) in [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")] {
        let v = server
            .post(
                &json!({"prompt": prompt, "model": "flux-2-pro", "seed": 77, "steps": 3,
                    "output_format": format, "width": 96, "height": 64})
                .to_string(),
                None,
            )
            .success();
        let url = v["images"][0]["url"].as_str().unwrap();
        assert!(url.ends_with(ext));
        let bytes = server.get_url(url).bytes;
        let xmp = match format {
            "png" => {
                let texts = png_texts(&bytes);
                let params = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
                assert!(params.starts_with(prompt), "{params}");
                assert!(
                    params.contains("Seed: 77") && params.contains("Steps: 3"),
                    "{params}"
                );
                texts
                    .into_iter()
                    .find(|(k, _)| k == "XML:com.adobe.xmp")
                    .map(|(_, t)| t)
            }
            _ => xmp_packet(&bytes),
        }
        .unwrap_or_else(|| panic!("no XMP in the {format} file"));
        for needle in [
            "trainedAlgorithmicMedia",
            "a red fox &amp; a &quot;blue&quot; bird",
            "diffusiond:model=\"flux-2-pro\"",
            "diffusiond:pipeline=\"flux2-klein\"",
            "diffusiond:seed=\"77\"",
            "diffusiond:steps=\"3\"",
            "diffusiond:guidance_scale=\"1\"",
            "diffusiond:width=\"96\"",
            "diffusiond:height=\"64\"",
            concat!(
                "xmp:CreatorTool=\"diffusiond ",
                env!("CARGO_PKG_VERSION"),
                "\""
            ),
        ] {
            assert!(xmp.contains(needle), "{format}: {needle} not in {xmp}");
        }
        // Still decodes as an image of the asked size.
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (96, 64));
    }
    drop(server);

    let ws = Workspace::new();
    let server = ws.serve(&["--no-metadata"]);
    for format in ["png", "jpeg", "webp"] {
        let v = server
            .post(
                &json!({"prompt": prompt, "model": "flux-2-pro", "steps": 1, "output_format": format})
                    .to_string(),
                None,
            )
            .success();
        let bytes = server
            .get_url(v["images"][0]["url"].as_str().unwrap())
            .bytes;
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("trainedAlgorithmicMedia") && !text.contains("red fox"),
            "{format}"
        );
    }
}

/// Text chunks of a PNG as (keyword, text), tEXt and iTXt alike, read with the `png` crate.
fn png_texts(bytes: &[u8]) -> Vec<(String, String)> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    reader.finish().unwrap();
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    out
}

/// The XMP packet embedded in a JPEG or WebP file, found by its delimiters (independent of the
/// server's own writer).
fn xmp_packet(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let start = text.find("<x:xmpmeta")?;
    let end = text[start..].find("</x:xmpmeta>")? + start + "</x:xmpmeta>".len();
    Some(text[start..end].to_string())
}
