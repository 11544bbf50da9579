//! GET /v1/models: every model ID with its price, sizes, pipeline and whether it is loaded.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::extract::Authed;
use super::AppState;
use crate::catalog::{Catalog, Model, Pricing};

#[derive(Debug, Serialize)]
pub struct ModelsResponse {
    pub success: bool,
    pub models: Vec<ModelDto>,
}

#[derive(Debug, Serialize)]
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
}

/// Resolution x quality pricing (gpt-image-2).
#[derive(Debug, Serialize)]
pub struct TieredDto {
    /// Resolution -> default square size.
    pub resolutions: BTreeMap<String, u32>,
    pub qualities: Vec<String>,
    /// Resolution -> quality -> credits per image.
    pub credits_per_image: BTreeMap<String, BTreeMap<String, i64>>,
    pub default_resolution: String,
    pub default_quality: String,
}

fn dto(m: &Model, catalog: &Catalog, loaded: &[String]) -> ModelDto {
    ModelDto {
        id: m.id.clone(),
        pipeline: m.pipeline.clone(),
        family: catalog.pipeline(&m.pipeline).and_then(|p| p.family.clone()),
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

pub async fn list(State(state): State<AppState>, _auth: Authed) -> Json<ModelsResponse> {
    let loaded = state.facade.loaded_pipelines();
    let catalog = state.facade.catalog();
    Json(ModelsResponse {
        success: true,
        models: catalog
            .models()
            .iter()
            .map(|m| dto(m, catalog, &loaded))
            .collect(),
    })
}
