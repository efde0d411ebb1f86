//! The native conversation API on the real binary: bots, sessions, replies
//! as JSON, state, traces, tenancy and roles, data rights, and the Supabase
//! function paths (current and retired).

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response};
use serde_json::{json, Value};
use switchyard_testkit::mock::Fault;
use switchyard_testkit::TestApp;

use crate::helpers::{app, app_store, chat_body, metric, spawn, BIN};

const ADMIN: &str = "sessions-bootstrap-admin-key-0123456789abcdef01";
const REPLY: &str = "Hello! How can I help you today?";
/// A second model alias, without pricing.
const OTHER_MODEL: &str = "[models.other]\nprovider = \"mock\"\nmodel = \"other-upstream\"\n";
const FAST_EVENTS: &str = "[events]\nflush_interval_ms = 20\n";

/// A caller: a key (none in open development mode) and the user it acts for.
#[derive(Clone)]
struct Api<'a> {
    app: &'a TestApp,
    key: Option<String>,
    user: Option<String>,
}

impl<'a> Api<'a> {
    fn open(app: &'a TestApp) -> Self {
        Self {
            app,
            key: None,
            user: None,
        }
    }

    fn key(app: &'a TestApp, key: &str) -> Self {
        Self {
            app,
            key: Some(key.to_owned()),
            user: None,
        }
    }

    /// The same key, acting for `user` (`x-switchyard-user`).
    fn acting_for(&self, user: &str) -> Self {
        Self {
            user: Some(user.to_owned()),
            ..self.clone()
        }
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        let mut r = self.app.client.request(method, self.app.url(path));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        if let Some(u) = &self.user {
            r = r.header("x-switchyard-user", u);
        }
        r
    }

    async fn get(&self, path: &str) -> Response {
        self.req(Method::GET, path).send().await.unwrap()
    }

    async fn delete(&self, path: &str) -> Response {
        self.req(Method::DELETE, path).send().await.unwrap()
    }

    async fn post(&self, path: &str, body: &Value) -> Response {
        self.req(Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn patch(&self, path: &str, body: &Value) -> Response {
        self.req(Method::PATCH, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// A body that is not JSON (or not valid JSON).
    async fn raw(&self, method: Method, path: &str, body: &str) -> Response {
        self.req(method, path)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// `POST /v1/sessions/{id}/messages` asking for the final message as JSON.
    async fn say(&self, session_id: &str, body: &Value) -> Response {
        self.req(Method::POST, &format!("/v1/sessions/{session_id}/messages"))
            .header("accept", "application/json")
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Sends `content` and returns the completed assistant message.
    async fn reply(&self, session_id: &str, content: &str) -> Value {
        let m = ok(
            self.say(session_id, &json!({"content": content})).await,
            200,
        )
        .await;
        assert_eq!(m["status"], "complete", "{m}");
        m
    }

    async fn create_bot(&self, body: Value) -> Value {
        ok(self.post("/v1/bots", &body).await, 201).await
    }

    async fn create_session(&self, body: Value) -> Value {
        ok(self.post("/v1/sessions", &body).await, 201).await
    }

    /// A trace once its last event (`request.done` or `request.error`) is
    /// stored: events go through a batched writer.
    async fn finished_trace(&self, trace_id: &str) -> Value {
        let path = format!("/v1/traces/{trace_id}");
        for _ in 0..250 {
            let resp = self.get(&path).await;
            if resp.status() == 200 {
                let t: Value = resp.json().await.unwrap();
                let last = t["data"].as_array().unwrap().last().unwrap()["kind"].clone();
                if last == "request.done" || last == "request.error" {
                    return t;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the trace {trace_id} never finished");
    }
}

/// Asserts the status and returns the JSON body.
async fn ok(resp: Response, status: u16) -> Value {
    let s = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(s, status, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Asserts a native error (`{"error":{"code","message","details"}}`) with
/// this status and code; returns the `error` object.
async fn native_error(resp: Response, status: u16, code: &str) -> Value {
    let s = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    assert_eq!(s, status, "{text}");
    assert_eq!(ct.as_deref(), Some("application/json"), "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let err = &body["error"];
    let mut keys: Vec<_> = err.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["code", "details", "message"], "{text}");
    assert_eq!(err["code"], code, "{text}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{text}"
    );
    assert!(err["details"].is_object(), "{text}");
    err.clone()
}

/// A 400 `invalid_request` naming `field`.
async fn invalid(resp: Response, field: &str) -> Value {
    let err = native_error(resp, 400, "invalid_request").await;
    assert_eq!(err["details"]["field"], field, "{err}");
    err
}

/// A bot asking for more completion tokens than the server allows would
/// have every reply refused: it is refused itself, when made or changed.
#[tokio::test]
async fn a_bot_above_the_servers_max_tokens_is_refused() {
    let app = app().config("[security]\nmax_tokens = 100\n").spawn().await;
    let api = Api::open(&app);
    let err = invalid(
        api.post(
            "/v1/bots",
            &json!({"name": "b", "model": "gpt-4o-mini", "max_tokens": 5000}),
        )
        .await,
        "max_tokens",
    )
    .await;
    assert!(
        err["message"].as_str().unwrap().contains("limit of 100"),
        "{err}"
    );
    let bot: Value = api
        .post(
            "/v1/bots",
            &json!({"name": "b", "model": "gpt-4o-mini", "max_tokens": 100}),
        )
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/v1/bots/{}", id(&bot));
    invalid(
        api.patch(&path, &json!({"max_tokens": 101})).await,
        "max_tokens",
    )
    .await;
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

fn ids(list: &Value) -> Vec<String> {
    list["data"].as_array().unwrap().iter().map(id).collect()
}

/// A bot with a system prompt and sampling settings, and a session of it
/// for user `u1`.
async fn setup(api: &Api<'_>) -> (Value, Value) {
    let bot = api
        .create_bot(json!({
            "name": "Helper",
            "model": "gpt-4o-mini",
            "system_prompt": "You are terse.",
            "temperature": 0.3,
            "max_tokens": 64,
        }))
        .await;
    let session = api
        .create_session(json!({"bot_id": id(&bot), "user_id": "u1"}))
        .await;
    (bot, session)
}

fn is_uuid_v7(s: &str) -> bool {
    s.len() == 36 && s.as_bytes()[14] == b'7' && s.chars().filter(|c| *c == '-').count() == 4
}

fn trace_id_of(resp: &Response) -> String {
    let tp = resp.headers()["traceparent"].to_str().unwrap();
    tp.split('-').nth(1).unwrap().to_owned()
}

fn kinds(trace: &Value) -> Vec<String> {
    trace["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect()
}

async fn with_admin(extra: &str) -> TestApp {
    app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config(extra)
        .spawn()
        .await
}

/// Creates a key through the admin API; returns the secret.
async fn new_key(app: &TestApp, body: Value) -> String {
    let k = ok(
        Api::key(app, ADMIN).post("/v1/admin/keys", &body).await,
        201,
    )
    .await;
    k["key"].as_str().unwrap().to_owned()
}

// ---- bots ----

#[tokio::test]
async fn bots_are_created_read_listed_updated_and_deleted() {
    let app = spawn().await;
    let api = Api::open(&app);

    let bot = api
        .create_bot(json!({
            "name": "  Support  ",
            "model": "gpt-4o-mini",
            "system_prompt": "You are terse.",
            "temperature": 0.3,
            "max_tokens": 64,
            "context_tokens": 2048,
            "metadata": {"team": "care"},
        }))
        .await;
    let mut keys: Vec<_> = bot.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "context_tokens",
            "created_at",
            "id",
            "max_tokens",
            "metadata",
            "model",
            "name",
            "object",
            "system_prompt",
            "temperature",
            "updated_at"
        ]
    );
    assert!(is_uuid_v7(bot["id"].as_str().unwrap()), "{bot}");
    assert_eq!(bot["object"], "bot");
    assert_eq!(bot["name"], "Support", "the name is trimmed");
    assert_eq!(bot["model"], "gpt-4o-mini");
    assert_eq!(bot["system_prompt"], "You are terse.");
    assert_eq!(bot["temperature"], 0.3);
    assert_eq!(bot["max_tokens"], 64);
    assert_eq!(bot["context_tokens"], 2048);
    assert_eq!(bot["metadata"], json!({"team": "care"}));
    assert!(bot["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(bot["created_at"], bot["updated_at"]);
    let path = format!("/v1/bots/{}", id(&bot));
    assert_eq!(ok(api.get(&path).await, 200).await, bot);

    // Defaults: optional fields null, metadata empty.
    let minimal = api
        .create_bot(json!({"name": "Minimal", "model": "gpt-4o-mini"}))
        .await;
    assert_eq!(minimal["system_prompt"], Value::Null);
    assert_eq!(minimal["temperature"], Value::Null);
    assert_eq!(minimal["max_tokens"], Value::Null);
    assert_eq!(minimal["context_tokens"], Value::Null);
    assert_eq!(minimal["metadata"], json!({}));
    let third = api
        .create_bot(json!({"name": "Third", "model": "gpt-4o-mini"}))
        .await;

    // Newest first, two per page.
    let page = ok(api.get("/v1/bots?limit=2").await, 200).await;
    assert_eq!(ids(&page), [id(&third), id(&minimal)]);
    assert_eq!(page["next_cursor"], id(&minimal));
    let next = ok(
        api.get(&format!("/v1/bots?limit=2&cursor={}", id(&minimal)))
            .await,
        200,
    )
    .await;
    assert_eq!(ids(&next), [id(&bot)]);
    assert_eq!(next["data"][0], bot);
    assert_eq!(
        next["next_cursor"],
        Value::Null,
        "a short page ends the list"
    );
    let all = ok(api.get("/v1/bots").await, 200).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 3);
    assert_eq!(all["next_cursor"], Value::Null);

    // Only the fields given change.
    let patched = ok(api.patch(&path, &json!({"temperature": 1.5})).await, 200).await;
    assert_eq!(patched["temperature"], 1.5);
    for same in [
        "id",
        "name",
        "model",
        "system_prompt",
        "max_tokens",
        "context_tokens",
        "metadata",
        "created_at",
    ] {
        assert_eq!(patched[same], bot[same], "{same}");
    }
    assert!(patched["updated_at"].as_str() >= bot["updated_at"].as_str());
    // `null` clears an optional field.
    let cleared = ok(
        api.patch(&path, &json!({"system_prompt": null, "name": "Renamed"}))
            .await,
        200,
    )
    .await;
    assert_eq!(cleared["system_prompt"], Value::Null);
    assert_eq!(cleared["name"], "Renamed");
    assert_eq!(cleared["temperature"], 1.5);
    assert_eq!(ok(api.get(&path).await, 200).await, cleared, "stored");
    // An empty patch changes nothing but the update time.
    let same = ok(api.patch(&path, &json!({})).await, 200).await;
    assert_eq!(same["name"], "Renamed");
    assert_eq!(same["temperature"], 1.5);

    let gone = ok(api.delete(&path).await, 200).await;
    assert_eq!(
        gone,
        json!({"id": id(&bot), "object": "bot", "deleted": true})
    );
    let err = native_error(api.get(&path).await, 404, "not_found").await;
    assert_eq!(err["details"]["resource"], "bot");
    native_error(api.delete(&path).await, 404, "not_found").await;
    native_error(
        api.patch(&path, &json!({"name": "x"})).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(app.mock().calls(), 0);
}

#[tokio::test]
async fn bot_bodies_are_validated_naming_the_field() {
    let app = app()
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", "2048")
        .spawn()
        .await;
    let api = Api::open(&app);
    let good = json!({"name": "Bot", "model": "gpt-4o-mini"});
    let with = |field: &str, v: Value| {
        let mut b = good.clone();
        b[field] = v;
        b
    };

    let err = native_error(
        api.post("/v1/bots", &with("model", json!("no-such-model")))
            .await,
        404,
        "model_not_found",
    )
    .await;
    assert_eq!(err["details"]["field"], "model");
    assert!(err["message"].as_str().unwrap().contains("no-such-model"));

    for (field, value) in [
        ("name", json!("")),
        ("name", json!("   ")),
        ("name", json!("n".repeat(201))),
        ("temperature", json!(3)),
        ("temperature", json!(-0.1)),
        ("temperature", json!("hot")),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(-1)),
        ("context_tokens", json!(8)),
        ("metadata", json!([1])),
        ("system_prompt", json!(7)),
    ] {
        let err = invalid(
            api.post("/v1/bots", &with(field, value.clone())).await,
            field,
        )
        .await;
        assert!(
            err["message"].as_str().unwrap().contains(field),
            "{field}={value}: {err}"
        );
    }
    let err = invalid(
        api.post("/v1/bots", &with("colour", json!("blue"))).await,
        "colour",
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("colour"), "{err}");
    let err = invalid(
        api.post("/v1/bots", &json!({"model": "gpt-4o-mini"})).await,
        "name",
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("name"), "{err}");

    let err = native_error(
        api.raw(Method::POST, "/v1/bots", "{\"name\": ").await,
        400,
        "invalid_request",
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("not valid JSON"));
    native_error(
        api.raw(Method::POST, "/v1/bots", "[1, 2]").await,
        400,
        "invalid_request",
    )
    .await;
    native_error(
        api.post("/v1/bots", &with("system_prompt", json!("x".repeat(4096))))
            .await,
        413,
        "request_too_large",
    )
    .await;

    // An update is checked the same way and changes nothing when refused.
    let bot = api.create_bot(good.clone()).await;
    let path = format!("/v1/bots/{}", id(&bot));
    invalid(
        api.patch(&path, &json!({"temperature": 3})).await,
        "temperature",
    )
    .await;
    invalid(api.patch(&path, &json!({"name": " "})).await, "name").await;
    invalid(api.patch(&path, &json!({"colour": 1})).await, "colour").await;
    native_error(
        api.patch(&path, &json!({"model": "nope"})).await,
        404,
        "model_not_found",
    )
    .await;
    assert_eq!(ok(api.get(&path).await, 200).await, bot);

    // Query strings too.
    invalid(api.get("/v1/bots?limit=0").await, "limit").await;
    invalid(api.get("/v1/bots?limit=101").await, "limit").await;
    native_error(api.get("/v1/bots?colour=1").await, 400, "invalid_request").await;
    assert_eq!(app.mock().calls(), 0);
}

// ---- sessions ----

#[tokio::test]
async fn sessions_are_created_listed_filtered_and_deleted() {
    let app = spawn().await;
    let api = Api::open(&app);
    let b1 = api
        .create_bot(json!({"name": "One", "model": "gpt-4o-mini"}))
        .await;
    let b2 = api
        .create_bot(json!({"name": "Two", "model": "gpt-4o-mini"}))
        .await;

    let s1 = api
        .create_session(json!({
            "bot_id": id(&b1),
            "user_id": "u1",
            "metadata": {"channel": "web"},
            "state": {"step": 1},
        }))
        .await;
    let mut keys: Vec<_> = s1.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "bot_id",
            "created_at",
            "id",
            "metadata",
            "object",
            "state",
            "state_version",
            "user_id"
        ]
    );
    assert!(is_uuid_v7(s1["id"].as_str().unwrap()));
    assert_eq!(s1["object"], "session");
    assert_eq!(s1["bot_id"], id(&b1));
    assert_eq!(s1["user_id"], "u1");
    assert_eq!(s1["metadata"], json!({"channel": "web"}));
    assert_eq!(s1["state"], json!({"step": 1}));
    assert_eq!(s1["state_version"], 0);
    let path1 = format!("/v1/sessions/{}", id(&s1));
    assert_eq!(ok(api.get(&path1).await, 200).await, s1);

    let s2 = api
        .create_session(json!({"bot_id": id(&b1), "user_id": "u2"}))
        .await;
    let s3 = api.create_session(json!({"user_id": "u1"})).await;
    assert_eq!(s3["bot_id"], Value::Null);
    assert_eq!(s3["metadata"], json!({}));
    assert_eq!(s3["state"], json!({}));
    let s4 = api
        .create_session(json!({"bot_id": id(&b2), "user_id": "u1"}))
        .await;
    let anonymous = api.create_session(json!({})).await;
    assert_eq!(anonymous["user_id"], Value::Null);

    let list = |q: &str| {
        let api = api.clone();
        let q = q.to_owned();
        async move { ok(api.get(&format!("/v1/sessions{q}")).await, 200).await }
    };
    assert_eq!(
        ids(&list("").await),
        [id(&anonymous), id(&s4), id(&s3), id(&s2), id(&s1)],
        "newest first"
    );
    assert_eq!(ids(&list("?user_id=u1").await), [id(&s4), id(&s3), id(&s1)]);
    assert_eq!(
        ids(&list(&format!("?bot_id={}", id(&b1))).await),
        [id(&s2), id(&s1)]
    );
    assert_eq!(
        ids(&list(&format!("?bot_id={}&user_id=u1", id(&b1))).await),
        [id(&s1)]
    );
    assert!(ids(&list("?user_id=nobody").await).is_empty());

    // Cursor pagination through a filtered list.
    let first = list("?user_id=u1&limit=2").await;
    assert_eq!(ids(&first), [id(&s4), id(&s3)]);
    assert_eq!(first["next_cursor"], id(&s3));
    let second = list(&format!("?user_id=u1&limit=2&cursor={}", id(&s3))).await;
    assert_eq!(ids(&second), [id(&s1)]);
    assert_eq!(second["next_cursor"], Value::Null);
    assert_eq!(second["data"][0], s1);

    invalid(api.get("/v1/sessions?limit=0").await, "limit").await;
    native_error(
        api.get("/v1/sessions?sort=asc").await,
        400,
        "invalid_request",
    )
    .await;

    // Bad bodies.
    let err = native_error(
        api.post("/v1/sessions", &json!({"bot_id": "no-such-bot"}))
            .await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(err["details"]["resource"], "bot");
    invalid(
        api.post("/v1/sessions", &json!({"topic": "x"})).await,
        "topic",
    )
    .await;
    invalid(
        api.post("/v1/sessions", &json!({"user_id": ""})).await,
        "user_id",
    )
    .await;
    invalid(
        api.post("/v1/sessions", &json!({"state": [1]})).await,
        "state",
    )
    .await;
    invalid(
        api.post("/v1/sessions", &json!({"metadata": "x"})).await,
        "metadata",
    )
    .await;
    native_error(
        api.raw(Method::POST, "/v1/sessions", "{").await,
        400,
        "invalid_request",
    )
    .await;

    // Deleting a session deletes its messages.
    api.reply(&id(&s1), "remember me").await;
    let store = app_store(&app).await;
    assert_eq!(
        store
            .list_messages("default", &id(&s1), None, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        ok(api.delete(&path1).await, 200).await,
        json!({"id": id(&s1), "object": "session", "deleted": true})
    );
    let err = native_error(api.get(&path1).await, 404, "not_found").await;
    assert_eq!(err["details"]["resource"], "session");
    native_error(
        api.get(&format!("{path1}/messages")).await,
        404,
        "not_found",
    )
    .await;
    native_error(api.delete(&path1).await, 404, "not_found").await;
    assert!(store
        .list_messages("default", &id(&s1), None, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        ids(&list("?user_id=u1").await),
        [id(&s4), id(&s3)],
        "gone from the list"
    );
}

#[tokio::test]
async fn messages_are_listed_oldest_first_with_a_cursor() {
    let app = spawn().await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    let sid = id(&session);
    let path = format!("/v1/sessions/{sid}/messages");
    let empty = ok(api.get(&path).await, 200).await;
    assert_eq!(empty["data"], json!([]));
    assert_eq!(empty["next_cursor"], Value::Null);

    let a1 = api.reply(&sid, "first").await;
    let a2 = api.reply(&sid, "second").await;

    let page = ok(api.get(&format!("{path}?limit=3")).await, 200).await;
    let got: Vec<_> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].clone(), m["content"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (json!("user"), json!("first")),
            (json!("assistant"), json!(REPLY)),
            (json!("user"), json!("second")),
        ]
    );
    assert_eq!(page["data"][1], a1, "the listed message is the reply");
    let cursor = page["next_cursor"].as_str().unwrap();
    assert_eq!(cursor, page["data"][2]["id"]);
    let rest = ok(
        api.get(&format!("{path}?limit=3&cursor={cursor}")).await,
        200,
    )
    .await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["data"][0], a2);
    assert_eq!(rest["next_cursor"], Value::Null);

    let user = &page["data"][0];
    assert_eq!(user["status"], "complete");
    assert_eq!(user["session_id"], sid.as_str());
    assert_eq!(user["trace_id"], a1["trace_id"], "one trace per exchange");
    assert_eq!(user["usage"], Value::Null);
    assert_eq!(user["cost_usd"], Value::Null);

    invalid(api.get(&format!("{path}?limit=500")).await, "limit").await;
    native_error(
        api.get("/v1/sessions/no-such-session/messages").await,
        404,
        "not_found",
    )
    .await;
}

// ---- replies ----

#[tokio::test]
async fn a_json_reply_is_the_stored_assistant_message_and_the_provider_gets_the_history() {
    let app = app().config(OTHER_MODEL).spawn().await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    let sid = id(&session);

    let resp = api.say(&sid, &json!({"content": "first question"})).await;
    assert_eq!(resp.headers()["content-type"], "application/json");
    let m = ok(resp, 200).await;
    assert!(is_uuid_v7(m["id"].as_str().unwrap()));
    assert_eq!(m["object"], "message");
    assert_eq!(m["session_id"], sid.as_str());
    assert_eq!(m["role"], "assistant");
    assert_eq!(m["status"], "complete");
    assert_eq!(m["content"], REPLY);
    assert_eq!(m["finish_reason"], "stop");
    assert_eq!(m["model"], "gpt-4o-mini");
    assert_eq!(m["error"], Value::Null);
    assert!(m["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(
        m["usage"]["completion_tokens"].as_u64().unwrap(),
        REPLY.split_whitespace().count() as u64
    );
    assert!(m["cost_usd"].as_f64().unwrap() > 0.0, "{m}");
    assert!(m["latency_ms"].as_f64().unwrap() >= 0.0, "{m}");
    let trace = m["trace_id"].as_str().unwrap();
    assert!(trace.len() == 32 && trace.chars().all(|c| c.is_ascii_hexdigit()));

    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(sent["model"], "gpt-4o-mini-upstream");
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
        ])
    );
    assert_eq!(sent["temperature"], 0.3);
    assert_eq!(sent["max_tokens"], 64);

    // The next turn carries the history after the system prompt.
    api.reply(&sid, "second question").await;
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": REPLY},
            {"role": "user", "content": "second question"},
        ])
    );

    // `model` overrides the bot's (the sampling settings stay the bot's).
    let m = ok(
        api.say(&sid, &json!({"content": "third", "model": "other"}))
            .await,
        200,
    )
    .await;
    assert_eq!(m["model"], "other");
    assert_eq!(m["cost_usd"], Value::Null, "no pricing for this model");
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(sent["model"], "other-upstream");
    assert_eq!(sent["temperature"], 0.3);
    assert_eq!(sent["messages"].as_array().unwrap().len(), 6);

    let stored = ok(api.get(&format!("/v1/sessions/{sid}/messages")).await, 200).await;
    let roles: Vec<_> = stored["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{}:{}", m["role"], m["status"]))
        .collect();
    assert_eq!(
        roles,
        ["\"user\":\"complete\"", "\"assistant\":\"complete\""].repeat(3)
    );
    assert_eq!(stored["data"][5], m);
    assert_eq!(app.mock().calls(), 3);

    // A change to the bot applies to the next reply at once.
    let bot_path = format!("/v1/bots/{}", session["bot_id"].as_str().unwrap());
    ok(
        api.patch(
            &bot_path,
            &json!({"system_prompt": "Be kind.", "temperature": null, "max_tokens": 5}),
        )
        .await,
        200,
    )
    .await;
    api.reply(&sid, "fourth").await;
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "Be kind."})
    );
    assert!(sent.get("temperature").is_none(), "{sent}");
    assert_eq!(sent["max_tokens"], 5);
    ok(
        api.patch(&bot_path, &json!({"system_prompt": null})).await,
        200,
    )
    .await;
    api.reply(&sid, "fifth").await;
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(
        sent["messages"][0],
        json!({"role": "user", "content": "first question"})
    );
}

#[tokio::test]
async fn the_history_keeps_the_newest_turns_that_fit_the_bots_context_budget() {
    let app = spawn().await;
    let api = Api::open(&app);
    // Estimated at about a token per three bytes plus four per message:
    // the system prompt takes 7 of 40, the new message 5, the last reply
    // 15; the 90-byte question (34) no longer fits.
    let bot = api
        .create_bot(json!({"name": "Small", "model": "gpt-4o-mini", "system_prompt": "be brief", "context_tokens": 40}))
        .await;
    let session = api.create_session(json!({"bot_id": id(&bot)})).await;
    let sid = id(&session);
    api.reply(&sid, &"x".repeat(90)).await;
    api.reply(&sid, "q2").await;
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "be brief"},
            {"role": "assistant", "content": REPLY},
            {"role": "user", "content": "q2"},
        ])
    );
    // A larger budget sends the whole conversation.
    ok(
        api.patch(
            &format!("/v1/bots/{}", id(&bot)),
            &json!({"context_tokens": 1000}),
        )
        .await,
        200,
    )
    .await;
    api.reply(&sid, "q3").await;
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(sent["messages"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn a_session_deleted_by_another_instance_takes_no_more_messages() {
    // This instance has read the session for a reply; another one (here:
    // the store directly) deletes it. The next reply finds it gone: 404, no
    // provider call, and no message left behind (a cache of sessions would
    // have to keep this true; one was measured, see docs/BENCHMARKS.md).
    let app = spawn().await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    let sid = id(&session);
    api.reply(&sid, "first").await;
    let store = app_store(&app).await;
    assert!(store.delete_session("default", &sid).await.unwrap());
    let messages_before = store
        .list_messages("default", &sid, None, 100)
        .await
        .unwrap();
    let calls = app.mock().calls();

    let err = native_error(
        api.req(Method::POST, &format!("/v1/sessions/{sid}/messages"))
            .header("accept", "application/json")
            .json(&json!({"content": "are you there?"}))
            .send()
            .await
            .unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_eq!(err["details"]["resource"], "session");
    assert_eq!(app.mock().calls(), calls);
    assert_eq!(
        store
            .list_messages("default", &sid, None, 100)
            .await
            .unwrap(),
        messages_before,
        "the refused reply stored nothing"
    );
    // And again: the same answer.
    native_error(
        api.post(
            &format!("/v1/sessions/{sid}/messages"),
            &json!({"content": "hello?"}),
        )
        .await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_session_without_a_bot_needs_a_model() {
    let app = spawn().await;
    let api = Api::open(&app);
    let session = api.create_session(json!({"user_id": "u1"})).await;
    let sid = id(&session);

    let err = invalid(api.say(&sid, &json!({"content": "hi"})).await, "model").await;
    assert!(err["message"].as_str().unwrap().contains("model"));
    assert_eq!(app.mock().calls(), 0);
    let listed = ok(api.get(&format!("/v1/sessions/{sid}/messages")).await, 200).await;
    assert_eq!(listed["data"], json!([]), "nothing stored for a refusal");

    let m = ok(
        api.say(&sid, &json!({"content": "hi", "model": "gpt-4o-mini"}))
            .await,
        200,
    )
    .await;
    assert_eq!(m["content"], REPLY);
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(sent["messages"], json!([{"role": "user", "content": "hi"}]));
    assert!(sent.get("temperature").is_none());
    assert!(sent.get("max_tokens").is_none());
}

#[tokio::test]
async fn sending_rejects_bad_input_before_calling_the_provider() {
    let app = app()
        .config("[sessions]\nmax_content_bytes = 100\n")
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", "4096")
        .spawn()
        .await;
    let api = Api::open(&app);
    let (bot, session) = setup(&api).await;
    let sid = id(&session);

    let err = native_error(
        api.say("no-such-session", &json!({"content": "hi"})).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(err["details"]["resource"], "session");
    for empty in ["", "   ", "\n\t "] {
        invalid(api.say(&sid, &json!({"content": empty})).await, "content").await;
    }
    invalid(api.say(&sid, &json!({"content": 42})).await, "content").await;
    invalid(api.say(&sid, &json!({})).await, "content").await;
    invalid(
        api.say(&sid, &json!({"content": "hi", "temperature": 1}))
            .await,
        "temperature",
    )
    .await;
    native_error(
        api.raw(Method::POST, &format!("/v1/sessions/{sid}/messages"), "{]")
            .await,
        400,
        "invalid_request",
    )
    .await;

    // 100 bytes pass the content limit, 101 do not (bytes, not characters).
    let err = native_error(
        api.say(&sid, &json!({"content": "x".repeat(101)})).await,
        413,
        "content_too_large",
    )
    .await;
    assert_eq!(err["details"]["field"], "content");
    assert_eq!(err["details"]["limit_bytes"], 100);
    native_error(
        api.say(&sid, &json!({"content": "é".repeat(51)})).await,
        413,
        "content_too_large",
    )
    .await;
    // Over the body limit, before any parsing.
    native_error(
        api.say(&sid, &json!({"content": "x".repeat(5000)})).await,
        413,
        "request_too_large",
    )
    .await;

    let err = native_error(
        api.say(&sid, &json!({"content": "hi", "model": "no-such-model"}))
            .await,
        404,
        "model_not_found",
    )
    .await;
    assert_eq!(err["details"]["field"], "model");
    assert_eq!(app.mock().calls(), 0);
    let listed = ok(api.get(&format!("/v1/sessions/{sid}/messages")).await, 200).await;
    assert_eq!(listed["data"], json!([]), "no refusal stored a message");

    api.reply(&sid, &"x".repeat(100)).await;

    // The session's bot is deleted: the session can be read, not continued.
    ok(api.delete(&format!("/v1/bots/{}", id(&bot))).await, 200).await;
    let err = native_error(
        api.say(&sid, &json!({"content": "still there?"})).await,
        409,
        "bot_deleted",
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("bot"));
    let err = native_error(
        api.say(&sid, &json!({"content": "x", "model": "gpt-4o-mini"}))
            .await,
        409,
        "bot_deleted",
    )
    .await;
    assert!(err["details"].is_object());
    let s = ok(api.get(&format!("/v1/sessions/{sid}")).await, 200).await;
    assert_eq!(s["bot_id"], id(&bot));
    assert_eq!(app.mock().calls(), 1);
}

#[tokio::test]
async fn a_provider_failure_is_answered_natively_and_stored_as_failed() {
    let app = spawn().await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    let sid = id(&session);

    app.mock().push_fault(Fault::Status(400));
    let err = native_error(
        api.say(&sid, &json!({"content": "hi"})).await,
        400,
        "upstream_status",
    )
    .await;
    assert_eq!(err["details"]["retryable"], false);
    assert!(
        !err["message"].as_str().unwrap().contains("mock:"),
        "the provider's own message is not relayed: {err}"
    );
    let message_id = err["details"]["message_id"].as_str().unwrap().to_owned();

    let listed = ok(api.get(&format!("/v1/sessions/{sid}/messages")).await, 200).await;
    let data = listed["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["role"], "user");
    assert_eq!(data[0]["status"], "complete");
    assert_eq!(data[0]["content"], "hi");
    let failed = &data[1];
    assert_eq!(failed["id"], message_id.as_str());
    assert_eq!(failed["role"], "assistant");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["content"], "");
    assert_eq!(failed["error"]["code"], "upstream_status");
    assert!(failed["error"]["message"].as_str().is_some());
    assert_eq!(failed["usage"], Value::Null);
    assert_eq!(failed["cost_usd"], Value::Null);

    // The failed turn is not sent as history.
    api.reply(&sid, "again").await;
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi"},
            {"role": "user", "content": "again"},
        ])
    );
}

#[tokio::test]
async fn a_replys_retry_line_carries_the_trace_id_of_its_request() {
    // The reply is generated by a task of its own, which outlives the
    // request; its log lines must still name the request's trace.
    let app = spawn().await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    app.mock().push_fault(Fault::Status(500));

    let resp = api.say(&id(&session), &json!({"content": "hi"})).await;
    let trace_id = trace_id_of(&resp);
    ok(resp, 200).await;

    let line = app
        .wait_for_log(|l| l.contains("\"message\":\"retrying\""))
        .await
        .expect("the provider's retry line");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["spans"][0]["name"], "request", "{line}");
    assert_eq!(line["spans"][0]["trace_id"], trace_id.as_str(), "{line}");
}

// ---- tenancy and roles ----

#[tokio::test]
async fn tenants_and_users_see_only_their_own() {
    let app = with_admin(FAST_EVENTS).await;
    let admin = Api::key(&app, ADMIN);
    ok(
        admin
            .post("/v1/admin/tenants", &json!({"id": "tenant-b"}))
            .await,
        201,
    )
    .await;
    let svc = Api::key(
        &app,
        &new_key(&app, json!({"name": "svc", "role": "service"})).await,
    );
    let alice = Api::key(
        &app,
        &new_key(
            &app,
            json!({"name": "alice", "role": "user", "user_id": "alice"}),
        )
        .await,
    );
    let bob = Api::key(
        &app,
        &new_key(
            &app,
            json!({"name": "bob", "role": "user", "user_id": "bob"}),
        )
        .await,
    );
    let other = Api::key(
        &app,
        &new_key(
            &app,
            json!({"name": "b", "role": "admin", "tenant_id": "tenant-b"}),
        )
        .await,
    );

    // Without a credential, once keys exist: 401, native shape.
    let anon = Api::open(&app);
    for path in ["/v1/sessions", "/v1/bots", "/v1/users/alice/export"] {
        native_error(anon.get(path).await, 401, "missing_credentials").await;
    }
    native_error(
        anon.post("/v1/bots", &json!({"name": "x", "model": "gpt-4o-mini"}))
            .await,
        401,
        "missing_credentials",
    )
    .await;

    // Bots: operators write, users read.
    let bot = svc
        .create_bot(json!({"name": "Shared", "model": "gpt-4o-mini"}))
        .await;
    let bot_path = format!("/v1/bots/{}", id(&bot));
    native_error(
        alice
            .post("/v1/bots", &json!({"name": "Mine", "model": "gpt-4o-mini"}))
            .await,
        403,
        "forbidden",
    )
    .await;
    native_error(
        alice.patch(&bot_path, &json!({"name": "Mine"})).await,
        403,
        "forbidden",
    )
    .await;
    native_error(alice.delete(&bot_path).await, 403, "forbidden").await;
    assert_eq!(ok(alice.get(&bot_path).await, 200).await, bot);
    assert_eq!(ids(&ok(alice.get("/v1/bots").await, 200).await), [id(&bot)]);

    // A service key acts for a user through the header, or names one.
    let alices = svc
        .acting_for("alice")
        .create_session(json!({"bot_id": id(&bot)}))
        .await;
    assert_eq!(alices["user_id"], "alice");
    let bobs = svc
        .create_session(json!({"bot_id": id(&bot), "user_id": "bob"}))
        .await;
    assert_eq!(bobs["user_id"], "bob");
    let own = alice.create_session(json!({"bot_id": id(&bot)})).await;
    assert_eq!(own["user_id"], "alice", "a user's session is its own");
    let same = alice
        .create_session(json!({"bot_id": id(&bot), "user_id": "alice"}))
        .await;
    native_error(
        alice
            .post(
                "/v1/sessions",
                &json!({"bot_id": id(&bot), "user_id": "bob"}),
            )
            .await,
        403,
        "forbidden",
    )
    .await;
    native_error(
        alice
            .acting_for("bob")
            .post("/v1/sessions", &json!({}))
            .await,
        403,
        "insufficient_permissions",
    )
    .await;

    // A user lists only its own sessions, whatever the filter asks.
    let mine = ok(alice.get("/v1/sessions").await, 200).await;
    assert_eq!(ids(&mine), [id(&same), id(&own), id(&alices)]);
    assert!(ids(&ok(alice.get("/v1/sessions?user_id=bob").await, 200).await).is_empty());
    assert_eq!(
        ids(&ok(bob.get("/v1/sessions").await, 200).await),
        [id(&bobs)]
    );
    assert_eq!(
        ok(svc.get("/v1/sessions").await, 200).await["data"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    let reply = alice.reply(&id(&alices), "hello").await;
    let trace = reply["trace_id"].as_str().unwrap().to_owned();
    let events = alice.finished_trace(&trace).await;
    assert!(events["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["session_id"] == id(&alices)));
    // A user's own request outside any session: its trace is the user's too.
    let resp = alice
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let direct = resp.headers()["traceparent"].to_str().unwrap()[3..35].to_owned();
    let events = alice.finished_trace(&direct).await;
    assert!(events["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["session_id"].is_null() && e["user_id"] == "alice"));
    assert_eq!(svc.finished_trace(&direct).await, events);
    for caller in [&bob, &other] {
        native_error(
            caller.get(&format!("/v1/traces/{direct}")).await,
            404,
            "not_found",
        )
        .await;
    }
    let message_events = format!(
        "/v1/sessions/{}/messages/{}/events",
        id(&alices),
        id(&reply)
    );

    // Every route on someone else's session is 404, never 403.
    let session_routes = |sid: &str| {
        vec![
            (Method::GET, format!("/v1/sessions/{sid}"), None),
            (Method::GET, format!("/v1/sessions/{sid}/messages"), None),
            (
                Method::POST,
                format!("/v1/sessions/{sid}/messages"),
                Some(json!({"content": "hi"})),
            ),
            (Method::GET, format!("/v1/sessions/{sid}/state"), None),
            (
                Method::PATCH,
                format!("/v1/sessions/{sid}/state"),
                Some(json!({"k": 1})),
            ),
            (
                Method::POST,
                "/functions/v1/chat".to_owned(),
                Some(json!({"session_id": sid, "content": "hi"})),
            ),
            (Method::DELETE, format!("/v1/sessions/{sid}"), None),
        ]
    };
    let calls = app.mock().calls();
    for (who, caller, sid) in [
        ("bob", &bob, id(&alices)),
        ("alice", &alice, id(&bobs)),
        ("tenant B", &other, id(&alices)),
    ] {
        for (method, path, body) in session_routes(&sid) {
            let mut r = caller.req(method.clone(), &path);
            if let Some(b) = &body {
                r = r.header("accept", "application/json").json(b);
            }
            let err = native_error(r.send().await.unwrap(), 404, "not_found").await;
            assert_eq!(
                err["details"]["resource"], "session",
                "{who} {method} {path}"
            );
        }
    }
    assert_eq!(
        app.mock().calls(),
        calls,
        "no refused call reached the provider"
    );
    for caller in [&bob, &other] {
        native_error(caller.get(&message_events).await, 404, "not_found").await;
        native_error(
            caller.get(&format!("/v1/traces/{trace}")).await,
            404,
            "not_found",
        )
        .await;
    }

    // Tenant B sees none of tenant default's bots, and cannot use them.
    native_error(other.get(&bot_path).await, 404, "not_found").await;
    native_error(
        other.patch(&bot_path, &json!({"name": "x"})).await,
        404,
        "not_found",
    )
    .await;
    native_error(other.delete(&bot_path).await, 404, "not_found").await;
    native_error(
        other
            .post("/v1/sessions", &json!({"bot_id": id(&bot)}))
            .await,
        404,
        "not_found",
    )
    .await;
    assert!(ids(&ok(other.get("/v1/bots").await, 200).await).is_empty());
    assert!(ids(&ok(other.get("/v1/sessions").await, 200).await).is_empty());
    native_error(other.get("/v1/users/alice/export").await, 404, "not_found").await;

    // Nothing was changed by the refusals.
    assert_eq!(ok(svc.get(&bot_path).await, 200).await, bot);
    let s = ok(svc.get(&format!("/v1/sessions/{}", id(&bobs))).await, 200).await;
    assert_eq!(s, bobs);
}

// ---- state ----

#[tokio::test]
async fn state_merges_atomically_with_versions() {
    let app = spawn().await;
    state_merges(&Api::open(&app)).await;
}

async fn state_merges(api: &Api<'_>) {
    let session = api
        .create_session(json!({"state": {"a": 1, "nested": {"x": 1, "y": 2}}}))
        .await;
    let sid = id(&session);
    let path = format!("/v1/sessions/{sid}/state");

    let resp = api.get(&path).await;
    assert_eq!(resp.headers()["etag"], "\"0\"");
    assert_eq!(
        ok(resp, 200).await,
        json!({"session_id": sid, "state": {"a": 1, "nested": {"x": 1, "y": 2}}, "version": 0})
    );

    // Objects merge recursively; null removes a key.
    let resp = api
        .patch(&path, &json!({"nested": {"y": null, "z": [3]}, "b": true}))
        .await;
    assert_eq!(resp.headers()["etag"], "\"1\"");
    let v = ok(resp, 200).await;
    assert_eq!(v["version"], 1);
    assert_eq!(
        v["state"],
        json!({"a": 1, "nested": {"x": 1, "z": [3]}, "b": true})
    );
    let v = ok(api.patch(&path, &json!({"a": null})).await, 200).await;
    assert_eq!(v["state"], json!({"nested": {"x": 1, "z": [3]}, "b": true}));
    assert_eq!(v["version"], 2);

    // Compare-and-set.
    let cas = |version: &str, body: Value| {
        let api = api.clone();
        let (path, version) = (path.clone(), version.to_owned());
        async move {
            api.req(Method::PATCH, &path)
                .header("if-match", version)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let v = ok(cas("\"2\"", json!({"c": 1})).await, 200).await;
    assert_eq!(v["version"], 3);
    let err = native_error(cas("\"2\"", json!({"c": 2})).await, 412, "version_mismatch").await;
    assert_eq!(err["details"]["current_version"], 3);
    let v = ok(cas("W/\"3\"", json!({"d": 1})).await, 200).await;
    assert_eq!(v["version"], 4);
    let v = ok(cas("4", json!({"e": 1})).await, 200).await;
    assert_eq!(v["version"], 5);
    let v = ok(cas("*", json!({"f": 1})).await, 200).await;
    assert_eq!(v["version"], 6);
    let err = native_error(
        cas("\"abc\"", json!({"g": 1})).await,
        400,
        "invalid_request",
    )
    .await;
    assert_eq!(err["details"]["header"], "if-match");

    // Not an object.
    for body in [json!([1]), json!("x"), json!(3), json!(null)] {
        native_error(api.patch(&path, &body).await, 400, "invalid_request").await;
    }
    native_error(
        api.raw(Method::PATCH, &path, "{\"a\":").await,
        400,
        "invalid_request",
    )
    .await;

    let after = ok(api.get(&path).await, 200).await;
    assert_eq!(after["version"], 6, "refusals changed nothing");
    assert_eq!(
        after["state"],
        json!({"nested": {"x": 1, "z": [3]}, "b": true, "c": 1, "d": 1, "e": 1, "f": 1})
    );
    let s = ok(api.get(&format!("/v1/sessions/{sid}")).await, 200).await;
    assert_eq!(s["state"], after["state"]);
    assert_eq!(s["state_version"], 6);

    for resp in [
        api.get("/v1/sessions/no-such-session/state").await,
        api.patch("/v1/sessions/no-such-session/state", &json!({"a": 1}))
            .await,
    ] {
        let err = native_error(resp, 404, "not_found").await;
        assert_eq!(err["details"]["resource"], "session");
    }
}

// ---- traces ----

#[tokio::test]
async fn a_trace_lists_the_request_lifecycle_in_order() {
    let app = app().config(FAST_EVENTS).spawn().await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    let sid = id(&session);

    let m = api.reply(&sid, "hi").await;
    let trace_id = m["trace_id"].as_str().unwrap();
    let trace = api.finished_trace(trace_id).await;
    assert_eq!(trace["object"], "trace");
    assert_eq!(trace["trace_id"], trace_id);
    assert_eq!(
        kinds(&trace),
        ["request.received", "provider.attempt", "request.done"]
    );
    let events = trace["data"].as_array().unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["session_id"], sid.as_str(), "{e}");
        assert_eq!(e["seq"], i as u64, "{e}");
        assert!(e["created_at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(events[0]["payload"]["model"], "gpt-4o-mini");
    assert_eq!(events[0]["payload"]["stream"], true);
    assert_eq!(events[2]["payload"]["status"], 200);
    assert_eq!(events[2]["payload"]["provider"], "mock");

    // A retried attempt shows in the trace.
    app.mock().push_fault(Fault::Status(503));
    let m = api.reply(&sid, "again").await;
    let trace = api.finished_trace(m["trace_id"].as_str().unwrap()).await;
    assert_eq!(
        kinds(&trace),
        [
            "request.received",
            "provider.attempt",
            "provider.retry",
            "provider.attempt",
            "request.done"
        ]
    );
    assert_eq!(trace["data"][2]["payload"]["error"], "upstream_status");
    assert_eq!(trace["data"][3]["payload"]["attempt"], 2);

    // A failed reply ends in request.error.
    app.mock().push_fault(Fault::Status(400));
    let err = native_error(
        api.say(&sid, &json!({"content": "fail"})).await,
        400,
        "upstream_status",
    )
    .await;
    let listed = ok(api.get(&format!("/v1/sessions/{sid}/messages")).await, 200).await;
    let failed = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == err["details"]["message_id"])
        .unwrap()
        .clone();
    let trace = api
        .finished_trace(failed["trace_id"].as_str().unwrap())
        .await;
    assert_eq!(
        kinds(&trace),
        ["request.received", "provider.attempt", "request.error"]
    );

    // A caller's traceparent is continued: the reply is stored under it.
    let given = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = api
        .req(Method::POST, &format!("/v1/sessions/{sid}/messages"))
        .header("accept", "application/json")
        .header("traceparent", format!("00-{given}-00f067aa0ba902b7-01"))
        .json(&json!({"content": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(trace_id_of(&resp), given);
    let m = ok(resp, 200).await;
    assert_eq!(m["trace_id"], given);
    assert_eq!(
        kinds(&api.finished_trace(given).await),
        ["request.received", "provider.attempt", "request.done"]
    );

    // A plain chat completion has a trace too, under the id of its traceparent.
    // It is kept in the request's usage row, not as a bus_events row.
    let rows_before = metric(&app, "switchyard_events_written_total").await;
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(resp.status(), 200);
    let trace_id = trace_id_of(&resp);
    let trace = api.finished_trace(&trace_id).await;
    assert_eq!(
        kinds(&trace),
        ["request.received", "provider.attempt", "request.done"]
    );
    let events = trace["data"].as_array().unwrap();
    assert!(events.iter().all(|e| e["session_id"].is_null()));
    assert_eq!(
        events[0]["payload"],
        json!({"endpoint": "chat", "model": "gpt-4o-mini", "stream": false})
    );
    assert_eq!(
        events[1]["payload"],
        json!({"deployment": "mock/gpt-4o-mini-upstream", "attempt": 1})
    );
    let done = &events[2]["payload"];
    assert_eq!(
        (done["status"].as_u64(), done["provider"].as_str()),
        (Some(200), Some("mock"))
    );
    assert!(done["latency_ms"].as_f64().unwrap() > 0.0, "{done}");
    assert!(
        done["ttft_ms"].is_null() && done["error"].is_null(),
        "{done}"
    );
    assert!(done["prompt_tokens"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(
        events
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "distinct event ids: {ids:?}");
    // A reply (in a session) after it is written as a row: once its trace is
    // visible, the writer (first in, first out) has written everything before.
    let m = api.reply(&sid, "after").await;
    api.finished_trace(m["trace_id"].as_str().unwrap()).await;
    // The counter moves just after the row's commit, which the trace read
    // may see first: wait for it (bounded), then check it moved by one.
    let mut written = 0.0;
    for _ in 0..100 {
        written = metric(&app, "switchyard_events_written_total").await - rows_before;
        if written >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(written, 1.0, "only the reply's events are a bus_events row");

    let err = native_error(
        api.get("/v1/traces/0123456789abcdef0123456789abcdef").await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(err["details"]["resource"], "trace");
}

/// A plain request's events as rebuilt from its usage row, and as written
/// in a `bus_events` row when usage rows are off: the same but for the ids
/// and the measured times.
#[tokio::test]
async fn a_plain_trace_reads_back_as_the_events_it_would_have_written() {
    let kept = app().config(FAST_EVENTS).spawn().await;
    let rows = app()
        .config(FAST_EVENTS)
        .env("SWITCHYARD_USAGE__ENABLED", "false")
        .spawn()
        .await;
    // What differs between two runs of one request: ids, times, latencies.
    let comparable = |trace: &Value| -> Vec<Value> {
        trace["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let mut e = e.clone();
                let o = e.as_object_mut().unwrap();
                assert!(o.remove("id").unwrap().is_string());
                assert!(o.remove("created_at").unwrap().is_string());
                if let Some(p) = o.get_mut("payload").and_then(Value::as_object_mut) {
                    for k in ["latency_ms", "ttft_ms"] {
                        if let Some(v) = p.get_mut(k) {
                            *v = json!(if v.is_null() { "null" } else { "number" });
                        }
                    }
                }
                e
            })
            .collect()
    };
    for stream in [false, true] {
        let mut body = chat_body("gpt-4o-mini");
        body["stream"] = json!(stream);
        let mut traces = Vec::new();
        for app in [&kept, &rows] {
            let resp = app.post_json("/v1/chat/completions", &body).await;
            assert_eq!(resp.status(), 200);
            let trace_id = trace_id_of(&resp);
            resp.bytes().await.unwrap();
            traces.push(comparable(&Api::open(app).finished_trace(&trace_id).await));
        }
        assert_eq!(traces[0].len(), 3, "{:?}", traces[0]);
        assert_eq!(traces[0], traces[1], "stream: {stream}");
        let ttft = &traces[0][2]["payload"]["ttft_ms"];
        assert_eq!(ttft, &json!(if stream { "number" } else { "null" }));
    }
    // A failed first attempt is plain too: request.error, the same either way.
    let mut traces = Vec::new();
    for app in [&kept, &rows] {
        app.mock().push_fault(Fault::Status(400));
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
            .await;
        assert_eq!(resp.status(), 400);
        let trace_id = trace_id_of(&resp);
        traces.push(comparable(&Api::open(app).finished_trace(&trace_id).await));
    }
    assert_eq!(traces[0][2]["kind"], "request.error");
    assert_eq!(traces[0], traces[1]);
    // Only the app without usage rows wrote bus_events rows.
    assert_eq!(metric(&kept, "switchyard_events_written_total").await, 0.0);
    assert_eq!(metric(&rows, "switchyard_events_written_total").await, 3.0);
}

// ---- data rights ----

#[tokio::test]
async fn a_users_data_is_exported_and_erased_with_an_audit_trail() {
    let app = with_admin(FAST_EVENTS).await;
    data_rights(&app).await;
}

async fn data_rights(app: &TestApp) {
    let admin = Api::key(app, ADMIN);
    let svc = Api::key(
        app,
        &new_key(app, json!({"name": "svc", "role": "service"})).await,
    );
    let alice = Api::key(
        app,
        &new_key(
            app,
            json!({"name": "alice", "role": "user", "user_id": "alice"}),
        )
        .await,
    );
    let bot = svc
        .create_bot(json!({"name": "Helper", "model": "gpt-4o-mini"}))
        .await;
    let session = svc
        .create_session(json!({"bot_id": id(&bot), "user_id": "alice", "state": {"lang": "fr"}}))
        .await;
    let sid = id(&session);
    let reply = alice.reply(&sid, "my secret").await;
    let trace = reply["trace_id"].as_str().unwrap().to_owned();
    alice.finished_trace(&trace).await;
    let bobs = svc
        .create_session(json!({"bot_id": id(&bot), "user_id": "bob"}))
        .await;
    svc.reply(&id(&bobs), "bob's question").await;

    native_error(alice.get("/v1/users/alice/export").await, 403, "forbidden").await;
    native_error(alice.delete("/v1/users/alice").await, 403, "forbidden").await;
    let err = native_error(svc.get("/v1/users/nobody/export").await, 404, "not_found").await;
    assert_eq!(err["details"]["resource"], "user");

    // Usage rows are written in batches: wait for alice's.
    let mut export = Value::Null;
    for _ in 0..250 {
        export = ok(svc.get("/v1/users/alice/export").await, 200).await;
        if !export["usage"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(export["object"], "user_export");
    assert_eq!(export["user_id"], "alice");
    assert_eq!(export["tenant_id"], "default");
    let sessions = export["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{export}");
    assert_eq!(sessions[0]["id"], sid.as_str());
    assert_eq!(sessions[0]["state"], json!({"lang": "fr"}));
    let messages = sessions[0]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["content"], "my secret");
    assert_eq!(messages[1], reply);
    let usage = export["usage"].as_array().unwrap();
    assert_eq!(usage.len(), 1, "{export}");
    assert_eq!(usage[0]["user_id"], "alice");
    assert_eq!(usage[0]["trace_id"], trace.as_str());
    assert!(!export.to_string().contains("bob"), "only alice's data");

    let erased = ok(svc.delete("/v1/users/alice").await, 200).await;
    assert_eq!(erased["deleted"], true);
    assert_eq!(erased["id"], "alice");
    assert_eq!(erased["erased"]["sessions"], 1);
    assert_eq!(erased["erased"]["messages"], 2);
    assert_eq!(erased["erased"]["usage_anonymised"], 1);
    // Event rows: one per request (its events packed together).
    assert!(erased["erased"]["events"].as_u64().unwrap() >= 1);

    native_error(svc.get("/v1/users/alice/export").await, 404, "not_found").await;
    native_error(
        svc.get(&format!("/v1/sessions/{sid}")).await,
        404,
        "not_found",
    )
    .await;
    native_error(
        svc.get(&format!("/v1/traces/{trace}")).await,
        404,
        "not_found",
    )
    .await;
    assert!(ids(&ok(alice.get("/v1/sessions").await, 200).await).is_empty());
    ok(svc.get(&format!("/v1/sessions/{}", id(&bobs))).await, 200).await;
    ok(svc.get("/v1/users/bob/export").await, 200).await;
    // Erasing again (or a user never seen) erases nothing and succeeds.
    let again = ok(svc.delete("/v1/users/alice").await, 200).await;
    assert_eq!(
        again["erased"],
        json!({"sessions": 0, "messages": 0, "events": 0, "idempotency_records": 0, "usage_anonymised": 0})
    );

    // The usage row stays, without the user.
    let store = app_store(app).await;
    let rows = store.list_usage("default", 100).await.unwrap();
    let row = rows.iter().find(|r| r.trace_id == trace).unwrap();
    assert_eq!(row.user_id, None);
    assert_eq!(row.status, 200);
    assert!(row.cost_usd.unwrap() > 0.0);
    assert!(rows.iter().all(|r| r.user_id.as_deref() != Some("alice")));

    for action in ["user.export", "user.erase"] {
        let audit = ok(
            admin.get(&format!("/v1/admin/audit?action={action}")).await,
            200,
        )
        .await;
        let rows = audit["data"].as_array().unwrap();
        assert!(
            rows.iter().any(|r| r["target"] == "user:alice"),
            "{action}: {audit}"
        );
        assert!(rows
            .iter()
            .all(|r| r["trace_id"].as_str().unwrap().len() == 32));
    }
    let audit = ok(admin.get("/v1/admin/audit?action=user.erase").await, 200).await;
    // Newest first: the second erasure, then the first.
    assert_eq!(audit["data"][0]["detail"]["sessions"], 0);
    assert_eq!(audit["data"][1]["detail"]["sessions"], 1);
    assert_eq!(audit["data"][1]["detail"]["usage_anonymised"], 1);
}

// ---- Supabase function paths ----

/// The frames of a whole native SSE body: (id, event, data).
fn frames(body: &str) -> Vec<(u64, String, Value)> {
    body.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let field = |name: &str| {
                f.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {f:?}"))
                    .to_owned()
            };
            (
                field("id: ").parse().unwrap(),
                field("event: "),
                serde_json::from_str(&field("data: ")).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_embed_function_path_answers_one_embedding() {
    let config =
        "[models.default-embedding]\nprovider = \"mock\"\nmodel = \"embed-default-upstream\"\n";
    let app = app()
        .config(config)
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", "2048")
        .spawn()
        .await;
    let api = Api::open(&app);
    let as_f32 = |v: &Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };

    // Supabase's shape: {input} in, {embedding} out, with the default alias.
    let e = ok(
        api.post("/functions/v1/embed", &json!({"input": "hello"}))
            .await,
        200,
    )
    .await;
    assert_eq!(e.as_object().unwrap().len(), 1, "{e}");
    assert_eq!(
        as_f32(&e["embedding"]),
        switchyard_testkit::mock::mock_embedding("hello", 8)
    );
    let upstream = app.mock().last_request().unwrap();
    assert_eq!(upstream.body["model"], "embed-default-upstream");
    assert_eq!(upstream.body["input"], "hello");
    assert_eq!(upstream.body["encoding_format"], "float");

    // A model of its own.
    let e = ok(
        api.post(
            "/functions/v1/embed",
            &json!({"input": "other text", "model": "text-embedding-3-small"}),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(
        as_f32(&e["embedding"]),
        switchyard_testkit::mock::mock_embedding("other text", 8)
    );
    assert_eq!(
        app.mock().last_request().unwrap().body["model"],
        "embed-upstream"
    );

    // Bad input: native errors, and no provider call.
    let calls = app.mock().calls();
    invalid(
        api.post("/functions/v1/embed", &json!({"input": ""})).await,
        "input",
    )
    .await;
    invalid(
        api.post(
            "/functions/v1/embed",
            &json!({"model": "text-embedding-3-small"}),
        )
        .await,
        "input",
    )
    .await;
    invalid(
        api.post("/functions/v1/embed", &json!({"input": ["a", "b"]}))
            .await,
        "input",
    )
    .await;
    invalid(
        api.post("/functions/v1/embed", &json!({"input": "x", "model": 7}))
            .await,
        "model",
    )
    .await;
    let err = native_error(
        api.req(Method::POST, "/functions/v1/embed")
            .header("content-type", "application/json")
            .body("{\"input\": ")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_request",
    )
    .await;
    assert!(err["message"].as_str().unwrap().contains("JSON"), "{err}");
    let err = native_error(
        api.post(
            "/functions/v1/embed",
            &json!({"input": "x", "model": "nope"}),
        )
        .await,
        404,
        "model_not_found",
    )
    .await;
    assert_eq!(err["details"]["field"], "model");
    native_error(
        api.post("/functions/v1/embed", &json!({"input": "x".repeat(4096)}))
            .await,
        413,
        "request_too_large",
    )
    .await;
    assert_eq!(app.mock().calls(), calls);

    // Both calls have their usage rows, like any embeddings call.
    let store = app_store(&app).await;
    let mut rows = Vec::new();
    for _ in 0..250 {
        rows = store.list_usage("default", 10).await.unwrap();
        if rows.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut aliases: Vec<&str> = rows.iter().map(|r| r.model_alias.as_str()).collect();
    aliases.sort_unstable();
    assert_eq!(aliases, ["default-embedding", "text-embedding-3-small"]);
    assert!(rows
        .iter()
        .all(|r| r.endpoint == "embeddings" && r.status == 200));

    // Once keys exist, a credential is needed, as on every other route.
    let locked = crate::helpers::app()
        .env(
            "SWITCHYARD_ADMIN_KEY",
            "embed-admin-key-0123456789abcdef0123456789",
        )
        .spawn()
        .await;
    native_error(
        locked
            .client
            .post(locked.url("/functions/v1/embed"))
            .json(&json!({"input": "hello"}))
            .send()
            .await
            .unwrap(),
        401,
        "missing_credentials",
    )
    .await;
}

#[tokio::test]
async fn the_chat_function_path_streams_or_answers_json() {
    let app = app().config(OTHER_MODEL).spawn().await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    let sid = id(&session);

    let resp = api
        .post(
            "/functions/v1/chat",
            &json!({"session_id": sid, "content": "stream it"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let body = resp.text().await.unwrap();
    let frames = frames(&body);
    let events: Vec<&str> = frames.iter().map(|f| f.1.as_str()).collect();
    assert_eq!(events[0], "ready");
    assert_eq!(*events.last().unwrap(), "chat.done");
    assert!(events[1..events.len() - 1]
        .iter()
        .all(|e| *e == "chat.delta"));
    assert!(events.len() > 3, "{body}");
    let ids_: Vec<u64> = frames.iter().map(|f| f.0).collect();
    assert_eq!(ids_, (1..=frames.len() as u64).collect::<Vec<_>>());
    let ready = &frames[0].2;
    assert_eq!(ready["session_id"], sid.as_str());
    let message_id = ready["message_id"].as_str().unwrap();
    assert_eq!(ready["trace_id"].as_str().unwrap().len(), 32);
    let text: String = frames[1..frames.len() - 1]
        .iter()
        .map(|f| f.2["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, REPLY);
    let done = &frames.last().unwrap().2;
    assert_eq!(done["message_id"], message_id);
    assert_eq!(done["content"], REPLY);
    assert_eq!(done["finish_reason"], "stop");
    assert!(done["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(done["cost_usd"].as_f64().unwrap() > 0.0);
    assert!(done["latency_ms"].is_number());
    let stored = ok(api.get(&format!("/v1/sessions/{sid}/messages")).await, 200).await;
    assert_eq!(stored["data"][1]["id"], message_id);
    assert_eq!(stored["data"][1]["content"], REPLY);
    assert_eq!(stored["data"][1]["status"], "complete");

    // JSON, with a model of its own.
    let m = ok(
        api.req(Method::POST, "/functions/v1/chat")
            .header("accept", "application/json")
            .json(&json!({"session_id": sid, "content": "json please", "model": "other"}))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(m["object"], "message");
    assert_eq!(m["content"], REPLY);
    assert_eq!(m["model"], "other");
    assert_eq!(
        app.mock().last_request().unwrap().body["model"],
        "other-upstream"
    );

    // The body's idempotency key: the repeat is replayed, not re-generated.
    let body = json!({"session_id": sid, "content": "once", "idempotency_key": "fn-key-1"});
    let send = || {
        api.req(Method::POST, "/functions/v1/chat")
            .header("accept", "application/json")
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = first.text().await.unwrap();
    let calls = app.mock().calls();
    let again = send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first);
    assert_eq!(app.mock().calls(), calls);

    // Bad input, natively.
    invalid(
        api.post("/functions/v1/chat", &json!({"content": "hi"}))
            .await,
        "session_id",
    )
    .await;
    invalid(
        api.post(
            "/functions/v1/chat",
            &json!({"session_id": sid, "content": " "}),
        )
        .await,
        "content",
    )
    .await;
    native_error(
        api.post(
            "/functions/v1/chat",
            &json!({"session_id": "no-such-session", "content": "hi"}),
        )
        .await,
        404,
        "not_found",
    )
    .await;
    native_error(
        api.post(
            "/functions/v1/chat",
            &json!({"session_id": sid, "content": "hi", "model": "nope"}),
        )
        .await,
        404,
        "model_not_found",
    )
    .await;
}

#[tokio::test]
async fn a_retired_path_works_until_its_sunset_then_answers_gone() {
    let app = app()
        .config(
            "[[sessions.retired_paths]]\npath = \"/functions/v1/chatting\"\ndeprecated = \"2026-01-01\"\nsunset = \"2999-01-01\"\n\n\
             [[sessions.retired_paths]]\npath = \"/functions/v1/old-chat\"\nsunset = \"2020-01-01\"\n",
        )
        .spawn()
        .await;
    let api = Api::open(&app);
    let (_, session) = setup(&api).await;
    let sid = id(&session);

    let resp = api
        .req(Method::POST, "/functions/v1/chatting")
        .header("accept", "application/json")
        .json(&json!({"session_id": sid, "content": "old client"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["deprecation"], "@1767225600");
    assert_eq!(resp.headers()["sunset"], "Tue, 01 Jan 2999 00:00:00 GMT");
    assert_eq!(
        resp.headers()["link"],
        "</functions/v1/chat>; rel=\"successor-version\""
    );
    let m = ok(resp, 200).await;
    assert_eq!(m["content"], REPLY);
    assert_eq!(m["status"], "complete");

    // Streamed, with the same headers.
    let resp = api
        .post(
            "/functions/v1/chatting",
            &json!({"session_id": sid, "content": "stream"}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["deprecation"], "@1767225600");
    let body = resp.text().await.unwrap();
    assert_eq!(frames(&body).last().unwrap().1, "chat.done");

    // Refusals still carry the deprecation headers.
    let resp = api
        .post(
            "/functions/v1/chatting",
            &json!({"session_id": "nope", "content": "x"}),
        )
        .await;
    assert_eq!(resp.headers()["deprecation"], "@1767225600");
    native_error(resp, 404, "not_found").await;

    let calls = app.mock().calls();
    let resp = api
        .post(
            "/functions/v1/old-chat",
            &json!({"session_id": sid, "content": "too late"}),
        )
        .await;
    assert_eq!(resp.headers()["sunset"], "Wed, 01 Jan 2020 00:00:00 GMT");
    assert_eq!(
        resp.headers()["link"],
        "</functions/v1/chat>; rel=\"successor-version\""
    );
    assert!(resp.headers().get("deprecation").is_none());
    let err = native_error(resp, 410, "gone").await;
    assert_eq!(err["details"]["successor"], "/functions/v1/chat");
    assert!(err["details"]["sunset"]
        .as_str()
        .unwrap()
        .starts_with("2020-01-01T00:00:00"));
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("/functions/v1/chat"));
    assert_eq!(app.mock().calls(), calls);
    let stored = ok(api.get(&format!("/v1/sessions/{sid}/messages")).await, 200).await;
    assert_eq!(stored["data"].as_array().unwrap().len(), 4);
}

#[test]
fn an_invalid_sunset_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, key) in [
        (
            "[[sessions.retired_paths]]\npath = \"/functions/v1/chatting\"\nsunset = \"next year\"\n",
            "sessions.retired_paths[0].sunset",
        ),
        (
            "[[sessions.retired_paths]]\npath = \"/a\"\nsunset = \"2999-01-01\"\n\
             [[sessions.retired_paths]]\npath = \"/b\"\nsunset = \"2999-02-30\"\n",
            "sessions.retired_paths[1].sunset",
        ),
        (
            "[[sessions.retired_paths]]\npath = \"/a\"\ndeprecated = \"2026-13-01\"\nsunset = \"2999-01-01\"\n",
            "sessions.retired_paths[0].deprecated",
        ),
    ] {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://sy.db\"\n{toml}"
        );
        std::fs::write(dir.path().join("bad.toml"), config).unwrap();
        let mut child = std::process::Command::new(BIN)
            .args(["--config", "bad.toml", "serve"])
            .current_dir(dir.path())
            .env_remove("SWITCHYARD_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the server started with {toml}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

// ---- PostgreSQL ----

/// The same state and data-rights flows on PostgreSQL.
#[tokio::test]
async fn postgres_state_and_data_rights() {
    let Some(pg) = crate::ops::pg_url() else {
        return;
    };
    let app = app()
        .postgres(&pg)
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config(FAST_EVENTS)
        .spawn()
        .await;
    state_merges(&Api::key(&app, ADMIN)).await;
    data_rights(&app).await;
}

/// A reply still running when the grace period ends, after its client
/// left (so no request is in flight and the HTTP side finished in time), is
/// stopped and stored as failed with `server_shutdown`, not left to be
/// found `streaming` (and marked interrupted) at the next start.
#[tokio::test]
async fn a_detached_reply_running_past_the_grace_period_is_stopped_and_stored() {
    let mut first = app()
        .env("SWITCHYARD_SERVER__SHUTDOWN_GRACE_SECS", "1")
        .spawn()
        .await;
    let (_, session) = setup(&Api::open(&first)).await;
    let sid = id(&session);
    first.mock().push_fault(Fault::Hang);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let left = client
        .post(first.url(&format!("/v1/sessions/{sid}/messages")))
        .json(&json!({"content": "hi"}))
        .send()
        .await;
    // The answer's head may come at once; its body does not, and the
    // client gives up on it.
    if let Ok(r) = left {
        assert!(r.text().await.is_err(), "the reply cannot have completed");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while first.mock().calls() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(first.stop_gracefully().await.success());

    let second = app().store_url(&first.store_url).spawn().await;
    let listed = ok(
        Api::open(&second)
            .get(&format!("/v1/sessions/{sid}/messages"))
            .await,
        200,
    )
    .await;
    let data = listed["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{listed}");
    assert_eq!(data[1]["status"], "failed", "{listed}");
    assert_eq!(data[1]["error"]["code"], "server_shutdown", "{listed}");
}
