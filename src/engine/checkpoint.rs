//! Checkpoints: a durable record that a shard's derived state matched its journal at a seq.
//!
//! A checkpoint holds the journal seq, the hash of that record (the journal's [`Anchor`]), and a
//! digest of every card record as of that seq. It is written (temp file, fsync, rename, fsync of
//! the directory) only after sled has flushed a state at or beyond that seq, so after a crash
//! the derived state is never behind a checkpoint that exists. A start reads the journal from
//! the checkpoint's segment only, and the segments below it can be archived.
//!
//! File `shard-N/checkpoint`, 96 bytes, integers little-endian:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `b"CITYCKPT"` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 8 | seq |
//! | 24 | 32 | hash of the journal record `seq` |
//! | 56 | 32 | [`StateDigest`] of all cards at `seq` |
//! | 88 | 4 | cards at `seq` (saturating) |
//! | 92 | 4 | CRC-32C of bytes 0..92 |

use std::path::{Path, PathBuf};

use citycard_protocol::CardId;

use super::state::CardRecord;
use crate::journal::{Anchor, RecordHash};

/// File name of a shard's checkpoint.
pub const CHECKPOINT_FILE: &str = "checkpoint";
const MAGIC: &[u8; 8] = b"CITYCKPT";
const VERSION: u32 = 1;
const LEN: usize = 96;

/// When a shard takes a checkpoint: after this many records or this long since the last one,
/// whichever comes first. Both bound the restart: a start replays at most the records since the
/// last checkpoint (plus the rest of its segment's scan).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    pub records: u64,
    pub interval_ms: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        // 200,000 records replay in well under a second here (see README, Storage); five
        // minutes keeps a quiet shard's restart short too.
        CheckpointPolicy { records: 200_000, interval_ms: 300_000 }
    }
}

/// An order-independent digest of a set of card records: the sum, lane by lane, of SHA-256 of
/// (card id, record). Adding and removing one card is O(1), so the shard keeps it current on
/// every change, and a start compares it with the digest of the records it loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateDigest([u64; 4]);

impl StateDigest {
    fn term(id: CardId, record: &CardRecord) -> [u64; 4] {
        // The card id, then the record as sled stores it (its encoding is canonical).
        let encoded = super::store::codec::encode(record);
        let mut input = [0u8; 8 + super::store::codec::MAX_LEN];
        input[..8].copy_from_slice(&id.0.to_be_bytes());
        input[8..8 + encoded.len()].copy_from_slice(&encoded);
        let h = ring::digest::digest(&ring::digest::SHA256, &input[..8 + encoded.len()]);
        let h = h.as_ref();
        std::array::from_fn(|i| {
            let mut lane = [0u8; 8];
            lane.copy_from_slice(&h[i * 8..i * 8 + 8]);
            u64::from_le_bytes(lane)
        })
    }

    pub fn add(&mut self, id: CardId, record: &CardRecord) {
        let t = Self::term(id, record);
        for (lane, v) in self.0.iter_mut().zip(t) {
            *lane = lane.wrapping_add(v);
        }
    }

    pub fn remove(&mut self, id: CardId, record: &CardRecord) {
        let t = Self::term(id, record);
        for (lane, v) in self.0.iter_mut().zip(t) {
            *lane = lane.wrapping_sub(v);
        }
    }

    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, lane) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&lane.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<StateDigest> {
        let bytes: &[u8; 32] = bytes.try_into().ok()?;
        Some(StateDigest(std::array::from_fn(|i| {
            let mut lane = [0u8; 8];
            lane.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(lane)
        })))
    }
}

/// A checkpoint: the derived state matched the journal at `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: RecordHash,
    pub digest: StateDigest,
    pub cards: u32,
}

/// Why a checkpoint file could not be used (the start then scans the whole journal).
#[derive(thiserror::Error, Debug)]
pub enum CheckpointError {
    #[error("checkpoint {} unreadable: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {} is damaged: {reason}", path.display())]
    Damaged { path: PathBuf, reason: &'static str },
}

impl Checkpoint {
    pub fn anchor(&self) -> Anchor {
        Anchor { seq: self.seq, hash: self.hash }
    }

    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..56].copy_from_slice(&self.hash);
        out[56..88].copy_from_slice(&self.digest.to_bytes());
        out[88..92].copy_from_slice(&self.cards.to_le_bytes());
        let crc = crc32c::crc32c(&out[..92]);
        out[92..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, &'static str> {
        if bytes.len() != LEN {
            return Err("wrong length");
        }
        let le32 =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        if le32(92) != crc32c::crc32c(&bytes[..92]) {
            return Err("CRC mismatch");
        }
        if &bytes[..8] != MAGIC {
            return Err("not a checkpoint file");
        }
        if le32(8) != VERSION {
            return Err("unknown format version");
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[16..24]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[24..56]);
        let digest = StateDigest::from_bytes(&bytes[56..88]).ok_or("digest")?;
        Ok(Checkpoint { seq: u64::from_le_bytes(seq), hash, digest, cards: le32(88) })
    }

    /// The shard's checkpoint, `Ok(None)` when it has none yet.
    pub fn load(shard_dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = shard_dir.join(CHECKPOINT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Checkpoint::decode(&bytes)
                .map(Some)
                .map_err(|reason| CheckpointError::Damaged { path, reason }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io { path, source }),
        }
    }

    /// Writes the checkpoint crash-safely: after a crash the file holds the old or the new one.
    pub fn store(&self, shard_dir: &Path) -> std::io::Result<()> {
        crate::durable_write(&shard_dir.join(CHECKPOINT_FILE), &self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(balance: i64) -> CardRecord {
        CardRecord::test_active(balance, 3, crate::journal::Pos { segment: 1, offset: 32 })
    }

    #[test]
    fn digest_is_order_independent_and_undoes() {
        let (a, b) = (CardId(6_000_000_000_000_000), CardId(6_000_000_000_000_001));
        let mut x = StateDigest::default();
        x.add(a, &record(5));
        x.add(b, &record(7));
        let mut y = StateDigest::default();
        y.add(b, &record(7));
        y.add(a, &record(5));
        assert_eq!(x, y);
        y.remove(a, &record(5));
        y.add(a, &record(6));
        assert_ne!(x, y);
        y.remove(a, &record(6));
        y.add(a, &record(5));
        assert_eq!(x, y);
    }

    #[test]
    fn checkpoint_round_trips_and_damage_is_refused() {
        let mut digest = StateDigest::default();
        digest.add(CardId(1), &record(1));
        let cp = Checkpoint { seq: 77, hash: [3; 32], digest, cards: 1 };
        let bytes = cp.encode();
        assert_eq!(Checkpoint::decode(&bytes), Ok(cp));
        for i in 0..LEN {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {i}");
        }
        assert!(Checkpoint::decode(&bytes[..95]).is_err());
    }
}
