//! Staff operations (counter terminals): issue, replace, block, unblock, close.

use citycard_protocol::crypto::staff_binding;
use citycard_protocol::{
    Amount, Atc, BlockReason, CardId, CardState, EntryKind, IssueResult, Mac, Response, Status,
};

use super::answer::{declined_issue, declined_staff, seal, state_binding, wrap_staff};
use super::decide::transit::Transit;
use super::entry::{Entry, HotlistChange};
use super::shard::Shard;
use super::StoreError;
use crate::journal::Pos;

impl Shard {
    /// The original answer to a retried staff operation, or ReferenceReused.
    pub(super) fn staff_retry(
        &mut self,
        terminal: &str,
        op_ref: u64,
        kind: EntryKind,
        card: CardId,
        extra: Option<i64>,
    ) -> Result<Option<(u64, Entry)>, StoreError> {
        Ok(self.op_entry(terminal, op_ref)?.map(|(seq, e)| {
            let same_card = kind == EntryKind::Issue || e.card_id == card;
            if e.kind == kind && same_card && extra.is_none_or(|x| x == e.extra) {
                (seq, e)
            } else {
                let mut reused = e;
                reused.status = Status::ReferenceReused;
                (0, reused)
            }
        }))
    }

    pub(super) fn issue(
        &mut self,
        terminal: &str,
        op_ref: u64,
        deposit: Amount,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (seq, entry) = match self.staff_retry(
            terminal,
            op_ref,
            EntryKind::Issue,
            CardId(0),
            Some(deposit.0),
        )? {
            Some(found) => found,
            None => {
                let status = if deposit.0 < 0 || deposit.0 > self.limits.max_balance {
                    Status::InvalidAmount
                } else {
                    Status::Approved
                };
                let card_id = if status == Status::Approved {
                    super::card_id_for(self.index, self.count, self.next_card)
                } else {
                    CardId(0)
                };
                let entry = Entry {
                    kind: EntryKind::Issue,
                    status,
                    card_id,
                    atc: Atc(0),
                    amount: if status == Status::Approved { deposit } else { Amount(0) },
                    balance_after: if status == Status::Approved { deposit } else { Amount(0) },
                    time_ms: now_ms,
                    reference: op_ref,
                    binding: Mac::default(),
                    other_card: CardId(0),
                    key_version: self.secrets.current_version,
                    hotlist_version: 0,
                    hotlist_change: HotlistChange::None,
                    extra: deposit.0,
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                    transit: Transit::NONE,
                };
                (self.journal_entry(entry.clone())?, entry)
            }
        };
        Ok(Response::Issue(self.issue_result(
            &entry,
            seq,
            entry.card_id,
            CardId(0),
            Amount(entry.balance_after.0),
        )))
    }

    pub(super) fn issue_result(
        &mut self,
        entry: &Entry,
        seq: u64,
        new_card: CardId,
        old_card: CardId,
        balance: Amount,
    ) -> IssueResult {
        let mut result = IssueResult {
            status: entry.status,
            card_id: new_card,
            key_version: entry.key_version,
            card_key: [0u8; 32],
            balance,
            replaced_card_id: old_card,
            journal_seq: seq,
            mac: Mac::default(),
        };
        if entry.status != Status::Approved {
            result.card_id =
                if entry.status == Status::ReferenceReused { CardId(0) } else { new_card };
            result.balance = Amount(0);
            return result;
        }
        let Some(key) = self.card_key(new_card, entry.key_version) else {
            return result;
        };
        result.card_key = *key.bytes();
        let mut response =
            if old_card.0 == 0 { Response::Issue(result) } else { Response::Replace(result) };
        seal(&key, &staff_binding(entry.reference), &mut response);
        match response {
            Response::Issue(r) | Response::Replace(r) => r,
            _ => result,
        }
    }

    pub(super) fn replace(
        &mut self,
        terminal: &str,
        op_ref: u64,
        old: CardId,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (seq, entry) =
            match self.staff_retry(terminal, op_ref, EntryKind::ReplacedOut, old, None)? {
                Some(found) => found,
                None => {
                    let Some(card) = self.cards.get(old) else {
                        return Ok(Response::Replace(declined_issue(Status::UnknownCard, old)));
                    };
                    let status = if card.retired() {
                        Status::CardClosed
                    } else if card.balance.0 < 0 && card.state != CardState::Blocked {
                        // An overdrawn card that is not blocked can still be topped up: its
                        // debt is settled that way before it moves. A blocked debtor (stolen,
                        // then overdrawn offline) cannot be topped up, so it is replaced with
                        // its debt left on the old card (below).
                        Status::InvalidState
                    } else {
                        Status::Approved
                    };
                    let new_card = if status == Status::Approved {
                        super::card_id_for(self.index, self.count, self.next_card)
                    } else {
                        CardId(0)
                    };
                    let mut after = card;
                    if status == Status::Approved {
                        after.state = CardState::Replaced;
                        // A positive balance moves to the new card; a debt stays recorded on
                        // the retired card, and the new card starts at 0.
                        after.balance = Amount(card.balance.0.min(0));
                    }
                    let (hotlist_version, hotlist_change) =
                        self.next_hotlist(card.hotlisted(), &after);
                    let entry = Entry {
                        kind: EntryKind::ReplacedOut,
                        status,
                        card_id: old,
                        atc: Atc(0),
                        amount: Amount(after.balance.0 - card.balance.0),
                        balance_after: after.balance,
                        time_ms: now_ms,
                        reference: op_ref,
                        binding: Mac::default(),
                        other_card: new_card,
                        key_version: self.secrets.current_version,
                        hotlist_version,
                        hotlist_change,
                        extra: 0,
                        terminal: terminal.to_owned(),
                        prev_pos: Pos::NONE,
                        transit: Transit::NONE,
                    };
                    (self.journal_entry(entry.clone())?, entry)
                }
            };
        let moved = Amount(entry.amount.0.saturating_neg());
        Ok(Response::Replace(self.issue_result(&entry, seq, entry.other_card, old, moved)))
    }

    pub(super) fn staff(
        &mut self,
        terminal: &str,
        kind: EntryKind,
        op_ref: u64,
        card_id: CardId,
        reason: Option<BlockReason>,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        // The answer is sealed under the card's key. Without it (its issuer key version was
        // removed from issuer.key) nothing is decided or recorded: a zero MAC on an approval
        // would be indistinguishable from a forgery (found by a client written from the spec).
        if let Some(card) = self.cards.get(card_id) {
            if self.card_key(card_id, card.key_version).is_none() {
                tracing::error!(card = %card_id.masked(), key_version = card.key_version.0, "no issuer key for the card's key version; staff operation declined");
                return Ok(wrap_staff(kind, declined_staff(Status::KeyVersionRetired, card_id)));
            }
        }
        let (seq, entry) = match self.staff_retry(
            terminal,
            op_ref,
            kind,
            card_id,
            reason.map(|r| i64::from(r as u8)),
        )? {
            Some(found) => found,
            None => {
                let Some(card) = self.cards.get(card_id) else {
                    return Ok(wrap_staff(kind, declined_staff(Status::UnknownCard, card_id)));
                };
                let retired = card.retired();
                let mut after = card;
                let status = match kind {
                    _ if retired => Status::CardClosed,
                    EntryKind::Block if card.state == CardState::Blocked => Status::InvalidState,
                    EntryKind::Block => {
                        after.state = CardState::Blocked;
                        after.block_reason = reason.unwrap_or(BlockReason::Other);
                        Status::Approved
                    }
                    EntryKind::Unblock if card.state != CardState::Blocked => Status::InvalidState,
                    EntryKind::Unblock => {
                        after.state = CardState::Active;
                        Status::Approved
                    }
                    // A negative balance cannot be refunded. An overdrawn card that is not
                    // blocked is topped up first; a blocked one cannot be, so it closes with
                    // its debt kept on the closed card and nothing refunded.
                    _ if card.balance.0 < 0 && card.state != CardState::Blocked => {
                        Status::InvalidState
                    }
                    _ => {
                        after.state = CardState::Closed;
                        after.balance = Amount(card.balance.0.min(0));
                        Status::Approved
                    }
                };
                let (hotlist_version, hotlist_change) = self.next_hotlist(card.hotlisted(), &after);
                let refunded = if kind == EntryKind::Close && status == Status::Approved {
                    card.balance.0.max(0)
                } else {
                    0
                };
                let entry = Entry {
                    kind,
                    status,
                    card_id,
                    atc: Atc(0),
                    amount: Amount(after.balance.0 - card.balance.0),
                    balance_after: after.balance,
                    time_ms: now_ms,
                    reference: op_ref,
                    // The card's state when this was decided, so a retried decline repeats it.
                    binding: state_binding(card.reported_state()),
                    other_card: CardId(0),
                    key_version: card.key_version,
                    hotlist_version,
                    hotlist_change,
                    // Block: the reason; close: the refund.
                    extra: if kind == EntryKind::Block {
                        i64::from(reason.unwrap_or(BlockReason::Other) as u8)
                    } else {
                        refunded
                    },
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                    transit: Transit::NONE,
                };
                (self.journal_entry(entry.clone())?, entry)
            }
        };
        let card = self.cards.get(card_id);
        let mut result = declined_staff(entry.status, card_id);
        if entry.status == Status::ReferenceReused {
            return Ok(wrap_staff(kind, result));
        }
        result.journal_seq = seq;
        result.balance = entry.balance_after;
        result.hotlist_version = entry.hotlist_version;
        result.refunded = if kind == EntryKind::Close { Amount(entry.extra) } else { Amount(0) };
        result.card_state = match (entry.status, kind) {
            (Status::Approved, EntryKind::Block) => CardState::Blocked,
            (Status::Approved, EntryKind::Close) => CardState::Closed,
            (Status::Approved, _) if entry.balance_after.0 < 0 => CardState::Overdrawn,
            (Status::Approved, _) => CardState::Active,
            _ => CardState::from_u8(entry.binding.0[0]).unwrap_or(CardState::Active),
        };
        let mut response = wrap_staff(kind, result);
        if let Some(card) = card {
            if let Some(key) = self.card_key(card_id, card.key_version) {
                seal(&key, &staff_binding(op_ref), &mut response);
            }
        }
        Ok(response)
    }
}
