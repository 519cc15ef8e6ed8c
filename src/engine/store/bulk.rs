//! Bulk filling of one shard's data directory without the server: journal records decided by
//! the engine's own decisions ([`crate::engine::decide`]) and appended with the engine's own
//! [`Entry`] encoding and [`Journal`], then the derived state (card records, op_ref index,
//! count, digest, format, applied seq) written to sled in large sorted batches, and a
//! checkpoint at the last record with the segments below it archived, as a server leaves a
//! shard after a clean stop. For the storage figures (`examples/bulk_fill.rs`): a fill through
//! `Shard::execute` reads and writes sled for every chunk and misses the card cache on most
//! cards, which at tens of millions of records takes hours on a small machine.
//!
//! What it writes is deliberately narrow, so that the derived state can be computed without
//! replaying: issues of product 0 (no card deposit), and purchases and top-ups with fresh ATCs
//! on cards whose product has no daily limit. An operation outside that (a decline, a hotlist
//! change, product fields) is refused with [`BulkError::Refused`] rather than half-handled.
//! `tests/bulk_fill.rs` checks that a shard rebuilt from the journal by the normal replay equals
//! the state written here, card by card and digest for digest.
//!
//! Memory: [`Compact`] per card (24 bytes) and one sled batch; nothing grows with the records.

use std::sync::Arc;

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, CardState, EntryKind, MessageType, Status,
};

use crate::engine::checkpoint::{Checkpoint, StateDigest};
use crate::engine::decide::transit::Hold;
use crate::engine::decide::{self, AtcUse, Context, Decided, Policy};
use crate::engine::entry::Entry;
use crate::engine::product::CardProduct;
use crate::engine::state::{self, CardRecord};
use crate::engine::types::{Secrets, ShardOptions};
use crate::engine::StoreError;
use crate::journal::{Journal, Pos, Start};

/// sled writes per batch when the cards and the op_ref index are written: large enough that
/// millions of cards go in within seconds, small enough that one batch (about 60 bytes a
/// write) and sled's garbage behind it stay a few MiB (the same bound as a prune's seeding).
const BATCH_WRITES: usize = 16_384;

/// sled's page cache while filling: the fill writes keys in order and reads none back, and
/// sled's memory lies far above the bytes this names (1M cards in 2 shards: a 588 MiB peak
/// with the server's 64 MiB per shard, 339 MiB with this).
const FILL_SLED_CACHE_BYTES: u64 = 1024 * 1024;

/// Batches between sled flushes: sled keeps what it has not written out in memory, so the fill
/// flushes every few hundred thousand writes to keep its memory flat in the cards.
const BATCHES_PER_FLUSH: usize = 16;

/// Most records per group commit: the server's own `max_batch` bound.
pub const MAX_GROUP_COMMIT: usize = 65_536;

/// What the fill keeps per card: everything in its [`CardRecord`] that the operations it
/// writes can change. The rest is the same for every card (see [`BulkShard::record_of`]).
#[derive(Clone, Copy)]
struct Compact {
    last_pos: Pos,
    balance: i64,
    last_atc: u32,
}

/// Which card transaction [`BulkShard::card_transaction`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BulkKind {
    Purchase,
    TopUp,
}

/// What [`BulkShard::finish`] wrote.
#[derive(Clone, Copy, Debug)]
pub struct BulkSummary {
    pub cards: u64,
    pub last_seq: u64,
    pub segments_archived: usize,
}

/// One shard being filled. Created on an empty shard directory; [`BulkShard::finish`] leaves it
/// as a server's clean stop would.
pub struct BulkShard {
    options: ShardOptions,
    secrets: Arc<Secrets>,
    journal: Journal,
    db: sled::Db,
    /// The shard's cards by allocation counter (`card_counter`): ids are dense per shard.
    cards: Vec<Compact>,
    /// op_ref index entries of the issues, written to sled as the batch fills.
    index: sled::Batch,
    in_index: usize,
    /// sled batches applied since the last flush.
    batches: usize,
    group_commit: usize,
    in_group: usize,
    scratch: Vec<u8>,
}

/// Why a bulk fill stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BulkError {
    /// An operation the fill does not write (see the module docs), or a bad argument.
    #[error("bulk fill: {0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for BulkError {
    fn from(e: sled::Error) -> Self {
        BulkError::Store(StoreError::Sled(e))
    }
}

impl From<crate::journal::JournalError> for BulkError {
    fn from(e: crate::journal::JournalError) -> Self {
        BulkError::Store(StoreError::Journal(e))
    }
}

fn refused(what: impl Into<String>) -> BulkError {
    BulkError::Refused(what.into())
}

impl BulkShard {
    /// Starts filling `options.dir`, which must hold no journal and no state yet. Records are
    /// committed (fdatasync) every `group_commit` appends, as the shard worker commits a batch.
    pub fn create(
        options: ShardOptions,
        secrets: Arc<Secrets>,
        group_commit: usize,
    ) -> Result<BulkShard, BulkError> {
        if !(1..=MAX_GROUP_COMMIT).contains(&group_commit) {
            return Err(refused(format!("group commit must be 1..={MAX_GROUP_COMMIT}")));
        }
        for sub in ["journal", "state"] {
            let dir = options.dir.join(sub);
            if dir.exists() {
                return Err(refused(format!("{} exists; give an empty shard", dir.display())));
            }
        }
        let journal = Journal::open_at(
            &options.dir.join("journal"),
            options.journal.clone(),
            Start::Full { archive: None },
            |_, _, _| Ok(()),
        )?;
        let db = sled::Config::new()
            .path(options.dir.join("state"))
            .cache_capacity(FILL_SLED_CACHE_BYTES)
            .open()?;
        Ok(BulkShard {
            options,
            secrets,
            journal,
            db,
            cards: Vec::new(),
            index: sled::Batch::default(),
            in_index: 0,
            batches: 0,
            group_commit,
            in_group: 0,
            scratch: Vec::with_capacity(256),
        })
    }

    /// Cards issued so far.
    pub fn cards(&self) -> u64 {
        self.cards.len() as u64
    }

    /// The `k`-th card of this shard (`k < cards()`).
    pub fn card_id(&self, k: u64) -> CardId {
        super::super::card_id_for(self.options.index, self.options.count, k)
    }

    /// A card's balance as the fill left it.
    pub fn balance(&self, k: u64) -> Option<i64> {
        self.cards.get(usize::try_from(k).ok()?).map(|c| c.balance)
    }

    fn context<'a>(&'a self, terminal: &'a str, now_ms: u64) -> Context<'a> {
        Context {
            terminal,
            now_ms,
            policy: Policy {
                limits: &self.options.limits,
                retire_after_ms: &self.secrets.retire_after_ms,
                current_version: self.secrets.current_version,
            },
            hotlist_version: 0,
        }
    }

    /// The full record of a card the fill wrote: issued active with product 0 and the current
    /// key version, changed since only in balance, ATC and chain head.
    fn record_of(&self, card: &Compact) -> CardRecord {
        CardRecord {
            last_pos: card.last_pos,
            balance: Amount(card.balance),
            last_atc: Atc(card.last_atc),
            key_version: self.secrets.current_version,
            state: CardState::Active,
            block_reason: BlockReason::Other,
            hold: Hold::NONE,
            product: CardProduct::DEFAULT,
        }
    }

    /// Appends a decided entry (checked, as the live path checks it) and commits when the group
    /// is full.
    fn append(&mut self, entry: &Entry) -> Result<(u64, Pos), BulkError> {
        let seq = self.journal.next_seq();
        entry.check().map_err(|invariant| StoreError::Invariant { seq, invariant })?;
        entry.encode(&mut self.scratch);
        let appended = self.journal.append_at(&self.scratch)?;
        self.in_group += 1;
        if self.in_group >= self.group_commit {
            self.commit()?;
        }
        Ok(appended)
    }

    /// Makes every appended record durable (the end of a group commit).
    pub fn commit(&mut self) -> Result<(), BulkError> {
        if self.in_group > 0 {
            self.journal.commit()?;
            self.in_group = 0;
        }
        Ok(())
    }

    /// Issues the next card (product 0) by the staff operation `op_ref` of `terminal`.
    pub fn issue(
        &mut self,
        terminal: &str,
        op_ref: u64,
        deposit: Amount,
        now_ms: u64,
    ) -> Result<CardId, BulkError> {
        let new_card = self.card_id(self.cards.len() as u64);
        let decided = decide::staff::issue(
            &self.context(terminal, now_ms),
            op_ref,
            deposit,
            0,
            new_card,
            None,
        );
        let entry = match decided {
            Decided::Record(entry) if entry.status == Status::Approved => entry,
            other => return Err(refused(format!("issue not approved: {other:?}"))),
        };
        if entry.product.is_some() || entry.key_version != self.secrets.current_version {
            return Err(refused("issue with product fields"));
        }
        let (seq, pos) = self.append(&entry)?;
        self.cards.push(Compact { last_pos: pos, balance: entry.balance_after.0, last_atc: 0 });
        self.index.insert(state::op_key(terminal, op_ref), &state::index_value(seq, pos)[..]);
        self.in_index += 1;
        if self.in_index >= BATCH_WRITES {
            self.write_index()?;
        }
        Ok(new_card)
    }

    fn write_index(&mut self) -> Result<(), BulkError> {
        if self.in_index > 0 {
            let batch = std::mem::take(&mut self.index);
            self.apply(batch, self.in_index)?;
            self.in_index = 0;
        }
        Ok(())
    }

    /// Applies one batch of `writes` keys, flushing sled every [`BATCHES_PER_FLUSH`].
    fn apply(&mut self, batch: sled::Batch, writes: usize) -> Result<(), BulkError> {
        self.db.apply_batch(batch)?;
        super::reclaim_after_batch(writes);
        self.batches += 1;
        if self.batches >= BATCHES_PER_FLUSH {
            self.db.flush()?;
            self.batches = 0;
        }
        Ok(())
    }

    /// A purchase or top-up of `amount` on card `k` from `terminal`, with the card's next ATC
    /// and a request cryptogram made with its real derived key (the entry's binding). Returns
    /// the card's balance after it. Anything but an approval is refused (see the module docs).
    pub fn card_transaction(
        &mut self,
        terminal: &str,
        kind: BulkKind,
        k: u64,
        amount: Amount,
        nonce: u64,
        now_ms: u64,
    ) -> Result<i64, BulkError> {
        let slot = usize::try_from(k)
            .ok()
            .filter(|&i| i < self.cards.len())
            .ok_or_else(|| refused(format!("card {k} not issued")))?;
        let card_id = self.card_id(k);
        let compact = self.cards[slot];
        let record = self.record_of(&compact);
        let version = self.secrets.current_version;
        let master = self
            .secrets
            .issuer
            .get(&version.0)
            .ok_or_else(|| refused("no issuer key for the current version"))?;
        let atc = Atc(compact.last_atc + 1);
        let (message_type, entry_kind) = match kind {
            BulkKind::Purchase => (MessageType::Purchase, EntryKind::Purchase),
            BulkKind::TopUp => (MessageType::TopUp, EntryKind::TopUp),
        };
        let key = CardKey::derive(master, version, card_id);
        let cryptogram =
            key.request_cryptogram(message_type as u8, card_id, atc, amount, nonce, terminal);
        let auth = CardAuth { card_id, atc, nonce, cryptogram };
        let ctx = self.context(terminal, now_ms);
        let decided =
            decide::money::decide(&ctx, entry_kind, &auth, amount, &record, AtcUse::Fresh);
        let mut entry = match decided {
            Decided::Record(entry) if entry.status == Status::Approved => entry,
            other => return Err(refused(format!("transaction not approved: {other:?}"))),
        };
        if entry.product.is_some() || entry.hotlist_version != 0 {
            return Err(refused("transaction with product fields or a hotlist change"));
        }
        entry.prev_pos = compact.last_pos;
        let (_, pos) = self.append(&entry)?;
        self.cards[slot] =
            Compact { last_pos: pos, balance: entry.balance_after.0, last_atc: atc.0 };
        Ok(entry.balance_after.0)
    }

    /// Commits the rest, writes the derived state to sled (cards in id order, count, digest,
    /// format, applied seq), flushes it, then takes the checkpoint and archives the segments
    /// below it, as a checkpoint on the live path does.
    pub fn finish(mut self) -> Result<BulkSummary, BulkError> {
        self.commit()?;
        self.write_index()?;
        let last_seq = self.journal.last_committed_seq();
        let mut digest = StateDigest::default();
        let mut batch = sled::Batch::default();
        let mut in_batch = 0usize;
        for k in 0..self.cards.len() {
            let id = self.card_id(k as u64);
            let record = self.record_of(&self.cards[k]);
            digest.add(id, &record);
            batch.insert(&state::card_key(id)[..], &*super::codec::encode(&record));
            in_batch += 1;
            if in_batch == BATCH_WRITES {
                self.apply(std::mem::take(&mut batch), in_batch)?;
                in_batch = 0;
            }
        }
        let count = self.cards.len() as u64;
        batch.insert(super::META_CARDS, &count.to_be_bytes()[..]);
        batch.insert(state::META_DIGEST, &digest.to_bytes()[..]);
        batch.insert(super::META_FORMAT, &super::FORMAT.to_be_bytes()[..]);
        batch.insert(state::META_APPLIED, &last_seq.to_be_bytes()[..]);
        self.db.apply_batch(batch)?;
        super::reclaim_after_batch(in_batch + 4);
        self.db.flush()?;
        let mut segments_archived = 0;
        if last_seq > 0 {
            let checkpoint = Checkpoint {
                seq: last_seq,
                hash: self.journal.last_hash(),
                digest,
                cards: u32::try_from(count).unwrap_or(u32::MAX),
            };
            let shard_dir = &self.options.dir;
            checkpoint
                .store(shard_dir)
                .map_err(|source| StoreError::Io { path: shard_dir.clone(), source })?;
            segments_archived = crate::journal::archive_below_on(
                &self.options.journal.storage,
                &shard_dir.join("journal"),
                &self.options.archive_dir(),
                last_seq,
            )?;
        }
        Ok(BulkSummary { cards: count, last_seq, segments_archived })
    }
}
