//! A small HTTP/1.1 client for providers reached over plain `http://` with
//! no proxy in between (a model server on the same host or network, a
//! sidecar, the benchmark's mock).
//!
//! hyper's pooled client gives every connection a task of its own and hands
//! each request to it over a channel, and the response back the same way:
//! two task wake-ups per exchange on top of the socket's. Here the request
//! that takes a connection from the pool does the I/O itself, writes its
//! head and body in one `write`, parses the answer with `httparse`, and puts
//! the connection back when the body has been read to its end. On this
//! machine that is the largest part of what hyper's client costs (see
//! `docs/BENCHMARKS.md`, "An upstream client of our own").
//!
//! What it understands: `Content-Length` and `chunked` bodies (chunk
//! extensions and trailers are skipped), bodies that end with the
//! connection, `1xx` interim answers (skipped), `Connection: close`, and
//! HTTP/1.0 answers (never reused). A connection is reused only after its
//! body was read to the end; one dropped earlier is closed. An idle
//! connection the provider has closed is noticed when it is taken (a read
//! that finds the end of the stream) and replaced.

use std::future::poll_fn;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 128;
/// Largest chunk-size line (with extensions) or trailer section accepted.
const MAX_LINE: usize = 8 * 1024;
/// Idle connections kept per provider.
const MAX_IDLE: usize = 512;
/// An idle connection older than this is closed instead of reused: shorter
/// than the keep-alive timeout of the usual servers (5 s for uvicorn, which
/// vLLM and most Python model servers run on, and for Node), so that a
/// connection is rarely reused just as its server closes it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// A reused connection closed unanswered within this time of the request's
/// write is taken for one the provider closed as the request went out (its
/// keep-alive timeout crossing our reuse), and the request is sent again.
const REPLAY_WINDOW: Duration = Duration::from_millis(50);
/// Bodies up to this size are copied behind the head, to go in one write.
const COALESCE_MAX: usize = 64 * 1024;

/// Connections to one `host:port`.
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    /// What `TcpStream::connect` is given: `host:port`.
    authority: String,
    /// The `Host` header's value.
    host: HeaderValue,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

struct Conn {
    tcp: TcpStream,
    /// Bytes read and not yet used.
    buf: BytesMut,
    /// Whether anything of the current answer has been read.
    received: bool,
}

/// How an exchange failed: with nothing at all back from the provider
/// (the request may be sent again on a new connection when this one was
/// reused), or otherwise.
enum Failed {
    Unanswered(Error),
    Other(Error),
}

impl From<Failed> for Error {
    fn from(f: Failed) -> Self {
        match f {
            Failed::Unanswered(e) | Failed::Other(e) => e,
        }
    }
}

/// Why an exchange failed, for the caller's error mapping.
#[derive(Debug)]
pub(crate) enum Error {
    /// No answer was received: the connection could not be made, or was
    /// lost before the answer's head was complete.
    Connect(String),
    /// The answer's head could not be understood.
    Protocol(String),
}

/// An answer whose body is still to be read.
pub(crate) struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Body,
}

/// How the end of a body is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// `chunked`, at a chunk-size line.
    ChunkSize,
    /// `chunked`, inside a chunk with this many bytes left.
    ChunkData(u64),
    /// `chunked`, at the CRLF after a chunk's data.
    ChunkEnd,
    /// `chunked`, after the last chunk: trailer lines up to an empty one.
    Trailers,
    /// Until the connection ends.
    Eof,
    /// The body has been read.
    Done,
}

/// A response body being read. Dropping it before its end closes the
/// connection; reading it to the end returns the connection to the pool.
pub(crate) struct Body {
    conn: Option<Conn>,
    framing: Framing,
    /// The connection may carry another request after this body.
    reusable: bool,
    pool: Arc<PoolInner>,
}

impl Pool {
    /// A pool for `uri`'s host and port (`http://` only).
    pub(crate) fn new(uri: &Uri, connect_timeout: Duration) -> Option<Self> {
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?;
        // `user:pass@` is not part of the Host header.
        let host_port = authority
            .as_str()
            .rsplit_once('@')
            .map_or(authority.as_str(), |(_, h)| h);
        let port = authority.port_u16().unwrap_or(80);
        let host = HeaderValue::from_str(host_port).ok()?;
        Some(Self {
            inner: Arc::new(PoolInner {
                authority: format!("{}:{port}", authority.host()),
                host,
                connect_timeout,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Sends one request and reads the answer's head. `headers` must not
    /// hold `Host`, `Content-Length` or `Transfer-Encoding`; they are set
    /// here.
    pub(crate) async fn send(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Response, Error> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let (request, coalesced) = encode_request(method, path, &self.inner.host, headers, body);
        let body_apart = (!coalesced).then_some(body);
        let (conn, head) = match self.inner.checkout() {
            Some(mut conn) => match conn.exchange(method, &request, body_apart).await {
                Ok(head) => (conn, head),
                // A kept-alive connection that the provider closed as the
                // request went out (its idle timeout crossed our reuse):
                // nothing came back, so it is sent once more on a new
                // connection, as HTTP clients do, rather than reported as
                // the provider's failure.
                Err(Failed::Unanswered(e)) => {
                    tracing::debug!(error = ?e, "a reused connection was closed; sending again on a new one");
                    // Not an attempt of the router's (no retry budget, no
                    // breaker): counted, since a provider that closed after
                    // reading the request has received it twice.
                    metrics::counter!("switchyard_upstream_resends_total").increment(1);
                    let mut conn = self.inner.connect().await?;
                    let head = conn.exchange(method, &request, body_apart).await?;
                    (conn, head)
                }
                Err(Failed::Other(e)) => return Err(e),
            },
            None => {
                let mut conn = self.inner.connect().await?;
                let head = conn.exchange(method, &request, body_apart).await?;
                (conn, head)
            }
        };
        let mut body = Body {
            conn: Some(conn),
            framing: head.framing,
            reusable: head.reusable,
            pool: self.inner.clone(),
        };
        if body.framing == Framing::Length(0) {
            body.finish();
        }
        Ok(Response {
            status: head.status,
            headers: head.headers,
            body,
        })
    }
}

/// The request head, with the body behind it when it is small (then the
/// flag is true and one write sends both).
fn encode_request(
    method: &Method,
    path: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    body: &[u8],
) -> (Vec<u8>, bool) {
    let coalesce = body.len() <= COALESCE_MAX;
    let mut out = Vec::with_capacity(256 + if coalesce { body.len() } else { 0 });
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || *method == Method::POST || *method == Method::PUT {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if coalesce {
        out.extend_from_slice(body);
    }
    (out, coalesce)
}

impl PoolInner {
    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let idle = self.idle.lock().ok()?.pop()?;
            if idle.since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            let mut probe = [0u8; 1];
            match idle.conn.tcp.try_read(&mut probe) {
                // Nothing to read: the connection is open and quiet.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(idle.conn),
                // Closed by the provider (0), bytes nobody asked for, or an
                // error: not usable.
                _ => continue,
            }
        }
    }

    fn checkin(&self, conn: Conn) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        // The oldest entry is at the front: close it once it has expired,
        // so a pool that shrinks after a burst does not keep its sockets.
        if idle
            .first()
            .is_some_and(|oldest| oldest.since.elapsed() > IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(Error::Connect(format!("tcp connect error: {e}"))),
            Err(_) => {
                return Err(Error::Connect(format!(
                    "tcp connect timed out after {:?}",
                    self.connect_timeout
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        Ok(Conn {
            tcp,
            buf: BytesMut::with_capacity(8 * 1024),
            received: false,
        })
    }
}

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    reusable: bool,
}

impl Conn {
    /// Reads more bytes into `buf`; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            if self.buf.capacity() - self.buf.len() < 4 * 1024 {
                self.buf.reserve(16 * 1024);
            }
            match self.tcp.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => {
                    self.received |= matches!(r, Ok(n) if n > 0);
                    return Poll::Ready(r);
                }
            }
        }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Writes a request (`body` when it did not go with the head) and
    /// reads the answer's head.
    async fn exchange(
        &mut self,
        method: &Method,
        request: &[u8],
        body: Option<&[u8]>,
    ) -> Result<Head, Failed> {
        self.received = false;
        let sent = async {
            self.tcp.write_all(request).await?;
            if let Some(body) = body {
                self.tcp.write_all(body).await?;
            }
            Ok::<_, io::Error>(())
        }
        .await;
        if let Err(e) = sent {
            return Err(Failed::Unanswered(Error::Connect(format!(
                "sending the request: {e}"
            ))));
        }
        let sent_at = Instant::now();
        self.read_head(method).await.map_err(|e| match e {
            // Closed with nothing back, right after the request went out:
            // the provider's close crossed it. Later, the provider may have
            // read the request and worked on it (then died): sending it
            // again would be billed twice, so that is the router's to judge.
            Error::Connect(_)
                if self.buf.is_empty() && !self.received && sent_at.elapsed() < REPLAY_WINDOW =>
            {
                Failed::Unanswered(e)
            }
            e => Failed::Other(e),
        })
    }

    /// The answer's head (after any `1xx` interim answers).
    async fn read_head(&mut self, method: &Method) -> Result<Head, Error> {
        loop {
            if !self.buf.is_empty() {
                if let Some((used, head)) = parse_head(&self.buf, method)? {
                    self.buf.advance(used);
                    match head {
                        Some(head) => return Ok(head),
                        None => continue, // 1xx
                    }
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(Error::Protocol(format!(
                        "the provider's response head is over {MAX_HEAD} bytes"
                    )));
                }
            }
            match self.fill().await {
                Ok(0) if self.buf.is_empty() => {
                    return Err(Error::Connect(
                        "connection closed before a response was received".into(),
                    ))
                }
                Ok(0) => {
                    return Err(Error::Connect(
                        "connection closed in the middle of the response head".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(Error::Connect(format!("reading the response: {e}"))),
            }
        }
    }
}

/// Parses a complete head at the start of `buf`: `None` when more bytes are
/// needed, `Some((bytes used, None))` for a `1xx` answer to skip.
fn parse_head(buf: &[u8], method: &Method) -> Result<Option<(usize, Option<Head>)>, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let used = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(Error::Protocol(format!(
                "the provider's response head is not valid HTTP/1.1: {e}"
            )))
        }
    };
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| Error::Protocol(format!("the provider answered with status {code}")))?;
    if status.is_informational() {
        if code == 101 {
            return Err(Error::Protocol(
                "the provider switched protocols, which was not asked for".into(),
            ));
        }
        return Ok(Some((used, None)));
    }
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut close = parsed.version != Some(1);
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Protocol("a header name in the response is not valid".into()))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Error::Protocol(format!("the response's {name} header is not valid")))?;
        if name == http::header::CONTENT_LENGTH {
            let n = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Error::Protocol("bad Content-Length in the response".into()))?;
            if length.is_some_and(|m| m != n) {
                return Err(Error::Protocol(
                    "conflicting Content-Length values in the response".into(),
                ));
            }
            length = Some(n);
        } else if name == http::header::TRANSFER_ENCODING {
            encoded = true;
            // Only the last coding says how the body ends.
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == http::header::CONNECTION {
            close |= value
                .to_str()
                .ok()
                .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        }
        headers.append(name, value);
    }
    let framing = if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Length(0)
    } else if encoded {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), and
        // a message carrying both must not be followed on its connection.
        if length.is_some() {
            close = true;
        }
        if chunked {
            Framing::ChunkSize
        } else {
            Framing::Eof
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Eof
    };
    let reusable = !close && framing != Framing::Eof;
    Ok(Some((
        used,
        Some(Head {
            status,
            headers,
            framing,
            reusable,
        }),
    )))
}

fn broken(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// What the buffered bytes of a body give.
enum Step {
    Data(Bytes),
    End,
    /// More bytes must be read.
    NeedMore,
}

impl Body {
    /// The next piece of the body; `None` at its end. An error means the
    /// body is incomplete.
    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let r = self.poll_inner(cx);
        if let Poll::Ready(Err(_)) = r {
            // An incomplete body leaves the connection in an unknown state.
            self.conn = None;
            self.framing = Framing::Done;
        }
        r
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            match self.advance()? {
                Step::Data(data) => return Poll::Ready(Ok(Some(data))),
                Step::End => return Poll::Ready(Ok(None)),
                Step::NeedMore => {}
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(Ok(None));
            };
            match ready!(conn.poll_fill(cx))? {
                0 if self.framing == Framing::Eof => {
                    self.framing = Framing::Done;
                    self.conn = None;
                    return Poll::Ready(Ok(None));
                }
                0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed before the response body ended",
                    )))
                }
                _ => {}
            }
        }
    }

    /// Moves through the body as far as the bytes already read allow.
    fn advance(&mut self) -> io::Result<Step> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(Step::End);
            };
            match self.framing {
                Framing::Done => return Ok(Step::End),
                Framing::Length(left) | Framing::ChunkData(left) => {
                    if conn.buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = conn
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = conn.buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.framing = match self.framing {
                        Framing::Length(_) => Framing::Length(left),
                        _ if left == 0 => Framing::ChunkEnd,
                        _ => Framing::ChunkData(left),
                    };
                    if self.framing == Framing::Length(0) {
                        // The connection is free now, whether or not the
                        // caller asks for the end.
                        self.finish();
                    }
                    return Ok(Step::Data(data));
                }
                Framing::Eof => {
                    if conn.buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(conn.buf.split().freeze()));
                }
                Framing::ChunkSize => {
                    let Some(end) = memchr::memmem::find(&conn.buf, b"\r\n") else {
                        if conn.buf.len() > MAX_LINE {
                            return Err(broken("chunk-size line too long"));
                        }
                        return Ok(Step::NeedMore);
                    };
                    let line = &conn.buf[..end];
                    let digits = line
                        .iter()
                        .position(|b| *b == b';')
                        .map_or(line, |i| &line[..i]);
                    // `1*HEXDIG`, then only the whitespace allowed before a
                    // `;` extension (RFC 9112 §7.1): no sign, no leading space.
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .map(|s| s.trim_end_matches([' ', '\t']))
                        .filter(|s| {
                            !s.is_empty()
                                && s.len() <= 16
                                && s.bytes().all(|b| b.is_ascii_hexdigit())
                        })
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| broken("bad chunk size in the response body"))?;
                    conn.buf.advance(end + 2);
                    self.framing = if size == 0 {
                        Framing::Trailers
                    } else {
                        Framing::ChunkData(size)
                    };
                }
                Framing::ChunkEnd => {
                    if conn.buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &conn.buf[..2] != b"\r\n" {
                        return Err(broken("a chunk did not end with CRLF"));
                    }
                    conn.buf.advance(2);
                    self.framing = Framing::ChunkSize;
                }
                Framing::Trailers => {
                    let Some(end) = memchr::memmem::find(&conn.buf, b"\r\n") else {
                        if conn.buf.len() > MAX_LINE {
                            return Err(broken("trailer section too long"));
                        }
                        return Ok(Step::NeedMore);
                    };
                    conn.buf.advance(end + 2);
                    if end == 0 {
                        self.finish();
                        return Ok(Step::End);
                    }
                    // A trailer field: skipped.
                }
            }
        }
    }

    /// The body has ended: the connection goes back to the pool if it can
    /// carry another request and nothing follows the body.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take() {
            if self.reusable && conn.buf.is_empty() {
                self.pool.checkin(conn);
            }
        }
    }
}

impl Drop for Body {
    /// A reader that stops at the last event it wanted (an SSE stream's
    /// `[DONE]`) usually leaves only the body's terminating chunk behind,
    /// already read: the body is finished from the buffer, so the connection
    /// is reused rather than closed. Anything that needs more reading closes
    /// it.
    fn drop(&mut self) {
        while let Ok(Step::Data(_)) = self.advance() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server that answers each request, on whichever connection it
    /// comes, with the next of `answers`, written in pieces of `piece`
    /// bytes (closing the connection after each answer if `close_after`),
    /// and records how many connections it accepted and the requests it
    /// read.
    async fn server(
        answers: Vec<&'static [u8]>,
        piece: usize,
        close_after: bool,
    ) -> (Uri, Arc<Mutex<(usize, Vec<Vec<u8>>)>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new((0usize, Vec::new())));
        let record = seen.clone();
        let queue = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                record.lock().unwrap().0 += 1;
                let record = record.clone();
                let queue = queue.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: a head, and its Content-Length body.
                        let request = loop {
                            let mut chunk = [0u8; 4096];
                            let n = tcp.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                                let len = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                                if buf.len() >= i + 4 + len {
                                    break buf.drain(..i + 4 + len).collect::<Vec<u8>>();
                                }
                            }
                        };
                        record.lock().unwrap().1.push(request);
                        let Some(answer) = queue.lock().unwrap().pop_front() else {
                            return;
                        };
                        for p in answer.chunks(piece) {
                            tcp.write_all(p).await.unwrap();
                            tcp.flush().await.unwrap();
                            tokio::task::yield_now().await;
                        }
                        if close_after {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/v1/x").parse().unwrap(), seen)
    }

    async fn read_all(body: &mut Body) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = poll_fn(|cx| body.poll_chunk(cx)).await? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    /// POSTs `body` with [`headers`]; the exchange must succeed.
    async fn post(pool: &Pool, uri: &Uri, body: &[u8]) -> Response {
        pool.send(&Method::POST, uri, &headers(), body)
            .await
            .unwrap()
    }

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer k"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h
    }

    /// A provider whose keep-alive timeout fires as a reused connection's
    /// request arrives: it reads the request and closes without a word. The
    /// request goes again on a new connection; the caller sees one answer.
    /// One that closes only after working on it a while is not sent it again.
    #[tokio::test]
    async fn a_reused_connection_closed_unanswered_is_replaced_once() {
        let (connections, requests) = close_on_reuse(Duration::ZERO, 3).await;
        assert_eq!(
            (connections, requests),
            (3, 5),
            "each reuse met a close and was sent again on a new connection"
        );
        let (connections, requests) = close_on_reuse(Duration::from_millis(300), 2).await;
        assert_eq!(
            (connections, requests),
            (1, 2),
            "a close long after the request is the provider's failure, not replayed"
        );
    }

    /// A server answering the first request of each connection and closing
    /// it `after` the second arrives; sends `sends` requests (with a delay,
    /// the ones after the first fail) and returns the connections and
    /// requests it saw.
    async fn close_on_reuse(after: Duration, sends: usize) -> (usize, usize) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new((0usize, 0usize)));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                record.lock().unwrap().0 += 1;
                let record = record.clone();
                tokio::spawn(async move {
                    // Answers the first request of a connection; closes it
                    // at the second.
                    for answered in [true, false] {
                        let mut buf = Vec::new();
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 4096];
                            let n = tcp.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        record.lock().unwrap().1 += 1;
                        if !answered {
                            tokio::time::sleep(after).await;
                            return;
                        }
                        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        let uri: Uri = format!("http://{addr}/v1/x").parse().unwrap();
        let pool = Pool::new(&uri, Duration::from_secs(1)).unwrap();
        for i in 0..sends {
            match pool.send(&Method::GET, &uri, &headers(), b"").await {
                Ok(mut resp) => {
                    assert_eq!(resp.status, StatusCode::OK);
                    assert_eq!(read_all(&mut resp.body).await.unwrap(), b"ok");
                }
                Err(e) => assert!(i > 0 && !after.is_zero(), "{i}: {e:?}"),
            }
        }
        let seen = *seen.lock().unwrap();
        seen
    }

    #[tokio::test]
    async fn content_length_and_chunked_bodies_in_any_pieces_reuse_one_connection() {
        let answers: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 2\r\n\r\n{}",
        ];
        for piece in [1, 7, 4096] {
            let (uri, seen) = server(answers.clone(), piece, false).await;
            let pool = Pool::new(&uri, Duration::from_secs(2)).unwrap();
            let mut r = post(&pool, &uri, b"{\"a\":1}").await;
            assert_eq!(r.status, 200);
            assert_eq!(r.headers["x-a"], "1");
            assert_eq!(read_all(&mut r.body).await.unwrap(), b"hello");
            let mut r = post(&pool, &uri, b"{}").await;
            assert_eq!(r.status, 201);
            assert_eq!(read_all(&mut r.body).await.unwrap(), b"abc0123456789abcdef");
            let mut r = pool
                .send(&Method::GET, &uri, &HeaderMap::new(), b"")
                .await
                .unwrap();
            assert_eq!(r.status, 204);
            assert!(read_all(&mut r.body).await.unwrap().is_empty());
            let mut r = post(&pool, &uri, b"x").await;
            assert_eq!(r.status, 429);
            assert_eq!(r.headers["retry-after"], "2");
            assert_eq!(read_all(&mut r.body).await.unwrap(), b"{}");
            let seen = seen.lock().unwrap();
            assert_eq!(
                seen.0, 1,
                "one connection for four exchanges (piece {piece})"
            );
            let first = String::from_utf8(seen.1[0].clone()).unwrap();
            assert_eq!(
                first,
                format!(
                    "POST /v1/x HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer k\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{{\"a\":1}}",
                    uri.authority().unwrap()
                )
            );
            let get = String::from_utf8(seen.1[2].clone()).unwrap();
            assert!(
                get.starts_with("GET /v1/x HTTP/1.1\r\n") && !get.contains("content-length"),
                "{get}"
            );
        }
    }

    #[tokio::test]
    async fn a_closing_answer_is_not_reused_and_a_closed_idle_connection_is_replaced() {
        // Each connection serves one answer and is then closed by the server.
        let answers: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nb",
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nd",
        ];
        let (uri, seen) = server(answers, 4096, true).await;
        let pool = Pool::new(&uri, Duration::from_secs(2)).unwrap();
        let mut r = post(&pool, &uri, b"1").await;
        assert_eq!(read_all(&mut r.body).await.unwrap(), b"a");
        // The first connection went back to the pool and the server closed
        // it: let the close arrive, then the next request must not use it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut r = post(&pool, &uri, b"2").await;
        assert_eq!(read_all(&mut r.body).await.unwrap(), b"b");
        let mut r = post(&pool, &uri, b"3").await;
        assert_eq!(read_all(&mut r.body).await.unwrap(), b"until the end");
        let mut r = post(&pool, &uri, b"4").await;
        assert_eq!(read_all(&mut r.body).await.unwrap(), b"d");
        assert_eq!(seen.lock().unwrap().0, 4);
        assert!(pool.inner.idle.lock().unwrap().len() <= 1);
    }

    #[tokio::test]
    async fn cut_and_malformed_answers_are_errors() {
        let cases: Vec<(&'static [u8], &str)> = vec![
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                "body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                "body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "body",
            ),
            // A sign or a leading space is not a chunk size (RFC 9112 §7.1).
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+2\r\nab\r\n0\r\n\r\n",
                "body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 2\r\nab\r\n0\r\n\r\n",
                "body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\na",
                "head",
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "head"),
            (b"NOT HTTP\r\n\r\n", "head"),
            (b"HTTP/1.1 200 OK\r\nContent-", "closed"),
            (b"", "closed"),
        ];
        for (answer, kind) in cases {
            let (uri, _) = server(vec![answer], 4096, true).await;
            let pool = Pool::new(&uri, Duration::from_secs(2)).unwrap();
            let sent = pool.send(&Method::POST, &uri, &headers(), b"{}").await;
            let what = String::from_utf8_lossy(answer);
            match (kind, sent) {
                ("body", Ok(mut r)) => {
                    assert!(read_all(&mut r.body).await.is_err(), "{what}");
                }
                ("head", Err(Error::Protocol(_))) | ("closed", Err(Error::Connect(_))) => {}
                (_, other) => panic!("{what}: {kind} expected, got {:?}", other.map(|r| r.status)),
            }
            assert!(pool.inner.idle.lock().unwrap().is_empty(), "{what}");
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection_unless_only_the_end_was_left() {
        let answers: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nd",
        ];
        let (uri, seen) = server(answers, 4096, false).await;
        let pool = Pool::new(&uri, Duration::from_secs(2)).unwrap();
        let mut r = post(&pool, &uri, b"{}").await;
        let first = poll_fn(|cx| r.body.poll_chunk(cx)).await.unwrap();
        assert_eq!(first.as_deref(), Some(&b"a"[..]));
        drop(r);
        assert!(pool.inner.idle.lock().unwrap().is_empty());
        let mut r = post(&pool, &uri, b"{}").await;
        assert_eq!(read_all(&mut r.body).await.unwrap(), b"b");
        assert_eq!(seen.lock().unwrap().0, 2);
        // Dropped after its last data, with only the terminating chunk left
        // (already read, in one piece with the rest): the body is finished
        // from the buffer and the connection reused.
        let mut r = post(&pool, &uri, b"{}").await;
        let first = poll_fn(|cx| r.body.poll_chunk(cx)).await.unwrap();
        assert_eq!(first.as_deref(), Some(&b"c"[..]));
        drop(r);
        assert_eq!(pool.inner.idle.lock().unwrap().len(), 1);
        let mut r = post(&pool, &uri, b"{}").await;
        assert_eq!(read_all(&mut r.body).await.unwrap(), b"d");
        assert_eq!(seen.lock().unwrap().0, 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(listener);
        let pool = Pool::new(&uri, Duration::from_secs(2)).unwrap();
        let err = pool
            .send(&Method::GET, &uri, &HeaderMap::new(), b"")
            .await
            .err();
        assert!(matches!(err, Some(Error::Connect(m)) if m.contains("tcp connect error")));
        assert!(Pool::new(
            &"https://example.com/".parse().unwrap(),
            Duration::from_secs(1)
        )
        .is_none());
    }
}
