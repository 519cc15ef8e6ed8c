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
