//! Logging and metrics setup for the process.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use switchyard_core::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

use crate::jsonlog::JsonLayer;
use crate::logwriter::{self, LogFlushGuard};

/// JSON (or text) logs to stdout; every line inside a request carries the
/// request span's `trace_id`. `RUST_LOG` wins over `log.level` when set.
///
/// Lines go through [`crate::logwriter`]: buffered, written by one thread in
/// few large writes, so no request waits on a `write` syscall. Keep the
/// guard until exit: dropping it flushes what is buffered.
/// `to_stderr` is for one-shot commands whose stdout is their output.
pub fn init_logging(config: &LogConfig, to_stderr: bool) -> LogFlushGuard {
    // llama.cpp reports every tensor it loads at info level: keep its
    // warnings and errors only, unless the level names it.
    let level = if config.level.contains("llama") {
        config.level.clone()
    } else {
        format!("{},llama-cpp-2=warn", config.level)
    };
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (sink, guard) = if to_stderr {
        logwriter::spawn(Box::new(std::io::stderr()) as Box<dyn std::io::Write + Send>)
    } else {
        logwriter::spawn(Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>)
    };
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match config.format {
        LogFormat::Json => registry.with(JsonLayer::new(sink)).try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || sink.clone()),
            )
            .try_init(),
    };
    guard
}

/// Latency buckets from 100 µs to 60 s: gateway overhead is sub-millisecond,
/// model calls take seconds.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Installs the global Prometheus recorder; `None` if one is already set.
pub fn init_metrics() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .ok()?;
    let handle = builder.install_recorder().ok()?;
    metrics::describe_counter!(
        "switchyard_http_requests_total",
        "HTTP requests by route, model alias and status"
    );
    metrics::describe_histogram!(
        "switchyard_http_request_duration_seconds",
        "Time to response headers by route, model alias and status"
    );
    metrics::describe_histogram!(
        "switchyard_upstream_duration_seconds",
        "Upstream call duration by provider, from the router call (whole stream for streams)"
    );
    metrics::describe_histogram!(
        "switchyard_upstream_ttft_seconds",
        "Time from the router call to the first streamed chunk by provider"
    );
    metrics::describe_counter!(
        "switchyard_tokens_total",
        "Tokens by model alias, provider and kind (prompt/completion)"
    );
    metrics::describe_gauge!(
        "switchyard_usage_queue_depth",
        "Usage rows waiting to be written"
    );
    metrics::describe_counter!(
        "switchyard_usage_dropped_total",
        "Usage rows dropped (queue full or database failing)"
    );
    metrics::describe_counter!("switchyard_usage_written_total", "Usage rows written");
    metrics::describe_gauge!(
        "switchyard_events_queue_depth",
        "Trace events waiting to be written"
    );
    metrics::describe_counter!(
        "switchyard_upstream_stream_failures_total",
        "Streams that broke after their first chunk, by deployment (counted against its breaker)"
    );
    metrics::describe_counter!(
        "switchyard_retention_deleted_total",
        "Rows deleted by retention, by log (usage_logs, bus_events, audit_logs)"
    );
    metrics::describe_counter!(
        "switchyard_log_lines_dropped_total",
        "Log lines dropped because stdout did not keep up"
    );
    metrics::counter!("switchyard_log_lines_dropped_total").increment(0);
    metrics::gauge!("switchyard_usage_queue_depth").set(0.0);
    metrics::counter!("switchyard_usage_dropped_total").increment(0);
    Some(handle)
}
