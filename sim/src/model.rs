//! The simulator's reference ledger: what every card must look like given the answers the
//! engine acknowledged, kept with plain maps and none of the engine's code.

use std::collections::BTreeMap;

use citycard_protocol::crypto::CardKey;
use citycard_protocol::{CardId, Mac, OfflineRecord, Request, Status};

/// Highest balance a card may hold (the sim's `Limits::max_balance`).
pub const MAX_BALANCE: i64 = 20_000;
/// Highest amount of one transaction (the sim's `Limits::max_amount`).
pub const MAX_AMOUNT: i64 = 5_000;
/// The protocol's late-ATC window (`ATC_LATE_WINDOW`).
pub const LATE_WINDOW: u32 = 64;
/// Journaled operations of a card after which an old ATC may no longer be found by the
/// engine's bounded chain walk (`ATC_LOOKUP_DEPTH` is 256; a margin for staff records).
pub const WALK_DEPTH: u64 = 240;
/// The sim's transit limits (`TransitLimits`): the hold a tap-in places, how long it waits for
/// its tap-out, what a missing tap-out costs (below the hold, so settling is visible), and
/// how long a purchase may be reversed.
pub const MAX_FARE: i64 = 400;
pub const HOLD_TIMEOUT_MS: u64 = 3 * 60 * 60 * 1000;
pub const MISSING_TAPOUT_FARE: i64 = 250;
pub const REVERSAL_WINDOW_MS: u64 = 15 * 60 * 1000;

/// A card's open hold (6.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub atc: u32,
    pub amount: i64,
    pub expires_ms: u64,
}

/// An approved purchase a reversal may name (6.8).
#[derive(Debug, Clone)]
pub struct Purchase {
    pub terminal: String,
    pub cryptogram: Mac,
    pub amount: i64,
    pub time_ms: u64,
    pub reversed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    Blocked,
    Closed,
    Replaced,
}

/// A journaled use of a card's ATC, with its answer.
#[derive(Debug, Clone)]
pub struct Use {
    pub terminal: String,
    /// The request (online), or `None` for an offline record (the answer is in `answer`).
    pub request: Option<Request>,
    /// The offline record, for an offline use.
    pub offline: Option<OfflineRecord>,
    pub answer: Vec<u8>,
    /// The card's journaled-operation count when it was used (for [`WALK_DEPTH`]).
    pub ops_at: u64,
}

#[derive(Debug, Clone)]
pub struct Card {
    pub shard: u16,
    pub key: CardKey,
    pub balance: i64,
    pub state: State,
    /// Highest ATC the engine has journaled for the card.
    pub last_atc: u32,
    pub used: BTreeMap<u32, Use>,
    /// Journaled records of this card.
    pub ops: u64,
    /// The open hold, at most one.
    pub hold: Option<Hold>,
    /// Approved purchases by ATC.
    pub purchases: BTreeMap<u32, Purchase>,
}

impl Card {
    pub fn retired(&self) -> bool {
        matches!(self.state, State::Closed | State::Replaced)
    }

    /// On the hotlist: blocked, retired, or overdrawn.
    pub fn hotlisted(&self) -> bool {
        self.state != State::Active || self.balance < 0
    }

    /// balance - hold.
    pub fn spendable(&self) -> i64 {
        self.balance - self.hold.map_or(0, |h| h.amount)
    }

    /// What settling the open hold costs when it is due at `now_ms` (or `force`d).
    pub fn settle_fare(&self, now_ms: u64, force: bool) -> Option<i64> {
        let h = self.hold?;
        (force || now_ms >= h.expires_ms).then(|| MISSING_TAPOUT_FARE.clamp(0, h.amount.max(0)))
    }
}

/// A staff operation's recorded answer, by (terminal, op_ref).
#[derive(Debug, Clone)]
pub struct StaffUse {
    pub request: Request,
    pub answer: Vec<u8>,
    pub shard: u16,
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    pub cards: BTreeMap<CardId, Card>,
    pub staff: BTreeMap<(String, u64), StaffUse>,
    /// Deposits and approved top-ups.
    pub money_in: i64,
    /// Approved purchases, offline records and refunds.
    pub money_out: i64,
}

/// What the engine must answer to a card request with a given ATC.
#[derive(Debug)]
pub enum AtcExpect<'a> {
    /// Decide it like a new request.
    Fresh,
    /// The same request was answered: the same bytes again (or Replay if the walk is too
    /// short to find it).
    Same(&'a Use, bool),
    /// Declined Replay (or, `true`: either Replay or decided fresh because the walk is short).
    Replay,
}

impl Model {
    pub fn balances(&self) -> i64 {
        self.cards.values().map(|c| c.balance).sum()
    }

    /// The rule of 6.1 for an online consuming request (`same` tells whether a use of this ATC
    /// was by exactly these bytes from this terminal).
    pub fn online_atc<'c>(card: &'c Card, atc: u32, same: impl Fn(&Use) -> bool) -> AtcExpect<'c> {
        if atc == 0 {
            return AtcExpect::Replay;
        }
        if let Some(u) = card.used.get(&atc) {
            if same(u) {
                // The walk finds it unless the card made too many operations since.
                let deep = card.ops - u.ops_at >= WALK_DEPTH;
                return AtcExpect::Same(u, deep);
            }
            return AtcExpect::Replay;
        }
        if atc > card.last_atc || card.last_atc - atc < LATE_WINDOW {
            return AtcExpect::Fresh;
        }
        AtcExpect::Replay
    }

    /// Expected status of a purchase or top-up decided fresh.
    pub fn money_status(card: &Card, amount: i64, purchase: bool) -> Status {
        if card.retired() {
            Status::CardClosed
        } else if amount <= 0 || amount > MAX_AMOUNT {
            Status::InvalidAmount
        } else if purchase && card.hotlisted() {
            Status::CardBlocked
        } else if purchase && card.spendable() < amount {
            Status::InsufficientFunds
        } else if !purchase && card.state == State::Blocked {
            Status::CardBlocked
        } else if !purchase && card.balance + amount > MAX_BALANCE {
            Status::OverBalanceCap
        } else {
            Status::Approved
        }
    }
}
