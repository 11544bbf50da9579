//! The one place where errors become HTTP statuses and the contract's JSON error body.
//!
//! A handler or extractor returns an [`ApiError`]; its response carries status, `Retry-After` and an
//! [`ErrorPayload`] extension. The request-context middleware (http/context.rs), which wraps every
//! route, turns that payload into the body `{"success": false, "error": {code, message},
//! "request_id"}`, because only it knows the request ID.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::infer::{InferError, ValidationError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Infer(#[from] InferError),
    /// The body is not JSON, not an object, or a field has the wrong JSON type.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request body is larger than {} KiB", super::extract::MAX_BODY_BYTES / 1024)]
    TooLarge,
    #[error(
        "a request may not carry both Transfer-Encoding and Content-Length (RFC 9112 section 6.3)"
    )]
    AmbiguousLength,
    #[error("the client closed its side of the connection before the images were ready: the request was cancelled and nothing charged")]
    ClientClosed,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the body must be sent with 'Content-Type: application/json'")]
    UnsupportedMediaType,
    #[error("requests to this host name are not accepted here (see --allowed-hosts)")]
    HostNotAllowed,
    #[error("requests from other web origins are not accepted here (see --cors-origin)")]
    OriginNotAllowed,
    /// A `Range` outside a file of this many bytes.
    #[error("the requested range is outside the file ({0} bytes)")]
    RangeNotSatisfiable(u64),
}

/// The error part of a response, for the middleware to render (and log, when `detail` is set).
#[derive(Debug, Clone)]
pub struct ErrorPayload {
    pub code: &'static str,
    pub message: String,
    /// What went wrong inside, for the log only (5xx).
    pub detail: Option<String>,
}

impl ApiError {
    /// Status, contract code and `Retry-After` seconds of every error.
    fn status_code(&self) -> (StatusCode, &'static str, Option<u64>) {
        use InferError as I;
        use ValidationError as V;
        match self {
            ApiError::Infer(I::Invalid(v)) => (
                StatusCode::BAD_REQUEST,
                match v {
                    V::MissingPrompt => "missing_prompt",
                    V::PromptTooLong(_) => "prompt_too_long",
                    V::InvalidModel(_) => "invalid_model",
                    V::InvalidDimensions(_) => "invalid_dimensions",
                    V::InvalidNumImages(_) => "invalid_num_images",
                    V::InvalidParameter(_) => "invalid_parameter",
                },
                None,
            ),
            ApiError::InvalidRequest(_) | ApiError::AmbiguousLength | ApiError::ClientClosed => {
                (StatusCode::BAD_REQUEST, "invalid_request", None)
            }
            ApiError::Infer(I::Unauthorized(_)) => {
                (StatusCode::UNAUTHORIZED, "invalid_api_key", None)
            }
            ApiError::Infer(I::InsufficientCredits { .. }) => {
                (StatusCode::PAYMENT_REQUIRED, "insufficient_credits", None)
            }
            ApiError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large", None),
            ApiError::Infer(I::QuotaExceeded {
                retry_after_secs, ..
            }) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                Some(*retry_after_secs),
            ),
            ApiError::Infer(I::Busy {
                retry_after_secs, ..
            }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                Some(*retry_after_secs),
            ),
            ApiError::Infer(I::GenerationFailed) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "generation_failed", None)
            }
            ApiError::Infer(I::Internal(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error", None)
            }
            ApiError::Infer(I::InvalidIdempotencyKey) => {
                (StatusCode::BAD_REQUEST, "invalid_idempotency_key", None)
            }
            ApiError::Infer(I::IdempotencyKeyReused) => {
                (StatusCode::CONFLICT, "idempotency_key_reused", None)
            }
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                None,
            ),
            ApiError::HostNotAllowed => (StatusCode::FORBIDDEN, "host_not_allowed", None),
            ApiError::OriginNotAllowed => (StatusCode::FORBIDDEN, "origin_not_allowed", None),
            ApiError::RangeNotSatisfiable(_) => (
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                None,
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, retry_after) = self.status_code();
        let (message, detail) = match &self {
            // 5xx bodies stay generic; the detail goes to the log.
            ApiError::Infer(InferError::Internal(detail)) => {
                ("internal error".to_string(), Some(detail.clone()))
            }
            other => (other.to_string(), None),
        };
        let mut res = status.into_response();
        if let ApiError::RangeNotSatisfiable(len) = &self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                res.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        if let Some(secs) = retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res.extensions_mut().insert(ErrorPayload {
            code,
            message,
            detail,
        });
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: ApiError) -> (u16, &'static str, Option<u64>) {
        let (s, c, r) = e.status_code();
        (s.as_u16(), c, r)
    }

    #[test]
    fn table_rows() {
        use InferError as I;
        use ValidationError as V;
        assert_eq!(
            status(I::from(V::MissingPrompt).into()),
            (400, "missing_prompt", None)
        );
        assert_eq!(
            status(I::from(V::PromptTooLong(4001)).into()),
            (400, "prompt_too_long", None)
        );
        assert_eq!(
            status(I::from(V::InvalidModel(String::new())).into()),
            (400, "invalid_model", None)
        );
        assert_eq!(
            status(I::from(V::InvalidDimensions(String::new())).into()),
            (400, "invalid_dimensions", None)
        );
        assert_eq!(
            status(I::from(V::InvalidNumImages(String::new())).into()),
            (400, "invalid_num_images", None)
        );
        assert_eq!(
            status(I::from(V::InvalidParameter(String::new())).into()),
            (400, "invalid_parameter", None)
        );
        assert_eq!(
            status(ApiError::InvalidRequest(String::new())),
            (400, "invalid_request", None)
        );
        assert_eq!(
            status(I::Unauthorized(String::new()).into()),
            (401, "invalid_api_key", None)
        );
        assert_eq!(
            status(
                I::InsufficientCredits {
                    needed: 1,
                    balance: 0
                }
                .into()
            ),
            (402, "insufficient_credits", None)
        );
        assert_eq!(status(ApiError::TooLarge), (413, "request_too_large", None));
        assert_eq!(
            status(
                I::QuotaExceeded {
                    quota: 1,
                    retry_after_secs: 9
                }
                .into()
            ),
            (429, "rate_limit_exceeded", Some(9))
        );
        assert_eq!(
            status(
                I::Busy {
                    message: "",
                    retry_after_secs: 1
                }
                .into()
            ),
            (503, "server_busy", Some(1))
        );
        assert_eq!(
            status(I::GenerationFailed.into()),
            (500, "generation_failed", None)
        );
    }

    #[test]
    fn internal_details_stay_out_of_the_message() {
        let res = ApiError::Infer(InferError::Internal("db at /var/secret".into())).into_response();
        let p = res.extensions().get::<ErrorPayload>().cloned();
        let p = p.unwrap_or_else(|| panic!("no payload"));
        assert_eq!(p.message, "internal error");
        assert!(p.detail.is_some_and(|d| d.contains("secret")));
    }
}
