//! Circuit breakers seen from outside the running binary: the state gauge
//! and transition counters at `/metrics`, transition log lines carrying the
//! trace id of the request that caused them, and the half-open probe limit
//! under concurrent requests. Cool-downs are one second (the binary's clock
//! cannot be paused); tests wait for them by polling the admin API, never by
//! sleeping a guessed time.

use std::time::Duration;

use futures::future::join_all;
use serde_json::Value;
use switchyard_testkit::{Fault, TestApp};

use crate::helpers::*;

const PRIMARY: &str = "primary/p-model";

/// Every `/metrics` line starting with `prefix`, with its value.
async fn metric_lines(app: &TestApp, prefix: &str) -> Vec<(String, f64)> {
    get_text(app, "/metrics")
        .await
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The primary's state gauge (0 closed, 1 half-open, 2 open), `None` if absent.
async fn breaker_gauge(app: &TestApp) -> Option<f64> {
    let name = format!("switchyard_breaker_state{{deployment=\"{PRIMARY}\"}}");
    metric_lines(app, &name)
        .await
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The primary's transitions so far, by target state, in a fixed order.
async fn transitions(app: &TestApp) -> Vec<(String, f64)> {
    let prefix = format!("switchyard_breaker_transitions_total{{deployment=\"{PRIMARY}\",to=\"");
    let mut out: Vec<(String, f64)> = metric_lines(app, &prefix)
        .await
        .into_iter()
        .map(|(n, v)| (n[prefix.len()..n.len() - 2].to_owned(), v))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Polls the admin API until the primary's cool-down is over (it reads as
/// half-open); bounded, so a breaker that never cools down fails the test.
async fn wait_for_cool_down(app: &TestApp) {
    for _ in 0..200 {
        let body = get_json(app, "/v1/admin/providers").await;
        let state = deployment(&body, PRIMARY).map(|d| d["breaker"]["state"].clone());
        if state == Some(Value::from("half_open")) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the primary's breaker never cooled down");
}

async fn send(app: &TestApp, traceparent: Option<&str>) -> String {
    let mut req = app
        .client
        .post(app.url("/v1/chat/completions"))
        .json(&chat_body("smart"));
    if let Some(t) = traceparent {
        req = req.header("traceparent", t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.headers()["x-switchyard-provider"]
        .to_str()
        .unwrap()
        .to_owned()
}

fn owned(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
    pairs.iter().map(|(s, v)| ((*s).to_owned(), *v)).collect()
}

#[tokio::test]
async fn the_breaker_state_gauge_and_transition_counters_follow_a_full_cycle() {
    let (app, primary, _fallback) =
        two_deployments("max_attempts = 1\nbreaker_cooldown_secs = 1").await;
    assert_eq!(
        breaker_gauge(&app).await,
        Some(0.0),
        "closed from the start"
    );
    assert_eq!(transitions(&app).await, owned(&[]));

    primary.update(|b| b.always = Some(Fault::Status(503)));
    for _ in 0..5 {
        send(&app, None).await;
    }
    assert_eq!(breaker_gauge(&app).await, Some(2.0), "open");
    assert_eq!(transitions(&app).await, owned(&[("open", 1.0)]));

    wait_for_cool_down(&app).await;
    assert_eq!(
        breaker_gauge(&app).await,
        Some(1.0),
        "half-open once the cool-down has passed, as the admin API reads it"
    );
    assert_eq!(
        transitions(&app).await,
        owned(&[("open", 1.0)]),
        "the move itself is counted when a request makes it"
    );
    primary.update(|b| b.always = None);
    assert_eq!(send(&app, None).await, "primary", "the first probe");
    assert_eq!(breaker_gauge(&app).await, Some(1.0), "half-open");
    assert_eq!(
        transitions(&app).await,
        owned(&[("half_open", 1.0), ("open", 1.0)])
    );

    for _ in 0..2 {
        assert_eq!(send(&app, None).await, "primary");
    }
    assert_eq!(breaker_gauge(&app).await, Some(0.0), "closed again");
    assert_eq!(
        transitions(&app).await,
        owned(&[("closed", 1.0), ("half_open", 1.0), ("open", 1.0)])
    );
}

#[tokio::test]
async fn breaker_transitions_are_logged_with_the_trace_id_of_the_request_that_caused_them() {
    const OPENER: &str = "0af7651916cd43dd8448eb211c80319c";
    const PROBE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (app, primary, _fallback) = two_deployments(
        "max_attempts = 1\nbreaker_cooldown_secs = 1\nbreaker_success_threshold = 1",
    )
    .await;
    primary.update(|b| b.always = Some(Fault::Status(503)));
    for _ in 0..4 {
        send(&app, None).await;
    }
    // The fifth consecutive failure opens the breaker.
    send(&app, Some(&format!("00-{OPENER}-b7ad6b7169203331-01"))).await;
    wait_for_cool_down(&app).await;
    primary.update(|b| b.always = None);

    // This request's probe half-opens the breaker and, succeeding, closes it.
    let served = send(&app, Some(&format!("00-{PROBE}-00f067aa0ba902b7-01"))).await;

    assert_eq!(served, "primary");
    let transition = |to: &'static str| {
        let app = &app;
        async move {
            wait_for_log_json(app, |l| {
                l.contains("circuit breaker") && l.contains(&format!("\"to\":\"{to}\""))
            })
            .await
            .unwrap_or_else(|| panic!("no transition to {to} was logged"))
        }
    };
    let opened = transition("open").await;
    assert_eq!(opened["message"], "circuit breaker opened");
    assert_eq!(opened["deployment"], PRIMARY);
    assert_eq!(log_trace_id(&opened), OPENER, "{opened}");
    let half_open = transition("half_open").await;
    assert_eq!(half_open["from"], "open");
    assert_eq!(log_trace_id(&half_open), PROBE, "{half_open}");
    let closed = transition("closed").await;
    assert_eq!(closed["from"], "half_open");
    assert_eq!(log_trace_id(&closed), PROBE, "{closed}");
}

#[tokio::test]
async fn a_half_open_breaker_lets_exactly_its_probe_limit_through_concurrent_requests() {
    let (app, primary, fallback) = two_deployments(
        "max_attempts = 1\nbreaker_cooldown_secs = 1\nbreaker_half_open_probes = 3",
    )
    .await;
    primary.update(|b| b.always = Some(Fault::Status(503)));
    for _ in 0..5 {
        send(&app, None).await;
    }
    assert_eq!(primary.calls(), 5);
    wait_for_cool_down(&app).await;
    // Slow failing probes: all three are in flight while the other requests
    // arrive, and the first to fail re-opens the breaker for the rest.
    primary.update(|b| b.latency = Duration::from_millis(500));
    let fallback_before = fallback.calls();

    let served = join_all((0..20).map(|_| send(&app, None))).await;

    assert_eq!(
        primary.calls() - 5,
        3,
        "exactly three probes reached the primary"
    );
    assert!(served.iter().all(|p| p == "fallback"));
    assert_eq!(fallback.calls() - fallback_before, 20);
    let skipped = metric(
        &app,
        &format!("switchyard_breaker_rejections_total{{deployment=\"{PRIMARY}\"}}"),
    )
    .await;
    assert_eq!(skipped, 17.0, "the others were turned away without a call");
}

/// A deployment whose streams break after their first chunk is failing,
/// however well they start: each broken stream counts against its breaker
/// and health (the breaker opens after five), and then the route moves on.
#[tokio::test]
async fn streams_that_break_after_their_first_chunk_open_the_breaker() {
    let (app, primary, _fallback) = two_deployments("max_attempts = 1").await;
    primary.update(|b| b.always = Some(Fault::ResetAfterChunks(2)));
    let stream = |app: &TestApp| {
        app.client
            .post(app.url("/v1/chat/completions"))
            .json(&stream_body("smart", false))
            .send()
    };
    for i in 0..5 {
        assert_eq!(
            breaker_gauge(&app).await,
            Some(0.0),
            "closed before stream {i}"
        );
        let resp = stream(&app).await.unwrap();
        assert_eq!(resp.headers()["x-switchyard-provider"], "primary");
        let body = resp.text().await.unwrap();
        assert!(body.contains("\"error\""), "cut, and said so: {body}");
    }
    assert_eq!(breaker_gauge(&app).await, Some(2.0), "open after five");
    let providers = get_json(&app, "/v1/admin/providers").await;
    let health = &deployment(&providers, PRIMARY).unwrap()["health"];
    assert!(health["error_rate"].as_f64().unwrap() > 0.99, "{health}");
    let resp = stream(&app).await.unwrap();
    assert_eq!(resp.headers()["x-switchyard-provider"], "fallback");
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

/// Two aliases reach one upstream with different timeouts: still one
/// deployment id, listed once, with one breaker (failures through one alias
/// keep the other off the failing upstream too).
#[tokio::test]
async fn one_upstream_has_one_breaker_whatever_the_timeouts_of_its_routes() {
    let primary = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .config(&format!(
            "[resilience]\nmax_attempts = 1\n\n\
             [providers.primary]\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
             [[models.fast.route]]\nprovider = \"primary\"\nmodel = \"p-model\"\nfirst_byte_timeout_ms = 5000\n\n\
             [[models.slow.route]]\nprovider = \"primary\"\nmodel = \"p-model\"\n",
            primary.base_url()
        ))
        .spawn()
        .await;
    let providers = get_json(&app, "/v1/admin/providers").await;
    let listed = providers["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["deployment"] == PRIMARY)
        .count();
    assert_eq!(listed, 1, "{providers}");
    primary.update(|b| b.always = Some(Fault::Status(503)));
    for _ in 0..5 {
        let resp = app
            .post_json("/v1/chat/completions", &chat_body("fast"))
            .await;
        assert_eq!(resp.status(), 502, "the upstream's failure");
    }
    assert_eq!(breaker_gauge(&app).await, Some(2.0));
    let calls = primary.calls();
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("slow"))
        .await;
    assert_eq!(resp.status(), 503, "no deployment available");
    assert_eq!(
        primary.calls(),
        calls,
        "the open breaker kept `slow` off it too"
    );
}

/// A fallback is counted where it lands: a route primary → (open) → mock
/// whose primary fails counts one fallback, not one to the deployment
/// skipped with its breaker open. And a model whose every deployment is
/// open answers 503 with `Retry-After`: when the cool-down ends.
#[tokio::test]
async fn fallbacks_skip_open_breakers_uncounted_and_an_open_model_says_when_to_retry() {
    let primary = switchyard_testkit::MockUpstream::start().await.unwrap();
    let dead = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .config(&format!(
            "[resilience]\nmax_attempts = 1\nbreaker_failure_threshold = 1\nbreaker_cooldown_secs = 60\n\n\
             [providers.primary]\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
             [providers.dead]\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
             [[models.three.route]]\nprovider = \"primary\"\nmodel = \"p\"\n\n\
             [[models.three.route]]\nprovider = \"dead\"\nmodel = \"d\"\n\n\
             [[models.three.route]]\nprovider = \"mock\"\nmodel = \"gpt-4o-mini-upstream\"\n\n\
             [models.dead-only]\nprovider = \"dead\"\nmodel = \"d\"\n",
            primary.base_url(),
            dead.base_url()
        ))
        .spawn()
        .await;
    dead.update(|b| b.always = Some(Fault::Status(503)));
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("dead-only"))
        .await;
    assert_eq!(resp.status(), 502, "the failure that opens its breaker");

    primary.update(|b| b.always = Some(Fault::Status(500)));
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("three"))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "mock");
    assert_eq!(dead.calls(), 1, "skipped: its breaker is open");
    let fallbacks = metric_lines(&app, "switchyard_fallbacks_total{from=\"primary/p\"}").await;
    assert_eq!(fallbacks.len(), 1, "{fallbacks:?}");
    assert_eq!(fallbacks[0].1, 1.0, "one fallback, to the mock");

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("dead-only"))
        .await;
    assert_eq!(resp.status(), 503);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_unavailable");
}
