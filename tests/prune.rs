//! `citycard archive prune`: archived segments go behind a signed anchor, and what remains
//! still verifies, still settles and still serves; a tampered anchor is caught; a prune
//! stopped between its anchor and its removals leaves a directory that verifies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use citycard::archive::{PruneOptions, ANCHOR_FILE};
use citycard::engine::CheckpointPolicy;
use citycard::report::Date;
use citycard::server::RunningServer;
use citycard_protocol::{
    Amount, BlockReason, CardId, MessageType, Request, Response, Status, TransitResult,
};
use common::{balance_of, issue, Card, Client, Env};

const BIN: &str = env!("CARGO_BIN_EXE_citycard");
const SEGMENT_BYTES: u64 = 64 * 1024;
const PURCHASES: usize = 1_500;

fn config(env: &Env) -> citycard::config::Config {
    let mut config = env.config();
    config.segment_bytes = SEGMENT_BYTES;
    config.checkpoint = CheckpointPolicy { records: 100, interval_ms: 60_000 };
    config
}

fn public_key(env: &Env) -> [u8; 32] {
    citycard::keys::load_assertion_public(&env.keys.join(citycard::keys::ASSERTION_PUB)).unwrap()
}

/// Issues ten cards with 50,000 each and makes `purchases` purchases of 7 over them.
async fn load(env: &Env, server: &RunningServer, purchases: usize) -> Vec<Card> {
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..10 {
        cards.push(issue(&mut counter, 1 + op_ref, 50_000).await);
    }
    for i in 0..purchases {
        match reader.call(&cards[i % 10].purchase(7, "reader-1")).await {
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

fn archived(env: &Env, shard: u16) -> usize {
    let dir = citycard::server::shard_dir(&env.data, shard).join("archive");
    citycard::journal::list_segments(&dir).unwrap().len()
}

fn verify(env: &Env) -> citycard::verify::Report {
    citycard::verify::verify_with(&env.data, Some(&public_key(env))).unwrap()
}

fn today() -> Date {
    Date::from_unix_ms(citycard::now_ms())
}

fn prune_options(before: Date) -> PruneOptions {
    PruneOptions { before, dry_run: false, now_ms: citycard::now_ms(), stop_after_anchor: false }
}

#[tokio::test]
async fn prune_then_verify_settle_and_serve() {
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let cards = load(&env, &server, PURCHASES).await;
    let before = balances(&env, &server, &cards).await;
    server.stop().await.unwrap();
    let archived_before = archived(&env, 0) + archived(&env, 1);
    assert!(archived_before >= 2, "{archived_before}");
    let today = today();
    let tomorrow = Date::from_days(today.days() + 1);

    // Pruning before today removes nothing: every record is of today.
    let none = citycard::archive::prune(&env.data, &env.keys, &prune_options(today)).unwrap();
    assert!(none.iter().all(|s| s.segments.is_empty() && s.anchor_seq == 0), "{none:?}");
    assert!(none[0].stopped.contains("not before"), "{none:?}");

    // A dry run says what would go and changes nothing.
    let dry = PruneOptions { dry_run: true, ..prune_options(tomorrow) };
    let planned = citycard::archive::prune(&env.data, &env.keys, &dry).unwrap();
    assert_eq!(planned.iter().map(|s| s.segments.len()).sum::<usize>(), archived_before);
    assert_eq!(archived(&env, 0) + archived(&env, 1), archived_before);
    assert!(!citycard::server::shard_dir(&env.data, 0).join(ANCHOR_FILE).exists());

    // Before tomorrow: every archived segment goes; the live journal stays.
    let done = citycard::archive::prune(&env.data, &env.keys, &prune_options(tomorrow)).unwrap();
    assert_eq!(done.iter().map(|s| s.segments.len()).sum::<usize>(), archived_before);
    assert!(done.iter().all(|s| s.stopped.contains("live journal")), "{done:?}");
    assert_eq!(archived(&env, 0) + archived(&env, 1), 0);

    // The remaining chain verifies from the anchors, and the money still adds up.
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.purchases, PURCHASES as i64 * 7);
    assert_eq!(report.totals.deposits, 10 * 50_000);
    assert_eq!(report.totals.balances, before.iter().sum::<i64>());
    assert!(report.notes.iter().any(|n| n.contains("pruned before")), "{:?}", report.notes);
    // Without the key a pruned directory is not taken on trust.
    assert!(!citycard::verify::verify(&env.data).unwrap().ok());

    // Today is a pruned date: the report says so and reconciles through the anchors' sums.
    let key = Some(public_key(&env));
    let s = citycard::report::settlement_with(&env.data, today, key.as_ref()).unwrap();
    assert!(s.reconciled(), "{}", s.to_csv());
    assert!(!s.pruned_on.is_empty());
    assert_eq!(s.flows.purchases, PURCHASES as i128 * 7);
    assert_eq!(s.balances_end, before.iter().sum::<i64>() as i128);
    let csv = s.to_csv();
    assert!(csv.contains("# pruned yes"), "{csv}");
    // Tomorrow is not pruned, and starts from the anchors' balances.
    let s = citycard::report::settlement_with(&env.data, tomorrow, key.as_ref()).unwrap();
    assert!(s.reconciled() && s.pruned_on.is_empty(), "{}", s.to_csv());
    assert_eq!(s.balances_start, before.iter().sum::<i64>() as i128);
    // The CLI's signed report runs on the pruned directory and reconciles (exit 0).
    let out = Command::new(BIN)
        .args(["report", "settlement", "--date", &today.to_string()])
        .arg("--data")
        .arg(&env.data)
        .arg("--keys")
        .arg(&env.keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("# pruned yes"));

    // The server starts and serves the same balances; more work after the prune verifies.
    let server = RunningServer::start(config(&env)).await.unwrap();
    assert_eq!(balances(&env, &server, &cards).await, before);
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut card = cards.into_iter().next().unwrap();
    match reader.call(&card.purchase(7, "reader-1")).await {
        Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.purchases, (PURCHASES as i64 + 1) * 7);

    // A second prune builds on the first anchor.
    citycard::archive::prune(&env.data, &env.keys, &prune_options(tomorrow)).unwrap();
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.purchases, (PURCHASES as i64 + 1) * 7);
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_tampered_anchor_is_caught_and_an_interrupted_prune_still_verifies() {
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    load(&env, &server, 800).await;
    server.stop().await.unwrap();
    let tomorrow = Date::from_days(today().days() + 1);
    let archived_before = archived(&env, 0) + archived(&env, 1);
    assert!(archived_before >= 2);

    // Killed after the anchors were durable and before any segment was removed.
    let stop = PruneOptions { stop_after_anchor: true, ..prune_options(tomorrow) };
    citycard::archive::prune(&env.data, &env.keys, &stop).unwrap();
    assert_eq!(archived(&env, 0) + archived(&env, 1), archived_before);
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
    assert!(report.notes.iter().any(|n| n.contains("interrupted prune")), "{:?}", report.notes);
    let purchases = report.totals.purchases;
    // The next prune removes what the anchors already stand for.
    let done = citycard::archive::prune(&env.data, &env.keys, &prune_options(tomorrow)).unwrap();
    assert_eq!(done.iter().map(|s| s.leftovers).sum::<usize>(), archived_before);
    assert_eq!(archived(&env, 0) + archived(&env, 1), 0);
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.purchases, purchases);

    // One changed byte anywhere in an anchor: verify, settlement and the next prune refuse.
    let anchor = citycard::server::shard_dir(&env.data, 0).join(ANCHOR_FILE);
    let len = std::fs::metadata(&anchor).unwrap().len() as usize;
    let original = std::fs::read(&anchor).unwrap();
    for at in [20, 120, len / 2, len - 80, len - 1] {
        flip(&anchor, at);
        let report = verify(&env);
        assert!(
            report.problems.iter().any(|p| p.contains("shard 0") && p.contains("anchor")),
            "flip at {at}: {:?}",
            report.problems
        );
        let key = public_key(&env);
        assert!(citycard::report::settlement_with(&env.data, today(), Some(&key)).is_err());
        assert!(citycard::archive::prune(&env.data, &env.keys, &prune_options(tomorrow)).is_err());
        std::fs::write(&anchor, &original).unwrap();
    }
    // An anchor signed by another key is caught the same way.
    let other = tempfile::tempdir().unwrap();
    citycard::keys::init(other.path()).unwrap();
    let foreign =
        citycard::keys::load_assertion_public(&other.path().join(citycard::keys::ASSERTION_PUB))
            .unwrap();
    let report = citycard::verify::verify_with(&env.data, Some(&foreign)).unwrap();
    assert!(report.problems.iter().any(|p| p.contains("signature")), "{:?}", report.problems);

    // The CLI: verify with the keys directory is clean; a dry run exits 0 and says so.
    let out = Command::new(BIN)
        .arg("verify")
        .arg("--data")
        .arg(&env.data)
        .arg("--keys")
        .arg(&env.keys)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("verify: OK") && stdout.contains("pruned before"), "{stdout}");
    let out = Command::new(BIN)
        .args(["archive", "prune", "--dry-run", "--before", &tomorrow.to_string()])
        .arg("--data")
        .arg(&env.data)
        .arg("--keys")
        .arg(&env.keys)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would remove 0 segment(s)"));
}

/// The README's restore (start without `state/`) after a prune: the state is rebuilt from the
/// anchors and the journal after them, with the same balances, the same hotlist and a hotlist
/// version that only goes on.
#[tokio::test]
async fn the_state_rebuilds_from_the_anchor_after_a_prune() {
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let cards = load(&env, &server, 900).await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let (blocked, unblocked) = (cards[0].id, cards[1].id);
    for (op_ref, card) in [(100, blocked), (101, unblocked)] {
        let block = Request::Block { op_ref, card_id: card, reason: BlockReason::Stolen };
        match counter.call(&block).await {
            Response::Block(s) => assert_eq!(s.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }
    // A terminal that synced here holds both cards as listed.
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mid_cursor =
        match reader.call(&Request::HotlistSync { cursor: vec![], max_entries: 0 }).await {
            Response::HotlistSync(h) if !h.more => h.cursor,
            other => panic!("{other:?}"),
        };
    match counter.call(&Request::Unblock { op_ref: 102, card_id: unblocked }).await {
        Response::Unblock(s) => assert_eq!(s.status, Status::Approved),
        other => panic!("{other:?}"),
    }
    // Push the blocks below the checkpoint and into the archive (a segment holds about 400
    // records here).
    let mut cards = cards;
    for i in 0..3_000 {
        match reader.call(&cards[2 + i % 8].purchase(7, "reader-1")).await {
            Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }
    let before = balances(&env, &server, &cards).await;
    let versions = hotlist_versions(&env, &server).await;
    server.stop().await.unwrap();
    let tomorrow = Date::from_days(today().days() + 1);
    let done = citycard::archive::prune(&env.data, &env.keys, &prune_options(tomorrow)).unwrap();
    assert!(done.iter().all(|s| !s.segments.is_empty()), "{done:?}");

    for index in 0..2 {
        std::fs::remove_dir_all(citycard::server::shard_dir(&env.data, index).join("state"))
            .unwrap();
    }
    let server = RunningServer::start(config(&env)).await.unwrap();
    assert_eq!(balances(&env, &server, &cards).await, before);
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let sync = Request::HotlistSync { cursor: vec![], max_entries: 0 };
    let changes = match reader.call(&sync).await {
        Response::HotlistSync(h) => h,
        other => panic!("{other:?}"),
    };
    let listed: Vec<_> = changes.entries.iter().filter(|e| e.listed).map(|e| e.card_id).collect();
    assert!(listed.contains(&blocked), "{changes:?}");
    // The unblocked card's entries went with the pruned records: a new terminal needs none.
    assert!(!changes.entries.iter().any(|e| e.card_id == unblocked), "{changes:?}");
    assert!(hotlist_versions(&env, &server).await >= versions);
    // The terminal that synced before the unblock still learns of it: the compacted hotlist
    // keeps each card's last change.
    let sync = Request::HotlistSync { cursor: mid_cursor, max_entries: 0 };
    match reader.call(&sync).await {
        Response::HotlistSync(h) => {
            assert!(!h.more);
            assert!(h.entries.iter().any(|e| e.card_id == unblocked && !e.listed), "{h:?}");
        }
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
}

/// The sum of the shards' hotlist versions a terminal's cursor ends at after a full sync.
async fn hotlist_versions(env: &Env, server: &RunningServer) -> u64 {
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut cursor = vec![];
    loop {
        match reader.call(&Request::HotlistSync { cursor, max_entries: 0 }).await {
            Response::HotlistSync(h) if h.more => cursor = h.cursor,
            Response::HotlistSync(h) => return h.cursor.iter().sum(),
            other => panic!("{other:?}"),
        }
    }
}

fn open_shard(env: &Env, index: u16) -> (citycard::engine::Shard, citycard::engine::OpenReport) {
    let secrets = std::sync::Arc::new(citycard::server::load_secrets(&env.keys, &[]).unwrap());
    let options = citycard::engine::ShardOptions {
        index,
        count: 2,
        dir: citycard::server::shard_dir(&env.data, index),
        journal: citycard::journal::JournalOptions {
            segment_bytes: SEGMENT_BYTES,
            ..Default::default()
        },
        limits: citycard::config::Config::default().limits,
        checkpoint: CheckpointPolicy { records: 100, interval_ms: 60_000 },
        archive: None,
    };
    citycard::engine::Shard::open(options, secrets).unwrap()
}

fn tap_in(card: &mut Card) -> Request {
    Request::TapIn { auth: card.auth(MessageType::TapIn, 0, "reader-1") }
}

fn tap_out(card: &mut Card, fare: i64) -> Request {
    Request::TapOut { auth: card.auth(MessageType::TapOut, fare, "reader-1"), fare: Amount(fare) }
}

fn transit(response: Response) -> TransitResult {
    match response {
        Response::TapIn(t) | Response::TapOut(t) | Response::Reversal(t) => t,
        other => panic!("not a transit result: {other:?}"),
    }
}

/// Protocol 1.2 across a prune: a completed ride and a reversal among the removed records,
/// and a hold opened before the cut that is still open after it. The anchor keeps the hold,
/// a state rebuilt from the anchor still has it, the tap-out after the rebuild completes it,
/// and verify and settlement agree with the fares.
// postmortem: the prune's ledger never set a card's hold, so the anchor lost every hold open
// across the cut and a rebuild from it answered the tap-out with NoOpenHold.
#[tokio::test]
async fn a_hold_open_across_the_cut_survives_the_prune() {
    let env = Env::new();
    let mut cfg = config(&env);
    cfg.limits.transit.reversal_window_ms = 3_600_000;
    let server = RunningServer::start(cfg.clone()).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut rider = issue(&mut counter, 50, 5_000).await;
    let mut shopper = issue(&mut counter, 51, 5_000).await;
    let t = transit(reader.call(&tap_in(&mut rider)).await);
    assert_eq!(t.status, Status::Approved);
    let t = transit(reader.call(&tap_out(&mut rider, 320)).await);
    assert_eq!((t.status, t.balance), (Status::Approved, Amount(4_680)));
    let purchase = shopper.purchase(250, "reader-1");
    assert_eq!(reader.call(&purchase).await.status(), Some(Status::Approved));
    let original = *purchase.card_auth().unwrap();
    let reversal = Request::Reversal {
        auth: shopper.auth(MessageType::Reversal, 250, "reader-1"),
        amount: Amount(250),
        original_atc: original.atc,
        original_cryptogram: original.cryptogram,
    };
    assert_eq!(transit(reader.call(&reversal).await).status, Status::Approved);
    // The hold that stays open across the cut.
    let opened = transit(reader.call(&tap_in(&mut rider)).await);
    assert_eq!(opened.status, Status::Approved);
    // Push all of it below the checkpoint and into the archive.
    let mut others = load(&env, &server, 3_000).await;
    others.push(shopper);
    server.stop().await.unwrap();

    let tomorrow = Date::from_days(today().days() + 1);
    let done = citycard::archive::prune(&env.data, &env.keys, &prune_options(tomorrow)).unwrap();
    let shard = citycard::engine::shard_of(rider.id, 2);
    assert!(!done[usize::from(shard)].segments.is_empty(), "{done:?}");
    let dir = citycard::server::shard_dir(&env.data, shard);
    let anchor = citycard::archive::Anchor::load(&dir, &public_key(&env)).unwrap().unwrap();
    let hold = anchor.cards[&rider.id].record.hold;
    assert_eq!((hold.atc, hold.amount), (opened.atc, opened.held), "the anchor keeps the hold");
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);

    // Restore without state/: the hold is rebuilt from the anchor (and is in the index the
    // expiry sweep reads), and its tap-out completes it.
    let remove_states = || {
        for index in 0..2 {
            let state = citycard::server::shard_dir(&env.data, index).join("state");
            if state.exists() {
                std::fs::remove_dir_all(state).unwrap();
            }
        }
    };
    remove_states();
    let (rebuilt, _) = open_shard(&env, shard);
    assert_eq!(rebuilt.open_holds(), 1, "the sweep's index holds the anchor's hold");
    drop(rebuilt);
    remove_states();
    let server = RunningServer::start(cfg).await.unwrap();
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let out = transit(reader.call(&tap_out(&mut rider, 100)).await);
    assert_eq!(
        (out.status, out.balance, out.ref_atc),
        (Status::Approved, Amount(4_580), opened.atc),
        "the tap-out completes the hold opened before the prune"
    );
    server.stop().await.unwrap();
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
    // Fares count as purchases, the reversal as a negative one.
    let purchases = 3_000 * 7 + 320 + 100;
    assert_eq!(report.totals.purchases, purchases);
    let s = citycard::report::settlement_with(&env.data, today(), Some(&public_key(&env))).unwrap();
    assert!(s.reconciled(), "{}", s.to_csv());
    assert_eq!(s.flows.purchases, i128::from(purchases));
    assert_eq!(s.balances_end, i128::from(report.totals.balances));
}

/// The staff operations a state answers after a prune, and what they did to the money.
async fn staff_retries(env: &Env, server: &RunningServer, card: CardId) -> Vec<Response> {
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut out = Vec::new();
    for request in [
        // The same issue again (op_ref 1, 50,000): answered before the prune by its record.
        Request::Issue { op_ref: 1, deposit: Amount(50_000) },
        // Another request under a pruned op_ref.
        Request::Issue { op_ref: 2, deposit: Amount(10) },
        // The block of card 0 retried, and a declined issue's op_ref (journaled) retried.
        Request::Block { op_ref: 100, card_id: card, reason: BlockReason::Stolen },
        Request::Issue { op_ref: 200, deposit: Amount(-1) },
    ] {
        out.push(counter.call(&request).await);
    }
    out
}

/// (terminal, op_ref) stays exactly-once across a prune: a retry of a staff operation whose
/// record was pruned is declined ReferenceReused and executes nothing, whether the state
/// survived the prune or was rebuilt from the anchor, and both answer alike.
// postmortem: the anchor kept no op_refs, so a state rebuilt from it (the README's restore
// after a prune) had no index entry for the removed staff operations, and a retried Issue of
// a pruned op_ref issued a second card with a second deposit.
#[tokio::test]
async fn a_pruned_staff_op_ref_is_never_executed_again() {
    let env = Env::new();
    let server = RunningServer::start(config(&env)).await.unwrap();
    let cards = load(&env, &server, 0).await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let block = Request::Block { op_ref: 100, card_id: cards[0].id, reason: BlockReason::Stolen };
    let blocked = counter.call(&block).await;
    assert_eq!(blocked.status(), Some(Status::Approved));
    let declined = counter.call(&Request::Issue { op_ref: 200, deposit: Amount(-1) }).await;
    assert_eq!(declined.status(), Some(Status::InvalidAmount));
    // Before the prune a retry gets the original answer, byte for byte.
    assert_eq!(counter.call(&block).await, blocked);
    // Push them below the checkpoint and into the archive.
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut cards = cards;
    for i in 0..3_000 {
        match reader.call(&cards[1 + i % 9].purchase(7, "reader-1")).await {
            Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }
    server.stop().await.unwrap();
    let tomorrow = Date::from_days(today().days() + 1);
    let done = citycard::archive::prune(&env.data, &env.keys, &prune_options(tomorrow)).unwrap();
    assert!(done.iter().all(|s| !s.segments.is_empty()), "{done:?}");
    // The anchors keep every staff op_ref the removed records used, on the shard it ran on.
    let mut kept = Vec::new();
    for index in 0..2 {
        let dir = citycard::server::shard_dir(&env.data, index);
        let anchor = citycard::archive::Anchor::load(&dir, &public_key(&env)).unwrap().unwrap();
        assert_eq!(anchor.staff_refs.len(), 1, "{:?}", anchor.staff_refs);
        kept.extend(anchor.staff_refs["counter-1"].iter().copied());
    }
    kept.sort_unstable();
    let mut expected: Vec<u64> = (1..=10).collect();
    expected.extend([100, 200]);
    assert_eq!(kept, expected);
    let deposits = verify(&env).totals.deposits;
    assert_eq!(deposits, 10 * 50_000);

    let check = |answers: &[Response]| {
        for answer in answers {
            assert_eq!(answer.status(), Some(Status::ReferenceReused), "{answer:?}");
        }
    };
    // The state survived the prune: its index points into removed segments.
    let server = RunningServer::start(config(&env)).await.unwrap();
    let survived = staff_retries(&env, &server, cards[0].id).await;
    check(&survived);
    server.stop().await.unwrap();
    // The state rebuilt from the anchors: the same answers, nothing executed.
    for index in 0..2 {
        std::fs::remove_dir_all(citycard::server::shard_dir(&env.data, index).join("state"))
            .unwrap();
    }
    let server = RunningServer::start(config(&env)).await.unwrap();
    let rebuilt = staff_retries(&env, &server, cards[0].id).await;
    check(&rebuilt);
    assert_eq!(rebuilt, survived);
    // A new op_ref still works, and the blocked card is still blocked.
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let fresh = counter.call(&Request::Issue { op_ref: 300, deposit: Amount(5) }).await;
    assert_eq!(fresh.status(), Some(Status::Approved));
    let again = Request::Block { op_ref: 301, card_id: cards[0].id, reason: BlockReason::Lost };
    assert_eq!(counter.call(&again).await.status(), Some(Status::InvalidState));
    server.stop().await.unwrap();
    let report = verify(&env);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.deposits, deposits + 5, "no pruned issue ran a second time");
}
