//! The native conversation API: `/v1/bots`, `/v1/sessions` (messages,
//! streamed replies, resumption, state), `/v1/traces`, `/v1/users` (export
//! and erasure) and the Supabase function paths. Errors use the native shape
//! `{"error":{"code","message","details"}}`.
// Helpers return the finished error response; it is the cold path.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use switchyard_core::config::RetiredPath;
use switchyard_core::identity::Principal;
use switchyard_core::sessions::{rfc3339, SessionQuery, StoredResponse};
use switchyard_core::trace::TraceContext;
use switchyard_engine::idempotency::{Claim, Claimed, IdempotencyError};
use switchyard_engine::identity::{now_ms, Actor};
use switchyard_engine::sessions::{
    bot_json, message_json, session_json, BotPatch, NewBot, NewSession, ReplyMode, SendMessage,
    SessionError,
};

use crate::error::ErrorDetail;
use crate::routes::keys::{native, native_body, NativeJson, NativeQuery};
use crate::routes::openai::{meta, sse};
use crate::AppState;

const DEFAULT_PAGE: u32 = 20;
const MAX_PAGE: u32 = 100;

pub(crate) fn session_error(e: SessionError) -> Response {
    let message = e.to_string();
    match e {
        SessionError::Invalid { field, .. } => native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &message,
            json!({"field": field}),
        ),
        SessionError::NotFound(what) => native(
            StatusCode::NOT_FOUND,
            "not_found",
            &message,
            json!({"resource": what}),
        ),
        SessionError::UnknownModel(_) => native(
            StatusCode::NOT_FOUND,
            "model_not_found",
            &message,
            json!({"field": "model"}),
        ),
        SessionError::Forbidden(_) => {
            native(StatusCode::FORBIDDEN, "forbidden", &message, json!({}))
        }
        SessionError::Conflict { code, .. } => {
            native(StatusCode::CONFLICT, code, &message, json!({}))
        }
        SessionError::VersionMismatch { current } => native(
            StatusCode::PRECONDITION_FAILED,
            "version_mismatch",
            &message,
            json!({"current_version": current}),
        ),
        SessionError::TooLarge { limit } => native(
            StatusCode::PAYLOAD_TOO_LARGE,
            "content_too_large",
            &message,
            json!({"field": "content", "limit_bytes": limit}),
        ),
        SessionError::Store(s) => internal(s.to_string()),
    }
}

fn internal(detail: String) -> Response {
    let mut r = native(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "The server had an error while processing your request.",
        json!({}),
    );
    r.extensions_mut().insert(ErrorDetail(detail));
    r
}

/// The query of a list route: `limit` (1 to 100, default 20), `cursor`
/// and the session filters; refusals are native 400s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    #[serde(default = "default_page")]
    limit: u32,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    bot_id: Option<String>,
}

fn default_page() -> u32 {
    DEFAULT_PAGE
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Page {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        let NativeQuery(page) = NativeQuery::<Page>::from_request_parts(parts, state).await?;
        if !(1..=MAX_PAGE).contains(&page.limit) {
            return Err(native(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("`limit` must be between 1 and {MAX_PAGE}."),
                json!({"field": "limit"}),
            ));
        }
        Ok(page)
    }
}

/// `{data, next_cursor}`: a cursor only when the page is full.
fn list<T>(
    items: &[T],
    limit: u32,
    id: impl Fn(&T) -> &str,
    view: impl Fn(&T) -> Value,
) -> Response {
    let next = (items.len() as u32 == limit)
        .then(|| items.last().map(|i| id(i).to_owned()))
        .flatten();
    Json(json!({
        "object": "list",
        "data": items.iter().map(view).collect::<Vec<_>>(),
        "next_cursor": next,
    }))
    .into_response()
}

fn deleted(id: &str, object: &str) -> Response {
    Json(json!({"id": id, "object": object, "deleted": true})).into_response()
}

// ---- bots ----

pub async fn create_bot(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    NativeJson(new): NativeJson<NewBot>,
) -> Response {
    match state.sessions().create_bot(&who, new).await {
        Ok(b) => (StatusCode::CREATED, Json(bot_json(&b))).into_response(),
        Err(e) => session_error(e),
    }
}

pub async fn list_bots(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    page: Page,
) -> Response {
    let limit = page.limit;
    match state
        .sessions()
        .list_bots(&who, page.cursor.as_deref(), limit)
        .await
    {
        Ok(bots) => list(&bots, limit, |b| &b.id, bot_json),
        Err(e) => session_error(e),
    }
}

pub async fn get_bot(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    match state.sessions().get_bot(&who, &id).await {
        Ok(b) => Json(bot_json(&b)).into_response(),
        Err(e) => session_error(e),
    }
}

pub async fn update_bot(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    NativeJson(patch): NativeJson<BotPatch>,
) -> Response {
    match state.sessions().update_bot(&who, &id, patch).await {
        Ok(b) => Json(bot_json(&b)).into_response(),
        Err(e) => session_error(e),
    }
}

pub async fn delete_bot(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    match state.sessions().delete_bot(&who, &id).await {
        Ok(()) => deleted(&id, "bot"),
        Err(e) => session_error(e),
    }
}

// ---- sessions ----

pub async fn create_session(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    NativeJson(new): NativeJson<NewSession>,
) -> Response {
    match state.sessions().create_session(&who, new).await {
        Ok(s) => (StatusCode::CREATED, Json(session_json(&s))).into_response(),
        Err(e) => session_error(e),
    }
}

pub async fn list_sessions(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    page: Page,
) -> Response {
    let limit = page.limit;
    let q = SessionQuery {
        user_id: page.user_id,
        bot_id: page.bot_id,
        before_id: page.cursor,
        limit,
    };
    match state.sessions().list_sessions(&who, q).await {
        Ok(s) => list(&s, limit, |s| &s.id, session_json),
        Err(e) => session_error(e),
    }
}

pub async fn get_session(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    match state.sessions().get_session(&who, &id).await {
        Ok(s) => Json(session_json(&s)).into_response(),
        Err(e) => session_error(e),
    }
}

pub async fn delete_session(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    match state.sessions().delete_session(&who, &id).await {
        Ok(()) => deleted(&id, "session"),
        Err(e) => session_error(e),
    }
}

pub async fn list_messages(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    page: Page,
) -> Response {
    let limit = page.limit;
    match state
        .sessions()
        .list_messages(&who, &id, page.cursor.as_deref(), limit)
        .await
    {
        Ok(m) => list(&m, limit, |m| &m.id, message_json),
        Err(e) => session_error(e),
    }
}

// ---- state ----

fn state_json(id: &str, state: &Map<String, Value>, version: i64) -> Response {
    let mut resp =
        Json(json!({"session_id": id, "state": state, "version": version})).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

pub async fn get_state(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    match state.sessions().get_session(&who, &id).await {
        Ok(s) => state_json(&s.id, &s.state, s.state_version),
        Err(e) => session_error(e),
    }
}

/// `If-Match: "3"` (or `3`, or `W/"3"`) → version 3; `*` → any.
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Response> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = v.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    let bare = text.trim_start_matches("W/").trim_matches('"');
    bare.parse::<i64>().map(Some).map_err(|_| {
        native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "If-Match must be a state version, as in the ETag of GET /state (e.g. \"3\").",
            json!({"header": "if-match"}),
        )
    })
}

pub async fn patch_state(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    NativeJson(patch): NativeJson<Map<String, Value>>,
) -> Response {
    let version = match if_match(&headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match state
        .sessions()
        .patch_state(&who, &id, &patch, version)
        .await
    {
        Ok((s, v)) => state_json(&id, &s, v),
        Err(e) => session_error(e),
    }
}

// ---- replies ----

/// Whether the client asked for JSON rather than a stream.
fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/event-stream"))
}

fn stored(resp: StoredResponse, replayed: bool) -> Response {
    let mut r = Response::new(Body::from(resp.body));
    *r.status_mut() = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK);
    for (k, v) in resp.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            r.headers_mut().insert(k, v);
        }
    }
    if replayed {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}

/// What an `Idempotency-Key` header (or body field) leads to: run with the
/// claim, or the finished response.
pub(crate) async fn claim_key(
    state: &AppState,
    who: &Principal,
    key: Option<&str>,
    path: &str,
    body: &[u8],
    family_native: bool,
) -> Result<Option<Claimed>, Response> {
    let Some(key) = key else { return Ok(None) };
    let refuse = |status: StatusCode, code: &str, message: &str| {
        if family_native {
            native(status, code, message, json!({"header": "idempotency-key"}))
        } else {
            crate::ApiError::new(status, "invalid_request_error", code, message).into_response()
        }
    };
    match state
        .idempotency()
        .claim(who, key, "POST", path, body)
        .await
    {
        Ok(Claim::Run(c)) => Ok(Some(c)),
        Ok(Claim::Replay(r)) => Err(stored(r, true)),
        Ok(Claim::InFlight) => Err(refuse(
            StatusCode::CONFLICT,
            "idempotency_in_flight",
            "A request with this Idempotency-Key is still being processed; retry after it finishes.",
        )),
        Ok(Claim::Mismatch) => Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "This Idempotency-Key was used with a different request body.",
        )),
        Err(IdempotencyError::InvalidKey) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            &IdempotencyError::InvalidKey.to_string(),
        )),
        Err(IdempotencyError::Store(e)) => Err(internal(e.to_string())),
    }
}

/// The `Idempotency-Key` header; a value that is not text fails validation.
pub(crate) fn header_key(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or("\u{0}"))
}

#[allow(clippy::too_many_arguments)]
async fn reply(
    state: &AppState,
    ctx: &TraceContext,
    started: Instant,
    who: &Principal,
    headers: &HeaderMap,
    session_id: &str,
    msg: SendMessage,
    claim: Option<Claimed>,
) -> Response {
    let mode = if wants_json(headers) {
        ReplyMode::Json
    } else {
        ReplyMode::Sse
    };
    let meta = meta(state, ctx, started, who);
    let handle = match state
        .sessions()
        .send(who, session_id, msg, meta, mode, claim)
        .await
    {
        Ok(h) => h,
        Err(e) => return session_error(e),
    };
    match mode {
        ReplyMode::Sse => {
            let keepalive = state.sessions().settings().keepalive;
            let frames = handle
                .transcript
                .follow(0, keepalive)
                .map(Ok::<_, std::convert::Infallible>);
            sse(Body::from_stream(frames))
        }
        ReplyMode::Json => match handle.finished.await {
            Ok(r) => stored(r, false),
            Err(_) => internal("the reply task ended without a result".into()),
        },
    }
}

use futures::StreamExt as _;

pub async fn post_message(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(started): Extension<Instant>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (msg, bytes) = match native_body::<SendMessage>(&state, &headers, body).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let path = format!("/v1/sessions/{id}/messages");
    let claim = match claim_key(&state, &who, header_key(&headers), &path, &bytes, true).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    reply(&state, &ctx, started, &who, &headers, &id, msg, claim).await
}

/// `Last-Event-ID` (header, or `last_event_id` in the query for clients
/// that cannot set headers).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    #[serde(default)]
    last_event_id: Option<u64>,
}

pub async fn message_events(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((session_id, message_id)): Path<(String, String)>,
    headers: HeaderMap,
    NativeQuery(resume): NativeQuery<Resume>,
) -> Response {
    let after = match headers.get("last-event-id") {
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) => n,
            None => {
                return native(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Last-Event-ID must be the id of a frame of this stream (a number).",
                    json!({"header": "last-event-id"}),
                )
            }
        },
        None => resume.last_event_id.unwrap_or(0),
    };
    match state
        .sessions()
        .follow(&who, &session_id, &message_id, after)
        .await
    {
        Ok(frames) => sse(Body::from_stream(
            frames.map(Ok::<_, std::convert::Infallible>),
        )),
        Err(e) => session_error(e),
    }
}

// ---- traces ----

pub async fn trace(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(trace_id): Path<String>,
) -> Response {
    match state.sessions().trace(&who, &trace_id).await {
        Ok(events) => Json(json!({
            "object": "trace",
            "trace_id": trace_id,
            "data": events.iter().map(|e| json!({
                "id": e.id,
                "seq": e.seq,
                "kind": e.kind,
                "session_id": e.session_id,
                "user_id": e.user_id,
                "payload": e.payload,
                "created_at": rfc3339(e.created_at_ms),
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => session_error(e),
    }
}

// ---- data rights ----

fn actor(who: &Principal, ctx: &TraceContext) -> Actor {
    Actor::from_principal(who, Some(ctx.trace_id()))
}

pub async fn export_user(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    Path(user_id): Path<String>,
) -> Response {
    let data = match state.sessions().export_user(&who, &user_id).await {
        Ok(d) => d,
        Err(e) => return session_error(e),
    };
    state
        .identity()
        .audit(
            &actor(&who, &ctx),
            &who.tenant_id,
            "user.export",
            Some(format!("user:{user_id}")),
            json!({"sessions": data.sessions.len(), "messages": data.messages.len(), "usage": data.usage.len()}),
        )
        .await;
    let sessions: Vec<Value> = data
        .sessions
        .iter()
        .map(|s| {
            let mut v = session_json(s);
            v["messages"] = data
                .messages
                .iter()
                .filter(|m| m.session_id == s.id)
                .map(message_json)
                .collect();
            v
        })
        .collect();
    Json(json!({
        "object": "user_export",
        "tenant_id": who.tenant_id,
        "user_id": user_id,
        "exported_at": rfc3339(now_ms()),
        "sessions": sessions,
        "usage": data.usage,
    }))
    .into_response()
}

pub async fn erase_user(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(who): Extension<Principal>,
    Path(user_id): Path<String>,
) -> Response {
    let erased = match state.sessions().erase_user(&who, &user_id).await {
        Ok(e) => e,
        Err(e) => return session_error(e),
    };
    state
        .identity()
        .audit(
            &actor(&who, &ctx),
            &who.tenant_id,
            "user.erase",
            Some(format!("user:{user_id}")),
            json!(erased),
        )
        .await;
    Json(json!({"id": user_id, "object": "user", "deleted": true, "erased": erased}))
        .into_response()
}

// ---- Supabase function paths ----

/// The body of the `chat` Edge Function this replaces.
#[derive(Debug, Deserialize)]
pub struct FunctionChat {
    session_id: String,
    content: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

pub async fn function_chat(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(started): Extension<Instant>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (req, bytes) = match native_body::<FunctionChat>(&state, &headers, body).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let key = header_key(&headers).or(req.idempotency_key.as_deref());
    let claim = match claim_key(&state, &who, key, "/functions/v1/chat", &bytes, true).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let msg = SendMessage {
        content: req.content,
        model: req.model,
    };
    reply(
        &state,
        &ctx,
        started,
        &who,
        &headers,
        &req.session_id,
        msg,
        claim,
    )
    .await
}

/// The body of the `embed` Edge Function this replaces (Supabase's
/// `{input}` → `{embedding}`), with an optional model alias.
#[derive(Debug, Deserialize)]
pub struct FunctionEmbed {
    input: String,
    #[serde(default)]
    model: Option<String>,
}

/// The alias the embed function uses when the body names none.
const DEFAULT_EMBEDDING_ALIAS: &str = "default-embedding";

/// `POST /functions/v1/embed`: one text in, `{"embedding": [...]}` out,
/// through the same gateway path (routing, usage row, limits) as
/// `/v1/embeddings`; errors in the native shape, as on the chat function.
pub async fn function_embed(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(started): Extension<Instant>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (req, _) = match native_body::<FunctionEmbed>(&state, &headers, body).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    if req.input.is_empty() {
        return native(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`input` must not be empty.",
            json!({"field": "input"}),
        );
    }
    let model = req
        .model
        .unwrap_or_else(|| DEFAULT_EMBEDDING_ALIAS.to_owned());
    let openai = json!({"model": model, "input": req.input, "encoding_format": "float"});
    let parsed =
        match switchyard_core::openai::EmbeddingsRequest::parse(openai.to_string().as_bytes()) {
            Ok(p) => p,
            Err(e) => {
                return native(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &e.message,
                    json!({"field": e.param}),
                )
            }
        };
    let outcome = state
        .gateway()
        .embeddings(&meta(&state, &ctx, started, &who), &parsed)
        .await;
    let (mut resp, provider) = match outcome {
        Ok((body, provider)) => {
            let embedding = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|mut v| v.pointer_mut("/data/0/embedding").map(Value::take));
            match embedding {
                Some(e) => (
                    Json(json!({"embedding": e})).into_response(),
                    Some(provider),
                ),
                None => (
                    native(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        "The provider's answer had no embedding.",
                        json!({}),
                    ),
                    Some(provider),
                ),
            }
        }
        Err(e) => (api_error_native(crate::error::ApiError::from(e)), None),
    };
    crate::routes::openai::label(&state, &mut resp, &model, provider.as_deref());
    resp
}

/// An error of the OpenAI-shaped paths, in the native shape.
fn api_error_native(e: crate::error::ApiError) -> Response {
    e.reshaped(|status, body| {
        let details = match &body.param {
            Some(p) => json!({"field": p}),
            None => json!({}),
        };
        native(
            status,
            body.code.as_deref().unwrap_or("error"),
            &body.message,
            details,
        )
    })
}

/// A retired path: the chat function with deprecation headers until its
/// sunset, `410 Gone` with a hint after it.
pub async fn retired(
    retired: Arc<RetiredPath>,
    state: AppState,
    ctx: TraceContext,
    started: Instant,
    who: Principal,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let sunset_ms = switchyard_core::sessions::parse_utc(&retired.sunset).unwrap_or(0);
    let link = format!("<{}>; rel=\"successor-version\"", retired.successor);
    let mut resp = if now_ms() >= sunset_ms {
        native(
            StatusCode::GONE,
            "gone",
            &format!(
                "{} was retired on {}; send the same request to {} instead.",
                retired.path,
                rfc3339(sunset_ms),
                retired.successor
            ),
            json!({"successor": retired.successor, "sunset": rfc3339(sunset_ms)}),
        )
    } else {
        let mut r = function_chat(
            State(state),
            Extension(ctx),
            Extension(started),
            Extension(who),
            headers,
            body,
        )
        .await;
        // RFC 9745 (`@<unix seconds>`) when the deprecation date is
        // configured; the draft's `true` otherwise.
        let deprecation = retired
            .deprecated
            .as_deref()
            .and_then(switchyard_core::sessions::parse_utc)
            .map_or_else(|| "true".to_owned(), |ms| format!("@{}", ms / 1000));
        if let Ok(v) = HeaderValue::from_str(&deprecation) {
            r.headers_mut().insert("deprecation", v);
        }
        r
    };
    let sunset = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(sunset_ms.max(0) as u64),
    );
    if let Ok(v) = HeaderValue::from_str(&sunset) {
        resp.headers_mut().insert("sunset", v);
    }
    if let Ok(v) = HeaderValue::from_str(&link) {
        resp.headers_mut().insert(header::LINK, v);
    }
    resp
}
