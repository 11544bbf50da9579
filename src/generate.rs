//! `diffusiond generate`: one prompt to image files, without a server.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::GenerateArgs;
use crate::pipeline::{self, GenerateSpec, Guidance, RgbImage};

/// The pipelines `generate` knows, with their default weights and sampling defaults.
struct KnownPipeline {
    name: &'static str,
    weights: &'static str,
    steps: u32,
    guidance: f32,
}

const KNOWN: &[KnownPipeline] = &[KnownPipeline {
    name: "z-image-turbo",
    weights: "hf:Tongyi-MAI/Z-Image-Turbo",
    steps: 8,
    guidance: 0.0,
}];

/// Output formats by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Webp,
}

fn format_of(path: &Path) -> Result<Format> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    Ok(match ext.as_str() {
        "png" => Format::Png,
        "jpg" | "jpeg" => Format::Jpeg,
        "webp" => Format::Webp,
        _ => bail!(
            "cannot tell the image format of {}: use a .png, .jpg or .webp file name",
            path.display()
        ),
    })
}

/// `out.png` for one image; `out_0.png`, `out_1.png`, ... for several.
fn output_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}_{i}{ext}")))
        .collect()
}

fn write_image(img: &RgbImage, path: &Path, format: Format) -> Result<()> {
    let buf = image::RgbImage::from_raw(img.width, img.height, img.data.clone())
        .context("image buffer has the wrong size")?;
    match format {
        Format::Png => buf.save_with_format(path, image::ImageFormat::Png),
        Format::Webp => buf.save_with_format(path, image::ImageFormat::WebP),
        Format::Jpeg => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(
                std::io::BufWriter::new(file),
                95,
            );
            enc.encode_image(&buf)
        }
    }
    .with_context(|| format!("cannot write {}", path.display()))
}

/// The weights source for `model`: `--weights model=SOURCE` or the pipeline's default.
fn weights_for(model: &str, weights: &[String], default: &str) -> Result<String> {
    for w in weights {
        let Some((name, src)) = w.split_once('=') else {
            bail!("bad --weights '{w}': expected PIPELINE=SOURCE");
        };
        if name.trim() == model {
            return Ok(src.trim().to_string());
        }
    }
    Ok(default.to_string())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let Some(known) = KNOWN.iter().find(|k| k.name == args.model) else {
        let names: Vec<_> = KNOWN.iter().map(|k| k.name).collect();
        bail!(
            "unknown model '{}': available: {}",
            args.model,
            names.join(", ")
        );
    };
    if args.prompt.trim().is_empty() {
        bail!("--prompt must not be empty");
    }
    if args.width == 0
        || args.height == 0
        || !args.width.is_multiple_of(16)
        || !args.height.is_multiple_of(16)
    {
        bail!(
            "--width and --height must be positive multiples of 16 (got {}x{})",
            args.width,
            args.height
        );
    }
    if !(1..=64).contains(&args.num_images) {
        bail!("--num-images must be between 1 and 64");
    }
    let steps = args.steps.unwrap_or(known.steps);
    if steps == 0 || steps > 1000 {
        bail!("--steps must be between 1 and 1000");
    }
    let guidance = args.guidance_scale.unwrap_or(known.guidance);
    if !guidance.is_finite() || guidance < 0.0 {
        bail!("--guidance-scale must be a finite number >= 0");
    }
    let format = format_of(&args.out)?;
    let source = weights_for(&args.model, &args.weights, known.weights)?;
    let seed = args.seed.unwrap_or_else(rand::random);

    let opts = pipeline::RunOptions {
        device: args.device.device.clone(),
        dtype: args.device.dtype.clone(),
        offload_text_encoder: args.device.offload_text_encoder,
    };
    let model = pipeline::load_z_image_with(&source, &opts)
        .with_context(|| format!("cannot load {} from {source}", args.model))?;
    let spec = GenerateSpec {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width as usize,
        height: args.height as usize,
        seeds: (0..args.num_images as u64)
            .map(|i| seed.wrapping_add(i))
            .collect(),
        steps: steps as usize,
        guidance: Guidance {
            scale: guidance,
            ..Guidance::none()
        },
    };
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("denoising");
    let images = model.generate(&spec, |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    for ((img, path), seed) in images
        .iter()
        .zip(output_paths(&args.out, images.len()))
        .zip(&spec.seeds)
    {
        write_image(img, &path, format)?;
        println!("{} (seed {seed})", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_outputs() {
        assert_eq!(
            output_paths(Path::new("a/b.png"), 1),
            vec![PathBuf::from("a/b.png")]
        );
        assert_eq!(
            output_paths(Path::new("a/b.png"), 2),
            vec![PathBuf::from("a/b_0.png"), PathBuf::from("a/b_1.png")]
        );
    }

    #[test]
    fn formats_from_extension() {
        assert_eq!(format_of(Path::new("x.JPG")).ok(), Some(Format::Jpeg));
        assert!(format_of(Path::new("x.gif")).is_err());
    }
}
