//! Session replies end to end: SSE transcripts (inline snapshots),
//! idempotency under concurrency for sessions and chat completions, atomic
//! state patches, resuming with `Last-Event-ID`, clients that go away, and
//! a SIGKILL in the middle of a stream.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use futures::StreamExt;
use serde_json::{json, Value};
use switchyard_testkit::{Fault, TestApp};

use crate::helpers::*;
use crate::ops::pg_url;

const MODEL: &str = "gpt-4o-mini";
/// The mock's default reply, one word per chunk.
const REPLY: &str = "Hello! How can I help you today?";

// ---- helpers ----

/// One SSE frame as sent: `id:`, `event:` and one line of `data:`.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    id: u64,
    event: String,
    data: String,
}

impl Frame {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }

    fn delta(&self) -> Option<String> {
        (self.event == "chat.delta").then(|| self.json()["delta"].as_str().unwrap().to_owned())
    }

    fn render(&self) -> String {
        format!(
            "id: {}\nevent: {}\ndata: {}\n\n",
            self.id, self.event, self.data
        )
    }
}

/// Parses one frame, insisting on the exact shape DESIGN.md gives.
fn parse_frame(block: &str) -> Frame {
    let lines: Vec<&str> = block.trim_end_matches('\n').split('\n').collect();
    let [id, event, data] = lines[..] else {
        panic!("a frame is three lines (id, event, data): {block:?}");
    };
    Frame {
        id: id
            .strip_prefix("id: ")
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("bad id line in {block:?}")),
        event: event
            .strip_prefix("event: ")
            .unwrap_or_else(|| panic!("bad event line in {block:?}"))
            .to_owned(),
        data: data
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("bad data line in {block:?}"))
            .to_owned(),
    }
}

/// Every frame of a whole SSE body.
fn parse_frames(body: &str) -> Vec<Frame> {
    assert!(
        body.is_empty() || body.ends_with("\n\n"),
        "the body ends mid-frame: {body:?}"
    );
    body.split_terminator("\n\n").map(parse_frame).collect()
}

/// Reads a live SSE body frame by frame.
struct Frames {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Frames {
    fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next frame; `None` at the end of the body.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                return Some(parse_frame(&block));
            }
            match self.stream.next().await {
                Some(Ok(b)) => self.buf.push_str(std::str::from_utf8(&b).unwrap()),
                Some(Err(e)) => panic!("the stream broke: {e}"),
                None => {
                    assert!(self.buf.is_empty(), "ended mid-frame: {:?}", self.buf);
                    return None;
                }
            }
        }
    }

    async fn rest(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.next().await {
            out.push(f);
        }
        out
    }
}

/// Ids 1, 2, 3… and a stream that ends with `chat.done` or `error` (only).
fn assert_well_formed(frames: &[Frame]) {
    let ids: Vec<u64> = frames.iter().map(|f| f.id).collect();
    let expected: Vec<u64> = (1..=frames.len() as u64).collect();
    assert_eq!(ids, expected, "{frames:#?}");
    assert_eq!(frames[0].event, "ready");
    let last = frames.last().unwrap();
    assert!(matches!(last.event.as_str(), "chat.done" | "error"));
    assert!(frames[..frames.len() - 1]
        .iter()
        .all(|f| f.event != "chat.done" && f.event != "error"));
    for f in frames {
        f.json();
    }
}

fn deltas(frames: &[Frame]) -> String {
    frames.iter().filter_map(Frame::delta).collect()
}

/// Replaces what changes from run to run: UUIDs, 32-hex trace ids,
/// latencies and costs.
fn redact(text: &str) -> String {
    let text = redact_ids(text);
    let text = redact_number(&text, "\"latency_ms\":", "[ms]");
    redact_number(&text, "\"cost_usd\":", "[cost]")
}

fn redact_ids(text: &str) -> String {
    let b = text.as_bytes();
    let hex =
        |i: usize, n: usize| i + n <= b.len() && b[i..i + n].iter().all(u8::is_ascii_hexdigit);
    let boundary = |i: usize| i >= b.len() || !b[i].is_ascii_alphanumeric();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let starts = i == 0 || !b[i - 1].is_ascii_alphanumeric();
        let uuid = starts
            && hex(i, 8)
            && [(8, 4), (13, 4), (18, 4), (23, 12)]
                .iter()
                .all(|&(dash, n)| b.get(i + dash) == Some(&b'-') && hex(i + dash + 1, n))
            && boundary(i + 36);
        if uuid {
            out.push_str("[id]");
            i += 36;
        } else if starts && hex(i, 32) && boundary(i + 32) {
            out.push_str("[trace]");
            i += 32;
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn redact_number(text: &str, key: &str, token: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(key) {
        out.push_str(&rest[..i + key.len()]);
        rest = &rest[i + key.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
            .unwrap_or(rest.len());
        if end > 0 {
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A request, optionally with a bearer key.
fn req(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
) -> reqwest::RequestBuilder {
    let r = app.client.request(method, app.url(path));
    match key {
        Some(k) => r.bearer_auth(k),
        None => r,
    }
}

async fn created(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

/// A bot on the mock model and a session with it; the session's id.
async fn new_session_as(app: &TestApp, key: Option<&str>) -> String {
    let bot = created(
        req(app, reqwest::Method::POST, "/v1/bots", key)
            .json(&json!({"name": "helper", "model": MODEL}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let session = created(
        req(app, reqwest::Method::POST, "/v1/sessions", key)
            .json(&json!({"bot_id": bot["id"], "user_id": "u1"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    session["id"].as_str().unwrap().to_owned()
}

async fn new_session(app: &TestApp) -> String {
    new_session_as(app, None).await
}

async fn send_message(app: &TestApp, sid: &str, content: &str) -> reqwest::Response {
    app.post_json(
        &format!("/v1/sessions/{sid}/messages"),
        &json!({"content": content}),
    )
    .await
}

/// The session's stored messages, oldest first.
async fn messages(app: &TestApp, sid: &str) -> Vec<Value> {
    let resp = app
        .client
        .get(app.url(&format!("/v1/sessions/{sid}/messages?limit=100")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["data"].as_array().unwrap().clone()
}

/// The one assistant message of the session.
async fn assistant(app: &TestApp, sid: &str) -> Value {
    let all = messages(app, sid).await;
    let mut it = all.iter().filter(|m| m["role"] == "assistant");
    let m = it.next().expect("an assistant message").clone();
    assert!(it.next().is_none(), "one assistant message: {all:#?}");
    m
}

/// Asserts a native error body (`{"error":{"code","message","details"}}`).
async fn assert_native(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    let err = &body["error"];
    assert_eq!(err["code"], code, "{body}");
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(err["details"].is_object(), "{body}");
    assert!(err.get("type").is_none(), "{body}");
    body
}

/// Polls (bounded) until `f` gives a value.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---- 1. SSE transcripts ----

#[tokio::test]
async fn a_normal_reply_streams_ready_deltas_and_done() {
    let app = spawn().await;
    let sid = new_session(&app).await;

    let resp = send_message(&app, &sid, "Say hello").await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let text = resp.text().await.unwrap();
    let frames = parse_frames(&text);
    assert_well_formed(&frames);
    insta::assert_snapshot!(redact(&text), @r#"
    id: 1
    event: ready
    data: {"session_id":"[id]","message_id":"[id]","trace_id":"[trace]"}

    id: 2
    event: chat.delta
    data: {"delta":"Hello!"}

    id: 3
    event: chat.delta
    data: {"delta":" How"}

    id: 4
    event: chat.delta
    data: {"delta":" can"}

    id: 5
    event: chat.delta
    data: {"delta":" I"}

    id: 6
    event: chat.delta
    data: {"delta":" help"}

    id: 7
    event: chat.delta
    data: {"delta":" you"}

    id: 8
    event: chat.delta
    data: {"delta":" today?"}

    id: 9
    event: chat.done
    data: {"message_id":"[id]","content":"Hello! How can I help you today?","finish_reason":"stop","usage":{"prompt_tokens":5,"completion_tokens":7},"cost_usd":[cost],"latency_ms":[ms]}
    "#);
    let ready = frames[0].json();
    assert_eq!(ready["session_id"], sid);
    let done = frames.last().unwrap().json();
    assert_eq!(ready["message_id"], done["message_id"]);
    assert_eq!(deltas(&frames), REPLY);
    assert_eq!(done["content"], REPLY);

    let m = assistant(&app, &sid).await;
    assert_eq!(m["id"], done["message_id"]);
    assert_eq!(m["status"], "complete");
    assert_eq!(m["content"], deltas(&frames));
    assert_eq!(m["usage"], done["usage"]);
    assert_eq!(m["trace_id"], ready["trace_id"]);
    assert!(m["cost_usd"].as_f64().unwrap() > 0.0);
    assert!(m["error"].is_null());
}

#[tokio::test]
async fn a_provider_error_before_the_first_delta_ends_the_stream_with_an_error_frame() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    app.mock().push_fault(Fault::Status(400));

    let resp = send_message(&app, &sid, "Say hello").await;

    let text = Frames::new(resp).rest().await;
    let body: String = text.iter().map(Frame::render).collect();
    assert_well_formed(&text);
    insta::assert_snapshot!(redact(&body), @r#"
    id: 1
    event: ready
    data: {"session_id":"[id]","message_id":"[id]","trace_id":"[trace]"}

    id: 2
    event: error
    data: {"code":"upstream_status","message":"The provider failed with status 400.","retryable":false}
    "#);
    let err = text.last().unwrap().json();
    assert_eq!(err["retryable"], false);
    let m = assistant(&app, &sid).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["content"], "");
    assert_eq!(m["error"]["code"], err["code"]);
    assert_eq!(m["error"]["message"], err["message"]);
}

#[tokio::test]
async fn a_stream_cut_by_the_provider_ends_with_an_error_frame_after_its_deltas() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    app.mock().push_fault(Fault::ResetAfterChunks(3));

    let frames = Frames::new(send_message(&app, &sid, "Say hello").await)
        .rest()
        .await;

    assert_well_formed(&frames);
    let body: String = frames.iter().map(Frame::render).collect();
    insta::assert_snapshot!(redact(&body), @r#"
    id: 1
    event: ready
    data: {"session_id":"[id]","message_id":"[id]","trace_id":"[trace]"}

    id: 2
    event: chat.delta
    data: {"delta":"Hello!"}

    id: 3
    event: chat.delta
    data: {"delta":" How"}

    id: 4
    event: error
    data: {"code":"upstream_broken","message":"The provider's stream broke before it was complete.","retryable":true}
    "#);
    let m = assistant(&app, &sid).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["error"]["code"], "upstream_broken");
    // What was said before the cut is kept with the failure.
    assert_eq!(m["content"], deltas(&frames));
    assert_eq!(m["content"], "Hello! How");
}

#[tokio::test]
async fn a_slow_upstream_gets_keepalives_with_the_last_id() {
    let app = app()
        .config("[sessions]\nkeepalive_secs = 1\n")
        .spawn()
        .await;
    let sid = new_session(&app).await;
    app.mock().update(|b| b.ttft = Duration::from_millis(2500));

    let frames = Frames::new(send_message(&app, &sid, "Say hello").await)
        .rest()
        .await;

    let first_delta = frames.iter().position(|f| f.event == "chat.delta").unwrap();
    let keepalives: Vec<&Frame> = frames.iter().filter(|f| f.event == "keepalive").collect();
    assert!(!keepalives.is_empty(), "{frames:#?}");
    // Every keepalive came during the silence before the first delta and
    // repeats the id of the frame before it (`ready`).
    assert!(frames[first_delta..].iter().all(|f| f.event != "keepalive"));
    assert!(keepalives.iter().all(|k| k.id == 1 && k.data == "{}"));
    // However many there were, the rest is the ordinary stream.
    let mut collapsed: Vec<Frame> = Vec::new();
    for f in frames {
        if f.event == "keepalive" && collapsed.last().is_some_and(|l| l.event == "keepalive") {
            continue;
        }
        collapsed.push(f);
    }
    let body: String = collapsed.iter().map(Frame::render).collect();
    insta::assert_snapshot!(redact(&body), @r#"
    id: 1
    event: ready
    data: {"session_id":"[id]","message_id":"[id]","trace_id":"[trace]"}

    id: 1
    event: keepalive
    data: {}

    id: 2
    event: chat.delta
    data: {"delta":"Hello!"}

    id: 3
    event: chat.delta
    data: {"delta":" How"}

    id: 4
    event: chat.delta
    data: {"delta":" can"}

    id: 5
    event: chat.delta
    data: {"delta":" I"}

    id: 6
    event: chat.delta
    data: {"delta":" help"}

    id: 7
    event: chat.delta
    data: {"delta":" you"}

    id: 8
    event: chat.delta
    data: {"delta":" today?"}

    id: 9
    event: chat.done
    data: {"message_id":"[id]","content":"Hello! How can I help you today?","finish_reason":"stop","usage":{"prompt_tokens":5,"completion_tokens":7},"cost_usd":[cost],"latency_ms":[ms]}
    "#);
    let without: Vec<Frame> = collapsed
        .into_iter()
        .filter(|f| f.event != "keepalive")
        .collect();
    assert_well_formed(&without);
    assert_eq!(assistant(&app, &sid).await["status"], "complete");
}

#[test]
fn redaction_replaces_ids_traces_latencies_and_costs() {
    let text = r#"{"session_id":"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b","trace_id":"0af7651916cd43dd8448eb211c80319c","cost_usd":4.95e-6,"latency_ms":12.5,"x":"abc"}"#;
    assert_eq!(
        redact(text),
        r#"{"session_id":"[id]","trace_id":"[trace]","cost_usd":[cost],"latency_ms":[ms],"x":"abc"}"#
    );
    assert_eq!(redact(r#"{"cost_usd":null}"#), r#"{"cost_usd":null}"#);
}

// ---- 2. Idempotency ----

/// Sends `body` to `path` with `Idempotency-Key: key`.
async fn post_keyed(
    app: &TestApp,
    auth: Option<&str>,
    path: &str,
    key: &str,
    body: &str,
) -> reqwest::Response {
    req(app, reqwest::Method::POST, path, auth)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// Fires 50 identical keyed requests at once while the mock holds its
/// streams; returns the one that runs (still streaming) after checking the
/// 49 others were refused as in flight.
async fn fifty_at_once(
    app: &TestApp,
    path: &str,
    key: &str,
    body: &str,
    native: bool,
) -> reqwest::Response {
    app.mock().hold_streams();
    let sends = (0..50).map(|_| post_keyed(app, None, path, key, body));
    let mut running = Vec::new();
    let mut refused = 0;
    for resp in join_all(sends).await {
        if resp.status() == 200 {
            running.push(resp);
            continue;
        }
        if native {
            assert_native(resp, 409, "idempotency_in_flight").await;
        } else {
            assert_error(resp, 409, "idempotency_in_flight").await;
        }
        refused += 1;
    }
    assert_eq!((running.len(), refused), (1, 49));
    app.mock().release_streams();
    running.pop().unwrap()
}

#[tokio::test]
async fn fifty_parallel_messages_with_one_key_make_one_reply_and_replay_it_byte_for_byte() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    let path = format!("/v1/sessions/{sid}/messages");
    let body = r#"{"content":"Say hello"}"#;
    let calls = app.mock().calls();

    let first = fifty_at_once(&app, &path, "key-fifty", body, true).await;
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = first.bytes().await.unwrap();

    assert_eq!(app.mock().calls() - calls, 1);
    let frames = parse_frames(std::str::from_utf8(&first).unwrap());
    assert_well_formed(&frames);
    assert_eq!(frames.last().unwrap().event, "chat.done");
    let stored = messages(&app, &sid).await;
    let roles: Vec<(&str, &str)> = stored
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["status"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, [("user", "complete"), ("assistant", "complete")]);
    assert_eq!(stored[1]["content"], deltas(&frames));

    // The same request again: the stored response, byte for byte.
    let again = post_keyed(&app, None, &path, "key-fifty", body).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "text/event-stream");
    assert_eq!(again.bytes().await.unwrap(), first);
    // Another body, or another session, with the key: refused.
    let other = post_keyed(
        &app,
        None,
        &path,
        "key-fifty",
        r#"{"content":"Something else"}"#,
    )
    .await;
    assert_native(other, 422, "idempotency_key_reused").await;
    let sid2 = new_session(&app).await;
    let elsewhere = post_keyed(
        &app,
        None,
        &format!("/v1/sessions/{sid2}/messages"),
        "key-fifty",
        body,
    )
    .await;
    assert_native(elsewhere, 422, "idempotency_key_reused").await;
    // A key no store would take.
    let long = "k".repeat(300);
    let bad = post_keyed(&app, None, &path, &long, body).await;
    assert_native(bad, 400, "invalid_idempotency_key").await;

    assert_eq!(app.mock().calls() - calls, 1);
    assert_eq!(messages(&app, &sid).await.len(), 2);
    assert!(messages(&app, &sid2).await.is_empty());
}

#[tokio::test]
async fn a_json_reply_with_a_key_replays_the_same_message() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    let path = format!("/v1/sessions/{sid}/messages");
    let send = || {
        app.client
            .post(app.url(&path))
            .header("idempotency-key", "json-key")
            .header("accept", "application/json")
            .header("content-type", "application/json")
            .body(r#"{"content":"Say hello"}"#)
            .send()
    };

    let first = send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = first.bytes().await.unwrap();
    let again = send().await.unwrap();

    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), first);
    let m: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(
        (m["status"].as_str(), m["content"].as_str()),
        (Some("complete"), Some(REPLY))
    );
    assert_eq!(app.mock().calls(), 1);
    assert_eq!(messages(&app, &sid).await.len(), 2);
}

#[tokio::test]
async fn fifty_parallel_streamed_completions_with_one_key_make_one_call_and_replay_it() {
    let app = spawn().await;
    let body = stream_body(MODEL, true).to_string();

    let first = fifty_at_once(&app, "/v1/chat/completions", "chat-fifty", &body, false).await;
    let first = first.bytes().await.unwrap();

    assert_eq!(app.mock().calls(), 1);
    let text = std::str::from_utf8(&first).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let again = post_keyed(&app, None, "/v1/chat/completions", "chat-fifty", &body).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "text/event-stream");
    assert_eq!(again.headers()["x-switchyard-provider"], "mock");
    assert_eq!(again.bytes().await.unwrap(), first);
    let other = stream_body(MODEL, false).to_string();
    let reused = post_keyed(&app, None, "/v1/chat/completions", "chat-fifty", &other).await;
    assert_error(reused, 422, "idempotency_key_reused").await;
    assert_eq!(app.mock().calls(), 1);
}

#[tokio::test]
async fn a_keyed_completion_is_stored_once_refused_while_running_and_not_kept_when_it_failed() {
    let app = spawn().await;
    let body = chat_body(MODEL).to_string();
    let path = "/v1/chat/completions";

    // Non-streamed: stored, replayed with the header, refused with another body.
    let first = post_keyed(&app, None, path, "plain", &body).await;
    assert_eq!(first.status(), 200);
    let first = first.bytes().await.unwrap();
    let again = post_keyed(&app, None, path, "plain", &body).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "application/json");
    assert_eq!(again.bytes().await.unwrap(), first);
    let other = chat_body("text-embedding-3-small").to_string();
    assert_error(
        post_keyed(&app, None, path, "plain", &other).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(app.mock().calls(), 1);

    // While the first is still at the provider, a repeat is refused.
    app.mock().update(|b| b.latency = Duration::from_secs(2));
    let slow = tokio::spawn({
        let (client, url, body) = (app.client.clone(), app.url(path), body.clone());
        async move {
            client
                .post(url)
                .header("idempotency-key", "slow")
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    });
    eventually("the slow call to reach the mock", || async {
        (app.mock().calls() == 2).then_some(())
    })
    .await;
    assert_error(
        post_keyed(&app, None, path, "slow", &body).await,
        409,
        "idempotency_in_flight",
    )
    .await;
    assert_eq!(slow.await.unwrap().status(), 200);
    app.mock().update(|b| b.latency = Duration::ZERO);
    let replayed = post_keyed(&app, None, path, "slow", &body).await;
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(app.mock().calls(), 2);

    // A failure is not kept: the same key runs again.
    app.mock().push_fault(Fault::Status(400));
    let failed = post_keyed(&app, None, path, "fails", &body).await;
    assert_eq!(failed.status(), 400);
    let failed: Value = failed.json().await.unwrap();
    assert_eq!(failed["error"]["message"], "mock: injected status 400");
    assert_eq!(app.mock().calls(), 3);
    let retried = post_keyed(&app, None, path, "fails", &body).await;
    assert_eq!(retried.status(), 200);
    assert!(retried.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.mock().calls(), 4);

    // A key no store would take.
    let long = "k".repeat(300);
    assert_error(
        post_keyed(&app, None, path, &long, &body).await,
        400,
        "invalid_idempotency_key",
    )
    .await;
    assert_eq!(app.mock().calls(), 4);
}

/// The key of a failed request is free as soon as the client has seen the
/// failure: the retry runs instead of meeting a 409. (Repeated because the
/// key used to be freed in the background, which a quick retry could beat.)
#[tokio::test]
async fn a_keyed_completion_that_failed_frees_its_key_before_answering() {
    let app = spawn().await;
    let path = "/v1/chat/completions";
    let plain = chat_body(MODEL).to_string();
    let streamed = stream_body(MODEL, false).to_string();
    for i in 0..20 {
        let key = format!("failed-{i}");
        app.mock().push_fault(Fault::Status(400));
        let failed = post_keyed(&app, None, path, &key, &plain).await;
        assert_eq!(failed.status(), 400);
        let retried = post_keyed(&app, None, path, &key, &plain).await;
        assert_eq!(retried.status(), 200, "retry {i}");
        assert!(retried.headers().get("idempotent-replayed").is_none());

        let key = format!("cut-{i}");
        app.mock().push_fault(Fault::ResetAfterChunks(2));
        let cut = post_keyed(&app, None, path, &key, &streamed).await;
        let text = cut.text().await.unwrap();
        assert!(
            text.contains("upstream_broken") && !text.contains("[DONE]"),
            "{text}"
        );
        let retried = post_keyed(&app, None, path, &key, &streamed).await;
        assert_eq!(retried.status(), 200);
        assert!(retried.headers().get("idempotent-replayed").is_none());
        let text = retried.text().await.unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "retry {i}: {text}");
    }
    assert_eq!(app.mock().calls(), 80);
}

#[tokio::test]
async fn a_keyed_message_refused_before_anything_was_stored_does_not_hold_its_key() {
    // A refusal stores nothing and frees the key before answering (the
    // engine awaits the release), so repeating the request is refused the
    // same way, never with 409. Freeing in the background instead left a
    // window too small to reproduce here reliably; this checks the key is
    // never kept.
    let app = spawn().await;
    let sid = new_session(&app).await;
    let path = format!("/v1/sessions/{sid}/messages");
    let blank = json!({"content": "   "}).to_string();
    for i in 0..20 {
        let key = format!("refused-{i}");
        let refused = post_keyed(&app, None, &path, &key, &blank).await;
        assert_native(refused, 400, "invalid_request").await;
        // The same request again: refused the same way, not 409 in flight.
        let again = post_keyed(&app, None, &path, &key, &blank).await;
        assert_native(again, 400, "invalid_request").await;
    }
    assert_eq!(app.mock().calls(), 0);
    assert!(messages(&app, &sid).await.is_empty());
}

const ADMIN: &str = "bootstrap-admin-key-0123456789abcdef0123456789";

#[tokio::test]
async fn idempotency_keys_are_per_tenant() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let mut keys = Vec::new();
    for t in ["tenant-a", "tenant-b"] {
        created(
            req(
                &app,
                reqwest::Method::POST,
                "/v1/admin/tenants",
                Some(ADMIN),
            )
            .json(&json!({"id": t}))
            .send()
            .await
            .unwrap(),
        )
        .await;
        let k = created(
            req(&app, reqwest::Method::POST, "/v1/admin/keys", Some(ADMIN))
                .json(&json!({"name": format!("svc@{t}"), "role": "service", "tenant_id": t}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        keys.push(k["key"].as_str().unwrap().to_owned());
    }
    let (a, b) = (Some(keys[0].as_str()), Some(keys[1].as_str()));
    let body = chat_body(MODEL).to_string();
    let path = "/v1/chat/completions";

    let first = post_keyed(&app, a, path, "shared-key", &body).await;
    assert_eq!(first.status(), 200);
    let replay = post_keyed(&app, a, path, "shared-key", &body).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let other_tenant = post_keyed(&app, b, path, "shared-key", &body).await;
    assert_eq!(other_tenant.status(), 200);
    assert!(other_tenant.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.mock().calls(), 2);

    // Sessions: the key of tenant A's message is free in tenant B.
    let sa = new_session_as(&app, a).await;
    let sb = new_session_as(&app, b).await;
    let msg = r#"{"content":"Say hello"}"#;
    let in_a = post_keyed(
        &app,
        a,
        &format!("/v1/sessions/{sa}/messages"),
        "msg-key",
        msg,
    )
    .await;
    let frames = Frames::new(in_a).rest().await;
    assert_eq!(frames.last().unwrap().event, "chat.done");
    let in_b = post_keyed(
        &app,
        b,
        &format!("/v1/sessions/{sb}/messages"),
        "msg-key",
        msg,
    )
    .await;
    assert!(in_b.headers().get("idempotent-replayed").is_none());
    let frames = Frames::new(in_b).rest().await;
    assert_eq!(frames.last().unwrap().event, "chat.done");
    assert_eq!(app.mock().calls(), 4);
    // …while in tenant A, another session with it is another request.
    let sa2 = new_session_as(&app, a).await;
    let reused = post_keyed(
        &app,
        a,
        &format!("/v1/sessions/{sa2}/messages"),
        "msg-key",
        msg,
    )
    .await;
    assert_native(reused, 422, "idempotency_key_reused").await;
}

/// Within a tenant, a key is its caller's: another user sending the same
/// key and body neither gets the first user's stored response (built from
/// their history) nor learns that the key is taken.
#[tokio::test]
async fn idempotency_keys_are_per_user_within_a_tenant() {
    let app = app().env("SWITCHYARD_ADMIN_KEY", ADMIN).spawn().await;
    let svc = created(
        req(&app, reqwest::Method::POST, "/v1/admin/keys", Some(ADMIN))
            .json(&json!({"name": "svc", "role": "service"}))
            .send()
            .await
            .unwrap(),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let as_user = |user: &str, path: &str, key: &str, body: &str| {
        req(&app, reqwest::Method::POST, path, Some(&svc))
            .header("x-switchyard-user", user)
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    let body = chat_body(MODEL).to_string();
    let path = "/v1/chat/completions";
    let first = as_user("alice", path, "same-key", &body).await.unwrap();
    assert_eq!(first.status(), 200);
    let bob = as_user("bob", path, "same-key", &body).await.unwrap();
    assert_eq!(bob.status(), 200);
    assert!(bob.headers().get("idempotent-replayed").is_none());
    assert_eq!(app.mock().calls(), 2, "bob's request ran");
    for user in ["alice", "bob"] {
        let again = as_user(user, path, "same-key", &body).await.unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true", "{user}");
    }
    assert_eq!(app.mock().calls(), 2);

    // A session message: u1's reply is not replayed to u2 (a user key,
    // which may not see u1's session and gets its 404).
    let mut user_keys = Vec::new();
    for user in ["u1", "u2"] {
        let k = created(
            req(&app, reqwest::Method::POST, "/v1/admin/keys", Some(ADMIN))
                .json(&json!({"name": user, "role": "user", "user_id": user}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        user_keys.push(k["key"].as_str().unwrap().to_owned());
    }
    let sid = new_session_as(&app, Some(&svc)).await;
    let path = format!("/v1/sessions/{sid}/messages");
    let msg = r#"{"content":"Say hello"}"#;
    let (u1, u2) = (Some(user_keys[0].as_str()), Some(user_keys[1].as_str()));
    let mine = post_keyed(&app, u1, &path, "msg-key", msg).await;
    assert_eq!(
        Frames::new(mine).rest().await.last().unwrap().event,
        "chat.done"
    );
    let theirs = post_keyed(&app, u2, &path, "msg-key", msg).await;
    assert!(theirs.headers().get("idempotent-replayed").is_none());
    assert_native(theirs, 404, "not_found").await;
    let again = post_keyed(&app, u1, &path, "msg-key", msg).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(app.mock().calls(), 3);
}

// ---- 3. Concurrent state patches ----

async fn patch_state(
    app: &TestApp,
    sid: &str,
    patch: Value,
    if_match: Option<i64>,
) -> reqwest::Response {
    let mut r = app
        .client
        .patch(app.url(&format!("/v1/sessions/{sid}/state")))
        .json(&patch);
    if let Some(v) = if_match {
        r = r.header("if-match", format!("\"{v}\""));
    }
    r.send().await.unwrap()
}

async fn concurrent_patches_lose_nothing_and_one_compare_and_set_wins(app: TestApp) {
    let sid = new_session(&app).await;

    let patches = (0..200).map(|i| patch_state(&app, &sid, json!({format!("k{i}"): i}), None));
    let results = join_all(patches).await;

    let mut versions = HashSet::new();
    for r in results {
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(versions.insert(body["version"].as_i64().unwrap()), "{body}");
    }
    assert_eq!(versions, (1..=200).collect::<HashSet<i64>>());
    let got = app
        .client
        .get(app.url(&format!("/v1/sessions/{sid}/state")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.headers()["etag"], "\"200\"");
    let got: Value = got.json().await.unwrap();
    assert_eq!(got["version"], 200);
    let state = got["state"].as_object().unwrap();
    assert_eq!(state.len(), 200);
    assert!((0..200).all(|i| state[&format!("k{i}")] == i));

    // Compare-and-set: twenty writers who all read version 200.
    let racers = (0..20).map(|i| patch_state(&app, &sid, json!({"winner": i}), Some(200)));
    let mut winners = Vec::new();
    let mut losers = 0;
    for r in join_all(racers).await {
        if r.status() == 200 {
            winners.push(r.json::<Value>().await.unwrap());
        } else {
            let body = assert_native(r, 412, "version_mismatch").await;
            assert_eq!(body["error"]["details"]["current_version"], 201);
            losers += 1;
        }
    }
    assert_eq!((winners.len(), losers), (1, 19));
    assert_eq!(winners[0]["version"], 201);
    let got = get_json(&app, &format!("/v1/sessions/{sid}/state")).await;
    assert_eq!(got["version"], 201);
    assert_eq!(got["state"]["winner"], winners[0]["state"]["winner"]);
    assert_eq!(got["state"].as_object().unwrap().len(), 201);
}

#[tokio::test]
async fn sqlite_concurrent_state_patches_lose_nothing_and_one_compare_and_set_wins() {
    concurrent_patches_lose_nothing_and_one_compare_and_set_wins(spawn().await).await;
}

#[tokio::test]
async fn postgres_concurrent_state_patches_lose_nothing_and_one_compare_and_set_wins() {
    let Some(pg) = pg_url() else { return };
    concurrent_patches_lose_nothing_and_one_compare_and_set_wins(app().postgres(&pg).spawn().await)
        .await;
}

// ---- 4. Resume ----

fn events_path(sid: &str, mid: &str) -> String {
    format!("/v1/sessions/{sid}/messages/{mid}/events")
}

async fn follow(app: &TestApp, sid: &str, mid: &str, last_id: &str) -> reqwest::Response {
    app.client
        .get(app.url(&events_path(sid, mid)))
        .header("last-event-id", last_id)
        .send()
        .await
        .unwrap()
}

/// The second connection continues the first: no id twice, none missing,
/// and the deltas of both make the stored message.
async fn assert_continues(app: &TestApp, sid: &str, seen: &[Frame], rest: &[Frame]) {
    let all: Vec<Frame> = seen.iter().chain(rest).cloned().collect();
    assert_well_formed(&all);
    assert_eq!(all.last().unwrap().event, "chat.done");
    let m = assistant(app, sid).await;
    assert_eq!(m["status"], "complete");
    assert_eq!(m["content"], format!("{}{}", deltas(seen), deltas(rest)));
    assert_eq!(all.last().unwrap().json()["content"], m["content"]);
}

#[tokio::test]
async fn a_client_that_reconnects_after_a_few_deltas_misses_nothing_and_sees_nothing_twice() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    app.mock().update(|b| {
        b.reply = "one two three four five six seven eight nine ten".into();
        b.chunk_delay = Duration::from_millis(150);
    });

    let mut first = Frames::new(send_message(&app, &sid, "Count").await);
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|f: &&Frame| f.event == "chat.delta")
        .count()
        < 3
    {
        seen.push(first.next().await.unwrap());
    }
    drop(first);
    let mid = seen[0].json()["message_id"].as_str().unwrap().to_owned();
    let last = seen.last().unwrap().id;
    let rest = Frames::new(follow(&app, &sid, &mid, &last.to_string()).await)
        .rest()
        .await;

    assert_eq!(rest[0].id, last + 1);
    assert_continues(&app, &sid, &seen, &rest).await;
    assert_eq!(deltas(&rest).split_whitespace().count(), 7);
}

#[tokio::test]
async fn a_client_that_reconnects_while_the_provider_is_paused_follows_the_live_reply() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    app.mock().hold_streams();

    let mut first = Frames::new(send_message(&app, &sid, "Say hello").await);
    let ready = first.next().await.unwrap();
    drop(first);
    let mid = ready.json()["message_id"].as_str().unwrap().to_owned();
    // Still held: this connection can only be following the live reply.
    let mut second = Frames::new(follow(&app, &sid, &mid, "1").await);
    assert_eq!(assistant(&app, &sid).await["status"], "streaming");
    app.mock().release_streams();
    let rest = second.rest().await;

    assert_continues(&app, &sid, &[ready], &rest).await;
    assert_eq!(deltas(&rest), REPLY);
}

#[tokio::test]
async fn a_finished_reply_is_replayed_from_the_store_from_any_id() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    let whole = send_message(&app, &sid, "Say hello")
        .await
        .text()
        .await
        .unwrap();
    let frames = parse_frames(&whole);
    let mid = frames[0].json()["message_id"].as_str().unwrap().to_owned();

    let from_zero = follow(&app, &sid, &mid, "0").await.text().await.unwrap();
    assert_eq!(from_zero, whole);
    let after_three = Frames::new(follow(&app, &sid, &mid, "3").await)
        .rest()
        .await;
    assert_eq!(after_three, frames[3..]);
    assert_continues(&app, &sid, &frames[..3], &after_three).await;
    // Without the header, from the start; the query parameter works too.
    let plain = get_text(&app, &events_path(&sid, &mid)).await;
    assert_eq!(plain, whole);
    let by_query = get_text(
        &app,
        &format!("{}?last_event_id=8", events_path(&sid, &mid)),
    )
    .await;
    assert_eq!(parse_frames(&by_query), frames[8..]);
    // After the last frame there is nothing more.
    let last = frames.last().unwrap().id.to_string();
    assert_eq!(
        follow(&app, &sid, &mid, &last).await.text().await.unwrap(),
        ""
    );
}

#[tokio::test]
async fn resuming_refuses_bad_ids_and_other_sessions_messages() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    let whole = send_message(&app, &sid, "Say hello")
        .await
        .text()
        .await
        .unwrap();
    let frames = parse_frames(&whole);
    let mid = frames[0].json()["message_id"].as_str().unwrap().to_owned();
    let other = new_session(&app).await;
    let user_mid = messages(&app, &sid).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    assert_native(
        follow(&app, &sid, &mid, "abc").await,
        400,
        "invalid_request",
    )
    .await;
    assert_native(follow(&app, &sid, &mid, "-1").await, 400, "invalid_request").await;
    assert_native(follow(&app, &other, &mid, "0").await, 404, "not_found").await;
    assert_native(follow(&app, &sid, &user_mid, "0").await, 404, "not_found").await;
    assert_native(
        follow(&app, &sid, "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "0").await,
        404,
        "not_found",
    )
    .await;
    assert_native(
        follow(&app, "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", &mid, "0").await,
        404,
        "not_found",
    )
    .await;
}

/// Instances `a` and `b` on one SQLite file; `b` with Redis, `a` too when
/// `a_mirrors`. `None` when no test Redis is configured.
async fn two_instances(a_mirrors: bool) -> Option<(TestApp, TestApp)> {
    let redis = test_redis_url()?;
    let mut a = app().config("[sessions]\ninstance_id = \"a\"\n");
    if a_mirrors {
        a = a.env("SWITCHYARD_RATE_LIMITS__REDIS_URL", &redis);
    }
    let a = a.spawn().await;
    let b = app()
        .store_url(&a.store_url)
        .env("SWITCHYARD_RATE_LIMITS__REDIS_URL", &redis)
        .config("[sessions]\ninstance_id = \"b\"\n")
        .spawn()
        .await;
    Some((a, b))
}

/// Sends a message to `app`, reads `ready` and the first delta, and goes
/// away; returns those frames and the assistant message's id.
async fn ready_and_a_delta_then_gone(app: &TestApp, sid: &str) -> (Vec<Frame>, String) {
    let mut first = Frames::new(send_message(app, sid, "Count").await);
    let seen = vec![first.next().await.unwrap(), first.next().await.unwrap()];
    assert_eq!(seen[1].event, "chat.delta");
    let mid = seen[0].json()["message_id"].as_str().unwrap().to_owned();
    (seen, mid)
}

/// With Redis, an instance that is not generating a reply follows it live
/// (the generating one mirrors its frames there): a client that reconnects
/// to any instance of a deployment sees the deltas as they are made, not
/// only once the reply is stored.
#[tokio::test]
async fn a_client_that_reconnects_to_another_instance_follows_the_reply_live() {
    let Some((a, b)) = two_instances(true).await else {
        return;
    };
    let sid = new_session(&a).await;
    let words = "one two three four five six seven eight nine ten";
    a.mock().update(|m| {
        m.reply = words.into();
        m.chunk_delay = Duration::from_millis(200);
    });

    let (seen, mid) = ready_and_a_delta_then_gone(&a, &sid).await;

    let mut second = Frames::new(follow(&b, &sid, &mid, "2").await);
    let next = second.next().await.unwrap();
    assert_eq!((next.id, next.event.as_str()), (3, "chat.delta"));
    // A delta before the reply is stored: B is following it live.
    assert_eq!(assistant(&b, &sid).await["status"], "streaming");
    let mut rest = vec![next];
    rest.extend(second.rest().await);

    assert_continues(&b, &sid, &seen, &rest).await;
    assert_eq!(format!("{}{}", deltas(&seen), deltas(&rest)), words);
    assert_eq!(b.mock().calls(), 0);
}

/// A follower with Redis whose reply is generated by an instance that does
/// not mirror it (no Redis there) finds nothing in the stream, and finishes
/// from the stored frames once the reply ends: nothing missed or repeated.
#[tokio::test]
async fn a_follower_finds_no_mirror_and_finishes_from_the_store() {
    let Some((a, b)) = two_instances(false).await else {
        return;
    };
    let sid = new_session(&a).await;
    a.mock().update(|m| {
        m.reply = "one two three four five six".into();
        m.chunk_delay = Duration::from_millis(300);
    });
    let (seen, mid) = ready_and_a_delta_then_gone(&a, &sid).await;

    let rest = Frames::new(follow(&b, &sid, &mid, "2").await).rest().await;
    assert_eq!(rest[0].id, 3);
    assert_continues(&b, &sid, &seen, &rest).await;
}

// ---- 5. Disconnect ----

#[tokio::test]
async fn a_reply_whose_client_went_away_still_completes_and_is_stored() {
    let app = spawn().await;
    let sid = new_session(&app).await;
    let reply = "one two three four five six seven eight nine ten";
    app.mock().update(|b| {
        b.reply = reply.into();
        b.chunk_delay = Duration::from_millis(100);
    });

    let mut frames = Frames::new(send_message(&app, &sid, "Count").await);
    let ready = frames.next().await.unwrap();
    assert_eq!(ready.event, "ready");
    drop(frames);

    let m = eventually("the reply to be stored", || async {
        let m = assistant(&app, &sid).await;
        (m["status"] != "streaming").then_some(m)
    })
    .await;
    assert_eq!(m["status"], "complete");
    assert_eq!(m["content"], reply);
    assert_eq!(m["finish_reason"], "stop");
    assert_eq!(m["usage"]["completion_tokens"], 10);
    assert!(m["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(m["cost_usd"].as_f64().unwrap() > 0.0);
    assert!(m["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(app.mock().calls(), 1);
}

// ---- 6. SIGKILL ----

#[tokio::test]
async fn a_reply_cut_by_sigkill_is_marked_interrupted_at_the_next_start() {
    const INSTANCE: &str = "[sessions]\ninstance_id = \"it\"\n";
    let mut first = app().config(INSTANCE).spawn().await;
    let sid = new_session(&first).await;
    first.mock().update(|b| {
        b.reply = "word ".repeat(100);
        b.chunk_delay = Duration::from_millis(200);
    });
    let mut frames = Frames::new(send_message(&first, &sid, "Talk").await);
    let ready = frames.next().await.unwrap();
    let delta = frames.next().await.unwrap();
    assert_eq!(
        (ready.event.as_str(), delta.event.as_str()),
        ("ready", "chat.delta")
    );
    let mid = ready.json()["message_id"].as_str().unwrap().to_owned();
    assert_eq!(assistant(&first, &sid).await["status"], "streaming");

    first.kill_hard().await;
    drop(frames);
    let second = app()
        .store_url(&first.store_url)
        .config(INSTANCE)
        .spawn()
        .await;

    let all = messages(&second, &sid).await;
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|m| m["status"] != "streaming"), "{all:#?}");
    assert_eq!(all[0]["status"], "complete");
    let m = &all[1];
    assert_eq!(m["id"], mid);
    assert_eq!(m["status"], "failed");
    assert_eq!(m["error"]["code"], "interrupted");
    let replay = Frames::new(follow(&second, &sid, &mid, "2").await)
        .rest()
        .await;
    let last = replay.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.id, 3);
    assert_eq!(last.json()["code"], "interrupted");
    assert!(replay.iter().all(|f| f.event != "chat.done"));
    assert!(second
        .wait_for_log(|l| l.contains("marked failed (interrupted)"))
        .await
        .is_some());
}
