use super::*;
use switchyard_core::config::StoreConfig;
use switchyard_store::SqliteStore;

pub(super) async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        url: format!("sqlite://{}/i.db", dir.path().display()),
        ..StoreConfig::default()
    };
    let store = SqliteStore::connect(&config).await.unwrap();
    store.migrate().await.unwrap();
    (dir, Arc::new(store))
}

fn new_key(name: &str, role: Role) -> NewKey {
    NewKey {
        name: name.into(),
        role: Some(role),
        ..NewKey::default()
    }
}

#[tokio::test]
async fn a_created_key_authenticates_and_a_revoked_one_stops_at_once() {
    let (_d, store) = store().await;
    let id = Identity::start(store, true, None, None).await.unwrap();
    let created = id
        .create_key(&Actor::cli(), new_key("svc", Role::Service))
        .await
        .unwrap();
    assert!(keys::looks_like_key(&created.key));

    let p = id.authenticate(&created.key).await.unwrap();
    assert_eq!(p.role, Role::Service);
    assert_eq!(p.tenant_id, "default");
    assert_eq!(p.key_id.as_deref(), Some(created.record.id.as_str()));
    id.authenticate(&created.key).await.unwrap();
    assert_eq!(
        id.cache_stats_unchecked().hits,
        1,
        "the second use is a cache hit"
    );

    id.revoke_key(&Actor::cli(), None, &created.record.id)
        .await
        .unwrap();
    assert!(matches!(
        id.authenticate(&created.key).await,
        Err(AuthError::InvalidKey)
    ));
    assert!(matches!(
        id.authenticate("sy_notakeyatall").await,
        Err(AuthError::InvalidKey)
    ));
}

#[tokio::test]
async fn open_development_mode_ends_with_the_first_key_and_stays_ended() {
    let (_d, store) = store().await;
    let id = Identity::start(store.clone(), true, None, None)
        .await
        .unwrap();
    assert!(id.open_dev());
    let k = id
        .create_key(&Actor::cli(), new_key("first", Role::Admin))
        .await
        .unwrap();
    assert!(!id.open_dev());
    id.revoke_key(&Actor::cli(), None, &k.record.id)
        .await
        .unwrap();
    assert!(
        !id.open_dev(),
        "revoking every key does not reopen a running server"
    );
    assert!(
        !Identity::start(store.clone(), true, None, None)
            .await
            .unwrap()
            .open_dev(),
        "a restart with every key revoked does not reopen it either"
    );
    assert!(
        !Identity::start(store, false, None, None)
            .await
            .unwrap()
            .open_dev(),
        "never on a public address"
    );
}

#[tokio::test]
async fn a_key_made_by_another_process_ends_open_development_mode() {
    let (_d, store) = store().await;
    let id = Identity::start(store.clone(), true, None, None)
        .await
        .unwrap();
    let watch = id
        .spawn_open_dev_watch(Duration::from_millis(10))
        .expect("open, so watched");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(id.open_dev(), "no key yet");
    // What `switchyard keys create` does from its own process: a row in
    // the shared store, which this Identity never saw created.
    let other = Identity::start(store.clone(), true, None, None)
        .await
        .unwrap();
    other
        .create_key(&Actor::cli(), new_key("cli", Role::Admin))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the watch ends once the mode has")
        .unwrap();
    assert!(!id.open_dev());
    assert!(id.spawn_open_dev_watch(Duration::from_millis(10)).is_none());
}

#[tokio::test]
async fn a_bootstrap_admin_key_is_stored_once_and_authenticates() {
    let (_d, store) = store().await;
    let secret = SecretString::from("x".repeat(40));
    let id = Identity::start(store.clone(), true, Some(&secret), None)
        .await
        .unwrap();
    assert!(!id.open_dev());
    let p = id.authenticate(&"x".repeat(40)).await.unwrap();
    assert_eq!((p.role, p.tenant_id.as_str()), (Role::Admin, "default"));
    Identity::start(store.clone(), true, Some(&secret), None)
        .await
        .unwrap();
    assert_eq!(store.list_api_keys("default").await.unwrap().len(), 1);
    // Rotated: the new value works, the old one no longer does.
    let rotated = SecretString::from("y".repeat(40));
    let id = Identity::start(store.clone(), true, Some(&rotated), None)
        .await
        .unwrap();
    assert_eq!(
        id.authenticate(&"y".repeat(40)).await.unwrap().role,
        Role::Admin
    );
    assert!(matches!(
        id.authenticate(&"x".repeat(40)).await,
        Err(AuthError::InvalidKey)
    ));
    // Starting again with the same value changes nothing.
    let id = Identity::start(store.clone(), true, Some(&rotated), None)
        .await
        .unwrap();
    assert!(id.authenticate(&"y".repeat(40)).await.is_ok());
    let keys = store.list_api_keys("default").await.unwrap();
    let active: Vec<bool> = keys.iter().map(|k| k.is_active(now_ms())).collect();
    assert_eq!((keys.len(), active.iter().filter(|a| **a).count()), (2, 1));
    let audit = store
        .list_audit(
            "default",
            &switchyard_core::identity::AuditQuery {
                action: Some("key.revoked".into()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].actor, "bootstrap");
    // Rolled back to the first value (or an instance still on it restarts):
    // it stays revoked, and it revokes nothing newer, so the second still
    // works: no way to lock every admin out.
    let id = Identity::start(store.clone(), true, Some(&secret), None)
        .await
        .unwrap();
    assert!(matches!(
        id.authenticate(&"x".repeat(40)).await,
        Err(AuthError::InvalidKey)
    ));
    assert_eq!(
        id.authenticate(&"y".repeat(40)).await.unwrap().role,
        Role::Admin
    );
    let short = SecretString::from("short".to_owned());
    assert!(matches!(
        Identity::start(store, true, Some(&short), None).await,
        Err(IdentityError::Invalid {
            field: "SWITCHYARD_ADMIN_KEY",
            ..
        })
    ));
}

#[tokio::test]
async fn only_admins_manage_keys_and_only_operators_cross_tenants() {
    let (_d, store) = store().await;
    let id = Identity::start(store, true, None, None).await.unwrap();
    let op = Actor::cli();
    for t in ["acme", "globex"] {
        id.create_tenant(
            &op,
            Tenant {
                id: t.into(),
                name: t.into(),
                monthly_budget_usd: None,
                limits: Default::default(),
                created_at_ms: 0,
            },
        )
        .await
        .unwrap();
    }
    let mut nk = new_key("acme admin", Role::Admin);
    nk.tenant_id = Some("acme".into());
    let acme_admin = id.create_key(&op, nk).await.unwrap();
    let acme = Actor::from_principal(&id.authenticate(&acme_admin.key).await.unwrap(), None);
    assert!(!acme.is_operator());

    let mut other = new_key("x", Role::User);
    other.tenant_id = Some("globex".into());
    assert!(matches!(
        id.create_key(&acme, other).await,
        Err(IdentityError::NotFound("tenant"))
    ));
    assert!(matches!(
        id.list_keys(&acme, Some("globex")).await,
        Err(IdentityError::NotFound("tenant"))
    ));
    let mine = id
        .create_key(&acme, new_key("acme user", Role::User))
        .await
        .unwrap();
    assert_eq!(mine.record.tenant_id, "acme");
    assert_eq!(id.list_keys(&acme, None).await.unwrap().len(), 2);

    let mut gk = new_key("globex key", Role::User);
    gk.tenant_id = Some("globex".into());
    let globex_key = id.create_key(&op, gk).await.unwrap();
    assert!(matches!(
        id.revoke_key(&acme, None, &globex_key.record.id).await,
        Err(IdentityError::NotFound("key"))
    ));
    assert!(id.authenticate(&globex_key.key).await.is_ok(), "untouched");

    let user = Actor::from_principal(&id.authenticate(&mine.key).await.unwrap(), None);
    assert!(matches!(
        id.create_key(&user, new_key("nope", Role::Admin)).await,
        Err(IdentityError::Forbidden(_))
    ));
    assert!(matches!(
        id.create_tenant(
            &acme,
            Tenant {
                id: "t3".into(),
                name: "t3".into(),
                monthly_budget_usd: None,
                limits: Default::default(),
                created_at_ms: 0
            }
        )
        .await,
        Err(IdentityError::Forbidden(_))
    ));
    let audit = id
        .list_audit(
            &acme,
            None,
            &AuditQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let seen: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| (a.action.as_str(), a.actor.as_str()))
        .collect();
    let acme_actor = format!("key:{}", acme_admin.record.id);
    assert_eq!(
        seen,
        vec![
            ("key.created", acme_actor.as_str()),
            ("key.created", "cli"),
            ("tenant.created", "cli")
        ],
        "acme's own events, newest first, none of globex's"
    );
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let (_d, store) = store().await;
    let id = Identity::start(store.clone(), true, None, None)
        .await
        .unwrap();
    let k = id
        .create_key(&Actor::cli(), new_key("k", Role::User))
        .await
        .unwrap();
    let mut past = k.record.clone();
    past.id = new_id();
    past.key_hash = keys::hash_hex("sy_expired");
    past.expires_at_ms = Some(now_ms() - 1);
    store.insert_api_key(&past).await.unwrap();
    assert!(matches!(
        id.authenticate("sy_expired").await,
        Err(AuthError::InvalidKey)
    ));
    let mut nk = new_key("k", Role::User);
    nk.expires_at_ms = Some(now_ms() - 1000);
    assert!(matches!(
        id.create_key(&Actor::cli(), nk).await,
        Err(IdentityError::Invalid {
            field: "expires_at",
            ..
        })
    ));
}

/// The per-request cost of a cache-hit authentication plus two in-memory
/// rate-limit checks (global and the route's class), as the middleware does
/// them. Run by `bench/auth.sh` in release mode; prints, asserts nothing
/// about time.
#[tokio::test]
#[ignore = "a measurement; run with bench/auth.sh"]
async fn auth_hit_and_memory_limit_cost_is_reported() {
    use crate::limits::MemoryLimiter;
    use std::str::FromStr;
    use switchyard_core::limits::Rate;
    let (_d, store) = store().await;
    let id = Identity::start(store, false, None, None).await.unwrap();
    let created = id
        .create_key(&Actor::cli(), new_key("bench", Role::Service))
        .await
        .unwrap();
    let limiter = MemoryLimiter::new();
    let rate = Rate::from_str("10000000/min").unwrap();
    id.authenticate(&created.key).await.unwrap();
    let n = 100_000u32;
    let mut samples = Vec::new();
    for _round in 0..5 {
        let start = std::time::Instant::now();
        for _ in 0..n {
            let p = id.authenticate(&created.key).await.unwrap();
            let subject = p.subject();
            for class in ["global", "chat"] {
                let d = limiter
                    .check_now(&format!("{subject}:{class}"), rate, 1)
                    .unwrap();
                assert!(d.allowed);
            }
        }
        samples.push(start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
    }
    samples.sort_by(f64::total_cmp);
    println!(
        "AUTH_LIMIT_COST_US median={:.3} min={:.3} max={:.3} (cache hit + 2 in-memory checks, {n} iterations x 5)",
        samples[2], samples[0], samples[4]
    );
}
