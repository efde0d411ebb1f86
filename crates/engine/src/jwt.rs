//! Bearer JWT verification: turns a token into the [`Principal`] it proves,
//! or says precisely why not.
//!
//! The algorithm is bound to the key, never taken on the token's word: HS256
//! is checked only against the configured shared secret, RS256 and ES256 only
//! against JWKS keys of the matching type. That one rule is what rejects
//! `alg: none`, unknown algorithms and RS/HS confusion (an HS256 token whose
//! HMAC key is the RSA public key). `exp`, `nbf`, `iss` and `aud` are checked
//! here against an injectable clock rather than by `jsonwebtoken`, which is
//! used only for JWK parsing and the signature itself.
//!
//! The caller caches verified tokens (never past `exp`); this module caches
//! only the JWKS, see [`jwks`].

mod claims;
mod jwks;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use secrecy::ExposeSecret;
use serde::Deserialize;
use switchyard_core::config::ConfigError;
use switchyard_core::identity::Principal;
use switchyard_core::jwt::JwtConfig;

use self::claims::ClaimRules;
use self::jwks::JwksCache;

/// Longer tokens are refused before any decoding: real ones are a few KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The source of "now", in unix seconds: the system clock in production, a
/// hand-driven one in tests.
pub trait Clock: Send + Sync {
    fn now_unix(&self) -> i64;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
    }
}

/// A token that passed every check, and who it says the caller is.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// `kind` is [`CredentialKind::Jwt`](switchyard_core::identity::CredentialKind::Jwt)
    /// and `expires_at` the token's `exp`.
    pub principal: Principal,
    /// The whole payload, for callers that need more than the mapped claims.
    pub claims: serde_json::Value,
}

/// Why a token was refused. Messages carry neither the token nor any key;
/// claim values appear only once the signature has verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token is not meant for this audience")]
    WrongAudience,
    #[error("the token was not issued by the configured issuer")]
    WrongIssuer,
    #[error("the token names a key id that the JWKS does not hold")]
    UnknownKid,
    #[error("algorithm not allowed: {0}")]
    DisallowedAlgorithm(&'static str),
    #[error("the token's role `{0}` maps to no Switchyard role")]
    UnmappedRole(String),
    #[error("the token's claim `{0}` is missing or not a string")]
    MissingClaim(String),
    /// Something broke on our side or the identity provider's, not the
    /// caller's fault: no keys could be fetched.
    #[error("the signing keys are unavailable: {0}")]
    JwksUnavailable(String),
}

impl JwtError {
    /// Stable identifier for error bodies, logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) => "jwt_malformed",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::NotYetValid => "jwt_not_yet_valid",
            JwtError::WrongAudience => "jwt_wrong_audience",
            JwtError::WrongIssuer => "jwt_wrong_issuer",
            JwtError::UnknownKid => "jwt_unknown_kid",
            JwtError::DisallowedAlgorithm(_) => "jwt_disallowed_algorithm",
            JwtError::UnmappedRole(_) => "jwt_unmapped_role",
            JwtError::MissingClaim(_) => "jwt_missing_claim",
            JwtError::JwksUnavailable(_) => "jwks_unavailable",
        }
    }

    /// True when the failure is ours (answer 503), false when the token is
    /// at fault (answer 401).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, JwtError::JwksUnavailable(_))
    }
}

/// Why a verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("building the JWKS HTTP client: {0}")]
    HttpClient(String),
}

/// The algorithms accepted at all; each is bound to one kind of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Hs256,
    Rs256,
    Es256,
}

impl Alg {
    fn from_header(alg: &str) -> Result<Self, JwtError> {
        match alg {
            "HS256" => Ok(Alg::Hs256),
            "RS256" => Ok(Alg::Rs256),
            "ES256" => Ok(Alg::Es256),
            _ if alg.eq_ignore_ascii_case("none") => Err(JwtError::DisallowedAlgorithm(
                "unsigned tokens (`none`) are never accepted",
            )),
            _ => Err(JwtError::DisallowedAlgorithm(
                "only HS256, RS256 and ES256 are accepted",
            )),
        }
    }

    fn to_jsonwebtoken(self) -> Algorithm {
        match self {
            Alg::Hs256 => Algorithm::HS256,
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
        }
    }
}

/// The protected header, as far as we use it. Unknown members are ignored on
/// purpose (`typ`, `cty`, ...), and `jku`/`x5u`/`jwk` are never followed:
/// keys come only from the configuration.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Extensions that must be understood; we understand none.
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

/// Verifies tokens against the configured secret and JWKS. Build one per
/// process and share it (`Arc`): it holds the JWKS cache.
pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    jwks: Option<Arc<JwksCache>>,
    rules: ClaimRules,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("hs256", &self.hs256.as_ref().map(|_| "[redacted]"))
            .field("jwks", &self.jwks)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<Self, JwtSetupError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`JwtVerifier::new`], reading time from `clock` for `exp`, `nbf`
    /// and the JWKS cache.
    pub fn with_clock(config: &JwtConfig, clock: Arc<dyn Clock>) -> Result<Self, JwtSetupError> {
        config.validate("jwt")?;
        let hs256 = config
            .hs256_secret
            .as_ref()
            .map(|s| DecodingKey::from_secret(s.expose_secret().as_bytes()));
        let jwks = config
            .jwks_url
            .as_ref()
            .map(|url| JwksCache::new(url, config).map(Arc::new))
            .transpose()?;
        Ok(Self {
            hs256,
            jwks,
            rules: ClaimRules::from_config(config),
            clock,
        })
    }

    /// Checks `token` (without any `Bearer ` prefix) and maps its claims.
    #[tracing::instrument(level = "debug", skip_all, err(level = "debug"))]
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, JwtError> {
        let parts = Parts::split(token)?;
        let header = parts.header()?;
        if header.crit.is_some() {
            return Err(JwtError::Malformed(
                "the header names critical extensions (`crit`) we do not support",
            ));
        }
        let alg = Alg::from_header(&header.alg)?;
        let now = self.clock.now_unix();
        match alg {
            Alg::Hs256 => {
                let key = self.hs256.as_ref().ok_or(JwtError::DisallowedAlgorithm(
                    "HS256 tokens need hs256_secret, which is not configured",
                ))?;
                parts.check_signature(key, alg)?;
            }
            Alg::Rs256 | Alg::Es256 => {
                let jwks = self.jwks.as_ref().ok_or(JwtError::DisallowedAlgorithm(
                    "RS256 and ES256 tokens need jwks_url, which is not configured",
                ))?;
                let kid = header.kid.as_deref();
                let candidates = jwks.keys_for(kid, alg, now).await?;
                if !parts.verifies_with_any(&candidates.keys, alg) {
                    let newer = jwks
                        .keys_after_bad_signature(kid, alg, candidates.generation, now)
                        .await?;
                    if !newer.is_some_and(|keys| parts.verifies_with_any(&keys, alg)) {
                        return Err(JwtError::BadSignature);
                    }
                }
            }
        }
        let claims = parts.claims()?;
        let principal = self.rules.principal(&claims, now)?;
        Ok(VerifiedToken { principal, claims })
    }
}

/// The three base64url segments of a compact JWS.
struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`, what the signature covers.
    signing_input: &'a str,
}

impl<'a> Parts<'a> {
    fn split(token: &'a str) -> Result<Self, JwtError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::Malformed("longer than 16 KiB"));
        }
        let mut it = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (it.next(), it.next(), it.next(), it.next())
        else {
            return Err(JwtError::Malformed(
                "expected three dot-separated parts (encrypted tokens are not supported)",
            ));
        };
        if header.is_empty() || payload.is_empty() {
            return Err(JwtError::Malformed("empty header or payload"));
        }
        if signature.is_empty() {
            return Err(JwtError::DisallowedAlgorithm(
                "unsigned tokens are never accepted",
            ));
        }
        let signing_input = &token[..header.len() + 1 + payload.len()];
        Ok(Self {
            header,
            payload,
            signature,
            signing_input,
        })
    }

    fn header(&self) -> Result<Header, JwtError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(self.header)
            .map_err(|_| JwtError::Malformed("the header is not base64url"))?;
        serde_json::from_slice(&bytes)
            .map_err(|_| JwtError::Malformed("the header is not a JSON object with a string `alg`"))
    }

    fn check_signature(&self, key: &DecodingKey, alg: Alg) -> Result<(), JwtError> {
        match jsonwebtoken::crypto::verify(
            self.signature,
            self.signing_input.as_bytes(),
            key,
            alg.to_jsonwebtoken(),
        ) {
            Ok(true) => Ok(()),
            Ok(false) => Err(JwtError::BadSignature),
            Err(e) => {
                // A signature that is not base64url, or key material the
                // backend refuses; either way the token does not verify.
                tracing::debug!(error = %e, "signature check failed");
                Err(JwtError::BadSignature)
            }
        }
    }

    fn verifies_with_any(&self, keys: &[Arc<jwks::JwksKey>], alg: Alg) -> bool {
        keys.iter()
            .any(|key| self.check_signature(&key.key, alg).is_ok())
    }

    fn claims(&self) -> Result<serde_json::Value, JwtError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| JwtError::Malformed("the payload is not base64url"))?;
        let claims: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| JwtError::Malformed("the payload is not JSON"))?;
        if !claims.is_object() {
            return Err(JwtError::Malformed("the payload is not a JSON object"));
        }
        Ok(claims)
    }
}
