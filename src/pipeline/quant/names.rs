//! The tensor names of the GGUF files people download, mapped onto the diffusers / transformers
//! names our modules load. A name no rule knows passes through unchanged, so a file written in
//! the diffusers naming loads too.
//!
//! - Z-Image (every published conversion: unsloth, jayn7 with city96's tools, leejet with
//!   stable-diffusion.cpp): the ComfyUI / original "lumina2" names: `x_embedder`, `final_layer`,
//!   `layers.N.attention.qkv` (q|k|v fused along the rows), `attention.out`, `q_norm`/`k_norm`;
//!   pad tokens sometimes `[dim]` instead of `[1, dim]` (the loader reshapes).
//! - FLUX.2 [klein]: the BFL / ComfyUI names (`img_in`, `txt_in`, `time_in`, `double_blocks.N`
//!   with fused `img_attn.qkv`/`txt_attn.qkv`, `single_blocks.N.linear1/linear2`,
//!   `*.norm.query_norm.scale`, `final_layer.adaLN_modulation.1` with shift and scale in the
//!   other order than diffusers').
//! - Qwen3 text encoders: llama.cpp's names (`token_embd`, `blk.N.attn_q`, `ffn_gate`, ...);
//!   llama.cpp does not permute q/k for Qwen3 (NEOX RoPE), so the rows are taken as they are.

/// Which rows of the file's tensor a mapped name takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    All,
    /// Part `index` of `count` equal parts along the rows (a fused q|k|v).
    Chunk {
        index: usize,
        count: usize,
    },
    /// The two halves swapped (FLUX.2's final modulation: shift|scale -> scale|shift).
    SwapHalves,
}

/// A file tensor's name -> the names (and rows) our modules load.
pub type NameMap = fn(&str) -> Vec<(String, Rows)>;

fn strip(name: &str) -> &str {
    name.strip_prefix("model.diffusion_model.")
        .or_else(|| name.strip_prefix("diffusion_model."))
        .unwrap_or(name)
}

fn qkv(prefix: &str, names: [&str; 3], param: &str) -> Vec<(String, Rows)> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                format!("{prefix}{n}.{param}"),
                Rows::Chunk { index: i, count: 3 },
            )
        })
        .collect()
}

/// Z-Image transformer: lumina2 names -> `ZImageTransformer2DModel` names.
pub fn z_image(name: &str) -> Vec<(String, Rows)> {
    let name = strip(name);
    if let Some(prefix) = name.strip_suffix("attention.qkv.weight") {
        return qkv(
            &format!("{prefix}attention."),
            ["to_q", "to_k", "to_v"],
            "weight",
        );
    }
    let mut n = name.to_string();
    if let Some(rest) = n.strip_prefix("final_layer.") {
        n = format!("all_final_layer.2-1.{rest}");
    } else if let Some(rest) = n.strip_prefix("x_embedder.") {
        n = format!("all_x_embedder.2-1.{rest}");
    }
    for (from, to) in [
        (".attention.out.", ".attention.to_out.0."),
        (".attention.q_norm.", ".attention.norm_q."),
        (".attention.k_norm.", ".attention.norm_k."),
    ] {
        n = n.replace(from, to);
    }
    vec![(n, Rows::All)]
}

/// FLUX.2 transformer: BFL names -> `Flux2Transformer2DModel` names.
pub fn flux2(name: &str) -> Vec<(String, Rows)> {
    let name = strip(name);
    let param = |p: &str| if p == "scale" { "weight" } else { p }.to_string();
    if let Some(rest) = name.strip_prefix("double_blocks.") {
        let Some((idx, within)) = rest.split_once('.') else {
            return vec![(name.into(), Rows::All)];
        };
        let Some((within, p)) = within.rsplit_once('.') else {
            return vec![(name.into(), Rows::All)];
        };
        let pre = format!("transformer_blocks.{idx}.");
        let p = param(p);
        let to = match within {
            "img_attn.qkv" => return qkv(&format!("{pre}attn."), ["to_q", "to_k", "to_v"], &p),
            "txt_attn.qkv" => {
                return qkv(
                    &format!("{pre}attn."),
                    ["add_q_proj", "add_k_proj", "add_v_proj"],
                    &p,
                )
            }
            "img_attn.norm.query_norm" => "attn.norm_q",
            "img_attn.norm.key_norm" => "attn.norm_k",
            "img_attn.proj" => "attn.to_out.0",
            "img_mlp.0" => "ff.linear_in",
            "img_mlp.2" => "ff.linear_out",
            "txt_attn.norm.query_norm" => "attn.norm_added_q",
            "txt_attn.norm.key_norm" => "attn.norm_added_k",
            "txt_attn.proj" => "attn.to_add_out",
            "txt_mlp.0" => "ff_context.linear_in",
            "txt_mlp.2" => "ff_context.linear_out",
            other => other,
        };
        return vec![(format!("{pre}{to}.{p}"), Rows::All)];
    }
    if let Some(rest) = name.strip_prefix("single_blocks.") {
        let Some((idx, within)) = rest.split_once('.') else {
            return vec![(name.into(), Rows::All)];
        };
        let Some((within, p)) = within.rsplit_once('.') else {
            return vec![(name.into(), Rows::All)];
        };
        let to = match within {
            "linear1" => "attn.to_qkv_mlp_proj",
            "linear2" => "attn.to_out",
            "norm.query_norm" => "attn.norm_q",
            "norm.key_norm" => "attn.norm_k",
            other => other,
        };
        return vec![(
            format!("single_transformer_blocks.{idx}.{to}.{}", param(p)),
            Rows::All,
        )];
    }
    if let Some(p) = name.strip_prefix("final_layer.adaLN_modulation.1.") {
        return vec![(format!("norm_out.linear.{p}"), Rows::SwapHalves)];
    }
    for (from, to) in [
        ("img_in.", "x_embedder."),
        ("txt_in.", "context_embedder."),
        (
            "time_in.in_layer.",
            "time_guidance_embed.timestep_embedder.linear_1.",
        ),
        (
            "time_in.out_layer.",
            "time_guidance_embed.timestep_embedder.linear_2.",
        ),
        (
            "double_stream_modulation_img.lin.",
            "double_stream_modulation_img.linear.",
        ),
        (
            "double_stream_modulation_txt.lin.",
            "double_stream_modulation_txt.linear.",
        ),
        (
            "single_stream_modulation.lin.",
            "single_stream_modulation.linear.",
        ),
        ("final_layer.linear.", "proj_out."),
    ] {
        if let Some(rest) = name.strip_prefix(from) {
            return vec![(format!("{to}{rest}"), Rows::All)];
        }
    }
    vec![(name.into(), Rows::All)]
}

/// Qwen3: llama.cpp names -> transformers' `Qwen3Model` names (with the `model.` prefix).
pub fn qwen3(name: &str) -> Vec<(String, Rows)> {
    let one = |n: String| vec![(n, Rows::All)];
    match name {
        "token_embd.weight" => return one("model.embed_tokens.weight".into()),
        "output_norm.weight" => return one("model.norm.weight".into()),
        "output.weight" => return one("lm_head.weight".into()),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("blk.") {
        if let Some((idx, within)) = rest.split_once('.') {
            if let Some((within, p)) = within.rsplit_once('.') {
                let to = match within {
                    "attn_norm" => Some("input_layernorm"),
                    "attn_q" => Some("self_attn.q_proj"),
                    "attn_k" => Some("self_attn.k_proj"),
                    "attn_v" => Some("self_attn.v_proj"),
                    "attn_output" => Some("self_attn.o_proj"),
                    "attn_q_norm" => Some("self_attn.q_norm"),
                    "attn_k_norm" => Some("self_attn.k_norm"),
                    "ffn_norm" => Some("post_attention_layernorm"),
                    "ffn_gate" => Some("mlp.gate_proj"),
                    "ffn_up" => Some("mlp.up_proj"),
                    "ffn_down" => Some("mlp.down_proj"),
                    _ => None,
                };
                if let Some(to) = to {
                    return one(format!("model.layers.{idx}.{to}.{p}"));
                }
            }
        }
    }
    one(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_image_lumina2_names() {
        assert_eq!(
            z_image("layers.3.attention.qkv.weight"),
            vec![
                (
                    "layers.3.attention.to_q.weight".to_string(),
                    Rows::Chunk { index: 0, count: 3 }
                ),
                (
                    "layers.3.attention.to_k.weight".to_string(),
                    Rows::Chunk { index: 1, count: 3 }
                ),
                (
                    "layers.3.attention.to_v.weight".to_string(),
                    Rows::Chunk { index: 2, count: 3 }
                ),
            ]
        );
        let one = |n: &str| z_image(n)[0].0.clone();
        assert_eq!(
            one("model.diffusion_model.final_layer.adaLN_modulation.1.bias"),
            "all_final_layer.2-1.adaLN_modulation.1.bias"
        );
        assert_eq!(one("x_embedder.weight"), "all_x_embedder.2-1.weight");
        assert_eq!(
            one("noise_refiner.0.attention.out.weight"),
            "noise_refiner.0.attention.to_out.0.weight"
        );
        assert_eq!(
            one("layers.0.attention.k_norm.weight"),
            "layers.0.attention.norm_k.weight"
        );
        assert_eq!(one("cap_pad_token"), "cap_pad_token");
        // Diffusers names pass through.
        assert_eq!(
            one("all_x_embedder.2-1.weight"),
            "all_x_embedder.2-1.weight"
        );
    }

    #[test]
    fn flux2_bfl_names() {
        let one = |n: &str| flux2(n)[0].clone();
        assert_eq!(flux2("double_blocks.1.txt_attn.qkv.weight").len(), 3);
        assert_eq!(
            flux2("double_blocks.1.txt_attn.qkv.weight")[2].0,
            "transformer_blocks.1.attn.add_v_proj.weight"
        );
        assert_eq!(
            one("double_blocks.0.img_attn.norm.query_norm.scale").0,
            "transformer_blocks.0.attn.norm_q.weight"
        );
        assert_eq!(
            one("single_blocks.4.linear1.weight").0,
            "single_transformer_blocks.4.attn.to_qkv_mlp_proj.weight"
        );
        assert_eq!(
            one("final_layer.adaLN_modulation.1.weight"),
            ("norm_out.linear.weight".to_string(), Rows::SwapHalves)
        );
        assert_eq!(
            one("time_in.out_layer.weight").0,
            "time_guidance_embed.timestep_embedder.linear_2.weight"
        );
        assert_eq!(one("final_layer.linear.weight").0, "proj_out.weight");
    }

    #[test]
    fn qwen3_llama_cpp_names() {
        let one = |n: &str| qwen3(n)[0].0.clone();
        assert_eq!(one("token_embd.weight"), "model.embed_tokens.weight");
        assert_eq!(
            one("blk.7.attn_k_norm.weight"),
            "model.layers.7.self_attn.k_norm.weight"
        );
        assert_eq!(
            one("blk.0.ffn_down.weight"),
            "model.layers.0.mlp.down_proj.weight"
        );
        assert_eq!(
            one("blk.2.ffn_norm.weight"),
            "model.layers.2.post_attention_layernorm.weight"
        );
    }
}
