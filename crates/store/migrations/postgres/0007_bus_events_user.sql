-- The user a trace's request acted for, so that a `user` credential can read
-- the traces of its own requests that belong to no session, and erasing a
-- user erases them too.
ALTER TABLE bus_events ADD COLUMN user_id TEXT;
CREATE INDEX IF NOT EXISTS bus_events_user ON bus_events (tenant_id, user_id) WHERE user_id IS NOT NULL;
