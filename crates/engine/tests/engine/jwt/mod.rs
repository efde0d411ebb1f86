//! `engine::jwt` against real signed tokens (issue 4, "JWT attacks"): a
//! hand-driven clock for `exp`/`nbf` and the JWKS cache, and a JWKS served
//! from 127.0.0.1 that counts its fetches and can swap its keys.

mod hs256;
mod jwks;

use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use switchyard_core::jwt::JwtConfig;
use switchyard_engine::jwt::{Clock, JwtError, JwtVerifier, VerifiedToken};
use tokio::sync::Notify;

pub const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
pub const ISSUER: &str = "https://abcdefgh.supabase.co/auth/v1";
pub const NOW: i64 = 1_750_000_000;

pub const RSA_A: &[u8] = include_bytes!("../../fixtures/rsa_a.pem");
pub const RSA_B: &[u8] = include_bytes!("../../fixtures/rsa_b.pem");
pub const RSA_A_PUBLIC_SPKI: &[u8] = include_bytes!("../../fixtures/rsa_a_public.pem");
pub const RSA_A_PUBLIC_PKCS1: &[u8] = include_bytes!("../../fixtures/rsa_a_public_pkcs1.pem");
pub const EC_P256: &[u8] = include_bytes!("../../fixtures/ec_p256.pem");

/// Time that moves only when a test says so.
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(now: i64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(now)))
    }

    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a Supabase project's settings translate to.
pub fn supabase_config() -> JwtConfig {
    JwtConfig {
        hs256_secret: Some(SECRET.into()),
        issuer: Some(ISSUER.into()),
        audience: Some("authenticated".into()),
        ..JwtConfig::default()
    }
}

/// The payload Supabase Auth puts in a signed-in user's access token.
pub fn supabase_claims() -> Value {
    json!({
        "iss": ISSUER,
        "sub": "8d0e2a3c-5b0c-4f7e-9a51-0c1f4f0e2b11",
        "aud": "authenticated",
        "exp": NOW + 3600,
        "iat": NOW,
        "email": "ada@example.com",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": NOW}],
        "session_id": "4f3a1c2e-0000-4000-8000-000000000000",
        "is_anonymous": false
    })
}

/// `claims` with the given top-level members replaced (or removed, for null).
pub fn with(mut claims: Value, changes: Value) -> Value {
    let object = claims.as_object_mut().unwrap();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            object.remove(k);
        } else {
            object.insert(k.clone(), v.clone());
        }
    }
    claims
}

pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

pub fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// A token assembled by hand, for headers no honest library would write.
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

pub fn rsa_a() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_A).unwrap()
}

pub fn rsa_b() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_B).unwrap()
}

pub fn ec_p256() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_P256).unwrap()
}

/// The public JWK of a private key, as an identity provider publishes it.
pub fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    serde_json::to_value(jwk).unwrap()
}

pub fn key_set(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

/// A JWKS endpoint on 127.0.0.1 whose keys, health and pace the test controls.
pub struct JwksServer {
    pub url: String,
    state: Arc<ServerState>,
}

struct ServerState {
    keys: Mutex<Value>,
    fetches: AtomicUsize,
    failing: AtomicBool,
    /// While set, each request waits for `release` after signalling `entered`.
    holding: AtomicBool,
    entered: Notify,
    release: Notify,
}

impl JwksServer {
    pub async fn start(keys: Value) -> Self {
        let state = Arc::new(ServerState {
            keys: Mutex::new(keys),
            fetches: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            entered: Notify::new(),
            release: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/jwks.json", get(serve_keys))
            .with_state(state.clone());
        tokio::spawn(axum::serve(listener, app).into_future());
        Self { url, state }
    }

    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    pub fn publish(&self, keys: Value) {
        *self.state.keys.lock().unwrap() = keys;
    }

    pub fn fail(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    pub fn hold(&self) {
        self.state.holding.store(true, Ordering::SeqCst);
    }

    /// Waits until a request has arrived while holding.
    pub async fn entered(&self) {
        self.state.entered.notified().await;
    }

    pub fn release(&self) {
        self.state.holding.store(false, Ordering::SeqCst);
        self.state.release.notify_waiters();
    }

    /// A verifier that trusts only this JWKS, at `clock`'s time.
    pub fn verifier(&self, clock: Arc<ManualClock>) -> JwtVerifier {
        JwtVerifier::with_clock(&self.config(), clock).unwrap()
    }

    pub fn config(&self) -> JwtConfig {
        JwtConfig {
            jwks_url: Some(self.url.clone()),
            issuer: Some("https://idp.example.com/".into()),
            audience: Some("switchyard".into()),
            roles: [("member".to_owned(), switchyard_core::identity::Role::User)].into(),
            ..JwtConfig::default()
        }
    }
}

async fn serve_keys(State(state): State<Arc<ServerState>>) -> Response {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    if state.holding.load(Ordering::SeqCst) {
        let released = state.release.notified();
        state.entered.notify_one();
        released.await;
    }
    if state.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let keys = state.keys.lock().unwrap().clone();
    Json(keys).into_response()
}

/// Claims an OIDC provider would issue for the JWKS-backed verifier.
pub fn oidc_claims() -> Value {
    json!({
        "iss": "https://idp.example.com/",
        "aud": ["switchyard", "other-api"],
        "sub": "user-42",
        "role": "member",
        "exp": NOW + 600,
        "iat": NOW,
    })
}

pub async fn accepted(verifier: &JwtVerifier, token: &str) -> VerifiedToken {
    match verifier.verify(token).await {
        Ok(v) => v,
        Err(e) => panic!("expected the token to be accepted, got {e:?}"),
    }
}

pub async fn rejected(verifier: &JwtVerifier, token: &str) -> JwtError {
    match verifier.verify(token).await {
        Ok(v) => panic!("expected the token to be rejected, got {:?}", v.principal),
        Err(e) => e,
    }
}
