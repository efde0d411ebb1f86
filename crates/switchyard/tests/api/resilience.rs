//! Providers that fail well: retries, breakers and fallback over a
//! two-deployment route, against two real mock upstreams.

use futures::future::join_all;
use serde_json::Value;
use switchyard_testkit::{FailPattern, Fault, MockUpstream, TestApp};

use crate::helpers::*;

/// 1,000 requests (a quarter streamed, 50 at a time) to `smart` while the
/// primary fails 30 % of its calls with 500: no client sees an error, every
/// stream ends with `[DONE]` and every injected failure is counted.
async fn thirty_percent_failures_cost_the_client_nothing(
    app: &TestApp,
    primary: &MockUpstream,
    fallback: &MockUpstream,
) {
    primary.update(|b| {
        b.fail_pattern = Some(FailPattern {
            status: 500,
            fail: 3,
            of: 10,
        })
    });

    let mut statuses = Vec::new();
    for batch in 0..20 {
        let sends = (0..50).map(|i| async move {
            let body = if (batch + i) % 4 == 0 {
                stream_body("smart", false)
            } else {
                chat_body("smart")
            };
            let resp = app.post_json("/v1/chat/completions", &body).await;
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, body["stream"] == true, text)
        });
        statuses.extend(join_all(sends).await);
    }

    assert_eq!(statuses.len(), 1000);
    assert!(
        statuses.iter().all(|(s, _, _)| *s == 200),
        "a client saw an error"
    );
    assert!(statuses
        .iter()
        .filter(|(_, stream, _)| *stream)
        .all(|(_, _, t)| t.ends_with("data: [DONE]\n\n")));
    let failures = primary.injected_failures();
    let calls = primary.calls();
    assert_eq!(
        failures,
        calls / 10 * 3 + (calls % 10).min(3),
        "30 % of {calls} calls failed"
    );
    let counted = metric(
        app,
        r#"switchyard_upstream_attempts_total{deployment="primary/p-model",outcome="error"}"#,
    )
    .await;
    assert_eq!(counted as u64, failures, "every failure is counted");
    let served_by_fallback = fallback.calls();
    assert!(served_by_fallback <= 1000);
    let ok = metric(
        app,
        r#"switchyard_upstream_attempts_total{deployment="primary/p-model",outcome="ok"}"#,
    )
    .await;
    assert_eq!(ok as u64 + served_by_fallback, 1000);
}

#[tokio::test]
async fn a_primary_failing_30_percent_costs_the_client_nothing() {
    // A threshold the 30 % cannot reach, so the breaker stays closed and
    // every failed request is failed over on its own.
    let (app, primary, fallback) = two_deployments("breaker_failure_threshold = 1000").await;

    thirty_percent_failures_cost_the_client_nothing(&app, &primary, &fallback).await;

    assert!(fallback.calls() > 0 && fallback.calls() <= primary.injected_failures());
    assert!(primary.calls() >= 1000, "the primary kept its traffic");
}

#[tokio::test]
async fn a_primary_failing_30_percent_costs_the_client_nothing_under_the_default_breaker() {
    // Concurrent failures may line up five in a row and open the breaker:
    // then the fallback takes the rest, still without a client-visible error.
    let (app, primary, fallback) = two_deployments("").await;

    thirty_percent_failures_cost_the_client_nothing(&app, &primary, &fallback).await;

    let opened = metric(
        &app,
        r#"switchyard_breaker_transitions_total{deployment="primary/p-model",to="open"}"#,
    )
    .await;
    let rejected = metric(
        &app,
        r#"switchyard_breaker_rejections_total{deployment="primary/p-model"}"#,
    )
    .await;
    assert!(
        opened > 0.0 || rejected == 0.0,
        "calls were turned away only by an open breaker"
    );
}

#[tokio::test]
async fn a_dead_primary_gets_no_calls_while_its_breaker_is_open_then_exactly_the_probes() {
    let (app, primary, fallback) = two_deployments(
        "max_attempts = 1\nbreaker_cooldown_secs = 2\nbreaker_half_open_probes = 1",
    )
    .await;
    primary.update(|b| b.always = Some(Fault::Status(503)));

    for _ in 0..20 {
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("smart"))
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    }
    assert_eq!(primary.calls(), 5, "the breaker opened after 5 failures");
    assert_eq!(fallback.calls(), 20);

    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
    for _ in 0..10 {
        assert_eq!(
            app.post_json("/v1/chat/completions", &chat_body("smart"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        primary.calls(),
        6,
        "exactly one probe, which failed and re-opened the breaker"
    );

    // The primary recovers: after the next cool-down, probes succeed and close it.
    primary.update(|b| b.always = None);
    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
    for _ in 0..10 {
        assert_eq!(
            app.post_json("/v1/chat/completions", &chat_body("smart"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        primary.calls(),
        16,
        "probes closed the breaker and traffic returned"
    );
    let opened = wait_for_log_json(&app, |l| l.contains("circuit breaker opened"))
        .await
        .unwrap();
    assert_eq!(
        log_trace_id(&opened).len(),
        32,
        "the transition is logged with the causing request's trace id: {opened}"
    );
    assert!(app
        .wait_for_log(|l| l.contains("\"to\":\"closed\""))
        .await
        .is_some());
}

#[tokio::test]
async fn a_short_retry_after_is_waited_for_and_a_long_one_falls_back() {
    let (app, primary, fallback) = two_deployments("backoff_cap_ms = 2000").await;
    primary.push_fault(Fault::RateLimited {
        retry_after_secs: 1,
    });

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("smart"))
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "primary");
    assert_eq!((primary.calls(), fallback.calls()), (2, 0));
    assert!(app
        .wait_for_log(|l| l.contains("retrying") && l.contains("\"wait_ms\":1000"))
        .await
        .is_some());
    // The wait really happened: by the mock's own clock, the retry arrived at
    // least Retry-After after the 429 was asked for (a lower bound, which no
    // slowness of the machine can break).
    let arrivals: Vec<_> = primary.requests().iter().map(|r| r.at).collect();
    assert!(
        arrivals[1] - arrivals[0] >= std::time::Duration::from_secs(1),
        "the retry came {:?} after the 429",
        arrivals[1] - arrivals[0]
    );

    primary.push_fault(Fault::RateLimited {
        retry_after_secs: 30,
    });
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("smart"))
        .await;
    assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    assert_eq!((primary.calls(), fallback.calls()), (3, 1));
}

#[tokio::test]
async fn a_stream_cut_after_its_first_chunk_ends_with_an_error_event_and_no_failover() {
    let (app, primary, fallback) = two_deployments("").await;
    primary.push_fault(Fault::ResetAfterChunks(1));

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("smart", false))
        .await;

    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.len(), 2, "{data:?}");
    let last: Value = serde_json::from_str(&data[1]).unwrap();
    assert_eq!(last["error"]["code"], "upstream_broken");
    assert_eq!(fallback.calls(), 0, "a committed stream is never retried");
    assert_eq!(primary.calls(), 1);
}

/// vLLM and other OpenAI-compatible servers report a failure inside a
/// stream they already answered 200: `data: {"error":{…}}`, then `[DONE]`.
#[tokio::test]
async fn an_error_inside_a_stream_before_its_first_chunk_fails_over() {
    let (app, primary, fallback) = two_deployments("max_attempts = 1").await;
    primary.push_fault(Fault::ErrorEventAfter(0));

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("smart", false))
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert!(
        data.iter().all(|d| !d.contains("\"error\"")),
        "the primary's error reached the client: {data:?}"
    );
    assert_eq!((primary.calls(), fallback.calls()), (1, 1));
}

#[tokio::test]
async fn a_200_whose_body_is_an_error_fails_over_like_the_error_it_is() {
    let (app, primary, fallback) = two_deployments("max_attempts = 1").await;
    primary.push_fault(Fault::ErrorEventAfter(0));

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("smart"))
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!((primary.calls(), fallback.calls()), (1, 1));
}

#[tokio::test]
async fn an_error_inside_a_stream_after_its_first_chunk_ends_it_with_an_error_event_not_done() {
    let (mut app, primary, fallback) = two_deployments("").await;
    primary.push_fault(Fault::ErrorEventAfter(2));

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("smart", false))
        .await;

    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.unwrap());
    // Two chunks, then Switchyard's error event: not the provider's error
    // relayed as a chunk, and no `[DONE]` after it.
    assert_eq!(data.len(), 3, "{data:?}");
    for chunk in &data[..2] {
        let c: Value = serde_json::from_str(chunk).unwrap();
        assert_eq!(c["object"], "chat.completion.chunk", "{chunk}");
    }
    let last: Value = serde_json::from_str(&data[2]).unwrap();
    // The mock's in-stream error is an overloaded server's (503).
    assert_eq!(last["error"]["code"], "upstream_overloaded", "{last}");
    assert_eq!(last["error"]["type"], "upstream_error", "{last}");
    assert_eq!(fallback.calls(), 0, "a committed stream is never retried");
    app.stop_gracefully().await;
    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status, rows[0].error_code.as_deref()),
        (502, Some("upstream_status")),
        "the usage row records the failure"
    );
}

#[tokio::test]
async fn a_stream_that_fails_before_its_first_byte_is_served_by_the_fallback() {
    let (app, primary, fallback) = two_deployments("max_attempts = 1").await;
    primary.push_fault(Fault::Status(500));
    primary.push_fault(Fault::ResetAfterChunks(0));

    for _ in 0..2 {
        let resp = app
            .post_json("/v1/chat/completions", &stream_body("smart", true))
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
        let data = sse_data(&resp.text().await.unwrap());
        assert_eq!(data.last().unwrap(), "[DONE]");
        assert_eq!(streamed_text(&data), "Hello! How can I help you today?");
    }
    assert_eq!((primary.calls(), fallback.calls()), (2, 2));
}

#[tokio::test]
async fn a_hung_primary_times_out_and_the_fallback_answers() {
    // The primary's first-byte budget is 500 ms; it hangs for an hour (plain)
    // or 30 s before its first chunk (stream). Each request is given 20 s: a
    // first-byte timeout that did not fire fails the test instead of hanging
    // it, without the test asserting how long anything took.
    // Two attempts per deployment, but a deployment that hung is not asked
    // again while a fallback remains.
    let (app, primary, fallback) = two_deployments("max_attempts = 2").await;
    primary.push_fault(Fault::Hang);
    primary.update(|b| b.ttft = std::time::Duration::from_secs(30));
    let budget = std::time::Duration::from_secs(20);

    let plain = send_within(&app, &chat_body("smart"), budget).await;
    let stream = send_within(&app, &stream_body("smart", false), budget).await;

    assert_eq!((plain.0, plain.1.as_str()), (200, "fallback"));
    assert_eq!(
        (stream.0, stream.1.as_str()),
        (200, "fallback"),
        "a first chunk that never comes is a first-byte timeout"
    );
    assert_eq!(sse_data(&stream.2).last().unwrap(), "[DONE]");
    assert_eq!((primary.calls(), fallback.calls()), (2, 2));
    let timeouts = metric(
        &app,
        r#"switchyard_upstream_attempts_total{deployment="primary/p-model",outcome="error"}"#,
    )
    .await;
    assert_eq!(timeouts, 2.0);
    assert!(app
        .wait_for_log(|l| l.contains("falling back") && l.contains("did not answer within 500ms"))
        .await
        .is_some());
}

#[tokio::test]
async fn a_primary_that_refuses_the_gateway_itself_fails_over_and_opens_its_breaker() {
    // A revoked key (401, 403), a spent account (402) or a model the
    // provider no longer has (404) is the deployment's fault: not retried
    // there, served by the fallback, and counted by the breaker.
    let (app, primary, fallback) = two_deployments("").await;
    for fault in [
        Fault::Status(401),
        Fault::Status(402),
        Fault::Status(403),
        Fault::ModelNotFound,
    ] {
        primary.push_fault(fault.clone());
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("smart"))
            .await;
        assert_eq!(resp.status(), 200, "{fault:?}");
        assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    }
    assert_eq!((primary.calls(), fallback.calls()), (4, 4));

    primary.update(|b| b.always = Some(Fault::Status(401)));
    for _ in 0..4 {
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("smart"))
            .await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        primary.calls(),
        5,
        "the fifth failure in a row opened the breaker"
    );
    let errors = metric(
        &app,
        r#"switchyard_upstream_attempts_total{deployment="primary/p-model",outcome="error"}"#,
    )
    .await;
    assert_eq!(errors, 5.0);
}

/// A 404 about something the request names (a file, a container) is the
/// client's: relayed at once, and no breaker counts it, or one client's bad
/// requests would turn every tenant away.
#[tokio::test]
async fn a_404_that_does_not_name_the_model_is_the_clients() {
    let (app, primary, fallback) = two_deployments("").await;
    for _ in 0..6 {
        primary.push_fault(Fault::Status(404));
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("smart"))
            .await;
        assert_eq!(resp.status(), 404);
    }
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("smart"))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "primary");
    assert_eq!((primary.calls(), fallback.calls()), (7, 0));
}

#[tokio::test]
async fn the_failure_that_opens_a_breaker_is_not_retried() {
    let (app, primary, fallback) = two_deployments("max_attempts = 2").await;
    primary.update(|b| b.always = Some(Fault::Status(500)));
    for _ in 0..3 {
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("smart"))
            .await;
        assert_eq!(resp.status(), 200);
    }
    // Two requests of two attempts each, then the fifth failure opened the
    // breaker: no sixth attempt, no backoff, straight to the fallback.
    assert_eq!((primary.calls(), fallback.calls()), (5, 3));
    let retries = metric(
        &app,
        r#"switchyard_retries_total{deployment="primary/p-model"}"#,
    )
    .await;
    assert_eq!(retries, 2.0);
}

#[tokio::test]
async fn a_client_error_is_returned_at_once_without_retry_or_fallback() {
    let (app, primary, fallback) = two_deployments("").await;
    primary.push_fault(Fault::Status(400));

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("smart"))
        .await;

    assert_eq!(resp.status(), 400);
    assert_eq!((primary.calls(), fallback.calls()), (1, 0));
}

#[tokio::test]
async fn when_every_breaker_is_open_the_answer_is_503_without_upstream_calls() {
    let (app, primary, fallback) =
        two_deployments("max_attempts = 1\nbreaker_failure_threshold = 1").await;
    primary.update(|b| b.always = Some(Fault::Status(500)));
    fallback.update(|b| b.always = Some(Fault::Status(500)));
    assert_eq!(
        app.post_json("/v1/chat/completions", &chat_body("smart"))
            .await
            .status(),
        502
    );

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("smart"))
        .await;

    assert_error(resp, 503, "model_unavailable").await;
    assert_eq!((primary.calls(), fallback.calls()), (1, 1));
}

#[tokio::test]
async fn provider_health_and_breaker_state_are_served_probed_and_persisted() {
    let (mut app, primary, _fallback) = two_deployments(
        "max_attempts = 1\n\n[health]\npersist_interval_secs = 1\nprobe_interval_secs = 1\nprobe_timeout_ms = 1000",
    )
    .await;
    primary.update(|b| b.always = Some(Fault::Status(503)));
    for _ in 0..6 {
        assert_eq!(
            app.post_json("/v1/chat/completions", &chat_body("smart"))
                .await
                .status(),
            200
        );
    }

    // Probes run once a second: wait (bounded) until both deployments have one.
    let mut body = Value::Null;
    for _ in 0..50 {
        body = get_json(&app, "/v1/admin/providers").await;
        if body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["probe"]["ok"].is_boolean())
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let p = deployment(&body, "primary/p-model").unwrap();
    assert_eq!(p["breaker"]["state"], "open");
    assert_eq!(p["health"]["total_errors"], 5);
    assert_eq!(p["health"]["error_rate"], 1.0);
    assert_eq!(p["health"]["last_error"], "upstream_status");
    assert_eq!(
        p["probe"]["ok"], true,
        "listing models still works: the probe says the host is up"
    );
    let f = deployment(&body, "fallback/f-model").unwrap();
    assert_eq!(f["breaker"]["state"], "closed");
    assert_eq!(f["health"]["total_calls"], 6);
    assert!(f["health"]["p50_ms"].as_f64().unwrap() > 0.0);

    app.stop_gracefully().await;
    let rows = app_store(&app).await.list_provider_health().await.unwrap();
    let states: Vec<(&str, &str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.deployment.as_str(),
                r.breaker_state.as_str(),
                r.total_calls,
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("fallback/f-model", "closed", 6),
            ("primary/p-model", "open", 5)
        ]
    );
    assert!(rows.iter().all(|r| r.last_probe_ok == Some(true)));
}

#[tokio::test]
async fn the_retry_budget_caps_retries_of_a_failing_primary_at_a_fifth_of_requests() {
    // A breaker that never opens and a 1 ms backoff: only the retry budget
    // (20 % of the last ten seconds' requests, at least 10) stops retries.
    let (app, primary, fallback) = two_deployments(
        "breaker_failure_threshold = 1000\nbackoff_base_ms = 1\nbackoff_cap_ms = 1",
    )
    .await;
    primary.update(|b| b.always = Some(Fault::Status(500)));

    for _ in 0..100 {
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("smart"))
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    }

    // The 100 requests (a few loopback milliseconds each) fall in one
    // ten-second window: 20 of them may retry, 80 are refused. Without the
    // budget all 100 would retry, doubling the load on the failing primary.
    let retries = metric(
        &app,
        r#"switchyard_retries_total{deployment="primary/p-model"}"#,
    )
    .await;
    let refused = metric(&app, "switchyard_retry_budget_exhausted_total").await;
    assert_eq!((retries, refused), (20.0, 80.0));
    assert_eq!((primary.calls(), fallback.calls()), (120, 100));
}
