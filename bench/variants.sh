#!/usr/bin/env bash
# Where does Switchyard's time go? Re-runs bench/run.sh (PHASES="pinned c64", REPS=2 by default)
# once per configuration, changing only Switchyard's environment, then prints a comparison
# (bench/compare.py). No code change: every variant is an environment variable.
#
#   bench/variants.sh                              # all variants below, ~2 min each
#   VARIANTS="base logwarn" bench/variants.sh      # a subset
#   VARIANTS="base batch1 batch32" bench/variants.sh   # usage rows one per statement / at most 32 per statement
#   bench/variants.sh stream                       # the streaming experiment (TCP_NODELAY preload)
#   bench/variants.sh bins thin=/tmp/a/switchyard fat=/tmp/b/switchyard   # two builds, same config;
#                                                  # ROUNDS=2 runs them A B A B to see the drift
#   bench/variants.sh bins main=/tmp/a/switchyard 'cpu1@1=/tmp/a/switchyard'   # NAME@N: that build with its
#                                                  # database threads on CPU N (run.sh's WRITER_CPU; not the issue's setup)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
TS="$(date +%Y%m%d-%H%M%S)"
BASE="$HERE/results/variants-$TS"
export REPS="${REPS:-2}"
declare -A ENVS=(
  [base]=""
  [logwarn]="RUST_LOG=warn"
  [nousage]="SWITCHYARD_USAGE__ENABLED=false"
  [logwarn+nousage]="RUST_LOG=warn SWITCHYARD_USAGE__ENABLED=false"
  # no database writes on the request path at all: usage rows and trace events off
  [nowrites]="SWITCHYARD_USAGE__ENABLED=false SWITCHYARD_EVENTS__ENABLED=false"
  # no background work at all: no database writes and no per-request log line
  [quiet]="RUST_LOG=warn SWITCHYARD_USAGE__ENABLED=false SWITCHYARD_EVENTS__ENABLED=false"
  # the writers' old 100 ms batches (the default is 10 ms since 2026-12-02)
  [flush100]="SWITCHYARD_USAGE__FLUSH_INTERVAL_MS=100 SWITCHYARD_EVENTS__FLUSH_INTERVAL_MS=100"
  [workers1]="TOKIO_WORKER_THREADS=1"
  [workers1+logwarn+nousage]="TOKIO_WORKER_THREADS=1 RUST_LOG=warn SWITCHYARD_USAGE__ENABLED=false"
  # usage ON, but every insert the same one-row statement (tests the prepared-statement-cache theory for RSS)
  [batch1]="SWITCHYARD_USAGE__BATCH_SIZE=1"
  [batch32]="SWITCHYARD_USAGE__BATCH_SIZE=32"
  # small groups committed often, and checkpoints often (each piece short)
  [b8f1]="SWITCHYARD_USAGE__BATCH_SIZE=8 SWITCHYARD_USAGE__FLUSH_INTERVAL_MS=1"
  [b8f1c5]="SWITCHYARD_USAGE__BATCH_SIZE=8 SWITCHYARD_USAGE__FLUSH_INTERVAL_MS=1 SWITCHYARD_STORE__SQLITE_CHECKPOINT_INTERVAL_MS=5"
  [b16f2c10]="SWITCHYARD_USAGE__BATCH_SIZE=16 SWITCHYARD_USAGE__FLUSH_INTERVAL_MS=2 SWITCHYARD_STORE__SQLITE_CHECKPOINT_INTERVAL_MS=10"
  [c5]="SWITCHYARD_STORE__SQLITE_CHECKPOINT_INTERVAL_MS=5"
  # group commit: no wait for a batch to gather (rows that arrive during a commit join the next)
  [f0]="SWITCHYARD_USAGE__FLUSH_INTERVAL_MS=0"
  [f0c5]="SWITCHYARD_USAGE__FLUSH_INTERVAL_MS=0 SWITCHYARD_STORE__SQLITE_CHECKPOINT_INTERVAL_MS=5"
  [f0c20]="SWITCHYARD_USAGE__FLUSH_INTERVAL_MS=0 SWITCHYARD_STORE__SQLITE_CHECKPOINT_INTERVAL_MS=20"
)
ORDER="base logwarn nousage logwarn+nousage workers1 workers1+logwarn+nousage"
mkdir -p "$BASE"
dirs=()
if [ "${1:-}" = bins ]; then
  shift
  for round in $(seq 1 "${ROUNDS:-1}"); do
    for spec in "$@"; do
      name="${spec%%=*}"; bin="${spec#*=}"; wcpu=""
      [[ "$name" == *@* ]] && wcpu="${name##*@}"
      echo "== build $name (round $round): $bin${wcpu:+, database threads on CPU $wcpu}" >&2
      OUT_DIR="$BASE/$name-$round" PHASES="${PHASES:-pinned c64}" SY_BIN="$bin" WRITER_CPU="$wcpu" "$HERE/run.sh" >"$BASE/$name-$round.log" 2>&1 || echo "build $name failed (see $BASE/$name-$round.log)"
      dirs+=("$BASE/$name-$round")
    done
  done
elif [ "${1:-}" = stream ]; then
  for v in ${VARIANTS:-base nodelay}; do
    nd=0; [ "$v" = nodelay ] && nd=1
    OUT_DIR="$BASE/$v" PHASES="ttfb stream64" SY_NODELAY_PRELOAD=$nd "$HERE/run.sh" >"$BASE/$v.log" 2>&1 || echo "variant $v failed (see $BASE/$v.log)"
    dirs+=("$BASE/$v")
  done
else
  for v in ${VARIANTS:-$ORDER}; do
    echo "== variant $v: SY_ENV='${ENVS[$v]}'" >&2
    OUT_DIR="$BASE/$v" PHASES="${PHASES:-pinned c64}" SY_ENV="${ENVS[$v]}" "$HERE/run.sh" >"$BASE/$v.log" 2>&1 || echo "variant $v failed (see $BASE/$v.log)"
    dirs+=("$BASE/$v")
  done
fi
python3 "$HERE/compare.py" "${dirs[@]}" | tee "$BASE/compare.md"
