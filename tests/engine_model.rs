//! Model test: random operation sequences with restarts against the engine and against a plain
//! BTreeMap ledger, compared after every step (proptest, with shrinking).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use citycard::engine::{Limits, Op, Output, Secrets, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, CardResult, KeyVersion, MessageType, OfflineRecord,
    Request, Response, Status,
};
use proptest::prelude::*;

const TERMINAL: &str = "model-1";
const MAX_BALANCE: i64 = 10_000;
const MAX_AMOUNT: i64 = 5_000;

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

fn open(dir: &std::path::Path, secrets: &Arc<Secrets>) -> Shard {
    let options = ShardOptions {
        index: 0,
        count: 1,
        dir: dir.to_owned(),
        journal: JournalOptions { segment_bytes: 64 * 1024, ..Default::default() },
        // A tiny card cache, so cards keep leaving memory and are read back from sled.
        limits: Limits {
            max_balance: MAX_BALANCE,
            max_amount: MAX_AMOUNT,
            card_cache_entries: 3,
            ..Limits::default()
        },
        checkpoint: citycard::engine::CheckpointPolicy::default(),
        archive: None,
    };
    Shard::open(options, secrets.clone()).unwrap().0
}

#[derive(Clone, Debug)]
enum Step {
    Issue(i64),
    Purchase(usize, i64),
    TopUp(usize, i64),
    /// A purchase of exactly the card's balance (or one more): the boundary of the funds check.
    PurchaseExact(usize, bool),
    /// Send the last card request again (same bytes).
    Retry,
    /// Reuse the card's last ATC with another amount.
    Replay(usize, i64),
    /// A purchase with one cryptogram bit flipped.
    Forge(usize, u8),
    Offline(usize, i64),
    Block(usize),
    Unblock(usize),
    Close(usize),
    Replace(usize),
    Commit,
    /// Commit and hand the entries to sled's writer without waiting: later reads must see
    /// them through the overlay or sled, whichever has them.
    CommitAndHandOff,
    /// Reopen; uncommitted decisions are lost (and were never acknowledged).
    Restart {
        commit_first: bool,
        persist_first: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0i64..6_000).prop_map(Step::Issue),
        8 => (0usize..8, -10i64..3_000).prop_map(|(c, a)| Step::Purchase(c, a)),
        4 => (0usize..8, -10i64..6_000).prop_map(|(c, a)| Step::TopUp(c, a)),
        2 => (0usize..8, any::<bool>()).prop_map(|(c, over)| Step::PurchaseExact(c, over)),
        2 => Just(Step::Retry),
        1 => (0usize..8, 1i64..100).prop_map(|(c, a)| Step::Replay(c, a)),
        1 => (0usize..8, 0u8..128).prop_map(|(c, b)| Step::Forge(c, b)),
        3 => (0usize..8, 1i64..4_000).prop_map(|(c, a)| Step::Offline(c, a)),
        1 => (0usize..8).prop_map(Step::Block),
        1 => (0usize..8).prop_map(Step::Unblock),
        1 => (0usize..8).prop_map(Step::Close),
        1 => (0usize..8).prop_map(Step::Replace),
        4 => Just(Step::Commit),
        3 => Just(Step::CommitAndHandOff),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(c, p)| Step::Restart { commit_first: c, persist_first: p }),
    ]
}

/// The reference ledger: what the engine must agree with once a decision is committed.
#[derive(Clone, Debug, Default)]
struct Model {
    /// Balance and whether the card can still be used (not closed/replaced), and blocked.
    cards: BTreeMap<CardId, (i64, bool, bool)>,
}

impl Model {
    fn hotlisted(&self, id: CardId) -> bool {
        self.cards.get(&id).is_some_and(|(b, live, blocked)| !live || *blocked || *b < 0)
    }
}

struct Harness {
    dir: tempfile::TempDir,
    secrets: Arc<Secrets>,
    /// None only for the moment of a restart.
    shard: Option<Shard>,
    /// State as of the last commit, and state including decisions since.
    committed: Model,
    model: Model,
    /// Simulated cards (id, key, atc) in issue order; committed ones only are kept on restart.
    wallet: Vec<(CardId, CardKey, u32)>,
    committed_wallet: Vec<(CardId, CardKey, u32)>,
    last: Option<(Request, Response)>,
    op_ref: u64,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let secrets = secrets();
        std::fs::write(dir.path().join("shards"), "1\n").unwrap();
        let shard = Some(open(&dir.path().join("shard-0"), &secrets));
        Harness {
            dir,
            secrets,
            shard,
            committed: Model::default(),
            model: Model::default(),
            wallet: Vec::new(),
            committed_wallet: Vec::new(),
            last: None,
            op_ref: 0,
        }
    }

    fn shard(&mut self) -> &mut Shard {
        self.shard.as_mut().expect("shard is open between steps")
    }

    fn run(&mut self, request: &Request) -> Response {
        match self.shard().execute(TERMINAL, Op::Request(request), 1_700_000_000_000).unwrap() {
            Output::Response(r) => r.into_response(),
            _ => panic!("wrong output kind"),
        }
    }

    fn card(&mut self, i: usize) -> Option<usize> {
        (!self.wallet.is_empty()).then(|| i % self.wallet.len())
    }

    fn auth(&mut self, i: usize, message_type: MessageType, amount: i64, bump: bool) -> CardAuth {
        let (id, key, atc) = &mut self.wallet[i];
        if bump {
            *atc += 1;
        }
        let nonce = u64::from(*atc) ^ 0x5555;
        let cryptogram = key.request_cryptogram(
            message_type as u8,
            *id,
            Atc(*atc),
            Amount(amount),
            nonce,
            TERMINAL,
        );
        CardAuth { card_id: *id, atc: Atc(*atc), nonce, cryptogram }
    }

    fn commit(&mut self) {
        self.shard().commit().unwrap();
        self.shard().persist().unwrap();
        self.committed = self.model.clone();
        self.committed_wallet = self.wallet.clone();
    }

    fn money(&mut self, i: usize, amount: i64, purchase: bool) {
        let (message_type, mt) =
            if purchase { (MessageType::Purchase, true) } else { (MessageType::TopUp, false) };
        let auth = self.auth(i, message_type, amount, true);
        let request = if mt {
            Request::Purchase { auth, amount: Amount(amount) }
        } else {
            Request::TopUp { auth, amount: Amount(amount) }
        };
        let response = self.run(&request);
        let r = result(&response);
        let id = auth.card_id;
        let (balance, live, blocked) = self.model.cards[&id];
        let expected = if !live {
            Status::CardClosed
        } else if amount <= 0 || amount > MAX_AMOUNT {
            Status::InvalidAmount
        } else if purchase && self.model.hotlisted(id) {
            Status::CardBlocked
        } else if purchase && balance < amount {
            Status::InsufficientFunds
        } else if !purchase && blocked {
            Status::CardBlocked
        } else if !purchase && balance + amount > MAX_BALANCE {
            Status::OverBalanceCap
        } else {
            Status::Approved
        };
        assert_eq!(r.status, expected, "{request:?} on {:?}", self.model.cards[&id]);
        if expected == Status::Approved {
            let after = if purchase { balance - amount } else { balance + amount };
            self.model.cards.insert(id, (after, live, blocked));
        }
        assert_eq!(r.balance.0, self.model.cards[&id].0);
        self.last = Some((request, response));
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Issue(deposit) => {
                self.op_ref += 1;
                let response =
                    self.run(&Request::Issue { op_ref: self.op_ref, deposit: Amount(deposit) });
                let Response::Issue(r) = response else { panic!("{response:?}") };
                if deposit > MAX_BALANCE {
                    assert_eq!(r.status, Status::InvalidAmount);
                    return;
                }
                assert_eq!((r.status, r.balance.0), (Status::Approved, deposit));
                assert!(!self.model.cards.contains_key(&r.card_id), "card id reused");
                self.model.cards.insert(r.card_id, (deposit, true, false));
                self.wallet.push((r.card_id, CardKey::from_bytes(r.card_key), 0));
            }
            Step::Purchase(c, amount) => {
                if let Some(i) = self.card(c) {
                    self.money(i, amount, true);
                }
            }
            Step::PurchaseExact(c, over) => {
                if let Some(i) = self.card(c) {
                    let balance = self.model.cards[&self.wallet[i].0].0;
                    self.money(i, balance.clamp(1, MAX_AMOUNT) + i64::from(over), true);
                }
            }
            Step::TopUp(c, amount) => {
                if let Some(i) = self.card(c) {
                    self.money(i, amount, false);
                }
            }
            Step::Retry => {
                if let Some((request, response)) = self.last.clone() {
                    assert_eq!(
                        self.run(&request),
                        response,
                        "a retry must get the original answer"
                    );
                }
            }
            Step::Replay(c, amount) => {
                if let Some(i) = self.card(c) {
                    if self.wallet[i].2 == 0 {
                        return;
                    }
                    let auth = self.auth(i, MessageType::Purchase, amount, false);
                    let response = self.run(&Request::Purchase { auth, amount: Amount(amount) });
                    // Either the identical earlier request (same amount) or a replay.
                    let r = result(&response);
                    if r.status != Status::Replay {
                        assert!(r.journal_seq != 0, "a non-replay answer must be the original");
                    }
                }
            }
            Step::Forge(c, bit) => {
                if let Some(i) = self.card(c) {
                    let mut auth = self.auth(i, MessageType::Purchase, 1, true);
                    self.wallet[i].2 -= 1; // the forged attempt must not burn the ATC
                    auth.cryptogram.0[usize::from(bit / 8)] ^= 1 << (bit % 8);
                    let r = result(&self.run(&Request::Purchase { auth, amount: Amount(1) }));
                    assert_eq!(r.status, Status::BadCryptogram);
                }
            }
            Step::Offline(c, amount) => {
                if let Some(i) = self.card(c) {
                    let (id, key, atc) = &mut self.wallet[i];
                    *atc += 1;
                    let record = OfflineRecord {
                        card_id: *id,
                        atc: Atc(*atc),
                        amount: Amount(amount),
                        time_ms: 1_600_000_000_000,
                        nonce: 9,
                        certificate: key.offline_certificate(
                            *id,
                            Atc(*atc),
                            Amount(amount),
                            1_600_000_000_000,
                            9,
                            TERMINAL,
                        ),
                    };
                    let id = *id;
                    let out =
                        self.shard().execute(TERMINAL, Op::Offline(&[(0, record)]), 1).unwrap();
                    let Output::Offline(results) = out else { panic!("wrong output") };
                    let (balance, live, blocked) = self.model.cards[&id];
                    let r = results[0].1;
                    if !live {
                        assert_eq!(r.status, Status::CardClosed);
                    } else {
                        assert_eq!(
                            r.status,
                            Status::Approved,
                            "offline records apply even when overdrawing"
                        );
                        self.model.cards.insert(id, (balance - amount, live, blocked));
                        assert_eq!(r.balance.0, balance - amount);
                    }
                }
            }
            Step::Block(c) | Step::Unblock(c) | Step::Close(c) => {
                let Some(i) = self.card(c) else { return };
                let id = self.wallet[i].0;
                self.op_ref += 1;
                let op_ref = self.op_ref;
                let (balance, live, blocked) = self.model.cards[&id];
                let (request, expected) = match step {
                    Step::Block(_) => (
                        Request::Block { op_ref, card_id: id, reason: BlockReason::Lost },
                        if !live {
                            Status::CardClosed
                        } else if blocked {
                            Status::InvalidState
                        } else {
                            Status::Approved
                        },
                    ),
                    Step::Unblock(_) => (
                        Request::Unblock { op_ref, card_id: id },
                        if !live {
                            Status::CardClosed
                        } else if !blocked {
                            Status::InvalidState
                        } else {
                            Status::Approved
                        },
                    ),
                    _ => (
                        Request::Close { op_ref, card_id: id },
                        if !live {
                            Status::CardClosed
                        } else if balance < 0 && !blocked {
                            // Protocol 1.1: only a blocked debtor closes with its debt kept.
                            Status::InvalidState
                        } else {
                            Status::Approved
                        },
                    ),
                };
                let response = self.run(&request);
                let (Response::Block(s) | Response::Unblock(s) | Response::Close(s)) = response
                else {
                    panic!("{response:?}")
                };
                assert_eq!(s.status, expected, "{request:?}");
                if expected == Status::Approved {
                    let next = match step {
                        Step::Block(_) => (balance, live, true),
                        Step::Unblock(_) => (balance, live, false),
                        _ => {
                            assert_eq!(s.refunded.0, balance.max(0));
                            assert_eq!(s.balance.0, balance.min(0), "a debt stays on the card");
                            (balance.min(0), false, blocked)
                        }
                    };
                    self.model.cards.insert(id, next);
                }
            }
            Step::Replace(c) => {
                let Some(i) = self.card(c) else { return };
                let id = self.wallet[i].0;
                self.op_ref += 1;
                let response = self.run(&Request::Replace { op_ref: self.op_ref, card_id: id });
                let Response::Replace(r) = response else { panic!("{response:?}") };
                let (balance, live, blocked) = self.model.cards[&id];
                if !live {
                    assert_eq!(r.status, Status::CardClosed);
                    return;
                }
                if balance < 0 && !blocked {
                    assert_eq!(
                        r.status,
                        Status::InvalidState,
                        "an overdrawn card is topped up first"
                    );
                    return;
                }
                // A positive balance moves; a blocked debtor's debt stays on the old card.
                assert_eq!(
                    (r.status, r.balance.0, r.replaced_card_id),
                    (Status::Approved, balance.max(0), id)
                );
                self.model.cards.insert(id, (balance.min(0), false, blocked));
                self.model.cards.insert(r.card_id, (balance.max(0), true, false));
                self.wallet.push((r.card_id, CardKey::from_bytes(r.card_key), 0));
            }
            Step::Commit => self.commit(),
            Step::CommitAndHandOff => {
                self.shard().commit().unwrap();
                self.shard().hand_off().unwrap();
                self.committed = self.model.clone();
                self.committed_wallet = self.wallet.clone();
            }
            Step::Restart { commit_first, persist_first } => {
                if commit_first {
                    self.shard().commit().unwrap();
                    self.committed = self.model.clone();
                    self.committed_wallet = self.wallet.clone();
                    if persist_first {
                        self.shard().persist().unwrap();
                    }
                }
                // Dropping without commit loses the undecided tail, as a crash would.
                drop(self.shard.take());
                self.shard = Some(open(&self.dir.path().join("shard-0"), &self.secrets));
                self.model = self.committed.clone();
                self.wallet = self.committed_wallet.clone();
                self.last = None;
            }
        }
        self.check();
    }

    /// Every card's balance in the engine equals the model's, and no card exists only on one side.
    fn check(&self) {
        let shard = self.shard.as_ref().expect("shard is open between steps");
        let engine: BTreeMap<CardId, i64> =
            shard.cards().unwrap().into_iter().map(|(id, c)| (id, c.balance.0)).collect();
        let model: BTreeMap<CardId, i64> =
            self.model.cards.iter().map(|(id, c)| (*id, c.0)).collect();
        assert_eq!(engine, model);
    }
}

fn result(response: &Response) -> CardResult {
    match response {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => *r,
        other => panic!("not a card result: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_the_reference_ledger(steps in proptest::collection::vec(step(), 1..120)) {
        let mut h = Harness::new();
        for s in &steps {
            h.apply(s);
        }
        h.commit();
        drop(h.shard.take());
        // The offline auditor agrees: chains, balances and sled state.
        let report = citycard::verify::verify(h.dir.path()).unwrap();
        prop_assert!(report.ok(), "verify: {:?}", report.problems);
    }
}
