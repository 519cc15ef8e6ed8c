//! The write-behind of derived state: committed entries are sealed into one sled batch per
//! chunk and handed to the persister; checkpoints are taken with a chunk when due.

use std::time::{Duration, Instant};

use citycard_protocol::EntryKind;

use super::checkpoint::Checkpoint;
use super::entry::Entry;
use super::hotlist::hotlist_entry_of;
use super::persister::PersistJob;
use super::shard::Shard;
use super::state;
use super::types::{PERSIST_INTERVAL, PERSIST_MAX_RECORDS, PERSIST_WAIT};
use super::StoreError;
use crate::journal::Pos;

impl Shard {
    /// Hands the committed entries to the persister when enough have gathered or the oldest
    /// is old enough; call after every commit and when idle. Err is fail-stop.
    pub fn persist_due(&mut self) -> Result<(), StoreError> {
        self.persister.check()?;
        self.overlay.trim(self.persister.done());
        let due = self.overlay.current().is_some_and(|c| {
            c.entries.len() >= PERSIST_MAX_RECORDS || c.started.elapsed() >= PERSIST_INTERVAL
        });
        if due {
            self.seal()?;
        }
        Ok(())
    }

    /// Hands everything committed to the persister now, without waiting for sled.
    pub fn hand_off(&mut self) -> Result<(), StoreError> {
        self.persister.check()?;
        self.overlay.trim(self.persister.done());
        self.seal()
    }

    /// The checkpoint to take with a chunk ending at `last_seq`, when the policy says one is
    /// due. Only on the live path: during replay the journal (and so the record hash) is not
    /// open yet, and the start takes one at its end instead.
    pub(super) fn checkpoint_due(&mut self, last_seq: u64) -> Option<Checkpoint> {
        let journal = self.journal.as_ref()?;
        let since = last_seq.saturating_sub(self.checkpoint_seq);
        let due = since >= self.checkpoint_policy.records
            || (since > 0
                && self.checkpoint_at.elapsed()
                    >= Duration::from_millis(self.checkpoint_policy.interval_ms));
        if !due {
            return None;
        }
        // seal runs only with nothing pending, so the last appended record is `last_seq`.
        debug_assert_eq!(journal.last_committed_seq(), last_seq);
        if journal.last_committed_seq() != last_seq {
            return None;
        }
        self.checkpoint_seq = last_seq;
        self.checkpoint_at = Instant::now();
        Some(self.checkpoint_at_seq(last_seq, journal.last_hash()))
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
    /// on this thread (at the end of a start and at shutdown, when the persister is idle).
    pub fn checkpoint_now(&mut self) -> Result<(), StoreError> {
        self.persist()?;
        let journal =
            self.journal.as_ref().ok_or_else(|| StoreError::State("journal not open".into()))?;
        let seq = journal.last_committed_seq();
        if seq == 0 {
            return Ok(());
        }
        let checkpoint = self.checkpoint_at_seq(seq, journal.last_hash());
        self.place.take(&self.db, self.index, &checkpoint);
        self.checkpoint_seq = seq;
        self.checkpoint_at = Instant::now();
        Ok(())
    }

    /// Writes everything committed into sled and waits until it is there (shutdown, replay,
    /// tests).
    pub fn persist(&mut self) -> Result<(), StoreError> {
        self.seal()?;
        // Bounded: the persister applies at most PERSIST_QUEUE batches; a stuck sled shows as
        // an error rather than a hang.
        let deadline = Instant::now() + PERSIST_WAIT;
        while self.persister.done() < self.applied_seq {
            self.persister.check()?;
            if Instant::now() >= deadline {
                return Err(StoreError::State(format!(
                    "sled did not apply the state within {PERSIST_WAIT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.persister.check()?;
        self.overlay.trim(self.persister.done());
        Ok(())
    }

    /// Seals the current chunk into one sled batch (entries, changed cards, applied_seq) and
    /// queues it for the persister.
    pub(super) fn seal(&mut self) -> Result<(), StoreError> {
        if self.pending() > 0 {
            return Err(StoreError::State("persist before commit".into()));
        }
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
        self.cards.write_dirty(&mut batch);
        batch.insert(state::META_APPLIED, &last_seq.to_be_bytes()[..]);
        batch.insert(state::META_DIGEST, &self.cards.digest().to_bytes()[..]);
        chunk.sealed_at = Some(last_seq);
        self.applied_seq = last_seq;
        let checkpoint = self.checkpoint_due(last_seq);
        let job = PersistJob { batch, last_seq, checkpoint };
        let queue = self.persister.queue.as_ref();
        if queue.is_none_or(|q| q.send(job).is_err()) {
            self.persister.check()?;
            return Err(StoreError::State("persister thread stopped".into()));
        }
        Ok(())
    }

    /// Flushes sled to disk (for a clean shutdown; correctness never depends on it).
    pub fn flush_state(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| super::recovery::write_error(e, &self.persister.state_dir))?;
        Ok(())
    }
}

pub(super) fn is_staff(kind: EntryKind) -> bool {
    matches!(
        kind,
        EntryKind::Issue
            | EntryKind::Block
            | EntryKind::Unblock
            | EntryKind::ReplacedOut
            | EntryKind::Close
    )
}

/// The sled writes one entry needs beyond its card records: none for card transactions (their
/// history and retries are served from the journal through the card's chain), an op_ref index
/// entry for staff operations, and the hotlist change if any.
pub(super) fn write_index(batch: &mut sled::Batch, entry: &Entry, seq: u64, pos: Pos) {
    if is_staff(entry.kind) {
        batch.insert(
            state::op_key(&entry.terminal, entry.reference),
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
