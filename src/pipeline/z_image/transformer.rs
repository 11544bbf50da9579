//! The Z-Image single-stream diffusion transformer (`ZImageTransformer2DModel`).
//!
//! Per item: patchify the latent, embed it and the caption, pad each stream to a multiple of 32
//! with the learned pad tokens (attended, never masked), refine each stream, then run the main
//! layers over `[image, caption]`. Batch items of different lengths are padded to the longest;
//! attention runs per item on its own length (the reference's key mask, without the wasted
//! work), so an item's output never depends on its batch mates, to the bit.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, RmsNorm, VarBuilder};

use crate::pipeline::quant::Weights;

use super::block::{per_item, Block, StreamCtx};
use super::config::{pad_len, TransformerConfig, SEQ_MULTIPLE, T_EMBED_HIDDEN, T_FREQ_DIM};
use super::rope::{caption_positions, image_positions, Rope};
use crate::pipeline::error::{load_err, PipelineError, Result};

struct TimestepEmbedder {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedder {
    fn new(out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(T_FREQ_DIM, T_EMBED_HIDDEN, vb.pp("mlp.0"))?,
            linear_2: linear(T_EMBED_HIDDEN, out, vb.pp("mlp.2"))?,
        })
    }

    /// Sinusoidal features of `t * t_scale` in f32 (`[cos, sin]`, `f_k = exp(-ln(10000) k / 128)`).
    fn forward(&self, t: &[f32], t_scale: f32, dtype: DType, device: &Device) -> Result<Tensor> {
        let half = T_FREQ_DIM / 2;
        let neg_ln = -(10000f64.ln() as f32);
        let freqs: Vec<f32> = (0..half)
            .map(|k| (neg_ln * k as f32 / half as f32).exp())
            .collect();
        let mut feats = Vec::with_capacity(t.len() * T_FREQ_DIM);
        for &ti in t {
            let ts = ti * t_scale;
            feats.extend(freqs.iter().map(|f| (ts * f).cos()));
            feats.extend(freqs.iter().map(|f| (ts * f).sin()));
        }
        let x = Tensor::from_vec(feats, (t.len(), T_FREQ_DIM), device)?.to_dtype(dtype)?;
        let h = candle_nn::ops::silu(&per_item(&self.linear_1, &x)?)?;
        per_item(&self.linear_2, &h)
    }
}

struct FinalLayer {
    linear: Linear,
    modulation: Linear,
    dim: usize,
}

impl FinalLayer {
    fn new(cfg: &TransformerConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear: linear(cfg.dim, cfg.patch_dim(), vb.pp("linear"))?,
            modulation: linear(cfg.adaln_dim(), cfg.dim, vb.pp("adaLN_modulation.1"))?,
            dim: cfg.dim,
        })
    }

    fn forward(&self, x: &Tensor, adaln: &Tensor) -> Result<Tensor> {
        let scale =
            (per_item(&self.modulation, &candle_nn::ops::silu(adaln)?)?.unsqueeze(1)? + 1.0)?;
        let ones = Tensor::ones(self.dim, x.dtype(), x.device())?;
        let zeros = Tensor::zeros(self.dim, x.dtype(), x.device())?;
        let normed = candle_nn::ops::layer_norm(x, &ones, &zeros, 1e-6)?;
        Ok(self.linear.forward(&normed.broadcast_mul(&scale)?)?)
    }
}

/// One batch item's inputs: its latent `(C, h, w)`, its refined caption `(P, dim)` (from
/// [`Transformer::refine_caption`]) and its time.
pub struct ItemInput<'a> {
    pub latent: &'a Tensor,
    pub caption: &'a Tensor,
    pub t: f32,
}

pub struct Transformer {
    cfg: TransformerConfig,
    t_embedder: TimestepEmbedder,
    cap_norm: RmsNorm,
    cap_linear: Linear,
    x_embedder: Linear,
    x_pad_token: Tensor,
    cap_pad_token: Tensor,
    noise_refiner: Vec<Block>,
    context_refiner: Vec<Block>,
    layers: Vec<Block>,
    final_layer: FinalLayer,
    rope: Rope,
    dtype: DType,
    device: Device,
}

/// A padded stream of a batch: `(B, S, dim)` and its per-item valid lengths.
struct Stream {
    x: Tensor,
    ctx: StreamCtx,
}

impl Transformer {
    pub fn new(cfg: &TransformerConfig, w: Weights) -> Result<Self> {
        cfg.validate()?;
        let vb = w.vb().clone();
        let d = cfg.dim;
        let key = cfg.patch_key();
        let blocks = |name: &str, n: usize, modulated: bool| -> Result<Vec<Block>> {
            (0..n)
                .map(|i| Block::new(cfg, modulated, w.pp(format!("{name}.{i}"))))
                .collect()
        };
        let x_pad_token = vb.get((1, d), "x_pad_token")?;
        let cap_pad_token = vb.get((1, d), "cap_pad_token")?;
        Ok(Self {
            t_embedder: TimestepEmbedder::new(cfg.adaln_dim(), vb.pp("t_embedder"))?,
            cap_norm: candle_nn::rms_norm(cfg.cap_feat_dim, cfg.norm_eps, vb.pp("cap_embedder.0"))?,
            cap_linear: linear(cfg.cap_feat_dim, d, vb.pp("cap_embedder.1"))?,
            x_embedder: linear(cfg.patch_dim(), d, vb.pp(format!("all_x_embedder.{key}")))?,
            x_pad_token,
            cap_pad_token,
            noise_refiner: blocks("noise_refiner", cfg.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", cfg.n_refiner_layers, false)?,
            layers: blocks("layers", cfg.n_layers, true)?,
            final_layer: FinalLayer::new(cfg, vb.pp(format!("all_final_layer.{key}")))?,
            rope: Rope::new(cfg.rope_theta, &cfg.axes_dims, &cfg.axes_lens),
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `(C, h, w)` -> `(Ht*Wt, p*p*C)`, tokens row-major, patch vector ordered (ph, pw, c).
    fn patchify(&self, latent: &Tensor) -> Result<(Tensor, usize, usize)> {
        let (c, h, w) = latent.dims3()?;
        let p = self.cfg.patch();
        if c != self.cfg.in_channels || h % p != 0 || w % p != 0 {
            return Err(PipelineError::InvalidInput(format!(
                "latent of shape ({c}, {h}, {w}) does not fit {} channels and patch {p}",
                self.cfg.in_channels
            )));
        }
        let (ht, wt) = (h / p, w / p);
        let x = latent
            .reshape((c, ht, p, wt, p))?
            .permute((1, 3, 2, 4, 0))?
            .reshape((ht * wt, p * p * c))?;
        Ok((x, ht, wt))
    }

    /// `(Ht*Wt, p*p*C)` -> `(C, h, w)`.
    fn unpatchify(&self, x: &Tensor, ht: usize, wt: usize) -> Result<Tensor> {
        let p = self.cfg.patch();
        let c = self.cfg.in_channels;
        Ok(x.reshape((ht, wt, p, p, c))?
            .permute((4, 0, 2, 1, 3))?
            .reshape((c, ht * p, wt * p))?)
    }

    /// Pad per-item `(len_i, dim)` sequences to the longest, with their RoPE tables and lengths.
    fn stack(&self, items: Vec<Tensor>, positions: Vec<Vec<[usize; 3]>>) -> Result<Stream> {
        let lens: Vec<usize> = items
            .iter()
            .map(|t| t.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut xs = Vec::with_capacity(items.len());
        let mut coss = Vec::with_capacity(items.len());
        let mut sins = Vec::with_capacity(items.len());
        for (x, mut pos) in items.into_iter().zip(positions) {
            let len = x.dim(0)?;
            let x = if len < max {
                let pad = Tensor::zeros((max - len, self.cfg.dim), x.dtype(), &self.device)?;
                Tensor::cat(&[&x, &pad], 0)?
            } else {
                x
            };
            pos.resize(max, [0, 0, 0]);
            let (c, s) = self.rope.tables(&pos, &self.device)?;
            xs.push(x);
            coss.push(c);
            sins.push(s);
        }
        Ok(Stream {
            x: Tensor::stack(&xs, 0)?,
            ctx: StreamCtx {
                cos: Tensor::stack(&coss, 0)?,
                sin: Tensor::stack(&sins, 0)?,
                lens,
            },
        })
    }

    /// Replace rows `valid..padded` of an embedded sequence with a pad token.
    fn pad_with(x: &Tensor, padded: usize, token: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        if n == padded {
            return Ok(x.clone());
        }
        let pad = token.broadcast_as((padded - n, token.dim(1)?))?;
        Ok(Tensor::cat(&[x, &pad.contiguous()?], 0)?)
    }

    /// The caption stream of one prompt: embed its features `(L, cap_dim)`, pad to a multiple
    /// of 32 with the learned pad token, run the context refiner. It depends on nothing but the
    /// prompt (the refiner has no timestep modulation), so it is computed once per prompt and
    /// reused at every step. Returns `(P, dim)`.
    pub fn refine_caption(&self, caption: &Tensor) -> Result<Tensor> {
        let cap = caption.to_dtype(self.dtype)?;
        let (l, width) = cap.dims2()?;
        if width != self.cfg.cap_feat_dim {
            return Err(PipelineError::InvalidInput(format!(
                "caption features have width {width}, the transformer expects {}",
                self.cfg.cap_feat_dim
            )));
        }
        let p_len = pad_len(l);
        let emb = self.cap_linear.forward(&self.cap_norm.forward(&cap)?)?;
        let padded = Self::pad_with(&emb, p_len, &self.cap_pad_token)?;
        let mut stream = self.stack(vec![padded], vec![caption_positions(p_len)])?;
        for block in &self.context_refiner {
            stream.x = block.forward(&stream.x, &stream.ctx, None)?;
        }
        Ok(stream.x.squeeze(0)?)
    }

    /// Run the model on a batch. Returns one raw output `(C, h, w)` (f32) per item.
    pub fn forward(&self, items: &[ItemInput]) -> Result<Vec<Tensor>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let t: Vec<f32> = items.iter().map(|i| i.t).collect();
        let adaln =
            self.t_embedder
                .forward(&t, self.cfg.t_scale as f32, self.dtype, &self.device)?;

        let mut img_tokens = Vec::with_capacity(items.len());
        let mut cap_tokens = Vec::with_capacity(items.len());
        let mut img_pos = Vec::with_capacity(items.len());
        let mut cap_pos = Vec::with_capacity(items.len());
        let mut grids = Vec::with_capacity(items.len());
        for item in items {
            let (patches, ht, wt) = self.patchify(&item.latent.to_dtype(self.dtype)?)?;
            let n_img = ht * wt;
            let x_len = pad_len(n_img);
            let emb = self.x_embedder.forward(&patches)?;
            img_tokens.push(Self::pad_with(&emb, x_len, &self.x_pad_token)?);

            let p_len = item.caption.dim(0)?;
            if p_len % SEQ_MULTIPLE != 0 || item.caption.dim(1)? != self.cfg.dim {
                return Err(PipelineError::InvalidInput(
                    "caption is not a refined caption of this transformer".into(),
                ));
            }
            cap_tokens.push(item.caption.clone());
            img_pos.push(image_positions(ht, wt, x_len, p_len));
            cap_pos.push(caption_positions(p_len));
            grids.push((ht, wt, x_len, p_len));
        }

        let mut img = self.stack(img_tokens, img_pos.clone())?;
        for block in &self.noise_refiner {
            img.x = block.forward(&img.x, &img.ctx, Some(&adaln))?;
        }
        let mut unified = Vec::with_capacity(items.len());
        let mut uni_pos = Vec::with_capacity(items.len());
        for (i, &(_, _, x_len, p_len)) in grids.iter().enumerate() {
            let xi = img.x.get(i)?.narrow(0, 0, x_len)?;
            let ci = cap_tokens[i].narrow(0, 0, p_len)?;
            unified.push(Tensor::cat(&[&xi, &ci], 0)?);
            let mut pos = img_pos[i].clone();
            pos.extend_from_slice(&cap_pos[i]);
            uni_pos.push(pos);
        }
        let mut uni = self.stack(unified, uni_pos)?;
        for block in &self.layers {
            uni.x = block.forward(&uni.x, &uni.ctx, Some(&adaln))?;
        }
        let out = self.final_layer.forward(&uni.x, &adaln)?;

        grids
            .iter()
            .enumerate()
            .map(|(i, &(ht, wt, _, _))| {
                let rows = out.get(i)?.narrow(0, 0, ht * wt)?;
                self.unpatchify(&rows.to_dtype(DType::F32)?, ht, wt)
            })
            .collect()
    }
}

/// Check that a loaded transformer and text encoder agree on the caption width.
pub fn check_caption_width(transformer: &TransformerConfig, text_hidden: usize) -> Result<()> {
    if transformer.cap_feat_dim != text_hidden {
        return Err(load_err(format!(
            "transformer cap_feat_dim {} differs from the text encoder's hidden_size {text_hidden}",
            transformer.cap_feat_dim
        )));
    }
    Ok(())
}
