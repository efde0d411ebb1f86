//! Usage rows: one per model request, written without making requests wait,
//! and flushed on graceful shutdown.

use std::time::Duration;

use futures::future::join_all;
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

async fn graceful_shutdown_keeps_exactly_one_row_per_completed_request(mut app: TestApp) {
    let completed = load(&app, 300).await;
    assert_eq!(completed, 270);

    let status = app.stop_gracefully().await;

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
    graceful_shutdown_keeps_exactly_one_row_per_completed_request(app).await;
}

#[tokio::test]
async fn postgres_graceful_shutdown_keeps_exactly_one_row_per_completed_request() {
    let Some(pg) = pg_url() else { return };
    let app = app()
        .postgres(&pg)
        .env("SWITCHYARD_USAGE__FLUSH_INTERVAL_MS", "5000")
        .spawn()
        .await;
    graceful_shutdown_keeps_exactly_one_row_per_completed_request(app).await;
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

#[tokio::test]
async fn a_usage_row_records_tokens_cost_latency_and_ttft() {
    let mut app = spawn().await;

    let resp = app
        .client
        .post(app.url("/v1/chat/completions"))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .json(&stream_body("gpt-4o-mini", false))
        .send()
        .await
        .unwrap();
    resp.text().await.unwrap();
    app.stop_gracefully().await;

    let rows = app_store(&app)
        .await
        .list_usage("default", 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!((r.endpoint.as_str(), r.stream), ("chat", true));
    assert_eq!(r.upstream_model, "gpt-4o-mini-upstream");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (Some(5), Some(7)));
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

    app.stop_gracefully().await;

    let mut rows = app_store(&app)
        .await
        .list_usage("default", 10)
        .await
        .unwrap();
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
