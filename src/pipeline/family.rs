//! The model seam: the one small interface every model family implements. The step loop
//! ([`super::denoise`]) and the scheduler drive any family through it and never name one.
//!
//! A family owns its prompt encoding, its latent layout, its transformer and its decoder; the
//! schedule arithmetic, Euler and CFG stay shared pure functions ([`super::sampler`]). Every
//! family computes an item's output from that item alone, so batching never changes an image.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::error::{PipelineError, Result};
use super::flops::Work;
use super::image::RgbImage;
use super::load::ComponentSource;
use super::quant::QuantType;
use super::shared_weights::{self, Share};

/// How a family combines the positive and negative predictions of a guided step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CfgRule {
    /// `pos + g (pos - neg)`, on iff `g > 0` (Z-Image).
    PositivePlus,
    /// `neg + g (pos - neg)`, on iff `g > 1` (FLUX.2 base checkpoints).
    NegativePlus,
}

impl CfgRule {
    /// Whether a request's guidance scale turns CFG on under this rule.
    pub fn active(self, scale: f32) -> bool {
        match self {
            CfgRule::PositivePlus => scale > 0.0,
            CfgRule::NegativePlus => scale > 1.0,
        }
    }
}

/// Fixed facts of a loaded family.
#[derive(Debug, Clone)]
pub struct FamilyInfo {
    /// `z-image`, `flux2-klein`: the catalog's `family` spelling.
    pub family: &'static str,
    /// Width and height must be multiples of this (VAE factor x patch).
    pub size_multiple: usize,
    /// Model evaluations when a request names none.
    pub default_steps: usize,
    /// Prompts are cut at this many tokens (after the chat template).
    pub max_sequence_length: usize,
    /// `None`: a distilled checkpoint; a guidance scale is accepted and ignored.
    pub cfg: Option<CfgRule>,
}

impl FamilyInfo {
    /// Whether CFG runs for a request with this guidance scale.
    pub fn cfg_active(&self, scale: f32) -> bool {
        self.cfg.is_some_and(|r| r.active(scale))
    }
}

/// Prompt-only work of one request (text features and whatever of the model depends on the
/// prompt alone), computed once and shared by every image and step of the request.
#[derive(Clone)]
pub struct Conditioning {
    pub positive: Tensor,
    /// Present iff CFG is on.
    pub negative: Option<Tensor>,
}

/// One item's input to a batched model evaluation.
pub struct ModelInput<'a> {
    /// The item's current latent (f32, the family's layout, as made by
    /// [`Family::initial_latent`]).
    pub latent: &'a Tensor,
    /// One of the tensors of a [`Conditioning`].
    pub cond: &'a Tensor,
    /// The sigma of this step (the schedule's value, before the family's time mapping).
    pub sigma: f32,
}

/// A loaded pipeline of one family on one device.
pub trait Family: Send {
    fn info(&self) -> &FamilyInfo;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
    /// Bytes of weights this pipeline holds on its device.
    fn weight_bytes(&self) -> u64;
    /// Check a size: positive multiples of [`FamilyInfo::size_multiple`], with a clear
    /// message otherwise.
    fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let m = self.info().size_multiple;
        if width == 0 || height == 0 || !width.is_multiple_of(m) || !height.is_multiple_of(m) {
            return Err(PipelineError::InvalidInput(format!(
                "width and height must be positive multiples of {m} (got {width}x{height})"
            )));
        }
        Ok(())
    }
    /// Encode a prompt, and the negative prompt when `negative` is given (CFG on).
    fn encode(&self, prompt: &str, negative: Option<&str>) -> Result<Conditioning>;
    /// The `steps + 1` sigmas of a run at this image size, ending at 0.
    fn sigmas(&self, steps: usize, width: usize, height: usize) -> Result<Vec<f32>>;
    /// The starting latent of one image, from its seed alone (f32, on the device).
    fn initial_latent(&self, seed: u64, width: usize, height: usize) -> Result<Tensor>;
    /// One batched model evaluation: per item, the velocity `v` (f32, the latent's layout) with
    /// `x_next = x + (sigma_next - sigma) v`.
    fn velocity(&self, items: &[ModelInput<'_>]) -> Result<Vec<Tensor>>;
    /// Decode final latents (one per image) to RGB.
    fn decode(&self, latents: &[&Tensor]) -> Result<Vec<RgbImage>>;
    /// The arithmetic of one request for `prompt` at this size, counted from the loaded
    /// configuration ([`super::flops`]): what `diffusiond bench` reports TFLOP/s against.
    fn work(&self, prompt: &str, width: usize, height: usize) -> Result<Work>;
}

/// How to load a pipeline of any family.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// Keep the text encoder in host memory (f32, run on the CPU).
    pub offload_text_encoder: bool,
    /// Cut prompts at this many tokens instead of the family's default.
    pub max_sequence_length: Option<usize>,
    /// Components (`transformer`, `text_encoder`) taken from a GGUF file instead of the
    /// checkout.
    pub components: BTreeMap<String, ComponentSource>,
    /// Components whose full-precision weights are quantized at load (`--quantize`).
    pub quantize: BTreeMap<String, QuantType>,
    /// Tensors shared with the other pipelines of the device (the scheduler's; `None`: this
    /// load holds its own).
    pub share: Option<Share>,
}

impl LoadOptions {
    /// These options for one pipeline: its components from GGUF files (`component` ->
    /// `FILE.gguf` / `hf:ORG/REPO/PATH.gguf`) and its quantization at load (`q8_0`, ...; for
    /// the transformer and the text encoder unless the command line set them already).
    pub fn for_pipeline(
        &self,
        components: &BTreeMap<String, String>,
        quantize: Option<&str>,
    ) -> Result<Self> {
        let mut o = self.clone();
        for (component, src) in components {
            o.components
                .insert(component.clone(), src.parse::<ComponentSource>()?);
        }
        if let Some(q) = quantize {
            let q: QuantType = q.parse()?;
            for c in ["transformer", "text_encoder"] {
                o.quantize.entry(c.to_string()).or_insert(q);
            }
        }
        Ok(o)
    }

    /// Options with no component overrides and no quantization.
    pub fn new(device: Device, dtype: DType) -> Self {
        Self {
            device,
            dtype,
            offload_text_encoder: false,
            max_sequence_length: None,
            components: BTreeMap::new(),
            quantize: BTreeMap::new(),
            share: None,
        }
    }

    /// The sharing to load `component` on `device` with: none for a component that is not
    /// [`shared_weights::SHAREABLE`], and none off the run device (an offloaded text encoder),
    /// where the budget does not count it.
    pub fn share_for(&self, component: &str, device: &Device) -> Option<&Share> {
        self.share.as_ref().filter(|_| {
            shared_weights::SHAREABLE.contains(&component) && device.same_device(&self.device)
        })
    }
}
