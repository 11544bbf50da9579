//! The web playground at GET /: one page and its script and style, compiled into the binary
//! (no CDN; works offline). It talks to the same API as any client: GET /v1/models,
//! POST /v1/generate with `Accept: text/event-stream` (progress and previews), GET /v1/account.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};

use super::error::ApiError;

const PAGE: &str = include_str!("assets/playground.html");
const SCRIPT: &str = include_str!("assets/playground.js");
const STYLE: &str = include_str!("assets/playground.css");

pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `/playground/app.js` and `/playground/app.css`; anything else is 404.
pub async fn asset(Path(name): Path<String>) -> Result<Response, ApiError> {
    let (body, kind) = match name.as_str() {
        "app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "app.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return Err(ApiError::NotFound),
    };
    let mut res = body.into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    Ok(res)
}
