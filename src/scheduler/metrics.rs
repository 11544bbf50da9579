//! The scheduler's counters; their names and rendering are in `crate::metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::metrics::{self as m, Exposition, Histogram, BATCH_BUCKETS, SECONDS_BUCKETS};

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
    /// Partial-image decodes after one step of one job.
    pub preview_seconds: Histogram,
    /// Per worker: its device's name, the images it decoded and the bytes of weights it
    /// holds.
    workers: Mutex<Vec<(String, u64, u64)>>,
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
            pipeline_load_seconds: Histogram::new(SECONDS_BUCKETS),
            batch_size: Histogram::new(BATCH_BUCKETS),
            image_latency: Histogram::new(SECONDS_BUCKETS),
            queue_wait: Histogram::new(SECONDS_BUCKETS),
            step_seconds: Histogram::new(SECONDS_BUCKETS),
            preview_seconds: Histogram::new(SECONDS_BUCKETS),
            workers: Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    /// Name the workers (their devices, in `--device` order).
    pub fn set_workers(&self, devices: Vec<String>) {
        *self.workers.lock().unwrap_or_else(|e| e.into_inner()) =
            devices.into_iter().map(|d| (d, 0, 0)).collect();
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

    /// Bytes of weights a worker's device holds now (shared tensors once).
    pub fn set_worker_weight_bytes(&self, worker: usize, bytes: u64) {
        if let Some(w) = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(worker)
        {
            w.2 = bytes;
        }
    }

    pub fn render(&self) -> String {
        let get = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64;
        let mut out = Exposition::default();
        out.value(&m::QUEUE_DEPTH, get(&self.queue_depth));
        out.value(&m::RUNNING_IMAGES, get(&self.running_images));
        out.value(&m::IMAGES_DECODED, get(&self.images_generated));
        out.value(&m::JOBS_FAILED, get(&self.jobs_failed));
        out.value(&m::JOBS_CANCELLED, get(&self.jobs_cancelled));
        out.value(&m::JOBS_REJECTED_BUSY, get(&self.jobs_rejected_busy));
        out.value(&m::PIPELINE_LOADS, get(&self.pipeline_loads));
        {
            let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            let index: Vec<String> = (0..workers.len()).map(|i| i.to_string()).collect();
            out.labelled(
                &m::WORKER_IMAGES,
                workers.iter().zip(&index).map(|((device, n, _), i)| {
                    (
                        [("worker", i.as_str()), ("device", device.as_str())],
                        *n as f64,
                    )
                }),
            );
            out.labelled(
                &m::WEIGHT_BYTES,
                workers.iter().zip(&index).map(|((device, _, bytes), i)| {
                    (
                        [("worker", i.as_str()), ("device", device.as_str())],
                        *bytes as f64,
                    )
                }),
            );
        }
        out.histogram(&m::PIPELINE_LOAD_SECONDS, &self.pipeline_load_seconds);
        out.histogram(&m::BATCH_SIZE, &self.batch_size);
        out.histogram(&m::IMAGE_LATENCY, &self.image_latency);
        out.histogram(&m::QUEUE_WAIT, &self.queue_wait);
        out.histogram(&m::STEP_SECONDS, &self.step_seconds);
        out.histogram(&m::PREVIEW_SECONDS, &self.preview_seconds);
        out.finish()
    }
}
