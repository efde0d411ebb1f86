//! Shared helpers: spawning the app and reading SSE bodies.

use futures::StreamExt;
use serde_json::Value;
use switchyard_testkit::{AppBuilder, TestApp};

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

pub fn app() -> AppBuilder {
    AppBuilder::new().binary(BIN)
}

pub async fn spawn() -> TestApp {
    app().spawn().await
}

/// The value of the first `/metrics` line that starts with `prefix` (0 if none).
pub async fn metric(app: &TestApp, prefix: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub fn chat_body(model: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
}

pub fn stream_body(model: &str, include_usage: bool) -> Value {
    let mut b = chat_body(model);
    b["stream"] = Value::Bool(true);
    if include_usage {
        b["stream_options"] = serde_json::json!({"include_usage": true});
    }
    b
}

/// The `data:` payloads of a whole SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

/// Reads an SSE response event by event.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseReader {
    pub fn new(resp: reqwest::Response) -> Self {
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event's data, `None` at the end of the body, `Err` if the body broke.
    pub async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..i + 2).collect();
                if let Some(d) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return Ok(Some(d.to_owned()));
                }
                continue;
            }
            match self.stream.next().await {
                Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Ok(None),
            }
        }
    }
}

/// Opens the app's store to read what it wrote.
pub async fn app_store(app: &TestApp) -> std::sync::Arc<dyn switchyard_store::Store> {
    let config = switchyard_core::config::StoreConfig {
        url: app.store_url.clone(),
        schema: app.store_schema.clone(),
        ..Default::default()
    };
    switchyard_store::connect(&config).await.unwrap()
}

/// Asserts an OpenAI-shaped error body and returns it.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    let err = &body["error"];
    assert_eq!(err["code"], code, "{body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["type"].is_string(), "{body}");
    assert!(err.as_object().unwrap().contains_key("param"), "{body}");
    body
}

/// The test Redis, or `None` (the test skips) when it is not set up; with
/// `SWITCHYARD_REQUIRE_REDIS=1` (CI) a missing Redis fails the test instead.
pub fn test_redis_url() -> Option<String> {
    let url = std::env::var("SWITCHYARD_TEST_REDIS_URL").ok();
    if url.is_none() {
        assert_ne!(
            std::env::var("SWITCHYARD_REQUIRE_REDIS").as_deref(),
            Ok("1"),
            "SWITCHYARD_TEST_REDIS_URL is required"
        );
        eprintln!("skipping: SWITCHYARD_TEST_REDIS_URL is not set");
    }
    url
}
