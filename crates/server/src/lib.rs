//! The HTTP layer: axum routes, the OpenAI-compatible error mapping, trace
//! context, metrics and request logging. It turns requests into engine calls
//! and engine results into responses; it never runs SQL or calls a provider.

mod auth;
mod error;
mod extract;
mod limit;

pub use limit::Limits;
mod observe;
mod routes;

use std::sync::Arc;

use axum::routing::{delete, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use switchyard_core::config::SecurityConfig;
use switchyard_engine::identity::Identity;
use switchyard_engine::Gateway;

pub use error::ApiError;

/// Shared state handed to every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// What the HTTP layer is built from.
pub struct Parts {
    pub gateway: Arc<Gateway>,
    /// Bots, sessions and replies.
    pub sessions: switchyard_engine::sessions::Sessions,
    pub idempotency: switchyard_engine::idempotency::Idempotency,
    /// Retired paths still answered (with deprecation headers) until sunset.
    pub retired_paths: Vec<switchyard_core::config::RetiredPath>,
    pub identity: Identity,
    pub prometheus: Option<PrometheusHandle>,
    pub max_body_bytes: usize,
    /// How long a request's body may pause (`server.read_timeout_secs`).
    pub read_timeout: std::time::Duration,
    /// Proxies whose `X-Forwarded-For` names the client (`server.trusted_proxies`).
    pub trusted_proxies: Vec<switchyard_core::net::IpNet>,
    /// Header in which a service key names the user it acts for.
    pub user_header: String,
    pub security: SecurityConfig,
    /// Rate limits; `None` turns them off.
    pub limits: Option<Limits>,
    /// Monthly budgets; `None` turns them off.
    pub budgets: Option<switchyard_engine::budget::Budgets>,
    /// Remembers request signatures, so each is accepted once.
    pub replay: switchyard_engine::signing::ReplayGuard,
}

struct Inner {
    gateway: Arc<Gateway>,
    sessions: switchyard_engine::sessions::Sessions,
    idempotency: switchyard_engine::idempotency::Idempotency,
    retired_paths: Vec<switchyard_core::config::RetiredPath>,
    identity: Identity,
    prometheus: Option<PrometheusHandle>,
    max_body_bytes: usize,
    read_timeout: std::time::Duration,
    trusted_proxies: Vec<switchyard_core::net::IpNet>,
    user_header: axum::http::HeaderName,
    security: SecurityConfig,
    limits: Option<Limits>,
    budgets: Option<switchyard_engine::budget::Budgets>,
    replay: switchyard_engine::signing::ReplayGuard,
    /// Failed authentications per client address (this instance's).
    auth_failures: switchyard_engine::limits::MemoryLimiter,
    /// Request count and latency handles by route, model and status.
    request_metrics: switchyard_engine::handles::Handles<(metrics::Counter, metrics::Histogram)>,
}

impl AppState {
    pub fn new(parts: Parts) -> Result<Self, String> {
        let user_header =
            axum::http::HeaderName::try_from(parts.user_header.as_str()).map_err(|_| {
                format!(
                    "auth.user_header: `{}` is not a header name",
                    parts.user_header
                )
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                gateway: parts.gateway,
                sessions: parts.sessions,
                idempotency: parts.idempotency,
                retired_paths: parts.retired_paths,
                identity: parts.identity,
                prometheus: parts.prometheus,
                max_body_bytes: parts.max_body_bytes,
                read_timeout: parts.read_timeout,
                trusted_proxies: parts.trusted_proxies,
                user_header,
                security: parts.security,
                limits: parts.limits,
                budgets: parts.budgets,
                replay: parts.replay,
                auth_failures: switchyard_engine::limits::MemoryLimiter::new(),
                request_metrics: Default::default(),
            }),
        })
    }

    pub fn gateway(&self) -> &Gateway {
        &self.inner.gateway
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    pub fn sessions(&self) -> &switchyard_engine::sessions::Sessions {
        &self.inner.sessions
    }

    pub(crate) fn idempotency(&self) -> &switchyard_engine::idempotency::Idempotency {
        &self.inner.idempotency
    }

    pub(crate) fn user_header(&self) -> &axum::http::HeaderName {
        &self.inner.user_header
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    use routes::sessions as s;
    let mut router = Router::new()
        .route("/v1/bots", post(s::create_bot).get(s::list_bots))
        .route(
            "/v1/bots/{id}",
            get(s::get_bot).patch(s::update_bot).delete(s::delete_bot),
        )
        .route(
            "/v1/sessions",
            post(s::create_session).get(s::list_sessions),
        )
        .route(
            "/v1/sessions/{id}",
            get(s::get_session).delete(s::delete_session),
        )
        .route(
            "/v1/sessions/{id}/messages",
            get(s::list_messages).post(s::post_message),
        )
        .route(
            "/v1/sessions/{id}/messages/{message_id}/events",
            get(s::message_events),
        )
        .route(
            "/v1/sessions/{id}/state",
            get(s::get_state).patch(s::patch_state),
        )
        .route("/v1/traces/{trace_id}", get(s::trace))
        .route("/v1/users/{id}/export", get(s::export_user))
        .route("/v1/users/{id}", delete(s::erase_user))
        .route("/functions/v1/chat", post(s::function_chat))
        .route("/functions/v1/embed", post(s::function_embed));
    for retired in &state.inner.retired_paths {
        let retired = Arc::new(retired.clone());
        router = router.route(
            &retired.path.clone(),
            post(
                move |axum::extract::State(state): axum::extract::State<AppState>,
                      axum::Extension(ctx): axum::Extension<
                    switchyard_core::trace::TraceContext,
                >,
                      axum::Extension(started): axum::Extension<std::time::Instant>,
                      axum::Extension(who): axum::Extension<
                    switchyard_core::identity::Principal,
                >,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Body| {
                    s::retired(retired.clone(), state, ctx, started, who, headers, body)
                },
            ),
        );
    }
    let router = router
        .route(
            "/v1/chat/completions",
            post(routes::openai::chat_completions),
        )
        .route("/v1/embeddings", post(routes::openai::embeddings))
        .route("/v1/messages", post(routes::anthropic::messages))
        .route(
            "/v1/messages/count_tokens",
            post(routes::anthropic::count_tokens),
        )
        .route("/v1/models", get(routes::openai::list_models))
        .route("/v1/models/{*model}", get(routes::openai::get_model))
        .route("/v1/admin/providers", get(routes::admin::providers))
        .route(
            "/v1/admin/keys",
            post(routes::keys::create_key).get(routes::keys::list_keys),
        )
        .route(
            "/v1/admin/keys/{id}",
            delete(routes::keys::revoke_key).patch(routes::keys::update_key),
        )
        .route(
            "/v1/admin/tenants",
            post(routes::keys::create_tenant).get(routes::keys::list_tenants),
        )
        .route(
            "/v1/admin/tenants/{id}",
            axum::routing::patch(routes::keys::update_tenant),
        )
        .route("/v1/admin/auth-cache", get(routes::keys::auth_cache))
        .route(
            "/v1/admin/auth-cache/invalidate",
            post(routes::keys::invalidate_auth_cache),
        )
        .route("/v1/admin/audit", get(routes::keys::audit))
        .route(
            "/v1/admin/rate-limits/reset",
            post(routes::keys::reset_rate_limits),
        )
        .route("/health", get(routes::ops::health))
        .route("/ready", get(routes::ops::ready))
        .route("/metrics", get(routes::ops::metrics))
        .fallback(routes::ops::not_found)
        .method_not_allowed_fallback(routes::ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::observe,
        ));
    let router = match cors_layer(&state.inner.security) {
        // The CORS layer answers preflights itself, before `observe` (whose
        // authentication a preflight, which carries no credentials, would
        // fail), so their security headers are added around it.
        Some(cors) => {
            let hsts = state.inner.security.hsts;
            router.layer(cors).layer(axum::middleware::map_response(
                move |mut resp: axum::response::Response| async move {
                    // `observe` has added them to every response but a preflight.
                    if !resp
                        .headers()
                        .contains_key(axum::http::header::X_CONTENT_TYPE_OPTIONS)
                    {
                        observe::security_headers(resp.headers_mut(), hsts);
                    }
                    resp
                },
            ))
        }
        None => router,
    };
    router.with_state(state)
}

/// CORS for the configured origins; none by default (no layer at all).
fn cors_layer(security: &SecurityConfig) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};
    if security.cors_origins.is_empty() {
        return None;
    }
    let origin = if security.cors_origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            security
                .cors_origins
                .iter()
                .filter_map(|o| axum::http::HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods(Any)
            // The headers the preflight asks for, named: `*` would not
            // cover `Authorization`, which the Fetch standard requires to
            // be listed (and every browser client of this API sends).
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(Any)
            .max_age(std::time::Duration::from_secs(600)),
    )
}
