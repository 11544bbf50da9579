//! GET /files/gen/{request_id}/{file}: stored images. Anything else under /files is 404.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

pub async fn image(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
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
    let mut res = stored.bytes.into_response();
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
    Ok(res)
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}
