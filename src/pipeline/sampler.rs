//! Flow-matching Euler sampling: the shifted sigma schedule, the model's time input, the Euler
//! step and classifier-free guidance. Pure functions; all arithmetic in f32 as the reference does.

use candle_core::Tensor;
use serde::Deserialize;

use super::error::{PipelineError, Result};

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
    let start = 1.0f64;
    let end = 1.0f64 / n as f64;
    let mut out: Vec<f32> = (0..n)
        .map(|i| {
            // numpy linspace in f64, then cast to f32.
            let s = if n == 1 {
                start
            } else {
                let step = (end - start) / (n - 1) as f64;
                if i == n - 1 {
                    end
                } else {
                    start + i as f64 * step
                }
            } as f32;
            shift * s / (1.0 + (shift - 1.0) * s)
        })
        .collect();
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

/// Euler step on the raw model output `o` (velocity `-o`): `x + (s_next - s) * (-o)`.
pub fn euler_step(x: &Tensor, model_out: &Tensor, sigma: f32, sigma_next: f32) -> Result<Tensor> {
    let dt = (sigma_next - sigma) as f64;
    Ok((x - (model_out * dt)?)?)
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

/// `pos + g (pos - neg)`, with optional norm capping.
pub fn apply_cfg(pos: &Tensor, neg: &Tensor, g: f32, normalization: f32) -> Result<Tensor> {
    let pred = (pos + ((pos - neg)? * g as f64)?)?;
    if normalization > 0.0 {
        let pos_norm = pos.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let pred_norm = pred.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        let cap = normalization * pos_norm;
        if pred_norm > cap {
            return Ok((pred * (cap / pred_norm) as f64)?);
        }
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
}
