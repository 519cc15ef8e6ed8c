//! The shard's card records: the one place that reads and writes them. Behind it is
//! [`super::store::CardStore`]: sled's card table with a bounded cache in front, the count and
//! the digest kept as cards change, and the background check of the digest. Decisions and apply
//! see only `get` and `put`.
//!
//! `get` takes `&self` and returns the record, loading it from sled on a miss (the cache sits in
//! a `RefCell`: a shard is driven by one thread). A sled failure during such a read cannot be
//! returned there; it is kept, the read answers "no such card", and the shard's [`Cards::check`]
//! after every operation, replayed record and seal turns it into the fail-stop error before
//! anything decided with it is committed or answered.

use std::cell::RefCell;

use citycard_protocol::CardId;

use super::checkpoint::StateDigest;
use super::state::CardRecord;
use super::store::verify::{Verified, STEP_CARDS};
use super::store::CardStore;
use super::StoreError;

/// Every card record of one shard (in sled, the recently used ones in memory).
pub struct Cards {
    store: RefCell<CardStore>,
    /// Highest seq sled has applied: cached changes at or below it may be evicted.
    persisted: u64,
    /// The first sled failure met by `get` or `put`, until [`Cards::check`] reports it.
    failed: RefCell<Option<StoreError>>,
}

/// What opening the card table found besides the cards.
pub struct Loaded {
    pub cards: Cards,
    /// Allocation counter of the next card id the shard issues.
    pub next_card: u64,
}

impl Cards {
    /// Opens the card table of `db` (applied up to `applied_seq`) with a cache of
    /// `cache_entries` cards. Reads meta keys only: the records are read when used, and checked
    /// against their digest by the pass [`Cards::start_verify`] begins.
    pub fn load(
        db: &sled::Db,
        shard_count: u16,
        applied_seq: u64,
        cache_entries: usize,
    ) -> Result<Loaded, StoreError> {
        let store = CardStore::open(db.clone(), shard_count, cache_entries)?;
        let next_card = store.next_card();
        let cards = Cards {
            store: RefCell::new(store),
            persisted: applied_seq,
            failed: RefCell::new(None),
        };
        Ok(Loaded { cards, next_card })
    }

    fn fail(&self, error: StoreError) {
        let mut slot = self.failed.borrow_mut();
        if slot.is_none() {
            tracing::error!(error = %error, "reading a card record failed; the shard stops");
            *slot = Some(error);
        }
    }

    /// The card's current record (None also after a sled failure, which [`Cards::check`]
    /// then reports).
    pub fn get(&self, id: CardId) -> Option<CardRecord> {
        let found = self.store.borrow_mut().get(id, self.persisted);
        found.unwrap_or_else(|e| {
            self.fail(e);
            None
        })
    }

    /// Sets the card's record (creating the card) as changed by journal record `seq`: kept in
    /// memory until sled holds it, counted and folded into the digest, and written with the
    /// next chunk.
    pub fn put(&mut self, id: CardId, record: CardRecord, seq: u64) {
        let persisted = self.persisted;
        if let Err(e) = self.store.get_mut().set(id, record, seq, persisted) {
            self.fail(e);
        }
    }

    /// The sled failure a `get` or `put` met, if any: fail-stop.
    pub fn check(&self) -> Result<(), StoreError> {
        match self.failed.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// How many cards the shard holds.
    pub fn len(&self) -> usize {
        usize::try_from(self.store.borrow().len()).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.store.borrow().is_empty()
    }

    /// Cards held in memory now.
    pub fn cached(&self) -> usize {
        self.store.borrow().cached()
    }

    /// Every card, in id order (tests, tools): reads the whole table.
    pub fn all(&self) -> Result<Vec<(CardId, CardRecord)>, StoreError> {
        self.store.borrow().all(self.persisted)
    }

    /// The cards with an open hold, for the expiry sweep's index (read once at open).
    pub fn open_holds(&self) -> Result<Vec<(CardId, CardRecord)>, StoreError> {
        self.store.borrow().open_holds()
    }

    /// The digest of every record as applied (checkpoints and sled's own copy).
    pub fn digest(&self) -> StateDigest {
        self.store.borrow().digest()
    }

    /// Writes the records changed since the last call, the count, the digest and the format
    /// into `batch`.
    pub fn write_dirty(&mut self, batch: &mut sled::Batch) {
        self.store.get_mut().seal(batch);
    }

    /// Whether any record changed since the last `write_dirty`.
    pub fn has_dirty(&self) -> bool {
        self.store.borrow().dirty_count() > 0
    }

    /// How many records changed since the last `write_dirty`.
    pub fn dirty_count(&self) -> usize {
        self.store.borrow().dirty_count()
    }

    /// sled has applied everything up to `seq`: those changes may leave memory.
    pub fn persisted(&mut self, seq: u64) {
        self.persisted = self.persisted.max(seq);
        let persisted = self.persisted;
        self.store.get_mut().persisted(persisted);
    }

    /// Begins checking sled's card records against their digest, in steps (see
    /// [`super::store::verify`]).
    pub fn start_verify(&mut self) {
        self.store.get_mut().start_verify();
    }

    /// One step of the check, if one is running: `Ok(Some)` when it finished and matched; an
    /// error (fail-stop, the state marked for a rebuild) when it did not.
    pub fn verify_step(&mut self) -> Result<Option<Verified>, StoreError> {
        let persisted = self.persisted;
        self.store.get_mut().verify_step(STEP_CARDS, persisted)
    }
}
