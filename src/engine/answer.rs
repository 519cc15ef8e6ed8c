//! Answers read off journal entries (results, history lines, staff answers). The declines and
//! the seal have one home, the protocol crate's `answer` module, shared with the connection;
//! the engine knows them under the names below.

pub(super) use citycard_protocol::answer::{
    decline_card as unauthenticated, decline_issue as declined_issue,
    decline_staff as declined_staff, seal, seal_card_result,
};
use citycard_protocol::{
    Amount, CardId, CardResult, CardState, EntryKind, HistoryEntry, Mac, Response, StaffResult,
};

use super::entry::Entry;

/// A card result (purchase, top-up, balance; offline records otherwise) sealed for the request of
/// `request_type` bound to `binding`: what an Inquiry embeds, byte for byte as the original got it.
pub(super) fn seal_card(
    key: &citycard_protocol::crypto::CardKey,
    request_type: citycard_protocol::MessageType,
    binding: &Mac,
    mut result: CardResult,
) -> CardResult {
    let response_type = citycard_protocol::answer::response_type(request_type)
        .unwrap_or(citycard_protocol::MessageType::OfflineResults);
    seal_card_result(key, response_type, binding, &mut result);
    result
}

pub(super) fn card_result(entry: &Entry, seq: u64) -> CardResult {
    CardResult {
        status: entry.status,
        card_id: entry.card_id,
        atc: entry.atc,
        balance: entry.balance_after,
        journal_seq: seq,
        mac: Mac::default(),
    }
}

pub(super) fn history_entry(entry: &Entry, seq: u64, viewer: CardId) -> HistoryEntry {
    let incoming = entry.kind == EntryKind::ReplacedOut && entry.other_card == viewer;
    let moved = Amount(entry.amount.0.saturating_neg());
    HistoryEntry {
        journal_seq: seq,
        kind: if incoming { EntryKind::ReplacedIn } else { entry.kind },
        status: entry.status,
        amount: if incoming { moved } else { entry.amount },
        balance_after: if incoming { moved } else { entry.balance_after },
        time_ms: entry.time_ms,
        atc: entry.atc,
    }
}

pub(super) fn wrap_staff(kind: EntryKind, result: StaffResult) -> Response {
    match kind {
        EntryKind::Block => Response::Block(result),
        EntryKind::Unblock => Response::Unblock(result),
        _ => Response::Close(result),
    }
}

/// sled settings: a bounded page cache. (Measured: HighThroughput mode and no periodic flush
/// changed nothing at 1 or 64 terminals, so sled's defaults stay.)
/// The binding field of a block/unblock/close entry: the card's reported state at decision
/// time in byte 0 (a retried decline answers it again, byte for byte).
pub(super) fn state_binding(state: CardState) -> Mac {
    let mut b = [0u8; 16];
    b[0] = state as u8;
    Mac(b)
}
