//! The families this build knows: the one place that names them all. Adding a family is a
//! directory under `pipeline/` plus one entry here.

use candle_core::DType;

use super::error::{load_err, Result};
use super::family::{Family, LoadOptions};
use super::flux2::Flux2Klein;
use super::load::ModelFiles;
use super::z_image::ZImage;

/// One model family: its catalog name, the diffusers pipeline class of its checkpoints, and
/// its loader.
pub struct FamilyEntry {
    /// The catalog's `family = "..."` spelling.
    pub name: &'static str,
    /// `model_index.json`'s `_class_name`.
    pub class_name: &'static str,
    load: fn(&ModelFiles, &LoadOptions) -> Result<Box<dyn Family>>,
}

fn load_z_image(files: &ModelFiles, opts: &LoadOptions) -> Result<Box<dyn Family>> {
    Ok(Box::new(ZImage::load_opts(files, opts)?))
}

fn load_flux2_klein(files: &ModelFiles, opts: &LoadOptions) -> Result<Box<dyn Family>> {
    Ok(Box::new(Flux2Klein::load(files, opts)?))
}

/// Every family of this build.
pub const FAMILIES: &[FamilyEntry] = &[
    FamilyEntry {
        name: "z-image",
        class_name: "ZImagePipeline",
        load: load_z_image,
    },
    FamilyEntry {
        name: "flux2-klein",
        class_name: "Flux2KleinPipeline",
        load: load_flux2_klein,
    },
];

/// The family names, comma-separated, for messages.
pub fn family_names() -> String {
    FAMILIES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A family by its catalog name.
pub fn family(name: &str) -> Result<&'static FamilyEntry> {
    FAMILIES.iter().find(|f| f.name == name).ok_or_else(|| {
        load_err(format!(
            "unknown model family '{name}': supported: {}",
            family_names()
        ))
    })
}

/// The family of a checkout, from `model_index.json`'s `_class_name`.
pub fn detect(files: &ModelFiles) -> Result<&'static FamilyEntry> {
    let index: serde_json::Value = files.json("model_index.json")?;
    let class = index
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    FAMILIES
        .iter()
        .find(|f| f.class_name == class)
        .ok_or_else(|| {
            let known: Vec<String> = FAMILIES
                .iter()
                .map(|f| format!("{} ({})", f.class_name, f.name))
                .collect();
            load_err(format!(
                "{}: model_index.json names pipeline class '{class}', which this build does not \
                 support; supported: {}",
                files.source(),
                known.join(", ")
            ))
        })
}

/// Load a checkout as `family` (or the family its `model_index.json` names).
pub fn load(
    files: &ModelFiles,
    family: Option<&str>,
    opts: &LoadOptions,
) -> Result<Box<dyn Family>> {
    let entry = match family {
        Some(name) => self::family(name)?,
        None => detect(files)?,
    };
    (entry.load)(files, opts)
}

/// The components of a checkout that hold weights on the device when loaded with `opts`
/// (`(component, file stem)`), from `model_index.json`: tokenizers and schedulers hold none,
/// and an offloaded text encoder lives in host memory.
fn device_components(
    files: &ModelFiles,
    opts: &LoadOptions,
) -> Result<Vec<(String, &'static str)>> {
    let index: serde_json::Map<String, serde_json::Value> = files.json("model_index.json")?;
    let on_device = |component: &str| {
        !(opts.offload_text_encoder && component.starts_with("text_encoder"))
            || opts.device.is_cpu()
    };
    let mut out = Vec::new();
    for (component, class) in &index {
        // Components are `"name": [library, class]`.
        let class = class
            .as_array()
            .and_then(|a| a.get(1))
            .and_then(|c| c.as_str())
            .unwrap_or("");
        if component.starts_with('_')
            || class.is_empty()
            || class.contains("Tokenizer")
            || class.contains("Scheduler")
            || !on_device(component)
        {
            continue;
        }
        let stem = if component.starts_with("text_encoder") {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        out.push((component.clone(), stem));
    }
    Ok(out)
}

/// Bytes the weights of a checkout will take on the device when loaded with `opts`, from the
/// safetensors headers of every component `model_index.json` lists (the text encoder counts
/// nothing when it is offloaded to host memory). Nothing is loaded.
pub fn estimate_weight_bytes(files: &ModelFiles, opts: &LoadOptions) -> Result<u64> {
    let mut total = 0;
    for (component, stem) in device_components(files, opts)? {
        total += super::quant::estimate_bytes(files, opts, &component, stem, opts.dtype)?;
    }
    Ok(total)
}

/// Bytes of [`estimate_weight_bytes`] that the device already holds for other pipelines
/// (`opts.share`): full-precision tensors of byte-identical files, which a load reuses.
pub fn estimate_shared_bytes(files: &ModelFiles, opts: &LoadOptions) -> Result<u64> {
    if opts
        .share
        .as_ref()
        .is_none_or(|s| s.weights.total_bytes() == 0)
    {
        return Ok(0);
    }
    let mut total = 0;
    for (component, stem) in device_components(files, opts)? {
        // Read as it is stored (no GGUF file, no quantization), and shareable.
        let dense =
            !opts.components.contains_key(&component) && !opts.quantize.contains_key(&component);
        if let Some(share) = opts.share_for(&component, &opts.device).filter(|_| dense) {
            let tensors = files.tensor_files(&component, stem)?;
            total += share
                .weights
                .cached_bytes(&tensors, opts.dtype, &opts.device);
        }
    }
    Ok(total)
}

/// The settings under which a checkout's weights would fit `budget` bytes, for the error that
/// says they do not.
pub fn what_fits(files: &ModelFiles, opts: &LoadOptions, budget: u64) -> String {
    let mut tries: Vec<(&str, LoadOptions)> = Vec::new();
    let mut half = opts.clone();
    half.dtype = DType::BF16;
    let mut offload = opts.clone();
    offload.offload_text_encoder = true;
    let mut both = half.clone();
    both.offload_text_encoder = true;
    if opts.dtype == DType::F32 {
        tries.push(("--dtype bf16", half));
    }
    if !opts.offload_text_encoder && !opts.device.is_cpu() {
        tries.push(("--offload-text-encoder", offload));
        if opts.dtype == DType::F32 {
            tries.push(("--dtype bf16 --offload-text-encoder", both));
        }
    }
    for (flag, ty) in [("--quantize q8_0", "q8_0"), ("--quantize q4_k", "q4_k")] {
        if opts.quantize.is_empty() && opts.components.is_empty() {
            let mut q = half_or_same(opts);
            if let Ok(t) = ty.parse::<super::quant::QuantType>() {
                q.quantize.insert("transformer".into(), t);
                q.quantize.insert("text_encoder".into(), t);
                tries.push((flag, q));
            }
        }
    }
    let fits: Vec<String> = tries
        .into_iter()
        .filter_map(|(flag, o)| {
            let bytes = estimate_weight_bytes(files, &o).ok()?;
            (bytes <= budget).then(|| format!("{flag} ({})", human_bytes(bytes)))
        })
        .collect();
    if fits.is_empty() {
        "a quantized variant of the pipeline, or a device with more memory".into()
    } else {
        fits.join(", ")
    }
}

/// `opts` in bf16 on a GPU (quantized runs there keep bf16 activations), as they are on a CPU.
fn half_or_same(opts: &LoadOptions) -> LoadOptions {
    let mut o = opts.clone();
    if !opts.device.is_cpu() {
        o.dtype = DType::BF16;
    }
    o
}

/// Bytes for people: `12.3 GiB`, `512.0 MiB`, `80.5 KiB`, `12 B`.
pub fn human_bytes(bytes: u64) -> String {
    if bytes == u64::MAX {
        return "unlimited".into();
    }
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if unit == "B" {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_family_names_the_supported_ones() {
        let Err(e) = family("sd3") else {
            panic!("sd3 is not a family of this build");
        };
        let msg = e.to_string();
        assert!(msg.contains("sd3") && msg.contains("z-image"), "{msg}");
    }
}
