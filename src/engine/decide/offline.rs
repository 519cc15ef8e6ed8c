//! Offline records: spending that already happened at a gate, uploaded later in a batch.

use citycard_protocol::{Amount, CardId, CardResult, EntryKind, OfflineRecord, Status};

use super::{hotlist_change, AtcLookup, Context, Decided};
use crate::engine::decide::transit::Transit;
use crate::engine::entry::{Entry, Numbered};
use crate::engine::state::CardRecord;

use crate::journal::Pos;

/// A declined offline result (no balance, before its MAC).
pub fn declined(status: Status, record: &OfflineRecord) -> CardResult {
    citycard_protocol::answer::decline_record(status, record)
}

/// Decides an offline record whose certificate verified, given what the card's chain says
/// about its ATC. The same record uploaded again answers from its entry; another record with
/// that ATC, or one older than the chain walk reaches, is a replay. `numbered` is the terminal
/// seq and flags of a protocol 1.3 record (`Numbered::NONE` for a 1.1 batch); it is journaled
/// with the entry.
pub fn decide(
    ctx: &Context<'_>,
    record: &OfflineRecord,
    card: &CardRecord,
    atc: AtcLookup,
    numbered: Numbered,
) -> Decided<CardResult> {
    let replay = CardResult { balance: card.balance, ..declined(Status::Replay, record) };
    if record.atc.0 == 0 {
        // No card produces ATC 0 (it counts from 1), online or offline.
        return Decided::Decline(replay);
    }
    match atc {
        AtcLookup::Used(seq, e)
            if e.kind == EntryKind::Offline && e.binding == record.certificate =>
        {
            return Decided::Again(seq, e)
        }
        AtcLookup::Used(..) | AtcLookup::Unknown => return Decided::Decline(replay),
        AtcLookup::Unused => {}
    }
    let status = if card.retired() {
        Status::CardClosed
    } else if record.amount.0 <= 0
        || record.amount.0 > ctx.policy.limits.max_amount
        || card.balance.0.checked_sub(record.amount.0).is_none()
    {
        Status::InvalidAmount
    } else {
        // Offline spending already happened at the gate: it applies even when it overdraws or
        // the card was blocked after the reader last synced.
        Status::Approved
    };
    let mut after = *card;
    if status == Status::Approved {
        after.balance = Amount(card.balance.0 - record.amount.0);
    }
    let (hotlist_version, hotlist_change) =
        hotlist_change(ctx.hotlist_version, card.hotlisted(), &after);
    Decided::Record(Entry {
        kind: EntryKind::Offline,
        status,
        card_id: record.card_id,
        atc: record.atc,
        amount: Amount(after.balance.0 - card.balance.0),
        balance_after: after.balance,
        // The time of use at the gate, not of the upload.
        time_ms: record.time_ms,
        reference: record.nonce,
        binding: record.certificate,
        other_card: CardId(0),
        key_version: card.key_version,
        hotlist_version,
        hotlist_change,
        extra: record.amount.0,
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        product: None,
        numbered: Numbered { note: false, ..numbered },
    })
}

/// The refusal note of a numbered record refused before it reached the card (PROTOCOL.md
/// 6.13): `status` is the refusal, `balance` the balance its answer showed. Not on the card's
/// chain and no effect on it, so a forged or replayed record cannot move the card's ATC.
pub fn note(
    ctx: &Context<'_>,
    record: &OfflineRecord,
    numbered: Numbered,
    status: Status,
    balance: Amount,
) -> Entry {
    Entry {
        kind: EntryKind::Offline,
        status,
        card_id: record.card_id,
        atc: record.atc,
        amount: Amount(0),
        balance_after: balance,
        time_ms: record.time_ms,
        reference: record.nonce,
        binding: record.certificate,
        other_card: CardId(0),
        key_version: citycard_protocol::KeyVersion(0),
        hotlist_version: 0,
        hotlist_change: crate::engine::entry::HotlistChange::None,
        extra: record.amount.0,
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        product: None,
        numbered: Numbered { note: true, ..numbered },
    }
}

/// Whether a journaled numbered entry holds the same record as `record` with `uncertain`: a
/// re-upload (answered from the entry) rather than a conflicting use of its seq.
pub fn same_record(entry: &Entry, record: &OfflineRecord, uncertain: bool) -> bool {
    entry.card_id == record.card_id
        && entry.atc == record.atc
        && entry.extra == record.amount.0
        && entry.time_ms == record.time_ms
        && entry.reference == record.nonce
        && entry.binding == record.certificate
        && entry.numbered.uncertain == uncertain
}

#[cfg(test)]
#[path = "offline_tests.rs"]
mod tests;
