//! Tool calls on a model that was never trained for them, the way
//! llama.cpp's server does for such models ("generic" tool format): the
//! tools are described in the system turn, and the reply is decoded under a
//! grammar that admits only
//!
//! - `{"tool_call": {"name": "<one of the tools>", "arguments": <the tool's
//!   parameters schema>}}`, or
//! - `{"response": "<text>"}` (only when `tool_choice` is `auto`),
//!
//! so that a call always names a real tool with arguments of the right shape
//! (see [`crate::grammar`] for what the schema enforces). The model chooses
//! between the two; a 135M model chooses a call for most questions when
//! tools are offered (docs/local.md).
//!
//! [`ReplyParser`] reads that JSON as it is generated and turns it into
//! OpenAI's stream: the response's text as content deltas, the call's name
//! once it is complete, and the argument text as it arrives, never buffered
//! into one burst.

use serde_json::{json, Map, Value};

use crate::grammar::{literal, GrammarBuilder};
use crate::request::Refusal;

/// OpenAI's limit on tools per request.
const MAX_TOOLS: usize = 128;

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A call or a text reply, as the model chooses.
    Auto,
    /// Some call.
    Required,
    /// A call of this tool.
    Named(String),
}

/// The tools a request offers and how the reply may use them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSet {
    pub tools: Vec<Tool>,
    pub choice: Choice,
}

/// The request's tools, or `None` when it offers none or says
/// `tool_choice: "none"` (then the model answers in text, as OpenAI does).
pub fn from_body(body: &Map<String, Value>) -> Result<Option<ToolSet>, Refusal> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| tool(t, i))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(Refusal::new("tools", "Expected an array of tools.")),
    };
    if tools.len() > MAX_TOOLS {
        return Err(Refusal::new(
            "tools",
            format!("Expected at most {MAX_TOOLS} tools."),
        ));
    }
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err(Refusal::new(
                format!("tools[{i}].function.name"),
                format!("Two tools are named `{}`.", t.name),
            ));
        }
    }
    let choice = match body.get("tool_choice") {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => Choice::Auto,
            "required" => Choice::Required,
            _ => {
                return Err(Refusal::new(
                    "tool_choice",
                    "Expected none, auto, required or a named function.",
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    Refusal::new(
                        "tool_choice",
                        "Expected {\"type\": \"function\", \"function\": {\"name\": …}}.",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(Refusal::new(
                    "tool_choice",
                    format!("No tool named `{name}` is in `tools`."),
                ));
            }
            Choice::Named(name.to_owned())
        }
        Some(_) => {
            return Err(Refusal::new(
                "tool_choice",
                "Expected a string or an object.",
            ))
        }
    };
    if tools.is_empty() {
        if choice == Choice::Auto {
            return Ok(None);
        }
        return Err(Refusal::new(
            "tool_choice",
            "tool_choice needs `tools` to choose from.",
        ));
    }
    Ok(Some(ToolSet { tools, choice }))
}

fn tool(t: &Value, i: usize) -> Result<Tool, Refusal> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(Refusal::new(
            format!("tools[{i}].type"),
            "The local model calls tools of type `function` only.",
        ));
    }
    let Some(Value::Object(f)) = t.get("function") else {
        return Err(Refusal::new(
            format!("tools[{i}].function"),
            "Expected an object with a `name`.",
        ));
    };
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .ok_or_else(|| {
            Refusal::new(
                format!("tools[{i}].function.name"),
                "Expected a name of 1 to 64 letters, digits, underscores or dashes.",
            )
        })?;
    let description = match f.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(Refusal::new(
                format!("tools[{i}].function.description"),
                "Expected a string.",
            ))
        }
    };
    let parameters = match f.get("parameters") {
        // OpenAI: omitted parameters mean a function without arguments.
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(Refusal::new(
                format!("tools[{i}].function.parameters"),
                "Expected a JSON Schema object.",
            ))
        }
    };
    Ok(Tool {
        name: name.to_owned(),
        description,
        parameters,
    })
}

impl ToolSet {
    /// What the system turn adds: the tools and the reply format (the text
    /// of llama.cpp's generic tool prompt).
    pub fn system_text(&self) -> String {
        let tools: Vec<Value> = self
            .tools
            .iter()
            .map(|t| {
                let mut f = json!({"name": t.name});
                if let Some(d) = &t.description {
                    f["description"] = Value::from(d.as_str());
                }
                f["parameters"] = t.parameters.clone();
                json!({"type": "function", "function": f})
            })
            .collect();
        let listed = serde_json::to_string_pretty(&tools).unwrap_or_default();
        let answer = match &self.choice {
            Choice::Auto => "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` reply to the user's request".to_owned(),
            Choice::Required => "Respond in JSON format with `tool_call` (a request to call tools)".to_owned(),
            Choice::Named(name) => format!("Respond in JSON format with `tool_call`, calling the tool `{name}`"),
        };
        format!(
            "You can call any of the following tools to satisfy the user's requests: {listed}\n\n\
             Example tool call syntax:\n\n\
             {{\"tool_call\": {{\"name\": \"tool_name\", \"arguments\": {{\"arg1\": \"some_value\"}}}}}}\n\n\
             {answer}"
        )
    }

    /// The grammar of the reply.
    pub fn grammar(&self) -> Result<String, Refusal> {
        let mut g = GrammarBuilder::new();
        let mut calls = Vec::new();
        for (i, t) in self.tools.iter().enumerate() {
            if let Choice::Named(name) = &self.choice {
                if *name != t.name {
                    continue;
                }
            }
            let args = g.schema(&t.parameters).map_err(|e| {
                Refusal::new(
                    format!("tools[{i}].function.parameters"),
                    format!("The local model cannot follow this schema: {e}."),
                )
            })?;
            let head = literal(&format!(
                "{{\"name\": {}, \"arguments\": ",
                Value::from(t.name.as_str())
            ));
            calls.push(g.rule(format!("{head} {args} \"}}\"")).map_err(too_large)?);
        }
        let call = g
            .rule(format!(
                "{} ({}) \"}}\"",
                literal("{\"tool_call\": "),
                calls.join(" | ")
            ))
            .map_err(too_large)?;
        let root = if self.choice == Choice::Auto {
            let reply = g
                .rule(format!("{} ws-string \"}}\"", literal("{\"response\": ")))
                .map_err(too_large)?;
            format!("{call} | {reply}")
        } else {
            call
        };
        Ok(g.finish(&root))
    }
}

fn too_large(e: crate::grammar::SchemaError) -> Refusal {
    Refusal::new(
        "tools",
        format!("The local model cannot follow these tools: {e}."),
    )
}

/// An assistant turn that called tools, as the model would have written it.
pub fn calls_text(tool_calls: &[Value], i: usize) -> Result<String, Refusal> {
    let mut lines = Vec::with_capacity(tool_calls.len());
    for (j, call) in tool_calls.iter().enumerate() {
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Refusal::new(
                    format!("messages[{i}].tool_calls[{j}].function.name"),
                    "Expected a string.",
                )
            })?;
        // Arguments are a JSON text; shown parsed when they parse.
        let arguments = match function.and_then(|f| f.get("arguments")) {
            Some(Value::String(s)) => {
                serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::from(s.as_str()))
            }
            None | Some(Value::Null) => json!({}),
            Some(other) => other.clone(),
        };
        lines.push(json_dumps(
            &json!({"tool_call": {"name": name, "arguments": arguments}}),
        ));
    }
    Ok(lines.join("\n"))
}

/// A tool's result, as the next user turn tells it to the model.
pub fn result_text(name: Option<&str>, content: &str) -> String {
    let mut response = Map::new();
    if let Some(name) = name {
        response.insert("tool".into(), Value::from(name));
    }
    response.insert("content".into(), Value::from(content));
    json_dumps(&json!({"tool_response": response}))
}

/// JSON in the layout the grammar produces: `{"a": 1, "b": [2, 3]}`.
fn json_dumps(value: &Value) -> String {
    match value {
        Value::Object(o) => {
            let items: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), json_dumps(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        Value::Array(a) => {
            let items: Vec<String> = a.iter().map(json_dumps).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// What a piece of the reply amounts to, in OpenAI's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyEvent {
    /// Text of a `response` reply.
    Text(String),
    /// A call of this tool begins (its name is complete).
    Call(String),
    /// More of the call's arguments, as JSON text.
    Arguments(String),
}

#[derive(Debug)]
enum Frame {
    Object {
        key: Option<String>,
        expect_key: bool,
    },
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Key,
    Response,
    Name,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    Unicode { digits: u8, value: u32 },
}

#[derive(Debug)]
struct InString {
    route: Route,
    buf: String,
    escape: Escape,
    /// A high surrogate waiting for its low half.
    high: Option<u32>,
}

/// Reads the grammar-shaped reply as it is generated (see the module doc).
#[derive(Debug, Default)]
pub struct ReplyParser {
    stack: Vec<Frame>,
    string: Option<InString>,
    /// While the call's arguments are being read: the stack depth they
    /// started at.
    arguments_at: Option<usize>,
    name: Option<String>,
    arguments_done: bool,
}

impl ReplyParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tool called, once its name is complete.
    pub fn called(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Whether the call's arguments were read to their end.
    pub fn call_complete(&self) -> bool {
        self.name.is_some() && self.arguments_done
    }

    fn keys_are(&self, path: &[&str]) -> bool {
        self.stack.len() == path.len()
            && self.stack.iter().zip(path).all(|(frame, want)| {
                matches!(frame, Frame::Object { key: Some(k), expect_key: false } if k == want)
            })
    }

    /// The events in `piece`, consecutive ones of a kind merged.
    pub fn push(&mut self, piece: &str) -> Vec<ReplyEvent> {
        let mut out: Vec<ReplyEvent> = Vec::new();
        let add = |event: ReplyEvent, out: &mut Vec<ReplyEvent>| match (out.last_mut(), event) {
            (Some(ReplyEvent::Text(a)), ReplyEvent::Text(b))
            | (Some(ReplyEvent::Arguments(a)), ReplyEvent::Arguments(b)) => a.push_str(&b),
            (_, event) => out.push(event),
        };
        let argument = |c: char, out: &mut Vec<ReplyEvent>| match out.last_mut() {
            Some(ReplyEvent::Arguments(a)) => a.push(c),
            _ => out.push(ReplyEvent::Arguments(c.into())),
        };
        for c in piece.chars() {
            // The arguments' raw text, until their value ends at its depth.
            if let Some(base) = self.arguments_at {
                if self.string.is_none() && self.stack.len() == base && matches!(c, ',' | '}') {
                    self.arguments_at = None;
                    self.arguments_done = true;
                } else {
                    argument(c, &mut out);
                }
            }
            if self.string.is_some() {
                if let Some(event) = self.string_char(c) {
                    add(event, &mut out);
                }
                continue;
            }
            if self.arguments_at.is_none()
                && !self.arguments_done
                && !c.is_whitespace()
                && c != ':'
                && self.keys_are(&["tool_call", "arguments"])
            {
                self.arguments_at = Some(self.stack.len());
                argument(c, &mut out);
            }
            match c {
                '{' => self.stack.push(Frame::Object {
                    key: None,
                    expect_key: true,
                }),
                '[' => self.stack.push(Frame::Array),
                '}' | ']' => {
                    self.stack.pop();
                }
                ',' => {
                    if let Some(Frame::Object { key, expect_key }) = self.stack.last_mut() {
                        *key = None;
                        *expect_key = true;
                    }
                }
                '"' => {
                    let route = match self.stack.last() {
                        Some(Frame::Object {
                            expect_key: true, ..
                        }) => Route::Key,
                        _ if self.arguments_at.is_some() => Route::Other,
                        _ if self.keys_are(&["response"]) => Route::Response,
                        _ if self.keys_are(&["tool_call", "name"]) => Route::Name,
                        _ => Route::Other,
                    };
                    self.string = Some(InString {
                        route,
                        buf: String::new(),
                        escape: Escape::None,
                        high: None,
                    });
                }
                _ => {}
            }
        }
        out
    }

    /// One character inside a string; the string's end routes its content.
    fn string_char(&mut self, c: char) -> Option<ReplyEvent> {
        let s = self.string.as_mut()?;
        let mut decoded = String::new();
        match s.escape {
            Escape::None => match c {
                '\\' => s.escape = Escape::Backslash,
                '"' => return self.end_string(),
                c => {
                    if s.high.take().is_some() {
                        decoded.push('\u{FFFD}');
                    }
                    decoded.push(c);
                }
            },
            Escape::Backslash => {
                s.escape = Escape::None;
                if c != 'u' && s.high.take().is_some() {
                    decoded.push('\u{FFFD}');
                }
                match c {
                    'u' => {
                        s.escape = Escape::Unicode {
                            digits: 0,
                            value: 0,
                        }
                    }
                    'n' => decoded.push('\n'),
                    't' => decoded.push('\t'),
                    'r' => decoded.push('\r'),
                    'b' => decoded.push('\u{8}'),
                    'f' => decoded.push('\u{c}'),
                    other => decoded.push(other),
                }
            }
            Escape::Unicode { digits, value } => {
                let value = (value << 4) | c.to_digit(16).unwrap_or(0);
                if digits < 3 {
                    s.escape = Escape::Unicode {
                        digits: digits + 1,
                        value,
                    };
                    return None;
                }
                s.escape = Escape::None;
                match (s.high.take(), value) {
                    (Some(high), 0xDC00..=0xDFFF) => {
                        let code = 0x10000 + ((high - 0xD800) << 10) + (value - 0xDC00);
                        decoded.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                    }
                    (high, 0xD800..=0xDBFF) => {
                        if high.is_some() {
                            decoded.push('\u{FFFD}');
                        }
                        s.high = Some(value);
                    }
                    (high, v) => {
                        if high.is_some() {
                            decoded.push('\u{FFFD}');
                        }
                        decoded.push(char::from_u32(v).unwrap_or('\u{FFFD}'));
                    }
                }
            }
        }
        if decoded.is_empty() {
            return None;
        }
        if s.route == Route::Response {
            return Some(ReplyEvent::Text(decoded));
        }
        s.buf.push_str(&decoded);
        None
    }

    fn end_string(&mut self) -> Option<ReplyEvent> {
        let s = self.string.take()?;
        match s.route {
            Route::Key => {
                if let Some(Frame::Object { key, expect_key }) = self.stack.last_mut() {
                    *key = Some(s.buf);
                    *expect_key = false;
                }
                None
            }
            Route::Name => {
                self.name = Some(s.buf.clone());
                Some(ReplyEvent::Call(s.buf))
            }
            Route::Response if s.high.is_some() => Some(ReplyEvent::Text('\u{FFFD}'.to_string())),
            Route::Response | Route::Other => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
        }}])
    }

    /// Feeds `text` in pieces of `size` bytes (on char boundaries).
    fn parse(text: &str, size: usize) -> (Vec<ReplyEvent>, ReplyParser) {
        let mut p = ReplyParser::new();
        let mut events = Vec::new();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(size) {
            events.extend(p.push(&piece.iter().collect::<String>()));
        }
        (events, p)
    }

    fn joined(events: &[ReplyEvent]) -> (String, Vec<String>, String) {
        let mut text = String::new();
        let mut names = Vec::new();
        let mut args = String::new();
        for e in events {
            match e {
                ReplyEvent::Text(t) => text.push_str(t),
                ReplyEvent::Call(n) => names.push(n.clone()),
                ReplyEvent::Arguments(a) => args.push_str(a),
            }
        }
        (text, names, args)
    }

    #[test]
    fn a_call_yields_its_name_then_its_arguments_verbatim_in_any_split() {
        let reply = r#"{"tool_call": {"name": "get_weather", "arguments": {"location": "Paris, \"FR\"", "days": [1, {"x": "}"}]}}}"#;
        for size in [1, 2, 3, 7, 200] {
            let (events, p) = parse(reply, size);
            let (text, names, args) = joined(&events);
            assert_eq!(text, "");
            assert_eq!(names, ["get_weather"]);
            assert_eq!(
                args,
                r#"{"location": "Paris, \"FR\"", "days": [1, {"x": "}"}]}"#
            );
            assert!(p.call_complete(), "size {size}");
            // The name comes before any argument text.
            assert!(matches!(
                events.iter().find(|e| !matches!(e, ReplyEvent::Text(_))),
                Some(ReplyEvent::Call(_))
            ));
        }
    }

    #[test]
    fn arguments_stream_as_they_arrive() {
        let (events, _) = parse(
            r#"{"tool_call": {"name": "f", "arguments": {"a": "bcdef"}}}"#,
            4,
        );
        let pieces = events
            .iter()
            .filter(|e| matches!(e, ReplyEvent::Arguments(_)))
            .count();
        assert!(pieces >= 3, "{events:?}");
    }

    #[test]
    fn a_response_streams_decoded_text() {
        let reply = r#"{"response": "Paris \"is\" it.\n\u00e9\ud83d\ude00 \\o/"}"#;
        for size in [1, 5, 100] {
            let (events, p) = parse(reply, size);
            let (text, names, args) = joined(&events);
            assert_eq!(text, "Paris \"is\" it.\né😀 \\o/");
            assert!(names.is_empty() && args.is_empty());
            assert!(!p.call_complete() && p.called().is_none());
        }
    }

    #[test]
    fn a_cut_call_is_not_complete() {
        let (_, p) = parse(
            r#"{"tool_call": {"name": "get_weather", "arguments": {"loc"#,
            3,
        );
        assert_eq!(p.called(), Some("get_weather"));
        assert!(!p.call_complete());
    }

    #[test]
    fn tool_choice_and_tools_are_read_and_checked() {
        let set = from_body(&body(json!({"tools": weather()})))
            .unwrap()
            .unwrap();
        assert_eq!(set.choice, Choice::Auto);
        assert_eq!(set.tools[0].name, "get_weather");
        assert_eq!(
            from_body(&body(json!({"tools": weather(), "tool_choice": "none"}))).unwrap(),
            None
        );
        assert_eq!(from_body(&body(json!({}))).unwrap(), None);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let set = from_body(&body(json!({"tools": weather(), "tool_choice": named})))
            .unwrap()
            .unwrap();
        assert_eq!(set.choice, Choice::Named("get_weather".into()));
        for (b, param, words) in [
            (
                json!({"tools": weather(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
                "No tool named `nope`",
            ),
            (
                json!({"tool_choice": "required"}),
                "tool_choice",
                "needs `tools`",
            ),
            (
                json!({"tools": weather(), "tool_choice": "sometimes"}),
                "tool_choice",
                "Expected none",
            ),
            (
                json!({"tools": [{"type": "code_interpreter"}]}),
                "tools[0].type",
                "type `function`",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
                "letters",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]}),
                "tools[0].function.parameters",
                "JSON Schema",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]}),
                "tools[1].function.name",
                "Two tools",
            ),
            (json!({"tools": "get_weather"}), "tools", "array"),
        ] {
            let r = from_body(&body(b.clone())).unwrap_err();
            assert_eq!(r.param, param, "{b}");
            assert!(r.message.contains(words), "{b}: {}", r.message);
        }
    }

    #[test]
    fn the_grammar_offers_a_call_and_in_auto_mode_a_response() {
        let auto = from_body(&body(json!({"tools": weather()})))
            .unwrap()
            .unwrap();
        let g = auto.grammar().unwrap();
        assert!(g.contains(r#""{\"tool_call\": ""#), "{g}");
        assert!(
            g.contains(r#""{\"name\": \"get_weather\", \"arguments\": ""#),
            "{g}"
        );
        assert!(g.contains(r#""{\"response\": " ws-string"#), "{g}");
        let required = from_body(&body(
            json!({"tools": weather(), "tool_choice": "required"}),
        ))
        .unwrap()
        .unwrap();
        assert!(!required.grammar().unwrap().contains("response"));
        let bad =
            json!([{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]);
        let r = from_body(&body(json!({"tools": bad})))
            .unwrap()
            .unwrap()
            .grammar()
            .unwrap_err();
        assert_eq!(r.param, "tools[0].function.parameters");
    }

    #[test]
    fn history_is_written_in_the_reply_format() {
        let calls = [
            json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"location\":\"Paris\"}"}}),
        ];
        assert_eq!(
            calls_text(&calls, 1).unwrap(),
            r#"{"tool_call": {"name": "get_weather", "arguments": {"location": "Paris"}}}"#
        );
        assert_eq!(
            result_text(Some("get_weather"), "22 C"),
            r#"{"tool_response": {"tool": "get_weather", "content": "22 C"}}"#
        );
        let prompt = from_body(&body(json!({"tools": weather()})))
            .unwrap()
            .unwrap()
            .system_text();
        assert!(prompt.contains("\"name\": \"get_weather\""), "{prompt}");
        assert!(prompt.contains("either with `tool_call`"), "{prompt}");
    }
}
