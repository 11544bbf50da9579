//! The catalog file's TOML shape and its checks; every error names the line it is about.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::{Catalog, CatalogError, Model, Pipeline, Pricing, SizeRule, Tiered};

/// Denoising steps a pipeline default or a quality may ask for.
pub const STEPS_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
/// Prompt lengths (tokens after the chat template) a pipeline may be configured with.
pub const MAX_SEQUENCE_LENGTH_RANGE: std::ops::RangeInclusive<usize> = 1..=4096;
/// Classifier-free guidance scales allowed.
pub const GUIDANCE_RANGE: std::ops::RangeInclusive<f32> = 0.0..=20.0;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    pipelines: BTreeMap<String, Spanned<PipelineSpec>>,
    #[serde(default)]
    models: Vec<Spanned<ModelSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineSpec {
    weights: String,
    /// A GGUF file for the transformer / text encoder instead of the checkout's.
    transformer: Option<String>,
    text_encoder: Option<String>,
    /// Quantize the full-precision transformer and text encoder at load.
    quantize: Option<String>,
    family: Option<String>,
    max_sequence_length: Option<usize>,
    steps: u32,
    guidance_scale: f32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSpec {
    id: String,
    pipeline: String,
    min_size: u32,
    max_size: u32,
    size_step: u32,
    price: Option<i64>,
    default_size: Option<u32>,
    prices: Option<BTreeMap<String, BTreeMap<String, i64>>>,
    resolutions: Option<BTreeMap<String, u32>>,
    default_resolution: Option<String>,
    default_quality: Option<String>,
    #[serde(default)]
    quality_steps: BTreeMap<String, u32>,
}

/// Parse and check a catalog. `name` (a file name, or "built-in catalog") prefixes every error.
pub fn parse(name: &str, text: &str) -> Result<Catalog, CatalogError> {
    let at = |offset: usize, message: String| CatalogError {
        source_name: name.to_string(),
        line: Some(line_of(text, offset)),
        message,
    };
    let file: CatalogFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        CatalogError {
            source_name: name.to_string(),
            line,
            message: e.message().trim().to_string(),
        }
    })?;

    let mut pipelines = BTreeMap::new();
    for (pname, spec) in &file.pipelines {
        let start = spec.span().start;
        let spec = spec.get_ref();
        if !STEPS_RANGE.contains(&spec.steps) {
            return Err(at(
                start,
                format!(
                    "pipeline '{pname}': steps must be {} to {}",
                    STEPS_RANGE.start(),
                    STEPS_RANGE.end()
                ),
            ));
        }
        if !spec.guidance_scale.is_finite() || !GUIDANCE_RANGE.contains(&spec.guidance_scale) {
            return Err(at(
                start,
                format!(
                    "pipeline '{pname}': guidance_scale must be {} to {}",
                    GUIDANCE_RANGE.start(),
                    GUIDANCE_RANGE.end()
                ),
            ));
        }
        if spec.weights.trim().is_empty() {
            return Err(at(start, format!("pipeline '{pname}': weights is empty")));
        }
        if let Some(f) = &spec.family {
            if crate::pipeline::registry::family(f).is_err() {
                return Err(at(
                    start,
                    format!(
                        "pipeline '{pname}': unknown family '{f}' (supported: {})",
                        crate::pipeline::registry::family_names()
                    ),
                ));
            }
        }
        if let Some(n) = spec.max_sequence_length {
            if !MAX_SEQUENCE_LENGTH_RANGE.contains(&n) {
                return Err(at(
                    start,
                    format!(
                        "pipeline '{pname}': max_sequence_length must be {} to {}",
                        MAX_SEQUENCE_LENGTH_RANGE.start(),
                        MAX_SEQUENCE_LENGTH_RANGE.end()
                    ),
                ));
            }
        }
        let mut components = BTreeMap::new();
        for (component, src) in [
            ("transformer", &spec.transformer),
            ("text_encoder", &spec.text_encoder),
        ] {
            if let Some(src) = src {
                if let Err(e) = src.parse::<crate::pipeline::ComponentSource>() {
                    return Err(at(start, format!("pipeline '{pname}': {component}: {e}")));
                }
                components.insert(component.to_string(), src.clone());
            }
        }
        if let Some(q) = &spec.quantize {
            if let Err(e) = q.parse::<crate::pipeline::QuantType>() {
                return Err(at(start, format!("pipeline '{pname}': {e}")));
            }
        }
        pipelines.insert(
            pname.clone(),
            Pipeline {
                name: pname.clone(),
                weights: spec.weights.clone(),
                components,
                quantize: spec.quantize.clone(),
                family: spec.family.clone(),
                max_sequence_length: spec.max_sequence_length,
                steps: spec.steps,
                guidance_scale: spec.guidance_scale,
            },
        );
    }

    let mut models: Vec<Model> = Vec::new();
    for spec in &file.models {
        let start = spec.span().start;
        let spec = spec.get_ref();
        let model = check_model(spec, &pipelines).map_err(|m| at(start, m))?;
        if models.iter().any(|m| m.id == model.id) {
            return Err(at(start, format!("model '{}' is listed twice", model.id)));
        }
        models.push(model);
    }
    if models.is_empty() {
        return Err(CatalogError {
            source_name: name.to_string(),
            line: None,
            message: "no [[models]] entry".into(),
        });
    }
    Ok(Catalog { pipelines, models })
}

fn check_model(spec: &ModelSpec, pipelines: &BTreeMap<String, Pipeline>) -> Result<Model, String> {
    let id = &spec.id;
    if id.is_empty() {
        return Err("a model has an empty id".into());
    }
    let Some(pipeline) = pipelines.get(&spec.pipeline) else {
        return Err(format!(
            "model '{id}': pipeline '{}' has no [pipelines.{}] section",
            spec.pipeline, spec.pipeline
        ));
    };
    if spec.size_step == 0 || spec.min_size == 0 || spec.min_size > spec.max_size {
        return Err(format!(
            "model '{id}': need 0 < min_size <= max_size and size_step > 0"
        ));
    }
    let mut sizes = SizeRule {
        min: spec.min_size,
        max: spec.max_size,
        step: spec.size_step,
        default: 0,
    };
    let pricing = match (spec.price, &spec.prices) {
        (Some(price), None) => {
            if price < 0 {
                return Err(format!("model '{id}': price must not be negative"));
            }
            let Some(default) = spec.default_size else {
                return Err(format!(
                    "model '{id}': a flat-priced model needs default_size"
                ));
            };
            sizes.default = default;
            if spec.resolutions.is_some()
                || spec.default_resolution.is_some()
                || spec.default_quality.is_some()
                || !spec.quality_steps.is_empty()
            {
                return Err(format!(
                    "model '{id}': resolutions/qualities go with `prices`, not `price`"
                ));
            }
            Pricing::Flat(price)
        }
        (None, Some(prices)) => {
            let tiered = check_tiered(id, spec, prices)?;
            sizes.default = tiered.size_of(&tiered.default_resolution).unwrap_or(0);
            Pricing::Tiered(tiered)
        }
        _ => {
            return Err(format!(
                "model '{id}': give exactly one of `price` and `prices`"
            ))
        }
    };
    if !sizes.allows(sizes.default) {
        return Err(format!(
            "model '{id}': default size {} is outside its own allowed sizes",
            sizes.default
        ));
    }
    if let Pricing::Tiered(t) = &pricing {
        if let Some((r, s)) = t.resolutions.iter().find(|(_, s)| !sizes.allows(*s)) {
            return Err(format!(
                "model '{id}': resolution '{r}' ({s}) is outside its allowed sizes"
            ));
        }
    }
    Ok(Model {
        id: id.clone(),
        pipeline: pipeline.name.clone(),
        sizes,
        pricing,
    })
}

fn check_tiered(
    id: &str,
    spec: &ModelSpec,
    prices: &BTreeMap<String, BTreeMap<String, i64>>,
) -> Result<Tiered, String> {
    if spec.default_size.is_some() {
        return Err(format!(
            "model '{id}': with `prices`, the default size comes from `resolutions`"
        ));
    }
    let Some(resolutions) = &spec.resolutions else {
        return Err(format!(
            "model '{id}': `prices` needs a `resolutions` table"
        ));
    };
    let mut qualities: Option<Vec<String>> = None;
    for (res, by_quality) in prices {
        if !resolutions.contains_key(res) {
            return Err(format!(
                "model '{id}': prices for resolution '{res}' that is not in `resolutions`"
            ));
        }
        if by_quality.values().any(|p| *p < 0) {
            return Err(format!("model '{id}': a price is negative"));
        }
        let names: Vec<String> = by_quality.keys().cloned().collect();
        match &qualities {
            Some(q) if *q != names => {
                return Err(format!(
                    "model '{id}': every resolution needs the same qualities"
                ))
            }
            _ => qualities = Some(names),
        }
    }
    let qualities = qualities.unwrap_or_default();
    if resolutions.keys().any(|r| !prices.contains_key(r)) || qualities.is_empty() {
        return Err(format!(
            "model '{id}': every resolution needs a price per quality"
        ));
    }
    let default_resolution = spec.default_resolution.clone().unwrap_or_default();
    if !resolutions.contains_key(&default_resolution) {
        return Err(format!(
            "model '{id}': default_resolution must be one of the resolutions"
        ));
    }
    let default_quality = spec.default_quality.clone().unwrap_or_default();
    if !qualities.contains(&default_quality) {
        return Err(format!(
            "model '{id}': default_quality must be one of the qualities"
        ));
    }
    for (q, steps) in &spec.quality_steps {
        if !qualities.contains(q) {
            return Err(format!(
                "model '{id}': quality_steps names unknown quality '{q}'"
            ));
        }
        if !STEPS_RANGE.contains(steps) {
            return Err(format!(
                "model '{id}': quality_steps.{q} must be {} to {}",
                STEPS_RANGE.start(),
                STEPS_RANGE.end()
            ));
        }
    }
    let mut resolutions: Vec<(String, u32)> =
        resolutions.iter().map(|(k, v)| (k.clone(), *v)).collect();
    resolutions.sort_by_key(|(_, size)| *size);
    Ok(Tiered {
        resolutions,
        qualities: sort_qualities(qualities),
        prices: prices.clone(),
        default_resolution,
        default_quality,
        quality_steps: spec.quality_steps.clone(),
    })
}

/// low, medium, high first (in that order), then any other names alphabetically.
fn sort_qualities(mut q: Vec<String>) -> Vec<String> {
    let rank = |s: &str| match s {
        "low" => 0,
        "medium" => 1,
        "high" => 2,
        _ => 3,
    };
    q.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    q
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn syntax_error_names_the_line() {
        let text = "[pipelines.p]\nweights = \"x\"\nsteps = 8\nguidance_scale = = 0\n";
        let err = parse("c.toml", text).unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.to_string().contains("c.toml"), "{err}");
        assert!(err.to_string().contains("line 4"), "{err}");
    }

    #[test]
    fn unknown_field_names_the_line() {
        let text = "[pipelines.p]\nweights = \"x\"\nsteps = 8\nguidance_scale = 0.0\n\n[[models]]\nid = \"m\"\npipeline = \"p\"\nprise = 3\n";
        let err = parse("c.toml", text).unwrap_err();
        assert_eq!(err.line, Some(9), "{err}");
    }

    #[test]
    fn semantic_error_names_the_model_line() {
        let text = "[pipelines.p]\nweights = \"x\"\nsteps = 8\nguidance_scale = 0.0\n\n[[models]]\nid = \"m\"\npipeline = \"nope\"\nprice = 3\ndefault_size = 64\nmin_size = 64\nmax_size = 128\nsize_step = 16\n";
        let err = parse("c.toml", text).unwrap_err();
        assert!(err.to_string().contains("pipeline 'nope'"), "{err}");
        let line = err.line.unwrap();
        assert!((6..=8).contains(&line), "{err}");
    }

    #[test]
    fn qualities_are_ordered_low_medium_high() {
        let q = sort_qualities(vec!["high".into(), "low".into(), "medium".into()]);
        assert_eq!(q, ["low", "medium", "high"]);
    }
}
