//! The tests `scripts/gpu-check` runs on a GPU, built into one binary (one file to carry to the
//! GPU machine): the reference parity cases, batching invariance (both families and through the
//! scheduler), FLUX.2's batching properties, and flash attention against the generic path. The
//! first three are the other test files themselves, included here; `cargo test` runs them there
//! (this target has `test = false`), on the CPU in f32. `DIFFUSIOND_TEST_DEVICE` /
//! `DIFFUSIOND_TEST_DTYPE` choose where they run (see `common`).
#![allow(clippy::unwrap_used)]

#[path = "batching_invariance.rs"]
mod batching_invariance;
mod common;
#[path = "flux2_batching.rs"]
mod flux2_batching;
#[path = "reference_parity.rs"]
mod reference_parity;

use candle_core::{DType, Tensor};
use diffusiond::pipeline::attention;

/// Largest absolute difference (f32) of two tensors on any device.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs(a, b)
}

/// Flash attention against the generic path on the same inputs: items of the full length
/// (`flash_attn`), items of different lengths (`flash_attn_varlen`), grouped-query heads, and the
/// Z-Image / FLUX.2 head size 128. Both are compared with an f32 computation of the same bf16
/// inputs. Tolerance: the generic path rounds the probabilities and the output to bf16 (2^-9
/// relative each) on outputs of magnitude < 1; flash keeps the probabilities in f32, so it must
/// be at least as close to f32 as the generic path, plus one output rounding.
#[test]
fn flash_attention_matches_the_generic_path() {
    let dev = common::test_device();
    if !attention::FLASH_BUILT || !dev.is_cuda() {
        eprintln!(
            "SKIPPED flash_attention_matches_the_generic_path: needs a CUDA device and a build \
             with --features flash-attn"
        );
        assert!(
            std::env::var_os("DIFFUSIOND_REQUIRE_FLASH").is_none(),
            "DIFFUSIOND_REQUIRE_FLASH is set but flash attention cannot run here"
        );
        return;
    }
    let cases: [(usize, usize, usize, usize, usize, Option<Vec<usize>>); 4] = [
        (1, 30, 30, 4128, 128, None),
        (3, 24, 24, 1024, 128, None),
        (3, 4, 2, 300, 64, Some(vec![300, 171, 64])),
        (2, 8, 8, 1100, 128, Some(vec![1100, 1056])),
    ];
    for (b, h, hkv, s, d, lens) in cases {
        let q = Tensor::randn(0f32, 1.0, (b, h, s, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, hkv, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, hkv, s, d), &dev).unwrap();
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let (qh, kh, vh) = (half(&q), half(&k), half(&v));
        // f32 of the same rounded inputs: the reference both are measured against.
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let exact = attention::without_flash(&f(&qh), &f(&kh), &f(&vh), lens.as_deref()).unwrap();
        let flash = attention::attention(&qh, &kh, &vh, lens.as_deref()).unwrap();
        let generic = attention::without_flash(&qh, &kh, &vh, lens.as_deref()).unwrap();
        let (e_flash, e_generic) = (max_diff(&flash, &exact), max_diff(&generic, &exact));
        let e_between = max_diff(&flash, &generic);
        println!(
            "attention b={b} h={h} hkv={hkv} s={s} d={d} lens={lens:?}: flash-f32 {e_flash:.2e}, \
             generic-f32 {e_generic:.2e}, flash-generic {e_between:.2e}"
        );
        assert!(
            e_flash <= e_generic + 4e-3,
            "flash is further from f32 ({e_flash}) than the generic path ({e_generic})"
        );
        assert!(e_between <= 2e-2, "flash and generic differ by {e_between}");
    }
}
