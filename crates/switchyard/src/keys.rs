//! `switchyard keys …`: key management from the machine that runs the
//! server, straight against the configured store, as an operator (it may
//! name any tenant; a missing tenant is created).

use anyhow::{bail, Context as _};
use switchyard_core::identity::{Role, Tenant};
use switchyard_core::Config;
use switchyard_engine::identity::{now_ms, Actor, Identity, NewKey};

use crate::cli::KeysCommand;

pub async fn run(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    let store = switchyard_store::connect(&config.store)
        .await
        .context("opening the store")?;
    store.migrate().await.context("migrating the store")?;
    // No bootstrap key: storing one (and revoking the keys of earlier
    // values) is the server's, at its start; a stale SWITCHYARD_ADMIN_KEY in
    // an operator's shell must not rotate the running server's key away.
    let identity = Identity::start(store.clone(), false, None, None)
        .await
        .context("loading identity")?;
    let actor = Actor::cli();
    let result = match command {
        KeysCommand::Create {
            name,
            role,
            tenant,
            user,
            expires_in_days,
            require_signature,
        } => {
            let Some(role) = Role::parse(&role) else {
                bail!("--role must be admin, service or user, not `{role}`");
            };
            // Checked before the tenant is made, so that a refused key
            // leaves nothing behind (a key must expire before the year
            // 10000: ~2.9 million days from now).
            if let Some(days) = expires_in_days {
                if !(1..=2_900_000).contains(&days) {
                    bail!("--expires-in-days must be 1 to 2900000, not {days}");
                }
            }
            switchyard_engine::identity::valid_name(&name)?;
            if user
                .as_deref()
                .is_some_and(|u| !switchyard_core::identity::valid_user_id(u))
            {
                bail!("--user must be 1 to 256 bytes");
            }
            if identity.get_tenant(&tenant).await?.is_none() {
                let made = identity
                    .create_tenant(
                        &actor,
                        Tenant {
                            id: tenant.clone(),
                            name: tenant.clone(),
                            monthly_budget_usd: None,
                            limits: Default::default(),
                            created_at_ms: now_ms(),
                        },
                    )
                    .await;
                match made {
                    Ok(_) => {}
                    // Another `keys create` (a provisioning script on another
                    // host) made it between the look and the insert: it is
                    // there, which is all this needed.
                    Err(switchyard_engine::identity::IdentityError::Conflict(_))
                        if identity.get_tenant(&tenant).await?.is_some() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let created = identity
                .create_key(
                    &actor,
                    NewKey {
                        name,
                        role: Some(role),
                        tenant_id: Some(tenant),
                        user_id: user,
                        expires_at_ms: expires_in_days
                            .map(|d| now_ms() + i64::from(d) * 86_400_000),
                        limits: Default::default(),
                        require_signature,
                    },
                )
                .await?;
            let r = &created.record;
            println!("{}", created.key);
            eprintln!(
                "created key {} ({}, role {}, tenant {}); the key above is shown only now",
                r.id,
                r.name,
                r.role.as_str(),
                r.tenant_id
            );
            if let Some(secret) = created.signing_secret {
                eprintln!("signing secret (shown only now): {secret}");
            }
            Ok(())
        }
        KeysCommand::List { tenant } => {
            if identity.get_tenant(&tenant).await?.is_none() {
                bail!(
                    "no tenant `{tenant}` (`--tenant` names the tenant; the default is `default`)"
                );
            }
            let now = now_ms();
            let keys = match identity.list_keys(&actor, Some(&tenant)).await {
                Err(switchyard_engine::identity::IdentityError::NotFound(_)) => {
                    bail!("no tenant `{tenant}` (`--tenant` names the tenant; the default is `default`)")
                }
                r => r?,
            };
            for k in keys {
                println!(
                    "{}\t{}…\t{}\t{}\t{}\t{}",
                    k.id,
                    k.prefix,
                    k.role.as_str(),
                    if k.is_active(now) {
                        "active"
                    } else if k.revoked_at_ms.is_some() {
                        "revoked"
                    } else {
                        "expired"
                    },
                    k.user_id.as_deref().unwrap_or("-"),
                    k.name
                );
            }
            Ok(())
        }
        KeysCommand::Revoke { id, tenant } => {
            // With Redis, running servers drop the key from their caches
            // now, as when an instance revokes it (else within 60 s).
            if let Some(url) = &config.rate_limits.redis_url {
                let connect = switchyard_engine::identity::broadcast::Broadcast::connect(url);
                match tokio::time::timeout(std::time::Duration::from_secs(3), connect).await {
                    Ok(Ok(b)) => identity.set_broadcast(b).await,
                    Ok(Err(e)) => eprintln!(
                        "warning: could not reach Redis ({e}); running servers drop the key within 60 s"
                    ),
                    Err(_) => eprintln!(
                        "warning: Redis did not answer; running servers drop the key within 60 s"
                    ),
                }
            }
            let asked = now_ms();
            let k = match identity.revoke_key(&actor, Some(&tenant), &id).await {
                Err(switchyard_engine::identity::IdentityError::NotFound(_)) => {
                    bail!("no key `{id}` in tenant `{tenant}` (`--tenant` names another tenant)")
                }
                r => r?,
            };
            match k.revoked_at_ms {
                Some(at) if at < asked => {
                    println!(
                        "{} ({}) was already revoked at {}",
                        k.id,
                        k.name,
                        switchyard_core::sessions::rfc3339(at)
                    )
                }
                _ => println!("revoked {} ({})", k.id, k.name),
            }
            Ok(())
        }
    };
    store.close().await;
    result
}
