//! The persister: the thread that applies sealed chunks to sled in order, and takes the
//! checkpoints (flush sled, write the checkpoint, archive the segments below it) once sled holds
//! them. The shard thread hands it work through a bounded queue and never waits on sled except
//! when that queue is full.

use std::path::PathBuf;
use std::sync::Arc;

use super::checkpoint::Checkpoint;
use super::StoreError;

/// Sealed chunks waiting for the persister; a full queue makes the shard wait (back-pressure
/// keeps the overlay bounded if sled falls behind).
pub(super) const PERSIST_QUEUE: usize = 2;

/// One sealed chunk for the persister, and the checkpoint to take once sled holds it.
pub(super) struct PersistJob {
    pub(super) batch: sled::Batch,
    pub(super) last_seq: u64,
    pub(super) checkpoint: Option<Checkpoint>,
}

/// Where the persister writes checkpoints and archives segments.
#[derive(Clone)]
pub(super) struct CheckpointPlace {
    pub(super) shard_dir: PathBuf,
    pub(super) journal_dir: PathBuf,
    pub(super) archive_dir: PathBuf,
}

impl CheckpointPlace {
    /// Flushes sled (so the state on disk is at or past the checkpoint), writes the checkpoint,
    /// then archives the segments below it. A failure here loses nothing (the journal is the
    /// truth and the previous checkpoint stays valid), so it is logged and retried at the next
    /// checkpoint instead of stopping the server.
    pub(super) fn take(&self, db: &sled::Db, index: u16, checkpoint: &Checkpoint) {
        if let Err(e) = db.flush() {
            tracing::error!(shard = index, error = %e, "state flush for a checkpoint failed");
            return;
        }
        if let Err(e) = checkpoint.store(&self.shard_dir) {
            tracing::error!(shard = index, path = %self.shard_dir.display(), error = %e, "writing the checkpoint failed");
            return;
        }
        crate::metrics::METRICS.checkpoint(checkpoint.seq);
        match crate::journal::archive_below(&self.journal_dir, &self.archive_dir, checkpoint.seq) {
            Ok(0) => {}
            Ok(moved) => tracing::info!(
                shard = index,
                segments = moved,
                archive = %self.archive_dir.display(),
                checkpoint_seq = checkpoint.seq,
                "archived journal segments below the checkpoint"
            ),
            Err(e) => {
                tracing::error!(shard = index, error = %e, "archiving journal segments failed")
            }
        }
    }
}

pub(super) struct Persister {
    pub(super) queue: Option<crossbeam::channel::Sender<PersistJob>>,
    /// Highest seq sled has applied.
    pub(super) done: Arc<std::sync::atomic::AtomicU64>,
    /// Set if a sled write failed (fail-stop).
    pub(super) error: Arc<std::sync::Mutex<Option<sled::Error>>>,
    /// The sled directory, for error messages.
    pub(super) state_dir: PathBuf,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl Persister {
    pub(super) fn start(
        db: sled::Db,
        index: u16,
        applied: u64,
        state_dir: PathBuf,
        place: CheckpointPlace,
    ) -> Result<Persister, StoreError> {
        let (queue, jobs) = crossbeam::channel::bounded::<PersistJob>(PERSIST_QUEUE);
        let done = Arc::new(std::sync::atomic::AtomicU64::new(applied));
        let error = Arc::new(std::sync::Mutex::new(None));
        let (thread_done, thread_error) = (done.clone(), error.clone());
        let thread = std::thread::Builder::new()
            .name(format!("persist-{index}"))
            .spawn(move || {
                for PersistJob { batch, last_seq, checkpoint } in jobs {
                    match db.apply_batch(batch) {
                        Ok(()) => {
                            thread_done.store(last_seq, std::sync::atomic::Ordering::Release);
                            if let Some(checkpoint) = checkpoint {
                                place.take(&db, index, &checkpoint);
                            }
                        }
                        Err(e) => {
                            // The mutex only carries this one message; poisoning cannot hide it.
                            if let Ok(mut slot) = thread_error.lock() {
                                *slot = Some(e);
                            }
                            return;
                        }
                    }
                }
            })
            .map_err(|source| StoreError::Io { path: PathBuf::from("persister thread"), source })?;
        Ok(Persister { queue: Some(queue), done, error, state_dir, thread: Some(thread) })
    }

    pub(super) fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(super) fn check(&self) -> Result<(), StoreError> {
        match self.error.lock().ok().and_then(|slot| slot.clone()) {
            Some(e) => Err(super::recovery::write_error(e, &self.state_dir)),
            // The thread only ends early by dying (the queue is still open): fail-stop too.
            None if self.thread.as_ref().is_some_and(|t| t.is_finished()) => {
                Err(StoreError::State("persister thread died".into()))
            }
            None => Ok(()),
        }
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
