//! GET /v1/models: every model ID with its price, sizes, pipeline and whether it is loaded.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::extract::Authed;
use super::AppState;
use crate::catalog::{Model, Pricing};

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
}

fn dto(m: &Model, loaded: &[String]) -> ModelDto {
    ModelDto {
        id: m.id.clone(),
        pipeline: m.pipeline.clone(),
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
    let models = state.facade.catalog().models();
    Json(ModelsResponse {
        success: true,
        models: models.iter().map(|m| dto(m, &loaded)).collect(),
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
