//! Criterion benchmark of the VAE decoder alone on the bench model: 1 and 4 latents of 32x32
//! (256x256 images), CPU f32. Reference (diffusers/torch, 2 threads): 0.13 s / 0.82 s.
//!
//!     DIFFUSIOND_BENCH_MODEL=$(scripts/bench-model) cargo bench --bench vae
//!
//! Without `DIFFUSIOND_BENCH_MODEL` it prints a note and measures nothing. With
//! `DIFFUSIOND_VAE_QUICK=N` it skips criterion and prints the median wall time and the mean
//! process CPU time (user + system, all threads) of N decodes at each batch size: on a shared
//! machine CPU time / threads bounds what an idle machine would take.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diffusiond::pipeline::vae::{VaeConfig, VaeDecoder};
use diffusiond::pipeline::{ModelFiles, WeightSource};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn model_dir() -> Option<PathBuf> {
    match std::env::var_os("DIFFUSIOND_BENCH_MODEL") {
        Some(p) if PathBuf::from(&p).join("vae/config.json").is_file() => Some(PathBuf::from(p)),
        _ => {
            eprintln!(
                "vae bench: set DIFFUSIOND_BENCH_MODEL to the bench model directory to run it"
            );
            None
        }
    }
}

fn load(dir: PathBuf) -> (VaeDecoder, VaeConfig) {
    diffusiond::pipeline::device::init_cpu_runtime();
    let files = ModelFiles::open(&WeightSource::Local(dir)).expect("bench model");
    let cfg: VaeConfig = files.json("vae/config.json").expect("vae config");
    let vb = files
        .var_builder("vae", "diffusion_pytorch_model", DType::F32, &Device::Cpu)
        .expect("vae weights");
    (VaeDecoder::new(&cfg, vb).expect("vae"), cfg)
}

/// Process CPU seconds (user + system) from `/proc/self/stat`, 0 where unavailable.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<f64> = after_name
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // Fields 14 and 15 of the whole line (utime, stime) in clock ticks of 1/100 s.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn quick(vae: &VaeDecoder, cfg: &VaeConfig, runs: usize) {
    let side = 256 / cfg.spatial_factor();
    for n in [1usize, 4] {
        let latents = Tensor::randn(
            0f32,
            1.0,
            (n, cfg.latent_channels, side, side),
            &Device::Cpu,
        )
        .expect("latents");
        vae.decode_scaled(&latents).expect("warm-up");
        let mut walls = Vec::new();
        let cpu0 = cpu_seconds();
        for _ in 0..runs {
            let t = std::time::Instant::now();
            vae.decode_scaled(&latents).expect("decode");
            walls.push(t.elapsed().as_secs_f64());
        }
        let cpu = (cpu_seconds() - cpu0) / runs as f64;
        walls.sort_by(f64::total_cmp);
        println!(
            "vae_decode 256x256 x{n}: median wall {:.4} s (min {:.4}), cpu {:.4} s per decode",
            walls[walls.len() / 2],
            walls[0],
            cpu
        );
    }
}

fn vae_decode(c: &mut Criterion) {
    let Some(dir) = model_dir() else {
        return;
    };
    let (vae, cfg) = load(dir);
    if let Some(runs) = std::env::var("DIFFUSIOND_VAE_QUICK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return quick(&vae, &cfg, runs.max(1));
    }
    let dev = Device::Cpu;
    let side = 256 / cfg.spatial_factor();

    let mut g = c.benchmark_group("vae_decode");
    g.sample_size(10);
    for n in [1usize, 4] {
        let latents =
            Tensor::randn(0f32, 1.0, (n, cfg.latent_channels, side, side), &dev).expect("latents");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("256x256/{n}"), |b| {
            b.iter(|| vae.decode_scaled(&latents).expect("decode"))
        });
    }
    g.finish();
}

criterion_group!(benches, vae_decode);
criterion_main!(benches);
