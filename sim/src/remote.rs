//! The simulated PostgreSQL: each shard's head row and its records keyed by (shard, seq), with
//! the acceptance rules of the COMMIT statement (`replicate/schema.rs`): records are taken only
//! from the head the writer expects and under the generation recorded for the shard, otherwise
//! nothing is taken and the statement reports 0 rows.

use std::collections::BTreeMap;

use citycard::replicate::flow::RemoteHead;

/// One record as `citycard_journal` holds it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub hash: [u8; 32],
    pub bytes: Vec<u8>,
    /// The record ends its group commit.
    pub batch_end: bool,
}

/// A statement's records: (seq, batch_end, bytes, hash), as the primary binds them.
pub type Rows = Vec<(u64, bool, Vec<u8>, [u8; 32])>;

#[derive(Debug)]
pub struct Remote {
    heads: Vec<RemoteHead>,
    records: BTreeMap<(u16, u64), Stored>,
}

impl Remote {
    /// A cluster founded at generation 1 with `shards` empty rows (what `schema::establish`
    /// does at a primary's first start).
    pub fn new(shards: u16) -> Remote {
        let head = RemoteHead { generation: 1, last_seq: 0, last_hash: [0; 32] };
        Remote { heads: vec![head; usize::from(shards)], records: BTreeMap::new() }
    }

    pub fn head(&self, shard: u16) -> Option<RemoteHead> {
        self.heads.get(usize::from(shard)).copied()
    }

    /// The COMMIT statement: rows taken (all of `rows`, or 0 when the head or the generation
    /// is not the one expected).
    pub fn commit(&mut self, shard: u16, prev: u64, generation: u64, rows: &Rows) -> u64 {
        let Some(head) = self.heads.get_mut(usize::from(shard)) else { return 0 };
        let Some(&(last, _, _, last_hash)) = rows.last() else { return 0 };
        if head.last_seq != prev || head.generation != generation {
            return 0;
        }
        head.last_seq = last;
        head.last_hash = last_hash;
        for (seq, batch_end, bytes, hash) in rows {
            let stored = Stored { hash: *hash, bytes: bytes.clone(), batch_end: *batch_end };
            self.records.insert((shard, *seq), stored);
        }
        rows.len() as u64
    }

    /// The heartbeat UPDATE: one row under the writer's generation.
    pub fn heartbeat(&self, shard: u16, generation: u64) -> u64 {
        u64::from(self.head(shard).is_some_and(|h| h.generation == generation))
    }

    pub fn record(&self, shard: u16, seq: u64) -> Option<&Stored> {
        self.records.get(&(shard, seq))
    }

    /// A shard's records in seq order, up to its head (what a standby follows).
    pub fn records(&self, shard: u16) -> impl Iterator<Item = (u64, &Stored)> {
        let last = self.head(shard).map_or(0, |h| h.last_seq);
        self.records.range((shard, 1)..(shard, last + 1)).map(|(&(_, seq), r)| (seq, r))
    }

    /// `citycard promote` at the other site: a new generation fences the old primary.
    pub fn promote(&mut self) {
        for head in &mut self.heads {
            head.generation += 1;
        }
    }
}
