//! What can go wrong in a generation request, independent of HTTP (http/error.rs maps it).

use crate::accounts::AccountsError;

/// A request field with a bad value. Wrong JSON types never get here (http/ rejects them).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("prompt is required and must not be empty or only white space")]
    MissingPrompt,
    #[error(
        "prompt has {0} characters; at most {max} are allowed",
        max = super::validate::MAX_PROMPT_CHARS
    )]
    PromptTooLong(usize),
    #[error("{0}")]
    InvalidModel(String),
    #[error("{0}")]
    InvalidDimensions(String),
    #[error("{0}")]
    InvalidNumImages(String),
    #[error("{0}")]
    InvalidParameter(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Accounts are on and the request has no valid key.
    #[error("{0}")]
    Unauthorized(String),
    #[error("this request costs {needed} credits but the key's balance is {balance}; nothing was charged")]
    InsufficientCredits { needed: i64, balance: i64 },
    #[error("the key's daily quota of {quota} requests is used up; it resets at 00:00 UTC")]
    QuotaExceeded { quota: i64, retry_after_secs: u64 },
    #[error("{message}; nothing was charged")]
    Busy {
        message: &'static str,
        retry_after_secs: u64,
    },
    /// The pipeline (or writing its result) failed; details are in the log, not in this message.
    #[error("image generation failed; nothing was charged (details are in the server log under this request_id)")]
    GenerationFailed,
    /// The `Idempotency-Key` header is empty, too long, or not printable ASCII.
    #[error(
        "the Idempotency-Key header must be 1 to {max} printable ASCII characters",
        max = super::idempotency::MAX_IDEMPOTENCY_KEY_CHARS
    )]
    InvalidIdempotencyKey,
    /// The `Idempotency-Key` was used with another request body in the last 24 hours.
    #[error("this Idempotency-Key was used with a different request body in the last 24 hours; send a new key for a new request")]
    IdempotencyKeyReused,
    /// Anything else (database, bugs); details are logged, the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<AccountsError> for InferError {
    fn from(e: AccountsError) -> Self {
        match e {
            AccountsError::UnknownKey => {
                InferError::Unauthorized("the API key is not valid".into())
            }
            AccountsError::RevokedKey => {
                InferError::Unauthorized("the API key has been revoked".into())
            }
            AccountsError::InsufficientCredits { needed, balance } => {
                InferError::InsufficientCredits { needed, balance }
            }
            AccountsError::QuotaExceeded {
                quota,
                retry_after_secs,
            } => InferError::QuotaExceeded {
                quota,
                retry_after_secs,
            },
            other => InferError::Internal(other.to_string()),
        }
    }
}
