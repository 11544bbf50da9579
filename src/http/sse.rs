//! Server-Sent Events for a running generation: progress while it runs, then the result.
//!
//! A request is validated, charged and queued before the stream opens (so refusals keep their
//! HTTP status); the stream then carries the job's progress and ends with the outcome. The job
//! lives inside the task that feeds the stream: when the client goes away the stream's receiver
//! is dropped, the task drops the job, and the job is cancelled at the next step boundary and
//! refunded, as for a plain request whose client disconnects.
//!
//! Hosted route (`POST /v1/generate` with `Accept: text/event-stream`), events in order:
//! `queued` `{"position"}`, `started` `{}`, `step` `{"step", "steps"}` after every denoising step,
//! `preview` `{"index", "step", "steps", "width", "height", "output_format": "jpeg", "b64_json"}`
//! when asked for with `partial_images`, and last `completed` (data: exactly the JSON body of the
//! non-streaming answer) or `error` (data: the contract's error body).

use std::convert::Infallible;
use std::io::Cursor;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::dto::GenerateResponse;
use super::error::ApiError;
use super::openai::StreamMeta;
use super::AppState;
use crate::image::{ImageFormat, RgbImage};
use crate::infer::{Generated, InferError, RequestId, Running};
use crate::scheduler::{Progress, ProgressRx};
use crate::store::Encoding;

/// Comment lines at this interval keep proxies from closing a quiet stream (a long queue wait).
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// JPEG quality of hosted-route previews.
const PREVIEW_QUALITY: u8 = 80;

/// Whether the client asked for an event stream.
pub fn wants_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// How a stream's events are shaped.
pub enum Style {
    /// The hosted route's events; `base` is the public base URL.
    Hosted { base: String },
    /// OpenAI's `image_generation.*` events.
    OpenAi(StreamMeta),
}

/// Stream a running request's progress and result.
pub fn respond(
    state: AppState,
    id: RequestId,
    running: Running,
    progress: ProgressRx,
    style: Style,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(drive(state, id, running, progress, style, tx));
    let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    let mut res = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Proxies (nginx) must not buffer it.
    res.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    res
}

async fn drive(
    state: AppState,
    id: RequestId,
    running: Running,
    mut progress: ProgressRx,
    mut style: Style,
    tx: mpsc::Sender<Event>,
) {
    let finish = running.finish();
    tokio::pin!(finish);
    let mut open = true;
    let result = loop {
        tokio::select! {
            biased;
            p = progress.recv(), if open => match p {
                Some(p) => {
                    for e in style.progress(p) {
                        if tx.send(e).await.is_err() {
                            return;
                        }
                    }
                }
                None => open = false,
            },
            r = &mut finish => break r,
            // The client went away: returning drops `finish`, which cancels and refunds.
            () = tx.closed() => return,
        }
    };
    while let Ok(p) = progress.try_recv() {
        for e in style.progress(p) {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    }
    for e in style.done(&state, &id, result).await {
        if tx.send(e).await.is_err() {
            return;
        }
    }
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// Encode an image for an event: base64 of the file bytes.
pub fn b64_image(img: &RgbImage, encoding: Encoding) -> Option<String> {
    let mut buf = Cursor::new(Vec::new());
    crate::store::encode_with(img, encoding, None, &mut buf).ok()?;
    Some(base64::engine::general_purpose::STANDARD.encode(buf.into_inner()))
}

impl Style {
    fn progress(&mut self, p: Progress) -> Vec<Event> {
        match self {
            Style::Hosted { .. } => hosted_progress(p).into_iter().collect(),
            Style::OpenAi(meta) => meta.progress(p).into_iter().collect(),
        }
    }

    async fn done(
        &mut self,
        state: &AppState,
        id: &RequestId,
        result: Result<Generated, InferError>,
    ) -> Vec<Event> {
        match self {
            Style::Hosted { base } => vec![match result {
                Ok(g) => event("completed", &json!(GenerateResponse::new(base, g))),
                Err(e) => {
                    let p = ApiError::from(e).payload();
                    log_detail(id, &p.detail);
                    event("error", &p.hosted_body(id.as_str()))
                }
            }],
            Style::OpenAi(meta) => match result {
                Ok(g) => meta.completed(state, g).await,
                Err(e) => {
                    let p = ApiError::from(e).payload();
                    log_detail(id, &p.detail);
                    vec![event("error", &p.openai_body())]
                }
            },
        }
    }
}

fn log_detail(id: &RequestId, detail: &Option<String>) {
    if let Some(d) = detail {
        tracing::error!(request_id = %id, "{d}");
    }
}

fn hosted_progress(p: Progress) -> Option<Event> {
    Some(match p {
        Progress::Queued { position } => event("queued", &json!({ "position": position })),
        Progress::Started => event("started", &json!({})),
        Progress::Step { done, total } => event("step", &json!({"step": done, "steps": total})),
        Progress::Preview {
            index,
            step,
            total,
            image,
        } => {
            let encoding = Encoding {
                format: ImageFormat::Jpeg,
                quality: Some(PREVIEW_QUALITY),
            };
            event(
                "preview",
                &json!({
                    "index": index, "step": step, "steps": total,
                    "width": image.width, "height": image.height,
                    "output_format": "jpeg", "b64_json": b64_image(&image, encoding)?,
                }),
            )
        }
    })
}

/// An event built by another module of http/.
pub(super) fn named_event(name: &str, data: &Value) -> Event {
    event(name, data)
}
