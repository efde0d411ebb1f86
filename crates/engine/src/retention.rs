//! Retention: the rows of the logs that grow with traffic (`usage_logs`,
//! `bus_events`, `audit_logs`) are deleted once they are older than
//! `[retention]` allows, a batch per statement, by one background task.
//!
//! Usage rows of the current UTC month are kept whatever the setting: the
//! monthly budgets are sums over them (`budget`), and a shorter retention
//! would quietly give a tenant its spent budget back.

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::config::RetentionConfig;
use switchyard_store::{Log, Store, StoreError};

use crate::budget::month_start_ms;
use crate::identity::now_ms;

/// Pause between two batches, so that the writer's other users (usage
/// batches, session replies) get their turns in between.
const BETWEEN_BATCHES: Duration = Duration::from_millis(10);

/// The logs with a retention set, and their ages in days.
fn logs(config: &RetentionConfig) -> Vec<(Log, u32)> {
    [
        (Log::Usage, config.usage_logs_days),
        (Log::Events, config.bus_events_days),
        (Log::Audit, config.audit_logs_days),
    ]
    .into_iter()
    .filter(|(_, days)| *days > 0)
    .collect()
}

/// Rows of `log` made before this time are deleted (`days` > 0).
pub fn cutoff_ms(log: Log, days: u32, now_ms: i64) -> i64 {
    let by_age = now_ms.saturating_sub(i64::from(days).saturating_mul(86_400_000));
    match log {
        Log::Usage => by_age.min(month_start_ms(now_ms)),
        Log::Events | Log::Audit => by_age,
    }
}

pub struct Retention {
    store: Arc<dyn Store>,
    config: RetentionConfig,
}

impl Retention {
    pub fn new(store: Arc<dyn Store>, config: RetentionConfig) -> Self {
        Self { store, config }
    }

    /// Whether any log has a retention set.
    pub fn enabled(&self) -> bool {
        !logs(&self.config).is_empty()
    }

    /// One round at `now_ms`: every log with a retention, until no row is
    /// left before its cutoff. Returns the rows deleted, per log.
    pub async fn run_once(&self, now_ms: i64) -> Result<Vec<(Log, u64)>, StoreError> {
        let limit = self.config.batch_size.max(1);
        let mut out = Vec::new();
        for (log, days) in logs(&self.config) {
            let before = cutoff_ms(log, days, now_ms);
            let mut total = 0u64;
            loop {
                let n = self.store.purge_log(log, before, limit).await?;
                total += n;
                if n > 0 {
                    metrics::counter!("switchyard_retention_deleted_total", "log" => log.table())
                        .increment(n);
                }
                if n < u64::from(limit) {
                    break;
                }
                tokio::time::sleep(BETWEEN_BATCHES).await;
            }
            if total > 0 {
                tracing::info!(
                    log = log.table(),
                    rows = total,
                    before_ms = before,
                    "old log rows deleted"
                );
            }
            out.push((log, total));
        }
        Ok(out)
    }

    /// Runs a round at once and then every `interval_secs`, for as long as
    /// the returned task runs; `None` when no log has a retention set.
    pub fn spawn(self) -> Option<tokio::task::JoinHandle<()>> {
        if !self.enabled() {
            return None;
        }
        let every = Duration::from_secs(self.config.interval_secs.max(1));
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.run_once(now_ms()).await {
                    tracing::warn!(error = %e, "deleting old log rows failed");
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    /// 2026-12-07T15:00:00Z.
    const NOW: i64 = 1_796_655_600_000;

    #[test]
    fn usage_rows_of_the_budget_month_are_kept_whatever_the_setting() {
        let month = month_start_ms(NOW);
        assert_eq!(month, 1_796_083_200_000, "2026-12-01T00:00:00Z");
        // A day's retention would reach into December: cut at December 1st.
        assert_eq!(cutoff_ms(Log::Usage, 1, NOW), month);
        assert_eq!(cutoff_ms(Log::Usage, 6, NOW), month);
        // Ninety days reach back past it, and decide.
        assert_eq!(cutoff_ms(Log::Usage, 90, NOW), NOW - 90 * DAY);
        // Other logs have no budget to protect.
        assert_eq!(cutoff_ms(Log::Events, 1, NOW), NOW - DAY);
        assert_eq!(cutoff_ms(Log::Audit, 365, NOW), NOW - 365 * DAY);
    }

    #[test]
    fn only_logs_with_days_set_are_trimmed() {
        let mut c = RetentionConfig::default();
        assert!(logs(&c).is_empty());
        c.audit_logs_days = 30;
        c.usage_logs_days = 400;
        assert_eq!(logs(&c), vec![(Log::Usage, 400), (Log::Audit, 30)]);
    }
}
