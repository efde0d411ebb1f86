-- Bots, sessions with their JSON state, messages, the events of each trace
-- and idempotency records. JSON columns are TEXT, as in SQLite, so both
-- backends hold what was written; ids are UUIDv7 strings, so ordering by id
-- orders by time. Session state is merged as jsonb by sy_json_merge_patch.
CREATE TABLE IF NOT EXISTS bots (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    name           TEXT NOT NULL,
    model          TEXT NOT NULL,
    system_prompt  TEXT,
    temperature    DOUBLE PRECISION,
    max_tokens     BIGINT,
    context_tokens BIGINT,
    metadata       TEXT NOT NULL DEFAULT '{}',
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS bots_tenant ON bots (tenant_id, id);

CREATE TABLE IF NOT EXISTS sessions (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL,
    bot_id        TEXT,
    user_id       TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',
    state         TEXT NOT NULL DEFAULT '{}',
    state_version BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_tenant ON sessions (tenant_id, id);
CREATE INDEX IF NOT EXISTS sessions_tenant_user ON sessions (tenant_id, user_id, id);

CREATE TABLE IF NOT EXISTS messages (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL,
    session_id        TEXT NOT NULL,
    role              TEXT NOT NULL,
    content           TEXT NOT NULL,
    status            TEXT NOT NULL,
    finish_reason     TEXT,
    error_code        TEXT,
    error_message     TEXT,
    model             TEXT,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    cost_usd          DOUBLE PRECISION,
    latency_ms        DOUBLE PRECISION,
    trace_id          TEXT,
    instance_id       TEXT,
    frames            TEXT,
    created_at_ms     BIGINT NOT NULL,
    updated_at_ms     BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_session ON messages (tenant_id, session_id, id);
CREATE INDEX IF NOT EXISTS messages_streaming ON messages (instance_id, updated_at_ms) WHERE status = 'streaming';

-- One row per trace and batch (usually a whole request) with its events
-- as a JSON array. Rows are appended; the trace index grows at its end for
-- the trace ids Switchyard makes (they start with the time), so writing
-- the events of every request stays cheap.
CREATE TABLE IF NOT EXISTS bus_events (
    tenant_id     TEXT NOT NULL,
    trace_id      TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    id            TEXT NOT NULL,
    session_id    TEXT,
    created_at_ms BIGINT NOT NULL,
    events        TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS bus_events_trace ON bus_events (tenant_id, trace_id, seq, id);
CREATE INDEX IF NOT EXISTS bus_events_session ON bus_events (tenant_id, session_id) WHERE session_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant_id        TEXT NOT NULL,
    key              TEXT NOT NULL,
    request_hash     TEXT NOT NULL,
    user_id          TEXT,
    status           TEXT NOT NULL,
    response_status  BIGINT,
    response_headers TEXT,
    response_body    BYTEA,
    created_at_ms    BIGINT NOT NULL,
    locked_until_ms  BIGINT NOT NULL,
    expires_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at_ms);

-- RFC 7396 JSON Merge Patch, as SQLite's json_patch() does it: a patch that
-- is not an object replaces the target; an object patch merges key by key
-- into the target (or into {} if the target is not an object), recursively,
-- and a null value removes the key.
CREATE OR REPLACE FUNCTION sy_json_merge_patch(target jsonb, patch jsonb)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    result jsonb;
    k      text;
    v      jsonb;
BEGIN
    IF patch IS NULL OR jsonb_typeof(patch) <> 'object' THEN
        RETURN patch;
    END IF;
    IF target IS NOT NULL AND jsonb_typeof(target) = 'object' THEN
        result := target;
    ELSE
        result := '{}'::jsonb;
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM jsonb_each(patch) AS e LOOP
        IF jsonb_typeof(v) = 'null' THEN
            result := result - k;
        ELSE
            result := result || jsonb_build_object(k, sy_json_merge_patch(result -> k, v));
        END IF;
    END LOOP;
    RETURN result;
END
$$;
