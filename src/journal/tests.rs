use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{encode_record, parse_record, record_hash, Parsed, RecordHash};
use super::segment::{self, segment_file_name};
use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Records = Vec<(u64, Vec<u8>)>;

const SEG: u64 = 4096;

fn list_dir(dir: &Path) -> Result<(Vec<segment::SegmentFile>, Vec<PathBuf>), JournalError> {
    segment::list_dir(&Storage::real(), dir)
}

fn opts(segment_bytes: u64) -> JournalOptions {
    JournalOptions { segment_bytes, ..Default::default() }
}

/// Deterministic payload for `seq`: 1..=150 bytes, all non-zero.
fn payload(seq: u64) -> Vec<u8> {
    let len = 1 + (seq * 37 % 150) as usize;
    (0..len).map(|i| ((seq as usize * 7 + i) % 251 + 1) as u8).collect()
}

fn expected(seqs: std::ops::RangeInclusive<u64>) -> Records {
    seqs.map(|s| (s, payload(s))).collect()
}

fn open_collect(dir: &Path, o: JournalOptions) -> Result<(Journal, Records), JournalError> {
    let mut seen = Vec::new();
    let j = Journal::open(dir, o, |s, p| {
        seen.push((s, p.to_vec()));
        Ok(())
    })?;
    Ok((j, seen))
}

fn append_batches(j: &mut Journal, batches: &[usize]) -> Result<(), JournalError> {
    for &n in batches {
        for _ in 0..n {
            let s = j.next_seq();
            assert_eq!(j.append(&payload(s))?, s);
        }
        j.commit()?;
        assert_eq!(j.pending(), 0);
    }
    Ok(())
}

/// Creates a journal in `dir` holding `batches`; returns the last seq.
fn write_batches(dir: &Path, seg: u64, batches: &[usize]) -> Result<u64, JournalError> {
    let (mut j, _) = open_collect(dir, opts(seg))?;
    append_batches(&mut j, batches)?;
    Ok(j.next_seq() - 1)
}

fn read_collect(dir: &Path) -> Result<(ReadSummary, Records), JournalError> {
    let mut seen = Vec::new();
    let summary = read_all(dir, |s, p| {
        seen.push((s, p.to_vec()));
        Ok(())
    })?;
    Ok((summary, seen))
}

#[derive(Debug, Clone)]
struct Loc {
    seq: u64,
    batch_start: u64,
    path: PathBuf,
    off: u64,
    /// Header + payload bytes.
    len: usize,
    prev_hash: RecordHash,
    hash: RecordHash,
}

/// Layout of an intact journal, parsed independently of the recovery code.
fn layout(dir: &Path) -> Result<Vec<Loc>, Box<dyn std::error::Error>> {
    let (segs, _) = list_dir(dir)?;
    let mut out = Vec::new();
    for seg in segs {
        let buf = fs::read(&seg.path)?;
        let mut off = SEGMENT_HEADER_LEN as usize;
        let mut first = true;
        while let Parsed::Record(r) = parse_record(&buf, off) {
            if first {
                assert_eq!(r.seq, seg.first_seq, "segment name must be its first seq");
                first = false;
            }
            out.push(Loc {
                seq: r.seq,
                batch_start: r.batch_start,
                path: seg.path.clone(),
                off: off as u64,
                len: r.bytes.len(),
                prev_hash: r.prev_hash,
                hash: record_hash(r.bytes),
            });
            off += r.size;
        }
    }
    Ok(out)
}

fn find(locs: &[Loc], seq: u64) -> Result<Loc, Box<dyn std::error::Error>> {
    locs.iter().find(|l| l.seq == seq).cloned().ok_or_else(|| format!("no seq {seq}").into())
}

fn copy_journal(src: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src)? {
        let e = e?;
        fs::copy(e.path(), dst.join(e.file_name()))?;
    }
    Ok(())
}

/// All files and their bytes, sorted by name.
fn snapshot(dir: &Path) -> io::Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let bytes = fs::read(&p)?;
        v.push((p, bytes));
    }
    v.sort();
    Ok(v)
}

fn patch(path: &Path, f: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
    let mut b = fs::read(path)?;
    f(&mut b);
    fs::write(path, b)
}

fn assert_corrupt(err: JournalError, path: &Path, offset: u64, seq: u64) -> Option<String> {
    match err {
        JournalError::Corrupt { path: p, offset: o, seq: s, reason } => {
            assert_eq!((p.as_path(), o, s), (path, offset, seq), "{reason}");
            Some(reason)
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn round_trip_across_rotations() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("shard-3").join("journal");
    let rest = [7, 50, 3, 120, 1, 30];
    let total: u64 = 2 + rest.iter().sum::<usize>() as u64;
    {
        let (mut j, seen) = open_collect(&dir, opts(SEG))?;
        assert!(seen.is_empty());
        assert_eq!((j.next_seq(), j.pending(), j.last_committed_seq()), (1, 0, 0));
        j.append(&payload(1))?;
        j.append(&payload(2))?;
        assert_eq!((j.next_seq(), j.pending(), j.last_committed_seq()), (3, 2, 0));
        j.commit()?;
        assert_eq!((j.next_seq(), j.pending(), j.last_committed_seq()), (3, 0, 2));
        append_batches(&mut j, &rest)?;
        j.append(&payload(total + 1))?;
        j.append(&payload(total + 2))?;
        // Dropped without commit: must not reappear.
    }
    let (mut j, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=total));
    assert_eq!(j.next_seq(), total + 1);
    append_batches(&mut j, &[4, 6])?;
    drop(j);
    let (j, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=total + 10));
    assert_eq!(j.next_seq(), total + 11);
    drop(j);

    // Hash chain, seq and batch_start verified independently, across segments and reopens.
    let locs = layout(&dir)?;
    assert_eq!(locs.len() as u64, total + 10);
    let mut prev = [0u8; 32];
    let mut batch_starts = Vec::new();
    for (i, l) in locs.iter().enumerate() {
        assert_eq!(l.seq, i as u64 + 1);
        assert_eq!(l.prev_hash, prev, "chain at seq {}", l.seq);
        prev = l.hash;
        batch_starts.push(l.batch_start);
    }
    // First record of each batch has batch_start == seq.
    let mut starts = vec![1u64];
    for &n in &[2usize, 7, 50, 3, 120, 1, 30, 4, 6][..8] {
        starts.push(starts[starts.len() - 1] + n as u64);
    }
    for s in starts {
        assert_eq!(batch_starts[s as usize - 1], s);
    }
    let (segs, tmps) = list_dir(&dir)?;
    assert!(segs.len() >= 5, "expected several rotations, got {}", segs.len());
    assert!(tmps.is_empty(), "drop must clean up the preallocated segment: {tmps:?}");
    let first_in_segments: Vec<u64> = segs.iter().map(|s| s.first_seq).collect();
    assert_eq!(first_in_segments[0], 1);
    for s in &segs {
        assert_eq!(fs::metadata(&s.path)?.len(), SEG, "segments are preallocated");
    }

    let (summary, seen) = read_collect(&dir)?;
    assert_eq!(seen, expected(1..=total + 10));
    assert_eq!(
        summary,
        ReadSummary {
            records: total + 10,
            last_seq: total + 10,
            segments: segs.len() as u32,
            torn_tail_bytes: 0,
            torn_tail: None,
        }
    );
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Zero,
    Garbage,
}

fn damage(bytes: &mut [u8], from: usize, to: usize, how: Damage, seed: usize) {
    for (i, b) in bytes[from..to].iter_mut().enumerate() {
        *b = match how {
            Damage::Zero => 0,
            // XOR with a non-zero value: every byte changes.
            Damage::Garbage => *b ^ ((((from + i) * 131 + seed * 17) % 255) as u8 + 1),
        };
    }
}

fn torn_last_record_everywhere(template: &Path, n: u64) -> TestResult {
    let locs = layout(template)?;
    let last = find(&locs, n)?;
    assert_eq!(locs.len() as u64, n);
    let mut cases = 0;
    for cut in last.off as usize..last.off as usize + last.len {
        for how in [Damage::Zero, Damage::Garbage] {
            let tmp = tempfile::tempdir()?;
            let dir = tmp.path().join("j");
            copy_journal(template, &dir)?;
            let end = last.off as usize + last.len;
            patch(&dir.join(last.path.file_name().ok_or("name")?), |b| {
                damage(b, cut, end, how, cut)
            })?;
            let ctx = format!("cut at {cut} ({how:?})");

            let (summary, seen) = read_collect(&dir)?;
            assert_eq!(seen, expected(1..=n - 1), "{ctx}");
            if matches!(how, Damage::Zero) && cut == last.off as usize {
                // Fully zeroed: indistinguishable from a clean end, nothing to truncate.
                assert_eq!((summary.torn_tail, summary.torn_tail_bytes), (None, 0), "{ctx}");
            } else {
                let torn = summary.torn_tail.ok_or_else(|| format!("no torn tail: {ctx}"))?;
                assert_eq!((torn.offset, torn.seq), (last.off, n), "{ctx}");
                assert!(summary.torn_tail_bytes > 0, "{ctx}");
            }

            let (mut j, seen) = open_collect(&dir, opts(SEG))?;
            assert_eq!(seen, expected(1..=n - 1), "{ctx}");
            assert_eq!(j.next_seq(), n, "{ctx}");
            assert_eq!(j.append(b"after repair")?, n);
            j.commit()?;
            drop(j);
            let (j, seen) = open_collect(&dir, opts(SEG))?;
            let mut want = expected(1..=n - 1);
            want.push((n, b"after repair".to_vec()));
            assert_eq!(seen, want, "{ctx}");
            assert_eq!(j.next_seq(), n + 1);
            drop(j);
            let (summary, _) = read_collect(&dir)?;
            assert_eq!(summary.torn_tail, None, "{ctx}");
            cases += 1;
        }
    }
    assert!(cases > 2 * 56);
    Ok(())
}

#[test]
fn torn_tail_at_every_offset_of_last_record() -> TestResult {
    // Last record in the middle of a segment, after a multi-record batch.
    let tmp = tempfile::tempdir()?;
    let template = tmp.path().join("mid");
    let n = write_batches(&template, SEG, &[3, 2, 1])?;
    torn_last_record_everywhere(&template, n)?;

    // Last record is the first record of its segment.
    let template = tmp.path().join("first");
    let (mut j, _) = open_collect(&template, opts(SEG))?;
    loop {
        append_batches(&mut j, &[1])?;
        let first_in_seg =
            j.active.path.file_name() == Some(segment_file_name(j.next_seq() - 1).as_ref());
        if first_in_seg && j.next_seq() > 2 {
            break;
        }
        assert!(j.next_seq() < 200, "no rotation happened");
    }
    let n = j.next_seq() - 1;
    drop(j);
    assert_eq!(find(&layout(&template)?, n)?.off, SEGMENT_HEADER_LEN);
    torn_last_record_everywhere(&template, n)
}

#[test]
fn torn_last_batch_persisted_out_of_order() -> TestResult {
    for how in [Damage::Zero, Damage::Garbage] {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("j");
        write_batches(&dir, SEG, &[3, 5])?; // seqs 1..=3, then 4..=8
        let locs = layout(&dir)?;
        let hole = find(&locs, 5)?;
        patch(&hole.path, |b| {
            damage(b, hole.off as usize, (hole.off as usize) + hole.len, how, 1)
        })?;
        let (summary, seen) = read_collect(&dir)?;
        assert_eq!(seen, expected(1..=4));
        let torn = summary.torn_tail.ok_or("torn tail expected")?;
        assert_eq!((torn.seq, torn.offset, torn.dead_segments), (5, hole.off, 0));
        // Records 6..=8 are intact behind the hole and count as torn bytes.
        let after = find(&locs, 8)?;
        assert!(summary.torn_tail_bytes >= after.off + after.len as u64 - hole.off - 8);

        let (mut j, seen) = open_collect(&dir, opts(SEG))?;
        assert_eq!(seen, expected(1..=4));
        assert_eq!(j.append(b"x")?, 5);
        j.commit()?;
        drop(j);
        let (summary, seen) = read_collect(&dir)?;
        assert_eq!(summary.torn_tail, None, "stale records 6..=8 must have been zeroed");
        assert_eq!(seen.len(), 5);
        assert_eq!(seen[4], (5, b"x".to_vec()));
    }
    Ok(())
}

#[test]
fn hole_followed_by_later_batch_is_corrupt() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("j");
    write_batches(&dir, SEG, &[3, 5, 2])?;
    let hole = find(&layout(&dir)?, 5)?;
    patch(&hole.path, |b| {
        damage(b, hole.off as usize, hole.off as usize + hole.len, Damage::Zero, 0)
    })?;
    let before = snapshot(&dir)?;
    let err = read_collect(&dir).err().ok_or("read_all must fail")?;
    assert_corrupt(err, &hole.path, hole.off, 5);
    let err = open_collect(&dir, opts(SEG)).err().ok_or("open must fail")?;
    let reason = assert_corrupt(err, &hole.path, hole.off, 5).unwrap_or_default();
    assert!(reason.contains("seq 9"), "{reason}");
    assert_eq!(snapshot(&dir)?, before, "a refused open must not modify files");
    Ok(())
}

#[test]
fn torn_batch_spanning_segments() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let template = tmp.path().join("t");
    write_batches(&template, SEG, &[10, 60])?;
    let locs = layout(&template)?;
    let first = find(&locs, 11)?;
    let segs_of_batch: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> =
            locs.iter().filter(|l| l.seq >= 11).map(|l| l.path.clone()).collect();
        v.dedup();
        v
    };
    assert!(segs_of_batch.len() >= 2, "batch must span segments");

    // 1. The part in the first segment was lost, later segments persisted.
    let dir = tmp.path().join("a");
    copy_journal(&template, &dir)?;
    let first_path = dir.join(first.path.file_name().ok_or("name")?);
    patch(&first_path, |b| {
        let end = b.len();
        b[first.off as usize..end].fill(0);
    })?;
    let (summary, _) = read_collect(&dir)?;
    let torn = summary.torn_tail.ok_or("torn expected")?;
    assert_eq!((torn.seq, torn.offset), (11, first.off));
    assert_eq!(torn.dead_segments as usize, segs_of_batch.len() - 1);
    let (mut j, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=10));
    for p in &segs_of_batch[1..] {
        assert!(!dir.join(p.file_name().ok_or("name")?).exists(), "{p:?} must be removed");
    }
    append_batches(&mut j, &[60])?;
    drop(j);
    let (_, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=70));

    // 2. The part in the last segment was lost: the persisted prefix of the batch survives
    // (unacknowledged, so either outcome is allowed), never a partial record.
    let dir = tmp.path().join("b");
    copy_journal(&template, &dir)?;
    let last_seg = segs_of_batch.last().ok_or("segs")?;
    patch(&dir.join(last_seg.file_name().ok_or("name")?), |b| {
        let end = b.len();
        b[SEGMENT_HEADER_LEN as usize..end].fill(0);
    })?;
    let first_lost = locs.iter().find(|l| &l.path == last_seg).ok_or("loc")?.seq;
    let (mut j, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=first_lost - 1));
    append_batches(&mut j, &[3])?;
    drop(j);
    let (_, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=first_lost + 2));
    Ok(())
}

#[test]
fn flipped_byte_before_tail_is_corrupt() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let template = tmp.path().join("t");
    let n = write_batches(&template, SEG, &[1; 60])?;
    let locs = layout(&template)?;
    // A record in the middle of the first segment and the first record of the second one.
    let second_seg_first = locs.iter().find(|l| l.off == SEGMENT_HEADER_LEN && l.seq > 1);
    let targets = [find(&locs, 10)?, second_seg_first.cloned().ok_or("no 2nd segment")?];
    for t in targets {
        assert!(t.seq < n);
        for pos in [0, 1, 3, 4, 7, 8, 15, 16, 23, 24, 40, 55, 56, t.len - 1] {
            let dir = tmp.path().join(format!("c-{}-{pos}", t.seq));
            copy_journal(&template, &dir)?;
            let path = dir.join(t.path.file_name().ok_or("name")?);
            patch(&path, |b| b[t.off as usize + pos] ^= 0x5A)?;
            let before = snapshot(&dir)?;
            let err = open_collect(&dir, opts(SEG)).err().ok_or("open must fail")?;
            assert_corrupt(err, &path, t.off, t.seq);
            let err = read_collect(&dir).err().ok_or("read_all must fail")?;
            assert_corrupt(err, &path, t.off, t.seq);
            assert_eq!(snapshot(&dir)?, before);
        }
    }
    Ok(())
}

/// Rewrites record `seq` with a valid CRC but a changed field.
fn reencode(dir: &Path, seq: u64, new_seq: u64, prev: Option<RecordHash>) -> TestResult {
    let locs = layout(dir)?;
    let l = find(&locs, seq)?;
    let mut rec = Vec::new();
    encode_record(&mut rec, new_seq, l.batch_start, &prev.unwrap_or(l.prev_hash), &payload(seq));
    patch(&l.path, |b| b[l.off as usize..l.off as usize + rec.len()].copy_from_slice(&rec))?;
    Ok(())
}

#[test]
fn valid_crc_but_broken_chain_or_seq_is_corrupt() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let t = tmp.path().join("t");
    write_batches(&t, SEG, &[1; 20])?;
    let l = find(&layout(&t)?, 10)?;

    let dir = tmp.path().join("chain");
    copy_journal(&t, &dir)?;
    reencode(&dir, 10, 10, Some([7; 32]))?;
    let err = open_collect(&dir, opts(SEG)).err().ok_or("must fail")?;
    let reason = assert_corrupt(err, &dir.join(l.path.file_name().ok_or("n")?), l.off, 10);
    assert!(reason.unwrap_or_default().contains("chain"));

    let dir = tmp.path().join("seq");
    copy_journal(&t, &dir)?;
    reencode(&dir, 10, 11, None)?;
    let err = read_collect(&dir).err().ok_or("must fail")?;
    let reason = assert_corrupt(err, &dir.join(l.path.file_name().ok_or("n")?), l.off, 10);
    assert!(reason.unwrap_or_default().contains("sequence gap"));
    Ok(())
}

#[test]
fn missing_or_unreadable_segment_is_corrupt() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let t = tmp.path().join("t");
    write_batches(&t, SEG, &[1; 100])?;
    let (segs, _) = list_dir(&t)?;
    assert!(segs.len() >= 3);

    // Middle segment missing: seq gap.
    let dir = tmp.path().join("gap");
    copy_journal(&t, &dir)?;
    fs::remove_file(dir.join(segs[1].path.file_name().ok_or("n")?))?;
    let err = open_collect(&dir, opts(SEG)).err().ok_or("must fail")?;
    assert!(matches!(err, JournalError::Corrupt { seq, .. } if seq == segs[1].first_seq));

    // First segment missing.
    let dir = tmp.path().join("first");
    copy_journal(&t, &dir)?;
    fs::remove_file(dir.join(segs[0].path.file_name().ok_or("n")?))?;
    let err = open_collect(&dir, opts(SEG)).err().ok_or("must fail")?;
    assert!(matches!(err, JournalError::Corrupt { seq: 1, offset: 0, .. }), "{err:?}");

    // Damaged header of a middle segment.
    let dir = tmp.path().join("hdr");
    copy_journal(&t, &dir)?;
    let p = dir.join(segs[1].path.file_name().ok_or("n")?);
    patch(&p, |b| b[2] ^= 1)?;
    let err = read_collect(&dir).err().ok_or("must fail")?;
    assert_corrupt(err, &p, 0, segs[1].first_seq);
    Ok(())
}

fn check_after_failed_commit(dir: &Path, committed: u64, failed_batch: u64) -> TestResult {
    let (summary, seen) = read_collect(dir)?;
    assert!(summary.records >= committed && summary.records <= committed + failed_batch);
    let (j, seen2) = open_collect(dir, opts(SEG))?;
    assert_eq!(seen, seen2);
    let m = seen.len() as u64;
    assert!(m >= committed, "acknowledged records lost: {m} < {committed}");
    assert!(m <= committed + failed_batch);
    assert_eq!(seen, expected(1..=m), "records are whole and in order");
    assert_eq!(j.next_seq(), m + 1);
    drop(j);
    assert_eq!(read_collect(dir)?.0.torn_tail, None);
    Ok(())
}

#[test]
fn failed_sync_poisons() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("j");
    let faults = Arc::new(FaultInjector::new());
    let o =
        JournalOptions { segment_bytes: SEG, faults: Some(faults.clone()), ..Default::default() };
    let (mut j, _) = open_collect(&dir, o)?;
    append_batches(&mut j, &[5, 5])?;
    append_batches(&mut j, &[3])?;
    for _ in 0..4 {
        let s = j.next_seq();
        j.append(&payload(s))?;
    }
    faults.fail_next_sync_with(libc::EIO);
    match j.commit() {
        Err(JournalError::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EIO)),
        other => panic!("expected Io error, got {other:?}"),
    }
    assert_eq!(faults.triggered(), 1);
    assert!(j.is_poisoned());
    assert!(matches!(j.append(b"more"), Err(JournalError::Poisoned)));
    assert!(matches!(j.commit(), Err(JournalError::Poisoned)));
    assert_eq!(j.last_committed_seq(), 13);
    drop(j);
    check_after_failed_commit(&dir, 13, 4)
}

#[test]
fn failed_write_enospc_poisons() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("j");
    let faults = Arc::new(FaultInjector::new());
    let o =
        JournalOptions { segment_bytes: SEG, faults: Some(faults.clone()), ..Default::default() };
    let (mut j, _) = open_collect(&dir, o)?;
    append_batches(&mut j, &[7])?;
    // A batch spanning segments; the first write is short and fails.
    for _ in 0..80 {
        let s = j.next_seq();
        j.append(&payload(s))?;
    }
    faults.fail_next_write_with(libc::ENOSPC);
    match j.commit() {
        Err(JournalError::Io { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC))
        }
        other => panic!("expected Io error, got {other:?}"),
    }
    assert!(matches!(j.commit(), Err(JournalError::Poisoned)));
    assert!(matches!(j.append(b"x"), Err(JournalError::Poisoned)));
    drop(j);
    check_after_failed_commit(&dir, 7, 80)?;

    // An io::ErrorKind fault on a later write of a multi-segment batch (the first sync passes).
    let dir = tmp.path().join("k");
    let faults = Arc::new(FaultInjector::new());
    let o =
        JournalOptions { segment_bytes: SEG, faults: Some(faults.clone()), ..Default::default() };
    let (mut j, _) = open_collect(&dir, o)?;
    append_batches(&mut j, &[2])?;
    for _ in 0..80 {
        let s = j.next_seq();
        j.append(&payload(s))?;
    }
    j.commit()?;
    for _ in 0..80 {
        let s = j.next_seq();
        j.append(&payload(s))?;
    }
    faults.fail_next_write_with(io::ErrorKind::Other);
    assert!(matches!(j.commit(), Err(JournalError::Io { .. })));
    assert!(matches!(j.commit(), Err(JournalError::Poisoned)));
    drop(j);
    check_after_failed_commit(&dir, 82, 80)
}

#[test]
fn read_all_reports_torn_tail_without_modifying() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("j");
    let n = write_batches(&dir, SEG, &[4, 4, 30])?;
    let last = find(&layout(&dir)?, n)?;
    patch(&last.path, |b| {
        damage(b, last.off as usize + 20, last.off as usize + last.len, Damage::Garbage, 3)
    })?;
    fs::write(dir.join("prealloc-leftover.tmp"), b"junk")?;
    let before = snapshot(&dir)?;
    let (summary, seen) = read_collect(&dir)?;
    assert_eq!(snapshot(&dir)?, before, "read_all must not modify anything");
    assert_eq!(seen, expected(1..=n - 1));
    assert_eq!(summary.records, n - 1);
    assert_eq!(summary.last_seq, n - 1);
    assert_eq!(summary.torn_tail_bytes, (last.len as u64).div_ceil(8) * 8);
    let torn = summary.torn_tail.ok_or("torn")?;
    assert_eq!((&torn.path, torn.offset, torn.seq), (&last.path, last.off, n));
    // JournalReader is the same scan.
    assert_eq!(
        JournalReader::read_all(&dir, |_, _| Ok(()))?.torn_tail_bytes,
        summary.torn_tail_bytes
    );

    // open repairs it and removes the temporary file.
    let (j, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen.len() as u64, n - 1);
    drop(j);
    assert!(!dir.join("prealloc-leftover.tmp").exists());
    let (summary, _) = read_collect(&dir)?;
    assert_eq!((summary.torn_tail_bytes, summary.torn_tail), (0, None));
    Ok(())
}

#[test]
fn crash_after_segment_install() -> TestResult {
    let tmp = tempfile::tempdir()?;
    // Installed (renamed) empty segment with the right name: it becomes the active segment.
    let dir = tmp.path().join("ok");
    let n = write_batches(&dir, SEG, &[5])?;
    let prepared = segment::prepare(&Storage::real(), &dir, SEG, None)?;
    segment::install(&Storage::real(), prepared, &dir, n + 1)?;
    fs::write(dir.join("prealloc-123-0-0.tmp"), vec![0u8; 100])?;
    let (mut j, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=n));
    assert!(!dir.join("prealloc-123-0-0.tmp").exists());
    assert_eq!(j.active.path, dir.join(segment_file_name(n + 1)));
    append_batches(&mut j, &[2])?;
    drop(j);
    let (_, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=n + 2));

    // Installed empty segment whose name does not follow (its batch was torn): removed.
    let dir = tmp.path().join("bad");
    let n = write_batches(&dir, SEG, &[5])?;
    let prepared = segment::prepare(&Storage::real(), &dir, SEG, None)?;
    let (_, stray) = segment::install(&Storage::real(), prepared, &dir, n + 4)?;
    let (summary, _) = read_collect(&dir)?;
    assert_eq!(summary.torn_tail.map(|t| (t.seq, t.dead_segments)), Some((n + 1, 1)));
    let (mut j, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=n));
    assert!(!stray.exists());
    append_batches(&mut j, &[1])?;
    drop(j);
    let (_, seen) = open_collect(&dir, opts(SEG))?;
    assert_eq!(seen, expected(1..=n + 1));
    Ok(())
}

#[test]
fn limits_and_options() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("j");
    for bad in [0, 1000, 4097, MAX_SEGMENT_BYTES + 8] {
        let r = Journal::open(&dir, opts(bad), |_, _| Ok(()));
        assert!(matches!(r, Err(JournalError::InvalidOptions(_))), "{bad}");
    }
    assert_eq!(JournalOptions::default().segment_bytes, 64 * 1024 * 1024);
    assert!(JournalOptions::default().faults.is_none());

    let (mut j, _) = open_collect(&dir, opts(128 * 1024))?;
    assert_eq!(j.max_payload(), MAX_PAYLOAD);
    assert!(matches!(j.append(b""), Err(JournalError::EmptyPayload)));
    let big = vec![0xAB; MAX_PAYLOAD + 1];
    match j.append(&big) {
        Err(JournalError::PayloadTooLarge { len, max }) => {
            assert_eq!((len, max), (MAX_PAYLOAD + 1, MAX_PAYLOAD))
        }
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(j.pending(), 0);
    assert_eq!(j.append(&big[..MAX_PAYLOAD])?, 1);
    assert_eq!(j.append(&big[..MAX_PAYLOAD])?, 2); // needs a rotation
    j.commit()?;
    drop(j);
    let (j, seen) = open_collect(&dir, opts(128 * 1024))?;
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|(_, p)| p.len() == MAX_PAYLOAD));
    drop(j);

    // Small segments bound the payload further.
    let (mut j, _) = open_collect(&tmp.path().join("small"), opts(SEG))?;
    let max = j.max_payload();
    assert_eq!(max, SEG as usize - 32 - 56);
    assert!(matches!(j.append(&big[..max + 1]), Err(JournalError::PayloadTooLarge { .. })));
    j.append(&big[..max])?;
    j.append(&big[..max])?;
    j.commit()?;
    assert!(!j.is_poisoned());

    // A visitor error aborts open.
    drop(j);
    let r = Journal::open(&tmp.path().join("small"), opts(SEG), |seq, _| {
        Err(JournalError::Rejected { seq, reason: "no".into() })
    });
    assert!(matches!(r, Err(JournalError::Rejected { seq: 1, .. })));
    Ok(())
}

#[test]
fn journal_is_send_and_injector_is_sync() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<Journal>();
    assert_send_sync::<FaultInjector>();
    assert_send_sync::<JournalError>();
}

/// Checkpoints: a scan from an anchor reads only the segment holding it and later ones, the
/// segments below it can be archived, and a full scan reads archive and journal as one chain.
#[test]
fn anchored_open_and_archive() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("journal");
    let archive = tmp.path().join("archive");
    let (mut j, _) = open_collect(&dir, opts(SEG))?;
    append_batches(&mut j, &[7, 30, 1, 55, 12, 40])?;
    let anchor = Anchor { seq: j.last_committed_seq(), hash: j.last_hash() };
    append_batches(&mut j, &[9, 3])?;
    let last = j.next_seq() - 1;
    drop(j);
    let segments_before = list_dir(&dir)?.0.len();
    assert!(segments_before > 3, "the test needs several segments");

    let moved = archive_below(&dir, &archive, anchor.seq)?;
    assert!(moved > 0);
    assert_eq!(list_dir(&dir)?.0.len() + moved, segments_before);
    assert_eq!(list_dir(&archive)?.0.len(), moved);
    let first_live = list_dir(&dir)?.0[0].first_seq;
    assert!(first_live <= anchor.seq);

    // From the anchor: only live segments are read, the records after it all visited.
    let mut seen = Vec::new();
    let mut j = Journal::open_from(&dir, opts(SEG), Start::Anchor(anchor), |s, p| {
        seen.push((s, p.to_vec()));
        Ok(())
    })?;
    assert_eq!(seen, expected(first_live..=last));
    append_batches(&mut j, &[4])?;
    let last = j.next_seq() - 1;
    drop(j);

    // A full scan needs the archive; with it, one unbroken chain from seq 1.
    assert!(matches!(read_collect(&dir), Err(JournalError::Corrupt { .. })));
    let mut all = Vec::new();
    let summary = read_from(&dir, Start::Full { archive: Some(&archive) }, |s, p| {
        all.push((s, p.to_vec()));
        Ok(())
    })?;
    assert_eq!(all, expected(1..=last));
    assert_eq!(summary.last_seq, last);

    // A checkpoint the journal does not pass through is refused, never trusted.
    let wrong = Anchor { seq: anchor.seq, hash: [7; 32] };
    let err = Journal::open_from(&dir, opts(SEG), Start::Anchor(wrong), |_, _| Ok(()));
    assert!(matches!(err, Err(JournalError::AnchorMismatch { .. })), "{err:?}");
    let beyond = Anchor { seq: last + 10, hash: anchor.hash };
    let err = read_from(&dir, Start::Anchor(beyond), |_, _| Ok(()));
    assert!(matches!(err, Err(JournalError::AnchorMismatch { .. })), "{err:?}");
    let below = Anchor { seq: 1, hash: anchor.hash };
    let err = read_from(&dir, Start::Anchor(below), |_, _| Ok(()));
    assert!(matches!(err, Err(JournalError::AnchorMismatch { .. })), "archived: {err:?}");
    // A damaged record after the anchor is still corruption, not a fallback.
    let locs = layout(&dir)?;
    let target = find(&locs, last - 5)?;
    patch(&target.path, |b| b[target.off as usize + 60] ^= 0xff)?;
    let err = read_from(&dir, Start::Anchor(anchor), |_, _| Ok(()));
    assert!(matches!(err, Err(JournalError::Corrupt { .. })), "{err:?}");
    Ok(())
}

/// A segment left in both places by a copy to another disk that crashed before the original
/// was removed is read once.
#[test]
fn segment_in_archive_and_journal_is_read_once() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("journal");
    let archive = tmp.path().join("archive");
    let last = write_batches(&dir, SEG, &[40, 40, 40, 40])?;
    fs::create_dir_all(&archive)?;
    let first = list_dir(&dir)?.0[0].path.clone();
    fs::copy(&first, archive.join(first.file_name().ok_or("name")?))?;
    let mut all = Vec::new();
    read_from(&dir, Start::Full { archive: Some(&archive) }, |s, p| {
        all.push((s, p.to_vec()));
        Ok(())
    })?;
    assert_eq!(all, expected(1..=last));
    Ok(())
}
