//! Opening a shard: load the derived state, replay what the journal holds beyond it, and set a
//! damaged or disagreeing state aside to rebuild it (the rules are in [`super::recovery`]).

use std::collections::HashMap;
use std::sync::Arc;

use super::cards::{Cards, Loaded};
use super::checkpoint::Checkpoint;
use super::overlay::Overlay;
use super::persister::{CheckpointPlace, Inline};
use super::recovery::{self, OpenHost, RebuildReason, Verdict};
use super::shard::Shard;
use super::state;
use super::types::{OpenReport, Secrets, ShardOptions};
use super::StoreError;
use crate::journal::{Journal, JournalError, JournalFiles, Start};

/// op_ref index entries written per sled batch when a state is seeded from an anchor: large
/// enough that millions of pruned staff operations seed in seconds, small enough that the
/// batch (about 40 bytes an entry) and sled's garbage behind it stay a few MiB.
const SEED_BATCH_WRITES: usize = 16_384;

/// The shard's prune anchor, checked with the server's own assertion key (which signed it).
/// One that does not check stops the start: the records it stands for are gone.
fn load_anchor(
    options: &ShardOptions,
    secrets: &Secrets,
) -> Result<Option<crate::archive::Anchor>, StoreError> {
    use ring::signature::KeyPair;
    let Ok(public) = <[u8; 32]>::try_from(secrets.assertion.public_key().as_ref()) else {
        return Err(StoreError::Anchor("the assertion key has no 32-byte public key".into()));
    };
    crate::archive::Anchor::load(&options.dir, &public)
        .map_err(|e| StoreError::Anchor(e.to_string()))
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
    ///
    /// `host` gives the time that names a state set aside and the pause while sled's lock is
    /// held (the engine reads no clock); `Shard::open` (in [`crate::host`]) passes the system's.
    /// The shard starts with the [`Inline`] write-behind; see [`Shard::set_write_behind`].
    pub fn open_with(
        options: ShardOptions,
        secrets: Arc<Secrets>,
        host: &mut dyn OpenHost,
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
        let pruned = load_anchor(&options, &secrets)?;
        let mut rebuild: Option<RebuildReason> = None;
        // Three rounds at most: a damaged state is set aside in the first; a checkpoint or
        // state the journal disagrees with in the first or second; the last starts from an
        // empty state without a checkpoint, which can disagree with nothing.
        for _round in 0..3 {
            let opened = recovery::open_sled(&state_dir, host)
                .and_then(|db| Shard::from_db(&options, secrets.clone(), db));
            let mut shard = match opened {
                Ok(shard) => shard,
                Err(e) => match recovery::classify(e, &state_dir) {
                    Verdict::Rebuild(reason) if rebuild.is_none() => {
                        tracing::warn!(shard = options.index, state = %state_dir.display(), reason = reason.label(), detail = %reason, "derived state is damaged; rebuilding it from the journal");
                        recovery::move_aside(&state_dir, host.now_ms())?;
                        rebuild = Some(reason);
                        continue;
                    }
                    Verdict::Rebuild(reason) => return Err(StoreError::FreshStateUnusable(reason)),
                    Verdict::Stop(e) => return Err(e),
                },
            };
            let applied_before = shard.applied_seq;
            let start = match (checkpoint, &pruned) {
                (Some(cp), _) if applied_before >= cp.seq => Start::Anchor(cp.anchor()),
                // The archive was pruned: the records up to the anchor are gone, and a state
                // below it starts from the cards the anchor holds.
                (_, Some(anchor)) if applied_before == 0 => {
                    shard.seed_from_anchor(anchor)?;
                    Start::Pruned { anchor: anchor.link(), archive: Some(&archive_dir) }
                }
                (_, Some(anchor)) if applied_before >= anchor.seq => {
                    Start::Pruned { anchor: anchor.link(), archive: Some(&archive_dir) }
                }
                (_, Some(anchor)) => {
                    let reason = RebuildReason::CheckpointDisagrees(format!(
                        "state at seq {applied_before} is below the prune anchor at seq {}",
                        anchor.seq
                    ));
                    tracing::warn!(shard = options.index, state = %state_dir.display(), reason = reason.label(), detail = %reason, "derived state is older than the pruned archive; rebuilding it from the anchor");
                    drop(shard);
                    recovery::move_aside(&state_dir, host.now_ms())?;
                    rebuild = Some(reason);
                    continue;
                }
                _ => Start::Full { archive: Some(&archive_dir) },
            };
            let mut replayed = 0u64;
            let mut replay_error: Option<StoreError> = None;
            let opened = Journal::open_at(
                &journal_dir,
                options.journal.clone(),
                start,
                |seq, pos, payload| {
                    let skip_one = crate::sim_bugs::active(crate::sim_bugs::Bug::ReplaySkipsOne)
                        && seq == applied_before + 1;
                    if seq <= applied_before || skip_one || replay_error.is_some() {
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
                    recovery::move_aside(&state_dir, host.now_ms())?;
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
                recovery::move_aside(&state_dir, host.now_ms())?;
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
            // The card records are not read at start; whether sled's still match the digest
            // recorded with them is checked while the shard serves (engine::store::verify).
            shard.cards.start_verify();
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
        Err(StoreError::StillDisagrees)
    }

    /// Starts an empty state from a prune's anchor: its cards, the latest hotlist change of
    /// every card ever listed (a compacted hotlist that still brings any cursor to the right
    /// list, 6.5), its hotlist version, and every staff op_ref the removed records used, as they
    /// stood at the anchor's seq, and (protocol 1.3) every numbered offline seq. Each op_ref
    /// and seq is indexed as used with its record pruned ([`state::PRUNED_OP`]), so a retry or
    /// reuse of an op_ref is declined ReferenceReused and never executed again, and a
    /// re-upload under a seq is SeqConflict, as in a state that survived the prune.
    /// The hotlist and op_ref entries go straight to sled (the state is empty, so writing them
    /// again after a crash is harmless); the cards go with the first chunk.
    fn seed_from_anchor(&mut self, anchor: &crate::archive::Anchor) -> Result<(), StoreError> {
        for (id, card) in &anchor.cards {
            self.cards.put(*id, card.record, anchor.seq);
            // A hold open at the anchor is swept on expiry like any other.
            let none = super::decide::transit::Hold::NONE;
            self.hold_index.change(*id, none, card.record.hold);
            self.next_card = self.next_card.max(super::card_counter(*id, self.count) + 1);
        }
        for (id, (version, listed, reason)) in &anchor.hotlist {
            self.db.insert(
                &state::hotlist_key(*version)[..],
                &state::hotlist_value(*id, *listed, *reason)[..],
            )?;
        }
        self.hotlist_version = self.hotlist_version.max(anchor.hotlist_version);
        let mut batch = sled::Batch::default();
        let mut in_batch = 0usize;
        let op_keys = anchor.staff_refs.iter().flat_map(|(terminal, refs)| {
            refs.iter().map(move |op_ref| state::op_key(terminal, *op_ref))
        });
        let seq_keys = anchor.numbered_seqs.iter().flat_map(|(terminal, seqs)| {
            seqs.iter().map(move |seq| state::seq_key(terminal, *seq))
        });
        for key in op_keys.chain(seq_keys) {
            batch.insert(key, &state::PRUNED_OP[..]);
            in_batch += 1;
            if in_batch == SEED_BATCH_WRITES {
                self.db.apply_batch(std::mem::take(&mut batch))?;
                super::store::reclaim_after_batch(in_batch);
                in_batch = 0;
            }
        }
        if in_batch > 0 {
            self.db.apply_batch(batch)?;
            super::store::reclaim_after_batch(in_batch);
        }
        Ok(())
    }

    pub(super) fn from_db(
        options: &ShardOptions,
        secrets: Arc<Secrets>,
        db: sled::Db,
    ) -> Result<Shard, StoreError> {
        let applied_seq = match db.get(state::META_APPLIED)? {
            Some(v) => state::be_u64(&v).ok_or_else(|| StoreError::MalformedState {
                what: "applied_seq",
                detail: format!("{} bytes", v.len()),
            })?,
            None => 0,
        };
        let Loaded { cards, next_card } =
            Cards::load(&db, options.count, applied_seq, options.limits.card_cache_entries)?;
        let held = cards.open_holds()?;
        let hold_index = super::holds::HoldIndex::of(held.iter().map(|(id, card)| (id, card)));
        let hotlist_version = match db.scan_prefix([state::HOTLIST]).next_back() {
            Some(item) => state::be_u64(&item?.0[1..]).ok_or_else(|| {
                StoreError::MalformedState { what: "hotlist key", detail: "not 9 bytes".into() }
            })?,
            None => 0,
        };
        let place = CheckpointPlace {
            shard_dir: options.dir.clone(),
            journal_dir: options.dir.join("journal"),
            archive_dir: options.archive_dir(),
            storage: options.journal.storage.clone(),
        };
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
            write_behind: Box::new(Inline::default()),
            persisted: applied_seq,
            state_dir: options.dir.join("state"),
            scratch: Vec::with_capacity(256),
            files: JournalFiles::on(
                options.journal.storage.clone(),
                options.dir.join("journal"),
                options.archive_dir(),
            ),
            place,
            checkpoint_policy: options.checkpoint,
            checkpoint_seq: applied_seq,
            checkpoint_at_ms: None,
            now_ms: 0,
            hold_index,
        })
    }
}
