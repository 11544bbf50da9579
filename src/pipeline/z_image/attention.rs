//! Scaled dot-product attention over (B, H, S, D) with an optional additive key mask.

use candle_core::Tensor;

use crate::pipeline::error::Result;

/// q: (B, H, S, D), k/v: (B, Hkv, S, D) contiguous; mask: (B, 1, 1, S) additive.
/// Returns (B, S, H*D).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let hkv = k.dim(1)?;
    let (k, v) = if hkv != h {
        let rep = h / hkv;
        let expand = |t: &Tensor| -> Result<Tensor> {
            let (_, _, sk, _) = t.dims4()?;
            Ok(t.unsqueeze(2)?
                .expand((b, hkv, rep, sk, d))?
                .reshape((b, h, sk, d))?)
        };
        (expand(k)?, expand(v)?)
    } else {
        (k.clone(), v.clone())
    };
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h * d))?)
}
