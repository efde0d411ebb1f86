#!/usr/bin/env python3
"""Time to first streamed `data:` chunk, sequential, one keep-alive connection.

    ttfb.py URL [-n 2000] [--warmup 200] [--body JSON] [--header 'Name: value' ...]

For each request: t0 = just before send(); t_first = when a recv() first returns
body bytes that contain `data:`. The whole response (chunked or content-length)
is then read to its end before the next request, so the connection is reused.
Also records time to the first response byte (status line) and to the complete
response. Prints one machine-readable line:

    TTFB n=.. errors=.. non200=.. first_data_p50=.. p90=.. p99=.. max=.. mean=.. hdr_p50=.. full_p50=.. full_p99=.. dones=..

(all times in microseconds; `dones` = responses that contained `data: [DONE]`).
Bounded: at most N requests, each with a socket timeout (10 s by default).
"""
import argparse
import socket
import statistics
import sys
import time
from urllib.parse import urlsplit

DEFAULT_BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}],"stream":true}'
DEFAULT_KEY = "sk-bench-6f1c2a9e4b7d8035e1f2a3b4c5d6e7f8"


class Conn:
    def __init__(self, host, port, timeout):
        self.addr = (host, port)
        self.timeout = timeout
        self.sock = None
        self.buf = b""

    def connect(self):
        if self.sock is not None:
            self.sock.close()
        s = socket.create_connection(self.addr, timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s
        self.buf = b""

    def fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed by peer")
        self.buf += data
        return data


def percentile(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def has_data(buf):
    return b"data:" in buf


def one_request(c, req, clock, found=has_data):
    """Returns (status, t_hdr_ns, t_first_data_ns, t_full_ns, saw_done) relative to send.
    `found(bytes)` says whether what arrived so far holds the awaited first event."""
    t0 = clock()
    c.sock.sendall(req)
    t_hdr = t_data = None
    # --- headers
    while b"\r\n\r\n" not in c.buf:
        c.fill()
        if t_hdr is None:
            t_hdr = clock()
    head, _, rest = c.buf.partition(b"\r\n\r\n")
    c.buf = rest
    if found(rest) and t_data is None:
        t_data = clock()
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers[k.strip().lower()] = v.strip().lower()
    body = bytearray()
    if headers.get(b"transfer-encoding", b"").endswith(b"chunked"):
        while True:
            while b"\r\n" not in c.buf:
                c.fill()
                if t_data is None and found(c.buf):
                    t_data = clock()
            size_line, _, c.buf = c.buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(c.buf) < size + 2:
                c.fill()
                if t_data is None and found(c.buf):
                    t_data = clock()
            body += c.buf[:size]
            c.buf = c.buf[size + 2:]
            if size == 0:
                break  # no trailers expected
    else:
        n = int(headers.get(b"content-length", b"0"))
        while len(c.buf) < n:
            c.fill()
            if t_data is None and found(c.buf):
                t_data = clock()
        body += c.buf[:n]
        c.buf = c.buf[n:]
    t_full = clock()
    if headers.get(b"connection") == b"close":
        c.connect()
    if t_data is None and found(bytes(body)):
        t_data = t_full
    return (status, t_hdr - t0, (t_data - t0) if t_data else None, t_full - t0,
            b"data: [DONE]" in body, bytes(body[:300]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--body", default=DEFAULT_BODY)
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop early after this long")
    a = ap.parse_args()

    u = urlsplit(a.url)
    host, port = u.hostname, u.port or 80
    body = a.body.encode()
    hdrs = [f"POST {u.path or '/'} HTTP/1.1", f"Host: {host}:{port}",
            "Content-Type: application/json", f"Authorization: Bearer {DEFAULT_KEY}",
            "Accept: text/event-stream", f"Content-Length: {len(body)}"] + a.header
    req = ("\r\n".join(hdrs) + "\r\n\r\n").encode() + body

    clock = time.perf_counter_ns
    c = Conn(host, port, a.timeout)
    c.connect()
    first, hdr, full = [], [], []
    errors = non200 = done = 0
    deadline = time.monotonic() + a.max_seconds
    sample_bad = None
    for i in range(a.warmup + a.n):
        if time.monotonic() > deadline:
            print(f"ttfb.py: stopped after {a.max_seconds}s at request {i}", file=sys.stderr)
            break
        try:
            status, th, td, tf, saw_done, head = one_request(c, req, clock)
        except (OSError, ValueError, IndexError) as e:
            errors += 1
            if errors <= 3:
                print(f"ttfb.py: request error: {e!r}", file=sys.stderr)
            if errors > 50:
                break
            c.connect()
            continue
        if i < a.warmup:
            continue
        if status != 200:
            non200 += 1
            sample_bad = sample_bad or (status, head)
            continue
        if td is None:
            errors += 1
            sample_bad = sample_bad or (status, head)
            continue
        done += int(saw_done)
        first.append(td / 1000.0)
        hdr.append(th / 1000.0)
        full.append(tf / 1000.0)
    if sample_bad:
        print(f"ttfb.py: unexpected response {sample_bad[0]}: {sample_bad[1][:200]!r}", file=sys.stderr)
    first.sort(); hdr.sort(); full.sort()
    mean = statistics.fmean(first) if first else float("nan")
    print("TTFB n=%d errors=%d non200=%d first_data_p50=%.1f p90=%.1f p99=%.1f max=%.1f mean=%.1f "
          "hdr_p50=%.1f full_p50=%.1f full_p99=%.1f dones=%d" % (
              len(first), errors, non200, percentile(first, 50), percentile(first, 90),
              percentile(first, 99), first[-1] if first else float("nan"), mean,
              percentile(hdr, 50), percentile(full, 50), percentile(full, 99), done))


if __name__ == "__main__":
    main()
