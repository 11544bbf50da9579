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
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, where one is (OpenAI's `param`).
    pub param: Option<&'static str>,
    /// What went wrong inside, for the log only (5xx).
    pub detail: Option<String>,
}

impl ErrorPayload {
    /// The contract's error body.
    pub fn hosted_body(&self, request_id: &str) -> serde_json::Value {
        serde_json::json!({
            "success": false,
            "error": { "code": self.code, "message": self.message },
            "request_id": request_id,
        })
    }

    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai_body(&self) -> serde_json::Value {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            402 => "insufficient_quota",
            404 => "not_found_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
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

/// Fields that errors name first in their message (OpenAI's `param`).
const PARAMETERS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "width",
    "height",
    "num_images",
    "quality",
    "resolution",
    "seed",
    "steps",
    "guidance_scale",
    "negative_prompt",
    "output_format",
    "output_compression",
    "response_format",
    "background",
    "partial_images",
    "stream",
];

/// The known field a message names first (bare or quoted).
fn named_field(message: &str) -> Option<&'static str> {
    let first = message.split([' ', ':']).next().unwrap_or("");
    let first = first.trim_matches('\'');
    PARAMETERS.iter().copied().find(|p| *p == first)
}

impl ApiError {
    /// The field a validation error is about (named as on the OpenAI route).
    fn param(&self) -> Option<&'static str> {
        use ValidationError as V;
        match self {
            ApiError::Infer(InferError::Invalid(v)) => match v {
                V::MissingPrompt | V::PromptTooLong(_) => Some("prompt"),
                V::InvalidModel(_) => Some("model"),
                V::InvalidDimensions(_) => Some("size"),
                V::InvalidNumImages(_) => Some("n"),
                // The messages name their field first (`steps is 0; ...`, `quality 'x' is ...`).
                V::InvalidParameter(m) => named_field(m),
            },
            // A field of the wrong JSON type: `field 'steps' must be an integer, ...`.
            ApiError::InvalidRequest(m) => m.strip_prefix("field ").and_then(named_field),
            _ => None,
        }
    }

    /// Status, code, message (generic for internal errors) and log detail.
    pub fn payload(&self) -> ErrorPayload {
        let (status, code, _) = self.status_code();
        let (message, detail) = match self {
            // 5xx bodies stay generic; the detail goes to the log.
            ApiError::Infer(InferError::Internal(detail)) => {
                ("internal error".to_string(), Some(detail.clone()))
            }
            other => (other.to_string(), None),
        };
        ErrorPayload {
            status,
            code,
            message,
            param: self.param(),
            detail,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, retry_after) = self.status_code();
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
        res.extensions_mut().insert(self.payload());
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
