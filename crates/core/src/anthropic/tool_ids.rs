//! Tool-call ids as Anthropic takes them. Anthropic requires a `tool_use`'s
//! `id` and a `tool_result`'s `tool_use_id` to match `^[a-zA-Z0-9_-]+$`;
//! OpenAI-compatible providers make ids outside it (Kimi/Moonshot's
//! `functions.get_weather:0`), which a conversation carries from one
//! provider to the next. Such an id is rewritten the same way wherever it
//! appears, so that a call and its result still name each other.

use std::borrow::Cow;

use serde_json::Value;

/// `id` as Anthropic takes it: unchanged when it already is, else with each
/// character outside the pattern made `_` and a short digest of the whole
/// original appended, so that two ids differing only in those characters
/// (`a.b` and `a:b`) stay two ids. The same id always gives the same result.
pub(crate) fn anthropic_tool_id(id: &str) -> Cow<'_, str> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(allowed) {
        return Cow::Borrowed(id);
    }
    let kept: String = id
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .collect();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(id.as_bytes());
    let short = crate::trace::encode_hex(&digest[..4]);
    Cow::Owned(if kept.is_empty() {
        short
    } else {
        format!("{kept}_{short}")
    })
}

/// The id held at `key` of `holder`, rewritten by [`anthropic_tool_id`]
/// when it is a string (anything else is left for Anthropic to judge).
pub(crate) fn rewrite_tool_id(holder: &mut Value, key: &str) {
    if let Some(Value::String(id)) = holder.get_mut(key) {
        if let Cow::Owned(valid) = anthropic_tool_id(id) {
            *id = valid;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches_anthropics_pattern(id: &str) -> bool {
        !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }

    #[test]
    fn valid_ids_are_kept_and_others_made_valid_stably_and_apart() {
        for valid in ["toolu_01AbC", "call_abc-123", "x"] {
            assert_eq!(anthropic_tool_id(valid), valid);
        }
        let kimi = anthropic_tool_id("functions.get_weather:0");
        assert!(kimi.starts_with("functions_get_weather_0_"), "{kimi}");
        assert!(matches_anthropics_pattern(&kimi), "{kimi}");
        // The same id gives the same result, so a call and its result match.
        assert_eq!(kimi, anthropic_tool_id("functions.get_weather:0"));
        // Ids that differ only where characters were replaced stay apart.
        assert_ne!(
            anthropic_tool_id("functions.get_weather:0"),
            anthropic_tool_id("functions:get_weather.0")
        );
        for odd in ["", "é", "a b", "call/1@x"] {
            let id = anthropic_tool_id(odd);
            assert!(matches_anthropics_pattern(&id), "{odd:?} → {id:?}");
        }
    }
}
