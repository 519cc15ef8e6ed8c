//! The production write-behind: a thread per shard that runs the sealed chunks against sled,
//! so the shard thread never waits on sled except when the bounded queue is full. The engine
//! only describes the work ([`PersistJob`]); the thread lives here, at the edge.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::Sender;

use crate::engine::persister::{PersistError, PersistJob, WriteBehind, PERSIST_QUEUE};

/// Longest a drain (shutdown, checkpoint) waits for sled before it is an error: a few chunks
/// take well under a second, so two minutes means sled is stuck.
const DRAIN_WAIT: Duration = Duration::from_secs(120);
/// Pause between two looks at the thread's progress during a drain.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// Runs a shard's persist jobs on a thread named `persist-<shard>`, in order.
pub struct ThreadWriteBehind {
    queue: Option<Sender<PersistJob>>,
    /// Highest seq the thread has applied.
    finished: Arc<AtomicU64>,
    /// Set if a sled write failed (fail-stop); the thread stops there.
    error: Arc<Mutex<Option<sled::Error>>>,
    /// Highest seq handed to the thread.
    submitted: u64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadWriteBehind {
    pub fn start(shard: u16) -> std::io::Result<ThreadWriteBehind> {
        let (queue, jobs) = crossbeam::channel::bounded::<PersistJob>(PERSIST_QUEUE);
        let finished = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (thread_finished, thread_error) = (finished.clone(), error.clone());
        let thread =
            std::thread::Builder::new().name(format!("persist-{shard}")).spawn(move || {
                for job in jobs {
                    match job.run() {
                        Ok(seq) => thread_finished.store(seq, Ordering::Release),
                        Err(e) => {
                            // The mutex only carries this one message; poisoning cannot hide it.
                            if let Ok(mut slot) = thread_error.lock() {
                                *slot = Some(e);
                            }
                            return;
                        }
                    }
                }
            })?;
        Ok(ThreadWriteBehind {
            queue: Some(queue),
            finished,
            error,
            submitted: 0,
            thread: Some(thread),
        })
    }

    fn failure(&self) -> Option<PersistError> {
        if let Some(e) = self.error.lock().ok().and_then(|slot| slot.clone()) {
            return Some(PersistError::Sled(e));
        }
        // The thread only ends early by dying (the queue is still open): fail-stop too.
        self.thread.as_ref().is_some_and(|t| t.is_finished()).then_some(PersistError::Stopped)
    }
}

impl WriteBehind for ThreadWriteBehind {
    fn submit(&mut self, job: PersistJob) -> Result<(), PersistError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let seq = job.last_seq();
        let queue = self.queue.as_ref().ok_or(PersistError::Stopped)?;
        if queue.send(job).is_err() {
            return Err(self.failure().unwrap_or(PersistError::Stopped));
        }
        self.submitted = self.submitted.max(seq);
        Ok(())
    }

    fn finished(&mut self) -> Result<u64, PersistError> {
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(self.finished.load(Ordering::Acquire)),
        }
    }

    fn drain(&mut self) -> Result<(), PersistError> {
        // Bounded: the thread holds at most PERSIST_QUEUE batches; a stuck sled shows as an
        // error rather than a hang.
        let started = Instant::now();
        while self.finished()? < self.submitted {
            if started.elapsed() >= DRAIN_WAIT {
                return Err(PersistError::Stuck { waited_ms: DRAIN_WAIT.as_millis() as u64 });
            }
            std::thread::sleep(DRAIN_POLL);
        }
        Ok(())
    }
}

impl Drop for ThreadWriteBehind {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
