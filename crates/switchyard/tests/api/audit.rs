//! The credential cache and the audit log over HTTP (issue 4, items 3 and
//! 9): the cache's figures and who may empty it; the audit listing's
//! filters, bounds and pagination.

use reqwest::Method;
use serde_json::{json, Value};
use switchyard_testkit::TestApp;

use crate::helpers::{app, chat_body};

const OPERATOR: &str = "audit-bootstrap-admin-key-0123456789abcdef01234";

async fn spawn() -> TestApp {
    app().env("SWITCHYARD_ADMIN_KEY", OPERATOR).spawn().await
}

/// Status, body, and the request's trace id (from `traceparent`).
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value, String) {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let trace = resp
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|tp| tp.split('-').nth(1))
        .unwrap_or_default()
        .to_owned();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, trace)
}

async fn get(app: &TestApp, path: &str, key: &str) -> Value {
    let (status, body, _) = send(app, Method::GET, path, key, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

async fn create_key(app: &TestApp, body: Value) -> Value {
    let (status, v, _) = send(app, Method::POST, "/v1/admin/keys", OPERATOR, Some(body)).await;
    assert_eq!(status, 201, "{v}");
    v
}

async fn chat(app: &TestApp, key: &str) -> u16 {
    send(
        app,
        Method::POST,
        "/v1/chat/completions",
        key,
        Some(chat_body("gpt-4o-mini")),
    )
    .await
    .0
}

fn stats(size: u64, hits: u64, misses: u64) -> Value {
    json!({"size": size, "hits": hits, "misses": misses, "hit_rate": hits as f64 / (hits + misses) as f64})
}

// ---- the credential cache ------------------------------------------------

#[tokio::test]
async fn the_credential_cache_reports_its_size_and_hit_rate_and_only_the_operator_reads_or_empties_it(
) {
    let app = spawn().await;

    // Each request authenticates once: the first use of a credential is a
    // miss that caches it, every later use a hit; an unknown key is a miss
    // that caches nothing.
    assert_eq!(
        get(&app, "/v1/admin/auth-cache", OPERATOR).await,
        stats(1, 0, 1)
    );
    let user = create_key(&app, json!({"name": "u", "role": "user"})).await; // hit
    let user = user["key"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(chat(&app, &user).await, 200); // miss, hit, hit
    }
    let unknown = "sy_0000000000000000000000000000000000000000000";
    assert_eq!(chat(&app, unknown).await, 401); // miss
    assert_eq!(
        get(&app, "/v1/admin/auth-cache", OPERATOR).await,
        stats(2, 4, 3)
    );

    // A tenant's admin may not drop every tenant's credentials. (The
    // operator: hit, hit; acme's admin: miss; the operator: hit.)
    let (s, _, _) = send(
        &app,
        Method::POST,
        "/v1/admin/tenants",
        OPERATOR,
        Some(json!({"id": "acme"})),
    )
    .await;
    assert_eq!(s, 201);
    let acme = create_key(
        &app,
        json!({"name": "acme admin", "role": "admin", "tenant_id": "acme"}),
    )
    .await;
    let acme = acme["key"].as_str().unwrap().to_owned();
    let (s, refused, _) = send(
        &app,
        Method::POST,
        "/v1/admin/auth-cache/invalidate",
        &acme,
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(s, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    // Nor read figures that count every tenant's credentials (a hit).
    let (s, refused, _) = send(&app, Method::GET, "/v1/admin/auth-cache", &acme, None).await;
    assert_eq!(s, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    assert_eq!(
        get(&app, "/v1/admin/auth-cache", OPERATOR).await["size"],
        3,
        "nothing was dropped"
    );

    // The operator may (hit).
    let (s, dropped, trace) = send(
        &app,
        Method::POST,
        "/v1/admin/auth-cache/invalidate",
        OPERATOR,
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!((s, dropped), (200, json!({"dropped": 3})));
    // Counts are kept; the operator's own key is verified (and cached) anew:
    // a miss.
    assert_eq!(
        get(&app, "/v1/admin/auth-cache", OPERATOR).await,
        stats(1, 9, 5)
    );
    assert_eq!(
        chat(&app, &user).await,
        200,
        "a dropped key is verified again"
    );

    // The invalidation is audited with its actor and trace; the refusal is not.
    let keys = get(&app, "/v1/admin/keys", OPERATOR).await;
    let operator_id = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| OPERATOR.starts_with(k["prefix"].as_str().unwrap()))
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("{keys}"));
    let audit = get(
        &app,
        "/v1/admin/audit?action=auth_cache.invalidated",
        OPERATOR,
    )
    .await;
    let rows = audit["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{audit}");
    assert_eq!(rows[0]["actor"], format!("key:{operator_id}"));
    assert_eq!(rows[0]["target"], "all");
    assert_eq!(rows[0]["detail"], json!({"dropped": 3}));
    assert_eq!(rows[0]["trace_id"], trace);
    let theirs = get(
        &app,
        "/v1/admin/audit?action=auth_cache.invalidated&tenant_id=acme",
        OPERATOR,
    )
    .await;
    assert_eq!(theirs["data"], json!([]));
}

// ---- the audit log ----------------------------------------------------------

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every row a query gives, page by page through `next_cursor`.
async fn walk(app: &TestApp, query: &str, limit: u32) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut path = format!("/v1/admin/audit?{query}&limit={limit}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = get(app, &path, OPERATOR).await;
        let data = page["data"].as_array().unwrap();
        assert!(data.len() <= limit as usize, "{page}");
        rows.extend(data.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(
                    data.len(),
                    limit as usize,
                    "a cursor only after a full page"
                );
                assert_eq!(Some(c), data.last().unwrap()["id"].as_str());
                cursor = Some(c.to_owned());
            }
            None => return rows,
        }
    }
    panic!("the pages of {query} never ended");
}

#[tokio::test]
async fn the_audit_log_filters_by_actor_and_time_and_pages_through_every_row_once() {
    let app = spawn().await;
    let second = create_key(&app, json!({"name": "second admin", "role": "admin"})).await;
    let second_key = second["key"].as_str().unwrap().to_owned();
    let second_actor = format!("key:{}", second["id"].as_str().unwrap());
    for i in 0..4 {
        create_key(&app, json!({"name": format!("by operator {i}")})).await;
        let (s, v, _) = send(
            &app,
            Method::POST,
            "/v1/admin/keys",
            &second_key,
            Some(json!({"name": format!("by second {i}")})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, v, _) = send(
        &app,
        Method::POST,
        "/v1/admin/rate-limits/reset",
        &second_key,
        Some(json!({"user_id": "u1"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    let all = get(&app, "/v1/admin/audit?limit=500", OPERATOR).await;
    let all = all["data"].as_array().unwrap().clone();
    assert_eq!(
        all.len(),
        10,
        "5 keys by the operator, 4 + a reset by the second: {all:?}"
    );
    let mut newest_first = ids(&all);
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids(&all), newest_first, "newest first");

    // Actor, alone and with an action.
    let by_second = get(
        &app,
        &format!("/v1/admin/audit?limit=500&actor={second_actor}"),
        OPERATOR,
    )
    .await;
    let expected: Vec<Value> = all
        .iter()
        .filter(|r| r["actor"] == second_actor.as_str())
        .cloned()
        .collect();
    assert_eq!(expected.len(), 5);
    assert_eq!(by_second["data"].as_array().unwrap(), &expected);
    let resets = get(
        &app,
        &format!("/v1/admin/audit?actor={second_actor}&action=rate_limit.reset"),
        OPERATOR,
    )
    .await;
    assert_eq!(ids(resets["data"].as_array().unwrap()), ids(&expected[..1]));
    let nobody = get(&app, "/v1/admin/audit?actor=key:nobody", OPERATOR).await;
    assert_eq!(nobody["data"], json!([]));

    // `since` (inclusive) and `until` (exclusive) are unix seconds: a row at
    // t ms is in [s, s+1) for s = ⌊t / 1000⌋, and nowhere else.
    let secs: std::collections::BTreeSet<i64> = all
        .iter()
        .map(|r| r["created_at_ms"].as_i64().unwrap().div_euclid(1000))
        .collect();
    let (first, last) = (*secs.first().unwrap(), *secs.last().unwrap());
    for s in first..=last + 1 {
        let within = |lo: Option<i64>, hi: Option<i64>| -> Vec<String> {
            let rows: Vec<Value> = all
                .iter()
                .filter(|r| {
                    let ms = r["created_at_ms"].as_i64().unwrap();
                    lo.is_none_or(|lo| ms >= lo * 1000) && hi.is_none_or(|hi| ms < hi * 1000)
                })
                .cloned()
                .collect();
            ids(&rows)
        };
        for (query, lo, hi) in [
            (format!("since={s}"), Some(s), None),
            (format!("until={s}"), None, Some(s)),
            (format!("since={s}&until={}", s + 1), Some(s), Some(s + 1)),
        ] {
            let got = get(
                &app,
                &format!("/v1/admin/audit?limit=500&{query}"),
                OPERATOR,
            )
            .await;
            assert_eq!(
                ids(got["data"].as_array().unwrap()),
                within(lo, hi),
                "{query}"
            );
        }
    }
    let everything = format!("since={first}&until={}", last + 1);
    let got = get(
        &app,
        &format!("/v1/admin/audit?limit=500&{everything}"),
        OPERATOR,
    )
    .await;
    assert_eq!(ids(got["data"].as_array().unwrap()), ids(&all));

    // Pages of any size walk every row exactly once, in order, also when
    // filtered.
    for limit in [1, 2, 3, 4, 10, 11] {
        assert_eq!(ids(&walk(&app, "action=key.created", limit).await), {
            let created: Vec<Value> = all
                .iter()
                .filter(|r| r["action"] == "key.created")
                .cloned()
                .collect();
            ids(&created)
        });
        assert_eq!(
            ids(&walk(&app, &format!("actor={second_actor}"), limit).await),
            ids(&expected),
            "limit {limit}"
        );
    }
}

#[tokio::test]
async fn audit_query_numbers_out_of_range_or_malformed_are_refused_naming_them() {
    let app = spawn().await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=99999999999", "limit"),
        ("limit=", "limit"),
        ("since=yesterday", "since"),
        ("until=1.5", "until"),
    ] {
        let (status, body, _) = send(
            &app,
            Method::GET,
            &format!("/v1/admin/audit?{query}"),
            OPERATOR,
            None,
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{query}: {body}");
        assert_eq!(body["error"]["details"]["field"], field, "{query}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}`")),
            "{query}: {message}"
        );
    }
    for query in ["limit=1", "limit=500", "since=-5&until=99999999999999999"] {
        get(&app, &format!("/v1/admin/audit?{query}"), OPERATOR).await;
    }
    // A misspelt parameter is refused, not ignored (`tenant` for
    // `tenant_id` would read the caller's own tenant's events).
    let (status, body, _) = send(
        &app,
        Method::GET,
        "/v1/admin/audit?tenant=acme",
        OPERATOR,
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant"),
        "{body}"
    );
}

// ---- the audit log line ----------------------------------------------------

#[tokio::test]
async fn an_audit_line_names_what_it_acted_on_without_hiding_its_own_target() {
    // The line's `target` is the module that logged it; the audited object
    // was logged under the same key, and a reader kept only one of them.
    let app = spawn().await;

    let key = create_key(&app, json!({"name": "audited"})).await;

    let line = app
        .wait_for_log(|l| l.contains("\"message\":\"audit\""))
        .await
        .expect("the audit line");
    assert_eq!(line.matches("\"target\":").count(), 1, "{line}");
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        line["audit_target"],
        format!("key:{}", key["id"].as_str().unwrap()),
        "{line}"
    );
    assert!(
        line["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("switchyard_engine")),
        "{line}"
    );
}
