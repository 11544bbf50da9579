//! Pipelines load when first needed and the least recently used one is unloaded when the next
//! would exceed the memory budget; weights two pipelines read from byte-identical files are held
//! once; a pipeline larger than the budget is refused with a line that says what would fit.
//! Runs the real scheduler on the tiny reference model and on copies of it whose components
//! differ (or not) byte for byte.
#![allow(clippy::unwrap_used)]

mod common;

use diffusiond::catalog::Pipeline;
use diffusiond::pipeline::{
    self, DeviceSpec, GenerateSpec, Guidance, ModelFiles, RunOptions, WeightSource,
};
use diffusiond::scheduler::{self, Job, SchedulerConfig, SchedulerHandle};

use std::path::Path;

fn pipeline(name: &str) -> Pipeline {
    pipeline_at(name, &common::tiny_dir())
}

fn pipeline_at(name: &str, dir: &Path) -> Pipeline {
    Pipeline {
        name: name.into(),
        components: Default::default(),
        quantize: None,
        weights: dir.display().to_string(),
        family: None,
        max_sequence_length: None,
        steps: 2,
        guidance_scale: 0.0,
    }
}

fn cpu() -> RunOptions {
    RunOptions {
        device: DeviceSpec::Cpu,
        ..RunOptions::default()
    }
}

/// Bytes of the tiny model's weights on the CPU in f32.
fn tiny_bytes() -> u64 {
    let files = ModelFiles::open(&WeightSource::Local(common::tiny_dir())).unwrap();
    pipeline::registry::estimate_weight_bytes(&files, &cpu().open().unwrap()).unwrap()
}

/// Bytes of one component of the tiny model on the CPU in f32.
fn component_bytes(component: &str, stem: &str) -> u64 {
    let files = ModelFiles::open(&WeightSource::Local(common::tiny_dir())).unwrap();
    files.parameter_count(component, stem).unwrap() * 4
}

/// A copy of the tiny checkout in which the weights of `changed` components differ (every
/// value moved by 1e-3); the other files are copied byte for byte.
fn variant(changed: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::tiny_dir(), dir.path());
    for component in changed {
        for entry in std::fs::read_dir(dir.path().join(component)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .map(|(k, t)| (k, t.affine(1.0, 1e-3).unwrap()))
                    .collect::<std::collections::HashMap<_, _>>();
                candle_core::safetensors::save(&tensors, &path).unwrap();
            }
        }
    }
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn weight_bytes(handle: &SchedulerHandle) -> u64 {
    handle
        .metrics_text()
        .lines()
        .find(|l| l.starts_with("diffusiond_weight_bytes{"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap()
}

fn start(budget: u64) -> Result<SchedulerHandle, scheduler::StartError> {
    start_with(vec![pipeline("a"), pipeline("b")], budget)
}

fn start_with(
    pipelines: Vec<Pipeline>,
    budget: u64,
) -> Result<SchedulerHandle, scheduler::StartError> {
    scheduler::start(SchedulerConfig {
        pipelines,
        run: cpu(),
        warmup: false,
        memory_budget: Some(budget),
        ..SchedulerConfig::default()
    })
}

fn run(handle: &SchedulerHandle, name: &str) -> Vec<u8> {
    let job = Job {
        pipeline: name.into(),
        spec: GenerateSpec {
            prompt: "a red fox".into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            seeds: vec![3],
            steps: 2,
            guidance: Guidance::none(),
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let images = rt.block_on(handle.submit(job).unwrap().wait()).unwrap();
    images[0].data.clone()
}

fn loads(handle: &SchedulerHandle) -> u64 {
    handle
        .metrics_text()
        .lines()
        .find(|l| l.starts_with("diffusiond_pipeline_loads_total "))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap()
}

#[test]
fn least_recently_used_pipeline_makes_room() {
    let one = tiny_bytes();
    assert!(one > 0);
    // b's every component differs from a's: nothing is shared.
    let other = variant(&["transformer", "text_encoder", "vae"]);
    let pipelines = || vec![pipeline("a"), pipeline_at("b", other.path())];
    let handle = start_with(pipelines(), one + one / 2).unwrap();
    assert_eq!(
        handle.loaded_pipelines(),
        ["a"],
        "the first pipeline loads at start"
    );
    assert_eq!(loads(&handle), 0);
    assert_eq!(weight_bytes(&handle), one);

    let first = run(&handle, "a");
    assert_eq!(loads(&handle), 0, "a loaded pipeline is not loaded again");
    run(&handle, "b");
    assert_eq!(
        handle.loaded_pipelines(),
        ["b"],
        "a was unloaded to make room"
    );
    assert_eq!(loads(&handle), 1);
    assert_eq!(weight_bytes(&handle), one, "a's weights were freed");
    let again = run(&handle, "a");
    assert_eq!(handle.loaded_pipelines(), ["a"]);
    assert_eq!(loads(&handle), 2);
    assert_eq!(first, again, "a reloaded pipeline makes the same image");
    handle.shutdown();

    // Room for both: nothing is unloaded.
    let handle = start_with(pipelines(), 2 * one).unwrap();
    run(&handle, "b");
    let mut loaded = handle.loaded_pipelines();
    loaded.sort();
    assert_eq!(loaded, ["a", "b"]);
    assert_eq!(weight_bytes(&handle), 2 * one);
    handle.shutdown();
}

#[test]
fn byte_identical_components_are_held_once() {
    let one = tiny_bytes();
    let vae = component_bytes("vae", "diffusion_pytorch_model");
    assert!(vae > 0);
    // b is a copy of a in another directory with its own transformer: its text encoder and VAE
    // files are byte-identical to a's (found by sha256, not by path).
    let other = variant(&["transformer"]);
    // Two whole pipelines do not fit; two sharing their text encoder and VAE do (the budget
    // leaves room for the text encoder layers neither reads, which are counted per pipeline).
    let budget = 2 * one - vae / 2;
    let handle = start_with(vec![pipeline("a"), pipeline_at("b", other.path())], budget).unwrap();
    let first = run(&handle, "a");
    let alone = weight_bytes(&handle);
    let from_b = run(&handle, "b");
    let mut loaded = handle.loaded_pipelines();
    loaded.sort();
    assert_eq!(loaded, ["a", "b"], "b fits beside a by sharing");
    assert_eq!(loads(&handle), 1);
    let both = weight_bytes(&handle);
    assert!(
        both - alone <= one - vae,
        "b added {} bytes; sharing its VAE alone saves {vae} of {one}",
        both - alone
    );
    assert!(both <= budget);
    assert_ne!(first, from_b, "b's own transformer makes another image");
    assert_eq!(run(&handle, "a"), first, "a is unchanged beside b");
    assert_eq!(loads(&handle), 1, "nothing was reloaded");
    handle.shutdown();

    handle.shutdown();
}

#[test]
fn a_pipeline_over_the_budget_is_refused_with_what_would_fit() {
    // bf16 halves the weights: 60% of the f32 size fits only in bf16.
    let err = start(tiny_bytes() * 6 / 10).err().unwrap().to_string();
    assert!(err.contains("memory budget"), "{err}");
    assert!(err.contains("--dtype bf16"), "{err}");
}
