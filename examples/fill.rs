//! Fills a data directory with realistic journaled data without going through TLS: issues
//! cards and runs purchases and top-ups over them through `Shard::execute`, committing in group
//! commits of `--batch` like the shard worker. The result is a data directory `citycard serve`
//! opens and `citycard verify` passes (used by `scripts/storage_figures.sh`).
//!
//! ```text
//! cargo run --release --example fill -- --data DIR --keys DIR --shards 2 --cards 100000 --records 1000000
//! ```
//!
//! Each shard is filled by its own thread. Cards are picked with a skew (a quarter of the cards
//! get about three quarters of the traffic, like regular commuters); a card whose balance runs
//! low is topped up at a kiosk, so almost every request is approved and journaled.

mod fill_common;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use citycard::engine::{Op, Output, Secrets, Shard, ShardOptions};
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, Atc, CardAuth, CardId, MessageType, Request, Response, Status};
use clap::Parser;
use fill_common::{share, FillArgs, Rng, COUNTER, DEPOSIT, KIOSK, READER, TOP_UP};

/// Largest group commit (the server's `max_batch` bound).
const MAX_BATCH: usize = 65_536;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    fill: FillArgs,
    /// Add to an existing data directory: `--records` more transactions over the cards it holds
    /// (`--cards` more cards are issued first).
    #[arg(long)]
    append: bool,
    /// After the last commit, take no checkpoint and do not hand the state to sled: print
    /// `committed; waiting to be killed` and wait (at most 10 minutes) for a SIGKILL, so the
    /// data directory is left as a crash leaves it (journal tail past the checkpoint).
    #[arg(long)]
    wait_for_kill: bool,
}

/// The generator's view of one card.
struct Card {
    id: CardId,
    atc: u32,
    balance: i64,
}

struct Totals {
    issued: u64,
    approved: u64,
    declined: u64,
}

fn main() -> anyhow::Result<()> {
    let Args { fill: args, append, wait_for_kill } = Args::parse();
    let count = args.check(MAX_BATCH, append)?;
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
            crash: wait_for_kill,
        };
        let secrets = secrets.clone();
        threads.push(std::thread::spawn(move || fill_shard(options, secrets, plan)));
    }
    let mut totals = Totals { issued: 0, approved: 0, declined: 0 };
    for (index, thread) in threads.into_iter().enumerate() {
        let t = thread
            .join()
            .map_err(|_| anyhow::anyhow!("shard {index} thread panicked"))?
            .with_context(|| format!("filling shard {index}"))?;
        totals.issued += t.issued;
        totals.approved += t.approved;
        totals.declined += t.declined;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "filled {}: {} shards, {} cards issued, {} transactions approved, {} declined in {seconds:.1} s ({:.0} records/s)",
        args.data.display(),
        count,
        totals.issued,
        totals.approved,
        totals.declined,
        (totals.issued + totals.approved + totals.declined) as f64 / seconds.max(1e-9)
    );
    if wait_for_kill {
        use std::io::Write;
        println!("committed; waiting to be killed");
        std::io::stdout().flush()?;
        std::thread::sleep(std::time::Duration::from_secs(600));
        bail!("not killed within 10 minutes");
    }
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
    /// Leave the shard as a crash would (see `--wait-for-kill`).
    crash: bool,
}

fn fill_shard(options: ShardOptions, secrets: Arc<Secrets>, plan: Plan) -> anyhow::Result<Totals> {
    let Plan { cards, records, batch, seed, crash } = plan;
    let index = options.index;
    let (mut shard, _report) = Shard::open(options, secrets.clone())?;
    let version = secrets.current_version;
    let master =
        *secrets.issuer.get(&version.0).context("no issuer key for the current version")?;
    // Cards already there (--append): their ATC and balance as the shard holds them.
    let existing = shard.card_count();
    let mut wallet: Vec<Card> = shard
        .cards()?
        .into_iter()
        .filter(|(_, r)| !r.retired())
        .map(|(id, r)| Card { id, atc: r.last_atc.0, balance: r.balance.0 })
        .collect();
    wallet.sort_by_key(|c| c.id);
    wallet.reserve(usize::try_from(cards)?);
    let mut totals = Totals { issued: 0, approved: 0, declined: 0 };
    let mut in_batch = 0usize;
    let flush = |shard: &mut Shard, in_batch: &mut usize| -> anyhow::Result<()> {
        shard.commit()?;
        shard.persist_due(now_ms())?;
        *in_batch = 0;
        Ok(())
    };
    // op_ref is unique per (terminal, op_ref) across the whole server: give each shard its own
    // range.
    let op_base = (u64::from(index) << 40) + existing as u64;
    for k in 0..cards {
        let request = Request::Issue { op_ref: op_base + k + 1, deposit: Amount(DEPOSIT) };
        let Output::Response(answer) = shard.execute(COUNTER, Op::Request(&request), now_ms())?
        else {
            bail!("issue: unexpected output kind")
        };
        match answer.into_response() {
            Response::Issue(r) if r.status == Status::Approved => {
                wallet.push(Card { id: r.card_id, atc: 0, balance: DEPOSIT });
                totals.issued += 1;
            }
            other => bail!("issue declined: {other:?}"),
        }
        in_batch += 1;
        if in_batch >= batch {
            flush(&mut shard, &mut in_batch)?;
        }
    }
    let mut rng = Rng(seed | 1);
    let n = wallet.len() as u64;
    if n == 0 && records > 0 {
        bail!("shard {index} has no card to run transactions on");
    }
    for _ in 0..records {
        let card = &mut wallet[rng.skewed_card(n) as usize];
        let purchase = card.balance >= 500;
        let (message_type, amount, terminal) = if purchase {
            (MessageType::Purchase, 50 + rng.below(400) as i64, READER)
        } else {
            (MessageType::TopUp, TOP_UP, KIOSK)
        };
        card.atc += 1;
        let key = CardKey::derive(&master, version, card.id);
        let nonce = rng.next();
        let cryptogram = key.request_cryptogram(
            message_type as u8,
            card.id,
            Atc(card.atc),
            Amount(amount),
            nonce,
            terminal,
        );
        let auth = CardAuth { card_id: card.id, atc: Atc(card.atc), nonce, cryptogram };
        let request = if purchase {
            Request::Purchase { auth, amount: Amount(amount) }
        } else {
            Request::TopUp { auth, amount: Amount(amount) }
        };
        let Output::Response(answer) = shard.execute(terminal, Op::Request(&request), now_ms())?
        else {
            bail!("purchase: unexpected output kind")
        };
        // The status and balance are all this needs: the MAC is left to the encode.
        match answer.unsealed() {
            Response::Purchase(r) | Response::TopUp(r) => {
                if r.status == Status::Approved {
                    card.balance = r.balance.0;
                    totals.approved += 1;
                } else {
                    totals.declined += 1;
                }
            }
            _ => bail!("purchase: unexpected output kind"),
        }
        in_batch += 1;
        if in_batch >= batch {
            flush(&mut shard, &mut in_batch)?;
        }
    }
    flush(&mut shard, &mut in_batch)?;
    if crash {
        // Keep the shard (and its sled) open and untouched until the process is killed.
        std::mem::forget(shard);
        return Ok(totals);
    }
    // As the worker does at shutdown: everything to sled and a checkpoint at the last record.
    shard.checkpoint_now()?;
    shard.flush_state()?;
    Ok(totals)
}
