//! The journal record payload: one decided operation with every effect it has, so replay needs
//! no decision logic and the auditor can re-check every balance.

use citycard_protocol::{Amount, Atc, BlockReason, CardId, EntryKind, KeyVersion, Mac, Status};

use crate::journal::Pos;

/// Encoding version byte at the front of every payload. Version 2 added `prev_pos` (the
/// per-card chain through the journal); version 1 entries are refused by name.
const ENTRY_VERSION: u8 = 2;
const FIXED_LEN: usize = 92 + Pos::LEN;

/// How an operation changed a card's hotlist standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotlistChange {
    None,
    Listed(BlockReason),
    Unlisted(BlockReason),
}

/// One journaled operation. Exactly one record per operation keeps multi-card operations
/// (replace) atomic: recovery keeps or drops the whole record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub status: Status,
    pub card_id: CardId,
    /// The card's ATC for card transactions, 0 for staff operations.
    pub atc: Atc,
    /// Signed change of `card_id`'s balance (0 for declines).
    pub amount: Amount,
    /// `card_id`'s balance after the operation.
    pub balance_after: Amount,
    /// Server time of the decision (offline records: the terminal's time of use).
    pub time_ms: u64,
    /// Terminal nonce for card transactions, op_ref for staff operations.
    pub reference: u64,
    /// Request cryptogram or offline certificate: tells a retry from a replay.
    pub binding: Mac,
    /// Replace: the other card (new card on the old card's record). Otherwise 0.
    pub other_card: CardId,
    /// Issue/replace: key version of the new card.
    pub key_version: KeyVersion,
    /// Shard hotlist version this operation created, 0 when none.
    pub hotlist_version: u64,
    pub hotlist_change: HotlistChange,
    /// Identity: assertion expiry (ms). Close: refunded amount. Requested amount on declines.
    pub extra: i64,
    /// Terminal that sent the request (certificate CN, at most 32 bytes).
    pub terminal: String,
    /// Where `card_id`'s previous journaled operation lies (`Pos::NONE` for its first): the
    /// chain history pages and retries walk, so sled need not hold a copy of every record.
    pub prev_pos: Pos,
}

#[derive(Debug, thiserror::Error)]
#[error("journal entry malformed: {0}")]
pub struct EntryError(pub &'static str);

impl Entry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(ENTRY_VERSION);
        out.push(self.kind as u8);
        out.push(self.status as u8);
        out.extend_from_slice(&self.card_id.0.to_be_bytes());
        out.extend_from_slice(&self.atc.0.to_be_bytes());
        out.extend_from_slice(&self.amount.0.to_be_bytes());
        out.extend_from_slice(&self.balance_after.0.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        out.extend_from_slice(&self.reference.to_be_bytes());
        out.extend_from_slice(&self.binding.0);
        out.extend_from_slice(&self.other_card.0.to_be_bytes());
        out.extend_from_slice(&self.key_version.0.to_be_bytes());
        out.extend_from_slice(&self.hotlist_version.to_be_bytes());
        let (change, reason) = match self.hotlist_change {
            HotlistChange::None => (0u8, 0u8),
            HotlistChange::Listed(r) => (1, r as u8),
            HotlistChange::Unlisted(r) => (2, r as u8),
        };
        out.push(change);
        out.push(reason);
        out.extend_from_slice(&self.extra.to_be_bytes());
        out.extend_from_slice(&self.prev_pos.to_bytes());
        let terminal = &self.terminal.as_bytes()[..self.terminal.len().min(32)];
        out.push(terminal.len() as u8);
        out.extend_from_slice(terminal);
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
        if bytes.len() < FIXED_LEN {
            return Err(EntryError("too short"));
        }
        let mut pos = 0usize;
        let mut take = |n: usize| {
            let slice = &bytes[pos..pos + n];
            pos += n;
            slice
        };
        let u64_of = |s: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_be_bytes(a)
        };
        match take(1)[0] {
            ENTRY_VERSION => {}
            1 => return Err(EntryError("entry version 1 (data directory older than 2026-12)")),
            _ => return Err(EntryError("unknown entry version")),
        }
        let kind = EntryKind::from_u8(take(1)[0]).ok_or(EntryError("kind"))?;
        let status = Status::from_u8(take(1)[0]).ok_or(EntryError("status"))?;
        let card_id = CardId(u64_of(take(8)));
        let atc_bytes = take(4);
        let atc = Atc(u32::from_be_bytes([atc_bytes[0], atc_bytes[1], atc_bytes[2], atc_bytes[3]]));
        let amount = Amount(u64_of(take(8)) as i64);
        let balance_after = Amount(u64_of(take(8)) as i64);
        let time_ms = u64_of(take(8));
        let reference = u64_of(take(8));
        let mut binding = [0u8; 16];
        binding.copy_from_slice(take(16));
        let other_card = CardId(u64_of(take(8)));
        let kv = take(2);
        let key_version = KeyVersion(u16::from_be_bytes([kv[0], kv[1]]));
        let hotlist_version = u64_of(take(8));
        let change = take(1)[0];
        let reason_byte = take(1)[0];
        let hotlist_change = match change {
            0 => HotlistChange::None,
            1 | 2 => {
                let reason = BlockReason::from_u8(reason_byte).ok_or(EntryError("reason"))?;
                if change == 1 {
                    HotlistChange::Listed(reason)
                } else {
                    HotlistChange::Unlisted(reason)
                }
            }
            _ => return Err(EntryError("hotlist change")),
        };
        let extra = u64_of(take(8)) as i64;
        let prev_pos = Pos::from_bytes(take(Pos::LEN)).ok_or(EntryError("prev_pos"))?;
        let terminal_len = usize::from(take(1)[0]);
        if bytes.len() != FIXED_LEN + terminal_len {
            return Err(EntryError("length"));
        }
        let terminal = std::str::from_utf8(&bytes[FIXED_LEN..])
            .map_err(|_| EntryError("terminal id"))?
            .to_owned();
        Ok(Entry {
            kind,
            status,
            card_id,
            atc,
            amount,
            balance_after,
            time_ms,
            reference,
            binding: Mac(binding),
            other_card,
            key_version,
            hotlist_version,
            hotlist_change,
            extra,
            terminal,
            prev_pos,
        })
    }

    /// The invariants every entry holds on its own, checked before it is appended and again
    /// after it is read back or replayed (a failure names the invariant). Damage the CRC does
    /// not catch, or a decision that broke its own rules, stops here instead of reaching money.
    pub fn check(&self) -> Result<(), &'static str> {
        let approved = self.status == Status::Approved;
        if (self.hotlist_version == 0) != (self.hotlist_change == HotlistChange::None) {
            return Err("a hotlist change has a version, and only a change has one");
        }
        if self.terminal.len() > usize::from(u8::MAX) {
            return Err("terminal id longer than its length byte");
        }
        if !approved && self.amount.0 != 0 {
            return Err("a decline moves no money");
        }
        if self.uses_atc() && self.atc.0 == 0 {
            return Err("no card transaction uses ATC 0");
        }
        if !self.uses_atc() && self.atc.0 != 0 {
            return Err("staff operations carry no ATC");
        }
        let ok = match self.kind {
            _ if !approved => true,
            EntryKind::Purchase | EntryKind::Offline => {
                self.extra > 0 && self.amount.0 == self.extra.saturating_neg()
            }
            EntryKind::TopUp => self.extra > 0 && self.amount.0 == self.extra,
            EntryKind::Identity => self.amount.0 == 0,
            EntryKind::Issue => {
                self.card_id.0 != 0 && self.amount.0 >= 0 && self.amount == self.balance_after
            }
            EntryKind::ReplacedOut => {
                self.other_card.0 != 0
                    && self.other_card != self.card_id
                    && self.balance_after.0 <= 0
            }
            EntryKind::Close => self.balance_after.0 <= 0 && self.extra >= 0,
            _ => true,
        };
        if !ok {
            return Err("an approval's amount, balance or cards break its kind's rules");
        }
        Ok(())
    }

    /// Whether this entry consumed the card's ATC (card transactions that authenticated).
    pub fn uses_atc(&self) -> bool {
        matches!(
            self.kind,
            EntryKind::Purchase | EntryKind::TopUp | EntryKind::Identity | EntryKind::Offline
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_damage() {
        let entry = Entry {
            kind: EntryKind::Purchase,
            status: Status::Approved,
            card_id: CardId(6_000_000_000_000_123),
            atc: Atc(7),
            amount: Amount(-250),
            balance_after: Amount(750),
            time_ms: 1_700_000_000_000,
            reference: 99,
            binding: Mac([9; 16]),
            other_card: CardId(0),
            key_version: KeyVersion(1),
            hotlist_version: 3,
            hotlist_change: HotlistChange::Listed(BlockReason::Overdrawn),
            extra: -5,
            terminal: "reader-1".into(),
            prev_pos: Pos { segment: 1, offset: 32 },
        };
        let mut buf = Vec::new();
        entry.encode(&mut buf);
        assert_eq!(Entry::decode(&buf).ok(), Some(entry));
        assert!(Entry::decode(&buf[..buf.len() - 1]).is_err());
        let mut longer = buf.clone();
        longer.push(0);
        assert!(Entry::decode(&longer).is_err());
        let mut bad_kind = buf.clone();
        bad_kind[1] = 200;
        assert!(Entry::decode(&bad_kind).is_err());
    }

    #[test]
    fn check_names_the_broken_invariant() {
        let purchase = Entry {
            kind: EntryKind::Purchase,
            status: Status::Approved,
            card_id: CardId(6_000_000_000_000_123),
            atc: Atc(7),
            amount: Amount(-250),
            balance_after: Amount(750),
            time_ms: 1_700_000_000_000,
            reference: 99,
            binding: Mac([9; 16]),
            other_card: CardId(0),
            key_version: KeyVersion(1),
            hotlist_version: 0,
            hotlist_change: HotlistChange::None,
            extra: 250,
            terminal: "reader-1".into(),
            prev_pos: Pos::NONE,
        };
        assert_eq!(purchase.check(), Ok(()));
        let declined =
            Entry { status: Status::InsufficientFunds, amount: Amount(0), ..purchase.clone() };
        assert_eq!(declined.check(), Ok(()));
        let broken = [
            Entry { amount: Amount(-251), ..purchase.clone() },
            Entry { status: Status::InsufficientFunds, ..purchase.clone() },
            Entry { atc: Atc(0), ..purchase.clone() },
            Entry { hotlist_version: 4, ..purchase.clone() },
            Entry { hotlist_change: HotlistChange::Listed(BlockReason::Lost), ..purchase.clone() },
            Entry { kind: EntryKind::TopUp, ..purchase.clone() },
            Entry { kind: EntryKind::Block, amount: Amount(0), ..purchase.clone() },
            Entry {
                kind: EntryKind::ReplacedOut,
                atc: Atc(0),
                amount: Amount(-50),
                balance_after: Amount(0),
                other_card: CardId(0),
                ..purchase.clone()
            },
            Entry { terminal: "t".repeat(256), ..purchase.clone() },
        ];
        for (i, entry) in broken.iter().enumerate() {
            assert!(entry.check().is_err(), "row {i} should break an invariant");
        }
    }
}
