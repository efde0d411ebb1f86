//! Stopping the calls in flight at the end of a shutdown's grace period,
//! cheaply enough to watch on every request and every stream chunk.
//!
//! A `CancellationToken`'s wait takes its waiter list's lock on every poll,
//! and one token is shared by every call: polled on each chunk of every
//! stream, that lock cost a third of the streaming throughput at 64
//! concurrent streams. So calls are spread over 16 child tokens (a lock of
//! their own each), and a [`StopWatch`] polls its wait only when it must
//! register a new waker; otherwise it reads the token's flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

const SHARDS: usize = 16;

/// The server's stop signal, for [`crate::Gateway::stop_calls`].
pub(crate) struct Stop {
    root: CancellationToken,
    shards: [CancellationToken; SHARDS],
    next: AtomicUsize,
}

impl Stop {
    pub(crate) fn new() -> Self {
        let root = CancellationToken::new();
        let shards = std::array::from_fn(|_| root.child_token());
        Self {
            root,
            shards,
            next: AtomicUsize::new(0),
        }
    }

    /// Stops every watch, made before or after.
    pub(crate) fn stop(&self) {
        self.root.cancel();
    }

    /// One of the child tokens, in turn: a call that waits once (not a
    /// stream) waits on it directly, without a clone or an allocation.
    pub(crate) fn shard(&self) -> &CancellationToken {
        &self.shards[self.next.fetch_add(1, Ordering::Relaxed) % SHARDS]
    }

    /// A watch for one stream.
    pub(crate) fn watch(&self) -> StopWatch {
        StopWatch {
            token: self.shard().clone(),
            wait: None,
            waker: None,
        }
    }
}

/// Whether the server has stopped waiting for one call.
pub(crate) struct StopWatch {
    token: CancellationToken,
    /// Registered with the token once polled; dropped with the watch.
    wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The waker the wait holds, so that it is polled (and its lock taken)
    /// only when the task's waker changes.
    waker: Option<Waker>,
}

impl StopWatch {
    /// True once the server stops waiting; until then, `cx`'s task is woken
    /// when it does.
    pub(crate) fn stopped(&mut self, cx: &mut Context<'_>) -> bool {
        if self.token.is_cancelled() {
            return true;
        }
        if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        let token = &self.token;
        let wait = self
            .wait
            .get_or_insert_with(|| Box::pin(token.clone().cancelled_owned()));
        if wait.as_mut().poll(cx).is_ready() {
            return true;
        }
        self.waker = Some(cx.waker().clone());
        false
    }
}

/// `fut`'s output, or `None` once the server stops waiting for it.
pub(crate) async fn unless_stopped<F: Future>(stop: &Stop, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = stop.shard().cancelled() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Poll;
    use std::time::Duration;

    #[tokio::test]
    async fn a_stop_ends_waits_and_watches_started_before_and_after_it() {
        let stop = Arc::new(Stop::new());
        let waits: Vec<_> = (0..40)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(
                    async move { unless_stopped(&stop, std::future::pending::<()>()).await },
                )
            })
            .collect();
        let mut before = stop.watch();
        let watching = std::future::poll_fn(|cx| Poll::Ready(before.stopped(cx))).await;
        assert!(!watching);
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.stop();
        for w in waits {
            assert_eq!(w.await.unwrap(), None);
        }
        let after = unless_stopped(&stop, std::future::pending::<()>()).await;
        assert_eq!(after, None);
        let mut after = stop.watch();
        for w in [&mut before, &mut after] {
            assert!(std::future::poll_fn(|cx| Poll::Ready(w.stopped(cx))).await);
        }
        // A future ready first wins.
        assert_eq!(unless_stopped(&Stop::new(), async { 7 }).await, Some(7));
    }
}
