//! A card reader (role `reader`): pipelined purchases for several cards, a balance inquiry, an
//! offline upload and a hotlist sync.
//!
//! Run against a development server (`citycard serve` writes the dev keys into `keys/`):
//!
//! ```text
//! cargo run -p citycard-client --example reader -- --server 127.0.0.1:7700 --keys keys
//! ```
//!
//! The reader needs cards: for a self-contained demo it has them issued by `counter-1` from
//! the same development keys directory, and plays the cards itself with [`Card`].

use std::path::Path;

use anyhow::{bail, Context};
use citycard_client::words::status_words;
use citycard_client::{Card, Client, Config};
use citycard_protocol::{Amount, MessageType, NumberedRecord, Status, FLAG_UNCERTAIN};

/// What the demo did, for the test that runs it.
#[derive(Debug)]
pub struct ReaderReport {
    /// Balance of every card after its purchases.
    pub balances: Vec<i64>,
    /// Status of every offline record.
    pub offline: Vec<Status>,
    /// Hotlist entries received.
    pub hotlist_entries: usize,
    /// Protocol 1.3: status of every numbered offline record, and whether uploading the same
    /// records again returned the same results.
    pub numbered: Vec<Status>,
    pub numbered_again_same: bool,
}

/// Cards the demo issues (each gets its own task: the client pipelines their purchases).
const CARDS: u64 = 4;
/// Purchases per card, sent one after another (the client keeps a card's order).
const PURCHASES: usize = 3;
/// Rounds of hotlist sync before giving up (each returns up to 1024 changes).
const MAX_SYNC_ROUNDS: usize = 64;

pub async fn run(server: &str, keys: &Path) -> anyhow::Result<ReaderReport> {
    let counter = Client::new(Config::from_keys_dir(server, keys, "counter-1")?)?;
    let reader = Client::new(Config::from_keys_dir(server, keys, "reader-1")?)?;
    let info = reader.hello(now_ms()).await?;
    println!("reader-1 connected: role {} on {} shards", info.role, info.shard_count);

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..CARDS {
        let issued = counter.issue(op_ref(n), Amount(1_000)).await?;
        if issued.status != Status::Approved {
            bail!("issue: {}", status_words(issued.status));
        }
        let mut card = Card::from_issue(&issued);
        let reader = reader.clone();
        tasks.spawn(async move {
            for _ in 0..PURCHASES {
                // The card computes the cryptogram; the reader sends it and checks the MAC.
                let auth = card.auth(MessageType::Purchase, Amount(150), reader.terminal_id());
                let paid = reader.purchase(&auth, Amount(150), Some(card.key())).await?;
                println!("{} purchase 1.50: {}", card.id().masked(), status_words(paid.status));
            }
            let auth = card.read_auth(MessageType::Balance, reader.terminal_id());
            let balance = reader.balance(&auth, Some(card.key())).await?;
            anyhow::Ok((card, balance.balance.0))
        });
    }
    let mut balances = Vec::new();
    let mut cards = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (card, balance) = joined.context("purchase task")??;
        balances.push(balance);
        cards.push(card);
    }

    // Two purchases recorded while the reader was offline, uploaded now.
    let Some(card) = cards.first_mut() else { bail!("no card issued") };
    let records = [
        card.offline(Amount(100), now_ms(), reader.terminal_id()),
        card.offline(Amount(200), now_ms(), reader.terminal_id()),
    ];
    let key = card.key().clone();
    let results = reader.offline_batch(&records, |_| Some(key.clone())).await?;
    let offline: Vec<Status> = results.iter().map(|r| r.status).collect();
    println!("offline upload: {offline:?}");

    // Protocol 1.3: records numbered by the reader, continuing from the highest seq the server
    // has for it (an empty batch asks); sent twice, as after a lost answer.
    let from = reader.numbered_offline_batch(&[], |_| None).await?.highest_seq;
    let numbered = [
        NumberedRecord {
            record: card.offline(Amount(50), now_ms(), reader.terminal_id()),
            terminal_seq: from + 1,
            flags: 0,
        },
        NumberedRecord {
            record: card.offline(Amount(60), now_ms(), reader.terminal_id()),
            terminal_seq: from + 2,
            // The card left the field before the reader saw it finish.
            flags: FLAG_UNCERTAIN,
        },
    ];
    let first = reader.numbered_offline_batch(&numbered, |_| Some(key.clone())).await?;
    let again = reader.numbered_offline_batch(&numbered, |_| Some(key.clone())).await?;
    let numbered_again_same = again.results == first.results;
    let numbered: Vec<Status> = first.results.iter().map(|r| r.result.status).collect();
    println!("numbered upload: {numbered:?}, highest seq {}", first.highest_seq);

    let mut cursor = Vec::new();
    let mut hotlist_entries = 0;
    for _ in 0..MAX_SYNC_ROUNDS {
        let changes = reader.hotlist_sync(&cursor, 1024).await?;
        hotlist_entries += changes.entries.len();
        cursor = changes.cursor;
        if !changes.more {
            break;
        }
    }
    println!("hotlist: {hotlist_entries} changes");
    Ok(ReaderReport { balances, offline, hotlist_entries, numbered, numbered_again_same })
}

/// A fresh op_ref per staff operation: time-based, so re-running the demo does not collide.
fn op_ref(n: u64) -> u64 {
    now_ms().wrapping_mul(1_000).wrapping_add(n)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut server = "127.0.0.1:7700".to_owned();
    let mut keys = std::path::PathBuf::from("keys");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--server", Some(value)) => server = value,
            ("--keys", Some(value)) => keys = value.into(),
            _ => bail!("usage: --server ADDR --keys DIR"),
        }
    }
    let report = run(&server, &keys).await?;
    println!("{report:?}");
    Ok(())
}
