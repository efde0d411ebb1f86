//! Supabase-shaped HS256 tokens: the claim checks, the mapping, and the
//! header attacks that need no JWKS.

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use switchyard_core::identity::{CredentialKind, Role};
use switchyard_core::jwt::JwtConfig;
use switchyard_engine::jwt::{JwtError, JwtVerifier};

use super::*;

fn verifier() -> JwtVerifier {
    verifier_with(supabase_config())
}

fn verifier_with(config: JwtConfig) -> JwtVerifier {
    JwtVerifier::with_clock(&config, ManualClock::at(NOW)).unwrap()
}

#[tokio::test]
async fn supabase_user_token_is_accepted_and_mapped_to_a_principal() {
    let token = hs256(&supabase_claims());

    let verified = accepted(&verifier(), &token).await;

    let p = &verified.principal;
    assert_eq!(p.tenant_id, "default");
    assert_eq!(
        p.user_id.as_deref(),
        Some("8d0e2a3c-5b0c-4f7e-9a51-0c1f4f0e2b11")
    );
    assert_eq!(p.role, Role::User);
    assert_eq!(p.kind, CredentialKind::Jwt);
    assert_eq!(p.key_id, None);
    assert_eq!(p.expires_at, Some(NOW + 3600));
    assert!(!p.require_signature);
    assert_eq!(verified.claims["email"], "ada@example.com");
}

#[tokio::test]
async fn service_role_token_maps_to_the_service_role_without_a_user() {
    let claims = with(
        supabase_claims(),
        json!({"role": "service_role", "sub": null}),
    );

    let p = accepted(&verifier(), &hs256(&claims)).await.principal;

    assert_eq!(p.role, Role::Service);
    assert_eq!(p.user_id, None);
}

#[tokio::test]
async fn anon_role_is_rejected_as_unmapped() {
    let claims = with(supabase_claims(), json!({"role": "anon"}));

    let err = rejected(&verifier(), &hs256(&claims)).await;

    assert_eq!(err, JwtError::UnmappedRole("anon".into()));
    assert_eq!(err.code(), "jwt_unmapped_role");
    assert!(err.to_string().contains("`anon`"), "{err}");
}

/// An identity provider's `admin` is some application's administrator, not
/// necessarily the gateway's: only an explicit `[jwt.roles]` entry makes one.
#[tokio::test]
async fn admin_role_is_refused_unless_mapped() {
    let claims = with(supabase_claims(), json!({"role": "admin"}));

    let err = rejected(&verifier(), &hs256(&claims)).await;

    assert_eq!(err, JwtError::UnmappedRole("admin".into()));
}

#[tokio::test]
async fn token_without_a_role_is_rejected() {
    let claims = with(supabase_claims(), json!({"role": null}));

    let err = rejected(&verifier(), &hs256(&claims)).await;

    assert_eq!(err, JwtError::MissingClaim("role".into()));
}

#[tokio::test]
async fn tenant_and_role_come_from_nested_claims_when_configured() {
    let v = verifier_with(JwtConfig {
        tenant_claim: Some("app_metadata.tenant_id".into()),
        role_claim: "app_metadata.gateway_role".into(),
        roles: [("admin".to_owned(), Role::Admin)].into(),
        ..supabase_config()
    });
    let claims = with(
        supabase_claims(),
        json!({"app_metadata": {"tenant_id": "acme", "gateway_role": "admin"}}),
    );

    let p = accepted(&v, &hs256(&claims)).await.principal;

    assert_eq!(p.tenant_id, "acme");
    assert_eq!(p.role, Role::Admin);
}

#[tokio::test]
async fn token_missing_its_configured_tenant_claim_is_rejected() {
    let v = verifier_with(JwtConfig {
        tenant_claim: Some("app_metadata.tenant_id".into()),
        ..supabase_config()
    });

    let err = rejected(&v, &hs256(&supabase_claims())).await;

    assert_eq!(err, JwtError::MissingClaim("app_metadata.tenant_id".into()));
}

#[tokio::test]
async fn token_expired_by_61_seconds_is_rejected() {
    let claims = with(supabase_claims(), json!({"exp": NOW - 61}));

    let err = rejected(&verifier(), &hs256(&claims)).await;

    assert_eq!(err, JwtError::Expired);
    assert_eq!(err.code(), "jwt_expired");
}

#[tokio::test]
async fn token_expired_by_10_seconds_is_accepted_within_the_30_second_leeway() {
    let claims = with(supabase_claims(), json!({"exp": NOW - 10}));

    let p = accepted(&verifier(), &hs256(&claims)).await.principal;

    assert_eq!(p.expires_at, Some(NOW - 10));
}

#[tokio::test]
async fn token_expires_when_the_clock_passes_exp_plus_leeway() {
    let clock = ManualClock::at(NOW);
    let v = JwtVerifier::with_clock(&supabase_config(), clock.clone()).unwrap();
    let token = hs256(&with(supabase_claims(), json!({"exp": NOW + 100})));
    accepted(&v, &token).await;

    clock.advance(130);
    accepted(&v, &token).await;
    clock.advance(1);

    assert_eq!(rejected(&v, &token).await, JwtError::Expired);
}

#[tokio::test]
async fn token_whose_nbf_is_in_the_future_is_rejected() {
    let v = verifier();
    let later = hs256(&with(supabase_claims(), json!({"nbf": NOW + 61})));
    let within_leeway = hs256(&with(supabase_claims(), json!({"nbf": NOW + 10})));

    assert_eq!(rejected(&v, &later).await, JwtError::NotYetValid);
    accepted(&v, &within_leeway).await;
}

#[tokio::test]
async fn token_without_exp_is_rejected() {
    let claims = with(supabase_claims(), json!({"exp": null}));

    let err = rejected(&verifier(), &hs256(&claims)).await;

    assert_eq!(err, JwtError::MissingClaim("exp".into()));
}

#[tokio::test]
async fn exp_or_nbf_of_the_wrong_type_is_rejected_rather_than_skipped() {
    // GHSA-h395-gr6q-cpjc: a string `nbf` used to count as absent.
    let v = verifier();
    for changes in [
        json!({"exp": "99999999999"}),
        json!({"nbf": "99999999999"}),
        json!({"nbf": true}),
        json!({"exp": [NOW + 60]}),
    ] {
        let token = hs256(&with(supabase_claims(), changes.clone()));

        let err = rejected(&v, &token).await;

        assert_eq!(err.code(), "jwt_malformed", "{changes}: {err}");
    }
}

#[tokio::test]
async fn token_for_another_audience_is_rejected() {
    let v = verifier();
    for aud in [
        json!("anon"),
        json!(["api", "other"]),
        json!(null),
        json!(7),
    ] {
        let token = hs256(&with(supabase_claims(), json!({ "aud": aud })));

        assert_eq!(rejected(&v, &token).await, JwtError::WrongAudience, "{aud}");
    }
    let listed = hs256(&with(
        supabase_claims(),
        json!({"aud": ["api", "authenticated"]}),
    ));
    accepted(&v, &listed).await;
}

#[tokio::test]
async fn token_from_another_issuer_is_rejected() {
    let v = verifier();
    for iss in [
        json!("https://other.supabase.co/auth/v1"),
        json!("supabase"),
        json!(null),
    ] {
        let token = hs256(&with(supabase_claims(), json!({ "iss": iss })));

        let err = rejected(&v, &token).await;

        assert_eq!(err, JwtError::WrongIssuer, "{iss}");
        assert_eq!(err.code(), "jwt_wrong_issuer");
    }
}

#[tokio::test]
async fn token_signed_with_another_secret_or_altered_is_rejected() {
    let v = verifier();
    let other = sign(
        Algorithm::HS256,
        None,
        &supabase_claims(),
        &EncodingKey::from_secret(b"another-secret-that-is-also-32-bytes-or-more"),
    );
    let good = hs256(&supabase_claims());
    let mut segments: Vec<&str> = good.split('.').collect();
    let promoted = URL_SAFE_NO_PAD
        .encode(with(supabase_claims(), json!({"role": "service_role"})).to_string());
    segments[1] = &promoted;
    let altered = segments.join(".");

    assert_eq!(rejected(&v, &other).await, JwtError::BadSignature);
    assert_eq!(rejected(&v, &altered).await, JwtError::BadSignature);
}

#[tokio::test]
async fn alg_none_is_rejected_however_it_is_spelled() {
    let v = verifier();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": alg, "typ": "JWT"});
        for signature in [&b""[..], b"x"] {
            let token = raw_token(&header, &supabase_claims(), signature);

            let err = rejected(&v, &token).await;

            assert_eq!(err.code(), "jwt_disallowed_algorithm", "{alg}: {err}");
        }
    }
}

#[tokio::test]
async fn algorithms_outside_the_allow_list_are_rejected() {
    let v = verifier();
    for alg in [
        "HS384", "HS512", "RS384", "RS512", "PS256", "ES384", "EdDSA", "hs256", "", "HS256 ",
    ] {
        let token = raw_token(&json!({ "alg": alg }), &supabase_claims(), b"sig");

        let err = rejected(&v, &token).await;

        assert_eq!(err.code(), "jwt_disallowed_algorithm", "{alg:?}: {err}");
    }
    // A correctly signed HS512 token is refused all the same.
    let hs512 = sign(
        Algorithm::HS512,
        None,
        &supabase_claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    );
    assert_eq!(
        rejected(&v, &hs512).await.code(),
        "jwt_disallowed_algorithm"
    );
}

#[tokio::test]
async fn rs256_token_is_rejected_when_no_jwks_is_configured() {
    let token = sign(Algorithm::RS256, Some("a"), &supabase_claims(), &rsa_a());

    let err = rejected(&verifier(), &token).await;

    assert_eq!(err.code(), "jwt_disallowed_algorithm");
}

#[tokio::test]
async fn header_with_critical_extensions_is_rejected() {
    let token = raw_token(
        &json!({"alg": "HS256", "crit": ["b64"], "b64": false}),
        &supabase_claims(),
        b"sig",
    );

    let err = rejected(&verifier(), &token).await;

    assert_eq!(err.code(), "jwt_malformed");
}

#[tokio::test]
async fn malformed_tokens_are_rejected_without_panicking() {
    let v = verifier();
    let good = hs256(&supabase_claims());
    let array_payload = raw_token(&json!({"alg": "HS256"}), &json!([1, 2]), b"s");
    let cases = [
        String::new(),
        "Bearer".to_owned(),
        "a.b".to_owned(),
        format!("{good}.extra.parts"),
        ".payload.signature".to_owned(),
        "!!!.e30.c2ln".to_owned(),
        format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("not json")),
        format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(r#"{"alg": 256}"#)),
        format!(
            "{}.e30.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","alg":"none"}"#)
        ),
        array_payload,
        format!("{good}{}", "A".repeat(17 * 1024)),
    ];
    for token in &cases {
        let err = rejected(&v, token).await;

        assert!(
            matches!(
                err,
                JwtError::Malformed(_) | JwtError::BadSignature | JwtError::DisallowedAlgorithm(_)
            ),
            "{token:.60}: {err:?}"
        );
    }
}

#[tokio::test]
async fn error_messages_never_contain_the_token_or_the_secret() {
    let v = verifier();
    let mut tokens = vec![
        hs256(&with(supabase_claims(), json!({"exp": NOW - 600}))),
        hs256(&with(supabase_claims(), json!({"aud": "x"}))),
        hs256(&with(supabase_claims(), json!({"role": "anon"}))),
        hs256(&with(supabase_claims(), json!({"exp": "never"}))),
        raw_token(&json!({"alg": "none"}), &supabase_claims(), b""),
        raw_token(&json!({"alg": "<script>"}), &supabase_claims(), b"s"),
    ];
    let good = hs256(&supabase_claims());
    tokens.push(format!("{}x", &good[..good.len() - 1]));
    for token in &tokens {
        let err = rejected(&v, token).await;
        let shown = format!("{err} {err:?}");

        assert!(!shown.contains(SECRET), "{shown}");
        for segment in token.split('.').filter(|s| s.len() > 8) {
            assert!(!shown.contains(segment), "{shown}");
        }
        assert!(!shown.contains("<script>"), "{shown}");
    }
}

#[tokio::test]
async fn verifier_debug_output_hides_the_secret() {
    let shown = format!("{:?}", verifier());

    assert!(!shown.contains(SECRET), "{shown}");
}
