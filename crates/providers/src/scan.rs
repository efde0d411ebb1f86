//! Looking into a chunk's JSON text without parsing it, on the stream path:
//! a quoted key cannot occur inside a string value (its quotes would be
//! escaped there), so a key found by substring search is a key.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// `"finish_reason"` (OpenAI chunks).
pub static FINISH_REASON: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"finish_reason\""));
/// `"stop_reason"` (Anthropic events).
pub static STOP_REASON: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"stop_reason\""));

/// What follows a key's colon when its value is a string: the text after
/// the opening quote; `None` for any other value.
pub fn string_value_after(after_key: &[u8]) -> Option<&[u8]> {
    let start = after_key
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b':'))?;
    (after_key[start] == b'"').then(|| &after_key[start + 1..])
}

/// Whether some `key` in `json` has a string value (not `null`).
pub fn has_string_value(json: &[u8], key: &Finder<'_>) -> bool {
    let mut rest = json;
    while let Some(i) = key.find(rest) {
        rest = &rest[i + key.needle().len()..];
        if string_value_after(rest).is_some() {
            return true;
        }
    }
    false
}

/// Whether a chunk (OpenAI) or event (Anthropic) carries its answer's end:
/// a `finish_reason` or `stop_reason` with a string value.
pub fn ends_the_answer(chunk: &[u8]) -> bool {
    has_string_value(chunk, &FINISH_REASON) || has_string_value(chunk, &STOP_REASON)
}

/// With several choices (`n` > 1), whether every index up to `choices` has
/// now had its finish reason, counting this chunk's into `finished` (one
/// bit per index, up to 128).
pub fn all_finished(chunk: &[u8], choices: u64, finished: &mut u128) -> bool {
    #[derive(serde::Deserialize)]
    struct Finishing {
        #[serde(default)]
        choices: Vec<Choice>,
    }
    #[derive(serde::Deserialize)]
    struct Choice {
        #[serde(default)]
        index: u32,
        finish_reason: Option<serde::de::IgnoredAny>,
    }
    if let Ok(f) = serde_json::from_slice::<Finishing>(chunk) {
        for c in f.choices {
            if c.finish_reason.is_some() && u64::from(c.index) < choices.min(128) {
                *finished |= 1 << c.index;
            }
        }
    }
    u64::from(finished.count_ones()) >= choices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_string_values_but_not_nulls_or_text() {
        assert!(!has_string_value(
            br#"{"type":"message_start","message":{"stop_reason":null}}"#,
            &STOP_REASON
        ));
        assert!(has_string_value(
            br#"{"type":"message_delta","delta":{"stop_reason": "end_turn"}}"#,
            &STOP_REASON
        ));
        assert!(!has_string_value(
            br#"{"type":"content_block_delta","delta":{"text":"\"stop_reason\": \"x\""}}"#,
            &STOP_REASON
        ));
        assert!(ends_the_answer(
            br#"{"choices":[{"finish_reason": null},{"finish_reason": "length"}]}"#
        ));
        assert!(!ends_the_answer(br#"{"choices":[{"finish_reason":null}]}"#));
        assert_eq!(string_value_after(br#": "ab""#), Some(&b"ab\""[..]));
        assert_eq!(string_value_after(b": null"), None);
    }
}
