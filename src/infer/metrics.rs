//! Counters of the generation path; their names and rendering are in `crate::metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{self as m, Exposition};

#[derive(Debug, Default)]
pub struct Metrics {
    requests_succeeded: AtomicU64,
    requests_failed: AtomicU64,
    images_generated: AtomicU64,
    credits_charged: AtomicU64,
    generation_micros: AtomicU64,
}

impl Metrics {
    pub fn success(&self, images: usize, credits: i64, took: Duration) {
        self.requests_succeeded.fetch_add(1, Ordering::Relaxed);
        self.images_generated
            .fetch_add(images as u64, Ordering::Relaxed);
        self.credits_charged
            .fetch_add(u64::try_from(credits).unwrap_or(0), Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.generation_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// A request that was accepted (reached the scheduler) and then failed.
    pub fn failure(&self) {
        self.requests_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, out: &mut Exposition) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        out.value(&m::REQUESTS_SUCCEEDED, get(&self.requests_succeeded));
        out.value(&m::REQUESTS_FAILED, get(&self.requests_failed));
        out.value(&m::IMAGES_GENERATED, get(&self.images_generated));
        out.value(&m::CREDITS_CHARGED, get(&self.credits_charged));
        out.value(&m::REQUEST_SECONDS, get(&self.generation_micros) / 1e6);
    }
}
