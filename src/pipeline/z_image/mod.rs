//! Z-Image (Turbo): Qwen3 text encoder, single-stream DiT, Flux VAE, flow-matching Euler.

pub mod block;
pub mod config;
pub mod family;
pub mod rope;
pub mod transformer;

use candle_core::{DType, Device, Tensor};

use self::config::TransformerConfig;
use self::transformer::{check_caption_width, ItemInput, Transformer};
use super::error::{load_err, Result};
use super::family::{FamilyInfo, LoadOptions};
use super::flops::{self, Work};
use super::load::ModelFiles;
use super::prompt::{ChatTemplate, PromptTokenizer, MAX_SEQUENCE_LENGTH};
use super::quant;
use super::qwen3::{self as text_encoder, TextEncoder};
use super::sampler::SchedulerConfig;
use super::vae::{self, tiling, VaeConfig, VaeDecoder};

/// A loaded Z-Image pipeline on one device.
pub struct ZImage {
    tokenizer: PromptTokenizer,
    text_encoder: TextEncoder,
    transformer: Transformer,
    vae: VaeDecoder,
    /// The VAE's `scaling_factor` and `shift_factor` (latent de-normalisation).
    vae_scale: f64,
    vae_shift: f64,
    scheduler: SchedulerConfig,
    device: Device,
    dtype: DType,
    info: FamilyInfo,
    weight_bytes: u64,
}

impl ZImage {
    /// Load every component of a checkout in the published layout onto `device` in `dtype`.
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(files, device, dtype, false)
    }

    /// As [`Self::load`]; with `offload_text_encoder` the text encoder stays in host memory
    /// (f32, run on the CPU) and only its small per-prompt output goes to the device, which
    /// frees its ~8 GB (bf16) of device memory for the transformer and the VAE.
    pub fn load_with(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        offload_text_encoder: bool,
    ) -> Result<Self> {
        let mut opts = LoadOptions::new(device.clone(), dtype);
        opts.offload_text_encoder = offload_text_encoder;
        Self::load_opts(files, &opts)
    }

    /// Load with every option (the text encoder offload, the prompt length cut).
    pub fn load_opts(files: &ModelFiles, opts: &LoadOptions) -> Result<Self> {
        let (device, dtype) = (&opts.device, opts.dtype);
        let offload_text_encoder = opts.offload_text_encoder;
        let index: serde_json::Value = files.json("model_index.json")?;
        let class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if class != "ZImagePipeline" {
            return Err(load_err(format!(
                "{}: model_index.json names '{class}', expected ZImagePipeline",
                files.source()
            )));
        }
        let tokenizer = PromptTokenizer::with_template(
            &files.file("tokenizer/tokenizer.json")?,
            ChatTemplate::Thinking,
            opts.max_sequence_length.unwrap_or(MAX_SEQUENCE_LENGTH),
        )?;

        let te_cfg: text_encoder::Config = files.json("text_encoder/config.json")?;
        let (te_device, te_dtype) = if offload_text_encoder && !device.is_cpu() {
            (Device::Cpu, DType::F32)
        } else {
            (device.clone(), dtype)
        };
        let te = quant::component(
            files,
            opts,
            "text_encoder",
            "model",
            te_dtype,
            &te_device,
            quant::names::qwen3,
        )?;
        let states = text_encoder::second_to_last(&te_cfg)?;
        let text_encoder = TextEncoder::new(&te_cfg, &states, te.weights)?;

        let tr_cfg: TransformerConfig = files.json("transformer/config.json")?;
        check_caption_width(&tr_cfg, text_encoder.hidden_size())?;
        let tr = quant::component(
            files,
            opts,
            "transformer",
            "diffusion_pytorch_model",
            dtype,
            device,
            quant::names::z_image,
        )?;
        let transformer = Transformer::new(&tr_cfg, tr.weights)?;

        let vae_cfg: VaeConfig = files.json("vae/config.json")?;
        let vae_vb = vae::load_weights(files, opts)?;
        let vae = VaeDecoder::new(&vae_cfg, vae_vb)?;
        let vae_scale = vae_cfg
            .scaling_factor
            .ok_or_else(|| load_err("vae/config.json has no scaling_factor"))?;
        let vae_shift = vae_cfg.shift_factor.unwrap_or(0.0);

        let scheduler: SchedulerConfig = files.json("scheduler/scheduler_config.json")?;
        let te_bytes = if te_device.same_device(device) {
            te.bytes
        } else {
            0
        };
        let weight_bytes = te_bytes + tr.bytes + vae::weight_bytes(files, opts)?;
        let info = family::info(&vae, &transformer);
        Ok(Self {
            tokenizer,
            text_encoder,
            transformer,
            vae,
            vae_scale,
            vae_shift,
            scheduler,
            device: device.clone(),
            dtype,
            info,
            weight_bytes,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }
    pub fn transformer_config(&self) -> &TransformerConfig {
        self.transformer.config()
    }
    pub fn vae_config(&self) -> &VaeConfig {
        self.vae.config()
    }
    pub fn latent_channels(&self) -> usize {
        self.transformer.config().in_channels
    }
    /// Pixels per token side: VAE factor x patch (16 for Z-Image).
    pub fn size_multiple(&self) -> usize {
        self.vae.config().spatial_factor() * self.transformer.config().patch()
    }

    /// The arithmetic of one request (see [`crate::pipeline::flops`]).
    pub fn work(&self, prompt: &str, width: usize, height: usize) -> Result<Work> {
        let tokens = self.tokenize(prompt)?.len();
        Ok(flops::z_image(
            self.transformer.config(),
            self.text_encoder.config(),
            self.text_encoder.layers_run(),
            self.vae.config(),
            tokens,
            width,
            height,
        ))
    }

    /// Token ids of the templated, truncated prompt.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        self.tokenizer.ids(prompt)
    }

    /// Caption features `(L, cap_dim)` of token ids (`hidden_states[-2]`, unpadded).
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let feats = self.text_encoder.encode(ids)?;
        Ok(feats.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Every hidden state of the text encoder up to the used one (for checks).
    pub fn text_hidden_states(&self, ids: &[u32]) -> Result<Vec<Tensor>> {
        self.text_encoder.hidden_states(ids)
    }

    /// Caption features of a prompt.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenize(prompt)?;
        self.encode_ids(&ids)
    }

    /// The refined caption stream of one prompt's features (computed once, reused every step).
    pub fn refine_caption(&self, caption: &Tensor) -> Result<Tensor> {
        self.transformer.refine_caption(caption)
    }

    /// One transformer evaluation of a batch; raw outputs `(C, h, w)` f32 per item.
    pub fn transformer_forward(&self, items: &[ItemInput]) -> Result<Vec<Tensor>> {
        self.transformer.forward(items)
    }

    /// Decode latents `(B, C, h, w)` (f32) to images in [-1, 1], `(B, 3, H, W)` f32. Above
    /// 1024x1024 pixels the decode is tiled (see [`tiling`]) so that memory follows the tile.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        let t = tiling::Tiling::default();
        if t.applies(h, w) {
            let f = self.vae.config().spatial_factor();
            tiling::decode_tiled(latents, t, f, |tile| self.decode_whole(tile))
        } else {
            self.decode_whole(latents)
        }
    }

    /// `z = latents / scaling + shift`, then the decoder, without tiling.
    fn decode_whole(&self, latents: &Tensor) -> Result<Tensor> {
        let z = ((latents / self.vae_scale)? + self.vae_shift)?;
        self.vae.decode_scaled(&z)
    }
}
