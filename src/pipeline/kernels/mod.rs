//! Fast CPU f32 kernels for the VAE decoder, as candle custom ops.
//!
//! candle's CPU `conv2d` is a direct convolution without blocking and its `GroupNorm` makes
//! many passes over memory; together they made the VAE decode ~10x slower than PyTorch. This
//! module provides drop-in layers that take a faster path for CPU f32 tensors on x86-64 CPUs
//! with AVX2 + FMA and fall back to candle's own ops everywhere else (GPU, other dtypes, other
//! CPUs):
//!
//! - [`Conv2d`]: 3x3 (padding 1) by Winograd F(2x2, 3x3), 1x1 as a packed GEMM. Weights are
//!   transformed and packed once, in [`Conv2d::new`]. [`Conv2d::forward_fused`] also takes the
//!   GroupNorm(+SiLU) before the convolution, a nearest 2x upsample of its input and a residual
//!   added to its output, so none of those makes a tensor of its own.
//! - [`GroupNorm`]: statistics in two vectorized passes with f64 partial sums, then one pass for
//!   `x * scale + shift` (+ SiLU).
//!
//! Batch items are processed one after another with the same shapes and the same parallel split,
//! and every output value's accumulation order depends only on its own inputs, so an image is
//! bit-identical whether it is decoded alone or in a batch.
//!
//! There is no `unsafe` here: SIMD goes through `pulp`'s safe wrappers (see `simd::run`).

#[cfg(target_arch = "x86_64")]
mod attention;
#[cfg(target_arch = "x86_64")]
mod dense;
#[cfg(target_arch = "x86_64")]
mod group_norm;
#[cfg(target_arch = "x86_64")]
mod ops;
#[cfg(target_arch = "x86_64")]
mod pointwise;
#[cfg(target_arch = "x86_64")]
mod rows;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod winograd;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A 2D convolution layer with a fast CPU path for 3x3/padding 1 and 1x1/padding 0 kernels.
#[derive(Debug)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    #[cfg(target_arch = "x86_64")]
    fast: Option<ops::FastConv>,
}

impl Conv2d {
    /// Wrap a candle convolution; prepares the fast path when its weights are CPU f32.
    pub fn new(inner: candle_nn::Conv2d) -> Result<Self> {
        Ok(Self {
            #[cfg(target_arch = "x86_64")]
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
        #[cfg(target_arch = "x86_64")]
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
}

/// The fast form of a convolution's optional pre-norm: `Some(None)` without one, `None` when the
/// norm has no fast path (the convolution then takes candle's ops too).
#[cfg(target_arch = "x86_64")]
fn fast_pre(pre: Option<&GroupNorm>) -> Option<Option<&ops::FastNorm>> {
    match pre {
        Some(n) => n.fast.as_ref().map(Some),
        None => Some(None),
    }
}

impl Conv2d {
    /// `residual + conv(pre(x))` like [`Conv2d::forward_fused`], computed in `residual`'s own
    /// storage when the fast path runs: the caller gives the residual up (it, and any clone of
    /// it, then holds the result), and the output needs no allocation of its own.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        pre: Option<&GroupNorm>,
        residual: Tensor,
    ) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
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

/// GroupNorm over `(B, C, ...)` tensors, optionally followed by SiLU, with a fast CPU f32 path.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    silu: bool,
    #[cfg(target_arch = "x86_64")]
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
            #[cfg(target_arch = "x86_64")]
            fast: ops::FastNorm::prepare(&weight, &bias, groups, eps, silu)?,
            inner: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
            silu,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(target_arch = "x86_64")]
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

/// A dense layer's weight prepared for the CPU GEMM (AVX-512, weights packed once): `x W (+ b)`,
/// or for the FFN `silu(x W1) * (x W3)` in one pass.
#[derive(Debug)]
pub struct PackedDense {
    #[cfg(target_arch = "x86_64")]
    fast: ops::FastDense,
}

impl PackedDense {
    /// `Some` when the `(in, out)` weight is CPU f32 and the CPU has AVX-512.
    pub fn prepare(w_t: &Tensor, bias: Option<&Tensor>) -> Result<Option<Self>> {
        #[cfg(target_arch = "x86_64")]
        return Ok(ops::FastDense::prepare(w_t, bias)?.map(|fast| Self { fast }));
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (w_t, bias);
            Ok(None)
        }
    }

    /// `Some` when the `(in, hidden)` gate and up weights are CPU f32 and the CPU has AVX-512.
    pub fn prepare_swiglu(w1_t: &Tensor, w3_t: &Tensor) -> Result<Option<Self>> {
        #[cfg(target_arch = "x86_64")]
        return Ok(ops::FastDense::prepare_swiglu(w1_t, w3_t)?.map(|fast| Self { fast }));
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (w1_t, w3_t);
            Ok(None)
        }
    }

    /// Output columns.
    pub fn out_dim(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        return self.fast.out_dim();
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("never constructed off x86-64")
    }

    /// The layer on `x (rows, in)`, `None` when `x` cannot take this path (not CPU f32).
    pub fn try_forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(target_arch = "x86_64")]
        return self.fast.try_forward(x);
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = x;
            Ok(None)
        }
    }
}

/// An RMSNorm (candle's `RmsNorm`) with fused CPU f32 passes for the transformer block: the
/// norm with its adaLN scale, and the norm of a branch with its gate added to the residual.
#[derive(Debug, Clone)]
pub struct RowNorm {
    inner: candle_nn::RmsNorm,
    /// The weight on the host, when it is CPU f32 and the CPU has AVX2 + FMA.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    host: Option<Vec<f32>>,
    eps: f32,
}

impl RowNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::rms_norm(dim, eps, vb)?;
        let w = inner.weight();
        #[cfg(target_arch = "x86_64")]
        let host = if w.device().is_cpu() && w.dtype() == candle_core::DType::F32 {
            simd::simd().map(|_| w.to_vec1::<f32>()).transpose()?
        } else {
            None
        };
        #[cfg(not(target_arch = "x86_64"))]
        let host = {
            let _ = w;
            None
        };
        Ok(Self {
            inner,
            host,
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
        #[cfg(target_arch = "x86_64")]
        if let (Some(w), true) = (&self.host, self.fused_for(x)) {
            let op = ops::NormScaleOp {
                w,
                scale,
                eps: self.eps,
            };
            return Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?));
        }
        let _ = (x, scale);
        Ok(None)
    }

    /// `x + gate[item] * RMSNorm(h)` for `x, h (B, S, dim)`; `None` when they do not take the
    /// fused pass.
    pub fn try_residual(
        &self,
        x: &Tensor,
        h: &Tensor,
        gate: Option<&[f32]>,
    ) -> Result<Option<Tensor>> {
        #[cfg(target_arch = "x86_64")]
        if let (Some(w), true) = (&self.host, self.fused_for(x) && self.fused_for(h)) {
            let op = ops::ResidualOp {
                w,
                gate,
                eps: self.eps,
            };
            return Ok(Some(
                x.contiguous()?.apply_op2_no_bwd(&h.contiguous()?, &op)?,
            ));
        }
        let _ = (x, h, gate);
        Ok(None)
    }
}

/// From a fused q/k/v projection `(B, S, (H + 2 Hkv) D)`: `q (B, H, S, D)` and
/// `k (B, Hkv, S, D)` RMS-normed (`norm_q`, `norm_k`) and rotated (`cos`/`sin` `(B, S, D/2)`),
/// and `v (B, Hkv, S, D)`, all contiguous, in one pass; `None` off the CPU f32 path.
pub fn qkv_norm_rope(
    qkv: &Tensor,
    norm_q: &RowNorm,
    norm_k: &RowNorm,
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads, head_dim): (usize, usize, usize),
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    #[cfg(target_arch = "x86_64")]
    if let (Some(wq), Some(wk), true) = (&norm_q.host, &norm_k.host, norm_q.fused_for(qkv)) {
        let (b, s, _) = qkv.dims3()?;
        let op = ops::QkvPrepOp {
            wq,
            wk,
            heads,
            kv_heads,
            eps: norm_q.eps,
        };
        let flat =
            qkv.contiguous()?
                .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?;
        let (nq, nkv) = (b * heads * s * head_dim, b * kv_heads * s * head_dim);
        let q = flat.narrow(0, 0, nq)?.reshape((b, heads, s, head_dim))?;
        let k = flat
            .narrow(0, nq, nkv)?
            .reshape((b, kv_heads, s, head_dim))?;
        let v = flat
            .narrow(0, nq + nkv, nkv)?
            .reshape((b, kv_heads, s, head_dim))?;
        return Ok(Some((q, k, v)));
    }
    let _ = (qkv, norm_q, norm_k, cos, sin, heads, kv_heads, head_dim);
    Ok(None)
}

/// CPU f32 attention with the AVX-512 kernels: `q (B, H, S, D)`, `k`/`v (B, Hkv, S, D)`
/// contiguous, item `i` over its first `lens[i]` rows; returns `(B, S, H*D)` values, zero past
/// each item's length. `None` on CPUs without AVX-512.
pub fn cpu_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, h, hkv, s, d): (usize, usize, usize, usize, usize),
    lens: &[usize],
    scale: f32,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    if let Some(s4) = dense::simd512() {
        let dims = attention::Dims { b, h, hkv, s, d };
        return Some(attention::attention(s4, q, k, v, dims, lens, scale));
    }
    let _ = (q, k, v, b, h, hkv, s, d, lens, scale);
    None
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{Conv2dConfig, VarMap};

    fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d / scale
    }

    fn conv(cin: usize, cout: usize, k: usize, vb: VarBuilder) -> candle_nn::Conv2d {
        let cfg = Conv2dConfig {
            padding: k / 2,
            ..Default::default()
        };
        candle_nn::conv2d(cin, cout, k, cfg, vb).unwrap()
    }

    /// The fast layers against candle's conv2d / GroupNorm / silu / upsample on random data:
    /// odd sizes, channel counts that are not multiples of 8, two batch items.
    #[test]
    fn fast_layers_match_candle() {
        if simd::simd().is_none() {
            return;
        }
        let dev = Device::Cpu;
        for &(b, cin, cout, h, w, groups) in &[
            (2, 6, 10, 9, 13, 3),
            (1, 32, 32, 16, 16, 32),
            (2, 12, 7, 7, 22, 4),
            (1, 64, 3, 11, 5, 32),
        ] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let c3 = conv(cin, cout, 3, vb.pp("c3"));
            let c1 = conv(cin, cout, 1, vb.pp("c1"));
            // Create the norm's variables, give them non-trivial values, then load them.
            GroupNorm::new(groups, cin, 1e-6, true, vb.pp("norm")).unwrap();
            for (name, v) in map.data().lock().unwrap().iter() {
                if name.starts_with("norm") {
                    v.set(&Tensor::randn(0.5f32, 0.5, cin, &dev).unwrap())
                        .unwrap();
                }
            }
            let norm = GroupNorm::new(groups, cin, 1e-6, true, vb.pp("norm")).unwrap();
            let fast3 = Conv2d::new(c3.clone()).unwrap();
            let fast1 = Conv2d::new(c1.clone()).unwrap();
            assert!(fast3.fast.is_some() && fast1.fast.is_some() && norm.fast.is_some());
            let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev).unwrap();

            // Plain 3x3 and 1x1.
            let e = max_rel_err(&fast3.forward(&x).unwrap(), &c3.forward(&x).unwrap());
            assert!(e <= 1e-5, "3x3 {b}x{cin}x{h}x{w}->{cout}: {e}");
            let e = max_rel_err(&fast1.forward(&x).unwrap(), &c1.forward(&x).unwrap());
            assert!(e <= 1e-5, "1x1 {b}x{cin}x{h}x{w}->{cout}: {e}");

            // GroupNorm + SiLU alone.
            let want_n = candle_nn::ops::silu(&norm.inner.forward(&x).unwrap()).unwrap();
            let e = max_rel_err(&norm.forward(&x).unwrap(), &want_n);
            assert!(e <= 1e-5, "group norm: {e}");

            // Norm + SiLU + conv + residual, and upsample + conv.
            let res = Tensor::randn(0f32, 1.0, (b, cout, h, w), &dev).unwrap();
            let got = fast3
                .forward_fused(&x, Some(&norm), false, Some(&res))
                .unwrap();
            let want = (&res + c3.forward(&want_n).unwrap()).unwrap();
            let e = max_rel_err(&got, &want);
            assert!(e <= 1e-5, "fused norm conv residual: {e}");
            // The same in the residual's storage.
            let acc = res.copy().unwrap();
            let got = fast3.forward_residual(&x, Some(&norm), acc).unwrap();
            let e = max_rel_err(&got, &want);
            assert!(e <= 1e-5, "fused norm conv residual in place: {e}");
            let got = fast3.forward_fused(&x, None, true, None).unwrap();
            let want = c3
                .forward(&x.upsample_nearest2d(2 * h, 2 * w).unwrap())
                .unwrap();
            let e = max_rel_err(&got, &want);
            assert!(e <= 1e-5, "upsample conv: {e}");
        }
    }

    /// Each item's result must not depend on the batch it is in.
    #[test]
    fn batch_items_are_independent() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let c3 = Conv2d::new(conv(8, 8, 3, vb.pp("c3"))).unwrap();
        let norm = GroupNorm::new(4, 8, 1e-6, true, vb.pp("norm")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 8, 10, 12), &dev).unwrap();
        let all = c3.forward_fused(&x, Some(&norm), true, None).unwrap();
        for i in 0..3 {
            let one = c3
                .forward_fused(&x.narrow(0, i, 1).unwrap(), Some(&norm), true, None)
                .unwrap();
            let d = (all.narrow(0, i, 1).unwrap() - one)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "item {i}");
        }
    }
}
