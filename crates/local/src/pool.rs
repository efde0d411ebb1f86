//! A fixed set of worker threads with a bounded queue in front, so inference
//! never runs on the async runtime and never piles up: a job that finds the
//! queue full is refused at once and the caller answers 503 with
//! `Retry-After` (or its route falls back).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::LocalError;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    name: &'static str,
    sender: SyncSender<Job>,
    /// Jobs accepted and not yet finished (queued or running).
    in_flight: Arc<AtomicUsize>,
}

impl Pool {
    /// `workers` threads take jobs from a queue of `queue` places; a job
    /// submitted while every worker is busy and every place taken is refused.
    pub fn new(name: &'static str, workers: usize, queue: usize) -> Result<Self, LocalError> {
        let (sender, receiver) = sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..workers.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("local-{name}-{i}"))
                .spawn(move || work(&receiver))
                .map_err(|e| LocalError::Load {
                    what: "the inference threads",
                    detail: e.to_string(),
                })?;
        }
        Ok(Self {
            name,
            sender,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Queues `job`, or refuses it with [`LocalError::Busy`] when the queue
    /// is full. The job runs on a worker thread.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), LocalError> {
        let in_flight = self.in_flight.clone();
        let depth = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let name = self.name;
        metrics::gauge!("switchyard_local_in_flight", "pool" => name).set(depth as f64);
        let wrapped: Job = Box::new(move || {
            job();
            let left = in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
            metrics::gauge!("switchyard_local_in_flight", "pool" => name).set(left as f64);
        });
        match self.sender.try_send(wrapped) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let left = self.in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
                metrics::gauge!("switchyard_local_in_flight", "pool" => name).set(left as f64);
                metrics::counter!("switchyard_local_rejected_total", "pool" => name).increment(1);
                Err(LocalError::Busy)
            }
        }
    }
}

fn work(receiver: &Mutex<Receiver<Job>>) {
    loop {
        // Hold the lock only to take one job, so the other workers can take theirs.
        let job = match receiver.lock() {
            Ok(r) => r.recv(),
            Err(poisoned) => poisoned.into_inner().recv(),
        };
        match job {
            // A panic inside the engine must cost one request, not the worker.
            Ok(job) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    tracing::error!("a local inference job panicked");
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn a_full_queue_refuses_at_once_and_accepts_again_when_drained() {
        let pool = Pool::new("test", 1, 2).unwrap();
        let (release_tx, release_rx) = channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let (started_tx, started_rx) = channel::<()>();
        let (done_tx, done_rx) = channel::<u32>();
        // One running (blocked until released) and two queued fill the pool.
        for i in 0..3 {
            let release = release_rx.clone();
            let started = started_tx.clone();
            let done = done_tx.clone();
            pool.submit(move || {
                started.send(()).unwrap();
                release.lock().unwrap().recv().unwrap();
                done.send(i).unwrap();
            })
            .unwrap();
            if i == 0 {
                // The worker holds the first job before the queue fills.
                started_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            }
        }
        assert!(matches!(pool.submit(|| {}), Err(LocalError::Busy)));
        for _ in 0..3 {
            release_tx.send(()).unwrap();
        }
        let mut finished: Vec<u32> = (0..3)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        finished.sort_unstable();
        assert_eq!(finished, vec![0, 1, 2]);
        let (tx, rx) = channel();
        // The counter is decremented after the job returns: wait for it.
        for _ in 0..100 {
            if pool.in_flight.load(Ordering::Relaxed) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        pool.submit(move || tx.send(7).unwrap()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
    }

    #[test]
    fn a_panicking_job_does_not_kill_its_worker() {
        let pool = Pool::new("test", 1, 1).unwrap();
        #[allow(clippy::panic)]
        pool.submit(|| panic!("boom")).unwrap();
        let (tx, rx) = channel();
        for _ in 0..100 {
            if pool
                .submit({
                    let tx = tx.clone();
                    move || tx.send(1).unwrap()
                })
                .is_ok()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
    }
}
