//! The batched asynchronous usage writer. Requests hand rows to a bounded
//! channel and never wait on the database; one task writes them in batches.
//! When the channel is full the row is dropped and counted, so a slow
//! database shows up in a metric instead of in request latency. On shutdown
//! the task drains the channel before the process exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::config::UsageConfig;
use switchyard_core::usage::UsageRecord;
use switchyard_store::Store;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The sending side, cheap to clone into every request.
#[derive(Clone)]
pub struct UsageWriter {
    tx: Option<mpsc::Sender<UsageRecord>>,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    dropped: AtomicU64,
    written: AtomicU64,
}

/// The writing task; [`UsageWriterTask::shutdown`] flushes what is queued.
pub struct UsageWriterTask {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

const WRITE_ATTEMPTS: u32 = 3;

impl UsageWriter {
    /// Starts the writer task on the current runtime.
    pub fn spawn(store: Arc<dyn Store>, config: &UsageConfig) -> (Self, UsageWriterTask) {
        let stats = Arc::new(Stats::default());
        if !config.enabled {
            let writer = Self { tx: None, stats };
            return (
                writer,
                UsageWriterTask {
                    stop: None,
                    join: None,
                },
            );
        }
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let (stop_tx, stop_rx) = oneshot::channel();
        let join = tokio::spawn(run(
            store,
            rx,
            stop_rx,
            config.batch_size,
            Duration::from_millis(config.flush_interval_ms),
            stats.clone(),
        ));
        (
            Self {
                tx: Some(tx),
                stats,
            },
            UsageWriterTask {
                stop: Some(stop_tx),
                join: Some(join),
            },
        )
    }

    /// Queues a row; never waits. A full queue drops the row and counts it.
    pub fn record(&self, row: UsageRecord) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(row).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("switchyard_usage_dropped_total").increment(1);
        }
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

impl UsageWriterTask {
    /// Stops accepting rows, writes every queued row, and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            if let Err(e) = join.await {
                tracing::error!(error = %e, "the usage writer task failed");
            }
        }
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<UsageRecord>,
    mut stop: oneshot::Receiver<()>,
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
                            write(&*store, &mut batch, &stats).await;
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
                write(&*store, &mut batch, &stats).await;
            }
        }
    }
    rx.close();
    while rx.recv_many(&mut batch, batch_size).await > 0 {
        write(&*store, &mut batch, &stats).await;
    }
    write(&*store, &mut batch, &stats).await;
    tracing::info!(
        written = stats.written.load(Ordering::Relaxed),
        dropped = stats.dropped.load(Ordering::Relaxed),
        "usage writer flushed"
    );
}

async fn write(store: &dyn Store, batch: &mut Vec<UsageRecord>, stats: &Stats) {
    if batch.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=WRITE_ATTEMPTS {
        match store.insert_usage(batch).await {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                metrics::counter!("switchyard_usage_written_total").increment(batch.len() as u64);
                batch.clear();
                return;
            }
            Err(e) if attempt < WRITE_ATTEMPTS => {
                tracing::warn!(error = %e, attempt, rows = batch.len(), "writing usage rows failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 4;
            }
            Err(e) => {
                tracing::error!(error = %e, rows = batch.len(), "writing usage rows failed; dropping them");
            }
        }
    }
    stats
        .dropped
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    metrics::counter!("switchyard_usage_dropped_total").increment(batch.len() as u64);
    batch.clear();
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
