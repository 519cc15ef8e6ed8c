//! The derived state a standby keeps up while it follows, so that a promoted directory starts
//! by replaying only the records since the standby's last build instead of rebuilding sled
//! from the whole journal (which takes minutes at tens of millions of records: the time a city
//! waits for its DR site).
//!
//! A build opens every shard's engine on the standby's own journal exactly as `serve` does at a
//! start ([`Shard::open`]: replay what sled lacks, write a checkpoint, archive the segments
//! below it), then closes it. The journal stays the truth: a state that disagrees is rebuilt
//! by the same rules as at any start, and a standby without a build is served as before.
//! The follower closes its journals while a build runs and opens them again after it (from the
//! checkpoint), so there is one writer at a time; the PostgreSQL pair keeps the DR copy
//! meanwhile, so the pause costs the standby lag, never an acknowledged transaction.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::config::Config;
use crate::engine::{OpenReport, Secrets, Shard, ShardOptions};
use crate::journal::JournalOptions;

/// Records followed (over all shards) between two builds by default: a build then replays
/// about a million records (a few seconds), and a promotion replays at most that many.
pub const DEFAULT_STATE_EVERY_RECORDS: u64 = 1_000_000;

/// What the standby needs to build the derived state: the key set it will serve with (the
/// engine opens with the server's secrets) and how often.
#[derive(Clone)]
pub struct StateBuild {
    pub secrets: Arc<Secrets>,
    pub every_records: u64,
    pub segment_bytes: u64,
}

impl StateBuild {
    /// Loads the key set in `keys_dir` (the one the promoted site will serve with).
    pub fn load(keys_dir: &Path, every_records: u64, segment_bytes: u64) -> anyhow::Result<Self> {
        let secrets = crate::server::load_secrets(keys_dir, &[])
            .with_context(|| format!("loading the keys in {}", keys_dir.display()))?;
        Ok(StateBuild { secrets: Arc::new(secrets), every_records, segment_bytes })
    }

    /// Brings every shard's derived state up to its journal (blocking: run it off the async
    /// threads). The journals must not be open elsewhere.
    pub fn build(&self, data_dir: &Path) -> anyhow::Result<Vec<OpenReport>> {
        let count = crate::layout::shard_count(data_dir, None)?;
        let archive_root = crate::layout::archive_root(data_dir, None)?;
        let defaults = Config::default();
        let mut reports = Vec::new();
        for index in 0..count {
            let options = ShardOptions {
                index,
                count,
                dir: crate::layout::shard_dir(data_dir, index),
                journal: JournalOptions { segment_bytes: self.segment_bytes, ..Default::default() },
                limits: defaults.limits,
                checkpoint: defaults.checkpoint,
                archive: Some(crate::layout::archive_dir(data_dir, archive_root.as_deref(), index)),
            };
            let (shard, report) = Shard::open(options, self.secrets.clone())
                .with_context(|| format!("building the derived state of shard {index}"))?;
            drop(shard);
            reports.push(report);
        }
        Ok(reports)
    }
}
