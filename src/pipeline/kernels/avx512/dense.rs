//! The dense-layer GEMM for CPUs with AVX-512: `y = x · W (+ b)` with `W` packed once, at load,
//! into the panel layout the micro-kernel reads, so no call repacks a weight.
//!
//! Layout and loop order (BLIS-style, sized for the transformer's shapes: a few hundred to a few
//! thousand rows, K and N in the hundreds to thousands):
//! - `W` (K x N) is cut into panels of [`DENSE_NR`] = 48 columns (three 16-float vectors), each stored
//!   k-major (`[k][48]`), the last one zero-padded. A panel (K x 48 floats, ~100 KB at K = 528)
//!   stays in L2 while every row block of `x` streams past it.
//! - The rows of `x` are split evenly over the rayon workers (contiguous row ranges, so each
//!   worker owns a contiguous slice of `y`); each worker packs its rows into [`DENSE_MR`] = 8-row
//!   micro-panels (`[k][8]`, zero-padded) in a thread-local buffer.
//! - The micro-kernel holds an 8 x 48 tile in 24 zmm accumulators: per k, three vector loads of
//!   `W`, eight broadcasts of `x`, 24 FMAs.
//!
//! Every output value is `sum_k x[r][k] * W[k][c]` accumulated in k order by one FMA chain, then
//! `+ b[c]`: the result for a row never depends on how many rows the call has or where the row
//! sits, so batching never changes an image.
//!
//! The SwiGLU epilogue ([`Epilogue::SwiGlu`]) serves the FFN's fused `w1 | w3` GEMM: each panel
//! holds 24 columns of `w1` and the same 24 columns of `w3`, and the tile is written out as
//! `silu(x w1) * (x w3)`, so the 2·hidden-wide intermediate never reaches memory.

use pulp::{f32x16, f32x8, x86::V4};
use rayon::prelude::*;

use super::run;
use crate::pipeline::kernels::avx2::{self, with_scratch, LANES};

/// Rows per dense micro-kernel tile.
pub(crate) const DENSE_MR: usize = 8;
/// Vectors (of 16 floats) per tile row.
const NV: usize = 3;
/// Columns per dense panel.
pub(crate) const DENSE_NR: usize = 16 * NV;
/// Columns of each half (w1, w3) in a SwiGLU panel.
const HALF: usize = DENSE_NR / 2;

/// What a tile becomes in `y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    /// `y = x W + b`, N columns.
    Store,
    /// `y = silu(x W1) * (x W3)`, N/2 columns.
    SwiGlu,
}

/// A weight matrix in panel layout.
#[derive(Debug)]
pub(crate) struct Panels {
    k: usize,
    /// Output columns (of `y`).
    n: usize,
    panels: usize,
    /// `panels` blocks of `k * DENSE_NR` floats.
    data: Vec<f32>,
    /// Bias padded to `panels * DENSE_NR` (Store only).
    bias: Option<Vec<f32>>,
    epilogue: Epilogue,
}

impl Panels {
    /// Pack a row-major `(k, n)` matrix (the layer's weight transposed) and its bias.
    pub fn new(w: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Self {
        let panels = n.div_ceil(DENSE_NR);
        let mut data = vec![0f32; panels * k * DENSE_NR];
        for (p, panel) in data.chunks_exact_mut(k * DENSE_NR).enumerate() {
            let c0 = p * DENSE_NR;
            let cols = DENSE_NR.min(n - c0);
            for (kk, dst) in panel.chunks_exact_mut(DENSE_NR).enumerate() {
                dst[..cols].copy_from_slice(&w[kk * n + c0..kk * n + c0 + cols]);
            }
        }
        let bias = bias.map(|b| {
            let mut v = vec![0f32; panels * DENSE_NR];
            v[..n].copy_from_slice(&b[..n]);
            v
        });
        Self {
            k,
            n,
            panels,
            data,
            bias,
            epilogue: Epilogue::Store,
        }
    }

    /// Pack the FFN's gate and up projections, both row-major `(k, hidden)`, for the SwiGLU
    /// epilogue: panel `p` holds columns `24p..24p+24` of `w1`, then the same of `w3`.
    pub fn new_swiglu(w1: &[f32], w3: &[f32], k: usize, hidden: usize) -> Self {
        let panels = hidden.div_ceil(HALF);
        let mut data = vec![0f32; panels * k * DENSE_NR];
        for (p, panel) in data.chunks_exact_mut(k * DENSE_NR).enumerate() {
            let c0 = p * HALF;
            let cols = HALF.min(hidden - c0);
            for (kk, dst) in panel.chunks_exact_mut(DENSE_NR).enumerate() {
                let src = kk * hidden + c0;
                dst[..cols].copy_from_slice(&w1[src..src + cols]);
                dst[HALF..HALF + cols].copy_from_slice(&w3[src..src + cols]);
            }
        }
        Self {
            k,
            n: hidden,
            panels,
            data,
            bias: None,
            epilogue: Epilogue::SwiGlu,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the output.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `y (m x n) = epilogue(x (m x k) · W)`, `x` and `y` row-major and contiguous, on the rayon
    /// pool.
    pub fn matmul(&self, s: V4, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert!(
            x.len() >= m * k && y.len() >= m * n,
            "dense gemm: short buffers"
        );
        if m == 0 {
            return;
        }
        let micro = m.div_ceil(DENSE_MR);
        let workers = rayon::current_num_threads().clamp(1, micro);
        let per = micro.div_ceil(workers) * DENSE_MR;
        if workers == 1 {
            self.rows(s, &x[..m * k], &mut y[..m * n]);
            return;
        }
        y[..m * n]
            .par_chunks_mut(per * n)
            .zip(x[..m * k].par_chunks(per * k))
            .for_each(|(yc, xc)| self.rows(s, xc, yc));
    }

    /// One worker's rows: pack them, then every panel against every micro-panel.
    fn rows(&self, s: V4, x: &[f32], y: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        let m = x.len() / k;
        let micro = m.div_ceil(DENSE_MR);
        with_scratch(micro * k * DENSE_MR, |packed| {
            pack_rows(x, m, k, packed);
            run(
                s,
                #[inline(always)]
                || {
                    for p in 0..self.panels {
                        let panel = &self.data[p * k * DENSE_NR..(p + 1) * k * DENSE_NR];
                        for mp in 0..micro {
                            let a = &packed[mp * k * DENSE_MR..(mp + 1) * k * DENSE_MR];
                            let tile = kernel(s, a, panel);
                            let r0 = mp * DENSE_MR;
                            let rows = DENSE_MR.min(m - r0);
                            self.emit(s, &tile, p, rows, &mut y[r0 * n..(r0 + rows) * n]);
                        }
                    }
                },
            )
        });
    }

    /// Write one tile's valid rows and columns into `y` (rows of `n`). Full panels are stored
    /// vector by vector straight from the registers; only the last, partial panel of a row goes
    /// through a staging array.
    #[inline(always)]
    fn emit(&self, s: V4, tile: &[[f32x16; NV]; DENSE_MR], p: usize, rows: usize, y: &mut [f32]) {
        let n = self.n;
        match self.epilogue {
            Epilogue::Store => {
                let c0 = p * DENSE_NR;
                let cols = DENSE_NR.min(n - c0);
                let bias = self.bias.as_ref().map(|b| &b[c0..c0 + DENSE_NR]);
                for (r, acc) in tile.iter().take(rows).enumerate() {
                    // Written out, not `std::array::from_fn`: a closure that LLVM declines to
                    // inline leaves the vector intrinsics it calls out of line, outside the
                    // target-feature context (a call and a spill per vector op).
                    let mut v: [f32x16; NV] = *acc;
                    if let Some(b) = bias {
                        for (j, vj) in v.iter_mut().enumerate() {
                            *vj = s.add_f32x16(*vj, load16(b, 16 * j));
                        }
                    }
                    let dst = &mut y[r * n + c0..r * n + c0 + cols];
                    match dst.first_chunk_mut::<DENSE_NR>() {
                        Some(d) => {
                            let (d, _) = d.as_chunks_mut::<16>();
                            for j in 0..NV {
                                d[j] = pulp::cast(v[j]);
                            }
                        }
                        None => {
                            let out: [f32; DENSE_NR] = pulp::cast(v);
                            dst.copy_from_slice(&out[..cols]);
                        }
                    }
                }
            }
            Epilogue::SwiGlu => {
                let c0 = p * HALF;
                let cols = HALF.min(n - c0);
                let s3 = *s;
                for (r, acc) in tile.iter().take(rows).enumerate() {
                    // Six 8-float halves: w1 columns are halves 0..3, w3 columns halves 3..6.
                    let h: [f32x8; 2 * NV] = pulp::cast(*acc);
                    // Written out (see the Store arm): this closure once stayed out of line
                    // and took a third of a step's time in calls to `_mm256_fmadd_ps` & co.
                    let out: [f32x8; 3] = [
                        s3.mul_f32x8(avx2::silu(s3, h[0]), h[3]),
                        s3.mul_f32x8(avx2::silu(s3, h[1]), h[4]),
                        s3.mul_f32x8(avx2::silu(s3, h[2]), h[5]),
                    ];
                    let dst = &mut y[r * n + c0..r * n + c0 + cols];
                    match dst.first_chunk_mut::<HALF>() {
                        Some(d) => {
                            let (d, _) = d.as_chunks_mut::<LANES>();
                            for i in 0..3 {
                                d[i] = pulp::cast(out[i]);
                            }
                        }
                        None => {
                            let o: [f32; HALF] = pulp::cast(out);
                            dst.copy_from_slice(&o[..cols]);
                        }
                    }
                }
            }
        }
    }
}

/// Pack `m` rows of `x` (row-major, `k` wide) into `DENSE_MR`-row micro-panels stored k-major
/// (`[k][DENSE_MR]`), rows past `m` zero.
fn pack_rows(x: &[f32], m: usize, k: usize, packed: &mut [f32]) {
    for (mp, dst) in packed.chunks_exact_mut(k * DENSE_MR).enumerate() {
        let r0 = mp * DENSE_MR;
        let rows = DENSE_MR.min(m - r0);
        if rows == DENSE_MR {
            let src: [&[f32]; DENSE_MR] =
                std::array::from_fn(|r| &x[(r0 + r) * k..(r0 + r + 1) * k]);
            let (chunks, _) = dst.as_chunks_mut::<DENSE_MR>();
            for (kk, c) in chunks.iter_mut().enumerate() {
                for r in 0..DENSE_MR {
                    c[r] = src[r][kk];
                }
            }
            continue;
        }
        dst.fill(0.0);
        for r in 0..rows {
            let src = &x[(r0 + r) * k..(r0 + r + 1) * k];
            for (kk, &v) in src.iter().enumerate() {
                dst[kk * DENSE_MR + r] = v;
            }
        }
    }
}

#[inline(always)]
fn load16(src: &[f32], i: usize) -> f32x16 {
    match src[i..i + 16].first_chunk::<16>() {
        Some(a) => pulp::cast(*a),
        None => f32x16(
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ),
    }
}

/// `acc[r][j] = sum_k a[k][r] * b[k][16j..16j+16]` over the whole depth, k in order.
#[inline(always)]
pub(crate) fn kernel(s: V4, a: &[f32], b: &[f32]) -> [[f32x16; NV]; DENSE_MR] {
    let z = s.splat_f32x16(0.0);
    let mut acc = [[z; NV]; DENSE_MR];
    let (a, _) = a.as_chunks::<DENSE_MR>();
    let (b, _) = b.as_chunks::<DENSE_NR>();
    for (ak, bk) in a.iter().zip(b) {
        let (bv, _) = bk.as_chunks::<16>();
        let bv: [f32x16; NV] = [pulp::cast(bv[0]), pulp::cast(bv[1]), pulp::cast(bv[2])];
        for r in 0..DENSE_MR {
            let w = s.splat_f32x16(ak[r]);
            for j in 0..NV {
                acc[r][j] = s.mul_add_f32x16(w, bv[j], acc[r][j]);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pipeline::kernels::avx512::token_for_test;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        crate::pipeline::kernels::avx2::test_data(len, seed, 1.0)
    }

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for kk in 0..k {
                let a = x[r * k + kk] as f64;
                for c in 0..n {
                    y[r * n + c] += a * w[kk * n + c] as f64;
                }
            }
        }
        y
    }

    #[test]
    fn store_matches_a_plain_matmul() {
        let Some(s) =
            token_for_test("pipeline::kernels::avx512::dense::tests::store_matches_a_plain_matmul")
        else {
            return;
        };
        for &(m, k, n) in &[(1, 3, 5), (17, 40, 48), (29, 33, 100), (64, 528, 130)] {
            let (x, w, b) = (data(m * k, 1), data(k * n, 2), data(n, 3));
            let pw = Panels::new(&w, k, n, Some(&b));
            let mut y = vec![f32::NAN; m * n];
            pw.matmul(s, &x, m, &mut y);
            let want = reference(&x, &w, m, k, n);
            for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                let want = want + b[i % n] as f64;
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{m}x{k}x{n} [{i}]: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn swiglu_matches_silu_times_up() {
        let Some(s) =
            token_for_test("pipeline::kernels::avx512::dense::tests::swiglu_matches_silu_times_up")
        else {
            return;
        };
        let (m, k, h) = (19, 37, 53);
        let (x, w1, w3) = (data(m * k, 4), data(k * h, 5), data(k * h, 6));
        let pw = Panels::new_swiglu(&w1, &w3, k, h);
        let mut y = vec![f32::NAN; m * h];
        pw.matmul(s, &x, m, &mut y);
        let (g, u) = (reference(&x, &w1, m, k, h), reference(&x, &w3, m, k, h));
        for i in 0..m * h {
            let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            assert!(
                (y[i] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "[{i}]: {} vs {want}",
                y[i]
            );
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_batch() {
        let Some(s) = token_for_test(
            "pipeline::kernels::avx512::dense::tests::a_row_does_not_depend_on_the_batch",
        ) else {
            return;
        };
        let (k, n) = (96, 150);
        let w = data(k * n, 7);
        let pw = Panels::new(&w, k, n, None);
        let x = data(45 * k, 8);
        let mut all = vec![0f32; 45 * n];
        pw.matmul(s, &x, 45, &mut all);
        for r in [0, 7, 8, 31, 44] {
            let mut one = vec![0f32; n];
            pw.matmul(s, &x[r * k..(r + 1) * k], 1, &mut one);
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }

    /// Shapes that leave the tiles partly empty: zero rows, one row, rows around the 8-row
    /// micro-panel, k of one, n just below, at and above a 48-column panel; Store and SwiGLU.
    #[test]
    fn edge_shapes_match_a_plain_matmul() {
        let Some(s) = token_for_test(
            "pipeline::kernels::avx512::dense::tests::edge_shapes_match_a_plain_matmul",
        ) else {
            return;
        };
        for m in [0, 1, 7, 8, 9] {
            for (k, n) in [(1, 1), (5, 47), (5, 48), (5, 49), (16, 96)] {
                let (x, w) = (data(m * k, 9), data(k * n, 10));
                let mut y = vec![f32::NAN; m * n];
                Panels::new(&w, k, n, None).matmul(s, &x, m, &mut y);
                let want = reference(&x, &w, m, k, n);
                for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{m}x{k}x{n} [{i}]: {got} vs {want}"
                    );
                }
                let (w1, w3) = (data(k * n, 11), data(k * n, 12));
                let mut y = vec![f32::NAN; m * n];
                Panels::new_swiglu(&w1, &w3, k, n).matmul(s, &x, m, &mut y);
                let (g, u) = (reference(&x, &w1, m, k, n), reference(&x, &w3, m, k, n));
                for i in 0..m * n {
                    let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
                    assert!(
                        (y[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "swiglu {m}x{k}x{n} [{i}]: {} vs {want}",
                        y[i]
                    );
                }
            }
        }
    }
}
