//! Translation between OpenAI's chat-completions shapes and Anthropic's
//! Messages API, in both directions, for requests, complete answers and
//! streams. Pure functions and small state machines: the `anthropic`
//! provider uses one direction, the inbound `POST /v1/messages` endpoint the
//! other.

use std::borrow::Cow;

use serde_json::{json, Map, Value};

use crate::config::ThinkingForm;

mod schema;
mod tool_ids;

use tool_ids::{anthropic_tool_id, rewrite_tool_id};

/// The `max_tokens` sent to Anthropic when the client gave none (Anthropic
/// requires one), unless the provider sets `max_tokens_default`.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Why a body could not be translated; becomes a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TranslateError {
    pub message: String,
    pub param: Option<String>,
}

fn bad(param: &str, message: impl Into<String>) -> TranslateError {
    TranslateError {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

// ---------------------------------------------------------------------------
// OpenAI request → Anthropic request (the `anthropic` provider)
// ---------------------------------------------------------------------------

/// OpenAI parameters the Messages API has no way to honour: refused by name
/// rather than dropped, so that a caller asking for three choices, a
/// schema-less JSON answer or log probabilities does not get one prose
/// answer instead. Their neutral values (`n: 1`, `response_format: {"type":
/// "text"}`, `logprobs: false`) pass.
fn refuse_what_anthropic_cannot_do(body: &Map<String, Value>) -> Result<(), TranslateError> {
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(bad(
            "n",
            "This model's provider (Anthropic) generates one choice per request; set n to 1.",
        ));
    }
    // Tools other than functions (GPT-5's free-form `custom` tools): the
    // model would answer without them.
    for (i, tool) in body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let kind = tool
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function");
        if kind != "function" {
            return Err(bad(
                &format!("tools[{i}].type"),
                format!(
                    "tools of type {kind} cannot be sent to this model's provider (Anthropic); \
                     use function tools."
                ),
            ));
        }
    }
    // An answer in audio, or searched on the web by OpenAI's search models.
    let audio = body.get("audio").is_some_and(|v| !v.is_null())
        || body
            .get("modalities")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().any(|x| x != "text"));
    if audio {
        return Err(bad(
            "modalities",
            "This model's provider (Anthropic) answers in text only.",
        ));
    }
    if body.get("web_search_options").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "web_search_options",
            "web_search_options (OpenAI's search models) cannot be sent to this model's \
             provider (Anthropic).",
        ));
    }
    // The legacy function-calling fields: translated, they would be dropped
    // and the model would answer without the functions it was given.
    for key in ["functions", "function_call"] {
        if body.get(key).is_some_and(|v| !v.is_null()) {
            return Err(bad(
                key,
                format!(
                    "{key} (OpenAI's deprecated function calling) cannot be sent to this \
                     model's provider (Anthropic); use tools and tool_choice."
                ),
            ));
        }
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true)
        || body.get("top_logprobs").is_some_and(|v| !v.is_null())
    {
        return Err(bad(
            "logprobs",
            "This model's provider (Anthropic) does not return log probabilities.",
        ));
    }
    Ok(())
}

/// Anthropic's `output_config` for an OpenAI `response_format`: structured
/// outputs (`output_config.format`, generally available on Claude 4.5 and
/// later) take the `json_schema`'s schema, rewritten to the subset they
/// decode to as Anthropic's SDKs rewrite it ([`schema::strict_schema`]),
/// and answer with the JSON as the message's text, which is what an OpenAI
/// client reads (and what the SDKs' `parse` helpers parse). `strict`,
/// `name` and `description` have no counterpart: the schema is enforced
/// either way. `json_object` (JSON of any shape) has none either, and is
/// refused by name. `None` for no format or `text`.
fn output_config(body: &Map<String, Value>) -> Result<Option<Value>, TranslateError> {
    let Some(format) = body.get("response_format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_schema") => match format.pointer("/json_schema/schema") {
            Some(schema @ Value::Object(_)) => {
                let schema = schema::strict_schema(schema).map_err(|e| {
                    bad(
                        "response_format",
                        format!("response_format.json_schema.schema: {e}"),
                    )
                })?;
                Ok(Some(
                    json!({"format": {"type": "json_schema", "schema": schema}}),
                ))
            }
            _ => Err(bad(
                "response_format",
                "response_format.json_schema.schema must be a JSON Schema object.",
            )),
        },
        _ => Err(bad(
            "response_format",
            "This model's provider (Anthropic) has no JSON mode without a schema; use \
             response_format type json_schema with a schema, or ask for JSON in the prompt.",
        )),
    }
}

/// Extended thinking as an Anthropic model takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Thinking {
    /// `{"type": "enabled", "budget_tokens": N}`: the models before
    /// Claude 4.6, which know no other form.
    Budget(u64),
    /// `{"type": "adaptive"}` with `output_config.effort`: Claude 4.6 and
    /// later (the newest refuse a budget). The budget the same effort
    /// would have is kept as room for the thinking in `max_tokens`.
    Adaptive(&'static str, u64),
}

/// Models that think only with a budget (`thinking.type: "enabled"`): those
/// released before adaptive thinking, Claude 4.6. Any other model, later
/// ones and names with no Claude version in them included, is sent
/// adaptive thinking.
fn budget_thinking_only(model: &str) -> bool {
    claude_version(model).is_some_and(|v| v < (4, 6))
}

/// Models that refuse `temperature` and `top_p` together ("cannot both be
/// specified for this model"): Claude Opus 4.1 and every later one (Sonnet
/// and Haiku 4.5, Opus 4.5, the 4.6 models). Claude 4 and earlier take
/// both. Names with no Claude version in them are taken for later models,
/// as [`budget_thinking_only`] takes them.
fn one_sampler_only(model: &str) -> bool {
    claude_version(model).is_none_or(|v| v >= (4, 1))
}

/// The (major, minor) version in a Claude model id, however the id is
/// spelled: Anthropic's (`claude-opus-4-1-20250805`, `claude-3-7-sonnet-latest`,
/// `claude-sonnet-4-20250514`), Bedrock's (`anthropic.claude-sonnet-4-5-20250929-v1:0`),
/// Vertex's (`claude-sonnet-4@20250514`) or a router's (`anthropic/claude-sonnet-4.5`).
/// The first number after `claude` is the major version; a number of one
/// or two digits right after it the minor (a date is not one).
fn claude_version(model: &str) -> Option<(u32, u32)> {
    let m = model.to_ascii_lowercase();
    let rest = &m[m.find("claude")? + "claude".len()..];
    let mut tokens = rest
        .split(['-', '.', '@', ':', '_', '/'])
        .filter(|t| !t.is_empty())
        .skip_while(|t| !t.bytes().all(|b| b.is_ascii_digit()));
    let major = tokens.next()?.parse().ok()?;
    let minor = tokens
        .next()
        .filter(|t| t.len() <= 2 && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    Some((major, minor))
}

/// Extended thinking for an OpenAI `reasoning_effort` on `model`: a budget
/// as LiteLLM maps the effort (so that clients moving from it get the
/// same; Anthropic's least is 1,024 tokens), or the effort itself on models
/// that think adaptively. `None` for no thinking (`none`, or no
/// `reasoning_effort`).
fn thinking_for(
    body: &Map<String, Value>,
    model: &str,
    form: ThinkingForm,
) -> Result<Option<Thinking>, TranslateError> {
    let (effort, budget) = match body.get("reasoning_effort") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(effort)) => match effort.as_str() {
            "none" => return Ok(None),
            "minimal" | "low" => ("low", 1024),
            "medium" => ("medium", 2048),
            "high" => ("high", 4096),
            "xhigh" => ("high", 8192),
            other => {
                return Err(bad(
                    "reasoning_effort",
                    format!(
                        "Invalid value: '{other}'. Supported values are: 'none', 'minimal', \
                         'low', 'medium', 'high' and 'xhigh'."
                    ),
                ))
            }
        },
        Some(_) => return Err(bad("reasoning_effort", "reasoning_effort must be a string")),
    };
    let budget_only = match form {
        ThinkingForm::Auto => budget_thinking_only(model),
        ThinkingForm::Budget => true,
        ThinkingForm::Adaptive => false,
    };
    Ok(Some(if budget_only {
        Thinking::Budget(budget)
    } else {
        Thinking::Adaptive(effort, budget)
    }))
}

/// Where Anthropic refuses extended thinking that OpenAI's reasoning models
/// allow, the answer goes on without it: a `tool_choice` that forces a tool
/// (`required` or a named function), and a conversation that ends with an
/// assistant message (Anthropic continues it: a prefill).
fn thinking_is_possible(body: &Map<String, Value>) -> bool {
    let forced = match body.get("tool_choice") {
        Some(Value::String(s)) => s == "required",
        // Of the allowed tools, `auto` lets the model answer without one.
        Some(o @ Value::Object(_)) => {
            o.get("type").and_then(Value::as_str) != Some("allowed_tools")
                || o.pointer("/allowed_tools/mode").and_then(Value::as_str) != Some("auto")
        }
        _ => false,
    };
    !forced && !ends_with_assistant(body)
}

/// Whether an OpenAI conversation ends with an assistant message, which
/// Anthropic continues (a prefill).
fn ends_with_assistant(body: &Map<String, Value>) -> bool {
    body.get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        == Some("assistant")
}

/// With extended thinking on, Anthropic takes only the default temperature,
/// no `top_k` and a `top_p` of at least 0.95; refused by name here, as
/// OpenAI's reasoning models refuse them, rather than as Anthropic's 400.
fn check_sampling_with_thinking(body: &Map<String, Value>) -> Result<(), TranslateError> {
    let number = |k: &str| body.get(k).and_then(Value::as_f64);
    if number("temperature").is_some_and(|t| t != 1.0) {
        return Err(bad(
            "temperature",
            "Unsupported value: 'temperature' with reasoning_effort on this model's provider \
             (Anthropic). Only the default (1) value is supported.",
        ));
    }
    if body.get("top_k").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "top_k",
            "Unsupported parameter: 'top_k' is not supported with reasoning_effort on this \
             model's provider (Anthropic).",
        ));
    }
    if number("top_p").is_some_and(|p| p < 0.95) {
        return Err(bad(
            "top_p",
            "Unsupported value: 'top_p' below 0.95 with reasoning_effort on this model's \
             provider (Anthropic).",
        ));
    }
    Ok(())
}

/// An OpenAI assistant message's `thinking_blocks` (LiteLLM's field, which
/// Switchyard's answers carry too): Anthropic's signed thinking and
/// redacted-thinking blocks, to be sent back first in that turn. Blocks
/// without a signature (another provider's reasoning) are left out.
fn signed_thinking_blocks(m: &Value) -> Vec<Value> {
    m.get("thinking_blocks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|b| match b.get("type").and_then(Value::as_str) {
            Some("thinking") => {
                let signature = b.get("signature").and_then(Value::as_str)?;
                (!signature.is_empty()).then(|| {
                    json!({"type": "thinking",
                        "thinking": b.get("thinking").cloned().unwrap_or(json!("")),
                        "signature": signature})
                })
            }
            Some("redacted_thinking") => {
                let data = b.get("data").and_then(Value::as_str)?;
                Some(json!({"type": "redacted_thinking", "data": data}))
            }
            _ => None,
        })
        .collect()
}

/// Builds an Anthropic Messages request from an OpenAI chat request, the
/// form of extended thinking read from the model id.
pub fn request_to_anthropic(
    body: &Map<String, Value>,
    model: &str,
    stream: bool,
) -> Result<Value, TranslateError> {
    request_to_anthropic_with(body, model, ThinkingForm::Auto, DEFAULT_MAX_TOKENS, stream)
}

/// [`request_to_anthropic`] with the form of extended thinking the
/// provider's configuration names (`thinking`).
pub fn request_to_anthropic_with(
    body: &Map<String, Value>,
    model: &str,
    thinking_form: ThinkingForm,
    max_tokens_default: u64,
    stream: bool,
) -> Result<Value, TranslateError> {
    refuse_what_anthropic_cannot_do(body)?;
    let mut output_config = output_config(body)?;
    let thinking = thinking_for(body, model, thinking_form)?.filter(|_| thinking_is_possible(body));
    if output_config.is_some() && ends_with_assistant(body) {
        return Err(bad(
            "messages",
            "This model's provider (Anthropic) cannot continue an assistant message with a \
             json_schema response_format: end the conversation with a user message.",
        ));
    }
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages", "messages must be an array"))?;
    let mut system: Vec<String> = Vec::new();
    // The same as blocks, sent instead when a part marks a cache breakpoint.
    let mut system_blocks: Vec<Value> = Vec::new();
    let mut out: Vec<(String, Vec<Value>)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        match role {
            "system" | "developer" => {
                system.push(text_of(m.get("content")));
                let mut blocks = text_blocks(m.get("content"));
                keep_message_mark(&mut blocks, m);
                system_blocks.extend(blocks);
            }
            "user" => {
                let mut blocks = user_blocks(m.get("content"), i)?;
                if blocks.is_empty() {
                    // Left out, an empty last turn would leave the assistant's
                    // as the last, which Anthropic reads as a prefill to go on.
                    if i + 1 == messages.len() {
                        return Err(bad(
                            &format!("messages[{i}].content"),
                            "This model's provider (Anthropic) refuses an empty user message: \
                             send some text, or leave the message out.",
                        ));
                    }
                    continue; // an empty user turn in between says nothing
                }
                keep_message_mark(&mut blocks, m);
                push_blocks(&mut out, "user", blocks);
            }
            "assistant" => {
                let mut blocks = if thinking.is_some() {
                    signed_thinking_blocks(m)
                } else {
                    Vec::new()
                };
                blocks.extend(text_blocks(m.get("content")));
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let f = call.get("function").cloned().unwrap_or(Value::Null);
                    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                    // Anthropic's `input` is an object: other JSON ("[1,2]")
                    // is refused as JSON that does not parse is.
                    let input: Value =
                        serde_json::from_str(if args.trim().is_empty() { "{}" } else { args })
                            .ok()
                            .filter(Value::is_object)
                            .ok_or_else(|| {
                                bad(
                                    &format!("messages[{i}].tool_calls"),
                                    "tool call arguments must be a JSON object",
                                )
                            })?;
                    let mut block = json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or(Value::Null),
                        "name": f.get("name").cloned().unwrap_or(Value::Null),
                        "input": input,
                    });
                    // Another provider's id (Kimi's `functions.f:0`) may
                    // be outside what Anthropic takes.
                    rewrite_tool_id(&mut block, "id");
                    blocks.push(block);
                }
                if blocks.is_empty() {
                    continue; // an empty assistant turn says nothing
                }
                keep_message_mark(&mut blocks, m);
                push_blocks(&mut out, "assistant", blocks);
            }
            "tool" | "function" => {
                let id = m.get("tool_call_id").cloned().unwrap_or(Value::Null);
                let mut result = json!({"type": "tool_result", "tool_use_id": id, "content": text_of(m.get("content"))});
                // Rewritten as its call's id was, so that the two still match.
                rewrite_tool_id(&mut result, "tool_use_id");
                let mut blocks = vec![result];
                keep_message_mark(&mut blocks, m);
                push_blocks(&mut out, "user", blocks);
            }
            other => {
                return Err(bad(
                    &format!("messages[{i}].role"),
                    format!("unsupported role {other}"),
                ))
            }
        }
    }
    // Anthropic requires at least one message (and would answer a 400
    // naming none of the client's fields).
    if out.is_empty() {
        return Err(bad(
            "messages",
            "This model's provider (Anthropic) needs at least one user or assistant message \
             with content; system and developer messages alone become its system prompt.",
        ));
    }
    // Anthropic requires the conversation to start with the user.
    if out.first().is_some_and(|(r, _)| r == "assistant") {
        out.insert(
            0,
            ("user".into(), vec![json!({"type": "text", "text": "."})]),
        );
    }
    let mut req = Map::new();
    req.insert("model".into(), json!(model));
    let mut messages: Vec<Value> = out
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    // A tool loop opened without thinking goes on without it.
    let thinking = match thinking {
        Some(_) if thinking_must_stop(&messages) => {
            turn_thinking_off(&mut req, &mut messages);
            None
        }
        t => t,
    };
    req.insert("messages".into(), Value::Array(messages));
    let asked = body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
        .and_then(Value::as_u64);
    // Anthropic's max_tokens counts the thinking too (as OpenAI's
    // max_completion_tokens counts reasoning), and must exceed a budget:
    // with none asked, the default comes on top of the budget; with one
    // asked, the budget is at most half of it (so that the answer keeps
    // room), and at least Anthropic's least, 1,024.
    let (max_tokens, thinking) = match (asked, thinking) {
        (None, Some(Thinking::Budget(b) | Thinking::Adaptive(_, b))) => {
            (max_tokens_default.saturating_add(b), thinking)
        }
        (Some(m), Some(Thinking::Budget(b))) => {
            if m <= 1024 {
                return Err(bad(
                    if body.contains_key("max_completion_tokens") {
                        "max_completion_tokens"
                    } else {
                        "max_tokens"
                    },
                    "This model's provider (Anthropic) thinks for at least 1024 tokens within \
                     the answer's limit: with reasoning_effort, ask for more than 1024 tokens.",
                ));
            }
            (m, Some(Thinking::Budget(b.min((m / 2).max(1024)))))
        }
        (m, t) => (m.unwrap_or(max_tokens_default), t),
    };
    req.insert("max_tokens".into(), json!(max_tokens));
    match thinking {
        Some(Thinking::Budget(b)) => {
            req.insert(
                "thinking".into(),
                json!({"type": "enabled", "budget_tokens": b}),
            );
        }
        Some(Thinking::Adaptive(effort, _)) => {
            req.insert("thinking".into(), json!({"type": "adaptive"}));
            output_config.get_or_insert_with(|| json!({}))["effort"] = json!(effort);
        }
        None => {}
    }
    if system_blocks
        .iter()
        .any(|b| b.get("cache_control").is_some())
    {
        req.insert("system".into(), Value::Array(system_blocks));
    } else if !system.is_empty() {
        req.insert("system".into(), json!(system.join("\n\n")));
    }
    if thinking.is_some() {
        check_sampling_with_thinking(body)?;
    }
    if let Some(t) = body.get("temperature").and_then(Value::as_f64) {
        // Anthropic's range is 0–1.
        req.insert("temperature".into(), json!(t.min(1.0)));
    }
    for key in ["top_p", "top_k"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            req.insert(key.into(), v.clone());
        }
    }
    // OpenAI clients often send both (some SDK wrappers always do); the
    // temperature is kept, the parameter Anthropic advises adjusting.
    if one_sampler_only(model) && req.contains_key("temperature") {
        req.remove("top_p");
    }
    // Anthropic refuses a stop sequence that is only whitespace (OpenAI
    // takes `"\n"`): such sequences are left out, as LiteLLM does.
    let stops: Vec<Value> = match body.get("stop") {
        Some(Value::String(s)) => vec![json!(s)],
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let stops: Vec<Value> = stops
        .into_iter()
        .filter(|s| s.as_str().is_none_or(|s| !s.trim().is_empty()))
        .collect();
    if !stops.is_empty() {
        req.insert("stop_sequences".into(), Value::Array(stops));
    }
    let allowed = allowed_tools(body)?;
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function").map(|f| (t, f)))
            .filter(|(_, f)| {
                allowed.as_ref().is_none_or(|a| {
                    f.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| a.names.contains(&n))
                })
            })
            .map(|(t, f)| {
                let mut tool = json!({
                    "name": f.get("name").cloned().unwrap_or(Value::Null),
                    "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                });
                if let Some(d) = f.get("description") {
                    tool["description"] = d.clone();
                }
                with_cache_mark(tool, t)
            })
            .collect();
        if !tools.is_empty() {
            req.insert("tools".into(), Value::Array(tools));
        }
    }
    let parallel = body.get("parallel_tool_calls").and_then(Value::as_bool);
    let choice = match body.get("tool_choice") {
        _ if allowed.as_ref().is_some_and(|a| a.required) => Some(json!({"type": "any"})),
        _ if allowed.is_some() => Some(json!({"type": "auto"})),
        Some(Value::String(s)) if s == "required" => Some(json!({"type": "any"})),
        Some(Value::String(s)) if s == "none" => Some(json!({"type": "none"})),
        Some(Value::String(_)) => Some(json!({"type": "auto"})),
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .map(|name| json!({"type": "tool", "name": name})),
        _ => None,
    };
    if req.contains_key("tools") {
        let mut choice = choice.unwrap_or_else(|| json!({"type": "auto"}));
        if parallel == Some(false) && choice["type"] != "none" {
            choice["disable_parallel_tool_use"] = json!(true);
        }
        req.insert("tool_choice".into(), choice);
    }
    // The end user, for the provider's abuse tracking: OpenAI's
    // `safety_identifier` (which replaces `user`) or `user`, as Anthropic's
    // `metadata.user_id`, which takes at most 256 characters (a longer id
    // travels as its digest, as stable an id as the original).
    if let Some(user) = body
        .get("safety_identifier")
        .or_else(|| body.get("user"))
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        req.insert(
            "metadata".into(),
            json!({ "user_id": id_within(user, 256) }),
        );
    }
    if let Some(config) = output_config {
        req.insert("output_config".into(), config);
    }
    if stream {
        req.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(req))
}

/// An OpenAI `tool_choice` of type `allowed_tools`: the tools the model may
/// call, of those in `tools`, and whether it must call one (`mode:
/// "required"`) or may answer without (`auto`).
struct AllowedTools<'a> {
    names: Vec<&'a str>,
    required: bool,
}

/// The `allowed_tools` of an OpenAI `tool_choice`, `None` for any other
/// choice. Anthropic has no such choice: only the allowed tools are sent,
/// with `auto` or `any` — which is what the model may do (what OpenAI keeps
/// the full list for, a prompt cache that survives a change of allowed
/// tools, is lost: Anthropic caches the tools it is sent). A listed
/// tool that is not in `tools` is refused by name rather than dropped: the
/// model would be told of fewer tools than the client allowed.
fn allowed_tools(body: &Map<String, Value>) -> Result<Option<AllowedTools<'_>>, TranslateError> {
    let Some(choice) = body
        .get("tool_choice")
        .filter(|c| c.get("type").and_then(Value::as_str) == Some("allowed_tools"))
    else {
        return Ok(None);
    };
    let param = "tool_choice.allowed_tools";
    let Some(allowed) = choice.get("allowed_tools").filter(|a| a.is_object()) else {
        return Err(bad(
            param,
            format!("{param} must be an object with mode and tools."),
        ));
    };
    let required = match allowed.get("mode").and_then(Value::as_str) {
        Some("auto") => false,
        Some("required") => true,
        _ => {
            return Err(bad(
                &format!("{param}.mode"),
                format!("{param}.mode must be 'auto' or 'required'."),
            ))
        }
    };
    let declared: Vec<&str> = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
        .collect();
    let listed = allowed
        .get("tools")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            bad(
                &format!("{param}.tools"),
                format!("{param}.tools must list at least one tool."),
            )
        })?;
    let mut names = Vec::with_capacity(listed.len());
    for (j, t) in listed.iter().enumerate() {
        let name = t.pointer("/function/name").and_then(Value::as_str);
        match name {
            Some(n) if declared.contains(&n) => names.push(n),
            Some(n) => {
                return Err(bad(
                    &format!("{param}.tools[{j}]"),
                    format!("{param}.tools[{j}] names the function {n}, which is not in tools."),
                ))
            }
            None => {
                return Err(bad(
                    &format!("{param}.tools[{j}]"),
                    format!(
                        "{param}.tools[{j}] must name a function: \
                         {{\"type\": \"function\", \"function\": {{\"name\": …}}}}."
                    ),
                ))
            }
        }
    }
    Ok(Some(AllowedTools { names, required }))
}

fn push_blocks(out: &mut Vec<(String, Vec<Value>)>, role: &str, blocks: Vec<Value>) {
    // Consecutive messages of one role are merged: Anthropic wants turns to alternate.
    match out.last_mut() {
        Some((r, existing)) if r == role => existing.extend(blocks),
        _ => out.push((role.to_owned(), blocks)),
    }
}

/// The texts of an OpenAI `content`: a string, or each text part's.
fn texts_of(content: Option<&Value>) -> Vec<&str> {
    match content {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => Vec::new(),
    }
}

/// The text of an OpenAI `content` (a string, or text parts joined).
fn text_of(content: Option<&Value>) -> String {
    texts_of(content).join("\n")
}

/// A part's prompt-caching breakpoint (`cache_control`, as LiteLLM and
/// Anthropic-minded OpenAI clients put it on content parts, tool messages
/// and tools), carried to the Anthropic block made from it.
fn cache_mark(part: &Value) -> Option<&Value> {
    part.get("cache_control").filter(|c| !c.is_null())
}

fn with_cache_mark(mut block: Value, from: &Value) -> Value {
    if let Some(mark) = cache_mark(from) {
        block["cache_control"] = mark.clone();
    }
    block
}

/// A breakpoint that no block made from message `m` carries — one on the
/// message itself (LiteLLM's convention for a whole turn), or on a part that
/// made no block (an empty text) or none of its own (a tool message's parts)
/// — goes on the message's last block: Anthropic caches the prefix up to
/// and including the marked block, which is what the client marked.
fn keep_message_mark(blocks: &mut [Value], m: &Value) {
    if blocks.iter().any(|b| cache_mark(b).is_some()) {
        return;
    }
    let parts = m.get("content").and_then(Value::as_array);
    let mark = std::iter::once(m)
        .chain(parts.into_iter().flatten())
        .find_map(cache_mark);
    if let (Some(mark), Some(last)) = (mark, blocks.last_mut()) {
        last["cache_control"] = mark.clone();
    }
}

/// The non-empty text blocks of an OpenAI `content`, breakpoints kept.
fn text_blocks(content: Option<&Value>) -> Vec<Value> {
    match content {
        Some(Value::String(s)) if !s.is_empty() => vec![json!({"type": "text", "text": s})],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| {
                let text = p.get("text").and_then(Value::as_str)?;
                (!text.is_empty())
                    .then(|| with_cache_mark(json!({"type": "text", "text": text}), p))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A user message's content as blocks. Text that is empty or only
/// whitespace is left out: Anthropic refuses such a block (OpenAI takes it).
fn user_blocks(content: Option<&Value>, i: usize) -> Result<Vec<Value>, TranslateError> {
    let blank = |p: &Value| {
        p.get("type").and_then(Value::as_str) == Some("text")
            && p.get("text")
                .and_then(Value::as_str)
                .is_none_or(|t| t.trim().is_empty())
    };
    match content {
        Some(Value::String(s)) if s.trim().is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .filter(|(_, p)| !blank(p))
            .map(|(j, p)| match p.get("type").and_then(Value::as_str) {
                Some("text") => Ok(with_cache_mark(
                    json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))}),
                    p,
                )),
                Some("image_url") => {
                    let url = p
                        .pointer("/image_url/url")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    Ok(with_cache_mark(image_block(url), p))
                }
                Some("file") => Ok(with_cache_mark(document_block(p, i, j)?, p)),
                other => Err(bad(
                    &format!("messages[{i}].content[{j}].type"),
                    format!(
                        "content part type {} cannot be sent to this provider",
                        other.unwrap_or("(none)")
                    ),
                )),
            })
            .collect(),
        _ => Ok(Vec::new()),
    }
}

/// An OpenAI `file` part (a PDF, as OpenAI takes them: `file_data` a
/// `data:application/pdf;base64,` URL or bare base64) as an Anthropic
/// `document` block titled with its `filename`. A `file_id` names a file in
/// OpenAI's Files API, which Anthropic cannot read.
fn document_block(part: &Value, i: usize, j: usize) -> Result<Value, TranslateError> {
    let param = format!("messages[{i}].content[{j}].file");
    let file = part.get("file");
    let data = file
        .and_then(|f| f.get("file_data"))
        .and_then(Value::as_str);
    let Some(data) = data else {
        let message = if file.and_then(|f| f.get("file_id")).is_some() {
            "file_id names a file in OpenAI's Files API, which this model's provider \
             (Anthropic) cannot read; send the file's content as file_data."
        } else {
            "a file part needs file_data."
        };
        return Err(bad(&param, message));
    };
    let (media_type, base64) = match data.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, b64)) if meta.ends_with(";base64") => {
                (meta.trim_end_matches(";base64"), b64)
            }
            _ => {
                return Err(bad(
                    &param,
                    "file_data must be base64: data:application/pdf;base64,…",
                ))
            }
        },
        None => ("application/pdf", data),
    };
    if media_type != "application/pdf" {
        return Err(bad(
            &param,
            format!("file_data of type {media_type} cannot be sent to this model's provider (Anthropic), which reads PDF files"),
        ));
    }
    let mut block = json!({"type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": base64}});
    if let Some(name) = file
        .and_then(|f| f.get("filename"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        // Anthropic takes titles of up to 500 characters.
        block["title"] = json!(name.chars().take(500).collect::<String>());
    }
    Ok(block)
}

/// An Anthropic `document` block as an OpenAI content part, when it has one:
/// a base64 PDF becomes a `file` part (OpenAI reads PDFs), plain text a
/// text part. URL, Files API and content-block sources have no OpenAI form.
fn openai_document_part(block: &Value) -> Option<Value> {
    let source = block.get("source")?;
    match (
        source.get("type").and_then(Value::as_str),
        source.get("media_type").and_then(Value::as_str),
    ) {
        (Some("base64"), Some("application/pdf")) => {
            let data = source.get("data").and_then(Value::as_str)?;
            let filename = block
                .get("title")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .unwrap_or("document.pdf");
            Some(json!({"type": "file", "file": {"filename": filename,
                "file_data": format!("data:application/pdf;base64,{data}")}}))
        }
        (Some("text"), _) => {
            let text = source.get("data").and_then(Value::as_str)?;
            Some(json!({"type": "text", "text": text}))
        }
        _ => None,
    }
}

/// A data URL becomes a base64 source; any other URL a url source.
fn image_block(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((meta, data)) = rest.split_once(',') {
            let media_type = meta.trim_end_matches(";base64");
            return json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}});
        }
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

// ---------------------------------------------------------------------------
// Anthropic response → OpenAI response (the `anthropic` provider)
// ---------------------------------------------------------------------------

/// OpenAI's `finish_reason` for an Anthropic `stop_reason`.
pub fn finish_reason(stop_reason: Option<&str>) -> &'static str {
    match stop_reason {
        // Cut short either way: by the answer's limit or the context window.
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

/// Anthropic's `stop_reason` for an OpenAI `finish_reason`.
pub fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls") | Some("function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// An Anthropic `usage`: its four counts, which a stream's `message_delta`
/// may repeat (cumulatively) after `message_start`, and of the cache writes
/// those with a one-hour lifetime (`cache_creation.ephemeral_1h_input_tokens`),
/// which Anthropic bills at 2× the input price against 1.25× for five minutes.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Tokens {
    /// Prompt tokens neither read from nor written to the cache.
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    cache_creation_1h: u64,
    output: u64,
    /// Searches run by Anthropic's web search tool
    /// (`server_tool_use.web_search_requests`), billed apart from tokens.
    web_searches: u64,
}

impl Tokens {
    pub fn from_anthropic(u: Option<&Value>) -> Self {
        let mut t = Self::default();
        if let Some(u) = u {
            t.update(u);
        }
        t
    }

    /// Takes the counts `u` carries and keeps the others.
    pub fn update(&mut self, u: &Value) {
        for (key, field) in [
            ("input_tokens", &mut self.input),
            ("cache_read_input_tokens", &mut self.cache_read),
            ("cache_creation_input_tokens", &mut self.cache_creation),
            ("output_tokens", &mut self.output),
        ] {
            if let Some(n) = u.get(key).and_then(Value::as_u64) {
                *field = n;
            }
        }
        if let Some(n) = u
            .pointer("/cache_creation/ephemeral_1h_input_tokens")
            .and_then(Value::as_u64)
        {
            self.cache_creation_1h = n;
        }
        if let Some(n) = u
            .pointer("/server_tool_use/web_search_requests")
            .and_then(Value::as_u64)
        {
            self.web_searches = n;
        }
    }

    /// Every prompt token, read from or written to the cache or neither.
    fn prompt(&self) -> u64 {
        // Saturating: the counts are an upstream's numbers.
        self.input
            .saturating_add(self.cache_read)
            .saturating_add(self.cache_creation)
    }

    /// The counts a usage row records (every prompt token is a prompt token).
    pub fn usage(&self) -> crate::openai::Usage {
        crate::openai::Usage {
            prompt_tokens: self.prompt(),
            completion_tokens: self.output,
            cached_tokens: self.cache_read,
            cache_write_tokens: self.cache_creation,
            cache_write_1h_tokens: self.cache_creation_1h.min(self.cache_creation),
            web_search_requests: self.web_searches,
        }
    }

    /// OpenAI's `usage`: every prompt token in `prompt_tokens`, those read
    /// from the cache also in `prompt_tokens_details.cached_tokens`, those
    /// written to it also in `prompt_tokens_details.cache_write_tokens` (the
    /// OpenAI SDK's field) and in `cache_creation_input_tokens` (LiteLLM's
    /// name, which clients read from before the SDK had a field; Anthropic
    /// bills writes at 1.25× the input price) and, when some live an hour,
    /// split by lifetime in Anthropic's `cache_creation` object; each only
    /// when there are some.
    fn openai(&self) -> Value {
        let prompt = self.prompt();
        let mut usage = json!({
            "prompt_tokens": prompt,
            "completion_tokens": self.output,
            "total_tokens": prompt.saturating_add(self.output),
        });
        if self.cache_read > 0 {
            usage["prompt_tokens_details"]["cached_tokens"] = json!(self.cache_read);
        }
        if self.cache_creation > 0 {
            usage["prompt_tokens_details"]["cache_write_tokens"] = json!(self.cache_creation);
            usage["cache_creation_input_tokens"] = json!(self.cache_creation);
        }
        if self.cache_creation_1h > 0 {
            usage["cache_creation"] = cache_creation(self.usage());
        }
        usage
    }
}

/// Anthropic's `cache_creation`: the cache writes of `u` by lifetime.
fn cache_creation(u: crate::openai::Usage) -> Value {
    json!({
        "ephemeral_5m_input_tokens": u.cache_write_tokens - u.cache_write_1h_tokens,
        "ephemeral_1h_input_tokens": u.cache_write_1h_tokens,
    })
}

/// The sequence an Anthropic answer stopped at, when it stopped at one.
fn matched_stop_sequence<'a>(stop_reason: Option<&str>, holder: &'a Value) -> Option<&'a str> {
    holder
        .get("stop_sequence")
        .and_then(Value::as_str)
        .filter(|_| stop_reason == Some("stop_sequence"))
}

/// Turns an Anthropic message into an OpenAI `chat.completion`. Extended
/// thinking (asked for with `reasoning_effort`) comes back as the
/// message's `reasoning_content`, as DeepSeek and vLLM send reasoning, and
/// its signed blocks as `thinking_blocks`, as LiteLLM does: a client that
/// sends the message back as it came continues a tool loop with thinking.
pub fn response_from_anthropic(msg: &Value, created: u64) -> Value {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut thinking_blocks = Vec::new();
    let mut tool_calls = Vec::new();
    for block in msg
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("thinking") => {
                reasoning.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""));
                thinking_blocks.push(block.clone());
            }
            Some("redacted_thinking") => thinking_blocks.push(block.clone()),
            Some("tool_use") => tool_calls.push(json!({
                "id": block.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": block.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }});
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    if !thinking_blocks.is_empty() {
        message["thinking_blocks"] = Value::Array(thinking_blocks);
    }
    let stop = msg.get("stop_reason").and_then(Value::as_str);
    let mut choice = json!({
        "index": 0,
        "message": message,
        "logprobs": null,
        "finish_reason": finish_reason(stop),
    });
    // The sequence that ended the answer, where vLLM puts it: OpenAI's shape
    // has no place for it, and a client of `POST /v1/messages` reads it back.
    if let Some(seq) = matched_stop_sequence(stop, msg) {
        choice["stop_reason"] = json!(seq);
    }
    json!({
        "id": msg.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": msg.get("model").cloned().unwrap_or(Value::Null),
        "choices": [choice],
        "usage": Tokens::from_anthropic(msg.get("usage")).openai(),
    })
}

/// What one Anthropic stream event means for the OpenAI stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamStep {
    /// Chunks to emit now (zero or more).
    Chunks(Vec<Value>),
    /// `message_stop`: the final usage chunk; the stream is complete.
    Done(Value),
    /// An `error` event: the stream failed with this type and message.
    Error { kind: String, message: String },
}

/// Turns Anthropic stream events into OpenAI chunks as they arrive: text
/// deltas, thinking deltas (as `reasoning_content`) and tool-call argument
/// fragments each become their own chunk, so nothing is buffered into one
/// burst. A thinking block, once complete and signed, also comes as one
/// `thinking_blocks` delta, for the client to send back (see
/// [`response_from_anthropic`]).
#[derive(Debug, Default)]
pub struct AnthropicToOpenAiStream {
    id: String,
    model: String,
    created: u64,
    tokens: Tokens,
    /// The tool_use blocks seen, by Anthropic content-block index.
    tools: Vec<ToolBlock>,
    next_tool: u64,
    /// The thinking block being streamed: its index and what it said.
    thinking: Option<(u64, String, String)>,
    /// Thinking blocks sent so far: each `thinking_blocks` delta entry has
    /// its own `index`, as the OpenAI SDKs' stream accumulators require of
    /// list entries (they merge entries by index).
    thinking_blocks: u64,
}

/// A streamed tool_use block, as an OpenAI tool call.
#[derive(Debug)]
struct ToolBlock {
    /// Its Anthropic content-block index.
    block: u64,
    /// Its OpenAI `tool_calls[].index`.
    tool: u64,
    /// The `input` its `content_block_start` carried (`{}` from Anthropic).
    input: Value,
    /// Whether any argument text was sent: a tool without parameters streams
    /// none (or only `""`), and OpenAI clients parse the arguments they
    /// add up, which must then be `{}` rather than nothing.
    streamed: bool,
}

impl AnthropicToOpenAiStream {
    pub fn new(created: u64) -> Self {
        Self {
            created,
            ..Self::default()
        }
    }

    /// A finished thinking block as a `thinking_blocks` delta entry, with
    /// its `index` among the message's thinking blocks.
    fn thinking_entry(&mut self, mut block: Value) -> Value {
        block["index"] = json!(self.thinking_blocks);
        self.thinking_blocks += 1;
        block
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    }

    /// Handles one event given its name (the `event:` field) and data.
    pub fn step(&mut self, event: &str, data: &Value) -> StreamStep {
        let kind = data.get("type").and_then(Value::as_str).unwrap_or(event);
        match kind {
            "message_start" => {
                let msg = data.get("message").cloned().unwrap_or(Value::Null);
                self.id = msg
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                self.model = msg
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                self.tokens = Tokens::from_anthropic(msg.get("usage"));
                StreamStep::Chunks(vec![
                    self.chunk(json!({"role": "assistant", "content": ""}), None)
                ])
            }
            "content_block_start" => {
                let block = data.get("content_block").cloned().unwrap_or(Value::Null);
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let tool = self.next_tool;
                        self.next_tool += 1;
                        self.tools.push(ToolBlock {
                            block: index,
                            tool,
                            input: block.get("input").cloned().unwrap_or_else(|| json!({})),
                            streamed: false,
                        });
                        let delta = json!({"tool_calls": [{
                            "index": tool,
                            "id": block.get("id").cloned().unwrap_or(Value::Null),
                            "type": "function",
                            "function": {"name": block.get("name").cloned().unwrap_or(Value::Null), "arguments": ""},
                        }]});
                        StreamStep::Chunks(vec![self.chunk(delta, None)])
                    }
                    Some("text") => match block.get("text").and_then(Value::as_str) {
                        Some(t) if !t.is_empty() => {
                            StreamStep::Chunks(vec![self.chunk(json!({"content": t}), None)])
                        }
                        _ => StreamStep::Chunks(Vec::new()),
                    },
                    Some("thinking") => {
                        self.thinking = Some((index, String::new(), String::new()));
                        StreamStep::Chunks(Vec::new())
                    }
                    Some("redacted_thinking") => {
                        let entry = self.thinking_entry(block);
                        StreamStep::Chunks(vec![
                            self.chunk(json!({"thinking_blocks": [entry]}), None)
                        ])
                    }
                    _ => StreamStep::Chunks(Vec::new()),
                }
            }
            "content_block_stop" => {
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
                if let Some(t) = self.tools.iter_mut().find(|t| t.block == index) {
                    if t.streamed {
                        return StreamStep::Chunks(Vec::new());
                    }
                    // Nothing streamed: the arguments are the block's whole
                    // input, as in a complete answer (`{}` for no parameters).
                    t.streamed = true;
                    let args = match &t.input {
                        input @ Value::Object(_) => input.to_string(),
                        _ => "{}".to_owned(),
                    };
                    let d =
                        json!({"tool_calls": [{"index": t.tool, "function": {"arguments": args}}]});
                    return StreamStep::Chunks(vec![self.chunk(d, None)]);
                }
                match self.thinking.take() {
                    Some((i, thinking, signature)) if i == index => {
                        let entry = self.thinking_entry(
                            json!({"type": "thinking", "thinking": thinking, "signature": signature}),
                        );
                        StreamStep::Chunks(vec![
                            self.chunk(json!({"thinking_blocks": [entry]}), None)
                        ])
                    }
                    other => {
                        self.thinking = other;
                        StreamStep::Chunks(Vec::new())
                    }
                }
            }
            "content_block_delta" => {
                let delta = data.get("delta").cloned().unwrap_or(Value::Null);
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        let text = delta.get("text").cloned().unwrap_or(json!(""));
                        StreamStep::Chunks(vec![self.chunk(json!({"content": text}), None)])
                    }
                    Some("thinking_delta") => {
                        let text = delta.get("thinking").and_then(Value::as_str).unwrap_or("");
                        if let Some((_, thought, _)) = &mut self.thinking {
                            thought.push_str(text);
                        }
                        StreamStep::Chunks(vec![
                            self.chunk(json!({"reasoning_content": text}), None)
                        ])
                    }
                    Some("signature_delta") => {
                        let sig = delta.get("signature").and_then(Value::as_str).unwrap_or("");
                        if let Some((_, _, signature)) = &mut self.thinking {
                            signature.push_str(sig);
                        }
                        StreamStep::Chunks(Vec::new())
                    }
                    Some("input_json_delta") => {
                        let part = delta.get("partial_json").cloned().unwrap_or(json!(""));
                        let block = self.tools.iter_mut().find(|t| t.block == index);
                        let tool = match block {
                            Some(t) => {
                                t.streamed |= part.as_str().is_some_and(|p| !p.is_empty());
                                t.tool
                            }
                            None => 0,
                        };
                        let d = json!({"tool_calls": [{"index": tool, "function": {"arguments": part}}]});
                        StreamStep::Chunks(vec![self.chunk(d, None)])
                    }
                    _ => StreamStep::Chunks(Vec::new()),
                }
            }
            "message_delta" => {
                if let Some(u) = data.get("usage") {
                    self.tokens.update(u);
                }
                let reason = data.pointer("/delta/stop_reason").and_then(Value::as_str);
                match reason {
                    Some(r) => {
                        let mut chunk = self.chunk(json!({}), Some(finish_reason(Some(r))));
                        let delta = data.get("delta").unwrap_or(&Value::Null);
                        if let Some(seq) = matched_stop_sequence(reason, delta) {
                            chunk["choices"][0]["stop_reason"] = json!(seq);
                        }
                        StreamStep::Chunks(vec![chunk])
                    }
                    None => StreamStep::Chunks(Vec::new()),
                }
            }
            "message_stop" => StreamStep::Done(json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [],
                "usage": self.tokens.openai(),
            })),
            "error" => StreamStep::Error {
                kind: data
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error")
                    .to_owned(),
                message: data
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            },
            // ping, and event types added later
            _ => StreamStep::Chunks(Vec::new()),
        }
    }
}

// ---------------------------------------------------------------------------
// Anthropic request → OpenAI request (inbound POST /v1/messages)
// ---------------------------------------------------------------------------

/// A validated `POST /v1/messages` body, as the OpenAI request the router takes.
#[derive(Debug, Clone)]
pub struct MessagesRequest {
    pub model: String,
    pub stream: bool,
    /// Whether the client asked for extended thinking (`thinking.type`
    /// `enabled` or `adaptive`): a provider's reasoning text (DeepSeek's
    /// and vLLM's `reasoning_content`) then comes back as `thinking` blocks.
    pub thinking: bool,
    /// The equivalent OpenAI chat-completions body.
    pub openai_body: Map<String, Value>,
    /// What that body cannot carry, if anything — Anthropic's own tools
    /// (`web_search_…`, `code_execution_…`), block types with no OpenAI form
    /// (`server_tool_use`, `web_search_tool_result`, a `document` by URL, …), more
    /// than four stop sequences — as the refusal to give unless every
    /// deployment of the alias speaks the Messages API itself (an Anthropic
    /// deployment is sent the client's own body).
    pub untranslatable: Option<TranslateError>,
    /// When the request uses what Anthropic bills beyond tokens — its web
    /// search or code execution tools, `container`, `mcp_servers` — the
    /// refusal to give unless the alias's Anthropic providers enable them
    /// (`server_tools`).
    pub server_tool: Option<TranslateError>,
}

/// What a client of `POST /v1/messages` sent, for an Anthropic deployment
/// to be sent as it came: the body (a [`MessagesRequest::parse`] accepted
/// one) and the client's `anthropic-beta` header, which the features it
/// names need (interleaved thinking, context management, …).
#[derive(Debug, Clone, Default)]
pub struct NativeMessages {
    pub body: Map<String, Value>,
    pub beta: Option<String>,
}

/// The Messages request an Anthropic deployment is sent for a client that
/// spoke Anthropic's API (a body [`MessagesRequest::parse`] accepted): the
/// client's own fields as they came — prompt-caching markers, `top_k`,
/// `tool_result.is_error`, system blocks, the whole `metadata.user_id`,
/// extended thinking and earlier turns' signed thinking blocks, Anthropic's
/// own tools, `context_management`, `output_config` (with the client's
/// `anthropic-beta` header, see [`NativeMessages`]) — rather than their trip
/// through the OpenAI shape, which has no place for them; with the
/// deployment's model. Only Anthropic's documented request fields are sent
/// ([`NATIVE_FIELDS`]: an OpenAI-minded client's `user` or `n` would be a
/// 400 there and is ignored by the translation), and of a message only its
/// `role` and `content`; `service_tier` only as `standard_only` (its other
/// value, `auto`, is the default and may cost more). Left out too is what
/// Anthropic would refuse but an OpenAI provider takes, so that one request
/// works on either: empty text blocks and turns (a cache breakpoint on an
/// empty block moves to the block before it), `metadata` keys other than
/// `user_id`, thinking blocks without a signature (made by Switchyard from
/// another provider's reasoning text; only Anthropic signs), `tools: []`
/// with its `tool_choice`. Tool ids another provider made outside Anthropic's
/// pattern are rewritten in calls and results alike (`tool_ids`);
/// and thinking is turned off when the current tool
/// loop was opened without it (by a fallback provider): Anthropic requires
/// the loop's first assistant message to open with its thinking.
pub fn native_request(original: &Map<String, Value>, model: &str, stream: bool) -> Value {
    let mut req = Map::new();
    req.insert("model".into(), json!(model));
    let with_tools = original
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    for key in NATIVE_FIELDS {
        let Some(v) = original.get(key).filter(|v| !v.is_null()) else {
            continue;
        };
        if (key == "tools" || key == "tool_choice") && !with_tools {
            continue;
        }
        req.insert(key.into(), v.clone());
    }
    if original.get("service_tier").and_then(Value::as_str) == Some("standard_only") {
        req.insert("service_tier".into(), json!("standard_only"));
    }
    // `user_id` is the one field Anthropic's metadata takes; anything else a
    // client put there (other gateways accept free-form tags) would be a 400.
    if let Some(user) = original
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        req.insert("metadata".into(), json!({ "user_id": user }));
    }
    let messages: Vec<Value> = original
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(native_message)
        .collect();
    let mut messages = messages;
    settle_thinking(&mut req, &mut messages);
    req.insert("messages".into(), Value::Array(messages));
    if stream {
        req.insert("stream".into(), json!(true));
    }
    Value::Object(req)
}

/// The request fields of Anthropic's Messages API that an Anthropic
/// deployment is sent as the client gave them (`model`, `stream`,
/// `messages` and `metadata` are set apart).
pub const NATIVE_FIELDS: [&str; 16] = [
    "max_tokens",
    "cache_control",
    "output_config",
    "inference_geo",
    "container",
    "mcp_servers",
    "system",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "context_management",
    "output_format",
];

/// One message as Anthropic takes it, or `None` when nothing of it is left.
fn native_message(m: &Value) -> Option<Value> {
    let role = m.get("role").cloned().unwrap_or(Value::Null);
    let blocks = match m.get("content") {
        Some(Value::Array(blocks)) => blocks,
        // Anthropic refuses empty content where an OpenAI provider
        // shrugs: the same request must work on either.
        Some(Value::String(s)) if s.is_empty() => return None,
        content => {
            return Some(json!({"role": role, "content": content.cloned().unwrap_or(Value::Null)}))
        }
    };
    let mut kept: Vec<Value> = Vec::with_capacity(blocks.len());
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("thinking")
                if b.get("signature")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty) => {}
            Some("text") if b.get("text").and_then(Value::as_str) == Some("") => {
                // Not onto a thinking block, which takes no breakpoint (and
                // whose signed form must stay as it is).
                let target = kept.last_mut().filter(|l| {
                    !matches!(
                        l.get("type").and_then(Value::as_str),
                        Some("thinking" | "redacted_thinking")
                    ) && cache_mark(l).is_none()
                });
                if let (Some(mark), Some(last)) = (cache_mark(b), target) {
                    last["cache_control"] = mark.clone();
                }
            }
            // Ids another provider made (a fallback's, or a client's from
            // another API) may be outside what Anthropic takes.
            Some("tool_use") => {
                let mut b = b.clone();
                rewrite_tool_id(&mut b, "id");
                kept.push(b);
            }
            Some("tool_result") => {
                let mut b = b.clone();
                rewrite_tool_id(&mut b, "tool_use_id");
                kept.push(b);
            }
            _ => kept.push(b.clone()),
        }
    }
    // A turn that held only reasoning (or nothing) says nothing (Anthropic
    // joins the turns on either side of it).
    (!kept.is_empty()).then(|| json!({"role": role, "content": kept}))
}

/// Turns a request's extended thinking off when the current tool loop was
/// opened without it (see [`thinking_continues`]), which Anthropic would
/// refuse: explicitly (some models think unless told not to), and the
/// turn's own thinking blocks go too, since with thinking off Anthropic
/// refuses them in the final assistant message.
fn settle_thinking(req: &mut Map<String, Value>, messages: &mut Vec<Value>) {
    if req.contains_key("thinking") && thinking_must_stop(messages) {
        turn_thinking_off(req, messages);
    }
}

/// Whether the current tool loop of `messages` was opened without
/// thinking, so that thinking must stop (see [`thinking_continues`]).
fn thinking_must_stop(messages: &[Value]) -> bool {
    !thinking_continues(&messages[turn_start(messages)..])
}

/// Thinking off, explicitly, and the current turn's thinking blocks gone.
fn turn_thinking_off(req: &mut Map<String, Value>, messages: &mut Vec<Value>) {
    let start = turn_start(messages);
    req.insert("thinking".into(), json!({"type": "disabled"}));
    for m in &mut messages[start..] {
        if let Some(blocks) = m.get_mut("content").and_then(Value::as_array_mut) {
            blocks.retain(|b| {
                !matches!(
                    b.get("type").and_then(Value::as_str),
                    Some("thinking" | "redacted_thinking")
                )
            });
        }
    }
    messages.retain(|m| {
        m.get("content")
            .and_then(Value::as_array)
            .is_none_or(|b| !b.is_empty())
    });
}

/// Where the current assistant turn starts: after the last user message
/// that says something (not only tool results). Anthropic counts a whole
/// tool loop as one turn.
fn turn_start(messages: &[Value]) -> usize {
    let says_something = |m: &Value| match m.get("content") {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) != Some("tool_result")),
        _ => true,
    };
    messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) == Some("user") && says_something(m))
        .map_or(0, |i| i + 1)
}

/// Whether extended thinking can go on in the current `turn` (from
/// [`turn_start`]): unless it is a tool loop whose first assistant message does not open with
/// (signed) thinking — a fallback provider made it — which Anthropic
/// refuses with thinking on. (Later messages of the loop need none: without
/// interleaved thinking Claude thinks once, at the start of the turn.)
fn thinking_continues(turn: &[Value]) -> bool {
    let kind = |b: &Value| b.get("type").and_then(Value::as_str).map(str::to_owned);
    let mut assistant = turn
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .map(|m| m.get("content").and_then(Value::as_array));
    let opener = assistant.clone().next().flatten();
    let calls = assistant.any(|blocks| {
        blocks
            .into_iter()
            .flatten()
            .any(|b| kind(b).as_deref() == Some("tool_use"))
    });
    !calls
        || matches!(
            opener.and_then(|b| b.first()).and_then(kind).as_deref(),
            Some("thinking" | "redacted_thinking")
        )
}

/// OpenAI's `user` for an Anthropic `metadata.user_id`. OpenAI refuses a
/// `user` over 64 characters (OpenRouter over 128), and Claude Code's ids
/// run to ~150: a longer id travels as the hex SHA-256 of itself, as stable
/// an end-user id as the original for the provider's abuse tracking.
fn openai_user(user_id: &str) -> String {
    id_within(user_id, 64)
}

/// `id` as it is when it has at most `max` bytes, else its hex SHA-256 (64
/// characters): as stable an end-user id as the original.
fn id_within(id: &str, max: usize) -> String {
    if id.len() <= max {
        return id.to_owned();
    }
    crate::trace::encode_hex(&<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes()))
}

/// What a Messages body is parsed for: `count_tokens` takes no `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Generate,
    Count,
}

/// An estimate of the input tokens of a Messages body, for
/// `POST /v1/messages/count_tokens` and a stream's `message_start` (the
/// exact count is known only when the provider reports its usage, at the
/// end). Providers' tokenizers differ and Switchyard carries none of them,
/// so it counts what every tokenizer must encode: the text of the system
/// prompt, the messages (tool inputs and results included) and the tool
/// definitions, at 3.5 bytes of UTF-8 a token (English prose runs at about
/// 4, code and other scripts denser; leaning high keeps a client's context
/// management on the safe side), plus 3 tokens a message, and 1,600 an image
/// (Anthropic's cost of a ~1.15-megapixel image). Thinking blocks from
/// earlier turns count nothing: they are not sent on.
pub fn estimate_input_tokens(body: &Map<String, Value>) -> u64 {
    const PER_MESSAGE: u64 = 3;
    const PER_ATTACHMENT: u64 = 1_600;
    fn weigh(v: &Value, bytes: &mut u64, fixed: &mut u64) {
        match v {
            Value::String(s) => *bytes += s.len() as u64,
            Value::Number(_) | Value::Bool(_) => *bytes += 2,
            Value::Null => {}
            Value::Array(items) => items.iter().for_each(|x| weigh(x, bytes, fixed)),
            Value::Object(o) => match o.get("type").and_then(Value::as_str) {
                Some("image" | "document") => *fixed += PER_ATTACHMENT,
                // Earlier turns' reasoning is not sent on (nor counted by Anthropic).
                Some("thinking" | "redacted_thinking") => {}
                _ => {
                    for (k, x) in o {
                        match k.as_str() {
                            // Block markup and ids are not text the model reads.
                            "type" | "id" | "tool_use_id" | "cache_control" => {}
                            // A tool call's input reaches it as JSON, keys and all.
                            "input" => *bytes += x.to_string().len() as u64,
                            _ => weigh(x, bytes, fixed),
                        }
                    }
                }
            },
        }
    }
    let (mut bytes, mut fixed) = (0, 0);
    if let Some(system) = body.get("system") {
        weigh(system, &mut bytes, &mut fixed);
    }
    let messages = body.get("messages").and_then(Value::as_array);
    for m in messages.into_iter().flatten() {
        fixed += PER_MESSAGE;
        if let Some(content) = m.get("content") {
            weigh(content, &mut bytes, &mut fixed);
        }
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        // Definitions reach the model as JSON, keys and all.
        bytes += tools.to_string().len() as u64;
    }
    (bytes * 2).div_ceil(7) + fixed
}

fn a_missing(param: &str) -> TranslateError {
    bad(param, format!("{param}: Field required"))
}

impl MessagesRequest {
    /// Validates an Anthropic Messages body and translates it.
    pub fn parse(body: &Map<String, Value>) -> Result<Self, TranslateError> {
        Self::parse_for(body, Purpose::Generate)
    }

    /// Validates a `POST /v1/messages/count_tokens` body (a Messages body
    /// without `max_tokens`) and translates it, for its model and checks.
    pub fn parse_count(body: &Map<String, Value>) -> Result<Self, TranslateError> {
        Self::parse_for(body, Purpose::Count)
    }

    fn parse_for(body: &Map<String, Value>, purpose: Purpose) -> Result<Self, TranslateError> {
        let model = match body.get("model") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(bad("model", "model: Input should be a valid string")),
            None => return Err(a_missing("model")),
        };
        let max_tokens = match body.get("max_tokens") {
            Some(v) if v.as_u64().is_some_and(|n| n >= 1) => Some(v.clone()),
            Some(_) => {
                return Err(bad(
                    "max_tokens",
                    "max_tokens: Input should be a positive integer",
                ))
            }
            None if purpose == Purpose::Count => None,
            None => return Err(a_missing("max_tokens")),
        };
        let messages = match body.get("messages") {
            Some(Value::Array(m)) => m,
            Some(_) => return Err(bad("messages", "messages: Input should be a valid list")),
            None => return Err(a_missing("messages")),
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("stream", "stream: Input should be a valid boolean")),
        };
        let thinking = match body.get("thinking") {
            None | Some(Value::Null) => false,
            Some(Value::Object(t)) => match t.get("type").and_then(Value::as_str) {
                Some("enabled" | "adaptive") => true,
                Some("disabled") => false,
                _ => {
                    return Err(bad(
                        "thinking.type",
                        "thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'",
                    ))
                }
            },
            Some(_) => {
                return Err(bad(
                    "thinking",
                    "thinking: Input should be a valid dictionary",
                ))
            }
        };
        let mut out: Vec<Value> = Vec::new();
        out.extend(system_message(body)?);
        // The first thing the OpenAI shape cannot carry; the request is
        // refused with it unless Anthropic itself serves the alias.
        let mut untranslatable: Option<TranslateError> = None;
        for (i, m) in messages.iter().enumerate() {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| a_missing(&format!("messages.{i}.role")))?;
            if role != "user" && role != "assistant" {
                return Err(bad(
                    &format!("messages.{i}.role"),
                    format!("messages.{i}.role: Input should be 'user' or 'assistant'"),
                ));
            }
            let param = format!("messages.{i}.content");
            match m.get("content") {
                Some(Value::String(s)) => out.push(json!({"role": role, "content": s})),
                // Anthropic's rule: an empty turn would otherwise vanish
                // from the translation, and a lone one leave no message.
                Some(Value::Array(blocks))
                    if blocks.is_empty() && !(role == "assistant" && i + 1 == messages.len()) =>
                {
                    return Err(bad(
                        &param,
                        format!(
                            "{param}: all messages must have non-empty content except for \
                             the optional final assistant message"
                        ),
                    ));
                }
                Some(Value::Array(blocks)) => {
                    translate_blocks(role, blocks, i, &mut out, &mut untranslatable)?;
                }
                Some(_) => {
                    return Err(bad(
                        &param,
                        format!(
                            "{param}: Input should be a valid string or a list of content blocks"
                        ),
                    ))
                }
                None => return Err(a_missing(&param)),
            }
        }
        let mut openai = Map::new();
        openai.insert("model".into(), json!(model));
        openai.insert("messages".into(), Value::Array(out));
        // Structured outputs: the same JSON schema as OpenAI's
        // `response_format` (not `strict`, whose extra rules Anthropic's
        // schemas need not meet). `context_management` is not carried: it
        // only trims what Anthropic keeps of earlier tool results.
        let output_format = body
            .get("output_format")
            .filter(|f| !f.is_null())
            .or_else(|| body.get("output_config").and_then(|c| c.get("format")));
        match output_format {
            None | Some(Value::Null) => {}
            Some(f)
                if f.get("type").and_then(Value::as_str) == Some("json_schema")
                    && f.get("schema").is_some_and(Value::is_object) =>
            {
                openai.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": {"name": "output", "schema": f["schema"]}}),
                );
            }
            Some(_) => {
                untranslatable.get_or_insert_with(|| {
                    bad(
                        "output_format",
                        "output_format: only a json_schema with a schema object can be sent to every provider of this model",
                    )
                });
            }
        }
        if let Some(max_tokens) = max_tokens {
            openai.insert("max_tokens".into(), max_tokens);
        }
        match body.get("temperature") {
            None | Some(Value::Null) => {}
            // Anthropic's range is 0–1, and an OpenAI provider would take
            // up to 2: refused here so that the answer does not depend on
            // the provider behind the alias.
            Some(t) => match t.as_f64() {
                Some(x) if (0.0..=1.0).contains(&x) => {
                    openai.insert("temperature".into(), t.clone());
                }
                Some(x) if x > 1.0 => {
                    return Err(bad(
                        "temperature",
                        "temperature: Input should be less than or equal to 1",
                    ))
                }
                Some(_) => {
                    return Err(bad(
                        "temperature",
                        "temperature: Input should be greater than or equal to 0",
                    ))
                }
                None => {
                    return Err(bad(
                        "temperature",
                        "temperature: Input should be a valid number",
                    ))
                }
            },
        }
        if let Some(v) = body.get("top_p") {
            openai.insert("top_p".into(), v.clone());
        }
        if let Some(k) = top_k(body)? {
            openai.insert("top_k".into(), k);
        }
        match body.get("stop_sequences") {
            None | Some(Value::Null) => {}
            Some(Value::Array(stops)) if stops.iter().all(Value::is_string) => {
                // Passed on as OpenAI's `stop`, which takes at most four: say
                // so here rather than let that check name a field the client
                // never sent.
                if stops.len() > MAX_STOP_SEQUENCES {
                    untranslatable.get_or_insert_with(|| {
                        bad(
                            "stop_sequences",
                            format!(
                                "stop_sequences: at most {MAX_STOP_SEQUENCES} are supported \
                                 by this model's providers"
                            ),
                        )
                    });
                } else if !stops.is_empty() {
                    openai.insert("stop".into(), Value::Array(stops.clone()));
                }
            }
            Some(_) => {
                return Err(bad(
                    "stop_sequences",
                    "stop_sequences: Input should be a valid list of strings",
                ))
            }
        }
        // An empty `tools` list means no tools (OpenAI refuses an empty
        // one), and without tools a `tool_choice` has nothing to choose.
        let tools = body
            .get("tools")
            .and_then(Value::as_array)
            .filter(|t| !t.is_empty());
        let mut server_tool = None;
        if let Some(tools) = tools {
            let mut functions = Vec::with_capacity(tools.len());
            for (i, t) in tools.iter().enumerate() {
                match anthropic_tool(i, t) {
                    Some((refusal, billed)) => {
                        untranslatable.get_or_insert(refusal);
                        if server_tool.is_none() {
                            server_tool = billed;
                        }
                    }
                    None => functions.push(custom_tool(i, t)?),
                }
            }
            if !functions.is_empty() {
                openai.insert("tools".into(), Value::Array(functions));
            }
        }
        // Anthropic's workspace resources: billed beyond tokens too, and no
        // other provider has them.
        for key in ["container", "mcp_servers"] {
            if body.get(key).is_some_and(|v| !v.is_null()) {
                untranslatable.get_or_insert_with(|| {
                    bad(key, format!("{key}: only Anthropic's API takes it, and this model's providers are not all Anthropic"))
                });
                server_tool.get_or_insert_with(|| {
                    bad(key, format!("{key}: Anthropic's containers and MCP connector are billed beyond tokens; \
                        they are not enabled for this model (its providers' server_tools setting)"))
                });
            }
        }
        let with_functions = openai.contains_key("tools");
        if let Some(choice) = body.get("tool_choice").filter(|_| with_functions) {
            let (mapped, parallel_off) = match choice.get("type").and_then(Value::as_str) {
                Some("any") => (json!("required"), choice.get("disable_parallel_tool_use")),
                Some("none") => (json!("none"), None),
                Some("tool") => (
                    json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or(Value::Null)}}),
                    choice.get("disable_parallel_tool_use"),
                ),
                _ => (json!("auto"), choice.get("disable_parallel_tool_use")),
            };
            openai.insert("tool_choice".into(), mapped);
            if parallel_off.and_then(Value::as_bool) == Some(true) {
                openai.insert("parallel_tool_calls".into(), json!(false));
            }
        }
        match body.get("metadata").and_then(|m| m.get("user_id")) {
            None | Some(Value::Null) => {}
            Some(Value::String(user)) if user.is_empty() => {}
            Some(Value::String(user)) => {
                openai.insert("user".into(), json!(openai_user(user)));
            }
            Some(_) => {
                return Err(bad(
                    "metadata.user_id",
                    "metadata.user_id: Input should be a valid string",
                ))
            }
        }
        if stream {
            openai.insert("stream".into(), json!(true));
            openai.insert("stream_options".into(), json!({"include_usage": true}));
        }
        Ok(Self {
            model,
            stream,
            thinking,
            openai_body: openai,
            untranslatable,
            server_tool,
        })
    }
}

/// The system message for a Messages body's `system`: a string, or text
/// blocks joined by blank lines. An empty one is left out rather than sent
/// as an empty system message, which says nothing and which some providers
/// refuse.
fn system_message(body: &Map<String, Value>) -> Result<Option<Value>, TranslateError> {
    let text = match body.get("system") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n"),
        Some(_) => {
            return Err(bad(
                "system",
                "system: Input should be a valid string or list of text blocks",
            ))
        }
    };
    Ok((!text.is_empty()).then(|| json!({"role": "system", "content": text})))
}

/// A Messages body's `top_k`, checked as Anthropic checks it (an integer,
/// at least 0) so that the answer does not depend on the provider behind
/// the alias (a negative one would reach vLLM as "no limit").
fn top_k(body: &Map<String, Value>) -> Result<Option<Value>, TranslateError> {
    match body.get("top_k") {
        None | Some(Value::Null) => Ok(None),
        Some(k) if k.is_u64() => Ok(Some(k.clone())),
        Some(k) if k.is_i64() => Err(bad(
            "top_k",
            "top_k: Input should be greater than or equal to 0",
        )),
        Some(_) => Err(bad("top_k", "top_k: Input should be a valid integer")),
    }
}

/// The refusal for one of Anthropic's own tools (`web_search`, `bash`,
/// `computer`, … — they have a versioned `type`): they are run by Anthropic
/// or need its trained schemas, so another provider cannot honour them, and
/// they are refused by name rather than sent without a schema — unless
/// Anthropic serves the alias ([`MessagesRequest::untranslatable`]); with,
/// for the tools Anthropic bills per use, the refusal to give unless the
/// providers enable them ([`MessagesRequest::server_tool`]).
fn anthropic_tool(i: usize, tool: &Value) -> Option<(TranslateError, Option<TranslateError>)> {
    let kind = tool.get("type")?;
    if kind.is_null() || kind == "custom" {
        return None;
    }
    let kind = kind
        .as_str()
        .map_or_else(|| kind.to_string(), str::to_owned);
    let param = format!("tools.{i}.type");
    // Billed per use (searches, container time); the others (bash, text
    // editor, computer, memory, web fetch, …) cost only tokens.
    let billed = ["web_search_", "code_execution_"]
        .iter()
        .any(|p| kind.starts_with(p));
    Some((
        bad(
            &param,
            format!(
                "{param}: {kind} is one of Anthropic's own tools, which only Anthropic can run; \
                 route this model to an Anthropic deployment, or declare a custom tool (name, description, input_schema) instead"
            ),
        ),
        billed.then(|| {
            bad(
                &param,
                format!(
                    "{param}: {kind} is one of Anthropic's own tools, which Anthropic bills per use beyond tokens; \
                     they are not enabled for this model (its providers' server_tools setting)"
                ),
            )
        }),
    ))
}

/// A client tool (not [`anthropic_tool`]) as an OpenAI function.
fn custom_tool(i: usize, tool: &Value) -> Result<Value, TranslateError> {
    let Some(t) = tool.as_object() else {
        return Err(bad(
            &format!("tools.{i}"),
            format!("tools.{i}: Input should be a valid dictionary"),
        ));
    };
    let name = match t.get("name") {
        Some(Value::String(n)) if !n.is_empty() => n,
        Some(_) => {
            return Err(bad(
                &format!("tools.{i}.name"),
                format!("tools.{i}.name: Input should be a non-empty string"),
            ))
        }
        None => return Err(a_missing(&format!("tools.{i}.name"))),
    };
    let schema = match t.get("input_schema") {
        Some(s @ Value::Object(_)) => s,
        Some(_) => {
            return Err(bad(
                &format!("tools.{i}.input_schema"),
                format!("tools.{i}.input_schema: Input should be a valid dictionary"),
            ))
        }
        None => return Err(a_missing(&format!("tools.{i}.input_schema"))),
    };
    let mut function = json!({"name": name, "parameters": schema});
    if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
        function["description"] = d.clone();
    }
    Ok(json!({"type": "function", "function": function}))
}

/// An Anthropic image block as an OpenAI `image_url` part (a base64 source
/// as a data URL).
/// An Anthropic image block as an OpenAI `image_url` part: a base64 source
/// as a data URL, a URL source as it is. An image from Anthropic's Files API
/// (`file_id`) has no OpenAI form: `None`.
fn image_url_part(block: &Value) -> Option<Value> {
    let src = block.get("source").unwrap_or(&Value::Null);
    let url = match src.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            src.get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png"),
            src.get("data").and_then(Value::as_str).unwrap_or("")
        ),
        _ => src.get("url").and_then(Value::as_str)?.to_owned(),
    };
    Some(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn translate_blocks(
    role: &str,
    blocks: &[Value],
    i: usize,
    out: &mut Vec<Value>,
    untranslatable: &mut Option<TranslateError>,
) -> Result<(), TranslateError> {
    let mut parts: Vec<Value> = Vec::new();
    let mut tool_calls: Vec<Value> = Vec::new();
    let mut tool_results: Vec<Value> = Vec::new();
    let mut result_parts: Vec<Value> = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => parts
                .push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or(json!(""))})),
            Some("image") => match image_url_part(b) {
                Some(part) => parts.push(part),
                None => unsupported(i, j, "image with a file source", &mut parts, untranslatable),
            },
            Some("tool_use") => tool_calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": b.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            Some("tool_result") => {
                let content = match b.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(c)) => {
                        // OpenAI's tool messages hold text only: a result's
                        // images and PDFs (a screenshot, a file read) go in
                        // the user message that follows, so the model still
                        // sees them; a text document is text.
                        let mut texts: Vec<String> = Vec::new();
                        for (k, x) in c.iter().enumerate() {
                            let kind = x.get("type").and_then(Value::as_str);
                            let part = match kind {
                                Some("text") => {
                                    texts.extend(
                                        x.get("text").and_then(Value::as_str).map(str::to_owned),
                                    );
                                    continue;
                                }
                                Some("image") => image_url_part(x),
                                Some("document") => openai_document_part(x),
                                _ => None,
                            };
                            match part {
                                Some(p) if p["type"] == "text" => {
                                    texts.extend(p["text"].as_str().map(str::to_owned));
                                }
                                Some(p) => result_parts.push(p),
                                None => {
                                    let kind = kind.unwrap_or("(none)");
                                    untranslatable.get_or_insert_with(|| {
                                        bad(
                                            &format!("messages.{i}.content.{j}.content.{k}.type"),
                                            format!(
                                                "messages.{i}.content.{j}.content.{k}: unsupported \
                                                 block type {kind}"
                                            ),
                                        )
                                    });
                                }
                            }
                        }
                        texts.join("\n")
                    }
                    _ => String::new(),
                };
                // OpenAI's tool messages have no error flag: a failed call
                // says so in its text, or the model takes the error
                // message for the tool's answer.
                let content = if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                    if content.is_empty() {
                        "Error".to_owned()
                    } else {
                        format!("Error: {content}")
                    }
                } else {
                    content
                };
                tool_results.push(json!({
                    "role": "tool",
                    "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null),
                    "content": content,
                }));
            }
            // Reasoning blocks from an earlier turn are not sent to other providers.
            Some("thinking") | Some("redacted_thinking") => {}
            Some("document") if role == "user" => match openai_document_part(b) {
                Some(part) => parts.push(part),
                None => unsupported(i, j, "document", &mut parts, untranslatable),
            },
            other => unsupported(i, j, other.unwrap_or("(none)"), &mut parts, untranslatable),
        }
    }
    // Tool results answer the previous assistant turn, so they come first.
    out.extend(tool_results);
    if !result_parts.is_empty() {
        result_parts.append(&mut parts);
        parts = result_parts;
    }
    // One text block is a string; several stay apart as text parts (joined,
    // "Hi" and "there" would run together).
    let content = match parts.as_slice() {
        [] => Value::Null,
        [one] if one["type"] == "text" => one["text"].clone(),
        _ => Value::Array(parts),
    };
    if role == "assistant" {
        let mut msg = json!({"role": "assistant", "content": content});
        if !tool_calls.is_empty() {
            msg["tool_calls"] = Value::Array(tool_calls);
        }
        if !msg["content"].is_null() || msg.get("tool_calls").is_some() {
            out.push(msg);
        }
    } else if !content.is_null() {
        out.push(json!({"role": "user", "content": content}));
    }
    Ok(())
}

/// A block with no OpenAI form: the refusal to give unless Anthropic serves
/// the request, and a stand-in for it, so that the translation's own checks
/// (no empty turns) hold when Anthropic serves the request and the
/// translation is never sent.
fn unsupported(
    i: usize,
    j: usize,
    kind: &str,
    parts: &mut Vec<Value>,
    untranslatable: &mut Option<TranslateError>,
) {
    untranslatable.get_or_insert_with(|| {
        bad(
            &format!("messages.{i}.content.{j}.type"),
            format!("messages.{i}.content.{j}: unsupported block type {kind}"),
        )
    });
    parts.push(json!({"type": "text", "text": format!("[{kind}]")}));
}

// ---------------------------------------------------------------------------
// OpenAI response → Anthropic response (inbound POST /v1/messages)
// ---------------------------------------------------------------------------

/// The reasoning text of an OpenAI message or delta: `reasoning_content`
/// (DeepSeek, vLLM, llama.cpp) or `reasoning` (vLLM's newer name, OpenRouter).
fn reasoning_of(m: &Value) -> Option<&str> {
    ["reasoning_content", "reasoning"]
        .iter()
        .find_map(|k| m.get(*k).and_then(Value::as_str))
        .filter(|r| !r.is_empty())
}

/// The text of an answer's `content`, a message's or a delta's: a string,
/// or, as some OpenAI-compatible providers send it, a list of parts, whose
/// `text` parts run on into one text (in a stream a part may end mid-word).
/// Other parts (an image, a model's own `thinking` part) are not the
/// answer's text and are left out.
fn answer_text(content: Option<&Value>) -> Option<Cow<'_, str>> {
    match content? {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Array(parts) => Some(Cow::Owned(
            parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        )),
        _ => None,
    }
}

/// The choice of index 0 of an OpenAI answer or chunk (one without an
/// `index` counts as 0): a Messages client cannot ask for several, so
/// another a provider sends anyway is not part of the answer, and a stream
/// names each chunk's choice by its index, not its place.
fn first_choice(v: &Value) -> Option<&Value> {
    v.get("choices")?
        .as_array()?
        .iter()
        .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
}

/// Turns an OpenAI `chat.completion` into an Anthropic message; with
/// `thinking`, the provider's reasoning becomes a leading `thinking` block
/// (with an empty `signature`: only Anthropic can sign, and Switchyard does
/// not send thinking blocks back to providers).
pub fn response_to_anthropic(resp: &Value, model: &str, thinking: bool) -> Value {
    let choice = first_choice(resp).cloned().unwrap_or(Value::Null);
    let msg = choice.get("message").cloned().unwrap_or(Value::Null);
    let mut content = Vec::new();
    if let Some(reasoning) = reasoning_of(&msg).filter(|_| thinking) {
        content.push(json!({"type": "thinking", "thinking": reasoning, "signature": ""}));
    }
    if let Some(text) = answer_text(msg.get("content")) {
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
    }
    // OpenAI's refusal (structured outputs) is its own field; Anthropic says
    // it as text with the stop reason `refusal`.
    let refusal = msg
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty());
    if let Some(r) = refusal {
        content.push(json!({"type": "text", "text": r}));
    }
    for call in msg
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        // Anthropic's `input` is an object: arguments that are not one (not
        // JSON, or "[1,2]") count as none, as a stream's do.
        let input: Value = serde_json::from_str(args)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        content.push(json!({
            "type": "tool_use",
            "id": tool_use_id(call),
            "name": call.pointer("/function/name").cloned().unwrap_or(Value::Null),
            "input": input,
        }));
    }
    let called = content.iter().any(|b| b["type"] == "tool_use");
    let id = resp.get("id").and_then(Value::as_str).unwrap_or("");
    let (stop_reason, stop_sequence) = match refusal {
        Some(_) => ("refusal", Value::Null),
        None => final_stop(
            choice.get("finish_reason").and_then(Value::as_str),
            &choice,
            called,
        ),
    };
    json!({
        "id": anthropic_id(id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": anthropic_usage(resp.get("usage")),
    })
}

/// The stop reason and sequence of an answer from its OpenAI choice: a
/// `stop` with the sequence named in the choice's `stop_reason` (vLLM's
/// field, and what the `anthropic` provider sets) is Anthropic's
/// `stop_sequence`; OpenAI itself does not say, so its answers end with
/// `end_turn`.
fn final_stop(
    finish_reason: Option<&str>,
    choice: &Value,
    called_a_tool: bool,
) -> (&'static str, Value) {
    let reason = final_stop_reason(finish_reason, called_a_tool);
    match choice.get("stop_reason").and_then(Value::as_str) {
        Some(seq) if reason == "end_turn" && finish_reason == Some("stop") => {
            ("stop_sequence", json!(seq))
        }
        _ => (reason, Value::Null),
    }
}

/// OpenAI's `stop` takes at most four sequences.
const MAX_STOP_SEQUENCES: usize = 4;

/// The stop reason of an answer: `tool_use` whenever it calls a tool (some
/// OpenAI-compatible servers say `stop` beside tool calls, and agent loops
/// run on `stop_reason == "tool_use"`), unless it was cut at `max_tokens`.
fn final_stop_reason(finish_reason: Option<&str>, called_a_tool: bool) -> &'static str {
    match stop_reason(finish_reason) {
        "max_tokens" => "max_tokens",
        _ if called_a_tool => "tool_use",
        other => other,
    }
}

/// A tool call's id as Anthropic takes it (see [`anthropic_tool_id`]: a
/// client may send the conversation on to Anthropic itself), or a fresh
/// `toolu_` one when the provider gave none (the client's `tool_result`
/// must name it).
fn tool_use_id(call: &Value) -> Value {
    match call.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => json!(anthropic_tool_id(id)),
        _ => {
            let mut bytes = [0u8; 12];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            json!(format!("toolu_{}", crate::trace::encode_hex(&bytes)))
        }
    }
}

/// OpenAI usage as Anthropic's: prompt tokens read from or written to the
/// cache are reported apart (`cache_read_input_tokens`,
/// `cache_creation_input_tokens`), not inside `input_tokens`. Writes come
/// back from an Anthropic deployment as LiteLLM's top-level
/// `cache_creation_input_tokens` (see [`Tokens::openai`]); the counts are
/// read as [`crate::openai::Usage`] reads them.
fn anthropic_usage(usage: Option<&Value>) -> Value {
    let u: crate::openai::Usage = usage
        .and_then(|u| serde::Deserialize::deserialize(u).ok())
        .unwrap_or_default();
    let mut usage = json!({
        "input_tokens": u.prompt_tokens - u.cached_tokens - u.cache_write_tokens,
        "output_tokens": u.completion_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cached_tokens,
    });
    if u.cache_write_1h_tokens > 0 {
        usage["cache_creation"] = cache_creation(u);
    }
    usage
}

fn anthropic_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else {
        format!("msg_{}", id.trim_start_matches("chatcmpl-"))
    }
}

/// Turns OpenAI chunks into Anthropic stream events (name, data), opening and
/// closing content blocks as text and tool calls begin and end.
///
/// OpenAI streams may interleave parallel tool calls (each delta names its
/// call by `tool_calls[].index`: both headers, then the first call's
/// arguments, then the second's); Anthropic's blocks cannot interleave. So
/// one call's block is open at a time, and the others' arguments wait: a
/// call's turn comes, in the order the calls began, once the open call's
/// arguments form a whole JSON object (then it can get no more) — at once,
/// in the usual stream where each call is whole before the next begins, so
/// that arguments are sent as they arrive — or at the end of the stream.
/// A call that waited is sent whole: start, its arguments, stop.
///
/// Text (or reasoning) that arrives while the open call's arguments are not
/// yet whole waits too, and follows the call's block once they are (or at
/// the stream's end): closing the call for it would lose the rest of the
/// arguments, since a closed block takes no more. The arguments still
/// stream as they arrive.
#[derive(Debug)]
pub struct OpenAiToAnthropicStream {
    model: String,
    started: bool,
    /// The open block: its index and whether it is text (or a tool's index).
    open: Option<(u64, OpenBlock)>,
    next_block: u64,
    stop_reason: Option<&'static str>,
    /// The stop sequence the provider named, when it stopped at one.
    stop_sequence: Value,
    /// Whether a tool_use block was opened (the stop reason is then `tool_use`).
    called: bool,
    /// The last OpenAI `usage` seen.
    usage: Option<Value>,
    /// `message_start`'s input tokens: an estimate, since OpenAI-shaped
    /// streams report usage only at their end (`message_delta` has the count).
    input_estimate: u64,
    /// Whether reasoning deltas become a `thinking` block (see
    /// [`MessagesRequest::thinking`]).
    thinking: bool,
    /// The tool calls begun, in the order they began.
    calls: Vec<ToolCall>,
    /// Text and reasoning that arrived while the open call's arguments were
    /// not whole, in order, to follow its block.
    held: Vec<(OpenBlock, String)>,
    /// The model refused (OpenAI's `refusal` deltas): the stop reason is
    /// `refusal`.
    refused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OpenBlock {
    Thinking,
    Text,
    /// A tool call's block, by its place in `calls`.
    Tool(usize),
}

/// One tool call of an OpenAI stream, as its deltas arrive.
#[derive(Debug)]
struct ToolCall {
    /// Its `tool_calls[].index`, by which later deltas name it.
    index: u64,
    /// Its id as the provider sent it, which tells two calls at one index
    /// apart (Ollama gives every call index 0).
    id: Option<String>,
    /// Its `content_block_start` block: the tool_use's id and name.
    block: Value,
    /// Its arguments so far, and how many bytes of them were sent.
    args: String,
    sent: usize,
    state: CallState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CallState {
    /// Not yet started: another call's block is open.
    Waiting,
    Open,
    /// Its block was stopped; it can take nothing more.
    Done,
}

impl ToolCall {
    /// Whether the arguments are whole, so that no more can come (or are
    /// not an object, and so are not sent at all).
    fn complete(&self) -> bool {
        match self.args.trim_start().chars().next() {
            None => false,
            Some('{') => serde_json::from_str::<serde::de::IgnoredAny>(&self.args).is_ok(),
            Some(_) => true,
        }
    }
}

pub type Event = (&'static str, Value);

impl OpenAiToAnthropicStream {
    /// `input_estimate` is reported in `message_start` (see
    /// [`estimate_input_tokens`]); the provider's count follows at the end.
    pub fn new(model: &str, input_estimate: u64, thinking: bool) -> Self {
        Self {
            input_estimate,
            thinking,
            model: model.to_owned(),
            started: false,
            open: None,
            next_block: 0,
            stop_reason: None,
            stop_sequence: Value::Null,
            calls: Vec::new(),
            held: Vec::new(),
            refused: false,
            called: false,
            usage: None,
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        out.push(("message_start", json!({
            "type": "message_start",
            "message": {
                "id": anthropic_id(id), "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_estimate, "output_tokens": 0},
            },
        })));
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((index, kind)) = self.open.take() {
            if let OpenBlock::Tool(call) = kind {
                if let Some(c) = self.calls.get_mut(call) {
                    c.state = CallState::Done;
                }
            }
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn open(&mut self, kind: OpenBlock, block: Value, out: &mut Vec<Event>) -> u64 {
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        self.open = Some((index, kind));
        index
    }

    /// Events for one OpenAI chunk.
    pub fn chunk(&mut self, chunk: &Value) -> Vec<Event> {
        let mut out = Vec::new();
        self.start(
            chunk.get("id").and_then(Value::as_str).unwrap_or(""),
            &mut out,
        );
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = first_choice(chunk) else {
            return out;
        };
        let delta = choice.get("delta").cloned().unwrap_or(Value::Null);
        if let Some(reasoning) = reasoning_of(&delta).filter(|_| self.thinking) {
            self.say(OpenBlock::Thinking, reasoning, &mut out);
        }
        let refusal = delta
            .get("refusal")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty());
        self.refused |= refusal.is_some();
        let text = answer_text(delta.get("content"));
        for text in [text.as_deref(), refusal].into_iter().flatten() {
            self.say(OpenBlock::Text, text, &mut out);
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let at = self.call_for(call);
            let args = call.pointer("/function/arguments").and_then(Value::as_str);
            if let Some(c) = self.calls.get_mut(at) {
                match (c.state, args) {
                    // Arguments after its block stopped (whole arguments,
                    // or text, closed it): no block is left to take them.
                    (CallState::Done, _) | (_, None) => {}
                    (_, Some(args)) => c.args.push_str(args),
                }
            }
            match self.open {
                Some((_, OpenBlock::Tool(open))) if open == at => self.send_arguments(at, &mut out),
                _ => self.next_calls(&mut out),
            }
            if !self.call_unfinished() {
                self.say_held(&mut out);
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            let (stop, seq) = match self.refused {
                true => ("refusal", Value::Null),
                false => final_stop(Some(reason), choice, self.called),
            };
            self.stop_reason = Some(stop);
            self.stop_sequence = seq;
        }
        out
    }

    /// Text or reasoning (`kind`) as a delta of the open block of its kind,
    /// or of a new one (closing the open block); held instead while the
    /// open call's arguments are not whole.
    fn say(&mut self, kind: OpenBlock, text: &str, out: &mut Vec<Event>) {
        if text.is_empty() {
            return;
        }
        if self.call_unfinished() {
            match self.held.last_mut() {
                Some((k, held)) if *k == kind => held.push_str(text),
                _ => self.held.push((kind, text.to_owned())),
            }
            return;
        }
        let thinking = kind == OpenBlock::Thinking;
        let index = match self.open {
            Some((i, open)) if open == kind => i,
            _ if thinking => self.open(
                kind,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                out,
            ),
            _ => self.open(kind, json!({"type": "text", "text": ""}), out),
        };
        let delta = match thinking {
            true => json!({"type": "thinking_delta", "thinking": text}),
            false => json!({"type": "text_delta", "text": text}),
        };
        out.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }

    /// What was held for the open call, once its block may close.
    fn say_held(&mut self, out: &mut Vec<Event>) {
        for (kind, text) in std::mem::take(&mut self.held) {
            self.say(kind, &text, out);
        }
    }

    /// Whether the open block is a tool call whose arguments may still grow.
    fn call_unfinished(&self) -> bool {
        match self.open {
            Some((_, OpenBlock::Tool(open))) => self.calls.get(open).is_some_and(|c| !c.complete()),
            _ => false,
        }
    }

    /// The call a tool-call delta belongs to, in `calls`: the one with its
    /// index and id, or without an id the last begun at its index; else a
    /// call it begins.
    fn call_for(&mut self, delta: &Value) -> usize {
        let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0);
        let id = delta
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty());
        let known = self
            .calls
            .iter()
            .rposition(|c| c.index == index && id.is_none_or(|id| c.id.as_deref() == Some(id)));
        if let Some(at) = known {
            return at;
        }
        self.called = true;
        self.calls.push(ToolCall {
            index,
            id: id.map(str::to_owned),
            block: json!({"type": "tool_use", "id": tool_use_id(delta),
                "name": delta.pointer("/function/name").cloned().unwrap_or(Value::Null), "input": {}}),
            args: String::new(),
            sent: 0,
            state: CallState::Waiting,
        });
        self.calls.len() - 1
    }

    /// The open call's arguments not yet sent, as one `input_json_delta`.
    fn send_arguments(&mut self, at: usize, out: &mut Vec<Event>) {
        let Some((index, _)) = self.open else { return };
        let Some(c) = self.calls.get_mut(at) else {
            return;
        };
        // Anthropic's `input` is an object: arguments that are not one
        // ("[1,2]") are not sent, and the call's input stays `{}`, as in a
        // complete answer. Leading whitespace waits until that is known.
        match c.args.trim_start().chars().next() {
            Some('{') => {}
            Some(_) => {
                c.sent = c.args.len();
                return;
            }
            None => return,
        }
        let Some(part) = c.args.get(c.sent..).filter(|p| !p.is_empty()) else {
            return;
        };
        out.push(("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": part}})));
        c.sent = c.args.len();
    }

    /// Opens the waiting calls' blocks in turn, each with what it has
    /// gathered, for as long as the open block is not a call that may get
    /// more arguments.
    fn next_calls(&mut self, out: &mut Vec<Event>) {
        while let Some(next) = self
            .calls
            .iter()
            .position(|c| c.state == CallState::Waiting)
        {
            if self.call_unfinished() {
                return;
            }
            let block = self.calls[next].block.clone();
            self.open(OpenBlock::Tool(next), block, out);
            self.calls[next].state = CallState::Open;
            self.send_arguments(next, out);
        }
    }

    /// The closing events, after the last chunk.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        self.start("", &mut out);
        // What waited for the open call follows its block, now closed.
        if !self.held.is_empty() {
            self.close(&mut out);
            self.say_held(&mut out);
        }
        // Calls still waiting are sent whole, in turn.
        while self.calls.iter().any(|c| c.state == CallState::Waiting) {
            self.close(&mut out);
            self.next_calls(&mut out);
        }
        self.close(&mut out);
        let stop = match self.stop_reason {
            Some(r) => r,
            None => final_stop_reason(None, self.called),
        };
        // A provider that reported no usage leaves the input count at
        // `message_start`'s estimate (SDKs take the counts a delta carries).
        let usage = match &self.usage {
            Some(u) => anthropic_usage(Some(u)),
            None => json!({"output_tokens": 0}),
        };
        out.push((
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": self.stop_sequence},
                "usage": usage,
            }),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// Anthropic's error `type` for an HTTP status, as its API documents them
/// (other 4xx are `invalid_request_error`, as Anthropic's are).
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        402 => "billing_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod sdk_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_types_follow_anthropics_table() {
        for (status, ty) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (405, "invalid_request_error"),
            (409, "invalid_request_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "timeout_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(error_type_for_status(status), ty, "{status}");
        }
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn a_provider_may_give_its_own_default_max_tokens() {
        let body = obj(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let r =
            request_to_anthropic_with(&body, "claude-x", ThinkingForm::Auto, 32000, false).unwrap();
        assert_eq!(r["max_tokens"], 32000);
        // What the client asks for wins.
        let mut asked = body.clone();
        asked.insert("max_tokens".into(), json!(100));
        let r = request_to_anthropic_with(&asked, "claude-x", ThinkingForm::Auto, 32000, false)
            .unwrap();
        assert_eq!(r["max_tokens"], 100);
    }

    #[test]
    fn what_anthropic_refuses_but_openai_takes_is_left_out() {
        // Whitespace-only stop sequences: Anthropic answers 400 for them.
        let body = obj(
            json!({"model": "m", "stop": ["\n", "END", " "], "messages": [
            {"role": "user", "content": "hi"}]}),
        );
        let req = request_to_anthropic(&body, "claude-x", false).unwrap();
        assert_eq!(req["stop_sequences"], json!(["END"]));
        let body = obj(json!({"model": "m", "stop": "\n", "messages": [
            {"role": "user", "content": "hi"}]}));
        let req = request_to_anthropic(&body, "claude-x", false).unwrap();
        assert!(req.get("stop_sequences").is_none(), "{req}");
        // Empty user text: Anthropic refuses an empty text block.
        let body = obj(json!({"model": "m", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "again"}]},
        ]}));
        let req = request_to_anthropic(&body, "claude-x", false).unwrap();
        assert_eq!(
            req["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                {"role": "user", "content": [{"type": "text", "text": "again"}]},
            ])
        );
        // An empty last turn is refused, not left out: the assistant's would
        // then be the last, a prefill.
        let body = obj(json!({"model": "m", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": " "},
        ]}));
        let e = request_to_anthropic(&body, "claude-x", false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[2].content"));
    }

    #[test]
    fn an_openai_request_becomes_an_anthropic_one() {
        let body = obj(json!({
            "model": "alias",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                ]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
                {"role": "user", "content": "Thanks"},
            ],
            "stop": "END",
            "temperature": 1.5,
            "tools": [{"type": "function", "function": {"name": "look", "description": "Look", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
            "parallel_tool_calls": false,
        }));
        let req = request_to_anthropic(&body, "claude-x", true).unwrap();
        assert_eq!(
            req,
            json!({
                "model": "claude-x",
                "max_tokens": DEFAULT_MAX_TOKENS,
                "system": "Be brief.",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                    ]},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "look", "input": {"q": 1}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"},
                        {"type": "text", "text": "Thanks"},
                    ]},
                ],
                "temperature": 1.0,
                "stop_sequences": ["END"],
                "tools": [{"name": "look", "input_schema": {"type": "object"}, "description": "Look"}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "stream": true,
            })
        );
    }

    #[test]
    fn cache_breakpoints_on_openai_parts_reach_anthropic_blocks() {
        let mark = json!({"type": "ephemeral"});
        let body = obj(json!({
            "model": "alias",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Long rules.", "cache_control": mark}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "Context.", "cache_control": mark},
                    {"type": "text", "text": "Question?"},
                ]},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking.", "cache_control": mark}],
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny", "cache_control": mark},
            ],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}, "cache_control": mark}],
        }));
        let req = request_to_anthropic(&body, "claude-x", false).unwrap();
        assert_eq!(
            req["system"],
            json!([{"type": "text", "text": "Long rules.", "cache_control": mark}])
        );
        assert_eq!(
            req["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "text", "text": "Context.", "cache_control": mark},
                    {"type": "text", "text": "Question?"},
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking.", "cache_control": mark},
                    {"type": "tool_use", "id": "c1", "name": "w", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "c1", "content": "sunny", "cache_control": mark},
                ]},
            ])
        );
        assert_eq!(req["tools"][0]["cache_control"], mark);
        // A breakpoint on a whole message, or on an empty part, goes on the
        // message's last block.
        let whole = obj(json!({"model": "a", "messages": [
            {"role": "system", "content": "Long rules.", "cache_control": mark},
            {"role": "user", "content": [
                {"type": "text", "text": "Context."},
                {"type": "text", "text": "Question?"},
            ], "cache_control": mark},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {"type": "text", "text": "", "cache_control": mark}],
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        ]}));
        let req = request_to_anthropic(&whole, "claude-x", false).unwrap();
        assert_eq!(
            req["system"],
            json!([{"type": "text", "text": "Long rules.", "cache_control": mark}])
        );
        assert_eq!(
            req["messages"],
            json!([
                {"role": "user", "content": [
                    {"type": "text", "text": "Context."},
                    {"type": "text", "text": "Question?", "cache_control": mark},
                ]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "c1", "name": "w", "input": {}, "cache_control": mark},
                ]},
            ])
        );
        // Without breakpoints the system prompt stays one string.
        let plain = obj(json!({"model": "a", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
            {"role": "developer", "content": "C"},
            {"role": "user", "content": "hi"},
        ]}));
        assert_eq!(
            request_to_anthropic(&plain, "m", false).unwrap()["system"],
            "A\nB\n\nC"
        );
    }

    #[test]
    fn what_anthropic_cannot_honour_is_refused_by_name_and_neutral_values_pass() {
        let base = json!({"model": "alias", "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = obj(base.clone());
            b.insert(k.into(), v);
            b
        };
        for (key, value, param) in [
            ("n", json!(3), "n"),
            (
                "response_format",
                json!({"type": "json_object"}),
                "response_format",
            ),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
                "response_format",
            ),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}),
                "response_format",
            ),
            ("logprobs", json!(true), "logprobs"),
            ("top_logprobs", json!(2), "logprobs"),
            (
                "functions",
                json!([{"name": "f", "parameters": {"type": "object"}}]),
                "functions",
            ),
            ("function_call", json!("auto"), "function_call"),
            (
                "tools",
                json!([{"type": "custom", "custom": {"name": "sql"}}]),
                "tools[0].type",
            ),
            ("modalities", json!(["text", "audio"]), "modalities"),
            (
                "audio",
                json!({"voice": "alloy", "format": "wav"}),
                "modalities",
            ),
            ("web_search_options", json!({}), "web_search_options"),
        ] {
            let e = request_to_anthropic(&with(key, value.clone()), "m", false).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{key}: {value}");
        }
        for (key, value) in [
            ("n", json!(1)),
            ("response_format", json!({"type": "text"})),
            ("logprobs", json!(false)),
            ("seed", json!(7)),
            ("modalities", json!(["text"])),
            ("audio", Value::Null),
        ] {
            assert!(
                request_to_anthropic(&with(key, value.clone()), "m", false).is_ok(),
                "{key}"
            );
        }
    }

    #[test]
    fn a_json_schema_response_format_becomes_anthropics_structured_output() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"], "additionalProperties": false});
        let body = obj(
            json!({"model": "alias", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "place", "strict": true, "schema": schema}}}),
        );
        let req = request_to_anthropic(&body, "m", true).unwrap();
        assert_eq!(
            req["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}})
        );
        // No format, or text, sends none.
        for format in [Value::Null, json!({"type": "text"})] {
            let mut b = body.clone();
            b.insert("response_format".into(), format);
            let req = request_to_anthropic(&b, "m", false).unwrap();
            assert!(req.get("output_config").is_none());
        }
    }

    fn chat_with(extra: Value) -> Map<String, Value> {
        let mut b = obj(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        b.extend(obj(extra));
        b
    }

    #[test]
    fn reasoning_effort_becomes_a_thinking_budget_within_max_tokens_on_older_models() {
        let sent = |extra: Value| {
            request_to_anthropic(&chat_with(extra), "claude-sonnet-4-5-20250929", false).unwrap()
        };
        // No max tokens asked: the default comes on top of the budget.
        let r = sent(json!({"reasoning_effort": "medium"}));
        assert_eq!(
            r["thinking"],
            json!({"type": "enabled", "budget_tokens": 2048})
        );
        assert_eq!(r["max_tokens"], DEFAULT_MAX_TOKENS + 2048);
        assert!(r.get("output_config").is_none());
        // A limit above the budget stands; one below it halves the budget,
        // down to Anthropic's least.
        let limits = |extra: Value| {
            let r = sent(extra);
            (
                r["max_tokens"].as_u64().unwrap(),
                r["thinking"]["budget_tokens"].as_u64().unwrap(),
            )
        };
        assert_eq!(
            limits(json!({"reasoning_effort": "high", "max_completion_tokens": 10_000})),
            (10_000, 4096)
        );
        assert_eq!(
            limits(json!({"reasoning_effort": "high", "max_tokens": 3000})),
            (3000, 1500)
        );
        // Just above the budget, the answer still keeps half.
        assert_eq!(
            limits(json!({"reasoning_effort": "high", "max_tokens": 4097})),
            (4097, 2048)
        );
        assert_eq!(
            limits(json!({"reasoning_effort": "high", "max_tokens": 1500})),
            (1500, 1024)
        );
        // None, or no effort: no thinking.
        for extra in [json!({"reasoning_effort": "none"}), json!({})] {
            assert!(sent(extra).get("thinking").is_none());
        }
        // What cannot be honoured is refused by name.
        for (extra, param) in [
            (json!({"reasoning_effort": "max"}), "reasoning_effort"),
            (json!({"reasoning_effort": 3}), "reasoning_effort"),
            (
                json!({"reasoning_effort": "low", "max_completion_tokens": 1024}),
                "max_completion_tokens",
            ),
            (
                json!({"reasoning_effort": "low", "max_tokens": 500}),
                "max_tokens",
            ),
            (
                json!({"reasoning_effort": "low", "temperature": 0.2}),
                "temperature",
            ),
            (json!({"reasoning_effort": "low", "top_k": 5}), "top_k"),
            (json!({"reasoning_effort": "low", "top_p": 0.9}), "top_p"),
        ] {
            let e = request_to_anthropic(&chat_with(extra.clone()), "claude-3-7-sonnet", false)
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}");
        }
        // The default sampling values are no conflict.
        let r = sent(json!({"reasoning_effort": "low", "temperature": 1, "top_p": 0.95}));
        assert_eq!(r["thinking"]["type"], "enabled");
    }

    #[test]
    fn claude_versions_are_read_from_every_spelling_of_a_model_id() {
        for (id, version) in [
            ("claude-opus-4-1-20250805", Some((4, 1))),
            ("claude-sonnet-4-20250514", Some((4, 0))),
            ("claude-3-7-sonnet-latest", Some((3, 7))),
            ("claude-3-opus-20240229", Some((3, 0))),
            ("claude-haiku-4-5", Some((4, 5))),
            ("claude-opus-4-6", Some((4, 6))),
            ("claude-opus-4-10", Some((4, 10))),
            ("claude-sonnet-5", Some((5, 0))),
            ("anthropic.claude-sonnet-4-5-20250929-v1:0", Some((4, 5))),
            ("claude-sonnet-4@20250514", Some((4, 0))),
            ("claude-sonnet-4-5@20250929", Some((4, 5))),
            ("anthropic/claude-sonnet-4.5", Some((4, 5))),
            ("Claude-Opus-4.1", Some((4, 1))),
            ("claude-sonnet-mock", None),
            ("gpt-4o", None),
        ] {
            assert_eq!(claude_version(id), version, "{id}");
        }
        assert!(budget_thinking_only("claude-opus-4@20250514"));
        assert!(!budget_thinking_only("claude-sonnet-4-6"));
        assert!(!budget_thinking_only("claude-opus-4-10"));
        assert!(!budget_thinking_only("claude-sonnet-mock"));
    }

    #[test]
    fn a_tool_loop_that_stops_thinking_takes_any_limit_and_sampling() {
        // Opened without thinking, the loop goes on without it: a limit
        // below the least budget and a temperature are no conflict then.
        let body = obj(
            json!({"model": "m", "reasoning_effort": "high", "max_tokens": 500,
            "temperature": 0.2, "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function",
                    "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
            ]}),
        );
        let r = request_to_anthropic(&body, "claude-sonnet-4-5", false).unwrap();
        assert_eq!(r["thinking"], json!({"type": "disabled"}));
        assert_eq!(
            (r["max_tokens"].as_u64(), r["temperature"].as_f64()),
            (Some(500), Some(0.2))
        );
    }

    #[test]
    fn the_providers_setting_overrides_the_model_id() {
        let body = chat_with(json!({"reasoning_effort": "low"}));
        let r = request_to_anthropic_with(&body, "my-claude", ThinkingForm::Budget, 4096, false)
            .unwrap();
        assert_eq!(
            r["thinking"],
            json!({"type": "enabled", "budget_tokens": 1024})
        );
        let r = request_to_anthropic_with(
            &body,
            "claude-sonnet-4-5",
            ThinkingForm::Adaptive,
            4096,
            false,
        )
        .unwrap();
        assert_eq!(r["thinking"], json!({"type": "adaptive"}));
    }

    #[test]
    fn later_models_think_adaptively_at_the_asked_effort() {
        for model in [
            "claude-sonnet-4-6",
            "claude-opus-4-7",
            "claude-sonnet-5",
            "claude-x",
        ] {
            let r = request_to_anthropic(
                &chat_with(json!({"reasoning_effort": "medium"})),
                model,
                false,
            )
            .unwrap();
            assert_eq!(r["thinking"], json!({"type": "adaptive"}), "{model}");
            assert_eq!(r["output_config"], json!({"effort": "medium"}), "{model}");
            assert_eq!(r["max_tokens"], DEFAULT_MAX_TOKENS + 2048, "{model}");
        }
        // The effort sits beside a structured output's format; a limit
        // asked for stands (there is no budget to exceed).
        let schema = json!({"type": "object", "properties": {}, "additionalProperties": false});
        let r = request_to_anthropic(
            &chat_with(json!({"reasoning_effort": "xhigh", "max_tokens": 900,
                "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}})),
            "claude-sonnet-5",
            false,
        )
        .unwrap();
        assert_eq!(
            r["output_config"],
            json!({"format": {"type": "json_schema", "schema": schema}, "effort": "high"})
        );
        assert_eq!(r["max_tokens"], 900);
    }

    #[test]
    fn thinking_stays_off_where_anthropic_refuses_it() {
        let tools = json!([{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]);
        for extra in [
            json!({"tools": tools, "tool_choice": "required"}),
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "w"}}}),
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]}),
        ] {
            let mut body = chat_with(json!({"reasoning_effort": "low", "temperature": 0.2}));
            body.extend(obj(extra.clone()));
            let r = request_to_anthropic(&body, "claude-sonnet-5", false).unwrap();
            assert!(r.get("thinking").is_none(), "{extra}");
            assert_eq!(r["temperature"], 0.2);
        }
        // A structured output cannot continue an assistant message at all.
        let body = chat_with(
            json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}}),
        );
        let e = request_to_anthropic(&body, "claude-sonnet-5", false).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn signed_thinking_goes_back_in_a_tool_loop_and_thinking_stops_without_it() {
        let thought = json!({"type": "thinking", "thinking": "Look it up.", "signature": "sig"});
        let loop_with = |assistant: Value| {
            obj(
                json!({"model": "m", "reasoning_effort": "low", "messages": [
                    {"role": "user", "content": "Weather?"},
                    assistant,
                    {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
                ]}),
            )
        };
        let call =
            json!([{"id": "t1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]);
        // Sent back as it came (reasoning_content and thinking_blocks): the
        // signed block opens the turn again and thinking goes on.
        let r = request_to_anthropic(
            &loop_with(
                json!({"role": "assistant", "content": null, "tool_calls": call,
                "reasoning_content": "Look it up.", "thinking_blocks": [thought]}),
            ),
            "claude-sonnet-5",
            false,
        )
        .unwrap();
        assert_eq!(r["thinking"]["type"], "adaptive");
        assert_eq!(r["messages"][1]["content"][0], thought);
        assert_eq!(r["messages"][1]["content"][1]["type"], "tool_use");
        // Rebuilt without them (or unsigned): thinking is off for the loop.
        for blocks in [
            json!(null),
            json!([{"type": "thinking", "thinking": "x", "signature": ""}]),
        ] {
            let r = request_to_anthropic(
                &loop_with(
                    json!({"role": "assistant", "content": null, "tool_calls": call,
                    "thinking_blocks": blocks}),
                ),
                "claude-sonnet-5",
                false,
            )
            .unwrap();
            assert_eq!(r["thinking"], json!({"type": "disabled"}));
            assert_eq!(r["messages"][1]["content"][0]["type"], "tool_use");
        }
        // Without reasoning_effort, thinking blocks are not sent at all.
        let mut plain = loop_with(
            json!({"role": "assistant", "content": null, "tool_calls": call,
            "thinking_blocks": [thought]}),
        );
        plain.remove("reasoning_effort");
        let r = request_to_anthropic(&plain, "claude-sonnet-5", false).unwrap();
        assert!(r.get("thinking").is_none());
        assert_eq!(r["messages"][1]["content"][0]["type"], "tool_use");
    }

    #[test]
    fn anthropic_thinking_reaches_openai_clients_as_reasoning_and_signed_blocks() {
        let thought = json!({"type": "thinking", "thinking": "Hmm.", "signature": "sig"});
        let redacted = json!({"type": "redacted_thinking", "data": "opaque"});
        let msg = json!({"id": "msg_1", "model": "c", "stop_reason": "end_turn",
            "content": [thought, redacted, {"type": "text", "text": "Hi"}],
            "usage": {"input_tokens": 1, "output_tokens": 2}});
        let r = response_from_anthropic(&msg, 0);
        let m = &r["choices"][0]["message"];
        assert_eq!(m["content"], "Hi");
        assert_eq!(m["reasoning_content"], "Hmm.");
        assert_eq!(m["thinking_blocks"], json!([thought, redacted]));
        // Streamed: reasoning deltas as they come, the signed block at its end.
        let mut s = AnthropicToOpenAiStream::new(0);
        let mut deltas = Vec::new();
        for (event, data) in [
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hm"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "m."}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": redacted}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 1}),
            ),
        ] {
            if let StreamStep::Chunks(chunks) = s.step(event, &data) {
                deltas.extend(chunks.into_iter().map(|c| c["choices"][0]["delta"].clone()));
            }
        }
        assert_eq!(
            deltas,
            [
                json!({"role": "assistant", "content": ""}),
                json!({"reasoning_content": "Hm"}),
                json!({"reasoning_content": "m."}),
                json!({"thinking_blocks": [{"type": "thinking", "thinking": "Hmm.", "signature": "sig", "index": 0}]}),
                json!({"thinking_blocks": [{"type": "redacted_thinking", "data": "opaque", "index": 1}]}),
            ]
        );
    }

    #[test]
    fn every_stop_reason_has_its_finish_reason() {
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("pause_turn", "stop"),
            ("max_tokens", "length"),
            ("model_context_window_exceeded", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(finish_reason(Some(stop)), finish, "{stop}");
        }
    }

    #[test]
    fn the_end_user_reaches_anthropic_from_safety_identifier_or_user() {
        let sent = |extra: Value| {
            request_to_anthropic(&chat_with(extra), "claude-sonnet-5", false).unwrap()
        };
        assert_eq!(
            sent(json!({"user": "u1"}))["metadata"],
            json!({"user_id": "u1"})
        );
        assert_eq!(
            sent(json!({"user": "u1", "safety_identifier": "s1"}))["metadata"],
            json!({"user_id": "s1"})
        );
        let long = "x".repeat(300);
        let id = sent(json!({"safety_identifier": long}))["metadata"]["user_id"].clone();
        assert_eq!(id.as_str().unwrap().len(), 64);
        assert!(sent(json!({"user": ""})).get("metadata").is_none());
    }

    #[test]
    fn a_conversation_starting_with_the_assistant_gets_a_user_turn_first() {
        let body = obj(
            json!({"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Yo"}], "max_tokens": 5}),
        );
        let req = request_to_anthropic(&body, "m", false).unwrap();
        assert_eq!(req["messages"][0]["role"], "user");
        assert_eq!(req["messages"][1]["role"], "assistant");
        assert_eq!(req["max_tokens"], 5);
    }

    #[test]
    fn an_anthropic_answer_becomes_a_chat_completion() {
        let msg = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Let me look."}, {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2},
        });
        let r = response_from_anthropic(&msg, 7);
        assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(r["choices"][0]["message"]["content"], "Let me look.");
        assert_eq!(
            r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"q\":1}"
        );
        assert_eq!(
            r["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
        // Back through the other translation, the cached tokens are apart again.
        assert_eq!(
            response_to_anthropic(&r, "alias", false)["usage"],
            json!({"input_tokens": 10, "output_tokens": 5,
                   "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2})
        );
    }

    #[test]
    fn a_stop_sequence_survives_both_translations() {
        let msg = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "One, two, "}],
            "stop_reason": "stop_sequence", "stop_sequence": "three",
            "usage": {"input_tokens": 3, "output_tokens": 4},
        });
        let r = response_from_anthropic(&msg, 7);
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert_eq!(r["choices"][0]["stop_reason"], "three");
        assert!(r
            .get("usage")
            .unwrap()
            .get("prompt_tokens_details")
            .is_none());
        let back = response_to_anthropic(&r, "alias", false);
        assert_eq!(back["stop_reason"], "stop_sequence");
        assert_eq!(back["stop_sequence"], "three");

        // A natural end names no sequence, in either direction.
        let mut natural = msg.clone();
        natural["stop_reason"] = json!("end_turn");
        let r = response_from_anthropic(&natural, 7);
        assert!(r["choices"][0].get("stop_reason").is_none(), "{r}");
        let back = response_to_anthropic(&r, "alias", false);
        assert_eq!(
            (&back["stop_reason"], &back["stop_sequence"]),
            (&json!("end_turn"), &Value::Null)
        );
        // vLLM's numeric stop_reason (a stop token id) is no sequence.
        let mut token = r.clone();
        token["choices"][0]["stop_reason"] = json!(128009);
        assert_eq!(
            response_to_anthropic(&token, "a", false)["stop_reason"],
            "end_turn"
        );

        // Streamed: message_delta → the finish chunk → message_delta.
        let mut up = AnthropicToOpenAiStream::new(1);
        let mut down = OpenAiToAnthropicStream::new("alias", 0, false);
        let mut events = Vec::new();
        for (name, data) in [
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "model": "c",
                "usage": {"input_tokens": 3, "cache_read_input_tokens": 100, "output_tokens": 1}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "One"}}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "two"},
                "usage": {"output_tokens": 2}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ] {
            let chunks = match up.step(name, &data) {
                StreamStep::Chunks(c) => c,
                StreamStep::Done(u) => {
                    assert_eq!(
                        u["usage"],
                        json!({"prompt_tokens": 103, "completion_tokens": 2, "total_tokens": 105,
                               "prompt_tokens_details": {"cached_tokens": 100}})
                    );
                    vec![u]
                }
                other => panic!("{other:?}"),
            };
            for c in &chunks {
                events.extend(down.chunk(c));
            }
        }
        events.extend(down.finish());
        let delta = events.iter().find(|(n, _)| *n == "message_delta").unwrap();
        assert_eq!(
            delta.1["delta"],
            json!({"stop_reason": "stop_sequence", "stop_sequence": "two"})
        );
        assert_eq!(delta.1["usage"]["input_tokens"], 3);
        assert_eq!(delta.1["usage"]["cache_read_input_tokens"], 100);
    }

    #[test]
    fn a_later_message_delta_usage_replaces_only_the_counts_it_carries() {
        let mut s = AnthropicToOpenAiStream::new(1);
        s.step(
            "message_start",
            &json!({"type": "message_start", "message": {"id": "m", "model": "c",
                "usage": {"input_tokens": 5, "cache_creation_input_tokens": 7, "output_tokens": 1}}}),
        );
        s.step(
            "message_delta",
            &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": {"input_tokens": 6, "cache_read_input_tokens": 2, "output_tokens": 9}}),
        );
        match s.step("message_stop", &json!({"type": "message_stop"})) {
            StreamStep::Done(u) => assert_eq!(
                u["usage"],
                json!({"prompt_tokens": 15, "completion_tokens": 9, "total_tokens": 24,
                       "prompt_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 7},
                       "cache_creation_input_tokens": 7})
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cache_reads_and_writes_survive_the_round_trip_through_openai_usage() {
        let anthropic = json!({"input_tokens": 3, "cache_creation_input_tokens": 7,
                               "cache_read_input_tokens": 2, "output_tokens": 1});
        let openai = Tokens::from_anthropic(Some(&anthropic)).openai();
        assert_eq!(openai["prompt_tokens"], 12);
        assert_eq!(anthropic_usage(Some(&openai)), anthropic);
        // LiteLLM's newer place for writes is read too, and counts that
        // exceed the prompt are clamped rather than underflow.
        let litellm = json!({"prompt_tokens": 10, "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 4, "cache_creation_tokens": 9}});
        assert_eq!(
            anthropic_usage(Some(&litellm)),
            json!({"input_tokens": 0, "output_tokens": 1,
                   "cache_creation_input_tokens": 6, "cache_read_input_tokens": 4})
        );
    }

    #[test]
    fn one_hour_cache_writes_are_told_apart_both_ways() {
        let anthropic = json!({"input_tokens": 3, "cache_creation_input_tokens": 7,
            "cache_read_input_tokens": 2, "output_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 5}});
        let tokens = Tokens::from_anthropic(Some(&anthropic));
        assert_eq!(
            (
                tokens.usage().cache_write_tokens,
                tokens.usage().cache_write_1h_tokens
            ),
            (7, 5)
        );
        let openai = tokens.openai();
        assert_eq!(openai["cache_creation"], anthropic["cache_creation"]);
        let u: crate::openai::Usage = serde_json::from_value(openai.clone()).unwrap();
        assert_eq!(u, tokens.usage());
        assert_eq!(anthropic_usage(Some(&openai)), anthropic);
        // Only five-minute writes: no split is sent.
        let five = json!({"input_tokens": 3, "cache_creation_input_tokens": 7, "output_tokens": 1,
            "cache_creation": {"ephemeral_5m_input_tokens": 7, "ephemeral_1h_input_tokens": 0}});
        assert!(Tokens::from_anthropic(Some(&five))
            .openai()
            .get("cache_creation")
            .is_none());
    }

    #[test]
    fn several_text_blocks_stay_apart_both_ways() {
        let body = obj(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<context>x</context>"}, {"type": "text", "text": "Fix it."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Done."}, {"type": "text", "text": "Anything else?"}]},
            {"role": "user", "content": [{"type": "text", "text": "No."}]},
        ]}));
        let r = MessagesRequest::parse(&body).unwrap();
        assert_eq!(
            r.openai_body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "<context>x</context>"}, {"type": "text", "text": "Fix it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Done."}, {"type": "text", "text": "Anything else?"}]},
                {"role": "user", "content": "No."},
            ])
        );
        // And on to Anthropic, block for block.
        let req = request_to_anthropic(&r.openai_body, "claude-x", false).unwrap();
        assert_eq!(
            req["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "<context>x</context>"}, {"type": "text", "text": "Fix it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Done."}, {"type": "text", "text": "Anything else?"}]},
                {"role": "user", "content": [{"type": "text", "text": "No."}]},
            ])
        );
    }

    #[test]
    fn images_in_a_tool_result_reach_the_model_in_the_user_turn_after_it() {
        let shot = json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}});
        let body = obj(json!({"model": "m", "max_tokens": 5, "messages": [
            {"role": "user", "content": "Look at the screen."},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Taken."}, shot]},
                {"type": "text", "text": "What do you see?"},
            ]},
        ]}));
        let r = MessagesRequest::parse(&body).unwrap();
        assert_eq!(
            r.openai_body["messages"].as_array().unwrap()[2..],
            [
                json!({"role": "tool", "tool_call_id": "toolu_1", "content": "Taken."}),
                json!({"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                    {"type": "text", "text": "What do you see?"},
                ]}),
            ]
        );
        // A result with only an image still gets its user turn.
        let mut only = body.clone();
        only["messages"][2]["content"] =
            json!([{"type": "tool_result", "tool_use_id": "toolu_1", "content": [shot]}]);
        let r = MessagesRequest::parse(&only).unwrap();
        assert_eq!(
            r.openai_body["messages"][3],
            json!({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}}]})
        );
    }

    #[test]
    fn reasoning_becomes_thinking_only_when_the_client_asked_for_it() {
        let resp = json!({"id": "chatcmpl-1", "choices": [{"message": {"role": "assistant",
            "reasoning_content": "Greet back.", "content": "Hello"}, "finish_reason": "stop"}]});
        assert_eq!(
            response_to_anthropic(&resp, "a", true)["content"],
            json!([
                {"type": "thinking", "thinking": "Greet back.", "signature": ""},
                {"type": "text", "text": "Hello"},
            ])
        );
        assert_eq!(
            response_to_anthropic(&resp, "a", false)["content"],
            json!([{"type": "text", "text": "Hello"}])
        );

        let chunks = [
            json!({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "x", "choices": [{"index": 0, "delta": {"reasoning_content": "Greet"}}]}),
            json!({"id": "x", "choices": [{"index": 0, "delta": {"reasoning": " back."}}]}),
            json!({"id": "x", "choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
            json!({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ];
        let run = |thinking: bool| {
            let mut s = OpenAiToAnthropicStream::new("a", 0, thinking);
            let mut events = Vec::new();
            for c in &chunks {
                events.extend(s.chunk(c));
            }
            events.extend(s.finish());
            events
        };
        let events = run(true);
        let blocks: Vec<(&str, Value)> = events
            .iter()
            .filter(|(n, _)| n.starts_with("content_block"))
            .map(|(n, d)| {
                (
                    *n,
                    d.get("content_block")
                        .or(d.get("delta"))
                        .cloned()
                        .unwrap_or(json!(d["index"])),
                )
            })
            .collect();
        assert_eq!(
            blocks,
            vec![
                (
                    "content_block_start",
                    json!({"type": "thinking", "thinking": "", "signature": ""})
                ),
                (
                    "content_block_delta",
                    json!({"type": "thinking_delta", "thinking": "Greet"})
                ),
                (
                    "content_block_delta",
                    json!({"type": "thinking_delta", "thinking": " back."})
                ),
                ("content_block_stop", json!(0)),
                ("content_block_start", json!({"type": "text", "text": ""})),
                (
                    "content_block_delta",
                    json!({"type": "text_delta", "text": "Hello"})
                ),
                ("content_block_stop", json!(1)),
            ]
        );
        assert!(!run(false)
            .iter()
            .any(|(_, d)| d.to_string().contains("thinking")));

        // The request's `thinking` is read and checked.
        let with = |t: Value| {
            MessagesRequest::parse(&obj(json!({"model": "m", "max_tokens": 5, "thinking": t,
                "messages": [{"role": "user", "content": "hi"}]})))
        };
        assert!(
            with(json!({"type": "enabled", "budget_tokens": 2048}))
                .unwrap()
                .thinking
        );
        assert!(!with(json!({"type": "disabled"})).unwrap().thinking);
        assert_eq!(
            with(json!({"type": "on"})).unwrap_err().param.as_deref(),
            Some("thinking.type")
        );
        assert_eq!(
            with(json!(true)).unwrap_err().param.as_deref(),
            Some("thinking")
        );
        // Nothing of it reaches the provider: no OpenAI field means the same.
        assert!(!with(json!({"type": "enabled", "budget_tokens": 2048}))
            .unwrap()
            .openai_body
            .contains_key("thinking"));
    }

    #[test]
    fn an_anthropic_deployment_gets_the_clients_checked_fields_as_they_came() {
        let cached = json!({"type": "ephemeral"});
        let original = obj(json!({
            "model": "alias", "max_tokens": 100, "stream": false, "top_k": 5, "temperature": 0.2,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": cached}],
            "metadata": {"user_id": "u".repeat(150), "team": "t1"},
            "tools": [{"name": "w", "input_schema": {"type": "object"}, "cache_control": cached}],
            "tool_choice": {"type": "auto"},
            "thinking": {"type": "enabled", "budget_tokens": 2048},
            "context_management": {"edits": []},
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": [{"type": "text", "text": ""}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Look it up.", "signature": "sig"},
                    {"type": "text", "text": ""},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}},
                ]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                    "content": "timeout", "is_error": true, "cache_control": cached}]},
                {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
                {"role": "user", "content": "Again?"},
                // Made by Switchyard from another provider's reasoning: unsigned.
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "Hm.", "signature": ""}]},
            ],
        }));
        assert_eq!(
            native_request(&original, "claude-x", true),
            json!({
                "model": "claude-x", "max_tokens": 100, "stream": true, "top_k": 5, "temperature": 0.2,
                "system": [{"type": "text", "text": "Be brief.", "cache_control": cached}],
                "metadata": {"user_id": "u".repeat(150)},
                "tools": [{"name": "w", "input_schema": {"type": "object"}, "cache_control": cached}],
                "tool_choice": {"type": "auto"},
                "thinking": {"type": "enabled", "budget_tokens": 2048},
                "context_management": {"edits": []},
                "messages": [
                    {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": [
                        {"type": "thinking", "thinking": "Look it up.", "signature": "sig"},
                        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}},
                    ]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                        "content": "timeout", "is_error": true, "cache_control": cached}]},
                    {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
                    {"role": "user", "content": "Again?"},
                ],
            })
        );
        // No tools: no tool_choice either; not streamed: no stream field.
        let mut bare = original.clone();
        bare.insert("tools".into(), json!([]));
        let req = native_request(&bare, "claude-x", false);
        assert!(req.get("tools").is_none() && req.get("tool_choice").is_none());
        assert!(req.get("stream").is_none());
        // No user id: no metadata at all.
        bare.insert("metadata".into(), json!({"team": "t1"}));
        assert!(native_request(&bare, "claude-x", false)
            .get("metadata")
            .is_none());
    }

    #[test]
    fn an_anthropic_deployment_gets_only_anthropics_fields() {
        let mark = json!({"type": "ephemeral"});
        let original = obj(json!({
            "model": "alias", "max_tokens": 100,
            "user": "u-1", "n": 1, "service_tier": "auto", "cache_control": mark,
            "output_format": {"type": "json_schema", "schema": {"type": "object"}},
            "messages": [
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "Long context."},
                    {"type": "text", "text": "", "cache_control": mark},
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "Hm.", "signature": "sig"},
                    {"type": "text", "text": "", "cache_control": mark},
                ]},
            ],
        }));
        assert_eq!(
            native_request(&original, "claude-x", false),
            json!({
                "model": "claude-x", "max_tokens": 100, "cache_control": mark,
                "output_format": {"type": "json_schema", "schema": {"type": "object"}},
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "Long context.", "cache_control": mark},
                    ]},
                    // A thinking block takes no breakpoint.
                    {"role": "assistant", "content": [
                        {"type": "thinking", "thinking": "Hm.", "signature": "sig"},
                    ]},
                ],
            })
        );
        // Only the tier that cannot cost more passes.
        let mut standard = original.clone();
        standard.insert("service_tier".into(), json!("standard_only"));
        assert_eq!(
            native_request(&standard, "c", false)["service_tier"],
            "standard_only"
        );
        // output_config's format is read like output_format.
        let mut config = original.clone();
        config.remove("output_format");
        config.insert(
            "output_config".into(),
            json!({"format": {"type": "json_schema", "schema": {"type": "object"}}, "effort": "low"}),
        );
        let r = MessagesRequest::parse(&config).unwrap();
        assert!(r.openai_body.contains_key("response_format"));
        assert_eq!(
            native_request(&config, "c", false)["output_config"],
            config["output_config"]
        );
        // Workspace resources: sent, but only where enabled (server_tools).
        let mut workspace = original.clone();
        workspace.insert("container".into(), json!("c_1"));
        assert_eq!(native_request(&workspace, "c", false)["container"], "c_1");
        let r = MessagesRequest::parse(&workspace).unwrap();
        assert_eq!(r.server_tool.unwrap().param.as_deref(), Some("container"));
        assert_eq!(
            r.untranslatable.unwrap().param.as_deref(),
            Some("container")
        );
        // The translation carries output_format as OpenAI's response_format.
        let r = MessagesRequest::parse(&original).unwrap();
        assert!(r.untranslatable.is_none());
        assert_eq!(
            r.openai_body["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}})
        );
        let mut odd = original.clone();
        odd.insert("output_format".into(), json!({"type": "yaml"}));
        let e = MessagesRequest::parse(&odd)
            .unwrap()
            .untranslatable
            .unwrap();
        assert_eq!(e.param.as_deref(), Some("output_format"));
    }

    #[test]
    fn thinking_is_turned_off_when_the_tool_loop_was_opened_without_it() {
        let thinking = json!({"type": "enabled", "budget_tokens": 1024});
        let call = |id: &str| json!({"type": "tool_use", "id": id, "name": "w", "input": {}});
        let result = |id: &str| json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "sunny"}]});
        let signed = json!({"type": "thinking", "thinking": "Look.", "signature": "sig"});
        let unsigned = json!({"type": "thinking", "thinking": "Look.", "signature": ""});
        let sent = |turn: Vec<Value>| {
            let mut messages = vec![json!({"role": "user", "content": "Weather?"})];
            messages.extend(turn);
            native_request(
                &obj(
                    json!({"model": "a", "max_tokens": 2048, "thinking": thinking, "messages": messages}),
                ),
                "c",
                false,
            )
        };
        let assistant = |blocks: Value| json!({"role": "assistant", "content": blocks});
        // Anthropic's own loop: thinking opens it, and later calls of the
        // same loop need none.
        let own = sent(vec![
            assistant(json!([signed, call("t1")])),
            result("t1"),
            assistant(json!([call("t2")])),
            result("t2"),
        ]);
        assert_eq!(own["thinking"], thinking);
        assert_eq!(own["messages"].as_array().unwrap().len(), 5);
        assert_eq!(
            sent(vec![
                assistant(json!([{"type": "redacted_thinking", "data": "x"}, call("t1")])),
                result("t1")
            ])["thinking"],
            thinking
        );
        // A fallback opened the loop (no thinking, or its unsigned
        // reasoning): thinking is turned off, and the loop's thinking goes.
        for opener in [json!([call("t1")]), json!([unsigned, call("t1")])] {
            let req = sent(vec![
                assistant(opener),
                result("t1"),
                assistant(json!([signed, call("t2")])),
                result("t2"),
            ]);
            assert_eq!(req["thinking"], json!({"type": "disabled"}));
            assert_eq!(req["messages"][3]["content"], json!([call("t2")]));
        }
        // No tool call in the turn: thinking goes on.
        assert_eq!(
            sent(vec![assistant(json!([{"type": "text", "text": "Hi."}]))])["thinking"],
            thinking
        );
    }

    #[test]
    fn a_temperature_outside_anthropics_range_is_refused_whatever_the_provider() {
        let with = |t: Value| {
            MessagesRequest::parse(&obj(
                json!({"model": "m", "max_tokens": 5, "temperature": t,
                "messages": [{"role": "user", "content": "hi"}]}),
            ))
        };
        assert_eq!(with(json!(0.7)).unwrap().openai_body["temperature"], 0.7);
        assert_eq!(with(json!(1)).unwrap().openai_body["temperature"], 1);
        assert!(!with(Value::Null)
            .unwrap()
            .openai_body
            .contains_key("temperature"));
        for (t, message) in [
            (
                json!(1.5),
                "temperature: Input should be less than or equal to 1",
            ),
            (
                json!(-0.1),
                "temperature: Input should be greater than or equal to 0",
            ),
            (json!("hot"), "temperature: Input should be a valid number"),
        ] {
            let err = with(t).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("temperature"));
            assert_eq!(err.message, message);
        }
    }

    #[test]
    fn a_long_user_id_reaches_openai_as_its_digest() {
        let with = |id: &str| {
            MessagesRequest::parse(&obj(
                json!({"model": "m", "max_tokens": 5, "metadata": {"user_id": id},
                "messages": [{"role": "user", "content": "hi"}]}),
            ))
            .unwrap()
            .openai_body
        };
        assert_eq!(with("u-42")["user"], "u-42");
        let claude_code = format!(
            "user_{}_account__session_{}",
            "a".repeat(64),
            "b".repeat(36)
        );
        let user = with(&claude_code)["user"].as_str().unwrap().to_owned();
        assert_eq!(user.len(), 64);
        assert!(user.bytes().all(|b| b.is_ascii_hexdigit()), "{user}");
        assert_eq!(with(&claude_code)["user"], user, "stable");
        assert_ne!(with(&format!("{claude_code}x"))["user"], user);
        assert!(!with("").contains_key("user"));
        let e = MessagesRequest::parse(&obj(json!({"model": "m", "max_tokens": 5,
            "metadata": {"user_id": 42}, "messages": [{"role": "user", "content": "hi"}]})))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata.user_id"));
    }

    #[test]
    fn the_estimate_counts_what_the_model_reads() {
        let body = |messages: Value| obj(json!({"model": "m", "messages": messages}));
        // 7 bytes → 2 tokens, and one message.
        assert_eq!(
            estimate_input_tokens(&body(json!([{"role": "user", "content": "1234567"}]))),
            2 + 3
        );
        // Block types, ids and cache markers are not text; a tool's input
        // and an image inside a tool result are.
        let blocks = body(json!([
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0123456789", "name": "abc",
                "input": {"q": "defg"}, "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0123456789",
                "content": [{"type": "text", "text": "1234567"}, {"type": "image", "source": {"data": "x"}}]}]},
        ]));
        // "abc" + `{"q":"defg"}` + "1234567" = 22 bytes → 7 tokens; two
        // messages; one image.
        assert_eq!(estimate_input_tokens(&blocks), 7 + 6 + 1_600);
        // An earlier turn's thinking is not sent on, so it counts nothing.
        let mut thought = blocks.clone();
        thought["messages"][0]["content"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"type": "thinking", "thinking": "x".repeat(700), "signature": "s".repeat(300)}));
        assert_eq!(estimate_input_tokens(&thought), 7 + 6 + 1_600);
    }

    #[test]
    fn only_custom_tools_are_taken_and_their_fields_are_checked() {
        let with_tool = |tool: Value| {
            obj(json!({"model": "m", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}], "tools": [
                {"name": "ok", "input_schema": {"type": "object"}}, tool]}))
        };
        let r = MessagesRequest::parse(&with_tool(
            json!({"type": "custom", "name": "w", "description": null, "input_schema": {"type": "object"}}),
        ))
        .unwrap();
        assert_eq!(
            r.openai_body["tools"][1],
            json!({"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}})
        );
        assert!(r.untranslatable.is_none());
        // Anthropic's own tools: only an Anthropic deployment can take them,
        // so the translation leaves them out and says why for the others.
        for (tool, says) in [
            (
                json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 5}),
                "web_search_20250305 is one of Anthropic's own tools",
            ),
            (
                json!({"type": "bash_20250124", "name": "bash"}),
                "bash_20250124",
            ),
        ] {
            let r = MessagesRequest::parse(&with_tool(tool.clone())).unwrap();
            let e = r.untranslatable.unwrap();
            assert_eq!(e.param.as_deref(), Some("tools.1.type"), "{tool}");
            assert!(
                e.message.starts_with("tools.1.type: ") && e.message.contains(says),
                "{tool}: {}",
                e.message
            );
            assert_eq!(r.openai_body["tools"].as_array().unwrap().len(), 1);
        }
        for (tool, param, says) in [
            (
                json!({"input_schema": {"type": "object"}}),
                "tools.1.name",
                "Field required",
            ),
            (
                json!({"name": "", "input_schema": {}}),
                "tools.1.name",
                "non-empty string",
            ),
            (
                json!({"name": "w"}),
                "tools.1.input_schema",
                "Field required",
            ),
            (
                json!({"name": "w", "input_schema": "object"}),
                "tools.1.input_schema",
                "valid dictionary",
            ),
            (json!("w"), "tools.1", "valid dictionary"),
        ] {
            let e = MessagesRequest::parse(&with_tool(tool.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{tool}");
            assert!(
                e.message.starts_with(&format!("{param}: ")) && e.message.contains(says),
                "{tool}: {}",
                e.message
            );
        }
    }

    #[test]
    fn anthropic_stream_events_become_chunks_one_for_one() {
        let mut s = AnthropicToOpenAiStream::new(1);
        let events = [
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 9, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            ),
            (
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"q\":"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
            ),
            ("ping", json!({"type": "ping"})),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 12}}),
            ),
        ];
        let mut chunks = Vec::new();
        for (e, d) in &events {
            match s.step(e, d) {
                StreamStep::Chunks(c) => chunks.extend(c),
                other => panic!("{other:?}"),
            }
        }
        let deltas: Vec<Value> = chunks
            .iter()
            .map(|c| c["choices"][0]["delta"].clone())
            .collect();
        assert_eq!(
            deltas,
            vec![
                json!({"role": "assistant", "content": ""}),
                json!({"content": "Hi"}),
                json!({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": ""}}]}),
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":"}}]}),
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
                json!({}),
            ]
        );
        assert_eq!(chunks[5]["choices"][0]["finish_reason"], "tool_calls");
        match s.step("message_stop", &json!({"type": "message_stop"})) {
            StreamStep::Done(u) => assert_eq!(
                u["usage"],
                json!({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21})
            ),
            other => panic!("{other:?}"),
        }
        let err = s.step("error", &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}));
        assert_eq!(
            err,
            StreamStep::Error {
                kind: "overloaded_error".into(),
                message: "Overloaded".into()
            }
        );
    }

    #[test]
    fn a_messages_request_becomes_an_openai_request() {
        let body = obj(json!({
            "model": "alias", "max_tokens": 100, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]}]},
            ],
            "tools": [{"name": "w", "description": "weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "w"},
            "stop_sequences": ["X"], "stream": true, "metadata": {"user_id": "u1"},
        }));
        let r = MessagesRequest::parse(&body).unwrap();
        assert!(r.stream);
        assert_eq!(
            Value::Object(r.openai_body),
            json!({
                "model": "alias",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Weather?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": "{\"c\":\"Paris\"}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                ],
                "max_tokens": 100,
                "stop": ["X"],
                "tools": [{"type": "function", "function": {"name": "w", "description": "weather", "parameters": {"type": "object"}}}],
                "tool_choice": {"type": "function", "function": {"name": "w"}},
                "user": "u1",
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
    }

    #[test]
    fn pdfs_travel_as_openai_file_parts_and_anthropic_documents() {
        // Messages → OpenAI: a base64 PDF is a file part, a text document
        // text; the title, if any, is the file's name.
        let body = obj(json!({"model": "alias", "max_tokens": 10, "messages": [
            {"role": "user", "content": [
                {"type": "document", "title": "q3.pdf",
                 "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBES"}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Notes."}},
                {"type": "text", "text": "Summarise."}]}]}));
        let r = MessagesRequest::parse(&body).unwrap();
        assert!(r.untranslatable.is_none());
        assert_eq!(
            r.openai_body["messages"][0]["content"],
            json!([
                {"type": "file", "file": {"filename": "q3.pdf", "file_data": "data:application/pdf;base64,JVBER"}},
                {"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBES"}},
                {"type": "text", "text": "Notes."},
                {"type": "text", "text": "Summarise."},
            ])
        );
        // OpenAI → Anthropic: the other way, bare base64 taken as a PDF.
        let chat = |file: Value| {
            obj(
                json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "file", "file": file}, {"type": "text", "text": "Summarise."}]}]}),
            )
        };
        let req = request_to_anthropic(
            &chat(json!({"filename": "q3.pdf", "file_data": "data:application/pdf;base64,JVBER"})),
            "c",
            false,
        )
        .unwrap();
        assert_eq!(
            req["messages"][0]["content"][0],
            json!({"type": "document", "title": "q3.pdf",
                   "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}})
        );
        let req = request_to_anthropic(&chat(json!({"file_data": "JVBER"})), "c", false).unwrap();
        assert_eq!(req["messages"][0]["content"][0]["source"]["data"], "JVBER");
        assert!(req["messages"][0]["content"][0].get("title").is_none());
        // What Anthropic cannot read is refused by name.
        for file in [
            json!({"file_id": "file-abc"}),
            json!({"file_data": "data:text/csv;base64,YSxi"}),
            json!({"file_data": "data:application/pdf,JVBER"}),
            json!({}),
        ] {
            let e = request_to_anthropic(&chat(file.clone()), "c", false).unwrap_err();
            assert_eq!(
                e.param.as_deref(),
                Some("messages[0].content[0].file"),
                "{file}"
            );
        }
    }

    #[test]
    fn a_tool_results_documents_reach_openai_and_what_cannot_is_named() {
        let result = |content: Value| {
            obj(json!({"model": "alias", "max_tokens": 10, "messages": [
                {"role": "user", "content": "Read it"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "r", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": content}]},
            ]}))
        };
        let r = MessagesRequest::parse(&result(json!([
            {"type": "text", "text": "Here:"},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Notes."}},
            {"type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}},
        ])))
        .unwrap();
        assert!(r.untranslatable.is_none());
        let messages = r.openai_body["messages"].as_array().unwrap();
        assert_eq!(
            messages[2],
            json!({"role": "tool", "tool_call_id": "t1", "content": "Here:\nNotes."})
        );
        assert_eq!(messages[3]["content"][0]["file"]["filename"], "a.pdf");
        let r = MessagesRequest::parse(&result(json!([
            {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        ])))
        .unwrap();
        assert_eq!(
            r.untranslatable.unwrap().param.as_deref(),
            Some("messages.2.content.0.content.0.type")
        );
    }

    #[test]
    fn an_image_from_the_files_api_is_anthropics_alone() {
        let with = |source: Value| {
            MessagesRequest::parse(&obj(json!({"model": "alias", "max_tokens": 10, "messages": [
                {"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "What is it?"}]}]})))
            .unwrap()
        };
        let r = with(json!({"type": "file", "file_id": "file_011"}));
        let e = r.untranslatable.unwrap();
        assert_eq!(e.param.as_deref(), Some("messages.0.content.0.type"));
        assert!(e.message.contains("file source"), "{}", e.message);
        let r = with(json!({"type": "url", "url": "https://example.com/a.png"}));
        assert!(r.untranslatable.is_none());
        assert_eq!(
            r.openai_body["messages"][0]["content"][0],
            json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})
        );
    }

    #[test]
    fn a_failed_tool_call_says_so_in_its_openai_tool_message() {
        let body = obj(json!({
            "model": "alias", "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "Go"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t1", "name": "w", "input": {}},
                    {"type": "tool_use", "id": "t2", "name": "w", "input": {}},
                    {"type": "tool_use", "id": "t3", "name": "w", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "timeout", "is_error": true},
                    {"type": "tool_result", "tool_use_id": "t2", "is_error": true},
                    {"type": "tool_result", "tool_use_id": "t3", "content": "ok", "is_error": false}]},
            ],
        }));
        let r = MessagesRequest::parse(&body).unwrap();
        let tools: Vec<_> = r.openai_body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "tool")
            .map(|m| {
                (
                    m["tool_call_id"].as_str().unwrap(),
                    m["content"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            tools,
            [("t1", "Error: timeout"), ("t2", "Error"), ("t3", "ok")]
        );
    }

    #[test]
    fn a_messages_request_missing_fields_names_them() {
        for (body, param) in [
            (json!({"max_tokens": 1, "messages": []}), "model"),
            (json!({"model": "m", "messages": []}), "max_tokens"),
            (json!({"model": "m", "max_tokens": 1}), "messages"),
            (
                json!({"model": "m", "max_tokens": 0, "messages": []}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}),
                "messages.0.role",
            ),
        ] {
            let e = MessagesRequest::parse(&obj(body.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }

    /// Empty or ill-typed content used to be named as `messages` (or as a
    /// missing field), an empty system prompt was sent on, and a negative
    /// `top_k` passed unchecked; Anthropic refuses what is refused here.
    #[test]
    fn ill_formed_content_and_top_k_are_named_and_an_empty_system_left_out() {
        let with = |k: &str, v: Value| {
            let mut b = obj(
                json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
            );
            b.insert(k.into(), v);
            b
        };
        for (key, value, param, message) in [
            (
                "messages",
                json!([{"role": "user", "content": []}]),
                "messages.0.content",
                "messages.0.content: all messages must have non-empty content except for the optional final assistant message",
            ),
            (
                "messages",
                json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": []},
                    {"role": "user", "content": "again"}]),
                "messages.1.content",
                "messages.1.content: all messages must have non-empty content except for the optional final assistant message",
            ),
            (
                "messages",
                json!([{"role": "user", "content": 5}]),
                "messages.0.content",
                "messages.0.content: Input should be a valid string or a list of content blocks",
            ),
            (
                "messages",
                json!([{"role": "user", "content": null}]),
                "messages.0.content",
                "messages.0.content: Input should be a valid string or a list of content blocks",
            ),
            (
                "messages",
                json!([{"role": "user"}]),
                "messages.0.content",
                "messages.0.content: Field required",
            ),
            (
                "top_k",
                json!(-1),
                "top_k",
                "top_k: Input should be greater than or equal to 0",
            ),
            (
                "top_k",
                json!(1.5),
                "top_k",
                "top_k: Input should be a valid integer",
            ),
            (
                "top_k",
                json!("5"),
                "top_k",
                "top_k: Input should be a valid integer",
            ),
        ] {
            let e = MessagesRequest::parse(&with(key, value.clone())).unwrap_err();
            assert_eq!(
                (e.param.as_deref(), e.message.as_str()),
                (Some(param), message),
                "{value}"
            );
        }

        // A prefill may be empty, as Anthropic allows for the final
        // assistant message; a valid top_k is passed on.
        let r = MessagesRequest::parse(&with(
            "messages",
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": []}]),
        ))
        .unwrap();
        assert_eq!(
            r.openai_body["messages"],
            json!([{"role": "user", "content": "hi"}])
        );
        let r = MessagesRequest::parse(&with("top_k", json!(0))).unwrap();
        assert_eq!(r.openai_body["top_k"], 0);
        for system in [json!(""), json!([]), json!([{"type": "text", "text": ""}])] {
            let r = MessagesRequest::parse(&with("system", system.clone())).unwrap();
            assert_eq!(
                r.openai_body["messages"],
                json!([{"role": "user", "content": "hi"}]),
                "{system}"
            );
        }
    }

    #[test]
    fn an_openai_refusal_is_anthropics_refusal() {
        let resp = json!({"id": "c", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": null, "refusal": "I can't help with that."}}]});
        let m = response_to_anthropic(&resp, "alias", false);
        assert_eq!(m["stop_reason"], "refusal");
        assert_eq!(
            m["content"],
            json!([{"type": "text", "text": "I can't help with that."}])
        );
        let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
        let mut events = Vec::new();
        for c in [
            json!({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "refusal": ""}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"refusal": "I can't"}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"refusal": " help."}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ] {
            events.extend(s.chunk(&c));
        }
        events.extend(s.finish());
        let text: String = events
            .iter()
            .filter(|(n, _)| *n == "content_block_delta")
            .map(|(_, e)| e["delta"]["text"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(text, "I can't help.");
        let delta = events.iter().find(|(n, _)| *n == "message_delta").unwrap();
        assert_eq!(delta.1["delta"]["stop_reason"], "refusal");
    }

    #[test]
    fn calls_that_share_an_index_but_not_an_id_are_two_tool_blocks() {
        // Ollama sends each of several calls whole, all at index 0.
        let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
        let call = |id: &str, args: &str| {
            json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": id, "type": "function", "function": {"name": format!("f_{id}"), "arguments": args}}
            ]}}]})
        };
        let mut events = Vec::new();
        events.extend(s.chunk(&call("call_a", "{\"a\":1}")));
        events.extend(s.chunk(&call("call_b", "{\"b\":2}")));
        // A later piece of the second call, without an id: still the second.
        events.extend(s.chunk(
            &json!({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": " "}}
            ]}}]}),
        ));
        events.extend(s.finish());
        let starts: Vec<&Value> = events
            .iter()
            .filter(|(n, _)| *n == "content_block_start")
            .map(|(_, e)| &e["content_block"])
            .collect();
        assert_eq!(starts.len(), 2, "{events:?}");
        assert_eq!(
            (starts[0]["id"].as_str(), starts[0]["name"].as_str()),
            (Some("call_a"), Some("f_call_a"))
        );
        assert_eq!(
            (starts[1]["id"].as_str(), starts[1]["name"].as_str()),
            (Some("call_b"), Some("f_call_b"))
        );
        let json_of = |block: u64| -> String {
            events
                .iter()
                .filter(|(n, e)| *n == "content_block_delta" && e["index"] == block)
                .map(|(_, e)| e["delta"]["partial_json"].as_str().unwrap_or(""))
                .collect()
        };
        assert_eq!(json_of(0), "{\"a\":1}");
        assert_eq!(json_of(1), "{\"b\":2} ");
    }

    /// Events of an OpenAI stream made of `chunks`, through its end.
    fn translated(chunks: &[Value]) -> Vec<Event> {
        let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
        let mut events: Vec<Event> = chunks.iter().flat_map(|c| s.chunk(c)).collect();
        events.extend(s.finish());
        events
    }

    /// The content blocks an Anthropic SDK builds from `events` (text
    /// joined, a tool's `partial_json` joined and parsed, `{}` when none;
    /// unparsed as `partial_json` when cut short), after checking that no
    /// block starts while another is open.
    fn assembled(events: &[Event]) -> Vec<Value> {
        let mut blocks: Vec<(Value, String)> = Vec::new();
        let mut open: Option<u64> = None;
        for (name, e) in events {
            match *name {
                "content_block_start" => {
                    assert_eq!(open, None, "blocks interleave: {events:?}");
                    assert_eq!(e["index"], blocks.len(), "{events:?}");
                    open = e["index"].as_u64();
                    blocks.push((e["content_block"].clone(), String::new()));
                }
                "content_block_delta" => {
                    assert_eq!(e["index"].as_u64(), open, "a delta outside its block");
                    let (block, json) = blocks.last_mut().unwrap();
                    match e["delta"]["type"].as_str() {
                        Some("text_delta") => {
                            let text = format!(
                                "{}{}",
                                block["text"].as_str().unwrap(),
                                e["delta"]["text"].as_str().unwrap()
                            );
                            block["text"] = json!(text);
                        }
                        Some("input_json_delta") => {
                            json.push_str(e["delta"]["partial_json"].as_str().unwrap());
                        }
                        other => panic!("unexpected delta {other:?}"),
                    }
                }
                "content_block_stop" => {
                    assert_eq!(e["index"].as_u64(), open, "{events:?}");
                    open = None;
                }
                _ => {}
            }
        }
        blocks
            .into_iter()
            .map(|(mut block, json)| {
                // Arguments cut short by the stream's end stay as they came.
                match serde_json::from_str(&json) {
                    Ok(input) => block["input"] = input,
                    Err(_) if !json.is_empty() => block["partial_json"] = json!(json),
                    Err(_) => {}
                }
                block
            })
            .collect()
    }

    /// A Messages client cannot ask for several choices, but a provider may
    /// send them: only choice 0 is the answer (choice 1's text used to run
    /// into it, wherever it stood in the chunk).
    #[test]
    fn only_the_first_choice_of_a_stream_is_the_answer() {
        let events = translated(&[
            json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
            json!({"id": "c", "choices": [{"index": 1, "delta": {"content": " other", "tool_calls": [
                {"index": 0, "id": "call_x", "function": {"name": "f", "arguments": "{}"}}]}}]}),
            json!({"id": "c", "choices": [{"index": 1, "delta": {}, "finish_reason": "length"},
                {"index": 0, "delta": {"content": " there"}}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        ]);

        assert_eq!(
            assembled(&events),
            [json!({"type": "text", "text": "Hi there"})]
        );
        let stop = events.iter().find(|(n, _)| *n == "message_delta").unwrap();
        assert_eq!(stop.1["delta"]["stop_reason"], "end_turn");
    }

    /// Text that arrives while a tool call's arguments are still coming
    /// used to close the call's block, and the rest of its arguments were
    /// lost (the SDK saw `input: {}`): the text waits until the call's block
    /// closes, and the arguments still stream as they arrive.
    #[test]
    fn text_amid_a_tool_calls_arguments_loses_neither() {
        let chunk = |delta: Value| json!({"id": "c", "choices": [{"index": 0, "delta": delta}]});
        let events = translated(&[
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                "function": {"name": "f", "arguments": "{\"city\":"}}]}),
            ),
            chunk(json!({"content": "mid"})),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]})),
            json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ]);

        assert_eq!(
            assembled(&events),
            [
                json!({"type": "tool_use", "id": "call_a", "name": "f", "input": {"city": "Paris"}}),
                json!({"type": "text", "text": "mid"}),
            ]
        );
        let fragments: Vec<&str> = events
            .iter()
            .filter_map(|(_, e)| e["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(
            fragments,
            ["{\"city\":", "\"Paris\"}"],
            "streamed as they came"
        );
        let stop = events.iter().find(|(n, _)| *n == "message_delta").unwrap();
        assert_eq!(stop.1["delta"]["stop_reason"], "tool_use");

        // Text once the arguments are whole closes the call at once, and a
        // stream cut inside the arguments still gives the text it had.
        let events = translated(&[
            chunk(json!({"content": "Let me look. "})),
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": "{}"}}]}),
            ),
            chunk(json!({"content": "Done"})),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{\"x\""}}]}),
            ),
            chunk(json!({"content": "!"})),
        ]);
        let blocks = assembled(&events);
        assert_eq!(blocks.len(), 5, "{blocks:?}");
        assert_eq!(blocks[0], json!({"type": "text", "text": "Let me look. "}));
        assert_eq!(blocks[1]["input"], json!({}));
        assert_eq!(blocks[2], json!({"type": "text", "text": "Done"}));
        assert_eq!(blocks[3]["partial_json"], "{\"x\"");
        assert_eq!(blocks[4], json!({"type": "text", "text": "!"}));
    }

    #[test]
    fn openai_chunks_become_anthropic_events() {
        let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
        let chunks = [
            json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
            json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "w", "arguments": ""}}]}}]}),
            json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}),
            json!({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
        ];
        let mut names = Vec::new();
        for c in &chunks {
            names.extend(s.chunk(c).into_iter().map(|(n, _)| n));
        }
        let end = s.finish();
        names.extend(end.iter().map(|(n, _)| *n));
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(end[1].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(end[1].1["usage"]["output_tokens"], 4);
    }

    #[test]
    fn an_openai_answer_becomes_an_anthropic_message() {
        let resp = json!({"id": "chatcmpl-9", "choices": [{"message": {"role": "assistant", "content": "Hello"}, "finish_reason": "length"}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}});
        let m = response_to_anthropic(&resp, "alias", false);
        assert_eq!(
            m,
            json!({
                "id": "msg_9", "type": "message", "role": "assistant", "model": "alias",
                "content": [{"type": "text", "text": "Hello"}],
                "stop_reason": "max_tokens", "stop_sequence": null,
                "usage": {"input_tokens": 1, "output_tokens": 2,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
            })
        );
    }

    #[test]
    fn a_tool_call_answer_stops_for_tool_use_with_an_id_and_cached_tokens_apart() {
        // A server that says `stop` beside its tool call, gives it no id and
        // served part of the prompt from its cache.
        let resp = json!({"id": "chatcmpl-9", "choices": [{"message": {"role": "assistant", "content": null,
            "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{\"c\":1}"}}]},
            "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 8}}});
        let m = response_to_anthropic(&resp, "alias", false);
        assert_eq!(m["stop_reason"], "tool_use", "{m}");
        let id = m["content"][0]["id"].as_str().unwrap();
        assert!(id.starts_with("toolu_") && id.len() == 30, "{id}");
        assert_eq!(m["content"][0]["input"], json!({"c": 1}));
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 2, "output_tokens": 2,
                   "cache_creation_input_tokens": 0, "cache_read_input_tokens": 8})
        );
        // Cut at max_tokens stays max_tokens.
        let mut cut = resp.clone();
        cut["choices"][0]["finish_reason"] = json!("length");
        assert_eq!(
            response_to_anthropic(&cut, "alias", false)["stop_reason"],
            "max_tokens"
        );
    }

    #[test]
    fn a_streamed_tool_call_without_id_or_tool_calls_reason_still_stops_for_tool_use() {
        let mut s = OpenAiToAnthropicStream::new("alias", 0, false);
        let mut events = Vec::new();
        for c in [
            json!({"id": "x", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "w", "arguments": "{}"}}]}}]}),
            json!({"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            json!({"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 3}}}),
        ] {
            events.extend(s.chunk(&c));
        }
        events.extend(s.finish());
        let start = events
            .iter()
            .find(|(n, _)| *n == "content_block_start")
            .unwrap();
        assert!(start.1["content_block"]["id"]
            .as_str()
            .unwrap()
            .starts_with("toolu_"));
        let delta = events.iter().find(|(n, _)| *n == "message_delta").unwrap();
        assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
        assert_eq!(delta.1["usage"]["input_tokens"], 2);
        assert_eq!(delta.1["usage"]["cache_read_input_tokens"], 3);
    }

    #[test]
    fn empty_tools_mean_none_and_stop_sequences_are_checked() {
        let base =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = obj(base.clone());
            b.insert(k.into(), v);
            b
        };
        let mut b = with("tools", json!([]));
        b.insert("tool_choice".into(), json!({"type": "auto"}));
        let r = MessagesRequest::parse(&b).unwrap();
        assert!(!r.openai_body.contains_key("tools"), "{:?}", r.openai_body);
        assert!(!r.openai_body.contains_key("tool_choice"));
        let r = MessagesRequest::parse(&with("tool_choice", json!({"type": "any"}))).unwrap();
        assert!(!r.openai_body.contains_key("tool_choice"));

        for bad in [json!("STOP"), json!([1])] {
            let e = MessagesRequest::parse(&with("stop_sequences", bad.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("stop_sequences"), "{bad}");
            assert!(e.message.starts_with("stop_sequences: "), "{}", e.message);
        }
        // Five are more than OpenAI's `stop` takes, not more than Anthropic's.
        let r = MessagesRequest::parse(&with("stop_sequences", json!(["a", "b", "c", "d", "e"])))
            .unwrap();
        let e = r.untranslatable.unwrap();
        assert_eq!(e.param.as_deref(), Some("stop_sequences"));
        assert!(
            e.message.starts_with("stop_sequences: at most 4"),
            "{}",
            e.message
        );
        assert!(!r.openai_body.contains_key("stop"));
        // A block with no OpenAI form (a document by URL), the same.
        let r = MessagesRequest::parse(&with(
            "messages",
            json!([{"role": "user", "content": [
                {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
                {"type": "text", "text": "Summarise."},
            ]}]),
        ))
        .unwrap();
        let e = r.untranslatable.unwrap();
        assert_eq!(e.param.as_deref(), Some("messages.0.content.0.type"));
        assert_eq!(
            e.message,
            "messages.0.content.0: unsupported block type document"
        );
        // (A stand-in keeps the translation well-formed; it is never sent,
        // since only an all-Anthropic route takes such a request.)
        assert_eq!(
            r.openai_body["messages"],
            json!([{"role": "user", "content": [
                {"type": "text", "text": "[document]"},
                {"type": "text", "text": "Summarise."},
            ]}])
        );
        let r =
            MessagesRequest::parse(&with("stop_sequences", json!(["a", "b", "c", "d"]))).unwrap();
        assert_eq!(r.openai_body["stop"], json!(["a", "b", "c", "d"]));
    }
}
