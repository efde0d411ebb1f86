#!/usr/bin/env python3
"""Time to the first text delta: a session reply against a bare chat stream.

    session_ttft.py BASE_URL [-n 2000] [--warmup 200] [--block 50] [--rotate 20]

Alternates blocks of `--block` sequential requests between
  bare:    POST /v1/chat/completions (stream) — until the first chunk with text
  session: POST /v1/sessions/{id}/messages  — until the first `chat.delta` frame
each on its own keep-alive connection, so both see the same machine state.
The session path includes what it costs: reading the history, storing the
user message and the assistant placeholder before the provider is called.
A new session (created outside the timed window) every `--rotate` messages
keeps the history at a realistic size. Prints one line per path and the
difference of their percentiles (microseconds):

    SESSION_TTFT bare_p50=.. bare_p99=.. session_p50=.. session_p99=.. added_p50=.. added_p99=.. n=.. errors=..
"""
import argparse
import json
import re
import sys
import time
import urllib.request
from urllib.parse import urlsplit

from ttfb import DEFAULT_KEY, Conn, one_request, percentile

TEXT_CHUNK = re.compile(rb'"content":"[^"]')


def request(host, port, path, body, accept="text/event-stream"):
    hdrs = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
            "Content-Type: application/json", f"Authorization: Bearer {DEFAULT_KEY}",
            f"Accept: {accept}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(hdrs) + "\r\n\r\n").encode() + body


def post_json(base, path, payload):
    req = urllib.request.Request(base + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {DEFAULT_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("-n", type=int, default=2000, help="measured requests per path")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--rotate", type=int, default=20)
    ap.add_argument("--model", default="gpt-4o-mini")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    a = ap.parse_args()

    u = urlsplit(a.base)
    host, port = u.hostname, u.port or 80
    bot = post_json(a.base, "/v1/bots", {"name": "bench", "model": a.model,
                                         "system_prompt": "You are brief."})
    bare_req = request(host, port, "/v1/chat/completions", json.dumps(
        {"model": a.model, "stream": True,
         "messages": [{"role": "system", "content": "You are brief."},
                      {"role": "user", "content": "hello"}]}).encode())
    msg_body = json.dumps({"content": "hello"}).encode()

    clock = time.perf_counter_ns
    conns = {"bare": Conn(host, port, 10.0), "session": Conn(host, port, 10.0)}
    for c in conns.values():
        c.connect()
    found = {"bare": lambda b: TEXT_CHUNK.search(b) is not None,
             "session": lambda b: b"event: chat.delta" in b}
    times = {"bare": [], "session": []}
    errors = 0
    session_req, sent_in_session = None, a.rotate
    deadline = time.monotonic() + a.max_seconds
    total = a.warmup + a.n
    done = {"bare": 0, "session": 0}
    while min(done.values()) < total and time.monotonic() < deadline:
        for path in ("bare", "session"):
            for _ in range(a.block):
                if done[path] >= total:
                    break
                if path == "session" and sent_in_session >= a.rotate:
                    sid = post_json(a.base, "/v1/sessions", {"bot_id": bot["id"]})["id"]
                    session_req = request(host, port, f"/v1/sessions/{sid}/messages", msg_body)
                    sent_in_session = 0
                req = bare_req if path == "bare" else session_req
                try:
                    status, _, t_first, _, _, head = one_request(conns[path], req, clock, found[path])
                except (OSError, ValueError, IndexError) as e:
                    errors += 1
                    print(f"session_ttft.py: {path}: {e!r}", file=sys.stderr)
                    if errors > 20:
                        sys.exit(1)
                    conns[path].connect()
                    continue
                if path == "session":
                    sent_in_session += 1
                done[path] += 1
                if status != 200 or t_first is None:
                    errors += 1
                    print(f"session_ttft.py: {path}: status {status}: {head[:200]!r}", file=sys.stderr)
                    continue
                if done[path] > a.warmup:
                    times[path].append(t_first / 1000.0)
    b, s = sorted(times["bare"]), sorted(times["session"])
    p = lambda v, q: percentile(v, q)
    print("SESSION_TTFT bare_p50=%.1f bare_p99=%.1f session_p50=%.1f session_p99=%.1f "
          "added_p50=%.1f added_p99=%.1f n=%d errors=%d" % (
              p(b, 50), p(b, 99), p(s, 50), p(s, 99),
              p(s, 50) - p(b, 50), p(s, 99) - p(b, 99), min(len(b), len(s)), errors))


if __name__ == "__main__":
    main()
