//! The published configurations of the real checkpoints, embedded so that `diffusiond bench
//! --synthetic` needs no download. Values from the references' READMEs, section 2
//! (`../shared/reference/README.md` for Tongyi-MAI/Z-Image-Turbo,
//! `../shared/reference-flux2/README.md` for black-forest-labs/FLUX.2-klein-4B), which give them
//! as the repos' own `config.json` files state them.

/// Qwen3-4B, the text encoder of both families.
const QWEN3_4B: &str = r#"{
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 9728,
  "max_position_embeddings": 40960, "model_type": "qwen3", "num_attention_heads": 32,
  "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
  "rope_theta": 1000000, "tie_word_embeddings": true, "vocab_size": 151936
}"#;

const Z_IMAGE_INDEX: &str = r#"{
  "_class_name": "ZImagePipeline",
  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
  "text_encoder": ["transformers", "Qwen3Model"],
  "tokenizer": ["transformers", "Qwen2Tokenizer"],
  "transformer": ["diffusers", "ZImageTransformer2DModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#;

const Z_IMAGE_TRANSFORMER: &str = r#"{
  "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
  "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560,
  "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30,
  "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": true, "rope_theta": 256.0,
  "t_scale": 1000.0
}"#;

const Z_IMAGE_VAE: &str = r#"{
  "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
  "force_upcast": true, "in_channels": 3, "latent_channels": 16, "layers_per_block": 2,
  "mid_block_add_attention": true, "norm_num_groups": 32, "out_channels": 3,
  "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
  "use_post_quant_conv": false, "use_quant_conv": false
}"#;

const Z_IMAGE_SCHEDULER: &str = r#"{
  "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
  "use_dynamic_shifting": false, "shift": 3.0
}"#;

const FLUX2_INDEX: &str = r#"{
  "_class_name": "Flux2KleinPipeline", "is_distilled": true,
  "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
  "text_encoder": ["transformers", "Qwen3ForCausalLM"],
  "tokenizer": ["transformers", "Qwen2TokenizerFast"],
  "transformer": ["diffusers", "Flux2Transformer2DModel"],
  "vae": ["diffusers", "AutoencoderKLFlux2"]
}"#;

const FLUX2_TRANSFORMER: &str = r#"{
  "_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
  "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": false,
  "in_channels": 128, "joint_attention_dim": 7680, "mlp_ratio": 3.0,
  "num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20, "out_channels": null,
  "patch_size": 1, "rope_theta": 2000, "timestep_guidance_channels": 256
}"#;

const FLUX2_VAE: &str = r#"{
  "_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "batch_norm_eps": 0.0001,
  "batch_norm_momentum": 0.1, "block_out_channels": [128, 256, 512, 512],
  "force_upcast": true, "in_channels": 3, "latent_channels": 32, "layers_per_block": 2,
  "mid_block_add_attention": true, "norm_num_groups": 32, "out_channels": 3,
  "patch_size": [2, 2], "sample_size": 1024, "use_post_quant_conv": true,
  "use_quant_conv": true
}"#;

const FLUX2_SCHEDULER: &str = r#"{
  "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
  "base_shift": 0.5, "invert_sigmas": false, "max_image_seq_len": 4096, "max_shift": 1.15,
  "num_train_timesteps": 1000, "shift": 3.0, "shift_terminal": null,
  "stochastic_sampling": false, "time_shift_type": "exponential", "use_beta_sigmas": false,
  "use_dynamic_shifting": true, "use_exponential_sigmas": false, "use_karras_sigmas": false
}"#;

/// The published configuration files of a family's real checkpoint, as `(path, JSON)` in the
/// diffusers layout; `None` for a family without one here.
pub fn files(family: &str) -> Option<[(&'static str, &'static str); 5]> {
    Some(match family {
        "z-image" => [
            ("model_index.json", Z_IMAGE_INDEX),
            ("text_encoder/config.json", QWEN3_4B),
            ("transformer/config.json", Z_IMAGE_TRANSFORMER),
            ("vae/config.json", Z_IMAGE_VAE),
            ("scheduler/scheduler_config.json", Z_IMAGE_SCHEDULER),
        ],
        "flux2-klein" => [
            ("model_index.json", FLUX2_INDEX),
            ("text_encoder/config.json", QWEN3_4B),
            ("transformer/config.json", FLUX2_TRANSFORMER),
            ("vae/config.json", FLUX2_VAE),
            ("scheduler/scheduler_config.json", FLUX2_SCHEDULER),
        ],
        _ => return None,
    })
}

/// The checkpoint each family's published configuration belongs to.
pub fn checkpoint(family: &str) -> &'static str {
    match family {
        "z-image" => "Tongyi-MAI/Z-Image-Turbo",
        "flux2-klein" => "black-forest-labs/FLUX.2-klein-4B",
        _ => "unknown",
    }
}
