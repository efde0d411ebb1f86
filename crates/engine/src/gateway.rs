//! The gateway service: resolves a model alias to its provider deployment,
//! calls it, and accounts for the call (usage row, metrics) whatever the
//! outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;
use switchyard_core::config::{Config, Pricing, ProviderKind};
use switchyard_core::openai::{ChatRequest, EmbeddingsRequest, Usage};
use switchyard_core::usage::{new_id, UsageRecord};
use switchyard_providers::openai::OpenAiProvider;
use switchyard_providers::{
    ChatCall, ChatProvider, ChatReply, EmbedCall, EmbeddingProvider, ProviderError,
};
use switchyard_store::{Store, StoreError};

use crate::metered::{MeteredStream, StreamEvent};
use crate::usage_writer::UsageWriter;

/// Who is asking and since when; carried from the HTTP layer.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub trace_id: String,
    pub tenant_id: String,
    pub started: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("provider setup failed: {0}")]
    Setup(String),
}

/// One alias's deployment.
struct Deployment {
    provider_name: Arc<str>,
    upstream_model: Arc<str>,
    chat: Arc<dyn ChatProvider>,
    embed: Arc<dyn EmbeddingProvider>,
    pricing: Option<Pricing>,
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
    Complete { body: Bytes, provider: Arc<str> },
    Stream {
        events: Box<dyn Stream<Item = StreamEvent> + Send + Unpin>,
        provider: Arc<str>,
    },
}

pub struct Gateway {
    deployments: HashMap<String, Deployment>,
    models: Vec<ModelInfo>,
    usage: UsageWriter,
    store: Arc<dyn Store>,
}

impl Gateway {
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        usage: UsageWriter,
    ) -> Result<Self, EngineError> {
        let mut providers: HashMap<&str, Arc<OpenAiProvider>> = HashMap::new();
        for (name, p) in &config.providers {
            let adapter = match p.kind {
                ProviderKind::Openai => OpenAiProvider::new(name, p)
                    .map_err(|e| EngineError::Setup(format!("{name}: {e}")))?,
            };
            providers.insert(name, Arc::new(adapter));
        }
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut deployments = HashMap::new();
        let mut models = Vec::new();
        for (alias, m) in &config.models {
            let provider = providers.get(m.provider.as_str()).ok_or_else(|| {
                EngineError::Setup(format!("models.{alias}: unknown provider {}", m.provider))
            })?;
            deployments.insert(
                alias.clone(),
                Deployment {
                    provider_name: Arc::from(m.provider.as_str()),
                    upstream_model: Arc::from(m.model.as_str()),
                    chat: provider.clone(),
                    embed: provider.clone(),
                    pricing: config.price_for(&m.provider, &m.model),
                },
            );
            models.push(ModelInfo {
                id: alias.clone(),
                owned_by: m.provider.clone(),
                created,
            });
        }
        Ok(Self {
            deployments,
            models,
            usage,
            store,
        })
    }

    /// The configured aliases, sorted.
    pub fn models(&self) -> &[ModelInfo] {
        &self.models
    }

    pub fn usage_writer(&self) -> &UsageWriter {
        &self.usage
    }

    /// Whether the store answers (for `/ready`).
    pub async fn ready(&self) -> Result<(), EngineError> {
        Ok(self.store.ping().await?)
    }

    fn deployment(&self, alias: &str) -> Result<&Deployment, EngineError> {
        self.deployments
            .get(alias)
            .ok_or_else(|| EngineError::UnknownModel(alias.to_owned()))
    }

    #[tracing::instrument(skip_all, fields(gen_ai.request.model = %req.model, provider, stream = req.stream))]
    pub async fn chat(
        &self,
        meta: &RequestMeta,
        req: &ChatRequest,
    ) -> Result<ChatOutcome, EngineError> {
        let d = self.deployment(&req.model)?;
        tracing::Span::current().record("provider", &*d.provider_name);
        let acc = Accounting::new(self, meta, "chat", &req.model, d, req.stream);
        let call = ChatCall {
            upstream_model: &d.upstream_model,
            body: &req.body,
            stream: req.stream,
        };
        let reply = match d.chat.chat(call).await {
            Ok(r) => r,
            Err(e) => {
                acc.finish_error(&e);
                return Err(e.into());
            }
        };
        match reply {
            ChatReply::Complete(c) => {
                acc.finish_ok(c.usage);
                Ok(ChatOutcome::Complete {
                    body: c.body,
                    provider: d.provider_name.clone(),
                })
            }
            ChatReply::Stream(s) => Ok(ChatOutcome::Stream {
                events: Box::new(MeteredStream::new(s, req.include_usage, acc)),
                provider: d.provider_name.clone(),
            }),
        }
    }

    #[tracing::instrument(skip_all, fields(gen_ai.request.model = %req.model, provider))]
    pub async fn embeddings(
        &self,
        meta: &RequestMeta,
        req: &EmbeddingsRequest,
    ) -> Result<(Bytes, Arc<str>), EngineError> {
        let d = self.deployment(&req.model)?;
        tracing::Span::current().record("provider", &*d.provider_name);
        let acc = Accounting::new(self, meta, "embeddings", &req.model, d, false);
        let call = EmbedCall {
            upstream_model: &d.upstream_model,
            body: &req.body,
            encoding_format: req.encoding_format,
        };
        match d.embed.embed(call).await {
            Ok(c) => {
                acc.finish_ok(c.usage);
                Ok((c.body, d.provider_name.clone()))
            }
            Err(e) => {
                acc.finish_error(&e);
                Err(e.into())
            }
        }
    }
}

/// The HTTP status a provider failure becomes; the server uses the same rule.
pub fn status_for(e: &ProviderError) -> u16 {
    match e {
        ProviderError::Timeout(_) => 504,
        ProviderError::Status { status, .. }
            if matches!(status, 400 | 404 | 409 | 413 | 422 | 429) =>
        {
            *status
        }
        _ => 502,
    }
}

/// Everything needed to write one usage row, carried until the call ends.
pub(crate) struct Accounting {
    writer: UsageWriter,
    record: UsageRecord,
    pricing: Option<Pricing>,
    started: Instant,
}

impl Accounting {
    fn new(
        gw: &Gateway,
        meta: &RequestMeta,
        endpoint: &str,
        alias: &str,
        d: &Deployment,
        stream: bool,
    ) -> Self {
        let created_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self {
            writer: gw.usage.clone(),
            pricing: d.pricing,
            started: meta.started,
            record: UsageRecord {
                id: new_id(),
                tenant_id: meta.tenant_id.clone(),
                trace_id: meta.trace_id.clone(),
                endpoint: endpoint.to_owned(),
                model_alias: alias.to_owned(),
                provider: d.provider_name.to_string(),
                upstream_model: d.upstream_model.to_string(),
                stream,
                prompt_tokens: None,
                completion_tokens: None,
                cost_usd: None,
                latency_ms: 0.0,
                ttft_ms: None,
                status: 200,
                error_code: None,
                created_at_ms,
            },
        }
    }

    fn finish_ok(self, usage: Option<Usage>) {
        self.finish(200, None, usage, None);
    }

    fn finish_error(self, e: &ProviderError) {
        self.finish(status_for(e), Some(e.code()), None, None);
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
        let r = &mut self.record;
        r.status = status;
        r.error_code = code.map(str::to_owned);
        r.latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        r.ttft_ms = first_chunk.map(|t| t.duration_since(self.started).as_secs_f64() * 1000.0);
        let provider = r.provider.clone();
        let model = r.model_alias.clone();
        metrics::histogram!("switchyard_upstream_duration_seconds", "provider" => provider.clone(), "endpoint" => r.endpoint.clone())
            .record(r.latency_ms / 1000.0);
        if let Some(ttft) = r.ttft_ms {
            metrics::histogram!("switchyard_upstream_ttft_seconds", "provider" => provider.clone())
                .record(ttft / 1000.0);
        }
        if let Some(u) = usage {
            r.prompt_tokens = Some(u.prompt_tokens);
            r.completion_tokens = Some(u.completion_tokens);
            r.cost_usd = self
                .pricing
                .map(|p| p.cost_usd(u.prompt_tokens, u.completion_tokens));
            metrics::counter!("switchyard_tokens_total", "model" => model.clone(), "provider" => provider.clone(), "kind" => "prompt")
                .increment(u.prompt_tokens);
            metrics::counter!("switchyard_tokens_total", "model" => model, "provider" => provider, "kind" => "completion")
                .increment(u.completion_tokens);
        }
        self.writer.record(self.record);
    }
}
