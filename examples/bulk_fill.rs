//! Fills a data directory fast, for the storage figures at tens of millions of records: the
//! journal is written by the engine's own decisions and [`citycard::journal::Journal`] in group
//! commits, and the derived state, checkpoint and archive as a clean stop leaves them, by
//! [`citycard::engine::store::bulk`] (see there for what it writes and why). The result opens
//! without a replay, passes `citycard verify`, and rebuilds to the same state.
//!
//! ```text
//! cargo run --release --example bulk_fill -- --data DIR --keys DIR --shards 2 --cards 1000000 --records 9000000
//! ```
//!
//! An example of the server crate, like `fill` (which goes through `Shard::execute` and is
//! kept for `--append` and `--wait-for-kill`): it needs only the library's public API, is built
//! by the script that uses it, and stays out of the release binary and the load tester.
//!
//! Each shard is filled by its own thread. Cards are picked with the same skew as `fill` (a
//! quarter of the cards get about three quarters of the traffic); a card whose balance runs low
//! is topped up at a kiosk, so every request is an approved purchase or top-up.
//! Memory: 24 bytes per card in the fill (the card table), nothing per record.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use citycard::config::Config;
use citycard::engine::store::bulk::{BulkKind, BulkShard, MAX_GROUP_COMMIT};
use citycard::engine::{Secrets, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::Amount;
use clap::Parser;

/// Most cards or records one run may create (24 bytes of fill memory per card).
const MAX_CARDS: u64 = 50_000_000;
const MAX_RECORDS: u64 = 200_000_000;

#[derive(Parser)]
struct Args {
    /// Data directory (created; must not hold shards yet).
    #[arg(long)]
    data: PathBuf,
    /// Keys directory made by `citycard keys init`.
    #[arg(long)]
    keys: PathBuf,
    #[arg(long, default_value_t = 2)]
    shards: u16,
    /// Cards to issue (spread evenly over the shards).
    #[arg(long)]
    cards: u64,
    /// Purchases and top-ups to run after the issues.
    #[arg(long)]
    records: u64,
    /// Records per group commit (fdatasync), as the server's `max_batch`.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Seed of the card picker.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// xorshift64*: enough to spread requests over cards; no cryptographic use.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const READER: &str = "reader-1";
const KIOSK: &str = "kiosk-1";
const COUNTER: &str = "counter-1";
const DEPOSIT: i64 = 2_000;
const TOP_UP: i64 = 5_000;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.shards == 0 || usize::from(args.shards) > citycard_protocol::MAX_SHARDS {
        bail!("--shards must be 1..={}", citycard_protocol::MAX_SHARDS);
    }
    if args.cards == 0 && args.records > 0 {
        bail!("--records needs at least one card");
    }
    if args.cards > MAX_CARDS || args.records > MAX_RECORDS {
        bail!("at most {MAX_CARDS} cards and {MAX_RECORDS} records per run");
    }
    if !(1..=MAX_GROUP_COMMIT).contains(&args.batch) {
        bail!("--batch must be 1..={MAX_GROUP_COMMIT}");
    }
    if args.data.join("shards").exists() {
        bail!("{} already holds a data directory; give an empty one", args.data.display());
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let count = citycard::server::shard_count(&args.data, Some(args.shards))?;
    let secrets = Arc::new(citycard::server::load_secrets(&args.keys, &[])?);
    let defaults = Config::default();
    let started = Instant::now();
    let mut threads = Vec::new();
    for index in 0..count {
        let options = ShardOptions {
            index,
            count,
            dir: citycard::server::shard_dir(&args.data, index),
            journal: JournalOptions { segment_bytes: defaults.segment_bytes, ..Default::default() },
            limits: defaults.limits,
            checkpoint: defaults.checkpoint,
            archive: None,
        };
        let share = |total: u64| {
            total / u64::from(count) + u64::from(u64::from(index) < total % u64::from(count))
        };
        let plan = Plan {
            cards: share(args.cards),
            records: share(args.records),
            batch: args.batch,
            seed: args.seed ^ ((u64::from(index) + 1) * 0x9E37_79B9),
        };
        let secrets = secrets.clone();
        threads.push(std::thread::spawn(move || fill_shard(options, secrets, plan)));
    }
    let (mut cards, mut records, mut archived) = (0u64, 0u64, 0usize);
    for (index, thread) in threads.into_iter().enumerate() {
        let summary = thread
            .join()
            .map_err(|_| anyhow::anyhow!("shard {index} thread panicked"))?
            .with_context(|| format!("filling shard {index}"))?;
        cards += summary.cards;
        records += summary.last_seq;
        archived += summary.segments_archived;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "filled {}: {count} shards, {cards} cards, {records} records, {archived} segments archived in {seconds:.1} s ({:.0} records/s)",
        args.data.display(),
        records as f64 / seconds.max(1e-9)
    );
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What one shard's thread does.
struct Plan {
    cards: u64,
    records: u64,
    batch: usize,
    seed: u64,
}

fn fill_shard(
    options: ShardOptions,
    secrets: Arc<Secrets>,
    plan: Plan,
) -> anyhow::Result<citycard::engine::store::bulk::BulkSummary> {
    let Plan { cards, records, batch, seed } = plan;
    // op_ref is unique per (terminal, op_ref) across the whole server: each shard its own range.
    let op_base = u64::from(options.index) << 40;
    let mut shard = BulkShard::create(options, secrets, batch)?;
    // The decision time: read once per group commit, like a worker's batch.
    let mut now = now_ms();
    for k in 0..cards {
        if k % batch as u64 == 0 {
            now = now_ms();
        }
        shard.issue(COUNTER, op_base + k + 1, Amount(DEPOSIT), now)?;
    }
    let mut rng = Rng(seed | 1);
    let n = shard.cards();
    let hot = (n / 4).max(1);
    for r in 0..records {
        if r % batch as u64 == 0 {
            now = now_ms();
        }
        // Three quarters of the traffic on the first quarter of the cards.
        let k = if rng.below(4) < 3 { rng.below(hot) } else { rng.below(n) };
        let balance = shard.balance(k).context("picked a card that is not issued")?;
        let nonce = rng.next();
        if balance >= 500 {
            let amount = Amount(50 + rng.below(400) as i64);
            shard.card_transaction(READER, BulkKind::Purchase, k, amount, nonce, now)?;
        } else {
            shard.card_transaction(KIOSK, BulkKind::TopUp, k, Amount(TOP_UP), nonce, now)?;
        }
    }
    Ok(shard.finish()?)
}
