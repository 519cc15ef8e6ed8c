//! The shard's card records: the one place that reads and writes them, keeps their digest
//! current and knows which changed since the last chunk went to sled. Decisions and apply see
//! only `get` and `put`, so how records are held (all in memory today) can change behind it.

use std::collections::{HashMap, HashSet};

use citycard_protocol::CardId;

use super::checkpoint::StateDigest;
use super::error::Disagreement;
use super::state::{self, CardRecord};
use super::StoreError;

/// Every card record of one shard, with their digest and the set changed since the last seal.
#[derive(Default)]
pub struct Cards {
    records: HashMap<CardId, CardRecord>,
    /// Cards changed since their records were last written into a sled batch.
    dirty: HashSet<CardId>,
    /// Digest of every record as applied (kept current by `put`).
    digest: StateDigest,
}

/// What loading the card records from sled found besides the records.
pub struct Loaded {
    pub cards: Cards,
    /// Allocation counter of the next card id the shard issues.
    pub next_card: u64,
}

impl Cards {
    /// Reads every card record from sled and checks them against the digest sled recorded with
    /// its applied_seq: a state that lost or changed card records is rebuilt, not served. (A
    /// state written before digests existed has none; it is checked from the next chunk on.)
    pub fn load(db: &sled::Db, shard_count: u16, applied_seq: u64) -> Result<Loaded, StoreError> {
        let mut cards = Cards::default();
        let mut next_card = 0u64;
        for item in db.scan_prefix([state::CARD]) {
            let (k, v) = item?;
            let id = state::be_u64(&k[1..])
                .ok_or_else(|| StoreError::Disagrees(Disagreement::CardKeyMalformed))?;
            let record = CardRecord::decode(&v).ok_or_else(|| {
                StoreError::Disagrees(Disagreement::CardRecordMalformed {
                    card: CardId(id).masked(),
                })
            })?;
            next_card = next_card.max(super::card_counter(CardId(id), shard_count) + 1);
            cards.digest.add(CardId(id), &record);
            cards.records.insert(CardId(id), record);
        }
        if let Some(stored) = db.get(state::META_DIGEST)? {
            let stored = StateDigest::from_bytes(&stored)
                .ok_or_else(|| StoreError::Disagrees(Disagreement::DigestMalformed))?;
            if stored != cards.digest {
                return Err(StoreError::Disagrees(Disagreement::DigestMismatch {
                    cards: cards.records.len(),
                    applied_seq,
                }));
            }
        }
        Ok(Loaded { cards, next_card })
    }

    /// The card's current record.
    pub fn get(&self, id: CardId) -> Option<CardRecord> {
        self.records.get(&id).copied()
    }

    /// Sets the card's record (creating the card), keeps the digest current and marks it to be
    /// written with the next chunk.
    pub fn put(&mut self, id: CardId, record: CardRecord) {
        match self.records.insert(id, record) {
            Some(old) if old == record => {}
            Some(old) => {
                self.digest.remove(id, &old);
                self.digest.add(id, &record);
            }
            None => self.digest.add(id, &record),
        }
        self.dirty.insert(id);
    }

    /// How many cards the shard holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every card, in no particular order (tests and the auditor).
    pub fn iter(&self) -> impl Iterator<Item = (&CardId, &CardRecord)> {
        self.records.iter()
    }

    /// The digest of every record as applied (checkpoints and sled's own copy).
    pub fn digest(&self) -> StateDigest {
        self.digest
    }

    /// Writes the records changed since the last call into `batch`.
    pub fn write_dirty(&mut self, batch: &mut sled::Batch) {
        for id in self.dirty.drain() {
            if let Some(record) = self.records.get(&id) {
                batch.insert(&state::card_key(id)[..], &record.encode()[..]);
            }
        }
    }

    /// Whether any record changed since the last `write_dirty`.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
}
