//! Applying a journaled entry to the shard's memory: cards, hotlist version, overlay. Shared by
//! the live path and replay, so both produce the same state.

use citycard_protocol::{Amount, Atc, BlockReason, CardId, CardState, EntryKind, Status};

use super::entry::Entry;
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
        self.apply(seq, pos, entry);
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
                        issued_ms: entry.time_ms,
                        linked_card: CardId(0),
                        last_pos: pos,
                    },
                );
                self.next_card =
                    self.next_card.max(super::card_counter(entry.card_id, self.count) + 1);
            }
            EntryKind::ReplacedOut if approved => {
                let moved = entry.amount.0.saturating_neg();
                if let Some(mut old) = self.cards.get(entry.card_id) {
                    old.state = CardState::Replaced;
                    old.balance = entry.balance_after;
                    old.linked_card = entry.other_card;
                    old.last_pos = pos;
                    self.cards.put(entry.card_id, old);
                }
                self.cards.put(
                    entry.other_card,
                    CardRecord {
                        state: CardState::Active,
                        block_reason: BlockReason::Other,
                        balance: Amount(moved),
                        last_atc: Atc(0),
                        key_version: entry.key_version,
                        issued_ms: entry.time_ms,
                        linked_card: entry.card_id,
                        // The replacement's chain starts at the record that created it.
                        last_pos: pos,
                    },
                );
                self.next_card =
                    self.next_card.max(super::card_counter(entry.other_card, self.count) + 1);
            }
            _ => {
                if let Some(mut card) = self.cards.get(entry.card_id) {
                    card.last_pos = pos;
                    if entry.uses_atc() {
                        card.last_atc = card.last_atc.max(entry.atc);
                    }
                    if approved {
                        card.balance = entry.balance_after;
                        match entry.kind {
                            EntryKind::Block => {
                                card.state = CardState::Blocked;
                                card.block_reason = block_reason_of(&entry, card.block_reason);
                            }
                            EntryKind::Unblock => card.state = CardState::Active,
                            EntryKind::Close => card.state = CardState::Closed,
                            _ => {}
                        }
                    }
                    self.cards.put(entry.card_id, card);
                }
            }
        }
        if entry.hotlist_version != 0 {
            self.hotlist_version = self.hotlist_version.max(entry.hotlist_version);
        }
        self.overlay.push(seq, pos, entry, self.now_ms);
    }

    pub(super) fn journal_entry(&mut self, mut entry: Entry) -> Result<u64, StoreError> {
        // Link the card's chain: the new record points at the card's previous one.
        entry.prev_pos = self.cards.get(entry.card_id).map_or(Pos::NONE, |c| c.last_pos);
        entry.encode(&mut self.scratch);
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
