//! A circuit breaker per deployment: closed → open after N consecutive
//! failures → half-open after a cool-down, letting a bounded number of probe
//! requests through → closed after M consecutive successes; a failed probe
//! re-opens it. An open breaker costs no upstream call.
//!
//! Time comes from `tokio::time::Instant`, so tests drive it with a paused clock.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub cooldown: Duration,
    /// Probes allowed in flight at once while half-open.
    pub half_open_probes: u32,
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown: Duration::from_secs(60),
            half_open_probes: 1,
            success_threshold: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// For the state gauge: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change of state, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    consecutive_successes: u32,
    opened_at: Option<Instant>,
    /// Probes of the current half-open period in flight.
    probes_in_flight: u32,
    /// Counts changes of state. A permit remembers the one it was issued
    /// in, and its outcome counts only if the state has not changed since:
    /// a call that started before the breaker opened must neither close it
    /// from half-open (its success says nothing about the recovery) nor
    /// re-open it, and its probe slot belongs to a period that is over.
    generation: u64,
}

impl Inner {
    fn set_state(&mut self, state: BreakerState) {
        self.state = state;
        self.generation += 1;
        self.probes_in_flight = 0;
    }
}

/// Clones share their state: one upstream (provider and model) has one
/// breaker, whichever aliases and timeouts reach it.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    inner: Arc<Mutex<Inner>>,
}

/// Leave to make one call. Report its outcome with [`Permit::success`] or
/// [`Permit::failure`]; dropping it unreported (the caller gave up) frees a
/// probe slot without counting either way.
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Mutex<Inner>>,
    config: BreakerConfig,
    probe: bool,
    settled: bool,
    generation: u64,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            inner: Arc::new(Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                consecutive_successes: 0,
                opened_at: None,
                probes_in_flight: 0,
                generation: 0,
            })),
        }
    }

    /// The state now (an open breaker whose cool-down has passed reads as
    /// half-open). Reading changes nothing: the move to half-open happens,
    /// and is reported as a transition, when a request asks for a permit, so
    /// that it is logged and counted with the trace of that request.
    pub fn state(&self) -> BreakerState {
        let inner = lock(&self.inner);
        if self.cooled_down(&inner, Instant::now()) {
            BreakerState::HalfOpen
        } else {
            inner.state
        }
    }

    /// How long until a call may be tried: while open, what is left of the
    /// cool-down; while half-open with every probe slot taken, a second
    /// (the probe's answer is near); `None` when a call may go now.
    pub fn retry_in(&self) -> Option<Duration> {
        let inner = lock(&self.inner);
        if self.cooled_down(&inner, Instant::now()) {
            // A probe may go now (the next request makes the move).
            return Some(Duration::ZERO);
        }
        match inner.state {
            BreakerState::Open => Some(inner.opened_at.map_or(self.config.cooldown, |at| {
                self.config.cooldown.saturating_sub(at.elapsed())
            })),
            BreakerState::HalfOpen if inner.probes_in_flight >= self.config.half_open_probes => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }

    /// A permit to call, or `None` while open (or while half-open with every
    /// probe slot taken). Also returns the transition to half-open, if this
    /// call caused it.
    pub fn try_acquire(&self) -> (Option<Permit>, Option<Transition>) {
        let mut inner = lock(&self.inner);
        let transition = self.refresh(&mut inner, Instant::now());
        let probe = match inner.state {
            BreakerState::Closed => false,
            BreakerState::Open => return (None, transition),
            BreakerState::HalfOpen if inner.probes_in_flight >= self.config.half_open_probes => {
                return (None, transition)
            }
            BreakerState::HalfOpen => {
                inner.probes_in_flight += 1;
                true
            }
        };
        let permit = Permit {
            inner: self.inner.clone(),
            config: self.config,
            probe,
            settled: false,
            generation: inner.generation,
        };
        (Some(permit), transition)
    }

    fn cooled_down(&self, inner: &Inner, now: Instant) -> bool {
        inner.state == BreakerState::Open
            && inner
                .opened_at
                .is_some_and(|t| now.duration_since(t) >= self.config.cooldown)
    }

    fn refresh(&self, inner: &mut Inner, now: Instant) -> Option<Transition> {
        if self.cooled_down(inner, now) {
            inner.set_state(BreakerState::HalfOpen);
            inner.consecutive_successes = 0;
            return Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen,
            });
        }
        None
    }
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(mut self) -> Option<Transition> {
        self.settled = true;
        let mut inner = lock(&self.inner);
        if inner.generation != self.generation {
            return None; // issued in a state that is over
        }
        if self.probe {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
        inner.consecutive_failures = 0;
        match inner.state {
            BreakerState::HalfOpen => {
                inner.consecutive_successes += 1;
                if inner.consecutive_successes >= self.config.success_threshold {
                    inner.set_state(BreakerState::Closed);
                    inner.opened_at = None;
                    inner.consecutive_successes = 0;
                    return Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Closed,
                    });
                }
                None
            }
            _ => None,
        }
    }

    pub fn failure(mut self) -> Option<Transition> {
        self.settled = true;
        let mut inner = lock(&self.inner);
        if inner.generation != self.generation {
            return None; // issued in a state that is over
        }
        if self.probe {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
        }
        inner.consecutive_successes = 0;
        match inner.state {
            BreakerState::Closed => {
                inner.consecutive_failures += 1;
                if inner.consecutive_failures >= self.config.failure_threshold {
                    inner.set_state(BreakerState::Open);
                    inner.opened_at = Some(Instant::now());
                    return Some(Transition {
                        from: BreakerState::Closed,
                        to: BreakerState::Open,
                    });
                }
                None
            }
            BreakerState::HalfOpen => {
                inner.set_state(BreakerState::Open);
                inner.opened_at = Some(Instant::now());
                inner.consecutive_failures = self.config.failure_threshold;
                Some(Transition {
                    from: BreakerState::HalfOpen,
                    to: BreakerState::Open,
                })
            }
            // Not reached: no permit is issued while open.
            BreakerState::Open => None,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            let mut inner = lock(&self.inner);
            if inner.generation == self.generation {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig::default())
    }

    fn fail(b: &CircuitBreaker) -> Option<Transition> {
        b.try_acquire().0.expect("permit").failure()
    }

    fn succeed(b: &CircuitBreaker) -> Option<Transition> {
        b.try_acquire().0.expect("permit").success()
    }

    const OPEN: Option<Transition> = Some(Transition {
        from: BreakerState::Closed,
        to: BreakerState::Open,
    });

    #[tokio::test(start_paused = true)]
    async fn opens_after_five_consecutive_failures_and_rejects_without_calling() {
        let b = breaker();
        for _ in 0..4 {
            assert_eq!(fail(&b), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(fail(&b), OPEN);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().0.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_count() {
        let b = breaker();
        for _ in 0..4 {
            fail(&b);
        }
        succeed(&b);
        for _ in 0..4 {
            assert_eq!(fail(&b), None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_full_cycle_follows_the_exact_sequence_of_states() {
        let b = breaker();
        let mut states = vec![b.state()];
        for _ in 0..5 {
            fail(&b);
        }
        states.push(b.state());
        tokio::time::advance(Duration::from_secs(59)).await;
        states.push(b.state());
        assert!(b.try_acquire().0.is_none(), "still cooling down at 59 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        let (probe, t) = b.try_acquire();
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            })
        );
        let probe = probe.expect("a probe at 60 s");
        assert!(probe.is_probe());
        assert!(b.try_acquire().0.is_none(), "one probe at a time");
        states.push(b.state());
        assert_eq!(probe.success(), None);
        assert_eq!(succeed(&b), None);
        states.push(b.state());
        assert_eq!(
            succeed(&b),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        states.push(b.state());
        use BreakerState::*;
        assert_eq!(states, [Closed, Open, Open, HalfOpen, HalfOpen, Closed]);
    }

    #[tokio::test(start_paused = true)]
    async fn reading_the_state_leaves_the_move_to_half_open_to_the_next_request() {
        // Regression (issue 3): the admin API and the health task read the
        // state; that read used to make the move to half-open itself and drop
        // the transition, so it was never logged, counted or put in the gauge.
        let b = breaker();
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.state(), BreakerState::HalfOpen);

        let (probe, t) = b.try_acquire();

        assert!(probe.expect("a probe").is_probe());
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_full_cooldown() {
        let b = breaker();
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            fail(&b),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Open
            })
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(b.try_acquire().0.is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_acquire().0.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_its_slot() {
        let b = breaker();
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let probe = b.try_acquire().0.expect("probe");
        drop(probe);
        assert!(b.try_acquire().0.is_some());
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_from_before_the_breaker_opened_do_not_close_it() {
        let b = breaker();
        // Three slow calls start while closed, then five others fail.
        let slow: Vec<Permit> = (0..3).map(|_| b.try_acquire().0.expect("closed")).collect();
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let probe = b.try_acquire().0.expect("a probe");
        // The slow calls end well now: that says nothing of the recovery.
        for p in slow {
            assert_eq!(p.success(), None);
        }
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().0.is_none(), "the probe is still in flight");
        // Three probes of this period close it.
        assert_eq!(probe.success(), None);
        assert_eq!(succeed(&b), None);
        assert_eq!(succeed(&b).map(|t| t.to), Some(BreakerState::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_failure_neither_reopens_nor_frees_a_probe_slot() {
        let b = breaker();
        let slow = b.try_acquire().0.expect("closed");
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let p1 = b.try_acquire().0.expect("a probe");
        // The call from the closed period fails during half-open.
        assert_eq!(slow.failure(), None);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().0.is_none(), "p1 is still in flight");
        assert_eq!(p1.success(), None);
        let p2 = b.try_acquire().0.expect("the next probe");
        assert!(b.try_acquire().0.is_none());
        assert_eq!(p2.success(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_of_an_earlier_half_open_period_takes_no_slot_of_the_next() {
        let b = CircuitBreaker::new(BreakerConfig {
            half_open_probes: 2,
            ..BreakerConfig::default()
        });
        for _ in 0..5 {
            fail(&b);
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let slow_probe = b.try_acquire().0.expect("probe 1 of period 1");
        let failing = b.try_acquire().0.expect("probe 2 of period 1");
        assert_eq!(failing.failure().map(|t| t.to), Some(BreakerState::Open));
        tokio::time::advance(Duration::from_secs(60)).await;
        let p2 = b.try_acquire().0.expect("probe 1 of period 2");
        // Period 1's probe ends now: not counted, and its end frees nothing.
        assert_eq!(slow_probe.success(), None);
        let p3 = b.try_acquire().0.expect("probe 2 of period 2");
        assert!(b.try_acquire().0.is_none(), "two probes at most");
        drop((p2, p3));
    }
}
