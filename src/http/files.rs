//! GET /files/gen/{request_id}/{file}: stored images, streamed from disk or the bucket with
//! `Range`, `ETag` and `If-None-Match`. Anything else under /files is 404.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use super::error::ApiError;
use super::file_body::{etag, none_match, parse_range, FileBody, RangeRequest};
use super::AppState;

pub async fn image(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    let Ok(Path((request_id, file))) = path else {
        return Err(ApiError::NotFound);
    };
    // The store accepts only the exact shapes it writes (req_ID / image_N.ext).
    let stored = state
        .facade
        .file(&request_id, &file)
        .await
        .ok_or(ApiError::NotFound)?;
    let tag = etag(stored.len, stored.modified);
    let header_str = |name| {
        request
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };

    let mut res = Response::new(Body::empty());
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(stored.content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, v);
    }

    if header_str(header::IF_NONE_MATCH).is_some_and(|h| none_match(h, &tag)) {
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        return Ok(res);
    }
    // A Range counts only while the client's copy (If-Range) is still this one.
    let range = match header_str(header::RANGE) {
        Some(r) if header_str(header::IF_RANGE).is_none_or(|t| t.trim() == tag) => {
            parse_range(r, stored.len)
        }
        _ => RangeRequest::Full,
    };
    let (start, count) = match range {
        RangeRequest::Full => (0, stored.len),
        RangeRequest::Part { start, end } => {
            *res.status_mut() = StatusCode::PARTIAL_CONTENT;
            let v = format!("bytes {start}-{end}/{}", stored.len);
            if let Ok(v) = HeaderValue::from_str(&v) {
                res.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            (start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => return Err(ApiError::RangeNotSatisfiable(stored.len)),
    };
    let reader = stored
        .read_from(start)
        .await
        .map_err(|_| ApiError::NotFound)?;
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    *res.body_mut() = Body::new(FileBody::new(reader, count));
    Ok(res)
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}
