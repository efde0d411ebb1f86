//! The adapter for Anthropic's Messages API: OpenAI-shaped requests are
//! translated (system prompt, alternation, images, tools, stop sequences,
//! `max_tokens` default), and answers translated back — streams event by
//! event, so text and tool-call arguments reach the client as they arrive.
//! A client that spoke the Messages API itself is sent its own fields and
//! gets Anthropic's answer as is (thinking signatures and all), read only
//! for its usage and for failures.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use switchyard_core::anthropic::{
    native_request, request_to_anthropic_with, response_from_anthropic, AnthropicToOpenAiStream,
    NativeMessages, StreamStep, Tokens,
};
use switchyard_core::config::{ProviderConfig, ThinkingForm};
use switchyard_core::openai::Usage;

use crate::sse::{SseEvent, SseParser};
use crate::upstream::{parse_url, secret_header, Scrubber, Upstream, UpstreamResponse};
use crate::{
    ChatCall, ChatProvider, ChatReply, ChunkStream, Completion, EmbedCall, EmbeddingProvider,
    ProviderError,
};

/// The API version this adapter speaks.
const ANTHROPIC_VERSION: &str = "2023-06-01";

pub struct AnthropicProvider {
    name: String,
    messages_url: http::Uri,
    count_url: http::Uri,
    models_url: http::Uri,
    upstream: Upstream,
    server_tools: bool,
    thinking: ThinkingForm,
    /// `max_tokens` for an OpenAI client that gives none.
    max_tokens_default: u64,
}

impl AnthropicProvider {
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &config.api_key {
            headers.insert("x-api-key", secret_header(key.expose_secret())?);
        }
        headers.insert(
            "anthropic-version",
            HeaderValue::from_static(ANTHROPIC_VERSION),
        );
        let base = config.base_url.trim_end_matches('/');
        Ok(Self {
            name: name.to_owned(),
            messages_url: parse_url(&format!("{base}/messages"))?,
            count_url: parse_url(&format!("{base}/messages/count_tokens"))?,
            models_url: parse_url(&format!("{base}/models"))?,
            upstream: Upstream::new(config, headers)?,
            server_tools: config.server_tools,
            thinking: config.thinking,
            max_tokens_default: config
                .max_tokens_default
                .unwrap_or(switchyard_core::anthropic::DEFAULT_MAX_TOKENS),
        })
    }
}

impl AnthropicProvider {
    /// POSTs to Anthropic, with the client's `anthropic-beta` header when a
    /// Messages client sent one (it names the beta features its body uses).
    async fn post(
        &self,
        uri: &http::Uri,
        body: Vec<u8>,
        beta: Option<&str>,
        timeout: Duration,
    ) -> Result<UpstreamResponse, ProviderError> {
        match beta.and_then(|b| HeaderValue::from_str(b).ok()) {
            Some(value) => {
                let name = http::header::HeaderName::from_static("anthropic-beta");
                self.upstream
                    .post_with(uri, body, (name, value), timeout)
                    .await
            }
            None => self.upstream.post(uri, body, timeout).await,
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An OpenAI-shaped error body, so the HTTP layer can relay it as is.
fn openai_error(message: &str, kind: &str, param: Option<&str>) -> Bytes {
    Bytes::from(
        json!({"error": {"message": message, "type": kind, "param": param, "code": null}})
            .to_string(),
    )
}

/// Anthropic's error body (`{"type":"error","error":{"type","message"}}`)
/// rewritten in OpenAI's shape, keeping status and `Retry-After`.
fn translate_status(e: ProviderError) -> ProviderError {
    match e {
        ProviderError::Status {
            status,
            body,
            retry_after,
        } => {
            let parsed: Option<Value> = serde_json::from_slice(&body).ok();
            let kind = parsed
                .as_ref()
                .and_then(|v| v.pointer("/error/type"))
                .and_then(Value::as_str)
                .unwrap_or("api_error");
            let message = parsed
                .as_ref()
                .and_then(|v| v.pointer("/error/message"))
                .and_then(Value::as_str)
                .map_or_else(
                    || format!("The provider answered with status {status}."),
                    str::to_owned,
                );
            ProviderError::Status {
                status,
                body: openai_error(&message, kind, None),
                retry_after,
            }
        }
        other => other,
    }
}

/// An `error` event in a stream: retryable kinds keep a retryable status so
/// that one arriving before the first chunk fails over.
fn stream_error(kind: &str, message: &str) -> ProviderError {
    // Anthropic's error types by the status they stand for (its own table).
    let status = match kind {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "billing_error" => 402,
        "api_error" => 500,
        "timeout_error" => 504,
        "overloaded_error" => 529,
        _ => return ProviderError::Broken(format!("{kind}: {message}")),
    };
    ProviderError::Status {
        status,
        body: openai_error(message, kind, None),
        retry_after: None,
    }
}

/// A 200 whose body is not a message: an `error` object (some proxies in
/// front of Anthropic answer errors with 200) is that error, with the status
/// its type stands for, so an overload fails over; anything else is a
/// protocol error. Never an empty reply.
fn check_message(msg: &Value, scrubber: &Scrubber) -> Result<(), ProviderError> {
    match msg.get("type").and_then(Value::as_str) {
        Some("message") => Ok(()),
        Some("error") => {
            let error = msg.get("error");
            let field = |name: &str| error.and_then(|e| e.get(name)).and_then(Value::as_str);
            Err(stream_error(
                &scrubber.scrub_str(field("type").unwrap_or("api_error")),
                &scrubber
                    .scrub_str(field("message").unwrap_or("The provider answered with an error.")),
            ))
        }
        Some(other) => Err(ProviderError::Protocol(format!(
            "expected a message, got `{other}`"
        ))),
        None => Err(ProviderError::Protocol(
            "expected a message, got a body without `type`".into(),
        )),
    }
}

#[async_trait]
impl ChatProvider for AnthropicProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn probe(&self, timeout: Duration) -> Result<(), ProviderError> {
        self.upstream.get(&self.models_url, timeout).await
    }

    fn speaks_messages(&self) -> bool {
        true
    }

    fn runs_server_tools(&self) -> bool {
        self.server_tools
    }

    /// Anthropic's own count (free, and exact for its tokenizer), of the
    /// fields the Messages request would send.
    async fn count_tokens(
        &self,
        anthropic: &NativeMessages,
        upstream_model: &str,
        timeout: Duration,
    ) -> Option<Result<u64, ProviderError>> {
        let mut req = native_request(&anthropic.body, upstream_model, false);
        if let Some(r) = req.as_object_mut() {
            // What count_tokens takes of a Messages request.
            r.retain(|k, _| {
                matches!(
                    k.as_str(),
                    "model"
                        | "messages"
                        | "system"
                        | "tools"
                        | "tool_choice"
                        | "thinking"
                        | "context_management"
                        | "mcp_servers"
                        | "output_format"
                        | "output_config"
                )
            });
        }
        let count = async {
            let body =
                serde_json::to_vec(&req).map_err(|e| ProviderError::Protocol(e.to_string()))?;
            let resp = self
                .post(&self.count_url, body, anthropic.beta.as_deref(), timeout)
                .await
                .map_err(translate_status)?;
            let bytes = resp.bytes().await?;
            serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("input_tokens").and_then(Value::as_u64))
                .ok_or_else(|| ProviderError::Protocol("the token count is not understood".into()))
        };
        Some(count.await)
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatReply, ProviderError> {
        let native = call.anthropic_body.is_some();
        let req = match call.anthropic_body {
            // The client spoke Anthropic's API: its own fields, not the
            // OpenAI shape's (prompt caching markers survive).
            Some(original) => native_request(&original.body, call.upstream_model, call.stream),
            None => request_to_anthropic_with(
                call.body,
                call.upstream_model,
                self.thinking,
                self.max_tokens_default,
                call.stream,
            )
            .map_err(|e| ProviderError::Status {
                status: 400,
                body: openai_error(&e.message, "invalid_request_error", e.param.as_deref()),
                retry_after: None,
            })?,
        };
        let body = serde_json::to_vec(&req).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let beta = call.anthropic_body.and_then(|a| a.beta.as_deref());
        let resp = self
            .post(&self.messages_url, body, beta, call.timeout)
            .await
            .map_err(translate_status)?;
        match (call.stream, native) {
            (true, true) => {
                return Ok(ChatReply::AnthropicStream(native_stream(
                    resp,
                    self.upstream.scrubber(),
                )))
            }
            (true, false) => {
                return Ok(ChatReply::Stream(event_stream(
                    resp,
                    self.upstream.scrubber(),
                )))
            }
            (false, _) => {}
        }
        let bytes = resp.bytes().await?;
        let msg: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::Protocol(format!("the message is not JSON: {e}")))?;
        check_message(&msg, &self.upstream.scrubber())?;
        if native {
            let usage = msg
                .get("usage")
                .map(|u| Tokens::from_anthropic(Some(u)).usage());
            return Ok(ChatReply::AnthropicComplete(Completion {
                body: bytes,
                usage,
            }));
        }
        let completion = response_from_anthropic(&msg, now_secs());
        let usage: Option<Usage> = completion
            .get("usage")
            .and_then(|u| serde_json::from_value(u.clone()).ok());
        let body =
            serde_json::to_vec(&completion).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        Ok(ChatReply::Complete(Completion {
            body: Bytes::from(body),
            usage,
        }))
    }
}

#[async_trait]
impl EmbeddingProvider for AnthropicProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn embed(&self, _call: EmbedCall<'_>) -> Result<Completion, ProviderError> {
        Err(ProviderError::Status {
            status: 400,
            body: openai_error(
                "This model's provider (Anthropic) has no embeddings API.",
                "invalid_request_error",
                Some("model"),
            ),
            retry_after: None,
        })
    }
}

/// The SSE events of an Anthropic answer, read from the body as needed.
struct Events {
    resp: UpstreamResponse,
    parser: SseParser,
    eof: bool,
}

impl Events {
    fn new(resp: UpstreamResponse) -> Self {
        Self {
            resp,
            parser: SseParser::new(),
            eof: false,
        }
    }

    /// The next event; `None` once the body has ended and nothing is left.
    async fn next(&mut self) -> Result<Option<SseEvent>, ProviderError> {
        loop {
            let event = if self.eof {
                self.parser.finish()
            } else {
                self.parser.next_event()
            };
            if event.is_some() || self.eof {
                return Ok(event);
            }
            match self.resp.chunk().await? {
                Some(bytes) => {
                    self.parser.push(&bytes);
                    if self.parser.overflowed() {
                        return Err(crate::sse::too_large());
                    }
                }
                None => self.eof = true,
            }
        }
    }
}

struct EventState {
    events: Events,
    scrubber: Scrubber,
    translator: AnthropicToOpenAiStream,
    pending: VecDeque<Bytes>,
    preamble: Preamble,
    done: bool,
}

/// A stream's preamble held back: until an event of the answer (or the end)
/// goes by, nothing is given out but, once, an empty item that tells the
/// router the stream has begun (it meets the first-byte timeout and is never
/// relayed).
#[derive(Default)]
struct Preamble {
    /// An event of the answer went by: what is held may be given out.
    open: bool,
    begun: bool,
}

impl Preamble {
    /// Notes an event; the empty "begun" item when it is due.
    fn note(&mut self, preamble: bool) -> Option<Bytes> {
        self.open |= !preamble;
        let due = !self.open && !self.begun;
        self.begun = true;
        due.then(Bytes::new)
    }
}

/// The events Anthropic opens every stream with, before anything of the
/// answer: `message_start`, `ping`, and the start of a text or thinking
/// block (empty until its first delta). An `error` event after them (its
/// `overloaded_error` comes just there) is still a failure before the first
/// byte, which fails over.
fn is_preamble(kind: &str, data: &Value) -> bool {
    match kind {
        "message_start" | "ping" => true,
        "content_block_start" => {
            let block = data.get("content_block");
            let empty = |field: &str| {
                block
                    .and_then(|b| b.get(field))
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
            };
            match block.and_then(|b| b.get("type")).and_then(Value::as_str) {
                Some("text") => empty("text"),
                Some("thinking") => empty("thinking"),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Anthropic events in, OpenAI chunk payloads out, one for one. What the
/// preamble (`message_start`, `ping`) gives is held until an event of the
/// answer comes, so that the router commits to this deployment only then;
/// an empty item tells it meanwhile that the stream has begun (for its
/// first-byte timeout), and is never relayed.
fn event_stream(resp: UpstreamResponse, scrubber: Scrubber) -> ChunkStream {
    let state = EventState {
        events: Events::new(resp),
        scrubber,
        translator: AnthropicToOpenAiStream::new(now_secs()),
        pending: VecDeque::new(),
        preamble: Preamble::default(),
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.preamble.open {
                if let Some(chunk) = st.pending.pop_front() {
                    return Some((Ok(chunk), st));
                }
            }
            if st.done {
                return None;
            }
            let ev = match st.events.next().await {
                Ok(Some(ev)) => ev,
                // The body ended before `message_stop`.
                Ok(None) => {
                    st.done = true;
                    return Some((Err(ProviderError::Truncated), st));
                }
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            };
            let Ok(data) = serde_json::from_slice::<Value>(&ev.data) else {
                st.done = true;
                return Some((
                    Err(ProviderError::Protocol("an event is not JSON".into())),
                    st,
                ));
            };
            let name = ev.event.as_deref().unwrap_or("");
            let kind = data.get("type").and_then(Value::as_str).unwrap_or(name);
            let begun = st.preamble.note(is_preamble(kind, &data));
            match st.translator.step(name, &data) {
                StreamStep::Chunks(chunks) => st
                    .pending
                    .extend(chunks.iter().map(|c| Bytes::from(c.to_string()))),
                StreamStep::Done(usage) => {
                    st.pending.push_back(Bytes::from(usage.to_string()));
                    st.done = true;
                }
                StreamStep::Error { kind, message } => {
                    st.done = true;
                    let (kind, message) = (
                        st.scrubber.scrub_str(&kind),
                        st.scrubber.scrub_str(&message),
                    );
                    return Some((Err(stream_error(&kind, &message)), st));
                }
            }
            if let Some(begun) = begun {
                return Some((Ok(begun), st));
            }
        }
    }))
}

/// Anthropic events relayed as they come (each item one event's data), read
/// only for what ends them: `message_stop` completes the stream; an `error`
/// event is the failure it names (an `overloaded_error` before the answer
/// begins fails over like a 529); a stream that stops before `message_stop`
/// is truncated. The preamble (`message_start`, `ping`) is held until an
/// event of the answer comes, so that the router commits only then (an
/// empty item meanwhile says the stream has begun, as in [`event_stream`]).
fn native_stream(resp: UpstreamResponse, scrubber: Scrubber) -> ChunkStream {
    struct State {
        events: Events,
        held: VecDeque<Bytes>,
        preamble: Preamble,
        done: bool,
    }
    let state = State {
        events: Events::new(resp),
        held: VecDeque::new(),
        preamble: Preamble::default(),
        done: false,
    };
    Box::pin(futures::stream::unfold(state, move |mut st| {
        let scrubber = scrubber.clone();
        async move {
            loop {
                if st.preamble.open {
                    if let Some(data) = st.held.pop_front() {
                        return Some((Ok(data), st));
                    }
                }
                if st.done {
                    return None;
                }
                let (item, done) = native_step(&mut st.events, &scrubber).await;
                st.done = done;
                match item {
                    Ok((data, kind)) => {
                        // Only a block's start is read (once per block), to
                        // see whether it is empty; the others by name.
                        let preamble = !st.preamble.open
                            && kind.as_deref().is_some_and(|k| {
                                let parsed = match k {
                                    "content_block_start" => {
                                        serde_json::from_slice(&data).unwrap_or(Value::Null)
                                    }
                                    _ => Value::Null,
                                };
                                is_preamble(k, &parsed)
                            });
                        let begun = st.preamble.note(preamble);
                        st.held.push_back(data);
                        if let Some(begun) = begun {
                            return Some((Ok(begun), st));
                        }
                    }
                    Err(e) => return Some((Err(e), st)),
                }
            }
        }
    }))
}

/// The next event of a native stream: its data and name, or the failure it
/// stands for; and whether the stream is over.
async fn native_step(
    events: &mut Events,
    scrubber: &Scrubber,
) -> (Result<(Bytes, Option<String>), ProviderError>, bool) {
    let ev = match events.next().await {
        Ok(Some(ev)) => ev,
        Ok(None) => return (Err(ProviderError::Truncated), true),
        Err(e) => return (Err(e), true),
    };
    // The `event:` line names it; a relay that leaves the line out still
    // has the data's `type`.
    let name = ev.event.clone().or_else(|| {
        serde_json::from_slice::<Value>(&ev.data)
            .ok()
            .and_then(|d| d.get("type").and_then(Value::as_str).map(str::to_owned))
    });
    match name.as_deref() {
        Some("error") => {
            let data: Value = serde_json::from_slice(&ev.data).unwrap_or(Value::Null);
            let text = |p: &str| {
                data.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let kind = Some(text("/error/type"))
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "api_error".into());
            let message = scrubber.scrub_str(&text("/error/message"));
            (
                Err(stream_error(&scrubber.scrub_str(&kind), &message)),
                true,
            )
        }
        Some("message_stop") => (Ok((ev.data, name)), true),
        _ => (Ok((ev.data, name)), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_errors_are_relayed_in_openai_shape() {
        let e = translate_status(ProviderError::Status {
            status: 400,
            body: Bytes::from_static(br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}"#),
            retry_after: None,
        });
        let ProviderError::Status { body, .. } = e else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "max_tokens: too big");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn overload_in_a_stream_stays_retryable() {
        assert!(crate::retry::is_retryable(&stream_error(
            "overloaded_error",
            "Overloaded"
        )));
        // A request Anthropic judged in its stream is that 4xx, returned at
        // once like one before the stream (its message relayed).
        let judged = stream_error("invalid_request_error", "prompt is too long");
        assert!(!crate::retry::is_retryable(&judged));
        let ProviderError::Status {
            status: 400, body, ..
        } = judged
        else {
            panic!("{judged:?}")
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "prompt is too long");
        assert!(matches!(
            stream_error("mystery_error", "x"),
            ProviderError::Broken(_)
        ));
    }
}
