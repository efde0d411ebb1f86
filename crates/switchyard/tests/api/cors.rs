//! CORS (no origin by default, only the configured ones otherwise, on
//! preflights too) and the security headers on refusals (issue 4, item 8).
//! HSTS is covered by `auth::every_response_carries_the_security_headers`.

use reqwest::{Method, Response};
use serde_json::{json, Value};
use switchyard_testkit::TestApp;

use crate::helpers::{app, chat_body};

const ADMIN: &str = "cors-bootstrap-admin-key-0123456789abcdef012345";

async fn preflight(app: &TestApp, origin: &str) -> Response {
    app.client
        .request(Method::OPTIONS, app.url("/v1/chat/completions"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

async fn from(app: &TestApp, origin: &str, key: Option<&str>) -> Response {
    let mut req = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("origin", origin)
        .json(&chat_body("gpt-4o-mini"));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

fn allows(resp: &Response) -> Option<&str> {
    resp.headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn without_configured_origins_no_origin_is_allowed_not_even_on_a_preflight() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;

    let pre = preflight(&app, "https://evil.example").await;
    let ok = from(&app, "https://evil.example", Some(ADMIN)).await;
    let refused = from(&app, "https://evil.example", None).await;

    assert_eq!(ok.status(), 200, "the request itself is served");
    assert_eq!(refused.status(), 401);
    for resp in [&pre, &ok, &refused] {
        assert_eq!(allows(resp), None, "{}", resp.status());
        assert!(
            !resp
                .headers()
                .keys()
                .any(|k| k.as_str().starts_with("access-control-")),
            "{:?}",
            resp.headers()
        );
    }
}

#[tokio::test]
async fn a_configured_origin_is_allowed_and_another_is_not_on_preflights_and_refusals() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config("[security]\ncors_origins = [\"https://app.example\"]\n")
        .spawn()
        .await;

    let pre = preflight(&app, "https://app.example").await;
    assert!(pre.status().is_success(), "{}", pre.status());
    assert_eq!(allows(&pre), Some("https://app.example"));
    // Answered by the CORS layer itself, it still carries them.
    assert_security_headers(&pre, "preflight");
    let methods = pre.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods == "*" || methods.contains("POST"), "{methods}");
    // `*` would not cover Authorization (Fetch: it must be named).
    let headers = pre.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{headers}"
    );
    let ok = from(&app, "https://app.example", Some(ADMIN)).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(allows(&ok), Some("https://app.example"));
    // A refusal is readable by the allowed page too, so it can show why.
    let refused = from(&app, "https://app.example", None).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(allows(&refused), Some("https://app.example"));

    for origin in [
        "https://evil.example",
        "https://app.example.evil.example",
        "http://app.example",
    ] {
        let pre = preflight(&app, origin).await;
        assert_eq!(allows(&pre), None, "preflight from {origin}");
        let resp = from(&app, origin, Some(ADMIN)).await;
        assert_eq!(allows(&resp), None, "request from {origin}");
    }
}

fn assert_security_headers(resp: &Response, what: &str) {
    let h = resp.headers();
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["x-frame-options"], "DENY", "{what}");
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
    assert!(
        h.get("permissions-policy")
            .is_some_and(|v| v.to_str().unwrap().contains("camera=()")),
        "{what}"
    );
}

async fn code(resp: Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn refusals_carry_the_security_headers_too() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", "2048")
        .config("[rate_limits]\nauth_failures = \"1/hour\"\n")
        .spawn()
        .await;
    let post = |path: &str, key: Option<&str>, body: Value| {
        let mut req = app.client.post(app.url(path)).json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    let created: Value = post(
        "/v1/admin/keys",
        Some(ADMIN),
        json!({"name": "tight", "limits": {"rates": {"chat": "1/min"}}}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let tight = created["key"].as_str().unwrap().to_owned();
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(4096)}]});

    let missing = post("/v1/chat/completions", None, chat_body("gpt-4o-mini"))
        .await
        .unwrap();
    let too_large = post("/v1/chat/completions", Some(ADMIN), big.clone())
        .await
        .unwrap();
    let too_large_native = post("/v1/sessions", Some(ADMIN), big).await.unwrap();
    assert_eq!(
        post(
            "/v1/chat/completions",
            Some(&tight),
            chat_body("gpt-4o-mini")
        )
        .await
        .unwrap()
        .status(),
        200
    );
    let limited = post(
        "/v1/chat/completions",
        Some(&tight),
        chat_body("gpt-4o-mini"),
    )
    .await
    .unwrap();
    let bad = "sy_0000000000000000000000000000000000000000000";
    let invalid = post("/v1/chat/completions", Some(bad), chat_body("gpt-4o-mini"))
        .await
        .unwrap();
    let blocked = post("/v1/chat/completions", Some(bad), chat_body("gpt-4o-mini"))
        .await
        .unwrap();

    for (resp, status, expected) in [
        (missing, 401, ""),
        (invalid, 401, "invalid_api_key"),
        (too_large, 413, "request_too_large"),
        (too_large_native, 413, "request_too_large"),
        (limited, 429, "rate_limit_exceeded"),
        (blocked, 429, "too_many_auth_failures"),
    ] {
        assert_eq!(resp.status(), status, "{expected}");
        assert_security_headers(&resp, expected);
        assert_eq!(code(resp).await, expected);
    }
}
