//! `/v1/admin/keys`, `/v1/admin/tenants`, `/v1/admin/auth-cache` and
//! `/v1/admin/audit`: identity management over HTTP, with the same rules as
//! the CLI (they are enforced in the engine). Errors use the native shape
//! `{"error":{"code","message","details"}}`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_core::identity::{ApiKeyRecord, AuditQuery, KeyLimits, Principal, Role, Tenant};
use switchyard_core::trace::TraceContext;
use switchyard_engine::identity::{now_ms, Actor, IdentityError, Invalidate, KeyUpdate, NewKey};

use crate::error::ErrorDetail;
use crate::AppState;

/// A native error response.
pub(crate) fn native(status: StatusCode, code: &str, message: &str, details: Value) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message, "details": details}})),
    )
        .into_response()
}

/// A query string that does not parse: a native 400 with axum's reason.
pub(crate) fn query_error(e: QueryRejection) -> Response {
    native(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &format!("Invalid query string: {}", e.body_text()),
        json!({}),
    )
}

/// A query string read like axum's `Query`, but refused with the native
/// 400 ([`query_error`]) instead of axum's plain-text one.
pub struct NativeQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for NativeQuery<T>
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| NativeQuery(q))
            .map_err(query_error)
    }
}

fn identity_error(e: IdentityError) -> Response {
    match e {
        IdentityError::Invalid { field, message } => native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &message,
            json!({"field": field}),
        ),
        IdentityError::Forbidden(m) => native(StatusCode::FORBIDDEN, "forbidden", m, json!({})),
        IdentityError::NotFound(what) => native(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No such {what}."),
            json!({}),
        ),
        IdentityError::Conflict(m) => native(StatusCode::CONFLICT, "conflict", &m, json!({})),
        IdentityError::Store(s) => {
            let mut r = native(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "The server had an error while processing your request.",
                json!({}),
            );
            r.extensions_mut().insert(ErrorDetail(s.to_string()));
            r
        }
    }
}

/// Parses a JSON body into `T`, naming the offending field on failure.
async fn parse<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<T, Response> {
    native_body(state, headers, body).await.map(|(t, _)| t)
}

/// Reads a native JSON body under the body limit and parses it, returning
/// the bytes too (idempotency hashes them); refusals in the native shape.
pub(crate) async fn native_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(T, Bytes), Response> {
    let bytes: Bytes = state.read_body(headers, body).await.map_err(|e| {
        native(
            e.status,
            e.body.code.as_deref().unwrap_or("invalid_request"),
            &e.body.message,
            json!({}),
        )
    })?;
    let parsed = parse_json(&bytes)?;
    Ok((parsed, bytes))
}

/// Parses JSON into `T`; a failure is a native 400 naming the field.
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, on the cold path"
)]
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    // Every native body is an object: an array would be read into a
    // struct's fields by position (`["name", "admin"]` a key's name and
    // role).
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The body must be a JSON object.",
            json!({"field": null}),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner();
        // A missing field is reported at its parent (`.` at the top):
        // name the field itself.
        let text = inner.to_string();
        if let Some(name) = text
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name)
        {
            path = if path == "." {
                name.to_owned()
            } else {
                format!("{path}.{name}")
            };
        }
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("The body is not valid JSON: {inner}")
        } else {
            format!("Invalid field `{path}`: {inner}")
        };
        native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &message,
            json!({"field": (path != ".").then_some(path)}),
        )
    })
}

/// A 400 naming the first of a key's limits that cannot be held: a rate
/// that does not parse, a token limit of 0 or above what a rate can count
/// (which would otherwise switch the limit off), a budget that is not an
/// amount of dollars; a 400 too for a budget on a server that keeps no
/// usage rows, from which budgets are summed.
fn validate_key_limits(state: &AppState, limits: &KeyLimits) -> Option<Response> {
    if let Some(resp) = validate_rates("limits.rates", &limits.rates) {
        return Some(resp);
    }
    // Whatever the token limiter can hold (`TokenRate`'s own rule).
    let max = switchyard_core::limits::MAX_TOKENS_PER_MINUTE;
    let unusable = |t: &u64| switchyard_core::limits::TokenRate::per_minute(*t).is_none();
    if let Some(tpm) = limits.tokens_per_minute.filter(unusable) {
        return Some(native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!(
                "Invalid field `limits.tokens_per_minute`: {tpm}; a token limit is 1 to {max} tokens a minute (leave it out for none)."
            ),
            json!({"field": "limits.tokens_per_minute"}),
        ));
    }
    budget_field(
        state,
        "limits.monthly_budget_usd",
        limits.monthly_budget_usd,
    )
}

/// A 400 for a monthly budget that is not a number of dollars, or that
/// could not be enforced because this server keeps no usage rows.
fn budget_field(state: &AppState, field: &str, budget: Option<f64>) -> Option<Response> {
    let budget = budget?;
    if !budget.is_finite() || budget < 0.0 {
        return Some(native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("Invalid field `{field}`: a budget is a number of dollars, zero or more."),
            json!({"field": field}),
        ));
    }
    if !state.gateway().usage_writer().enabled() {
        return Some(native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!(
                "Invalid field `{field}`: budgets are summed from usage rows, and this server keeps none (`[usage] enabled = false`)."
            ),
            json!({"field": field}),
        ));
    }
    None
}

/// A 400 naming the first rate in `rates` that does not parse (`20/min`, ...)
/// or is set on a class that does not exist.
fn validate_rates(
    prefix: &str,
    rates: &std::collections::BTreeMap<String, String>,
) -> Option<Response> {
    for (class, rate) in rates {
        let checked = switchyard_core::limits::check_class(class).and_then(|()| {
            rate.parse::<switchyard_core::limits::Rate>()
                .map_err(|e| e.to_string())
        });
        if let Err(e) = checked {
            let field = format!("{prefix}.{class}");
            return Some(native(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("Invalid field `{field}`: {e}"),
                json!({"field": field}),
            ));
        }
    }
    None
}

/// A 403 when a tenant's own admin (not an operator) gives a key a rate
/// above what the tenant gets: the tenant's stored rate for that class, else
/// the configured one. An operator's limits on a tenant are a ceiling its
/// admins cannot lift by minting keys that carry their own.
async fn rates_within_tenant(
    state: &AppState,
    who: &Principal,
    limits: &KeyLimits,
) -> Option<Response> {
    let actor = Actor::from_principal(who, None);
    let config = &state
        .inner
        .limits
        .as_ref()
        .filter(|l| l.config.enabled)?
        .config;
    if actor.is_operator() || limits.rates.is_empty() {
        return None;
    }
    let tenant = state
        .identity()
        .get_tenant(&who.tenant_id)
        .await
        .ok()
        .flatten();
    for (class, rate) in &limits.rates {
        let Ok(asked) = rate.parse::<switchyard_core::limits::Rate>() else {
            continue; // refused by validate_rates
        };
        let ceiling = tenant
            .as_ref()
            .and_then(|t| t.limits.get(class))
            .and_then(|r| r.parse::<switchyard_core::limits::Rate>().ok())
            .or_else(|| config.rate_for(&who.tenant_id, class));
        let Some(ceiling) = ceiling else { continue };
        if asked.count() > ceiling.count()
            || asked.emission_interval_us() < ceiling.emission_interval_us()
        {
            let field = format!("limits.rates.{class}");
            return Some(native(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!(
                    "`{field}` is {asked}, above this tenant's {ceiling}: only an operator (an admin of tenant `default`) may give a key more than its tenant."
                ),
                json!({"field": field}),
            ));
        }
    }
    None
}

/// A JSON body of the native API, read under the body limit and parsed
/// naming the offending field; refusals in the native error shape.
pub struct NativeJson<T>(pub T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<AppState> for NativeJson<T> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &AppState) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        parse(state, &parts.headers, body).await.map(NativeJson)
    }
}

fn actor(p: &Principal, ctx: &TraceContext) -> Actor {
    Actor::from_principal(p, Some(ctx.trace_id()))
}

fn secs(ms: Option<i64>) -> Option<i64> {
    ms.map(|m| m.div_euclid(1000))
}

/// A key as listed: never the key, its hash or its signing secrets.
fn key_json(k: &ApiKeyRecord) -> Value {
    json!({
        "id": k.id,
        "object": "api_key",
        "name": k.name,
        "role": k.role,
        "tenant_id": k.tenant_id,
        "user_id": k.user_id,
        "prefix": k.prefix,
        "limits": k.limits,
        "require_signature": k.require_signature,
        "created_at": secs(Some(k.created_at_ms)),
        "expires_at": secs(k.expires_at_ms),
        "revoked_at": secs(k.revoked_at_ms),
        "active": k.is_active(now_ms()),
        "created_by": k.created_by,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: String,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    expires_at: Option<i64>,
    #[serde(default)]
    limits: KeyLimits,
    #[serde(default)]
    require_signature: bool,
}

pub async fn create_key(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(q): NativeQuery<TenantParam>,
    NativeJson(mut req): NativeJson<CreateKey>,
) -> Response {
    match one_tenant(q.tenant_id, req.tenant_id.take()) {
        Ok(t) => req.tenant_id = t,
        Err(resp) => return *resp,
    }
    if let Some(resp) = validate_key_limits(&state, &req.limits) {
        return resp;
    }
    if let Some(resp) = rates_within_tenant(&state, &who, &req.limits).await {
        return resp;
    }
    let new = NewKey {
        name: req.name,
        role: req.role,
        tenant_id: req.tenant_id,
        user_id: req.user_id,
        expires_at_ms: req.expires_at.map(|s| s.saturating_mul(1000)),
        limits: req.limits,
        require_signature: req.require_signature,
    };
    match state.identity().create_key(&actor(&who, &ctx), new).await {
        Ok(created) => {
            let mut body = key_json(&created.record);
            body["key"] = json!(created.key);
            if let Some(s) = created.signing_secret {
                body["signing_secret"] = json!(s);
            }
            (StatusCode::CREATED, Json(body)).into_response()
        }
        Err(e) => identity_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantParam {
    tenant_id: Option<String>,
}

/// The query of a route that takes none: any parameter is refused (400),
/// so that a misspelt one is not silently ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// The tenant a request names in its query or its body (either, the same
/// in both, or neither): a `?tenant_id=` that the body's route ignored made
/// a key in the caller's own tenant, an operator key when the caller was one.
fn one_tenant(
    query: Option<String>,
    body: Option<String>,
) -> Result<Option<String>, Box<Response>> {
    match (query, body) {
        (Some(q), Some(b)) if q != b => Err(Box::new(native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("The query names tenant `{q}` and the body `{b}`: name one."),
            json!({"field": "tenant_id"}),
        ))),
        (q, b) => Ok(q.or(b)),
    }
}

pub async fn list_keys(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(q): NativeQuery<TenantParam>,
) -> Response {
    match state
        .identity()
        .list_keys(&actor(&who, &ctx), q.tenant_id.as_deref())
        .await
    {
        Ok(keys) => {
            Json(json!({"object": "list", "data": keys.iter().map(key_json).collect::<Vec<_>>()}))
                .into_response()
        }
        Err(e) => identity_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    limits: Option<KeyLimits>,
}

/// `PATCH /v1/admin/keys/{id}`: name, role or limits.
pub async fn update_key(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    NativeQuery(q): NativeQuery<TenantParam>,
    NativeJson(req): NativeJson<UpdateKey>,
) -> Response {
    if let Some(l) = &req.limits {
        if let Some(resp) = validate_key_limits(&state, l) {
            return resp;
        }
        if let Some(resp) = rates_within_tenant(&state, &who, l).await {
            return resp;
        }
    }
    let update = KeyUpdate {
        name: req.name,
        role: req.role,
        limits: req.limits,
    };
    match state
        .identity()
        .update_key(&actor(&who, &ctx), q.tenant_id.as_deref(), &id, update)
        .await
    {
        Ok(k) => Json(key_json(&k)).into_response(),
        Err(e) => identity_error(e),
    }
}

pub async fn revoke_key(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    NativeQuery(q): NativeQuery<TenantParam>,
) -> Response {
    match state
        .identity()
        .revoke_key(&actor(&who, &ctx), q.tenant_id.as_deref(), &id)
        .await
    {
        Ok(k) => Json(key_json(&k)).into_response(),
        Err(e) => identity_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    monthly_budget_usd: Option<f64>,
    #[serde(default)]
    limits: std::collections::BTreeMap<String, String>,
}

fn tenant_json(t: &Tenant) -> Value {
    json!({"id": t.id, "object": "tenant", "name": t.name, "monthly_budget_usd": t.monthly_budget_usd,
           "limits": t.limits, "created_at": secs(Some(t.created_at_ms))})
}

pub async fn create_tenant(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(NoParams {}): NativeQuery<NoParams>,
    NativeJson(req): NativeJson<CreateTenant>,
) -> Response {
    if let Some(resp) = validate_rates("limits", &req.limits) {
        return resp;
    }
    if let Some(resp) = budget_field(&state, "monthly_budget_usd", req.monthly_budget_usd) {
        return resp;
    }
    let tenant = Tenant {
        name: req.name.unwrap_or_else(|| req.id.clone()),
        id: req.id,
        monthly_budget_usd: req.monthly_budget_usd,
        limits: req.limits,
        created_at_ms: now_ms(),
    };
    match state
        .identity()
        .create_tenant(&actor(&who, &ctx), tenant)
        .await
    {
        Ok(t) => (StatusCode::CREATED, Json(tenant_json(&t))).into_response(),
        Err(e) => identity_error(e),
    }
}

/// A change to a tenant: only the fields given change; a `null` budget
/// removes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    monthly_budget_usd: Option<Option<f64>>,
    #[serde(default)]
    limits: Option<std::collections::BTreeMap<String, String>>,
}

/// Present and possibly `null`, or absent.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /v1/admin/tenants/{id}`: name, monthly budget or rate limits.
pub async fn update_tenant(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    NativeQuery(NoParams {}): NativeQuery<NoParams>,
    NativeJson(req): NativeJson<UpdateTenant>,
) -> Response {
    if let Some(limits) = &req.limits {
        if let Some(resp) = validate_rates("limits", limits) {
            return resp;
        }
    }
    if let Some(resp) = budget_field(
        &state,
        "monthly_budget_usd",
        req.monthly_budget_usd.flatten(),
    ) {
        return resp;
    }
    let change = switchyard_engine::identity::TenantUpdate {
        name: req.name,
        monthly_budget_usd: req.monthly_budget_usd,
        limits: req.limits,
    };
    match state
        .identity()
        .update_tenant(&actor(&who, &ctx), &id, change)
        .await
    {
        Ok(t) => {
            if let Some(b) = &state.inner.budgets {
                b.forget_tenant(&t.id);
            }
            Json(tenant_json(&t)).into_response()
        }
        Err(e) => identity_error(e),
    }
}

pub async fn list_tenants(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(NoParams {}): NativeQuery<NoParams>,
) -> Response {
    match state.identity().list_tenants(&actor(&who, &ctx)).await {
        Ok(ts) => {
            Json(json!({"object": "list", "data": ts.iter().map(tenant_json).collect::<Vec<_>>()}))
                .into_response()
        }
        Err(e) => identity_error(e),
    }
}

pub async fn auth_cache(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(NoParams {}): NativeQuery<NoParams>,
) -> Response {
    match state.identity().cache_stats(&actor(&who, &ctx)) {
        Ok(stats) => Json(json!(stats)).into_response(),
        Err(e) => identity_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidateBody {
    #[serde(default)]
    all: bool,
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    credential: Option<String>,
}

pub async fn invalidate_auth_cache(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(NoParams {}): NativeQuery<NoParams>,
    NativeJson(req): NativeJson<InvalidateBody>,
) -> Response {
    let what = match (req.all, req.key_id, req.credential) {
        (true, None, None) => Invalidate::All,
        (false, Some(id), None) => Invalidate::Key(id),
        (false, None, Some(c)) => Invalidate::Credential(SecretString::from(c)),
        _ => {
            return native(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Give exactly one of `all: true`, `key_id` or `credential`.",
                json!({}),
            )
        }
    };
    match state.identity().invalidate(&actor(&who, &ctx), what).await {
        Ok(n) => Json(json!({"dropped": n})).into_response(),
        Err(e) => identity_error(e),
    }
}

/// The audit listing's query. Numbers are read as text and parsed here, so
/// a malformed one is a native 400 naming it rather than axum's plain-text
/// rejection.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    tenant_id: Option<String>,
    action: Option<String>,
    actor: Option<String>,
    /// Unix seconds, inclusive.
    since: Option<String>,
    /// Unix seconds, exclusive.
    until: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

const MAX_AUDIT_PAGE: u32 = 500;

/// `field` parsed as a `T`, or a 400 naming it and saying what it must be.
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, on the cold path"
)]
fn query_number<T: std::str::FromStr>(
    field: &str,
    value: Option<&str>,
    what: &str,
) -> Result<Option<T>, Response> {
    value
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| {
                native(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("`{field}` must be {what}."),
                    json!({"field": field}),
                )
            })
        })
        .transpose()
}

/// The tenant asked for and the store query, or the 400 to answer.
#[expect(
    clippy::result_large_err,
    reason = "the error is the finished response, on the cold path"
)]
fn audit_query(p: AuditParams) -> Result<(Option<String>, AuditQuery), Response> {
    let limit_rule = format!("a whole number between 1 and {MAX_AUDIT_PAGE}");
    let limit = query_number::<u32>("limit", p.limit.as_deref(), &limit_rule)?.unwrap_or(50);
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("`limit` must be {limit_rule}."),
            json!({"field": "limit"}),
        ));
    }
    // A cursor is the id of an event of an earlier page: a lower-case UUID.
    // Anything else (empty, another endpoint's cursor) would compare as a
    // string and silently give a wrong page, differently on each backend.
    if let Some(c) = p.cursor.as_deref().filter(|c| !is_event_id(c)) {
        return Err(native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!(
                "`cursor` {c:?} is not a cursor this endpoint gave (the `next_cursor` of a page)."
            ),
            json!({"field": "cursor"}),
        ));
    }
    let since = query_number::<i64>("since", p.since.as_deref(), "unix seconds")?;
    let until = query_number::<i64>("until", p.until.as_deref(), "unix seconds")?;
    let query = AuditQuery {
        action: p.action,
        actor: p.actor,
        since_ms: since.map(|s| s.saturating_mul(1000)),
        until_ms: until.map(|s| s.saturating_mul(1000)),
        before_id: p.cursor,
        limit,
    };
    Ok((p.tenant_id, query))
}

/// A lower-case hyphenated UUID, as event ids are written.
fn is_event_id(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

pub async fn audit(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(params): NativeQuery<AuditParams>,
) -> Response {
    let (tenant, query) = match audit_query(params) {
        Ok(q) => q,
        Err(resp) => return resp,
    };
    let limit = query.limit;
    match state
        .identity()
        .list_audit(&actor(&who, &ctx), tenant.as_deref(), &query)
        .await
    {
        Ok(rows) => {
            let next = (rows.len() == limit as usize)
                .then(|| rows.last().map(|r| r.id.clone()))
                .flatten();
            let data: Vec<Value> = rows
                .iter()
                .map(|a| json!({"id": a.id, "tenant_id": a.tenant_id, "actor": a.actor, "action": a.action,
                    "target": a.target, "detail": a.detail, "trace_id": a.trace_id, "created_at_ms": a.created_at_ms}))
                .collect();
            Json(json!({"data": data, "next_cursor": next})).into_response()
        }
        Err(e) => identity_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetBody {
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    tenant_id: Option<String>,
}

/// `POST /v1/admin/rate-limits/reset`: forgets a key's or a user's counts.
pub async fn reset_rate_limits(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    NativeQuery(q): NativeQuery<TenantParam>,
    NativeJson(mut req): NativeJson<ResetBody>,
) -> Response {
    match one_tenant(q.tenant_id, req.tenant_id.take()) {
        Ok(t) => req.tenant_id = t,
        Err(resp) => return *resp,
    }
    let actor = actor(&who, &ctx);
    // Audited under the subject's tenant, whose admins must see it, not
    // the actor's (an operator resetting another tenant's key).
    let (prefixes, tenant_id) = match state
        .identity()
        .limit_subject(
            &actor,
            req.key_id.as_deref(),
            req.user_id.as_deref(),
            req.tenant_id.as_deref(),
        )
        .await
    {
        Ok(p) => p,
        Err(e) => return identity_error(e),
    };
    let Some(limits) = state.inner.limits.as_ref() else {
        return Json(json!({"reset": 0})).into_response();
    };
    let reset = async {
        let mut n = 0;
        for prefix in &prefixes {
            n += limits.limiter.reset(prefix).await?;
        }
        Ok::<_, switchyard_engine::limits::LimitError>(n)
    };
    match reset.await {
        Ok(n) => {
            // The subject asked for: the key, or the user (with its keys).
            let subject = prefixes[0].trim_end_matches(':').to_owned();
            state
                .identity()
                .audit(
                    &actor,
                    &tenant_id,
                    "rate_limit.reset",
                    Some(subject),
                    json!({"reset": n}),
                )
                .await;
            Json(json!({"reset": n})).into_response()
        }
        Err(e) => native(
            StatusCode::SERVICE_UNAVAILABLE,
            e.code(),
            "The rate-limit store is unavailable; try again shortly.",
            json!({}),
        ),
    }
}
