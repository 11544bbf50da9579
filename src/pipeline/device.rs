//! Device and run-dtype selection from their command-line spellings, and process-wide CPU
//! runtime settings.

use candle_core::{DType, Device};

use super::error::{PipelineError, Result};

/// A device as the command line names it: `auto`, `cpu`, `cuda`, `cuda:N` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA when built in and a card is present, else Metal, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        let spec = s.trim().to_ascii_lowercase();
        Ok(match spec.as_str() {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            "metal" => Self::Metal,
            s if s.starts_with("cuda:") => Self::Cuda(s[5..].parse().map_err(|_| {
                PipelineError::InvalidInput(format!("bad device '{spec}': expected cuda:N"))
            })?),
            _ => {
                return Err(PipelineError::InvalidInput(format!(
                    "unknown device '{spec}': expected auto, cpu, cuda, cuda:N or metal"
                )))
            }
        })
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Open the device. `auto` tries CUDA (when built with it), then Metal, then the CPU, and
    /// logs what it chose.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Ok(Device::new_cuda(n)?),
            Self::Metal => Ok(Device::new_metal(0)?),
            Self::Auto => {
                let dev = if candle_core::utils::cuda_is_available() {
                    Device::new_cuda(0).unwrap_or(Device::Cpu)
                } else if candle_core::utils::metal_is_available() {
                    Device::new_metal(0).unwrap_or(Device::Cpu)
                } else {
                    Device::Cpu
                };
                tracing::info!(device = describe(&dev), "--device auto");
                Ok(dev)
            }
        }
    }
}

/// `cpu`, `cuda:N`, `metal`.
pub fn describe(dev: &Device) -> String {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The run dtype as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunDType {
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for RunDType {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            other => Err(PipelineError::InvalidInput(format!(
                "unknown dtype '{other}': expected f32, bf16 or f16"
            ))),
        }
    }
}

impl RunDType {
    /// The dtype to run in on `device`: the one given, else f32 on the CPU and bf16 on a GPU.
    pub fn resolve(given: Option<Self>, device: &Device) -> DType {
        match given {
            Some(Self::F32) => DType::F32,
            Some(Self::Bf16) => DType::BF16,
            Some(Self::F16) => DType::F16,
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
        }
    }
}

/// Process-wide CPU runtime settings; call once at start, before any tensor op.
///
/// candle's CPU worker pool spins 25,000 iterations after every elementwise op before parking;
/// on a machine with few cores those spinning workers steal the cores the next GEMM needs
/// (measured on 2 cores: 0.40 s vs 0.23 s per denoising step of the bench model). A short spin
/// keeps the hand-off latency low without that cost. An explicit
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` in the environment wins.
///
/// mimalloc (the binaries' allocator) hands freed pages back to the OS 10 ms after a free by
/// default. A denoising step frees and reallocates the same activation buffers every few tens of
/// milliseconds, so each step paid page faults and kernel page zeroing for memory it had just
/// released (~5% of a batch-4 step of the bench model). Freed memory is therefore kept for reuse
/// (`purge_delay = -1`): resident memory stays at the peak of the largest request served, which
/// is what a dedicated inference process needs anyway. An explicit `MIMALLOC_PURGE_DELAY` wins.
pub fn init_cpu_runtime() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "100");
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        keep_freed_memory();
    }
}

/// `mi_option_set(mi_option_purge_delay, -1)`.
#[allow(unsafe_code)]
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e` (libmimalloc-sys does not name it).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option is a plain store into mimalloc's option table; it takes no
    // pointers and is allowed at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// Memory the device has in all, in bytes, where it can be told: the CPU's RAM
/// (`/proc/meminfo`), a CUDA card's memory (`nvidia-smi`); `None` elsewhere.
pub fn total_memory(dev: &Device) -> Option<u64> {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kib: u64 = info
                .lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(kib * 1024)
        }
        candle_core::DeviceLocation::Cuda { gpu_id } => {
            let out = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.total",
                    "--format=csv,noheader,nounits",
                    "-i",
                    &gpu_id.to_string(),
                ])
                .output()
                .ok()?;
            let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
            Some(mib << 20)
        }
        candle_core::DeviceLocation::Metal { .. } => None,
    }
}
