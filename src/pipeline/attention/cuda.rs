//! Attention on CUDA with the flash-attention v2 kernels (feature `flash-attn`).
//!
//! [`attention`] takes the same inputs as `super::attention` and answers `None` when
//! the kernels cannot run them (not on a CUDA device, not bf16/f16, a head size flash-attn lacks),
//! so the caller falls through to the generic path. Otherwise:
//!
//! - every item has the full length S: `flash_attn` on (B, S, H, D) views of q, k and v (a
//!   transpose, no copy: the kernels take any batch/row/head strides with a contiguous last dim),
//!   no mask;
//! - items of different lengths: each item's valid rows are packed into (total, H, D) and
//!   `flash_attn_varlen` runs with the cumulative lengths `[0, l0, l0+l1, ...]` as both the query
//!   and key offsets, so an item attends to its own valid rows only; no padding row is computed
//!   and no mask exists.
//!
//! Grouped-query attention is native (k/v keep Hkv heads; the kernels map query head h to kv head
//! h / (H / Hkv), as `repeat_interleave` in the reference does). The scores, softmax and
//! accumulation run in f32 inside the kernels; the output is (B, S, H*D) in the input dtype with
//! rows past an item's length zero, as on the generic path.
//!
//! Batching: candle-flash-attn never splits the key dimension (`num_splits = 1`), so each (item,
//! head, query block) is one thread block reading only that item's rows: an item's output does
//! not depend on its batch mates. Whether the unpadded kernel (`flash_attn`, an item alone) and
//! the varlen kernel (the same item in a mixed batch) agree to the bit is expected (they differ
//! only in bounds predication) but not measured: no GPU was available where this was written.

use candle_core::{DType, Tensor};

use crate::pipeline::error::{PipelineError, Result};

/// q: (B, H, S, D), k/v: (B, Hkv, S, D); `lens[i]` valid rows of item i (all S when `None`).
/// `Some((B, S, H*D))` computed by flash-attn, or `None` when it does not apply.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: Option<&[usize]>,
) -> Result<Option<Tensor>> {
    let dtype = q.dtype();
    if !q.device().is_cuda()
        || !matches!(dtype, DType::BF16 | DType::F16)
        || k.dtype() != dtype
        || v.dtype() != dtype
    {
        return Ok(None);
    }
    let (b, h, s, d) = q.dims4()?;
    let (kb, hkv, ks, kd) = k.dims4()?;
    // Shapes the kernels do not take (head size not a multiple of 8 or above 512, kv heads not
    // dividing the query heads) or mismatched inputs: the generic path handles or reports them.
    if v.dims4()? != (kb, hkv, ks, kd)
        || (kb, ks, kd) != (b, s, d)
        || d % 8 != 0
        || d > 512
        || hkv == 0
        || h % hkv != 0
    {
        return Ok(None);
    }
    let scale = 1.0 / (d as f32).sqrt();
    let lens = match lens {
        Some(l) if l.len() != b || l.iter().any(|&n| n > s) => {
            return Err(PipelineError::Candle(candle_core::Error::Msg(format!(
                "attention: lengths {l:?} do not fit a batch of {b} items of {s} rows"
            ))));
        }
        Some(l) if l.iter().any(|&n| n < s) => l,
        _ => {
            // Every item is full: one batched call, no mask.
            let out = candle_flash_attn::flash_attn(&bshd(q)?, &bshd(k)?, &bshd(v)?, scale, false)?;
            return Ok(Some(out.reshape((b, s, h * d))?)); // (B, S, H, D) contiguous
        }
    };

    let total: usize = lens.iter().sum();
    if total == 0 {
        return Ok(Some(Tensor::zeros((b, s, h * d), dtype, q.device())?));
    }
    // [0, l0, l0+l1, ...] as U32, which is how the kernels read it (they index rows with i32).
    if i32::try_from(total).is_err() {
        return Err(PipelineError::Candle(candle_core::Error::Msg(format!(
            "attention: {total} rows exceed the kernels' 32-bit offsets"
        ))));
    }
    let cu_seqlens: Vec<u32> = std::iter::once(0)
        .chain(lens.iter().scan(0u32, |acc, &n| {
            *acc += n as u32;
            Some(*acc)
        }))
        .collect();
    let cu_seqlens = Tensor::new(cu_seqlens.as_slice(), q.device())?;
    let max_len = lens.iter().copied().max().unwrap_or(0);

    // (B, heads, S, D) -> (total, heads, D): item i's first lens[i] rows, items one after another.
    let pack = |t: &Tensor| -> Result<Tensor> {
        let parts = lens
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(i, &n)| t.get(i)?.narrow(1, 0, n)?.transpose(0, 1)) // (n, heads, D)
            .collect::<candle_core::Result<Vec<_>>>()?;
        // A copy into one contiguous tensor (with one part, a strided view: still fine, the
        // kernels only need the last dim contiguous).
        Ok(Tensor::cat(&parts, 0)?)
    };
    let out = candle_flash_attn::flash_attn_varlen(
        &pack(q)?,
        &pack(k)?,
        &pack(v)?,
        &cu_seqlens,
        &cu_seqlens,
        max_len,
        max_len,
        scale,
        false,
    )?; // (total, H, D) contiguous
    let out = out.reshape((total, h * d))?;

    // Unpack: item i's rows, then zeros up to S; one copy for the whole batch.
    let zeros = Tensor::zeros((s, h * d), dtype, q.device())?;
    let mut pieces = Vec::with_capacity(2 * b);
    let mut offset = 0;
    for &n in lens {
        if n > 0 {
            pieces.push(out.narrow(0, offset, n)?);
        }
        if n < s {
            pieces.push(zeros.narrow(0, 0, s - n)?);
        }
        offset += n;
    }
    Ok(Some(Tensor::cat(&pieces, 0)?.reshape((b, s, h * d))?))
}

/// (B, heads, S, D) -> a (B, S, heads, D) view; copied only if its last dim is strided.
fn bshd(t: &Tensor) -> Result<Tensor> {
    let t = t.transpose(1, 2)?;
    Ok(if t.stride().last() == Some(&1) {
        t
    } else {
        t.contiguous()?
    })
}
