//! The attention slice kernel for CPUs with AVX-512, built on the dense GEMM's 8 x 48 micro-kernel.
//!
//! Per (item, head) the keys are packed into 8-key micro-panels (`[d][8]`) and the values into
//! 8-dim micro-panels (`[j][8]`), once. Then per block of up to 96 queries (two 48-query panels):
//!
//! 1. `S^T = K Q^T * scale`: tiles of 8 keys x 48 queries, written key-major (`[j][48]`), which is
//!    at once the layout the softmax wants (48 queries per row, vectorized across queries) and
//!    the panel layout of the second GEMM;
//! 2. softmax over keys, per query: max, then `exp(s - max)` in place with the sum; the division
//!    by the sum is applied to the output (one multiply per output instead of per score);
//! 3. `O^T = V^T P`: tiles of 8 dims x 48 queries, stored transposed into the block's rows.
//!
//! Scores exist only for one block (`len x 96` floats), never `(S, S)`; keys past an item's
//! length are never read (its own length, so a batch mate's never matters); an output value
//! depends only on its own query, the item's keys and values, and the kernel, so attention is
//! bit-identical for an item alone or in a batch.

use pulp::{f32x16, x86::V4, Simd};
use rayon::prelude::*;

use crate::pipeline::kernels::avx2;
use crate::pipeline::kernels::avx512::dense::{kernel, DENSE_MR, DENSE_NR};
use crate::pipeline::kernels::avx512::run;

/// Queries per task (one panel): 6 tasks per item at 288 tokens keep two cores balanced.
const TASK_ROWS: usize = DENSE_NR;
/// Queries one `block` call takes at most: two panels.
const QBLOCK: usize = 2 * DENSE_NR;

/// Shapes of one call: batch, query heads, kv heads, padded sequence, head dim.
#[derive(Debug, Clone, Copy)]
struct Dims {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    pub s: usize,
    pub d: usize,
}

/// [`attention`] when this CPU has AVX-512 (and `DIFFUSIOND_DISABLE_SIMD` is unset), else `None`.
pub(super) fn try_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, h, hkv, s, d): (usize, usize, usize, usize, usize),
    lens: &[usize],
    scale: f32,
) -> Option<Vec<f32>> {
    let s4 = crate::pipeline::kernels::avx512::token()?;
    Some(attention(
        s4,
        q,
        k,
        v,
        Dims { b, h, hkv, s, d },
        lens,
        scale,
    ))
}

/// `softmax(q k^T * scale) v` for `q (B, H, S, D)`, `k`/`v (B, Hkv, S, D)` (contiguous), item `i`
/// using its first `lens[i]` rows. Returns `(B, S, H*D)`, zero past each item's length.
fn attention(
    s4: V4,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    lens: &[usize],
    scale: f32,
) -> Vec<f32> {
    let Dims { b, h, hkv, s, d } = dims;
    let groups = h / hkv;
    // Pack keys and values per (item, kv head).
    let packed: Vec<(Vec<f32>, Vec<f32>)> = (0..b * hkv)
        .into_par_iter()
        .map(|ih| {
            let len = lens[ih / hkv].min(s);
            let base = ih * s * d;
            (
                pack_keys(&k[base..base + len * d], len, d),
                pack_values(&v[base..base + len * d], len, d),
            )
        })
        .collect();
    // One task per (item, block of queries), all heads: each task owns a contiguous range of
    // output rows, so results are written in place.
    let row = h * d;
    let mut out = vec![0f32; b * s * row];
    out.par_chunks_mut(s * row)
        .enumerate()
        .for_each(|(i, item_out)| {
            let len = lens[i].min(s);
            item_out[..len * row]
                .par_chunks_mut(TASK_ROWS * row)
                .enumerate()
                .for_each(|(t, chunk)| {
                    let rows = chunk.len() / row;
                    for hh in 0..h {
                        let qbase = ((i * h + hh) * s + t * TASK_ROWS) * d;
                        let (kp, vp) = &packed[i * hkv + hh / groups];
                        let q_rows = &q[qbase..qbase + rows * d];
                        let dst = Out {
                            data: &mut *chunk,
                            stride: row,
                            col: hh * d,
                        };
                        block(s4, q_rows, kp, vp, len, d, scale, dst);
                    }
                });
        });
    out
}

/// Where a block's `(rows, d)` result goes: row `r`, dim `x` at `data[r * stride + col + x]`.
struct Out<'a> {
    data: &'a mut [f32],
    stride: usize,
    col: usize,
}

/// Keys `(len, d)` -> micro-panels of 8 keys, `[d][8]` each, zero-padded.
fn pack_keys(k: &[f32], len: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; len.div_ceil(DENSE_MR) * d * DENSE_MR];
    for (mp, dst) in out.chunks_exact_mut(d * DENSE_MR).enumerate() {
        for r in 0..DENSE_MR.min(len - mp * DENSE_MR) {
            let row = &k[(mp * DENSE_MR + r) * d..(mp * DENSE_MR + r + 1) * d];
            for (dd, &x) in row.iter().enumerate() {
                dst[dd * DENSE_MR + r] = x;
            }
        }
    }
    out
}

/// Values `(len, d)` -> micro-panels of 8 dims, `[j][8]` each over all `len` keys, zero-padded.
fn pack_values(v: &[f32], len: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; d.div_ceil(DENSE_MR) * len * DENSE_MR];
    for (g, dst) in out.chunks_exact_mut(len * DENSE_MR).enumerate() {
        let cols = DENSE_MR.min(d - g * DENSE_MR);
        for (j, chunk) in dst.chunks_exact_mut(DENSE_MR).enumerate() {
            chunk[..cols].copy_from_slice(&v[j * d + g * DENSE_MR..j * d + g * DENSE_MR + cols]);
        }
    }
    out
}

/// One block of `rows` (<= 96) queries `q (rows, d)` against packed keys and values of `len`
/// positions; writes its `(rows, d)` result into `out`.
#[allow(clippy::too_many_arguments)]
fn block(
    s4: V4,
    q: &[f32],
    kp: &[f32],
    vp: &[f32],
    len: usize,
    d: usize,
    scale: f32,
    out: Out<'_>,
) {
    let rows = q.len() / d;
    let Out { data, stride, col } = out;
    let panels = rows.div_ceil(DENSE_NR);
    let kmicro = len.div_ceil(DENSE_MR);
    let lenp = kmicro * DENSE_MR;
    // Q^T panels `[d][48]`, then the scores/probabilities `[j][48]` per panel.
    let qt_len = panels * d * DENSE_NR;
    avx2::with_scratch(qt_len + panels * lenp * DENSE_NR, |buf| {
        let (qt, sc) = buf.split_at_mut(qt_len);
        qt.fill(0.0);
        for (p, dst) in qt.chunks_exact_mut(d * DENSE_NR).enumerate() {
            for c in 0..DENSE_NR.min(rows - p * DENSE_NR) {
                let row = &q[(p * DENSE_NR + c) * d..(p * DENSE_NR + c + 1) * d];
                for (dd, &x) in row.iter().enumerate() {
                    dst[dd * DENSE_NR + c] = x;
                }
            }
        }
        let mut inv = [[0f32; DENSE_NR]; QBLOCK / DENSE_NR];
        run(
            s4,
            #[inline(always)]
            || {
                let scale16 = s4.splat_f32x16(scale);
                for p in 0..panels {
                    let qpanel = &qt[p * d * DENSE_NR..(p + 1) * d * DENSE_NR];
                    let spanel = &mut sc[p * lenp * DENSE_NR..(p + 1) * lenp * DENSE_NR];
                    // 1. Scores, 8 keys at a time.
                    for mp in 0..kmicro {
                        let tile =
                            kernel(s4, &kp[mp * d * DENSE_MR..(mp + 1) * d * DENSE_MR], qpanel);
                        for (r, acc) in tile.iter().enumerate() {
                            let row = &mut spanel[(mp * DENSE_MR + r) * DENSE_NR
                                ..(mp * DENSE_MR + r + 1) * DENSE_NR];
                            for (j, v) in acc.iter().enumerate() {
                                let a: [f32; 16] = pulp::cast(s4.mul_f32x16(*v, scale16));
                                row[16 * j..16 * (j + 1)].copy_from_slice(&a);
                            }
                        }
                    }
                    // 2. Softmax over the `len` valid keys, 48 queries at once.
                    inv[p] = softmax_columns(s4, &mut spanel[..len * DENSE_NR]);
                }
                // 3. O^T = V^T P, 8 dims x 48 queries per tile.
                for p in 0..panels {
                    let spanel = &sc[p * lenp * DENSE_NR..p * lenp * DENSE_NR + len * DENSE_NR];
                    let qrows = DENSE_NR.min(rows - p * DENSE_NR);
                    for g in 0..d.div_ceil(DENSE_MR) {
                        let tile = kernel(
                            s4,
                            &vp[g * len * DENSE_MR..(g + 1) * len * DENSE_MR],
                            spanel,
                        );
                        let dims = DENSE_MR.min(d - g * DENSE_MR);
                        for (r, acc) in tile.iter().enumerate().take(dims) {
                            let mut t = [0f32; DENSE_NR];
                            for (j, v) in acc.iter().enumerate() {
                                let a: [f32; 16] = pulp::cast(*v);
                                t[16 * j..16 * (j + 1)].copy_from_slice(&a);
                            }
                            for c in 0..qrows {
                                data[(p * DENSE_NR + c) * stride + col + g * DENSE_MR + r] =
                                    t[c] * inv[p][c];
                            }
                        }
                    }
                }
            },
        );
    });
}

/// Softmax down the columns of `x` (`[j][48]`, j over keys): `x = exp(x - max)` in place;
/// returns `1 / sum` per column.
#[inline(always)]
fn softmax_columns(s4: V4, x: &mut [f32]) -> [f32; DENSE_NR] {
    let (rows, _) = x.as_chunks_mut::<DENSE_NR>();
    let mut max = [s4.splat_f32x16(f32::NEG_INFINITY); 3];
    for row in rows.iter() {
        let (v, _) = row.as_chunks::<16>();
        for j in 0..3 {
            max[j] = s4.max_f32x16(max[j], pulp::cast(v[j]));
        }
    }
    let mut sum = [s4.splat_f32x16(0.0); 3];
    for row in rows.iter_mut() {
        let (v, _) = row.as_chunks_mut::<16>();
        for j in 0..3 {
            let e = exp16(s4, s4.sub_f32x16(pulp::cast(v[j]), max[j]));
            sum[j] = s4.add_f32x16(sum[j], e);
            v[j] = pulp::cast(e);
        }
    }
    let mut inv = [0f32; DENSE_NR];
    for j in 0..3 {
        let a: [f32; 16] = pulp::cast(sum[j]);
        for (l, &x) in a.iter().enumerate() {
            inv[16 * j + l] = 1.0 / x;
        }
    }
    inv
}

/// `exp(x)` on 16 lanes, to about 1 ulp: the same Cephes polynomial as `kernels::avx2::exp` (range
/// reduction `x = n ln2 + r`, `2^n` through the exponent bits), in one AVX-512 pass instead of
/// two AVX2 halves. The softmax's exponentials cost as much as its two GEMMs at head_dim 66.
#[inline(always)]
fn exp16(s: V4, x: f32x16) -> f32x16 {
    use avx2::{EXP_POLY, EXP_RANGE, LN2_HI, LN2_LO};
    let x = s.min_f32s(
        s.max_f32s(x, s.splat_f32s(EXP_RANGE.0)),
        s.splat_f32s(EXP_RANGE.1),
    );
    // n = round(x log2 e), as floor(x log2 e + 1/2).
    let log2e = s.splat_f32s(std::f32::consts::LOG2_E);
    let n = s.floor_f32x16(s.mul_add_f32s(x, log2e, s.splat_f32s(0.5)));
    let r = s.mul_add_f32s(n, s.splat_f32s(-LN2_HI), x);
    let r = s.mul_add_f32s(n, s.splat_f32s(-LN2_LO), r);
    let mut p = s.splat_f32s(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = s.mul_add_f32s(p, r, s.splat_f32s(*c));
    }
    let y = s.add_f32s(s.mul_add_f32s(p, s.mul_f32s(r, r), r), s.splat_f32s(1.0));
    let e = s.add_i32s(s.convert_f32x16_to_i32x16(n), s.splat_i32s(127));
    let scale: f32x16 = pulp::cast(s.shl_const_i32x16::<23>(e));
    s.mul_f32s(y, scale)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pipeline::kernels::avx512::token_for_test;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        crate::pipeline::kernels::avx2::test_data(len, seed, 2.0)
    }

    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: Dims,
        lens: &[usize],
        scale: f32,
    ) -> Vec<f64> {
        let Dims { b, h, hkv, s, d } = dims;
        let mut out = vec![0f64; b * s * h * d];
        for i in 0..b {
            for hh in 0..h {
                let kv = (i * hkv + hh / (h / hkv)) * s * d;
                for r in 0..lens[i] {
                    let qr = &q[((i * h + hh) * s + r) * d..][..d];
                    let sc: Vec<f64> = (0..lens[i])
                        .map(|j| {
                            (0..d)
                                .map(|x| qr[x] as f64 * k[kv + j * d + x] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for x in 0..d {
                        let o: f64 = (0..lens[i]).map(|j| e[j] * v[kv + j * d + x] as f64).sum();
                        out[(i * s + r) * h * d + hh * d + x] = o / z;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn exp16_is_accurate() {
        let Some(s4) = token_for_test("pipeline::attention::avx512::tests::exp16_is_accurate")
        else {
            return;
        };
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.0011);
            let got: [f32; 16] = run(s4, || pulp::cast(exp16(s4, pulp::cast(xs))));
            for (g, v) in got.iter().zip(xs) {
                let want = v.exp();
                assert!(
                    ((g - want) / want).abs() < 4e-7,
                    "exp({v}) = {g}, want {want}"
                );
            }
            x += 0.0137 * 16.0;
        }
    }

    #[test]
    fn matches_softmax_attention() {
        let Some(s4) =
            token_for_test("pipeline::attention::avx512::tests::matches_softmax_attention")
        else {
            return;
        };
        for &(b, h, hkv, s, d, ref lens) in &[
            (1, 2, 2, 40, 16, vec![40]),
            (2, 4, 2, 130, 66, vec![130, 57]),
            (1, 1, 1, 200, 20, vec![200]),
        ] {
            let dims = Dims { b, h, hkv, s, d };
            let q = data(b * h * s * d, 1);
            let k = data(b * hkv * s * d, 2);
            let v = data(b * hkv * s * d, 3);
            let scale = 1.0 / (d as f32).sqrt();
            let got = attention(s4, &q, &k, &v, dims, lens, scale);
            let want = reference(&q, &k, &v, dims, lens, scale);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 2e-5 * (1.0 + w.abs()),
                    "{dims:?} [{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn an_item_does_not_depend_on_its_batch() {
        let Some(s4) = token_for_test(
            "pipeline::attention::avx512::tests::an_item_does_not_depend_on_its_batch",
        ) else {
            return;
        };
        let (h, s, d) = (2, 100, 24);
        let dims = Dims {
            b: 2,
            h,
            hkv: h,
            s,
            d,
        };
        let (q, k, v) = (
            data(2 * h * s * d, 4),
            data(2 * h * s * d, 5),
            data(2 * h * s * d, 6),
        );
        let both = attention(s4, &q, &k, &v, dims, &[100, 61], 0.2);
        let n = h * s * d;
        let one = Dims { b: 1, ..dims };
        let second = attention(s4, &q[n..], &k[n..], &v[n..], one, &[61], 0.2);
        assert_eq!(&both[s * h * d..], &second[..]);
    }
}
