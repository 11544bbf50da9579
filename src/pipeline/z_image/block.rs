//! The Z-Image transformer block: self-attention with q/k RMSNorm and 3-D RoPE, a SwiGLU FFN,
//! sandwich RMSNorms, and optional adaLN modulation (scale and tanh gate).

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{linear, Linear};

use super::config::TransformerConfig;
use crate::pipeline::attention::attention;
use crate::pipeline::error::Result;
use crate::pipeline::kernels::{qkv_norm_rope, RowNorm};
use crate::pipeline::linear::{Dense, SwiGlu};
use crate::pipeline::quant::Weights;

/// Rotary tables and key mask shared by every block of one stream.
pub struct StreamCtx {
    /// `(B, S, head_dim/2)` f32.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Valid rows of each item (rows past it are batch padding).
    pub lens: Vec<usize>,
}

/// A linear layer applied to each row of `c` on its own. The per-item conditioning vectors are
/// few rows; small-M matmul kernels round differently from large-M ones, so rows are never
/// mixed, keeping every item's result independent of its batch.
pub fn per_item(lin: &Linear, c: &Tensor) -> Result<Tensor> {
    let b = c.dim(0)?;
    if b == 1 {
        return Ok(lin.forward(c)?);
    }
    let rows = (0..b)
        .map(|i| lin.forward(&c.narrow(0, i, 1)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

struct SelfAttention {
    /// to_q, to_k, to_v fused.
    qkv: Dense,
    to_out: Dense,
    norm_q: RowNorm,
    norm_k: RowNorm,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &TransformerConfig, w: Weights) -> Result<Self> {
        let hd = cfg.head_dim();
        let vb = w.vb();
        Ok(Self {
            qkv: Dense::load(
                &w,
                &["to_q", "to_k", "to_v"],
                cfg.dim,
                &[cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd],
                false,
            )?,
            to_out: Dense::load(&w, &["to_out.0"], cfg.n_heads * hd, &[cfg.dim], false)?,
            norm_q: RowNorm::new(hd, 1e-5, vb.pp("norm_q"))?,
            norm_k: RowNorm::new(hd, 1e-5, vb.pp("norm_k"))?,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: hd,
        })
    }

    /// `fused`: take the one-pass q/k norm + RoPE kernel when the input allows it.
    fn forward(&self, x: &Tensor, ctx: &StreamCtx, fused: bool) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let dtype = x.dtype();
        let (hq, hkv) = (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        );
        let qkv = self.qkv.forward(x)?;
        let heads = (self.n_heads, self.n_kv_heads, self.head_dim);
        let prepared = if fused {
            qkv_norm_rope(
                &qkv,
                &self.norm_q,
                &self.norm_k,
                (&ctx.cos, &ctx.sin),
                heads,
            )?
        } else {
            None
        };
        if let Some((q, k, v)) = prepared {
            let out = attention(&q, &k, &v, Some(&ctx.lens))?;
            return self.to_out.forward(&out);
        }
        let qkv = Dense::split(&qkv, &[hq, hkv, hkv])?;
        let q = qkv[0].reshape((b, s, self.n_heads, self.head_dim))?;
        let k = qkv[1].reshape((b, s, self.n_kv_heads, self.head_dim))?;
        let v = qkv[2].reshape((b, s, self.n_kv_heads, self.head_dim))?;
        // RoPE runs in f32 as in the reference, on (B, H, S, D).
        let rot = |t: Tensor| -> Result<Tensor> {
            let t = t.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous()?;
            Ok(candle_nn::rotary_emb::rope_i(&t, &ctx.cos, &ctx.sin)?.to_dtype(dtype)?)
        };
        let q = rot(self.norm_q.forward(&q)?)?;
        let k = rot(self.norm_k.forward(&k)?)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let out = attention(&q, &k, &v, Some(&ctx.lens))?; // (B, S, H*D)
        self.to_out.forward(&out)
    }
}

struct FeedForward {
    /// `silu(x w1) * (x w3)`, fused.
    w13: SwiGlu,
    w2: Dense,
}

impl FeedForward {
    fn new(dim: usize, hidden: usize, w: Weights) -> Result<Self> {
        Ok(Self {
            w13: SwiGlu::load(&w, "w1", "w3", dim, hidden)?,
            w2: Dense::load(&w, &["w2"], hidden, &[dim], false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.w2.forward(&self.w13.forward(x)?)
    }
}

pub struct Block {
    attention: SelfAttention,
    feed_forward: FeedForward,
    attention_norm1: RowNorm,
    attention_norm2: RowNorm,
    ffn_norm1: RowNorm,
    ffn_norm2: RowNorm,
    /// `adaLN_modulation.0`: adaln -> 4*dim (scale_msa, gate_msa, scale_mlp, gate_mlp).
    modulation: Option<Linear>,
}

impl Block {
    pub fn new(cfg: &TransformerConfig, modulated: bool, w: Weights) -> Result<Self> {
        let eps = cfg.norm_eps;
        let d = cfg.dim;
        let vb = w.vb();
        Ok(Self {
            attention: SelfAttention::new(cfg, w.pp("attention"))?,
            feed_forward: FeedForward::new(d, cfg.ffn_hidden(), w.pp("feed_forward"))?,
            attention_norm1: RowNorm::new(d, eps, vb.pp("attention_norm1"))?,
            attention_norm2: RowNorm::new(d, eps, vb.pp("attention_norm2"))?,
            ffn_norm1: RowNorm::new(d, eps, vb.pp("ffn_norm1"))?,
            ffn_norm2: RowNorm::new(d, eps, vb.pp("ffn_norm2"))?,
            modulation: if modulated {
                Some(linear(cfg.adaln_dim(), 4 * d, vb.pp("adaLN_modulation.0"))?)
            } else {
                None
            },
        })
    }

    /// x: (B, S, dim); adaln: (B, adaln_dim) for modulated blocks.
    pub fn forward(&self, x: &Tensor, ctx: &StreamCtx, adaln: Option<&Tensor>) -> Result<Tensor> {
        if self.attention_norm1.fused_for(x) {
            if let Some(y) = self.forward_fused(x, ctx, adaln)? {
                return Ok(y);
            }
        }
        self.forward_plain(x, ctx, adaln)
    }

    /// The block with candle's ops, as the reference writes it (GPU, other dtypes, other CPUs).
    fn forward_plain(&self, x: &Tensor, ctx: &StreamCtx, adaln: Option<&Tensor>) -> Result<Tensor> {
        match (&self.modulation, adaln) {
            (Some(m), Some(c)) => {
                let mods = per_item(m, c)?.unsqueeze(1)?.chunk(4, D::Minus1)?;
                let scale_msa = (&mods[0] + 1.0)?;
                let gate_msa = mods[1].tanh()?;
                let scale_mlp = (&mods[2] + 1.0)?;
                let gate_mlp = mods[3].tanh()?;
                let h = self.attention_norm1.forward(x)?.broadcast_mul(&scale_msa)?;
                let h = self
                    .attention_norm2
                    .forward(&self.attention.forward(&h, ctx, false)?)?;
                let x = (x + h.broadcast_mul(&gate_msa)?)?;
                let h = self.ffn_norm1.forward(&x)?.broadcast_mul(&scale_mlp)?;
                let h = self.ffn_norm2.forward(&self.feed_forward.forward(&h)?)?;
                Ok((x + h.broadcast_mul(&gate_mlp)?)?)
            }
            _ => {
                let h = self.attention_norm1.forward(x)?;
                let h = self
                    .attention_norm2
                    .forward(&self.attention.forward(&h, ctx, false)?)?;
                let x = (x + h)?;
                let h = self
                    .ffn_norm2
                    .forward(&self.feed_forward.forward(&self.ffn_norm1.forward(&x)?)?)?;
                Ok((x + h)?)
            }
        }
    }

    /// The same block on the CPU f32 path: each norm with its modulation (and, after a branch,
    /// its gate and the residual add) is one pass over the rows. The modulation vectors are
    /// computed per item as before and read on the host.
    fn forward_fused(
        &self,
        x: &Tensor,
        ctx: &StreamCtx,
        adaln: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let mods = match (&self.modulation, adaln) {
            (Some(m), Some(c)) => {
                let (b, d) = (x.dim(0)?, x.dim(2)?);
                let rows = per_item(m, c)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let mut parts = [(); 4].map(|_| Vec::with_capacity(b * d));
                for row in &rows {
                    for (j, part) in parts.iter_mut().enumerate() {
                        let src = &row[j * d..(j + 1) * d];
                        // scale = 1 + m, gate = tanh(m), as the reference.
                        part.extend(
                            src.iter()
                                .map(|&v| if j % 2 == 0 { 1.0 + v } else { v.tanh() }),
                        );
                    }
                }
                Some(parts)
            }
            _ => None,
        };
        let part = |j: usize| mods.as_ref().map(|m| m[j].as_slice());
        let Some(h) = self.attention_norm1.try_norm_scale(x, part(0))? else {
            return Ok(None);
        };
        let a = self.attention.forward(&h, ctx, true)?;
        let Some(x) = self.attention_norm2.try_residual(x, &a, part(1))? else {
            return Ok(None);
        };
        let Some(h) = self.ffn_norm1.try_norm_scale(&x, part(2))? else {
            return Ok(None);
        };
        let f = self.feed_forward.forward(&h)?;
        Ok(self.ffn_norm2.try_residual(&x, &f, part(3))?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::{Block, StreamCtx};
    use crate::pipeline::quant::Weights;
    use crate::pipeline::z_image::config::TransformerConfig;
    use crate::pipeline::z_image::rope::{image_positions, Rope};

    fn weights(cfg: &TransformerConfig, dev: &Device) -> HashMap<String, Tensor> {
        let (d, hd) = (cfg.dim, cfg.head_dim());
        let (hq, hkv, ffn) = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.ffn_hidden());
        let shapes: Vec<(&str, Vec<usize>)> = vec![
            ("attention.to_q.weight", vec![hq, d]),
            ("attention.to_k.weight", vec![hkv, d]),
            ("attention.to_v.weight", vec![hkv, d]),
            ("attention.to_out.0.weight", vec![d, hq]),
            ("attention.norm_q.weight", vec![hd]),
            ("attention.norm_k.weight", vec![hd]),
            ("feed_forward.w1.weight", vec![ffn, d]),
            ("feed_forward.w2.weight", vec![d, ffn]),
            ("feed_forward.w3.weight", vec![ffn, d]),
            ("attention_norm1.weight", vec![d]),
            ("attention_norm2.weight", vec![d]),
            ("ffn_norm1.weight", vec![d]),
            ("ffn_norm2.weight", vec![d]),
            ("adaLN_modulation.0.weight", vec![4 * d, cfg.adaln_dim()]),
            ("adaLN_modulation.0.bias", vec![4 * d]),
        ];
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = Tensor::randn(0f32, 0.2, shape.as_slice(), dev).unwrap();
                let t = if shape.len() == 1 {
                    (t + 1.0).unwrap()
                } else {
                    t
                };
                (name.to_string(), t)
            })
            .collect()
    }

    /// The fused CPU passes (taken on every machine with AVX2) and candle's plain ops compute the
    /// same block: keeps the path GPUs and other CPUs take honest.
    #[test]
    fn fused_cpu_path_matches_the_plain_ops() {
        let dev = Device::Cpu;
        let cfg: TransformerConfig = serde_json::from_str(
            r#"{"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 4, "dim": 96,
                "n_layers": 1, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                "norm_eps": 1e-5, "qk_norm": true, "cap_feat_dim": 32, "rope_theta": 256.0,
                "t_scale": 1000.0, "axes_dims": [8, 8, 8], "axes_lens": [64, 32, 32]}"#,
        )
        .unwrap();
        let vb = VarBuilder::from_tensors(weights(&cfg, &dev), DType::F32, &dev);
        let (b, s) = (2, 40);
        let rope = Rope::new(cfg.rope_theta, &cfg.axes_dims, &cfg.axes_lens);
        let (cos, sin) = rope.tables(&image_positions(5, 8, s, 32), &dev).unwrap();
        let ctx = StreamCtx {
            cos: Tensor::stack(&[&cos, &cos], 0).unwrap(),
            sin: Tensor::stack(&[&sin, &sin], 0).unwrap(),
            lens: vec![40, 33],
        };
        let x = Tensor::randn(0f32, 1.0, (b, s, cfg.dim), &dev).unwrap();
        let adaln = Tensor::randn(0f32, 1.0, (b, cfg.adaln_dim()), &dev).unwrap();
        for modulated in [true, false] {
            let block = Block::new(&cfg, modulated, Weights::dense(vb.clone())).unwrap();
            let c = modulated.then_some(&adaln);
            let fused = block.forward_fused(&x, &ctx, c).unwrap();
            let Some(fused) = fused else {
                crate::pipeline::kernels::detect::skipped(
                    "pipeline::z_image::block::tests::fused_cpu_path_matches_the_plain_ops",
                    "AVX2 + FMA",
                );
                return;
            };
            let plain = block.forward_plain(&x, &ctx, c).unwrap();
            let err = (fused - plain)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 2e-5, "modulated={modulated}: max abs diff {err}");
        }
    }
}
