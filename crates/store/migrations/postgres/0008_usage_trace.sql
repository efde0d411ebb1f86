-- A plain request's trace (received, one attempt, done or error, outside any
-- session) is kept in its usage row: the three events' times in `trace_ms`
-- (`received,attempt-received,done-received`), everything else they say
-- being in the row already. That replaces a `bus_events` row (~900 bytes with
-- its index entry) with ~20 bytes and one entry in this index, which
-- `GET /v1/traces/{id}` reads; rows without a trace stay out of it. (Not the
-- name `usage_logs_trace`: an index on trace_id alone had it until 0003.)
ALTER TABLE usage_logs ADD COLUMN trace_ms TEXT;
CREATE INDEX IF NOT EXISTS usage_logs_plain_trace ON usage_logs (tenant_id, trace_id) WHERE trace_ms IS NOT NULL;
