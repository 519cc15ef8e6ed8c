//! Staff operations (counter terminals): issue, replace, block, unblock, close, and (protocol
//! 1.3) set product, with the card deposit kept apart from the balance. Each is keyed
//! by (terminal, op_ref): the same operation sent again answers from its entry; a different
//! operation under a used op_ref is declined ReferenceReused and journals nothing.

use citycard_protocol::answer::decline_product;
use citycard_protocol::{
    Amount, Atc, BlockReason, CardId, CardState, EntryKind, IssueResult, Mac, ProductResult,
    StaffResult, Status,
};

use super::{hotlist_change, Context, Decided};
use crate::engine::answer::{declined_issue, declined_staff, state_binding};
use crate::engine::decide::transit::Transit;
use crate::engine::entry::{Entry, HotlistChange};
use crate::engine::product::{CardProduct, ProductFields, ReplaceDeposit};
use crate::engine::state::CardRecord;
use crate::journal::Pos;

/// Whether the entry that used this op_ref is the same operation as the one asked now.
fn same_operation(found: &Entry, kind: EntryKind, card: CardId, extra: Option<i64>) -> bool {
    let same_card = kind == EntryKind::Issue || found.card_id == card;
    found.kind == kind && same_card && extra.is_none_or(|x| x == found.extra)
}

/// The answer to an issue or replace whose op_ref another operation used.
fn reused_issue(found: &Entry, old: CardId) -> IssueResult {
    IssueResult { key_version: found.key_version, ..declined_issue(Status::ReferenceReused, old) }
}

/// The binding field of an issue entry: the product id asked for in byte 0 (zero for the
/// 16-byte Issue of protocol 1.1, which asks for product 0), so a retry is told from another
/// operation under the same op_ref even when the issue was declined.
fn issue_binding(product: u8) -> Mac {
    let mut b = [0u8; 16];
    b[0] = product;
    Mac(b)
}

/// Decides issuing a card of `product` (0 for the 16-byte Issue) with `deposit` as its initial
/// balance; the product's card deposit is paid on top, apart from the balance. `new_card` is
/// the id the shard would give it.
pub fn issue(
    ctx: &Context<'_>,
    op_ref: u64,
    deposit: Amount,
    product: u8,
    new_card: CardId,
    prior: Option<(u64, Entry)>,
) -> Decided<IssueResult> {
    if let Some((seq, found)) = prior {
        let same = same_operation(&found, EntryKind::Issue, CardId(0), Some(deposit.0))
            && found.binding == issue_binding(product);
        return if same {
            Decided::Again(seq, found)
        } else {
            Decided::Decline(reused_issue(&found, CardId(0)))
        };
    }
    let limits = ctx.policy.limits;
    let rules = limits.product(product);
    let status = match rules {
        None => Status::UnknownProduct,
        Some(_) if deposit.0 < 0 || deposit.0 > limits.max_balance => Status::InvalidAmount,
        Some(p) if deposit.0 > p.max_balance => Status::BalanceLimit,
        Some(_) => Status::Approved,
    };
    let approved = status == Status::Approved;
    let kept = if approved { deposit } else { Amount(0) };
    let fields = match rules {
        Some(p) if approved => {
            let after =
                CardProduct { id: product, deposit: Amount(p.deposit), ..CardProduct::DEFAULT };
            (after != CardProduct::DEFAULT)
                .then_some(ProductFields { deposit_paid: p.deposit, ..ProductFields::state(after) })
        }
        _ => None,
    };
    Decided::Record(Entry {
        kind: EntryKind::Issue,
        status,
        card_id: if approved { new_card } else { CardId(0) },
        atc: Atc(0),
        amount: kept,
        balance_after: kept,
        time_ms: ctx.now_ms,
        reference: op_ref,
        binding: issue_binding(product),
        other_card: CardId(0),
        key_version: ctx.policy.current_version,
        hotlist_version: 0,
        hotlist_change: HotlistChange::None,
        extra: deposit.0,
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        product: fields,
        numbered: crate::engine::entry::Numbered::NONE,
    })
}

/// Decides replacing card `old` (its record `card`, if it exists) by `new_card`.
pub fn replace(
    ctx: &Context<'_>,
    op_ref: u64,
    old: CardId,
    card: Option<CardRecord>,
    new_card: CardId,
    prior: Option<(u64, Entry)>,
) -> Decided<IssueResult> {
    if let Some((seq, found)) = prior {
        return if same_operation(&found, EntryKind::ReplacedOut, old, None) {
            Decided::Again(seq, found)
        } else {
            Decided::Decline(reused_issue(&found, old))
        };
    }
    let Some(card) = card else {
        return Decided::Decline(declined_issue(Status::UnknownCard, old));
    };
    let status = if card.retired() {
        Status::CardClosed
    } else if card.balance.0 < 0 && card.state != CardState::Blocked {
        // An overdrawn card that is not blocked can still be topped up: its debt is settled
        // that way before it moves. A blocked debtor (stolen, then overdrawn offline) cannot be
        // topped up, so it is replaced with its debt left on the old card (below).
        Status::InvalidState
    } else {
        Status::Approved
    };
    let mut after = card;
    let mut fields = None;
    if status == Status::Approved {
        after.state = CardState::Replaced;
        // A positive balance moves to the new card; a debt stays recorded on the retired card,
        // and the new card starts at 0.
        after.balance = Amount(card.balance.0.min(0));
        // Protocol 1.3: the new card keeps the product; the deposit moves to it, or the
        // operator keeps it and the holder pays the product's deposit for the new card.
        let rules = ctx.policy.limits.card_product(card.product.id);
        let (kept, paid) = match rules.replace_deposit {
            ReplaceDeposit::Move => (0, 0),
            ReplaceDeposit::Keep => (card.product.deposit.0, rules.deposit),
        };
        after.product.deposit = Amount(0);
        if card.product != CardProduct::DEFAULT || paid != 0 {
            fields = Some(ProductFields {
                deposit_paid: paid,
                deposit_kept: kept,
                ..ProductFields::state(after.product)
            });
        }
    }
    let (hotlist_version, hotlist_change) =
        hotlist_change(ctx.hotlist_version, card.hotlisted(), &after);
    Decided::Record(Entry {
        kind: EntryKind::ReplacedOut,
        status,
        card_id: old,
        atc: Atc(0),
        amount: Amount(after.balance.0 - card.balance.0),
        balance_after: after.balance,
        time_ms: ctx.now_ms,
        reference: op_ref,
        binding: Mac::default(),
        other_card: if status == Status::Approved { new_card } else { CardId(0) },
        key_version: ctx.policy.current_version,
        hotlist_version,
        hotlist_change,
        extra: 0,
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        product: fields,
        numbered: crate::engine::entry::Numbered::NONE,
    })
}

/// Decides a block (with its reason), unblock or close of `card_id` (its record `card`, if it
/// exists). Declines for the card's state are journaled too, so a retry repeats them.
pub fn card_op(
    ctx: &Context<'_>,
    kind: EntryKind,
    op_ref: u64,
    card_id: CardId,
    reason: Option<BlockReason>,
    card: Option<CardRecord>,
    prior: Option<(u64, Entry)>,
) -> Decided<StaffResult> {
    if let Some((seq, found)) = prior {
        return if same_operation(&found, kind, card_id, reason.map(|r| i64::from(r as u8))) {
            Decided::Again(seq, found)
        } else {
            Decided::Decline(declined_staff(Status::ReferenceReused, card_id))
        };
    }
    let Some(card) = card else {
        return Decided::Decline(declined_staff(Status::UnknownCard, card_id));
    };
    let retired = card.retired();
    let mut after = card;
    let status = match kind {
        _ if retired => Status::CardClosed,
        EntryKind::Block if card.state == CardState::Blocked => Status::InvalidState,
        EntryKind::Block => {
            after.state = CardState::Blocked;
            after.block_reason = reason.unwrap_or(BlockReason::Other);
            Status::Approved
        }
        EntryKind::Unblock if card.state != CardState::Blocked => Status::InvalidState,
        EntryKind::Unblock => {
            after.state = CardState::Active;
            Status::Approved
        }
        // A negative balance cannot be refunded. An overdrawn card that is not blocked is
        // topped up first; a blocked one cannot be, so it closes with its debt kept on the
        // closed card and nothing refunded.
        _ if card.balance.0 < 0 && card.state != CardState::Blocked => Status::InvalidState,
        _ => {
            after.state = CardState::Closed;
            after.balance = Amount(card.balance.0.min(0));
            Status::Approved
        }
    };
    let (hotlist_version, hotlist_change) =
        hotlist_change(ctx.hotlist_version, card.hotlisted(), &after);
    let closed = kind == EntryKind::Close && status == Status::Approved;
    let refunded = if closed { card.balance.0.max(0) } else { 0 };
    // Protocol 1.3: a Close pays the card deposit back too (apart from the balance refund).
    let fields = (closed && card.product != CardProduct::DEFAULT).then(|| {
        after.product.deposit = Amount(0);
        ProductFields {
            deposit_refunded: card.product.deposit.0,
            ..ProductFields::state(after.product)
        }
    });
    Decided::Record(Entry {
        kind,
        status,
        card_id,
        atc: Atc(0),
        amount: Amount(after.balance.0 - card.balance.0),
        balance_after: after.balance,
        time_ms: ctx.now_ms,
        reference: op_ref,
        // The card's state when this was decided, so a retried decline repeats it.
        binding: state_binding(card.reported_state()),
        other_card: CardId(0),
        key_version: card.key_version,
        hotlist_version,
        hotlist_change,
        // Block: the reason; close: the refund.
        extra: if kind == EntryKind::Block {
            i64::from(reason.unwrap_or(BlockReason::Other) as u8)
        } else {
            refunded
        },
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        product: fields,
        numbered: crate::engine::entry::Numbered::NONE,
    })
}

/// The answer to the block, unblock or close journaled as `entry` at `seq` (before its MAC).
pub fn answer(kind: EntryKind, entry: &Entry, seq: u64, card_id: CardId) -> StaffResult {
    let mut result = declined_staff(entry.status, card_id);
    if entry.status == Status::ReferenceReused {
        return result;
    }
    result.journal_seq = seq;
    result.balance = entry.balance_after;
    result.hotlist_version = entry.hotlist_version;
    // A Close's refund is what the clerk pays out: the balance and (1.3) the card deposit.
    let deposit_refunded = entry.product.map_or(0, |p| p.deposit_refunded);
    result.refunded = if kind == EntryKind::Close {
        Amount(entry.extra.saturating_add(deposit_refunded))
    } else {
        Amount(0)
    };
    result.card_state = match (entry.status, kind) {
        (Status::Approved, EntryKind::Block) => CardState::Blocked,
        (Status::Approved, EntryKind::Close) => CardState::Closed,
        (Status::Approved, _) if entry.balance_after.0 < 0 => CardState::Overdrawn,
        (Status::Approved, _) => CardState::Active,
        _ => CardState::from_u8(entry.binding.0[0]).unwrap_or(CardState::Active),
    };
    result
}

/// Decides changing `card_id`'s product to `product` (protocol 1.3; `card` its record, if it
/// exists). The deposit becomes the new product's: the difference is paid at the counter, or
/// paid back. The balance, an open hold and today's counters stay; the new product's limits
/// apply from the next request. Declines for the card are journaled too, so a retry repeats
/// them.
pub fn set_product(
    ctx: &Context<'_>,
    op_ref: u64,
    card_id: CardId,
    product: u8,
    card: Option<CardRecord>,
    prior: Option<(u64, Entry)>,
) -> Decided<ProductResult> {
    if let Some((seq, found)) = prior {
        let same = same_operation(&found, EntryKind::ProductChanged, card_id, Some(product.into()));
        return if same {
            Decided::Again(seq, found)
        } else {
            Decided::Decline(decline_product(Status::ReferenceReused, card_id))
        };
    }
    let Some(card) = card else {
        return Decided::Decline(decline_product(Status::UnknownCard, card_id));
    };
    let rules = ctx.policy.limits.product(product);
    let status = match rules {
        _ if card.retired() => Status::CardClosed,
        None => Status::UnknownProduct,
        Some(p) if card.balance.0 > p.max_balance => Status::BalanceLimit,
        Some(_) => Status::Approved,
    };
    let mut after = card.product;
    let mut fields = ProductFields::state(card.product);
    if let (Status::Approved, Some(p)) = (status, rules) {
        after.id = product;
        after.deposit = Amount(p.deposit);
        let change = p.deposit.saturating_sub(card.product.deposit.0);
        fields = ProductFields {
            deposit_paid: change.max(0),
            deposit_refunded: change.saturating_neg().max(0),
            ..ProductFields::state(after)
        };
    }
    Decided::Record(Entry {
        kind: EntryKind::ProductChanged,
        status,
        card_id,
        atc: Atc(0),
        amount: Amount(0),
        balance_after: card.balance,
        time_ms: ctx.now_ms,
        reference: op_ref,
        // The card's state when this was decided, as for block, unblock and close.
        binding: state_binding(card.reported_state()),
        other_card: CardId(0),
        key_version: card.key_version,
        hotlist_version: 0,
        hotlist_change: HotlistChange::None,
        // The product asked for (tells a retry from another operation under the op_ref).
        extra: product.into(),
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        // Declines carry the card's product unchanged, so a retry answers it again.
        product: Some(fields),
        numbered: crate::engine::entry::Numbered::NONE,
    })
}

/// The answer to the SetProduct journaled as `entry` at `seq` (before its MAC).
pub fn product_answer(entry: &Entry, seq: u64, card_id: CardId) -> ProductResult {
    let mut result = decline_product(entry.status, card_id);
    if entry.status == Status::ReferenceReused {
        return result;
    }
    let fields = entry.product.unwrap_or(ProductFields::state(CardProduct::DEFAULT));
    result.journal_seq = seq;
    result.card_state = CardState::from_u8(entry.binding.0[0]).unwrap_or(CardState::Active);
    result.product = fields.after.id;
    result.balance = entry.balance_after;
    result.deposit = fields.after.deposit;
    result.deposit_paid = Amount(fields.deposit_paid);
    result.deposit_refunded = Amount(fields.deposit_refunded);
    result
}
