//! The sled write-behind as work the driver runs: a sealed chunk is a [`PersistJob`] (one sled
//! batch and perhaps a checkpoint), and a [`WriteBehind`] decides where and when it runs. The
//! engine owns no thread: [`Inline`] runs each job at once, [`Stepped`] queues jobs until the
//! driver calls [`Shard::persist_step`](super::Shard::persist_step) (a deterministic simulator
//! lets sled lag behind the journal that way), and the server's worker supplies one that runs
//! them on its own thread (`server::write_behind`).

use std::collections::VecDeque;
use std::path::PathBuf;

use super::checkpoint::Checkpoint;

/// Sealed chunks a write-behind may hold before `submit` waits (or runs the oldest): the
/// back-pressure that keeps the overlay bounded when sled falls behind.
pub const PERSIST_QUEUE: usize = 2;

/// Why a write-behind could not apply a chunk. Fail-stop, like every storage error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// sled failed to apply a batch.
    #[error("sled write: {0}")]
    Sled(#[from] sled::Error),
    /// The worker running the jobs is gone (it died, or its queue was closed).
    #[error("the write-behind worker stopped")]
    Stopped,
    /// sled did not apply what was handed to it within the driver's bound.
    #[error("sled did not apply the state within {waited_ms} ms")]
    Stuck { waited_ms: u64 },
}

/// Where the checkpoints of a shard are written and its segments archived.
#[derive(Clone)]
pub struct CheckpointPlace {
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

/// One sealed chunk: the sled batch (entries' index, changed cards, applied_seq, digest), and
/// the checkpoint to take once sled holds it. Jobs of one shard must run in the order sealed.
pub struct PersistJob {
    pub(super) db: sled::Db,
    pub(super) shard: u16,
    pub(super) batch: sled::Batch,
    pub(super) last_seq: u64,
    pub(super) checkpoint: Option<(Checkpoint, CheckpointPlace)>,
}

impl PersistJob {
    /// The highest journal seq this chunk holds.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Applies the batch to sled, then takes the checkpoint if one is due. Returns the chunk's
    /// last seq. Err is fail-stop (the caller must not run later jobs of the shard).
    pub fn run(self) -> Result<u64, sled::Error> {
        self.db.apply_batch(self.batch)?;
        if let Some((checkpoint, place)) = self.checkpoint {
            place.take(&self.db, self.shard, &checkpoint);
        }
        Ok(self.last_seq)
    }
}

/// Runs a shard's sealed chunks against sled, in order. Implementations decide where (this
/// thread, a worker thread) and when (now, when the driver steps).
pub trait WriteBehind: Send {
    /// Takes a sealed chunk. When `PERSIST_QUEUE` chunks are already waiting it waits for (or
    /// runs) the oldest first.
    fn submit(&mut self, job: PersistJob) -> Result<(), PersistError>;
    /// The highest `last_seq` of the jobs finished so far (0 before the first), or the error
    /// that stopped them.
    fn finished(&mut self) -> Result<u64, PersistError>;
    /// Returns once every submitted job has finished.
    fn drain(&mut self) -> Result<(), PersistError>;
    /// Runs the oldest waiting job, if this write-behind waits for its driver; returns whether
    /// one ran.
    fn step(&mut self) -> Result<bool, PersistError> {
        Ok(false)
    }
}

/// Runs each job as it is submitted, on the caller's thread: deterministic, and what a start
/// (replay) and the tests use.
#[derive(Default)]
pub struct Inline {
    finished: u64,
    failed: Option<sled::Error>,
}

impl WriteBehind for Inline {
    fn submit(&mut self, job: PersistJob) -> Result<(), PersistError> {
        if let Some(e) = &self.failed {
            return Err(PersistError::Sled(e.clone()));
        }
        match job.run() {
            Ok(seq) => {
                self.finished = self.finished.max(seq);
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e.clone());
                Err(PersistError::Sled(e))
            }
        }
    }

    fn finished(&mut self) -> Result<u64, PersistError> {
        match &self.failed {
            Some(e) => Err(PersistError::Sled(e.clone())),
            None => Ok(self.finished),
        }
    }

    fn drain(&mut self) -> Result<(), PersistError> {
        self.finished().map(|_| ())
    }
}

/// Holds jobs until the driver steps them (or until the queue is full, or a drain): for a
/// single-threaded driver that wants sled to lag behind the journal at chosen points.
#[derive(Default)]
pub struct Stepped {
    waiting: VecDeque<PersistJob>,
    inline: Inline,
}

impl WriteBehind for Stepped {
    fn submit(&mut self, job: PersistJob) -> Result<(), PersistError> {
        while self.waiting.len() >= PERSIST_QUEUE {
            self.step()?;
        }
        self.waiting.push_back(job);
        Ok(())
    }

    fn finished(&mut self) -> Result<u64, PersistError> {
        self.inline.finished()
    }

    fn drain(&mut self) -> Result<(), PersistError> {
        while self.step()? {}
        self.inline.drain()
    }

    fn step(&mut self) -> Result<bool, PersistError> {
        match self.waiting.pop_front() {
            Some(job) => self.inline.submit(job).map(|()| true),
            None => Ok(false),
        }
    }
}
