#!/usr/bin/env bash
# Experiment (2026-12-04): does the SQLite WAL stay bounded under steady load?
# Starts switchyard-mock and a Switchyard build, all pinned to CPU 0, then runs
# wrk at c=1 six times for 8 s back to back, printing its figures and the WAL's
# size after each run.
#
#   bench/tools/long_wal.sh [BIN [LABEL]]   # default: target/release/switchyard
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
B="${CARGO_TARGET_DIR:-$ROOT/target}/release"
BINX="${1:-$B/switchyard}"; L="${2:-switchyard}"
DIR="$(mktemp -d)"
"$ROOT/bench/gateway-config" 18091 18090 "$DIR/sy.db" >"$DIR/switchyard.toml"
"$B/switchyard-mock" --listen 127.0.0.1:18090 --threads 1 >/dev/null 2>&1 & M=$!
"$BINX" --config "$DIR/switchyard.toml" serve >"$DIR/sy.log" 2>&1 & S=$!
trap 'kill $S $M 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
sleep 1.5
taskset -a -pc 0 $M >/dev/null; taskset -a -pc 0 $S >/dev/null
URL=http://127.0.0.1:18091/v1/chat/completions
taskset -c 0 wrk -t1 -c1 -d2s -s "$ROOT/bench/chat.lua" $URL >/dev/null
for i in 1 2 3 4 5 6; do
  printf '%s run%d ' "$L" $i
  taskset -c 0 wrk -t1 -c1 -d8s --latency -s "$ROOT/bench/chat.lua" $URL | grep BENCH | sed 's/ errs_connect.*//' | tr -d '\n'
  echo " wal=$(( $(stat -c %s $DIR/sy.db-wal 2>/dev/null || echo 0) / 1048576 ))MB"
done
