//! Transit decisions as pure functions: tap-in holds, tap-out completion, hold expiry on the
//! engine's clock, reversals and inquiries (PROTOCOL.md 6.7 to 6.9). The shard gathers the
//! facts (card record, lookups in the card's chain, `now_ms`) and journals what these return.

use citycard_protocol::{Amount, Atc, EntryKind, MessageType, Status};

use crate::engine::state::CardRecord;

/// A card's open hold (at most one). `atc` 0 means none: a tap-in's ATC is never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Hold {
    /// The tap-in that placed it.
    pub atc: Atc,
    pub amount: Amount,
    /// Server time (Unix ms) from which the hold is settled at the missing tap-out fare.
    pub expires_ms: u64,
}

impl Hold {
    pub const NONE: Hold = Hold { atc: Atc(0), amount: Amount(0), expires_ms: 0 };
    /// Encoded length: atc u32, amount i64, expires_ms u64.
    pub const LEN: usize = 20;

    pub fn is_open(&self) -> bool {
        self.atc.0 != 0
    }

    /// Whether the engine's clock has passed the hold's timeout.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.is_open() && now_ms >= self.expires_ms
    }

    pub fn to_bytes(self) -> [u8; Hold::LEN] {
        let mut out = [0u8; Hold::LEN];
        out[..4].copy_from_slice(&self.atc.0.to_be_bytes());
        out[4..12].copy_from_slice(&self.amount.0.to_be_bytes());
        out[12..].copy_from_slice(&self.expires_ms.to_be_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<Hold> {
        let b: &[u8; Hold::LEN] = b.try_into().ok()?;
        let mut atc = [0u8; 4];
        atc.copy_from_slice(&b[..4]);
        let mut amount = [0u8; 8];
        amount.copy_from_slice(&b[4..12]);
        let mut expires = [0u8; 8];
        expires.copy_from_slice(&b[12..]);
        Some(Hold {
            atc: Atc(u32::from_be_bytes(atc)),
            amount: Amount(i64::from_be_bytes(amount)),
            expires_ms: u64::from_be_bytes(expires),
        })
    }
}

/// What a transit journal entry records beyond the common fields: the card's hold after the
/// operation, and the ATC the operation refers to (the tap-in a tap-out or expiry completed,
/// the purchase a reversal refunded, the open hold's tap-in for a declined tap-in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Transit {
    pub hold: Hold,
    pub ref_atc: Atc,
}

impl Transit {
    pub const NONE: Transit = Transit { hold: Hold::NONE, ref_atc: Atc(0) };
    pub const LEN: usize = Hold::LEN + 4;
}

/// Transit limits, each a config key with its reason in `Config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransitLimits {
    /// The hold a tap-in places: the highest fare a ride can cost.
    pub max_fare: i64,
    /// How long a hold waits for its tap-out before it is settled.
    pub hold_timeout_ms: u64,
    /// What a hold without a tap-out costs (at most the hold).
    pub missing_tapout_fare: i64,
    /// How long after a purchase its terminal may reverse it.
    pub reversal_window_ms: u64,
}

impl Default for TransitLimits {
    fn default() -> Self {
        TransitLimits {
            // 4.00: the longest metro ride of a typical city tariff.
            max_fare: 400,
            // Three hours: a ride plus a generous transfer; metros close a trip at 2 to 4 h.
            hold_timeout_ms: 3 * 60 * 60 * 1000,
            // A missing tap-out pays the longest ride, as city tariffs do.
            missing_tapout_fare: 400,
            // Fifteen minutes: long enough for a kiosk to restart, short enough that a
            // reversal is a correction, not a refund desk.
            reversal_window_ms: 15 * 60 * 1000,
        }
    }
}

/// What a transit decision does to the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub status: Status,
    /// Signed change of the balance (0 for declines).
    pub delta: i64,
    /// The card's hold after the operation and the ATC referred to.
    pub transit: Transit,
    /// The amount the answer reports: the hold placed, the fare charged, the refund (0 on a
    /// decline).
    pub amount: i64,
}

impl Decision {
    fn decline(status: Status, card: &CardRecord) -> Decision {
        let ref_atc = card.hold.atc;
        Decision { status, delta: 0, transit: Transit { hold: card.hold, ref_atc }, amount: 0 }
    }
}

/// balance - held: what purchases and tap-ins may spend.
pub fn spendable(card: &CardRecord) -> i64 {
    let held = if card.hold.is_open() { card.hold.amount.0 } else { 0 };
    card.balance.0.saturating_sub(held)
}

/// Checks common to every transit operation of an authenticated card.
fn card_gate(card: &CardRecord, key_retired: bool) -> Option<Status> {
    if card.retired() {
        Some(Status::CardClosed)
    } else if key_retired {
        Some(Status::KeyVersionRetired)
    } else {
        None
    }
}

/// A tap-in at an entry gate (an expired hold was settled before this is called).
/// `limits.max_fare` is the card's product's (protocol 1.3); `over_daily` the daily limit the
/// hold would break ([`super::money::daily_limit`]), if any.
pub fn tap_in(
    card: &CardRecord,
    key_retired: bool,
    limits: &TransitLimits,
    over_daily: Option<Status>,
    atc: Atc,
    now_ms: u64,
) -> Decision {
    let status = if let Some(status) = card_gate(card, key_retired) {
        status
    } else if card.hotlisted().is_some() {
        Status::CardBlocked
    } else if card.hold.is_open() {
        Status::HoldExists
    } else if let Some(limit) = over_daily {
        limit
    } else if spendable(card) < limits.max_fare {
        Status::InsufficientFunds
    } else {
        let hold = Hold {
            atc,
            amount: Amount(limits.max_fare),
            expires_ms: now_ms.saturating_add(limits.hold_timeout_ms),
        };
        return Decision {
            status: Status::Approved,
            delta: 0,
            transit: Transit { hold, ref_atc: atc },
            amount: limits.max_fare,
        };
    };
    Decision::decline(status, card)
}

/// A tap-out at an exit gate: completes the open hold with the actual fare. A card blocked
/// while riding still taps out (the hold was taken when it was good).
pub fn tap_out(card: &CardRecord, key_retired: bool, fare: Amount) -> Decision {
    let status = if let Some(status) = card_gate(card, key_retired) {
        status
    } else if !card.hold.is_open() {
        Status::NoOpenHold
    } else if fare.0 < 0 || fare.0 > card.hold.amount.0 {
        Status::InvalidAmount
    } else {
        return Decision {
            status: Status::Approved,
            delta: -fare.0,
            transit: Transit { hold: Hold::NONE, ref_atc: card.hold.atc },
            amount: fare.0,
        };
    };
    let mut d = Decision::decline(status, card);
    if status != Status::InvalidAmount {
        d.transit.ref_atc = Atc(0);
    }
    d
}

/// The settlement of a hold nobody tapped out: `force` settles an open hold before its
/// timeout (a Close or Replace of the card). None when there is nothing to settle.
pub fn expire(
    card: &CardRecord,
    limits: &TransitLimits,
    now_ms: u64,
    force: bool,
) -> Option<Decision> {
    if !(card.hold.expired(now_ms) || (force && card.hold.is_open())) {
        return None;
    }
    let fare = limits.missing_tapout_fare.clamp(0, card.hold.amount.0.max(0));
    Some(Decision {
        status: Status::Approved,
        delta: -fare,
        transit: Transit { hold: Hold::NONE, ref_atc: card.hold.atc },
        amount: fare,
    })
}

/// What the card's chain says about the purchase a reversal names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PurchaseFacts {
    /// The amount it charged (positive).
    pub charged: i64,
    pub time_ms: u64,
    /// An approved reversal of it exists.
    pub reversed: bool,
}

/// A reversal by the terminal that made the purchase. `purchase` is None when the card has no
/// approved purchase of this terminal at that ATC with that cryptogram (within the lookup
/// depth). Refunds go to blocked cards and above the balance cap too: the money was the
/// holder's a moment ago.
pub fn reversal(
    card: &CardRecord,
    key_retired: bool,
    limits: &TransitLimits,
    original_atc: Atc,
    amount: Amount,
    purchase: Option<PurchaseFacts>,
    now_ms: u64,
) -> Decision {
    let status = if let Some(status) = card_gate(card, key_retired) {
        status
    } else if let Some(p) = purchase {
        if p.reversed {
            Status::AlreadyReversed
        } else if now_ms.saturating_sub(p.time_ms) > limits.reversal_window_ms {
            Status::ReversalWindowClosed
        } else if amount.0 != p.charged {
            Status::InvalidAmount
        } else {
            return Decision {
                status: Status::Approved,
                delta: amount.0,
                transit: Transit { hold: card.hold, ref_atc: original_atc },
                amount: amount.0,
            };
        }
    } else {
        Status::NotFound
    };
    let mut d = Decision::decline(status, card);
    d.transit.ref_atc = Atc(0);
    d
}

/// The journal kind a request type's answer is recorded under (the inquirable types).
pub fn kind_of(request: MessageType) -> Option<EntryKind> {
    Some(match request {
        MessageType::Purchase => EntryKind::Purchase,
        MessageType::TopUp => EntryKind::TopUp,
        MessageType::Identity => EntryKind::Identity,
        MessageType::TapIn => EntryKind::TapIn,
        MessageType::TapOut => EntryKind::TapOut,
        MessageType::Reversal => EntryKind::Reversal,
        _ => return None,
    })
}

/// What the card's chain holds for the (card, ATC) an inquiry asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtcFinding {
    /// Used by an entry of this kind with this binding (true) or by something else (false).
    Used { kind: EntryKind, same_binding: bool },
    /// Never used, and a late copy of the request could still be decided (within the late-ATC
    /// window and above 0).
    UnusedOpen,
    /// Never used, and no copy of the request can ever be decided (0, or below the window).
    UnusedClosed,
    /// Not known: the walk stopped at its depth.
    Unknown,
}

/// The outcome of an inquiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InquiryOutcome {
    /// Answer with the original answer (a retry of the original request produces it).
    Original,
    /// Answer NotFound: the ATC was burnt earlier by this same inquiry (repeat its answer).
    AlreadyBurnt,
    /// Journal a burn of the ATC and answer NotFound.
    Burn,
    /// Answer NotFound without journaling: nothing can ever use that ATC.
    NotFound,
    /// The ATC was used by another request, or the answer is out of reach: Replay.
    Replay,
}

pub fn inquiry(original: EntryKind, finding: AtcFinding) -> InquiryOutcome {
    match finding {
        AtcFinding::Used { kind, same_binding: true } if kind == original => {
            InquiryOutcome::Original
        }
        AtcFinding::Used { kind: EntryKind::Inquiry, same_binding: true } => {
            InquiryOutcome::AlreadyBurnt
        }
        AtcFinding::Used { .. } | AtcFinding::Unknown => InquiryOutcome::Replay,
        AtcFinding::UnusedOpen => InquiryOutcome::Burn,
        AtcFinding::UnusedClosed => InquiryOutcome::NotFound,
    }
}

#[cfg(test)]
#[path = "transit_tests.rs"]
mod tests;
