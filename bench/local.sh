#!/usr/bin/env bash
# The local models against their reference stacks, in one run, on the same
# files and inputs (bench/local/prompt.txt, bench/local/sentences.txt):
#   chat:  decode tokens/s and time to first token of
#          - llama-cpp-python on the shipped Q4_1 file (the baseline),
#          - Switchyard's engine (llama.cpp through llama-cpp-2) in each
#            local.chat_precision: attention_f16 (the default), f16, file,
#          - llama-cpp-python on the same widened copies;
#   embed: sentences/s of sentence-transformers (PyTorch CPU) and of
#          Switchyard's engine (candle), batches of 64.
# Engines alternate, ROUNDS times, at 1 and 2 threads; results (JSON lines)
# in bench/results/<ts>-local/, and a ratio table on stdout.
#
#   bench/local.sh                # ROUNDS=2 RUNS=3
#   ROUNDS=1 RUNS=2 bench/local.sh
#   PARTS=embed bench/local.sh    # only the embeddings (or PARTS=chat)
#
# Needs scripts/fetch-models and bench/local/setup.sh (the Python venv with
# llama-cpp-python and sentence-transformers). Run it on a quiet machine:
# llama.cpp's and torch's thread pools spin, and collapse when another
# process takes a core.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
ROUNDS="${ROUNDS:-2}"
RUNS="${RUNS:-3}"
PARTS="${PARTS:-chat embed}"
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
MAX_TOKENS="${MAX_TOKENS:-128}"
PY="${SWITCHYARD_BENCH_VENV:-$ROOT/.venv-bench}/bin/python"
TS="$(date +%Y%m%d-%H%M%S)"
OUT="${OUT_DIR:-$HERE/results/$TS-local}"
mkdir -p "$OUT"
cd "$ROOT"
scripts/fetch-models
[ -x "$PY" ] || bench/local/setup.sh
cargo build --release -p switchyard-local --example bench
BENCH="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/bench"
Q4=models/SmolLM2-135M-Instruct.Q4_1.gguf
# Make the widened copies before timing anything.
if part chat; then
  "$BENCH" chat "$Q4" 1 bench/local/prompt.txt 2 1 f16 >/dev/null
  "$BENCH" chat "$Q4" 1 bench/local/prompt.txt 2 1 attention_f16 >/dev/null
fi
F16=models/SmolLM2-135M-Instruct.Q4_1.f16.gguf
ATTN=models/SmolLM2-135M-Instruct.Q4_1.attn-f16.gguf
py() { env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$PY" bench/local/baseline.py "$@"; }

for round in $(seq 1 "$ROUNDS"); do
  for t in 1 2; do
    echo "[local] round $round, $t thread(s)" >&2
    for precision in attention_f16 f16 file; do
      part chat || continue
      py llama --model "$Q4" --threads "$t" --prompt-file bench/local/prompt.txt --max-tokens "$MAX_TOKENS" --runs "$RUNS" >>"$OUT/chat.jsonl"
      "$BENCH" chat "$Q4" "$t" bench/local/prompt.txt "$MAX_TOKENS" "$RUNS" "$precision" >>"$OUT/chat.jsonl"
    done
    if part chat; then
      py llama --model "$ATTN" --threads "$t" --prompt-file bench/local/prompt.txt --max-tokens "$MAX_TOKENS" --runs "$RUNS" >>"$OUT/chat.jsonl"
      py llama --model "$F16" --threads "$t" --prompt-file bench/local/prompt.txt --max-tokens "$MAX_TOKENS" --runs "$RUNS" >>"$OUT/chat.jsonl"
    fi
    if part embed; then
      py st --threads "$t" --batch 64 --sentences 512 >>"$OUT/embed.jsonl"
      "$BENCH" embed models/all-MiniLM-L6-v2 "$t" bench/local/sentences.txt 512 64 >>"$OUT/embed.jsonl"
    fi
  done
done
uptime >"$OUT/uptime.txt"

"$PY" - "$OUT" <<'PY'
import json, statistics, sys, os
out = sys.argv[1]
def rows_of(name):
    path = os.path.join(out, name)
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []
chat = rows_of("chat.jsonl")
embed = rows_of("embed.jsonl")
def key(r):
    return (r["engine"].split(" (")[0] if "switchyard" in r["engine"] else "llama-cpp-python",
            r["model"], r["threads"])
rows = {}
for r in chat:
    rows.setdefault(key(r), []).append(r)
print("| engine | weights | threads | decode tok/s (median) | TTFT ms | decode vs llama.cpp on Q4_1 | vs llama.cpp on the same weights |")
print("|---|---|---|---|---|---|---|")
def med(rs, f): return statistics.median(r[f] for r in rs)
for t in (1, 2):
    base = rows.get(("llama-cpp-python", "SmolLM2-135M-Instruct.Q4_1.gguf", t), [])
    for k, rs in sorted(rows.items()):
        if k[2] != t: continue
        same = rows.get(("llama-cpp-python", k[1], t), [])
        d = med(rs, "decode_tok_s_median")
        r1 = d / med(base, "decode_tok_s_median") if base else float("nan")
        r2 = d / med(same, "decode_tok_s_median") if same else float("nan")
        print(f"| {k[0]} | {k[1]} | {t} | {d:.1f} | {med(rs, 'ttft_ms_median'):.0f} | {r1:.2f} | {r2:.2f} |")
print()
print("| engine | threads | sentences/s | vs sentence-transformers |")
print("|---|---|---|---|")
for t in (1, 2):
    st = [r["sentences_per_s_median"] for r in embed if r["threads"] == t and "sentence-transformers" in r["engine"]]
    for eng in ("sentence-transformers", "switchyard-local"):
        v = [r["sentences_per_s_median"] for r in embed if r["threads"] == t and eng in r["engine"]]
        if v:
            print(f"| {eng} | {t} | {statistics.median(v):.1f} | {statistics.median(v)/statistics.median(st):.2f} |")
# Each round runs sentence-transformers then Switchyard back to back: the
# ratio of each such pair is the least exposed to a neighbour's load.
for t in (1, 2):
    pairs = [(a, b) for a, b in zip(embed, embed[1:])
             if a["threads"] == b["threads"] == t
             and "sentence-transformers" in a["engine"] and "switchyard-local" in b["engine"]]
    if pairs:
        ratios = [b["sentences_per_s_median"] / a["sentences_per_s_median"] for a, b in pairs]
        print(f"embeddings, {t} thread(s), per-round ratios: " + ", ".join(f"{r:.2f}" for r in ratios))
PY
echo "[local] results in $OUT" >&2
