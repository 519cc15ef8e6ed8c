//! Segment files: naming, listing, preallocation and installation.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::format::{encode_segment_header, SEGMENT_HEADER_LEN};
use super::JournalError;

/// Suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of temporary (preallocating / preallocated, not yet installed) files.
pub const TMP_SUFFIX: &str = ".tmp";

static ZEROS: [u8; 256 * 1024] = [0u8; 256 * 1024];
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

/// Lists segment files sorted by first seq, and temporary files (unsorted).
pub fn list_dir(dir: &Path) -> Result<(Vec<SegmentFile>, Vec<PathBuf>), JournalError> {
    let mut segments = Vec::new();
    let mut tmp = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Some(first_seq) = parse_segment_name(name) {
            segments.push(SegmentFile { path: entry.path(), first_seq });
        } else if name.ends_with(TMP_SUFFIX) {
            tmp.push(entry.path());
        } else {
            tracing::debug!(file = %entry.path().display(), "ignoring unexpected file in journal");
        }
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok((segments, tmp))
}

/// fsync a directory so renames / creations / removals in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Writes zeros to `file` over `[from, to)`.
pub fn write_zeros(file: &File, from: u64, to: u64, cancel: Option<&AtomicBool>) -> io::Result<()> {
    let mut off = from;
    let mut since_sync = 0u64;
    while off < to {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "preallocation cancelled"));
        }
        let n = (to - off).min(ZEROS.len() as u64);
        // n <= ZEROS.len(), so the cast and slice are in range.
        file.write_all_at(&ZEROS[..n as usize], off)?;
        off += n;
        since_sync += n;
        // In the background (cancellable) case, write the zeros out in small steps with a
        // pause: one 64 MiB flush at the end would occupy the disk for ~150 ms, and every
        // group commit of the live segment would wait behind it (measured as p99.9 spikes).
        if cancel.is_some() && since_sync >= PACED_SYNC_BYTES {
            file.sync_data()?;
            since_sync = 0;
            std::thread::sleep(PACED_PAUSE);
        }
    }
    Ok(())
}

/// Background preallocation syncs every this many bytes...
const PACED_SYNC_BYTES: u64 = 1024 * 1024;
/// ...and then pauses this long, so journal syncs of the live segment interleave with it.
const PACED_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// A fully zero-filled, fsynced segment under a temporary name, header already written.
#[derive(Debug)]
pub struct Prepared {
    pub file: File,
    pub tmp_path: PathBuf,
    pub capacity: u64,
}

/// Creates a preallocated segment of `capacity` bytes under a unique temporary name.
pub fn prepare(dir: &Path, capacity: u64, cancel: Option<&AtomicBool>) -> io::Result<Prepared> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp_path = dir.join(format!("prealloc-{}-{n}-{nanos}{TMP_SUFFIX}", std::process::id()));
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&tmp_path)?;
    let filled = file
        .write_all_at(&encode_segment_header(capacity), 0)
        .and_then(|()| write_zeros(&file, SEGMENT_HEADER_LEN, capacity, cancel))
        .and_then(|()| file.sync_all());
    match filled {
        Ok(()) => Ok(Prepared { file, tmp_path, capacity }),
        Err(e) => {
            let _ = fs::remove_file(&tmp_path);
            Err(e)
        }
    }
}

/// Renames a prepared segment to its final name and fsyncs the directory.
pub fn install(
    prepared: Prepared,
    dir: &Path,
    first_seq: u64,
) -> Result<(File, PathBuf), JournalError> {
    let path = dir.join(segment_file_name(first_seq));
    fs::rename(&prepared.tmp_path, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok((prepared.file, path))
}
