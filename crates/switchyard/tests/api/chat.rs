//! Non-streaming chat completions through the gateway.

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn a_chat_completion_is_relayed_with_the_upstream_model_substituted() {
    let app = spawn().await;

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-switchyard-provider"], "mock");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello! How can I help you today?"
    );
    let upstream = app.mock().last_request().unwrap();
    assert_eq!(upstream.path, "/v1/chat/completions");
    assert_eq!(upstream.body["model"], "gpt-4o-mini-upstream");
    assert_eq!(
        upstream.headers["authorization"],
        format!("Bearer {}", switchyard_testkit::app::MOCK_PROVIDER_KEY)
    );
}

#[tokio::test]
async fn every_field_the_gateway_does_not_interpret_reaches_the_provider_untouched() {
    let app = spawn().await;
    let mut body = chat_body("gpt-4o-mini");
    let extras = json!({
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "stop": ["\n\n", "END"],
        "n": 2,
        "seed": 42,
        "logprobs": true,
        "top_logprobs": 3,
        "temperature": 0.7,
        "x_vendor_extension": {"nested": [1, 2.5, null, "s"]},
    });
    for (k, v) in extras.as_object().unwrap() {
        body[k] = v.clone();
    }

    let resp = app.post_json("/v1/chat/completions", &body).await;

    assert_eq!(resp.status(), 200);
    let upstream = app.mock().last_request().unwrap().body;
    for (k, v) in extras.as_object().unwrap() {
        assert_eq!(&upstream[k], v, "field {k}");
    }
    assert_eq!(upstream["messages"], body["messages"]);
    let keys: Vec<&String> = upstream.as_object().unwrap().keys().collect();
    let sent: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys, sent, "field order is preserved");
}

#[tokio::test]
async fn a_tool_call_answer_is_relayed() {
    let app = spawn().await;
    let mut body = chat_body("gpt-4o-mini");
    body["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);

    let resp: Value = app
        .post_json("/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();

    assert_eq!(resp["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        resp["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
}

#[tokio::test]
async fn the_model_list_shows_the_configured_aliases() {
    let app = spawn().await;

    let resp = app.client.get(app.url("/v1/models")).send().await.unwrap();

    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o-mini", "text-embedding-3-small"]);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["owned_by"], "mock");
    let one = get_json(&app, "/v1/models/gpt-4o-mini").await;
    assert_eq!(one["id"], "gpt-4o-mini");
    let missing = app
        .client
        .get(app.url("/v1/models/nope"))
        .send()
        .await
        .unwrap();
    assert_error(missing, 404, "model_not_found").await;
}

#[tokio::test]
async fn shortcut_variables_configure_a_working_provider() {
    let mock = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .env("CHAT_API_BASE", &mock.base_url())
        .env("OPENAI_API_KEY", "sk-shortcut-key")
        .env("CHAT_MODEL_DEFAULT", "llama-3-8b")
        .spawn()
        .await;

    let resp = app
        .post_json("/v1/chat/completions", &chat_body("default"))
        .await;

    assert_eq!(resp.status(), 200);
    let upstream = mock.last_request().unwrap();
    assert_eq!(upstream.body["model"], "llama-3-8b");
    assert_eq!(upstream.headers["authorization"], "Bearer sk-shortcut-key");
}

#[tokio::test]
async fn embedding_variables_send_embeddings_to_their_own_provider() {
    let chat_mock = switchyard_testkit::MockUpstream::start().await.unwrap();
    let embed_mock = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .env("CHAT_API_BASE", &chat_mock.base_url())
        .env("CHAT_API_KEY", "sk-chat-shortcut")
        .env("EMBEDDING_API_BASE", &embed_mock.base_url())
        .env("EMBEDDING_API_KEY", "sk-embed-shortcut")
        .spawn()
        .await;

    let chat = app
        .post_json("/v1/chat/completions", &chat_body("default"))
        .await;
    let embed = app
        .post_json(
            "/v1/embeddings",
            &serde_json::json!({"model": "default-embedding", "input": "hello"}),
        )
        .await;

    assert_eq!(chat.status(), 200);
    assert_eq!(embed.status(), 200);
    let to_chat = chat_mock.requests();
    let to_embed = embed_mock.requests();
    assert_eq!(to_chat.len(), 1, "the chat mock got only the chat");
    assert_eq!(
        to_embed.len(),
        1,
        "the embedding mock got only the embeddings"
    );
    assert_eq!(to_chat[0].path, "/v1/chat/completions");
    assert_eq!(
        to_chat[0].headers["authorization"],
        "Bearer sk-chat-shortcut"
    );
    assert_eq!(to_embed[0].path, "/v1/embeddings");
    assert_eq!(to_embed[0].body["model"], "text-embedding-3-small");
    assert_eq!(
        to_embed[0].headers["authorization"],
        "Bearer sk-embed-shortcut"
    );
}

/// OpenAI's current models refuse `max_tokens`; on OpenAI's own API (here
/// reached through an HTTP proxy, the mock, since no real host is
/// reachable) it travels as `max_completion_tokens`, from both APIs.
#[tokio::test]
async fn max_tokens_reaches_openai_itself_as_max_completion_tokens() {
    let mock = switchyard_testkit::MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .env("HTTP_PROXY", &format!("http://{}", mock.addr()))
        .config(
            "[providers.openai]\nkind = \"openai\"\nbase_url = \"http://api.openai.com/v1\"\napi_key = \"sk-test\"\n\n\
             [models.gpt-5]\nprovider = \"openai\"\nmodel = \"gpt-5\"\n",
        )
        .spawn()
        .await;
    let mut chat = chat_body("gpt-5");
    chat["max_tokens"] = json!(50);
    let mut stream = stream_body("gpt-5", false);
    stream["max_tokens"] = json!(60);
    let mut both = chat_body("gpt-5");
    both["max_completion_tokens"] = json!(70);
    both["max_tokens"] = json!(7);
    let messages = json!({"model": "gpt-5", "max_tokens": 80, "messages": [{"role": "user", "content": "hi"}]});

    let mut sent = Vec::new();
    for (path, body) in [
        ("/v1/chat/completions", &chat),
        ("/v1/chat/completions", &stream),
        ("/v1/chat/completions", &both),
        ("/v1/messages", &messages),
    ] {
        let resp = app.post_json(path, body).await;
        assert_eq!(resp.status(), 200, "{path}: {}", resp.text().await.unwrap());
        resp.bytes().await.unwrap();
        let b = mock.last_request().unwrap().body;
        sent.push((
            b.get("max_tokens").cloned(),
            b["max_completion_tokens"].clone(),
        ));
    }

    assert_eq!(
        sent,
        [
            (None, json!(50)),
            (None, json!(60)),
            (None, json!(70)),
            (None, json!(80)),
        ]
    );
    assert_eq!(mock.last_request().unwrap().path, "/v1/chat/completions");
}
