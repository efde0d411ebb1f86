//! Health, readiness, metrics, trace context and logs.

use futures::StreamExt;
use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn health_and_ready_answer_ok() {
    let app = spawn().await;

    let health = app.client.get(app.url("/health")).send().await.unwrap();
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();

    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    assert_eq!(ready.status(), 200);
    assert_eq!(
        ready.json::<Value>().await.unwrap()["checks"]["store"],
        "ok"
    );
}

#[tokio::test]
async fn ready_fails_when_the_store_is_unreachable() {
    let Some(pg) = pg_url() else { return };
    let target = pg_addr(&pg);
    let proxy = switchyard_testkit::proxy::TcpProxy::start(target)
        .await
        .unwrap();
    let via_proxy = pg.replace(&target.to_string(), &proxy.addr().to_string());
    assert_ne!(via_proxy, pg, "the URL names the server by address");
    let app = app()
        .postgres(&via_proxy)
        .env("SWITCHYARD_STORE__CONNECT_TIMEOUT_SECS", "1")
        .spawn()
        .await;
    assert_eq!(
        app.client
            .get(app.url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    proxy.cut();

    let resp = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["checks"]["store"], "unreachable");
    assert_eq!(
        app.client
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "liveness does not depend on the store"
    );
}

#[tokio::test]
async fn ready_fails_when_the_sqlite_file_is_deleted_or_replaced() {
    // The open connections keep the deleted file alive: `SELECT 1` alone
    // still answers, while nothing written from now on would survive.
    let app = spawn().await;
    let db = app.dir.path().join("switchyard.db");
    let ready = |app: &switchyard_testkit::TestApp| {
        let req = app.client.get(app.url("/ready")).send();
        async move { req.await.unwrap().status() }
    };
    assert_eq!(ready(&app).await, 200);

    std::fs::remove_file(&db).unwrap();

    assert_eq!(ready(&app).await, 503);
    std::fs::write(&db, b"").unwrap();
    assert_eq!(ready(&app).await, 503, "another file at the same path");
}

pub fn pg_url() -> Option<String> {
    match std::env::var("SWITCHYARD_TEST_PG_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert_ne!(
                std::env::var("SWITCHYARD_REQUIRE_PG").as_deref(),
                Ok("1"),
                "SWITCHYARD_TEST_PG_URL is required"
            );
            eprintln!("skipping: SWITCHYARD_TEST_PG_URL is not set");
            None
        }
    }
}

fn pg_addr(url: &str) -> std::net::SocketAddr {
    let host_port = url.split('@').nth(1).unwrap().split('/').next().unwrap();
    host_port.parse().unwrap()
}

#[tokio::test]
async fn a_traceparent_is_continued_and_the_request_id_echoed() {
    let app = spawn().await;

    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-request-id", "req-123")
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();

    let tp = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    assert!(resp.headers().get("request-id").is_none());
    let fresh = app.client.get(app.url("/health")).send().await.unwrap();
    let tp2 = fresh.headers()["traceparent"].to_str().unwrap();
    assert_eq!(tp2.len(), 55);
    assert!(!tp2.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    // Without one, the request id names the trace.
    assert_eq!(
        fresh.headers()["x-request-id"].to_str().unwrap(),
        format!("req_{}", &tp2[3..35])
    );
    // Anthropic's SDK reads `request-id`.
    let m = app
        .client
        .post(app.url("/v1/messages"))
        .json(&serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), 200);
    assert_eq!(m.headers()["request-id"], m.headers()["x-request-id"]);
    assert!(m.headers()["request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    // The model list, which both APIs share, is Anthropic's to a client
    // that sends `anthropic-version`, `request-id` included.
    let models = app
        .client
        .get(app.url("/v1/models"))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap();
    assert_eq!(
        models.headers()["request-id"],
        models.headers()["x-request-id"]
    );
    // An id too long to be one, or not visible ASCII (which the access
    // line could not carry as sent), is not echoed: the trace's own is sent.
    let odd: [&[u8]; 3] = [&[b'x'; 300], b"a\tb", b"caf\xc3\xa9"];
    for id in odd {
        let resp = app
            .client
            .get(app.url("/health"))
            .header(
                "x-request-id",
                reqwest::header::HeaderValue::from_bytes(id).unwrap(),
            )
            .send()
            .await
            .unwrap();
        let tp = resp.headers()["traceparent"].to_str().unwrap();
        assert_eq!(
            resp.headers()["x-request-id"].to_str().unwrap(),
            format!("req_{}", &tp[3..35]),
            "{id:?}"
        );
    }
    let v = wait_for_log_json(&app, |l| l.contains("\"route\":\"/v1/chat/completions\""))
        .await
        .expect("a request log line");
    assert_eq!(v["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["status"], 200);
    assert_eq!(v["model"], "gpt-4o-mini");
}

#[tokio::test]
async fn metrics_expose_requests_latency_tokens_and_the_usage_queue() {
    let app = spawn().await;
    app.post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await
        .text()
        .await
        .unwrap();
    app.post_json("/v1/chat/completions", &chat_body("made-up-model"))
        .await
        .text()
        .await
        .unwrap();

    let resp = app.client.get(app.url("/metrics")).send().await.unwrap();

    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for needle in [
        r#"switchyard_http_requests_total{route="/v1/chat/completions",model="gpt-4o-mini",status="200"} 1"#,
        r#"switchyard_http_request_duration_seconds_bucket{route="/v1/chat/completions",model="gpt-4o-mini",status="200",le="#,
        r#"switchyard_upstream_duration_seconds_bucket{provider="mock",endpoint="chat",le="#,
        r#"switchyard_tokens_total{model="gpt-4o-mini",provider="mock",kind="completion"} 7"#,
        "switchyard_usage_queue_depth ",
        "switchyard_events_queue_depth ",
        "switchyard_usage_dropped_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(
        !text.contains("made-up-model"),
        "client-chosen names must not become labels"
    );
}

#[tokio::test]
async fn every_log_line_of_a_request_carries_its_trace_id() {
    // The gateway's own debug logs, and a provider that fails twice: a retry
    // line, the failure, and whatever else the request path has to say.
    // Dependencies stay at info, and the background writers are kept quiet
    // while the request runs: their lines (sqlx logs every statement of
    // the health writer at debug) belong to no request.
    let app = app()
        .env("RUST_LOG", "info,switchyard=debug")
        .env("SWITCHYARD_HEALTH__PERSIST_INTERVAL_SECS", "3600")
        .env("SWITCHYARD_USAGE__FLUSH_INTERVAL_MS", "5000")
        .spawn()
        .await;
    app.mock()
        .update(|b| b.always = Some(switchyard_testkit::Fault::Status(500)));
    let trace_id = "7d2c0f4e9b8a41c3a5e6f708192a3b4c";
    let before = app.logs().len();

    let resp = chat_with_traceparent(
        &app,
        &chat_body("gpt-4o-mini"),
        &format!("00-{trace_id}-00f067aa0ba902b7-01"),
    )
    .await;
    assert_eq!(resp.status(), 502);
    resp.text().await.unwrap();

    // The request's last line is its summary, written as it answers.
    app.wait_for_log(|l| l.contains("\"message\":\"request failed\""))
        .await
        .expect("the request's summary line");
    let logs = app.logs();
    let end = before
        + logs[before..]
            .iter()
            .position(|l| l.contains("\"message\":\"request failed\""))
            .unwrap();
    let lines: Vec<Value> = logs[before..=end]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .map(|v| v["message"].as_str().unwrap_or(""))
        .collect();
    assert!(
        messages.contains(&"retrying") && lines.len() >= 2,
        "the request logged several lines: {messages:?}"
    );
    for v in &lines {
        // docs/configuration.md: every line logged inside a request lists
        // its spans, the first being `request` with `trace_id`.
        let root = &v["spans"][0];
        assert_eq!(root["name"], "request", "{v}");
        assert_eq!(root["trace_id"], trace_id, "{v}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_counted_and_logged_as_499() {
    // The provider never answers; the client gives up while the gateway
    // waits for it, and hyper drops the request's future.
    let app = spawn().await;
    app.mock()
        .update(|b| b.always = Some(switchyard_testkit::Fault::Hang));
    let url = app.url("/v1/chat/completions");
    let client = app.client.clone();
    let request = tokio::spawn(async move {
        client
            .post(url)
            .json(&chat_body("gpt-4o-mini"))
            .send()
            .await
    });
    while app.mock().calls() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    request.abort();

    let line = wait_for_log_json(&app, |l| l.contains("\"status\":499"))
        .await
        .expect("an access line for the request the client left");
    assert_eq!(line["message"], "request");
    assert_eq!(line["span"]["route"], "/v1/chat/completions");
    assert!(line["latency_ms"].as_f64().is_some(), "{line}");
    let counted = metric(
        &app,
        r#"switchyard_http_requests_total{route="/v1/chat/completions",model="",status="499"}"#,
    )
    .await;
    assert_eq!(counted, 1.0);
}

#[tokio::test]
async fn two_traceparent_headers_start_a_new_trace() {
    // W3C Trace Context test suite, test_traceparent_duplicated: neither
    // of two traceparent headers is trusted.
    let app = spawn().await;

    let resp = app
        .client
        .get(app.url("/health"))
        .header(
            "traceparent",
            "00-12345678901234567890123456789011-1234567890123456-01",
        )
        .header(
            "traceparent",
            "00-12345678901234567890123456789012-1234567890123456-01",
        )
        .send()
        .await
        .unwrap();

    let tp = resp.headers()["traceparent"].to_str().unwrap();
    assert_eq!(tp.len(), 55, "{tp}");
    assert!(!tp.contains("1234567890123456789012345678901"), "{tp}");
}

#[tokio::test]
async fn an_empty_request_id_is_replaced_and_a_given_one_is_logged() {
    let app = spawn().await;

    let empty = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "")
        .send()
        .await
        .unwrap();
    let given = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("x-request-id", "client-req-42")
        .json(&chat_body("gpt-4o-mini"))
        .send()
        .await
        .unwrap();

    let tp = empty.headers()["traceparent"].to_str().unwrap();
    assert_eq!(
        empty.headers()["x-request-id"].to_str().unwrap(),
        format!("req_{}", &tp[3..35])
    );
    assert_eq!(given.headers()["x-request-id"], "client-req-42");
    let line = wait_for_log_json(&app, |l| {
        l.contains("\"message\":\"request\"") && l.contains("/v1/chat/completions")
    })
    .await
    .expect("the access line");
    assert_eq!(line["request_id"], "client-req-42");
}

#[tokio::test]
async fn the_upstream_duration_leaves_out_the_body_upload_but_the_usage_latency_does_not() {
    // The client sends half its body, waits, then the rest: the request's
    // latency includes the wait, the provider's does not.
    let app = spawn().await;
    let body = serde_json::to_vec(&chat_body("gpt-4o-mini")).unwrap();
    let (head, tail) = body.split_at(body.len() / 2);
    let chunks = futures::stream::iter([(head.to_vec(), 0), (tail.to_vec(), 500)]).then(
        |(bytes, wait_ms)| async move {
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
            Ok::<_, std::io::Error>(bytes)
        },
    );

    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();

    let upstream = metric(
        &app,
        r#"switchyard_upstream_duration_seconds_sum{provider="mock",endpoint="chat"}"#,
    )
    .await;
    let request = metric(
        &app,
        r#"switchyard_http_request_duration_seconds_sum{route="/v1/chat/completions",model="gpt-4o-mini",status="200"}"#,
    )
    .await;
    // The 500 ms wait is in the request's duration and not in the
    // provider's. (The server's clock starts when the head arrives, which
    // can be a little after the client's wait began: not `>= 0.5`.)
    assert!(upstream > 0.0, "upstream {upstream}");
    assert!(
        request - upstream >= 0.3,
        "request {request}, upstream {upstream}"
    );
    // The usage row's latency is the request's (issue 2: "latency").
    let mut rows = usage_rows(&app).await;
    for _ in 0..250 {
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        rows = usage_rows(&app).await;
    }
    assert!(
        rows[0].latency_ms >= (upstream + 0.3) * 1000.0,
        "the row's latency {} ms includes the wait",
        rows[0].latency_ms
    );
}

#[tokio::test]
async fn a_request_refused_by_an_open_breaker_records_no_upstream_sample() {
    let app = app()
        .config("[resilience]\nmax_attempts = 1\nbreaker_failure_threshold = 1\nbreaker_cooldown_secs = 3600\n")
        .spawn()
        .await;
    app.mock()
        .push_fault(switchyard_testkit::Fault::Status(500));
    let failed = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(failed.status(), 502);

    let refused = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;

    assert_eq!(refused.status(), 503);
    assert_eq!(app.mock().calls(), 1);
    let text = get_text(&app, "/metrics").await;
    assert!(
        text.contains(
            r#"switchyard_upstream_duration_seconds_count{provider="mock",endpoint="chat"} 1"#
        ),
        "{text}"
    );
    assert!(
        !text.contains(r#"switchyard_upstream_duration_seconds_count{provider="""#),
        "{text}"
    );
}
