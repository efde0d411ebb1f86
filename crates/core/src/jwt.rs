//! The `[jwt]` configuration: which bearer tokens Switchyard accepts and how
//! their claims become a [`Principal`](crate::identity::Principal).
//!
//! Two sources of keys, usable together: a shared HS256 secret (the way
//! Supabase projects sign their tokens) and a JWKS URL for RS256/ES256 (any
//! OIDC provider). The verifier itself lives in `engine::jwt`; this module
//! only describes and checks the settings, so `core` stays free of I/O.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::config::ConfigError;
use crate::identity::Role;

/// A weaker HMAC key can be brute-forced offline from one captured token.
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// A larger leeway would make `exp` meaningless for short-lived tokens.
pub const MAX_LEEWAY_SECS: u64 = 300;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// The shared secret of HS256 tokens (Supabase: Project Settings → API →
    /// JWT secret). Without it, HS256 tokens are refused.
    #[serde(serialize_with = "serialize_secret_masked")]
    pub hs256_secret: Option<SecretString>,
    /// Where the RS256/ES256 public keys are published. Without it, RS256 and
    /// ES256 tokens are refused.
    #[serde(serialize_with = "serialize_jwks_url_masked")]
    pub jwks_url: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required member of `aud`, when set (Supabase: `authenticated`).
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Claim holding the tenant id, e.g. `app_metadata.tenant_id`: a top-level
    /// claim of that exact name, else a dotted path into nested objects. When
    /// unset, every token belongs to `default_tenant`; when set, a token
    /// without it is refused.
    pub tenant_claim: Option<String>,
    pub default_tenant: String,
    /// Claim holding the user id (looked up like `tenant_claim`).
    pub user_claim: String,
    /// Claim holding the role (looked up like `tenant_claim`).
    pub role_claim: String,
    /// Token role → Switchyard role. A role missing here (Supabase's `anon`)
    /// is refused. Setting this table replaces the defaults entirely. No
    /// token role maps to `admin` unless this table says so: an identity
    /// provider's own `admin` (of some other application) must not become
    /// an administrator of the gateway, or, without `tenant_claim`, its
    /// operator.
    pub roles: BTreeMap<String, Role>,
    /// Least time between two JWKS fetches, in seconds, so that tokens naming
    /// unknown key ids cannot make us hammer the JWKS URL.
    pub jwks_refetch_min_secs: u64,
    /// How long fetched keys are used before fetching them again, in seconds.
    pub jwks_ttl_secs: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            leeway_secs: 30,
            tenant_claim: None,
            default_tenant: "default".into(),
            user_claim: "sub".into(),
            role_claim: "role".into(),
            roles: BTreeMap::from([
                ("service_role".to_owned(), Role::Service),
                ("authenticated".to_owned(), Role::User),
            ]),
            jwks_refetch_min_secs: 30,
            jwks_ttl_secs: 600,
        }
    }
}

impl JwtConfig {
    /// Whether any token can be accepted: a secret or a JWKS URL is set.
    pub fn enabled(&self) -> bool {
        self.hs256_secret.is_some() || self.jwks_url.is_some()
    }

    /// Checks what types alone cannot. `section` is where this table sits in
    /// the whole configuration (e.g. `jwt`), for the error's path.
    pub fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: format!("{section}.{key}"),
            message: message.to_owned(),
        };
        if let Some(secret) = &self.hs256_secret {
            if secret.expose_secret().len() < MIN_HS256_SECRET_BYTES {
                return Err(invalid(
                    "hs256_secret",
                    "expected at least 32 bytes (a shorter HMAC secret can be guessed offline)",
                ));
            }
        }
        if let Some(url) = &self.jwks_url {
            if !(url.starts_with("https://") || is_loopback_http(url)) {
                return Err(invalid(
                    "jwks_url",
                    "expected an https:// URL (plain http:// only to a loopback address)",
                ));
            }
        }
        for (key, value) in [("issuer", &self.issuer), ("audience", &self.audience)] {
            if value.as_deref() == Some("") {
                return Err(invalid(
                    key,
                    "expected a non-empty string, or no key at all",
                ));
            }
        }
        if self.jwks_url.is_some() && self.audience.is_none() {
            // An identity provider's keys sign the tokens of every
            // application it serves: without an audience, a token issued for
            // any of them would do.
            return Err(invalid(
                "audience",
                "expected the `aud` your tokens are issued for: with jwks_url, the provider's keys also sign tokens meant for its other applications",
            ));
        }
        if self.tenant_claim.as_deref() == Some("") {
            return Err(invalid("tenant_claim", "expected a claim name or path"));
        }
        for (key, value) in [
            ("default_tenant", &self.default_tenant),
            ("user_claim", &self.user_claim),
            ("role_claim", &self.role_claim),
        ] {
            if value.is_empty() {
                return Err(invalid(key, "expected a non-empty string"));
            }
        }
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(invalid("leeway_secs", "expected at most 300 seconds"));
        }
        if self.jwks_refetch_min_secs == 0 || self.jwks_ttl_secs == 0 {
            return Err(invalid(
                "jwks_refetch_min_secs",
                "expected jwks_refetch_min_secs and jwks_ttl_secs of at least 1",
            ));
        }
        if self.enabled() && self.roles.is_empty() {
            return Err(invalid("roles", "expected at least one role mapping"));
        }
        Ok(())
    }
}

/// `http://` is accepted only where no one can tamper with the keys in transit.
/// Whether `url` is plain `http://` to a loopback host (`localhost`, or a
/// loopback address), the one place a JWKS may be fetched without TLS. A
/// URL with user information (`http://localhost:80@192.0.2.1/`, whose host
/// is the address after `@`) is never one.
pub fn is_loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#', '\\']).next().unwrap_or_default();
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn serialize_secret_masked<S: Serializer>(
    v: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("[redacted]"),
        None => s.serialize_none(),
    }
}

/// `jwks_url` as `config check` prints it: a token in it is masked.
fn serialize_jwks_url_masked<S: serde::Serializer>(
    v: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(url) => crate::config::serialize_url_masked(url, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

    fn parse(text: &str) -> Result<JwtConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn an_empty_table_gives_the_documented_defaults() {
        let c = parse("").unwrap();
        assert!(!c.enabled());
        assert_eq!(c.leeway_secs, 30);
        assert_eq!(c.default_tenant, "default");
        assert_eq!(c.user_claim, "sub");
        assert_eq!(c.role_claim, "role");
        assert_eq!(c.tenant_claim, None);
        assert_eq!(c.jwks_refetch_min_secs, 30);
        assert_eq!(c.jwks_ttl_secs, 600);
        assert_eq!(c.roles.get("service_role"), Some(&Role::Service));
        assert_eq!(c.roles.get("authenticated"), Some(&Role::User));
        assert_eq!(c.roles.get("admin"), None, "admin only by explicit mapping");
        assert_eq!(c.roles.get("anon"), None);
        c.validate("jwt").unwrap();
    }

    #[test]
    fn a_supabase_table_enables_hs256() {
        let c = parse(&format!(
            r#"
            hs256_secret = "{SECRET}"
            issuer = "https://abc.supabase.co/auth/v1"
            audience = "authenticated"
            tenant_claim = "app_metadata.tenant_id"
            "#
        ))
        .unwrap();
        assert!(c.enabled());
        assert_eq!(c.hs256_secret.as_ref().unwrap().expose_secret(), SECRET);
        assert_eq!(c.audience.as_deref(), Some("authenticated"));
        assert_eq!(c.tenant_claim.as_deref(), Some("app_metadata.tenant_id"));
        c.validate("jwt").unwrap();
    }

    #[test]
    fn a_roles_table_replaces_the_default_mapping() {
        let c = parse(
            r#"
            jwks_url = "https://idp.example.com/.well-known/jwks.json"
            audience = "switchyard"
            [roles]
            gateway-admin = "admin"
            member = "user"
            "#,
        )
        .unwrap();
        assert_eq!(c.roles.len(), 2);
        assert_eq!(c.roles.get("gateway-admin"), Some(&Role::Admin));
        assert_eq!(c.roles.get("authenticated"), None);
        c.validate("jwt").unwrap();
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let err = parse("hs256_secrett = \"x\"").unwrap_err();
        assert!(err.contains("hs256_secrett"), "{err}");
    }

    #[test]
    fn an_unknown_role_name_is_refused() {
        let err = parse("[roles]\nauthenticated = \"superuser\"").unwrap_err();
        assert!(err.contains("superuser"), "{err}");
    }

    #[test]
    fn the_secret_never_prints() {
        let c = parse(&format!("hs256_secret = \"{SECRET}\"")).unwrap();
        assert!(!format!("{c:?}").contains(SECRET));
        let shown = toml::to_string(&c).unwrap();
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }

    #[test]
    fn a_short_secret_is_refused_naming_its_path() {
        let c = parse("hs256_secret = \"short\"").unwrap();
        let err = c.validate("auth.jwt").unwrap_err().to_string();
        assert!(err.starts_with("auth.jwt.hs256_secret:"), "{err}");
        assert!(!err.contains("short\""), "{err}");
    }

    #[test]
    fn a_plain_http_jwks_url_is_refused_unless_loopback() {
        for (url, ok) in [
            ("https://idp.example.com/jwks", true),
            ("http://127.0.0.1:9999/jwks", true),
            ("http://localhost/jwks", true),
            ("http://[::1]:80/jwks", true),
            ("http://idp.example.com/jwks", false),
            ("http://127.0.0.1.evil.example/jwks", false),
            ("ftp://idp.example.com/jwks", false),
            // User information: the host is what follows `@`.
            ("http://localhost:80@192.0.2.1/jwks.json", false),
            ("http://[::1]@192.0.2.1/jwks.json", false),
        ] {
            let c = JwtConfig {
                jwks_url: Some(url.into()),
                audience: Some("switchyard".into()),
                ..JwtConfig::default()
            };
            assert_eq!(c.validate("jwt").is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn a_jwks_needs_an_audience() {
        let c = JwtConfig {
            jwks_url: Some("https://idp.example.com/jwks".into()),
            issuer: Some("https://idp.example.com/".into()),
            ..JwtConfig::default()
        };
        let err = c.validate("jwt").unwrap_err().to_string();
        assert!(err.starts_with("jwt.audience: expected the `aud`"), "{err}");
        // A shared secret is the deployment's own: no audience needed.
        let c = JwtConfig {
            hs256_secret: Some(SECRET.into()),
            ..JwtConfig::default()
        };
        c.validate("jwt").unwrap();
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        for c in [
            JwtConfig {
                leeway_secs: 301,
                ..JwtConfig::default()
            },
            JwtConfig {
                jwks_refetch_min_secs: 0,
                ..JwtConfig::default()
            },
            JwtConfig {
                jwks_ttl_secs: 0,
                ..JwtConfig::default()
            },
            JwtConfig {
                audience: Some(String::new()),
                ..JwtConfig::default()
            },
            JwtConfig {
                hs256_secret: Some(SECRET.into()),
                roles: BTreeMap::new(),
                ..JwtConfig::default()
            },
        ] {
            assert!(c.validate("jwt").is_err(), "{c:?}");
        }
    }
}
