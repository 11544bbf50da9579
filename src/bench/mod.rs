//! `diffusiond bench`: seconds per image, images per minute, peak memory and achieved TFLOP/s of a
//! pipeline on this machine, per size and batch, with real weights or with random weights of the
//! real configuration (`--synthetic`). The stages are timed in `pipeline::bench` through the same
//! step loop the server runs; the FLOPs come from the loaded configuration (`pipeline::flops`).

pub mod args;
pub mod memory;
pub mod peak;
pub mod report;

use std::time::Instant;

use anyhow::{bail, Context, Result};

pub use self::args::BenchArgs;
use self::args::Switch;
use self::report::{median, Flops, Report, Row};
use crate::app::{load_catalog, pipeline_configs};
use crate::catalog::Pipeline;
use crate::pipeline::synthetic::SyntheticCheckout;
use crate::pipeline::{self, bench as stages, denoise, DeviceSpec, Family, GenerateSpec};
use crate::pipeline::{Guidance, RunOptions, WeightSource};

/// The catalog pipeline `--pipeline` or `--model` names (default: the first the catalog uses).
fn pick_pipeline(args: &BenchArgs) -> Result<Pipeline> {
    let catalog = load_catalog(args.catalog.as_deref())?;
    let pipelines = pipeline_configs(&catalog, &args.weights)?;
    let name = match (&args.pipeline, &args.model) {
        (Some(p), _) => p.clone(),
        (None, Some(id)) => match catalog.model(id) {
            Some(m) => m.pipeline.clone(),
            None => bail!("unknown model ID '{id}': model IDs: {}", catalog.ids()),
        },
        (None, None) => match pipelines.first() {
            Some(p) => p.name.clone(),
            None => bail!("the catalog uses no pipeline"),
        },
    };
    pipelines
        .iter()
        .find(|p| p.name == name)
        .cloned()
        .with_context(|| {
            let known: Vec<&str> = pipelines.iter().map(|p| p.name.as_str()).collect();
            format!("unknown pipeline '{name}': pipelines: {}", known.join(", "))
        })
}

/// Where peak memory is read from for a device.
#[derive(Clone, Copy)]
enum MemoryProbe {
    Rss,
    Gpu(usize),
    None,
}

impl MemoryProbe {
    fn kind(&self) -> &'static str {
        match self {
            Self::Rss => "rss",
            Self::Gpu(_) => "device",
            Self::None => "none",
        }
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.runs == 0 || args.batch.contains(&0) {
        bail!("--runs and every --batch must be at least 1");
    }
    crate::pipeline::attention::set_flash_attention(args.flash_attn == Switch::On);
    let p = pick_pipeline(&args)?;
    let run_opts = RunOptions {
        device: args.device,
        dtype: args.dtype,
        offload_text_encoder: args.offload_text_encoder,
        quantize: args
            .quantize
            .iter()
            .flat_map(|q| q.components.iter().map(move |c| (c.clone(), q.ty)))
            .collect(),
    };
    let mut opts = run_opts.open()?;
    opts.max_sequence_length = p.max_sequence_length;
    let synthetic = args.synthetic || args.synthetic_config.is_some();
    if synthetic && !args.quantize.is_empty() {
        bail!(
            "--quantize quantizes stored weights as they load; synthetic weights are made in the \
             run dtype: measure a quantized pipeline with its real weights (--model/--pipeline)"
        );
    }

    let t = Instant::now();
    let (model, source, family): (Box<dyn Family>, String, String) = if synthetic {
        let checkout =
            SyntheticCheckout::new(p.family.as_deref(), args.synthetic_config.as_deref())?;
        let model = checkout
            .load(&opts)
            .with_context(|| format!("cannot make synthetic {}", checkout.origin))?;
        (model, checkout.origin.clone(), checkout.family.to_string())
    } else {
        let src: WeightSource = p.weights.parse()?;
        let model = pipeline::load(&src, p.family.as_deref(), &opts)
            .with_context(|| format!("cannot load {} from {}", p.name, p.weights))?;
        let family = model.info().family.to_string();
        (model, p.weights.clone(), family)
    };
    let load_s = t.elapsed().as_secs_f64();
    let model = model.as_ref();

    let device = stages::device_label(model);
    let dtype = stages::dtype_label(model);
    let cpu_model = memory::cpu_model();
    let (device_name, probe) = match args.device {
        _ if device == "cpu" => (cpu_model.clone(), MemoryProbe::Rss),
        DeviceSpec::Cuda(n) => (
            memory::gpu_name(n).unwrap_or_else(|| "unknown CUDA device".into()),
            MemoryProbe::Gpu(n),
        ),
        _ if device.starts_with("cuda") => (
            memory::gpu_name(0).unwrap_or_else(|| "unknown CUDA device".into()),
            MemoryProbe::Gpu(0),
        ),
        // Apple silicon: the GPU is the SoC's; memory is shared and not told apart.
        _ => (cpu_model.clone(), MemoryProbe::None),
    };
    let (peak_tflops, peak_source) = match args.peak_tflops {
        Some(p) => (p, "--peak-tflops".to_string()),
        None => match peak::known_peak(&device_name, &dtype) {
            Some((v, entry)) => (v, format!("datasheet, {entry}, {dtype} dense")),
            None => {
                let v = stages::measure_matmul_tflops(model.device(), model.dtype(), 1024, 5)?;
                (
                    v,
                    format!("measured: best {dtype} 1024x1024x1024 matmul on this device"),
                )
            }
        },
    };

    let steps = args.steps.unwrap_or(p.steps as usize);
    let guidance = Guidance {
        scale: p.guidance_scale,
        ..Guidance::none()
    };
    let cfg = model.info().cfg_active(guidance.scale);
    let evals = if cfg { 2 } else { 1 };
    let mut rows = Vec::new();
    for size in &args.sizes {
        model.check_size(size.width, size.height)?;
        let work = model.work(&args.prompt, size.width, size.height)?;
        for &batch in &args.batch {
            let spec = GenerateSpec {
                prompt: args.prompt.clone(),
                negative_prompt: String::new(),
                width: size.width,
                height: size.height,
                seeds: (0..batch as u64).collect(),
                steps,
                guidance,
            };
            denoise::check_spec(model, &spec)?;
            eprintln!("bench: {size} batch {batch} ...");
            let mut sampler = None;
            let times = stages::measure(model, &spec, args.warmup, args.runs, || match probe {
                MemoryProbe::Rss => {
                    memory::reset_peak_rss();
                }
                MemoryProbe::Gpu(n) => sampler = memory::GpuSampler::start(n),
                MemoryProbe::None => {}
            })?;
            let peak_memory_bytes = match probe {
                MemoryProbe::Rss => memory::peak_rss(),
                MemoryProbe::Gpu(_) => sampler.and_then(memory::GpuSampler::stop),
                MemoryProbe::None => None,
            };
            let (encode, step, decode) = (
                median(&times.encode),
                median(&times.step),
                median(&times.decode),
            );
            let total_s = encode + steps as f64 * step + decode;
            let flops = Flops::of(&work, batch, steps, evals, evals);
            let s_per_image = total_s / batch as f64;
            let achieved = flops.total / total_s / 1e12;
            rows.push(Row {
                width: size.width,
                height: size.height,
                batch,
                text_encode_s: encode,
                step_s: step,
                step_queued_s: median(&times.step_queued),
                vae_decode_s: decode,
                total_s,
                s_per_image,
                images_per_min: 60.0 / s_per_image,
                peak_memory_bytes,
                vae_tiled: stages::vae_tiled(size.width, size.height),
                text_tokens: work.text_tokens,
                sequence: work.sequence,
                flops,
                achieved_tflops: achieved,
                share_of_peak: achieved / peak_tflops,
                step_tflops: flops.step / step / 1e12,
            });
        }
    }
    let report = Report {
        pipeline: p.name.clone(),
        family,
        weights: if synthetic { "synthetic" } else { "weights" }.into(),
        source,
        device,
        device_name,
        cpu_model,
        dtype,
        flash_attn: crate::pipeline::attention::flash_attention_on(),
        steps,
        runs: args.runs,
        warmup: args.warmup,
        prompt: args.prompt.clone(),
        cfg,
        load_s,
        weight_bytes: model.weight_bytes(),
        peak_tflops,
        peak_source,
        memory_kind: probe.kind().into(),
        rows,
    };
    write_out(&args, &report)
}

fn write_out(args: &BenchArgs, report: &Report) -> Result<()> {
    let table = report::table(report);
    let json = serde_json::to_string_pretty(report)?;
    match args.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => {
            eprint!("{table}");
            println!("{json}");
        }
        Some(p) => {
            print!("{table}");
            std::fs::write(p, json + "\n")
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        None => print!("{table}"),
    }
    Ok(())
}
