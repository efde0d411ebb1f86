#!/usr/bin/env bash
# Per-request cost of authentication (credential-cache hit) plus the two
# in-memory rate-limit checks the middleware makes, and the latency of one
# Redis-backed check on loopback. Release build; prints the figures.
#
#   bench/auth.sh        # needs a Redis for the second figure: SWITCHYARD_TEST_REDIS_URL
#                        # (scripts/services.sh starts one; without it that part is skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release -q -p switchyard-engine --lib -- --ignored --exact \
  identity::tests::auth_hit_and_memory_limit_cost_is_reported --nocapture 2>&1 | grep AUTH_LIMIT_COST_US
if [ -n "${SWITCHYARD_TEST_REDIS_URL:-}" ]; then
  cargo test --release -q -p switchyard-engine --lib -- --ignored --nocapture \
    redis_check_latency_is_reported memory_check_cost_is_reported 2>&1 | grep -iE "p50|p99|per check|µs|us" | head -10
fi
