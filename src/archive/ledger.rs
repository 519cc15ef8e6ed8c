//! The replay a prune runs over the records it is about to remove: every card's state (its
//! open tap-in hold included), the listed cards, each day's money, every staff op_ref and every
//! numbered offline seq used, as they stand after the last removed record. Changes are
//! kept per segment so a segment found to hold a record of the kept days can be taken back.

use std::collections::BTreeMap;

use citycard_protocol::{Amount, Atc, BlockReason, CardId, CardState, EntryKind, Status};

use super::anchor::{Anchor, AnchorCard, DayFlows};
use crate::engine::entry::{Entry, HotlistChange};
use crate::engine::product::CardProduct;
use crate::engine::state::CardRecord;
use crate::journal::Pos;
use crate::report::DAY_MS;

/// Before-images of what one segment's records changed.
enum Undo {
    Card(CardId, Option<AnchorCard>),
    Listed(CardId, Option<(u64, bool, BlockReason)>),
}

/// Cards, hotlist and day totals replayed up to the last record applied.
pub struct Ledger {
    pub cards: BTreeMap<CardId, AnchorCard>,
    pub hotlist: BTreeMap<CardId, (u64, bool, BlockReason)>,
    pub days: BTreeMap<i64, DayFlows>,
    /// Highest hotlist version created by a committed record.
    pub hotlist_version: u64,
    /// The staff op_refs of committed segments, per terminal (sorted by [`Ledger::staff_refs`]).
    staff_refs: BTreeMap<String, Vec<u64>>,
    /// The staff op_refs of the segment being read, kept apart until it is committed.
    staff_pending: Vec<(String, u64)>,
    /// The numbered offline seqs of committed segments, per terminal (sorted by
    /// [`Ledger::numbered_seqs`]), and those of the segment being read.
    numbered_seqs: BTreeMap<String, Vec<u64>>,
    seqs_pending: Vec<(String, u64)>,
    undo: Vec<Undo>,
    hotlist_version_before: u64,
    days_before: BTreeMap<i64, DayFlows>,
}

impl Ledger {
    /// Starts where an earlier prune's anchor left off (or from nothing).
    pub fn new(anchor: Option<&Anchor>) -> Ledger {
        let (cards, hotlist, days, version, staff_refs, numbered_seqs) = match anchor {
            Some(a) => (
                a.cards.clone(),
                a.hotlist.clone(),
                a.days.clone(),
                a.hotlist_version,
                a.staff_refs.clone(),
                a.numbered_seqs.clone(),
            ),
            None => Default::default(),
        };
        Ledger {
            cards,
            hotlist,
            staff_refs,
            staff_pending: Vec::new(),
            numbered_seqs,
            seqs_pending: Vec::new(),
            days_before: days.clone(),
            days,
            hotlist_version: version,
            hotlist_version_before: version,
            undo: Vec::new(),
        }
    }

    /// Keeps every change since the last `commit` or `rollback`.
    pub fn commit(&mut self) {
        self.undo.clear();
        for (terminal, op_ref) in self.staff_pending.drain(..) {
            self.staff_refs.entry(terminal).or_default().push(op_ref);
        }
        for (terminal, seq) in self.seqs_pending.drain(..) {
            self.numbered_seqs.entry(terminal).or_default().push(seq);
        }
        self.days_before = self.days.clone();
        self.hotlist_version_before = self.hotlist_version;
    }

    /// Takes back every change since the last `commit`.
    pub fn rollback(&mut self) {
        self.staff_pending.clear();
        self.seqs_pending.clear();
        while let Some(undo) = self.undo.pop() {
            match undo {
                Undo::Card(id, Some(card)) => {
                    self.cards.insert(id, card);
                }
                Undo::Card(id, None) => {
                    self.cards.remove(&id);
                }
                Undo::Listed(id, Some(listed)) => {
                    self.hotlist.insert(id, listed);
                }
                Undo::Listed(id, None) => {
                    self.hotlist.remove(&id);
                }
            }
        }
        self.days = self.days_before.clone();
        self.hotlist_version = self.hotlist_version_before;
    }

    /// Every committed staff op_ref per terminal, ascending and without repeats, as the anchor
    /// keeps them. (A repeat cannot come from a journal: a reused op_ref journals nothing.)
    pub fn staff_refs(&mut self) -> BTreeMap<String, Vec<u64>> {
        sorted(std::mem::take(&mut self.staff_refs))
    }

    /// Every committed numbered offline seq per terminal, ascending and without repeats, as
    /// the anchor keeps them. (A seq is recorded once; a SeqConflict refusal claims none.)
    pub fn numbered_seqs(&mut self) -> BTreeMap<String, Vec<u64>> {
        sorted(std::mem::take(&mut self.numbered_seqs))
    }

    fn save(&mut self, id: CardId) {
        self.undo.push(Undo::Card(id, self.cards.get(&id).copied()));
    }

    /// Applies one record as the engine does; an error says why the record does not follow
    /// from the ones before it (a prune then removes nothing).
    pub fn apply(&mut self, pos: Pos, e: &Entry) -> Result<(), String> {
        let approved = e.status == Status::Approved;
        if crate::engine::persist::is_staff(e.kind) {
            // Declined staff operations are journaled under their op_ref too (6.2).
            self.staff_pending.push((e.terminal.clone(), e.reference));
        }
        if e.claims_seq() {
            // Refused numbered records are recorded under their seq too (6.13).
            self.seqs_pending.push((e.terminal.clone(), e.numbered.seq));
        }
        let day = (e.time_ms / DAY_MS as u64) as i64;
        let flows = self.days.entry(day).or_default();
        flows.records += 1;
        if approved {
            let amount = e.amount.0;
            match e.kind {
                EntryKind::Issue => flows.deposits += amount,
                EntryKind::TopUp => flows.top_ups += amount,
                // Fares are spent like purchases and a reversal gives one back, as the
                // settlement report counts them (protocol 1.2).
                EntryKind::Purchase
                | EntryKind::TapOut
                | EntryKind::HoldExpired
                | EntryKind::Reversal => flows.purchases -= amount,
                EntryKind::Offline => flows.offline -= amount,
                EntryKind::Close => flows.refunds -= amount,
                EntryKind::ReplacedOut => flows.replaced -= amount,
                _ => {}
            }
            if e.kind != EntryKind::ReplacedOut {
                flows.balance_change += amount;
            }
        }
        match e.kind {
            EntryKind::Issue if approved => {
                if self.cards.contains_key(&e.card_id) {
                    return Err(format!("card {} issued twice", e.card_id.masked()));
                }
                self.save(e.card_id);
                let mut card = fresh(e, e.balance_after, CardId(0), pos);
                card.record.product = e.product.map_or(CardProduct::DEFAULT, |p| p.after);
                self.cards.insert(e.card_id, card);
            }
            EntryKind::ReplacedOut if approved => {
                let moved = Amount(e.amount.0.saturating_neg());
                // Protocol 1.3: as the engine's apply, the new card gets the product and the
                // old deposit less what was kept plus what was paid.
                let mut product = CardProduct::DEFAULT;
                self.change(e.card_id, e, |card| {
                    card.record.state = CardState::Replaced;
                    if let Some(p) = e.product {
                        let old = card.record.product.deposit.0;
                        let deposit = Amount(old - p.deposit_kept + p.deposit_paid);
                        product = CardProduct { deposit, ..p.after };
                        card.record.product = p.after;
                    }
                })?;
                self.save(e.other_card);
                let mut card = fresh(e, moved, e.card_id, pos);
                card.record.product = product;
                self.cards.insert(e.other_card, card);
                self.cards.entry(e.card_id).and_modify(|c| c.record.last_pos = pos);
            }
            // A numbered offline record's refusal note (protocol 1.3) is on no card's chain and
            // changes no card, as in the engine's apply.
            _ if e.is_note() => {}
            _ => {
                if !self.cards.contains_key(&e.card_id) {
                    // A declined request for an unknown card changes nothing.
                    if approved {
                        return Err(format!(
                            "{:?} on card {} never issued",
                            e.kind,
                            e.card_id.masked()
                        ));
                    }
                } else {
                    self.change(e.card_id, e, |card| {
                        if approved {
                            if let Some(p) = e.product {
                                card.record.product = p.after;
                            }
                            match e.kind {
                                EntryKind::Block => {
                                    card.record.state = CardState::Blocked;
                                    card.record.block_reason = u8::try_from(e.extra)
                                        .ok()
                                        .and_then(BlockReason::from_u8)
                                        .unwrap_or(card.record.block_reason);
                                }
                                EntryKind::Unblock => card.record.state = CardState::Active,
                                EntryKind::Close => card.record.state = CardState::Closed,
                                // The open hold as the entry leaves it, as the engine's apply
                                // keeps it: a hold open across the cut stays in the anchor.
                                EntryKind::TapIn | EntryKind::TapOut | EntryKind::HoldExpired => {
                                    card.record.hold = e.transit.hold;
                                }
                                _ => {}
                            }
                        }
                    })?;
                    self.cards.entry(e.card_id).and_modify(|c| c.record.last_pos = pos);
                }
            }
        }
        self.hotlist_version = self.hotlist_version.max(e.hotlist_version);
        match e.hotlist_change {
            HotlistChange::None => {}
            HotlistChange::Listed(reason) | HotlistChange::Unlisted(reason) => {
                let listed = matches!(e.hotlist_change, HotlistChange::Listed(_));
                self.undo.push(Undo::Listed(e.card_id, self.hotlist.get(&e.card_id).copied()));
                self.hotlist.insert(e.card_id, (e.hotlist_version, listed, reason));
            }
        }
        Ok(())
    }

    /// The balance and ATC rules every record of an existing card follows, then `more`.
    fn change(
        &mut self,
        id: CardId,
        e: &Entry,
        more: impl FnOnce(&mut AnchorCard),
    ) -> Result<(), String> {
        self.save(id);
        let Some(card) = self.cards.get_mut(&id) else {
            return Err(format!("{:?} on card {} never issued", e.kind, id.masked()));
        };
        if e.status == Status::Approved {
            if card.record.balance.0.checked_add(e.amount.0) != Some(e.balance_after.0) {
                return Err(format!(
                    "card {}: balance {} + {} != {}",
                    id.masked(),
                    card.record.balance.0,
                    e.amount.0,
                    e.balance_after.0
                ));
            }
            card.record.balance = e.balance_after;
        }
        if e.uses_atc() {
            use_atc(card, e.atc);
        }
        more(card);
        Ok(())
    }
}

/// Records a use of `atc` in the card's late-ATC window.
fn use_atc(card: &mut AnchorCard, atc: Atc) {
    let last = card.record.last_atc.0;
    if atc.0 > last {
        let shift = atc.0 - last;
        card.recent_atcs = if shift >= 64 { 0 } else { card.recent_atcs << shift };
        card.recent_atcs |= 1;
        card.record.last_atc = atc;
    } else if last - atc.0 < 64 {
        card.recent_atcs |= 1 << (last - atc.0);
    }
}

/// A card created by `e` (issued, or the new card of a replacement).
/// (`_linked`: the other card of a replacement; the journal keeps the link, the record does not.)
fn fresh(e: &Entry, balance: Amount, _linked: CardId, pos: Pos) -> AnchorCard {
    AnchorCard {
        record: CardRecord {
            state: CardState::Active,
            block_reason: BlockReason::Other,
            balance,
            last_atc: Atc(0),
            key_version: e.key_version,
            last_pos: pos,
            hold: crate::engine::decide::transit::Hold::NONE,
            product: CardProduct::DEFAULT,
        },
        recent_atcs: 0,
    }
}

fn sorted(mut table: BTreeMap<String, Vec<u64>>) -> BTreeMap<String, Vec<u64>> {
    for list in table.values_mut() {
        list.sort_unstable();
        list.dedup();
    }
    table
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use citycard_protocol::{KeyVersion, Mac};

    use super::*;
    use crate::engine::decide::transit::{Hold, Transit};

    const CARD: CardId = CardId(6_000_000_000_000_001);

    fn entry(kind: EntryKind, atc: u32, amount: i64, balance_after: i64, hold: Hold) -> Entry {
        Entry {
            kind,
            status: Status::Approved,
            card_id: CARD,
            atc: Atc(atc),
            amount: Amount(amount),
            balance_after: Amount(balance_after),
            time_ms: 1_000,
            reference: 0,
            binding: Mac::default(),
            other_card: CardId(0),
            key_version: KeyVersion(1),
            hotlist_version: 0,
            hotlist_change: HotlistChange::None,
            extra: 0,
            terminal: "reader-1".into(),
            prev_pos: Pos::NONE,
            transit: if kind == EntryKind::Issue {
                Transit::NONE
            } else {
                Transit { hold, ref_atc: Atc(0) }
            },
            product: None,
            numbered: crate::engine::entry::Numbered::NONE,
        }
    }

    fn pos(offset: u32) -> Pos {
        Pos { segment: 1, offset }
    }

    // postmortem: the ledger never set `record.hold`, so a hold open across a prune's cut was
    // lost from the anchor and from every state rebuilt from it.
    #[test]
    fn holds_and_fares_follow_the_journal() {
        let held = |atc| Hold { atc: Atc(atc), amount: Amount(400), expires_ms: 9_000 };
        let mut ledger = Ledger::new(None);
        ledger.apply(pos(0), &entry(EntryKind::Issue, 0, 1_000, 1_000, Hold::NONE)).unwrap();
        ledger.apply(pos(1), &entry(EntryKind::TapIn, 1, 0, 1_000, held(1))).unwrap();
        assert_eq!(ledger.cards[&CARD].record.hold, held(1));
        ledger.apply(pos(2), &entry(EntryKind::TapOut, 2, -320, 680, Hold::NONE)).unwrap();
        assert_eq!(ledger.cards[&CARD].record.hold, Hold::NONE);
        ledger.apply(pos(3), &entry(EntryKind::Purchase, 3, -50, 630, Hold::NONE)).unwrap();
        ledger.apply(pos(4), &entry(EntryKind::Reversal, 4, 50, 680, Hold::NONE)).unwrap();
        ledger.apply(pos(5), &entry(EntryKind::TapIn, 5, 0, 680, held(5))).unwrap();
        ledger.commit();
        // A segment taken back restores the hold as it was.
        ledger.apply(pos(6), &entry(EntryKind::HoldExpired, 0, -250, 430, Hold::NONE)).unwrap();
        assert_eq!(ledger.cards[&CARD].record.hold, Hold::NONE);
        ledger.rollback();
        let card = ledger.cards[&CARD].record;
        assert_eq!(
            (card.hold, card.balance, card.last_atc, card.last_pos),
            (held(5), Amount(680), Atc(5), pos(5))
        );
        // The settlement report's terms: fares are purchases, a reversal a negative one.
        let day = ledger.days[&0];
        assert_eq!((day.records, day.deposits, day.purchases), (6, 1_000, 320));
        assert_eq!((day.balance_change, day.net()), (680, 680));
    }

    // A refusal note of a numbered offline record (protocol 1.3) is off the card's chain in
    // the engine; the anchor must not make it the head of the chain.
    #[test]
    fn refusal_notes_leave_the_card_as_it_was() {
        let mut ledger = Ledger::new(None);
        ledger.apply(pos(0), &entry(EntryKind::Issue, 0, 1_000, 1_000, Hold::NONE)).unwrap();
        let numbered = crate::engine::entry::Numbered { seq: 3, uncertain: false, note: true };
        let note = Entry {
            kind: EntryKind::Offline,
            status: Status::BadCryptogram,
            atc: Atc(4_000_000),
            balance_after: Amount(0),
            transit: Transit::NONE,
            numbered,
            ..entry(EntryKind::Offline, 0, 0, 0, Hold::NONE)
        };
        ledger.apply(pos(1), &note).unwrap();
        let unknown = Entry { card_id: CardId(CARD.0 + 2), ..note.clone() };
        ledger.apply(pos(2), &unknown).unwrap();
        let card = ledger.cards[&CARD].record;
        assert_eq!((card.last_pos, card.last_atc, card.balance), (pos(0), Atc(0), Amount(1_000)));
    }
}
