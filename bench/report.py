#!/usr/bin/env python3
"""bench/report.py RESULTS_DIR -> markdown summary (stdout) of a bench/run.sh run.

Every figure is the median over repetitions of one phase/target (direct = straight to
switchyard-mock, gateway = through Switchyard to the same mock). Latencies in microseconds.
"""
import csv
import glob
import os
import re
import statistics
import sys

TARGET_ADDED_P99_US = 100.0
TARGET_RATIO = 0.30
TARGET_RSS_MIB = 64.0

out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "raw.csv"))))
meta = {}
for line in open(os.path.join(out, "meta.env")):
    k, _, v = line.rstrip("\n").partition("=")
    meta[k] = v


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def sel(phase, target):
    return [r for r in rows if r["phase"] == phase and r["target"] == target and r["rps"] != "NA"]


def med(phase, target, key):
    v = [num(r[key]) for r in sel(phase, target)]
    v = [x for x in v if x == x]
    return statistics.median(v) if v else float("nan")


def per_rep(phase, target, key, fmt="{:.0f}"):
    return "/".join(fmt.format(num(r[key])) for r in sel(phase, target))


def have(phase):
    return bool(sel(phase, "direct")) and bool(sel(phase, "gateway"))


def f0(x):
    return "n/a" if x != x else f"{x:,.0f}"


def f1(x):
    return "n/a" if x != x else f"{x:.1f}"


def signed(x):
    return "n/a" if x != x else f"{x:+.0f}"


def mb(kb):
    x = num(kb)
    return "n/a" if x != x else f"{x / 1024:.1f}"


def ttfb_extra(target, key):
    """full_p50 / hdr_p50 from the last attempt of each ttfb run file."""
    vals = []
    for rep in sorted({r["rep"] for r in sel("ttfb", target)}):
        files = sorted(glob.glob(os.path.join(out, "runs", f"ttfb-{target}-r{rep}-a*.txt")))
        if not files:
            continue
        m = re.search(rf"\b{key}=([0-9.]+)", open(files[-1]).read())
        if m:
            vals.append(float(m.group(1)))
    return statistics.median(vals) if vals else float("nan")


reps = max((int(r["rep"]) for r in rows), default=0)
print(f"## Switchyard bench/run.sh — {meta.get('date', '?')}\n")
print(f"- host: {meta.get('host', '?')}; wrk {meta.get('wrk', '?')}; Switchyard git {meta.get('git', '?')}, binary {meta.get('binary', '?')}")
print(f"- knobs: {meta.get('knobs', '?')}")
print("- direct = wrk → switchyard-mock (1 thread); gateway = wrk → Switchyard → the same mock; "
      "usage logging ON (SQLite), JSON request log to a file.")
print(f"- each figure = median over {reps} repetitions (per-repetition values in brackets); latencies in µs.\n")

verdicts = []

if have("pinned"):
    print("### Non-streaming, concurrency 1, wrk + Switchyard + mock pinned to one CPU\n")
    print("| | req/s | p50 | p90 | p99 |")
    print("|---|---|---|---|---|")
    for t in ("direct", "gateway"):
        print(f"| {t} | {f0(med('pinned', t, 'rps'))} | {f0(med('pinned', t, 'p50_us'))} [{per_rep('pinned', t, 'p50_us')}] "
              f"| {f0(med('pinned', t, 'p90_us'))} | {f0(med('pinned', t, 'p99_us'))} [{per_rep('pinned', t, 'p99_us')}] |")
    a50 = med("pinned", "gateway", "p50_us") - med("pinned", "direct", "p50_us")
    a90 = med("pinned", "gateway", "p90_us") - med("pinned", "direct", "p90_us")
    a99 = med("pinned", "gateway", "p99_us") - med("pinned", "direct", "p99_us")
    print(f"| **added by Switchyard** | | **{signed(a50)}** | {signed(a90)} | **{signed(a99)}** |")
    cpu = med("pinned", "gateway", "sy_cpu_ms") / med("pinned", "gateway", "reqs") * 1000
    print(f"\nSwitchyard CPU at c=1: {f1(cpu)} µs per request.\n")
    verdicts.append(("added p99, c=1 pinned, non-streaming", f"≤ {TARGET_ADDED_P99_US:.0f} µs", f"{signed(a99)} µs (p50 {signed(a50)} µs)", a99 <= TARGET_ADDED_P99_US))

if have("ttfb"):
    print("### Streaming, concurrency 1, pinned: time to the first `data:` chunk (bench/ttfb.py)\n")
    print("| | streams | p50 | p90 | p99 | headers p50 | full stream p50 |")
    print("|---|---|---|---|---|---|---|")
    for t in ("direct", "gateway"):
        print(f"| {t} | {f0(med('ttfb', t, 'reqs'))} | {f0(med('ttfb', t, 'p50_us'))} [{per_rep('ttfb', t, 'p50_us')}] "
              f"| {f0(med('ttfb', t, 'p90_us'))} | {f0(med('ttfb', t, 'p99_us'))} [{per_rep('ttfb', t, 'p99_us')}] "
              f"| {f0(ttfb_extra(t, 'hdr_p50'))} | {f0(ttfb_extra(t, 'full_p50'))} |")
    t50 = med("ttfb", "gateway", "p50_us") - med("ttfb", "direct", "p50_us")
    t90 = med("ttfb", "gateway", "p90_us") - med("ttfb", "direct", "p90_us")
    t99 = med("ttfb", "gateway", "p99_us") - med("ttfb", "direct", "p99_us")
    tf = ttfb_extra("gateway", "full_p50") - ttfb_extra("direct", "full_p50")
    print(f"| **added by Switchyard** | | **{signed(t50)}** | {signed(t90)} | **{signed(t99)}** | | {signed(tf)} |\n")
    print("(The client is Python; its own cost is in both rows and cancels out in the added row.)\n")

hi = [p for p in ("c64", "stream64") if have(p)]
if hi:
    c = sel(hi[0], "direct")[0]["c"]
    print(f"### Throughput, concurrency {c}, unpinned (wrk -t2)\n")
    print("| body | direct req/s | gateway req/s | ratio | gateway p50 / p99 (ms) | Switchyard CPU ms/req | mock CPU ms/req direct / via gw |")
    print("|---|---|---|---|---|---|---|")
    for p in hi:
        d, g = med(p, "direct", "rps"), med(p, "gateway", "rps")
        ratio = g / d if d else float("nan")
        sy = med(p, "gateway", "sy_cpu_ms") / med(p, "gateway", "reqs")
        md = med(p, "direct", "mock_cpu_ms") / med(p, "direct", "reqs")
        mg = med(p, "gateway", "mock_cpu_ms") / med(p, "gateway", "reqs")
        name = "non-streaming" if p == "c64" else "streaming (full SSE response)"
        print(f"| {name} | {f0(d)} [{per_rep(p, 'direct', 'rps')}] | {f0(g)} [{per_rep(p, 'gateway', 'rps')}] | **{ratio:.2f}** "
              f"| {med(p, 'gateway', 'p50_us') / 1000:.2f} / {med(p, 'gateway', 'p99_us') / 1000:.2f} | {sy:.4f} | {md:.4f} / {mg:.4f} |")
        if p == "c64":
            verdicts.append((f"throughput c={c} vs direct (non-streaming)", f"≥ {TARGET_RATIO:.2f}", f"{ratio:.2f}", ratio >= TARGET_RATIO))
    print()

print("### Switchyard memory (VmRSS, MiB)\n")
samp = [num(r["sy_rss_max_kb"]) for r in rows if r["target"] == "gateway"]
samp = [x for x in samp if x == x]
peak_sampled = max(samp) if samp else float("nan")
print("| idle after start | after first requests | max sampled under load (100 ms) | right after c=64 load | right after streaming load | 2 s later | VmHWM (peak) |")
print("|---|---|---|---|---|---|---|")
print(f"| {mb(meta.get('rss_start_kb'))} | {mb(meta.get('rss_after_first_requests_kb'))} | {mb(peak_sampled)} "
      f"| {mb(meta.get('rss_after_c64_kb'))} | {mb(meta.get('rss_after_stream64_kb'))} | {mb(meta.get('rss_after_load_idle2s_kb'))} | {mb(meta.get('rss_hwm_kb'))} |\n")
per_phase = []
for p in ("pinned", "ttfb", "c64", "stream64"):
    if f"rss_before_{p}_kb" in meta:
        rs = [num(r["sy_rss_max_kb"]) for r in sel(p, "gateway")]
        rs = [x for x in rs if x == x]
        per_phase.append(f"{p}: {mb(meta[f'rss_before_{p}_kb'])} before, max {mb(max(rs)) if rs else 'n/a'} during")
if per_phase:
    print("By phase (MiB): " + "; ".join(per_phase) + ".\n")
q = [num(r.get("usage_queue_max")) for r in rows if r["target"] == "gateway"]
q = [x for x in q if x == x]
if q:
    print(f"Usage writer queue depth (from /metrics once a second during unpinned gateway runs): max {max(q):.0f} rows.\n")
peak = max(num(meta.get("rss_hwm_kb")), peak_sampled if peak_sampled == peak_sampled else 0) / 1024
verdicts.append(("RSS under load", f"≤ {TARGET_RSS_MIB:.0f} MiB", f"{peak:.1f} MiB peak (VmHWM)", peak <= TARGET_RSS_MIB))

print("### Targets\n")
print("| target | limit | measured | met? |")
print("|---|---|---|---|")
for name, lim, val, ok in verdicts:
    print(f"| {name} | {lim} | {val} | {'**yes**' if ok else '**NO**'} |")
print()

print("### Checks and contention\n")
errs = sum(int(num(r["errors"])) for r in rows if r["errors"] not in ("", "NA"))
print(f"- client-side errors (wrk connect/read/write/timeout/status≥400, ttfb errors+non-200) over all measured runs: {errs}")
print(f"- Switchyard request log lines by status: {meta.get('log_request_lines_by_status', '?')}; "
      f"WARN/ERROR lines: {meta.get('log_warn_error_lines', '0')}; log size {meta.get('log_size_kb', '?')} KiB")
print(f"- usage rows written (after graceful stop): {meta.get('usage_rows_total', '?')} ({meta.get('usage_rows_by_stream_status', '?')}); "
      f"/metrics before the stop: {meta.get('usage_metrics_at_end', '?')}")
by_phase = {}
for r in rows:
    by_phase.setdefault(r["phase"], []).append(r)
for p, rs in by_phase.items():
    fo = [int(num(r["foreign_pct"])) for r in rs]
    st = [int(num(r["steal_pct"])) for r in rs]
    sq = [int(num(r["softirq_pct"])) for r in rs]
    pre = [int(num(r["pre_busy_pct"])) for r in rs]
    retried = sum(1 for r in rs if r["attempt"] != "1")
    print(f"- {p}: foreign CPU during runs max {max(fo)} % (median {statistics.median(fo):.0f} %) of one core, "
          f"busy before runs max {max(pre)} %, steal max {max(st)} %, softirq max {max(sq)} %, re-runs {retried}")
if os.path.exists(os.path.join(out, "foreign.log")) and os.path.getsize(os.path.join(out, "foreign.log")):
    print("- foreign load was seen: see foreign.log (top snapshots)")
