//! Device and run-dtype selection from their command-line spellings.

use candle_core::{DType, Device};

use super::error::{PipelineError, Result};

/// Open a device from `cpu`, `cuda`, `cuda:N` or `metal`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    let dev = match spec.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..].parse().map_err(|_| {
                PipelineError::InvalidInput(format!("bad device '{spec}': expected cuda:N"))
            })?;
            Device::new_cuda(n)?
        }
        _ => {
            return Err(PipelineError::InvalidInput(format!(
                "unknown device '{spec}': expected cpu, cuda, cuda:N or metal"
            )))
        }
    };
    Ok(dev)
}

/// The run dtype: `f32`, `bf16` or `f16`; `None` gives f32 on CPU and bf16 on a GPU.
pub fn parse_dtype(spec: Option<&str>, device: &Device) -> Result<DType> {
    match spec.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None => Ok(if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        }),
        Some("f32") | Some("float32") => Ok(DType::F32),
        Some("bf16") | Some("bfloat16") => Ok(DType::BF16),
        Some("f16") | Some("float16") => Ok(DType::F16),
        Some(other) => Err(PipelineError::InvalidInput(format!(
            "unknown dtype '{other}': expected f32, bf16 or f16"
        ))),
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
