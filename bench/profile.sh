#!/usr/bin/env bash
# CPU profile of Switchyard under load: perf (software cpu-clock event, works in this VM) with DWARF
# call graphs, while wrk drives it through switchyard-mock. Prints the split by thread and by
# subsystem (inclusive %, from the call graphs). Bounded: wrk -d and perf -- sleep.
#
#   bench/profile.sh                       # c=64 unpinned, 6 s
#   C=1 PIN=0 bench/profile.sh             # c=1 with wrk, mock and Switchyard on CPU 0
#   SY_ENV="RUST_LOG=warn" bench/profile.sh
# Output: bench/results/profile-<ts>/{perf.data,children.txt,summary.txt}
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
C="${C:-64}"; SECS="${SECS:-6}"; PIN="${PIN:-}"; SY_ENV="${SY_ENV:-}"
MOCK_PORT="${MOCK_PORT:-18190}"; SY_PORT="${SY_PORT:-18191}"
OUT="$HERE/results/profile-$(date +%Y%m%d-%H%M%S)"
BIN="${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"   # BIN=dir profiles another build (switchyard and switchyard-mock in it)
command -v perf >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
command -v wrk >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
mkdir -p "$OUT"
MOCK_PID=""; SY_PID=""
cleanup() { for p in $SY_PID $MOCK_PID; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
"$HERE/gateway-config" "$SY_PORT" "$MOCK_PORT" "$OUT/sy.db" >"$OUT/switchyard.toml"
"$BIN/switchyard-mock" --listen "127.0.0.1:$MOCK_PORT" --threads 1 >"$OUT/mock.log" 2>&1 & MOCK_PID=$!
# shellcheck disable=SC2086
env $SY_ENV "$BIN/switchyard" --config "$OUT/switchyard.toml" serve >"$OUT/switchyard.log" 2>&1 & SY_PID=$!
for _ in $(seq 1 50); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$SY_PORT/health" && break; sleep 0.2; done
pre=()
if [ -n "$PIN" ]; then taskset -a -pc "$PIN" "$MOCK_PID" >/dev/null; taskset -a -pc "$PIN" "$SY_PID" >/dev/null; pre=(taskset -c "$PIN"); fi
t=$(( C < 2 ? C : 2 ))
"${pre[@]}" wrk -t"$t" -c"$C" -d3s -s "$HERE/chat.lua" "http://127.0.0.1:$SY_PORT/v1/chat/completions" >/dev/null  # warm-up
perf record -F 999 -g --call-graph dwarf,8192 -p "$SY_PID" -o "$OUT/perf.data" -- sleep "$SECS" >"$OUT/perf-record.log" 2>&1 &
PERF=$!
sleep 0.3
"${pre[@]}" wrk -t"$t" -c"$C" -d"$((SECS - 1))s" -s "$HERE/chat.lua" "http://127.0.0.1:$SY_PORT/v1/chat/completions" | grep BENCH | tee "$OUT/wrk.txt"
wait "$PERF" || true
set +e +o pipefail   # reporting only from here (head closes pipes early; greps may match nothing)
perf report -i "$OUT/perf.data" --children --sort sym --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' >"$OUT/children.txt"
{
  echo "# c=$C pin=${PIN:-none} SY_ENV='$SY_ENV' $(cat "$OUT/wrk.txt")"
  echo "## by thread (self %)"
  perf report -i "$OUT/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
  echo "## by object (self %)"
  perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | grep -v '^ *|\|--' | head -8
  echo "## inclusive % of samples whose call chain contains..."
  for p in 'hyper::proto::h1::role::Server' 'hyper::proto::h1::role::Client' 'reqwest::' 'switchyard_providers' \
           'switchyard_server::routes' 'switchyard_engine' 'tracing_subscriber' 'tracing_appender' 'sqlx' 'sqlite3_step' \
           'metrics_exporter_prometheus' 'serde_json::de' 'serde_json::ser' 'url::parser' 'malloc' 'mi_malloc' 'mi_free' \
           'entry_SYSCALL_64' 'tcp_sendmsg' 'tcp_recvmsg' 'futex' 'epoll_wait'; do
    printf '  %-32s %s\n' "$p" "$(grep -F -- "$p" "$OUT/children.txt" | head -1 | awk '{print $1}')"
  done
} | tee "$OUT/summary.txt"
