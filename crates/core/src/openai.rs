//! OpenAI-compatible request shapes, validated field by field.
//!
//! Bodies are kept as JSON objects (key order preserved) so that every field
//! the gateway does not interpret — `tools`, `response_format`, `logprobs`,
//! provider-specific extras — reaches the provider untouched. Validation
//! checks the fields OpenAI documents and names the first bad one, with the
//! message and code style of OpenAI's own 400s.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A 400 naming the parameter at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRequest {
    pub message: String,
    /// The offending parameter, e.g. `messages[0].role`.
    pub param: Option<String>,
    /// A stable machine code, e.g. `invalid_type`.
    pub code: &'static str,
}

impl InvalidRequest {
    fn new(param: impl Into<String>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: Some(param.into()),
            code,
        }
    }
    fn missing(param: &str) -> Self {
        Self::new(
            param,
            "missing_required_parameter",
            format!("Missing required parameter: '{param}'."),
        )
    }
    fn wrong_type(param: &str, expected: &str, got: &Value) -> Self {
        Self::new(
            param,
            "invalid_type",
            format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                type_name(got)
            ),
        )
    }
    fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::new(param, "invalid_value", message)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a JSON body into an object, or explains why it is not one.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, InvalidRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(InvalidRequest {
            message: "The request body is empty; expected a JSON object.".into(),
            param: None,
            code: "invalid_json",
        });
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(InvalidRequest {
            message: format!(
                "The request body must be a JSON object, but got {}.",
                type_name(&other)
            ),
            param: None,
            code: "invalid_json",
        }),
        Err(e) => Err(InvalidRequest {
            message: format!("We could not parse the JSON body of your request: {e}."),
            param: None,
            code: "invalid_json",
        }),
    }
}

/// A validated `POST /v1/chat/completions` body.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` as the client asked.
    pub include_usage: bool,
    /// The whole body as received.
    pub body: Map<String, Value>,
    /// The Anthropic Messages request this request was translated from (on
    /// `POST /v1/messages`): an Anthropic deployment is sent it as it came
    /// (see [`crate::anthropic::native_request`]).
    pub anthropic: Option<crate::anthropic::NativeMessages>,
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

impl ChatRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidRequest> {
        Self::from_object(parse_object(bytes)?)
    }

    /// Validates a body already parsed (or built by a translation layer).
    pub fn from_object(body: Map<String, Value>) -> Result<Self, InvalidRequest> {
        let model = required_string(&body, "model")?;
        validate_messages(&body)?;
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        let mut include_usage = false;
        match body.get("stream_options") {
            None | Some(Value::Null) => {}
            Some(Value::Object(opts)) => {
                if !stream {
                    return Err(InvalidRequest::invalid_value(
                        "stream_options",
                        "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                    ));
                }
                match opts.get("include_usage") {
                    None | Some(Value::Null) => {}
                    Some(Value::Bool(b)) => include_usage = *b,
                    Some(v) => {
                        return Err(InvalidRequest::wrong_type(
                            "stream_options.include_usage",
                            "a boolean",
                            v,
                        ))
                    }
                }
            }
            Some(v) => return Err(InvalidRequest::wrong_type("stream_options", "an object", v)),
        }
        number_in(&body, "temperature", 0.0, 2.0)?;
        number_in(&body, "top_p", 0.0, 1.0)?;
        number_in(&body, "presence_penalty", -2.0, 2.0)?;
        number_in(&body, "frequency_penalty", -2.0, 2.0)?;
        integer_in(&body, "n", 1, 128)?;
        integer_in(&body, "max_tokens", 1, i64::MAX)?;
        integer_in(&body, "max_completion_tokens", 1, i64::MAX)?;
        integer_in(&body, "seed", i64::MIN, i64::MAX)?;
        integer_in(&body, "top_logprobs", 0, 20)?;
        optional_bool(&body, "logprobs")?;
        optional_bool(&body, "parallel_tool_calls")?;
        optional_string(&body, "user")?;
        validate_stop(&body)?;
        validate_tools(&body)?;
        validate_tool_choice(&body)?;
        match body.get("response_format") {
            None | Some(Value::Null) => {}
            Some(Value::Object(f)) => match f.get("type") {
                Some(Value::String(_)) => {}
                None => return Err(InvalidRequest::missing("response_format.type")),
                Some(v) => {
                    return Err(InvalidRequest::wrong_type(
                        "response_format.type",
                        "a string",
                        v,
                    ))
                }
            },
            Some(v) => {
                return Err(InvalidRequest::wrong_type(
                    "response_format",
                    "an object",
                    v,
                ))
            }
        }
        Ok(Self {
            model,
            stream,
            include_usage,
            body,
            anthropic: None,
        })
    }
}

/// A rough count of a chat request's prompt tokens, for when the provider
/// never reports one (a stream that ended before its usage chunk): the text
/// of the messages and tool definitions at 4 bytes of UTF-8 a token, plus 3
/// tokens a message and 765 an attachment (an image at high detail, 1024²).
/// Walks the parsed body without serializing any of it.
pub fn estimate_prompt_tokens(body: &Map<String, Value>) -> u64 {
    const PER_MESSAGE: u64 = 3;
    const PER_ATTACHMENT: u64 = 765;
    fn weigh(v: &Value, keys: bool, bytes: &mut u64, fixed: &mut u64) {
        match v {
            Value::String(s) => *bytes += s.len() as u64,
            Value::Number(_) | Value::Bool(_) => *bytes += 2,
            Value::Null => {}
            Value::Array(items) => items.iter().for_each(|x| weigh(x, keys, bytes, fixed)),
            Value::Object(o) => match o.get("type").and_then(Value::as_str) {
                Some("image_url" | "input_audio" | "file") => *fixed += PER_ATTACHMENT,
                _ => {
                    for (k, x) in o {
                        if keys {
                            *bytes += k.len() as u64;
                        }
                        if !matches!(k.as_str(), "type" | "id" | "tool_call_id") {
                            weigh(x, keys, bytes, fixed);
                        }
                    }
                }
            },
        }
    }
    let (mut bytes, mut fixed) = (0, 0);
    let messages = body.get("messages").and_then(Value::as_array);
    for m in messages.into_iter().flatten() {
        fixed += PER_MESSAGE;
        if let Some(content) = m.get("content") {
            weigh(content, false, &mut bytes, &mut fixed);
        }
        if let Some(calls) = m.get("tool_calls") {
            weigh(calls, false, &mut bytes, &mut fixed);
        }
    }
    if let Some(tools) = body.get("tools") {
        // Definitions reach the model as JSON, keys and all.
        weigh(tools, true, &mut bytes, &mut fixed);
    }
    bytes.div_ceil(4) + fixed
}

/// An embeddings request's input tokens, estimated the same way (for a
/// call that ended before its provider said): text at 4 bytes a token, at
/// least one per input; token arrays as their length.
pub fn estimate_embedding_tokens(body: &Map<String, Value>) -> u64 {
    fn weigh(v: &Value) -> u64 {
        match v {
            Value::String(s) => (s.len() as u64).div_ceil(4).max(1),
            Value::Number(_) => 1,
            Value::Array(items) => items.iter().map(weigh).sum(),
            _ => 0,
        }
    }
    body.get("input").map_or(0, weigh)
}

fn validate_messages(body: &Map<String, Value>) -> Result<(), InvalidRequest> {
    let messages = match body.get("messages") {
        None | Some(Value::Null) => return Err(InvalidRequest::missing("messages")),
        Some(Value::Array(m)) => m,
        Some(v) => return Err(InvalidRequest::wrong_type("messages", "an array", v)),
    };
    if messages.is_empty() {
        return Err(InvalidRequest::new(
            "messages",
            "empty_array",
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        ));
    }
    for (i, m) in messages.iter().enumerate() {
        let p = |field: &str| format!("messages[{i}].{field}");
        let Value::Object(m) = m else {
            return Err(InvalidRequest::wrong_type(
                &format!("messages[{i}]"),
                "an object",
                m,
            ));
        };
        let role = match m.get("role") {
            None => return Err(InvalidRequest::missing(&p("role"))),
            Some(Value::String(r)) => r.as_str(),
            Some(v) => return Err(InvalidRequest::wrong_type(&p("role"), "a string", v)),
        };
        if !ROLES.contains(&role) {
            return Err(InvalidRequest::invalid_value(
                &p("role"),
                format!(
                    "Invalid value for 'messages[{i}].role': '{role}'. Supported values are: {}.",
                    ROLES
                        .iter()
                        .map(|r| format!("'{r}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let may_omit_content = role == "assistant";
        match m.get("content") {
            None | Some(Value::Null) if may_omit_content => {}
            None => return Err(InvalidRequest::missing(&p("content"))),
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let pp = format!("messages[{i}].content[{j}]");
                    match part {
                        Value::Object(o) => match o.get("type") {
                            Some(Value::String(_)) => {}
                            None => return Err(InvalidRequest::missing(&format!("{pp}.type"))),
                            Some(v) => {
                                return Err(InvalidRequest::wrong_type(
                                    &format!("{pp}.type"),
                                    "a string",
                                    v,
                                ))
                            }
                        },
                        v => return Err(InvalidRequest::wrong_type(&pp, "an object", v)),
                    }
                }
            }
            Some(v) => {
                return Err(InvalidRequest::wrong_type(
                    &p("content"),
                    "a string or an array of content parts",
                    v,
                ))
            }
        }
        if role == "tool" {
            match m.get("tool_call_id") {
                Some(Value::String(_)) => {}
                None => return Err(InvalidRequest::missing(&p("tool_call_id"))),
                Some(v) => {
                    return Err(InvalidRequest::wrong_type(
                        &p("tool_call_id"),
                        "a string",
                        v,
                    ))
                }
            }
        }
        if let Some(v) = m.get("name") {
            if !v.is_string() {
                return Err(InvalidRequest::wrong_type(&p("name"), "a string", v));
            }
        }
        match m.get("tool_calls") {
            None | Some(Value::Null) | Some(Value::Array(_)) => {}
            Some(v) => return Err(InvalidRequest::wrong_type(&p("tool_calls"), "an array", v)),
        }
    }
    Ok(())
}

fn validate_stop(body: &Map<String, Value>) -> Result<(), InvalidRequest> {
    match body.get("stop") {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(Value::Array(items)) => {
            if items.len() > 4 {
                return Err(InvalidRequest::invalid_value(
                    "stop",
                    format!("Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length {} instead.", items.len()),
                ));
            }
            for (i, s) in items.iter().enumerate() {
                if !s.is_string() {
                    return Err(InvalidRequest::wrong_type(
                        &format!("stop[{i}]"),
                        "a string",
                        s,
                    ));
                }
            }
            Ok(())
        }
        Some(v) => Err(InvalidRequest::wrong_type(
            "stop",
            "a string or an array of strings",
            v,
        )),
    }
}

fn validate_tools(body: &Map<String, Value>) -> Result<(), InvalidRequest> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(t)) => t,
        Some(v) => return Err(InvalidRequest::wrong_type("tools", "an array", v)),
    };
    for (i, t) in tools.iter().enumerate() {
        let Value::Object(t) = t else {
            return Err(InvalidRequest::wrong_type(
                &format!("tools[{i}]"),
                "an object",
                t,
            ));
        };
        match t.get("type") {
            Some(Value::String(_)) => {}
            None => return Err(InvalidRequest::missing(&format!("tools[{i}].type"))),
            Some(v) => {
                return Err(InvalidRequest::wrong_type(
                    &format!("tools[{i}].type"),
                    "a string",
                    v,
                ))
            }
        }
        if t.get("type").and_then(Value::as_str) == Some("function") {
            match t.get("function") {
                Some(Value::Object(f)) => match f.get("name") {
                    Some(Value::String(_)) => {}
                    None => {
                        return Err(InvalidRequest::missing(&format!(
                            "tools[{i}].function.name"
                        )))
                    }
                    Some(v) => {
                        return Err(InvalidRequest::wrong_type(
                            &format!("tools[{i}].function.name"),
                            "a string",
                            v,
                        ))
                    }
                },
                None => return Err(InvalidRequest::missing(&format!("tools[{i}].function"))),
                Some(v) => {
                    return Err(InvalidRequest::wrong_type(
                        &format!("tools[{i}].function"),
                        "an object",
                        v,
                    ))
                }
            }
        }
    }
    Ok(())
}

fn validate_tool_choice(body: &Map<String, Value>) -> Result<(), InvalidRequest> {
    match body.get("tool_choice") {
        None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
        Some(Value::String(s)) if ["none", "auto", "required"].contains(&s.as_str()) => Ok(()),
        Some(Value::String(s)) => Err(InvalidRequest::invalid_value(
            "tool_choice",
            format!("Invalid value for 'tool_choice': '{s}'. Supported values are: 'none', 'auto', 'required', or an object naming a function."),
        )),
        Some(v) => Err(InvalidRequest::wrong_type("tool_choice", "a string or an object", v)),
    }
}

fn required_string(body: &Map<String, Value>, key: &str) -> Result<String, InvalidRequest> {
    match body.get(key) {
        None | Some(Value::Null) => Err(InvalidRequest::missing(key)),
        Some(Value::String(s)) if s.is_empty() => Err(InvalidRequest::invalid_value(
            key,
            format!("Invalid '{key}': empty string. Expected a non-empty string."),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(InvalidRequest::wrong_type(key, "a string", v)),
    }
}

fn optional_string(body: &Map<String, Value>, key: &str) -> Result<(), InvalidRequest> {
    match body.get(key) {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
        Some(v) => Err(InvalidRequest::wrong_type(key, "a string", v)),
    }
}

fn optional_bool(body: &Map<String, Value>, key: &str) -> Result<Option<bool>, InvalidRequest> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(InvalidRequest::wrong_type(key, "a boolean", v)),
    }
}

fn number_in(
    body: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<(), InvalidRequest> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x < min {
                Err(InvalidRequest::new(key, "decimal_below_min_value", format!("Invalid '{key}': decimal below minimum value. Expected a value >= {min}, but got {n} instead.")))
            } else if x > max {
                Err(InvalidRequest::new(key, "decimal_above_max_value", format!("Invalid '{key}': decimal above maximum value. Expected a value <= {max}, but got {n} instead.")))
            } else {
                Ok(())
            }
        }
        Some(v) => Err(InvalidRequest::wrong_type(key, "a decimal", v)),
    }
}

fn integer_in(
    body: &Map<String, Value>,
    key: &str,
    min: i64,
    max: i64,
) -> Result<(), InvalidRequest> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => {
            let x = n.as_i64().unwrap_or(i64::MAX);
            if x < min {
                Err(InvalidRequest::new(key, "integer_below_min_value", format!("Invalid '{key}': integer below minimum value. Expected a value >= {min}, but got {n} instead.")))
            } else if x > max {
                Err(InvalidRequest::new(key, "integer_above_max_value", format!("Invalid '{key}': integer above maximum value. Expected a value <= {max}, but got {n} instead.")))
            } else {
                Ok(())
            }
        }
        Some(v) => Err(InvalidRequest::wrong_type(key, "an integer", v)),
    }
}

/// How embeddings are returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    Float,
    Base64,
}

/// A validated `POST /v1/embeddings` body.
#[derive(Debug, Clone)]
pub struct EmbeddingsRequest {
    pub model: String,
    /// What the client asked for (OpenAI's default is float).
    pub encoding_format: EncodingFormat,
    /// How many inputs (1 for a single string or token array).
    pub input_count: usize,
    pub body: Map<String, Value>,
}

/// OpenAI's limit on inputs per embeddings request.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

impl EmbeddingsRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidRequest> {
        let body = parse_object(bytes)?;
        let model = required_string(&body, "model")?;
        let input_count = match body.get("input") {
            None | Some(Value::Null) => return Err(InvalidRequest::missing("input")),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(InvalidRequest::invalid_value(
                    "input",
                    "Invalid 'input': empty string. Expected a non-empty string.",
                ))
            }
            Some(Value::String(_)) => 1,
            Some(Value::Array(items)) => validate_embedding_array(items)?,
            Some(v) => {
                return Err(InvalidRequest::wrong_type(
                    "input",
                    "a string or an array",
                    v,
                ))
            }
        };
        let encoding_format = match body.get("encoding_format") {
            None | Some(Value::Null) => EncodingFormat::Float,
            Some(Value::String(s)) if s == "float" => EncodingFormat::Float,
            Some(Value::String(s)) if s == "base64" => EncodingFormat::Base64,
            Some(Value::String(s)) => {
                return Err(InvalidRequest::invalid_value(
                    "encoding_format",
                    format!("Invalid value for 'encoding_format': '{s}'. Supported values are: 'float' and 'base64'."),
                ))
            }
            Some(v) => return Err(InvalidRequest::wrong_type("encoding_format", "a string", v)),
        };
        integer_in(&body, "dimensions", 1, 65_536)?;
        optional_string(&body, "user")?;
        Ok(Self {
            model,
            encoding_format,
            input_count,
            body,
        })
    }
}

fn validate_embedding_array(items: &[Value]) -> Result<usize, InvalidRequest> {
    if items.is_empty() {
        return Err(InvalidRequest::new(
            "input",
            "empty_array",
            "Invalid 'input': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        ));
    }
    // One array of token ids is one input, however long (OpenAI's cookbook
    // sends 8191 tokens so); its length is the model's context to judge.
    let is_token_id = |v: &Value| v.as_u64().is_some();
    if items.iter().all(is_token_id) {
        return Ok(1);
    }
    if items.len() > MAX_EMBEDDING_INPUTS {
        return Err(InvalidRequest::new(
            "input",
            "array_above_max_length",
            format!("Invalid 'input': array too long. Expected an array with maximum length {MAX_EMBEDDING_INPUTS}, but got an array with length {} instead.", items.len()),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        match item {
            Value::String(s) if s.is_empty() => {
                return Err(InvalidRequest::invalid_value(
                    &format!("input[{i}]"),
                    format!("Invalid 'input[{i}]': empty string. Expected a non-empty string."),
                ))
            }
            Value::String(_) => {}
            Value::Array(tokens) if !tokens.is_empty() && tokens.iter().all(is_token_id) => {}
            v => {
                return Err(InvalidRequest::wrong_type(
                    &format!("input[{i}]"),
                    "a string or an array of token ids",
                    v,
                ))
            }
        }
    }
    Ok(items.len())
}

/// OpenAI's error envelope: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorEnvelope {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorObject {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// The `usage` object of a response or of the last stream chunk.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(from = "WireUsage")]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of `prompt_tokens`, those read from the provider's prompt cache
    /// (`prompt_tokens_details.cached_tokens`, or DeepSeek's
    /// `prompt_cache_hit_tokens`), which cost less.
    #[serde(skip_serializing)]
    pub cached_tokens: u64,
    /// Of `prompt_tokens`, those written to it (`cache_creation_input_tokens`,
    /// as LiteLLM and Switchyard's Anthropic adapter report them,
    /// `prompt_tokens_details.cache_creation_tokens`, or the OpenAI SDK's
    /// `prompt_tokens_details.cache_write_tokens`), which cost more.
    #[serde(skip_serializing)]
    pub cache_write_tokens: u64,
    /// Of `cache_write_tokens`, those written for an hour rather than five
    /// minutes (Anthropic's `cache_creation.ephemeral_1h_input_tokens`),
    /// which cost more again.
    #[serde(skip_serializing)]
    pub cache_write_1h_tokens: u64,
    /// Searches run by the provider's own web search tool (Anthropic's,
    /// for a client of `/v1/messages`), billed per search.
    #[serde(skip_serializing)]
    pub web_search_requests: u64,
}

/// `usage` as it comes: every field read leniently (a count that is
/// missing, `null`, negative or not a number counts 0; `3.0` counts 3), so
/// that one odd field of one provider never costs the usage — or, where the
/// usage is parsed with the answer, the answer.
#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<Value>,
    #[serde(default)]
    completion_tokens: Option<Value>,
    #[serde(default)]
    prompt_tokens_details: Option<Value>,
    #[serde(default)]
    cache_creation_input_tokens: Option<Value>,
    /// DeepSeek's name for `prompt_tokens_details.cached_tokens`.
    #[serde(default)]
    prompt_cache_hit_tokens: Option<Value>,
    /// Anthropic's cache writes by lifetime, as Switchyard's Anthropic
    /// adapter passes them on.
    #[serde(default)]
    cache_creation: Option<Value>,
    /// All the tokens: the prompt's, where a server (some embedding APIs)
    /// gives no other count.
    #[serde(default)]
    total_tokens: Option<Value>,
}

fn count(v: Option<&Value>) -> Option<u64> {
    let v = v?;
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

impl From<WireUsage> for Usage {
    fn from(w: WireUsage) -> Self {
        let completion = count(w.completion_tokens.as_ref());
        let prompt = count(w.prompt_tokens.as_ref())
            .or_else(|| count(w.total_tokens.as_ref()).filter(|_| completion.is_none()))
            .unwrap_or(0);
        let detail = |k: &str| count(w.prompt_tokens_details.as_ref().and_then(|d| d.get(k)));
        // Parts of the prompt, never more than all of it.
        let cached = detail("cached_tokens")
            .or_else(|| count(w.prompt_cache_hit_tokens.as_ref()))
            .unwrap_or(0)
            .min(prompt);
        let written = count(w.cache_creation_input_tokens.as_ref())
            .or_else(|| detail("cache_creation_tokens"))
            .or_else(|| detail("cache_write_tokens"))
            .unwrap_or(0)
            .min(prompt - cached);
        let written_1h = count(
            w.cache_creation
                .as_ref()
                .and_then(|c| c.get("ephemeral_1h_input_tokens")),
        )
        .unwrap_or(0)
        .min(written);
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion.unwrap_or(0),
            cached_tokens: cached,
            cache_write_tokens: written,
            cache_write_1h_tokens: written_1h,
            web_search_requests: 0,
        }
    }
}

/// Reads a response's `usage` leniently (`#[serde(deserialize_with)]`): an
/// object as [`Usage`], anything else (`null`, a string, a number, an
/// array) as none — an odd `usage` never turns an answer into an error.
pub fn lenient_usage<'de, D>(d: D) -> Result<Option<Usage>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<Usage>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a usage object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Usage::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(V)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

impl Usage {
    /// Prompt and completion counts, nothing read from or written to a cache.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_estimate_counts_text_messages_attachments_and_tools() {
        let body = |v: Value| v.as_object().unwrap().clone();
        // 40 bytes of text in two messages: 10 tokens, plus 3 a message.
        let plain = body(serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": "x".repeat(16)},
            {"role": "user", "content": [{"type": "text", "text": "y".repeat(24)}]},
        ]}));
        assert_eq!(estimate_prompt_tokens(&plain), 10 + 6);
        // An image is a fixed cost, whatever its URL's (base64) size.
        let image = body(serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(100_000))}}
            ]},
        ]}));
        assert_eq!(estimate_prompt_tokens(&image), 765 + 3);
        // Tool calls' arguments and tool definitions count too.
        let tools = body(serde_json::json!({"model": "m",
            "messages": [{"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}));
        // "f" + "{}" in the call (3 bytes; keys not counted), and in the
        // definitions the keys type, function and name (16 bytes) and "f":
        // 20 bytes, 5 tokens, plus 3 for the message.
        assert_eq!(estimate_prompt_tokens(&tools), 5 + 3);
    }
    use serde_json::json;

    #[test]
    fn an_odd_usage_field_counts_nothing_instead_of_losing_the_usage() {
        let usage = |v: Value| serde_json::from_value::<Usage>(v).unwrap();
        let u = usage(json!({"prompt_tokens": 10, "completion_tokens": 3.0,
            "prompt_tokens_details": {"cached_tokens": -1}, "cache_creation_input_tokens": "x"}));
        assert_eq!(u, Usage::new(10, 3));
        let u = usage(
            json!({"prompt_tokens": null, "completion_tokens": 2, "prompt_tokens_details": null}),
        );
        assert_eq!(u, Usage::new(0, 2));
        let u = usage(
            json!({"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": []}),
        );
        assert_eq!(u, Usage::new(10, 1));
        let u = usage(json!({"prompt_tokens": 10, "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 4, "cache_creation_tokens": 9}}));
        assert_eq!((u.cached_tokens, u.cache_write_tokens), (4, 6));
    }

    #[test]
    fn a_usage_that_is_not_an_object_is_no_usage_and_total_tokens_alone_is_the_prompt() {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default, deserialize_with = "lenient_usage")]
            usage: Option<Usage>,
        }
        let read = |text: &str| serde_json::from_str::<Body>(text).unwrap().usage;
        for odd in [r#""n/a""#, "12", "true", "[1, 2]", "null", "1.5"] {
            assert_eq!(read(&format!(r#"{{"usage": {odd}}}"#)), None, "{odd}");
        }
        assert_eq!(read("{}"), None);
        assert_eq!(
            read(r#"{"usage": {"prompt_tokens": 4, "completion_tokens": 2}}"#),
            Some(Usage::new(4, 2))
        );
        // An embedding API's usage (Voyage's): all of it is the prompt.
        assert_eq!(
            read(r#"{"usage": {"total_tokens": 42}}"#),
            Some(Usage::new(42, 0))
        );
        // With a completion count, the total is not the prompt.
        assert_eq!(
            read(r#"{"usage": {"completion_tokens": 2, "total_tokens": 42}}"#),
            Some(Usage::new(0, 2))
        );
    }

    #[test]
    fn cache_writes_in_the_openai_sdks_field_are_cache_writes() {
        // `PromptTokensDetails.cache_write_tokens` in the openai Python SDK.
        let u: Usage = serde_json::from_value(json!({"prompt_tokens": 100, "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 80}}))
        .unwrap();
        assert_eq!((u.cached_tokens, u.cache_write_tokens), (10, 80));
    }

    #[test]
    fn deepseeks_cache_hits_are_cached_tokens() {
        let usage = |v: Value| serde_json::from_value::<Usage>(v).unwrap();
        let u = usage(json!({"prompt_tokens": 100, "completion_tokens": 5,
            "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}));
        assert_eq!(u.cached_tokens, 64);
        // OpenAI's field wins when a server sends both.
        let u = usage(json!({"prompt_tokens": 100, "completion_tokens": 5,
            "prompt_cache_hit_tokens": 64, "prompt_tokens_details": {"cached_tokens": 60}}));
        assert_eq!(u.cached_tokens, 60);
    }

    fn chat(v: Value) -> Result<ChatRequest, InvalidRequest> {
        ChatRequest::parse(v.to_string().as_bytes())
    }

    fn ok_body() -> Value {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn accepts_a_minimal_request_and_keeps_unknown_fields() {
        let mut b = ok_body();
        b["x_vendor"] = json!({"a": 1});
        let r = chat(b).unwrap();
        assert_eq!(r.model, "m");
        assert!(!r.stream);
        assert_eq!(r.body["x_vendor"], json!({"a": 1}));
    }

    #[test]
    fn names_the_field_at_fault() {
        let cases = [
            (
                json!({"messages": []}),
                "model",
                "missing_required_parameter",
            ),
            (json!({"model": 3, "messages": []}), "model", "invalid_type"),
            (
                json!({"model": "m"}),
                "messages",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": []}),
                "messages",
                "empty_array",
            ),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                "messages[0].role",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [{"role": "bot", "content": "x"}]}),
                "messages[0].role",
                "invalid_value",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
                "invalid_type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0].content",
                "missing_required_parameter",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "r"}]}),
                "messages[0].tool_call_id",
                "missing_required_parameter",
            ),
        ];
        for (body, param, code) in cases {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(
                (e.param.as_deref(), e.code),
                (Some(param), code),
                "{body}: {}",
                e.message
            );
        }
    }

    #[test]
    fn checks_types_and_ranges_of_sampling_fields() {
        for (field, value, code) in [
            ("temperature", json!("hot"), "invalid_type"),
            ("temperature", json!(2.5), "decimal_above_max_value"),
            ("top_p", json!(-0.1), "decimal_below_min_value"),
            ("n", json!(0), "integer_below_min_value"),
            ("n", json!(1.5), "invalid_type"),
            ("max_tokens", json!("10"), "invalid_type"),
            ("stream", json!("yes"), "invalid_type"),
            ("stop", json!([1]), "invalid_type"),
            ("stop", json!(["a", "b", "c", "d", "e"]), "invalid_value"),
            ("tools", json!({}), "invalid_type"),
            ("tool_choice", json!("always"), "invalid_value"),
            ("response_format", json!("json"), "invalid_type"),
        ] {
            let mut b = ok_body();
            b[field] = value;
            let e = chat(b).unwrap_err();
            assert_eq!(e.code, code, "{field}: {}", e.message);
            assert!(e.param.as_deref().unwrap().starts_with(field));
        }
    }

    #[test]
    fn stream_options_need_stream() {
        let mut b = ok_body();
        b["stream_options"] = json!({"include_usage": true});
        assert_eq!(
            chat(b.clone()).unwrap_err().param.as_deref(),
            Some("stream_options")
        );
        b["stream"] = json!(true);
        let r = chat(b).unwrap();
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn malformed_json_is_reported_without_a_param() {
        let e = ChatRequest::parse(b"{\"model\": ").unwrap_err();
        assert_eq!((e.code, e.param), ("invalid_json", None));
        assert!(e.message.contains("could not parse"));
        let e = ChatRequest::parse(b"[1]").unwrap_err();
        assert!(e.message.contains("must be a JSON object"), "{}", e.message);
        let e = ChatRequest::parse(b"").unwrap_err();
        assert!(e.message.contains("empty"), "{}", e.message);
    }

    #[test]
    fn embeddings_accept_every_documented_input_shape() {
        for (input, count) in [
            (json!("a"), 1),
            (json!(["a", "b"]), 2),
            (json!([1, 2, 3]), 1),
            (json!([[1, 2], [3]]), 2),
        ] {
            let r = EmbeddingsRequest::parse(
                json!({"model": "e", "input": input}).to_string().as_bytes(),
            )
            .unwrap();
            assert_eq!(r.input_count, count);
            assert_eq!(r.encoding_format, EncodingFormat::Float);
        }
    }

    #[test]
    fn embeddings_reject_bad_input_and_format() {
        for (body, param) in [
            (json!({"model": "e"}), "input"),
            (json!({"model": "e", "input": []}), "input"),
            (json!({"model": "e", "input": 7}), "input"),
            (json!({"model": "e", "input": ["a", 7]}), "input[1]"),
            (json!({"model": "e", "input": ["a", ""]}), "input[1]"),
            (
                json!({"model": "e", "input": "a", "encoding_format": "hex"}),
                "encoding_format",
            ),
            (json!({"input": "a"}), "model"),
            (
                json!({"model": "e", "input": "a", "dimensions": 0}),
                "dimensions",
            ),
        ] {
            let e = EmbeddingsRequest::parse(body.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        let too_many = vec!["x"; MAX_EMBEDDING_INPUTS + 1];
        let e = EmbeddingsRequest::parse(
            json!({"model": "e", "input": too_many})
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.code, "array_above_max_length");
        // One long array of token ids is one input.
        let tokens: Vec<u64> = (0..8191).collect();
        let r = EmbeddingsRequest::parse(
            json!({"model": "e", "input": tokens})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.input_count, 1);
        let e = EmbeddingsRequest::parse(br#"{"model": "e", "input": ""}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("input"));
        assert_eq!(e.code, "invalid_value");
    }
}
