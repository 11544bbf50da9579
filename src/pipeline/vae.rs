//! The VAE decoder of `AutoencoderKL` (the Flux VAE, Z-Image) and `AutoencoderKLFlux2`
//! (FLUX.2): latents -> image in [-1, 1], NCHW. Shared by the families; each de-normalises its
//! latents in its own module (Z-Image: scaling and shift factors; FLUX.2: batch-norm statistics)
//! and hands the decoder the result, which goes through `post_quant_conv` when the checkpoint
//! has one.
//!
//! Convolutions and GroupNorms are the fast layers of [`crate::pipeline::kernels`] (candle's own
//! ops off CPU f32); each resnet's GroupNorm + SiLU runs inside the convolution that follows it,
//! the upsamplers' nearest 2x inside their convolution, and the residual add inside `conv2`.

pub mod tiling;

use candle_core::{DType, Module, Tensor};
use candle_nn::{conv2d, linear, Conv2dConfig, Linear, VarBuilder};
use serde::Deserialize;

use crate::pipeline::error::{load_err, Result};
use crate::pipeline::family::LoadOptions;
use crate::pipeline::kernels::{Conv2d, GroupNorm};
use crate::pipeline::load::ModelFiles;

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub out_channels: usize,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub use_post_quant_conv: Option<bool>,
    /// Z-Image's latent scale (absent in FLUX.2's VAE).
    #[serde(default)]
    pub scaling_factor: Option<f64>,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// FLUX.2's batch-norm epsilon of the latent statistics.
    #[serde(default)]
    pub batch_norm_eps: Option<f64>,
    #[serde(default)]
    pub act_fn: Option<String>,
}

fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// Pixels per latent cell: `2^(len(block_out_channels) - 1)`.
    pub fn spatial_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Conv2d::new(conv2d(cin, cout, 3, cfg, vb)?)?)
}

fn conv1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    Ok(Conv2d::new(conv2d(cin, cout, 1, Default::default(), vb)?)?)
}

/// GroupNorm with eps 1e-6, followed by SiLU when `silu`.
fn norm(groups: usize, ch: usize, silu: bool, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(GroupNorm::new(groups, ch, NORM_EPS, silu, vb)?)
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: norm(groups, cin, true, vb.pp("norm1"))?,
            conv1: conv3(cin, cout, vb.pp("conv1"))?,
            norm2: norm(groups, cout, true, vb.pp("norm2"))?,
            conv2: conv3(cout, cout, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(conv1(cin, cout, vb.pp("conv_shortcut"))?)
            } else {
                None
            },
        })
    }

    /// `skip(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`. The sum is formed in the skip
    /// tensor's storage, so `x` itself is overwritten when there is no shortcut conv: the
    /// callers below never use a block's input again.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .forward_fused(x, Some(&self.norm1), false, None)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok(self.conv2.forward_residual(&h, Some(&self.norm2), skip)?)
    }
}

/// Single-head self-attention over all pixels, with a residual connection.
struct AttnBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttnBlock {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: norm(groups, ch, false, vb.pp("group_norm"))?,
            to_q: linear(ch, ch, vb.pp("to_q"))?,
            to_k: linear(ch, ch, vb.pp("to_k"))?,
            to_v: linear(ch, ch, vb.pp("to_v"))?,
            to_out: linear(ch, ch, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&hs)?.unsqueeze(1)?;
        let k = self.to_k.forward(&hs)?.unsqueeze(1)?;
        let v = self.to_v.forward(&hs)?.unsqueeze(1)?;
        let out = crate::pipeline::attention::attention(&q, &k, &v, None)?; // (B, HW, C)
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        Ok((out + x)?)
    }
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnet_0: ResnetBlock,
    mid_attn: Option<AttnBlock>,
    mid_resnet_1: ResnetBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    cfg: VaeConfig,
    dtype: DType,
}

/// The dtype the VAE decoder runs in for a run in `dtype` on `device`: the run dtype, except
/// bf16 on the CPU, where candle's convolution has no bf16 matrix product: f32 there (the
/// decoder is ~50 M parameters, 0.2 GB in f32, and its output is 8-bit anyway).
fn decoder_dtype(device: &candle_core::Device, dtype: DType) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

const STEM: &str = "diffusion_pytorch_model";

/// The weights of a checkout's `vae` component as every family loads them: in the decoder's
/// dtype ([`decoder_dtype`]), shared with the device's other pipelines when `opts` says so.
pub fn load_weights(files: &ModelFiles, opts: &LoadOptions) -> Result<VarBuilder<'static>> {
    let dtype = decoder_dtype(&opts.device, opts.dtype);
    let share = opts.share_for("vae", &opts.device);
    files.dense_var_builder("vae", STEM, dtype, &opts.device, share)
}

/// Bytes the `vae` component takes on the device, loaded by [`load_weights`]. Asked after the
/// decoder is built: random weights (`bench --synthetic`) are counted as they are made.
pub fn weight_bytes(files: &ModelFiles, opts: &LoadOptions) -> Result<u64> {
    let dtype = decoder_dtype(&opts.device, opts.dtype);
    Ok(files.parameter_count("vae", STEM)? * dtype.size_in_bytes() as u64)
}

impl VaeDecoder {
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.block_out_channels.is_empty() {
            return Err(load_err("vae block_out_channels is empty"));
        }
        if let Some(act) = &cfg.act_fn {
            if act != "silu" {
                return Err(load_err(format!("vae act_fn '{act}' unsupported")));
            }
        }
        let post_quant_conv = if cfg.use_post_quant_conv == Some(true) {
            let c = cfg.latent_channels;
            Some(conv1(c, c, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let g = cfg.norm_num_groups;
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let mid = vb.pp("mid_block");
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut prev = top;
        for (i, &out) in rev.iter().enumerate() {
            let ub = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out };
                    ResnetBlock::new(cin, out, g, ub.pp(format!("resnets.{j}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(conv3(out, out, ub.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        Ok(Self {
            post_quant_conv,
            conv_in: conv3(cfg.latent_channels, top, vb.pp("conv_in"))?,
            mid_resnet_0: ResnetBlock::new(top, top, g, mid.pp("resnets.0"))?,
            mid_attn: if cfg.mid_block_add_attention {
                Some(AttnBlock::new(top, g, mid.pp("attentions.0"))?)
            } else {
                None
            },
            mid_resnet_1: ResnetBlock::new(top, top, g, mid.pp("resnets.1"))?,
            up_blocks,
            norm_out: norm(g, cfg.block_out_channels[0], true, vb.pp("conv_norm_out"))?,
            conv_out: conv3(
                cfg.block_out_channels[0],
                cfg.out_channels,
                vb.pp("conv_out"),
            )?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The decoder proper (after `post_quant_conv` when there is one) on de-normalised latents
    /// `(B, latent_channels, h, w)`, in any float dtype (cast to the decoder's): the argument of
    /// diffusers' `vae.decode`. Returns the image in [-1, 1] as f32 `(B, 3, H, W)`.
    ///
    /// On the CPU the batch is decoded one image at a time: the work per image is the same, and
    /// the activations of one image (tens of MB at 256x256) are reused by the allocator from
    /// layer to layer, where a batch's would be fresh pages faulted in for every layer (bench
    /// model, 4 images: 0.53 s instead of 0.82 s).
    pub fn decode_scaled(&self, z: &Tensor) -> Result<Tensor> {
        let z = &z.to_dtype(self.dtype)?;
        let b = z.dim(0)?;
        if b > 1 && z.device().is_cpu() {
            let outs = (0..b)
                .map(|i| self.decode_batch(&z.narrow(0, i, 1)?))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&outs, 0)?);
        }
        self.decode_batch(z)
    }

    /// The decoder on a whole batch at once.
    fn decode_batch(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = match &self.post_quant_conv {
            Some(c) => self.conv_in.forward(&c.forward(z)?)?,
            None => self.conv_in.forward(z)?,
        };
        x = self.mid_resnet_0.forward(&x)?;
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x)?;
        }
        x = self.mid_resnet_1.forward(&x)?;
        for ub in &self.up_blocks {
            for r in &ub.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &ub.upsample {
                x = conv.forward_fused(&x, None, true, None)?;
            }
        }
        let x = self
            .conv_out
            .forward_fused(&x, Some(&self.norm_out), false, None)?;
        Ok(x.to_dtype(DType::F32)?)
    }
}
