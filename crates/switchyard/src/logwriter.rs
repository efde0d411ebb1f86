//! Where log lines go: request threads append each formatted line to a shared
//! buffer, and one thread writes the buffer to stdout at most every
//! [`FLUSH_EVERY`] (sooner when it grows large). A request never waits on a
//! `write` syscall, and, unlike a channel with a consumer woken per line, a
//! busy server pays no thread wake-up per log line.
//!
//! If stdout cannot keep up and [`MAX_BUFFERED`] bytes are waiting, further
//! lines are dropped and counted (`switchyard_log_lines_dropped_total`), so a
//! blocked log pipe costs log lines, never memory or request latency.
//! Dropping the [`LogFlushGuard`] writes whatever is buffered.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a line waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// A buffer this large is written at once.
const WAKE_AT: usize = 256 * 1024;
/// Beyond this, lines are dropped until the writer catches up.
const MAX_BUFFERED: usize = 16 * 1024 * 1024;

struct Shared {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    stop: AtomicBool,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buf.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `io::Write` handed to the log formatter; cheap to clone.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

/// Flushes and stops the writer thread when dropped.
pub struct LogFlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn spawn<W: Write + Send + 'static>(out: W) -> (LogSink, LogFlushGuard) {
    let shared = Arc::new(Shared {
        buf: Mutex::new(Vec::with_capacity(64 * 1024)),
        wake: Condvar::new(),
        stop: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || run(&shared, out))
            .ok()
    };
    if thread.is_none() {
        eprintln!("switchyard: cannot start the log writer thread; logs are off");
        shared.stop.store(true, Ordering::Relaxed);
    }
    (
        LogSink {
            shared: shared.clone(),
        },
        LogFlushGuard { shared, thread },
    )
}

fn run<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::with_capacity(64 * 1024);
    loop {
        {
            let mut buf = shared.lock();
            while buf.is_empty() && !shared.stop.load(Ordering::Acquire) {
                buf = shared
                    .wake
                    .wait(buf)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if buf.is_empty() {
                return; // stopping, nothing left
            }
            if buf.len() < WAKE_AT && !shared.stop.load(Ordering::Acquire) {
                // Let lines gather; a large buffer or a stop ends the wait early.
                buf = shared
                    .wake
                    .wait_timeout(buf, FLUSH_EVERY)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut *buf, &mut spare);
        }
        // Nothing to do if stdout is gone; the lines are lost either way.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
    }
}

impl Write for LogSink {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = &*self.shared;
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(line.len());
        }
        let mut buf = shared.lock();
        if buf.len() + line.len() > MAX_BUFFERED {
            drop(buf);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("switchyard_log_lines_dropped_total").increment(1);
            return Ok(line.len());
        }
        let was_empty = buf.is_empty();
        buf.extend_from_slice(line);
        let wake = was_empty || buf.len() >= WAKE_AT;
        drop(buf);
        if wake {
            shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogSink {
    /// Lines dropped because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for LogFlushGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that appends to a shared vector, for inspection.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_and_the_guard_flushes_the_rest() {
        let out = Capture::default();
        let (sink, guard) = spawn(out.clone());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let mut sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        sink.write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(sink.dropped(), 0);
    }

    #[test]
    fn lines_reach_the_output_without_a_flush_within_the_interval() {
        let out = Capture::default();
        let (mut sink, _guard) = spawn(out.clone());
        sink.write_all(b"hello\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&out.0.lock().unwrap()[..], b"hello\n");
    }

    #[test]
    fn a_blocked_output_drops_and_counts_lines_instead_of_growing() {
        /// An output that blocks until released.
        struct Blocked(Arc<(Mutex<bool>, Condvar)>);
        impl Write for Blocked {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let (lock, cv) = &*self.0;
                let mut open = lock.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (mut sink, guard) = spawn(Blocked(gate.clone()));
        let line = vec![b'x'; 1024];
        // The first write is taken by the (now blocked) writer thread; then
        // the buffer fills to MAX_BUFFERED and the rest are dropped.
        for _ in 0..(MAX_BUFFERED / 1024) * 3 {
            sink.write_all(&line).unwrap();
        }
        assert!(sink.dropped() > 0);
        assert!(sink.shared.lock().len() <= MAX_BUFFERED);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
    }
}
