//! Everything that knows candle: loading weights, the models, sampling, decoding to RGB.
//!
//! The layers above see plain types ([`GenerateSpec`], [`RgbImage`]) and opaque handles
//! ([`DenoiseItem`], [`Conditioning`]).

pub mod denoise;
pub mod device;
pub mod error;
pub mod image;
pub mod load;
pub mod noise;
pub mod sampler;
pub mod z_image;

pub use denoise::{Conditioning, DenoiseItem, GenerateSpec};
pub use error::{PipelineError, Result};
pub use image::RgbImage;
pub use load::{ModelFiles, WeightSource};
pub use sampler::Guidance;
pub use z_image::ZImage;

/// Load a Z-Image pipeline from a source string (`DIR` or `hf:ORG/REPO[@REV]`) onto a device
/// (`cpu`, `cuda[:N]`, `metal`) in a dtype (`f32`, `bf16`, `f16`; default per device).
pub fn load_z_image(source: &str, device: &str, dtype: Option<&str>) -> Result<ZImage> {
    let source: WeightSource = source.parse()?;
    let device = device::parse_device(device)?;
    let dtype = device::parse_dtype(dtype, &device)?;
    let files = ModelFiles::open(&source)?;
    ZImage::load(&files, &device, dtype)
}
