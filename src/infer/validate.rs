//! Parse, don't validate: a request's raw fields become a [`ValidRequest`] once, with the model's
//! defaults, the price and one seed per image filled in. Nothing past this point sees raw input.

use crate::catalog::{Catalog, Model, Pricing, GUIDANCE_RANGE, STEPS_RANGE};
use crate::pipeline::{GenerateSpec, Guidance};
use crate::scheduler::Job;
use crate::store::{Encoding, ImageFormat};

use super::error::ValidationError;

/// Prompts longer than this (in Unicode scalar values) are refused.
pub const MAX_PROMPT_CHARS: usize = 4000;
/// Images per request.
pub const NUM_IMAGES_RANGE: std::ops::RangeInclusive<i128> = 1..=4;

/// The request's fields as sent, already of the right JSON types. Integers are wide so that an
/// out-of-range value is reported by the rule it breaks, not as a type error.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRequest {
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub width: Option<i128>,
    pub height: Option<i128>,
    pub num_images: Option<i128>,
    pub resolution: Option<String>,
    pub quality: Option<String>,
    pub seed: Option<i128>,
    pub steps: Option<i128>,
    pub guidance_scale: Option<f64>,
    pub negative_prompt: Option<String>,
    pub output_format: Option<String>,
    /// JPEG quality 0-100 (OpenAI's `output_compression`; the hosted route has no such field).
    pub output_compression: Option<i128>,
}

/// A request that passed every check, ready to charge and run.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    /// The hosted model ID asked for.
    pub model: String,
    /// What the scheduler runs; `job.seeds` has one seed per image.
    pub job: Job,
    pub encoding: Encoding,
    /// price per image x number of images.
    pub credits: i64,
}

/// Check a raw request against the catalog. The checks run in the order of the error table:
/// prompt, model, resolution/quality, dimensions, number of images, then the local extensions.
pub fn validate(catalog: &Catalog, raw: RawRequest) -> Result<ValidRequest, ValidationError> {
    let prompt = raw
        .prompt
        .filter(|p| !p.trim().is_empty())
        .ok_or(ValidationError::MissingPrompt)?;
    let chars = prompt.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(ValidationError::PromptTooLong(chars));
    }

    let model = match raw.model.as_deref().map(|id| (id, catalog.model(id))) {
        Some((_, Some(model))) => model,
        Some((id, None)) => {
            return Err(ValidationError::InvalidModel(format!(
                "model '{id}' is not served here; available: {}",
                catalog.ids()
            )))
        }
        None => {
            return Err(ValidationError::InvalidModel(format!(
                "model is required; available: {}",
                catalog.ids()
            )))
        }
    };
    let pipeline = catalog.pipeline(&model.pipeline).ok_or_else(|| {
        ValidationError::InvalidModel(format!("model '{}' has no pipeline", model.id))
    })?;

    let (resolution, quality) = (raw.resolution.as_deref(), raw.quality.as_deref());
    let tier = price_tier(model, resolution, quality, None)?;

    let width = dimension(model, "width", raw.width, tier.default_size)?;
    let height = dimension(model, "height", raw.height, tier.default_size)?;
    // A sent size must fit the tier it is priced at (or, without `resolution`, picks the tier).
    let tier = if raw.width.is_some() || raw.height.is_some() {
        price_tier(model, resolution, quality, Some((width, height)))?
    } else {
        tier
    };

    let n = raw.num_images.unwrap_or(1);
    if !NUM_IMAGES_RANGE.contains(&n) {
        return Err(ValidationError::InvalidNumImages(format!(
            "num_images is {n}; it must be {} to {}",
            NUM_IMAGES_RANGE.start(),
            NUM_IMAGES_RANGE.end()
        )));
    }
    let n = n as u32; // 1..=4

    let default_steps = tier.steps.unwrap_or(pipeline.steps);
    let steps = match raw.steps {
        None => default_steps,
        Some(s) => u32::try_from(s)
            .ok()
            .filter(|s| STEPS_RANGE.contains(s))
            .ok_or_else(|| {
                param(format!(
                    "steps is {s}; it must be {} to {}",
                    STEPS_RANGE.start(),
                    STEPS_RANGE.end()
                ))
            })?,
    };
    let guidance_scale = match raw.guidance_scale {
        None => pipeline.guidance_scale,
        Some(g) => Some(g as f32)
            .filter(|g| g.is_finite() && GUIDANCE_RANGE.contains(g))
            .ok_or_else(|| {
                param(format!(
                    "guidance_scale is {g}; it must be {} to {}",
                    GUIDANCE_RANGE.start(),
                    GUIDANCE_RANGE.end()
                ))
            })?,
    };
    let cfg = guidance_doubles_work(
        pipeline.guidance_scale,
        raw.guidance_scale.map(|_| guidance_scale),
    );
    let first_seed = match raw.seed {
        None => rand::random::<u64>(),
        Some(s) => {
            u64::try_from(s).map_err(|_| param(format!("seed is {s}; it must be 0 to 2^64-1")))?
        }
    };
    let format = match raw.output_format.as_deref() {
        None => ImageFormat::Jpeg,
        // The contract's names are lowercase: "JPEG" is not one of them.
        Some(name) => Some(name)
            .filter(|n| n.chars().all(|c| c.is_ascii_lowercase()))
            .and_then(ImageFormat::parse)
            .ok_or_else(|| {
                param(format!(
                    "output_format '{name}' is not one of: jpeg, png, webp"
                ))
            })?,
    };

    let quality = match raw.output_compression {
        None => None,
        Some(c) => Some(
            u8::try_from(c)
                .ok()
                .filter(|c| *c <= 100)
                .ok_or_else(|| param(format!("output_compression is {c}; it must be 0 to 100")))?
                .max(1),
        ),
    };

    Ok(ValidRequest {
        model: model.id.clone(),
        job: Job {
            pipeline: pipeline.name.clone(),
            spec: GenerateSpec {
                prompt,
                negative_prompt: raw.negative_prompt.unwrap_or_default(),
                width: width as usize,
                height: height as usize,
                seeds: (0..n)
                    .map(|i| first_seed.wrapping_add(u64::from(i)))
                    .collect(),
                steps: steps as usize,
                guidance: Guidance {
                    scale: guidance_scale,
                    ..Guidance::none()
                },
            },
        },
        encoding: Encoding { format, quality },
        credits: price_of_work(tier.price, steps, default_steps, cfg, n).ok_or_else(|| {
            param(format!(
                "the price of this request ({} credits an image x {steps}/{default_steps} steps{} \
                 x {n} images) is too large to charge",
                tier.price,
                if cfg { " x 2 for guidance" } else { "" }
            ))
        })?,
    })
}

/// Whether a request's `guidance_scale` turns on classifier-free guidance that the pipeline's
/// default does not run, i.e. twice the model evaluations per step: the default is 0 (no CFG)
/// and the request sends more. A pipeline whose default guidance is above 0 either runs CFG in
/// its price already or is guidance-distilled (guidance is an input, not a second evaluation),
/// so it is never charged extra.
pub fn guidance_doubles_work(pipeline_default: f32, sent: Option<f32>) -> bool {
    pipeline_default <= 0.0 && sent.is_some_and(|g| g > 0.0)
}

/// Credits for `n` images: the per-image price scaled by the work over the default, rounded up:
/// x steps/default_steps when more steps than the default are asked for, x 2 with CFG. A request
/// with neither pays exactly `price`. `None` when it does not fit an i64.
pub fn price_of_work(price: i64, steps: u32, default_steps: u32, cfg: bool, n: u32) -> Option<i64> {
    let mut per_image = price;
    if steps > default_steps && default_steps > 0 {
        let scaled = per_image.checked_mul(i64::from(steps))?;
        let d = i64::from(default_steps);
        per_image = scaled.checked_add(d - 1)? / d;
    }
    if cfg {
        per_image = per_image.checked_mul(2)?;
    }
    per_image.checked_mul(i64::from(n))
}

fn param(message: String) -> ValidationError {
    ValidationError::InvalidParameter(message)
}

/// Price, default size and steps that follow from the model and (gpt-image-2) resolution x quality.
struct Tier {
    price: i64,
    default_size: u32,
    steps: Option<u32>,
}

/// `size`: the width and height sent, when any was; it must fit the requested resolution's
/// square, and without a requested resolution it picks the smallest one that covers it.
fn price_tier(
    model: &Model,
    resolution: Option<&str>,
    quality: Option<&str>,
    size: Option<(u32, u32)>,
) -> Result<Tier, ValidationError> {
    let t = match &model.pricing {
        // resolution and quality mean nothing to these models; like unknown fields they are ignored.
        Pricing::Flat(price) => {
            return Ok(Tier {
                price: *price,
                default_size: model.sizes.default,
                steps: None,
            })
        }
        Pricing::Tiered(t) => t,
    };
    let fits = size.and_then(|(w, h)| {
        t.resolutions
            .iter()
            .find(|(_, side)| w.max(h) <= *side)
            .map(|(r, _)| r.as_str())
    });
    let resolution = match (resolution, size) {
        (Some(r), _) => r,
        (None, Some(_)) => fits.unwrap_or(&t.default_resolution),
        (None, None) => &t.default_resolution,
    };
    let Some(side) = t.size_of(resolution) else {
        let names: Vec<&str> = t.resolutions.iter().map(|(r, _)| r.as_str()).collect();
        return Err(param(format!(
            "resolution '{resolution}' is not one of: {}",
            names.join(", ")
        )));
    };
    if let Some((w, h)) = size.filter(|(w, h)| *w.max(h) > side) {
        let hint = match fits {
            Some(r) => format!("resolution '{r}' fits it"),
            None => "no resolution covers it".to_string(),
        };
        return Err(ValidationError::InvalidDimensions(format!(
            "{w}x{h} is larger than resolution '{resolution}' ({side}x{side}) of {}: {hint}",
            model.id
        )));
    }
    let quality = quality.unwrap_or(&t.default_quality);
    let Some(price) = t.price(resolution, quality) else {
        return Err(param(format!(
            "quality '{quality}' is not one of: {}",
            t.qualities.join(", ")
        )));
    };
    Ok(Tier {
        price,
        default_size: side,
        steps: t.quality_steps.get(quality).copied(),
    })
}

fn dimension(
    model: &Model,
    name: &str,
    value: Option<i128>,
    default: u32,
) -> Result<u32, ValidationError> {
    let Some(v) = value else {
        return Ok(default);
    };
    let rule = model.sizes;
    u32::try_from(v)
        .ok()
        .filter(|v| rule.allows(*v))
        .ok_or_else(|| {
            ValidationError::InvalidDimensions(format!(
                "{name} {v} is not allowed for {}: it must be a multiple of {} from {} to {}",
                model.id, rule.step, rule.min, rule.max
            ))
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn catalog() -> Catalog {
        Catalog::builtin().unwrap()
    }

    fn req(model: &str) -> RawRequest {
        RawRequest {
            prompt: Some("a cat".into()),
            model: Some(model.into()),
            ..Default::default()
        }
    }

    fn err(raw: RawRequest) -> ValidationError {
        validate(&catalog(), raw).unwrap_err()
    }

    #[test]
    fn defaults_are_filled() {
        let v = validate(&catalog(), req("flux-2-pro")).unwrap();
        assert_eq!(v.credits, 250);
        assert_eq!((v.job.spec.width, v.job.spec.height), (1024, 1024));
        assert_eq!(v.job.spec.seeds.len(), 1);
        assert_eq!(
            v.job.spec.steps, 4,
            "FLUX.2 [klein] serves flux-2-pro at its 4 steps"
        );
        assert_eq!(v.job.spec.guidance.scale, 1.0);
        assert_eq!(v.job.pipeline, "flux2-klein");
        assert_eq!(v.job.spec.negative_prompt, "");
        let z = validate(&catalog(), req("z-image-turbo")).unwrap();
        assert_eq!(
            (z.job.pipeline.as_str(), z.job.spec.steps),
            ("z-image-turbo", 8)
        );
        assert_eq!(v.encoding.format, ImageFormat::Jpeg);
    }

    #[test]
    fn seeds_follow_the_first_and_wrap() {
        let mut r = req("z-image-turbo");
        r.seed = Some(i128::from(u64::MAX) - 1);
        r.num_images = Some(4);
        let v = validate(&catalog(), r).unwrap();
        assert_eq!(v.job.spec.seeds, [u64::MAX - 1, u64::MAX, 0, 1]);
        assert_eq!(v.credits, 400);
        let r = RawRequest {
            num_images: Some(3),
            ..req("z-image-turbo")
        };
        let seeds = validate(&catalog(), r).unwrap().job.spec.seeds;
        assert_eq!(seeds[1], seeds[0].wrapping_add(1));
        assert_eq!(seeds[2], seeds[0].wrapping_add(2));
    }

    #[test]
    fn prompt_rules() {
        assert_eq!(
            err(RawRequest {
                prompt: None,
                ..req("flux-2-pro")
            }),
            ValidationError::MissingPrompt
        );
        assert_eq!(
            err(RawRequest {
                prompt: Some(" \n\t".into()),
                ..req("flux-2-pro")
            }),
            ValidationError::MissingPrompt
        );
        let ok = RawRequest {
            prompt: Some("é".repeat(4000)),
            ..req("flux-2-pro")
        };
        assert!(validate(&catalog(), ok).is_ok());
        let long = RawRequest {
            prompt: Some("a".repeat(4001)),
            ..req("flux-2-pro")
        };
        assert_eq!(err(long), ValidationError::PromptTooLong(4001));
    }

    #[test]
    fn prompt_is_checked_before_model() {
        let r = RawRequest {
            prompt: None,
            model: Some("nope".into()),
            ..Default::default()
        };
        assert_eq!(err(r), ValidationError::MissingPrompt);
    }

    #[test]
    fn model_rules() {
        let e = err(req("foo"));
        assert!(
            matches!(&e, ValidationError::InvalidModel(m) if m.contains("'foo'") && m.contains("z-image-turbo")),
            "{e}"
        );
        let e = err(RawRequest {
            model: None,
            ..req("x")
        });
        assert!(matches!(e, ValidationError::InvalidModel(_)));
    }

    #[test]
    fn dimension_rules() {
        for (w, h) in [
            (100, 1024),
            (1024, 4096),
            (0, 512),
            (-16, 512),
            (512, 520),
            (i128::MAX, 512),
        ] {
            let r = RawRequest {
                width: Some(w),
                height: Some(h),
                ..req("z-image-turbo")
            };
            assert!(
                matches!(err(r), ValidationError::InvalidDimensions(_)),
                "{w}x{h}"
            );
        }
        let r = RawRequest {
            width: Some(256),
            height: Some(2048),
            ..req("z-image-turbo")
        };
        let v = validate(&catalog(), r).unwrap();
        assert_eq!((v.job.spec.width, v.job.spec.height), (256, 2048));
    }

    #[test]
    fn num_images_rules() {
        for n in [0, 5, -1] {
            let r = RawRequest {
                num_images: Some(n),
                ..req("z-image-turbo")
            };
            assert!(
                matches!(err(r), ValidationError::InvalidNumImages(_)),
                "{n}"
            );
        }
    }

    #[test]
    fn parameter_rules() {
        let bad = [
            RawRequest {
                steps: Some(0),
                ..req("z-image-turbo")
            },
            RawRequest {
                steps: Some(101),
                ..req("z-image-turbo")
            },
            RawRequest {
                guidance_scale: Some(-0.5),
                ..req("z-image-turbo")
            },
            RawRequest {
                guidance_scale: Some(20.5),
                ..req("z-image-turbo")
            },
            RawRequest {
                seed: Some(-1),
                ..req("z-image-turbo")
            },
            RawRequest {
                seed: Some(i128::from(u64::MAX) + 1),
                ..req("z-image-turbo")
            },
            RawRequest {
                output_format: Some("gif".into()),
                ..req("z-image-turbo")
            },
            RawRequest {
                resolution: Some("8k".into()),
                ..req("gpt-image-2")
            },
            RawRequest {
                quality: Some("ultra".into()),
                ..req("gpt-image-2")
            },
        ];
        for r in bad {
            assert!(
                matches!(err(r.clone()), ValidationError::InvalidParameter(_)),
                "{r:?}"
            );
        }
    }

    #[test]
    fn gpt_image_2_prices_and_sizes() {
        let v = validate(&catalog(), req("gpt-image-2")).unwrap();
        assert_eq!(
            (v.credits, v.job.spec.width, v.job.spec.steps),
            (200, 1024, 8)
        );
        let r = RawRequest {
            resolution: Some("4k".into()),
            quality: Some("high".into()),
            num_images: Some(2),
            ..req("gpt-image-2")
        };
        let v = validate(&catalog(), r).unwrap();
        assert_eq!(
            (v.credits, v.job.spec.width, v.job.spec.height),
            (6400, 4096, 4096)
        );
        let r = RawRequest {
            resolution: Some("2k".into()),
            quality: Some("low".into()),
            width: Some(512),
            ..req("gpt-image-2")
        };
        let v = validate(&catalog(), r).unwrap();
        assert_eq!(
            (
                v.credits,
                v.job.spec.width,
                v.job.spec.height,
                v.job.spec.steps
            ),
            (100, 512, 2048, 4)
        );
    }

    #[test]
    fn resolution_and_quality_are_ignored_elsewhere() {
        let r = RawRequest {
            resolution: Some("8k".into()),
            quality: Some("x".into()),
            ..req("seedream-v4")
        };
        assert_eq!(validate(&catalog(), r).unwrap().credits, 200);
    }

    #[test]
    fn explicit_local_extensions() {
        let r = RawRequest {
            steps: Some(3),
            guidance_scale: Some(4.0),
            negative_prompt: Some("blurry".into()),
            output_format: Some("webp".into()),
            seed: Some(7),
            ..req("z-image-turbo")
        };
        let v = validate(&catalog(), r).unwrap();
        assert_eq!(
            (
                v.job.spec.steps,
                v.job.spec.guidance.scale,
                v.job.spec.seeds[0]
            ),
            (3, 4.0, 7)
        );
        assert_eq!(v.job.spec.negative_prompt, "blurry");
        assert_eq!(v.encoding.format, ImageFormat::Webp);
    }

    /// Issue 15, finding 3: a size beyond the requested tier was priced at that tier.
    #[test]
    fn a_size_beyond_the_resolution_is_refused_or_picks_the_tier() {
        for (side, fits) in [(2048, "2k"), (4096, "4k"), (1040, "2k")] {
            let r = RawRequest {
                resolution: Some("1k".into()),
                width: Some(side),
                height: Some(side),
                ..req("gpt-image-2")
            };
            let ValidationError::InvalidDimensions(m) = err(r) else {
                panic!("{side}: not invalid_dimensions");
            };
            assert!(m.contains(&format!("resolution '{fits}' fits")), "{m}");
        }
        // Only one side sent: the other is the tier's default, and the larger must fit.
        let r = RawRequest {
            resolution: Some("1k".into()),
            height: Some(2048),
            ..req("gpt-image-2")
        };
        assert!(matches!(err(r), ValidationError::InvalidDimensions(_)));
        // Without `resolution` the smallest tier that covers the size is charged.
        for (w, h, credits) in [
            (256, 256, 200),
            (1024, 1024, 200),
            (1024, 2048, 400),
            (4096, 256, 800),
        ] {
            let r = RawRequest {
                width: Some(w),
                height: Some(h),
                ..req("gpt-image-2")
            };
            assert_eq!(validate(&catalog(), r).unwrap().credits, credits, "{w}x{h}");
        }
        // Within the requested tier: its price.
        let r = RawRequest {
            resolution: Some("4k".into()),
            width: Some(1024),
            ..req("gpt-image-2")
        };
        assert_eq!(validate(&catalog(), r).unwrap().credits, 800);
    }

    /// Issue 15, finding 3: steps and CFG ran at the default price.
    #[test]
    fn steps_and_guidance_scale_the_price() {
        let credits = |steps: Option<i128>, g: Option<f64>, n: Option<i128>| {
            let r = RawRequest {
                steps,
                guidance_scale: g,
                num_images: n,
                ..req("z-image-turbo")
            };
            validate(&catalog(), r).unwrap().credits
        };
        // z-image-turbo: 100 an image, Z-Image-Turbo's default 8 steps, no CFG.
        assert_eq!(credits(None, None, None), 100);
        assert_eq!(credits(Some(8), Some(0.0), None), 100);
        assert_eq!(
            credits(Some(4), None, None),
            100,
            "fewer steps: no discount"
        );
        assert_eq!(credits(Some(16), None, None), 200);
        assert_eq!(
            credits(Some(9), None, None),
            113,
            "100 x 9/8 = 112.5, rounded up"
        );
        assert_eq!(credits(Some(100), None, Some(4)), 1250 * 4);
        assert_eq!(credits(None, Some(3.5), None), 200);
        assert_eq!(credits(Some(16), Some(3.5), Some(2)), 800);
        // flux-2-pro: FLUX.2 [klein] at 4 steps, guidance-distilled (default 1.0): guidance sent
        // for it costs nothing, more steps do.
        let flux = |steps: Option<i128>, g: Option<f64>| {
            let r = RawRequest {
                steps,
                guidance_scale: g,
                ..req("flux-2-pro")
            };
            validate(&catalog(), r).unwrap().credits
        };
        assert_eq!(flux(None, None), 250);
        assert_eq!(flux(None, Some(4.0)), 250);
        assert_eq!(flux(Some(8), None), 500);
        // gpt-image-2 low quality runs 4 steps: 8 steps is twice its work.
        let r = RawRequest {
            quality: Some("low".into()),
            steps: Some(8),
            ..req("gpt-image-2")
        };
        assert_eq!(validate(&catalog(), r).unwrap().credits, 100);
    }

    #[test]
    fn the_price_is_checked_not_saturated() {
        assert_eq!(price_of_work(250, 8, 8, false, 4), Some(1000));
        assert_eq!(
            price_of_work(i64::MAX / 2, 8, 8, true, 1),
            Some(i64::MAX - 1)
        );
        assert_eq!(price_of_work(i64::MAX / 2, 8, 8, true, 2), None);
        assert_eq!(price_of_work(i64::MAX / 50, 100, 8, false, 1), None);
        // Guidance on a pipeline whose default already guides (or is distilled) costs nothing.
        assert!(!guidance_doubles_work(4.0, Some(7.0)));
        assert!(!guidance_doubles_work(0.0, Some(0.0)));
        assert!(!guidance_doubles_work(0.0, None));
        assert!(guidance_doubles_work(0.0, Some(0.5)));
    }
}
