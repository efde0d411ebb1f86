-- One row per model request; written in batches by the usage writer.
CREATE TABLE IF NOT EXISTS usage_logs (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL,
    trace_id          TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    model_alias       TEXT NOT NULL,
    provider          TEXT NOT NULL,
    upstream_model    TEXT NOT NULL,
    stream            INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    cost_usd          REAL,
    latency_ms        REAL NOT NULL,
    ttft_ms           REAL,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    created_at_ms     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_logs_tenant_time ON usage_logs (tenant_id, created_at_ms);
CREATE INDEX IF NOT EXISTS usage_logs_trace ON usage_logs (trace_id);
