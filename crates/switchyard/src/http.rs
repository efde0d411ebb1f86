//! The HTTP server loop: `axum::serve`'s, with the timeouts it lacks.
//!
//! `axum::serve` gives hyper no timer, so a client could hold a connection
//! (a task and a socket) forever by sending a request's headers a byte at a
//! time, or nothing at all. Here every HTTP/1 connection must deliver each
//! request's headers within `server.read_timeout_secs` of the server being
//! ready to read them (an idle keep-alive connection is closed after as
//! long), and a new connection must send its first byte within as long
//! (before it, hyper reads the first bytes to tell HTTP/1 from HTTP/2 with
//! no timer of its own); the body's own bound is in
//! `server::extract::read_body`.

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
        let io = FirstByteDeadline {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(read_timeout))),
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

/// A connection that fails its reads with `TimedOut` if its first byte has
/// not come by the deadline; from the first byte on, it is the connection
/// as it is (one branch a read).
struct FirstByteDeadline<I> {
    io: I,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstByteDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.deadline = None;
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

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstByteDeadline<I> {
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
