//! GGUF weights and `--quantize`, on the tiny reference models (`$DIFFUSIOND_REFERENCE`).
//!
//! The files are written by the tests (tests/gguf_support) in the published naming and type
//! mix: Z-Image in the lumina2 names with q|k|v fused and pad tokens as `[dim]`, 1-D tensors
//! F32, embedders/refiners/final layer BF16, the main layers in the type under test (`w2` one
//! type up, rows that are not whole blocks in F16); Qwen3 in llama.cpp's names; FLUX.2 in the
//! BFL names. Each quantized run is compared stage by stage with the same computation on the
//! dequantized weights (a full-precision checkout holding exactly the values the file
//! decodes to), and its image with the full-precision image (PSNR). The tolerances are the
//! measured errors with headroom (README, "Quantized weights").
#![allow(clippy::unwrap_used)]

mod common;
mod gguf_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use diffusiond::pipeline::denoise::{self, GenerateSpec};
use diffusiond::pipeline::quant::gguf::MetaValue;
use diffusiond::pipeline::sampler::Guidance;
use diffusiond::pipeline::z_image::transformer::ItemInput;
use diffusiond::pipeline::{
    ComponentSource, Family, LoadOptions, ModelFiles, PipelineError, WeightSource, ZImage,
};
use gguf_support as gs;
use rand::SeedableRng;

const PROMPT: &str = "a red fox sitting in the snow";

/// One type under test: the base type of the main layers, the largest relative error of a
/// transformer evaluation and of the final latents against the dequantized weights, and the
/// least PSNR of the image against the full-precision image.
struct TypeCase {
    label: &'static str,
    ty: GgmlDType,
    max_rel_eval: f32,
    max_rel_latent: f32,
    min_psnr_vs_dequant: f64,
    min_psnr_vs_full: f64,
}

fn cases() -> Vec<TypeCase> {
    let c = |label, ty, e, l, pd, pf| TypeCase {
        label,
        ty,
        max_rel_eval: e,
        max_rel_latent: l,
        min_psnr_vs_dequant: pd,
        min_psnr_vs_full: pf,
    };
    // Measured (AMD EPYC Zen 4): eval rel <= 8e-3, latents rel <= 2e-3, PSNR vs the
    // dequantized weights >= 57.6 dB for every type; vs full precision below.
    vec![
        c("Q8_0", GgmlDType::Q8_0, 2e-2, 5e-3, 50.0, 50.0), // 54.9 dB
        c("Q6_K", GgmlDType::Q6K, 2e-2, 5e-3, 50.0, 50.0),  // 54.4 (w2 only)
        c("Q5_K", GgmlDType::Q5K, 2e-2, 5e-3, 50.0, 50.0),  // 54.4 (w2 only, as Q6_K)
        c("Q4_K", GgmlDType::Q4K, 2e-2, 5e-3, 50.0, 50.0),  // 54.4 (w2 only, as Q6_K)
        c("Q4_0", GgmlDType::Q4_0, 2e-2, 5e-3, 50.0, 35.0), // 38.7
        c("F16", GgmlDType::F16, 1e-6, 1e-6, 99.0, 50.0),   // 56.7 (exact vs dequantized)
        c("BF16", GgmlDType::BF16, 1e-6, 1e-6, 99.0, 50.0), // 56.7
    ]
}

/// The block-quantized types on the block-aligned model, where each reaches every main layer.
fn aligned_cases() -> Vec<TypeCase> {
    let c = |label, ty, pf| TypeCase {
        label,
        ty,
        max_rel_eval: 2e-2,
        max_rel_latent: 5e-3,
        min_psnr_vs_dequant: 50.0,
        min_psnr_vs_full: pf,
    };
    // Measured vs full precision (deterministic weights): 56.1, 52.0, 49.4, 44.1, 41.9 dB.
    vec![
        c("Q8_0", GgmlDType::Q8_0, 53.0),
        c("Q6_K", GgmlDType::Q6K, 49.0),
        c("Q5_K", GgmlDType::Q5K, 46.0),
        c("Q4_K", GgmlDType::Q4K, 41.0),
        c("Q4_0", GgmlDType::Q4_0, 39.0),
    ]
}

fn tiny() -> PathBuf {
    common::tiny_dir()
}

fn spec(seeds: Vec<u64>) -> GenerateSpec {
    GenerateSpec {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        seeds,
        steps: 8,
        guidance: Guidance::none(),
    }
}

fn load(dir: &Path, components: &[(&str, &Path)]) -> Result<ZImage, PipelineError> {
    let files = ModelFiles::open(&WeightSource::Local(dir.to_path_buf()))?;
    let mut opts = LoadOptions::new(Device::Cpu, DType::F32);
    for (c, p) in components {
        opts.components
            .insert(c.to_string(), ComponentSource::Local(p.to_path_buf()));
    }
    ZImage::load_opts(&files, &opts)
}

/// The tiny transformer as a GGUF of `base` (published mix) and as the dequantized checkout.
fn z_image_files(dir: &Path, base: GgmlDType) -> (PathBuf, PathBuf) {
    z_image_files_of(&tiny(), dir, base)
}

/// A checkout's transformer as a GGUF of `base` (published mix) and as the dequantized checkout.
fn z_image_files_of(model: &Path, dir: &Path, base: GgmlDType) -> (PathBuf, PathBuf) {
    let ts = gs::read_component(&model.join("transformer"));
    let ty = |n: &str, s: &[usize]| gs::z_image_type(n, s, base);
    let gguf = dir.join("transformer.gguf");
    gs::write(&gguf, &[], &gs::z_image_entries(&ts, &ty));
    let deq: HashMap<String, Tensor> = ts
        .iter()
        .map(|(n, t)| (n.clone(), gs::round_trip(t, ty(n, t.dims()))))
        .collect();
    let ckpt = gs::checkout_with(
        model,
        &dir.join("dequantized"),
        "transformer",
        "diffusion_pytorch_model",
        &deq,
        None,
    );
    (gguf, ckpt)
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let m = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    common::max_abs(a, b) / m.max(1e-12)
}

/// Final latents of one image (seed 7), stepping the loop by hand.
fn final_latent(m: &ZImage) -> Tensor {
    let s = spec(vec![7]);
    let cond = denoise::condition(m, &s).unwrap();
    let mut items = denoise::items(m, &s, &cond).unwrap();
    while !items[0].is_done() {
        let mut refs: Vec<_> = items.iter_mut().collect();
        denoise::step(m, &mut refs).unwrap();
    }
    items[0].latent().clone()
}

fn image(m: &ZImage, seeds: Vec<u64>) -> Vec<Vec<u8>> {
    denoise::generate(m, &spec(seeds), |_, _| {})
        .unwrap()
        .into_iter()
        .map(|i| i.data)
        .collect()
}

/// Per type: stage-by-stage agreement of the GGUF model with the dequantized weights, and the
/// image's PSNR against full precision; prints the measured table. Returns the labels outside
/// their tolerances.
fn per_stage(model: &Path, cases: &[TypeCase]) -> Vec<&'static str> {
    let full = common::load(model.to_path_buf());
    let full_img = image(&full, vec![7]);
    let caption = full.encode_prompt(PROMPT).unwrap();
    let latent = full.initial_latent(7, 64, 64).unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let tmp = tempfile::tempdir().unwrap();
        let (gguf, deq_dir) = z_image_files_of(model, tmp.path(), case.ty);
        let q = load(model, &[("transformer", &gguf)]).unwrap();
        let d = common::load(deq_dir);
        // Stage 1: the refined caption (context refiner: BF16 in the file, dense in both).
        let (cq, cd) = (
            q.refine_caption(&caption).unwrap(),
            d.refine_caption(&caption).unwrap(),
        );
        let e_cap = rel(&cq, &cd);
        // Stage 2: one transformer evaluation at two times.
        let mut e_eval = 0f32;
        for t in [0.0, 0.6] {
            let eval = |m: &ZImage, c: &Tensor| {
                m.transformer_forward(&[ItemInput {
                    latent: &latent,
                    caption: c,
                    t,
                }])
                .unwrap()
                .remove(0)
            };
            e_eval = e_eval.max(rel(&eval(&q, &cq), &eval(&d, &cd)));
        }
        // Stage 3: the latents after all 8 steps; stage 4: the image.
        let e_lat = rel(&final_latent(&q), &final_latent(&d));
        let img_q = image(&q, vec![7]);
        let img_d = image(&d, vec![7]);
        let p_deq = gs::psnr(&img_q[0], &img_d[0]);
        let p_full = gs::psnr(&img_q[0], &full_img[0]);
        let p_deq_full = gs::psnr(&img_d[0], &full_img[0]);
        eprintln!(
            "{:5}: caption rel {e_cap:.2e}, eval rel {e_eval:.2e}, latents rel {e_lat:.2e}, \
             PSNR vs dequantized {p_deq:.1} dB, vs full precision {p_full:.1} dB \
             (dequantized vs full {p_deq_full:.1} dB)",
            case.label
        );
        if e_cap > 1e-6
            || e_eval > case.max_rel_eval
            || e_lat > case.max_rel_latent
            || p_deq < case.min_psnr_vs_dequant
            || p_full < case.min_psnr_vs_full
        {
            failures.push(case.label);
        }
    }
    failures
}

/// The tiny reference model (dim 96): Q8_0/Q4_0 reach every main layer; the K-quants only
/// `w2` (the other rows are 96 wide, not whole 256-blocks: F16 as llama.cpp falls back).
#[test]
fn z_image_gguf_agrees_with_dequantized_weights_per_stage() {
    let failures = per_stage(&tiny(), &cases());
    assert!(failures.is_empty(), "outside the tolerances: {failures:?}");
}

/// A standard normal value (Box-Muller), deterministic from the seed.
fn normal(rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
    use rand::Rng;
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// A random Z-Image transformer whose every row is whole blocks of every type (dim 768, 12
/// heads, FFN 2048, 1 main layer, 1 + 1 refiners; each tensor drawn with the mean and spread
/// of the tiny model's tensor of the same name), beside the tiny text encoder and VAE: every
/// type reaches every main layer.
fn aligned_model(dir: &Path) -> PathBuf {
    let tiny_ts = gs::read_component(&tiny().join("transformer"));
    let (d, a, f, hd, patch, cap) = (768usize, 256usize, 2048usize, 64usize, 64usize, 64usize);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("t_embedder.mlp.0.weight".into(), vec![1024, 256]),
        ("t_embedder.mlp.0.bias".into(), vec![1024]),
        ("t_embedder.mlp.2.weight".into(), vec![a, 1024]),
        ("t_embedder.mlp.2.bias".into(), vec![a]),
        ("cap_embedder.0.weight".into(), vec![cap]),
        ("cap_embedder.1.weight".into(), vec![d, cap]),
        ("cap_embedder.1.bias".into(), vec![d]),
        ("all_x_embedder.2-1.weight".into(), vec![d, patch]),
        ("all_x_embedder.2-1.bias".into(), vec![d]),
        ("all_final_layer.2-1.linear.weight".into(), vec![patch, d]),
        ("all_final_layer.2-1.linear.bias".into(), vec![patch]),
        (
            "all_final_layer.2-1.adaLN_modulation.1.weight".into(),
            vec![d, a],
        ),
        (
            "all_final_layer.2-1.adaLN_modulation.1.bias".into(),
            vec![d],
        ),
        ("x_pad_token".into(), vec![1, d]),
        ("cap_pad_token".into(), vec![1, d]),
    ];
    for (block, modulated) in [
        ("noise_refiner.0", true),
        ("context_refiner.0", false),
        ("layers.0", true),
    ] {
        for (n, sh) in [
            ("attention.to_q.weight", vec![d, d]),
            ("attention.to_k.weight", vec![d, d]),
            ("attention.to_v.weight", vec![d, d]),
            ("attention.to_out.0.weight", vec![d, d]),
            ("attention.norm_q.weight", vec![hd]),
            ("attention.norm_k.weight", vec![hd]),
            ("feed_forward.w1.weight", vec![f, d]),
            ("feed_forward.w2.weight", vec![d, f]),
            ("feed_forward.w3.weight", vec![f, d]),
            ("attention_norm1.weight", vec![d]),
            ("attention_norm2.weight", vec![d]),
            ("ffn_norm1.weight", vec![d]),
            ("ffn_norm2.weight", vec![d]),
        ] {
            shapes.push((format!("{block}.{n}"), sh));
        }
        if modulated {
            shapes.push((format!("{block}.adaLN_modulation.0.weight"), vec![4 * d, a]));
            shapes.push((format!("{block}.adaLN_modulation.0.bias"), vec![4 * d]));
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let ts: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(n, sh)| {
            let like = &tiny_ts[&n];
            let mean = like.mean_all().unwrap().to_scalar::<f32>().unwrap();
            let std = (like.broadcast_sub(&like.mean_all().unwrap()).unwrap())
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            // The spread of a wider layer's weights shrinks with its fan-in, as at init.
            let fan = |s: &[usize]| if s.len() == 2 { s[1] as f32 } else { 1.0 };
            let std = std * (fan(like.dims()) / fan(&sh)).sqrt();
            let n_el: usize = sh.iter().product();
            let v: Vec<f32> = (0..n_el).map(|_| mean + std * normal(&mut rng)).collect();
            (n, Tensor::from_vec(v, sh.as_slice(), &Device::Cpu).unwrap())
        })
        .collect();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny().join("transformer/config.json")).unwrap(),
    )
    .unwrap();
    cfg["dim"] = serde_json::json!(d);
    cfg["n_heads"] = serde_json::json!(12);
    cfg["n_kv_heads"] = serde_json::json!(12);
    cfg["axes_dims"] = serde_json::json!([16, 24, 24]);
    cfg["n_layers"] = serde_json::json!(1);
    let out = gs::checkout_with(
        &tiny(),
        &dir.join("aligned"),
        "transformer",
        "diffusion_pytorch_model",
        &ts,
        None,
    );
    std::fs::write(out.join("transformer/config.json"), cfg.to_string()).unwrap();
    out
}

/// Every type on the aligned model.
#[test]
fn z_image_gguf_per_stage_on_a_block_aligned_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = aligned_model(tmp.path());
    let aligned: Vec<TypeCase> = aligned_cases();
    let failures = per_stage(&model, &aligned);
    assert!(failures.is_empty(), "outside the tolerances: {failures:?}");
}

/// Batching stays bit-exact with quantized weights: two images together equal each alone.
#[test]
fn batching_is_bit_exact_with_quantized_weights() {
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
        let tmp = tempfile::tempdir().unwrap();
        let (gguf, _) = z_image_files(tmp.path(), ty);
        let q = load(&tiny(), &[("transformer", &gguf)]).unwrap();
        let together = image(&q, vec![3, 4]);
        let alone = [image(&q, vec![3]), image(&q, vec![4])];
        assert!(
            together[0] == alone[0][0],
            "{ty:?}: image 0 differs in a batch"
        );
        assert!(
            together[1] == alone[1][0],
            "{ty:?}: image 1 differs in a batch"
        );
    }
}

/// Latents that turn non-finite fail the generation instead of decoding to a flat image.
#[test]
fn non_finite_latents_fail_the_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ts = gs::read_component(&tiny().join("transformer"));
    let w = &ts["all_final_layer.2-1.linear.weight"];
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[5] = f32::NAN;
    let poisoned = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
    ts.insert("all_final_layer.2-1.linear.weight".into(), poisoned);
    let ty = |n: &str, s: &[usize]| gs::z_image_type(n, s, GgmlDType::Q8_0);
    let gguf = tmp.path().join("nan.gguf");
    gs::write(&gguf, &[], &gs::z_image_entries(&ts, &ty));
    let q = load(&tiny(), &[("transformer", &gguf)]).unwrap();
    match denoise::generate(&q, &spec(vec![1]), |_, _| {}) {
        Err(PipelineError::NonFinite(msg)) => assert!(msg.contains("not finite"), "{msg}"),
        Err(e) => panic!("expected a non-finite error, got {e}"),
        Ok(_) => panic!("a NaN weight produced an image"),
    }
}

fn load_err(components: &[(&str, &Path)]) -> String {
    match load(&tiny(), components) {
        Ok(_) => panic!("loaded a bad file"),
        Err(e) => e.to_string(),
    }
}

/// Bad files give one clear error naming the problem.
#[test]
fn bad_files_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (gguf, _) = z_image_files(tmp.path(), GgmlDType::Q8_0);
    let bytes = std::fs::read(&gguf).unwrap();

    // Truncated download.
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = load_err(&[("transformer", &cut)]);
    assert!(e.contains("truncated") && e.contains("cut.gguf"), "{e}");

    // A type candle cannot run (IQ4_XS = 23): patch the first Q8_0 (8) tensor's type code.
    let ts = gs::read_component(&tiny().join("transformer"));
    let ty = |n: &str, s: &[usize]| gs::z_image_type(n, s, GgmlDType::Q8_0);
    let entries = gs::z_image_entries(&ts, &ty);
    let (name, dims) = entries
        .iter()
        .find(|e| e.3 == GgmlDType::Q8_0)
        .map(|e| (e.0.clone(), e.1.len()))
        .unwrap();
    let mut patched = bytes.clone();
    let needle = name.as_bytes();
    let at = patched
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    let type_at = at + needle.len() + 4 + 8 * dims;
    assert_eq!(patched[type_at], 8, "type code position");
    patched[type_at] = 23;
    let iq = tmp.path().join("iq.gguf");
    std::fs::write(&iq, &patched).unwrap();
    let e = load_err(&[("transformer", &iq)]);
    assert!(e.contains("IQ4_XS") && e.contains(&name), "{e}");

    // A missing tensor.
    let missing: Vec<_> = entries
        .iter()
        .filter(|e| e.0 != "layers.1.feed_forward.w2.weight")
        .cloned()
        .collect();
    let p = tmp.path().join("missing.gguf");
    gs::write(&p, &[], &missing);
    let e = load_err(&[("transformer", &p)]);
    assert!(e.contains("layers.1.feed_forward.w2.weight"), "{e}");

    // A tensor of the wrong shape (the w2 of a wider model).
    let mut wrong = entries.clone();
    let w2 = wrong
        .iter_mut()
        .find(|e| e.0 == "layers.0.feed_forward.w2.weight")
        .unwrap();
    w2.1 = vec![w2.1[0] * 2, w2.1[1] / 2];
    let p = tmp.path().join("wrong.gguf");
    gs::write(&p, &[], &wrong);
    let e = load_err(&[("transformer", &p)]);
    assert!(
        e.contains("layers.0.feed_forward.w2.weight") && e.contains("shape"),
        "{e}"
    );

    // Not a GGUF file at all.
    let p = tmp.path().join("not.gguf");
    std::fs::write(&p, b"safetensors?").unwrap();
    let e = load_err(&[("transformer", &p)]);
    assert!(e.contains("not a GGUF file"), "{e}");
}

/// `--quantize` at load: the block matrices of the main layers are quantized, everything else
/// stays; the result equals the published-mix file of the same type computed the same way.
#[test]
fn quantize_at_load_matches_the_dequantized_weights() {
    let files = ModelFiles::open(&WeightSource::Local(tiny())).unwrap();
    let mut opts = LoadOptions::new(Device::Cpu, DType::F32);
    opts.quantize
        .insert("transformer".into(), "q8_0".parse().unwrap());
    let q = ZImage::load_opts(&files, &opts).unwrap();
    let full = common::load(tiny());
    assert!(
        q.weight_bytes() < full.weight_bytes(),
        "{} vs {}",
        q.weight_bytes(),
        full.weight_bytes()
    );
    // The same selection, dequantized.
    let ts = gs::read_component(&tiny().join("transformer"));
    let deq: HashMap<String, Tensor> = ts
        .iter()
        .map(|(n, t)| {
            let quantized = t.dims().len() == 2
                && diffusiond::pipeline::quant::quantized_by_default(n)
                && t.dims()[1].is_multiple_of(32);
            let v = if quantized {
                gs::round_trip(t, GgmlDType::Q8_0)
            } else {
                t.clone()
            };
            (n.clone(), v)
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let d = common::load(gs::checkout_with(
        &tiny(),
        &tmp.path().join("deq"),
        "transformer",
        "diffusion_pytorch_model",
        &deq,
        None,
    ));
    let e = rel(&final_latent(&q), &final_latent(&d));
    eprintln!("--quantize q8_0: latents rel {e:.2e}");
    assert!(e < 0.05, "{e}");
    // Quantized weights change the result at all (the test is not vacuous).
    assert!(rel(&final_latent(&q), &final_latent(&full)) > 0.0);
}

/// The text encoder from a llama.cpp-named Qwen3 GGUF: its hidden states agree with the
/// dequantized weights, and `rope.freq_base` comes from the file.
#[test]
fn qwen3_gguf_agrees_and_reads_its_rope_base() {
    let ts = gs::read_component(&tiny().join("text_encoder"));
    let tmp = tempfile::tempdir().unwrap();
    let q8 = |n: &str, s: &[usize]| {
        if s.len() == 2 && n.contains(".layers.") && s[1].is_multiple_of(32) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    };
    let f32 = |_: &str, _: &[usize]| GgmlDType::F32;
    let write = |name: &str, freq: f64, ty: &dyn Fn(&str, &[usize]) -> GgmlDType| {
        let p = tmp.path().join(name);
        gs::write(
            &p,
            &[
                ("general.architecture", MetaValue::Str("qwen3".into())),
                ("qwen3.rope.freq_base", MetaValue::Float(freq)),
            ],
            &gs::qwen3_entries(&ts, ty),
        );
        p
    };
    let deq = |ty: &dyn Fn(&str, &[usize]) -> GgmlDType, freq: f64, name: &str| {
        let t: HashMap<String, Tensor> = ts
            .iter()
            .map(|(n, t)| (n.clone(), gs::round_trip(t, ty(n, t.dims()))))
            .collect();
        common::load(gs::checkout_with(
            &tiny(),
            &tmp.path().join(name),
            "text_encoder",
            "model",
            &t,
            Some(("rope_theta", serde_json::json!(freq))),
        ))
    };
    let states = |m: &ZImage| {
        let ids = m.tokenize(PROMPT).unwrap();
        m.text_hidden_states(&ids).unwrap()
    };
    let worst =
        |a: &[Tensor], b: &[Tensor]| a.iter().zip(b).map(|(x, y)| rel(x, y)).fold(0f32, f32::max);
    // Q8_0 layers: agreement with the dequantized weights.
    let q = load(&tiny(), &[("text_encoder", &write("q8.gguf", 1e6, &q8))]).unwrap();
    let e = worst(&states(&q), &states(&deq(&q8, 1e6, "deq-q8")));
    eprintln!("qwen3 Q8_0: hidden states rel {e:.2e}");
    assert!(e < 0.05, "{e}");
    // The RoPE base of the file (5e6) wins over the checkout's config (1e6): exact weights, so
    // only the base can differ.
    let f = states(&load(&tiny(), &[("text_encoder", &write("f.gguf", 5e6, &f32))]).unwrap());
    let same = worst(&f, &states(&deq(&f32, 5e6, "deq-5e6")));
    let other = worst(&f, &states(&common::load(tiny())));
    eprintln!(
        "qwen3 F32, rope 5e6 from the file: rel {same:.2e} vs a 5e6 config, {other:.2e} vs 1e6"
    );
    assert!(
        same < 1e-5 && other > 100.0 * same.max(1e-7),
        "{same} {other}"
    );
}

fn flux2_tiny() -> PathBuf {
    std::env::var("DIFFUSIOND_REFERENCE_FLUX2")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference-flux2")
        })
        .join("tiny")
}

/// FLUX.2 [klein] from a BFL-named GGUF (fused q|k|v, the final modulation's halves in BFL
/// order, norms as `.scale`): its velocity agrees with the dequantized weights; the 1-D and
/// embedder tensors in F32/BF16 come through the dense path.
#[test]
fn flux2_gguf_in_bfl_names_agrees_with_dequantized_weights() {
    use diffusiond::pipeline::family::ModelInput;
    use diffusiond::pipeline::Flux2Klein;
    let ts = gs::read_component(&flux2_tiny().join("transformer"));
    let ty = |n: &str, s: &[usize]| {
        if s.len() < 2 {
            GgmlDType::F32
        } else if n.contains("blocks.") && s[1].is_multiple_of(32) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::BF16
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("flux2.gguf");
    gs::write(&gguf, &[], &gs::flux2_entries(&ts, &ty));
    let deq: HashMap<String, Tensor> = ts
        .iter()
        .map(|(n, t)| (n.clone(), gs::round_trip(t, ty(n, t.dims()))))
        .collect();
    let deq_dir = gs::checkout_with(
        &flux2_tiny(),
        &tmp.path().join("deq"),
        "transformer",
        "diffusion_pytorch_model",
        &deq,
        None,
    );
    let load = |dir: &Path, gguf: Option<&Path>| {
        let files = ModelFiles::open(&WeightSource::Local(dir.to_path_buf())).unwrap();
        let mut opts = LoadOptions::new(Device::Cpu, DType::F32);
        opts.max_sequence_length = Some(64);
        if let Some(p) = gguf {
            opts.components.insert(
                "transformer".into(),
                ComponentSource::Local(p.to_path_buf()),
            );
        }
        Flux2Klein::load(&files, &opts).unwrap()
    };
    let q = load(&flux2_tiny(), Some(&gguf));
    let d = load(&deq_dir, None);
    let cond = d.encode(PROMPT, None).unwrap().positive;
    let latent = d.initial_latent(3, 64, 48).unwrap();
    let mut e = 0f32;
    for sigma in [1.0, 0.4] {
        let input = [ModelInput {
            latent: &latent,
            cond: &cond,
            sigma,
        }];
        let vq = q.velocity(&input).unwrap();
        let vd = d.velocity(&input).unwrap();
        e = e.max(rel(&vq[0], &vd[0]));
    }
    eprintln!("flux2 Q8_0: velocity rel {e:.2e}");
    assert!(e < 0.05, "{e}");
    assert!(q.weight_bytes() < d.weight_bytes());
}
