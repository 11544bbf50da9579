//! The AVX2 + FMA slice kernels (x86-64 `V3`), and their building blocks on top of `pulp` (safe
//! SIMD): vector loads and stores from slices, `exp`/SiLU, and the register-blocked GEMM
//! micro-kernel ([`CONV_MR`] x [`CONV_NR`]) the convolutions share.
//!
//! Everything here takes a [`V3`] token, which only exists on CPUs with AVX2 + FMA; callers
//! fall back to candle's own ops when [`token`] returns `None`.

pub(crate) mod group_norm;
pub(crate) mod pointwise;
pub(crate) mod rows;
pub(crate) mod winograd;

use std::cell::RefCell;

use pulp::{f32x8, x86::V3, NullaryFnOnce, Simd};

/// Lanes in one vector.
pub(crate) const LANES: usize = 8;
/// Columns (tiles or pixels) one convolution micro-kernel call covers: two vectors.
pub(crate) const CONV_NR: usize = 2 * LANES;
/// Output channels one convolution micro-kernel call covers at most.
pub(crate) const CONV_MR: usize = 6;

/// The AVX2 + FMA token when this CPU has it and `DIFFUSIOND_DISABLE_SIMD` is not set.
pub(crate) fn token() -> Option<V3> {
    if super::detect::simd_disabled() {
        return None;
    }
    V3::try_new()
}

/// The token for test `test`, or `None` after reporting it skipped (a failure under
/// `DIFFUSIOND_REQUIRE_SIMD`).
#[cfg(test)]
pub(crate) fn token_for_test(test: &str) -> Option<V3> {
    super::detect::or_skip(token(), test, "AVX2 + FMA")
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on `len` floats of this thread's scratch buffer (contents unspecified), which is kept
/// between calls: the kernels' per-task buffers are large, and fresh ones cost page faults.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Only if a kernel task ever nested another on this thread.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Run `f` with AVX2/FMA enabled for everything inlined into it: `run(s, #[inline(always)] || ...)`.
///
/// The closure is called through `FnMut`, which (unlike pulp's `FnOnce` path) calls the
/// closure body directly with no shim in between, so the body is inlined into pulp's
/// `#[target_feature]` function. Every helper it calls must be `#[inline(always)]`.
#[inline(always)]
pub(crate) fn run<R>(s: V3, f: impl FnMut() -> R) -> R {
    s.vectorize(Vectorized(f))
}

/// A closure as pulp's `NullaryFnOnce`, for the `vectorize` of any instruction-set token.
pub(crate) struct Vectorized<F>(pub F);

impl<R, F: FnMut() -> R> NullaryFnOnce for Vectorized<F> {
    type Output = R;

    #[inline(always)]
    fn call(mut self) -> R {
        (self.0)()
    }
}

/// Load 8 floats starting at `i` (panics past the end, like indexing).
#[inline(always)]
pub(crate) fn load(s: V3, src: &[f32], i: usize) -> f32x8 {
    // The range index panics past the end; the chunk then always exists.
    match src[i..i + LANES].first_chunk::<LANES>() {
        Some(a) => pulp::cast(*a),
        None => s.splat_f32x8(f32::NAN),
    }
}

/// Store 8 floats starting at `i` (panics past the end, like indexing).
#[inline(always)]
pub(crate) fn store(dst: &mut [f32], i: usize, v: f32x8) {
    if let Some(d) = dst[i..i + LANES].first_chunk_mut::<LANES>() {
        *d = pulp::cast(v);
    }
}

/// `ln 2` split in two for an exact range reduction `r = x - n ln2`.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf` polynomial in `r`, highest degree first.
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// Inputs are clamped to this range (outside it `expf` under- or overflows).
pub(crate) const EXP_RANGE: (f32, f32) = (-87.3, 88.7);

/// Deterministic test inputs in `[-scale, scale)`.
#[cfg(test)]
pub(crate) fn test_data(len: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let u = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000;
            (u as f32 / 500.0 - 1.0) * scale
        })
        .collect()
}

/// `exp(x)` to about 1 ulp (Cephes `expf` polynomial, FMA Horner, 2^n by exponent bits).
#[inline(always)]
pub(crate) fn exp(s: V3, x: f32x8) -> f32x8 {
    let x = s.min_f32s(
        s.max_f32s(x, s.splat_f32x8(EXP_RANGE.0)),
        s.splat_f32x8(EXP_RANGE.1),
    );
    let n = s.round_f32x8(s.mul_f32s(x, s.splat_f32x8(std::f32::consts::LOG2_E)));
    let r = s.mul_add_f32x8(n, s.splat_f32x8(-LN2_HI), x);
    let r = s.mul_add_f32x8(n, s.splat_f32x8(-LN2_LO), r);
    let mut p = s.splat_f32x8(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = s.mul_add_f32x8(p, r, s.splat_f32x8(*c));
    }
    let r2 = s.mul_f32s(r, r);
    let y = s.add_f32s(s.mul_add_f32x8(p, r2, r), s.splat_f32x8(1.0));
    let e = s.add_i32s(s.convert_f32x8_to_i32x8(n), s.splat_i32x8(127));
    let scale: f32x8 = pulp::cast(s.shl_const_i32x8::<23>(e));
    s.mul_f32s(y, scale)
}

/// SiLU as candle and torch write it: `x / (1 + exp(-x))`.
#[inline(always)]
pub(crate) fn silu(s: V3, x: f32x8) -> f32x8 {
    let d = s.add_f32s(s.splat_f32x8(1.0), exp(s, s.neg_f32s(x)));
    s.div_f32s(x, d)
}

/// Scalar SiLU for tails, the same formula.
#[inline(always)]
pub(crate) fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `dst[i] = act(src[i] * scale + shift)` (`act` = SiLU or identity).
#[inline(always)]
pub(crate) fn affine_act(s: V3, src: &[f32], dst: &mut [f32], scale: f32, shift: f32, act: bool) {
    let n = src.len().min(dst.len());
    let (sc, sh) = (s.splat_f32x8(scale), s.splat_f32x8(shift));
    let mut i = 0;
    while i + LANES <= n {
        let v = s.mul_add_f32x8(load(s, src, i), sc, sh);
        store(dst, i, if act { silu(s, v) } else { v });
        i += LANES;
    }
    for (d, &x) in dst[i..n].iter_mut().zip(&src[i..n]) {
        let v = x.mul_add(scale, shift);
        *d = if act { silu_scalar(v) } else { v };
    }
}

/// The micro-kernel: `acc[c][j] = sum_k a[k * CB + c] * b[k * CONV_NR + j * 8 .. +8]` for
/// `k < depth`, i.e. a `CB x depth` block of weights (packed k-major) times a packed
/// `depth x 16` panel. Accumulation runs over `k` in order, so the result for one output does
/// not depend on anything but its own inputs.
#[inline(always)]
pub(crate) fn microkernel<const CB: usize>(
    s: V3,
    a: &[f32],
    b: &[f32],
    depth: usize,
) -> [[f32x8; 2]; CB] {
    let z = s.splat_f32x8(0.0);
    let mut acc = [[z; 2]; CB];
    for (ak, bk) in a[..depth * CB]
        .chunks_exact(CB)
        .zip(b[..depth * CONV_NR].chunks_exact(CONV_NR))
    {
        let v0 = load(s, bk, 0);
        let v1 = load(s, bk, LANES);
        for c in 0..CB {
            let w = s.splat_f32x8(ak[c]);
            acc[c][0] = s.mul_add_f32x8(w, v0, acc[c][0]);
            acc[c][1] = s.mul_add_f32x8(w, v1, acc[c][1]);
        }
    }
    acc
}

/// Run the micro-kernel for a block of `cb` (1..=CONV_MR) output channels and hand each channel's
/// 16 results to `put(c, [f32; 16])`.
#[inline(always)]
pub(crate) fn microkernel_dyn(
    s: V3,
    cb: usize,
    a: &[f32],
    b: &[f32],
    depth: usize,
    mut put: impl FnMut(usize, [f32; CONV_NR]),
) {
    #[inline(always)]
    fn emit<const CB: usize>(acc: [[f32x8; 2]; CB], put: &mut impl FnMut(usize, [f32; CONV_NR])) {
        for (c, pair) in acc.iter().enumerate() {
            let lo: [f32; LANES] = pulp::cast(pair[0]);
            let hi: [f32; LANES] = pulp::cast(pair[1]);
            let mut out = [0f32; CONV_NR];
            out[..LANES].copy_from_slice(&lo);
            out[LANES..].copy_from_slice(&hi);
            put(c, out);
        }
    }
    match cb {
        6 => emit(microkernel::<6>(s, a, b, depth), &mut put),
        5 => emit(microkernel::<5>(s, a, b, depth), &mut put),
        4 => emit(microkernel::<4>(s, a, b, depth), &mut put),
        3 => emit(microkernel::<3>(s, a, b, depth), &mut put),
        2 => emit(microkernel::<2>(s, a, b, depth), &mut put),
        _ => emit(microkernel::<1>(s, a, b, depth), &mut put),
    }
}

/// Pack a row-major `(cout, depth)` weight matrix into `CONV_MR`-row blocks, each stored k-major
/// (`[k][c]`), the layout [`microkernel`] reads. Block `i` starts at `i * CONV_MR * depth`.
pub(crate) fn pack_weight_blocks(w: &[f32], cout: usize, depth: usize) -> Vec<f32> {
    let mut out = vec![0f32; cout * depth];
    for b0 in (0..cout).step_by(CONV_MR) {
        let cb = CONV_MR.min(cout - b0);
        let blk = &mut out[b0 * depth..(b0 + cb) * depth];
        for c in 0..cb {
            for k in 0..depth {
                blk[k * cb + c] = w[(b0 + c) * depth + k];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn exp_and_silu_match_std() {
        let Some(s) = token_for_test("pipeline::kernels::avx2::tests::exp_and_silu_match_std")
        else {
            return;
        };
        let mut worst_exp = 0f32;
        let mut worst_silu = 0f32;
        let mut x = -90.0f32;
        while x < 90.0 {
            let xs: [f32; LANES] = std::array::from_fn(|i| x + i as f32 * 0.0137);
            let e: [f32; LANES] = pulp::cast(run(
                s,
                #[inline(always)]
                || exp(s, pulp::cast(xs)),
            ));
            let y: [f32; LANES] = pulp::cast(run(
                s,
                #[inline(always)]
                || silu(s, pulp::cast(xs)),
            ));
            for i in 0..LANES {
                let want = xs[i].exp();
                if want > 1e-37 && want < 1e38 {
                    worst_exp = worst_exp.max(((e[i] - want) / want).abs());
                }
                let ws = silu_scalar(xs[i]);
                worst_silu = worst_silu.max((y[i] - ws).abs() / ws.abs().max(1e-30));
            }
            x += 0.0137 * LANES as f32;
        }
        assert!(worst_exp < 3e-7, "exp rel err {worst_exp}");
        assert!(worst_silu < 5e-7, "silu rel err {worst_silu}");
    }

    #[test]
    fn microkernel_is_a_gemm() {
        let Some(s) = token_for_test("pipeline::kernels::avx2::tests::microkernel_is_a_gemm")
        else {
            return;
        };
        let (cout, depth) = (11, 13);
        let w: Vec<f32> = (0..cout * depth).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..depth * CONV_NR).map(|i| (i % 5) as f32 * 0.5).collect();
        let packed = pack_weight_blocks(&w, cout, depth);
        let mut got = vec![0f32; cout * CONV_NR];
        for b0 in (0..cout).step_by(CONV_MR) {
            let cb = CONV_MR.min(cout - b0);
            let a = &packed[b0 * depth..(b0 + cb) * depth];
            run(
                s,
                #[inline(always)]
                || {
                    microkernel_dyn(s, cb, a, &b, depth, |c, v| {
                        got[(b0 + c) * CONV_NR..(b0 + c + 1) * CONV_NR].copy_from_slice(&v)
                    })
                },
            );
        }
        for co in 0..cout {
            for j in 0..CONV_NR {
                let want: f32 = (0..depth)
                    .map(|k| w[co * depth + k] * b[k * CONV_NR + j])
                    .sum();
                assert_eq!(got[co * CONV_NR + j], want, "co {co} j {j}");
            }
        }
    }
}
