//! The adapter for any OpenAI-compatible API (OpenAI, DeepInfra, vLLM,
//! Ollama, llama.cpp…): bodies are forwarded with only `model` (and, for
//! streams, `stream_options.include_usage`) changed, and answers relayed as
//! they arrive.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderMap, AUTHORIZATION};
use secrecy::ExposeSecret;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Deserialize;
use serde_json::{Map, Value};
use switchyard_core::config::ProviderConfig;
use switchyard_core::openai::{EncodingFormat, Usage};

use crate::sse::SseParser;
use crate::upstream::{parse_url, secret_header, Scrubber, Upstream, UpstreamResponse};
use crate::{
    ChatCall, ChatProvider, ChatReply, ChunkStream, Completion, EmbedCall, EmbeddingProvider,
    ProviderError,
};

pub struct OpenAiProvider {
    name: String,
    chat_url: http::Uri,
    embeddings_url: http::Uri,
    models_url: http::Uri,
    upstream: Upstream,
    deepinfra: bool,
    /// OpenAI's own API, where a request's `max_tokens` travels as
    /// `max_completion_tokens` (see [`ProviderConfig::is_openai`]).
    openai: bool,
}

impl OpenAiProvider {
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Self, ProviderError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &config.api_key {
            headers.insert(
                AUTHORIZATION,
                secret_header(&format!("Bearer {}", key.expose_secret()))?,
            );
        }
        let base = config.base_url.trim_end_matches('/');
        Ok(Self {
            name: name.to_owned(),
            chat_url: parse_url(&format!("{base}/chat/completions"))?,
            embeddings_url: parse_url(&format!("{base}/embeddings"))?,
            models_url: parse_url(&format!("{base}/models"))?,
            upstream: Upstream::new(config, headers)?,
            deepinfra: config.is_deepinfra(),
            openai: config.is_openai(),
        })
    }
}

/// A JSON object written as `base` with some keys replaced or added, and
/// some renamed (to nothing: left out), without copying `base`.
struct Overlay<'a> {
    base: &'a Map<String, Value>,
    set: &'a [(&'a str, Value)],
    rename: &'a [(&'static str, Option<&'static str>)],
}

impl Serialize for Overlay<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.base {
            let key = match self.rename.iter().find(|(from, _)| from == k) {
                Some((_, Some(to))) => to,
                Some((_, None)) => continue,
                None => k.as_str(),
            };
            match self.set.iter().find(|(sk, _)| sk == k) {
                Some((_, nv)) => map.serialize_entry(key, nv)?,
                None => map.serialize_entry(key, v)?,
            }
        }
        for (k, v) in self.set {
            if !self.base.contains_key(*k) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

fn overlay(
    base: &Map<String, Value>,
    set: &[(&str, Value)],
    rename: &[(&'static str, Option<&'static str>)],
) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec(&Overlay { base, set, rename })
        .map_err(|e| ProviderError::Protocol(format!("encoding the request: {e}")))
}

impl OpenAiProvider {
    /// What OpenAI's own API needs renamed or left out of a body that other
    /// OpenAI-compatible servers take as sent (not all of them know the new
    /// names):
    /// - OpenAI deprecated `max_tokens` for `max_completion_tokens`, which
    ///   every current model takes and its reasoning models (o-series, GPT-5)
    ///   require: a request's `max_tokens` (a `/v1/messages` client's always
    ///   has one) travels under the new name, or is left out beside a
    ///   `max_completion_tokens` (those models refuse it outright).
    /// - A `/v1/messages` client's `top_k`, a sampling hint in Anthropic's
    ///   API, is left out: OpenAI refuses the request for it ("Unrecognized
    ///   request argument"), naming a field the client sent to Anthropic's
    ///   API in good faith. A chat-completions client's own `top_k` is
    ///   passed through untouched, as all its fields are.
    fn renamed_fields(&self, call: &ChatCall<'_>) -> Vec<(&'static str, Option<&'static str>)> {
        let body = call.body;
        let mut renames = Vec::new();
        if !self.openai {
            return renames;
        }
        if body.contains_key("max_tokens") {
            let to =
                (!body.contains_key("max_completion_tokens")).then_some("max_completion_tokens");
            renames.push(("max_tokens", to));
        }
        if call.anthropic_body.is_some() && body.contains_key("top_k") {
            renames.push(("top_k", None));
        }
        renames
    }
}

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default, deserialize_with = "switchyard_core::openai::lenient_usage")]
    usage: Option<Usage>,
    /// Set when a server answers 200 with an error object as the body.
    #[serde(default)]
    error: Option<Value>,
}

#[async_trait]
impl ChatProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn probe(&self, timeout: Duration) -> Result<(), ProviderError> {
        self.upstream.get(&self.models_url, timeout).await
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatReply, ProviderError> {
        let model = Value::String(call.upstream_model.to_owned());
        if !call.stream {
            let body = overlay(call.body, &[("model", model)], &self.renamed_fields(&call))?;
            let resp = self
                .upstream
                .post(&self.chat_url, body, call.timeout)
                .await?;
            let bytes = resp.bytes().await?;
            let parsed: UsageOnly = serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::Protocol(format!("the completion is not JSON: {e}")))?;
            // A 200 whose body is an error (some OpenAI-compatible servers
            // and proxies answer so) is that error, not a completion.
            if let Some(e) = parsed
                .error
                .and_then(|e| error_object(e, &self.upstream.scrubber()))
            {
                return Err(e);
            }
            return Ok(ChatReply::Complete(Completion {
                body: bytes,
                usage: parsed.usage,
            }));
        }
        // Always ask for usage so that every stream is accounted for; the
        // engine drops the usage chunk when the client did not ask for it.
        let mut options = match call.body.get("stream_options") {
            Some(Value::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        options.insert("include_usage".into(), Value::Bool(true));
        let body = overlay(
            call.body,
            &[("model", model), ("stream_options", Value::Object(options))],
            &self.renamed_fields(&call),
        )?;
        let resp = self
            .upstream
            .post(&self.chat_url, body, call.timeout)
            .await?;
        Ok(ChatReply::Stream(chunk_stream(
            resp,
            self.upstream.scrubber(),
        )))
    }
}

struct StreamState {
    resp: UpstreamResponse,
    parser: SseParser,
    scrubber: Scrubber,
    eof: bool,
    finished: bool,
}

fn chunk_stream(resp: UpstreamResponse, scrubber: Scrubber) -> ChunkStream {
    let state = StreamState {
        resp,
        parser: SseParser::new(),
        scrubber,
        eof: false,
        finished: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        loop {
            let event = if st.eof {
                st.parser.finish()
            } else {
                st.parser.next_event()
            };
            if let Some(ev) = event {
                if &ev.data[..] == b"[DONE]" {
                    return None;
                }
                if ev.data.is_empty() {
                    continue;
                }
                if let Some(e) = in_band_error(&ev.data, &st.scrubber) {
                    // Whatever follows (often `[DONE]`) would make the
                    // failed stream look complete.
                    st.finished = true;
                    return Some((Err(e), st));
                }
                return Some((Ok(ev.data), st));
            }
            if st.eof {
                st.finished = true;
                return Some((Err(ProviderError::Truncated), st));
            }
            match st.resp.chunk().await {
                Ok(Some(chunk)) => {
                    st.parser.push(&chunk);
                    if st.parser.overflowed() {
                        st.finished = true;
                        return Some((Err(crate::sse::too_large()), st));
                    }
                }
                Ok(None) => st.eof = true,
                Err(e) => {
                    st.finished = true;
                    return Some((Err(e), st));
                }
            }
        }
    }))
}

/// An error that an OpenAI-compatible server sends inside a stream it has
/// already answered 200 (vLLM's `data: {"error":{…}}` before `[DONE]`,
/// OpenRouter's chunk with an `error` beside `finish_reason: "error"`): the
/// stream has failed, as if the server had answered the error's status. So
/// one that comes before the first chunk fails over like any other failure,
/// and one that comes later ends the client's stream with an error event
/// instead of being relayed as a chunk and followed by `[DONE]`.
///
/// A chunk is only parsed when `"error"` appears in it unescaped, which in
/// valid JSON means a key or the string `"error"` (a text delta that says
/// "error" escapes its quotes).
fn in_band_error(data: &Bytes, scrubber: &Scrubber) -> Option<ProviderError> {
    static NEEDLE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"error\""));
    NEEDLE.find(data)?;
    #[derive(Deserialize)]
    struct Probe {
        error: Option<Value>,
    }
    let error = serde_json::from_slice::<Probe>(data).ok()?.error?;
    error_object(error, scrubber)
}

/// The failure an `error` member stands for (see [`in_band_error`]), with an
/// OpenAI-shaped body scrubbed of the key; `None` for an empty one.
fn error_object(error: Value, scrubber: &Scrubber) -> Option<ProviderError> {
    let status = in_band_status(&error)?;
    let error = match error {
        Value::Object(_) => error,
        // Some servers send only a message.
        other => {
            serde_json::json!({"message": other, "type": "server_error", "param": null, "code": null})
        }
    };
    let body = serde_json::to_vec(&serde_json::json!({ "error": error })).unwrap_or_default();
    Some(ProviderError::Status {
        status,
        body: scrubber.scrub(Bytes::from(body)),
        retry_after: None,
    })
}

/// The status an in-band error stands for: its numeric `code` when that is
/// an HTTP error status, else what its `type` or `code` names; `None` when
/// `error` is empty (`null`, `false`, `{}`), which is no error.
fn in_band_status(error: &Value) -> Option<u16> {
    match error {
        Value::Null | Value::Bool(false) => None,
        Value::Object(o) if o.is_empty() => None,
        Value::Object(o) => {
            let numeric = o.get("code").and_then(|c| {
                c.as_u64()
                    .or_else(|| c.as_str().and_then(|s| s.parse().ok()))
            });
            if let Some(code) = numeric.and_then(|c| u16::try_from(c).ok()) {
                if (400..600).contains(&code) {
                    return Some(code);
                }
            }
            let names = ["type", "code"]
                .iter()
                .filter_map(|k| o.get(*k).and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            let status = if names.contains("rate_limit") {
                429
            } else if names.contains("overloaded") {
                503
            } else if names.contains("invalid_request") || names.contains("context_length") {
                400
            } else {
                500
            };
            Some(status)
        }
        _ => Some(500),
    }
}

#[async_trait]
impl EmbeddingProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn embed(&self, call: EmbedCall<'_>) -> Result<Completion, ProviderError> {
        let model = Value::String(call.upstream_model.to_owned());
        // DeepInfra answers only floats; ask for them and encode here if needed.
        let convert = self.deepinfra && call.encoding_format == EncodingFormat::Base64;
        let body = if self.deepinfra {
            overlay(
                call.body,
                &[
                    ("model", model),
                    ("encoding_format", Value::String("float".into())),
                ],
                &[],
            )?
        } else {
            overlay(call.body, &[("model", model)], &[])?
        };
        let resp = self
            .upstream
            .post(&self.embeddings_url, body, call.timeout)
            .await?;
        let bytes = resp.bytes().await?;
        if !convert {
            let parsed: UsageOnly = serde_json::from_slice(&bytes).map_err(|e| {
                ProviderError::Protocol(format!("the embeddings response is not JSON: {e}"))
            })?;
            return Ok(Completion {
                body: bytes,
                usage: parsed.usage,
            });
        }
        let mut value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::Protocol(format!("the embeddings response is not JSON: {e}"))
        })?;
        floats_to_base64(&mut value)?;
        let usage = value
            .get("usage")
            .and_then(|u| serde_json::from_value(u.clone()).ok());
        let body =
            serde_json::to_vec(&value).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        Ok(Completion {
            body: Bytes::from(body),
            usage,
        })
    }
}

/// Rewrites every `data[i].embedding` float array as OpenAI's base64 form:
/// little-endian f32 values.
pub fn floats_to_base64(response: &mut Value) -> Result<(), ProviderError> {
    let data = response
        .get_mut("data")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            ProviderError::Protocol("the embeddings response has no data array".into())
        })?;
    for item in data {
        let Some(Value::Array(floats)) = item.get("embedding") else {
            return Err(ProviderError::Protocol(
                "an embedding is not an array of numbers".into(),
            ));
        };
        let mut raw = Vec::with_capacity(floats.len() * 4);
        for f in floats {
            let x = f.as_f64().ok_or_else(|| {
                ProviderError::Protocol("an embedding is not an array of numbers".into())
            })?;
            raw.extend_from_slice(&(x as f32).to_le_bytes());
        }
        item["embedding"] = Value::String(base64::engine::general_purpose::STANDARD.encode(raw));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_core::anthropic::NativeMessages;

    #[test]
    fn overlay_replaces_in_place_and_appends_new_keys() {
        let base: Map<String, Value> =
            serde_json::from_str(r#"{"model":"alias","tools":[{"x":1}],"z":null}"#).unwrap();
        let out = overlay(
            &base,
            &[
                ("model", json!("up")),
                ("stream_options", json!({"include_usage": true})),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"up","tools":[{"x":1}],"z":null,"stream_options":{"include_usage":true}}"#
        );
        let base: Map<String, Value> =
            serde_json::from_str(r#"{"model":"alias","max_tokens":9,"n":2}"#).unwrap();
        let out = overlay(
            &base,
            &[("model", json!("up"))],
            &[("max_tokens", Some("max_completion_tokens")), ("n", None)],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"up","max_completion_tokens":9}"#
        );
        let out = overlay(&base, &[], &[("max_tokens", None)]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"alias","n":2}"#
        );
    }

    #[test]
    fn openais_own_api_gets_max_completion_tokens_and_no_top_k_of_a_messages_client() {
        let provider = |url: &str| {
            let config: ProviderConfig =
                serde_json::from_value(json!({"kind": "openai", "base_url": url})).unwrap();
            OpenAiProvider::new("p", &config).unwrap()
        };
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"max_tokens":9,"top_k":5,"n":2}"#).unwrap();
        let native = NativeMessages {
            body: Map::new(),
            beta: None,
        };
        let call = |anthropic_body| ChatCall {
            upstream_model: "m",
            body: &body,
            anthropic_body,
            stream: false,
            timeout: Duration::from_secs(1),
        };
        let openai = provider("https://api.openai.com/v1");
        assert_eq!(
            openai.renamed_fields(&call(Some(&native))),
            [
                ("max_tokens", Some("max_completion_tokens")),
                ("top_k", None)
            ]
        );
        // A chat-completions client's own top_k is its business.
        assert_eq!(
            openai.renamed_fields(&call(None)),
            [("max_tokens", Some("max_completion_tokens"))]
        );
        // Other OpenAI-compatible servers (vLLM, DeepInfra) take both.
        let vllm = provider("http://127.0.0.1:8000/v1");
        assert!(vllm.renamed_fields(&call(Some(&native))).is_empty());
    }

    #[test]
    fn floats_become_little_endian_f32_base64() {
        let mut v = json!({"data": [{"embedding": [1.0, -2.5], "index": 0}]});
        floats_to_base64(&mut v).unwrap();
        let b64 = v["data"][0]["embedding"].as_str().unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(
            raw,
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }

    fn in_band(chunk: &str) -> Option<(u16, Value)> {
        let scrubber = Scrubber::default();
        match in_band_error(&Bytes::from(chunk.to_owned()), &scrubber)? {
            ProviderError::Status { status, body, .. } => {
                Some((status, serde_json::from_slice(&body).unwrap()))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ordinary_chunks_are_no_error_even_when_their_text_says_error() {
        for chunk in [
            r#"{"choices":[{"index":0,"delta":{"content":"an error"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"\"error\": 1"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"error\":true}"}}]}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1},"error":null}"#,
            r#"{"choices":[],"error":{}}"#,
        ] {
            assert_eq!(in_band(chunk), None, "{chunk}");
        }
    }

    #[test]
    fn in_band_errors_carry_the_status_they_stand_for() {
        // vLLM: the status in `code`.
        let (status, body) = in_band(
            r#"{"error":{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}}"#,
        )
        .unwrap();
        assert_eq!(status, 400);
        assert_eq!(body["error"]["message"], "too long");
        // OpenRouter: beside the chunk's choices, the status as a number.
        let (status, _) = in_band(
            r#"{"id":"x","object":"chat.completion.chunk","error":{"code":502,"message":"Provider disconnected"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}"#,
        )
        .unwrap();
        assert_eq!(status, 502);
        // OpenAI's own shape, by type or code name.
        for (error, want) in [
            (
                r#"{"message":"m","type":"server_error","param":null,"code":null}"#,
                500,
            ),
            (
                r#"{"message":"m","type":"requests","code":"rate_limit_exceeded"}"#,
                429,
            ),
            (r#"{"message":"m","type":"overloaded_error"}"#, 503),
            (
                r#"{"message":"m","type":"invalid_request_error","code":"context_length_exceeded"}"#,
                400,
            ),
            (r#"{"message":"m","code":"529"}"#, 529),
        ] {
            let (status, _) = in_band(&format!(r#"{{"error":{error}}}"#)).unwrap();
            assert_eq!(status, want, "{error}");
        }
        // Only a message: still an error, in OpenAI's shape.
        let (status, body) = in_band(r#"{"error":"the model crashed"}"#).unwrap();
        assert_eq!(status, 500);
        assert_eq!(body["error"]["message"], "the model crashed");
        assert_eq!(body["error"]["type"], "server_error");
    }

    #[test]
    fn an_in_band_error_is_scrubbed_of_the_key() {
        let scrubber = Scrubber::for_key("sk-secret-123");
        let e = in_band_error(
            &Bytes::from_static(br#"{"error":{"message":"bad key sk-secret-123","code":401}}"#),
            &scrubber,
        )
        .unwrap();
        let ProviderError::Status { status, body, .. } = e else {
            panic!("{e:?}")
        };
        assert_eq!(status, 401);
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            !text.contains("sk-secret-123") && text.contains("[redacted]"),
            "{text}"
        );
    }
}
