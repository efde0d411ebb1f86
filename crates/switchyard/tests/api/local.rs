//! The built-in local models through the real binary, with no mock and no
//! provider configured: the default aliases, correct and deterministic
//! answers, streams, embeddings, the bounded queue, and the refusals of what
//! a small text-only model cannot do. Needs the files of `scripts/fetch-models`
//! (`SWITCHYARD_REQUIRE_LOCAL=1`, set by the test command, makes their
//! absence a failure).

use std::path::PathBuf;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::helpers::*;

pub fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var("SWITCHYARD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let present = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
        && dir.join("all-MiniLM-L6-v2/model.safetensors").is_file();
    if present {
        return Some(dir);
    }
    assert_ne!(
        std::env::var("SWITCHYARD_REQUIRE_LOCAL").as_deref(),
        Ok("1"),
        "the local model files are required: run scripts/fetch-models"
    );
    eprintln!("skipping: no local model files in {}", dir.display());
    None
}

async fn local_app(extra: &str) -> Option<switchyard_testkit::TestApp> {
    let dir = models_dir()?;
    Some(
        app()
            .without_mock()
            .config(&format!(
                "[local]\nmodels_dir = \"{}\"\n{extra}",
                dir.display()
            ))
            .spawn()
            .await,
    )
}

async fn post(app: &switchyard_testkit::TestApp, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The `chat.completion.chunk`s of a whole SSE answer, which must end with
/// `data: [DONE]`.
fn chunks_of(text: &str) -> Vec<Value> {
    let data = sse_data(text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn ask(question: &str) -> Value {
    json!({"model": "local-chat", "temperature": 0, "max_tokens": 48,
           "messages": [{"role": "user", "content": question}]})
}

#[tokio::test]
async fn with_no_provider_the_default_aliases_route_to_the_local_models() {
    let Some(app) = local_app("").await else {
        return;
    };
    let models: Value = reqwest::get(app.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for alias in ["local-chat", "local-embed", "default", "default-embedding"] {
        assert!(ids.contains(&alias), "{alias} missing from {ids:?}");
    }
    let logs = app.logs();
    assert!(
        logs.iter().any(|l| l.contains("local chat model loaded")
            && l.contains("SmolLM2-135M-Instruct.Q4_1.gguf")),
        "{logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("local embedding model loaded")),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn local_chat_answers_correctly_and_deterministically_at_temperature_zero() {
    let Some(app) = local_app("").await else {
        return;
    };
    for (question, expected) in [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Germany?", "Berlin"),
    ] {
        let resp = post(&app, "/v1/chat/completions", ask(question)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-switchyard-provider"], "local");
        let first: Value = resp.json().await.unwrap();
        let text = first["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.contains(expected), "{question} -> {text}");
        assert_eq!(first["object"], "chat.completion");
        assert_eq!(first["choices"][0]["message"]["role"], "assistant");
        assert!(first["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
        let completion = first["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=48).contains(&completion), "{first}");

        let again: Value = post(&app, "/v1/chat/completions", ask(question))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            again["choices"][0]["message"],
            first["choices"][0]["message"]
        );
        assert_eq!(again["usage"], first["usage"]);
    }
}

#[tokio::test]
async fn local_chat_streams_token_by_token_and_stops_at_max_tokens() {
    let Some(app) = local_app("").await else {
        return;
    };
    let mut body = ask("Write a long story about a dragon.");
    body["max_tokens"] = json!(12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let chunks = chunks_of(&text);
    let content: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .collect();
    assert!(content.len() >= 4, "{text}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12, "{text}");
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
}

#[tokio::test]
async fn a_stop_sequence_ends_the_local_answer_before_it() {
    let Some(app) = local_app("").await else {
        return;
    };
    let mut body = ask("What is the capital of France?");
    body["stop"] = json!(["Paris"]);
    let v: Value = post(&app, "/v1/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.contains("Paris"), "{text}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn local_embeddings_come_as_floats_or_base64_and_rank_by_meaning() {
    let Some(app) = local_app("").await else {
        return;
    };
    let input = json!([
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome."
    ]);
    let resp = post(
        &app,
        "/v1/embeddings",
        json!({"model": "local-embed", "input": input, "encoding_format": "float"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let vectors: Vec<Vec<f32>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect();
    assert_eq!(vectors.len(), 3);
    assert!(vectors.iter().all(|e| e.len() == 384));
    let (near, far) = (
        cosine(&vectors[0], &vectors[1]),
        cosine(&vectors[0], &vectors[2]),
    );
    assert!(near > 0.7 && far < 0.1, "near {near}, far {far}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);

    let b: Value = post(
        &app,
        "/v1/embeddings",
        json!({"model": "local-embed", "input": "A man is eating food.", "encoding_format": "base64"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(decoded.len(), 384);
    for (x, y) in decoded.iter().zip(&vectors[0]) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
}

#[tokio::test]
async fn a_full_local_queue_answers_503_with_retry_after_at_once() {
    // One worker, no waiting place: a second request while one generates is refused.
    let Some(app) = local_app("max_concurrent = 1\nqueue = 0\n").await else {
        return;
    };
    let mut long = ask("Write a very long story about a dragon and a knight.");
    long["max_tokens"] = json!(1500);
    long["temperature"] = json!(0.8);
    long["seed"] = json!(1);
    long["stream"] = json!(true);
    let running = post(&app, "/v1/chat/completions", long).await;
    assert_eq!(running.status(), 200);
    let mut events = SseReader::new(running);
    assert!(events.next().await.unwrap().is_some(), "the first chunk");

    let refused = post(&app, "/v1/chat/completions", ask("Hi")).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_overloaded", "{body}");
    assert_eq!(body["error"]["type"], "server_error");

    // The client that leaves frees the worker: its generation is cancelled.
    drop(events);
    let mut status = 0;
    for _ in 0..100 {
        status = post(&app, "/v1/chat/completions", ask("Hi"))
            .await
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    // A refusal is not a failure of the deployment: its breaker stays closed.
    let providers: Value = reqwest::get(app.url("/v1/admin/providers"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(providers.to_string().contains("\"closed\""), "{providers}");
}

fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                       "required": ["location"]},
    }}])
}

#[tokio::test]
async fn the_local_model_calls_a_tool_and_streams_its_arguments() {
    let Some(app) = local_app("").await else {
        return;
    };
    let mut body = ask("Weather in Paris?");
    body["tools"] = weather_tool();
    let resp = post(&app, "/v1/chat/completions", body.clone()).await;
    assert_eq!(resp.status(), 200);
    let whole: Value = resp.json().await.unwrap();
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{whole}");
    assert!(choice["message"]["content"].is_null(), "{whole}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments = call["function"]["arguments"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(arguments).unwrap();
    assert!(
        parsed["location"].as_str().unwrap().contains("Paris"),
        "{arguments}"
    );

    body["stream"] = json!(true);
    let text = post(&app, "/v1/chat/completions", body)
        .await
        .text()
        .await
        .unwrap();
    let chunks = chunks_of(&text);
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    // The first names the call; the arguments follow in several pieces
    // that add up to what the whole answer held.
    assert_eq!(deltas[0]["function"]["name"], "get_weather", "{text}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let pieces: Vec<&str> = deltas
        .iter()
        .filter_map(|d| d["function"]["arguments"].as_str())
        .filter(|a| !a.is_empty())
        .collect();
    assert!(pieces.len() >= 3, "{text}");
    assert_eq!(pieces.concat(), arguments);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("tool_calls")]);
}

#[tokio::test]
async fn an_anthropic_client_gets_a_tool_use_block_from_the_local_model() {
    let Some(app) = local_app("").await else {
        return;
    };
    let body = json!({"model": "local-chat", "max_tokens": 64, "temperature": 0,
        "tools": [{"name": "get_weather", "description": "Weather for a city",
                   "input_schema": {"type": "object", "properties": {"location": {"type": "string"}},
                                    "required": ["location"]}}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}]});
    let resp = post(&app, "/v1/messages", body).await;
    assert_eq!(resp.status(), 200);
    let message: Value = resp.json().await.unwrap();
    assert_eq!(message["stop_reason"], "tool_use", "{message}");
    let block = message["content"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["type"] == "tool_use")
        .unwrap_or_else(|| panic!("{message}"));
    assert_eq!(block["name"], "get_weather");
    assert!(
        block["input"]["location"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{message}"
    );
}

#[tokio::test]
async fn a_tool_result_in_the_history_is_answered() {
    let Some(app) = local_app("").await else {
        return;
    };
    let body = json!({"model": "local-chat", "temperature": 0, "max_tokens": 48,
    "tools": weather_tool(), "tool_choice": "none",
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "It is 22 degrees and sunny in Paris."},
    ]});
    let resp = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let whole: Value = resp.json().await.unwrap();
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty(), "{whole}");
    assert!(whole["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn a_json_schema_response_format_shapes_the_local_answer() {
    let Some(app) = local_app("").await else {
        return;
    };
    let mut body = ask("What is the capital of France?");
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "capital",
        "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let resp = post(&app, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let whole: Value = resp.json().await.unwrap();
    let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap();
    assert!(parsed["city"].is_string(), "{content}");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn what_the_local_models_cannot_do_is_refused_naming_the_field() {
    let Some(app) = local_app("").await else {
        return;
    };
    let user = json!([{"role": "user", "content": "hi"}]);
    for (path, body, param) in [
        (
            "/v1/chat/completions",
            json!({"model": "local-chat", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}),
            "messages[0].content[0]",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "local-chat", "messages": user, "n": 2}),
            "n",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "local-chat", "messages": user, "tools": [{"type": "function",
                   "function": {"name": "get_weather", "parameters": {"type": "object",
                   "properties": {"a": {"not": {"type": "string"}}}}}}]}),
            "tools[0].function.parameters",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "local-chat", "messages": user, "tools": [{"type": "function",
                   "function": {"name": "get_weather"}}],
                   "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "local-chat", "messages": user,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                   "schema": {"allOf": [{"type": "object"}, {"required": ["a"]}]}}}}),
            "response_format.json_schema.schema",
        ),
        (
            "/v1/embeddings",
            json!({"model": "local-embed", "input": [[1, 2, 3]]}),
            "input[0]",
        ),
        (
            "/v1/embeddings",
            json!({"model": "local-embed", "input": "x", "dimensions": 512}),
            "dimensions",
        ),
    ] {
        let resp = post(&app, path, body.clone()).await;
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["param"], param, "{err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert!(err["error"]["message"].as_str().unwrap().len() > 10);
    }
    // A prompt longer than the context window is the caller's to shorten.
    let long = "word ".repeat(4000);
    let resp = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "local-chat", "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context"),
        "{err}"
    );
}

#[tokio::test]
async fn a_session_reply_streams_from_the_local_model() {
    let Some(app) = local_app("").await else {
        return;
    };
    let bot: Value = post(
        &app,
        "/v1/bots",
        json!({"name": "geo", "model": "local-chat", "temperature": 0, "max_tokens": 32,
               "system_prompt": "You answer geography questions in one sentence."}),
    )
    .await
    .json()
    .await
    .unwrap();
    let session: Value = post(&app, "/v1/sessions", json!({"bot_id": bot["id"]}))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/v1/sessions/{}/messages", session["id"].as_str().unwrap());
    let text = post(
        &app,
        &path,
        json!({"content": "What is the capital of France?"}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(text.contains("event: chat.delta"), "{text}");
    let done = text
        .split("\n\n")
        .find(|e| e.contains("event: chat.done"))
        .unwrap_or_else(|| panic!("no chat.done in {text}"));
    assert!(done.contains("Paris"), "{done}");
}
