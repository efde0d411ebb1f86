//! Routes on the running binary: load shared by weight, the
//! `LLM_PROVIDER` / `LLM_FALLBACK_PROVIDER` shortcut, failover on a refused
//! connection, and what a failed-over request leaves behind (its usage row
//! names the deployment that served it; its trace shows the failed attempt).

use futures::future::join_all;
use serde_json::{json, Value};
use switchyard_testkit::{Fault, MockUpstream};

use crate::helpers::*;

#[tokio::test]
async fn equal_priority_deployments_share_requests_by_weight() {
    let heavy = MockUpstream::start().await.unwrap();
    let light = MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .config(&format!(
            "[providers.heavy]\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
             [providers.light]\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
             [[models.shared.route]]\nprovider = \"heavy\"\nmodel = \"h\"\nweight = 3\npriority = 0\n\n\
             [[models.shared.route]]\nprovider = \"light\"\nmodel = \"l\"\nweight = 1\npriority = 0\n",
            heavy.base_url(),
            light.base_url()
        ))
        .spawn()
        .await;

    for _ in 0..8 {
        let sends = (0..50).map(|_| async {
            let resp = app
                .post_json("/v1/chat/completions", &chat_body("shared"))
                .await;
            assert_eq!(resp.status(), 200);
        });
        join_all(sends).await;
    }

    assert_eq!(heavy.calls() + light.calls(), 400, "one call per request");
    // Binomial(400, 3/4): mean 300, standard deviation √75 ≈ 8.7; the bounds
    // are ±6 standard deviations, so only a broken weighting misses them.
    assert!(
        (248..=352).contains(&heavy.calls()),
        "heavy served {} of 400",
        heavy.calls()
    );
}

#[tokio::test]
async fn llm_provider_variables_route_default_to_the_fallback_when_the_primary_fails() {
    let anthropic = MockUpstream::start().await.unwrap();
    let openai = MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .env("ANTHROPIC_API_KEY", "sk-ant-env-test")
        .env("ANTHROPIC_BASE_URL", &anthropic.base_url())
        .env("ANTHROPIC_MODEL_DEFAULT", "claude-env")
        .env("CHAT_API_KEY", "sk-env-test")
        .env("CHAT_API_BASE", &openai.base_url())
        .env("CHAT_MODEL_DEFAULT", "gpt-env")
        .env("LLM_PROVIDER", "anthropic")
        .env("LLM_FALLBACK_PROVIDER", "openai")
        .spawn()
        .await;

    let healthy = app
        .post_json("/v1/chat/completions", &chat_body("default"))
        .await;
    anthropic.update(|b| b.always = Some(Fault::Status(500)));
    let failing = app
        .post_json("/v1/chat/completions", &chat_body("default"))
        .await;

    assert_eq!(healthy.status(), 200);
    assert_eq!(healthy.headers()["x-switchyard-provider"], "anthropic");
    assert_eq!(failing.status(), 200);
    assert_eq!(failing.headers()["x-switchyard-provider"], "chat");
    let to_anthropic = anthropic.last_request().unwrap();
    assert_eq!(
        (to_anthropic.path.as_str(), &to_anthropic.body["model"]),
        ("/v1/messages", &json!("claude-env"))
    );
    assert_eq!(openai.last_request().unwrap().body["model"], "gpt-env");
    assert_eq!((anthropic.calls(), openai.calls()), (1 + 2, 1));
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_the_fallback_serves() {
    // A port nothing listens on: bound to find a free one, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let fallback = MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .config(&primary_then_fallback(
            "",
            &format!("http://{closed}/v1"),
            "",
            &fallback.base_url(),
        ))
        .spawn()
        .await;

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("smart"))
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    assert_eq!(fallback.calls(), 1);
    let failed = metric(
        &app,
        r#"switchyard_upstream_attempts_total{deployment="primary/p-model",outcome="error"}"#,
    )
    .await;
    assert_eq!(
        failed, 2.0,
        "a connection error is retried (max_attempts = 2)"
    );
    let line = wait_for_log_json(&app, |l| l.contains("falling back"))
        .await
        .unwrap();
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .starts_with("could not connect to the provider"),
        "{line}"
    );
}

#[tokio::test]
async fn a_failed_over_request_is_recorded_under_the_fallback_with_the_failure_in_its_trace() {
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let (mut app, primary, _fallback) =
        two_deployments("max_attempts = 1\n\n[events]\nflush_interval_ms = 20").await;
    primary.push_fault(Fault::Status(500));

    let resp = chat_with_traceparent(
        &app,
        &chat_body("smart"),
        &format!("00-{TRACE}-b7ad6b7169203331-01"),
    )
    .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    let trace = finished_trace(&app, TRACE).await;
    let events: Vec<(&str, &Value)> = trace["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), &e["payload"]))
        .collect();
    assert_eq!(
        events.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        [
            "request.received",
            "provider.attempt",
            "provider.fallback",
            "provider.attempt",
            "request.done"
        ]
    );
    assert_eq!(
        events[1].1,
        &json!({"deployment": "primary/p-model", "attempt": 1})
    );
    assert_eq!(
        events[2].1,
        &json!({"from": "primary/p-model", "to": "fallback/f-model", "error": "upstream_status"})
    );
    assert_eq!(events[4].1["provider"], "fallback");

    app.stop_gracefully().await;
    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.trace_id, TRACE);
    assert_eq!(
        (r.provider.as_str(), r.upstream_model.as_str()),
        ("fallback", "f-model")
    );
    assert_eq!((r.status, r.error_code.as_deref()), (200, None));
}
