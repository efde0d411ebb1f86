//! Rate limits over HTTP: exact GCRA refusals with the IETF headers, and two
//! instances sharing one limit through Redis.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{app, chat_body};

const ADMIN: &str = "limits-admin-key-0123456789abcdef0123456789";

#[tokio::test]
async fn a_key_limit_refuses_past_its_burst_with_429_and_the_ietf_headers() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let created: Value = app
        .client
        .post(app.url("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "tight", "limits": {"rates": {"chat": "3/min"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["key"].as_str().unwrap();
    let chat = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };
    for remaining in [2, 1, 0] {
        let resp = chat().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["ratelimit-policy"], "\"chat\";q=3;w=60");
        let rl = resp.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            rl.starts_with(&format!("\"chat\";r={remaining};t=")),
            "{rl}"
        );
        // The same in OpenAI's headers.
        assert_eq!(resp.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            resp.headers()["x-ratelimit-remaining-requests"],
            remaining.to_string().as_str()
        );
        assert!(resp.headers()["x-ratelimit-reset-requests"]
            .to_str()
            .unwrap()
            .ends_with('s'));
    }
    let resp = chat().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=20).contains(&retry),
        "one request comes back every 20 s: {retry}"
    );
    assert!(resp.headers()["ratelimit"]
        .to_str()
        .unwrap()
        .contains("r=0"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(
        app.mock().calls(),
        3,
        "a refused request never reaches the provider"
    );

    // Other classes and keys are unaffected.
    let models = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), StatusCode::OK);
    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(ADMIN)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["ratelimit-policy"],
        "\"chat\";q=20;w=60",
        "the class default"
    );
}

#[tokio::test]
async fn a_request_refused_by_its_class_takes_nothing_from_the_global_limit() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let created = post_key(
        &app,
        json!({"name": "classy", "limits": {"rates": {"chat": "2/min", "global": "4/min"}}}),
    )
    .await;
    let key = created["key"].as_str().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let resp = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let body: Value = resp.json().await.unwrap();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("`chat`"),
                "{body}"
            );
        }
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429, 429]);
    // The five refusals spent none of the global 4/min: two requests are left.
    let models = || {
        app.client
            .get(app.url("/v1/models"))
            .bearer_auth(key)
            .send()
    };
    for remaining in [1, 0] {
        let resp = models().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["ratelimit-policy"], "\"global\";q=4;w=60");
        let rl = resp.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            rl.starts_with(&format!("\"global\";r={remaining};")),
            "{rl}"
        );
    }
    let resp = models().await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`global`"));
}

fn hs256(claims: Value, secret: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use hmac::Mac;
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "typ": "JWT"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// The same user (a JWT subject) on two instances that share Redis: 200
/// concurrent requests against a limit of 30 admit exactly 30.
#[tokio::test]
async fn two_instances_sharing_redis_never_admit_more_than_the_limit() {
    let Some(redis) = crate::helpers::test_redis_url() else {
        return;
    };
    let secret = "shared-jwt-secret-for-two-instances-0123456789";
    let namespace = format!("rl-test-{}", std::process::id());
    let user = format!("user-{namespace}-{}", rand_suffix());
    let config = "[rate_limits.classes]\nchat = \"30/hour\"\nglobal = \"1000/hour\"\n".to_string();
    let spawn = || {
        app()
            .env("SWITCHYARD_JWT__HS256_SECRET", secret)
            .env("SWITCHYARD_RATE_LIMITS__REDIS_URL", &redis)
            .config(&config)
            .spawn()
    };
    let (a, b) = tokio::join!(spawn(), spawn());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = hs256(
        json!({"sub": user, "role": "authenticated", "exp": exp}),
        secret,
    );
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (client, url) = if i % 2 == 0 {
            (a.client.clone(), a.url("/v1/chat/completions"))
        } else {
            (b.client.clone(), b.url("/v1/chat/completions"))
        };
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&chat_body("gpt-4o-mini"))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (30, 170));
    assert_eq!(a.mock().calls() + b.mock().calls(), 30);
}

/// Guesses spread over two instances that share Redis count against one
/// allowance: three failures in all, then both instances refuse the
/// address, and the audit event is written once, by the instance whose
/// failure used the allowance up.
#[tokio::test]
async fn failed_authentications_are_counted_across_instances_sharing_redis() {
    let Some(redis) = crate::helpers::test_redis_url() else {
        return;
    };
    let spawn = || {
        app()
            .env("SWITCHYARD_ADMIN_KEY", ADMIN)
            .env("SWITCHYARD_RATE_LIMITS__REDIS_URL", &redis)
            .config("[rate_limits]\nauth_failures = \"3/hour\"\n")
            .spawn()
    };
    let (a, b) = tokio::join!(spawn(), spawn());
    // The count is per address and Redis outlives a test run: a loopback
    // address of this run's own (all of 127/8 reaches the server).
    let n = rand_suffix();
    let source = std::net::Ipv4Addr::new(
        127,
        1 + (n % 250) as u8,
        (n >> 8) as u8,
        1 + ((n >> 16) % 250) as u8,
    );
    let client = reqwest::Client::builder()
        .local_address(std::net::IpAddr::V4(source))
        .build()
        .unwrap();
    let bad = "sy_0000000000000000000000000000000000000000000";
    let send = |app: &switchyard_testkit::TestApp, key: &'static str| {
        client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };
    // The admin key works from this address on both, and is then cached.
    assert_eq!(send(&a, ADMIN).await.unwrap().status(), StatusCode::OK);
    assert_eq!(send(&b, ADMIN).await.unwrap().status(), StatusCode::OK);
    for app in [&a, &a, &b] {
        assert_eq!(
            send(app, bad).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    for app in [&b, &a] {
        let resp = send(app, bad).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            app.url("/")
        );
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "too_many_auth_failures");
    }
    // The key both have verified and cached still works from this address:
    // the guesses of someone else there do not lock out its clients.
    assert_eq!(send(&a, ADMIN).await.unwrap().status(), StatusCode::OK);
    assert_eq!(send(&b, ADMIN).await.unwrap().status(), StatusCode::OK);
    // Another address is not affected.
    let other = a
        .client
        .post(a.url("/v1/chat/completions"))
        .bearer_auth(ADMIN)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);

    let audits = |app| async move {
        let store = crate::helpers::app_store(app).await;
        store
            .list_audit(
                "default",
                &switchyard_core::identity::AuditQuery {
                    action: Some("auth.failures".into()),
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    };
    assert_eq!(audits(&a).await.len(), 0);
    let events = audits(&b).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].target.as_deref(),
        Some(format!("ip:{source}").as_str())
    );
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Spend already in the usage log, as the usage writer would have put it.
async fn spend(app: &switchyard_testkit::TestApp, tenant: &str, key_id: Option<&str>, usd: f64) {
    let store = crate::helpers::app_store(app).await;
    let mut row = switchyard_store::conformance::sample_usage(tenant, 1);
    row.id = switchyard_core::usage::new_id();
    row.key_id = key_id.map(str::to_owned);
    row.cost_usd = Some(usd);
    row.created_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    store.insert_usage(&[row]).await.unwrap();
}

async fn post_key(app: &switchyard_testkit::TestApp, body: Value) -> Value {
    let resp = app
        .client
        .post(app.url("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn a_spent_monthly_budget_refuses_model_calls_and_80_percent_is_audited() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let near = post_key(
        &app,
        json!({"name": "near", "limits": {"monthly_budget_usd": 1.0}}),
    )
    .await;
    let over = post_key(
        &app,
        json!({"name": "over", "limits": {"monthly_budget_usd": 1.0}}),
    )
    .await;
    spend(&app, "default", near["id"].as_str(), 0.85).await;
    spend(&app, "default", over["id"].as_str(), 1.25).await;
    let chat = |key: &str| {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key.to_owned())
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };

    assert_eq!(
        chat(near["key"].as_str().unwrap()).await.unwrap().status(),
        StatusCode::OK
    );
    let resp = chat(over["key"].as_str().unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // Retrying cannot help until the month turns: the SDKs' retry loops
    // stop on this header.
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert!(resp.headers().get("retry-after").is_none());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("key"));
    assert_eq!(app.mock().calls(), 1);

    let audit: Value =
        crate::helpers::get_json_as(&app, "/v1/admin/audit?action=budget.alert", ADMIN).await;
    // Both crossed 80 %: `over` went past its budget between two reads,
    // and is alerted all the same.
    let alerts = audit["data"].as_array().unwrap();
    assert_eq!(alerts.len(), 2, "{audit}");
    for (key, spent) in [(&near, 0.85), (&over, 1.25)] {
        let target = format!("key:{}", key["id"].as_str().unwrap());
        let alert = alerts.iter().find(|a| a["target"] == target.as_str());
        let alert = alert.unwrap_or_else(|| panic!("no alert for {target}: {audit}"));
        assert_eq!(alert["detail"]["spent_usd"], spent);
        // The request that found it over.
        assert!(
            alert["trace_id"].as_str().is_some_and(|t| t.len() == 32),
            "{alert}"
        );
    }

    // A tenant's budget covers all its keys.
    let t = app
        .client
        .post(app.url("/v1/admin/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "frugal", "monthly_budget_usd": 2.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(t.status(), StatusCode::CREATED);
    let k = post_key(&app, json!({"name": "frugal key", "tenant_id": "frugal"})).await;
    spend(&app, "frugal", None, 2.5).await;
    let resp = app
        .client
        .post(app.url("/v1/embeddings"))
        .bearer_auth(k["key"].as_str().unwrap())
        .json(&json!({"model": "text-embedding-3-small", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant"),
        "{body}"
    );
    // Non-model routes still answer.
    let models = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(k["key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), StatusCode::OK);
}

/// What a call costs counts against the budget as soon as the call ends,
/// not when its usage row has been stored and the spend read again (which
/// let a client spend many times its budget within the few seconds the
/// spend is cached). The key's and the tenant's budgets both.
#[tokio::test]
async fn a_calls_cost_counts_against_the_budget_at_once() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config(
            "[models.pricey]\nprovider = \"mock\"\nmodel = \"pricey-upstream\"\n\n\
             [pricing.pricey-upstream]\ninput_per_mtok = 1000.0\noutput_per_mtok = 1000.0\n",
        )
        .spawn()
        .await;
    let t = app
        .client
        .post(app.url("/v1/admin/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "thrifty"}))
        .send()
        .await
        .unwrap();
    assert_eq!(t.status(), StatusCode::CREATED);
    let chat = |key: String| {
        let req = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("pricey"));
        async move { req.send().await.unwrap() }
    };
    // What one call costs: $1,000 per million tokens, either kind.
    let probe = post_key(&app, json!({"name": "probe", "tenant_id": "thrifty"})).await;
    let first = chat(probe["key"].as_str().unwrap().to_owned()).await;
    assert_eq!(first.status(), StatusCode::OK);
    let usage: Value = first.json().await.unwrap();
    let cost = usage["usage"]["total_tokens"].as_f64().unwrap() * 1000.0 / 1e6;
    assert!(cost > 0.0, "{usage}");

    // A key with a budget of three calls and a half: four calls, then
    // refusals, however fast they come.
    let budget = cost * 3.5;
    let k = post_key(
        &app,
        json!({"name": "thrifty key", "tenant_id": "thrifty", "limits": {"monthly_budget_usd": budget}}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(chat(k["key"].as_str().unwrap().to_owned()).await.status());
    }
    let served = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(served, 4, "{statuses:?}");
    assert!(statuses[4..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));

    // The tenant's budget, spent by several keys: five calls in all
    // (the probe's and the key's) are past a budget of 5.5 calls' worth
    // after one more. The tenant's spend is read from the store for the
    // first time then, so the five rows are let reach it first (the
    // batched writer's lag, ~10 ms, is what a budget may be overshot by).
    let store = crate::helpers::app_store(&app).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.spend_since("thrifty", None, 0).await.unwrap() < cost * 4.5 {
        assert!(
            std::time::Instant::now() < deadline,
            "usage rows not written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let t = app
        .client
        .patch(app.url("/v1/admin/tenants/thrifty"))
        .bearer_auth(ADMIN)
        .json(&json!({"monthly_budget_usd": cost * 5.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(t.status(), StatusCode::OK);
    let t: Value = t.json().await.unwrap();
    assert_eq!(t["monthly_budget_usd"], cost * 5.5);
    let other = post_key(&app, json!({"name": "other", "tenant_id": "thrifty"})).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            chat(other["key"].as_str().unwrap().to_owned())
                .await
                .status(),
        );
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
}

/// Over HTTP, for a key budget and a tenant budget: spend at 79 % never
/// alerts, however many requests see it; spend past 80 % alerts once, not
/// once per request. (Crossing on one subject, which needs the spend cache
/// to expire, is in the engine's budget tests on a controlled clock.)
#[tokio::test]
async fn a_budget_alert_is_audited_once_past_80_percent_and_never_below() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let audit = |tenant: &'static str| {
        let req = app
            .client
            .get(app.url(&format!(
                "/v1/admin/audit?action=budget.alert&tenant_id={tenant}"
            )))
            .bearer_auth(ADMIN);
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            v["data"].as_array().unwrap().clone()
        }
    };
    let chat = |key: String| {
        let req = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"));
        async move { req.send().await.unwrap().status() }
    };
    for (tenant, budget) in [("under", 10.0), ("over", 10.0)] {
        let t = app
            .client
            .post(app.url("/v1/admin/tenants"))
            .bearer_auth(ADMIN)
            .json(&json!({"id": tenant, "monthly_budget_usd": budget}))
            .send()
            .await
            .unwrap();
        assert_eq!(t.status(), StatusCode::CREATED);
    }
    let key = |name: &str, tenant: &str, budget: Option<f64>| json!({"name": name, "tenant_id": tenant, "limits": {"monthly_budget_usd": budget}});
    // Key budgets of $1 in tenant `default` (no tenant budget).
    let key_under = post_key(&app, key("79 %", "default", Some(1.0))).await;
    let key_over = post_key(&app, key("81 %", "default", Some(1.0))).await;
    spend(&app, "default", key_under["id"].as_str(), 0.79).await;
    spend(&app, "default", key_over["id"].as_str(), 0.81).await;
    // Tenant budgets of $10, spent by another key of the tenant.
    let in_under = post_key(&app, key("in under", "under", None)).await;
    let in_over = post_key(&app, key("in over", "over", None)).await;
    spend(&app, "under", Some("earlier-key"), 7.9).await;
    spend(&app, "over", Some("earlier-key"), 8.1).await;

    for k in [&key_under, &key_over, &in_under, &in_over] {
        for _ in 0..4 {
            assert_eq!(
                chat(k["key"].as_str().unwrap().to_owned()).await,
                StatusCode::OK
            );
        }
    }

    let alerts = audit("default").await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        alerts[0]["target"],
        format!("key:{}", key_over["id"].as_str().unwrap())
    );
    assert_eq!(alerts[0]["detail"]["scope"], "key");
    assert!(audit("under").await.is_empty());
    let alerts = audit("over").await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["target"], "tenant:over");
    assert_eq!(alerts[0]["detail"]["spent_usd"], 8.1);
}

#[tokio::test]
async fn repeated_authentication_failures_from_one_address_are_limited_and_audited() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config("[rate_limits]\nauth_failures = \"3/hour\"\n")
        .spawn()
        .await;
    let bad = "sy_0000000000000000000000000000000000000000000";
    let status = |key: &str| {
        let req = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"));
        async move { req.send().await.unwrap() }
    };
    // A client at the same address (an office behind one NAT) that has
    // been using its key.
    let working = post_key(&app, json!({"name": "in use"})).await;
    let working = working["key"].as_str().unwrap();
    assert_eq!(status(working).await.status(), StatusCode::OK);
    let unused = post_key(&app, json!({"name": "not used yet"})).await;
    let unused = unused["key"].as_str().unwrap();
    for _ in 0..3 {
        assert_eq!(status(bad).await.status(), StatusCode::UNAUTHORIZED);
    }
    let blocked = status(bad).await;
    assert_eq!(blocked.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(blocked.headers()["retry-after"], "1200");
    assert_eq!(
        blocked.headers()["ratelimit-policy"],
        "\"auth_failures\";q=3;w=3600"
    );
    let rl = blocked.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(rl.starts_with("\"auth_failures\";r=0;t="), "{rl}");
    let v: Value = blocked.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_auth_failures");
    let even_good = status(unused).await;
    assert_eq!(
        even_good.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the address is blocked, whatever new credential it sends"
    );
    assert_eq!(
        status(working).await.status(),
        StatusCode::OK,
        "a key verified recently is not locked out by someone else's guesses"
    );
    // Requests without a credential are not failures (open routes, SDK probes).
    let health = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let events = auth_failure_events(&app).await;
    assert_eq!(events.len(), 1, "one aggregated event, not one per failure");
    assert_eq!(events[0].target.as_deref(), Some("ip:127.0.0.1"));
}

/// The `auth.failures` audit events of tenant `default`.
async fn auth_failure_events(
    app: &switchyard_testkit::TestApp,
) -> Vec<switchyard_core::identity::AuditRecord> {
    let q = switchyard_core::identity::AuditQuery {
        action: Some("auth.failures".into()),
        limit: 10,
        ..Default::default()
    };
    let store = crate::helpers::app_store(app).await;
    store.list_audit("default", &q).await.unwrap()
}

/// Guesses paced to the refilling allowance (one each time it lets one
/// through) write one audit event for the window, not one per guess.
#[tokio::test]
async fn paced_guesses_write_one_auth_failures_event_per_window() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config("[rate_limits]\nauth_failures = \"3/6s\"\n")
        .spawn()
        .await;
    let guess = || {
        app.client
            .get(app.url("/v1/models"))
            .bearer_auth("sy_0000000000000000000000000000000000000000000")
            .send()
    };
    for _ in 0..3 {
        assert_eq!(guess().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        guess().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // One more guess each time the allowance refills (every 2 s).
    for _ in 0..2 {
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert_eq!(guess().await.unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            guess().await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    let events = auth_failure_events(&app).await;
    assert_eq!(events.len(), 1, "{events:?}");
}

/// A key made with `body` (a `chat` allowance of one), and a chat request
/// made with it, already used once and refused once.
async fn key_with_spent_chat(
    app: &switchyard_testkit::TestApp,
    body: Value,
) -> (Value, reqwest::RequestBuilder) {
    let k = post_key(app, body).await;
    let chat = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(k["key"].as_str().unwrap())
        .json(&chat_body("gpt-4o-mini"));
    let status = |c: &reqwest::RequestBuilder| c.try_clone().unwrap().send();
    assert_eq!(status(&chat).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        status(&chat).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    (k, chat)
}

async fn reset_limits(
    app: &switchyard_testkit::TestApp,
    body: Value,
) -> reqwest::Result<reqwest::Response> {
    app.client
        .post(app.url("/v1/admin/rate-limits/reset"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
}

/// Resetting a user resets the keys made for that user too (their counts
/// are the keys'; it reset nothing for them before); a tenant that does not
/// exist is a 404, not a `{"reset": 0}` audited under a made-up tenant; an
/// empty user id is refused.
#[tokio::test]
async fn resetting_a_user_resets_its_keys_and_unknown_tenants_are_404() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let (_, chat) = key_with_spent_chat(
        &app,
        json!({"name": "bob's", "user_id": "bob", "role": "user", "limits": {"rates": {"chat": "1/hour"}}}),
    )
    .await;
    let chat = || chat.try_clone().unwrap().send();
    let reset = |body: Value| reset_limits(&app, body);
    let resp = reset(json!({"user_id": "bob"})).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["reset"], 2, "the key's global and chat: {v}");
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);

    let resp = reset(json!({"user_id": "x", "tenant_id": "no-such-tenant"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    let resp = reset(json!({"user_id": ""})).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

/// A tenant's settings change through `PATCH /v1/admin/tenants/{id}`:
/// `default` too (it has no row until then); an unknown tenant is a 404,
/// a bad rate or name a 400; the change is audited with before and after.
#[tokio::test]
async fn an_operator_changes_a_tenant_and_the_change_is_audited() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let patch = |id: &str, body: Value| {
        app.client
            .patch(app.url(&format!("/v1/admin/tenants/{id}")))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    // Changes sent at once all land, the first ones (which make the
    // `default` row) too: none undoes another.
    for i in 0..5 {
        let (a, b) = tokio::join!(
            patch("default", json!({"name": format!("n{i}")})),
            patch("default", json!({"monthly_budget_usd": f64::from(i)})),
        );
        assert_eq!(a.unwrap().status(), StatusCode::OK);
        assert_eq!(b.unwrap().status(), StatusCode::OK);
        let t = crate::helpers::get_json_as(&app, "/v1/admin/tenants", ADMIN).await;
        let default = t["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == "default")
            .cloned();
        let default = default.unwrap_or_else(|| panic!("{t}"));
        assert_eq!(
            (
                default["name"].clone(),
                default["monthly_budget_usd"].clone()
            ),
            (json!(format!("n{i}")), json!(f64::from(i)))
        );
    }
    let resp = patch(
        "default",
        json!({"monthly_budget_usd": 12.5, "limits": {"chat": "5/min"}}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let t: Value = resp.json().await.unwrap();
    assert_eq!(
        (t["id"].as_str(), t["monthly_budget_usd"].as_f64()),
        (Some("default"), Some(12.5))
    );
    assert_eq!(t["limits"]["chat"], "5/min");
    // `null` removes the budget; what is left out stays.
    let t: Value = patch("default", json!({"monthly_budget_usd": null}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (t["monthly_budget_usd"].clone(), t["limits"]["chat"].clone()),
        (Value::Null, json!("5/min"))
    );

    let missing = patch("nope", json!({"name": "x"})).await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    for (body, field) in [
        (json!({"limits": {"chat": "5/fortnight"}}), "limits.chat"),
        (json!({"name": "n".repeat(201)}), "name"),
        (json!({"monthly_budget_usd": -1}), "monthly_budget_usd"),
    ] {
        let resp = patch("default", body.clone()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    let audit: Value =
        crate::helpers::get_json_as(&app, "/v1/admin/audit?action=tenant.updated", ADMIN).await;
    let rows = audit["data"].as_array().unwrap();
    assert_eq!(rows.len(), 12, "{audit}");
    assert_eq!(rows[0]["detail"]["before"]["monthly_budget_usd"], 12.5);
    assert_eq!(
        rows[0]["detail"]["after"]["monthly_budget_usd"],
        Value::Null
    );

    // A key's limits are in its creation's audit row.
    post_key(
        &app,
        json!({"name": "capped", "limits": {"tokens_per_minute": 100}}),
    )
    .await;
    let audit: Value =
        crate::helpers::get_json_as(&app, "/v1/admin/audit?action=key.created", ADMIN).await;
    assert_eq!(
        audit["data"][0]["detail"]["limits"]["tokens_per_minute"], 100,
        "{audit}"
    );
}

/// `bots` limits making and changing bots: reading them (an app listing
/// its bots) counts in `global` alone.
#[tokio::test]
async fn reading_bots_does_not_use_up_the_bots_class() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let k = post_key(
        &app,
        json!({"name": "bots", "role": "admin", "limits": {"rates": {"bots": "2/hour"}}}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    for _ in 0..5 {
        let list = app
            .client
            .get(app.url("/v1/bots"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(list.status(), StatusCode::OK);
    }
    let make = || {
        app.client
            .post(app.url("/v1/bots"))
            .bearer_auth(key)
            .json(&json!({"name": "b", "model": "gpt-4o-mini"}))
            .send()
    };
    assert_eq!(make().await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(make().await.unwrap().status(), StatusCode::CREATED);
    let third = make().await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.headers()["ratelimit-policy"], "\"bots\";q=2;w=3600");
}

#[tokio::test]
async fn an_admin_resets_a_keys_rate_limit_and_the_reset_is_audited() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let (k, chat) = key_with_spent_chat(
        &app,
        json!({"name": "tight", "limits": {"rates": {"chat": "1/hour"}}}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let chat = || chat.try_clone().unwrap().send();
    let reset = |body: Value| reset_limits(&app, body);
    let resp = reset(json!({"key_id": k["id"]})).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["reset"], 2, "global and chat: {v}");
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);

    let bad = reset(json!({"key_id": "nope"})).await.unwrap();
    assert_eq!(bad.status(), StatusCode::NOT_FOUND);
    let both = reset(json!({"key_id": k["id"], "user_id": "u"}))
        .await
        .unwrap();
    assert_eq!(both.status(), StatusCode::BAD_REQUEST);
    let user = app
        .client
        .post(app.url("/v1/admin/rate-limits/reset"))
        .bearer_auth(key)
        .json(&json!({"key_id": k["id"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(user.status(), StatusCode::FORBIDDEN);

    let app = &app;
    let resets = |query: &'static str| async move {
        app.client
            .get(app.url(&format!("/v1/admin/audit?action=rate_limit.reset{query}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let audit = resets("").await;
    assert_eq!(
        audit["data"][0]["target"],
        format!("key:{}", k["id"].as_str().unwrap())
    );

    // An operator resetting another tenant's key: that tenant's log says so.
    let tenant = app
        .client
        .post(app.url("/v1/admin/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(tenant.status(), StatusCode::CREATED);
    let other = post_key(app, json!({"name": "acme's", "tenant_id": "acme"})).await;
    let resp = reset(json!({"key_id": other["id"], "tenant_id": "acme"}))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let audit = resets("&tenant_id=acme").await;
    assert_eq!(
        audit["data"][0]["target"],
        format!("key:{}", other["id"].as_str().unwrap()),
        "{audit}"
    );
}

#[tokio::test]
async fn a_tenants_stored_limits_apply_to_its_keys_and_bad_rates_are_refused() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let create_tenant = |body: Value| {
        app.client
            .post(app.url("/v1/admin/tenants"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
    };
    let bad = create_tenant(json!({"id": "t2", "limits": {"chat": "5/fortnight"}}))
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let v: Value = bad.json().await.unwrap();
    assert_eq!(v["error"]["details"]["field"], "limits.chat");
    let misspelt = create_tenant(json!({"id": "t2", "limits": {"chatt": "2/min"}}))
        .await
        .unwrap();
    assert_eq!(misspelt.status(), StatusCode::BAD_REQUEST);
    let v: Value = misspelt.json().await.unwrap();
    assert_eq!(v["error"]["details"]["field"], "limits.chatt");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expected one of admin, bots, chat"));
    let ok = create_tenant(json!({"id": "t2", "limits": {"chat": "2/min"}}))
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);

    let k = post_key(&app, json!({"name": "k", "tenant_id": "t2"})).await;
    let key = k["key"].as_str().unwrap();
    let chat = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };
    let first = chat().await.unwrap();
    assert_eq!(first.headers()["ratelimit-policy"], "\"chat\";q=2;w=60");
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        chat().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let bad_key = app
        .client
        .post(app.url("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "x", "limits": {"rates": {"chat": "0/min"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), StatusCode::BAD_REQUEST);
    let v: Value = bad_key.json().await.unwrap();
    assert_eq!(v["error"]["details"]["field"], "limits.rates.chat");
}

#[tokio::test]
async fn a_token_per_minute_limit_counts_the_tokens_calls_used() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let k = post_key(
        &app,
        json!({"name": "tpm", "limits": {"tokens_per_minute": 5}}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let chat = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };
    let first = chat().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // OpenAI's token headers: the quota before this call's tokens are known.
    let header = |r: &reqwest::Response, n: &str| r.headers()[n].to_str().unwrap().to_owned();
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "5");
    assert_eq!(header(&first, "x-ratelimit-remaining-tokens"), "5");
    assert_eq!(header(&first, "x-ratelimit-reset-tokens"), "0s");
    let used: Value = first.json().await.unwrap();
    let tokens = used["usage"]["total_tokens"].as_u64().unwrap();
    assert!(
        tokens > 5,
        "the mock's answer uses more than the limit: {tokens}"
    );
    // The tokens are counted when the call's usage is known, just after it
    // (a task of its own, so a call sent at once may still pass).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut admitted = 1;
    let refused = loop {
        let resp = chat().await.unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            break resp;
        }
        assert_eq!(resp.status(), StatusCode::OK);
        admitted += 1;
        assert!(std::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(header(&refused, "x-ratelimit-limit-tokens"), "5");
    assert_eq!(header(&refused, "x-ratelimit-remaining-tokens"), "0");
    assert_ne!(header(&refused, "x-ratelimit-reset-tokens"), "0s");
    // At most the time the tokens of the admitted calls take to drain.
    assert!(
        retry >= 1 && retry <= 60 * tokens * admitted / 5,
        "{retry} s for {admitted} calls of {tokens} tokens"
    );
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Token limit"));
    // Every admitted call reached the provider, the refused one did not,
    // and neither does the next one.
    assert_eq!(app.mock().calls(), admitted);
    assert_eq!(
        chat().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(app.mock().calls(), admitted);
    // Other keys are not affected.
    let other = app
        .client
        .post(app.url("/v1/chat/completions"))
        .bearer_auth(ADMIN)
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
}

/// A token 429 spends nothing of the request limits (a client retrying a
/// spent token quota keeps its global quota) and carries the IETF headers
/// of its own policy, `tokens`.
#[tokio::test]
async fn a_token_refusal_takes_nothing_from_the_request_limits() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let k = post_key(
        &app,
        json!({"name": "tpm", "limits": {"tokens_per_minute": 5, "rates": {"global": "6/min"}}}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let chat = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    // Refused once its tokens are charged (a task of its own, just after).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut admitted = 1;
    let refused = loop {
        let resp = chat().await.unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            break resp;
        }
        admitted += 1;
        assert!(std::time::Instant::now() < deadline, "never refused");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(refused.headers()["ratelimit-policy"], "\"tokens\";q=5;w=60");
    let rl = refused.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(rl.starts_with("\"tokens\";r=0;t="), "{rl}");
    // Ten more token refusals: had each spent a request, `global` (6/min)
    // would refuse the next call of another class.
    for _ in 0..10 {
        assert_eq!(
            chat().await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    let models = app
        .client
        .get(app.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), StatusCode::OK);
    let rl = models.headers()["ratelimit"].to_str().unwrap().to_owned();
    let expected = format!("\"global\";r={};", 6 - admitted - 1);
    assert!(rl.starts_with(&expected), "{rl}, expected {expected}");
}

/// When the class and `global` both refuse, `Retry-After` is the longer
/// wait: the shorter would only earn another refusal.
#[tokio::test]
async fn when_two_limits_refuse_the_longer_wait_is_given() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let k = post_key(
        &app,
        json!({"name": "two", "limits": {"rates": {"chat": "1/hour", "global": "3/min"}}}),
    )
    .await;
    let key = k["key"].as_str().unwrap();
    let chat = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };
    assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    for _ in 0..2 {
        let resp = app
            .client
            .get(app.url("/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let refused = chat().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["ratelimit-policy"], "\"chat\";q=1;w=3600");
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 60, "the hour's wait, not global's: {retry}");
}

/// A token limit of 0 or beyond what a rate can count would switch the
/// limit off; a budget that is not dollars would never hold. Refused, by
/// field, on creation and on change.
#[tokio::test]
async fn key_limits_that_cannot_be_held_are_refused_by_field() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let cases = [
        (json!({"tokens_per_minute": 0}), "limits.tokens_per_minute"),
        (
            json!({"tokens_per_minute": 5_000_000_000u64}),
            "limits.tokens_per_minute",
        ),
        (
            json!({"monthly_budget_usd": -1.0}),
            "limits.monthly_budget_usd",
        ),
        // A misspelt class would limit nothing.
        (json!({"rates": {"chatt": "5/min"}}), "limits.rates.chatt"),
        (json!({"rates": {"chat": "often"}}), "limits.rates.chat"),
    ];
    // A large tier (150M a minute) is held, in units of 250 tokens.
    let ok = post_key(
        &app,
        json!({"name": "ok", "limits": {"tokens_per_minute": 150_000_000u64}}),
    )
    .await;
    let id = ok["id"].as_str().unwrap();
    for (limits, field) in cases {
        let created = app
            .client
            .post(app.url("/v1/admin/keys"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "bad", "limits": limits}))
            .send()
            .await
            .unwrap();
        let patched = app
            .client
            .patch(app.url(&format!("/v1/admin/keys/{id}")))
            .bearer_auth(ADMIN)
            .json(&json!({"limits": limits}))
            .send()
            .await
            .unwrap();
        for resp in [created, patched] {
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{limits}");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["details"]["field"], field, "{body}");
        }
    }
}

/// Budgets are summed from usage rows: on a server that keeps none, a
/// budget could never be enforced, so setting one is refused.
#[tokio::test]
async fn a_budget_is_refused_where_no_usage_rows_are_kept() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .env("SWITCHYARD_USAGE__ENABLED", "false")
        .spawn()
        .await;
    let key = app
        .client
        .post(app.url("/v1/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "b", "limits": {"monthly_budget_usd": 5.0}}))
        .send()
        .await
        .unwrap();
    let tenant = app
        .client
        .post(app.url("/v1/admin/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "acme", "monthly_budget_usd": 5.0}))
        .send()
        .await
        .unwrap();
    for (resp, field) in [
        (key, "limits.monthly_budget_usd"),
        (tenant, "monthly_budget_usd"),
    ] {
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["details"]["field"], field, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("usage"));
    }
}

/// A retired path answers like the chat function, wherever it lives, so it
/// counts as `chat` (and gets the token limit and budget checks) rather
/// than only against `global`.
#[tokio::test]
async fn a_retired_path_outside_functions_counts_as_chat() {
    let app = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config("[[sessions.retired_paths]]\npath = \"/api/chat\"\nsunset = \"2999-01-01\"\n")
        .spawn()
        .await;
    let created = post_key(
        &app,
        json!({"name": "old-client", "role": "service", "limits": {"rates": {"chat": "1/min"}}}),
    )
    .await;
    let key = created["key"].as_str().unwrap();
    let old_chat = || {
        app.client
            .post(app.url("/api/chat"))
            .bearer_auth(key)
            .json(&json!({"session_id": "no-such-session", "content": "hi"}))
            .send()
    };
    let first = old_chat().await.unwrap();
    assert_eq!(first.status(), StatusCode::NOT_FOUND);
    assert_eq!(first.headers()["ratelimit-policy"], "\"chat\";q=1;w=60");
    let second = old_chat().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = second.json().await.unwrap();
    assert!(body.to_string().contains("`chat`"), "{body}");
}

/// An operator's limits on a tenant are a ceiling: the tenant's own admin
/// cannot give a key a higher rate (creating or changing it), while an
/// operator can.
#[tokio::test]
async fn a_tenant_admin_cannot_give_a_key_more_than_its_tenant() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let created = app
        .client
        .post(app.url("/v1/admin/tenants"))
        .bearer_auth(ADMIN)
        .json(&json!({"id": "acme", "limits": {"chat": "5/min"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let acme_admin = post_key(
        &app,
        json!({"name": "acme-admin", "role": "admin", "tenant_id": "acme"}),
    )
    .await;
    let acme_admin = acme_admin["key"].as_str().unwrap();
    let as_acme = |method: reqwest::Method, path: &str, body: Value| {
        app.client
            .request(method, app.url(path))
            .bearer_auth(acme_admin)
            .json(&body)
            .send()
    };
    for rates in [
        json!({"chat": "1000/s"}),
        json!({"chat": "6/min"}),
        json!({"global": "1000/min"}),
    ] {
        let resp = as_acme(
            reqwest::Method::POST,
            "/v1/admin/keys",
            json!({"name": "greedy", "limits": {"rates": rates}}),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{rates}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "forbidden");
        let class = rates.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(
            v["error"]["details"]["field"],
            format!("limits.rates.{class}")
        );
    }
    // At or below the tenant's rate: fine (a key may be held tighter).
    let ok = as_acme(
        reqwest::Method::POST,
        "/v1/admin/keys",
        json!({"name": "modest", "limits": {"rates": {"chat": "5/min", "global": "10/min"}}}),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    let modest: Value = ok.json().await.unwrap();
    let path = format!("/v1/admin/keys/{}", modest["id"].as_str().unwrap());
    let raised = as_acme(
        reqwest::Method::PATCH,
        &path,
        json!({"limits": {"rates": {"chat": "50/min"}}}),
    )
    .await
    .unwrap();
    assert_eq!(raised.status(), StatusCode::FORBIDDEN);
    // The operator may.
    let by_operator = app
        .client
        .patch(app.url(&format!("{path}?tenant_id=acme")))
        .bearer_auth(ADMIN)
        .json(&json!({"limits": {"rates": {"chat": "50/min"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_operator.status(), StatusCode::OK);
}

/// A key whose rate is raised to one with a shorter period is held to the
/// new rate from the next request, not to the state kept under the old
/// one (a key at 2/hour raised to 100/min waited an hour).
#[tokio::test]
async fn a_raised_rate_applies_to_the_next_request() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let created = post_key(
        &app,
        json!({"name": "slow", "limits": {"rates": {"chat": "2/hour"}}}),
    )
    .await;
    let key = created["key"].as_str().unwrap().to_owned();
    let chat = || {
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat_body("gpt-4o-mini"))
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(chat().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);

    let raised = app
        .client
        .patch(app.url(&format!(
            "/v1/admin/keys/{}",
            created["id"].as_str().unwrap()
        )))
        .bearer_auth(ADMIN)
        .json(&json!({"limits": {"rates": {"chat": "100/min"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(raised.status(), StatusCode::OK);

    for _ in 0..3 {
        assert_eq!(chat().await.unwrap().status(), StatusCode::OK);
    }
}

/// Behind a load balancer every client's connection comes from the
/// balancer: with `server.trusted_proxies` naming it, failed
/// authentications are counted by the address its `X-Forwarded-For` gives,
/// so one client's guesses do not block the others; from a peer that is
/// not trusted, the header is the client's own word and is ignored.
#[tokio::test]
async fn behind_a_trusted_proxy_failures_are_counted_by_the_forwarded_address() {
    let bad = "sy_0000000000000000000000000000000000000000000";
    let attempt = |app: &switchyard_testkit::TestApp, forwarded: &str| {
        let req = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(bad)
            .header("x-forwarded-for", forwarded)
            .json(&chat_body("gpt-4o-mini"));
        async move { req.send().await.unwrap().status() }
    };
    let behind = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config("[rate_limits]\nauth_failures = \"3/hour\"\n")
        .env("SWITCHYARD_SERVER__TRUSTED_PROXIES", "[\"127.0.0.0/8\"]")
        .spawn()
        .await;
    for _ in 0..3 {
        assert_eq!(
            attempt(&behind, "1.1.1.1, 203.0.113.7").await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        attempt(&behind, "9.9.9.9, 203.0.113.7").await,
        StatusCode::TOO_MANY_REQUESTS,
        "the address the proxy saw, whatever the client wrote before it"
    );
    assert_eq!(
        attempt(&behind, "203.0.113.8").await,
        StatusCode::UNAUTHORIZED,
        "another client behind the same proxy is not blocked"
    );
    let events = auth_failure_events(&behind).await;
    assert_eq!(events[0].target.as_deref(), Some("ip:203.0.113.7"));

    let direct = app()
        .env("SWITCHYARD_ADMIN_KEY", ADMIN)
        .config("[rate_limits]\nauth_failures = \"3/hour\"\n")
        .spawn()
        .await;
    for forwarded in ["203.0.113.1", "203.0.113.2", "203.0.113.3"] {
        assert_eq!(attempt(&direct, forwarded).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        attempt(&direct, "203.0.113.4").await,
        StatusCode::TOO_MANY_REQUESTS,
        "without trusted proxies the header is ignored: one peer, one count"
    );
}
