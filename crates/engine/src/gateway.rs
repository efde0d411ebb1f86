//! The gateway service: resolves a model alias to its route, has the router
//! call a deployment (retries, breakers, fallback), and accounts for the call
//! (usage row, metrics) whatever the outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;
use switchyard_core::config::{Config, Pricing, ProviderKind};
use switchyard_core::openai::{
    estimate_embedding_tokens, estimate_prompt_tokens, ChatRequest, EmbeddingsRequest,
    InvalidRequest, Usage,
};
use switchyard_core::usage::{new_id, UsageRecord};
use switchyard_providers::anthropic::AnthropicProvider;
use switchyard_providers::breaker::{BreakerConfig, CircuitBreaker};
use switchyard_providers::health::HealthStats;
use switchyard_providers::openai::OpenAiProvider;
use switchyard_providers::retry::{RetryBudget, RetryConfig};
use switchyard_providers::router::{
    Deployment, Route, RouteEntry, RouteError, RouteEvent, RouteObserver, Router,
};
use switchyard_providers::{ChatProvider, ChatReply, EmbeddingProvider, ProviderError};
use tracing::Instrument;

/// A provider's two faces.
/// A provider's chat and embedding sides (one object may be both).
pub type Adapter = (Arc<dyn ChatProvider>, Arc<dyn EmbeddingProvider>);
use switchyard_store::{Store, StoreError};

use crate::batch_writer::{EventWriter, UsageWriter};
use crate::events::TraceEvents;
use crate::handles::Handles;
use crate::metered::{MeteredStream, StreamEvent};

/// Who is asking and since when; carried from the HTTP layer.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub trace_id: String,
    pub tenant_id: String,
    /// The API key that authenticated the request, if one did.
    pub key_id: Option<String>,
    /// The user the request acts for, if known.
    pub user_id: Option<String>,
    pub started: Instant,
    /// Where the tokens this call uses are counted (token-per-minute limits).
    pub tokens: Option<TokenMeter>,
    /// The session the call answers in, if any (for its trace events).
    pub session_id: Option<String>,
}

/// A token-per-minute limit to charge once a call's usage is known.
#[derive(Clone)]
pub struct TokenMeter {
    pub limiter: Arc<dyn crate::limits::RateLimiter>,
    pub key: String,
    pub limit: switchyard_core::limits::TokenRate,
}

impl std::fmt::Debug for TokenMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMeter")
            .field("key", &self.key)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    /// The request breaks a rule of this server's configuration.
    #[error("{}", .0.message)]
    Invalid(InvalidRequest),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Every deployment of the alias has an open circuit breaker;
    /// `retry_after`: the soonest one lets a call through.
    #[error("every deployment of `{model}` is unavailable")]
    Unavailable {
        model: String,
        retry_after: Option<Duration>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("provider setup failed: {0}")]
    Setup(String),
}

/// An entry of `GET /v1/models`.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub id: String,
    pub owned_by: String,
    pub created: u64,
}

pub enum ChatOutcome {
    /// The provider's JSON, relayed as is.
    Complete {
        body: Bytes,
        provider: Arc<str>,
        /// The body is Anthropic's message, not an OpenAI completion: an
        /// Anthropic deployment's own answer to a Messages client.
        anthropic: bool,
    },
    Stream {
        events: Box<dyn Stream<Item = StreamEvent> + Send + Unpin>,
        provider: Arc<str>,
        /// The serving deployment's prices, if configured.
        pricing: Option<Pricing>,
        /// The chunks are Anthropic events (each one's data), as above.
        anthropic: bool,
    },
}

/// What every call shares, held by each call's [`Accounting`] through one
/// `Arc`: the gateway's metric handles by label values, and who is told of
/// each call's cost.
#[derive(Default)]
struct CallMetrics {
    /// Told the cost of every finished call (the budgets' running spend).
    spend: std::sync::OnceLock<Arc<dyn SpendObserver>>,
    /// `switchyard_upstream_duration_seconds` by provider and endpoint.
    duration: Handles<metrics::Histogram>,
    /// `switchyard_upstream_ttft_seconds` by provider.
    ttft: Handles<metrics::Histogram>,
    /// `switchyard_tokens_total` (prompt, completion) by model and provider.
    tokens: Handles<(metrics::Counter, metrics::Counter)>,
}

pub struct Gateway {
    routes: HashMap<String, Route>,
    metrics: Arc<CallMetrics>,
    deployments: Vec<Arc<Deployment>>,
    pricing: HashMap<String, Pricing>,
    router: Router,
    models: Vec<ModelInfo>,
    usage: UsageWriter,
    events: EventWriter,
    store: Arc<dyn Store>,
    /// `security.max_tokens`: the largest completion a request may ask for.
    max_tokens: Option<u32>,
    /// Cancelled when the server stops waiting for calls in flight (its
    /// shutdown grace period has passed): each then ends at once, its client
    /// told why and its usage row written (see [`Gateway::stop_calls`]).
    stopping: crate::stop::Stop,
}

/// Told the cost of each call as its usage row is written, so that what a
/// call spent counts against budgets at once, not once the row is stored
/// and read back.
pub trait SpendObserver: Send + Sync {
    fn spent(&self, tenant: &str, key: Option<&str>, cost_usd: f64, at_ms: i64);
}

impl Gateway {
    /// `in_process` holds the adapters of providers this crate cannot build
    /// itself (the `local` kind, whose models live in a crate beside this
    /// one), by provider name.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        usage: UsageWriter,
        events: EventWriter,
        mut in_process: HashMap<String, Adapter>,
    ) -> Result<Self, EngineError> {
        let mut providers: HashMap<&str, Adapter> = HashMap::new();
        for (name, p) in &config.providers {
            let setup = |e: ProviderError| EngineError::Setup(format!("{name}: {e}"));
            let adapter: Adapter = match p.kind {
                ProviderKind::Openai => {
                    let a = Arc::new(OpenAiProvider::new(name, p).map_err(setup)?);
                    (a.clone(), a)
                }
                ProviderKind::Anthropic => {
                    let a = Arc::new(AnthropicProvider::new(name, p).map_err(setup)?);
                    (a.clone(), a)
                }
                ProviderKind::Local => in_process.remove(name).ok_or_else(|| {
                    EngineError::Setup(format!(
                        "providers.{name}: a local provider needs the `local` feature and its model files"
                    ))
                })?,
            };
            providers.insert(name, adapter);
        }
        let r = &config.resilience;
        let breaker = BreakerConfig {
            failure_threshold: r.breaker_failure_threshold,
            cooldown: Duration::from_secs(r.breaker_cooldown_secs),
            half_open_probes: r.breaker_half_open_probes,
            success_threshold: r.breaker_success_threshold,
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Deployments are shared between aliases with the same timeouts; and
        // one upstream (provider and model) has one breaker and one set of
        // health figures, under one id, whatever timeouts its routes give it.
        // (provider, model, first byte ms, total s, stream idle ms)
        type DeploymentKey = (String, String, u64, u64, Option<u64>);
        let mut by_key: HashMap<DeploymentKey, Arc<Deployment>> = HashMap::new();
        let mut upstreams: HashMap<(String, String), (CircuitBreaker, HealthStats)> =
            HashMap::new();
        let mut deployments = Vec::new();
        let mut pricing = HashMap::new();
        let mut routes = HashMap::new();
        let mut models = Vec::new();
        for (alias, m) in &config.models {
            let mut entries = Vec::new();
            for (priority, d) in m.deployments() {
                let pc = config.providers.get(&d.provider).ok_or_else(|| {
                    EngineError::Setup(format!("models.{alias}: unknown provider {}", d.provider))
                })?;
                let provider = providers.get(d.provider.as_str()).ok_or_else(|| {
                    EngineError::Setup(format!("models.{alias}: unknown provider {}", d.provider))
                })?;
                let first_byte = d.first_byte_timeout_ms.unwrap_or(pc.first_byte_timeout_ms);
                let total = d.timeout_secs.unwrap_or(pc.timeout_secs);
                let idle = d.stream_idle_timeout_ms.or(pc.stream_idle_timeout_ms);
                let key = (d.provider.clone(), d.model.clone(), first_byte, total, idle);
                let dep = by_key
                    .entry(key)
                    .or_insert_with(|| {
                        let upstream = (d.provider.clone(), d.model.clone());
                        let first_seen = !upstreams.contains_key(&upstream);
                        let (shared_breaker, shared_health) = upstreams
                            .entry(upstream)
                            .or_insert_with(|| {
                                (CircuitBreaker::new(breaker), HealthStats::default())
                            })
                            .clone();
                        let dep = Arc::new(Deployment {
                            id: format!("{}/{}", d.provider, d.model),
                            provider_name: Arc::from(d.provider.as_str()),
                            upstream_model: Arc::from(d.model.as_str()),
                            chat: provider.0.clone(),
                            embed: provider.1.clone(),
                            breaker: shared_breaker,
                            first_byte_timeout: Duration::from_millis(first_byte),
                            total_timeout: Duration::from_secs(total),
                            stream_idle_timeout: idle.map(Duration::from_millis),
                            health: shared_health,
                        });
                        // Listed (admin API, health rows, probes) once per upstream.
                        if first_seen {
                            metrics::gauge!("switchyard_breaker_state", "deployment" => dep.id.clone())
                                .set(0.0);
                            deployments.push(dep.clone());
                        }
                        dep
                    })
                    .clone();
                if let Some(p) = config.price_for(&d.provider, &d.model) {
                    pricing.insert(dep.id.clone(), p);
                }
                entries.push(RouteEntry {
                    priority,
                    weight: d.weight,
                    deployment: dep,
                });
            }
            let owned_by = entries
                .first()
                .map(|e| e.deployment.provider_name.to_string())
                .unwrap_or_default();
            routes.insert(alias.clone(), Route::new(entries));
            models.push(ModelInfo {
                id: alias.clone(),
                owned_by,
                created,
            });
        }
        let router = Router::new(
            RetryConfig {
                max_attempts: r.max_attempts,
                base: Duration::from_millis(r.backoff_base_ms),
                cap: Duration::from_millis(r.backoff_cap_ms),
            },
            RetryBudget::new(r.retry_budget_ratio, r.retry_budget_min),
        );
        Ok(Self {
            routes,
            metrics: Arc::default(),
            deployments,
            pricing,
            router,
            models,
            usage,
            events,
            store,
            max_tokens: config.security.max_tokens,
            stopping: crate::stop::Stop::new(),
        })
    }

    /// The configured aliases, sorted.
    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    /// Every deployment, for health and breaker reporting.
    pub fn deployments(&self) -> &[Arc<Deployment>] {
        &self.deployments
    }

    /// Every deployment's health and breaker state, live.
    pub fn provider_health(&self) -> Vec<switchyard_core::health::ProviderHealthRow> {
        self.deployments
            .iter()
            .map(|d| crate::health::health_row(d))
            .collect()
    }

    /// Starts probing and persisting provider health.
    pub fn spawn_health_task(
        &self,
        config: &switchyard_core::config::HealthConfig,
    ) -> crate::health::HealthTask {
        crate::health::HealthTask::spawn(self.deployments.clone(), self.store.clone(), config)
    }

    /// Sets what is told each call's cost (once; later calls are ignored).
    pub fn observe_spend(&self, observer: Arc<dyn SpendObserver>) {
        let _ = self.metrics.spend.set(observer);
    }

    pub fn usage_writer(&self) -> &UsageWriter {
        &self.usage
    }

    pub fn event_writer(&self) -> &EventWriter {
        &self.events
    }

    /// The store, for the services built beside the gateway.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether `alias` is a configured model.
    pub fn has_model(&self, alias: &str) -> bool {
        self.routes.contains_key(alias)
    }

    /// A recorder of this request's trace events.
    pub fn trace_events(&self, meta: &RequestMeta) -> TraceEvents {
        TraceEvents::new(
            self.events.clone(),
            &meta.tenant_id,
            &meta.trace_id,
            meta.session_id.as_deref(),
            meta.user_id.as_deref(),
        )
    }

    /// Ends every call in flight, and every call started from now on: a
    /// call waiting on its provider answers 503 `server_shutdown`, a stream
    /// ends with an error event saying so, and each writes its usage row.
    /// For the end of a shutdown, once requests have had their grace period.
    pub fn stop_calls(&self) {
        self.stopping.stop();
    }

    /// Whether the store answers (for `/ready`).
    pub async fn ready(&self) -> Result<(), EngineError> {
        Ok(self.store.ping().await?)
    }

    fn route(&self, alias: &str) -> Result<&Route, EngineError> {
        self.routes
            .get(alias)
            .ok_or_else(|| EngineError::UnknownModel(alias.to_owned()))
    }

    /// Whether every deployment of `alias` takes an Anthropic Messages body
    /// as it is: then a Messages request may carry what the translation to
    /// the OpenAI shape cannot (`MessagesRequest::untranslatable`), since no
    /// fallback will need the translation.
    pub fn speaks_messages(&self, alias: &str) -> Result<bool, EngineError> {
        Ok(self
            .route(alias)?
            .deployments()
            .all(|d| d.chat.speaks_messages()))
    }

    /// Whether every deployment of `alias` runs Anthropic's own tools for
    /// clients (Anthropic providers with `server_tools` on).
    pub fn runs_server_tools(&self, alias: &str) -> Result<bool, EngineError> {
        Ok(self
            .route(alias)?
            .deployments()
            .all(|d| d.chat.runs_server_tools()))
    }

    /// A provider's own count of the input tokens of an Anthropic Messages
    /// body for `alias` (`POST /v1/messages/count_tokens`): from the first of
    /// its deployments, in route order, that can count and whose breaker is
    /// not open. `None` when none can or the count failed: the caller then
    /// estimates. Bounded by 5 s (or the deployment's first-byte timeout, if
    /// shorter), since a client asks before every turn.
    pub async fn count_tokens(
        &self,
        alias: &str,
        anthropic: &switchyard_core::anthropic::NativeMessages,
    ) -> Result<Option<u64>, EngineError> {
        const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
        let route = self.route(alias)?;
        for d in route.deployments() {
            if d.breaker.state() == switchyard_providers::breaker::BreakerState::Open {
                continue;
            }
            let wait = d.first_byte_timeout.min(MAX_WAIT);
            match d
                .chat
                .count_tokens(anthropic, &d.upstream_model, wait)
                .await
            {
                None => continue,
                Some(Ok(n)) => return Ok(Some(n)),
                // The provider judged the request (e.g. a tool_use with no
                // tool_result): the client hears it, as Anthropic would say it.
                // (Not a 404: from an Anthropic-compatible proxy it most
                // often means it has no count_tokens endpoint.)
                Some(Err(e)) if matches!(status_for(&e), 400 | 409 | 413 | 422) => {
                    return Err(EngineError::Provider(e));
                }
                Some(Err(e)) => {
                    tracing::warn!(deployment = %d.id, error = %e, code = e.code(), "token count failed; estimating");
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// The most completion tokens a request may ask for (`security.max_tokens`).
    pub fn max_tokens_cap(&self) -> Option<u32> {
        self.max_tokens
    }

    /// Refuses a request asking for more completion tokens than allowed.
    fn check_max_tokens(&self, req: &ChatRequest) -> Result<(), EngineError> {
        let Some(cap) = self.max_tokens else {
            return Ok(());
        };
        for field in ["max_tokens", "max_completion_tokens"] {
            if let Some(n) = req.body.get(field).and_then(serde_json::Value::as_u64) {
                if n > u64::from(cap) {
                    return Err(EngineError::Invalid(InvalidRequest {
                        message: format!("`{field}` is {n}, above this server's limit of {cap}."),
                        param: Some(field.to_owned()),
                        code: "max_tokens_too_large",
                    }));
                }
            }
        }
        Ok(())
    }

    // Debug level: the request span already carries the trace id, and the
    // access line the model; a span per call costs CPU on every request.
    #[tracing::instrument(level = "debug", skip_all, fields(gen_ai.request.model = %req.model, stream = req.stream))]
    pub async fn chat(
        &self,
        meta: &RequestMeta,
        req: &ChatRequest,
    ) -> Result<ChatOutcome, EngineError> {
        self.check_max_tokens(req)?;
        let route = self.route(&req.model)?;
        let prompt_estimate = estimate_prompt_tokens(&req.body);
        let mut acc = Accounting::new(self, meta, "chat", &req.model, req.stream, prompt_estimate);
        let obs = acc.observer(self);
        let call = self
            .router
            .chat(route, &req.body, req.anthropic.as_ref(), req.stream, &obs);
        let routed = crate::stop::unless_stopped(&self.stopping, call).await;
        let Some(routed) = routed else {
            return Err(acc.stopped());
        };
        match routed {
            Ok(served) => {
                acc.served_by(self, &served.deployment);
                let provider = served.deployment.provider_name.clone();
                let anthropic = matches!(
                    served.value,
                    ChatReply::AnthropicComplete(_) | ChatReply::AnthropicStream(_)
                );
                match served.value {
                    ChatReply::Complete(c) | ChatReply::AnthropicComplete(c) => {
                        // An answer without usage (a server that leaves it
                        // out) is estimated, as a stream's would be: never free.
                        let usage = c.usage.unwrap_or_else(|| Usage {
                            prompt_tokens: prompt_estimate,
                            completion_tokens: crate::metered::estimate_completion(
                                &c.body, anthropic,
                            ),
                            ..Usage::default()
                        });
                        acc.finish_ok(Some(usage));
                        Ok(ChatOutcome::Complete {
                            body: c.body,
                            provider,
                            anthropic,
                        })
                    }
                    ChatReply::Stream(s) => Ok(ChatOutcome::Stream {
                        pricing: acc.pricing,
                        events: Box::new(MeteredStream::new(
                            s,
                            req.include_usage,
                            req.body
                                .get("n")
                                .and_then(serde_json::Value::as_u64)
                                .unwrap_or(1),
                            prompt_estimate,
                            acc,
                            self.stopping.watch(),
                        )),
                        provider,
                        anthropic,
                    }),
                    ChatReply::AnthropicStream(s) => Ok(ChatOutcome::Stream {
                        pricing: acc.pricing,
                        events: Box::new(MeteredStream::anthropic(
                            s,
                            prompt_estimate,
                            acc,
                            self.stopping.watch(),
                        )),
                        provider,
                        anthropic,
                    }),
                }
            }
            Err(e) => Err(acc.fail(self, e, &req.model)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(gen_ai.request.model = %req.model))]
    pub async fn embeddings(
        &self,
        meta: &RequestMeta,
        req: &EmbeddingsRequest,
    ) -> Result<(Bytes, Arc<str>), EngineError> {
        let route = self.route(&req.model)?;
        let estimate = estimate_embedding_tokens(&req.body);
        let mut acc = Accounting::new(self, meta, "embeddings", &req.model, false, estimate);
        let obs = acc.observer(self);
        let call = self
            .router
            .embed(route, &req.body, req.encoding_format, &obs);
        let routed = crate::stop::unless_stopped(&self.stopping, call).await;
        let Some(routed) = routed else {
            return Err(acc.stopped());
        };
        match routed {
            Ok(served) => {
                acc.served_by(self, &served.deployment);
                let usage = served.value.usage.unwrap_or(Usage {
                    prompt_tokens: estimate,
                    ..Usage::default()
                });
                acc.finish_ok(Some(usage));
                Ok((served.value.body, served.deployment.provider_name.clone()))
            }
            Err(e) => Err(acc.fail(self, e, &req.model)),
        }
    }
}

/// A failure as a client may see it: no internal detail.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicError {
    pub status: u16,
    /// A stable machine code.
    pub code: String,
    pub message: String,
    /// Whether the same request may succeed later.
    pub retryable: bool,
}

/// What a client is told when every deployment of `model` is failing.
pub fn unavailable_message(model: &str) -> String {
    format!("Every provider of `{model}` is failing; try again shortly.")
}

/// What a client is told of a provider failure (no internal detail).
pub fn provider_message(p: &ProviderError) -> String {
    match p {
        ProviderError::Timeout(_) => "The provider did not answer in time.".to_owned(),
        ProviderError::Connect(_) => "Could not connect to the provider.".to_owned(),
        ProviderError::Status { status, .. } => {
            format!("The provider failed with status {status}.")
        }
        ProviderError::Overloaded { .. } => {
            "The model is busy with other requests; try again shortly.".to_owned()
        }
        ProviderError::Protocol(_) | ProviderError::Broken(_) | ProviderError::Truncated => {
            "The provider's stream broke before it was complete.".to_owned()
        }
        ProviderError::ShuttingDown => SHUTTING_DOWN.to_owned(),
    }
}

/// How an engine failure is reported inside a stream or a stored reply.
pub fn public_error(e: &EngineError) -> PublicError {
    let (status, code, message, retryable): (u16, &str, String, bool) = match e {
        EngineError::UnknownModel(_) => (404, "model_not_found", e.to_string(), false),
        EngineError::Invalid(i) => (400, i.code, i.message.clone(), false),
        EngineError::Unavailable { model, .. } => {
            (503, "model_unavailable", unavailable_message(model), true)
        }
        EngineError::Provider(p) => {
            let status = status_for(p);
            let message = provider_message(p);
            let retryable = !matches!(status, 400 | 404 | 409 | 413 | 422);
            (status, p.code(), message, retryable)
        }
        EngineError::Store(_) | EngineError::Setup(_) => (
            500,
            "internal_error",
            "The server had an error while processing your request.".to_owned(),
            true,
        ),
    };
    PublicError {
        status,
        code: code.to_owned(),
        message,
        retryable,
    }
}

/// What a client is told of a call the server stopped while shutting down.
pub const SHUTTING_DOWN: &str =
    "The server is shutting down and stopped this request before it was complete; send it again.";

/// The HTTP status a provider failure becomes; the server uses the same rule.
pub fn status_for(e: &ProviderError) -> u16 {
    match e {
        ProviderError::Timeout(_) => 504,
        ProviderError::Overloaded { .. } | ProviderError::ShuttingDown => 503,
        // A 404 for the deployment's model is the gateway's problem, as a
        // refused key is; one for what the request names is the client's.
        e if switchyard_providers::retry::is_deployment_fault(e) => 502,
        ProviderError::Status { status, .. }
            if matches!(status, 400 | 404 | 409 | 413 | 422 | 429) =>
        {
            *status
        }
        _ => 502,
    }
}

/// Everything needed to write one usage row, carried until the call ends.
///
/// The row is written exactly once: by `finish` and its kin, or, when the
/// call's future is dropped before its outcome (the client went away while
/// the provider was being asked, or the server stopped waiting), on drop as
/// a 499 `client_closed` with the prompt estimated. The provider was asked,
/// so the request counts, and closing the connection is no way around a
/// token limit.
pub(crate) struct Accounting {
    writer: UsageWriter,
    metrics: Arc<CallMetrics>,
    events: TraceEvents,
    tokens: Option<TokenMeter>,
    record: UsageRecord,
    pricing: Option<Pricing>,
    /// The deployment last asked and its prices, for a row written before
    /// one answered (the client left, the server stopped waiting): the
    /// provider was asked, and bills for it.
    attempted: std::sync::Mutex<Option<(Arc<Deployment>, Option<Pricing>)>>,
    /// A deployment answered (with the answer or a failure): its time is an
    /// upstream latency, which a call left before any answer's is not.
    answered: bool,
    /// When the request arrived: the usage row's latency is the request's.
    started: Instant,
    /// When the router was called: the upstream metrics leave out what came
    /// before (reading the body, authentication, limits).
    upstream_started: Instant,
    /// The request's prompt tokens, estimated, for a row written on drop.
    prompt_estimate: u64,
    written: bool,
}

/// The router's observer for one call: records its trace events and keeps
/// the deployment being asked.
struct CallObserver<'a> {
    gw: &'a Gateway,
    events: &'a TraceEvents,
    attempted: &'a std::sync::Mutex<Option<(Arc<Deployment>, Option<Pricing>)>>,
}

impl RouteObserver for CallObserver<'_> {
    fn on_event(&self, event: RouteEvent<'_>) {
        self.events.on_event(event);
    }

    fn attempting(&self, d: &Arc<Deployment>) {
        let pricing = self.gw.pricing.get(&d.id).copied();
        *self.attempted.lock().unwrap_or_else(|p| p.into_inner()) = Some((d.clone(), pricing));
    }
}

impl Drop for Accounting {
    fn drop(&mut self) {
        if !self.written {
            let usage = Usage {
                prompt_tokens: self.prompt_estimate,
                ..Usage::default()
            };
            self.write(499, Some("client_closed"), Some(usage), None);
        }
    }
}

impl Accounting {
    fn new(
        gw: &Gateway,
        meta: &RequestMeta,
        endpoint: &str,
        alias: &str,
        stream: bool,
        prompt_estimate: u64,
    ) -> Self {
        let created_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let events = gw.trace_events(meta);
        if events.enabled() {
            #[derive(serde::Serialize)]
            struct Received<'a> {
                endpoint: &'a str,
                model: &'a str,
                stream: bool,
            }
            events.record(
                "request.received",
                &Received {
                    endpoint,
                    model: alias,
                    stream,
                },
            );
        }
        Self {
            writer: gw.usage.clone(),
            metrics: gw.metrics.clone(),
            events,
            tokens: meta.tokens.clone(),
            pricing: None,
            attempted: std::sync::Mutex::new(None),
            answered: false,
            started: meta.started,
            upstream_started: Instant::now(),
            prompt_estimate,
            written: false,
            record: UsageRecord {
                id: new_id(),
                tenant_id: meta.tenant_id.clone(),
                key_id: meta.key_id.clone(),
                user_id: meta.user_id.clone(),
                trace_id: meta.trace_id.clone(),
                endpoint: endpoint.to_owned(),
                model_alias: alias.to_owned(),
                provider: String::new(),
                upstream_model: String::new(),
                stream,
                prompt_tokens: None,
                completion_tokens: None,
                cached_tokens: None,
                cache_write_tokens: None,
                cost_usd: None,
                latency_ms: 0.0,
                ttft_ms: None,
                status: 200,
                error_code: None,
                created_at_ms,
                trace: None,
            },
        }
    }

    fn served_by(&mut self, gw: &Gateway, d: &Deployment) {
        self.answered = true;
        self.record.provider = d.provider_name.to_string();
        self.record.upstream_model = d.upstream_model.to_string();
        // The deployment that answered is the last one asked, whose prices
        // were looked up then.
        let attempted = self.attempted.get_mut().unwrap_or_else(|p| p.into_inner());
        self.pricing = match attempted.take() {
            Some((a, pricing)) if std::ptr::eq(Arc::as_ptr(&a), d) => pricing,
            _ => gw.pricing.get(&d.id).copied(),
        };
    }

    /// What the router tells of the call: its trace events, and the
    /// deployment it is asking.
    fn observer<'a>(&'a self, gw: &'a Gateway) -> CallObserver<'a> {
        CallObserver {
            gw,
            events: &self.events,
            attempted: &self.attempted,
        }
    }

    fn finish_ok(self, usage: Option<Usage>) {
        self.finish(200, None, usage, None);
    }

    /// Records a call the server stopped waiting for (it is shutting down):
    /// the provider was asked, so the prompt is charged, estimated.
    fn stopped(self) -> EngineError {
        let usage = Usage {
            prompt_tokens: self.prompt_estimate,
            ..Usage::default()
        };
        let e = ProviderError::ShuttingDown;
        self.finish(503, Some(e.code()), Some(usage), None);
        EngineError::Provider(e)
    }

    /// Records a routed call that failed and turns it into the engine's error.
    fn fail(mut self, gw: &Gateway, e: RouteError, alias: &str) -> EngineError {
        match e {
            RouteError::Failed {
                error, deployment, ..
            } => {
                self.served_by(gw, &deployment);
                self.finish(status_for(&error), Some(error.code()), None, None);
                EngineError::Provider(error)
            }
            RouteError::Unavailable { retry_after } => {
                self.finish(503, Some("model_unavailable"), None, None);
                EngineError::Unavailable {
                    model: alias.to_owned(),
                    retry_after,
                }
            }
        }
    }

    pub(crate) fn finish_stream(
        self,
        status: u16,
        code: Option<&'static str>,
        usage: Option<Usage>,
        first: Option<Instant>,
    ) {
        self.finish(status, code, usage, first);
    }

    fn finish(
        mut self,
        status: u16,
        code: Option<&'static str>,
        usage: Option<Usage>,
        first_chunk: Option<Instant>,
    ) {
        self.write(status, code, usage, first_chunk);
    }

    fn write(
        &mut self,
        status: u16,
        code: Option<&'static str>,
        usage: Option<Usage>,
        first_chunk: Option<Instant>,
    ) {
        self.written = true;
        if self.record.provider.is_empty() {
            // Written before a deployment answered: charged to the one asked.
            let attempted = self.attempted.get_mut().unwrap_or_else(|p| p.into_inner());
            if let Some((d, pricing)) = attempted.take() {
                self.record.provider = d.provider_name.to_string();
                self.record.upstream_model = d.upstream_model.to_string();
                self.pricing = pricing;
            }
        }
        let r = &mut self.record;
        r.status = status;
        r.error_code = code.map(str::to_owned);
        r.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        r.ttft_ms = first_chunk.map(|t| t.duration_since(self.started).as_secs_f64() * 1000.0);
        // A plain request's trace goes into its usage row (rebuilt when read:
        // `UsageRecord::plain_trace_events`) instead of a `bus_events` row.
        if self.writer.enabled() {
            r.trace = self.events.take_plain(&r.provider, &r.upstream_model);
        }
        if r.trace.is_none() && self.events.enabled() {
            #[derive(serde::Serialize)]
            struct Outcome<'a> {
                status: u16,
                provider: &'a str,
                latency_ms: f64,
                ttft_ms: Option<f64>,
                error: Option<&'a str>,
                prompt_tokens: Option<u64>,
                completion_tokens: Option<u64>,
            }
            let kind = if status < 400 {
                "request.done"
            } else {
                "request.error"
            };
            self.events.record(
                kind,
                &Outcome {
                    status,
                    provider: &r.provider,
                    latency_ms: r.latency_ms,
                    ttft_ms: r.ttft_ms,
                    error: code,
                    prompt_tokens: usage.map(|u| u.prompt_tokens),
                    completion_tokens: usage.map(|u| u.completion_tokens),
                },
            );
        }
        let (provider, endpoint) = (&r.provider, &r.endpoint);
        // Only a deployment's answer is an upstream sample: not a call none
        // was asked for (an open breaker), nor one left or stopped before an
        // answer (its row names the deployment asked, for its cost).
        if self.answered {
            self.metrics
                .duration
                .get(&[provider, endpoint], || {
                    metrics::histogram!("switchyard_upstream_duration_seconds", "provider" => provider.clone(), "endpoint" => endpoint.clone())
                })
                .record(self.upstream_started.elapsed().as_secs_f64());
            if let Some(first) = first_chunk {
                self.metrics
                    .ttft
                    .get(&[provider], || {
                        metrics::histogram!("switchyard_upstream_ttft_seconds", "provider" => provider.clone())
                    })
                    .record(
                        first
                            .saturating_duration_since(self.upstream_started)
                            .as_secs_f64(),
                    );
            }
        }
        if let Some(u) = usage {
            if let (Some(m), Ok(rt)) = (self.tokens.take(), tokio::runtime::Handle::try_current()) {
                let used = u.prompt_tokens.saturating_add(u.completion_tokens);
                // In the request's span, so a failure to charge names its trace.
                rt.spawn(
                    async move {
                        let units = m.limit.units(used);
                        if let Err(e) = m.limiter.charge(&m.key, m.limit.rate, units).await {
                            tracing::warn!(error = %e, "could not count tokens against the token limit");
                        }
                    }
                    .in_current_span(),
                );
            }
            r.prompt_tokens = Some(u.prompt_tokens);
            r.completion_tokens = Some(u.completion_tokens);
            r.cached_tokens = Some(u.cached_tokens);
            r.cache_write_tokens = Some(u.cache_write_tokens);
            r.cost_usd = self.pricing.map(|p| p.cost_usd(&u));
            if let (Some(cost), Some(spend)) = (r.cost_usd, self.metrics.spend.get()) {
                spend.spent(&r.tenant_id, r.key_id.as_deref(), cost, r.created_at_ms);
            }
            let model = &r.model_alias;
            let (prompt, completion) = self.metrics.tokens.get(&[model, provider], || {
                (
                    metrics::counter!("switchyard_tokens_total", "model" => model.clone(), "provider" => provider.clone(), "kind" => "prompt"),
                    metrics::counter!("switchyard_tokens_total", "model" => model.clone(), "provider" => provider.clone(), "kind" => "completion"),
                )
            });
            prompt.increment(u.prompt_tokens);
            completion.increment(u.completion_tokens);
        }
        self.writer.record(std::mem::take(&mut self.record));
    }
}
