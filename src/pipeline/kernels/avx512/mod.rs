//! The AVX-512 slice kernels (x86-64 `V4`): the dense-layer GEMM ([`dense`]) and its
//! [`DENSE_MR`](dense::DENSE_MR) x [`DENSE_NR`](dense::DENSE_NR) micro-kernel, which the CPU
//! attention kernel (`pipeline::attention`) reuses.

pub(crate) mod dense;

use pulp::x86::V4;

/// The AVX-512 token when this CPU has it and `DIFFUSIOND_DISABLE_SIMD` is not set.
pub(crate) fn token() -> Option<V4> {
    if super::detect::simd_disabled() {
        return None;
    }
    V4::try_new()
}

/// The token for test `test`, or `None` after reporting it skipped (a failure under
/// `DIFFUSIOND_REQUIRE_SIMD`).
#[cfg(test)]
pub(crate) fn token_for_test(test: &str) -> Option<V4> {
    super::detect::or_skip(token(), test, "AVX-512")
}

/// Run `f` with AVX-512 enabled for everything inlined into it (see `avx2::run`).
#[inline(always)]
pub(crate) fn run<R>(s: V4, f: impl FnMut() -> R) -> R {
    s.vectorize(super::avx2::Vectorized(f))
}
