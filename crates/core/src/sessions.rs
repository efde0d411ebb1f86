//! The native conversation resources: bots, sessions, messages, the events
//! of a trace and idempotency records. Times are unix milliseconds here; the
//! HTTP layer renders them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An assistant configuration: which model, how it is prompted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bot {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// A model alias.
    pub model: String,
    pub system_prompt: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// How many tokens of history (system prompt included) a call may carry.
    pub context_tokens: Option<u32>,
    pub metadata: Map<String, Value>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A conversation of one user with one bot, with its own JSON state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub tenant_id: String,
    pub bot_id: Option<String>,
    pub user_id: Option<String>,
    pub metadata: Map<String, Value>,
    pub state: Map<String, Value>,
    /// Incremented by every state change (compare-and-set with `If-Match`).
    pub state_version: i64,
    pub created_at_ms: i64,
}

/// Filters and cursor of a session listing (newest first).
#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    pub user_id: Option<String>,
    pub bot_id: Option<String>,
    /// Only sessions with an id below this one (the previous page's last).
    pub before_id: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// The assistant is still generating it.
    Streaming,
    Complete,
    Failed,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Streaming => "streaming",
            Self::Complete => "complete",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "streaming" => Some(Self::Streaming),
            "complete" => Some(Self::Complete),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// One turn of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: String,
    pub tenant_id: String,
    pub session_id: String,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    pub status: MessageStatus,
    pub finish_reason: Option<String>,
    /// Why a failed message failed: a stable code (`interrupted`, `upstream_timeout`, ...).
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The model alias that answered (assistant messages).
    pub model: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub latency_ms: Option<f64>,
    pub trace_id: Option<String>,
    /// The server instance generating a `streaming` message, so a restart
    /// of that instance can tell which messages it left unfinished.
    pub instance_id: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// How a `streaming` assistant message ended.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageCompletion {
    pub tenant_id: String,
    pub id: String,
    /// `Complete` or `Failed`.
    pub status: MessageStatus,
    pub content: String,
    pub finish_reason: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub latency_ms: Option<f64>,
    /// The frames the reply was streamed as (JSON), kept for resumption.
    pub frames: Option<String>,
    pub at_ms: i64,
}

/// The result of a state merge.
#[derive(Debug, Clone, PartialEq)]
pub enum StatePatch {
    Applied {
        state: Map<String, Value>,
        version: i64,
    },
    /// `If-Match` named another version than the current one.
    VersionMismatch {
        current: i64,
    },
    NotFound,
}

/// One lifecycle event of a request (`bus_events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusEvent {
    pub id: String,
    pub tenant_id: String,
    pub trace_id: String,
    /// Order inside the trace (events of one millisecond keep their order).
    pub seq: i64,
    /// `request.received`, `provider.attempt`, `provider.retry`,
    /// `provider.fallback`, `breaker.changed`, `request.done`, `request.error`.
    pub kind: String,
    pub session_id: Option<String>,
    /// The user the request acted for, if any.
    pub user_id: Option<String>,
    pub payload: Value,
    pub created_at_ms: i64,
}

/// The events of one trace recorded together, as stored in one `bus_events`
/// row: the first event's id, sequence number and time, and every event as
/// a JSON array of `{id, seq, kind, payload, created_at_ms}` objects.
/// The gateway writes the array while the request runs, so writing the row
/// costs no serialisation; [`EventsRow::pack`] builds rows from events.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsRow {
    pub tenant_id: String,
    pub trace_id: String,
    pub session_id: Option<String>,
    pub user_id: Option<String>,
    pub seq: i64,
    pub id: String,
    pub created_at_ms: i64,
    pub events: String,
}

/// One event inside an [`EventsRow`]'s array.
#[derive(Serialize)]
struct PackedEvent<'a> {
    id: &'a str,
    seq: i64,
    kind: &'a str,
    payload: &'a Value,
    created_at_ms: i64,
}

impl EventsRow {
    /// Rows of consecutive events of one trace (same tenant, session and user).
    pub fn pack(events: &[BusEvent]) -> Vec<EventsRow> {
        let mut out = Vec::new();
        for run in events.chunk_by(|a, b| {
            a.trace_id == b.trace_id
                && a.tenant_id == b.tenant_id
                && a.session_id == b.session_id
                && a.user_id == b.user_id
        }) {
            let first = &run[0];
            let packed: Vec<PackedEvent<'_>> = run
                .iter()
                .map(|e| PackedEvent {
                    id: &e.id,
                    seq: e.seq,
                    kind: &e.kind,
                    payload: &e.payload,
                    created_at_ms: e.created_at_ms,
                })
                .collect();
            out.push(EventsRow {
                tenant_id: first.tenant_id.clone(),
                trace_id: first.trace_id.clone(),
                session_id: first.session_id.clone(),
                user_id: first.user_id.clone(),
                seq: first.seq,
                id: first.id.clone(),
                created_at_ms: first.created_at_ms,
                // A Value with string keys always serialises.
                events: serde_json::to_string(&packed).unwrap_or_else(|_| "[]".into()),
            });
        }
        out
    }
}

/// A stored response, replayed for a repeated idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    pub status: u16,
    /// `(name, value)` pairs to send again (content type, provider, ...).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The headers of every `text/event-stream` response (proxies must not
/// buffer it); live and replayed streams send the same ones.
pub const SSE_HEADERS: [(&str, &str); 3] = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache"),
    ("x-accel-buffering", "no"),
];

impl StoredResponse {
    /// A stored `text/event-stream` response, naming the provider that served it.
    pub fn sse(body: Vec<u8>, provider: Option<&str>) -> Self {
        let mut headers: Vec<(String, String)> = SSE_HEADERS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some(p) = provider {
            headers.push(("x-switchyard-provider".to_owned(), p.to_owned()));
        }
        Self {
            status: 200,
            headers,
            body,
        }
    }
}

/// What claiming an idempotency key found.
#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyClaim {
    /// The key is this request's to run and then complete or release.
    Acquired,
    /// Another request with this key is still running.
    InFlight { same_request: bool },
    /// A request with this key finished.
    Done {
        same_request: bool,
        response: StoredResponse,
    },
}

/// A new idempotency claim.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyKey {
    pub tenant_id: String,
    pub key: String,
    /// SHA-256 (hex) of the method, path and body.
    pub request_hash: String,
    /// The user the request acted for, so erasing a user erases its records.
    pub user_id: Option<String>,
    pub now_ms: i64,
    /// An in-flight claim older than this is presumed dead and taken over.
    pub lease_ms: i64,
    /// How long a finished record is replayed.
    pub ttl_ms: i64,
    /// Who claims: a fresh id per request. Completing or releasing names it,
    /// so a request whose claim was taken over (its lease ended) cannot
    /// overwrite or free the new holder's claim.
    pub owner: String,
}

/// Everything stored about one user of a tenant.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserData {
    pub sessions: Vec<Session>,
    pub messages: Vec<Message>,
    pub usage: Vec<crate::usage::UsageRecord>,
}

/// What erasing a user removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Erased {
    pub sessions: u64,
    pub messages: u64,
    /// Trace event rows (one per request, its events packed together),
    /// counting the usage rows whose plain trace was erased.
    pub events: u64,
    pub idempotency_records: u64,
    /// Usage rows kept with the user removed.
    pub usage_anonymised: u64,
}

/// Unix milliseconds as RFC 3339 UTC with millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC) into unix milliseconds.
pub fn parse_utc(s: &str) -> Option<i64> {
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z')?)),
        None => (s, None),
    };
    let mut parts = date.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // No 30 February: the day must exist in its month.
    if civil_from_days(days) != (y, m, d) {
        return None;
    }
    let mut secs = days * 86_400;
    if let Some(t) = time {
        let mut hms = t.split(':');
        let h: i64 = hms.next()?.parse().ok()?;
        let mi: i64 = hms.next()?.parse().ok()?;
        let se: i64 = hms.next()?.parse().ok()?;
        if hms.next().is_some() || h > 23 || mi > 59 || se > 60 {
            return None;
        }
        secs += h * 3600 + mi * 60 + se;
    }
    Some(secs * 1000)
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn parses_dates_and_times() {
        assert_eq!(parse_utc("1970-01-01"), Some(0));
        assert_eq!(parse_utc("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(parse_utc("2000-02-29"), Some(951_782_400_000));
        for bad in [
            "2023-13-01",
            "2023-02-29",
            "2024-04-31",
            "2023-11-14T22:13:20",
            "x",
            "2023-11-14T25:00:00Z",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips_every_day_of_four_centuries() {
        for days in (-146_097..146_097 * 2).step_by(7) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
