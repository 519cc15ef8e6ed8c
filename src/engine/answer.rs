//! The shape of answers and their seal: declined and approved results built from entries, and
//! the response MAC under the card's key.

use bytes::BytesMut;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    Amount, CardAuth, CardId, CardResult, CardState, EntryKind, HistoryEntry, IssueResult,
    KeyVersion, Mac, MessageType, Response, StaffResult, Status,
};

use super::entry::Entry;

/// Sets the response MAC of a card result (purchase, top-up, balance, offline record) for the
/// request of `request_type` bound to `binding`.
pub(super) fn seal_card(
    key: &CardKey,
    request_type: MessageType,
    binding: &Mac,
    result: CardResult,
) -> CardResult {
    let response_type = match request_type {
        MessageType::Purchase => MessageType::PurchaseResult,
        MessageType::TopUp => MessageType::TopUpResult,
        MessageType::Balance => MessageType::BalanceResult,
        _ => MessageType::OfflineResults,
    };
    let mut body = BytesMut::with_capacity(citycard_protocol::CARD_RESULT_LEN);
    let mut r = result;
    r.mac = Mac::default();
    let response = Response::Balance(r);
    // Encoding a CardResult cannot fail: it has no counted fields.
    let _ = response.encode_body(&mut body);
    let split = body.len() - 16;
    r.mac = key.response_mac(response_type as u8, binding, &body[..split]);
    r
}

pub(super) fn unauthenticated(status: Status, auth: &CardAuth) -> CardResult {
    CardResult {
        status,
        card_id: auth.card_id,
        atc: auth.atc,
        balance: Amount(0),
        journal_seq: 0,
        mac: Mac::default(),
    }
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

pub(super) fn declined_issue(status: Status, old: CardId) -> IssueResult {
    IssueResult {
        status,
        card_id: CardId(0),
        key_version: KeyVersion(0),
        card_key: [0u8; 32],
        balance: Amount(0),
        replaced_card_id: old,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

pub(super) fn declined_staff(status: Status, card_id: CardId) -> StaffResult {
    StaffResult {
        status,
        card_id,
        card_state: CardState::Active,
        balance: Amount(0),
        refunded: Amount(0),
        hotlist_version: 0,
        journal_seq: 0,
        mac: Mac::default(),
    }
}

pub(super) fn wrap_staff(kind: EntryKind, result: StaffResult) -> Response {
    match kind {
        EntryKind::Block => Response::Block(result),
        EntryKind::Unblock => Response::Unblock(result),
        _ => Response::Close(result),
    }
}

/// Computes and sets the response MAC of a card-related response.
pub fn seal(key: &CardKey, binding: &Mac, response: &mut Response) {
    let mut body = BytesMut::with_capacity(128);
    if response.encode_body(&mut body).is_err() || body.len() < 16 {
        return;
    }
    let split = body.len() - 16;
    let mac = key.response_mac(response.message_type() as u8, binding, &body[..split]);
    if let Some(slot) = response.mac_mut() {
        *slot = mac;
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
