//! Usage rows: one per model request, written without making requests wait,
//! and flushed on graceful shutdown.

use std::time::Duration;

use futures::future::join_all;
use serde_json::Value;
use switchyard_testkit::{Fault, TestApp};

use crate::helpers::*;
use crate::ops::pg_url;

/// Sends `n` requests (a third streamed, one in ten to an unknown model)
/// concurrently and returns how many completed with a model call.
async fn load(app: &TestApp, n: usize) -> u64 {
    let futures = (0..n).map(|i| async move {
        let body = match i % 10 {
            0 => chat_body("no-such-model"),
            1 | 4 | 7 => stream_body("gpt-4o-mini", i % 2 == 0),
            _ => chat_body("gpt-4o-mini"),
        };
        let resp = app.post_json("/v1/chat/completions", &body).await;
        let ok = resp.status() == 200;
        let text = resp.text().await.unwrap();
        if ok && body["stream"] == true {
            assert!(text.ends_with("data: [DONE]\n\n"));
        }
        u64::from(ok)
    });
    join_all(futures).await.into_iter().sum()
}

/// How the server is asked to stop.
#[derive(Clone, Copy)]
enum Stop {
    Term,
    /// ctrl-c in a terminal.
    Int,
}

async fn graceful_shutdown_keeps_exactly_one_row_per_completed_request(
    mut app: TestApp,
    stop: Stop,
) {
    let completed = load(&app, 300).await;
    assert_eq!(completed, 270);

    let status = match stop {
        Stop::Term => app.stop_gracefully().await,
        Stop::Int => app.interrupt().await,
    };

    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        app.logs().join("\n")
    );
    let store = app_store(&app).await;
    assert_eq!(store.count_usage("default").await.unwrap(), completed);
    let rows = store.list_usage("default", 1000).await.unwrap();
    let ids: std::collections::HashSet<_> = rows.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids.len(), rows.len(), "no duplicate rows");
    assert!(rows
        .iter()
        .all(|r| r.status == 200 && r.model_alias == "gpt-4o-mini" && r.provider == "mock"));
    assert!(app
        .logs()
        .iter()
        .any(|l| l.contains("usage writer flushed")));
}

#[tokio::test]
async fn sqlite_graceful_shutdown_keeps_exactly_one_row_per_completed_request() {
    // A long flush interval: rows are still queued when SIGTERM arrives.
    let app = app()
        .env("SWITCHYARD_USAGE__FLUSH_INTERVAL_MS", "5000")
        .spawn()
        .await;
    graceful_shutdown_keeps_exactly_one_row_per_completed_request(app, Stop::Term).await;
}

#[tokio::test]
async fn sqlite_ctrl_c_keeps_exactly_one_row_per_completed_request() {
    let app = app()
        .env("SWITCHYARD_USAGE__FLUSH_INTERVAL_MS", "5000")
        .spawn()
        .await;
    graceful_shutdown_keeps_exactly_one_row_per_completed_request(app, Stop::Int).await;
}

#[tokio::test]
async fn postgres_graceful_shutdown_keeps_exactly_one_row_per_completed_request() {
    let Some(pg) = pg_url() else { return };
    let app = app()
        .postgres(&pg)
        .env("SWITCHYARD_USAGE__FLUSH_INTERVAL_MS", "5000")
        .spawn()
        .await;
    graceful_shutdown_keeps_exactly_one_row_per_completed_request(app, Stop::Term).await;
}

#[tokio::test]
async fn a_stream_in_flight_at_shutdown_completes_and_is_recorded() {
    let mut app = spawn().await;
    app.mock().hold_streams();
    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap().unwrap();

    app.mock().release_streams();
    let stop = tokio::spawn({
        let pid = app.pid();
        async move {
            std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .unwrap()
        }
    });
    let mut last = String::new();
    while let Some(d) = reader.next().await.unwrap() {
        last = d;
    }
    stop.await.unwrap();
    let status = app.wait_exit().await;

    assert_eq!(last, "[DONE]");
    assert!(status.success());
    assert_eq!(
        app_store(&app).await.count_usage("default").await.unwrap(),
        1
    );
}

/// Calls still running when the grace period ends are stopped, not cut:
/// a stream ends with an error event saying why, a call waiting on its
/// provider answers 503, and each writes its usage row before the exit.
#[tokio::test]
async fn calls_still_running_after_the_grace_period_are_stopped_and_recorded() {
    let mut app = app()
        .env("SWITCHYARD_SERVER__SHUTDOWN_GRACE_SECS", "1")
        .spawn()
        .await;
    app.mock().hold_streams();
    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", true))
        .await;
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap().unwrap();
    app.mock().push_fault(Fault::Hang);
    let waiting = tokio::spawn({
        let (url, body) = (app.url("/v1/chat/completions"), chat_body("gpt-4o-mini"));
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    });
    while app.mock().requests().len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let pid = app.pid();
    std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let mut last = String::new();
    while let Some(d) = reader.next().await.unwrap() {
        last = d;
    }
    let (status, body) = waiting.await.unwrap();
    let exit = app.wait_exit().await;

    let last: Value = serde_json::from_str(&last).unwrap();
    assert_eq!(last["error"]["code"], "server_shutdown", "{last}");
    assert_eq!(last["error"]["type"], "server_error");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "server_shutdown");
    assert!(exit.success());
    let rows = usage_rows(&app).await;
    let mut seen: Vec<_> = rows
        .iter()
        .map(|r| (r.stream, r.status, r.error_code.as_deref(), r.prompt_tokens))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (false, 503, Some("server_shutdown"), Some(6)),
            (true, 503, Some("server_shutdown"), Some(6)),
        ]
    );
}

#[tokio::test]
async fn a_usage_row_records_tokens_cost_latency_and_ttft() {
    let mut app = spawn().await;

    let resp = chat_with_traceparent(
        &app,
        &stream_body("gpt-4o-mini", false),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    .await;
    resp.text().await.unwrap();
    app.stop_gracefully().await;

    let rows = usage_rows(&app).await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!((r.endpoint.as_str(), r.stream), ("chat", true));
    assert_eq!(r.upstream_model, "gpt-4o-mini-upstream");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(5), Some(7)));
    assert_eq!((r.cached_tokens, r.cache_write_tokens), (Some(0), Some(0)));
    // 5 × 0.15 + 7 × 0.60 dollars per million tokens
    let expected = (5.0 * 0.15 + 7.0 * 0.60) / 1e6;
    assert!(
        (r.cost_usd.unwrap() - expected).abs() < 1e-15,
        "{:?}",
        r.cost_usd
    );
    assert!(r.ttft_ms.unwrap() <= r.latency_ms);
    assert_eq!((r.status, r.error_code.as_deref()), (200, None));
}

/// A client that reads a stream's first chunk and goes away (the mock holds
/// the rest until then).
async fn abandon_a_stream(app: &TestApp) {
    app.mock().hold_streams();
    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;
    let mut reader = SseReader::new(resp);
    reader.next().await.unwrap().unwrap();
    drop(reader);
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.mock().release_streams();
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn failed_and_abandoned_requests_are_recorded_with_their_outcome() {
    let mut app = spawn().await;
    app.mock().update(|b| b.always = Some(Fault::Status(503)));
    app.post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await
        .text()
        .await
        .unwrap();
    app.mock().update(|b| b.always = None);
    // A client that goes away mid-stream.
    abandon_a_stream(&app).await;

    app.stop_gracefully().await;

    let mut rows = usage_rows(&app).await;
    rows.sort_by_key(|r| r.status);
    let outcomes: Vec<(u16, Option<&str>)> = rows
        .iter()
        .map(|r| (r.status, r.error_code.as_deref()))
        .collect();
    assert_eq!(
        outcomes,
        [(499, Some("client_closed")), (502, Some("upstream_status"))]
    );
}

/// A client that leaves while the provider is still being asked (a call
/// not streamed, or a stream before its first chunk) still leaves its row:
/// the provider was asked, so the request counts and is charged its prompt,
/// to the deployment that was asked.
#[tokio::test]
async fn requests_left_before_the_answer_are_recorded_with_an_estimated_prompt() {
    let mut app = spawn().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let embed =
        serde_json::json!({"model": "text-embedding-3-small", "input": ["abcdefgh", "xyz"]});
    for (path, body) in [
        ("/v1/chat/completions", chat_body("gpt-4o-mini")),
        ("/v1/chat/completions", stream_body("gpt-4o-mini", true)),
        ("/v1/embeddings", embed),
    ] {
        app.mock().push_fault(Fault::Hang);
        let sent = client.post(app.url(path)).json(&body).send().await;
        assert!(sent.is_err_and(|e| e.is_timeout()), "{path}");
    }
    // The server notices each departure on its own read of the socket.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.mock().requests().len() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.stop_gracefully().await;

    let mut rows = usage_rows(&app).await;
    rows.sort_by_key(|r| (r.endpoint.clone(), r.stream));
    let seen = outcomes(&rows);
    // "Say hello": 9 bytes, 3 tokens, plus 3 for the message; the inputs
    // "abcdefgh" and "xyz": 2 tokens and 1.
    assert_eq!(
        seen,
        [
            ("chat", false, 499, Some("client_closed"), Some(6), Some(0)),
            ("chat", true, 499, Some("client_closed"), Some(6), Some(0)),
            (
                "embeddings",
                false,
                499,
                Some("client_closed"),
                Some(3),
                Some(0)
            ),
        ]
    );
    // Charged to the deployment asked, at its prices (budgets sum the
    // cost): 6 prompt tokens at $0.15 per million.
    for r in &rows {
        assert_eq!(r.provider, "mock", "{r:?}");
        let model = if r.endpoint == "chat" {
            "gpt-4o-mini-upstream"
        } else {
            "embed-upstream"
        };
        assert_eq!(r.upstream_model, model, "{r:?}");
    }
    assert_eq!(rows[0].cost_usd, Some(6.0 * 0.15 / 1e6));
    assert_eq!(rows[1].cost_usd, Some(6.0 * 0.15 / 1e6));
    assert_eq!(rows[2].cost_usd, None, "no price for the embedding model");
}

/// Each row's endpoint, stream, status, error code and token counts.
#[expect(
    clippy::type_complexity,
    reason = "a row's outcome, compared as a tuple"
)]
fn outcomes(
    rows: &[switchyard_core::usage::UsageRecord],
) -> Vec<(&str, bool, u16, Option<&str>, Option<u64>, Option<u64>)> {
    rows.iter()
        .map(|r| {
            (
                r.endpoint.as_str(),
                r.stream,
                r.status,
                r.error_code.as_deref(),
                r.prompt_tokens,
                r.completion_tokens,
            )
        })
        .collect()
}

/// A stream that ends before its usage chunk is still charged: the
/// provider bills what it generated, and closing a stream early must not be
/// a way around budgets and token limits. Its row carries estimates.
#[tokio::test]
async fn a_stream_that_ends_early_is_charged_estimated_tokens() {
    let mut app = spawn().await;
    // Cut by the provider after the role chunk and three chunks of text
    // ("Hello!", " How", " can": 14 bytes).
    app.mock().push_fault(Fault::ResetAfterChunks(4));
    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", true))
        .await;
    let body = resp.text().await.unwrap();
    assert!(body.contains("\"error\""), "{body}");
    // Left by the client after the role chunk.
    abandon_a_stream(&app).await;
    app.stop_gracefully().await;

    let mut rows = usage_rows(&app).await;
    rows.sort_by_key(|r| r.status);
    let tokens: Vec<(u16, Option<u64>, Option<u64>)> = rows
        .iter()
        .map(|r| (r.status, r.prompt_tokens, r.completion_tokens))
        .collect();
    // "Say hello": 9 bytes, 3 tokens, plus 3 for the message. The cut
    // stream's 14 bytes of text: 4 tokens. The left stream: no text yet.
    assert_eq!(tokens, [(499, Some(6), Some(0)), (502, Some(6), Some(4))]);
    let expected = (6.0 * 0.15 + 4.0 * 0.60) / 1e6;
    assert!((rows[1].cost_usd.unwrap() - expected).abs() < 1e-15);
    assert!(rows[0].cost_usd.unwrap() > 0.0);
}

/// Whole answers from a server that sends no usage are charged estimates
/// too, as streams are: never free.
#[tokio::test]
async fn whole_answers_without_usage_are_charged_estimated_tokens() {
    let mut app = spawn().await;
    app.mock().update(|b| b.omit_usage = true);
    let chat = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(chat.status(), 200);
    let answer: serde_json::Value = chat.json().await.unwrap();
    assert!(answer.get("usage").is_none(), "{answer}");
    let embed = serde_json::json!({"model": "text-embedding-3-small", "input": "abcdefgh"});
    assert_eq!(app.post_json("/v1/embeddings", &embed).await.status(), 200);
    app.stop_gracefully().await;

    let mut rows = usage_rows(&app).await;
    rows.sort_by_key(|r| r.endpoint.clone());
    let seen: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.endpoint.as_str(),
                r.status,
                r.prompt_tokens,
                r.completion_tokens,
            )
        })
        .collect();
    // "Say hello": 6 tokens with the message's 3; the mock's reply
    // "Hello! How can I help you today?" (32 bytes): 8. "abcdefgh": 2.
    assert_eq!(
        seen,
        [
            ("chat", 200, Some(6), Some(8)),
            ("embeddings", 200, Some(2), Some(0))
        ]
    );
    assert!(rows[0].cost_usd.unwrap() > 0.0);
}

/// Shapes of OpenAI-compatible servers: a `usage` that is not an object
/// is no usage (estimated; it was a 502, and the generated answer was
/// asked for again); an embeddings `usage` with only `total_tokens` is the
/// prompt (it was charged 0); a usage chunk without `choices` is usage
/// (it reached a client that had not asked for it, whose `for choice in
/// chunk.choices` fails on it); an error in a stream after its first
/// chunk is recorded with the status it has before one (a 400, not 502).
#[tokio::test]
async fn odd_usage_shapes_and_a_streamed_400_are_recorded_as_they_are() {
    let mut app = spawn().await;
    let completion = r#"{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"abcdefgh"},"finish_reason":"stop"}],"usage":"n/a"}"#;
    app.mock().push_fault(Fault::Raw(completion.into()));
    let chat = app
        .post_json("/v1/chat/completions", &chat_body("gpt-4o-mini"))
        .await;
    assert_eq!(chat.status(), 200);
    assert_eq!(chat.text().await.unwrap(), completion);
    assert_eq!(app.mock().requests().len(), 1, "not asked again");

    let embeddings = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5]}],"model":"e","usage":{"total_tokens":42}}"#;
    app.mock().push_fault(Fault::Raw(embeddings.into()));
    let embed = serde_json::json!({"model": "text-embedding-3-small", "input": "abcdefgh"});
    assert_eq!(app.post_json("/v1/embeddings", &embed).await.status(), 200);

    let chunk = |delta: &str| {
        format!(
            r#"data: {{"id":"c2","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{delta},"finish_reason":null}}]}}"#
        )
    };
    let usage_alone = r#"data: {"id":"c2","object":"chat.completion.chunk","created":1,"model":"m","usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#;
    let stream = format!(
        "{}\n\n{}\n\n{usage_alone}\n\ndata: [DONE]\n\n",
        chunk(r#"{"role":"assistant","content":"Hi"}"#),
        chunk("{}").replace("null}]", "\"stop\"}]"),
    );
    app.mock().push_fault(Fault::Raw(stream));
    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;
    let text = resp.text().await.unwrap();
    assert!(!text.contains("usage"), "not asked for: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    let failing = format!(
        "{}\n\ndata: {{\"error\":{{\"message\":\"This content is not allowed.\",\"type\":\"invalid_request_error\",\"code\":400}}}}\n\ndata: [DONE]\n\n",
        chunk(r#"{"role":"assistant","content":"Hi"}"#)
    );
    app.mock().push_fault(Fault::Raw(failing));
    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", true))
        .await;
    let text = resp.text().await.unwrap();
    assert!(text.contains("This content is not allowed."), "{text}");
    app.stop_gracefully().await;

    let rows = usage_rows(&app).await;
    let mut seen = outcomes(&rows);
    seen.sort();
    // The completion estimated: "Say hello" 6 tokens, "abcdefgh" 2; the
    // failed stream "Hi" after the same prompt.
    assert_eq!(
        seen,
        [
            ("chat", false, 200, None, Some(6), Some(2)),
            ("chat", true, 200, None, Some(7), Some(5)),
            ("chat", true, 400, Some("upstream_status"), Some(6), Some(1)),
            ("embeddings", false, 200, None, Some(42), Some(0)),
        ]
    );
}

/// A complete stream from a server that ignores `stream_options` (no usage
/// chunk) is charged estimates too.
#[tokio::test]
async fn a_complete_stream_without_usage_is_charged_estimated_tokens() {
    let mut app = spawn().await;
    app.mock().update(|b| b.ignore_stream_options = true);
    let body = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    app.stop_gracefully().await;
    let rows = usage_rows(&app).await;
    // "Say hello": 6 tokens with the message's 3; the reply's 32 bytes of
    // text in 7 chunks ("Hello!", " How", … " today?"): 8 tokens.
    let r = &rows[0];
    assert_eq!(
        (r.status, r.prompt_tokens, r.completion_tokens),
        (200, Some(6), Some(8))
    );
    assert!(r.cost_usd.unwrap() > 0.0);
}

/// The write lock of a SQLite file, held by another connection (as another
/// process would) until dropped. In WAL mode readers still read.
struct WriteLock(rusqlite::Connection);

impl WriteLock {
    fn take(db: &std::path::Path) -> Self {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        Self(conn)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.0.execute_batch("ROLLBACK");
    }
}

/// A chat request that must answer 200 without waiting for the store: the
/// bound is far above a request's time and far below the store's busy
/// timeout (5 s), so a request that waited on the stalled store fails here.
async fn chat_without_waiting(app: &TestApp) {
    let resp = tokio::time::timeout(
        Duration::from_secs(4),
        app.post_json("/v1/chat/completions", &chat_body("gpt-4o-mini")),
    )
    .await
    .expect("a chat request waited on the stalled store");
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
}

/// The `key=value` field of the JSON log line `message`.
fn log_field(app: &TestApp, message: &str, field: &str) -> u64 {
    let line = app
        .logs()
        .into_iter()
        .find(|l| l.contains(message))
        .unwrap_or_else(|| panic!("no log line {message:?}"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

#[tokio::test]
async fn a_stalled_store_delays_no_request_and_drops_only_what_the_queue_cannot_hold() {
    // The writer takes one row at a time; two more fit in the queue.
    let mut app = app()
        .env("SWITCHYARD_USAGE__QUEUE_CAPACITY", "2")
        .env("SWITCHYARD_USAGE__BATCH_SIZE", "1")
        .spawn()
        .await;
    chat_without_waiting(&app).await;
    let store = app_store(&app).await;
    for _ in 0..250 {
        if store.count_usage("default").await.unwrap() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.count_usage("default").await.unwrap(), 1);
    assert_eq!(metric(&app, "switchyard_usage_queue_depth ").await, 0.0);
    let lock = WriteLock::take(&app.dir.path().join("switchyard.db"));

    // The writer blocks on the first row; the queue fills; then rows drop.
    let mut completed = 1;
    while metric(&app, "switchyard_usage_dropped_total").await == 0.0 {
        assert!(completed < 50, "no row dropped after {completed} requests");
        chat_without_waiting(&app).await;
        completed += 1;
    }
    for _ in 0..5 {
        chat_without_waiting(&app).await;
        completed += 1;
    }

    assert_eq!(
        metric(&app, "switchyard_usage_queue_depth ").await,
        2.0,
        "the queue is full while the store is stalled"
    );
    let dropped = metric(&app, "switchyard_usage_dropped_total").await as u64;
    assert!(dropped >= 5, "dropped {dropped}");
    drop(lock);
    // The rows the writer held or queued are written once the lock is gone.
    for _ in 0..500 {
        if store.count_usage("default").await.unwrap() + dropped == completed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.count_usage("default").await.unwrap(),
        completed - dropped
    );
    assert_eq!(
        metric(&app, "switchyard_usage_dropped_total").await as u64,
        dropped
    );
    assert_eq!(metric(&app, "switchyard_usage_queue_depth ").await, 0.0);
    assert!(app.stop_gracefully().await.success());
    assert_eq!(log_field(&app, "usage writer flushed", "dropped"), dropped);
    assert_eq!(
        log_field(&app, "usage writer flushed", "written"),
        completed - dropped
    );
}

/// `[retention]`: old usage rows, traces and audit events are deleted in
/// batches by the background task; a usage row of the budget month stays
/// even when it is older than the setting, and new rows stay.
#[tokio::test]
async fn retention_deletes_old_log_rows_and_keeps_the_budget_month() {
    use switchyard_core::identity::AuditRecord;
    use switchyard_core::sessions::{BusEvent, EventsRow};
    use switchyard_core::usage::new_id;

    let app = app()
        .config(
            "[retention]\nusage_logs_days = 1\nbus_events_days = 7\naudit_logs_days = 7\n\
             interval_secs = 1\nbatch_size = 2\n",
        )
        .spawn()
        .await;
    let store = app_store(&app).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let day = 86_400_000i64;
    let month = switchyard_engine::budget::month_start_ms(now);
    // A usage row's id is a UUIDv7 of the moment it was made, which is what
    // retention finds it by: these are made at the rows' own times.
    let usage_at = |ms: i64, n: i64| {
        let mut r = switchyard_store::conformance::sample_usage("default", n as u32);
        r.created_at_ms = ms;
        r.id = switchyard_store::conformance::uuid_v7_at(ms, n);
        r
    };
    // Five rows 40 to 44 days old (deleted, two per statement), one at the
    // start of this month (kept: budgets sum it, whatever the one day says;
    // on a month's first day it is within the day anyway), one a minute old
    // (kept).
    let mut rows: Vec<_> = (0..5).map(|n| usage_at(now - (40 + n) * day, n)).collect();
    rows.push(usage_at(month, 10));
    rows.push(usage_at(now - 60_000, 11));
    store.insert_usage(&rows).await.unwrap();
    let event = |trace: &str, at: i64| BusEvent {
        id: new_id(),
        tenant_id: "default".into(),
        trace_id: trace.into(),
        seq: 0,
        kind: "request.received".into(),
        session_id: None,
        user_id: None,
        payload: serde_json::json!({}),
        created_at_ms: at,
    };
    let (old_trace, new_trace) = (format!("{:032x}", 1), format!("{:032x}", 2));
    store
        .insert_events(&EventsRow::pack(&[
            event(&old_trace, now - 8 * day),
            event(&new_trace, now - 6 * day),
        ]))
        .await
        .unwrap();
    let audit = |action: &str, at: i64| AuditRecord {
        id: new_id(),
        tenant_id: "default".into(),
        actor: "key:test".into(),
        action: action.into(),
        target: None,
        detail: serde_json::json!({}),
        trace_id: None,
        created_at_ms: at,
    };
    store
        .insert_audit(&[
            audit("old.event", now - 8 * day),
            audit("new.event", now - 6 * day),
        ])
        .await
        .unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = store.count_usage("default").await.unwrap();
        if left == 2 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept: Vec<i64> = store
        .list_usage("default", 10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.created_at_ms)
        .collect();
    assert_eq!(kept, vec![now - 60_000, month]);
    // Trace and audit deletions run in the same round, after usage's.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metric(
        &app,
        "switchyard_retention_deleted_total{log=\"audit_logs\"}",
    )
    .await
        < 1.0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store
        .list_trace_events("default", &old_trace)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store
            .list_trace_events("default", &new_trace)
            .await
            .unwrap()
            .len(),
        1
    );
    let q = switchyard_core::identity::AuditQuery {
        limit: 10,
        ..Default::default()
    };
    let actions: Vec<String> = store
        .list_audit("default", &q)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, vec!["new.event".to_owned()]);
    for (log, n) in [
        ("usage_logs", 5.0),
        ("bus_events", 1.0),
        ("audit_logs", 1.0),
    ] {
        let name = format!("switchyard_retention_deleted_total{{log=\"{log}\"}}");
        assert_eq!(metric(&app, &name).await, n, "{log}");
    }
    assert!(app
        .wait_for_log(|l| l.contains("old log rows deleted") && l.contains("usage_logs"))
        .await
        .is_some());
}
