//! The denoising loop at step granularity: each item carries its own latent, caption, schedule
//! and step counter, so items can join and leave a running batch at any step boundary. One call
//! of [`step`] runs one transformer evaluation for every unfinished item it is given.

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use super::error::{PipelineError, Result};
use super::image::{to_rgb8, RgbImage};
use super::noise::initial_latent;
use super::sampler::{apply_cfg, euler_step, model_time, sigmas, timesteps, Guidance};
use super::z_image::transformer::ItemInput;
use super::z_image::ZImage;

/// What to generate: `seeds.len()` images of one prompt at one size.
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    pub prompt: String,
    /// Used only when guidance is on.
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub seeds: Vec<u64>,
    /// Model evaluations.
    pub steps: usize,
    pub guidance: Guidance,
}

/// Encoded prompts of a spec, shared by all of its images: the text encoder's features and,
/// made on first use and then shared by every image and step, the refined caption streams.
#[derive(Clone)]
pub struct Conditioning {
    caption: Tensor,
    negative: Option<Tensor>,
    refined: Arc<OnceLock<Tensor>>,
    refined_negative: Arc<OnceLock<Tensor>>,
}

impl Conditioning {
    pub fn new(caption: Tensor, negative: Option<Tensor>) -> Self {
        Self {
            caption,
            negative,
            refined: Arc::default(),
            refined_negative: Arc::default(),
        }
    }

    fn refined(model: &ZImage, cell: &OnceLock<Tensor>, feats: &Tensor) -> Result<Tensor> {
        if let Some(t) = cell.get() {
            return Ok(t.clone());
        }
        let t = model.refine_caption(feats)?;
        Ok(cell.get_or_init(|| t).clone())
    }

    fn positive(&self, model: &ZImage) -> Result<Tensor> {
        Self::refined(model, &self.refined, &self.caption)
    }

    fn negative(&self, model: &ZImage) -> Result<Option<Tensor>> {
        self.negative
            .as_ref()
            .map(|n| Self::refined(model, &self.refined_negative, n))
            .transpose()
    }
}

/// One image being denoised.
pub struct DenoiseItem {
    latent: Tensor,
    cond: Conditioning,
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    step: usize,
    guidance: Guidance,
}

impl DenoiseItem {
    /// An item starting from `latent` `(C, h, w)` (f32).
    pub fn new(
        model: &ZImage,
        latent: Tensor,
        cond: Conditioning,
        steps: usize,
        guidance: Guidance,
    ) -> Result<Self> {
        if guidance.enabled() && cond.negative.is_none() {
            return Err(PipelineError::InvalidInput(
                "guidance is on but no negative conditioning was given".into(),
            ));
        }
        let sigmas = sigmas(model.scheduler_config(), steps)?;
        let timesteps = timesteps(model.scheduler_config(), &sigmas);
        Ok(Self {
            latent,
            cond,
            sigmas,
            timesteps,
            step: 0,
            guidance,
        })
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.timesteps.len()
    }
    pub fn steps_done(&self) -> usize {
        self.step
    }
    pub fn steps_total(&self) -> usize {
        self.timesteps.len()
    }
    /// The current latent `(C, h, w)` f32.
    pub fn latent(&self) -> &Tensor {
        &self.latent
    }
    /// `(h, w)` of the latent: items batch together only when this and [`Self::uses_cfg`] agree.
    pub fn latent_hw(&self) -> (usize, usize) {
        let d = self.latent.dims();
        (d[1], d[2])
    }
    pub fn uses_cfg(&self) -> bool {
        self.guidance.enabled()
    }
    /// The sigma schedule (n + 1 values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// Run one denoising step for every unfinished item: one batched transformer call holding the
/// positives of all items, then the negatives of those whose guidance is in force at this step.
pub fn step(model: &ZImage, items: &mut [&mut DenoiseItem]) -> Result<()> {
    let active: Vec<usize> = (0..items.len()).filter(|&i| !items[i].is_done()).collect();
    if active.is_empty() {
        return Ok(());
    }
    let sched = model.scheduler_config();
    let mut times = Vec::with_capacity(active.len());
    let mut scales = Vec::with_capacity(active.len());
    for &i in &active {
        let it = &items[i];
        let t = model_time(sched, it.timesteps[it.step]);
        times.push(t);
        scales.push(it.guidance.scale_at(t));
    }
    let mut pos = Vec::with_capacity(active.len());
    let mut neg = Vec::with_capacity(active.len());
    for (k, &i) in active.iter().enumerate() {
        pos.push(items[i].cond.positive(model)?);
        neg.push(if scales[k] > 0.0 {
            items[i].cond.negative(model)?
        } else {
            None
        });
    }
    let mut inputs: Vec<ItemInput> = active
        .iter()
        .zip(&times)
        .zip(&pos)
        .map(|((&i, &t), caption)| ItemInput {
            latent: &items[i].latent,
            caption,
            t,
        })
        .collect();
    let mut neg_of = vec![None; active.len()];
    for (k, &i) in active.iter().enumerate() {
        if let Some(n) = &neg[k] {
            neg_of[k] = Some(inputs.len());
            inputs.push(ItemInput {
                latent: &items[i].latent,
                caption: n,
                t: times[k],
            });
        }
    }
    let outs = model.transformer_forward(&inputs)?;
    drop(inputs);
    for (k, &i) in active.iter().enumerate() {
        let it = &mut *items[i];
        let pred = match neg_of[k] {
            Some(j) => apply_cfg(&outs[k], &outs[j], scales[k], it.guidance.normalization)?,
            None => outs[k].clone(),
        };
        let (s, s_next) = (it.sigmas[it.step], it.sigmas[it.step + 1]);
        it.latent = euler_step(&it.latent, &pred, s, s_next)?;
        it.step += 1;
    }
    Ok(())
}

/// Decode finished items in one VAE batch.
pub fn decode(model: &ZImage, items: &[&DenoiseItem]) -> Result<Vec<RgbImage>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let latents: Vec<&Tensor> = items.iter().map(|i| &i.latent).collect();
    let batch = Tensor::stack(&latents, 0)?;
    to_rgb8(&model.decode(&batch)?)
}

impl ZImage {
    /// Check a spec against the model: size multiple, steps.
    pub fn check_spec(&self, spec: &GenerateSpec) -> Result<()> {
        let m = self.size_multiple();
        if spec.width == 0
            || spec.height == 0
            || !spec.width.is_multiple_of(m)
            || !spec.height.is_multiple_of(m)
        {
            return Err(PipelineError::InvalidInput(format!(
                "width and height must be positive multiples of {m} (got {}x{})",
                spec.width, spec.height
            )));
        }
        if spec.steps == 0 {
            return Err(PipelineError::InvalidInput(
                "steps must be at least 1".into(),
            ));
        }
        if spec.seeds.is_empty() {
            return Err(PipelineError::InvalidInput(
                "at least one image is needed".into(),
            ));
        }
        Ok(())
    }

    /// Encode a spec's prompt (and its negative prompt when guidance is on).
    pub fn condition(&self, spec: &GenerateSpec) -> Result<Conditioning> {
        let caption = self.encode_prompt(&spec.prompt)?;
        let negative = if spec.guidance.enabled() {
            Some(self.encode_prompt(&spec.negative_prompt)?)
        } else {
            None
        };
        Ok(Conditioning::new(caption, negative))
    }

    /// The items of a spec, each starting from its own seed's noise.
    pub fn items(&self, spec: &GenerateSpec, cond: &Conditioning) -> Result<Vec<DenoiseItem>> {
        self.check_spec(spec)?;
        let f = self.vae_config().spatial_factor();
        let (h, w) = (spec.height / f, spec.width / f);
        spec.seeds
            .iter()
            .map(|&seed| {
                let latent = initial_latent(seed, self.latent_channels(), h, w, self.device())?;
                DenoiseItem::new(self, latent, cond.clone(), spec.steps, spec.guidance)
            })
            .collect()
    }

    /// Generate a spec's images in one batched loop; `on_step(done, total)` after each step.
    pub fn generate(
        &self,
        spec: &GenerateSpec,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Vec<RgbImage>> {
        let cond = self.condition(spec)?;
        let mut items = self.items(spec, &cond)?;
        let total = spec.steps;
        while items.iter().any(|i| !i.is_done()) {
            let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
            step(self, &mut refs)?;
            on_step(items[0].steps_done(), total);
        }
        let refs: Vec<&DenoiseItem> = items.iter().collect();
        decode(self, &refs)
    }
}
