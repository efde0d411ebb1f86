#!/usr/bin/env bash
# Session machinery cost: time to the first `chat.delta` of a session reply
# (history read, user message + assistant placeholder stored, then the
# provider call) against the first text chunk of a bare streamed
# /v1/chat/completions, in the same run, alternating blocks of requests.
#
#   bench/sessions.sh                 # N=2000 per path; results in bench/results/<ts>-sessions/
#   N=500 bench/sessions.sh           # shorter
#   STORE=postgres://... bench/sessions.sh   # another store
#   REBUILD=1 bench/sessions.sh       # cargo build --release first
#   SY_ENV="SWITCHYARD_EVENTS__ENABLED=false" LABEL=noevents bench/sessions.sh   # a variant
#
# Release binaries from target/release; SQLite store in a temp dir; open
# development mode (loopback, no keys); the mock answers at once.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
N="${N:-2000}"
MOCK_PORT="${MOCK_PORT:-18190}"
SY_PORT="${SY_PORT:-18191}"
BIN="${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
TS="$(date +%Y%m%d-%H%M%S)"
OUT="${OUT_DIR:-$HERE/results/$TS-sessions${LABEL:+-$LABEL}}"
WORK="$(mktemp -d /tmp/sy-sessions.XXXXXX)"
STORE="${STORE:-sqlite://$WORK/switchyard.db}"
mkdir -p "$OUT"
[ "${REBUILD:-0}" = 1 ] && (cd "$ROOT" && cargo build --release --bin switchyard --bin switchyard-mock)
cleanup() { kill "${SY_PID:-}" "${MOCK_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

cat > "$WORK/switchyard.toml" <<TOML
[server]
listen = "127.0.0.1:$SY_PORT"
[store]
url = "$STORE"
[log]
level = "warn"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"
api_key = "sk-mock"
[models.gpt-4o-mini]
provider = "mock"
model = "gpt-4o-mini-upstream"
[pricing.gpt-4o-mini-upstream]
input_per_mtok = 0.15
output_per_mtok = 0.60
TOML

"$BIN/switchyard-mock" --listen "127.0.0.1:$MOCK_PORT" >"$OUT/mock.log" 2>&1 &
MOCK_PID=$!
(cd "$WORK" && exec env ${SY_ENV:-} "$BIN/switchyard" --config "$WORK/switchyard.toml" serve) >"$OUT/switchyard.log" 2>&1 &
SY_PID=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$SY_PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done
git -C "$ROOT" rev-parse --short HEAD >"$OUT/commit"
python3 "$HERE/session_ttft.py" "http://127.0.0.1:$SY_PORT" -n "$N" | tee "$OUT/result.txt"
