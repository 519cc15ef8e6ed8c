//! Table tests of the protocol 1.3 product rules: limits of purchases, top-ups and tap-ins,
//! the daily counters, Issue with a product, SetProduct, and the deposit at Close and Replace.

use std::collections::BTreeMap;

use citycard_protocol::{
    Amount, Atc, CardAuth, CardId, CardState, EntryKind, KeyVersion, Mac, Status,
};

use super::*;
use crate::engine::entry::Entry;
use crate::engine::product::{
    day_of, CardProduct, Daily, Product, ProductFields, ReplaceDeposit, DAY_MS,
};
use crate::engine::state::CardRecord;
use crate::engine::types::Limits;
use crate::journal::Pos;

const NOW_MS: u64 = 1_800_000_000_000;
const CARD: CardId = CardId(6_000_000_000_000_000);
const NEW_CARD: CardId = CardId(6_000_000_000_000_002);

/// Product 1 "anonymous": balance up to 1,000, 300 a purchase, 3 debits and 500 a day,
/// fare hold 200, deposit 2,000, kept at Replace. Product 2 "registered": the server limits,
/// deposit 500, moved at Replace.
fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.products.set(
        1,
        Product {
            max_balance: 1_000,
            max_amount: 300,
            daily_amount_limit: Some(500),
            daily_count_limit: Some(3),
            max_fare: 200,
            deposit: 2_000,
            replace_deposit: ReplaceDeposit::Keep,
        },
    );
    limits.products.set(
        2,
        Product {
            max_balance: 100_000,
            max_amount: 50_000,
            daily_amount_limit: None,
            daily_count_limit: None,
            max_fare: 400,
            deposit: 500,
            replace_deposit: ReplaceDeposit::Move,
        },
    );
    limits
}

fn with_ctx<T>(now_ms: u64, f: impl FnOnce(&Context<'_>) -> T) -> T {
    let limits = limits();
    let retire_after_ms = BTreeMap::new();
    let ctx = Context {
        terminal: "counter-1",
        now_ms,
        policy: Policy {
            limits: &limits,
            retire_after_ms: &retire_after_ms,
            current_version: KeyVersion(2),
        },
        hotlist_version: 3,
    };
    f(&ctx)
}

fn card(balance: i64, product: CardProduct) -> CardRecord {
    CardRecord { product, ..CardRecord::test_active(balance, 10, Pos::NONE) }
}

fn of(id: u8, deposit: i64, daily: Daily) -> CardProduct {
    CardProduct { id, deposit: Amount(deposit), daily }
}

fn today(amount: i64, count: u32) -> Daily {
    Daily { day: day_of(NOW_MS), amount, count }
}

fn auth(atc: u32) -> CardAuth {
    CardAuth { card_id: CARD, atc: Atc(atc), nonce: 5, cryptogram: Mac([atc as u8; 16]) }
}

fn recorded<D: std::fmt::Debug>(decided: Decided<D>) -> Entry {
    match decided {
        Decided::Record(entry) => entry,
        other => panic!("expected a journal entry, got {other:?}"),
    }
}

#[test]
fn purchase_and_top_up_limits_name_the_limit() {
    use EntryKind::{Purchase, TopUp};
    let yesterday = Daily { day: day_of(NOW_MS) - 1, amount: 500, count: 3 };
    // (kind, balance, card product, amount, status, counters after when journaled in v4)
    let rows = [
        (Purchase, 900, of(1, 2_000, Daily::NONE), 300, Status::Approved, Some(today(300, 1))),
        (Purchase, 900, of(1, 2_000, Daily::NONE), 301, Status::TransactionLimit, None),
        // Above the server's max_amount stays InvalidAmount, as in 1.2.
        (Purchase, 900, of(1, 2_000, Daily::NONE), 50_001, Status::InvalidAmount, None),
        (Purchase, 900, of(1, 2_000, today(100, 3)), 10, Status::DailyCountLimit, None),
        (Purchase, 900, of(1, 2_000, today(300, 1)), 201, Status::DailyAmountLimit, None),
        (Purchase, 900, of(1, 2_000, today(300, 1)), 200, Status::Approved, Some(today(500, 2))),
        // Yesterday's counters count as zero today.
        (Purchase, 900, of(1, 2_000, yesterday), 300, Status::Approved, Some(today(300, 1))),
        // The limits are checked before the funds.
        (Purchase, 50, of(1, 2_000, today(0, 3)), 100, Status::DailyCountLimit, None),
        (Purchase, 50, of(1, 2_000, Daily::NONE), 100, Status::InsufficientFunds, None),
        // Product 2 has no daily limit: no counters kept, a version 2 entry.
        (Purchase, 900, of(2, 500, Daily::NONE), 900, Status::Approved, None),
        (TopUp, 900, of(1, 2_000, Daily::NONE), 100, Status::Approved, None),
        (TopUp, 900, of(1, 2_000, Daily::NONE), 101, Status::BalanceLimit, None),
        (TopUp, 500, of(1, 2_000, Daily::NONE), 301, Status::TransactionLimit, None),
        // Top-ups are not debits: the daily limits do not apply.
        (TopUp, 0, of(1, 2_000, today(500, 3)), 300, Status::Approved, None),
        (TopUp, 99_000, of(2, 500, Daily::NONE), 1_001, Status::OverBalanceCap, None),
        // A card whose product left the table is held to product 0 (the server limits).
        (TopUp, 0, of(9, 100, Daily::NONE), 50_000, Status::Approved, None),
    ];
    for (i, (kind, balance, product, amount, status, counters)) in rows.into_iter().enumerate() {
        let record = card(balance, product);
        let entry = with_ctx(NOW_MS, |ctx| {
            recorded(money::decide(ctx, kind, &auth(11), Amount(amount), &record, AtcUse::Fresh))
        });
        assert_eq!(entry.status, status, "row {i}");
        assert_eq!(entry.product.map(|p| p.after.daily), counters, "row {i}");
        if let Some(p) = entry.product {
            assert_eq!((p.after.id, p.after.deposit), (product.id, product.deposit), "row {i}");
            assert_eq!(p, ProductFields::state(p.after), "row {i}: no deposit moves");
        }
        assert_eq!(entry.check(), Ok(()), "row {i}");
    }
}

#[test]
fn tap_in_holds_the_products_fare_and_counts_against_the_day() {
    let over = |daily: Daily| {
        let limits = limits();
        let product = limits.card_product(1);
        money::daily_limit(&product, daily, NOW_MS, product.max_fare)
    };
    assert_eq!(over(today(300, 2)), None);
    assert_eq!(over(today(301, 2)), Some(Status::DailyAmountLimit));
    assert_eq!(over(today(0, 3)), Some(Status::DailyCountLimit));
    assert_eq!(over(Daily { day: day_of(NOW_MS - DAY_MS), amount: 500, count: 3 }), None);
    let record = card(900, of(1, 2_000, Daily::NONE));
    let mut transit_limits = limits().transit;
    transit_limits.max_fare = limits().card_product(1).max_fare;
    let d = transit::tap_in(&record, false, &transit_limits, None, Atc(11), NOW_MS);
    assert_eq!((d.status, d.amount), (Status::Approved, 200));
    let d = transit::tap_in(
        &record,
        false,
        &transit_limits,
        Some(Status::DailyCountLimit),
        Atc(11),
        NOW_MS,
    );
    assert_eq!(d.status, Status::DailyCountLimit);
}

#[test]
fn issue_takes_the_products_deposit_on_top_of_the_balance() {
    // (product, initial balance, status, deposit held, deposit paid)
    let rows = [
        (0u8, 1_000, Status::Approved, None),
        (1, 1_000, Status::Approved, Some((2_000, 2_000))),
        (1, 1_001, Status::BalanceLimit, None),
        (2, 0, Status::Approved, Some((500, 500))),
        (2, 100_001, Status::InvalidAmount, None),
        (7, 10, Status::UnknownProduct, None),
    ];
    for (i, (product, balance, status, deposit)) in rows.into_iter().enumerate() {
        let entry = with_ctx(NOW_MS, |ctx| {
            recorded(staff::issue(ctx, 70, Amount(balance), product, NEW_CARD, None))
        });
        assert_eq!(entry.status, status, "row {i}");
        let expected_balance = if status == Status::Approved { balance } else { 0 };
        assert_eq!(entry.balance_after, Amount(expected_balance), "row {i}");
        assert_eq!(entry.product.map(|p| (p.after.deposit.0, p.deposit_paid)), deposit, "row {i}");
        assert_eq!(entry.check(), Ok(()), "row {i}");
    }
    // The same op_ref with another product is another operation.
    let first =
        with_ctx(NOW_MS, |ctx| recorded(staff::issue(ctx, 70, Amount(10), 1, NEW_CARD, None)));
    let again = with_ctx(NOW_MS, |ctx| {
        staff::issue(ctx, 70, Amount(10), 1, NEW_CARD, Some((4, first.clone())))
    });
    assert_eq!(again, Decided::Again(4, first.clone()));
    let other =
        with_ctx(NOW_MS, |ctx| staff::issue(ctx, 70, Amount(10), 2, NEW_CARD, Some((4, first))));
    assert!(matches!(other, Decided::Decline(r) if r.status == Status::ReferenceReused));
}

#[test]
fn set_product_pays_or_refunds_the_deposit_difference() {
    // (balance, card product, new product, status, product after, deposit after, paid, refunded)
    let rows = [
        (900, of(0, 0, Daily::NONE), 1, Status::Approved, 1, 2_000, 2_000, 0),
        (900, of(1, 2_000, today(100, 2)), 2, Status::Approved, 2, 500, 0, 1_500),
        (900, of(2, 500, Daily::NONE), 2, Status::Approved, 2, 500, 0, 0),
        (1_001, of(2, 500, Daily::NONE), 1, Status::BalanceLimit, 2, 500, 0, 0),
        (900, of(2, 500, Daily::NONE), 9, Status::UnknownProduct, 2, 500, 0, 0),
    ];
    for (i, (balance, product, new, status, id, deposit, paid, refunded)) in
        rows.into_iter().enumerate()
    {
        let record = card(balance, product);
        let entry = with_ctx(NOW_MS, |ctx| {
            recorded(staff::set_product(ctx, 80, CARD, new, Some(record), None))
        });
        assert_eq!(
            (entry.status, entry.amount, entry.balance_after),
            (status, Amount(0), Amount(balance)),
            "row {i}"
        );
        let answer = staff::product_answer(&entry, 44, CARD);
        assert_eq!(
            (answer.status, answer.product, answer.deposit.0, answer.deposit_paid.0),
            (status, id, deposit, paid),
            "row {i}"
        );
        assert_eq!((answer.deposit_refunded.0, answer.journal_seq), (refunded, 44), "row {i}");
        assert_eq!(answer.card_state, CardState::Active, "row {i}");
        // Today's counters stay: the new product's limits apply to them from now on.
        assert_eq!(entry.product.map(|p| p.after.daily), Some(product.daily), "row {i}");
        assert_eq!(entry.check(), Ok(()), "row {i}");
    }
    let closed = CardRecord { state: CardState::Closed, ..card(0, CardProduct::DEFAULT) };
    let entry =
        with_ctx(NOW_MS, |ctx| recorded(staff::set_product(ctx, 80, CARD, 1, Some(closed), None)));
    assert_eq!(entry.status, Status::CardClosed);
    let unknown = with_ctx(NOW_MS, |ctx| staff::set_product(ctx, 80, CARD, 1, None, None));
    assert!(matches!(unknown, Decided::Decline(r) if r.status == Status::UnknownCard));
    // A retry answers from its entry; another product under the op_ref is another operation.
    let record = card(10, CardProduct::DEFAULT);
    let first =
        with_ctx(NOW_MS, |ctx| recorded(staff::set_product(ctx, 80, CARD, 1, Some(record), None)));
    let again = with_ctx(NOW_MS, |ctx| {
        staff::set_product(ctx, 80, CARD, 1, Some(record), Some((9, first.clone())))
    });
    assert_eq!(again, Decided::Again(9, first.clone()));
    let other = with_ctx(NOW_MS, |ctx| {
        staff::set_product(ctx, 80, CARD, 2, Some(record), Some((9, first)))
    });
    assert!(matches!(other, Decided::Decline(r) if r.status == Status::ReferenceReused));
}

#[test]
fn close_refunds_the_deposit_and_replace_moves_or_keeps_it() {
    let record = card(300, of(2, 500, Daily::NONE));
    let closed = with_ctx(NOW_MS, |ctx| {
        recorded(staff::card_op(ctx, EntryKind::Close, 81, CARD, None, Some(record), None))
    });
    let fields = closed.product.unwrap_or_else(|| panic!("no product fields"));
    assert_eq!((fields.after.deposit.0, fields.deposit_refunded), (0, 500));
    let answer = staff::answer(EntryKind::Close, &closed, 7, CARD);
    assert_eq!(answer.refunded, Amount(800), "balance and deposit paid out");
    // A card of product 0 without deposit closes exactly as in 1.2 (version 2 entry).
    let plain = with_ctx(NOW_MS, |ctx| {
        let c = card(300, CardProduct::DEFAULT);
        recorded(staff::card_op(ctx, EntryKind::Close, 81, CARD, None, Some(c), None))
    });
    assert_eq!((plain.product, plain.extra), (None, 300));

    // Product 2 moves the deposit; product 1 keeps it and takes a new one.
    for (product, kept, paid) in
        [(of(2, 500, today(10, 1)), 0, 0), (of(1, 2_000, today(10, 1)), 2_000, 2_000)]
    {
        let entry = with_ctx(NOW_MS, |ctx| {
            recorded(staff::replace(ctx, 82, CARD, Some(card(300, product)), NEW_CARD, None))
        });
        let p = entry.product.unwrap_or_else(|| panic!("no product fields"));
        assert_eq!((p.after.id, p.after.deposit.0), (product.id, 0));
        assert_eq!((p.deposit_kept, p.deposit_paid, p.deposit_refunded), (kept, paid, 0));
        assert_eq!(entry.check(), Ok(()));
    }
}
