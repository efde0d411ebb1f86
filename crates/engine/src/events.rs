//! A request's lifecycle as trace events: received, each provider attempt,
//! retries, fallbacks, breaker changes, and how it ended. A request's events
//! are kept together and handed to the batched [`EventWriter`] when the
//! request is done (the last handle drops), so they are stored as one row
//! and recording never waits on the database; `GET /v1/traces/{trace_id}`
//! reads them back in order.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use switchyard_core::sessions::BusEvent;
use switchyard_core::usage::new_id;
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
    seq: AtomicI64,
    /// Recorded, not yet handed to the writer.
    pending: Mutex<Vec<BusEvent>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let pending = std::mem::take(self.pending.get_mut().unwrap_or_else(|p| p.into_inner()));
        for e in pending {
            self.writer.record(e);
        }
    }
}

impl TraceEvents {
    pub fn new(
        writer: EventWriter,
        tenant_id: &str,
        trace_id: &str,
        session_id: Option<&str>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                writer,
                tenant_id: tenant_id.to_owned(),
                trace_id: trace_id.to_owned(),
                session_id: session_id.map(str::to_owned),
                seq: AtomicI64::new(0),
                pending: Mutex::new(Vec::with_capacity(4)),
            }),
        }
    }

    /// Whether events are recorded at all (skip building payloads if not).
    pub fn enabled(&self) -> bool {
        self.inner.writer.enabled()
    }

    /// Records one event; they are queued for writing together when the
    /// last handle drops (and dropped and counted if the writer is saturated).
    pub fn record(&self, kind: &str, payload: Value) {
        let i = &self.inner;
        if !i.writer.enabled() {
            return;
        }
        let event = BusEvent {
            id: new_id(),
            tenant_id: i.tenant_id.clone(),
            trace_id: i.trace_id.clone(),
            seq: i.seq.fetch_add(1, Ordering::Relaxed),
            kind: kind.to_owned(),
            session_id: i.session_id.clone(),
            payload,
            created_at_ms: now_ms(),
        };
        i.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }
}

impl RouteObserver for TraceEvents {
    fn on_event(&self, event: RouteEvent<'_>) {
        match event {
            RouteEvent::Attempt {
                deployment,
                attempt,
            } => self.record(
                "provider.attempt",
                json!({"deployment": deployment, "attempt": attempt}),
            ),
            RouteEvent::Retry {
                deployment,
                attempt,
                wait,
                error,
            } => self.record(
                "provider.retry",
                json!({
                    "deployment": deployment,
                    "attempt": attempt,
                    "wait_ms": wait.as_millis() as u64,
                    "error": error.code(),
                }),
            ),
            RouteEvent::Fallback { from, to, error } => self.record(
                "provider.fallback",
                json!({"from": from, "to": to, "error": error.code()}),
            ),
            RouteEvent::Skipped { deployment } => self.record(
                "provider.skipped",
                json!({"deployment": deployment, "reason": "circuit_open"}),
            ),
            RouteEvent::Breaker {
                deployment,
                from,
                to,
            } => self.record(
                "breaker.changed",
                json!({"deployment": deployment, "from": from.as_str(), "to": to.as_str()}),
            ),
        }
    }
}
