//! Request signing: `X-Timestamp: <unix seconds>` and
//! `X-Signature: v1=<hex HMAC-SHA256(secret, "{timestamp}.{METHOD}.{target}.{hex sha256(body)}")>`,
//! where `target` is the path with its query string, if any. Several `v1=`
//! values (comma- or space-separated) may be sent, so a secret can rotate;
//! one matching value is enough. Comparison is constant-time (`hmac`'s
//! `verify_slice`). A timestamp more than [`MAX_SKEW_SECS`] away from now is
//! refused, and a signature seen before within that window is a replay.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const MAX_SKEW_SECS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("this key requires signed requests: send X-Timestamp and X-Signature")]
    Missing,
    #[error("X-Timestamp must be unix seconds")]
    BadTimestamp,
    #[error("X-Timestamp is more than {MAX_SKEW_SECS} s away from the server's clock")]
    Stale,
    #[error("X-Signature must be one or more `v1=<hex>` values")]
    BadFormat,
    #[error("the signature does not match")]
    Mismatch,
    #[error("this signature was already used")]
    Replayed,
    #[error("the replay guard is unavailable")]
    Unavailable,
}

impl SignError {
    pub fn code(&self) -> &'static str {
        match self {
            SignError::Missing => "signature_required",
            SignError::BadTimestamp | SignError::BadFormat => "invalid_signature_header",
            SignError::Stale => "stale_timestamp",
            SignError::Mismatch => "invalid_signature",
            SignError::Replayed => "replayed_request",
            SignError::Unavailable => "signature_check_unavailable",
        }
    }
}

/// The string that is signed.
pub fn canonical(timestamp: &str, method: &str, target: &str, body: &[u8]) -> String {
    format!(
        "{timestamp}.{method}.{target}.{}",
        hex::encode(Sha256::digest(body))
    )
}

/// Hex HMAC-SHA256 of `message` (what a client computes).
pub fn sign(secret: &str, message: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new(); // HMAC accepts keys of any length
    };
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks the headers against the key's secrets; returns the matching
/// signature and its timestamp (for the replay guard).
pub fn verify(
    secrets: &[String],
    timestamp: Option<&str>,
    signature: Option<&str>,
    method: &str,
    target: &str,
    body: &[u8],
    now_secs: i64,
) -> Result<(Vec<u8>, i64), SignError> {
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err(SignError::Missing);
    };
    let ts_num: i64 = ts.trim().parse().map_err(|_| SignError::BadTimestamp)?;
    // abs_diff: `now - ts` overflows for timestamps near i64's ends (and
    // its `abs` of i64::MIN stays negative, which would pass).
    if now_secs.abs_diff(ts_num) > MAX_SKEW_SECS.unsigned_abs() {
        return Err(SignError::Stale);
    }
    let mut candidates = Vec::new();
    for part in sig.split([',', ' ']).filter(|p| !p.is_empty()) {
        let hexed = part.strip_prefix("v1=").ok_or(SignError::BadFormat)?;
        candidates.push(hex::decode(hexed).map_err(|_| SignError::BadFormat)?);
    }
    if candidates.is_empty() {
        return Err(SignError::BadFormat);
    }
    let message = canonical(ts.trim(), method, target, body);
    for secret in secrets {
        for c in &candidates {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
                continue;
            };
            mac.update(message.as_bytes());
            if mac.verify_slice(c).is_ok() {
                return Ok((c.clone(), ts_num));
            }
        }
    }
    Err(SignError::Mismatch)
}

/// Remembers signatures while their timestamp is acceptable, so each is
/// accepted once.
pub enum ReplayGuard {
    Memory(Mutex<Seen>),
    Redis(redis::aio::ConnectionManager),
}

/// The signatures seen, each with the time (unix seconds) until which it
/// is remembered.
#[derive(Default)]
pub struct Seen {
    until: HashMap<Vec<u8>, i64>,
    /// The size at which expired entries are next swept out: twice what
    /// was left after the last sweep, so sweeping costs O(1) a request
    /// however many signatures are live.
    sweep_at: usize,
}

/// Beyond the skew window, how long a signature is remembered, for the
/// clocks of instances sharing Redis that run behind the one that saw it.
const INSTANCE_SKEW_MARGIN_SECS: i64 = 60;

/// Until when (unix seconds) a signature with timestamp `ts` must be
/// remembered: past the last second its timestamp is accepted, `ts + 300`.
fn remember_until(ts: i64) -> i64 {
    ts.saturating_add(MAX_SKEW_SECS + 1 + INSTANCE_SKEW_MARGIN_SECS)
}

impl ReplayGuard {
    pub fn memory() -> Self {
        ReplayGuard::Memory(Mutex::default())
    }

    pub async fn redis(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        Ok(ReplayGuard::Redis(
            redis::aio::ConnectionManager::new(client).await?,
        ))
    }

    /// `Ok(true)` the first time a signature is seen while its timestamp
    /// `ts` is acceptable. It is remembered from its timestamp, not from
    /// when it was seen: a signature made 300 s ahead and used at once is
    /// acceptable for 600 s, and must not be forgotten before.
    pub async fn first_use(
        &self,
        signature: &[u8],
        ts: i64,
        now_secs: i64,
    ) -> Result<bool, SignError> {
        let until = remember_until(ts);
        match self {
            ReplayGuard::Memory(seen) => {
                let mut seen = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if seen.until.len() >= seen.sweep_at {
                    seen.until.retain(|_, until| *until > now_secs);
                    seen.sweep_at = (2 * seen.until.len()).max(1024);
                }
                match seen.until.get(signature) {
                    Some(u) if *u > now_secs => Ok(false),
                    _ => {
                        seen.until.insert(signature.to_vec(), until);
                        Ok(true)
                    }
                }
            }
            ReplayGuard::Redis(conn) => {
                let key = format!("sy:sig:{}", hex::encode(signature));
                // From this instance's clock, which judged `ts`.
                let ttl = until.saturating_sub(now_secs).max(1);
                // Names this call, so that a SET made again on a new
                // connection (the first may have run before its connection
                // dropped) can tell its own mark from another request's.
                let mark = rand::random::<u64>().to_string();
                let first = tokio::time::timeout(
                    Duration::from_secs(1),
                    crate::redis_retry::once_more_if_dropped(|| {
                        let mut conn = conn.clone();
                        let (key, mark) = (&key, &mark);
                        async move {
                            let set: Option<String> = redis::cmd("SET")
                                .arg(key)
                                .arg(mark)
                                .arg("NX")
                                .arg("EX")
                                .arg(ttl)
                                .query_async(&mut conn)
                                .await?;
                            if set.is_some() {
                                return Ok(true);
                            }
                            let held: Option<String> =
                                redis::cmd("GET").arg(key).query_async(&mut conn).await?;
                            Ok(held.as_deref() == Some(mark.as_str()))
                        }
                    }),
                )
                .await
                .map_err(|_| SignError::Unavailable)?
                .map_err(|_| SignError::Unavailable)?;
                Ok(first)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn signed(secret: &str, ts: i64, body: &[u8]) -> String {
        format!(
            "v1={}",
            sign(
                secret,
                &canonical(&ts.to_string(), "POST", "/v1/chat/completions", body)
            )
        )
    }

    fn check(secrets: &[&str], ts: i64, sig: &str, body: &[u8]) -> Result<Vec<u8>, SignError> {
        let secrets: Vec<String> = secrets.iter().map(|s| s.to_string()).collect();
        let checked = verify(
            &secrets,
            Some(&ts.to_string()),
            Some(sig),
            "POST",
            "/v1/chat/completions",
            body,
            NOW,
        );
        checked.map(|(sig, _)| sig)
    }

    #[test]
    fn a_correct_signature_passes_and_a_flipped_body_byte_fails() {
        let body = br#"{"model":"m"}"#;
        assert!(check(&["s1"], NOW, &signed("s1", NOW, body), body).is_ok());
        let mut flipped = body.to_vec();
        flipped[3] ^= 1;
        assert_eq!(
            check(&["s1"], NOW, &signed("s1", NOW, body), &flipped),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            check(&["s2"], NOW, &signed("s1", NOW, body), body),
            Err(SignError::Mismatch)
        );
    }

    #[test]
    fn a_skew_of_301_seconds_either_way_is_refused() {
        for ts in [NOW - 301, NOW + 301] {
            assert_eq!(
                check(&["s"], ts, &signed("s", ts, b""), b""),
                Err(SignError::Stale)
            );
        }
        for ts in [NOW - 300, NOW + 300] {
            assert!(check(&["s"], ts, &signed("s", ts, b""), b"").is_ok());
        }
        // Where `now - ts` overflows i64: refused, no panic.
        for ts in [i64::MIN, i64::MAX, NOW.wrapping_sub(i64::MIN)] {
            assert_eq!(
                check(&["s"], ts, &signed("s", ts, b""), b""),
                Err(SignError::Stale),
                "{ts}"
            );
        }
    }

    #[test]
    fn the_second_of_two_v1_values_is_accepted_for_rotation() {
        let sig = format!("v1={},{}", "00".repeat(32), signed("new", NOW, b"x"));
        assert!(check(&["new"], NOW, &sig, b"x").is_ok());
        let spaced = format!("v1={} {}", "ab".repeat(32), signed("new", NOW, b"x"));
        assert!(check(&["old", "new"], NOW, &spaced, b"x").is_ok());
    }

    #[test]
    fn malformed_headers_are_named() {
        let ok = signed("s", NOW, b"");
        let secrets = vec!["s".to_string()];
        assert_eq!(
            verify(&secrets, None, Some(&ok), "POST", "/", b"", NOW),
            Err(SignError::Missing)
        );
        assert_eq!(
            verify(&secrets, Some("soon"), Some(&ok), "POST", "/", b"", NOW),
            Err(SignError::BadTimestamp)
        );
        assert_eq!(
            check(&["s"], NOW, "sha256=abc", b""),
            Err(SignError::BadFormat)
        );
        assert_eq!(check(&["s"], NOW, "v1=zz", b""), Err(SignError::BadFormat));
    }

    #[tokio::test]
    async fn a_signature_is_accepted_once_within_the_window() {
        let guard = ReplayGuard::memory();
        assert_eq!(guard.first_use(b"sig", NOW, NOW).await, Ok(true));
        assert_eq!(guard.first_use(b"sig", NOW, NOW + 10).await, Ok(false));
        assert_eq!(
            guard.first_use(b"sig", NOW, NOW + 301 + 60).await,
            Ok(true),
            "forgotten once its timestamp is stale (and the margin has passed)"
        );
    }

    /// Signed 300 s ahead of the server's clock and used at once, a
    /// signature is acceptable until 600 s later: it is remembered as long.
    #[tokio::test]
    async fn a_signature_made_ahead_is_remembered_until_its_timestamp_is_stale() {
        let (secrets, ts) = (["s".to_owned()], NOW + MAX_SKEW_SECS);
        let header = format!(
            "v1={}",
            sign("s", &canonical(&ts.to_string(), "POST", "/", b""))
        );
        let verified = |now| {
            verify(
                &secrets,
                Some(&ts.to_string()),
                Some(&header),
                "POST",
                "/",
                b"",
                now,
            )
        };
        let guard = ReplayGuard::memory();
        let (first, at) = verified(NOW).unwrap();
        assert_eq!(at, ts);
        assert_eq!(guard.first_use(&first, at, NOW).await, Ok(true));
        let (again, at) = verified(NOW + 2 * MAX_SKEW_SECS).unwrap();
        assert_eq!(
            guard.first_use(&again, at, NOW + 2 * MAX_SKEW_SECS).await,
            Ok(false)
        );
        assert_eq!(verified(NOW + 2 * MAX_SKEW_SECS + 1), Err(SignError::Stale));
    }

    #[tokio::test]
    async fn the_memory_guard_sweeps_expired_signatures_as_it_grows() {
        let guard = ReplayGuard::memory();
        for n in 0..5000u32 {
            let at = NOW + i64::from(n);
            assert_eq!(guard.first_use(&n.to_be_bytes(), at, at).await, Ok(true));
        }
        let ReplayGuard::Memory(seen) = &guard else {
            unreachable!()
        };
        // Each is remembered 361 s: what is older was swept at some doubling.
        assert!(
            seen.lock().unwrap().until.len() < 2048,
            "{}",
            seen.lock().unwrap().until.len()
        );
    }

    /// After Redis restarts, the first signed request is judged on a new
    /// connection, not refused as unavailable; and a signature stored by a
    /// call is that call's first use even if it is asked again.
    #[tokio::test]
    async fn the_redis_replay_guard_answers_the_first_request_after_a_restart() {
        let Some(mut server) = crate::redis_retry::PrivateRedis::start().await else {
            return;
        };
        let guard = ReplayGuard::redis(&server.url).await.unwrap();
        assert_eq!(guard.first_use(b"before", NOW, NOW).await, Ok(true));

        server.restart().await;

        assert_eq!(guard.first_use(b"after", NOW, NOW).await, Ok(true));
        assert_eq!(guard.first_use(b"after", NOW, NOW).await, Ok(false));
        server.stop().await;
    }

    #[tokio::test]
    async fn the_redis_replay_guard_is_shared_between_connections() {
        let Ok(url) = std::env::var("SWITCHYARD_TEST_REDIS_URL") else {
            assert_ne!(
                std::env::var("SWITCHYARD_REQUIRE_REDIS").as_deref(),
                Ok("1")
            );
            return;
        };
        let a = ReplayGuard::redis(&url).await.unwrap();
        let b = ReplayGuard::redis(&url).await.unwrap();
        let sig = format!("test-{}-{}", std::process::id(), NOW).into_bytes();
        assert_eq!(a.first_use(&sig, NOW, NOW).await, Ok(true));
        assert_eq!(b.first_use(&sig, NOW, NOW).await, Ok(false));
    }
}
