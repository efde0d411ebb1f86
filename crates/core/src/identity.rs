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

impl Principal {
    /// The subject rate limits are counted against: the key, else the user,
    /// else the tenant.
    pub fn subject(&self) -> String {
        match (&self.key_id, &self.user_id) {
            (Some(k), _) => format!("key:{k}"),
            (None, Some(u)) => format!("user:{}:{u}", self.tenant_id),
            (None, None) => format!("tenant:{}", self.tenant_id),
        }
    }

    /// The admin of tenant `default`, for open development mode.
    pub fn open_dev() -> Self {
        Self {
            tenant_id: "default".into(),
            user_id: None,
            role: Role::Admin,
            kind: CredentialKind::OpenDev,
            key_id: None,
            expires_at: None,
            limits: KeyLimits::default(),
            require_signature: false,
        }
    }
}
