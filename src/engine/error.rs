//! Storage failures of the engine: every one of them is fail-stop for the server.

use std::path::PathBuf;

use super::entry::EntryError;
use crate::journal::JournalError;

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
    /// A value read from sled does not have its format (applied_seq, an index value, a hotlist
    /// entry): the derived state is rebuilt from the journal at the next start.
    #[error("derived state: {what} malformed ({detail})")]
    MalformedState { what: &'static str, detail: String },
    /// A card's chain of journal records passes through a record of another card.
    #[error("the chain of card {card} passes through seq {seq}, a record of another card")]
    ChainBroken { card: String, seq: u64 },
    /// The (terminal, op_ref) index names a record the journal does not hold there.
    #[error("op_ref index points at seq {indexed} but the journal holds seq {found} there")]
    IndexMismatch { indexed: u64, found: u64 },
    /// A journal entry broke an invariant where it crosses the journal boundary (before it is
    /// appended, or after it is read back or replayed).
    #[error("journal record {seq}: invariant broken: {invariant}")]
    Invariant { seq: u64, invariant: &'static str },
    /// A state rebuilt from nothing could not be opened either.
    #[error("fresh state unusable: {0}")]
    FreshStateUnusable(super::RebuildReason),
    /// The state disagreed with the journal again after it was rebuilt.
    #[error("state still disagrees with the journal after a rebuild")]
    StillDisagrees,
    /// The journal was used while the shard was being opened.
    #[error("journal not open")]
    JournalNotOpen,
    /// Derived state was to be written while decided records were not yet committed.
    #[error("persist before commit ({pending} records pending)")]
    PersistBeforeCommit { pending: usize },
    /// The write-behind stopped (its worker died or its queue closed).
    #[error("the state write-behind stopped")]
    PersisterStopped,
    /// sled did not apply the state within the write-behind's bound.
    #[error("sled did not apply the state within {waited_ms} ms")]
    PersistStuck { waited_ms: u64 },
    /// A drained write-behind has not applied everything handed to it.
    #[error("sled holds seq {persisted} after a drain, but seq {applied_seq} was handed to it")]
    PersistBehind { persisted: u64, applied_seq: u64 },
    /// A connection-level request (Hello, offline batch, hotlist sync) reached a shard.
    #[error("connection-level request {0:?} routed to a shard")]
    NotForShard(citycard_protocol::MessageType),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The archive was pruned and its signed anchor cannot be used (damaged, or signed by
    /// another key): the records it stands for are gone, so nothing is rebuilt from a guess.
    #[error("prune anchor unusable: {0}; restore the anchor file or the keys it was signed with")]
    Anchor(String),
    /// The derived state opens but does not match what it records about itself (its card
    /// digest): it is rebuilt from the journal, never trusted.
    #[error("derived state disagrees with itself: {0}")]
    Disagrees(Disagreement),
    /// The environment failed the derived state (disk full, I/O error, no permission,
    /// read-only filesystem): the data is not at fault, so nothing was rebuilt or moved.
    #[error(
        "storage error on {}: {cause} (not corruption: the state was left in place; {})",
        path.display(),
        super::recovery::operator_hint(cause)
    )]
    Storage { path: PathBuf, cause: std::io::Error },
}

/// How a derived state disagrees with itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Disagreement {
    #[error("a card key is malformed")]
    CardKeyMalformed,
    /// The card number is masked, as everywhere in logs.
    #[error("the record of card {card} is malformed")]
    CardRecordMalformed { card: String },
    #[error("the card digest is malformed")]
    DigestMalformed,
    #[error("the {cards} card records do not match the card digest recorded at seq {applied_seq}")]
    DigestMismatch { cards: usize, applied_seq: u64 },
    /// The card table was written in another format (by another version of the server).
    #[error("card records are in format {found} (written by another version); this version reads format {expected}")]
    OldFormat { found: u64, expected: u64 },
    /// A meta value of the card table (its count, format) is malformed.
    #[error("the card table's {0} is malformed")]
    MetaMalformed(&'static str),
    /// The card table holds records but says it holds none.
    #[error("card records present but the card count is 0")]
    CountMissing,
    /// The background check of the card records found them not matching their digest (see
    /// `engine::store::verify`); `detail` names what it found.
    #[error("the card records failed their check: {0}")]
    Verification(String),
    /// An earlier background check marked this state: it is not served again.
    #[error("an earlier check found the card records not matching their digest: {0}")]
    MarkedBad(String),
}
