//! The pipeline layer's error type.

/// Everything that can go wrong below the scheduler: loading weights, tokenizing, running a model.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A weight source could not be read (missing file, unreachable hub, malformed config).
    #[error("{0}")]
    Load(String),
    /// A request the model cannot run (size not a multiple of 16, zero steps, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// The latents stopped being finite (inf/NaN): the weights or a kernel broke down; the
    /// image would be flat or black, so the generation fails instead.
    #[error("non-finite values in the latents: {0}")]
    NonFinite(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Shorthand for a load error with a formatted message.
pub(crate) fn load_err(msg: impl Into<String>) -> PipelineError {
    PipelineError::Load(msg.into())
}
