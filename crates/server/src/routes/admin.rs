//! `/v1/admin/...`: operator views.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::json;
use switchyard_core::identity::{Principal, Role};

use crate::routes::keys::{native, NativeQuery, NoParams};
use crate::AppState;

/// Every deployment with its breaker state, passive statistics from real
/// traffic, and last active probe — live, from this instance. The figures
/// come from every tenant's requests (their volume and timing), so only an
/// operator (an admin of tenant `default`) reads them, as with the
/// credential cache's.
pub async fn providers(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    NativeQuery(NoParams {}): NativeQuery<NoParams>,
) -> Response {
    if !(who.role == Role::Admin && who.tenant_id == switchyard_engine::identity::DEFAULT_TENANT) {
        return native(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Provider health covers every tenant's traffic: only an operator (an admin of tenant `default`) reads it.",
            json!({}),
        );
    }
    let data: Vec<_> = state
        .gateway()
        .provider_health()
        .into_iter()
        .map(|h| {
            json!({
                "deployment": h.deployment,
                "provider": h.provider,
                "model": h.model,
                "breaker": {"state": h.breaker_state},
                "health": {
                    "p50_ms": h.p50_ms,
                    "p95_ms": h.p95_ms,
                    "error_rate": h.error_rate,
                    "window_calls": h.window_calls,
                    "total_calls": h.total_calls,
                    "total_errors": h.total_errors,
                    "last_error": h.last_error,
                    "last_error_at_ms": h.last_error_at_ms,
                    "last_success_at_ms": h.last_success_at_ms,
                },
                "probe": {
                    "last_at_ms": h.last_probe_at_ms,
                    "ok": h.last_probe_ok,
                    "latency_ms": h.last_probe_ms,
                },
            })
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
