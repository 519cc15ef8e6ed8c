//! `citycard verify --archive DIR`: checks an archive by itself, without its data directory
//! (say, a copy on another disk): every record's CRC, the hash chain within and across the
//! segments, seq continuity, and the money of every card re-derived from the records, starting
//! from the shard's prune anchor when there is one (or from seq 1).
//!
//! `DIR` is one shard's archive (segment files directly in it), an archive root (`shard-N/`
//! directories, as `--archive` in the server's configuration lays it out), or a data directory
//! (`shard-N/archive/`). A shard's anchor is `anchor` beside its segments, or for a data
//! directory's `shard-N/archive` the `shard-N/anchor` next to it; `--anchor FILE` names it for
//! a single shard. An anchor is only used after its signature checks with `assertion.pub`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::anchor::{Anchor, ANCHOR_FILE};
use crate::engine::entry::Entry;
use crate::journal::{self, Start};
use crate::verify::{self, Totals};

/// What was found in one shard's archive.
#[derive(Clone, Debug)]
pub struct ArchiveShard {
    pub dir: PathBuf,
    /// From the directory's name (`shard-N`) or the anchor.
    pub shard: Option<u16>,
    /// Seq of the anchor the check started from (None: from seq 1).
    pub anchor_seq: Option<u64>,
    pub segments: usize,
    /// First and last seq read (0 when the archive holds no record after its start).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Hash of the record `last_seq` (the anchor's hash when no record follows it): equal to
    /// the head `citycard verify` prints for the same seq.
    pub head: [u8; 32],
    /// Money re-derived from the records (and the anchor), per shard.
    pub totals: Totals,
}

/// The outcome of [`check_archive`]: per-shard findings, problems and notes.
#[derive(Debug, Default)]
pub struct ArchiveReport {
    pub shards: Vec<ArchiveShard>,
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

impl ArchiveReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for ArchiveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.shards {
            let shard = s.shard.map_or_else(|| "?".to_owned(), |i| i.to_string());
            let from = s.anchor_seq.map_or_else(|| "seq 1".to_owned(), |a| format!("anchor {a}"));
            let t = &s.totals;
            writeln!(
                f,
                "archive shard {shard} ({}): from {from}, seq {}..={} in {} segment(s), head {} \
                 | cards {} sum of balances {} = net {}",
                s.dir.display(),
                s.first_seq,
                s.last_seq,
                s.segments,
                crate::hex::encode(&s.head),
                t.cards,
                t.balances,
                t.deposits + t.top_ups - t.purchases - t.offline - t.refunds
            )?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        for problem in &self.problems {
            writeln!(f, "MISMATCH: {problem}")?;
        }
        if self.ok() {
            write!(f, "verify archive: OK")
        } else {
            write!(f, "verify archive: {} problem(s)", self.problems.len())
        }
    }
}

/// Checks the archive at `dir` (see the module docs). `anchor`: the anchor file of a single
/// shard's archive; `public_key`: `assertion.pub`, needed for any anchor. Errors are for a
/// directory that holds no archive; findings are in the report.
pub fn check_archive(
    dir: &Path,
    anchor: Option<&Path>,
    public_key: Option<&[u8; 32]>,
) -> anyhow::Result<ArchiveReport> {
    let shards = shard_dirs(dir)?;
    if shards.is_empty() {
        bail!(
            "{} holds no journal segments, no shard-N/ and no shard-N/archive/ directories",
            dir.display()
        );
    }
    if anchor.is_some() && shards.len() > 1 {
        bail!(
            "--anchor names one shard's anchor, but {} holds {} shards",
            dir.display(),
            shards.len()
        );
    }
    let mut report = ArchiveReport::default();
    for (index, shard_dir) in shards {
        let anchor_file = match anchor {
            Some(path) => Some(path.to_path_buf()),
            None => beside(&shard_dir),
        };
        check_shard(&shard_dir, index, anchor_file.as_deref(), public_key, &mut report)?;
    }
    Ok(report)
}

/// The shard archives under `dir`, with the shard index their names give.
fn shard_dirs(dir: &Path) -> anyhow::Result<Vec<(Option<u16>, PathBuf)>> {
    if !journal::list_segments(dir)?.is_empty() {
        return Ok(vec![(shard_index(dir), dir.to_path_buf())]);
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        let Some(index) = shard_index(&path) else { continue };
        let inner = path.join("archive");
        out.push((Some(index), if inner.is_dir() { inner } else { path }));
    }
    out.sort();
    Ok(out)
}

/// N of a directory named `shard-N`, or of `shard-N/archive`.
fn shard_index(dir: &Path) -> Option<u16> {
    let named = if dir.file_name()? == "archive" { dir.parent()? } else { dir };
    named.file_name()?.to_str()?.strip_prefix("shard-")?.parse().ok()
}

/// The anchor file found beside a shard's archive, if any.
fn beside(dir: &Path) -> Option<PathBuf> {
    let mut places = vec![dir.join(ANCHOR_FILE)];
    if dir.file_name().is_some_and(|n| n == "archive") {
        places.extend(dir.parent().map(|p| p.join(ANCHOR_FILE)));
    }
    places.into_iter().find(|p| p.exists())
}

fn check_shard(
    dir: &Path,
    index: Option<u16>,
    anchor_file: Option<&Path>,
    public_key: Option<&[u8; 32]>,
    report: &mut ArchiveReport,
) -> anyhow::Result<()> {
    let name = dir.display().to_string();
    let anchor = match (anchor_file, public_key) {
        (None, _) => None,
        (Some(path), None) => {
            report.problems.push(format!(
                "{name}: the anchor {} cannot be checked without assertion.pub (pass --keys)",
                path.display()
            ));
            return Ok(());
        }
        (Some(path), Some(key)) => match Anchor::load_file(path, key) {
            Ok(Some(anchor)) => Some(anchor),
            Ok(None) => {
                report.problems.push(format!("{name}: no anchor at {}", path.display()));
                return Ok(());
            }
            Err(e) => {
                report.problems.push(format!("{name}: {e}"));
                return Ok(());
            }
        },
    };
    let segments = journal::list_segments(dir)?;
    // With an anchor the shard and shard count are its; alone, only the name tells the shard.
    let (shard, count) = match &anchor {
        Some(a) => {
            if index.is_some_and(|i| i != a.shard) {
                report.problems.push(format!("{name}: the anchor is shard {}'s", a.shard));
            }
            (a.shard, a.shard_count)
        }
        None => (index.unwrap_or(0), 0),
    };
    let mut audit = verify::Report::default();
    let mut ledger = BTreeMap::new();
    let mut totals = Totals::default();
    let start = match &anchor {
        Some(a) => {
            verify::seed_from_anchor(shard, count, a, dir, &mut ledger, &mut totals, &mut audit)?;
            Start::Pruned { anchor: a.link(), archive: None }
        }
        None => {
            if let Some((first, _)) = segments.first().filter(|(first, _)| *first != 1) {
                report.problems.push(format!(
                    "{name}: starts at seq {first}: the records before it were pruned, so the \
                     chain can only be checked from the shard's anchor (copy shard-N/{ANCHOR_FILE} \
                     beside the segments or pass --anchor)"
                ));
                return Ok(());
            }
            Start::Full { archive: None }
        }
    };
    let mut first_seq = 0;
    let mut problems = Vec::new();
    let read = journal::read_from(dir, start, |seq, payload| {
        if first_seq == 0 {
            first_seq = seq;
        }
        totals.records += 1;
        match Entry::decode(payload) {
            Ok(e) => {
                verify::check_entry(shard, count, seq, &e, &mut ledger, &mut totals, &mut problems)
            }
            Err(e) => problems.push(format!("{name} seq {seq}: {e}")),
        }
        Ok(())
    });
    report.problems.append(&mut audit.problems);
    report.notes.append(&mut audit.notes);
    let summary = match read {
        Ok(summary) => summary,
        Err(e) => {
            report.problems.push(format!("{name}: {e}"));
            report.problems.extend(problems);
            return Ok(());
        }
    };
    if let Some(torn) = &summary.torn_tail {
        // The server archives only segments it has finished writing: an archived segment that
        // ends in a damaged record was damaged (or cut short by a copy) afterwards.
        problems.push(format!(
            "{name}: damaged record at {}:{} (seq {}): {}",
            torn.path.display(),
            torn.offset,
            torn.seq,
            torn.reason
        ));
    }
    let anchor_seq = anchor.as_ref().map(|a| a.seq);
    let head = match &anchor {
        Some(a) if summary.last_seq == a.seq => Some(a.hash),
        _ => crate::replicate::standby::chain_head(dir, dir, summary.last_seq),
    };
    let head = head.unwrap_or_else(|| {
        problems.push(format!("{name}: record {} unreadable", summary.last_seq));
        [0; 32]
    });
    if summary.records == 0 {
        report.notes.push(format!("{name}: holds no record after its start"));
    }
    totals.balances = verify::balances(&ledger);
    totals.card_deposits = verify::card_deposits(&ledger);
    totals.cards = ledger.len() as u64;
    let t = &totals;
    if t.card_deposits != t.card_deposits_expected() {
        problems.push(format!("{name}: {}", verify::card_deposits_problem(t)));
    }
    let net = t.deposits + t.top_ups - t.purchases - t.offline - t.refunds;
    if net != t.balances {
        problems.push(format!(
            "{name}: sum of balances {} != deposits {} + top-ups {} - purchases {} - offline {} - \
             refunds {} = {net}",
            t.balances, t.deposits, t.top_ups, t.purchases, t.offline, t.refunds
        ));
    }
    report.problems.extend(problems);
    report.shards.push(ArchiveShard {
        dir: dir.to_path_buf(),
        shard: index.or(anchor.as_ref().map(|a| a.shard)),
        anchor_seq,
        segments: segments
            .iter()
            .filter(|(first, _)| anchor_seq.is_none_or(|a| *first > a))
            .count(),
        first_seq,
        last_seq: summary.last_seq,
        head,
        totals,
    });
    Ok(())
}
