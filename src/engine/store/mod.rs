//! A shard's cards: sled's card table behind a bounded cache, with the count, the next card
//! number and the card-state digest kept as cards change, so a start reads three meta keys
//! instead of every card.
//!
//! - Cards are read from sled on first use and kept in a [`cache::CardCache`] of
//!   `card_cache_entries`; a change stays in the cache (pinned) until sled holds it.
//! - A changed card is written to sled with the chunk that changed it (see [`CardStore::seal`]),
//!   together with the count, the digest and the format version, in the same batch as
//!   `applied_seq`.
//! - The digest ([`StateDigest`], a lane-wise sum of SHA-256 per card) is adjusted on every
//!   change; the checkpoint records it.
//! - Whether sled's card records still match that digest is checked by a [`verify`] pass that
//!   runs in small steps after every start while the shard serves (one sled read and one
//!   SHA-256 per card, spread over many batches). A mismatch stops the shard and marks the
//!   state, so the next start rebuilds it from the journal.
//! - The records are in the compact [`codec`] encoding, format [`FORMAT`]: a state written in
//!   another format is rebuilt from the journal, with that reason logged.

pub mod bulk;
pub mod cache;
pub mod codec;
pub mod verify;

use std::collections::HashSet;

use citycard_protocol::CardId;

use super::checkpoint::StateDigest;
use super::error::Disagreement;
use super::state::{self, CardRecord};
use super::StoreError;

/// Format of the card records (and meta keys) in sled. 1: fixed 44-byte records and no
/// format key (before 2026-12-03); 2: [`codec`] records, the count and the format key.
pub const FORMAT: u64 = 2;
/// The format of the state in sled, written with every batch.
pub(crate) const META_FORMAT: &[u8] = b"m:format";
/// How many cards sled's card table holds at `applied_seq`, written with every batch.
pub(crate) const META_CARDS: &[u8] = b"m:cards";
/// Set when a verification pass found sled's cards not matching the digest: the next start
/// rebuilds the state instead of serving it.
pub(crate) const META_SUSPECT: &[u8] = b"m:suspect";

/// Default cards kept in memory per shard. A cached card costs about 90 bytes (record, id,
/// index); 131,072 cards are about 12 MiB per shard and hold a day's active cards of a
/// district, while the rest of a city's cards stay in sled (a miss costs one sled read).
pub const DEFAULT_CACHE_ENTRIES: usize = 131_072;

/// The cards of one shard.
pub struct CardStore {
    db: sled::Db,
    cache: cache::CardCache,
    /// Cards changed since the last [`CardStore::seal`].
    dirty: HashSet<CardId>,
    count: u64,
    /// Allocation counter of the next card this shard issues.
    next_card: u64,
    shard_count: u16,
    digest: StateDigest,
    verify: Option<verify::Pass>,
    /// Cards marked in sled as holding an open hold ([`state::HOLD`]), as of the last seal.
    /// Holds are open only for a ride, so this stays small.
    held: HashSet<CardId>,
}

fn disagrees(what: Disagreement) -> StoreError {
    StoreError::Disagrees(what)
}

fn record_malformed(id: CardId) -> StoreError {
    disagrees(Disagreement::CardRecordMalformed { card: id.masked() })
}

fn read_u64(
    db: &sled::Db,
    key: &'static [u8],
    name: &'static str,
) -> Result<Option<u64>, StoreError> {
    match db.get(key)? {
        Some(v) => {
            state::be_u64(&v).map(Some).ok_or_else(|| disagrees(Disagreement::MetaMalformed(name)))
        }
        None => Ok(None),
    }
}

impl CardStore {
    /// Opens the card table of `db` without reading the cards. A state in another format, or
    /// one a verification pass marked, is refused with [`StoreError::Disagrees`] (the start
    /// then rebuilds it from the journal and logs why).
    pub fn open(
        db: sled::Db,
        shard_count: u16,
        cache_entries: usize,
    ) -> Result<CardStore, StoreError> {
        let has_cards = db.scan_prefix([state::CARD]).next().transpose()?.is_some();
        match read_u64(&db, META_FORMAT, "format")? {
            Some(FORMAT) => {}
            None if !has_cards => {}
            found => {
                return Err(disagrees(Disagreement::OldFormat {
                    found: found.unwrap_or(1),
                    expected: FORMAT,
                }))
            }
        }
        if let Some(why) = db.get(META_SUSPECT)? {
            return Err(disagrees(Disagreement::MarkedBad(
                String::from_utf8_lossy(&why).into_owned(),
            )));
        }
        let count = read_u64(&db, META_CARDS, "count")?.unwrap_or(0);
        let digest = match db.get(state::META_DIGEST)? {
            Some(v) => StateDigest::from_bytes(&v)
                .ok_or_else(|| disagrees(Disagreement::DigestMalformed))?,
            None => StateDigest::default(),
        };
        if has_cards && count == 0 {
            return Err(disagrees(Disagreement::CountMissing));
        }
        // Card keys are big-endian ids, so the last one is the highest card issued.
        let next_card = match db.scan_prefix([state::CARD]).next_back() {
            Some(item) => {
                let (k, _) = item?;
                let id = state::be_u64(&k[1..])
                    .ok_or_else(|| disagrees(Disagreement::CardKeyMalformed))?;
                super::card_counter(CardId(id), shard_count) + 1
            }
            None => 0,
        };
        let mut held = HashSet::new();
        for item in db.scan_prefix([state::HOLD]) {
            let (k, _) = item?;
            let id =
                state::be_u64(&k[1..]).ok_or_else(|| disagrees(Disagreement::CardKeyMalformed))?;
            held.insert(CardId(id));
        }
        Ok(CardStore {
            held,
            db,
            cache: cache::CardCache::new(cache_entries),
            dirty: HashSet::new(),
            count,
            next_card,
            shard_count,
            digest,
            verify: None,
        })
    }

    /// Cards the shard holds (sled and changes not yet in it).
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn next_card(&self) -> u64 {
        self.next_card
    }

    pub fn digest(&self) -> StateDigest {
        self.digest
    }

    /// Cards changed since the last [`CardStore::seal`].
    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// Cards in memory now (cache and pinned changes).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    fn load(&self, id: CardId) -> Result<Option<CardRecord>, StoreError> {
        match self.db.get(state::card_key(id))? {
            Some(v) => codec::decode(&v).map(Some).map_err(|_| record_malformed(id)),
            None => Ok(None),
        }
    }

    /// A card's current record, read from sled into the cache on a miss. `persisted` is the
    /// highest seq sled has applied (which cached changes may be evicted).
    pub fn get(&mut self, id: CardId, persisted: u64) -> Result<Option<CardRecord>, StoreError> {
        if let Some(record) = self.cache.get(id) {
            return Ok(Some(record));
        }
        let found = self.load(id)?;
        if let Some(record) = found {
            self.cache.put(id, record, 0, persisted);
        }
        Ok(found)
    }

    /// A card's current record without caching it (reads that are not the card's traffic).
    pub fn peek(&self, id: CardId) -> Result<Option<CardRecord>, StoreError> {
        match self.cache.peek(id) {
            Some(record) => Ok(Some(record)),
            None => self.load(id),
        }
    }

    /// Records the card's new state, changed by journal record `seq`: kept in the cache until
    /// sled holds it, counted, and folded into the digest.
    pub fn set(
        &mut self,
        id: CardId,
        record: CardRecord,
        seq: u64,
        persisted: u64,
    ) -> Result<(), StoreError> {
        let before = self.get(id, persisted)?;
        if before == Some(record) {
            return Ok(());
        }
        if let Some(old) = &before {
            self.digest.remove(id, old);
        } else {
            self.count += 1;
            self.next_card = self.next_card.max(super::card_counter(id, self.shard_count) + 1);
        }
        self.digest.add(id, &record);
        if let Some(pass) = &mut self.verify {
            pass.changed(id, before.as_ref(), &record);
        }
        self.cache.put(id, record, seq, persisted);
        self.dirty.insert(id);
        Ok(())
    }

    /// Adds the cards changed since the last seal, the count, the digest and the format to
    /// `batch` (the chunk's batch, which also sets `applied_seq`).
    pub fn seal(&mut self, batch: &mut sled::Batch) {
        for id in self.dirty.drain() {
            // A changed card is pinned in the cache until sled applied this batch.
            if let Some(record) = self.cache.peek(id) {
                batch.insert(&state::card_key(id)[..], &*codec::encode(&record));
                if record.hold.is_open() {
                    if self.held.insert(id) {
                        batch.insert(&state::hold_key(id)[..], &[][..]);
                    }
                } else if self.held.remove(&id) {
                    batch.remove(&state::hold_key(id)[..]);
                }
            }
        }
        batch.insert(META_CARDS, &self.count.to_be_bytes()[..]);
        batch.insert(state::META_DIGEST, &self.digest.to_bytes()[..]);
        batch.insert(META_FORMAT, &FORMAT.to_be_bytes()[..]);
    }

    /// Lets the cache shrink back to its capacity once sled holds what was pinned.
    pub fn persisted(&mut self, persisted: u64) {
        self.cache.trim(persisted);
    }

    /// The cards with an open hold, as sled holds them (read at open, for the expiry sweep's
    /// index; changes after that reach the index through apply).
    pub fn open_holds(&self) -> Result<Vec<(CardId, CardRecord)>, StoreError> {
        let mut out = Vec::with_capacity(self.held.len());
        for id in &self.held {
            match self.peek(*id)? {
                Some(record) if record.hold.is_open() => out.push((*id, record)),
                // The mark and the record are written in one batch, so they agree.
                _ => {
                    return Err(disagrees(Disagreement::CardRecordMalformed { card: id.masked() }))
                }
            }
        }
        Ok(out)
    }

    /// Every card, in id order (tests, tools; reads the whole table).
    pub fn all(&self, persisted: u64) -> Result<Vec<(CardId, CardRecord)>, StoreError> {
        let mut cards = std::collections::BTreeMap::new();
        for item in self.db.scan_prefix([state::CARD]) {
            let (k, v) = item?;
            let id = CardId(
                state::be_u64(&k[1..]).ok_or_else(|| disagrees(Disagreement::CardKeyMalformed))?,
            );
            let record = codec::decode(&v).map_err(|_| record_malformed(id))?;
            cards.insert(id, record);
        }
        cards.extend(self.cache.pinned(persisted));
        Ok(cards.into_iter().collect())
    }
}

/// Rounds of epoch reclamation after each sled batch, per 256 writes in it (see
/// [`reclaim_after_batch`]). Each round frees at most 8 bags of 64 deferred objects, and a bag
/// is only freed two epochs after it was sealed, so twice the writes' worth of rounds keeps up
/// with the nodes a batch leaves behind (measured: 1M records rebuilt in flat memory).
const RECLAIM_ROUNDS_PER_256_WRITES: usize = 1;
/// Rounds at least, so that even a small batch lets the epoch advance past its garbage.
const RECLAIM_ROUNDS_MIN: usize = 4;

/// Frees what sled's last batch of `writes` left for later.
///
/// sled 0.34 copies a tree node on every insert and hands the old copy to crossbeam-epoch for
/// freeing later; `apply_batch` does all its inserts under one pin. crossbeam frees at most 512
/// deferred objects per collection, and collects only every 128th pin, so a thread that writes
/// thousands of keys per pin leaves nodes behind faster than they are freed: memory grew by
/// about 1.4 KiB per journal record (2.2 GiB for a rebuild of 1.76M records, 15.4 GiB for
/// 10.76M; heaptrack: `sled::node::Leaf::clone` under `Tree::apply_batch`). Flushing this
/// thread's garbage and collecting a bounded number of times after each batch keeps it flat.
pub fn reclaim_after_batch(writes: usize) {
    let rounds = RECLAIM_ROUNDS_MIN + writes / 256 * RECLAIM_ROUNDS_PER_256_WRITES * 2;
    for _ in 0..rounds {
        // sled 0.34.7 uses crossbeam-epoch's default collector (its `pin` is
        // `crossbeam_epoch::pin`), the one `crossbeam::epoch` names: same crate version.
        crossbeam::epoch::pin().flush();
    }
}
