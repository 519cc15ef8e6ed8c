//! The engine run by a single-threaded driver on simulated time: no clock, no thread, sled
//! written only when the driver steps it. What a deterministic simulator builds on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, Atc, CardAuth, CardId, KeyVersion, MessageType, Request, RequestId, Response, Status,
};
use ring::signature::Ed25519KeyPair;

use super::persister::Stepped;
use super::recovery::OpenHost;
use super::{state, CheckpointPolicy, Limits, Op, Output, Secrets, Shard, ShardOptions};
use crate::journal::JournalOptions;

const COUNTER: &str = "counter-1";
const READER: &str = "reader-1";

/// Simulated time; a held sled lock is never waited for.
struct SimHost {
    now_ms: u64,
}

impl OpenHost for SimHost {
    fn now_ms(&mut self) -> u64 {
        self.now_ms
    }

    fn lock_busy(&mut self, _attempt: u32) -> bool {
        false
    }
}

fn secrets() -> Arc<Secrets> {
    Arc::new(Secrets {
        issuer: BTreeMap::from([(1, [42u8; 32])]),
        current_version: KeyVersion(1),
        retire_after_ms: BTreeMap::new(),
        assertion: Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap(),
    })
}

fn open(dir: &Path, now_ms: u64) -> Shard {
    let options = ShardOptions {
        index: 0,
        count: 1,
        dir: dir.to_owned(),
        journal: JournalOptions { segment_bytes: 64 * 1024, faults: None },
        limits: Limits::default(),
        checkpoint: CheckpointPolicy { records: 1_000_000, interval_ms: 10_000 },
        archive: None,
    };
    let (mut shard, _) = Shard::open_with(options, secrets(), &mut SimHost { now_ms }).unwrap();
    shard.set_write_behind(Box::<Stepped>::default()).unwrap();
    shard
}

fn run(shard: &mut Shard, terminal: &str, request: &Request, now_ms: u64) -> Response {
    let Output::Response(response) = shard.execute(terminal, Op::Request(request), now_ms).unwrap()
    else {
        panic!("not a response");
    };
    shard.commit().unwrap();
    shard.persist_due(now_ms).unwrap();
    response
}

fn purchase(key: &CardKey, card: CardId, atc: u32, amount: i64) -> Request {
    let nonce = u64::from(atc) * 31;
    let cryptogram = key.request_cryptogram(
        MessageType::Purchase as u8,
        card,
        Atc(atc),
        Amount(amount),
        nonce,
        READER,
    );
    Request::Purchase {
        auth: CardAuth { card_id: card, atc: Atc(atc), nonce, cryptogram },
        amount: Amount(amount),
    }
}

fn in_sled(shard: &Shard, card: CardId) -> Option<i64> {
    let value = shard.db.get(state::card_key(card)).unwrap()?;
    Some(state::CardRecord::decode(&value).unwrap().balance.0)
}

/// Issues a card and spends from it on simulated time; returns every answer's bytes.
fn script(dir: &Path) -> Vec<u8> {
    let mut t = 1_000_000u64;
    let mut shard = open(dir, t);
    let mut answers = BytesMut::new();
    let issued = run(&mut shard, COUNTER, &Request::Issue { op_ref: 1, deposit: Amount(500) }, t);
    issued.encode(RequestId(1), &mut answers).unwrap();
    let Response::Issue(card) = issued.clone() else { panic!("not an issue answer") };
    let key = CardKey::from_bytes(card.card_key);
    // Younger than PERSIST_INTERVAL_MS on the driver's clock: nothing is handed to sled.
    t += 100;
    let first = run(&mut shard, READER, &purchase(&key, card.card_id, 1, 120), t);
    first.encode(RequestId(2), &mut answers).unwrap();
    assert_eq!(in_sled(&shard, card.card_id), None);
    // Old enough: the chunk is sealed, but the stepped write-behind holds it.
    t += 1_000;
    shard.persist_due(t).unwrap();
    assert_eq!(in_sled(&shard, card.card_id), None, "sled written before the driver stepped");
    // Reads while sled lags see the committed state through the overlay: a retry of the
    // same bytes gets the original answer, not a second debit.
    let retried = run(&mut shard, READER, &purchase(&key, card.card_id, 1, 120), t);
    assert_eq!(retried, first);
    // The staff index is in sled only once stepped: a retried issue is found in the overlay.
    let issue = Request::Issue { op_ref: 1, deposit: Amount(500) };
    assert_eq!(run(&mut shard, COUNTER, &issue, t), issued);
    let Response::Purchase(r) = &retried else { panic!("not a purchase answer") };
    assert_eq!((r.status, r.balance), (Status::Approved, Amount(380)));
    assert!(shard.persist_step().unwrap());
    assert_eq!(in_sled(&shard, card.card_id), Some(380));
    assert!(!shard.persist_step().unwrap());
    let second = run(&mut shard, READER, &purchase(&key, card.card_id, 2, 400), t);
    let Response::Purchase(r) = &second else { panic!("not a purchase answer") };
    assert_eq!((r.status, r.balance), (Status::InsufficientFunds, Amount(380)));
    second.encode(RequestId(3), &mut answers).unwrap();
    shard.checkpoint_now().unwrap();
    answers.to_vec()
}

#[test]
fn a_single_threaded_driver_steps_sled_and_is_deterministic() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = script(a.path());
    let second = script(b.path());
    // Same inputs, same time: the same answers, byte for byte (MACs and journal seqs).
    assert_eq!(first, second);
    // A restart after a stepped run finds everything the driver persisted and replays the rest.
    let shard = open(a.path(), 9_000_000);
    assert_eq!(shard.cards().count(), 1);
    assert_eq!(shard.cards().next().map(|(_, c)| c.balance.0), Some(380));
}

/// Simulated time for the name of a state set aside; the real pause while sled's lock of a
/// database this process just closed is released.
struct StampHost {
    now_ms: u64,
    lock: crate::host::SystemHost,
}

impl OpenHost for StampHost {
    fn now_ms(&mut self) -> u64 {
        self.now_ms
    }

    fn lock_busy(&mut self, attempt: u32) -> bool {
        self.lock.lock_busy(attempt)
    }
}

#[test]
fn a_state_set_aside_is_named_by_the_hosts_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut shard = open(dir.path(), 1_000);
    run(&mut shard, COUNTER, &Request::Issue { op_ref: 1, deposit: Amount(70) }, 1_000);
    shard.checkpoint_now().unwrap();
    drop(shard);
    {
        let mut host = StampHost { now_ms: 0, lock: crate::host::SystemHost::default() };
        let db = super::recovery::open_sled(&dir.path().join("state"), &mut host).unwrap();
        db.insert(state::META_APPLIED, &b"bad"[..]).unwrap();
        db.flush().unwrap();
    }
    let options = ShardOptions {
        index: 0,
        count: 1,
        dir: dir.path().to_owned(),
        journal: JournalOptions { segment_bytes: 64 * 1024, faults: None },
        limits: Limits::default(),
        checkpoint: CheckpointPolicy::default(),
        archive: None,
    };
    let mut host = StampHost { now_ms: 4_242, lock: crate::host::SystemHost::default() };
    let (shard, report) = Shard::open_with(options, secrets(), &mut host).unwrap();
    assert_eq!(report.rebuild.as_ref().map(|r| r.label()), Some("failed_check"));
    assert!(dir.path().join("state.broken-4242").is_dir());
    assert_eq!(shard.cards().next().map(|(_, c)| c.balance.0), Some(70));
}
