//! Regressions: each bug found by a test suite, a fuzzer or a review, as its smallest input
//! against a bare shard (no network), newest last, each with a `// postmortem:` line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use citycard::engine::{CheckpointPolicy, Limits, Op, Output, Secrets, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, CardResult, MessageType, OfflineRecord, Request,
    Response, Status,
};

const TERMINAL: &str = "reader-1";
const COUNTER: &str = "counter-1";
const NOW_MS: u64 = 1_767_225_600_000;

struct Bench {
    dir: tempfile::TempDir,
    secrets: Arc<Secrets>,
    shard: Option<Shard>,
}

impl Bench {
    fn new() -> Bench {
        let secrets = Arc::new(Secrets {
            issuer: BTreeMap::from([(1, [5u8; 32])]),
            current_version: citycard_protocol::KeyVersion(1),
            retire_after_ms: BTreeMap::new(),
            assertion: ring::signature::Ed25519KeyPair::from_seed_unchecked(&[3u8; 32]).unwrap(),
        });
        let mut bench = Bench { dir: tempfile::tempdir().unwrap(), secrets, shard: None };
        bench.reopen();
        bench
    }

    fn reopen(&mut self) {
        drop(self.shard.take());
        let options = ShardOptions {
            index: 0,
            count: 1,
            dir: self.dir.path().join("shard-0"),
            journal: JournalOptions { segment_bytes: 64 * 1024, ..Default::default() },
            limits: Limits::default(),
            checkpoint: CheckpointPolicy { records: 50, interval_ms: 60_000 },
            archive: None,
        };
        self.shard = Some(Shard::open(options, self.secrets.clone()).unwrap().0);
    }

    fn shard(&mut self) -> &mut Shard {
        self.shard.as_mut().unwrap()
    }

    fn run(&mut self, terminal: &str, request: &Request) -> Response {
        let output = self.shard().execute(terminal, Op::Request(request), NOW_MS).unwrap();
        self.shard().commit().unwrap();
        self.shard().persist_due(NOW_MS).unwrap();
        match output {
            Output::Response(r) => r.into_response(),
            _ => panic!("not a response"),
        }
    }

    fn issue(&mut self, op_ref: u64, deposit: i64) -> (CardId, CardKey) {
        match self.run(COUNTER, &Request::Issue { op_ref, deposit: Amount(deposit) }) {
            Response::Issue(r) => {
                assert_eq!(r.status, Status::Approved);
                (r.card_id, CardKey::from_bytes(r.card_key))
            }
            other => panic!("{other:?}"),
        }
    }
}

fn purchase(card: CardId, key: &CardKey, atc: u32, amount: i64) -> Request {
    let nonce = u64::from(atc) + 1_000;
    let cryptogram = key.request_cryptogram(
        MessageType::Purchase as u8,
        card,
        Atc(atc),
        Amount(amount),
        nonce,
        TERMINAL,
    );
    Request::Purchase {
        auth: CardAuth { card_id: card, atc: Atc(atc), nonce, cryptogram },
        amount: Amount(amount),
    }
}

fn result(response: &Response) -> CardResult {
    match response {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => *r,
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_overtaken_atc_is_still_decided() {
    // postmortem: an ATC answered Busy, then overtaken by a later approved ATC of the same card,
    // was declined Replay on its retry, so a terminal following the spec lost the transaction
    // (protocol 1.1, item 2; found by a client written from PROTOCOL.md with --queue-depth 1).
    let mut bench = Bench::new();
    let (card, key) = bench.issue(1, 100);
    assert_eq!(result(&bench.run(TERMINAL, &purchase(card, &key, 2, 10))).status, Status::Approved);
    let late = purchase(card, &key, 1, 10);
    let answer = bench.run(TERMINAL, &late);
    assert_eq!((result(&answer).status, result(&answer).balance.0), (Status::Approved, 80));
    bench.reopen();
    assert_eq!(bench.run(TERMINAL, &late), answer, "its retry after a restart: the same answer");
}

#[test]
fn a_blocked_debtor_can_be_closed() {
    // postmortem: a stolen card overdrawn by an offline record could be neither closed,
    // replaced nor topped up; only unblocking (making a stolen card spendable) got it out
    // (protocol 1.1, item 3).
    let mut bench = Bench::new();
    let (card, key) = bench.issue(1, 100);
    let block = Request::Block { op_ref: 2, card_id: card, reason: BlockReason::Stolen };
    assert!(
        matches!(bench.run(COUNTER, &block), Response::Block(r) if r.status == Status::Approved)
    );
    let (atc, amount, time_ms, nonce) = (Atc(1), Amount(300), NOW_MS, 7);
    let record = OfflineRecord {
        card_id: card,
        atc,
        amount,
        time_ms,
        nonce,
        certificate: key.offline_certificate(card, atc, amount, time_ms, nonce, TERMINAL),
    };
    bench.shard().execute(TERMINAL, Op::Offline(&[(0, record)]), NOW_MS).unwrap();
    bench.shard().commit().unwrap();
    match bench.run(COUNTER, &Request::Close { op_ref: 3, card_id: card }) {
        Response::Close(r) => {
            assert_eq!((r.status, r.refunded.0, r.balance.0), (Status::Approved, 0, -200))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn history_reads_the_chain_after_the_overlay_is_persisted() {
    // postmortem: with history served from the journal through each card's chain, a walk must
    // pass from overlay entries (not yet readable from disk) to journal records; a chunk sealed
    // and persisted between two requests must not lose any entry (found while moving history
    // out of sled).
    let mut bench = Bench::new();
    let (card, key) = bench.issue(1, 10_000);
    for atc in 1..=120 {
        bench.run(TERMINAL, &purchase(card, &key, atc, 1));
        if atc % 40 == 0 {
            bench.shard().hand_off().unwrap();
        }
    }
    bench.shard().persist().unwrap();
    bench.reopen();
    let nonce = 5;
    let cryptogram = key.request_cryptogram(
        MessageType::History as u8,
        card,
        Atc(121),
        Amount(0),
        nonce,
        "kiosk-1",
    );
    let auth = CardAuth { card_id: card, atc: Atc(121), nonce, cryptogram };
    match bench.run("kiosk-1", &Request::History { auth, before_seq: 0, limit: 64 }) {
        Response::History(page) => {
            assert_eq!(page.entries.len(), 64);
            let atcs: Vec<u32> = page.entries.iter().map(|e| e.atc.0).collect();
            assert_eq!(atcs, (57..=120).rev().collect::<Vec<_>>());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn staff_operations_need_the_cards_key() {
    // postmortem: with the card's issuer key version removed from issuer.key, Block and Close
    // were approved (a refund paid) with an all-zero MAC, which a terminal following the spec
    // must treat as a forgery (found by a client written from PROTOCOL.md alone).
    let mut bench = Bench::new();
    let (card, _) = bench.issue(1, 500);
    let full = bench.secrets.clone();
    bench.secrets = Arc::new(Secrets {
        issuer: BTreeMap::from([(2, [6u8; 32])]),
        current_version: citycard_protocol::KeyVersion(2),
        retire_after_ms: BTreeMap::new(),
        assertion: ring::signature::Ed25519KeyPair::from_seed_unchecked(&[3u8; 32]).unwrap(),
    });
    bench.reopen();
    let close = Request::Close { op_ref: 2, card_id: card };
    match bench.run(COUNTER, &close) {
        Response::Close(r) => {
            assert_eq!((r.status, r.refunded.0), (Status::KeyVersionRetired, 0));
            assert_eq!(r.journal_seq, 0, "not recorded");
        }
        other => panic!("{other:?}"),
    }
    // With the key back, the same op_ref is decided for the first time.
    bench.secrets = full;
    bench.reopen();
    match bench.run(COUNTER, &close) {
        Response::Close(r) => assert_eq!((r.status, r.refunded.0), (Status::Approved, 500)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_offline_record_with_atc_zero_is_a_replay() {
    // postmortem: ATC 0 was refused online but applied offline; no card produces it.
    let mut bench = Bench::new();
    let (card, key) = bench.issue(1, 500);
    let (atc, amount, time_ms, nonce) = (Atc(0), Amount(5), NOW_MS, 1);
    let record = OfflineRecord {
        card_id: card,
        atc,
        amount,
        time_ms,
        nonce,
        certificate: key.offline_certificate(card, atc, amount, time_ms, nonce, TERMINAL),
    };
    let output = bench.shard().execute(TERMINAL, Op::Offline(&[(0, record)]), NOW_MS).unwrap();
    match output {
        Output::Offline(results) => {
            assert_eq!((results[0].1.status, results[0].1.balance.0), (Status::Replay, 500))
        }
        _ => panic!("not offline results"),
    }
}

#[test]
fn a_reused_op_ref_does_not_end_a_ride() {
    // postmortem: found by the simulator (seed 4, step 226): a Close or Replace settled the
    // card's open hold before the op_ref was looked up, so a retry of an answered Close, or a
    // Close with a reused op_ref (ReferenceReused, nothing journaled for it), charged the
    // missing tap-out fare and ended the ride of a card that stayed open.
    let mut bench = Bench::new();
    let (card, key) = bench.issue(1, 1_000);
    let block = Request::Block { op_ref: 2, card_id: card, reason: BlockReason::Lost };
    bench.run(COUNTER, &block);
    bench.run(COUNTER, &Request::Unblock { op_ref: 3, card_id: card });
    let nonce = 77;
    let cryptogram =
        key.request_cryptogram(MessageType::TapIn as u8, card, Atc(1), Amount(0), nonce, TERMINAL);
    let tap_in =
        Request::TapIn { auth: CardAuth { card_id: card, atc: Atc(1), nonce, cryptogram } };
    match bench.run(TERMINAL, &tap_in) {
        Response::TapIn(t) => assert_eq!(t.status, Status::Approved),
        other => panic!("{other:?}"),
    }
    match bench.run(COUNTER, &Request::Close { op_ref: 2, card_id: card }) {
        Response::Close(s) => assert_eq!((s.status, s.journal_seq), (Status::ReferenceReused, 0)),
        other => panic!("{other:?}"),
    }
    let record = bench.shard().card(card).unwrap();
    assert!(record.hold.is_open(), "the ride goes on");
    assert_eq!(record.balance, Amount(1_000));
}
