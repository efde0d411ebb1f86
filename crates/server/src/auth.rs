//! Authentication and the first authorization gate, as one middleware:
//! every route but `/health`, `/ready` and `/metrics` needs a credential
//! (`Authorization: Bearer …`, or `x-api-key` as Anthropic's SDK sends it),
//! unless open development mode applies. The resulting [`Principal`] is put
//! in the request's extensions for handlers; `/v1/admin/*` needs an admin.
//!
//! A refusal answers in the shape of the API the route belongs to
//! (OpenAI's, Anthropic's or the native one), so every SDK raises its own
//! authentication error.

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use switchyard_core::identity::{Principal, Role};
use switchyard_engine::identity::AuthError;

use crate::error::ErrorDetail;
use crate::AppState;

/// Which API's error shape a path answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    OpenAi,
    Anthropic,
    Native,
}

impl Family {
    /// The family of a request: by its path, and for the model list, which
    /// both APIs share, by whether the client is Anthropic's (it sends
    /// `anthropic-version`).
    pub(crate) fn of_request(path: &str, headers: &axum::http::HeaderMap) -> Self {
        if path.starts_with("/v1/models") && headers.contains_key("anthropic-version") {
            return Family::Anthropic;
        }
        Self::of(path)
    }

    pub(crate) fn of(path: &str) -> Self {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Family::Anthropic
        } else if path.starts_with("/v1/admin/")
            || path.starts_with("/v1/sessions")
            || path.starts_with("/v1/bots")
            || path.starts_with("/v1/traces")
            || path.starts_with("/v1/users/")
            || path.starts_with("/functions/")
        {
            Family::Native
        } else {
            Family::OpenAi
        }
    }
}

/// An error in the family's shape.
pub(crate) fn family_error(
    family: Family,
    status: StatusCode,
    code: Option<&str>,
    message: &str,
) -> Response {
    let body = match family {
        Family::OpenAi => json!({"error": {
            "message": message,
            "type": if status == StatusCode::TOO_MANY_REQUESTS { "requests" } else { "invalid_request_error" },
            "param": null,
            "code": code,
        }}),
        Family::Anthropic => json!({"type": "error", "error": {
            "type": switchyard_core::anthropic::error_type_for_status(status.as_u16()),
            "message": message,
        }}),
        Family::Native => json!({"error": {
            "code": code.unwrap_or("error"),
            "message": message,
            "details": {},
        }}),
    };
    (status, axum::Json(body)).into_response()
}

fn is_public(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

fn credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        // The scheme is case-insensitive (RFC 9110); `Bearer` with nothing
        // after it is no credential, not a wrong one.
        let (scheme, rest) = v.split_once([' ', '\t']).unwrap_or((v, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(rest.trim());
        }
        return Some(v);
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Open development mode serves whoever reaches the loopback address as an
/// admin, and a web page the developer opens reaches it too: a cross-site
/// request needs no preflight when its body is `text/plain`, and DNS
/// rebinding gives a page a name that resolves to 127.0.0.1. So in that mode
/// a request must name a loopback host (`Host`; a rebound name is not one)
/// and, if it comes from a page (`Origin`), a page on a loopback host or one
/// of `security.cors_origins`. Clients outside a browser send no `Origin`
/// and `127.0.0.1` or `localhost` as `Host`: nothing changes for them.
fn open_dev_refusal(state: &AppState, headers: &axum::http::HeaderMap) -> Option<&'static str> {
    if let Some(host) = headers.get(axum::http::header::HOST) {
        let host = host.to_str().unwrap_or_default();
        if !is_loopback_host(host) {
            return Some(
                "Open development mode answers only requests to a loopback host (127.0.0.1, [::1] or localhost). Create an API key to serve other names.",
            );
        }
    }
    if let Some(origin) = headers.get(axum::http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let allowed = origin.split_once("://").is_some_and(|(scheme, host)| {
            matches!(scheme, "http" | "https") && is_loopback_host(host)
        }) || state
            .inner
            .security
            .cors_origins
            .iter()
            .any(|o| o == origin);
        if !allowed {
            return Some(
                "Open development mode answers no request from a web page of another site (`Origin`). Create an API key, or list the page's origin in security.cors_origins.",
            );
        }
    }
    None
}

/// `localhost` (or a name under it), an IPv4 loopback address or `[::1]`,
/// with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let Some((name, _)) = switchyard_core::config::split_host_port(host) else {
        return false;
    };
    if let Some(v6) = name.strip_prefix('[') {
        return v6
            .strip_suffix(']')
            .and_then(|v6| v6.parse::<std::net::Ipv6Addr>().ok())
            .is_some_and(|ip| ip.is_loopback());
    }
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Authenticates and authorises a request: `Ok` with the [`Principal`] in its
/// extensions (public routes pass unchanged), or the refusal to send.
/// Called by [`crate::observe::observe`], inside the request span.
pub(crate) async fn admit(state: &AppState, req: Request) -> Result<Request, Response> {
    let path = req.uri().path();
    if is_public(path) {
        return Ok(req);
    }
    let family = Family::of_request(path, req.headers());
    let identity = state.identity();
    // In open development mode no key exists, so no presented credential
    // could be valid: the placeholder an SDK insists on ("unused") is ignored.
    let mut principal = if identity.open_dev() {
        if let Some(refusal) = open_dev_refusal(state, req.headers()) {
            return Err(family_error(
                family,
                StatusCode::FORBIDDEN,
                Some("open_dev_cross_site"),
                refusal,
            ));
        }
        Principal::open_dev()
    } else {
        match credential(req.headers()).filter(|c| !c.is_empty()) {
            Some(c) => {
                let ip = req
                    .extensions()
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                    .map(|ci| client_ip(state, ci.0.ip(), req.headers()));
                if let Some(ip) = ip {
                    if let Some(blocked) = failures_blocked(state, ip, c).await {
                        return Err(blocked_response(family, blocked));
                    }
                }
                match identity.authenticate(c).await {
                    Ok(p) => p,
                    Err(e) => {
                        if let (Some(ip), false) = (ip, e.is_unavailable()) {
                            count_failure(state, ip).await;
                        }
                        return Err(refuse(family, &e));
                    }
                }
            }
            None => return Err(refuse(family, &AuthError::Missing)),
        }
    };
    if let Some(user) = req.headers().get(state.user_header()) {
        let user = user.to_str().map(str::trim).unwrap_or_default();
        if principal.role == Role::User {
            return Err(family_error(
                family,
                StatusCode::FORBIDDEN,
                Some("insufficient_permissions"),
                &format!(
                    "Only a service or admin key may act for a user (`{}`).",
                    state.user_header()
                ),
            ));
        }
        if !switchyard_core::identity::valid_user_id(user) {
            return Err(family_error(
                family,
                StatusCode::BAD_REQUEST,
                Some("invalid_user"),
                &format!(
                    "`{}` must name a user (1 to 256 bytes).",
                    state.user_header()
                ),
            ));
        }
        principal.user_id = Some(user.to_owned());
    }
    if path.starts_with("/v1/admin/") && principal.role != Role::Admin {
        return Err(family_error(
            family,
            StatusCode::FORBIDDEN,
            Some("insufficient_permissions"),
            "This route needs an admin key.",
        ));
    }
    let require = principal.require_signature || req.headers().contains_key("x-signature");
    let mut req = req;
    if require {
        if let Some(key_id) = principal.key_id.clone() {
            req = match check_signature(state, family, &principal.tenant_id, &key_id, req).await {
                Ok(r) => r,
                Err(resp) => return Err(resp),
            };
        }
    }
    req.extensions_mut().insert(principal);
    Ok(req)
}

/// Verifies `X-Timestamp`/`X-Signature` over the buffered body, then hands
/// the request on with that body.
async fn check_signature(
    state: &AppState,
    family: Family,
    tenant: &str,
    key_id: &str,
    req: Request,
) -> Result<Request, Response> {
    use switchyard_engine::signing::{self, SignError};
    let (parts, body) = req.into_parts();
    let bytes = state
        .read_body(&parts.headers, body)
        .await
        .map_err(|e| family_error(family, e.status, e.body.code.as_deref(), &e.body.message))?;
    let refuse = |e: SignError| {
        let status = if e == SignError::Unavailable {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::UNAUTHORIZED
        };
        family_error(
            family,
            status,
            Some(e.code()),
            &format!("Request signature refused: {e}."),
        )
    };
    let secrets = state
        .identity()
        .signing_secrets(tenant, key_id)
        .await
        .map_err(|_| refuse(SignError::Unavailable))?;
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let now = switchyard_engine::identity::now_ms().div_euclid(1000);
    let (sig, ts) = signing::verify(
        &secrets,
        header("x-timestamp"),
        header("x-signature"),
        parts.method.as_str(),
        target,
        &bytes,
        now,
    )
    .map_err(refuse)?;
    if !state
        .inner
        .replay
        .first_use(&sig, ts, now)
        .await
        .map_err(refuse)?
    {
        return Err(refuse(SignError::Replayed));
    }
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

fn refuse(family: Family, e: &AuthError) -> Response {
    let mut resp = match e {
        AuthError::Missing => match family {
            Family::OpenAi => family_error(
                family,
                StatusCode::UNAUTHORIZED,
                None,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            ),
            _ => family_error(
                family,
                StatusCode::UNAUTHORIZED,
                Some(e.code()),
                "No credential: send `Authorization: Bearer <key or token>` or `x-api-key: <key>`.",
            ),
        },
        AuthError::InvalidKey => family_error(
            family,
            StatusCode::UNAUTHORIZED,
            Some(e.code()),
            "Incorrect API key provided. It may be mistyped, revoked or expired.",
        ),
        e if e.is_unavailable() => family_error(
            family,
            StatusCode::SERVICE_UNAVAILABLE,
            Some("auth_unavailable"),
            "The server could not check the credential; try again shortly.",
        ),
        AuthError::Jwt(j) => family_error(
            family,
            StatusCode::UNAUTHORIZED,
            Some(j.code()),
            &format!("The token was refused: {j}."),
        ),
        AuthError::Store(_) => family_error(
            family,
            StatusCode::SERVICE_UNAVAILABLE,
            Some("auth_unavailable"),
            "The server could not check the credential; try again shortly.",
        ),
    };
    if e.is_unavailable() {
        resp.extensions_mut().insert(ErrorDetail(e.to_string()));
    }
    resp
}

/// The client's address: the peer, or, when the peer is one of
/// `server.trusted_proxies`, what their `X-Forwarded-For` says.
fn client_ip(
    state: &AppState,
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
) -> std::net::IpAddr {
    let trusted = &state.inner.trusted_proxies;
    if trusted.is_empty() {
        return peer;
    }
    switchyard_core::net::client_ip(peer, forwarded_for(headers), trusted)
}

/// Every `X-Forwarded-For` entry, in order. A line that is not text is an
/// entry that is not an address (it stops the walk), never skipped:
/// skipping it would join the lines around it.
fn forwarded_for(headers: &axum::http::HeaderMap) -> impl DoubleEndedIterator<Item = &str> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("unreadable"))
        .flat_map(|v| v.split(','))
}

/// Failed authentications are counted per IPv4 address, and per /64 for
/// IPv6: one client usually holds a whole /64, and counting each of its
/// 2^64 addresses apart would give it that many allowances.
fn failure_key(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => format!("authfail:{v4}"),
        std::net::IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("authfail:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The state of an address that has used up its failed authentications,
/// while it has. A credential this instance verified within the last day is
/// never refused so (it goes on to be checked, and a revoked one fails
/// there): someone guessing from the same address (a shared NAT, an office)
/// must not lock out the clients that already hold a good key; a credential
/// new to this instance waits.
///
/// Without Redis the count is this process's. With Redis it is shared by
/// every instance, so that spreading guesses over instances gains nothing:
/// a credential this instance has not verified recently (any guess) is let
/// through to the real check only if the shared count allows it. A cached
/// credential asks only the local copy, which holds every refusal this
/// instance has seen from Redis: the cache hit on the path of every
/// ordinary request stays free of a round trip.
async fn failures_blocked(
    state: &AppState,
    ip: std::net::IpAddr,
    credential: &str,
) -> Option<Blocked> {
    let limits = state.inner.limits.as_ref().filter(|l| l.config.enabled)?;
    let rate = limits.config.auth_failures;
    let key = failure_key(ip);
    let local = &state.inner.auth_failures;
    let d = local.check_now(&key, rate, 0).ok()?;
    if d.remaining == 0 {
        if state.identity().is_known(credential) {
            return None;
        }
        return Some(Blocked(rate, d));
    }
    if limits.config.redis_url.is_none() || state.identity().is_cached(credential) {
        return None;
    }
    match limits.limiter.check(&key, rate, 0).await {
        Ok(d) if d.remaining == 0 => {
            local.hold(&key, d.reset_after);
            (!state.identity().is_known(credential)).then_some(Blocked(rate, d))
        }
        Ok(_) => None,
        Err(e) => {
            shared_failure_error(&e);
            None
        }
    }
}

/// Counts a failed authentication; the one that uses up the allowance is
/// written to the audit log — once per address and window of the
/// `auth_failures` rate on each instance, not again for every guess that
/// the refilling allowance lets through afterwards.
/// With Redis the failure is counted there (the local count when Redis
/// fails), and a used-up allowance is copied to the local limiter.
async fn count_failure(state: &AppState, ip: std::net::IpAddr) {
    let Some(limits) = state.inner.limits.as_ref().filter(|l| l.config.enabled) else {
        return;
    };
    let rate = limits.config.auth_failures;
    let key = failure_key(ip);
    let local = &state.inner.auth_failures;
    let shared = match limits.config.redis_url {
        Some(_) => match limits.limiter.check(&key, rate, 1).await {
            Ok(d) => Some(d),
            Err(e) => {
                shared_failure_error(&e);
                None
            }
        },
        None => None,
    };
    let d = match shared {
        Some(d) => {
            if d.remaining == 0 {
                local.hold(&key, d.reset_after);
            }
            d
        }
        None => match local.check_now(&key, rate, 1) {
            Ok(d) => d,
            Err(_) => return,
        },
    };
    metrics::counter!("switchyard_auth_failures_total").increment(1);
    let first_in_window = || {
        let once = switchyard_core::limits::Rate::new(1, rate.period());
        once.is_ok_and(|once| {
            local
                .check_now(&format!("audited:{key}"), once, 1)
                .is_ok_and(|d| d.allowed)
        })
    };
    if d.allowed && d.remaining == 0 && first_in_window() {
        let actor = switchyard_engine::identity::Actor {
            label: format!("ip:{ip}"),
            tenant_id: switchyard_engine::identity::DEFAULT_TENANT.into(),
            role: Role::User,
            trace_id: None,
        };
        state
            .identity()
            .audit(
                &actor,
                switchyard_engine::identity::DEFAULT_TENANT,
                "auth.failures",
                Some(format!("ip:{ip}")),
                json!({"failures": rate.count(), "window_secs": rate.window_secs(), "blocked": true}),
            )
            .await;
    }
}

/// Redis did not answer a check of the failure count: the request goes on
/// (as for every limit, see [`crate::limit`]) and the outage is counted.
fn shared_failure_error(e: &switchyard_engine::limits::LimitError) {
    metrics::counter!("switchyard_rate_limit_errors_total").increment(1);
    tracing::warn!(error = %e, code = e.code(), "could not check the shared count of failed authentications");
}

/// An address's failure allowance, used up: its rate and a cost-0 look.
struct Blocked(
    switchyard_core::limits::Rate,
    switchyard_engine::limits::Decision,
);

/// 429 for an address out of failed authentications: the wait until one
/// more is allowed (the quota regains one every T: `TAT + T − τ − now`), and
/// the allowance in the IETF headers (policy `auth_failures`).
fn blocked_response(family: Family, Blocked(rate, d): Blocked) -> Response {
    let wait = d.wait_for_one(rate);
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut resp = family_error(
        family,
        StatusCode::TOO_MANY_REQUESTS,
        Some("too_many_auth_failures"),
        &format!("Too many failed authentications from this address; try again in {secs} s."),
    );
    crate::limit::insert_headers(&mut resp, d.headers("auth_failures"));
    if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::{failure_key, forwarded_for, is_loopback_host};

    /// A client that adds a line the proxy cannot read as text, after its
    /// own forged one, does not get the forged one taken: the unreadable
    /// line stops the walk at the last trusted hop.
    #[test]
    fn an_unreadable_forwarded_line_is_never_skipped() {
        let mut headers = axum::http::HeaderMap::new();
        headers.append("x-forwarded-for", "6.6.6.6".parse().unwrap());
        headers.append(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\x80, 203.0.113.7").unwrap(),
        );
        let trusted: Vec<switchyard_core::net::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let entries: Vec<&str> = forwarded_for(&headers).collect();
        assert_eq!(entries, ["6.6.6.6", "unreadable"]);
        let peer = "10.0.0.5".parse().unwrap();
        assert_eq!(
            switchyard_core::net::client_ip(peer, forwarded_for(&headers), &trusted),
            peer
        );
    }

    #[test]
    fn loopback_hosts_are_told_from_other_names() {
        for yes in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:80",
            "localhost",
            "LocalHost:8080",
            "app.localhost:3000",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(yes), "{yes}");
        }
        for no in [
            "rebind.evil.example",
            "rebind.evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:8080",
            "[::2]:8080",
            "[::1]x",
            "127.0.0.1:",
            "127.0.0.1:80a",
            "localhost:8080:1",
            "",
        ] {
            assert!(!is_loopback_host(no), "{no}");
        }
    }

    #[test]
    fn failures_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let key = |ip: &str| failure_key(ip.parse().unwrap());
        assert_eq!(key("192.0.2.7"), "authfail:192.0.2.7");
        // An IPv4 client reaching a dual-stack socket is still itself.
        assert_eq!(key("::ffff:192.0.2.7"), "authfail:192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "authfail:2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff:1:2:3"), key("2001:db8:1:2::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
