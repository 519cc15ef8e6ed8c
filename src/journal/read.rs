//! Reading single committed records by position, from the journal or its archive: how the
//! engine answers history pages and retries without keeping a second copy of every record.

use std::collections::HashMap;
use std::path::PathBuf;

use super::format::{parse_record, Parsed, RECORD_HEADER_LEN};
use super::scan::Pos;
use super::segment::segment_file_name;
use super::storage::{DiskFile, Storage};
use super::{JournalError, MAX_PAYLOAD};

/// Segment files kept open at once: reads cluster on the newest segments, and a handful of
/// descriptors per shard keeps a 64-shard server far below any descriptor limit.
const OPEN_FILES_MAX: usize = 8;

/// Reads committed records by [`Pos`]. A segment is looked for in the journal directory, then
/// in the archive (archiving moves files but keeps their names; an open descriptor survives
/// the move).
#[derive(Debug)]
pub struct JournalFiles {
    storage: Storage,
    journal: PathBuf,
    archive: PathBuf,
    open: HashMap<u64, Box<dyn DiskFile>>,
    buf: Vec<u8>,
}

impl JournalFiles {
    /// Reads from real files.
    pub fn new(journal: PathBuf, archive: PathBuf) -> JournalFiles {
        JournalFiles::on(Storage::real(), journal, archive)
    }

    /// Reads from `storage`.
    pub fn on(storage: Storage, journal: PathBuf, archive: PathBuf) -> JournalFiles {
        JournalFiles { storage, journal, archive, open: HashMap::new(), buf: Vec::new() }
    }

    fn file(&mut self, segment: u64) -> Result<&dyn DiskFile, JournalError> {
        if !self.open.contains_key(&segment) {
            if self.open.len() >= OPEN_FILES_MAX {
                // Any victim will do: a miss costs one open(2).
                if let Some(victim) = self.open.keys().next().copied() {
                    self.open.remove(&victim);
                }
            }
            let name = segment_file_name(segment);
            let live = self.journal.join(&name);
            let file = match self.storage.open_read(&live) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let archived = self.archive.join(&name);
                    self.storage
                        .open_read(&archived)
                        .map_err(|source| JournalError::Io { path: archived, source })?
                }
                Err(source) => return Err(JournalError::Io { path: live, source }),
            };
            self.open.insert(segment, file);
        }
        self.open.get(&segment).map(|f| &**f).ok_or_else(|| JournalError::Rejected {
            seq: 0,
            reason: "segment file vanished from the cache".into(),
        })
    }

    /// The committed record at `pos`: its seq and payload. The record's CRC is checked (the
    /// chain was checked when the journal was opened).
    pub fn read(&mut self, pos: Pos) -> Result<(u64, &[u8]), JournalError> {
        let journal = self.journal.clone();
        let path = move || journal.join(segment_file_name(pos.segment));
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path(),
            offset: u64::from(pos.offset),
            seq: 0,
            reason,
        };
        if pos.is_none() {
            return Err(corrupt("read of an empty position".into()));
        }
        let offset = u64::from(pos.offset);
        let mut buf = std::mem::take(&mut self.buf);
        let read = (|| {
            let file = self.file(pos.segment)?;
            buf.resize(RECORD_HEADER_LEN, 0);
            file.read_exact_at(&mut buf, offset)
                .map_err(|source| JournalError::Io { path: path(), source })?;
            let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len == 0 || len > MAX_PAYLOAD {
                return Err(corrupt(format!("no record here (length {len})")));
            }
            buf.resize(RECORD_HEADER_LEN + len, 0);
            file.read_exact_at(&mut buf[RECORD_HEADER_LEN..], offset + RECORD_HEADER_LEN as u64)
                .map_err(|source| JournalError::Io { path: path(), source })?;
            Ok(())
        })();
        self.buf = buf;
        read?;
        match parse_record(&self.buf, 0) {
            Parsed::Record(r) => {
                let seq = r.seq;
                let start = RECORD_HEADER_LEN;
                let end = start + r.payload.len();
                Ok((seq, &self.buf[start..end]))
            }
            Parsed::End => Err(corrupt("no record here".into())),
            Parsed::Bad(reason) => Err(corrupt(reason)),
        }
    }
}
