//! The HTTP layer: axum routes, the OpenAI-compatible error mapping, trace
//! context, metrics and request logging. It turns requests into engine calls
//! and engine results into responses; it never runs SQL or calls a provider.

mod error;
mod extract;
mod observe;
mod routes;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use switchyard_engine::Gateway;

pub use error::ApiError;

/// Shared state handed to every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    gateway: Gateway,
    prometheus: Option<PrometheusHandle>,
    max_body_bytes: usize,
}

impl AppState {
    pub fn new(
        gateway: Gateway,
        prometheus: Option<PrometheusHandle>,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                gateway,
                prometheus,
                max_body_bytes,
            }),
        }
    }

    pub fn gateway(&self) -> &Gateway {
        &self.inner.gateway
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(routes::openai::chat_completions),
        )
        .route("/v1/embeddings", post(routes::openai::embeddings))
        .route("/v1/messages", post(routes::anthropic::messages))
        .route("/v1/models", get(routes::openai::list_models))
        .route("/v1/models/{*model}", get(routes::openai::get_model))
        .route("/v1/admin/providers", get(routes::admin::providers))
        .route("/health", get(routes::ops::health))
        .route("/ready", get(routes::ops::ready))
        .route("/metrics", get(routes::ops::metrics))
        .fallback(routes::ops::not_found)
        .method_not_allowed_fallback(routes::ops::method_not_allowed)
        .layer(axum::middleware::from_fn(observe::observe))
        .with_state(state)
}
