//! The behaviour every [`Store`] backend must show. Each backend's tests call
//! [`run_all`] on a fresh, migrated store, so the backends cannot drift apart.
//! It is test code shipped in the library so every backend test can reach it:
//! a failed check panics, as a test should.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use switchyard_core::health::ProviderHealthRow;
use switchyard_core::usage::{new_id, UsageRecord};

use crate::Store;

/// A usage row with every optional field set, distinct per `n`.
pub fn sample_usage(tenant: &str, n: u32) -> UsageRecord {
    UsageRecord {
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
    store.ping().await.expect("ping");
}

pub async fn migrations_are_idempotent(store: &dyn Store) {
    store.migrate().await.expect("second migrate");
    let applied = store.applied_migrations().await.expect("applied");
    assert_eq!(applied, vec![1, 2, 3], "{}", store.backend());
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
