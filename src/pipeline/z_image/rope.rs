//! 3-D rotary position embedding of the Z-Image transformer.
//!
//! Per axis `a` with width `d_a`: `freq_k = theta^(-2k/d_a)` in f64, angle `pos * freq_k` in f64
//! then cast to f32, cos/sin in f32; the three axes are concatenated (d/2 pairs in all).

use candle_core::{Device, Tensor};

use crate::pipeline::error::{PipelineError, Result};

pub struct Rope {
    /// Per axis, its f64 frequencies.
    freqs: Vec<Vec<f64>>,
    axes_lens: Vec<usize>,
    half: usize,
}

impl Rope {
    pub fn new(theta: f64, axes_dims: &[usize], axes_lens: &[usize]) -> Self {
        let freqs = axes_dims
            .iter()
            .map(|&d| {
                (0..d / 2)
                    .map(|k| 1.0 / theta.powf((2 * k) as f64 / d as f64))
                    .collect()
            })
            .collect();
        Self {
            freqs,
            axes_lens: axes_lens.to_vec(),
            half: axes_dims.iter().sum::<usize>() / 2,
        }
    }

    /// cos and sin tables `(n, head_dim/2)` in f32 for 3-D positions.
    pub fn tables(&self, positions: &[[usize; 3]], device: &Device) -> Result<(Tensor, Tensor)> {
        let n = positions.len();
        let mut cos = Vec::with_capacity(n * self.half);
        let mut sin = Vec::with_capacity(n * self.half);
        for pos in positions {
            for (axis, freqs) in self.freqs.iter().enumerate() {
                if pos[axis] >= self.axes_lens[axis] {
                    return Err(PipelineError::InvalidInput(format!(
                        "position {} on axis {axis} exceeds the model's limit {} (image or prompt too large)",
                        pos[axis], self.axes_lens[axis]
                    )));
                }
                for f in freqs {
                    let angle = (pos[axis] as f64 * f) as f32;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, self.half), device)?,
            Tensor::from_vec(sin, (n, self.half), device)?,
        ))
    }
}

/// Positions of one item's caption tokens (including its pad tokens): `(1 + j, 0, 0)`.
pub fn caption_positions(padded_len: usize) -> Vec<[usize; 3]> {
    (0..padded_len).map(|j| [1 + j, 0, 0]).collect()
}

/// Positions of one item's image tokens: `(P + 1, h, w)` in row-major order for the real tokens,
/// `(0, 0, 0)` for the pad tokens up to `padded_len`. `cap_padded` is the item's own padded
/// caption length P.
pub fn image_positions(
    ht: usize,
    wt: usize,
    padded_len: usize,
    cap_padded: usize,
) -> Vec<[usize; 3]> {
    let mut out = Vec::with_capacity(padded_len);
    for h in 0..ht {
        for w in 0..wt {
            out.push([cap_padded + 1, h, w]);
        }
    }
    out.resize(padded_len, [0, 0, 0]);
    out
}
