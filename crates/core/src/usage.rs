//! The usage record: one per model request, written to `usage_logs`.

use serde::{Deserialize, Serialize};

/// What one model request cost and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub cost_usd: Option<f64>,
    pub latency_ms: f64,
    /// Streams only: time until the first chunk arrived from upstream.
    pub ttft_ms: Option<f64>,
    /// The HTTP status the client received (499 when it went away first).
    pub status: u16,
    pub error_code: Option<String>,
    /// Unix time in milliseconds.
    pub created_at_ms: i64,
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
