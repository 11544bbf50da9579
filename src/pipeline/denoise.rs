//! The denoising loop at step granularity, for any [`Family`]: each item carries its own
//! latent, conditioning, schedule and step counter, so items can join and leave a running batch
//! at any step boundary. One call of [`step`] runs one batched model evaluation for every
//! unfinished item it is given (positives, then the negatives of guided items).

use candle_core::Tensor;

use super::error::{PipelineError, Result};
use super::family::{CfgRule, Conditioning, Family, ModelInput};
use super::image::RgbImage;
use super::sampler::{combine_cfg, euler_step, Guidance};

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

/// One image being denoised.
pub struct DenoiseItem {
    latent: Tensor,
    cond: Conditioning,
    sigmas: Vec<f32>,
    step: usize,
    guidance: Guidance,
    /// The family's CFG rule when guidance is in force for this item.
    cfg: Option<CfgRule>,
    /// The velocity of the last evaluation (for previews of the clean-image estimate).
    last_velocity: Option<Tensor>,
}

impl DenoiseItem {
    /// An item starting from `latent` (f32, the family's layout) with the `steps + 1` sigmas
    /// of its schedule.
    pub fn new(
        model: &dyn Family,
        latent: Tensor,
        cond: Conditioning,
        sigmas: Vec<f32>,
        guidance: Guidance,
    ) -> Result<Self> {
        let cfg = model
            .info()
            .cfg
            .filter(|_| model.info().cfg_active(guidance.scale));
        if cfg.is_some() && cond.negative.is_none() {
            return Err(PipelineError::InvalidInput(
                "guidance is on but no negative conditioning was given".into(),
            ));
        }
        if sigmas.len() < 2 {
            return Err(PipelineError::InvalidInput(
                "a schedule needs at least one step".into(),
            ));
        }
        Ok(Self {
            latent,
            cond,
            sigmas,
            step: 0,
            guidance,
            cfg,
            last_velocity: None,
        })
    }

    pub fn is_done(&self) -> bool {
        self.step + 1 >= self.sigmas.len()
    }
    pub fn steps_done(&self) -> usize {
        self.step
    }
    pub fn steps_total(&self) -> usize {
        self.sigmas.len() - 1
    }
    /// The current latent (f32, the family's layout).
    pub fn latent(&self) -> &Tensor {
        &self.latent
    }
    /// Whether classifier-free guidance runs for this item.
    pub fn uses_cfg(&self) -> bool {
        self.cfg.is_some()
    }
    /// The sigma schedule (n + 1 values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    /// The model's current estimate of the clean latent, `x - sigma v` (after at least one
    /// step; the velocity of the last evaluation with the sigma it was made at).
    pub fn clean_estimate(&self) -> Result<Option<Tensor>> {
        let Some(v) = &self.last_velocity else {
            return Ok(None);
        };
        // The latent has already moved to sigmas[step]; x0 = x_t - sigma_t v holds for the
        // flow-matching straight path at any t along the same velocity.
        let sigma = self.sigmas[self.step] as f64;
        Ok(Some((&self.latent - (v * sigma)?)?))
    }
}

/// Run one denoising step for every unfinished item: one batched model evaluation holding the
/// positives of all items, then the negatives of those whose guidance is in force at this step.
pub fn step(model: &dyn Family, items: &mut [&mut DenoiseItem]) -> Result<()> {
    let active: Vec<usize> = (0..items.len()).filter(|&i| !items[i].is_done()).collect();
    if active.is_empty() {
        return Ok(());
    }
    let mut scales = Vec::with_capacity(active.len());
    for &i in &active {
        let it = &items[i];
        let sigma = it.sigmas[it.step];
        scales.push(match it.cfg {
            Some(_) => it.guidance.scale_at(1.0 - sigma),
            None => 0.0,
        });
    }
    let mut inputs: Vec<ModelInput> = active
        .iter()
        .map(|&i| ModelInput {
            latent: &items[i].latent,
            cond: &items[i].cond.positive,
            sigma: items[i].sigmas[items[i].step],
        })
        .collect();
    let mut neg_of = vec![None; active.len()];
    for (k, &i) in active.iter().enumerate() {
        let it = &items[i];
        if let (Some(rule), Some(neg)) = (it.cfg, &it.cond.negative) {
            if rule.active(scales[k]) {
                neg_of[k] = Some(inputs.len());
                inputs.push(ModelInput {
                    latent: &it.latent,
                    cond: neg,
                    sigma: it.sigmas[it.step],
                });
            }
        }
    }
    let outs = model.velocity(&inputs)?;
    drop(inputs);
    if outs.len() < active.len() + neg_of.iter().flatten().count() {
        return Err(PipelineError::InvalidInput(
            "the model returned fewer outputs than inputs".into(),
        ));
    }
    for (k, &i) in active.iter().enumerate() {
        let it = &mut *items[i];
        let v = match (neg_of[k], it.cfg) {
            (Some(j), Some(rule)) => combine_cfg(
                rule,
                &outs[k],
                &outs[j],
                scales[k],
                it.guidance.normalization,
            )?,
            _ => outs[k].clone(),
        };
        let (s, s_next) = (it.sigmas[it.step], it.sigmas[it.step + 1]);
        it.latent = euler_step(&it.latent, &v, s, s_next)?;
        it.last_velocity = Some(v);
        it.step += 1;
    }
    Ok(())
}

/// Fail when a final latent holds inf or NaN (broken weights or a kernel that overflowed):
/// the decoded image would be flat or black. One reduction per item, checked before the decode
/// and never inside a step, where reading the result back would stall the device's queue
/// (a NaN stays NaN through the remaining steps, so nothing is missed); a sum of finite values
/// that overflows f32 is as broken as a NaN.
fn check_finite(latent: &Tensor, steps: usize) -> Result<()> {
    let sum = latent
        .sum_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_scalar::<f32>()?;
    if sum.is_finite() {
        Ok(())
    } else {
        Err(PipelineError::NonFinite(format!(
            "the latent is not finite after {steps} steps"
        )))
    }
}

/// Decode finished items together.
pub fn decode(model: &dyn Family, items: &[&DenoiseItem]) -> Result<Vec<RgbImage>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    for it in items {
        check_finite(&it.latent, it.step)?;
    }
    let latents: Vec<&Tensor> = items.iter().map(|i| &i.latent).collect();
    model.decode(&latents)
}

/// A preview of an item in flight: its current clean-image estimate, decoded with the
/// family's decoder. `None` before the first step.
pub fn preview(model: &dyn Family, item: &DenoiseItem) -> Result<Option<RgbImage>> {
    let Some(x0) = item.clean_estimate()? else {
        return Ok(None);
    };
    Ok(model.decode(&[&x0])?.into_iter().next())
}

/// Check a spec against the model: size, steps, images.
pub fn check_spec(model: &dyn Family, spec: &GenerateSpec) -> Result<()> {
    model.check_size(spec.width, spec.height)?;
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
pub fn condition(model: &dyn Family, spec: &GenerateSpec) -> Result<Conditioning> {
    let negative = model
        .info()
        .cfg_active(spec.guidance.scale)
        .then_some(spec.negative_prompt.as_str());
    model.encode(&spec.prompt, negative)
}

/// The items of a spec, each starting from its own seed's noise.
pub fn items(
    model: &dyn Family,
    spec: &GenerateSpec,
    cond: &Conditioning,
) -> Result<Vec<DenoiseItem>> {
    check_spec(model, spec)?;
    let sigmas = model.sigmas(spec.steps, spec.width, spec.height)?;
    spec.seeds
        .iter()
        .map(|&seed| {
            let latent = model.initial_latent(seed, spec.width, spec.height)?;
            DenoiseItem::new(model, latent, cond.clone(), sigmas.clone(), spec.guidance)
        })
        .collect()
}

/// Generate a spec's images in one batched loop; `on_step(done, total)` after each step.
pub fn generate(
    model: &dyn Family,
    spec: &GenerateSpec,
    mut on_step: impl FnMut(usize, usize),
) -> Result<Vec<RgbImage>> {
    let cond = condition(model, spec)?;
    let mut items = items(model, spec, &cond)?;
    let total = spec.steps;
    while items.iter().any(|i| !i.is_done()) {
        let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
        step(model, &mut refs)?;
        on_step(items[0].steps_done(), total);
    }
    let refs: Vec<&DenoiseItem> = items.iter().collect();
    decode(model, &refs)
}
