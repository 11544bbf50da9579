//! GGUF files written by the tests themselves, in the naming and type mix of the published
//! files, from the tiny reference models' safetensors; and the same weights dequantized, as a
//! full-precision checkout, to compare against.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use diffusiond::pipeline::quant::gguf::{self, MetaValue};

/// Every tensor of a component directory (all its safetensors shards), f32 on the CPU.
pub fn read_component(dir: &Path) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            for (k, v) in candle_core::safetensors::load(&p, &Device::Cpu).unwrap() {
                out.insert(k, v.to_dtype(candle_core::DType::F32).unwrap());
            }
        }
    }
    out
}

/// The next type up, as the published mixes give `w2` / `ffn_down`.
pub fn one_up(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q4_0 => GgmlDType::Q4_1,
        GgmlDType::Q4K => GgmlDType::Q6K,
        GgmlDType::Q5K => GgmlDType::Q6K,
        other => other,
    }
}

/// The published Z-Image mix (city96): 1-D tensors F32; embedders, refiners and the final
/// layer BF16; the main layers in `base` (w2 one type up); rows that are not whole blocks of
/// the type in F16 (as llama.cpp's fallback).
pub fn z_image_type(name: &str, shape: &[usize], base: GgmlDType) -> GgmlDType {
    if shape.len() < 2 {
        return GgmlDType::F32;
    }
    if !name.starts_with("layers.") || matches!(base, GgmlDType::F16 | GgmlDType::BF16) {
        return if name.starts_with("layers.") {
            base
        } else {
            GgmlDType::BF16
        };
    }
    let t = if name.contains("feed_forward.w2") {
        one_up(base)
    } else {
        base
    };
    if shape[shape.len() - 1].is_multiple_of(t.block_size()) {
        t
    } else {
        GgmlDType::F16
    }
}

/// `t` rounded through `ty` (what a loader of a file of that type computes with).
pub fn round_trip(t: &Tensor, ty: GgmlDType) -> Tensor {
    if ty == GgmlDType::F32 {
        return t.clone();
    }
    QTensor::quantize(t, ty)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A tensor to write: published name, shape, values, type.
pub type Entry = (String, Vec<usize>, Vec<f32>, GgmlDType);

/// Z-Image transformer tensors (diffusers names) -> lumina2 names, q|k|v fused, pad tokens
/// as `[dim]`; types from `ty(name, shape)` (of our names; q/k/v share the type).
pub fn z_image_entries(
    ts: &HashMap<String, Tensor>,
    ty: &dyn Fn(&str, &[usize]) -> GgmlDType,
) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = ts.keys().collect();
    names.sort();
    for name in names {
        let t = &ts[name];
        let shape = t.dims().to_vec();
        if name.contains("attention.to_k.") || name.contains("attention.to_v.") {
            continue;
        }
        if let Some(prefix) = name.strip_suffix("attention.to_q.weight") {
            let parts: Vec<&Tensor> = ["to_q", "to_k", "to_v"]
                .iter()
                .map(|p| &ts[&format!("{prefix}attention.{p}.weight")])
                .collect();
            let fused = Tensor::cat(&parts, 0).unwrap();
            out.push((
                format!("{prefix}attention.qkv.weight"),
                fused.dims().to_vec(),
                values(&fused),
                ty(name, &shape),
            ));
            continue;
        }
        let mut n = name
            .replace("all_final_layer.2-1.", "final_layer.")
            .replace("all_x_embedder.2-1.", "x_embedder.")
            .replace(".attention.to_out.0.", ".attention.out.")
            .replace(".attention.norm_q.", ".attention.q_norm.")
            .replace(".attention.norm_k.", ".attention.k_norm.");
        let mut pshape = shape.clone();
        if n.ends_with("pad_token") {
            pshape = vec![shape.iter().product()];
        }
        if n == "x_pad_token" {
            // Some files carry the ComfyUI prefix; the loader strips it.
            n = format!("model.diffusion_model.{n}");
        }
        out.push((n, pshape, values(t), ty(name, &shape)));
    }
    out
}

/// Qwen3 tensors (transformers names) -> llama.cpp names; `ty` by our name.
pub fn qwen3_entries(
    ts: &HashMap<String, Tensor>,
    ty: &dyn Fn(&str, &[usize]) -> GgmlDType,
) -> Vec<Entry> {
    let map = [
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut out = Vec::new();
    for (name, t) in ts {
        let shape = t.dims().to_vec();
        let n = if name == "model.embed_tokens.weight" {
            "token_embd.weight".to_string()
        } else if name == "model.norm.weight" {
            "output_norm.weight".to_string()
        } else if let Some(rest) = name.strip_prefix("model.layers.") {
            let (idx, within) = rest.split_once('.').unwrap();
            let (within, p) = within.rsplit_once('.').unwrap();
            let to = map.iter().find(|(a, _)| *a == within).unwrap().1;
            format!("blk.{idx}.{to}.{p}")
        } else {
            name.clone()
        };
        out.push((n, shape.clone(), values(t), ty(name, &shape)));
    }
    out
}

/// FLUX.2 tensors (diffusers names) -> BFL names (fused q|k|v, final modulation halves
/// swapped, norms as `.scale`); `ty` by our name.
pub fn flux2_entries(
    ts: &HashMap<String, Tensor>,
    ty: &dyn Fn(&str, &[usize]) -> GgmlDType,
) -> Vec<Entry> {
    let double = [
        ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
        ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
        ("attn.to_out.0.weight", "img_attn.proj.weight"),
        ("ff.linear_in.weight", "img_mlp.0.weight"),
        ("ff.linear_out.weight", "img_mlp.2.weight"),
        ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
        ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
        ("attn.to_add_out.weight", "txt_attn.proj.weight"),
        ("ff_context.linear_in.weight", "txt_mlp.0.weight"),
        ("ff_context.linear_out.weight", "txt_mlp.2.weight"),
    ];
    let single = [
        ("attn.to_qkv_mlp_proj.weight", "linear1.weight"),
        ("attn.to_out.weight", "linear2.weight"),
        ("attn.norm_q.weight", "norm.query_norm.scale"),
        ("attn.norm_k.weight", "norm.key_norm.scale"),
    ];
    let global = [
        ("x_embedder.", "img_in."),
        ("context_embedder.", "txt_in."),
        (
            "time_guidance_embed.timestep_embedder.linear_1.",
            "time_in.in_layer.",
        ),
        (
            "time_guidance_embed.timestep_embedder.linear_2.",
            "time_in.out_layer.",
        ),
        (
            "double_stream_modulation_img.linear.",
            "double_stream_modulation_img.lin.",
        ),
        (
            "double_stream_modulation_txt.linear.",
            "double_stream_modulation_txt.lin.",
        ),
        (
            "single_stream_modulation.linear.",
            "single_stream_modulation.lin.",
        ),
        ("proj_out.", "final_layer.linear."),
    ];
    let mut out = Vec::new();
    for (name, t) in ts {
        let shape = t.dims().to_vec();
        let tt = ty(name, &shape);
        if let Some(rest) = name.strip_prefix("transformer_blocks.") {
            let (idx, within) = rest.split_once('.').unwrap();
            for (q, fused) in [
                ("attn.to_q.weight", "img_attn.qkv.weight"),
                ("attn.add_q_proj.weight", "txt_attn.qkv.weight"),
            ] {
                if within == q {
                    let ks = if q.contains("add") {
                        ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
                    } else {
                        ["attn.to_q", "attn.to_k", "attn.to_v"]
                    };
                    let parts: Vec<&Tensor> = ks
                        .iter()
                        .map(|k| &ts[&format!("transformer_blocks.{idx}.{k}.weight")])
                        .collect();
                    let f = Tensor::cat(&parts, 0).unwrap();
                    out.push((
                        format!("double_blocks.{idx}.{fused}"),
                        f.dims().to_vec(),
                        values(&f),
                        tt,
                    ));
                }
            }
            if let Some((_, to)) = double.iter().find(|(a, _)| *a == within) {
                out.push((format!("double_blocks.{idx}.{to}"), shape, values(t), tt));
            }
            continue;
        }
        if let Some(rest) = name.strip_prefix("single_transformer_blocks.") {
            let (idx, within) = rest.split_once('.').unwrap();
            let to = single.iter().find(|(a, _)| *a == within).unwrap().1;
            out.push((format!("single_blocks.{idx}.{to}"), shape, values(t), tt));
            continue;
        }
        if let Some(p) = name.strip_prefix("norm_out.linear.") {
            let h = shape[0] / 2;
            let swapped =
                Tensor::cat(&[t.narrow(0, h, h).unwrap(), t.narrow(0, 0, h).unwrap()], 0).unwrap();
            out.push((
                format!("final_layer.adaLN_modulation.1.{p}"),
                shape,
                values(&swapped),
                tt,
            ));
            continue;
        }
        let (a, b) = global.iter().find(|(a, _)| name.starts_with(a)).unwrap();
        out.push((name.replacen(a, b, 1), shape, values(t), tt));
    }
    out
}

pub fn write(path: &Path, meta: &[(&str, MetaValue)], entries: &[Entry]) {
    gguf::write(path, meta, entries).unwrap();
}

/// A copy of checkout `base` (other components linked) whose `component` is replaced by
/// `tensors` (one safetensors file) and, optionally, its config patched.
pub fn checkout_with(
    base: &Path,
    out: &Path,
    component: &str,
    stem: &str,
    tensors: &HashMap<String, Tensor>,
    config_patch: Option<(&str, serde_json::Value)>,
) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    for e in std::fs::read_dir(base).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name.to_string_lossy() == component {
            continue;
        }
        let dst = out.join(&name);
        if !dst.exists() {
            std::os::unix::fs::symlink(e.path(), dst).unwrap();
        }
    }
    let dir = out.join(component);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base.join(component).join("config.json")).unwrap(),
    )
    .unwrap();
    if let Some((k, v)) = config_patch {
        cfg[k] = v;
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(tensors, dir.join(format!("{stem}.safetensors"))).unwrap();
    out.to_path_buf()
}

/// PSNR in dB of two 8-bit images of one size.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}
