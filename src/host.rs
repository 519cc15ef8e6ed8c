//! The real world for the engine's edges: the system clock and real pauses. The engine takes
//! time and waiting as arguments ([`crate::engine::recovery::OpenHost`]); this is what the
//! server, the command-line tools and the tests that want the real thing pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::recovery::OpenHost;
use crate::engine::{OpenReport, Secrets, Shard, ShardOptions, StoreError};

/// Longest wait for sled's file lock of a database this process closed a moment ago: sled
/// releases it from background threads shortly after the last handle is dropped.
pub const SLED_LOCK_WAIT: Duration = Duration::from_secs(3);
/// Pause between two attempts to take that lock.
pub const SLED_LOCK_RETRY: Duration = Duration::from_millis(50);

/// The system clock, and `thread::sleep` while sled's lock is held (at most
/// [`SLED_LOCK_WAIT`] per open).
#[derive(Default)]
pub struct SystemHost {
    /// When the current wait for sled's lock began.
    lock_wait_started: Option<Instant>,
}

impl OpenHost for SystemHost {
    fn now_ms(&mut self) -> u64 {
        crate::now_ms()
    }

    fn lock_busy(&mut self, attempt: u32) -> bool {
        let started = match self.lock_wait_started {
            Some(started) if attempt > 1 => started,
            _ => *self.lock_wait_started.insert(Instant::now()),
        };
        if started.elapsed() >= SLED_LOCK_WAIT {
            return false;
        }
        std::thread::sleep(SLED_LOCK_RETRY);
        true
    }
}

impl Shard {
    /// [`Shard::open_with`] on the real clock, waiting for sled's lock as [`SystemHost`] does.
    pub fn open(
        options: ShardOptions,
        secrets: Arc<Secrets>,
    ) -> Result<(Shard, OpenReport), StoreError> {
        Shard::open_with(options, secrets, &mut SystemHost::default())
    }
}
