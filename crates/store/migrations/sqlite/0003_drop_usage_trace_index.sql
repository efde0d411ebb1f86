-- Nothing looks usage rows up by trace (a trace's story is in its events),
-- and an index on a random key made every usage batch rewrite hundreds of
-- scattered index pages: it was most of the SQLite writer's cost under load.
DROP INDEX IF EXISTS usage_logs_trace;
