//! The double-stream and single-stream blocks of `Flux2Transformer2DModel`, and the row
//! operations they share. Shapes are `(B, L, D)` for a group of items of equal lengths; the
//! modulation vectors are `(B, 1, D)`. No masks: every row attends to the whole joint sequence.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::config::TransformerConfig;
use super::rope;
use crate::pipeline::attention::attention;
use crate::pipeline::error::Result;
use crate::pipeline::linear::{Dense, SwiGlu};
use crate::pipeline::quant::Weights;

/// Norm statistics are computed in f32, or f64 for an f64 run (checks).
fn stat_dtype(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// LayerNorm without affine over the last dimension; statistics in f32.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    // Contiguous first: candle's reductions sum a strided view in another order, and an item's
    // rows must reduce the same way alone and inside a batch.
    let xf = x.to_dtype(stat_dtype(dt))?.contiguous()?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.to_dtype(dt)?)
}

/// `LN(x) * (1 + scale) + shift`.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(layer_norm(x, eps)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)?)
}

/// `x + gate * y`.
fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok((x + y.broadcast_mul(gate)?)?)
}

/// `SiLU(z[..half]) * z[half..]`.
fn swiglu(z: &Tensor) -> Result<Tensor> {
    let half = z.dim(D::Minus1)? / 2;
    Ok((candle_nn::ops::silu(&z.narrow(D::Minus1, 0, half)?)?
        * z.narrow(D::Minus1, half, half)?)?)
}

/// Per-head RMSNorm over head_dim (statistics in f32): `x / sqrt(mean(x^2) + eps) * w`.
struct HeadNorm {
    weight: Tensor,
    eps: f64,
}

impl HeadNorm {
    fn new(head_dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(head_dim, "weight")?,
            eps,
        })
    }
    /// `(B, L, H*hd)` -> normed `(B, H, L, hd)`.
    fn heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let hd = self.weight.dim(0)?;
        let dt = x.dtype();
        let x = x.reshape((b, l, heads, hd))?.to_dtype(stat_dtype(dt))?;
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let y = x
            .broadcast_mul(&inv)?
            .to_dtype(dt)?
            .broadcast_mul(&self.weight)?;
        Ok(y.transpose(1, 2)?.contiguous()?)
    }
}

/// `(B, L, H*hd)` -> `(B, H, L, hd)`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    Ok(x.reshape((b, l, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// The RoPE tables of a joint sequence (per-pair `cos`, `sin`, `(L, hd/2)`, f32).
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Joint attention: q/k/v `(B, H, L, hd)` (text rows first), RoPE, SDPA -> `(B, L, D)`.
fn joint_attention(q: &Tensor, k: &Tensor, v: &Tensor, pe: &Rope) -> Result<Tensor> {
    let q = rope::apply(q, &pe.cos, &pe.sin)?;
    let k = rope::apply(k, &pe.cos, &pe.sin)?;
    attention(&q, &k, v, None)
}

/// The 6 modulation vectors of one stream of a double block, each `(B, 1, D)`.
pub struct Mod6 {
    pub shift1: Tensor,
    pub scale1: Tensor,
    pub gate1: Tensor,
    pub shift2: Tensor,
    pub scale2: Tensor,
    pub gate2: Tensor,
}

impl Mod6 {
    /// From the modulation output `(B, 6D)` in the order shift, scale, gate, shift, scale, gate.
    pub fn from(m: &Tensor) -> Result<Self> {
        let c = m.unsqueeze(1)?.chunk(6, D::Minus1)?;
        Ok(Self {
            shift1: c[0].clone(),
            scale1: c[1].clone(),
            gate1: c[2].clone(),
            shift2: c[3].clone(),
            scale2: c[4].clone(),
            gate2: c[5].clone(),
        })
    }
}

/// One stream's attention projections and FFN of a double block.
struct Stream {
    qkv: Dense,
    norm_q: HeadNorm,
    norm_k: HeadNorm,
    out: Dense,
    /// `linear_in` with SiLU(gate) * up applied (in the GEMM's epilogue on packed CPUs).
    ff_in: SwiGlu,
    ff_out: Dense,
}

pub struct DoubleBlock {
    img: Stream,
    txt: Stream,
    heads: usize,
    dim: usize,
    eps: f64,
}

impl DoubleBlock {
    pub fn new(cfg: &TransformerConfig, w: Weights) -> Result<Self> {
        let (d, f, hd) = (cfg.dim(), cfg.ff_hidden(), cfg.attention_head_dim);
        let a = w.pp("attn");
        let stream = |qkv: [&str; 3], nq: &str, nk: &str, out: &str, ff: &str| -> Result<Stream> {
            Ok(Stream {
                qkv: Dense::load(&a, &qkv, d, &[d, d, d], false)?,
                norm_q: HeadNorm::new(hd, cfg.eps, a.vb().pp(nq))?,
                norm_k: HeadNorm::new(hd, cfg.eps, a.vb().pp(nk))?,
                out: Dense::load(&a, &[out], d, &[d], false)?,
                ff_in: SwiGlu::load_fused(&w.pp(ff), "linear_in", d, f)?,
                ff_out: Dense::load(&w.pp(ff), &["linear_out"], f, &[d], false)?,
            })
        };
        Ok(Self {
            img: stream(
                ["to_q", "to_k", "to_v"],
                "norm_q",
                "norm_k",
                "to_out.0",
                "ff",
            )?,
            txt: stream(
                ["add_q_proj", "add_k_proj", "add_v_proj"],
                "norm_added_q",
                "norm_added_k",
                "to_add_out",
                "ff_context",
            )?,
            heads: cfg.num_attention_heads,
            dim: d,
            eps: cfg.eps,
        })
    }

    fn qkv(&self, s: &Stream, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let p = Dense::split(&s.qkv.forward(x)?, &[self.dim; 3])?;
        Ok((
            s.norm_q.heads(&p[0], self.heads)?,
            s.norm_k.heads(&p[1], self.heads)?,
            split_heads(&p[2], self.heads)?,
        ))
    }

    /// `img (B, N, D)`, `txt (B, S, D)` -> both updated.
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        mi: &Mod6,
        mt: &Mod6,
        pe: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        let s = txt.dim(1)?;
        let a = modulate(img, &mi.shift1, &mi.scale1, self.eps)?;
        let b = modulate(txt, &mt.shift1, &mt.scale1, self.eps)?;
        let (iq, ik, iv) = self.qkv(&self.img, &a)?;
        let (tq, tk, tv) = self.qkv(&self.txt, &b)?;
        let q = Tensor::cat(&[tq, iq], 2)?;
        let k = Tensor::cat(&[tk, ik], 2)?;
        let v = Tensor::cat(&[tv, iv], 2)?;
        let o = joint_attention(&q, &k, &v, pe)?;
        let n = o.dim(1)? - s;
        let o_txt = o.narrow(1, 0, s)?;
        let o_img = o.narrow(1, s, n)?;
        let img = gated_add(img, &mi.gate1, &self.img.out.forward(&o_img)?)?;
        let txt = gated_add(txt, &mt.gate1, &self.txt.out.forward(&o_txt)?)?;
        let img = self.ff(&self.img, &img, mi)?;
        let txt = self.ff(&self.txt, &txt, mt)?;
        Ok((img, txt))
    }

    fn ff(&self, s: &Stream, x: &Tensor, m: &Mod6) -> Result<Tensor> {
        let h = modulate(x, &m.shift2, &m.scale2, self.eps)?;
        let y = s.ff_out.forward(&s.ff_in.forward(&h)?)?;
        gated_add(x, &m.gate2, &y)
    }
}

/// The 3 modulation vectors of the single blocks, each `(B, 1, D)`.
pub struct Mod3 {
    pub shift: Tensor,
    pub scale: Tensor,
    pub gate: Tensor,
}

impl Mod3 {
    pub fn from(m: &Tensor) -> Result<Self> {
        let c = m.unsqueeze(1)?.chunk(3, D::Minus1)?;
        Ok(Self {
            shift: c[0].clone(),
            scale: c[1].clone(),
            gate: c[2].clone(),
        })
    }
}

pub struct SingleBlock {
    proj: Dense,
    norm_q: HeadNorm,
    norm_k: HeadNorm,
    out: Dense,
    heads: usize,
    dim: usize,
    ff: usize,
    eps: f64,
}

impl SingleBlock {
    pub fn new(cfg: &TransformerConfig, w: Weights) -> Result<Self> {
        let (d, f, hd) = (cfg.dim(), cfg.ff_hidden(), cfg.attention_head_dim);
        let a = w.pp("attn");
        Ok(Self {
            proj: Dense::load(&a, &["to_qkv_mlp_proj"], d, &[3 * d + 2 * f], false)?,
            norm_q: HeadNorm::new(hd, cfg.eps, a.vb().pp("norm_q"))?,
            norm_k: HeadNorm::new(hd, cfg.eps, a.vb().pp("norm_k"))?,
            out: Dense::load(&a, &["to_out"], d + f, &[d], false)?,
            heads: cfg.num_attention_heads,
            dim: d,
            ff: f,
            eps: cfg.eps,
        })
    }

    /// `h (B, S + N, D)` (text rows first) -> updated.
    pub fn forward(&self, h: &Tensor, m: &Mod3, pe: &Rope) -> Result<Tensor> {
        let a = modulate(h, &m.shift, &m.scale, self.eps)?;
        let d = self.dim;
        let p = Dense::split(&self.proj.forward(&a)?, &[d, d, d, 2 * self.ff])?;
        let q = self.norm_q.heads(&p[0], self.heads)?;
        let k = self.norm_k.heads(&p[1], self.heads)?;
        let v = split_heads(&p[2], self.heads)?;
        let o = joint_attention(&q, &k, &v, pe)?;
        let y = self
            .out
            .forward(&Tensor::cat(&[o, swiglu(&p[3])?], D::Minus1)?)?;
        gated_add(h, &m.gate, &y)
    }
}
