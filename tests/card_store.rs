//! The card table: a start reads no card record (they are read on use into a bounded cache),
//! cards that leave memory come back from sled unchanged, and a state written in the old card
//! format is rebuilt from the journal with the reason logged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use citycard::engine::{CheckpointPolicy, Limits, Op, OpenReport, Output, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::{Amount, CardId, Request, Response, Status};
use common::Env;

const CARDS: u64 = 40;
/// Smaller than the shard's cards, so issuing them already evicts.
const CACHE: usize = 8;

fn open(env: &Env) -> (Shard, OpenReport) {
    let secrets = Arc::new(citycard::server::load_secrets(&env.keys, &[]).unwrap());
    let options = ShardOptions {
        index: 0,
        count: 1,
        dir: citycard::server::shard_dir(&env.data, 0),
        journal: JournalOptions { segment_bytes: 64 * 1024, ..Default::default() },
        limits: Limits { card_cache_entries: CACHE, ..Limits::default() },
        checkpoint: CheckpointPolicy { records: 1_000, interval_ms: 60_000 },
        archive: None,
    };
    Shard::open(options, secrets).unwrap()
}

/// Issues CARDS cards with deposits 100, 101, ...; returns their ids.
fn issue_cards(shard: &mut Shard) -> Vec<CardId> {
    let mut ids = Vec::new();
    for k in 0..CARDS {
        let request = Request::Issue { op_ref: k + 1, deposit: Amount(100 + k as i64) };
        let output = shard.execute("counter-1", Op::Request(&request), 1_000 + k).unwrap();
        match output {
            Output::Response(answer) if matches!(answer.unsealed(), Response::Issue(_)) => {
                let Response::Issue(r) = answer.into_response() else { unreachable!() };
                assert_eq!(r.status, Status::Approved);
                ids.push(r.card_id);
            }
            _ => panic!("issue: unexpected output"),
        }
        shard.commit().unwrap();
        shard.persist_due(1_000 + k).unwrap();
    }
    shard.checkpoint_now().unwrap();
    ids
}

fn balances(shard: &Shard, ids: &[CardId]) -> Vec<i64> {
    ids.iter().map(|id| shard.card(*id).unwrap().balance.0).collect()
}

#[test]
fn a_start_reads_no_card_and_evicted_cards_come_back_unchanged() {
    let env = Env::new();
    let (mut shard, _) = open(&env);
    let ids = issue_cards(&mut shard);
    assert!(shard.cards_in_memory() <= CACHE, "{} cards in memory", shard.cards_in_memory());
    let expected: Vec<i64> = (0..CARDS as i64).map(|k| 100 + k).collect();
    assert_eq!(balances(&shard, &ids), expected);
    drop(shard);

    let (shard, report) = open(&env);
    assert!(!report.rebuilt_state, "{report:?}");
    assert_eq!(report.cards, CARDS as usize);
    // Nothing replayed, nothing read: the count and digest come from sled's meta keys.
    assert_eq!(shard.cards_in_memory(), 0);
    assert_eq!(balances(&shard, &ids), expected);
    assert!(shard.cards_in_memory() <= CACHE);
    assert_eq!(shard.cards().unwrap().len(), CARDS as usize);
}

#[test]
fn a_state_in_the_old_card_format_is_rebuilt_from_the_journal() {
    let env = Env::new();
    let (mut shard, _) = open(&env);
    let ids = issue_cards(&mut shard);
    let expected = balances(&shard, &ids);
    drop(shard);

    // What the previous version left: fixed 44-byte card records and no format key.
    {
        let state = citycard::server::shard_dir(&env.data, 0).join("state");
        let db = sled::open(&state).unwrap();
        db.remove(b"m:format").unwrap();
        for id in &ids {
            let mut key = vec![b'c'];
            key.extend_from_slice(&id.0.to_be_bytes());
            db.insert(key, vec![0u8; 44]).unwrap();
        }
        db.flush().unwrap();
    }
    let (shard, report) = open(&env);
    assert!(report.rebuilt_state, "{report:?}");
    assert_eq!(report.rebuild.as_ref().map(|r| r.label()), Some("old_format"), "{report:?}");
    assert_eq!(report.replayed, CARDS);
    assert_eq!(balances(&shard, &ids), expected);
}
