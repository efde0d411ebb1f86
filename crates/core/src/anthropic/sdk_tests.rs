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

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

fn is_anthropic_tool_id(id: &Value) -> bool {
    id.as_str().is_some_and(|id| {
        !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    })
}

#[test]
fn a_kimi_tool_call_id_reaches_anthropic_valid_and_still_matching_its_result() {
    // Anthropic: "tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'".
    let body = obj(json!({"model": "m", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "call_ok-1", "type": "function",
             "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_ok-1", "content": "Noon"},
    ]}));
    let req = request_to_anthropic(&body, "claude-sonnet-4-5", false).unwrap();
    let calls = &req["messages"][1]["content"];
    let results = &req["messages"][2]["content"];
    assert!(is_anthropic_tool_id(&calls[0]["id"]), "{req}");
    assert_eq!(calls[0]["id"], results[0]["tool_use_id"]);
    assert_eq!(calls[1]["id"], "call_ok-1");
    assert_eq!(results[1]["tool_use_id"], "call_ok-1");
}

#[test]
fn a_native_body_with_another_providers_tool_ids_reaches_anthropic_valid() {
    let body = obj(json!({"model": "alias", "max_tokens": 10, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather", "input": {}},
            {"type": "tool_use", "id": "toolu_01", "name": "get_time", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "functions.get_weather:0", "content": "Sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "Noon"},
        ]},
    ]}));
    let req = native_request(&body, "claude-sonnet-4-5", false);
    let calls = &req["messages"][1]["content"];
    let results = &req["messages"][2]["content"];
    assert!(is_anthropic_tool_id(&calls[0]["id"]), "{req}");
    assert_eq!(calls[0]["id"], results[0]["tool_use_id"]);
    assert_eq!(calls[1]["id"], "toolu_01");
    assert_eq!(results[1]["tool_use_id"], "toolu_01");
}

#[test]
fn an_openai_providers_tool_call_id_reaches_a_messages_client_valid_both_ways() {
    let kimi = "functions.get_weather:0";
    let resp = json!({"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": null,
        "tool_calls": [{"id": kimi, "type": "function",
                        "function": {"name": "get_weather", "arguments": "{}"}}]},
        "finish_reason": "tool_calls"}]});
    let whole = response_to_anthropic(&resp, "alias", false);
    let id = &whole["content"][0]["id"];
    assert!(is_anthropic_tool_id(id), "{whole}");

    let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
    let events = s.chunk(&json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": kimi, "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    ]}}]}));
    let start = events
        .iter()
        .find(|(n, _)| *n == "content_block_start")
        .map(|(_, e)| e["content_block"]["id"].clone());
    // The same id either way, as the provider's is the same.
    assert_eq!(start.as_ref(), Some(id), "{events:?}");
}

#[test]
fn temperature_and_top_p_reach_claude_together_only_where_it_takes_both() {
    // Opus 4.1 and later answer 400: "`temperature` and `top_p` cannot both
    // be specified for this model. Please use only one." (BerriAI/litellm#15097).
    let body = obj(json!({"model": "m", "temperature": 0.2, "top_p": 0.9,
        "messages": [{"role": "user", "content": "Hi"}]}));
    let sent = |model: &str| {
        let req = request_to_anthropic(&body, model, false).unwrap();
        (req.get("temperature").cloned(), req.get("top_p").cloned())
    };
    for later in [
        "claude-opus-4-1-20250805",
        "claude-sonnet-4-5-20250929",
        "claude-haiku-4-5",
        "anthropic.claude-opus-4-5-20251101-v1:0",
        "claude-sonnet-4-6",
    ] {
        assert_eq!(sent(later), (Some(json!(0.2)), None), "{later}");
    }
    for earlier in ["claude-sonnet-4-20250514", "claude-3-7-sonnet-latest"] {
        assert_eq!(
            sent(earlier),
            (Some(json!(0.2)), Some(json!(0.9))),
            "{earlier}"
        );
    }
    // top_p alone is kept.
    let alone = obj(json!({"model": "m", "top_p": 0.9,
        "messages": [{"role": "user", "content": "Hi"}]}));
    let req = request_to_anthropic(&alone, "claude-sonnet-4-5", false).unwrap();
    assert_eq!(req["top_p"], json!(0.9));
}

#[test]
fn allowed_tools_reach_anthropic_as_only_those_tools_by_mode() {
    let tool = |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
    let allow = |mode: &str, names: &[&str]| {
        let tools: Vec<Value> = names
            .iter()
            .map(|n| json!({"type": "function", "function": {"name": n}}))
            .collect();
        obj(json!({"model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [tool("get_weather"), tool("get_time"), tool("delete_all")],
            "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}},
            "parallel_tool_calls": false}))
    };
    let names = |req: &Value| -> Vec<String> {
        req["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect()
    };

    let auto = request_to_anthropic(
        &allow("auto", &["get_weather", "get_time"]),
        "claude-sonnet-4-5",
        false,
    )
    .unwrap();
    assert_eq!(names(&auto), ["get_weather", "get_time"]);
    assert_eq!(
        auto["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    let required = request_to_anthropic(
        &allow("required", &["get_time"]),
        "claude-sonnet-4-5",
        false,
    )
    .unwrap();
    assert_eq!(names(&required), ["get_time"]);
    assert_eq!(required["tool_choice"]["type"], "any");

    // A tool the request does not declare is refused by name.
    let e = request_to_anthropic(
        &allow("auto", &["get_time", "launch"]),
        "claude-sonnet-4-5",
        false,
    )
    .unwrap_err();
    assert_eq!(
        e.param.as_deref(),
        Some("tool_choice.allowed_tools.tools[1]")
    );
    assert!(e.message.contains("launch"), "{}", e.message);
    let e = request_to_anthropic(
        &allow("sometimes", &["get_time"]),
        "claude-sonnet-4-5",
        false,
    )
    .unwrap_err();
    assert_eq!(e.param.as_deref(), Some("tool_choice.allowed_tools.mode"));
}

#[test]
fn allowed_tools_in_auto_mode_leave_room_for_thinking() {
    let body = |mode: &str| {
        obj(
            json!({"model": "m", "reasoning_effort": "low", "max_completion_tokens": 4000,
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": mode,
                "tools": [{"type": "function", "function": {"name": "f"}}]}}}),
        )
    };
    // Anthropic thinks with `auto`, and refuses thinking with `any`.
    let auto = request_to_anthropic(&body("auto"), "claude-sonnet-4-5", false).unwrap();
    assert!(auto.get("thinking").is_some(), "{auto}");
    let required = request_to_anthropic(&body("required"), "claude-sonnet-4-5", false).unwrap();
    assert!(required.get("thinking").is_none(), "{required}");
}

#[test]
fn anthropics_cache_writes_reach_openai_clients_in_the_sdks_field() {
    // The openai SDK's `PromptTokensDetails` has `cache_write_tokens`.
    let msg = json!({"id": "msg_1", "model": "c", "stop_reason": "end_turn",
        "content": [{"type": "text", "text": "Hi"}],
        "usage": {"input_tokens": 3, "cache_creation_input_tokens": 7,
                  "cache_read_input_tokens": 2, "output_tokens": 1}});
    let usage = &response_from_anthropic(&msg, 1)["usage"];
    assert_eq!(
        usage["prompt_tokens_details"],
        json!({"cached_tokens": 2, "cache_write_tokens": 7})
    );
    assert_eq!(usage["cache_creation_input_tokens"], 7);
    // Writes alone, no reads.
    let writes = json!({"input_tokens": 3, "cache_creation_input_tokens": 7, "output_tokens": 1});
    assert_eq!(
        Tokens::from_anthropic(Some(&writes)).openai()["prompt_tokens_details"],
        json!({"cache_write_tokens": 7})
    );
}

/// Each tool_use block of a Messages stream as the anthropic SDK builds it
/// — (id, name, the JSON its deltas add up to) — after checking that the
/// blocks do not interleave: a delta or stop is for the one open block.
fn tool_blocks(events: &[Event]) -> Vec<(String, String, String)> {
    let mut open: Option<u64> = None;
    let mut blocks = Vec::new();
    for (name, e) in events {
        let index = e["index"].as_u64();
        match *name {
            "content_block_start" => {
                assert_eq!(open, None, "a block started inside another: {events:?}");
                open = index;
                let b = &e["content_block"];
                if b["type"] == "tool_use" {
                    blocks.push((
                        b["id"].as_str().unwrap_or("").to_owned(),
                        b["name"].as_str().unwrap_or("").to_owned(),
                        String::new(),
                    ));
                }
            }
            "content_block_delta" => {
                assert_eq!(index, open, "a delta for a block not open: {events:?}");
                if let (Some(part), Some(last)) =
                    (e["delta"]["partial_json"].as_str(), blocks.last_mut())
                {
                    last.2.push_str(part);
                }
            }
            "content_block_stop" => {
                assert_eq!(index, open, "a stop for a block not open: {events:?}");
                open = None;
            }
            _ => {}
        }
    }
    assert_eq!(open, None, "a block left open: {events:?}");
    blocks
}

fn tool_delta(index: u64, id: Option<&str>, name: Option<&str>, args: &str) -> Value {
    let mut call = json!({"index": index, "function": {"arguments": args}});
    if let Some(id) = id {
        call["id"] = json!(id);
        call["type"] = json!("function");
    }
    if let Some(name) = name {
        call["function"]["name"] = json!(name);
    }
    json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
}

fn owned(id: &str, name: &str, args: &str) -> (String, String, String) {
    (id.to_owned(), name.to_owned(), args.to_owned())
}

#[test]
fn interleaved_parallel_tool_calls_reach_a_messages_client_as_whole_blocks() {
    // Legal in OpenAI streams: both headers, then each call's arguments.
    let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
    let mut events = Vec::new();
    for c in [
        tool_delta(0, Some("call_a"), Some("weather"), ""),
        tool_delta(1, Some("call_b"), Some("time"), ""),
        tool_delta(0, None, None, "{\"city\":"),
        tool_delta(0, None, None, "\"Paris\"}"),
        tool_delta(1, None, None, "{\"tz\":"),
        tool_delta(1, None, None, "\"CET\"}"),
        json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ] {
        events.extend(s.chunk(&c));
    }
    events.extend(s.finish());
    assert_eq!(
        tool_blocks(&events),
        [
            owned("call_a", "weather", "{\"city\":\"Paris\"}"),
            owned("call_b", "time", "{\"tz\":\"CET\"}"),
        ]
    );

    // The second call's arguments before the first's are done: they wait.
    let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
    let mut events = Vec::new();
    for c in [
        tool_delta(0, Some("call_a"), Some("weather"), ""),
        tool_delta(1, Some("call_b"), Some("time"), ""),
        tool_delta(0, None, None, "{\"city\":"),
        tool_delta(1, None, None, "{\"tz\":\"CET\"}"),
        tool_delta(0, None, None, "\"Paris\"}"),
    ] {
        events.extend(s.chunk(&c));
    }
    events.extend(s.finish());
    assert_eq!(
        tool_blocks(&events),
        [
            owned("call_a", "weather", "{\"city\":\"Paris\"}"),
            owned("call_b", "time", "{\"tz\":\"CET\"}"),
        ]
    );
}

#[test]
fn tool_call_arguments_in_order_are_sent_as_they_arrive() {
    // One call after another, as OpenAI streams them: each fragment is its
    // own event at once, never gathered into one burst.
    let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
    let fragments = |events: Vec<Event>| -> Vec<String> {
        events
            .iter()
            .filter_map(|(_, e)| e["delta"]["partial_json"].as_str().map(str::to_owned))
            .collect()
    };
    s.chunk(&tool_delta(0, Some("call_a"), Some("weather"), ""));
    assert_eq!(
        fragments(s.chunk(&tool_delta(0, None, None, "{\"city\":"))),
        ["{\"city\":"]
    );
    assert_eq!(
        fragments(s.chunk(&tool_delta(0, None, None, "\"Paris\"}"))),
        ["\"Paris\"}"]
    );
    let header = s.chunk(&tool_delta(1, Some("call_b"), Some("time"), ""));
    let names: Vec<&str> = header.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["content_block_stop", "content_block_start"]);
    assert_eq!(
        fragments(s.chunk(&tool_delta(1, None, None, "{\"tz\":"))),
        ["{\"tz\":"]
    );
    assert_eq!(
        fragments(s.chunk(&tool_delta(1, None, None, "\"CET\"}"))),
        ["\"CET\"}"]
    );
}

#[test]
fn only_system_messages_are_refused_naming_messages() {
    // Anthropic refuses `messages: []`.
    let body = obj(json!({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in French."},
    ]}));
    let e = request_to_anthropic(&body, "claude-sonnet-4-5", false).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"), "{}", e.message);
}

#[test]
fn tool_arguments_that_are_not_an_object_never_reach_anthropic_as_input() {
    // Sent to Anthropic: refused, as arguments that are not JSON are.
    let body = obj(json!({"model": "m", "messages": [
        {"role": "user", "content": "Sum"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "sum", "arguments": "[1,2]"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]}));
    let e = request_to_anthropic(&body, "claude-sonnet-4-5", false).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[1].tool_calls"));

    // Given to a Messages client: no input, as for arguments that are not
    // JSON — the same whether the answer is streamed or not.
    let resp = json!({"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant", "content": null,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "sum", "arguments": "[1,2]"}}]},
        "finish_reason": "tool_calls"}]});
    assert_eq!(
        response_to_anthropic(&resp, "alias", false)["content"][0]["input"],
        json!({})
    );
    let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
    let mut events = Vec::new();
    for c in [
        tool_delta(0, Some("call_1"), Some("sum"), " "),
        tool_delta(0, None, None, "[1,"),
        tool_delta(0, None, None, "2]"),
        tool_delta(1, Some("call_2"), Some("sum"), "{\"a\":1}"),
    ] {
        events.extend(s.chunk(&c));
    }
    events.extend(s.finish());
    assert_eq!(
        tool_blocks(&events),
        [
            owned("call_1", "sum", ""),
            owned("call_2", "sum", "{\"a\":1}")
        ]
    );
}
