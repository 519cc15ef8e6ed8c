//! Table tests of the decisions: each row is a card, a prior, a request and the outcome it
//! must get (status, balance after, hotlist change, what is journaled).

use std::collections::BTreeMap;

use citycard_protocol::crypto::{assertion_bytes, CardKey};
use citycard_protocol::{
    Amount, Atc, BlockReason, CardAuth, CardId, CardState, EntryKind, HistoryEntry, KeyVersion,
    Mac, MessageType, OfflineRecord, Status, ATC_LATE_WINDOW, MAX_HISTORY_PAGE,
};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use super::*;
use crate::engine::entry::{Entry, HotlistChange, Numbered};
use crate::engine::state::CardRecord;
use crate::engine::types::Limits;
use crate::journal::Pos;

const NOW_MS: u64 = 1_800_000_000_000;
const CARD: CardId = CardId(6_000_000_000_000_000);
const NEW_CARD: CardId = CardId(6_000_000_000_000_002);
const HOTLIST_VERSION: u64 = 9;

fn limits() -> Limits {
    // max_balance 100_000, max_amount 50_000, identity_ttl_ms 300_000.
    Limits::default()
}

fn with_ctx<T>(retire: &[(u16, u64)], f: impl FnOnce(&Context<'_>) -> T) -> T {
    let limits = limits();
    let retire_after_ms: BTreeMap<u16, u64> = retire.iter().copied().collect();
    let ctx = Context {
        terminal: "reader-1",
        now_ms: NOW_MS,
        policy: Policy {
            limits: &limits,
            retire_after_ms: &retire_after_ms,
            current_version: KeyVersion(2),
        },
        hotlist_version: HOTLIST_VERSION,
    };
    f(&ctx)
}

fn card(state: CardState, balance: i64) -> CardRecord {
    CardRecord {
        state,
        block_reason: if state == CardState::Blocked {
            BlockReason::Lost
        } else {
            BlockReason::Other
        },
        balance: Amount(balance),
        last_atc: Atc(10),
        key_version: KeyVersion(1),
        last_pos: Pos::NONE,
        hold: crate::engine::decide::transit::Hold::NONE,
        product: crate::engine::product::CardProduct::DEFAULT,
    }
}

fn auth(atc: u32) -> CardAuth {
    CardAuth { card_id: CARD, atc: Atc(atc), nonce: 77, cryptogram: Mac([atc as u8; 16]) }
}

fn recorded<D: std::fmt::Debug>(decided: Decided<D>) -> Entry {
    match decided {
        Decided::Record(entry) => entry,
        other => panic!("expected a journal entry, got {other:?}"),
    }
}

use CardState::{Active, Blocked, Closed, Replaced};
use EntryKind::{Purchase, TopUp};

#[test]
fn money_table() {
    use HotlistChange::{None as Same, Unlisted};
    // (card state, balance, kind, amount, key retired, status, balance after, hotlist change)
    let rows = [
        (Active, 100, Purchase, 30, false, Status::Approved, 70, Same),
        (Active, 100, Purchase, 100, false, Status::Approved, 0, Same),
        (Active, 100, Purchase, 101, false, Status::InsufficientFunds, 100, Same),
        (Active, 100, Purchase, 0, false, Status::InvalidAmount, 100, Same),
        (Active, 100, Purchase, -5, false, Status::InvalidAmount, 100, Same),
        (Active, 60_000, Purchase, 50_001, false, Status::InvalidAmount, 60_000, Same),
        (Blocked, 100, Purchase, 10, false, Status::CardBlocked, 100, Same),
        (Active, -20, Purchase, 10, false, Status::CardBlocked, -20, Same),
        (Closed, 100, Purchase, 10, false, Status::CardClosed, 100, Same),
        (Replaced, 100, TopUp, 10, false, Status::CardClosed, 100, Same),
        (Active, 100, Purchase, 10, true, Status::KeyVersionRetired, 100, Same),
        (Active, 100, TopUp, 500, false, Status::Approved, 600, Same),
        (Active, 99_000, TopUp, 1_000, false, Status::Approved, 100_000, Same),
        (Active, 99_000, TopUp, 1_001, false, Status::OverBalanceCap, 99_000, Same),
        (Blocked, 100, TopUp, 10, false, Status::CardBlocked, 100, Same),
        (Active, -20, TopUp, 30, false, Status::Approved, 10, Unlisted(BlockReason::Overdrawn)),
        (Active, -20, TopUp, 10, false, Status::Approved, -10, Same),
        (Active, -20, TopUp, 20, false, Status::Approved, 0, Unlisted(BlockReason::Overdrawn)),
    ];
    for (i, (state, balance, kind, amount, retired, status, after, change)) in
        rows.into_iter().enumerate()
    {
        let retire: &[(u16, u64)] = if retired { &[(1, NOW_MS)] } else { &[(1, NOW_MS + 1)] };
        let entry = with_ctx(retire, |ctx| {
            recorded(money::decide(
                ctx,
                kind,
                &auth(11),
                Amount(amount),
                &card(state, balance),
                AtcUse::Fresh,
            ))
        });
        let row = format!("row {i}: {state:?} {balance} {kind:?} {amount}");
        assert_eq!(entry.status, status, "{row}");
        assert_eq!(entry.balance_after, Amount(after), "{row}");
        assert_eq!(entry.amount, Amount(after - balance), "{row}");
        assert_eq!(entry.hotlist_change, change, "{row}");
        let version = if change == HotlistChange::None { 0 } else { HOTLIST_VERSION + 1 };
        assert_eq!(entry.hotlist_version, version, "{row}");
        assert_eq!((entry.kind, entry.atc, entry.extra), (kind, Atc(11), amount), "{row}");
        assert_eq!(
            (entry.time_ms, entry.reference, entry.binding),
            (NOW_MS, 77, auth(11).cryptogram)
        );
    }
}

#[test]
fn money_retry_and_replay() {
    let active = card(Active, 100);
    let original = with_ctx(&[], |ctx| {
        recorded(money::decide(ctx, Purchase, &auth(5), Amount(30), &active, AtcUse::Fresh))
    });
    // The same request again: the original entry, not a second debit.
    let again = with_ctx(&[], |ctx| {
        money::decide(
            ctx,
            Purchase,
            &auth(5),
            Amount(30),
            &active,
            AtcUse::Used(42, original.clone()),
        )
    });
    assert_eq!(again, Decided::Again(42, original.clone()));
    // The same ATC with another cryptogram, or used by a top-up: a replay, with the balance.
    let mut other = auth(5);
    other.cryptogram = Mac([0xEE; 16]);
    for (request, kind) in [(other, Purchase), (auth(5), TopUp)] {
        let decided = with_ctx(&[], |ctx| {
            money::decide(
                ctx,
                kind,
                &request,
                Amount(30),
                &active,
                AtcUse::Used(42, original.clone()),
            )
        });
        match decided {
            Decided::Decline(r) => {
                assert_eq!((r.status, r.balance, r.journal_seq), (Status::Replay, Amount(100), 0))
            }
            other => panic!("expected a replay decline, got {other:?}"),
        }
    }
    let stale = with_ctx(&[], |ctx| {
        money::decide(ctx, Purchase, &auth(5), Amount(30), &active, AtcUse::Stale)
    });
    assert!(matches!(stale, Decided::Decline(r) if r.status == Status::Replay));
}

#[test]
fn atc_use_table() {
    let used = Entry { atc: Atc(7), ..money_entry() };
    let mut late = card(Active, 0);
    late.last_atc = Atc(5 + ATC_LATE_WINDOW);
    // (card's last ATC, request ATC, what the walk found, outcome)
    let rows = [
        (card(Active, 0), 11, None, AtcUse::Fresh),
        (card(Active, 0), 10, Some(AtcLookup::Unused), AtcUse::Fresh),
        (card(Active, 0), 1, Some(AtcLookup::Unused), AtcUse::Fresh),
        (card(Active, 0), 0, Some(AtcLookup::Unused), AtcUse::Stale),
        (card(Active, 0), 7, Some(AtcLookup::Unknown), AtcUse::Stale),
        (card(Active, 0), 7, Some(AtcLookup::Used(3, used.clone())), AtcUse::Used(3, used)),
        (late, 6, Some(AtcLookup::Unused), AtcUse::Fresh),
        (late, 5, Some(AtcLookup::Unused), AtcUse::Stale),
    ];
    for (i, (record, atc, lookup, expected)) in rows.into_iter().enumerate() {
        assert_eq!(atc_use(&record, Atc(atc), lookup), expected, "row {i}");
    }
}

fn money_entry() -> Entry {
    with_ctx(&[], |ctx| {
        recorded(money::decide(
            ctx,
            Purchase,
            &auth(11),
            Amount(1),
            &card(Active, 5),
            AtcUse::Fresh,
        ))
    })
}

#[test]
fn hotlist_change_table() {
    use BlockReason::{Lost, Overdrawn, Retired};
    let rows = [
        (None, card(Active, 5), HotlistChange::None),
        (None, card(Blocked, 5), HotlistChange::Listed(Lost)),
        (Some(Lost), card(Blocked, 5), HotlistChange::None),
        (Some(Lost), card(Active, 5), HotlistChange::Unlisted(Lost)),
        (Some(Lost), card(Closed, 5), HotlistChange::Listed(Retired)),
        (None, card(Active, -1), HotlistChange::Listed(Overdrawn)),
    ];
    for (i, (before, after, change)) in rows.into_iter().enumerate() {
        let version = if change == HotlistChange::None { 0 } else { 4 };
        assert_eq!(hotlist_change(3, before, &after), (version, change), "row {i}");
    }
}

#[test]
fn identity_table() {
    let rows = [
        (card(Active, 5), &[][..], Status::Approved),
        (card(Active, -5), &[][..], Status::CardBlocked),
        (card(Blocked, 5), &[][..], Status::CardBlocked),
        (card(Closed, 5), &[][..], Status::CardClosed),
        (card(Active, 5), &[(1u16, NOW_MS)][..], Status::KeyVersionRetired),
    ];
    for (i, (record, retire, status)) in rows.into_iter().enumerate() {
        let entry = with_ctx(retire, |ctx| {
            recorded(identity::decide(ctx, &auth(11), &record, AtcUse::Fresh))
        });
        assert_eq!(entry.status, status, "row {i}");
        assert_eq!((entry.amount, entry.balance_after), (Amount(0), record.balance), "row {i}");
        assert_eq!(entry.extra, (NOW_MS + limits().identity_ttl_ms) as i64, "row {i}");
    }
    let stale =
        with_ctx(&[], |ctx| identity::decide(ctx, &auth(3), &card(Active, 5), AtcUse::Stale));
    assert_eq!(stale, Decided::Decline(Status::Replay));
}

#[test]
fn identity_answer_signs_approvals_only() {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("key generation");
    let signer = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
    let public = UnparsedPublicKey::new(&ED25519, signer.public_key().as_ref().to_vec());
    let approved = with_ctx(&[], |ctx| {
        recorded(identity::decide(ctx, &auth(11), &card(Active, 5), AtcUse::Fresh))
    });
    let answer = identity::answer(&auth(11), &approved, 31, &signer);
    assert_eq!(
        (answer.status, answer.journal_seq, answer.issued_ms),
        (Status::Approved, 31, NOW_MS)
    );
    assert_eq!(answer.expires_ms, NOW_MS + limits().identity_ttl_ms);
    let message =
        assertion_bytes(CARD, Atc(11), 31, answer.issued_ms, answer.expires_ms, "reader-1");
    assert!(public.verify(&message, &answer.signature).is_ok());
    let blocked = Entry { status: Status::CardBlocked, ..approved };
    let answer = identity::answer(&auth(11), &blocked, 32, &signer);
    assert_eq!(
        (answer.status, answer.signature, answer.expires_ms),
        (Status::CardBlocked, [0u8; 64], 0)
    );
}

fn offline_record(atc: u32, amount: i64) -> OfflineRecord {
    OfflineRecord {
        card_id: CARD,
        atc: Atc(atc),
        amount: Amount(amount),
        time_ms: NOW_MS - 3_600_000,
        nonce: 5,
        certificate: Mac([atc as u8 ^ 0x5A; 16]),
    }
}

#[test]
fn offline_table() {
    use HotlistChange::{Listed, None as Same};
    // (card state, balance, amount, status, balance after, hotlist change)
    let rows = [
        (Active, 100, 30, Status::Approved, 70, Same),
        // Spending already happened at the gate: it applies even when it overdraws...
        (Active, 10, 30, Status::Approved, -20, Listed(BlockReason::Overdrawn)),
        // ...or the card was blocked after the reader last synced.
        (Blocked, 100, 30, Status::Approved, 70, Same),
        (Closed, 100, 30, Status::CardClosed, 100, Same),
        (Active, 100, 0, Status::InvalidAmount, 100, Same),
        (Active, 100, 50_001, Status::InvalidAmount, 100, Same),
        (Active, i64::MIN + 1, 30, Status::InvalidAmount, i64::MIN + 1, Same),
    ];
    for (i, (state, balance, amount, status, after, change)) in rows.into_iter().enumerate() {
        let record = offline_record(12, amount);
        let entry = with_ctx(&[], |ctx| {
            recorded(offline::decide(
                ctx,
                &record,
                &card(state, balance),
                AtcLookup::Unused,
                Numbered::NONE,
            ))
        });
        assert_eq!((entry.status, entry.balance_after), (status, Amount(after)), "row {i}");
        assert_eq!(entry.hotlist_change, change, "row {i}");
        // The time of use, not of the upload.
        assert_eq!((entry.kind, entry.time_ms), (EntryKind::Offline, record.time_ms), "row {i}");
    }
}

#[test]
fn offline_retry_and_replay() {
    let active = card(Active, 100);
    let record = offline_record(4, 30);
    let original = with_ctx(&[], |ctx| {
        recorded(offline::decide(ctx, &record, &active, AtcLookup::Unused, Numbered::NONE))
    });
    let again = with_ctx(&[], |ctx| {
        offline::decide(ctx, &record, &active, AtcLookup::Used(8, original.clone()), Numbered::NONE)
    });
    assert_eq!(again, Decided::Again(8, original.clone()));
    let other = OfflineRecord { certificate: Mac([1; 16]), ..record };
    let zero = offline_record(0, 30);
    for (record, lookup) in [
        (other, AtcLookup::Used(8, original)),
        (record, AtcLookup::Unknown),
        (zero, AtcLookup::Unused),
    ] {
        match with_ctx(&[], |ctx| offline::decide(ctx, &record, &active, lookup, Numbered::NONE)) {
            Decided::Decline(r) => assert_eq!((r.status, r.balance), (Status::Replay, Amount(100))),
            other => panic!("expected a replay, got {other:?}"),
        }
    }
}

#[test]
fn issue_table() {
    // (deposit, status, card id, balance)
    let rows = [
        (0, Status::Approved, NEW_CARD, 0),
        (2_500, Status::Approved, NEW_CARD, 2_500),
        (100_000, Status::Approved, NEW_CARD, 100_000),
        (100_001, Status::InvalidAmount, CardId(0), 0),
        (-1, Status::InvalidAmount, CardId(0), 0),
    ];
    for (i, (deposit, status, card_id, balance)) in rows.into_iter().enumerate() {
        let entry = with_ctx(&[], |ctx| {
            recorded(staff::issue(ctx, 70, Amount(deposit), 0, NEW_CARD, None))
        });
        assert_eq!(
            (entry.status, entry.card_id, entry.balance_after),
            (status, card_id, Amount(balance)),
            "row {i}"
        );
        assert_eq!(
            (entry.key_version, entry.reference, entry.extra),
            (KeyVersion(2), 70, deposit),
            "row {i}"
        );
    }
    let original =
        with_ctx(&[], |ctx| recorded(staff::issue(ctx, 70, Amount(100), 0, NEW_CARD, None)));
    let again = with_ctx(&[], |ctx| {
        staff::issue(ctx, 70, Amount(100), 0, CardId(1), Some((12, original.clone())))
    });
    assert_eq!(again, Decided::Again(12, original.clone()));
    match with_ctx(&[], |ctx| staff::issue(ctx, 70, Amount(101), 0, NEW_CARD, Some((12, original))))
    {
        Decided::Decline(r) => {
            assert_eq!(
                (r.status, r.card_id, r.journal_seq),
                (Status::ReferenceReused, CardId(0), 0)
            );
            assert_eq!(r.key_version, KeyVersion(2));
        }
        other => panic!("expected ReferenceReused, got {other:?}"),
    }
}

#[test]
fn replace_table() {
    use BlockReason::Retired;
    // (card state, balance, status, old balance after, moved to the new card, hotlist change)
    let rows = [
        (Active, 50, Status::Approved, 0, 50, HotlistChange::Listed(Retired)),
        (Active, 0, Status::Approved, 0, 0, HotlistChange::Listed(Retired)),
        (Active, -20, Status::InvalidState, -20, 0, HotlistChange::None),
        // A blocked debtor is replaced with its debt left on the old card.
        (Blocked, -20, Status::Approved, -20, 0, HotlistChange::Listed(Retired)),
        (Closed, 50, Status::CardClosed, 50, 0, HotlistChange::None),
        (Replaced, 50, Status::CardClosed, 50, 0, HotlistChange::None),
    ];
    for (i, (state, balance, status, after, moved, change)) in rows.into_iter().enumerate() {
        let entry = with_ctx(&[], |ctx| {
            recorded(staff::replace(ctx, 71, CARD, Some(card(state, balance)), NEW_CARD, None))
        });
        assert_eq!((entry.status, entry.balance_after), (status, Amount(after)), "row {i}");
        assert_eq!(entry.amount.0.saturating_neg(), moved, "row {i}");
        assert_eq!(entry.hotlist_change, change, "row {i}");
        let new = if status == Status::Approved { NEW_CARD } else { CardId(0) };
        assert_eq!((entry.card_id, entry.other_card), (CARD, new), "row {i}");
    }
    match with_ctx(&[], |ctx| staff::replace(ctx, 71, CARD, None, NEW_CARD, None)) {
        Decided::Decline(r) => {
            assert_eq!((r.status, r.replaced_card_id), (Status::UnknownCard, CARD))
        }
        other => panic!("expected UnknownCard, got {other:?}"),
    }
    // The op_ref was used to replace another card.
    let other =
        Entry { card_id: CardId(CARD.0 + 4), kind: EntryKind::ReplacedOut, ..money_entry() };
    match with_ctx(&[], |ctx| {
        staff::replace(ctx, 71, CARD, Some(card(Active, 5)), NEW_CARD, Some((3, other)))
    }) {
        Decided::Decline(r) => assert_eq!(r.status, Status::ReferenceReused),
        other => panic!("expected ReferenceReused, got {other:?}"),
    }
}

#[test]
fn block_unblock_close_table() {
    use BlockReason::{Lost, Retired, Stolen};
    use EntryKind::{Block, Close, Unblock};
    // (kind, card state, balance, status, balance after, refunded, hotlist change)
    let rows = [
        (Block, Active, 40, Status::Approved, 40, 0, HotlistChange::Listed(Stolen)),
        (Block, Blocked, 40, Status::InvalidState, 40, 0, HotlistChange::None),
        (Block, Closed, 40, Status::CardClosed, 40, 0, HotlistChange::None),
        (Unblock, Active, 40, Status::InvalidState, 40, 0, HotlistChange::None),
        (Unblock, Blocked, 40, Status::Approved, 40, 0, HotlistChange::Unlisted(Lost)),
        (Close, Active, 40, Status::Approved, 0, 40, HotlistChange::Listed(Retired)),
        (Close, Active, -20, Status::InvalidState, -20, 0, HotlistChange::None),
        (Close, Blocked, -20, Status::Approved, -20, 0, HotlistChange::Listed(Retired)),
        (Close, Replaced, 40, Status::CardClosed, 40, 0, HotlistChange::None),
    ];
    for (i, (kind, state, balance, status, after, refunded, change)) in rows.into_iter().enumerate()
    {
        let reason = (kind == Block).then_some(Stolen);
        let record = card(state, balance);
        let entry = with_ctx(&[], |ctx| {
            recorded(staff::card_op(ctx, kind, 72, CARD, reason, Some(record), None))
        });
        assert_eq!((entry.status, entry.balance_after), (status, Amount(after)), "row {i}");
        assert_eq!(entry.hotlist_change, change, "row {i}");
        let extra = if kind == Block { Stolen as i64 } else { refunded };
        assert_eq!(entry.extra, extra, "row {i}");
        // The answer repeats the card's state as decided.
        let answer = staff::answer(kind, &entry, 50, CARD);
        assert_eq!((answer.status, answer.journal_seq), (status, 50), "row {i}");
        let reported = match (status, kind) {
            (Status::Approved, Block) => Blocked,
            (Status::Approved, Close) => Closed,
            (Status::Approved, _) => Active,
            _ => record.reported_state(),
        };
        assert_eq!(answer.card_state, reported, "row {i}");
        let refund = if kind == Close { refunded } else { 0 };
        assert_eq!(answer.refunded, Amount(refund), "row {i}");
    }
    let unknown = with_ctx(&[], |ctx| staff::card_op(ctx, Block, 72, CARD, Some(Lost), None, None));
    assert!(matches!(unknown, Decided::Decline(r) if r.status == Status::UnknownCard));
    // Same op_ref, same card, another reason: not the same operation.
    let blocked = with_ctx(&[], |ctx| {
        recorded(staff::card_op(ctx, Block, 72, CARD, Some(Lost), Some(card(Active, 1)), None))
    });
    let again = with_ctx(&[], |ctx| {
        staff::card_op(
            ctx,
            Block,
            72,
            CARD,
            Some(Lost),
            Some(card(Blocked, 1)),
            Some((6, blocked.clone())),
        )
    });
    assert_eq!(again, Decided::Again(6, blocked.clone()));
    let reused = with_ctx(&[], |ctx| {
        staff::card_op(
            ctx,
            Block,
            72,
            CARD,
            Some(Stolen),
            Some(card(Blocked, 1)),
            Some((6, blocked)),
        )
    });
    assert!(matches!(reused, Decided::Decline(r) if r.status == Status::ReferenceReused));
}

#[test]
fn reads() {
    let active = card(Active, 25);
    assert_eq!(read::balance(&auth(1), &active).status, Status::Approved);
    assert_eq!(read::balance(&auth(1), &card(Closed, 25)).status, Status::CardClosed);
    assert_eq!(read::balance(&auth(1), &active).balance, Amount(25));
    assert_eq!((read::history_limit(0), read::history_limit(3)), (16, 3));
    assert_eq!(read::history_limit(u16::MAX), MAX_HISTORY_PAGE);
    let entry = |seq| HistoryEntry {
        journal_seq: seq,
        kind: Purchase,
        status: Status::Approved,
        amount: Amount(-1),
        balance_after: Amount(1),
        time_ms: 0,
        atc: Atc(1),
    };
    // One entry past the page: it continues below the last seq shown.
    let page = read::history_page(&auth(1), &active, vec![entry(9), entry(7), entry(4)], 2, false);
    assert_eq!((page.entries.len(), page.next_before_seq, page.balance), (2, 7, Amount(25)));
    let page = read::history_page(&auth(1), &active, vec![entry(9), entry(7)], 2, false);
    assert_eq!((page.entries.len(), page.next_before_seq), (2, 0));
    // Older entries past the retention: the page points below its last entry.
    let page = read::history_page(&auth(1), &active, vec![entry(9)], 2, true);
    assert_eq!((page.entries.len(), page.next_before_seq), (1, 9));
}

#[test]
fn auth_checks_the_cryptogram_under_the_key() {
    let key = CardKey::derive(&[3u8; 32], KeyVersion(1), CARD);
    let mut request = auth(5);
    request.cryptogram = key.request_cryptogram(
        MessageType::Purchase as u8,
        CARD,
        Atc(5),
        Amount(30),
        77,
        "reader-1",
    );
    assert_eq!(
        auth::request(&key, "reader-1", MessageType::Purchase, &request, Amount(30)),
        Ok(())
    );
    // Any other amount, terminal or type: the cryptogram does not verify.
    for (terminal, message_type, amount) in [
        ("reader-1", MessageType::Purchase, 31),
        ("reader-2", MessageType::Purchase, 30),
        ("reader-1", MessageType::TopUp, 30),
    ] {
        assert_eq!(
            auth::request(&key, terminal, message_type, &request, Amount(amount)),
            Err(Status::BadCryptogram)
        );
    }
    let mut record = offline_record(3, 30);
    record.certificate =
        key.offline_certificate(CARD, Atc(3), Amount(30), record.time_ms, record.nonce, "reader-1");
    assert_eq!(auth::offline(&key, "reader-1", &record), Ok(()));
    assert_eq!(auth::offline(&key, "reader-9", &record), Err(Status::BadCryptogram));
}
