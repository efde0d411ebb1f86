//! The one middleware every request passes: continue or start the W3C
//! trace, open the request span every log line inherits, authenticate
//! ([`crate::auth::admit`]) and count the request against its limits
//! ([`crate::limit::rate_limit`]) inside it, echo `X-Request-Id` and
//! `traceparent`, record the request metrics, and write one access log line
//! (with the internal error detail of a failed request) — also for a request
//! whose client left before the answer (status 499).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use switchyard_core::trace::TraceContext;
use tracing::Instrument;

use crate::auth::Family;
use crate::error::ErrorDetail;

/// The longest `X-Request-Id` echoed; a longer one is replaced by the
/// trace's own id.
const MAX_REQUEST_ID_BYTES: usize = 256;
/// The model alias a handler served, for metric labels. Only configured
/// aliases are ever set, so the label's cardinality stays bounded.
#[derive(Clone, Debug)]
pub struct ModelLabel(pub String);

/// The provider that served the request.
#[derive(Clone, Debug)]
pub struct ProviderLabel(pub String);

pub async fn observe(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let ctx = single_header(req.headers(), "traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::from_traceparent)
        .unwrap_or_else(TraceContext::new_root);
    // Echoed as given, unless empty, too long to be an id (a header is not
    // a place to send a client kilobytes back), or not visible ASCII (which
    // could not be logged as it was sent); then one naming the trace.
    let request_id_header = req
        .headers()
        .get("x-request-id")
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_BYTES
                && v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b))
        })
        .cloned();
    // Logged in the access line, to find a client's request by its own id.
    let request_id = request_id_header.as_ref().and_then(|v| v.to_str().ok());
    let anthropic = Family::of_request(req.uri().path(), req.headers()) == Family::Anthropic;
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = req.method().clone();
    let trace_id = ctx.trace_id();
    let span =
        tracing::info_span!("request", trace_id = %trace_id, method = %method, route = %route);
    req.extensions_mut().insert(ctx);
    req.extensions_mut().insert(started);

    // Authentication and limits run here rather than as middleware of their
    // own: one middleware layer per request instead of three.
    let unanswered = Unanswered {
        state: &state,
        route,
        span: &span,
        started,
        request_id,
    };
    let mut resp = async {
        if let Some(refused) = unreadable_target(&req) {
            return refused;
        }
        match crate::auth::admit(&state, req).await {
            Ok(req) => crate::limit::rate_limit(&state, req, next).await,
            Err(refused) => refused,
        }
    }
    .instrument(span.clone())
    .await;
    unanswered.answered();

    let status = resp.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    let model = resp
        .extensions()
        .get::<ModelLabel>()
        .map_or("", |m| m.0.as_str());
    count_request(&state, route, model, status, elapsed);

    let provider = resp
        .extensions()
        .get::<ProviderLabel>()
        .map(|p| p.0.as_str());
    let latency_ms = elapsed * 1000.0;
    match resp.extensions().get::<ErrorDetail>() {
        Some(detail) if status >= 500 => {
            tracing::error!(parent: &span, status, latency_ms, model, provider, request_id, error = %detail.0, "request failed")
        }
        Some(detail) => {
            tracing::warn!(parent: &span, status, latency_ms, model, provider, request_id, error = %detail.0, "request refused")
        }
        None => {
            tracing::info!(parent: &span, status, latency_ms, model, provider, request_id, "request")
        }
    }

    let headers = resp.headers_mut();
    security_headers(headers, state.inner.security.hsts);
    if let Ok(v) = HeaderValue::from_str(&ctx.traceparent()) {
        headers.insert("traceparent", v);
    }
    // The client's request id, else one naming the trace: the SDKs expose it
    // (`_request_id`) for support requests and logs. Anthropic's read
    // `request-id`.
    let id = request_id_header.or_else(|| HeaderValue::from_str(&format!("req_{trace_id}")).ok());
    if let Some(id) = id {
        if anthropic {
            headers.insert("request-id", id.clone());
        }
        headers.insert("x-request-id", id);
    }
    resp
}

/// The value of a header sent exactly once. W3C Trace Context: a request
/// with several `traceparent` headers starts a new trace (its test suite's
/// `test_traceparent_duplicated`), rather than trusting the first.
fn single_header<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// The status counted and logged for a request whose client went away
/// before its answer (nginx's "client closed request").
const CLIENT_CLOSED: u16 = 499;

/// Counts and logs a request whose future is dropped before the handler
/// answered: hyper drops it when the client disconnects, and everything after
/// the handler's `.await` in [`observe`] never runs then. Only references and
/// an `Instant`, so arming it costs nothing on the path of a request that is
/// answered.
struct Unanswered<'a> {
    state: &'a crate::AppState,
    route: &'a str,
    span: &'a tracing::Span,
    started: Instant,
    request_id: Option<&'a str>,
}

impl Unanswered<'_> {
    /// The handler answered: [`observe`] counts and logs the request itself.
    fn answered(self) {
        // It holds only borrows and an `Instant`: forgetting it leaks nothing.
        std::mem::forget(self);
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        count_request(self.state, self.route, "", CLIENT_CLOSED, elapsed);
        let latency_ms = elapsed * 1000.0;
        let request_id = self.request_id;
        tracing::info!(parent: self.span, status = CLIENT_CLOSED, latency_ms, model = "", request_id, "request");
    }
}

/// One sample of the request counter and duration histogram.
fn count_request(state: &crate::AppState, route: &str, model: &str, status: u16, elapsed: f64) {
    let (count, duration) = state
        .inner
        .request_metrics
        .get(&[&route, &model, &status], || {
            let labels = [
                ("route", route.to_owned()),
                ("model", model.to_owned()),
                ("status", status.to_string()),
            ];
            (
                metrics::counter!("switchyard_http_requests_total", &labels),
                metrics::histogram!("switchyard_http_request_duration_seconds", &labels),
            )
        });
    count.increment(1);
    duration.record(elapsed);
}

/// A request whose path or query string, once its `%XX` escapes are
/// decoded, is not UTF-8 or holds a NUL: refused here in its API's error
/// shape (the router would answer a plain-text 400 for the path, and a NUL
/// reaching PostgreSQL is an error of the database, not of the request).
fn unreadable_target(req: &Request) -> Option<Response> {
    let uri = req.uri();
    let target = uri.path_and_query().map_or("", |pq| pq.as_str());
    if !target.contains('%') {
        return None; // undecoded text is UTF-8 (a `Uri` is ASCII) with no NUL
    }
    let decoded = percent_decode(target.as_bytes());
    if !decoded.contains(&0) && std::str::from_utf8(&decoded).is_ok() {
        return None;
    }
    let family = Family::of_request(uri.path(), req.headers());
    Some(crate::auth::family_error(
        family,
        axum::http::StatusCode::BAD_REQUEST,
        Some("invalid_url"),
        "The request's path or query string is not valid UTF-8, or holds a NUL (`%00`), once its %-escapes are decoded.",
    ))
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The security headers every response carries.
pub(crate) fn security_headers(headers: &mut axum::http::HeaderMap, hsts: bool) {
    use axum::http::header;
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), interest-cohort=()"),
    );
    if hsts {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
}
