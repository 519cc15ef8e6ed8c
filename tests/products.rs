//! Protocol 1.3 over mutual TLS on 127.0.0.1: card products chosen at Issue and changed by
//! SetProduct, every limit decline (BalanceLimit, TransactionLimit, DailyAmountLimit,
//! DailyCountLimit, UnknownProduct), the card deposit paid at Issue, moved or kept at Replace
//! and paid back at Close, the daily counters and deposits across a restart and a rebuild of
//! the derived state, and a settlement that reconciles balances and deposits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use citycard::config::Config;
use citycard::engine::product::{Product, ReplaceDeposit};
use citycard::report::{self, Date, Operation};
use citycard::server::RunningServer;
use citycard_protocol::crypto::{response_mac_ok, staff_binding, CardKey};
use citycard_protocol::{
    Amount, CardId, CardResult, CardState, IssueResult, Mac, MessageType, ProductResult, Request,
    Response, Status, TransitResult,
};
use common::{balance_of, Card, Client, Env};

/// Product 1 "anonymous": balance up to 1,000, 300 a purchase, 3 debits and 500 a day, a
/// tap-in holds 200, deposit 2,000 kept at Replace.
const ANONYMOUS: Product = Product {
    max_balance: 1_000,
    max_amount: 300,
    daily_amount_limit: Some(500),
    daily_count_limit: Some(3),
    max_fare: 200,
    deposit: 2_000,
    replace_deposit: ReplaceDeposit::Keep,
};
/// Product 2 "registered": the server's limits, deposit 500 moved at Replace.
const REGISTERED: Product = Product {
    max_balance: 100_000,
    max_amount: 50_000,
    daily_amount_limit: None,
    daily_count_limit: None,
    max_fare: 400,
    deposit: 500,
    replace_deposit: ReplaceDeposit::Move,
};

fn with_products(config: &mut Config) {
    config.products = vec![
        citycard::config::ProductConfig { id: 1, name: "anonymous".into(), rules: ANONYMOUS },
        citycard::config::ProductConfig { id: 2, name: "registered".into(), rules: REGISTERED },
    ];
    config.apply_products();
    config.validate().unwrap();
}

async fn start(env: &Env) -> RunningServer {
    let mut config = env.config();
    with_products(&mut config);
    RunningServer::start(config).await.unwrap()
}

fn mac_ok(key: &CardKey, binding: &Mac, response: &Response) -> bool {
    let mut body = BytesMut::new();
    response.encode_body(&mut body).unwrap();
    response_mac_ok(key, response.message_type() as u8, binding, &body)
}

/// A card answer with its MAC checked against the request's cryptogram.
async fn card_call(client: &mut Client, key: &CardKey, request: &Request) -> CardResult {
    let response = client.call(request).await;
    assert!(mac_ok(key, &request.card_auth().unwrap().cryptogram, &response), "MAC");
    match response {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => r,
        other => panic!("not a card result: {other:?}"),
    }
}

async fn issue_product(counter: &mut Client, op_ref: u64, balance: i64, product: u8) -> Response {
    counter.call(&Request::IssueProduct { op_ref, deposit: Amount(balance), product }).await
}

fn issued(response: Response) -> IssueResult {
    match response {
        Response::Issue(r) => r,
        other => panic!("not an issue result: {other:?}"),
    }
}

/// SetProduct through `counter`, the answer's MAC checked under the card's key when it is
/// authenticated.
async fn set_product(counter: &mut Client, card: &Card, op_ref: u64, product: u8) -> ProductResult {
    let request = Request::SetProduct { op_ref, card_id: card.id, product };
    let response = counter.call(&request).await;
    let Response::SetProduct(result) = response.clone() else {
        panic!("not a product result: {response:?}");
    };
    let sealed = !matches!(
        result.status,
        Status::NotPermitted | Status::UnknownCard | Status::ReferenceReused
    );
    assert_eq!(mac_ok(&card.key, &staff_binding(op_ref), &response), sealed, "{result:?}");
    result
}

/// Whether the test still runs on the UTC day it started (daily counters reset at midnight;
/// a run straddling it checks nothing that depends on the day).
fn same_day(started: Date) -> bool {
    Date::today() == started
}

#[tokio::test]
async fn products_limits_and_set_product_with_every_decline() {
    let env = Env::new();
    let started = Date::today();
    let server = start(&env).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    let mut kiosk = Client::connect(&env.keys, addr, "kiosk-1").await;

    // Issue: product 1 with an initial balance of 800; the deposit is paid on top.
    let result = issued(issue_product(&mut counter, 1, 800, 1).await);
    assert_eq!((result.status, result.balance), (Status::Approved, Amount(800)));
    let mut card = Card::from_issue(&result);
    // A retry of the same bytes gets the same answer; another product under the op_ref does not.
    assert_eq!(issued(issue_product(&mut counter, 1, 800, 1).await), result);
    let reused = issued(issue_product(&mut counter, 1, 800, 2).await);
    assert_eq!((reused.status, reused.journal_seq), (Status::ReferenceReused, 0));
    // Issue declines: above the product's balance, an unknown product, and the 16-byte Issue
    // still means product 0 with the server's limits.
    let over = issued(issue_product(&mut counter, 2, 1_001, 1).await);
    assert_eq!((over.status, over.card_id), (Status::BalanceLimit, CardId(0)));
    assert_ne!(over.journal_seq, 0, "the decline is journaled under its op_ref");
    let unknown = issued(issue_product(&mut counter, 3, 10, 9).await);
    assert_eq!(unknown.status, Status::UnknownProduct);
    let plain = common::issue(&mut counter, 4, 90_000).await;

    // Purchases: the product's per-transaction limit; the server's stays InvalidAmount.
    let r = card_call(&mut reader, &card.key.clone(), &card.purchase(301, "reader-1")).await;
    assert_eq!((r.status, r.balance), (Status::TransactionLimit, Amount(800)));
    assert_ne!(r.journal_seq, 0, "a limit decline consumes the ATC like any decline");
    let r = card_call(&mut reader, &card.key.clone(), &card.purchase(50_001, "reader-1")).await;
    assert_eq!(r.status, Status::InvalidAmount);
    // Top-ups: the product's maximum balance and per-transaction limit.
    let r = card_call(&mut kiosk, &card.key.clone(), &card.top_up(201, "kiosk-1")).await;
    assert_eq!((r.status, r.balance), (Status::BalanceLimit, Amount(800)));
    let r = card_call(&mut kiosk, &card.key.clone(), &card.top_up(200, "kiosk-1")).await;
    assert_eq!((r.status, r.balance), (Status::Approved, Amount(1_000)));
    // A card of product 0 has the server's limits.
    let mut plain_card = plain;
    let r =
        card_call(&mut kiosk, &plain_card.key.clone(), &plain_card.top_up(10_000, "kiosk-1")).await;
    assert_eq!((r.status, r.balance), (Status::Approved, Amount(100_000)));

    // Daily limits: 300 + 200 spent reaches the 500 of the day; then one debit is left.
    let r = card_call(&mut reader, &card.key.clone(), &card.purchase(300, "reader-1")).await;
    assert_eq!(r.status, Status::Approved);
    let r = card_call(&mut reader, &card.key.clone(), &card.purchase(201, "reader-1")).await;
    if same_day(started) {
        assert_eq!((r.status, r.balance), (Status::DailyAmountLimit, Amount(700)));
    }
    let r = card_call(&mut reader, &card.key.clone(), &card.purchase(200, "reader-1")).await;
    assert_eq!(r.status, Status::Approved);
    // A tap-in holds the product's fare (200) and counts as the day's third debit...
    let auth = card.auth(MessageType::TapIn, 0, "reader-1");
    let tapped = match reader.call(&Request::TapIn { auth }).await {
        Response::TapIn(t) => t,
        other => panic!("{other:?}"),
    };
    if same_day(started) {
        // ...but 500 were already spent today: the hold does not fit the day's amount.
        assert_eq!(tapped.status, Status::DailyAmountLimit);
    }
    // A fourth debit of the day: DailyCountLimit (the tap-in above was declined, so the day's
    // count is 2; a third purchase of 0 is impossible, so the count limit is shown with a
    // product 1 card fresh for the day below).
    let mut second = Card::from_issue(&issued(issue_product(&mut counter, 5, 1_000, 1).await));
    for _ in 0..2 {
        let r = card_call(&mut reader, &second.key.clone(), &second.purchase(10, "reader-1")).await;
        assert_eq!(r.status, Status::Approved);
    }
    let auth = second.auth(MessageType::TapIn, 0, "reader-1");
    let t: TransitResult = match reader.call(&Request::TapIn { auth }).await {
        Response::TapIn(t) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!((t.status, t.held), (Status::Approved, Amount(200)), "the product's fare");
    let r = card_call(&mut reader, &second.key.clone(), &second.purchase(10, "reader-1")).await;
    if same_day(started) {
        assert_eq!((r.status, r.balance), (Status::DailyCountLimit, Amount(980)));
    }

    // Funds with the 1.3 detail byte: product, deposit and today's counters (300 + 200 spent
    // in 2 debits; the declined tap-in counted nothing); a read, so any ATC will do.
    let auth = card.auth_at(MessageType::Funds, 0, "kiosk-1", card.atc + 1);
    let response = kiosk.call(&Request::FundsProduct { auth }).await;
    assert!(mac_ok(&card.key, &auth.cryptogram, &response), "MAC of the 1.3 FundsResult");
    let Response::FundsProduct(f) = response else { panic!("{response:?}") };
    assert_eq!(
        (f.funds.status, f.funds.balance, f.product, f.deposit),
        (Status::Approved, Amount(500), 1, Amount(2_000))
    );
    if same_day(started) {
        assert_eq!((f.spent_today, f.debits_today), (Amount(500), 2));
    }
    // The 36-byte Funds keeps its 1.2 answer.
    let auth = card.auth_at(MessageType::Funds, 0, "kiosk-1", card.atc + 1);
    assert!(matches!(kiosk.call(&Request::Funds { auth }).await, Response::Funds(_)));

    // SetProduct: to product 2 ("registering" the card): the deposit falls from 2,000 to 500,
    // 1,500 is paid back; the balance and today's counters stay.
    let p = set_product(&mut counter, &card, 10, 2).await;
    assert_eq!(
        (p.status, p.product, p.deposit, p.deposit_paid, p.deposit_refunded, p.balance),
        (Status::Approved, 2, Amount(500), Amount(0), Amount(1_500), Amount(500))
    );
    assert_eq!(p.card_state, CardState::Active);
    assert_ne!(p.journal_seq, 0);
    // The same bytes again: the same answer, byte for byte; another product under the op_ref:
    // ReferenceReused, nothing journaled.
    assert_eq!(set_product(&mut counter, &card, 10, 2).await, p);
    let reused = set_product(&mut counter, &card, 10, 1).await;
    assert_eq!((reused.status, reused.journal_seq), (Status::ReferenceReused, 0));
    // Registered now: the day's 500 no longer limit it, a purchase of 400 passes.
    let r = card_call(&mut reader, &card.key.clone(), &card.purchase(400, "reader-1")).await;
    assert_eq!((r.status, r.balance), (Status::Approved, Amount(100)));
    // Back to product 1 is declined while the balance fits, and UnknownProduct for id 9.
    let r = card_call(&mut kiosk, &card.key.clone(), &card.top_up(5_000, "kiosk-1")).await;
    assert_eq!(r.status, Status::Approved);
    let p = set_product(&mut counter, &card, 11, 1).await;
    assert_eq!(
        (p.status, p.product, p.deposit, p.deposit_paid),
        (Status::BalanceLimit, 2, Amount(500), Amount(0))
    );
    assert_ne!(p.journal_seq, 0, "a decline for the card is journaled");
    let p = set_product(&mut counter, &card, 12, 9).await;
    assert_eq!((p.status, p.product), (Status::UnknownProduct, 2));
    let p = set_product(&mut counter, &plain_card, 13, 1).await;
    assert_eq!(p.status, Status::BalanceLimit, "100,000 is above product 1's maximum");
    // Product 0 has no deposit: the 500 is paid back.
    let p = set_product(&mut counter, &card, 14, 0).await;
    assert_eq!(
        (p.status, p.deposit, p.deposit_refunded),
        (Status::Approved, Amount(0), Amount(500))
    );
    // An unknown card: not recorded, zero MAC.
    let ghost = Card { id: CardId(card.id.0 + 1_000_000), ..card.clone() };
    let p = set_product(&mut counter, &ghost, 15, 1).await;
    assert_eq!((p.status, p.journal_seq, p.mac), (Status::UnknownCard, 0, Mac::default()));
    // Roles: a reader or kiosk may not change products.
    let request = Request::SetProduct { op_ref: 16, card_id: card.id, product: 1 };
    for client in [&mut reader, &mut kiosk] {
        match client.call(&request).await {
            Response::SetProduct(p) => assert_eq!(p.status, Status::NotPermitted),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(balance_of(&mut kiosk, &plain_card).await, 100_000);
    // History shows the product changes as kind 16, declines included, amount 0.
    let auth = card.auth_at(MessageType::History, 0, "kiosk-1", card.atc + 1);
    let page = match kiosk.call(&Request::History { auth, before_seq: 0, limit: 64 }).await {
        Response::History(page) => page,
        other => panic!("{other:?}"),
    };
    let changes: Vec<(Status, i64)> = page
        .entries
        .iter()
        .filter(|e| e.kind == citycard_protocol::EntryKind::ProductChanged)
        .map(|e| (e.status, e.amount.0))
        .collect();
    assert_eq!(
        changes,
        [
            (Status::Approved, 0),
            (Status::UnknownProduct, 0),
            (Status::BalanceLimit, 0),
            (Status::Approved, 0)
        ],
        "newest first"
    );
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "verify: {:?}", report.problems);
}

#[tokio::test]
async fn deposits_and_daily_counters_survive_restart_and_rebuild_and_settle() {
    let env = Env::new();
    let started = Date::today();
    let server = start(&env).await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    // Two product 1 cards (deposit 2,000 each) and one product 2 card (deposit 500).
    let mut kept = Card::from_issue(&issued(issue_product(&mut counter, 1, 600, 1).await));
    let closing = Card::from_issue(&issued(issue_product(&mut counter, 2, 400, 1).await));
    let moving = Card::from_issue(&issued(issue_product(&mut counter, 3, 700, 2).await));
    for _ in 0..2 {
        let r = card_call(&mut reader, &kept.key.clone(), &kept.purchase(10, "reader-1")).await;
        assert_eq!(r.status, Status::Approved);
    }
    server.stop().await.unwrap();

    // After a restart, and after a rebuild of the derived state from the journal, the day's
    // counters are where they were: one debit left.
    for rebuild in [false, true] {
        if rebuild {
            for shard in 0..2 {
                let state = citycard::server::shard_dir(&env.data, shard).join("state");
                std::fs::remove_dir_all(state).unwrap();
            }
        }
        let server = start(&env).await;
        let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
        let auth = kept.auth_at(MessageType::Purchase, 10, "reader-1", kept.atc + 1);
        // The ATC is used only once: the first pass spends the third debit, the second pass
        // retries the same bytes and must get the same answer from the journal.
        let request = Request::Purchase { auth, amount: Amount(10) };
        let r = card_call(&mut reader, &kept.key.clone(), &request).await;
        assert_eq!((r.status, r.balance), (Status::Approved, Amount(570)), "rebuild {rebuild}");
        let mut probe = kept.clone();
        probe.atc += 1;
        let r = card_call(&mut reader, &probe.key.clone(), &probe.purchase(10, "reader-1")).await;
        if same_day(started) {
            assert_eq!(r.status, Status::DailyCountLimit, "rebuild {rebuild}");
        }
        if rebuild {
            kept = probe;
        }
        server.stop().await.unwrap();
    }

    let server = start(&env).await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    // Close pays out the balance and the deposit: 400 + 2,000.
    match counter.call(&Request::Close { op_ref: 20, card_id: closing.id }).await {
        Response::Close(s) => {
            assert_eq!(
                (s.status, s.balance, s.refunded),
                (Status::Approved, Amount(0), Amount(2_400))
            );
            assert!(mac_ok(&closing.key, &staff_binding(20), &Response::Close(s)));
        }
        other => panic!("{other:?}"),
    }
    // Replace of product 1 keeps the old deposit and takes a new one; the new card is of
    // product 1 too (its limits apply: a top-up above 1,000 is BalanceLimit).
    let replaced = match counter.call(&Request::Replace { op_ref: 21, card_id: kept.id }).await {
        Response::Replace(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((replaced.status, replaced.balance), (Status::Approved, Amount(570)));
    let mut new_card = Card::from_issue(&replaced);
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let r = card_call(&mut kiosk, &new_card.key.clone(), &new_card.top_up(300, "kiosk-1")).await;
    assert_eq!((r.status, r.balance), (Status::Approved, Amount(870)));
    let r = card_call(&mut kiosk, &new_card.key.clone(), &new_card.top_up(200, "kiosk-1")).await;
    assert_eq!((r.status, r.balance), (Status::BalanceLimit, Amount(870)));
    // Its deposit is product 1's 2,000: changing it to product 2 pays back 1,500.
    let p = set_product(&mut counter, &new_card, 22, 2).await;
    assert_eq!((p.deposit_refunded, p.deposit), (Amount(1_500), Amount(500)));
    // Replace of product 2 moves the deposit: closing the new card pays it back.
    let moved = match counter.call(&Request::Replace { op_ref: 23, card_id: moving.id }).await {
        Response::Replace(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(moved.balance, Amount(700));
    let moved_card = Card::from_issue(&moved);
    match counter.call(&Request::Close { op_ref: 24, card_id: moved_card.id }).await {
        Response::Close(s) => assert_eq!(s.refunded, Amount(700 + 500)),
        other => panic!("{other:?}"),
    }
    server.stop().await.unwrap();

    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "verify: {:?}", report.problems);
    // The audit re-derives the deposits from the records alone (the figures the settlement
    // below gives too): paid at Issue and for the kept card's replacement, paid back at the
    // Closes and by SetProduct, kept at the Replace under `keep`; the new card's 500 is held.
    let t = report.totals;
    assert_eq!(
        (t.card_deposits_paid, t.card_deposits_refunded, t.card_deposits_kept, t.card_deposits),
        (6_500, 4_000, 2_000, 500)
    );
    let today = Date::today();
    for day in [started, today] {
        let s = report::settlement(&env.data, day).unwrap();
        assert!(s.reconciled(), "settlement of {day} does not reconcile:\n{}", s.to_csv());
    }
    if started == today {
        let s = report::settlement(&env.data, today).unwrap();
        // Paid: 2,000 + 2,000 + 500 at Issue, 2,000 for the replacement of the kept card.
        // Refunded: 2,000 at the first Close, 1,500 by SetProduct, 500 at the second Close.
        // Kept: the replaced product 1 card's 2,000.
        let d = s.deposits;
        assert_eq!((d.paid, d.refunded, d.kept), (6_500, 4_000, 2_000), "{}", s.to_csv());
        assert_eq!((d.start, d.end), (0, 500), "the new card's 500 is still held");
        assert_eq!(s.row("counter-1", Operation::CardDepositKept).amount, 2_000);
        assert_eq!(s.row("counter-1", Operation::ProductChange).count, 1);
        let csv = s.to_csv();
        assert!(
            csv.contains("# card_deposits net 500 = paid 6500 - refunded 4000 - kept 2000"),
            "{csv}"
        );
        assert!(csv.ends_with("# reconciled yes\n"), "{csv}");
    }
    // A deposit changed in the derived state behind the engine's back is found by the audit.
    let count: u16 =
        std::fs::read_to_string(env.data.join("shards")).unwrap().trim().parse().unwrap();
    let shard = citycard::engine::shard_of(new_card.id, count);
    let state = citycard::server::shard_dir(&env.data, shard).join("state");
    {
        let db = sled::open(&state).unwrap();
        let mut key = vec![b'c'];
        key.extend_from_slice(&new_card.id.0.to_be_bytes());
        let stored = db.get(&key).unwrap().unwrap();
        let mut record = citycard::engine::store::codec::decode(&stored).unwrap();
        assert_eq!(record.product.deposit, Amount(500));
        record.product.deposit = Amount(0);
        db.insert(&key, &*citycard::engine::store::codec::encode(&record)).unwrap();
        db.flush().unwrap();
    }
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(
        report.problems.iter().any(|p| p.contains("state says product 2 deposit 0")
            && p.contains("journal replay says product 2 deposit 500")),
        "{:?}",
        report.problems
    );
}

/// The client crate's Issue-with-product and SetProduct, and the counter console's "set
/// product", against the same server.
#[tokio::test]
async fn client_crate_and_counter_console_set_products() {
    let env = Env::new();
    let server = start(&env).await;
    let addr = server.local_addr.to_string();
    let config = citycard_client::Config::from_keys_dir(&addr, &env.keys, "counter-1").unwrap();
    let client = citycard_client::Client::new(config).unwrap();
    let issued = client.issue_product(1, Amount(300), 1).await.unwrap();
    assert_eq!((issued.status, issued.balance), (Status::Approved, Amount(300)));
    let key = CardKey::from_bytes(issued.card_key);
    let p = client.set_product(2, issued.card_id, 2, Some(&key)).await.unwrap();
    assert_eq!(
        (p.status, p.deposit, p.deposit_refunded),
        (Status::Approved, Amount(500), Amount(1_500))
    );
    // Checked under the wrong key, the answer is not believed.
    let wrong = CardKey::from_bytes([7; 32]);
    let err = client.set_product(2, issued.card_id, 2, Some(&wrong)).await.unwrap_err();
    assert!(matches!(err, citycard_client::ClientError::BadMac(_)), "{err}");
    let unknown = client.issue_product(3, Amount(0), 30).await.unwrap();
    assert_eq!(unknown.status, Status::UnknownProduct);

    // The counter console: back to product 1 takes the 1,500 again.
    let counter = citycard::counter::ops::Counter { client, cards: None };
    let op = citycard::counter::ops::Op::SetProduct { card: issued.card_id, product: 1 };
    let answer = counter.run(&op, 4).await;
    assert!(answer.approved, "{answer:?}");
    let field = |name: &str| answer.fields.iter().find(|f| f.name == name).map(|f| f.value.clone());
    assert_eq!(field("product").as_deref(), Some("1"));
    assert!(field("take deposit").is_some_and(|v| v.contains("15")), "{answer:?}");
    assert_eq!(answer.op_ref, Some(4));
    server.stop().await.unwrap();
}
