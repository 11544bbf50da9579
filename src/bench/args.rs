//! `diffusiond bench` options (clap derive; each doc comment is the `--help` text).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::cli::WeightsOverride;
use crate::pipeline::{DeviceSpec, RunDType};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Hosted model ID (e.g. `flux-2-pro`) whose pipeline to measure. Default: z-image-turbo.
    #[arg(long, conflicts_with = "pipeline")]
    pub model: Option<String>,
    /// Local pipeline name of the catalog (e.g. `z-image-turbo`, `flux2-klein`).
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Random weights with the pipeline family's real published configuration (transformer,
    /// Qwen3 text encoder, VAE), made directly on the device: nothing is read or downloaded.
    /// Speed and memory are the real model's; the images are noise.
    #[arg(long)]
    pub synthetic: bool,
    /// Random weights with the configuration files of this directory (diffusers layout:
    /// `transformer/config.json`, `text_encoder/config.json`, `vae/config.json`, optionally
    /// `model_index.json`, `scheduler/` and `tokenizer/`; what it lacks is taken from the
    /// family's published configuration). Implies --synthetic.
    #[arg(long, value_name = "DIR")]
    pub synthetic_config: Option<PathBuf>,
    /// Image size `WxH`; repeat for several sizes.
    #[arg(long = "size", value_name = "WxH", default_value = "1024x1024")]
    pub sizes: Vec<Size>,
    /// Batch sizes (images denoised together), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Model evaluations per image. Default: the pipeline's.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Timed runs per size and batch (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Untimed runs per size and batch before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// The prompt (its token count enters the text encoder's time and FLOPs).
    #[arg(
        long,
        default_value = "A serene mountain landscape at sunset, with a crystal clear lake \
                         reflecting snow-capped peaks, pine trees along the shore, and warm \
                         golden light"
    )]
    pub prompt: String,
    /// Device: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, env = "DIFFUSIOND_DEVICE", default_value = "auto")]
    pub device: DeviceSpec,
    /// Run dtype: `f32`, `bf16` or `f16`. Default: f32 on the CPU, bf16 on a GPU.
    #[arg(long, env = "DIFFUSIOND_DTYPE")]
    pub dtype: Option<RunDType>,
    /// Keep the text encoder in host memory and run it on the CPU.
    #[arg(long)]
    pub offload_text_encoder: bool,
    /// Quantize at load, as `serve --quantize` does (`q8_0`, `q6_k`, `q5_k`, `q4_k`, `q4_0`, or
    /// `COMPONENT=TYPE`): measures what a quantized pipeline costs and how fast it runs.
    #[arg(long, value_delimiter = ',')]
    pub quantize: Vec<crate::cli::QuantizeArg>,
    /// Flash attention (builds with the `flash-attn` feature): `on` or `off` (the generic
    /// attention path, for comparison).
    #[arg(long, value_enum, default_value = "on")]
    pub flash_attn: Switch,
    /// The device's peak TFLOP/s in the run dtype, for the share-of-peak column. Default: from
    /// a table of known GPUs; on a CPU, measured with a large matrix product.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Also write the results as JSON to this file (`-` or no value: standard output, and the
    /// table goes to standard error).
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "-")]
    pub json: Option<PathBuf>,
    /// Model catalog (TOML) replacing the built-in models/catalog.toml.
    #[arg(long, env = "DIFFUSIOND_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Weights source per pipeline (real weights): `PIPELINE=DIR` or `PIPELINE=hf:ORG/REPO[@REV]`.
    #[arg(long = "weights", value_delimiter = ',')]
    pub weights: Vec<WeightsOverride>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// `WxH` in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: usize,
    pub height: usize,
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (w, h) = s
            .trim()
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("'{s}': expected WxH, e.g. 1024x1024"))?;
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("'{s}': width and height must be positive integers"))
        };
        Ok(Self {
            width: parse(w)?,
            height: parse(h)?,
        })
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(
            "1024x768".parse::<Size>(),
            Ok(Size {
                width: 1024,
                height: 768
            })
        );
        assert!("1024".parse::<Size>().is_err());
        assert!("0x64".parse::<Size>().is_err());
    }
}
