//! Anthropic both ways: an Anthropic-backed alias through the OpenAI API, and
//! the Anthropic Messages API in front of an OpenAI-compatible provider.

use serde_json::{json, Value};
use switchyard_testkit::{Fault, MockUpstream, TestApp, MOCK_SIGNATURE, MOCK_THOUGHT};

use crate::helpers::*;

const ANTHROPIC_KEY: &str = "sk-ant-mock-secret-key";

/// The default test app plus `claude` → an Anthropic provider on its own mock,
/// and `claude-then-gpt` → that provider with the OpenAI mock as fallback.
/// How many words the mock's default reply has (its output token count).
fn mock_reply_words() -> usize {
    switchyard_testkit::Behavior::default()
        .reply
        .split_whitespace()
        .count()
}

async fn with_anthropic() -> (TestApp, MockUpstream) {
    with_anthropic_and("", "").await
}

/// [`with_anthropic`] with more settings for the Anthropic provider, and
/// more configuration after it.
async fn with_anthropic_and(provider: &str, more: &str) -> (TestApp, MockUpstream) {
    let anthropic = MockUpstream::start().await.unwrap();
    let app = app()
        .config(&format!(
            "[providers.anthropic]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key = \"{ANTHROPIC_KEY}\"\n{provider}\n\
             [models.claude]\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-mock\"\n\n\
             [[models.claude-then-gpt.route]]\nprovider = \"anthropic\"\nmodel = \"claude-sonnet-mock\"\n\n\
             [[models.claude-then-gpt.route]]\nprovider = \"mock\"\nmodel = \"gpt-4o-mini-upstream\"\n\n{more}",
            anthropic.base_url()
        ))
        .spawn()
        .await;
    (app, anthropic)
}

#[tokio::test]
async fn an_anthropic_backed_alias_answers_in_openai_shape() {
    let (app, anthropic) = with_anthropic().await;
    let body = json!({"model": "claude", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]});

    let resp = app.post_json("/v1/chat/completions", &body).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "anthropic");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello! How can I help you today?"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    let sent = anthropic.last_request().unwrap();
    assert_eq!(sent.path, "/v1/messages");
    assert_eq!(sent.headers["x-api-key"], ANTHROPIC_KEY);
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(sent.body["model"], "claude-sonnet-mock");
    assert_eq!(sent.body["max_tokens"], 4096);
    assert_eq!(
        sent.body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}])
    );
}

#[tokio::test]
async fn an_anthropic_stream_becomes_openai_chunks_with_usage() {
    let (app, _anthropic) = with_anthropic().await;

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("claude", true))
        .await;

    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert_eq!(streamed_text(&data), "Hello! How can I help you today?");
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 7);
    let finish: Value = serde_json::from_str(&data[data.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn anthropic_tool_call_deltas_reach_the_client_as_several_chunks() {
    let (app, anthropic) = with_anthropic().await;
    let mut body = stream_body("claude", false);
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}}]);

    let data = sse_data(
        &app.post_json("/v1/chat/completions", &body)
            .await
            .text()
            .await
            .unwrap(),
    );

    let pieces: Vec<String> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .filter(|a| !a.is_empty())
        .collect();
    assert!(
        pieces.len() >= 2,
        "arguments arrived in one burst: {pieces:?}"
    );
    assert_eq!(
        pieces.concat(),
        r#"{"location": "Paris", "unit": "celsius"}"#
    );
    let finish = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned));
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(
        anthropic.last_request().unwrap().body["tools"][0]["input_schema"],
        json!({"type": "object"})
    );
}

#[tokio::test]
async fn an_overloaded_anthropic_is_retried_once_then_fails_over_to_the_next_deployment() {
    let (app, anthropic) = with_anthropic().await;
    anthropic.update(|b| b.always = Some(Fault::Status(529)));

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("claude-then-gpt"))
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "mock");
    assert_eq!(
        (anthropic.calls(), app.mock().calls()),
        (2, 1),
        "529 is retried on the same deployment (max_attempts = 2), then the fallback serves"
    );
}

#[tokio::test]
async fn an_anthropic_rejection_is_relayed_in_openai_shape() {
    let (app, anthropic) = with_anthropic().await;
    anthropic.push_fault(Fault::Status(400));

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("claude"))
        .await;

    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "mock: injected status 400");
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

/// An Anthropic stream that begins (`message_start`) and then stays silent
/// is bounded by the stream idle timeout before its answer's first event,
/// as after it: the attempt times out and the fallback serves, instead of
/// the client waiting for the total timeout.
#[tokio::test]
async fn a_stream_silent_after_its_preamble_meets_the_idle_timeout_and_fails_over() {
    let (app, anthropic) = with_anthropic_and("stream_idle_timeout_ms = 300\n", "").await;
    anthropic.update(|b| b.chunk_delay = std::time::Duration::from_secs(2));

    let resp = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "claude-then-gpt", "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "mock");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
}

/// A 200 whose body is an error object (what some proxies in front of
/// Anthropic send) is that error: an overload fails over, a rejection is
/// returned as its 4xx, and anything that is not a message is a 502 —
/// never an empty reply with status 200. Both through the OpenAI API and
/// the Messages API (which relays Anthropic's body as it is).
#[tokio::test]
async fn a_200_that_is_not_a_message_is_never_an_empty_reply() {
    // Enough retry budget for every retry below, and no breaker opening.
    let (app, anthropic) = with_anthropic_and(
        "",
        "[resilience]\nretry_budget_min = 100\nbreaker_failure_threshold = 100\n",
    )
    .await;
    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let rejected = format!(
        r#"{{"type":"error","error":{{"type":"invalid_request_error","message":"prompt is too long ({ANTHROPIC_KEY})"}}}}"#
    );
    for (path, body) in [
        ("/v1/chat/completions", chat_body("claude-then-gpt")),
        ("/v1/messages", messages_body("claude-then-gpt")),
    ] {
        anthropic.push_fault(Fault::Raw(overloaded.into()));
        anthropic.push_fault(Fault::Raw(overloaded.into()));
        let before = app.mock().calls();
        let calls = anthropic.calls();
        let resp = app.post_json(path, &body).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        assert_eq!(status, 200, "{path}: {}", resp.text().await.unwrap());
        assert_eq!(headers["x-switchyard-provider"], "mock", "{path}");
        assert_eq!(
            app.mock().calls(),
            before + 1,
            "{path}: the fallback served"
        );
        assert_eq!(
            anthropic.calls(),
            calls + 2,
            "{path}: retried once, then failed over"
        );
        let calls = anthropic.calls();

        anthropic.push_fault(Fault::Raw(rejected.clone()));
        let resp = app.post_json(path, &body).await;
        assert_eq!(resp.status(), 400, "{path}");
        let text = resp.text().await.unwrap();
        assert!(text.contains("prompt is too long"), "{path}: {text}");
        assert!(!text.contains(ANTHROPIC_KEY), "{path}: {text}");
        assert_eq!(anthropic.calls(), calls + 1, "{path}: a 4xx is not retried");

        for raw in [r#"{}"#, r#"{"type":"completion"}"#] {
            let calls = anthropic.calls();
            anthropic.push_fault(Fault::Raw(raw.into()));
            anthropic.push_fault(Fault::Raw(raw.into()));
            let body_for_claude = if path == "/v1/messages" {
                messages_body("claude")
            } else {
                chat_body("claude")
            };
            let resp = app.post_json(path, &body_for_claude).await;
            assert_eq!(resp.status(), 502, "{path} {raw}");
            assert_eq!(anthropic.calls(), calls + 2, "{path} {raw}: retried once");
        }
    }
}

/// `POST /v1/messages` with `body`, its event stream as (name, data) pairs.
async fn messages_events(app: &TestApp, body: &Value) -> Vec<(String, Value)> {
    anthropic_events(
        &app.post_json("/v1/messages", body)
            .await
            .text()
            .await
            .unwrap(),
    )
}

/// An Anthropic event stream as (event name, data) pairs.
fn anthropic_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap()
                .to_owned();
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

fn messages_body(model: &str) -> Value {
    json!({"model": model, "max_tokens": 256, "system": "Be brief.", "messages": [{"role": "user", "content": "Say hello"}]})
}

#[tokio::test]
async fn the_messages_api_fronts_an_openai_compatible_provider() {
    let app = spawn().await;

    let resp = app
        .post_json("/v1/messages", &messages_body("gpt-4o-mini"))
        .await;

    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "Hello! How can I help you today?"}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["output_tokens"], 7);
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(sent["max_tokens"], 256);
}

#[tokio::test]
async fn the_messages_api_streams_anthropic_events() {
    let app = spawn().await;
    let mut body = messages_body("gpt-4o-mini");
    body["stream"] = json!(true);

    let resp = app.post_json("/v1/messages", &body).await;

    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = anthropic_events(&resp.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(&names[names.len() - 2..], ["message_delta", "message_stop"]);
    let text: String = events
        .iter()
        .filter_map(|(_, d)| {
            d.pointer("/delta/text")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Hello! How can I help you today?");
    assert_eq!(events[events.len() - 2].1["usage"]["output_tokens"], 7);
}

#[tokio::test]
async fn the_messages_api_answers_errors_in_anthropic_shape() {
    let app = spawn().await;

    let missing = app
        .post_json(
            "/v1/messages",
            &json!({"model": "gpt-4o-mini", "messages": []}),
        )
        .await;
    assert_eq!(missing.status(), 400);
    let v: Value = missing.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));

    let unknown = app
        .post_json("/v1/messages", &messages_body("claude-nope"))
        .await;
    assert_eq!(unknown.status(), 404);
    let v: Value = unknown.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");

    let malformed = app
        .client
        .post(app.url("/v1/messages"))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(malformed.json::<Value>().await.unwrap()["type"], "error");

    // Anthropic's temperature range holds whatever provider is behind the
    // alias (an OpenAI one would take 1.5), and nothing is sent upstream.
    let mut hot = messages_body("gpt-4o-mini");
    hot["temperature"] = json!(1.5);
    let calls = app.mock().calls();
    let refused = app.post_json("/v1/messages", &hot).await;
    assert_eq!(refused.status(), 400);
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "temperature: Input should be less than or equal to 1"
    );
    assert_eq!(app.mock().calls(), calls);

    // A provider's 503 before any output is overload, as it is inside a
    // stream (it used to be a 502 `api_error` here, which the SDKs do not
    // take for overload), streamed or not; OpenAI clients still get a 502.
    app.mock().update(|b| b.always = Some(Fault::Status(503)));
    let mut streamed = messages_body("gpt-4o-mini");
    streamed["stream"] = json!(true);
    for body in [messages_body("gpt-4o-mini"), streamed] {
        let failed = app.post_json("/v1/messages", &body).await;
        assert_eq!(failed.status().as_u16(), 529, "{body}");
        assert_eq!(
            failed.json::<Value>().await.unwrap()["error"]["type"],
            "overloaded_error"
        );
    }
    let failed = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(failed.status(), 502);
    // Another failure stays a 502 `api_error` (on an app whose breaker
    // the 503s above did not open).
    let app = spawn().await;
    app.mock().update(|b| b.always = Some(Fault::Status(500)));
    let failed = app
        .post_json("/v1/messages", &messages_body("gpt-4o-mini"))
        .await;
    assert_eq!(failed.status(), 502);
    assert_eq!(
        failed.json::<Value>().await.unwrap()["error"]["type"],
        "api_error"
    );
}

/// The text of a chat completion's streamed chunks and its finish reason.
fn streamed(data: &[String]) -> (String, Option<String>) {
    let finish = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned));
    (streamed_text(data), finish)
}

#[tokio::test]
async fn image_urls_reach_anthropic_as_url_and_base64_sources() {
    let (app, anthropic) = with_anthropic().await;
    let body = json!({"model": "claude", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare these"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
    ]}]});

    let resp = app.post_json("/v1/chat/completions", &body).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(
        anthropic.last_request().unwrap().body["messages"],
        json!([{"role": "user", "content": [
            {"type": "text", "text": "Compare these"},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
        ]}])
    );
}

#[tokio::test]
async fn messages_api_image_blocks_reach_an_openai_provider_as_image_urls() {
    let app = spawn().await;
    let mut body = messages_body("gpt-4o-mini");
    body["messages"] = json!([{"role": "user", "content": [
        {"type": "text", "text": "Compare these"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
    ]}]);

    let resp = app.post_json("/v1/messages", &body).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(
        app.mock().last_request().unwrap().body["messages"][1],
        json!({"role": "user", "content": [
            {"type": "text", "text": "Compare these"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        ]})
    );
}

#[tokio::test]
async fn tool_choice_auto_and_none_are_mapped_both_ways() {
    let (app, anthropic) = with_anthropic().await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);

    // OpenAI → Anthropic: "auto" lets the model call the tool, "none" forbids it.
    let mut sent = Vec::new();
    let mut finishes = Vec::new();
    for choice in ["auto", "none"] {
        let mut body = chat_body("claude");
        body["tools"] = tools.clone();
        body["tool_choice"] = json!(choice);
        let v: Value = app
            .post_json("/v1/chat/completions", &body)
            .await
            .json()
            .await
            .unwrap();
        finishes.push(v["choices"][0]["finish_reason"].clone());
        sent.push(anthropic.last_request().unwrap().body["tool_choice"].clone());
    }
    assert_eq!(sent, [json!({"type": "auto"}), json!({"type": "none"})]);
    assert_eq!(finishes, [json!("tool_calls"), json!("stop")]);

    // Anthropic → OpenAI, through /v1/messages.
    let mut sent = Vec::new();
    for choice in ["auto", "none"] {
        let mut body = messages_body("gpt-4o-mini");
        body["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
        body["tool_choice"] = json!({"type": choice});
        assert_eq!(app.post_json("/v1/messages", &body).await.status(), 200);
        sent.push(app.mock().last_request().unwrap().body["tool_choice"].clone());
    }
    assert_eq!(sent, [json!("auto"), json!("none")]);
}

#[tokio::test]
async fn an_anthropic_stop_sequence_ends_the_answer_with_finish_reason_stop() {
    let (app, anthropic) = with_anthropic().await;
    let mut plain = chat_body("claude");
    plain["stop"] = json!(["help", "never"]);
    let mut stream = stream_body("claude", false);
    stream["stop"] = json!("help");

    let v: Value = app
        .post_json("/v1/chat/completions", &plain)
        .await
        .json()
        .await
        .unwrap();
    let sent = anthropic.last_request().unwrap().body;
    let data = sse_data(
        &app.post_json("/v1/chat/completions", &stream)
            .await
            .text()
            .await
            .unwrap(),
    );

    assert_eq!(sent["stop_sequences"], json!(["help", "never"]));
    assert_eq!(v["choices"][0]["message"]["content"], "Hello! How can I ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (text, finish) = streamed(&data);
    assert_eq!(text, "Hello! How can I");
    assert_eq!(finish.as_deref(), Some("stop"));
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_mid_stream_anthropic_error_event_ends_the_openai_stream_with_an_error_event() {
    let (app, anthropic) = with_anthropic().await;
    // message_start, content_block_start, ping, the first text delta, then `error`.
    anthropic.push_fault(Fault::ErrorEventAfter(4));

    let resp = app
        .post_json(
            "/v1/chat/completions",
            &stream_body("claude-then-gpt", false),
        )
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "anthropic");
    let data = sse_data(&resp.text().await.unwrap());
    assert_ne!(data.last().unwrap(), "[DONE]", "{data:?}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    // Anthropic's overloaded_error: said to be an overload, which a client
    // may try again later.
    assert_eq!(last["error"]["code"], "upstream_overloaded", "{last}");
    assert_eq!(last["error"]["type"], "upstream_error");
    assert!(last["error"]["message"]
        .as_str()
        .unwrap()
        .contains("overloaded"));
    assert_eq!(streamed_text(&data[..data.len() - 1]), "Hello!");
    assert_eq!(
        (anthropic.calls(), app.mock().calls()),
        (1, 0),
        "a committed stream is neither retried nor failed over"
    );
}

#[tokio::test]
async fn a_messages_client_on_an_anthropic_backed_alias_learns_the_stop_sequence() {
    let (app, anthropic) = with_anthropic().await;
    let mut body = messages_body("claude");
    body["stop_sequences"] = json!(["never", "help"]);

    let plain: Value = app
        .post_json("/v1/messages", &body)
        .await
        .json()
        .await
        .unwrap();
    body["stream"] = json!(true);
    let events = messages_events(&app, &body).await;

    assert_eq!(
        anthropic.last_request().unwrap().body["stop_sequences"],
        json!(["never", "help"])
    );
    assert_eq!(plain["content"][0]["text"], "Hello! How can I ");
    assert_eq!(
        (&plain["stop_reason"], &plain["stop_sequence"]),
        (&json!("stop_sequence"), &json!("help")),
        "{plain}"
    );
    let (_, delta) = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "help"})
    );
    // Without a sequence in the answer, the turn simply ends.
    body["stream"] = json!(false);
    body["stop_sequences"] = json!(["never"]);
    let v: Value = app
        .post_json("/v1/messages", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&v["stop_reason"], &v["stop_sequence"]),
        (&json!("end_turn"), &Value::Null)
    );
}

#[tokio::test]
async fn anthropics_own_tools_are_refused_by_name_before_any_provider_call() {
    let app = spawn().await;
    let mut body = messages_body("gpt-4o-mini");
    body["tools"] = json!([
        {"name": "lookup", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
    ]);

    let resp = app.post_json("/v1/messages", &body).await;

    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("tools.1.type: web_search_20250305 is one of Anthropic's own tools"),
        "{message}"
    );
    assert_eq!(app.mock().calls(), 0);
}

#[tokio::test]
async fn what_only_anthropic_can_take_reaches_a_route_of_anthropic_deployments_as_sent() {
    let (app, anthropic) = with_anthropic_and("server_tools = true\n", "").await;
    let web_search = json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 3});
    // A PDF by URL: OpenAI's file parts take only the file's content.
    let document = json!({"type": "document", "source": {"type": "url",
        "url": "https://example.com/q3.pdf"}});
    let body = |model: &str| {
        json!({"model": model, "max_tokens": 256,
        "stop_sequences": ["a", "b", "c", "d", "e"],
        "tools": [web_search],
        "messages": [
            {"role": "user", "content": [document, {"type": "text", "text": "Search for it."}]},
            {"role": "assistant", "content": [
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "it"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                {"type": "text", "text": "Nothing found."},
            ]},
            {"role": "user", "content": "Try again."},
        ]})
    };

    let served = app.post_json("/v1/messages", &body("claude")).await;
    let mixed = app
        .post_json("/v1/messages", &body("claude-then-gpt"))
        .await;

    assert_eq!(served.status(), 200);
    let sent = anthropic.last_request().unwrap().body;
    let asked = body("claude");
    for key in ["tools", "messages", "stop_sequences"] {
        assert_eq!(sent[key], asked[key], "{key}");
    }
    // A route with an OpenAI-compatible fallback could not honour them.
    assert_eq!(mixed.status(), 400);
    let v: Value = mixed.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "messages.0.content.0: unsupported block type document"
    );
    assert_eq!(anthropic.calls(), 1);
    assert_eq!(app.mock().calls(), 0);
}

#[tokio::test]
async fn anthropics_own_tools_need_the_provider_to_enable_them_but_not_to_be_counted() {
    let (app, anthropic) = with_anthropic().await;
    let body = json!({"model": "claude", "max_tokens": 256,
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        "messages": [{"role": "user", "content": "Search for it."}]});

    let refused = app.post_json("/v1/messages", &body).await;
    let counted = app.post_json("/v1/messages/count_tokens", &body).await;

    assert_eq!(refused.status(), 400);
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "tools.0.type: web_search_20250305 is one of Anthropic's own tools, which Anthropic bills \
         per use beyond tokens; they are not enabled for this model (its providers' server_tools setting)"
    );
    assert_eq!(counted.status(), 200);
    assert_eq!(counted.headers()["x-switchyard-token-count"], "provider");
    assert_eq!(anthropic.calls(), 1, "only the count reached Anthropic");

    // A tool the client runs itself (bash, text editor, …) costs only
    // tokens: no setting needed on an all-Anthropic route.
    let mut bash = body.clone();
    bash["tools"] = json!([{"type": "bash_20250124", "name": "bash"}]);
    let served = app.post_json("/v1/messages", &bash).await;
    assert_eq!(served.status(), 200);
    assert_eq!(
        anthropic.last_request().unwrap().body["tools"],
        bash["tools"]
    );
}

#[tokio::test]
async fn a_messages_stream_that_breaks_midway_ends_with_an_error_event_typed_by_its_cause() {
    let app = spawn().await;
    let mut body = messages_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let mut last_event = Vec::new();
    // An overloaded server's in-stream error object (status 503), then a
    // connection cut after the first chunks.
    for fault in [
        Fault::ErrorEventAfter(3),
        Fault::ResetAfterChunks(3),
        Fault::CutInsideChunk(3),
    ] {
        app.mock().push_fault(fault);
        let text = app
            .post_json("/v1/messages", &body)
            .await
            .text()
            .await
            .unwrap();
        let events = anthropic_events(&text);
        assert!(
            events.iter().any(|(n, _)| n == "content_block_delta"),
            "the stream had begun: {text}"
        );
        assert!(
            !events.iter().any(|(n, _)| n == "message_stop"),
            "a broken stream must not look complete: {text}"
        );
        last_event.push(events.last().unwrap().clone());
    }

    assert_eq!(
        last_event[0],
        (
            "error".to_owned(),
            json!({"type": "error", "error": {"type": "overloaded_error",
                "message": "The provider is overloaded and cut the stream before it was complete; trying again later may succeed."}})
        )
    );
    assert_eq!(last_event[1].0, "error");
    assert_eq!(last_event[1].1["error"]["type"], "api_error");
    assert_eq!(last_event[2].0, "error", "no half event before the error");
    assert_eq!(last_event[2].1["error"]["type"], "api_error");
}

#[tokio::test]
async fn count_tokens_estimates_without_calling_a_provider_and_checks_like_messages() {
    let app = spawn().await;
    let short =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}]});
    let mut long = short.clone();
    long["system"] = json!("You are a careful assistant. ".repeat(40));
    long["tools"] =
        json!([{"name": "w", "description": "weather", "input_schema": {"type": "object"}}]);
    let mut with_image = short.clone();
    with_image["messages"][0]["content"] = json!([
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A".repeat(100_000)}},
        {"type": "text", "text": "What is this?"},
    ]);

    let mut counts = Vec::new();
    for body in [&short, &long, &with_image] {
        let resp = app
            .post_json("/v1/messages/count_tokens?beta=true", body)
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-switchyard-token-count"], "estimate");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        counts.push(v["input_tokens"].as_u64().unwrap());
    }

    // "Say hello" (9 bytes) and one message's overhead.
    assert_eq!(counts[0], 3 + 3);
    // 1,120 bytes of system prompt alone are 320 tokens.
    assert!(counts[1] > counts[0] + 320, "{counts:?}");
    // An image counts as one image, not as 100,000 bytes of base64.
    assert_eq!(counts[2], 1_600 + 4 + 3, "{counts:?}");
    assert_eq!(app.mock().calls(), 0);

    // Checked like /v1/messages: unknown model, bad blocks, no messages.
    for (body, status, says) in [
        (
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "nope",
        ),
        (
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "video"}]}]}),
            400,
            "messages.0.content.0",
        ),
        (json!({"model": "gpt-4o-mini"}), 400, "messages"),
        (
            json!({"model": "gpt-4o-mini", "messages": [], "tools": [{"type": "bash_20250124", "name": "bash"}]}),
            400,
            "tools.0.type",
        ),
    ] {
        let resp = app.post_json("/v1/messages/count_tokens", &body).await;
        assert_eq!(resp.status(), status, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
}

#[tokio::test]
async fn a_messages_stream_starts_with_an_input_estimate_and_ends_with_the_count() {
    let app = spawn().await;
    let mut body = messages_body("gpt-4o-mini");
    body["stream"] = json!(true);

    // Claude Code's SDK adds `?beta=true`.
    let events = anthropic_events(
        &app.post_json("/v1/messages?beta=true", &body)
            .await
            .text()
            .await
            .unwrap(),
    );

    let start = &events[0].1["message"]["usage"]["input_tokens"];
    // "Be brief." and "Say hello": 18 bytes, one message.
    assert_eq!(start, &json!(6 + 3));
    let (_, delta) = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    // The mock counts 3 a message and a word a token: two messages, four words.
    assert_eq!(delta["usage"]["input_tokens"], 10, "{delta}");
}

#[tokio::test]
async fn anthropic_clients_get_the_model_list_in_anthropics_shape_with_its_paging() {
    let (app, _anthropic) = with_anthropic().await;
    let get = |path: &str| {
        app.client
            .get(app.url(path))
            .header("anthropic-version", "2023-06-01")
            .send()
    };
    let openai = get_json(&app, "/v1/models").await;
    let ids: Vec<String> = openai["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.len() >= 3, "{ids:?}");
    let page = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };

    let all: Value = get("/v1/models").await.unwrap().json().await.unwrap();
    assert_eq!(page(&all), ids);
    assert_eq!(all["has_more"], false);
    assert_eq!(all["first_id"], json!(ids[0]));
    assert_eq!(all["last_id"], json!(ids[ids.len() - 1]));
    let m = &all["data"][0];
    assert_eq!(m["type"], "model");
    assert_eq!(m["display_name"], json!(ids[0]));
    assert!(m["created_at"].as_str().unwrap().ends_with('Z'), "{m}");

    let first: Value = get("/v1/models?limit=2")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (page(&first), &first["has_more"]),
        (ids[..2].to_vec(), &json!(true))
    );
    let next: Value = get(&format!("/v1/models?limit=2&after_id={}", ids[1]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page(&next), ids[2..ids.len().min(4)].to_vec());
    assert_eq!(next["has_more"], json!(ids.len() > 4));
    let back: Value = get(&format!("/v1/models?limit=1&before_id={}", ids[2]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (page(&back), &back["has_more"]),
        (vec![ids[1].clone()], &json!(true))
    );

    let one: Value = get(&format!("/v1/models/{}", ids[0]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(&one, m);

    for (path, status, says) in [
        ("/v1/models/nope", 404, "nope"),
        ("/v1/models?limit=0", 400, "limit"),
        ("/v1/models?limit=many", 400, "limit"),
        ("/v1/models?after_id=nope", 400, "after_id"),
        (
            &*format!("/v1/models?after_id={0}&before_id={0}", ids[0]),
            400,
            "not both",
        ),
    ] {
        let resp = get(path).await.unwrap();
        assert_eq!(resp.status(), status, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error", "{path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{path}: {v}"
        );
    }
}

#[tokio::test]
async fn a_reasoning_models_thoughts_reach_a_client_that_asked_for_thinking() {
    let app = spawn().await;
    app.mock()
        .update(|b| b.reasoning = Some("The user greets; greet back.".into()));
    let mut body = messages_body("gpt-4o-mini");
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});

    let plain: Value = app
        .post_json("/v1/messages", &body)
        .await
        .json()
        .await
        .unwrap();
    body["stream"] = json!(true);
    let events = messages_events(&app, &body).await;
    body["thinking"] = json!({"type": "disabled"});
    let without: Value = {
        body["stream"] = json!(false);
        app.post_json("/v1/messages", &body)
            .await
            .json()
            .await
            .unwrap()
    };

    assert_eq!(
        plain["content"][0],
        json!({"type": "thinking", "thinking": "The user greets; greet back.", "signature": ""})
    );
    assert_eq!(plain["content"][1]["type"], "text");
    let thought: String = events
        .iter()
        .filter_map(|(_, d)| d.pointer("/delta/thinking").and_then(Value::as_str))
        .collect();
    assert_eq!(thought, "The user greets; greet back.");
    assert_eq!(
        events[1].1["content_block"]["type"], "thinking",
        "the thinking block comes first"
    );
    assert_eq!(
        without["content"],
        json!([{"type": "text", "text": "Hello! How can I help you today?"}])
    );
}

#[tokio::test]
async fn a_refused_anthropic_client_gets_the_model_lists_refusal_in_anthropics_envelope() {
    let app = app()
        .env(
            "SWITCHYARD_ADMIN_KEY",
            "models-admin-key-0123456789abcdef0123",
        )
        .spawn()
        .await;
    let get = |anthropic: bool| {
        let mut req = app
            .client
            .get(app.url("/v1/models"))
            .header("x-api-key", "sk-ant-not-a-key");
        if anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        req.send()
    };

    let anthropic = get(true).await.unwrap();
    let openai = get(false).await.unwrap();

    assert_eq!(
        (anthropic.status().as_u16(), openai.status().as_u16()),
        (401, 401)
    );
    let v: Value = anthropic.json().await.unwrap();
    assert_eq!(
        (&v["type"], &v["error"]["type"]),
        (&json!("error"), &json!("authentication_error")),
        "{v}"
    );
    let v: Value = openai.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
}

/// A request shaped as Claude Code sends one (system and message blocks
/// with cache markers, JSON-Schema tools, a long user id, thinking, beta
/// query, fields Switchyard does not read) reaches an OpenAI-compatible
/// provider as a request it takes, and streams back.
#[tokio::test]
async fn a_claude_code_shaped_request_reaches_an_openai_compatible_provider() {
    let app = spawn().await;
    let schema = json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
        "properties": {"file_path": {"type": "string"}}, "required": ["file_path"], "additionalProperties": false});
    let body = json!({
        "model": "gpt-4o-mini",
        "max_tokens": 32000,
        "stream": true,
        "temperature": 1,
        "metadata": {"user_id": format!("user_{}_account_{}_session_{}", "f".repeat(64), "e".repeat(36), "d".repeat(36))},
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Be concise."},
        ],
        "tools": [{"name": "Read", "description": "Reads a file", "input_schema": schema}],
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 4096},
        "context_management": {"edits": []},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                {"type": "text", "text": "Read main.rs", "cache_control": {"type": "ephemeral"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_01", "name": "Read", "input": {"file_path": "main.rs"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "fn main() {}"}]},
            ]},
        ],
    });

    let resp = app.post_json("/v1/messages?beta=true", &body).await;

    assert_eq!(resp.status(), 200);
    let events = anthropic_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().0, "message_stop");
    let sent = app.mock().last_request().unwrap().body;
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "system", "content": "You are Claude Code.\n\nBe concise."},
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                {"type": "text", "text": "Read main.rs"},
            ]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_01", "type": "function",
                "function": {"name": "Read", "arguments": "{\"file_path\":\"main.rs\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "fn main() {}"},
        ])
    );
    assert_eq!(sent["tools"][0]["function"]["parameters"], schema);
    assert_eq!(sent["tool_choice"], "auto");
    assert_eq!(sent["max_tokens"], 32000);
    assert_eq!(sent["user"].as_str().unwrap().len(), 64);
    let mut keys: Vec<&str> = sent
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "max_tokens",
            "messages",
            "model",
            "stream",
            "stream_options",
            "temperature",
            "tool_choice",
            "tools",
            "user"
        ],
        "nothing Anthropic-only reaches the provider"
    );
}

/// A Messages client on an Anthropic-backed alias: Anthropic gets the
/// client's own fields (its prompt-caching markers above all), and a
/// fallback to an OpenAI-compatible deployment gets the translation.
#[tokio::test]
async fn an_anthropic_deployment_gets_a_messages_clients_cache_markers_and_a_fallback_the_translation(
) {
    let (app, anthropic) = with_anthropic().await;
    let cached = json!({"type": "ephemeral"});
    let body = json!({
        "model": "claude-then-gpt", "max_tokens": 64, "top_k": 3,
        "system": [{"type": "text", "text": "Long instructions.", "cache_control": cached}],
        "metadata": {"user_id": "u".repeat(150)},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello", "cache_control": cached}]}],
    });

    let served = app.post_json("/v1/messages", &body).await;
    assert_eq!(served.status(), 200);
    assert_eq!(served.headers()["x-switchyard-provider"], "anthropic");
    let sent = anthropic.last_request().unwrap().body;
    anthropic.update(|b| b.always = Some(Fault::Status(529)));
    let failed_over = app.post_json("/v1/messages", &body).await;
    let fallback = app.mock().last_request().unwrap().body;

    assert_eq!(
        sent,
        json!({
            "model": "claude-sonnet-mock", "max_tokens": 64, "top_k": 3,
            "system": [{"type": "text", "text": "Long instructions.", "cache_control": cached}],
            "metadata": {"user_id": "u".repeat(150)},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello", "cache_control": cached}]}],
        })
    );
    assert_eq!(failed_over.status(), 200);
    assert_eq!(failed_over.headers()["x-switchyard-provider"], "mock");
    assert_eq!(
        fallback["messages"],
        json!([
            {"role": "system", "content": "Long instructions."},
            {"role": "user", "content": "Say hello"},
        ])
    );
    assert_eq!(fallback["user"].as_str().unwrap().len(), 64);
}

#[tokio::test]
async fn an_openai_clients_cache_breakpoints_reach_an_anthropic_deployment() {
    let (app, anthropic) = with_anthropic().await;
    let mark = json!({"type": "ephemeral"});
    let body = json!({"model": "claude", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Long rules.", "cache_control": mark}]},
        {"role": "user", "content": "Say hello"},
    ]});

    let resp = app.post_json("/v1/chat/completions", &body).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(
        anthropic.last_request().unwrap().body["system"],
        json!([{"type": "text", "text": "Long rules.", "cache_control": mark}])
    );
}

#[tokio::test]
async fn count_tokens_asks_anthropic_for_an_anthropic_backed_alias_and_estimates_when_it_fails() {
    let (app, anthropic) = with_anthropic().await;
    let body = json!({
        "model": "claude-then-gpt", "max_tokens": 10, "temperature": 0.5,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "w", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking."},
            {"role": "user", "content": "Thanks"},
        ],
    });
    let count = |body: &Value| {
        let app = &app;
        let body = body.clone();
        async move {
            let resp = app.post_json("/v1/messages/count_tokens", &body).await;
            assert_eq!(resp.status(), 200);
            let how = resp.headers()["x-switchyard-token-count"]
                .to_str()
                .unwrap()
                .to_owned();
            let v: Value = resp.json().await.unwrap();
            (v["input_tokens"].as_u64().unwrap(), how)
        }
    };

    let counted = count(&body).await;
    let sent = anthropic.last_request().unwrap();
    anthropic.push_fault(Fault::Status(500));
    let estimated = count(&body).await;

    // The mock counts 4 a message.
    assert_eq!(counted, (12, "provider".to_owned()));
    assert_eq!(sent.path, "/v1/messages/count_tokens");
    let mut keys: Vec<&str> = sent
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["messages", "model", "system", "tools"]);
    assert_eq!(sent.body["model"], "claude-sonnet-mock");
    assert_eq!(estimated.1, "estimate");
    assert!(estimated.0 > 0);
    assert_eq!(app.mock().calls(), 0, "counting calls no chat provider");
    assert_eq!(anthropic.calls(), 2, "one count each, no retries");

    // A request Anthropic refuses is refused, as Anthropic would say it,
    // not estimated.
    anthropic.push_fault(Fault::Status(400));
    let refused = app.post_json("/v1/messages/count_tokens", &body).await;
    assert_eq!(refused.status(), 400);
    let v: Value = refused.json().await.unwrap();
    assert_eq!(
        (v["type"].as_str(), v["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error"))
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("injected status 400"),
        "{v}"
    );
}

#[tokio::test]
async fn an_anthropic_deployment_answers_a_messages_client_as_is_signed_thinking_included() {
    let (mut app, anthropic) = with_anthropic().await;
    let thinking = json!({"type": "enabled", "budget_tokens": 1024});
    let body = json!({"model": "claude", "max_tokens": 2048, "thinking": thinking,
        "messages": [{"role": "user", "content": "Say hello"}]});

    let first = app.post_json("/v1/messages", &body).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-switchyard-provider"], "anthropic");
    let answer: Value = first.json().await.unwrap();
    assert_eq!(anthropic.last_request().unwrap().body["thinking"], thinking);
    // Anthropic's message itself: its id, its model, its signed thinking.
    assert_eq!(answer["id"], "msg_mock");
    assert_eq!(answer["model"], "claude-sonnet-mock");
    assert_eq!(
        answer["content"][0],
        json!({"type": "thinking", "thinking": MOCK_THOUGHT, "signature": MOCK_SIGNATURE})
    );
    assert_eq!(answer["content"][1]["type"], "text");

    // The next turn carries the signed block back to Anthropic (which
    // refuses an unsigned one: a block made from another provider's
    // reasoning is left out).
    let mut next = body.clone();
    next["messages"] = json!([
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "From elsewhere.", "signature": ""},
            {"type": "text", "text": "Hi."},
        ]},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": answer["content"].clone()},
        {"role": "user", "content": "Once more"},
    ]);
    let second = app.post_json("/v1/messages", &next).await;
    assert_eq!(second.status(), 200, "{}", second.text().await.unwrap());
    let sent = anthropic.last_request().unwrap().body;
    assert_eq!(
        sent["messages"][1]["content"],
        json!([{"type": "text", "text": "Hi."}])
    );
    assert_eq!(sent["messages"][3]["content"], answer["content"]);

    app.stop_gracefully().await;
    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 2);
    // The mock counts 4 input tokens a message, and a word an output token.
    assert_eq!(
        (rows[0].prompt_tokens, rows[1].prompt_tokens),
        (Some(20), Some(4))
    );
    assert!(rows
        .iter()
        .all(|r| r.completion_tokens.is_some_and(|n| n > 0)));
}

#[tokio::test]
async fn an_anthropic_deployments_stream_reaches_a_messages_client_event_for_event() {
    let (mut app, anthropic) = with_anthropic().await;
    let body = json!({"model": "claude", "max_tokens": 2048, "stream": true,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "Say hello"}]});

    let resp = app.post_json("/v1/messages", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = anthropic_events(&resp.text().await.unwrap());

    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let words = mock_reply_words();
    let mut expected = vec![
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "ping",
    ];
    expected.extend(std::iter::repeat_n("content_block_delta", words));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    // Each event's name is its data's type, and the data is Anthropic's.
    assert!(events.iter().all(|(n, d)| d["type"] == n.as_str()));
    assert_eq!(
        events[3].1["delta"],
        json!({"type": "signature_delta", "signature": MOCK_SIGNATURE})
    );
    assert_eq!(events[0].1["message"]["model"], "claude-sonnet-mock");

    // A stream that closes after its stop reason but without message_stop
    // is complete: the client gets the message_stop it lost.
    anthropic.push_fault(Fault::NoDone);
    let closed = messages_events(&app, &body).await;
    assert_eq!(closed.len(), events.len());
    assert_eq!(closed.last().unwrap().1, json!({"type": "message_stop"}));

    // Cut midway: Anthropic's error event, typed by its cause, and no
    // message_stop; the usage rows record both outcomes.
    anthropic.push_fault(Fault::ErrorEventAfter(6));
    let text = app
        .post_json("/v1/messages", &body)
        .await
        .text()
        .await
        .unwrap();
    let cut = anthropic_events(&text);
    assert_eq!(cut.len(), 7, "{text}");
    assert_eq!(cut[6].0, "error");
    assert_eq!(cut[6].1["error"]["type"], "overloaded_error");
    app.stop_gracefully().await;
    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 3);
    for row in &rows[1..] {
        assert_eq!((row.status, row.stream), (200, true));
        assert_eq!(row.prompt_tokens, Some(4));
        assert_eq!(row.completion_tokens, Some(words as u64));
        assert!(row.ttft_ms.is_some());
    }
    assert_eq!(
        rows[0].status, 502,
        "a stream broken midway is recorded as a 502"
    );
}

#[tokio::test]
async fn a_messages_stream_that_fails_before_its_first_event_falls_back_to_the_translation() {
    let (app, anthropic) = with_anthropic().await;
    anthropic.update(|b| b.always = Some(Fault::Status(529)));
    let mut body = messages_body("claude-then-gpt");
    body["stream"] = json!(true);

    let resp = app.post_json("/v1/messages", &body).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "mock");
    let events = anthropic_events(&resp.text().await.unwrap());
    assert_eq!(events.first().unwrap().0, "message_start");
    assert_eq!(events.last().unwrap().0, "message_stop");
    // Switchyard's translation names the alias, Anthropic its model.
    assert_eq!(events[0].1["message"]["model"], "claude-then-gpt");
}

#[tokio::test]
async fn a_messages_clients_beta_header_and_beta_fields_reach_anthropic_and_only_anthropic() {
    let (app, anthropic) = with_anthropic().await;
    let beta = "interleaved-thinking-2025-05-14,context-management-2025-06-27";
    let body = json!({"model": "claude-then-gpt", "max_tokens": 256,
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        "service_tier": "auto",
        "messages": [{"role": "user", "content": "Say hello"}]});
    let send = |body: Value| {
        app.client
            .post(app.url("/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", beta)
            .json(&body)
            .send()
    };

    let served = send(body.clone()).await.unwrap();
    assert_eq!(served.status(), 200);
    let sent = anthropic.last_request().unwrap();
    assert_eq!(sent.headers["anthropic-beta"], beta);
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert_eq!(sent.body["context_management"], body["context_management"]);
    // What changes the workspace's bill beyond tokens is not a tenant's to
    // choose: every tenant shares the gateway's key.
    assert!(sent.body.get("service_tier").is_none());

    // The fallback gets neither: an OpenAI-compatible server knows no such
    // header or fields.
    anthropic.update(|b| b.always = Some(Fault::Status(529)));
    let fell_back = send(body).await.unwrap();
    assert_eq!(fell_back.status(), 200);
    assert_eq!(fell_back.headers()["x-switchyard-provider"], "mock");
    let sent = app.mock().last_request().unwrap();
    assert!(sent.headers.get("anthropic-beta").is_none());
    assert!(sent.body.get("context_management").is_none());
    assert!(sent.body.get("service_tier").is_none());

    // Without the header, none is sent.
    anthropic.update(|b| b.always = None);
    let plain = app
        .post_json("/v1/messages", &messages_body("claude"))
        .await;
    assert_eq!(plain.status(), 200);
    assert!(anthropic
        .last_request()
        .unwrap()
        .headers
        .get("anthropic-beta")
        .is_none());
}

#[tokio::test]
async fn prompt_cache_reads_and_writes_are_reported_and_priced_at_their_own_rates() {
    let (mut app, anthropic) = with_anthropic_and(
        "",
        "[pricing.claude-sonnet-mock]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n\
         cached_input_per_mtok = 0.3\ncache_write_per_mtok = 3.75\ncache_write_1h_per_mtok = 6.0\n",
    )
    .await;
    // 200 written: 150 for five minutes, 50 for an hour.
    anthropic.update(|b| b.cache_tokens = Some((1_000, 150, 50)));
    let chat = json!({"model": "claude", "messages": [{"role": "user", "content": "Say hello"}]});

    let openai: Value = app
        .post_json("/v1/chat/completions", &chat)
        .await
        .json()
        .await
        .unwrap();
    let messages: Value = app
        .post_json("/v1/messages", &messages_body("claude"))
        .await
        .json()
        .await
        .unwrap();

    // 4 uncached input tokens (the mock's 4 a message) beside the cache's.
    assert_eq!(openai["usage"]["prompt_tokens"], 1_204);
    assert_eq!(
        openai["usage"]["prompt_tokens_details"]["cached_tokens"],
        1_000
    );
    assert_eq!(openai["usage"]["cache_creation_input_tokens"], 200);
    assert_eq!(messages["usage"]["input_tokens"], 4);
    assert_eq!(messages["usage"]["cache_read_input_tokens"], 1_000);
    assert_eq!(messages["usage"]["cache_creation_input_tokens"], 200);
    assert_eq!(
        messages["usage"]["cache_creation"]["ephemeral_1h_input_tokens"],
        50
    );
    app.stop_gracefully().await;
    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 2);
    let words = mock_reply_words() as f64;
    let expected = (4.0 * 3.0 + 1_000.0 * 0.3 + 150.0 * 3.75 + 50.0 * 6.0 + words * 15.0) / 1e6;
    for row in &rows {
        assert_eq!(row.prompt_tokens, Some(1_204));
        // The row keeps the parts, so its cost can be checked later.
        assert_eq!(
            (row.cached_tokens, row.cache_write_tokens),
            (Some(1_000), Some(200))
        );
        let cost = row.cost_usd.unwrap();
        assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
    }
}

#[tokio::test]
async fn what_anthropic_would_refuse_is_not_sent_so_a_request_works_on_either_provider() {
    let (app, anthropic) = with_anthropic().await;
    let thinking = json!({"type": "enabled", "budget_tokens": 1024});
    // A tool loop with thinking whose last call a fallback made (its
    // reasoning unsigned), carrying OpenAI-minded extras Anthropic refuses.
    let body = json!({"model": "claude", "max_tokens": 2048, "thinking": thinking,
    "user": "u-1", "n": 1,
    "tools": [{"name": "w", "input_schema": {"type": "object"}}],
    "messages": [
        {"role": "user", "name": "ann", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Look it up.", "signature": ""},
            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}},
        ]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]});

    let resp = app.post_json("/v1/messages", &body).await;

    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let sent = anthropic.last_request().unwrap().body;
    assert_eq!(sent["thinking"], json!({"type": "disabled"}), "{sent}");
    assert!(sent.get("user").is_none() && sent.get("n").is_none());
    assert_eq!(
        sent["messages"][0],
        json!({"role": "user", "content": "Weather?"})
    );

    // A turn that is only a document reaches Anthropic too.
    let pdf = json!({"model": "claude", "max_tokens": 256, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQ="}},
    ]}]});
    let resp = app.post_json("/v1/messages", &pdf).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(
        anthropic.last_request().unwrap().body["messages"],
        pdf["messages"]
    );
}

/// Anthropic opens a stream with `message_start`, an empty text block and
/// `ping` before the answer, and its `overloaded_error` comes just there:
/// nothing of the answer has gone out, so the fallback serves, in either API.
#[tokio::test]
async fn an_overloaded_event_after_the_streams_preamble_fails_over() {
    let (app, anthropic) = with_anthropic().await;
    // After `message_start`; after it, the empty text block and `ping`.
    // Each is retried once (an overloaded stream is a 529), then failed over.
    for (path, after) in [("/v1/messages", 1), ("/v1/chat/completions", 3)] {
        anthropic.push_fault(Fault::ErrorEventAfter(after));
        anthropic.push_fault(Fault::ErrorEventAfter(after));
        let body = if path == "/v1/messages" {
            let mut body = messages_body("claude-then-gpt");
            body["stream"] = json!(true);
            body
        } else {
            stream_body("claude-then-gpt", false)
        };
        let resp = app.post_json(path, &body).await;
        let who = resp.headers()["x-switchyard-provider"].clone();
        let text = resp.text().await.unwrap();
        assert_eq!(who, "mock", "{path} {after}: {text}");
        if path == "/v1/messages" {
            let events = anthropic_events(&text);
            assert_eq!(events.last().unwrap().0, "message_stop");
            assert!(events.iter().all(|(n, _)| n != "error"));
        } else {
            assert_eq!(sse_data(&text).last().unwrap(), "[DONE]");
        }
    }
    assert_eq!(anthropic.calls(), 4);

    // Once a delta has gone out the stream is committed: the error ends it.
    anthropic.push_fault(Fault::ErrorEventAfter(4));
    let mut body = messages_body("claude-then-gpt");
    body["stream"] = json!(true);
    let resp = app.post_json("/v1/messages", &body).await;
    assert_eq!(resp.headers()["x-switchyard-provider"], "anthropic");
    let events = anthropic_events(&resp.text().await.unwrap());
    assert!(events.iter().any(|(n, _)| n == "content_block_delta"));
    assert_eq!(events.last().unwrap().0, "error");
}

/// Holding the preamble back does not move the first-byte timeout: it is
/// met when the stream begins (`message_start`), not when the answer does.
#[tokio::test]
async fn the_first_byte_timeout_is_met_by_the_preamble_not_the_answer() {
    let (app, anthropic) = with_anthropic_and("first_byte_timeout_ms = 100", "").await;
    // message_start at once, then a frame every 150 ms: the first delta
    // comes at ~450 ms, far past the 100 ms first-byte budget.
    anthropic.update(|b| b.chunk_delay = std::time::Duration::from_millis(150));
    let mut body = messages_body("claude");
    body["stream"] = json!(true);
    let resp = app.post_json("/v1/messages", &body).await;
    assert_eq!(resp.status(), 200);
    let events = anthropic_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().0, "message_stop", "{events:?}");
    let resp = app
        .post_json("/v1/chat/completions", &stream_body("claude", false))
        .await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    assert!(
        data.iter().all(|d| !d.is_empty()),
        "no empty event: {data:?}"
    );
    assert_eq!(anthropic.calls(), 2, "neither was timed out and retried");
}

#[tokio::test]
async fn an_overloaded_event_before_anything_else_fails_a_native_stream_over() {
    let (app, anthropic) = with_anthropic().await;
    anthropic.push_fault(Fault::ErrorEventAfter(0));
    anthropic.push_fault(Fault::ErrorEventAfter(0));
    let mut body = messages_body("claude-then-gpt");
    body["stream"] = json!(true);

    let resp = app.post_json("/v1/messages", &body).await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "mock");
    let events = anthropic_events(&resp.text().await.unwrap());
    assert_eq!(events.last().unwrap().0, "message_stop");
    assert!(events.iter().all(|(n, _)| n != "error"));
    assert_eq!(anthropic.calls(), 2, "retried once, then failed over");
}

#[tokio::test]
async fn count_tokens_sends_anthropic_the_clients_beta_header() {
    let (app, anthropic) = with_anthropic().await;
    let resp = app
        .client
        .post(app.url("/v1/messages/count_tokens"))
        .header("anthropic-beta", "context-management-2025-06-27")
        .json(
            &json!({"model": "claude", "context_management": {"edits": []},
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-token-count"], "provider");
    let sent = anthropic.last_request().unwrap();
    assert_eq!(sent.path, "/v1/messages/count_tokens");
    assert_eq!(
        sent.headers["anthropic-beta"],
        "context-management-2025-06-27"
    );
    assert_eq!(sent.body["context_management"], json!({"edits": []}));
}

#[tokio::test]
async fn a_pdf_reaches_either_kind_of_provider_in_its_own_shape() {
    let (app, anthropic) = with_anthropic().await;
    let pdf = "JVBERi0xLjQ=";
    // A Messages client's PDF, routed to an OpenAI-compatible deployment.
    let messages = json!({"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "document", "title": "q3.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}},
        {"type": "text", "text": "Summarise."}]}]});
    let resp = app.post_json("/v1/messages", &messages).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(
        app.mock().last_request().unwrap().body["messages"][0]["content"][0],
        json!({"type": "file", "file": {"filename": "q3.pdf", "file_data": format!("data:application/pdf;base64,{pdf}")}})
    );
    // An OpenAI client's PDF, routed to an Anthropic deployment.
    let chat = json!({"model": "claude", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "q3.pdf", "file_data": format!("data:application/pdf;base64,{pdf}")}},
        {"type": "text", "text": "Summarise."}]}]});
    let resp = app.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(
        anthropic.last_request().unwrap().body["messages"][0]["content"][0],
        json!({"type": "document", "title": "q3.pdf",
               "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}})
    );
    // A file uploaded to OpenAI's Files API cannot reach Anthropic.
    let by_id = json!({"model": "claude", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-abc"}}]}]});
    let resp = app.post_json("/v1/chat/completions", &by_id).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "messages[0].content[0].file");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("file_data"),
        "{v}"
    );
    assert_eq!(anthropic.calls(), 1);
}

#[tokio::test]
async fn a_loose_json_schema_reaches_anthropic_in_the_subset_it_decodes_to() {
    let (app, anthropic) = with_anthropic().await;
    // Hand-written, as OpenAI takes it unless strict: objects left open and
    // limits Anthropic's structured outputs cannot enforce.
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string", "minLength": 2},
        "tags": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }, "required": ["city"]});
    let body = json!({"model": "claude", "messages": [{"role": "user", "content": "A city?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}});

    let resp = app.post_json("/v1/chat/completions", &body).await;

    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let v: Value = resp.json().await.unwrap();
    let answer: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(answer, json!({"city": "mock", "tags": []}));
    let sent = anthropic.last_request().unwrap().body;
    assert_eq!(
        sent["output_config"]["format"]["schema"],
        json!({"type": "object", "properties": {
            "city": {"type": "string", "description": "{minLength: 2}"},
            "tags": {"type": "array", "items": {"type": "object",
                "properties": {"name": {"type": "string"}}, "additionalProperties": false}},
        }, "additionalProperties": false, "required": ["city"]})
    );
}

#[tokio::test]
async fn reasoning_effort_thinks_where_anthropic_allows_it_and_names_what_it_refuses() {
    let (app, anthropic) = with_anthropic().await;
    let tools =
        json!([{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]);
    let ask = |extra: Value| {
        let mut body = json!({"model": "claude", "reasoning_effort": "high",
            "messages": [{"role": "user", "content": "Weather?"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };

    // Thinking, adaptively for a model that is not one of the older ones.
    let v: Value = app
        .post_json("/v1/chat/completions", &ask(json!({})))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["reasoning_content"],
        MOCK_THOUGHT
    );
    let sent = anthropic.last_request().unwrap().body;
    assert_eq!(sent["thinking"], json!({"type": "adaptive"}));
    assert_eq!(sent["output_config"], json!({"effort": "high"}));

    // A forced tool and a prefill go on without thinking (Anthropic, and
    // the mock, refuse them with it).
    for extra in [
        json!({"tools": tools, "tool_choice": "required"}),
        json!({"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "It is"}]}),
    ] {
        let resp = app
            .post_json("/v1/chat/completions", &ask(extra.clone()))
            .await;
        assert_eq!(
            resp.status(),
            200,
            "{extra}: {}",
            resp.text().await.unwrap()
        );
        assert!(anthropic
            .last_request()
            .unwrap()
            .body
            .get("thinking")
            .is_none());
    }

    // A sampling setting thinking cannot take is named before any call.
    let calls = anthropic.calls();
    let resp = app
        .post_json("/v1/chat/completions", &ask(json!({"temperature": 0.3})))
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["param"], "temperature");
    assert_eq!(anthropic.calls(), calls);
}

#[tokio::test]
async fn anthropics_web_searches_are_priced_in_the_usage_row() {
    let (mut app, anthropic) = with_anthropic_and(
        "server_tools = true\n",
        "[pricing.claude-sonnet-mock]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n\
         web_search_per_1k = 10.0\n",
    )
    .await;
    anthropic.update(|b| b.web_searches = 2);
    let body = |stream: bool| {
        json!({"model": "claude", "max_tokens": 256, "stream": stream,
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        "messages": [{"role": "user", "content": "Search for it."}]})
    };

    for stream in [false, true] {
        let resp = app.post_json("/v1/messages", &body(stream)).await;
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }

    app.stop_gracefully().await;
    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 2);
    let words = mock_reply_words() as f64;
    // The mock's 4 input tokens a message, its words out, and two searches
    // at $10 a thousand.
    let expected = (4.0 * 3.0 + words * 15.0) / 1e6 + 2.0 * 10.0 / 1e3;
    for row in &rows {
        let cost = row.cost_usd.unwrap();
        assert!((cost - expected).abs() < 1e-12, "{cost} vs {expected}");
    }
}

#[tokio::test]
async fn an_anthropic_providers_thinking_setting_names_the_form_for_its_models() {
    // "claude-sonnet-mock" says no version: adaptive unless the provider
    // says otherwise.
    let (app, anthropic) = with_anthropic_and("thinking = \"budget\"\n", "").await;
    let body = json!({"model": "claude", "reasoning_effort": "medium",
        "messages": [{"role": "user", "content": "Hi"}]});

    let resp = app.post_json("/v1/chat/completions", &body).await;

    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let sent = anthropic.last_request().unwrap().body;
    assert_eq!(
        sent["thinking"],
        json!({"type": "enabled", "budget_tokens": 2048})
    );
    assert!(sent.get("output_config").is_none());
}

/// An overloaded Anthropic (529 on every try) is 529 `overloaded_error` to
/// a Messages client, as Anthropic says it (its SDKs raise and retry
/// `OverloadedError` for it), while an OpenAI client gets the gateway's 502.
#[tokio::test]
async fn an_overloaded_provider_is_anthropics_529_to_a_messages_client() {
    let (app, anthropic) = with_anthropic_and("", "[resilience]\nmax_attempts = 1\n").await;
    anthropic.update(|b| b.always = Some(Fault::Status(529)));
    let resp = app
        .post_json("/v1/messages", &messages_body("claude"))
        .await;
    assert_eq!(resp.status().as_u16(), 529);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");
    let resp = app
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 502);
}

/// An OpenAI event stream of `chunks` (each in a `chat.completion.chunk`
/// of id `chatcmpl-raw`), then `[DONE]`, for the mock to send as is.
fn openai_stream(chunks: &[Value]) -> String {
    let mut body = String::new();
    for c in chunks {
        let mut chunk = json!({"id": "chatcmpl-raw", "object": "chat.completion.chunk",
            "created": 1, "model": "gpt-4o-mini-upstream"});
        chunk["choices"] = c["choices"].clone();
        if let Some(usage) = c.get("usage") {
            chunk["usage"] = usage.clone();
        }
        body.push_str(&format!("data: {chunk}\n\n"));
    }
    body + "data: [DONE]\n\n"
}

/// A chunk whose one choice (index 0) carries `delta`.
fn delta(delta: Value) -> Value {
    json!({"choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
}

/// The content blocks an Anthropic SDK builds from a Messages stream: text
/// joined, a tool's `partial_json` fragments joined and parsed (`{}` when
/// none), after checking that blocks neither interleave nor skip an index.
fn assembled(events: &[(String, Value)]) -> Vec<Value> {
    let mut blocks: Vec<(Value, String)> = Vec::new();
    let mut open = None;
    for (name, e) in events {
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(open, None, "blocks interleave: {events:?}");
                assert_eq!(e["index"], blocks.len(), "{events:?}");
                open = e["index"].as_u64();
                blocks.push((e["content_block"].clone(), String::new()));
            }
            "content_block_delta" => {
                assert_eq!(e["index"].as_u64(), open, "a delta outside its block");
                let (block, json) = blocks.last_mut().unwrap();
                if let Some(text) = e["delta"]["text"].as_str() {
                    block["text"] = json!(format!("{}{text}", block["text"].as_str().unwrap()));
                }
                if let Some(part) = e["delta"]["partial_json"].as_str() {
                    json.push_str(part);
                }
            }
            "content_block_stop" => {
                assert_eq!(e["index"].as_u64(), open, "{events:?}");
                open = None;
            }
            _ => {}
        }
    }
    blocks
        .into_iter()
        .map(|(mut block, json)| {
            if !json.is_empty() {
                block["input"] = serde_json::from_str(&json).unwrap();
            }
            block
        })
        .collect()
}

/// Text that a provider streams while a tool call's arguments are still
/// coming used to close the call's block, and the SDK saw `input: {}`: the
/// call keeps all its arguments, streamed as they came, and the text
/// follows its block.
#[tokio::test]
async fn text_amid_a_streamed_tool_calls_arguments_loses_neither() {
    let app = spawn().await;
    app.mock().push_fault(Fault::Raw(openai_stream(&[
        delta(
            json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "f", "arguments": "{\"city\":"}}]}),
        ),
        delta(json!({"content": "mid"})),
        delta(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]})),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ])));
    let mut body = messages_body("gpt-4o-mini");
    body["stream"] = json!(true);

    let resp = app.post_json("/v1/messages", &body).await;

    assert_eq!(resp.status(), 200);
    let events = anthropic_events(&resp.text().await.unwrap());
    assert_eq!(
        assembled(&events),
        [
            json!({"type": "tool_use", "id": "call_a", "name": "f", "input": {"city": "Paris"}}),
            json!({"type": "text", "text": "mid"}),
        ]
    );
    let fragments = events
        .iter()
        .filter(|(_, e)| e["delta"]["type"] == "input_json_delta")
        .count();
    assert_eq!(fragments, 2, "arguments stream as they come: {events:?}");
    let stop = &events[events.len() - 2].1;
    assert_eq!(stop["delta"]["stop_reason"], "tool_use");
}

/// Some OpenAI-compatible providers send `content` as a list of parts. A
/// Messages client used to get `content: []` (or a stream without a
/// block): the text parts' text is its text, parts of other types are
/// left out. The OpenAI API relays the provider's body as it came.
#[tokio::test]
async fn content_given_as_parts_reaches_a_messages_client_as_its_text() {
    let app = spawn().await;
    let parts = json!([{"type": "text", "text": "A"}, {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "B"}]);
    let answer = json!({"id": "chatcmpl-raw", "object": "chat.completion", "created": 1,
        "model": "gpt-4o-mini-upstream", "choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": parts}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});

    app.mock().push_fault(Fault::Raw(answer.to_string()));
    let resp = app
        .post_json("/v1/messages", &messages_body("gpt-4o-mini"))
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["content"], json!([{"type": "text", "text": "AB"}]), "{v}");

    app.mock().push_fault(Fault::Raw(openai_stream(&[
        delta(json!({"role": "assistant", "content": [{"type": "text", "text": "A"}]})),
        delta(json!({"content": [{"type": "text", "text": "B"}, {"type": "text", "text": "C"}]})),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    ])));
    let mut body = messages_body("gpt-4o-mini");
    body["stream"] = json!(true);
    let events = messages_events(&app, &body).await;
    assert_eq!(assembled(&events), [json!({"type": "text", "text": "ABC"})]);

    app.mock().push_fault(Fault::Raw(answer.to_string()));
    let v: Value = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], parts);
}

/// What Anthropic's API refuses is refused by name before any provider is
/// asked (an empty turn used to be named as `messages`, content of the
/// wrong type as missing, and a negative `top_k` passed unchecked), and an
/// empty system prompt is left out rather than sent as an empty message.
#[tokio::test]
async fn ill_formed_messages_fields_are_named_and_an_empty_system_left_out() {
    let app = spawn().await;
    let with = |key: &str, value: Value| {
        let mut body = messages_body("gpt-4o-mini");
        body[key] = value;
        body
    };
    for (body, named) in [
        (
            with("messages", json!([{"role": "user", "content": []}])),
            "messages.0.content: all messages must have non-empty content",
        ),
        (
            with("messages", json!([{"role": "user", "content": 5}])),
            "messages.0.content: Input should be a valid string or a list of content blocks",
        ),
        (
            with("top_k", json!(-1)),
            "top_k: Input should be greater than or equal to 0",
        ),
    ] {
        let resp = app.post_json("/v1/messages", &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(named),
            "{v}"
        );
    }
    assert_eq!(app.mock().calls(), 0);

    for system in [json!(""), json!([])] {
        let resp = app
            .post_json("/v1/messages", &with("system", system.clone()))
            .await;
        assert_eq!(resp.status(), 200, "{system}");
        let sent = app.mock().last_request().unwrap().body;
        assert_eq!(
            sent["messages"],
            json!([{"role": "user", "content": "Say hello"}]),
            "{system}"
        );
    }
}

/// A provider that sends a second choice (a Messages client cannot ask for
/// one) used to have its text run into the answer's: only choice 0 is the
/// answer, streamed or not, wherever it stands among the choices.
#[tokio::test]
async fn a_second_choice_from_the_provider_is_not_part_of_the_answer() {
    let app = spawn().await;
    app.mock().push_fault(Fault::Raw(openai_stream(&[
        delta(json!({"role": "assistant", "content": "Hi"})),
        json!({"choices": [{"index": 1, "delta": {"content": " other"}, "finish_reason": null}]}),
        json!({"choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"},
            {"index": 1, "delta": {}, "finish_reason": "length"}]}),
    ])));
    let mut body = messages_body("gpt-4o-mini");
    body["stream"] = json!(true);

    let events = messages_events(&app, &body).await;

    assert_eq!(
        assembled(&events),
        [json!({"type": "text", "text": "Hi there"})]
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "end_turn"
    );

    app.mock().push_fault(Fault::Raw(
        json!({"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [
                {"index": 1, "finish_reason": "length", "message": {"role": "assistant", "content": "other"}},
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi there"}},
            ]})
        .to_string(),
    ));
    let v: Value = app
        .post_json("/v1/messages", &messages_body("gpt-4o-mini"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "Hi there"}]),
        "{v}"
    );
    assert_eq!(v["stop_reason"], "end_turn");
}
