#!/usr/bin/env bash
# Experiment (2026-12-02): does the c=1 pinned p99 come from the SQLite threads
# holding the CPU? Starts switchyard-mock and Switchyard pinned to CPU 0, then
# alternates the scheduling of Switchyard's sqlx-sqlite worker threads between
# normal, SCHED_IDLE and nice 19, 8 s of wrk at c=1 each, printing wrk's
# latencies and the writers' queue depth after each run. A growing queue means
# the writers did not keep up (rows would be dropped once it is full).
#
#   bench/tools/writer_priority.sh              # MODES="normal idle nice normal idle nice"
#   C=64 bench/tools/writer_priority.sh         # unpinned, concurrency 64
# Release binaries from target/release; a SQLite database in a temp dir.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
B="${CARGO_TARGET_DIR:-$ROOT/target}/release"; C="${C:-1}"; MODES="${MODES:-normal idle nice normal idle nice}"
DIR="$(mktemp -d)"
"$ROOT/bench/gateway-config" 18091 18090 "$DIR/sy.db" >"$DIR/switchyard.toml"
"$B/switchyard-mock" --listen 127.0.0.1:18090 --threads 1 >/dev/null 2>&1 & M=$!
"$B/switchyard" --config "$DIR/switchyard.toml" serve >"$DIR/sy.log" 2>&1 & S=$!
trap 'kill $S $M 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
sleep 1.5
pre=(); T=2
if [ "$C" = 1 ]; then taskset -a -pc 0 $M >/dev/null; taskset -a -pc 0 $S >/dev/null; pre=(taskset -c 0); T=1; fi
URL=http://127.0.0.1:18091/v1/chat/completions
"${pre[@]}" wrk -t$T -c"$C" -d3s -s "$ROOT/bench/chat.lua" $URL >/dev/null
for mode in $MODES; do
  for t in /proc/$S/task/*; do
    tid=$(basename "$t")
    case "$(cat "$t/comm")" in sqlx-sqlite*)
      case $mode in
        idle) chrt -i -p 0 "$tid" ;;
        nice) chrt -o -p 0 "$tid"; renice -n 19 -p "$tid" >/dev/null ;;
        *) chrt -o -p 0 "$tid"; renice -n 0 -p "$tid" >/dev/null ;;
      esac ;;
    esac
  done
  sleep 1
  printf '%-7s ' "$mode"
  "${pre[@]}" wrk -t$T -c"$C" -d8s -s "$ROOT/bench/chat.lua" $URL | grep BENCH | sed 's/ errs_connect.*//' | tr -d '\n'
  echo " usage queue=$(curl -s http://127.0.0.1:18091/metrics | grep -E '^switchyard_(usage|events)_queue_depth' | awk '{print $2}' | tr '\n' ' ')"
done
