//! The Qwen chat template and tokenization of prompts.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::pipeline::error::{PipelineError, Result};

/// The pipeline's default `max_sequence_length`: token ids beyond it are cut at the right end.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The chat template with one user message and the generation prompt (thinking enabled, so no
/// think block is inserted).
pub fn format_prompt(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_len: usize,
}

impl PromptTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| {
            PipelineError::Load(format!("cannot load tokenizer {}: {e}", path.display()))
        })?;
        Ok(Self {
            tokenizer,
            max_len: MAX_SEQUENCE_LENGTH,
        })
    }

    /// Ids of the templated prompt, truncated to `max_sequence_length`. Special-token strings
    /// inside the prompt are parsed as special tokens, as the reference tokenizer does.
    pub fn ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(format_prompt(prompt), true)
            .map_err(|e| PipelineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.max_len);
        Ok(ids)
    }
}
