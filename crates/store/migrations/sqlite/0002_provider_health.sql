-- One row per deployment (provider/model): passive statistics, breaker state
-- and the last active probe, written periodically by every instance.
CREATE TABLE IF NOT EXISTS provider_health (
    deployment         TEXT PRIMARY KEY,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    breaker_state      TEXT NOT NULL,
    p50_ms             REAL,
    p95_ms             REAL,
    error_rate         REAL NOT NULL,
    window_calls       INTEGER NOT NULL,
    total_calls        INTEGER NOT NULL,
    total_errors       INTEGER NOT NULL,
    last_error         TEXT,
    last_error_at_ms   INTEGER,
    last_success_at_ms INTEGER,
    last_probe_at_ms   INTEGER,
    last_probe_ok      INTEGER,
    last_probe_ms      REAL,
    updated_at_ms      INTEGER NOT NULL
);
