//! Checkpoints and the archive: a restart reads the journal from the last checkpoint, segments
//! below it move to the archive and still verify and settle, and a checkpoint or a state that
//! disagrees is never trusted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use citycard::engine::checkpoint::{Checkpoint, CHECKPOINT_FILE};
use citycard::engine::{CheckpointPolicy, OpenReport, Shard, ShardOptions};
use citycard::journal::JournalOptions;
use citycard::server::RunningServer;
use citycard_protocol::{Response, Status};
use common::{balance_of, issue, Card, Client, Env};

const SEGMENT_BYTES: u64 = 64 * 1024;

fn config(env: &Env) -> citycard::config::Config {
    let mut config = env.config();
    config.segment_bytes = SEGMENT_BYTES;
    config.checkpoint = CheckpointPolicy { records: 100, interval_ms: 60_000 };
    config
}

/// Issues cards and makes `purchases` purchases spread over them; returns the cards.
async fn load(env: &Env, server: &RunningServer, purchases: usize) -> Vec<Card> {
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..10 {
        cards.push(issue(&mut counter, 1 + op_ref, 50_000).await);
    }
    for i in 0..purchases {
        let card = &mut cards[i % 10];
        match reader.call(&card.purchase(7, "reader-1")).await {
            Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }
    cards
}

async fn balances(env: &Env, server: &RunningServer, cards: &[Card]) -> Vec<i64> {
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let mut out = Vec::new();
    for card in cards {
        out.push(balance_of(&mut kiosk, card).await);
    }
    out
}

fn open_shard(env: &Env, index: u16) -> (Shard, OpenReport) {
    let secrets = Arc::new(citycard::server::load_secrets(&env.keys, &[]).unwrap());
    let options = ShardOptions {
        index,
        count: 2,
        dir: citycard::server::shard_dir(&env.data, index),
        journal: JournalOptions { segment_bytes: SEGMENT_BYTES, ..Default::default() },
        limits: citycard::config::Config::default().limits,
        checkpoint: CheckpointPolicy { records: 100, interval_ms: 60_000 },
        archive: None,
    };
    Shard::open(options, secrets).unwrap()
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg")))
                .count()
        })
        .unwrap_or(0)
}

fn verify_ok(env: &Env) -> citycard::verify::Report {
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "verify: {:?}", report.problems);
    report
}

#[tokio::test]
async fn restart_reads_from_the_checkpoint_and_the_archive_keeps_the_chain() {
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let cards = load(&env, &server, 1_500).await;
    let before = balances(&env, &server, &cards).await;
    server.stop().await.unwrap();

    let mut archived = 0;
    for index in 0..2 {
        let shard = citycard::server::shard_dir(&env.data, index);
        archived += segments(&shard.join("archive"));
        assert!(shard.join(CHECKPOINT_FILE).exists());
    }
    assert!(archived >= 2, "old segments moved to the archive: {archived}");

    // The whole chain, archive and journal, verifies; settlement counts every purchase.
    let report = verify_ok(&env);
    assert_eq!(report.totals.purchases, 1_500 * 7);
    let today = citycard::report::Date::from_days((citycard::now_ms() / 86_400_000) as i64);
    let settlement = citycard::report::settlement(&env.data, today).unwrap();
    assert!(settlement.reconciled());

    // A clean stop left a checkpoint at the last record: the start replays nothing.
    for index in 0..2 {
        let (shard, report) = open_shard(&env, index);
        assert_eq!(report.from_checkpoint, report.last_seq, "shard {index}: {report:?}");
        assert_eq!((report.replayed, report.rebuilt_state), (0, false));
        drop(shard);
    }
    let server = RunningServer::start(config(&env)).await.unwrap();
    assert_eq!(balances(&env, &server, &cards).await, before);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_checkpoint_the_journal_disagrees_with_is_not_trusted() {
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let cards = load(&env, &server, 600).await;
    let before = balances(&env, &server, &cards).await;
    server.stop().await.unwrap();

    // A well-formed checkpoint whose hash is not the journal's: full rebuild from the archive.
    let shard_dir = citycard::server::shard_dir(&env.data, 0);
    let path = shard_dir.join(CHECKPOINT_FILE);
    let mut cp = Checkpoint::load(&shard_dir).unwrap().unwrap();
    cp.hash[0] ^= 1;
    std::fs::write(&path, cp.encode()).unwrap();
    let (shard, report) = open_shard(&env, 0);
    assert!(report.rebuilt_state, "{report:?}");
    assert_eq!((report.from_checkpoint, report.replayed), (0, report.last_seq));
    drop(shard);
    // The start wrote a good checkpoint again.
    let (shard, report) = open_shard(&env, 0);
    assert_eq!((report.from_checkpoint, report.rebuilt_state), (report.last_seq, false));
    drop(shard);

    // A damaged checkpoint file: the whole journal is read, the state is kept.
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let (shard, report) = open_shard(&env, 0);
    assert_eq!((report.from_checkpoint, report.rebuilt_state), (0, false), "{report:?}");
    drop(shard);

    // Leftovers of a crash while taking a checkpoint are ignored: a half-written temp file,
    // a segment copied to the archive but not yet removed, a partial copy.
    std::fs::write(shard_dir.join("checkpoint.tmp"), b"half").unwrap();
    let journal = shard_dir.join("journal");
    let first_live = std::fs::read_dir(&journal)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .min()
        .unwrap();
    let archive = shard_dir.join("archive");
    std::fs::create_dir_all(&archive).unwrap();
    std::fs::copy(&first_live, archive.join(first_live.file_name().unwrap())).unwrap();
    std::fs::write(archive.join("00000000000000999999.seg.partial"), b"partial").unwrap();
    verify_ok(&env);
    let server = RunningServer::start(config(&env)).await.unwrap();
    assert_eq!(balances(&env, &server, &cards).await, before);
    server.stop().await.unwrap();
    verify_ok(&env);
}

#[tokio::test]
async fn a_state_whose_cards_disagree_with_its_digest_is_rebuilt() {
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let cards = load(&env, &server, 300).await;
    let before = balances(&env, &server, &cards).await;
    server.stop().await.unwrap();

    // Change one card's balance behind the engine's back.
    let shard = citycard::engine::shard_of(cards[0].id, 2);
    let state = citycard::server::shard_dir(&env.data, shard).join("state");
    {
        let db = sled::open(&state).unwrap();
        let mut key = vec![b'c'];
        key.extend_from_slice(&cards[0].id.0.to_be_bytes());
        let stored = db.get(&key).unwrap().unwrap();
        let mut record = citycard::engine::store::codec::decode(&stored).unwrap();
        record.balance.0 += 64;
        db.insert(&key, &*citycard::engine::store::codec::encode(&record)).unwrap();
        db.flush().unwrap();
    }
    // The start does not read the cards; the check that runs while the shard serves finds
    // the changed record, stops the shard and marks the state.
    let (mut opened, report) = open_shard(&env, shard);
    assert!(!report.rebuilt_state, "{report:?}");
    let found = (0..10_000).find_map(|_| opened.persist_due(0).err());
    let found = found.expect("the check never found the changed record");
    assert!(found.to_string().contains("do not match"), "{found}");
    drop(opened);
    let (opened, report) = open_shard(&env, shard);
    assert!(report.rebuilt_state, "{report:?}");
    assert_eq!(report.rebuild.as_ref().map(|r| r.label()), Some("failed_check"), "{report:?}");
    drop(opened);
    let server = RunningServer::start(config(&env)).await.unwrap();
    assert_eq!(balances(&env, &server, &cards).await, before);
    server.stop().await.unwrap();
    verify_ok(&env);
}

/// History and retries are served from the journal through each card's chain: after a restart
/// and with most of the card's records in archived segments, every page is complete and in
/// order, and a retry of the card's first purchase gets its original answer byte for byte.
#[tokio::test]
async fn history_and_retries_read_the_chain_through_the_archive() {
    use citycard_protocol::{MessageType, Request};
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut card = issue(&mut counter, 1, 90_000).await;
    let first = card.purchase(3, "reader-1");
    let first_answer = reader.call(&first).await;
    let mut recent = None;
    for i in 0..1_000 {
        let request = card.purchase(1 + i % 5, "reader-1");
        let answer = reader.call(&request).await;
        if i == 900 {
            recent = Some((request, answer));
        }
    }
    let block = Request::Block {
        op_ref: 3,
        card_id: card.id,
        reason: citycard_protocol::BlockReason::Lost,
    };
    let block_answer = counter.call(&block).await;
    drop((counter, reader));
    server.stop().await.unwrap();
    let shard = citycard::engine::shard_of(card.id, 2);
    let archive = citycard::server::shard_dir(&env.data, shard).join("archive");
    assert!(segments(&archive) >= 2, "most of the chain is archived");

    let server = RunningServer::start(config(&env)).await.unwrap();
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let mut before = 0;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let auth = card.auth_at(MessageType::History, 0, "kiosk-1", card.atc + 1);
        let page = match kiosk.call(&Request::History { auth, before_seq: before, limit: 64 }).await
        {
            Response::History(page) => page,
            other => panic!("{other:?}"),
        };
        assert_eq!(page.status, Status::Approved);
        seen.extend(page.entries.iter().map(|e| (e.journal_seq, e.kind)));
        if page.next_before_seq == 0 {
            break;
        }
        before = page.next_before_seq;
    }
    // Issue, 1,001 purchases, the block: newest first, each once.
    assert_eq!(seen.len(), 1_003, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 > w[1].0), "strictly newest first");
    assert_eq!(seen[0].1, citycard_protocol::EntryKind::Block);
    assert_eq!(seen[1_002].1, citycard_protocol::EntryKind::Issue);

    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let (request, answer) = recent.unwrap();
    assert_eq!(reader.call(&request).await, answer, "retry of a purchase 100 operations back");
    // Further back than the chain walk for retries (256 operations): declined Replay, never
    // decided again.
    match (reader.call(&first).await, first_answer) {
        (Response::Purchase(late), Response::Purchase(original)) => {
            assert_eq!(original.status, Status::Approved);
            assert_eq!((late.status, late.journal_seq), (Status::Replay, 0));
        }
        other => panic!("{other:?}"),
    }
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    assert_eq!(counter.call(&block).await, block_answer, "staff retry through the op index");
    drop((kiosk, reader, counter));
    server.stop().await.unwrap();
    verify_ok(&env);
}

/// Archived segments removed by hand (the wrong retention by an operator): the server keeps
/// serving, walks stop where the records are gone (old retries are declined, never executed
/// again), and verify reports the gap.
#[tokio::test]
async fn removed_archive_segments_degrade_walks_and_verify_reports_them() {
    use citycard_protocol::{MessageType, Request};
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut card = issue(&mut counter, 1, 90_000).await;
    let block = Request::Block {
        op_ref: 2,
        card_id: card.id,
        reason: citycard_protocol::BlockReason::Lost,
    };
    counter.call(&block).await;
    let unblock = Request::Unblock { op_ref: 3, card_id: card.id };
    counter.call(&unblock).await;
    let first = card.purchase(1, "reader-1");
    reader.call(&first).await;
    for _ in 0..600 {
        reader.call(&card.purchase(1, "reader-1")).await;
    }
    drop((counter, reader));
    server.stop().await.unwrap();
    let shard = citycard::engine::shard_of(card.id, 2);
    let archive = citycard::server::shard_dir(&env.data, shard).join("archive");
    let removed = segments(&archive);
    assert!(removed >= 1);
    std::fs::remove_dir_all(&archive).unwrap();

    let server = RunningServer::start(config(&env)).await.unwrap();
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let auth = card.auth_at(MessageType::History, 0, "kiosk-1", card.atc + 1);
    match kiosk.call(&Request::History { auth, before_seq: 0, limit: 64 }).await {
        Response::History(page) => {
            assert_eq!((page.status, page.entries.len()), (Status::Approved, 64))
        }
        other => panic!("{other:?}"),
    }
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    match counter.call(&block).await {
        Response::Block(r) => assert_eq!(r.status, Status::ReferenceReused, "never executed twice"),
        other => panic!("{other:?}"),
    }
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    match reader.call(&card.purchase(1, "reader-1")).await {
        Response::Purchase(r) => assert_eq!(r.status, Status::Approved, "still serving"),
        other => panic!("{other:?}"),
    }
    drop((kiosk, counter, reader));
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(!report.ok(), "verify must report the missing segments");
}

/// A damaged archived record (bit rot): a History walk that reaches it ends there and the
/// server keeps serving; verify names the damage.
#[tokio::test]
async fn a_damaged_archived_record_ends_walks_without_stopping_the_server() {
    use citycard_protocol::{MessageType, Request};
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut card = issue(&mut counter, 1, 90_000).await;
    for _ in 0..700 {
        reader.call(&card.purchase(1, "reader-1")).await;
    }
    drop((counter, reader));
    server.stop().await.unwrap();
    let shard = citycard::engine::shard_of(card.id, 2);
    let archive = citycard::server::shard_dir(&env.data, shard).join("archive");
    let oldest = std::fs::read_dir(&archive)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&oldest).unwrap();
    // Inside the payload of a record near the start (the header is 32 bytes, then records).
    bytes[32 + 120] ^= 0xff;
    std::fs::write(&oldest, bytes).unwrap();

    let server = RunningServer::start(config(&env)).await.unwrap();
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let mut before = 0;
    for _ in 0..20 {
        let auth = card.auth_at(MessageType::History, 0, "kiosk-1", card.atc + 1);
        match kiosk.call(&Request::History { auth, before_seq: before, limit: 64 }).await {
            Response::History(page) => {
                assert_eq!(page.status, Status::Approved);
                if page.next_before_seq == 0 {
                    break;
                }
                before = page.next_before_seq;
            }
            other => panic!("{other:?}"),
        }
    }
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    match reader.call(&card.purchase(1, "reader-1")).await {
        Response::Purchase(r) => assert_eq!(r.status, Status::Approved, "still serving"),
        other => panic!("{other:?}"),
    }
    drop((kiosk, reader));
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(!report.ok(), "verify must name the damaged record");
}
