//! How the upstream client reaches a provider: directly, or through the proxy
//! the environment names (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`,
//! read once at startup, the way curl reads them). An `https://` provider is
//! reached through a proxy with `CONNECT` and TLS end to end; a plain `http://`
//! one by sending the request in absolute form to the proxy.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::ProviderError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Tcp = TokioIo<TcpStream>;

#[derive(Clone)]
pub(crate) enum Connector {
    Direct(HttpsConnector<HttpConnector>),
    /// `CONNECT` through a proxy, then TLS to the provider.
    Tunnel(HttpsConnector<Tunnel<HttpConnector>>),
    /// Plain HTTP to a forward proxy.
    Forward {
        http: HttpConnector,
        proxy: Uri,
    },
}

/// Where requests to `dst` go, and the `Proxy-Authorization` value each
/// request must carry (forward proxying only; a tunnel sends it once, in
/// its `CONNECT`).
pub(crate) struct Route {
    pub connector: Connector,
    pub proxy_authorization: Option<HeaderValue>,
    /// The proxy, without credentials, for the startup log.
    pub via: Option<String>,
}

/// Whether calls to `base_url` can be routed: a proxy the environment names
/// for it (`HTTPS_PROXY`, `ALL_PROXY`, …) must be an `http://` URL. What a
/// provider's setup would refuse, found without building the provider.
pub fn check_route(base_url: &str) -> Result<(), String> {
    let uri: Uri = base_url
        .parse()
        .map_err(|e| format!("the base URL is not a URL: {e}"))?;
    match Route::for_destination(&uri, Duration::from_secs(1)) {
        Ok(_) => Ok(()),
        // Said as the set-up error it is, not as a response not understood.
        Err(ProviderError::Protocol(message)) => Err(message),
        Err(e) => Err(e.to_string()),
    }
}

impl Route {
    pub(crate) fn for_destination(
        dst: &Uri,
        connect_timeout: Duration,
    ) -> Result<Self, ProviderError> {
        Self::with_matcher(dst, connect_timeout, &Matcher::from_env())
    }

    fn with_matcher(
        dst: &Uri,
        connect_timeout: Duration,
        matcher: &Matcher,
    ) -> Result<Self, ProviderError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let tls = |b: hyper_rustls::HttpsConnectorBuilder<
            hyper_rustls::builderstates::WantsTlsConfig,
        >| {
            b.with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
                .map_err(|e| ProviderError::Protocol(format!("setting up TLS: {e}")))
        };
        let Some(intercept) = matcher.intercept(dst) else {
            let https = tls(hyper_rustls::HttpsConnectorBuilder::new())?
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(http);
            return Ok(Self {
                connector: Connector::Direct(https),
                proxy_authorization: None,
                via: None,
            });
        };
        let proxy = intercept.uri().clone();
        if proxy.scheme_str() != Some("http") {
            return Err(ProviderError::Protocol(format!(
                "the proxy for {} must be an http:// URL (an https:// or socks proxy is not supported)",
                dst.host().unwrap_or_default()
            )));
        }
        let via = Some(format!(
            "{}:{}",
            proxy.host().unwrap_or_default(),
            proxy.port_u16().unwrap_or(80)
        ));
        let auth = intercept.basic_auth().cloned().map(|mut v| {
            v.set_sensitive(true);
            v
        });
        if dst.scheme_str() == Some("https") {
            let mut tunnel = Tunnel::new(proxy, http);
            if let Some(auth) = auth {
                tunnel = tunnel.with_auth(auth);
            }
            let https = tls(hyper_rustls::HttpsConnectorBuilder::new())?
                .https_only()
                .enable_all_versions()
                .wrap_connector(tunnel);
            return Ok(Self {
                connector: Connector::Tunnel(https),
                proxy_authorization: None,
                via,
            });
        }
        Ok(Self {
            connector: Connector::Forward { http, proxy },
            proxy_authorization: auth,
            via,
        })
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Direct(c) => c.poll_ready(cx),
            Connector::Tunnel(c) => c.poll_ready(cx),
            Connector::Forward { http, .. } => http.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Connector::Direct(c) => {
                let fut = c.call(dst);
                Box::pin(async move { fut.await.map(Conn::Maybe) })
            }
            Connector::Tunnel(c) => {
                let fut = c.call(dst);
                Box::pin(async move { fut.await.map(Conn::Maybe) })
            }
            Connector::Forward { http, proxy } => {
                let fut = http.call(proxy.clone());
                Box::pin(async move { fut.await.map(Conn::Forward).map_err(Into::into) })
            }
        }
    }
}

/// A connection to a provider, or to the forward proxy in front of it.
// One per pooled connection, never moved per request: boxing the TLS
// variant would only add an indirection to every read and write.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Conn {
    Maybe(MaybeHttpsStream<Tcp>),
    Forward(Tcp),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Maybe(s) => s.connected(),
            // Requests on it go in absolute form, as a forward proxy expects.
            Conn::Forward(s) => s.connected().proxy(true),
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Maybe(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Forward(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Maybe(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Forward(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Maybe(s) => Pin::new(s).poll_flush(cx),
            Conn::Forward(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Maybe(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Forward(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Maybe(s) => s.is_write_vectored(),
            Conn::Forward(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Maybe(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Forward(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, matcher: Matcher) -> Route {
        Route::with_matcher(&dst.parse().unwrap(), Duration::from_secs(1), &matcher).unwrap()
    }

    #[test]
    fn the_environment_decides_direct_tunnel_or_forward() {
        let m = || {
            Matcher::builder()
                .http("http://user:pw@proxy.local:3128")
                .https("http://proxy.local:3129")
                .no("internal.example, 10.0.0.0/8")
                .build()
        };
        let r = route("https://api.openai.com/v1", m());
        assert!(matches!(r.connector, Connector::Tunnel(_)));
        assert_eq!(r.via.as_deref(), Some("proxy.local:3129"));
        assert!(r.proxy_authorization.is_none());

        let r = route("http://api.deepinfra.com/v1", m());
        assert!(matches!(r.connector, Connector::Forward { .. }));
        let auth = r.proxy_authorization.unwrap();
        assert!(auth.is_sensitive());
        assert_eq!(auth, "Basic dXNlcjpwdw==");

        assert!(matches!(
            route("https://internal.example/v1", m()).connector,
            Connector::Direct(_)
        ));
        assert!(matches!(
            route("http://10.1.2.3:8000/v1", m()).connector,
            Connector::Direct(_)
        ));
        assert!(matches!(
            route("https://api.openai.com/v1", Matcher::builder().build()).connector,
            Connector::Direct(_)
        ));
    }

    #[test]
    fn an_https_proxy_is_refused_with_a_clear_error() {
        let m = Matcher::builder().https("https://proxy.local:443").build();
        let err = Route::with_matcher(
            &"https://api.openai.com/v1".parse().unwrap(),
            Duration::from_secs(1),
            &m,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("must be an http:// URL"), "{err}");
    }

    #[tokio::test]
    async fn an_https_provider_is_reached_through_a_connect_tunnel_with_credentials() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = format!("http://alice:s3cret@{}", listener.local_addr().unwrap());
        let seen = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            sock.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let r = route(
            "https://api.openai.com/v1",
            Matcher::builder().https(proxy).build(),
        );
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, http_body_util::Empty<bytes::Bytes>>(r.connector);
        let err = client
            .get("https://api.openai.com/v1/models".parse().unwrap())
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        let request = seen.await.unwrap();
        assert!(
            request.starts_with("CONNECT api.openai.com:443 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request
                .to_ascii_lowercase()
                .contains("proxy-authorization: basic ywxpy2u6cznjcmv0"),
            "{request}"
        );
    }
}
