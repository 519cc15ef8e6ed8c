// The `engine_ops` interpreter: input bytes become a sequence of engine operations on one
// `citycard::engine::Shard` in a temporary directory, with invariants checked after each step.
// Included by `fuzz_targets/engine_ops.rs` (libFuzzer) and by `tests/fuzz_engine_corpus.rs`
// (replays the committed corpus and regressions on every `cargo test`).
//
// Invariants (a panic is a finding):
// - `execute`, `commit`, `persist` and reopen never fail;
// - an approved online purchase never overdraws (balance after >= 0);
// - a (card, ATC) is approved at most once (one journal seq);
// - a retried card request (same bytes) gets the identical answer;
// - forged requests are never approved and never journaled;
// - sum of balances == deposits + top-ups - purchases - offline - refunds, counted from the
//   answers (each journal seq once), after every step and across close/reopen;
// - a reopened shard holds exactly the cards it held before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use citycard::engine::{Limits, Op, Output, Secrets, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, KeyVersion, MessageType, OfflineRecord, Request,
    Response, Status,
};

const MAX_OPS: usize = 256;
const MAX_REOPENS: usize = 4;
const READER: &str = "reader-1";
const KIOSK: &str = "kiosk-1";
const COUNTER: &str = "counter-1";

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
}

struct FuzzCard {
    id: CardId,
    key: CardKey,
    atc: u32,
}

#[derive(Default)]
struct Ledger {
    deposits: i64,
    top_ups: i64,
    purchases: i64,
    offline: i64,
    refunds: i64,
    /// Journal seqs already counted (a retry returns the original seq).
    seen: HashSet<u64>,
    /// (card, ATC) -> seq of its approval.
    approved_atc: HashMap<(CardId, Atc), u64>,
}

impl Ledger {
    fn expected_sum(&self) -> i64 {
        self.deposits + self.top_ups - self.purchases - self.offline - self.refunds
    }

    /// True the first time a journal seq is seen.
    fn fresh(&mut self, seq: u64) -> bool {
        seq != 0 && self.seen.insert(seq)
    }

    fn approve_atc(&mut self, card: CardId, atc: Atc, seq: u64) {
        if let Some(old) = self.approved_atc.insert((card, atc), seq) {
            assert_eq!(old, seq, "(card, ATC) approved twice under different seqs");
        }
    }
}

struct World {
    dir: tempfile::TempDir,
    secrets: Arc<Secrets>,
    shard: Option<Shard>,
    cards: Vec<FuzzCard>,
    ledger: Ledger,
    now_ms: u64,
    /// The last signed money request and its answer, for verbatim retries.
    last: Option<(String, Request, Response)>,
    reopens: usize,
}

fn limits() -> Limits {
    Limits {
        max_balance: 100_000,
        max_amount: 50_000,
        identity_ttl_ms: 300_000,
        key_cache_max: 8,
        ..Limits::default()
    }
}

fn open(dir: &std::path::Path, secrets: &Arc<Secrets>) -> Shard {
    let options = ShardOptions {
        index: 0,
        count: 1,
        dir: dir.join("shard-0"),
        journal: JournalOptions { segment_bytes: 64 * 1024, faults: None },
        limits: limits(),
        checkpoint: citycard::engine::CheckpointPolicy::default(),
        archive: None,
    };
    Shard::open(options, secrets.clone()).expect("Shard::open failed").0
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut issuer = BTreeMap::new();
        issuer.insert(1u16, [7u8; 32]);
        let assertion = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).unwrap();
        let secrets = Arc::new(Secrets {
            issuer,
            current_version: KeyVersion(1),
            retire_after_ms: BTreeMap::new(),
            assertion,
        });
        let shard = open(dir.path(), &secrets);
        World {
            dir,
            secrets,
            shard: Some(shard),
            cards: Vec::new(),
            ledger: Ledger::default(),
            now_ms: 1_700_000_000_000,
            last: None,
            reopens: 0,
        }
    }

    fn shard(&mut self) -> &mut Shard {
        self.shard.as_mut().unwrap()
    }

    fn exec(&mut self, terminal: &str, op: Op<'_>) -> Output {
        self.now_ms += 1_000;
        let now = self.now_ms;
        match self.shard().execute(terminal, op, now) {
            Ok(output) => output,
            Err(e) => panic!("execute failed: {e}"),
        }
    }

    fn request(&mut self, terminal: &str, request: &Request) -> Response {
        match self.exec(terminal, Op::Request(request)) {
            Output::Response(r) => r,
            _ => panic!("a request answered with a non-response output"),
        }
    }

    fn card(&self, pick: u8) -> Option<usize> {
        if self.cards.is_empty() {
            None
        } else {
            Some(usize::from(pick) % self.cards.len())
        }
    }

    fn auth(
        &mut self,
        i: usize,
        ty: MessageType,
        amount: i64,
        terminal: &str,
        bump: bool,
    ) -> CardAuth {
        let card = &mut self.cards[i];
        if bump {
            card.atc += 1;
        }
        let atc = Atc(card.atc.max(1));
        let nonce = u64::from(atc.0).wrapping_mul(0x9E37_79B9) ^ 0x55;
        let cryptogram =
            card.key.request_cryptogram(ty as u8, card.id, atc, Amount(amount), nonce, terminal);
        CardAuth { card_id: card.id, atc, nonce, cryptogram }
    }

    /// Books the money effect of an answer (each journal seq once) and checks it.
    fn account(&mut self, request: &Request, response: &Response) {
        match (request, response) {
            (Request::Purchase { amount, auth }, Response::Purchase(r))
            | (Request::TopUp { amount, auth }, Response::TopUp(r)) => {
                let purchase = matches!(request, Request::Purchase { .. });
                if r.status == Status::Approved {
                    assert!(r.journal_seq > 0, "approval without a journal seq");
                    assert!(amount.0 > 0, "approved a non-positive amount");
                    assert_eq!((r.card_id, r.atc), (auth.card_id, auth.atc));
                    if purchase {
                        assert!(r.balance.0 >= 0, "approved purchase overdrew: {r:?}");
                    }
                    self.ledger.approve_atc(r.card_id, r.atc, r.journal_seq);
                    if self.ledger.fresh(r.journal_seq) {
                        if purchase {
                            self.ledger.purchases += amount.0;
                        } else {
                            self.ledger.top_ups += amount.0;
                        }
                        let now =
                            self.shard().card(r.card_id).expect("approved for a missing card");
                        assert_eq!(now.balance, r.balance, "answer and state disagree");
                    }
                }
            }
            (Request::Issue { .. }, Response::Issue(r))
                if r.status == Status::Approved && self.ledger.fresh(r.journal_seq) =>
            {
                self.ledger.deposits += r.balance.0;
                self.cards.push(FuzzCard {
                    id: r.card_id,
                    key: CardKey::from_bytes(r.card_key),
                    atc: 0,
                });
            }
            (Request::Replace { .. }, Response::Replace(r))
                if r.status == Status::Approved && self.ledger.fresh(r.journal_seq) =>
            {
                self.cards.push(FuzzCard {
                    id: r.card_id,
                    key: CardKey::from_bytes(r.card_key),
                    atc: 0,
                });
            }
            (Request::Close { .. }, Response::Close(r))
                if r.status == Status::Approved && self.ledger.fresh(r.journal_seq) =>
            {
                self.ledger.refunds += r.refunded.0;
            }
            (Request::Identity { .. }, Response::Identity(r)) if r.status == Status::Approved => {
                self.ledger.fresh(r.journal_seq);
            }
            _ => {}
        }
    }

    fn offline(&mut self, records: &[OfflineRecord]) -> Vec<citycard_protocol::CardResult> {
        let positioned: Vec<(u16, OfflineRecord)> =
            records.iter().enumerate().map(|(i, r)| (i as u16, *r)).collect();
        let results = match self.exec(READER, Op::Offline(&positioned)) {
            Output::Offline(results) => results,
            _ => panic!("offline answered with another output"),
        };
        assert_eq!(results.len(), records.len());
        let mut out = Vec::new();
        for (pos, r) in results {
            let record = &records[usize::from(pos)];
            if r.status == Status::Approved {
                assert!(record.amount.0 > 0);
                self.ledger.approve_atc(r.card_id, r.atc, r.journal_seq);
                if self.ledger.fresh(r.journal_seq) {
                    self.ledger.offline += record.amount.0;
                }
            }
            out.push(r);
        }
        out
    }

    fn check_sum(&self) {
        let shard = self.shard.as_ref().unwrap();
        let sum: i64 = shard.cards().map(|(_, c)| c.balance.0).sum();
        assert_eq!(sum, self.ledger.expected_sum(), "sum of balances vs money flows");
    }

    fn commit(&mut self) {
        let shard = self.shard();
        if let Err(e) = shard.commit() {
            panic!("commit failed: {e}");
        }
        if let Err(e) = shard.persist() {
            panic!("persist failed: {e}");
        }
    }

    fn reopen(&mut self) {
        self.commit();
        let before: BTreeMap<CardId, _> =
            self.shard.as_ref().unwrap().cards().map(|(id, c)| (*id, *c)).collect();
        drop(self.shard.take());
        self.shard = Some(open(self.dir.path(), &self.secrets));
        let after: BTreeMap<CardId, _> =
            self.shard.as_ref().unwrap().cards().map(|(id, c)| (*id, *c)).collect();
        assert_eq!(before, after, "cards differ after reopen");
    }
}

fn run_ops(data: &[u8]) {
    let mut input = Input { data, pos: 0 };
    let mut world = World::new();
    let mut ops = 0;
    while !input.done() && ops < MAX_OPS {
        ops += 1;
        let code = input.u8() % 16;
        match code {
            0 => {
                let op_ref = u64::from(input.u8() % 16);
                let deposit = i64::from(input.u16()) * 2 - 10_000;
                let request = Request::Issue { op_ref, deposit: Amount(deposit) };
                let response = world.request(COUNTER, &request);
                world.account(&request, &response);
            }
            1 | 2 => {
                let pick = input.u8();
                let amount = i64::from(input.u16()) - 100;
                let Some(i) = world.card(pick) else { continue };
                let (ty, terminal) = if code == 1 {
                    (MessageType::Purchase, READER)
                } else {
                    (MessageType::TopUp, KIOSK)
                };
                let auth = world.auth(i, ty, amount, terminal, true);
                let request = if code == 1 {
                    Request::Purchase { auth, amount: Amount(amount) }
                } else {
                    Request::TopUp { auth, amount: Amount(amount) }
                };
                let response = world.request(terminal, &request);
                world.account(&request, &response);
                world.last = Some((terminal.to_owned(), request, response));
            }
            3 | 4 => {
                let pick = input.u8();
                let Some(i) = world.card(pick) else { continue };
                let (request, ty) = if code == 3 {
                    let auth = world.auth(i, MessageType::Balance, 0, KIOSK, false);
                    (Request::Balance { auth }, MessageType::Balance)
                } else {
                    let auth = world.auth(i, MessageType::Identity, 0, KIOSK, true);
                    (Request::Identity { auth }, MessageType::Identity)
                };
                let response = world.request(KIOSK, &request);
                if ty == MessageType::Balance {
                    if let Response::Balance(r) = &response {
                        if r.status == Status::Approved {
                            let id = world.cards[i].id;
                            assert_eq!(world.shard().card(id).map(|c| c.balance), Some(r.balance));
                        }
                    }
                }
                world.account(&request, &response);
            }
            5 => {
                // A forged purchase: one bit of card id, ATC, amount or cryptogram flipped.
                let pick = input.u8();
                let amount = 1 + i64::from(input.u16() % 1_000);
                let bit = usize::from(input.u8());
                let Some(i) = world.card(pick) else { continue };
                let atc_next = Atc(world.cards[i].atc + 1);
                let key = world.cards[i].key.clone();
                let card_id = world.cards[i].id;
                let nonce = 0x1234 ^ bit as u64;
                let cryptogram = key.request_cryptogram(
                    MessageType::Purchase as u8,
                    card_id,
                    atc_next,
                    Amount(amount),
                    nonce,
                    READER,
                );
                let mut auth = CardAuth { card_id, atc: atc_next, nonce, cryptogram };
                let mut amount = Amount(amount);
                match bit % 4 {
                    0 => auth.cryptogram.0[(bit / 4) % 16] ^= 1 << (bit % 8),
                    1 => auth.card_id.0 ^= 1 << (bit % 64),
                    2 => auth.atc.0 ^= 1 << (bit % 32),
                    _ => amount.0 ^= 1 << (bit % 64),
                }
                let pending = world.shard().pending();
                let request = Request::Purchase { auth, amount };
                let response = world.request(READER, &request);
                let r = match response {
                    Response::Purchase(r) => r,
                    other => panic!("{other:?}"),
                };
                assert!(
                    matches!(r.status, Status::BadCryptogram | Status::UnknownCard),
                    "forged purchase answered {r:?}"
                );
                assert_eq!(r.journal_seq, 0);
                assert_eq!(world.shard().pending(), pending, "a forged request was journaled");
            }
            6 => {
                let pick = input.u8();
                let amount = i64::from(input.u16()) - 50;
                let flags = input.u8();
                let Some(i) = world.card(pick) else { continue };
                let n = 1 + usize::from(flags % 4);
                let mut records = Vec::new();
                for k in 0..n {
                    let card = &mut world.cards[i];
                    card.atc += 1;
                    let time_ms = 1_700_000_000_000 + u64::from(card.atc);
                    let nonce = u64::from(card.atc) ^ 0xA5A5;
                    let amount = Amount(amount + k as i64);
                    let mut certificate = card.key.offline_certificate(
                        card.id,
                        Atc(card.atc),
                        amount,
                        time_ms,
                        nonce,
                        READER,
                    );
                    let forged = flags & 0x10 != 0 && k == 0;
                    if forged {
                        certificate.0[usize::from(flags >> 5)] ^= 0x01;
                    }
                    records.push(OfflineRecord {
                        card_id: card.id,
                        atc: Atc(card.atc),
                        amount,
                        time_ms,
                        nonce,
                        certificate,
                    });
                }
                if flags & 0x08 != 0 {
                    // The same record twice in one batch: one effect.
                    records.push(records[records.len() - 1]);
                }
                let results = world.offline(&records);
                if flags & 0x10 != 0 {
                    assert_eq!(results[0].status, Status::BadCryptogram, "forged offline record");
                }
                if flags & 0x08 != 0 {
                    let (a, b) = (results[results.len() - 2], results[results.len() - 1]);
                    assert_eq!(a, b, "a duplicate offline record got another answer");
                }
            }
            7..=10 => {
                let op_ref = u64::from(input.u8() % 16);
                let pick = input.u8();
                let reason = input.u8();
                let card_id = world.card(pick).map_or(CardId(pick.into()), |i| world.cards[i].id);
                let request = match code {
                    7 => Request::Block {
                        op_ref,
                        card_id,
                        reason: BlockReason::from_u8(1 + reason % 5).unwrap(),
                    },
                    8 => Request::Unblock { op_ref, card_id },
                    9 => Request::Replace { op_ref, card_id },
                    _ => Request::Close { op_ref, card_id },
                };
                let response = world.request(COUNTER, &request);
                world.account(&request, &response);
            }
            11 => {
                let ty = input.u8();
                let len = usize::from(input.u8() % 64);
                let body = input.bytes(len);
                let Some(ty) = MessageType::from_u8(ty % 0x0E) else { continue };
                let Ok(request) = Request::decode_body(ty, &body) else { continue };
                let terminal = [READER, KIOSK, COUNTER][len % 3];
                match &request {
                    Request::Hello { .. } => {}
                    Request::OfflineBatch { records } => {
                        let results = world.offline(records);
                        // Random certificates never verify.
                        assert!(results.iter().all(|r| r.status != Status::Approved));
                    }
                    Request::HotlistSync { cursor, max_entries } => {
                        let since = cursor.first().copied().unwrap_or(0);
                        let max = usize::from(*max_entries).clamp(1, 1024);
                        let _ = world.exec(terminal, Op::Hotlist { since, max });
                    }
                    _ => {
                        let response = world.request(terminal, &request);
                        if request.card_auth().is_some() {
                            let status = match &response {
                                Response::Purchase(r)
                                | Response::TopUp(r)
                                | Response::Balance(r) => r.status,
                                Response::History(h) => h.status,
                                Response::Identity(i) => i.status,
                                other => panic!("{other:?}"),
                            };
                            assert!(
                                matches!(status, Status::UnknownCard | Status::BadCryptogram),
                                "random card request answered {status:?}"
                            );
                        }
                        world.account(&request, &response);
                    }
                }
            }
            12 => world.commit(),
            13 => {
                if world.reopens < MAX_REOPENS {
                    world.reopens += 1;
                    world.reopen();
                }
            }
            14 => {
                // Retry the last signed money request verbatim: the identical answer.
                if let Some((terminal, request, original)) = world.last.clone() {
                    let again = world.request(&terminal, &request);
                    let journaled = match &original {
                        Response::Purchase(r) | Response::TopUp(r) => r.journal_seq != 0,
                        _ => false,
                    };
                    if journaled {
                        assert_eq!(again, original, "a retry got another answer");
                    }
                    world.account(&request, &again);
                }
            }
            _ => {
                let since = u64::from(input.u8());
                let max = 1 + usize::from(input.u8());
                match world.exec(READER, Op::Hotlist { since, max }) {
                    Output::Hotlist { entries, .. } => assert!(entries.len() <= max),
                    _ => panic!("hotlist answered with another output"),
                }
            }
        }
        world.check_sum();
    }
    world.commit();
    world.check_sum();
    if world.reopens < MAX_REOPENS {
        world.reopen();
        world.check_sum();
    }
}
