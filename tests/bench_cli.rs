//! `diffusiond bench` as a user runs it: the real binary on the tiny reference models, with
//! random weights of their configuration (`--synthetic-config`) and with their real weights.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use diffusiond::pipeline::{self, Family, LoadOptions, WeightSource};
use serde_json::Value;

const PROMPT: &str = "a red fox sitting in the snow";

fn flux2_tiny() -> PathBuf {
    common::reference_flux2_dir().join("tiny")
}

/// Run `diffusiond bench` with `args` and return its JSON report.
fn bench(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let o = Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .arg("bench")
        .args(["--device", "cpu", "--prompt", PROMPT, "--json"])
        .arg(&json)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The table is printed too, one line per size and batch.
    assert!(
        stdout.contains("| size |") || stdout.contains("size |"),
        "{stdout}"
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

fn load_real(dir: &Path) -> Box<dyn Family> {
    let opts = LoadOptions::new(candle_core::Device::Cpu, candle_core::DType::F32);
    pipeline::load(&WeightSource::Local(dir.to_path_buf()), None, &opts).unwrap()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("field {k} missing or not a number in {v}"))
}

/// Every field of the report, with values that hang together: totals from the stages,
/// images per minute from seconds per image, TFLOP/s from the FLOPs the configuration gives.
fn check_report(r: &Value, rows: usize, steps: usize, model: &dyn Family) {
    for k in [
        "pipeline",
        "family",
        "weights",
        "source",
        "device",
        "device_name",
        "cpu_model",
        "dtype",
        "prompt",
        "peak_source",
        "memory_kind",
    ] {
        assert!(
            r[k].as_str().is_some_and(|s| !s.is_empty()),
            "{k} missing in {r}"
        );
    }
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["dtype"], "f32");
    assert_eq!(r["memory_kind"], "rss");
    assert_eq!(r["steps"].as_u64(), Some(steps as u64));
    assert!(r["flash_attn"].is_boolean() && r["cfg"].is_boolean());
    assert!(f(r, "load_s") > 0.0 && f(r, "peak_tflops") > 0.0);
    assert!(r["weight_bytes"].as_u64().unwrap() > 0);
    let rows_v = r["rows"].as_array().unwrap();
    assert_eq!(rows_v.len(), rows);
    for row in rows_v {
        let (w, h, b) = (
            row["width"].as_u64().unwrap() as usize,
            row["height"].as_u64().unwrap() as usize,
            row["batch"].as_u64().unwrap() as usize,
        );
        let (enc, step, dec) = (
            f(row, "text_encode_s"),
            f(row, "step_s"),
            f(row, "vae_decode_s"),
        );
        assert!(enc > 0.0 && step > 0.0 && dec > 0.0, "{row}");
        // Queued before the device was awaited: never longer than the awaited step.
        let queued = f(row, "step_queued_s");
        assert!(queued > 0.0 && queued <= step, "{row}");
        let total = f(row, "total_s");
        assert!(
            (total - (enc + steps as f64 * step + dec)).abs() < 1e-9,
            "{row}"
        );
        assert!((f(row, "s_per_image") - total / b as f64).abs() < 1e-9);
        assert!((f(row, "images_per_min") * f(row, "s_per_image") - 60.0).abs() < 1e-6);
        // The tiny models take well under a GiB; the process holds at least their weights.
        let mem = row["peak_memory_bytes"].as_u64().unwrap();
        assert!(mem > 1 << 20 && mem < 4 << 30, "peak memory {mem}");
        assert_eq!(row["vae_tiled"], false);
        // FLOPs: the configuration's count for this prompt and size, times the batch.
        let work = model.work(PROMPT, w, h).unwrap();
        let fl = &row["flops"];
        assert_eq!(f(fl, "text_encode"), work.text_encode);
        assert_eq!(f(fl, "step"), b as f64 * work.step_per_image);
        assert_eq!(f(fl, "vae_decode"), b as f64 * work.decode_per_image);
        let flops_total = work.text_encode
            + b as f64 * (steps as f64 * work.step_per_image + work.decode_per_image);
        assert!((f(fl, "total") - flops_total).abs() <= 1e-9 * flops_total);
        assert_eq!(row["text_tokens"].as_u64(), Some(work.text_tokens as u64));
        assert_eq!(row["sequence"].as_u64(), Some(work.sequence as u64));
        let tflops = f(row, "achieved_tflops");
        assert!((tflops - flops_total / total / 1e12).abs() <= 1e-9 * tflops);
        assert!((f(row, "share_of_peak") - tflops / f(r, "peak_tflops")).abs() < 1e-12);
        assert!(f(row, "step_tflops") > 0.0);
    }
}

#[test]
fn synthetic_tiny_z_image_reports_every_field() {
    let tiny = common::tiny_dir();
    let r = bench(&[
        "--synthetic-config",
        tiny.to_str().unwrap(),
        "--size",
        "64x64",
        "--size",
        "96x64",
        "--batch",
        "1,2",
        "--steps",
        "2",
        "--runs",
        "2",
    ]);
    assert_eq!(r["weights"], "synthetic");
    assert_eq!(r["family"], "z-image");
    assert!(r["source"]
        .as_str()
        .unwrap()
        .contains("its configuration and tokenizer"));
    // The synthetic model has the tiny model's configuration, so the same FLOPs.
    check_report(&r, 4, 2, load_real(&tiny).as_ref());
}

#[test]
fn real_tiny_weights_through_the_catalog() {
    let tiny = common::tiny_dir();
    let weights = format!("z-image-turbo={}", tiny.display());
    let r = bench(&[
        "--model",
        "seedream-v4",
        "--weights",
        &weights,
        "--size",
        "64x64",
        "--steps",
        "2",
        "--runs",
        "1",
    ]);
    assert_eq!(r["weights"], "weights");
    assert_eq!(r["pipeline"], "z-image-turbo");
    check_report(&r, 1, 2, load_real(&tiny).as_ref());
}

#[test]
fn synthetic_tiny_flux2_reports_every_field() {
    let tiny = flux2_tiny();
    let r = bench(&[
        "--pipeline",
        "flux2-klein",
        "--synthetic-config",
        tiny.to_str().unwrap(),
        "--size",
        "64x64",
        "--batch",
        "1,2",
        "--steps",
        "2",
        "--runs",
        "1",
        "--peak-tflops",
        "1.5",
    ]);
    assert_eq!(r["family"], "flux2-klein");
    assert_eq!(r["peak_source"], "--peak-tflops");
    assert_eq!(f(&r, "peak_tflops"), 1.5);
    check_report(&r, 2, 2, load_real(&tiny).as_ref());
}

/// bf16 on the CPU runs end to end for both families (the VAE decodes in f32 there: candle's
/// CPU convolution has no bf16 product).
#[test]
fn bf16_on_the_cpu_decodes_for_both_families() {
    for (pipeline, dir) in [
        ("z-image-turbo", common::tiny_dir()),
        ("flux2-klein", flux2_tiny()),
    ] {
        let r = bench(&[
            "--pipeline",
            pipeline,
            "--synthetic-config",
            dir.to_str().unwrap(),
            "--dtype",
            "bf16",
            "--size",
            "64x64",
            "--steps",
            "1",
            "--runs",
            "1",
            "--warmup",
            "0",
        ]);
        assert_eq!(r["dtype"], "bf16", "{pipeline}");
        let row = &r["rows"][0];
        assert!(f(row, "vae_decode_s") > 0.0, "{pipeline}: {row}");
    }
}
