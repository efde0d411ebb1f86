//! Bad input on the routes whose refusals other modules check by status
//! only: each case asserts the status and the whole error body (code,
//! message, details), in the native shape `{"error":{"code","message",
//! "details"}}` or in the shape of the API the route imitates.
use reqwest::{Method, Response};
use serde_json::{json, Value};
use switchyard_testkit::TestApp;

use crate::helpers::{app, chat_body};

const ADMIN: &str = "bad-input-admin-key-0123456789abcdef0123456789";
const LIMIT: usize = 2048;

/// The message of a 413 at [`LIMIT`].
fn too_large() -> String {
    format!("The request body is larger than this server accepts ({LIMIT} bytes).")
}

async fn spawn() -> TestApp {
    app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", &LIMIT.to_string())
        .spawn()
        .await
}

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Response {
    let mut r = app.client.request(method, app.url(path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.json(b);
    }
    r.send().await.unwrap()
}

/// Asserts a native error with this status, code and message (or message
/// prefix ending in `…`); returns `details`.
async fn native(resp: Response, status: u16, code: &str, message: &str) -> Value {
    let s = resp.status().as_u16();
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    let text = resp.text().await.unwrap();
    assert_eq!(s, status, "{text}");
    assert_eq!(ct, "application/json", "{text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let err = v["error"].as_object().unwrap_or_else(|| panic!("{text}"));
    assert_eq!(err.len(), 3, "code, message and details only: {text}");
    assert_eq!(err["code"], code, "{text}");
    let m = err["message"].as_str().unwrap();
    match message.strip_suffix('…') {
        Some(prefix) => assert!(m.starts_with(prefix), "{text}"),
        None => assert_eq!(m, message, "{text}"),
    }
    err["details"].clone()
}

/// `GET path` as the admin, as JSON.
async fn admin_get(app: &TestApp, path: &str) -> Value {
    let resp = send(app, Method::GET, path, Some(ADMIN), None).await;
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

/// [`native`], with empty `details`.
async fn native_empty(resp: Response, status: u16, code: &str, message: &str) {
    let d = native(resp, status, code, message).await;
    assert_eq!(d, json!({}), "{code}");
}

/// A key of the default tenant with this role; returns (id, key).
async fn key(app: &TestApp, role: &str) -> (String, String) {
    let resp = send(
        app,
        Method::POST,
        "/v1/admin/keys",
        Some(ADMIN),
        Some(&json!({"name": role, "role": role})),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    (
        v["id"].as_str().unwrap().to_owned(),
        v["key"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn the_admin_routes_refuse_other_roles_with_the_native_403() {
    let app = spawn().await;
    let (_, user) = key(&app, "user").await;
    let (_, service) = key(&app, "service").await;
    for k in [&user, &service] {
        for (method, path, body) in [
            (Method::GET, "/v1/admin/keys", None),
            (Method::GET, "/v1/admin/providers", None),
            (Method::GET, "/v1/admin/audit", None),
            (
                Method::POST,
                "/v1/admin/auth-cache/invalidate",
                Some(json!({"all": true})),
            ),
            (
                Method::POST,
                "/v1/admin/rate-limits/reset",
                Some(json!({"user_id": "u"})),
            ),
        ] {
            native_empty(
                send(&app, method, path, Some(k), body.as_ref()).await,
                403,
                "insufficient_permissions",
                "This route needs an admin key.",
            )
            .await;
        }
    }
}

#[tokio::test]
async fn admin_key_routes_answer_a_bad_query_string_in_the_native_shape() {
    let app = spawn().await;
    let (id, _) = key(&app, "user").await;
    let dup = "tenant_id=default&tenant_id=other";
    let cases = [
        (Method::GET, format!("/v1/admin/keys?{dup}"), None),
        (
            Method::PATCH,
            format!("/v1/admin/keys/{id}?{dup}"),
            Some(json!({"name": "n"})),
        ),
        (Method::DELETE, format!("/v1/admin/keys/{id}?{dup}"), None),
        // A misspelt parameter is refused, not ignored (which would act on
        // the caller's own tenant).
        (Method::GET, "/v1/admin/keys?tenant=other".to_owned(), None),
        (
            Method::DELETE,
            format!("/v1/admin/keys/{id}?tenantid=other"),
            None,
        ),
        // Routes that read their tenant from the body refuse a query too,
        // rather than making the key in the caller's own tenant.
        (
            Method::POST,
            "/v1/admin/keys?tenant=other".to_owned(),
            Some(json!({"name": "n", "role": "admin"})),
        ),
        (
            Method::POST,
            "/v1/admin/rate-limits/reset?tenant=other".to_owned(),
            Some(json!({"user_id": "u"})),
        ),
        (Method::GET, "/v1/admin/tenants?limit=5".to_owned(), None),
        (Method::GET, "/v1/admin/auth-cache?x=1".to_owned(), None),
        (
            Method::POST,
            "/v1/admin/auth-cache/invalidate?x=1".to_owned(),
            Some(json!({"all": true})),
        ),
    ];
    for (method, path, body) in cases {
        native(
            send(&app, method, &path, Some(ADMIN), body.as_ref()).await,
            400,
            "invalid_request",
            "Invalid query string: …",
        )
        .await;
    }
    // Nothing was revoked by the refused DELETEs.
    let list: Value = admin_get(&app, "/v1/admin/keys").await;
    let k = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(k["active"], true, "{k}");
    // No key was made by the refused POST.
    assert_eq!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["name"] == "n")
            .count(),
        0
    );
}

/// `POST /v1/admin/keys?tenant_id=T` makes the key in T (it made it in the
/// caller's own tenant: an operator's admin key, for an operator); a query
/// and a body naming different tenants are refused.
#[tokio::test]
async fn a_key_is_made_in_the_tenant_its_query_names() {
    let app = spawn().await;
    let tenant = send(
        &app,
        Method::POST,
        "/v1/admin/tenants",
        Some(ADMIN),
        Some(&json!({"id": "tb"})),
    )
    .await;
    assert_eq!(tenant.status(), 201);
    let made = send(
        &app,
        Method::POST,
        "/v1/admin/keys?tenant_id=tb",
        Some(ADMIN),
        Some(&json!({"name": "tb admin", "role": "admin"})),
    )
    .await;
    assert_eq!(made.status(), 201);
    let made: Value = made.json().await.unwrap();
    assert_eq!(made["tenant_id"], "tb", "{made}");
    let both = send(
        &app,
        Method::POST,
        "/v1/admin/keys?tenant_id=tb",
        Some(ADMIN),
        Some(&json!({"name": "x", "tenant_id": "default"})),
    )
    .await;
    assert_eq!(both.status(), 400);
    let body: Value = both.json().await.unwrap();
    assert_eq!(body["error"]["details"]["field"], "tenant_id", "{body}");

    // Listing the keys of a tenant that does not exist says so, as making
    // one there does, rather than listing none.
    for (method, body) in [
        (Method::GET, None),
        (Method::POST, Some(json!({"name": "x"}))),
    ] {
        let resp = send(
            &app,
            method.clone(),
            "/v1/admin/keys?tenant_id=tbb",
            Some(ADMIN),
            body.as_ref(),
        )
        .await;
        assert_eq!(resp.status(), 404, "{method}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{body}");
    }
}

#[tokio::test]
async fn oversized_bodies_get_the_native_413_on_every_native_body_route() {
    let app = spawn().await;
    let (id, _) = key(&app, "user").await;
    let (bot_id, sid) = bot_and_session(&app).await;
    let big = "x".repeat(LIMIT * 2);
    let cases = [
        (
            Method::PATCH,
            format!("/v1/bots/{bot_id}"),
            json!({"name": big}),
        ),
        (
            Method::PATCH,
            format!("/v1/sessions/{sid}/state"),
            json!({"state": {"k": big}}),
        ),
        (
            Method::POST,
            "/functions/v1/chat".to_owned(),
            json!({"session_id": sid, "content": big}),
        ),
        (
            Method::PATCH,
            format!("/v1/admin/keys/{id}"),
            json!({"name": big}),
        ),
        (
            Method::POST,
            "/v1/admin/tenants".to_owned(),
            json!({"id": "t", "name": big}),
        ),
        (
            Method::POST,
            "/v1/admin/auth-cache/invalidate".to_owned(),
            json!({"credential": big}),
        ),
        (
            Method::POST,
            "/v1/admin/rate-limits/reset".to_owned(),
            json!({"user_id": big}),
        ),
    ];
    for (method, path, body) in cases {
        native_empty(
            send(&app, method, &path, Some(ADMIN), Some(&body)).await,
            413,
            "request_too_large",
            &too_large(),
        )
        .await;
    }
    // Nothing of the refused bodies landed.
    let b: Value = admin_get(&app, &format!("/v1/bots/{bot_id}")).await;
    assert_eq!(b["name"], "b");
    let t = send(&app, Method::GET, "/v1/admin/tenants", Some(ADMIN), None)
        .await
        .text()
        .await
        .unwrap();
    assert!(!t.contains("\"t\""), "{t}");
}

#[tokio::test]
async fn the_messages_api_refuses_an_oversized_body_in_anthropic_shape() {
    let app = spawn().await;
    let body = json!({
        "model": "gpt-4o-mini",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "x".repeat(LIMIT * 2)}],
    });
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let resp = send(&app, Method::POST, path, Some(ADMIN), Some(&body)).await;
        assert_eq!(resp.status(), 413, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {
                "type": "request_too_large",
                "message": too_large(),
            }}),
            "{path}"
        );
    }
}

#[tokio::test]
async fn count_tokens_refuses_malformed_and_ill_typed_bodies_in_anthropic_shape() {
    let app = spawn().await;
    let malformed = app
        .client
        .post(app.url("/v1/messages/count_tokens"))
        .bearer_auth(ADMIN)
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    let ill_typed = send(
        &app,
        Method::POST,
        "/v1/messages/count_tokens",
        Some(ADMIN),
        Some(&json!({"model": "gpt-4o-mini", "messages": "hi"})),
    )
    .await;

    for (resp, says) in [
        (malformed, "JSON"),
        (ill_typed, "messages: Input should be a valid list"),
    ] {
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    assert_eq!(app.mock().calls(), 0);
}

#[tokio::test]
async fn invalidate_and_reset_bodies_are_checked_whole() {
    let app = spawn().await;
    let (id, _) = key(&app, "user").await;
    let post = |path: &'static str, body: Value| {
        let app = &app;
        async move { send(app, Method::POST, path, Some(ADMIN), Some(&body)).await }
    };
    let one_of = "Give exactly one of `all: true`, `key_id` or `credential`.";
    for body in [json!({}), json!({"all": true, "key_id": "x"})] {
        native_empty(
            post("/v1/admin/auth-cache/invalidate", body).await,
            400,
            "invalid_request",
            one_of,
        )
        .await;
    }
    let d = native(
        post(
            "/v1/admin/auth-cache/invalidate",
            json!({"everything": true}),
        )
        .await,
        400,
        "invalid_request",
        "…",
    )
    .await;
    assert_eq!(d["field"], "everything");

    let d = native(
        post(
            "/v1/admin/rate-limits/reset",
            json!({"key_id": id, "user_id": "u"}),
        )
        .await,
        400,
        "invalid_request",
        "give exactly one of `key_id` or `user_id`",
    )
    .await;
    assert_eq!(d["field"], "key_id");
    native_empty(
        post("/v1/admin/rate-limits/reset", json!({"key_id": "nope"})).await,
        404,
        "not_found",
        "No such key.",
    )
    .await;
}

#[tokio::test]
async fn tenant_and_key_edits_name_the_bad_field_and_the_missing_thing() {
    let app = spawn().await;
    let tenants = |body: Value| {
        let app = &app;
        async move {
            send(
                app,
                Method::POST,
                "/v1/admin/tenants",
                Some(ADMIN),
                Some(&body),
            )
            .await
        }
    };
    let d = native(
        tenants(json!({"id": "bad id!"})).await,
        400,
        "invalid_request",
        "a tenant id is 1 to 64 letters, digits, `-` or `_`",
    )
    .await;
    assert_eq!(d["field"], "id");
    let d = native(
        tenants(json!({"id": "t", "monthly_budget_usd": -1})).await,
        400,
        "invalid_request",
        "…",
    )
    .await;
    assert_eq!(d["field"], "monthly_budget_usd");
    let resp = app
        .client
        .post(app.url("/v1/admin/tenants"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{\"id\":")
        .send()
        .await
        .unwrap();
    native(resp, 400, "invalid_request", "The body is not valid JSON…").await;

    native_empty(
        send(
            &app,
            Method::PATCH,
            "/v1/admin/keys/nope",
            Some(ADMIN),
            Some(&json!({"name": "n"})),
        )
        .await,
        404,
        "not_found",
        "No such key.",
    )
    .await;
    let (id, _) = key(&app, "user").await;
    let d = native(
        send(
            &app,
            Method::PATCH,
            &format!("/v1/admin/keys/{id}"),
            Some(ADMIN),
            Some(&json!({"role": "owner"})),
        )
        .await,
        400,
        "invalid_request",
        "…",
    )
    .await;
    assert_eq!(d["field"], "role");
    native_empty(
        send(
            &app,
            Method::DELETE,
            &format!("/v1/admin/keys/{id}?tenant_id=no-such-tenant"),
            Some(ADMIN),
            None,
        )
        .await,
        404,
        "not_found",
        "No such key.",
    )
    .await;
}

#[tokio::test]
async fn a_bad_acting_user_header_is_refused_in_each_apis_shape() {
    let app = spawn().await;
    let long = "u".repeat(257);
    for user in ["", long.as_str()] {
        let resp = app
            .client
            .post(app.url("/v1/sessions"))
            .bearer_auth(ADMIN)
            .header("x-switchyard-user", user)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        native_empty(
            resp,
            400,
            "invalid_user",
            "`x-switchyard-user` must name a user (1 to 256 bytes).",
        )
        .await;
        let resp = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(ADMIN)
            .header("x-switchyard-user", user)
            .json(&chat_body("gpt-4o-mini"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_user", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"].as_object().unwrap().contains_key("param"), "{v}");
    }
}

#[tokio::test]
async fn a_user_key_acting_for_someone_else_is_refused_in_anthropic_shape() {
    let app = spawn().await;
    let (_, user) = key(&app, "user").await;
    let resp = app
        .client
        .post(app.url("/v1/messages"))
        .bearer_auth(&user)
        .header("x-switchyard-user", "bob")
        .json(&json!({
            "model": "gpt-4o-mini",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {
            "type": "permission_error",
            "message": "Only a service or admin key may act for a user (`x-switchyard-user`).",
        }})
    );
}

#[tokio::test]
async fn a_missing_or_unknown_key_gets_the_401_body_of_each_api() {
    let app = spawn().await;
    let bad = format!("sy_{}", "0".repeat(43));
    for path in ["/v1/embeddings", "/v1/models"] {
        let method = if path == "/v1/models" {
            Method::GET
        } else {
            Method::POST
        };
        let body = json!({"model": "text-embedding-3-small", "input": "x"});
        let resp = send(&app, method.clone(), path, None, Some(&body)).await;
        assert_eq!(resp.status(), 401, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("You didn't provide an API key"),
            "{v}"
        );
    }
    for (method, path, body) in [
        (Method::DELETE, "/v1/users/u", None),
        (
            Method::POST,
            "/functions/v1/chat",
            Some(json!({"session_id": "s", "content": "hi"})),
        ),
        (Method::POST, "/v1/admin/tenants", Some(json!({"id": "t"}))),
    ] {
        native_empty(
            send(&app, method, path, Some(&bad), body.as_ref()).await,
            401,
            "invalid_api_key",
            "Incorrect API key provided. It may be mistyped, revoked or expired.",
        )
        .await;
    }
}

/// A bot and a session of the default tenant; returns (bot id, session id).
async fn bot_and_session(app: &TestApp) -> (String, String) {
    let bot: Value = send(
        app,
        Method::POST,
        "/v1/bots",
        Some(ADMIN),
        Some(&json!({"name": "b", "model": "gpt-4o-mini"})),
    )
    .await
    .json()
    .await
    .unwrap();
    let session: Value = send(
        app,
        Method::POST,
        "/v1/sessions",
        Some(ADMIN),
        Some(&json!({"bot_id": bot["id"], "user_id": "u1"})),
    )
    .await
    .json()
    .await
    .unwrap();
    (
        bot["id"].as_str().unwrap().to_owned(),
        session["id"].as_str().unwrap().to_owned(),
    )
}

/// `POST path` asking for the reply as JSON.
async fn say(app: &TestApp, path: &str, body: &Value) -> Response {
    app.client
        .post(app.url(path))
        .bearer_auth(ADMIN)
        .header("accept", "application/json")
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_chat_function_path_refuses_a_reused_key_and_a_deleted_bot() {
    let app = spawn().await;
    let (bot, sid) = bot_and_session(&app).await;
    let first = say(
        &app,
        "/functions/v1/chat",
        &json!({"session_id": sid, "content": "a", "idempotency_key": "k-1"}),
    )
    .await;
    assert_eq!(first.status(), 200);
    let d = native(
        say(
            &app,
            "/functions/v1/chat",
            &json!({"session_id": sid, "content": "b", "idempotency_key": "k-1"}),
        )
        .await,
        422,
        "idempotency_key_reused",
        "This Idempotency-Key was used with a different request body.",
    )
    .await;
    assert_eq!(d, json!({"header": "idempotency-key"}));

    let gone = send(
        &app,
        Method::DELETE,
        &format!("/v1/bots/{bot}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(gone.status(), 200);
    native_empty(
        say(
            &app,
            "/functions/v1/chat",
            &json!({"session_id": sid, "content": "c"}),
        )
        .await,
        409,
        "bot_deleted",
        "The session's bot was deleted; start a new session.",
    )
    .await;
    // Only the first message and its reply were stored.
    let list: Value = admin_get(&app, &format!("/v1/sessions/{sid}/messages")).await;
    let contents: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["a"], "{list}");
}

#[tokio::test]
async fn a_retired_path_refuses_bad_input_with_its_deprecation_headers() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", &LIMIT.to_string())
        .config(
            "[[sessions.retired_paths]]\npath = \"/functions/v1/chatting\"\nsunset = \"2999-01-01\"\n",
        )
        .spawn()
        .await;
    let (_, sid) = bot_and_session(&app).await;
    let path = "/functions/v1/chatting";
    let check = |resp: &Response| {
        assert_eq!(resp.headers()["sunset"], "Tue, 01 Jan 2999 00:00:00 GMT");
        assert_eq!(
            resp.headers()["link"],
            "</functions/v1/chat>; rel=\"successor-version\""
        );
    };
    let resp = say(&app, path, &json!({"content": "hi"})).await;
    check(&resp);
    let d = native(resp, 400, "invalid_request", "…").await;
    assert_eq!(d["field"], "session_id");

    let resp = say(
        &app,
        path,
        &json!({"session_id": sid, "content": "x".repeat(LIMIT * 2)}),
    )
    .await;
    check(&resp);
    native(resp, 413, "request_too_large", &too_large()).await;

    let first = say(
        &app,
        path,
        &json!({"session_id": sid, "content": "a", "idempotency_key": "k-2"}),
    )
    .await;
    assert_eq!(first.status(), 200);
    let resp = say(
        &app,
        path,
        &json!({"session_id": sid, "content": "b", "idempotency_key": "k-2"}),
    )
    .await;
    check(&resp);
    native(resp, 422, "idempotency_key_reused", "…").await;
}

#[tokio::test]
async fn resuming_events_refuses_a_bad_query_string_natively() {
    let app = spawn().await;
    let (_, sid) = bot_and_session(&app).await;
    let m: Value = say(
        &app,
        &format!("/v1/sessions/{sid}/messages"),
        &json!({"content": "hi"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let mid = m["id"].as_str().unwrap();
    for q in ["last_event_id=abc", "foo=1"] {
        native(
            send(
                &app,
                Method::GET,
                &format!("/v1/sessions/{sid}/messages/{mid}/events?{q}"),
                Some(ADMIN),
                None,
            )
            .await,
            400,
            "invalid_request",
            "Invalid query string: …",
        )
        .await;
    }
}

/// A path or query string that is not UTF-8, or holds a NUL, once decoded:
/// 400 in the route's own error shape (not the router's plain text, and no
/// NUL reaching the database).
#[tokio::test]
async fn a_path_or_query_that_is_not_utf8_or_holds_a_nul_is_400_in_shape() {
    let app = spawn().await;
    const WHY: &str = "The request's path or query string is not valid UTF-8, or holds a NUL (`%00`), once its %-escapes are decoded.";
    for path in [
        "/v1/bots/%FF",
        "/v1/sessions/a%00b",
        "/v1/sessions?cursor=%00",
        "/v1/traces/%C3%28",
    ] {
        let resp = send(&app, Method::GET, path, Some(ADMIN), None).await;
        native_empty(resp, 400, "invalid_url", WHY).await;
    }
    let resp = send(
        &app,
        Method::POST,
        "/v1/chat/completions?x=%FF",
        Some(ADMIN),
        Some(&chat_body("gpt-4o-mini")),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["error"]["code"].as_str(), v["error"]["type"].as_str()),
        (Some("invalid_url"), Some("invalid_request_error"))
    );
    let resp = send(
        &app,
        Method::POST,
        "/v1/messages/%FF",
        Some(ADMIN),
        Some(&json!({})),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    // Escapes that decode to UTF-8 are fine: an unknown bot, as ever.
    let resp = send(&app, Method::GET, "/v1/bots/caf%C3%A9", Some(ADMIN), None).await;
    assert_eq!(resp.status(), 404);
}

/// A revoked key is final: changing it is a conflict, not a 200 with an
/// audited role change of a dead key.
#[tokio::test]
async fn a_revoked_key_cannot_be_changed() {
    let app = spawn().await;
    let (id, _) = key(&app, "service").await;
    let path = format!("/v1/admin/keys/{id}");
    let revoked = send(&app, Method::DELETE, &path, Some(ADMIN), None).await;
    assert_eq!(revoked.status(), 200);
    native_empty(
        send(
            &app,
            Method::PATCH,
            &path,
            Some(ADMIN),
            Some(&json!({"role": "admin"})),
        )
        .await,
        409,
        "conflict",
        "This key is revoked; a revoked key cannot be changed.",
    )
    .await;
}

/// Two changes sent at once both land: neither is undone by the other's
/// copy of what it read (a demotion reverted by a rename).
#[tokio::test]
async fn concurrent_key_changes_both_apply() {
    let app = spawn().await;
    for round in 0..10 {
        let (id, _) = key(&app, "admin").await;
        let path = format!("/v1/admin/keys/{id}");
        let name = format!("renamed {round}");
        let (demote, rename) = (json!({"role": "user"}), json!({"name": name}));
        let (a, b) = tokio::join!(
            send(&app, Method::PATCH, &path, Some(ADMIN), Some(&demote)),
            send(&app, Method::PATCH, &path, Some(ADMIN), Some(&rename)),
        );
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
        let list = admin_get(&app, "/v1/admin/keys").await;
        let k = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .unwrap()
            .clone();
        assert_eq!(
            (k["role"].as_str(), k["name"].as_str()),
            (Some("user"), Some(name.as_str())),
            "round {round}"
        );
    }
}

/// Key fields outside what a request could use are refused by name; an
/// audit cursor that no page gave is refused rather than giving a wrong page.
#[tokio::test]
async fn key_fields_and_audit_cursors_out_of_range_are_refused_by_field() {
    let app = spawn().await;
    for (body, field) in [
        (json!({"name": "n", "user_id": ""}), "user_id"),
        (json!({"name": "n", "user_id": "u".repeat(257)}), "user_id"),
        (json!({"name": "n", "expires_at": i64::MAX}), "expires_at"),
        (
            json!({"name": "n", "expires_at": 253_402_300_800i64}),
            "expires_at",
        ),
    ] {
        let d = native(
            send(
                &app,
                Method::POST,
                "/v1/admin/keys",
                Some(ADMIN),
                Some(&body),
            )
            .await,
            400,
            "invalid_request",
            "…",
        )
        .await;
        assert_eq!(d["field"], field, "{body}");
    }
    for cursor in ["", "zzzz", "0190A2B3-0000-7000-8000-000000000000"] {
        let path = format!("/v1/admin/audit?cursor={cursor}");
        let d = native(
            send(&app, Method::GET, &path, Some(ADMIN), None).await,
            400,
            "invalid_request",
            "`cursor` …",
        )
        .await;
        assert_eq!(d["field"], "cursor", "{cursor:?}");
    }
    // A cursor a page gave is taken.
    let page = admin_get(&app, "/v1/admin/audit?limit=1").await;
    if let Some(next) = page["next_cursor"].as_str() {
        admin_get(&app, &format!("/v1/admin/audit?cursor={next}")).await;
    }
}

/// Every native body is a JSON object: an array was read into a struct's
/// fields by position, so `["name", "admin"]` made an admin key.
#[tokio::test]
async fn a_native_body_that_is_not_an_object_is_refused() {
    let app = crate::helpers::app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .spawn()
        .await;
    for (path, body) in [
        ("/v1/admin/keys", r#"["arr-key", "admin"]"#),
        ("/v1/admin/tenants", r#"["t"]"#),
        ("/v1/bots", r#"["b", "gpt-4o-mini"]"#),
        ("/v1/admin/keys", "42"),
    ] {
        let resp = app
            .client
            .post(app.url(path))
            .bearer_auth(ADMIN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            reqwest::StatusCode::BAD_REQUEST,
            "{path} {body}"
        );
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            v["error"]["message"], "The body must be a JSON object.",
            "{v}"
        );
    }
    let keys: serde_json::Value = app
        .client
        .get(app.url("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        keys["data"].as_array().unwrap().len(),
        1,
        "only the bootstrap key: {keys}"
    );
}
