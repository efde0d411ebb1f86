//! `Idempotency-Key`: the first request with a key runs and its response is
//! stored; a repeat with the same body replays it, with another body is
//! refused (422), and while the first still runs is refused (409). Records
//! are per tenant, durable in the store, and kept for a day by default.
//!
//! A claim is a [`Claimed`] guard: completing it stores the response;
//! dropping it uncompleted releases the key, so a request that failed in a
//! way worth retrying can be retried with the same key.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use switchyard_core::identity::Principal;
use switchyard_core::sessions::{IdempotencyClaim, IdempotencyKey, StoredResponse};
use switchyard_store::{Store, StoreError};
use tracing::Instrument;

use crate::identity::now_ms;

/// The longest key accepted (Stripe's limit).
pub const MAX_KEY_LEN: usize = 255;

#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn Store>,
    ttl: Duration,
    lease: Duration,
}

/// What a request with an idempotency key should do.
pub enum Claim {
    /// Run, then complete (or drop) the guard.
    Run(Claimed),
    /// Send this stored response again.
    Replay(StoredResponse),
    /// The first request with this key has not finished.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("The Idempotency-Key header must be 1 to {MAX_KEY_LEN} visible ASCII characters.")]
    InvalidKey,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Idempotency {
    pub fn new(store: Arc<dyn Store>, ttl: Duration, lease: Duration) -> Self {
        Self { store, ttl, lease }
    }

    /// Claims `key` for a request of `who` (hashing method, path and body).
    ///
    /// Keys are the caller's own: the same key sent by another user (or,
    /// without a user, another API key) of the tenant is another record, so
    /// no one can replay someone else's stored response, or learn that a key
    /// is in use, by guessing the key and the body.
    pub async fn claim(
        &self,
        who: &Principal,
        key: &str,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Claim, IdempotencyError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IdempotencyError::InvalidKey);
        }
        let scope = match (&who.user_id, &who.key_id) {
            (Some(user), _) => format!("user:{user}"),
            (None, Some(api_key)) => format!("key:{api_key}"),
            (None, None) => "tenant".to_owned(),
        };
        // Length-prefixed: user ids are any text, so no separator is safe.
        let stored_key = format!("{}:{scope}:{key}", scope.len());
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update(b" ");
        h.update(path.as_bytes());
        h.update(b"\n");
        h.update(body);
        let claim = IdempotencyKey {
            tenant_id: who.tenant_id.clone(),
            key: stored_key,
            request_hash: hex::encode(h.finalize()),
            user_id: who.user_id.clone(),
            now_ms: now_ms(),
            lease_ms: self.lease.as_millis() as i64,
            ttl_ms: self.ttl.as_millis() as i64,
            owner: switchyard_core::usage::new_id(),
        };
        Ok(match self.store.claim_idempotency(&claim).await? {
            IdempotencyClaim::Acquired => Claim::Run(Claimed {
                store: Some(self.store.clone()),
                tenant_id: claim.tenant_id,
                key: claim.key,
                owner: claim.owner,
                ttl: self.ttl,
            }),
            IdempotencyClaim::InFlight { same_request: true } => Claim::InFlight,
            IdempotencyClaim::Done {
                same_request: true,
                response,
            } => Claim::Replay(response),
            IdempotencyClaim::InFlight {
                same_request: false,
            }
            | IdempotencyClaim::Done {
                same_request: false,
                ..
            } => Claim::Mismatch,
        })
    }

    /// Deletes expired records now and then, for as long as the returned task runs.
    pub fn spawn_purge(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match store.purge_idempotency(now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(purged = n, "expired idempotency records deleted"),
                    Err(e) => tracing::warn!(error = %e, "purging idempotency records failed"),
                }
            }
        })
    }
}

/// A key this request holds until it completes or is dropped.
pub struct Claimed {
    store: Option<Arc<dyn Store>>,
    tenant_id: String,
    key: String,
    /// This request's claim id: a claim taken over after its lease ended
    /// is someone else's, and is neither completed nor released by this one.
    owner: String,
    ttl: Duration,
}

impl Claimed {
    /// Stores the response to replay for repeats of this request.
    pub async fn complete(mut self, response: &StoredResponse) {
        let Some(store) = self.store.take() else {
            return;
        };
        let expires = now_ms() + self.ttl.as_millis() as i64;
        if let Err(e) = store
            .complete_idempotency(&self.tenant_id, &self.key, &self.owner, response, expires)
            .await
        {
            // Without the record a repeat would run again: say so loudly.
            tracing::error!(error = %e, "could not store an idempotent response");
            release(store, &self.tenant_id, &self.key, &self.owner);
        }
    }

    /// Frees the key now, for a request that failed in a way worth
    /// retrying: a retry sent as soon as the failure was seen must run, not
    /// find the key still in flight (as it could after a drop, which frees
    /// the key in the background).
    pub async fn release(mut self) {
        if let Some(store) = self.store.take() {
            if let Err(e) = store
                .release_idempotency(&self.tenant_id, &self.key, &self.owner)
                .await
            {
                tracing::warn!(error = %e, "could not release an idempotency key; it frees itself when its lease ends");
            }
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            release(store, &self.tenant_id, &self.key, &self.owner);
        }
    }
}

fn release(store: Arc<dyn Store>, tenant_id: &str, key: &str, owner: &str) {
    let (tenant_id, key, owner) = (tenant_id.to_owned(), key.to_owned(), owner.to_owned());
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        // In the span of the request that held the key, for its trace id.
        rt.spawn(
            async move {
                if let Err(e) = store.release_idempotency(&tenant_id, &key, &owner).await {
                    tracing::warn!(error = %e, "could not release an idempotency key; it frees itself when its lease ends");
                }
            }
            .in_current_span(),
        );
    }
}
