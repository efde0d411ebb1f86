//! Wraps a provider's chunk stream to measure it while relaying it: time to
//! first token, token usage from the final chunk, and how it ended. The
//! usage row is written exactly once — when the stream completes, fails, or
//! is dropped because the client went away (status 499).
//!
//! A stream that ends early has no usage chunk (OpenAI sends it last;
//! Anthropic's output count comes with the end), yet the provider bills what
//! it generated. So that closing a stream is no way around a budget or a
//! token limit, such a row gets estimates: the request's prompt estimate and
//! the streamed text at 4 bytes a token (at least one a chunk of text). So
//! does a complete stream that came without usage.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use serde::de::IgnoredAny;
use serde::Deserialize;
use switchyard_core::anthropic::Tokens;
use switchyard_core::openai::Usage;
use switchyard_providers::{scan, ChunkStream, ProviderError};

use crate::gateway::Accounting;

/// What the HTTP layer relays: chunks, then exactly one `Done` or `Error`.
#[derive(Debug)]
pub enum StreamEvent {
    /// The JSON of one `chat.completion.chunk`, as the provider sent it (of
    /// one Anthropic event for a native answer: `ChatOutcome::Stream::anthropic`).
    Chunk(Bytes),
    Done,
    Error(ProviderError),
}

pub(crate) struct MeteredStream {
    inner: ChunkStream,
    /// Anthropic's counts so far, when the items are Anthropic events
    /// (a native answer to a Messages client) rather than OpenAI chunks.
    anthropic: Option<Tokens>,
    /// Whether the client asked for the usage chunk (it is always requested upstream).
    include_usage: bool,
    /// Choices asked for (`n`); the answer is complete once each has a
    /// finish reason.
    choices: u64,
    /// With `n` above 1, the indexes that have finished (bit per index;
    /// `n` is at most 128).
    finished: u128,
    saw_finish: bool,
    ended: bool,
    first_chunk_at: Option<Instant>,
    usage: Option<Usage>,
    accounting: Option<Accounting>,
    /// The request's prompt tokens, estimated, for an early end.
    prompt_estimate: u64,
    /// Bytes of generated text relayed so far, and chunks carrying some.
    text_bytes: u64,
    text_chunks: u64,
    /// Ready once the server stops waiting for calls in flight
    /// ([`crate::Gateway::stop_calls`]): the stream then ends with an error.
    stop: crate::stop::StopWatch,
}

/// The keys whose string values are generated text: in OpenAI chunks, and
/// in Anthropic events. Searchers built once, not for every chunk.
type Finders = std::sync::LazyLock<[memchr::memmem::Finder<'static>; 3]>;
static OPENAI_TEXT: Finders = std::sync::LazyLock::new(|| {
    [
        memchr::memmem::Finder::new(b"\"content\""),
        memchr::memmem::Finder::new(b"\"arguments\""),
        memchr::memmem::Finder::new(b"\"reasoning_content\""),
    ]
});
static ANTHROPIC_TEXT: Finders = std::sync::LazyLock::new(|| {
    [
        memchr::memmem::Finder::new(b"\"text\""),
        memchr::memmem::Finder::new(b"\"partial_json\""),
        memchr::memmem::Finder::new(b"\"thinking\""),
    ]
});

impl MeteredStream {
    pub(crate) fn new(
        inner: ChunkStream,
        include_usage: bool,
        choices: u64,
        prompt_estimate: u64,
        accounting: Accounting,
        stop: crate::stop::StopWatch,
    ) -> Self {
        Self {
            inner,
            anthropic: None,
            include_usage,
            choices: choices.clamp(1, 128),
            finished: 0,
            saw_finish: false,
            ended: false,
            first_chunk_at: None,
            usage: None,
            accounting: Some(accounting),
            prompt_estimate,
            text_bytes: 0,
            text_chunks: 0,
            stop,
        }
    }

    /// The same over Anthropic events: usage from `message_start` and
    /// `message_delta`, complete once a `stop_reason` arrives.
    pub(crate) fn anthropic(
        inner: ChunkStream,
        prompt_estimate: u64,
        accounting: Accounting,
        stop: crate::stop::StopWatch,
    ) -> Self {
        let mut s = Self::new(inner, false, 1, prompt_estimate, accounting, stop);
        s.anthropic = Some(Tokens::default());
        s
    }

    /// Reads an Anthropic event for its usage and stop reason.
    fn note_event(&mut self, event: &[u8]) {
        if !self.saw_finish && scan::has_string_value(event, &scan::STOP_REASON) {
            self.saw_finish = true;
        }
        let Some(tokens) = self.anthropic.as_mut() else {
            return;
        };
        if memchr::memmem::find(event, b"\"usage\"").is_none() {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(event) {
            let usage = v.pointer("/message/usage").or_else(|| v.get("usage"));
            if let Some(u) = usage.filter(|u| u.is_object()) {
                tokens.update(u);
                self.usage = Some(tokens.usage());
            }
        }
    }

    /// A chunk with a finish reason: with one choice the answer is complete;
    /// with several, only once every index has finished (a stream cut after
    /// the first of three is not a complete answer).
    fn note_finish(&mut self, chunk: &[u8]) {
        self.saw_finish =
            self.choices == 1 || scan::all_finished(chunk, self.choices, &mut self.finished);
    }

    fn finish(&mut self, status: u16, error: Option<&ProviderError>) {
        // A complete stream without a usage chunk (cut between its finish
        // reason and its usage, or from a server that ignores
        // `stream_options`) is estimated too: never free.
        let usage = match (status, self.usage) {
            (200, Some(u)) => Some(u),
            _ => Some(self.early_end_usage()),
        };
        if let Some(acc) = self.accounting.take() {
            acc.finish_stream(
                status,
                error.map(ProviderError::code),
                usage,
                self.first_chunk_at,
            );
        }
    }

    /// Usage for a stream that ended before its end: what the provider
    /// reported so far, completed by estimates (never below what it said).
    fn early_end_usage(&self) -> Usage {
        let generated = self.text_chunks.max(self.text_bytes.div_ceil(4));
        match self.usage {
            Some(u) => Usage {
                completion_tokens: u.completion_tokens.max(generated),
                ..u
            },
            None => Usage {
                prompt_tokens: self.prompt_estimate,
                completion_tokens: generated,
                ..Usage::default()
            },
        }
    }

    fn note_text(&mut self, chunk: &[u8]) {
        let keys: &[memchr::memmem::Finder<'static>] = if self.anthropic.is_some() {
            &*ANTHROPIC_TEXT
        } else {
            &*OPENAI_TEXT
        };
        let n = string_bytes(chunk, keys);
        if n > 0 {
            self.text_bytes += n;
            self.text_chunks += 1;
        }
    }
}

/// The completion tokens of a whole answer that came without usage, from
/// its generated text (OpenAI's completion, or Anthropic's message when
/// `anthropic`): 4 bytes a token, as for a stream that ends early.
pub(crate) fn estimate_completion(body: &[u8], anthropic: bool) -> u64 {
    let keys: &[memchr::memmem::Finder<'static>] = if anthropic {
        &*ANTHROPIC_TEXT
    } else {
        &*OPENAI_TEXT
    };
    string_bytes(body, keys).div_ceil(4)
}

/// Total bytes (as written, escapes included) of the string values of the
/// quoted `keys` in `json`, without parsing it. A quoted key cannot occur
/// inside a string value, where its quotes would be escaped.
fn string_bytes(json: &[u8], keys: &[memchr::memmem::Finder<'static>]) -> u64 {
    let mut total = 0;
    for key in keys {
        let mut rest = json;
        while let Some(i) = key.find(rest) {
            rest = &rest[i + key.needle().len()..];
            let Some(value) = scan::string_value_after(rest) else {
                continue;
            };
            rest = value;
            // The closing quote: the first one after an even run of backslashes.
            let mut from = 0;
            let end = loop {
                let Some(q) = memchr::memchr(b'"', &rest[from..]) else {
                    break None;
                };
                let at = from + q;
                let escapes = rest[..at].iter().rev().take_while(|b| **b == b'\\').count();
                if escapes % 2 == 0 {
                    break Some(at);
                }
                from = at + 1;
            };
            let Some(end) = end else { break };
            total += end as u64;
            rest = &rest[end + 1..];
        }
    }
    total
}

#[derive(Deserialize)]
struct UsageChunk {
    #[serde(default, deserialize_with = "switchyard_core::openai::lenient_usage")]
    usage: Option<Usage>,
    #[serde(default)]
    choices: Option<Vec<IgnoredAny>>,
}

/// Finds `"usage"` followed by an object (not `null`) without parsing the chunk.
fn has_usage_object(chunk: &[u8]) -> bool {
    let Some(i) = memchr::memmem::find(chunk, b"\"usage\"") else {
        return false;
    };
    chunk[i + 7..]
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b':'))
        .is_some_and(|b| *b == b'{')
}

impl Stream for MeteredStream {
    type Item = StreamEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<StreamEvent>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            if this.stop.stopped(cx) {
                this.ended = true;
                let e = ProviderError::ShuttingDown;
                this.finish(503, Some(&e));
                return Poll::Ready(Some(StreamEvent::Error(e)));
            }
            match this.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    if this.first_chunk_at.is_none() {
                        this.first_chunk_at = Some(Instant::now());
                    }
                    this.note_text(&chunk);
                    if this.anthropic.is_some() {
                        this.note_event(&chunk);
                        return Poll::Ready(Some(StreamEvent::Chunk(chunk)));
                    }
                    if !this.saw_finish && scan::has_string_value(&chunk, &scan::FINISH_REASON) {
                        this.note_finish(&chunk);
                    }
                    if has_usage_object(&chunk) {
                        if let Ok(parsed) = serde_json::from_slice::<UsageChunk>(&chunk) {
                            this.usage = parsed.usage.or(this.usage);
                            // `choices` empty, `null` or left out: a chunk
                            // of usage alone (asked for by the gateway).
                            let usage_only = parsed.choices.as_ref().is_none_or(Vec::is_empty);
                            if usage_only && !this.include_usage {
                                continue;
                            }
                        }
                    }
                    return Poll::Ready(Some(StreamEvent::Chunk(chunk)));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    this.finish(200, None);
                    return Poll::Ready(Some(StreamEvent::Done));
                }
                // Some servers close without `[DONE]` after the last chunk;
                // once a finish reason was seen the answer is complete.
                Poll::Ready(Some(Err(ProviderError::Truncated))) if this.saw_finish => {
                    this.ended = true;
                    this.finish(200, None);
                    return Poll::Ready(Some(StreamEvent::Done));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    // As the same failure before the first chunk is
                    // recorded: a provider's 400 in the stream is a 400.
                    this.finish(crate::gateway::status_for(&e), Some(&e));
                    return Poll::Ready(Some(StreamEvent::Error(e)));
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        // Dropped before its end: the client disconnected.
        if let Some(acc) = self.accounting.take() {
            let usage = Some(self.early_end_usage());
            acc.finish_stream(499, Some("client_closed"), usage, self.first_chunk_at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_providers::scan::all_finished;

    #[test]
    fn text_is_measured_in_chunks_without_parsing_them() {
        let openai = |c: &str| string_bytes(c.as_bytes(), &*OPENAI_TEXT);
        assert_eq!(openai(r#"{"choices":[{"delta":{"content":"Hello"}}]}"#), 5);
        assert_eq!(
            openai(r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            0
        );
        assert_eq!(openai(r#"{"choices":[{"delta":{"content":null}}]}"#), 0);
        // Escapes count as written; an escaped quote does not end the value,
        // and a key's name inside a value is not a key.
        assert_eq!(
            openai(r#"{"delta":{"content":"a \"content\":\"b\\"}}"#),
            r#"a \"content\":\"b\\"#.len() as u64
        );
        // Reasoning and tool arguments are generated text too, each once.
        assert_eq!(
            openai(
                r#"{"delta":{"reasoning_content":"think","tool_calls":[{"function":{"arguments":"{\"a\":1}"}}]}}"#
            ),
            5 + r#"{\"a\":1}"#.len() as u64
        );
        let anthropic = |c: &str| string_bytes(c.as_bytes(), &*ANTHROPIC_TEXT);
        assert_eq!(
            anthropic(
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi there"}}"#
            ),
            8
        );
        assert_eq!(
            anthropic(
                r#"{"type":"content_block_delta","delta":{"type":"input_json_delta","partial_json":"{\"q\""}}"#
            ),
            r#"{\"q\""#.len() as u64
        );
        assert_eq!(
            anthropic(
                r#"{"type":"message_start","message":{"content":[],"usage":{"input_tokens":3}}}"#
            ),
            0
        );
        // Cut in the middle of a value: what is there is not counted.
        assert_eq!(openai(r#"{"delta":{"content":"unterminated"#), 0);
    }

    #[test]
    fn finds_usage_objects_but_not_nulls() {
        assert!(has_usage_object(
            br#"{"choices":[],"usage":{"prompt_tokens":1}}"#
        ));
        assert!(has_usage_object(
            br#"{"choices":[], "usage": {"prompt_tokens":1}}"#
        ));
        assert!(!has_usage_object(
            br#"{"choices":[{"delta":{}}],"usage":null}"#
        ));
        assert!(!has_usage_object(
            br#"{"choices":[{"delta":{"content":"x"}}]}"#
        ));
    }

    #[test]
    fn with_several_choices_the_answer_ends_when_each_has_finished() {
        let chunk = |i: u32, reason: &str| {
            format!(r#"{{"choices":[{{"index":{i},"delta":{{}},"finish_reason":{reason}}}]}}"#)
        };
        let mut done = 0u128;
        assert!(!all_finished(chunk(0, "\"stop\"").as_bytes(), 3, &mut done));
        assert!(
            !all_finished(chunk(0, "\"stop\"").as_bytes(), 3, &mut done),
            "counted once"
        );
        assert!(!all_finished(chunk(1, "null").as_bytes(), 3, &mut done));
        assert!(
            !all_finished(chunk(7, "\"stop\"").as_bytes(), 3, &mut done),
            "out of range"
        );
        assert!(!all_finished(
            chunk(2, "\"length\"").as_bytes(),
            3,
            &mut done
        ));
        assert!(all_finished(chunk(1, "\"stop\"").as_bytes(), 3, &mut done));
        // Two choices finishing in one chunk.
        let mut done = 0u128;
        let both = r#"{"choices":[{"index":0,"finish_reason":"stop"},{"index":1,"finish_reason":"stop"}]}"#;
        assert!(all_finished(both.as_bytes(), 2, &mut done));
    }
}
