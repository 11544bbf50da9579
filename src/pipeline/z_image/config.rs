//! `transformer/config.json` of a Z-Image checkpoint, and the sizes derived from it.

use serde::Deserialize;

use crate::pipeline::error::{load_err, Result};

/// Sequence lengths of both streams are padded to a multiple of this (`SEQ_MULTI_OF`).
pub const SEQ_MULTIPLE: usize = 32;
/// Width of the adaLN conditioning vector is `min(dim, ADALN_EMBED_DIM)`.
pub const ADALN_EMBED_DIM: usize = 256;
/// Hidden width of the timestep embedder's MLP (fixed in the architecture).
pub const T_EMBED_HIDDEN: usize = 1024;
/// Sinusoidal timestep features fed to the timestep embedder.
pub const T_FREQ_DIM: usize = 256;

#[derive(Debug, Clone, Deserialize)]
pub struct TransformerConfig {
    pub all_patch_size: Vec<usize>,
    pub all_f_patch_size: Vec<usize>,
    pub in_channels: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub norm_eps: f64,
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    pub rope_theta: f64,
    pub t_scale: f64,
    pub axes_dims: Vec<usize>,
    pub axes_lens: Vec<usize>,
}

impl TransformerConfig {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    /// FFN width as the reference computes it: `int(dim / 3 * 8)` (float division, truncation).
    pub fn ffn_hidden(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }
    pub fn patch(&self) -> usize {
        self.all_patch_size.first().copied().unwrap_or(2)
    }
    pub fn f_patch(&self) -> usize {
        self.all_f_patch_size.first().copied().unwrap_or(1)
    }
    /// Length of one patch vector: `f_patch * patch * patch * in_channels`.
    pub fn patch_dim(&self) -> usize {
        self.f_patch() * self.patch() * self.patch() * self.in_channels
    }
    /// The key naming the embedder / final layer for the first patch size, e.g. `2-1`.
    pub fn patch_key(&self) -> String {
        format!("{}-{}", self.patch(), self.f_patch())
    }

    pub fn validate(&self) -> Result<()> {
        let hd = self.head_dim();
        if !self.dim.is_multiple_of(self.n_heads) || !hd.is_multiple_of(2) {
            return Err(load_err(format!(
                "transformer dim {} is not n_heads {} times an even head_dim",
                self.dim, self.n_heads
            )));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(load_err(
                "transformer n_heads must be a multiple of n_kv_heads",
            ));
        }
        if self.axes_dims.len() != 3 || self.axes_lens.len() != 3 {
            return Err(load_err(
                "transformer axes_dims and axes_lens need 3 entries",
            ));
        }
        if self.axes_dims.iter().sum::<usize>() != hd || self.axes_dims.iter().any(|d| d % 2 != 0) {
            return Err(load_err(format!(
                "transformer axes_dims {:?} must be even and sum to head_dim {hd}",
                self.axes_dims
            )));
        }
        if self.f_patch() != 1 {
            return Err(load_err("only all_f_patch_size [1] (images) is supported"));
        }
        if !self.qk_norm {
            return Err(load_err("only qk_norm = true is supported"));
        }
        Ok(())
    }
}

/// Round up to the next multiple of [`SEQ_MULTIPLE`].
pub fn pad_len(n: usize) -> usize {
    n.div_ceil(SEQ_MULTIPLE) * SEQ_MULTIPLE
}
