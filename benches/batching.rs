//! Criterion benchmarks of the batching scheduler on the bench model (256x256, 9 steps):
//! - per-image latency of a whole generation at batch 1 and batch 4 (`num_images`),
//! - throughput of 8 concurrent 1-image requests through the real scheduler, with batching on
//!   (`max_batch_images` 8) and off (1): time per 8 images.
//!
//!     DIFFUSIOND_BENCH_MODEL=$(scripts/bench-model) cargo bench --bench batching

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diffusiond::catalog::Pipeline;
use diffusiond::pipeline::{denoise, DeviceSpec, GenerateSpec, Guidance, RunOptions};
use diffusiond::scheduler::{self, Job, SchedulerConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn latency(c: &mut Criterion) {
    let Some(dir) = common::bench_model_dir() else {
        return;
    };
    let model = common::load(&dir);
    let mut g = c.benchmark_group("per_image_latency");
    g.sample_size(10);
    for n in [1usize, 4] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("batch{n}"), |b| {
            b.iter(|| {
                denoise::generate(model.as_ref(), &common::spec(n, 1), |_, _| {}).expect("generate")
            })
        });
    }
    g.finish();
}

fn concurrent(c: &mut Criterion) {
    let Some(dir) = common::bench_model_dir() else {
        return;
    };
    diffusiond::pipeline::device::init_cpu_runtime();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("concurrent_8x1");
    g.sample_size(10);
    g.throughput(Throughput::Elements(8));
    for (name, max_batch) in [("batching_on", 8usize), ("batching_off", 1)] {
        let handle = scheduler::start(SchedulerConfig {
            pipelines: vec![Pipeline {
                name: "z".into(),
                components: Default::default(),
                quantize: None,
                weights: dir.display().to_string(),
                family: None,
                max_sequence_length: None,
                steps: 9,
                guidance_scale: 0.0,
            }],
            run: RunOptions {
                device: DeviceSpec::Cpu,
                ..RunOptions::default()
            },
            max_batch_images: max_batch,
            warmup: true,
            ..Default::default()
        })
        .expect("scheduler");
        g.bench_function(name, |b| {
            b.iter(|| {
                let tickets: Vec<_> = (0..8u64)
                    .map(|i| {
                        handle
                            .submit(Job {
                                pipeline: "z".into(),
                                spec: GenerateSpec {
                                    prompt: format!("{} #{i}", common::PROMPT),
                                    negative_prompt: String::new(),
                                    width: 256,
                                    height: 256,
                                    seeds: vec![i],
                                    steps: 9,
                                    guidance: Guidance::none(),
                                },
                            })
                            .expect("submit")
                    })
                    .collect();
                for t in tickets {
                    rt.block_on(t.wait()).expect("image");
                }
            })
        });
        handle.shutdown();
    }
    g.finish();
}

criterion_group!(benches, latency, concurrent);
criterion_main!(benches);
