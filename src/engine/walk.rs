//! Walking a card's chain of journal records (newest first, through the overlay and the journal
//! files), and the exactly-once lookups built on it: which record used a (card, ATC), which
//! staff operation used a (terminal, op_ref).

use citycard_protocol::{Amount, Atc, CardId, EntryKind, KeyVersion, Mac, Status};

use super::decide::transit::Transit;
use super::decide::AtcLookup;
use super::entry::{Entry, HotlistChange};
use super::shard::Shard;
use super::state;
use super::StoreError;
use crate::journal::{JournalError, Pos};

impl Shard {
    /// The record at `pos`: from the overlay while it may not be committed yet, otherwise
    /// from the journal files.
    pub(super) fn record_at(&mut self, pos: Pos) -> Result<(u64, Entry), StoreError> {
        if let Some(p) = self.overlay.at(pos) {
            return Ok((p.seq, p.entry.clone()));
        }
        let (seq, payload) = self.files.read(pos)?;
        let entry = Entry::decode(payload).map_err(|source| StoreError::Entry { seq, source })?;
        // Read back: the same invariants it was appended with.
        entry.check().map_err(|invariant| StoreError::Invariant { seq, invariant })?;
        Ok((seq, entry))
    }

    /// Walks `card`'s chain of journal records, newest first, calling `visit` until it returns
    /// false, the chain ends, or `max` records were seen. Returns whether the chain ended, that
    /// is whether every record of the card was seen.
    pub(super) fn walk_card(
        &mut self,
        card: CardId,
        max: usize,
        mut visit: impl FnMut(u64, &Entry) -> bool,
    ) -> Result<bool, StoreError> {
        let mut cur = self.cards.get(card).map_or(Pos::NONE, |c| c.last_pos);
        for _ in 0..max {
            if cur.is_none() {
                return Ok(true);
            }
            let (seq, entry) = match self.record_at(cur) {
                Ok(found) => found,
                Err(e) if is_missing_segment(&e) => {
                    // An archived segment was removed by hand: the card's older records are
                    // gone. Walks end there (history stops, an old ATC is not provably
                    // unused and so is declined Replay) instead of failing the shard.
                    tracing::warn!(card = %card.masked(), segment = cur.segment, error = %e, "journal segment missing; the card's older records are unavailable");
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            let next = if entry.card_id == card {
                entry.prev_pos
            } else if entry.other_card == card {
                // The replace that created this card: the start of its chain.
                Pos::NONE
            } else {
                return Err(StoreError::ChainBroken { card: card.masked(), seq });
            };
            if !visit(seq, &entry) {
                return Ok(false);
            }
            cur = next;
        }
        Ok(cur.is_none())
    }

    /// The entry that consumed (card, ATC), found by walking the card's chain at most `depth`
    /// records back.
    pub(super) fn atc_entry(
        &mut self,
        card: CardId,
        atc: Atc,
        depth: usize,
    ) -> Result<AtcLookup, StoreError> {
        let mut found = None;
        let complete = self.walk_card(card, depth, |seq, e| {
            if e.card_id == card && e.uses_atc() && e.atc == atc {
                found = Some((seq, e.clone()));
                return false;
            }
            true
        })?;
        Ok(match found {
            Some((seq, entry)) => AtcLookup::Used(seq, entry),
            None if complete => AtcLookup::Unused,
            None => AtcLookup::Unknown,
        })
    }

    pub(super) fn op_entry(
        &mut self,
        terminal: &str,
        op_ref: u64,
    ) -> Result<Option<(u64, Entry)>, StoreError> {
        let forget = crate::sim_bugs::active(crate::sim_bugs::Bug::ForgetOverlay);
        if let Some(p) = self.overlay.op(terminal, op_ref).filter(|_| !forget) {
            return Ok(Some((p.seq, p.entry.clone())));
        }
        let Some(value) = self.db.get(state::op_key(terminal, op_ref))? else {
            return Ok(None);
        };
        let (seq, pos) =
            state::parse_index_value(&value).ok_or_else(|| StoreError::MalformedState {
                what: "op_ref index value",
                detail: format!("{} bytes", value.len()),
            })?;
        if pos.is_none() {
            // Used by a staff record that a prune removed before this state was rebuilt
            // (state::PRUNED_OP): never executed again, answered like a record lost below.
            return Ok(Some((0, reference_lost(terminal, op_ref))));
        }
        let (found, entry) = match self.record_at(pos) {
            Ok(found) => found,
            Err(e) if is_missing_segment(&e) => {
                // The op_ref was used, but its record is gone with a removed archive segment:
                // never execute it again; answer ReferenceReused.
                tracing::warn!(terminal, op_ref, error = %e, "journal segment of a staff operation missing; its retry is declined");
                return Ok(Some((0, reference_lost(terminal, op_ref))));
            }
            Err(e) => return Err(e),
        };
        if found != seq {
            return Err(StoreError::IndexMismatch { indexed: seq, found });
        }
        Ok(Some((seq, entry)))
    }
}

/// Whether reading an old record by position failed in a way that leaves the rest of the shard
/// sound: its segment file is gone from journal and archive, or the record fails its CRC (a
/// damaged archive; `verify` names it). Walks end there instead of stopping the shard; the
/// decisions that needed the record fall back to the safe answer.
pub(super) fn is_missing_segment(error: &StoreError) -> bool {
    match error {
        StoreError::Journal(JournalError::Io { source, .. }) => {
            source.kind() == std::io::ErrorKind::NotFound
        }
        StoreError::Journal(JournalError::Corrupt { .. }) | StoreError::Entry { .. } => {
            tracing::error!(error = %error, "journal record unreadable; run citycard verify");
            true
        }
        _ => false,
    }
}

/// Stands for a staff operation whose record is no longer readable: it answers ReferenceReused.
pub(super) fn reference_lost(terminal: &str, op_ref: u64) -> Entry {
    Entry {
        kind: EntryKind::Block,
        status: Status::ReferenceReused,
        card_id: CardId(0),
        atc: Atc(0),
        amount: Amount(0),
        balance_after: Amount(0),
        time_ms: 0,
        reference: op_ref,
        binding: Mac::default(),
        other_card: CardId(0),
        key_version: KeyVersion(0),
        hotlist_version: 0,
        hotlist_change: HotlistChange::None,
        extra: 0,
        terminal: terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        product: None,
        numbered: crate::engine::entry::Numbered::NONE,
    }
}
