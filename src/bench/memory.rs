//! Peak memory and device names for `diffusiond bench`, from the operating system and the
//! driver's tools (no device API): on the CPU the process's peak resident set (`VmHWM`, reset
//! through `/proc/self/clear_refs` before each measurement where the kernel allows it); on CUDA
//! the card's used memory sampled with `nvidia-smi` every 20 ms (the card's whole use, so run
//! alone; it includes the CUDA context and what candle's allocator keeps).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Peak resident set of this process in bytes (`VmHWM` of `/proc/self/status`).
pub fn peak_rss() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Reset the peak resident set to the current one (`echo 5 > /proc/self/clear_refs`); false
/// where the kernel refuses it (then the peak is the process's since it started).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A running `nvidia-smi` that reports a card's used memory every 20 ms; the maximum seen is
/// kept until [`GpuSampler::stop`].
pub struct GpuSampler {
    child: Child,
    max: Arc<AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl GpuSampler {
    pub fn start(gpu: usize) -> Option<Self> {
        let mut child = Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                "-i",
                &gpu.to_string(),
                "-lms",
                "20",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let out = child.stdout.take()?;
        let max = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&max);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Ok(mib) = line.trim().parse::<u64>() {
                    seen.fetch_max(mib << 20, Ordering::Relaxed);
                }
            }
        });
        Some(Self {
            child,
            max,
            reader: Some(reader),
        })
    }

    /// The highest used memory seen, in bytes.
    pub fn stop(mut self) -> Option<u64> {
        // Give the sampler one more period to see the end of the last stage.
        std::thread::sleep(std::time::Duration::from_millis(40));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Some(self.max.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }
}

impl Drop for GpuSampler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPU's model name (`/proc/cpuinfo`, or `sysctl` on macOS).
pub fn cpu_model() -> String {
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(name) = info
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
        {
            // Some VMs name only the brand ("AMD EPYC"): add the family and model numbers,
            // which tell the microarchitecture (25/17 is Zen 4).
            let field = |key: &str| {
                info.lines()
                    .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            };
            return match (field("cpu family"), field("model")) {
                (Some(f), Some(m)) => format!("{} (family {f} model {m})", name.1.trim()),
                _ => name.1.trim().to_string(),
            };
        }
    }
    command_line("sysctl", &["-n", "machdep.cpu.brand_string"])
        .unwrap_or_else(|| "unknown CPU".into())
}

/// A CUDA card's name from `nvidia-smi`.
pub fn gpu_name(gpu: usize) -> Option<String> {
    command_line(
        "nvidia-smi",
        &[
            "--query-gpu=name",
            "--format=csv,noheader",
            "-i",
            &gpu.to_string(),
        ],
    )
}

fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_covers_what_is_resident() {
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        // Resident first: the peak read after it covers it (other tests allocate meanwhile).
        let now = status_kib("VmRSS:").map(|k| k * 1024);
        let (Some(now), Some(peak)) = (now, peak_rss()) else {
            eprintln!("SKIPPED peak_rss_covers_what_is_resident: needs /proc/self/status");
            // Linux always has it: there, a missing file is a failure, not a skip.
            if cfg!(target_os = "linux") {
                panic!("no /proc/self/status on Linux");
            }
            return;
        };
        assert!(
            now >= 64 << 20 && peak >= now,
            "peak {peak}, resident {now}"
        );
    }
}
