//! Which instruction sets the slice kernels may use: runtime detection (in `avx2::token` and
//! `avx512::token`), which `DIFFUSIOND_DISABLE_SIMD=1` turns off, so the library behaves as on
//! a CPU without AVX2/AVX-512 (every layer then takes candle's ops). Tests use it to run the
//! portable paths on any machine.
//!
//! A kernel test that cannot run here says so on stderr, naming itself, and fails instead when
//! `DIFFUSIOND_REQUIRE_SIMD` is set (CI sets it on machines with AVX-512).

use std::sync::OnceLock;

/// Set (to anything but `0` or empty) to turn the SIMD kernels off.
pub const DISABLE_SIMD_VAR: &str = "DIFFUSIOND_DISABLE_SIMD";
/// Set (to anything but `0` or empty) to make a skipped kernel test fail.
pub const REQUIRE_SIMD_VAR: &str = "DIFFUSIOND_REQUIRE_SIMD";

fn flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether `DIFFUSIOND_DISABLE_SIMD` turned the kernels off (read once per process).
pub fn simd_disabled() -> bool {
    static DISABLED: OnceLock<bool> = OnceLock::new();
    *DISABLED.get_or_init(|| flag(DISABLE_SIMD_VAR))
}

/// `token`, or `None` after reporting test `test` skipped for want of `isa`.
#[cfg(test)]
pub(crate) fn or_skip<T>(token: Option<T>, test: &str, isa: &str) -> Option<T> {
    if token.is_none() {
        skipped(test, isa);
    }
    token
}

/// Report test `test` skipped for want of `isa`; panics instead under `DIFFUSIOND_REQUIRE_SIMD`.
#[cfg(test)]
pub(crate) fn skipped(test: &str, isa: &str) {
    let why = if simd_disabled() {
        format!("{DISABLE_SIMD_VAR} is set")
    } else {
        "this CPU lacks it".to_string()
    };
    let msg = format!("SKIPPED {test}: needs {isa} ({why})");
    if flag(REQUIRE_SIMD_VAR) {
        panic!("{msg}, and {REQUIRE_SIMD_VAR} is set");
    }
    // Straight to the stream, not `eprintln!`: the test harness keeps what that prints from
    // passing tests to itself.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
}
