//! Derived state is rebuilt from the journal: sled missing, unreadable, or ahead of the journal
//! (a journal restored from an older backup), and the offline audit agrees afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::{balance_of, issue, Card, Client, Env};

/// Issues two cards and spends on them; returns the cards and their balances.
async fn some_history(env: &Env) -> Vec<(Card, i64)> {
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..4 {
        let mut card = issue(&mut counter, op_ref, 5_000).await;
        for i in 0..5 {
            reader.call(&card.purchase(100 + i, "reader-1")).await;
        }
        let balance = balance_of(&mut reader, &card).await;
        cards.push((card, balance));
    }
    server.stop().await.unwrap();
    cards
}

async fn assert_balances(env: &Env, cards: &[(Card, i64)]) {
    let server = env.start().await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    for (card, balance) in cards {
        assert_eq!(balance_of(&mut reader, card).await, *balance, "card {:?}", card.id);
    }
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

fn state_dirs(data: &Path) -> Vec<std::path::PathBuf> {
    (0..2).map(|i| data.join(format!("shard-{i}/state"))).collect()
}

#[tokio::test]
async fn missing_state_is_rebuilt_from_the_journal() {
    let env = Env::new();
    let cards = some_history(&env).await;
    for dir in state_dirs(&env.data) {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    assert_balances(&env, &cards).await;
}

#[tokio::test]
async fn unreadable_state_is_moved_aside_and_rebuilt() {
    let env = Env::new();
    let cards = some_history(&env).await;
    for dir in state_dirs(&env.data) {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, b"this is not a sled database at all").unwrap();
            }
        }
    }
    assert_balances(&env, &cards).await;
    assert_eq!(set_aside(&env.data), 1, "the damaged state is kept for inspection");
}

/// How many state directories of shard 0 recovery moved aside.
fn set_aside(data: &Path) -> usize {
    std::fs::read_dir(data.join("shard-0"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("state.broken-"))
        .count()
}

#[tokio::test]
async fn state_ahead_of_a_restored_journal_is_rebuilt() {
    let env = Env::new();
    let older = some_history(&env).await;
    // Back up the journals, then keep trading.
    let backup = env.dir.path().join("backup");
    for i in 0..2 {
        copy_dir(&env.data.join(format!("shard-{i}/journal")), &backup.join(format!("{i}")));
    }
    let server = env.start().await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    for (card, _) in &older {
        let mut card = card.clone();
        card.atc = 5;
        reader.call(&card.purchase(1, "reader-1")).await;
    }
    drop(reader);
    server.stop().await.unwrap();
    // Restore the older journals under the newer state: the state is ahead and must go.
    for i in 0..2 {
        let journal = env.data.join(format!("shard-{i}/journal"));
        std::fs::remove_dir_all(&journal).unwrap();
        copy_dir(&backup.join(format!("{i}")), &journal);
    }
    assert_balances(&env, &older).await;
    assert_eq!(set_aside(&env.data), 1, "the newer state was set aside, not trusted");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
