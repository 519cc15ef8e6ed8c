//! Purchase and top-up: the stored-value decisions, held to the server's limits and to the
//! card's product (protocol 1.3: maximum balance, per-transaction and daily limits).

use citycard_protocol::{Amount, CardAuth, CardId, CardResult, CardState, EntryKind, Status};

use super::{hotlist_change, AtcUse, Context, Decided};
use crate::engine::answer::unauthenticated;
use crate::engine::decide::transit::Transit;
use crate::engine::entry::Entry;
use crate::engine::product::{Daily, Product, ProductFields};
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
    let product = ctx.policy.limits.card_product(card.product.id);
    let mut fields = None;
    if status == Status::Approved && kind == EntryKind::Purchase && product.has_daily_limit() {
        // Only a product with a daily limit keeps the day's counters (PROTOCOL.md 6.12).
        let mut daily = card.product.daily.today(ctx.now_ms);
        daily.amount = daily.amount.saturating_add(amount.0);
        daily.count = daily.count.saturating_add(1);
        after.product.daily = daily;
        fields = Some(ProductFields::state(after.product));
    }
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
        product: fields,
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
    let product = limits.card_product(card.product.id);
    match kind {
        EntryKind::Purchase => {
            if card.hotlisted().is_some() {
                Status::CardBlocked
            } else if amount.0 > product.max_amount {
                Status::TransactionLimit
            } else if let Some(limit) =
                daily_limit(&product, card.product.daily, ctx.now_ms, amount.0)
            {
                limit
            } else if super::transit::spendable(card) < amount.0 {
                // An open tap-in hold is not spendable (protocol 1.2).
                Status::InsufficientFunds
            } else {
                Status::Approved
            }
        }
        _ => {
            let after = card.balance.0.checked_add(amount.0);
            if card.state == CardState::Blocked {
                Status::CardBlocked
            } else if amount.0 > product.max_amount {
                Status::TransactionLimit
            } else if after.is_none_or(|b| b > limits.max_balance) {
                Status::OverBalanceCap
            } else if after.is_none_or(|b| b > product.max_balance) {
                Status::BalanceLimit
            } else {
                Status::Approved
            }
        }
    }
}

/// The daily limit an online debit of `amount` would break (protocol 1.3): one more debit than
/// the day's count limit, or more than the day's amount limit. `daily` are the card's counters;
/// those of an earlier UTC day count as zero. None when the debit fits.
pub fn daily_limit(product: &Product, daily: Daily, now_ms: u64, amount: i64) -> Option<Status> {
    let today = daily.today(now_ms);
    if product.daily_count_limit.is_some_and(|limit| today.count >= limit) {
        return Some(Status::DailyCountLimit);
    }
    if product.daily_amount_limit.is_some_and(|limit| today.amount.saturating_add(amount) > limit) {
        return Some(Status::DailyAmountLimit);
    }
    None
}
