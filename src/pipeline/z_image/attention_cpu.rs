//! CPU attention kernel (f32): per (item, head, block of 64 queries), one GEMM for the scores,
//! a row softmax, one GEMM for the output. The blocks run in parallel on the rayon pool, each
//! GEMM single-threaded, so the small per-head products use every core; no (S, S) score matrix
//! exists, only 64 rows of it per task. An item's result depends only on its own rows and
//! length, never on the batch.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// Queries per task.
const BLOCK: usize = 64;

pub struct CpuAttention {
    /// Valid rows per item.
    pub lens: Vec<usize>,
    pub scale: f32,
}

/// `dst (m x n, row stride n) = beta * lhs (m x k) * rhs (k x n)` with explicit strides,
/// single-threaded. Bounds are checked here, so the unsafe GEMM call only touches the slices.
#[allow(unsafe_code, clippy::too_many_arguments)]
fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) -> candle_core::Result<()> {
    if m == 0 || n == 0 || k == 0 {
        dst.iter_mut().take(m * n).for_each(|x| *x = 0.0);
        return Ok(());
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    if dst.len() < m * n
        || lhs.len() <= last(m, lhs_rs, k, lhs_cs)
        || rhs.len() <= last(k, rhs_rs, n, rhs_cs)
    {
        candle_core::bail!("attention gemm operands out of bounds");
    }
    // SAFETY: every index the GEMM reads or writes is `r * rs + c * cs` with r, c below the
    // given dimensions; the checks above bound the largest such index by each slice's length,
    // and `dst` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

fn softmax_rows(scores: &mut [f32], cols: usize) {
    for row in scores.chunks_exact_mut(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("cpu attention wants f32");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cpu attention wants contiguous inputs");
    };
    Ok(&v[a..b])
}

impl CustomOp3 for CpuAttention {
    fn name(&self) -> &'static str {
        "diffusiond-cpu-attention"
    }

    /// q: (B, H, S, D), k/v: (B, Hkv, S, D), contiguous f32. Output (B, S, H*D), zero past each
    /// item's length.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, s, d) = l1.shape().dims4()?;
        let hkv = l2.shape().dims4()?.1;
        if hkv == 0 || h % hkv != 0 || self.lens.len() != b {
            candle_core::bail!("cpu attention: bad heads or lengths");
        }
        let (q, k, v) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let blocks = s.div_ceil(BLOCK);
        let tasks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|i| (0..h).flat_map(move |hh| (0..blocks).map(move |bl| (i, hh, bl))))
            .filter(|&(i, _, bl)| bl * BLOCK < self.lens[i])
            .collect();
        let results = tasks
            .par_iter()
            .map(|&(i, hh, bl)| -> candle_core::Result<Vec<f32>> {
                let len = self.lens[i].min(s);
                let rows = BLOCK.min(len - bl * BLOCK);
                let kvh = hh / (h / hkv);
                let q0 = ((i * h + hh) * s + bl * BLOCK) * d;
                let kv0 = (i * hkv + kvh) * s * d;
                let mut scores = vec![0f32; rows * len];
                // scores = q_block (rows x d) * k^T (d x len): k is (len x d) row-major.
                sgemm(
                    (rows, len, d),
                    &mut scores,
                    &q[q0..],
                    (d, 1),
                    &k[kv0..],
                    (1, d),
                    self.scale,
                )?;
                softmax_rows(&mut scores, len);
                let mut out = vec![0f32; rows * d];
                sgemm(
                    (rows, d, len),
                    &mut out,
                    &scores,
                    (len, 1),
                    &v[kv0..],
                    (d, 1),
                    1.0,
                )?;
                Ok(out)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut out = vec![0f32; b * s * h * d];
        for (&(i, hh, bl), block) in tasks.iter().zip(&results) {
            for (r, src) in block.chunks_exact(d).enumerate() {
                let row = bl * BLOCK + r;
                let at = (i * s + row) * h * d + hh * d;
                out[at..at + d].copy_from_slice(src);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, s, h * d))))
    }
}
