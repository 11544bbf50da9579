//! GET /v1/models: every model ID with its price, sizes, pipeline and whether it is loaded.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::extract::Authed;
use super::AppState;
use crate::catalog::{Model, Pipeline, Pricing};
use crate::infer::guidance_doubles_work;

/// The model list, in the hosted shape (`success`, `models`) and OpenAI's (`object`, `data`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelsResponse {
    pub success: bool,
    pub models: Vec<ModelDto>,
    /// Always `list` (OpenAI's list shape).
    pub object: &'static str,
    /// The same models in OpenAI's shape, for `client.models.list()`.
    pub data: Vec<OpenAiModel>,
}

/// A model in OpenAI's shape.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OpenAiModel {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds: when this server started.
    pub created: u64,
    /// `diffusiond:` + the local pipeline serving it.
    pub owned_by: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelDto {
    pub id: String,
    /// The local pipeline serving this ID.
    pub pipeline: String,
    /// The pipeline's model family (`z-image`, `flux2-klein`); null when the catalog leaves it
    /// to the checkout's `model_index.json`.
    pub family: Option<String>,
    /// Whether the pipeline's weights are loaded.
    pub loaded: bool,
    /// Credits per image of a request with default settings.
    pub credits_per_image: i64,
    pub default_width: u32,
    pub default_height: u32,
    pub min_size: u32,
    pub max_size: u32,
    pub size_step: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricing: Option<TieredDto>,
    /// Model evaluations of a request that does not send `steps` (gpt-image-2: per quality in
    /// `pricing.quality_steps`).
    pub default_steps: u32,
    /// Whether sending `guidance_scale` > 0 turns on classifier-free guidance (twice the
    /// evaluations) and so doubles the price.
    pub guidance_doubles_price: bool,
    /// How `steps` and `guidance_scale` change the price, in words.
    pub price_rule: String,
    /// Quantized components as the catalog configures them: `transformer` / `text_encoder` ->
    /// `gguf FILE` (used as the file stores it) or `q8_0 at load`; null when every weight is
    /// full precision.
    pub quantization: Option<BTreeMap<String, String>>,
}

/// Resolution x quality pricing (gpt-image-2).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TieredDto {
    /// Resolution -> default square size.
    pub resolutions: BTreeMap<String, u32>,
    pub qualities: Vec<String>,
    /// Resolution -> quality -> credits per image.
    pub credits_per_image: BTreeMap<String, BTreeMap<String, i64>>,
    pub default_resolution: String,
    pub default_quality: String,
    /// Default steps of a quality, where it differs from `default_steps`.
    pub quality_steps: BTreeMap<String, u32>,
}

fn dto(m: &Model, pipeline: Option<&Pipeline>, loaded: &[String]) -> ModelDto {
    let default_steps = pipeline.map_or(0, |p| p.steps);
    let guidance_doubles_price =
        pipeline.is_some_and(|p| guidance_doubles_work(p.guidance_scale, Some(1.0)));
    let price_rule = format!(
        "credits_per_image x steps / default steps when more steps than the default are sent, \
         rounded up{}; a request without them pays credits_per_image",
        if guidance_doubles_price {
            ", x 2 with guidance_scale > 0"
        } else {
            ""
        }
    );
    let quantization = pipeline.and_then(|p| {
        let mut q: BTreeMap<String, String> = p
            .components
            .iter()
            .map(|(c, src)| (c.clone(), format!("gguf {src}")))
            .collect();
        if let Some(t) = &p.quantize {
            for c in ["transformer", "text_encoder"] {
                q.entry(c.to_string())
                    .or_insert_with(|| format!("{t} at load"));
            }
        }
        (!q.is_empty()).then_some(q)
    });
    ModelDto {
        quantization,
        default_steps,
        guidance_doubles_price,
        price_rule,
        id: m.id.clone(),
        pipeline: m.pipeline.clone(),
        family: pipeline.and_then(|p| p.family.clone()),
        loaded: loaded.contains(&m.pipeline),
        credits_per_image: m.pricing.default_price(),
        default_width: m.sizes.default,
        default_height: m.sizes.default,
        min_size: m.sizes.min,
        max_size: m.sizes.max,
        size_step: m.sizes.step,
        pricing: match &m.pricing {
            Pricing::Flat(_) => None,
            Pricing::Tiered(t) => Some(TieredDto {
                resolutions: t.resolutions.iter().cloned().collect(),
                qualities: t.qualities.clone(),
                credits_per_image: t.prices.clone(),
                default_resolution: t.default_resolution.clone(),
                default_quality: t.default_quality.clone(),
                quality_steps: t.quality_steps.clone(),
            }),
        },
    }
}

/// GET /v1/models.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "hosted",
    responses(
        (status = 200, description = "Every model ID", body = ModelsResponse),
        (status = 401, description = "invalid_api_key", body = super::openapi::ErrorDoc),
    ),
    security((), ("bearer" = []))
)]
pub async fn list(State(state): State<AppState>, _auth: Authed) -> Json<ModelsResponse> {
    let loaded = state.facade.loaded_pipelines();
    let catalog = state.facade.catalog();
    let models = catalog.models();
    Json(ModelsResponse {
        success: true,
        models: models
            .iter()
            .map(|m| dto(m, catalog.pipeline(&m.pipeline), &loaded))
            .collect(),
        object: "list",
        data: models
            .iter()
            .map(|m| OpenAiModel {
                id: m.id.clone(),
                object: "model",
                created: state.started_at,
                owned_by: format!("diffusiond:{}", m.pipeline),
            })
            .collect(),
    })
}
