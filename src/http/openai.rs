//! POST /v1/images/generations: OpenAI's Images API over the same facade as /v1/generate (same
//! queue, keys, credits and quotas; a request costs what its catalog model costs). Errors come
//! from the one error table, rendered in OpenAI's shape by the request-context middleware.
//!
//! Differences from OpenAI: no moderation (`moderation` and `user` are accepted and ignored);
//! `background: "transparent"` is refused (the models make opaque RGB); `output_compression` is the
//! JPEG quality (WebP is lossless here); `usage` reports zero tokens (credits are the price);
//! local extensions `seed`, `steps`, `guidance_scale`, `negative_prompt`.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::dto::{integer, number, string, wrong_type};
use super::error::ApiError;
use super::extract::{Authed, JsonObject};
use super::hangup::{unless_closed, Hangup};
use super::sse::{self, named_event, Style};
use super::AppState;
use crate::catalog::{Catalog, Pricing};
use crate::image::ImageFormat;
use crate::infer::{Generated, InferError, RawRequest, RequestId, ValidationError};
use crate::scheduler::{Progress, ProgressTx, MAX_PREVIEWS};
use crate::store::Encoding;

/// Routes under this prefix answer errors in OpenAI's shape.
pub const OPENAI_PREFIX: &str = "/v1/images/";

fn invalid(message: String) -> ApiError {
    ApiError::Infer(InferError::Invalid(ValidationError::InvalidParameter(
        message,
    )))
}

/// What the OpenAI request asks beyond the shared fields.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiRequest {
    pub raw: RawRequest,
    pub url: bool,
    pub stream: bool,
    pub partial_images: usize,
    /// As reported back: `low|medium|high|auto`.
    pub quality: String,
    pub output_format: &'static str,
}

/// Read OpenAI's fields into the shared raw request. Unknown fields are ignored.
pub fn parse(catalog: &Catalog, mut obj: Map<String, Value>) -> Result<OpenAiRequest, ApiError> {
    let mut take = |name: &str| obj.remove(name).filter(|v| !v.is_null());
    let prompt = string("prompt", take("prompt"))?;
    let model =
        string("model", take("model"))?.or_else(|| catalog.models().first().map(|m| m.id.clone()));
    let n = integer("n", take("n"))?;
    let size = string("size", take("size"))?;
    let quality = string("quality", take("quality"))?.unwrap_or_else(|| "auto".into());
    let response_format = string("response_format", take("response_format"))?;
    let output_format = string("output_format", take("output_format"))?;
    let output_compression = integer("output_compression", take("output_compression"))?;
    let background = string("background", take("background"))?;
    let stream = match take("stream") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(other) => return Err(wrong_type("stream", "a boolean", &other)),
    };
    let partial_images = integer("partial_images", take("partial_images"))?;
    let seed = integer("seed", take("seed"))?;
    let steps = integer("steps", take("steps"))?;
    let guidance_scale = number("guidance_scale", take("guidance_scale"))?;
    let negative_prompt = string("negative_prompt", take("negative_prompt"))?;
    // `moderation`, `user`, `style` and anything else: accepted and ignored.

    let (width, height) = match size.as_deref() {
        None | Some("auto") => (None, None),
        Some(s) => {
            let parsed = s
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
            let Some((w, h)) = parsed else {
                return Err(ApiError::Infer(InferError::Invalid(
                    ValidationError::InvalidDimensions(format!(
                        "size '{s}' is not 'auto' or WIDTHxHEIGHT (e.g. 1024x1024)"
                    )),
                )));
            };
            (Some(i128::from(w)), Some(i128::from(h)))
        }
    };
    let tier_quality = match quality.as_str() {
        "auto" => None,
        "low" | "medium" | "high" => Some(quality.clone()),
        "standard" => Some("medium".to_string()),
        "hd" => Some("high".to_string()),
        other => {
            return Err(invalid(format!(
                "quality '{other}' is not one of: auto, low, medium, high"
            )))
        }
    };
    let url = match response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(invalid(format!(
                "response_format '{other}' is not one of: b64_json, url"
            )))
        }
    };
    let output_format: &'static str = match output_format.as_deref() {
        None | Some("png") => "png",
        Some("jpeg") | Some("jpg") => "jpeg",
        Some("webp") => "webp",
        Some(other) => {
            return Err(invalid(format!(
                "output_format '{other}' is not one of: png, jpeg, webp"
            )))
        }
    };
    match background.as_deref() {
        None | Some("auto") | Some("opaque") => {}
        Some("transparent") => {
            return Err(invalid(
                "background 'transparent' is not supported: the models served here make opaque \
                 RGB images without an alpha channel; use 'auto' or 'opaque'"
                    .into(),
            ))
        }
        Some(other) => {
            return Err(invalid(format!(
                "background '{other}' is not one of: auto, opaque"
            )))
        }
    }
    let partial_images = match partial_images {
        None => 0,
        Some(p) => usize::try_from(p)
            .ok()
            .filter(|p| *p <= MAX_PREVIEWS)
            .ok_or_else(|| invalid(format!("partial_images is {p}; it must be 0 to 3")))?,
    };

    // gpt-image-2 is priced by resolution: the smallest one that holds the asked size.
    let model_entry = model.as_deref().and_then(|m| catalog.model(m));
    let (resolution, quality_field) = match model_entry.map(|m| &m.pricing) {
        Some(Pricing::Tiered(t)) => {
            let side = width.max(height);
            let resolution = side.map(|side| {
                t.resolutions
                    .iter()
                    .find(|(_, s)| i128::from(*s) >= side)
                    .or(t.resolutions.last())
                    .map(|(r, _)| r.clone())
                    .unwrap_or_default()
            });
            (resolution, tier_quality.clone())
        }
        _ => (None, None),
    };
    let reported_quality = match (&tier_quality, model_entry.map(|m| &m.pricing)) {
        (Some(q), _) => q.clone(),
        (None, Some(Pricing::Tiered(t))) => t.default_quality.clone(),
        (None, _) => "high".into(),
    };

    Ok(OpenAiRequest {
        raw: RawRequest {
            prompt,
            model,
            width,
            height,
            num_images: n,
            resolution,
            quality: quality_field,
            seed,
            steps,
            guidance_scale,
            negative_prompt,
            output_format: Some(output_format.to_string()),
            output_compression,
        },
        url,
        stream,
        partial_images,
        quality: reported_quality,
        output_format,
    })
}

/// One image of the answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OpenAiImage {
    /// Base64 of the image file (no data-URL prefix), when `response_format` is `b64_json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// Absolute URL of the stored image, when `response_format` is `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Local extension: the image's seed.
    pub seed: u64,
}

/// The answer of POST /v1/images/generations.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OpenAiImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<OpenAiImage>,
    /// `WIDTHxHEIGHT`.
    pub size: String,
    pub quality: String,
    pub output_format: String,
    /// Always `opaque`.
    pub background: String,
    /// Local extension: the credits charged.
    pub credits_used: i64,
    /// Local extension: the request's ID (also the `X-Request-Id` header).
    pub request_id: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What the events and the answer of one request repeat.
pub struct StreamMeta {
    size: String,
    quality: String,
    output_format: &'static str,
    encoding: Encoding,
    url: bool,
    base: String,
    created: u64,
    /// Partial images sent so far, per image.
    partials: Vec<usize>,
}

impl StreamMeta {
    /// The common fields of the answer and of every event.
    fn common(&self) -> Value {
        json!({
            "size": self.size, "quality": self.quality, "background": "opaque",
            "output_format": self.output_format,
        })
    }

    pub(super) fn progress(&mut self, p: Progress) -> Option<Event> {
        let Progress::Preview { index, image, .. } = p else {
            return None;
        };
        if self.partials.len() <= index {
            self.partials.resize(index + 1, 0);
        }
        let partial_image_index = self.partials[index];
        self.partials[index] += 1;
        let mut data = self.common();
        data["type"] = json!("image_generation.partial_image");
        data["b64_json"] = json!(sse::b64_image(&image, self.encoding)?);
        data["created_at"] = json!(now_secs());
        data["partial_image_index"] = json!(partial_image_index);
        data["image_index"] = json!(index);
        Some(named_event("image_generation.partial_image", &data))
    }

    /// One `image_generation.completed` event per image.
    pub(super) async fn completed(&self, state: &AppState, g: Generated) -> Vec<Event> {
        let id = g.request_id.clone();
        let Ok(images) = self.images(state, &g).await else {
            let p = ApiError::from(InferError::Internal(format!(
                "stored images of {id} could not be read back"
            )))
            .payload();
            tracing::error!(request_id = %id, "stored images could not be read back");
            return vec![named_event("error", &p.openai_body())];
        };
        images
            .into_iter()
            .enumerate()
            .map(|(i, img)| {
                let mut data = self.common();
                data["type"] = json!("image_generation.completed");
                data["b64_json"] = json!(img.b64_json.unwrap_or_default());
                if let Some(u) = img.url {
                    data["url"] = json!(u);
                }
                data["created_at"] = json!(now_secs());
                data["image_index"] = json!(i);
                data["seed"] = json!(img.seed);
                data["usage"] = json!({
                    "input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                });
                named_event("image_generation.completed", &data)
            })
            .collect()
    }

    /// The images of a finished request, as URLs or base64 of the stored files.
    async fn images(&self, state: &AppState, g: &Generated) -> Result<Vec<OpenAiImage>, ()> {
        let id = g.request_id.as_str();
        let mut out = Vec::with_capacity(g.images.len());
        for img in &g.images {
            let (url, b64_json) = if self.url {
                (
                    Some(format!("{}/files/gen/{id}/{}", self.base, img.file_name)),
                    None,
                )
            } else {
                let bytes = state
                    .facade
                    .file_bytes(id, &img.file_name)
                    .await
                    .ok_or(())?;
                (None, Some(b64(&bytes)))
            };
            out.push(OpenAiImage {
                b64_json,
                url,
                seed: img.seed,
            });
        }
        Ok(out)
    }
}

/// POST /v1/images/generations.
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "openai",
    request_body(content = super::openapi::OpenAiImagesRequestDoc, description = "OpenAI's image generation request"),
    responses(
        (status = 200, description = "The images (or, with `stream: true`, Server-Sent Events `image_generation.partial_image` and `image_generation.completed`)", body = OpenAiImagesResponse),
        (status = 400, description = "A bad field (OpenAI's error shape)", body = super::openapi::OpenAiErrorDoc),
        (status = 401, description = "Missing or unknown key", body = super::openapi::OpenAiErrorDoc),
        (status = 402, description = "Not enough credits", body = super::openapi::OpenAiErrorDoc),
        (status = 413, description = "Body over 64 KiB", body = super::openapi::OpenAiErrorDoc),
        (status = 429, description = "Daily quota used up", body = super::openapi::OpenAiErrorDoc),
        (status = 503, description = "Queue full", body = super::openapi::OpenAiErrorDoc),
        (status = 500, description = "Generation failed", body = super::openapi::OpenAiErrorDoc),
    ),
    security((), ("bearer" = []))
)]
pub async fn generations(
    State(state): State<AppState>,
    Extension(id): Extension<RequestId>,
    hangup: Option<Extension<Hangup>>,
    headers: HeaderMap,
    Authed(caller): Authed,
    JsonObject(obj): JsonObject,
) -> Result<Response, ApiError> {
    let req = parse(state.facade.catalog(), obj)?;
    let (tx, rx) = if req.stream {
        let (tx, rx) = ProgressTx::channel(req.partial_images);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let running = state.facade.start(&caller, &id, req.raw, tx).await?;
    let valid = running.request();
    let meta = StreamMeta {
        size: format!("{}x{}", valid.job.spec.width, valid.job.spec.height),
        quality: req.quality,
        output_format: req.output_format,
        encoding: Encoding {
            format: match req.output_format {
                "jpeg" => ImageFormat::Jpeg,
                "webp" => ImageFormat::Webp,
                _ => ImageFormat::Png,
            },
            quality: valid.encoding.quality,
        },
        url: req.url,
        base: state.public_url.base(&headers),
        created: now_secs(),
        partials: Vec::new(),
    };
    if let Some(rx) = rx {
        return Ok(sse::respond(state, id, running, rx, Style::OpenAi(meta)));
    }
    // A client that goes away mid-generation cancels it and is refunded (see hangup.rs).
    let g = unless_closed(hangup.as_ref().map(|h| &h.0), running.finish()).await??;
    let images = meta.images(&state, &g).await.map_err(|()| {
        ApiError::Infer(InferError::Internal(
            "stored images could not be read back".into(),
        ))
    })?;
    Ok(Json(OpenAiImagesResponse {
        created: meta.created,
        data: images,
        size: meta.size.clone(),
        quality: meta.quality.clone(),
        output_format: meta.output_format.into(),
        background: "opaque".into(),
        credits_used: g.credits_used,
        request_id: g.request_id.as_str().to_string(),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(v: Value) -> Result<OpenAiRequest, ApiError> {
        let Value::Object(m) = v else { panic!() };
        parse(&Catalog::builtin().unwrap(), m)
    }

    #[test]
    fn defaults_and_mapping() {
        let r = p(json!({"prompt": "a cat"})).unwrap();
        assert_eq!(r.raw.model.as_deref(), Some("z-image-turbo"));
        assert_eq!((r.raw.width, r.raw.height), (None, None));
        assert_eq!(r.output_format, "png");
        assert!(!r.url && !r.stream);
        let r = p(
            json!({"prompt": "a cat", "model": "flux-2-pro", "n": 2, "size": "512x768",
            "response_format": "url", "output_format": "jpeg", "output_compression": 50,
            "moderation": "low", "user": "u1", "seed": 3}),
        )
        .unwrap();
        assert_eq!((r.raw.width, r.raw.height), (Some(512), Some(768)));
        assert_eq!(r.raw.num_images, Some(2));
        assert_eq!(r.raw.output_compression, Some(50));
        assert_eq!(r.raw.seed, Some(3));
        assert!(r.url);
        assert_eq!(r.raw.output_format.as_deref(), Some("jpeg"));
    }

    #[test]
    fn gpt_image_2_is_priced_by_the_size_asked() {
        let r = p(
            json!({"prompt": "x", "model": "gpt-image-2", "size": "2048x1536", "quality": "low"}),
        )
        .unwrap();
        assert_eq!(r.raw.resolution.as_deref(), Some("2k"));
        assert_eq!(r.raw.quality.as_deref(), Some("low"));
        let r = p(json!({"prompt": "x", "model": "gpt-image-2"})).unwrap();
        assert_eq!(r.raw.resolution, None);
        assert_eq!(r.quality, "medium");
    }

    #[test]
    fn refusals_say_why() {
        for (body, needle) in [
            (
                json!({"prompt": "x", "background": "transparent"}),
                "opaque RGB",
            ),
            (json!({"prompt": "x", "size": "big"}), "WIDTHxHEIGHT"),
            (json!({"prompt": "x", "partial_images": 4}), "0 to 3"),
            (
                json!({"prompt": "x", "response_format": "file"}),
                "b64_json, url",
            ),
            (json!({"prompt": "x", "quality": "ultra"}), "auto, low"),
            (json!({"prompt": "x", "stream": "yes"}), "'stream'"),
            (
                json!({"prompt": "x", "output_format": "gif"}),
                "png, jpeg, webp",
            ),
        ] {
            let e = p(body.clone()).unwrap_err();
            assert!(e.to_string().contains(needle), "{body}: {e}");
            assert_eq!(e.payload().status.as_u16(), 400);
            // OpenAI's `param` names the field at fault.
            let field = body
                .as_object()
                .unwrap()
                .keys()
                .find(|k| *k != "prompt")
                .unwrap()
                .clone();
            assert_eq!(e.payload().param, Some(field.as_str()), "{body}");
        }
    }
}
