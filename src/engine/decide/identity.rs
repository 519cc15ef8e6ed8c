//! Identity checks: an approved one is journaled and answered with a signed assertion.

use citycard_protocol::crypto::assertion_bytes;
use citycard_protocol::{Amount, CardAuth, CardId, IdentityResult, Status};
use ring::signature::Ed25519KeyPair;

use super::{AtcUse, Context, Decided};
use crate::engine::decide::transit::Transit;
use crate::engine::entry::{Entry, HotlistChange};
use crate::engine::state::CardRecord;
use crate::journal::Pos;
use citycard_protocol::EntryKind;

/// Decides an authenticated identity check. Declines are answered with their status only.
pub fn decide(
    ctx: &Context<'_>,
    auth: &CardAuth,
    card: &CardRecord,
    atc: AtcUse,
) -> Decided<Status> {
    match atc {
        AtcUse::Used(seq, e) if e.kind == EntryKind::Identity && e.binding == auth.cryptogram => {
            return Decided::Again(seq, e)
        }
        AtcUse::Used(..) | AtcUse::Stale => return Decided::Decline(Status::Replay),
        AtcUse::Fresh => {}
    }
    let status = if card.retired() {
        Status::CardClosed
    } else if ctx.policy.key_retired(card, ctx.now_ms) {
        Status::KeyVersionRetired
    } else if card.hotlisted().is_some() {
        Status::CardBlocked
    } else {
        Status::Approved
    };
    Decided::Record(Entry {
        kind: EntryKind::Identity,
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        amount: Amount(0),
        balance_after: card.balance,
        time_ms: ctx.now_ms,
        reference: auth.nonce,
        binding: auth.cryptogram,
        other_card: CardId(0),
        key_version: card.key_version,
        hotlist_version: 0,
        hotlist_change: HotlistChange::None,
        // When the assertion expires.
        extra: ctx.now_ms.saturating_add(ctx.policy.limits.identity_ttl_ms) as i64,
        terminal: ctx.terminal.to_owned(),
        prev_pos: Pos::NONE,
        transit: Transit::NONE,
        product: None,
        numbered: crate::engine::entry::Numbered::NONE,
    })
}

/// A declined identity answer (before its MAC).
pub fn declined(status: Status, auth: &CardAuth) -> IdentityResult {
    citycard_protocol::answer::decline_identity(status, auth)
}

/// The answer to the identity check journaled as `entry` at `seq` (before its MAC): an
/// approval carries the assertion signed with `signer`.
pub fn answer(auth: &CardAuth, entry: &Entry, seq: u64, signer: &Ed25519KeyPair) -> IdentityResult {
    let mut result = declined(entry.status, auth);
    result.journal_seq = seq;
    if entry.status == Status::Approved {
        result.issued_ms = entry.time_ms;
        result.expires_ms = entry.extra as u64;
        let message = assertion_bytes(
            entry.card_id,
            entry.atc,
            seq,
            result.issued_ms,
            result.expires_ms,
            &entry.terminal,
        );
        result.signature.copy_from_slice(signer.sign(&message).as_ref());
    }
    result
}
