//! Protocol 1.3 numbered offline uploads on the shard: the (terminal, terminal seq) index of
//! numbered records (the per-terminal seq state, derived from the journal like the op_ref index
//! of staff operations) and the decision order of one numbered record: seq first, then card.
//!
//! A record's seq lives in the shard of its card, next to the money it moved, so the record and
//! its seq are journaled in one entry. That a seq is not held by another shard (a different
//! card under the same seq) is asked of every shard before the records are decided
//! ([`Shard::seq_lookup`], the connection's first phase; PROTOCOL.md 6.13) and arrives here as
//! `elsewhere`.

use citycard_protocol::{
    Amount, CardResult, MessageType, NumberedRecord, NumberedResult, Status, FLAG_UNCERTAIN,
};

use super::answer::{card_result, seal_card_result};
use super::entry::{Entry, Numbered};
use super::shard::Shard;
use super::state;
use super::types::Output;
use super::walk::is_missing_segment;
use super::StoreError;

impl Shard {
    /// The entry that holds `terminal_seq` for `terminal`, if this shard has one.
    pub(super) fn seq_entry(
        &mut self,
        terminal: &str,
        terminal_seq: u64,
    ) -> Result<Option<(u64, Entry)>, StoreError> {
        if let Some(p) = self.overlay.terminal_seq(terminal, terminal_seq) {
            return Ok(Some((p.seq, p.entry.clone())));
        }
        let Some(value) = self.db.get(state::seq_key(terminal, terminal_seq))? else {
            return Ok(None);
        };
        let (seq, pos) =
            state::parse_index_value(&value).ok_or_else(|| StoreError::MalformedState {
                what: "terminal seq index value",
                detail: format!("{} bytes", value.len()),
            })?;
        if pos.is_none() {
            // Used by a numbered record that a prune removed before this state was rebuilt
            // (state::PRUNED_OP): the seq stays used, answered like a record lost below.
            return Ok(Some((0, Entry { status: Status::SeqConflict, ..lost(terminal) })));
        }
        let (found, entry) = match self.record_at(pos) {
            Ok(found) => found,
            Err(e) if is_missing_segment(&e) => {
                // The seq was used, but its record went with a removed archive segment: it
                // stays used. A re-upload is answered SeqConflict rather than decided again.
                tracing::warn!(terminal, terminal_seq, error = %e, "journal segment of a numbered offline record missing");
                return Ok(Some((0, Entry { status: Status::SeqConflict, ..lost(terminal) })));
            }
            Err(e) => return Err(e),
        };
        if found != seq {
            return Err(StoreError::IndexMismatch { indexed: seq, found });
        }
        Ok(Some((seq, entry)))
    }

    /// The highest terminal seq this shard holds for `terminal` (0: none).
    pub(super) fn highest_seq(&self, terminal: &str) -> Result<u64, StoreError> {
        let in_sled = match self.db.scan_prefix(state::seq_prefix(terminal)).next_back() {
            Some(kv) => {
                let (key, _) = kv?;
                key.get(key.len().saturating_sub(8)..).and_then(state::be_u64).unwrap_or(0)
            }
            None => 0,
        };
        Ok(in_sled.max(self.overlay.highest_seq(terminal)))
    }

    /// The first phase of a numbered batch: which of `seqs` this shard holds for `terminal`.
    pub(super) fn seq_lookup(
        &mut self,
        terminal: &str,
        seqs: &[u64],
    ) -> Result<Output, StoreError> {
        let mut held = Vec::new();
        for seq in seqs {
            if self.seq_entry(terminal, *seq)?.is_some() {
                held.push(*seq);
            }
        }
        Ok(Output::SeqLookup { held, highest: self.highest_seq(terminal)?, complete: true })
    }

    /// Decides this shard's records of a numbered batch, in order.
    pub(super) fn numbered_batch(
        &mut self,
        terminal: &str,
        records: &[(u16, NumberedRecord, bool)],
        now_ms: u64,
    ) -> Result<Output, StoreError> {
        let mut results = Vec::with_capacity(records.len());
        for (position, numbered, elsewhere) in records {
            let result = self.numbered_record(terminal, numbered, *elsewhere, now_ms)?;
            let terminal_seq = numbered.terminal_seq;
            results.push((*position, NumberedResult { terminal_seq, result }));
        }
        Ok(Output::Numbered { results, highest: self.highest_seq(terminal)? })
    }

    /// One numbered record (PROTOCOL.md 6.13): a seq this terminal already used answers its
    /// first result when the record is the same, and SeqConflict (journaled as a note, the seq
    /// keeping its first record) when it is not; a new seq is decided like a 1.1 offline
    /// record, and journaled with its seq whatever the outcome.
    fn numbered_record(
        &mut self,
        terminal: &str,
        numbered: &NumberedRecord,
        elsewhere: bool,
        now_ms: u64,
    ) -> Result<CardResult, StoreError> {
        let record = &numbered.record;
        let uncertain = numbered.flags & FLAG_UNCERTAIN != 0;
        let tag = Numbered { seq: numbered.terminal_seq, uncertain, note: false };
        let held = if elsewhere { None } else { self.seq_entry(terminal, tag.seq)? };
        let conflict = elsewhere
            || held
                .as_ref()
                .is_some_and(|(_, e)| !super::decide::offline::same_record(e, record, uncertain));
        if conflict {
            tracing::warn!(terminal, terminal_seq = tag.seq, card = %record.card_id.masked(), "numbered offline record reuses a seq with another record; refused");
            let context = self.context(terminal, now_ms);
            let note =
                super::decide::offline::note(&context, record, tag, Status::SeqConflict, Amount(0));
            let mut result = super::decide::offline::declined(Status::SeqConflict, record);
            result.journal_seq = self.journal_entry(note)?;
            return Ok(result);
        }
        if let Some((seq, entry)) = held {
            // The same record again: its first answer, sealed the way it was then.
            let mut result = card_result(&entry, seq);
            if authenticated(entry.status) {
                if let Ok((_, key)) = self.card_and_key(record.card_id) {
                    let t = MessageType::NumberedOfflineResults;
                    seal_card_result(&key, t, &record.certificate, &mut result);
                }
            }
            return Ok(result);
        }
        self.offline_record(terminal, record, tag, now_ms)
    }
}

/// Whether a record's first answer was sealed with its card's key: every status but those
/// given before the card was authenticated.
fn authenticated(status: Status) -> bool {
    !matches!(
        status,
        Status::UnknownCard
            | Status::BadCryptogram
            | Status::KeyVersionRetired
            | Status::SeqConflict
    )
}

/// Stands for a numbered record that is no longer readable.
fn lost(terminal: &str) -> Entry {
    let mut entry = super::walk::reference_lost(terminal, 0);
    entry.kind = citycard_protocol::EntryKind::Offline;
    entry
}
