-- Copy of /work/shared/bench-peers/chat.lua (same body, headers and BENCH line, so figures compare).
-- wrk script: POST a small OpenAI chat completion body.
-- Extra headers can be injected via env var WRK_HEADERS="Name: value; Name2: value2".
wrk.method = "POST"
wrk.body   = os.getenv("WRK_BODY") or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"]  = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("WRK_API_KEY") or "sk-bench-6f1c2a9e4b7d8035e1f2a3b4c5d6e7f8")

local extra = os.getenv("WRK_HEADERS")
if extra and #extra > 0 then
  for pair in string.gmatch(extra, "[^;]+") do
    local k, v = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
    if k then wrk.headers[k] = v end
  end
end

-- Set WRK_DEBUG=1 to print the first few non-200 bodies (costs client CPU, so off by default).
if os.getenv("WRK_DEBUG") == "1" then
  local non2xx = 0
  response = function(status, headers, body)
    if status ~= 200 then
      non2xx = non2xx + 1
      if non2xx <= 3 then io.stderr:write("non-200 status " .. status .. ": " .. string.sub(body or "", 1, 300) .. "\n") end
    end
  end
end

done = function(summary, latency, requests)
  -- machine-readable line parsed by run.sh (latencies in microseconds)
  io.write(string.format("BENCH rps=%.1f p50=%d p90=%d p99=%d max=%d mean=%.1f reqs=%d errs_connect=%d errs_read=%d errs_write=%d errs_status=%d errs_timeout=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    summary.requests, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
