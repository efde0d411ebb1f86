//! JSON schemas as Anthropic's structured outputs take them.
//!
//! Anthropic constrains decoding to a subset of JSON Schema: every object
//! closed (`additionalProperties: false`), no numeric or length limits, a few
//! string formats. Its own SDKs rewrite a schema before sending it
//! (`anthropic.lib._parse._transform.transform_schema` in the Python SDK);
//! this is the same rewrite, so that a schema an OpenAI client sends in
//! `response_format` — which OpenAI takes as it is unless `strict` — works
//! on a Claude alias as it does through Anthropic's SDK. What the subset
//! cannot say is not dropped silently: it moves into the `description`, as
//! the SDK moves it, where the model can still follow it.

use serde_json::{json, Map, Value};

/// String formats the subset keeps.
const STRING_FORMATS: [&str; 10] = [
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "uri",
    "ipv4",
    "ipv6",
    "uuid",
];

/// `schema` rewritten to Anthropic's subset, or why it cannot be (with
/// the JSON pointer of the sub-schema at fault): a schema with no `type`,
/// `anyOf`, `oneOf`, `allOf`, `$ref`, `const` or `enum` says nothing
/// Anthropic can decode to, and an object whose `additionalProperties` is a
/// schema (a map with keys of its own choosing) has no form in a subset
/// that decodes closed objects only — forced closed, as Anthropic's SDK
/// forces it, it could only ever be `{}`.
pub(crate) fn strict_schema(schema: &Value) -> Result<Value, String> {
    strict_at(schema, "")
}

fn strict_at(schema: &Value, at: &str) -> Result<Value, String> {
    let fail = |what: &str| -> Result<Value, String> {
        Err(if at.is_empty() {
            what.to_owned()
        } else {
            format!("at {at}: {what}")
        })
    };
    let Value::Object(schema) = schema else {
        return fail("a schema must be a JSON object");
    };
    let mut rest = schema.clone();
    let mut out = Map::new();
    for key in ["$defs", "definitions"] {
        if let Some(defs) = rest.shift_remove(key) {
            let Value::Object(defs) = defs else {
                return fail(&format!("{key} must be an object of schemas"));
            };
            let defs = defs
                .iter()
                .map(|(name, s)| Ok((name.clone(), strict_at(s, &format!("{at}/{key}/{name}"))?)))
                .collect::<Result<Map<_, _>, String>>()?;
            out.insert(key.into(), Value::Object(defs));
        }
    }
    if let Some(reference) = rest.shift_remove("$ref") {
        out.insert("$ref".into(), reference);
        if let Some(d) = rest.shift_remove("description") {
            out.insert("description".into(), d);
        }
        return Ok(Value::Object(out));
    }
    let mut kind = rest.shift_remove("type");
    // OpenAPI's `nullable` is a choice with null, as a list of types is.
    if rest.shift_remove("nullable") == Some(Value::Bool(true)) {
        if let Some(Value::String(k)) = &kind {
            kind = Some(json!([k, "null"]));
        }
    }
    // A list of types (OpenAI's strict schemas mark optional fields with
    // `["string", "null"]`) is a choice between them.
    if let (Some(Value::Array(kinds)), false) = (&kind, rest.contains_key("anyOf")) {
        if kinds.is_empty() {
            return fail("type must name at least one type");
        }
        let variants = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| {
                if k == "null" {
                    return Ok(json!({"type": "null"}));
                }
                let mut variant = rest.clone();
                variant.shift_remove("description");
                variant.shift_remove("title");
                variant.insert("type".into(), k.clone());
                strict_at(&Value::Object(variant), &format!("{at}/type/{i}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        for key in ["description", "title"] {
            if let Some(v) = rest.shift_remove(key) {
                out.insert(key.into(), v);
            }
        }
        out.insert("anyOf".into(), Value::Array(variants));
        return Ok(Value::Object(out));
    }
    let any_of = rest.shift_remove("anyOf");
    let one_of = rest.shift_remove("oneOf");
    let all_of = rest.shift_remove("allOf");
    let primitive = |v: &Value| !matches!(v, Value::Array(_) | Value::Object(_));
    if let Some(Value::Array(e)) = rest.get("enum") {
        if !e.is_empty() && e.iter().all(primitive) {
            out.insert("enum".into(), rest.shift_remove("enum").unwrap_or_default());
        }
    }
    if rest.get("const").is_some_and(primitive) {
        out.insert(
            "const".into(),
            rest.shift_remove("const").unwrap_or_default(),
        );
    }
    let literals = out.contains_key("enum") || out.contains_key("const");
    if literals {
        kind = None;
    }
    let variants = |list: Value, key: &str| -> Result<Value, String> {
        match list {
            Value::Array(v) => Ok(Value::Array(
                v.iter()
                    .enumerate()
                    .map(|(i, s)| strict_at(s, &format!("{at}/{key}/{i}")))
                    .collect::<Result<_, _>>()?,
            )),
            _ => fail(&format!("{key} must be an array of schemas")),
        }
    };
    if let Some(list) = any_of {
        out.insert("anyOf".into(), variants(list, "anyOf")?);
    } else if let Some(list) = one_of {
        out.insert("anyOf".into(), variants(list, "oneOf")?);
    } else if let Some(list) = all_of {
        out.insert("allOf".into(), variants(list, "allOf")?);
    } else if !literals {
        match &kind {
            Some(k) => {
                out.insert("type".into(), k.clone());
            }
            None => {
                return fail(
                    "a schema must have a type, anyOf, oneOf or allOf, or a const or enum of \
                     strings, numbers, booleans or null",
                )
            }
        }
    }
    for key in ["description", "title"] {
        if let Some(v) = rest.shift_remove(key) {
            out.insert(key.into(), v);
        }
    }
    match kind.as_ref().and_then(Value::as_str) {
        Some("object") => {
            let properties = match rest.shift_remove("properties") {
                Some(Value::Object(p)) => p
                    .iter()
                    .map(|(k, s)| Ok((k.clone(), strict_at(s, &format!("{at}/properties/{k}"))?)))
                    .collect::<Result<Map<_, _>, String>>()?,
                Some(_) => return fail("properties must be an object of schemas"),
                None => Map::new(),
            };
            out.insert("properties".into(), Value::Object(properties));
            match rest.shift_remove("additionalProperties") {
                None | Some(Value::Bool(_)) => {}
                Some(Value::Object(o)) if o.is_empty() => {}
                Some(_) => {
                    return fail(
                        "additionalProperties with a schema (a map whose keys the model would \
                         choose) has no form in this model's provider's structured outputs, \
                         which decode objects with the properties named only",
                    )
                }
            }
            out.insert("additionalProperties".into(), json!(false));
            if let Some(required) = rest.shift_remove("required") {
                out.insert("required".into(), required);
            }
        }
        Some("string") => {
            if let Some(format) = rest.shift_remove("format") {
                if format.as_str().is_some_and(|f| STRING_FORMATS.contains(&f)) {
                    out.insert("format".into(), format);
                } else {
                    rest.insert("format".into(), format);
                }
            }
        }
        Some("array") => {
            if let Some(items) = rest.shift_remove("items") {
                out.insert("items".into(), strict_at(&items, &format!("{at}/items"))?);
            }
            if let Some(min) = rest.shift_remove("minItems") {
                if min.as_u64().is_some_and(|n| n <= 1) {
                    out.insert("minItems".into(), min);
                } else {
                    rest.insert("minItems".into(), min);
                }
            }
        }
        _ => {}
    }
    // What is left the subset cannot say: the model reads it instead.
    if !rest.is_empty() {
        let left = rest
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let description = match out.get("description").and_then(Value::as_str) {
            Some(d) => format!("{d}\n\n{{{left}}}"),
            None => format!("{{{left}}}"),
        };
        out.insert("description".into(), json!(description));
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_closed_and_limits_move_into_the_description() {
        let schema = json!({
            "type": "object", "title": "Place", "description": "A place",
            "properties": {
                "city": {"type": "string", "minLength": 2, "format": "text"},
                "population": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
                "founded": {"type": "string", "format": "date"},
                "nested": {"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": true},
            },
            "required": ["city"],
        });
        assert_eq!(
            strict_schema(&schema).unwrap(),
            json!({
                "type": "object", "title": "Place", "description": "A place",
                "properties": {
                    "city": {"type": "string", "description": "{minLength: 2, format: \"text\"}"},
                    "population": {"type": "integer", "description": "{minimum: 0}"},
                    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                             "description": "{maxItems: 5}"},
                    "founded": {"type": "string", "format": "date"},
                    "nested": {"type": "object", "properties": {"a": {"type": "boolean"}},
                               "additionalProperties": false},
                },
                "additionalProperties": false,
                "required": ["city"],
            })
        );
    }

    #[test]
    fn choices_references_and_literals_are_kept() {
        let schema = json!({
            "$defs": {"Unit": {"enum": ["c", "f"], "type": "string"}},
            "type": "object",
            "properties": {
                "unit": {"$ref": "#/$defs/Unit", "description": "which"},
                "note": {"type": ["string", "null"], "description": "optional"},
                "kind": {"oneOf": [{"const": "a"}, {"type": "integer", "maximum": 3}]},
            },
            "additionalProperties": false,
        });
        assert_eq!(
            strict_schema(&schema).unwrap(),
            json!({
                "$defs": {"Unit": {"enum": ["c", "f"]}},
                "type": "object",
                "properties": {
                    "unit": {"$ref": "#/$defs/Unit", "description": "which"},
                    "note": {"description": "optional",
                             "anyOf": [{"type": "string"}, {"type": "null"}]},
                    "kind": {"anyOf": [{"const": "a"},
                                       {"type": "integer", "description": "{maximum: 3}"}]},
                },
                "additionalProperties": false,
            })
        );
    }

    #[test]
    fn definitions_nullable_and_maps() {
        let schema = json!({
            "definitions": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}}},
            "type": "object",
            "properties": {
                "p": {"$ref": "#/definitions/P"},
                "n": {"type": "string", "nullable": true},
                "open": {"type": "object", "properties": {}, "additionalProperties": true},
            },
        });
        assert_eq!(
            strict_schema(&schema).unwrap(),
            json!({
                "definitions": {"P": {"type": "object", "properties": {"x": {"type": "integer"}},
                                      "additionalProperties": false}},
                "type": "object",
                "properties": {
                    "p": {"$ref": "#/definitions/P"},
                    "n": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                    "open": {"type": "object", "properties": {}, "additionalProperties": false},
                },
                "additionalProperties": false,
            })
        );
        let map = json!({"type": "object", "properties": {"tags": {"type": "object",
            "additionalProperties": {"type": "string"}}}});
        let e = strict_schema(&map).unwrap_err();
        assert!(
            e.starts_with("at /properties/tags: additionalProperties"),
            "{e}"
        );
    }

    #[test]
    fn a_schema_that_says_nothing_decodable_is_refused() {
        for bad in [
            json!({}),
            json!({"description": "x"}),
            json!("string"),
            json!({"type": []}),
            json!({"type": "object", "properties": {"a": {}}}),
        ] {
            assert!(strict_schema(&bad).is_err(), "{bad}");
        }
        let e =
            strict_schema(&json!({"type": "array", "items": [{"type": "string"}]})).unwrap_err();
        assert_eq!(e, "at /items: a schema must be a JSON object");
    }
}
