//! Offline records: spending that already happened at a gate, uploaded later in a batch.

use citycard_protocol::{Amount, CardId, CardResult, EntryKind, OfflineRecord, Status};

use super::{hotlist_change, AtcLookup, Context, Decided};
use crate::engine::decide::transit::Transit;
use crate::engine::entry::Entry;
use crate::engine::state::CardRecord;

use crate::journal::Pos;

/// A declined offline result (no balance, before its MAC).
pub fn declined(status: Status, record: &OfflineRecord) -> CardResult {
    citycard_protocol::answer::decline_record(status, record)
}

/// Decides an offline record whose certificate verified, given what the card's chain says
/// about its ATC. The same record uploaded again answers from its entry; another record with
/// that ATC, or one older than the chain walk reaches, is a replay.
pub fn decide(
    ctx: &Context<'_>,
    record: &OfflineRecord,
    card: &CardRecord,
    atc: AtcLookup,
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
    })
}
