//! API key material: generation, the recognisable format, and hashing.
//!
//! A key is `sy_` followed by 43 characters drawn uniformly from 62
//! (256 bits of entropy). Only its SHA-256 is stored: a key this random
//! cannot be guessed from its hash, so a slow password hash would only add
//! latency to every request that misses the credential cache.

use rand::Rng;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "sy_";
const KEY_BODY_LEN: usize = 43;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Characters of the key shown in listings (`sy_` and 8 more).
const SHOWN: usize = 11;

/// A fresh key.
pub fn generate() -> String {
    let mut rng = rand::rng();
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_BODY_LEN);
    key.push_str(KEY_PREFIX);
    for _ in 0..KEY_BODY_LEN {
        key.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    key
}

/// A fresh request-signing secret (`sys_` + 43 characters).
pub fn generate_signing_secret() -> String {
    format!("sys_{}", &generate()[KEY_PREFIX.len()..])
}

/// Whether `s` has the shape of one of our keys (it may still be unknown).
pub fn looks_like_key(s: &str) -> bool {
    s.len() == KEY_PREFIX.len() + KEY_BODY_LEN
        && s.starts_with(KEY_PREFIX)
        && s[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

/// The part of a key shown in listings and logs.
pub fn shown_prefix(key: &str) -> String {
    key.chars().take(SHOWN).collect()
}

/// SHA-256 of a credential.
pub fn digest(credential: &str) -> [u8; 32] {
    Sha256::digest(credential.as_bytes()).into()
}

/// Hex SHA-256, as stored in `api_keys.key_hash`.
pub fn hash_hex(credential: &str) -> String {
    hex::encode(digest(credential))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_recognisable_random_and_of_full_entropy() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(looks_like_key(&a), "{a}");
        assert_eq!(a.len(), 46);
        // 43 characters of 62: 43 * log2(62) ≈ 256 bits.
        assert!(43.0 * 62f64.log2() >= 256.0);
        assert_eq!(shown_prefix(&a), &a[..11]);
        assert!(!looks_like_key("sy_short"));
        assert!(!looks_like_key(&format!("sk_{}", &a[3..])));
        assert!(!looks_like_key(&format!("{}!", &a[..45])));
    }

    #[test]
    fn the_hash_is_hex_sha256() {
        assert_eq!(
            hash_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
