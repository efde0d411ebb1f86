//! The credential cache: a verified key or token is remembered for 60 s
//! (never past the token's own expiry), so a request that repeats a
//! credential costs one hash and one map lookup instead of a database read
//! or a signature check. Keyed by the credential's SHA-256, so the cache
//! never holds a credential itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use switchyard_core::identity::Principal;
use tokio::time::Instant;

pub const TTL: Duration = Duration::from_secs(60);
/// Beyond this many entries, expired ones are swept; if all are live the
/// oldest half is dropped, so memory stays bounded under a credential flood.
const MAX_ENTRIES: usize = 100_000;
/// How long a credential counts as one that worked here (see
/// [`CredentialCache::known`]).
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

struct Entry {
    principal: Principal,
    until: Instant,
}

#[derive(Default)]
pub struct CredentialCache {
    map: Mutex<HashMap<[u8; 32], Entry>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Counts invalidations (changed under the map's lock), so that a
    /// credential looked up before one is not cached after it.
    generation: AtomicU64,
    /// Digests of credentials verified on this instance in the last
    /// [`KNOWN_FOR`], with when: what an address that has used up its
    /// failed authentications may still send to be checked. Bounded as the
    /// cache is; holds no principal.
    known: Mutex<HashMap<[u8; 32], Instant>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CacheStats {
    pub size: usize,
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
}

impl CredentialCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the credential was verified on this instance within the last
    /// day (it may have been revoked since: it is still checked).
    pub fn known(&self, digest: &[u8; 32]) -> bool {
        let now = Instant::now();
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .get(digest)
            .is_some_and(|at| now.duration_since(*at) < KNOWN_FOR)
    }

    fn note_known(&self, digest: [u8; 32], now: Instant) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= MAX_ENTRIES {
            known.retain(|_, at| now.duration_since(*at) < KNOWN_FOR);
            if known.len() >= MAX_ENTRIES {
                known.clear();
            }
        }
        known.insert(digest, now);
    }

    /// Whether a live entry exists; not counted as a hit or a miss.
    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        let now = Instant::now();
        self.lock().get(digest).is_some_and(|e| e.until > now)
    }

    pub fn get(&self, digest: &[u8; 32]) -> Option<Principal> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(digest) {
            Some(e) if e.until > now => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(e.principal.clone())
            }
            Some(_) => {
                map.remove(digest);
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Remembers a verified credential for [`TTL`], or until `expires_at`
    /// (unix seconds) if that comes first; `now_ms` is unix milliseconds, so
    /// that an entry ends at its expiry, not up to a second after it.
    pub fn put(&self, digest: [u8; 32], principal: Principal, now_ms: i64) {
        self.put_looked_up_at(digest, principal, now_ms, None);
    }

    /// The invalidation count now: read it before looking a credential up,
    /// and pass it to [`Self::put_looked_up_at`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// [`Self::put`], unless an invalidation happened since `generation`
    /// was read: a key revoked (or changed) while its lookup was on the way
    /// would otherwise be cached as it was, for another [`TTL`].
    pub fn put_looked_up_at(
        &self,
        digest: [u8; 32],
        principal: Principal,
        now_ms: i64,
        generation: Option<u64>,
    ) {
        let mut ttl = TTL;
        if let Some(exp) = principal.expires_at {
            let left = u64::try_from(exp.saturating_mul(1000).saturating_sub(now_ms)).unwrap_or(0);
            ttl = ttl.min(Duration::from_millis(left));
        }
        let now = Instant::now();
        self.note_known(digest, now);
        if ttl.is_zero() {
            return;
        }
        let mut map = self.lock();
        if generation.is_some_and(|g| g != self.generation.load(Ordering::Acquire)) {
            return;
        }
        if map.len() >= MAX_ENTRIES {
            map.retain(|_, e| e.until > now);
            if map.len() >= MAX_ENTRIES {
                let mut untils: Vec<Instant> = map.values().map(|e| e.until).collect();
                untils.sort_unstable();
                let cut = untils[untils.len() / 2];
                map.retain(|_, e| e.until > cut);
            }
        }
        map.insert(
            digest,
            Entry {
                principal,
                until: now + ttl,
            },
        );
    }

    /// Drops every entry of one API key; returns how many.
    pub fn invalidate_key(&self, key_id: &str) -> usize {
        let mut map = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let before = map.len();
        map.retain(|_, e| e.principal.key_id.as_deref() != Some(key_id));
        before - map.len()
    }

    /// Drops the entry of one credential; returns whether there was one.
    pub fn invalidate_digest(&self, digest: &[u8; 32]) -> bool {
        self.invalidate_digest_in(digest, None)
    }

    /// [`Self::invalidate_digest`], only if the credential is of `tenant`
    /// (when one is given): a tenant's admin can neither drop another
    /// tenant's credential nor learn whether it was cached.
    pub fn invalidate_digest_in(&self, digest: &[u8; 32], tenant: Option<&str>) -> bool {
        let mut map = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let theirs = map
            .get(digest)
            .is_some_and(|e| tenant.is_none_or(|t| e.principal.tenant_id == t));
        theirs && map.remove(digest).is_some()
    }

    pub fn clear(&self) -> usize {
        let mut map = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let n = map.len();
        map.clear();
        n
    }

    pub fn stats(&self) -> CacheStats {
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        let total = hits + misses;
        CacheStats {
            size: self.lock().len(),
            hits,
            misses,
            hit_rate: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(key: &str, expires_at: Option<i64>) -> Principal {
        let mut p = Principal::open_dev();
        p.key_id = Some(key.into());
        p.expires_at = expires_at;
        p
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_lives_sixty_seconds() {
        let cache = CredentialCache::default();
        cache.put([1; 32], principal("k1", None), 1_000_000);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(cache.get(&[1; 32]).is_some());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get(&[1; 32]).is_none());
        let s = cache.stats();
        assert_eq!((s.hits, s.misses, s.size), (1, 1, 0));
        assert!((s.hit_rate - 0.5).abs() < 1e-9);
    }

    /// What a blocked address may still send to be checked: a credential
    /// verified here within a day, long after its cache entry ended (the
    /// lockout let a working key through for a minute only).
    #[tokio::test(start_paused = true)]
    async fn a_verified_credential_stays_known_for_a_day() {
        let cache = CredentialCache::default();
        cache.put([5; 32], principal("k", None), 1_000_000);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!cache.contains(&[5; 32]));
        assert!(cache.known(&[5; 32]));
        assert!(!cache.known(&[6; 32]), "never verified");
        tokio::time::advance(Duration::from_secs(24 * 3600)).await;
        assert!(!cache.known(&[5; 32]));
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_never_outlives_the_token() {
        let cache = CredentialCache::default();
        // Looked up 0.9 s into second 1,000; the token expires at 1,010.
        cache.put([2; 32], principal("k", Some(1_010)), 1_000_900);
        tokio::time::advance(Duration::from_millis(9_050)).await;
        assert!(cache.get(&[2; 32]).is_some());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            cache.get(&[2; 32]).is_none(),
            "expired with the token, not at 60 s"
        );
        cache.put([3; 32], principal("k", Some(999)), 1_000_000);
        assert!(
            cache.get(&[3; 32]).is_none(),
            "an expired token is not cached"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_drops_one_key_one_credential_or_all() {
        let cache = CredentialCache::default();
        cache.put([1; 32], principal("a", None), 0);
        cache.put([2; 32], principal("a", None), 0);
        cache.put([3; 32], principal("b", None), 0);
        cache.put([4; 32], principal("c", None), 0);
        assert_eq!(cache.invalidate_key("a"), 2);
        assert!(cache.invalidate_digest(&[3; 32]));
        assert!(!cache.invalidate_digest(&[3; 32]));
        // Another tenant's credential: neither dropped nor told.
        let tenant = cache
            .lock()
            .get(&[4; 32])
            .unwrap()
            .principal
            .tenant_id
            .clone();
        assert!(!cache.invalidate_digest_in(&[4; 32], Some("another-tenant")));
        assert_eq!(cache.stats().size, 1);
        assert!(cache.invalidate_digest_in(&[4; 32], Some(&tenant)));
        cache.put([4; 32], principal("c", None), 0);
        assert_eq!(cache.clear(), 1);
        assert_eq!(cache.stats().size, 0);
    }

    #[test]
    fn a_lookup_overtaken_by_an_invalidation_is_not_cached() {
        let cache = CredentialCache::default();
        let before = cache.generation();
        // The key is revoked while its lookup is on the way.
        cache.invalidate_key("k");
        cache.put_looked_up_at([9; 32], principal("k", None), 0, Some(before));
        assert!(cache.get(&[9; 32]).is_none());
        // A lookup that started after it is cached.
        let after = cache.generation();
        cache.put_looked_up_at([9; 32], principal("k", None), 0, Some(after));
        assert!(cache.get(&[9; 32]).is_some());
    }
}
