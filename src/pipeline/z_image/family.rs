//! Z-Image behind the model seam: the latent is the VAE latent `(16, H/8, W/8)`, the
//! conditioning is the refined caption stream (it depends on the prompt alone, so it is computed
//! once per request, not at every step), and the velocity is the negated transformer output
//! (Z-Image predicts `-v`: the reference steps `x - dt * out`).

use candle_core::{DType, Device, Tensor};

use super::transformer::{ItemInput, Transformer};
use super::ZImage;
use crate::pipeline::error::Result;
use crate::pipeline::family::{CfgRule, Conditioning, Family, FamilyInfo, ModelInput};
use crate::pipeline::flops::Work;
use crate::pipeline::image::{to_rgb8, RgbImage};
use crate::pipeline::noise::initial_latent;
use crate::pipeline::sampler::{model_time, sigmas};
use crate::pipeline::vae::VaeDecoder;

/// Prompts are cut at this many tokens by default (the reference's `max_sequence_length`).
pub const MAX_SEQUENCE_LENGTH: usize = 512;
/// Turbo's evaluations (the hosted docs' "9 steps" are 9 sigmas).
pub const DEFAULT_STEPS: usize = 8;

pub(super) fn info(vae: &VaeDecoder, transformer: &Transformer) -> FamilyInfo {
    FamilyInfo {
        family: "z-image",
        size_multiple: vae.config().spatial_factor() * transformer.config().patch(),
        default_steps: DEFAULT_STEPS,
        max_sequence_length: MAX_SEQUENCE_LENGTH,
        cfg: Some(CfgRule::PositivePlus),
    }
}

impl Family for ZImage {
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

    fn encode(&self, prompt: &str, negative: Option<&str>) -> Result<Conditioning> {
        let positive = self.refine_caption(&self.encode_prompt(prompt)?)?;
        let negative = negative
            .map(|n| self.refine_caption(&self.encode_prompt(n)?))
            .transpose()?;
        Ok(Conditioning { positive, negative })
    }

    fn sigmas(&self, steps: usize, _width: usize, _height: usize) -> Result<Vec<f32>> {
        sigmas(self.scheduler_config(), steps)
    }

    fn initial_latent(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        let f = self.vae_config().spatial_factor();
        initial_latent(
            seed,
            self.latent_channels(),
            height / f,
            width / f,
            self.device(),
        )
    }

    fn velocity(&self, items: &[ModelInput<'_>]) -> Result<Vec<Tensor>> {
        let sched = self.scheduler_config();
        let scale = sched.num_train_timesteps as f32;
        let inputs: Vec<ItemInput> = items
            .iter()
            .map(|i| ItemInput {
                latent: i.latent,
                caption: i.cond,
                // The reference's timestep is `sigma * T` in f32; the model sees `(T - t) / T`.
                t: model_time(sched, i.sigma * scale),
            })
            .collect();
        self.transformer_forward(&inputs)?
            .into_iter()
            .map(|o| Ok(o.neg()?))
            .collect()
    }

    fn decode(&self, latents: &[&Tensor]) -> Result<Vec<RgbImage>> {
        let batch = Tensor::stack(latents, 0)?;
        to_rgb8(&ZImage::decode(self, &batch)?)
    }

    fn work(&self, prompt: &str, width: usize, height: usize) -> Result<Work> {
        ZImage::work(self, prompt, width, height)
    }
}
