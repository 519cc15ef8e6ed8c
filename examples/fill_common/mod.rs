//! What the two fill examples (`fill`, `bulk_fill`) share: their arguments, the checks on them,
//! each shard's options and share of the work, the card picker and the terminals they act as.

use std::path::PathBuf;

use anyhow::{bail, Context};
use citycard::config::Config;
use citycard::engine::ShardOptions;
use citycard::journal::JournalOptions;

/// Most cards or records one run may create (a fill keeps 16 to 24 bytes per card).
pub const MAX_CARDS: u64 = 50_000_000;
pub const MAX_RECORDS: u64 = 200_000_000;

pub const READER: &str = "reader-1";
pub const KIOSK: &str = "kiosk-1";
pub const COUNTER: &str = "counter-1";
/// Each card's initial balance, and what a kiosk tops a low card up by.
pub const DEPOSIT: i64 = 2_000;
pub const TOP_UP: i64 = 5_000;

#[derive(clap::Args)]
pub struct FillArgs {
    /// Data directory (created; must not hold shards yet).
    #[arg(long)]
    pub data: PathBuf,
    /// Keys directory made by `citycard keys init`.
    #[arg(long)]
    pub keys: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub shards: u16,
    /// Cards to issue (spread evenly over the shards).
    #[arg(long)]
    pub cards: u64,
    /// Purchases and top-ups to run after the issues.
    #[arg(long)]
    pub records: u64,
    /// Records per group commit (fdatasync), as the server's `max_batch`.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// Seed of the card picker.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl FillArgs {
    /// Refuses what a run cannot do; `append`: the data directory must exist instead of not.
    /// Creates the directory and returns its shard count.
    pub fn check(&self, max_batch: usize, append: bool) -> anyhow::Result<u16> {
        if self.shards == 0 || usize::from(self.shards) > citycard_protocol::MAX_SHARDS {
            bail!("--shards must be 1..={}", citycard_protocol::MAX_SHARDS);
        }
        if self.cards == 0 && self.records > 0 && !append {
            bail!("--records needs at least one card");
        }
        if self.cards > MAX_CARDS || self.records > MAX_RECORDS {
            bail!("at most {MAX_CARDS} cards and {MAX_RECORDS} records per run");
        }
        if !(1..=max_batch).contains(&self.batch) {
            bail!("--batch must be 1..={max_batch}");
        }
        if self.data.join("shards").exists() != append {
            if append {
                bail!("--append: {} holds no data directory", self.data.display());
            }
            bail!("{} already holds a data directory; give an empty one", self.data.display());
        }
        std::fs::create_dir_all(&self.data)
            .with_context(|| format!("creating {}", self.data.display()))?;
        let wanted = if append { None } else { Some(self.shards) };
        citycard::server::shard_count(&self.data, wanted)
    }

    /// Shard `index` of `count`: its options (the server's defaults), its share of `total`
    /// and its own seed.
    pub fn shard(&self, index: u16, count: u16) -> ShardOptions {
        let defaults = Config::default();
        ShardOptions {
            index,
            count,
            dir: citycard::server::shard_dir(&self.data, index),
            journal: JournalOptions { segment_bytes: defaults.segment_bytes, ..Default::default() },
            limits: defaults.limits,
            checkpoint: defaults.checkpoint,
            archive: None,
        }
    }

    pub fn seed_of(&self, index: u16) -> u64 {
        self.seed ^ ((u64::from(index) + 1) * 0x9E37_79B9)
    }
}

/// Shard `index`'s part of `total` when `count` shards split it evenly.
pub fn share(total: u64, index: u16, count: u16) -> u64 {
    total / u64::from(count) + u64::from(u64::from(index) < total % u64::from(count))
}

/// xorshift64*: enough to spread requests over cards; no cryptographic use.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A card of `n`: three quarters of the traffic on the first quarter of the cards (like
    /// regular commuters).
    pub fn skewed_card(&mut self, n: u64) -> u64 {
        let hot = (n / 4).max(1);
        if self.below(4) < 3 {
            self.below(hot)
        } else {
            self.below(n)
        }
    }
}
