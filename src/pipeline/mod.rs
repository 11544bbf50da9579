//! Everything that knows candle: loading weights, the models, sampling, decoding to RGB.
//!
//! The layers above see plain types ([`GenerateSpec`], [`RgbImage`]) and opaque handles
//! ([`DenoiseItem`], [`Conditioning`]).

pub mod attention;
pub mod denoise;
pub mod device;
pub mod error;
pub mod family;
pub mod image;
pub mod kernels;
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

/// Where and how a pipeline runs, in the spellings of the command line.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// `cpu`, `cuda`, `cuda:N`, `metal`; empty means `cpu`.
    pub device: String,
    /// `f32`, `bf16`, `f16`; `None` picks f32 on CPU and bf16 on a GPU.
    pub dtype: Option<String>,
    /// Keep the text encoder in host memory and run it on the CPU.
    pub offload_text_encoder: bool,
}

/// Load a Z-Image pipeline from a source string (`DIR` or `hf:ORG/REPO[@REV]`) onto a device
/// (`cpu`, `cuda[:N]`, `metal`) in a dtype (`f32`, `bf16`, `f16`; default per device).
pub fn load_z_image(source: &str, device: &str, dtype: Option<&str>) -> Result<ZImage> {
    load_z_image_with(
        source,
        &RunOptions {
            device: device.to_string(),
            dtype: dtype.map(str::to_string),
            offload_text_encoder: false,
        },
    )
}

/// As [`load_z_image`], with every run option.
pub fn load_z_image_with(source: &str, opts: &RunOptions) -> Result<ZImage> {
    let source: WeightSource = source.parse()?;
    let dev = if opts.device.is_empty() {
        "cpu"
    } else {
        &opts.device
    };
    let device = device::parse_device(dev)?;
    let dtype = device::parse_dtype(opts.dtype.as_deref(), &device)?;
    let files = ModelFiles::open(&source)?;
    ZImage::load_with(&files, &device, dtype, opts.offload_text_encoder)
}
