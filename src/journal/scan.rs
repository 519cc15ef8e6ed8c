//! Recovery scan shared by [`super::Journal::open`] and [`super::read_all`]. Never modifies files.

use std::path::Path;

use super::format::{
    check_segment_header_of, parse_record, record_size, Parsed, RecordHash, MAX_PAYLOAD,
    SEGMENT_HEADER_LEN,
};
use super::segment::{io_err, SegmentFile};
use super::storage::Storage;
use super::JournalError;

/// Called with each record's seq, position, payload and hash (what the next record's
/// `prev_hash` must be). In a scan from an anchor, the records before the anchor's seq in its
/// segment are passed with a zero hash: they are below a checkpoint and not hashed.
pub type Visit<'a> = dyn FnMut(u64, Pos, &[u8], &RecordHash) -> Result<(), JournalError> + 'a;

/// Where a record lies: the segment (named by its first seq) and the offset in it. Stable for
/// the life of the record: archiving moves a segment file but keeps its name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    /// First seq of the segment; 0 means "no record" (no segment starts at 0).
    pub segment: u64,
    pub offset: u32,
}

impl Pos {
    pub const NONE: Pos = Pos { segment: 0, offset: 0 };
    pub const LEN: usize = 12;

    pub fn is_none(&self) -> bool {
        self.segment == 0
    }

    pub fn to_bytes(self) -> [u8; Pos::LEN] {
        let mut out = [0u8; Pos::LEN];
        out[..8].copy_from_slice(&self.segment.to_be_bytes());
        out[8..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Pos> {
        let bytes: &[u8; Pos::LEN] = bytes.try_into().ok()?;
        let mut segment = [0u8; 8];
        segment.copy_from_slice(&bytes[..8]);
        Some(Pos {
            segment: u64::from_be_bytes(segment),
            offset: u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        })
    }
}

/// Where the valid data ends because of a torn tail.
#[derive(Debug, Clone)]
pub struct Torn {
    /// Index (into the segment list) of the segment holding the hole.
    pub segment: usize,
    /// Offset of the hole (where the next record will be written after truncation).
    pub offset: u64,
    /// Seq the record at the hole should have had.
    pub seq: u64,
    /// Exclusive end of the non-zero bytes at/after the hole in that segment.
    pub zero_end: u64,
    /// Non-zero bytes discarded: `zero_end - offset` plus the data extents of later segments.
    pub bytes: u64,
    pub reason: String,
}

#[derive(Debug)]
pub struct Outcome {
    pub segments: Vec<SegmentFile>,
    pub records: u64,
    pub next_seq: u64,
    pub last_hash: RecordHash,
    /// `(segment index, offset)` where the next record goes; `None` if there are no segments.
    pub tail: Option<(usize, u64)>,
    pub torn: Option<Torn>,
    /// Hash of the record at the anchor's seq, when the scan saw it (directly, or as the
    /// `prev_hash` of the record after it).
    pub anchor_hash: Option<RecordHash>,
}

/// A record known to be in the journal with this hash: a checkpoint. A scan from an anchor
/// starts at the segment holding `seq` instead of at seq 1, and checks that the chain it reads
/// passes through the anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub hash: RecordHash,
}

fn corrupt(path: &Path, offset: u64, seq: u64, reason: String) -> JournalError {
    JournalError::Corrupt { path: path.to_path_buf(), offset, seq, reason }
}

/// Bytes of a segment a scan holds in memory at once (plus room for one largest record): the
/// scan's memory does not depend on the segment size, and reads stay large and sequential.
/// (Tests use a small window so that their small segments cross window boundaries.)
const WINDOW_BYTES: usize = if cfg!(test) { 4096 } else { 1 << 20 };
/// Room a window keeps past an offset it was asked about: a whole record of the largest size.
const RECORD_ROOM: u64 = record_size(MAX_PAYLOAD) as u64;

/// A bounded view of one segment file: `buf` holds the file's bytes `[base, base + buf.len())`.
/// Offsets given to it are offsets in the file.
struct Window<'a> {
    seg: &'a SegmentFile,
    file: Box<dyn super::storage::DiskFile>,
    len: u64,
    base: u64,
    buf: &'a mut Vec<u8>,
}

impl<'a> Window<'a> {
    /// Opens a segment and checks its header.
    fn open(
        storage: &Storage,
        seg: &'a SegmentFile,
        buf: &'a mut Vec<u8>,
        seq: u64,
    ) -> Result<Window<'a>, JournalError> {
        let file = storage.open_read(&seg.path).map_err(io_err(&seg.path))?;
        let len = file.len().map_err(io_err(&seg.path))?;
        buf.clear();
        let mut w = Window { seg, file, len, base: 0, buf };
        w.cover(0, SEGMENT_HEADER_LEN)?;
        check_segment_header_of(w.buf, len).map_err(|reason| corrupt(&seg.path, 0, seq, reason))?;
        Ok(w)
    }

    /// Makes the window hold `[off, off + need)`, or up to the end of the file.
    fn cover(&mut self, off: u64, need: u64) -> Result<(), JournalError> {
        let want_end = off.saturating_add(need).min(self.len);
        let have_end = self.base + self.buf.len() as u64;
        if off >= self.base && want_end <= have_end {
            return Ok(());
        }
        let read_end = off.saturating_add(need.max(WINDOW_BYTES as u64)).min(self.len).max(off);
        // The window is at most WINDOW_BYTES plus one record, so the length fits in usize.
        let n = (read_end - off) as usize;
        // Every byte is overwritten by the read, so a buffer long enough is only shortened,
        // not zeroed again (the zeroing was 17% of a start's instructions).
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        } else {
            self.buf.truncate(n);
        }
        self.file.read_exact_at(self.buf, off).map_err(io_err(&self.seg.path))?;
        self.base = off;
        Ok(())
    }

    /// The record at `off`, decoded exactly as [`parse_record`] would in a buffer holding the
    /// whole file.
    fn record(&mut self, off: u64) -> Result<Parsed<'_>, JournalError> {
        self.cover(off, RECORD_ROOM)?;
        // `cover` left `off` inside the window (or at the end of the file).
        Ok(parse_record(self.buf, (off - self.base) as usize))
    }

    /// Whether the 4 bytes at `off` are zero (false past the end).
    fn zero_word(&mut self, off: u64) -> Result<bool, JournalError> {
        self.cover(off, 4)?;
        let at = (off - self.base) as usize;
        Ok(self.buf.get(at..at + 4).is_some_and(|w| w == [0; 4]))
    }

    /// Exclusive end (rounded up to 8) of the last non-zero byte at or after `from`, or `from`
    /// if all of it is zero; over the rest of the file.
    fn nonzero_extent_end(&mut self, from: u64) -> Result<u64, JournalError> {
        let mut last = None;
        let mut at = from;
        while at < self.len {
            self.cover(at, WINDOW_BYTES as u64)?;
            let start = (at - self.base) as usize;
            if let Some(i) = last_nonzero(&self.buf[start..]) {
                last = Some(at + i as u64);
            }
            at = self.base + self.buf.len() as u64;
        }
        Ok(match last {
            Some(i) => ((i + 1 + 7) & !7).min(self.len),
            None => from,
        })
    }
}

/// The index of the last non-zero byte. A segment's unused rest is all zeros and a start reads
/// all of it (a torn tail may lie anywhere in it), so this looks at 32 bytes at a time (a few
/// vector instructions) before it looks at single bytes: byte by byte it was 44% of a start's
/// instructions.
fn last_nonzero(bytes: &[u8]) -> Option<usize> {
    const STRIDE: usize = 32;
    let mut end = bytes.len();
    while end >= STRIDE {
        if bytes[end - STRIDE..end].iter().fold(0u8, |any, b| any | b) != 0 {
            break;
        }
        end -= STRIDE;
    }
    bytes[..end].iter().rposition(|b| *b != 0)
}

struct Chain {
    next_seq: u64,
    /// Hash of the previous record; `None` before the first record of a scan that started
    /// after seq 1 (the record before it lies in an archived segment).
    prev_hash: Option<RecordHash>,
    batch_start: u64,
    records: u64,
}

/// Where a scan starts and what it must pass through.
fn start(
    segments: &[SegmentFile],
    anchor: Option<Anchor>,
) -> Result<(usize, Option<Anchor>), JournalError> {
    let Some(anchor) = anchor.filter(|a| a.seq > 0) else {
        return Ok((0, None));
    };
    match segments.iter().rposition(|s| s.first_seq <= anchor.seq) {
        Some(k) => Ok((k, Some(anchor))),
        None => Err(JournalError::AnchorMismatch {
            seq: anchor.seq,
            reason: "no journal segment holds the checkpoint's record".into(),
        }),
    }
}

/// Scans `segments` (sorted by first seq). Without an anchor the journal must start at seq 1
/// and every record is visited. With one, the scan starts at the segment holding the anchor's
/// record (earlier segments are not read), and fails with `AnchorMismatch` unless the record
/// after the anchor links to the anchor's hash (or the journal ends at the anchor with it).
pub fn scan(
    storage: &Storage,
    segments: Vec<SegmentFile>,
    anchor: Option<Anchor>,
    visit: &mut Visit<'_>,
) -> Result<Outcome, JournalError> {
    let (first_index, anchor) = start(&segments, anchor)?;
    let outcome = scan_from(storage, segments, first_index, anchor.map(|a| a.seq), None, visit)?;
    if let Some(a) = anchor {
        let last = outcome.next_seq - 1;
        if last < a.seq {
            return Err(JournalError::AnchorMismatch {
                seq: a.seq,
                reason: format!("the journal ends at seq {last}, before the checkpoint"),
            });
        }
        if outcome.anchor_hash != Some(a.hash) {
            return Err(JournalError::AnchorMismatch {
                seq: a.seq,
                reason: "the journal's record at the checkpoint has another hash".into(),
            });
        }
    }
    Ok(outcome)
}

/// Scans the records after a prune's anchor: the segments that remain after `pruned.seq`, the
/// first of which must start at `pruned.seq + 1` with a record linking to `pruned.hash`.
/// Segments at or below the anchor (left by a prune interrupted before it removed them) are
/// not read: the signed anchor stands for them.
pub fn scan_after_prune(
    storage: &Storage,
    segments: Vec<SegmentFile>,
    pruned: Anchor,
    visit: &mut Visit<'_>,
) -> Result<Outcome, JournalError> {
    let first_index =
        segments.iter().position(|s| s.first_seq > pruned.seq).unwrap_or(segments.len());
    scan_from(storage, segments, first_index, None, Some(pruned), visit)
}

fn scan_from(
    storage: &Storage,
    mut segments: Vec<SegmentFile>,
    first_index: usize,
    anchor_seq: Option<u64>,
    pruned: Option<Anchor>,
    visit: &mut Visit<'_>,
) -> Result<Outcome, JournalError> {
    // Segments before the start are not part of this scan (they are below a checkpoint).
    segments.drain(..first_index);
    let first_seq = segments.first().map_or(1, |s| s.first_seq);
    let initial_hash = match pruned {
        Some(p) => Some(p.hash),
        None => (first_seq == 1).then_some([0; 32]),
    };
    let mut chain =
        Chain { next_seq: first_seq, prev_hash: initial_hash, batch_start: 0, records: 0 };
    // The scan starts at the segment holding the anchor's record, so it reads that record.
    let mut anchor_hash = None;
    let Some(first) = segments.first() else {
        return Ok(Outcome {
            segments,
            records: 0,
            next_seq: pruned.map_or(1, |p| p.seq + 1),
            last_hash: pruned.map_or([0; 32], |p| p.hash),
            tail: None,
            torn: None,
            anchor_hash: None,
        });
    };
    if let Some(p) = pruned.filter(|p| first.first_seq != p.seq + 1) {
        return Err(corrupt(
            &first.path,
            0,
            p.seq + 1,
            format!(
                "records up to seq {} were pruned behind an anchor, but the first segment left \
                 starts at seq {}",
                p.seq, first.first_seq
            ),
        ));
    }
    if anchor_seq.is_none() && pruned.is_none() && first.first_seq != 1 {
        return Err(corrupt(
            &first.path,
            0,
            1,
            format!(
                "journal must start at seq 1 but its first segment starts at {}",
                first.first_seq
            ),
        ));
    }
    let mut buf = Vec::new();
    let hl = SEGMENT_HEADER_LEN;
    let mut k = 0;
    loop {
        let seg = &segments[k];
        let mut window = Window::open(storage, seg, &mut buf, chain.next_seq)?;
        let mut off = hl;
        // Normal scan: follow the record framing while the chain checks out.
        let stop_reason = loop {
            match window.record(off)? {
                Parsed::End => break None,
                Parsed::Bad(reason) => break Some(reason),
                Parsed::Record(r) => {
                    let at = off;
                    let expect = chain.next_seq;
                    if r.seq != expect {
                        return Err(corrupt(
                            &seg.path,
                            at,
                            expect,
                            format!("sequence gap: expected seq {expect}, found {}", r.seq),
                        ));
                    }
                    if chain.prev_hash.is_some_and(|h| h != r.prev_hash) {
                        return Err(corrupt(
                            &seg.path,
                            at,
                            expect,
                            "hash chain broken: prev_hash does not match the previous record"
                                .into(),
                        ));
                    }
                    // The first record of a scan from an anchor may continue a batch that
                    // began in the segment before.
                    let batch_ok = r.batch_start == r.seq
                        || (chain.records > 0 && r.batch_start == chain.batch_start)
                        || (chain.records == 0 && first_seq != 1 && r.batch_start < r.seq);
                    if !batch_ok {
                        return Err(corrupt(
                            &seg.path,
                            at,
                            expect,
                            format!("invalid batch_start {} for seq {}", r.batch_start, r.seq),
                        ));
                    }
                    // Segments are at most 1 GiB, so an offset fits in u32.
                    let pos = Pos { segment: seg.first_seq, offset: at as u32 };
                    // Below an anchor (a checkpoint) the records are framed and CRC-checked but
                    // not hashed: the anchor's own hash covers its prev_hash, and so the chain
                    // before it. SHA-256 of the records below the checkpoint in its segment was
                    // 60% of a start's instructions (callgrind, 1M records in 2 shards).
                    let below_anchor = anchor_seq.is_some_and(|a| r.seq < a);
                    let hash =
                        if below_anchor { [0; 32] } else { super::format::record_hash(r.bytes) };
                    visit(r.seq, pos, r.payload, &hash)?;
                    if anchor_seq == Some(r.seq) {
                        anchor_hash = Some(hash);
                    }
                    chain.prev_hash = (!below_anchor).then_some(hash);
                    chain.batch_start = r.batch_start;
                    chain.next_seq += 1;
                    chain.records += 1;
                    off += r.size as u64;
                }
            }
        };
        let s = chain.next_seq;
        let extent = window.nonzero_extent_end(off)?;
        let (reason, look_from) = match stop_reason {
            None if extent == off => {
                // Clean end of data in this segment.
                match segments.get(k + 1) {
                    None => {
                        drop(window);
                        return Ok(Outcome {
                            segments,
                            records: chain.records,
                            next_seq: s,
                            last_hash: chain.prev_hash.unwrap_or_default(),
                            tail: Some((k, off)),
                            torn: None,
                            anchor_hash,
                        });
                    }
                    Some(next) if next.first_seq == s => {
                        // Rotation boundary.
                        k += 1;
                        continue;
                    }
                    Some(next) => (
                        format!(
                            "data ends at seq {} but the next segment starts at seq {}",
                            s - 1,
                            next.first_seq
                        ),
                        None,
                    ),
                }
            }
            None => {
                ("non-zero bytes where the end of data was expected".to_string(), Some(off + 8))
            }
            Some(reason) => (reason, Some(off + 8)),
        };
        // Hole at (k, off). It is a torn tail only if nothing valid of a later batch follows.
        let hole_path = seg.path.clone();
        let hole_off = off;
        let mut bytes = extent - off;
        if let Some(from) = look_from {
            look_ahead(&mut window, from, s, &hole_path, hole_off)?;
        }
        drop(window);
        for later in &segments[k + 1..] {
            let mut window = Window::open(storage, later, &mut buf, s).map_err(|e| match e {
                JournalError::Corrupt { path, offset, reason, .. } => JournalError::Corrupt {
                    path,
                    offset,
                    seq: s,
                    reason: format!(
                        "unreadable segment after damaged record at {}:{hole_off}: {reason}",
                        hole_path.display()
                    ),
                },
                other => other,
            })?;
            look_ahead(&mut window, hl, s, &hole_path, hole_off)?;
            bytes += window.nonzero_extent_end(hl)? - hl;
        }
        return Ok(Outcome {
            segments,
            records: chain.records,
            next_seq: s,
            last_hash: chain.prev_hash.unwrap_or_default(),
            anchor_hash,
            tail: Some((k, hole_off)),
            torn: Some(Torn {
                segment: k,
                offset: hole_off,
                seq: s,
                zero_end: extent,
                bytes,
                reason,
            }),
        });
    }
}

/// Searches the segment from `from` on (8-byte steps) for CRC-valid records. Any that does not
/// belong to the never-completed batch of the hole at seq `s` makes the damage mid-journal:
/// `Corrupt`.
fn look_ahead(
    window: &mut Window<'_>,
    from: u64,
    s: u64,
    hole_path: &Path,
    hole_off: u64,
) -> Result<(), JournalError> {
    let mut p = from;
    let seg_path = window.seg.path.clone();
    while p + 8 <= window.len {
        if window.zero_word(p)? {
            p += 8;
            continue;
        }
        match window.record(p)? {
            Parsed::Record(r) => {
                if r.batch_start > s || r.seq <= s {
                    return Err(corrupt(
                        hole_path,
                        hole_off,
                        s,
                        format!(
                            "damaged or missing record is followed by valid record seq {} \
                             (batch_start {}) at {}:{p}",
                            r.seq,
                            r.batch_start,
                            seg_path.display()
                        ),
                    ));
                }
                p += r.size as u64;
            }
            Parsed::End | Parsed::Bad(_) => p += 8,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::last_nonzero;

    #[test]
    fn last_nonzero_agrees_with_a_byte_by_byte_search() {
        for len in [0usize, 1, 31, 32, 33, 64, 100, 1000] {
            let zeros = vec![0u8; len];
            assert_eq!(last_nonzero(&zeros), None, "len {len}");
            for at in [0, len / 3, len / 2, len.saturating_sub(1)] {
                if at >= len {
                    continue;
                }
                let mut bytes = zeros.clone();
                bytes[at] = 0x40;
                if at > 0 {
                    bytes[0] = 1;
                }
                let naive = bytes.iter().rposition(|b| *b != 0);
                assert_eq!(last_nonzero(&bytes), naive, "len {len} at {at}");
            }
        }
    }
}
