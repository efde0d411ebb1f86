//! Identity over HTTP: open development mode and its end, API keys through
//! the admin API and the CLI, error shapes per API family, acting for a
//! user and security headers. The authorization matrix is in `matrix.rs`.

use reqwest::StatusCode;
use serde_json::{json, Value};
use switchyard_testkit::TestApp;

use crate::helpers::{app, chat_body, spawn, BIN};

const ADMIN: &str = "bootstrap-admin-key-0123456789abcdef0123456789";

async fn with_admin() -> TestApp {
    app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await
}

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = app.client.request(method, app.url(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, v)
}

async fn create_key(app: &TestApp, admin: &str, body: Value) -> Value {
    let (status, _, v) = send(
        app,
        reqwest::Method::POST,
        "/v1/admin/keys",
        Some(admin),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

async fn chat_status(app: &TestApp, key: Option<&str>) -> StatusCode {
    send(
        app,
        reqwest::Method::POST,
        "/v1/chat/completions",
        key,
        Some(chat_body("gpt-4o-mini")),
    )
    .await
    .0
}

#[tokio::test]
async fn open_development_mode_serves_without_a_key_until_the_first_key_exists() {
    let app = spawn().await;
    assert!(app
        .wait_for_log(|l| l.contains("open development mode"))
        .await
        .is_some());
    assert_eq!(chat_status(&app, None).await, StatusCode::OK);
    assert_eq!(
        chat_status(&app, Some("sk-placeholder-an-sdk-insists-on")).await,
        StatusCode::OK,
        "no key exists, so a presented one is ignored"
    );

    let (status, _, created) = send(
        &app,
        reqwest::Method::POST,
        "/v1/admin/keys",
        None,
        Some(json!({"name": "first", "role": "admin"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap();

    let (status, _, body) = send(
        &app,
        reqwest::Method::POST,
        "/v1/chat/completions",
        None,
        Some(chat_body("gpt-4o-mini")),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], Value::Null);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("You didn't provide an API key"));
    assert_eq!(chat_status(&app, Some(key)).await, StatusCode::OK);
    // A scheme with no token is no key either (not a wrong one, which
    // would count against the address's failed authentications); the
    // scheme's case does not matter.
    for header in ["Bearer", "Bearer   ", "bearer"] {
        let resp = app
            .client
            .get(app.url("/v1/models"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{header:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], Value::Null, "{header:?}: {body}");
    }
    for header in [format!("BEARER {key}"), format!("bEaReR\t{key}")] {
        let resp = app
            .client
            .get(app.url("/v1/models"))
            .header("authorization", header.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{header:?}");
    }
}

/// Open development mode serves anyone who reaches the loopback address
/// as admin; a web page must not be one of them: neither a page of another
/// site (a `text/plain` POST needs no preflight) nor one that rebound its
/// name to 127.0.0.1.
#[tokio::test]
async fn open_development_mode_refuses_other_sites_and_rebound_names() {
    let app = app()
        .config("[security]\ncors_origins = [\"https://app.example\"]\n")
        .spawn()
        .await;
    let port = app.addr.port();
    let plant = |origin: Option<&str>, host: Option<String>| {
        let mut req = app
            .client
            .post(app.url("/v1/admin/keys"))
            .header("content-type", "text/plain;charset=UTF-8")
            .body(r#"{"name": "planted", "role": "admin"}"#);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(h) = host {
            req = req.header("host", h);
        }
        req.send()
    };
    for (origin, host) in [
        (Some("https://evil.example"), None),
        (Some("null"), None),
        (Some("http://localhost.evil.example"), None),
        (None, Some(format!("rebind.evil.example:{port}"))),
        (
            Some(&*format!("http://rebind.evil.example:{port}")),
            Some(format!("rebind.evil.example:{port}")),
        ),
    ] {
        let resp = plant(origin, host.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin:?} {host:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "open_dev_cross_site", "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Open development mode"));
    }
    let keys = app
        .client
        .get(app.url("/v1/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(keys.status(), StatusCode::OK);
    let keys: Value = keys.json().await.unwrap();
    assert_eq!(keys["data"], json!([]), "no key was planted");

    // A page on a loopback host, a listed origin, and clients outside a
    // browser (no Origin; Host 127.0.0.1 or localhost) are served.
    for (origin, host) in [
        (Some("http://localhost:3000"), None),
        (Some("http://127.0.0.1:5173"), None),
        (Some("https://app.example"), None),
        (None, Some(format!("localhost:{port}"))),
        (None, None),
    ] {
        let resp = app
            .client
            .post(app.url("/v1/chat/completions"))
            .header("origin", origin.unwrap_or("http://localhost"))
            .header("host", host.unwrap_or(format!("127.0.0.1:{port}")))
            .json(&chat_body("gpt-4o-mini"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{origin:?}");
    }
}

/// Runs `switchyard --config CONFIG ARGS…` (the bootstrap key unset, `env`
/// set), asserts that it succeeds and returns its stdout and stderr.
fn cli(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--config").arg(config).args(args);
    cmd.env_remove("SWITCHYARD_ADMIN_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The bootstrap key is the server's to store and rotate: the CLI run with
/// another value (a stale shell) leaves the running server's key working.
#[tokio::test]
async fn the_cli_never_rotates_the_bootstrap_key() {
    let app = with_admin().await;
    let stale = "an-old-bootstrap-value-0123456789abcdef0123";
    cli(
        &app.config_path,
        &["keys", "list", "--tenant", "default"],
        &[("SWITCHYARD_ADMIN_KEY", stale)],
    );
    let (status, _, _) = send(
        &app,
        reqwest::Method::GET,
        "/v1/admin/keys",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(
        &app,
        reqwest::Method::GET,
        "/v1/admin/keys",
        Some(stale),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "nor is the stale value stored"
    );
}

/// The startup warning says to end the mode with `switchyard keys create`,
/// which runs in a process of its own: the server must notice the key.
#[tokio::test]
async fn a_key_created_with_the_cli_ends_open_development_mode_of_a_running_server() {
    let app = spawn().await;
    assert_eq!(chat_status(&app, None).await, StatusCode::OK);
    let (out, _) = cli(
        &app.config_path,
        &["keys", "create", "--name", "cli", "--role", "admin"],
        &[],
    );
    let key = out.trim().to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while chat_status(&app, None).await == StatusCode::OK && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(chat_status(&app, None).await, StatusCode::UNAUTHORIZED);
    assert_eq!(chat_status(&app, Some(&key)).await, StatusCode::OK);
    assert!(app
        .wait_for_log(|l| l.contains("open development mode has ended"))
        .await
        .is_some());
}

#[tokio::test]
async fn a_public_listener_never_runs_open() {
    let app = app()
        .env("SWITCHYARD_SERVER__LISTEN", "0.0.0.0:0")
        .spawn()
        .await;
    assert_eq!(chat_status(&app, None).await, StatusCode::UNAUTHORIZED);
    let (status, _, _) = send(&app, reqwest::Method::GET, "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "health stays public");
    let (status, _, _) = send(&app, reqwest::Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn refusals_answer_in_the_shape_of_each_api() {
    let app = with_admin().await;
    let bad = "sy_0000000000000000000000000000000000000000000";

    let (s, _, openai) = send(
        &app,
        reqwest::Method::POST,
        "/v1/chat/completions",
        Some(bad),
        Some(chat_body("gpt-4o-mini")),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(openai["error"]["code"], "invalid_api_key");
    assert_eq!(openai["error"]["type"], "invalid_request_error");
    assert!(openai["error"].get("param").is_some());

    let resp = app
        .client
        .post(app.url("/v1/messages"))
        .header("x-api-key", bad)
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let anthropic: Value = resp.json().await.unwrap();
    assert_eq!(
        anthropic,
        json!({"type": "error", "error": {"type": "authentication_error", "message": anthropic["error"]["message"]}})
    );

    let (s, _, native) = send(&app, reqwest::Method::GET, "/v1/admin/keys", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(native["error"]["code"], "missing_credentials");
    assert!(native["error"]["details"].is_object());

    // The Anthropic SDK's header works for any route.
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-api-key", ADMIN)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_key_is_shown_once_listed_without_secrets_and_revoked_at_once() {
    let app = with_admin().await;
    let created = create_key(
        &app,
        ADMIN,
        json!({"name": "svc", "role": "service", "require_signature": true}),
    )
    .await;
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("sy_") && key.len() == 46);
    assert!(created["signing_secret"]
        .as_str()
        .unwrap()
        .starts_with("sys_"));
    assert_eq!(created["prefix"], key[..11]);
    assert_eq!(
        chat_status(&app, Some(&key)).await,
        StatusCode::UNAUTHORIZED,
        "it requires signed requests"
    );
    let plain = create_key(&app, ADMIN, json!({"name": "plain", "role": "service"})).await;
    let key = plain["key"].as_str().unwrap().to_owned();
    let id = plain["id"].as_str().unwrap().to_owned();
    assert!(plain.get("signing_secret").is_none());
    assert_eq!(chat_status(&app, Some(&key)).await, StatusCode::OK);

    let (s, _, list) = send(
        &app,
        reqwest::Method::GET,
        "/v1/admin/keys",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let text = list.to_string();
    assert!(!text.contains(&key), "the key is never listed");
    assert!(!text.contains(created["signing_secret"].as_str().unwrap()));
    assert!(!text.contains("key_hash"));
    assert!(!text.contains(created["key"].as_str().unwrap()));
    assert_eq!(list["data"].as_array().unwrap().len(), 3, "{list}");

    let (s, _, revoked) = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/v1/admin/keys/{id}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["active"], false);
    assert_eq!(
        chat_status(&app, Some(&key)).await,
        StatusCode::UNAUTHORIZED,
        "revocation is immediate despite the cache"
    );

    let (s, _, missing) = send(
        &app,
        reqwest::Method::DELETE,
        "/v1/admin/keys/no-such-id",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "not_found");

    let (s, _, audit) = send(
        &app,
        reqwest::Method::GET,
        "/v1/admin/audit?action=key.revoked",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(audit["data"][0]["target"], format!("key:{id}"));
    assert_eq!(audit["data"][0]["trace_id"].as_str().unwrap().len(), 32);
}

#[tokio::test]
async fn bad_key_requests_are_refused_naming_the_problem() {
    let app = with_admin().await;
    let post = |body: &'static str| {
        app.client
            .post(app.url("/v1/admin/keys"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, field) in [
        (r#"{"name": "x", "role": "root"}"#, "role"),
        (r#"{"name": "x", "colour": "red"}"#, ""),
        (r#"{"role": "user"}"#, ""),
        (r#"{"name": ""}"#, "name"),
        (r#"{"name": "x", "expires_at": 1}"#, "expires_at"),
        (
            r#"{"name": "x", "limits": {"rates": {"chat": 5}}}"#,
            "limits.rates.chat",
        ),
        (r#"{"name": "x""#, ""),
    ] {
        let resp = post(body).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_request", "{body}: {v}");
        if !field.is_empty() {
            assert_eq!(v["error"]["details"]["field"], field, "{body}: {v}");
        }
    }
    let small = crate::helpers::app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", "2048")
        .spawn()
        .await;
    let resp = small
        .client
        .post(small.url("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "x".repeat(4096)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    let (s, _, dup) = send(
        &app,
        reqwest::Method::POST,
        "/v1/admin/tenants",
        Some(ADMIN),
        Some(json!({"id": "default"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{dup}");
    assert_eq!(dup["error"]["code"], "conflict");
}

#[tokio::test]
async fn a_service_key_acts_for_a_user_and_a_user_key_cannot() {
    let app = with_admin().await;
    let svc = create_key(&app, ADMIN, json!({"name": "svc", "role": "service"})).await;
    let user = create_key(
        &app,
        ADMIN,
        json!({"name": "u", "role": "user", "user_id": "alice"}),
    )
    .await;
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(svc["key"].as_str().unwrap())
        .header("x-switchyard-user", "bob")
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(user["key"].as_str().unwrap())
        .header("x-switchyard-user", "bob")
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "insufficient_permissions");
    assert_eq!(
        chat_status(&app, user["key"].as_str()).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let app = spawn().await;
    for (method, path) in [
        (reqwest::Method::GET, "/health"),
        (reqwest::Method::GET, "/v1/models"),
        (reqwest::Method::GET, "/no/such/route"),
    ] {
        let (_, h, _) = send(&app, method, path, None, None).await;
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert!(h.contains_key("permissions-policy"));
        assert!(
            !h.contains_key("strict-transport-security"),
            "no HSTS without TLS"
        );
        assert!(
            !h.contains_key("access-control-allow-origin"),
            "no CORS by default"
        );
    }
    let app = crate::helpers::app()
        .config("[security]\nhsts = true\ncors_origins = [\"https://app.example\"]\n")
        .spawn()
        .await;
    let resp = app
        .client
        .get(app.url("/v1/models"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["strict-transport-security"]
        .to_str()
        .unwrap()
        .starts_with("max-age="));
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = app
        .client
        .get(app.url("/v1/models"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}

#[test]
fn the_cli_creates_lists_and_revokes_keys_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"sqlite://{}/s.db\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| cli(&config, args, &[]);
    let (key, note) = run(&[
        "keys", "create", "--name", "ci", "--role", "service", "--tenant", "acme",
    ]);
    let key = key.trim();
    assert!(
        key.starts_with("sy_") && key.len() == 46,
        "stdout is only the key: {key:?}"
    );
    assert!(note.contains("shown only now"));
    let (list, _) = run(&["keys", "list", "--tenant", "acme"]);
    assert!(
        list.contains("service") && list.contains("active") && !list.contains(key),
        "{list}"
    );
    let id = list.split('\t').next().unwrap().to_owned();
    let (out, _) = run(&["keys", "revoke", &id, "--tenant", "acme"]);
    assert!(out.starts_with("revoked"), "{out}");
    let (list, _) = run(&["keys", "list", "--tenant", "acme"]);
    assert!(list.contains("revoked"), "{list}");
    let (again, _) = run(&["keys", "revoke", &id, "--tenant", "acme"]);
    assert!(again.contains("was already revoked at 20"), "{again}");

    // Mistakes are told, with exit code 1, and leave nothing behind.
    let fails = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("SWITCHYARD_ADMIN_KEY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    };
    let err = fails(&["keys", "list", "--tenant", "acmee"]);
    assert!(err.contains("no tenant `acmee`"), "{err}");
    let err = fails(&["keys", "revoke", &id, "--tenant", "default"]);
    assert!(
        err.contains("no key") && err.contains("in tenant `default`"),
        "{err}"
    );
    let err = fails(&[
        "keys",
        "create",
        "--name",
        "x",
        "--tenant",
        "fresh",
        "--expires-in-days",
        "0",
    ]);
    assert!(err.contains("--expires-in-days must be 1 to"), "{err}");
    let err = fails(&["keys", "list", "--tenant", "fresh"]);
    assert!(
        err.contains("no tenant `fresh`"),
        "a refused key made no tenant: {err}"
    );
    // A name or user refused by the key's own rules is refused before the
    // tenant is made, too.
    let long_user = "u".repeat(257);
    for args in [
        &["keys", "create", "--name", "   ", "--tenant", "fresh"][..],
        &[
            "keys", "create", "--name", "ok", "--user", "", "--tenant", "fresh",
        ],
        &[
            "keys", "create", "--name", "ok", "--user", &long_user, "--tenant", "fresh",
        ],
    ] {
        let err = fails(args);
        assert!(err.contains("1 to 2"), "{args:?}: {err}");
        let err = fails(&["keys", "list", "--tenant", "fresh"]);
        assert!(err.contains("no tenant `fresh`"), "{args:?}: {err}");
    }
}

const JWT_SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters";

/// An HS256 token the way Supabase signs them.
fn hs256(claims: Value, secret: &str, alg: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::Mac;
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let input = format!("{header}.{payload}");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    let sig = if alg == "none" {
        String::new()
    } else {
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    };
    format!("{input}.{sig}")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A service token (Supabase's `service_role`, no user of its own) acts for
/// users it names; its requests are counted against the token's subject,
/// not against each named user, or naming a new user on every request would
/// escape every limit.
#[tokio::test]
async fn a_service_token_naming_other_users_stays_within_its_limit() {
    let app = crate::helpers::app()
        .env("SWITCHYARD_JWT__HS256_SECRET", JWT_SECRET)
        .config("[rate_limits.classes]\nchat = \"3/min\"\n")
        .spawn()
        .await;
    let token = hs256(
        json!({"role": "service_role", "aud": "authenticated", "exp": now() + 600, "iat": now() - 10}),
        JWT_SECRET,
        "HS256",
    );
    let mut statuses = Vec::new();
    for user in ["u1", "u2", "u3", "u4", "u5"] {
        let resp = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&token)
            .header("x-switchyard-user", user)
            .json(&chat_body("gpt-4o-mini"))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(app.mock().calls(), 3);
}

/// The audit log names the credential that acted: a token's own subject,
/// not a user the request names in `X-Switchyard-User` (which let an admin
/// token write key creations in another user's name).
#[tokio::test]
async fn the_audit_log_names_the_tokens_subject_not_the_user_it_names() {
    let app = crate::helpers::app()
        .env("SWITCHYARD_JWT__HS256_SECRET", JWT_SECRET)
        .config("[jwt.roles]\nadmin = \"admin\"\n")
        .spawn()
        .await;
    let token = hs256(
        json!({"sub": "real-admin", "role": "admin", "aud": "authenticated", "exp": now() + 600, "iat": now() - 10}),
        JWT_SECRET,
        "HS256",
    );
    let resp = app
        .client
        .post(app.url("/v1/admin/keys"))
        .bearer_auth(&token)
        .header("x-switchyard-user", "innocent-bob")
        .json(&json!({"name": "made by a token"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let key: Value = resp.json().await.unwrap();
    assert_eq!(key["created_by"], "user:real-admin", "{key}");
    let audit: Value =
        crate::helpers::get_json_as(&app, "/v1/admin/audit?action=key.created", &token).await;
    assert_eq!(audit["data"][0]["actor"], "user:real-admin", "{audit}");
}

#[tokio::test]
async fn a_supabase_jwt_authenticates_and_attacks_are_refused() {
    let app = crate::helpers::app()
        .env("SWITCHYARD_JWT__HS256_SECRET", JWT_SECRET)
        .config(
            "[jwt]\naudience = \"authenticated\"\nissuer = \"https://proj.supabase.co/auth/v1\"\n",
        )
        .spawn()
        .await;
    let claims = |exp: i64, aud: &str, role: &str| json!({"sub": "0b7f-user", "role": role, "aud": aud, "iss": "https://proj.supabase.co/auth/v1", "exp": exp, "iat": now() - 10});
    assert_eq!(
        chat_status(&app, None).await,
        StatusCode::UNAUTHORIZED,
        "a JWT issuer ends open development mode"
    );
    let good = hs256(
        claims(now() + 600, "authenticated", "authenticated"),
        JWT_SECRET,
        "HS256",
    );
    assert_eq!(chat_status(&app, Some(&good)).await, StatusCode::OK);

    for (token, code) in [
        (
            hs256(
                claims(now() - 61, "authenticated", "authenticated"),
                JWT_SECRET,
                "HS256",
            ),
            "jwt_expired",
        ),
        (
            hs256(
                claims(now() + 600, "other", "authenticated"),
                JWT_SECRET,
                "HS256",
            ),
            "jwt_wrong_audience",
        ),
        (
            hs256(
                claims(now() + 600, "authenticated", "anon"),
                JWT_SECRET,
                "HS256",
            ),
            "jwt_unmapped_role",
        ),
        (
            hs256(
                claims(now() + 600, "authenticated", "authenticated"),
                "a-different-secret-of-32-characters!",
                "HS256",
            ),
            "jwt_bad_signature",
        ),
        (
            hs256(
                claims(now() + 600, "authenticated", "authenticated"),
                JWT_SECRET,
                "none",
            ),
            "jwt_disallowed_algorithm",
        ),
    ] {
        let (status, _, body) = send(
            &app,
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(&token),
            Some(chat_body("gpt-4o-mini")),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{code}: {body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            !body.to_string().contains(&token),
            "the token is not echoed"
        );
    }
    let logs = app.logs().join("\n");
    assert!(
        !logs.contains(JWT_SECRET) && !logs.contains(&good),
        "no secret or token in the logs"
    );
}

fn sig(secret: &str, ts: i64, target: &str, body: &[u8]) -> String {
    use hmac::Mac;
    use sha2::Digest;
    let message = format!(
        "{ts}.POST.{target}.{}",
        hex_encode(&sha2::Sha256::digest(body))
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    format!("v1={}", hex_encode(&mac.finalize().into_bytes()))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn a_key_that_requires_signing_accepts_only_fresh_correct_unreplayed_signatures() {
    let app = with_admin().await;
    let created = create_key(
        &app,
        ADMIN,
        json!({"name": "signed", "require_signature": true}),
    )
    .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let secret = created["signing_secret"].as_str().unwrap().to_owned();
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini")).unwrap();
    let post = |ts: i64, signature: Option<String>, body: Vec<u8>| {
        let mut req = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("x-timestamp", ts.to_string());
        if let Some(s) = signature {
            req = req.header("x-signature", s);
        }
        async move {
            let resp = req.body(body).send().await.unwrap();
            let status = resp.status();
            let v: Value = resp.json().await.unwrap();
            (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
        }
    };
    let t = now();
    let good = sig(&secret, t, "/v1/chat/completions", &body);
    assert_eq!(
        post(t, Some(good.clone()), body.clone()).await,
        (StatusCode::OK, String::new())
    );
    assert_eq!(
        post(t, Some(good), body.clone()).await,
        (StatusCode::UNAUTHORIZED, "replayed_request".into())
    );
    assert_eq!(
        post(t, None, body.clone()).await,
        (StatusCode::UNAUTHORIZED, "signature_required".into())
    );
    for skew in [-301, 301] {
        let ts = t + skew;
        let s = sig(&secret, ts, "/v1/chat/completions", &body);
        assert_eq!(
            post(ts, Some(s), body.clone()).await,
            (StatusCode::UNAUTHORIZED, "stale_timestamp".into()),
            "{skew}"
        );
    }
    let mut flipped = body.clone();
    let at = flipped.len() - 5;
    flipped[at] ^= 1;
    let s = sig(&secret, t + 1, "/v1/chat/completions", &body);
    assert_eq!(
        post(t + 1, Some(s), flipped).await,
        (StatusCode::UNAUTHORIZED, "invalid_signature".into())
    );
    let rotated = format!(
        "v1={},{}",
        "0".repeat(64),
        sig(&secret, t + 2, "/v1/chat/completions", &body)
    );
    assert_eq!(
        post(t + 2, Some(rotated), body.clone()).await,
        (StatusCode::OK, String::new()),
        "the second v1= value matches"
    );
    assert_eq!(app.mock().calls(), 2);
}

/// One run that uses every kind of secret, at debug level: none of them may
/// appear in any line the server writes.
#[tokio::test]
async fn no_secret_appears_in_the_logs() {
    let app = crate::helpers::app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .env("SWITCHYARD_JWT__HS256_SECRET", JWT_SECRET)
        .env("RUST_LOG", "debug")
        .spawn()
        .await;
    let created = create_key(&app, ADMIN, json!({"name": "s", "require_signature": true})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    let signing = created["signing_secret"].as_str().unwrap().to_owned();
    let plain = create_key(&app, ADMIN, json!({"name": "p"})).await;
    let plain_key = plain["key"].as_str().unwrap().to_owned();
    let token = hs256(
        json!({"sub": "u1", "role": "authenticated", "exp": now() + 600}),
        JWT_SECRET,
        "HS256",
    );
    let expired = hs256(
        json!({"sub": "u1", "role": "authenticated", "exp": now() - 600}),
        JWT_SECRET,
        "HS256",
    );
    assert_eq!(chat_status(&app, Some(&plain_key)).await, StatusCode::OK);
    assert_eq!(chat_status(&app, Some(&token)).await, StatusCode::OK);
    assert_eq!(
        chat_status(&app, Some(&expired)).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        chat_status(&app, Some(&key)).await,
        StatusCode::UNAUTHORIZED
    );
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini")).unwrap();
    let t = now();
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("x-timestamp", t.to_string())
        .header(
            "x-signature",
            sig(&signing, t, "/v1/chat/completions", &body),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The key with its last character changed (one key in 62 ends in `x`).
    let last = if plain_key.ends_with('x') { 'y' } else { 'x' };
    let wrong = format!("{}{last}", &plain_key[..plain_key.len() - 1]);
    assert_ne!(wrong, plain_key);
    assert_eq!(
        chat_status(&app, Some(&wrong)).await,
        StatusCode::UNAUTHORIZED
    );
    let invalidate = send(
        &app,
        reqwest::Method::POST,
        "/v1/admin/auth-cache/invalidate",
        Some(ADMIN),
        Some(json!({"credential": plain_key})),
    )
    .await;
    assert_eq!(invalidate.0, StatusCode::OK);

    let _ = app
        .wait_for_log(|l| l.contains("auth_cache.invalidated"))
        .await;
    let logs = app.logs().join("\n");
    assert!(logs.len() > 1000, "debug logs were captured");
    for (name, secret) in [
        ("admin key", ADMIN),
        ("API key", key.as_str()),
        ("plain key", plain_key.as_str()),
        ("mistyped key", wrong.as_str()),
        ("signing secret", signing.as_str()),
        ("JWT secret", JWT_SECRET),
        ("JWT", token.as_str()),
        ("expired JWT", expired.as_str()),
        ("provider key", switchyard_testkit::app::MOCK_PROVIDER_KEY),
    ] {
        assert!(!logs.contains(secret), "the {name} appears in the logs");
    }
}

/// Instances sharing one SQLite file (in the returned directory) and the
/// test Redis, each with the bootstrap key `admin` and limits too high to
/// refuse the polling of these tests.
struct Shared {
    _dir: tempfile::TempDir,
    db: String,
    redis: String,
}

impl Shared {
    fn new(redis: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}/shared.db", dir.path().display());
        Self {
            _dir: dir,
            db,
            redis,
        }
    }

    async fn spawn(&self, admin: &str) -> TestApp {
        crate::helpers::app()
            .env("SWITCHYARD_ADMIN_KEY", admin)
            .env("SWITCHYARD_STORE__URL", &self.db)
            .env("SWITCHYARD_RATE_LIMITS__REDIS_URL", &self.redis)
            // Polled for up to 5 s: not a rate-limit test.
            .config("[rate_limits.classes]\nchat = \"100000/min\"\nglobal = \"100000/min\"\nadmin = \"100000/min\"\n")
            .spawn()
            .await
    }
}

/// Two instances on one database and one Redis: a key revoked on one stops
/// working on the other (which had it cached) within a few seconds.
#[tokio::test]
async fn a_revocation_reaches_every_instance_through_redis() {
    let Some(redis) = crate::helpers::test_redis_url() else {
        return;
    };
    let shared = Shared::new(redis);
    let a = shared.spawn(ADMIN).await;
    let b = shared.spawn(ADMIN).await;
    let created = create_key(&a, ADMIN, json!({"name": "shared"})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    assert_eq!(
        chat_status(&b, Some(&key)).await,
        StatusCode::OK,
        "B knows the key (and caches it)"
    );
    assert_eq!(chat_status(&b, Some(&key)).await, StatusCode::OK);

    let path = format!("/v1/admin/keys/{}", created["id"].as_str().unwrap());
    let (s, _, _) = send(&a, reqwest::Method::DELETE, &path, Some(ADMIN), None).await;
    assert_eq!(s, StatusCode::OK);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if chat_status(&b, Some(&key)).await == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B still accepts the revoked key after 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `switchyard keys revoke` runs in a process of its own: with Redis it
/// publishes the revocation as a server would, so a running server that has
/// the key cached drops it within seconds, not the cache's 60 s.
#[tokio::test]
async fn a_revocation_by_the_cli_reaches_running_servers_through_redis() {
    let Some(redis) = crate::helpers::test_redis_url() else {
        return;
    };
    let app = crate::helpers::app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .env("SWITCHYARD_RATE_LIMITS__REDIS_URL", &redis)
        // Polled below for up to 5 s: not a rate-limit test.
        .config("[rate_limits.classes]\nchat = \"100000/min\"\nglobal = \"100000/min\"\n")
        .spawn()
        .await;
    let created = create_key(&app, ADMIN, json!({"name": "cached"})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    assert_eq!(chat_status(&app, Some(&key)).await, StatusCode::OK);
    assert_eq!(chat_status(&app, Some(&key)).await, StatusCode::OK);

    let id = created["id"].as_str().unwrap();
    let (_, stderr) = cli(
        &app.config_path,
        &["keys", "revoke", id, "--tenant", "default"],
        &[("SWITCHYARD_RATE_LIMITS__REDIS_URL", &redis)],
    );
    assert!(!stderr.contains("Redis"), "{stderr}");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while chat_status(&app, Some(&key)).await == StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "the server still accepts the revoked key after 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        chat_status(&app, Some(&key)).await,
        StatusCode::UNAUTHORIZED
    );
}

async fn misses(app: &TestApp) -> u64 {
    let (_, _, v) = send(
        app,
        reqwest::Method::GET,
        "/v1/admin/auth-cache",
        Some(ADMIN),
        None,
    )
    .await;
    v["misses"].as_u64().unwrap()
}

/// Polls `accepted` every 50 ms until it is false; fails after 5 s.
async fn within_5s<F, Fut>(what: &str, mut accepted: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while accepted().await {
        assert!(std::time::Instant::now() < deadline, "{what} after 5 s");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A changed `SWITCHYARD_ADMIN_KEY` revokes the old value's key when an
/// instance starts with the new one; the instances already running, which
/// have the old key cached, drop it too (it was published like any
/// revocation), instead of accepting it for the cache's 60 s.
#[tokio::test]
async fn a_rotated_admin_key_stops_working_on_the_running_instances() {
    let Some(redis) = crate::helpers::test_redis_url() else {
        return;
    };
    let shared = Shared::new(redis);
    let running = shared.spawn(ADMIN).await;
    let (s, _, _) = send(
        &running,
        reqwest::Method::GET,
        "/v1/admin/keys",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the old value works, and is cached");

    const ROTATED: &str = "rotated-admin-key-0123456789abcdef0123456789";
    let _new = shared.spawn(ROTATED).await;

    let running_ref = &running;
    within_5s(
        "the running instance still accepts the old admin key",
        move || async move {
            send(
                running_ref,
                reqwest::Method::GET,
                "/v1/admin/keys",
                Some(ADMIN),
                None,
            )
            .await
            .0 != StatusCode::UNAUTHORIZED
        },
    )
    .await;
    let (s, _, _) = send(
        &running,
        reqwest::Method::GET,
        "/v1/admin/keys",
        Some(ROTATED),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

/// `POST /v1/admin/auth-cache/invalidate` on one instance reaches the
/// others' caches too (an operator behind a load balancer cannot choose
/// the instance): the key is looked up again there.
#[tokio::test]
async fn a_cache_invalidation_reaches_every_instance_through_redis() {
    let Some(redis) = crate::helpers::test_redis_url() else {
        return;
    };
    let shared = Shared::new(redis);
    let a = shared.spawn(ADMIN).await;
    let b = shared.spawn(ADMIN).await;
    let created = create_key(&a, ADMIN, json!({"name": "cached"})).await;
    let key = created["key"].as_str().unwrap().to_owned();
    assert_eq!(chat_status(&b, Some(&key)).await, StatusCode::OK);
    assert_eq!(chat_status(&b, Some(&key)).await, StatusCode::OK);
    let before = misses(&b).await;
    assert_eq!(chat_status(&b, Some(&key)).await, StatusCode::OK);
    assert_eq!(misses(&b).await, before, "B serves the key from its cache");

    let (s, _, v) = send(
        &a,
        reqwest::Method::POST,
        "/v1/admin/auth-cache/invalidate",
        Some(ADMIN),
        Some(json!({"credential": key})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    let (b_ref, key_ref) = (&b, key.as_str());
    within_5s(
        "B still serves the key from its cache",
        move || async move {
            assert_eq!(chat_status(b_ref, Some(key_ref)).await, StatusCode::OK);
            misses(b_ref).await == before
        },
    )
    .await;
}

#[tokio::test]
async fn a_role_change_applies_to_the_next_request_and_is_audited() {
    let app = with_admin().await;
    let k = create_key(&app, ADMIN, json!({"name": "grows", "role": "user"})).await;
    let key = k["key"].as_str().unwrap().to_owned();
    let path = format!("/v1/admin/keys/{}", k["id"].as_str().unwrap());
    let (s, _, _) = send(
        &app,
        reqwest::Method::GET,
        "/v1/admin/keys",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "a user key is not an admin (and is now cached)"
    );

    let (s, _, updated) = send(
        &app,
        reqwest::Method::PATCH,
        &path,
        Some(ADMIN),
        Some(json!({"role": "admin", "name": "grown"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{updated}");
    assert_eq!(
        (updated["role"].as_str(), updated["name"].as_str()),
        (Some("admin"), Some("grown"))
    );
    let (s, _, _) = send(
        &app,
        reqwest::Method::GET,
        "/v1/admin/keys",
        Some(&key),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "the cached principal was dropped");

    let (s, _, bad) = send(
        &app,
        reqwest::Method::PATCH,
        &path,
        Some(ADMIN),
        Some(json!({"role": "owner"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(bad["error"]["details"]["field"], "role");
    let (s, _, _) = send(
        &app,
        reqwest::Method::PATCH,
        "/v1/admin/keys/nope",
        Some(ADMIN),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (_, _, audit) = send(
        &app,
        reqwest::Method::GET,
        "/v1/admin/audit?action=key.role_changed",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(
        audit["data"][0]["detail"],
        json!({"from": "user", "to": "admin"})
    );
}
