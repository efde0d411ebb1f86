//! Liveness, readiness, metrics, and the answers for unknown routes.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::{family_error, Family};
use crate::error::ErrorDetail;
use crate::AppState;

pub async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready when the store answers within two seconds.
pub async fn ready(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.gateway().ready()).await {
        Ok(Ok(())) => {
            axum::Json(json!({"status": "ready", "checks": {"store": "ok"}})).into_response()
        }
        Ok(Err(e)) => not_ready(e.to_string()),
        Err(_) => not_ready("the store did not answer within 2s".to_owned()),
    }
}

fn not_ready(detail: String) -> Response {
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"status": "unavailable", "checks": {"store": "unreachable"}})),
    )
        .into_response();
    resp.extensions_mut().insert(ErrorDetail(detail));
    resp
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let usage = state.gateway().usage_writer();
    metrics::gauge!("switchyard_usage_queue_depth").set(usage.queue_depth() as f64);
    let events = state.gateway().event_writer();
    metrics::gauge!("switchyard_events_queue_depth").set(events.queue_depth() as f64);
    // The breakers' states as `GET /v1/admin/providers` reads them: a
    // transition sets the gauge too, but an open breaker whose cool-down
    // has passed moves to half-open only when a request asks for it.
    for d in state.gateway().deployments() {
        metrics::gauge!("switchyard_breaker_state", "deployment" => d.id.clone())
            .set(d.breaker.state().as_gauge());
    }
    let Some(handle) = &state.inner.prometheus else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// An unknown path, answered in the shape of the API its prefix belongs to
/// (`/v1/messages/…` Anthropic's, the native routes' native, else OpenAI's).
pub async fn not_found(method: Method, uri: Uri) -> Response {
    family_error(
        Family::of(uri.path()),
        StatusCode::NOT_FOUND,
        Some("unknown_url"),
        &format!("Unknown request URL: {method} {}.", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    family_error(
        Family::of(uri.path()),
        StatusCode::METHOD_NOT_ALLOWED,
        Some("method_not_allowed"),
        &format!("Method {method} is not allowed for {}.", uri.path()),
    )
}
