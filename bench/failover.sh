#!/usr/bin/env bash
# Failover benchmark: the same load through a healthy route and through a
# two-deployment route whose primary fails 30 % of requests (HTTP 500, the
# first 30 of every 100) while the fallback is healthy. Measured in one run,
# alternating, on 127.0.0.1 only; every wrk run is bounded by -d.
#
#   bench/failover.sh                 # DURATION=10s REPS=2
# Output: a markdown table on stdout and in bench/results/failover-<ts>/table.md
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DURATION="${DURATION:-10s}"; REPS="${REPS:-2}"; PIN="${PIN:-0}"
OUT="${OUT:-$HERE/results/failover-$(date +%Y%m%d-%H%M%S)}"
BIN="${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
mkdir -p "$OUT"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
[ -x "$BIN/switchyard" ] && [ -x "$BIN/switchyard-mock" ] || (cd "$ROOT" && cargo build --release --bin switchyard --bin switchyard-mock)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$BIN/switchyard-mock" --listen 127.0.0.1:18190 --threads 1 >"$OUT/healthy-mock.log" 2>&1 & pids+=($!)
"$BIN/switchyard-mock" --listen 127.0.0.1:18191 --threads 1 --fail-percent 30 >"$OUT/primary-mock.log" 2>&1 & pids+=($!)
"$BIN/switchyard-mock" --listen 127.0.0.1:18192 --threads 1 >"$OUT/fallback-mock.log" 2>&1 & pids+=($!)
cat >"$OUT/switchyard.toml" <<TOML
[server]
listen = "127.0.0.1:18193"
[store]
url = "sqlite://$OUT/switchyard.db"
[resilience]
# Keep the primary in the route for the whole run: the point is per-request
# failover, not the breaker taking the primary out.
breaker_failure_threshold = 1000000
[providers.healthy]
kind = "openai"
base_url = "http://127.0.0.1:18190/v1"
[providers.primary]
kind = "openai"
base_url = "http://127.0.0.1:18191/v1"
[providers.fallback]
kind = "openai"
base_url = "http://127.0.0.1:18192/v1"
[models.healthy]
provider = "healthy"
model = "gpt-4o-mini"
[[models.failing.route]]
provider = "primary"
model = "gpt-4o-mini"
[[models.failing.route]]
provider = "fallback"
model = "gpt-4o-mini"
TOML
"$BIN/switchyard" --config "$OUT/switchyard.toml" serve >"$OUT/switchyard.log" 2>&1 & SY=$!; pids+=($SY)
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18193/health && break; sleep 0.1; done

bench() { # model conc pinned -> "rps p50 p99 non2xx"
  local body="{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}" pre=()
  [ "$3" = 1 ] && pre=(taskset -c "$PIN")
  WRK_BODY="$body" "${pre[@]}" wrk -t"$([ "$2" = 1 ] && echo 1 || echo 2)" -c"$2" -d"$DURATION" --latency \
    -s "$HERE/chat.lua" http://127.0.0.1:18193/v1/chat/completions 2>&1 \
    | tee -a "$OUT/wrk.log" | awk '/^BENCH/ {for(i=2;i<=NF;i++){split($i,a,"="); v[a[1]]=a[2]} print v["rps"], v["p50"], v["p99"], v["errs_status"]}'
}
pin_all() { for p in "${pids[@]}"; do taskset -a -pc "$1" "$p" >/dev/null; done; }

WRK_BODY='{"model":"healthy","messages":[{"role":"user","content":"hi"}]}' wrk -t1 -c8 -d2s -s "$HERE/chat.lua" http://127.0.0.1:18193/v1/chat/completions >/dev/null 2>&1 || true
echo "target,c,rep,rps,p50_us,p99_us,errs_status" >"$OUT/raw.csv"
for c in 1 64; do
  if [ "$c" = 1 ]; then pin_all "$PIN"; else pin_all "0-$(( $(nproc) - 1 ))"; fi
  for rep in $(seq "$REPS"); do
    for model in healthy failing; do
      read -r rps p50 p99 errs < <(bench "$model" "$c" "$([ "$c" = 1 ] && echo 1 || echo 0)")
      echo "$model,$c,$rep,$rps,$p50,$p99,$errs" | tee -a "$OUT/raw.csv"
    done
  done
done
python3 - "$OUT/raw.csv" >"$OUT/table.md" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def med(t, c, k): return statistics.median(float(r[k]) for r in rows if r["target"] == t and r["c"] == c)
print("| route | c | req/s | ratio to healthy | p50 µs | p99 µs | client errors |")
print("|---|---|---|---|---|---|---|")
for c in ("1", "64"):
    base = med("healthy", c, "rps")
    for t in ("healthy", "failing"):
        errs = sum(int(r["errs_status"]) for r in rows if r["target"] == t and r["c"] == c)
        print(f"| {t} | {c}{' (pinned)' if c == '1' else ''} | {med(t, c, 'rps'):,.0f} | {med(t, c, 'rps') / base:.2f} | {med(t, c, 'p50_us'):,.0f} | {med(t, c, 'p99_us'):,.0f} | {errs} |")
PY
cat "$OUT/table.md"
metrics=$(curl -s http://127.0.0.1:18193/metrics)
echo; echo "primary attempts that failed (switchyard_upstream_attempts_total): $(echo "$metrics" | grep 'deployment="primary/gpt-4o-mini",outcome="error"' | awk '{print $2}')" | tee -a "$OUT/table.md"
echo "fallbacks (switchyard_fallbacks_total): $(echo "$metrics" | grep '^switchyard_fallbacks_total' | awk '{print $2}')" | tee -a "$OUT/table.md"
