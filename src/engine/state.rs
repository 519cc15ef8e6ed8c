//! Derived state in sled: card records (each the head of the card's chain of journal records),
//! the (terminal, op_ref) index of staff operations, the hotlist, the last journal sequence
//! applied and the card digest at it. Per-card history and the (card, ATC) lookups are not kept
//! here: they are read from the journal by walking the card's chain, so sled holds a few bytes
//! per card instead of a second copy of every record. Everything here can be rebuilt from the
//! journal; one sled batch per chunk keeps it consistent with `applied_seq`.

use citycard_protocol::{Amount, Atc, BlockReason, CardId, CardState, KeyVersion};

use super::decide::transit::Hold;
use super::product::CardProduct;
use crate::journal::Pos;

/// Key prefixes in the single sled tree.
pub(crate) const CARD: u8 = b'c';
pub(crate) const OP_INDEX: u8 = b'o';
pub(crate) const HOTLIST: u8 = b'h';
pub(crate) const META_APPLIED: &[u8] = b"m:applied_seq";
/// The [`super::checkpoint::StateDigest`] of all card records at `applied_seq`, written in the
/// same batch.
pub(crate) const META_DIGEST: &[u8] = b"m:card_digest";

/// A card as the engine keeps it in memory and in sled (encoded by [`super::store::codec`]):
/// only what decisions need. When it was issued and which card it replaced are in the journal
/// records at the start of its chain, not repeated here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardRecord {
    /// Where the card's newest journaled operation lies: the head of its chain (see
    /// `Entry::prev_pos`).
    pub last_pos: Pos,
    pub balance: Amount,
    /// Highest ATC seen from the card, online or offline.
    pub last_atc: Atc,
    pub key_version: KeyVersion,
    pub state: CardState,
    /// Why staff blocked it (meaningful while `state == Blocked`).
    pub block_reason: BlockReason,
    /// The card's open tap-in hold (protocol 1.2), `Hold::NONE` when none.
    pub hold: Hold,
    /// The card's product, deposit and daily counters (protocol 1.3).
    pub product: CardProduct,
}

impl CardRecord {
    /// Whether terminals must refuse the card, and why.
    pub fn hotlisted(&self) -> Option<BlockReason> {
        match self.state {
            CardState::Blocked => Some(self.block_reason),
            CardState::Closed | CardState::Replaced => Some(BlockReason::Retired),
            CardState::Active | CardState::Overdrawn if self.balance.0 < 0 => {
                Some(BlockReason::Overdrawn)
            }
            CardState::Active | CardState::Overdrawn => None,
        }
    }

    /// Closed or replaced: the card never works again.
    pub fn retired(&self) -> bool {
        matches!(self.state, CardState::Closed | CardState::Replaced)
    }

    /// A test card: active, not blocked, key version 1, no hold, the default product.
    #[cfg(test)]
    pub(crate) fn test_active(balance: i64, last_atc: u32, last_pos: Pos) -> CardRecord {
        CardRecord {
            state: CardState::Active,
            block_reason: BlockReason::Other,
            balance: Amount(balance),
            last_atc: Atc(last_atc),
            key_version: KeyVersion(1),
            last_pos,
            hold: Hold::NONE,
            product: CardProduct::DEFAULT,
        }
    }

    /// The state reported to counters (Overdrawn is derived from the balance).
    pub fn reported_state(&self) -> CardState {
        match self.state {
            CardState::Active if self.balance.0 < 0 => CardState::Overdrawn,
            other => other,
        }
    }
}

/// Cards with an open tap-in hold (key only, the hold is in the card record), so that a start
/// finds the open holds for the expiry sweep without reading every card.
pub(crate) const HOLD: u8 = b'H';

/// The key marking `card` as holding an open hold.
pub(crate) fn hold_key(card: CardId) -> [u8; 9] {
    let mut k = card_key(card);
    k[0] = HOLD;
    k
}

/// Protocol 1.3: the (terminal, terminal seq) index of numbered offline records, like the
/// op_ref index: key `t`, terminal length, terminal, seq (big-endian, so a terminal's keys sort
/// by seq and its last key is its highest seq); value [`index_value`].
pub(crate) const SEQ_INDEX: u8 = b't';

/// The key prefix of one terminal's seq index entries.
pub(crate) fn seq_prefix(terminal: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + terminal.len() + 8);
    k.push(SEQ_INDEX);
    k.push(terminal.len() as u8);
    k.extend_from_slice(terminal.as_bytes());
    k
}

pub(crate) fn seq_key(terminal: &str, terminal_seq: u64) -> Vec<u8> {
    let mut k = seq_prefix(terminal);
    k.extend_from_slice(&terminal_seq.to_be_bytes());
    k
}

pub(crate) fn card_key(card: CardId) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = CARD;
    k[1..].copy_from_slice(&card.0.to_be_bytes());
    k
}

pub(crate) fn op_key(terminal: &str, op_ref: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + terminal.len() + 8);
    k.push(OP_INDEX);
    k.push(terminal.len() as u8);
    k.extend_from_slice(terminal.as_bytes());
    k.extend_from_slice(&op_ref.to_be_bytes());
    k
}

pub(crate) fn hotlist_key(version: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = HOTLIST;
    k[1..].copy_from_slice(&version.to_be_bytes());
    k
}

/// Value of a hotlist key: card id, listed flag, reason.
pub(crate) fn hotlist_value(card: CardId, listed: bool, reason: BlockReason) -> [u8; 10] {
    let mut v = [0u8; 10];
    v[..8].copy_from_slice(&card.0.to_be_bytes());
    v[8] = u8::from(listed);
    v[9] = reason as u8;
    v
}

/// Value of an op_ref index key whose staff record was removed by a prune before this state
/// was built (seeded from the anchor's op_ref table): seq 0 at no position, which no journaled
/// record has. A lookup that finds it answers ReferenceReused.
pub(crate) const PRUNED_OP: [u8; 8 + Pos::LEN] = [0u8; 8 + Pos::LEN];

/// Value of an op_ref index key: the seq of the journal record and where it lies.
pub(crate) fn index_value(seq: u64, pos: Pos) -> [u8; 8 + Pos::LEN] {
    let mut v = [0u8; 8 + Pos::LEN];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    v[8..].copy_from_slice(&pos.to_bytes());
    v
}

pub(crate) fn parse_index_value(v: &[u8]) -> Option<(u64, Pos)> {
    if v.len() != 8 + Pos::LEN {
        return None;
    }
    Some((be_u64(&v[..8])?, Pos::from_bytes(&v[8..])?))
}

pub(crate) fn be_u64(v: &[u8]) -> Option<u64> {
    let a: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_be_bytes(a))
}
