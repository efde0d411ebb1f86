//! The in-process limiter: one TAT per key in a few mutex-guarded shards.
//!
//! A key whose TAT is in the past holds a full quota, exactly as if it were
//! absent, so such keys are dropped lazily: a shard sweeps itself when it has
//! doubled since its last sweep. Memory therefore stays within about twice
//! the keys active in the last period, at an amortised O(1) per check.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use switchyard_core::limits::Rate;

use super::clock::{Clock, MonotonicClock};
use super::{decide, Decision, Gcra, LimitError, RateLimiter};

/// Enough shards that two cores rarely contend, few enough to sweep cheaply.
const SHARDS: usize = 16;
/// A shard never sweeps below this size: sweeping tiny maps buys nothing.
const MIN_SWEEP_LEN: usize = 1024;

pub struct MemoryLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
}

#[derive(Default)]
struct Shard {
    tats: HashMap<Box<str>, u64>,
    /// Sweep expired keys when `tats` reaches this length.
    sweep_at: usize,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLimiter {
    /// A limiter on the process's monotonic clock.
    pub fn new() -> Self {
        Self::with_clock(Arc::new(MonotonicClock::new()))
    }

    /// A limiter on the given clock; tests pass a [`super::ManualClock`].
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    tats: HashMap::new(),
                    sweep_at: MIN_SWEEP_LEN,
                })
            })
            .collect();
        Self {
            shards,
            hasher: RandomState::new(),
            clock,
        }
    }

    /// The check, without a future: for callers on a synchronous path
    /// (middleware that limits authentication failures, benchmarks).
    pub fn check_now(&self, key: &str, rate: Rate, cost: u32) -> Result<Decision, LimitError> {
        let gcra = Gcra::checked(rate, cost)?;
        let mut shard = self.shard(key);
        // Read the clock under the lock, so that checks on one key see
        // non-decreasing times in the order they take effect.
        let now = self.clock.now_us();
        let step = gcra.step(shard.tats.get(key).copied(), now, cost);
        if step.allowed && cost > 0 {
            if let Some(tat) = shard.tats.get_mut(key) {
                *tat = step.new_tat;
            } else {
                shard.insert(key, step.new_tat, now);
            }
        }
        Ok(decide(rate, cost, step.allowed, step.lead))
    }

    /// [`RateLimiter::check_all`], without a future. The shards involved
    /// are locked together (in index order, so two calls cannot deadlock).
    pub fn check_all_now(
        &self,
        checks: &[(&str, Rate)],
        cost: u32,
    ) -> Result<Vec<Decision>, LimitError> {
        let gcras = checks
            .iter()
            .map(|(_, rate)| Gcra::checked(*rate, cost))
            .collect::<Result<Vec<_>, _>>()?;
        let index: Vec<usize> = checks.iter().map(|(k, _)| self.shard_index(k)).collect();
        let mut order = index.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, lock(&self.shards[i]))).collect();
        let now = self.clock.now_us();
        let mut steps = Vec::with_capacity(checks.len());
        for (((key, _), i), gcra) in checks.iter().zip(&index).zip(&gcras) {
            let shard = guard(&mut guards, *i);
            steps.push(gcra.step(shard.tats.get(*key).copied(), now, cost));
        }
        if cost > 0 && steps.iter().all(|s| s.allowed) {
            for (((key, _), i), step) in checks.iter().zip(&index).zip(&steps) {
                let shard = guard(&mut guards, *i);
                if let Some(tat) = shard.tats.get_mut(*key) {
                    *tat = step.new_tat;
                } else {
                    shard.insert(key, step.new_tat, now);
                }
            }
        }
        Ok(checks
            .iter()
            .zip(&steps)
            .map(|((_, rate), step)| decide(*rate, cost, step.allowed, step.lead))
            .collect())
    }

    /// Moves `key`'s TAT to at least `lead` ahead of now, as another
    /// limiter (a shared one) reported it: a local copy of a remote state,
    /// so that later checks here answer without asking the remote one.
    pub fn hold(&self, key: &str, lead: std::time::Duration) {
        let lead = u64::try_from(lead.as_micros()).unwrap_or(u64::MAX);
        let mut shard = self.shard(key);
        let now = self.clock.now_us();
        let tat = now.saturating_add(lead);
        if let Some(t) = shard.tats.get_mut(key) {
            *t = (*t).max(tat);
        } else {
            shard.insert(key, tat, now);
        }
    }

    /// Keys held, including expired ones not yet swept.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).tats.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(key)])
    }

    fn shard_index(&self, key: &str) -> usize {
        usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0)
    }
}

/// The locked shard `i` among `guards` (which hold every shard asked for).
fn guard<'g, 'a>(guards: &'g mut [(usize, MutexGuard<'a, Shard>)], i: usize) -> &'g mut Shard {
    let at = guards.iter().position(|(j, _)| *j == i).unwrap_or(0);
    &mut guards[at].1
}

impl Shard {
    fn insert(&mut self, key: &str, tat: u64, now: u64) {
        if self.tats.len() >= self.sweep_at {
            self.tats.retain(|_, t| *t > now);
            self.sweep_at = (self.tats.len() * 2).max(MIN_SWEEP_LEN);
        }
        self.tats.insert(key.into(), tat);
    }
}

/// A panic while holding a shard cannot leave a TAT half-written (it is one
/// integer), so a poisoned lock is still safe to use.
fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[async_trait]
impl RateLimiter for MemoryLimiter {
    async fn check(&self, key: &str, rate: Rate, cost: u32) -> Result<Decision, LimitError> {
        self.check_now(key, rate, cost)
    }

    async fn check_all(
        &self,
        checks: &[(&str, Rate)],
        cost: u32,
    ) -> Result<Vec<Decision>, LimitError> {
        self.check_all_now(checks, cost)
    }

    async fn charge(&self, key: &str, rate: Rate, cost: u64) -> Result<(), LimitError> {
        let t = Gcra::of(rate).t;
        let mut shard = self.shard(key);
        let now = self.clock.now_us();
        let base = shard.tats.get(key).copied().unwrap_or(now).max(now);
        let tat = base.saturating_add(cost.saturating_mul(t));
        if let Some(v) = shard.tats.get_mut(key) {
            *v = tat;
        } else {
            shard.insert(key, tat, now);
        }
        Ok(())
    }

    async fn reset(&self, key_prefix: &str) -> Result<u64, LimitError> {
        // Expired keys are dropped too but not counted: in Redis they would
        // already be gone, and the two backends report alike.
        let now = self.clock.now_us();
        let mut dropped = 0u64;
        for shard in self.shards.iter() {
            lock(shard).tats.retain(|k, tat| {
                let hit = k.starts_with(key_prefix);
                dropped += u64::from(hit && *tat > now);
                !hit
            });
        }
        Ok(dropped)
    }
}
