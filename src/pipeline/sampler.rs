//! Flow-matching Euler sampling: the shifted sigma schedules (Z-Image's static shift, FLUX.2's
//! dynamic exponential shift), the model's time input, the Euler step and classifier-free
//! guidance. Pure functions; all arithmetic in f32 as the reference does.

use candle_core::Tensor;
use serde::Deserialize;

use super::error::{PipelineError, Result};
use super::family::CfgRule;

/// `scheduler/scheduler_config.json` (FlowMatchEulerDiscreteScheduler).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn default_shift() -> f64 {
    1.0
}

/// The sigmas of an `n`-step run: `linspace(1, 1/n, n)` shifted statically
/// (`s' = shift*s / (1 + (shift-1)*s)`), then a final 0 (n + 1 values).
pub fn sigmas(cfg: &SchedulerConfig, n: usize) -> Result<Vec<f32>> {
    if n == 0 {
        return Err(PipelineError::InvalidInput(
            "steps must be at least 1".into(),
        ));
    }
    if cfg.use_dynamic_shifting {
        return Err(PipelineError::InvalidInput(
            "schedulers with dynamic shifting are not supported".into(),
        ));
    }
    let shift = cfg.shift as f32;
    let mut out: Vec<f32> = base_sigmas(n)
        .map(|s| shift * s / (1.0 + (shift - 1.0) * s))
        .collect();
    out.push(0.0);
    Ok(out)
}

/// `linspace(1, 1/n, n)` as numpy computes it in f64, each value cast to f32.
fn base_sigmas(n: usize) -> impl Iterator<Item = f32> {
    let start = 1.0f64;
    let end = 1.0f64 / n as f64;
    (0..n).map(move |i| {
        (if n == 1 {
            start
        } else {
            let step = (end - start) / (n - 1) as f64;
            if i == n - 1 {
                end
            } else {
                start + i as f64 * step
            }
        }) as f32
    })
}

/// FLUX.2's empirical `mu` for `image_seq_len` image tokens and `steps` steps (f64): a line in
/// the token count above 4300 tokens, below it an interpolation in the step count between the
/// lines fitted at 10 and 200 steps (so it jumps at 4300 tokens).
pub fn flux2_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let l = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * l + b2;
    }
    let m200 = a2 * l + b2;
    let m10 = a1 * l + b1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * steps as f64 + b
}

/// The sigmas of an `n`-step run with the exponential time shift of dynamic shifting:
/// `s' = e / (e + (1/s - 1))`, `e = exp(mu)` rounded to f32 and every operation in f32 as the
/// reference (numpy float32) does; then a final 0 (n + 1 values).
pub fn sigmas_exponential(n: usize, mu: f64) -> Result<Vec<f32>> {
    if n == 0 {
        return Err(PipelineError::InvalidInput(
            "steps must be at least 1".into(),
        ));
    }
    let e = mu.exp() as f32;
    let mut out: Vec<f32> = base_sigmas(n).map(|s| e / (e + (1.0 / s - 1.0))).collect();
    out.push(0.0);
    Ok(out)
}

/// `timesteps = sigma * num_train_timesteps` (the first n sigmas).
pub fn timesteps(cfg: &SchedulerConfig, sigmas: &[f32]) -> Vec<f32> {
    let scale = cfg.num_train_timesteps as f32;
    sigmas[..sigmas.len().saturating_sub(1)]
        .iter()
        .map(|s| s * scale)
        .collect()
}

/// The transformer's time input: `(T - timestep) / T`.
pub fn model_time(cfg: &SchedulerConfig, timestep: f32) -> f32 {
    let scale = cfg.num_train_timesteps as f32;
    (scale - timestep) / scale
}

/// Euler step on a velocity `v` (dx/dsigma): `x + (s_next - s) v`.
pub fn euler_step(x: &Tensor, v: &Tensor, sigma: f32, sigma_next: f32) -> Result<Tensor> {
    let dt = (sigma_next - sigma) as f64;
    Ok((x + (v * dt)?)?)
}

/// Guidance settings of one item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// CFG is on iff > 0.
    pub scale: f32,
    /// Guidance is dropped on steps whose `t = 1 - sigma` exceeds this (1.0: never).
    pub truncation: f32,
    /// When > 0, the guided prediction's norm is capped at `r * ||pos||`.
    pub normalization: f32,
}

impl Guidance {
    pub fn none() -> Self {
        Self {
            scale: 0.0,
            truncation: 1.0,
            normalization: 0.0,
        }
    }
    pub fn enabled(&self) -> bool {
        self.scale > 0.0
    }
    /// The scale in force at a step whose model time is `t_norm`.
    pub fn scale_at(&self, t_norm: f32) -> f32 {
        if self.enabled() && t_norm > self.truncation {
            0.0
        } else {
            self.scale
        }
    }
}

/// Combine a guided step's two predictions by the family's rule (`g` the scale in force).
pub fn combine_cfg(
    rule: CfgRule,
    pos: &Tensor,
    neg: &Tensor,
    g: f32,
    normalization: f32,
) -> Result<Tensor> {
    match rule {
        CfgRule::PositivePlus => apply_cfg(pos, neg, g, normalization),
        CfgRule::NegativePlus => Ok((neg + ((pos - neg)? * g as f64)?)?),
    }
}

/// `pos + g (pos - neg)`, with optional norm capping: when the prediction's norm exceeds
/// `normalization` times the positive's, it is scaled down to that. Computed on the device
/// (nothing is read back inside a step): the factor is `cap / |pred|` where the cap applies and
/// 1 elsewhere, and multiplying by 1 leaves every value as it was.
pub fn apply_cfg(pos: &Tensor, neg: &Tensor, g: f32, normalization: f32) -> Result<Tensor> {
    let pred = (pos + ((pos - neg)? * g as f64)?)?;
    if normalization > 0.0 {
        let pos_norm = pos.sqr()?.sum_all()?.sqrt()?;
        let pred_norm = pred.sqr()?.sum_all()?.sqrt()?;
        let cap = (pos_norm * normalization as f64)?;
        let factor = pred_norm
            .gt(&cap)?
            .where_cond(&(&cap / &pred_norm)?, &cap.ones_like()?)?;
        return Ok(pred.broadcast_mul(&factor)?);
    }
    Ok(pred)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turbo() -> SchedulerConfig {
        SchedulerConfig {
            num_train_timesteps: 1000,
            shift: 3.0,
            use_dynamic_shifting: false,
        }
    }

    #[test]
    fn eight_step_schedule_matches_the_reference() {
        let s = sigmas(&turbo(), 8).unwrap_or_default();
        let want = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0];
        assert_eq!(s.len(), want.len());
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn no_step_has_zero_length() {
        for n in 1..60 {
            let s = match sigmas(&turbo(), n) {
                Ok(s) => s,
                Err(e) => panic!("n={n}: {e}"),
            };
            assert_eq!(s.len(), n + 1, "n={n}: {s:?}");
            assert!(s.windows(2).all(|w| w[1] < w[0]), "n={n}: {s:?}");
        }
    }

    #[test]
    fn zero_steps_is_an_error() {
        assert!(sigmas(&turbo(), 0).is_err());
        assert!(sigmas_exponential(0, 1.0).is_err());
    }

    #[test]
    fn flux2_schedule_at_1024_four_steps() {
        // 64x64 tokens; values from the reference's cases/schedules.json (diffusers 0.42.1).
        let mu = flux2_mu(4096, 4);
        assert!((mu - 2.291179894115571).abs() < 1e-12, "{mu}");
        let s = sigmas_exponential(4, mu).unwrap_or_default();
        let want: Vec<f32> = [
            1.0f64,
            0.9673840403556824,
            0.908143937587738,
            0.7671999335289001,
            0.0,
        ]
        .iter()
        .map(|&x| x as f32)
        .collect();
        assert_eq!(s, want);
        // Above 4300 tokens mu no longer depends on the steps.
        assert_eq!(flux2_mu(6889, 4), flux2_mu(6889, 50));
        assert!((flux2_mu(6889, 4) - 1.6228).abs() < 1e-4);
    }

    #[test]
    fn truncation_drops_guidance_late() {
        let g = Guidance {
            scale: 2.0,
            truncation: 0.5,
            normalization: 0.0,
        };
        assert_eq!(g.scale_at(0.4), 2.0);
        assert_eq!(g.scale_at(0.6), 0.0);
    }

    /// The norm cap, computed on the device, against the same arithmetic on the host: the
    /// prediction scaled to `normalization x |pos|` when above it, untouched otherwise.
    #[test]
    fn cfg_normalization_caps_the_norm_on_the_device() {
        let dev = candle_core::Device::Cpu;
        let pos =
            Tensor::new(&[[0.5f32, -1.25], [2.0, 0.75]], &dev).unwrap_or_else(|e| panic!("{e}"));
        let neg =
            Tensor::new(&[[0.25f32, -0.5], [1.0, 1.5]], &dev).unwrap_or_else(|e| panic!("{e}"));
        let values = |t: &Tensor| -> Vec<f32> {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let g = 3.0f32;
        let plain: Vec<f32> = values(&pos)
            .iter()
            .zip(values(&neg))
            .map(|(p, n)| p + (p - n) * g)
            .collect();
        // A cap below the prediction's norm scales it; one above leaves it bit for bit.
        let capped = apply_cfg(&pos, &neg, g, 1.0).unwrap_or_else(|e| panic!("{e}"));
        let factor = norm(&values(&pos)) / norm(&plain);
        assert!(factor < 1.0);
        let want: Vec<f32> = plain.iter().map(|v| v * factor).collect();
        assert_eq!(values(&capped), want);
        assert!((norm(&values(&capped)) - norm(&values(&pos))).abs() < 1e-5);
        let loose = apply_cfg(&pos, &neg, g, 100.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(values(&loose), plain);
    }
}
