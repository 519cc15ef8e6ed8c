//! The shard engine: decides card and staff operations, journals them (group commit), and keeps
//! the derived state in memory and sled. One `Shard` is owned by one thread.
//!
//! The engine reads no clock and starts no thread: time comes in as `now_ms`, opening takes an
//! [`OpenHost`] (the time that names a state set aside, the pause while sled's lock is held),
//! and the sled write-behind is a [`PersistJob`] the driver runs through a [`WriteBehind`]
//! ([`Inline`], [`Stepped`], or the server's own thread). One thread can drive it
//! deterministically.
//!
//! # Layout
//! - [`types`]: inputs and outputs (secrets, limits, options, `Op`, `Output`, `OpenReport`).
//! - [`error`]: `StoreError`, the fail-stop storage failures.
//! - [`shard`]: the `Shard` and its call pattern; the rest of `impl Shard` is split by idea:
//!   `open` (start and recovery), `apply`, `persist` (write-behind and checkpoints), `walk`
//!   (card chains and exactly-once lookups), `hotlist`, `auth` (card keys), `answer` (answer
//!   shapes and their MAC), `card_ops` and `staff_ops` (the operations).
//! - [`decide`]: every operation's decision as a pure function, with table tests.
//! - [`cards`]: the card records behind a narrow interface.
//! - `overlay`: committed entries sled has not confirmed; [`persister`]: the write-behind
//!   jobs and the [`WriteBehind`] that runs them.
//! - [`recovery`]: which start failures rebuild the state and which stop.
//! - [`entry`], [`state`], [`checkpoint`]: the journal record, sled layout, checkpoint file.
//! - [`product`]: card products (protocol 1.3): the product table, a card's product, deposit and
//!   daily counters, and the product fields of version 4 journal entries.
//! - [`store`]: the card table in sled behind a bounded cache, its compact codec and the
//!   background check of the card digest.
//! - [`decide`]: decisions as pure functions (`decide::transit`: holds, reversals, inquiries);
//!   `transit_ops`: the shard side of those operations (lookups, journal, answers).
//! - `numbered`: protocol 1.3 numbered offline uploads: the (terminal, seq) index and the order
//!   of one numbered record's decision.

mod answer;
mod apply;
mod auth;
mod card_ops;
pub mod cards;
pub mod checkpoint;
pub mod decide;
#[cfg(test)]
mod driver_tests;
pub mod entry;
pub mod error;
mod holds;
mod hotlist;
mod numbered;
mod open;
mod overlay;
pub(crate) mod persist;
pub mod persister;
pub mod product;
pub mod recovery;
pub mod shard;
mod staff_ops;
pub mod state;
pub mod store;
mod transit_ops;
pub mod types;
mod walk;

pub use checkpoint::CheckpointPolicy;
pub use citycard_protocol::answer::seal;
pub use error::StoreError;
pub use persister::{Inline, PersistJob, Stepped, WriteBehind};
pub use recovery::{OpenHost, RebuildReason};
pub use shard::Shard;
pub use types::{Limits, Op, OpenReport, Output, Secrets, ShardOptions};

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
