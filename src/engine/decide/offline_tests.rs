//! Tests of the protocol 1.3 parts of the offline decisions (PROTOCOL.md 6.13): the seq and
//! flags a numbered record journals, refusal notes, and what counts as the same record.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use citycard_protocol::{Atc, KeyVersion, Mac};

use super::*;
use crate::engine::decide::Policy;
use crate::engine::types::Limits;

const CARD: CardId = CardId(6_000_000_000_000_007);
const NOW: u64 = 1_767_225_600_000;

fn decide_with<T>(f: impl FnOnce(&Context<'_>) -> T) -> T {
    let limits = Limits::default();
    let retire = BTreeMap::new();
    let policy =
        Policy { limits: &limits, retire_after_ms: &retire, current_version: KeyVersion(1) };
    f(&Context { terminal: "reader-1", now_ms: NOW, policy, hotlist_version: 0 })
}

fn card(balance: i64) -> CardRecord {
    CardRecord::test_active(balance, 3, Pos { segment: 1, offset: 64 })
}

fn record(atc: u32, amount: i64) -> OfflineRecord {
    OfflineRecord {
        card_id: CARD,
        atc: Atc(atc),
        amount: Amount(amount),
        time_ms: NOW - 60_000,
        nonce: 11,
        certificate: Mac([atc as u8; 16]),
    }
}

const SEQ_9: Numbered = Numbered { seq: 9, uncertain: true, note: false };

#[test]
fn a_numbered_record_journals_its_seq_and_flag_in_version_5() {
    let r = record(4, 30);
    let entry = match decide_with(|ctx| decide(ctx, &r, &card(100), AtcLookup::Unused, SEQ_9)) {
        Decided::Record(entry) => entry,
        other => panic!("{other:?}"),
    };
    assert_eq!((entry.status, entry.balance_after), (Status::Approved, Amount(70)));
    assert_eq!(entry.numbered, SEQ_9);
    assert!(entry.claims_seq() && entry.uses_atc() && !entry.is_note());
    assert_eq!(entry.check(), Ok(()));
    let mut bytes = Vec::new();
    entry.encode(&mut bytes);
    assert_eq!(bytes[0], 5, "numbered entries are version 5");
    assert_eq!(Entry::decode(&bytes).ok(), Some(entry.clone()));
    // A 1.1 record of the same kind keeps its version 2 bytes.
    let plain = Entry { numbered: Numbered::NONE, ..entry };
    plain.encode(&mut bytes);
    assert_eq!(bytes[0], 2);
    // A version 5 record with seq 0 or unknown flag bits is refused when read back.
    let mut numbered_bytes = Vec::new();
    Entry { numbered: SEQ_9, ..plain.clone() }.encode(&mut numbered_bytes);
    let flags_at = numbered_bytes.len() - 1 - "reader-1".len() - 1;
    let mut bad_flags = numbered_bytes.clone();
    bad_flags[flags_at] = 0x02;
    assert!(Entry::decode(&bad_flags).is_err());
    let mut zero_seq = numbered_bytes.clone();
    zero_seq[flags_at - 8..flags_at].fill(0);
    assert!(Entry::decode(&zero_seq).is_err());
}

#[test]
fn a_refusal_note_is_off_the_chain_and_consumes_nothing() {
    let r = record(2, 30);
    let note = decide_with(|ctx| note(ctx, &r, SEQ_9, Status::BadCryptogram, Amount(0)));
    assert!(note.is_note() && note.claims_seq());
    assert!(!note.uses_atc(), "a forged record must not move the card's ATC");
    assert_eq!((note.amount, note.prev_pos), (Amount(0), Pos::NONE));
    assert_eq!(note.check(), Ok(()));
    let mut bytes = Vec::new();
    note.encode(&mut bytes);
    assert_eq!(Entry::decode(&bytes).ok(), Some(note.clone()));
    // A conflict note records the refusal but does not hold the seq.
    let conflict = decide_with(|ctx| note_of(ctx, &r, Status::SeqConflict));
    assert!(conflict.is_note() && !conflict.claims_seq());
    // A note never approves and never sits on a chain.
    for broken in [
        Entry { status: Status::Approved, ..note.clone() },
        Entry { prev_pos: Pos { segment: 1, offset: 0 }, ..note.clone() },
        Entry { kind: EntryKind::Purchase, ..note.clone() },
    ] {
        assert!(broken.check().is_err(), "{broken:?}");
    }
}

fn note_of(ctx: &Context<'_>, r: &OfflineRecord, status: Status) -> Entry {
    note(ctx, r, SEQ_9, status, Amount(0))
}

#[test]
fn the_same_record_means_every_field_and_the_flag() {
    let r = record(4, 30);
    let entry = match decide_with(|ctx| decide(ctx, &r, &card(100), AtcLookup::Unused, SEQ_9)) {
        Decided::Record(entry) => entry,
        other => panic!("{other:?}"),
    };
    assert!(same_record(&entry, &r, true));
    assert!(!same_record(&entry, &r, false), "other flags: another record");
    for other in [
        OfflineRecord { amount: Amount(31), ..r },
        OfflineRecord { atc: Atc(5), ..r },
        OfflineRecord { time_ms: r.time_ms + 1, ..r },
        OfflineRecord { nonce: 12, ..r },
        OfflineRecord { certificate: Mac([0; 16]), ..r },
        OfflineRecord { card_id: CardId(CARD.0 + 1), ..r },
    ] {
        assert!(!same_record(&entry, &other, true), "{other:?}");
    }
}
