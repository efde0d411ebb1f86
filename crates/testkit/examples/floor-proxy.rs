//! `floor-proxy`: the cheapest proxies this stack can build, to measure what
//! a gateway cannot go below on this machine (`bench/floor.sh`).
//!
//! * `--mode hyper`: axum's server and hyper-util's pooled client (the parts
//!   Switchyard is built from), with nothing between them: no config, no
//!   parsing, no logs, no usage rows. The response body is relayed as it
//!   arrives.
//! * `--mode raw`: no HTTP library. Each client connection gets its own
//!   upstream connection; a request's head is read up to its blank line, its
//!   `Content-Length` body after it, and both are written upstream unchanged;
//!   the response is relayed the same way (`Content-Length` or chunked). It
//!   understands only what `wrk` and the mock send, which is the point: it
//!   is the proxy an HTTP stack with no generality at all would be.
//!
//! `/health` answers 200 in both modes, so the benchmark scripts can wait
//! for it. Not a product: a measuring stick.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18091")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:18090")]
    upstream: SocketAddr,
    /// `hyper` or `raw`.
    #[arg(long, default_value = "hyper")]
    mode: String,
    /// Tokio worker threads; 0 runs everything on the main thread
    /// (`current_thread`).
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() {
    let args = Args::parse();
    let mut rt = if args.threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let rt = rt.enable_all().build().unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen).await.unwrap();
        match args.mode.as_str() {
            "hyper" => hyper_mode(listener, args.upstream).await,
            "raw" => raw_mode(listener, args.upstream).await,
            "hyper-raw-client" => hyper_raw_client_mode(listener, args.upstream).await,
            other => panic!("unknown --mode {other}: hyper or raw"),
        }
    });
}

struct Hyper {
    client: Client<HttpConnector, Body>,
    base: String,
}

async fn hyper_mode(listener: TcpListener, upstream: SocketAddr) {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let state = Arc::new(Hyper {
        client: Client::builder(TokioExecutor::new()).build(http),
        base: format!("http://{upstream}"),
    });
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .fallback(forward)
        .with_state(state);
    serve_axum(listener, app).await;
}

/// axum's server on `listener`, with `TCP_NODELAY` on accepted sockets.
async fn serve_axum(listener: TcpListener, app: Router) {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.unwrap();
}

async fn forward(State(s): State<Arc<Hyper>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut up = http::Request::builder()
        .method(parts.method)
        .uri(format!("{}{path}", s.base));
    for name in [CONTENT_TYPE, CONTENT_LENGTH] {
        if let Some(v) = parts.headers.get(&name) {
            up = up.header(name, v);
        }
    }
    let up = up.body(body).unwrap();
    match s.client.request(up).await {
        Ok(resp) => resp.map(Body::new).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

/// axum's server, and an upstream client with no HTTP library: a pool of
/// keep-alive connections, each owned by one request at a time (no
/// connection task, no channel between the request and its connection).
struct RawClient {
    idle: std::sync::Mutex<Vec<Conn>>,
    upstream: SocketAddr,
}

async fn hyper_raw_client_mode(listener: TcpListener, upstream: SocketAddr) {
    let state = Arc::new(RawClient {
        idle: std::sync::Mutex::new(Vec::new()),
        upstream,
    });
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .fallback(forward_raw)
        .with_state(state);
    serve_axum(listener, app).await;
}

async fn forward_raw(State(s): State<Arc<RawClient>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = format!(
        "{} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        parts.method,
        s.upstream,
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let pooled = s.idle.lock().unwrap().pop();
    let mut u = match pooled {
        Some(u) => u,
        None => Conn::new(TcpStream::connect(s.upstream).await.unwrap()),
    };
    u.tcp.write_all(&request).await.unwrap();
    let head = u.head().await.unwrap();
    let body =
        if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            // Whole, for this measuring stick: the phases it runs in are not streaming.
            let mut raw = Vec::new();
            loop {
                let line = loop {
                    if let Some(i) = u.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    u.fill().await.unwrap();
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&u.buf[..line]).unwrap().trim(), 16)
                        .unwrap();
                let chunk = u.exact(line + 2 + size + 2).await.unwrap();
                raw.extend_from_slice(&chunk[line + 2..line + 2 + size]);
                if size == 0 {
                    break raw;
                }
            }
        } else {
            let len = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            u.exact(len).await.unwrap()
        };
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    s.idle.lock().unwrap().push(u);
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    if let Some(ct) =
        header(&head, "content-type").and_then(|v| http::HeaderValue::from_str(v).ok())
    {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    }
    resp
}

async fn raw_mode(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = raw_connection(client, upstream).await;
        });
    }
}

/// A buffered reader over one socket: the bytes read but not yet used.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(tcp: TcpStream) -> Self {
        let _ = tcp.set_nodelay(true);
        Self {
            tcp,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// A message head, up to and including its blank line.
    async fn head(&mut self) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(self.buf.drain(..i + 4).collect());
            }
            self.fill().await?;
        }
    }

    /// Exactly `n` bytes.
    async fn exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// A chunked body, relayed chunk by chunk to `out` as it arrives.
    async fn relay_chunked(&mut self, out: &mut TcpStream) -> std::io::Result<()> {
        loop {
            let line = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill().await?;
            };
            let size = std::str::from_utf8(&self.buf[..line])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or(std::io::ErrorKind::InvalidData)?;
            let chunk = self.exact(line + 2 + size + 2).await?;
            out.write_all(&chunk).await?;
            if size == 0 {
                return Ok(());
            }
        }
    }
}

fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head).ok()?.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn raw_connection(client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut down = Conn::new(client);
    let mut up: Option<Conn> = None;
    loop {
        let head = down.head().await?;
        if head.starts_with(b"GET /health ") {
            down.tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await?;
            continue;
        }
        let len = header(&head, "content-length").map_or(Ok(0), str::parse::<usize>);
        let body = down
            .exact(len.map_err(|_| std::io::ErrorKind::InvalidData)?)
            .await?;
        let u = match &mut up {
            Some(u) => u,
            None => up.insert(Conn::new(TcpStream::connect(upstream).await?)),
        };
        let mut request = head;
        request.extend_from_slice(&body);
        u.tcp.write_all(&request).await?;
        let head = u.head().await?;
        if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            down.tcp.write_all(&head).await?;
            u.relay_chunked(&mut down.tcp).await?;
        } else {
            let len = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut response = head;
            response.extend_from_slice(&u.exact(len).await?);
            down.tcp.write_all(&response).await?;
        }
    }
}
