//! Applying a journaled entry to the shard's memory: cards, hotlist version, overlay. Shared by
//! the live path and replay, so both produce the same state.

use citycard_protocol::{Amount, Atc, BlockReason, CardState, EntryKind, Status};

use super::decide::transit::Hold;
use super::entry::Entry;
use super::product::CardProduct;
use super::shard::Shard;
use super::state::CardRecord;
use super::types::PERSIST_MAX_RECORDS;
use super::StoreError;
use crate::journal::Pos;

impl Shard {
    pub(super) fn replay_record(
        &mut self,
        seq: u64,
        pos: Pos,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let entry = Entry::decode(payload).map_err(|source| StoreError::Entry { seq, source })?;
        // The same invariants as before it was appended (the hotlist version only has to grow:
        // old hotlist entries may have been compacted out of sled).
        entry
            .check()
            .and_then(|()| self.check_against_state(&entry, false))
            .map_err(|invariant| StoreError::Invariant { seq, invariant })?;
        self.apply(seq, pos, entry);
        self.cards.check()?;
        // Bound the replay batch so a long journal tail does not build one giant sled batch.
        if self.overlay.current().is_some_and(|c| c.entries.len() >= PERSIST_MAX_RECORDS) {
            self.seal()?;
            self.trim()?;
        }
        Ok(())
    }

    /// Applies a decided entry to memory and queues its sled writes. Shared by the live path
    /// and replay, so both produce the same state.
    pub(super) fn apply(&mut self, seq: u64, pos: Pos, entry: Entry) {
        let approved = entry.status == Status::Approved;
        match entry.kind {
            EntryKind::Issue if approved => {
                self.cards.put(
                    entry.card_id,
                    CardRecord {
                        state: CardState::Active,
                        block_reason: BlockReason::Other,
                        balance: entry.balance_after,
                        last_atc: Atc(0),
                        key_version: entry.key_version,
                        last_pos: pos,
                        hold: Hold::NONE,
                        product: entry.product.map_or(CardProduct::DEFAULT, |p| p.after),
                    },
                    seq,
                );
                self.next_card =
                    self.next_card.max(super::card_counter(entry.card_id, self.count) + 1);
            }
            EntryKind::ReplacedOut if approved => {
                let moved = entry.amount.0.saturating_neg();
                // Protocol 1.3: the new card has the old card's product and its deposit moved
                // (less what the operator kept, plus what the holder paid for the new card).
                let mut product = CardProduct::DEFAULT;
                if let Some(mut old) = self.cards.get(entry.card_id) {
                    if let Some(p) = entry.product {
                        let deposit = old.product.deposit.0 - p.deposit_kept + p.deposit_paid;
                        product = CardProduct { deposit: Amount(deposit), ..p.after };
                        old.product = p.after;
                    }
                    old.state = CardState::Replaced;
                    old.balance = entry.balance_after;
                    old.last_pos = pos;
                    self.cards.put(entry.card_id, old, seq);
                }
                self.cards.put(
                    entry.other_card,
                    CardRecord {
                        state: CardState::Active,
                        block_reason: BlockReason::Other,
                        balance: Amount(moved),
                        last_atc: Atc(0),
                        key_version: entry.key_version,
                        // The replacement's chain starts at the record that created it.
                        last_pos: pos,
                        hold: Hold::NONE,
                        product,
                    },
                    seq,
                );
                self.next_card =
                    self.next_card.max(super::card_counter(entry.other_card, self.count) + 1);
            }
            // A numbered record's refusal note touches no card (see `Numbered::note`).
            _ if entry.is_note() => {}
            _ => {
                if let Some(mut card) = self.cards.get(entry.card_id) {
                    card.last_pos = pos;
                    if entry.uses_atc() {
                        card.last_atc = card.last_atc.max(entry.atc);
                    }
                    if approved {
                        card.balance = entry.balance_after;
                        if let Some(p) = entry.product {
                            card.product = p.after;
                        }
                        match entry.kind {
                            EntryKind::Block => {
                                card.state = CardState::Blocked;
                                card.block_reason = block_reason_of(&entry, card.block_reason);
                            }
                            EntryKind::Unblock => card.state = CardState::Active,
                            EntryKind::Close => card.state = CardState::Closed,
                            EntryKind::TapIn | EntryKind::TapOut | EntryKind::HoldExpired => {
                                self.hold_index.change(
                                    entry.card_id,
                                    card.hold,
                                    entry.transit.hold,
                                );
                                card.hold = entry.transit.hold;
                            }
                            _ => {}
                        }
                    }
                    self.cards.put(entry.card_id, card, seq);
                }
            }
        }
        if entry.hotlist_version != 0 {
            self.hotlist_version = self.hotlist_version.max(entry.hotlist_version);
        }
        self.overlay.push(seq, pos, entry, self.now_ms);
    }

    /// The invariants between an entry and the state it applies to: an issued card is new,
    /// every other entry's card exists and its balance moves by exactly the entry's amount,
    /// and a hotlist change takes the next version (`strict`) or at least a later one.
    pub(super) fn check_against_state(
        &self,
        entry: &Entry,
        strict: bool,
    ) -> Result<(), &'static str> {
        let card = self.cards.get(entry.card_id);
        match (entry.kind, card) {
            // A refusal note moves nothing (`Entry::check`) and may name a card that does not
            // exist (that is one of the refusals it records).
            _ if entry.is_note() => {}
            (EntryKind::Issue, Some(_)) if entry.status == Status::Approved => {
                return Err("an issued card already exists")
            }
            (EntryKind::Issue, _) => {}
            (_, None) => return Err("the entry's card does not exist"),
            (_, Some(card)) => {
                if card.balance.0.checked_add(entry.amount.0) != Some(entry.balance_after.0) {
                    return Err("balance after is not balance before plus amount");
                }
            }
        }
        if entry.kind == EntryKind::ReplacedOut
            && entry.status == Status::Approved
            && self.cards.get(entry.other_card).is_some()
        {
            return Err("a replacement card already exists");
        }
        if let (Some(p), Status::Approved) = (entry.product, entry.status) {
            // Deposits move only by what the entry says changed hands (protocol 1.3).
            let before = card.map_or(0, |c| c.product.deposit.0);
            let ok = if entry.kind == EntryKind::ReplacedOut {
                p.after.deposit.0 == 0 && p.deposit_refunded == 0 && p.deposit_kept <= before
            } else {
                p.deposit_kept == 0
                    && before
                        .checked_add(p.deposit_paid)
                        .and_then(|d| d.checked_sub(p.deposit_refunded))
                        == Some(p.after.deposit.0)
            };
            if !ok {
                return Err("deposit after is not deposit before plus paid less refunded");
            }
        }
        let next = self.hotlist_version + 1;
        let version_ok = match entry.hotlist_version {
            0 => true,
            v if strict => v == next,
            v => v >= next,
        };
        if !version_ok {
            return Err("a hotlist change does not take the next hotlist version");
        }
        Ok(())
    }

    /// Checks a decided entry, links it into its card's chain, appends it to the journal (in
    /// memory until `commit`) and applies it. Returns its seq.
    pub(super) fn journal_entry(&mut self, mut entry: Entry) -> Result<u64, StoreError> {
        // Link the card's chain: the new record points at the card's previous one (a refusal
        // note stays off every chain).
        entry.prev_pos = match self.cards.get(entry.card_id) {
            Some(card) if !entry.is_note() => card.last_pos,
            _ => Pos::NONE,
        };
        if let Err(invariant) = entry.check().and_then(|()| self.check_against_state(&entry, true))
        {
            let seq = self.journal.as_ref().map_or(0, |j| j.next_seq());
            tracing::error!(seq, invariant, kind = ?entry.kind, "decided entry breaks an invariant; not journaled");
            return Err(StoreError::Invariant { seq, invariant });
        }
        entry.encode(&mut self.scratch);
        debug_assert_eq!(Entry::decode(&self.scratch).ok().as_ref(), Some(&entry));
        let scratch = std::mem::take(&mut self.scratch);
        let appended = self.journal().and_then(|j| Ok(j.append_at(&scratch)?));
        self.scratch = scratch;
        let (seq, pos) = appended?;
        self.apply(seq, pos, entry);
        Ok(seq)
    }
}

fn block_reason_of(entry: &Entry, current: BlockReason) -> BlockReason {
    u8::try_from(entry.extra).ok().and_then(BlockReason::from_u8).unwrap_or(current)
}
