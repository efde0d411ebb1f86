//! The batched asynchronous writers of usage rows and trace events.
//! Requests hand rows to a bounded channel and never wait on the database;
//! one task writes them in batches. When the channel is full the row is
//! dropped and counted, so a slow database shows up in a metric instead of
//! in request latency. On shutdown the task drains the channel before the
//! process exits.
//!
//! On a multi-threaded runtime the task runs on a thread of its own
//! (`sy-usage-writer`, `sy-event-writer`), not on a runtime worker: a
//! SQLite group is a synchronous stretch of up to a few milliseconds (see
//! `switchyard_store::sqlite_inline`), and on a worker it would hold up
//! every task queued behind it. The thread's name also lets an operator or
//! a benchmark give it a CPU of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::config::UsageConfig;
use switchyard_core::sessions::EventsRow;
use switchyard_core::usage::UsageRecord;
use switchyard_store::{Store, StoreError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A kind of row written in batches, with its metric names.
#[async_trait]
pub trait Row: Send + Sync + 'static + Sized {
    /// For log lines: `usage rows`, `trace events`.
    const WHAT: &'static str;
    /// The writer's name in log lines: `usage`, `events`.
    const NAME: &'static str;
    /// The writer thread's name (at most 15 bytes, Linux's limit).
    const THREAD: &'static str;
    const WRITTEN_METRIC: &'static str;
    const DROPPED_METRIC: &'static str;
    async fn write(store: &dyn Store, rows: &[Self]) -> Result<(), StoreError>;
}

#[async_trait]
impl Row for UsageRecord {
    const WHAT: &'static str = "usage rows";
    const NAME: &'static str = "usage";
    const THREAD: &'static str = "sy-usage-writer";
    const WRITTEN_METRIC: &'static str = "switchyard_usage_written_total";
    const DROPPED_METRIC: &'static str = "switchyard_usage_dropped_total";
    async fn write(store: &dyn Store, rows: &[Self]) -> Result<(), StoreError> {
        store.insert_usage(rows).await
    }
}

#[async_trait]
impl Row for EventsRow {
    const WHAT: &'static str = "trace events";
    const NAME: &'static str = "events";
    const THREAD: &'static str = "sy-event-writer";
    const WRITTEN_METRIC: &'static str = "switchyard_events_written_total";
    const DROPPED_METRIC: &'static str = "switchyard_events_dropped_total";
    async fn write(store: &dyn Store, rows: &[Self]) -> Result<(), StoreError> {
        store.insert_events(rows).await
    }
}

/// The usage writer.
pub type UsageWriter = BatchWriter<UsageRecord>;
/// The usage writer's task.
pub type UsageWriterTask = BatchWriterTask;
/// The `bus_events` writer.
pub type EventWriter = BatchWriter<EventsRow>;

/// The sending side, cheap to clone into every request.
pub struct BatchWriter<T> {
    tx: Option<mpsc::Sender<T>>,
    stats: Arc<Stats>,
}

impl<T> Clone for BatchWriter<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            stats: self.stats.clone(),
        }
    }
}

#[derive(Default)]
struct Stats {
    dropped: AtomicU64,
    written: AtomicU64,
}

/// The writing task; [`BatchWriterTask::shutdown`] flushes what is queued.
pub struct BatchWriterTask {
    stop: Option<oneshot::Sender<()>>,
    /// When set, the time by which the loop ends, writes in flight included.
    deadline: watch::Sender<Option<Instant>>,
    join: Option<Running>,
}

/// Where the writing loop runs.
enum Running {
    Task(JoinHandle<()>),
    /// On a thread of its own; the receiver resolves when the loop ends
    /// (and fails if the thread panicked).
    Thread(oneshot::Receiver<()>),
}

/// Runs `fut` on a thread named `name` when the current runtime is
/// multi-threaded (the thread drives it with the runtime's handle, so its
/// timers and sockets are the runtime's), else as a task.
fn start(name: &str, fut: impl std::future::Future<Output = ()> + Send + 'static) -> Running {
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Running::Task(tokio::spawn(fut));
    }
    let (done_tx, done_rx) = oneshot::channel();
    // The future moves into the thread only if the thread starts; if it
    // cannot, the slot still holds it and it runs as a task instead.
    let slot = Arc::new(std::sync::Mutex::new(Some(fut)));
    let theirs = slot.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let fut = theirs.lock().ok().and_then(|mut f| f.take());
            if let Some(fut) = fut {
                handle.block_on(fut);
                let _ = done_tx.send(());
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a writer thread; writing on the runtime");
        if let Some(fut) = slot.lock().ok().and_then(|mut f| f.take()) {
            return Running::Task(tokio::spawn(fut));
        }
    }
    Running::Thread(done_rx)
}

const WRITE_ATTEMPTS: u32 = 3;

impl<T: Row> BatchWriter<T> {
    /// Starts the writer task on the current runtime.
    pub fn spawn(store: Arc<dyn Store>, config: &UsageConfig) -> (Self, BatchWriterTask) {
        let stats = Arc::new(Stats::default());
        if !config.enabled {
            let writer = Self { tx: None, stats };
            return (
                writer,
                BatchWriterTask {
                    stop: None,
                    deadline: watch::Sender::new(None),
                    join: None,
                },
            );
        }
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (deadline_tx, deadline_rx) = watch::channel(None);
        let join = start(
            T::THREAD,
            run(
                store,
                rx,
                stop_rx,
                deadline_rx,
                config.batch_size,
                Duration::from_millis(config.flush_interval_ms),
                stats.clone(),
            ),
        );
        (
            Self {
                tx: Some(tx),
                stats,
            },
            BatchWriterTask {
                stop: Some(stop_tx),
                deadline: deadline_tx,
                join: Some(join),
            },
        )
    }

    /// Queues a row; never waits. A full queue drops the row and counts it.
    pub fn record(&self, row: T) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(row).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(T::DROPPED_METRIC).increment(1);
        }
    }

    /// Whether rows are written at all.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Rows waiting to be written.
    pub fn queue_depth(&self) -> usize {
        self.tx
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.stats.written.load(Ordering::Relaxed)
    }
}

impl BatchWriterTask {
    /// Stops accepting rows, writes every queued row, and returns.
    pub async fn shutdown(self) {
        self.stop(None).await;
    }

    /// [`BatchWriterTask::shutdown`], done within `within`: a write still
    /// running then (one started before the shutdown too) is abandoned, no
    /// failed write is tried again past it, and the rows not written are
    /// dropped and counted. A server's shutdown must end in bounded time
    /// whatever the database does: an orchestrator kills it after its own
    /// grace period, and then every row still queued is lost unreported.
    pub async fn shutdown_within(self, within: Duration) {
        self.stop(Some(Instant::now() + within)).await;
    }

    async fn stop(mut self, deadline: Option<Instant>) {
        if deadline.is_some() {
            self.deadline.send_replace(deadline);
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.join.take() {
            Some(Running::Task(join)) => {
                if let Err(e) = join.await {
                    tracing::error!(error = %e, "a batch writer task failed");
                }
            }
            Some(Running::Thread(done)) => {
                // The sender is dropped unsent only if the thread panicked.
                if let Err(e) = done.await {
                    tracing::error!(error = %e, "a batch writer thread failed");
                }
            }
            None => {}
        }
    }
}

async fn run<T: Row>(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<T>,
    mut stop: oneshot::Receiver<()>,
    mut deadline: watch::Receiver<Option<Instant>>,
    batch_size: usize,
    flush_interval: Duration,
    stats: Arc<Stats>,
) {
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            n = rx.recv_many(&mut batch, batch_size) => {
                if n == 0 {
                    break; // every sender is gone
                }
                // Let a burst gather into one transaction, unless stopping.
                if batch.len() < batch_size {
                    tokio::select! {
                        biased;
                        _ = &mut stop => {
                            write(&*store, &mut batch, &stats, &mut deadline).await;
                            break;
                        }
                        _ = tokio::time::sleep(flush_interval) => {}
                    }
                    while batch.len() < batch_size {
                        match rx.try_recv() {
                            Ok(row) => batch.push(row),
                            Err(_) => break,
                        }
                    }
                }
                write(&*store, &mut batch, &stats, &mut deadline).await;
            }
        }
    }
    rx.close();
    while rx.recv_many(&mut batch, batch_size).await > 0 {
        write(&*store, &mut batch, &stats, &mut deadline).await;
    }
    write(&*store, &mut batch, &stats, &mut deadline).await;
    tracing::info!(
        written = stats.written.load(Ordering::Relaxed),
        dropped = stats.dropped.load(Ordering::Relaxed),
        "{} writer flushed",
        T::NAME
    );
}

/// Writes `batch`, retrying a failure twice; by the shutdown deadline, once
/// one is set (even while a write runs), or the rows are dropped and counted.
async fn write<T: Row>(
    store: &dyn Store,
    batch: &mut Vec<T>,
    stats: &Stats,
    deadline: &mut watch::Receiver<Option<Instant>>,
) {
    if batch.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=WRITE_ATTEMPTS {
        let outcome = tokio::select! {
            biased;
            r = T::write(store, batch) => Some(r),
            () = reached(deadline) => None,
        };
        let Some(outcome) = outcome else {
            tracing::error!(
                rows = batch.len(),
                "writing {} did not finish by the shutdown deadline; dropping them",
                T::WHAT
            );
            break;
        };
        let may_retry = attempt < WRITE_ATTEMPTS
            && (*deadline.borrow()).is_none_or(|d| Instant::now() + delay < d);
        match outcome {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                metrics::counter!(T::WRITTEN_METRIC).increment(batch.len() as u64);
                batch.clear();
                return;
            }
            Err(e) if may_retry => {
                tracing::warn!(error = %e, attempt, rows = batch.len(), "writing {} failed; retrying", T::WHAT);
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "writing {} failed; dropping them", T::WHAT);
                break;
            }
        }
    }
    stats
        .dropped
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    metrics::counter!(T::DROPPED_METRIC).increment(batch.len() as u64);
    batch.clear();
}

/// Resolves at the shutdown deadline once one is set; never before.
async fn reached(deadline: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let set = *deadline.borrow_and_update();
        if let Some(d) = set {
            return tokio::time::sleep_until(d).await;
        }
        if deadline.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::config::StoreConfig;
    use switchyard_store::{conformance::sample_usage, SqliteStore};

    async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            url: format!("sqlite://{}/u.db", dir.path().display()),
            ..StoreConfig::default()
        };
        let store = SqliteStore::connect(&config).await.unwrap();
        store.migrate().await.unwrap();
        (dir, Arc::new(store))
    }

    #[tokio::test]
    async fn shutdown_writes_every_queued_row() {
        let (_dir, store) = store().await;
        let config = UsageConfig {
            flush_interval_ms: 10_000,
            batch_size: 64,
            ..UsageConfig::default()
        };
        let (writer, task) = UsageWriter::spawn(store.clone(), &config);
        for n in 0..1000 {
            writer.record(sample_usage("t", n));
        }
        task.shutdown().await;
        assert_eq!(store.count_usage("t").await.unwrap(), 1000);
        assert_eq!(writer.written(), 1000);
        assert_eq!(writer.dropped(), 0);
    }

    /// A row whose store never answers (a database gone mid-write).
    struct Stuck;

    #[async_trait]
    impl Row for Stuck {
        const WHAT: &'static str = "stuck rows";
        const NAME: &'static str = "stuck";
        const THREAD: &'static str = "sy-stuck-writer";
        const WRITTEN_METRIC: &'static str = "test_stuck_written_total";
        const DROPPED_METRIC: &'static str = "test_stuck_dropped_total";
        async fn write(_: &dyn Store, _: &[Self]) -> Result<(), StoreError> {
            std::future::pending().await
        }
    }

    /// On a paused clock (the runtime jumps to the next timer when idle): a
    /// shutdown that waited on the stuck write would never end, and the
    /// outer timeout would fire instead.
    #[tokio::test]
    async fn a_bounded_shutdown_ends_even_while_a_write_hangs() {
        let (_dir, store) = store().await;
        tokio::time::pause();
        let config = UsageConfig {
            flush_interval_ms: 1,
            batch_size: 4,
            ..UsageConfig::default()
        };
        let (writer, task) = BatchWriter::<Stuck>::spawn(store, &config);
        for _ in 0..10 {
            writer.record(Stuck);
        }
        // The first batch is taken and its write hangs; the rest wait.
        while writer.queue_depth() > 6 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::timeout(
            Duration::from_secs(3600),
            task.shutdown_within(Duration::from_secs(5)),
        )
        .await
        .expect("the shutdown ended by its deadline");
        assert_eq!((writer.written(), writer.dropped()), (0, 10));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (_dir, store) = store().await;
        let config = UsageConfig {
            queue_capacity: 4,
            flush_interval_ms: 10_000,
            batch_size: 1000,
            ..UsageConfig::default()
        };
        let (writer, task) = UsageWriter::spawn(store.clone(), &config);
        for n in 0..10 {
            writer.record(sample_usage("t", n));
        }
        // The task may already hold some rows; the rest beyond capacity were dropped.
        assert!(writer.dropped() >= 6 - 1, "dropped {}", writer.dropped());
        task.shutdown().await;
        assert_eq!(store.count_usage("t").await.unwrap() + writer.dropped(), 10);
    }

    /// Names of this process's threads.
    #[cfg(target_os = "linux")]
    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect()
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_a_multi_threaded_runtime_the_writer_has_a_thread_of_its_own() {
        let (_dir, store) = store().await;
        let config = UsageConfig {
            flush_interval_ms: 1,
            ..UsageConfig::default()
        };
        let (writer, task) = UsageWriter::spawn(store.clone(), &config);
        for n in 0..300 {
            writer.record(sample_usage("t", n));
        }
        let named = || {
            thread_names()
                .iter()
                .filter(|n| *n == "sy-usage-writer")
                .count()
        };
        // A new thread takes its name once it runs (until then it has its parent's).
        until("the writer thread is named", || named() > 0).await;
        assert_eq!(named(), 1, "{:?}", thread_names());
        // It writes while it runs, not only at shutdown.
        until("300 rows are written", || writer.written() >= 300).await;
        writer.record(sample_usage("t", 300));
        task.shutdown().await;
        assert_eq!(store.count_usage("t").await.unwrap(), 301);
        // The thread ends with the writer.
        until("the writer thread has ended", || named() == 0).await;
    }

    /// Waits until `done()` holds, failing after 10 s.
    #[cfg(target_os = "linux")]
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[test]
    fn thread_names_fit_linux_limit_so_tools_see_them_whole() {
        for name in [UsageRecord::THREAD, EventsRow::THREAD] {
            assert!(name.len() <= 15, "{name}");
        }
        assert_ne!(UsageRecord::THREAD, EventsRow::THREAD);
    }

    #[tokio::test]
    async fn disabled_usage_records_nothing() {
        let (_dir, store) = store().await;
        let (writer, task) = UsageWriter::spawn(
            store.clone(),
            &UsageConfig {
                enabled: false,
                ..UsageConfig::default()
            },
        );
        writer.record(sample_usage("t", 1));
        task.shutdown().await;
        assert_eq!(store.count_usage("t").await.unwrap(), 0);
        assert_eq!(writer.queue_depth(), 0);
    }
}
