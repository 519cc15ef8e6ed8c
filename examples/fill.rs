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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use citycard::config::Config;
use citycard::engine::{Op, Output, Secrets, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, Atc, CardAuth, CardId, MessageType, Request, Response, Status};
use clap::Parser;

/// Most cards or records one run may create (about 16 bytes of generator memory per card).
const MAX_CARDS: u64 = 50_000_000;
const MAX_RECORDS: u64 = 200_000_000;
/// Largest group commit (the server's `max_batch` bound).
const MAX_BATCH: usize = 65_536;

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
    /// Jobs per group commit, as the server's `max_batch`.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Seed of the card picker.
    #[arg(long, default_value_t = 1)]
    seed: u64,
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
    if args.cards == 0 && args.records > 0 && !args.append {
        bail!("--records needs at least one card");
    }
    if args.cards > MAX_CARDS || args.records > MAX_RECORDS {
        bail!("at most {MAX_CARDS} cards and {MAX_RECORDS} records per run");
    }
    if !(1..=MAX_BATCH).contains(&args.batch) {
        bail!("--batch must be 1..={MAX_BATCH}");
    }
    if args.data.join("shards").exists() != args.append {
        if args.append {
            bail!("--append: {} holds no data directory", args.data.display());
        }
        bail!("{} already holds a data directory; give an empty one", args.data.display());
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let wanted = if args.append { None } else { Some(args.shards) };
    let count = citycard::server::shard_count(&args.data, wanted)?;
    let secrets = Arc::new(citycard::server::load_secrets(&args.keys, &[])?);
    let defaults = Config::default();
    let started = Instant::now();
    let mut threads = Vec::new();
    for index in 0..count {
        let options = ShardOptions {
            index,
            count,
            dir: citycard::server::shard_dir(&args.data, index),
            journal: JournalOptions { segment_bytes: defaults.segment_bytes, faults: None },
            limits: defaults.limits,
            checkpoint: defaults.checkpoint,
            archive: None,
        };
        let share = |total: u64| {
            total / u64::from(count) + u64::from(u64::from(index) < total % u64::from(count))
        };
        let cards = share(args.cards);
        let records = share(args.records);
        let secrets = secrets.clone();
        let (batch, seed) = (args.batch, args.seed ^ ((u64::from(index) + 1) * 0x9E37_79B9));
        let plan = Plan { cards, records, batch, seed, crash: args.wait_for_kill };
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
    if args.wait_for_kill {
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
    let mut wallet: Vec<Card> = shard
        .cards()
        .filter(|(_, r)| !r.retired())
        .map(|(id, r)| Card { id: *id, atc: r.last_atc.0, balance: r.balance.0 })
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
    let op_base = (u64::from(index) << 40) + shard.cards().count() as u64;
    for k in 0..cards {
        let request = Request::Issue { op_ref: op_base + k + 1, deposit: Amount(DEPOSIT) };
        match shard.execute(COUNTER, Op::Request(&request), now_ms())? {
            Output::Response(Response::Issue(r)) if r.status == Status::Approved => {
                wallet.push(Card { id: r.card_id, atc: 0, balance: DEPOSIT });
                totals.issued += 1;
            }
            Output::Response(other) => bail!("issue declined: {other:?}"),
            _ => bail!("issue: unexpected output kind"),
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
    let hot = (n / 4).max(1);
    for _ in 0..records {
        // Three quarters of the traffic on the first quarter of the cards.
        let i = if rng.below(4) < 3 { rng.below(hot) } else { rng.below(n) } as usize;
        let card = &mut wallet[i];
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
        match shard.execute(terminal, Op::Request(&request), now_ms())? {
            Output::Response(Response::Purchase(r) | Response::TopUp(r)) => {
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
