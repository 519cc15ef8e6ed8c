//! A self-service kiosk (role `kiosk`): top-up, balance, history and an identity assertion
//! whose signature the kiosk checks with the server's `assertion.pub`.
//!
//! ```text
//! cargo run -p citycard-client --example kiosk -- --server 127.0.0.1:7700 --keys keys
//! ```
//!
//! For a self-contained demo the card is issued by `counter-1` from the same development keys
//! directory and played by [`Card`].

use std::path::Path;

use anyhow::{bail, Context};
use citycard_client::words::{entry_kind_name, money, status_words};
use citycard_client::{verify_identity, Card, Client, Config};
use citycard_protocol::{Amount, MessageType, Status};

#[derive(Debug)]
pub struct KioskReport {
    pub top_up: Status,
    pub balance: i64,
    /// Entry kinds of the history page, newest first.
    pub history: Vec<String>,
    pub identity_verified: bool,
}

pub async fn run(server: &str, keys: &Path) -> anyhow::Result<KioskReport> {
    let counter = Client::new(Config::from_keys_dir(server, keys, "counter-1")?)?;
    let kiosk = Client::new(Config::from_keys_dir(server, keys, "kiosk-1")?)?;
    let issued = counter.issue(now_ms(), Amount(500)).await?;
    if issued.status != Status::Approved {
        bail!("issue: {}", status_words(issued.status));
    }
    let mut card = Card::from_issue(&issued);
    let terminal = kiosk.terminal_id().to_owned();

    let auth = card.auth(MessageType::TopUp, Amount(2_000), &terminal);
    let top_up = kiosk.top_up(&auth, Amount(2_000), Some(card.key())).await?;
    println!("{} top-up 20.00: {}", card.id().masked(), status_words(top_up.status));

    let auth = card.read_auth(MessageType::Balance, &terminal);
    let balance = kiosk.balance(&auth, Some(card.key())).await?;
    println!("balance {}", money(balance.balance.0));

    let auth = card.read_auth(MessageType::History, &terminal);
    let page = kiosk.history(&auth, 0, 16, Some(card.key())).await?;
    let history: Vec<String> =
        page.entries.iter().map(|e| entry_kind_name(e.kind).to_owned()).collect();
    for entry in &page.entries {
        println!(
            "  #{} {} {}",
            entry.journal_seq,
            entry_kind_name(entry.kind),
            money(entry.amount.0)
        );
    }

    let auth = card.auth(MessageType::Identity, Amount(0), &terminal);
    let identity = kiosk.identity(&auth, Some(card.key())).await?;
    let public = read_public_key(&keys.join("assertion.pub"))?;
    let identity_verified = identity.status == Status::Approved
        && verify_identity(&identity, &public, &terminal, now_ms());
    println!("identity assertion verified: {identity_verified}");
    Ok(KioskReport {
        top_up: top_up.status,
        balance: balance.balance.0,
        history,
        identity_verified,
    })
}

/// `assertion.pub`: the 32-byte Ed25519 public key as 64 hex digits.
fn read_public_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let hex = text.trim();
    let mut key = [0u8; 32];
    if hex.len() != 64 || !hex.is_ascii() {
        bail!("{}: expected 64 hex digits", path.display());
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("{}: not hex", path.display()))?;
    }
    Ok(key)
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
