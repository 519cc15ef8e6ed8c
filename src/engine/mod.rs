//! The shard engine: decides card and staff operations, journals them (group commit), and keeps
//! the derived state in memory and sled. One `Shard` is owned by one thread.

pub mod checkpoint;
pub mod entry;
mod overlay;
mod persister;
pub mod recovery;
pub mod shard;
pub mod state;
pub mod store;

pub use checkpoint::CheckpointPolicy;
pub use recovery::RebuildReason;
pub use shard::{Limits, Op, OpenReport, Output, Secrets, Shard, ShardOptions, StoreError};

use citycard_protocol::CardId;

/// Card ids start here so they look like 16-digit card numbers.
pub const CARD_ID_BASE: u64 = 6_000_000_000_000_000;

/// The shard that owns a card. Every card id the server issues satisfies
/// `shard_of(id) == shard that issued it`.
pub fn shard_of(card: CardId, shard_count: u16) -> u16 {
    let n = u64::from(shard_count.max(1));
    (card.0.wrapping_sub(CARD_ID_BASE) % n) as u16
}

/// The `k`-th card id issued by `shard`.
pub fn card_id_for(shard: u16, shard_count: u16, k: u64) -> CardId {
    CardId(CARD_ID_BASE + k * u64::from(shard_count.max(1)) + u64::from(shard))
}

/// The inverse of [`card_id_for`]: the allocation counter of a card id.
pub fn card_counter(card: CardId, shard_count: u16) -> u64 {
    card.0.wrapping_sub(CARD_ID_BASE) / u64::from(shard_count.max(1))
}
