//! The JSON shapes of the native resources (DESIGN.md, "Resource shapes"),
//! shared by the HTTP responses, stored idempotent responses and exports.

use serde_json::{json, Value};
use switchyard_core::sessions::{rfc3339, Bot, Message, Session};

pub fn bot_json(b: &Bot) -> Value {
    json!({
        "id": b.id,
        "object": "bot",
        "name": b.name,
        "model": b.model,
        "system_prompt": b.system_prompt,
        "temperature": b.temperature,
        "max_tokens": b.max_tokens,
        "context_tokens": b.context_tokens,
        "metadata": b.metadata,
        "created_at": rfc3339(b.created_at_ms),
        "updated_at": rfc3339(b.updated_at_ms),
    })
}

pub fn session_json(s: &Session) -> Value {
    json!({
        "id": s.id,
        "object": "session",
        "bot_id": s.bot_id,
        "user_id": s.user_id,
        "metadata": s.metadata,
        "state": s.state,
        "state_version": s.state_version,
        "created_at": rfc3339(s.created_at_ms),
    })
}

pub fn message_json(m: &Message) -> Value {
    let error = m
        .error_code
        .as_ref()
        .map(|code| json!({"code": code, "message": m.error_message}));
    json!({
        "id": m.id,
        "object": "message",
        "session_id": m.session_id,
        "role": m.role,
        "content": m.content,
        "status": m.status.as_str(),
        "finish_reason": m.finish_reason,
        "model": m.model,
        "usage": match (m.prompt_tokens, m.completion_tokens) {
            (None, None) => Value::Null,
            (p, c) => json!({"prompt_tokens": p, "completion_tokens": c}),
        },
        "cost_usd": m.cost_usd,
        "latency_ms": m.latency_ms,
        "error": error,
        "trace_id": m.trace_id,
        "created_at": rfc3339(m.created_at_ms),
    })
}
