//! Every metric the server exports, defined once (name, kind, help), and the one writer of the
//! Prometheus text format that all layers render through. Layers keep their own counters (atomics
//! and [`Histogram`]s where they are updated); `GET /metrics` concatenates their renderings.
//!
//! Names: `diffusiond_` + what is counted + a unit suffix (`_total` for counters, `_seconds`
//! for times). Requests are what clients send (`infer`), jobs what the scheduler runs, images
//! are counted where they are decoded (`images_decoded`) and where they are stored
//! (`images_generated`).

use std::fmt::Write;
use std::sync::Mutex;

/// `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric's definition.
#[derive(Debug, Clone, Copy)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn def(name: &'static str, kind: Kind, help: &'static str) -> Def {
    Def { name, kind, help }
}

// HTTP (http/).
pub const HTTP_RESPONSES: Def = def(
    "diffusiond_http_responses_total",
    Kind::Counter,
    "HTTP responses by method, route, status and error code.",
);

// Generation requests (infer/).
pub const REQUESTS_SUCCEEDED: Def = def(
    "diffusiond_requests_succeeded_total",
    Kind::Counter,
    "Generation requests answered with images.",
);
pub const REQUESTS_FAILED: Def = def(
    "diffusiond_requests_failed_total",
    Kind::Counter,
    "Accepted generation requests that failed (refunded).",
);
pub const IMAGES_GENERATED: Def = def(
    "diffusiond_images_generated_total",
    Kind::Counter,
    "Images generated and stored.",
);
pub const CREDITS_CHARGED: Def = def(
    "diffusiond_credits_charged_total",
    Kind::Counter,
    "Credits charged for successful requests (also in open mode).",
);
pub const REQUEST_SECONDS: Def = def(
    "diffusiond_request_seconds_total",
    Kind::Counter,
    "Time from submit to stored images, summed over successful requests.",
);

// The scheduler and its device worker (scheduler/).
pub const QUEUE_DEPTH: Def = def(
    "diffusiond_queue_depth",
    Kind::Gauge,
    "Jobs waiting for the device.",
);
pub const RUNNING_IMAGES: Def = def(
    "diffusiond_running_images",
    Kind::Gauge,
    "Images in the running denoising batch.",
);
pub const IMAGES_DECODED: Def = def(
    "diffusiond_images_decoded_total",
    Kind::Counter,
    "Images decoded on the device (stored or not).",
);
pub const JOBS_FAILED: Def = def(
    "diffusiond_jobs_failed_total",
    Kind::Counter,
    "Jobs whose generation failed.",
);
pub const JOBS_CANCELLED: Def = def(
    "diffusiond_jobs_cancelled_total",
    Kind::Counter,
    "Jobs dropped because their client went away.",
);
pub const JOBS_REJECTED_BUSY: Def = def(
    "diffusiond_jobs_rejected_busy_total",
    Kind::Counter,
    "Jobs refused because the queue was full.",
);
pub const PIPELINE_LOADS: Def = def(
    "diffusiond_pipeline_loads_total",
    Kind::Counter,
    "Pipelines loaded after start because a queued request needed them.",
);
pub const WORKER_IMAGES: Def = def(
    "diffusiond_worker_images_total",
    Kind::Counter,
    "Images decoded by each worker (one per --device entry).",
);
pub const WEIGHT_BYTES: Def = def(
    "diffusiond_weight_bytes",
    Kind::Gauge,
    "Bytes of model weights each worker's device holds (a tensor shared by pipelines counts once).",
);
pub const PIPELINE_LOAD_SECONDS: Def = def(
    "diffusiond_pipeline_load_seconds",
    Kind::Histogram,
    "Time to load a pipeline a queued request needed (its queue wait includes it).",
);
pub const BATCH_SIZE: Def = def(
    "diffusiond_batch_size",
    Kind::Histogram,
    "Images per denoising step.",
);
pub const IMAGE_LATENCY: Def = def(
    "diffusiond_image_latency_seconds",
    Kind::Histogram,
    "Time from submit to finished image, per image.",
);
pub const QUEUE_WAIT: Def = def(
    "diffusiond_queue_wait_seconds",
    Kind::Histogram,
    "Time a job waited before its first step.",
);
pub const STEP_SECONDS: Def = def(
    "diffusiond_step_seconds",
    Kind::Histogram,
    "Wall time of one batched denoising step.",
);

pub const PREVIEW_SECONDS: Def = def(
    "diffusiond_preview_seconds",
    Kind::Histogram,
    "Wall time of the partial-image decodes made after one step for one job (its batch waits for them).",
);

/// Bucket bounds for times, in seconds.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Bucket bounds for batch sizes.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0];

/// Writes metrics in the Prometheus text format.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn header(&mut self, d: &Def) {
        let _ = writeln!(self.out, "# HELP {} {}", d.name, d.help);
        let _ = writeln!(self.out, "# TYPE {} {}", d.name, d.kind.as_str());
    }

    /// A counter or gauge without labels.
    pub fn value(&mut self, d: &Def, v: f64) {
        debug_assert!(d.kind != Kind::Histogram, "{}", d.name);
        self.header(d);
        let _ = writeln!(self.out, "{} {v}", d.name);
    }

    /// A counter or gauge with one sample per label set (`name="value"` pairs, in order).
    pub fn labelled<'a, L>(&mut self, d: &Def, samples: impl IntoIterator<Item = (L, f64)>)
    where
        L: IntoIterator<Item = (&'a str, &'a str)>,
    {
        debug_assert!(d.kind != Kind::Histogram, "{}", d.name);
        self.header(d);
        for (labels, v) in samples {
            let labels: Vec<String> = labels
                .into_iter()
                .map(|(k, val)| format!("{k}=\"{}\"", escape(val)))
                .collect();
            let _ = writeln!(self.out, "{}{{{}}} {v}", d.name, labels.join(","));
        }
    }

    pub fn histogram(&mut self, d: &Def, h: &Histogram) {
        debug_assert!(d.kind == Kind::Histogram, "{}", d.name);
        let s = h.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.header(d);
        let name = d.name;
        for (b, c) in h.bounds.iter().zip(&s.counts) {
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(self.out, "{name}_sum {}", s.sum);
        let _ = writeln!(self.out, "{name}_count {}", s.count);
    }

    /// Text another component rendered with its own [`Exposition`].
    pub fn rendered(&mut self, text: &str) {
        self.out.push_str(text);
        if !text.is_empty() && !text.ends_with('\n') {
            self.out.push('\n');
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value with `\`, `"` and newlines escaped, as the text format wants.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 3.0] {
            h.observe(v);
        }
        let mut e = Exposition::default();
        e.value(&QUEUE_DEPTH, 3.0);
        e.labelled(
            &HTTP_RESPONSES,
            [([("route", "/a\"b"), ("status", "200")], 2.0)],
        );
        e.histogram(&BATCH_SIZE, &h);
        let text = e.finish();
        let want = "\
# HELP diffusiond_queue_depth Jobs waiting for the device.
# TYPE diffusiond_queue_depth gauge
diffusiond_queue_depth 3
# HELP diffusiond_http_responses_total HTTP responses by method, route, status and error code.
# TYPE diffusiond_http_responses_total counter
diffusiond_http_responses_total{route=\"/a\\\"b\",status=\"200\"} 2
# HELP diffusiond_batch_size Images per denoising step.
# TYPE diffusiond_batch_size histogram
diffusiond_batch_size_bucket{le=\"1\"} 1
diffusiond_batch_size_bucket{le=\"2\"} 2
diffusiond_batch_size_bucket{le=\"+Inf\"} 3
diffusiond_batch_size_sum 5
diffusiond_batch_size_count 3
";
        assert_eq!(text, want);
    }

    #[test]
    fn every_name_is_unique_and_well_formed() {
        let all = [
            HTTP_RESPONSES,
            REQUESTS_SUCCEEDED,
            REQUESTS_FAILED,
            IMAGES_GENERATED,
            CREDITS_CHARGED,
            REQUEST_SECONDS,
            QUEUE_DEPTH,
            RUNNING_IMAGES,
            IMAGES_DECODED,
            JOBS_FAILED,
            JOBS_CANCELLED,
            JOBS_REJECTED_BUSY,
            PIPELINE_LOADS,
            WORKER_IMAGES,
            WEIGHT_BYTES,
            PIPELINE_LOAD_SECONDS,
            BATCH_SIZE,
            IMAGE_LATENCY,
            QUEUE_WAIT,
            STEP_SECONDS,
            PREVIEW_SECONDS,
        ];
        let mut names: Vec<&str> = all.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for d in all {
            assert!(d.name.starts_with("diffusiond_"), "{}", d.name);
            assert_eq!(
                d.name.ends_with("_total"),
                d.kind == Kind::Counter,
                "{}: counters and only counters end in _total",
                d.name
            );
        }
    }
}
