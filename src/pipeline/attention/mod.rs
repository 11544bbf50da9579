//! Scaled dot-product attention, shared by every family: [`attention`] is the entry point.
//!
//! - [`cuda`]: flash-attention v2 on CUDA (feature `flash-attn`), bf16/f16;
//! - [`cpu`]: the candle op for CPU f32, which runs the AVX-512 slice kernel (`avx512`) when the
//!   CPU has it and its portable blocked path otherwise;
//! - everything else (other devices and dtypes): candle's ops, below, computed item by item on
//!   each item's own valid length, in query blocks.
//!
//! - Running each item alone (instead of one masked batched call) wastes nothing on batch
//!   padding and makes an item's result bit-for-bit independent of its batch mates: the kernels
//!   see the same shapes whether the item runs alone or in a batch.
//! - Queries are processed in blocks so that at most `SCORE_BUDGET` scores exist at once: a
//!   (heads, S, S) score matrix is never materialised for long sequences (the VAE's mid-block
//!   attention over all pixels has S = 16384 at 1024x1024). Each block's softmax sees its whole
//!   key row, so the result does not depend on the block size.

pub mod cpu;
#[cfg(feature = "flash-attn")]
pub mod cuda;

#[cfg(target_arch = "x86_64")]
mod avx512;
/// No AVX-512 kernel off x86-64: the CPU op takes its portable path.
#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) fn try_attention(
        _q: &[f32],
        _k: &[f32],
        _v: &[f32],
        _dims: (usize, usize, usize, usize, usize),
        _lens: &[usize],
        _scale: f32,
    ) -> Option<Vec<f32>> {
        None
    }
}

use candle_core::{DType, Tensor};

use crate::pipeline::error::Result;

/// Scores held at once per item (f32 elements): 8 Mi = 32 MiB.
const SCORE_BUDGET: usize = 8 << 20;

/// Whether flash attention is turned off for this process ([`set_flash_attention`]).
static FLASH_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this build has the flash-attention kernels (feature `flash-attn`).
pub const FLASH_BUILT: bool = cfg!(feature = "flash-attn");

/// Turn the flash-attention kernels on or off for the whole process (a comparison switch for
/// `diffusiond bench` and the GPU check; on by default where built). Off, CUDA attention takes
/// the generic path below.
pub fn set_flash_attention(on: bool) {
    FLASH_OFF.store(!on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether flash attention runs where it applies: built in and not turned off.
pub fn flash_attention_on() -> bool {
    FLASH_BUILT && !FLASH_OFF.load(std::sync::atomic::Ordering::Relaxed)
}

/// q: (B, H, S, D), k/v: (B, Hkv, S, D); `lens[i]` valid rows of item i (all S when `None`).
/// Returns (B, S, H*D); rows past an item's length are zero.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<Tensor> {
    #[cfg(feature = "flash-attn")]
    if flash_attention_on() {
        if let Some(out) = cuda::attention(q, k, v, lens)? {
            return Ok(out);
        }
    }
    without_flash(q, k, v, lens)
}

/// [`attention`] without the flash-attention kernels: the CPU op, or candle's ops elsewhere
/// (what flash attention is checked against).
pub fn without_flash(q: &Tensor, k: &Tensor, v: &Tensor, lens: Option<&[usize]>) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        let op = cpu::CpuAttention {
            lens: lens.map_or_else(|| vec![s; b], <[usize]>::to_vec),
            scale: 1.0 / (d as f32).sqrt(),
        };
        return Ok(q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?);
    }
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
        let kt = ki.contiguous()?.t()?;
        let vi = vi.contiguous()?;
        let block = (SCORE_BUDGET / (h * len).max(1)).clamp(1, len.max(1));
        let mut parts = Vec::with_capacity(len.div_ceil(block));
        let mut start = 0;
        while start < len {
            let n = block.min(len - start);
            let qb = qi.narrow(2, start, n)?.contiguous()?;
            let scores = (qb.matmul(&kt)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            parts.push(probs.matmul(&vi)?);
            start += n;
        }
        let out = if parts.len() == 1 {
            parts.swap_remove(0)
        } else {
            Tensor::cat(&parts, 2)?
        };
        let out = out.transpose(1, 2)?.reshape((1, len, h * d))?;
        outs.push(if len < s {
            let pad = Tensor::zeros((1, s - len, h * d), out.dtype(), out.device())?;
            Tensor::cat(&[&out, &pad], 1)?
        } else {
            out
        });
    }
    Ok(Tensor::cat(&outs, 0)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn blocked_equals_one_shot() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 2, 40, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 1, 40, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 1, 40, 8), &dev)?;
        let out =
            super::attention(&q, &k, &v, Some(&[40, 33])).map_err(candle_core::Error::wrap)?;
        // Reference: plain softmax(q k^T / sqrt(d)) v per item, heads sharing the kv head.
        for (i, len) in [(0usize, 40usize), (1, 33)] {
            let qi = q.get(i)?.narrow(1, 0, len)?;
            let ki = k
                .get(i)?
                .narrow(1, 0, len)?
                .broadcast_as((2, len, 8))?
                .contiguous()?;
            let vi = v
                .get(i)?
                .narrow(1, 0, len)?
                .broadcast_as((2, len, 8))?
                .contiguous()?;
            let p = candle_nn::ops::softmax_last_dim(&(qi.matmul(&ki.t()?)? / (8f64).sqrt())?)?;
            let want = p.matmul(&vi)?.transpose(0, 1)?.reshape((len, 16))?;
            let got = out.get(i)?.narrow(0, 0, len)?;
            let err = (want - got)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-5, "item {i}: {err}");
        }
        Ok(())
    }
}
