//! A staff counter (role `counter`): issue a card, read its balance, block, unblock, replace
//! it and close the replacement with a refund.
//!
//! ```text
//! cargo run -p citycard-client --example counter -- --server 127.0.0.1:7700 --keys keys
//! ```
//!
//! A counter may not send Balance (PROTOCOL.md 4.5): it reads the balance with History, which
//! needs the card's cryptogram, so the card must be at the counter (here [`Card`] plays it).
//! Staff operations carry an op_ref instead; the demo takes them from a counter seeded by the
//! clock.

use std::path::Path;

use anyhow::bail;
use citycard_client::words::{card_state_name, money, status_words};
use citycard_client::{Card, Client, Config};
use citycard_protocol::{Amount, BlockReason, CardState, MessageType, Status};

#[derive(Debug)]
pub struct CounterReport {
    pub issued_balance: i64,
    pub blocked: CardState,
    pub unblocked: CardState,
    /// Balance moved to the replacement card.
    pub replaced_balance: i64,
    pub refunded: i64,
    /// A purchase attempt on the replaced (old) card.
    pub old_card_after_replace: Status,
}

pub async fn run(server: &str, keys: &Path) -> anyhow::Result<CounterReport> {
    let counter = Client::new(Config::from_keys_dir(server, keys, "counter-1")?)?;
    let reader = Client::new(Config::from_keys_dir(server, keys, "reader-1")?)?;
    let mut op_ref = now_ms().wrapping_mul(1_000);
    let mut next_ref = move || {
        op_ref = op_ref.wrapping_add(1);
        op_ref
    };

    let issued = counter.issue(next_ref(), Amount(1_500)).await?;
    if issued.status != Status::Approved {
        bail!("issue: {}", status_words(issued.status));
    }
    let mut card = Card::from_issue(&issued);
    println!("issued {} with {}", card.id().masked(), money(issued.balance.0));

    let auth = card.read_auth(MessageType::History, counter.terminal_id());
    let page = counter.history(&auth, 0, 1, Some(card.key())).await?;
    println!("balance read at the counter: {}", money(page.balance.0));

    let key = Some(card.key());
    let blocked = counter.block(next_ref(), card.id(), BlockReason::Lost, key).await?;
    println!(
        "block: {}, now {}",
        status_words(blocked.status),
        card_state_name(blocked.card_state)
    );
    let unblocked = counter.unblock(next_ref(), card.id(), key).await?;
    println!(
        "unblock: {}, now {}",
        status_words(unblocked.status),
        card_state_name(unblocked.card_state)
    );

    let replaced = counter.replace(next_ref(), card.id()).await?;
    if replaced.status != Status::Approved {
        bail!("replace: {}", status_words(replaced.status));
    }
    let new_card = Card::from_issue(&replaced);
    println!("replaced by {} carrying {}", new_card.id().masked(), money(replaced.balance.0));

    let auth = card.auth(MessageType::Purchase, Amount(100), reader.terminal_id());
    let old = reader.purchase(&auth, Amount(100), Some(card.key())).await?;
    println!("old card at a reader: {}", status_words(old.status));

    let closed = counter.close(next_ref(), new_card.id(), Some(new_card.key())).await?;
    println!("close: {}, refunded {}", status_words(closed.status), money(closed.refunded.0));
    Ok(CounterReport {
        issued_balance: page.balance.0,
        blocked: blocked.card_state,
        unblocked: unblocked.card_state,
        replaced_balance: replaced.balance.0,
        refunded: closed.refunded.0,
        old_card_after_replace: old.status,
    })
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
