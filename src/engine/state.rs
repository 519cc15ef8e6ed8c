//! Derived state in sled: card records (each the head of the card's chain of journal records),
//! the (terminal, op_ref) index of staff operations, the hotlist, the last journal sequence
//! applied and the card digest at it. Per-card history and the (card, ATC) lookups are not kept
//! here: they are read from the journal by walking the card's chain, so sled holds a few bytes
//! per card instead of a second copy of every record. Everything here can be rebuilt from the
//! journal; one sled batch per chunk keeps it consistent with `applied_seq`.

use citycard_protocol::{Amount, Atc, BlockReason, CardId, CardState, KeyVersion};

use super::decide::transit::Hold;
use crate::journal::Pos;

/// Key prefixes in the single sled tree.
pub(crate) const CARD: u8 = b'c';
pub(crate) const OP_INDEX: u8 = b'o';
pub(crate) const HOTLIST: u8 = b'h';
pub(crate) const META_APPLIED: &[u8] = b"m:applied_seq";
/// The [`super::checkpoint::StateDigest`] of all card records at `applied_seq`, written in the
/// same batch.
pub(crate) const META_DIGEST: &[u8] = b"m:card_digest";

/// A card as the engine keeps it in memory and in sled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardRecord {
    pub state: CardState,
    /// Why staff blocked it (meaningful while `state == Blocked`).
    pub block_reason: BlockReason,
    pub balance: Amount,
    /// Highest ATC seen from the card, online or offline.
    pub last_atc: Atc,
    pub key_version: KeyVersion,
    pub issued_ms: u64,
    /// Replace link: the card this one replaced, or that replaced it (0 when none).
    pub linked_card: CardId,
    /// Where the card's newest journaled operation lies: the head of its chain (see
    /// `Entry::prev_pos`).
    pub last_pos: Pos,
    /// The card's open tap-in hold (protocol 1.2), `Hold::NONE` when none.
    pub hold: Hold,
}

/// Length of a record without a hold (every record written before protocol 1.2).
pub const CARD_RECORD_LEN: usize = 1 + 1 + 8 + 4 + 2 + 8 + 8 + Pos::LEN;
/// Length of a record with an open hold: the hold is appended, so a card without one encodes
/// exactly as before (same sled bytes, same digest).
pub const CARD_RECORD_WITH_HOLD_LEN: usize = CARD_RECORD_LEN + Hold::LEN;

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

    /// The state reported to counters (Overdrawn is derived from the balance).
    pub fn reported_state(&self) -> CardState {
        match self.state {
            CardState::Active if self.balance.0 < 0 => CardState::Overdrawn,
            other => other,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; CARD_RECORD_LEN];
        out[0] = self.state as u8;
        out[1] = self.block_reason as u8;
        out[2..10].copy_from_slice(&self.balance.0.to_be_bytes());
        out[10..14].copy_from_slice(&self.last_atc.0.to_be_bytes());
        out[14..16].copy_from_slice(&self.key_version.0.to_be_bytes());
        out[16..24].copy_from_slice(&self.issued_ms.to_be_bytes());
        out[24..32].copy_from_slice(&self.linked_card.0.to_be_bytes());
        out[32..].copy_from_slice(&self.last_pos.to_bytes());
        if self.hold.is_open() {
            out.extend_from_slice(&self.hold.to_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<CardRecord> {
        let hold = match bytes.len() {
            CARD_RECORD_LEN => Hold::NONE,
            CARD_RECORD_WITH_HOLD_LEN => {
                Some(Hold::from_bytes(&bytes[CARD_RECORD_LEN..])?).filter(Hold::is_open)?
            }
            _ => return None,
        };
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Some(CardRecord {
            state: CardState::from_u8(bytes[0])?,
            block_reason: BlockReason::from_u8(bytes[1])?,
            balance: Amount(u64_at(2) as i64),
            last_atc: Atc(u32::from_be_bytes([bytes[10], bytes[11], bytes[12], bytes[13]])),
            key_version: KeyVersion(u16::from_be_bytes([bytes[14], bytes[15]])),
            issued_ms: u64_at(16),
            linked_card: CardId(u64_at(24)),
            last_pos: Pos::from_bytes(&bytes[32..CARD_RECORD_LEN])?,
            hold,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hold: Hold) -> CardRecord {
        CardRecord {
            state: CardState::Active,
            block_reason: BlockReason::Other,
            balance: Amount(1_000),
            last_atc: Atc(4),
            key_version: KeyVersion(1),
            issued_ms: 7,
            linked_card: CardId(0),
            last_pos: Pos { segment: 1, offset: 32 },
            hold,
        }
    }

    #[test]
    fn a_hold_is_appended_only_when_open() {
        let plain = record(Hold::NONE);
        assert_eq!(plain.encode().len(), CARD_RECORD_LEN, "the pre-1.2 layout, byte for byte");
        assert_eq!(CardRecord::decode(&plain.encode()), Some(plain));
        let hold = Hold { atc: Atc(4), amount: Amount(400), expires_ms: 99 };
        let held = record(hold);
        let bytes = held.encode();
        assert_eq!(bytes.len(), CARD_RECORD_WITH_HOLD_LEN);
        assert_eq!(&bytes[..CARD_RECORD_LEN], &plain.encode()[..]);
        assert_eq!(CardRecord::decode(&bytes), Some(held));
        // Hold bytes that describe no hold, and other lengths, are malformed.
        let mut none = bytes.clone();
        none[CARD_RECORD_LEN..CARD_RECORD_LEN + 4].fill(0);
        assert_eq!(CardRecord::decode(&none), None);
        assert_eq!(CardRecord::decode(&bytes[..bytes.len() - 1]), None);
    }
}
