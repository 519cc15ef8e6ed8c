//! Crash test of the journal: a child process commits batches in a loop and prints each
//! acknowledged sequence after its sync; the parent SIGKILLs it at random moments, reopens, and
//! checks that every acknowledged record is present and intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use citycard::journal::{Journal, JournalOptions};

const CHILD_ENV: &str = "CITYCARD_JOURNAL_CRASH_CHILD";
const KILLS: usize = 20;
/// Bound on the whole test, whatever the machine does.
const TEST_BUDGET: Duration = Duration::from_secs(120);

fn payload(seq: u64) -> Vec<u8> {
    // Self-checking payload: its content is a function of the sequence.
    let len = 16 + (seq % 200) as usize;
    (0..len).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8).collect()
}

fn options() -> JournalOptions {
    JournalOptions { segment_bytes: 256 * 1024, ..Default::default() }
}

/// The child: append batches of 1..=64 records forever, printing the last seq of each batch
/// once its commit returned.
#[test]
fn journal_crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let mut journal = Journal::open(std::path::Path::new(&dir), options(), |_, _| Ok(())).unwrap();
    let mut out = std::io::stdout().lock();
    let mut batch = 1u64;
    loop {
        let size = 1 + (batch * 7919 % 64);
        let mut last = 0;
        for _ in 0..size {
            let seq = journal.next_seq();
            last = journal.append(&payload(seq)).unwrap();
            assert_eq!(last, seq);
        }
        journal.commit().unwrap();
        writeln!(out, "{last}").unwrap();
        out.flush().unwrap();
        batch += 1;
    }
}

#[test]
fn every_acknowledged_record_survives_sigkill() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acknowledged = 0u64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for kill in 0..KILLS {
        assert!(started.elapsed() < TEST_BUDGET, "crash test over its time budget");
        let mut child = Command::new(&exe)
            .args(["--exact", "journal_crash_child", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Kill after a pseudo-random number of acknowledged batches (1..=40).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wait_for = 1 + seed % 40;
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while seen < wait_for {
            let Some(Ok(line)) = lines.next() else { break };
            if let Ok(seq) = line.trim().parse::<u64>() {
                assert!(seq > acknowledged, "acknowledged sequences must grow");
                acknowledged = seq;
                seen += 1;
            }
        }
        child.kill().unwrap();
        // Acknowledgements printed before the kill landed still count.
        for line in lines.map_while(Result::ok) {
            if let Ok(seq) = line.trim().parse::<u64>() {
                acknowledged = acknowledged.max(seq);
            }
        }
        child.wait().unwrap();

        let mut count = 0u64;
        let journal = Journal::open(dir.path(), options(), |seq, bytes| {
            count += 1;
            assert_eq!(seq, count, "records are contiguous from 1");
            assert_eq!(bytes, payload(seq), "record {seq} intact");
            Ok(())
        })
        .unwrap();
        assert!(
            journal.next_seq() > acknowledged,
            "kill {kill}: acknowledged seq {acknowledged} missing (journal ends at {})",
            journal.next_seq() - 1
        );
    }
    assert!(acknowledged > KILLS as u64, "the child made progress");
}
