//! The behaviour every [`Store`] backend must show. Each backend's tests call
//! [`run_all`] on a fresh, migrated store, so the backends cannot drift apart.
//! It is test code in the library, behind the `conformance` feature that only
//! the workspace's dev-dependencies turn on, so every backend test can reach
//! it and no production build contains it: a failed check panics, as a test
//! should.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use switchyard_core::health::ProviderHealthRow;
use switchyard_core::identity::{ApiKeyRecord, AuditQuery, AuditRecord, KeyLimits, Role, Tenant};
use switchyard_core::sessions::{
    Bot, BusEvent, Erased, EventsRow, IdempotencyClaim, IdempotencyKey, Message, MessageCompletion,
    MessageStatus, Session, SessionQuery, StatePatch, StoredResponse,
};
use switchyard_core::usage::{new_id, PlainTrace, UsageRecord};

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
        stream: n.is_multiple_of(2),
        prompt_tokens: Some(10 + u64::from(n)),
        completion_tokens: Some(20),
        cached_tokens: Some(u64::from(n) * 3),
        cache_write_tokens: Some(u64::from(n % 2) * 5),
        cost_usd: Some(0.000_123_5),
        latency_ms: 12.25,
        ttft_ms: Some(3.5),
        status: 200,
        error_code: None,
        created_at_ms: 1_760_000_000_000 + i64::from(n),
        trace: Some(PlainTrace {
            received_at_ms: 1_760_000_000_000 + i64::from(n),
            attempt_at_ms: 1_760_000_000_001 + i64::from(n),
            done_at_ms: 1_760_000_000_013 + i64::from(n),
        }),
    }
}

/// A UUIDv7 made at the unix millisecond `ms` (its other bits from `n`),
/// for rows that must look made at a given time: retention finds usage rows
/// by their ids.
pub fn uuid_v7_at(ms: i64, n: i64) -> String {
    format!("{:08x}-{:04x}-7000-8000-{:012x}", ms >> 16, ms & 0xffff, n)
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
    a_key_changes_only_from_what_was_read_and_never_once_revoked(store).await;
    revoked_and_expired_keys_are_inactive_but_counted(store).await;
    audit_events_are_filtered_and_paginated_per_tenant(store).await;
    spend_is_summed_per_tenant_and_per_key(store).await;
    bots_round_trip_paginate_update_and_delete(store).await;
    sessions_are_filtered_paginated_and_deleted_with_their_messages(store).await;
    messages_are_listed_in_order_and_completed_once(store).await;
    state_is_merged_as_a_json_merge_patch(store).await;
    concurrent_state_patches_lose_nothing(store).await;
    a_state_compare_and_set_race_has_one_winner(store).await;
    trace_events_are_ordered_and_scoped(store).await;
    plain_traces_in_usage_rows_read_back_as_events(store).await;
    idempotency_claims_have_one_winner_and_replay(store).await;
    idempotency_a_taken_over_claim_is_not_the_old_owners(store).await;
    idempotency_records_are_purged_when_dead(store).await;
    streaming_messages_are_interrupted_by_instance_and_staleness(store).await;
    a_user_is_exported_and_erased_alone(store).await;
    // Last: it deletes by time across tenants (only rows far older than any
    // other check's, but a later check must not have to know that).
    old_log_rows_are_purged_oldest_first_in_batches(store).await;
    store.ping().await.expect("ping");
}

pub async fn migrations_are_idempotent(store: &dyn Store) {
    store.migrate().await.expect("second migrate");
    let applied = store.applied_migrations().await.expect("applied");
    assert_eq!(
        applied,
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "{}",
        store.backend()
    );
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
    row.cached_tokens = None;
    row.cache_write_tokens = None;
    row.cost_usd = None;
    row.ttft_ms = None;
    row.trace = None;
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
    // A batch written again (its commit's acknowledgement lost, then
    // retried by the writer) succeeds and adds nothing.
    let rows: Vec<UsageRecord> = (0..3).map(|n| sample_usage("t-retried", n)).collect();
    store.insert_usage(&rows).await.expect("insert");
    store
        .insert_usage(&rows)
        .await
        .expect("the same batch again");
    assert_eq!(store.count_usage("t-retried").await.expect("count"), 3);
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
        signing_secrets: if n.is_multiple_of(2) {
            vec!["s1".into(), "s2".into()]
        } else {
            vec![]
        },
        require_signature: n.is_multiple_of(2),
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
    let before = t.clone();
    t.monthly_budget_usd = Some(100.0);
    t.limits.insert("chat".into(), "50/min".into());
    assert!(store.update_tenant(&before, &t).await.expect("update"));
    // Changed since `before` was read: not written again.
    let mut stale = before.clone();
    stale.name = "Stale".into();
    assert!(!store
        .update_tenant(&before, &stale)
        .await
        .expect("update stale"));
    let mut renamed = t.clone();
    renamed.name = "Acme Inc".into();
    assert!(store
        .update_tenant(&t, &renamed)
        .await
        .expect("update with a budget"));
    assert!(store.update_tenant(&renamed, &t).await.expect("and back"));
    assert_eq!(
        store.get_tenant("acme").await.expect("get"),
        Some(t.clone())
    );
    assert_eq!(store.get_tenant("nobody").await.expect("get"), None);
    let mut missing = t.clone();
    missing.id = "nobody".into();
    assert!(!store
        .update_tenant(&missing, &missing)
        .await
        .expect("update missing"));
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

/// `update_api_key` is a compare-and-set: a change read before another
/// one landed misses (so it cannot undo it), and a revoked key is final.
pub async fn a_key_changes_only_from_what_was_read_and_never_once_revoked(store: &dyn Store) {
    let k = sample_key("t-cas", 1);
    store.insert_api_key(&k).await.expect("insert");
    let mut demoted = k.clone();
    demoted.role = Role::User;
    let mut renamed = k.clone();
    renamed.name = "renamed".into();
    assert!(store.update_api_key(&k, &demoted).await.expect("update"));
    assert!(
        !store.update_api_key(&k, &renamed).await.expect("update"),
        "read before the demotion: it must miss"
    );
    let now = store
        .get_api_key("t-cas", &k.id)
        .await
        .expect("get")
        .expect("key");
    assert_eq!((now.role, now.name.as_str()), (Role::User, k.name.as_str()));
    let mut renamed = now.clone();
    renamed.name = "renamed".into();
    let mut other = renamed.clone();
    other.tenant_id = "t-other".into();
    assert!(!store.update_api_key(&other, &other).await.expect("update"));
    assert!(store.update_api_key(&now, &renamed).await.expect("update"));
    assert!(store
        .revoke_api_key("t-cas", &k.id, 5)
        .await
        .expect("revoke"));
    let mut again = renamed.clone();
    again.role = Role::Admin;
    assert!(
        !store
            .update_api_key(&renamed, &again)
            .await
            .expect("update"),
        "a revoked key is not changed"
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

/// Revoked and expired keys stop working but still count as keys that
/// existed (open development mode does not come back with them).
pub async fn revoked_and_expired_keys_are_inactive_but_counted(store: &dyn Store) {
    let now = 1_800_000_000_000;
    let before = store.count_api_keys().await.expect("count");
    let mut live = sample_key("t-active", 0);
    live.expires_at_ms = None;
    let mut expired = sample_key("t-active", 1);
    expired.expires_at_ms = Some(now - 1);
    let mut later = sample_key("t-active", 2);
    later.expires_at_ms = Some(now + 1);
    for k in [&live, &expired, &later] {
        store.insert_api_key(k).await.expect("insert");
    }
    assert_eq!(store.count_api_keys().await.expect("count"), before + 3);
    assert!(live.is_active(now) && later.is_active(now) && !expired.is_active(now));
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
    assert_eq!(store.count_api_keys().await.expect("count"), before + 3);
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

fn sample_bot(tenant: &str, n: u32) -> Bot {
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "team".into(),
        serde_json::json!({"name": "support", "n": n}),
    );
    Bot {
        id: new_id(),
        tenant_id: tenant.into(),
        name: format!("bot {n}"),
        model: "gpt-4o-mini".into(),
        system_prompt: Some(format!("You are bot {n}.")),
        temperature: Some(0.25),
        max_tokens: Some(512 + n),
        context_tokens: Some(8000),
        metadata,
        created_at_ms: 1_760_000_000_000 + i64::from(n),
        updated_at_ms: 1_760_000_000_000 + i64::from(n),
    }
}

pub fn sample_session(tenant: &str, user: Option<&str>, bot: Option<&str>) -> Session {
    let mut metadata = serde_json::Map::new();
    metadata.insert("channel".into(), "web".into());
    let mut state = serde_json::Map::new();
    state.insert("step".into(), 1.into());
    Session {
        id: new_id(),
        tenant_id: tenant.into(),
        bot_id: bot.map(Into::into),
        user_id: user.map(Into::into),
        metadata,
        state,
        state_version: 0,
        created_at_ms: 1_760_000_000_000,
    }
}

pub fn sample_message(tenant: &str, session: &str, role: &str, status: MessageStatus) -> Message {
    let assistant = role == "assistant";
    Message {
        id: new_id(),
        tenant_id: tenant.into(),
        session_id: session.into(),
        role: role.into(),
        content: if assistant {
            String::new()
        } else {
            "Hello there".into()
        },
        status,
        finish_reason: None,
        error_code: None,
        error_message: None,
        model: assistant.then(|| "gpt-4o-mini".into()),
        prompt_tokens: None,
        completion_tokens: None,
        cost_usd: None,
        latency_ms: None,
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        instance_id: assistant.then(|| "instance-1".into()),
        created_at_ms: 1_760_000_000_000,
        updated_at_ms: 1_760_000_000_000,
    }
}

fn completion(m: &Message, content: &str, at_ms: i64) -> MessageCompletion {
    MessageCompletion {
        tenant_id: m.tenant_id.clone(),
        id: m.id.clone(),
        status: MessageStatus::Complete,
        content: content.into(),
        finish_reason: Some("stop".into()),
        error_code: None,
        error_message: None,
        prompt_tokens: Some(12),
        completion_tokens: Some(34),
        cost_usd: Some(0.000_125),
        latency_ms: Some(250.5),
        frames: Some(r#"[{"delta":"Hi"},{"delta":" there"}]"#.into()),
        at_ms,
    }
}

fn obj(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

pub async fn bots_round_trip_paginate_update_and_delete(store: &dyn Store) {
    let tenant = "t-bots";
    let bots: Vec<Bot> = (0..5).map(|n| sample_bot(tenant, n)).collect();
    for b in &bots {
        store.insert_bot(b).await.expect("insert bot");
    }
    let mut bare = sample_bot(tenant, 9);
    bare.system_prompt = None;
    bare.temperature = None;
    bare.max_tokens = None;
    bare.context_tokens = None;
    bare.metadata.clear();
    store.insert_bot(&bare).await.expect("insert bare bot");
    for b in bots.iter().chain([&bare]) {
        assert_eq!(
            store.get_bot(tenant, &b.id).await.expect("get").as_ref(),
            Some(b),
            "{}",
            store.backend()
        );
    }

    let page1 = store.list_bots(tenant, None, 2).await.expect("list");
    assert_eq!(page1, vec![bare.clone(), bots[4].clone()], "newest first");
    let page2 = store
        .list_bots(tenant, Some(&page1[1].id), 2)
        .await
        .expect("list");
    assert_eq!(page2, vec![bots[3].clone(), bots[2].clone()]);
    let page3 = store
        .list_bots(tenant, Some(&page2[1].id), 10)
        .await
        .expect("list");
    assert_eq!(page3, vec![bots[1].clone(), bots[0].clone()]);

    let mut changed = bots[0].clone();
    changed.name = "renamed".into();
    changed.system_prompt = None;
    changed.temperature = Some(1.5);
    changed.metadata.insert("tier".into(), "gold".into());
    changed.updated_at_ms += 1000;
    assert!(store.update_bot(&changed).await.expect("update"));
    assert_eq!(
        store.get_bot(tenant, &changed.id).await.expect("get"),
        Some(changed.clone())
    );

    // Another tenant sees, changes and deletes nothing.
    let other = "t-bots-other";
    assert_eq!(store.get_bot(other, &bots[1].id).await.expect("get"), None);
    assert!(store
        .list_bots(other, None, 10)
        .await
        .expect("list")
        .is_empty());
    let mut foreign = bots[1].clone();
    foreign.tenant_id = other.into();
    foreign.name = "hijacked".into();
    assert!(!store.update_bot(&foreign).await.expect("update"));
    assert!(!store.delete_bot(other, &bots[1].id).await.expect("delete"));
    assert_eq!(
        store.get_bot(tenant, &bots[1].id).await.expect("get"),
        Some(bots[1].clone())
    );

    assert!(store.delete_bot(tenant, &bots[1].id).await.expect("delete"));
    assert!(!store
        .delete_bot(tenant, &bots[1].id)
        .await
        .expect("delete twice"));
    assert_eq!(store.get_bot(tenant, &bots[1].id).await.expect("get"), None);
    assert_eq!(
        store.list_bots(tenant, None, 10).await.expect("list").len(),
        5
    );
}

pub async fn sessions_are_filtered_paginated_and_deleted_with_their_messages(store: &dyn Store) {
    let tenant = "t-sessions";
    let combos = [
        (Some("u1"), Some("b1")),
        (Some("u2"), Some("b1")),
        (Some("u1"), Some("b2")),
        (None, None),
        (Some("u1"), Some("b1")),
    ];
    let sessions: Vec<Session> = combos
        .iter()
        .map(|(u, b)| sample_session(tenant, *u, *b))
        .collect();
    for s in &sessions {
        store.insert_session(s).await.expect("insert session");
    }
    for s in &sessions {
        assert_eq!(
            store
                .get_session(tenant, &s.id)
                .await
                .expect("get")
                .as_ref(),
            Some(s),
            "{}",
            store.backend()
        );
    }
    let list = |f: fn(&mut SessionQuery)| {
        let mut q = SessionQuery {
            limit: 100,
            ..Default::default()
        };
        f(&mut q);
        async move { store.list_sessions(tenant, &q).await.expect("list") }
    };
    let ids = |v: Vec<Session>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let id = |i: usize| sessions[i].id.clone();
    assert_eq!(
        ids(list(|_| {}).await),
        vec![id(4), id(3), id(2), id(1), id(0)]
    );
    assert_eq!(
        ids(list(|q| q.user_id = Some("u1".into())).await),
        vec![id(4), id(2), id(0)]
    );
    assert_eq!(
        ids(list(|q| q.bot_id = Some("b1".into())).await),
        vec![id(4), id(1), id(0)]
    );
    assert_eq!(
        ids(list(|q| {
            q.user_id = Some("u1".into());
            q.bot_id = Some("b1".into());
        })
        .await),
        vec![id(4), id(0)]
    );
    let page1 = store
        .list_sessions(
            tenant,
            &SessionQuery {
                user_id: Some("u1".into()),
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .expect("page");
    assert_eq!(ids(page1.clone()), vec![id(4), id(2)]);
    let page2 = store
        .list_sessions(
            tenant,
            &SessionQuery {
                user_id: Some("u1".into()),
                before_id: Some(page1[1].id.clone()),
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .expect("page");
    assert_eq!(ids(page2), vec![id(0)]);

    // Another tenant sees nothing and deletes nothing.
    let other = "t-sessions-other";
    assert_eq!(store.get_session(other, &id(0)).await.expect("get"), None);
    assert!(store
        .list_sessions(
            other,
            &SessionQuery {
                limit: 10,
                ..Default::default()
            }
        )
        .await
        .expect("list")
        .is_empty());
    assert!(!store.delete_session(other, &id(0)).await.expect("delete"));

    // Deleting a session deletes its messages, and only its.
    let doomed = sample_message(tenant, &id(0), "user", MessageStatus::Complete);
    let kept = sample_message(tenant, &id(1), "user", MessageStatus::Complete);
    store
        .insert_messages(&[doomed.clone(), kept.clone()])
        .await
        .expect("insert messages");
    assert!(store.delete_session(tenant, &id(0)).await.expect("delete"));
    assert!(!store
        .delete_session(tenant, &id(0))
        .await
        .expect("delete twice"));
    assert_eq!(store.get_session(tenant, &id(0)).await.expect("get"), None);
    assert_eq!(
        store.get_message(tenant, &doomed.id).await.expect("get"),
        None
    );
    assert_eq!(
        store.get_message(tenant, &kept.id).await.expect("get"),
        Some(kept)
    );
    assert_eq!(ids(list(|_| {}).await).len(), 4);
}

pub async fn messages_are_listed_in_order_and_completed_once(store: &dyn Store) {
    let tenant = "t-messages";
    let session = sample_session(tenant, Some("u1"), None);
    store.insert_session(&session).await.expect("session");
    let mut turns = Vec::new();
    for _ in 0..3 {
        let user = sample_message(tenant, &session.id, "user", MessageStatus::Complete);
        let mut reply = sample_message(tenant, &session.id, "assistant", MessageStatus::Complete);
        reply.content = "Hi there".into();
        reply.finish_reason = Some("stop".into());
        reply.prompt_tokens = Some(10);
        reply.completion_tokens = Some(u64::from(u32::MAX) + 7);
        reply.cost_usd = Some(0.000_012_5);
        reply.latency_ms = Some(321.25);
        store
            .insert_messages(&[user.clone(), reply.clone()])
            .await
            .expect("insert");
        turns.push(user);
        turns.push(reply);
    }
    let placeholder = sample_message(tenant, &session.id, "assistant", MessageStatus::Streaming);
    store
        .insert_messages(std::slice::from_ref(&placeholder))
        .await
        .expect("insert placeholder");
    store.insert_messages(&[]).await.expect("empty insert");
    turns.push(placeholder.clone());

    for m in &turns {
        assert_eq!(
            store
                .get_message(tenant, &m.id)
                .await
                .expect("get")
                .as_ref(),
            Some(m),
            "{}",
            store.backend()
        );
    }
    let all = store
        .list_messages(tenant, &session.id, None, 100)
        .await
        .expect("list");
    assert_eq!(all, turns, "oldest first");
    let page = store
        .list_messages(tenant, &session.id, Some(&turns[2].id), 3)
        .await
        .expect("list");
    assert_eq!(page, turns[3..6].to_vec());
    // History: newest first, the streaming placeholder left out.
    let history = store
        .history(tenant, &session.id, 2)
        .await
        .expect("history");
    assert_eq!(
        history,
        vec![
            ("assistant".to_owned(), "Hi there".to_owned()),
            ("user".to_owned(), turns[4].content.clone()),
        ],
        "{}",
        store.backend()
    );
    assert_eq!(
        store
            .history(tenant, &session.id, 100)
            .await
            .expect("history")
            .len(),
        6
    );
    // The session and its history in one read: the same as the two reads.
    let (read, both) = store
        .session_and_history(tenant, &session.id, 2)
        .await
        .expect("session and history")
        .expect("the session exists");
    assert_eq!(
        Some(read),
        store.get_session(tenant, &session.id).await.expect("get"),
        "{}",
        store.backend()
    );
    assert_eq!(both, history, "{}", store.backend());
    assert_eq!(
        store
            .session_and_history(tenant, &session.id, 100)
            .await
            .expect("session and history")
            .map(|(_, h)| h.len()),
        Some(6)
    );
    assert_eq!(
        store
            .session_and_history("t-messages-other", &session.id, 100)
            .await
            .expect("session and history"),
        None,
        "another tenant's session"
    );

    // Another tenant reads, completes and lists nothing.
    let other = "t-messages-other";
    assert_eq!(
        store
            .get_message(other, &placeholder.id)
            .await
            .expect("get"),
        None
    );
    assert!(store
        .list_messages(other, &session.id, None, 100)
        .await
        .expect("list")
        .is_empty());
    assert!(store
        .history(other, &session.id, 100)
        .await
        .expect("history")
        .is_empty());
    let mut foreign = completion(&placeholder, "hijacked", 5);
    foreign.tenant_id = other.into();
    assert!(!store.complete_message(&foreign).await.expect("complete"));

    let done = completion(&placeholder, "Hi there", 1_760_000_001_000);
    assert!(store.complete_message(&done).await.expect("complete"));
    let mut again = done.clone();
    again.content = "second ending".into();
    assert!(
        !store
            .complete_message(&again)
            .await
            .expect("complete twice"),
        "only a streaming message is completed"
    );
    let stored = store
        .get_message(tenant, &placeholder.id)
        .await
        .expect("get")
        .expect("exists");
    let expected = Message {
        status: MessageStatus::Complete,
        content: done.content.clone(),
        finish_reason: done.finish_reason.clone(),
        prompt_tokens: done.prompt_tokens,
        completion_tokens: done.completion_tokens,
        cost_usd: done.cost_usd,
        latency_ms: done.latency_ms,
        updated_at_ms: done.at_ms,
        ..placeholder.clone()
    };
    assert_eq!(stored, expected, "{}", store.backend());
    assert_eq!(
        store
            .message_frames(tenant, &placeholder.id)
            .await
            .expect("frames"),
        done.frames
    );
    assert_eq!(
        store
            .message_frames(tenant, &turns[0].id)
            .await
            .expect("frames"),
        None
    );
    assert_eq!(
        store
            .message_frames(other, &placeholder.id)
            .await
            .expect("frames"),
        None
    );

    // A failure ending keeps its code and message.
    let second = sample_message(tenant, &session.id, "assistant", MessageStatus::Streaming);
    store
        .insert_messages(std::slice::from_ref(&second))
        .await
        .expect("insert");
    let failed = MessageCompletion {
        status: MessageStatus::Failed,
        content: "partial".into(),
        finish_reason: None,
        error_code: Some("upstream_timeout".into()),
        error_message: Some("The provider did not answer in time.".into()),
        prompt_tokens: None,
        completion_tokens: None,
        cost_usd: None,
        latency_ms: None,
        frames: None,
        ..completion(&second, "", 1_760_000_002_000)
    };
    assert!(store.complete_message(&failed).await.expect("fail"));
    let stored = store
        .get_message(tenant, &second.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(stored.status, MessageStatus::Failed);
    assert_eq!(stored.error_code.as_deref(), Some("upstream_timeout"));
    assert_eq!(stored.content, "partial");
}

pub async fn state_is_merged_as_a_json_merge_patch(store: &dyn Store) {
    use serde_json::json;
    let tenant = "t-state";
    let mut session = sample_session(tenant, Some("u1"), None);
    session.state = obj(json!({
        "step": 1,
        "profile": {"name": "Ada", "langs": ["en", "fr"], "address": {"city": "Paris", "zip": "75001"}},
        "flags": {"beta": true},
        "scalar": "text"
    }));
    store.insert_session(&session).await.expect("session");
    let id = session.id.clone();

    // (patch, expected state): each applied to the previous result.
    let steps = [
        (
            json!({"step": 2, "profile": {"address": {"zip": null, "country": "FR"}, "langs": ["de"]}}),
            json!({
                "step": 2,
                "profile": {"name": "Ada", "langs": ["de"], "address": {"city": "Paris", "country": "FR"}},
                "flags": {"beta": true},
                "scalar": "text"
            }),
        ),
        (
            // null deletes; a missing key patched with nulls becomes an empty object;
            // an object replaces a scalar and a scalar an object.
            json!({"flags": null, "ghost": null, "fresh": {"a": null}, "scalar": {"x": 1}, "profile": "gone"}),
            json!({"step": 2, "profile": "gone", "scalar": {"x": 1}, "fresh": {}}),
        ),
        (
            json!({"unicode": "é \u{1F600} \"quoted\"", "num": 1.5, "big": 9_007_199_254_740_993_i64, "empty": {}, "list": [{"a": null}]}),
            json!({
                "step": 2, "profile": "gone", "scalar": {"x": 1}, "fresh": {},
                "unicode": "é \u{1F600} \"quoted\"", "num": 1.5, "big": 9_007_199_254_740_993_i64,
                "empty": {}, "list": [{"a": null}]
            }),
        ),
        (
            json!({}),
            json!({
                "step": 2, "profile": "gone", "scalar": {"x": 1}, "fresh": {},
                "unicode": "é \u{1F600} \"quoted\"", "num": 1.5, "big": 9_007_199_254_740_993_i64,
                "empty": {}, "list": [{"a": null}]
            }),
        ),
    ];
    for (n, (patch, expected)) in steps.into_iter().enumerate() {
        let version = n as i64 + 1;
        let got = store
            .patch_state(tenant, &id, &obj(patch.clone()), None)
            .await
            .expect("patch");
        assert_eq!(
            got,
            StatePatch::Applied {
                state: obj(expected.clone()),
                version
            },
            "{} patch {patch}",
            store.backend()
        );
        let stored = store
            .get_session(tenant, &id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(stored.state, obj(expected));
        assert_eq!(stored.state_version, version);
    }

    // Compare-and-set.
    let p = obj(json!({"cas": 1}));
    assert_eq!(
        store
            .patch_state(tenant, &id, &p, Some(1))
            .await
            .expect("patch"),
        StatePatch::VersionMismatch { current: 4 }
    );
    assert!(matches!(
        store
            .patch_state(tenant, &id, &p, Some(4))
            .await
            .expect("patch"),
        StatePatch::Applied { version: 5, .. }
    ));
    // Unknown sessions and another tenant's sessions are not found, and untouched.
    assert_eq!(
        store
            .patch_state(tenant, "no-such-session", &p, None)
            .await
            .expect("patch"),
        StatePatch::NotFound
    );
    assert_eq!(
        store
            .patch_state("t-state-other", &id, &p, None)
            .await
            .expect("patch"),
        StatePatch::NotFound
    );
    assert_eq!(
        store
            .patch_state("t-state-other", &id, &p, Some(5))
            .await
            .expect("patch"),
        StatePatch::NotFound
    );
    assert_eq!(
        store
            .get_session(tenant, &id)
            .await
            .expect("get")
            .expect("exists")
            .state_version,
        5
    );
}

pub async fn concurrent_state_patches_lose_nothing(store: &dyn Store) {
    let tenant = "t-state-concurrent";
    let mut session = sample_session(tenant, None, None);
    session.state.clear();
    store.insert_session(&session).await.expect("session");
    let patches: Vec<_> = (0..200)
        .map(|i| obj(serde_json::json!({ format!("k{i}"): {"i": i} })))
        .collect();
    let results = futures::future::join_all(
        patches
            .iter()
            .map(|p| store.patch_state(tenant, &session.id, p, None)),
    )
    .await;
    let mut versions: Vec<i64> = results
        .into_iter()
        .map(|r| match r.expect("patch") {
            StatePatch::Applied { version, .. } => version,
            other => panic!("{}: {other:?}", store.backend()),
        })
        .collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=200).collect::<Vec<_>>(),
        "each patch its own version"
    );
    let stored = store
        .get_session(tenant, &session.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(stored.state_version, 200, "{}", store.backend());
    assert_eq!(
        stored.state.len(),
        200,
        "{}: no lost update",
        store.backend()
    );
    for i in 0..200 {
        assert_eq!(stored.state[&format!("k{i}")], serde_json::json!({"i": i}));
    }
}

pub async fn a_state_compare_and_set_race_has_one_winner(store: &dyn Store) {
    let tenant = "t-state-cas";
    let session = sample_session(tenant, None, None);
    store.insert_session(&session).await.expect("session");
    let seed = obj(serde_json::json!({"seed": true}));
    store
        .patch_state(tenant, &session.id, &seed, None)
        .await
        .expect("seed");
    let patches: Vec<_> = (0..20)
        .map(|i| obj(serde_json::json!({ "winner": i })))
        .collect();
    let results = futures::future::join_all(
        patches
            .iter()
            .map(|p| store.patch_state(tenant, &session.id, p, Some(1))),
    )
    .await;
    let mut applied = 0;
    for r in results {
        match r.expect("patch") {
            StatePatch::Applied { version, .. } => {
                assert_eq!(version, 2);
                applied += 1;
            }
            StatePatch::VersionMismatch { current } => assert_eq!(current, 2),
            StatePatch::NotFound => panic!("{}: not found", store.backend()),
        }
    }
    assert_eq!(applied, 1, "{}", store.backend());
    let stored = store
        .get_session(tenant, &session.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(stored.state_version, 2);
    assert!(stored.state.contains_key("winner") && stored.state.contains_key("seed"));
}

/// A plain request's trace kept in its usage row reads back as the three
/// events the gateway would have written, merged in order with the trace's
/// `bus_events` rows, and only for its tenant.
pub async fn plain_traces_in_usage_rows_read_back_as_events(store: &dyn Store) {
    let tenant = "t-plain-trace";
    let trace = "019ae8c1f3a27b4c8d9e0f1a2b3c4d5e";
    let mut ok = sample_usage(tenant, 7);
    ok.trace_id = trace.into();
    // All 17 digits of a double must come back.
    ok.latency_ms = 33.0 + 1.0 / 3.0;
    let mut failed = sample_usage(tenant, 8);
    failed.trace_id = trace.into();
    failed.status = 502;
    failed.error_code = Some("upstream_error".into());
    failed.prompt_tokens = None;
    failed.completion_tokens = None;
    failed.ttft_ms = None;
    failed.trace = Some(PlainTrace {
        received_at_ms: 1_760_000_000_030,
        attempt_at_ms: 1_760_000_000_030,
        done_at_ms: 1_760_000_000_090,
    });
    let mut untraced = sample_usage(tenant, 9);
    untraced.trace_id = trace.into();
    untraced.trace = None;
    let mut elsewhere = ok.clone();
    elsewhere.id = new_id();
    elsewhere.tenant_id = "t-plain-trace-other".into();
    store
        .insert_usage(&[ok.clone(), failed.clone(), untraced, elsewhere.clone()])
        .await
        .expect("usage");
    // An event of the same trace written as a row, between the two requests.
    let between = BusEvent {
        id: new_id(),
        tenant_id: tenant.into(),
        trace_id: trace.into(),
        seq: 0,
        kind: "breaker.changed".into(),
        session_id: None,
        user_id: None,
        payload: serde_json::json!({"deployment": "openai/gpt-4o-mini-2024-07-18", "from": "closed", "to": "open"}),
        created_at_ms: 1_760_000_000_025,
    };
    store
        .insert_events(&EventsRow::pack(std::slice::from_ref(&between)))
        .await
        .expect("event");

    let back = store.list_trace_events(tenant, trace).await.expect("list");
    let mut expected = ok.plain_trace_events();
    expected.push(between);
    expected.extend(failed.plain_trace_events());
    assert_eq!(back, expected, "{}", store.backend());
    let kinds: Vec<&str> = back.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "request.received",
            "provider.attempt",
            "request.done",
            "breaker.changed",
            "request.received",
            "provider.attempt",
            "request.error"
        ]
    );
    assert_eq!(
        back[2].payload,
        serde_json::json!({
            "status": 200, "provider": "openai", "latency_ms": ok.latency_ms,
            "ttft_ms": 3.5, "error": null, "prompt_tokens": 17, "completion_tokens": 20,
        })
    );
    assert_eq!(
        back[5].payload,
        serde_json::json!({"deployment": "openai/gpt-4o-mini-2024-07-18", "attempt": 1})
    );
    assert_eq!(
        (back[4].created_at_ms, back[6].created_at_ms),
        (1_760_000_000_030, 1_760_000_000_090)
    );
    assert_eq!(back[0].user_id.as_deref(), Some("user-7"));
    assert_eq!(
        store
            .list_trace_events("t-plain-trace-other", trace)
            .await
            .expect("list"),
        elsewhere.plain_trace_events()
    );
    assert!(store
        .list_trace_events("t-plain-trace-none", trace)
        .await
        .expect("list")
        .is_empty());
}

pub async fn trace_events_are_ordered_and_scoped(store: &dyn Store) {
    let tenant = "t-events";
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let kinds = [
        "request.received",
        "provider.attempt",
        "provider.retry",
        "request.done",
    ];
    // 85 events over 5 milliseconds, several per millisecond, given shuffled.
    let mut events: Vec<BusEvent> = (0..85)
        .map(|n: i64| BusEvent {
            id: new_id(),
            tenant_id: tenant.into(),
            trace_id: trace.into(),
            seq: n,
            kind: kinds[(n % 4) as usize].into(),
            session_id: (n % 2 == 0).then(|| "s-1".into()),
            user_id: (n % 3 == 0).then(|| "u-1".into()),
            payload: serde_json::json!({"n": n, "nested": {"list": [1, "two", null, 3.5]}, "text": "é\n\"q\""}),
            created_at_ms: 1_760_000_000_000 + n / 17,
        })
        .collect();
    let expected = events.clone();
    events.reverse();
    events.swap(3, 60);
    let mut other = expected[0].clone();
    other.id = new_id();
    other.tenant_id = "t-events-other".into();
    events.push(other.clone());
    store
        .insert_events(&EventsRow::pack(&events))
        .await
        .expect("insert");
    store.insert_events(&[]).await.expect("empty insert");
    let back = store.list_trace_events(tenant, trace).await.expect("list");
    assert_eq!(back, expected, "{}", store.backend());
    assert_eq!(
        store
            .list_trace_events("t-events-other", trace)
            .await
            .expect("list"),
        vec![other]
    );
    assert!(store
        .list_trace_events("t-events-none", trace)
        .await
        .expect("list")
        .is_empty());
}

fn idem_key(tenant: &str, key: &str, hash: &str, now_ms: i64) -> IdempotencyKey {
    IdempotencyKey {
        tenant_id: tenant.into(),
        key: key.into(),
        request_hash: hash.into(),
        user_id: Some("u-idem".into()),
        now_ms,
        lease_ms: 30_000,
        ttl_ms: 86_400_000,
        owner: format!("owner-{now_ms}"),
    }
}

pub async fn idempotency_claims_have_one_winner_and_replay(store: &dyn Store) {
    let tenant = "t-idem";
    let now = 1_760_000_000_000;
    let k = idem_key(tenant, "key-1", "hash-a", now);

    let claims = futures::future::join_all((0..50).map(|_| store.claim_idempotency(&k))).await;
    let mut acquired = 0;
    for c in claims {
        match c.expect("claim") {
            IdempotencyClaim::Acquired => acquired += 1,
            IdempotencyClaim::InFlight { same_request: true } => {}
            other => panic!("{}: {other:?}", store.backend()),
        }
    }
    assert_eq!(acquired, 1, "{}", store.backend());
    let other_hash = IdempotencyKey {
        request_hash: "hash-b".into(),
        ..k.clone()
    };
    assert_eq!(
        store.claim_idempotency(&other_hash).await.expect("claim"),
        IdempotencyClaim::InFlight {
            same_request: false
        }
    );

    // Another tenant's key of the same name is its own, and is left alone.
    let foreign = IdempotencyKey {
        owner: "owner-foreign".into(),
        ..idem_key("t-idem-other", "key-1", "hash-z", now)
    };
    assert_eq!(
        store.claim_idempotency(&foreign).await.expect("claim"),
        IdempotencyClaim::Acquired
    );

    let response = StoredResponse {
        status: 201,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-switchyard-provider".into(), "openai".into()),
        ],
        body: vec![b'{', b'}', 0, 0xff, 0x9f, b'\n', b'"'],
    };
    let expires = now + k.ttl_ms;
    store
        .complete_idempotency(tenant, "key-1", &k.owner, &response, expires)
        .await
        .expect("complete");
    assert_eq!(
        store.claim_idempotency(&k).await.expect("claim"),
        IdempotencyClaim::Done {
            same_request: true,
            response: response.clone()
        },
        "{}",
        store.backend()
    );
    assert_eq!(
        store.claim_idempotency(&other_hash).await.expect("claim"),
        IdempotencyClaim::Done {
            same_request: false,
            response: response.clone()
        }
    );
    // Releasing a finished record does nothing; neither does another tenant.
    store
        .release_idempotency(tenant, "key-1", &k.owner)
        .await
        .expect("release");
    store
        .release_idempotency("t-idem-other", "key-1", &k.owner)
        .await
        .expect("release other");
    assert_eq!(
        store.claim_idempotency(&foreign).await.expect("claim"),
        IdempotencyClaim::InFlight { same_request: true },
        "another tenant's owner id does not free this tenant's claim"
    );
    store
        .release_idempotency("t-idem-other", "key-1", &foreign.owner)
        .await
        .expect("release other");
    assert!(matches!(
        store.claim_idempotency(&k).await.expect("claim"),
        IdempotencyClaim::Done { .. }
    ));
    assert_eq!(
        store.claim_idempotency(&foreign).await.expect("claim"),
        IdempotencyClaim::Acquired,
        "a released claim is free again"
    );

    // Expired: taken over, by one of several concurrent claimers.
    let later = IdempotencyKey {
        now_ms: expires,
        ..other_hash.clone()
    };
    let claims = futures::future::join_all((0..10).map(|_| store.claim_idempotency(&later))).await;
    let acquired = claims
        .into_iter()
        .map(|c| c.expect("claim"))
        .filter(|c| *c == IdempotencyClaim::Acquired)
        .count();
    assert_eq!(acquired, 1, "{}", store.backend());
    assert_eq!(
        store.claim_idempotency(&later).await.expect("claim"),
        IdempotencyClaim::InFlight { same_request: true },
        "the takeover is the new request's, with its hash"
    );
    // An in-flight claim past its lease is taken over.
    let after_lease = IdempotencyKey {
        now_ms: expires + later.lease_ms,
        ..k.clone()
    };
    assert_eq!(
        store.claim_idempotency(&after_lease).await.expect("claim"),
        IdempotencyClaim::Acquired
    );
    // Released: free again.
    store
        .release_idempotency(tenant, "key-1", &after_lease.owner)
        .await
        .expect("release");
    assert_eq!(
        store.claim_idempotency(&after_lease).await.expect("claim"),
        IdempotencyClaim::Acquired
    );
    store
        .release_idempotency(tenant, "key-1", &after_lease.owner)
        .await
        .expect("release");
    store
        .release_idempotency("t-idem-other", "key-1", &foreign.owner)
        .await
        .expect("release");
}

pub async fn idempotency_a_taken_over_claim_is_not_the_old_owners(store: &dyn Store) {
    // A request outlives its lease; another takes the key over. The first
    // request's end (a completion, or a release on failure) must leave the
    // new holder's claim alone.
    let tenant = "t-idem-takeover";
    let first = IdempotencyKey {
        lease_ms: 100,
        ..idem_key(tenant, "slow", "h", 1_000)
    };
    let second = IdempotencyKey {
        owner: "owner-second".into(),
        ..idem_key(tenant, "slow", "h", 1_100)
    };
    assert_eq!(
        store.claim_idempotency(&first).await.expect("claim"),
        IdempotencyClaim::Acquired
    );
    assert_eq!(
        store.claim_idempotency(&second).await.expect("claim"),
        IdempotencyClaim::Acquired,
        "{}: the lease is over at 1_100",
        store.backend()
    );
    let stale = StoredResponse {
        status: 200,
        headers: vec![],
        body: b"first".to_vec(),
    };
    store
        .complete_idempotency(tenant, "slow", &first.owner, &stale, 90_000)
        .await
        .expect("complete");
    store
        .release_idempotency(tenant, "slow", &first.owner)
        .await
        .expect("release");
    let probe = IdempotencyKey {
        owner: "owner-probe".into(),
        ..idem_key(tenant, "slow", "h", 1_200)
    };
    assert_eq!(
        store.claim_idempotency(&probe).await.expect("claim"),
        IdempotencyClaim::InFlight { same_request: true },
        "{}: the second request still holds the key",
        store.backend()
    );
    let fresh = StoredResponse {
        status: 200,
        headers: vec![],
        body: b"second".to_vec(),
    };
    store
        .complete_idempotency(tenant, "slow", &second.owner, &fresh, 90_000)
        .await
        .expect("complete");
    assert_eq!(
        store.claim_idempotency(&probe).await.expect("claim"),
        IdempotencyClaim::Done {
            same_request: true,
            response: fresh
        },
        "{}",
        store.backend()
    );
}

pub async fn idempotency_records_are_purged_when_dead(store: &dyn Store) {
    // Times far below every other check's, so only these records are dead.
    let tenant = "t-idem-purge";
    let response = StoredResponse {
        status: 200,
        headers: vec![],
        body: b"ok".to_vec(),
    };
    let claim = |key: &str, now: i64| {
        let mut k = idem_key(tenant, key, "h", now);
        k.lease_ms = 100;
        k
    };
    for key in ["expired", "live", "stuck", "leased"] {
        assert_eq!(
            store
                .claim_idempotency(&claim(key, 1_000))
                .await
                .expect("claim"),
            IdempotencyClaim::Acquired
        );
    }
    store
        .complete_idempotency(tenant, "expired", "owner-1000", &response, 2_000)
        .await
        .expect("complete");
    store
        .complete_idempotency(tenant, "live", "owner-1000", &response, 9_000)
        .await
        .expect("complete");
    // "stuck" stays in flight with its lease over at 1_100; "leased" is
    // claimed again at 2_000 and holds a lease until 2_100.
    assert_eq!(
        store
            .claim_idempotency(&claim("leased", 2_000))
            .await
            .expect("claim"),
        IdempotencyClaim::Acquired
    );
    assert_eq!(store.purge_idempotency(999).await.expect("purge"), 0);
    assert_eq!(
        store.purge_idempotency(2_000).await.expect("purge"),
        2,
        "{}",
        store.backend()
    );
    assert_eq!(store.purge_idempotency(2_000).await.expect("purge"), 0);
    assert!(matches!(
        store
            .claim_idempotency(&claim("live", 2_050))
            .await
            .expect("claim"),
        IdempotencyClaim::Done { .. }
    ));
    assert_eq!(
        store
            .claim_idempotency(&claim("leased", 2_050))
            .await
            .expect("claim"),
        IdempotencyClaim::InFlight { same_request: true }
    );
    assert_eq!(store.purge_idempotency(9_000).await.expect("purge"), 2);
}

pub async fn streaming_messages_are_interrupted_by_instance_and_staleness(store: &dyn Store) {
    let tenant = "t-interrupt";
    let session = sample_session(tenant, None, None);
    store.insert_session(&session).await.expect("session");
    let msg = |instance: &str, updated: i64, status: MessageStatus| {
        let mut m = sample_message(tenant, &session.id, "assistant", status);
        m.instance_id = Some(instance.into());
        m.created_at_ms = updated;
        m.updated_at_ms = updated;
        m
    };
    // Other checks' messages are updated around 1_760_000_000_000, far above
    // the staleness cut-off used here; the instance ids are this check's own.
    let a1 = msg("inst-interrupt-a", 10_000, MessageStatus::Streaming);
    let a2 = msg("inst-interrupt-a", 10_000, MessageStatus::Streaming);
    let a_done = msg("inst-interrupt-a", 10_000, MessageStatus::Complete);
    let b_stale = msg("inst-interrupt-b", 500, MessageStatus::Streaming);
    let b_fresh = msg("inst-interrupt-b", 10_000, MessageStatus::Streaming);
    let mut other = msg("inst-interrupt-a", 10_000, MessageStatus::Streaming);
    other.tenant_id = "t-interrupt-other".into();
    store
        .insert_messages(&[
            a1.clone(),
            a2.clone(),
            a_done.clone(),
            b_stale.clone(),
            b_fresh.clone(),
            other.clone(),
        ])
        .await
        .expect("insert");

    assert_eq!(
        store
            .interrupt_streaming(None, None, 20_000)
            .await
            .expect("none"),
        0
    );
    assert_eq!(
        store
            .interrupt_streaming(Some("inst-interrupt-a"), None, 20_000)
            .await
            .expect("by instance"),
        3,
        "{}: across tenants",
        store.backend()
    );
    for m in [&a1, &a2] {
        let got = store
            .get_message(tenant, &m.id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(got.status, MessageStatus::Failed);
        assert_eq!(got.error_code.as_deref(), Some("interrupted"));
        assert_eq!(
            got.error_message.as_deref(),
            Some("The server stopped before the reply was complete.")
        );
        assert_eq!(got.updated_at_ms, 20_000);
        assert!(
            !store
                .complete_message(&completion(m, "too late", 30_000))
                .await
                .expect("complete"),
            "an interrupted message stays interrupted"
        );
        assert_eq!(
            store
                .get_message(tenant, &m.id)
                .await
                .expect("get")
                .expect("exists")
                .status,
            MessageStatus::Failed
        );
    }
    assert_eq!(
        store.get_message(tenant, &a_done.id).await.expect("get"),
        Some(a_done.clone()),
        "only streaming messages"
    );
    assert_eq!(
        store
            .get_message("t-interrupt-other", &other.id)
            .await
            .expect("get")
            .expect("exists")
            .status,
        MessageStatus::Failed
    );

    assert_eq!(
        store
            .interrupt_streaming(None, Some(1_000), 20_000)
            .await
            .expect("by staleness"),
        1,
        "{}",
        store.backend()
    );
    assert_eq!(
        store
            .get_message(tenant, &b_stale.id)
            .await
            .expect("get")
            .expect("exists")
            .status,
        MessageStatus::Failed
    );
    assert_eq!(
        store
            .get_message(tenant, &b_fresh.id)
            .await
            .expect("get")
            .expect("exists")
            .status,
        MessageStatus::Streaming
    );
    // Both conditions at once; the fresh one is neither.
    assert_eq!(
        store
            .interrupt_streaming(Some("inst-interrupt-a"), Some(1_000), 20_000)
            .await
            .expect("both"),
        0
    );
    assert!(store
        .complete_message(&completion(&b_fresh, "done", 21_000))
        .await
        .expect("complete"));
}

pub async fn a_user_is_exported_and_erased_alone(store: &dyn Store) {
    let tenant = "t-erase";
    let gone = "u-gone";
    let kept = "u-kept";
    for (t, u) in [(tenant, gone), (tenant, kept), ("t-erase-other", gone)] {
        store.ensure_user(t, u, 1).await.expect("user");
    }
    let mut sessions = Vec::new();
    let mut messages = Vec::new();
    let mut events = Vec::new();
    let mut direct = Vec::new();
    for (t, u) in [
        (tenant, gone),
        (tenant, kept),
        (tenant, gone),
        ("t-erase-other", gone),
    ] {
        let s = sample_session(t, Some(u), None);
        store.insert_session(&s).await.expect("session");
        let user = sample_message(t, &s.id, "user", MessageStatus::Complete);
        let reply = sample_message(t, &s.id, "assistant", MessageStatus::Complete);
        store
            .insert_messages(&[user.clone(), reply.clone()])
            .await
            .expect("messages");
        let e = BusEvent {
            id: new_id(),
            tenant_id: t.into(),
            trace_id: format!("trace-erase-{}", s.id),
            seq: 0,
            kind: "request.done".into(),
            session_id: Some(s.id.clone()),
            user_id: Some(u.into()),
            payload: serde_json::json!({"user": u}),
            created_at_ms: 1,
        };
        // And a request of the same user outside any session.
        let d = BusEvent {
            id: new_id(),
            trace_id: format!("trace-erase-direct-{}", s.id),
            session_id: None,
            ..e.clone()
        };
        store
            .insert_events(&EventsRow::pack(&[e.clone(), d.clone()]))
            .await
            .expect("event");
        sessions.push(s);
        messages.push(vec![user, reply]);
        events.push(e);
        direct.push(d);
    }
    // A session with no user is nobody's.
    let anonymous = sample_session(tenant, None, None);
    store.insert_session(&anonymous).await.expect("session");

    let mut usage = Vec::new();
    for (n, (t, u)) in [
        (tenant, gone),
        (tenant, kept),
        (tenant, gone),
        ("t-erase-other", gone),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = sample_usage(t, n as u32);
        r.user_id = Some(u.into());
        usage.push(r);
    }
    store.insert_usage(&usage).await.expect("usage");
    for (t, u, key) in [
        (tenant, Some(gone), "idem-gone"),
        (tenant, Some(kept), "idem-kept"),
        (tenant, None, "idem-nobody"),
        ("t-erase-other", Some(gone), "idem-gone"),
    ] {
        let mut k = idem_key(t, key, "h", 1_760_000_000_000);
        k.user_id = u.map(Into::into);
        assert_eq!(
            store.claim_idempotency(&k).await.expect("claim"),
            IdempotencyClaim::Acquired
        );
    }

    let data = store.user_data(tenant, gone).await.expect("export");
    assert_eq!(
        data.sessions,
        vec![sessions[0].clone(), sessions[2].clone()]
    );
    assert_eq!(
        data.messages,
        [&messages[0][..], &messages[2][..]].concat(),
        "{}",
        store.backend()
    );
    assert_eq!(data.usage, vec![usage[0].clone(), usage[2].clone()]);
    let nobody = store.user_data(tenant, "u-nobody").await.expect("export");
    assert_eq!(nobody, Default::default());

    // The usage rows keep their requests' plain traces.
    for r in &usage[..3] {
        assert_eq!(
            store
                .list_trace_events(tenant, &r.trace_id)
                .await
                .expect("events")
                .len(),
            3
        );
    }
    let erased = store.erase_user(tenant, gone).await.expect("erase");
    assert_eq!(
        erased,
        Erased {
            sessions: 2,
            messages: 4,
            // Two bus_events rows per session, and two usage rows' traces.
            events: 6,
            idempotency_records: 1,
            usage_anonymised: 2,
        },
        "{}",
        store.backend()
    );
    assert_eq!(
        store.user_data(tenant, gone).await.expect("export"),
        Default::default()
    );
    for (i, expect) in [(0, 0), (1, 3), (2, 0), (3, 3)] {
        let left = store
            .list_trace_events(&usage[i].tenant_id, &usage[i].trace_id)
            .await
            .expect("events");
        assert_eq!(left.len(), expect, "usage row {i}: {left:?}");
    }
    for i in [0, 2] {
        assert_eq!(
            store
                .get_session(tenant, &sessions[i].id)
                .await
                .expect("get"),
            None
        );
        for m in &messages[i] {
            assert_eq!(store.get_message(tenant, &m.id).await.expect("get"), None);
        }
        assert!(store
            .list_trace_events(tenant, &events[i].trace_id)
            .await
            .expect("events")
            .is_empty());
        assert!(store
            .list_trace_events(tenant, &direct[i].trace_id)
            .await
            .expect("events")
            .is_empty());
    }
    let idem = |t: &str, key: &str| {
        let mut k = idem_key(t, key, "h", 1_760_000_000_000);
        k.user_id = None;
        k
    };
    assert_eq!(
        store
            .claim_idempotency(&idem(tenant, "idem-gone"))
            .await
            .expect("claim"),
        IdempotencyClaim::Acquired,
        "the erased user's record is gone"
    );
    for (t, key) in [
        (tenant, "idem-kept"),
        (tenant, "idem-nobody"),
        ("t-erase-other", "idem-gone"),
    ] {
        assert_eq!(
            store.claim_idempotency(&idem(t, key)).await.expect("claim"),
            IdempotencyClaim::InFlight { same_request: true },
            "{t}/{key} kept"
        );
    }

    // The other user, the anonymous session and the other tenant's user keep everything.
    let kept_data = store.user_data(tenant, kept).await.expect("export");
    assert_eq!(kept_data.sessions, vec![sessions[1].clone()]);
    assert_eq!(kept_data.messages, messages[1]);
    assert_eq!(kept_data.usage, vec![usage[1].clone()]);
    assert_eq!(
        store.get_session(tenant, &anonymous.id).await.expect("get"),
        Some(anonymous)
    );
    assert_eq!(
        store
            .list_trace_events(tenant, &events[1].trace_id)
            .await
            .expect("events"),
        vec![events[1].clone()]
    );
    assert_eq!(
        store
            .list_trace_events(tenant, &direct[1].trace_id)
            .await
            .expect("events"),
        vec![direct[1].clone()]
    );
    assert_eq!(
        store
            .list_trace_events("t-erase-other", &direct[3].trace_id)
            .await
            .expect("events"),
        vec![direct[3].clone()]
    );
    let other = store
        .user_data("t-erase-other", gone)
        .await
        .expect("export");
    assert_eq!(other.sessions, vec![sessions[3].clone()]);
    assert_eq!(other.messages, messages[3]);
    assert_eq!(other.usage, vec![usage[3].clone()]);
    assert_eq!(
        store
            .list_trace_events("t-erase-other", &events[3].trace_id)
            .await
            .expect("events"),
        vec![events[3].clone()]
    );

    // Usage rows stay for accounting, without the user.
    assert_eq!(store.count_usage(tenant).await.expect("count"), 3);
    let rows = store.list_usage(tenant, 10).await.expect("usage");
    for (i, r) in usage.iter().enumerate().take(3) {
        let back = rows.iter().find(|b| b.id == r.id).expect("row kept");
        let expected_user = if i == 1 { Some(kept.to_owned()) } else { None };
        assert_eq!(back.user_id, expected_user);
        assert_eq!(back.cost_usd, r.cost_usd);
    }
    // Erasing again finds nothing.
    assert_eq!(
        store.erase_user(tenant, gone).await.expect("erase"),
        Erased::default()
    );
}

/// Retention: rows made before the cutoff go, oldest first, at most `limit`
/// per call, whatever their tenant; rows at or after it stay. Usage rows are
/// found by their UUIDv7 ids, so these are made at the rows' own times.
pub async fn old_log_rows_are_purged_oldest_first_in_batches(store: &dyn Store) {
    use crate::Log;
    // 2001: before every other check's rows, which must all survive.
    let t0: i64 = 1_000_000_000_000;
    let (a, b) = ("t-purge-a", "t-purge-b");
    // Earlier checks' rows older than t0 (some use small made-up times)
    // go first, so that the counts below are this check's rows alone.
    for log in [Log::Usage, Log::Events, Log::Audit] {
        while store.purge_log(log, t0, 1000).await.expect("purge") > 0 {}
    }
    // Usage rows at t0, t0+1 s, … t0+6 s, alternating tenants a, b.
    let usage: Vec<UsageRecord> = (0..7i64)
        .map(|i| {
            let mut r = sample_usage(if i % 2 == 0 { a } else { b }, 900 + i as u32);
            r.created_at_ms = t0 + i * 1000;
            r.id = uuid_v7_at(r.created_at_ms, i);
            r
        })
        .collect();
    store.insert_usage(&usage).await.expect("insert usage");
    let counts = || async {
        (
            store.count_usage(a).await.expect("count"),
            store.count_usage(b).await.expect("count"),
        )
    };
    assert_eq!(counts().await, (4, 3));
    // Before t0+4.5 s: rows 0–4 go, two per call, oldest first.
    let cut = t0 + 4500;
    let mut steps = Vec::new();
    let mut after = Vec::new();
    loop {
        let n = store.purge_log(Log::Usage, cut, 2).await.expect("purge");
        steps.push(n);
        after.push(counts().await);
        if n < 2 {
            break;
        }
    }
    assert_eq!(steps, vec![2, 2, 1], "{}", store.backend());
    assert_eq!(after, vec![(3, 2), (2, 1), (1, 1)], "{}", store.backend());
    let left: Vec<i64> = store
        .list_usage(a, 10)
        .await
        .expect("list")
        .iter()
        .chain(store.list_usage(b, 10).await.expect("list").iter())
        .map(|r| r.created_at_ms - t0)
        .collect();
    assert_eq!(left, vec![6000, 5000]);
    assert_eq!(store.purge_log(Log::Usage, cut, 2).await.expect("purge"), 0);

    // Traces: one bus_events row each, at t0, t0+1 s, … t0+4 s.
    let traces: Vec<String> = (0..5).map(|i| format!("{:032x}", 0xdead00 + i)).collect();
    let events: Vec<BusEvent> = traces
        .iter()
        .enumerate()
        .map(|(i, trace)| BusEvent {
            id: new_id(),
            tenant_id: if i % 2 == 0 { a } else { b }.into(),
            trace_id: trace.clone(),
            seq: 0,
            kind: "request.received".into(),
            session_id: None,
            user_id: None,
            payload: serde_json::json!({"i": i}),
            created_at_ms: t0 + i as i64 * 1000,
        })
        .collect();
    store
        .insert_events(&EventsRow::pack(&events))
        .await
        .expect("insert events");
    let cut = t0 + 2500;
    assert_eq!(
        store.purge_log(Log::Events, cut, 2).await.expect("purge"),
        2
    );
    assert_eq!(
        store.purge_log(Log::Events, cut, 2).await.expect("purge"),
        1
    );
    assert_eq!(
        store.purge_log(Log::Events, cut, 2).await.expect("purge"),
        0
    );
    for (i, trace) in traces.iter().enumerate() {
        let tenant = if i % 2 == 0 { a } else { b };
        let n = store
            .list_trace_events(tenant, trace)
            .await
            .expect("list")
            .len();
        assert_eq!(n, usize::from(i >= 3), "trace {i}, {}", store.backend());
    }

    // Audit: four events of tenant a at t0 … t0+3 s.
    let audit: Vec<AuditRecord> = (0..4i64)
        .map(|i| AuditRecord {
            id: new_id(),
            tenant_id: a.into(),
            actor: "key:admin".into(),
            action: "key.created".into(),
            target: None,
            detail: serde_json::json!({}),
            trace_id: None,
            created_at_ms: t0 + i * 1000,
        })
        .collect();
    store.insert_audit(&audit).await.expect("insert audit");
    let cut = t0 + 1500;
    assert_eq!(store.purge_log(Log::Audit, cut, 5).await.expect("purge"), 2);
    assert_eq!(store.purge_log(Log::Audit, cut, 5).await.expect("purge"), 0);
    let q = AuditQuery {
        limit: 10,
        ..Default::default()
    };
    let left: Vec<i64> = store
        .list_audit(a, &q)
        .await
        .expect("list")
        .iter()
        .map(|e| e.created_at_ms - t0)
        .collect();
    assert_eq!(left, vec![3000, 2000], "{}", store.backend());
}
