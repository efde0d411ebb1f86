//! Monthly spend limits, per key and per tenant, from the usage log's costs;
//! and the cached tenant settings the rate limits read too.
//!
//! A model request is refused once the month's spend (UTC calendar month)
//! has reached the budget; at 80 % a `budget.alert` audit event is written
//! and logged, once per subject and month per instance. Spend is read from
//! the store and cached for a few seconds per subject; between reads, the
//! cost of every call this instance finishes is added to the cached figure
//! at once (through [`crate::gateway::SpendObserver`]). A budget can still be
//! overshot by the calls in flight when it is reached, by rows still in the
//! usage writer's queue when spend is read (its flush interval), and by what
//! other instances spend within the few seconds before the next read — a
//! budget is a ceiling to stop at, not an exact meter.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use switchyard_core::identity::{Principal, Tenant};
use switchyard_store::{Store, StoreError};
use tokio::time::Instant;

use crate::identity::{Actor, Identity};

/// How long a subject's spend is reused before it is read again.
const SPEND_TTL: Duration = Duration::from_secs(5);
/// How long a value nobody asked for again is kept: until then it is what a
/// check uses when reading it again fails.
const FORGET_AFTER: Duration = Duration::from_secs(600);
const ALERT_AT: f64 = 0.8;

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetExceeded {
    /// `key` or `tenant`.
    pub scope: &'static str,
    pub budget_usd: f64,
    pub spent_usd: f64,
}

/// Values read from the store, each reused for [`SPEND_TTL`]. When reading
/// one again fails, the last value read is used (with a warning) rather than
/// none: a database hiccup must neither lift a tenant's limits nor turn into
/// refusals. Entries not asked for in [`FORGET_AFTER`] are dropped whenever
/// the map has doubled, so that it holds what is in use, not every key and
/// month ever seen.
struct ReadCache<V> {
    inner: Mutex<ReadCacheInner<V>>,
}

struct ReadCacheInner<V> {
    map: HashMap<String, (V, Instant)>,
    sweep_at: usize,
}

impl<V: Clone> ReadCache<V> {
    fn new() -> Self {
        Self {
            inner: Mutex::new(ReadCacheInner {
                map: HashMap::new(),
                sweep_at: 64,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReadCacheInner<V>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn get(
        &self,
        id: &str,
        what: &'static str,
        read: impl std::future::Future<Output = Result<V, StoreError>>,
    ) -> Result<V, StoreError> {
        let last = self.lock().map.get(id).cloned();
        if let Some((v, at)) = &last {
            if at.elapsed() < SPEND_TTL {
                return Ok(v.clone());
            }
        }
        match read.await {
            Ok(v) => {
                let mut inner = self.lock();
                inner.map.insert(id.to_owned(), (v.clone(), Instant::now()));
                if inner.map.len() >= inner.sweep_at {
                    inner.map.retain(|_, (_, at)| at.elapsed() < FORGET_AFTER);
                    inner.sweep_at = (inner.map.len() * 2).max(64);
                }
                Ok(v)
            }
            Err(e) => match last {
                Some((v, at)) => {
                    tracing::warn!(error = %e, what, age_secs = at.elapsed().as_secs(), "could not read from the store; using the last value read");
                    Ok(v)
                }
                None => Err(e),
            },
        }
    }

    /// Drops a value, so that the next check reads it.
    fn forget(&self, id: &str) {
        self.lock().map.remove(id);
    }

    /// Adds `delta` to a value read before (until it is read again); a value
    /// never read is left to be read.
    fn add(&self, id: &str, delta: f64)
    where
        V: std::ops::AddAssign<f64>,
    {
        if let Some((v, _)) = self.lock().map.get_mut(id) {
            *v += delta;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

pub struct Budgets {
    store: Arc<dyn Store>,
    identity: Identity,
    spend: Arc<ReadCache<f64>>,
    tenants: ReadCache<Option<Arc<Tenant>>>,
    /// The month the alerts are for, and the subjects alerted in it.
    alerted: Mutex<(i64, HashSet<String>)>,
}

fn spend_id(tenant: &str, key: Option<&str>, since: i64) -> String {
    format!("{tenant}/{}/{since}", key.unwrap_or("*"))
}

struct SpendTap(Arc<ReadCache<f64>>);

impl crate::gateway::SpendObserver for SpendTap {
    fn spent(&self, tenant: &str, key: Option<&str>, cost_usd: f64, at_ms: i64) {
        // Nothing to add to while no budget has been read (no budgets at
        // all: the common case), and nothing then to allocate for.
        if !(cost_usd > 0.0 && cost_usd.is_finite()) || self.0.lock().map.is_empty() {
            return;
        }
        let since = month_start_ms(at_ms);
        self.0.add(&spend_id(tenant, None, since), cost_usd);
        if key.is_some() {
            self.0.add(&spend_id(tenant, key, since), cost_usd);
        }
    }
}

/// Start of the current UTC month, in unix milliseconds.
pub fn month_start_ms(now_ms: i64) -> i64 {
    let days = now_ms.div_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant's algorithm), then back to day one.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day_of_month = doy - (153 * mp + 2) / 5; // 0-based
    (days - day_of_month) * 86_400_000
}

impl Budgets {
    pub fn new(store: Arc<dyn Store>, identity: Identity) -> Self {
        Self {
            store,
            identity,
            spend: Arc::new(ReadCache::new()),
            tenants: ReadCache::new(),
            alerted: Mutex::default(),
        }
    }

    /// What the gateway tells of each finished call's cost, so that spend
    /// counts at once rather than at the next read.
    pub fn observer(&self) -> Arc<dyn crate::gateway::SpendObserver> {
        Arc::new(SpendTap(self.spend.clone()))
    }

    async fn spent(&self, tenant: &str, key: Option<&str>, since: i64) -> Result<f64, StoreError> {
        let id = spend_id(tenant, key, since);
        self.spend
            .get(&id, "spend", self.store.spend_since(tenant, key, since))
            .await
    }

    /// A tenant's stored settings (budget, rate limits), re-read at most
    /// every few seconds; the last ones read when reading fails.
    pub async fn tenant(&self, tenant: &str) -> Result<Option<Arc<Tenant>>, StoreError> {
        let read = async { Ok(self.store.get_tenant(tenant).await?.map(Arc::new)) };
        self.tenants.get(tenant, "tenant", read).await
    }

    /// Drops this instance's copy of a tenant's settings (they have just
    /// been changed here); other instances read them again within seconds.
    pub fn forget_tenant(&self, tenant: &str) {
        self.tenants.forget(tenant);
    }

    /// `Err`: over budget (the key's, else the tenant's); a store failure is
    /// reported as `Ok` with a warning (a budget check must not turn a
    /// database hiccup into refusals). Every budget is looked at, so that
    /// each one's 80 % alert is written even when spend went past it, or
    /// past another, between two reads. `trace` is the request's, for the
    /// alert's audit row.
    pub async fn check(
        &self,
        who: &Principal,
        now_ms: i64,
        trace: Option<&switchyard_core::trace::TraceContext>,
    ) -> Result<(), BudgetExceeded> {
        let since = month_start_ms(now_ms);
        let mut checks: Vec<(&'static str, Option<&str>, f64)> = Vec::new();
        if let (Some(key), Some(b)) = (&who.key_id, who.limits.monthly_budget_usd) {
            checks.push(("key", Some(key.as_str()), b));
        }
        match self.tenant(&who.tenant_id).await {
            Ok(t) => {
                if let Some(b) = t.and_then(|t| t.monthly_budget_usd) {
                    checks.push(("tenant", None, b));
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the tenant's budget"),
        }
        let mut over = None;
        for (scope, key, budget) in checks {
            let spent = match self.spent(&who.tenant_id, key, since).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, scope, "could not read the month's spend");
                    continue;
                }
            };
            if spent >= budget * ALERT_AT {
                let trace_id = trace.map(switchyard_core::trace::TraceContext::trace_id);
                self.alert(who, key, (scope, budget, spent), since, trace_id.as_deref())
                    .await;
            }
            if spent >= budget && over.is_none() {
                over = Some(BudgetExceeded {
                    scope,
                    budget_usd: budget,
                    spent_usd: spent,
                });
            }
        }
        over.map_or(Ok(()), Err)
    }

    /// Writes the 80 % alert of one budget (`key`'s, else the tenant's),
    /// once per month.
    async fn alert(
        &self,
        who: &Principal,
        key: Option<&str>,
        (scope, budget, spent): (&str, f64, f64),
        since: i64,
        trace_id: Option<&str>,
    ) {
        let id = format!("{}/{}", who.tenant_id, key.unwrap_or("*"));
        {
            let mut alerted = self.alerted.lock().unwrap_or_else(PoisonError::into_inner);
            if alerted.0 != since {
                // A new month: last month's alerts are done with.
                *alerted = (since, HashSet::new());
            }
            if !alerted.1.insert(id) {
                return;
            }
        }
        tracing::warn!(tenant = %who.tenant_id, scope, budget_usd = budget, spent_usd = spent, "80 % of the monthly budget is spent");
        let actor = Actor {
            label: "budget".into(),
            tenant_id: who.tenant_id.clone(),
            role: switchyard_core::identity::Role::Admin,
            trace_id: trace_id.map(str::to_owned),
        };
        self.identity
            .audit(
                &actor,
                &who.tenant_id,
                "budget.alert",
                Some(key.map_or_else(|| format!("tenant:{}", who.tenant_id), |k| format!("key:{k}"))),
                json!({"scope": scope, "budget_usd": budget, "spent_usd": spent, "threshold": ALERT_AT}),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use switchyard_core::config::StoreConfig;
    use switchyard_core::identity::{
        AuditQuery, AuditRecord, CredentialKind, KeyLimits, Principal, Role, Tenant,
    };
    use switchyard_store::{SqliteStore, Store};

    use switchyard_store::StoreError;

    use super::{month_start_ms, Budgets, ReadCache, FORGET_AFTER, SPEND_TTL};
    use crate::identity::{now_ms, Identity};

    async fn budgets() -> (tempfile::TempDir, Arc<dyn Store>, Budgets) {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            url: format!("sqlite://{}/b.db", dir.path().display()),
            ..StoreConfig::default()
        };
        let store = SqliteStore::connect(&config).await.unwrap();
        store.migrate().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        let identity = Identity::start(store.clone(), false, None, None)
            .await
            .unwrap();
        (dir, store.clone(), Budgets::new(store, identity))
    }

    fn caller(tenant: &str, key_budget: Option<f64>) -> Principal {
        Principal {
            tenant_id: tenant.into(),
            user_id: None,
            credential_user: None,
            role: Role::User,
            kind: CredentialKind::ApiKey,
            key_id: Some("k1".into()),
            expires_at: None,
            limits: KeyLimits {
                monthly_budget_usd: key_budget,
                ..KeyLimits::default()
            },
            require_signature: false,
        }
    }

    async fn spend(store: &dyn Store, tenant: &str, key: &str, usd: f64) {
        let mut row = switchyard_store::conformance::sample_usage(tenant, 1);
        row.key_id = Some(key.into());
        row.cost_usd = Some(usd);
        row.created_at_ms = now_ms();
        store.insert_usage(&[row]).await.unwrap();
    }

    async fn alerts(store: &dyn Store, tenant: &str) -> Vec<AuditRecord> {
        let q = AuditQuery {
            action: Some("budget.alert".into()),
            limit: 100,
            ..AuditQuery::default()
        };
        store.list_audit(tenant, &q).await.unwrap()
    }

    /// Moves the clock the spend cache reads past its lifetime, so the next
    /// check reads the spend again. Paused only for the jump: the store's
    /// own timeouts run on real time.
    async fn let_the_spend_cache_expire() {
        tokio::time::pause();
        tokio::time::advance(SPEND_TTL + Duration::from_millis(1)).await;
        tokio::time::resume();
    }

    /// Spend at 79 % of the budget, checked again and again, records
    /// nothing; crossing 80 % records one alert, however many requests see
    /// it; more spend in the month records no other (issue 4, item 7).
    async fn the_alert_is_written_once_when_spend_crosses_80_percent(
        scope: &str,
        tenant_budget: Option<f64>,
        key_budget: Option<f64>,
    ) {
        let (_dir, store, budgets) = budgets().await;
        let tenant = Tenant {
            id: "t".into(),
            name: "t".into(),
            monthly_budget_usd: tenant_budget,
            limits: Default::default(),
            created_at_ms: now_ms(),
        };
        store.create_tenant(&tenant).await.unwrap();
        let who = caller("t", key_budget);
        let budget = tenant_budget.or(key_budget).unwrap();

        spend(&*store, "t", "k1", 0.79 * budget).await;
        for _ in 0..3 {
            budgets.check(&who, now_ms(), None).await.unwrap();
            let_the_spend_cache_expire().await;
        }
        assert!(
            alerts(&*store, "t").await.is_empty(),
            "{scope}: 79 % is under"
        );

        spend(&*store, "t", "k1", 0.02 * budget).await;
        let_the_spend_cache_expire().await;
        for _ in 0..3 {
            budgets.check(&who, now_ms(), None).await.unwrap();
        }
        spend(&*store, "t", "k1", 0.1 * budget).await;
        let_the_spend_cache_expire().await;
        budgets.check(&who, now_ms(), None).await.unwrap();

        let written = alerts(&*store, "t").await;
        assert_eq!(written.len(), 1, "{scope}: {written:?}");
        assert_eq!(written[0].detail["scope"], scope);
        assert_eq!(written[0].detail["threshold"], 0.8);
        let spent = written[0].detail["spent_usd"].as_f64().unwrap();
        assert!((spent - 0.81 * budget).abs() < 1e-9, "{scope}: {spent}");
        let target = if scope == "key" { "key:k1" } else { "tenant:t" };
        assert_eq!(written[0].target.as_deref(), Some(target));
    }

    #[tokio::test]
    async fn a_key_budget_alerts_once_when_spend_crosses_80_percent() {
        the_alert_is_written_once_when_spend_crosses_80_percent("key", None, Some(2.0)).await;
    }

    #[tokio::test]
    async fn a_tenant_budget_alerts_once_when_spend_crosses_80_percent() {
        the_alert_is_written_once_when_spend_crosses_80_percent("tenant", Some(5.0), None).await;
    }

    #[tokio::test]
    async fn spend_of_exactly_80_percent_alerts() {
        let (_dir, store, budgets) = budgets().await;
        let who = caller("default", Some(1.0));
        spend(&*store, "default", "k1", 0.8).await;

        budgets.check(&who, now_ms(), None).await.unwrap();

        assert_eq!(alerts(&*store, "default").await.len(), 1);
    }

    fn down() -> StoreError {
        StoreError::Config("the database is down".into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_read_reuses_the_last_value_and_idle_entries_are_forgotten() {
        let cache = ReadCache::<u32>::new();
        assert_eq!(cache.get("a", "t", async { Ok(1) }).await.unwrap(), 1);
        // Fresh: not read again.
        assert_eq!(cache.get("a", "t", async { Ok(2) }).await.unwrap(), 1);
        tokio::time::advance(SPEND_TTL).await;
        assert_eq!(
            cache.get("a", "t", async { Err(down()) }).await.unwrap(),
            1,
            "a failed read keeps the last value"
        );
        assert!(
            cache.get("b", "t", async { Err(down()) }).await.is_err(),
            "nothing to fall back on"
        );
        assert_eq!(cache.get("a", "t", async { Ok(3) }).await.unwrap(), 3);

        tokio::time::advance(FORGET_AFTER).await;
        for i in 0..63 {
            cache
                .get(&format!("k{i}"), "t", async { Ok(0) })
                .await
                .unwrap();
        }
        assert_eq!(cache.len(), 63, "`a`, idle for ten minutes, is dropped");
        assert!(cache.get("a", "t", async { Err(down()) }).await.is_err());
    }

    #[tokio::test]
    async fn alerts_of_a_past_month_are_forgotten() {
        let (_dir, store, budgets) = budgets().await;
        let who = caller("acme", None);
        let march = month_start_ms(1_740_787_200_000); // 2025-03-01
        let april = month_start_ms(1_743_465_600_000); // 2025-04-01
        budgets
            .alert(&who, Some("k1"), ("key", 1.0, 0.9), march, None)
            .await;
        budgets
            .alert(&who, Some("k1"), ("key", 1.0, 0.9), march, None)
            .await;
        budgets
            .alert(&who, Some("k1"), ("key", 1.0, 0.9), april, None)
            .await;
        assert_eq!(
            alerts(store.as_ref(), "acme").await.len(),
            2,
            "once per month"
        );
        let alerted = budgets.alerted.lock().unwrap();
        assert_eq!((alerted.0, alerted.1.len()), (april, 1));
    }

    #[test]
    fn the_month_starts_on_the_first_at_midnight_utc() {
        // 2026-11-23T18:00:00Z → 2026-11-01T00:00:00Z
        assert_eq!(month_start_ms(1_795_456_800_000), 1_793_491_200_000);
        // 2024-02-29T12:00:00Z (leap day) → 2024-02-01
        assert_eq!(month_start_ms(1_709_208_000_000), 1_706_745_600_000);
        // the first instant of a month is its own start
        assert_eq!(month_start_ms(1_706_745_600_000), 1_706_745_600_000);
        // 1970-01-15 → epoch
        assert_eq!(month_start_ms(14 * 86_400_000), 0);
    }
}
