//! Everything that knows candle: loading weights, the models, sampling, decoding to RGB.
//!
//! The layers above see plain types ([`GenerateSpec`], [`RgbImage`]), the model seam
//! ([`Family`], loaded through [`registry`]) and opaque handles ([`DenoiseItem`],
//! [`Conditioning`]).

pub mod attention;
pub mod bench;
pub mod denoise;
pub mod device;
pub mod error;
pub mod family;
pub mod flops;
pub mod flux2;
pub mod image;
pub mod kernels;
pub mod linear;
pub mod load;
pub mod noise;
pub mod prompt;
pub mod quant;
pub mod qwen3;
pub mod registry;
pub mod sampler;
pub mod shared_weights;
pub mod synthetic;
pub mod vae;
pub mod z_image;

pub use denoise::{DenoiseItem, GenerateSpec};
pub use device::{DeviceSpec, RunDType};
pub use error::{PipelineError, Result};
pub use family::{Conditioning, Family, FamilyInfo, LoadOptions};
pub use flux2::Flux2Klein;
pub use image::RgbImage;
pub use load::{ComponentSource, ModelFiles, WeightSource};
pub use quant::QuantType;
pub use sampler::Guidance;
pub use z_image::ZImage;

/// Where and how a pipeline runs, as the command line gives it.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub device: DeviceSpec,
    /// `None` picks f32 on the CPU and bf16 on a GPU.
    pub dtype: Option<RunDType>,
    /// Keep the text encoder in host memory and run it on the CPU.
    pub offload_text_encoder: bool,
    /// Components quantized at load (`--quantize`), for every pipeline.
    pub quantize: std::collections::BTreeMap<String, QuantType>,
}

impl RunOptions {
    /// Open the device and settle the dtype.
    pub fn open(&self) -> Result<LoadOptions> {
        let device = self.device.open()?;
        let dtype = RunDType::resolve(self.dtype, &device);
        let mut opts = LoadOptions::new(device, dtype);
        opts.offload_text_encoder = self.offload_text_encoder;
        opts.quantize = self.quantize.clone();
        Ok(opts)
    }
}

/// Load a pipeline from a source (`DIR` or `hf:ORG/REPO[@REV]`) as `family` (or the family its
/// `model_index.json` names).
pub fn load(
    source: &WeightSource,
    family: Option<&str>,
    opts: &LoadOptions,
) -> Result<Box<dyn Family>> {
    let files = ModelFiles::open(source)?;
    registry::load(&files, family, opts)
}
