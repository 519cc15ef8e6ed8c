//! The write-behind of derived state: committed entries are sealed into one sled batch per
//! chunk and handed to the persister; checkpoints are taken with a chunk when due.

use citycard_protocol::EntryKind;

use super::checkpoint::Checkpoint;
use super::entry::Entry;
use super::hotlist::hotlist_entry_of;
use super::persister::{PersistError, PersistJob, WriteBehind};
use super::shard::Shard;
use super::state;
use super::types::{PERSIST_INTERVAL_MS, PERSIST_MAX_RECORDS};
use super::StoreError;
use crate::journal::Pos;

impl Shard {
    /// Hands the committed entries to the write-behind when enough have gathered or the oldest
    /// is `PERSIST_INTERVAL_MS` old at `now_ms`; call after every commit and when idle. Err is
    /// fail-stop.
    pub fn persist_due(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.observe(now_ms);
        self.trim()?;
        let due = self.overlay.current().is_some_and(|c| {
            c.entries.len() >= PERSIST_MAX_RECORDS
                || now_ms.saturating_sub(c.started_ms) >= PERSIST_INTERVAL_MS
        });
        if due {
            self.seal()?;
        }
        if let Some(verified) = self.cards.verify_step()? {
            tracing::info!(
                shard = self.index,
                cards = verified.cards,
                "card records match their digest"
            );
        }
        Ok(())
    }

    /// Hands everything committed to the write-behind now, without waiting for sled.
    pub fn hand_off(&mut self) -> Result<(), StoreError> {
        self.trim()?;
        self.seal()
    }

    /// Runs one waiting write-behind job, for a write-behind that waits for its driver
    /// ([`super::persister::Stepped`]); returns whether one ran.
    pub fn persist_step(&mut self) -> Result<bool, StoreError> {
        let ran = self.write_behind.step().map_err(|e| self.persist_error(e))?;
        self.trim()?;
        Ok(ran)
    }

    /// Replaces the write-behind (the server's worker installs one that runs on its own thread).
    /// Everything handed to the old one is finished first.
    pub fn set_write_behind(
        &mut self,
        write_behind: Box<dyn WriteBehind>,
    ) -> Result<(), StoreError> {
        self.write_behind.drain().map_err(|e| self.persist_error(e))?;
        self.trim()?;
        self.write_behind = write_behind;
        Ok(())
    }

    /// Learns how far sled got and drops the overlay chunks it confirmed.
    pub(super) fn trim(&mut self) -> Result<(), StoreError> {
        let finished = self.write_behind.finished().map_err(|e| self.persist_error(e))?;
        self.persisted = self.persisted.max(finished);
        self.overlay.trim(self.persisted);
        self.cards.persisted(self.persisted);
        Ok(())
    }

    pub(super) fn persist_error(&self, error: PersistError) -> StoreError {
        match error {
            PersistError::Sled(e) => super::recovery::write_error(e, &self.state_dir),
            PersistError::Stopped => StoreError::PersisterStopped,
            PersistError::Stuck { waited_ms } => StoreError::PersistStuck { waited_ms },
        }
    }

    /// The checkpoint to take with a chunk ending at `last_seq`, when the policy says one is
    /// due. Only on the live path: during replay the journal (and so the record hash) is not
    /// open yet, and the start takes one at its end instead.
    pub(super) fn checkpoint_due(&mut self, last_seq: u64) -> Option<Checkpoint> {
        let journal = self.journal.as_ref()?;
        let since = last_seq.saturating_sub(self.checkpoint_seq);
        let now_ms = self.now_ms;
        // The first chunk after a start (or before any time was given) starts the interval.
        let at_ms = *self.checkpoint_at_ms.get_or_insert(now_ms);
        let due = since >= self.checkpoint_policy.records
            || (since > 0 && now_ms.saturating_sub(at_ms) >= self.checkpoint_policy.interval_ms);
        if !due {
            return None;
        }
        // seal runs only with nothing pending, so the last appended record is `last_seq`.
        debug_assert_eq!(journal.last_committed_seq(), last_seq);
        if journal.last_committed_seq() != last_seq {
            return None;
        }
        let checkpoint = self.checkpoint_at_seq(last_seq, journal.last_hash());
        self.checkpoint_seq = last_seq;
        self.checkpoint_at_ms = Some(now_ms);
        Some(checkpoint)
    }

    pub(super) fn checkpoint_at_seq(
        &self,
        seq: u64,
        hash: crate::journal::RecordHash,
    ) -> Checkpoint {
        Checkpoint {
            seq,
            hash,
            digest: self.cards.digest(),
            cards: u32::try_from(self.cards.len()).unwrap_or(u32::MAX),
        }
    }

    /// Writes everything committed to sled and takes a checkpoint at the last committed seq,
    /// on this thread (at the end of a start and at shutdown, when the write-behind is idle).
    pub fn checkpoint_now(&mut self) -> Result<(), StoreError> {
        self.persist()?;
        let journal = self.journal.as_ref().ok_or(StoreError::JournalNotOpen)?;
        let seq = journal.last_committed_seq();
        if seq == 0 {
            return Ok(());
        }
        let checkpoint = self.checkpoint_at_seq(seq, journal.last_hash());
        self.place.take(&self.db, self.index, &checkpoint);
        self.checkpoint_seq = seq;
        self.checkpoint_at_ms = (self.now_ms > 0).then_some(self.now_ms);
        Ok(())
    }

    /// Writes everything committed into sled and waits until it is there (shutdown, replay,
    /// tests). How long it may wait is the write-behind's bound.
    pub fn persist(&mut self) -> Result<(), StoreError> {
        self.seal()?;
        self.write_behind.drain().map_err(|e| self.persist_error(e))?;
        self.trim()?;
        if self.persisted < self.applied_seq {
            return Err(StoreError::PersistBehind {
                persisted: self.persisted,
                applied_seq: self.applied_seq,
            });
        }
        Ok(())
    }

    /// Seals the current chunk into one sled batch (entries, changed cards, applied_seq) and
    /// hands it to the write-behind.
    pub(super) fn seal(&mut self) -> Result<(), StoreError> {
        if self.pending() > 0 {
            return Err(StoreError::PersistBeforeCommit { pending: self.pending() });
        }
        self.cards.check()?;
        let Some(chunk) = self.overlay.chunks.back_mut().filter(|c| c.sealed_at.is_none()) else {
            return Ok(());
        };
        if chunk.entries.is_empty() && !self.cards.has_dirty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut last_seq = self.applied_seq;
        for p in &chunk.entries {
            write_index(&mut batch, &p.entry, p.seq, p.pos);
            last_seq = last_seq.max(p.seq);
        }
        // An upper bound of the keys written (index entries, changed cards, meta keys), for
        // `store::reclaim_after_batch`.
        let writes = chunk.entries.len() + self.cards.dirty_count() + 4;
        // The changed cards, their count, digest and format.
        if !crate::sim_bugs::active(crate::sim_bugs::Bug::AppliedSeqBeforeData) {
            self.cards.write_dirty(&mut batch);
        }
        batch.insert(state::META_APPLIED, &last_seq.to_be_bytes()[..]);
        chunk.sealed_at = Some(last_seq);
        self.applied_seq = last_seq;
        let checkpoint = self.checkpoint_due(last_seq).map(|c| (c, self.place.clone()));
        let job = PersistJob {
            db: self.db.clone(),
            shard: self.index,
            batch,
            writes,
            last_seq,
            checkpoint,
        };
        self.write_behind.submit(job).map_err(|e| self.persist_error(e))
    }

    /// Flushes sled to disk (for a clean shutdown; correctness never depends on it).
    pub fn flush_state(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| super::recovery::write_error(e, &self.state_dir))?;
        Ok(())
    }
}

/// Whether entries of this kind are staff operations, recorded under their (terminal, op_ref).
pub(crate) fn is_staff(kind: EntryKind) -> bool {
    matches!(
        kind,
        EntryKind::Issue
            | EntryKind::Block
            | EntryKind::Unblock
            | EntryKind::ReplacedOut
            | EntryKind::Close
            | EntryKind::ProductChanged
    )
}

/// The sled writes one entry needs beyond its card records: none for card transactions (their
/// history and retries are served from the journal through the card's chain), an op_ref index
/// entry for staff operations, a (terminal, seq) index entry for numbered offline records
/// (protocol 1.3), and the hotlist change if any.
pub(super) fn write_index(batch: &mut sled::Batch, entry: &Entry, seq: u64, pos: Pos) {
    if is_staff(entry.kind) {
        batch.insert(
            state::op_key(&entry.terminal, entry.reference),
            &state::index_value(seq, pos)[..],
        );
    }
    if entry.claims_seq() {
        batch.insert(
            state::seq_key(&entry.terminal, entry.numbered.seq),
            &state::index_value(seq, pos)[..],
        );
    }
    if let Some(h) = hotlist_entry_of(entry) {
        batch.insert(
            &state::hotlist_key(h.version)[..],
            &state::hotlist_value(h.card_id, h.listed, h.reason)[..],
        );
    }
}
