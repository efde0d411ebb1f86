//! Routes a call over an alias's deployments: tiers in priority order, load
//! shared by weight inside a tier, retries with backoff inside the retry
//! budget, circuit breakers that skip failing deployments at no cost, and
//! fallback to the next deployment. A stream is committed once its first
//! chunk has arrived; until then a failure moves on like any other.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use serde_json::{Map, Value};
use switchyard_core::anthropic::NativeMessages;
use switchyard_core::openai::EncodingFormat;
use tokio::time::Instant;

use crate::breaker::{BreakerState, CircuitBreaker, Transition};
use crate::health::HealthStats;
use crate::retry::{is_deployment_fault, is_retryable, next_step, Next, RetryBudget, RetryConfig};
use crate::{
    ChatCall, ChatProvider, ChatReply, ChunkStream, Completion, EmbedCall, EmbeddingProvider,
    ProviderError,
};

/// One provider + upstream model that a route may use.
pub struct Deployment {
    /// `provider/model`, for logs, metrics and the admin API.
    pub id: String,
    pub provider_name: Arc<str>,
    pub upstream_model: Arc<str>,
    pub chat: Arc<dyn ChatProvider>,
    pub embed: Arc<dyn EmbeddingProvider>,
    pub breaker: CircuitBreaker,
    pub first_byte_timeout: Duration,
    pub total_timeout: Duration,
    /// Longest silence inside a stream once it has begun.
    pub stream_idle_timeout: Option<Duration>,
    pub health: HealthStats,
}

/// A deployment's place in one alias's route.
pub struct RouteEntry {
    pub priority: u32,
    /// Share of its tier's traffic.
    pub weight: u32,
    pub deployment: Arc<Deployment>,
}

/// An alias's deployments grouped by priority, best first.
pub struct Route {
    tiers: Vec<Vec<(u32, Arc<Deployment>)>>,
}

impl Route {
    /// Equal priorities form one tier.
    pub fn new(mut entries: Vec<RouteEntry>) -> Self {
        entries.sort_by_key(|e| e.priority);
        let mut tiers: Vec<Vec<(u32, Arc<Deployment>)>> = Vec::new();
        let mut last = None;
        for e in entries {
            if last == Some(e.priority) {
                if let Some(t) = tiers.last_mut() {
                    t.push((e.weight, e.deployment));
                }
            } else {
                tiers.push(vec![(e.weight, e.deployment)]);
                last = Some(e.priority);
            }
        }
        Self { tiers }
    }

    pub fn deployments(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.tiers.iter().flatten().map(|(_, d)| d)
    }

    /// The order to try deployments in: tier by tier, each tier in a random
    /// order weighted by `weight` (so the first pick follows the weights).
    fn order(&self, rng: &mut impl Rng) -> Vec<Arc<Deployment>> {
        let mut out = Vec::with_capacity(self.tiers.iter().map(Vec::len).sum());
        for tier in &self.tiers {
            if let [(_, only)] = tier.as_slice() {
                out.push(only.clone());
                continue;
            }
            let mut pool: Vec<&(u32, Arc<Deployment>)> = tier.iter().collect();
            while !pool.is_empty() {
                let total: u64 = pool.iter().map(|(w, _)| u64::from(*w)).sum();
                let mut pick = rng.random_range(0..total.max(1));
                let mut idx = 0;
                for (i, (w, _)) in pool.iter().enumerate() {
                    if pick < u64::from(*w) {
                        idx = i;
                        break;
                    }
                    pick -= u64::from(*w);
                }
                out.push(pool.remove(idx).1.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rand::SeedableRng;

    struct Never;

    #[async_trait::async_trait]
    impl ChatProvider for Never {
        fn name(&self) -> &str {
            "never"
        }
        async fn chat(&self, _: ChatCall<'_>) -> Result<ChatReply, ProviderError> {
            Err(ProviderError::Truncated)
        }
        async fn probe(&self, _: Duration) -> Result<(), ProviderError> {
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl EmbeddingProvider for Never {
        fn name(&self) -> &str {
            "never"
        }
        async fn embed(&self, _: EmbedCall<'_>) -> Result<Completion, ProviderError> {
            Err(ProviderError::Truncated)
        }
    }

    fn dep(id: &str) -> Arc<Deployment> {
        Arc::new(Deployment {
            id: id.to_owned(),
            provider_name: Arc::from(id),
            upstream_model: Arc::from("m"),
            chat: Arc::new(Never),
            embed: Arc::new(Never),
            breaker: CircuitBreaker::new(crate::breaker::BreakerConfig::default()),
            first_byte_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(1),
            stream_idle_timeout: None,
            health: HealthStats::default(),
        })
    }

    /// Drains a stream wrapped as a committed one, as the client would.
    async fn settle_stream(d: &Arc<Deployment>, items: Vec<Result<Bytes, ProviderError>>) {
        settle_choices(d, items, 1).await;
    }

    async fn settle_choices(
        d: &Arc<Deployment>,
        items: Vec<Result<Bytes, ProviderError>>,
        choices: u64,
    ) {
        let permit = d.breaker.try_acquire().0.expect("closed");
        let inner: ChunkStream = Box::pin(futures::stream::iter(items));
        let mut s = settle_at_end(inner, permit, d, Duration::from_millis(5), choices);
        while s.next().await.is_some() {}
    }

    #[tokio::test]
    async fn with_several_choices_a_close_after_only_some_finished_is_a_cut() {
        let chunk = |j: &str| Ok(Bytes::from(j.to_owned()));
        let d = dep("n2");
        for _ in 0..5 {
            settle_choices(
                &d,
                vec![
                    chunk(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#),
                    Err(ProviderError::Truncated),
                ],
                2,
            )
            .await;
        }
        assert_eq!(d.breaker.state(), BreakerState::Open);
        let d = dep("n2-whole");
        settle_choices(
            &d,
            vec![
                chunk(r#"{"choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}"#),
                chunk(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#),
                Err(ProviderError::Truncated),
            ],
            2,
        )
        .await;
        assert_eq!(d.health.snapshot().error_rate, 0.0);
    }

    #[tokio::test]
    async fn a_clean_close_counts_as_a_cut_unless_the_answer_had_ended() {
        let chunk = |j: &str| Ok(Bytes::from(j.to_owned()));
        // Closed without [DONE] after the finish reason: a success.
        let d = dep("a");
        for _ in 0..5 {
            settle_stream(
                &d,
                vec![
                    chunk(r#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#),
                    chunk(r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#),
                    Err(ProviderError::Truncated),
                ],
            )
            .await;
        }
        assert_eq!(d.breaker.state(), BreakerState::Closed);
        assert_eq!(d.health.snapshot().error_rate, 0.0);
        // Closed before any end (an Anthropic stream's stop_reason counts
        // too): a failure, and five open the breaker.
        let d = dep("b");
        for _ in 0..5 {
            settle_stream(
                &d,
                vec![
                    chunk(r#"{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}"#),
                    Err(ProviderError::Truncated),
                ],
            )
            .await;
        }
        assert_eq!(d.breaker.state(), BreakerState::Open);
        let d = dep("c");
        settle_stream(
            &d,
            vec![
                chunk(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"}}"#),
                Err(ProviderError::Truncated),
            ],
        )
        .await;
        assert_eq!(d.health.snapshot().error_rate, 0.0);
    }

    fn entry(priority: u32, weight: u32, id: &str) -> RouteEntry {
        RouteEntry {
            priority,
            weight,
            deployment: dep(id),
        }
    }

    #[test]
    fn tiers_are_tried_in_priority_order() {
        let route = Route::new(vec![entry(2, 1, "c"), entry(0, 1, "a"), entry(1, 1, "b")]);
        let ids: Vec<String> = route
            .order(&mut rand::rng())
            .iter()
            .map(|d| d.id.clone())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn equal_priorities_share_first_picks_by_weight() {
        let route = Route::new(vec![
            entry(0, 3, "heavy"),
            entry(0, 1, "light"),
            entry(1, 1, "last"),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut heavy_first = 0;
        for _ in 0..4000 {
            let order = route.order(&mut rng);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2].id, "last", "the lower tier always comes after");
            if order[0].id == "heavy" {
                heavy_first += 1;
            }
        }
        // 3:1 weights: about 3000 of 4000; the bounds are ±6 standard deviations.
        assert!((2835..=3165).contains(&heavy_first), "{heavy_first}");
    }
}

/// What a routed call produced and who produced it.
pub struct Served<T> {
    pub value: T,
    pub deployment: Arc<Deployment>,
    /// Upstream calls made, the successful one included.
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The last deployment tried failed this way (or the failure was not
    /// retryable and was returned at once).
    #[error("{error}")]
    Failed {
        error: ProviderError,
        deployment: Arc<Deployment>,
        attempts: u32,
    },
    /// Every deployment's breaker was open: nothing was called. `retry_after`:
    /// the soonest any of them lets a call through.
    #[error("every deployment of this model is unavailable (circuit open)")]
    Unavailable { retry_after: Option<Duration> },
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id)
    }
}

/// A step of a routed call, reported as it happens (for the request's trace).
#[derive(Debug, Clone, Copy)]
pub enum RouteEvent<'a> {
    /// An upstream call is about to be made.
    Attempt { deployment: &'a str, attempt: u32 },
    /// That call failed and will be retried after `wait`.
    Retry {
        deployment: &'a str,
        attempt: u32,
        wait: Duration,
        error: &'a ProviderError,
    },
    /// The route moves on to the next deployment.
    Fallback {
        from: &'a str,
        to: &'a str,
        error: &'a ProviderError,
    },
    /// A deployment was skipped because its breaker is open.
    Skipped { deployment: &'a str },
    /// A deployment's breaker changed state.
    Breaker {
        deployment: &'a str,
        from: BreakerState,
        to: BreakerState,
    },
}

/// Receives a routed call's [`RouteEvent`]s; must not block.
pub trait RouteObserver: Send + Sync {
    fn on_event(&self, event: RouteEvent<'_>);
    /// The deployment an upstream call is about to be made to, told just
    /// before its [`RouteEvent::Attempt`]: who is owed for a call the client
    /// leaves before it is answered.
    fn attempting(&self, _deployment: &Arc<Deployment>) {}
}

/// Observes nothing.
impl RouteObserver for () {
    fn on_event(&self, _: RouteEvent<'_>) {}
}

pub struct Router {
    retry: RetryConfig,
    budget: RetryBudget,
}

/// The call to make on one deployment.
#[derive(Clone, Copy)]
enum Call<'a> {
    Chat {
        body: &'a Map<String, Value>,
        anthropic: Option<&'a NativeMessages>,
        stream: bool,
    },
    Embed {
        body: &'a Map<String, Value>,
        encoding_format: EncodingFormat,
    },
}

enum Reply {
    Chat(ChatReply),
    Embed(Completion),
}

impl Router {
    pub fn new(retry: RetryConfig, budget: RetryBudget) -> Self {
        Self { retry, budget }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(stream))]
    /// `anthropic`: the Anthropic Messages body `body` was translated from,
    /// if any (see [`ChatCall::anthropic_body`]).
    pub async fn chat(
        &self,
        route: &Route,
        body: &Map<String, Value>,
        anthropic: Option<&NativeMessages>,
        stream: bool,
        observer: &dyn RouteObserver,
    ) -> Result<Served<ChatReply>, RouteError> {
        let call = Call::Chat {
            body,
            anthropic,
            stream,
        };
        let served = self.run(route, call, observer).await?;
        match served.value {
            Reply::Chat(r) => Ok(Served {
                value: r,
                deployment: served.deployment,
                attempts: served.attempts,
            }),
            Reply::Embed(_) => Err(RouteError::Unavailable { retry_after: None }),
        }
    }

    pub async fn embed(
        &self,
        route: &Route,
        body: &Map<String, Value>,
        encoding_format: EncodingFormat,
        observer: &dyn RouteObserver,
    ) -> Result<Served<Completion>, RouteError> {
        let served = self
            .run(
                route,
                Call::Embed {
                    body,
                    encoding_format,
                },
                observer,
            )
            .await?;
        match served.value {
            Reply::Embed(c) => Ok(Served {
                value: c,
                deployment: served.deployment,
                attempts: served.attempts,
            }),
            Reply::Chat(_) => Err(RouteError::Unavailable { retry_after: None }),
        }
    }

    async fn run(
        &self,
        route: &Route,
        call: Call<'_>,
        obs: &dyn RouteObserver,
    ) -> Result<Served<Reply>, RouteError> {
        self.budget.record_request();
        let choices = match call {
            Call::Chat { body, .. } => body
                .get("n")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, 128),
            Call::Embed { .. } => 1,
        };
        let order = route.order(&mut rand::rng());
        let mut attempts = 0u32;
        let mut last: Option<(ProviderError, Arc<Deployment>)> = None;
        for d in &order {
            let mut attempt = 1u32;
            loop {
                let (permit, t) = d.breaker.try_acquire();
                log_transition(d, t, obs);
                let Some(permit) = permit else {
                    tracing::debug!(deployment = %d.id, "circuit open: skipping");
                    obs.on_event(RouteEvent::Skipped { deployment: &d.id });
                    metrics::counter!("switchyard_breaker_rejections_total", "deployment" => d.id.clone()).increment(1);
                    break;
                };
                // A fallback is counted where it lands: to a deployment
                // that is called, not one skipped with its breaker open.
                if attempt == 1 {
                    if let Some((e, from)) = &last {
                        tracing::warn!(from = %from.id, to = %d.id, error = %e, "falling back to the next deployment");
                        obs.on_event(RouteEvent::Fallback {
                            from: &from.id,
                            to: &d.id,
                            error: e,
                        });
                        metrics::counter!("switchyard_fallbacks_total", "from" => from.id.clone())
                            .increment(1);
                    }
                }
                attempts += 1;
                obs.attempting(d);
                obs.on_event(RouteEvent::Attempt {
                    deployment: &d.id,
                    attempt,
                });
                let started = Instant::now();
                let outcome = attempt_once(d, call).await;
                let elapsed = started.elapsed();
                match outcome {
                    // A stream is judged when it ends: its permit goes with
                    // it (a probe keeps its slot until then).
                    Ok(Reply::Chat(ChatReply::Stream(s))) => {
                        metrics::counter!("switchyard_upstream_attempts_total", "deployment" => d.id.clone(), "outcome" => "ok").increment(1);
                        return Ok(Served {
                            value: Reply::Chat(ChatReply::Stream(settle_at_end(
                                s, permit, d, elapsed, choices,
                            ))),
                            deployment: d.clone(),
                            attempts,
                        });
                    }
                    Ok(Reply::Chat(ChatReply::AnthropicStream(s))) => {
                        metrics::counter!("switchyard_upstream_attempts_total", "deployment" => d.id.clone(), "outcome" => "ok").increment(1);
                        return Ok(Served {
                            value: Reply::Chat(ChatReply::AnthropicStream(settle_at_end(
                                s, permit, d, elapsed, 1,
                            ))),
                            deployment: d.clone(),
                            attempts,
                        });
                    }
                    Ok(reply) => {
                        log_transition(d, permit.success(), obs);
                        d.health.record_success(elapsed);
                        metrics::counter!("switchyard_upstream_attempts_total", "deployment" => d.id.clone(), "outcome" => "ok").increment(1);
                        return Ok(Served {
                            value: reply,
                            deployment: d.clone(),
                            attempts,
                        });
                    }
                    Err(e @ ProviderError::Overloaded { .. }) => {
                        // At capacity, not broken: the breaker and the health
                        // figures leave it out, and the next deployment serves.
                        drop(permit);
                        metrics::counter!("switchyard_upstream_attempts_total", "deployment" => d.id.clone(), "outcome" => "overloaded").increment(1);
                        last = Some((e, d.clone()));
                        break;
                    }
                    Err(e) if !is_retryable(&e) && !is_deployment_fault(&e) => {
                        // The request itself was refused: not the deployment's
                        // fault, and no other deployment will think otherwise.
                        drop(permit);
                        d.health.record_success(elapsed);
                        metrics::counter!("switchyard_upstream_attempts_total", "deployment" => d.id.clone(), "outcome" => "rejected").increment(1);
                        return Err(RouteError::Failed {
                            error: e,
                            deployment: d.clone(),
                            attempts,
                        });
                    }
                    Err(e) => {
                        let transition = permit.failure();
                        let opened = transition.is_some_and(|t| t.to == BreakerState::Open);
                        log_transition(d, transition, obs);
                        d.health.record_failure(elapsed, e.code());
                        metrics::counter!("switchyard_upstream_attempts_total", "deployment" => d.id.clone(), "outcome" => "error").increment(1);
                        // Not tried again here: a deployment whose breaker this
                        // failure opened, one that refuses the gateway itself,
                        // and, while another deployment whose breaker is not
                        // open remains, one that hung (a second wait as long
                        // would keep the client twice the timeout from a
                        // fallback that may answer at once).
                        let more = order
                            .iter()
                            .skip_while(|other| !Arc::ptr_eq(other, d))
                            .skip(1)
                            .any(|next| next.breaker.state() != BreakerState::Open);
                        let step = if opened
                            || is_deployment_fault(&e)
                            || (more && matches!(e, ProviderError::Timeout(_)))
                        {
                            Next::Fallback
                        } else {
                            next_step(&self.retry, attempt, &e, &mut rand::rng())
                        };
                        match step {
                            Next::RetryAfter(wait) if self.budget.try_retry() => {
                                tracing::info!(deployment = %d.id, attempt, wait_ms = wait.as_millis() as u64, "retrying");
                                obs.on_event(RouteEvent::Retry {
                                    deployment: &d.id,
                                    attempt,
                                    wait,
                                    error: &e,
                                });
                                last = Some((e, d.clone()));
                                metrics::counter!("switchyard_retries_total", "deployment" => d.id.clone()).increment(1);
                                tokio::time::sleep(wait).await;
                                attempt += 1;
                            }
                            Next::RetryAfter(_) => {
                                last = Some((e, d.clone()));
                                tracing::warn!(deployment = %d.id, "retry budget spent: not retrying");
                                metrics::counter!("switchyard_retry_budget_exhausted_total")
                                    .increment(1);
                                break;
                            }
                            Next::Fallback => {
                                last = Some((e, d.clone()));
                                break;
                            }
                        }
                    }
                }
            }
        }
        match last {
            Some((error, deployment)) => Err(RouteError::Failed {
                error,
                deployment,
                attempts,
            }),
            None => Err(RouteError::Unavailable {
                retry_after: order.iter().filter_map(|d| d.breaker.retry_in()).min(),
            }),
        }
    }
}

/// A committed stream that reports to its deployment's breaker and health
/// figures when it ends, not at its first byte: a deployment whose streams
/// break after their first chunk is failing, however well they start.
struct Settling {
    inner: ChunkStream,
    permit: Option<crate::breaker::Permit>,
    deployment: Arc<Deployment>,
    /// Time to the first chunk: the latency the health figures keep.
    first_byte: Duration,
    /// The request's span, so that a transition logs its trace id.
    span: tracing::Span,
    /// A finish reason (OpenAI) or stop reason (Anthropic) went by, for
    /// every choice: a clean close after it is a complete answer, before it
    /// a cut one.
    finished: bool,
    /// The choices asked for (`n`), and those finished so far (a bit each).
    choices: u64,
    finished_choices: u128,
}

fn settle_at_end(
    inner: ChunkStream,
    permit: crate::breaker::Permit,
    deployment: &Arc<Deployment>,
    first_byte: Duration,
    choices: u64,
) -> ChunkStream {
    let inner = match deployment.stream_idle_timeout {
        Some(idle) => Box::pin(IdleWatch {
            inner,
            idle,
            last: Instant::now(),
            timer: Box::pin(tokio::time::sleep(idle)),
            done: false,
        }),
        None => inner,
    };
    Box::pin(Settling {
        inner,
        permit: Some(permit),
        deployment: deployment.clone(),
        first_byte,
        span: tracing::Span::current(),
        finished: false,
        choices,
        finished_choices: 0,
    })
}

impl Settling {
    fn settle(&mut self, error: Option<&ProviderError>) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let d = &self.deployment;
        let _entered = self.span.enter();
        // The end, or a close without `[DONE]` after the answer's end (many
        // servers do): answered. A close before it is a cut.
        let error = match error {
            Some(ProviderError::Truncated) if self.finished => None,
            other => other,
        };
        if let Some(e) = error {
            // The access line, written when the headers went out, says 200:
            // without this line a stream cut midway leaves no trace in the log.
            tracing::warn!(deployment = %d.id, code = e.code(), error = %e, "stream broke after its first chunk");
        }
        match error {
            None => {
                log_stream_transition(d, permit.success());
                d.health.record_success(self.first_byte);
            }
            Some(e) if !is_retryable(e) => {
                drop(permit);
                d.health.record_success(self.first_byte);
            }
            Some(ProviderError::Overloaded { .. }) => drop(permit),
            Some(e) => {
                log_stream_transition(d, permit.failure());
                d.health.record_failure(self.first_byte, e.code());
                metrics::counter!("switchyard_upstream_stream_failures_total", "deployment" => d.id.clone()).increment(1);
            }
        }
    }
}

impl futures::Stream for Settling {
    type Item = Result<bytes::Bytes, ProviderError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let item = futures::ready!(self.inner.as_mut().poll_next(cx));
        match &item {
            None => self.settle(None),
            Some(Err(e)) => self.settle(Some(e)),
            Some(Ok(chunk)) => {
                if !self.finished && crate::scan::ends_the_answer(chunk) {
                    // With `n` > 1 the answer is whole once every choice has
                    // finished, as the client's accounting judges it.
                    let choices = self.choices;
                    self.finished = choices == 1
                        || crate::scan::all_finished(chunk, choices, &mut self.finished_choices);
                }
            }
        }
        std::task::Poll::Ready(item)
    }
}

/// Ends a committed stream whose provider has sent nothing for `idle` with
/// a timeout (then nothing more). The timer is moved only when it fires,
/// not on every chunk: each chunk costs a clock read.
struct IdleWatch {
    inner: ChunkStream,
    idle: Duration,
    /// When the last item came.
    last: Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl futures::Stream for IdleWatch {
    type Item = Result<bytes::Bytes, ProviderError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(item) => {
                self.last = Instant::now();
                Poll::Ready(item)
            }
            Poll::Pending => loop {
                if std::future::Future::poll(self.timer.as_mut(), cx).is_pending() {
                    return Poll::Pending;
                }
                let due = self.last + self.idle;
                if Instant::now() >= due {
                    self.done = true;
                    return Poll::Ready(Some(Err(ProviderError::Timeout(self.idle))));
                }
                self.timer.as_mut().reset(due);
            },
        }
    }
}

/// A transition caused by a stream's end: logged and counted as any other
/// (the request's trace events are written by then).
fn log_stream_transition(d: &Deployment, t: Option<Transition>) {
    log_transition(d, t, &());
}

fn log_transition(d: &Deployment, t: Option<Transition>, obs: &dyn RouteObserver) {
    let Some(t) = t else { return };
    obs.on_event(RouteEvent::Breaker {
        deployment: &d.id,
        from: t.from,
        to: t.to,
    });
    match t.to {
        BreakerState::Open => {
            tracing::warn!(deployment = %d.id, from = %t.from, to = %t.to, "circuit breaker opened")
        }
        _ => {
            tracing::info!(deployment = %d.id, from = %t.from, to = %t.to, "circuit breaker changed state")
        }
    }
    metrics::counter!("switchyard_breaker_transitions_total", "deployment" => d.id.clone(), "to" => t.to.as_str())
        .increment(1);
    metrics::gauge!("switchyard_breaker_state", "deployment" => d.id.clone()).set(t.to.as_gauge());
}

/// One upstream call under the deployment's first-byte timeout. A stream is
/// only returned once its first chunk is in hand.
async fn attempt_once(d: &Deployment, call: Call<'_>) -> Result<Reply, ProviderError> {
    let first_byte = d.first_byte_timeout;
    // The reply, and whether it is a stream that holds its preamble back.
    let work = async {
        match call {
            Call::Chat {
                body,
                anthropic,
                stream,
            } => {
                let c = ChatCall {
                    upstream_model: &d.upstream_model,
                    body,
                    anthropic_body: anthropic,
                    stream,
                    timeout: d.total_timeout,
                };
                match d.chat.chat(c).await? {
                    ChatReply::Stream(s) => {
                        let (s, held) = first(s).await?;
                        Ok((Reply::Chat(ChatReply::Stream(s)), held))
                    }
                    ChatReply::AnthropicStream(s) => {
                        let (s, held) = first(s).await?;
                        Ok((Reply::Chat(ChatReply::AnthropicStream(s)), held))
                    }
                    complete => Ok((Reply::Chat(complete), false)),
                }
            }
            Call::Embed {
                body,
                encoding_format,
            } => {
                let c = EmbedCall {
                    upstream_model: &d.upstream_model,
                    body,
                    encoding_format,
                    timeout: d.total_timeout,
                };
                Ok((Reply::Embed(d.embed.embed(c).await?), false))
            }
        }
    };
    let (reply, held) = match tokio::time::timeout(first_byte, work).await {
        Ok(r) => r?,
        Err(_) => return Err(ProviderError::Timeout(first_byte)),
    };
    if !held {
        return Ok(reply);
    }
    // A stream that began by holding its preamble back met the first-byte
    // timeout with it (a long prompt's prefill must not be cut and billed
    // again); the answer's first event (or the failure before it, which
    // still fails over) is awaited under the total timeout and, as every
    // silence of a stream's answer, the stream idle timeout.
    async fn answer(
        mut s: ChunkStream,
        idle: Option<Duration>,
    ) -> Result<ChunkStream, ProviderError> {
        loop {
            let next = match idle {
                Some(idle) => tokio::time::timeout(idle, first(s))
                    .await
                    .map_err(|_| ProviderError::Timeout(idle))?,
                None => first(s).await,
            };
            match next? {
                (s, false) => return Ok(s),
                (held, true) => s = held,
            }
        }
    }
    let idle = d.stream_idle_timeout;
    match reply {
        Reply::Chat(ChatReply::Stream(s)) => {
            Ok(Reply::Chat(ChatReply::Stream(answer(s, idle).await?)))
        }
        Reply::Chat(ChatReply::AnthropicStream(s)) => Ok(Reply::Chat(ChatReply::AnthropicStream(
            answer(s, idle).await?,
        ))),
        other => Ok(other),
    }
}

/// A stream counts as served once its first item arrives: a failure before
/// it fails over like any other. An empty item is a provider's word that the
/// stream has begun but holds its preamble back (`held`: Anthropic's, whose
/// `overloaded_error` comes right after it); it is never relayed.
async fn first(mut s: ChunkStream) -> Result<(ChunkStream, bool), ProviderError> {
    match s.next().await {
        Some(Ok(item)) if item.is_empty() => Ok((s, true)),
        Some(Ok(item)) => Ok((
            Box::pin(futures::stream::once(async move { Ok(item) }).chain(s)),
            false,
        )),
        Some(Err(e)) => Err(e),
        None => Err(ProviderError::Truncated),
    }
}
