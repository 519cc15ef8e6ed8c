//! The overlay: committed entries sled has not confirmed yet, in chunks, with lookups by
//! journal position (the per-card chains pass through it before records are readable from the
//! journal files) and by staff op_ref. Reads look here first.

use std::collections::HashMap;

use super::entry::Entry;
use super::persist::is_staff;
use crate::int_hash::IntMap;
use crate::journal::Pos;

/// An entry decided but not yet confirmed in sled.
pub(super) struct Pending {
    pub(super) seq: u64,
    /// Where it lies in the journal (once committed).
    pub(super) pos: Pos,
    pub(super) entry: Entry,
}

/// A run of committed entries with lookup maps, newest chunk last.
pub(super) struct Chunk {
    pub(super) entries: Vec<Pending>,
    /// Entries by journal position: the per-card chain passes through here before the
    /// records are readable from the journal files (they may not be committed yet). The
    /// journal assigns the positions, so the unkeyed [`crate::int_hash`] is safe here; SipHash
    /// cost more than the rest of the insert (loadtest/profile.sh callgrind).
    pub(super) by_pos: IntMap<Pos, usize>,
    pub(super) ops: HashMap<(String, u64), usize>,
    /// Numbered offline entries by (terminal, terminal seq) (protocol 1.3).
    pub(super) seqs: HashMap<(String, u64), usize>,
    /// The highest terminal seq of each terminal in this chunk.
    pub(super) seq_high: HashMap<String, u64>,
    /// The driver's clock (Unix ms) when its first entry arrived.
    pub(super) started_ms: u64,
    /// Set when handed to the persister: the highest seq it holds.
    pub(super) sealed_at: Option<u64>,
}

impl Chunk {
    pub(super) fn new(started_ms: u64) -> Chunk {
        Chunk {
            entries: Vec::new(),
            by_pos: IntMap::default(),
            ops: HashMap::new(),
            seqs: HashMap::new(),
            seq_high: HashMap::new(),
            started_ms,
            sealed_at: None,
        }
    }
}

/// Committed entries sled has not confirmed yet. Reads look here first.
#[derive(Default)]
pub(super) struct Overlay {
    pub(super) chunks: std::collections::VecDeque<Chunk>,
}

impl Overlay {
    /// Adds a committed (or about to be committed) entry; `now_ms` starts a new chunk's age.
    pub(super) fn push(&mut self, seq: u64, pos: Pos, entry: Entry, now_ms: u64) {
        if self.chunks.back().is_none_or(|c| c.sealed_at.is_some()) {
            self.chunks.push_back(Chunk::new(now_ms));
        }
        let Some(chunk) = self.chunks.back_mut() else { return };
        let index = chunk.entries.len();
        chunk.by_pos.insert(pos, index);
        if is_staff(entry.kind) {
            chunk.ops.insert((entry.terminal.clone(), entry.reference), index);
        }
        if entry.claims_seq() {
            let high = chunk.seq_high.entry(entry.terminal.clone()).or_default();
            *high = (*high).max(entry.numbered.seq);
            chunk.seqs.insert((entry.terminal.clone(), entry.numbered.seq), index);
        }
        chunk.entries.push(Pending { seq, pos, entry });
    }

    pub(super) fn terminal_seq(&self, terminal: &str, terminal_seq: u64) -> Option<&Pending> {
        let key = (terminal.to_owned(), terminal_seq);
        self.chunks.iter().rev().find_map(|c| c.seqs.get(&key).map(|i| &c.entries[*i]))
    }

    /// The highest terminal seq of `terminal` among the overlay's entries (0: none).
    pub(super) fn highest_seq(&self, terminal: &str) -> u64 {
        self.chunks.iter().filter_map(|c| c.seq_high.get(terminal)).copied().max().unwrap_or(0)
    }

    pub(super) fn at(&self, pos: Pos) -> Option<&Pending> {
        self.chunks.iter().rev().find_map(|c| c.by_pos.get(&pos).map(|i| &c.entries[*i]))
    }

    pub(super) fn op(&self, terminal: &str, op_ref: u64) -> Option<&Pending> {
        let key = (terminal.to_owned(), op_ref);
        self.chunks.iter().rev().find_map(|c| c.ops.get(&key).map(|i| &c.entries[*i]))
    }

    /// Oldest first.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = &Pending> {
        self.chunks.iter().flat_map(|c| c.entries.iter())
    }

    /// The chunk still being filled, if any.
    pub(super) fn current(&self) -> Option<&Chunk> {
        self.chunks.back().filter(|c| c.sealed_at.is_none() && !c.entries.is_empty())
    }

    /// Drops sealed chunks sled has confirmed.
    pub(super) fn trim(&mut self, persisted: u64) {
        while self.chunks.front().is_some_and(|c| c.sealed_at.is_some_and(|s| s <= persisted)) {
            self.chunks.pop_front();
        }
    }
}
