//! Z-Image (Turbo): Qwen3 text encoder, single-stream DiT, Flux VAE, flow-matching Euler.

pub mod block;
pub mod config;
pub mod linear;
pub mod prompt;
pub mod rope;
pub mod text_encoder;
pub mod tiling;
pub mod transformer;
pub mod vae;

use candle_core::{DType, Device, Tensor};

use self::config::TransformerConfig;
use self::prompt::PromptTokenizer;
use self::text_encoder::TextEncoder;
use self::transformer::{check_caption_width, ItemInput, Transformer};
use self::vae::{VaeConfig, VaeDecoder};
use super::error::{load_err, Result};
use super::load::ModelFiles;
use super::sampler::SchedulerConfig;

/// A loaded Z-Image pipeline on one device.
pub struct ZImage {
    tokenizer: PromptTokenizer,
    text_encoder: TextEncoder,
    transformer: Transformer,
    vae: VaeDecoder,
    scheduler: SchedulerConfig,
    device: Device,
    dtype: DType,
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
        let tokenizer = PromptTokenizer::from_file(&files.file("tokenizer/tokenizer.json")?)?;

        let te_cfg: text_encoder::Config = files.json("text_encoder/config.json")?;
        let (te_device, te_dtype) = if offload_text_encoder && !device.is_cpu() {
            (Device::Cpu, DType::F32)
        } else {
            (device.clone(), dtype)
        };
        let te_vb = files.var_builder("text_encoder", "model", te_dtype, &te_device)?;
        let text_encoder = TextEncoder::new(&te_cfg, te_vb)?;

        let tr_cfg: TransformerConfig = files.json("transformer/config.json")?;
        check_caption_width(&tr_cfg, text_encoder.hidden_size())?;
        let tr_vb = files.var_builder("transformer", "diffusion_pytorch_model", dtype, device)?;
        let transformer = Transformer::new(&tr_cfg, tr_vb)?;

        let vae_cfg: VaeConfig = files.json("vae/config.json")?;
        let vae_vb = files.var_builder("vae", "diffusion_pytorch_model", dtype, device)?;
        let vae = VaeDecoder::new(&vae_cfg, vae_vb)?;

        let scheduler: SchedulerConfig = files.json("scheduler/scheduler_config.json")?;
        Ok(Self {
            tokenizer,
            text_encoder,
            transformer,
            vae,
            scheduler,
            device: device.clone(),
            dtype,
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
            tiling::decode_tiled(latents, t, f, |tile| self.vae.decode(tile, self.dtype))
        } else {
            self.vae.decode(latents, self.dtype)
        }
    }
}
