//! Shared by the pipeline tests: where the reference fixtures are, loading the tiny model,
//! comparing tensors.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use diffusiond::pipeline::{DeviceSpec, ModelFiles, RunDType, WeightSource, ZImage};

/// The crate's directory: `$DIFFUSIOND_TEST_ROOT` when the test binaries run away from the
/// checkout they were built in (`scripts/gpu-check` on a GPU machine), else the build's.
pub fn crate_dir() -> PathBuf {
    std::env::var("DIFFUSIOND_TEST_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `$DIFFUSIOND_REFERENCE`, default `../shared/reference` beside the crate.
pub fn reference_dir() -> PathBuf {
    std::env::var("DIFFUSIOND_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate_dir().join("../shared/reference"))
}

/// `$DIFFUSIOND_REFERENCE_FLUX2`, default `../shared/reference-flux2` beside the crate.
pub fn reference_flux2_dir() -> PathBuf {
    std::env::var("DIFFUSIOND_REFERENCE_FLUX2")
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate_dir().join("../shared/reference-flux2"))
}

/// The device the numerical tests run on: `$DIFFUSIOND_TEST_DEVICE` (`cpu` by default; `cuda`,
/// `cuda:N`, `metal`), opened once per process so every tensor lives on the same one.
/// `scripts/gpu-check` sets it to run the parity and batching tests on a GPU.
pub fn test_device() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let spec: DeviceSpec = std::env::var("DIFFUSIOND_TEST_DEVICE")
                .unwrap_or_else(|_| "cpu".into())
                .parse()
                .unwrap();
            spec.open().unwrap()
        })
        .clone()
}

/// The dtype the numerical tests run in: `$DIFFUSIOND_TEST_DTYPE` (`f32` by default, `bf16`).
pub fn test_dtype() -> DType {
    let given = std::env::var("DIFFUSIOND_TEST_DTYPE")
        .ok()
        .map(|s| s.parse::<RunDType>().unwrap());
    RunDType::resolve(given.or(Some(RunDType::F32)), &Device::Cpu)
}

/// `f32_tol` in f32, `half_tol` in bf16/f16 (half precision's tolerances, measured; see the
/// constants that use it).
pub fn tol<T>(f32_tol: T, half_tol: T) -> T {
    if test_dtype() == DType::F32 {
        f32_tol
    } else {
        half_tol
    }
}

/// The tiny random-weight Z-Image of the reference, in the published layout.
pub fn tiny_dir() -> PathBuf {
    reference_dir().join("tiny")
}

/// Load a model directory on the test device in the test dtype (the CPU in f32 by default).
pub fn load(dir: PathBuf) -> ZImage {
    let files = ModelFiles::open(&WeightSource::Local(dir)).unwrap();
    ZImage::load(&files, &test_device(), test_dtype()).unwrap()
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
