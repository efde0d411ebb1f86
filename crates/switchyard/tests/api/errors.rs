//! Bad input and failing providers: the status and the OpenAI-shaped body.

use serde_json::{json, Value};
use switchyard_testkit::app::MOCK_PROVIDER_KEY;
use switchyard_testkit::{Fault, TestApp};

use crate::helpers::*;

#[tokio::test]
async fn an_unknown_model_is_404_naming_the_model() {
    let app = spawn().await;

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-99"))
        .await;

    let body = assert_error(resp, 404, "model_not_found").await;
    insta::assert_json_snapshot!(body, @r#"
    {
      "error": {
        "message": "The model `gpt-99` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found"
      }
    }
    "#);
    assert_eq!(app.mock().calls(), 0);
    let resp = app
        .post_json("/v1/embeddings", &json!({"model": "nope", "input": "x"}))
        .await;
    assert_error(resp, 404, "model_not_found").await;
}

/// Posts `body` to `path` as it is, labelled JSON.
async fn post_raw_json(app: &TestApp, path: &str, body: &'static str) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_json_is_400_saying_what_is_wrong_and_where() {
    let app = spawn().await;

    let mut bodies = Vec::new();
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let resp = post_raw_json(&app, path, "{\"model\": \"gpt-4o-mini\",").await;
        bodies.push(assert_error(resp, 400, "invalid_json").await);
    }

    // OpenAI's message starts the same way (its `code` is null; ours is a
    // stable code, and the message says what is wrong and where).
    insta::assert_json_snapshot!(bodies[0], @r#"
    {
      "error": {
        "message": "We could not parse the JSON body of your request: EOF while parsing a value at line 1 column 24.",
        "type": "invalid_request_error",
        "param": null,
        "code": "invalid_json"
      }
    }
    "#);
    assert_eq!(bodies[1], bodies[0]);
    let resp = post_raw_json(
        &app,
        "/v1/chat/completions",
        "{\"model\": \"gpt-4o-mini\",\n \"messages\": [}",
    )
    .await;
    let body = assert_error(resp, 400, "invalid_json").await;
    assert_eq!(
        body["error"]["message"],
        "We could not parse the JSON body of your request: expected value at line 2 column 15."
    );
    let resp = post_raw_json(&app, "/v1/chat/completions", "[1]").await;
    let body = assert_error(resp, 400, "invalid_json").await;
    assert_eq!(
        body["error"]["message"],
        "The request body must be a JSON object, but got an array."
    );
    assert_eq!(app.mock().calls(), 0);
}

#[tokio::test]
async fn a_missing_field_is_400_naming_it() {
    let app = spawn().await;

    let resp = app
        .post_json("/v1/chat/completions", &json!({"model": "gpt-4o-mini"}))
        .await;

    let body = assert_error(resp, 400, "missing_required_parameter").await;
    insta::assert_json_snapshot!(body, @r#"
    {
      "error": {
        "message": "Missing required parameter: 'messages'.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "missing_required_parameter"
      }
    }
    "#);
    let resp = app
        .post_json(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small"}),
        )
        .await;
    let body = assert_error(resp, 400, "missing_required_parameter").await;
    assert_eq!(body["error"]["param"], "input");
}

#[tokio::test]
async fn an_ill_typed_field_is_400_naming_it() {
    let app = spawn().await;
    let mut body = chat_body("gpt-4o-mini");
    body["messages"][0]["role"] = json!(7);

    let resp = app.post_json("/v1/chat/completions", &body).await;

    let err = assert_error(resp, 400, "invalid_type").await;
    insta::assert_json_snapshot!(err, @r#"
    {
      "error": {
        "message": "Invalid type for 'messages[0].role': expected a string, but got an integer instead.",
        "type": "invalid_request_error",
        "param": "messages[0].role",
        "code": "invalid_type"
      }
    }
    "#);
    let mut body = chat_body("gpt-4o-mini");
    body["temperature"] = json!("warm");
    let err = assert_error(
        app.post_json("/v1/chat/completions", &body).await,
        400,
        "invalid_type",
    )
    .await;
    assert_eq!(err["error"]["param"], "temperature");
    let err = assert_error(
        app.post_json(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": "x", "encoding_format": "hex"}),
        )
        .await,
        400,
        "invalid_value",
    )
    .await;
    assert_eq!(err["error"]["param"], "encoding_format");
    assert_eq!(app.mock().calls(), 0);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let app = app()
        .config("")
        .env("SWITCHYARD_SERVER__MAX_BODY_BYTES", "2048")
        .spawn()
        .await;
    let mut body = chat_body("gpt-4o-mini");
    body["messages"][0]["content"] = json!("x".repeat(4096));

    let resp = app.post_json("/v1/chat/completions", &body).await;
    let err = assert_error(resp, 413, "request_too_large").await;
    assert!(err["error"]["message"].as_str().unwrap().contains("2048"));

    // Without a Content-Length (chunked), the limit still holds.
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok("{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"".into()),
        Ok("y".repeat(4096)),
        Ok("\"}]}".into()),
    ];
    let resp = app
        .client
        .post(app.url("/v1/embeddings"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_error(resp, 413, "request_too_large").await;
    assert_eq!(app.mock().calls(), 0);
}

#[tokio::test]
async fn an_unknown_route_is_404_and_a_wrong_method_is_405() {
    let app = spawn().await;
    let call =
        |method: reqwest::Method, path: &str| app.client.request(method, app.url(path)).send();

    let resp = call(reqwest::Method::POST, "/v1/completions-nope")
        .await
        .unwrap();
    let body = assert_error(resp, 404, "unknown_url").await;
    assert_eq!(
        body["error"]["message"],
        "Unknown request URL: POST /v1/completions-nope."
    );

    let resp = call(reqwest::Method::GET, "/v1/chat/completions")
        .await
        .unwrap();
    assert_error(resp, 405, "method_not_allowed").await;

    // Under /v1/messages, Anthropic's shape (an Anthropic SDK reads it; e.g.
    // message batches, which Switchyard does not serve).
    for (method, path, status, ty) in [
        (
            reqwest::Method::POST,
            "/v1/messages/batches",
            404,
            "not_found_error",
        ),
        (
            reqwest::Method::GET,
            "/v1/messages/count_tokens",
            405,
            "invalid_request_error",
        ),
        (
            reqwest::Method::GET,
            "/v1/messages",
            405,
            "invalid_request_error",
        ),
    ] {
        let resp = call(method, path).await.unwrap();
        assert_eq!(resp.status(), status, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], ty, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(path),
            "{v}"
        );
    }
    // Under the native prefixes, the native shape.
    let resp = call(reqwest::Method::GET, "/v1/admin/nope").await.unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": {"code": "unknown_url", "message": "Unknown request URL: GET /v1/admin/nope.", "details": {}}})
    );
}

#[tokio::test]
async fn a_provider_5xx_is_502_without_internal_details() {
    let app = spawn().await;
    app.mock().update(|b| b.always = Some(Fault::Status(500)));

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;

    let body = assert_error(resp, 502, "upstream_status").await;
    assert_eq!(body["error"]["type"], "upstream_error");
    assert_eq!(
        body["error"]["message"],
        "The provider failed with status 500."
    );
}

#[tokio::test]
async fn a_provider_that_hangs_is_504() {
    let mock = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .config(&format!(
            "[providers.slowmock]\nkind = \"openai\"\nbase_url = \"{}\"\ntimeout_secs = 1\n\n[models.slow]\nprovider = \"slowmock\"\nmodel = \"m\"\n",
            mock.base_url()
        ))
        .spawn()
        .await;
    mock.update(|b| b.always = Some(Fault::Hang));

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("slow"))
        .await;

    let body = assert_error(resp, 504, "upstream_timeout").await;
    insta::assert_json_snapshot!(body, @r#"
    {
      "error": {
        "message": "The provider did not answer in time.",
        "type": "upstream_error",
        "param": null,
        "code": "upstream_timeout"
      }
    }
    "#);
}

#[tokio::test]
async fn an_unreachable_provider_is_502() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = app()
        .without_mock()
        .config(&format!(
            "[providers.down]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n\n[models.down]\nprovider = \"down\"\nmodel = \"m\"\n"
        ))
        .spawn()
        .await;

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("down"))
        .await;

    let body = assert_error(resp, 502, "upstream_connect_error").await;
    assert_eq!(
        body["error"]["message"],
        "Could not connect to the provider."
    );
}

#[tokio::test]
async fn a_provider_rejection_of_the_request_is_relayed_with_its_status() {
    let app = spawn().await;
    app.mock().push_fault(Fault::Status(400));
    app.mock().push_fault(Fault::RateLimited {
        retry_after_secs: 7,
    });

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["message"], "mock: injected status 400");

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
}

#[tokio::test]
async fn the_provider_key_never_appears_in_a_response_a_log_line_an_event_or_a_usage_row() {
    // Debug logs everywhere: the lines most likely to carry a header or an
    // upstream body.
    let mut app = app().env("RUST_LOG", "debug").spawn().await;
    app.mock()
        .update(|b| b.always = Some(Fault::EchoAuthorization));
    let trace_id = "5c1e7e0b2f3a4d6e8f9a0b1c2d3e4f50";

    let first = chat_with_traceparent(
        &app,
        &chat_body("gpt-4o-mini"),
        &format!("00-{trace_id}-00f067aa0ba902b7-01"),
    )
    .await;
    let status = first.status();
    let text = first.text().await.unwrap();
    let second = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", true))
        .await
        .text()
        .await
        .unwrap();

    assert_eq!(
        status, 502,
        "a rejected provider key is the gateway's problem, not the client's"
    );
    assert!(!text.contains(MOCK_PROVIDER_KEY), "{text}");
    assert!(!second.contains(MOCK_PROVIDER_KEY), "{second}");
    // The mock really did echo it: the gateway scrubbed it.
    assert!(app.mock().requests()[0].headers["authorization"]
        .to_str()
        .unwrap()
        .contains(MOCK_PROVIDER_KEY));
    let events = finished_trace(&app, trace_id).await.to_string();
    assert!(
        events.contains("request.error"),
        "the trace has its events: {events}"
    );
    assert!(!events.contains(MOCK_PROVIDER_KEY), "{events}");
    assert!(app
        .wait_for_log(|l| l.contains("request") && l.contains("502"))
        .await
        .is_some());
    app.stop_gracefully().await;
    let logs = app.logs();
    assert!(
        logs.iter().any(|l| l.contains("\"level\":\"DEBUG\"")),
        "debug lines were logged"
    );
    let leaked: Vec<_> = logs
        .iter()
        .filter(|l| l.contains(MOCK_PROVIDER_KEY))
        .collect();
    assert!(leaked.is_empty(), "log lines leaked the key: {leaked:#?}");
    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        let row = format!("{row:?}");
        assert!(!row.contains(MOCK_PROVIDER_KEY), "{row}");
    }
}

#[tokio::test]
async fn max_tokens_above_the_configured_cap_is_400_before_any_provider_call() {
    let app = app().config("[security]\nmax_tokens = 256\n").spawn().await;
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat_body("gpt-4o-mini");
        body[field] = json!(257);
        let resp = app.post_json("/v1/chat/completions", &body).await;
        let err = assert_error(resp, 400, "max_tokens_too_large").await;
        assert_eq!(err["error"]["param"], field);
    }
    let resp = app
        .post_json(
            "/v1/messages",
            &json!({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(app.mock().calls(), 0);
    let mut ok = chat_body("gpt-4o-mini");
    ok["max_tokens"] = json!(256);
    assert_eq!(
        app.post_json("/v1/chat/completions", &ok).await.status(),
        200
    );
}

/// A provider's answer larger than `max_response_mib` is refused as it is
/// read (a 502, the memory bounded), for chat and embeddings alike, while an
/// answer within it is relayed whole.
#[tokio::test]
async fn an_answer_larger_than_max_response_mib_is_a_502_not_a_full_memory() {
    let app = app()
        .env("SWITCHYARD_PROVIDERS__MOCK__MAX_RESPONSE_MIB", "1")
        .spawn()
        .await;
    let filler = "x".repeat(1024 * 1024);
    let big = format!(
        r#"{{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"{filler}"}},"finish_reason":"stop"}}]}}"#
    );
    for (path, body) in [
        ("/v1/chat/completions", chat_body("gpt-4o-mini")),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-3-small", "input": "hi"}),
        ),
    ] {
        app.mock().push_fault(Fault::Raw(big.clone()));
        app.mock().push_fault(Fault::Raw(big.clone()));
        let resp = app.post_json(path, &body).await;
        assert_error(resp, 502, "upstream_protocol_error").await;
    }
    assert!(
        app.wait_for_log(|l| l.contains("larger than 1 MiB (max_response_mib)"))
            .await
            .is_some(),
        "the log says why"
    );
    let within = format!(
        r#"{{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}]}}"#,
        "y".repeat(1000 * 1000)
    );
    app.mock().push_fault(Fault::Raw(within));
    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len(),
        1000 * 1000
    );
}
