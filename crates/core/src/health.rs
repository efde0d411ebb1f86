//! A deployment's health as persisted in `provider_health`: passive
//! statistics from real traffic, breaker state and the last active probe.

use serde::{Deserialize, Serialize};

/// One row per deployment (`provider/model`). Deployments are operator
/// configuration shared by every tenant, so this table is not tenant-scoped;
/// it is served only on admin routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderHealthRow {
    pub deployment: String,
    pub provider: String,
    pub model: String,
    /// `closed`, `open` or `half_open`.
    pub breaker_state: String,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
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
    pub updated_at_ms: i64,
}
