#!/usr/bin/env bash
# Database bytes per plain chat request: 5 s of wrk (c=4, unpinned) through
# a Switchyard build and switchyard-mock, a graceful stop (the writers flush),
# then the SQLite file's size after a TRUNCATE checkpoint and VACUUM, divided
# by the usage rows. Prints both tables' row counts.
#
#   bench/tools/db_bytes.sh [SWITCHYARD_BINARY]   # default: the release build
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
B="${CARGO_TARGET_DIR:-$ROOT/target}/release"; BINX="${1:-$B/switchyard}"
DIR="$(mktemp -d)"
"$ROOT/bench/gateway-config" 18091 18090 "$DIR/sy.db" >"$DIR/switchyard.toml"
"$B/switchyard-mock" --listen 127.0.0.1:18090 --threads 1 >/dev/null 2>&1 & M=$!
"$BINX" --config "$DIR/switchyard.toml" serve >"$DIR/sy.log" 2>&1 & S=$!
trap 'kill $S $M 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
sleep 1.5
wrk -t2 -c4 -d5s -s "$ROOT/bench/chat.lua" http://127.0.0.1:18091/v1/chat/completions | grep BENCH | cut -c1-60
kill -TERM $S; wait $S || true
python3 - "$DIR/sy.db" <<'PY'
import sqlite3, os, sys
p = sys.argv[1]
c = sqlite3.connect(p)
n = c.execute("select count(*) from usage_logs").fetchone()[0]
e = c.execute("select count(*) from bus_events").fetchone()[0]
c.execute("PRAGMA wal_checkpoint(TRUNCATE)"); c.execute("VACUUM")
size = os.path.getsize(p)
print(f"usage rows {n}, bus_events rows {e}, database {size/n:.0f} bytes per request after VACUUM")
PY
