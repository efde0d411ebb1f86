#!/usr/bin/env bash
# Experiment (2026-12-04): who holds CPU 0 at c=1 pinned, and for how long at a time.
# Starts switchyard-mock and a Switchyard build pinned to CPU 0 (a SQLite database in a temp
# dir, bench/gateway-config), runs wrk -c1 pinned for 12 s and records 3 s of scheduler events
# on CPU 0 in its middle (perf sched), then prints wrk's latencies and, per thread, the lengths
# of its runs on the CPU: how many ran longer than 100 µs and by how much in all.
# Not niced and not checked for foreign load, unlike bench/run.sh.
#
#   bench/tools/sched_pinned.sh [BIN] ["ENV=VALUE ..."]     # PERF=0: wrk only
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
B="${CARGO_TARGET_DIR:-$ROOT/target}/release"
BIN="${1:-$B/switchyard}"; ENVS="${2:-}"; DIR="$(mktemp -d)"
"$ROOT/bench/gateway-config" 18091 18090 "$DIR/sy.db" >"$DIR/switchyard.toml"
taskset -c 0 "$B/switchyard-mock" --listen 127.0.0.1:18090 --threads 1 >/dev/null 2>&1 & M=$!
# shellcheck disable=SC2086
env $ENVS taskset -c 0 "$BIN" --config "$DIR/switchyard.toml" serve >"$DIR/sy.log" 2>&1 & S=$!
trap 'kill $S $M 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
sleep 1.5
URL=http://127.0.0.1:18091/v1/chat/completions
taskset -c 0 wrk -t1 -c1 -d3s -s "$ROOT/bench/chat.lua" $URL >/dev/null
taskset -c 0 wrk -t1 -c1 -d12s --latency -s "$ROOT/bench/chat.lua" $URL >"$DIR/wrk.out" & W=$!
sleep 4
[ "${PERF:-1}" = 1 ] && perf sched record -C 0 -o "$DIR/sched.data" -- sleep 3 >/dev/null 2>&1
wait $W
grep BENCH "$DIR/wrk.out" | sed 's/ errs_connect.*//'
[ "${PERF:-1}" = 1 ] || exit 0
perf sched timehist -i "$DIR/sched.data" 2>/dev/null | python3 -c '
import sys, collections
runs = collections.defaultdict(list)
for line in list(sys.stdin)[3:]:
    f = line.split()
    try: runs[f[2]].append(float(f[-1]) * 1000)
    except (IndexError, ValueError): pass
for t, v in sorted(runs.items(), key=lambda kv: -sum(kv[1]))[:8]:
    v.sort(); n = len(v); long = [r for r in v if r > 100]
    print(f"{t:34s} runs={n:6d} p50={v[n//2]:5.0f} p99={v[int(n*.99)]:6.0f} max={v[-1]:6.0f} µs  "
          f"sum={sum(v)/1000:7.1f} ms  >100µs: {len(long):5d}, {sum(r-100 for r in long)/1000:5.1f} ms beyond")
'
