//! When and how long to retry: which failures are worth another attempt,
//! exponential backoff with full jitter, `Retry-After`, and a retry budget
//! that caps retries at a fraction of recent traffic so that retries cannot
//! multiply an outage.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::ProviderError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Attempts per deployment, the first included (1 = never retry).
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 2,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        }
    }
}

/// Whether another attempt (here or at a fallback) may succeed.
pub fn is_retryable(e: &ProviderError) -> bool {
    match e {
        ProviderError::Connect(_) | ProviderError::Timeout(_) => true,
        ProviderError::Overloaded { .. } => true,
        ProviderError::Status { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504 | 529),
        // Before the first byte (the only time the router sees these).
        ProviderError::Broken(_) | ProviderError::Truncated | ProviderError::Protocol(_) => true,
        ProviderError::ShuttingDown => false,
    }
}

/// A refusal that says the deployment is wrong, not the request: its key
/// (401, 403), its account (402), or a 404 whose body names the model or
/// deployment (`model_not_found`, "The model `x` does not exist",
/// `DeploymentNotFound`); a 404 about something the request names (a file,
/// a container) stays the request's. Another attempt here would be refused
/// the same way, but the next deployment may serve, and the breaker counts
/// it as a failure (a revoked key must not pass for a healthy deployment).
pub fn is_deployment_fault(e: &ProviderError) -> bool {
    match e {
        ProviderError::Status {
            status: 401..=403, ..
        } => true,
        ProviderError::Status {
            status: 404, body, ..
        } => {
            let body = body.to_ascii_lowercase();
            memchr::memmem::find(&body, b"model").is_some()
                || memchr::memmem::find(&body, b"deployment").is_some()
        }
        _ => false,
    }
}

/// The ceiling of the backoff before retry number `retry` (0-based):
/// `min(cap, base · 2^retry)`.
pub fn backoff_ceiling(config: &RetryConfig, retry: u32) -> Duration {
    let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
    config.base.saturating_mul(factor).min(config.cap)
}

/// Full jitter: uniformly random in `[0, ceiling]`.
pub fn backoff(config: &RetryConfig, retry: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = backoff_ceiling(config, retry);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// What to do after a retryable failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long, then try the same deployment again.
    RetryAfter(Duration),
    /// Go to the next deployment now.
    Fallback,
}

/// Decides between waiting for the same deployment and moving on. A
/// `Retry-After` longer than the cap is not waited for: the fallback serves.
pub fn next_step(
    config: &RetryConfig,
    attempt: u32,
    error: &ProviderError,
    rng: &mut impl Rng,
) -> Next {
    if attempt >= config.max_attempts || matches!(error, ProviderError::Overloaded { .. }) {
        return Next::Fallback;
    }
    if let ProviderError::Status {
        retry_after: Some(wait),
        ..
    } = error
    {
        return if *wait > config.cap {
            Next::Fallback
        } else {
            Next::RetryAfter(*wait)
        };
    }
    Next::RetryAfter(backoff(config, attempt - 1, rng))
}

/// Retries allowed as a share of requests over a sliding window of one-second
/// buckets, with a floor so that a quiet service can still retry.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_window: u32,
    inner: Mutex<Buckets>,
}

const BUCKETS: usize = 10;

#[derive(Debug)]
struct Buckets {
    start: Instant,
    /// Index of the current second since `start`.
    current: u64,
    requests: [u32; BUCKETS],
    retries: [u32; BUCKETS],
}

impl RetryBudget {
    /// `ratio` of the requests of the last ten seconds, at least `min_per_window`.
    pub fn new(ratio: f64, min_per_window: u32) -> Self {
        Self {
            ratio,
            min_per_window,
            inner: Mutex::new(Buckets {
                start: Instant::now(),
                current: 0,
                requests: [0; BUCKETS],
                retries: [0; BUCKETS],
            }),
        }
    }

    fn rotate(b: &mut Buckets, now: Instant) {
        let second = now.duration_since(b.start).as_secs();
        if second <= b.current {
            return;
        }
        let gap = (second - b.current).min(BUCKETS as u64);
        for i in 1..=gap {
            let idx = ((b.current + i) % BUCKETS as u64) as usize;
            b.requests[idx] = 0;
            b.retries[idx] = 0;
        }
        b.current = second;
    }

    /// Counts one client request.
    pub fn record_request(&self) {
        let mut b = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Self::rotate(&mut b, Instant::now());
        let idx = (b.current % BUCKETS as u64) as usize;
        b.requests[idx] = b.requests[idx].saturating_add(1);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_retry(&self) -> bool {
        let mut b = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Self::rotate(&mut b, Instant::now());
        let requests: u64 = b.requests.iter().map(|&n| u64::from(n)).sum();
        let retries: u64 = b.retries.iter().map(|&n| u64::from(n)).sum();
        let allowed = (requests as f64 * self.ratio).max(f64::from(self.min_per_window));
        if (retries as f64) < allowed {
            let idx = (b.current % BUCKETS as u64) as usize;
            b.retries[idx] += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rand::SeedableRng;

    fn status(s: u16, retry_after: Option<Duration>) -> ProviderError {
        ProviderError::Status {
            status: s,
            body: Bytes::new(),
            retry_after,
        }
    }

    #[test]
    fn retryable_failures_are_exactly_the_transient_ones() {
        for s in [429, 500, 502, 503, 504, 529] {
            assert!(is_retryable(&status(s, None)), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 413, 422] {
            assert!(!is_retryable(&status(s, None)), "{s}");
        }
        assert!(is_retryable(&ProviderError::Connect("refused".into())));
        assert!(is_retryable(&ProviderError::Timeout(Duration::from_secs(
            1
        ))));
    }

    #[test]
    fn every_backoff_delay_stays_within_its_bound() {
        let config = RetryConfig {
            max_attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        };
        let ceilings: Vec<u128> = (0..7)
            .map(|r| backoff_ceiling(&config, r).as_millis())
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for retry in 0..7 {
            let ceiling = backoff_ceiling(&config, retry);
            let delays: Vec<Duration> = (0..2000)
                .map(|_| backoff(&config, retry, &mut rng))
                .collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter: the whole range is used, not just values near the ceiling.
            assert!(delays.iter().any(|d| *d < ceiling / 10), "retry {retry}");
            assert!(
                delays.iter().any(|d| *d > ceiling * 9 / 10),
                "retry {retry}"
            );
        }
        assert_eq!(backoff_ceiling(&config, 40), Duration::from_secs(2));
    }

    #[test]
    fn retry_after_is_honoured_unless_longer_than_the_cap() {
        let config = RetryConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let short = status(429, Some(Duration::from_millis(1500)));
        assert_eq!(
            next_step(&config, 1, &short, &mut rng),
            Next::RetryAfter(Duration::from_millis(1500))
        );
        let long = status(429, Some(Duration::from_secs(30)));
        assert_eq!(next_step(&config, 1, &long, &mut rng), Next::Fallback);
        assert_eq!(
            next_step(&config, 2, &short, &mut rng),
            Next::Fallback,
            "attempts spent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_fifth_of_recent_requests_with_a_floor() {
        let budget = RetryBudget::new(0.2, 3);
        let granted = (0..10).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 3, "the floor");
        for _ in 0..100 {
            budget.record_request();
        }
        let granted = (0..100).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 20 - 3, "20 % of 100, minus those already taken");
        tokio::time::advance(Duration::from_secs(11)).await;
        let granted = (0..10).filter(|_| budget.try_retry()).count();
        assert_eq!(granted, 3, "the window slid past the old traffic");
    }
}
