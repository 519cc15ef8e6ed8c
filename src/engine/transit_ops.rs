//! The shard side of the protocol 1.2 operations: tap-in, tap-out, hold expiry (on touch and
//! by the worker's sweep), reversal, inquiry and funds. The rules are the pure functions of
//! `decide::transit`; this file gathers their facts (authentication, the ATC's use, the
//! card's chain), journals the outcome and builds the sealed answer.

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, Atc, CardAuth, CardId, EntryKind, FundsProductResult, InquiryResult, Mac, MessageType,
    Response, Status, TransitResult, ATC_LATE_WINDOW,
};

use super::answer::{card_result, seal, seal_card};
// An answer for a card that was not authenticated: zeros, zero MAC (the protocol crate's decline).
use super::decide::transit::{self, AtcFinding, Decision, InquiryOutcome, PurchaseFacts};
use super::decide::{self, AtcLookup, AtcUse};
use super::entry::Entry;
use super::product::ProductFields;
use super::shard::Shard;
use super::state::CardRecord;
use super::types::ATC_LOOKUP_DEPTH;
use super::StoreError;
use crate::journal::Pos;
use citycard_protocol::answer::decline_transit as unauthenticated;

/// The transit operations that consume an ATC and answer a TransitResult.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TransitOp {
    TapIn,
    TapOut { fare: Amount },
    Reversal { amount: Amount, original_atc: Atc, original_cryptogram: Mac },
}

impl TransitOp {
    fn message_type(self) -> MessageType {
        match self {
            TransitOp::TapIn => MessageType::TapIn,
            TransitOp::TapOut { .. } => MessageType::TapOut,
            TransitOp::Reversal { .. } => MessageType::Reversal,
        }
    }

    fn kind(self) -> EntryKind {
        match self {
            TransitOp::TapIn => EntryKind::TapIn,
            TransitOp::TapOut { .. } => EntryKind::TapOut,
            TransitOp::Reversal { .. } => EntryKind::Reversal,
        }
    }

    /// The amount the request cryptogram covers.
    fn amount(self) -> Amount {
        match self {
            TransitOp::TapIn => Amount(0),
            TransitOp::TapOut { fare } => fare,
            TransitOp::Reversal { amount, .. } => amount,
        }
    }

    fn wrap(self, result: TransitResult) -> Response {
        match self {
            TransitOp::TapIn => Response::TapIn(result),
            TransitOp::TapOut { .. } => Response::TapOut(result),
            TransitOp::Reversal { .. } => Response::Reversal(result),
        }
    }
}

impl Shard {
    /// Settles `card`'s hold at the missing tap-out fare when the engine's clock has passed
    /// its timeout, or at once when `force` (a Close or Replace of the card). Journaled like any
    /// operation; returns whether it settled one.
    pub(super) fn settle_hold(
        &mut self,
        card_id: CardId,
        now_ms: u64,
        force: bool,
    ) -> Result<bool, StoreError> {
        let Some(card) = self.cards.get(card_id) else {
            return Ok(false);
        };
        let Some(d) = transit::expire(&card, &self.limits.transit, now_ms, force) else {
            return Ok(false);
        };
        self.journal_transit(EntryKind::HoldExpired, &card, card_id, None, "", d, 0, now_ms)?;
        Ok(true)
    }

    /// Settles up to `max` holds whose timeout the clock `now_ms` has passed, oldest first.
    /// The worker calls it between batches (and commits); returns how many it settled.
    pub fn expire_holds(&mut self, now_ms: u64, max: usize) -> Result<usize, StoreError> {
        let mut settled = 0;
        for card in self.hold_index.due(now_ms, max) {
            if self.settle_hold(card, now_ms, false)? {
                settled += 1;
            }
        }
        Ok(settled)
    }

    /// How many cards have an open hold (metrics, tests).
    pub fn open_holds(&self) -> usize {
        self.hold_index.len()
    }

    /// TapIn, TapOut and Reversal: authenticate, exactly-once by (card, ATC), decide, journal.
    pub(super) fn transit_op(
        &mut self,
        terminal: &str,
        op: TransitOp,
        auth: &CardAuth,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (card, key) = match self.authenticate(terminal, op.message_type(), auth, op.amount()) {
            Ok(found) => found,
            Err(status) => return Ok(op.wrap(unauthenticated(status, auth))),
        };
        let result = match self.atc_use(&card, auth)? {
            AtcUse::Used(seq, e) if e.kind == op.kind() && e.binding == auth.cryptogram => {
                transit_result(&e, seq)
            }
            AtcUse::Used(..) | AtcUse::Stale => {
                tracing::warn!(card = %auth.card_id.masked(), terminal, atc = auth.atc.0, "replayed counter declined");
                current(Status::Replay, &card, auth)
            }
            AtcUse::Fresh => {
                let key_retired = self.context(terminal, now_ms).policy.key_retired(&card, now_ms);
                let mut limits = self.limits.transit;
                let product = self.limits.card_product(card.product.id);
                // Protocol 1.3: the hold is the card's product's maximum fare.
                limits.max_fare = product.max_fare;
                let (d, requested) = match op {
                    TransitOp::TapIn => {
                        let over_daily = decide::money::daily_limit(
                            &product,
                            card.product.daily,
                            now_ms,
                            product.max_fare,
                        );
                        let d = transit::tap_in(
                            &card,
                            key_retired,
                            &limits,
                            over_daily,
                            auth.atc,
                            now_ms,
                        );
                        (d, limits.max_fare)
                    }
                    TransitOp::TapOut { fare } => {
                        (transit::tap_out(&card, key_retired, fare), fare.0)
                    }
                    TransitOp::Reversal { amount, original_atc, original_cryptogram } => {
                        let purchase = self.purchase_facts(
                            terminal,
                            auth.card_id,
                            original_atc,
                            original_cryptogram,
                        )?;
                        let d = transit::reversal(
                            &card,
                            key_retired,
                            &limits,
                            original_atc,
                            amount,
                            purchase,
                            now_ms,
                        );
                        (d, amount.0)
                    }
                };
                let (seq, entry) = self.journal_transit(
                    op.kind(),
                    &card,
                    auth.card_id,
                    Some(auth),
                    terminal,
                    d,
                    requested,
                    now_ms,
                )?;
                transit_result(&entry, seq)
            }
        };
        let mut response = op.wrap(result);
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }

    /// Journals a transit decision on `card` and returns (seq, entry).
    #[allow(clippy::too_many_arguments)]
    fn journal_transit(
        &mut self,
        kind: EntryKind,
        card: &CardRecord,
        card_id: CardId,
        auth: Option<&CardAuth>,
        terminal: &str,
        d: Decision,
        requested: i64,
        now_ms: u64,
    ) -> Result<(u64, Entry), StoreError> {
        let approved = d.status == Status::Approved;
        let mut after = *card;
        if approved {
            after.balance = Amount(card.balance.0.saturating_add(d.delta));
            after.hold = d.transit.hold;
        }
        // Protocol 1.3: a card whose product has a daily limit counts a tap-in as a debit and
        // a tap-out's or expiry's fare as money spent (on the day it is charged).
        let mut product = None;
        let counted = matches!(kind, EntryKind::TapIn | EntryKind::TapOut | EntryKind::HoldExpired);
        if approved && counted && self.limits.card_product(card.product.id).has_daily_limit() {
            let mut daily = card.product.daily.today(now_ms);
            if kind == EntryKind::TapIn {
                daily.count = daily.count.saturating_add(1);
            } else {
                daily.amount = daily.amount.saturating_add(d.amount);
            }
            after.product.daily = daily;
            product = Some(ProductFields::state(after.product));
        }
        let (hotlist_version, hotlist_change) =
            decide::hotlist_change(self.hotlist_version, card.hotlisted(), &after);
        let entry = Entry {
            kind,
            status: d.status,
            card_id,
            atc: auth.map_or(Atc(0), |a| a.atc),
            amount: Amount(after.balance.0 - card.balance.0),
            balance_after: after.balance,
            time_ms: now_ms,
            reference: auth.map_or(0, |a| a.nonce),
            binding: auth.map_or(Mac::default(), |a| a.cryptogram),
            other_card: CardId(0),
            key_version: card.key_version,
            hotlist_version,
            hotlist_change,
            // Approved: what the answer reports (hold placed, fare, refund); a decline keeps
            // what was asked for, for the audit.
            extra: if approved { d.amount } else { requested },
            terminal: terminal.to_owned(),
            prev_pos: Pos::NONE,
            transit: d.transit,
            product,
            numbered: crate::engine::entry::Numbered::NONE,
        };
        let seq = self.journal_entry(entry.clone())?;
        Ok((seq, entry))
    }

    /// What the card's chain says about the purchase a reversal names: found only when the
    /// entry that used `original_atc` is an approved purchase by `terminal` whose cryptogram
    /// was `original_cryptogram`; `reversed` when an approved reversal of it came later.
    fn purchase_facts(
        &mut self,
        terminal: &str,
        card_id: CardId,
        original_atc: Atc,
        original_cryptogram: Mac,
    ) -> Result<Option<PurchaseFacts>, StoreError> {
        let mut reversed = false;
        let mut found = None;
        self.walk_card(card_id, ATC_LOOKUP_DEPTH, |_, e| {
            if e.card_id != card_id {
                return true;
            }
            if e.kind == EntryKind::Reversal
                && e.status == Status::Approved
                && e.transit.ref_atc == original_atc
            {
                reversed = true;
            }
            if e.uses_atc() && e.atc == original_atc {
                if e.kind == EntryKind::Purchase
                    && e.status == Status::Approved
                    && e.terminal == terminal
                    && e.binding == original_cryptogram
                {
                    found = Some((e.amount.0.saturating_neg(), e.time_ms));
                }
                return false;
            }
            true
        })?;
        Ok(found.map(|(charged, time_ms)| PurchaseFacts { charged, time_ms, reversed }))
    }

    /// Inquiry: the original answer to (card, ATC) of this terminal's request, or NotFound
    /// (the ATC burnt so a late copy is declined Replay), or Replay.
    pub(super) fn inquiry(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        original_type: MessageType,
        amount: Amount,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let answer = |status, answer: Option<Box<Response>>, journal_seq| {
            Response::Inquiry(InquiryResult {
                status,
                card_id: auth.card_id,
                atc: auth.atc,
                answer,
                journal_seq,
                mac: Mac::default(),
            })
        };
        let Some(kind) = transit::kind_of(original_type) else {
            // The decoder admits only inquirable types; nothing else is ever asked about.
            return Ok(answer(Status::NotPermitted, None, 0));
        };
        let (card, key) = match self.authenticate(terminal, original_type, auth, amount) {
            Ok(found) => found,
            Err(status) => return Ok(answer(status, None, 0)),
        };
        let mut used = None;
        let finding = if auth.atc > card.last_atc {
            AtcFinding::UnusedOpen
        } else {
            match self.atc_entry(auth.card_id, auth.atc, ATC_LOOKUP_DEPTH)? {
                AtcLookup::Used(seq, e) => {
                    let finding = AtcFinding::Used {
                        kind: e.kind,
                        same_binding: e.binding == auth.cryptogram,
                    };
                    used = Some((seq, e));
                    finding
                }
                AtcLookup::Unused
                    if auth.atc.0 != 0 && card.last_atc.0 - auth.atc.0 < ATC_LATE_WINDOW =>
                {
                    AtcFinding::UnusedOpen
                }
                AtcLookup::Unused => AtcFinding::UnusedClosed,
                AtcLookup::Unknown => AtcFinding::Unknown,
            }
        };
        let mut response = match (transit::inquiry(kind, finding), used) {
            (InquiryOutcome::Original, Some((seq, e))) => {
                let original =
                    self.original_answer(terminal, &key, auth, original_type, &e, seq, now_ms)?;
                answer(Status::Approved, Some(Box::new(original)), 0)
            }
            (InquiryOutcome::AlreadyBurnt, Some((seq, _))) => answer(Status::NotFound, None, seq),
            (InquiryOutcome::Burn, _) => {
                let entry = Entry {
                    kind: EntryKind::Inquiry,
                    status: Status::NotFound,
                    card_id: auth.card_id,
                    atc: auth.atc,
                    amount: Amount(0),
                    balance_after: card.balance,
                    time_ms: now_ms,
                    reference: auth.nonce,
                    binding: auth.cryptogram,
                    other_card: CardId(0),
                    key_version: card.key_version,
                    hotlist_version: 0,
                    hotlist_change: super::entry::HotlistChange::None,
                    // The type the burnt request would have had.
                    extra: i64::from(original_type as u8),
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                    transit: transit::Transit::NONE,
                    product: None,
                    numbered: crate::engine::entry::Numbered::NONE,
                };
                let seq = self.journal_entry(entry)?;
                answer(Status::NotFound, None, seq)
            }
            (InquiryOutcome::NotFound, _) => answer(Status::NotFound, None, 0),
            _ => answer(Status::Replay, None, 0),
        };
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }

    /// The answer the original request got, byte for byte: what a retry of it returns.
    #[allow(clippy::too_many_arguments)]
    fn original_answer(
        &mut self,
        terminal: &str,
        key: &CardKey,
        auth: &CardAuth,
        original_type: MessageType,
        e: &Entry,
        seq: u64,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let binding = auth.cryptogram;
        Ok(match original_type {
            MessageType::Purchase => {
                Response::Purchase(seal_card(key, original_type, &binding, card_result(e, seq)))
            }
            MessageType::TopUp => {
                Response::TopUp(seal_card(key, original_type, &binding, card_result(e, seq)))
            }
            // The identity answer carries a signature over the journaled fields: its retry
            // path rebuilds it exactly.
            MessageType::Identity => self.identity(terminal, auth, now_ms)?,
            other => {
                let mut r = match other {
                    MessageType::TapIn => Response::TapIn(transit_result(e, seq)),
                    MessageType::TapOut => Response::TapOut(transit_result(e, seq)),
                    _ => Response::Reversal(transit_result(e, seq)),
                };
                seal(key, &binding, &mut r);
                r
            }
        })
    }

    /// Funds: balance, the open hold and the spendable balance (a read: not journaled).
    pub(super) fn funds(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
    ) -> Result<Response, StoreError> {
        let (card, key) = match self.authenticate(terminal, MessageType::Funds, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => return Ok(Response::Funds(unauthenticated(status, auth))),
        };
        let status = if card.retired() { Status::CardClosed } else { Status::Approved };
        let mut result = current(status, &card, auth);
        result.ref_atc = card.hold.atc;
        let mut response = Response::Funds(result);
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }
}

impl Shard {
    /// Protocol 1.3: Funds with the card's product, deposit and today's counters (a read:
    /// nothing journaled, the ATC not used).
    pub(super) fn funds_product(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let declined = |funds| FundsProductResult {
            funds,
            product: 0,
            deposit: Amount(0),
            spent_today: Amount(0),
            debits_today: 0,
        };
        let (card, key) = match self.authenticate(terminal, MessageType::Funds, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => {
                return Ok(Response::FundsProduct(declined(unauthenticated(status, auth))))
            }
        };
        let status = if card.retired() { Status::CardClosed } else { Status::Approved };
        let mut funds = current(status, &card, auth);
        funds.ref_atc = card.hold.atc;
        let today = card.product.daily.today(now_ms);
        let mut response = Response::FundsProduct(FundsProductResult {
            funds,
            product: card.product.id,
            deposit: card.product.deposit,
            spent_today: Amount(today.amount),
            debits_today: today.count,
        });
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }
}

/// An answer from the card's current record (Replay, Funds): nothing journaled.
fn current(status: Status, card: &CardRecord, auth: &CardAuth) -> TransitResult {
    let open = card.hold.is_open();
    TransitResult {
        balance: card.balance,
        held: Amount(if open { card.hold.amount.0 } else { 0 }),
        spendable: Amount(transit::spendable(card)),
        time_ms: if open { card.hold.expires_ms } else { 0 },
        ..unauthenticated(status, auth)
    }
}

/// The answer a journaled transit entry gave (and gives again to a retry or an inquiry).
pub(super) fn transit_result(e: &Entry, seq: u64) -> TransitResult {
    let hold = e.transit.hold;
    let held = if hold.is_open() { hold.amount.0 } else { 0 };
    TransitResult {
        status: e.status,
        card_id: e.card_id,
        atc: e.atc,
        balance: e.balance_after,
        amount: Amount(if e.status == Status::Approved { e.extra } else { 0 }),
        held: Amount(held),
        spendable: Amount(e.balance_after.0.saturating_sub(held)),
        ref_atc: e.transit.ref_atc,
        time_ms: if hold.is_open() { hold.expires_ms } else { 0 },
        journal_seq: seq,
        mac: Mac::default(),
    }
}
