//! The HTTP plumbing every adapter shares: one connection pool per provider,
//! credentials in sensitive headers, error bodies read within a bound and
//! scrubbed of the key, one deadline for the whole exchange (body included),
//! and transport errors mapped to [`ProviderError`] without the request URL.
//!
//! A plain `http://` provider reached directly goes through [`crate::h1`],
//! a client of our own with no connection tasks. Everything else (`https://`,
//! proxies) goes through hyper's pooled client, used directly rather than
//! through reqwest: reqwest re-parsed the request URL with the `url` crate on
//! every response (its redirect layer), which alone was ~4 % of the
//! gateway's CPU under load.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Method, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use secrecy::{ExposeSecret, SecretString};
use switchyard_core::config::ProviderConfig;
use tokio::time::Sleep;

use crate::connect::{Connector, Route};
use crate::{h1, ProviderError};

/// Largest upstream error body kept for relaying to the client.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub(crate) struct Upstream {
    client: Client<Connector, Full<Bytes>>,
    /// For a plain `http://` provider with no proxy in between.
    direct_h1: Option<h1::Pool>,
    headers: HeaderMap,
    /// `headers` and `Content-Type: application/json`.
    post_headers: HeaderMap,
    /// Kept only to scrub it from anything the provider echoes back.
    key: Scrubber,
    /// `max_response_mib` in bytes, given to every response.
    max_body: usize,
}

/// Removes the provider key from text the provider sent back; cheap to
/// clone into a stream.
#[derive(Clone, Default)]
pub(crate) struct Scrubber(Option<std::sync::Arc<SecretString>>);

impl Scrubber {
    #[cfg(test)]
    pub(crate) fn for_key(key: &str) -> Self {
        Self(Some(std::sync::Arc::new(SecretString::from(
            key.to_owned(),
        ))))
    }

    /// The key's length: a body cut shorter than this after a match could
    /// end inside the key.
    fn key_len(&self) -> usize {
        self.0.as_ref().map_or(0, |k| k.expose_secret().len())
    }

    /// Text (already decoded) with the key replaced.
    pub(crate) fn scrub_str(&self, text: &str) -> String {
        match &self.0 {
            Some(key) if !key.expose_secret().is_empty() => {
                text.replace(key.expose_secret(), "[redacted]")
            }
            _ => text.to_owned(),
        }
    }

    /// A JSON body whose strings, once decoded, hold the key (written with
    /// escapes such as `\/` or `\u0073`, which the byte search misses):
    /// written again with them scrubbed. Other bodies are returned as they are.
    fn scrub_decoded(&self, body: Bytes) -> Bytes {
        fn walk(v: &mut serde_json::Value, s: &Scrubber, changed: &mut bool) {
            match v {
                serde_json::Value::String(t) => {
                    let clean = s.scrub_str(t);
                    if clean != *t {
                        *t = clean;
                        *changed = true;
                    }
                }
                serde_json::Value::Array(items) => {
                    items.iter_mut().for_each(|x| walk(x, s, changed))
                }
                serde_json::Value::Object(o) => o.values_mut().for_each(|x| walk(x, s, changed)),
                _ => {}
            }
        }
        if self.key_len() == 0 {
            return body;
        }
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return body;
        };
        let mut changed = false;
        walk(&mut v, self, &mut changed);
        match changed {
            true => serde_json::to_vec(&v).map(Bytes::from).unwrap_or(body),
            false => body,
        }
    }

    pub(crate) fn scrub(&self, body: Bytes) -> Bytes {
        let Some(key) = &self.0 else { return body };
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

/// Parsed once at startup, `http` or `https` with a host.
pub(crate) fn parse_url(url: &str) -> Result<Uri, ProviderError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ProviderError::Protocol(format!("invalid provider URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(ProviderError::Protocol(
            "invalid provider URL: it must be http:// or https:// with a host".into(),
        ));
    }
    Ok(uri)
}

/// A header value that is never printed (`Debug` shows `Sensitive`).
pub(crate) fn secret_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        ProviderError::Protocol("the API key has characters a header cannot carry".into())
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// A successful upstream answer whose body is still to be read. The deadline
/// set when the request was sent keeps running while the body is read.
pub(crate) struct UpstreamResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: ResponseBody,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// The most [`UpstreamResponse::bytes`] reads.
    max_body: usize,
}

enum ResponseBody {
    Hyper(Incoming),
    H1(h1::Body),
}

impl ResponseBody {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ProviderError>> {
        match self {
            ResponseBody::H1(body) => body.poll_chunk(cx).map_err(|e| {
                ProviderError::Broken(format!("error reading a body from connection: {e}"))
            }),
            ResponseBody::Hyper(body) => loop {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if !data.is_empty() => return Poll::Ready(Ok(Some(data))),
                        _ => continue, // trailers or an empty frame
                    },
                    Poll::Ready(Some(Err(e))) => {
                        return Poll::Ready(Err(ProviderError::Broken(describe(&e))))
                    }
                    Poll::Ready(None) => return Poll::Ready(Ok(None)),
                    Poll::Pending => return Poll::Pending,
                }
            },
        }
    }
}

impl UpstreamResponse {
    /// The next piece of the body; `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, ProviderError> {
        poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, ProviderError>> {
        match self.body.poll_chunk(cx) {
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(ProviderError::Timeout(self.timeout)));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }

    /// The whole body, if it is at most the provider's `max_response_mib`
    /// (refused before reading when its `Content-Length` says more).
    pub(crate) async fn bytes(mut self) -> Result<Bytes, ProviderError> {
        let limit = self.max_body;
        let too_large = || {
            ProviderError::Protocol(format!(
                "the answer is larger than {} MiB (max_response_mib)",
                limit / (1024 * 1024)
            ))
        };
        let declared = self
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let Some(first) = self.chunk().await? else {
            return Ok(Bytes::new());
        };
        let Some(second) = self.chunk().await? else {
            if first.len() > limit {
                return Err(too_large());
            }
            return Ok(first); // the usual case: one frame, no copy
        };
        let mut buf = BytesMut::with_capacity(first.len() + second.len());
        buf.extend_from_slice(&first);
        buf.extend_from_slice(&second);
        while buf.len() <= limit {
            let Some(more) = self.chunk().await? else {
                return Ok(buf.freeze());
            };
            buf.extend_from_slice(&more);
        }
        Err(too_large())
    }
}

impl Upstream {
    pub(crate) fn new(
        config: &ProviderConfig,
        mut headers: HeaderMap,
    ) -> Result<Self, ProviderError> {
        let dst = parse_url(&config.base_url)?;
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let route = Route::for_destination(&dst, connect_timeout)?;
        let direct_h1 = match route.connector {
            Connector::Direct(_) => h1::Pool::new(&dst, connect_timeout),
            _ => None,
        };
        if let Some(via) = &route.via {
            tracing::info!(host = dst.host().unwrap_or_default(), proxy = %via, "provider calls go through a proxy");
        }
        if let Some(auth) = route.proxy_authorization {
            headers.insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(route.connector);
        let mut post_headers = headers.clone();
        post_headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(Self {
            client,
            direct_h1,
            headers,
            post_headers,
            key: Scrubber(config.api_key.clone().map(std::sync::Arc::new)),
            max_body: usize::try_from(config.max_response_mib)
                .unwrap_or(usize::MAX)
                .saturating_mul(1024 * 1024),
        })
    }

    /// POSTs JSON; a non-2xx answer becomes [`ProviderError::Status`] with the
    /// provider's (bounded, scrubbed) body. `timeout` covers the whole
    /// exchange, reading the body included.
    pub(crate) async fn post(
        &self,
        uri: &Uri,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<UpstreamResponse, ProviderError> {
        self.send(
            Method::POST,
            uri,
            &self.post_headers,
            Bytes::from(body),
            timeout,
        )
        .await
    }

    /// [`Self::post`] with one more header.
    pub(crate) async fn post_with(
        &self,
        uri: &Uri,
        body: Vec<u8>,
        extra: (http::header::HeaderName, HeaderValue),
        timeout: Duration,
    ) -> Result<UpstreamResponse, ProviderError> {
        let mut headers = self.post_headers.clone();
        headers.insert(extra.0, extra.1);
        self.send(Method::POST, uri, &headers, Bytes::from(body), timeout)
            .await
    }

    /// GETs `uri`, reading and discarding the body; for probes.
    pub(crate) async fn get(&self, uri: &Uri, timeout: Duration) -> Result<(), ProviderError> {
        let resp = self
            .send(Method::GET, uri, &self.headers, Bytes::new(), timeout)
            .await?;
        resp.bytes().await?;
        Ok(())
    }

    async fn send(
        &self,
        method: Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<UpstreamResponse, ProviderError> {
        let mut deadline = Box::pin(tokio::time::sleep(timeout));
        let mut resp = if let Some(pool) = &self.direct_h1 {
            let r = tokio::select! {
                biased;
                r = pool.send(&method, uri, headers, &body) => r.map_err(|e| match e {
                    h1::Error::Connect(m) => ProviderError::Connect(m),
                    h1::Error::Protocol(m) => ProviderError::Protocol(m),
                })?,
                () = deadline.as_mut() => return Err(ProviderError::Timeout(timeout)),
            };
            UpstreamResponse {
                status: r.status,
                headers: r.headers,
                body: ResponseBody::H1(r.body),
                deadline,
                timeout,
                max_body: self.max_body,
            }
        } else {
            let mut req = http::Request::new(Full::new(body));
            *req.method_mut() = method;
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            let resp = tokio::select! {
                biased;
                r = self.client.request(req) => r.map_err(|e| ProviderError::Connect(describe(&e)))?,
                () = deadline.as_mut() => return Err(ProviderError::Timeout(timeout)),
            };
            let (parts, body) = resp.into_parts();
            UpstreamResponse {
                status: parts.status,
                headers: parts.headers,
                body: ResponseBody::Hyper(body),
                deadline,
                timeout,
                max_body: self.max_body,
            }
        };
        if resp.status.is_success() {
            return Ok(resp);
        }
        let retry_after = retry_after(&resp.headers);
        let body = self.read_bounded(&mut resp, MAX_ERROR_BODY).await;
        Err(ProviderError::Status {
            status: resp.status.as_u16(),
            body,
            retry_after,
        })
    }

    async fn read_bounded(&self, resp: &mut UpstreamResponse, limit: usize) -> Bytes {
        // Read past the limit by a key's length and scrub before cutting, so
        // that a key across the cut is found whole.
        let read_to = limit + self.key.key_len();
        let mut out = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            let room = read_to.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= read_to {
                break;
            }
        }
        let mut scrubbed = self.scrub(Bytes::from(out));
        scrubbed.truncate(limit);
        self.key.scrub_decoded(scrubbed)
    }

    /// Removes the provider key from text the provider sent back.
    pub(crate) fn scrub(&self, body: Bytes) -> Bytes {
        self.key.scrub(body)
    }

    /// The same, for a stream that outlives this borrow.
    pub(crate) fn scrubber(&self) -> Scrubber {
        self.key.clone()
    }
}

/// An error and its chain of causes on one line (hyper's errors carry no
/// URL, so nothing here can leak a credential embedded in one).
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Longest wait taken from an upstream's `Retry-After`: longer values are
/// read as this (far past any backoff cap, so the route moves on).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// `retry-after-ms` (OpenAI), else `retry-after` in seconds or as an
/// HTTP-date (RFC 9110), at most [`MAX_RETRY_AFTER`]; `None` when absent or
/// unreadable.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let secs = |s: f64| {
        (s.is_finite() && s >= 0.0).then(|| {
            Duration::try_from_secs_f64(s)
                .unwrap_or(MAX_RETRY_AFTER)
                .min(MAX_RETRY_AFTER)
        })
    };
    if let Some(ms) = header("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| secs(ms / 1000.0))
    {
        return Some(ms);
    }
    let value = header("retry-after")?;
    if let Ok(s) = value.parse::<f64>() {
        return secs(s);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_written_with_json_escapes_is_scrubbed_too() {
        let s = Scrubber::for_key("sk-ab/cd");
        let escaped =
            Bytes::from_static(br#"{"error":{"message":"bad key sk-ab\/cd","type":"x"}}"#);
        let out = s.scrub_decoded(s.scrub(escaped));
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            !text.contains("sk-ab") && text.contains("[redacted]"),
            "{text}"
        );
        let unicode = Bytes::from_static(br#"{"message":"\u0073k-ab/cd"}"#);
        let text = String::from_utf8(s.scrub_decoded(unicode).to_vec()).unwrap();
        assert!(!text.contains("k-ab/cd"), "{text}");
        // Bodies without the key, or not JSON, are left as they are.
        let plain = Bytes::from_static(br#"{"message":  "fine"}"#);
        assert_eq!(s.scrub_decoded(plain.clone()), plain);
        assert_eq!(s.scrub_str("key sk-ab/cd!"), "key [redacted]!");
    }

    #[test]
    fn retry_after_reads_dates_and_survives_absurd_values() {
        let read = |name: &'static str, v: &str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_str(v).unwrap());
            retry_after(&h)
        };
        // Past Duration's range, or just very long: a day, no panic.
        for v in ["99999999999999999999", "2e19", "1e300"] {
            assert_eq!(read("retry-after", v), Some(MAX_RETRY_AFTER), "{v}");
        }
        assert_eq!(read("retry-after-ms", "1e30"), Some(MAX_RETRY_AFTER));
        for v in ["-1", "NaN", "inf", "soon"] {
            assert_eq!(read("retry-after", v), None, "{v}");
        }
        // An HTTP-date: the time until then (in the past: no wait).
        let in_an_hour = std::time::SystemTime::now() + Duration::from_secs(3600);
        let wait = read("retry-after", &httpdate::fmt_http_date(in_an_hour)).unwrap();
        assert!(
            wait > Duration::from_secs(3590) && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );
        assert_eq!(
            read("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        // An unreadable retry-after-ms leaves retry-after to decide.
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("x"));
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
    }

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
