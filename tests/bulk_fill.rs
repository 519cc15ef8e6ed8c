//! The bulk fill (`engine::store::bulk`, used by `examples/bulk_fill.rs` for the storage
//! figures) writes a data directory a server would have left: `verify` passes, a start replays
//! nothing and serves the cards (a live purchase on a filled card is approved), and a state
//! rebuilt from the journal by the normal replay equals the one written directly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use citycard::engine::store::bulk::{BulkKind, BulkShard};
use citycard::engine::{CheckpointPolicy, Limits, Op, OpenReport, Output, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, Atc, CardAuth, MessageType, Request, Response, Status};
use common::{Env, Rng};

const SHARDS: u16 = 2;
const CARDS_PER_SHARD: u64 = 300;
const TRANSACTIONS_PER_SHARD: u64 = 6_000;
const NOW_MS: u64 = 1_800_000_000_000;

fn options(env: &Env, index: u16) -> ShardOptions {
    ShardOptions {
        index,
        count: SHARDS,
        dir: citycard::server::shard_dir(&env.data, index),
        // Small segments, so that the fill archives some of them below its checkpoint.
        journal: JournalOptions { segment_bytes: 256 * 1024, ..Default::default() },
        limits: Limits::default(),
        checkpoint: CheckpointPolicy::default(),
        archive: None,
    }
}

fn open(env: &Env, index: u16) -> (Shard, OpenReport) {
    let secrets = Arc::new(citycard::server::load_secrets(&env.keys, &[]).unwrap());
    Shard::open(options(env, index), secrets).unwrap()
}

fn fill(env: &Env) -> Vec<u64> {
    std::fs::create_dir_all(&env.data).unwrap();
    citycard::server::shard_count(&env.data, Some(SHARDS)).unwrap();
    let secrets = Arc::new(citycard::server::load_secrets(&env.keys, &[]).unwrap());
    let mut last_seqs = Vec::new();
    for index in 0..SHARDS {
        let mut shard = BulkShard::create(options(env, index), secrets.clone(), 100).unwrap();
        for k in 0..CARDS_PER_SHARD {
            let op_ref = (u64::from(index) << 40) + k + 1;
            shard.issue("counter-1", op_ref, Amount(2_000), NOW_MS).unwrap();
        }
        let mut rng = Rng(u64::from(index) + 7);
        for t in 0..TRANSACTIONS_PER_SHARD {
            let k = rng.below(CARDS_PER_SHARD);
            let nonce = rng.next();
            if shard.balance(k).unwrap() >= 500 {
                let amount = Amount(50 + rng.below(400) as i64);
                shard
                    .card_transaction("reader-1", BulkKind::Purchase, k, amount, nonce, NOW_MS + t)
                    .unwrap();
            } else {
                shard
                    .card_transaction("kiosk-1", BulkKind::TopUp, k, Amount(5_000), nonce, NOW_MS)
                    .unwrap();
            }
        }
        let summary = shard.finish().unwrap();
        assert_eq!(summary.cards, CARDS_PER_SHARD);
        assert_eq!(summary.last_seq, CARDS_PER_SHARD + TRANSACTIONS_PER_SHARD);
        assert!(summary.segments_archived > 0, "{summary:?}");
        last_seqs.push(summary.last_seq);
    }
    last_seqs
}

#[test]
fn a_bulk_filled_directory_verifies_serves_and_rebuilds_to_the_same_state() {
    let env = Env::new();
    let last_seqs = fill(&env);
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.records, last_seqs.iter().sum::<u64>());
    assert_eq!(report.totals.cards, u64::from(SHARDS) * CARDS_PER_SHARD);

    let mut written = Vec::new();
    for index in 0..SHARDS {
        let (shard, report) = open(&env, index);
        assert!(!report.rebuilt_state, "{report:?}");
        assert_eq!(report.replayed, 0, "{report:?}");
        assert_eq!(report.from_checkpoint, last_seqs[usize::from(index)]);
        assert_eq!(report.cards, CARDS_PER_SHARD as usize);
        written.push(shard.cards().unwrap());
    }

    // The normal replay of the whole journal (archive first) builds the same cards.
    for index in 0..SHARDS {
        let dir = citycard::server::shard_dir(&env.data, index);
        std::fs::remove_dir_all(dir.join("state")).unwrap();
        let (shard, report) = open(&env, index);
        assert!(report.rebuilt_state, "{report:?}");
        assert_eq!(report.replayed, last_seqs[usize::from(index)]);
        assert_eq!(shard.cards().unwrap(), written[usize::from(index)], "shard {index}");
    }

    // And a filled card works live: its next ATC, its real key, its balance.
    let (mut shard, _) = open(&env, 0);
    let (id, record) = written[0][0];
    let secrets = citycard::server::load_secrets(&env.keys, &[]).unwrap();
    let version = secrets.current_version;
    let key = CardKey::derive(&secrets.issuer[&version.0], version, id);
    let atc = Atc(record.last_atc.0 + 1);
    let amount = Amount(10);
    let cryptogram =
        key.request_cryptogram(MessageType::Purchase as u8, id, atc, amount, 99, "reader-1");
    let auth = CardAuth { card_id: id, atc, nonce: 99, cryptogram };
    let request = Request::Purchase { auth, amount };
    let Output::Response(answer) =
        shard.execute("reader-1", Op::Request(&request), NOW_MS + 10_000_000).unwrap()
    else {
        panic!("purchase: unexpected output kind")
    };
    match answer.unsealed() {
        Response::Purchase(r) => {
            assert_eq!(r.status, Status::Approved);
            assert_eq!(r.balance.0, record.balance.0 - 10);
        }
        other => panic!("unexpected {other:?}"),
    }
}
