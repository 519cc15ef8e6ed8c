//! The compact encoding of a card record in sled: one byte of state and block reason, then
//! LEB128 varints (the balance zigzagged), so a typical card takes 12 to 16 bytes instead of a
//! fixed 44. The same bytes feed the card-state digest, so a record and its digest term never
//! disagree about what a card is.
//!
//! | field | encoding |
//! |---|---|
//! | state, block reason | one byte: state in bits 0-2, block reason in bits 3-6, bit 7 zero |
//! | balance | zigzag varint of the i64 minor units |
//! | last ATC | varint u32 |
//! | key version | varint u16 |
//! | last position: segment | varint u64 (first seq of the segment, 0 = no record) |
//! | last position: offset | varint u32 |
//! | open hold (only when bit 7 of the first byte is set) | ATC u32, amount i64, expiry ms u64, big-endian (20 bytes) |
//! | product (only when bit 6 of the first byte is set) | id u8, then varints: deposit, day, day's amount, day's count |
//!
//! A card without an open tap-in hold (protocol 1.2) has bit 7 clear and no hold bytes, so its
//! bytes and digest term are the same as before holds existed. Likewise a card of product 0
//! without deposit or daily counters (protocol 1.3) has bit 6 clear and no product bytes.
//!
//! Decoding refuses anything but the shortest form of each varint, values out of range and
//! trailing bytes, so every record has exactly one encoding (the digest depends on that).

use citycard_protocol::{Amount, Atc, BlockReason, CardState, KeyVersion};

use crate::engine::decide::transit::Hold;
use crate::engine::product::{CardProduct, Daily, MAX_PRODUCTS};
use crate::engine::state::CardRecord;
use crate::journal::Pos;

/// Longest encoding: 1 + 10 + 5 + 3 + 10 + 5 bytes, an open hold, and the product fields
/// (1 + 10 + 5 + 10 + 5 bytes).
pub const MAX_LEN: usize = 34 + Hold::LEN + 31;

/// Bit 6 of the first byte: the card's product fields follow the hold (protocol 1.3).
const PRODUCT_FLAG: u8 = 0x40;

/// Bit 7 of the first byte: an open hold follows the last position.
const HOLD_FLAG: u8 = 0x80;

/// Why stored bytes are not a card record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("card record truncated")]
    Truncated,
    #[error("card record has trailing bytes")]
    Trailing,
    #[error("card record field out of range")]
    Range,
    #[error("card record varint not in its shortest form")]
    NotMinimal,
}

/// A card record's bytes, on the stack.
#[derive(Clone, Copy)]
pub struct Encoded {
    bytes: [u8; MAX_LEN],
    len: u8,
}

impl std::ops::Deref for Encoded {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

struct Writer {
    out: Encoded,
}

impl Writer {
    fn byte(&mut self, b: u8) {
        // MAX_LEN covers the longest record, so the index is in range.
        self.out.bytes[usize::from(self.out.len)] = b;
        self.out.len += 1;
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte((v as u8) | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, CodecError> {
        let (&b, rest) = self.rest.split_first().ok_or(CodecError::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    fn varint(&mut self, max: u64) -> Result<u64, CodecError> {
        let mut value = 0u64;
        for i in 0..10u32 {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(CodecError::Range);
            }
            value |= part << (7 * i);
            if b & 0x80 == 0 {
                // A last byte of zero (after the first) means a longer form than needed.
                if i > 0 && b == 0 {
                    return Err(CodecError::NotMinimal);
                }
                return if value <= max { Ok(value) } else { Err(CodecError::Range) };
            }
        }
        Err(CodecError::Range)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

pub fn encode(record: &CardRecord) -> Encoded {
    let mut w = Writer { out: Encoded { bytes: [0; MAX_LEN], len: 0 } };
    let hold = if record.hold.is_open() { HOLD_FLAG } else { 0 };
    let with_product = record.product != CardProduct::DEFAULT;
    let product = if with_product { PRODUCT_FLAG } else { 0 };
    w.byte(
        (record.state as u8 & 0x07) | ((record.block_reason as u8 & 0x07) << 3) | hold | product,
    );
    w.varint(zigzag(record.balance.0));
    w.varint(u64::from(record.last_atc.0));
    w.varint(u64::from(record.key_version.0));
    w.varint(record.last_pos.segment);
    w.varint(u64::from(record.last_pos.offset));
    if record.hold.is_open() {
        for b in record.hold.to_bytes() {
            w.byte(b);
        }
    }
    if with_product {
        let p = record.product;
        w.byte(p.id);
        w.varint(p.deposit.0.max(0) as u64);
        w.varint(u64::from(p.daily.day));
        w.varint(p.daily.amount.max(0) as u64);
        w.varint(u64::from(p.daily.count));
    }
    w.out
}

pub fn decode(bytes: &[u8]) -> Result<CardRecord, CodecError> {
    let mut r = Reader { rest: bytes };
    let head = r.byte()?;
    let state = CardState::from_u8(head & 0x07).ok_or(CodecError::Range)?;
    let block_reason = BlockReason::from_u8((head >> 3) & 0x07).ok_or(CodecError::Range)?;
    let balance = Amount(unzigzag(r.varint(u64::MAX)?));
    let last_atc = Atc(r.varint(u64::from(u32::MAX))? as u32);
    let key_version = KeyVersion(r.varint(u64::from(u16::MAX))? as u16);
    let segment = r.varint(u64::MAX)?;
    let offset = r.varint(u64::from(u32::MAX))? as u32;
    let hold = if head & HOLD_FLAG != 0 {
        let bytes = r.rest.get(..Hold::LEN).ok_or(CodecError::Truncated)?;
        // A flagged hold must be open, so every record keeps exactly one encoding.
        let hold = Hold::from_bytes(bytes).filter(Hold::is_open).ok_or(CodecError::Range)?;
        r.rest = &r.rest[Hold::LEN..];
        hold
    } else {
        Hold::NONE
    };
    let product = if head & PRODUCT_FLAG != 0 {
        let id = r.byte()?;
        let deposit = Amount(r.varint(i64::MAX as u64)? as i64);
        let day = r.varint(u64::from(u32::MAX))? as u32;
        let amount = r.varint(i64::MAX as u64)? as i64;
        let count = r.varint(u64::from(u32::MAX))? as u32;
        let product = CardProduct { id, deposit, daily: Daily { day, amount, count } };
        // A flagged product must differ from the default, so every record keeps exactly one
        // encoding.
        if product == CardProduct::DEFAULT || usize::from(id) >= MAX_PRODUCTS {
            return Err(CodecError::Range);
        }
        product
    } else {
        CardProduct::DEFAULT
    };
    if !r.rest.is_empty() {
        return Err(CodecError::Trailing);
    }
    Ok(CardRecord {
        state,
        block_reason,
        balance,
        last_atc,
        key_version,
        last_pos: Pos { segment, offset },
        hold,
        product,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(balance: i64, atc: u32, segment: u64, offset: u32) -> CardRecord {
        CardRecord {
            state: CardState::Blocked,
            block_reason: BlockReason::Stolen,
            balance: Amount(balance),
            last_atc: Atc(atc),
            key_version: KeyVersion(3),
            last_pos: Pos { segment, offset },
            hold: Hold::NONE,
            product: CardProduct::DEFAULT,
        }
    }

    #[test]
    fn a_product_is_kept_and_the_default_costs_nothing() {
        let mut r = record(900, 7, 1, 32);
        let without = encode(&r).len();
        r.hold = Hold { atc: Atc(7), amount: Amount(400), expires_ms: 1_700_000_000_000 };
        r.product = CardProduct {
            id: 2,
            deposit: Amount(2_000),
            daily: Daily { day: 20_000, amount: 750, count: 3 },
        };
        let e = encode(&r);
        assert!(e.len() > without + Hold::LEN);
        assert_eq!(decode(&e), Ok(r));
        assert_eq!(decode(&e[..e.len() - 1]), Err(CodecError::Truncated));
        // The flag with default product fields is refused: one encoding per record.
        let plain = record(900, 7, 1, 32);
        let mut flagged = encode(&plain).to_vec();
        flagged[0] |= PRODUCT_FLAG;
        flagged.extend_from_slice(&[0, 0, 0, 0, 0]);
        assert_eq!(decode(&flagged), Err(CodecError::Range));
    }

    #[test]
    fn an_open_hold_is_kept_and_a_closed_one_costs_nothing() {
        let mut r = record(900, 7, 1, 32);
        let without = encode(&r).len();
        r.hold = Hold { atc: Atc(7), amount: Amount(400), expires_ms: 1_700_000_000_000 };
        let e = encode(&r);
        assert_eq!(e.len(), without + Hold::LEN);
        assert_eq!(decode(&e), Ok(r));
        // A flag with a hold of ATC 0 (not open) is refused: one encoding per record.
        let mut bad = e.to_vec();
        bad[without..without + 4].copy_from_slice(&[0; 4]);
        assert_eq!(decode(&bad), Err(CodecError::Range));
        assert_eq!(decode(&e[..e.len() - 1]), Err(CodecError::Truncated));
    }

    #[test]
    fn a_typical_card_takes_a_third_of_the_old_fixed_record() {
        let r = record(12_345, 4_000, 180_000_001, 40_000_000);
        let e = encode(&r);
        assert!(e.len() <= 16, "{} bytes", e.len());
        assert_eq!(decode(&e), Ok(r));
        // Byte literal: Blocked (1) | Stolen (2) << 3, balance -1 -> 1, ATC 1, version 3,
        // segment 1, offset 32.
        let small = record(-1, 1, 1, 32);
        assert_eq!(&*encode(&small), &[0x11, 0x01, 0x01, 0x03, 0x01, 0x20]);
    }

    #[test]
    fn malformed_bytes_are_refused() {
        let good = encode(&record(5, 1, 1, 32)).to_vec();
        assert_eq!(decode(&good[..good.len() - 1]), Err(CodecError::Truncated));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(CodecError::Trailing));
        // Balance 5 written in two bytes (0x8a 0x00) instead of one.
        let long = [good[0], 0x8a, 0x00, 0x01, 0x03, 0x01, 0x20];
        assert_eq!(decode(&long), Err(CodecError::NotMinimal));
        // Key version above u16.
        let big = [good[0], 0x0a, 0x01, 0x80, 0x80, 0x04, 0x01, 0x20];
        assert_eq!(decode(&big), Err(CodecError::Range));
        // Unknown state 7 and block reason 0.
        assert_eq!(decode(&[0x07, 0, 0, 0, 0, 0]), Err(CodecError::Range));
        assert_eq!(decode(&[0x00, 0, 0, 0, 0, 0]), Err(CodecError::Range));
        assert_eq!(decode(&[]), Err(CodecError::Truncated));
    }

    proptest! {
        #[test]
        fn round_trips(balance in any::<i64>(), atc in any::<u32>(), version in any::<u16>(),
                       segment in any::<u64>(), offset in any::<u32>(), s in 0u8..5, b in 1u8..8) {
            let r = CardRecord {
                state: CardState::from_u8(s).unwrap_or(CardState::Active),
                block_reason: BlockReason::from_u8(b).unwrap_or(BlockReason::Other),
                balance: Amount(balance),
                last_atc: Atc(atc),
                key_version: KeyVersion(version),
                last_pos: Pos { segment, offset },
                hold: Hold::NONE,
                product: CardProduct::DEFAULT,
            };
            let e = encode(&r);
            prop_assert!(e.len() <= MAX_LEN);
            prop_assert_eq!(decode(&e), Ok(r));
        }
    }
}
