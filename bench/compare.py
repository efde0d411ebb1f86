#!/usr/bin/env python3
"""bench/compare.py DIR... -> one markdown row per bench/run.sh results dir (variants side by side).
Medians over repetitions; latencies in µs; 'added' = gateway minus direct measured in the same run.
'(× mock)' = Switchyard's CPU per request divided by the mock's CPU per request in the direct runs of the
same results dir: a rough normaliser for the machine's speed, which drifts by up to 2x within an hour here."""
import csv
import os
import statistics
import sys


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def load(d):
    rows = list(csv.DictReader(open(os.path.join(d, "raw.csv"))))
    meta = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(d, "meta.env")) if "=" in l)
    return rows, meta


def med(rows, phase, target, key):
    v = [num(r[key]) for r in rows if r["phase"] == phase and r["target"] == target and r["rps"] != "NA"]
    v = [x for x in v if x == x]
    return statistics.median(v) if v else float("nan")


def fmt(x, spec="{:.0f}"):
    return "n/a" if x != x else spec.format(x)


print("| variant | SY_ENV | c=1 pinned gw p50 / p99 | added p50 / p99 | Switchyard CPU µs/req c=1 (× mock) | c=64 gw req/s | ratio vs direct | CPU ms/req c=64 (× mock) | TTFB added p50 / p99 | stream c=64 ratio | RSS peak MiB | usage queue max |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for d in sys.argv[1:]:
    rows, meta = load(d)
    sy_env = meta.get("knobs", "").split("SY_ENV='")[1].split("'")[0] if "SY_ENV='" in meta.get("knobs", "") else ""
    g50, g99 = med(rows, "pinned", "gateway", "p50_us"), med(rows, "pinned", "gateway", "p99_us")
    a50 = g50 - med(rows, "pinned", "direct", "p50_us")
    a99 = g99 - med(rows, "pinned", "direct", "p99_us")
    cpu1 = med(rows, "pinned", "gateway", "sy_cpu_ms") / med(rows, "pinned", "gateway", "reqs") * 1000
    g64 = med(rows, "c64", "gateway", "rps")
    ratio = g64 / med(rows, "c64", "direct", "rps")
    cpu64 = med(rows, "c64", "gateway", "sy_cpu_ms") / med(rows, "c64", "gateway", "reqs")
    # machine-speed normaliser: the mock's own CPU per request, direct runs of the same results dir
    m1 = med(rows, "pinned", "direct", "mock_cpu_ms") / med(rows, "pinned", "direct", "reqs") * 1000
    m64 = med(rows, "c64", "direct", "mock_cpu_ms") / med(rows, "c64", "direct", "reqs")
    t50 = med(rows, "ttfb", "gateway", "p50_us") - med(rows, "ttfb", "direct", "p50_us")
    t99 = med(rows, "ttfb", "gateway", "p99_us") - med(rows, "ttfb", "direct", "p99_us")
    sratio = med(rows, "stream64", "gateway", "rps") / med(rows, "stream64", "direct", "rps")
    rss = [num(r["sy_rss_max_kb"]) for r in rows if r["target"] == "gateway"] + [num(meta.get("rss_hwm_kb"))]
    rss = [x for x in rss if x == x]
    q = [num(r.get("usage_queue_max")) for r in rows if r["target"] == "gateway"]
    q = [x for x in q if x == x]
    print(f"| {os.path.basename(d.rstrip('/'))} | `{sy_env or '-'}` | {fmt(g50)} / {fmt(g99)} | {fmt(a50, '{:+.0f}')} / {fmt(a99, '{:+.0f}')} "
          f"| {fmt(cpu1)} ({fmt(cpu1 / m1, '{:.1f}')}) | {fmt(g64)} | {fmt(ratio, '{:.2f}')} | {fmt(cpu64, '{:.3f}')} ({fmt(cpu64 / m64, '{:.1f}')}) | {fmt(t50, '{:+.0f}')} / {fmt(t99, '{:+.0f}')} "
          f"| {fmt(sratio, '{:.2f}')} | {fmt(max(rss) / 1024 if rss else float('nan'), '{:.1f}')} | {fmt(max(q) if q else float('nan'))} |")
