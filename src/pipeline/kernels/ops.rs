//! The candle-op tier on x86-64: weight preparation and the custom ops that run the slice kernels
//! (`avx2`, `avx512`) on CPU f32 storage. Every entry point answers `None` when its inputs (or
//! the CPU) cannot take the fast path, and the layer then uses candle's own ops. `portable.rs`
//! has the same items for other targets, none of which can be constructed.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Result, Shape,
    Tensor,
};

use super::avx2::group_norm::{self, GroupNormParams};
use super::avx2::pointwise::Pointwise;
use super::avx2::rows;
use super::avx2::run;
use super::avx2::winograd::{Residual, Winograd3x3};
use super::avx512::dense::Panels;
use super::{avx2, avx512};
use rayon::prelude::*;

fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else {
        bail!("fast kernels: expected f32 storage")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("fast kernels: expected a contiguous tensor")
    };
    Ok(&v[start..end])
}

/// A convolution's weights, transformed and packed for the CPU kernels.
#[derive(Debug)]
pub(super) enum FastConv {
    Winograd(Winograd3x3),
    Pointwise(Pointwise),
}

impl FastConv {
    /// `Some` for CPU f32 3x3/padding 1 and 1x1/padding 0 convolutions (stride 1, no dilation or
    /// groups) on a CPU with AVX2 + FMA.
    pub fn prepare(conv: &candle_nn::Conv2d) -> Result<Option<Self>> {
        let (cfg, w) = (conv.config(), conv.weight());
        let plain = cfg.stride == 1 && cfg.dilation == 1 && cfg.groups == 1;
        let bias_ok = conv.bias().is_none_or(cpu_f32);
        if !plain || !bias_ok || !cpu_f32(w) || avx2::token().is_none() {
            return Ok(None);
        }
        let (cout, cin, k, k2) = w.dims4()?;
        if k != k2 || !matches!((k, cfg.padding), (3, 1) | (1, 0)) {
            return Ok(None);
        }
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let bias = conv.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Some(if k == 3 {
            Self::Winograd(Winograd3x3::new(&wv, bias.as_deref(), cout, cin))
        } else {
            Self::Pointwise(Pointwise::new(&wv, bias.as_deref(), cout, cin))
        }))
    }

    /// `residual + conv(upsample2x?(pre(x)))` if the inputs fit the fast path.
    pub fn try_forward(
        &self,
        x: &Tensor,
        pre: Option<&FastNorm>,
        upsample: bool,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let fits = match self {
            Self::Winograd(_) => true,
            Self::Pointwise(_) => pre.is_none() && !upsample && residual.is_none(),
        };
        if !fits || !cpu_f32(x) || !residual.is_none_or(cpu_f32) || x.rank() != 4 {
            return Ok(None);
        }
        let op = FusedConv {
            conv: self,
            pre: pre.map(|n| &n.params),
            upsample,
        };
        let x = x.contiguous()?;
        Ok(Some(match residual {
            Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op)?,
            None => x.apply_op1_no_bwd(&op)?,
        }))
    }

    /// `residual += conv(pre(x))` in `residual`'s own storage, if the inputs fit the fast path
    /// (3x3 kernel, CPU f32, contiguous residual of the output's shape). Returns whether it ran.
    pub fn try_forward_into(
        &self,
        x: &Tensor,
        pre: Option<&FastNorm>,
        residual: &Tensor,
    ) -> Result<bool> {
        let Self::Winograd(k) = self else {
            return Ok(false);
        };
        let fits = cpu_f32(x) && cpu_f32(residual) && residual.is_contiguous() && x.rank() == 4;
        if !fits || residual.dims() != [x.dim(0)?, k.cout, x.dim(2)?, x.dim(3)?] {
            return Ok(false);
        }
        let op = FusedConv {
            conv: self,
            pre: pre.map(|n| &n.params),
            upsample: false,
        };
        residual.inplace_op2(&x.contiguous()?, &op)?;
        Ok(true)
    }

    fn channels(&self) -> (usize, usize) {
        match self {
            Self::Winograd(k) => (k.cin, k.cout),
            Self::Pointwise(k) => (k.cin, k.cout),
        }
    }
}

struct FusedConv<'a> {
    conv: &'a FastConv,
    pre: Option<&'a GroupNormParams>,
    upsample: bool,
}

impl FusedConv<'_> {
    /// Output shape for input `x`, after checking the channels.
    fn out_shape(&self, x: &Layout) -> Result<Shape> {
        let (b, c, h, w) = x.shape().dims4()?;
        let (cin, cout) = self.conv.channels();
        if c != cin
            || self
                .pre
                .is_some_and(|p| p.gamma.len() != cin || cin % p.groups != 0)
        {
            bail!("fused conv: input has {c} channels, the kernel expects {cin}")
        }
        let (ho, wo) = if self.upsample {
            (2 * h, 2 * w)
        } else {
            (h, w)
        };
        Ok(Shape::from((b, cout, ho, wo)))
    }

    /// Convolve every item of `x` into `out` (the output's shape), adding `res`.
    fn run(&self, x: (&CpuStorage, &Layout), out: &mut [f32], res: Residual<'_>) -> Result<()> {
        let Some(s) = avx2::token() else {
            bail!("fused conv: no AVX2/FMA")
        };
        let (b, cin, h, w) = x.1.shape().dims4()?;
        let xs = f32_slice(x.0, x.1)?;
        let (item_in, item_out) = (cin * h * w, out.len() / b.max(1));
        for (i, oi) in out.chunks_exact_mut(item_out.max(1)).enumerate().take(b) {
            let xi = &xs[i * item_in..(i + 1) * item_in];
            let ri = match res {
                Residual::Add(r) => Residual::Add(&r[i * item_out..(i + 1) * item_out]),
                other => other,
            };
            match self.conv {
                FastConv::Winograd(k) => {
                    let pre = self.pre.map(|p| group_norm::channel_affine(s, xi, cin, p));
                    k.forward(s, xi, (h, w), self.upsample, pre.as_ref(), ri, oi);
                }
                FastConv::Pointwise(k) => k.forward(s, xi, h * w, oi),
            }
        }
        Ok(())
    }
}

impl CustomOp1 for FusedConv<'_> {
    fn name(&self) -> &'static str {
        "fused-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = self.out_shape(layout)?;
        let mut out = vec![0f32; shape.elem_count()];
        self.run((storage, layout), &mut out, Residual::None)?;
        Ok((CpuStorage::F32(out), shape))
    }
}

impl CustomOp2 for FusedConv<'_> {
    fn name(&self) -> &'static str {
        "fused-conv2d-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = self.out_shape(l1)?;
        if l2.shape() != &shape {
            bail!("fused conv: residual {:?} != output {shape:?}", l2.shape())
        }
        let mut out = vec![0f32; shape.elem_count()];
        self.run((s1, l1), &mut out, Residual::Add(f32_slice(s2, l2)?))?;
        Ok((CpuStorage::F32(out), shape))
    }
}

/// `dst += conv(pre(src))`: the residual add done in the residual's storage.
impl InplaceOp2 for FusedConv<'_> {
    fn name(&self) -> &'static str {
        "fused-conv2d-into-residual"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> Result<()> {
        let shape = self.out_shape(src_l)?;
        let (CpuStorage::F32(v), Some((start, end))) = (dst, dst_l.contiguous_offsets()) else {
            bail!("fused conv: the residual must be contiguous f32")
        };
        if dst_l.shape() != &shape {
            bail!(
                "fused conv: residual {:?} != output {shape:?}",
                dst_l.shape()
            )
        }
        self.run((src, src_l), &mut v[start..end], Residual::InPlace)
    }
}

/// GroupNorm parameters for the CPU kernels.
#[derive(Debug, Clone)]
pub(super) struct FastNorm {
    params: GroupNormParams,
}

impl FastNorm {
    /// `Some` for CPU f32 parameters on a CPU with AVX2 + FMA.
    pub fn prepare(
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> Result<Option<Self>> {
        if !cpu_f32(weight) || !cpu_f32(bias) || avx2::token().is_none() || groups == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            params: GroupNormParams {
                groups,
                eps,
                gamma: weight.to_vec1()?,
                beta: bias.to_vec1()?,
                silu,
            },
        }))
    }

    /// The normalized (and SiLU'd) `x` if it fits the fast path.
    pub fn try_forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !cpu_f32(x) || x.rank() < 3 || x.dim(1)? != self.params.gamma.len() {
            return Ok(None);
        }
        Ok(Some(
            x.contiguous()?
                .apply_op1_no_bwd(&GroupNormOp(&self.params))?,
        ))
    }
}

struct GroupNormOp<'a>(&'a GroupNormParams);

impl CustomOp1 for GroupNormOp<'_> {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(s) = avx2::token() else {
            bail!("group norm: no AVX2/FMA")
        };
        let x = f32_slice(storage, layout)?;
        let dims = layout.shape().dims();
        let (b, c) = (dims[0], dims[1]);
        if c % self.0.groups != 0 {
            bail!(
                "group norm: {c} channels not divisible into {} groups",
                self.0.groups
            )
        }
        let hw: usize = dims[2..].iter().product();
        let item = c * hw;
        let mut out = vec![0f32; x.len()];
        for i in 0..b {
            let xi = &x[i * item..(i + 1) * item];
            let a = group_norm::channel_affine(s, xi, c, self.0);
            group_norm::apply(s, xi, &mut out[i * item..(i + 1) * item], hw, &a);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The candle op of a dense layer on CPUs with AVX-512: its weight in the GEMM's panel layout,
/// packed once at load: `x W (+ b)`, or for the FFN `silu(x W1) * (x W3)` in one pass.
#[derive(Debug)]
pub struct PackedDense {
    panels: Panels,
}

impl PackedDense {
    /// `Some` when the `(in, out)` weight is CPU f32 and the CPU has AVX-512.
    pub fn prepare(w_t: &Tensor, bias: Option<&Tensor>) -> Result<Option<Self>> {
        if !cpu_f32(w_t) || !bias.is_none_or(cpu_f32) || avx512::token().is_none() {
            return Ok(None);
        }
        let (k, n) = w_t.dims2()?;
        let w = w_t.flatten_all()?.to_vec1::<f32>()?;
        let b = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Some(Self {
            panels: Panels::new(&w, k, n, b.as_deref()),
        }))
    }

    /// `Some` when the `(in, hidden)` gate and up weights are CPU f32 and the CPU has AVX-512.
    pub fn prepare_swiglu(w1_t: &Tensor, w3_t: &Tensor) -> Result<Option<Self>> {
        if !cpu_f32(w1_t) || !cpu_f32(w3_t) || avx512::token().is_none() {
            return Ok(None);
        }
        let (k, h) = w1_t.dims2()?;
        if w3_t.dims2()? != (k, h) {
            bail!(
                "swiglu: gate {:?} and up {:?} differ",
                w1_t.dims(),
                w3_t.dims()
            )
        }
        let w1 = w1_t.flatten_all()?.to_vec1::<f32>()?;
        let w3 = w3_t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(Self {
            panels: Panels::new_swiglu(&w1, &w3, k, h),
        }))
    }

    /// Output columns.
    pub fn out_dim(&self) -> usize {
        self.panels.n()
    }

    /// The layer on `x (rows, in)`, `None` when `x` cannot take this path (not CPU f32).
    pub fn try_forward(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !cpu_f32(x) || x.rank() != 2 || x.dim(1)? != self.panels.k() {
            return Ok(None);
        }
        Ok(Some(x.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

impl CustomOp1 for PackedDense {
    fn name(&self) -> &'static str {
        "packed-dense"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(s) = avx512::token() else {
            bail!("dense: no AVX-512")
        };
        let x = f32_slice(storage, layout)?;
        let (m, _) = layout.shape().dims2()?;
        let n = self.panels.n();
        let mut y = vec![0f32; m * n];
        self.panels.matmul(s, x, m, &mut y);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// An RMSNorm weight on the host, for the fused row passes: CPU f32 on a CPU with AVX2 + FMA.
#[derive(Debug, Clone)]
pub(super) struct HostWeight(Vec<f32>);

impl HostWeight {
    /// `Some` when the weight is CPU f32 and the CPU has AVX2 + FMA.
    pub fn prepare(w: &Tensor) -> Result<Option<Self>> {
        if !cpu_f32(w) || avx2::token().is_none() {
            return Ok(None);
        }
        Ok(Some(Self(w.to_vec1::<f32>()?)))
    }

    /// `RMSNorm(x) * w (* scale[item])` for a CPU f32 `x (B, S, dim)`.
    pub fn norm_scale(&self, x: &Tensor, scale: Option<&[f32]>, eps: f32) -> Result<Tensor> {
        let op = NormScaleOp {
            w: &self.0,
            scale,
            eps,
        };
        x.contiguous()?.apply_op1_no_bwd(&op)
    }

    /// `x + gate[item] * RMSNorm(h) * w` for CPU f32 `x, h (B, S, dim)`.
    pub fn residual(
        &self,
        x: &Tensor,
        h: &Tensor,
        gate: Option<&[f32]>,
        eps: f32,
    ) -> Result<Tensor> {
        let op = ResidualOp {
            w: &self.0,
            gate,
            eps,
        };
        x.contiguous()?.apply_op2_no_bwd(&h.contiguous()?, &op)
    }
}

/// [`QkvPrepOp`] on a CPU f32 `qkv (B, S, (H + 2 Hkv) D)`: `(q, k, v)` (see
/// `kernels::qkv_norm_rope`).
pub(super) fn qkv_norm_rope(
    qkv: &Tensor,
    (wq, wk): (&HostWeight, &HostWeight),
    (cos, sin): (&Tensor, &Tensor),
    (heads, kv_heads, head_dim): (usize, usize, usize),
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, s, _) = qkv.dims3()?;
    let op = QkvPrepOp {
        wq: &wq.0,
        wk: &wk.0,
        heads,
        kv_heads,
        eps,
    };
    let flat = qkv
        .contiguous()?
        .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?;
    let (nq, nkv) = (b * heads * s * head_dim, b * kv_heads * s * head_dim);
    let q = flat.narrow(0, 0, nq)?.reshape((b, heads, s, head_dim))?;
    let k = flat
        .narrow(0, nq, nkv)?
        .reshape((b, kv_heads, s, head_dim))?;
    let v = flat
        .narrow(0, nq + nkv, nkv)?
        .reshape((b, kv_heads, s, head_dim))?;
    Ok((q, k, v))
}

/// Rows per parallel task of the row-wise passes.
const ROW_TASK: usize = 32;

/// `RMSNorm(x) * w (* scale[item])` over `(B, S, dim)`; `scale` is `B * dim`.
struct NormScaleOp<'a> {
    w: &'a [f32],
    scale: Option<&'a [f32]>,
    eps: f32,
}

impl CustomOp1 for NormScaleOp<'_> {
    fn name(&self) -> &'static str {
        "rms-norm-scale"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(s) = avx2::token() else {
            bail!("rms norm: no AVX2/FMA")
        };
        let x = f32_slice(storage, layout)?;
        let (b, seq, d) = layout.shape().dims3()?;
        if self.w.len() != d || self.scale.is_some_and(|sc| sc.len() != b * d) {
            bail!("rms norm: weight or scale does not fit ({b}, {seq}, {d})")
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROW_TASK * d)
            .zip(x.par_chunks(ROW_TASK * d))
            .enumerate()
            .for_each(|(t, (o, xs))| {
                run(
                    s,
                    #[inline(always)]
                    || {
                        for (r, (orow, xrow)) in
                            o.chunks_exact_mut(d).zip(xs.chunks_exact(d)).enumerate()
                        {
                            let item = (t * ROW_TASK + r) / seq;
                            let sc = self.scale.map(|sc| &sc[item * d..(item + 1) * d]);
                            rows::norm_scale(s, xrow, self.w, sc, self.eps, orow);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `x + gate[item] * RMSNorm(h) * w` over `(B, S, dim)`; `gate` is `B * dim`.
struct ResidualOp<'a> {
    w: &'a [f32],
    gate: Option<&'a [f32]>,
    eps: f32,
}

impl CustomOp2 for ResidualOp<'_> {
    fn name(&self) -> &'static str {
        "rms-norm-gate-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(s) = avx2::token() else {
            bail!("residual: no AVX2/FMA")
        };
        let (x, h) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let (b, seq, d) = l1.shape().dims3()?;
        if l2.shape() != l1.shape()
            || self.w.len() != d
            || self.gate.is_some_and(|g| g.len() != b * d)
        {
            bail!("residual: shapes do not fit ({b}, {seq}, {d})")
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROW_TASK * d)
            .zip(x.par_chunks(ROW_TASK * d).zip(h.par_chunks(ROW_TASK * d)))
            .enumerate()
            .for_each(|(t, (o, (xs, hs)))| {
                run(
                    s,
                    #[inline(always)]
                    || {
                        let rows = o
                            .chunks_exact_mut(d)
                            .zip(xs.chunks_exact(d).zip(hs.chunks_exact(d)));
                        for (r, (orow, (xrow, hrow))) in rows.enumerate() {
                            let item = (t * ROW_TASK + r) / seq;
                            let g = self.gate.map(|g| &g[item * d..(item + 1) * d]);
                            rows::residual(s, xrow, hrow, self.w, g, self.eps, orow);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// From the fused q/k/v projection `(B, S, (H + 2 Hkv) D)` to one flat buffer holding
/// `q (B, H, S, D)`, `k (B, Hkv, S, D)`, `v (B, Hkv, S, D)` one after another, q and k
/// RMS-normed and rotated (cos/sin `(B, S, D/2)`): the split, both norms, both rotary passes and
/// the three head-major transposes in one pass.
struct QkvPrepOp<'a> {
    wq: &'a [f32],
    wk: &'a [f32],
    heads: usize,
    kv_heads: usize,
    eps: f32,
}

impl CustomOp3 for QkvPrepOp<'_> {
    fn name(&self) -> &'static str {
        "qkv-norm-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(s) = avx2::token() else {
            bail!("qkv prep: no AVX2/FMA")
        };
        let (qkv, cos, sin) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let (b, seq, width) = l1.shape().dims3()?;
        let (h, hkv) = (self.heads, self.kv_heads);
        let d = self.wq.len();
        let half = d / 2;
        if width != (h + 2 * hkv) * d
            || self.wk.len() != d
            || !d.is_multiple_of(2)
            || cos.len() != b * seq * half
            || sin.len() != b * seq * half
        {
            bail!("qkv prep: shapes do not fit ({b}, {seq}, {width})")
        }
        // The rotary tables spread over each position's d values, once for all heads.
        let (mut cos2, mut sin2) = (vec![0f32; b * seq * d], vec![0f32; b * seq * d]);
        for (t, (c2, s2)) in cos2
            .chunks_exact_mut(d)
            .zip(sin2.chunks_exact_mut(d))
            .enumerate()
        {
            let (c, sn) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            rows::expand_rope(c, sn, c2, s2);
        }
        let mut out = vec![0f32; qkv.len()];
        // Plane p (S x D, contiguous in `out`): q planes (item, head), then k, then v.
        out.par_chunks_mut(seq * d)
            .enumerate()
            .for_each(|(p, plane)| {
                let (col, norm, item) = if p < b * h {
                    (p % h * d, Some(self.wq), p / h)
                } else if p < b * (h + hkv) {
                    let p = p - b * h;
                    ((h + p % hkv) * d, Some(self.wk), p / hkv)
                } else {
                    let p = p - b * (h + hkv);
                    ((h + hkv + p % hkv) * d, None, p / hkv)
                };
                run(
                    s,
                    #[inline(always)]
                    || {
                        for (r, dst) in plane.chunks_exact_mut(d).enumerate() {
                            let row = (item * seq + r) * width + col;
                            let src = &qkv[row..row + d];
                            match norm {
                                Some(w) => {
                                    let t = (item * seq + r) * d;
                                    let (c, sn) = (&cos2[t..t + d], &sin2[t..t + d]);
                                    rows::qk_norm_rope(s, src, w, c, sn, self.eps, dst);
                                }
                                None => dst.copy_from_slice(src),
                            }
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), Shape::from(qkv.len())))
    }
}
