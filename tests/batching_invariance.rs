//! Batching never changes an image: the same requests run alone, together in one batch, and
//! joining a running batch mid-loop give identical image bytes for the same seeds (and latents
//! equal to within 1e-5). Runs on the tiny reference model (`$DIFFUSIOND_REFERENCE/tiny`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use diffusiond::catalog::Pipeline;
use diffusiond::pipeline::denoise::{self, DenoiseItem, GenerateSpec};
use diffusiond::pipeline::family::LoadOptions;
use diffusiond::pipeline::{DeviceSpec, Family, Guidance, RunDType, RunOptions};
use diffusiond::scheduler::{self, Job, SchedulerConfig};

/// Three requests of different prompt lengths (so different caption padding), seeds and steps.
fn specs() -> Vec<GenerateSpec> {
    let mk = |prompt: &str, seed: u64, steps: usize| GenerateSpec {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        seeds: vec![seed, seed + 100],
        steps,
        guidance: Guidance::none(),
    };
    vec![
        mk("a red fox", 1, 8),
        mk("a lighthouse on a cliff above a stormy sea at night, dramatic clouds, oil painting, highly detailed brush strokes", 2, 6),
        mk("tea", 3, 4),
    ]
}

fn run_all(model: &dyn Family, items: &mut [DenoiseItem]) {
    while items.iter().any(|i| !i.is_done()) {
        let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
        denoise::step(model, &mut refs).unwrap();
    }
}

#[test]
fn z_image_alone_together_and_joining_mid_loop_agree() {
    let model = common::load(common::tiny_dir());
    alone_together_and_joining_mid_loop_agree(&model, &specs());
}

#[test]
fn flux2_klein_alone_together_and_joining_mid_loop_agree() {
    let dir = common::reference_flux2_dir().join("tiny");
    let opts = LoadOptions::new(common::test_device(), common::test_dtype());
    let model =
        diffusiond::pipeline::load(&diffusiond::pipeline::WeightSource::Local(dir), None, &opts)
            .unwrap();
    assert_eq!(model.info().family, "flux2-klein");
    // FLUX.2 pads every prompt to the same length; steps differ, so items leave at different
    // times, and the schedules differ (mu depends on the step count).
    let specs: Vec<GenerateSpec> = specs()
        .into_iter()
        .zip([4usize, 3, 2])
        .map(|(mut s, steps)| {
            s.steps = steps;
            s
        })
        .collect();
    alone_together_and_joining_mid_loop_agree(model.as_ref(), &specs);
}

/// Run `specs` alone, all together, and joining a running batch mid-loop: identical bytes.
fn alone_together_and_joining_mid_loop_agree(model: &dyn Family, specs: &[GenerateSpec]) {
    let conds: Vec<_> = specs
        .iter()
        .map(|s| denoise::condition(model, s).unwrap())
        .collect();
    let make = || -> Vec<Vec<DenoiseItem>> {
        specs
            .iter()
            .zip(&conds)
            .map(|(s, c)| denoise::items(model, s, c).unwrap())
            .collect()
    };

    // Alone: each request's images in their own loop.
    let mut alone = make();
    for items in alone.iter_mut() {
        run_all(model, items);
    }

    // Together: every image of every request in one loop from the start.
    let mut together: Vec<DenoiseItem> = make().into_iter().flatten().collect();
    run_all(model, &mut together);

    // Joining: request 0 starts alone; request 1 joins after 2 steps, request 2 after 3 more.
    let mut groups = make().into_iter();
    let mut running: Vec<DenoiseItem> = groups.next().unwrap();
    let mut waiting: Vec<Vec<DenoiseItem>> = groups.collect();
    let mut turn = 0;
    while running.iter().any(|i| !i.is_done()) || !waiting.is_empty() {
        if (turn == 2 || turn == 5) && !waiting.is_empty() {
            running.extend(waiting.remove(0));
        }
        let mut refs: Vec<&mut DenoiseItem> = running.iter_mut().collect();
        denoise::step(model, &mut refs).unwrap();
        turn += 1;
    }

    let alone_flat: Vec<&DenoiseItem> = alone.iter().flatten().collect();
    let mut worst = 0f32;
    for (k, a) in alone_flat.iter().enumerate() {
        worst = worst.max(common::max_abs(a.latent(), together[k].latent()));
        worst = worst.max(common::max_abs(a.latent(), running[k].latent()));
    }
    println!("max latent difference alone vs batched: {worst:e}");
    assert!(worst <= 1e-5, "latents differ by {worst}");

    let img_alone = denoise::decode(model, &alone_flat).unwrap();
    let img_together = denoise::decode(model, &together.iter().collect::<Vec<_>>()).unwrap();
    let img_joined = denoise::decode(model, &running.iter().collect::<Vec<_>>()).unwrap();
    // Decoding alone vs in a batch must not matter either.
    let img_single: Vec<_> = alone_flat
        .iter()
        .flat_map(|i| denoise::decode(model, &[*i]).unwrap())
        .collect();
    assert_eq!(img_alone, img_together, "together changed image bytes");
    assert_eq!(
        img_alone, img_joined,
        "joining mid-loop changed image bytes"
    );
    assert_eq!(img_alone, img_single, "batched decode changed image bytes");
}

/// The same through the real scheduler: a long job runs while three more arrive; they join it
/// mid-loop and must still give the bytes they give when run one at a time.
#[test]
fn scheduler_batches_without_changing_images() {
    let cfg = SchedulerConfig {
        pipelines: vec![Pipeline {
            name: "z".into(),
            components: Default::default(),
            quantize: None,
            weights: common::tiny_dir().display().to_string(),
            family: None,
            max_sequence_length: None,
            steps: 8,
            guidance_scale: 0.0,
        }],
        // The test device and dtype (scripts/gpu-check runs this on a GPU).
        run: RunOptions {
            device: std::env::var("DIFFUSIOND_TEST_DEVICE")
                .map_or(DeviceSpec::Cpu, |d| d.parse().unwrap()),
            dtype: Some(
                std::env::var("DIFFUSIOND_TEST_DTYPE")
                    .map_or(RunDType::F32, |d| d.parse().unwrap()),
            ),
            ..RunOptions::default()
        },
        queue_capacity: 16,
        max_batch_images: 16,
        warmup: false,
        ..Default::default()
    };
    let handle = scheduler::start(cfg).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let job = |prompt: &str, seed: u64, steps: usize| Job {
        pipeline: "z".into(),
        spec: GenerateSpec {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width: 64,
            height: 64,
            seeds: vec![seed, seed + 1],
            steps,
            guidance: Guidance::none(),
        },
    };
    let jobs = [
        job("a red fox", 11, 8),
        job("a lighthouse at night, oil painting", 12, 6),
        job("tea", 13, 3),
    ];

    // One at a time.
    let alone: Vec<_> = jobs
        .iter()
        .map(|j| {
            rt.block_on(handle.submit(j.clone()).unwrap().wait())
                .unwrap()
        })
        .collect();

    // A long job first, then the three while it runs: they join its batch.
    let long = handle.submit(job("a slow blocker", 99, 40)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let tickets: Vec<_> = jobs
        .iter()
        .map(|j| handle.submit(j.clone()).unwrap())
        .collect();
    let batched: Vec<_> = tickets
        .into_iter()
        .map(|t| rt.block_on(t.wait()).unwrap())
        .collect();
    rt.block_on(long.wait()).unwrap();
    assert_eq!(alone, batched, "batching changed image bytes");

    let metrics = handle.metrics_text();
    let max_batch = metrics
        .lines()
        .filter(|l| l.starts_with("diffusiond_batch_size_bucket{le=\"2\"}"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .next()
        .unwrap();
    let total = metrics
        .lines()
        .find(|l| l.starts_with("diffusiond_batch_size_count"))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .unwrap();
    assert!(
        total > max_batch,
        "no step ran with more than 2 images:\n{metrics}"
    );
    handle.shutdown();
}
