//! Who is calling: the [`Principal`] every authenticated request carries,
//! whatever the credential was (API key, JWT, or open development mode).

use serde::{Deserialize, Serialize};

/// What a caller may do. `admin` manages keys, tenants and the admin routes;
/// `service` acts for any user of its tenant; `user` sees only its own
/// resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Service,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    ApiKey,
    Jwt,
    /// No credential: open development mode on a loopback address.
    OpenDev,
}

/// Limits carried by one key, overriding the tenant's and the defaults.
/// Rates are written like the config defaults, e.g. `"20/min"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Route class (`chat`, `bots`, `orchestrate`, `global`, ...) → rate.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rates: std::collections::BTreeMap<String, String>,
    /// Tokens per minute, counted from usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Monthly spend limit in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_budget_usd: Option<f64>,
}

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub tenant_id: String,
    /// The user the request acts for: the key's or token's own user, or the
    /// one a service key names in `X-Switchyard-User`.
    pub user_id: Option<String>,
    /// The credential's own user (a key's user, a token's user claim), which
    /// naming another user in `X-Switchyard-User` does not change: the rate
    /// limits count the credential, so that a service cannot escape them by
    /// naming a different user on each request.
    pub credential_user: Option<String>,
    pub role: Role,
    pub kind: CredentialKind,
    /// The API key's id (never the key itself), when a key was used.
    pub key_id: Option<String>,
    /// Unix seconds after which the credential is no longer valid.
    pub expires_at: Option<i64>,
    pub limits: KeyLimits,
    /// The key requires signed requests (`X-Timestamp` + `X-Signature`).
    pub require_signature: bool,
}

/// Whether `id` may name a user: 1 to 256 bytes. One rule for a key's
/// user, a request naming one (`X-Switchyard-User`) and a session's.
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_USER_ID_BYTES
}

/// The longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;

/// The rate-limit subject of a user: `user:{tenant}:{user}`, each part with
/// `:` (and `%`) percent-encoded, so that no user's subject is a prefix of
/// another's (`a` and `a:b`), which a reset by prefix relies on.
pub fn user_subject(tenant_id: &str, user_id: &str) -> String {
    format!("user:{}:{}", subject_part(tenant_id), subject_part(user_id))
}

fn subject_part(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([':', '%']) {
        s.replace('%', "%25").replace(':', "%3A").into()
    } else {
        s.into()
    }
}

impl Principal {
    /// The subject rate limits are counted against: the key, else the
    /// credential's own user, else the tenant. A user named by a service
    /// (`user_id` set from the header) is not a subject of its own.
    pub fn subject(&self) -> String {
        match (&self.key_id, &self.credential_user) {
            (Some(k), _) => format!("key:{k}"),
            (None, Some(u)) => user_subject(&self.tenant_id, u),
            (None, None) => format!("tenant:{}", subject_part(&self.tenant_id)),
        }
    }

    /// The admin of tenant `default`, for open development mode.
    pub fn open_dev() -> Self {
        Self {
            tenant_id: "default".into(),
            user_id: None,
            credential_user: None,
            role: Role::Admin,
            kind: CredentialKind::OpenDev,
            key_id: None,
            expires_at: None,
            limits: KeyLimits::default(),
            require_signature: false,
        }
    }
}

/// A stored API key: everything but the key itself, of which only the
/// SHA-256 hash is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub role: Role,
    pub user_id: Option<String>,
    /// The first characters of the key, shown in listings to recognise it.
    pub prefix: String,
    /// Hex SHA-256 of the whole key.
    pub key_hash: String,
    pub limits: KeyLimits,
    /// HMAC secrets for request signing; several while one rotates.
    pub signing_secrets: Vec<String>,
    pub require_signature: bool,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub created_at_ms: i64,
    /// Who created it (`key:<id>`, `cli`, `bootstrap`, `open-dev`).
    pub created_by: String,
}

impl ApiKeyRecord {
    /// Not revoked and not expired at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| e > now_ms)
    }
}

/// A tenant: the unit of isolation. Every row of every table belongs to one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub monthly_budget_usd: Option<f64>,
    /// Route class → rate, overriding the configured defaults.
    pub limits: std::collections::BTreeMap<String, String>,
    pub created_at_ms: i64,
}

/// One audit event: who did what to what, when, in which request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: String,
    pub tenant_id: String,
    pub actor: String,
    /// `key.created`, `key.revoked`, `rate_limit.reset`, `auth_cache.invalidated`,
    /// `auth.failures`, `budget.alert`, ...
    pub action: String,
    pub target: Option<String>,
    pub detail: serde_json::Value,
    pub trace_id: Option<String>,
    pub created_at_ms: i64,
}

/// Filters for listing audit events, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditQuery {
    pub action: Option<String>,
    pub actor: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Cursor: only events older than this id (ids sort by time).
    pub before_id: Option<String>,
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_users_subject_is_a_prefix_of_anothers() {
        let a = user_subject("t", "a");
        let ab = user_subject("t", "a:b");
        assert_eq!(a, "user:t:a");
        assert_eq!(ab, "user:t:a%3Ab");
        // A reset of `a` clears `{subject}:…`; `a:b`'s keys stay.
        assert!(!format!("{ab}:chat").starts_with(&format!("{a}:")));
        // Escapes cannot be forged either.
        assert_ne!(user_subject("t", "a%3Ab"), ab);
        assert_ne!(user_subject("t:a", "b"), user_subject("t", "a:b"));
    }
}
