//! Streaming chat completions: relayed as they arrive, always terminated.

use serde_json::Value;
use switchyard_testkit::Fault;

use crate::helpers::*;

#[tokio::test]
async fn a_stream_is_relayed_chunk_by_chunk_and_ends_with_done() {
    let app = spawn().await;

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;

    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello! How can I help you today?");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    // The client did not ask for usage, so the usage chunk the gateway
    // requested for its own accounting is not relayed.
    assert!(chunks
        .iter()
        .all(|c| !c["choices"].as_array().unwrap().is_empty()));
    assert!(chunks.iter().all(|c| !c["usage"].is_object()));
    let upstream = app.mock().last_request().unwrap().body;
    assert_eq!(upstream["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn include_usage_adds_the_final_usage_chunk() {
    let app = spawn().await;

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", true))
        .await;

    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], serde_json::json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 7);
}

#[tokio::test]
async fn chunks_reach_the_client_before_the_provider_has_finished() {
    let app = spawn().await;
    app.mock().hold_streams();

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;
    let mut reader = SseReader::new(resp);

    // The mock holds everything after its first chunk: that chunk must arrive
    // now, or the gateway is buffering.
    let first: Value = serde_json::from_str(&reader.next().await.unwrap().unwrap()).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    app.mock().release_streams();
    let mut rest = Vec::new();
    while let Some(d) = reader.next().await.unwrap() {
        rest.push(d);
    }
    assert_eq!(rest.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_stream_cut_by_the_provider_ends_with_an_error_event_not_done() {
    let app = spawn().await;
    // A reset, and a body that ends cleanly in the middle of an event: the
    // half event is never relayed (a client's JSON parser would fail on it
    // before it saw the error).
    for (fault, code) in [
        (Fault::ResetAfterChunks(3), "upstream_broken"),
        (Fault::CutInsideChunk(3), "upstream_truncated"),
    ] {
        app.mock().push_fault(fault.clone());
        let resp = app
            .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
            .await;

        assert_eq!(resp.status(), 200);
        let data = sse_data(&resp.text().await.unwrap());
        assert_eq!(data.len(), 4, "{fault:?}: {data:?}");
        for d in &data {
            assert!(
                serde_json::from_str::<Value>(d).is_ok(),
                "{fault:?}: every event is whole JSON: {d}"
            );
        }
        let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], code);
        assert_eq!(last["error"]["type"], "upstream_error");
        assert!(!data.contains(&"[DONE]".to_owned()));
    }
}

#[tokio::test]
async fn a_stream_cut_by_the_provider_is_logged_with_the_requests_trace_id() {
    // Its access line, written as the headers went out, says 200.
    let app = spawn().await;
    app.mock().push_fault(Fault::ResetAfterChunks(3));

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;
    let trace_id = resp.headers()["traceparent"].to_str().unwrap()[3..35].to_owned();
    resp.text().await.unwrap();

    let line = wait_for_log_json(&app, |l| l.contains("stream broke"))
        .await
        .expect("a line for the broken stream");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["code"], "upstream_broken");
    assert_eq!(line["deployment"], "mock/gpt-4o-mini-upstream");
    assert_eq!(log_trace_id(&line), trace_id);
}

#[tokio::test]
async fn a_provider_that_omits_done_after_finishing_still_completes_the_stream() {
    let app = spawn().await;
    app.mock().push_fault(Fault::NoDone);

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;

    let data = sse_data(&resp.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_streamed_tool_call_arrives_in_pieces() {
    let app = spawn().await;
    let mut body = stream_body("gpt-4o-mini", false);
    body["tools"] = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);

    let data = sse_data(
        &app.post_json("/v1/chat/completions", &body)
            .await
            .text()
            .await
            .unwrap(),
    );

    let args: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(args, r#"{"location": "Paris", "unit": "celsius"}"#);
    assert!(data.len() >= 5);
}

#[tokio::test]
async fn a_provider_error_before_the_stream_starts_is_an_ordinary_error_response() {
    let app = spawn().await;
    app.mock().update(|b| b.always = Some(Fault::Status(503)));

    let resp = app
        .post_json("/v1/chat/completions", &stream_body("gpt-4o-mini", false))
        .await;

    assert_error(resp, 502, "upstream_status").await;
}
