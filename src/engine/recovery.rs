//! Opening a shard's derived state (sled): which failures belong to the environment (stop and
//! keep the state) and which to the state itself (set it aside and rebuild it from the journal).
//!
//! The journal is the truth and sled is derived, so a state that is damaged or disagrees with
//! the journal can always be rebuilt. But a rebuild replays the whole journal (time and memory
//! grow with its length) and a failure of the disk says nothing about the data on it: a full
//! disk, an I/O error, a permission problem or a read-only filesystem stops the start with a
//! [`StoreError::Storage`] naming the path, and the state is left exactly where it is. Only a
//! state that sled opens but reports as corrupt or unsupported, that fails our own checks, or
//! that is ahead of the journal is rebuilt.
//!
//! How sled 0.34.7 reports what (checked in its `result.rs`, `config.rs` and by experiment):
//! `Error::Io` wraps the `std::io::Error` of the failing system call unchanged (ENOSPC, EIO,
//! EACCES, EROFS, ENOTDIR arrive with their OS error code), and a few of sled's own messages
//! (the file lock, "no segments remaining") are `ErrorKind::Other` without a code. A damaged
//! `conf` file is `Error::Corruption`, a `conf` from another sled version `Error::Unsupported`.
//! A damaged `db` file is mostly *not* reported at all: sled recovers the longest valid prefix
//! of its log, which may be empty; the empty state then replays the whole journal ("missing").

use std::io;
use std::path::{Path, PathBuf};

use super::error::Disagreement;
use super::StoreError;

/// sled's page cache per shard; bounds its memory, not its disk use.
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Why the derived state was rebuilt from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebuildReason {
    /// No state (directory absent, or sled holds nothing): every journal record was replayed.
    Missing,
    /// sled reported corruption (or a bug it found in its own data).
    Corrupt(String),
    /// sled refused the format (another sled version, changed settings).
    Unsupported(String),
    /// sled opened, but a record failed our checks (malformed key or value).
    FailedCheck(String),
    /// sled has applied records the journal does not have (a journal restored from a backup).
    AheadOfJournal { applied_seq: u64, last_seq: u64 },
    /// The checkpoint names a record the journal's chain does not pass through.
    CheckpointDisagrees(String),
    /// The state was written in another format (an older version); the journal's format is
    /// unchanged, so the state is rebuilt from it.
    OldFormat { found: u64, expected: u64 },
}

impl RebuildReason {
    /// Short stable name for the log (`rebuild_reason = missing`).
    pub fn label(&self) -> &'static str {
        match self {
            RebuildReason::Missing => "missing",
            RebuildReason::Corrupt(_) => "corrupt",
            RebuildReason::Unsupported(_) => "unsupported",
            RebuildReason::FailedCheck(_) => "failed_check",
            RebuildReason::AheadOfJournal { .. } => "ahead_of_journal",
            RebuildReason::CheckpointDisagrees(_) => "checkpoint_disagrees",
            RebuildReason::OldFormat { .. } => "old_format",
        }
    }
}

impl std::fmt::Display for RebuildReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebuildReason::Missing => write!(f, "no derived state"),
            RebuildReason::Corrupt(detail) => write!(f, "sled reports corruption: {detail}"),
            RebuildReason::Unsupported(detail) => write!(f, "sled format unsupported: {detail}"),
            RebuildReason::FailedCheck(detail) => write!(f, "state fails its checks: {detail}"),
            RebuildReason::AheadOfJournal { applied_seq, last_seq } => {
                write!(f, "state applied seq {applied_seq} but the journal ends at {last_seq}")
            }
            RebuildReason::OldFormat { found, expected } => write!(
                f,
                "the state is in format {found}, written by another version; this version \
                 writes format {expected}"
            ),
            RebuildReason::CheckpointDisagrees(detail) => {
                write!(f, "the journal disagrees with the checkpoint at {detail}")
            }
        }
    }
}

/// What to do about a failure while opening or reading the state.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The state itself is bad: set it aside and rebuild it from the journal.
    Rebuild(RebuildReason),
    /// Anything else: stop the start with this error and touch nothing.
    Stop(StoreError),
}

/// Whether an I/O error is about the environment (disk, device, permissions, limits) rather
/// than about the bytes read. Only the two kinds that sled and std produce for short or
/// malformed content count as content; everything else, including errors without an OS code,
/// is treated as the environment's, because refusing to start is recoverable and discarding
/// the state of a healthy disk is expensive.
pub fn is_environment(error: &io::Error) -> bool {
    if error.raw_os_error().is_some() {
        return true;
    }
    !matches!(error.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData)
}

/// What the operator should do about an environment error, for the error message.
pub fn operator_hint(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            "free disk space on that filesystem, then start again"
        }
        io::ErrorKind::PermissionDenied => {
            "give the server's user read and write access to it, then start again"
        }
        io::ErrorKind::ReadOnlyFilesystem => "remount the filesystem read-write, then start again",
        _ if error.raw_os_error() == Some(libc::EIO) => {
            "the device reports I/O errors: check it (dmesg, SMART) before starting again"
        }
        _ => "fix the cause named above, then start again",
    }
}

/// Sorts a failure of opening or reading the state at `state_dir` into rebuild or stop.
pub(crate) fn classify(error: StoreError, state_dir: &Path) -> Verdict {
    match error {
        StoreError::Sled(sled) => classify_sled(sled, state_dir),
        StoreError::Disagrees(Disagreement::OldFormat { found, expected }) => {
            Verdict::Rebuild(RebuildReason::OldFormat { found, expected })
        }
        StoreError::Disagrees(detail) => {
            Verdict::Rebuild(RebuildReason::FailedCheck(detail.to_string()))
        }
        malformed @ StoreError::MalformedState { .. } => {
            Verdict::Rebuild(RebuildReason::FailedCheck(malformed.to_string()))
        }
        other => Verdict::Stop(other),
    }
}

fn classify_sled(error: sled::Error, state_dir: &Path) -> Verdict {
    match error {
        sled::Error::Io(source) if is_environment(&source) => {
            Verdict::Stop(StoreError::Storage { path: state_dir.to_owned(), cause: source })
        }
        sled::Error::Io(source) => {
            Verdict::Rebuild(RebuildReason::Corrupt(format!("unreadable content: {source}")))
        }
        sled::Error::Corruption { at, .. } => Verdict::Rebuild(RebuildReason::Corrupt(match at {
            Some(at) => format!("at {at:?}"),
            None => "in its configuration or log".into(),
        })),
        sled::Error::Unsupported(why) => Verdict::Rebuild(RebuildReason::Unsupported(why)),
        // sled raises this when its own structures contradict each other, which on open means
        // the data it read; the journal can always produce a fresh state.
        sled::Error::ReportableBug(what) => {
            Verdict::Rebuild(RebuildReason::Corrupt(format!("sled found a bug: {what}")))
        }
        sled::Error::CollectionNotFound(name) => Verdict::Rebuild(RebuildReason::FailedCheck(
            format!("tree {:?} missing", String::from_utf8_lossy(&name)),
        )),
    }
}

/// A sled write failure while serving (or flushing), with the environment's errors turned into
/// [`StoreError::Storage`] so the log names the path and the cause.
pub(crate) fn write_error(error: sled::Error, state_dir: &Path) -> StoreError {
    match error {
        sled::Error::Io(source) if is_environment(&source) => {
            StoreError::Storage { path: state_dir.to_owned(), cause: source }
        }
        other => StoreError::Sled(other),
    }
}

impl StoreError {
    /// Whether this failure is the environment's (disk full, I/O error, permissions), so that
    /// freeing space or fixing the device and restarting is the remedy.
    pub fn is_environment(&self) -> bool {
        match self {
            StoreError::Storage { .. } => true,
            StoreError::Io { source, .. } => is_environment(source),
            StoreError::Journal(crate::journal::JournalError::Io { source, .. }) => {
                is_environment(source)
            }
            StoreError::Sled(sled::Error::Io(source)) => is_environment(source),
            _ => false,
        }
    }
}

/// What opening a shard needs from outside the engine: the wall-clock time that names a state
/// set aside, and the pause between attempts to take sled's file lock. The engine reads no
/// clock and never sleeps; the server passes [`crate::host::SystemHost`], a simulator its own.
pub trait OpenHost {
    /// Unix milliseconds now (names `state.broken-<ms>`).
    fn now_ms(&mut self) -> u64;
    /// Attempt `attempt` (from 1) found sled's file lock held. Pauses as the host sees fit and
    /// returns whether to try again; false reports the lock as an environment error.
    fn lock_busy(&mut self, attempt: u32) -> bool;
}

/// Opens the sled database in `dir` (creating it if absent).
pub(crate) fn open_sled(dir: &Path, host: &mut dyn OpenHost) -> Result<sled::Db, StoreError> {
    // A reopen within the same process can race sled's release of its lock (sled releases it
    // from background threads shortly after the last handle is dropped), so the host may let it
    // retry; a lock still held after that is reported like any other environment error
    // (another process has the state open).
    let mut attempt = 0u32;
    loop {
        match sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("lock") =>
            {
                attempt = attempt.saturating_add(1);
                if !host.lock_busy(attempt) {
                    return Err(StoreError::Sled(sled::Error::Io(e)));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Renames a state directory that is to be rebuilt to `state.broken-<now_ms>` beside it (a
/// numbered suffix if that name is taken), so it can be inspected; nothing is deleted.
pub(crate) fn move_aside(dir: &Path, now_ms: u64) -> Result<Option<PathBuf>, StoreError> {
    if !dir.exists() {
        return Ok(None);
    }
    let mut aside = dir.with_file_name(format!("state.broken-{now_ms}"));
    // Bounded: two rebuilds at most per start, so a handful of names always suffices.
    for n in 1..=16u32 {
        if !aside.exists() {
            break;
        }
        aside = dir.with_file_name(format!("state.broken-{now_ms}.{n}"));
    }
    std::fs::rename(dir, &aside)
        .map_err(|source| StoreError::Io { path: dir.to_owned(), source })?;
    tracing::warn!(moved_to = %aside.display(), "previous state kept aside for inspection");
    Ok(Some(aside))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(code: i32) -> StoreError {
        StoreError::Sled(sled::Error::Io(io::Error::from_raw_os_error(code)))
    }

    fn stops_with_path(error: StoreError) -> io::Error {
        match classify(error, Path::new("/data/shard-0/state")) {
            Verdict::Stop(StoreError::Storage { path, cause: source }) => {
                assert_eq!(path, Path::new("/data/shard-0/state"));
                source
            }
            other => panic!("expected a storage stop, got {other:?}"),
        }
    }

    #[test]
    fn environment_errors_stop_and_name_the_path() {
        for code in [libc::ENOSPC, libc::EIO, libc::EACCES, libc::EPERM, libc::EROFS, libc::EDQUOT]
        {
            let source = stops_with_path(os(code));
            assert_eq!(source.raw_os_error(), Some(code));
        }
        // sled's own lock message carries no OS code; another process holding the state is
        // not a reason to discard it.
        let locked = io::Error::other("could not acquire lock on \"state/db\"");
        stops_with_path(StoreError::Sled(sled::Error::Io(locked)));
    }

    // The real EIO comes from a shut-down ext4 in tests/storage_faults.rs; this one pins the
    // classification of the bare error value, and the message the operator reads.
    #[test]
    fn a_synthetic_eio_stops_with_a_device_hint() {
        let source = stops_with_path(os(libc::EIO));
        assert!(operator_hint(&source).contains("I/O errors"));
        let message = StoreError::Storage { path: "/x/state".into(), cause: source }.to_string();
        assert!(
            message.contains("/x/state") && message.contains("Input/output error"),
            "{message}"
        );
        assert!(message.contains("not corruption"), "{message}");
    }

    #[test]
    fn content_errors_rebuild_with_a_reason() {
        let cases = [
            (StoreError::Sled(sled::Error::Corruption { at: None, bt: () }), "corrupt"),
            (StoreError::Sled(sled::Error::Unsupported("version 0.28".into())), "unsupported"),
            (StoreError::Sled(sled::Error::ReportableBug("bad node".into())), "corrupt"),
            (
                StoreError::MalformedState { what: "applied_seq", detail: "3 bytes".into() },
                "failed_check",
            ),
            (
                StoreError::Disagrees(crate::engine::error::Disagreement::CardKeyMalformed),
                "failed_check",
            ),
            (
                StoreError::Sled(sled::Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill buffer",
                ))),
                "corrupt",
            ),
        ];
        for (error, label) in cases {
            match classify(error, Path::new("state")) {
                Verdict::Rebuild(reason) => assert_eq!(reason.label(), label, "{reason}"),
                Verdict::Stop(e) => panic!("{e} should rebuild"),
            }
        }
    }

    #[test]
    fn journal_and_thread_errors_are_never_rebuilt() {
        let journal = StoreError::Journal(crate::journal::JournalError::Poisoned);
        assert!(matches!(classify(journal, Path::new("s")), Verdict::Stop(_)));
        let io = StoreError::Io { path: "t".into(), source: io::Error::from_raw_os_error(11) };
        assert!(matches!(classify(io, Path::new("s")), Verdict::Stop(_)));
    }
}
