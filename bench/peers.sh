#!/usr/bin/env bash
# Switchyard side by side with LiteLLM, Portkey and an nginx proxy, using the shared peer harness
# (/work/shared/bench-peers, read-only) and bench/peers-targets.conf.
#
#   bench/peers.sh                       # setup (a few minutes the first time), then two passes:
#                                        #   default: c=1 and c=64 unpinned, 2 reps x 10 s
#                                        #   pinned:  CONCS=1 PIN1=0 (wrk + gateway + mock on CPU 0)
#   SETUP=0 bench/peers.sh               # skip setup.sh (already installed)
#   ONLY="nginx-proxy switchyard" bench/peers.sh   # subset (baseline always kept), e.g. when a peer fails to install
#   PASSES="pinned" bench/peers.sh       # only one of the passes
# Results: bench/results/peers-<ts>/{default,c1-pinned}/{raw.csv,wrk.log,table.md,meta.txt}
# Every load run is wrk -d (bounded). Switchyard is stopped (by its PID) on exit; the peer services
# are started and stopped by the harness's run.sh itself.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PEERS="${PEERS_DIR:-/work/shared/bench-peers}"
SETUP="${SETUP:-1}"
PASSES="${PASSES:-default pinned}"
PRIO="${PRIO:--15}"
SY_PORT=18095
SY_DIR=/tmp/sy-bench/peers
SY_PIDFILE="$SY_DIR/switchyard.pid"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
TS="$(date +%Y%m%d-%H%M%S)"
OUT="${OUT_DIR:-$HERE/results/peers-$TS}"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

[ -d "$PEERS" ] || { log "no peer harness at $PEERS"; exit 1; }
if [ "$SETUP" = 1 ]; then log "running $PEERS/setup.sh"; "$PEERS/setup.sh"; fi
command -v wrk >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }
if [ ! -x "$BIN/switchyard" ]; then
  log "building the release binary"; (cd "$ROOT" && cargo build --release --bin switchyard --bin switchyard-mock)
fi

mkdir -p "$OUT" "$SY_DIR"
SY_PID=""
cleanup() {
  if [ -n "$SY_PID" ] && kill -0 "$SY_PID" 2>/dev/null; then
    kill -TERM "$SY_PID"
    for _ in $(seq 1 40); do kill -0 "$SY_PID" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$SY_PID" 2>/dev/null && kill -KILL "$SY_PID"
    wait "$SY_PID" 2>/dev/null || true
  fi
  rm -f "$SY_PIDFILE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if (exec 3<>"/dev/tcp/127.0.0.1/$SY_PORT") 2>/dev/null; then log "port $SY_PORT is in use by something else"; exit 1; fi
rm -f "$SY_DIR"/switchyard.db*
cat >"$OUT/switchyard.toml" <<CONF
[server]
listen = "127.0.0.1:$SY_PORT"
[store]
url = "sqlite://$SY_DIR/switchyard.db"
[log]
level = "info"
format = "json"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:18080/v1"
[models.gpt-4o-mini]
provider = "mock"
model = "gpt-4o-mini"
CONF
# Started under `nice` so that all its threads get PRIO; the harness renices only the PIDs of the
# process trees (for the peers that is their event-loop thread / worker processes).
NICE=(); [ "$PRIO" != 0 ] && NICE=(nice -n "$PRIO")
"${NICE[@]}" "$BIN/switchyard" --config "$OUT/switchyard.toml" serve >"$OUT/switchyard.log" 2>"$OUT/switchyard.err" &
SY_PID=$!
echo "$SY_PID" >"$SY_PIDFILE"
for _ in $(seq 1 100); do
  [ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:$SY_PORT/health" || true)" = 200 ] && break; sleep 0.1
done
kill -0 "$SY_PID" 2>/dev/null || { log "switchyard did not start; see $OUT/switchyard.err"; exit 1; }
log "switchyard up on 127.0.0.1:$SY_PORT (pid $SY_PID) -> nginx mock 127.0.0.1:18080"

# ONLY=... also limits what the harness starts (the baseline mock is always needed)
if [ -n "${ONLY:-}" ] && [ -z "${SERVICES:-}" ]; then
  SERVICES="mock"; for s in $ONLY; do [ "$s" != switchyard ] && SERVICES="$SERVICES $s"; done
  export SERVICES
fi
for pass in $PASSES; do
  case $pass in
    default) log "== pass default (c=1 and c=64, unpinned)"
             TARGETS="$HERE/peers-targets.conf" OUT_DIR="$OUT/default" PRIO="$PRIO" "$PEERS/run.sh" || log "pass default exited $?" ;;
    pinned)  log "== pass pinned (CONCS=1 PIN1=0)"
             CONCS=1 PIN1=0 TARGETS="$HERE/peers-targets.conf" OUT_DIR="$OUT/c1-pinned" PRIO="$PRIO" "$PEERS/run.sh" || log "pass pinned exited $?" ;;
    *) log "unknown pass $pass" ;;
  esac
done
{ grep -c '"message":"request"' "$OUT/switchyard.log" || true; } | sed 's/^/switchyard request log lines: /'
{ grep -o '"status":[0-9]*' "$OUT/switchyard.log" || true; } | sort | uniq -c | sed 's/^/switchyard statuses: /'
log "results in $OUT"
