//! Command-line types (clap derive). Each doc comment is the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pipeline::{ComponentSource, DeviceSpec, QuantType, RunDType, RunOptions, WeightSource};

mod shared;
pub use shared::SharedArgs;

#[derive(Debug, Parser)]
#[command(
    name = "diffusiond",
    version,
    about = "Local text-to-image server speaking the hosted image API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (the hosted image API's contract on a local machine).
    Serve(ServeArgs),
    /// Generate image(s) from a prompt and write them to files, without a server.
    Generate(GenerateArgs),
    /// Manage API keys and credits in the data directory (safe while the server runs).
    Keys(KeysArgs),
    /// Measure a pipeline on this machine: seconds per image, images per minute, peak memory and
    /// achieved TFLOP/s per size and batch, with real weights or `--synthetic` random ones.
    Bench(crate::bench::BenchArgs),
}

/// Where the model runs and in which precision.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Device: `auto` (CUDA when built in and a card is present, else Metal, else the CPU),
    /// `cpu`, `cuda`, `cuda:N` or `metal`. `serve` takes a comma-separated list
    /// (`cuda:0,cuda:1`): one worker per device, each holding its own copy of the pipelines
    /// (the memory budget applies to each), all taking jobs from one queue.
    #[arg(
        long,
        env = "DIFFUSIOND_DEVICE",
        default_value = "auto",
        value_delimiter = ','
    )]
    pub device: Vec<DeviceSpec>,
    /// Run dtype: `f32` (CPU default; exact), `bf16` or `f16` (GPU; half the memory, f32 kept where
    /// the reference keeps it). Default: f32 on CPU, bf16 on a GPU.
    #[arg(long, env = "DIFFUSIOND_DTYPE")]
    pub dtype: Option<RunDType>,
    /// Keep the text encoder in host memory and run it on the CPU: frees ~8 GB of GPU memory
    /// (what lets the full Z-Image-Turbo fit a 24 GB card) at the cost of slower prompt encoding.
    #[arg(long, env = "DIFFUSIOND_OFFLOAD_TEXT_ENCODER")]
    pub offload_text_encoder: bool,
    /// Weights the device may hold at once (e.g. `20GiB`, `12GB`, bytes): pipelines load when
    /// first needed and the least recently used idle one is unloaded to stay within it.
    /// Default: the device's memory less 3 GiB of headroom (no limit where it cannot be told).
    #[arg(long, env = "DIFFUSIOND_MEMORY_BUDGET")]
    pub memory_budget: Option<ByteSize>,
    /// Quantize full-precision weights at load: `q8_0` (about half of bf16, closest to it),
    /// `q6_k`, `q5_k`, `q4_k`, `q4_0` (about a quarter; lowest quality). Applies to the
    /// transformer and the text encoder; `transformer=q4_k` names one. Embedders, refiners, the
    /// final layer and 1-D tensors stay in the run dtype. A GGUF file (`--weights
    /// PIPELINE.transformer=FILE.gguf`) is used as it is stored.
    #[arg(long, env = "DIFFUSIOND_QUANTIZE", value_delimiter = ',')]
    pub quantize: Vec<QuantizeArg>,
}

impl DeviceArgs {
    /// The run options of the first device (the only one outside `serve`).
    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            device: self.device.first().copied().unwrap_or_default(),
            dtype: self.dtype,
            offload_text_encoder: self.offload_text_encoder,
            quantize: self
                .quantize
                .iter()
                .flat_map(|q| q.components.iter().map(move |c| (c.clone(), q.ty)))
                .collect(),
        }
    }
}

/// A size in bytes: a number with an optional unit (`B`, `KB`/`MB`/`GB`/`TB` powers of 1000,
/// `KiB`/`MiB`/`GiB`/`TiB` or `K`/`M`/`G`/`T` powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a size (e.g. 20GiB, 12GB, 500MiB)"))?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "gb" => 1e9,
            "tb" => 1e12,
            "k" | "kib" => 1024.0,
            "m" | "mib" => 1024.0 * 1024.0,
            "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            other => return Err(format!("unknown size unit '{other}' in '{s}'")),
        };
        let bytes = num * mult;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(format!("'{s}' is not a positive size"));
        }
        Ok(Self(bytes as u64))
    }
}

/// `--weights PIPELINE=SOURCE`: a pipeline's weights from another source, or
/// `--weights PIPELINE.COMPONENT=FILE.gguf`: one component (`transformer`, `text_encoder`)
/// from a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsOverride {
    pub pipeline: String,
    /// `None`: the whole checkout.
    pub component: Option<String>,
    /// `DIR` or `hf:ORG/REPO[@REV]`; for a component `FILE.gguf` or `hf:ORG/REPO/PATH.gguf`
    /// (checked when parsed).
    pub source: String,
}

/// Components that can come from their own GGUF file.
const COMPONENTS: [&str; 2] = ["transformer", "text_encoder"];

impl std::str::FromStr for WeightsOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((name, source)) = s.split_once('=') else {
            return Err(format!(
                "'{s}': expected PIPELINE=SOURCE or PIPELINE.COMPONENT=FILE.gguf"
            ));
        };
        let (name, source) = (name.trim(), source.trim());
        let (name, component) = match name.rsplit_once('.') {
            Some((p, c)) if COMPONENTS.contains(&c) => (p, Some(c.to_string())),
            _ => (name, None),
        };
        if name.is_empty() {
            return Err(format!("'{s}': the pipeline name is empty"));
        }
        match component {
            Some(_) => source
                .parse::<ComponentSource>()
                .map(|_| ())
                .map_err(|e| format!("'{s}': {e}"))?,
            None => source
                .parse::<WeightSource>()
                .map(|_| ())
                .map_err(|e| format!("'{s}': {e}"))?,
        }
        Ok(Self {
            pipeline: name.to_string(),
            component,
            source: source.to_string(),
        })
    }
}

/// `--quantize TYPE` (the transformer and the text encoder) or `--quantize COMPONENT=TYPE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeArg {
    pub components: Vec<String>,
    pub ty: QuantType,
}

impl std::str::FromStr for QuantizeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (components, ty) = match s.split_once('=') {
            Some((c, t)) => {
                let c = c.trim();
                if !COMPONENTS.contains(&c) {
                    return Err(format!(
                        "'{s}': unknown component '{c}' (transformer, text_encoder)"
                    ));
                }
                (vec![c.to_string()], t)
            }
            None => (COMPONENTS.iter().map(|c| c.to_string()).collect(), s),
        };
        let ty = ty.parse::<QuantType>().map_err(|e| format!("'{s}': {e}"))?;
        Ok(Self { components, ty })
    }
}

/// Values 1 and up (0 is refused, not clamped).
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Hosted model ID (e.g. `flux-2-pro`) or local pipeline name (e.g. `z-image-turbo`), as the
    /// catalog defines them; its size limits and defaults apply.
    #[arg(long, default_value = "z-image-turbo")]
    pub model: String,
    /// The text prompt.
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt, used only when guidance is on.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Image width in pixels. Default: the model's.
    #[arg(long)]
    pub width: Option<u32>,
    /// Image height in pixels. Default: the model's.
    #[arg(long)]
    pub height: Option<u32>,
    /// Number of images (one batched denoising loop), 1 to 4 as on the server.
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,
    /// Seed of the first image; image i uses seed + i. Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model evaluations (denoising steps). Default: the pipeline's.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale. Default: the pipeline's.
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// Model catalog (TOML) replacing the built-in models/catalog.toml.
    #[arg(long, env = "DIFFUSIOND_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Weights source per pipeline: `PIPELINE=DIR` (published layout) or `PIPELINE=hf:ORG/REPO[@REV]`.
    #[arg(long = "weights", env = "DIFFUSIOND_WEIGHTS", value_delimiter = ',')]
    pub weights: Vec<WeightsOverride>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Output file; the extension picks the format (png, jpg/jpeg, webp). Several images get `_0`, `_1`, ...
    #[arg(long)]
    pub out: PathBuf,
}

/// Who may call the /v1 API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// No key needed; a key sent is ignored. Default on a loopback listen address.
    Open,
    /// Every /v1 request needs `Authorization: Bearer <key>`. Default on any other address.
    Keys,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (`HOST:PORT`; port 0 picks a free port).
    #[arg(long, env = "DIFFUSIOND_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Data directory: accounts database and generated images. Default: the per-user data
    /// directory (e.g. ~/.local/share/diffusiond).
    #[arg(long, env = "DIFFUSIOND_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Base URL put in front of image URLs (e.g. `https://img.example.com`). Default: the listen
    /// address, or the request's Host header when listening on 0.0.0.0 / [::].
    #[arg(long, env = "DIFFUSIOND_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// `open` (no keys) or `keys` (API keys, credits, daily quotas). Default: open on a loopback
    /// address, keys on any other.
    #[arg(long, env = "DIFFUSIOND_AUTH", value_enum)]
    pub auth: Option<AuthMode>,
    /// Model catalog (TOML) replacing the built-in models/catalog.toml.
    #[arg(long, env = "DIFFUSIOND_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// Weights source per pipeline, overriding the catalog's: `PIPELINE=DIR` (published layout)
    /// or `PIPELINE=hf:ORG/REPO[@REV]`. Repeatable.
    #[arg(long = "weights", env = "DIFFUSIOND_WEIGHTS", value_delimiter = ',')]
    pub weights: Vec<WeightsOverride>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Jobs that may wait for the device; beyond this a request gets 503 server_busy at once.
    #[arg(long, env = "DIFFUSIOND_QUEUE_CAPACITY", default_value_t = 64, value_parser = at_least_one())]
    pub queue_capacity: usize,
    /// Images denoised together in one batch at most (higher: more throughput, more memory;
    /// 1 turns batching off).
    #[arg(long, env = "DIFFUSIOND_MAX_BATCH_IMAGES", default_value_t = 8, value_parser = at_least_one())]
    pub max_batch_images: usize,
    /// More host names the server may be addressed by, beside the listen address, `localhost`,
    /// `127.0.0.1`, `[::1]` and the public URL's host. Checked only in open mode on a loopback
    /// address, where it stops DNS-rebinding pages. Comma-separated or repeated.
    #[arg(long, env = "DIFFUSIOND_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// In keys mode, GET /metrics needs a valid API key (`Authorization: Bearer <key>`) like the
    /// API; without it /metrics is open to whoever reaches the server.
    #[arg(long, env = "DIFFUSIOND_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// Web origins (`https://app.example.com`, or `*`) whose pages may call the API from a
    /// browser (CORS). Any other cross-origin request is refused with 403. Comma-separated or
    /// repeated.
    #[arg(long, env = "DIFFUSIOND_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Seconds to wait for requests in flight after SIGINT/SIGTERM before giving up on them
    /// (their credits are refunded).
    #[arg(long, env = "DIFFUSIOND_SHUTDOWN_TIMEOUT", default_value_t = 120)]
    pub shutdown_timeout: u64,
    /// Delete stored images older than this (`90s`, `30m`, `24h`, `7d`) in the background;
    /// their URLs answer 404 afterwards. Off by default (images are kept until you delete them).
    #[arg(long, env = "DIFFUSIOND_RETENTION")]
    pub retention: Option<Age>,
    /// Open HTTP connections at most; further clients wait in the listen backlog until one
    /// closes. Keep it below the process's file-descriptor limit (`ulimit -n`).
    #[arg(long, env = "DIFFUSIOND_MAX_CONNECTIONS", default_value_t = 512, value_parser = at_least_one())]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's complete headers, counted from when it
    /// opens or its previous response ends: also how long an idle keep-alive connection stays open.
    #[arg(long, env = "DIFFUSIOND_HEADER_READ_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout: u64,
    /// Seconds a response may wait for the client to read more of it before the connection is
    /// closed (a client that stopped reading). Progress, however slow, resets it.
    #[arg(long, env = "DIFFUSIOND_WRITE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout: u64,
    /// Do not write the generation parameters (prompt, model, seed, steps, ...) and the
    /// "made by a trained model" marker into image files. By default they travel with every image
    /// (PNG text chunks, XMP in JPEG and WebP), so anyone holding the file can read the prompt.
    #[arg(long, env = "DIFFUSIOND_NO_METADATA")]
    pub no_metadata: bool,
    #[command(flatten)]
    pub shared: SharedArgs,
}

/// A duration as `N` seconds or `N` followed by `s`, `m`, `h` or `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age(pub std::time::Duration);

impl std::str::FromStr for Age {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("'{s}' is not a duration (e.g. 90s, 30m, 24h, 7d)"))?;
        let mult = match unit.trim() {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            other => return Err(format!("unknown duration unit '{other}' in '{s}'")),
        };
        match n.checked_mul(mult) {
            Some(secs) if secs > 0 => Ok(Self(std::time::Duration::from_secs(secs))),
            _ => Err(format!("'{s}' is not a positive duration")),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    /// Data directory holding the accounts database (the server's --data-dir).
    #[arg(long, env = "DIFFUSIOND_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// The servers' Postgres database (`postgres://...`), when they share one; else the SQLite
    /// file in the data directory.
    #[arg(
        long,
        env = "DIFFUSIOND_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysCommand {
    /// Create a key; the key itself is printed once, alone on the last line of stdout.
    Create {
        /// Starting credits.
        #[arg(long)]
        credits: i64,
        /// Requests per UTC day at most (unlimited when absent).
        #[arg(long)]
        daily_quota: Option<i64>,
        /// A label for the key (shown by `keys list`).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List keys with balance, quota and today's usage (never the keys themselves).
    List,
    /// Revoke a key, given as the key itself or its ID (`key_...`).
    Revoke {
        /// The key (`dk_...`) or its ID (`key_...`).
        key: String,
    },
    /// Add credits to a key, given as the key itself or its ID.
    AddCredits {
        /// The key (`dk_...`) or its ID (`key_...`).
        key: String,
        /// Credits to add (positive).
        credits: i64,
    },
}

#[cfg(test)]
mod age_tests {
    #![allow(clippy::unwrap_used)]
    use super::Age;
    use std::time::Duration;

    #[test]
    fn ages_parse_with_units() {
        assert_eq!("90".parse::<Age>().unwrap().0, Duration::from_secs(90));
        assert_eq!("90s".parse::<Age>().unwrap().0, Duration::from_secs(90));
        assert_eq!("30m".parse::<Age>().unwrap().0, Duration::from_secs(1800));
        assert_eq!("24h".parse::<Age>().unwrap().0, Duration::from_secs(86_400));
        assert_eq!("7d".parse::<Age>().unwrap().0, Duration::from_secs(604_800));
        for bad in [
            "",
            "0",
            "0s",
            "1w",
            "-1h",
            "h",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(bad.parse::<Age>().is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod quant_arg_tests {
    #![allow(clippy::unwrap_used)]
    use super::{QuantizeArg, WeightsOverride};

    #[test]
    fn weights_take_a_component_gguf() {
        let w: WeightsOverride = "z-image-turbo.transformer=hf:a/b/z-Q4_0.gguf"
            .parse()
            .unwrap();
        assert_eq!(w.pipeline, "z-image-turbo");
        assert_eq!(w.component.as_deref(), Some("transformer"));
        let w: WeightsOverride = "flux2-klein=/models/klein".parse().unwrap();
        assert_eq!((w.pipeline.as_str(), w.component), ("flux2-klein", None));
        let e = "p.text_encoder=/m/te.safetensors"
            .parse::<WeightsOverride>()
            .unwrap_err();
        assert!(e.contains(".gguf"), "{e}");
    }

    #[test]
    fn quantize_names_a_type_and_optionally_a_component() {
        let q: QuantizeArg = "q4_k".parse().unwrap();
        assert_eq!(q.components, ["transformer", "text_encoder"]);
        let q: QuantizeArg = "text_encoder=Q8_0".parse().unwrap();
        assert_eq!(
            (q.components.as_slice(), q.ty.name()),
            (&["text_encoder".to_string()][..], "q8_0")
        );
        assert!("q3_k".parse::<QuantizeArg>().unwrap_err().contains("q8_0"));
        assert!("vae=q8_0".parse::<QuantizeArg>().is_err());
    }
}
