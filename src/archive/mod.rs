//! Retention of the archive: `citycard archive prune` removes old archived journal segments
//! behind a signed anchor ([`anchor`]), so that `verify` still checks the chain from the anchor
//! and settlement still reconciles from it.
//!
//! - [`anchor`]: the anchor file, its signature and its format.
//! - [`ledger`]: the replay a prune runs over the records it removes.
//! - [`prune`]: the prune itself and its crash-safe order.
//! - [`check`]: `citycard verify --archive`, an archive checked by itself.

pub mod anchor;
pub mod check;
pub mod ledger;
pub mod prune;

pub use anchor::{Anchor, AnchorError, DayFlows, ANCHOR_FILE};
pub use prune::{prune, PruneOptions, ShardPruned};

/// Loads every shard's anchor (None for a shard never pruned), checking each signature with
/// `public_key`. Without a key, any anchor present is an error: an anchor nobody checked
/// cannot stand for the records it replaced.
pub fn load_anchors(
    data_dir: &std::path::Path,
    shards: u16,
    public_key: Option<&[u8; 32]>,
) -> anyhow::Result<Vec<Option<Anchor>>> {
    let mut out = Vec::with_capacity(usize::from(shards));
    for index in 0..shards {
        let dir = crate::layout::shard_dir(data_dir, index);
        match public_key {
            Some(key) => out.push(Anchor::load(&dir, key)?),
            None if Anchor::exists(&dir) => anyhow::bail!(
                "shard {index} was pruned: its anchor {} needs assertion.pub to be checked",
                dir.join(ANCHOR_FILE).display()
            ),
            None => out.push(None),
        }
    }
    Ok(out)
}
