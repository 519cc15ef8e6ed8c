//! The terminals: every operation of every role (point-of-sale, top-up kiosk, counter, monitor),
//! with retries of the same bytes, replays of used ATCs, late ATCs, forged cryptograms and
//! certificates, offline batches and reused op_refs; each answer is checked against the
//! reference ledger when it arrives, and its effect recorded for when its batch is committed.

use bytes::BytesMut;
use citycard::engine::{shard_of, Op, Output};
use citycard_protocol::crypto::{response_mac_ok, staff_binding, CardKey};
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, CardResult, Mac, MessageType, OfflineRecord,
    Request, RequestId, Response, Status,
};

use crate::effect::{Change, Effect};
use crate::model::{
    AtcExpect, Card, Model, Purchase, StaffUse, State, Use, MAX_AMOUNT, MAX_BALANCE,
};
use crate::world::{World, IDENTITY_TTL_MS, SHARDS};
use crate::Failure;

/// A consuming online request as [`World::send_consuming`] sent it.
pub(crate) struct Sent {
    /// The card as the model held it before the request.
    pub card: Card,
    /// What the ATC rule expects: `None` decide it fresh; `Some((Some(answer), deep))` the
    /// original answer again (or Replay when `deep`); `Some((None, _))` a Replay decline.
    pub expect: Option<(Option<Vec<u8>>, bool)>,
    pub shard: u16,
    pub response: Response,
    pub bytes: Vec<u8>,
}

pub(crate) const POS: [&str; 3] = ["pos-1", "pos-2", "pos-3"];
const KIOSKS: [&str; 2] = ["kiosk-1", "kiosk-2"];
const COUNTERS: [&str; 2] = ["counter-1", "counter-2"];
/// Cards the counters aim for; past it they issue rarely.
const CARDS_TARGET: usize = 24;

pub(crate) fn encode(response: &Response) -> Vec<u8> {
    let mut out = BytesMut::new();
    // Every engine answer encodes (it built it); an error is a failure the caller reports.
    match response.encode(RequestId(0), &mut out) {
        Ok(()) => out.to_vec(),
        Err(e) => format!("unencodable {e}").into_bytes(),
    }
}

pub(crate) fn mac_ok(key: &CardKey, binding: &Mac, response: &Response) -> bool {
    let mut body = BytesMut::new();
    response.encode_body(&mut body).is_ok()
        && response_mac_ok(key, response.message_type() as u8, binding, &body)
}

fn card_result(response: &Response) -> Option<CardResult> {
    match response {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => Some(*r),
        _ => None,
    }
}

impl World {
    /// One terminal command, executed and checked.
    pub fn command(&mut self) -> Result<(), Failure> {
        let few_cards = self.pending.cards.len() < CARDS_TARGET;
        let roll = self.rng.below(100);
        if self.pending.cards.is_empty() || (few_cards && roll < 8) {
            return self.issue();
        }
        match roll {
            0..=19 => self.money(true),
            20..=22 => self.tap_in(),
            23..=24 => self.tap_out(),
            25..=36 => self.money(false),
            37..=41 => self.read(false),
            42..=44 => self.read(true),
            45..=49 => self.identity(),
            50..=55 => self.offline(),
            56..=58 => self.issue(),
            59..=61 => self.staff_op(0),
            62..=64 => self.staff_op(1),
            65 => self.staff_op(2),
            66..=67 => self.staff_op(3),
            68..=77 => self.retry(),
            78..=80 => self.retry_lost(),
            81..=84 => self.replay(),
            85..=87 => self.forge(),
            88..=89 => self.reuse_op_ref(),
            90..=92 => self.hotlist(),
            93 => self.funds(),
            94..=95 => self.reversal(),
            96 => self.inquire_unsent(),
            97 => self.tap_in(),
            _ => self.tap_out(),
        }
    }

    pub(crate) fn pick_card(&mut self) -> Option<(CardId, Card)> {
        let i = self.rng.index(self.pending.cards.len());
        self.pending.cards.iter().nth(i).map(|(a, b)| (*a, b.clone()))
    }

    pub(crate) fn next_atc(&mut self, id: CardId) -> u32 {
        // Now and then the card skips ATCs (a request that never reached the server), which a
        // later late request may use.
        let skip = if self.rng.chance(100) { 1 + self.rng.below(3) as u32 } else { 0 };
        let counter = self.counters.entry(id).or_insert(0);
        *counter += 1 + skip;
        *counter
    }

    pub(crate) fn auth(
        key: &CardKey,
        id: CardId,
        mt: MessageType,
        atc: u32,
        amount: i64,
        terminal: &str,
        nonce: u64,
    ) -> CardAuth {
        let cryptogram =
            key.request_cryptogram(mt as u8, id, Atc(atc), Amount(amount), nonce, terminal);
        CardAuth { card_id: id, atc: Atc(atc), nonce, cryptogram }
    }

    /// Sends a consuming online request of a card the model knows, after working out what the
    /// ATC rule of 6.1 expects of it, and checks the answer's MAC under the card's key.
    pub(crate) fn send_consuming(
        &mut self,
        terminal: &str,
        request: &Request,
        auth: &CardAuth,
        what: &str,
    ) -> Result<Sent, Failure> {
        let Some(card) = self.pending.cards.get(&auth.card_id).cloned() else {
            return Err(self.fail(format!("{what} for an unknown card")));
        };
        let expect = match Model::online_atc(&card, auth.atc.0, |u| {
            u.terminal == terminal && u.request.as_ref() == Some(request)
        }) {
            AtcExpect::Fresh => None,
            AtcExpect::Same(u, deep) => Some((Some(u.answer.clone()), deep)),
            AtcExpect::Replay => Some((None, false)),
        };
        let (shard, response, bytes) = self.send(terminal, request)?;
        if !mac_ok(&card.key, &auth.cryptogram, &response) {
            return Err(self.fail(format!("{what}: answer MAC does not verify: {response:?}")));
        }
        Ok(Sent { card, expect, shard, response, bytes })
    }

    /// Sends a request and records the exchange in the trace.
    pub(crate) fn send(
        &mut self,
        terminal: &str,
        request: &Request,
    ) -> Result<(u16, Response, Vec<u8>), Failure> {
        let shard = citycard::server::route(request, terminal, usize::from(SHARDS)) as u16;
        let out = self.execute(shard, terminal, Op::Request(request))?;
        let Output::Response(answer) = out else {
            return Err(self.fail("a request answered with a non-response output"));
        };
        let response = answer.into_response();
        let bytes = encode(&response);
        let mut req = BytesMut::new();
        let _ = request.encode(RequestId(0), &mut req);
        self.hash(terminal.as_bytes());
        self.hash(&req);
        self.hash(&bytes);
        self.inflight.push((terminal.to_string(), request.clone()));
        self.step_answers.push((shard, terminal.to_string(), request.clone(), bytes.clone()));
        Ok((shard, response, bytes))
    }

    pub(crate) fn record(&mut self, shard: u16, seq: u64, changes: Vec<Change>) {
        let effect = Effect { shard, seq, changes };
        self.pending.apply(&effect);
        self.batch.push(effect);
    }

    fn amount(&mut self, balance: i64) -> i64 {
        match self.rng.below(20) {
            0 => 0,
            1 => -self.rng.range(1, 50),
            2 => MAX_AMOUNT + self.rng.range(1, 100),
            3 => balance.max(1),
            4 => balance + 1,
            _ => self.rng.range(1, 3_000),
        }
    }

    /// A consuming card request (purchase, top-up) with the ATC rule of 6.1 checked.
    pub(crate) fn money(&mut self, purchase: bool) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let terminal = if purchase { POS[self.rng.index(3)] } else { KIOSKS[self.rng.index(2)] };
        let amount = self.amount(card.balance);
        let atc = self.next_atc(id);
        let mt = if purchase { MessageType::Purchase } else { MessageType::TopUp };
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, mt, atc, amount, terminal, nonce);
        let request = if purchase {
            Request::Purchase { auth, amount: Amount(amount) }
        } else {
            Request::TopUp { auth, amount: Amount(amount) }
        };
        self.consume(terminal, request)
    }

    /// Sends a consuming online request and checks its answer by the ATC rule.
    pub(crate) fn consume(&mut self, terminal: &str, request: Request) -> Result<(), Failure> {
        let (auth, amount, purchase) = match &request {
            Request::TapIn { .. } | Request::TapOut { .. } | Request::Reversal { .. } => {
                return self.transit(terminal, request)
            }
            Request::Inquiry { .. } => return self.ask(terminal, request),
            Request::Purchase { auth, amount } => (*auth, amount.0, Some(true)),
            Request::TopUp { auth, amount } => (*auth, amount.0, Some(false)),
            Request::Identity { auth } => (*auth, 0, None),
            _ => return Err(self.fail("consume of a non-consuming request")),
        };
        let Sent { card, expect, shard, response, bytes } =
            self.send_consuming(terminal, &request, &auth, "consume")?;
        let (status, balance, seq) = match &response {
            Response::Identity(r) => (r.status, card.balance, r.journal_seq),
            other => match card_result(other) {
                Some(r) => (r.status, r.balance.0, r.journal_seq),
                None => return Err(self.fail(format!("wrong answer type {other:?}"))),
            },
        };
        match expect {
            Some((Some(original), deep)) => {
                if bytes != original && !(deep && status == Status::Replay) {
                    return Err(self.fail(format!(
                        "a retry of the same bytes got another answer: {request:?} -> {response:?}"
                    )));
                }
                return Ok(());
            }
            Some((None, _)) => {
                if status != Status::Replay || seq != 0 || balance != card.balance {
                    return Err(self.fail(format!(
                        "a used or stale ATC was not declined Replay: {request:?} -> {response:?} \
                         (card last ATC {}, balance {})",
                        card.last_atc, card.balance
                    )));
                }
                return Ok(());
            }
            None => {}
        }
        let expected = match purchase {
            Some(p) => Model::money_status(&card, amount, p),
            None if card.retired() => Status::CardClosed,
            None if card.hotlisted() => Status::CardBlocked,
            None => Status::Approved,
        };
        let after = match (purchase, expected) {
            (Some(true), Status::Approved) => card.balance - amount,
            (Some(false), Status::Approved) => card.balance + amount,
            _ => card.balance,
        };
        if status != expected || balance != after || seq == 0 {
            return Err(self.fail(format!(
                "{request:?} on {:?} (balance {}, last ATC {}): expected {expected:?} balance \
                 {after}, got {response:?}",
                card.state, card.balance, card.last_atc
            )));
        }
        if let Response::Identity(r) = &response {
            if status == Status::Approved
                && (r.issued_ms != self.now_ms || r.expires_ms != self.now_ms + IDENTITY_TTL_MS)
            {
                return Err(self.fail(format!("identity assertion times wrong: {r:?}")));
            }
        }
        let id = auth.card_id;
        let mut changes = vec![Change::UseAtc(
            id,
            auth.atc.0,
            Use {
                terminal: terminal.to_string(),
                request: Some(request),
                offline: None,
                answer: bytes,
                ops_at: 0,
            },
        )];
        if status == Status::Approved && purchase == Some(true) {
            changes.push(Change::Purchased(
                id,
                auth.atc.0,
                Purchase {
                    terminal: terminal.to_string(),
                    cryptogram: auth.cryptogram,
                    amount,
                    time_ms: self.now_ms,
                    reversed: false,
                },
            ));
        }
        if status == Status::Approved && purchase.is_some() {
            changes.push(Change::Balance(id, after));
            changes.push(if purchase == Some(true) {
                Change::MoneyOut(amount)
            } else {
                Change::MoneyIn(amount)
            });
        }
        changes.push(Change::Op(id));
        self.record(shard, seq, changes);
        Ok(())
    }

    /// Balance or History: reads with any ATC, never journaled.
    fn read(&mut self, history: bool) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        let counter = self.counters.get(&id).copied().unwrap_or(0);
        let atc = self.rng.below(u64::from(counter) + 2) as u32;
        let nonce = self.rng.next_u64();
        let mt = if history { MessageType::History } else { MessageType::Balance };
        let auth = Self::auth(&card.key, id, mt, atc, 0, terminal, nonce);
        let request = if history {
            let limit = 1 + self.rng.below(20) as u16;
            Request::History { auth, before_seq: 0, limit }
        } else {
            Request::Balance { auth }
        };
        let (_, response, _) = self.send(terminal, &request)?;
        if !mac_ok(&card.key, &auth.cryptogram, &response) {
            return Err(self.fail(format!("read answer MAC does not verify: {response:?}")));
        }
        let ok = match &response {
            Response::Balance(r) if card.retired() => r.status == Status::CardClosed,
            Response::Balance(r) => {
                r.status == Status::Approved && r.balance.0 == card.balance && r.journal_seq == 0
            }
            Response::History(page) => {
                page.status == Status::Approved
                    && page.balance.0 == card.balance
                    && page.entries.len() <= usize::from(request_limit(&request))
                    && page.entries.windows(2).all(|w| w[0].journal_seq > w[1].journal_seq)
            }
            _ => false,
        };
        if !ok {
            return Err(self.fail(format!(
                "{request:?} on {:?} balance {}: got {response:?}",
                card.state, card.balance
            )));
        }
        Ok(())
    }

    fn identity(&mut self) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        let atc = self.next_atc(id);
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, MessageType::Identity, atc, 0, terminal, nonce);
        self.consume(terminal, Request::Identity { auth })
    }

    /// An offline batch from one reader: records of several cards, possibly on both shards,
    /// one of them now and then with a forged certificate.
    fn offline(&mut self) -> Result<(), Failure> {
        let terminal = POS[self.rng.index(3)];
        let n = 1 + self.rng.below(4) as usize;
        let mut records = Vec::new();
        let mut forged = Vec::new();
        for _ in 0..n {
            let Some((id, card)) = self.pick_card() else { return Ok(()) };
            let atc = self.next_atc(id);
            let amount = if self.rng.chance(50) { 0 } else { self.rng.range(1, 2_500) };
            let time_ms = self.now_ms - self.rng.below(86_400_000);
            let nonce = self.rng.next_u64();
            let mut certificate = card.key.offline_certificate(
                id,
                Atc(atc),
                Amount(amount),
                time_ms,
                nonce,
                terminal,
            );
            let forge = self.rng.chance(40);
            if forge {
                certificate.0[self.rng.index(16)] ^= 1 << self.rng.below(8);
            }
            forged.push(forge);
            records.push(OfflineRecord {
                card_id: id,
                atc: Atc(atc),
                amount: Amount(amount),
                time_ms,
                nonce,
                certificate,
            });
        }
        self.send_offline(terminal, &records, &forged, None)
    }

    /// Sends offline records, each to its card's shard, and checks each result; `original`
    /// is the answer of a retried record.
    fn send_offline(
        &mut self,
        terminal: &str,
        records: &[OfflineRecord],
        forged: &[bool],
        original: Option<Vec<u8>>,
    ) -> Result<(), Failure> {
        for (position, record) in records.iter().enumerate() {
            let shard = shard_of(record.card_id, SHARDS);
            let one = [(position as u16, *record)];
            let out = self.execute(shard, terminal, Op::Offline(&one))?;
            let Output::Offline(results) = out else {
                return Err(self.fail("an offline batch answered with another output"));
            };
            let Some((_, r)) = results.first().copied() else {
                return Err(self.fail("an offline record got no result"));
            };
            let bytes = encode(&Response::Balance(r));
            self.hash(terminal.as_bytes());
            self.hash(&bytes);
            let Some(card) = self.pending.cards.get(&record.card_id).cloned() else {
                return Err(self.fail("offline record of an unknown card"));
            };
            if let Some(original) = &original {
                if &bytes != original {
                    return Err(self
                        .fail(format!("an offline record sent again got another answer: {r:?}")));
                }
                continue;
            }
            if forged[position] {
                if r.status != Status::BadCryptogram
                    || r.journal_seq != 0
                    || r.mac != Mac::default()
                {
                    return Err(
                        self.fail(format!("a forged offline certificate was not refused: {r:?}"))
                    );
                }
                continue;
            }
            let amount = record.amount.0;
            let expected = if card.retired() {
                Status::CardClosed
            } else if amount <= 0 || amount > MAX_AMOUNT {
                Status::InvalidAmount
            } else {
                Status::Approved
            };
            let after =
                if expected == Status::Approved { card.balance - amount } else { card.balance };
            if r.status != expected || r.balance.0 != after || r.journal_seq == 0 {
                return Err(self.fail(format!(
                    "offline {record:?} on {:?} balance {}: expected {expected:?} {after}, got {r:?}",
                    card.state, card.balance
                )));
            }
            let id = record.card_id;
            let mut changes = vec![Change::UseAtc(
                id,
                record.atc.0,
                Use {
                    terminal: terminal.to_string(),
                    request: None,
                    offline: Some(*record),
                    answer: bytes,
                    ops_at: 0,
                },
            )];
            if expected == Status::Approved {
                changes.push(Change::Balance(id, after));
                changes.push(Change::MoneyOut(amount));
            }
            changes.push(Change::Op(id));
            self.record(shard, r.journal_seq, changes);
        }
        Ok(())
    }

    fn next_op_ref(&mut self, terminal: &str) -> u64 {
        let n = self.op_refs.entry(terminal.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    fn issue(&mut self) -> Result<(), Failure> {
        let terminal = COUNTERS[self.rng.index(2)];
        let op_ref = self.next_op_ref(terminal);
        let deposit = match self.rng.below(25) {
            0 => -self.rng.range(1, 10),
            1 => MAX_BALANCE + 1,
            _ => self.rng.range(0, 4_000),
        };
        let request = Request::Issue { op_ref, deposit: Amount(deposit) };
        let (shard, response, bytes) = self.send(terminal, &request)?;
        let Response::Issue(r) = response else {
            return Err(self.fail(format!("issue answered {response:?}")));
        };
        let valid = (0..=MAX_BALANCE).contains(&deposit);
        let staff = Change::Staff(
            (terminal.to_string(), op_ref),
            StaffUse { request, answer: bytes, shard },
        );
        if !valid {
            if r.status != Status::InvalidAmount || r.journal_seq == 0 {
                return Err(self.fail(format!("issue of deposit {deposit}: {r:?}")));
            }
            self.record(shard, r.journal_seq, vec![staff]);
            return Ok(());
        }
        let key = CardKey::from_bytes(r.card_key);
        let sealed = mac_ok(&key, &staff_binding(op_ref), &Response::Issue(r));
        if r.status != Status::Approved
            || r.balance.0 != deposit
            || self.pending.cards.contains_key(&r.card_id)
            || shard_of(r.card_id, SHARDS) != shard
            || !sealed
        {
            return Err(self.fail(format!("issue of deposit {deposit} on shard {shard}: {r:?}")));
        }
        let card = Card {
            shard,
            key,
            balance: deposit,
            state: State::Active,
            last_atc: 0,
            used: Default::default(),
            ops: 0,
            hold: None,
            purchases: Default::default(),
        };
        let changes = vec![
            Change::NewCard(r.card_id, card),
            Change::MoneyIn(deposit),
            staff,
            Change::Op(r.card_id),
        ];
        self.record(shard, r.journal_seq, changes);
        Ok(())
    }

    /// Block (0), unblock (1), close (2) or replace (3) a card, checked against 6.2's table.
    fn staff_op(&mut self, which: u8) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let terminal = COUNTERS[self.rng.index(2)];
        let op_ref = self.next_op_ref(terminal);
        let reasons = [BlockReason::Lost, BlockReason::Stolen, BlockReason::Damaged];
        let request = match which {
            0 => Request::Block { op_ref, card_id: id, reason: reasons[self.rng.index(3)] },
            1 => Request::Unblock { op_ref, card_id: id },
            2 => Request::Close { op_ref, card_id: id },
            _ => Request::Replace { op_ref, card_id: id },
        };
        // Close and Replace settle an open hold first (6.7), journaled just before them.
        let settle = card.settle_fare(self.now_ms, which >= 2);
        let (shard, response, bytes) = self.send(terminal, &request)?;
        let mut card = card;
        if let Some(fare) = settle {
            let seq = match &response {
                Response::Block(s) | Response::Unblock(s) | Response::Close(s) => s.journal_seq,
                Response::Replace(r) => r.journal_seq,
                _ => 0,
            };
            card.balance -= fare;
            card.hold = None;
            card.ops += 1;
            let changes = vec![
                Change::Balance(id, card.balance),
                Change::Hold(id, None),
                Change::MoneyOut(fare),
                Change::Op(id),
            ];
            self.record(shard, seq.saturating_sub(1), changes);
        }
        let blocked = card.state == State::Blocked;
        let debtor_not_blocked = card.balance < 0 && !blocked;
        let expected = if card.retired() {
            Status::CardClosed
        } else {
            match which {
                0 if blocked => Status::InvalidState,
                1 if !blocked => Status::InvalidState,
                2 | 3 if debtor_not_blocked => Status::InvalidState,
                _ => Status::Approved,
            }
        };
        let staff = Change::Staff(
            (terminal.to_string(), op_ref),
            StaffUse { request: request.clone(), answer: bytes, shard },
        );
        let binding = staff_binding(op_ref);
        let mut changes = vec![staff];
        let seq = match &response {
            Response::Block(s) | Response::Unblock(s) | Response::Close(s) => {
                let sealed = mac_ok(&card.key, &binding, &response);
                if s.status != expected || s.journal_seq == 0 || !sealed {
                    return Err(self.fail(format!(
                        "{request:?} on {:?} balance {}: expected {expected:?}, got {s:?}",
                        card.state, card.balance
                    )));
                }
                if expected == Status::Approved {
                    match which {
                        0 => changes.push(Change::State(id, State::Blocked)),
                        1 => changes.push(Change::State(id, State::Active)),
                        _ => {
                            let refund = card.balance.max(0);
                            if s.refunded.0 != refund || s.balance.0 != card.balance.min(0) {
                                return Err(self.fail(format!("close refund wrong: {s:?}")));
                            }
                            changes.push(Change::State(id, State::Closed));
                            changes.push(Change::Balance(id, card.balance.min(0)));
                            changes.push(Change::MoneyOut(refund));
                        }
                    }
                }
                s.journal_seq
            }
            Response::Replace(r) => {
                if r.status != expected || r.journal_seq == 0 {
                    return Err(self.fail(format!(
                        "{request:?} on {:?} balance {}: expected {expected:?}, got {r:?}",
                        card.state, card.balance
                    )));
                }
                if expected == Status::Approved {
                    let key = CardKey::from_bytes(r.card_key);
                    if r.balance.0 != card.balance.max(0)
                        || r.replaced_card_id != id
                        || shard_of(r.card_id, SHARDS) != shard
                        || !mac_ok(&key, &binding, &response)
                    {
                        return Err(self.fail(format!("replace answer wrong: {r:?}")));
                    }
                    changes.push(Change::State(id, State::Replaced));
                    changes.push(Change::Balance(id, card.balance.min(0)));
                    changes.push(Change::Op(r.card_id));
                    changes.insert(
                        0,
                        Change::NewCard(
                            r.card_id,
                            Card {
                                shard,
                                key,
                                balance: card.balance.max(0),
                                state: State::Active,
                                last_atc: 0,
                                used: Default::default(),
                                ops: 0,
                                hold: None,
                                purchases: Default::default(),
                            },
                        ),
                    );
                }
                r.journal_seq
            }
            other => return Err(self.fail(format!("staff operation answered {other:?}"))),
        };
        changes.push(Change::Op(id));
        self.record(shard, seq, changes);
        Ok(())
    }

    /// A retry of an answered request with the same bytes: the original answer, byte for byte.
    fn retry(&mut self) -> Result<(), Failure> {
        if self.rng.chance(300) && !self.pending.staff.is_empty() {
            let i = self.rng.index(self.pending.staff.len());
            let Some(((terminal, _), used)) =
                self.pending.staff.iter().nth(i).map(|(k, v)| (k.clone(), v.clone()))
            else {
                return Ok(());
            };
            let (_, _, bytes) = self.send(&terminal, &used.request)?;
            if bytes != used.answer {
                return Err(self.fail(format!(
                    "a retried staff operation got another answer: {:?}",
                    used.request
                )));
            }
            return Ok(());
        }
        let Some((_, card)) = self.pick_card() else { return Ok(()) };
        if card.used.is_empty() {
            return Ok(());
        }
        let i = self.rng.index(card.used.len());
        let Some(used) = card.used.values().nth(i).cloned() else { return Ok(()) };
        match (&used.request, &used.offline) {
            (Some(request), _) => self.consume(&used.terminal, request.clone()),
            (None, Some(record)) => {
                self.send_offline(&used.terminal, &[*record], &[false], Some(used.answer.clone()))
            }
            (None, None) => Ok(()),
        }
    }

    /// The retry of a request whose answer was lost with a failed batch or a crash.
    fn retry_lost(&mut self) -> Result<(), Failure> {
        if self.unanswered.is_empty() {
            return self.retry();
        }
        let i = self.rng.index(self.unanswered.len());
        let (terminal, request) = self.unanswered.swap_remove(i);
        match &request {
            Request::Purchase { auth, .. }
            | Request::TopUp { auth, .. }
            | Request::Identity { auth }
            | Request::TapIn { auth }
            | Request::TapOut { auth, .. }
            | Request::Reversal { auth, .. }
                if self.pending.cards.get(&auth.card_id).is_some_and(|c| {
                    // The card's issue was lost with the batch: its id now belongs to another.
                    auth.cryptogram
                        == Self::auth(
                            &c.key,
                            auth.card_id,
                            request.message_type(),
                            auth.atc.0,
                            request.cryptogram_amount().0,
                            &terminal,
                            auth.nonce,
                        )
                        .cryptogram
                }) =>
            {
                // The terminal asks what became of it (6.9), or sends it again; after an
                // inquiry it may still send the late copy, which must then be declined.
                if self.rng.chance(400) {
                    self.inquire(&terminal, &request)?;
                    if self.rng.chance(300) {
                        self.unanswered.push((terminal, request));
                    }
                    return Ok(());
                }
                self.consume(&terminal, request)
            }
            // Others were reads or staff operations; a staff retry is checked by `retry`.
            _ => Ok(()),
        }
    }

    /// A different request with an ATC the card already used: Replay.
    fn replay(&mut self) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let Some((&atc, _)) = card.used.iter().next_back() else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        let amount = self.rng.range(1, 100);
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, MessageType::Purchase, atc, amount, terminal, nonce);
        self.consume(terminal, Request::Purchase { auth, amount: Amount(amount) })
    }

    /// A purchase with a flipped cryptogram bit, or for a card that does not exist.
    fn forge(&mut self) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        let counter = self.counters.get(&id).copied().unwrap_or(0);
        let nonce = self.rng.next_u64();
        let mut auth =
            Self::auth(&card.key, id, MessageType::Purchase, counter + 1, 10, terminal, nonce);
        let unknown = self.rng.chance(200);
        if unknown {
            auth.card_id = CardId(id.0 + 1_000_000 * u64::from(SHARDS));
        } else {
            auth.cryptogram.0[self.rng.index(16)] ^= 1 << self.rng.below(8);
        }
        let (_, response, _) =
            self.send(terminal, &Request::Purchase { auth, amount: Amount(10) })?;
        let want = if unknown { Status::UnknownCard } else { Status::BadCryptogram };
        match card_result(&response) {
            Some(r)
                if r.status == want
                    && r.journal_seq == 0
                    && r.mac == Mac::default()
                    && r.balance.0 == 0 =>
            {
                Ok(())
            }
            _ => {
                Err(self.fail(format!("a forged purchase was not refused {want:?}: {response:?}")))
            }
        }
    }

    /// A used op_ref with another operation on the same card: ReferenceReused, not recorded.
    fn reuse_op_ref(&mut self) -> Result<(), Failure> {
        if self.pending.staff.is_empty() {
            return Ok(());
        }
        let i = self.rng.index(self.pending.staff.len());
        let Some(((terminal, op_ref), used)) =
            self.pending.staff.iter().nth(i).map(|(k, v)| (k.clone(), v.clone()))
        else {
            return Ok(());
        };
        let other = match used.request {
            Request::Issue { deposit, .. } => {
                Request::Issue { op_ref, deposit: Amount(deposit.0 + 1) }
            }
            Request::Block { card_id, .. } => Request::Unblock { op_ref, card_id },
            Request::Unblock { card_id, .. } | Request::Replace { card_id, .. } => {
                Request::Close { op_ref, card_id }
            }
            Request::Close { card_id, .. } => {
                Request::Block { op_ref, card_id, reason: BlockReason::Lost }
            }
            _ => return Ok(()),
        };
        let (_, response, _) = self.send(&terminal, &other)?;
        let status = match &response {
            Response::Issue(r) | Response::Replace(r) => (r.status, r.journal_seq),
            Response::Block(s) | Response::Unblock(s) | Response::Close(s) => {
                (s.status, s.journal_seq)
            }
            _ => (Status::Approved, 1),
        };
        if status != (Status::ReferenceReused, 0) {
            return Err(
                self.fail(format!("a reused op_ref was not declined: {other:?} -> {response:?}"))
            );
        }
        Ok(())
    }

    fn hotlist(&mut self) -> Result<(), Failure> {
        let shard = self.rng.below(u64::from(SHARDS)) as u16;
        let since = self.rng.below(8);
        let out = self.execute(shard, "monitor-1", Op::Hotlist { since, max: 64 })?;
        if let Output::Hotlist { version, entries, .. } = out {
            self.hash(&version.to_le_bytes());
            self.hash(&(entries.len() as u64).to_le_bytes());
        }
        Ok(())
    }
}

fn request_limit(request: &Request) -> u16 {
    match request {
        Request::History { limit, .. } => *limit,
        _ => 0,
    }
}
