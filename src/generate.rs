//! `diffusiond generate`: one prompt to image files, without a server.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::app::{load_catalog, pipeline_configs};
use crate::catalog::Catalog;
use crate::cli::GenerateArgs;
use crate::infer::{validate, RawRequest};
use crate::pipeline::{self, denoise, RgbImage, WeightSource};
use crate::store::{encode, ImageFormat};

fn format_of(path: &Path) -> Result<ImageFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    ImageFormat::parse(&ext).with_context(|| {
        format!(
            "cannot tell the image format of {}: use a .png, .jpg or .webp file name",
            path.display()
        )
    })
}

/// The hosted model ID a `--model` names: an ID of the catalog, or a pipeline name (then the
/// first model it serves, whose limits apply).
fn model_id(catalog: &Catalog, name: &str) -> Result<String> {
    if catalog.model(name).is_some() {
        return Ok(name.to_string());
    }
    if let Some(m) = catalog.models().iter().find(|m| m.pipeline == name) {
        return Ok(m.id.clone());
    }
    let pipelines: Vec<&str> = catalog
        .used_pipelines()
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    bail!(
        "unknown model '{name}': model IDs: {}; pipelines: {}",
        catalog.ids(),
        pipelines.join(", ")
    )
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

fn write_image(img: &RgbImage, path: &Path, format: ImageFormat) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    encode(img, format, &mut out).with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::flush(&mut out).with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let catalog = load_catalog(args.catalog.as_deref())?;
    // The same overrides check as `serve`: a --weights for a pipeline no model uses is an error.
    let pipelines = pipeline_configs(&catalog, &args.weights)?;
    let format = format_of(&args.out)?;
    let id = model_id(&catalog, &args.model)?;
    let valid = validate(
        &catalog,
        RawRequest {
            prompt: Some(args.prompt.clone()),
            model: Some(id),
            width: args.width.map(i128::from),
            height: args.height.map(i128::from),
            num_images: Some(i128::from(args.num_images)),
            seed: Some(i128::from(args.seed.unwrap_or_else(rand::random))),
            steps: args.steps.map(i128::from),
            guidance_scale: args.guidance_scale.map(f64::from),
            negative_prompt: Some(args.negative_prompt.clone()),
            ..RawRequest::default()
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let job = valid.job;
    let Some(p) = pipelines.iter().find(|p| p.name == job.pipeline) else {
        bail!("pipeline '{}' has no weights configured", job.pipeline);
    };
    let source: WeightSource = p.weights.parse()?;
    if args.device.device.len() > 1 {
        bail!("generate runs on one device; several (--device a,b) are for serve");
    }
    let mut opts = args
        .device
        .run_options()
        .open()?
        .for_pipeline(&p.components, p.quantize.as_deref())?;
    opts.max_sequence_length = p.max_sequence_length;
    let model = pipeline::load(&source, p.family.as_deref(), &opts)
        .with_context(|| format!("cannot load {} from {}", p.name, p.weights))?;
    let spec = job.spec;
    let bar = ProgressBar::new(spec.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("denoising");
    let images = denoise::generate(model.as_ref(), &spec, |done, _| {
        bar.set_position(done as u64)
    })?;
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
        assert_eq!(format_of(Path::new("x.JPG")).ok(), Some(ImageFormat::Jpeg));
        assert_eq!(format_of(Path::new("x.jpeg")).ok(), Some(ImageFormat::Jpeg));
        assert!(format_of(Path::new("x.gif")).is_err());
    }
}
