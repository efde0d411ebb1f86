#!/usr/bin/env bash
# What a proxy cannot go below on this machine: Switchyard against the cheapest proxies its
# stack can build (crates/testkit/examples/floor-proxy.rs), each in the gateway's place in
# bench/run.sh (same mock, same wrk, same pinning), alternating, ROUNDS rounds.
#
#   bench/floor.sh                                  # PHASES="pinned c64", REPS=2, ROUNDS=2: ~12 min
#   FLOORS="switchyard raw-ct" ROUNDS=3 bench/floor.sh
#
# Proxies (FLOORS):
#   switchyard  the release build, its benchmark config (usage rows, trace events, logs on)
#   hyper       axum server + hyper-util pooled client, 2 tokio workers, nothing else
#   hyper-ct    the same on one current_thread runtime
#   hyper-rawclient  axum server + an upstream client with no HTTP library (pooled
#               connections owned by one request at a time), 2 tokio workers
#   raw-ct      no HTTP library: head and body relayed over one upstream connection per
#               client connection, current_thread
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
TS="$(date +%Y%m%d-%H%M%S)"
BASE="$HERE/results/floor-$TS"
export REPS="${REPS:-2}"
FLOORS="${FLOORS:-switchyard hyper hyper-ct raw-ct}"
FLOOR_BIN="${FLOOR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/floor-proxy}"
if [ ! -x "$FLOOR_BIN" ]; then
  echo "building $FLOOR_BIN" >&2
  (cd "$ROOT" && cargo build --release -p switchyard-testkit --example floor-proxy)
fi
mkdir -p "$BASE"; cp "$FLOOR_BIN" "$BASE/floor-proxy"
declare -A CMDS=(
  [switchyard]=""
  [hyper]="$BASE/floor-proxy --mode hyper --threads 2"
  [hyper-ct]="$BASE/floor-proxy --mode hyper --threads 0"
  [hyper-rawclient]="$BASE/floor-proxy --mode hyper-raw-client --threads 2"
  [raw-ct]="$BASE/floor-proxy --mode raw --threads 0"
)
dirs=()
for round in $(seq 1 "${ROUNDS:-2}"); do
  for f in $FLOORS; do
    [ -n "${CMDS[$f]+x}" ] || { echo "unknown proxy $f" >&2; exit 2; }
    echo "== $f (round $round)" >&2
    cmd="${CMDS[$f]}"; [ -n "$cmd" ] && cmd="$cmd --listen 127.0.0.1:@SY_PORT@ --upstream 127.0.0.1:@MOCK_PORT@"
    OUT_DIR="$BASE/$f-$round" PHASES="${PHASES:-pinned c64}" SY_CMD="$cmd" "$HERE/run.sh" >"$BASE/$f-$round.log" 2>&1 || echo "$f failed (see $BASE/$f-$round.log)"
    dirs+=("$BASE/$f-$round")
  done
done
python3 "$HERE/compare.py" "${dirs[@]}" | tee "$BASE/compare.md"
