#!/usr/bin/env python3
"""Experiment (2026-12-04): WAL and database bytes per plain chat request for
other layouts of the two rows each request writes (its usage row and its
trace-event row), with Python's sqlite3 (the same SQLite file format; times
are Python's, not Switchyard's, so only the byte counts mean much).

Layouts: an events row per request (rowid tables, `id TEXT PRIMARY KEY`, the
unique trace index; shipped until 2026-12-04); both tables WITHOUT ROWID (no
separate key B-trees); the same tables with a shorter events array (no
per-event id or timestamp); and no events row, the plain trace's times in the
usage row (`trace_ms` and its partial index, shipped since migration 0008).
Rows go in transactions of 200, like the writers' 10 ms batches at c=1.

    bench/tools/sqlite_layout.py [ROWS]      # default 60000, ~1 min
"""
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid

EVENTS = (
    '[{"id":"01a23eab-0f35-719d-9921-6e46acb4672b","seq":0,"kind":"request.received",'
    '"payload":{"endpoint":"chat","model":"gpt-4o-mini","stream":false},"created_at_ms":1796347727669},'
    '{"id":"01a23eab-0f35-719d-9921-6e4837449936","seq":1,"kind":"provider.attempt",'
    '"payload":{"deployment":"mock/gpt-4o-mini","attempt":1},"created_at_ms":1796347727669},'
    '{"id":"01a23eab-0f35-719d-9921-6e49725cfca2","seq":2,"kind":"request.done",'
    '"payload":{"status":200,"provider":"mock","latency_ms":3.4007270000000003,"ttft_ms":null,'
    '"error":null,"prompt_tokens":4,"completion_tokens":7},"created_at_ms":1796347727669}]'
)
SHORT_EVENTS = (
    '[{"seq":0,"kind":"request.received","payload":{"endpoint":"chat","model":"gpt-4o-mini",'
    '"stream":false},"dt":0},{"seq":1,"kind":"provider.attempt","payload":{"deployment":'
    '"mock/gpt-4o-mini","attempt":1},"dt":0},{"seq":2,"kind":"request.done","payload":'
    '{"status":200,"provider":"mock","latency_ms":3.4007270000000003,"ttft_ms":null,'
    '"error":null,"prompt_tokens":4,"completion_tokens":7},"dt":3}]'
)
USAGE_COLUMNS = (
    "id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, trace_id TEXT NOT NULL, endpoint TEXT NOT NULL, "
    "model_alias TEXT NOT NULL, provider TEXT NOT NULL, upstream_model TEXT NOT NULL, "
    "stream INTEGER NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL, "
    "latency_ms REAL NOT NULL, ttft_ms REAL, status INTEGER NOT NULL, error_code TEXT, "
    "created_at_ms INTEGER NOT NULL, key_id TEXT, user_id TEXT"
)
EVENT_COLUMNS = (
    "tenant_id TEXT NOT NULL, trace_id TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, "
    "session_id TEXT, created_at_ms INTEGER NOT NULL, events TEXT NOT NULL, user_id TEXT"
)


def uuid7():
    ms = int(time.time() * 1000)
    r = random.getrandbits(74)
    return str(uuid.UUID(int=(ms << 80) | (7 << 76) | ((r >> 62) << 64) | (2 << 62) | (r & ((1 << 62) - 1))))


def schema(c, without_rowid):
    w = " WITHOUT ROWID" if without_rowid else ""
    c.executescript(
        f"CREATE TABLE usage_logs ({USAGE_COLUMNS}){w};"
        "CREATE INDEX usage_logs_tenant_time ON usage_logs (tenant_id, created_at_ms);"
        "CREATE INDEX usage_logs_key_time ON usage_logs (key_id, created_at_ms) WHERE key_id IS NOT NULL;"
        "ALTER TABLE usage_logs ADD COLUMN trace_ms TEXT;"
        "CREATE INDEX usage_logs_trace ON usage_logs (tenant_id, trace_id) WHERE trace_ms IS NOT NULL;"
    )
    if without_rowid:
        c.execute(f"CREATE TABLE bus_events ({EVENT_COLUMNS}, PRIMARY KEY (tenant_id, trace_id, seq, id)) WITHOUT ROWID")
    else:
        c.execute(f"CREATE TABLE bus_events ({EVENT_COLUMNS})")
        c.execute("CREATE UNIQUE INDEX bus_events_trace ON bus_events (tenant_id, trace_id, seq, id)")
    c.executescript(
        "CREATE INDEX bus_events_session ON bus_events (tenant_id, session_id) WHERE session_id IS NOT NULL;"
        "CREATE INDEX bus_events_user ON bus_events (tenant_id, user_id) WHERE user_id IS NOT NULL;"
    )


def run(name, without_rowid, events, n, batch=200):
    d = tempfile.mkdtemp()
    path = os.path.join(d, "db.sqlite")
    c = sqlite3.connect(path, isolation_level=None)
    for p in ("journal_mode=WAL", "synchronous=NORMAL", "wal_autocheckpoint=0"):
        c.execute(f"PRAGMA {p}")
    schema(c, without_rowid)
    # Trace ids start with the time, like Switchyard's.
    rows = [(uuid7(), f"{int(time.time() * 1000):012x}{random.getrandbits(80):020x}") for _ in range(n)]
    start = time.perf_counter()
    for b in range(0, n, batch):
        group = rows[b : b + batch]
        now = int(time.time() * 1000)
        c.execute("BEGIN IMMEDIATE")
        for i, t in group:
            trace = None if events else f"{now},0,3"
            c.execute(
                "INSERT INTO usage_logs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (i, "default", t, "chat", "gpt-4o-mini", "mock", "gpt-4o-mini", 0, 4, 7, None, 3.4, None, 200, None, now, None, None, trace),
            )
        c.execute("COMMIT")
        if not events:
            continue
        c.execute("BEGIN IMMEDIATE")
        for i, t in group:
            c.execute(
                "INSERT INTO bus_events VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                ("default", t, 0, i, None, now, events, None),
            )
        c.execute("COMMIT")
    secs = time.perf_counter() - start
    wal = os.path.getsize(path + "-wal")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db = os.path.getsize(path)
    c.close()
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    os.rmdir(d)
    print(f"| {name} | {wal / n:,.0f} | {db / n:,.0f} | {secs / n * 1e6:.1f} |")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60000
    print("| layout | WAL bytes per request | database bytes per request | Python µs per request (its rows) |")
    print("|---|---|---|---|")
    for _ in range(2):
        run("an events row per request (before)", False, EVENTS, n)
        run("WITHOUT ROWID", True, EVENTS, n)
        run("shorter events array", False, SHORT_EVENTS, n)
        run("plain trace in the usage row (now)", False, None, n)


if __name__ == "__main__":
    main()
