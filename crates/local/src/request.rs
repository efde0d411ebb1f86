//! Reading an OpenAI chat-completions body into what the chat engine runs,
//! and refusing, in OpenAI's error shape and naming the field, what a small
//! text-only model cannot do. The gateway has already checked the types and
//! ranges OpenAI documents; this adds only the local model's own limits.

use serde_json::{Map, Value};

use crate::chat::{ChatMessage, GenerateRequest, Role};
use crate::grammar;
use crate::tools;

/// A chat request as the local provider runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRequest {
    pub generate: GenerateRequest,
    /// The reply is the tool grammar's JSON, to be read by
    /// [`tools::ReplyParser`].
    pub tools: bool,
}

/// A request the local model refuses: relayed to the client as a 400.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub param: String,
    pub message: String,
}

impl Refusal {
    pub(crate) fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// OpenAI allows up to four stop sequences.
const MAX_STOP: usize = 4;

pub fn generate_request(
    body: &Map<String, Value>,
    default_max_tokens: u32,
) -> Result<LocalRequest, Refusal> {
    let messages = messages(body)?;
    let max_tokens = match body
        .get("max_completion_tokens")
        .or_else(|| body.get("max_tokens"))
    {
        None | Some(Value::Null) => default_max_tokens,
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            .ok_or_else(|| Refusal::new("max_tokens", "Expected a positive integer."))?,
    };
    let number = |key: &str, default: f64| -> Result<f64, Refusal> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Refusal::new(key, "Expected a number.")),
        }
    };
    // OpenAI's defaults: temperature 1, top_p 1.
    let temperature = number("temperature", 1.0)? as f32;
    let top_p = number("top_p", 1.0)? as f32;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Refusal::new(
            "top_p",
            "Expected a number above 0 and at most 1.",
        ));
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .ok_or_else(|| Refusal::new("seed", "Expected an integer."))?,
        ),
    };
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(Refusal::new(
                    "stop",
                    format!("Expected at most {MAX_STOP} stop sequences."),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    s.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| Refusal::new(format!("stop[{i}]"), "Expected a string."))
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(Refusal::new(
                "stop",
                "Expected a string or an array of strings.",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(Refusal::new("stop", "Stop sequences must not be empty."));
    }
    if body.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(Refusal::new(
            "n",
            "The local model generates one choice per request; set n to 1.",
        ));
    }
    let tool_set = tools::from_body(body)?;
    let mut grammar = None;
    let mut system_suffix = None;
    if let Some(set) = &tool_set {
        grammar = Some(set.grammar()?);
        system_suffix = Some(set.system_text());
    }
    if let Some(format) = body.get("response_format").filter(|f| !f.is_null()) {
        let format_grammar = response_format(format)?;
        if format_grammar.is_some() && tool_set.is_some() {
            return Err(Refusal::new(
                "response_format",
                "The local model follows either tools or a JSON response_format, not both.",
            ));
        }
        if format_grammar.is_some() {
            grammar = format_grammar;
        }
    }
    if body.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(Refusal::new(
            "logprobs",
            "The local model does not return log probabilities.",
        ));
    }
    Ok(LocalRequest {
        generate: GenerateRequest {
            messages,
            max_tokens,
            temperature,
            top_p,
            seed,
            stop,
            system_suffix,
            grammar,
        },
        tools: tool_set.is_some(),
    })
}

/// The grammar a `response_format` asks for: none for `text`, any JSON
/// object for `json_object`, the schema's values for `json_schema`.
fn response_format(format: &Value) -> Result<Option<String>, Refusal> {
    let kind = format.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => grammar::for_schema(&serde_json::json!({"type": "object"}))
            .map(Some)
            .map_err(|e| Refusal::new("response_format", e.0)),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| {
                    Refusal::new(
                        "response_format.json_schema.schema",
                        "Expected the JSON Schema the reply must follow.",
                    )
                })?;
            grammar::for_schema(schema).map(Some).map_err(|e| {
                Refusal::new(
                    "response_format.json_schema.schema",
                    format!("The local model cannot follow this schema: {e}."),
                )
            })
        }
        _ => Err(Refusal::new(
            "response_format.type",
            "Expected text, json_object or json_schema.",
        )),
    }
}

fn messages(body: &Map<String, Value>) -> Result<Vec<ChatMessage>, Refusal> {
    let Some(Value::Array(items)) = body.get("messages") else {
        return Err(Refusal::new("messages", "Expected an array of messages."));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            // A tool's result reaches the model as what the user reports
            // back (see `tools::result_text`).
            Some("tool" | "function") => Role::User,
            _ => {
                return Err(Refusal::new(
                    format!("messages[{i}].role"),
                    "Expected system, developer, user, assistant or tool.",
                ))
            }
        };
        let mut content = text_of(m.get("content"), i)?;
        match m.get("role").and_then(Value::as_str) {
            Some("assistant") => {
                if let Some(Value::Array(calls)) = m.get("tool_calls") {
                    let calls_text = tools::calls_text(calls, i)?;
                    if !calls_text.is_empty() {
                        if !content.is_empty() {
                            content.push('\n');
                        }
                        content.push_str(&calls_text);
                    }
                }
            }
            Some("tool") => {
                // Named after the call it answers, when that call is here.
                let id = m.get("tool_call_id").and_then(Value::as_str);
                let name = id.and_then(|id| called_name(&items[..i], id));
                content = tools::result_text(name, &content);
            }
            Some("function") => {
                let name = m.get("name").and_then(Value::as_str);
                content = tools::result_text(name, &content);
            }
            _ => {}
        }
        out.push(ChatMessage { role, content });
    }
    if out.is_empty() {
        return Err(Refusal::new("messages", "Expected at least one message."));
    }
    Ok(out)
}

/// The function an earlier assistant message called with this call id.
fn called_name<'a>(earlier: &'a [Value], id: &str) -> Option<&'a str> {
    earlier.iter().rev().find_map(|m| {
        m.get("tool_calls")?.as_array()?.iter().find_map(|c| {
            (c.get("id")?.as_str()? == id)
                .then(|| c.get("function")?.get("name")?.as_str())
                .flatten()
        })
    })
}

/// A message's text: a string, or the text parts of an array; an image or
/// audio part is refused, since the model reads text only.
fn text_of(content: Option<&Value>, i: usize) -> Result<String, Refusal> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    _ => {
                        return Err(Refusal::new(
                            format!("messages[{i}].content[{j}]"),
                            "The local model reads text only: send parts of type `text`.",
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(Refusal::new(
            format!("messages[{i}].content"),
            "Expected a string or an array of content parts.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<GenerateRequest, Refusal> {
        full(v).map(|r| r.generate)
    }

    fn full(v: Value) -> Result<LocalRequest, Refusal> {
        generate_request(v.as_object().unwrap(), 256)
    }

    #[test]
    fn openai_defaults_and_fields_are_read() {
        let r = parse(json!({"messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null},
        ]}))
        .unwrap();
        assert_eq!(r.messages.len(), 3);
        assert!(matches!(r.messages[0].role, Role::System));
        assert_eq!(r.messages[1].content, "Hi there");
        assert_eq!(r.messages[2].content, "");
        assert_eq!((r.max_tokens, r.temperature, r.top_p), (256, 1.0, 1.0));
        assert_eq!((r.seed, r.stop.len()), (None, 0));

        let r = parse(json!({"messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 9, "max_tokens": 5, "temperature": 0, "top_p": 0.5,
            "seed": -3, "stop": ["a", "b"]}))
        .unwrap();
        assert_eq!((r.max_tokens, r.temperature, r.top_p), (9, 0.0, 0.5));
        assert_eq!(r.seed, Some((-3i64) as u64));
        assert_eq!(r.stop, vec!["a".to_owned(), "b".to_owned()]);
        let r =
            parse(json!({"messages": [{"role": "user", "content": "x"}], "stop": "END"})).unwrap();
        assert_eq!(r.stop, vec!["END".to_owned()]);
        // Tools the caller told the model not to use, and plain text: no
        // grammar, nothing added to the prompt.
        let r = full(json!({"messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none",
            "response_format": {"type": "text"}}))
        .unwrap();
        assert!(!r.tools);
        assert_eq!((r.generate.grammar, r.generate.system_suffix), (None, None));
    }

    #[test]
    fn tools_add_their_prompt_and_grammar() {
        let r = full(json!({"messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}}]}))
        .unwrap();
        assert!(r.tools);
        assert!(r.generate.system_suffix.unwrap().contains("get_weather"));
        assert!(r.generate.grammar.unwrap().contains("tool_call"));
    }

    #[test]
    fn a_json_response_format_is_a_grammar() {
        let r = full(json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"}}))
        .unwrap();
        assert!(!r.tools);
        assert!(r
            .generate
            .grammar
            .unwrap()
            .starts_with("root ::= json-object"));
        let r = parse(json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a",
                "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}}))
        .unwrap();
        assert!(r.grammar.unwrap().contains(r#""\"n\"" ": " json-int"#));
    }

    #[test]
    fn tool_history_is_rendered_for_the_model() {
        let r = parse(json!({"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_9", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_9", "content": "22 C and sunny"},
        ]}))
        .unwrap();
        assert_eq!(
            r.messages[1].content,
            r#"{"tool_call": {"name": "get_weather", "arguments": {"location": "Paris"}}}"#
        );
        assert!(matches!(r.messages[2].role, Role::User));
        assert_eq!(
            r.messages[2].content,
            r#"{"tool_response": {"tool": "get_weather", "content": "22 C and sunny"}}"#
        );
    }

    #[test]
    fn what_the_local_model_cannot_do_is_refused_by_field() {
        let user = json!([{"role": "user", "content": "x"}]);
        for (body, param) in [
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:"}}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"messages": [{"role": "user", "content": 7}]}),
                "messages[0].content",
            ),
            (json!({"messages": user, "n": 2}), "n"),
            (
                json!({"messages": user, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"messages": user, "tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"messages": user, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"messages": user, "response_format": {"type": "yaml"}}),
                "response_format.type",
            ),
            (json!({"messages": user, "logprobs": true}), "logprobs"),
            (
                json!({"messages": user, "stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (json!({"messages": user, "stop": [""]}), "stop"),
            (json!({"messages": user, "stop": [1]}), "stop[0]"),
            (json!({"messages": user, "top_p": 0}), "top_p"),
            (json!({"messages": user, "max_tokens": 0}), "max_tokens"),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.param, param, "{body}");
            assert!(!e.message.is_empty());
        }
    }
}
