//! Shared by the pipeline tests: where the reference fixtures are, loading the tiny model,
//! comparing tensors.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use diffusiond::pipeline::{ModelFiles, WeightSource, ZImage};

/// `$DIFFUSIOND_REFERENCE`, default `../shared/reference` beside the crate.
pub fn reference_dir() -> PathBuf {
    std::env::var("DIFFUSIOND_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference"))
}

/// The tiny random-weight Z-Image of the reference, in the published layout.
pub fn tiny_dir() -> PathBuf {
    reference_dir().join("tiny")
}

/// Load a model directory on the CPU in f32.
pub fn load(dir: PathBuf) -> ZImage {
    let files = ModelFiles::open(&WeightSource::Local(dir)).unwrap();
    ZImage::load(&files, &Device::Cpu, DType::F32).unwrap()
}

/// Largest absolute difference of two tensors of the same shape.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
