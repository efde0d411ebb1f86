//! `POST /v1/messages`: Anthropic's Messages API in front of any provider.
//! The body is translated to the OpenAI shape the router takes, and the
//! answer back — streams event by event — with errors in Anthropic's shape.
//! An Anthropic deployment is sent the client's own fields and its answer is
//! relayed untouched.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use switchyard_core::anthropic::{
    error_type_for_status, estimate_input_tokens, response_to_anthropic, Event, MessagesRequest,
    NativeMessages, OpenAiToAnthropicStream,
};
use switchyard_core::identity::Principal;
use switchyard_core::openai::{parse_object, ChatRequest};
use switchyard_core::sessions::rfc3339;
use switchyard_core::trace::TraceContext;
use switchyard_engine::{ChatOutcome, EngineError, ModelInfo, StreamEvent};

use super::openai::{label, meta};
use crate::error::{stream_failure, ApiError};
use crate::AppState;

/// Anthropic's error envelope: `{"type":"error","error":{"type","message"}}`.
fn anthropic_error(status: StatusCode, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": error_type_for_status(status.as_u16()), "message": message}});
    (status, axum::Json(body)).into_response()
}

/// Re-shapes an OpenAI-style error response, keeping status, headers and the
/// logged detail; an overloaded provider (its 503 or 529, a local model's
/// full queue), or no deployment available, is Anthropic's 529
/// `overloaded_error` (what its SDKs raise `OverloadedError` for and retry),
/// not a 502 or 503 — as a stream cut by the same failure ends with an
/// `overloaded_error` event.
fn to_anthropic(mut e: ApiError) -> Response {
    if e.overloaded || e.status == StatusCode::SERVICE_UNAVAILABLE {
        e.status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    }
    e.reshaped(|status, body| anthropic_error(status, &body.message))
}

fn invalid(message: &str) -> Response {
    anthropic_error(StatusCode::BAD_REQUEST, message)
}

/// Refuses what the OpenAI shape cannot carry unless Anthropic serves the
/// whole route (then no deployment needs the translation); an unknown alias
/// is left to the 404 that routing gives.
/// Anthropic's own tools also need the providers to enable them
/// (`server_tools`), except to count tokens, which costs nothing.
fn untranslatable(state: &AppState, msg: &MessagesRequest, counting: bool) -> Option<Response> {
    let gateway = state.gateway();
    if let Some(refusal) = &msg.untranslatable {
        if gateway.speaks_messages(&msg.model).ok() == Some(false) {
            return Some(invalid(&refusal.message));
        }
    }
    match &msg.server_tool {
        Some(refusal) if !counting && gateway.runs_server_tools(&msg.model).ok() == Some(false) => {
            Some(invalid(&refusal.message))
        }
        _ => None,
    }
}

/// Reads and checks a Messages body (a `count_tokens` one when `counting`):
/// the body, its parse, and what its alias's providers cannot take.
async fn read_messages(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    counting: bool,
) -> Result<(serde_json::Map<String, Value>, MessagesRequest), Box<Response>> {
    let bytes = state
        .read_body(headers, body)
        .await
        .map_err(|e| Box::new(to_anthropic(e)))?;
    let object = parse_object(&bytes).map_err(|e| Box::new(invalid(&e.message)))?;
    let msg = if counting {
        MessagesRequest::parse_count(&object)
    } else {
        MessagesRequest::parse(&object)
    }
    .map_err(|e| Box::new(invalid(&e.message)))?;
    match untranslatable(state, &msg, counting) {
        Some(refused) => Err(Box::new(refused)),
        None => Ok((object, msg)),
    }
}

pub async fn messages(
    State(state): State<AppState>,
    Extension(ctx): Extension<TraceContext>,
    Extension(started): Extension<Instant>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (object, msg) = match read_messages(&state, &headers, body, false).await {
        Ok(read) => read,
        Err(refused) => return *refused,
    };
    let mut req = match ChatRequest::from_object(msg.openai_body) {
        Ok(r) => r,
        Err(e) => return invalid(&e.message),
    };
    let alias = msg.model.clone();
    let thinking = msg.thinking;
    let input_estimate = if msg.stream {
        estimate_input_tokens(&object)
    } else {
        0
    };
    // An Anthropic deployment is sent the client's own fields.
    req.anthropic = Some(NativeMessages {
        body: object,
        beta: anthropic_beta(&headers),
    });
    let (mut resp, provider) = match state
        .gateway()
        .chat(&meta(&state, &ctx, started, &principal), &req)
        .await
    {
        // Anthropic's own answer, relayed as it came.
        Ok(ChatOutcome::Complete {
            body,
            provider,
            anthropic: true,
        }) => (super::openai::json_response(body), Some(provider)),
        Ok(ChatOutcome::Stream {
            events,
            provider,
            anthropic: true,
            ..
        }) => (native_event_stream(events), Some(provider)),
        Ok(ChatOutcome::Complete { body, provider, .. }) => {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) => (
                    axum::Json(response_to_anthropic(&v, &alias, thinking)).into_response(),
                    Some(provider),
                ),
                Err(_) => (
                    anthropic_error(
                        StatusCode::BAD_GATEWAY,
                        "The provider's response could not be relayed.",
                    ),
                    Some(provider),
                ),
            }
        }
        Ok(ChatOutcome::Stream {
            events, provider, ..
        }) => (
            event_stream(
                events,
                OpenAiToAnthropicStream::new(&alias, input_estimate, thinking),
            ),
            Some(provider),
        ),
        Err(e) => (to_anthropic(ApiError::from(e)), None),
    };
    label(&state, &mut resp, &alias, provider.as_deref());
    resp
}

/// `POST /v1/messages/count_tokens`: the input tokens of a Messages body,
/// checked as `/v1/messages` checks it, for an alias that exists. Claude
/// Code asks before every turn to manage its context window. An alias with
/// an Anthropic deployment gets Anthropic's own count (free); otherwise, or
/// when that fails, an estimate ([`estimate_input_tokens`]): Switchyard
/// carries no other provider's tokenizer. `x-switchyard-token-count` says
/// which (`provider` or `estimate`). Nothing is metered.
pub async fn count_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (object, msg) = match read_messages(&state, &headers, body, true).await {
        Ok(read) => read,
        Err(refused) => return *refused,
    };
    if let Err(e) = ChatRequest::from_object(msg.openai_body) {
        return invalid(&e.message);
    }
    let native = NativeMessages {
        body: object,
        beta: anthropic_beta(&headers),
    };
    let (count, how) = match state.gateway().count_tokens(&msg.model, &native).await {
        Ok(Some(n)) => (n, "provider"),
        Ok(None) => (estimate_input_tokens(&native.body), "estimate"),
        Err(e) => return to_anthropic(ApiError::from(e)),
    };
    let mut resp = axum::Json(json!({"input_tokens": count})).into_response();
    resp.headers_mut().insert(
        "x-switchyard-token-count",
        axum::http::HeaderValue::from_static(how),
    );
    resp
}

/// The client's `anthropic-beta` header (one or several, joined as one
/// comma-separated list), for an Anthropic deployment.
fn anthropic_beta(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// Whether a request comes from an Anthropic client: Anthropic's SDKs send
/// `anthropic-version` with every request. `GET /v1/models` answers them in
/// Anthropic's shape, so that `client.models.list()` works against the same
/// base URL as `client.messages`.
pub(crate) fn is_anthropic_client(headers: &HeaderMap) -> bool {
    crate::auth::Family::of_request("/v1/models", headers) == crate::auth::Family::Anthropic
}

fn model_object(m: &ModelInfo) -> Value {
    json!({
        "type": "model",
        "id": m.id,
        "display_name": m.id,
        "created_at": rfc3339(i64::try_from(m.created).unwrap_or(0).saturating_mul(1000)),
    })
}

#[derive(Debug, Deserialize)]
struct ModelPage {
    limit: Option<usize>,
    after_id: Option<String>,
    before_id: Option<String>,
}

/// `GET /v1/models` in Anthropic's shape, with its paging (`limit` 1–1000,
/// default 20; `after_id` or `before_id`), in the configured order.
pub(crate) fn list_models(state: &AppState, uri: &axum::http::Uri) -> Response {
    let page = match axum::extract::Query::<ModelPage>::try_from_uri(uri) {
        Ok(q) => q.0,
        Err(e) => return invalid(&format!("Invalid query parameters: {}", e.body_text())),
    };
    let limit = page.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return invalid("limit: Input should be between 1 and 1000");
    }
    let models = state.gateway().models();
    let cursor = match (&page.after_id, &page.before_id) {
        (Some(_), Some(_)) => return invalid("Give after_id or before_id, not both."),
        (Some(id), None) => Some(("after_id", id)),
        (None, Some(id)) => Some(("before_id", id)),
        (None, None) => None,
    };
    let (start, end) = match cursor {
        None => (0, limit.min(models.len())),
        Some((param, id)) => match models.iter().position(|m| &m.id == id) {
            None => return invalid(&format!("{param}: no model `{id}`")),
            Some(i) if param == "after_id" => (i + 1, (i + 1 + limit).min(models.len())),
            Some(i) => (i.saturating_sub(limit), i),
        },
    };
    let data = &models[start..end];
    let has_more = if page.before_id.is_some() {
        start > 0
    } else {
        end < models.len()
    };
    axum::Json(json!({
        "data": data.iter().map(model_object).collect::<Vec<_>>(),
        "has_more": has_more,
        "first_id": data.first().map(|m| m.id.as_str()),
        "last_id": data.last().map(|m| m.id.as_str()),
    }))
    .into_response()
}

/// `GET /v1/models/{id}` in Anthropic's shape.
pub(crate) fn get_model(state: &AppState, id: &str) -> Response {
    match state.gateway().models().iter().find(|m| m.id == id) {
        Some(m) => axum::Json(model_object(m)).into_response(),
        None => to_anthropic(ApiError::from(EngineError::UnknownModel(id.to_owned()))),
    }
}

fn frame(out: &mut BytesMut, (name, data): &Event) {
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(data.to_string().as_bytes());
    out.put_slice(b"\n\n");
}

/// The `event:` line of an Anthropic event relayed as is: its data's `type`.
fn event_name(data: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    // Anthropic writes `type` first: read it without scanning the rest.
    if let Some(rest) = data.strip_prefix(br#"{"type":""#) {
        if let Some(end) = rest.iter().position(|b| *b == b'"' || *b == b'\\') {
            if rest[end] == b'"' {
                return std::str::from_utf8(&rest[..end]).ok().map(str::to_owned);
            }
        }
    }
    serde_json::from_slice::<Typed>(data).ok().map(|t| t.kind)
}

/// The error event that ends a stream cut midway, typed by what the failure
/// stands for, as Anthropic's own stream would: an overloaded provider is
/// `overloaded_error`, a request it judged is `invalid_request_error` with
/// its message.
fn error_event(e: &switchyard_engine::ProviderError) -> Event {
    let (status, error) = stream_failure(e);
    let data = json!({"type": "error", "error": {
        "type": error_type_for_status(status),
        "message": error.message,
    }});
    ("error", data)
}

/// An Anthropic deployment's events relayed as they came (thinking
/// signatures, citations and all). A stream that had its stop reason but
/// lost its `message_stop` gets one; a failure midway ends it with an
/// `error` event.
fn native_event_stream(
    events: Box<dyn futures::Stream<Item = StreamEvent> + Send + Unpin>,
) -> Response {
    let mut stopped = false;
    let frames = events.map(move |ev| {
        let mut out = BytesMut::new();
        match ev {
            StreamEvent::Chunk(data) => {
                let name = event_name(&data);
                stopped |= name.as_deref() == Some("message_stop");
                relayed_frame(&mut out, name.as_deref().unwrap_or("message"), &data);
            }
            StreamEvent::Done if !stopped => {
                frame(&mut out, &("message_stop", json!({"type": "message_stop"})));
            }
            StreamEvent::Done => {}
            StreamEvent::Error(e) => frame(&mut out, &error_event(&e)),
        }
        Ok::<_, Infallible>(Bytes::from(out))
    });
    let frames = frames.filter(|f| futures::future::ready(f.as_ref().is_ok_and(|b| !b.is_empty())));
    super::openai::sse(Body::from_stream(frames))
}

/// OpenAI chunks in, Anthropic events out. A failure midway ends the stream
/// with an `error` event, as Anthropic's own API does.
fn event_stream(
    events: Box<dyn futures::Stream<Item = StreamEvent> + Send + Unpin>,
    mut translator: OpenAiToAnthropicStream,
) -> Response {
    let frames = events.map(move |ev| {
        let mut out = BytesMut::new();
        match ev {
            StreamEvent::Chunk(json) => {
                if let Ok(chunk) = serde_json::from_slice::<Value>(&json) {
                    for e in translator.chunk(&chunk) {
                        frame(&mut out, &e);
                    }
                }
            }
            StreamEvent::Done => {
                for e in translator.finish() {
                    frame(&mut out, &e);
                }
            }
            StreamEvent::Error(e) => frame(&mut out, &error_event(&e)),
        }
        Ok::<_, Infallible>(Bytes::from(out))
    });
    // A chunk that opens no event (e.g. an empty delta) sends nothing.
    let frames = frames.filter(|f| futures::future::ready(f.as_ref().is_ok_and(|b| !b.is_empty())));
    super::openai::sse(Body::from_stream(frames))
}

/// An upstream event as an SSE frame: one `data:` line per line of its
/// data, since a line break inside would end the field, and the event,
/// early.
fn relayed_frame(out: &mut BytesMut, name: &str, data: &[u8]) {
    out.put_slice(b"event: ");
    out.put_slice(name.as_bytes());
    out.put_slice(b"\n");
    for line in data.split(|&c| c == b'\n') {
        out.put_slice(b"data: ");
        out.put_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.put_slice(b"\n");
    }
    out.put_slice(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_events_lines_are_each_a_data_line() {
        let mut out = BytesMut::new();
        relayed_frame(&mut out, "ping", br#"{"type":"ping"}"#);
        assert_eq!(&out[..], b"event: ping\ndata: {\"type\":\"ping\"}\n\n");
        let mut out = BytesMut::new();
        relayed_frame(&mut out, "message_delta", b"{\"a\":\r\n1}");
        assert_eq!(
            &out[..],
            b"event: message_delta\ndata: {\"a\":\ndata: 1}\n\n"
        );
    }

    #[test]
    fn an_events_name_is_its_datas_type_wherever_the_type_is() {
        assert_eq!(event_name(br#"{"type":"ping"}"#).as_deref(), Some("ping"));
        assert_eq!(
            event_name(br#"{"index":0,"type":"content_block_stop"}"#).as_deref(),
            Some("content_block_stop")
        );
        assert_eq!(
            event_name(br#"{ "type" : "message_stop" }"#).as_deref(),
            Some("message_stop")
        );
        assert_eq!(event_name(br#"{"type":"a\"b"}"#).as_deref(), Some("a\"b"));
        assert_eq!(event_name(b"not json"), None);
    }
}
