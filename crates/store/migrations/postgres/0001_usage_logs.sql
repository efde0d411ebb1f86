-- One row per model request; written in batches by the usage writer.
CREATE TABLE IF NOT EXISTS usage_logs (
    id                UUID PRIMARY KEY,
    tenant_id         TEXT NOT NULL,
    trace_id          TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    model_alias       TEXT NOT NULL,
    provider          TEXT NOT NULL,
    upstream_model    TEXT NOT NULL,
    stream            BOOLEAN NOT NULL,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    cost_usd          DOUBLE PRECISION,
    latency_ms        DOUBLE PRECISION NOT NULL,
    ttft_ms           DOUBLE PRECISION,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    created_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_logs_tenant_time ON usage_logs (tenant_id, created_at);
CREATE INDEX IF NOT EXISTS usage_logs_trace ON usage_logs (trace_id);
