-- One row per deployment (provider/model): passive statistics, breaker state
-- and the last active probe, written periodically by every instance.
CREATE TABLE IF NOT EXISTS provider_health (
    deployment         TEXT PRIMARY KEY,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    breaker_state      TEXT NOT NULL,
    p50_ms             DOUBLE PRECISION,
    p95_ms             DOUBLE PRECISION,
    error_rate         DOUBLE PRECISION NOT NULL,
    window_calls       BIGINT NOT NULL,
    total_calls        BIGINT NOT NULL,
    total_errors       BIGINT NOT NULL,
    last_error         TEXT,
    last_error_at_ms   BIGINT,
    last_success_at_ms BIGINT,
    last_probe_at_ms   BIGINT,
    last_probe_ok      BOOLEAN,
    last_probe_ms      DOUBLE PRECISION,
    updated_at_ms      BIGINT NOT NULL
);
