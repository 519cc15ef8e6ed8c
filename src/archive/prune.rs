//! `citycard archive prune --before DATE`: removes archived journal segments whose records all
//! lie before a UTC day, after writing the signed anchor that stands for them.
//!
//! # Order, and why it is crash-safe
//!
//! Per shard, under the data directory's lock (the server must be stopped, as for `verify`:
//! a full rebuild at start reads the archive, and must never race with a removal):
//!
//! 1. The archive's segments after the current anchor are read in order (CRC and hash chain
//!    checked as always), replaying every record into a [`Ledger`]. A segment is removable when
//!    every record in it is before 00:00 UTC of DATE; the first that is not (or the end of the
//!    archive: the live journal is never pruned) ends the run, and its changes are taken back.
//! 2. The new anchor (the last removed record's seq and hash, every card, the listed cards,
//!    each removed day's money, every staff op_ref used) is written to `shard-N/anchor`: temp file, fsync, rename, fsync
//!    of the directory.
//! 3. Only then are the segments removed, oldest first, and the archive directory fsynced.
//!
//! A crash after 2 leaves segments at or below the anchor: readers start after the anchor and
//! skip them, and the next prune removes them first. A crash during 2 leaves the old anchor
//! (or none) with every segment still there.
//!
//! Archived segments are all below the shard's checkpoint (the server archives only those);
//! a prune checks it again and refuses otherwise.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ring::signature::KeyPair;

use super::anchor::Anchor;
use super::ledger::Ledger;
use crate::engine::checkpoint::Checkpoint;
use crate::engine::entry::Entry;
use crate::journal::{self, JournalError, Pos, RecordHash, Start};
use crate::report::Date;

/// What to prune.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Segments whose records all lie before this day's 00:00 UTC are removed.
    pub before: Date,
    /// Say what would be removed, change nothing.
    pub dry_run: bool,
    /// The prune's own time, recorded in the anchor.
    pub now_ms: u64,
    /// Test seam: stop after the anchor is durable and before any segment is removed, as a
    /// kill at that point would.
    pub stop_after_anchor: bool,
}

/// What a prune did (or, dry, would do) to one shard.
#[derive(Clone, Debug, Default)]
pub struct ShardPruned {
    pub shard: u16,
    /// Segments removed (or to be removed), oldest first.
    pub segments: Vec<PathBuf>,
    /// Their size in bytes.
    pub bytes: u64,
    /// Of them, segments already covered by the anchor (left by an interrupted prune).
    pub leftovers: usize,
    /// Seq of the shard's anchor after the prune (0: never pruned).
    pub anchor_seq: u64,
    /// Why the prune stopped where it did.
    pub stopped: String,
}

/// Prunes every shard of `data_dir`, signing anchors with `keys/assertion.key`.
pub fn prune(
    data_dir: &Path,
    keys_dir: &Path,
    options: &PruneOptions,
) -> anyhow::Result<Vec<ShardPruned>> {
    let _lock = crate::layout::lock_data_dir(data_dir)?;
    let count = read_shard_count(data_dir)?;
    let key_path = keys_dir.join(crate::keys::ASSERTION_KEY);
    let key = crate::keys::load_assertion_key(&key_path)
        .with_context(|| format!("loading the anchor signing key {}", key_path.display()))?;
    let public: [u8; 32] =
        key.public_key().as_ref().try_into().context("assertion key has no 32-byte public key")?;
    let archive_root = crate::layout::archive_root(data_dir, None)?;
    let mut out = Vec::new();
    for index in 0..count {
        let shard_dir = crate::layout::shard_dir(data_dir, index);
        let archive = crate::layout::archive_dir(data_dir, archive_root.as_deref(), index);
        let done = prune_shard(index, count, &shard_dir, &archive, &key, &public, options)
            .with_context(|| format!("shard {index}"))?;
        out.push(done);
    }
    Ok(out)
}

fn read_shard_count(data_dir: &Path) -> anyhow::Result<u16> {
    let path = data_dir.join("shards");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{} has no shard count: not a citycard data directory", data_dir.display())
    })?;
    text.trim().parse().with_context(|| format!("{} is malformed", path.display()))
}

/// Where the replay over the archive stands.
struct Run {
    before_ms: u64,
    ledger: Ledger,
    /// Segment being read, and the seq and hash of its last record so far.
    segment: u64,
    last: (u64, RecordHash),
    /// The last record of the last removable segment.
    cut: Option<(u64, RecordHash)>,
    removable: Vec<u64>,
    stopped: Option<String>,
    bad: Option<String>,
}

impl Run {
    /// The segment read so far lies wholly before the day: keep its changes.
    fn close_segment(&mut self) {
        if self.segment != 0 {
            self.ledger.commit();
            self.removable.push(self.segment);
            self.cut = Some(self.last);
        }
    }
}

/// Stands for "stop reading" in the scan's visitor; never reported.
const STOP: &str = "prune stops here";

fn prune_shard(
    index: u16,
    count: u16,
    shard_dir: &Path,
    archive: &Path,
    key: &ring::signature::Ed25519KeyPair,
    public: &[u8; 32],
    options: &PruneOptions,
) -> anyhow::Result<ShardPruned> {
    let mut result = ShardPruned { shard: index, ..Default::default() };
    let old = Anchor::load(shard_dir, public).context("the existing anchor cannot be trusted; nothing is pruned until it is restored or the directory is verified")?;
    result.anchor_seq = old.as_ref().map_or(0, |a| a.seq);
    let checkpoint = match Checkpoint::load(shard_dir) {
        Ok(Some(cp)) => cp,
        Ok(None) => {
            result.stopped = "no checkpoint yet, so nothing is archived".into();
            return Ok(result);
        }
        Err(e) => bail!("{e}: a prune needs a sound checkpoint"),
    };
    let segments = journal::list_segments(archive)?;
    // Segments an interrupted prune left below the anchor: the next segment starts at or below
    // the anchor's seq + 1, so each of these holds only records the anchor stands for.
    // (The segment after the archive's last is the live journal's first.)
    let live_first = journal::list_segments(&shard_dir.join("journal"))?.first().map(|s| s.0);
    let mut leftovers = Vec::new();
    if let Some(a) = &old {
        for (k, (first, path)) in segments.iter().enumerate() {
            let next_first = segments.get(k + 1).map(|s| s.0).or(live_first).unwrap_or(u64::MAX);
            if *first <= a.seq && next_first <= a.seq + 1 {
                leftovers.push(path.clone());
            }
        }
    }
    let mut run = Run {
        before_ms: u64::try_from(options.before.start_ms()).unwrap_or(0),
        ledger: Ledger::new(old.as_ref()),
        segment: 0,
        last: (0, [0; 32]),
        cut: None,
        removable: Vec::new(),
        stopped: None,
        bad: None,
    };
    let remaining =
        segments.iter().filter(|(first, _)| old.as_ref().is_none_or(|a| *first > a.seq));
    if remaining.count() > 0 {
        let start = match &old {
            Some(a) => Start::Pruned { anchor: a.link(), archive: None },
            None => Start::Full { archive: None },
        };
        let scanned = journal::read_hashed(archive, start, &mut |seq, pos: Pos, payload, hash| {
            if pos.segment != run.segment {
                run.close_segment();
                run.segment = pos.segment;
            }
            let entry = Entry::decode(payload)
                .map_err(|e| JournalError::Rejected { seq, reason: e.to_string() })?;
            if entry.time_ms >= run.before_ms {
                run.ledger.rollback();
                run.segment = 0;
                run.stopped = Some(format!(
                    "archived segment {} holds seq {seq} of {} (not before {})",
                    pos.segment,
                    Date::from_unix_ms(entry.time_ms),
                    options.before
                ));
                return Err(JournalError::Rejected { seq, reason: STOP.into() });
            }
            if let Err(reason) = run.ledger.apply(pos, &entry) {
                run.bad = Some(format!("seq {seq}: {reason}"));
                return Err(JournalError::Rejected { seq, reason: STOP.into() });
            }
            run.last = (seq, *hash);
            Ok(())
        });
        match scanned {
            Ok(_) => {
                run.close_segment();
                run.stopped = Some(format!(
                    "the rest is in the live journal (checkpoint at seq {}); only archived \
                     segments are pruned",
                    checkpoint.seq
                ));
            }
            Err(JournalError::Rejected { reason, .. }) if reason == STOP => {}
            Err(e) => bail!("reading the archive {}: {e}; nothing was pruned", archive.display()),
        }
    } else {
        run.stopped = Some("the archive holds nothing after the anchor".into());
    }
    if let Some(bad) = run.bad {
        bail!(
            "the archive does not replay cleanly ({bad}); run citycard verify; nothing was pruned"
        );
    }
    result.stopped = run.stopped.unwrap_or_default();
    let mut removed: Vec<PathBuf> = leftovers.clone();
    removed.extend(run.removable.iter().map(|first| journal::segment_path(archive, *first)));
    result.leftovers = leftovers.len();
    for path in &removed {
        result.bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    result.segments = removed;
    let Some((seq, hash)) = run.cut else {
        if !options.dry_run {
            remove(&result.segments, archive)?;
        }
        return Ok(result);
    };
    if seq >= checkpoint.seq {
        bail!("refusing to prune through seq {seq}: the checkpoint is at seq {}", checkpoint.seq);
    }
    let mut ledger = run.ledger;
    let staff_refs = ledger.staff_refs();
    let numbered_seqs = ledger.numbered_seqs();
    let anchor = Anchor {
        shard: index,
        shard_count: count,
        seq,
        hash,
        before_days: old.as_ref().map_or(i64::MIN, |a| a.before_days).max(options.before.days()),
        created_ms: options.now_ms,
        hotlist_version: ledger.hotlist_version,
        days: ledger.days,
        cards: ledger.cards,
        hotlist: ledger.hotlist,
        staff_refs,
        numbered_seqs,
    };
    if let Err(reason) = anchor.check_tables() {
        bail!("the removed staff operations or numbered seqs cannot be kept in the anchor ({reason}); nothing was pruned");
    }
    let totals = anchor.totals();
    if anchor.balances() != totals.balance_change || totals.balance_change != totals.net() {
        bail!(
            "the removed records do not reconcile: balances {} but money flows {} (net {}); nothing was pruned",
            anchor.balances(),
            totals.balance_change,
            totals.net()
        );
    }
    if totals.records != seq {
        bail!("the anchor would account for {} records, not {seq}", totals.records);
    }
    result.anchor_seq = seq;
    if options.dry_run {
        return Ok(result);
    }
    anchor
        .store(shard_dir, key)
        .with_context(|| format!("writing {}", shard_dir.join(super::ANCHOR_FILE).display()))?;
    tracing::info!(shard = index, seq, segments = result.segments.len(), "prune anchor written");
    if options.stop_after_anchor {
        return Ok(result);
    }
    remove(&result.segments, archive)?;
    Ok(result)
}

/// Removes segments oldest first, then makes the removals durable.
fn remove(segments: &[PathBuf], archive: &Path) -> anyhow::Result<()> {
    for path in segments {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    if !segments.is_empty() {
        std::fs::File::open(archive)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", archive.display()))?;
    }
    Ok(())
}
