//! Sending a message and generating the reply: the user turn and an
//! assistant placeholder are stored before the provider is called; the reply
//! streams into a [`Transcript`] from a task of its own; its end (content,
//! usage, cost, latency, frames) is stored before the last frame is sent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use switchyard_core::config::Pricing;
use switchyard_core::identity::Principal;
use switchyard_core::openai::{ChatRequest, Usage};
use switchyard_core::sessions::{Message, MessageCompletion, MessageStatus, StoredResponse};
use switchyard_core::usage::new_id;
use tokio::sync::oneshot;
use tracing::Instrument;

use super::transcript::{render_all, Frame, Transcript};
use super::views::message_json;
use super::{invalid, may_see, Inner, SessionError, Sessions};
use crate::gateway::{public_error, ChatOutcome, PublicError, RequestMeta};
use crate::idempotency::Claimed;
use crate::identity::now_ms;
use crate::metered::StreamEvent;

/// `POST /v1/sessions/{id}/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub content: String,
    /// A model alias overriding the bot's.
    #[serde(default)]
    pub model: Option<String>,
}

/// How the caller wants the reply (and how an idempotent replay is stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// `text/event-stream` frames.
    Sse,
    /// The final message as JSON.
    Json,
}

/// A reply in progress.
pub struct ReplyHandle {
    pub user_message: Message,
    pub assistant_id: String,
    pub transcript: Arc<Transcript>,
    /// The stored response once the reply has ended (what an idempotent
    /// repeat gets), whichever mode was asked for.
    pub finished: oneshot::Receiver<StoredResponse>,
}

/// History sent with a new message: how many stored turns are considered.
const HISTORY_WINDOW: u32 = 200;

/// A rough token count: about three bytes per token, plus the per-message
/// overhead of the chat format. Errs towards more tokens, not fewer.
fn estimate_tokens(text: &str) -> u32 {
    (text.len().div_ceil(3) + 4).min(u32::MAX as usize) as u32
}

/// The messages to send: the system prompt, then the newest turns of
/// `history` (given newest first, as `(role, content)`) that fit `budget`
/// with the new message, oldest first.
pub(crate) fn build_messages(
    system: Option<&str>,
    history: &[(String, String)],
    content: &str,
    budget: u32,
) -> Vec<Value> {
    let mut left = i64::from(budget);
    left -= i64::from(system.map_or(0, estimate_tokens));
    left -= i64::from(estimate_tokens(content));
    let mut kept = Vec::new();
    for (role, text) in history {
        left -= i64::from(estimate_tokens(text));
        if left < 0 {
            break;
        }
        kept.push(json!({"role": role, "content": text}));
    }
    let mut out = Vec::with_capacity(kept.len() + 2);
    if let Some(s) = system {
        out.push(json!({"role": "system", "content": s}));
    }
    out.extend(kept.into_iter().rev());
    out.push(json!({"role": "user", "content": content}));
    out
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default, deserialize_with = "switchyard_core::openai::lenient_usage")]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

/// One job for the generating task.
struct Job {
    meta: RequestMeta,
    request: ChatRequest,
    transcript: Arc<Transcript>,
    assistant: Message,
    mode: ReplyMode,
    claim: Option<Claimed>,
    finished: oneshot::Sender<StoredResponse>,
}

/// What the reply came to.
struct Ending {
    content: String,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    pricing: Option<Pricing>,
    provider: Option<Arc<str>>,
    error: Option<PublicError>,
}

impl Sessions {
    /// Stores the user's message and starts the reply. A refusal (nothing
    /// stored) frees the idempotency key before it returns, so a corrected
    /// retry with the same key is not refused as in flight.
    pub async fn send(
        &self,
        who: &Principal,
        session_id: &str,
        msg: SendMessage,
        meta: RequestMeta,
        mode: ReplyMode,
        mut claim: Option<Claimed>,
    ) -> Result<ReplyHandle, SessionError> {
        match self
            .start(who, session_id, msg, meta, mode, &mut claim)
            .await
        {
            Ok(handle) => Ok(handle),
            Err(e) => {
                if let Some(c) = claim.take() {
                    c.release().await;
                }
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        who: &Principal,
        session_id: &str,
        msg: SendMessage,
        mut meta: RequestMeta,
        mode: ReplyMode,
        claim: &mut Option<Claimed>,
    ) -> Result<ReplyHandle, SessionError> {
        let settings = &self.inner.settings;
        if msg.content.trim().is_empty() {
            return Err(invalid("content", "`content` must not be empty."));
        }
        if msg.content.len() > settings.max_content_bytes {
            return Err(SessionError::TooLarge {
                limit: settings.max_content_bytes,
            });
        }
        // The session and its history in one read: both are on the way to
        // the first token.
        let (session, history) = match self
            .store()
            .session_and_history(&who.tenant_id, session_id, HISTORY_WINDOW)
            .await?
        {
            Some((s, history)) if may_see(who, &s) => (s, history),
            _ => return Err(SessionError::NotFound("session")),
        };
        let bot = match &session.bot_id {
            Some(b) => Some(self.cached_bot(&who.tenant_id, b).await?.ok_or(
                SessionError::Conflict {
                    code: "bot_deleted",
                    message: "The session's bot was deleted; start a new session.".into(),
                },
            )?),
            None => None,
        };
        let model = match (msg.model, &bot) {
            (Some(m), _) => m,
            (None, Some(b)) => b.model.clone(),
            (None, None) => {
                return Err(invalid(
                    "model",
                    "The session has no bot: name a `model` for the reply.",
                ))
            }
        };
        if !self.inner.gateway.has_model(&model) {
            return Err(SessionError::UnknownModel(model));
        }
        let budget = bot
            .as_ref()
            .and_then(|b| b.context_tokens)
            .unwrap_or(settings.default_context_tokens);
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        body.insert(
            "messages".into(),
            Value::Array(build_messages(
                bot.as_ref().and_then(|b| b.system_prompt.as_deref()),
                &history,
                &msg.content,
                budget,
            )),
        );
        body.insert("stream".into(), json!(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
        if let Some(t) = bot.as_ref().and_then(|b| b.temperature) {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(m) = bot.as_ref().and_then(|b| b.max_tokens) {
            body.insert("max_tokens".into(), json!(m));
        }
        let request = ChatRequest::from_object(body).map_err(|e| SessionError::Invalid {
            field: e.param.unwrap_or_default(),
            message: e.message,
        })?;

        let now = now_ms();
        let base = Message {
            id: String::new(),
            tenant_id: who.tenant_id.clone(),
            session_id: session_id.to_owned(),
            role: String::new(),
            content: String::new(),
            status: MessageStatus::Complete,
            finish_reason: None,
            error_code: None,
            error_message: None,
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            latency_ms: None,
            trace_id: Some(meta.trace_id.clone()),
            instance_id: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let user_message = Message {
            id: new_id(),
            role: "user".into(),
            content: msg.content,
            ..base.clone()
        };
        let assistant = Message {
            id: new_id(),
            role: "assistant".into(),
            status: MessageStatus::Streaming,
            model: Some(model),
            instance_id: Some(settings.instance_id.clone()),
            ..base
        };
        self.store()
            .insert_messages(&[user_message.clone(), assistant.clone()])
            .await?;

        let transcript = Arc::new(match &settings.relay {
            Some(relay) => Transcript::mirrored(relay.mirror(&assistant.id)),
            None => Transcript::default(),
        });
        transcript.push(
            "ready",
            json!({"session_id": session_id, "message_id": assistant.id, "trace_id": meta.trace_id})
                .to_string(),
        );
        if let Ok(mut live) = self.inner.live.lock() {
            live.insert(assistant.id.clone(), transcript.clone());
        }
        meta.session_id = Some(session_id.to_owned());
        if session.user_id.is_some() {
            meta.user_id = session.user_id.clone();
        }
        let (finished_tx, finished) = oneshot::channel();
        let handle = ReplyHandle {
            user_message,
            assistant_id: assistant.id.clone(),
            transcript: transcript.clone(),
            finished,
        };
        // The reply outlives the request that asked for it, but its lines
        // belong to that request: they carry its span, and so its trace id.
        tokio::spawn(
            generate(
                self.inner.clone(),
                Job {
                    meta,
                    request,
                    transcript,
                    assistant,
                    mode,
                    claim: claim.take(),
                    finished: finished_tx,
                },
            )
            .in_current_span(),
        );
        Ok(handle)
    }

    /// The frames of a reply after `after_id`: live if it is being generated
    /// here, else from the store (waiting for another instance to finish it).
    pub async fn follow(
        &self,
        who: &Principal,
        session_id: &str,
        message_id: &str,
        after_id: u64,
    ) -> Result<impl Stream<Item = Bytes> + Send + 'static, SessionError> {
        self.get_session(who, session_id).await?;
        let message = match self.store().get_message(&who.tenant_id, message_id).await? {
            Some(m) if m.session_id == session_id && m.role == "assistant" => m,
            _ => return Err(SessionError::NotFound("message")),
        };
        let keepalive = self.inner.settings.keepalive;
        let live = self
            .inner
            .live
            .lock()
            .ok()
            .and_then(|l| l.get(message_id).cloned());
        let transcript = match live {
            Some(t) => t,
            None => {
                let t = Arc::new(Transcript::default());
                let filler = t.clone();
                let store = self.inner.store.clone();
                let relay = self.inner.settings.relay.clone();
                let tenant = who.tenant_id.clone();
                tokio::spawn(async move {
                    // Another instance (or one that died) has it: follow its
                    // mirror in Redis if there is one, and finish from what
                    // was stored.
                    let mut current = Some(message);
                    if let Some(relay) = relay {
                        if current
                            .as_ref()
                            .is_some_and(|m| m.status == MessageStatus::Streaming)
                        {
                            current =
                                follow_mirror(&relay, &filler, &store, &tenant, current).await;
                            if filler.is_ended() {
                                return;
                            }
                        }
                    }
                    finish_from_store(&filler, &store, &tenant, current, after_id).await;
                });
                t
            }
        };
        Ok(transcript.follow(after_id, keepalive))
    }
}

/// Follows the Redis mirror of a reply into `filler` until its end (then
/// ends `filler`), or until the mirror cannot be trusted: Redis is away, a
/// frame is missing, or the reply ended without the mirror saying so. Then
/// it returns the message as last read, for [`finish_from_store`].
async fn follow_mirror(
    relay: &super::relay::Relay,
    filler: &Arc<Transcript>,
    store: &Arc<dyn switchyard_store::Store>,
    tenant: &str,
    mut current: Option<Message>,
) -> Option<Message> {
    let id = current.as_ref()?.id.clone();
    let mut reader = match relay.reader(&id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "following a reply through Redis failed; waiting for it to be stored");
            return current;
        }
    };
    let mut last = 0u64;
    loop {
        if Arc::strong_count(filler) == 1 {
            return current; // the follower went away
        }
        let read = match reader.next().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "following a reply through Redis failed; waiting for it to be stored");
                return current;
            }
        };
        let mut frames = Vec::with_capacity(read.frames.len());
        for f in read.frames {
            if f.id != last + 1 {
                filler.extend(frames);
                tracing::warn!(message_id = %id, after = last, got = f.id, "a frame is missing from the Redis mirror; finishing from the store");
                return current;
            }
            last = f.id;
            frames.push(f);
        }
        let got = !frames.is_empty();
        filler.extend(frames);
        if read.ended {
            filler.end();
            return current;
        }
        if !got {
            // Quiet for a while: has the reply ended without its mirror?
            match store.get_message(tenant, &id).await {
                Ok(Some(m)) if m.status != MessageStatus::Streaming => return Some(m),
                Ok(Some(m)) => current = Some(m),
                Ok(None) => return None,
                Err(e) => tracing::warn!(error = %e, "reading a message to resume failed"),
            }
        }
    }
}

/// Waits until a reply is no longer streaming, then appends its stored
/// frames after those `filler` already has (or an `error` frame if there are
/// none) and ends `filler`.
async fn finish_from_store(
    filler: &Arc<Transcript>,
    store: &Arc<dyn switchyard_store::Store>,
    tenant: &str,
    mut current: Option<Message>,
    after_id: u64,
) {
    let Some(id) = current.as_ref().map(|m| m.id.clone()) else {
        return end_with_error(filler, after_id, deleted());
    };
    let poll = Duration::from_millis(200);
    let ended = loop {
        if Arc::strong_count(filler) == 1 {
            return; // the follower went away
        }
        match current.take() {
            Some(m) if m.status != MessageStatus::Streaming => break Some(m),
            _ => tokio::time::sleep(poll).await,
        }
        match store.get_message(tenant, &id).await {
            Ok(Some(m)) => current = Some(m),
            Ok(None) => break None,
            Err(e) => {
                tracing::warn!(error = %e, "reading a message to resume failed");
            }
        }
    };
    let Some(ended) = ended else {
        return end_with_error(filler, after_id, deleted());
    };
    let frames = store
        .message_frames(tenant, &id)
        .await
        .ok()
        .flatten()
        .and_then(|f| serde_json::from_str::<Vec<Frame>>(&f).ok());
    let have = filler.next_id().saturating_sub(1).max(after_id);
    match frames {
        Some(frames) => filler.replay(frames.into_iter().filter(|f| f.id > have).collect()),
        None => {
            let e = PublicError {
                status: 502,
                code: ended
                    .error_code
                    .clone()
                    .unwrap_or_else(|| "interrupted".into()),
                message: ended
                    .error_message
                    .clone()
                    .unwrap_or_else(|| "The reply ended without being stored.".into()),
                retryable: true,
            };
            end_with_error(filler, after_id, e);
        }
    }
}

fn deleted() -> PublicError {
    PublicError {
        status: 404,
        code: "not_found".into(),
        message: "The message was deleted.".into(),
        retryable: false,
    }
}

/// Ends `filler` with one `error` frame after the frames it has.
fn end_with_error(filler: &Transcript, after_id: u64, e: PublicError) {
    let have = filler.next_id().saturating_sub(1).max(after_id);
    filler.replay(vec![Frame {
        id: have + 1,
        event: "error".into(),
        data: e.frame_json(),
    }]);
}

impl PublicError {
    /// The `error` frame's data: `{code, message, retryable}`.
    pub fn frame_json(&self) -> String {
        json!({"code": self.code, "message": self.message, "retryable": self.retryable}).to_string()
    }
}

async fn generate(inner: Arc<Inner>, job: Job) {
    let Job {
        meta,
        request,
        transcript,
        assistant,
        mode,
        claim,
        finished,
    } = job;
    let ending = run(&inner, &meta, &request, &transcript).await;
    let latency_ms = meta.started.elapsed().as_secs_f64() * 1000.0;
    let cost_usd = match (ending.pricing, ending.usage) {
        (Some(p), Some(u)) => Some(p.cost_usd(&u)),
        _ => None,
    };
    let mut message = assistant;
    message.content = ending.content;
    message.finish_reason = ending.finish_reason;
    message.prompt_tokens = ending.usage.map(|u| u.prompt_tokens);
    message.completion_tokens = ending.usage.map(|u| u.completion_tokens);
    message.cost_usd = cost_usd;
    message.latency_ms = Some(latency_ms);
    message.updated_at_ms = now_ms();
    let (event, data) = match &ending.error {
        None => {
            message.status = MessageStatus::Complete;
            (
                "chat.done",
                json!({
                    "message_id": message.id,
                    "content": message.content,
                    "finish_reason": message.finish_reason,
                    "usage": {
                        "prompt_tokens": message.prompt_tokens,
                        "completion_tokens": message.completion_tokens,
                    },
                    "cost_usd": cost_usd,
                    "latency_ms": latency_ms,
                })
                .to_string(),
            )
        }
        Some(e) => {
            message.status = MessageStatus::Failed;
            message.error_code = Some(e.code.clone());
            message.error_message = Some(e.message.clone());
            ("error", e.frame_json())
        }
    };
    let mut frames = transcript.snapshot();
    frames.push(Frame {
        id: transcript.next_id(),
        event: event.to_owned(),
        data: data.clone(),
    });
    let completion = MessageCompletion {
        tenant_id: message.tenant_id.clone(),
        id: message.id.clone(),
        status: message.status,
        content: message.content.clone(),
        finish_reason: message.finish_reason.clone(),
        error_code: message.error_code.clone(),
        error_message: message.error_message.clone(),
        prompt_tokens: message.prompt_tokens,
        completion_tokens: message.completion_tokens,
        cost_usd,
        latency_ms: Some(latency_ms),
        frames: serde_json::to_string(&frames).ok(),
        at_ms: message.updated_at_ms,
    };
    match inner.store.complete_message(&completion).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(message_id = %message.id, "the reply had already been ended (interrupted?)")
        }
        Err(e) => {
            tracing::error!(error = %e, message_id = %message.id, "could not store a finished reply")
        }
    }
    let stored = match (mode, &ending.error) {
        (ReplyMode::Sse, _) => StoredResponse::sse(render_all(&frames), ending.provider.as_deref()),
        (ReplyMode::Json, None) => StoredResponse {
            status: 200,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: serde_json::to_vec(&message_json(&message)).unwrap_or_default(),
        },
        (ReplyMode::Json, Some(e)) => StoredResponse {
            status: e.status,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: serde_json::to_vec(&json!({"error": {
                "code": e.code,
                "message": e.message,
                "details": {"message_id": message.id, "retryable": e.retryable},
            }}))
            .unwrap_or_default(),
        },
    };
    // Stored before the last frame is sent: a client that saw the end and
    // repeats the request gets the replay, not a 409.
    if let Some(claim) = claim {
        claim.complete(&stored).await;
    }
    transcript.push(event, data);
    transcript.end();
    if let Ok(mut live) = inner.live.lock() {
        live.remove(&message.id);
    }
    let _ = finished.send(stored);
}

/// Calls the model and relays its deltas into the transcript.
async fn run(
    inner: &Inner,
    meta: &RequestMeta,
    request: &ChatRequest,
    transcript: &Transcript,
) -> Ending {
    let mut end = Ending {
        content: String::new(),
        finish_reason: None,
        usage: None,
        pricing: None,
        provider: None,
        error: None,
    };
    let outcome = match inner.gateway.chat(meta, request).await {
        Ok(o) => o,
        Err(e) => {
            end.error = Some(public_error(&e));
            return end;
        }
    };
    let (mut events, provider, pricing) = match outcome {
        ChatOutcome::Stream {
            events,
            provider,
            pricing,
            ..
        } => (events, provider, pricing),
        ChatOutcome::Complete { provider, .. } => {
            end.provider = Some(provider);
            end.error = Some(PublicError {
                status: 502,
                code: "upstream_protocol_error".into(),
                message: "The provider answered a streaming request without streaming.".into(),
                retryable: true,
            });
            return end;
        }
    };
    end.provider = Some(provider);
    end.pricing = pricing;
    // The first delta of every burst is handed to the client before the
    // rest of the burst is worked through: when the provider's events are
    // already buffered (read in one piece), this task would otherwise run
    // through all of them, and the task writing the SSE frames, woken by the
    // first, would wait for the last.
    let mut after_wait = true;
    loop {
        let ev = match events.next().now_or_never() {
            Some(ev) => ev,
            None => {
                after_wait = true;
                events.next().await
            }
        };
        let Some(ev) = ev else { break };
        match ev {
            StreamEvent::Chunk(bytes) => {
                let Ok(chunk) = serde_json::from_slice::<Chunk>(&bytes) else {
                    continue;
                };
                if chunk.usage.is_some() {
                    end.usage = chunk.usage;
                }
                let mut pushed = false;
                for choice in chunk.choices {
                    if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                        transcript.push("chat.delta", json!({"delta": text}).to_string());
                        end.content.push_str(&text);
                        pushed = true;
                    }
                    for call in choice.delta.tool_calls.unwrap_or_default() {
                        transcript.push("chat.delta", json!({"tool_call": call}).to_string());
                        pushed = true;
                    }
                    if choice.finish_reason.is_some() {
                        end.finish_reason = choice.finish_reason;
                    }
                }
                if pushed && std::mem::take(&mut after_wait) {
                    tokio::task::yield_now().await;
                }
            }
            StreamEvent::Done => break,
            StreamEvent::Error(e) => {
                end.error = Some(public_error(&crate::EngineError::Provider(e)));
                break;
            }
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_turns_that_fit_after_the_system_prompt() {
        let turn = |role: &str, content: &str| (role.to_owned(), content.to_owned());
        // Newest first, as the store gives it.
        let history = vec![
            turn("assistant", "third answer"),
            turn("user", "third question"),
            turn("user", "second question"),
            turn("assistant", &"b".repeat(300)),
            turn("user", &"a".repeat(300)),
        ];
        // Budget for the system prompt, the new message and the three newest
        // usable turns, not the 300-byte ones.
        let out = build_messages(Some("be brief"), &history, "new", 40);
        let roles: Vec<_> = out
            .iter()
            .map(|m| {
                format!(
                    "{}:{}",
                    m["role"].as_str().unwrap(),
                    m["content"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            roles,
            [
                "system:be brief",
                "user:second question",
                "user:third question",
                "assistant:third answer",
                "user:new"
            ]
        );
        // A large budget keeps everything.
        assert_eq!(build_messages(None, &history, "new", 100_000).len(), 6);
        // No room at all: just the new message.
        assert_eq!(build_messages(Some("s"), &history, "new", 1).len(), 2);
    }
}
