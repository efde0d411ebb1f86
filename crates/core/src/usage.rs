//! The usage record: one per model request, written to `usage_logs`.

use serde::{Deserialize, Serialize};

/// What one model request cost and how it went.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// UUIDv7, so rows sort by time.
    pub id: String,
    pub tenant_id: String,
    /// The API key that made the request, if one did.
    pub key_id: Option<String>,
    /// The user the request acted for, if known.
    pub user_id: Option<String>,
    pub trace_id: String,
    /// `chat` or `embeddings`.
    pub endpoint: String,
    pub model_alias: String,
    pub provider: String,
    pub upstream_model: String,
    pub stream: bool,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Of `prompt_tokens`, those read from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    /// Of `prompt_tokens`, those written to it.
    #[serde(default)]
    pub cache_write_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub latency_ms: f64,
    /// Streams only: time until the first chunk arrived from upstream.
    pub ttft_ms: Option<f64>,
    /// The HTTP status the client received (499 when it went away first).
    pub status: u16,
    pub error_code: Option<String>,
    /// Unix time in milliseconds.
    pub created_at_ms: i64,
    /// A plain request's trace, kept in its usage row instead of a
    /// `bus_events` row (see [`PlainTrace`]); not part of the usage API.
    #[serde(skip)]
    pub trace: Option<PlainTrace>,
}

/// The trace of a plain request: `request.received`, one
/// `provider.attempt` (attempt 1, the deployment that served it) and
/// `request.done` or `request.error`, outside any session. Everything those
/// three events say is in the usage row but their times, so the row keeps
/// only those (column `trace_ms`) and the events are rebuilt when the trace
/// is read ([`UsageRecord::plain_trace_events`]). A plain request then adds
/// ~290 bytes to the database instead of ~1,100 (its usage row and a
/// `bus_events` row with its JSON array and index entry), which is most of
/// what the SQLite writers and checkpoints spend per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainTrace {
    pub received_at_ms: i64,
    pub attempt_at_ms: i64,
    pub done_at_ms: i64,
}

impl PlainTrace {
    /// `received,attempt-received,done-received`, e.g. `1796347727669,0,3`.
    pub fn encode(&self) -> String {
        format!(
            "{},{},{}",
            self.received_at_ms,
            self.attempt_at_ms - self.received_at_ms,
            self.done_at_ms - self.received_at_ms
        )
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut parts = s.split(',').map(|p| p.parse::<i64>().ok());
        let (Some(Some(r)), Some(Some(a)), Some(Some(d)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Self {
            received_at_ms: r,
            attempt_at_ms: r.checked_add(a)?,
            done_at_ms: r.checked_add(d)?,
        })
    }
}

/// The id of the `seq`th event of a trace kept in a usage row: the row's id
/// with its last hex digit replaced by `seq` (0, 1 or 2), so the three ids
/// are stable, distinct, and still UUIDs.
fn plain_event_id(usage_id: &str, seq: i64) -> String {
    let mut id = usage_id.to_owned();
    id.pop();
    id.push(char::from(b'0' + seq.clamp(0, 9) as u8));
    id
}

impl UsageRecord {
    /// The three events of a [`PlainTrace`], as the gateway would have
    /// written them into a `bus_events` row (same kinds, payloads, order
    /// and times); empty when the row keeps no trace.
    pub fn plain_trace_events(&self) -> Vec<crate::sessions::BusEvent> {
        let Some(t) = self.trace else {
            return Vec::new();
        };
        let event =
            |seq: i64, kind: &str, payload: serde_json::Value, at: i64| crate::sessions::BusEvent {
                id: plain_event_id(&self.id, seq),
                tenant_id: self.tenant_id.clone(),
                trace_id: self.trace_id.clone(),
                seq,
                kind: kind.to_owned(),
                session_id: None,
                user_id: self.user_id.clone(),
                payload,
                created_at_ms: at,
            };
        let done = if self.status < 400 {
            "request.done"
        } else {
            "request.error"
        };
        vec![
            event(
                0,
                "request.received",
                serde_json::json!({
                    "endpoint": self.endpoint,
                    "model": self.model_alias,
                    "stream": self.stream,
                }),
                t.received_at_ms,
            ),
            event(
                1,
                "provider.attempt",
                serde_json::json!({
                    "deployment": format!("{}/{}", self.provider, self.upstream_model),
                    "attempt": 1,
                }),
                t.attempt_at_ms,
            ),
            event(
                2,
                done,
                serde_json::json!({
                    "status": self.status,
                    "provider": self.provider,
                    "latency_ms": self.latency_ms,
                    "ttft_ms": self.ttft_ms,
                    "error": self.error_code,
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                }),
                t.done_at_ms,
            ),
        ]
    }
}

/// A fresh time-ordered id.
pub fn new_id() -> String {
    // Encoded into a stack buffer: `to_string` goes through `fmt`, which
    // cost a visible share of a request's CPU for the four ids it makes.
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_traces_round_trip_and_reject_garbage() {
        let t = PlainTrace {
            received_at_ms: 1_796_347_727_669,
            attempt_at_ms: 1_796_347_727_670,
            done_at_ms: 1_796_347_727_703,
        };
        assert_eq!(t.encode(), "1796347727669,1,34");
        assert_eq!(PlainTrace::decode(&t.encode()), Some(t));
        let overflow = format!("{},0,1", i64::MAX);
        for bad in ["", "1,2", "1,2,3,4", "a,1,2", "1,,2", &overflow] {
            assert_eq!(PlainTrace::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn plain_event_ids_are_distinct_uuids() {
        let id = new_id();
        let ids: Vec<String> = (0..3).map(|s| plain_event_id(&id, s)).collect();
        for (s, e) in ids.iter().enumerate() {
            assert!(uuid::Uuid::parse_str(e).is_ok(), "{e}");
            assert!(e.ends_with(&s.to_string()), "{e}");
        }
        assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    }

    #[test]
    fn ids_are_hyphenated_lowercase_v7_uuids_in_creation_order() {
        let ids: Vec<String> = (0..1000).map(|_| new_id()).collect();
        for id in &ids {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7, "{id}");
            assert_eq!(id, &u.hyphenated().to_string());
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids, "time-ordered");
    }
}
