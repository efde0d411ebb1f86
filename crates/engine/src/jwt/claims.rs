//! The checks on a verified payload (`exp`, `nbf`, `iss`, `aud`) and its
//! mapping to a [`Principal`]. Done here rather than by `jsonwebtoken` so
//! that time comes from the injected clock and a mistyped claim (`"exp":
//! "never"`) is an error, not a claim that is silently skipped.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use switchyard_core::identity::{CredentialKind, KeyLimits, Principal, Role};
use switchyard_core::jwt::JwtConfig;

use super::JwtError;

/// A role value is echoed in the error; this bounds what a token can put there.
const MAX_ECHOED_ROLE_CHARS: usize = 64;

pub(super) struct ClaimRules {
    issuer: Option<String>,
    audience: Option<String>,
    leeway: i64,
    tenant_claim: Option<String>,
    default_tenant: String,
    user_claim: String,
    role_claim: String,
    roles: BTreeMap<String, Role>,
}

impl ClaimRules {
    pub(super) fn from_config(c: &JwtConfig) -> Self {
        Self {
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            leeway: i64::try_from(c.leeway_secs).unwrap_or(i64::MAX),
            tenant_claim: c.tenant_claim.clone(),
            default_tenant: c.default_tenant.clone(),
            user_claim: c.user_claim.clone(),
            role_claim: c.role_claim.clone(),
            roles: c.roles.clone(),
        }
    }

    /// Checks the registered claims at `now` (unix seconds), then maps the
    /// configured ones. `claims` is known to be an object.
    pub(super) fn principal(&self, claims: &Value, now: i64) -> Result<Principal, JwtError> {
        let Some(claims) = claims.as_object() else {
            return Err(JwtError::Malformed("the payload is not a JSON object"));
        };
        let exp = numeric_date(claims, "exp")?.ok_or(JwtError::MissingClaim("exp".into()))?;
        if exp.saturating_add(self.leeway) < now {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = numeric_date(claims, "nbf")? {
            if nbf.saturating_sub(self.leeway) > now {
                return Err(JwtError::NotYetValid);
            }
        }
        if let Some(issuer) = &self.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
                return Err(JwtError::WrongIssuer);
            }
        }
        if let Some(audience) = &self.audience {
            if !audience_contains(claims.get("aud"), audience) {
                return Err(JwtError::WrongAudience);
            }
        }

        let role = match lookup(claims, &self.role_claim) {
            Some(Value::String(name)) => self
                .roles
                .get(name)
                .copied()
                .ok_or_else(|| JwtError::UnmappedRole(echo(name)))?,
            _ => return Err(JwtError::MissingClaim(self.role_claim.clone())),
        };
        let user_id = identifier(lookup(claims, &self.user_claim));
        if role == Role::User && user_id.is_none() {
            // A user's resources are found by its id: without one it has none.
            return Err(JwtError::MissingClaim(self.user_claim.clone()));
        }
        let tenant_id = match &self.tenant_claim {
            // Never falls back to the default tenant: a token that should
            // name its tenant but does not must not land in someone else's.
            Some(path) => identifier(lookup(claims, path))
                .ok_or_else(|| JwtError::MissingClaim(path.clone()))?,
            None => self.default_tenant.clone(),
        };
        Ok(Principal {
            tenant_id,
            credential_user: user_id.clone(),
            user_id,
            role,
            kind: CredentialKind::Jwt,
            key_id: None,
            expires_at: Some(exp),
            limits: KeyLimits::default(),
            require_signature: false,
        })
    }
}

/// A NumericDate (RFC 7519 §2): a JSON number of seconds, possibly
/// fractional. Anything else under that name is an error, never "absent".
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(secs) => Ok(Some(secs)),
            // Saturating casts: a huge or fractional value still compares right.
            None => match n.as_f64() {
                Some(secs) if secs.is_finite() => Ok(Some(secs.floor() as i64)),
                _ => Err(not_a_date(name)),
            },
        },
        Some(_) => Err(not_a_date(name)),
    }
}

fn not_a_date(name: &str) -> JwtError {
    JwtError::Malformed(match name {
        "exp" => "`exp` is not a number of seconds",
        "nbf" => "`nbf` is not a number of seconds",
        _ => "a time claim is not a number of seconds",
    })
}

/// `aud` is one string or an array of strings (RFC 7519 §4.1.3).
fn audience_contains(aud: Option<&Value>, wanted: &str) -> bool {
    match aud {
        Some(Value::String(a)) => a == wanted,
        Some(Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(wanted)),
        _ => false,
    }
}

/// A claim by exact top-level name (OIDC namespaced claims such as
/// `https://example.com/tenant` contain dots), else by dotted path.
fn lookup<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    let mut segments = path.split('.');
    let mut current = claims.get(segments.next()?)?;
    for segment in segments {
        current = current.as_object()?.get(segment)?;
    }
    Some(current)
}

/// A tenant or user id: a non-empty string, or an integer some providers use.
fn identifier(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn echo(value: &str) -> String {
    value
        .chars()
        .take(MAX_ECHOED_ROLE_CHARS)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn rules(tenant_claim: Option<&str>) -> ClaimRules {
        ClaimRules::from_config(&JwtConfig {
            tenant_claim: tenant_claim.map(str::to_owned),
            ..JwtConfig::default()
        })
    }

    #[test]
    fn a_fractional_exp_is_read_as_seconds() {
        let p = rules(None)
            .principal(
                &json!({"exp": (NOW as f64) + 0.5, "sub": "u", "role": "authenticated"}),
                NOW,
            )
            .unwrap();
        assert_eq!(p.expires_at, Some(NOW));
    }

    #[test]
    fn nbf_given_as_a_string_is_malformed_not_absent() {
        let err = rules(None)
            .principal(
                &json!({"exp": NOW + 60, "nbf": "99999999999", "sub": "u", "role": "authenticated"}),
                NOW,
            )
            .unwrap_err();
        assert_eq!(err.code(), "jwt_malformed");
    }

    #[test]
    fn a_top_level_claim_with_dots_in_its_name_wins_over_the_path() {
        let claims = json!({"a.b": "flat", "a": {"b": "nested"}});
        let claims = claims.as_object().unwrap();
        assert_eq!(lookup(claims, "a.b"), Some(&json!("flat")));
        assert_eq!(lookup(claims, "a"), Some(&json!({"b": "nested"})));
        assert_eq!(lookup(claims, "a.c"), None);
        assert_eq!(lookup(claims, "a.b.c"), None);
    }

    #[test]
    fn a_tenant_claim_that_is_configured_but_absent_is_refused() {
        let err = rules(Some("app_metadata.tenant_id"))
            .principal(
                &json!({"exp": NOW + 60, "sub": "u", "role": "authenticated", "app_metadata": {}}),
                NOW,
            )
            .unwrap_err();
        assert_eq!(err, JwtError::MissingClaim("app_metadata.tenant_id".into()));
    }

    #[test]
    fn a_user_token_without_a_subject_is_refused() {
        let err = rules(None)
            .principal(&json!({"exp": NOW + 60, "role": "authenticated"}), NOW)
            .unwrap_err();
        assert_eq!(err, JwtError::MissingClaim("sub".into()));
    }

    #[test]
    fn an_echoed_role_is_bounded_and_printable() {
        let long = format!("{}\n", "r".repeat(200));
        let err = rules(None)
            .principal(&json!({"exp": NOW + 60, "sub": "u", "role": long}), NOW)
            .unwrap_err();
        let JwtError::UnmappedRole(shown) = err else {
            panic!("{err:?}")
        };
        assert_eq!(shown.len(), 64);
        assert!(shown.chars().all(|c| c == 'r'));
    }
}
