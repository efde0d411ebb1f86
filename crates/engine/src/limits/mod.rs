//! Request-rate limits: GCRA (the generic cell rate algorithm) per opaque key
//! such as `key:abc:chat`, in memory for one instance or in Redis for many.
//!
//! Both backends share `decide`, so a decision means the same thing
//! wherever it was taken, and a property test holds them to identical
//! answers. The limiter only answers; whether a failing backend lets
//! requests through (fail-open) or refuses them is the caller's choice, made
//! on [`LimitError::Backend`] or [`LimitError::Timeout`]. A limiter never
//! silently allows.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT). With
//! emission interval `T = period / count` and tolerance `τ = count × T`
//! (the period, less under 1 µs per request when it does not divide evenly),
//! a request of `cost` at `now` is allowed iff
//! `max(tat, now) + cost × T − now ≤ τ`, and then `tat` becomes
//! `max(tat, now) + cost × T`. A fresh key may therefore send `count` at once.
//! All arithmetic is in integer microseconds.

mod clock;
mod memory;
mod redis;

#[cfg(test)]
mod tests;

use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::limits::Rate;

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use memory::MemoryLimiter;
pub use redis::{RedisLimiter, DEFAULT_NAMESPACE};

/// The answer to one check, with what the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The rate's count: requests per period, and the burst.
    pub limit: u32,
    /// The rate's period, the `w` of `RateLimit-Policy`.
    pub period: Duration,
    /// Requests of cost 1 that would be allowed right now, after this one.
    pub remaining: u32,
    /// Until the key is back to a full quota of `limit`.
    pub reset_after: Duration,
    /// Some when refused: the wait after which the same request would pass.
    pub retry_after: Option<Duration>,
}

/// Why a check could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The caller asked for more than a full quota: no wait would help.
    #[error("cost {cost} exceeds the limit of {limit} per period and could never be allowed")]
    CostTooLarge { cost: u32, limit: u32 },
    /// The configured Redis URL is not one the client accepts.
    #[error("invalid rate-limit Redis URL")]
    InvalidUrl(#[source] ::redis::RedisError),
    /// The shared store failed or did not answer in time. The check was not
    /// taken; the caller decides between failing open and closed.
    #[error("rate-limit store unavailable")]
    Backend(#[source] ::redis::RedisError),
    /// The shared store did not answer in time (it may be reconnecting).
    #[error("rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
}

impl LimitError {
    /// Stable snake_case code for logs and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            LimitError::CostTooLarge { .. } => "rate_limit_cost_too_large",
            LimitError::InvalidUrl(_) => "rate_limit_invalid_url",
            LimitError::Backend(_) | LimitError::Timeout(_) => "rate_limit_unavailable",
        }
    }
}

/// A rate limiter shared by every request of one process.
#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Counts `cost` against `key` under `rate`, if it fits. A refused
    /// request changes nothing; cost 0 only reports the current state.
    async fn check(&self, key: &str, rate: Rate, cost: u32) -> Result<Decision, LimitError>;

    /// Counts `cost` against every key under its rate, all or nothing, in
    /// one atomic step: when any key refuses, none is spent, so a request
    /// refused by one limit takes nothing from the others. One decision per
    /// key, in order; those of keys that would have allowed say what
    /// spending would have left. The keys must differ.
    async fn check_all(
        &self,
        checks: &[(&str, Rate)],
        cost: u32,
    ) -> Result<Vec<Decision>, LimitError>;

    /// Forgets every key that starts with `key_prefix` (`""` forgets all);
    /// returns how many were dropped.
    async fn reset(&self, key_prefix: &str) -> Result<u64, LimitError>;

    /// Counts `cost` against `key` unconditionally, after the fact (the
    /// tokens a finished call used). The TAT may then run past the
    /// tolerance: checks of that key are refused until it has drained.
    async fn charge(&self, key: &str, rate: Rate, cost: u64) -> Result<(), LimitError>;
}

/// The GCRA parameters of a rate, in microseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gcra {
    /// Emission interval T.
    pub t: u64,
    /// Tolerance τ = count × T: how far ahead of now the TAT may run.
    pub tol: u64,
}

impl Gcra {
    pub fn of(rate: Rate) -> Self {
        let t = rate.emission_interval_us();
        // T ≥ 1 and count × T < period + count ≤ 366 days + 2^32 µs: no
        // overflow, no zero.
        Self {
            t,
            tol: t * u64::from(rate.count()),
        }
    }

    /// Refuses a cost no wait could satisfy, so `cost × T ≤ τ` from here on.
    pub fn checked(rate: Rate, cost: u32) -> Result<Self, LimitError> {
        if cost > rate.count() {
            return Err(LimitError::CostTooLarge {
                cost,
                limit: rate.count(),
            });
        }
        Ok(Self::of(rate))
    }

    /// One GCRA step against a stored TAT (`None` or past: a full quota).
    /// Returns whether it is allowed, the TAT to store when allowed, and
    /// `lead`: how far the resulting TAT runs ahead of `now`.
    pub fn step(self, tat: Option<u64>, now: u64, cost: u32) -> Step {
        let base = tat.map_or(now, |tat| tat.max(now));
        let new_tat = base + u64::from(cost) * self.t;
        if new_tat - now <= self.tol {
            Step {
                allowed: true,
                lead: new_tat - now,
                new_tat,
            }
        } else {
            Step {
                allowed: false,
                lead: base - now,
                new_tat: base,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step {
    pub allowed: bool,
    /// `tat − now` after the step (unchanged TAT when refused), in µs.
    pub lead: u64,
    pub new_tat: u64,
}

/// The decision for a step, from the two numbers every backend reports.
/// Shared so that memory and Redis cannot drift apart.
pub(crate) fn decide(rate: Rate, cost: u32, allowed: bool, lead_us: u64) -> Decision {
    let g = Gcra::of(rate);
    let remaining = g.tol.saturating_sub(lead_us) / g.t;
    let retry_after = (!allowed).then(|| {
        let wait = (lead_us + u64::from(cost) * g.t).saturating_sub(g.tol);
        Duration::from_micros(wait)
    });
    Decision {
        allowed,
        limit: rate.count(),
        period: rate.period(),
        remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
        reset_after: Duration::from_micros(lead_us),
        retry_after,
    }
}

impl Decision {
    /// The response headers for this decision under the policy named
    /// `policy` (the route class), per draft-ietf-httpapi-ratelimit-headers:
    /// `RateLimit-Policy: "chat";q=20;w=60`, `RateLimit: "chat";r=17;t=3`
    /// (`t`: seconds until the quota is full again, rounded up), and
    /// `Retry-After` in whole seconds (rounded up, at least 1) when refused.
    ///
    /// Names are lower case, as HTTP/2 writes them and as
    /// `http::HeaderName::from_static` requires.
    pub fn headers(&self, policy: &str) -> Vec<(&'static str, String)> {
        let name = sf_string(policy);
        let window = self.period.as_secs() + u64::from(self.period.subsec_nanos() > 0);
        let mut out = Vec::with_capacity(3);
        out.push((
            "ratelimit-policy",
            format!("{name};q={};w={window}", self.limit),
        ));
        out.push((
            "ratelimit",
            format!(
                "{name};r={};t={}",
                self.remaining,
                ceil_secs(self.reset_after)
            ),
        ));
        if let Some(wait) = self.retry_after {
            out.push(("retry-after", ceil_secs(wait).max(1).to_string()));
        }
        out
    }
}

impl Decision {
    /// After a cost-0 look at `rate` that found nothing left: the wait until
    /// one more is regained, `TAT + T − τ − now` (the quota regains one
    /// every T).
    pub fn wait_for_one(&self, rate: Rate) -> Duration {
        let t = Duration::from_micros(rate.emission_interval_us());
        (self.reset_after + t).saturating_sub(t * rate.count())
    }

    /// The same decision in the headers OpenAI sends, which OpenAI-ecosystem
    /// clients and routers read: `x-ratelimit-limit-requests`,
    /// `x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` (time
    /// until the quota is full again, as OpenAI writes it: `1s`, `6m0s`,
    /// `20ms`).
    pub fn openai_headers(&self) -> [(&'static str, String); 3] {
        self.openai_headers_named([
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ])
    }

    /// A token-per-minute decision as OpenAI's `x-ratelimit-limit-tokens`,
    /// `x-ratelimit-remaining-tokens` and `x-ratelimit-reset-tokens`.
    pub fn openai_token_headers(&self) -> [(&'static str, String); 3] {
        self.openai_headers_named([
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ])
    }

    fn openai_headers_named(
        &self,
        [limit, remaining, reset]: [&'static str; 3],
    ) -> [(&'static str, String); 3] {
        [
            (limit, self.limit.to_string()),
            (remaining, self.remaining.to_string()),
            (reset, go_duration(self.reset_after)),
        ]
    }
}

/// A duration as Go prints one, the way OpenAI's reset headers read:
/// milliseconds below a second (rounded up), else whole seconds (rounded
/// up) with minutes and hours in front when there are any.
fn go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_micros().div_ceil(1000));
    }
    let s = ceil_secs(d);
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A structured-field string (RFC 8941 §3.3.3): quoted, `"` and `\` escaped,
/// anything outside printable ASCII dropped.
fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}
