//! Decisions as pure functions: from the card record(s), what the journal already holds for
//! this (card, ATC) or (terminal, op_ref), the request, the time and the limits, to the journal
//! entry to write (or the answer to give without writing one). No sled, no journal, no clock:
//! the shard looks things up, calls a decision, appends and applies what it returns.
//!
//! One file per family: [`money`] (purchase, top-up), [`identity`], [`offline`], [`staff`]
//! (issue, replace, block, unblock, close), [`read`] (balance, history), [`transit`] (tap-in
//! and tap-out holds, hold expiry, reversal, inquiry; protocol 1.2); [`auth`] checks a
//! cryptogram or certificate with the key passed in.

pub mod auth;
pub mod identity;
pub mod money;
pub mod offline;
pub mod read;
pub mod staff;
pub mod transit;

use std::collections::BTreeMap;

use citycard_protocol::{Atc, BlockReason, KeyVersion, ATC_LATE_WINDOW};

use super::entry::{Entry, HotlistChange};
use super::state::CardRecord;
use super::types::Limits;

/// The rules a decision applies besides the card: business limits and key-version policy.
#[derive(Clone, Copy)]
pub struct Policy<'a> {
    pub limits: &'a Limits,
    /// Key versions that stop working at the given Unix ms.
    pub retire_after_ms: &'a BTreeMap<u16, u64>,
    /// Version given to cards issued or replaced now.
    pub current_version: KeyVersion,
}

impl Policy<'_> {
    /// Whether the card's key version has stopped working at `now_ms`.
    pub fn key_retired(&self, card: &CardRecord, now_ms: u64) -> bool {
        self.retire_after_ms.get(&card.key_version.0).is_some_and(|cutoff| now_ms >= *cutoff)
    }
}

/// Everything about the moment of a decision that is not the card or the request.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// The terminal asking (its certificate's id).
    pub terminal: &'a str,
    /// The driver's time, Unix ms.
    pub now_ms: u64,
    pub policy: Policy<'a>,
    /// The shard's hotlist version before this decision.
    pub hotlist_version: u64,
}

/// What a decision wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum Decided<D> {
    /// Journal this new entry (its `prev_pos` is linked by the shard), then answer from it.
    Record(Entry),
    /// Answer again from this journaled entry (at this seq): a retry of the same request.
    Again(u64, Entry),
    /// Answer this without journaling anything (a replay, a reused reference, a decline that
    /// consumes nothing).
    Decline(D),
}

/// What the card's journal chain says about a consuming card request's ATC (PROTOCOL.md 6.1),
/// from [`atc_use`].
#[derive(Debug, Clone, PartialEq)]
// An Entry (about 240 bytes with the protocol 1.3 product fields) is moved through here once
// per request; boxing it would add an allocation to every lookup to save stack bytes.
#[allow(clippy::large_enum_variant)]
pub enum AtcUse {
    /// Not used: decide the request.
    Fresh,
    /// Used by this journaled entry: a retry of the same request, or a replay.
    Used(u64, Entry),
    /// Not used, but too far below the card's last ATC (or not provably unused): a replay.
    Stale,
}

/// What walking a card's chain found for an ATC.
#[derive(Debug, Clone, PartialEq)]
// An Entry (about 240 bytes with the protocol 1.3 product fields) is moved through here once
// per request; boxing it would add an allocation to every lookup to save stack bytes.
#[allow(clippy::large_enum_variant)]
pub enum AtcLookup {
    Used(u64, Entry),
    /// The whole chain was walked: never used.
    Unused,
    /// The walk stopped at its depth (or a segment is gone): not known.
    Unknown,
}

/// The hotlist change from `before` (the card's hotlist reason before the decision) to the
/// card record `after`, and the hotlist version it gets (0 when nothing changes).
pub fn hotlist_change(
    hotlist_version: u64,
    before: Option<BlockReason>,
    after: &CardRecord,
) -> (u64, HotlistChange) {
    let change = match (before, after.hotlisted()) {
        (None, None) => HotlistChange::None,
        (Some(a), Some(b)) if a == b => HotlistChange::None,
        (_, Some(reason)) => HotlistChange::Listed(reason),
        (Some(reason), None) => HotlistChange::Unlisted(reason),
    };
    if change == HotlistChange::None {
        (0, change)
    } else {
        (hotlist_version + 1, change)
    }
}

/// Whether a consuming card request's ATC is new, was used, or is too old, from the card and
/// what the chain walk found (`lookup`; `None` when the ATC is above the card's last one, so
/// no walk was needed). A used ATC is found whatever its age, so a retry always gets its
/// original answer. An unused ATC at or below the card's last one is still new within
/// [`ATC_LATE_WINDOW`]: a request answered Busy or Unavailable was never done, and a later
/// ATC of the same card may have been decided in the meantime. ATC 0 is never valid (a new
/// card's last ATC is 0, so its first online ATC is 1).
pub fn atc_use(card: &CardRecord, atc: Atc, lookup: Option<AtcLookup>) -> AtcUse {
    match lookup {
        None if atc > card.last_atc => AtcUse::Fresh,
        Some(AtcLookup::Used(seq, entry)) => AtcUse::Used(seq, entry),
        Some(AtcLookup::Unused)
            if atc.0 != 0 && atc <= card.last_atc && card.last_atc.0 - atc.0 < ATC_LATE_WINDOW =>
        {
            AtcUse::Fresh
        }
        // Not provably unused (too old, or deeper than the walk goes): never decide it.
        _ => AtcUse::Stale,
    }
}

#[cfg(test)]
mod product_tests;
#[cfg(test)]
mod tests;
