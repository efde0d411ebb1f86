//! Wiring: turns a [`Config`] into a running server. `main.rs` only parses
//! the command line, loads configuration, sets up telemetry and calls this.

pub mod cli;
mod http;
pub mod jsonlog;
pub mod keys;
#[cfg(feature = "local")]
pub mod local;
pub mod logwriter;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use metrics_exporter_prometheus::PrometheusHandle;
use switchyard_core::Config;
use switchyard_engine::sessions::{SessionSettings, Sessions};
use switchyard_engine::{
    BatchWriterTask, EventWriter, Gateway, HealthTask, UsageWriter, UsageWriterTask,
};
use switchyard_store::Store;
use tokio::net::TcpListener;

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    usage_task: UsageWriterTask,
    events_task: BatchWriterTask,
    health_task: HealthTask,
    sessions: Sessions,
    /// To stop the calls still in flight when the grace period ends.
    gateway: Arc<switchyard_engine::Gateway>,
    store: Arc<dyn Store>,
    grace: Duration,
    prometheus: Option<PrometheusHandle>,
    /// Tasks that live as long as the server (the revocation listener).
    background: Vec<tokio::task::JoinHandle<()>>,
    /// TLS termination, with the handshake timeout (`server.tls`).
    tls: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    /// `server.read_timeout_secs`.
    read_timeout: Duration,
}

/// What `serve` would refuse at startup that the configuration alone shows,
/// checked without the network or the store: a certificate and key that do
/// not fit, a proxy for a provider that is not `http://`, local model files
/// that are missing. `config check` runs it too, so that it refuses exactly
/// what `serve` does; both exit 2 on it like on any configuration error.
pub fn preflight(config: &Config) -> anyhow::Result<()> {
    if let Some(t) = &config.server.tls {
        tls::acceptor(t)?;
    }
    for (name, p) in &config.providers {
        if p.kind != switchyard_core::config::ProviderKind::Local {
            switchyard_providers::check_route(&p.base_url)
                .map_err(|e| anyhow::anyhow!("providers.{name}.base_url: {e}"))?;
        }
    }
    #[cfg(feature = "local")]
    local::check_files(config)?;
    Ok(())
}

impl Application {
    /// Opens and migrates the store, builds the providers and binds the
    /// listener (port 0 picks a free port).
    pub async fn build(
        config: &Config,
        prometheus: Option<PrometheusHandle>,
    ) -> anyhow::Result<Self> {
        // A certificate that cannot be used stops startup before anything else.
        let tls = match &config.server.tls {
            Some(t) => Some((
                tls::acceptor(t)?,
                Duration::from_secs(t.handshake_timeout_secs),
            )),
            None => None,
        };
        let store = switchyard_store::connect(&config.store)
            .await
            .context("opening the store")?;
        store.migrate().await.context("migrating the store")?;
        let (usage, usage_task) = UsageWriter::spawn(store.clone(), &config.usage);
        let (events, events_task) = EventWriter::spawn(store.clone(), &config.events);
        #[cfg(feature = "local")]
        let in_process = local::adapters(config).await?;
        #[cfg(not(feature = "local"))]
        let in_process = std::collections::HashMap::new();
        let gateway = Arc::new(
            Gateway::new(config, store.clone(), usage, events, in_process)
                .context("building the gateway")?,
        );
        let health_task = gateway.spawn_health_task(&config.health);
        for m in gateway.models() {
            tracing::info!(model = %m.id, provider = %m.owned_by, "model alias configured");
        }
        let jwt = if config.jwt.enabled() {
            Some(
                switchyard_engine::jwt::JwtVerifier::new(&config.jwt)
                    .context("setting up JWT verification")?,
            )
        } else {
            None
        };
        // Open development mode: only on a loopback listener, without a JWT
        // issuer, and only while no key exists.
        let identity = switchyard_engine::identity::Identity::start(
            store.clone(),
            config.server.listen.ip().is_loopback(),
            config.auth.admin_key.as_ref(),
            jwt,
        )
        .await
        .context("loading identity")?;
        if identity.open_dev() {
            tracing::warn!(
                "open development mode: no API key exists and the server listens on a loopback address, so every request is served as the admin of tenant `default`; create a key (`switchyard keys create`) to end it"
            );
        }
        let mut background = Vec::new();
        // A key made by `switchyard keys create` (another process) ends the
        // mode within this interval.
        background.extend(identity.spawn_open_dev_watch(Duration::from_secs(1)));
        if let Some(url) = &config.rate_limits.redis_url {
            let b = switchyard_engine::identity::broadcast::Broadcast::connect(url)
                .await
                .context("connecting to Redis for revocations")?;
            identity.set_broadcast(b).await;
            background.push(switchyard_engine::identity::broadcast::spawn_listener(
                identity.clone(),
                url.clone(),
            ));
        }
        let budgets = switchyard_engine::budget::Budgets::new(store.clone(), identity.clone());
        gateway.observe_spend(budgets.observer());
        let sc = &config.sessions;
        let instance_id = sc
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", host_name(), config.server.listen));
        let relay = match &config.rate_limits.redis_url {
            Some(url) => Some(
                switchyard_engine::sessions::relay::Relay::connect(url)
                    .await
                    .context("connecting to Redis for following replies across instances")?,
            ),
            None => None,
        };
        let sessions = Sessions::new(
            store.clone(),
            gateway.clone(),
            SessionSettings {
                max_content_bytes: sc.max_content_bytes,
                keepalive: Duration::from_secs(sc.keepalive_secs),
                default_context_tokens: sc.default_context_tokens,
                instance_id: instance_id.clone(),
                relay,
            },
        );
        // Replies this instance was generating when it last stopped
        // (killed) can never complete: say so before serving anything.
        sessions
            .recover(Duration::from_secs(sc.stale_stream_secs))
            .await
            .context("marking interrupted replies")?;
        let stale = Duration::from_secs(sc.stale_stream_secs);
        let sweeper = sessions.clone();
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(300));
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = sweeper.recover(stale).await {
                    tracing::warn!(error = %e, "sweeping stale replies failed");
                }
            }
        }));
        tracing::info!(instance = %instance_id, "sessions ready");
        let idempotency = switchyard_engine::idempotency::Idempotency::new(
            store.clone(),
            Duration::from_secs(sc.idempotency_ttl_secs),
            Duration::from_secs(sc.idempotency_lease_secs),
        );
        background.push(idempotency.spawn_purge(Duration::from_secs(600)));
        let retention =
            switchyard_engine::retention::Retention::new(store.clone(), config.retention.clone());
        background.extend(retention.spawn());
        let state = switchyard_server::AppState::new(switchyard_server::Parts {
            gateway: gateway.clone(),
            sessions: sessions.clone(),
            idempotency,
            retired_paths: sc.retired_paths.clone(),
            identity,
            budgets: Some(budgets),
            replay: match &config.rate_limits.redis_url {
                Some(url) => switchyard_engine::signing::ReplayGuard::redis(url)
                    .await
                    .context("connecting to Redis for the replay guard")?,
                None => switchyard_engine::signing::ReplayGuard::memory(),
            },
            prometheus: prometheus.clone(),
            max_body_bytes: config.server.max_body_bytes,
            read_timeout: Duration::from_secs(config.server.read_timeout_secs),
            // Checked by the configuration's validation.
            trusted_proxies: config
                .server
                .trusted_proxies
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect(),
            user_header: config.auth.user_header.clone(),
            security: switchyard_core::config::SecurityConfig {
                // Clients of a server that terminates TLS reach it over TLS.
                hsts: config.security.hsts || tls.is_some(),
                ..config.security.clone()
            },
            limits: Some(limits(config).await?),
        })
        .map_err(anyhow::Error::msg)?;
        let router = switchyard_server::router(state);
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        Ok(Self {
            listener,
            router,
            usage_task,
            events_task,
            health_task,
            sessions,
            gateway,
            store,
            grace: Duration::from_secs(config.server.shutdown_grace_secs),
            prometheus,
            background,
            tls,
            read_timeout: Duration::from_secs(config.server.read_timeout_secs),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn port(&self) -> u16 {
        self.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish (up to `server.shutdown_grace_secs`), and flushes the
    /// usage writer before returning.
    ///
    /// The whole shutdown is bounded: requests and session replies share the
    /// grace period; then the calls still running are stopped (each client is
    /// told so, and each call's usage row is written) and get
    /// [`STOP_WAIT`] to end; then the writers get [`FLUSH_WAIT`]. So it takes
    /// at most `shutdown_grace_secs` + 6 s.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(addr = %addr, store = self.store.backend(), tls = self.tls.is_some(), "listening");
        let upkeep = self.prometheus.clone().map(|handle| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    handle.run_upkeep();
                }
            })
        });
        let stopping = Arc::new(tokio::sync::Notify::new());
        let notify = stopping.clone();
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: no new connections; waiting for requests in flight");
            notify.notify_one();
        };
        let mut serve = serve(
            self.listener,
            self.router,
            self.tls,
            self.read_timeout,
            signal,
        )?;
        let grace = self.grace;
        // When the stop began, once it has.
        let stop_began = std::sync::Mutex::new(None);
        // Whatever ends the serving (a listener error too), the writers are
        // flushed below before the result is returned.
        let served = tokio::select! {
            r = &mut serve => Some(r),
            _ = async {
                stopping.notified().await;
                if let Ok(mut began) = stop_began.lock() {
                    *began = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(grace).await
            } => None,
        };
        let deadline = stop_began
            .lock()
            .ok()
            .and_then(|b| *b)
            .unwrap_or_else(tokio::time::Instant::now)
            + grace;
        // Session replies share what is left of the grace period.
        self.sessions
            .drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        // Whatever is still running now is stopped: requests, and session
        // replies, which outlive their requests (so the HTTP side may have
        // finished in time while they have not).
        let replies = self.sessions.live_replies();
        if served.is_none() || replies > 0 {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                replies,
                "requests or replies still in flight after the grace period; stopping them"
            );
        }
        self.gateway.stop_calls();
        let served = match served {
            Some(r) => r.context("serving"),
            None => match tokio::time::timeout(STOP_WAIT, &mut serve).await {
                Ok(r) => r.context("serving"),
                Err(_) => {
                    tracing::warn!("requests still open after they were stopped; leaving them");
                    Ok(())
                }
            },
        };
        // Stopped replies write their end.
        self.sessions.drain(STOP_WAIT).await;
        if let Some(u) = upkeep {
            u.abort();
        }
        for task in &self.background {
            task.abort();
        }
        self.health_task.shutdown().await;
        let (usage, events) = (self.usage_task, self.events_task);
        tokio::join!(
            usage.shutdown_within(FLUSH_WAIT),
            events.shutdown_within(FLUSH_WAIT)
        );
        self.store.close().await;
        tracing::info!("stopped");
        served
    }
}

/// How long the calls stopped at the end of the grace period have to end
/// (they end at their next poll; this covers writing their last frame).
const STOP_WAIT: Duration = Duration::from_secs(1);
/// How long the writers have, at shutdown, to write the rows queued.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// [`http::serve`] over plain TCP, or over TLS when `server.tls` is set,
/// until `signal` resolves and the requests in flight have finished.
fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    read_timeout: Duration,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>> {
    Ok(match tls {
        Some((acceptor, handshake)) => {
            let listener = tls::TlsListener::new(listener, acceptor, handshake)?;
            Box::pin(http::serve(listener, router, read_timeout, signal))
        }
        None => {
            // Small SSE frames must leave at once: Nagle's algorithm would
            // hold each one until the client's delayed ACK (~40 ms).
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            Box::pin(http::serve(listener, router, read_timeout, signal))
        }
    })
}

/// This machine's name, for the default instance id.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "localhost".into())
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The rate limiter the configuration asks for: Redis when `redis_url` is
/// set (every instance shares the limits), else in memory.
async fn limits(config: &Config) -> anyhow::Result<switchyard_server::Limits> {
    use switchyard_engine::limits::{MemoryLimiter, RateLimiter, RedisLimiter};
    let limiter: Arc<dyn RateLimiter> = match &config.rate_limits.redis_url {
        Some(url) => Arc::new(
            RedisLimiter::connect(url)
                .await
                .context("connecting to the rate-limit Redis (rate_limits.redis_url)")?,
        ),
        None => Arc::new(MemoryLimiter::new()),
    };
    Ok(switchyard_server::Limits {
        config: config.rate_limits.clone(),
        limiter,
    })
}
