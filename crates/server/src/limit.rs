//! Rate limits and monthly budgets, after authentication: each request is counted against its
//! subject (key, else user, else tenant) for the `global` class and for its
//! route's class (`chat`, `embeddings`, `admin`, …). Allowed responses carry
//! the IETF `RateLimit-Policy`/`RateLimit` headers of the tightest class; a
//! refusal is 429 with `Retry-After`, in the shape of the route's API.
//!
//! A limit set on the key wins over the tenant's configured one, which wins
//! over the class default (only an operator may set a key's above its
//! tenant's: `routes::keys`). Open development mode is not limited. When the
//! shared store (Redis) fails, requests are let through (counted in
//! `switchyard_rate_limit_errors_total` and logged): an outage of the limiter
//! must not become an outage of the gateway. Model routes then check the
//! key's and the tenant's monthly budget (429 `budget_exceeded`).

use std::str::FromStr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use switchyard_core::identity::{CredentialKind, Principal, Tenant};
use switchyard_core::limits::{Rate, RateLimitConfig};
use switchyard_engine::limits::{Decision, RateLimiter};
use switchyard_engine::TokenMeter;

use crate::auth::{family_error, Family};
use crate::AppState;

/// The limiter and its configuration.
pub struct Limits {
    pub config: RateLimitConfig,
    pub limiter: Arc<dyn RateLimiter>,
}

/// The class a route is counted in, besides `global`.
fn class_of(method: &axum::http::Method, path: &str) -> Option<&'static str> {
    let session_reply = method == axum::http::Method::POST
        && ((path.starts_with("/functions/") && path != "/functions/v1/embed")
            || (path.starts_with("/v1/sessions/") && path.ends_with("/messages")));
    if path == "/v1/chat/completions" || path == "/v1/messages" || session_reply {
        Some("chat")
    } else if path == "/v1/embeddings" || path == "/functions/v1/embed" {
        Some("embeddings")
    } else if path.starts_with("/v1/admin/") {
        Some("admin")
    } else if path.starts_with("/v1/bots") && method != axum::http::Method::GET {
        // Making and changing bots; reading them is only `global`'s (an
        // app listing its bots eleven times an hour was refused).
        Some("bots")
    } else if path.starts_with("/v1/orchestrate") {
        Some("orchestrate")
    } else {
        None
    }
}

/// The key's own rate, else the tenant's stored one, else the configured
/// tenant override or class default.
fn rate_for(
    config: &RateLimitConfig,
    who: &Principal,
    tenant: Option<&Tenant>,
    class: &str,
) -> Option<Rate> {
    let parse = |r: &String| Rate::from_str(r).ok();
    who.limits
        .rates
        .get(class)
        .and_then(parse)
        .or_else(|| tenant.and_then(|t| t.limits.get(class)).and_then(parse))
        .or_else(|| config.rate_for(&who.tenant_id, class))
}

/// The key's token-per-minute limit, if it has one (and limits are on).
pub(crate) fn token_meter(state: &AppState, who: &Principal) -> Option<TokenMeter> {
    let limits = state.inner.limits.as_ref().filter(|l| l.config.enabled)?;
    if who.kind == CredentialKind::OpenDev {
        return None;
    }
    let tpm = who.limits.tokens_per_minute?;
    let Some(limit) = switchyard_core::limits::TokenRate::per_minute(tpm) else {
        // Refused when keys are made or changed; a key stored before that
        // rule is not limited, and says so.
        tracing::warn!(
            tokens_per_minute = tpm,
            "a key's token limit is out of range and not applied"
        );
        return None;
    };
    Some(TokenMeter {
        limiter: limits.limiter.clone(),
        // The rate is part of the key, as for the request limits below.
        key: format!("{}:tokens:{}", who.subject(), limit.rate),
        limit,
    })
}

/// 429 for a spent token quota: its wait, and its state in the IETF
/// headers (policy `tokens`) and OpenAI's `-tokens` trio.
fn token_refusal(family: Family, meter: &TokenMeter, d: &Decision) -> Response {
    let wait = d.wait_for_one(meter.limit.rate);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp = family_error(
        family,
        StatusCode::TOO_MANY_REQUESTS,
        Some("rate_limit_exceeded"),
        &format!(
            "Token limit reached: {} tokens per minute. Try again in {secs} s.",
            meter.limit.per_minute
        ),
    );
    insert_headers(
        &mut resp,
        d.headers("tokens")
            .into_iter()
            .chain(d.openai_token_headers()),
    );
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, v);
    }
    metrics::counter!("switchyard_rate_limited_total", "class" => "tokens").increment(1);
    resp
}

fn set_headers(resp: &mut Response, d: &Decision, policy: &str) {
    insert_headers(
        resp,
        d.headers(policy).into_iter().chain(d.openai_headers()),
    );
}

pub(crate) fn insert_headers(
    resp: &mut Response,
    headers: impl IntoIterator<Item = (&'static str, String)>,
) {
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(HeaderName::from_static(name), v);
        }
    }
}

/// Counts the request against its limits and budgets, then runs the rest
/// of the stack; called by [`crate::observe::observe`] after authentication.
pub(crate) async fn rate_limit(state: &AppState, req: Request, next: Next) -> Response {
    let Some(who) = req.extensions().get::<Principal>() else {
        return next.run(req).await; // a public route
    };
    if who.kind == CredentialKind::OpenDev {
        return next.run(req).await;
    }
    let limits = state.inner.limits.as_ref().filter(|l| l.config.enabled);
    let path = req.uri().path();
    let method = req.method();
    let family = Family::of_request(path, req.headers());
    // A retired path (any path the configuration names) answers like the
    // chat function until its sunset, so it counts as chat, with its token
    // limit and budget.
    let class = class_of(method, path).or_else(|| {
        let retired = state.inner.retired_paths.iter().any(|r| r.path == path);
        (retired && method == axum::http::Method::POST).then_some("chat")
    });
    let subject = who.subject();
    let tenant = match (&state.inner.budgets, limits) {
        (Some(b), Some(_)) => match b.tenant(&who.tenant_id).await {
            Ok(t) => t,
            Err(e) => {
                // Never read before, so no last value to fall back on: the
                // configured rates apply until the store answers.
                metrics::counter!("switchyard_rate_limit_errors_total").increment(1);
                tracing::warn!(error = %e, "could not read the tenant's limits; using the configured ones");
                None
            }
        },
        _ => None,
    };
    // The token quota and the budgets are looked at first, without spending
    // anything: a request they refuse must not use up the request limits
    // (a client retrying a spent token quota would otherwise run out of its
    // global quota too).
    let mut tokens: Option<Decision> = None;
    // Set when the limiter has just failed: it is not asked again for this
    // request (each failure costs up to its timeout).
    let mut limiter_down = false;
    if matches!(class, Some("chat" | "embeddings")) {
        if let Some(meter) = token_meter(state, who) {
            // Cost 0: look, do not spend; the call's tokens are charged when
            // its usage is known.
            let limit = meter.limit;
            match meter.limiter.check(&meter.key, limit.rate, 0).await {
                // The figures in tokens, not in the rate's units.
                Ok(mut d) => {
                    let spent = d.remaining == 0;
                    d.limit = limit.tokens(limit.rate.count());
                    d.remaining = limit.tokens(d.remaining);
                    if spent {
                        return token_refusal(family, &meter, &d);
                    }
                    tokens = Some(d);
                }
                Err(e) => {
                    limiter_down = true;
                    metrics::counter!("switchyard_rate_limit_errors_total").increment(1);
                    tracing::warn!(error = %e, "token limit check failed; letting the request through");
                }
            }
        }
        if let Some(budgets) = &state.inner.budgets {
            if let Err(over) = budgets
                .check(
                    who,
                    switchyard_engine::identity::now_ms(),
                    req.extensions()
                        .get::<switchyard_core::trace::TraceContext>(),
                )
                .await
            {
                let mut resp = family_error(
                    family,
                    StatusCode::TOO_MANY_REQUESTS,
                    Some("budget_exceeded"),
                    &format!(
                        "The monthly budget of this {} (${:.2}) is spent (${:.2} so far this month).",
                        over.scope, over.budget_usd, over.spent_usd
                    ),
                );
                // The OpenAI and Anthropic SDKs retry a 429 unless told
                // not to; retrying a spent budget only multiplies refusals.
                resp.headers_mut().insert(
                    HeaderName::from_static("x-should-retry"),
                    HeaderValue::from_static("false"),
                );
                return resp;
            }
        }
    }
    let mut tightest: Option<(Decision, &'static str)> = None;
    if let Some(limits) = limits.filter(|_| !limiter_down) {
        // The global limit and the route's class, checked together: a
        // request refused by one takes nothing from the other.
        let mut classes: Vec<(&'static str, Rate, String)> = Vec::with_capacity(2);
        for class in ["global"].into_iter().chain(class) {
            if let Some(rate) = rate_for(&limits.config, who, tenant.as_deref(), class) {
                // The rate is part of the key: a changed rate (a key's or
                // tenant's limits, the defaults) starts from a full quota of
                // the new one, instead of a state kept under the old one,
                // which could hold the subject off for the old period (a
                // client at 2/hour raised to 100/min waited an hour).
                classes.push((class, rate, format!("{subject}:{class}:{rate}")));
            }
        }
        let checks: Vec<(&str, Rate)> = classes.iter().map(|(_, r, k)| (k.as_str(), *r)).collect();
        match limits.limiter.check_all(&checks, 1).await {
            Ok(decisions) => {
                let results = classes.iter().zip(decisions);
                // When both refuse, the longer wait is the true one: a
                // client told the shorter would be refused again.
                let refused = results
                    .clone()
                    .filter(|(_, d)| !d.allowed)
                    .max_by_key(|(_, d)| d.retry_after);
                if let Some(((class, rate, _), d)) = refused {
                    let mut resp = family_error(
                        family,
                        StatusCode::TOO_MANY_REQUESTS,
                        Some("rate_limit_exceeded"),
                        &format!(
                            "Rate limit reached for `{class}`: {rate}. Try again in {} s.",
                            d.retry_after
                                .map_or(1, |r| r.as_secs_f64().ceil() as u64)
                                .max(1)
                        ),
                    );
                    set_headers(&mut resp, &d, class);
                    metrics::counter!("switchyard_rate_limited_total", "class" => *class)
                        .increment(1);
                    return resp;
                }
                tightest = results
                    .map(|((class, _, _), d)| (d, *class))
                    .min_by_key(|(d, _)| d.remaining);
            }
            Err(e) => {
                metrics::counter!("switchyard_rate_limit_errors_total").increment(1);
                tracing::warn!(error = %e, code = e.code(), "rate limit check failed; letting the request through");
            }
        }
    }
    let mut resp = next.run(req).await;
    if let Some((d, class)) = tightest {
        set_headers(&mut resp, &d, class);
    }
    if let Some(d) = tokens {
        insert_headers(&mut resp, d.openai_token_headers());
    }
    resp
}
