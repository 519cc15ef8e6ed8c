//! Segment files: naming, listing, preallocation and installation, on a [`Storage`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::format::{encode_segment_header, SEGMENT_HEADER_LEN};
use super::storage::{DiskFile, Storage};
use super::JournalError;

/// Suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of temporary (preallocating / preallocated, not yet installed) files.
pub const TMP_SUFFIX: &str = ".tmp";

static ZEROS: [u8; 256 * 1024] = [0u8; 256 * 1024];
/// Makes temporary names unique within a process; `open` removes every `*.tmp` left by an
/// earlier one, so the name need not be unique across runs.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

/// `00000000000000000001.seg` for first seq 1.
pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// Parses a segment file name back into its first seq.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A segment file found in the journal directory.
#[derive(Debug, Clone)]
pub struct SegmentFile {
    pub path: PathBuf,
    pub first_seq: u64,
}

/// Lists segment files sorted by first seq, and temporary files (sorted by name).
pub fn list_dir(
    storage: &Storage,
    dir: &Path,
) -> Result<(Vec<SegmentFile>, Vec<PathBuf>), JournalError> {
    let mut segments = Vec::new();
    let mut tmp = Vec::new();
    let mut names = storage.list(dir).map_err(io_err(dir))?;
    names.sort();
    for name in names {
        if let Some(first_seq) = parse_segment_name(&name) {
            segments.push(SegmentFile { path: dir.join(&name), first_seq });
        } else if name.ends_with(TMP_SUFFIX) {
            tmp.push(dir.join(&name));
        } else {
            tracing::debug!(file = %dir.join(&name).display(), "ignoring unexpected file in journal");
        }
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok((segments, tmp))
}

/// fsync a directory so renames / creations / removals in it are durable.
pub fn sync_dir(storage: &Storage, dir: &Path) -> Result<(), JournalError> {
    storage.sync_dir(dir).map_err(io_err(dir))
}

/// How a background preallocation spreads its disk traffic: it syncs every
/// [`PACED_SYNC_BYTES`] and then calls `pause` (the runner's choice: a short sleep on a
/// production thread, nothing in the simulator), and stops early when `cancel` is set.
pub struct Pacing<'a> {
    pub cancel: &'a AtomicBool,
    pub pause: &'a mut dyn FnMut(),
}

/// Writes zeros to `file` over `[from, to)`.
pub fn write_zeros(
    file: &dyn DiskFile,
    from: u64,
    to: u64,
    mut pacing: Option<&mut Pacing<'_>>,
) -> io::Result<()> {
    let mut off = from;
    let mut since_sync = 0u64;
    while off < to {
        if pacing.as_ref().is_some_and(|p| p.cancel.load(Ordering::Relaxed)) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "preallocation cancelled"));
        }
        let n = (to - off).min(ZEROS.len() as u64);
        // n <= ZEROS.len(), so the cast and slice are in range.
        file.write_all_at(&ZEROS[..n as usize], off)?;
        off += n;
        since_sync += n;
        // In the background (paced) case, write the zeros out in small steps with a pause:
        // one 64 MiB flush at the end would occupy the disk for ~150 ms, and every group
        // commit of the live segment would wait behind it (measured as p99.9 spikes).
        if let Some(p) = pacing.as_mut() {
            if since_sync >= PACED_SYNC_BYTES {
                file.sync_data()?;
                since_sync = 0;
                (p.pause)();
            }
        }
    }
    Ok(())
}

/// Background preallocation syncs every this many bytes, then pauses (see [`Pacing`]).
pub const PACED_SYNC_BYTES: u64 = 1024 * 1024;

/// A fully zero-filled, fsynced segment under a temporary name, header already written.
#[derive(Debug)]
pub struct Prepared {
    pub file: Box<dyn DiskFile>,
    pub tmp_path: PathBuf,
    pub capacity: u64,
}

/// Creates a preallocated segment of `capacity` bytes under a unique temporary name.
pub fn prepare(
    storage: &Storage,
    dir: &Path,
    capacity: u64,
    pacing: Option<&mut Pacing<'_>>,
) -> io::Result<Prepared> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_path = dir.join(format!("prealloc-{}-{n}{TMP_SUFFIX}", std::process::id()));
    let file = storage.create_new(&tmp_path)?;
    let filled = file
        .write_all_at(&encode_segment_header(capacity), 0)
        .and_then(|()| write_zeros(&*file, SEGMENT_HEADER_LEN, capacity, pacing))
        .and_then(|()| file.sync_all());
    match filled {
        Ok(()) => Ok(Prepared { file, tmp_path, capacity }),
        Err(e) => {
            let _ = storage.remove(&tmp_path);
            Err(e)
        }
    }
}

/// Renames a prepared segment to its final name and fsyncs the directory.
pub fn install(
    storage: &Storage,
    prepared: Prepared,
    dir: &Path,
    first_seq: u64,
) -> Result<(Box<dyn DiskFile>, PathBuf), JournalError> {
    let path = dir.join(segment_file_name(first_seq));
    storage.rename(&prepared.tmp_path, &path).map_err(io_err(&path))?;
    sync_dir(storage, dir)?;
    Ok((prepared.file, path))
}
