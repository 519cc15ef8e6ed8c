//! citycard-client against a spawned `citycard serve`: the three role examples of
//! `client/examples/` run as they are, then MAC checks and reconnects across a server restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use citycard_client::{Card, Client, ClientError, Config, RetryPolicy};
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{Amount, CardState, MessageType, Status};

#[allow(dead_code)]
#[path = "../client/examples/counter.rs"]
mod counter_example;
#[allow(dead_code)]
#[path = "../client/examples/kiosk.rs"]
mod kiosk_example;
#[allow(dead_code)]
#[path = "../client/examples/reader.rs"]
mod reader_example;

const BIN: &str = env!("CARGO_BIN_EXE_citycard");

/// `citycard serve` in `dir` (dev keys generated on first start); returns the child and its
/// terminal address. The server prints the address once it listens.
pub fn serve(dir: &Path, listen: &str) -> (Child, String) {
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(["serve", "--listen", listen, "--admin", "127.0.0.1:0", "--shards", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("server printed nothing").unwrap();
    let addr = line.strip_prefix("citycard listening on ").expect("listening line").to_owned();
    (child, addr)
}

pub fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    // The server drains within its 10 s drain timeout; wait() returns when it has exited.
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_examples_run_against_a_spawned_server() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = serve(dir.path(), "127.0.0.1:0");
    let keys = dir.path().join("keys");

    let reader = reader_example::run(&addr, &keys).await.expect("reader example");
    assert_eq!(reader.balances, vec![1_000 - 3 * 150; 4]);
    assert_eq!(reader.offline, vec![Status::Approved, Status::Approved]);
    assert_eq!(reader.numbered, vec![Status::Approved, Status::Approved]);
    assert!(reader.numbered_again_same, "a re-upload answers the first results");

    let kiosk = kiosk_example::run(&addr, &keys).await.expect("kiosk example");
    assert_eq!(kiosk.top_up, Status::Approved);
    assert_eq!(kiosk.balance, 2_500);
    assert_eq!(kiosk.history, ["TopUp", "Issue"]);
    assert!(kiosk.identity_verified);

    let counter = counter_example::run(&addr, &keys).await.expect("counter example");
    assert_eq!(counter.issued_balance, 1_500);
    assert_eq!(counter.blocked, CardState::Blocked);
    assert_eq!(counter.unblocked, CardState::Active);
    assert_eq!(counter.replaced_balance, 1_500);
    assert_eq!(counter.refunded, 1_500);
    assert_eq!(counter.old_card_after_replace, Status::CardClosed);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_macs_are_errors_and_requests_survive_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = serve(dir.path(), "127.0.0.1:0");
    let keys = dir.path().join("keys");
    let counter = Client::new(Config::from_keys_dir(&addr, &keys, "counter-1").unwrap()).unwrap();
    let mut config = Config::from_keys_dir(&addr, &keys, "reader-1").unwrap();
    // Enough patience for a restart on a loaded machine: 8 attempts, up to 2 s apart.
    config.retry = RetryPolicy { attempts: 8, initial_backoff_ms: 100, max_backoff_ms: 2_000 };
    let reader = Client::new(config).unwrap();
    let issued = counter.issue(1, Amount(1_000)).await.unwrap();
    let mut card = Card::from_issue(&issued);

    // The answer is authentic, but checked under the wrong key it must not be believed.
    let auth = card.auth(MessageType::Purchase, Amount(100), reader.terminal_id());
    let wrong = CardKey::from_bytes([7; 32]);
    let err = reader.purchase(&auth, Amount(100), Some(&wrong)).await.expect_err("bad mac");
    assert!(matches!(err, ClientError::BadMac(MessageType::PurchaseResult)), "{err}");
    // The same bytes again: the original answer, which verifies under the real key.
    let paid = reader.purchase(&auth, Amount(100), Some(card.key())).await.unwrap();
    assert_eq!((paid.status, paid.balance.0), (Status::Approved, 900));

    // Many cards in flight at once over the one connection.
    let mut cards = Vec::new();
    for n in 0..16 {
        cards.push(Card::from_issue(&counter.issue(100 + n, Amount(500)).await.unwrap()));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut card in cards {
        let reader = reader.clone();
        tasks.spawn(async move {
            let mut last = None;
            for _ in 0..4 {
                let auth = card.auth(MessageType::Purchase, Amount(50), reader.terminal_id());
                last = Some(reader.purchase(&auth, Amount(50), Some(card.key())).await.unwrap());
            }
            last.unwrap()
        });
    }
    while let Some(result) = tasks.join_next().await {
        let result = result.unwrap();
        assert_eq!((result.status, result.balance.0), (Status::Approved, 300));
    }

    // Restart the server on the same address; the next call reconnects by itself.
    stop(child);
    let (child, again) = serve(dir.path(), &addr);
    assert_eq!(again, addr);
    let auth = card.auth(MessageType::Purchase, Amount(100), reader.terminal_id());
    let paid = reader.purchase(&auth, Amount(100), Some(card.key())).await.unwrap();
    assert_eq!((paid.status, paid.balance.0), (Status::Approved, 800));
    stop(child);
}
