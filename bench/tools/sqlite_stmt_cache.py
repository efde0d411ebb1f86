#!/usr/bin/env python3
"""Experiment: memory held by cached multi-row INSERT statements in SQLite.

Switchyard's usage writer builds one `INSERT ... VALUES (16 binds), (...), ...` per batch (1..512 rows,
whatever was queued), so nearly every batch is a new SQL text; sqlx keeps up to 100 prepared statements
per connection. This reproduces that pattern with Python's sqlite3 (its statement cache is also 100) and
prints the process RSS: same-size batches vs sizes 1..512 vs 1..32.   python3 bench/tools/sqlite_stmt_cache.py
"""
import os
import random
import sqlite3
import tempfile


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024


path = os.path.join(tempfile.mkdtemp(prefix="sy-stmt-"), "u.db")
db = sqlite3.connect(path, cached_statements=100)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE u (a TEXT,b TEXT,c TEXT,d TEXT,e TEXT,f TEXT,g TEXT,h INT,i INT,j INT,k REAL,l REAL,m REAL,n INT,o TEXT,p INT)")
row = ("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "default", "fe134bfafb85d1b9e868a76f235b62a4", "chat", "gpt-4o-mini",
       "mock", "gpt-4o-mini", 0, 4, 7, None, 1.6, None, 200, None, 1763900000000)
random.seed(1)
print(f"start: {rss():.1f} MiB")
for label, sizes in (("100 batches of 512 rows (one SQL text)", [512] * 100),
                     ("300 batches of 1..512 rows (many SQL texts)", [random.randint(1, 512) for _ in range(300)]),
                     ("300 batches of 1..32 rows", [random.randint(1, 32) for _ in range(300)])):
    for n in sizes:
        db.execute("INSERT INTO u VALUES " + ",".join(["(" + ",".join(["?"] * 16) + ")"] * n), row * n)
    db.commit()
    print(f"after {label}: {rss():.1f} MiB")
db.close()
for suffix in ("", "-wal", "-shm"):
    try:
        os.remove(path + suffix)
    except FileNotFoundError:
        pass
os.rmdir(os.path.dirname(path))
