//! Append-only, hash-chained, crash-safe journal: one per shard, the source of truth for money.
//!
//! A record is durable once [`Journal::commit`] returned `Ok`; only then may it be acknowledged.
//! Damage is detected by CRC-32C per record and a SHA-256 hash chain over all records.
//!
//! # Directory
//!
//! One directory per journal (e.g. `data/shard-3/journal/`) holding:
//!
//! * `NNNNNNNNNNNNNNNNNNNN.seg` — segment files, named by the seq of their first record as 20
//!   zero-padded decimal digits (`00000000000000000001.seg`). The first segment is always
//!   `…001.seg`; there is no retention/compaction yet.
//! * `prealloc-*.tmp` — a segment being / already preallocated but not yet installed. Any
//!   `*.tmp` file is removed by [`Journal::open`] (leftover of a crash or of a previous run).
//! * Other files are ignored.
//!
//! Only one `Journal` may have a directory open at a time; this is not enforced by a lock.
//!
//! # Segment lifecycle
//!
//! Segments have a fixed size (`JournalOptions::segment_bytes`, default 64 MiB, a multiple of 8
//! in `4 KiB..=1 GiB`). A segment is *preallocated*: created under a `.tmp` name, the header
//! written, the rest zero-filled with real writes (not `set_len`, which would leave holes),
//! `fsync`ed, and only when it is needed renamed to its final name followed by an `fsync` of the
//! directory — all before any record is written into it. Records are then written in place with
//! positioned writes and made durable with `fdatasync`, which does not have to commit metadata
//! because size and extents never change.
//!
//! The next segment is prepared as soon as a segment becomes active, by a task handed to the
//! caller's [`Background`] runner (the journal starts no thread: see [`prepare`]). At rotation
//! the journal takes that segment, waiting for the runner if it is still running it and
//! running it itself if the runner has not started it; if it failed or there is no runner,
//! the segment is created synchronously.
//!
//! # Storage
//!
//! Every file operation goes through [`JournalOptions::storage`]: real files by default, or
//! the in-memory [`MemDisk`] that tears writes, fails syncs, fills up and loses unsynced data
//! at a simulated crash (see [`storage`]).
//!
//! # Segment header (32 bytes, offset 0, all integers little-endian)
//!
//! | offset | size | field                                          |
//! |-------:|-----:|------------------------------------------------|
//! | 0      | 8    | magic `b"CITYJRNL"`                            |
//! | 8      | 4    | format version, `1`                            |
//! | 12     | 4    | header length, `32` (offset of the first record) |
//! | 16     | 8    | segment size in bytes (must equal the file size) |
//! | 24     | 4    | reserved, zero                                 |
//! | 28     | 4    | CRC-32C (Castagnoli) of bytes `0..28`          |
//!
//! The header is written at preallocation time, so it carries no seq or hash: the first seq is
//! the file name (checked against the first record), and the link to the previous segment is
//! the first record's `prev_hash`.
//!
//! # Record (at 8-byte aligned offsets from 32, all integers little-endian)
//!
//! | offset | size  | field                                                              |
//! |-------:|------:|--------------------------------------------------------------------|
//! | 0      | 4     | `len`: payload length, `1..=MAX_PAYLOAD` (65 536)                  |
//! | 4      | 4     | `crc`: CRC-32C of bytes `8..56+len` (everything after this field up to the end of the payload) |
//! | 8      | 8     | `seq`: 1 for the first record, then +1 per record, across segments  |
//! | 16     | 8     | `batch_start`: seq of the first record of the commit batch          |
//! | 24     | 32    | `prev_hash`: SHA-256 of the previous record's bytes `0..56+len` (header and payload, padding excluded); all zero for seq 1; chains across segments |
//! | 56     | `len` | payload                                                            |
//! | 56+len | 0..7  | zero padding to a multiple of 8                                    |
//!
//! A record never straddles segments: if it does not fit in the rest of the current segment it
//! goes to the next one and the rest stays zero. `len == 0` (zero-filled area) where a record
//! header is expected, or fewer than 56 bytes left, means end of data in that segment. Empty
//! payloads are therefore rejected by `append`. A payload must also fit into an empty segment
//! (`segment_bytes - 88` bytes; only matters for small test segments).
//!
//! # Recovery (`open`) and audit (`read_all`)
//!
//! Segments are read in seq order; each record must have a valid CRC, `seq` = previous + 1,
//! `prev_hash` = hash of the previous record, and `batch_start` either equal to its own seq or
//! to the previous record's `batch_start`. A segment whose header is bad is `Corrupt`. The
//! first position where this framing does not yield the expected record (bad length, CRC
//! mismatch, non-zero bytes where the end of data should be, or a next segment whose name is
//! not the expected seq) is a *hole* with expected seq `S`. Then the rest of that segment and
//! every later segment is searched, at every 8-byte offset, for CRC-valid records:
//!
//! * none, or all of them have `batch_start <= S` and `seq > S` (they belong to the last batch,
//!   which was never acknowledged: its pages may have reached the disk out of order) — **torn
//!   tail**: `open` zeroes the bytes from the hole to the last non-zero byte of that segment,
//!   `fdatasync`s, removes the later segments, `fsync`s the directory and logs a
//!   `tracing::warn!`; the next record is written at the hole. `read_all` only reports it.
//! * anything else — **`JournalError::Corrupt`** naming file, offset and expected seq of the
//!   hole; `open` refuses. A CRC-valid record with a wrong seq, a broken hash chain or a bad
//!   `batch_start` in the normal framing is `Corrupt` at once, as is a journal whose first
//!   segment does not start at seq 1.
//!
//! `visit` is called for each valid record as it is scanned; if `open` returns an error
//! afterwards, any state built from the visited records must be discarded.
//!
//! # Commit
//!
//! `append` encodes records (CRC, hash chain) into one reusable buffer. `commit` does one
//! positioned write per segment touched, installing new segments as needed, then one
//! `fdatasync` per segment touched. Any failure poisons the journal: every later `append` or
//! `commit` returns [`JournalError::Poisoned`] (after a failed `fsync` the page cache state is
//! unknown and retrying is unsafe); reopen to recover.

mod fault;
mod format;
pub mod memdisk;
#[cfg(test)]
mod memdisk_tests;
pub mod prepare;
mod read;
mod scan;
mod segment;
pub mod storage;
mod tail;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use fault::{Fault, FaultInjector};
pub use format::{
    DEFAULT_SEGMENT_BYTES, FORMAT_VERSION, MAX_PAYLOAD, MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES,
    RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
pub use memdisk::{DiskFault, MemDisk};
pub use prepare::{Background, ManualBackground, PrepareTask};
pub use read::JournalFiles;
pub use scan::{Anchor, Pos, Visit};
pub use storage::{Disk, DiskFile, RealDisk, Storage};
pub use tail::{RawRecord, RecordTail};

pub use format::RecordHash;
use format::{encode_record, max_payload_for, record_size};
use segment::{io_err, sync_dir};

/// Errors of the journal.
#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum JournalError {
    #[error("journal I/O error on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// Damage before the tail: the journal refuses to open.
    #[error("journal corrupt in {} at offset {offset} (seq {seq}): {reason}", path.display())]
    Corrupt { path: PathBuf, offset: u64, seq: u64, reason: String },
    /// An earlier write or sync failed; nothing more may be acknowledged. Reopen to recover.
    #[error("journal poisoned by an earlier write/sync failure")]
    Poisoned,
    #[error("payload of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge { len: usize, max: usize },
    /// `len == 0` marks the end of data on disk, so empty payloads cannot be stored.
    #[error("empty payloads cannot be journaled")]
    EmptyPayload,
    #[error("invalid journal options: {0}")]
    InvalidOptions(String),
    /// For use by `visit` callbacks that reject a record.
    #[error("record {seq} rejected: {reason}")]
    Rejected { seq: u64, reason: String },
    /// The journal does not pass through a checkpoint's record: the checkpoint cannot be used
    /// (the caller falls back to a full scan).
    #[error("journal disagrees with the checkpoint at seq {seq}: {reason}")]
    AnchorMismatch { seq: u64, reason: String },
}

/// Where [`Journal::open_from`] and [`read_from`] start reading.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Every record from seq 1, reading archived segments from `archive` first.
    Full { archive: Option<&'a Path> },
    /// From the segment holding a checkpoint's record; earlier segments are not read.
    Anchor(Anchor),
    /// Every record after a prune's anchor (`anchor.seq` and all before it were removed from
    /// the archive), reading the archive's remaining segments first; the first record read
    /// must link to `anchor.hash`.
    Pruned { anchor: Anchor, archive: Option<&'a Path> },
}

impl Start<'_> {
    fn archive(&self) -> Option<&Path> {
        match self {
            Start::Full { archive } | Start::Pruned { archive, .. } => *archive,
            Start::Anchor(_) => None,
        }
    }
}

/// Runs the scan `start` asks for over `segments`.
fn scan_for(
    storage: &Storage,
    segments: Vec<segment::SegmentFile>,
    start: Start<'_>,
    visit: &mut scan::Visit<'_>,
) -> Result<scan::Outcome, JournalError> {
    match start {
        Start::Full { .. } => scan::scan(storage, segments, None, visit),
        Start::Anchor(a) => scan::scan(storage, segments, Some(a), visit),
        Start::Pruned { anchor, .. } => scan::scan_after_prune(storage, segments, anchor, visit),
    }
}

/// The segments a scan reads: the live directory's, and for a full scan the archive's before
/// them (a segment in both, left by a copy to another disk that crashed before the original
/// was removed, is read from the live directory).
fn segments_for(
    storage: &Storage,
    dir: &Path,
    start: Start<'_>,
) -> Result<(Vec<segment::SegmentFile>, Vec<PathBuf>), JournalError> {
    let (mut live, tmp) = segment::list_dir(storage, dir)?;
    if let Some(archive) = start.archive() {
        if storage.is_dir(archive) {
            let (archived, _) = segment::list_dir(storage, archive)?;
            let first_live = live.first().map_or(u64::MAX, |s| s.first_seq);
            let mut all: Vec<_> =
                archived.into_iter().filter(|s| s.first_seq < first_live).collect();
            all.append(&mut live);
            live = all;
        }
    }
    Ok((live, tmp))
}

/// Moves every segment of `dir` whose records all lie below `seq` (a checkpoint) to `archive`,
/// oldest first, keeping the segment that holds `seq` and all later ones. A rename when both
/// are on one filesystem; otherwise copy, `fsync`, then remove the original, so a crash leaves
/// the segment in at least one place. Returns the number of segments moved.
pub fn archive_below(dir: &Path, archive: &Path, seq: u64) -> Result<usize, JournalError> {
    archive_below_on(&Storage::real(), dir, archive, seq)
}

/// [`archive_below`] on any storage.
pub fn archive_below_on(
    storage: &Storage,
    dir: &Path,
    archive: &Path,
    seq: u64,
) -> Result<usize, JournalError> {
    let (segments, _) = segment::list_dir(storage, dir)?;
    let Some(keep) = segments.iter().rposition(|s| s.first_seq <= seq) else {
        return Ok(0);
    };
    if keep == 0 {
        return Ok(0);
    }
    storage.create_dir_all(archive).map_err(io_err(archive))?;
    for seg in &segments[..keep] {
        let name = seg.path.file_name().map(PathBuf::from).unwrap_or_default();
        let to = archive.join(&name);
        match storage.rename(&seg.path, &to) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let partial = archive.join(name.with_extension("seg.partial"));
                storage::copy_file(storage.disk(), &seg.path, &partial)
                    .map_err(io_err(&partial))?;
                storage.rename(&partial, &to).map_err(io_err(&to))?;
                sync_dir(storage, archive)?;
                storage.remove(&seg.path).map_err(io_err(&seg.path))?;
            }
            Err(e) => return Err(JournalError::Io { path: seg.path.clone(), source: e }),
        }
    }
    sync_dir(storage, archive)?;
    sync_dir(storage, dir)?;
    Ok(keep)
}

/// Options for [`Journal::open`].
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// Size of new segment files; a multiple of 8 in `MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES`.
    pub segment_bytes: u64,
    /// Test seam for the commit path.
    pub faults: Option<Arc<FaultInjector>>,
    /// Where the files are: real files by default.
    pub storage: Storage,
    /// Who prepares the next segment ahead of rotation; `None`: rotation prepares it.
    pub background: Option<Arc<dyn Background>>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            faults: None,
            storage: Storage::real(),
            background: None,
        }
    }
}

impl JournalOptions {
    fn validate(&self) -> Result<(), JournalError> {
        let b = self.segment_bytes;
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&b) || !b.is_multiple_of(8) {
            return Err(JournalError::InvalidOptions(format!(
                "segment_bytes {b} must be a multiple of 8 in {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}"
            )));
        }
        Ok(())
    }
}

/// A torn tail found by [`read_all`] (and repaired by [`Journal::open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Segment holding the hole.
    pub path: PathBuf,
    /// Offset of the hole in that segment.
    pub offset: u64,
    /// Seq the record at the hole would have had.
    pub seq: u64,
    /// Later segments that hold only data of the torn batch (removed by `open`).
    pub dead_segments: u32,
    pub reason: String,
}

/// Result of [`read_all`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadSummary {
    /// Valid records visited.
    pub records: u64,
    /// Seq of the last valid record (0 if none).
    pub last_seq: u64,
    /// Segment files found.
    pub segments: u32,
    /// Non-zero bytes in the torn tail (0 if there is none).
    pub torn_tail_bytes: u64,
    pub torn_tail: Option<TornTail>,
}

/// Read-only scanner for the offline auditor.
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalReader;

impl JournalReader {
    /// See [`read_all`].
    pub fn read_all(
        dir: &Path,
        visit: impl FnMut(u64, &[u8]) -> Result<(), JournalError>,
    ) -> Result<ReadSummary, JournalError> {
        read_all(dir, visit)
    }
}

/// Read-only scan: never modifies files (temporary files are ignored, not removed). Calls
/// `visit` for every valid record in order, reports a torn tail as information and mid-journal
/// damage as [`JournalError::Corrupt`].
pub fn read_all(
    dir: &Path,
    visit: impl FnMut(u64, &[u8]) -> Result<(), JournalError>,
) -> Result<ReadSummary, JournalError> {
    read_from(dir, Start::Full { archive: None }, visit)
}

/// [`read_from`], also telling `visit` where each record lies and its hash (which the next
/// record's `prev_hash` holds): what a prune needs to anchor the chain at a segment boundary.
pub fn read_hashed(
    dir: &Path,
    start: Start<'_>,
    visit: &mut scan::Visit<'_>,
) -> Result<u64, JournalError> {
    // Prunes and audits run on real files (the server is stopped).
    let storage = Storage::real();
    let (segments, _tmp) = segments_for(&storage, dir, start)?;
    let out = scan_for(&storage, segments, start, visit)?;
    Ok(out.next_seq - 1)
}

/// The segment files of a journal or archive directory as (first seq, path), by first seq; an
/// absent directory has none.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let (segments, _) = segment::list_dir(&Storage::real(), dir)?;
    Ok(segments.into_iter().map(|s| (s.first_seq, s.path)).collect())
}

/// The path of the segment whose first record is `first_seq` in directory `dir`.
pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(segment::segment_file_name(first_seq))
}

/// [`read_all`] from a chosen start: the archive followed by the live journal, or a checkpoint.
pub fn read_from(
    dir: &Path,
    start: Start<'_>,
    visit: impl FnMut(u64, &[u8]) -> Result<(), JournalError>,
) -> Result<ReadSummary, JournalError> {
    read_from_on(&Storage::real(), dir, start, visit)
}

/// [`read_from`] on any storage.
pub fn read_from_on(
    storage: &Storage,
    dir: &Path,
    start: Start<'_>,
    mut visit: impl FnMut(u64, &[u8]) -> Result<(), JournalError>,
) -> Result<ReadSummary, JournalError> {
    let (segments, _tmp) = segments_for(storage, dir, start)?;
    let out = scan_for(storage, segments, start, &mut |seq, _, payload, _| visit(seq, payload))?;
    let segments = u32::try_from(out.segments.len()).unwrap_or(u32::MAX);
    let torn_tail = out.torn.as_ref().map(|t| TornTail {
        path: out.segments[t.segment].path.clone(),
        offset: t.offset,
        seq: t.seq,
        dead_segments: segments - 1 - t.segment as u32,
        reason: t.reason.clone(),
    });
    Ok(ReadSummary {
        records: out.records,
        last_seq: out.next_seq - 1,
        segments,
        torn_tail_bytes: out.torn.as_ref().map_or(0, |t| t.bytes),
        torn_tail,
    })
}

#[derive(Debug)]
struct Segment {
    file: Box<dyn DiskFile>,
    path: PathBuf,
    capacity: u64,
    /// Offset up to which records have been written (committed, or written by a failed commit).
    write_off: u64,
}

/// A segment break inside the pending batch.
#[derive(Debug, Clone, Copy)]
struct Break {
    buf_off: usize,
    first_seq: u64,
}

/// The append-only journal of one shard.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    faults: Option<Arc<FaultInjector>>,
    storage: Storage,
    background: Option<Arc<dyn Background>>,
    active: Segment,
    /// The next segment's preallocation, handed to `background`.
    preparer: Option<PrepareTask>,
    /// Seq of the next appended record (pending records included).
    next_seq: u64,
    /// Seq of the first pending record (= batch_start of the pending batch).
    committed_next_seq: u64,
    /// Hash of the last appended record.
    last_hash: RecordHash,
    /// Encoded pending records.
    buf: Vec<u8>,
    breaks: Vec<Break>,
    retired: Vec<Segment>,
    /// Where the next pending record goes in the (possibly future) tail segment.
    pend_off: u64,
    /// First seq (= name) of the segment the next pending record goes to.
    pend_segment: u64,
    pend_cap: u64,
    pending: usize,
    poisoned: bool,
}

impl Journal {
    /// Opens or creates the journal in `dir`, running recovery. Calls `visit(seq, payload)` for
    /// every valid record in sequence order. A torn tail is truncated (zeroed) and logged with
    /// `tracing::warn!`; damage before the tail returns [`JournalError::Corrupt`] naming file,
    /// offset and seq. Leftover temporary files are removed.
    pub fn open(
        dir: &Path,
        options: JournalOptions,
        visit: impl FnMut(u64, &[u8]) -> Result<(), JournalError>,
    ) -> Result<Journal, JournalError> {
        Self::open_from(dir, options, Start::Full { archive: None }, visit)
    }

    /// [`Journal::open`] reading from `start`: a full scan that reads the archive first, or a
    /// scan from a checkpoint that reads only the segment holding it and later ones (so a
    /// restart reads at most the records since the checkpoint plus one segment).
    pub fn open_from(
        dir: &Path,
        options: JournalOptions,
        start: Start<'_>,
        mut visit: impl FnMut(u64, &[u8]) -> Result<(), JournalError>,
    ) -> Result<Journal, JournalError> {
        Self::open_at(dir, options, start, |seq, _, payload| visit(seq, payload))
    }

    /// [`Journal::open_from`], telling `visit` where each record lies too.
    pub fn open_at(
        dir: &Path,
        options: JournalOptions,
        start: Start<'_>,
        mut visit: impl FnMut(u64, Pos, &[u8]) -> Result<(), JournalError>,
    ) -> Result<Journal, JournalError> {
        options.validate()?;
        let storage = options.storage.clone();
        if !storage.is_dir(dir) {
            storage.create_dir_all(dir).map_err(io_err(dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(&storage, parent)?;
            }
        }
        let (segments, tmp) = segments_for(&storage, dir, start)?;
        if !tmp.is_empty() {
            for path in &tmp {
                tracing::info!(file = %path.display(), "removing leftover temporary journal file");
                storage.remove(path).map_err(io_err(path))?;
            }
            sync_dir(&storage, dir)?;
        }
        let out = scan_for(&storage, segments, start, &mut |seq, pos, payload, _| {
            visit(seq, pos, payload)
        })?;
        let active_first_seq = out.tail.map_or(1, |(k, _)| out.segments[k].first_seq);
        let active = match out.tail {
            None => {
                let prepared = segment::prepare(&storage, dir, options.segment_bytes, None)
                    .map_err(io_err(dir))?;
                let capacity = prepared.capacity;
                let (file, path) = segment::install(&storage, prepared, dir, 1)?;
                Segment { file, path, capacity, write_off: SEGMENT_HEADER_LEN }
            }
            Some((k, off)) => {
                let path = out.segments[k].path.clone();
                if path.parent() != Some(dir) {
                    // Archived segments are read-only history; the tail is always live.
                    return Err(JournalError::Corrupt {
                        path,
                        offset: 0,
                        seq: out.next_seq,
                        reason: "the journal's last segment is in the archive, not in the \
                                 journal directory"
                            .into(),
                    });
                }
                let file = storage.open(&path).map_err(io_err(&path))?;
                let capacity = file.len().map_err(io_err(&path))?;
                if let Some(torn) = &out.torn {
                    tracing::warn!(
                        file = %path.display(),
                        offset = torn.offset,
                        seq = torn.seq,
                        bytes = torn.bytes,
                        dead_segments = out.segments.len() - 1 - k,
                        reason = %torn.reason,
                        "journal has a torn tail (unacknowledged batch); truncating"
                    );
                    if !crate::sim_bugs::active(crate::sim_bugs::Bug::TornTailKept) {
                        segment::write_zeros(&*file, torn.offset, torn.zero_end, None)
                            .and_then(|()| file.sync_data())
                            .map_err(io_err(&path))?;
                    }
                    for dead in &out.segments[k + 1..] {
                        storage.remove(&dead.path).map_err(io_err(&dead.path))?;
                    }
                    if out.segments.len() > k + 1 {
                        sync_dir(&storage, dir)?;
                    }
                }
                Segment { file, path, capacity, write_off: off }
            }
        };
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            segment_bytes: options.segment_bytes,
            faults: options.faults,
            storage,
            background: options.background,
            pend_off: active.write_off,
            pend_cap: active.capacity,
            pend_segment: active_first_seq,
            active,
            preparer: None,
            next_seq: out.next_seq,
            committed_next_seq: out.next_seq,
            last_hash: out.last_hash,
            buf: Vec::new(),
            breaks: Vec::new(),
            retired: Vec::new(),
            pending: 0,
            poisoned: false,
        };
        journal.start_preparation();
        Ok(journal)
    }

    /// Sequence the next appended record will get (first record is 1).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seq of the last durable record (0 if none).
    pub fn last_committed_seq(&self) -> u64 {
        self.committed_next_seq - 1
    }

    /// Hash of the last appended record (of the last committed one when nothing is pending):
    /// what a checkpoint at [`Journal::last_committed_seq`] records as its [`Anchor`].
    pub fn last_hash(&self) -> RecordHash {
        self.last_hash
    }

    /// Number of records appended but not committed.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The pending records exactly as `commit` will write them (headers and payloads, padded,
    /// one after another; segment headers are not in it), so replication can ship a group
    /// commit without reading it back. Empty when nothing is pending.
    pub fn pending_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Whether an earlier failure poisoned the journal.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Largest payload `append` accepts with these options.
    pub fn max_payload(&self) -> usize {
        max_payload_for(self.segment_bytes)
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds a record to the pending batch in memory; returns its seq. Not durable until commit.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, JournalError> {
        self.append_at(payload).map(|(seq, _)| seq)
    }

    /// [`Journal::append`], also returning where the record will lie once committed.
    pub fn append_at(&mut self, payload: &[u8]) -> Result<(u64, Pos), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if payload.is_empty() {
            return Err(JournalError::EmptyPayload);
        }
        let max = self.max_payload();
        if payload.len() > max {
            return Err(JournalError::PayloadTooLarge { len: payload.len(), max });
        }
        let seq = self.next_seq;
        let size = record_size(payload.len()) as u64;
        if self.pend_off + size > self.pend_cap {
            self.breaks.push(Break { buf_off: self.buf.len(), first_seq: seq });
            self.pend_off = SEGMENT_HEADER_LEN;
            self.pend_cap = self.segment_bytes;
            self.pend_segment = seq;
        }
        // Segments are at most MAX_SEGMENT_BYTES (1 GiB), so the offset fits in u32.
        let pos = Pos { segment: self.pend_segment, offset: self.pend_off as u32 };
        self.last_hash =
            encode_record(&mut self.buf, seq, self.committed_next_seq, &self.last_hash, payload);
        self.pend_off += size;
        self.next_seq += 1;
        self.pending += 1;
        Ok((seq, pos))
    }

    /// Writes all pending records (one write per segment touched) and makes them durable with
    /// one `fdatasync` per segment touched. Only after `Ok` may the caller acknowledge them.
    /// Any failure poisons the journal: every later call returns `Err(Poisoned)`.
    pub fn commit(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if self.pending == 0 {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let breaks = std::mem::take(&mut self.breaks);
        let result = self.write_and_sync(&buf, &breaks);
        self.buf = buf;
        self.breaks = breaks;
        match result {
            Ok(()) => {
                self.buf.clear();
                self.breaks.clear();
                self.pending = 0;
                self.committed_next_seq = self.next_seq;
                Ok(())
            }
            Err(e) => {
                self.poisoned = true;
                tracing::error!(error = %e, "journal commit failed; journal is poisoned");
                Err(e)
            }
        }
    }

    fn write_and_sync(&mut self, buf: &[u8], breaks: &[Break]) -> Result<(), JournalError> {
        let mut retired = std::mem::take(&mut self.retired);
        let mut chunk_start = 0;
        let mut dirty = false;
        for i in 0..=breaks.len() {
            let chunk_end = breaks.get(i).map_or(buf.len(), |b| b.buf_off);
            if chunk_end > chunk_start {
                self.write_chunk(&buf[chunk_start..chunk_end])?;
                dirty = true;
            }
            chunk_start = chunk_end;
            if let Some(b) = breaks.get(i) {
                let old = self.rotate(b.first_seq)?;
                if dirty {
                    retired.push(old);
                }
                dirty = false;
            }
        }
        if crate::sim_bugs::active(crate::sim_bugs::Bug::AckBeforeSync) {
            retired.clear();
            dirty = false;
        }
        for seg in retired.drain(..) {
            self.sync(&seg)?;
        }
        self.retired = retired;
        if dirty {
            self.sync(&self.active)?;
        }
        Ok(())
    }

    fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), JournalError> {
        let seg = &mut self.active;
        debug_assert!(seg.write_off + chunk.len() as u64 <= seg.capacity);
        if let Some(e) = self.faults.as_ref().and_then(|f| f.take_write_fault()) {
            // Simulate a short write before the failure.
            let _ = seg.file.write_all_at(&chunk[..chunk.len() / 2], seg.write_off);
            return Err(JournalError::Io { path: seg.path.clone(), source: e });
        }
        seg.file.write_all_at(chunk, seg.write_off).map_err(io_err(&seg.path))?;
        seg.write_off += chunk.len() as u64;
        Ok(())
    }

    fn sync(&self, seg: &Segment) -> Result<(), JournalError> {
        if let Some(e) = self.faults.as_ref().and_then(|f| f.take_sync_fault()) {
            return Err(JournalError::Io { path: seg.path.clone(), source: e });
        }
        seg.file.sync_data().map_err(io_err(&seg.path))
    }

    /// Installs the next segment (first record `first_seq`) and returns the previous one.
    fn rotate(&mut self, first_seq: u64) -> Result<Segment, JournalError> {
        let ready = match self.preparer.take().and_then(|task| task.take()) {
            Some(Ok(prepared)) if prepared.capacity == self.segment_bytes => Some(prepared),
            Some(Ok(prepared)) => {
                let _ = self.storage.remove(&prepared.tmp_path);
                None
            }
            Some(Err(e)) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "background segment preallocation failed; preallocating now");
                None
            }
            None => None,
        };
        let prepared = match ready {
            Some(p) => p,
            None => segment::prepare(&self.storage, &self.dir, self.segment_bytes, None)
                .map_err(io_err(&self.dir))?,
        };
        let capacity = prepared.capacity;
        let (file, path) = segment::install(&self.storage, prepared, &self.dir, first_seq)?;
        let new = Segment { file, path, capacity, write_off: SEGMENT_HEADER_LEN };
        let old = std::mem::replace(&mut self.active, new);
        self.start_preparation();
        Ok(old)
    }

    /// Hands the next segment's preallocation to the background runner, if there is one.
    fn start_preparation(&mut self) {
        if let Some(background) = &self.background {
            let task = PrepareTask::new(self.storage.clone(), self.dir.clone(), self.segment_bytes);
            background.start(task.clone());
            self.preparer = Some(task);
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Some(task) = self.preparer.take() {
            task.cancel(&self.storage);
        }
    }
}
