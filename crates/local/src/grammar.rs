//! JSON Schema to a llama.cpp grammar (GBNF), for constrained decoding: tool
//! calls whose arguments follow the tool's `parameters`, and
//! `response_format` `json_object`/`json_schema`.
//!
//! The grammar fixes the layout as well as the content, in the style of
//! Python's `json.dumps`: `{"key": value, "key2": [1, 2]}`, properties in
//! the schema's order (required ones first). A fixed layout leaves the model
//! no whitespace choices, so equal requests give byte-equal arguments.
//!
//! Numbers have at most 16 digits before and after the point (as in
//! llama.cpp's own converter): a small model otherwise tends to write digits
//! until `max_tokens`.
//!
//! What is enforced: `type` (one or a list), `properties`/`required`,
//! `items`/`minItems` (0 or at least 1), `enum`, `const`, `anyOf`/`oneOf`,
//! and local `$ref`s (`#/$defs/…`, `#/definitions/…`, `#`), recursive ones
//! included. Annotations (`title`, `description`, `default`, `examples`)
//! are ignored, and so are constraints a grammar would only approximate
//! (`pattern`, `format`, lengths, numeric bounds, `maxItems`): the output
//! has the right shape and types, not necessarily those finer limits.
//! Anything else that changes what is valid (`allOf` with several parts,
//! `not`, `if`, remote `$ref`s) is refused, so that a constraint is never
//! silently dropped.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Schemas deeper than this are refused (a guard, not a real-world limit).
const MAX_DEPTH: usize = 32;
/// Rules per grammar, likewise.
const MAX_RULES: usize = 2000;

/// The shared JSON rules every grammar may use.
const JSON_RULES: &str = r#"ws-string ::= "\"" json-char* "\""
json-char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])
json-int ::= "-"? ([0] | [1-9] [0-9]{0,15})
json-number ::= json-int ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?
json-bool ::= "true" | "false"
json-null ::= "null"
json-value ::= json-object | json-array | ws-string | json-number | json-bool | json-null
json-object ::= "{" (ws-string ": " json-value (", " ws-string ": " json-value)*)? "}"
json-array ::= "[" (json-value (", " json-value)*)? "]"
"#;

/// A schema the grammar cannot express faithfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError(pub String);

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds one grammar from any number of schemas; each becomes a rule whose
/// name [`GrammarBuilder::schema`] returns, for use in the caller's `root`.
pub struct GrammarBuilder {
    rules: Vec<(String, String)>,
    /// `$ref` target (per document) => rule name, so each is built once and
    /// recursion terminates.
    refs: HashMap<(usize, String), String>,
    documents: Vec<Value>,
}

impl Default for GrammarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GrammarBuilder {
    pub fn new() -> Self {
        Self {
            rules: Vec::new(),
            refs: HashMap::new(),
            documents: Vec::new(),
        }
    }

    /// Adds a rule defined by raw GBNF; returns its name.
    pub fn rule(&mut self, body: String) -> Result<String, SchemaError> {
        if self.rules.len() >= MAX_RULES {
            return Err(SchemaError(format!(
                "the schema is too large (over {MAX_RULES} grammar rules)"
            )));
        }
        let name = format!("r{}", self.rules.len());
        self.rules.push((name.clone(), body));
        Ok(name)
    }

    /// Reserves a rule name to fill in later (for recursive references).
    fn reserve(&mut self) -> Result<(String, usize), SchemaError> {
        let name = self.rule(String::new())?;
        Ok((name, self.rules.len() - 1))
    }

    /// The rule for values valid under `schema`; `$ref`s resolve within it.
    pub fn schema(&mut self, schema: &Value) -> Result<String, SchemaError> {
        self.documents.push(schema.clone());
        let doc = self.documents.len() - 1;
        self.value(doc, schema, 0)
    }

    /// The whole grammar, `root ::= {root}` first.
    pub fn finish(self, root: &str) -> String {
        let mut out = format!("root ::= {root}\n");
        for (name, body) in &self.rules {
            let _ = writeln!(out, "{name} ::= {body}");
        }
        out.push_str(JSON_RULES);
        out
    }

    fn value(&mut self, doc: usize, schema: &Value, depth: usize) -> Result<String, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(SchemaError(format!(
                "the schema nests deeper than {MAX_DEPTH} levels"
            )));
        }
        let obj = match schema {
            Value::Bool(true) => return Ok("json-value".into()),
            Value::Bool(false) => {
                return Err(SchemaError("a `false` schema accepts no value".into()))
            }
            Value::Object(obj) => obj,
            _ => {
                return Err(SchemaError(
                    "a schema must be an object or a boolean".into(),
                ))
            }
        };
        for key in [
            "not",
            "if",
            "then",
            "else",
            "patternProperties",
            "dependentSchemas",
        ] {
            if obj.contains_key(key) {
                return Err(SchemaError(format!(
                    "`{key}` is not supported in a schema for the local model"
                )));
            }
        }
        if let Some(reference) = obj.get("$ref") {
            let reference = reference
                .as_str()
                .ok_or_else(|| SchemaError("`$ref` must be a string".into()))?;
            return self.reference(doc, reference, depth);
        }
        if let Some(value) = obj.get("const") {
            return Ok(literal(&json_text(value)));
        }
        if let Some(values) = obj.get("enum") {
            let values = values
                .as_array()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| SchemaError("`enum` must be a non-empty array".into()))?;
            let alts: Vec<String> = values.iter().map(|v| literal(&json_text(v))).collect();
            return self.rule(alts.join(" | "));
        }
        if let Some(parts) = obj.get("allOf") {
            match parts.as_array().map(Vec::as_slice) {
                Some([only]) => return self.value(doc, only, depth + 1),
                _ => {
                    return Err(SchemaError(
                        "`allOf` with more than one schema is not supported for the local model"
                            .into(),
                    ))
                }
            }
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(parts) = obj.get(key) {
                let parts = parts
                    .as_array()
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| SchemaError(format!("`{key}` must be a non-empty array")))?;
                let alts = parts
                    .iter()
                    .map(|p| self.value(doc, p, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                return self.rule(alts.join(" | "));
            }
        }
        let types: Vec<&str> = match obj.get("type") {
            None => {
                if obj.contains_key("properties") {
                    vec!["object"]
                } else if obj.contains_key("items") {
                    vec!["array"]
                } else {
                    return Ok("json-value".into());
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| SchemaError("`type` entries must be strings".into()))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(SchemaError(
                    "`type` must be a string or a non-empty array".into(),
                ))
            }
        };
        let mut alts = Vec::with_capacity(types.len());
        for t in types {
            alts.push(match t {
                "string" => "ws-string".to_owned(),
                "integer" => "json-int".to_owned(),
                "number" => "json-number".to_owned(),
                "boolean" => "json-bool".to_owned(),
                "null" => "json-null".to_owned(),
                "object" => self.object(doc, obj, depth)?,
                "array" => self.array(doc, obj, depth)?,
                other => return Err(SchemaError(format!("unknown type `{other}`"))),
            });
        }
        if alts.len() == 1 {
            Ok(alts.remove(0))
        } else {
            self.rule(alts.join(" | "))
        }
    }

    fn object(
        &mut self,
        doc: usize,
        obj: &Map<String, Value>,
        depth: usize,
    ) -> Result<String, SchemaError> {
        let properties = match obj.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return Err(SchemaError("`properties` must be an object".into())),
        };
        let Some(properties) = properties.filter(|p| !p.is_empty()) else {
            // No declared properties: any object (or `{}` when nothing more
            // may be added).
            if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
                return Ok(literal("{}"));
            }
            return Ok("json-object".into());
        };
        let required: Vec<&str> = match obj.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
            Some(_) => return Err(SchemaError("`required` must be an array".into())),
        };
        for name in &required {
            if !properties.contains_key(*name) {
                return Err(SchemaError(format!(
                    "`required` names `{name}`, which is not in `properties`"
                )));
            }
        }
        let pair = |builder: &mut Self, key: &str, schema: &Value| {
            let value = builder.value(doc, schema, depth + 1)?;
            Ok::<_, SchemaError>(format!(
                "{} \": \" {value}",
                literal(&json_text(&Value::from(key)))
            ))
        };
        let mut required_pairs = Vec::new();
        for name in &required {
            if let Some(schema) = properties.get(*name) {
                required_pairs.push(pair(self, name, schema)?);
            }
        }
        let mut optional_pairs = Vec::new();
        for (name, schema) in properties {
            if !required.contains(&name.as_str()) {
                optional_pairs.push(pair(self, name, schema)?);
            }
        }
        // Optional pairs, in order, each present or not: `tail_i` follows at
        // least one pair already written, `head_i` starts the object.
        let mut tail = String::new();
        let mut tails = vec![String::new(); optional_pairs.len() + 1];
        for (i, p) in optional_pairs.iter().enumerate().rev() {
            let rest = if tail.is_empty() {
                String::new()
            } else {
                format!(" {tail}")
            };
            tail = self.rule(format!("(\", \" {p})?{rest}"))?;
            tails[i] = tail.clone();
        }
        let body = if required_pairs.is_empty() {
            // head_i: optional pair i first, then the tail after it; or skip it.
            let mut head = String::new();
            for (i, p) in optional_pairs.iter().enumerate().rev() {
                let after = if tails[i + 1].is_empty() {
                    String::new()
                } else {
                    format!(" {}", tails[i + 1])
                };
                let skip = if head.is_empty() {
                    String::new()
                } else {
                    format!(" | {head}")
                };
                head = self.rule(format!("{p}{after}{skip}"))?;
            }
            format!("\"{{\" {head}? \"}}\"")
        } else {
            let opt = if tails[0].is_empty() {
                String::new()
            } else {
                format!(" {}", tails[0])
            };
            format!("\"{{\" {}{opt} \"}}\"", required_pairs.join(" \", \" "))
        };
        self.rule(body)
    }

    fn array(
        &mut self,
        doc: usize,
        obj: &Map<String, Value>,
        depth: usize,
    ) -> Result<String, SchemaError> {
        let item = match obj.get("items") {
            None => "json-value".to_owned(),
            Some(items @ (Value::Object(_) | Value::Bool(_))) => {
                self.value(doc, items, depth + 1)?
            }
            Some(_) => {
                return Err(SchemaError(
                    "`items` must be one schema (tuple arrays are not supported)".into(),
                ))
            }
        };
        let min = obj.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let list = format!("{item} (\", \" {item})*");
        if min == 0 {
            self.rule(format!("\"[\" ({list})? \"]\""))
        } else {
            self.rule(format!("\"[\" {list} \"]\""))
        }
    }

    fn reference(
        &mut self,
        doc: usize,
        reference: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        if let Some(name) = self.refs.get(&(doc, reference.to_owned())) {
            return Ok(name.clone());
        }
        let Some(pointer) = reference.strip_prefix('#') else {
            return Err(SchemaError(format!(
                "`$ref` `{reference}` is not local; only `#/…` references are supported"
            )));
        };
        let target = self.documents[doc]
            .pointer(pointer)
            .cloned()
            .ok_or_else(|| SchemaError(format!("`$ref` `{reference}` points at nothing")))?;
        let (name, index) = self.reserve()?;
        self.refs.insert((doc, reference.to_owned()), name.clone());
        let body = self.value(doc, &target, depth + 1)?;
        self.rules[index].1 = body;
        Ok(name)
    }
}

/// The compact JSON text of a value (serde_json's own escaping).
fn json_text(value: &Value) -> String {
    value.to_string()
}

/// A GBNF string literal matching exactly `text`.
pub fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The grammar for one schema as the whole output.
pub fn for_schema(schema: &Value) -> Result<String, SchemaError> {
    let mut builder = GrammarBuilder::new();
    let root = builder.schema(schema)?;
    Ok(builder.finish(&root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn literals_escape_quotes_backslashes_and_controls() {
        assert_eq!(literal(r#"{"a": "b\c"}"#), r#""{\"a\": \"b\\c\"}""#);
        assert_eq!(literal("x\ny\u{1}"), r#""x\ny\x01""#);
        assert_eq!(literal("é"), "\"é\"");
    }

    #[test]
    fn an_object_lists_required_properties_first_then_optional_ones() {
        let g = for_schema(&json!({
            "type": "object",
            "properties": {"unit": {"enum": ["c", "f"]}, "location": {"type": "string"}},
            "required": ["location"],
        }))
        .unwrap();
        // location (required) then an optional `, "unit": …`.
        assert!(g.contains(r#""\"location\"" ": " ws-string"#), "{g}");
        assert!(g.contains(r#"(", " "\"unit\"" ": " r0)?"#), "{g}");
        assert!(g.contains(r#"r0 ::= "\"c\"" | "\"f\"""#), "{g}");
    }

    #[test]
    fn all_optional_properties_allow_any_ordered_subset() {
        let g = for_schema(&json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
        }))
        .unwrap();
        assert!(g.starts_with("root ::= r"), "{g}");
        assert!(g.contains(r#"? "}""#), "{g}");
    }

    #[test]
    fn refs_resolve_recursively_and_once() {
        let g = for_schema(&json!({
            "$defs": {"node": {"type": "object", "properties": {
                "name": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            }, "required": ["name", "children"]}},
            "$ref": "#/$defs/node",
        }))
        .unwrap();
        // One rule for the node, referred to from inside itself.
        assert_eq!(g.matches("r0 ::=").count(), 1, "{g}");
        assert!(g.contains("r0 (\", \" r0)*"), "{g}");
    }

    #[test]
    fn what_the_grammar_cannot_hold_is_refused_not_dropped() {
        for (schema, words) in [
            (json!({"not": {"type": "string"}}), "`not`"),
            (
                json!({"allOf": [{"type": "string"}, {"minLength": 2}]}),
                "`allOf`",
            ),
            (json!({"$ref": "https://example.com/s.json"}), "not local"),
            (json!({"$ref": "#/$defs/missing"}), "points at nothing"),
            (json!({"type": "strin"}), "unknown type"),
            (
                json!({"type": "object", "properties": {"a": {}}, "required": ["x"]}),
                "not in `properties`",
            ),
            (json!(false), "accepts no value"),
        ] {
            match for_schema(&schema) {
                Err(SchemaError(message)) => assert!(message.contains(words), "{message}"),
                Ok(g) => assert!(g.contains(words), "{schema}: {g}"),
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut schema = json!({"type": "string"});
        for _ in 0..40 {
            schema = json!({"type": "array", "items": schema});
        }
        let err = for_schema(&schema).unwrap_err();
        assert!(err.0.contains("deeper"), "{}", err.0);
    }
}
