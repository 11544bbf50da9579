//! Dense layers (shared by the families), loaded once into the layout their GEMM reads fastest.
//!
//! - On a CPU with AVX-512 (f32 weights) the weight is packed into the panels of our own GEMM
//!   (`kernels::PackedDense`, the candle-op tier) at load and the checkpoint layout is dropped: no call repacks it.
//! - Everywhere else (GPU, other dtypes, other CPUs) it is stored pre-transposed as `(in, out)`
//!   for candle's matmul.
//! - Block-quantized weights (a GGUF file, `--quantize`) stay quantized and go through
//!   [`crate::pipeline::quant::QuantParts`]; the two paths above are untouched by them.
//!
//! Several checkpoint matrices can be fused along the output (q/k/v): one GEMM over all tokens of
//! the batch instead of several. The FFN's gate and up projections are fused into [`SwiGlu`],
//! which on the packed path also applies `silu(gate) * up` as the GEMM writes its tile.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::pipeline::error::Result;
use crate::pipeline::kernels::PackedDense;
use crate::pipeline::quant::{QuantParts, Weights};

enum Weight {
    Packed(PackedDense),
    /// Block-quantized (GGUF or `--quantize`), with the bias.
    Quant {
        w: QuantParts,
        b: Option<Tensor>,
    },
    /// `(in, out)` contiguous, and the bias.
    Plain {
        w: Tensor,
        b: Option<Tensor>,
    },
}

pub struct Dense {
    weight: Weight,
    out: usize,
}

/// Load `{name}.weight` for each name as one `(in, sum of outs)` matrix, and the fused biases.
fn load_fused(
    vb: &VarBuilder,
    names: &[&str],
    in_dim: usize,
    outs: &[usize],
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut ws = Vec::with_capacity(names.len());
    let mut bs = Vec::with_capacity(names.len());
    for (name, &out) in names.iter().zip(outs) {
        ws.push(vb.get((out, in_dim), &format!("{name}.weight"))?);
        if bias {
            bs.push(vb.get(out, &format!("{name}.bias"))?);
        }
    }
    let w = Tensor::cat(&ws, 0)?.t()?.contiguous()?;
    let b = if bias {
        Some(Tensor::cat(&bs, 0)?)
    } else {
        None
    };
    Ok((w, b))
}

/// A packed (CPU f32) layer was given an input on another device or of another dtype.
fn unpacked_input(x: &Tensor) -> crate::pipeline::PipelineError {
    candle_core::Error::Msg(format!(
        "CPU f32 dense layer given a {:?} input on {:?}",
        x.dtype(),
        x.device().location()
    ))
    .into()
}

/// `x` as `(rows, k)` and the output's dims with the last one replaced by `out`.
fn flatten(x: &Tensor, out: usize) -> Result<(Tensor, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let last = dims.len() - 1;
    dims[last] = out;
    Ok((x.reshape((rows, k))?, dims))
}

impl Dense {
    /// Load `{name}.weight` (and `{name}.bias` when `bias`) for each name, fused in order.
    pub fn load(
        weights: &Weights,
        names: &[&str],
        in_dim: usize,
        outs: &[usize],
        bias: bool,
    ) -> Result<Self> {
        let vb = weights.vb();
        if let Some(w) = weights.quantized(names, in_dim, outs)? {
            let b = if bias {
                let bs = names
                    .iter()
                    .zip(outs)
                    .map(|(n, &o)| vb.get(o, &format!("{n}.bias")))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(Tensor::cat(&bs, 0)?)
            } else {
                None
            };
            return Ok(Self {
                weight: Weight::Quant { w, b },
                out: outs.iter().sum(),
            });
        }
        let (w, b) = load_fused(vb, names, in_dim, outs, bias)?;
        let weight = match PackedDense::prepare(&w, b.as_ref())? {
            Some(p) => Weight::Packed(p),
            None => Weight::Plain { w, b },
        };
        Ok(Self {
            weight,
            out: outs.iter().sum(),
        })
    }

    /// `x @ W (+ b)` over the last dimension; any leading dimensions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, out_dims) = flatten(x, self.out)?;
        let y = match &self.weight {
            Weight::Packed(p) => match p.try_forward(&x2)? {
                Some(y) => y,
                None => return Err(unpacked_input(x)),
            },
            Weight::Plain { w, b } => {
                let y = x2.matmul(w)?;
                match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            Weight::Quant { w, b } => {
                let y = w.forward(&x2)?;
                match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        Ok(y.reshape(out_dims)?)
    }

    /// Whether the weight is block-quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quant { .. })
    }

    /// Split a fused output into its parts along the last dimension.
    pub fn split(y: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
        let mut start = 0;
        let mut parts = Vec::with_capacity(sizes.len());
        for &s in sizes {
            parts.push(y.narrow(D::Minus1, start, s)?);
            start += s;
        }
        Ok(parts)
    }
}

/// The FFN's first half: `silu(x W1) * (x W3)` (no biases).
pub struct SwiGlu {
    /// Packed with the SwiGLU epilogue, or `w1 | w3` as `(in, 2 * hidden)`.
    weight: Weight,
    hidden: usize,
}

impl SwiGlu {
    /// Load `{gate}.weight` and `{up}.weight`, each `(hidden, in_dim)`.
    pub fn load(
        weights: &Weights,
        gate: &str,
        up: &str,
        in_dim: usize,
        hidden: usize,
    ) -> Result<Self> {
        if let Some(w) = weights.quantized(&[gate, up], in_dim, &[hidden, hidden])? {
            return Ok(Self {
                weight: Weight::Quant { w, b: None },
                hidden,
            });
        }
        let vb = weights.vb();
        let w1 = vb.get((hidden, in_dim), &format!("{gate}.weight"))?;
        let w3 = vb.get((hidden, in_dim), &format!("{up}.weight"))?;
        Self::from_weights(w1, w3, hidden)
    }

    /// Load one `{name}.weight` `(2 * hidden, in_dim)` whose first `hidden` rows are the gate
    /// and the others the up projection (FLUX.2's `linear_in`).
    pub fn load_fused(weights: &Weights, name: &str, in_dim: usize, hidden: usize) -> Result<Self> {
        if let Some(w) = weights.quantized(&[name], in_dim, &[2 * hidden])? {
            return Ok(Self {
                weight: Weight::Quant { w, b: None },
                hidden,
            });
        }
        let vb = weights.vb();
        let w = vb.get((2 * hidden, in_dim), &format!("{name}.weight"))?;
        Self::from_weights(
            w.narrow(0, 0, hidden)?,
            w.narrow(0, hidden, hidden)?,
            hidden,
        )
    }

    /// From the gate and up weights, each `(hidden, in_dim)`.
    fn from_weights(w1: Tensor, w3: Tensor, hidden: usize) -> Result<Self> {
        let packed = PackedDense::prepare_swiglu(&w1.t()?.contiguous()?, &w3.t()?.contiguous()?)?;
        let weight = match packed {
            Some(p) => Weight::Packed(p),
            None => Weight::Plain {
                w: Tensor::cat(&[w1, w3], 0)?.t()?.contiguous()?,
                b: None,
            },
        };
        Ok(Self { weight, hidden })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, out_dims) = flatten(x, self.hidden)?;
        let y = match &self.weight {
            Weight::Packed(p) => match p.try_forward(&x2)? {
                Some(y) => y,
                None => return Err(unpacked_input(x)),
            },
            Weight::Plain { w, .. } => glu(&x2.matmul(w)?, self.hidden)?,
            Weight::Quant { w, .. } => glu(&w.forward(&x2)?, self.hidden)?,
        };
        Ok(y.reshape(out_dims)?)
    }
}

/// `silu(h[.., :hidden]) * h[.., hidden:]`.
fn glu(h: &Tensor, hidden: usize) -> Result<Tensor> {
    let g = h.narrow(D::Minus1, 0, hidden)?;
    let u = h.narrow(D::Minus1, hidden, hidden)?;
    Ok((candle_nn::ops::silu(&g)? * u)?)
}
