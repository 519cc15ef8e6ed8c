//! The journal on the in-memory disk: torn writes, failed syncs, a full disk and crashes that
//! lose unsynced data, and the hand-over of segment preallocation to a caller-driven runner.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Records = Vec<(u64, Vec<u8>)>;

const SEG: u64 = 4096;

fn dir() -> PathBuf {
    PathBuf::from("/sim/shard-0/journal")
}

fn options(disk: &MemDisk) -> JournalOptions {
    JournalOptions { segment_bytes: SEG, storage: disk.storage(), ..Default::default() }
}

fn payload(seq: u64) -> Vec<u8> {
    let len = 1 + (seq * 37 % 150) as usize;
    (0..len).map(|i| ((seq as usize * 7 + i) % 251 + 1) as u8).collect()
}

fn open(disk: &MemDisk, dir: &Path) -> Result<(Journal, Records), JournalError> {
    let mut seen = Vec::new();
    let j = Journal::open(dir, options(disk), |s, p| {
        seen.push((s, p.to_vec()));
        Ok(())
    })?;
    Ok((j, seen))
}

fn append(j: &mut Journal, n: usize) -> Result<(), JournalError> {
    for _ in 0..n {
        let s = j.next_seq();
        j.append(&payload(s))?;
    }
    Ok(())
}

/// Every record seen is the expected payload, in order from 1.
fn check_prefix(seen: &[(u64, Vec<u8>)]) {
    for (i, (seq, p)) in seen.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(*p, payload(*seq), "seq {seq}");
    }
}

#[test]
fn unsynced_writes_and_names_are_lost_at_a_crash() -> TestResult {
    let disk = MemDisk::new(1);
    let s = disk.storage();
    s.create_dir_all(Path::new("/d"))?;
    let f = s.create_new(Path::new("/d/a"))?;
    f.write_all_at(b"synced", 0)?;
    f.sync_data()?;
    s.sync_dir(Path::new("/d"))?;
    f.write_all_at(&[7u8; 8192], 4096 * 4)?;
    let g = s.create_new(Path::new("/d/b"))?;
    g.write_all_at(b"never named durably", 0)?;
    g.sync_all()?;
    disk.crash();
    // The dead process can do nothing more.
    assert!(f.write_all_at(b"x", 0).is_err());
    assert!(s.list(Path::new("/d")).is_err());
    let s = disk.storage();
    assert_eq!(s.list(Path::new("/d"))?, vec!["a".to_string()]);
    let mut buf = Vec::new();
    s.open_read(Path::new("/d/a"))?.read_to_end(&mut buf)?;
    assert_eq!(&buf[..6], b"synced");
    // Each unsynced page was kept or lost whole (a lost last page leaves the file shorter).
    assert!(buf.len() <= 4096 * 6);
    for page in buf.get(4096 * 4..).unwrap_or_default().chunks(4096) {
        assert!(page.iter().all(|&b| b == 7) || page.iter().all(|&b| b == 0));
    }
    Ok(())
}

#[test]
fn round_trip_and_rotation_on_the_memdisk() -> TestResult {
    let disk = MemDisk::new(2);
    let (mut j, seen) = open(&disk, &dir())?;
    assert!(seen.is_empty());
    for n in [1, 5, 30, 2, 60] {
        append(&mut j, n)?;
        j.commit()?;
    }
    let last = j.last_committed_seq();
    drop(j);
    disk.crash();
    let (j, seen) = open(&disk, &dir())?;
    assert_eq!(seen.len() as u64, last);
    check_prefix(&seen);
    assert!(j.active.path.starts_with(dir()));
    Ok(())
}

#[test]
fn torn_write_is_fail_stop_and_its_tail_is_truncated_at_recovery() -> TestResult {
    for seed in 0..40 {
        let disk = MemDisk::new(seed);
        let (mut j, _) = open(&disk, &dir())?;
        append(&mut j, 7)?;
        j.commit()?;
        let acked = j.last_committed_seq();
        append(&mut j, 3 + seed as usize % 20)?;
        disk.arm(DiskFault::TearWrite);
        assert!(matches!(j.commit(), Err(JournalError::Io { .. })), "seed {seed}");
        assert!(matches!(j.append(b"more"), Err(JournalError::Poisoned)));
        assert!(matches!(j.commit(), Err(JournalError::Poisoned)));
        drop(j);
        disk.crash();
        let (mut j, seen) = open(&disk, &dir())?;
        // The acknowledged records stand; of the torn batch at most a prefix survived (it was
        // never acknowledged, so either is right), and the journal continues after it.
        check_prefix(&seen);
        assert!(seen.len() as u64 >= acked, "seed {seed}: lost acknowledged records");
        let next = j.next_seq();
        append(&mut j, 2)?;
        j.commit()?;
        drop(j);
        let (_, again) = open(&disk, &dir())?;
        assert_eq!(again.len() as u64, next + 1, "seed {seed}");
    }
    Ok(())
}

#[test]
fn failed_sync_is_fail_stop_and_nothing_unsynced_is_acknowledged() -> TestResult {
    for seed in 0..40 {
        let disk = MemDisk::new(seed);
        let (mut j, _) = open(&disk, &dir())?;
        let mut acked = 0;
        for round in 0..(seed % 5 + 1) {
            append(&mut j, 1 + (round as usize * 13) % 40)?;
            j.commit()?;
            acked = j.last_committed_seq();
        }
        append(&mut j, 1 + seed as usize % 50)?;
        let attempted = j.next_seq() - 1;
        disk.arm(DiskFault::FailSync(libc::EIO));
        let err = j.commit().err().ok_or("a failed sync must fail the commit")?;
        assert!(
            matches!(&err, JournalError::Io { source, .. } if source.raw_os_error() == Some(libc::EIO))
        );
        assert_eq!(j.last_committed_seq(), acked, "a failed commit acknowledges nothing");
        assert!(j.is_poisoned());
        drop(j);
        disk.crash();
        let (_, seen) = open(&disk, &dir())?;
        check_prefix(&seen);
        let n = seen.len() as u64;
        assert!(n >= acked && n <= attempted, "seed {seed}: {n} records, acked {acked}");
    }
    Ok(())
}

#[test]
fn full_disk_at_rotation_is_fail_stop_and_recoverable() -> TestResult {
    let disk = MemDisk::new(3);
    let (mut j, _) = open(&disk, &dir())?;
    append(&mut j, 5)?;
    j.commit()?;
    let acked = j.last_committed_seq();
    // Room for the active segment only: the next one cannot be preallocated.
    disk.set_capacity(Some(disk.used() + 100));
    append(&mut j, 80)?;
    let err = j.commit().err().ok_or("rotation on a full disk must fail")?;
    assert!(
        matches!(&err, JournalError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{err}"
    );
    assert!(j.is_poisoned());
    drop(j);
    disk.crash();
    disk.set_capacity(None);
    let (mut j, seen) = open(&disk, &dir())?;
    check_prefix(&seen);
    assert!(seen.len() as u64 >= acked);
    append(&mut j, 80)?;
    j.commit()?;
    Ok(())
}

#[test]
fn crash_at_any_point_keeps_every_acknowledged_record() -> TestResult {
    for seed in 0..60u64 {
        let disk = MemDisk::new(seed);
        let mut acked = 0u64;
        let mut x = seed;
        for _restart in 0..4 {
            let (mut j, seen) = open(&disk, &dir())?;
            check_prefix(&seen);
            assert!(seen.len() as u64 >= acked, "seed {seed}: acknowledged record lost");
            acked = acked.max(seen.len() as u64);
            for _ in 0..(x % 9) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                append(&mut j, (x >> 33) as usize % 30 + 1)?;
                j.commit()?;
                acked = j.last_committed_seq();
            }
            // A batch in flight when the power goes.
            append(&mut j, (x >> 40) as usize % 30 + 1)?;
            drop(j);
            disk.crash();
        }
    }
    Ok(())
}

#[test]
fn preallocation_is_a_task_the_caller_runs() -> TestResult {
    let disk = MemDisk::new(4);
    let background = Arc::new(ManualBackground::new());
    let o = JournalOptions {
        background: Some(background.clone() as Arc<dyn Background>),
        ..options(&disk)
    };
    let mut j = Journal::open(&dir(), o.clone(), |_, _| Ok(()))?;
    assert_eq!(background.queued(), 1, "the next segment is handed out at open");
    assert_eq!(background.run_all(), 1);
    let tmp = |d: &MemDisk| {
        d.files().iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "tmp")).count()
    };
    assert_eq!(tmp(&disk), 1, "the runner prepared it");
    append(&mut j, 80)?;
    j.commit()?; // rotates into the prepared segment
    assert_eq!(tmp(&disk), 0);
    // Not run by the runner: rotation runs it itself.
    append(&mut j, 80)?;
    j.commit()?;
    assert_eq!(background.run_all(), 1, "rotation ran the second task; only the third is left");
    assert_eq!(tmp(&disk), 1);
    drop(j);
    // Dropping the journal lets go of the prepared segment.
    assert_eq!(tmp(&disk), 0);
    let (_, seen) = open(&disk, &dir())?;
    assert_eq!(seen.len(), 160);
    Ok(())
}
