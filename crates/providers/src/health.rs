//! Passive health statistics per deployment, from real traffic: rolling
//! latency percentiles and error rate over the last calls, last error and
//! last success. Cheap enough for the hot path: one short lock per call.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Calls the rolling figures cover.
const WINDOW: usize = 256;

/// Clones share their figures: one upstream (provider and model) has one
/// set, whichever aliases and timeouts reach it.
#[derive(Debug, Default, Clone)]
pub struct HealthStats {
    inner: std::sync::Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Ring of (latency in µs, ok).
    samples: Vec<(u32, bool)>,
    next: usize,
    total_calls: u64,
    total_errors: u64,
    last_error: Option<(i64, String)>,
    last_success_ms: Option<i64>,
    /// (when, ok, latency in ms) of the last active probe.
    last_probe: Option<(i64, bool, f64)>,
}

/// A point-in-time view, for the admin API and the `provider_health` table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthSnapshot {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// Errors among the calls in the window, 0 to 1.
    pub error_rate: f64,
    pub window_calls: u64,
    pub total_calls: u64,
    pub total_errors: u64,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    pub last_success_at_ms: Option<i64>,
    pub last_probe_at_ms: Option<i64>,
    pub last_probe_ok: Option<bool>,
    pub last_probe_ms: Option<f64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl HealthStats {
    pub fn record_success(&self, latency: Duration) {
        self.record(latency, None);
    }

    pub fn record_failure(&self, latency: Duration, code: &str) {
        self.record(latency, Some(code));
    }

    /// An active probe's outcome; kept apart from the traffic statistics.
    pub fn record_probe(&self, ok: bool, latency: Duration) {
        let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        s.last_probe = Some((now_ms(), ok, latency.as_secs_f64() * 1000.0));
    }

    fn record(&self, latency: Duration, error: Option<&str>) {
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let sample = (micros, error.is_none());
        if s.samples.len() < WINDOW {
            s.samples.push(sample);
        } else {
            let i = s.next;
            s.samples[i] = sample;
        }
        s.next = (s.next + 1) % WINDOW;
        s.total_calls += 1;
        match error {
            Some(code) => {
                s.total_errors += 1;
                s.last_error = Some((now_ms(), code.to_owned()));
            }
            None => s.last_success_ms = Some(now_ms()),
        }
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        let s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut latencies: Vec<u32> = s.samples.iter().map(|(l, _)| *l).collect();
        latencies.sort_unstable();
        let pct = |p: f64| -> Option<f64> {
            if latencies.is_empty() {
                return None;
            }
            let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
            Some(f64::from(latencies[rank - 1]) / 1000.0)
        };
        let errors = s.samples.iter().filter(|(_, ok)| !ok).count();
        HealthSnapshot {
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            error_rate: if s.samples.is_empty() {
                0.0
            } else {
                errors as f64 / s.samples.len() as f64
            },
            window_calls: s.samples.len() as u64,
            total_calls: s.total_calls,
            total_errors: s.total_errors,
            last_error: s.last_error.as_ref().map(|(_, c)| c.clone()),
            last_error_at_ms: s.last_error.as_ref().map(|(t, _)| *t),
            last_success_at_ms: s.last_success_ms,
            last_probe_at_ms: s.last_probe.map(|p| p.0),
            last_probe_ok: s.last_probe.map(|p| p.1),
            last_probe_ms: s.last_probe.map(|p| p.2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_error_rate_cover_the_recent_window() {
        let h = HealthStats::default();
        for ms in 1..=100u64 {
            h.record_success(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!((s.p50_ms, s.p95_ms), (Some(50.0), Some(95.0)));
        assert_eq!(s.error_rate, 0.0);
        for _ in 0..100 {
            h.record_failure(Duration::from_millis(1), "upstream_status");
        }
        let s = h.snapshot();
        assert_eq!(s.error_rate, 0.5);
        assert_eq!(s.last_error.as_deref(), Some("upstream_status"));
        assert!(s.last_success_at_ms.is_some());
        for _ in 0..WINDOW {
            h.record_failure(Duration::from_millis(1), "upstream_timeout");
        }
        let s = h.snapshot();
        assert_eq!(
            (s.error_rate, s.window_calls, s.total_calls),
            (1.0, WINDOW as u64, 200 + WINDOW as u64)
        );
    }

    #[test]
    fn an_unused_deployment_has_no_figures() {
        let s = HealthStats::default().snapshot();
        assert_eq!(s, HealthSnapshot::default());
    }
}
