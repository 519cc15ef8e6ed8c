//! Table tests of the transit decisions: one row per rule of PROTOCOL.md 6.7 to 6.9.
#![allow(clippy::unwrap_used)]

use citycard_protocol::{Amount, Atc, BlockReason, CardState, EntryKind, KeyVersion, Status};

use super::*;
use crate::journal::Pos;

const NOW: u64 = 1_767_225_600_000;

fn limits() -> TransitLimits {
    TransitLimits {
        max_fare: 400,
        hold_timeout_ms: 1_000,
        missing_tapout_fare: 300,
        reversal_window_ms: 60_000,
    }
}

fn card(state: CardState, balance: i64, hold: Hold) -> CardRecord {
    CardRecord {
        state,
        block_reason: BlockReason::Lost,
        balance: Amount(balance),
        last_atc: Atc(10),
        key_version: KeyVersion(1),
        last_pos: Pos::NONE,
        hold,
        product: crate::engine::product::CardProduct::DEFAULT,
    }
}

fn hold(atc: u32, amount: i64, expires_ms: u64) -> Hold {
    Hold { atc: Atc(atc), amount: Amount(amount), expires_ms }
}

#[test]
fn tap_in_table() {
    let open = hold(9, 400, NOW + 5);
    let rows: [(&str, CardRecord, bool, Status); 9] = [
        ("active, enough", card(CardState::Active, 1000, Hold::NONE), false, Status::Approved),
        ("exactly the max fare", card(CardState::Active, 400, Hold::NONE), false, Status::Approved),
        ("one below", card(CardState::Active, 399, Hold::NONE), false, Status::InsufficientFunds),
        ("hold open", card(CardState::Active, 5000, open), false, Status::HoldExists),
        ("blocked", card(CardState::Blocked, 5000, Hold::NONE), false, Status::CardBlocked),
        ("overdrawn", card(CardState::Active, -1, Hold::NONE), false, Status::CardBlocked),
        ("closed", card(CardState::Closed, 5000, Hold::NONE), false, Status::CardClosed),
        ("replaced", card(CardState::Replaced, 0, Hold::NONE), true, Status::CardClosed),
        ("key retired", card(CardState::Active, 5000, Hold::NONE), true, Status::KeyVersionRetired),
    ];
    for (name, c, key_retired, expected) in rows {
        let d = tap_in(&c, key_retired, &limits(), None, Atc(11), NOW);
        assert_eq!(d.status, expected, "{name}");
        assert_eq!(d.delta, 0, "{name}: a tap-in never moves money");
        if expected == Status::Approved {
            assert_eq!(d.transit.hold, hold(11, 400, NOW + 1_000), "{name}");
            assert_eq!(d.amount, 400, "{name}");
        } else {
            assert_eq!(d.transit.hold, c.hold, "{name}: a decline leaves the hold");
            assert_eq!(d.amount, 0, "{name}");
        }
    }
    let d = tap_in(&card(CardState::Active, 5000, open), false, &limits(), None, Atc(11), NOW);
    assert_eq!(d.transit.ref_atc, Atc(9), "HoldExists names the open hold's tap-in");
}

#[test]
fn tap_out_table() {
    let open = hold(9, 400, NOW + 5);
    let rows: [(&str, CardRecord, i64, Status, i64); 8] = [
        ("fare below the hold", card(CardState::Active, 1000, open), 320, Status::Approved, -320),
        ("fare = hold", card(CardState::Active, 1000, open), 400, Status::Approved, -400),
        ("free exit", card(CardState::Active, 1000, open), 0, Status::Approved, 0),
        ("fare above the hold", card(CardState::Active, 1000, open), 401, Status::InvalidAmount, 0),
        ("negative fare", card(CardState::Active, 1000, open), -1, Status::InvalidAmount, 0),
        ("no hold", card(CardState::Active, 1000, Hold::NONE), 100, Status::NoOpenHold, 0),
        ("blocked while riding", card(CardState::Blocked, 1000, open), 100, Status::Approved, -100),
        ("closed", card(CardState::Closed, 0, Hold::NONE), 100, Status::CardClosed, 0),
    ];
    for (name, c, fare, expected, delta) in rows {
        let d = tap_out(&c, false, Amount(fare));
        assert_eq!((d.status, d.delta), (expected, delta), "{name}");
        if expected == Status::Approved {
            assert_eq!(d.transit, Transit { hold: Hold::NONE, ref_atc: Atc(9) }, "{name}");
            assert_eq!(d.amount, fare, "{name}");
        } else {
            assert_eq!(d.transit.hold, c.hold, "{name}");
        }
    }
    let d = tap_out(&card(CardState::Active, 1000, open), true, Amount(10));
    assert_eq!(d.status, Status::KeyVersionRetired);
}

#[test]
fn expiry_happens_on_the_clock_or_when_forced() {
    let c = card(CardState::Active, 1000, hold(9, 400, NOW));
    assert_eq!(expire(&c, &limits(), NOW - 1, false), None, "not yet");
    let d = expire(&c, &limits(), NOW, false).unwrap();
    assert_eq!(d.status, Status::Approved);
    assert_eq!(d.delta, -300, "the missing tap-out fare");
    assert_eq!(d.transit, Transit { hold: Hold::NONE, ref_atc: Atc(9) });
    assert_eq!(expire(&c, &limits(), NOW - 1, true).map(|d| d.delta), Some(-300), "forced");
    let none = card(CardState::Active, 1000, Hold::NONE);
    assert_eq!(expire(&none, &limits(), NOW + 10_000, true), None);
    // The missing tap-out fare is never more than the hold.
    let small = card(CardState::Active, 1000, hold(9, 100, NOW));
    assert_eq!(expire(&small, &limits(), NOW, false).map(|d| d.delta), Some(-100));
}

#[test]
fn spendable_subtracts_the_open_hold() {
    assert_eq!(spendable(&card(CardState::Active, 1000, hold(9, 400, NOW))), 600);
    assert_eq!(spendable(&card(CardState::Active, 1000, Hold::NONE)), 1000);
}

#[test]
fn reversal_table() {
    let p = |charged, time_ms, reversed| Some(PurchaseFacts { charged, time_ms, reversed });
    let active = card(CardState::Active, 1000, Hold::NONE);
    let rows: [(&str, CardRecord, i64, Option<PurchaseFacts>, Status); 8] = [
        ("in the window", active, 250, p(250, NOW - 60_000, false), Status::Approved),
        ("window passed", active, 250, p(250, NOW - 60_001, false), Status::ReversalWindowClosed),
        ("already reversed", active, 250, p(250, NOW, true), Status::AlreadyReversed),
        ("other amount", active, 200, p(250, NOW, false), Status::InvalidAmount),
        ("no such purchase", active, 250, None, Status::NotFound),
        (
            "blocked card",
            card(CardState::Blocked, 0, Hold::NONE),
            250,
            p(250, NOW, false),
            Status::Approved,
        ),
        (
            "closed card",
            card(CardState::Closed, 0, Hold::NONE),
            250,
            p(250, NOW, false),
            Status::CardClosed,
        ),
        (
            "already reversed beats the window",
            active,
            250,
            p(250, 0, true),
            Status::AlreadyReversed,
        ),
    ];
    for (name, c, amount, purchase, expected) in rows {
        let d = reversal(&c, false, &limits(), Atc(5), Amount(amount), purchase, NOW);
        assert_eq!(d.status, expected, "{name}");
        if expected == Status::Approved {
            assert_eq!((d.delta, d.amount, d.transit.ref_atc), (amount, amount, Atc(5)), "{name}");
        } else {
            assert_eq!((d.delta, d.amount, d.transit.ref_atc), (0, 0, Atc(0)), "{name}");
        }
    }
}

#[test]
fn inquiry_table() {
    use AtcFinding::*;
    use InquiryOutcome as O;
    let p = EntryKind::Purchase;
    let rows = [
        (Used { kind: p, same_binding: true }, O::Original),
        (Used { kind: p, same_binding: false }, O::Replay),
        (Used { kind: EntryKind::TopUp, same_binding: true }, O::Replay),
        (Used { kind: EntryKind::Inquiry, same_binding: true }, O::AlreadyBurnt),
        (Used { kind: EntryKind::Inquiry, same_binding: false }, O::Replay),
        (UnusedOpen, O::Burn),
        (UnusedClosed, O::NotFound),
        (Unknown, O::Replay),
    ];
    for (finding, expected) in rows {
        assert_eq!(inquiry(p, finding), expected, "{finding:?}");
    }
    for t in citycard_protocol::INQUIRABLE {
        assert!(kind_of(t).is_some(), "{t:?}");
    }
    assert_eq!(kind_of(citycard_protocol::MessageType::Balance), None);
}

#[test]
fn hold_bytes_round_trip() {
    let h = hold(0xdead_beef, -5, u64::MAX);
    assert_eq!(Hold::from_bytes(&h.to_bytes()), Some(h));
    assert_eq!(Hold::from_bytes(&[0; 19]), None);
}
