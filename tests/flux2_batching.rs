//! FLUX.2 [klein]: an item's velocity is bit-identical alone and inside a batch with items of
//! other prompts, seeds, sizes and sigmas (the batching property every family keeps), and the
//! seam's facts for the distilled and base checkpoints. Runs on the tiny model of the FLUX.2
//! reference (`$DIFFUSIOND_REFERENCE_FLUX2/tiny`, default `../shared/reference-flux2/tiny`).
#![allow(clippy::unwrap_used)]

mod common;

use candle_core::Tensor;
use diffusiond::pipeline::family::{CfgRule, Family, LoadOptions, ModelInput};
use diffusiond::pipeline::{Flux2Klein, ModelFiles, WeightSource};

fn tiny() -> ModelFiles {
    let dir = common::reference_flux2_dir();
    ModelFiles::open(&WeightSource::Local(dir.join("tiny"))).unwrap()
}

fn opts(max_len: Option<usize>) -> LoadOptions {
    LoadOptions {
        max_sequence_length: max_len,
        ..LoadOptions::new(common::test_device(), common::test_dtype())
    }
}

/// How many values of two tensors differ in any bit.
fn differing(a: &Tensor, b: &Tensor) -> usize {
    bits(a)
        .iter()
        .zip(bits(b))
        .filter(|(x, y)| **x != *y)
        .count()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn velocity_alone_equals_velocity_in_a_batch() {
    let model = Flux2Klein::load(&tiny(), &opts(Some(64))).unwrap();
    let prompts = [
        "a red fox",
        "a lighthouse on a cliff above a stormy sea at night",
        "tea",
    ];
    let conds: Vec<Tensor> = prompts
        .iter()
        .map(|p| model.encode(p, None).unwrap().positive)
        .collect();
    // (prompt, seed, width, height, sigma): two sizes, so two shape groups in one call.
    let specs = [
        (0, 1u64, 64, 64, 1.0f32),
        (1, 2, 64, 64, 0.8),
        (2, 3, 96, 64, 0.6),
        (0, 4, 64, 64, 0.8),
        (1, 5, 96, 64, 1.0),
    ];
    let latents: Vec<Tensor> = specs
        .iter()
        .map(|&(_, seed, w, h, _)| model.initial_latent(seed, w, h).unwrap())
        .collect();
    let input = |k: usize| ModelInput {
        latent: &latents[k],
        cond: &conds[specs[k].0],
        sigma: specs[k].4,
    };
    let together = model
        .velocity(&(0..specs.len()).map(input).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(together.len(), specs.len());
    for (k, v) in together.iter().enumerate() {
        let alone = model.velocity(&[input(k)]).unwrap();
        assert_eq!(v.dims(), latents[k].dims(), "item {k}: layout");
        assert_eq!(
            bits(v),
            bits(&alone[0]),
            "item {k}: batch changed the velocity"
        );
    }
    // The batch is not trivially uniform: items differ.
    assert!(differing(&together[0], &together[3]) > 0);
}

#[test]
fn seam_facts_of_distilled_and_base() {
    let files = tiny();
    let distilled = Flux2Klein::load(&files, &opts(None)).unwrap();
    let info = distilled.info();
    assert_eq!(info.family, "flux2-klein");
    assert_eq!(
        (
            info.size_multiple,
            info.default_steps,
            info.max_sequence_length
        ),
        (16, 4, 512)
    );
    assert_eq!(info.cfg, None);
    assert!(!info.cfg_active(4.0), "distilled klein ignores guidance");
    assert!(distilled.weight_bytes() > 0);

    let base = Flux2Klein::load_as(&files, &opts(Some(40)), false).unwrap();
    assert_eq!(base.info().cfg, Some(CfgRule::NegativePlus));
    assert_eq!(base.info().default_steps, 50);
    assert_eq!(base.info().max_sequence_length, 40);
    assert!(base.info().cfg_active(4.0) && !base.info().cfg_active(1.0));
    let c = base.encode("a fox", Some("")).unwrap();
    assert_eq!(c.positive.dim(0).unwrap(), 40);
    assert!(c.negative.is_some());

    // Sizes: multiples of 16 only (diffusers floors others; our API refuses them).
    assert!(distilled.check_size(64, 96).is_ok());
    let err = distilled.check_size(64, 100).unwrap_err().to_string();
    assert!(err.contains("multiples of 16"), "{err}");
    assert!(distilled.check_size(0, 64).is_err());
    // Noise is the shared generator in the patchified shape.
    let x = distilled.initial_latent(7, 96, 64).unwrap();
    assert_eq!(x.dims(), &[128, 4, 6]);
    let again = distilled.initial_latent(7, 96, 64).unwrap();
    assert_eq!(differing(&x, &again), 0);
}

#[test]
fn wrong_pipeline_class_is_refused() {
    let dir = common::reference_dir();
    let files = ModelFiles::open(&WeightSource::Local(dir.join("tiny"))).unwrap();
    let err = Flux2Klein::load(&files, &opts(None))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("Flux2KleinPipeline"), "{err}");
}
