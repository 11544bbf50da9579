//! Dense layers stored pre-transposed as `(in, out)` row-major, optionally several checkpoint
//! matrices fused along the output (q/k/v, or the FFN's w1/w3): one GEMM over all tokens of the
//! batch instead of several, with the weight already in the layout the GEMM reads fastest.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::pipeline::error::Result;

pub struct Dense {
    /// `(in, out)` contiguous.
    w: Tensor,
    b: Option<Tensor>,
    out: usize,
}

impl Dense {
    /// Load `{name}.weight` (and `{name}.bias` when `bias`) for each name, fused in order.
    pub fn load(
        vb: &VarBuilder,
        names: &[&str],
        in_dim: usize,
        outs: &[usize],
        bias: bool,
    ) -> Result<Self> {
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
        Ok(Self {
            w,
            b,
            out: outs.iter().sum(),
        })
    }

    /// `x @ W (+ b)` over the last dimension; any leading dimensions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let y = x.reshape((rows, k))?.matmul(&self.w)?;
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.out;
        Ok(y.reshape(out_dims)?)
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
