//! CPU attention (f32). On CPUs with AVX-512 it runs the slice kernel (`super::avx512`); elsewhere the
//! portable path here: per (item, head, block of 64 queries), one GEMM for the scores,
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

/// `exp(x)` to about 2 ulp: Cephes' `expf` polynomial on `x - n ln2`, times `2^n` through the
/// exponent bits. Branch-free, so the loops below vectorize.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// Row-wise softmax in place, compiled for the CPU's widest SIMD (pulp dispatch) so the
/// exponentials vectorize.
struct SoftmaxRows<'a> {
    scores: &'a mut [f32],
    cols: usize,
}

impl pulp::WithSimd for SoftmaxRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        for row in self.scores.chunks_exact_mut(self.cols) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in row.iter_mut() {
                *x = exp_approx(*x - max);
            }
            let sum: f32 = row.iter().sum();
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

fn softmax_rows(scores: &mut [f32], cols: usize) {
    pulp::Arch::new().dispatch(SoftmaxRows { scores, cols });
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

impl CpuAttention {
    /// The same attention on any CPU: per (item, head, 64 queries), two single-threaded `gemm`
    /// calls and a row softmax.
    fn portable(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, h, hkv, s, d): (usize, usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<f32>> {
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
        Ok(out)
    }
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
        if q.len() != b * h * s * d || k.len() != b * hkv * s * d || v.len() != k.len() {
            candle_core::bail!("cpu attention: q/k/v sizes do not fit");
        }
        let dims = (b, h, hkv, s, d);
        if let Some(out) = super::avx512::try_attention(q, k, v, dims, &self.lens, self.scale) {
            return Ok((CpuStorage::F32(out), Shape::from((b, s, h * d))));
        }
        let out = self.portable(q, k, v, dims)?;
        Ok((CpuStorage::F32(out), Shape::from((b, s, h * d))))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{exp_approx, softmax_rows, CpuAttention};

    /// `softmax(q k^T * scale) v` in f64, item `i` over its first `lens[i]` rows; `(B, S, H*D)`
    /// with zero rows past each length.
    fn reference(
        (q, k, v): (&[f32], &[f32], &[f32]),
        (b, h, hkv, s, d): (usize, usize, usize, usize, usize),
        lens: &[usize],
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0f64; b * s * h * d];
        for (i, &len) in lens.iter().enumerate() {
            for hh in 0..h {
                let kv = (i * hkv + hh / (h / hkv)) * s * d;
                for r in 0..len {
                    let qr = &q[((i * h + hh) * s + r) * d..][..d];
                    let scores: Vec<f64> = (0..len)
                        .map(|j| {
                            let kj = &k[kv + j * d..][..d];
                            qr.iter()
                                .zip(kj)
                                .map(|(&a, &c)| a as f64 * c as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    let o = &mut out[(i * s + r) * h * d + hh * d..][..d];
                    for (j, p) in e.iter().enumerate() {
                        for (x, &vv) in o.iter_mut().zip(&v[kv + j * d..][..d]) {
                            *x += p / sum * vv as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// The portable path (every machine) against an f64 reference, and the AVX-512 kernel
    /// against the portable path where the CPU has it (reported skipped elsewhere).
    #[test]
    fn portable_path_and_kernel_match_the_reference() {
        let (b, h, hkv, s, d) = (2, 4, 2, 150, 24);
        let gen = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 250.0 - 2.0)
                .collect()
        };
        let (q, k, v) = (
            gen(b * h * s * d, 1),
            gen(b * hkv * s * d, 2),
            gen(b * hkv * s * d, 3),
        );
        let op = CpuAttention {
            lens: vec![150, 71],
            scale: 0.2,
        };
        let dims = (b, h, hkv, s, d);
        let portable = op.portable(&q, &k, &v, dims).unwrap();
        let want = reference((&q, &k, &v), dims, &op.lens, 0.2);
        for (i, (&a, &w)) in portable.iter().zip(&want).enumerate() {
            assert!(
                (a as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                "[{i}]: {a} vs {w}"
            );
        }
        let Some(fast) = super::super::avx512::try_attention(&q, &k, &v, dims, &op.lens, 0.2)
        else {
            crate::pipeline::kernels::detect::skipped(
                "pipeline::attention::cpu::tests::portable_path_and_kernel_match_the_reference (kernel part)",
                "AVX-512",
            );
            return;
        };
        for (i, (a, c)) in portable.iter().zip(&fast).enumerate() {
            assert!((a - c).abs() < 1e-5 * (1.0 + a.abs()), "[{i}]: {a} vs {c}");
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_approx(x), x.exp());
            assert!(
                ((got - want) / want).abs() < 4e-7,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn softmax_rows_sum_to_one() {
        let mut v: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        softmax_rows(&mut v, 100);
        for row in v.chunks(100) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
}
