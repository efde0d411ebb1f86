//! The adapter for any OpenAI-compatible API (OpenAI, DeepInfra, vLLM,
//! Ollama, llama.cpp…): bodies are forwarded with only `model` (and, for
//! streams, `stream_options.include_usage`) changed, and answers relayed as
//! they arrive.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::Deserialize;
use serde_json::{Map, Value};
use switchyard_core::config::ProviderConfig;
use switchyard_core::openai::{EncodingFormat, Usage};

use crate::sse::SseParser;
use crate::{
    ChatCall, ChatProvider, ChatReply, ChunkStream, Completion, EmbedCall, EmbeddingProvider,
    ProviderError,
};

/// Largest upstream error body kept for relaying to the client.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub struct OpenAiProvider {
    name: String,
    chat_url: String,
    embeddings_url: String,
    auth: Option<HeaderValue>,
    /// Kept only to scrub it from anything the provider echoes back.
    key: Option<SecretString>,
    client: reqwest::Client,
    deepinfra: bool,
}

impl OpenAiProvider {
    pub fn new(name: &str, config: &ProviderConfig) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| ProviderError::Protocol(format!("building the HTTP client: {e}")))?;
        let auth = match &config.api_key {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                    .map_err(|_| {
                        ProviderError::Protocol(
                            "the API key has characters a header cannot carry".into(),
                        )
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let base = config.base_url.trim_end_matches('/');
        Ok(Self {
            name: name.to_owned(),
            chat_url: format!("{base}/chat/completions"),
            embeddings_url: format!("{base}/embeddings"),
            auth,
            key: config.api_key.clone(),
            client,
            deepinfra: config.is_deepinfra(),
        })
    }

    async fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut req = self
            .client
            .post(url)
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| map_reqwest_error(e, timeout))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = retry_after(resp.headers());
        let body = self.read_bounded(resp, MAX_ERROR_BODY).await;
        Err(ProviderError::Status {
            status: status.as_u16(),
            body,
            retry_after,
        })
    }

    async fn read_bounded(&self, mut resp: reqwest::Response, limit: usize) -> Bytes {
        let mut out = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= limit {
                break;
            }
        }
        self.scrub(Bytes::from(out))
    }

    /// Removes the provider key from text the provider sent back.
    fn scrub(&self, body: Bytes) -> Bytes {
        let Some(key) = &self.key else { return body };
        let key = key.expose_secret().as_bytes();
        if key.is_empty() || memchr::memmem::find(&body, key).is_none() {
            return body;
        }
        let mut out = Vec::with_capacity(body.len());
        let mut rest = &body[..];
        while let Some(i) = memchr::memmem::find(rest, key) {
            out.extend_from_slice(&rest[..i]);
            out.extend_from_slice(b"[redacted]");
            rest = &rest[i + key.len()..];
        }
        out.extend_from_slice(rest);
        Bytes::from(out)
    }
}

fn map_reqwest_error(e: reqwest::Error, timeout: Duration) -> ProviderError {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        ProviderError::Timeout(timeout)
    } else if e.is_connect() {
        ProviderError::Connect(msg)
    } else if e.is_body() || e.is_decode() {
        ProviderError::Broken(msg)
    } else if e.is_request() {
        ProviderError::Connect(msg)
    } else {
        ProviderError::Protocol(msg)
    }
}

fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0));
    }
    let secs = headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// A JSON object written as `base` with some keys replaced or added,
/// without copying `base`.
struct Overlay<'a> {
    base: &'a Map<String, Value>,
    set: &'a [(&'a str, Value)],
}

impl Serialize for Overlay<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.base {
            match self.set.iter().find(|(sk, _)| sk == k) {
                Some((_, nv)) => map.serialize_entry(k, nv)?,
                None => map.serialize_entry(k, v)?,
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

fn overlay(base: &Map<String, Value>, set: &[(&str, Value)]) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec(&Overlay { base, set })
        .map_err(|e| ProviderError::Protocol(format!("encoding the request: {e}")))
}

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<Usage>,
}

#[async_trait]
impl ChatProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatReply, ProviderError> {
        let model = Value::String(call.upstream_model.to_owned());
        if !call.stream {
            let body = overlay(call.body, &[("model", model)])?;
            let resp = self.post(&self.chat_url, body, call.timeout).await?;
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| map_reqwest_error(e, call.timeout))?;
            let parsed: UsageOnly = serde_json::from_slice(&bytes)
                .map_err(|e| ProviderError::Protocol(format!("the completion is not JSON: {e}")))?;
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
        )?;
        let resp = self.post(&self.chat_url, body, call.timeout).await?;
        Ok(ChatReply::Stream(chunk_stream(resp, call.timeout)))
    }
}

struct StreamState {
    body: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    eof: bool,
    finished: bool,
    timeout: Duration,
}

fn chunk_stream(resp: reqwest::Response, timeout: Duration) -> ChunkStream {
    let state = StreamState {
        body: resp.bytes_stream().boxed(),
        parser: SseParser::new(),
        eof: false,
        finished: false,
        timeout,
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
                return Some((Ok(ev.data), st));
            }
            if st.eof {
                st.finished = true;
                return Some((Err(ProviderError::Truncated), st));
            }
            match st.body.next().await {
                Some(Ok(chunk)) => st.parser.push(&chunk),
                Some(Err(e)) => {
                    st.finished = true;
                    let err = match map_reqwest_error(e, st.timeout) {
                        ProviderError::Timeout(d) => ProviderError::Timeout(d),
                        other => ProviderError::Broken(other.to_string()),
                    };
                    return Some((Err(err), st));
                }
                None => st.eof = true,
            }
        }
    }))
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
            )?
        } else {
            overlay(call.body, &[("model", model)])?
        };
        let resp = self.post(&self.embeddings_url, body, call.timeout).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| map_reqwest_error(e, call.timeout))?;
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
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"up","tools":[{"x":1}],"z":null,"stream_options":{"include_usage":true}}"#
        );
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

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        assert_eq!(retry_after(&http::HeaderMap::new()), None);
    }

    #[test]
    fn the_key_is_scrubbed_from_echoed_bodies() {
        let config: ProviderConfig = toml::from_str("kind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key = \"sk-top-secret\"\n").unwrap();
        let p = OpenAiProvider::new("p", &config).unwrap();
        let out = p.scrub(Bytes::from_static(
            b"bad key sk-top-secret and sk-top-secret",
        ));
        assert_eq!(&out[..], b"bad key [redacted] and [redacted]");
    }
}
