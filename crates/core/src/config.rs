//! The configuration schema and its layering: defaults in code, then the TOML
//! file, then the shortcut environment variables teams already use, then
//! `SWITCHYARD_SECTION__KEY` overrides.
//!
//! Loading here is pure (text and a map of variables in, `Config` out) so that
//! `core` does no I/O; the binary reads the file and the process environment.
//! Every struct denies unknown fields and deserialization goes through
//! `serde_path_to_error`, so a typo is reported with its full path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// The whole effective configuration.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub usage: UsageConfig,
    /// The `bus_events` writer (every request's lifecycle, by trace id).
    pub events: UsageConfig,
    /// Native sessions: streaming replies, idempotency, compatibility paths.
    pub sessions: SessionsConfig,
    /// How long the logs that grow with traffic are kept.
    pub retention: RetentionConfig,
    pub log: LogConfig,
    pub resilience: ResilienceConfig,
    pub health: HealthConfig,
    pub auth: AuthConfig,
    /// JWTs as credentials (Supabase HS256, or RS256/ES256 through a JWKS).
    pub jwt: crate::jwt::JwtConfig,
    pub rate_limits: crate::limits::RateLimitConfig,
    pub security: SecurityConfig,
    /// The built-in local models (SmolLM2 chat, MiniLM embeddings).
    pub local: crate::local::LocalConfig,
    /// Upstream providers by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Model aliases clients may name, by alias.
    pub models: BTreeMap<String, ModelConfig>,
    /// Prices per upstream model name (or `provider/model` to be specific).
    pub pricing: BTreeMap<String, Pricing>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger bodies answer 413.
    pub max_body_bytes: usize,
    /// How long a graceful shutdown waits for in-flight requests, in seconds.
    pub shutdown_grace_secs: u64,
    /// How long a client has to send a request's headers (from when the
    /// connection is ready for them: an idle keep-alive connection is closed
    /// after as long), and then, separately, its body; in seconds. Past it
    /// the connection is closed, or, for a body, answered 408: a client
    /// sending a byte at a time cannot hold a connection forever.
    pub read_timeout_secs: u64,
    /// Proxies (addresses or CIDR blocks) in front of the server whose
    /// `X-Forwarded-For` names the client: its address then counts failed
    /// authentications, instead of the proxy's, which every client behind
    /// it shares. Empty (the default): the connection's peer is the client.
    pub trusted_proxies: Vec<String>,
    /// Terminate TLS here (HTTPS, HTTP/2 by ALPN); unset = plain HTTP.
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_grace_secs: 30,
            read_timeout_secs: 30,
            trusted_proxies: Vec::new(),
            tls: None,
        }
    }
}

/// The server's certificate and key, as PEM files read at startup.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert_file: std::path::PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC), PEM.
    pub key_file: std::path::PathBuf,
    /// Longest a client may take to finish its TLS handshake, in seconds.
    #[serde(default = "default_tls_handshake_timeout_secs")]
    pub handshake_timeout_secs: u64,
}

fn default_tls_handshake_timeout_secs() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (created if missing) or `postgres://…`.
    #[serde(serialize_with = "serialize_url_masked")]
    pub url: String,
    /// PostgreSQL only: the schema to create and use (default: `public`).
    pub schema: Option<String>,
    pub max_connections: u32,
    pub connect_timeout_secs: u64,
    /// SQLite only: how often the WAL is copied into the database.
    pub sqlite_checkpoint_interval_ms: u64,
    /// SQLite only: past this size the checkpointer takes the writer's turn
    /// to finish its copy, so that the WAL starts again from its beginning,
    /// and the WAL file is truncated back to it.
    pub sqlite_wal_limit_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://switchyard-data/switchyard.db".to_owned(),
            schema: None,
            max_connections: 8,
            connect_timeout_secs: 5,
            sqlite_checkpoint_interval_ms: 500,
            sqlite_wal_limit_mb: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Write one `usage_logs` row per model request.
    pub enabled: bool,
    /// Rows waiting to be written; past this, rows are dropped and counted.
    pub queue_capacity: usize,
    /// Most rows written in one insert.
    pub batch_size: usize,
    /// Longest a row waits before its batch is written, in milliseconds.
    pub flush_interval_ms: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            queue_capacity: 65_536,
            batch_size: 512,
            // Short: a batch is written by the database thread in one go,
            // and on a busy CPU each request behind it waits for the whole
            // batch; 100 ms batches made a 1–2 ms p99 (docs/BENCHMARKS.md).
            flush_interval_ms: 10,
        }
    }
}

/// How long the logs that grow with traffic are kept (0 days: forever).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days `usage_logs` rows are kept. Rows of the current UTC month are
    /// kept whatever this says: monthly budgets are summed from them.
    pub usage_logs_days: u32,
    /// Days `bus_events` rows (request traces) are kept.
    pub bus_events_days: u32,
    /// Days `audit_logs` rows are kept.
    pub audit_logs_days: u32,
    /// How often old rows are looked for, in seconds.
    pub interval_secs: u64,
    /// Most rows one delete statement removes: small, so that no delete
    /// holds the database's writer for long.
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            usage_logs_days: 0,
            bus_events_days: 0,
            audit_logs_days: 0,
            interval_secs: 3600,
            batch_size: 1000,
        }
    }
}

/// Native sessions and their compatibility paths.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Longest message `content` accepted, in bytes; longer answers 413.
    pub max_content_bytes: usize,
    /// Seconds of silence after which a stream sends a `keepalive` frame.
    pub keepalive_secs: u64,
    /// History tokens sent to the model when the bot sets no `context_tokens`.
    pub default_context_tokens: u32,
    /// How long a finished idempotent response is replayed, in seconds.
    pub idempotency_ttl_secs: u64,
    /// How long an in-flight idempotency claim holds before another request
    /// may take it over (its process presumably died), in seconds.
    pub idempotency_lease_secs: u64,
    /// This server's name in `messages.instance_id`: a restart with the same
    /// name marks the replies it left streaming as interrupted. Default:
    /// the host name and the listen address.
    pub instance_id: Option<String>,
    /// Streaming messages not updated for this long are marked interrupted
    /// whoever generated them (an instance that never came back), in seconds.
    pub stale_stream_secs: u64,
    /// Retired paths still answered like the chat function, with
    /// `Deprecation`/`Sunset` headers until `sunset`, `410 Gone` after it.
    pub retired_paths: Vec<RetiredPath>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            max_content_bytes: 64 * 1024,
            keepalive_secs: 15,
            default_context_tokens: 8192,
            idempotency_ttl_secs: 24 * 3600,
            idempotency_lease_secs: 600,
            instance_id: None,
            stale_stream_secs: 3600,
            retired_paths: Vec::new(),
        }
    }
}

/// A path kept working for a while after it was replaced.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetiredPath {
    /// e.g. `/functions/v1/chatting`.
    pub path: String,
    /// What to call instead (named in the headers and the 410 hint).
    #[serde(default = "default_successor")]
    pub successor: String,
    /// When it was deprecated: `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` (UTC).
    pub deprecated: Option<String>,
    /// From this moment it answers `410 Gone` (same formats).
    pub sunset: String,
}

fn default_successor() -> String {
    "/functions/v1/chat".into()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `switchyard=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Json,
        }
    }
}

/// Retries, retry budget and circuit breakers, for every deployment.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Attempts per deployment, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before retry n is random in [0, min(cap, base · 2^n)].
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Retries allowed as a share of the requests of the last ten seconds…
    pub retry_budget_ratio: f64,
    /// …but at least this many per ten seconds.
    pub retry_budget_min: u32,
    /// Consecutive failures that open a deployment's breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker stays open before letting probes through.
    pub breaker_cooldown_secs: u64,
    /// Probe requests allowed at once while half-open.
    pub breaker_half_open_probes: u32,
    /// Consecutive probe successes that close the breaker.
    pub breaker_success_threshold: u32,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            backoff_base_ms: 100,
            backoff_cap_ms: 2_000,
            retry_budget_ratio: 0.2,
            retry_budget_min: 10,
            breaker_failure_threshold: 5,
            breaker_cooldown_secs: 60,
            breaker_half_open_probes: 1,
            breaker_success_threshold: 3,
        }
    }
}

/// Provider health: how often it is persisted, and the optional active probe.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often each deployment's health is written to `provider_health`.
    pub persist_interval_secs: u64,
    /// How often each deployment is probed (listing models, no tokens); 0 = never.
    pub probe_interval_secs: u64,
    pub probe_timeout_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            persist_interval_secs: 15,
            probe_interval_secs: 0,
            probe_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible base URL (OpenAI, DeepInfra, vLLM, Ollama, llama.cpp…).
    Openai,
    /// Anthropic's Messages API; `base_url` like `https://api.anthropic.com/v1`.
    Anthropic,
    /// The built-in models of `[local]`, run in-process on the CPU; no `base_url`.
    Local,
}

/// Who may call: API keys live in the store; this says how credentials are
/// presented and bootstraps the first admin.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// An admin key for tenant `default`, stored (as a hash) at startup if new.
    /// Shortcut: `SWITCHYARD_ADMIN_KEY`. At least 32 characters.
    #[serde(serialize_with = "serialize_secret_masked")]
    pub admin_key: Option<SecretString>,
    /// Header in which a `service` (or `admin`) key names the user it acts for.
    pub user_header: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            admin_key: None,
            user_header: "x-switchyard-user".into(),
        }
    }
}

/// Response headers and browser access.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Origins allowed to call from a browser (CORS); empty = none. `"*"` allows any.
    pub cors_origins: Vec<String>,
    /// Send `Strict-Transport-Security` although `server.tls` is unset: for a
    /// server whose clients reach it over TLS terminated in front of it. With
    /// `server.tls` set, it is always sent.
    pub hsts: bool,
    /// Largest `max_tokens` / `max_completion_tokens` a request may ask for;
    /// unset = no cap.
    pub max_tokens: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Base URL including the version segment, e.g. `https://api.openai.com/v1`.
    /// Required for `openai` and `anthropic`; a `local` provider has none.
    #[serde(default, serialize_with = "serialize_url_masked")]
    pub base_url: String,
    /// Sent as `Authorization: Bearer …`; never logged or returned.
    #[serde(default, serialize_with = "serialize_secret_masked")]
    pub api_key: Option<SecretString>,
    /// TCP connect timeout, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed until the first byte of the answer (the response for
    /// non-streamed calls, the first chunk for streams), in milliseconds.
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Total time allowed for one upstream request (a whole stream included), in seconds.
    #[serde(default = "default_request_timeout_secs")]
    pub timeout_secs: u64,
    /// Longest silence allowed inside a stream once it has begun, in
    /// milliseconds: past it the stream ends with a timeout error event.
    /// Unset: only `timeout_secs` bounds a stalled stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout_ms: Option<u64>,
    /// Largest answer read whole (a non-streamed completion, embeddings),
    /// in MiB: past it the attempt fails (`upstream_protocol_error`) rather
    /// than a broken or hostile provider filling the gateway's memory.
    /// Stream events are bounded separately (16 MiB each).
    #[serde(default = "default_max_response_mib")]
    pub max_response_mib: u32,
    /// `anthropic` providers only: let Messages clients use Anthropic's own
    /// tools (web search, web fetch, code execution, …). Off by default:
    /// Anthropic bills them per use, beyond tokens, which usage rows and
    /// budgets do not count, and every tenant shares the provider's key.
    #[serde(default)]
    pub server_tools: bool,
    /// `anthropic` providers only: the form of extended thinking their
    /// models take when an OpenAI client asks for it (`reasoning_effort`).
    #[serde(default, skip_serializing_if = "ThinkingForm::is_auto")]
    pub thinking: ThinkingForm,
    /// `anthropic` providers only: the `max_tokens` sent when an OpenAI
    /// client gives none (Anthropic requires one; OpenAI's default is the
    /// model's whole output limit). Unset: 4096, as LiteLLM sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_default: Option<u64>,
}

/// The form of extended thinking an Anthropic model takes.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ThinkingForm {
    /// Read from the model id: a budget before Claude 4.6, adaptive after
    /// (and for ids with no Claude version in them).
    #[default]
    Auto,
    /// `{"type": "enabled", "budget_tokens": N}`.
    Budget,
    /// `{"type": "adaptive"}` with `output_config.effort`.
    Adaptive,
}

impl ThinkingForm {
    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_request_timeout_secs() -> u64 {
    600
}
fn default_first_byte_timeout_ms() -> u64 {
    60_000
}
fn default_weight() -> u32 {
    1
}
/// Embeddings of 2,048 inputs at 3,072 dimensions, as JSON floats, are
/// ~70 MB: the largest answer an OpenAI-compatible API gives for one call.
pub const DEFAULT_MAX_RESPONSE_MIB: u32 = 128;
fn default_max_response_mib() -> u32 {
    DEFAULT_MAX_RESPONSE_MIB
}

impl ProviderConfig {
    /// DeepInfra's OpenAI-compatible API returns no embeddings unless
    /// `encoding_format: "float"` is sent, and does not support base64.
    pub fn is_deepinfra(&self) -> bool {
        let host = self.host();
        host == "deepinfra.com" || host.ends_with(".deepinfra.com")
    }

    /// OpenAI's own API (or Azure OpenAI's), whose current models want
    /// `max_completion_tokens` rather than the deprecated `max_tokens`.
    pub fn is_openai(&self) -> bool {
        let host = self.host();
        host == "api.openai.com" || host.ends_with(".openai.azure.com")
    }

    /// The base URL's host, lower-cased.
    fn host(&self) -> String {
        let authority = self
            .base_url
            .split_once("://")
            .map_or(self.base_url.as_str(), |(_, rest)| rest)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("");
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        authority
            .split(':')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
    }
}

/// A model alias: one deployment (`provider` + `model`) or a `route` of
/// several, tried in order of priority with fallback.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name of an entry in `providers` (single-deployment form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The model name sent upstream (single-deployment form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Deployments in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<DeploymentConfig>,
}

/// One provider + upstream model a route may use.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub provider: String,
    pub model: String,
    /// Share of traffic among deployments of equal priority.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Lower is tried first; deployments with equal priority share load by
    /// weight. Default: the position in the route, so a plain list is an
    /// ordered fallback chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// Overrides the provider's `first_byte_timeout_ms` for this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_timeout_ms: Option<u64>,
    /// Overrides the provider's `timeout_secs` for this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Overrides the provider's `stream_idle_timeout_ms` for this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout_ms: Option<u64>,
}

impl ModelConfig {
    /// A single-deployment alias.
    pub fn single(provider: &str, model: &str) -> Self {
        Self {
            provider: Some(provider.to_owned()),
            model: Some(model.to_owned()),
            route: Vec::new(),
        }
    }

    /// The deployments with their effective priority, in route order.
    pub fn deployments(&self) -> Vec<(u32, DeploymentConfig)> {
        if let (Some(provider), Some(model)) = (&self.provider, &self.model) {
            let d = DeploymentConfig {
                provider: provider.clone(),
                model: model.clone(),
                weight: 1,
                priority: None,
                first_byte_timeout_ms: None,
                timeout_secs: None,
                stream_idle_timeout_ms: None,
            };
            return vec![(0, d)];
        }
        self.route
            .iter()
            .enumerate()
            .map(|(i, d)| (d.priority.unwrap_or(i as u32), d.clone()))
            .collect()
    }
}

/// Prices in US dollars per million tokens.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    pub input_per_mtok: f64,
    #[serde(default)]
    pub output_per_mtok: f64,
    /// Prompt tokens read from the provider's cache (OpenAI charges half or
    /// less, Anthropic a tenth); `input_per_mtok` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<f64>,
    /// Prompt tokens written to it (Anthropic charges 1.25× for its
    /// five-minute cache); `input_per_mtok` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_mtok: Option<f64>,
    /// Prompt tokens written to Anthropic's one-hour cache (2× input);
    /// `cache_write_per_mtok` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_1h_per_mtok: Option<f64>,
    /// A thousand searches by the provider's web search tool (Anthropic
    /// charges $10); unset, searches cost nothing in usage rows and budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_search_per_1k: Option<f64>,
}

impl Config {
    /// The price that applies to `model` served by `provider`: an entry
    /// `provider/model` wins over an entry `model`.
    pub fn price_for(&self, provider: &str, model: &str) -> Option<Pricing> {
        self.pricing
            .get(&format!("{provider}/{model}"))
            .or_else(|| self.pricing.get(model))
            .copied()
    }
}

impl Pricing {
    /// What `u` cost: prompt tokens read from or written to a cache at
    /// their own prices when those are set, the rest at the input price.
    pub fn cost_usd(&self, u: &crate::openai::Usage) -> f64 {
        let cached = u.cached_tokens.min(u.prompt_tokens);
        let written = u.cache_write_tokens.min(u.prompt_tokens - cached);
        let written_1h = u.cache_write_1h_tokens.min(written);
        let plain = u.prompt_tokens - cached - written;
        let write = self.cache_write_per_mtok.unwrap_or(self.input_per_mtok);
        (plain as f64 * self.input_per_mtok
            + cached as f64 * self.cached_input_per_mtok.unwrap_or(self.input_per_mtok)
            + (written - written_1h) as f64 * write
            + written_1h as f64 * self.cache_write_1h_per_mtok.unwrap_or(write)
            + u.completion_tokens as f64 * self.output_per_mtok)
            / 1_000_000.0
            + u.web_search_requests as f64 * self.web_search_per_1k.unwrap_or(0.0) / 1_000.0
    }
}

fn serialize_secret_masked<S: Serializer>(
    v: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

pub(crate) fn serialize_url_masked<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_url_password(v))
}

/// A URL with its secrets replaced by `[redacted]`: the password of
/// `scheme://user:password@host`; the whole user part of an `http(s)` or
/// Redis URL (`https://TOKEN@proxy/v1`, `redis://PASSWORD@host`, where a lone
/// user is a credential); and the
/// values of query parameters named like credentials (`password`, `token`,
/// `key`, `secret`, `sig`…, as `postgres://db/x?password=…` takes them).
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let scheme = &url[..scheme_end];
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..scheme_end + 3]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..colon]);
                    out.push_str(":[redacted]");
                }
                // A lone user is a credential in an `http(s)` URL (a proxy
                // token) and in Redis's URLs (the password alone).
                None if ["http", "https", "redis", "rediss", "valkey", "valkeys"]
                    .iter()
                    .any(|s| scheme.eq_ignore_ascii_case(s)) =>
                {
                    out.push_str("[redacted]");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let (before_fragment, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let masked: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if is_secret_param(name) => format!("{name}=[redacted]"),
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&masked.join("&"));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

/// `host[:port]` or `[v6]:port` split into the host (brackets kept) and the
/// port; `None` when malformed: an unclosed bracket, something after it
/// other than a port, or a port that is not 1 to 5 digits (`host:`, `h:8x`).
pub fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    let host_end = if authority.starts_with('[') {
        authority.find(']')? + 1
    } else {
        authority.find(':').unwrap_or(authority.len())
    };
    let (host, rest) = authority.split_at(host_end);
    match rest.strip_prefix(':') {
        None if rest.is_empty() => Some((host, None)),
        Some(port)
            if !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Some((host, Some(port)))
        }
        _ => None,
    }
}

/// An origin as a browser serializes it in `Origin`: `scheme://host[:port]`,
/// lower case, nothing after the authority, no default port.
fn is_serialized_origin(origin: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let Some((host, port)) = split_host_port(authority) else {
        return false;
    };
    // A browser leaves the scheme's default port out of the origin.
    let default_port = matches!(
        (scheme, port),
        ("https", Some("443")) | ("http", Some("80"))
    );
    // Any scheme a browser gives an origin (`https`, `chrome-extension`,
    // `tauri`, …), in lower case.
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_lowercase())
        && scheme.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        });
    scheme_ok
        && !default_port
        && !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
        })
}

/// Query parameter names that carry credentials.
fn is_secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace(['-', '_'], "");
    [
        "password",
        "passwd",
        "pwd",
        "pass",
        "secret",
        "token",
        "key",
        "sig",
        "signature",
        "auth",
        "credential",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// A shorter admin key could be guessed; the identity layer refuses one too.
const MIN_ADMIN_KEY_CHARS: usize = 32;

/// An HTTP field name (RFC 9110 `token`): what `http::HeaderName` accepts,
/// upper case included (it is lower-cased there).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why a configuration was refused: always names the key and what was expected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{origin}: invalid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ConfigError {
    fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Environment variables consulted by [`Config::load`]; a plain map so that
/// tests and `config check` can pass any set.
pub type Env = BTreeMap<String, String>;

const ENV_PREFIX: &str = "SWITCHYARD_";

impl Config {
    /// Builds the effective configuration from the file's text (if any) and
    /// the environment, then validates it.
    pub fn load(file: Option<(&str, &str)>, env: &Env) -> Result<Config, ConfigError> {
        let mut tree = match file {
            Some((origin, text)) => {
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax {
                        // Where, but not the line itself: it may hold a secret.
                        origin: match e.span() {
                            Some(span) => {
                                let before = &text[..span.start.min(text.len())];
                                let line = before.matches('\n').count() + 1;
                                let column =
                                    before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                                format!("{origin}:{line}:{column}")
                            }
                            None => origin.to_owned(),
                        },
                        message: e.message().trim_end().replace('\n', ", "),
                    })?
            }
            None => toml::Table::new(),
        };
        // RUST_LOG, when set, replaces log.level: it is refused like it.
        if let Some(filter) = env_nonempty(env, "RUST_LOG") {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(filter) {
                return Err(ConfigError::invalid(
                    "RUST_LOG",
                    format!(
                        "expected a tracing filter such as `info` or `switchyard=debug,info`: {e}"
                    ),
                ));
            }
        }
        apply_shortcuts(&mut tree, env)?;
        let set_by_env = apply_env_overrides(&mut tree, env)?;
        let typed: Vec<&(Vec<String>, String, bool)> =
            set_by_env.iter().filter(|(_, _, typed)| *typed).collect();
        // A variable's value is typed by its look (`8080` is a number), but
        // some string keys take digits (an API key, an instance id): where
        // such a value meets a string key, it is read again as the string
        // it was given as. Each variable once, so this ends.
        let mut retried = std::collections::HashSet::new();
        let config: Config = loop {
            match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(tree.clone())) {
                Ok(c) => break c,
                Err(e) => {
                    let path = e.path().to_string();
                    let message = e.inner().to_string();
                    let as_string = message.contains("expected a string")
                        || message.contains("expected string");
                    if let Some((keys, raw, _)) = typed
                        .iter()
                        .find(|(keys, _, _)| keys.join(".") == path)
                        .filter(|_| as_string && retried.insert(path.clone()))
                    {
                        set_path(&mut tree, keys, toml::Value::String(raw.clone()));
                        continue;
                    }
                    // toml appends "in `section`" on a second line; the path already says it.
                    let message = message.lines().next().unwrap_or_default().to_owned();
                    // The value itself is not repeated: it may be a secret.
                    let about_value = message.starts_with("invalid type")
                        || message.starts_with("invalid value")
                        || message.starts_with("unknown variant");
                    let from_env = set_by_env.iter().any(|(keys, _, _)| keys.join(".") == path);
                    let message = match from_env && about_value {
                        true => without_quoted_value(&message),
                        false => message,
                    };
                    let message = match from_env {
                        true => format!("{message} (set by {})", env_name(&path)),
                        false => message,
                    };
                    return Err(ConfigError::invalid(
                        if path == "." {
                            "config".to_owned()
                        } else {
                            path
                        },
                        message,
                    ));
                }
            }
        };
        // A key a variable set is named with the variable, since the file
        // may set it too.
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { path, message }
                if set_by_env.iter().any(|(keys, _, _)| keys.join(".") == path) =>
            {
                let message = format!("{message} (set by {})", env_name(&path));
                ConfigError::Invalid { path, message }
            }
            e => e,
        })?;
        Ok(config)
    }

    /// Checks what types alone cannot: references between sections and ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.jwt.validate("jwt")?;
        self.validate_sessions()?;
        let r = &self.retention;
        if r.interval_secs == 0 {
            return Err(ConfigError::invalid(
                "retention.interval_secs",
                "expected at least 1",
            ));
        }
        if !(1..=100_000).contains(&r.batch_size) {
            return Err(ConfigError::invalid(
                "retention.batch_size",
                "expected 1 to 100000",
            ));
        }
        for (key, days) in [
            ("usage_logs_days", r.usage_logs_days),
            ("bus_events_days", r.bus_events_days),
            ("audit_logs_days", r.audit_logs_days),
        ] {
            // Past ~100 years the cutoff would leave i64 milliseconds' range
            // of sane dates; 0 already means forever.
            if days > 36_500 {
                return Err(ConfigError::invalid(
                    format!("retention.{key}"),
                    "expected 0 (keep forever) to 36500 days",
                ));
            }
        }
        for (i, p) in self.server.trusted_proxies.iter().enumerate() {
            p.parse::<crate::net::IpNet>()
                .map_err(|e| ConfigError::invalid(format!("server.trusted_proxies[{i}]"), e))?;
        }
        if !(1..=3600).contains(&self.server.read_timeout_secs) {
            return Err(ConfigError::invalid(
                "server.read_timeout_secs",
                "expected 1 to 3600 seconds",
            ));
        }
        if let Some(tls) = &self.server.tls {
            for (key, path) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if path.as_os_str().is_empty() {
                    return Err(ConfigError::invalid(
                        format!("server.tls.{key}"),
                        "expected the path of a PEM file",
                    ));
                }
            }
            if tls.handshake_timeout_secs == 0 {
                return Err(ConfigError::invalid(
                    "server.tls.handshake_timeout_secs",
                    "expected at least 1",
                ));
            }
            // Whether the files can be read (and fit) is the binary's
            // preflight, run by `config check` too: core does no I/O.
        }
        self.validate_auth_and_log()?;
        self.validate_limits_and_cors()?;
        if self.server.max_body_bytes < 1024 {
            return Err(ConfigError::invalid(
                "server.max_body_bytes",
                "expected at least 1024 bytes",
            ));
        }
        if !(self.store.url.starts_with("sqlite:")
            || self.store.url.starts_with("postgres://")
            || self.store.url.starts_with("postgresql://"))
        {
            return Err(ConfigError::invalid(
                "store.url",
                "expected a URL starting with sqlite:, postgres:// or postgresql://",
            ));
        }
        if !(1..=86_400_000).contains(&self.store.sqlite_checkpoint_interval_ms) {
            return Err(ConfigError::invalid(
                "store.sqlite_checkpoint_interval_ms",
                "expected 1 to 86400000 (one day)",
            ));
        }
        if self.store.sqlite_wal_limit_mb == 0 {
            return Err(ConfigError::invalid(
                "store.sqlite_wal_limit_mb",
                "expected at least 1",
            ));
        }
        if self.store.connect_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                "store.connect_timeout_secs",
                "expected at least 1",
            ));
        }
        if let Some(url) = &self.rate_limits.redis_url {
            let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
            if !matches!(
                scheme.as_deref(),
                Some(
                    "redis"
                        | "rediss"
                        | "redis+unix"
                        | "unix"
                        | "valkey"
                        | "valkeys"
                        | "valkey+unix"
                )
            ) {
                return Err(ConfigError::invalid(
                    "rate_limits.redis_url",
                    "expected a Redis URL: redis://, rediss://, redis+unix:// or unix://",
                ));
            }
        }
        if self.store.max_connections == 0 {
            return Err(ConfigError::invalid(
                "store.max_connections",
                "expected at least 1",
            ));
        }
        if let Some(schema) = &self.store.schema {
            // Lower case only: PostgreSQL folds an unquoted name to lower
            // case, so `Tenant_A` would be created as "Tenant_A" but searched
            // as tenant_a, another deployment's schema if it exists.
            if schema.is_empty()
                || !schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                || schema.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(ConfigError::invalid(
                    "store.schema",
                    "expected an identifier of lower-case letters, digits and underscores",
                ));
            }
        }
        for (section, writer) in [("usage", &self.usage), ("events", &self.events)] {
            for (key, value) in [
                ("queue_capacity", writer.queue_capacity),
                ("batch_size", writer.batch_size),
            ] {
                if value == 0 {
                    return Err(ConfigError::invalid(
                        format!("{section}.{key}"),
                        "expected at least 1",
                    ));
                }
            }
        }
        self.local.validate()?;
        for (name, p) in &self.providers {
            if p.server_tools && p.kind != ProviderKind::Anthropic {
                return Err(ConfigError::invalid(
                    format!("providers.{name}.server_tools"),
                    "only an anthropic provider runs Anthropic's own tools",
                ));
            }
            if !p.thinking.is_auto() && p.kind != ProviderKind::Anthropic {
                return Err(ConfigError::invalid(
                    format!("providers.{name}.thinking"),
                    "only an anthropic provider has a form of extended thinking to choose",
                ));
            }
            if let Some(n) = p.max_tokens_default {
                if p.kind != ProviderKind::Anthropic {
                    return Err(ConfigError::invalid(
                        format!("providers.{name}.max_tokens_default"),
                        "only an anthropic provider needs a max_tokens when the client gives none",
                    ));
                }
                if !(1..=1_000_000).contains(&n) {
                    return Err(ConfigError::invalid(
                        format!("providers.{name}.max_tokens_default"),
                        "expected 1 to 1000000",
                    ));
                }
            }
            if p.kind == ProviderKind::Local {
                if !p.base_url.is_empty() {
                    return Err(ConfigError::invalid(
                        format!("providers.{name}.base_url"),
                        "a local provider runs in-process and takes no base_url",
                    ));
                }
                continue;
            }
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    format!("providers.{name}.base_url"),
                    "expected an http:// or https:// URL",
                ));
            }
            // Sent in a header: what `serve` would refuse to send.
            let header_safe = |b: &u8| (0x20..0x7f).contains(b) || *b == b'\t';
            if p.api_key
                .as_ref()
                .is_some_and(|k| !k.expose_secret().as_bytes().iter().all(header_safe))
            {
                return Err(ConfigError::invalid(
                    format!("providers.{name}.api_key"),
                    "expected characters an HTTP header can carry (visible ASCII): a carriage return or newline copied with the key?",
                ));
            }
            if p.timeout_secs == 0
                || p.connect_timeout_ms == 0
                || p.first_byte_timeout_ms == 0
                || p.stream_idle_timeout_ms == Some(0)
            {
                return Err(ConfigError::invalid(
                    format!("providers.{name}"),
                    "expected timeouts greater than zero",
                ));
            }
            if !(1..=4096).contains(&p.max_response_mib) {
                return Err(ConfigError::invalid(
                    format!("providers.{name}.max_response_mib"),
                    "expected 1 to 4096 (MiB)",
                ));
            }
        }
        for (alias, m) in &self.models {
            self.validate_model(alias, m)?;
        }
        let r = &self.resilience;
        if r.max_attempts == 0
            || r.breaker_failure_threshold == 0
            || r.breaker_success_threshold == 0
            || r.breaker_half_open_probes == 0
        {
            return Err(ConfigError::invalid(
                "resilience",
                "expected max_attempts and the breaker thresholds and probes to be at least 1",
            ));
        }
        if self.health.persist_interval_secs == 0 || self.health.probe_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "health",
                "expected persist_interval_secs and probe_timeout_ms of at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&r.retry_budget_ratio) {
            return Err(ConfigError::invalid(
                "resilience.retry_budget_ratio",
                "expected a number from 0 to 1",
            ));
        }
        if r.backoff_base_ms > r.backoff_cap_ms {
            return Err(ConfigError::invalid(
                "resilience.backoff_base_ms",
                "expected at most backoff_cap_ms",
            ));
        }
        for (name, p) in &self.pricing {
            let optional = [
                p.cached_input_per_mtok,
                p.cache_write_per_mtok,
                p.cache_write_1h_per_mtok,
                p.web_search_per_1k,
            ];
            if !(p.input_per_mtok >= 0.0
                && p.output_per_mtok >= 0.0
                && optional.iter().flatten().all(|x| *x >= 0.0))
            {
                return Err(ConfigError::invalid(
                    format!("pricing.{name}"),
                    "expected prices of zero or more",
                ));
            }
        }
        Ok(())
    }

    /// Limits on misspelt classes and CORS origins that can never match
    /// would be accepted and do nothing: refused by name instead.
    fn validate_limits_and_cors(&self) -> Result<(), ConfigError> {
        let limits = &self.rate_limits;
        let classes = limits
            .classes
            .keys()
            .map(|c| (format!("rate_limits.classes.{c}"), c));
        let tenants = limits.tenants.iter().flat_map(|(t, rates)| {
            rates
                .keys()
                .map(move |c| (format!("rate_limits.tenants.{t}.{c}"), c))
        });
        for (path, class) in classes.chain(tenants) {
            crate::limits::check_class(class).map_err(|e| ConfigError::invalid(path, e))?;
        }
        for (i, origin) in self.security.cors_origins.iter().enumerate() {
            if origin != "*" && !is_serialized_origin(origin) {
                return Err(ConfigError::invalid(
                    format!("security.cors_origins[{i}]"),
                    "expected \"*\" or an origin as a browser sends it: scheme://host[:port] in lower case, with no path or trailing slash and no default port (e.g. https://app.example)",
                ));
            }
        }
        Ok(())
    }

    /// What `serve` used to find only when it started (or, for the log
    /// level, silently replaced by `info`).
    fn validate_auth_and_log(&self) -> Result<(), ConfigError> {
        if !is_header_name(&self.auth.user_header) {
            return Err(ConfigError::invalid(
                "auth.user_header",
                "expected an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)",
            ));
        }
        if let Some(key) = &self.auth.admin_key {
            let key = key.expose_secret();
            if key.chars().count() < MIN_ADMIN_KEY_CHARS
                || key.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(ConfigError::invalid(
                    "auth.admin_key",
                    format!(
                        "expected at least {MIN_ADMIN_KEY_CHARS} characters without spaces, e.g. the output of `openssl rand -hex 32` (SWITCHYARD_ADMIN_KEY sets it)"
                    ),
                ));
            }
            // A credential with exactly two dots is read as a JWT: such a
            // key would be stored, end open development mode, and never
            // sign in.
            if key.matches('.').count() == 2 {
                return Err(ConfigError::invalid(
                    "auth.admin_key",
                    "expected a key without exactly two `.` (a credential of that shape is read as a JWT), e.g. the output of `openssl rand -hex 32` (SWITCHYARD_ADMIN_KEY sets it)",
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::invalid(
                "log.level",
                format!("expected a tracing filter such as `info` or `switchyard=debug,info`: {e}"),
            ));
        }
        Ok(())
    }

    fn validate_sessions(&self) -> Result<(), ConfigError> {
        let s = &self.sessions;
        if s.keepalive_secs == 0 {
            return Err(ConfigError::invalid(
                "sessions.keepalive_secs",
                "expected at least 1",
            ));
        }
        if s.max_content_bytes == 0 {
            return Err(ConfigError::invalid(
                "sessions.max_content_bytes",
                "expected at least 1",
            ));
        }
        for (i, r) in s.retired_paths.iter().enumerate() {
            let at = |f: &str| format!("sessions.retired_paths[{i}].{f}");
            if !r.path.starts_with('/')
                || r.path.contains(['{', '}', '*', '?', '#'])
                || r.path.len() > 200
            {
                return Err(ConfigError::invalid(
                    at("path"),
                    "expected a literal path starting with / (no {, }, *, ?, #)",
                ));
            }
            let served = r.path.starts_with("/v1/")
                || matches!(
                    r.path.as_str(),
                    "/functions/v1/chat"
                        | "/functions/v1/embed"
                        | "/health"
                        | "/ready"
                        | "/metrics"
                );
            if served || s.retired_paths[..i].iter().any(|o| o.path == r.path) {
                return Err(ConfigError::invalid(
                    at("path"),
                    "expected a path no other route (or retired path) serves",
                ));
            }
            if crate::sessions::parse_utc(&r.sunset).is_none() {
                return Err(ConfigError::invalid(
                    at("sunset"),
                    "expected a UTC date, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ",
                ));
            }
            if r.deprecated
                .as_deref()
                .is_some_and(|d| crate::sessions::parse_utc(d).is_none())
            {
                return Err(ConfigError::invalid(
                    at("deprecated"),
                    "expected a UTC date, YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ",
                ));
            }
        }
        Ok(())
    }

    fn validate_model(&self, alias: &str, m: &ModelConfig) -> Result<(), ConfigError> {
        let single = m.provider.is_some() || m.model.is_some();
        if single && !m.route.is_empty() {
            return Err(ConfigError::invalid(
                format!("models.{alias}"),
                "expected either provider and model, or route, not both",
            ));
        }
        if single {
            if m.provider.is_none() {
                return Err(ConfigError::invalid(
                    format!("models.{alias}.provider"),
                    "expected a provider name",
                ));
            }
            if m.model.as_deref().is_none_or(str::is_empty) {
                return Err(ConfigError::invalid(
                    format!("models.{alias}.model"),
                    "expected a model name",
                ));
            }
        } else if m.route.is_empty() {
            return Err(ConfigError::invalid(
                format!("models.{alias}"),
                "expected provider and model, or a non-empty route",
            ));
        }
        for (i, (_, d)) in m.deployments().iter().enumerate() {
            let path = if single {
                format!("models.{alias}")
            } else {
                format!("models.{alias}.route[{i}]")
            };
            if !self.providers.contains_key(&d.provider) {
                let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
                return Err(ConfigError::invalid(
                    format!("{path}.provider"),
                    format!(
                        "unknown provider `{}`; expected one of: {}",
                        d.provider,
                        if known.is_empty() {
                            "(none configured)".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            if d.model.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{path}.model"),
                    "expected a model name",
                ));
            }
            let local = self.providers[&d.provider].kind == ProviderKind::Local;
            if local
                && d.model != crate::local::LOCAL_CHAT_MODEL
                && d.model != crate::local::LOCAL_EMBEDDING_MODEL
            {
                return Err(ConfigError::invalid(
                    format!("{path}.model"),
                    format!(
                        "the local provider serves `{}` (chat) and `{}` (embeddings), not `{}`",
                        crate::local::LOCAL_CHAT_MODEL,
                        crate::local::LOCAL_EMBEDDING_MODEL,
                        d.model
                    ),
                ));
            }
            if d.weight == 0 {
                return Err(ConfigError::invalid(
                    format!("{path}.weight"),
                    "expected at least 1",
                ));
            }
            if d.first_byte_timeout_ms == Some(0)
                || d.timeout_secs == Some(0)
                || d.stream_idle_timeout_ms == Some(0)
            {
                return Err(ConfigError::invalid(
                    path,
                    "expected timeouts greater than zero",
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML with every secret masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not render: {e}\n"))
    }
}

const DEFAULT_CHAT_BASE: &str = "https://api.openai.com/v1";
const DEFAULT_CHAT_MODEL: &str = "gpt-4o-mini";
const DEFAULT_EMBEDDING_MODEL: &str = "text-embedding-3-small";
const DEFAULT_ANTHROPIC_BASE: &str = "https://api.anthropic.com/v1";
const DEFAULT_ANTHROPIC_MODEL: &str = "claude-sonnet-4-5";

fn env_nonempty<'a>(env: &'a Env, key: &str) -> Option<&'a str> {
    env.get(key)
        .map(String::as_str)
        .filter(|v| !v.trim().is_empty())
}

/// The variables the Supabase functions used: they define a provider `chat`
/// (and `embedding`, and `anthropic`) with the aliases `default`,
/// `default-embedding`, `claude` and the model names themselves; and
/// `LLM_PROVIDER` + `LLM_FALLBACK_PROVIDER` make `default` a two-step route.
/// Aliases the file defines are left alone.
fn apply_shortcuts(tree: &mut toml::Table, env: &Env) -> Result<(), ConfigError> {
    let file_default = tree
        .get("models")
        .and_then(toml::Value::as_table)
        .is_some_and(|m| m.contains_key("default"));
    let chat_key_explicit = env_nonempty(env, "CHAT_API_KEY");
    let chat_key = chat_key_explicit.or_else(|| env_nonempty(env, "OPENAI_API_KEY"));
    let chat_base = env_nonempty(env, "CHAT_API_BASE");
    let chat_model = env_nonempty(env, "CHAT_MODEL_DEFAULT");
    let embed_base = env_nonempty(env, "EMBEDDING_API_BASE");
    let embed_key = env_nonempty(env, "EMBEDDING_API_KEY");
    let embed_model = env_nonempty(env, "EMBEDDING_MODEL_DEFAULT");

    if chat_key.is_some() || chat_base.is_some() || chat_model.is_some() {
        upsert_provider(
            tree,
            "chat",
            Shortcut {
                base: chat_base,
                explicit_base: chat_base,
                default_base: DEFAULT_CHAT_BASE,
                key: chat_key,
                explicit_key: chat_key_explicit,
                // OPENAI_API_KEY is OpenAI's.
                key_base: DEFAULT_CHAT_BASE,
            },
        );
        let model = chat_model.unwrap_or(DEFAULT_CHAT_MODEL);
        insert_alias(tree, "default", "chat", model);
        insert_alias(tree, model, "chat", model);
    }
    if embed_base.is_some()
        || embed_key.is_some()
        || embed_model.is_some()
        || chat_key.is_some()
        || chat_base.is_some()
    {
        upsert_provider(
            tree,
            "embedding",
            Shortcut {
                base: embed_base.or(chat_base),
                explicit_base: embed_base,
                default_base: DEFAULT_CHAT_BASE,
                key: embed_key.or(chat_key),
                explicit_key: embed_key,
                // The chat key is for the chat provider's host.
                key_base: chat_base.unwrap_or(DEFAULT_CHAT_BASE),
            },
        );
        let model = embed_model.unwrap_or(DEFAULT_EMBEDDING_MODEL);
        insert_alias(tree, "default-embedding", "embedding", model);
        insert_alias(tree, model, "embedding", model);
    }
    let anthropic_model =
        env_nonempty(env, "ANTHROPIC_MODEL_DEFAULT").unwrap_or(DEFAULT_ANTHROPIC_MODEL);
    if let Some(key) = env_nonempty(env, "SWITCHYARD_ADMIN_KEY") {
        let auth = tree
            .entry("auth")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(t) = auth.as_table_mut() {
            t.insert("admin_key".into(), toml::Value::String(key.to_owned()));
        }
    }
    if let Some(key) = env_nonempty(env, "ANTHROPIC_API_KEY") {
        let is_new = !tree
            .get("providers")
            .and_then(toml::Value::as_table)
            .is_some_and(|p| p.contains_key("anthropic"));
        upsert_provider(
            tree,
            "anthropic",
            Shortcut {
                base: env_nonempty(env, "ANTHROPIC_BASE_URL"),
                explicit_base: env_nonempty(env, "ANTHROPIC_BASE_URL"),
                default_base: DEFAULT_ANTHROPIC_BASE,
                key: Some(key),
                explicit_key: Some(key),
                key_base: DEFAULT_ANTHROPIC_BASE,
            },
        );
        if is_new {
            if let Some(t) = section(tree, "providers")
                .and_then(|p| p.get_mut("anthropic"))
                .and_then(toml::Value::as_table_mut)
            {
                t.insert("kind".into(), toml::Value::String("anthropic".into()));
            }
        }
        insert_alias(tree, "claude", "anthropic", anthropic_model);
        insert_alias(tree, anthropic_model, "anthropic", anthropic_model);
    }
    let Some(primary) = env_nonempty(env, "LLM_PROVIDER") else {
        if env_nonempty(env, "LLM_FALLBACK_PROVIDER").is_some() {
            return Err(ConfigError::invalid(
                "LLM_FALLBACK_PROVIDER",
                "a fallback needs LLM_PROVIDER, the provider it falls back from",
            ));
        }
        return Ok(());
    };
    let chat_model = chat_model.unwrap_or(DEFAULT_CHAT_MODEL);
    let mut route = Vec::new();
    for (var, choice) in [
        ("LLM_PROVIDER", Some(primary)),
        (
            "LLM_FALLBACK_PROVIDER",
            env_nonempty(env, "LLM_FALLBACK_PROVIDER"),
        ),
    ] {
        let Some(choice) = choice else { continue };
        let (provider, model) = match choice.trim().to_ascii_lowercase().as_str() {
            "openai" | "chat" => ("chat", chat_model),
            "anthropic" => ("anthropic", anthropic_model),
            other => {
                return Err(ConfigError::invalid(
                    var,
                    format!("unknown provider `{other}`; expected openai or anthropic"),
                ))
            }
        };
        let defined = tree
            .get("providers")
            .and_then(toml::Value::as_table)
            .is_some_and(|p| p.contains_key(provider));
        if !defined {
            let needs = if provider == "anthropic" {
                "ANTHROPIC_API_KEY"
            } else {
                "CHAT_API_KEY (or OPENAI_API_KEY) or CHAT_API_BASE"
            };
            return Err(ConfigError::invalid(
                var,
                format!("`{choice}` needs {needs} to be set"),
            ));
        }
        let mut d = toml::Table::new();
        d.insert("provider".into(), toml::Value::String(provider.into()));
        d.insert("model".into(), toml::Value::String(model.into()));
        route.push(toml::Value::Table(d));
    }
    if !file_default {
        if let Some(models) = section(tree, "models") {
            let mut t = toml::Table::new();
            t.insert("route".into(), toml::Value::Array(route));
            models.insert("default".into(), toml::Value::Table(t));
        }
    }
    Ok(())
}

fn section<'a>(tree: &'a mut toml::Table, name: &str) -> Option<&'a mut toml::Table> {
    tree.entry(name.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
}

/// What the shortcut variables say about one provider.
struct Shortcut<'a> {
    /// The base URL the variables give, fallbacks included.
    base: Option<&'a str>,
    /// The base URL the provider's own variable gave.
    explicit_base: Option<&'a str>,
    default_base: &'a str,
    /// The key, fallbacks included (`OPENAI_API_KEY`, the chat key).
    key: Option<&'a str>,
    /// The key the provider's own variable gave.
    explicit_key: Option<&'a str>,
    /// The base URL the fallback key (`key` when not `explicit_key`) was
    /// given for: a provider the file points elsewhere never gets it.
    key_base: &'a str,
}

/// Defines provider `name` from the shortcut variables. One the file
/// defines keeps its kind and base URL unless a variable names a base URL,
/// and its key unless its own key variable is set: a stray `OPENAI_API_KEY`
/// (or a default base URL) never redirects a configured provider, or sends
/// its traffic, or another provider's key, to OpenAI.
fn upsert_provider(tree: &mut toml::Table, name: &str, s: Shortcut<'_>) {
    let Some(providers) = section(tree, "providers") else {
        return;
    };
    let is_new = !providers.contains_key(name);
    let entry = providers
        .entry(name.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(t) = entry.as_table_mut() else {
        return;
    };
    let set = |t: &mut toml::Table, k: &str, v: &str| {
        t.insert(k.into(), toml::Value::String(v.to_owned()));
    };
    if is_new {
        set(t, "kind", "openai");
        set(
            t,
            "base_url",
            s.base.unwrap_or(s.default_base).trim_end_matches('/'),
        );
        if let Some(k) = s.key {
            set(t, "api_key", k);
        }
        return;
    }
    if let Some(base) = s.explicit_base {
        set(t, "base_url", base.trim_end_matches('/'));
    }
    let same_host = |t: &toml::Table| {
        t.get("base_url")
            .and_then(toml::Value::as_str)
            .is_some_and(|b| b.trim_end_matches('/') == s.key_base.trim_end_matches('/'))
    };
    let fallback = s.key.filter(|_| !t.contains_key("api_key") && same_host(t));
    if let Some(k) = s.explicit_key.or(fallback) {
        set(t, "api_key", k);
    }
}

fn insert_alias(tree: &mut toml::Table, alias: &str, provider: &str, model: &str) {
    let Some(models) = section(tree, "models") else {
        return;
    };
    if !models.contains_key(alias) {
        let mut t = toml::Table::new();
        t.insert("provider".into(), toml::Value::String(provider.into()));
        t.insert("model".into(), toml::Value::String(model.into()));
        models.insert(alias.to_owned(), toml::Value::Table(t));
    }
}

/// Sets the value at `keys` (whose sections exist: they were made when the
/// value was first set).
fn set_path(tree: &mut toml::Table, keys: &[String], value: toml::Value) {
    let Some((last, sections)) = keys.split_last() else {
        return;
    };
    let mut table = tree;
    for k in sections {
        match table.get_mut(k).and_then(toml::Value::as_table_mut) {
            Some(t) => table = t,
            None => return,
        }
    }
    table.insert(last.clone(), value);
}

/// serde's ``invalid type: integer `12345`, expected a string`` without the
/// quoted value.
fn without_quoted_value(message: &str) -> String {
    // ``integer `12345`, expected…``, `string "sk-…", expected…`,
    // ``unknown variant `x`, expected…``.
    for q in ['`', '"'] {
        let (open, close) = (format!(" {q}"), format!("{q},"));
        if let Some(a) = message.find(&open) {
            if let Some(b) = message[a + 2..].find(&close) {
                let b = a + 2 + b;
                return format!("{}{}", &message[..a], &message[b + 1..]);
            }
        }
    }
    message.to_owned()
}

/// `SWITCHYARD_SERVER__LISTEN=…` sets `server.listen`; any depth works
/// (`SWITCHYARD_PROVIDERS__OPENAI__API_KEY`). Only names with `__` are
/// overrides, so `SWITCHYARD_CONFIG` and test variables are not mistaken for keys.
/// Returns the keys set, with the text each was given as and whether it
/// was typed by its look (not read as a string).
/// The variable that sets the key at `path` (`server.listen` →
/// `SWITCHYARD_SERVER__LISTEN`), as it is usually written.
fn env_name(path: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        path.replace('.', "__").to_ascii_uppercase()
    )
}

/// The variables named `SWITCHYARD_…` with one underscore that are not
/// settings: read by the scripts, the tests and the benchmarks.
const NOT_SETTINGS: &[&str] = &[
    "ADMIN_KEY",
    "BENCH_VENV",
    "BIN",
    "BINARY",
    "CONFIG",
    "MINILM_DIR",
    "MODELS_CACHE",
    "MODELS_DIR",
    "PYTHON",
    "PY_VENV",
    "REQUIRE_LOCAL",
    "REQUIRE_PG",
    "REQUIRE_PY",
    "REQUIRE_REDIS",
    "SERVICES_DIR",
    "TEST_KEY",
    "TEST_PG_PORT",
    "TEST_PG_URL",
    "TEST_REDIS_PORT",
    "TEST_REDIS_URL",
];

/// The section a `SWITCHYARD_SECTION_KEY` variable (one underscore where two
/// belong) means to set, if it looks like one: it would be ignored.
fn misspelt_override(rest: &str) -> Option<&'static str> {
    const SECTIONS: &[&str] = &[
        "server",
        "store",
        "usage",
        "events",
        "sessions",
        "retention",
        "log",
        "resilience",
        "health",
        "auth",
        "jwt",
        "rate_limits",
        "security",
        "local",
        "providers",
        "models",
        "pricing",
    ];
    if NOT_SETTINGS.contains(&rest) {
        return None;
    }
    let lower = rest.to_ascii_lowercase();
    SECTIONS.iter().copied().find(|s| {
        lower
            .strip_prefix(s)
            .is_some_and(|after| after.len() > 1 && after.starts_with('_'))
    })
}

fn apply_env_overrides(
    tree: &mut toml::Table,
    env: &Env,
) -> Result<Vec<(Vec<String>, String, bool)>, ConfigError> {
    let mut typed = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            if let Some(section) = misspelt_override(rest) {
                return Err(ConfigError::invalid(
                    name.clone(),
                    format!(
                        "a setting of [{section}] is set with two underscores after the section: SWITCHYARD_{}__{}",
                        section.to_ascii_uppercase(),
                        &rest[section.len() + 1..]
                    ),
                ));
            }
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::invalid(
                name.clone(),
                "expected SWITCHYARD_SECTION__KEY with non-empty parts",
            ));
        }
        let mut table = &mut *tree;
        for (i, part) in path[..path.len() - 1].iter().enumerate() {
            let entry = table
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| {
                ConfigError::invalid(
                    path[..=i].join("."),
                    format!("is not a section, so {name} cannot set a key in it"),
                )
            })?;
        }
        if let Some(last) = path.last() {
            let value = env_value(raw);
            typed.push((path.clone(), raw.clone(), !value.is_str()));
            table.insert(last.clone(), value);
        }
    }
    Ok(typed)
}

/// Reads an environment value as the TOML scalar or array it looks like,
/// and as a string otherwise (`8080` → integer, `true` → bool, `[1,2]` → array).
fn env_value(raw: &str) -> toml::Value {
    let trimmed = raw.trim();
    let looks_typed = trimmed == "true"
        || trimmed == "false"
        || trimmed.starts_with('[')
        || trimmed.parse::<i64>().is_ok()
        || (trimmed.parse::<f64>().is_ok() && trimmed.contains('.'));
    if looks_typed {
        if let Ok(t) = format!("v = {trimmed}").parse::<toml::Table>() {
            if let Some(v) = t.get("v") {
                return v.clone();
            }
        }
    }
    toml::Value::String(raw.to_owned())
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderKind::Openai => f.write_str("openai"),
            ProviderKind::Anthropic => f.write_str("anthropic"),
            ProviderKind::Local => f.write_str("local"),
        }
    }
}

/// Reads a secret for sending upstream; the only place a key leaves its wrapper.
pub fn expose(secret: &SecretString) -> &str {
    secret.expose_secret()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_postgres_schema_is_lower_case_as_postgres_folds_it() {
        let load = |schema: &str| {
            let file = format!("[store]\nurl = \"postgres://h/db\"\nschema = \"{schema}\"\n");
            Config::load(Some(("f.toml", &file)), &Env::new())
        };
        assert!(load("tenant_a2").is_ok());
        for bad in ["Tenant_A", "2x", "a-b", ""] {
            let e = load(bad).unwrap_err().to_string();
            assert!(
                e.contains("store.schema") && e.contains("lower-case"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn misspelt_limit_classes_and_unmatchable_cors_origins_are_refused() {
        let load = |t: &str| Config::load(Some(("f.toml", t)), &Env::new());
        for (text, path) in [
            (
                "[rate_limits.classes]\nchatt = \"5/min\"\n",
                "rate_limits.classes.chatt",
            ),
            (
                "[rate_limits.tenants.acme]\nchat = \"5/min\"\nnonsense = \"1/min\"\n",
                "rate_limits.tenants.acme.nonsense",
            ),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(
                e.contains(path) && e.contains("expected one of admin, bots, chat"),
                "{e}"
            );
        }
        assert!(load("[rate_limits.tenants.acme]\nchat = \"5/min\"\nglobal = \"9/min\"\n").is_ok());

        let cors = |origin: &str| {
            load(&format!(
                "[security]\ncors_origins = [\"https://ok.example\", {origin:?}]\n"
            ))
        };
        for good in [
            "*",
            "chrome-extension://abcdefghijklmnop",
            "tauri://localhost",
            "http://localhost:3000",
            "https://app.example",
            "http://[::1]:8080",
            "https://a-b.example:8443",
        ] {
            assert!(cors(good).is_ok(), "{good}");
        }
        for bad in [
            "https://slash.example/",
            "https://UPPER.example",
            "app.example",
            "https://app.example/path",
            "https://app.example:443",
            "HTTPS://app.example",
            "https://app.example:",
            "https://app.example:80x",
            "https://user@app.example",
            "https://app example",
        ] {
            let e = cors(bad).unwrap_err().to_string();
            assert!(
                e.contains("security.cors_origins[1]") && e.contains("no path"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_redis_url_and_the_store_timeout_are_checked_before_serve_meets_them() {
        let load = |t: &str| Config::load(Some(("f.toml", t)), &Env::new());
        let e = load("[rate_limits]\nredis_url = \"http://nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rate_limits.redis_url") && e.contains("redis://"),
            "{e}"
        );
        for ok in [
            "redis://127.0.0.1:6379/",
            "unix:///tmp/r.sock",
            "rediss://h:6380",
        ] {
            assert!(
                load(&format!("[rate_limits]\nredis_url = \"{ok}\"\n")).is_ok(),
                "{ok}"
            );
        }
        let e = load("[store]\nconnect_timeout_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.connect_timeout_secs"), "{e}");
    }

    #[test]
    fn an_error_about_a_key_a_variable_set_names_the_variable() {
        let load = |pairs: &[(&str, &str)]| Config::load(None, &env(pairs));
        let e = load(&[("SWITCHYARD_SERVER__MAX_BODY_BYTES", "abc")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("server.max_body_bytes:")
                && e.ends_with("(set by SWITCHYARD_SERVER__MAX_BODY_BYTES)"),
            "{e}"
        );
        let e = load(&[("SWITCHYARD_SERVER__MAX_BODY_BYTES", "10")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("at least 1024")
                && e.ends_with("(set by SWITCHYARD_SERVER__MAX_BODY_BYTES)"),
            "{e}"
        );
        // From the file: no variable to name.
        let e = Config::load(
            Some(("f.toml", "[server]\nmax_body_bytes = 10\n")),
            &Env::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("set by"), "{e}");
    }

    #[test]
    fn variables_that_would_be_ignored_are_refused() {
        let load = |pairs: &[(&str, &str)]| Config::load(None, &env(pairs));
        let e = load(&[("SWITCHYARD_SERVER_LISTEN", "1.2.3.4:5")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SWITCHYARD_SERVER_LISTEN") && e.contains("SWITCHYARD_SERVER__LISTEN"),
            "{e}"
        );
        let e = load(&[("SWITCHYARD_RATE_LIMITS_ENABLED", "false")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("SWITCHYARD_RATE_LIMITS__ENABLED"), "{e}");
        // The scripts' and tests' own variables are not settings.
        assert!(load(&[
            ("SWITCHYARD_MODELS_DIR", "/m"),
            ("SWITCHYARD_TEST_PG_URL", "postgres://x"),
            ("SWITCHYARD_CONFIG", "f.toml"),
            ("SWITCHYARD_SOMETHING", "x"),
        ])
        .is_ok());
        let e = load(&[("LLM_FALLBACK_PROVIDER", "bogus"), ("CHAT_API_KEY", "k")])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("LLM_FALLBACK_PROVIDER: a fallback needs LLM_PROVIDER"),
            "{e}"
        );
        let e = load(&[("RUST_LOG", "info,switchyard=loud")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("RUST_LOG: expected a tracing filter"), "{e}");
        assert!(load(&[("RUST_LOG", "switchyard=debug,info")]).is_ok());
    }

    #[test]
    fn both_writers_need_a_queue_and_a_batch() {
        let load = |t: &str| Config::load(Some(("f.toml", t)), &Env::new());
        for section in ["usage", "events"] {
            for key in ["queue_capacity", "batch_size"] {
                let e = load(&format!("[{section}]\n{key} = 0\n"))
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains(&format!("{section}.{key}")) && e.contains("at least 1"),
                    "{e}"
                );
            }
        }
    }

    #[test]
    fn openai_itself_is_recognised_by_the_host_of_its_base_url() {
        let is_openai = |url: &str| {
            toml::from_str::<ProviderConfig>(&format!("kind = \"openai\"\nbase_url = \"{url}\""))
                .unwrap()
                .is_openai()
        };
        for yes in [
            "https://api.openai.com/v1",
            "http://api.openai.com/v1/",
            "https://api.openai.com:443/v1",
            "https://my-team.openai.azure.com/openai/deployments/x",
            "https://API.OpenAI.com/v1",
        ] {
            assert!(is_openai(yes), "{yes}");
        }
        for no in [
            "http://127.0.0.1:8000/v1",
            "https://api.openai.com.example.net/v1",
            "https://proxy.example.net/api.openai.com/v1",
            "https://api.deepinfra.com/v1/openai",
        ] {
            assert!(!is_openai(no), "{no}");
        }
    }

    #[test]
    fn deepinfra_is_recognised_by_the_host_of_its_base_url() {
        let is_deepinfra = |url: &str| {
            toml::from_str::<ProviderConfig>(&format!("kind = \"openai\"\nbase_url = \"{url}\""))
                .unwrap()
                .is_deepinfra()
        };
        for yes in [
            "https://api.deepinfra.com/v1/openai",
            "https://API.DeepInfra.com/v1/openai",
            "https://api.deepinfra.com:443/v1/openai",
        ] {
            assert!(is_deepinfra(yes), "{yes}");
        }
        for no in [
            "https://proxy.example.net/deepinfra.com/v1",
            "https://deepinfra.com.example.net/v1",
            "https://api.openai.com/v1",
        ] {
            assert!(!is_deepinfra(no), "{no}");
        }
    }

    #[test]
    fn retired_paths_are_checked_and_named() {
        let load = |t: &str| Config::load(Some(("f.toml", t)), &Env::new());
        let ok = "[[sessions.retired_paths]]\npath = \"/functions/v1/chatting\"\nsunset = \"2027-01-01\"\n";
        let c = load(ok).unwrap();
        assert_eq!(c.sessions.retired_paths[0].successor, "/functions/v1/chat");
        let cases = [
            (
                "path = \"/functions/v1/old\"\nsunset = \"soon\"",
                "sessions.retired_paths[0].sunset",
            ),
            (
                "path = \"/functions/v1/old\"\nsunset = \"2027-01-01\"\ndeprecated = \"x\"",
                "sessions.retired_paths[0].deprecated",
            ),
            (
                "path = \"/functions/v1/chat\"\nsunset = \"2027-01-01\"",
                "sessions.retired_paths[0].path",
            ),
            // Served already: the server used to panic at startup over it.
            (
                "path = \"/functions/v1/embed\"\nsunset = \"2027-01-01\"",
                "sessions.retired_paths[0].path",
            ),
            (
                "path = \"/v1/sessions\"\nsunset = \"2027-01-01\"",
                "sessions.retired_paths[0].path",
            ),
            (
                "path = \"/functions/{x}\"\nsunset = \"2027-01-01\"",
                "sessions.retired_paths[0].path",
            ),
            (
                "path = \"no-slash\"\nsunset = \"2027-01-01\"",
                "sessions.retired_paths[0].path",
            ),
        ];
        for (body, key) in cases {
            let err = load(&format!("[[sessions.retired_paths]]\n{body}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{body}: {err}");
        }
        let twice = format!("{ok}{ok}");
        let err = load(&twice).unwrap_err().to_string();
        assert!(err.contains("sessions.retired_paths[1].path"), "{err}");
        let err = load("[sessions]\nkeepalive_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sessions.keepalive_secs"), "{err}");
    }

    #[test]
    fn what_serve_would_refuse_is_a_configuration_error_naming_its_key() {
        let load = |t: &str, e: &Env| Config::load(Some(("f.toml", t)), e);
        let path_of = |r: Result<Config, ConfigError>| match r {
            Err(ConfigError::Invalid { path, message }) => (path, message),
            other => panic!("{other:?}"),
        };
        let none = Env::new();
        let cases = [
            ("[auth]\nuser_header = \"bad header\"\n", "auth.user_header"),
            ("[auth]\nuser_header = \"\"\n", "auth.user_header"),
            (
                "[auth]\nadmin_key = \"too-short-admin-key\"\n",
                "auth.admin_key",
            ),
            (
                "[auth]\nadmin_key = \"an admin key with spaces in it, long enough\"\n",
                "auth.admin_key",
            ),
            (
                "[auth]\nadmin_key = \"ops.admin.f3a9c2e1b7d4a8f6e2c9b1d7a3f5e8c2\"\n",
                "auth.admin_key",
            ),
            ("[log]\nlevel = \"info,switchyard=loud\"\n", "log.level"),
            (
                "[providers.x]\nkind = \"openai\"\nbase_url = \"https://api.example.com/v1\"\napi_key = \"sk-abc\\r\"\n",
                "providers.x.api_key",
            ),
        ];
        for (toml, key) in cases {
            let (path, message) = path_of(load(toml, &none));
            assert_eq!(path, key, "{toml}: {message}");
            assert!(!message.contains("too-short"), "{message}");
        }
        let short = env(&[("SWITCHYARD_ADMIN_KEY", "short-from-env")]);
        assert_eq!(path_of(load("", &short)).0, "auth.admin_key");
        // TLS files that cannot be read are the binary's preflight
        // (`tls::an_unusable_certificate_or_key_stops_startup_naming_the_key`).
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let fine = format!(
            "[auth]\nuser_header = \"X-Acting-User\"\nadmin_key = \"{}\"\n\
             [log]\nlevel = \"switchyard=debug,info\"\n\
             [server.tls]\ncert_file = \"{manifest}\"\nkey_file = \"{manifest}\"\n",
            "k".repeat(32)
        );
        load(&fine, &none).unwrap();
    }

    #[test]
    fn defaults_serve_on_loopback_with_sqlite() {
        let c = Config::load(None, &Env::new()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert!(c.store.url.starts_with("sqlite://switchyard-data/"));
        assert!(c.models.is_empty());
    }

    #[test]
    fn file_then_env_override_in_that_order() {
        let file = "[server]\nlisten = \"127.0.0.1:9000\"\nmax_body_bytes = 2048\n";
        let c = Config::load(
            Some(("f.toml", file)),
            &env(&[("SWITCHYARD_SERVER__LISTEN", "127.0.0.1:9100")]),
        )
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(c.server.max_body_bytes, 2048);
    }

    #[test]
    fn env_values_are_typed_by_their_look() {
        let c = Config::load(
            None,
            &env(&[
                ("SWITCHYARD_SERVER__MAX_BODY_BYTES", "4096"),
                ("SWITCHYARD_USAGE__ENABLED", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.max_body_bytes, 4096);
        assert!(!c.usage.enabled);
    }

    #[test]
    fn a_numeric_looking_value_for_a_string_key_stays_a_string() {
        let c = Config::load(
            Some((
                "f.toml",
                "[providers.vllm]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:8000/v1\"\n",
            )),
            &env(&[
                ("SWITCHYARD_PROVIDERS__VLLM__API_KEY", "12345"),
                ("SWITCHYARD_SESSIONS__INSTANCE_ID", "1"),
                ("SWITCHYARD_SERVER__MAX_BODY_BYTES", "4096"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.providers["vllm"]
                .api_key
                .as_ref()
                .unwrap()
                .expose_secret(),
            "12345"
        );
        assert_eq!(c.sessions.instance_id.as_deref(), Some("1"));
        assert_eq!(c.server.max_body_bytes, 4096);
        // A number key given text still fails, naming the key but not the value.
        let err = Config::load(
            None,
            &env(&[("SWITCHYARD_SERVER__MAX_BODY_BYTES", "[7777]")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("server.max_body_bytes: invalid type"),
            "{err}"
        );
        assert!(!err.contains("7777"), "{err}");
        // Nor a string value, nor an unknown variant.
        for (var, key) in [
            ("SWITCHYARD_SERVER__MAX_BODY_BYTES", "server.max_body_bytes"),
            ("SWITCHYARD_LOG__FORMAT", "log.format"),
        ] {
            let err = Config::load(None, &env(&[(var, "sk-live-secret")]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{err}");
            assert!(!err.contains("sk-live"), "{err}");
        }
    }

    #[test]
    fn unknown_key_names_its_path() {
        let err =
            Config::load(Some(("f.toml", "[server]\nlisen = \"x\"\n")), &Env::new()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("server.lisen: unknown field `lisen`"),
            "{msg}"
        );
        assert!(msg.contains("expected one of"), "{msg}");
    }

    #[test]
    fn bad_value_names_its_path_and_expectation() {
        let err =
            Config::load(None, &env(&[("SWITCHYARD_SERVER__LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().starts_with("server.listen: "), "{err}");
        let err =
            Config::load(None, &env(&[("SWITCHYARD_SERVER__MAX_BODY_BYTES", "many")])).unwrap_err();
        assert!(
            err.to_string().starts_with("server.max_body_bytes: "),
            "{err}"
        );
        assert!(err.to_string().contains("expected"), "{err}");
        for (key, value, expected) in [
            (
                "SQLITE_CHECKPOINT_INTERVAL_MS",
                "0",
                "expected 1 to 86400000 (one day)",
            ),
            (
                "SQLITE_CHECKPOINT_INTERVAL_MS",
                "86400001",
                "expected 1 to 86400000 (one day)",
            ),
            ("SQLITE_WAL_LIMIT_MB", "0", "expected at least 1"),
        ] {
            let var = format!("SWITCHYARD_STORE__{key}");
            let err = Config::load(None, &env(&[(var.as_str(), value)])).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("store.{}: {expected} (set by {var})", key.to_lowercase()),
            );
        }
    }

    #[test]
    fn retention_defaults_keep_everything_and_bad_values_name_their_key() {
        let c = Config::load(None, &env(&[])).unwrap();
        let r = &c.retention;
        assert_eq!(
            (r.usage_logs_days, r.bus_events_days, r.audit_logs_days),
            (0, 0, 0)
        );
        let c = Config::load(
            Some((
                "f.toml",
                "[retention]\nusage_logs_days = 90\ninterval_secs = 60\n",
            )),
            &env(&[("SWITCHYARD_RETENTION__AUDIT_LOGS_DAYS", "365")]),
        )
        .unwrap();
        assert_eq!(
            (
                c.retention.usage_logs_days,
                c.retention.audit_logs_days,
                c.retention.interval_secs
            ),
            (90, 365, 60)
        );
        for (key, value, expected) in [
            ("INTERVAL_SECS", "0", "expected at least 1"),
            ("BATCH_SIZE", "0", "expected 1 to 100000"),
            ("BATCH_SIZE", "100001", "expected 1 to 100000"),
            (
                "BUS_EVENTS_DAYS",
                "36501",
                "expected 0 (keep forever) to 36500 days",
            ),
        ] {
            let var = format!("SWITCHYARD_RETENTION__{key}");
            let err = Config::load(None, &env(&[(var.as_str(), value)])).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "retention.{}: {expected} (set by {var})",
                    key.to_lowercase()
                ),
            );
        }
        let err =
            Config::load(Some(("f.toml", "[retention]\nusage_days = 1\n")), &env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `usage_days`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_env_section_is_refused() {
        let err =
            Config::load(None, &env(&[("SWITCHYARD_SERVR__LISTEN", "127.0.0.1:1")])).unwrap_err();
        assert!(err.to_string().contains("unknown field `servr`"), "{err}");
    }

    #[test]
    fn model_must_name_a_configured_provider() {
        let file = "[models.m]\nprovider = \"nope\"\nmodel = \"x\"\n";
        let err = Config::load(Some(("f.toml", file)), &Env::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "models.m.provider: unknown provider `nope`; expected one of: (none configured)"
        );
    }

    #[test]
    fn shortcut_variables_build_chat_and_embedding_providers() {
        let c = Config::load(
            None,
            &env(&[
                ("CHAT_API_BASE", "http://127.0.0.1:9/v1/"),
                ("OPENAI_API_KEY", "sk-from-openai-var"),
                ("CHAT_MODEL_DEFAULT", "llama-3"),
                ("EMBEDDING_MODEL_DEFAULT", "bge-small"),
            ]),
        )
        .unwrap();
        let chat = &c.providers["chat"];
        assert_eq!(chat.base_url, "http://127.0.0.1:9/v1");
        assert_eq!(
            chat.api_key.as_ref().map(expose),
            Some("sk-from-openai-var")
        );
        assert_eq!(c.models["default"], ModelConfig::single("chat", "llama-3"));
        assert_eq!(c.models["llama-3"].provider.as_deref(), Some("chat"));
        assert_eq!(c.models["bge-small"].provider.as_deref(), Some("embedding"));
        assert_eq!(c.providers["embedding"].base_url, "http://127.0.0.1:9/v1");
    }

    #[test]
    fn chat_api_key_wins_over_openai_api_key() {
        let c = Config::load(
            None,
            &env(&[("CHAT_API_KEY", "sk-chat"), ("OPENAI_API_KEY", "sk-openai")]),
        )
        .unwrap();
        assert_eq!(
            c.providers["chat"].api_key.as_ref().map(expose),
            Some("sk-chat")
        );
        assert_eq!(c.providers["chat"].base_url, DEFAULT_CHAT_BASE);
    }

    #[test]
    fn embedding_variables_win_over_the_chat_ones_for_embeddings_only() {
        let c = Config::load(
            None,
            &env(&[
                ("CHAT_API_BASE", "http://127.0.0.1:9/chat/v1"),
                ("CHAT_API_KEY", "sk-chat"),
                ("EMBEDDING_API_BASE", "http://127.0.0.1:9/embed/v1"),
                ("EMBEDDING_API_KEY", "sk-embed"),
            ]),
        )
        .unwrap();

        let embedding = &c.providers["embedding"];
        assert_eq!(embedding.base_url, "http://127.0.0.1:9/embed/v1");
        assert_eq!(embedding.api_key.as_ref().map(expose), Some("sk-embed"));
        let chat = &c.providers["chat"];
        assert_eq!(chat.base_url, "http://127.0.0.1:9/chat/v1");
        assert_eq!(chat.api_key.as_ref().map(expose), Some("sk-chat"));
        assert_eq!(
            c.models["default-embedding"],
            ModelConfig::single("embedding", DEFAULT_EMBEDDING_MODEL)
        );
    }

    #[test]
    fn embeddings_fall_back_to_the_chat_base_and_key() {
        let c = Config::load(
            None,
            &env(&[
                ("CHAT_API_BASE", "http://127.0.0.1:9/chat/v1"),
                ("CHAT_API_KEY", "sk-chat"),
            ]),
        )
        .unwrap();

        let embedding = &c.providers["embedding"];
        assert_eq!(embedding.base_url, "http://127.0.0.1:9/chat/v1");
        assert_eq!(embedding.api_key.as_ref().map(expose), Some("sk-chat"));
    }

    #[test]
    fn each_embedding_variable_falls_back_on_its_own() {
        // Only the base: the key still comes from the chat variables.
        let c = Config::load(
            None,
            &env(&[
                ("OPENAI_API_KEY", "sk-openai"),
                ("EMBEDDING_API_BASE", "http://127.0.0.1:9/embed/v1"),
            ]),
        )
        .unwrap();
        let embedding = &c.providers["embedding"];
        assert_eq!(embedding.base_url, "http://127.0.0.1:9/embed/v1");
        assert_eq!(embedding.api_key.as_ref().map(expose), Some("sk-openai"));
        assert_eq!(c.providers["chat"].base_url, DEFAULT_CHAT_BASE);

        // Only the key: the base still comes from CHAT_API_BASE.
        let c = Config::load(
            None,
            &env(&[
                ("CHAT_API_BASE", "http://127.0.0.1:9/chat/v1"),
                ("CHAT_API_KEY", "sk-chat"),
                ("EMBEDDING_API_KEY", "sk-embed"),
            ]),
        )
        .unwrap();
        let embedding = &c.providers["embedding"];
        assert_eq!(embedding.base_url, "http://127.0.0.1:9/chat/v1");
        assert_eq!(embedding.api_key.as_ref().map(expose), Some("sk-embed"));
        assert_eq!(
            c.providers["chat"].api_key.as_ref().map(expose),
            Some("sk-chat")
        );
    }

    #[test]
    fn embedding_variables_alone_define_no_chat_provider() {
        let c = Config::load(
            None,
            &env(&[
                ("EMBEDDING_API_BASE", "http://127.0.0.1:9/embed/v1"),
                ("EMBEDDING_API_KEY", "sk-embed"),
            ]),
        )
        .unwrap();

        assert!(!c.providers.contains_key("chat"));
        assert_eq!(
            c.providers["embedding"].base_url,
            "http://127.0.0.1:9/embed/v1"
        );
    }

    #[test]
    fn shortcuts_do_not_replace_aliases_from_the_file() {
        let file = "[providers.p]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\n[models.default]\nprovider = \"p\"\nmodel = \"mine\"\n";
        let c = Config::load(Some(("f.toml", file)), &env(&[("CHAT_API_KEY", "sk-1")])).unwrap();
        assert_eq!(c.models["default"].model.as_deref(), Some("mine"));
    }

    #[test]
    fn shortcuts_never_redirect_a_provider_the_file_defines() {
        let file = "[providers.chat]\nkind = \"openai\"\nbase_url = \"http://localhost:8000/v1\"\napi_key = \"sk-file\"\n\
                    [providers.embedding]\nkind = \"openai\"\nbase_url = \"https://api.deepinfra.com/v1/openai\"\napi_key = \"di-file\"\n\
                    [providers.anthropic]\nkind = \"anthropic\"\nbase_url = \"https://proxy.example/v1\"\n\
                    [models.default]\nprovider = \"chat\"\nmodel = \"mine\"\n";
        let load =
            |vars: &[(&str, &str)]| Config::load(Some(("f.toml", file)), &env(vars)).unwrap();
        let key = |c: &Config, p: &str| {
            c.providers[p]
                .api_key
                .as_ref()
                .map(|k| k.expose_secret().to_owned())
        };
        // A stray OPENAI_API_KEY, or only a model: nothing moves, no key changes.
        for vars in [
            &[("OPENAI_API_KEY", "sk-stray")][..],
            &[("CHAT_MODEL_DEFAULT", "gpt-4.1")][..],
        ] {
            let c = load(vars);
            assert_eq!(c.providers["chat"].base_url, "http://localhost:8000/v1");
            assert_eq!(key(&c, "chat").as_deref(), Some("sk-file"));
            assert_eq!(
                c.providers["embedding"].base_url,
                "https://api.deepinfra.com/v1/openai"
            );
            assert_eq!(key(&c, "embedding").as_deref(), Some("di-file"));
        }
        // Its own variables still apply.
        let c = load(&[
            ("CHAT_API_KEY", "sk-env"),
            ("CHAT_API_BASE", "http://other/v1/"),
        ]);
        assert_eq!(c.providers["chat"].base_url, "http://other/v1");
        assert_eq!(key(&c, "chat").as_deref(), Some("sk-env"));
        // The embedding provider keeps its own key and URL beside them.
        assert_eq!(key(&c, "embedding").as_deref(), Some("di-file"));
        assert_eq!(
            c.providers["embedding"].base_url,
            "https://api.deepinfra.com/v1/openai"
        );
        // A keyless provider of the file elsewhere than OpenAI never gets
        // OPENAI_API_KEY; one at OpenAI's own URL does.
        let keyless = |base: &str| {
            format!(
                "[providers.chat]\nkind = \"openai\"\nbase_url = \"{base}\"\n[models.default]\nprovider = \"chat\"\nmodel = \"m\"\n"
            )
        };
        let with_openai_key = |file: &str| {
            Config::load(
                Some(("f.toml", file)),
                &env(&[("OPENAI_API_KEY", "sk-stray")]),
            )
            .unwrap()
        };
        let c = with_openai_key(&keyless("http://localhost:8000/v1"));
        assert_eq!(key(&c, "chat"), None);
        let c = with_openai_key(&keyless("https://api.openai.com/v1"));
        assert_eq!(key(&c, "chat").as_deref(), Some("sk-stray"));
        // An anthropic provider of the file keeps its base URL and kind.
        let c = load(&[("ANTHROPIC_API_KEY", "sk-ant")]);
        assert_eq!(
            c.providers["anthropic"].base_url,
            "https://proxy.example/v1"
        );
        assert_eq!(key(&c, "anthropic").as_deref(), Some("sk-ant"));
    }

    #[test]
    fn masked_rendering_hides_keys_and_passwords() {
        let file = "[store]\nurl = \"postgres://u:hunter2@db/x\"\n[providers.p]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\napi_key = \"sk-secret-123\"\n";
        let c = Config::load(Some(("f.toml", file)), &Env::new()).unwrap();
        let out = c.to_masked_toml();
        assert!(!out.contains("sk-secret-123"), "{out}");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("[redacted]"), "{out}");
        assert!(!format!("{c:?}").contains("sk-secret-123"));
    }

    #[test]
    fn url_masking_keeps_everything_but_the_password() {
        assert_eq!(
            mask_url_password("postgres://u:p@h:5432/db?x=1"),
            "postgres://u:[redacted]@h:5432/db?x=1"
        );
        assert_eq!(mask_url_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(mask_url_password("sqlite://a/b.db"), "sqlite://a/b.db");
        // A password given as a parameter, with or without a host.
        assert_eq!(
            mask_url_password("postgres://u@db/x?sslmode=require&password=s3cret"),
            "postgres://u@db/x?sslmode=require&password=[redacted]"
        );
        assert_eq!(
            mask_url_password("postgres:///x?host=/run&password=s3cret"),
            "postgres:///x?host=/run&password=[redacted]"
        );
        // A token as the user of an http(s) URL, or as a parameter.
        assert_eq!(
            mask_url_password("https://TOKEN@proxy.example/v1"),
            "https://[redacted]@proxy.example/v1"
        );
        assert_eq!(
            mask_url_password("https://idp.example/jwks?api-key=abc&x=1#f"),
            "https://idp.example/jwks?api-key=[redacted]&x=1#f"
        );
        assert_eq!(
            mask_url_password("https://api.openai.com/v1"),
            "https://api.openai.com/v1"
        );
    }

    #[test]
    fn pricing_prefers_provider_specific_entry() {
        let file = "[pricing.m]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n[pricing.\"p/m\"]\ninput_per_mtok = 3.0\n";
        let c = Config::load(Some(("f.toml", file)), &Env::new()).unwrap();
        assert_eq!(
            c.price_for("q", "m")
                .unwrap()
                .cost_usd(&crate::openai::Usage::new(1_000_000, 1_000_000)),
            3.0
        );
        assert_eq!(c.price_for("p", "m").unwrap().input_per_mtok, 3.0);
        assert!(c.price_for("p", "other").is_none());
    }

    #[test]
    fn a_default_max_tokens_is_an_anthropic_providers_and_bounded() {
        let load = |p: &str| {
            Config::load(
                Some(("f.toml", &format!("[providers.p]\n{p}\n"))),
                &Env::new(),
            )
        };
        let c =
            load("kind = \"anthropic\"\nbase_url = \"http://a/v1\"\nmax_tokens_default = 32000")
                .unwrap();
        assert_eq!(c.providers["p"].max_tokens_default, Some(32000));
        for (p, expected) in [
            (
                "kind = \"openai\"\nbase_url = \"http://p/v1\"\nmax_tokens_default = 8",
                "providers.p.max_tokens_default: only an anthropic provider",
            ),
            (
                "kind = \"anthropic\"\nbase_url = \"http://a/v1\"\nmax_tokens_default = 0",
                "providers.p.max_tokens_default: expected 1 to 1000000",
            ),
        ] {
            let e = load(p).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{e}");
        }
    }

    #[test]
    fn the_thinking_form_is_an_anthropic_providers_to_name() {
        let file =
            "[providers.p]\nkind = \"openai\"\nbase_url = \"http://p/v1\"\nthinking = \"budget\"\n";
        let e = Config::load(Some(("f.toml", file)), &Env::new()).unwrap_err();
        assert!(e.to_string().contains("providers.p.thinking"), "{e}");
        let ok = file.replace("openai", "anthropic");
        let c = Config::load(Some(("f.toml", &ok)), &Env::new()).unwrap();
        assert_eq!(c.providers["p"].thinking, ThinkingForm::Budget);
        let bad = ok.replace("budget", "sometimes");
        let e = Config::load(Some(("f.toml", &bad)), &Env::new()).unwrap_err();
        assert!(e.to_string().contains("providers.p.thinking"), "{e}");
    }

    #[test]
    fn server_tools_are_only_an_anthropic_providers_to_enable() {
        let file =
            "[providers.p]\nkind = \"openai\"\nbase_url = \"http://p/v1\"\nserver_tools = true\n";
        let e = Config::load(Some(("f.toml", file)), &Env::new()).unwrap_err();
        assert!(e.to_string().contains("providers.p.server_tools"), "{e}");
        let ok = file.replace("openai", "anthropic");
        assert!(
            Config::load(Some(("f.toml", &ok)), &Env::new())
                .unwrap()
                .providers["p"]
                .server_tools
        );
    }

    #[test]
    fn cached_prompt_tokens_cost_their_own_price_when_it_is_set() {
        let file = "[pricing.claude]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n\
                    cached_input_per_mtok = 0.3\ncache_write_per_mtok = 3.75\n\
                    [pricing.plain]\ninput_per_mtok = 3.0\n";
        let c = Config::load(Some(("f.toml", file)), &Env::new()).unwrap();
        let usage: crate::openai::Usage = serde_json::from_value(serde_json::json!({
            "prompt_tokens": 1_000_000, "completion_tokens": 100_000,
            "prompt_tokens_details": {"cached_tokens": 600_000},
            "cache_creation_input_tokens": 300_000,
        }))
        .unwrap();
        assert_eq!(
            (usage.cached_tokens, usage.cache_write_tokens),
            (600_000, 300_000)
        );
        let cost = c.price_for("a", "claude").unwrap().cost_usd(&usage);
        // 0.1 M plain × 3 + 0.6 M read × 0.3 + 0.3 M written × 3.75 + 0.1 M out × 15
        assert!((cost - (0.3 + 0.18 + 1.125 + 1.5)).abs() < 1e-9, "{cost}");
        // Unset, every prompt token is an input token, as before.
        let cost = c.price_for("a", "plain").unwrap().cost_usd(&usage);
        assert!((cost - 3.0).abs() < 1e-9, "{cost}");
        for key in [
            "cached_input_per_mtok",
            "cache_write_1h_per_mtok",
            "web_search_per_1k",
        ] {
            let negative = format!("[pricing.m]\ninput_per_mtok = 1.0\n{key} = -1.0\n");
            let e = Config::load(Some(("f.toml", &negative)), &Env::new()).unwrap_err();
            assert!(e.to_string().contains("pricing.m"), "{e}");
        }
    }

    #[test]
    fn one_hour_cache_writes_cost_their_own_price_or_the_write_price() {
        let file = "[pricing.claude]\ninput_per_mtok = 3.0\ncache_write_per_mtok = 3.75\n\
                    cache_write_1h_per_mtok = 6.0\n\
                    [pricing.five]\ninput_per_mtok = 3.0\ncache_write_per_mtok = 3.75\n";
        let c = Config::load(Some(("f.toml", file)), &Env::new()).unwrap();
        let usage: crate::openai::Usage = serde_json::from_value(serde_json::json!({
            "prompt_tokens": 1_000_000, "completion_tokens": 0,
            "cache_creation_input_tokens": 400_000,
            "cache_creation": {"ephemeral_5m_input_tokens": 100_000, "ephemeral_1h_input_tokens": 300_000},
        }))
        .unwrap();
        assert_eq!(usage.cache_write_1h_tokens, 300_000);
        // 0.6 M plain × 3 + 0.1 M five-minute × 3.75 + 0.3 M one-hour × 6
        let cost = c.price_for("a", "claude").unwrap().cost_usd(&usage);
        assert!((cost - (1.8 + 0.375 + 1.8)).abs() < 1e-9, "{cost}");
        // Unset, one-hour writes cost what five-minute ones do.
        let cost = c.price_for("a", "five").unwrap().cost_usd(&usage);
        assert!((cost - (1.8 + 1.5)).abs() < 1e-9, "{cost}");
    }

    #[test]
    fn a_route_groups_deployments_by_priority() {
        let file = r#"
[providers.a]
kind = "openai"
base_url = "http://a/v1"
[providers.b]
kind = "openai"
base_url = "http://b/v1"
[[models.m.route]]
provider = "a"
model = "x"
weight = 3
priority = 0
[[models.m.route]]
provider = "b"
model = "y"
priority = 0
[[models.m.route]]
provider = "b"
model = "z"
first_byte_timeout_ms = 500
"#;
        let c = Config::load(Some(("f.toml", file)), &Env::new()).unwrap();
        let d = c.models["m"].deployments();
        let summary: Vec<(u32, &str, u32)> = d
            .iter()
            .map(|(p, d)| (*p, d.model.as_str(), d.weight))
            .collect();
        assert_eq!(summary, [(0, "x", 3), (0, "y", 1), (2, "z", 1)]);
        assert_eq!(d[2].1.first_byte_timeout_ms, Some(500));
    }

    #[test]
    fn a_route_must_name_configured_providers_and_not_mix_forms() {
        let base = "[providers.a]\nkind = \"openai\"\nbase_url = \"http://a/v1\"\n";
        let err = Config::load(
            Some((
                "f.toml",
                &format!("{base}[[models.m.route]]\nprovider = \"nope\"\nmodel = \"x\"\n"),
            )),
            &Env::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("models.m.route[0].provider: unknown provider `nope`"),
            "{err}"
        );
        let err = Config::load(
            Some((
                "f.toml",
                &format!("{base}[models.m]\nprovider = \"a\"\nmodel = \"x\"\n[[models.m.route]]\nprovider = \"a\"\nmodel = \"y\"\n"),
            )),
            &Env::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = Config::load(
            Some(("f.toml", &format!("{base}[models.m]\n"))),
            &Env::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("non-empty route"), "{err}");
    }

    #[test]
    fn llm_provider_variables_make_default_a_two_step_route() {
        let c = Config::load(
            None,
            &env(&[
                ("CHAT_API_KEY", "sk-1"),
                ("ANTHROPIC_API_KEY", "sk-ant-1"),
                ("LLM_PROVIDER", "anthropic"),
                ("LLM_FALLBACK_PROVIDER", "openai"),
            ]),
        )
        .unwrap();
        let route: Vec<(String, String)> = c.models["default"]
            .deployments()
            .into_iter()
            .map(|(_, d)| (d.provider, d.model))
            .collect();
        assert_eq!(
            route,
            [
                ("anthropic".to_owned(), DEFAULT_ANTHROPIC_MODEL.to_owned()),
                ("chat".to_owned(), DEFAULT_CHAT_MODEL.to_owned())
            ]
        );
        assert_eq!(c.providers["anthropic"].kind, ProviderKind::Anthropic);
        assert_eq!(c.models["claude"].provider.as_deref(), Some("anthropic"));
    }

    #[test]
    fn llm_provider_without_its_key_names_the_missing_variable() {
        let err = Config::load(None, &env(&[("LLM_PROVIDER", "anthropic")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "LLM_PROVIDER: `anthropic` needs ANTHROPIC_API_KEY to be set"
        );
        let err = Config::load(
            None,
            &env(&[("CHAT_API_KEY", "k"), ("LLM_PROVIDER", "mistral")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("LLM_PROVIDER: unknown provider `mistral`"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_name_the_file_line_and_column_but_not_the_text() {
        let err = Config::load(Some(("my.toml", "[server\n")), &Env::new()).unwrap_err();
        assert!(
            err.to_string().starts_with("my.toml:1:8: invalid TOML"),
            "{err}"
        );
        let text =
            "[server]\nlisten = \"127.0.0.1:8080\"\n\n[auth]\nadmin_key = s3cret-not-quoted\n";
        let err = Config::load(Some(("my.toml", text)), &Env::new())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("my.toml:5:13: invalid TOML"), "{err}");
        assert!(!err.contains("s3cret") && !err.contains('\n'), "{err}");
    }
}
