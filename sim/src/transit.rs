//! The protocol 1.2 terminals: tap-in and tap-out gates, Funds, reversals of a reader's own
//! purchases (again, late, with a wrong amount, from another reader) and inquiries about lost
//! answers and never-sent ATCs (which burn the ATC); each answer checked against the ledger's
//! holds, purchases and burnt ATCs (PROTOCOL.md 6.7-6.10).

use citycard_protocol::{Amount, Atc, MessageType, Request, Response, Status, TransitResult};

use crate::effect::Change;
use crate::model::{
    Card, Hold, Use, HOLD_TIMEOUT_MS, LATE_WINDOW, MAX_FARE, REVERSAL_WINDOW_MS, WALK_DEPTH,
};
use crate::traffic::{encode, mac_ok, Sent, POS};
use crate::world::World;
use crate::Failure;

/// What a fresh transit request must get: status, balance after, hold after, `amount`,
/// `ref_atc`.
struct Expect {
    status: Status,
    balance: i64,
    hold: Option<Hold>,
    amount: i64,
    ref_atc: u32,
}

fn decline(card: &Card, status: Status, ref_atc: u32) -> Expect {
    Expect { status, balance: card.balance, hold: card.hold, amount: 0, ref_atc }
}

fn transit_of(response: &Response) -> Option<TransitResult> {
    match response {
        Response::TapIn(t) | Response::TapOut(t) | Response::Reversal(t) | Response::Funds(t) => {
            Some(*t)
        }
        _ => None,
    }
}

/// Whether `t` shows `balance` and `hold` as the answer fields do.
fn shows(t: &TransitResult, balance: i64, hold: Option<Hold>) -> bool {
    let held = hold.map_or(0, |h| h.amount);
    t.balance.0 == balance
        && t.held.0 == held
        && t.spendable.0 == balance - held
        && t.time_ms == hold.map_or(0, |h| h.expires_ms)
}

impl World {
    fn pick_held_card(&mut self) -> Option<(citycard_protocol::CardId, Card)> {
        let held: Vec<_> = self.pending.cards.iter().filter(|(_, c)| c.hold.is_some()).collect();
        if held.is_empty() || self.rng.chance(100) {
            return self.pick_card();
        }
        let i = self.rng.index(held.len());
        held.get(i).map(|(id, c)| (**id, (*c).clone()))
    }

    pub(crate) fn tap_in(&mut self) -> Result<(), Failure> {
        // Now and then a card already riding (HoldExists).
        let picked = if self.rng.chance(250) { self.pick_held_card() } else { self.pick_card() };
        let Some((id, card)) = picked else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        let atc = self.next_atc(id);
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, MessageType::TapIn, atc, 0, terminal, nonce);
        self.consume(terminal, Request::TapIn { auth })
    }

    pub(crate) fn tap_out(&mut self) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_held_card() else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        let hold = card.hold.map_or(MAX_FARE, |h| h.amount);
        let fare = match self.rng.below(12) {
            0 => hold + self.rng.range(1, 50),
            1 => -self.rng.range(1, 10),
            2 => hold,
            3 => 0,
            _ => self.rng.range(0, hold.max(1)),
        };
        let atc = self.next_atc(id);
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, MessageType::TapOut, atc, fare, terminal, nonce);
        self.consume(terminal, Request::TapOut { auth, fare: Amount(fare) })
    }

    /// A reversal of one of the card's approved purchases, by its reader (now and then by
    /// another one, or of another amount).
    pub(crate) fn reversal(&mut self) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        if card.purchases.is_empty() {
            return self.money(true);
        }
        // Mostly the newest purchase (a gate that did not open reverses at once).
        let n = card.purchases.len();
        let i = if self.rng.chance(700) { n - 1 } else { self.rng.index(n) };
        let Some((&original, p)) = card.purchases.iter().nth(i) else { return Ok(()) };
        let mut terminal = p.terminal.as_str();
        if self.rng.chance(100) {
            terminal = POS[self.rng.index(3)];
        }
        let terminal = terminal.to_string();
        let amount = if self.rng.chance(80) { p.amount - 1 } else { p.amount };
        let original_cryptogram = p.cryptogram;
        let atc = self.next_atc(id);
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, MessageType::Reversal, atc, amount, &terminal, nonce);
        let request = Request::Reversal {
            auth,
            amount: Amount(amount),
            original_atc: Atc(original),
            original_cryptogram,
        };
        self.consume(&terminal, request)
    }

    /// Funds: a read with any ATC, nothing journaled.
    pub(crate) fn funds(&mut self) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        let counter = self.counters.get(&id).copied().unwrap_or(0);
        let atc = self.rng.below(u64::from(counter) + 2) as u32;
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, MessageType::Funds, atc, 0, terminal, nonce);
        let (_, response, _) = self.send(terminal, &Request::Funds { auth })?;
        let want = if card.retired() { Status::CardClosed } else { Status::Approved };
        let ok = mac_ok(&card.key, &auth.cryptogram, &response)
            && transit_of(&response).is_some_and(|t| {
                matches!(response, Response::Funds(_))
                    && t.status == want
                    && shows(&t, card.balance, card.hold)
                    && t.ref_atc.0 == card.hold.map_or(0, |h| h.atc)
                    && t.amount.0 == 0
                    && t.journal_seq == 0
            });
        if !ok {
            return Err(self.fail(format!(
                "Funds on {:?} balance {} hold {:?}: got {response:?}",
                card.state, card.balance, card.hold
            )));
        }
        Ok(())
    }

    /// An inquiry about an ATC the card produced but the terminal never sent: the ATC is
    /// burnt, and the late copy (kept as a lost request) must later be declined Replay.
    pub(crate) fn inquire_unsent(&mut self) -> Result<(), Failure> {
        let Some((id, card)) = self.pick_card() else { return Ok(()) };
        let terminal = POS[self.rng.index(3)];
        // Now and then ATC 0, which nothing can use: NotFound with nothing burnt.
        let atc = if self.rng.chance(100) { 0 } else { self.next_atc(id) };
        let amount = self.rng.range(1, 500);
        let nonce = self.rng.next_u64();
        let auth = Self::auth(&card.key, id, MessageType::Purchase, atc, amount, terminal, nonce);
        let original = Request::Purchase { auth, amount: Amount(amount) };
        self.inquire(terminal, &original)?;
        self.unanswered.push((terminal.to_string(), original));
        Ok(())
    }

    /// The Inquiry about `original`, a consuming request of `terminal`.
    pub(crate) fn inquire(&mut self, terminal: &str, original: &Request) -> Result<(), Failure> {
        let Some(auth) = original.card_auth() else { return Ok(()) };
        let request = Request::Inquiry {
            auth: *auth,
            original_type: original.message_type(),
            amount: original.cryptogram_amount(),
        };
        self.ask(terminal, request)
    }

    /// Sends an Inquiry and checks it by the table of 6.9.
    pub(crate) fn ask(&mut self, terminal: &str, request: Request) -> Result<(), Failure> {
        let Request::Inquiry { auth, original_type, .. } = &request else {
            return Err(self.fail("ask with a non-inquiry"));
        };
        let (auth, original_type) = (*auth, *original_type);
        let Some(card) = self.pending.cards.get(&auth.card_id).cloned() else {
            return Err(self.fail("inquiry for an unknown card"));
        };
        let atc = auth.atc.0;
        let (shard, response, bytes) = self.send(terminal, &request)?;
        let Response::Inquiry(r) = &response else {
            return Err(self.fail(format!("inquiry answered {response:?}")));
        };
        if !mac_ok(&card.key, &auth.cryptogram, &response) {
            return Err(self.fail(format!("inquiry answer MAC does not verify: {response:?}")));
        }
        let bad = |w: &World, what: &str| {
            Err(w.fail(format!(
                "{request:?} (card last ATC {}): expected {what}, got {response:?}",
                card.last_atc
            )))
        };
        if let Some(u) = card.used.get(&atc) {
            let deep = card.ops - u.ops_at >= WALK_DEPTH;
            if deep && r.status == Status::Replay {
                return Ok(());
            }
            let same = |q: &Request| q.card_auth().map(|a| a.cryptogram) == Some(auth.cryptogram);
            match &u.request {
                Some(q) if q.message_type() == original_type && same(q) => {
                    let embedded = r.answer.as_deref().map(encode);
                    if r.status != Status::Approved
                        || r.journal_seq != 0
                        || embedded.as_ref() != Some(&u.answer)
                    {
                        return bad(self, "Approved with the original answer byte for byte");
                    }
                }
                Some(q @ Request::Inquiry { .. }) if same(q) => {
                    if bytes != u.answer {
                        return bad(self, "the burn's NotFound again, byte for byte");
                    }
                }
                _ => {
                    if r.status != Status::Replay || r.journal_seq != 0 {
                        return bad(self, "Replay (the ATC was used by another request)");
                    }
                }
            }
            return Ok(());
        }
        let open = atc != 0 && (atc > card.last_atc || card.last_atc - atc < LATE_WINDOW);
        if !open {
            if r.status != Status::NotFound || r.journal_seq != 0 || r.answer.is_some() {
                return bad(self, "NotFound, nothing burnt");
            }
            return Ok(());
        }
        if r.status != Status::NotFound || r.journal_seq == 0 || r.answer.is_some() {
            return bad(self, "NotFound with the ATC burnt");
        }
        let id = auth.card_id;
        let burn = Use {
            terminal: terminal.to_string(),
            request: Some(request.clone()),
            offline: None,
            answer: bytes,
            ops_at: 0,
        };
        let seq = r.journal_seq;
        self.record(shard, seq, vec![Change::UseAtc(id, atc, burn), Change::Op(id)]);
        Ok(())
    }

    /// TapIn, TapOut and Reversal: the ATC rule of 6.1, then 6.7's and 6.8's tables.
    pub(crate) fn transit(&mut self, terminal: &str, request: Request) -> Result<(), Failure> {
        let Some(&auth) = request.card_auth() else { return Err(self.fail("no card auth")) };
        let Sent { card, expect, shard, response, bytes } =
            self.send_consuming(terminal, &request, &auth, "transit request")?;
        let Some(t) = transit_of(&response) else {
            return Err(self.fail(format!("wrong answer type {response:?}")));
        };
        match expect {
            Some((Some(original), deep)) => {
                if bytes != original && !(deep && t.status == Status::Replay) {
                    return Err(self.fail(format!(
                        "a retry of the same bytes got another answer: {request:?} -> {response:?}"
                    )));
                }
                return Ok(());
            }
            Some((None, _)) => {
                if t.status != Status::Replay
                    || t.journal_seq != 0
                    || !shows(&t, card.balance, card.hold)
                {
                    return Err(self.fail(format!(
                        "a used or stale ATC was not declined Replay: {request:?} -> {response:?}"
                    )));
                }
                return Ok(());
            }
            None => {}
        }
        let now = self.now_ms;
        let hold_atc = card.hold.map_or(0, |h| h.atc);
        // A reversal's purchase out of the engine's lookup depth may be NotFound.
        let mut deep_purchase = false;
        let e = match &request {
            Request::TapIn { .. } if card.retired() => decline(&card, Status::CardClosed, hold_atc),
            Request::TapIn { .. } if card.hotlisted() => {
                decline(&card, Status::CardBlocked, hold_atc)
            }
            Request::TapIn { .. } if card.hold.is_some() => {
                decline(&card, Status::HoldExists, hold_atc)
            }
            Request::TapIn { .. } if card.spendable() < MAX_FARE => {
                decline(&card, Status::InsufficientFunds, hold_atc)
            }
            Request::TapIn { .. } => Expect {
                status: Status::Approved,
                balance: card.balance,
                hold: Some(Hold {
                    atc: auth.atc.0,
                    amount: MAX_FARE,
                    expires_ms: now + HOLD_TIMEOUT_MS,
                }),
                amount: MAX_FARE,
                ref_atc: auth.atc.0,
            },
            Request::TapOut { fare, .. } => match card.hold {
                _ if card.retired() => decline(&card, Status::CardClosed, 0),
                None => decline(&card, Status::NoOpenHold, 0),
                Some(h) if fare.0 < 0 || fare.0 > h.amount => {
                    decline(&card, Status::InvalidAmount, h.atc)
                }
                Some(h) => Expect {
                    status: Status::Approved,
                    balance: card.balance - fare.0,
                    hold: None,
                    amount: fare.0,
                    ref_atc: h.atc,
                },
            },
            Request::Reversal { amount, original_atc, original_cryptogram, .. } => {
                let found = card
                    .purchases
                    .get(&original_atc.0)
                    .filter(|p| p.terminal == terminal && p.cryptogram == *original_cryptogram);
                deep_purchase = card
                    .used
                    .get(&original_atc.0)
                    .is_some_and(|u| card.ops - u.ops_at >= WALK_DEPTH);
                match found {
                    _ if card.retired() => decline(&card, Status::CardClosed, 0),
                    None => decline(&card, Status::NotFound, 0),
                    Some(p) if p.reversed => decline(&card, Status::AlreadyReversed, 0),
                    Some(p) if now.saturating_sub(p.time_ms) > REVERSAL_WINDOW_MS => {
                        decline(&card, Status::ReversalWindowClosed, 0)
                    }
                    Some(p) if amount.0 != p.amount => decline(&card, Status::InvalidAmount, 0),
                    Some(_) => Expect {
                        status: Status::Approved,
                        balance: card.balance + amount.0,
                        hold: card.hold,
                        amount: amount.0,
                        ref_atc: original_atc.0,
                    },
                }
            }
            _ => return Err(self.fail("transit of a non-transit request")),
        };
        let matches = t.status == e.status
            && shows(&t, e.balance, e.hold)
            && t.amount.0 == e.amount
            && t.ref_atc.0 == e.ref_atc
            && t.journal_seq != 0;
        let deep_ok = deep_purchase && t.status == Status::NotFound && t.journal_seq != 0;
        if !matches && !deep_ok {
            return Err(self.fail(format!(
                "{request:?} on {:?} (balance {}, hold {:?}, last ATC {}): expected {:?} balance \
                 {} hold {:?} amount {} ref {}, got {response:?}",
                card.state,
                card.balance,
                card.hold,
                card.last_atc,
                e.status,
                e.balance,
                e.hold,
                e.amount,
                e.ref_atc
            )));
        }
        let id = auth.card_id;
        let used = Use {
            terminal: terminal.to_string(),
            request: Some(request.clone()),
            offline: None,
            answer: bytes,
            ops_at: 0,
        };
        let mut changes = vec![Change::UseAtc(id, auth.atc.0, used)];
        if t.status == Status::Approved {
            changes.push(Change::Balance(id, e.balance));
            changes.push(Change::Hold(id, e.hold));
            match &request {
                Request::TapOut { fare, .. } => changes.push(Change::MoneyOut(fare.0)),
                Request::Reversal { amount, original_atc, .. } => {
                    changes.push(Change::MoneyOut(-amount.0));
                    changes.push(Change::Reversed(id, original_atc.0));
                }
                _ => {}
            }
        }
        changes.push(Change::Op(id));
        self.record(shard, t.journal_seq, changes);
        Ok(())
    }
}
