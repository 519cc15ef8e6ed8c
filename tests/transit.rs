//! Protocol 1.2 over mutual TLS on 127.0.0.1: tap-in holds, tap-out, hold expiry on the
//! server's clock, holds across a restart, reversal, inquiry and funds, each operation and
//! each of its declines, with the response MACs a terminal would check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use citycard::config::Config;
use citycard::report::{self, Date, Operation, Settlement};
use citycard::server::RunningServer;
use citycard_protocol::crypto::{response_mac_ok, CardKey};
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, EntryKind, Mac, MessageType, Request, Response,
    Status, TransitResult,
};
use common::{balance_of, issue, Card, Client, Env};

const MAX_FARE: i64 = 400;

fn mac_ok(key: &CardKey, binding: &Mac, response: &Response) -> bool {
    let mut body = BytesMut::new();
    response.encode_body(&mut body).unwrap();
    response_mac_ok(key, response.message_type() as u8, binding, &body)
}

fn transit(response: Response) -> TransitResult {
    match response {
        Response::TapIn(t) | Response::TapOut(t) | Response::Reversal(t) | Response::Funds(t) => t,
        other => panic!("not a transit result: {other:?}"),
    }
}

fn tap_in(card: &mut Card, terminal: &str) -> Request {
    Request::TapIn { auth: card.auth(MessageType::TapIn, 0, terminal) }
}

fn tap_out(card: &mut Card, fare: i64, terminal: &str) -> Request {
    Request::TapOut { auth: card.auth(MessageType::TapOut, fare, terminal), fare: Amount(fare) }
}

fn funds(card: &Card, terminal: &str) -> Request {
    Request::Funds { auth: card.auth_at(MessageType::Funds, 0, terminal, card.atc + 1) }
}

fn reversal(card: &mut Card, amount: i64, original: &CardAuth, terminal: &str) -> Request {
    Request::Reversal {
        auth: card.auth(MessageType::Reversal, amount, terminal),
        amount: Amount(amount),
        original_atc: original.atc,
        original_cryptogram: original.cryptogram,
    }
}

fn inquiry(original: &Request) -> Request {
    Request::Inquiry {
        auth: *original.card_auth().unwrap(),
        original_type: original.message_type(),
        amount: original.cryptogram_amount(),
    }
}

/// Sends `request`, checks its MAC (when the answer is authenticated) and returns the answer.
async fn call_checked(client: &mut Client, key: CardKey, request: &Request) -> Response {
    let response = client.call(request).await;
    let binding = request.card_auth().unwrap().cryptogram;
    let status = response.status().unwrap();
    let unauthenticated =
        matches!(status, Status::NotPermitted | Status::BadCryptogram | Status::UnknownCard);
    assert_eq!(
        mac_ok(&key, &binding, &response),
        !unauthenticated,
        "MAC of {status:?} to {:?}",
        request.message_type()
    );
    response
}

async fn history_of(client: &mut Client, card: &Card) -> Vec<citycard_protocol::HistoryEntry> {
    let terminal = client.terminal.clone();
    let auth = card.auth_at(MessageType::History, 0, &terminal, card.atc + 1);
    match client.call(&Request::History { auth, before_seq: 0, limit: 64 }).await {
        Response::History(page) => page.entries,
        other => panic!("{other:?}"),
    }
}

/// A test environment with a second reader, `reader-2` (the exit gate).
fn env() -> Env {
    let env = Env::new();
    let id = citycard::keys::TerminalId::new("reader-2".to_owned()).unwrap();
    citycard::keys::issue_terminal(&env.keys, &id, citycard::keys::Role::Reader).unwrap();
    env
}

async fn start_with(env: &Env, adjust: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = env.config();
    adjust(&mut config);
    RunningServer::start(config).await.unwrap()
}

#[tokio::test]
async fn tap_in_and_tap_out_with_every_decline() {
    let env = env();
    let started = Date::today();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut entry_gate = Client::connect(&env.keys, addr, "reader-1").await;
    let mut exit_gate = Client::connect(&env.keys, addr, "reader-2").await;
    let mut kiosk = Client::connect(&env.keys, addr, "kiosk-1").await;
    let mut card = issue(&mut counter, 1, 1_000).await;

    // No hold yet: spendable = balance.
    let f = transit(call_checked(&mut kiosk, card.key.clone(), &funds(&card, "kiosk-1")).await);
    assert_eq!(
        (f.status, f.balance, f.held, f.spendable),
        (Status::Approved, Amount(1_000), Amount(0), Amount(1_000))
    );
    assert_eq!((f.ref_atc, f.time_ms, f.journal_seq), (Atc(0), 0, 0));

    // Tap-in: a hold of the maximum fare, the balance unchanged.
    let request = tap_in(&mut card, "reader-1");
    let tapped = transit(call_checked(&mut entry_gate, card.key.clone(), &request).await);
    assert_eq!(tapped.status, Status::Approved);
    assert_eq!(
        (tapped.balance, tapped.amount, tapped.held),
        (Amount(1_000), Amount(MAX_FARE), Amount(MAX_FARE))
    );
    assert_eq!(tapped.spendable, Amount(1_000 - MAX_FARE));
    assert!(tapped.time_ms > 1_600_000_000_000 && tapped.journal_seq > 0);
    let tap_in_atc = tapped.atc;
    // Exactly once: the same bytes get the same answer, byte for byte.
    assert_eq!(transit(entry_gate.call(&request).await), tapped);

    let f = transit(call_checked(&mut kiosk, card.key.clone(), &funds(&card, "kiosk-1")).await);
    assert_eq!(
        (f.held, f.spendable, f.ref_atc, f.time_ms),
        (Amount(MAX_FARE), Amount(600), tap_in_atc, tapped.time_ms)
    );
    // Balance keeps its 1.1 meaning (the balance, holds included).
    assert_eq!(balance_of(&mut kiosk, &card).await, 1_000);

    // The hold is not spendable: a purchase above balance - hold is declined.
    let r = entry_gate.call(&card.purchase(601, "reader-1")).await;
    assert_eq!(r.status(), Some(Status::InsufficientFunds));
    let r = entry_gate.call(&card.purchase(100, "reader-1")).await;
    assert_eq!(r.status(), Some(Status::Approved));

    // A second tap-in while the hold is open.
    let t = transit(
        call_checked(&mut entry_gate, card.key.clone(), &tap_in(&mut card, "reader-1")).await,
    );
    assert_eq!(
        (t.status, t.ref_atc, t.held, t.balance),
        (Status::HoldExists, tap_in_atc, Amount(MAX_FARE), Amount(900))
    );
    assert!(t.journal_seq > 0, "an authenticated decline is journaled");

    // A fare above the hold, and a negative one.
    for fare in [MAX_FARE + 1, -1] {
        let t = transit(
            call_checked(&mut exit_gate, card.key.clone(), &tap_out(&mut card, fare, "reader-2"))
                .await,
        );
        assert_eq!(
            (t.status, t.balance, t.held),
            (Status::InvalidAmount, Amount(900), Amount(MAX_FARE))
        );
    }

    // Tap-out at another gate: the fare is charged, the rest of the hold released.
    let request = tap_out(&mut card, 320, "reader-2");
    let out = transit(call_checked(&mut exit_gate, card.key.clone(), &request).await);
    assert_eq!(out.status, Status::Approved);
    assert_eq!(
        (out.balance, out.amount, out.held, out.spendable),
        (Amount(580), Amount(320), Amount(0), Amount(580))
    );
    assert_eq!((out.ref_atc, out.time_ms), (tap_in_atc, 0));
    assert_eq!(transit(exit_gate.call(&request).await), out, "retry");

    // No open hold any more.
    let t = transit(
        call_checked(&mut exit_gate, card.key.clone(), &tap_out(&mut card, 100, "reader-2")).await,
    );
    assert_eq!((t.status, t.balance, t.ref_atc), (Status::NoOpenHold, Amount(580), Atc(0)));
    assert_eq!(balance_of(&mut kiosk, &card).await, 580);

    // The history shows the hold and its completion.
    let kinds: Vec<(EntryKind, Status, i64)> = history_of(&mut kiosk, &card)
        .await
        .iter()
        .map(|e| (e.kind, e.status, e.amount.0))
        .collect();
    assert_eq!(
        &kinds[..6],
        &[
            (EntryKind::TapOut, Status::NoOpenHold, 0),
            (EntryKind::TapOut, Status::Approved, -320),
            (EntryKind::TapOut, Status::InvalidAmount, 0),
            (EntryKind::TapOut, Status::InvalidAmount, 0),
            (EntryKind::TapIn, Status::HoldExists, 0),
            (EntryKind::Purchase, Status::Approved, -100),
        ]
    );

    // Not enough for the maximum fare.
    let mut poor = issue(&mut counter, 2, MAX_FARE - 1).await;
    let t = transit(
        call_checked(&mut entry_gate, poor.key.clone(), &tap_in(&mut poor, "reader-1")).await,
    );
    assert_eq!(
        (t.status, t.held, t.balance),
        (Status::InsufficientFunds, Amount(0), Amount(MAX_FARE - 1))
    );

    // Roles: a kiosk does not tap in (unauthenticated, zero MAC).
    let t =
        transit(call_checked(&mut kiosk, card.key.clone(), &tap_in(&mut card, "kiosk-1")).await);
    assert_eq!((t.status, t.balance, t.mac), (Status::NotPermitted, Amount(0), Mac::default()));
    // A cryptogram computed for another terminal does not verify.
    let t = transit(
        call_checked(&mut entry_gate, card.key.clone(), &tap_in(&mut card, "reader-9")).await,
    );
    assert_eq!(t.status, Status::BadCryptogram);
    // An unknown card.
    let mut ghost = Card { id: CardId(card.id.0 + 1_000), key: card.key.clone(), atc: 0 };
    let t = transit(entry_gate.call(&tap_in(&mut ghost, "reader-1")).await);
    assert_eq!(t.status, Status::UnknownCard);

    // A card blocked while riding taps out; a blocked card does not tap in.
    let mut rider = issue(&mut counter, 3, 2_000).await;
    let t = transit(entry_gate.call(&tap_in(&mut rider, "reader-1")).await);
    assert_eq!(t.status, Status::Approved);
    let block = Request::Block { op_ref: 4, card_id: rider.id, reason: BlockReason::Lost };
    assert_eq!(counter.call(&block).await.status(), Some(Status::Approved));
    let t = transit(
        call_checked(&mut entry_gate, rider.key.clone(), &tap_in(&mut rider, "reader-1")).await,
    );
    assert_eq!(t.status, Status::CardBlocked);
    let t = transit(
        call_checked(&mut exit_gate, rider.key.clone(), &tap_out(&mut rider, 150, "reader-2"))
            .await,
    );
    assert_eq!((t.status, t.balance), (Status::Approved, Amount(1_850)));

    // Close settles an open hold at the missing tap-out fare first, then refunds the rest.
    let mut leaver = issue(&mut counter, 5, 1_000).await;
    assert_eq!(
        transit(entry_gate.call(&tap_in(&mut leaver, "reader-1")).await).status,
        Status::Approved
    );
    match counter.call(&Request::Close { op_ref: 6, card_id: leaver.id }).await {
        Response::Close(s) => {
            assert_eq!((s.status, s.refunded), (Status::Approved, Amount(1_000 - MAX_FARE)))
        }
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
    audit(&env, started);
}

/// The auditor finds the journal consistent, and the settlement of the day reconciles with
/// the fares, expiries and reversals in it (rows are checked when the test did not straddle
/// midnight UTC).
fn audit(env: &Env, started: Date) -> Option<Settlement> {
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "verify: {:?}", report.problems);
    let today = Date::today();
    for day in [started, today] {
        let s = report::settlement(&env.data, day).unwrap();
        assert!(s.reconciled(), "settlement of {day} does not reconcile");
    }
    (started == today).then(|| report::settlement(&env.data, today).unwrap())
}

#[tokio::test]
async fn holds_survive_a_restart_and_expire_on_the_server_clock() {
    let env = env();
    let started = Date::today();
    // A long timeout first: the hold must outlive the restart.
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut gate = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut card = issue(&mut counter, 1, 1_000).await;
    let tapped = transit(gate.call(&tap_in(&mut card, "reader-1")).await);
    assert_eq!(tapped.status, Status::Approved);
    server.stop().await.unwrap();

    let server = env.start().await;
    let mut gate = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let f = transit(gate.call(&funds(&card, "reader-1")).await);
    assert_eq!(
        (f.held, f.ref_atc, f.time_ms),
        (Amount(MAX_FARE), tapped.atc, tapped.time_ms),
        "the hold survived"
    );
    server.stop().await.unwrap();

    // The derived state thrown away: the hold is rebuilt from the journal.
    for shard in 0..2 {
        let state = citycard::layout::shard_dir(&env.data, shard).join("state");
        std::fs::remove_dir_all(state).unwrap();
    }
    let server = env.start().await;
    let mut gate = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let f = transit(gate.call(&funds(&card, "reader-1")).await);
    assert_eq!((f.held, f.time_ms), (Amount(MAX_FARE), tapped.time_ms), "rebuilt");
    let out = transit(gate.call(&tap_out(&mut card, 100, "reader-1")).await);
    assert_eq!((out.status, out.balance, out.ref_atc), (Status::Approved, Amount(900), tapped.atc));
    server.stop().await.unwrap();

    // A short timeout: nobody taps out, the server's sweep settles the hold at the missing
    // tap-out fare without any request for the card.
    let server = start_with(&env, |c| {
        c.limits.transit.hold_timeout_ms = 200;
        c.limits.transit.missing_tapout_fare = 250;
    })
    .await;
    let mut gate = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let t = transit(gate.call(&tap_in(&mut card, "reader-1")).await);
    assert_eq!(t.status, Status::Approved);
    let settled = async {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let history = history_of(&mut kiosk, &card).await;
            if history.first().map(|e| e.kind) == Some(EntryKind::HoldExpired) {
                return history;
            }
        }
        panic!("the hold was not settled within 5 s");
    }
    .await;
    let expired = &settled[0];
    assert_eq!(
        (expired.status, expired.amount, expired.balance_after, expired.atc),
        (Status::Approved, Amount(-250), Amount(650), Atc(0))
    );
    // Its tap-out comes too late.
    let late = transit(gate.call(&tap_out(&mut card, 100, "reader-1")).await);
    assert_eq!(
        (late.status, late.balance, late.held),
        (Status::NoOpenHold, Amount(650), Amount(0))
    );

    // An expired hold is also settled when its card is touched before any sweep could run:
    // the tap-in after it is decided on the settled balance.
    let t = transit(gate.call(&tap_in(&mut card, "reader-1")).await);
    assert_eq!(t.status, Status::Approved);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let again = transit(gate.call(&tap_in(&mut card, "reader-1")).await);
    assert_eq!(
        (again.status, again.balance, again.held),
        (Status::Approved, Amount(400), Amount(MAX_FARE))
    );
    server.stop().await.unwrap();
    if let Some(s) = audit(&env, started) {
        // Settled by the server: no terminal.
        let expired = s.row("", Operation::HoldExpired);
        assert_eq!((expired.count, expired.amount), (2, 500));
        assert_eq!(s.row("reader-1", Operation::TapIn).count, 4);
        assert_eq!(s.row("reader-1", Operation::TapOut).amount, 100);
    }
}

#[tokio::test]
async fn reversal_of_the_terminals_own_purchase() {
    let env = env();
    let started = Date::today();
    let server = start_with(&env, |c| c.limits.transit.reversal_window_ms = 60_000).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut kiosk_reader = Client::connect(&env.keys, addr, "reader-1").await;
    let mut other = Client::connect(&env.keys, addr, "reader-2").await;
    let mut kiosk = Client::connect(&env.keys, addr, "kiosk-1").await;
    let mut card = issue(&mut counter, 1, 1_000).await;
    let purchase = card.purchase(250, "reader-1");
    assert_eq!(kiosk_reader.call(&purchase).await.status(), Some(Status::Approved));
    let original = *purchase.card_auth().unwrap();

    // Another terminal cannot reverse it.
    let r = transit(
        call_checked(
            &mut other,
            card.key.clone(),
            &reversal(&mut card, 250, &original, "reader-2"),
        )
        .await,
    );
    assert_eq!((r.status, r.balance), (Status::NotFound, Amount(750)));
    // Another amount is not this purchase's.
    let r = transit(
        call_checked(
            &mut kiosk_reader,
            card.key.clone(),
            &reversal(&mut card, 200, &original, "reader-1"),
        )
        .await,
    );
    assert_eq!(r.status, Status::InvalidAmount);
    // A wrong original cryptogram names no purchase.
    let forged = CardAuth { cryptogram: Mac([7; 16]), ..original };
    let r = transit(kiosk_reader.call(&reversal(&mut card, 250, &forged, "reader-1")).await);
    assert_eq!(r.status, Status::NotFound);

    let request = reversal(&mut card, 250, &original, "reader-1");
    let r = transit(call_checked(&mut kiosk_reader, card.key.clone(), &request).await);
    assert_eq!(
        (r.status, r.balance, r.amount, r.ref_atc),
        (Status::Approved, Amount(1_000), Amount(250), original.atc)
    );
    assert_eq!(transit(kiosk_reader.call(&request).await), r, "a retry is the same answer");
    assert_eq!(balance_of(&mut kiosk, &card).await, 1_000);

    // A second reversal of the same purchase.
    let r = transit(
        call_checked(
            &mut kiosk_reader,
            card.key.clone(),
            &reversal(&mut card, 250, &original, "reader-1"),
        )
        .await,
    );
    assert_eq!((r.status, r.balance), (Status::AlreadyReversed, Amount(1_000)));

    // The history marks the purchase reversed.
    let history = history_of(&mut kiosk, &card).await;
    let purchase_entry = history.iter().find(|e| e.atc == original.atc).unwrap();
    assert_eq!(
        (purchase_entry.kind, purchase_entry.status, purchase_entry.amount),
        (EntryKind::Purchase, Status::Reversed, Amount(-250))
    );
    assert!(history.iter().any(|e| e.kind == EntryKind::Reversal
        && e.status == Status::Approved
        && e.amount == Amount(250)));
    server.stop().await.unwrap();

    // Outside the window.
    let server = start_with(&env, |c| c.limits.transit.reversal_window_ms = 100).await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let purchase = card.purchase(100, "reader-1");
    assert_eq!(reader.call(&purchase).await.status(), Some(Status::Approved));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let original = *purchase.card_auth().unwrap();
    let r = transit(
        call_checked(
            &mut reader,
            card.key.clone(),
            &reversal(&mut card, 100, &original, "reader-1"),
        )
        .await,
    );
    assert_eq!((r.status, r.balance), (Status::ReversalWindowClosed, Amount(900)));
    server.stop().await.unwrap();
    if let Some(s) = audit(&env, started) {
        let reversed = s.row("reader-1", Operation::Reversal);
        assert_eq!((reversed.count, reversed.amount), (1, 250));
        // Declined: wrong amount, forged cryptogram, second reversal, window closed.
        assert_eq!(reversed.declined, 4);
        assert_eq!(s.row("reader-2", Operation::Reversal).declined, 1);
    }
}

#[tokio::test]
async fn inquiry_resolves_a_grey_record() {
    let env = env();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    let mut other = Client::connect(&env.keys, addr, "reader-2").await;
    let mut card = issue(&mut counter, 1, 1_000).await;

    // Answered: the original answer, byte for byte, inside an answer sealed under the same
    // binding.
    let purchase = card.purchase(250, "reader-1");
    let original = reader.call(&purchase).await;
    let found = call_checked(&mut reader, card.key.clone(), &inquiry(&purchase)).await;
    match &found {
        Response::Inquiry(i) => {
            assert_eq!((i.status, i.journal_seq), (Status::Approved, 0));
            let answer = i.answer.as_deref().unwrap();
            assert_eq!(answer, &original);
            assert!(mac_ok(&card.key, &purchase.card_auth().unwrap().cryptogram, answer));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(balance_of(&mut reader, &card).await, 750, "an inquiry executes nothing");

    // Never arrived: NotFound, and the ATC is burnt.
    let lost = card.purchase(100, "reader-1");
    let not_found = match call_checked(&mut reader, card.key.clone(), &inquiry(&lost)).await {
        Response::Inquiry(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!((not_found.status, not_found.answer.is_none()), (Status::NotFound, true));
    assert!(not_found.journal_seq > 0, "the burn is journaled");
    // The late copy of the original is declined, and moves nothing.
    assert_eq!(reader.call(&lost).await.status(), Some(Status::Replay));
    assert_eq!(balance_of(&mut reader, &card).await, 750);
    // Asking again repeats the answer.
    assert_eq!(reader.call(&inquiry(&lost)).await, Response::Inquiry(not_found));

    // A request that used the ATC differently: Replay.
    let mut twin = card.clone();
    twin.atc -= 2;
    let different = twin.top_up(10, "reader-1");
    let r = call_checked(&mut reader, card.key.clone(), &inquiry(&different)).await;
    assert_eq!(r.status(), Some(Status::Replay));

    // Only the terminal that sent the request can ask (its id is in the cryptogram).
    let r = other.call(&inquiry(&purchase)).await;
    assert_eq!(r.status(), Some(Status::BadCryptogram));

    // A tap-in's answer can be asked for too.
    let tap = tap_in(&mut card, "reader-1");
    let tapped = reader.call(&tap).await;
    match reader.call(&inquiry(&tap)).await {
        Response::Inquiry(i) => assert_eq!(i.answer.as_deref(), Some(&tapped)),
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();
}
