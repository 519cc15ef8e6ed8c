//! Statuses, card states, block reasons and error codes in words, for people (counter staff,
//! terminal displays, logs).

use citycard_protocol::{BlockReason, CardState, EntryKind, Status};

/// Short name of a status, as in PROTOCOL.md 4.1.
pub fn status_name(status: Status) -> &'static str {
    match status {
        Status::Approved => "Approved",
        Status::UnknownCard => "UnknownCard",
        Status::CardBlocked => "CardBlocked",
        Status::CardClosed => "CardClosed",
        Status::BadCryptogram => "BadCryptogram",
        Status::Replay => "Replay",
        Status::InsufficientFunds => "InsufficientFunds",
        Status::OverBalanceCap => "OverBalanceCap",
        Status::NotPermitted => "NotPermitted",
        Status::InvalidAmount => "InvalidAmount",
        Status::Busy => "Busy",
        Status::KeyVersionRetired => "KeyVersionRetired",
        Status::ReferenceReused => "ReferenceReused",
        Status::InvalidState => "InvalidState",
        Status::Unavailable => "Unavailable",
        Status::NoOpenHold => "NoOpenHold",
        Status::HoldExists => "HoldExists",
        Status::NotFound => "NotFound",
        Status::ReversalWindowClosed => "ReversalWindowClosed",
        Status::AlreadyReversed => "AlreadyReversed",
        Status::Reversed => "Reversed",
        Status::BeyondRetention => "BeyondRetention",
        Status::BalanceLimit => "BalanceLimit",
        Status::TransactionLimit => "TransactionLimit",
        Status::DailyAmountLimit => "DailyAmountLimit",
        Status::DailyCountLimit => "DailyCountLimit",
        Status::UnknownProduct => "UnknownProduct",
        Status::SeqConflict => "SeqConflict",
    }
}

/// A sentence for staff explaining a status.
pub fn status_words(status: Status) -> &'static str {
    match status {
        Status::Approved => "approved",
        Status::UnknownCard => "declined: there is no card with this number",
        Status::CardBlocked => {
            "declined: the card is blocked (by staff, or overdrawn until it is topped up)"
        }
        Status::CardClosed => "declined: the card was closed or replaced and never works again",
        Status::BadCryptogram => "declined: the card's cryptogram did not verify",
        Status::Replay => "declined: the card's transaction counter was already used",
        Status::InsufficientFunds => "declined: the balance is too low",
        Status::OverBalanceCap => "declined: the balance would exceed the maximum a card may hold",
        Status::NotPermitted => "declined: this terminal may not perform this operation",
        Status::InvalidAmount => "declined: the amount is zero, negative or above the limit",
        Status::Busy => "not done: the server is busy, try again",
        Status::KeyVersionRetired => {
            "declined: the card's key is retired, the card must be replaced"
        }
        Status::ReferenceReused => "declined: this operation reference was already used",
        Status::InvalidState => "declined: the operation does not apply to the card in its state",
        Status::Unavailable => "not done: the server is shutting down, try again later",
        Status::NoOpenHold => "declined: the card has no open tap-in to complete",
        Status::HoldExists => "declined: the card is already tapped in",
        Status::NotFound => "not found: the transaction was never done, and now never will be",
        Status::ReversalWindowClosed => "declined: the purchase is too old to be reversed",
        Status::AlreadyReversed => "declined: the purchase was already reversed",
        Status::Reversed => "reversed: this purchase was refunded by a later reversal",
        Status::BeyondRetention => {
            "no more history online: older operations are kept in the archive, ask the operator"
        }
        Status::BalanceLimit => {
            "declined: the balance would exceed the maximum of the card's product"
        }
        Status::TransactionLimit => {
            "declined: the amount is above the per-transaction maximum of the card's product"
        }
        Status::DailyAmountLimit => {
            "declined: the card's product allows no more spending today (UTC day)"
        }
        Status::DailyCountLimit => {
            "declined: the card's product allows no more payments today (UTC day)"
        }
        Status::UnknownProduct => "declined: the server has no card product with this number",
        Status::SeqConflict => {
            "refused: this terminal already uploaded another record under this sequence number"
        }
    }
}

/// Name of a card state (PROTOCOL.md 4.2).
pub fn card_state_name(state: CardState) -> &'static str {
    match state {
        CardState::Active => "Active",
        CardState::Blocked => "Blocked",
        CardState::Closed => "Closed",
        CardState::Replaced => "Replaced",
        CardState::Overdrawn => "Overdrawn",
    }
}

/// Name of a block reason (PROTOCOL.md 4.3).
pub fn block_reason_name(reason: BlockReason) -> &'static str {
    match reason {
        BlockReason::Lost => "Lost",
        BlockReason::Stolen => "Stolen",
        BlockReason::Damaged => "Damaged",
        BlockReason::FraudSuspected => "FraudSuspected",
        BlockReason::Other => "Other",
        BlockReason::Overdrawn => "Overdrawn",
        BlockReason::Retired => "Retired",
    }
}

/// Name of a history entry kind (PROTOCOL.md 4.4).
pub fn entry_kind_name(kind: EntryKind) -> &'static str {
    match kind {
        EntryKind::Issue => "Issue",
        EntryKind::Purchase => "Purchase",
        EntryKind::TopUp => "TopUp",
        EntryKind::Identity => "Identity",
        EntryKind::Block => "Block",
        EntryKind::Unblock => "Unblock",
        EntryKind::ReplacedOut => "ReplacedOut",
        EntryKind::ReplacedIn => "ReplacedIn",
        EntryKind::Close => "Close",
        EntryKind::Offline => "Offline",
        EntryKind::TapIn => "TapIn",
        EntryKind::TapOut => "TapOut",
        EntryKind::HoldExpired => "HoldExpired",
        EntryKind::Reversal => "Reversal",
        EntryKind::Inquiry => "Inquiry",
        EntryKind::ProductChanged => "ProductChanged",
    }
}

/// Name of an Error frame code (PROTOCOL.md 5.1); codes this version does not know are
/// "Unknown" (a terminal must accept them).
pub fn error_code_name(code: u16) -> &'static str {
    match code {
        1 => "BadMagic",
        2 => "BadVersion",
        3 => "UnknownType",
        4 => "FrameTooLarge",
        5 => "BadHeader",
        6 => "BodyTooShort",
        7 => "TrailingBytes",
        8 => "BadValue",
        9 => "FrameTimeout",
        10 => "TooManyConnections",
        11 => "DuplicateRequestId",
        12 => "Internal",
        13 => "ShuttingDown",
        14 => "NotPermitted",
        _ => "Unknown",
    }
}

/// Minor units as a decimal amount with two places: `1234` is `12.34`, `-5` is `-0.05`.
pub fn money(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_formats_minor_units() {
        assert_eq!(money(0), "0.00");
        assert_eq!(money(1234), "12.34");
        assert_eq!(money(-5), "-0.05");
        assert_eq!(money(i64::MIN), "-92233720368547758.08");
    }

    #[test]
    fn every_status_has_words() {
        for status in Status::ALL {
            assert!(!status_words(status).is_empty());
            assert_eq!(Status::from_u8(status as u8), Some(status));
        }
    }
}
