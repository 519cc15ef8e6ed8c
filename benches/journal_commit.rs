//! Journal group commit per batch size, next to the raw fdatasync rate of the same disk measured
//! in the same run, plus recovery time of a 1,000,000-record journal.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use citycard::journal::{Journal, JournalOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// About the size of a purchase record's payload.
const PAYLOAD_LEN: usize = 100;
const BATCHES: [usize; 4] = [1, 16, 256, 4096];

fn bench_dir() -> tempfile::TempDir {
    // Benchmarks the real disk: /tmp here is on the same ext4 volume as the data directory.
    tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
        .expect("bench temp dir")
}

fn journal_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_commit");
    group.measurement_time(Duration::from_secs(4)).sample_size(20);
    let payload = vec![0xA5u8; PAYLOAD_LEN];
    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        let dir = bench_dir();
        let options = JournalOptions { segment_bytes: 256 * 1024 * 1024, ..Default::default() };
        let mut journal = Journal::open(dir.path(), options, |_, _| Ok(())).expect("open");
        group.bench_with_input(BenchmarkId::new("citycard", batch), &batch, |b, &batch| {
            b.iter(|| {
                for _ in 0..batch {
                    journal.append(&payload).expect("append");
                }
                journal.commit().expect("commit");
            })
        });
        drop(journal);

        // The disk's limit for the same bytes: one positioned write plus one fdatasync into a
        // preallocated file, as fsync_limit.c in shared/peers does.
        let record = 56 + PAYLOAD_LEN.next_multiple_of(8);
        let bytes = vec![0x5Au8; record * batch];
        let raw_dir = bench_dir();
        let path = raw_dir.path().join("raw");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("raw");
        // Zero-filled like a journal segment (a sparse file would charge block allocation
        // to every sync and make the baseline look slower than it is).
        let span = 64 * 1024 * 1024u64;
        let zeros = vec![0u8; 1 << 20];
        for i in 0..span / zeros.len() as u64 {
            file.write_all_at(&zeros, i * zeros.len() as u64).expect("zero");
        }
        file.sync_all().expect("sync");
        let mut offset = 0u64;
        group.bench_with_input(BenchmarkId::new("raw_fdatasync", batch), &batch, |b, _| {
            b.iter(|| {
                if offset + bytes.len() as u64 > span {
                    offset = 0;
                }
                file.write_all_at(&bytes, offset).expect("write");
                file.sync_data().expect("fdatasync");
                offset += bytes.len() as u64;
            })
        });
    }
    group.finish();
}

fn recovery(c: &mut Criterion) {
    const RECORDS: u64 = 1_000_000;
    let dir = bench_dir();
    let options = JournalOptions { segment_bytes: 64 * 1024 * 1024, ..Default::default() };
    {
        let mut journal = Journal::open(dir.path(), options.clone(), |_, _| Ok(())).expect("open");
        let payload = vec![0x3Cu8; PAYLOAD_LEN];
        for _ in 0..RECORDS / 4096 + 1 {
            for _ in 0..4096 {
                journal.append(&payload).expect("append");
            }
            journal.commit().expect("commit");
        }
    }
    let mut group = c.benchmark_group("journal_recovery");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.bench_function("open_1m_records", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut n = 0u64;
                let journal = Journal::open(dir.path(), options.clone(), |_, _| {
                    n += 1;
                    Ok(())
                })
                .expect("recover");
                total += start.elapsed();
                assert!(n >= RECORDS);
                drop(journal);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, journal_commit, recovery);
criterion_main!(benches);
