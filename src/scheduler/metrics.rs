//! Scheduler metrics, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistState>,
}

#[derive(Debug, Default)]
struct HistState {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            inner: Mutex::new(HistState {
                counts: vec![0; bounds.len()],
                ..Default::default()
            }),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                s.counts[i] += 1;
            }
        }
        s.sum += v;
        s.count += 1;
    }

    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&s.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}", s.sum);
        let _ = writeln!(out, "{name}_count {}", s.count);
    }
}

const SECONDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
const BATCH: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0];

/// Everything the scheduler counts.
#[derive(Debug)]
pub struct Metrics {
    pub queue_depth: AtomicU64,
    pub running_images: AtomicU64,
    pub images_generated: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_cancelled: AtomicU64,
    pub jobs_rejected_busy: AtomicU64,
    pub pipeline_loads: AtomicU64,
    pub pipeline_load_seconds: Histogram,
    pub batch_size: Histogram,
    pub image_latency: Histogram,
    pub queue_wait: Histogram,
    pub step_seconds: Histogram,
    /// Per worker: its device's name and the images it decoded.
    workers: Mutex<Vec<(String, u64)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            queue_depth: AtomicU64::new(0),
            running_images: AtomicU64::new(0),
            images_generated: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            jobs_cancelled: AtomicU64::new(0),
            jobs_rejected_busy: AtomicU64::new(0),
            pipeline_loads: AtomicU64::new(0),
            pipeline_load_seconds: Histogram::new(SECONDS),
            batch_size: Histogram::new(BATCH),
            image_latency: Histogram::new(SECONDS),
            queue_wait: Histogram::new(SECONDS),
            step_seconds: Histogram::new(SECONDS),
            workers: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    /// Name the workers (their devices, in `--device` order).
    pub fn set_workers(&self, devices: Vec<String>) {
        *self.workers.lock().unwrap_or_else(|e| e.into_inner()) =
            devices.into_iter().map(|d| (d, 0)).collect();
    }

    pub fn add_worker_images(&self, worker: usize, n: u64) {
        if let Some(w) = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(worker)
        {
            w.1 += n;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        gauge(
            &mut out,
            "diffusiond_queue_depth",
            "Jobs waiting for the device.",
            "gauge",
            &self.queue_depth,
        );
        gauge(
            &mut out,
            "diffusiond_running_images",
            "Images in the running denoising batch.",
            "gauge",
            &self.running_images,
        );
        gauge(
            &mut out,
            "diffusiond_device_images_total",
            "Images decoded on the device (stored or not).",
            "counter",
            &self.images_generated,
        );
        gauge(
            &mut out,
            "diffusiond_jobs_failed_total",
            "Jobs whose generation failed.",
            "counter",
            &self.jobs_failed,
        );
        gauge(
            &mut out,
            "diffusiond_jobs_cancelled_total",
            "Jobs dropped because their client went away.",
            "counter",
            &self.jobs_cancelled,
        );
        gauge(
            &mut out,
            "diffusiond_jobs_rejected_busy_total",
            "Jobs refused because the queue was full.",
            "counter",
            &self.jobs_rejected_busy,
        );
        gauge(
            &mut out,
            "diffusiond_pipeline_loads_total",
            "Pipelines loaded after start because a queued request needed them.",
            "counter",
            &self.pipeline_loads,
        );
        {
            let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            let name = "diffusiond_worker_images_total";
            let _ = writeln!(
                out,
                "# HELP {name} Images decoded by each worker (one per --device entry)."
            );
            let _ = writeln!(out, "# TYPE {name} counter");
            for (i, (device, n)) in workers.iter().enumerate() {
                let _ = writeln!(out, "{name}{{worker=\"{i}\",device=\"{device}\"}} {n}");
            }
        }
        self.pipeline_load_seconds.render(
            &mut out,
            "diffusiond_pipeline_load_seconds",
            "Time to load a pipeline a queued request needed (its queue wait includes it).",
        );
        self.batch_size.render(
            &mut out,
            "diffusiond_batch_size",
            "Images per denoising step.",
        );
        self.image_latency.render(
            &mut out,
            "diffusiond_image_latency_seconds",
            "Time from submit to finished image, per image.",
        );
        self.queue_wait.render(
            &mut out,
            "diffusiond_queue_wait_seconds",
            "Time a job waited before its first step.",
        );
        self.step_seconds.render(
            &mut out,
            "diffusiond_step_seconds",
            "Wall time of one batched denoising step.",
        );
        out
    }
}
