//! Partial images come from the real denoising state and never change the final image, for both
//! families: through the real scheduler, a job that asks for previews gets, after the steps
//! `preview_steps` names, each image's clean-latent estimate decoded by the family's VAE (the
//! same bytes as `denoise::preview` on the same item, computed here step by step), and its final
//! images are bit-identical to the same job run without previews. Tiny reference models
//! (`$DIFFUSIOND_REFERENCE/tiny`, `$DIFFUSIOND_REFERENCE_FLUX2/tiny`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use diffusiond::catalog::Pipeline;
use diffusiond::pipeline::denoise::{self, DenoiseItem, GenerateSpec};
use diffusiond::pipeline::{DeviceSpec, Guidance, RunOptions, WeightSource};
use diffusiond::scheduler::progress::preview_steps;
use diffusiond::scheduler::{self, Job, Progress, ProgressTx, SchedulerConfig};

fn flux2_tiny() -> PathBuf {
    std::env::var("DIFFUSIOND_REFERENCE_FLUX2")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference-flux2")
        })
        .join("tiny")
}

fn run_options() -> RunOptions {
    RunOptions {
        device: DeviceSpec::Cpu,
        ..RunOptions::default()
    }
}

#[test]
fn z_image_previews_are_the_clean_estimate_and_change_nothing() {
    previews_are_the_clean_estimate_and_change_nothing(common::tiny_dir(), "z-image");
}

#[test]
fn flux2_klein_previews_are_the_clean_estimate_and_change_nothing() {
    previews_are_the_clean_estimate_and_change_nothing(flux2_tiny(), "flux2-klein");
}

fn previews_are_the_clean_estimate_and_change_nothing(dir: PathBuf, family: &str) {
    assert!(
        dir.join("model_index.json").is_file(),
        "tiny model not found at {}",
        dir.display()
    );
    let handle = scheduler::start(SchedulerConfig {
        pipelines: vec![Pipeline {
            name: "p".into(),
            components: Default::default(),
            quantize: None,
            weights: dir.display().to_string(),
            family: None,
            max_sequence_length: None,
            steps: 4,
            guidance_scale: 0.0,
        }],
        run: run_options(),
        queue_capacity: 8,
        max_batch_images: 8,
        warmup: false,
        ..Default::default()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let steps = 6;
    let spec = GenerateSpec {
        prompt: "a red fox in the snow".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        seeds: vec![5, 6],
        steps,
        guidance: Guidance::none(),
    };
    let job = Job {
        pipeline: "p".into(),
        spec: spec.clone(),
    };

    let plain = rt
        .block_on(handle.submit(job.clone()).unwrap().wait())
        .unwrap();
    let (tx, mut rx) = ProgressTx::channel(2);
    let streamed = rt
        .block_on(handle.submit_with_progress(job, Some(tx)).unwrap().wait())
        .unwrap();
    assert_eq!(
        plain, streamed,
        "{family}: previews changed the final images"
    );

    let mut previews = Vec::new();
    let mut steps_seen = Vec::new();
    while let Ok(p) = rx.try_recv() {
        match p {
            Progress::Preview {
                index,
                step,
                total,
                image,
            } => {
                assert_eq!(total, steps);
                previews.push((step, index, image));
            }
            Progress::Step { done, .. } => steps_seen.push(done),
            _ => {}
        }
    }
    assert_eq!(steps_seen, (1..=steps).collect::<Vec<_>>());
    let due = preview_steps(2, steps);
    assert_eq!(due, [2, 4]);
    let want: Vec<(usize, usize)> = due.iter().flat_map(|&s| [(s, 0), (s, 1)]).collect();
    let got: Vec<(usize, usize)> = previews.iter().map(|(s, i, _)| (*s, *i)).collect();
    assert_eq!(
        got, want,
        "{family}: one preview per image at each due step"
    );

    // The same loop by hand, on a model loaded the same way: each preview is the decoded
    // clean-latent estimate of that item after that step.
    let opts = run_options().open().unwrap();
    let model = diffusiond::pipeline::load(&WeightSource::Local(dir.clone()), None, &opts).unwrap();
    assert_eq!(model.info().family, family);
    let cond = denoise::condition(model.as_ref(), &spec).unwrap();
    let mut items = denoise::items(model.as_ref(), &spec, &cond).unwrap();
    for step in 1..=steps {
        let mut refs: Vec<&mut DenoiseItem> = items.iter_mut().collect();
        denoise::step(model.as_ref(), &mut refs).unwrap();
        for (s, i, image) in &previews {
            if *s == step {
                let expected = denoise::preview(model.as_ref(), &items[*i])
                    .unwrap()
                    .unwrap();
                assert!(
                    expected == *image,
                    "{family}: preview of image {i} at step {step} is not the decoded clean estimate"
                );
                assert_eq!((image.width, image.height), (64, 64));
                assert_ne!(
                    image.data, plain[*i].data,
                    "{family}: a preview mid-run should not already be the final image"
                );
            }
        }
    }
    handle.shutdown();
}
