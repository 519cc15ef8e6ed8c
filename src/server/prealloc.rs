//! The production runner of journal segment preallocation: a short-lived thread per segment,
//! pausing between paced syncs so the live segment's group commits are not queued behind a
//! 64 MiB flush. The journal itself starts no thread (see `journal::prepare`).

use std::sync::Arc;
use std::time::Duration;

use crate::journal::{Background, PrepareTask};

/// Pause after each paced sync of a preallocation (every `PACED_SYNC_BYTES`, 1 MiB): long
/// enough that the disk serves a live commit in between, short enough that a 64 MiB segment
/// is ready in well under a second.
const PACED_PAUSE: Duration = Duration::from_millis(2);

/// Runs each task on its own thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct Threads;

/// The runner the server gives every journal.
pub fn threads() -> Arc<dyn Background> {
    Arc::new(Threads)
}

impl Background for Threads {
    fn start(&self, task: PrepareTask) {
        let spawned =
            std::thread::Builder::new().name("journal-prealloc".into()).spawn(move || {
                task.run(&mut || std::thread::sleep(PACED_PAUSE));
            });
        if let Err(e) = spawned {
            // The journal prepares the segment itself at rotation.
            tracing::warn!(error = %e, "cannot spawn segment preallocation thread");
        }
    }
}
