//! `transformer/config.json` of `Flux2Transformer2DModel`, and the sizes derived from it.

use serde::Deserialize;

use crate::pipeline::error::{load_err, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct TransformerConfig {
    #[serde(default = "one")]
    pub patch_size: usize,
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    /// Width of the stacked text features.
    pub joint_attention_dim: usize,
    #[serde(default = "default_time_channels")]
    pub timestep_guidance_channels: usize,
    pub mlp_ratio: f64,
    pub axes_dims_rope: Vec<usize>,
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub guidance_embeds: bool,
}

fn one() -> usize {
    1
}
fn default_time_channels() -> usize {
    256
}
fn default_eps() -> f64 {
    1e-6
}

impl TransformerConfig {
    /// Model width D = heads x head_dim.
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
    /// FFN hidden width F = int(D x mlp_ratio).
    pub fn ff_hidden(&self) -> usize {
        (self.dim() as f64 * self.mlp_ratio) as usize
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Refuse configurations this implementation does not follow.
    pub fn check(&self) -> Result<()> {
        if self.patch_size != 1 {
            return Err(load_err(format!(
                "flux2 transformer patch_size {} unsupported (expected 1)",
                self.patch_size
            )));
        }
        if self.guidance_embeds {
            return Err(load_err(
                "flux2 transformer with guidance embeddings is not supported (klein has none)",
            ));
        }
        if self.out_channels() != self.in_channels {
            return Err(load_err("flux2 transformer out_channels != in_channels"));
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            return Err(load_err(format!(
                "flux2 axes_dims_rope {:?} must be even and sum to head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            )));
        }
        if self.axes_dims_rope.len() != 4 {
            return Err(load_err(
                "flux2 axes_dims_rope must have 4 axes (t, h, w, l)",
            ));
        }
        if !self.timestep_guidance_channels.is_multiple_of(2) {
            return Err(load_err("timestep_guidance_channels must be even"));
        }
        Ok(())
    }
}
