//! Fast CPU f32 kernels for the transformer and the VAE decoder, behind candle layers.
//!
//! candle's CPU `conv2d` is a direct convolution without blocking, its `GroupNorm` makes many
//! passes over memory and its matmul repacks the weight on every call; together they made the
//! pipeline several times slower than PyTorch. The code here comes in three tiers:
//!
//! 1. **Layers** (this file, public): [`Conv2d`], [`GroupNorm`], [`RowNorm`] (+ the fused
//!    [`qkv_norm_rope`]) and [`PackedDense`], used by the models like candle's own layers. Each
//!    prepares its fast form once, at load, and falls back to candle's ops whenever the fast
//!    form does not apply (GPU, other dtypes, other CPUs, `DIFFUSIOND_DISABLE_SIMD`).
//! 2. **Candle ops** (`ops.rs` on x86-64; `portable.rs` elsewhere, where none exists): weight
//!    preparation and the `CustomOp`s that hand CPU f32 storage to the slice kernels.
//! 3. **Slice kernels**, one module per instruction set, on plain `&[f32]`:
//!    - `avx2` (AVX2 + FMA): the 3x3 convolution by Winograd F(2x2, 3x3) with the GroupNorm(+SiLU)
//!      before it, a nearest 2x upsample of its input and a residual fused in; the 1x1
//!      convolution as a packed GEMM; GroupNorm statistics in two vectorized passes with f64
//!      partial sums; the transformer's fused RMSNorm / gate / residual / RoPE row passes;
//!    - `avx512` (AVX-512): the dense-layer GEMM on weights packed once (and its micro-kernel,
//!      which the CPU attention kernel in `pipeline::attention` reuses).
//!
//! Which instruction sets run is decided at run time ([`detect`]).
//!
//! Batch items are processed one after another with the same shapes and the same parallel split,
//! and every output value's accumulation order depends only on its own inputs, so an image is
//! bit-identical whether it is made alone or in a batch.
//!
//! There is no `unsafe` here: SIMD goes through `pulp`'s safe wrappers (see `avx2::run`).

pub mod detect;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
mod ops;

#[cfg(any(test, not(target_arch = "x86_64")))]
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
mod portable;
#[cfg(not(target_arch = "x86_64"))]
use portable as ops;

#[cfg(test)]
mod tests;

pub use ops::PackedDense;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A 2D convolution layer with a fast CPU path for 3x3/padding 1 and 1x1/padding 0 kernels.
#[derive(Debug)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    fast: Option<ops::FastConv>,
}

impl Conv2d {
    /// Wrap a candle convolution; prepares the fast path when its weights are CPU f32.
    pub fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        Ok(Self {
            fast: ops::FastConv::prepare(&inner)?,
            inner,
        })
    }

    /// The plain convolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, false, None)
    }

    /// `residual + conv(upsample2x?(pre(x)))`, where `pre` is a GroupNorm (with its SiLU if it
    /// has one) and the upsample is nearest-neighbour.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        pre: Option<&GroupNorm>,
        upsample: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(conv) = &self.fast {
            if let Some(pre_fast) = fast_pre(pre) {
                if let Some(y) = conv.try_forward(x, pre_fast, upsample, residual)? {
                    return Ok(y);
                }
            }
        }
        let mut h = match pre {
            Some(n) => n.forward(x)?,
            None => x.clone(),
        };
        if upsample {
            let (_, _, hh, ww) = h.dims4()?;
            h = h.upsample_nearest2d(2 * hh, 2 * ww)?;
        }
        let h = self.inner.forward(&h)?;
        match residual {
            Some(r) => r + h,
            None => Ok(h),
        }
    }

    /// `residual + conv(pre(x))` like [`Conv2d::forward_fused`], computed in `residual`'s own
    /// storage when the fast path runs: the caller gives the residual up (it, and any clone of
    /// it, then holds the result), and the output needs no allocation of its own.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        pre: Option<&GroupNorm>,
        residual: Tensor,
    ) -> Result<Tensor> {
        if let Some(conv) = &self.fast {
            if let Some(pre_fast) = fast_pre(pre) {
                if conv.try_forward_into(x, pre_fast, &residual)? {
                    return Ok(residual);
                }
            }
        }
        self.forward_fused(x, pre, false, Some(&residual))
    }
}

/// The fast form of a convolution's optional pre-norm: `Some(None)` without one, `None` when the
/// norm has no fast path (the convolution then takes candle's ops too).
fn fast_pre(pre: Option<&GroupNorm>) -> Option<Option<&ops::FastNorm>> {
    match pre {
        Some(n) => n.fast.as_ref().map(Some),
        None => Some(None),
    }
}

/// GroupNorm over `(B, C, ...)` tensors, optionally followed by SiLU, with a fast CPU f32 path.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    silu: bool,
    fast: Option<ops::FastNorm>,
}

impl GroupNorm {
    /// Load `weight` and `bias` (`channels` each) from `vb`, like `candle_nn::group_norm`.
    pub fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        silu: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        let bias = vb.get(channels, "bias")?;
        Ok(Self {
            fast: ops::FastNorm::prepare(&weight, &bias, groups, eps, silu)?,
            inner: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
            silu,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(n) = &self.fast {
            if let Some(y) = n.try_forward(x)? {
                return Ok(y);
            }
        }
        let y = self.inner.forward(x)?;
        if self.silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

/// An RMSNorm (candle's `RmsNorm`) with fused CPU f32 passes for the transformer block: the
/// norm with its adaLN scale, and the norm of a branch with its gate added to the residual.
#[derive(Debug, Clone)]
pub struct RowNorm {
    inner: candle_nn::RmsNorm,
    /// The weight on the host, when it is CPU f32 and the CPU has AVX2 + FMA.
    host: Option<ops::HostWeight>,
    eps: f32,
}

impl RowNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::rms_norm(dim, eps, vb)?;
        Ok(Self {
            host: ops::HostWeight::prepare(inner.weight())?,
            inner,
            eps: eps as f32,
        })
    }

    /// The plain norm (candle's op).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }

    /// Whether `x` takes the fused passes.
    pub fn fused_for(&self, x: &Tensor) -> bool {
        self.host.is_some() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32
    }

    /// `RMSNorm(x) * scale[item]` for `x (B, S, dim)`, `scale` `B * dim` values (`None`: the
    /// plain norm); `None` when `x` does not take the fused pass.
    pub fn try_norm_scale(&self, x: &Tensor, scale: Option<&[f32]>) -> Result<Option<Tensor>> {
        match &self.host {
            Some(w) if self.fused_for(x) => w.norm_scale(x, scale, self.eps).map(Some),
            _ => Ok(None),
        }
    }

    /// `x + gate[item] * RMSNorm(h)` for `x, h (B, S, dim)`; `None` when they do not take the
    /// fused pass.
    pub fn try_residual(
        &self,
        x: &Tensor,
        h: &Tensor,
        gate: Option<&[f32]>,
    ) -> Result<Option<Tensor>> {
        match &self.host {
            Some(w) if self.fused_for(x) && self.fused_for(h) => {
                w.residual(x, h, gate, self.eps).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// From a fused q/k/v projection `(B, S, (H + 2 Hkv) D)`: `q (B, H, S, D)` and
/// `k (B, Hkv, S, D)` RMS-normed (`norm_q`, `norm_k`) and rotated (`cos`/`sin` `(B, S, D/2)`),
/// and `v (B, Hkv, S, D)`, all contiguous, in one pass; `None` off the CPU f32 path.
pub fn qkv_norm_rope(
    qkv: &Tensor,
    norm_q: &RowNorm,
    norm_k: &RowNorm,
    rope: (&Tensor, &Tensor),
    dims: (usize, usize, usize),
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    match (&norm_q.host, &norm_k.host) {
        (Some(wq), Some(wk)) if norm_q.fused_for(qkv) => {
            ops::qkv_norm_rope(qkv, (wq, wk), rope, dims, norm_q.eps).map(Some)
        }
        _ => Ok(None),
    }
}
