//! Purchase and top-up: the stored-value decisions.

use citycard_protocol::{Amount, CardAuth, CardId, CardResult, CardState, EntryKind, Status};

use super::{hotlist_change, AtcUse, Context, Decided};
use crate::engine::answer::unauthenticated;
use crate::engine::decide::transit::Transit;
use crate::engine::entry::Entry;
use crate::engine::state::CardRecord;
use crate::journal::Pos;

/// Decides an authenticated purchase (`kind == Purchase`) or top-up of `amount` on `card`,
/// given what its chain says about the ATC. A retry of the same request answers from the
/// original entry; any other use of the ATC is a replay, declined with the balance.
pub fn decide(
    ctx: &Context<'_>,
    kind: EntryKind,
    auth: &CardAuth,
    amount: Amount,
    card: &CardRecord,
    atc: AtcUse,
) -> Decided<CardResult> {
    match atc {
        AtcUse::Fresh => {}
        AtcUse::Used(seq, e) if e.kind == kind && e.binding == auth.cryptogram => {
            return Decided::Again(seq, e)
        }
        AtcUse::Used(..) | AtcUse::Stale => {
            return Decided::Decline(CardResult {
                balance: card.balance,
                ..unauthenticated(Status::Replay, auth)
            });
        }
    }
    let status = status(ctx, card, kind, amount);
    let mut after = *card;
    if status == Status::Approved {
        after.balance = Amount(if kind == EntryKind::Purchase {
            card.balance.0 - amount.0
        } else {
            card.balance.0 + amount.0
        });
    }
    let (hotlist_version, hotlist_change) =
        hotlist_change(ctx.hotlist_version, card.hotlisted(), &after);
    Decided::Record(Entry {
        kind,
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        amount: Amount(after.balance.0 - card.balance.0),
        balance_after: after.balance,
        time_ms: ctx.now_ms,
        reference: auth.nonce,
        binding: auth.cryptogram,
        other_card: CardId(0),
        key_version: card.key_version,
        hotlist_version,
        hotlist_change,
        extra: amount.0,
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        numbered: crate::engine::entry::Numbered::NONE,
    })
}

/// The status of a fresh purchase or top-up.
fn status(ctx: &Context<'_>, card: &CardRecord, kind: EntryKind, amount: Amount) -> Status {
    let limits = ctx.policy.limits;
    if card.retired() {
        return Status::CardClosed;
    }
    if ctx.policy.key_retired(card, ctx.now_ms) {
        return Status::KeyVersionRetired;
    }
    if amount.0 <= 0 || amount.0 > limits.max_amount {
        return Status::InvalidAmount;
    }
    match kind {
        EntryKind::Purchase => {
            if card.hotlisted().is_some() {
                Status::CardBlocked
            } else if super::transit::spendable(card) < amount.0 {
                // An open tap-in hold is not spendable (protocol 1.2).
                Status::InsufficientFunds
            } else {
                Status::Approved
            }
        }
        _ => {
            if card.state == CardState::Blocked {
                Status::CardBlocked
            } else if card.balance.0.checked_add(amount.0).is_none_or(|b| b > limits.max_balance) {
                Status::OverBalanceCap
            } else {
                Status::Approved
            }
        }
    }
}
