//! Reading committed records in seq order with their exact bytes (header and payload), from the
//! journal or its archive: what replication ships to PostgreSQL and a standby checks.
//!
//! The caller only asks for records that are committed (at or below the journal's
//! `last_committed_seq`), so a record that does not parse here is damage, never a tail being
//! written.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    parse_record, record_hash, record_size, Parsed, RecordHash, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use super::segment::{list_dir, segment_file_name};
use super::{JournalError, MAX_PAYLOAD};

/// One committed record as it lies on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub seq: u64,
    /// Seq of the first record of the group commit the record belongs to.
    pub batch_start: u64,
    pub prev_hash: RecordHash,
    /// Header and payload (the bytes the hash chain covers), padding excluded.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`: the next record's `prev_hash`.
    pub hash: RecordHash,
}

impl RawRecord {
    /// Checks a record received from elsewhere (CRC, framing, its hash) and returns it parsed;
    /// the caller checks seq and chain against what it holds.
    pub fn check(bytes: Vec<u8>) -> Result<RawRecord, String> {
        let (seq, batch_start, prev_hash, len) = match parse_record(&bytes, 0) {
            Parsed::Record(r) => (r.seq, r.batch_start, r.prev_hash, r.bytes.len()),
            Parsed::End => return Err("empty record".into()),
            Parsed::Bad(reason) => return Err(reason),
        };
        if len != bytes.len() {
            return Err(format!("{} bytes after the record", bytes.len() - len));
        }
        let hash = record_hash(&bytes);
        Ok(RawRecord { seq, batch_start, prev_hash, bytes, hash })
    }

    /// The payload (what the engine decodes).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[RECORD_HEADER_LEN..]
    }
}

/// A forward cursor over committed records. Segments are looked for in the journal directory,
/// then in the archive (archiving renames files below a checkpoint; an open descriptor survives).
#[derive(Debug)]
pub struct RecordTail {
    journal: PathBuf,
    archive: PathBuf,
    /// The segment being read: its first seq, file and path.
    segment: Option<(u64, File, PathBuf)>,
    capacity: u64,
    offset: u64,
    next_seq: u64,
}

impl RecordTail {
    /// A cursor whose first [`RecordTail::read_next`] returns record `seq` (which must be committed).
    pub fn open_at(journal: &Path, archive: &Path, seq: u64) -> Result<RecordTail, JournalError> {
        let mut firsts: Vec<u64> = Vec::new();
        for dir in [journal, archive] {
            if dir.is_dir() {
                firsts.extend(list_dir(dir)?.0.into_iter().map(|s| s.first_seq));
            }
        }
        let start = firsts.into_iter().filter(|f| *f <= seq.max(1)).max().unwrap_or(1);
        let mut tail = RecordTail {
            journal: journal.to_path_buf(),
            archive: archive.to_path_buf(),
            segment: None,
            capacity: 0,
            offset: SEGMENT_HEADER_LEN,
            next_seq: start,
        };
        tail.enter(start)?;
        while tail.next_seq < seq {
            tail.read_next()?;
        }
        Ok(tail)
    }

    /// Seq of the record the next call returns.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn enter(&mut self, first_seq: u64) -> Result<(), JournalError> {
        let name = segment_file_name(first_seq);
        let live = self.journal.join(&name);
        let (file, path) = match File::open(&live) {
            Ok(file) => (file, live),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let archived = self.archive.join(&name);
                match File::open(&archived) {
                    Ok(file) => (file, archived),
                    Err(source) => return Err(JournalError::Io { path: live, source }),
                }
            }
            Err(source) => return Err(JournalError::Io { path: live, source }),
        };
        self.capacity = file
            .metadata()
            .map_err(|source| JournalError::Io { path: path.clone(), source })?
            .len();
        self.segment = Some((first_seq, file, path));
        self.offset = SEGMENT_HEADER_LEN;
        Ok(())
    }

    /// The next committed record. Moves to the next segment where the current one ends.
    pub fn read_next(&mut self) -> Result<RawRecord, JournalError> {
        let mut header = [0u8; RECORD_HEADER_LEN];
        // At most two rounds: the end of one segment, then the next segment's first record.
        for _ in 0..2 {
            let Some((_, file, path)) = &self.segment else {
                return Err(JournalError::Rejected {
                    seq: self.next_seq,
                    reason: "no segment".into(),
                });
            };
            let room = self.capacity.saturating_sub(self.offset);
            let len = if room >= RECORD_HEADER_LEN as u64 {
                file.read_exact_at(&mut header, self.offset)
                    .map_err(|source| JournalError::Io { path: path.clone(), source })?;
                u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize
            } else {
                0
            };
            if len == 0 {
                let next = self.next_seq;
                self.enter(next)?;
                continue;
            }
            let corrupt = |reason: String| JournalError::Corrupt {
                path: path.clone(),
                offset: self.offset,
                seq: self.next_seq,
                reason,
            };
            if len > MAX_PAYLOAD {
                return Err(corrupt(format!("payload length {len} over the maximum")));
            }
            let mut bytes = vec![0u8; RECORD_HEADER_LEN + len];
            file.read_exact_at(&mut bytes, self.offset)
                .map_err(|source| JournalError::Io { path: path.clone(), source })?;
            let record = RawRecord::check(bytes).map_err(corrupt)?;
            if record.seq != self.next_seq {
                return Err(corrupt(format!("found seq {} instead", record.seq)));
            }
            self.offset += record_size(len) as u64;
            self.next_seq += 1;
            return Ok(record);
        }
        Err(JournalError::Rejected {
            seq: self.next_seq,
            reason: "an empty segment follows a full one".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{archive_below, Journal, JournalOptions};

    #[test]
    fn reads_every_record_across_segments_and_the_archive_with_its_chain() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let (journal_dir, archive) = (dir.path().join("journal"), dir.path().join("archive"));
        let options = JournalOptions { segment_bytes: 4096, faults: None };
        let mut journal = Journal::open(&journal_dir, options, |_, _| Ok(())).expect("open");
        // Batches of 1..=5 records of 300 bytes: several segments of 4 KiB.
        let mut batch_starts = Vec::new();
        for batch in 1..=12u64 {
            let start = journal.next_seq();
            for i in 0..(batch % 5 + 1) {
                journal.append(&[batch as u8 + i as u8; 300]).expect("append");
                batch_starts.push(start);
            }
            journal.commit().expect("commit");
        }
        let last = journal.last_committed_seq();
        let head = journal.last_hash();
        assert!(archive_below(&journal_dir, &archive, last / 2).expect("archive") > 0);
        for from in [1, 2, last / 2, last] {
            let mut tail = RecordTail::open_at(&journal_dir, &archive, from).expect("tail");
            let mut prev = None;
            for seq in from..=last {
                let record = tail.read_next().expect("record");
                assert_eq!(record.seq, seq);
                assert_eq!(record.batch_start, batch_starts[seq as usize - 1]);
                if let Some(prev) = prev {
                    assert_eq!(record.prev_hash, prev, "chain broken at {seq}");
                }
                assert_eq!(RawRecord::check(record.bytes.clone()).map(|r| r.hash), Ok(record.hash));
                prev = Some(record.hash);
            }
            assert_eq!(prev, Some(head));
        }
        // A record changed in flight fails its check.
        let mut tail = RecordTail::open_at(&journal_dir, &archive, 3).expect("tail");
        let mut bytes = tail.read_next().expect("record").bytes;
        bytes[60] ^= 1;
        assert!(RawRecord::check(bytes).is_err());
    }
}
