//! End to end with GGUF weights: the real binary serving FLUX.2 [klein] with its transformer from
//! a GGUF file given as `--weights flux2-klein.transformer=FILE.gguf` (BFL names, Q8_0 blocks).
//! A file whose weights drive the latents to NaN answers 500 `generation_failed` and charges
//! nothing, instead of returning a flat image; the server keeps serving.
#![allow(clippy::unwrap_used)]

mod gguf_support;
mod server_support;

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use serde_json::json;
use server_support::{tiny_flux2_model, Workspace};

/// The tiny FLUX.2 transformer as a BFL-named GGUF (Q8_0 blocks), with one NaN weight in the
/// output projection when `poison`.
fn flux2_gguf(path: &Path, poison: bool) {
    let mut ts = gguf_support::read_component(&tiny_flux2_model().join("transformer"));
    if poison {
        let w = &ts["proj_out.weight"];
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[3] = f32::NAN;
        let t = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
        ts.insert("proj_out.weight".into(), t);
    }
    let ty = |n: &str, s: &[usize]| {
        if s.len() < 2 {
            GgmlDType::F32
        } else if n.contains("blocks.") && s[1].is_multiple_of(32) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::BF16
        }
    };
    gguf_support::write(path, &[], &gguf_support::flux2_entries(&ts, &ty));
}

#[test]
fn a_gguf_transformer_serves_and_non_finite_latents_charge_nothing() {
    let ws = Workspace::new();
    let good = ws.dir.path().join("klein-q8.gguf");
    flux2_gguf(&good, false);
    let bad = ws.dir.path().join("klein-nan.gguf");
    flux2_gguf(&bad, true);
    let body = json!({"prompt": "a cat", "model": "flux-2-pro"}).to_string();

    let server = ws.serve(&[
        "--auth",
        "keys",
        "--weights",
        &format!("flux2-klein.transformer={}", good.display()),
    ]);
    let key = ws.create_key(1000, None);
    server.post(&body, Some(&key)).success();
    let (after_good, _) = ws.balance_and_used(&key);
    assert!(after_good < 1000, "a generation was charged");
    drop(server);

    let server = ws.serve(&[
        "--auth",
        "keys",
        "--weights",
        &format!("flux2-klein.transformer={}", bad.display()),
    ]);
    let r = server.post(&body, Some(&key));
    assert_eq!(r.status, 500);
    assert_eq!(r.error_code(), "generation_failed");
    assert_eq!(
        ws.balance_and_used(&key).0,
        after_good,
        "a failed generation was charged"
    );
    // The server keeps serving the other pipeline.
    let z = json!({"prompt": "a cat", "model": "z-image-turbo"}).to_string();
    server.post(&z, Some(&key)).success();
}
