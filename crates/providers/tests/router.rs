//! The router's retry schedule, driven through `Router::chat` with scripted
//! in-process providers under a paused clock: the retry budget, the backoff
//! the router really sleeps and `Retry-After`. No socket is involved, so the
//! only thing that moves the clock is the router's own sleeping, and every
//! gap between two upstream calls is exactly a delay the router chose.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use switchyard_providers::breaker::{BreakerConfig, CircuitBreaker};
use switchyard_providers::health::HealthStats;
use switchyard_providers::retry::{backoff_ceiling, RetryBudget, RetryConfig};
use switchyard_providers::router::{
    Deployment, Route, RouteEntry, RouteError, RouteEvent, RouteObserver, Router,
};
use switchyard_providers::{
    ChatCall, ChatProvider, ChatReply, Completion, EmbedCall, EmbeddingProvider, ProviderError,
};
use tokio::time::Instant;

/// What a scripted provider answers to its n-th call (0-based).
type Script = Box<dyn Fn(usize) -> Result<(), ProviderError> + Send + Sync>;

/// A provider that answers from a script and records when each call came.
struct Scripted {
    script: Script,
    calls: Mutex<Vec<Instant>>,
}

impl Scripted {
    fn new(
        script: impl Fn(usize) -> Result<(), ProviderError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            script: Box::new(script),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn healthy() -> Arc<Self> {
        Self::new(|_| Ok(()))
    }

    fn calls(&self) -> Vec<Instant> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl ChatProvider for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn chat(&self, _: ChatCall<'_>) -> Result<ChatReply, ProviderError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Instant::now());
            calls.len() - 1
        };
        (self.script)(n)?;
        Ok(ChatReply::Complete(Completion {
            body: Bytes::from_static(b"{}"),
            usage: None,
        }))
    }

    async fn probe(&self, _: Duration) -> Result<(), ProviderError> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl EmbeddingProvider for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn embed(&self, _: EmbedCall<'_>) -> Result<Completion, ProviderError> {
        Err(ProviderError::Truncated)
    }
}

fn status(code: u16, retry_after: Option<Duration>) -> ProviderError {
    ProviderError::Status {
        status: code,
        body: Bytes::new(),
        retry_after,
    }
}

/// A deployment whose breaker never opens here: these tests are about retries.
fn deployment(id: &str, provider: &Arc<Scripted>) -> Arc<Deployment> {
    Arc::new(Deployment {
        id: id.to_owned(),
        provider_name: Arc::from(id),
        upstream_model: Arc::from("m"),
        chat: provider.clone(),
        embed: provider.clone(),
        breaker: CircuitBreaker::new(BreakerConfig {
            failure_threshold: u32::MAX,
            ..BreakerConfig::default()
        }),
        first_byte_timeout: Duration::from_secs(30),
        total_timeout: Duration::from_secs(60),
        stream_idle_timeout: None,
        health: HealthStats::default(),
    })
}

/// Deployments in priority order.
fn route(deployments: &[(&str, &Arc<Scripted>)]) -> Route {
    Route::new(
        deployments
            .iter()
            .enumerate()
            .map(|(i, (id, p))| RouteEntry {
                priority: i as u32,
                weight: 1,
                deployment: deployment(id, p),
            })
            .collect(),
    )
}

/// The route's events, owned.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Attempt(String, u32),
    Retry(String, u32, Duration),
    Fallback(String, String),
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

impl RouteObserver for Recorder {
    fn on_event(&self, event: RouteEvent<'_>) {
        let seen = match event {
            RouteEvent::Attempt {
                deployment,
                attempt,
            } => Seen::Attempt(deployment.to_owned(), attempt),
            RouteEvent::Retry {
                deployment,
                attempt,
                wait,
                ..
            } => Seen::Retry(deployment.to_owned(), attempt, wait),
            RouteEvent::Fallback { from, to, .. } => Seen::Fallback(from.to_owned(), to.to_owned()),
            _ => return,
        };
        self.0.lock().unwrap().push(seen);
    }
}

impl Recorder {
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn body() -> Map<String, Value> {
    serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})
        .as_object()
        .unwrap()
        .clone()
}

/// A budget that never runs out.
fn unlimited_budget() -> RetryBudget {
    RetryBudget::new(1.0, u32::MAX)
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_caps_the_routers_retries_at_a_fifth_of_recent_requests() {
    let primary = Scripted::new(|_| Err(status(500, None)));
    let fallback = Scripted::healthy();
    let route = route(&[("primary", &primary), ("fallback", &fallback)]);
    let router = Router::new(RetryConfig::default(), RetryBudget::new(0.2, 10));
    let events = Recorder::default();

    let mut retried = Vec::new();
    for _ in 0..100 {
        let served = router
            .chat(&route, &body(), None, false, &events)
            .await
            .unwrap();
        assert_eq!(served.deployment.id, "fallback");
        retried.push(events.take().iter().any(|e| matches!(e, Seen::Retry(..))));
    }

    // Without the budget every request would retry once: 200 primary calls.
    // With it, 20 % of the 100 requests of the (frozen) window may retry.
    assert_eq!(retried.iter().filter(|r| **r).count(), 20);
    assert_eq!(primary.calls().len(), 120);
    assert_eq!(fallback.calls().len(), 100);
    assert!(
        retried[..10].iter().all(|r| *r),
        "the floor lets the first ten retry even though 20 % of them is two"
    );
    assert!(
        !retried[10..50].iter().any(|r| *r),
        "then the floor is spent until 20 % of the requests exceeds it"
    );
}

#[tokio::test(start_paused = true)]
async fn every_delay_the_router_sleeps_is_within_the_full_jitter_bound_of_its_retry() {
    let config = RetryConfig {
        max_attempts: 5,
        base: Duration::from_millis(100),
        cap: Duration::from_secs(2),
    };
    let primary = Scripted::new(|_| Err(status(503, None)));
    let route = route(&[("primary", &primary)]);
    let router = Router::new(config, unlimited_budget());
    let events = Recorder::default();
    const REQUESTS: usize = 200;

    // gaps[r]: the time between the call before retry r (0-based) and the retry.
    let mut gaps: Vec<Vec<Duration>> = vec![Vec::new(); 4];
    for _ in 0..REQUESTS {
        let before = primary.calls().len();
        let Err(err) = router.chat(&route, &body(), None, false, &events).await else {
            panic!("a deployment that always fails served a request");
        };
        assert!(matches!(err, RouteError::Failed { attempts: 5, .. }));
        let calls = primary.calls()[before..].to_vec();
        let seen = events.take();
        let attempts: Vec<u32> = seen
            .iter()
            .filter_map(|e| match e {
                Seen::Attempt(_, a) => Some(*a),
                _ => None,
            })
            .collect();
        assert_eq!(attempts, [1, 2, 3, 4, 5]);
        let waits: Vec<(u32, Duration)> = seen
            .iter()
            .filter_map(|e| match e {
                Seen::Retry(_, a, w) => Some((*a, *w)),
                _ => None,
            })
            .collect();
        assert_eq!(
            waits.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        for (r, (_, wait)) in waits.iter().enumerate() {
            let gap = calls[r + 1] - calls[r];
            // The clock only moves by the router's sleep; tokio's timer has
            // millisecond ticks, so the sleep ends on the tick at or after `wait`.
            assert!(
                gap >= *wait && gap - *wait < Duration::from_millis(1),
                "retry {r}: announced {wait:?}, slept {gap:?}"
            );
            gaps[r].push(gap);
        }
    }

    for (r, gaps) in gaps.iter().enumerate() {
        // Retry r after attempt r + 1 uses the ceiling min(cap, base · 2^r):
        // 100, 200, 400, 800 ms.
        let ceiling = backoff_ceiling(&config, r as u32);
        assert_eq!(ceiling, Duration::from_millis(100 << r));
        assert!(
            gaps.iter().all(|g| *g <= ceiling),
            "retry {r}: a delay above {ceiling:?}: {:?}",
            gaps.iter().max()
        );
        // Full jitter over the whole range: the exponent is not one too
        // small (every delay would stay under half the ceiling; the chance of
        // that by luck is 0.75^200 ≈ 1e-25), nor is the delay fixed.
        assert!(
            gaps.iter().any(|g| *g > ceiling * 3 / 4),
            "retry {r}: no delay in the top quarter of {ceiling:?}"
        );
        assert!(
            gaps.iter().any(|g| *g < ceiling / 4),
            "retry {r}: no delay in the bottom quarter of {ceiling:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_within_the_cap_is_slept_exactly_before_the_same_deployment_is_called_again()
{
    let primary = Scripted::new(|n| match n {
        0 => Err(status(429, Some(Duration::from_millis(1500)))),
        _ => Ok(()),
    });
    let fallback = Scripted::healthy();
    let route = route(&[("primary", &primary), ("fallback", &fallback)]);
    let router = Router::new(RetryConfig::default(), unlimited_budget());
    let events = Recorder::default();
    let started = Instant::now();

    let served = router
        .chat(&route, &body(), None, false, &events)
        .await
        .unwrap();

    assert_eq!(
        (served.deployment.id.as_str(), served.attempts),
        ("primary", 2)
    );
    let calls = primary.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0], started, "the first call is made at once");
    assert_eq!(
        calls[1] - calls[0],
        Duration::from_millis(1500),
        "the retry waits exactly Retry-After, no jitter added"
    );
    assert!(fallback.calls().is_empty());
    assert_eq!(
        events.take(),
        [
            Seen::Attempt("primary".into(), 1),
            Seen::Retry("primary".into(), 1, Duration::from_millis(1500)),
            Seen::Attempt("primary".into(), 2),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_cap_moves_to_the_fallback_without_waiting() {
    let primary = Scripted::new(|_| Err(status(429, Some(Duration::from_secs(30)))));
    let fallback = Scripted::healthy();
    let route = route(&[("primary", &primary), ("fallback", &fallback)]);
    let router = Router::new(RetryConfig::default(), unlimited_budget());
    let events = Recorder::default();

    let served = router
        .chat(&route, &body(), None, false, &events)
        .await
        .unwrap();

    assert_eq!(
        (served.deployment.id.as_str(), served.attempts),
        ("fallback", 2)
    );
    assert_eq!(primary.calls().len(), 1);
    assert_eq!(
        fallback.calls()[0],
        primary.calls()[0],
        "no time passed: the fallback was called at once"
    );
    assert_eq!(
        events.take(),
        [
            Seen::Attempt("primary".into(), 1),
            Seen::Fallback("primary".into(), "fallback".into()),
            Seen::Attempt("fallback".into(), 1),
        ]
    );
}
