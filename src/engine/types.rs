//! The engine's inputs and outputs: key material, business limits, shard options, the unit of
//! work and its answer, the start report, and the limits of the shard's own work.

use std::collections::BTreeMap;
use std::path::PathBuf;

use citycard_protocol::{
    Answer, CardResult, HotlistEntry, KeyVersion, NumberedRecord, NumberedResult, OfflineRecord,
    Request,
};
use ring::signature::Ed25519KeyPair;

use super::checkpoint::CheckpointPolicy;
use super::recovery::RebuildReason;
use crate::journal::JournalOptions;

/// Key material the engine needs. Never logged (no Debug).
pub struct Secrets {
    /// Issuer master key per key version.
    pub issuer: BTreeMap<u16, [u8; 32]>,
    /// Version used for cards issued or replaced now.
    pub current_version: KeyVersion,
    /// Key versions that stop working at the given Unix ms.
    pub retire_after_ms: BTreeMap<u16, u64>,
    /// Signs identity assertions.
    pub assertion: Ed25519KeyPair,
}

/// Business limits, each a config value with a reason in `Config`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Highest balance a card may hold (top-ups and deposits above it are declined).
    pub max_balance: i64,
    /// Highest amount of one purchase, top-up or offline record.
    pub max_amount: i64,
    /// How long an identity assertion is valid.
    pub identity_ttl_ms: u64,
    /// Most derived card keys cached per shard (about 250 bytes each).
    pub key_cache_max: usize,
    /// Card records kept in memory per shard (about 90 bytes each); the others are read from
    /// sled when used. See [`super::store::DEFAULT_CACHE_ENTRIES`].
    pub card_cache_entries: usize,
    /// Tap-in holds and reversals (protocol 1.2).
    pub transit: super::decide::transit::TransitLimits,
    /// History older than this many days is not answered online (PROTOCOL.md 6.1,
    /// BeyondRetention).
    pub history_retention_days: u32,
    /// Card products (protocol 1.3) besides the built-in product 0.
    pub products: super::product::Products,
}

impl Limits {
    /// Product `id`'s rules: as configured, or for product 0 when it is not configured the
    /// server-wide limits with no daily limit and no deposit. None for an id the table does
    /// not have (Issue and SetProduct: UnknownProduct).
    pub fn product(&self, id: u8) -> Option<super::product::Product> {
        self.products.configured(id).or_else(|| (id == 0).then(|| self.server_product()))
    }

    /// The rules a card of product `id` is held to: its product, or product 0's when the
    /// operator removed its product from the table (the card keeps its id and deposit).
    pub fn card_product(&self, id: u8) -> super::product::Product {
        self.product(id)
            .or_else(|| self.products.configured(0))
            .unwrap_or_else(|| self.server_product())
    }

    /// Product 0 when the table does not configure it: the server-wide limits, no daily
    /// limit, no deposit.
    fn server_product(&self) -> super::product::Product {
        super::product::Product {
            max_balance: self.max_balance,
            max_amount: self.max_amount,
            daily_amount_limit: None,
            daily_count_limit: None,
            max_fare: self.transit.max_fare,
            deposit: 0,
            replace_deposit: super::product::ReplaceDeposit::Move,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_balance: 100_000,
            max_amount: 50_000,
            identity_ttl_ms: 5 * 60 * 1000,
            key_cache_max: 200_000,
            card_cache_entries: super::store::DEFAULT_CACHE_ENTRIES,
            transit: super::decide::transit::TransitLimits::default(),
            // Thirteen months: a year of statements plus a month to dispute the oldest. Older
            // operations are in the archive and the settlement reports, not in a card walk
            // that every History request would pay for.
            history_retention_days: 396,
            products: super::product::Products::default(),
        }
    }
}

pub struct ShardOptions {
    pub index: u16,
    pub count: u16,
    /// `data/shard-N`: holds `journal/`, `state/` (sled), `checkpoint` and by default
    /// `archive/`.
    pub dir: PathBuf,
    pub journal: JournalOptions,
    pub limits: Limits,
    pub checkpoint: CheckpointPolicy,
    /// Where journal segments below the checkpoint go; None = `dir/archive`.
    pub archive: Option<PathBuf>,
}

impl ShardOptions {
    pub fn archive_dir(&self) -> PathBuf {
        self.archive.clone().unwrap_or_else(|| self.dir.join("archive"))
    }
}

/// One unit of work for a shard.
pub enum Op<'a> {
    Request(&'a Request),
    /// The records of an offline batch that belong to this shard, with their positions.
    Offline(&'a [(u16, OfflineRecord)]),
    /// This shard's hotlist changes after `since`, at most `max`.
    Hotlist {
        since: u64,
        max: usize,
    },
    /// Protocol 1.3: the numbered records of a batch that belong to this shard, with their
    /// positions and whether another shard already holds their seq for this terminal.
    Numbered(&'a [(u16, NumberedRecord, bool)]),
    /// Protocol 1.3: which of these terminal seqs this shard holds for the terminal (the first
    /// phase of a numbered batch, asked of every shard).
    SeqLookup(&'a [u64]),
}

// The single answer is the common case by far; boxing it would cost an allocation per request
// to save a few hundred bytes on the way through the reply channel.
#[allow(clippy::large_enum_variant)]
pub enum Output {
    /// A single request's answer; card answers carry their seal, and their MAC is computed as
    /// the connection encodes them ([`citycard_protocol::Answer`]).
    Response(Answer),
    Offline(Vec<(u16, CardResult)>),
    /// Protocol 1.3: results by position, and the terminal's highest seq in this shard after.
    Numbered {
        results: Vec<(u16, NumberedResult)>,
        highest: u64,
    },
    /// Protocol 1.3: the seqs asked about that this shard holds, and its highest seq.
    /// `complete` false: the shard did not look (refused while replication is stalled).
    SeqLookup {
        held: Vec<u64>,
        highest: u64,
        complete: bool,
    },
    Hotlist {
        version: u64,
        entries: Vec<HotlistEntry>,
        more: bool,
    },
}

/// Most committed entries gathered before they are handed to sled in one batch. Measured at 64
/// terminals: sled costs about 11 us per insert when written per group commit, and coalescing
/// thousands of entries (each hot card written once) cuts server CPU per transaction by a third.
pub(super) const PERSIST_MAX_RECORDS: usize = 4_096;
/// Oldest an unpersisted chunk may get before it is handed to sled anyway (bounds the replay
/// after a crash and the overlay's size at low rates).
pub(super) const PERSIST_INTERVAL_MS: u64 = 500;

/// How far back a card's chain is walked to find the record that used an online ATC. A retry
/// comes within seconds or minutes, so its record is among the card's newest; 256 records cover
/// the whole late-ATC window even with many staff operations and offline records in between,
/// and bound the reads one request can cause.
pub(super) const ATC_LOOKUP_DEPTH: usize = 256;
/// The same for offline records, which are uploaded hours or days after use while the card goes
/// on being used: deeper, because an offline record wrongly refused is money not collected.
pub(super) const OFFLINE_LOOKUP_DEPTH: usize = 4_096;
/// Most records one History request walks (64 full pages).
pub(super) const HISTORY_WALK_MAX: usize = 4_096;

/// What recovery found, for the startup log.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub cards: usize,
    /// Journal records applied at start (all of them when the state was rebuilt).
    pub replayed: u64,
    pub last_seq: u64,
    /// Whether the derived state was rebuilt from the journal; `rebuild` says why.
    pub rebuilt_state: bool,
    /// The checkpoint the journal was read from (0: read from seq 1).
    pub from_checkpoint: u64,
    pub rebuild: Option<RebuildReason>,
}
