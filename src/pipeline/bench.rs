//! Stage timings of a loaded pipeline for `diffusiond bench`, through the same calls the
//! scheduler makes ([`denoise::condition`], [`denoise::items`], [`denoise::step`],
//! [`denoise::decode`]). The device is synchronised around every timed stage and nowhere inside
//! one, so a stage's time is what the device took for it, not how long it took to queue. How
//! long a step took to queue is kept too: on a GPU a step that reads nothing back from the
//! device returns long before the device has finished it.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::denoise::{self, DenoiseItem, GenerateSpec};
use super::error::Result;
use super::family::Family;

/// Seconds per stage over the measured runs (one entry per run; `step` one per step).
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    pub encode: Vec<f64>,
    pub step: Vec<f64>,
    /// Per step: the time until [`denoise::step`] returned, before the device was awaited.
    /// Equal to `step` where the device runs synchronously (the CPU); well below it on a GPU
    /// unless the step waits for the device somewhere (a value read back to the host).
    pub step_queued: Vec<f64>,
    pub decode: Vec<f64>,
}

fn sync(dev: &Device) -> Result<()> {
    Ok(dev.synchronize()?)
}

/// One generation of `spec`, stage by stage, appended to `times`.
fn run_once(model: &dyn Family, spec: &GenerateSpec, times: &mut StageTimes) -> Result<()> {
    let dev = model.device();
    sync(dev)?;
    let t = Instant::now();
    let cond = denoise::condition(model, spec)?;
    sync(dev)?;
    times.encode.push(t.elapsed().as_secs_f64());
    let mut items = denoise::items(model, spec, &cond)?;
    sync(dev)?;
    while items.iter().any(|i| !i.is_done()) {
        let t = Instant::now();
        let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
        denoise::step(model, &mut refs)?;
        times.step_queued.push(t.elapsed().as_secs_f64());
        sync(dev)?;
        times.step.push(t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let refs: Vec<&DenoiseItem> = items.iter().collect();
    // The images come back to the host as RGB bytes, so the decode is complete on return.
    denoise::decode(model, &refs)?;
    times.decode.push(t.elapsed().as_secs_f64());
    Ok(())
}

/// Run `spec` `warmup` times untimed (kernel loading, weight packing, allocator growth), then
/// `runs` times timed. `between` is called before the timed runs (to reset a memory peak).
pub fn measure(
    model: &dyn Family,
    spec: &GenerateSpec,
    warmup: usize,
    runs: usize,
    between: impl FnOnce(),
) -> Result<StageTimes> {
    let mut scratch = StageTimes::default();
    for _ in 0..warmup {
        run_once(model, spec, &mut scratch)?;
    }
    between();
    let mut times = StageTimes::default();
    for _ in 0..runs {
        run_once(model, spec, &mut times)?;
    }
    Ok(times)
}

/// Whether the VAE decodes an image of this size in tiles (above 1024x1024 pixels).
pub fn vae_tiled(width: usize, height: usize) -> bool {
    super::vae::tiling::Tiling::default().applies(height / 8, width / 8)
}

/// The best TFLOP/s of a square matrix product on the model's device in its dtype: the peak
/// used for a CPU, where no table entry exists (best of `reps` products of n x n matrices).
pub fn measure_matmul_tflops(dev: &Device, dtype: DType, n: usize, reps: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) + 1 {
        sync(dev)?;
        let t = Instant::now();
        let c = a.matmul(&b)?;
        sync(dev)?;
        drop(c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e12)
}

/// `cpu`, `cuda:N`, `metal:N` for a model's device.
pub fn device_label(model: &dyn Family) -> String {
    super::device::describe(model.device())
}

/// `f32`, `bf16`, `f16` for a model's dtype.
pub fn dtype_label(model: &dyn Family) -> String {
    format!("{:?}", model.dtype()).to_ascii_lowercase()
}
