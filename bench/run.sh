#!/usr/bin/env bash
# Switchyard overhead benchmark: direct-to-mock vs through Switchyard, both against the
# same switchyard-mock, usage logging ON (SQLite), JSON request log to a file.
#
#   bench/run.sh                         # everything, ~5 min; results in bench/results/<ts>/
#   PHASES="pinned" REPS=2 bench/run.sh  # a subset
#   LABEL=logwarn SY_ENV="RUST_LOG=warn" bench/run.sh                         # a variant
#   LABEL=nousage SY_ENV="SWITCHYARD_USAGE__ENABLED=false" bench/run.sh       # another
#   WRK_API_KEY=K LABEL=auth SY_ENV="SWITCHYARD_ADMIN_KEY=K SWITCHYARD_RATE_LIMITS__CLASSES__CHAT=10000000/min SWITCHYARD_RATE_LIMITS__CLASSES__GLOBAL=10000000/min" PHASES="pinned c64" bench/run.sh
#                                        # with an API key (K, >= 32 chars) and rate limits on (bench/auth.sh for the per-check cost)
#   LABEL=nodelay SY_NODELAY_PRELOAD=1 bench/run.sh    # experiment: TCP_NODELAY on accepted sockets
#   WRITER_CPU=1 PHASES=pinned bench/run.sh   # NOT the issue's setup: the database threads (usage and
#                                        # events writers, sqlx's SQLite workers) moved to CPU 1 in the pinned phases
#   WRITER_SLICE_US=20000 PHASES=pinned bench/run.sh   # experiment: the same threads given a 20 ms EEVDF
#                                        # slice (tools/slice.py) in the pinned phases, the default slice elsewhere
#   REBUILD=1 bench/run.sh               # cargo build --release first (a no-op when up to date)
#   SY_BIN=/path/to/switchyard bench/run.sh   # measure another build of the gateway (same mock)
#   SY_CMD="PROG --listen 127.0.0.1:@SY_PORT@ --upstream 127.0.0.1:@MOCK_PORT@" bench/run.sh
#                                        # measure another proxy in the gateway's place (bench/floor.sh)
#
# Phases (PHASES, any order is run in this order):
#   pinned   c=1 non-streaming, wrk + Switchyard + mock all on CPU $PIN_CPU: p50/p90/p99, added p50/p99
#   ttfb     c=1 streaming, pinned: time to the first `data:` chunk (bench/ttfb.py, N=$TTFB_N)
#   c64      c=$C_HIGH unpinned non-streaming: req/s direct vs gateway, Switchyard CPU ms/request, RSS
#   stream64 c=$C_HIGH unpinned streaming (full SSE response, wrk): req/s direct vs gateway
# Each measured run is time-bounded (wrk -d, ttfb.py --max-seconds). Direct and gateway alternate,
# REPS repetitions, the report uses the median over repetitions.
#
# Contention control (this is a shared 2-vCPU VM): before each run wait up to WAIT_IDLE s (WAIT_TOTAL
# s over the whole run) for the machine to be quiet (busy <= IDLE_MAX % of one core); after each run compute the CPU that
# neither wrk/ttfb.py, the mock nor Switchyard used ("foreign") and re-run once (RETRIES) if it was
# above FOREIGN_MAX %. Foreign load seen is written to foreign.log and to raw.csv.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DURATION="${DURATION:-10}"        # seconds per wrk run
REPS="${REPS:-3}"
WARMUP="${WARMUP:-3}"             # seconds of warm-up per target and phase
TTFB_N="${TTFB_N:-2000}"
C_HIGH="${C_HIGH:-64}"
PIN_CPU="${PIN_CPU:-0}"
PRIO="${PRIO:--15}"               # niceness of wrk, mock and Switchyard (0 = leave alone)
MOCK_PORT="${MOCK_PORT:-18090}"
SY_PORT="${SY_PORT:-18091}"
PHASES="${PHASES:-pinned ttfb c64 stream64}"
WRITER_CPU="${WRITER_CPU:-}"      # set: the database threads go to this CPU in the pinned phases (see above)
WRITER_SLICE_US="${WRITER_SLICE_US:-}"  # set: the database threads' EEVDF slice (sched_setattr), pinned phases only
SY_ENV="${SY_ENV:-}"              # extra environment for Switchyard, e.g. "RUST_LOG=warn"
SY_NODELAY_PRELOAD="${SY_NODELAY_PRELOAD:-0}"  # 1 = experiment: LD_PRELOAD bench/tools/nodelay_preload.c
LABEL="${LABEL:-}"
WAIT_IDLE="${WAIT_IDLE:-180}"     # seconds we may wait for a quiet machine before one run...
WAIT_TOTAL="${WAIT_TOTAL:-900}"   # ...and over the whole run
IDLE_MAX="${IDLE_MAX:-25}"
FOREIGN_MAX="${FOREIGN_MAX:-30}"
RETRIES="${RETRIES:-1}"
WORK="${WORK:-/tmp/sy-bench}"
TS="$(date +%Y%m%d-%H%M%S)"
OUT="${OUT_DIR:-$HERE/results/$TS${LABEL:+-$LABEL}}"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
HZ="$(getconf CLK_TCK)"
NCPU="$(nproc)"
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
SBODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"stream":true}'
DIRECT_URL="http://127.0.0.1:$MOCK_PORT/v1/chat/completions"
GW_URL="http://127.0.0.1:$SY_PORT/v1/chat/completions"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- prerequisites
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v curl >/dev/null || need_apt+=(curl)
command -v taskset >/dev/null || need_apt+=(util-linux)
command -v top >/dev/null || need_apt+=(procps)
command -v python3 >/dev/null || need_apt+=(python3)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ "${REBUILD:-0}" = 1 ] || [ ! -x "$BIN/switchyard" ] || [ ! -x "$BIN/switchyard-mock" ]; then
  log "building release binaries (several minutes on 2 cores when anything changed)"
  # shellcheck source=../scripts/build-deps.sh
  source "$ROOT/scripts/build-deps.sh"
  ensure_build_deps || die "the build's dependencies (cmake, libclang, g++) are missing"
  (cd "$ROOT" && cargo build --release --bin switchyard --bin switchyard-mock)
fi
head_time=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)
if [ "$(date -r "$BIN/switchyard" +%s)" -lt "$head_time" ]; then
  log "WARNING: target/release/switchyard is older than the last commit; REBUILD=1 to measure HEAD"
fi

mkdir -p "$OUT/runs" "$WORK/bin"
# Run copies, so that a rebuild in the tree during the run cannot mix two versions.
# SY_BIN measures another build of the gateway (bench/variants.sh bins) against the same mock.
SY_SRC="${SY_BIN:-$BIN/switchyard}"
cp "$SY_SRC" "$WORK/bin/switchyard"; cp "$BIN/switchyard-mock" "$WORK/bin/"
BIN="$WORK/bin"
if [ "$SY_NODELAY_PRELOAD" = 1 ]; then
  command -v gcc >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null; }
  gcc -O2 -shared -fPIC -o "$WORK/nodelay.so" "$HERE/tools/nodelay_preload.c" -ldl
  SY_ENV="LD_PRELOAD=$WORK/nodelay.so $SY_ENV"
fi
RAW="$OUT/raw.csv"; META="$OUT/meta.env"; FOREIGN_LOG="$OUT/foreign.log"
echo "phase,target,rep,attempt,c,rps,p50_us,p90_us,p99_us,max_us,mean_us,reqs,errors,errs_status,errs_timeout,sy_cpu_ms,mock_cpu_ms,wall_s,foreign_pct,softirq_pct,steal_pct,pre_busy_pct,sy_rss_max_kb,usage_queue_max" >"$RAW"
: >"$META"
meta() { echo "$1=$2" >>"$META"; }
meta date "$(date -Is)"
meta host "$NCPU vCPU, $(uname -r), $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
meta wrk "$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
meta git "HEAD $(git -C "$ROOT" log -1 --format='%h %cI' 2>/dev/null || echo unknown) (changed files outside bench/: $(git -C "$ROOT" status --porcelain 2>/dev/null | grep -cv ' bench/' || true))"
meta binary "$SY_SRC, built $(date -r "$SY_SRC" -Is), sha256 $(sha256sum "$BIN/switchyard" | cut -c1-12)"
meta knobs "WRITER_CPU='$WRITER_CPU' WRITER_SLICE_US='$WRITER_SLICE_US' DURATION=${DURATION}s REPS=$REPS WARMUP=${WARMUP}s TTFB_N=$TTFB_N C_HIGH=$C_HIGH PIN_CPU=$PIN_CPU PRIO=$PRIO PHASES='$PHASES' SY_ENV='$SY_ENV' IDLE_MAX=$IDLE_MAX WAIT_IDLE=$WAIT_IDLE WAIT_TOTAL=$WAIT_TOTAL FOREIGN_MAX=$FOREIGN_MAX"

# ---------------------------------------------------------------- process control
MOCK_PID=""; SY_PID=""; SAMPLER_PID=""
stop_pid() {  # pid name: TERM, wait up to 10 s, then KILL (only our own PIDs)
  local pid=$1 i
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then log "$2 ($pid) still alive after 10 s: KILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  stop_pid "$SAMPLER_PID" sampler; stop_pid "$SY_PID" switchyard; stop_pid "$MOCK_PID" switchyard-mock
  [ $rc -ne 0 ] && log "exited with status $rc; partial results in $OUT"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() {  # url seconds
  local i; for ((i = 0; i < $2 * 10; i++)); do
    [ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$1" || true)" = 200 ] && return 0; sleep 0.1; done; return 1; }

cpu_ms() { [ -r "/proc/$1/stat" ] && awk -v hz="$HZ" '{sub(/^.*\) /, ""); printf "%d\n", ($12 + $13) * 1000 / hz}' "/proc/$1/stat" || echo 0; }
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
# busy (user+nice+system+irq), softirq, steal in ticks. softirq is kept apart: loopback packet processing
# lands there and is not charged to any process, so it is not "foreign" load.
sys_busy_steal() { awk '/^cpu /{print $2+$3+$4+$7, $8, $9}' /proc/stat; }
self_child_ms() { awk -v hz="$HZ" '{sub(/^.*\) /, ""); printf "%d\n", ($14 + $15) * 1000 / hz}' "/proc/$$/stat"; }
pin() {
  taskset -a -pc "$1" "$MOCK_PID" >/dev/null; taskset -a -pc "$1" "$SY_PID" >/dev/null
  [ -n "$WRITER_CPU$WRITER_SLICE_US" ] || return 0
  local t n moved="" tids=() slice=$WRITER_SLICE_US
  [ "$1" = "$PIN_CPU" ] || { [ -n "$WRITER_SLICE_US" ] || return 0; slice=0; }   # only while the pinned phases run
  for t in /proc/"$SY_PID"/task/*; do
    read -r n <"$t/comm" 2>/dev/null || continue
    case $n in sy-*-writer|sqlx-sqlite-wor*) tids+=("${t##*/}"); moved+=" $n";; esac
  done
  if [ -n "$WRITER_CPU" ] && [ "$1" = "$PIN_CPU" ]; then
    for t in "${tids[@]}"; do taskset -pc "$WRITER_CPU" "$t" >/dev/null; done
    log "  database threads on CPU $WRITER_CPU:${moved:- none found}"
  fi
  if [ -n "$WRITER_SLICE_US" ] && [ "${#tids[@]}" -gt 0 ]; then
    python3 "$HERE/tools/slice.py" "$slice" "${tids[@]}" >/dev/null
    log "  database threads' scheduler slice ${slice} µs (0: the default):$moved"
  fi
}

WAITED=0
wait_quiet() {  # sets PRE_BUSY (% of one core over 2 s); waits (bounded: WAIT_IDLE per run, WAIT_TOTAL in all)
  local a b here=0
  while :; do
    local sa sb
    read -r a sa _ < <(sys_busy_steal); sleep 2; read -r b sb _ < <(sys_busy_steal)
    PRE_BUSY=$(( (b + sb - a - sa) * 100 / (HZ * 2) ))
    [ "$PRE_BUSY" -le "$IDLE_MAX" ] && return 0
    { echo "--- $(date -Is) busy ${PRE_BUSY}% of a core before a run (waited ${WAITED}s so far)"; cat /proc/loadavg
      top -bn1 -o %CPU | sed -n '7,14p'; } >>"$FOREIGN_LOG"
    if [ "$here" -ge "$WAIT_IDLE" ] || [ "$WAITED" -ge "$WAIT_TOTAL" ]; then
      log "machine still busy (${PRE_BUSY}%) after waiting ${here}s (${WAITED}s in all); measuring anyway (recorded)"; return 0; fi
    [ "$here" = 0 ] && log "machine busy (${PRE_BUSY}% of a core, see foreign.log); waiting up to ${WAIT_IDLE}s"
    sleep 5; WAITED=$((WAITED + 7)); here=$((here + 7))
  done
}

start_sampler() {  # FILE METRICS: max VmRSS of Switchyard every 100 ms (bash builtins + sleep) and, once a second,
  # the usage writer's queue depth from /metrics (one curl), into $1 as "rss_kb queue_max"
  local f=$1 metrics=$2   # metrics=0: RSS only (pinned runs: no extra request on the measured CPU)
  ( max=0; qmax=0; i=0; while kill -0 "$SY_PID" 2>/dev/null; do
      while read -r k v _; do [ "$k" = VmRSS: ] && { [ "$v" -gt "$max" ] && max=$v; break; }; done <"/proc/$SY_PID/status"
      if [ "$metrics" = 1 ] && [ $((i % 10)) = 0 ]; then
        q=$(curl -s -m 1 "http://127.0.0.1:$SY_PORT/metrics" | awk '/^switchyard_usage_queue_depth /{printf "%d", $2}')
        [ -n "$q" ] && [ "$q" -gt "$qmax" ] && qmax=$q
      fi
      echo "$max $qmax" >"$f"; i=$((i + 1)); sleep 0.1; done ) &
  SAMPLER_PID=$!
}

# ---------------------------------------------------------------- one measured run
# measure PHASE TARGET REP C TOOL(wrk|ttfb) BODY PINNED(0|1)
measure() {
  local phase=$1 target=$2 rep=$3 c=$4 tool=$5 body=$6 pinned=$7
  local qmax=NA url t attempt=0 f pre=() s0 s1 sq0 sq1 softirq st0 st1 sy0 sy1 m0 m1 w0 w1 ts0 ts1 wall foreign steal line rssf rss_max=NA
  url=$DIRECT_URL; [ "$target" = gateway ] && url=$GW_URL
  t=$(( c < 2 ? c : 2 ))
  [ "$PRIO" != 0 ] && pre+=(nice -n "$PRIO")
  [ "$pinned" = 1 ] && pre+=(taskset -c "$PIN_CPU")
  while :; do
    attempt=$((attempt + 1))
    f="$OUT/runs/$phase-$target-r$rep-a$attempt.txt"
    wait_quiet
    rssf="$OUT/runs/.rss"; rm -f "$rssf"
    [ "$target" = gateway ] && start_sampler "$rssf" $((1 - pinned))
    read -r s0 sq0 st0 < <(sys_busy_steal); sy0=$(cpu_ms "$SY_PID"); m0=$(cpu_ms "$MOCK_PID"); w0=$(self_child_ms); ts0=$(date +%s%N)
    if [ "$tool" = wrk ]; then
      WRK_BODY="$body" "${pre[@]}" wrk -t"$t" -c"$c" -d"${DURATION}s" --timeout 10s --latency -s "$HERE/chat.lua" "$url" >"$f" 2>&1 || true
    else
      "${pre[@]}" python3 "$HERE/ttfb.py" "$url" -n "$TTFB_N" --warmup 200 --body "$body" --max-seconds 120 >"$f" 2>&1 || true
    fi
    ts1=$(date +%s%N); w1=$(self_child_ms); sy1=$(cpu_ms "$SY_PID"); m1=$(cpu_ms "$MOCK_PID"); read -r s1 sq1 st1 < <(sys_busy_steal)
    if [ -n "$SAMPLER_PID" ]; then stop_pid "$SAMPLER_PID" sampler; SAMPLER_PID=""; read -r rss_max qmax <"$rssf" 2>/dev/null || { rss_max=NA; qmax=NA; }; fi
    wall=$(( (ts1 - ts0) / 1000000 ))   # ms
    # foreign = all busy CPU minus Switchyard, mock and our finished children (wrk / ttfb.py), % of one core
    foreign=$(( ( (s1 - s0) * 1000 / HZ - (sy1 - sy0) - (m1 - m0) - (w1 - w0) ) * 100 / wall ))
    [ "$foreign" -lt 0 ] && foreign=0
    steal=$(( (st1 - st0) * 1000 / HZ * 100 / wall ))
    softirq=$(( (sq1 - sq0) * 1000 / HZ * 100 / wall ))
    if [ "$tool" = wrk ]; then line=$(grep '^BENCH' "$f" || true); else line=$(grep '^TTFB' "$f" || true); fi
    log "  $phase $target rep=$rep try=$attempt: ${line:-NO RESULT (see $f)} | sy_cpu=$((sy1 - sy0))ms foreign=${foreign}% softirq=${softirq}% steal=${steal}%"
    if [ "$foreign" -gt "$FOREIGN_MAX" ]; then
      { echo "--- $(date -Is) $phase $target rep=$rep try=$attempt: foreign CPU ${foreign}% of a core during the run"
        top -bn1 -o %CPU | sed -n '7,14p'; } >>"$FOREIGN_LOG"
      [ "$attempt" -le "$RETRIES" ] && { log "  foreign load ${foreign}% > ${FOREIGN_MAX}%: re-running once"; continue; }
    fi
    break
  done
  [ -z "$line" ] && { echo "$phase,$target,$rep,$attempt,$c,NA,,,,,,,,,,,,,$foreign,$softirq,$steal,$PRE_BUSY,$rss_max,$qmax" >>"$RAW"; return 0; }
  local rps p50 p90 p99 max mean reqs errs_connect=0 errs_read=0 errs_write=0 errs_status=0 errs_timeout=0 errors
  local n=0 non200=0 first_data_p50 hdr_p50 full_p50 full_p99 dones
  if [ "$tool" = wrk ]; then
    eval "$(sed 's/^BENCH //; s/ /;/g' <<<"$line")"
    errors=$((errs_connect + errs_read + errs_write + errs_status + errs_timeout))
  else
    eval "$(sed 's/^TTFB //; s/ /;/g' <<<"$line")"
    p50=$first_data_p50; reqs=$n; errs_status=$non200; errors=$((errors + non200))
    rps=$(awk -v n="$n" -v w="$wall" 'BEGIN{printf "%.1f", n * 1000 / w}')
    [ "$dones" != "$n" ] && log "  WARNING: only $dones of $n streams ended with data: [DONE]"
  fi
  [ "$errors" != 0 ] && log "  WARNING: $errors errors in $phase $target rep=$rep (see $f)"
  echo "$phase,$target,$rep,$attempt,$c,$rps,$p50,$p90,$p99,$max,$mean,$reqs,$errors,$errs_status,$errs_timeout,$((sy1 - sy0)),$((m1 - m0)),$(awk -v w="$wall" 'BEGIN{printf "%.2f", w/1000}'),$foreign,$softirq,$steal,$PRE_BUSY,$rss_max,$qmax" >>"$RAW"
}

warm() {  # C BODY PINNED
  local pre=() tgt url t=$(( $1 < 2 ? $1 : 2 ))
  [ "$PRIO" != 0 ] && pre+=(nice -n "$PRIO")
  [ "$3" = 1 ] && pre+=(taskset -c "$PIN_CPU")
  for url in "$DIRECT_URL" "$GW_URL"; do
    WRK_BODY="$2" "${pre[@]}" wrk -t"$t" -c"$1" -d"${WARMUP}s" --timeout 10s -s "$HERE/chat.lua" "$url" >>"$OUT/runs/warmup.txt" 2>&1 || true
  done
}

alternate() {  # PHASE C TOOL BODY PINNED: REPS x (direct, gateway), order flipped on even reps
  local rep
  for rep in $(seq 1 "$REPS"); do
    if [ $((rep % 2)) = 1 ]; then measure "$1" direct "$rep" "$2" "$3" "$4" "$5"; measure "$1" gateway "$rep" "$2" "$3" "$4" "$5"
    else measure "$1" gateway "$rep" "$2" "$3" "$4" "$5"; measure "$1" direct "$rep" "$2" "$3" "$4" "$5"; fi
  done
}

verify() {  # URL BODY PATTERN: must answer 200 and contain PATTERN
  local code
  code=$(curl -s -m 10 -o "$OUT/runs/verify.body" -w '%{http_code}' -H 'Content-Type: application/json' \
    -H "Authorization: Bearer ${WRK_API_KEY:-sk-bench-6f1c2a9e4b7d8035e1f2a3b4c5d6e7f8}" -d "$2" "$1" || true)
  [ "$code" = 200 ] && grep -q -- "$3" "$OUT/runs/verify.body" || die "verification failed for $1 (HTTP $code): $(head -c 300 "$OUT/runs/verify.body")"
}

# ---------------------------------------------------------------- start
log "results: $OUT"
{ echo "--- $(date -Is) before start"; cat /proc/loadavg; top -bn1 -o %CPU | sed -n '1,14p'; } >"$OUT/top-before.txt"
port_free "$MOCK_PORT" || die "port $MOCK_PORT is in use by something else"
port_free "$SY_PORT" || die "port $SY_PORT is in use by something else"

NICE=(); [ "$PRIO" != 0 ] && NICE=(nice -n "$PRIO")
"${NICE[@]}" "$BIN/switchyard-mock" --listen "127.0.0.1:$MOCK_PORT" --threads 1 >"$OUT/mock.log" 2>&1 &
MOCK_PID=$!
rm -f "$WORK"/switchyard.db "$WORK"/switchyard.db-wal "$WORK"/switchyard.db-shm
"$HERE/gateway-config" "$SY_PORT" "$MOCK_PORT" "$WORK/switchyard.db" >"$OUT/switchyard.toml"
# shellcheck disable=SC2086  # SY_ENV is a list of NAME=value words
if [ -n "${SY_CMD:-}" ]; then
  SY_CMD="${SY_CMD//@SY_PORT@/$SY_PORT}"; SY_CMD="${SY_CMD//@MOCK_PORT@/$MOCK_PORT}"
  meta sy_cmd "$SY_CMD"
  # shellcheck disable=SC2086  # SY_CMD is a command line
  env $SY_ENV "${NICE[@]}" $SY_CMD >"$OUT/switchyard.log" 2>"$OUT/switchyard.err" &
else
  env $SY_ENV "${NICE[@]}" "$BIN/switchyard" --config "$OUT/switchyard.toml" serve >"$OUT/switchyard.log" 2>"$OUT/switchyard.err" &
fi
SY_PID=$!
wait_http "http://127.0.0.1:$MOCK_PORT/v1/models" 30 || die "mock did not come up (see $OUT/mock.log)"
wait_http "http://127.0.0.1:$SY_PORT/health" 60 || die "switchyard did not come up (see $OUT/switchyard.log / .err)"
sleep 1
meta mock_pid "$MOCK_PID"; meta sy_pid "$SY_PID"
meta sy_threads_idle "$(ls "/proc/$SY_PID/task" | wc -l)"
meta rss_start_kb "$(status_kb "$SY_PID" VmRSS)"
meta mock_rss_start_kb "$(status_kb "$MOCK_PID" VmRSS)"

verify "$DIRECT_URL" "$BODY" '"object":"chat.completion"'
verify "$GW_URL" "$BODY" '"object":"chat.completion"'
verify "$DIRECT_URL" "$SBODY" 'data: \[DONE\]'
verify "$GW_URL" "$SBODY" 'data: \[DONE\]'
grep -q 'chat.completion.chunk' "$OUT/runs/verify.body" || die "gateway stream has no chat.completion.chunk"
sleep 1
meta rss_after_first_requests_kb "$(status_kb "$SY_PID" VmRSS)"

# ---------------------------------------------------------------- phases
for phase in pinned ttfb c64 stream64; do
  [[ " $PHASES " == *" $phase "* ]] || continue
  log "== phase $phase"
  meta "rss_before_${phase}_kb" "$(status_kb "$SY_PID" VmRSS)"
  case $phase in
    pinned)
      pin "$PIN_CPU"; warm 1 "$BODY" 1
      alternate pinned 1 wrk "$BODY" 1
      pin "0-$((NCPU - 1))" ;;
    ttfb)
      pin "$PIN_CPU"; warm 1 "$SBODY" 1
      alternate ttfb 1 ttfb "$SBODY" 1
      pin "0-$((NCPU - 1))" ;;
    c64)
      warm "$C_HIGH" "$BODY" 0
      alternate c64 "$C_HIGH" wrk "$BODY" 0
      meta rss_after_c64_kb "$(status_kb "$SY_PID" VmRSS)" ;;
    stream64)
      warm "$C_HIGH" "$SBODY" 0
      alternate stream64 "$C_HIGH" wrk "$SBODY" 0
      meta rss_after_stream64_kb "$(status_kb "$SY_PID" VmRSS)" ;;
  esac
done

sleep 2
meta rss_after_load_idle2s_kb "$(status_kb "$SY_PID" VmRSS)"
meta rss_hwm_kb "$(status_kb "$SY_PID" VmHWM)"
meta sy_threads_after "$(ls "/proc/$SY_PID/task" | wc -l)"
meta mock_rss_hwm_kb "$(status_kb "$MOCK_PID" VmHWM)"
meta sy_cpu_total_ms "$(cpu_ms "$SY_PID")"

curl -s -m 2 "http://127.0.0.1:$SY_PORT/metrics" >"$OUT/metrics-end.txt" || true
meta usage_metrics_at_end "$(grep -E '^switchyard_usage_(written|dropped)_total' "$OUT/metrics-end.txt" | tr '\n' ' ')"
# graceful stop: flushes the usage writer, then count what was logged and written
stop_pid "$SY_PID" switchyard; SY_PID=""
[ -f "$WORK/switchyard.db" ] && python3 - "$OUT/switchyard.log" "$WORK/switchyard.db" >>"$META" <<'PY'
import collections, json, sqlite3, sys
st = collections.Counter(); other = 0
for line in open(sys.argv[1], errors="replace"):
    try: j = json.loads(line)
    except ValueError: other += 1; continue
    if j.get("message") in ("request", "request failed", "request refused"):
        route = (j.get("span") or {}).get("route", "?")
        st[(route, j.get("status"))] += 1
print("log_request_lines_by_status=" + ";".join(f"{r} {s}:{n}" for (r, s), n in sorted(st.items(), key=str)))
print(f"log_non_json_lines={other}")
db = sqlite3.connect(sys.argv[2])
rows = db.execute("SELECT stream, status, count(*) FROM usage_logs GROUP BY stream, status").fetchall()
print("usage_rows_by_stream_status=" + ";".join(f"stream={s}/status={c}:{n}" for s, c, n in rows))
print("usage_rows_total=%d" % sum(r[2] for r in rows))
PY
grep -q '"level":"ERROR"\|"level":"WARN"' "$OUT/switchyard.log" && meta log_warn_error_lines "$(grep -c '"level":"ERROR"\|"level":"WARN"' "$OUT/switchyard.log")"
du -k "$OUT/switchyard.log" | awk '{print "log_size_kb=" $1}' >>"$META"

python3 "$HERE/report.py" "$OUT" | tee "$OUT/summary.md"
log "raw: $RAW   meta: $META   summary: $OUT/summary.md"
