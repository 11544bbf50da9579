//! Counters of the generation path, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

    pub fn render(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let lines = [
            (
                "diffusiond_generations_succeeded_total",
                "counter",
                "Generation requests answered with images.",
                get(&self.requests_succeeded) as f64,
            ),
            (
                "diffusiond_generations_failed_total",
                "counter",
                "Accepted generation requests that failed (refunded).",
                get(&self.requests_failed) as f64,
            ),
            (
                "diffusiond_images_generated_total",
                "counter",
                "Images generated and stored.",
                get(&self.images_generated) as f64,
            ),
            (
                "diffusiond_credits_charged_total",
                "counter",
                "Credits charged for successful requests (also in open mode).",
                get(&self.credits_charged) as f64,
            ),
            (
                "diffusiond_generation_seconds_total",
                "counter",
                "Time from submit to stored images, summed over successful requests.",
                get(&self.generation_micros) as f64 / 1e6,
            ),
        ];
        for (name, kind, help, value) in lines {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}
