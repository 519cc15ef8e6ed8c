//! Storage faults on real small filesystems: a full disk, a read-only filesystem, a device that
//! returns EIO and a denied permission stop the start with an error naming the cause and the
//! path, and the state stays where it is; a disk filling while serving stops the server, and
//! the restart on the still-full disk refuses instead of discarding state. Only a state that
//! disagrees with the journal is rebuilt, and the report says why.
//!
//! The tests mount a tmpfs or a loop-mounted ext4 image in a temporary directory (they run as
//! root). Where mounting is not permitted each test prints why it is skipped and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use citycard::engine::{
    Limits, Op, OpenReport, Output, RebuildReason, Secrets, Shard, ShardOptions, StoreError,
};
use citycard::journal::{JournalError, JournalOptions};
use citycard_protocol::{Amount, KeyVersion, Request, Response, Status};
use common::{balance_of, issue, Client, Env};

const TERMINAL: &str = "counter-1";
/// Bound on waiting for the server to notice a failed disk or for a child to exit.
const WAIT: Duration = Duration::from_secs(60);

/// A small filesystem mounted on a temporary directory; unmounted on drop.
struct SmallFs {
    /// Holds the mount point (and the ext4 image) until after the unmount.
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl SmallFs {
    /// A tmpfs of `size` (as `mount -o size=` takes it), or None (with the reason printed)
    /// where this machine does not allow mounting.
    fn tmpfs(test: &str, size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let options = format!("size={size}");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(&mount)
            .output();
        SmallFs::mounted(test, dir, mount, out)
    }

    /// An ext4 filesystem of `mib` MiB in an image file on a loop device.
    fn ext4(test: &str, mib: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        match Command::new("mkfs.ext4").arg("-q").arg(&image).output() {
            Ok(out) if out.status.success() => {}
            other => {
                println!("SKIP {test}: mkfs.ext4 unavailable or failed: {other:?}");
                return None;
            }
        }
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let out = Command::new("mount").arg("-o").arg("loop").arg(&image).arg(&mount).output();
        SmallFs::mounted(test, dir, mount, out)
    }

    fn mounted(
        test: &str,
        dir: tempfile::TempDir,
        mount: PathBuf,
        out: std::io::Result<std::process::Output>,
    ) -> Option<SmallFs> {
        match out {
            Ok(out) if out.status.success() => Some(SmallFs { _dir: dir, mount }),
            Ok(out) => {
                let why = String::from_utf8_lossy(&out.stderr);
                println!("SKIP {test}: mounting a small filesystem is not permitted here: {why}");
                None
            }
            Err(e) => {
                println!("SKIP {test}: cannot run mount: {e}");
                None
            }
        }
    }

    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.mount)
            .status()
            .unwrap();
        assert!(ok.success(), "remount {options}");
    }

    /// Fills the filesystem to the last byte with `filler`; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.mount.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        // Big writes first, then small ones for the last partial block; ENOSPC ends each.
        for chunk in [1 << 20, 4096, 512] {
            let buf = vec![0xa5u8; chunk];
            while file.write_all(&buf).is_ok() {}
            let _ = file.sync_all();
        }
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.mount).status().is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a failed test left a handle open): detach it instead.
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

fn secrets() -> Arc<Secrets> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Arc::new(Secrets {
        issuer: BTreeMap::from([(1, [42u8; 32])]),
        current_version: KeyVersion(1),
        retire_after_ms: BTreeMap::new(),
        assertion: ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
    })
}

fn open(dir: &Path, segment_bytes: u64) -> Result<(Shard, OpenReport), StoreError> {
    let options = ShardOptions {
        index: 0,
        count: 1,
        dir: dir.to_owned(),
        journal: JournalOptions { segment_bytes, ..Default::default() },
        limits: Limits::default(),
        checkpoint: citycard::engine::CheckpointPolicy::default(),
        archive: None,
    };
    Shard::open(options, secrets())
}

/// A shard with `cards` issued cards, persisted to sled and closed.
fn history(dir: &Path, cards: u64) {
    let (mut shard, _) = open(dir, 64 * 1024).unwrap();
    for op_ref in 0..cards {
        let request = Request::Issue { op_ref, deposit: Amount(1_000) };
        let output = shard.execute(TERMINAL, Op::Request(&request), 1_000).unwrap();
        let Output::Response(answer) = output else { panic!("not a response") };
        let Response::Issue(result) = answer.into_response() else { panic!("not an issue") };
        assert_eq!(result.status, Status::Approved);
    }
    shard.commit().unwrap();
    shard.persist().unwrap();
    shard.flush_state().unwrap();
}

/// Names of the entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts a storage stop on `dir/state` with an I/O error satisfying `cause`.
fn assert_storage_stop(
    result: Result<(Shard, OpenReport), StoreError>,
    dir: &Path,
    cause: impl Fn(&std::io::Error) -> bool,
) -> String {
    let error = match result {
        Ok(_) => panic!("the shard opened on failing storage"),
        Err(e) => e,
    };
    let message = error.to_string();
    match &error {
        StoreError::Storage { path, cause: source } => {
            assert_eq!(path, &dir.join("state"), "{message}");
            assert!(cause(source), "unexpected cause: {message}");
        }
        other => panic!("expected StoreError::Storage, got {other:?}"),
    }
    assert!(error.is_environment());
    assert!(message.contains(&dir.join("state").display().to_string()), "{message}");
    message
}

fn assert_nothing_moved(dir: &Path) {
    let names = listing(dir);
    assert!(names.iter().any(|n| n == "state"), "state missing: {names:?}");
    assert!(!names.iter().any(|n| n.starts_with("state.broken")), "state moved aside: {names:?}");
}

#[test]
fn full_disk_at_start_stops_and_keeps_the_state() {
    let Some(fs) = SmallFs::tmpfs("full_disk_at_start_stops_and_keeps_the_state", "16m") else {
        return;
    };
    let dir = fs.mount.join("shard-0");
    history(&dir, 20);
    let state_before = listing(&dir.join("state"));
    let filler = fs.fill();

    let message = assert_storage_stop(open(&dir, 64 * 1024), &dir, |e| {
        e.kind() == std::io::ErrorKind::StorageFull
    });
    assert!(message.contains("No space left") && message.contains("free disk space"), "{message}");
    assert_nothing_moved(&dir);
    assert_eq!(listing(&dir.join("state")), state_before);

    // Once space is free the same state opens as it was: nothing replayed, nothing rebuilt.
    std::fs::remove_file(filler).unwrap();
    let (shard, report) = open(&dir, 64 * 1024).unwrap();
    assert_eq!((report.cards, report.replayed, report.rebuilt_state), (20, 0, false));
    assert_eq!(report.rebuild, None);
    assert_eq!(shard.card_count(), 20);
}

#[test]
fn read_only_filesystem_at_start_stops_and_keeps_the_state() {
    let test = "read_only_filesystem_at_start_stops_and_keeps_the_state";
    let Some(fs) = SmallFs::tmpfs(test, "16m") else { return };
    let dir = fs.mount.join("shard-0");
    history(&dir, 5);
    fs.remount("ro");

    let message = assert_storage_stop(open(&dir, 64 * 1024), &dir, |e| {
        e.kind() == std::io::ErrorKind::ReadOnlyFilesystem
    });
    assert!(message.contains("remount"), "{message}");
    assert_nothing_moved(&dir);

    fs.remount("rw");
    let (_, report) = open(&dir, 64 * 1024).unwrap();
    assert_eq!((report.cards, report.rebuilt_state), (5, false));
}

/// EXT4_IOC_SHUTDOWN (`_IOR('X', 125, __u32)`) with EXT4_GOING_FLAGS_NOLOGFLUSH: afterwards
/// every operation on that filesystem fails with a real EIO from the kernel. Issued through
/// python3 because the crate forbids unsafe code (and so `libc::ioctl`).
fn shut_down_ext4(mount: &Path) -> Result<(), String> {
    let script = "import fcntl, os, struct, sys\n\
                  fd = os.open(sys.argv[1], os.O_RDONLY)\n\
                  fcntl.ioctl(fd, 0x8004587D, struct.pack('I', 2))\n";
    match Command::new("python3").arg("-c").arg(script).arg(mount).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn device_errors_at_start_stop_and_keep_the_state() {
    let test = "device_errors_at_start_stop_and_keep_the_state";
    let Some(fs) = SmallFs::ext4(test, 32) else { return };
    let dir = fs.mount.join("shard-0");
    history(&dir, 5);
    if let Err(why) = shut_down_ext4(&fs.mount) {
        println!("SKIP {test}: cannot shut the ext4 filesystem down to get EIO: {why}");
        return;
    }
    let message =
        assert_storage_stop(open(&dir, 64 * 1024), &dir, |e| e.raw_os_error() == Some(libc::EIO));
    assert!(message.contains("Input/output error") && message.contains("dmesg"), "{message}");
    // The filesystem refuses everything now; remount it to look at what is on disk.
    let image = fs._dir.path().join("fs.img");
    assert!(Command::new("umount").arg(&fs.mount).status().unwrap().success());
    assert!(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&image)
        .arg(&fs.mount)
        .status()
        .unwrap()
        .success());
    assert_nothing_moved(&dir);
    let (_, report) = open(&dir, 64 * 1024).unwrap();
    assert_eq!((report.cards, report.rebuilt_state), (5, false));
}

#[test]
fn journal_preallocation_on_a_full_disk_names_the_journal() {
    let test = "journal_preallocation_on_a_full_disk_names_the_journal";
    let Some(fs) = SmallFs::tmpfs(test, "8m") else { return };
    let dir = fs.mount.join("shard-0");
    // sled fits; a first journal segment of 16 MiB does not.
    let error = match open(&dir, 16 << 20) {
        Ok(_) => panic!("a 16 MiB segment was preallocated on an 8 MiB filesystem"),
        Err(e) => e,
    };
    let message = error.to_string();
    let journal = dir.join("journal");
    match &error {
        StoreError::Journal(JournalError::Io { path, source }) => {
            assert_eq!(path, &journal);
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull, "{message}");
        }
        other => panic!("expected a journal I/O error, got {other:?}"),
    }
    assert!(error.is_environment());
    assert!(message.contains(&journal.display().to_string()), "{message}");
    // The half-written preallocation is removed, so the space is given back.
    assert_eq!(listing(&journal), Vec::<String>::new());
}

#[test]
fn state_ahead_of_the_journal_is_still_rebuilt_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard-0");
    history(&shard, 3);
    let backup = dir.path().join("journal-backup");
    std::fs::rename(shard.join("journal"), &backup).unwrap();
    // A journal with fewer records than sled has applied: restore an empty one.
    let (_, report) = open(&shard, 64 * 1024).unwrap();
    assert!(report.rebuilt_state);
    assert_eq!(report.rebuild, Some(RebuildReason::AheadOfJournal { applied_seq: 3, last_seq: 0 }));
    assert_eq!((report.replayed, report.cards), (0, 0));
    assert_eq!(listing(&shard).iter().filter(|n| n.starts_with("state.broken-")).count(), 1);
}

#[test]
fn a_start_that_replays_everything_says_the_state_was_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard-0");
    history(&shard, 4);
    // A restart with the state intact replays nothing.
    let (_, report) = open(&shard, 64 * 1024).unwrap();
    assert_eq!((report.replayed, report.rebuilt_state), (0, false));
    std::fs::remove_dir_all(shard.join("state")).unwrap();
    let (_, report) = open(&shard, 64 * 1024).unwrap();
    assert!(report.rebuilt_state, "{report:?}");
    assert_eq!(report.rebuild, Some(RebuildReason::Missing));
    assert_eq!((report.replayed, report.cards), (4, 4));
    // A brand-new shard has nothing to replay and nothing was rebuilt.
    let (_, report) = open(&dir.path().join("shard-1"), 64 * 1024).unwrap();
    assert_eq!((report.replayed, report.rebuilt_state), (0, false));
}

#[test]
fn a_damaged_sled_configuration_is_rebuilt_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("shard-0");
    history(&shard, 2);
    std::fs::write(shard.join("state/conf"), b"this is not a sled configuration file").unwrap();
    let (_, report) = open(&shard, 64 * 1024).unwrap();
    assert_eq!(report.rebuild.as_ref().map(RebuildReason::label), Some("corrupt"), "{report:?}");
    assert_eq!((report.replayed, report.cards), (2, 2));
}

/// Waits for `server.failed()` for at most `WAIT`.
async fn failed_within(server: &citycard::server::RunningServer) -> bool {
    tokio::time::timeout(WAIT, server.failed()).await.is_ok()
}

#[tokio::test]
async fn a_disk_filling_while_serving_stops_the_server_and_the_restart_refuses() {
    let test = "a_disk_filling_while_serving_stops_the_server_and_the_restart_refuses";
    let Some(fs) = SmallFs::tmpfs(test, "24m") else { return };
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    citycard::keys::init(&keys).unwrap();
    let env = Env { dir, keys, data: fs.mount.join("data") };
    let config = citycard::config::Config { segment_bytes: 64 * 1024, ..env.config() };

    let server = citycard::server::RunningServer::start(config.clone()).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..4 {
        cards.push((issue(&mut counter, op_ref, 50_000).await, 50_000i64));
    }
    let filler = fs.fill();
    // Spend until the server stops answering: every answered purchase is durable.
    let started = Instant::now();
    let mut stopped = false;
    'spend: for round in 0..20_000u64 {
        assert!(started.elapsed() < WAIT, "the server kept serving on a full disk");
        for (card, balance) in cards.iter_mut() {
            let request = card.purchase(1, "reader-1");
            reader.send(&request).await;
            match reader.recv().await {
                Some((_, Response::Purchase(r))) if r.status == Status::Approved => *balance -= 1,
                Some((_, other @ Response::Purchase(_))) => panic!("round {round}: {other:?}"),
                // "server storage failed" (request id 0), then the connection closes.
                Some((_, Response::Error { .. })) | None => {
                    stopped = true;
                    break 'spend;
                }
                Some((_, other)) => panic!("round {round}: unexpected answer {other:?}"),
            }
        }
    }
    assert!(stopped, "the disk never filled");
    let approved: i64 = cards.iter().map(|(_, b)| 50_000 - b).sum();
    println!("{approved} purchases approved on the full disk before the server stopped");
    assert!(failed_within(&server).await, "the server did not report the storage failure");
    drop((counter, reader));
    assert!(server.stop().await.is_err(), "stop after a storage failure must say so");

    // The restart on the still-full disk refuses and keeps the state.
    let error = match citycard::server::RunningServer::start(config.clone()).await {
        Ok(_) => panic!("the server started on a full disk"),
        Err(e) => e,
    };
    let store = error.chain().find_map(|c| c.downcast_ref::<StoreError>()).expect("no StoreError");
    assert!(store.is_environment(), "{error:#}");
    assert!(format!("{error:#}").contains("No space left"), "{error:#}");
    println!("restart on the full disk: {error:#}");
    for shard in 0..2 {
        assert_nothing_moved(&env.data.join(format!("shard-{shard}")));
    }

    // Space freed: it starts, and every answered purchase is there.
    std::fs::remove_file(filler).unwrap();
    let server = citycard::server::RunningServer::start(config).await.unwrap();
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    for (card, balance) in &cards {
        // Unanswered purchases were never acknowledged; a retry would resolve them. The one
        // in flight when the server stopped may or may not be in the journal.
        let now = balance_of(&mut reader, card).await;
        assert!(now == *balance || now == *balance - 1, "card {:?}: {now} vs {balance}", card.id);
    }
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

const BIN: &str = env!("CARGO_BIN_EXE_citycard");

#[test]
fn permission_denied_at_start_refuses_with_its_own_exit_code() {
    let test = "permission_denied_at_start_refuses_with_its_own_exit_code";
    if Command::new("setpriv").arg("--version").output().is_err() {
        println!("SKIP {test}: setpriv is not installed, cannot drop root's privileges");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let data = dir.path().join("data");
    citycard::keys::init(&keys).unwrap();
    // A shard-0 with history, laid out as the server does it.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let env = Env { dir, keys: keys.clone(), data: data.clone() };
    runtime.block_on(async {
        let server = env.start().await;
        let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
        issue(&mut counter, 1, 100).await;
        server.stop().await.unwrap();
    });
    // Everything belongs to an unprivileged user except one shard's state, which stays root's
    // with mode 0700: opening it is a genuine EACCES for that user (root would bypass it).
    let chown = |spec: &str, path: &Path| {
        assert!(Command::new("chown").args(["-R", spec]).arg(path).status().unwrap().success())
    };
    chown("65534:65534", env.dir.path());
    let state = data.join("shard-0/state");
    chown("0:0", &state);
    let chmod = |mode: &str, path: &Path| {
        assert!(Command::new("chmod").arg(mode).arg(path).status().unwrap().success())
    };
    chmod("0755", env.dir.path());
    chmod("0700", &state);
    let before = listing(&state);

    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "serve"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--keys")
        .arg(&keys)
        .arg("--data")
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            panic!("the server did not exit on a state it may not open");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(74), "{stderr}");
    assert!(stderr.contains("storage error at start"), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains(&state.display().to_string()), "{stderr}");
    assert_nothing_moved(&data.join("shard-0"));
    assert_eq!(listing(&state), before);
}
