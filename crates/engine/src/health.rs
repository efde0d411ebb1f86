//! Provider health over time: a task that probes each deployment now and then
//! (when configured) and persists every deployment's statistics and breaker
//! state to `provider_health`, so that operators — and other instances — can
//! see them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchyard_core::config::HealthConfig;
use switchyard_core::health::ProviderHealthRow;
use switchyard_providers::router::Deployment;
use switchyard_store::Store;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The row a deployment has now.
pub fn health_row(d: &Deployment) -> ProviderHealthRow {
    let s = d.health.snapshot();
    ProviderHealthRow {
        deployment: d.id.clone(),
        provider: d.provider_name.to_string(),
        model: d.upstream_model.to_string(),
        breaker_state: d.breaker.state().as_str().to_owned(),
        p50_ms: s.p50_ms,
        p95_ms: s.p95_ms,
        error_rate: s.error_rate,
        window_calls: s.window_calls,
        total_calls: s.total_calls,
        total_errors: s.total_errors,
        last_error: s.last_error,
        last_error_at_ms: s.last_error_at_ms,
        last_success_at_ms: s.last_success_at_ms,
        last_probe_at_ms: s.last_probe_at_ms,
        last_probe_ok: s.last_probe_ok,
        last_probe_ms: s.last_probe_ms,
        updated_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    }
}

/// The running task; [`HealthTask::shutdown`] writes one last time.
pub struct HealthTask {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl HealthTask {
    pub fn spawn(
        deployments: Vec<Arc<Deployment>>,
        store: Arc<dyn Store>,
        config: &HealthConfig,
    ) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let persist = Duration::from_secs(config.persist_interval_secs);
        let probe_every = (config.probe_interval_secs > 0)
            .then(|| Duration::from_secs(config.probe_interval_secs));
        let probe_timeout = Duration::from_millis(config.probe_timeout_ms);
        let join = tokio::spawn(async move {
            let mut next_probe = probe_every.map(|_| Instant::now());
            let mut tick = tokio::time::interval(persist.min(probe_every.unwrap_or(persist)));
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                if let (Some(at), Some(every)) = (next_probe, probe_every) {
                    if Instant::now() >= at {
                        probe_all(&deployments, probe_timeout).await;
                        next_probe = Some(at + every);
                    }
                }
                persist_all(&deployments, &*store).await;
            }
            persist_all(&deployments, &*store).await;
        });
        Self {
            stop: Some(stop),
            join: Some(join),
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

async fn probe_all(deployments: &[Arc<Deployment>], timeout: Duration) {
    let probes =
        deployments.iter().map(|d| async move {
            let started = Instant::now();
            let result = d.chat.probe(timeout).await;
            let ok = result.is_ok();
            d.health.record_probe(ok, started.elapsed());
            metrics::gauge!("switchyard_provider_probe_up", "deployment" => d.id.clone())
                .set(if ok { 1.0 } else { 0.0 });
            if let Err(e) = result {
                tracing::warn!(deployment = %d.id, error = %e, "health probe failed");
            }
        });
    futures::future::join_all(probes).await;
}

async fn persist_all(deployments: &[Arc<Deployment>], store: &dyn Store) {
    let rows: Vec<ProviderHealthRow> = deployments.iter().map(|d| health_row(d)).collect();
    if let Err(e) = store.upsert_provider_health(&rows).await {
        tracing::warn!(error = %e, "writing provider health failed");
    }
}
