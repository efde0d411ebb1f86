//! The HTTP plumbing every adapter shares: one connection pool per provider,
//! credentials in sensitive headers, error bodies read within a bound and
//! scrubbed of the key, and transport errors mapped to [`ProviderError`]
//! without the request URL.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use secrecy::{ExposeSecret, SecretString};
use switchyard_core::config::ProviderConfig;

use crate::ProviderError;

/// Largest upstream error body kept for relaying to the client.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub(crate) struct Upstream {
    client: reqwest::Client,
    headers: HeaderMap,
    /// Kept only to scrub it from anything the provider echoes back.
    key: Option<SecretString>,
}

/// Parsed once at startup: parsing (with IDNA) on every request showed up in profiles.
pub(crate) fn parse_url(url: &str) -> Result<reqwest::Url, ProviderError> {
    reqwest::Url::parse(url)
        .map_err(|e| ProviderError::Protocol(format!("invalid provider URL: {e}")))
}

/// A header value that is never printed (`Debug` shows `Sensitive`).
pub(crate) fn secret_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        ProviderError::Protocol("the API key has characters a header cannot carry".into())
    })?;
    v.set_sensitive(true);
    Ok(v)
}

impl Upstream {
    pub(crate) fn new(config: &ProviderConfig, headers: HeaderMap) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|e| ProviderError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            client,
            headers,
            key: config.api_key.clone(),
        })
    }

    /// POSTs JSON; a non-2xx answer becomes [`ProviderError::Status`] with the
    /// provider's (bounded, scrubbed) body.
    pub(crate) async fn post(
        &self,
        url: reqwest::Url,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ProviderError> {
        let resp = self
            .client
            .post(url)
            .timeout(timeout)
            .headers(self.headers.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
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

    /// GETs `url`, reading and discarding the body; for probes.
    pub(crate) async fn get(
        &self,
        url: reqwest::Url,
        timeout: Duration,
    ) -> Result<(), ProviderError> {
        let resp = self
            .client
            .get(url)
            .timeout(timeout)
            .headers(self.headers.clone())
            .send()
            .await
            .map_err(|e| map_reqwest_error(e, timeout))?;
        let status = resp.status();
        if !status.is_success() {
            let retry_after = retry_after(resp.headers());
            let body = self.read_bounded(resp, MAX_ERROR_BODY).await;
            return Err(ProviderError::Status {
                status: status.as_u16(),
                body,
                retry_after,
            });
        }
        resp.bytes()
            .await
            .map_err(|e| map_reqwest_error(e, timeout))?;
        Ok(())
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
    pub(crate) fn scrub(&self, body: Bytes) -> Bytes {
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

pub(crate) fn map_reqwest_error(e: reqwest::Error, timeout: Duration) -> ProviderError {
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
    } else if e.is_connect() || e.is_request() {
        ProviderError::Connect(msg)
    } else if e.is_body() || e.is_decode() {
        ProviderError::Broken(msg)
    } else {
        ProviderError::Protocol(msg)
    }
}

/// `retry-after-ms` (OpenAI) or `retry-after` in seconds.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn the_key_is_scrubbed_from_echoed_bodies() {
        let config: ProviderConfig =
            toml::from_str("kind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key = \"sk-top-secret\"\n").unwrap();
        let u = Upstream::new(&config, HeaderMap::new()).unwrap();
        let out = u.scrub(Bytes::from_static(
            b"bad key sk-top-secret and sk-top-secret",
        ));
        assert_eq!(&out[..], b"bad key [redacted] and [redacted]");
    }
}
