-- Retention ([retention] in the configuration) deletes the oldest rows of
-- the logs that grow with traffic, a batch at a time. usage_logs needs no
-- index for it (its ids are UUIDv7, time-ordered, and its primary key is
-- their index); these two tables get one on their time, so that a batch
-- reads only the rows it deletes. Written only for requests that have a
-- session or a non-plain trace (bus_events), or by admin actions (audit_logs).
CREATE INDEX IF NOT EXISTS bus_events_time ON bus_events (created_at_ms);
CREATE INDEX IF NOT EXISTS audit_logs_time ON audit_logs (created_at_ms);
