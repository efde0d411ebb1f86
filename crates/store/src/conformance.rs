//! The behaviour every [`Store`] backend must show. Each backend's tests call
//! [`run_all`] on a fresh, migrated store, so the backends cannot drift apart.
//! It is test code shipped in the library so every backend test can reach it:
//! a failed check panics, as a test should.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use switchyard_core::health::ProviderHealthRow;
use switchyard_core::identity::{ApiKeyRecord, AuditQuery, AuditRecord, KeyLimits, Role, Tenant};
use switchyard_core::usage::{new_id, UsageRecord};

use crate::Store;

/// A usage row with every optional field set, distinct per `n`.
pub fn sample_usage(tenant: &str, n: u32) -> UsageRecord {
    UsageRecord {
        key_id: Some(format!("key-{}", n % 3)),
        user_id: Some(format!("user-{n}")),
        id: new_id(),
        tenant_id: tenant.to_owned(),
        trace_id: format!("{:032x}", 0xabc000 + n),
        endpoint: "chat".into(),
        model_alias: "gpt-4o-mini".into(),
        provider: "openai".into(),
        upstream_model: "gpt-4o-mini-2024-07-18".into(),
        stream: n % 2 == 0,
        prompt_tokens: Some(10 + u64::from(n)),
        completion_tokens: Some(20),
        cost_usd: Some(0.000_123_5),
        latency_ms: 12.25,
        ttft_ms: Some(3.5),
        status: 200,
        error_code: None,
        created_at_ms: 1_760_000_000_000 + i64::from(n),
    }
}

/// Runs every check below, in order, against one store.
pub async fn run_all(store: &dyn Store) {
    migrations_are_idempotent(store).await;
    usage_rows_round_trip_exactly(store).await;
    usage_rows_with_no_optional_fields_round_trip(store).await;
    usage_is_scoped_by_tenant(store).await;
    large_batches_are_written_whole(store).await;
    an_empty_batch_is_a_no_op(store).await;
    provider_health_is_upserted_and_listed(store).await;
    tenants_are_created_once_updated_and_listed(store).await;
    api_keys_round_trip_and_are_found_by_hash(store).await;
    api_keys_of_another_tenant_are_invisible(store).await;
    revoked_and_expired_keys_are_not_active(store).await;
    audit_events_are_filtered_and_paginated_per_tenant(store).await;
    spend_is_summed_per_tenant_and_per_key(store).await;
    store.ping().await.expect("ping");
}

pub async fn migrations_are_idempotent(store: &dyn Store) {
    store.migrate().await.expect("second migrate");
    let applied = store.applied_migrations().await.expect("applied");
    assert_eq!(applied, vec![1, 2, 3, 4], "{}", store.backend());
}

pub async fn usage_rows_round_trip_exactly(store: &dyn Store) {
    let tenant = "t-roundtrip";
    let rows: Vec<UsageRecord> = (0..3).map(|n| sample_usage(tenant, n)).collect();
    store.insert_usage(&rows).await.expect("insert");
    let mut back = store.list_usage(tenant, 10).await.expect("list");
    assert_eq!(back.len(), 3);
    back.reverse(); // newest first → oldest first
    assert_eq!(back, rows, "{}", store.backend());
}

pub async fn usage_rows_with_no_optional_fields_round_trip(store: &dyn Store) {
    let tenant = "t-sparse";
    let mut row = sample_usage(tenant, 7);
    row.prompt_tokens = None;
    row.completion_tokens = None;
    row.cost_usd = None;
    row.ttft_ms = None;
    row.status = 502;
    row.error_code = Some("upstream_status".into());
    store
        .insert_usage(std::slice::from_ref(&row))
        .await
        .expect("insert");
    assert_eq!(store.list_usage(tenant, 10).await.expect("list"), vec![row]);
}

pub async fn usage_is_scoped_by_tenant(store: &dyn Store) {
    store
        .insert_usage(&[
            sample_usage("t-a", 1),
            sample_usage("t-a", 2),
            sample_usage("t-b", 3),
        ])
        .await
        .expect("insert");
    assert_eq!(store.count_usage("t-a").await.expect("count"), 2);
    assert_eq!(store.count_usage("t-b").await.expect("count"), 1);
    assert_eq!(store.count_usage("t-none").await.expect("count"), 0);
    assert!(store
        .list_usage("t-b", 10)
        .await
        .expect("list")
        .iter()
        .all(|r| r.tenant_id == "t-b"));
}

pub async fn large_batches_are_written_whole(store: &dyn Store) {
    let rows: Vec<UsageRecord> = (0..1500).map(|n| sample_usage("t-bulk", n)).collect();
    for batch in rows.chunks(512) {
        store.insert_usage(batch).await.expect("insert");
    }
    assert_eq!(store.count_usage("t-bulk").await.expect("count"), 1500);
    let newest = store.list_usage("t-bulk", 1).await.expect("list");
    assert_eq!(newest[0].id, rows[1499].id);

    // 64 + 16 + 4 + 1 rows: every field of every row, whatever the batch is split into.
    let rows: Vec<UsageRecord> = (0..85).map(|n| sample_usage("t-bulk-85", n)).collect();
    store.insert_usage(&rows).await.expect("insert");
    let mut back = store.list_usage("t-bulk-85", 100).await.expect("list");
    back.reverse();
    assert_eq!(back, rows, "{}", store.backend());
}

pub async fn an_empty_batch_is_a_no_op(store: &dyn Store) {
    store.insert_usage(&[]).await.expect("empty insert");
}

fn health(deployment: &str, calls: u64) -> ProviderHealthRow {
    ProviderHealthRow {
        deployment: deployment.to_owned(),
        provider: "p".into(),
        model: "m".into(),
        breaker_state: "closed".into(),
        p50_ms: Some(12.5),
        p95_ms: None,
        error_rate: 0.25,
        window_calls: calls,
        total_calls: calls,
        total_errors: calls / 4,
        last_error: Some("upstream_status".into()),
        last_error_at_ms: Some(1_760_000_000_000),
        last_success_at_ms: None,
        last_probe_at_ms: None,
        last_probe_ok: Some(false),
        last_probe_ms: Some(3.25),
        updated_at_ms: 1_760_000_000_123,
    }
}

pub async fn provider_health_is_upserted_and_listed(store: &dyn Store) {
    store
        .upsert_provider_health(&[health("b/m", 4), health("a/m", 8)])
        .await
        .expect("insert");
    let mut changed = health("b/m", 40);
    changed.breaker_state = "open".into();
    changed.last_probe_ok = None;
    store
        .upsert_provider_health(std::slice::from_ref(&changed))
        .await
        .expect("update");
    let rows = store.list_provider_health().await.expect("list");
    assert_eq!(rows, vec![health("a/m", 8), changed], "{}", store.backend());
    store.upsert_provider_health(&[]).await.expect("empty");
}

fn sample_key(tenant: &str, n: u32) -> ApiKeyRecord {
    let mut limits = KeyLimits::default();
    limits.rates.insert("chat".into(), "5/min".into());
    limits.monthly_budget_usd = Some(12.5);
    ApiKeyRecord {
        id: new_id(),
        tenant_id: tenant.into(),
        name: format!("key {n}"),
        role: [Role::Admin, Role::Service, Role::User][n as usize % 3],
        user_id: (n % 3 == 2).then(|| format!("user-{n}")),
        prefix: format!("sy_{n:06}"),
        key_hash: format!("{tenant}-hash-{n}"),
        limits,
        signing_secrets: if n % 2 == 0 {
            vec!["s1".into(), "s2".into()]
        } else {
            vec![]
        },
        require_signature: n % 2 == 0,
        expires_at_ms: (n % 4 == 3).then_some(1_900_000_000_000),
        revoked_at_ms: None,
        created_at_ms: 1_760_000_000_000 + i64::from(n),
        created_by: "cli".into(),
    }
}

pub async fn tenants_are_created_once_updated_and_listed(store: &dyn Store) {
    let mut t = Tenant {
        id: "acme".into(),
        name: "Acme".into(),
        monthly_budget_usd: None,
        limits: Default::default(),
        created_at_ms: 1_760_000_000_000,
    };
    assert!(store.create_tenant(&t).await.expect("create"));
    assert!(
        !store.create_tenant(&t).await.expect("create twice"),
        "{}",
        store.backend()
    );
    t.monthly_budget_usd = Some(100.0);
    t.limits.insert("chat".into(), "50/min".into());
    assert!(store.update_tenant(&t).await.expect("update"));
    assert_eq!(
        store.get_tenant("acme").await.expect("get"),
        Some(t.clone())
    );
    assert_eq!(store.get_tenant("nobody").await.expect("get"), None);
    let mut missing = t.clone();
    missing.id = "nobody".into();
    assert!(!store.update_tenant(&missing).await.expect("update missing"));
    assert!(store.list_tenants().await.expect("list").contains(&t));
    store.ensure_user("acme", "u1", 1).await.expect("user");
    store
        .ensure_user("acme", "u1", 2)
        .await
        .expect("user twice");
}

pub async fn api_keys_round_trip_and_are_found_by_hash(store: &dyn Store) {
    let keys: Vec<ApiKeyRecord> = (0..4).map(|n| sample_key("t-keys", n)).collect();
    for k in &keys {
        store.insert_api_key(k).await.expect("insert key");
    }
    for k in &keys {
        assert_eq!(
            store
                .find_api_key_by_hash(&k.key_hash)
                .await
                .expect("find")
                .as_ref(),
            Some(k),
            "{}",
            store.backend()
        );
        assert_eq!(
            store
                .get_api_key("t-keys", &k.id)
                .await
                .expect("get")
                .as_ref(),
            Some(k)
        );
    }
    let mut listed = store.list_api_keys("t-keys").await.expect("list");
    listed.reverse();
    assert_eq!(listed, keys);
    assert_eq!(
        store
            .find_api_key_by_hash("no-such-hash")
            .await
            .expect("find"),
        None
    );
    let mut dup = sample_key("t-keys", 9);
    dup.key_hash = keys[0].key_hash.clone();
    assert!(
        store.insert_api_key(&dup).await.is_err(),
        "key hashes are unique"
    );
}

pub async fn api_keys_of_another_tenant_are_invisible(store: &dyn Store) {
    let k = sample_key("t-owner", 1);
    store.insert_api_key(&k).await.expect("insert");
    assert_eq!(
        store.get_api_key("t-other", &k.id).await.expect("get"),
        None
    );
    assert!(store
        .list_api_keys("t-other")
        .await
        .expect("list")
        .is_empty());
    assert!(!store
        .revoke_api_key("t-other", &k.id, 5)
        .await
        .expect("revoke"));
    assert_eq!(
        store
            .get_api_key("t-owner", &k.id)
            .await
            .expect("get")
            .and_then(|k| k.revoked_at_ms),
        None
    );
}

pub async fn revoked_and_expired_keys_are_not_active(store: &dyn Store) {
    let now = 1_800_000_000_000;
    let before = store.count_active_api_keys(now).await.expect("count");
    let mut live = sample_key("t-active", 0);
    live.expires_at_ms = None;
    let mut expired = sample_key("t-active", 1);
    expired.expires_at_ms = Some(now - 1);
    let mut later = sample_key("t-active", 2);
    later.expires_at_ms = Some(now + 1);
    for k in [&live, &expired, &later] {
        store.insert_api_key(k).await.expect("insert");
    }
    assert_eq!(
        store.count_active_api_keys(now).await.expect("count"),
        before + 2
    );
    assert!(store
        .revoke_api_key("t-active", &live.id, now)
        .await
        .expect("revoke"));
    assert!(!store
        .revoke_api_key("t-active", &live.id, now + 5)
        .await
        .expect("revoke twice"));
    let stored = store
        .get_api_key("t-active", &live.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        stored.revoked_at_ms,
        Some(now),
        "the first revocation time stays"
    );
    assert!(!stored.is_active(now));
    assert_eq!(
        store.count_active_api_keys(now).await.expect("count"),
        before + 1
    );
}

pub async fn audit_events_are_filtered_and_paginated_per_tenant(store: &dyn Store) {
    let event = |tenant: &str, action: &str, actor: &str, at: i64| AuditRecord {
        id: new_id(),
        tenant_id: tenant.into(),
        actor: actor.into(),
        action: action.into(),
        target: Some("key:1".into()),
        detail: serde_json::json!({"n": at}),
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        created_at_ms: at,
    };
    let rows: Vec<AuditRecord> = (0..5)
        .map(|i| {
            event(
                "t-audit",
                if i % 2 == 0 {
                    "key.created"
                } else {
                    "key.revoked"
                },
                "key:admin",
                1000 + i,
            )
        })
        .chain([event("t-audit-other", "key.created", "key:admin", 1003)])
        .collect();
    store.insert_audit(&rows).await.expect("insert");
    let q = |f: fn(&mut AuditQuery)| {
        let mut q = AuditQuery {
            limit: 100,
            ..Default::default()
        };
        f(&mut q);
        q
    };
    let all = store.list_audit("t-audit", &q(|_| {})).await.expect("list");
    assert_eq!(all.len(), 5, "{}", store.backend());
    assert_eq!(all[0], rows[4], "newest first, every field kept");
    let created = store
        .list_audit("t-audit", &q(|q| q.action = Some("key.created".into())))
        .await
        .expect("list");
    assert_eq!(
        created.iter().map(|a| a.created_at_ms).collect::<Vec<_>>(),
        vec![1004, 1002, 1000]
    );
    let window = store
        .list_audit(
            "t-audit",
            &q(|q| {
                q.since_ms = Some(1001);
                q.until_ms = Some(1003);
            }),
        )
        .await
        .expect("list");
    assert_eq!(window.len(), 2);
    let page1 = store
        .list_audit(
            "t-audit",
            &AuditQuery {
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .expect("page");
    let page2 = store
        .list_audit(
            "t-audit",
            &AuditQuery {
                limit: 2,
                before_id: Some(page1[1].id.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("page");
    assert_eq!(
        page2.iter().map(|a| a.created_at_ms).collect::<Vec<_>>(),
        vec![1002, 1001]
    );
    assert!(store
        .list_audit("t-audit", &q(|q| q.actor = Some("someone-else".into())))
        .await
        .expect("list")
        .is_empty());
}

pub async fn spend_is_summed_per_tenant_and_per_key(store: &dyn Store) {
    let mut rows = Vec::new();
    for n in 0..6u32 {
        let mut r = sample_usage("t-spend", n);
        r.cost_usd = Some(0.25 * f64::from(n + 1));
        r.key_id = Some(if n < 3 { "k-a".into() } else { "k-b".into() });
        rows.push(r);
    }
    let mut other = sample_usage("t-spend-other", 1);
    other.cost_usd = Some(100.0);
    rows.push(other);
    store.insert_usage(&rows).await.expect("insert");
    let since = rows[0].created_at_ms;
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(
        store
            .spend_since("t-spend", None, since)
            .await
            .expect("sum"),
        5.25
    ));
    assert!(close(
        store
            .spend_since("t-spend", Some("k-a"), since)
            .await
            .expect("sum"),
        1.5
    ));
    assert!(close(
        store
            .spend_since("t-spend", Some("k-b"), since)
            .await
            .expect("sum"),
        3.75
    ));
    assert!(close(
        store
            .spend_since("t-spend", None, since + 4)
            .await
            .expect("sum"),
        1.25 + 1.5
    ));
    assert!(close(
        store.spend_since("t-none", None, 0).await.expect("sum"),
        0.0
    ));
}
