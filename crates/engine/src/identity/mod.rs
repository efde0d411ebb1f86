//! Identity: who is calling, and the management of the keys that say so.
//!
//! [`Identity::authenticate`] turns a presented credential into a
//! [`Principal`] (through the [`cache::CredentialCache`] first). Key and
//! tenant management check the [`Actor`]'s role and tenant here, so the HTTP
//! API and the CLI obey the same rules, and record every change in the audit
//! log.
//!
//! Tenancy rule: an actor works in its own tenant. Only an *operator* (an
//! admin of tenant `default`, or the CLI on the server's own machine) may
//! name another tenant; for anyone else another tenant does not exist (404).

pub mod broadcast;
pub mod cache;
pub mod keys;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use switchyard_core::identity::{
    ApiKeyRecord, AuditQuery, AuditRecord, CredentialKind, KeyLimits, Principal, Role, Tenant,
};
use switchyard_core::usage::new_id;
use switchyard_store::{Store, StoreError};

pub use cache::CacheStats;
use cache::CredentialCache;

pub const DEFAULT_TENANT: &str = "default";
/// A bootstrap key shorter than this is refused: it would be guessable.
const MIN_BOOTSTRAP_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential was presented")]
    Missing,
    /// Unknown, revoked or expired: the caller is not told which.
    #[error("the API key is not valid")]
    InvalidKey,
    #[error(transparent)]
    Jwt(#[from] crate::jwt::JwtError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_credentials",
            AuthError::InvalidKey => "invalid_api_key",
            AuthError::Jwt(e) => e.code(),
            AuthError::Store(_) => "internal_error",
        }
    }

    /// Our failure (the store or the JWKS is unreachable), not the caller's.
    pub fn is_unavailable(&self) -> bool {
        match self {
            AuthError::Store(_) => true,
            AuthError::Jwt(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who performs a management operation.
#[derive(Debug, Clone)]
pub struct Actor {
    /// For the audit log: `key:<id>`, `user:<id>`, `open-dev` or `cli`.
    pub label: String,
    pub tenant_id: String,
    pub role: Role,
    pub trace_id: Option<String>,
}

impl Actor {
    /// The actor is the credential: its key, else its own user (a token's
    /// subject) — never a user the request names in `X-Switchyard-User`,
    /// which would let a caller write the audit log in someone else's name.
    pub fn from_principal(p: &Principal, trace_id: Option<String>) -> Self {
        let label = match (&p.key_id, &p.credential_user, p.kind) {
            (Some(k), _, _) => format!("key:{k}"),
            (None, Some(u), _) => format!("user:{u}"),
            (None, None, CredentialKind::OpenDev) => "open-dev".into(),
            (None, None, _) => "anonymous".into(),
        };
        Self {
            label,
            tenant_id: p.tenant_id.clone(),
            role: p.role,
            trace_id,
        }
    }

    /// The `switchyard keys` command, run by whoever runs the server.
    pub fn cli() -> Self {
        Self {
            label: "cli".into(),
            tenant_id: DEFAULT_TENANT.into(),
            role: Role::Admin,
            trace_id: None,
        }
    }

    pub fn is_operator(&self) -> bool {
        self.role == Role::Admin && self.tenant_id == DEFAULT_TENANT
    }

    fn require_admin(&self) -> Result<(), IdentityError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(IdentityError::Forbidden("this needs an admin key"))
        }
    }

    /// The tenant an operation applies to.
    fn tenant(&self, requested: Option<&str>) -> Result<String, IdentityError> {
        match requested {
            None => Ok(self.tenant_id.clone()),
            Some(t) if t == self.tenant_id || self.is_operator() => Ok(t.to_owned()),
            Some(_) => Err(IdentityError::NotFound("tenant")),
        }
    }
}

/// A key to create.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub role: Option<Role>,
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub limits: KeyLimits,
    pub require_signature: bool,
}

/// Changes to a key; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct KeyUpdate {
    pub name: Option<String>,
    pub role: Option<Role>,
    pub limits: Option<KeyLimits>,
}

/// A created key: the only time the key (and its signing secret) is seen.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub record: ApiKeyRecord,
    pub key: String,
    pub signing_secret: Option<String>,
}

/// What to drop from the credential cache.
#[derive(Debug, Clone)]
pub enum Invalidate {
    All,
    Key(String),
    Credential(SecretString),
}

#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    cache: CredentialCache,
    open_dev: AtomicBool,
    jwt: Option<crate::jwt::JwtVerifier>,
    broadcast: std::sync::OnceLock<broadcast::Broadcast>,
    /// Keys revoked by [`Identity::start`] (a changed `SWITCHYARD_ADMIN_KEY`)
    /// before a broadcast was attached: published when one is.
    revoked_at_start: std::sync::Mutex<Vec<String>>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Identity {
    /// Loads the identity state: makes sure tenant `default` exists, stores
    /// the bootstrap admin key if one is given, and decides whether open
    /// development mode applies (`open_dev_allowed` = loopback listener, no
    /// JWT verifier, and no key was ever created: revoking or outliving every
    /// key does not reopen the server).
    pub async fn start(
        store: Arc<dyn Store>,
        open_dev_allowed: bool,
        bootstrap_admin_key: Option<&SecretString>,
        jwt: Option<crate::jwt::JwtVerifier>,
    ) -> Result<Self, IdentityError> {
        let now = now_ms();
        store
            .create_tenant(&Tenant {
                id: DEFAULT_TENANT.into(),
                name: "Default".into(),
                monthly_budget_usd: None,
                limits: Default::default(),
                created_at_ms: now,
            })
            .await?;
        let mut revoked_at_start = Vec::new();
        if let Some(key) = bootstrap_admin_key {
            let key = key.expose_secret();
            if key.len() < MIN_BOOTSTRAP_LEN || key.chars().any(char::is_whitespace) {
                return Err(IdentityError::Invalid {
                    field: "SWITCHYARD_ADMIN_KEY",
                    message: format!(
                        "SWITCHYARD_ADMIN_KEY must be at least {MIN_BOOTSTRAP_LEN} characters without spaces (for example the output of `openssl rand -hex 32`)"
                    ),
                });
            }
            let hash = keys::hash_hex(key);
            let mut current = store.find_api_key_by_hash(&hash).await?;
            if current.as_ref().is_some_and(|k| !k.is_active(now)) {
                // Rolled back to a value a rotation revoked: it stays revoked
                // (so does nothing else), and the operator is told.
                tracing::warn!("SWITCHYARD_ADMIN_KEY names a key that was revoked (an earlier value, rotated away): it does not work; set a new value");
            }
            if current.is_none() {
                let record = ApiKeyRecord {
                    id: new_id(),
                    tenant_id: DEFAULT_TENANT.into(),
                    name: "bootstrap admin (SWITCHYARD_ADMIN_KEY)".into(),
                    role: Role::Admin,
                    user_id: None,
                    prefix: keys::shown_prefix(key),
                    key_hash: hash.clone(),
                    limits: KeyLimits::default(),
                    signing_secrets: Vec::new(),
                    require_signature: false,
                    expires_at_ms: None,
                    revoked_at_ms: None,
                    created_at_ms: now,
                    created_by: "bootstrap".into(),
                };
                match store.insert_api_key(&record).await {
                    Ok(()) => {
                        tracing::info!("stored the bootstrap admin key from SWITCHYARD_ADMIN_KEY");
                        current = Some(record);
                    }
                    // Another instance starting with the same value (a
                    // rolling deploy, a scale-up) stored it first: use its.
                    Err(e) => match store.find_api_key_by_hash(&hash).await? {
                        Some(theirs) => current = Some(theirs),
                        None => return Err(e.into()),
                    },
                }
            }
            // When this value's key was stored (ids are time-ordered too,
            // for two stored in one millisecond).
            let current_at = current
                .as_ref()
                .map(|k| (k.created_at_ms, k.id.clone()))
                .unwrap_or_default();
            // A changed SWITCHYARD_ADMIN_KEY is a rotation: the keys earlier
            // values stored stop working, as an operator who rotates expects.
            // Only keys stored before this value's: an instance still on an
            // older value (a rolling deploy, a rollback) revokes nothing newer.
            let current_is_active = current.as_ref().is_none_or(|k| k.is_active(now));
            for old in store.list_api_keys(DEFAULT_TENANT).await? {
                if current_is_active
                    && old.created_by == "bootstrap"
                    && old.key_hash != hash
                    && (old.created_at_ms, &old.id) < (current_at.0, &current_at.1)
                    && old.is_active(now)
                {
                    // Another instance may have revoked it a moment ago:
                    // the revocation is audited once, by whoever made it.
                    if !store.revoke_api_key(DEFAULT_TENANT, &old.id, now).await? {
                        continue;
                    }
                    revoked_at_start.push(old.id.clone());
                    store
                        .insert_audit(&[AuditRecord {
                            id: new_id(),
                            tenant_id: DEFAULT_TENANT.into(),
                            actor: "bootstrap".into(),
                            action: "key.revoked".into(),
                            target: Some(format!("key:{}", old.id)),
                            detail: json!({"name": old.name, "prefix": old.prefix, "reason": "SWITCHYARD_ADMIN_KEY changed"}),
                            trace_id: None,
                            created_at_ms: now,
                        }])
                        .await?;
                    tracing::warn!(
                        key_id = %old.id,
                        "SWITCHYARD_ADMIN_KEY changed: revoked the bootstrap key stored from its earlier value"
                    );
                }
            }
        }
        let open_dev = open_dev_allowed && jwt.is_none() && store.count_api_keys().await? == 0;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                cache: CredentialCache::default(),
                open_dev: AtomicBool::new(open_dev),
                jwt,
                broadcast: std::sync::OnceLock::new(),
                revoked_at_start: std::sync::Mutex::new(revoked_at_start),
            }),
        })
    }

    /// Publishes revocations to the other instances (Redis), from now on,
    /// starting with those [`Identity::start`] made: a rotated
    /// `SWITCHYARD_ADMIN_KEY` stops working on the running instances too,
    /// not only on the one that starts with the new value.
    pub async fn set_broadcast(&self, b: broadcast::Broadcast) {
        let _ = self.inner.broadcast.set(b);
        let pending = std::mem::take(
            &mut *self
                .inner
                .revoked_at_start
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if let Some(b) = self.inner.broadcast.get() {
            for id in pending {
                b.publish(&id).await;
            }
        }
    }

    /// Whether requests without a credential are served as the admin of
    /// tenant `default`. Ends for good once a key exists.
    pub fn open_dev(&self) -> bool {
        self.inner.open_dev.load(Ordering::Acquire)
    }

    /// Ends open development mode when a key appears in the store that this
    /// process did not create (`switchyard keys create` is another process;
    /// so is another instance on the same database). Looks every `every`
    /// while the mode lasts; `None` when it is not on.
    pub fn spawn_open_dev_watch(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if !self.open_dev() {
            return None;
        }
        let id = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while id.open_dev() {
                tick.tick().await;
                match id.inner.store.count_api_keys().await {
                    Ok(0) => {}
                    Ok(_) => id.end_open_dev(),
                    Err(e) => tracing::warn!(error = %e, "looking for API keys failed"),
                }
            }
        }))
    }

    fn end_open_dev(&self) {
        if self.inner.open_dev.swap(false, Ordering::AcqRel) {
            tracing::warn!("an API key exists: open development mode has ended, every request now needs a credential");
        }
    }

    /// Whether `credential` was verified recently and is still in the
    /// cache: authenticating it again costs no lookup and proves nothing new.
    pub fn is_cached(&self, credential: &str) -> bool {
        self.inner.cache.contains(&keys::digest(credential))
    }

    /// Whether the credential was verified on this instance within the
    /// last day (a guess never was).
    pub fn is_known(&self, credential: &str) -> bool {
        self.inner.cache.known(&keys::digest(credential))
    }

    /// The principal a credential stands for.
    pub async fn authenticate(&self, credential: &str) -> Result<Principal, AuthError> {
        let digest = keys::digest(credential);
        if let Some(p) = self.inner.cache.get(&digest) {
            return Ok(p);
        }
        let now = now_ms();
        let generation = self.inner.cache.generation();
        // A JWT is three dot-separated parts; an API key has no dot.
        if credential.bytes().filter(|b| *b == b'.').count() == 2 {
            let Some(jwt) = &self.inner.jwt else {
                return Err(AuthError::InvalidKey);
            };
            let verified = jwt.verify(credential).await?;
            self.inner.cache.put_looked_up_at(
                digest,
                verified.principal.clone(),
                now,
                Some(generation),
            );
            return Ok(verified.principal);
        }
        let Some(record) = self
            .inner
            .store
            .find_api_key_by_hash(&hex::encode(digest))
            .await?
        else {
            return Err(AuthError::InvalidKey);
        };
        if !record.is_active(now) {
            return Err(AuthError::InvalidKey);
        }
        let principal = Principal {
            tenant_id: record.tenant_id,
            credential_user: record.user_id.clone(),
            user_id: record.user_id,
            role: record.role,
            kind: CredentialKind::ApiKey,
            key_id: Some(record.id),
            expires_at: record.expires_at_ms.map(|ms| ms.div_euclid(1000)),
            limits: record.limits,
            require_signature: record.require_signature,
        };
        self.inner
            .cache
            .put_looked_up_at(digest, principal.clone(), now, Some(generation));
        Ok(principal)
    }

    /// The signing secrets of a key, for verifying a signed request.
    pub async fn signing_secrets(
        &self,
        tenant_id: &str,
        key_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        Ok(self
            .inner
            .store
            .get_api_key(tenant_id, key_id)
            .await?
            .map(|k| k.signing_secrets)
            .unwrap_or_default())
    }

    pub async fn create_key(
        &self,
        actor: &Actor,
        new: NewKey,
    ) -> Result<CreatedKey, IdentityError> {
        actor.require_admin()?;
        let tenant_id = actor.tenant(new.tenant_id.as_deref())?;
        let name = valid_name(&new.name)?;
        let now = now_ms();
        // The end of year 9999: beyond it a time is not one a client meant
        // (and an i64 of seconds overflows in milliseconds).
        const LAST_EXPIRY_MS: i64 = 253_402_300_799_000;
        if new
            .expires_at_ms
            .is_some_and(|e| e <= now || e > LAST_EXPIRY_MS)
        {
            return Err(IdentityError::Invalid {
                field: "expires_at",
                message:
                    "expires_at must be in the future, and before the year 10000 (unix seconds)"
                        .into(),
            });
        }
        // The rule requests naming a user follow (`X-Switchyard-User`).
        if new
            .user_id
            .as_ref()
            .is_some_and(|u| !switchyard_core::identity::valid_user_id(u))
        {
            return Err(IdentityError::Invalid {
                field: "user_id",
                message: "user_id must be 1 to 256 bytes".into(),
            });
        }
        if self.inner.store.get_tenant(&tenant_id).await?.is_none() {
            return Err(IdentityError::NotFound("tenant"));
        }
        if let Some(user) = &new.user_id {
            self.inner.store.ensure_user(&tenant_id, user, now).await?;
        }
        let key = keys::generate();
        let signing_secret = new.require_signature.then(keys::generate_signing_secret);
        let record = ApiKeyRecord {
            id: new_id(),
            tenant_id,
            name: name.to_owned(),
            role: new.role.unwrap_or(Role::User),
            user_id: new.user_id,
            prefix: keys::shown_prefix(&key),
            key_hash: keys::hash_hex(&key),
            limits: new.limits,
            signing_secrets: signing_secret.iter().cloned().collect(),
            require_signature: new.require_signature,
            expires_at_ms: new.expires_at_ms,
            revoked_at_ms: None,
            created_at_ms: now,
            created_by: actor.label.clone(),
        };
        self.inner.store.insert_api_key(&record).await?;
        self.end_open_dev();
        self.audit(
            actor,
            &record.tenant_id,
            "key.created",
            Some(format!("key:{}", record.id)),
            json!({"name": record.name, "role": record.role, "user_id": record.user_id, "prefix": record.prefix,
                   "expires_at_ms": record.expires_at_ms, "require_signature": record.require_signature,
                   "limits": record.limits}),
        )
        .await;
        Ok(CreatedKey {
            record,
            key,
            signing_secret,
        })
    }

    pub async fn list_keys(
        &self,
        actor: &Actor,
        tenant: Option<&str>,
    ) -> Result<Vec<ApiKeyRecord>, IdentityError> {
        actor.require_admin()?;
        let tenant_id = actor.tenant(tenant)?;
        let keys = self.inner.store.list_api_keys(&tenant_id).await?;
        // A tenant named by mistake is said to be missing, as creating a
        // key in it would, rather than listed as one without keys (the
        // `default` tenant exists without a row).
        if keys.is_empty()
            && tenant_id != DEFAULT_TENANT
            && self.inner.store.get_tenant(&tenant_id).await?.is_none()
        {
            return Err(IdentityError::NotFound("tenant"));
        }
        Ok(keys)
    }

    /// Changes a key's name, role or limits. The change applies to the next
    /// request on this instance (and, with Redis, on every instance).
    pub async fn update_key(
        &self,
        actor: &Actor,
        tenant: Option<&str>,
        id: &str,
        update: KeyUpdate,
    ) -> Result<ApiKeyRecord, IdentityError> {
        actor.require_admin()?;
        let tenant_id = actor.tenant(tenant)?;
        let name = update.name.as_deref().map(valid_name).transpose()?;
        // Read, change, and write only if nothing changed in between (a
        // concurrent change makes the write miss: read again and reapply).
        let mut attempts = 0;
        let (before, record) = loop {
            attempts += 1;
            let before = self
                .inner
                .store
                .get_api_key(&tenant_id, id)
                .await?
                .ok_or(IdentityError::NotFound("key"))?;
            if before.revoked_at_ms.is_some() {
                return Err(IdentityError::Conflict(
                    "This key is revoked; a revoked key cannot be changed.".into(),
                ));
            }
            let mut record = before.clone();
            if let Some(name) = name {
                name.clone_into(&mut record.name);
            }
            if let Some(role) = update.role {
                record.role = role;
            }
            if let Some(limits) = &update.limits {
                record.limits = limits.clone();
            }
            if self.inner.store.update_api_key(&before, &record).await? {
                break (before, record);
            }
            if attempts == 5 {
                return Err(IdentityError::Conflict(
                    "The key kept changing while this change was applied; send it again.".into(),
                ));
            }
        };
        self.inner.cache.invalidate_key(id);
        if let Some(b) = self.inner.broadcast.get() {
            b.publish(id).await;
        }
        let target = Some(format!("key:{id}"));
        if before.role != record.role {
            self.audit(
                actor,
                &tenant_id,
                "key.role_changed",
                target.clone(),
                json!({"from": before.role, "to": record.role}),
            )
            .await;
        }
        if before.name != record.name || before.limits != record.limits {
            self.audit(
                actor,
                &tenant_id,
                "key.updated",
                target,
                json!({"name": record.name, "limits": record.limits}),
            )
            .await;
        }
        Ok(record)
    }

    /// Revokes a key; it stops working on this instance at once.
    pub async fn revoke_key(
        &self,
        actor: &Actor,
        tenant: Option<&str>,
        id: &str,
    ) -> Result<ApiKeyRecord, IdentityError> {
        actor.require_admin()?;
        let tenant_id = actor.tenant(tenant)?;
        let revoked = self
            .inner
            .store
            .revoke_api_key(&tenant_id, id, now_ms())
            .await?;
        let record = self
            .inner
            .store
            .get_api_key(&tenant_id, id)
            .await?
            .ok_or(IdentityError::NotFound("key"))?;
        self.inner.cache.invalidate_key(id);
        if let Some(b) = self.inner.broadcast.get() {
            b.publish(id).await;
        }
        if revoked {
            self.audit(
                actor,
                &tenant_id,
                "key.revoked",
                Some(format!("key:{id}")),
                json!({"name": record.name, "prefix": record.prefix}),
            )
            .await;
        }
        Ok(record)
    }

    /// The rate-limit subject prefix an actor may reset: a key of its tenant
    /// (any, for an operator), or a user of its tenant.
    pub async fn limit_subject(
        &self,
        actor: &Actor,
        key_id: Option<&str>,
        user_id: Option<&str>,
        tenant: Option<&str>,
    ) -> Result<(Vec<String>, String), IdentityError> {
        actor.require_admin()?;
        let tenant_id = actor.tenant(tenant)?;
        if tenant_id != DEFAULT_TENANT && self.inner.store.get_tenant(&tenant_id).await?.is_none() {
            return Err(IdentityError::NotFound("tenant"));
        }
        let prefixes = match (key_id, user_id) {
            (Some(k), None) => {
                if self.inner.store.get_api_key(&tenant_id, k).await?.is_none() {
                    return Err(IdentityError::NotFound("key"));
                }
                vec![format!("key:{k}:")]
            }
            (None, Some(u)) => {
                if !switchyard_core::identity::valid_user_id(u) {
                    return Err(IdentityError::Invalid {
                        field: "user_id",
                        message: "user_id must be 1 to 256 bytes".into(),
                    });
                }
                // The user's own counts (a token's) and those of the keys
                // made for the user, which count as keys.
                let mut prefixes = vec![format!(
                    "{}:",
                    switchyard_core::identity::user_subject(&tenant_id, u)
                )];
                let keys = self.inner.store.list_api_keys(&tenant_id).await?;
                prefixes.extend(
                    keys.iter()
                        .filter(|k| k.user_id.as_deref() == Some(u) && k.revoked_at_ms.is_none())
                        .map(|k| format!("key:{}:", k.id)),
                );
                prefixes
            }
            _ => {
                return Err(IdentityError::Invalid {
                    field: "key_id",
                    message: "give exactly one of `key_id` or `user_id`".into(),
                })
            }
        };
        Ok((prefixes, tenant_id))
    }

    /// The cache's figures. They cover every tenant's credentials on this
    /// instance, so only an operator reads them.
    pub fn cache_stats(&self, actor: &Actor) -> Result<CacheStats, IdentityError> {
        actor.require_admin()?;
        if !actor.is_operator() {
            return Err(IdentityError::Forbidden(
                "the credential cache's figures cover every tenant: only an operator (an admin of tenant `default`) reads them",
            ));
        }
        Ok(self.inner.cache.stats())
    }

    /// [`Self::cache_stats`] without the check, for tests.
    #[cfg(test)]
    pub(crate) fn cache_stats_unchecked(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// Drops credentials from the cache of this instance (returns how many)
    /// and, with Redis, of every other.
    pub async fn invalidate(
        &self,
        actor: &Actor,
        what: Invalidate,
    ) -> Result<usize, IdentityError> {
        actor.require_admin()?;
        let (n, target, message) = match &what {
            Invalidate::All if actor.is_operator() => (
                self.inner.cache.clear(),
                "all".to_owned(),
                broadcast::Message::All,
            ),
            Invalidate::All => {
                return Err(IdentityError::Forbidden(
                    "only an operator (an admin of tenant `default`) may drop the whole cache",
                ))
            }
            Invalidate::Key(id) => {
                // Only keys of the actor's tenant (any, for an operator).
                let tenant_id = actor.tenant(None)?;
                if !actor.is_operator()
                    && self
                        .inner
                        .store
                        .get_api_key(&tenant_id, id)
                        .await?
                        .is_none()
                {
                    return Err(IdentityError::NotFound("key"));
                }
                (
                    self.inner.cache.invalidate_key(id),
                    format!("key:{id}"),
                    broadcast::Message::Key(id.clone()),
                )
            }
            Invalidate::Credential(c) => {
                let digest = keys::digest(c.expose_secret());
                let tenant = (!actor.is_operator()).then_some(actor.tenant_id.as_str());
                (
                    usize::from(self.inner.cache.invalidate_digest_in(&digest, tenant)),
                    "credential".to_owned(),
                    broadcast::Message::Credential {
                        digest,
                        tenant: tenant.map(str::to_owned),
                    },
                )
            }
        };
        if let Some(b) = self.inner.broadcast.get() {
            b.send(&message).await;
        }
        self.audit(
            actor,
            &actor.tenant_id,
            "auth_cache.invalidated",
            Some(target),
            json!({"dropped": n}),
        )
        .await;
        Ok(n)
    }

    pub async fn create_tenant(
        &self,
        actor: &Actor,
        tenant: Tenant,
    ) -> Result<Tenant, IdentityError> {
        if !actor.is_operator() {
            return Err(IdentityError::Forbidden(
                "only an operator (an admin of tenant `default`) manages tenants",
            ));
        }
        validate_tenant_id(&tenant.id)?;
        let tenant = Tenant {
            name: valid_name(&tenant.name)?.to_owned(),
            ..tenant
        };
        if !self.inner.store.create_tenant(&tenant).await? {
            return Err(IdentityError::Conflict(format!(
                "a tenant with id `{}` exists",
                tenant.id
            )));
        }
        self.audit(
            actor,
            &tenant.id,
            "tenant.created",
            Some(format!("tenant:{}", tenant.id)),
            json!({"name": tenant.name, "monthly_budget_usd": tenant.monthly_budget_usd}),
        )
        .await;
        Ok(tenant)
    }

    /// Changes a tenant's name, budget or stored rate limits (an operator's
    /// work, as making one is). Instances read a tenant's settings again
    /// within a few seconds.
    pub async fn update_tenant(
        &self,
        actor: &Actor,
        id: &str,
        change: TenantUpdate,
    ) -> Result<Tenant, IdentityError> {
        if !actor.is_operator() {
            return Err(IdentityError::Forbidden(
                "only an operator (an admin of tenant `default`) manages tenants",
            ));
        }
        let name = change.name.as_deref().map(valid_name).transpose()?;
        // Read, change, and write only if nothing changed in between (read
        // again and reapply otherwise), as a key's change is.
        let mut attempts = 0;
        let (before, after) = loop {
            attempts += 1;
            // `default` exists without a row until it is given settings.
            let stored = self.inner.store.get_tenant(id).await?;
            let before = match stored.clone() {
                Some(t) => t,
                None if id == DEFAULT_TENANT => Tenant {
                    id: id.to_owned(),
                    name: id.to_owned(),
                    monthly_budget_usd: None,
                    limits: Default::default(),
                    created_at_ms: now_ms(),
                },
                None => return Err(IdentityError::NotFound("tenant")),
            };
            let mut after = before.clone();
            if let Some(name) = name {
                name.clone_into(&mut after.name);
            }
            if let Some(budget) = change.monthly_budget_usd {
                after.monthly_budget_usd = budget;
            }
            if let Some(limits) = &change.limits {
                after.limits.clone_from(limits);
            }
            let written = match stored {
                Some(_) => self.inner.store.update_tenant(&before, &after).await?,
                None => self.inner.store.create_tenant(&after).await?,
            };
            if written {
                break (before, after);
            }
            if attempts == 5 {
                return Err(IdentityError::Conflict(
                    "The tenant kept changing while this change was applied; send it again.".into(),
                ));
            }
        };
        self.audit(
            actor,
            id,
            "tenant.updated",
            Some(format!("tenant:{id}")),
            json!({
                "before": {"name": before.name, "monthly_budget_usd": before.monthly_budget_usd, "limits": before.limits},
                "after": {"name": after.name, "monthly_budget_usd": after.monthly_budget_usd, "limits": after.limits},
            }),
        )
        .await;
        Ok(after)
    }

    pub async fn list_tenants(&self, actor: &Actor) -> Result<Vec<Tenant>, IdentityError> {
        actor.require_admin()?;
        if actor.is_operator() {
            return Ok(self.inner.store.list_tenants().await?);
        }
        Ok(self
            .inner
            .store
            .get_tenant(&actor.tenant_id)
            .await?
            .into_iter()
            .collect())
    }

    pub async fn get_tenant(&self, tenant_id: &str) -> Result<Option<Tenant>, StoreError> {
        self.inner.store.get_tenant(tenant_id).await
    }

    /// Writes one audit event; a failure to write is logged, never fatal to
    /// the operation it records (which has already happened).
    pub async fn audit(
        &self,
        actor: &Actor,
        tenant_id: &str,
        action: &str,
        target: Option<String>,
        detail: serde_json::Value,
    ) {
        let record = AuditRecord {
            id: new_id(),
            tenant_id: tenant_id.to_owned(),
            actor: actor.label.clone(),
            action: action.to_owned(),
            target,
            detail,
            trace_id: actor.trace_id.clone(),
            created_at_ms: now_ms(),
        };
        tracing::info!(action, actor = %actor.label, tenant = tenant_id, audit_target = record.target.as_deref(), "audit");
        if let Err(e) = self.inner.store.insert_audit(&[record]).await {
            tracing::error!(error = %e, action, "could not write an audit event");
        }
    }

    pub async fn list_audit(
        &self,
        actor: &Actor,
        tenant: Option<&str>,
        query: &AuditQuery,
    ) -> Result<Vec<AuditRecord>, IdentityError> {
        actor.require_admin()?;
        let tenant_id = actor.tenant(tenant)?;
        Ok(self.inner.store.list_audit(&tenant_id, query).await?)
    }
}

/// A change to a tenant: only the fields given change (`Some(None)` clears
/// the budget).
#[derive(Debug, Default)]
pub struct TenantUpdate {
    pub name: Option<String>,
    pub monthly_budget_usd: Option<Option<f64>>,
    pub limits: Option<std::collections::BTreeMap<String, String>>,
}

/// A key's or tenant's name: 1 to 200 characters once trimmed.
pub fn valid_name(name: &str) -> Result<&str, IdentityError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(IdentityError::Invalid {
            field: "name",
            message: "name must be 1 to 200 characters".into(),
        });
    }
    Ok(name)
}

fn validate_tenant_id(id: &str) -> Result<(), IdentityError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Invalid {
            field: "id",
            message: "a tenant id is 1 to 64 letters, digits, `-` or `_`".into(),
        })
    }
}

#[cfg(test)]
mod tests;
