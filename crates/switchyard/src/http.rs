//! The HTTP server loop: `axum::serve`'s, with the timeouts it lacks.
//!
//! `axum::serve` gives hyper no timer, so a client could hold a connection
//! (a task and a socket) forever by sending a request's headers a byte at a
//! time, or nothing at all. Here, within `server.read_timeout_secs`:
//!
//! * a new connection must say which HTTP it speaks: hyper reads its first
//!   bytes (up to the 24 of HTTP/2's preface) with no timer of its own, so
//!   [`VersionDeadline`] bounds that read;
//! * an HTTP/1 connection must deliver each request's headers, counted
//!   from when the server is ready to read them (so an idle keep-alive
//!   connection is closed after as long);
//! * an HTTP/2 connection must answer a ping sent after as long without a
//!   frame (a silent or vanished peer is closed; an idle one that answers
//!   is kept, as HTTP/2 clients expect of a connection they multiplex on).
//!
//! A request's body has its own bound, in `server::extract::read_body`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::ServiceExt as _;

/// Serves `router` on `listener` until `signal` resolves, then waits for
/// the connections open to finish their requests (each is told to close
/// once its request in flight is answered).
pub(crate) async fn serve<L>(
    mut listener: L,
    router: axum::Router,
    read_timeout: Duration,
    signal: impl Future<Output = ()> + Send,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(read_timeout)
        .keep_alive_timeout(read_timeout);
    let graceful = GracefulShutdown::new();
    let mut signal = std::pin::pin!(signal);
    loop {
        let (io, peer) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut signal => break,
        };
        // What `into_make_service_with_connect_info` gives: the peer's
        // address in every request.
        let service = tower::Layer::layer(&axum::Extension(ConnectInfo(peer)), router.clone())
            .map_request(|req: axum::http::Request<hyper::body::Incoming>| {
                req.map(axum::body::Body::new)
            });
        let io = VersionDeadline {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(read_timeout))),
            preface_seen: 0,
        };
        let conn = builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// HTTP/2's connection preface: hyper-util reads a new connection until its
/// bytes leave this, or all 24 have come, to choose HTTP/1 or HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection whose reads fail with `TimedOut` past the deadline until
/// hyper-util's version check can end: a byte that leaves HTTP/2's preface
/// (HTTP/1: hyper's own header timeout takes over), or the whole preface
/// (HTTP/2: its keep-alive pings do). From then on it is the connection as
/// it is (one branch a read).
struct VersionDeadline<I> {
    io: I,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How many bytes of the preface have come, while they match it.
    preface_seen: usize,
}

impl<I> VersionDeadline<I> {
    /// Notes bytes read; the deadline goes once the version is decided.
    fn saw(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if H2_PREFACE.get(self.preface_seen) != Some(&b) {
                self.deadline = None;
                return;
            }
            self.preface_seen += 1;
            if self.preface_seen == H2_PREFACE.len() {
                self.deadline = None;
                return;
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for VersionDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if this.deadline.is_some() {
                    this.saw(&buf.filled()[before..]);
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let passed = this
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if passed {
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for VersionDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched() -> VersionDeadline<()> {
        VersionDeadline {
            io: (),
            deadline: None,
            preface_seen: 0,
        }
    }

    /// The deadline stays while the bytes could still be HTTP/2's preface,
    /// and goes at the first that cannot, or at its end.
    #[tokio::test]
    async fn the_version_deadline_goes_once_the_version_is_decided() {
        let armed = || {
            let mut v = watched();
            v.deadline = Some(Box::pin(tokio::time::sleep(Duration::from_secs(60))));
            v
        };
        let mut v = armed();
        v.saw(b"P");
        assert!(v.deadline.is_some(), "`P` may begin either");
        v.saw(b"RI * HTTP/2.0\r\n");
        assert!(v.deadline.is_some(), "still the preface");
        v.saw(b"\r\nSM\r\n\r\n");
        assert!(v.deadline.is_none(), "the whole preface: HTTP/2");

        let mut v = armed();
        v.saw(b"P");
        v.saw(b"O");
        assert!(
            v.deadline.is_none(),
            "`PO`: HTTP/1, hyper's timer takes over"
        );

        let mut v = armed();
        v.saw(b"GET / HTTP/1.1\r\n");
        assert!(v.deadline.is_none());
    }
}
