//! Command-line types (clap derive). Each doc comment is the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
}

/// Where the model runs and in which precision.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Device: `cpu`, `cuda`, `cuda:N` or `metal`.
    #[arg(long, env = "DIFFUSIOND_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Run dtype: `f32` (CPU default; exact), `bf16` or `f16` (GPU; half the memory, f32 kept where
    /// the reference keeps it). Default: f32 on CPU, bf16 on a GPU.
    #[arg(long, env = "DIFFUSIOND_DTYPE")]
    pub dtype: Option<String>,
    /// Keep the text encoder in host memory and run it on the CPU: frees ~8 GB of GPU memory
    /// (what lets the full Z-Image-Turbo fit a 24 GB card) at the cost of slower prompt encoding.
    #[arg(long, env = "DIFFUSIOND_OFFLOAD_TEXT_ENCODER")]
    pub offload_text_encoder: bool,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Local pipeline to run.
    #[arg(long, default_value = "z-image-turbo")]
    pub model: String,
    /// The text prompt.
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt, used only when --guidance-scale > 0.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Image width in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    pub width: u32,
    /// Image height in pixels (multiple of 16).
    #[arg(long, default_value_t = 1024)]
    pub height: u32,
    /// Number of images (one batched denoising loop).
    #[arg(long, default_value_t = 1)]
    pub num_images: u32,
    /// Seed of the first image; image i uses seed + i. Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Model evaluations (denoising steps). Default: the pipeline's (8 for Turbo).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; CFG is on when > 0 (doubles the work). Default: the pipeline's.
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// Weights source per pipeline: `PIPELINE=DIR` (published layout) or `PIPELINE=hf:ORG/REPO[@REV]`.
    #[arg(long = "weights", env = "DIFFUSIOND_WEIGHTS", value_delimiter = ',')]
    pub weights: Vec<String>,
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
    pub weights: Vec<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Jobs that may wait for the device; beyond this a request gets 503 server_busy at once.
    #[arg(long, env = "DIFFUSIOND_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    /// Images denoised together in one batch at most (higher: more throughput, more memory).
    #[arg(long, env = "DIFFUSIOND_MAX_BATCH_IMAGES", default_value_t = 8)]
    pub max_batch_images: usize,
    /// Seconds to wait for requests in flight after SIGINT/SIGTERM before giving up on them
    /// (their credits are refunded).
    #[arg(long, env = "DIFFUSIOND_SHUTDOWN_TIMEOUT", default_value_t = 120)]
    pub shutdown_timeout: u64,
    /// Do not write the generation parameters (prompt, model, seed, steps, ...) and the
    /// "made by a trained model" marker into image files. By default they travel with every image
    /// (PNG text chunks, XMP in JPEG and WebP), so anyone holding the file can read the prompt.
    #[arg(long, env = "DIFFUSIOND_NO_METADATA")]
    pub no_metadata: bool,
}

#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    /// Data directory holding the accounts database (the server's --data-dir).
    #[arg(long, env = "DIFFUSIOND_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
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
