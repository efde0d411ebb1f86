//! Regression tests for what the official `openai` and `anthropic` Python
//! SDKs found wrong when driven against the gateway: each test names the
//! SDK behaviour it guards.

use serde_json::{json, Value};

use super::*;

/// The `tool_calls[index].function.arguments` an OpenAI client adds up from
/// a stream's chunks, as the SDKs' stream accumulators do.
fn streamed_arguments(chunks: &[Value], index: u64) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array().cloned())
        .flatten()
        .filter(|call| call["index"] == index)
        .filter_map(|call| call["function"]["arguments"].as_str().map(str::to_owned))
        .collect()
}

fn anthropic_chunks(events: &[Value]) -> Vec<Value> {
    let mut s = AnthropicToOpenAiStream::new(1);
    let mut chunks = Vec::new();
    for e in events {
        let name = e["type"].as_str().unwrap_or("");
        match s.step(name, e) {
            StreamStep::Chunks(c) => chunks.extend(c),
            other => panic!("{other:?}"),
        }
    }
    chunks
}

#[test]
fn a_streamed_tool_without_parameters_has_arguments_an_sdk_can_parse() {
    // The openai SDK's stream helpers `json.loads` the arguments they add
    // up: "" fails, "{}" is a call without parameters.
    let start = |index: u64, id: &str| {
        json!({"type": "content_block_start", "index": index,
               "content_block": {"type": "tool_use", "id": id, "name": "now", "input": {}}})
    };
    let delta = |index: u64, part: &str| {
        json!({"type": "content_block_delta", "index": index,
               "delta": {"type": "input_json_delta", "partial_json": part}})
    };
    let stop = |index: u64| json!({"type": "content_block_stop", "index": index});
    let chunks = anthropic_chunks(&[
        json!({"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {}}}),
        // An empty fragment, as Anthropic streams a tool without parameters.
        start(0, "toolu_a"),
        delta(0, ""),
        stop(0),
        // No fragment at all.
        start(1, "toolu_b"),
        stop(1),
        // Arguments of its own: nothing added.
        start(2, "toolu_c"),
        delta(2, "{\"tz\":"),
        delta(2, "\"UTC\"}"),
        stop(2),
    ]);
    assert_eq!(streamed_arguments(&chunks, 0), "{}");
    assert_eq!(streamed_arguments(&chunks, 1), "{}");
    assert_eq!(streamed_arguments(&chunks, 2), "{\"tz\":\"UTC\"}");
}
