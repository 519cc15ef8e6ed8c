//! Fault-injection test seam for the commit path.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The error an injected fault produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A raw OS error number, e.g. `libc::ENOSPC` or `libc::EIO`.
    Os(i32),
    /// An error of this kind without an OS error number.
    Kind(io::ErrorKind),
}

impl From<i32> for Fault {
    fn from(code: i32) -> Self {
        Fault::Os(code)
    }
}

impl From<io::ErrorKind> for Fault {
    fn from(kind: io::ErrorKind) -> Self {
        Fault::Kind(kind)
    }
}

impl Fault {
    fn to_error(self) -> io::Error {
        match self {
            Fault::Os(code) => io::Error::from_raw_os_error(code),
            Fault::Kind(kind) => io::Error::new(kind, "injected fault"),
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    armed: AtomicBool,
    fault: Mutex<Option<Fault>>,
}

impl Slot {
    fn arm(&self, fault: Fault) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(fault);
        self.armed.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<io::Error> {
        // Fast path: one atomic load when nothing is armed.
        if !self.armed.load(Ordering::Acquire) || !self.armed.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).take().map(Fault::to_error)
    }
}

/// Test seam: makes the next record write or the next data sync done by
/// [`super::Journal::commit`] fail. Segment preallocation and recovery are not affected.
///
/// An injected write failure first writes the first half of the buffer (a short write, as a
/// full disk would produce) and then returns the error.
#[derive(Debug, Default)]
pub struct FaultInjector {
    write: Slot,
    sync: Slot,
    triggered: AtomicU64,
}

impl FaultInjector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next record write fails with `fault` (an `io::ErrorKind` or a raw OS error number).
    pub fn fail_next_write_with(&self, fault: impl Into<Fault>) {
        self.write.arm(fault.into());
    }

    /// The next `fdatasync` of a segment fails with `fault`.
    pub fn fail_next_sync_with(&self, fault: impl Into<Fault>) {
        self.sync.arm(fault.into());
    }

    /// How many injected faults have fired so far.
    pub fn triggered(&self) -> u64 {
        self.triggered.load(Ordering::Acquire)
    }

    pub(crate) fn take_write_fault(&self) -> Option<io::Error> {
        let e = self.write.take();
        if e.is_some() {
            self.triggered.fetch_add(1, Ordering::AcqRel);
        }
        e
    }

    pub(crate) fn take_sync_fault(&self) -> Option<io::Error> {
        let e = self.sync.take();
        if e.is_some() {
            self.triggered.fetch_add(1, Ordering::AcqRel);
        }
        e
    }
}
