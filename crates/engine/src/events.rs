//! A request's lifecycle as trace events: received, each provider attempt,
//! retries, fallbacks, breaker changes, and how it ended. A request's events
//! are written, as they happen, into the JSON array of one `bus_events` row
//! ([`EventsRow`]), which is handed to the batched [`EventWriter`] when the
//! request is done (the last handle drops). A plain request's events
//! (received, attempt 1, done or error, no session) are handed over to its
//! usage row instead ([`TraceEvents::take_plain`]), which keeps only their
//! times. Recording never waits on the database, and no event is kept as a
//! `Value` or serialised twice: the request path pays for one small JSON
//! write per event. `GET /v1/traces/{trace_id}` reads them back in order.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::json;
use switchyard_core::sessions::EventsRow;
use switchyard_core::usage::{new_id, PlainTrace};
use switchyard_providers::router::{RouteEvent, RouteObserver};

use crate::batch_writer::EventWriter;
use crate::identity::now_ms;

/// Records the events of one trace; cheap to clone.
#[derive(Clone)]
pub struct TraceEvents {
    inner: Arc<Inner>,
}

struct Inner {
    writer: EventWriter,
    tenant_id: String,
    trace_id: String,
    session_id: Option<String>,
    user_id: Option<String>,
    pending: Mutex<Pending>,
}

/// The row being written: its first event, and the array so far (`[` and
/// the events, without the closing `]`).
#[derive(Default)]
struct Pending {
    next_seq: i64,
    first: Option<(String, i64, i64)>,
    json: Vec<u8>,
    shape: Shape,
    /// The deployment of attempt 1, while the shape is `Attempted`.
    attempted: String,
}

/// How far the events so far follow a plain request's trace
/// ([`TraceEvents::take_plain`]).
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Shape {
    #[default]
    Empty,
    /// `request.received`, at this time.
    Received(i64),
    /// And attempt 1 of a deployment.
    Attempted(i64, i64),
    /// Anything else: written as events.
    Other,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let pending = std::mem::take(self.pending.get_mut().unwrap_or_else(|p| p.into_inner()));
        let Some((id, seq, created_at_ms)) = pending.first else {
            return;
        };
        let mut json = pending.json;
        json.push(b']');
        // Only `serde_json` and JSON string escaping wrote into it.
        let Ok(events) = String::from_utf8(json) else {
            return;
        };
        self.writer.record(EventsRow {
            tenant_id: std::mem::take(&mut self.tenant_id),
            trace_id: std::mem::take(&mut self.trace_id),
            session_id: self.session_id.take(),
            user_id: self.user_id.take(),
            seq,
            id,
            created_at_ms,
            events,
        });
    }
}

impl TraceEvents {
    pub fn new(
        writer: EventWriter,
        tenant_id: &str,
        trace_id: &str,
        session_id: Option<&str>,
        user_id: Option<&str>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                writer,
                tenant_id: tenant_id.to_owned(),
                trace_id: trace_id.to_owned(),
                session_id: session_id.map(str::to_owned),
                user_id: user_id.map(str::to_owned),
                pending: Mutex::new(Pending::default()),
            }),
        }
    }

    /// Whether events are recorded at all (skip building payloads if not).
    pub fn enabled(&self) -> bool {
        self.inner.writer.enabled()
    }

    /// Records one event; the trace's events are queued for writing together
    /// when the last handle drops (and dropped and counted if the writer is
    /// saturated). A payload that cannot be serialised is stored as `null`.
    pub fn record(&self, kind: &str, payload: &impl Serialize) {
        self.record_as(kind, payload, |p, at| {
            p.shape = match p.shape {
                Shape::Empty if kind == "request.received" => Shape::Received(at),
                _ => Shape::Other,
            }
        });
    }

    /// Hands over a plain request's trace instead of writing its last event:
    /// when the events so far are exactly `request.received` and attempt 1
    /// of `provider`/`upstream_model`, outside any session, they are taken
    /// out of the row (nothing of them is written) and their times are
    /// returned with `done_at_ms`, to be kept in the request's usage row
    /// ([`PlainTrace`]). Otherwise nothing changes and `None` is returned;
    /// the caller records its last event as usual.
    pub fn take_plain(&self, provider: &str, upstream_model: &str) -> Option<PlainTrace> {
        let i = &self.inner;
        if !i.writer.enabled() || i.session_id.is_some() {
            return None;
        }
        let mut p = i.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Shape::Attempted(received_at_ms, attempt_at_ms) = p.shape else {
            return None;
        };
        let served = p
            .attempted
            .strip_prefix(provider)
            .and_then(|rest| rest.strip_prefix('/'))
            == Some(upstream_model);
        if !served {
            return None;
        }
        // Later events (if any) start a row of their own after these three.
        p.json.clear();
        p.first = None;
        p.shape = Shape::Other;
        p.next_seq = 3;
        Some(PlainTrace {
            received_at_ms,
            attempt_at_ms,
            done_at_ms: now_ms(),
        })
    }

    fn record_as(
        &self,
        kind: &str,
        payload: &impl Serialize,
        shape: impl FnOnce(&mut Pending, i64),
    ) {
        let i = &self.inner;
        if !i.writer.enabled() {
            return;
        }
        let id = new_id();
        let at = now_ms();
        let mut p = i.pending.lock().unwrap_or_else(|p| p.into_inner());
        let seq = p.next_seq;
        p.next_seq += 1;
        let buf = &mut p.json;
        buf.push(if buf.is_empty() { b'[' } else { b',' });
        // Writes into a Vec do not fail; `id` is a UUID, `kind` is escaped.
        let _ = write!(buf, "{{\"id\":\"{id}\",\"seq\":{seq},\"kind\":");
        let _ = serde_json::to_writer(&mut *buf, kind);
        buf.extend_from_slice(b",\"payload\":");
        let mark = buf.len();
        if serde_json::to_writer(&mut *buf, payload).is_err() {
            buf.truncate(mark);
            buf.extend_from_slice(b"null");
        }
        let _ = write!(buf, ",\"created_at_ms\":{at}}}");
        if p.first.is_none() {
            p.first = Some((id, seq, at));
        }
        shape(&mut p, at);
    }
}

impl RouteObserver for TraceEvents {
    fn on_event(&self, event: RouteEvent<'_>) {
        match event {
            RouteEvent::Attempt {
                deployment,
                attempt,
            } => {
                #[derive(Serialize)]
                struct Attempt<'a> {
                    deployment: &'a str,
                    attempt: u32,
                }
                self.record_as(
                    "provider.attempt",
                    &Attempt {
                        deployment,
                        attempt,
                    },
                    |p, at| {
                        p.shape = match p.shape {
                            Shape::Received(r) if attempt == 1 => {
                                p.attempted.clear();
                                p.attempted.push_str(deployment);
                                Shape::Attempted(r, at)
                            }
                            _ => Shape::Other,
                        }
                    },
                )
            }
            RouteEvent::Retry {
                deployment,
                attempt,
                wait,
                error,
            } => self.record(
                "provider.retry",
                &json!({
                    "deployment": deployment,
                    "attempt": attempt,
                    "wait_ms": wait.as_millis() as u64,
                    "error": error.code(),
                }),
            ),
            RouteEvent::Fallback { from, to, error } => self.record(
                "provider.fallback",
                &json!({"from": from, "to": to, "error": error.code()}),
            ),
            RouteEvent::Skipped { deployment } => self.record(
                "provider.skipped",
                &json!({"deployment": deployment, "reason": "circuit_open"}),
            ),
            RouteEvent::Breaker {
                deployment,
                from,
                to,
            } => self.record(
                "breaker.changed",
                &json!({"deployment": deployment, "from": from.as_str(), "to": to.as_str()}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::config::{StoreConfig, UsageConfig};
    use switchyard_store::{SqliteStore, Store};

    async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&StoreConfig {
            url: format!("sqlite://{}/e.db", dir.path().display()),
            ..StoreConfig::default()
        })
        .await
        .unwrap();
        store.migrate().await.unwrap();
        (dir, Arc::new(store))
    }

    #[tokio::test]
    async fn a_traces_events_are_one_row_read_back_in_order() {
        let (_dir, store) = store().await;
        let (writer, task) = EventWriter::spawn(store.clone(), &UsageConfig::default());
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let events = TraceEvents::new(writer.clone(), "t1", trace, Some("s1"), Some("u1"));
        events.record(
            "request.received",
            &json!({"model": "m", "text": "é\n\"q\""}),
        );
        events.on_event(RouteEvent::Attempt {
            deployment: "mock",
            attempt: 1,
        });
        // A payload serde cannot write (a map with non-string keys) is stored as null.
        let bad: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        events.record("request.done", &bad);
        let clone = events.clone();
        drop(events);
        drop(clone);
        task.shutdown().await;
        assert_eq!(writer.written(), 1, "one row for the trace");

        let back = store.list_trace_events("t1", trace).await.unwrap();
        let kinds: Vec<_> = back.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["request.received", "provider.attempt", "request.done"]
        );
        assert_eq!(back.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(back[0].payload, json!({"model": "m", "text": "é\n\"q\""}));
        assert_eq!(back[1].payload, json!({"deployment": "mock", "attempt": 1}));
        assert_eq!(back[2].payload, serde_json::Value::Null);
        assert!(back.iter().all(|e| e.session_id.as_deref() == Some("s1")));
        assert!(store
            .list_trace_events("t2", trace)
            .await
            .unwrap()
            .is_empty());
    }

    /// Records `received`, then `attempts` of `mock/m` (attempt numbers),
    /// then tries to hand the trace over as a plain one served by `served`.
    fn plain_attempt(
        writer: &EventWriter,
        session: Option<&str>,
        attempts: &[u32],
        served: (&str, &str),
    ) -> (TraceEvents, Option<PlainTrace>) {
        let events = TraceEvents::new(writer.clone(), "t1", &new_id(), session, Some("u1"));
        events.record("request.received", &json!({"model": "m"}));
        for &attempt in attempts {
            events.on_event(RouteEvent::Attempt {
                deployment: "mock/m",
                attempt,
            });
        }
        let plain = events.take_plain(served.0, served.1);
        (events, plain)
    }

    #[tokio::test]
    async fn only_a_plain_trace_is_handed_over_and_then_nothing_is_written() {
        let (_dir, store) = store().await;
        let (writer, task) = EventWriter::spawn(store.clone(), &UsageConfig::default());
        let before = now_ms();
        let (events, plain) = plain_attempt(&writer, None, &[1], ("mock", "m"));
        let t = plain.expect("received and one attempt of the serving deployment");
        assert!(before <= t.received_at_ms && t.received_at_ms <= t.attempt_at_ms);
        assert!(t.attempt_at_ms <= t.done_at_ms && t.done_at_ms <= now_ms());
        assert!(events.take_plain("mock", "m").is_none(), "handed over once");
        drop(events);
        // Not plain: a session, a second attempt, another deployment, no attempt.
        for (session, attempts, served) in [
            (Some("s1"), &[1][..], ("mock", "m")),
            (None, &[1, 2][..], ("mock", "m")),
            (None, &[2][..], ("mock", "m")),
            (None, &[1][..], ("mock", "m2")),
            (None, &[1][..], ("moc", "k/m")),
            (None, &[][..], ("mock", "m")),
        ] {
            let (events, plain) = plain_attempt(&writer, session, attempts, served);
            assert!(plain.is_none(), "{session:?} {attempts:?} {served:?}");
            drop(events);
        }
        // An event after the hand-over starts a row of its own, at seq 3.
        let trace = new_id();
        let events = TraceEvents::new(writer.clone(), "t1", &trace, None, None);
        events.record("request.received", &json!({}));
        events.on_event(RouteEvent::Attempt {
            deployment: "mock/m",
            attempt: 1,
        });
        assert!(events.take_plain("mock", "m").is_some());
        events.record("late", &json!({}));
        drop(events);
        task.shutdown().await;
        assert_eq!(
            writer.written(),
            7,
            "six traces that are not plain, one late event"
        );
        let late = store.list_trace_events("t1", &trace).await.unwrap();
        assert_eq!(late.len(), 1);
        assert_eq!((late[0].kind.as_str(), late[0].seq), ("late", 3));
    }

    #[tokio::test]
    async fn a_trace_with_no_events_writes_nothing() {
        let (_dir, store) = store().await;
        let (writer, task) = EventWriter::spawn(store, &UsageConfig::default());
        drop(TraceEvents::new(writer.clone(), "t1", "trace", None, None));
        task.shutdown().await;
        assert_eq!(writer.written(), 0);
    }
}
