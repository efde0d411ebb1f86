//! The JWKS cache: RS256/ES256 public keys fetched from the configured URL
//! at first use, kept for `jwks_ttl_secs`, and fetched again early when a
//! token names a key id we do not hold (the identity provider rotated its
//! keys), or when no key we hold verifies its signature (a token without
//! `kid`, or a key replaced under the same id).
//!
//! Every fetch, whatever triggered it, is at most one per
//! `jwks_refetch_min_secs`, and concurrent callers wait for the fetch in
//! flight rather than start their own; so a flood of tokens with random key
//! ids costs the JWKS URL one request per interval. A failed fetch keeps the
//! keys we had. A token whose key the set holds never waits for a fetch:
//! once the set is past its lifetime, the key is used as it is and the set
//! is fetched again in the background (a slow or hung JWKS URL must not
//! hold up every sign-in).

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::DecodingKey;
use switchyard_core::config::mask_url_password;
use switchyard_core::jwt::JwtConfig;

use super::{Alg, JwtError, JwtSetupError};

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Real key sets are a few KiB; this bounds what a broken server can make us hold.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Shorter RSA moduli are factorable or close to it.
const MIN_RSA_BITS: usize = 2048;

pub(super) struct JwksCache {
    url: String,
    /// The URL as logged: with its secrets masked as `config check` shows
    /// them (an identity provider's JWKS URL may carry a token or a key).
    shown_url: String,
    client: reqwest::Client,
    ttl: i64,
    min_interval: i64,
    current: RwLock<Arc<KeySet>>,
    /// Set while a background fetch (of a set past its lifetime) runs.
    refreshing: std::sync::atomic::AtomicBool,
    /// Held for the whole of a fetch, so that callers who miss at the same
    /// time share it.
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    /// When the last fetch started (unix seconds), successful or not.
    last_attempt: Option<i64>,
    /// Why that fetch failed, if it did.
    last_error: Option<String>,
}

#[derive(Default)]
struct KeySet {
    /// Bumped by every successful fetch, so a caller that waited for the
    /// fetch lock can tell that someone else has just fetched.
    generation: u64,
    fetched_at: Option<i64>,
    keys: Vec<Arc<JwksKey>>,
}

/// More keys than this for one token (a token without `kid` and a set with
/// many keys for its algorithm) are not tried: each costs a signature check.
const MAX_CANDIDATES: usize = 8;

/// The keys a token may verify against, and the generation of the set they
/// came from (to tell whether a later fetch brought anything new).
pub(super) struct Candidates {
    pub(super) keys: Vec<Arc<JwksKey>>,
    pub(super) generation: u64,
}

/// One usable key, bound to the single algorithm it may verify.
pub(super) struct JwksKey {
    kid: Option<String>,
    alg: Alg,
    pub(super) key: DecodingKey,
}

impl std::fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksCache")
            .field("url", &self.shown_url)
            .field("keys", &self.snapshot().keys.len())
            .finish_non_exhaustive()
    }
}

impl JwksCache {
    pub(super) fn new(url: &str, config: &JwtConfig) -> Result<Self, JwtSetupError> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            // Followed only where the URL itself could point: https, or
            // plain http to a loopback host (never https → http).
            .redirect({
                let loopback = switchyard_core::jwt::is_loopback_http(url);
                reqwest::redirect::Policy::custom(move |attempt| {
                    let to = attempt.url().as_str();
                    // `previous` holds the URL asked first, then each redirect.
                    if attempt.previous().len() > 3 {
                        attempt.error("more than 3 redirects")
                    } else if to.starts_with("https://")
                        || (loopback && switchyard_core::jwt::is_loopback_http(to))
                    {
                        attempt.follow()
                    } else {
                        attempt.error("a redirect to a URL the JWKS could not be fetched from")
                    }
                })
            })
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| JwtSetupError::HttpClient(e.to_string()))?;
        Ok(Self {
            url: url.to_owned(),
            shown_url: mask_url_password(url),
            client,
            ttl: i64::try_from(config.jwks_ttl_secs).unwrap_or(i64::MAX),
            min_interval: i64::try_from(config.jwks_refetch_min_secs).unwrap_or(i64::MAX),
            current: RwLock::default(),
            refreshing: std::sync::atomic::AtomicBool::new(false),
            fetch: tokio::sync::Mutex::default(),
        })
    }

    /// The keys a token signed with `alg` and naming `kid` may verify
    /// against, fetching the key set if it is missing, stale, or lacks `kid`.
    pub(super) async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Alg,
        now: i64,
    ) -> Result<Candidates, JwtError> {
        let snapshot = self.snapshot();
        let fresh = snapshot
            .fetched_at
            .is_some_and(|at| now.saturating_sub(at) < self.ttl);
        let keys = snapshot.find(kid, alg)?;
        if !keys.is_empty() {
            if !fresh {
                self.refresh_in_background(snapshot.generation, now);
            }
            return Ok(Candidates {
                keys,
                generation: snapshot.generation,
            });
        }
        let (snapshot, failure) = self.refresh(snapshot.generation, now).await;
        let keys = snapshot.find(kid, alg)?;
        if !keys.is_empty() {
            return Ok(Candidates {
                keys,
                generation: snapshot.generation,
            });
        }
        match (failure, snapshot.fetched_at) {
            // The set could not be fetched just now: the key may be a new
            // one (a rotation during the outage), so not the token's fault.
            (Some(why), _) => Err(JwtError::JwksUnavailable(why)),
            (None, None) => Err(JwtError::JwksUnavailable(
                "no key set has been fetched yet".into(),
            )),
            (None, Some(_)) => Err(JwtError::UnknownKid),
        }
    }

    /// After no key of generation `seen` verified a token's signature: the
    /// keys of a newer set, fetched now if the minimum interval allows (the
    /// provider may have rotated the key of a token without `kid`, or
    /// replaced a key under the same id). `None` when no newer set came, so
    /// forged signatures cost the JWKS URL no more than unknown key ids do.
    pub(super) async fn keys_after_bad_signature(
        &self,
        kid: Option<&str>,
        alg: Alg,
        seen: u64,
        now: i64,
    ) -> Result<Option<Vec<Arc<JwksKey>>>, JwtError> {
        let (snapshot, _) = self.refresh(seen, now).await;
        if snapshot.generation == seen {
            return Ok(None);
        }
        snapshot.find(kid, alg).map(Some)
    }

    /// Fetches the set again without anyone waiting for it; one such fetch
    /// at a time (and, as every fetch, at most one per minimum interval).
    fn refresh_in_background(self: &Arc<Self>, seen: u64, now: i64) {
        use std::sync::atomic::Ordering;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Clears the flag however the fetch ends (a panic, a runtime
        /// shutting down), so that a later one can run.
        struct Done(Arc<JwksCache>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.refreshing.store(false, Ordering::Release);
            }
        }
        let done = Done(self.clone());
        rt.spawn(async move {
            done.0.refresh(seen, now).await;
            drop(done);
        });
    }

    fn snapshot(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fetches unless someone else fetched since the caller looked at
    /// generation `seen`, or a fetch started less than the minimum interval
    /// ago. Returns the key set to use and, when the latest fetch failed, why.
    async fn refresh(&self, seen: u64, now: i64) -> (Arc<KeySet>, Option<String>) {
        let mut state = self.fetch.lock().await;
        let current = self.snapshot();
        if current.generation != seen {
            return (current, None);
        }
        if state
            .last_attempt
            .is_some_and(|at| now.saturating_sub(at) < self.min_interval)
        {
            return (current, state.last_error.clone());
        }
        state.last_attempt = Some(now);
        match self.fetch_keys().await {
            Ok(keys) => {
                metrics::counter!("switchyard_jwks_fetches_total", "outcome" => "ok").increment(1);
                tracing::info!(url = %self.shown_url, keys = keys.len(), "fetched the JWKS");
                let next = Arc::new(KeySet {
                    generation: current.generation.wrapping_add(1),
                    fetched_at: Some(now),
                    keys,
                });
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = next.clone();
                state.last_error = None;
                (next, None)
            }
            Err(why) => {
                metrics::counter!("switchyard_jwks_fetches_total", "outcome" => "error")
                    .increment(1);
                tracing::warn!(url = %self.shown_url, reason = %why, "JWKS fetch failed; keeping the keys we had");
                state.last_error = Some(why.clone());
                (current, Some(why))
            }
        }
    }

    async fn fetch_keys(&self) -> Result<Vec<Arc<JwksKey>>, String> {
        let mut response = self
            .client
            .get(&self.url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(describe)?;
        if !response.status().is_success() {
            return Err(format!(
                "the JWKS URL answered {}",
                response.status().as_u16()
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(describe)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err("the JWKS is larger than 1 MiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        let keys = parse_key_set(&body)?;
        if keys.is_empty() {
            // Treated as a failure, so that a broken deployment of the
            // identity provider does not lock every user out at once.
            return Err("the JWKS holds no usable RS256 or ES256 key".into());
        }
        Ok(keys)
    }
}

impl KeySet {
    /// The keys named `kid` (or, for a token without `kid`, every key for
    /// `alg`, if there are at most [`MAX_CANDIDATES`]). A key that exists
    /// but is for another algorithm is an attack or a misconfiguration,
    /// never a fallback.
    fn find(&self, kid: Option<&str>, alg: Alg) -> Result<Vec<Arc<JwksKey>>, JwtError> {
        let Some(kid) = kid else {
            let candidates: Vec<_> = self.keys.iter().filter(|k| k.alg == alg).collect();
            return Ok(if candidates.len() <= MAX_CANDIDATES {
                candidates.into_iter().cloned().collect()
            } else {
                Vec::new()
            });
        };
        let named: Vec<_> = self
            .keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .collect();
        if named.is_empty() {
            return Ok(Vec::new());
        }
        let usable: Vec<_> = named
            .into_iter()
            .filter(|k| k.alg == alg)
            .take(MAX_CANDIDATES)
            .cloned()
            .collect();
        if usable.is_empty() {
            return Err(JwtError::DisallowedAlgorithm(
                "the key the token names is not a key for the token's algorithm",
            ));
        }
        Ok(usable)
    }
}

fn describe(e: reqwest::Error) -> String {
    // Without the URL, which the error's text would hold in clear; the
    // lines around this one name it masked.
    let e = e.without_url();
    tracing::debug!(error = %e, "JWKS request failed");
    if e.is_timeout() {
        "the JWKS request timed out".into()
    } else if e.is_connect() {
        "the JWKS URL could not be reached".into()
    } else {
        "the JWKS request failed".into()
    }
}

/// The usable keys of a JWKS document. Keys we cannot or must not use are
/// skipped one by one, so that one exotic key does not hide the others.
fn parse_key_set(body: &[u8]) -> Result<Vec<Arc<JwksKey>>, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(body)
        .map_err(|_| "the JWKS is not a JSON object with a `keys` array".to_owned())?;
    let mut keys = Vec::with_capacity(document.keys.len());
    for raw in document.keys {
        match usable_key(raw) {
            Ok(key) => keys.push(Arc::new(key)),
            Err(why) => tracing::debug!(reason = why, "skipping a JWKS key"),
        }
    }
    Ok(keys)
}

fn usable_key(raw: serde_json::Value) -> Result<JwksKey, &'static str> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|_| "not a JWK we can read")?;
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return Err("not a signing key (`use`)");
    }
    let (alg, expected) = match &jwk.algorithm {
        AlgorithmParameters::RSA(rsa) => {
            if modulus_bits(&rsa.n) < MIN_RSA_BITS {
                return Err("an RSA key shorter than 2048 bits");
            }
            (Alg::Rs256, KeyAlgorithm::RS256)
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            (Alg::Es256, KeyAlgorithm::ES256)
        }
        // Symmetric (`oct`) keys in particular: a published HMAC key would
        // let anyone sign.
        _ => return Err("neither an RSA nor a P-256 key"),
    };
    if jwk.common.key_algorithm.is_some_and(|a| a != expected) {
        return Err("a key for an algorithm we do not accept (`alg`)");
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "unusable key material")?;
    Ok(JwksKey {
        kid: jwk.common.key_id,
        alg,
        key,
    })
}

fn modulus_bits(n: &str) -> usize {
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(n) else {
        return 0;
    };
    let leading_zeros = bytes.iter().take_while(|b| **b == 0).count();
    let significant = &bytes[leading_zeros..];
    match significant.first() {
        Some(first) => significant.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn symmetric_encryption_and_unknown_keys_are_skipped_but_not_the_rest() {
        let body = json!({"keys": [
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AA"},
            {"kty": "future", "kid": "f"},
            "not even an object",
        ]});
        let keys = parse_key_set(body.to_string().as_bytes()).unwrap();
        assert!(keys.is_empty());
    }

    #[test]
    fn modulus_size_ignores_leading_zero_bytes() {
        let mut n = vec![0u8, 0x01];
        n.extend([0xff; 255]);
        assert_eq!(modulus_bits(&URL_SAFE_NO_PAD.encode(&n)), 2041);
        assert_eq!(modulus_bits(&URL_SAFE_NO_PAD.encode([0x80; 256])), 2048);
        assert_eq!(modulus_bits("!!"), 0);
    }
}
