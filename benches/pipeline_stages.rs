//! Per-stage timing of one generation, the same workload as the reference's
//! `bench_diffusers.py`, printing one JSON line of medians (used by `scripts/bench-vs-diffusers`).
//!
//!     cargo bench --bench pipeline_stages -- --model DIR [--num-images 1 --runs 5 --warmup 2
//!         --height 256 --width 256 --steps 9 --threads 2]
//!
//! Stages: text_encode_s = prompt encoding; denoise_per_step_s = denoising loop / steps;
//! vae_decode_s = VAE decoder forward; total_s = prompt to RGB bytes.

use std::time::Instant;

use candle_core::Tensor;
use diffusiond::pipeline::denoise::{self, DenoiseItem, GenerateSpec};
use diffusiond::pipeline::{self, DeviceSpec, Family, Guidance, RunOptions, WeightSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROMPT: &str =
    "a photo of a cat sitting on a wooden table next to a window, soft morning light";

struct Args {
    model: String,
    height: usize,
    width: usize,
    steps: usize,
    num_images: usize,
    runs: usize,
    warmup: usize,
    /// Time the denoising loop only (for profiling the transformer).
    skip_vae: bool,
    /// `z-image` or `flux2-klein`: checked against the model's own family.
    family: Option<String>,
}

/// The command line; an unknown flag or a bad value stops the bench (a typo must not silently
/// measure the defaults).
fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: std::env::var("DIFFUSIOND_BENCH_MODEL").unwrap_or_default(),
        height: 256,
        width: 256,
        steps: 9,
        num_images: 1,
        runs: 5,
        warmup: 2,
        skip_vae: false,
        family: None,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        let mut number = || -> Result<usize, String> {
            let v = value()?;
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: '{v}' is not a whole number"))
        };
        match flag.as_str() {
            "--model" => a.model = value()?,
            "--height" => a.height = number()?,
            "--width" => a.width = number()?,
            "--steps" => a.steps = number()?,
            "--num-images" => a.num_images = number()?,
            "--runs" => a.runs = number()?,
            "--warmup" => a.warmup = number()?,
            "--threads" => {
                // The rayon pool reads it when first used, which is after this.
                std::env::set_var("RAYON_NUM_THREADS", number()?.to_string());
            }
            "--skip-vae" => a.skip_vae = true,
            // The family is read from the model's model_index.json; given, it must agree.
            "--family" => a.family = Some(value()?),
            // Passed by `cargo bench` itself.
            "--bench" => {}
            other => {
                return Err(format!(
                "unknown argument '{other}' (takes --model DIR --family NAME --height N --width N \
                     --steps N --num-images N --runs N --warmup N --threads N --skip-vae)"
            ))
            }
        }
    }
    if a.steps == 0 || a.num_images == 0 || a.runs == 0 {
        return Err("--steps, --num-images and --runs must be at least 1".into());
    }
    Ok(a)
}

/// One untimed generation, checked before anything is timed: finite latents and the right number
/// of images of the right size whose pixels are not all alike (a broken pipeline is not timed).
fn check(model: &dyn Family, a: &Args, s: &GenerateSpec) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let cond = denoise::condition(model, s).map_err(|e| err(&e))?;
    let mut items = denoise::items(model, s, &cond).map_err(|e| err(&e))?;
    while items.iter().any(|i| !i.is_done()) {
        let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
        denoise::step(model, &mut refs).map_err(|e| err(&e))?;
    }
    let latents: Vec<&Tensor> = items.iter().map(|i| i.latent()).collect();
    let batch = Tensor::stack(&latents, 0).map_err(|e| err(&e))?;
    let values = batch
        .flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| err(&e))?;
    if values.iter().any(|v| !v.is_finite()) {
        return Err("the latents are not finite".into());
    }
    if a.skip_vae {
        return Ok(());
    }
    let images = model.decode(&latents).map_err(|e| err(&e))?;
    if images.len() != a.num_images {
        return Err(format!("{} images, not {}", images.len(), a.num_images));
    }
    for img in &images {
        let (w, h) = (img.width as usize, img.height as usize);
        if (w, h) != (a.width, a.height) || img.data.len() != w * h * 3 {
            return Err(format!("an image is {w}x{h} ({} bytes)", img.data.len()));
        }
        if img.data.iter().all(|&p| p == img.data[0]) {
            return Err("an image is one flat colour".into());
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Load a model directory of any family (from its `model_index.json`) on the CPU in f32.
fn common_load(dir: &str) -> Box<dyn Family> {
    let opts = RunOptions {
        device: DeviceSpec::Cpu,
        ..RunOptions::default()
    }
    .open()
    .expect("cpu");
    pipeline::load(&WeightSource::Local(dir.into()), None, &opts).expect("load")
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pipeline_stages: {e}");
            std::process::exit(2);
        }
    };
    diffusiond::pipeline::device::init_cpu_runtime();
    if a.model.is_empty() {
        eprintln!("pipeline_stages: pass --model DIR (or set DIFFUSIOND_BENCH_MODEL); skipping");
        return;
    }
    let model = common_load(&a.model);
    let model = model.as_ref();
    if let Some(f) = &a.family {
        if f != model.info().family {
            eprintln!(
                "pipeline_stages: --family {f} but {} holds a {} model",
                a.model,
                model.info().family
            );
            std::process::exit(2);
        }
    }
    let spec = |seed: u64| GenerateSpec {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        width: a.width,
        height: a.height,
        seeds: (0..a.num_images as u64).map(|i| seed * 100 + i).collect(),
        steps: a.steps,
        guidance: Guidance::none(),
    };
    if let Err(e) = check(model, &a, &spec(u64::from(u32::MAX))) {
        eprintln!("pipeline_stages: the pipeline's output is wrong, nothing timed: {e}");
        std::process::exit(1);
    }
    let (mut te, mut step, mut vae, mut total) = (vec![], vec![], vec![], vec![]);
    for r in 0..a.warmup + a.runs {
        let s = spec(r as u64);
        let t0 = Instant::now();
        let cond = denoise::condition(model, &s).expect("encode");
        let t_te = t0.elapsed().as_secs_f64();
        let mut items = denoise::items(model, &s, &cond).expect("items");
        let t1 = Instant::now();
        while items.iter().any(|i| !i.is_done()) {
            let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
            denoise::step(model, &mut refs).expect("step");
        }
        let t_step = t1.elapsed().as_secs_f64() / a.steps as f64;
        if a.skip_vae {
            eprintln!("run {r}: text {t_te:.3}s step {t_step:.3}s");
            continue;
        }
        let latents: Vec<&Tensor> = items.iter().map(|i| i.latent()).collect();
        let t2 = Instant::now();
        let images = model.decode(&latents).expect("decode");
        let t_vae = t2.elapsed().as_secs_f64();
        let t_total = t0.elapsed().as_secs_f64();
        assert_eq!(images.len(), a.num_images);
        eprintln!("run {r}: text {t_te:.3}s step {t_step:.3}s vae {t_vae:.3}s total {t_total:.3}s");
        if r >= a.warmup {
            te.push(t_te);
            step.push(t_step);
            vae.push(t_vae);
            total.push(t_total);
        }
    }
    println!(
        "{{\"impl\": \"diffusiond {}\", \"height\": {}, \"width\": {}, \"steps\": {}, \"num_images\": {}, \"runs\": {}, \"warmup\": {}, \"text_encode_s\": {:.4}, \"denoise_per_step_s\": {:.4}, \"vae_decode_s\": {:.4}, \"total_s\": {:.4}, \"peak_rss_mb\": {:.1}}}",
        env!("CARGO_PKG_VERSION"),
        a.height,
        a.width,
        a.steps,
        a.num_images,
        a.runs,
        a.warmup,
        median(&mut te),
        median(&mut step),
        median(&mut vae),
        median(&mut total),
        peak_rss_mb()
    );
}
