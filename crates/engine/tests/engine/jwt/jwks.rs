//! RS256/ES256 through a JWKS: key/algorithm binding, RS/HS confusion, and
//! the cache (rotation, rate-limited re-fetch, failures).

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use switchyard_core::identity::Role;
use switchyard_core::jwt::JwtConfig;
use switchyard_engine::jwt::{JwtError, JwtVerifier};

use super::*;

fn rsa_a_jwk() -> Value {
    public_jwk(&rsa_a(), Algorithm::RS256, "a")
}

fn rsa_b_jwk() -> Value {
    public_jwk(&rsa_b(), Algorithm::RS256, "b")
}

fn ec_jwk() -> Value {
    public_jwk(&ec_p256(), Algorithm::ES256, "ec")
}

fn rs256(kid: &str, key: &EncodingKey) -> String {
    sign(Algorithm::RS256, Some(kid), &oidc_claims(), key)
}

/// The DER inside a PEM file: what some libraries hand to HMAC instead.
fn pem_body(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).unwrap();
    let base64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(base64).unwrap()
}

#[tokio::test]
async fn rs256_token_from_the_jwks_is_accepted_and_the_keys_are_cached() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk(), ec_jwk()])).await;
    let v = server.verifier(ManualClock::at(NOW));

    let p = accepted(&v, &rs256("a", &rsa_a())).await.principal;
    accepted(&v, &rs256("a", &rsa_a())).await;

    assert_eq!(p.user_id.as_deref(), Some("user-42"));
    assert_eq!(p.role, Role::User);
    assert_eq!(p.expires_at, Some(NOW + 600));
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn es256_token_from_the_jwks_is_accepted() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk(), ec_jwk()])).await;
    let v = server.verifier(ManualClock::at(NOW));
    let token = sign(Algorithm::ES256, Some("ec"), &oidc_claims(), &ec_p256());

    let p = accepted(&v, &token).await.principal;

    assert_eq!(p.user_id.as_deref(), Some("user-42"));
}

#[tokio::test]
async fn rs256_token_signed_by_a_key_outside_the_jwks_is_rejected() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let v = server.verifier(ManualClock::at(NOW));

    let err = rejected(&v, &rs256("a", &rsa_b())).await;

    assert_eq!(err, JwtError::BadSignature);
}

#[tokio::test]
async fn token_whose_algorithm_does_not_match_the_named_key_is_rejected() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk(), ec_jwk()])).await;
    let v = server.verifier(ManualClock::at(NOW));
    let es256_naming_rsa = sign(Algorithm::ES256, Some("a"), &oidc_claims(), &ec_p256());
    let rs256_naming_ec = rs256("ec", &rsa_a());

    for token in [es256_naming_rsa, rs256_naming_ec] {
        let err = rejected(&v, &token).await;

        assert_eq!(err.code(), "jwt_disallowed_algorithm", "{err}");
    }
}

#[tokio::test]
async fn hs256_token_signed_with_the_rsa_public_key_is_rejected() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let jwks_only = server.verifier(clock.clone());
    let jwks_and_secret = JwtVerifier::with_clock(
        &JwtConfig {
            hs256_secret: Some(SECRET.into()),
            ..server.config()
        },
        clock,
    )
    .unwrap();
    let public_key_forms = [
        RSA_A_PUBLIC_SPKI.to_vec(),
        RSA_A_PUBLIC_PKCS1.to_vec(),
        pem_body(RSA_A_PUBLIC_SPKI),
        pem_body(RSA_A_PUBLIC_PKCS1),
    ];
    for hmac_key in &public_key_forms {
        for kid in [Some("a"), None] {
            let token = sign(
                Algorithm::HS256,
                kid,
                &oidc_claims(),
                &EncodingKey::from_secret(hmac_key),
            );

            let err = rejected(&jwks_only, &token).await;
            assert_eq!(err.code(), "jwt_disallowed_algorithm", "{err}");
            let err = rejected(&jwks_and_secret, &token).await;
            assert_eq!(err, JwtError::BadSignature);
        }
    }
    // The attack never even reached the JWKS.
    assert_eq!(server.fetches(), 0);
}

#[tokio::test]
async fn unknown_kid_is_rejected_after_at_most_one_refetch() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    accepted(&v, &rs256("a", &rsa_a())).await;
    clock.advance(31);

    let err = rejected(&v, &rs256("nobody", &rsa_b())).await;

    assert_eq!(err, JwtError::UnknownKid);
    assert_eq!(err.code(), "jwt_unknown_kid");
    assert_eq!(server.fetches(), 2);
    rejected(&v, &rs256("nobody", &rsa_b())).await;
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn rotated_jwks_key_is_accepted_without_restart() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    accepted(&v, &rs256("a", &rsa_a())).await;

    server.publish(key_set(&[rsa_b_jwk()]));
    clock.advance(30);
    let p = accepted(&v, &rs256("b", &rsa_b())).await.principal;

    assert_eq!(p.user_id.as_deref(), Some("user-42"));
    assert_eq!(server.fetches(), 2);
    // The retired key is gone with the set that held it.
    clock.advance(30);
    assert_eq!(
        rejected(&v, &rs256("a", &rsa_a())).await,
        JwtError::UnknownKid
    );
}

#[tokio::test]
async fn many_unknown_kids_within_the_refetch_window_cost_one_fetch() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    accepted(&v, &rs256("a", &rsa_a())).await;

    for i in 0..100 {
        let err = rejected(&v, &rs256(&format!("random-{i}"), &rsa_a())).await;
        assert_eq!(err, JwtError::UnknownKid);
    }
    assert_eq!(server.fetches(), 1, "the first fetch opened the window");

    clock.advance(30);
    for i in 0..100 {
        rejected(&v, &rs256(&format!("again-{i}"), &rsa_a())).await;
        if i % 10 == 9 {
            clock.advance(2);
        }
    }
    assert_eq!(server.fetches(), 2, "one fetch per 30 s window");
}

#[tokio::test]
async fn concurrent_misses_share_one_fetch() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = Arc::new(server.verifier(clock.clone()));
    accepted(&v, &rs256("a", &rsa_a())).await;
    server.publish(key_set(&[rsa_a_jwk(), rsa_b_jwk()]));
    clock.advance(60);
    server.hold();

    let mut tasks = Vec::new();
    for i in 0..40 {
        let (v, token) = if i % 2 == 0 {
            (v.clone(), rs256("b", &rsa_b()))
        } else {
            (v.clone(), rs256(&format!("random-{i}"), &rsa_b()))
        };
        tasks.push(tokio::spawn(async move { v.verify(&token).await }));
    }
    server.entered().await;
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    server.release();
    let results = futures::future::join_all(tasks).await;

    for (i, result) in results.into_iter().enumerate() {
        let result = result.unwrap();
        if i % 2 == 0 {
            assert!(result.is_ok(), "{i}: {result:?}");
        } else {
            assert_eq!(result.unwrap_err(), JwtError::UnknownKid, "{i}");
        }
    }
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn keys_are_fetched_again_once_their_ttl_has_passed() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    let token = sign(
        Algorithm::RS256,
        Some("a"),
        &with(oidc_claims(), json!({"exp": NOW + 10_000})),
        &rsa_a(),
    );
    accepted(&v, &token).await;

    clock.advance(599);
    accepted(&v, &token).await;
    assert_eq!(server.fetches(), 1);
    clock.advance(1);
    server.publish(key_set(&[rsa_b_jwk()]));

    // Past its lifetime, the set still has the token's key: the token is
    // answered at once and the set fetched again behind it, so that a slow
    // JWKS URL holds up no sign-in.
    accepted(&v, &token).await;
    // Refused once the background fetch has landed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match v.verify(&token).await {
            Err(e) => {
                assert_eq!(e, JwtError::UnknownKid);
                break;
            }
            Ok(_) => assert!(std::time::Instant::now() < deadline, "never fetched again"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(server.fetches(), 2);
}

/// A JWKS URL that does not answer holds up no token whose key is held:
/// the set past its lifetime is used while one fetch waits in the
/// background.
#[tokio::test]
async fn a_hung_jwks_url_holds_up_no_token_whose_key_is_held() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    let token = rs256("a", &rsa_a());
    accepted(&v, &token).await;
    server.hold();
    clock.advance(600);
    for _ in 0..20 {
        tokio::time::timeout(std::time::Duration::from_secs(1), accepted(&v, &token))
            .await
            .expect("answered without waiting for the JWKS URL");
    }
    server.entered().await;
    assert_eq!(server.fetches(), 2, "one background fetch");
    server.release();
}

#[tokio::test]
async fn failed_refetch_keeps_the_keys_we_had() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    let token = sign(
        Algorithm::RS256,
        Some("a"),
        &with(oidc_claims(), json!({"exp": NOW + 10_000})),
        &rsa_a(),
    );
    accepted(&v, &token).await;
    server.fail(true);

    clock.advance(600);
    accepted(&v, &token).await;
    let err = rejected(&v, &rs256("b", &rsa_b())).await;

    assert_eq!(server.fetches(), 2, "the failure opened a window too");
    // The set could not be fetched: the key may be new (a rotation during
    // the outage), so ours to answer (503), not the token's.
    assert!(err.is_unavailable(), "{err:?}");
    assert_eq!(err.code(), "jwks_unavailable");
    assert!(err.to_string().contains("500"), "{err}");
}

#[tokio::test]
async fn unreachable_jwks_at_first_use_answers_unavailable_without_hammering() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    server.fail(true);
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());

    for _ in 0..10 {
        let err = rejected(&v, &rs256("a", &rsa_a())).await;
        assert!(err.is_unavailable(), "{err:?}");
    }
    assert_eq!(server.fetches(), 1);

    server.fail(false);
    clock.advance(30);
    accepted(&v, &rs256("a", &rsa_a())).await;
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn jwks_that_cannot_be_connected_to_answers_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    drop(listener);
    let v = JwtVerifier::with_clock(
        &JwtConfig {
            jwks_url: Some(url),
            audience: Some("switchyard".into()),
            ..JwtConfig::default()
        },
        ManualClock::at(NOW),
    )
    .unwrap();

    let err = rejected(&v, &rs256("a", &rsa_a())).await;

    assert!(err.is_unavailable(), "{err:?}");
}

#[tokio::test]
async fn token_without_kid_is_checked_against_each_key_for_its_algorithm() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk(), ec_jwk()])).await;
    let v = server.verifier(ManualClock::at(NOW));
    let no_kid = sign(Algorithm::RS256, None, &oidc_claims(), &rsa_a());
    accepted(&v, &no_kid).await;

    // Two RSA keys (the overlap of a rotation): either may have signed it.
    for keys in [[rsa_a_jwk(), rsa_b_jwk()], [rsa_b_jwk(), rsa_a_jwk()]] {
        let both = JwksServer::start(key_set(&keys)).await;
        let v = both.verifier(ManualClock::at(NOW));
        accepted(&v, &no_kid).await;
        let by_b = sign(Algorithm::RS256, None, &oidc_claims(), &rsa_b());
        accepted(&v, &by_b).await;
        assert_eq!(both.fetches(), 1);
    }
}

#[tokio::test]
async fn a_key_rotated_under_a_token_without_kid_is_fetched_on_the_bad_signature() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    accepted(&v, &sign(Algorithm::RS256, None, &oidc_claims(), &rsa_a())).await;

    server.publish(key_set(&[public_jwk(&rsa_b(), Algorithm::RS256, "a")]));
    clock.advance(30);
    // Without a `kid`, and with the same `kid` as the retired key: the held
    // key does not verify, so the set is fetched again, once.
    let p = accepted(&v, &sign(Algorithm::RS256, None, &oidc_claims(), &rsa_b()))
        .await
        .principal;
    accepted(&v, &rs256("a", &rsa_b())).await;

    assert_eq!(p.user_id.as_deref(), Some("user-42"));
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn forged_signatures_within_the_refetch_window_cost_no_fetch() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let clock = ManualClock::at(NOW);
    let v = server.verifier(clock.clone());
    accepted(&v, &rs256("a", &rsa_a())).await;

    for kid in [Some("a"), None] {
        for _ in 0..50 {
            let forged = sign(Algorithm::RS256, kid, &oidc_claims(), &rsa_b());
            assert_eq!(rejected(&v, &forged).await, JwtError::BadSignature);
        }
    }
    assert_eq!(server.fetches(), 1, "the first fetch opened the window");

    clock.advance(30);
    for _ in 0..50 {
        rejected(&v, &rs256("a", &rsa_b())).await;
    }
    assert_eq!(server.fetches(), 2, "one fetch per 30 s window");
    accepted(&v, &rs256("a", &rsa_a())).await;
}

#[tokio::test]
async fn oidc_claims_are_checked_against_the_jwks_configuration() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let v = server.verifier(ManualClock::at(NOW));
    let other_aud = with(oidc_claims(), json!({"aud": "other-api"}));
    let other_iss = with(oidc_claims(), json!({"iss": "https://evil.example.com/"}));

    let aud_err = rejected(&v, &sign(Algorithm::RS256, Some("a"), &other_aud, &rsa_a())).await;
    let iss_err = rejected(&v, &sign(Algorithm::RS256, Some("a"), &other_iss, &rsa_a())).await;

    assert_eq!(aud_err, JwtError::WrongAudience);
    assert_eq!(iss_err, JwtError::WrongIssuer);
}

/// The text of every line logged (at debug and above) while `f` runs.
async fn logged<F: std::future::Future>(f: F) -> String {
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Capture::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    f.await;
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    text
}

#[tokio::test]
async fn a_secret_in_the_jwks_url_is_masked_in_the_log() {
    let server = JwksServer::start(key_set(&[rsa_a_jwk()])).await;
    let mut config = server.config();
    let url = format!("{}?access_token=jwks-secret-1234", server.url);
    config.jwks_url = Some(url.clone());
    let clock = ManualClock::at(NOW);
    let v = JwtVerifier::with_clock(&config, clock.clone()).unwrap();
    // A server that does not answer: reqwest's own error names the URL too.
    let mut unreachable = config.clone();
    unreachable.jwks_url = Some("http://127.0.0.1:9/jwks?access_token=jwks-secret-5678".into());
    let down = JwtVerifier::with_clock(&unreachable, clock.clone()).unwrap();

    let text = logged(async {
        accepted(&v, &rs256("a", &rsa_a())).await;
        server.fail(true);
        clock.advance(600);
        rejected(&v, &rs256("b", &rsa_b())).await;
        rejected(&down, &rs256("a", &rsa_a())).await;
    })
    .await;

    assert!(text.contains("fetched the JWKS"), "{text}");
    assert!(text.contains("JWKS fetch failed"), "{text}");
    assert!(text.contains("access_token=[redacted]"), "{text}");
    assert!(!text.contains("jwks-secret"), "{text}");
}
