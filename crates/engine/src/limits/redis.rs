//! The shared limiter: every instance runs the same GCRA step as one Lua
//! script inside Redis, so checks on a key are serialised by Redis itself and
//! any number of instances share one limit.
//!
//! The script reads Redis's clock (`TIME`), not the caller's, so instances
//! with skewed clocks still agree. A key lives until its quota is full again
//! (its TTL), after which it is gone, which GCRA reads as a full quota.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};
use async_trait::async_trait;
use switchyard_core::limits::Rate;

use super::{decide, Decision, Gcra, LimitError, RateLimiter};

/// Prefix of every key this limiter writes, so `reset("")` cannot touch
/// anything else in a shared Redis.
pub const DEFAULT_NAMESPACE: &str = "sy:rl:";

/// A check (or one reset round trip) that takes longer than this fails with
/// [`LimitError::Timeout`] instead of holding the request, including while
/// the connection is being re-established.
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnection attempts (100 ms, 200 ms, … jittered, capped at 1 s) before
/// one reconnection gives up; the next failing check starts another.
const CONNECTION_RETRIES: usize = 3;
const SCAN_BATCH: usize = 1000;

/// One GCRA step; the same arithmetic as [`Gcra::step`]. Lua numbers are
/// doubles, exact for integers below 2^53: Unix microseconds plus a period
/// of at most 366 days stay far below that.
///
/// KEYS[1] the key. ARGV: T µs, τ µs, cost, and optionally `now_us` — only
/// tests pass it, to replay a sequence of arrivals at chosen times.
/// Returns {allowed (1/0), lead µs: TAT − now after the step}.
const GCRA_LUA: &str = r"
local t = tonumber(ARGV[1])
local tol = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
local slack_ms = 1
if ARGV[4] and ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
  -- Replayed time runs ahead of the real clock that expires keys: keep
  -- them long enough that expiry never overtakes the replay.
  slack_ms = 600000
else
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '') or now
local base = math.max(tat, now)
local new_tat = base + cost * t
if new_tat - now <= tol then
  if cost > 0 then
    -- +slack: PX counts whole milliseconds; the key must outlive its TAT.
    local ttl_ms = math.ceil((new_tat - now) / 1000) + slack_ms
    redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
  end
  return {1, new_tat - now}
end
return {0, base - now}
";

static GCRA_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA_LUA));

/// [`GCRA_LUA`] over several keys, all or nothing: each key is stepped;
/// only when every one allows are their TATs stored.
///
/// KEYS: the keys. ARGV[1] cost, ARGV[2] `now_us` or '' (tests only, as in
/// [`GCRA_LUA`]), then T µs and τ µs per key. Returns {allowed, lead} per key.
const GCRA_ALL_LUA: &str = r"
local cost = tonumber(ARGV[1])
local now
local slack_ms = 1
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
  slack_ms = 600000
else
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local out = {}
local tats = {}
local all = true
for i = 1, #KEYS do
  local t = tonumber(ARGV[1 + 2 * i])
  local tol = tonumber(ARGV[2 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '') or now
  local base = math.max(tat, now)
  local new_tat = base + cost * t
  if new_tat - now <= tol then
    out[2 * i - 1] = 1
    out[2 * i] = new_tat - now
    tats[i] = new_tat
  else
    out[2 * i - 1] = 0
    out[2 * i] = base - now
    all = false
  end
end
if all and cost > 0 then
  for i = 1, #KEYS do
    local ttl_ms = math.ceil((tats[i] - now) / 1000) + slack_ms
    redis.call('SET', KEYS[i], string.format('%.0f', tats[i]), 'PX', ttl_ms)
  end
end
return out
";

static GCRA_ALL_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA_ALL_LUA));

/// KEYS[1] the key. ARGV: T µs, cost. Moves the TAT forward unconditionally.
const CHARGE_LUA: &str = r"
local t = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '') or now
local new_tat = math.max(tat, now) + cost * t
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return 1
";

static CHARGE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CHARGE_LUA));

/// A limiter whose state lives in Redis. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisLimiter {
    conn: ConnectionManager,
    namespace: String,
}

impl RedisLimiter {
    /// Connects to `url` (`redis://…`), failing if Redis cannot be reached.
    /// Later, a lost connection is re-established in the background while
    /// checks fail with [`LimitError::Backend`] or [`LimitError::Timeout`].
    pub async fn connect(url: &str) -> Result<Self, LimitError> {
        let client = Client::open(url).map_err(LimitError::InvalidUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(CHECK_TIMEOUT))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT))
            .set_number_of_retries(CONNECTION_RETRIES)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(LimitError::Backend)?;
        Ok(Self {
            conn,
            namespace: DEFAULT_NAMESPACE.to_owned(),
        })
    }

    /// Keys are written as `namespace + key`; the default is
    /// [`DEFAULT_NAMESPACE`]. Tests use one namespace each.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The check at an explicit time instead of Redis's clock, so a test can
    /// replay the arrivals it gave the in-memory limiter.
    #[cfg(test)]
    pub(crate) async fn check_at_us(
        &self,
        key: &str,
        rate: Rate,
        cost: u32,
        now_us: u64,
    ) -> Result<Decision, LimitError> {
        self.run(key, rate, cost, Some(now_us)).await
    }

    async fn run(
        &self,
        key: &str,
        rate: Rate,
        cost: u32,
        now_us: Option<u64>,
    ) -> Result<Decision, LimitError> {
        let gcra = Gcra::checked(rate, cost)?;
        let mut invocation = GCRA_SCRIPT.key(self.full_key(key));
        invocation.arg(gcra.t).arg(gcra.tol).arg(cost);
        if let Some(now) = now_us {
            invocation.arg(now);
        }
        let (allowed, lead): (i64, i64) = bounded(|| self.invoke(&invocation)).await?;
        let lead = u64::try_from(lead).unwrap_or(0);
        Ok(decide(rate, cost, allowed == 1, lead))
    }

    /// [`RateLimiter::check_all`], optionally at an explicit time (tests).
    pub(crate) async fn run_all(
        &self,
        checks: &[(&str, Rate)],
        cost: u32,
        now_us: Option<u64>,
    ) -> Result<Vec<Decision>, LimitError> {
        let mut invocation = GCRA_ALL_SCRIPT.prepare_invoke();
        invocation.arg(cost);
        match now_us {
            Some(now) => invocation.arg(now),
            None => invocation.arg(""),
        };
        for (key, rate) in checks {
            let gcra = Gcra::checked(*rate, cost)?;
            invocation.key(self.full_key(key)).arg(gcra.t).arg(gcra.tol);
        }
        let out: Vec<i64> = bounded(|| self.invoke(&invocation)).await?;
        if out.len() != 2 * checks.len() {
            return Err(LimitError::Backend(::redis::RedisError::from((
                ::redis::ErrorKind::UnexpectedReturnType,
                "the limit script answered with the wrong number of values",
            ))));
        }
        Ok(checks
            .iter()
            .zip(out.chunks_exact(2))
            .map(|((_, rate), v)| decide(*rate, cost, v[0] == 1, u64::try_from(v[1]).unwrap_or(0)))
            .collect())
    }

    /// One run of a script on a handle of the shared connection (for
    /// [`bounded`], which may run it twice).
    fn invoke<'a, T: ::redis::FromRedisValue>(
        &self,
        invocation: &'a ::redis::ScriptInvocation<'_>,
    ) -> impl std::future::Future<Output = ::redis::RedisResult<T>> + use<'a, '_, T> {
        let mut conn = self.conn.clone();
        async move { invocation.invoke_async(&mut conn).await }
    }

    /// [`Self::invoke`] for a plain command.
    fn query<'a, T: ::redis::FromRedisValue>(
        &self,
        cmd: &'a ::redis::Cmd,
    ) -> impl std::future::Future<Output = ::redis::RedisResult<T>> + use<'a, T> {
        let mut conn = self.conn.clone();
        async move { cmd.query_async(&mut conn).await }
    }

    fn full_key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.namespace.len() + key.len());
        k.push_str(&self.namespace);
        k.push_str(key);
        k
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    async fn check(&self, key: &str, rate: Rate, cost: u32) -> Result<Decision, LimitError> {
        self.run(key, rate, cost, None).await
    }

    async fn check_all(
        &self,
        checks: &[(&str, Rate)],
        cost: u32,
    ) -> Result<Vec<Decision>, LimitError> {
        self.run_all(checks, cost, None).await
    }

    async fn charge(&self, key: &str, rate: Rate, cost: u64) -> Result<(), LimitError> {
        let mut invocation = CHARGE_SCRIPT.key(self.full_key(key));
        invocation.arg(Gcra::of(rate).t).arg(cost);
        let _: i64 = bounded(|| self.invoke(&invocation)).await?;
        Ok(())
    }

    /// SCAN + UNLINK over `namespace + prefix*`. Not atomic: a key written
    /// while the scan runs may survive, which a reset tolerates.
    async fn reset(&self, key_prefix: &str) -> Result<u64, LimitError> {
        let pattern = format!("{}*", glob_escape(&self.full_key(key_prefix)));
        let mut cursor: u64 = 0;
        let mut dropped = 0u64;
        loop {
            let scan = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_BATCH)
                .to_owned();
            let (next, keys): (u64, Vec<Vec<u8>>) = bounded(|| self.query(&scan)).await?;
            if !keys.is_empty() {
                let unlink = ::redis::cmd("UNLINK").arg(keys).to_owned();
                let n: u64 = bounded(|| self.query(&unlink)).await?;
                dropped += n;
            }
            if next == 0 {
                return Ok(dropped);
            }
            cursor = next;
        }
    }
}

/// One Redis call (made again if its connection had dropped, see
/// [`crate::redis_retry`]: a check that ran twice counts twice and refuses
/// early, never late), failed after [`CHECK_TIMEOUT`].
async fn bounded<T, F, Fut>(call: F) -> Result<T, LimitError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ::redis::RedisResult<T>>,
{
    match tokio::time::timeout(
        CHECK_TIMEOUT,
        crate::redis_retry::once_more_if_dropped(call),
    )
    .await
    {
        Ok(result) => result.map_err(LimitError::Backend),
        Err(_) => Err(LimitError::Timeout(CHECK_TIMEOUT)),
    }
}

/// Escapes Redis glob metacharacters so a prefix matches only itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
