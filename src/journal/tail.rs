//! Reading committed records in seq order with their exact bytes (header and payload), from the
//! journal or its archive: what replication ships to PostgreSQL and a standby checks.
//!
//! The caller only asks for records that are committed (at or below the journal's
//! `last_committed_seq`), so a record that does not parse here is damage, never a tail being
//! written.

use std::path::{Path, PathBuf};

use super::format::{
    parse_record, record_hash, record_size, Parsed, RecordHash, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use super::segment::{list_dir, segment_file_name};
use super::storage::{DiskFile, Storage};
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

    /// The records of a buffer laid out as the journal writes them, one after another with
    /// their padding (a group commit before it is written: [`super::Journal::pending_bytes`]),
    /// each checked like [`RawRecord::check`].
    pub fn split(buf: &[u8]) -> Result<Vec<RawRecord>, String> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < buf.len() {
            match parse_record(buf, off) {
                Parsed::Record(r) => {
                    out.push(RawRecord {
                        seq: r.seq,
                        batch_start: r.batch_start,
                        prev_hash: r.prev_hash,
                        bytes: r.bytes.to_vec(),
                        hash: record_hash(r.bytes),
                    });
                    off += r.size;
                }
                Parsed::End => break,
                Parsed::Bad(reason) => return Err(format!("at byte {off}: {reason}")),
            }
        }
        Ok(out)
    }

    /// The payload (what the engine decodes).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[RECORD_HEADER_LEN..]
    }
}

/// A forward cursor over committed records. Segments are looked for in the journal directory,
/// then in the archive (archiving renames files below a checkpoint; an open descriptor survives).
/// Reads through the storage seam, so the in-memory disk's faults reach it too.
#[derive(Debug)]
pub struct RecordTail {
    journal: PathBuf,
    archive: PathBuf,
    /// The segment being read: its first seq, file and path.
    segment: Option<(u64, Box<dyn DiskFile>, PathBuf)>,
    storage: Storage,
    capacity: u64,
    offset: u64,
    next_seq: u64,
    /// Read-ahead: bytes of the current segment from file offset `cache_off`.
    cache: Vec<u8>,
    cache_off: u64,
}

/// Bytes read per pread: the records of a group commit usually come in one read.
const READ_AHEAD: usize = 64 * 1024;

impl RecordTail {
    /// A cursor whose first [`RecordTail::read_next`] returns record `seq` (which must be committed).
    pub fn open_at(journal: &Path, archive: &Path, seq: u64) -> Result<RecordTail, JournalError> {
        Self::open_at_on(Storage::real(), journal, archive, seq)
    }

    /// [`RecordTail::open_at`] on a given storage.
    pub fn open_at_on(
        storage: Storage,
        journal: &Path,
        archive: &Path,
        seq: u64,
    ) -> Result<RecordTail, JournalError> {
        let mut firsts: Vec<u64> = Vec::new();
        for dir in [journal, archive] {
            if storage.is_dir(dir) {
                firsts.extend(list_dir(&storage, dir)?.0.into_iter().map(|s| s.first_seq));
            }
        }
        let start = firsts.into_iter().filter(|f| *f <= seq.max(1)).max().unwrap_or(1);
        let mut tail = RecordTail {
            journal: journal.to_path_buf(),
            archive: archive.to_path_buf(),
            segment: None,
            storage,
            capacity: 0,
            offset: SEGMENT_HEADER_LEN,
            next_seq: start,
            cache: Vec::new(),
            cache_off: 0,
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
        let (file, path) = match self.storage.open_read(&live) {
            Ok(file) => (file, live),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let archived = self.archive.join(&name);
                match self.storage.open_read(&archived) {
                    Ok(file) => (file, archived),
                    Err(source) => return Err(JournalError::Io { path: live, source }),
                }
            }
            Err(source) => return Err(JournalError::Io { path: live, source }),
        };
        self.capacity =
            file.len().map_err(|source| JournalError::Io { path: path.clone(), source })?;
        self.segment = Some((first_seq, file, path));
        self.offset = SEGMENT_HEADER_LEN;
        self.cache.clear();
        self.cache_off = 0;
        Ok(())
    }

    /// Makes `n` bytes at file offset `at` of the current segment available in the read-ahead
    /// buffer, reading from the file unless they are there already (or `fresh` is asked for).
    fn load(&mut self, at: u64, n: usize, fresh: bool) -> Result<(), JournalError> {
        let end = at + n as u64;
        if !fresh && at >= self.cache_off && end <= self.cache_off + self.cache.len() as u64 {
            return Ok(());
        }
        let Some((_, file, path)) = &self.segment else {
            return Err(JournalError::Rejected { seq: self.next_seq, reason: "no segment".into() });
        };
        // Callers check `n <= capacity - at`.
        let want = (n.max(READ_AHEAD) as u64).min(self.capacity.saturating_sub(at)) as usize;
        self.cache.resize(want.max(n), 0);
        file.read_exact_at(&mut self.cache, at)
            .map_err(|source| JournalError::Io { path: path.clone(), source })?;
        self.cache_off = at;
        Ok(())
    }

    fn cached(&self, at: u64, n: usize) -> &[u8] {
        let start = (at - self.cache_off) as usize;
        &self.cache[start..start + n]
    }

    /// The next committed record. Moves to the next segment where the current one ends.
    ///
    /// Reads ahead, so the buffer may hold bytes of the tail that were not yet written when it
    /// was filled. A journal's bytes are written once, so such bytes are zeros or a record that
    /// fails its CRC: either is read again from the file before it is believed.
    pub fn read_next(&mut self) -> Result<RawRecord, JournalError> {
        let mut fresh = false;
        // Bounded: a stale read costs one fresh one, a segment end one move to the next.
        for _ in 0..6 {
            let room = self.capacity.saturating_sub(self.offset);
            if room < RECORD_HEADER_LEN as u64 {
                self.enter(self.next_seq)?;
                fresh = false;
                continue;
            }
            self.load(self.offset, RECORD_HEADER_LEN, fresh)?;
            let h = self.cached(self.offset, 4);
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let fits = len <= MAX_PAYLOAD && (RECORD_HEADER_LEN + len) as u64 <= room;
            if len == 0 || !fits {
                if !fresh {
                    fresh = true;
                    continue;
                }
                if len == 0 {
                    self.enter(self.next_seq)?;
                    fresh = false;
                    continue;
                }
                return Err(self.corrupt(format!("record length {len} does not fit")));
            }
            self.load(self.offset, RECORD_HEADER_LEN + len, fresh)?;
            let bytes = self.cached(self.offset, RECORD_HEADER_LEN + len).to_vec();
            let problem = match RawRecord::check(bytes) {
                Ok(record) if record.seq == self.next_seq => {
                    self.offset += record_size(len) as u64;
                    self.next_seq += 1;
                    return Ok(record);
                }
                Ok(record) => format!("found seq {} instead", record.seq),
                Err(reason) => reason,
            };
            if fresh {
                return Err(self.corrupt(problem));
            }
            fresh = true;
        }
        Err(JournalError::Rejected {
            seq: self.next_seq,
            reason: "an empty segment follows a full one".into(),
        })
    }

    fn corrupt(&self, reason: String) -> JournalError {
        JournalError::Corrupt {
            path: self.segment.as_ref().map(|s| s.2.clone()).unwrap_or_default(),
            offset: self.offset,
            seq: self.next_seq,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{archive_below, Journal, JournalOptions};

    #[test]
    fn reads_through_the_storage_seam_and_loses_what_a_crash_loses() {
        use crate::journal::MemDisk;
        let disk = MemDisk::new(7);
        let (journal_dir, archive) =
            (PathBuf::from("/sim/shard-0/journal"), PathBuf::from("/sim/shard-0/archive"));
        let options =
            JournalOptions { segment_bytes: 4096, storage: disk.storage(), ..Default::default() };
        let mut journal = Journal::open(&journal_dir, options, |_, _| Ok(())).expect("open");
        for round in 0..30u8 {
            journal.append(&[round + 1; 250]).expect("append");
            journal.commit().expect("commit");
        }
        // Only in memory: nothing of it is on the real disk.
        assert!(!journal_dir.exists());
        let mut tail =
            RecordTail::open_at_on(disk.storage(), &journal_dir, &archive, 5).expect("tail");
        for seq in 5..=30u64 {
            let record = tail.read_next().expect("record");
            assert_eq!((record.seq, record.payload()), (seq, &[seq as u8; 250][..]));
        }
        // Synced records survive a crash of that disk; nothing follows them.
        drop(journal);
        disk.crash();
        let mut after =
            RecordTail::open_at_on(disk.storage(), &journal_dir, &archive, 30).expect("tail");
        assert_eq!(after.read_next().map(|r| r.seq).ok(), Some(30));
        assert!(after.read_next().is_err(), "a record beyond the last commit after the crash");
    }

    #[test]
    fn a_group_commit_is_shipped_as_the_journal_writes_it() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let (journal_dir, archive) = (dir.path().join("journal"), dir.path().join("archive"));
        let options = JournalOptions { segment_bytes: 4096, ..Default::default() };
        let mut journal = Journal::open(&journal_dir, options, |_, _| Ok(())).expect("open");
        for round in 0..6u8 {
            // Enough records to cross a 4 KiB segment within one group commit now and then.
            let first = journal.next_seq();
            for i in 0..(round + 2) {
                journal.append(&[round * 16 + i + 1; 700]).expect("append");
            }
            let pending = journal.pending_bytes().to_vec();
            let split = RawRecord::split(&pending).expect("pending records parse");
            assert_eq!(split.len(), usize::from(round + 2));
            assert_eq!(split.last().map(|r| r.hash), Some(journal.last_hash()));
            journal.commit().expect("commit");
            assert_eq!(journal.last_committed_seq(), first + u64::from(round) + 1);
            assert!(journal.pending_bytes().is_empty());
            // What was shipped is what a reader of the journal finds, byte for byte.
            let mut tail = RecordTail::open_at(&journal_dir, &archive, first).expect("tail");
            for shipped in &split {
                assert_eq!(shipped.batch_start, first);
                assert_eq!(&tail.read_next().expect("committed record"), shipped);
            }
        }
        drop(journal);
        let mut seen = 0;
        let options = JournalOptions { segment_bytes: 4096, ..Default::default() };
        let reopened = Journal::open(&journal_dir, options, |_, _| {
            seen += 1;
            Ok(())
        });
        assert!(reopened.is_ok());
        assert_eq!(seen, (2..8).sum::<u64>());
        // A length with a wrong CRC behind it is refused, not skipped.
        let mut bad = vec![0u8; 70];
        bad[0] = 5;
        assert!(RawRecord::split(&bad).is_err());
    }

    #[test]
    fn reads_every_record_across_segments_and_the_archive_with_its_chain() {
        let Ok(dir) = tempfile::tempdir() else { return };
        let (journal_dir, archive) = (dir.path().join("journal"), dir.path().join("archive"));
        let options = JournalOptions { segment_bytes: 4096, ..Default::default() };
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
        // A cursor that read ahead over the unwritten tail still sees what is committed later
        // (its buffer held zeros there).
        let mut tail = RecordTail::open_at(&journal_dir, &archive, last).expect("tail");
        assert_eq!(tail.read_next().expect("last").seq, last);
        for round in 0..20u8 {
            journal.append(&[round; 200]).expect("append");
            journal.commit().expect("commit");
            let record = tail.read_next().expect("new record");
            assert_eq!(
                (record.seq, record.payload()),
                (journal.last_committed_seq(), &[round; 200][..])
            );
        }
        // A record changed in flight fails its check.
        let mut tail = RecordTail::open_at(&journal_dir, &archive, 3).expect("tail");
        let mut bytes = tail.read_next().expect("record").bytes;
        bytes[60] ^= 1;
        assert!(RawRecord::check(bytes).is_err());
    }
}
