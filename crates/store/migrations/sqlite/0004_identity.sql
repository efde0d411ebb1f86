-- Tenants, their users, API keys (hash only) and the audit trail.
CREATE TABLE IF NOT EXISTS tenants (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL,
    monthly_budget_usd REAL,
    limits             TEXT NOT NULL DEFAULT '{}',
    created_at_ms      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    tenant_id     TEXT NOT NULL,
    id            TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE IF NOT EXISTS api_keys (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL,
    name              TEXT NOT NULL,
    role              TEXT NOT NULL,
    user_id           TEXT,
    prefix            TEXT NOT NULL,
    key_hash          TEXT NOT NULL UNIQUE,
    limits            TEXT NOT NULL DEFAULT '{}',
    signing_secrets   TEXT,
    require_signature INTEGER NOT NULL DEFAULT 0,
    expires_at_ms     INTEGER,
    revoked_at_ms     INTEGER,
    created_at_ms     INTEGER NOT NULL,
    created_by        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id, created_at_ms);
CREATE TABLE IF NOT EXISTS audit_logs (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT,
    detail        TEXT NOT NULL DEFAULT '{}',
    trace_id      TEXT,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_logs_tenant_time ON audit_logs (tenant_id, created_at_ms);
-- Who spent it: budgets are per key as well as per tenant.
ALTER TABLE usage_logs ADD COLUMN key_id TEXT;
ALTER TABLE usage_logs ADD COLUMN user_id TEXT;
CREATE INDEX IF NOT EXISTS usage_logs_key_time ON usage_logs (key_id, created_at_ms) WHERE key_id IS NOT NULL;
