//! One shard: its journal (the truth), its sled database (derived state), its cards in memory,
//! and the decision logic for every operation.
//!
//! The call pattern is: [`Shard::execute`] for each command of a batch (decisions see the
//! effects of earlier commands in the same batch), then [`Shard::commit`] (one journal sync),
//! then send the replies, then [`Shard::persist_due`]. sled is written behind, by a persister
//! thread, in large coalesced batches: committed entries stay in an in-memory overlay that
//! every read consults until sled has confirmed them. Nothing decided is visible
//! to anyone before `commit` returns Ok.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use citycard_protocol::crypto::{assertion_bytes, staff_binding, CardKey};
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, CardResult, CardState, EntryKind, HistoryEntry,
    HistoryPage, HotlistEntry, IdentityResult, IssueResult, KeyVersion, Mac, MessageType,
    OfflineRecord, Request, Response, StaffResult, Status, ATC_LATE_WINDOW, MAX_HISTORY_PAGE,
};
use ring::signature::Ed25519KeyPair;

use super::checkpoint::{Checkpoint, CheckpointPolicy, StateDigest};
use super::overlay::Overlay;
use super::persister::{CheckpointPlace, PersistJob, Persister};
use crate::journal::{JournalFiles, Pos, Start};

use super::entry::{Entry, EntryError, HotlistChange};
use super::recovery::{self, RebuildReason, Verdict};
use super::state::{self, CardRecord};
use crate::journal::{Journal, JournalError, JournalOptions};

/// Storage failures. Every one of them is fail-stop for the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("journal record {seq}: {source}")]
    Entry { seq: u64, source: EntryError },
    #[error("derived state inconsistent: {0}")]
    State(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The derived state opens but does not match what it records about itself (its card
    /// digest): it is rebuilt from the journal, never trusted.
    #[error("derived state disagrees with itself: {0}")]
    Disagrees(String),
    /// The environment failed the derived state (disk full, I/O error, no permission,
    /// read-only filesystem): the data is not at fault, so nothing was rebuilt or moved.
    #[error(
        "storage error on {}: {cause} (not corruption: the state was left in place; {})",
        path.display(),
        super::recovery::operator_hint(cause)
    )]
    Storage { path: PathBuf, cause: std::io::Error },
}

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_balance: 100_000,
            max_amount: 50_000,
            identity_ttl_ms: 5 * 60 * 1000,
            key_cache_max: 200_000,
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
}

pub enum Output {
    Response(Response),
    Offline(Vec<(u16, CardResult)>),
    Hotlist { version: u64, entries: Vec<HotlistEntry>, more: bool },
}

/// Most committed entries gathered before they are handed to sled in one batch. Measured at 64
/// terminals: sled costs about 11 us per insert when written per group commit, and coalescing
/// thousands of entries (each hot card written once) cuts server CPU per transaction by a third.
const PERSIST_MAX_RECORDS: usize = 4_096;
/// Oldest an unpersisted chunk may get before it is handed to sled anyway (bounds the replay
/// after a crash and the overlay's size at low rates).
const PERSIST_INTERVAL: Duration = Duration::from_millis(500);
/// Longest a synchronous persist (shutdown, replay) waits for sled before it is an error: a few
/// chunks take well under a second, so two minutes means sled is stuck.
const PERSIST_WAIT: Duration = Duration::from_secs(120);

/// How far back a card's chain is walked to find the record that used an online ATC. A retry
/// comes within seconds or minutes, so its record is among the card's newest; 256 records cover
/// the whole late-ATC window even with many staff operations and offline records in between,
/// and bound the reads one request can cause.
const ATC_LOOKUP_DEPTH: usize = 256;
/// The same for offline records, which are uploaded hours or days after use while the card goes
/// on being used: deeper, because an offline record wrongly refused is money not collected.
const OFFLINE_LOOKUP_DEPTH: usize = 4_096;
/// Most records one History request walks (64 full pages).
const HISTORY_WALK_MAX: usize = 4_096;

/// What walking a card's chain found for an ATC.
enum AtcLookup {
    Used(u64, Entry),
    /// The whole chain was walked: never used.
    Unused,
    /// The walk stopped at its depth: not known.
    Unknown,
}

/// What a consuming card request's ATC is, for the exactly-once rules.
enum AtcUse {
    /// Not used: decide the request.
    Fresh,
    /// Used by this journaled entry: a retry of the same request, or a replay.
    Used(u64, Entry),
    /// Not used, but too far below the card's last ATC: a replay.
    Stale,
}

/// The thread that applies sealed chunks to sled, in order.
pub struct Shard {
    index: u16,
    count: u16,
    limits: Limits,
    secrets: Arc<Secrets>,
    /// None only while recovery replays into a shard being opened.
    journal: Option<Journal>,
    db: sled::Db,
    cards: HashMap<CardId, CardRecord>,
    keys: HashMap<(CardId, KeyVersion), CardKey>,
    hotlist_version: u64,
    /// Allocation counter of the next card id this shard issues.
    next_card: u64,
    /// Highest seq handed to sled (the persister may still be writing it).
    applied_seq: u64,
    overlay: Overlay,
    /// Cards changed since the last chunk was sealed.
    dirty: HashSet<CardId>,
    persister: Persister,
    scratch: Vec<u8>,
    /// Digest of every card record as applied (kept current by `apply`).
    digest: StateDigest,
    place: CheckpointPlace,
    /// Reads committed records by position (history pages, retries, staff op lookups).
    files: JournalFiles,
    checkpoint_policy: CheckpointPolicy,
    /// Seq of the last checkpoint handed to the persister, and when.
    checkpoint_seq: u64,
    checkpoint_at: Instant,
}

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

impl Shard {
    /// Opens the shard, replaying journal records that sled has not applied. The journal is
    /// read from the last checkpoint when the derived state is at or past it; otherwise (no
    /// checkpoint, a state rebuilt from nothing) from seq 1, archive first. A state that sled
    /// reports as corrupt, that fails its checks (its card digest included), that is ahead of
    /// the journal, or whose checkpoint the journal does not pass through is moved aside and
    /// rebuilt; a missing or empty one is rebuilt in place. A failure of the environment (disk
    /// full, I/O error, permissions) stops with [`StoreError::Storage`] and leaves the state
    /// untouched (see [`super::recovery`]).
    pub fn open(
        options: ShardOptions,
        secrets: Arc<Secrets>,
    ) -> Result<(Shard, OpenReport), StoreError> {
        let journal_dir = options.dir.join("journal");
        let state_dir = options.dir.join("state");
        let archive_dir = options.archive_dir();
        std::fs::create_dir_all(&journal_dir)
            .map_err(|source| StoreError::Io { path: journal_dir.clone(), source })?;
        let mut checkpoint = match Checkpoint::load(&options.dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(shard = options.index, error = %e, "checkpoint unusable; reading the whole journal");
                None
            }
        };
        let mut rebuild: Option<RebuildReason> = None;
        // Three rounds at most: a damaged state is set aside in the first; a checkpoint or
        // state the journal disagrees with in the first or second; the last starts from an
        // empty state without a checkpoint, which can disagree with nothing.
        for _round in 0..3 {
            let opened = recovery::open_sled(&state_dir)
                .and_then(|db| Shard::from_db(&options, secrets.clone(), db));
            let mut shard = match opened {
                Ok(shard) => shard,
                Err(e) => match recovery::classify(e, &state_dir) {
                    Verdict::Rebuild(reason) if rebuild.is_none() => {
                        tracing::warn!(shard = options.index, state = %state_dir.display(), reason = reason.label(), detail = %reason, "derived state is damaged; rebuilding it from the journal");
                        recovery::move_aside(&state_dir)?;
                        rebuild = Some(reason);
                        continue;
                    }
                    Verdict::Rebuild(reason) => {
                        return Err(StoreError::State(format!("fresh state unusable: {reason}")))
                    }
                    Verdict::Stop(e) => return Err(e),
                },
            };
            let applied_before = shard.applied_seq;
            let start = match checkpoint {
                Some(cp) if applied_before >= cp.seq => Start::Anchor(cp.anchor()),
                _ => Start::Full { archive: Some(&archive_dir) },
            };
            let mut replayed = 0u64;
            let mut replay_error: Option<StoreError> = None;
            let opened = Journal::open_at(
                &journal_dir,
                options.journal.clone(),
                start,
                |seq, pos, payload| {
                    if seq <= applied_before || replay_error.is_some() {
                        return Ok(());
                    }
                    if let Err(e) = shard.replay_record(seq, pos, payload) {
                        replay_error = Some(e);
                    }
                    replayed += 1;
                    Ok(())
                },
            );
            let journal = match opened {
                Ok(journal) => journal,
                Err(JournalError::AnchorMismatch { seq, reason }) => {
                    let reason = RebuildReason::CheckpointDisagrees(format!("seq {seq}: {reason}"));
                    tracing::warn!(shard = options.index, state = %state_dir.display(), reason = reason.label(), detail = %reason, "checkpoint disagrees with the journal; rebuilding the state from the whole journal");
                    drop(shard);
                    recovery::move_aside(&state_dir)?;
                    rebuild = Some(reason);
                    checkpoint = None;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(e) = replay_error {
                return Err(e);
            }
            let last_seq = journal.next_seq() - 1;
            shard.journal = Some(journal);
            if applied_before > last_seq {
                let reason =
                    RebuildReason::AheadOfJournal { applied_seq: applied_before, last_seq };
                tracing::warn!(shard = options.index, state = %state_dir.display(), reason = reason.label(), detail = %reason, "derived state is ahead of the journal; rebuilding it from the journal");
                drop(shard);
                recovery::move_aside(&state_dir)?;
                rebuild = Some(reason);
                checkpoint = None;
                continue;
            }
            if rebuild.is_none() && applied_before == 0 && replayed > 0 {
                rebuild = Some(RebuildReason::Missing);
            }
            shard.persist()?;
            let from_checkpoint = match start {
                Start::Anchor(a) => a.seq,
                Start::Full { .. } | Start::Pruned { .. } => 0,
            };
            // A start that replayed a long stretch records where it got to, so the next one
            // does not replay it again.
            if checkpoint.is_none_or(|cp| cp.seq < last_seq) {
                shard.checkpoint_now()?;
            }
            let report = OpenReport {
                cards: shard.cards.len(),
                replayed,
                last_seq,
                rebuilt_state: rebuild.is_some(),
                from_checkpoint,
                rebuild,
            };
            return Ok((shard, report));
        }
        Err(StoreError::State("state still disagrees with the journal after a rebuild".into()))
    }

    fn from_db(
        options: &ShardOptions,
        secrets: Arc<Secrets>,
        db: sled::Db,
    ) -> Result<Shard, StoreError> {
        let applied_seq = match db.get(state::META_APPLIED)? {
            Some(v) => state::be_u64(&v)
                .ok_or_else(|| StoreError::State("applied_seq malformed".into()))?,
            None => 0,
        };
        let mut cards = HashMap::new();
        let mut next_card = 0u64;
        let mut digest = StateDigest::default();
        for item in db.scan_prefix([state::CARD]) {
            let (k, v) = item?;
            let id = state::be_u64(&k[1..])
                .ok_or_else(|| StoreError::Disagrees("card key malformed".into()))?;
            let record = CardRecord::decode(&v)
                .ok_or_else(|| StoreError::Disagrees(format!("card record {id} malformed")))?;
            next_card = next_card.max(super::card_counter(CardId(id), options.count) + 1);
            digest.add(CardId(id), &record);
            cards.insert(CardId(id), record);
        }
        // The digest sled wrote with its applied_seq must match the cards it holds: a state
        // that lost or changed card records is rebuilt, not served. (A state written before
        // digests existed has none; it is checked from the next chunk on.)
        if let Some(stored) = db.get(state::META_DIGEST)? {
            let stored = StateDigest::from_bytes(&stored)
                .ok_or_else(|| StoreError::Disagrees("card digest malformed".into()))?;
            if stored != digest {
                return Err(StoreError::Disagrees(format!(
                    "the {} card records do not match the card digest recorded at seq {applied_seq}",
                    cards.len()
                )));
            }
        }
        let hotlist_version = match db.scan_prefix([state::HOTLIST]).next_back() {
            Some(item) => state::be_u64(&item?.0[1..])
                .ok_or_else(|| StoreError::State("hotlist key malformed".into()))?,
            None => 0,
        };
        let place = CheckpointPlace {
            shard_dir: options.dir.clone(),
            journal_dir: options.dir.join("journal"),
            archive_dir: options.archive_dir(),
        };
        let persister = Persister::start(
            db.clone(),
            options.index,
            applied_seq,
            options.dir.join("state"),
            place.clone(),
        )?;
        Ok(Shard {
            index: options.index,
            count: options.count,
            limits: options.limits,
            secrets,
            journal: None,
            db,
            cards,
            keys: HashMap::new(),
            hotlist_version,
            next_card,
            applied_seq,
            overlay: Overlay::default(),
            dirty: HashSet::new(),
            persister,
            scratch: Vec::with_capacity(256),
            digest,
            files: JournalFiles::new(options.dir.join("journal"), options.archive_dir()),
            place,
            checkpoint_policy: options.checkpoint,
            checkpoint_seq: applied_seq,
            checkpoint_at: Instant::now(),
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// Installs new key material (issuer key rotation). Cached card keys stay valid: a card's
    /// key depends only on its own key version, which never changes.
    pub fn replace_secrets(&mut self, secrets: Arc<Secrets>) {
        self.secrets = secrets;
    }

    pub fn hotlist_version(&self) -> u64 {
        self.hotlist_version
    }

    /// A card's current record (tests and the auditor).
    pub fn card(&self, id: CardId) -> Option<CardRecord> {
        self.cards.get(&id).copied()
    }

    pub fn cards(&self) -> impl Iterator<Item = (&CardId, &CardRecord)> {
        self.cards.iter()
    }

    /// Records decided but not yet committed.
    pub fn pending(&self) -> usize {
        self.journal.as_ref().map_or(0, Journal::pending)
    }

    fn journal(&mut self) -> Result<&mut Journal, StoreError> {
        self.journal.as_mut().ok_or_else(|| StoreError::State("journal not open".into()))
    }

    /// Makes every decided record durable with one sync. Err is fail-stop.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        self.journal()?.commit()?;
        Ok(())
    }

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
    fn checkpoint_due(&mut self, last_seq: u64) -> Option<Checkpoint> {
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

    fn checkpoint_at_seq(&self, seq: u64, hash: crate::journal::RecordHash) -> Checkpoint {
        Checkpoint {
            seq,
            hash,
            digest: self.digest,
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
    fn seal(&mut self) -> Result<(), StoreError> {
        if self.pending() > 0 {
            return Err(StoreError::State("persist before commit".into()));
        }
        let Some(chunk) = self.overlay.chunks.back_mut().filter(|c| c.sealed_at.is_none()) else {
            return Ok(());
        };
        if chunk.entries.is_empty() && self.dirty.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut last_seq = self.applied_seq;
        for p in &chunk.entries {
            write_index(&mut batch, &p.entry, p.seq, p.pos);
            last_seq = last_seq.max(p.seq);
        }
        for id in self.dirty.drain() {
            if let Some(record) = self.cards.get(&id) {
                batch.insert(&state::card_key(id)[..], &record.encode()[..]);
            }
        }
        batch.insert(state::META_APPLIED, &last_seq.to_be_bytes()[..]);
        batch.insert(state::META_DIGEST, &self.digest.to_bytes()[..]);
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

    fn replay_record(&mut self, seq: u64, pos: Pos, payload: &[u8]) -> Result<(), StoreError> {
        let entry = Entry::decode(payload).map_err(|source| StoreError::Entry { seq, source })?;
        self.apply(seq, pos, entry);
        // Bound the replay batch so a long journal tail does not build one giant sled batch.
        if self.overlay.current().is_some_and(|c| c.entries.len() >= PERSIST_MAX_RECORDS) {
            self.seal()?;
            self.overlay.trim(self.persister.done());
        }
        Ok(())
    }

    /// Applies a decided entry to memory and queues its sled writes. Shared by the live path
    /// and replay, so both produce the same state.
    fn apply(&mut self, seq: u64, pos: Pos, entry: Entry) {
        let touched = [entry.card_id, entry.other_card];
        let before = touched.map(|id| self.cards.get(&id).copied());
        let approved = entry.status == Status::Approved;
        match entry.kind {
            EntryKind::Issue if approved => {
                self.cards.insert(
                    entry.card_id,
                    CardRecord {
                        state: CardState::Active,
                        block_reason: BlockReason::Other,
                        balance: entry.balance_after,
                        last_atc: Atc(0),
                        key_version: entry.key_version,
                        issued_ms: entry.time_ms,
                        linked_card: CardId(0),
                        last_pos: pos,
                    },
                );
                self.next_card =
                    self.next_card.max(super::card_counter(entry.card_id, self.count) + 1);
                self.dirty.insert(entry.card_id);
            }
            EntryKind::ReplacedOut if approved => {
                let moved = entry.amount.0.saturating_neg();
                if let Some(old) = self.cards.get_mut(&entry.card_id) {
                    old.state = CardState::Replaced;
                    old.balance = entry.balance_after;
                    old.linked_card = entry.other_card;
                    old.last_pos = pos;
                }
                self.cards.insert(
                    entry.other_card,
                    CardRecord {
                        state: CardState::Active,
                        block_reason: BlockReason::Other,
                        balance: Amount(moved),
                        last_atc: Atc(0),
                        key_version: entry.key_version,
                        issued_ms: entry.time_ms,
                        linked_card: entry.card_id,
                        // The replacement's chain starts at the record that created it.
                        last_pos: pos,
                    },
                );
                self.next_card =
                    self.next_card.max(super::card_counter(entry.other_card, self.count) + 1);
                self.dirty.insert(entry.card_id);
                self.dirty.insert(entry.other_card);
            }
            _ => {
                if let Some(card) = self.cards.get_mut(&entry.card_id) {
                    card.last_pos = pos;
                    if entry.uses_atc() {
                        card.last_atc = card.last_atc.max(entry.atc);
                    }
                    if approved {
                        card.balance = entry.balance_after;
                        match entry.kind {
                            EntryKind::Block => {
                                card.state = CardState::Blocked;
                                card.block_reason = block_reason_of(&entry, card.block_reason);
                            }
                            EntryKind::Unblock => card.state = CardState::Active,
                            EntryKind::Close => card.state = CardState::Closed,
                            _ => {}
                        }
                    }
                    self.dirty.insert(entry.card_id);
                }
            }
        }
        for (i, id) in touched.into_iter().enumerate() {
            if id.0 == 0 || (i == 1 && id == touched[0]) {
                continue;
            }
            let after = self.cards.get(&id);
            if before[i].as_ref() == after {
                continue;
            }
            if let Some(old) = &before[i] {
                self.digest.remove(id, old);
            }
            if let Some(new) = after {
                self.digest.add(id, new);
            }
        }
        if entry.hotlist_version != 0 {
            self.hotlist_version = self.hotlist_version.max(entry.hotlist_version);
        }
        self.overlay.push(seq, pos, entry);
    }

    /// Decides `op`, journals the outcome (in memory until `commit`), and returns the answer.
    pub fn execute(
        &mut self,
        terminal: &str,
        op: Op<'_>,
        now_ms: u64,
    ) -> Result<Output, StoreError> {
        match op {
            Op::Request(request) => self.request(terminal, request, now_ms).map(Output::Response),
            Op::Offline(records) => {
                let mut results = Vec::with_capacity(records.len());
                for (position, record) in records {
                    results.push((*position, self.offline(terminal, record, now_ms)?));
                }
                Ok(Output::Offline(results))
            }
            Op::Hotlist { since, max } => self.hotlist(since, max),
        }
    }

    fn request(
        &mut self,
        terminal: &str,
        request: &Request,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        match request {
            Request::Purchase { auth, amount } => {
                self.money(terminal, request.message_type(), auth, *amount, now_ms)
            }
            Request::TopUp { auth, amount } => {
                self.money(terminal, request.message_type(), auth, *amount, now_ms)
            }
            Request::Balance { auth } => self.balance(terminal, auth, now_ms),
            Request::History { auth, before_seq, limit } => {
                self.history(terminal, auth, *before_seq, *limit, now_ms)
            }
            Request::Identity { auth } => self.identity(terminal, auth, now_ms),
            Request::Issue { op_ref, deposit } => self.issue(terminal, *op_ref, *deposit, now_ms),
            Request::Block { op_ref, card_id, reason } => {
                self.staff(terminal, EntryKind::Block, *op_ref, *card_id, Some(*reason), now_ms)
            }
            Request::Unblock { op_ref, card_id } => {
                self.staff(terminal, EntryKind::Unblock, *op_ref, *card_id, None, now_ms)
            }
            Request::Close { op_ref, card_id } => {
                self.staff(terminal, EntryKind::Close, *op_ref, *card_id, None, now_ms)
            }
            Request::Replace { op_ref, card_id } => {
                self.replace(terminal, *op_ref, *card_id, now_ms)
            }
            Request::Hello { .. } | Request::OfflineBatch { .. } | Request::HotlistSync { .. } => {
                Err(StoreError::State("connection-level request routed to a shard".into()))
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Keys and authentication.

    fn card_key(&mut self, card: CardId, version: KeyVersion) -> Option<CardKey> {
        if let Some(key) = self.keys.get(&(card, version)) {
            return Some(key.clone());
        }
        let master = self.secrets.issuer.get(&version.0)?;
        let key = CardKey::derive(master, version, card);
        if self.keys.len() >= self.limits.key_cache_max {
            // Crude but bounded: a full cache starts over rather than tracking recency.
            self.keys.clear();
        }
        self.keys.insert((card, version), key.clone());
        Some(key)
    }

    /// Checks the card exists and the cryptogram verifies. On failure returns the decline
    /// status (never journaled, never consumes the ATC).
    fn authenticate(
        &mut self,
        terminal: &str,
        message_type: MessageType,
        auth: &CardAuth,
        amount: Amount,
    ) -> Result<(CardRecord, CardKey), Status> {
        let Some(card) = self.cards.get(&auth.card_id).copied() else {
            return Err(Status::UnknownCard);
        };
        let Some(key) = self.card_key(auth.card_id, card.key_version) else {
            tracing::error!(card = %auth.card_id.masked(), key_version = card.key_version.0, "no issuer key for the card's key version");
            return Err(Status::KeyVersionRetired);
        };
        let expected = key.request_cryptogram(
            message_type as u8,
            auth.card_id,
            auth.atc,
            amount,
            auth.nonce,
            terminal,
        );
        if !CardKey::verify(&expected, &auth.cryptogram) {
            tracing::warn!(card = %auth.card_id.masked(), terminal, "bad cryptogram");
            return Err(Status::BadCryptogram);
        }
        Ok((card, key))
    }

    /// Whether a consuming card request's ATC is new, was used, or is too old (PROTOCOL.md 6.1).
    /// A used ATC is found in the (card, ATC) index whatever its age, so a retry always gets
    /// its original answer. An unused ATC at or below the card's last one is still new within
    /// [`ATC_LATE_WINDOW`]: a request answered Busy or Unavailable was never done, and a later
    /// ATC of the same card may have been decided in the meantime. ATC 0 is never valid (a new
    /// card's last ATC is 0, so its first online ATC is 1).
    fn atc_use(&mut self, card: &CardRecord, auth: &CardAuth) -> Result<AtcUse, StoreError> {
        if auth.atc > card.last_atc {
            return Ok(AtcUse::Fresh);
        }
        match self.atc_entry(auth.card_id, auth.atc, ATC_LOOKUP_DEPTH)? {
            AtcLookup::Used(seq, entry) => Ok(AtcUse::Used(seq, entry)),
            AtcLookup::Unused
                if auth.atc.0 != 0 && card.last_atc.0 - auth.atc.0 < ATC_LATE_WINDOW =>
            {
                Ok(AtcUse::Fresh)
            }
            // Not provably unused (too old, or deeper than the walk goes): never decide it.
            AtcLookup::Unused | AtcLookup::Unknown => Ok(AtcUse::Stale),
        }
    }

    fn key_retired(&self, card: &CardRecord, now_ms: u64) -> bool {
        self.secrets
            .retire_after_ms
            .get(&card.key_version.0)
            .is_some_and(|cutoff| now_ms >= *cutoff)
    }

    /// The record at `pos`: from the overlay while it may not be committed yet, otherwise
    /// from the journal files.
    fn record_at(&mut self, pos: Pos) -> Result<(u64, Entry), StoreError> {
        if let Some(p) = self.overlay.at(pos) {
            return Ok((p.seq, p.entry.clone()));
        }
        let (seq, payload) = self.files.read(pos)?;
        let entry = Entry::decode(payload).map_err(|source| StoreError::Entry { seq, source })?;
        Ok((seq, entry))
    }

    /// Walks `card`'s chain of journal records, newest first, calling `visit` until it returns
    /// false, the chain ends, or `max` records were seen. Returns whether the chain ended, that
    /// is whether every record of the card was seen.
    fn walk_card(
        &mut self,
        card: CardId,
        max: usize,
        mut visit: impl FnMut(u64, &Entry) -> bool,
    ) -> Result<bool, StoreError> {
        let mut cur = self.cards.get(&card).map_or(Pos::NONE, |c| c.last_pos);
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
                return Err(StoreError::State(format!(
                    "the chain of card {} passes through seq {seq}, a record of another card",
                    card.masked()
                )));
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
    fn atc_entry(&mut self, card: CardId, atc: Atc, depth: usize) -> Result<AtcLookup, StoreError> {
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

    fn op_entry(
        &mut self,
        terminal: &str,
        op_ref: u64,
    ) -> Result<Option<(u64, Entry)>, StoreError> {
        if let Some(p) = self.overlay.op(terminal, op_ref) {
            return Ok(Some((p.seq, p.entry.clone())));
        }
        let Some(value) = self.db.get(state::op_key(terminal, op_ref))? else {
            return Ok(None);
        };
        let (seq, pos) = state::parse_index_value(&value)
            .ok_or_else(|| StoreError::State("op_ref index value malformed".into()))?;
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
            return Err(StoreError::State(format!(
                "op_ref index points at seq {seq} but the journal holds seq {found} there"
            )));
        }
        Ok(Some((seq, entry)))
    }

    fn journal_entry(&mut self, mut entry: Entry) -> Result<u64, StoreError> {
        // Link the card's chain: the new record points at the card's previous one.
        entry.prev_pos = self.cards.get(&entry.card_id).map_or(Pos::NONE, |c| c.last_pos);
        entry.encode(&mut self.scratch);
        let scratch = std::mem::take(&mut self.scratch);
        let appended = self.journal().and_then(|j| Ok(j.append_at(&scratch)?));
        self.scratch = scratch;
        let (seq, pos) = appended?;
        self.apply(seq, pos, entry);
        Ok(seq)
    }

    fn next_hotlist(
        &mut self,
        before: Option<BlockReason>,
        after: &CardRecord,
    ) -> (u64, HotlistChange) {
        let change = match (before, after.hotlisted()) {
            (None, None) => HotlistChange::None,
            (Some(a), Some(b)) if a == b => HotlistChange::None,
            (_, Some(reason)) => HotlistChange::Listed(reason),
            (Some(reason), None) => HotlistChange::Unlisted(reason),
        };
        if change == HotlistChange::None {
            (0, change)
        } else {
            (self.hotlist_version + 1, change)
        }
    }

    // -----------------------------------------------------------------------------------------
    // Card transactions.

    fn money(
        &mut self,
        terminal: &str,
        message_type: MessageType,
        auth: &CardAuth,
        amount: Amount,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let kind = if message_type == MessageType::Purchase {
            EntryKind::Purchase
        } else {
            EntryKind::TopUp
        };
        let wrap = |r: CardResult| {
            if kind == EntryKind::Purchase {
                Response::Purchase(r)
            } else {
                Response::TopUp(r)
            }
        };
        let (card, key) = match self.authenticate(terminal, message_type, auth, amount) {
            Ok(found) => found,
            Err(status) => return Ok(wrap(unauthenticated(status, auth))),
        };
        let earlier = match self.atc_use(&card, auth)? {
            AtcUse::Fresh => None,
            AtcUse::Used(seq, e) if e.kind == kind && e.binding == auth.cryptogram => {
                Some(card_result(&e, seq))
            }
            AtcUse::Used(..) | AtcUse::Stale => {
                tracing::warn!(card = %auth.card_id.masked(), terminal, atc = auth.atc.0, "replayed counter declined");
                Some(CardResult { balance: card.balance, ..unauthenticated(Status::Replay, auth) })
            }
        };
        if let Some(result) = earlier {
            return Ok(wrap(self.seal_card(&key, message_type, &auth.cryptogram, result)));
        }
        let status = self.money_status(&card, kind, amount, now_ms);
        let mut after = card;
        if status == Status::Approved {
            after.balance = Amount(if kind == EntryKind::Purchase {
                card.balance.0 - amount.0
            } else {
                card.balance.0 + amount.0
            });
        }
        let (hotlist_version, hotlist_change) = self.next_hotlist(card.hotlisted(), &after);
        let entry = Entry {
            kind,
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            amount: Amount(after.balance.0 - card.balance.0),
            balance_after: after.balance,
            time_ms: now_ms,
            reference: auth.nonce,
            binding: auth.cryptogram,
            other_card: CardId(0),
            key_version: card.key_version,
            hotlist_version,
            hotlist_change,
            extra: amount.0,
            terminal: terminal.to_owned(),
            prev_pos: Pos::NONE,
        };
        // The answer is read off the entry before it moves into the journal (no clone on the
        // per-transaction path).
        let mut result = card_result(&entry, 0);
        result.journal_seq = self.journal_entry(entry)?;
        Ok(wrap(self.seal_card(&key, message_type, &auth.cryptogram, result)))
    }

    fn money_status(
        &self,
        card: &CardRecord,
        kind: EntryKind,
        amount: Amount,
        now_ms: u64,
    ) -> Status {
        if card.retired() {
            return Status::CardClosed;
        }
        if self.key_retired(card, now_ms) {
            return Status::KeyVersionRetired;
        }
        if amount.0 <= 0 || amount.0 > self.limits.max_amount {
            return Status::InvalidAmount;
        }
        match kind {
            EntryKind::Purchase => {
                if card.hotlisted().is_some() {
                    Status::CardBlocked
                } else if card.balance.0 < amount.0 {
                    Status::InsufficientFunds
                } else {
                    Status::Approved
                }
            }
            _ => {
                if card.state == CardState::Blocked {
                    Status::CardBlocked
                } else if card
                    .balance
                    .0
                    .checked_add(amount.0)
                    .is_none_or(|b| b > self.limits.max_balance)
                {
                    Status::OverBalanceCap
                } else {
                    Status::Approved
                }
            }
        }
    }

    fn balance(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        _now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (card, key) = match self.authenticate(terminal, MessageType::Balance, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => return Ok(Response::Balance(unauthenticated(status, auth))),
        };
        let status = if card.retired() { Status::CardClosed } else { Status::Approved };
        let result = CardResult {
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            balance: card.balance,
            journal_seq: 0,
            mac: Mac::default(),
        };
        Ok(Response::Balance(self.seal_card(&key, MessageType::Balance, &auth.cryptogram, result)))
    }

    fn history(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        before_seq: u64,
        limit: u16,
        _now_ms: u64,
    ) -> Result<Response, StoreError> {
        let empty = |status, balance| HistoryPage {
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            balance,
            entries: Vec::new(),
            next_before_seq: 0,
            mac: Mac::default(),
        };
        let (card, key) = match self.authenticate(terminal, MessageType::History, auth, Amount(0)) {
            Ok(found) => found,
            Err(status) => return Ok(Response::History(empty(status, Amount(0)))),
        };
        let limit = match usize::from(limit) {
            0 => 16,
            n => n.min(MAX_HISTORY_PAGE),
        };
        let before = if before_seq == 0 { u64::MAX } else { before_seq };
        let mut entries: Vec<HistoryEntry> = Vec::with_capacity(limit + 1);
        // The card's chain runs newest first, through the overlay and the journal files.
        self.walk_card(auth.card_id, HISTORY_WALK_MAX, |seq, entry| {
            if seq < before {
                entries.push(history_entry(entry, seq, auth.card_id));
            }
            entries.len() <= limit
        })?;
        let next_before_seq = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map_or(0, |e| e.journal_seq)
        } else {
            0
        };
        let mut page = empty(Status::Approved, card.balance);
        page.entries = entries;
        page.next_before_seq = next_before_seq;
        let mut response = Response::History(page);
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }

    fn identity(
        &mut self,
        terminal: &str,
        auth: &CardAuth,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let declined = |status| IdentityResult {
            status,
            card_id: auth.card_id,
            atc: auth.atc,
            journal_seq: 0,
            issued_ms: 0,
            expires_ms: 0,
            signature: [0u8; 64],
            mac: Mac::default(),
        };
        let (card, key) = match self.authenticate(terminal, MessageType::Identity, auth, Amount(0))
        {
            Ok(found) => found,
            Err(status) => return Ok(Response::Identity(declined(status))),
        };
        let (seq, entry) = match self.atc_use(&card, auth)? {
            AtcUse::Used(seq, e)
                if e.kind == EntryKind::Identity && e.binding == auth.cryptogram =>
            {
                (seq, e)
            }
            AtcUse::Used(..) | AtcUse::Stale => {
                let mut response = Response::Identity(declined(Status::Replay));
                seal(&key, &auth.cryptogram, &mut response);
                return Ok(response);
            }
            AtcUse::Fresh => {
                let status = if card.retired() {
                    Status::CardClosed
                } else if self.key_retired(&card, now_ms) {
                    Status::KeyVersionRetired
                } else if card.hotlisted().is_some() {
                    Status::CardBlocked
                } else {
                    Status::Approved
                };
                let entry = Entry {
                    kind: EntryKind::Identity,
                    status,
                    card_id: auth.card_id,
                    atc: auth.atc,
                    amount: Amount(0),
                    balance_after: card.balance,
                    time_ms: now_ms,
                    reference: auth.nonce,
                    binding: auth.cryptogram,
                    other_card: CardId(0),
                    key_version: card.key_version,
                    hotlist_version: 0,
                    hotlist_change: HotlistChange::None,
                    extra: now_ms.saturating_add(self.limits.identity_ttl_ms) as i64,
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                };
                (self.journal_entry(entry.clone())?, entry)
            }
        };
        let mut result = declined(entry.status);
        result.journal_seq = seq;
        if entry.status == Status::Approved {
            result.issued_ms = entry.time_ms;
            result.expires_ms = entry.extra as u64;
            let message = assertion_bytes(
                entry.card_id,
                entry.atc,
                seq,
                result.issued_ms,
                result.expires_ms,
                &entry.terminal,
            );
            result.signature.copy_from_slice(self.secrets.assertion.sign(&message).as_ref());
        }
        let mut response = Response::Identity(result);
        seal(&key, &auth.cryptogram, &mut response);
        Ok(response)
    }

    fn offline(
        &mut self,
        terminal: &str,
        record: &OfflineRecord,
        now_ms: u64,
    ) -> Result<CardResult, StoreError> {
        let unauth = |status| CardResult {
            status,
            card_id: record.card_id,
            atc: record.atc,
            balance: Amount(0),
            journal_seq: 0,
            mac: Mac::default(),
        };
        let Some(card) = self.cards.get(&record.card_id).copied() else {
            return Ok(unauth(Status::UnknownCard));
        };
        let Some(key) = self.card_key(record.card_id, card.key_version) else {
            return Ok(unauth(Status::KeyVersionRetired));
        };
        let expected = key.offline_certificate(
            record.card_id,
            record.atc,
            record.amount,
            record.time_ms,
            record.nonce,
            terminal,
        );
        if !CardKey::verify(&expected, &record.certificate) {
            tracing::warn!(card = %record.card_id.masked(), terminal, "bad offline certificate");
            return Ok(unauth(Status::BadCryptogram));
        }
        if record.atc.0 == 0 {
            // No card produces ATC 0 (it counts from 1), online or offline.
            return Ok(self.seal_card(
                &key,
                MessageType::OfflineBatch,
                &record.certificate,
                CardResult { balance: card.balance, ..unauth(Status::Replay) },
            ));
        }
        let lookup = if record.atc > card.last_atc {
            // Above every ATC the card has used: new, no walk needed.
            AtcLookup::Unused
        } else {
            self.atc_entry(record.card_id, record.atc, OFFLINE_LOOKUP_DEPTH)?
        };
        let result = match lookup {
            AtcLookup::Used(seq, e)
                if e.kind == EntryKind::Offline && e.binding == record.certificate =>
            {
                card_result(&e, seq)
            }
            AtcLookup::Used(..) | AtcLookup::Unknown => {
                if matches!(lookup, AtcLookup::Unknown) {
                    tracing::warn!(card = %record.card_id.masked(), terminal, atc = record.atc.0, "offline record older than the card's chain walk; refused as a replay");
                }
                CardResult { balance: card.balance, ..unauth(Status::Replay) }
            }
            AtcLookup::Unused => {
                let status = if card.retired() {
                    Status::CardClosed
                } else if record.amount.0 <= 0
                    || record.amount.0 > self.limits.max_amount
                    || card.balance.0.checked_sub(record.amount.0).is_none()
                {
                    Status::InvalidAmount
                } else {
                    // Offline spending already happened at the gate: it applies even when it
                    // overdraws or the card was blocked after the reader last synced.
                    Status::Approved
                };
                let mut after = card;
                if status == Status::Approved {
                    after.balance = Amount(card.balance.0 - record.amount.0);
                }
                let (hotlist_version, hotlist_change) = self.next_hotlist(card.hotlisted(), &after);
                let entry = Entry {
                    kind: EntryKind::Offline,
                    status,
                    card_id: record.card_id,
                    atc: record.atc,
                    amount: Amount(after.balance.0 - card.balance.0),
                    balance_after: after.balance,
                    time_ms: record.time_ms,
                    reference: record.nonce,
                    binding: record.certificate,
                    other_card: CardId(0),
                    key_version: card.key_version,
                    hotlist_version,
                    hotlist_change,
                    extra: record.amount.0,
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                };
                let _ = now_ms;
                let mut result = card_result(&entry, 0);
                result.journal_seq = self.journal_entry(entry)?;
                result
            }
        };
        Ok(self.seal_card(&key, MessageType::OfflineBatch, &record.certificate, result))
    }

    fn seal_card(
        &self,
        key: &CardKey,
        request_type: MessageType,
        binding: &Mac,
        result: CardResult,
    ) -> CardResult {
        let response_type = match request_type {
            MessageType::Purchase => MessageType::PurchaseResult,
            MessageType::TopUp => MessageType::TopUpResult,
            MessageType::Balance => MessageType::BalanceResult,
            _ => MessageType::OfflineResults,
        };
        let mut body = BytesMut::with_capacity(citycard_protocol::CARD_RESULT_LEN);
        let mut r = result;
        r.mac = Mac::default();
        let response = Response::Balance(r);
        // Encoding a CardResult cannot fail: it has no counted fields.
        let _ = response.encode_body(&mut body);
        let split = body.len() - 16;
        r.mac = key.response_mac(response_type as u8, binding, &body[..split]);
        r
    }

    // -----------------------------------------------------------------------------------------
    // Staff operations (counter terminals).

    /// The original answer to a retried staff operation, or ReferenceReused.
    fn staff_retry(
        &mut self,
        terminal: &str,
        op_ref: u64,
        kind: EntryKind,
        card: CardId,
        extra: Option<i64>,
    ) -> Result<Option<(u64, Entry)>, StoreError> {
        Ok(self.op_entry(terminal, op_ref)?.map(|(seq, e)| {
            let same_card = kind == EntryKind::Issue || e.card_id == card;
            if e.kind == kind && same_card && extra.is_none_or(|x| x == e.extra) {
                (seq, e)
            } else {
                let mut reused = e;
                reused.status = Status::ReferenceReused;
                (0, reused)
            }
        }))
    }

    fn issue(
        &mut self,
        terminal: &str,
        op_ref: u64,
        deposit: Amount,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (seq, entry) = match self.staff_retry(
            terminal,
            op_ref,
            EntryKind::Issue,
            CardId(0),
            Some(deposit.0),
        )? {
            Some(found) => found,
            None => {
                let status = if deposit.0 < 0 || deposit.0 > self.limits.max_balance {
                    Status::InvalidAmount
                } else {
                    Status::Approved
                };
                let card_id = if status == Status::Approved {
                    super::card_id_for(self.index, self.count, self.next_card)
                } else {
                    CardId(0)
                };
                let entry = Entry {
                    kind: EntryKind::Issue,
                    status,
                    card_id,
                    atc: Atc(0),
                    amount: if status == Status::Approved { deposit } else { Amount(0) },
                    balance_after: if status == Status::Approved { deposit } else { Amount(0) },
                    time_ms: now_ms,
                    reference: op_ref,
                    binding: Mac::default(),
                    other_card: CardId(0),
                    key_version: self.secrets.current_version,
                    hotlist_version: 0,
                    hotlist_change: HotlistChange::None,
                    extra: deposit.0,
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                };
                (self.journal_entry(entry.clone())?, entry)
            }
        };
        Ok(Response::Issue(self.issue_result(
            &entry,
            seq,
            entry.card_id,
            CardId(0),
            Amount(entry.balance_after.0),
        )))
    }

    fn issue_result(
        &mut self,
        entry: &Entry,
        seq: u64,
        new_card: CardId,
        old_card: CardId,
        balance: Amount,
    ) -> IssueResult {
        let mut result = IssueResult {
            status: entry.status,
            card_id: new_card,
            key_version: entry.key_version,
            card_key: [0u8; 32],
            balance,
            replaced_card_id: old_card,
            journal_seq: seq,
            mac: Mac::default(),
        };
        if entry.status != Status::Approved {
            result.card_id =
                if entry.status == Status::ReferenceReused { CardId(0) } else { new_card };
            result.balance = Amount(0);
            return result;
        }
        let Some(key) = self.card_key(new_card, entry.key_version) else {
            return result;
        };
        result.card_key = *key.bytes();
        let mut response =
            if old_card.0 == 0 { Response::Issue(result) } else { Response::Replace(result) };
        seal(&key, &staff_binding(entry.reference), &mut response);
        match response {
            Response::Issue(r) | Response::Replace(r) => r,
            _ => result,
        }
    }

    fn replace(
        &mut self,
        terminal: &str,
        op_ref: u64,
        old: CardId,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        let (seq, entry) =
            match self.staff_retry(terminal, op_ref, EntryKind::ReplacedOut, old, None)? {
                Some(found) => found,
                None => {
                    let Some(card) = self.cards.get(&old).copied() else {
                        return Ok(Response::Replace(declined_issue(Status::UnknownCard, old)));
                    };
                    let status = if card.retired() {
                        Status::CardClosed
                    } else if card.balance.0 < 0 && card.state != CardState::Blocked {
                        // An overdrawn card that is not blocked can still be topped up: its
                        // debt is settled that way before it moves. A blocked debtor (stolen,
                        // then overdrawn offline) cannot be topped up, so it is replaced with
                        // its debt left on the old card (below).
                        Status::InvalidState
                    } else {
                        Status::Approved
                    };
                    let new_card = if status == Status::Approved {
                        super::card_id_for(self.index, self.count, self.next_card)
                    } else {
                        CardId(0)
                    };
                    let mut after = card;
                    if status == Status::Approved {
                        after.state = CardState::Replaced;
                        // A positive balance moves to the new card; a debt stays recorded on
                        // the retired card, and the new card starts at 0.
                        after.balance = Amount(card.balance.0.min(0));
                    }
                    let (hotlist_version, hotlist_change) =
                        self.next_hotlist(card.hotlisted(), &after);
                    let entry = Entry {
                        kind: EntryKind::ReplacedOut,
                        status,
                        card_id: old,
                        atc: Atc(0),
                        amount: Amount(after.balance.0 - card.balance.0),
                        balance_after: after.balance,
                        time_ms: now_ms,
                        reference: op_ref,
                        binding: Mac::default(),
                        other_card: new_card,
                        key_version: self.secrets.current_version,
                        hotlist_version,
                        hotlist_change,
                        extra: 0,
                        terminal: terminal.to_owned(),
                        prev_pos: Pos::NONE,
                    };
                    (self.journal_entry(entry.clone())?, entry)
                }
            };
        let moved = Amount(entry.amount.0.saturating_neg());
        Ok(Response::Replace(self.issue_result(&entry, seq, entry.other_card, old, moved)))
    }

    fn staff(
        &mut self,
        terminal: &str,
        kind: EntryKind,
        op_ref: u64,
        card_id: CardId,
        reason: Option<BlockReason>,
        now_ms: u64,
    ) -> Result<Response, StoreError> {
        // The answer is sealed under the card's key. Without it (its issuer key version was
        // removed from issuer.key) nothing is decided or recorded: a zero MAC on an approval
        // would be indistinguishable from a forgery (found by a client written from the spec).
        if let Some(card) = self.cards.get(&card_id).copied() {
            if self.card_key(card_id, card.key_version).is_none() {
                tracing::error!(card = %card_id.masked(), key_version = card.key_version.0, "no issuer key for the card's key version; staff operation declined");
                return Ok(wrap_staff(kind, declined_staff(Status::KeyVersionRetired, card_id)));
            }
        }
        let (seq, entry) = match self.staff_retry(
            terminal,
            op_ref,
            kind,
            card_id,
            reason.map(|r| i64::from(r as u8)),
        )? {
            Some(found) => found,
            None => {
                let Some(card) = self.cards.get(&card_id).copied() else {
                    return Ok(wrap_staff(kind, declined_staff(Status::UnknownCard, card_id)));
                };
                let retired = card.retired();
                let mut after = card;
                let status = match kind {
                    _ if retired => Status::CardClosed,
                    EntryKind::Block if card.state == CardState::Blocked => Status::InvalidState,
                    EntryKind::Block => {
                        after.state = CardState::Blocked;
                        after.block_reason = reason.unwrap_or(BlockReason::Other);
                        Status::Approved
                    }
                    EntryKind::Unblock if card.state != CardState::Blocked => Status::InvalidState,
                    EntryKind::Unblock => {
                        after.state = CardState::Active;
                        Status::Approved
                    }
                    // A negative balance cannot be refunded. An overdrawn card that is not
                    // blocked is topped up first; a blocked one cannot be, so it closes with
                    // its debt kept on the closed card and nothing refunded.
                    _ if card.balance.0 < 0 && card.state != CardState::Blocked => {
                        Status::InvalidState
                    }
                    _ => {
                        after.state = CardState::Closed;
                        after.balance = Amount(card.balance.0.min(0));
                        Status::Approved
                    }
                };
                let (hotlist_version, hotlist_change) = self.next_hotlist(card.hotlisted(), &after);
                let refunded = if kind == EntryKind::Close && status == Status::Approved {
                    card.balance.0.max(0)
                } else {
                    0
                };
                let entry = Entry {
                    kind,
                    status,
                    card_id,
                    atc: Atc(0),
                    amount: Amount(after.balance.0 - card.balance.0),
                    balance_after: after.balance,
                    time_ms: now_ms,
                    reference: op_ref,
                    // The card's state when this was decided, so a retried decline repeats it.
                    binding: state_binding(card.reported_state()),
                    other_card: CardId(0),
                    key_version: card.key_version,
                    hotlist_version,
                    hotlist_change,
                    // Block: the reason; close: the refund.
                    extra: if kind == EntryKind::Block {
                        i64::from(reason.unwrap_or(BlockReason::Other) as u8)
                    } else {
                        refunded
                    },
                    terminal: terminal.to_owned(),
                    prev_pos: Pos::NONE,
                };
                (self.journal_entry(entry.clone())?, entry)
            }
        };
        let card = self.cards.get(&card_id).copied();
        let mut result = declined_staff(entry.status, card_id);
        if entry.status == Status::ReferenceReused {
            return Ok(wrap_staff(kind, result));
        }
        result.journal_seq = seq;
        result.balance = entry.balance_after;
        result.hotlist_version = entry.hotlist_version;
        result.refunded = if kind == EntryKind::Close { Amount(entry.extra) } else { Amount(0) };
        result.card_state = match (entry.status, kind) {
            (Status::Approved, EntryKind::Block) => CardState::Blocked,
            (Status::Approved, EntryKind::Close) => CardState::Closed,
            (Status::Approved, _) if entry.balance_after.0 < 0 => CardState::Overdrawn,
            (Status::Approved, _) => CardState::Active,
            _ => CardState::from_u8(entry.binding.0[0]).unwrap_or(CardState::Active),
        };
        let mut response = wrap_staff(kind, result);
        if let Some(card) = card {
            if let Some(key) = self.card_key(card_id, card.key_version) {
                seal(&key, &staff_binding(op_ref), &mut response);
            }
        }
        Ok(response)
    }

    // -----------------------------------------------------------------------------------------
    // Hotlist.

    fn hotlist(&mut self, since: u64, max: usize) -> Result<Output, StoreError> {
        let mut entries = Vec::new();
        let mut more = false;
        let start = state::hotlist_key(since.saturating_add(1));
        let end = state::hotlist_key(u64::MAX);
        for item in self.db.range(start..end) {
            let (k, v) = item?;
            if entries.len() == max {
                more = true;
                break;
            }
            let version = state::be_u64(&k[1..]).unwrap_or(0);
            entries.push(parse_hotlist(version, &v)?);
        }
        // Changes still in the overlay may not be in sled yet.
        for p in self.overlay.iter() {
            if p.entry.hotlist_version > since
                && !entries.iter().any(|e| e.version == p.entry.hotlist_version)
            {
                if entries.len() == max {
                    more = true;
                    break;
                }
                if let Some(e) = hotlist_entry_of(&p.entry) {
                    entries.push(e);
                }
            }
        }
        let version = entries.last().map_or(since, |e| e.version);
        Ok(Output::Hotlist { version, entries, more })
    }
}

/// Whether reading an old record by position failed in a way that leaves the rest of the shard
/// sound: its segment file is gone from journal and archive, or the record fails its CRC (a
/// damaged archive; `verify` names it). Walks end there instead of stopping the shard; the
/// decisions that needed the record fall back to the safe answer.
fn is_missing_segment(error: &StoreError) -> bool {
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
fn reference_lost(terminal: &str, op_ref: u64) -> Entry {
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

fn block_reason_of(entry: &Entry, current: BlockReason) -> BlockReason {
    u8::try_from(entry.extra).ok().and_then(BlockReason::from_u8).unwrap_or(current)
}

/// The sled writes of one committed entry: history under each card it touches, and its index.
/// The sled writes one entry needs beyond its card records: none for card transactions (their
/// history and retries are served from the journal through the card's chain), an op_ref index
/// entry for staff operations, and the hotlist change if any.
fn write_index(batch: &mut sled::Batch, entry: &Entry, seq: u64, pos: Pos) {
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

fn hotlist_entry_of(entry: &Entry) -> Option<HotlistEntry> {
    let (listed, reason) = match entry.hotlist_change {
        HotlistChange::None => return None,
        HotlistChange::Listed(r) => (true, r),
        HotlistChange::Unlisted(r) => (false, r),
    };
    Some(HotlistEntry { card_id: entry.card_id, listed, reason, version: entry.hotlist_version })
}

fn parse_hotlist(version: u64, v: &[u8]) -> Result<HotlistEntry, StoreError> {
    if v.len() != 10 {
        return Err(StoreError::State(format!("hotlist entry {version} malformed")));
    }
    let card_id = CardId(state::be_u64(&v[..8]).unwrap_or(0));
    let reason = BlockReason::from_u8(v[9])
        .ok_or_else(|| StoreError::State(format!("hotlist entry {version} reason")))?;
    Ok(HotlistEntry { card_id, listed: v[8] == 1, reason, version })
}

fn unauthenticated(status: Status, auth: &CardAuth) -> CardResult {
    CardResult {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        balance: Amount(0),
        journal_seq: 0,
        mac: Mac::default(),
    }
}

fn card_result(entry: &Entry, seq: u64) -> CardResult {
    CardResult {
        status: entry.status,
        card_id: entry.card_id,
        atc: entry.atc,
        balance: entry.balance_after,
        journal_seq: seq,
        mac: Mac::default(),
    }
}

fn history_entry(entry: &Entry, seq: u64, viewer: CardId) -> HistoryEntry {
    let incoming = entry.kind == EntryKind::ReplacedOut && entry.other_card == viewer;
    let moved = Amount(entry.amount.0.saturating_neg());
    HistoryEntry {
        journal_seq: seq,
        kind: if incoming { EntryKind::ReplacedIn } else { entry.kind },
        status: entry.status,
        amount: if incoming { moved } else { entry.amount },
        balance_after: if incoming { moved } else { entry.balance_after },
        time_ms: entry.time_ms,
        atc: entry.atc,
    }
}

fn declined_issue(status: Status, old: CardId) -> IssueResult {
    IssueResult {
        status,
        card_id: CardId(0),
        key_version: KeyVersion(0),
        card_key: [0u8; 32],
        balance: Amount(0),
        replaced_card_id: old,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

fn declined_staff(status: Status, card_id: CardId) -> StaffResult {
    StaffResult {
        status,
        card_id,
        card_state: CardState::Active,
        balance: Amount(0),
        refunded: Amount(0),
        hotlist_version: 0,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

fn wrap_staff(kind: EntryKind, result: StaffResult) -> Response {
    match kind {
        EntryKind::Block => Response::Block(result),
        EntryKind::Unblock => Response::Unblock(result),
        _ => Response::Close(result),
    }
}

/// Computes and sets the response MAC of a card-related response.
pub fn seal(key: &CardKey, binding: &Mac, response: &mut Response) {
    let mut body = BytesMut::with_capacity(128);
    if response.encode_body(&mut body).is_err() || body.len() < 16 {
        return;
    }
    let split = body.len() - 16;
    let mac = key.response_mac(response.message_type() as u8, binding, &body[..split]);
    if let Some(slot) = response.mac_mut() {
        *slot = mac;
    }
}

/// sled settings: a bounded page cache. (Measured: HighThroughput mode and no periodic flush
/// changed nothing at 1 or 64 terminals, so sled's defaults stay.)
/// The binding field of a block/unblock/close entry: the card's reported state at decision
/// time in byte 0 (a retried decline answers it again, byte for byte).
fn state_binding(state: CardState) -> Mac {
    let mut b = [0u8; 16];
    b[0] = state as u8;
    Mac(b)
}
