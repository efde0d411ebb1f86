//! The local models behind the provider traits: requests are read from
//! OpenAI's shape, run on the worker pools, and answered in OpenAI's shape
//! (a `chat.completion`, a stream of `chat.completion.chunk`s ending with the
//! usage chunk, or an embeddings list), so the gateway treats the local model
//! like any other deployment.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use switchyard_core::local::{LocalConfig, LOCAL_CHAT_MODEL, LOCAL_EMBEDDING_MODEL};
use switchyard_core::openai::{EncodingFormat, Usage};
use switchyard_providers::{
    ChatCall, ChatProvider, ChatReply, Completion, EmbedCall, EmbeddingProvider, ProviderError,
};
use tokio::sync::{mpsc, oneshot};

use crate::chat::{ChatModel, FinishReason, Generation};
use crate::embed::EmbedModel;
use crate::pool::Pool;
use crate::request::{generate_request, Refusal};
use crate::tools::{ReplyEvent, ReplyParser};
use crate::LocalError;

/// How long a refused client is told to wait.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Chunks buffered between the worker and the response.
const STREAM_BUFFER: usize = 64;

/// The loaded models and the pools that run them; one per process, shared
/// by every provider entry of kind `local`.
pub struct LocalModels {
    chat: Option<Arc<ChatModel>>,
    embed: Option<Arc<EmbedModel>>,
    chat_pool: Pool,
    embed_pool: Pool,
    default_max_tokens: u32,
}

impl LocalModels {
    /// Wraps loaded models with their pools: `max_concurrent` chat workers
    /// and one embedding worker (a batch already uses every thread), each
    /// with `queue` waiting places.
    pub fn new(
        chat: Option<ChatModel>,
        embed: Option<EmbedModel>,
        config: &LocalConfig,
    ) -> Result<Self, LocalError> {
        Ok(Self {
            chat: chat.map(Arc::new),
            embed: embed.map(Arc::new),
            chat_pool: Pool::new("chat", config.max_concurrent, config.queue)?,
            embed_pool: Pool::new("embed", 1, config.queue)?,
            default_max_tokens: config.default_max_tokens,
        })
    }
}

pub struct LocalProvider {
    name: String,
    models: Arc<LocalModels>,
}

impl LocalProvider {
    pub fn new(name: &str, models: Arc<LocalModels>) -> Self {
        Self {
            name: name.to_owned(),
            models,
        }
    }

    fn chat_model(&self, upstream: &str) -> Result<Arc<ChatModel>, ProviderError> {
        match (&self.models.chat, upstream) {
            (Some(m), LOCAL_CHAT_MODEL) => Ok(m.clone()),
            _ => Err(not_served(upstream, "chat")),
        }
    }
}

fn not_served(model: &str, what: &str) -> ProviderError {
    rejected(
        404,
        "model_not_found",
        Some("model"),
        &format!("The local provider has no {what} model `{model}` loaded."),
    )
}

/// A refusal in OpenAI's error shape, which the server relays as is.
fn rejected(status: u16, code: &str, param: Option<&str>, message: &str) -> ProviderError {
    let body = json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": param,
        "code": code,
    }});
    ProviderError::Status {
        status,
        body: Bytes::from(body.to_string()),
        retry_after: None,
    }
}

fn refusal(r: Refusal) -> ProviderError {
    rejected(400, "invalid_request_error", Some(&r.param), &r.message)
}

fn engine_error(e: LocalError) -> ProviderError {
    match e {
        LocalError::Busy => ProviderError::Overloaded {
            retry_after: BUSY_RETRY_AFTER,
        },
        LocalError::Invalid(message) => rejected(400, "invalid_request_error", None, &message),
        e @ (LocalError::Load { .. } | LocalError::Inference(_)) => {
            ProviderError::Broken(e.to_string())
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Ids unique within the process and across restarts.
fn unique_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{prefix}{nanos:x}{:04x}",
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}

/// `chatcmpl-…`, as OpenAI names completions.
fn completion_id() -> String {
    unique_id("chatcmpl-local")
}

/// `call_…`, as OpenAI names tool calls.
fn call_id() -> String {
    unique_id("call_local")
}

/// How the generated text becomes the message: as it is, or read as the
/// tool grammar's JSON (`crate::tools`).
enum Shape {
    Text,
    Tools(ReplyParser),
}

impl Shape {
    fn new(tools: bool) -> Self {
        if tools {
            Shape::Tools(ReplyParser::new())
        } else {
            Shape::Text
        }
    }

    fn events(&mut self, piece: &str) -> Vec<ReplyEvent> {
        match self {
            Shape::Text => vec![ReplyEvent::Text(piece.to_owned())],
            Shape::Tools(parser) => parser.push(piece),
        }
    }

    /// OpenAI's finish reason: `tool_calls` when the reply is a whole call.
    fn finish_reason(&self, g: &Generation) -> &'static str {
        match self {
            Shape::Tools(parser) if g.finish == FinishReason::Stop && parser.call_complete() => {
                "tool_calls"
            }
            _ => finish_reason(&g.finish),
        }
    }
}

fn finish_reason(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    })
}

/// Builds the chunks of one streamed answer, all with the same id.
struct Chunks {
    id: String,
    created: u64,
    model: &'static str,
    sent_role: bool,
}

impl Chunks {
    /// One `chat.completion.chunk` with these choices (and usage, for the last).
    fn frame(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(v.to_string())
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        self.frame(
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]),
            None,
        )
    }

    /// The chunks for a piece of text: the role first, once, as OpenAI does.
    fn text(&mut self, text: &str) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(2);
        if !self.sent_role {
            self.sent_role = true;
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        }
        if !text.is_empty() {
            out.push(self.chunk(json!({"content": text}), None));
        }
        out
    }

    /// A tool call begins: id, name and empty arguments, as OpenAI's
    /// first tool-call chunk (with the role, if no chunk had it yet).
    fn call(&mut self, name: &str) -> Bytes {
        let call = json!([{
            "index": 0,
            "id": call_id(),
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }]);
        if self.sent_role {
            return self.chunk(json!({"tool_calls": call}), None);
        }
        self.sent_role = true;
        self.chunk(
            json!({"role": "assistant", "content": null, "tool_calls": call}),
            None,
        )
    }

    fn arguments(&self, text: &str) -> Bytes {
        self.chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}),
            None,
        )
    }

    fn event(&mut self, event: &ReplyEvent) -> Vec<Bytes> {
        match event {
            ReplyEvent::Text(text) => self.text(text),
            ReplyEvent::Call(name) => vec![self.call(name)],
            ReplyEvent::Arguments(text) => vec![self.arguments(text)],
        }
    }

    fn end(&mut self, g: &Generation, finish: &str) -> Vec<Bytes> {
        let mut out = self.text("");
        out.push(self.chunk(json!({}), Some(finish)));
        out.push(self.frame(json!([]), Some(usage_json(g))));
        out
    }
}

/// A whole (non-streamed) reply, gathered from its events.
#[derive(Default)]
struct Message {
    text: String,
    call: Option<(String, String)>,
    finish: &'static str,
}

impl Message {
    fn add(&mut self, event: ReplyEvent) {
        match event {
            ReplyEvent::Text(text) => self.text.push_str(&text),
            ReplyEvent::Call(name) => self.call = Some((name, String::new())),
            ReplyEvent::Arguments(text) => {
                if let Some((_, arguments)) = &mut self.call {
                    arguments.push_str(&text);
                }
            }
        }
    }

    fn json(&self) -> Value {
        match &self.call {
            Some((name, arguments)) => json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": call_id(),
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }],
                "refusal": null,
            }),
            None => json!({"role": "assistant", "content": self.text, "refusal": null}),
        }
    }
}

#[async_trait]
impl ChatProvider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn probe(&self, _timeout: Duration) -> Result<(), ProviderError> {
        // In-process: loaded models are always reachable.
        Ok(())
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatReply, ProviderError> {
        let model = self.chat_model(call.upstream_model)?;
        let local = generate_request(call.body, self.models.default_max_tokens).map_err(refusal)?;
        let request = local.generate;
        let mut shape = Shape::new(local.tools);
        if call.stream {
            let (tx, rx) = mpsc::channel::<Result<Bytes, ProviderError>>(STREAM_BUFFER);
            let mut chunks = Chunks {
                id: completion_id(),
                created: now_secs(),
                model: LOCAL_CHAT_MODEL,
                sent_role: false,
            };
            self.models
                .chat_pool
                .submit(move || {
                    if tx.is_closed() {
                        return; // the client left while the job was queued
                    }
                    let send = |b: Bytes| tx.blocking_send(Ok(b)).is_ok();
                    let mut on_text = |piece: &str| {
                        for event in shape.events(piece) {
                            for b in chunks.event(&event) {
                                if !send(b) {
                                    return ControlFlow::Break(());
                                }
                            }
                        }
                        ControlFlow::Continue(())
                    };
                    match model.generate(&request, &mut on_text) {
                        Ok(g) => {
                            let finish = shape.finish_reason(&g);
                            for b in chunks.end(&g, finish) {
                                if !send(b) {
                                    break;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.blocking_send(Err(engine_error(e)));
                        }
                    }
                })
                .map_err(engine_error)?;
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            return Ok(ChatReply::Stream(Box::pin(stream)));
        }
        let (tx, rx) = oneshot::channel::<Result<(Message, Generation), LocalError>>();
        self.models
            .chat_pool
            .submit(move || {
                if tx.is_closed() {
                    return;
                }
                let mut message = Message::default();
                let mut on_text = |piece: &str| {
                    for event in shape.events(piece) {
                        message.add(event);
                    }
                    // Stop working for a caller that has gone.
                    if tx.is_closed() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                };
                let result = model.generate(&request, &mut on_text).map(|g| {
                    message.finish = shape.finish_reason(&g);
                    (message, g)
                });
                let _ = tx.send(result);
            })
            .map_err(engine_error)?;
        let (message, g) = rx
            .await
            .map_err(|_| ProviderError::Broken("the local worker stopped".into()))?
            .map_err(engine_error)?;
        let body = json!({
            "id": completion_id(),
            "object": "chat.completion",
            "created": now_secs(),
            "model": LOCAL_CHAT_MODEL,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": message.json(),
                "logprobs": null,
                "finish_reason": message.finish,
            }],
            "usage": usage_json(&g),
        });
        Ok(ChatReply::Complete(Completion {
            body: Bytes::from(body.to_string()),
            usage: Some(Usage::new(
                u64::from(g.prompt_tokens),
                u64::from(g.completion_tokens),
            )),
        }))
    }
}

/// The inputs of an embeddings body: a string or an array of strings
/// (token arrays are for a provider's own tokenizer, which this is not).
fn embedding_inputs(body: &Map<String, Value>) -> Result<Vec<String>, ProviderError> {
    let bad =
        |param: &str, message: &str| rejected(400, "invalid_request_error", Some(param), message);
    let inputs = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    bad(
                        &format!("input[{i}]"),
                        "The local embedding model takes text: send strings, not token arrays.",
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("input", "Expected a string or an array of strings.")),
    };
    Ok(inputs)
}

#[async_trait]
impl EmbeddingProvider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn embed(&self, call: EmbedCall<'_>) -> Result<Completion, ProviderError> {
        let model = match (&self.models.embed, call.upstream_model) {
            (Some(m), LOCAL_EMBEDDING_MODEL) => m.clone(),
            _ => return Err(not_served(call.upstream_model, "embedding")),
        };
        if let Some(d) = call.body.get("dimensions").filter(|v| !v.is_null()) {
            if d.as_u64() != Some(model.dimensions() as u64) {
                return Err(rejected(
                    400,
                    "invalid_request_error",
                    Some("dimensions"),
                    &format!(
                        "The local embedding model gives {} dimensions only.",
                        model.dimensions()
                    ),
                ));
            }
        }
        let inputs = embedding_inputs(call.body)?;
        let (tx, rx) = oneshot::channel();
        self.models
            .embed_pool
            .submit(move || {
                if tx.is_closed() {
                    return;
                }
                let texts: Vec<&str> = inputs.iter().map(String::as_str).collect();
                let _ = tx.send(model.embed(&texts));
            })
            .map_err(engine_error)?;
        let out = rx
            .await
            .map_err(|_| ProviderError::Broken("the local worker stopped".into()))?
            .map_err(engine_error)?;
        let data: Vec<Value> = out
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = match call.encoding_format {
                    EncodingFormat::Float => json!(v),
                    EncodingFormat::Base64 => {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        let body = json!({
            "object": "list",
            "data": data,
            "model": LOCAL_EMBEDDING_MODEL,
            "usage": {"prompt_tokens": out.prompt_tokens, "total_tokens": out.prompt_tokens},
        });
        Ok(Completion {
            body: Bytes::from(body.to_string()),
            usage: Some(Usage::new(u64::from(out.prompt_tokens), 0)),
        })
    }
}
