//! FLUX.2 [klein] (`Flux2KleinPipeline`): the shared Qwen3 text encoder read at hidden states
//! 9, 18 and 27 over the right-padded prompt, the double/single-stream MMDiT with 4-axis RoPE,
//! the dynamic exponential shift schedule, and the shared VAE decoder after a batch-norm
//! de-normalisation in the patchified space. The spec is `../shared/reference-flux2/README.md`.
//!
//! Differences from diffusers, on purpose: a size that is not a multiple of 16 is refused by
//! [`Family::check_size`] (our API validates sizes) where diffusers floors it with a warning;
//! the time embedding is computed in f32 whatever the run dtype (diffusers rounds the timestep
//! to the model dtype first).

pub mod blocks;
pub mod config;
pub mod latent;
pub mod rope;
pub mod transformer;

use candle_core::{DType, Device, Tensor};

use self::config::TransformerConfig;
use self::latent::BatchNormStats;
use self::transformer::Transformer;
use super::error::{load_err, Result};
use super::family::{CfgRule, Conditioning, Family, FamilyInfo, LoadOptions, ModelInput};
use super::flops::{self, Work};
use super::image::{to_rgb8, RgbImage};
use super::load::ModelFiles;
use super::prompt::{ChatTemplate, PromptTokenizer, MAX_SEQUENCE_LENGTH};
use super::quant;
use super::qwen3::{self, TextEncoder};
use super::vae::{self, tiling, VaeConfig, VaeDecoder};
use super::{noise, sampler};

/// The hidden states of the text encoder the pipeline stacks (`text_encoder_out_layers`).
pub const TEXT_STATES: [usize; 3] = [9, 18, 27];
/// Pixels per transformer token side (VAE factor 8 x the VAE's 2x2 patchify).
const SIZE_MULTIPLE: usize = 16;

/// A loaded FLUX.2 [klein] pipeline on one device.
pub struct Flux2Klein {
    info: FamilyInfo,
    tokenizer: PromptTokenizer,
    text_encoder: TextEncoder,
    transformer: Transformer,
    vae: VaeDecoder,
    bn: BatchNormStats,
    device: Device,
    dtype: DType,
    weight_bytes: u64,
}

impl Flux2Klein {
    /// Load a checkout in the published layout (`model_index.json` naming
    /// `Flux2KleinPipeline`; `is_distilled` picks the defaults and whether CFG exists).
    pub fn load(files: &ModelFiles, opts: &LoadOptions) -> Result<Self> {
        let index: serde_json::Value = files.json("model_index.json")?;
        let class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if class != "Flux2KleinPipeline" {
            return Err(load_err(format!(
                "{}: model_index.json names '{class}', expected Flux2KleinPipeline",
                files.source()
            )));
        }
        let distilled = index
            .get("is_distilled")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Self::load_as(files, opts, distilled)
    }

    /// As [`Self::load`] with `is_distilled` given instead of read (klein-base shares the
    /// distilled checkpoint's layout; the reference's CFG case runs the tiny model as base).
    pub fn load_as(files: &ModelFiles, opts: &LoadOptions, distilled: bool) -> Result<Self> {
        let (device, dtype) = (&opts.device, opts.dtype);
        let sched: serde_json::Value = files.json("scheduler/scheduler_config.json")?;
        let dynamic = sched.get("use_dynamic_shifting").and_then(|v| v.as_bool());
        let shift_type = sched
            .get("time_shift_type")
            .and_then(|v| v.as_str())
            .unwrap_or("exponential");
        if dynamic != Some(true) || shift_type != "exponential" {
            return Err(load_err(
                "flux2 scheduler must use dynamic shifting with the exponential time shift",
            ));
        }
        let max_len = opts.max_sequence_length.unwrap_or(MAX_SEQUENCE_LENGTH);
        let tokenizer = PromptTokenizer::with_template(
            &files.file("tokenizer/tokenizer.json")?,
            ChatTemplate::NoThinking,
            max_len,
        )?;

        let te_cfg: qwen3::Config = files.json("text_encoder/config.json")?;
        let (te_device, te_dtype) = if opts.offload_text_encoder && !device.is_cpu() {
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
        let text_encoder = TextEncoder::new(&te_cfg, &TEXT_STATES, te.weights)?;

        let tr_cfg: TransformerConfig = files.json("transformer/config.json")?;
        if tr_cfg.joint_attention_dim != text_encoder.feature_size() {
            return Err(load_err(format!(
                "transformer joint_attention_dim {} != {} stacked text features of width {}",
                tr_cfg.joint_attention_dim,
                TEXT_STATES.len(),
                te_cfg.hidden_size
            )));
        }
        let tr = quant::component(
            files,
            opts,
            "transformer",
            "diffusion_pytorch_model",
            dtype,
            device,
            quant::names::flux2,
        )?;
        let transformer = Transformer::new(&tr_cfg, tr.weights)?;

        let vae_cfg: VaeConfig = files.json("vae/config.json")?;
        if vae_cfg.latent_channels * 4 != tr_cfg.in_channels
            || vae_cfg.spatial_factor() * 2 != SIZE_MULTIPLE
        {
            return Err(load_err(format!(
                "vae latent_channels {} x 4 must equal the transformer's in_channels {} and the VAE factor must be 8",
                vae_cfg.latent_channels, tr_cfg.in_channels
            )));
        }
        let vae_vb = vae::load_weights(files, opts)?;
        let bn = BatchNormStats::load(
            &vae_vb,
            tr_cfg.in_channels,
            vae_cfg.batch_norm_eps.unwrap_or(1e-4),
        )?;
        let vae = VaeDecoder::new(&vae_cfg, vae_vb)?;

        let te_on_device = if te_device.same_device(device) {
            te.bytes
        } else {
            0
        };
        let weight_bytes = tr.bytes + te_on_device + vae::weight_bytes(files, opts)?;

        Ok(Self {
            info: FamilyInfo {
                family: "flux2-klein",
                size_multiple: SIZE_MULTIPLE,
                default_steps: if distilled { 4 } else { 50 },
                max_sequence_length: max_len,
                cfg: if distilled {
                    None
                } else {
                    Some(CfgRule::NegativePlus)
                },
            },
            tokenizer,
            text_encoder,
            transformer,
            vae,
            bn,
            device: device.clone(),
            dtype,
            weight_bytes,
        })
    }

    pub fn transformer_config(&self) -> &TransformerConfig {
        self.transformer.config()
    }

    /// Templated ids right-padded to `max_sequence_length`, and how many are the prompt's.
    pub fn tokenize(&self, prompt: &str) -> Result<(Vec<u32>, usize)> {
        self.tokenizer.padded_ids(prompt)
    }

    /// Stacked text features `(S, 3 x hidden)` of padded ids (all S rows, pad rows included).
    pub fn text_features(&self, ids: &[u32], valid: usize) -> Result<Tensor> {
        self.text_encoder.encode_padded(ids, valid)
    }

    /// Hidden states `0..=27` of padded ids (checks).
    pub fn text_hidden_states(&self, ids: &[u32], valid: usize) -> Result<Vec<Tensor>> {
        self.text_encoder.hidden_states_padded(ids, valid)
    }

    /// What a [`Conditioning`] holds for a prompt's features: the context embedder's output
    /// `(S, D)` (the only prompt-dependent transformer input), in the run dtype on the device.
    pub fn condition(&self, features: &Tensor) -> Result<Tensor> {
        self.transformer.embed_context(features)
    }

    fn encode_one(&self, prompt: &str) -> Result<Tensor> {
        let (ids, valid) = self.tokenize(prompt)?;
        self.condition(&self.text_features(&ids, valid)?)
    }

    /// RoPE tables of the joint sequence, `(S + N, head_dim)` each, f32 (checks).
    pub fn rope_tables(&self, text_len: usize, h: usize, w: usize) -> Result<(Tensor, Tensor)> {
        let pe = self.transformer.rope(text_len, h, w)?;
        Ok((rope::widen(&pe.cos)?, rope::widen(&pe.sin)?))
    }

    /// The transformer on packed latents `(B, N, 128)` of an `h x w` grid and conditions
    /// `(B, S, D)`: raw outputs `(B, N, 128)` f32 (checks).
    pub fn transformer_forward(
        &self,
        packed: &Tensor,
        conds: &Tensor,
        sigmas: &[f32],
        h: usize,
        w: usize,
    ) -> Result<Tensor> {
        self.transformer.forward(packed, conds, sigmas, h, w)
    }

    /// As [`Self::transformer_forward`], with the intermediate stages under the reference's
    /// `dbg.*` names (checks).
    pub fn transformer_trace(
        &self,
        packed: &Tensor,
        conds: &Tensor,
        sigmas: &[f32],
        h: usize,
        w: usize,
    ) -> Result<(Tensor, Vec<(String, Tensor)>)> {
        let mut trace = Some(Vec::new());
        let out = self
            .transformer
            .forward_traced(packed, conds, sigmas, h, w, &mut trace)?;
        Ok((out, trace.unwrap_or_default()))
    }

    /// Patchified final latents `(B, 128, h', w')` (f32) -> the VAE's input `(B, 32, 2h', 2w')`:
    /// batch-norm de-normalisation, then unpatchify.
    pub fn vae_input(&self, latents: &Tensor) -> Result<Tensor> {
        latent::unpatchify(&self.bn.denormalize(&latents.to_dtype(DType::F32)?)?)
    }

    /// The VAE decoder (post_quant_conv included) on its input: `(B, 3, H, W)` in [-1, 1], f32.
    /// Above 1024x1024 pixels the decode is tiled.
    pub fn vae_decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let t = tiling::Tiling::default();
        if t.applies(h, w) {
            let f = self.vae.config().spatial_factor();
            tiling::decode_tiled(z, t, f, |tile| self.vae.decode_scaled(tile))
        } else {
            self.vae.decode_scaled(z)
        }
    }

    /// One group of items with equal latent and text shapes, as one batch.
    fn velocity_group(&self, items: &[&ModelInput<'_>]) -> Result<Vec<Tensor>> {
        let (_, h, w) = items[0].latent.dims3()?;
        let packed = items
            .iter()
            .map(|i| latent::pack(&i.latent.to_device(&self.device)?))
            .collect::<Result<Vec<_>>>()?;
        let conds: Vec<&Tensor> = items.iter().map(|i| i.cond).collect();
        let sigmas: Vec<f32> = items.iter().map(|i| i.sigma).collect();
        let out = self.transformer.forward(
            &Tensor::stack(&packed, 0)?,
            &Tensor::stack(&conds, 0)?,
            &sigmas,
            h,
            w,
        )?;
        (0..items.len())
            .map(|k| latent::unpack(&out.get(k)?, h, w))
            .collect()
    }
}

impl Family for Flux2Klein {
    fn info(&self) -> &FamilyInfo {
        &self.info
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The positive prompt and, with CFG, the negative one (the reference always uses `""`
    /// for klein-base; a request's own negative prompt is honoured when given).
    fn encode(&self, prompt: &str, negative: Option<&str>) -> Result<Conditioning> {
        Ok(Conditioning {
            positive: self.encode_one(prompt)?,
            negative: negative.map(|n| self.encode_one(n)).transpose()?,
        })
    }

    fn sigmas(&self, steps: usize, width: usize, height: usize) -> Result<Vec<f32>> {
        self.check_size(width, height)?;
        let tokens = (width / SIZE_MULTIPLE) * (height / SIZE_MULTIPLE);
        sampler::sigmas_exponential(steps, sampler::flux2_mu(tokens, steps))
    }

    fn initial_latent(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        self.check_size(width, height)?;
        let c = self.transformer.config().in_channels;
        noise::initial_latent(
            seed,
            c,
            height / SIZE_MULTIPLE,
            width / SIZE_MULTIPLE,
            &self.device,
        )
    }

    /// Items are grouped by latent and text shape; each group runs as one batch, and every
    /// operation is per item, so an item's velocity is the same alone or in any batch.
    fn velocity(&self, items: &[ModelInput<'_>]) -> Result<Vec<Tensor>> {
        let mut out: Vec<Option<Tensor>> = vec![None; items.len()];
        let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
        for (k, item) in items.iter().enumerate() {
            let key = [item.latent.dims(), item.cond.dims()].concat();
            match groups.iter_mut().find(|(g, _)| *g == key) {
                Some((_, members)) => members.push(k),
                None => groups.push((key, vec![k])),
            }
        }
        for (_, members) in groups {
            let group: Vec<&ModelInput<'_>> = members.iter().map(|&k| &items[k]).collect();
            for (k, v) in members.into_iter().zip(self.velocity_group(&group)?) {
                out[k] = Some(v);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn decode(&self, latents: &[&Tensor]) -> Result<Vec<RgbImage>> {
        if latents.is_empty() {
            return Ok(Vec::new());
        }
        let z = self.vae_input(&Tensor::stack(latents, 0)?)?;
        to_rgb8(&self.vae_decode(&z)?)
    }

    fn work(&self, _prompt: &str, width: usize, height: usize) -> Result<Work> {
        self.check_size(width, height)?;
        Ok(flops::flux2(
            self.transformer.config(),
            self.text_encoder.config(),
            self.text_encoder.layers_run(),
            self.vae.config(),
            self.tokenizer.max_len(),
            width,
            height,
        ))
    }
}
