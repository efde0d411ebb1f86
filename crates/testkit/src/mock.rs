//! A mock upstream that speaks OpenAI's chat-completions (streamed and not)
//! and embeddings shapes, with injectable latency, time to first token,
//! delay between chunks, error statuses, connection resets mid-stream and
//! hangs. Tests drive it through [`MockUpstream`]; benchmarks run it as the
//! `switchyard-mock` binary.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// How the mock answers when no fault is queued.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Before the response headers.
    pub latency: Duration,
    /// Streams: after the headers, before the first chunk.
    pub ttft: Duration,
    /// Streams: between chunks.
    pub chunk_delay: Duration,
    /// The assistant's reply; streamed one word per chunk.
    pub reply: String,
    /// A fault applied to every request (a queued fault wins).
    pub always: Option<Fault>,
    /// Deterministic partial failure: of every `of` requests, the first
    /// `fail` answer with `status` (e.g. 3 of 10 → 30 %).
    pub fail_pattern: Option<FailPattern>,
    /// Chat answers (not tool calls) carry this reasoning first, as
    /// DeepSeek's and vLLM's reasoning models do: `reasoning_content` in the
    /// message, or streamed one word per chunk before the reply.
    pub reasoning: Option<String>,
    /// Anthropic answers report this many prompt tokens read from the
    /// prompt cache, written to it for five minutes and for an hour
    /// (`cache_read_input_tokens`, `cache_creation_input_tokens` with their
    /// split in `cache_creation`), besides the uncached input.
    pub cache_tokens: Option<(u64, u64, u64)>,
    /// Anthropic answers report this many searches by its web search tool
    /// (`usage.server_tool_use.web_search_requests`) when above 0.
    pub web_searches: u64,
    /// OpenAI-shaped streams leave out the usage chunk even when asked for
    /// it, as some OpenAI-compatible servers do.
    pub ignore_stream_options: bool,
    /// Whole answers (chat completions not streamed, embeddings) carry no
    /// `usage`, as some OpenAI-compatible servers send them.
    pub omit_usage: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailPattern {
    pub status: u16,
    pub fail: u64,
    pub of: u64,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            ttft: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            reply: "Hello! How can I help you today?".into(),
            always: None,
            fail_pattern: None,
            reasoning: None,
            cache_tokens: None,
            web_searches: 0,
            ignore_stream_options: false,
            omit_usage: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and an OpenAI-shaped error body.
    Status(u16),
    /// Answer 429 with `Retry-After: secs`.
    RateLimited { retry_after_secs: u64 },
    /// Answer 404 as OpenAI does for a model it does not have
    /// (`model_not_found`).
    ModelNotFound,
    /// Stream this many chunks, then cut the connection.
    ResetAfterChunks(usize),
    /// Stream this many chunks and the first half of the next, then end
    /// the body as if it were complete: a body cut in the middle of an
    /// event by something that closes cleanly (a proxy's timeout, a
    /// server's shutdown).
    CutInsideChunk(usize),
    /// Accept the request and never answer.
    Hang,
    /// Answer 401 with the Authorization header it received in the message
    /// (as some providers do), to prove the gateway scrubs it.
    EchoAuthorization,
    /// Stream the whole answer but close without `[DONE]`.
    NoDone,
    /// Send this many events of a stream, then an error in the stream:
    /// Anthropic's `error` event (`overloaded_error`), or for OpenAI's shape
    /// a `data:` line holding an `{"error":{…}}` object followed by
    /// `[DONE]`, as vLLM and other OpenAI-compatible servers send. A chat
    /// that is not streamed gets status 200 with that error object as body.
    ErrorEventAfter(usize),
    /// Answer 200 with exactly this body: JSON, or, when it starts with
    /// `data:`, an event stream (shapes the mock does not make itself).
    Raw(String),
}

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// When the request reached the mock (its own clock, for ordering and
    /// gaps between requests, e.g. that a retry waited for `Retry-After`).
    pub at: std::time::Instant,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    behavior: Mutex<Behavior>,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<Recorded>>,
    calls: AtomicU64,
    /// Requests answered with an injected error status.
    injected: AtomicU64,
    record: bool,
    /// While true, streams pause after their first chunk.
    hold: Hold,
}

struct Hold(tokio::sync::watch::Sender<bool>);

impl Default for Hold {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }
}

/// A running mock; stops when dropped.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl MockUpstream {
    /// Starts on a free loopback port, recording every request.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Behavior::default(),
            true,
        )
        .await
    }

    pub async fn start_on(
        addr: SocketAddr,
        behavior: Behavior,
        record: bool,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            behavior: Mutex::new(behavior),
            record,
            ..Shared::default()
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(nodelay(listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            shared,
            _stop: stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as a provider, ending in `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_behavior(&self, b: Behavior) {
        *lock(&self.shared.behavior) = b;
    }

    pub fn update(&self, f: impl FnOnce(&mut Behavior)) {
        f(&mut lock(&self.shared.behavior));
    }

    /// Queues a fault for the next request (faults apply in order, once each).
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.shared.faults).push_back(fault);
    }

    /// Streams started from now on pause after their first chunk until
    /// [`MockUpstream::release_streams`]: a test can then observe that the
    /// first chunk reached the client while the rest was not yet sent.
    pub fn hold_streams(&self) {
        self.shared.hold.0.send_replace(true);
    }

    pub fn release_streams(&self) {
        self.shared.hold.0.send_replace(false);
    }

    /// Chat and embeddings requests received so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Requests answered with an injected error status so far.
    pub fn injected_failures(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.shared.requests).last().cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The mock's routes, for serving it elsewhere (the binary uses this).
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/openai/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(embeddings))
        .route("/v1/openai/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .with_state(shared)
}

/// Serves a mock on `listener` until the process ends (for the binary).
pub async fn serve_forever(listener: TcpListener, behavior: Behavior) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        behavior: Mutex::new(behavior),
        record: false,
        ..Shared::default()
    });
    axum::serve(nodelay(listener), router(shared)).await
}

/// Like a real provider's front end, send small frames without Nagle delay.
fn nodelay(listener: TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

async fn models() -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 1_700_000_000, "owned_by": "mock"}]}))
        .into_response()
}

fn begin(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Value, Behavior, Option<Fault>), Box<Response>> {
    let n = shared.calls.fetch_add(1, Ordering::SeqCst);
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Err(Box::new(error(400, &format!("mock: invalid JSON: {e}")))),
    };
    if shared.record {
        lock(&shared.requests).push(Recorded {
            at: std::time::Instant::now(),
            path: path.to_owned(),
            headers: headers.clone(),
            body: parsed.clone(),
        });
    }
    let behavior = lock(&shared.behavior).clone();
    let pattern = behavior
        .fail_pattern
        .filter(|p| p.of > 0 && n % p.of < p.fail)
        .map(|p| Fault::Status(p.status));
    let fault = lock(&shared.faults)
        .pop_front()
        .or_else(|| behavior.always.clone())
        .or(pattern);
    if matches!(
        fault,
        Some(
            Fault::Status(_)
                | Fault::RateLimited { .. }
                | Fault::EchoAuthorization
                | Fault::ModelNotFound
        )
    ) {
        shared.injected.fetch_add(1, Ordering::SeqCst);
    }
    Ok((parsed, behavior, fault))
}

fn error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    (
        code,
        axum::Json(
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
        ),
    )
        .into_response()
}

/// Applies a fault that ends the request before any body; `None` to go on.
async fn early_fault(fault: &Option<Fault>, headers: &HeaderMap) -> Option<Response> {
    match fault {
        Some(Fault::Status(s)) => Some(error(*s, &format!("mock: injected status {s}"))),
        Some(Fault::ModelNotFound) => Some(
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": {
                    "message": "The model `gpt-mock` does not exist or you do not have access to it.",
                    "type": "invalid_request_error", "param": null, "code": "model_not_found"}})),
            )
                .into_response(),
        ),
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut r = error(429, "mock: rate limited");
            r.headers_mut()
                .insert("retry-after", (*retry_after_secs).into());
            Some(r)
        }
        Some(Fault::EchoAuthorization) => {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            Some(error(401, &format!("Incorrect API key provided: {auth}")))
        }
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Some(error(504, "mock: hung"))
        }
        Some(Fault::Raw(body)) => {
            let kind = if body.starts_with("data:") {
                "text/event-stream"
            } else {
                "application/json"
            };
            Some(
                Response::builder()
                    .header("content-type", kind)
                    .body(Body::from(body.clone()))
                    .unwrap_or_else(|_| error(500, "mock: building the response")),
            )
        }
        _ => None,
    }
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, behavior, fault) = match begin(&shared, uri.path(), &headers, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if !behavior.latency.is_zero() {
        tokio::time::sleep(behavior.latency).await;
    }
    if let Some(r) = early_fault(&fault, &headers).await {
        return r;
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let prompt_tokens = count_prompt_tokens(&req);
    let tool = first_tool(&req);
    // A JSON schema asked for: the answer is an instance of it.
    let structured = req
        .pointer("/response_format/json_schema/schema")
        .filter(|_| {
            req.pointer("/response_format/type").and_then(Value::as_str) == Some("json_schema")
        })
        .map(|schema| instance_of(schema).to_string());
    let reply = structured.as_deref().unwrap_or(&behavior.reply);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        if let Some(Fault::ErrorEventAfter(_)) = fault {
            return axum::Json(in_band_error()).into_response();
        }
        let mut answer = completion(
            &model,
            reply,
            behavior.reasoning.as_deref(),
            tool.as_deref(),
            prompt_tokens,
        );
        if behavior.omit_usage {
            if let Some(o) = answer.as_object_mut() {
                o.remove("usage");
            }
        }
        return axum::Json(answer).into_response();
    }
    let include_usage = !behavior.ignore_stream_options
        && req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    let chunks = stream_chunks(
        &model,
        reply,
        behavior.reasoning.as_deref(),
        tool.as_deref(),
        prompt_tokens,
        include_usage,
    );
    let hold = shared.hold.0.subscribe();
    stream_response(chunks, behavior, fault, hold)
}

fn count_prompt_tokens(req: &Value) -> u64 {
    let messages = req.get("messages").and_then(Value::as_array);
    messages.map_or(0, |ms| {
        ms.iter()
            .map(|m| {
                3 + m
                    .get("content")
                    .and_then(Value::as_str)
                    .map_or(0, |c| c.split_whitespace().count() as u64)
            })
            .sum()
    })
}

/// The function to call when the request offers tools (unless `tool_choice` is `none`).
fn first_tool(req: &Value) -> Option<String> {
    if req.get("tool_choice").and_then(Value::as_str) == Some("none") {
        return None;
    }
    req.get("tools")?
        .as_array()?
        .first()?
        .pointer("/function/name")?
        .as_str()
        .map(str::to_owned)
}

const TOOL_ARGS: &str = r#"{"location": "Paris", "unit": "celsius"}"#;

fn completion(
    model: &str,
    reply: &str,
    reasoning: Option<&str>,
    tool: Option<&str>,
    prompt_tokens: u64,
) -> Value {
    let completion_tokens = reply.split_whitespace().count() as u64;
    let (message, finish) = match tool {
        Some(name) => (
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": TOOL_ARGS}}]}),
            "tool_calls",
        ),
        None => {
            let mut message = json!({"role": "assistant", "content": reply});
            if let Some(r) = reasoning {
                message["reasoning_content"] = json!(r);
            }
            (message, "stop")
        }
    };
    json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": "fp_mock"
    })
}

fn chunk(model: &str, delta: Value, finish: Option<&str>, usage_null: bool) -> Value {
    let mut c = json!({
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
    });
    if usage_null {
        c["usage"] = Value::Null;
    }
    c
}

/// The data payloads of a stream, `[DONE]` excluded.
fn stream_chunks(
    model: &str,
    reply: &str,
    reasoning: Option<&str>,
    tool: Option<&str>,
    prompt_tokens: u64,
    include_usage: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let words: Vec<&str> = reply.split_whitespace().collect();
    match tool {
        Some(name) => {
            out.push(chunk(model, json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": ""}}]}), None, include_usage));
            let mid = TOOL_ARGS.len() / 2;
            for piece in [&TOOL_ARGS[..mid], &TOOL_ARGS[mid..]] {
                out.push(chunk(
                    model,
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                    None,
                    include_usage,
                ));
            }
            out.push(chunk(model, json!({}), Some("tool_calls"), include_usage));
        }
        None => {
            out.push(chunk(
                model,
                json!({"role": "assistant", "content": ""}),
                None,
                include_usage,
            ));
            for (i, w) in reasoning.unwrap_or("").split_whitespace().enumerate() {
                let text = if i == 0 {
                    w.to_owned()
                } else {
                    format!(" {w}")
                };
                out.push(chunk(
                    model,
                    json!({"reasoning_content": text}),
                    None,
                    include_usage,
                ));
            }
            for (i, w) in words.iter().enumerate() {
                let text = if i == 0 {
                    (*w).to_owned()
                } else {
                    format!(" {w}")
                };
                out.push(chunk(model, json!({"content": text}), None, include_usage));
            }
            out.push(chunk(model, json!({}), Some("stop"), include_usage));
        }
    }
    if include_usage {
        let completion_tokens = words.len() as u64;
        out.push(json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        }));
    }
    out.into_iter().map(|c| c.to_string()).collect()
}

/// The error object an OpenAI-compatible server sends with a 200.
fn in_band_error() -> Value {
    json!({"error": {"message": "mock: the server is overloaded", "type": "server_error", "param": null, "code": 503}})
}

fn stream_response(
    chunks: Vec<String>,
    behavior: Behavior,
    fault: Option<Fault>,
    hold: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let mut frames: Vec<String> = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
    if let Some(Fault::ErrorEventAfter(n)) = fault {
        frames.truncate(n);
        frames.push(format!("data: {}\n\n", in_band_error()));
    }
    frames.push("data: [DONE]\n\n".to_owned());
    stream_frames(frames, behavior, fault, hold)
}

/// Sends SSE frames with the behaviour's delays; `NoDone` drops the last
/// frame (the completion marker), `ResetAfterChunks(n)` cuts after n frames.
fn stream_frames(
    mut frames: Vec<String>,
    behavior: Behavior,
    fault: Option<Fault>,
    hold: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let reset_after = match fault {
        Some(Fault::ResetAfterChunks(n)) => Some((n, false)),
        Some(Fault::CutInsideChunk(n)) => Some((n, true)),
        _ => None,
    };
    if fault == Some(Fault::NoDone) {
        frames.pop();
    }
    let body = frame_stream(frames, behavior, reset_after, hold);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| error(500, "mock: building the response"))
}

/// Frames sent whole, and whether the next one's first half went out.
type FrameState = (usize, Vec<String>, bool);

fn frame_stream(
    frames: Vec<String>,
    behavior: Behavior,
    // After this many frames the connection is cut; with `true`, the first
    // half of the next one is sent and the body ends there.
    reset_after: Option<(usize, bool)>,
    hold: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures::stream::unfold(
        (0usize, frames, false),
        move |(i, frames, half_sent): FrameState| {
            let behavior = behavior.clone();
            let mut hold = hold.clone();
            async move {
                if i == 1 {
                    let _ = hold.wait_for(|held| !held).await;
                }
                if let Some((n, half)) = reset_after {
                    if i == n && half {
                        if half_sent {
                            return None;
                        }
                        let frame = frames.get(i)?;
                        let cut = Bytes::copy_from_slice(&frame.as_bytes()[..frame.len() / 2]);
                        return Some((Ok(cut), (i, frames, true)));
                    }
                    if i == n {
                        // Give the frames before the cut time to reach the wire,
                        // as they would from a real provider that fails midway.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        let reset = std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "mock: injected reset",
                        );
                        return Some((Err(reset), (i + 1, frames, false)));
                    }
                    if i > n {
                        return None;
                    }
                }
                let frame = frames.get(i)?.clone();
                let delay = if i == 0 {
                    behavior.ttft
                } else {
                    behavior.chunk_delay
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok(Bytes::from(frame)), (i + 1, frames, false)))
            }
        },
    )
}

/// Anthropic's Messages API: the same reply, tools and faults, in its shape.
/// Anthropic's token count: 4 a message, as the mock's Messages answers
/// count their input; faults apply as to a Messages call.
async fn count_tokens(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, _, fault) = match begin(&shared, uri.path(), &headers, &body) {
        Ok(x) => x,
        Err(_) => return anthropic_error(400, "mock: invalid JSON"),
    };
    if let Some(r) = early_fault(&fault, &headers).await {
        let status = r.status().as_u16();
        return anthropic_error(status, &format!("mock: injected status {status}"));
    }
    let messages = req.get("messages").and_then(Value::as_array);
    axum::Json(json!({"input_tokens": messages.map_or(0, |m| m.len() as u64 * 4)})).into_response()
}

async fn messages(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, behavior, fault) = match begin(&shared, uri.path(), &headers, &body) {
        Ok(x) => x,
        Err(_) => return anthropic_error(400, "mock: invalid JSON"),
    };
    if !behavior.latency.is_zero() {
        tokio::time::sleep(behavior.latency).await;
    }
    if let Some(r) = early_fault(&fault, &headers).await {
        if matches!(fault, Some(Fault::Raw(_))) {
            return r;
        }
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").cloned();
        let mut resp = anthropic_error(status, &format!("mock: injected status {status}"));
        if let Some(v) = retry_after {
            resp.headers_mut().insert("retry-after", v);
        }
        return resp;
    }
    if let Some(refusal) = anthropic_refusal(&req) {
        return anthropic_error(400, &refusal);
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-claude")
        .to_owned();
    // Extended thinking asked for: a signed thinking block comes first.
    let thinking = matches!(
        req.pointer("/thinking/type").and_then(Value::as_str),
        Some("enabled" | "adaptive")
    );
    let tool = req
        .get("tools")
        .and_then(Value::as_array)
        .and_then(|t| t.first())
        .and_then(|t| t.get("name"))
        .and_then(Value::as_str)
        .filter(|_| req.pointer("/tool_choice/type").and_then(Value::as_str) != Some("none"))
        .map(str::to_owned);
    let input_tokens = req
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |m| m.len() as u64 * 4);
    let mut usage = json!({"input_tokens": input_tokens, "output_tokens": 1});
    if let Some((read, five_minutes, one_hour)) = behavior.cache_tokens {
        usage["cache_read_input_tokens"] = json!(read);
        usage["cache_creation_input_tokens"] = json!(five_minutes + one_hour);
        usage["cache_creation"] = json!({"ephemeral_5m_input_tokens": five_minutes,
            "ephemeral_1h_input_tokens": one_hour});
    }
    let server_tool_use =
        (behavior.web_searches > 0).then(|| json!({"web_search_requests": behavior.web_searches}));
    if let Some(s) = &server_tool_use {
        usage["server_tool_use"] = s.clone();
    }
    // Structured output asked for: the answer is an instance of the schema.
    let structured = req
        .pointer("/output_config/format")
        .or_else(|| req.get("output_format"))
        .filter(|f| f.get("type").and_then(Value::as_str) == Some("json_schema"))
        .and_then(|f| f.get("schema"))
        .map(|schema| instance_of(schema).to_string());
    let (reply, stop_sequence) =
        stop_at_sequence(&req, structured.as_deref().unwrap_or(&behavior.reply));
    let words: Vec<&str> = reply.split_whitespace().collect();
    let text_stop = if stop_sequence.is_some() {
        "stop_sequence"
    } else {
        "end_turn"
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let (content, stop) = match &tool {
            Some(name) => (
                json!([{"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": serde_json::from_str::<Value>(TOOL_ARGS).unwrap_or(Value::Null)}]),
                "tool_use",
            ),
            None => (json!([{"type": "text", "text": reply}]), text_stop),
        };
        let content = match (thinking, content) {
            (true, Value::Array(mut blocks)) => {
                blocks.insert(0, json!({"type": "thinking", "thinking": MOCK_THOUGHT, "signature": MOCK_SIGNATURE}));
                Value::Array(blocks)
            }
            (_, content) => content,
        };
        usage["output_tokens"] = json!(words.len());
        return axum::Json(json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": stop_sequence,
            "usage": usage,
        }))
        .into_response();
    }
    let mut events: Vec<(&str, Value)> = vec![(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": usage}}),
    )];
    let index = u64::from(thinking);
    if thinking {
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ));
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "thinking_delta", "thinking": MOCK_THOUGHT}}),
        ));
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "signature_delta", "signature": MOCK_SIGNATURE}}),
        ));
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
    }
    let stop = match &tool {
        Some(name) => {
            events.push(("content_block_start", json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": {}}})));
            let mid = TOOL_ARGS.len() / 2;
            for piece in [&TOOL_ARGS[..mid], &TOOL_ARGS[mid..]] {
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
            "tool_use"
        }
        None => {
            events.push(("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
            events.push(("ping", json!({"type": "ping"})));
            for (i, w) in words.iter().enumerate() {
                let text = if i == 0 {
                    (*w).to_owned()
                } else {
                    format!(" {w}")
                };
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
                ));
            }
            text_stop
        }
    };
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    ));
    events.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": stop_sequence},
        "usage": match &server_tool_use {
            Some(s) => json!({"output_tokens": words.len(), "server_tool_use": s}),
            None => json!({"output_tokens": words.len()}),
        }}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    if let Some(Fault::ErrorEventAfter(n)) = fault {
        events.truncate(n);
        events.push((
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "mock: overloaded mid-stream"}}),
        ));
    }
    let frames: Vec<String> = events
        .into_iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    let hold = shared.hold.0.subscribe();
    stream_frames(frames, behavior, fault, hold)
}

/// The first object schema in `schema` that is not closed
/// (`additionalProperties: false`), which Anthropic's structured outputs
/// refuse, as its JSON.
fn open_object(schema: &Value) -> Option<String> {
    let Value::Object(s) = schema else {
        return None;
    };
    if s.get("type").and_then(Value::as_str) == Some("object")
        && s.get("additionalProperties") != Some(&Value::Bool(false))
    {
        return Some(schema.to_string());
    }
    // Sub-schemas, not data (`const`, `enum`, `default`, `examples`).
    s.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "const" | "enum" | "default" | "examples"))
        .find_map(|(_, v)| match v {
            Value::Array(items) => items.iter().find_map(open_object),
            Value::Object(m) => open_object(v).or_else(|| m.values().find_map(open_object)),
            _ => None,
        })
}

/// A small JSON value a `schema` accepts: an object with every property
/// (`$ref`s unresolved: null), an enum's first value, a type's zero.
fn instance_of(schema: &Value) -> Value {
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => Value::Object(
            schema
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), instance_of(v)))
                .collect(),
        ),
        Some("array") => json!([]),
        Some("string") => json!("mock"),
        Some("integer" | "number") => json!(0),
        Some("boolean") => json!(false),
        _ => Value::Null,
    }
}

/// The thinking a mock Claude does when asked to, and its signature.
pub const MOCK_THOUGHT: &str = "mock: thinking it over.";
pub const MOCK_SIGNATURE: &str = "mock-signature-EqQBCkgIARABGAIiQL";

/// What Anthropic's API refuses that an OpenAI-compatible one takes, so
/// that tests of what Switchyard sends fail where Anthropic would: fields
/// it does not know, empty text blocks or content, thinking blocks without
/// a signature (only Anthropic signs them), `metadata` keys other than
/// `user_id`, a temperature above 1, open objects in a structured-output
/// schema, and with thinking on: a budget below 1,024 or not below
/// `max_tokens`, sampling other than the default, a forced tool, a
/// prefill, or a tool loop not opened by thinking.
fn anthropic_refusal(req: &Value) -> Option<String> {
    // Anthropic's request fields, written out here rather than taken from
    // `switchyard_core::anthropic::NATIVE_FIELDS`: the mock stands for
    // Anthropic, so a field the gateway wrongly believes Anthropic takes
    // must fail here, not pass because both read one list.
    const FIELDS: [&str; 19] = [
        "model",
        "messages",
        "max_tokens",
        "stream",
        "system",
        "metadata",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "context_management",
        "output_format",
        "output_config",
        "container",
        "mcp_servers",
        "service_tier",
    ];
    if let Some(k) = req
        .as_object()?
        .keys()
        .find(|k| !FIELDS.contains(&k.as_str()))
    {
        return Some(format!("{k}: Extra inputs are not permitted"));
    }
    if req
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t > 1.0)
    {
        return Some("temperature: range: 0..1".into());
    }
    if let Some(schema) = req.pointer("/output_config/format/schema") {
        if let Some(open) = open_object(schema) {
            return Some(format!(
                "output_config.format.schema: For 'object' type, 'additionalProperties' must be \
                 explicitly set to false ({open})"
            ));
        }
    }
    if let Some(m) = req.get("metadata").and_then(Value::as_object) {
        if let Some(k) = m.keys().find(|k| *k != "user_id") {
            return Some(format!("metadata.{k}: Extra inputs are not permitted"));
        }
    }
    let messages = req.get("messages").and_then(Value::as_array)?;
    for (i, m) in messages.iter().enumerate() {
        if let Some(k) = m
            .as_object()
            .and_then(|m| m.keys().find(|k| *k != "role" && *k != "content"))
        {
            return Some(format!("messages.{i}.{k}: Extra inputs are not permitted"));
        }
        match m.get("content") {
            Some(Value::String(s)) if s.is_empty() => {
                return Some(format!(
                    "messages.{i}: all messages must have non-empty content"
                ))
            }
            Some(Value::Array(blocks)) => {
                if blocks.is_empty() {
                    return Some(format!(
                        "messages.{i}: all messages must have non-empty content"
                    ));
                }
                for (j, b) in blocks.iter().enumerate() {
                    let kind = b.get("type").and_then(Value::as_str);
                    if kind == Some("text") && b.get("text").and_then(Value::as_str) == Some("") {
                        return Some(format!(
                            "messages.{i}.content.{j}.text: text content blocks must be non-empty"
                        ));
                    }
                    if kind == Some("thinking")
                        && b.get("signature")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty)
                    {
                        return Some(format!(
                            "messages.{i}.content.{j}: Invalid `signature` in `thinking` block"
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    // With thinking on, a tool loop (the messages since the last user
    // message that is not only tool results) must open with its thinking.
    let thinking = matches!(
        req.pointer("/thinking/type").and_then(Value::as_str),
        Some("enabled" | "adaptive")
    );
    let kind = |b: &Value| b.get("type").and_then(Value::as_str).map(str::to_owned);
    let blocks_of = |m: &Value| {
        m.get("content")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let turn_start = messages
        .iter()
        .rposition(|m| {
            m.get("role").and_then(Value::as_str) == Some("user")
                && (m.get("content").is_some_and(Value::is_string)
                    || blocks_of(m)
                        .iter()
                        .any(|b| kind(b).as_deref() != Some("tool_result")))
        })
        .map_or(0, |i| i + 1);
    // And thinking takes a budget of 1,024 tokens or more, below
    // max_tokens, the default sampling only, no forced tool and no prefill.
    if let Some(budget) = req
        .pointer("/thinking/budget_tokens")
        .and_then(Value::as_u64)
    {
        let max_tokens = req.get("max_tokens").and_then(Value::as_u64).unwrap_or(0);
        if budget < 1024 {
            return Some(
                "thinking.budget_tokens: Input should be greater than or equal to 1024".into(),
            );
        }
        if budget >= max_tokens {
            return Some("`max_tokens` must be greater than `thinking.budget_tokens`".into());
        }
    }
    if thinking {
        let number = |k: &str| req.get(k).and_then(Value::as_f64);
        if number("temperature").is_some_and(|t| t != 1.0) {
            return Some(
                "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode"
                    .into(),
            );
        }
        if req.get("top_k").is_some() {
            return Some("`top_k` is not compatible with thinking (enabled or adaptive)".into());
        }
        if number("top_p").is_some_and(|p| p < 0.95) {
            return Some(
                "`top_p` must be greater than or equal to 0.95 or unset when thinking is enabled"
                    .into(),
            );
        }
        if matches!(
            req.pointer("/tool_choice/type").and_then(Value::as_str),
            Some("any" | "tool")
        ) {
            return Some("Thinking may not be enabled when tool_choice forces tool use.".into());
        }
        if messages
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            == Some("assistant")
        {
            return Some(
                "This model does not support assistant message prefill with thinking enabled"
                    .into(),
            );
        }
    }
    let opener = (turn_start..messages.len())
        .find(|&i| messages[i].get("role").and_then(Value::as_str) == Some("assistant"));
    if let (true, Some(i)) = (thinking, opener) {
        let calls = messages[i..]
            .iter()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            .flat_map(blocks_of)
            .any(|b| kind(&b).as_deref() == Some("tool_use"));
        let opens = blocks_of(&messages[i]).first().and_then(kind);
        if calls && !matches!(opens.as_deref(), Some("thinking" | "redacted_thinking")) {
            return Some(format!(
                "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{}`",
                opens.unwrap_or_default()
            ));
        }
    }
    None
}

/// Like Anthropic, ends the reply before the first of the request's
/// `stop_sequences` it contains, and names the sequence.
fn stop_at_sequence(req: &Value, reply: &str) -> (String, Option<String>) {
    let first = req
        .get("stop_sequences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|s| reply.find(s).map(|at| (at, s)))
        .min();
    match first {
        Some((at, s)) => (reply[..at].to_owned(), Some(s.to_owned())),
        None => (reply.to_owned(), None),
    }
}

fn anthropic_error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = match status {
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        401 => "authentication_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    (
        code,
        axum::Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, behavior, fault) = match begin(&shared, uri.path(), &headers, &body) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if !behavior.latency.is_zero() {
        tokio::time::sleep(behavior.latency).await;
    }
    if let Some(r) = early_fault(&fault, &headers).await {
        return r;
    }
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
            vec![Value::Array(items.clone()).to_string()]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect(),
        _ => return error(400, "mock: input is required"),
    };
    let dims = req.get("dimensions").and_then(Value::as_u64).unwrap_or(8) as usize;
    let base64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let v = mock_embedding(text, dims);
            let embedding = if base64 {
                let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(raw))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs
        .iter()
        .map(|t| t.split_whitespace().count() as u64)
        .sum();
    let model = req.get("model").cloned().unwrap_or(Value::Null);
    let mut answer = json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    if behavior.omit_usage {
        if let Some(o) = answer.as_object_mut() {
            o.remove("usage");
        }
    }
    axum::Json(answer).into_response()
}

/// A deterministic unit vector derived from the text (FNV-1a seeded).
pub fn mock_embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut v: Vec<f32> = (0..dims)
        .map(|i| {
            h ^= i as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
            ((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

#[cfg(test)]
mod tests {
    //! The faults as a client sees them. Time is paused: the mock's sleeps
    //! end as soon as nothing else can run, and the times measured are the
    //! paused clock's, so no test waits or depends on the machine's speed.

    use super::*;
    use tokio::time::Instant;

    async fn mock(behavior: Behavior) -> MockUpstream {
        MockUpstream::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), behavior, true)
            .await
            .unwrap()
    }

    async fn post(mock: &MockUpstream, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    fn chat(stream: bool) -> Value {
        json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    }

    /// Reads a body to its end, or to the error that cut it.
    async fn read_all(mut resp: reqwest::Response) -> (String, Result<(), reqwest::Error>) {
        let mut body = String::new();
        loop {
            match resp.chunk().await {
                Ok(Some(b)) => body.push_str(&String::from_utf8_lossy(&b)),
                Ok(None) => return (body, Ok(())),
                Err(e) => return (body, Err(e)),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn latency_delays_the_response() {
        let m = mock(Behavior {
            latency: Duration::from_millis(300),
            ..Behavior::default()
        })
        .await;
        let start = Instant::now();

        let resp = post(&m, chat(false)).await;

        assert_eq!(resp.status(), 200);
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn ttft_delays_the_first_chunk_but_not_the_headers() {
        let m = mock(Behavior {
            ttft: Duration::from_secs(2),
            ..Behavior::default()
        })
        .await;
        let start = Instant::now();

        let mut resp = post(&m, chat(true)).await;
        let headers_at = start.elapsed();
        let first = resp.chunk().await.unwrap().unwrap();
        let first_at = start.elapsed();

        assert_eq!(resp.status(), 200);
        assert!(headers_at < Duration::from_secs(2), "{headers_at:?}");
        assert!(first_at >= Duration::from_secs(2), "{first_at:?}");
        assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    }

    #[tokio::test(start_paused = true)]
    async fn chunk_delay_spaces_every_chunk_after_the_first() {
        let m = mock(Behavior {
            chunk_delay: Duration::from_millis(100),
            reply: "one two three".into(),
            ..Behavior::default()
        })
        .await;
        let start = Instant::now();

        let (body, end) = read_all(post(&m, chat(true)).await).await;

        end.unwrap();
        // The role chunk, three words, the stop chunk and [DONE]: five gaps.
        assert_eq!(body.matches("data: ").count(), 6, "{body}");
        assert!(start.elapsed() >= Duration::from_millis(500));
        assert!(body.ends_with("data: [DONE]\n\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_mid_stream_truncates_the_body() {
        let m = mock(Behavior::default()).await;
        m.push_fault(Fault::ResetAfterChunks(2));

        let resp = post(&m, chat(true)).await;
        assert_eq!(resp.status(), 200);
        let (body, end) = read_all(resp).await;

        assert!(end.is_err(), "the body ended cleanly: {body}");
        assert_eq!(body.matches("data: ").count(), 2, "{body}");
        assert!(!body.contains("[DONE]"));
        // The fault applied once: the next stream is whole.
        let (body, end) = read_all(post(&m, chat(true)).await).await;
        end.unwrap();
        assert!(body.ends_with("data: [DONE]\n\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn no_done_ends_the_stream_cleanly_without_the_marker() {
        let m = mock(Behavior::default()).await;
        m.push_fault(Fault::NoDone);

        let (body, end) = read_all(post(&m, chat(true)).await).await;

        end.unwrap();
        assert!(body.contains("\"finish_reason\":\"stop\""), "{body}");
        assert!(!body.contains("[DONE]"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hang_never_answers() {
        let m = mock(Behavior {
            always: Some(Fault::Hang),
            ..Behavior::default()
        })
        .await;

        let answer = tokio::time::timeout(Duration::from_secs(600), post(&m, chat(false))).await;

        assert!(answer.is_err(), "the mock answered");
        assert_eq!(m.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_faults_apply_once_each_in_order_before_the_standing_one() {
        let m = mock(Behavior {
            always: Some(Fault::Status(500)),
            ..Behavior::default()
        })
        .await;
        m.push_fault(Fault::Status(400));
        m.push_fault(Fault::RateLimited {
            retry_after_secs: 7,
        });

        let first = post(&m, chat(false)).await;
        let second = post(&m, chat(false)).await;
        let third = post(&m, chat(false)).await;

        assert_eq!(first.status(), 400);
        assert_eq!(second.status(), 429);
        assert_eq!(second.headers()["retry-after"], "7");
        assert_eq!(third.status(), 500);
        let body: Value = third.json().await.unwrap();
        assert_eq!(body["error"]["type"], "server_error");
        assert_eq!(m.injected_failures(), 3);
    }
}
