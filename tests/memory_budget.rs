//! Pipelines load when first needed and the least recently used one is unloaded when the next
//! would exceed the memory budget; a pipeline larger than the budget is refused with a line that
//! says what would fit. Runs the real scheduler on the tiny reference model under two names.
#![allow(clippy::unwrap_used)]

mod common;

use diffusiond::catalog::Pipeline;
use diffusiond::pipeline::{
    self, DeviceSpec, GenerateSpec, Guidance, ModelFiles, RunOptions, WeightSource,
};
use diffusiond::scheduler::{self, Job, SchedulerConfig, SchedulerHandle};

fn pipeline(name: &str) -> Pipeline {
    Pipeline {
        name: name.into(),
        components: Default::default(),
        quantize: None,
        weights: common::tiny_dir().display().to_string(),
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

fn start(budget: u64) -> Result<SchedulerHandle, scheduler::StartError> {
    scheduler::start(SchedulerConfig {
        pipelines: vec![pipeline("a"), pipeline("b")],
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
    let handle = start(one + one / 2).unwrap();
    assert_eq!(
        handle.loaded_pipelines(),
        ["a"],
        "the first pipeline loads at start"
    );
    assert_eq!(loads(&handle), 0);

    let first = run(&handle, "a");
    assert_eq!(loads(&handle), 0, "a loaded pipeline is not loaded again");
    run(&handle, "b");
    assert_eq!(
        handle.loaded_pipelines(),
        ["b"],
        "a was unloaded to make room"
    );
    assert_eq!(loads(&handle), 1);
    let again = run(&handle, "a");
    assert_eq!(handle.loaded_pipelines(), ["a"]);
    assert_eq!(loads(&handle), 2);
    assert_eq!(first, again, "a reloaded pipeline makes the same image");
    handle.shutdown();

    // Room for both: nothing is unloaded.
    let handle = start(2 * one).unwrap();
    run(&handle, "b");
    let mut loaded = handle.loaded_pipelines();
    loaded.sort();
    assert_eq!(loaded, ["a", "b"]);
    handle.shutdown();
}

#[test]
fn a_pipeline_over_the_budget_is_refused_with_what_would_fit() {
    // bf16 halves the weights: 60% of the f32 size fits only in bf16.
    let err = start(tiny_bytes() * 6 / 10).err().unwrap().to_string();
    assert!(err.contains("memory budget"), "{err}");
    assert!(err.contains("--dtype bf16"), "{err}");
}
