//! Shared helpers: spawning the app (alone or in front of a primary and a
//! fallback upstream), reading SSE bodies, `/metrics`, JSON log lines,
//! traces and the usage rows the app stored.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use switchyard_core::usage::UsageRecord;
use switchyard_testkit::{AppBuilder, MockUpstream, TestApp};

pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

pub fn app() -> AppBuilder {
    AppBuilder::new().binary(BIN)
}

pub async fn spawn() -> TestApp {
    app().spawn().await
}

/// A config routing `smart` to `primary` (at `primary_url`, with its
/// `primary_settings`), then to `fallback`, with `resilience` settings.
pub fn primary_then_fallback(
    resilience: &str,
    primary_url: &str,
    primary_settings: &str,
    fallback_url: &str,
) -> String {
    format!(
        "[resilience]\n{resilience}\n\n\
         [providers.primary]\nkind = \"openai\"\nbase_url = \"{primary_url}\"\n{primary_settings}\n\n\
         [providers.fallback]\nkind = \"openai\"\nbase_url = \"{fallback_url}\"\n\n\
         [[models.smart.route]]\nprovider = \"primary\"\nmodel = \"p-model\"\n\n\
         [[models.smart.route]]\nprovider = \"fallback\"\nmodel = \"f-model\"\n"
    )
}

/// A route `smart` → primary, then fallback, two real mock upstreams, with
/// `resilience` settings; the primary's first-byte budget is 500 ms.
pub async fn two_deployments(resilience: &str) -> (TestApp, MockUpstream, MockUpstream) {
    let primary = MockUpstream::start().await.unwrap();
    let fallback = MockUpstream::start().await.unwrap();
    let app = app()
        .without_mock()
        .config(&primary_then_fallback(
            resilience,
            &primary.base_url(),
            "first_byte_timeout_ms = 500",
            &fallback.base_url(),
        ))
        .spawn()
        .await;
    (app, primary, fallback)
}

/// The body of an unauthenticated `GET path`, as text.
pub async fn get_text(app: &TestApp, path: &str) -> String {
    app.client
        .get(app.url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The body of an unauthenticated `GET path`, as JSON.
pub async fn get_json(app: &TestApp, path: &str) -> Value {
    json_of(app.client.get(app.url(path))).await
}

/// The body of `GET path` made with `key`, as JSON.
pub async fn get_json_as(app: &TestApp, path: &str, key: &str) -> Value {
    json_of(app.client.get(app.url(path)).bearer_auth(key)).await
}

async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// The entry of deployment `id` in a `/v1/admin/providers` body.
pub fn deployment<'a>(providers: &'a Value, id: &str) -> Option<&'a Value> {
    providers["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["deployment"] == id)
}

/// Posts `body` to `/v1/chat/completions` with this `traceparent` header.
pub async fn chat_with_traceparent(
    app: &TestApp,
    body: &Value,
    traceparent: &str,
) -> reqwest::Response {
    app.client
        .post(app.url("/v1/chat/completions"))
        .header("traceparent", traceparent)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Sends `body` to `app`, giving up after `bound` (a timeout that did not
/// fire); returns the status, the serving provider and the body.
pub async fn send_within(app: &TestApp, body: &Value, bound: Duration) -> (u16, String, String) {
    tokio::time::timeout(bound, async {
        let resp = app.post_json("/v1/chat/completions", body).await;
        let provider = resp
            .headers()
            .get("x-switchyard-provider")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (resp.status().as_u16(), provider, resp.text().await.unwrap())
    })
    .await
    .expect("the request outlived the timeout meant to end it")
}

/// The value of the first `/metrics` line that starts with `prefix` (0 if none).
pub async fn metric(app: &TestApp, prefix: &str) -> f64 {
    get_text(app, "/metrics")
        .await
        .lines()
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

/// The first log line matching `pred` (waiting for it, bounded), as JSON.
pub async fn wait_for_log_json(app: &TestApp, pred: impl Fn(&str) -> bool) -> Option<Value> {
    let line = app.wait_for_log(pred).await?;
    Some(serde_json::from_str(&line).unwrap())
}

/// The trace id of the request a JSON log line was written in.
pub fn log_trace_id(line: &Value) -> &str {
    line["spans"][0]["trace_id"].as_str().unwrap_or_default()
}

/// `GET /v1/traces/{trace_id}` once its last event is the request's end
/// (events are written in batches).
pub async fn finished_trace(app: &TestApp, trace_id: &str) -> Value {
    for _ in 0..250 {
        let resp = app
            .client
            .get(app.url(&format!("/v1/traces/{trace_id}")))
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            let t: Value = resp.json().await.unwrap();
            let last = &t["data"].as_array().unwrap().last().unwrap()["kind"];
            if last == "request.done" || last == "request.error" {
                return t;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the trace {trace_id} never finished");
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

/// The text of a chat stream: its chunks' `delta.content`, joined (payloads
/// that are not JSON, such as `[DONE]`, are passed over).
pub fn streamed_text(data: &[String]) -> String {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
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

/// The default tenant's newest usage rows (ten at most), read from the
/// app's store.
pub async fn usage_rows(app: &TestApp) -> Vec<UsageRecord> {
    app_store(app)
        .await
        .list_usage("default", 10)
        .await
        .unwrap()
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
