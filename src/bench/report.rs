//! What `diffusiond bench` reports: the JSON shape and the table.

use serde::Serialize;

use crate::pipeline::flops::Work;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The pipeline measured (catalog name) and its family.
    pub pipeline: String,
    pub family: String,
    /// `synthetic` (random weights) or `weights`.
    pub weights: String,
    /// Where the configuration (synthetic) or the weights came from.
    pub source: String,
    pub device: String,
    /// The device's name (the GPU's, or the CPU model on the CPU).
    pub device_name: String,
    pub cpu_model: String,
    pub dtype: String,
    /// Whether flash attention was built in and turned on.
    pub flash_attn: bool,
    pub steps: usize,
    pub runs: usize,
    pub warmup: usize,
    pub prompt: String,
    /// Classifier-free guidance: two evaluations per step and two prompt encodings.
    pub cfg: bool,
    pub load_s: f64,
    /// Bytes of weights the pipeline holds on its device.
    pub weight_bytes: u64,
    /// The peak TFLOP/s the share column divides by, and where it came from.
    pub peak_tflops: f64,
    pub peak_source: String,
    /// `rss` (peak resident set of the process) or `device` (the card's used memory).
    pub memory_kind: String,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    /// Medians over the timed runs, seconds: one prompt encoding, one denoising step of the
    /// whole batch, the decode of the whole batch.
    pub text_encode_s: f64,
    pub step_s: f64,
    /// Median time until a step was queued on the device (its call returned), before waiting
    /// for the device: close to `step_s` where the device runs synchronously (the CPU) or a
    /// step reads a value back mid-way; a small share of it on a GPU otherwise.
    pub step_queued_s: f64,
    pub vae_decode_s: f64,
    /// encode + steps x step + decode.
    pub total_s: f64,
    pub s_per_image: f64,
    pub images_per_min: f64,
    /// Peak memory during the timed runs (see `memory_kind`); null where it cannot be told.
    pub peak_memory_bytes: Option<u64>,
    pub vae_tiled: bool,
    pub text_tokens: usize,
    /// Tokens one evaluation of one image attends over.
    pub sequence: usize,
    pub flops: Flops,
    /// Total FLOPs / total seconds.
    pub achieved_tflops: f64,
    /// achieved / peak.
    pub share_of_peak: f64,
    /// TFLOP/s of the denoising steps alone (the stage the design targets are about).
    pub step_tflops: f64,
}

/// FLOPs of the batch's stages (see `pipeline::flops`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Flops {
    pub text_encode: f64,
    pub step: f64,
    pub vae_decode: f64,
    pub total: f64,
}

impl Flops {
    /// The stages of one batch: `encodes` prompt encodings, `evals` evaluations per image and
    /// step, `batch` images.
    pub fn of(work: &Work, batch: usize, steps: usize, evals: usize, encodes: usize) -> Self {
        let text_encode = encodes as f64 * work.text_encode;
        let step = (batch * evals) as f64 * work.step_per_image;
        let vae_decode = batch as f64 * work.decode_per_image;
        Self {
            text_encode,
            step,
            vae_decode,
            total: text_encode + steps as f64 * step + vae_decode,
        }
    }
}

/// The median of some samples (0 for none).
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("-".into(), |b| {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    })
}

/// The human table.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{} ({}, {} weights: {})\n{} ({}), {}, {} steps{}, flash-attn {}, median of {} runs after {} warm-up\n\
         peak {:.3} TFLOP/s ({}); load {:.1} s, weights {}\n\n",
        r.pipeline,
        r.family,
        r.weights,
        r.source,
        r.device,
        if r.device_name == r.cpu_model {
            r.cpu_model.clone()
        } else {
            format!("{}, host CPU {}", r.device_name, r.cpu_model)
        },
        r.dtype,
        r.steps,
        if r.cfg { " with CFG" } else { "" },
        if r.flash_attn { "on" } else { "off" },
        r.runs,
        r.warmup,
        r.peak_tflops,
        r.peak_source,
        r.load_s,
        mib(Some(r.weight_bytes)),
    );
    let header = [
        "size",
        "batch",
        "encode s",
        "step s",
        "VAE s",
        "s/image",
        "images/min",
        "peak mem",
        "TFLOP/s",
        "% peak",
        "step TFLOP/s",
    ];
    let rows: Vec<[String; 11]> = r
        .rows
        .iter()
        .map(|x| {
            [
                format!(
                    "{}x{}{}",
                    x.width,
                    x.height,
                    if x.vae_tiled { " (tiled VAE)" } else { "" }
                ),
                x.batch.to_string(),
                format!("{:.3}", x.text_encode_s),
                format!("{:.3}", x.step_s),
                format!("{:.3}", x.vae_decode_s),
                format!("{:.3}", x.s_per_image),
                format!("{:.2}", x.images_per_min),
                mib(x.peak_memory_bytes),
                format!("{:.3}", x.achieved_tflops),
                format!("{:.1}", 100.0 * x.share_of_peak),
                format!("{:.3}", x.step_tflops),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        format!("| {} |\n", parts.join(" | "))
    };
    out += &line(&header.map(String::from));
    out += &line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for row in &rows {
        out += &line(row);
    }
    out += &format!(
        "memory: {}\n",
        if r.memory_kind == "rss" {
            "peak resident set of the process (VmHWM)"
        } else {
            "the card's used memory (nvidia-smi, sampled every 20 ms)"
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn flops_of_a_batch() {
        let w = Work {
            text_encode: 10.0,
            step_per_image: 100.0,
            decode_per_image: 7.0,
            text_tokens: 3,
            sequence: 9,
        };
        let f = Flops::of(&w, 4, 8, 2, 2);
        assert_eq!((f.text_encode, f.step, f.vae_decode), (20.0, 800.0, 28.0));
        assert_eq!(f.total, 20.0 + 8.0 * 800.0 + 28.0);
    }
}
