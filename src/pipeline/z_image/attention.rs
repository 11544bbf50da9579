//! Scaled dot-product attention, computed item by item on each item's own valid length.
//!
//! Running each item alone (instead of one masked batched call) wastes nothing on batch padding
//! and makes an item's result bit-for-bit independent of its batch mates: the kernels see the
//! same shapes whether the item runs alone or in a batch.

use candle_core::Tensor;

use crate::pipeline::error::Result;

/// q: (B, H, S, D), k/v: (B, Hkv, S, D) contiguous; `lens[i]` valid rows of item i (all S when
/// `None`). Returns (B, S, H*D); rows past an item's length are zero.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut outs = Vec::with_capacity(b);
    for i in 0..b {
        let len = lens.map_or(s, |l| l[i]);
        let qi = q.narrow(0, i, 1)?.narrow(2, 0, len)?;
        let mut ki = k.narrow(0, i, 1)?.narrow(2, 0, len)?;
        let mut vi = v.narrow(0, i, 1)?.narrow(2, 0, len)?;
        if hkv != h {
            let rep = h / hkv;
            let expand = |t: &Tensor| -> Result<Tensor> {
                Ok(t.unsqueeze(2)?
                    .expand((1, hkv, rep, len, d))?
                    .reshape((1, h, len, d))?)
            };
            ki = expand(&ki)?;
            vi = expand(&vi)?;
        }
        let scores = (qi.contiguous()?.matmul(&ki.contiguous()?.t()?)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&vi.contiguous()?)?
            .transpose(1, 2)?
            .reshape((1, len, h * d))?;
        outs.push(if len < s {
            let pad = Tensor::zeros((1, s - len, h * d), out.dtype(), out.device())?;
            Tensor::cat(&[&out, &pad], 1)?
        } else {
            out
        });
    }
    Ok(Tensor::cat(&outs, 0)?)
}
