//! The HTTP front (the only module that knows axum): routes, extractors, error mapping.

mod account;
mod client_io;
mod context;
mod dto;
mod error;
mod extract;
mod file_body;
mod files;
mod framing;
mod generate;
mod guard;
mod hangup;
mod idempotency;
mod metrics;
mod models;
mod openai;
pub mod openapi;
mod ops;
mod playground;
mod serve;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use guard::WebPolicy;
pub use metrics::HttpMetrics;
pub use serve::{serve, Limits};

use crate::infer::Facade;

/// Where image URLs point.
#[derive(Debug, Clone)]
pub enum PublicUrl {
    /// A configured base URL (no trailing slash).
    Fixed(String),
    /// The request's `Host` header (listening on 0.0.0.0 / [::], where the address itself is no
    /// use to a client), or `fallback` when it has none.
    FromHost { fallback: String },
}

impl PublicUrl {
    /// The base URL for a configured value, or else for the bound address.
    pub fn new(configured: Option<&str>, bound: SocketAddr) -> Self {
        match configured {
            Some(url) => PublicUrl::Fixed(url.trim_end_matches('/').to_string()),
            None if bound.ip().is_unspecified() => PublicUrl::FromHost {
                fallback: format!("http://{bound}"),
            },
            None => PublicUrl::Fixed(format!("http://{bound}")),
        }
    }

    pub fn base(&self, headers: &HeaderMap) -> String {
        match self {
            PublicUrl::Fixed(url) => url.clone(),
            PublicUrl::FromHost { fallback } => headers
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| {
                    !h.is_empty()
                        && h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
                })
                .map(|h| format!("http://{h}"))
                .unwrap_or_else(|| fallback.clone()),
        }
    }
}

/// Everything a handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub facade: Arc<Facade>,
    pub public_url: Arc<PublicUrl>,
    pub http_metrics: Arc<HttpMetrics>,
    /// Unix seconds at start (OpenAI's `created` of the model list).
    pub started_at: u64,
    /// Which hosts and origins may reach the server (http/guard.rs).
    pub web: Arc<WebPolicy>,
    /// `--metrics-auth`: GET /metrics needs a valid key in keys mode.
    pub metrics_auth: bool,
}

impl AppState {
    /// State with the default web policy: any Host, no cross-origin caller.
    pub fn new(facade: Arc<Facade>, public_url: PublicUrl) -> Self {
        Self {
            facade,
            public_url: Arc::new(public_url),
            http_metrics: Arc::new(HttpMetrics::default()),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            web: Arc::new(WebPolicy::default()),
            metrics_auth: false,
        }
    }

    pub fn with_web_policy(mut self, web: WebPolicy) -> Self {
        self.web = Arc::new(web);
        self
    }

    pub fn with_metrics_auth(mut self, required: bool) -> Self {
        self.metrics_auth = required;
        self
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Every route: (method, path, handler). The OpenAPI document must list exactly these
/// (`openapi` tests).
fn routes() -> Vec<(&'static str, &'static str, MethodRouter<AppState>)> {
    vec![
        ("get", "/", get(playground::page)),
        ("get", "/playground/{asset}", get(playground::asset)),
        ("post", "/v1/generate", post(generate::generate)),
        ("post", "/v1/images/generations", post(openai::generations)),
        ("get", "/v1/models", get(models::list)),
        ("get", "/v1/account", get(account::account)),
        ("get", "/files/gen/{request_id}/{file}", get(files::image)),
        ("get", "/health", get(ops::health)),
        ("get", "/metrics", get(ops::metrics)),
        ("get", "/openapi.json", get(openapi::openapi_json)),
        ("get", "/docs", get(openapi::docs)),
    ]
}

/// The whole HTTP surface. Tests can drive it without a socket.
pub fn router(state: AppState) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            // Idempotency-Key: on the hosted route (http/idempotency.rs).
            let handler = if path == "/v1/generate" {
                handler.route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    idempotency::layer,
                ))
            } else {
                handler
            };
            r.route(path, handler)
        })
        .fallback(files::not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::check,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            context::request_context,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_openai;
