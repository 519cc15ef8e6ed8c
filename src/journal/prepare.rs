//! The next segment's preallocation as a task the caller runs, so the journal starts no thread
//! of its own: production hands the task to a thread (see `server::prealloc`), the simulator
//! runs it at a step it chooses, and a journal without a runner prepares at rotation.
//!
//! A task is shared between the journal and its runner. Whoever comes first runs it: the
//! runner (paced, cancellable), or the journal at rotation when the runner has not started it
//! yet (unpaced, without waiting for anyone). If the runner is running it, rotation waits for
//! it to finish.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::segment::{self, Pacing, Prepared};
use super::storage::Storage;

/// Runs preallocation tasks somewhere other than the journal's commit path.
pub trait Background: Send + Sync + fmt::Debug {
    /// Called once per task, on the journal's thread; must not run the task inline (the
    /// journal would prepare a segment it does not need yet on its commit path).
    fn start(&self, task: PrepareTask);
}

struct Job {
    storage: Storage,
    dir: PathBuf,
    capacity: u64,
}

enum State {
    Waiting(Job),
    Running,
    Done(io::Result<Prepared>),
    Taken,
}

struct Shared {
    state: Mutex<State>,
    finished: Condvar,
    cancel: AtomicBool,
}

/// One preallocation of the next segment.
#[derive(Clone)]
pub struct PrepareTask(Arc<Shared>);

impl fmt::Debug for PrepareTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrepareTask")
    }
}

impl PrepareTask {
    pub(crate) fn new(storage: Storage, dir: PathBuf, capacity: u64) -> PrepareTask {
        PrepareTask(Arc::new(Shared {
            state: Mutex::new(State::Waiting(Job { storage, dir, capacity })),
            finished: Condvar::new(),
            cancel: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a plain enum; a panic elsewhere does not leave it half-written.
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the task if nobody has yet, calling `pause` after every paced sync. Returns
    /// whether it ran here. A segment prepared after the journal let go of it is removed.
    pub fn run(&self, pause: &mut dyn FnMut()) -> bool {
        let job = {
            let mut state = self.lock();
            match std::mem::replace(&mut *state, State::Running) {
                State::Waiting(job) => job,
                other => {
                    *state = other;
                    return false;
                }
            }
        };
        let mut pacing = Pacing { cancel: &self.0.cancel, pause };
        let result = segment::prepare(&job.storage, &job.dir, job.capacity, Some(&mut pacing));
        if let Err(e) = &result {
            // Said now, not only at rotation: a full disk shows here first, while the active
            // segment still has room and the operator can still free space.
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(dir = %job.dir.display(), error = %e, "cannot preallocate the next journal segment; the shard stops when its active segment is full unless space is freed");
            }
        }
        let mut state = self.lock();
        if self.0.cancel.load(Ordering::Acquire) {
            if let Ok(prepared) = &result {
                let _ = job.storage.remove(&prepared.tmp_path);
            }
            *state = State::Taken;
        } else {
            *state = State::Done(result);
        }
        self.0.finished.notify_all();
        true
    }

    /// The journal's side at rotation: the prepared segment, running the task here if the
    /// runner has not started it, waiting for the runner if it has.
    pub(crate) fn take(&self) -> Option<io::Result<Prepared>> {
        let mut state = self.lock();
        loop {
            match std::mem::replace(&mut *state, State::Taken) {
                State::Waiting(job) => {
                    drop(state);
                    return Some(segment::prepare(&job.storage, &job.dir, job.capacity, None));
                }
                State::Running => {
                    *state = State::Running;
                    state = self.0.finished.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                State::Done(result) => return Some(result),
                State::Taken => return None,
            }
        }
    }

    /// The journal lets go of the task (it is dropped): a waiting task never runs, a running
    /// one stops at its next step, and a finished one's segment is removed.
    pub(crate) fn cancel(&self, storage: &Storage) {
        self.0.cancel.store(true, Ordering::Release);
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Running => *state = State::Running,
            State::Done(Ok(prepared)) => {
                let _ = storage.remove(&prepared.tmp_path);
            }
            State::Waiting(_) | State::Done(Err(_)) | State::Taken => {}
        }
    }
}

/// A [`Background`] that only collects tasks; the owner runs them when it likes with
/// [`ManualBackground::run_all`] (the simulator, and tests of the hand-over).
#[derive(Debug, Default)]
pub struct ManualBackground {
    tasks: Mutex<Vec<PrepareTask>>,
}

impl ManualBackground {
    pub fn new() -> ManualBackground {
        ManualBackground::default()
    }

    /// Runs every collected task that nobody has run yet, without pauses; returns how many ran.
    pub fn run_all(&self) -> usize {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        tasks.iter().filter(|t| t.run(&mut || {})).count()
    }

    /// Tasks collected and not yet run or dropped.
    pub fn queued(&self) -> usize {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Background for ManualBackground {
    fn start(&self, task: PrepareTask) {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(task);
    }
}
