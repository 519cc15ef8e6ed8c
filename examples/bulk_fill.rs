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

mod fill_common;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use citycard::engine::store::bulk::{BulkKind, BulkShard, MAX_GROUP_COMMIT};
use citycard::engine::{Secrets, ShardOptions};
use citycard_protocol::Amount;
use clap::Parser;
use fill_common::{share, FillArgs, Rng, COUNTER, DEPOSIT, KIOSK, READER, TOP_UP};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    fill: FillArgs,
}

fn main() -> anyhow::Result<()> {
    let Args { fill: args } = Args::parse();
    let count = args.check(MAX_GROUP_COMMIT, false)?;
    let secrets = Arc::new(citycard::server::load_secrets(&args.keys, &[])?);
    let started = Instant::now();
    let mut threads = Vec::new();
    for index in 0..count {
        let options = args.shard(index, count);
        let plan = Plan {
            cards: share(args.cards, index, count),
            records: share(args.records, index, count),
            batch: args.batch,
            seed: args.seed_of(index),
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
    for r in 0..records {
        if r % batch as u64 == 0 {
            now = now_ms();
        }
        let k = rng.skewed_card(n);
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
