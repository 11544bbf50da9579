//! The Qwen chat template and tokenization of prompts, shared by the families: each gives its
//! template variant and its maximum length.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::pipeline::error::{PipelineError, Result};

/// The reference pipelines' default `max_sequence_length`: token ids beyond it are cut at the
/// right end.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The pad token of the Qwen tokenizer, used to right-pad prompts to a fixed length.
const PAD_TOKEN: &str = "<|endoftext|>";

/// The variant of Qwen3's chat template (one user message, generation prompt added).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `enable_thinking=True` (Z-Image): no think block.
    Thinking,
    /// `enable_thinking=False` (FLUX.2 [klein]): an empty think block ends the template.
    NoThinking,
}

impl ChatTemplate {
    /// The templated prompt.
    pub fn format(self, prompt: &str) -> String {
        let head = format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n");
        match self {
            ChatTemplate::Thinking => head,
            ChatTemplate::NoThinking => head + "<think>\n\n</think>\n\n",
        }
    }
}

/// The chat template with one user message and the generation prompt (thinking enabled, so no
/// think block is inserted): Z-Image's.
pub fn format_prompt(prompt: &str) -> String {
    ChatTemplate::Thinking.format(prompt)
}

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_len: usize,
}

impl PromptTokenizer {
    /// Z-Image's tokenizer: thinking template, 512 tokens.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::with_template(path, ChatTemplate::Thinking, MAX_SEQUENCE_LENGTH)
    }

    /// A tokenizer applying `template` and cutting at `max_len` tokens.
    pub fn with_template(path: &Path, template: ChatTemplate, max_len: usize) -> Result<Self> {
        if max_len == 0 {
            return Err(PipelineError::Load(
                "max_sequence_length must be at least 1".into(),
            ));
        }
        let tokenizer = Tokenizer::from_file(path).map_err(|e| {
            PipelineError::Load(format!("cannot load tokenizer {}: {e}", path.display()))
        })?;
        Ok(Self {
            tokenizer,
            template,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Ids of the templated prompt, truncated to `max_sequence_length`. Special-token strings
    /// inside the prompt are parsed as special tokens, as the reference tokenizer does.
    pub fn ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(self.template.format(prompt), true)
            .map_err(|e| PipelineError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        ids.truncate(self.max_len);
        Ok(ids)
    }

    /// [`Self::ids`] right-padded with `<|endoftext|>` to exactly `max_sequence_length`, and the
    /// number of prompt tokens (the attention mask's ones).
    pub fn padded_ids(&self, prompt: &str) -> Result<(Vec<u32>, usize)> {
        let pad = self
            .tokenizer
            .token_to_id(PAD_TOKEN)
            .ok_or_else(|| PipelineError::Tokenizer(format!("no {PAD_TOKEN} token")))?;
        let mut ids = self.ids(prompt)?;
        let valid = ids.len();
        ids.resize(self.max_len, pad);
        Ok((ids, valid))
    }
}
