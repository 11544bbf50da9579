//! Criterion benchmarks per stage on the bench model: text encode, one transformer step at
//! batch 1 and 4 (256x256), and the VAE decode at 1 and 4 images.
//!
//!     DIFFUSIOND_BENCH_MODEL=$(scripts/bench-model) cargo bench --bench stages

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diffusiond::pipeline::denoise::{self, DenoiseItem};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn stages(c: &mut Criterion) {
    let Some(dir) = common::bench_model_dir() else {
        return;
    };
    let model = common::load(&dir);
    let model = model.as_ref();
    let mut g = c.benchmark_group("stages");
    g.sample_size(10);

    g.bench_function("text_encode", |b| {
        b.iter(|| model.encode(common::PROMPT, None).expect("encode"))
    });

    for n in [1usize, 4] {
        let spec = common::spec(n, 0);
        let cond = denoise::condition(model, &spec).expect("encode");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("transformer_step/batch{n}"), |b| {
            b.iter_batched(
                || denoise::items(model, &spec, &cond).expect("items"),
                |mut items: Vec<DenoiseItem>| {
                    let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
                    denoise::step(model, &mut refs).expect("step");
                    items
                },
                criterion::BatchSize::PerIteration,
            )
        });
        let items = denoise::items(model, &spec, &cond).expect("items");
        let latents: Vec<_> = items.iter().map(|i| i.latent()).collect();
        g.bench_function(format!("vae_decode/batch{n}"), |b| {
            b.iter(|| model.decode(&latents).expect("decode"))
        });
    }
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
