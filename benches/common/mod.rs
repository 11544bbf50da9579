//! Shared by the benchmarks: the mid-size bench model of `../shared/reference/bench`, whose
//! weights are made by its own script outside the repository (`scripts/bench-model` prints the
//! directory, creating it on first use). Benchmarks never gate CI: without a model they say so
//! and do nothing.
#![allow(dead_code)]

use std::path::PathBuf;

use diffusiond::pipeline::{
    self, DeviceSpec, Family, GenerateSpec, Guidance, RunOptions, WeightSource,
};

/// The reference benchmark's prompt (27 tokens).
pub const PROMPT: &str =
    "a photo of a cat sitting on a wooden table next to a window, soft morning light";

pub fn bench_model_dir() -> Option<PathBuf> {
    match std::env::var_os("DIFFUSIOND_BENCH_MODEL") {
        Some(p) if PathBuf::from(&p).join("model_index.json").is_file() => Some(PathBuf::from(p)),
        _ => {
            eprintln!(
                "no bench model: set DIFFUSIOND_BENCH_MODEL=$(scripts/bench-model) to run this benchmark"
            );
            None
        }
    }
}

/// Load a model directory of any family on the CPU in f32.
pub fn load(dir: &std::path::Path) -> Box<dyn Family> {
    pipeline::device::init_cpu_runtime();
    let opts = RunOptions {
        device: DeviceSpec::Cpu,
        ..RunOptions::default()
    }
    .open()
    .expect("cpu");
    pipeline::load(&WeightSource::Local(dir.to_path_buf()), None, &opts).expect("load bench model")
}

/// The reference workload: 256x256, 9 steps, no guidance.
pub fn spec(images: usize, seed: u64) -> GenerateSpec {
    GenerateSpec {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        width: 256,
        height: 256,
        seeds: (0..images as u64).map(|i| seed * 100 + i).collect(),
        steps: 9,
        guidance: Guidance::none(),
    }
}
