//! `citycard verify --archive DIR` (issue #12.3): an archive checked by itself, as an operator
//! would after copying it to another disk. A good archive checks (from seq 1, and after a prune
//! from its anchor), and reports the chain head the prune then anchors at; a flipped byte, a
//! missing middle segment, a missing or altered anchor are each caught.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use citycard::archive::check::{check_archive, ArchiveReport};
use citycard::archive::{PruneOptions, ANCHOR_FILE};
use citycard::engine::CheckpointPolicy;
use citycard::report::Date;
use citycard::server::RunningServer;
use citycard_protocol::{Response, Status};
use common::{issue, Card, Client, Env};

const BIN: &str = env!("CARGO_BIN_EXE_citycard");

fn config(env: &Env) -> citycard::config::Config {
    let mut config = env.config();
    config.segment_bytes = 64 * 1024;
    config.checkpoint = CheckpointPolicy { records: 100, interval_ms: 60_000 };
    config
}

/// `purchases` purchases of 7 over `cards` (ten new ones when empty).
async fn load(env: &Env, cards: &mut Vec<Card>, purchases: usize) {
    let server = RunningServer::start(config(env)).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    if cards.is_empty() {
        for op_ref in 0..10 {
            cards.push(issue(&mut counter, 1 + op_ref, 50_000).await);
        }
    }
    for i in 0..purchases {
        match reader.call(&cards[i % 10].purchase(7, "reader-1")).await {
            Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }
    server.stop().await.unwrap();
}

fn public_key(env: &Env) -> [u8; 32] {
    citycard::keys::load_assertion_public(&env.keys.join(citycard::keys::ASSERTION_PUB)).unwrap()
}

fn archive_of(env: &Env, shard: u16) -> PathBuf {
    citycard::server::shard_dir(&env.data, shard).join("archive")
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    citycard::journal::list_segments(dir).unwrap().into_iter().map(|(_, p)| p).collect()
}

/// Copies the segment files of `from` into a new directory `to`.
fn copy_segments(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for path in segments(from) {
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// `citycard verify --archive DIR --keys KEYS [extra]`: exit success and stdout.
fn cli(env: &Env, dir: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("verify")
        .arg("--archive")
        .arg(dir)
        .arg("--keys")
        .arg(&env.keys)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), stdout + &String::from_utf8_lossy(&out.stderr))
}

fn problems(report: &ArchiveReport) -> String {
    report.problems.join("\n")
}

#[tokio::test]
async fn an_archive_checks_alone_and_damage_is_caught() {
    let env = Env::new();
    let mut cards = Vec::new();
    load(&env, &mut cards, 3_000).await;

    // The data directory's archives, from seq 1, with their money re-derived.
    let report = check_archive(&env.data, None, None).unwrap();
    assert!(report.ok(), "{}", problems(&report));
    assert_eq!(report.shards.len(), 2);
    for s in &report.shards {
        assert_eq!(s.first_seq, 1);
        assert!(s.last_seq > 100 && s.segments >= 2, "{s:?}");
        assert!(s.anchor_seq.is_none());
        assert_eq!(s.totals.balances, s.totals.deposits - s.totals.purchases);
    }
    let heads: Vec<_> = report.shards.iter().map(|s| (s.last_seq, s.head)).collect();
    // The shard with the most archived segments, for the damage below (a middle one needs 3).
    let shard = if segments(&archive_of(&env, 0)).len() >= segments(&archive_of(&env, 1)).len() {
        0
    } else {
        1
    };
    assert!(segments(&archive_of(&env, shard)).len() >= 3);

    // A copy on another disk, laid out as an archive root (shard-N/), checked by the CLI.
    let copy = env.dir.path().join("copy");
    for index in 0..2 {
        copy_segments(&archive_of(&env, index), &copy.join(format!("shard-{index}")));
    }
    let (ok, out) = cli(&env, &copy, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("verify archive: OK"), "{out}");
    let (last, head) = heads[usize::from(shard)];
    let line = format!("seq 1..={last} ");
    assert!(out.contains(&line) && out.contains(&citycard::hex::encode(&head)), "{out}");

    // One flipped byte in a record of a middle segment.
    let one = copy.join(format!("shard-{shard}"));
    let middle = segments(&one)[1].clone();
    let original = std::fs::read(&middle).unwrap();
    let mut bytes = original.clone();
    bytes[200] ^= 0x01;
    std::fs::write(&middle, &bytes).unwrap();
    let (ok, out) = cli(&env, &copy, &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("MISMATCH") && out.contains(middle.to_str().unwrap()), "{out}");
    // The same in the last record of the last segment: archived segments are complete, so a
    // damaged end is damage, not a torn tail.
    std::fs::write(&middle, &original).unwrap();
    let last_segment = segments(&one).last().unwrap().clone();
    let last_original = std::fs::read(&last_segment).unwrap();
    let end = last_original.iter().rposition(|b| *b != 0).unwrap();
    let mut bytes = last_original.clone();
    bytes[end] ^= 0x01;
    std::fs::write(&last_segment, &bytes).unwrap();
    let report = check_archive(&one, None, None).unwrap();
    assert!(problems(&report).contains("damaged record"), "{}", problems(&report));
    std::fs::write(&last_segment, &last_original).unwrap();

    // A missing middle segment breaks seq continuity.
    let moved = env.dir.path().join("moved-segment");
    std::fs::rename(&middle, &moved).unwrap();
    let report = check_archive(&one, None, None).unwrap();
    assert!(!report.ok());
    assert!(problems(&report).contains("missing record"), "{}", problems(&report));
    std::fs::rename(&moved, &middle).unwrap();
    assert!(check_archive(&one, None, None).unwrap().ok());

    // Prune every archived segment: each anchor stands at the head the check reported.
    let tomorrow = Date::from_days(Date::from_unix_ms(citycard::now_ms()).days() + 1);
    let options = PruneOptions {
        before: tomorrow,
        dry_run: false,
        now_ms: citycard::now_ms(),
        stop_after_anchor: false,
    };
    citycard::archive::prune(&env.data, &env.keys, &options).unwrap();
    let key = public_key(&env);
    for (index, (last, head)) in heads.iter().enumerate() {
        let dir = citycard::server::shard_dir(&env.data, index as u16);
        let anchor = citycard::archive::Anchor::load(&dir, &key).unwrap().unwrap();
        assert_eq!((anchor.seq, anchor.hash), (*last, *head), "shard {index}");
    }

    // More work archives more segments after the anchors: the archive checks from them.
    load(&env, &mut cards, 3_000).await;
    let report = check_archive(&env.data, None, Some(&key)).unwrap();
    assert!(report.ok(), "{}", problems(&report));
    for (s, (last, _)) in report.shards.iter().zip(&heads) {
        assert_eq!((s.anchor_seq, s.first_seq), (Some(*last), last + 1), "{s:?}");
        assert!(s.last_seq > s.first_seq);
        assert_eq!(s.totals.balances, s.totals.deposits - s.totals.purchases);
    }
    // Without the key, an anchor is not taken on trust.
    let report = check_archive(&env.data, None, None).unwrap();
    assert!(problems(&report).contains("assertion.pub"), "{}", problems(&report));

    // One shard's pruned archive copied alone: without its anchor it cannot be checked...
    let alone = env.dir.path().join("alone");
    copy_segments(&archive_of(&env, shard), &alone);
    let (ok, out) = cli(&env, &alone, &[]);
    assert!(!ok && out.contains("pruned"), "{out}");
    // ...with it named, or copied beside the segments, it checks.
    let anchor_file = citycard::server::shard_dir(&env.data, shard).join(ANCHOR_FILE);
    let (ok, out) = cli(&env, &alone, &["--anchor", anchor_file.to_str().unwrap()]);
    assert!(ok && out.contains(&format!("from anchor {},", heads[usize::from(shard)].0)), "{out}");
    std::fs::copy(&anchor_file, alone.join(ANCHOR_FILE)).unwrap();
    assert!(check_archive(&alone, None, Some(&key)).unwrap().ok());
    // An altered anchor is refused.
    let mut bytes = std::fs::read(alone.join(ANCHOR_FILE)).unwrap();
    bytes[40] ^= 0x01;
    std::fs::write(alone.join(ANCHOR_FILE), &bytes).unwrap();
    let report = check_archive(&alone, None, Some(&key)).unwrap();
    assert!(problems(&report).contains("signature"), "{}", problems(&report));
    // Another shard's anchor does not fit this archive.
    let other = citycard::server::shard_dir(&env.data, 1 - shard).join(ANCHOR_FILE);
    let report = check_archive(&alone, Some(&other), Some(&key)).unwrap();
    assert!(!report.ok());
}

#[test]
fn data_beside_archive_is_refused_not_ignored() {
    // postmortem: `verify --data D --archive A` checked A and silently ignored D.
    let out = Command::new(BIN)
        .args(["verify", "--data", "/nonexistent/data", "--archive", "/nonexistent/archive"])
        .env_remove("CITYCARD_DATA")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--data and --archive do not go together"), "{stderr}");
}
