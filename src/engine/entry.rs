//! The journal record payload: one decided operation with every effect it has, so replay needs
//! no decision logic and the auditor can re-check every balance.

use citycard_protocol::{Amount, Atc, BlockReason, CardId, EntryKind, KeyVersion, Mac, Status};

use super::decide::transit::{Hold, Transit};
use super::product::ProductFields;
use crate::journal::Pos;

/// Encoding version byte at the front of every payload. Version 2 added `prev_pos` (the
/// per-card chain through the journal); version 1 entries are refused by name.
const ENTRY_VERSION: u8 = 2;
/// Version 3 (protocol 1.2) is version 2 with the [`Transit`] fields after `prev_pos`. It is
/// written only for entries whose `transit` is not [`Transit::NONE`], so every other entry keeps
/// its version 2 bytes (and hash chain) exactly, and a version 2 reader refuses only records
/// it could not interpret anyway.
const ENTRY_VERSION_TRANSIT: u8 = 3;
/// Version 4 (protocol 1.3) is version 3's layout (transit fields always present, possibly
/// empty) followed by the [`ProductFields`]. Written only for entries that carry product fields
/// (a product or deposit change, or a debit counted against a daily limit), so every other
/// entry keeps its version 2 or 3 bytes exactly.
const ENTRY_VERSION_PRODUCT: u8 = 4;
const FIXED_LEN: usize = 92 + Pos::LEN;
/// Version 5 (protocol 1.3) is version 2 with the [`Numbered`] fields after `prev_pos`. It is
/// written only for numbered offline records (and their refusal notes), so every other entry
/// keeps its version 2 or 3 bytes exactly. (Version 4 belongs to card products.)
const ENTRY_VERSION_NUMBERED: u8 = 5;

/// Protocol 1.3: what a numbered offline record adds to its journal entry (PROTOCOL.md 6.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Numbered {
    /// The terminal's own sequence number (from 1); 0 only in [`Numbered::NONE`].
    pub seq: u64,
    /// The record's wire flags (bit 0: uncertain).
    pub uncertain: bool,
    /// A refusal note: the record was refused before it reached the card (unknown card, bad
    /// certificate, replayed ATC, conflicting seq). A note is not on the card's chain, moves
    /// nothing and consumes no ATC; it exists so settlement can tell a refused record from a
    /// record never uploaded.
    pub note: bool,
}

impl Numbered {
    pub const NONE: Numbered = Numbered { seq: 0, uncertain: false, note: false };
    pub const LEN: usize = 9;
    /// Flags byte bits in the journal: bit 0 is the wire's uncertain flag, bit 7 marks a note.
    const NOTE_BIT: u8 = 0x80;

    fn flags(&self) -> u8 {
        u8::from(self.uncertain) | if self.note { Self::NOTE_BIT } else { 0 }
    }
}

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
    /// Tap-in, tap-out, hold expiry, reversal and inquiry: the card's hold after the operation
    /// and the ATC it refers to. `Transit::NONE` for every other kind.
    pub transit: Transit,
    /// Protocol 1.3: the card's product, deposit and daily counters after the operation, and
    /// the deposit money that changed hands. None: the operation left them as they were.
    pub product: Option<ProductFields>,
    /// Protocol 1.3: a numbered offline record's terminal seq and flags; `Numbered::NONE` for
    /// every other entry.
    pub numbered: Numbered,
}

#[derive(Debug, thiserror::Error)]
#[error("journal entry malformed: {0}")]
pub struct EntryError(pub &'static str);

impl Entry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        let with_product = self.product.is_some();
        let with_numbered = self.numbered != Numbered::NONE;
        let with_transit = self.transit != Transit::NONE || with_product;
        out.push(if with_product {
            ENTRY_VERSION_PRODUCT
        } else if with_transit {
            ENTRY_VERSION_TRANSIT
        } else if with_numbered {
            ENTRY_VERSION_NUMBERED
        } else {
            ENTRY_VERSION
        });
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
        if with_transit {
            out.extend_from_slice(&self.transit.hold.to_bytes());
            out.extend_from_slice(&self.transit.ref_atc.0.to_be_bytes());
        } else if with_numbered {
            // `check` refuses an entry with both, or with product fields: transit kinds are
            // never numbered, and offline records count against no product limit.
            out.extend_from_slice(&self.numbered.seq.to_be_bytes());
            out.push(self.numbered.flags());
        }
        if let Some(product) = self.product {
            out.extend_from_slice(&product.to_bytes());
        }
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
        let version = take(1)[0];
        let fixed_len = match version {
            ENTRY_VERSION => FIXED_LEN,
            ENTRY_VERSION_TRANSIT => FIXED_LEN + Transit::LEN,
            ENTRY_VERSION_PRODUCT => FIXED_LEN + Transit::LEN + ProductFields::LEN,
            ENTRY_VERSION_NUMBERED => FIXED_LEN + Numbered::LEN,
            1 => return Err(EntryError("entry version 1 (data directory older than 2026-12)")),
            _ => return Err(EntryError("unknown entry version")),
        };
        if bytes.len() < fixed_len {
            return Err(EntryError("too short"));
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
        let version = bytes[0];
        let mut numbered = Numbered::NONE;
        let transit = if version != ENTRY_VERSION_TRANSIT && version != ENTRY_VERSION_PRODUCT {
            if version == ENTRY_VERSION_NUMBERED {
                let seq = u64_of(take(8));
                let flags = take(1)[0];
                if seq == 0 || flags & !(1 | Numbered::NOTE_BIT) != 0 {
                    return Err(EntryError("numbered fields"));
                }
                numbered = Numbered {
                    seq,
                    uncertain: flags & 1 != 0,
                    note: flags & Numbered::NOTE_BIT != 0,
                };
            }
            Transit::NONE
        } else {
            let hold = Hold::from_bytes(take(Hold::LEN)).ok_or(EntryError("hold"))?;
            let a = take(4);
            let ref_atc = Atc(u32::from_be_bytes([a[0], a[1], a[2], a[3]]));
            let transit = Transit { hold, ref_atc };
            if transit == Transit::NONE && version == ENTRY_VERSION_TRANSIT {
                // Version 3 is only written with transit fields.
                return Err(EntryError("version 3 without transit fields"));
            }
            transit
        };
        let product = if version == ENTRY_VERSION_PRODUCT {
            let fields = ProductFields::from_bytes(take(ProductFields::LEN))
                .ok_or(EntryError("product fields"))?;
            fields.check().map_err(EntryError)?;
            Some(fields)
        } else {
            None
        };
        let terminal_len = usize::from(take(1)[0]);
        if bytes.len() != fixed_len + terminal_len {
            return Err(EntryError("length"));
        }
        let terminal = std::str::from_utf8(&bytes[fixed_len..])
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
            transit,
            product,
            numbered,
        })
    }

    /// A numbered offline record's refusal note (see [`Numbered::note`]): journaled, but not
    /// on the card's chain, and no effect on any card.
    pub fn is_note(&self) -> bool {
        self.numbered.note
    }

    /// Whether this entry holds its terminal seq (and is found by it): every numbered entry
    /// but a SeqConflict note, which records a refused second use of a seq already held.
    pub fn claims_seq(&self) -> bool {
        self.numbered.seq != 0 && self.status != Status::SeqConflict
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
        if self.numbered != Numbered::NONE {
            if self.kind != EntryKind::Offline || self.numbered.seq == 0 {
                return Err("only offline records carry a terminal seq, and it is at least 1");
            }
            if self.product.is_some() {
                return Err("a numbered offline record carries no product fields");
            }
            if self.numbered.note && (approved || self.prev_pos != Pos::NONE) {
                return Err("a refusal note is a decline on no card's chain");
            }
        }
        if self.uses_atc() && self.atc.0 == 0 {
            return Err("no card transaction uses ATC 0");
        }
        if !self.uses_atc() && !self.is_note() && self.atc.0 != 0 {
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
            // Protocol 1.2: a tap-in moves nothing and leaves the hold it placed; a tap-out and
            // an expiry charge their fare (`extra`) and leave no hold; a reversal refunds.
            EntryKind::TapIn => {
                self.amount.0 == 0
                    && self.transit.hold.is_open()
                    && self.transit.hold.amount.0 == self.extra
                    && self.extra > 0
            }
            EntryKind::TapOut | EntryKind::HoldExpired => {
                self.extra >= 0
                    && self.amount.0 == self.extra.saturating_neg()
                    && !self.transit.hold.is_open()
                    && self.transit.ref_atc.0 != 0
            }
            EntryKind::Reversal => {
                self.extra > 0 && self.amount.0 == self.extra && self.transit.ref_atc.0 != 0
            }
            _ => true,
        };
        let transit_kind = matches!(
            self.kind,
            EntryKind::TapIn
                | EntryKind::TapOut
                | EntryKind::HoldExpired
                | EntryKind::Reversal
                | EntryKind::Inquiry
        );
        if !transit_kind && self.transit != Transit::NONE {
            return Err("only transit entries carry transit fields");
        }
        if !ok {
            return Err("an approval's amount, balance or cards break its kind's rules");
        }
        if let Some(product) = &self.product {
            product.check()?;
            let moves_deposit = product.deposit_paid != 0
                || product.deposit_refunded != 0
                || product.deposit_kept != 0;
            if moves_deposit
                && !(approved
                    && matches!(
                        self.kind,
                        EntryKind::Issue
                            | EntryKind::ProductChanged
                            | EntryKind::Close
                            | EntryKind::ReplacedOut
                    ))
            {
                return Err(
                    "only an approved issue, product change, close or replace moves a deposit",
                );
            }
        }
        if self.kind == EntryKind::ProductChanged && (self.amount.0 != 0 || self.product.is_none())
        {
            return Err("a product change carries its product and leaves the balance alone");
        }
        Ok(())
    }

    /// Whether this entry consumed the card's ATC (card transactions that authenticated).
    pub fn uses_atc(&self) -> bool {
        !self.is_note()
            && matches!(
                self.kind,
                EntryKind::Purchase
                    | EntryKind::TopUp
                    | EntryKind::Identity
                    | EntryKind::Offline
                    | EntryKind::TapIn
                    | EntryKind::TapOut
                    | EntryKind::Reversal
                    | EntryKind::Inquiry
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
            transit: Transit::NONE,
            product: None,
            numbered: Numbered::NONE,
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
            transit: Transit::NONE,
            product: None,
            numbered: Numbered::NONE,
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

    #[test]
    fn check_knows_the_transit_kinds() {
        let hold = Hold { atc: Atc(8), amount: Amount(400), expires_ms: 9 };
        let tap_in = Entry {
            kind: EntryKind::TapIn,
            status: Status::Approved,
            card_id: CardId(6_000_000_000_000_123),
            atc: Atc(8),
            amount: Amount(0),
            balance_after: Amount(1_000),
            time_ms: 1,
            reference: 5,
            binding: Mac([4; 16]),
            other_card: CardId(0),
            key_version: KeyVersion(1),
            hotlist_version: 0,
            hotlist_change: HotlistChange::None,
            extra: 400,
            terminal: "reader-1".into(),
            prev_pos: Pos::NONE,
            transit: Transit { hold, ref_atc: Atc(8) },
            product: None,
            numbered: Numbered::NONE,
        };
        let done = Transit { hold: Hold::NONE, ref_atc: Atc(8) };
        let tap_out = Entry {
            kind: EntryKind::TapOut,
            atc: Atc(9),
            amount: Amount(-320),
            extra: 320,
            transit: done,
            ..tap_in.clone()
        };
        let expired = Entry {
            kind: EntryKind::HoldExpired,
            atc: Atc(0),
            terminal: String::new(),
            ..tap_out.clone()
        };
        let reversal = Entry {
            kind: EntryKind::Reversal,
            atc: Atc(10),
            amount: Amount(250),
            extra: 250,
            ..tap_out.clone()
        };
        for ok in [&tap_in, &tap_out, &expired, &reversal] {
            assert_eq!(ok.check(), Ok(()), "{:?}", ok.kind);
        }
        let broken = [
            Entry { amount: Amount(-1), ..tap_in.clone() },
            Entry { transit: done, ..tap_in.clone() },
            Entry { extra: 399, ..tap_in.clone() },
            Entry { amount: Amount(-321), ..tap_out.clone() },
            Entry { transit: Transit { hold, ref_atc: Atc(8) }, ..tap_out.clone() },
            Entry { atc: Atc(3), ..expired.clone() },
            Entry { amount: Amount(-250), ..reversal.clone() },
            Entry { transit: Transit { hold: Hold::NONE, ref_atc: Atc(0) }, ..reversal.clone() },
            Entry {
                kind: EntryKind::Purchase,
                amount: Amount(-250),
                extra: 250,
                ..reversal.clone()
            },
        ];
        for (i, entry) in broken.iter().enumerate() {
            assert!(entry.check().is_err(), "row {i} should break an invariant");
        }
    }

    #[test]
    fn transit_fields_use_version_3_and_leave_version_2_bytes_alone() {
        let plain = Entry {
            kind: EntryKind::TapIn,
            status: Status::InsufficientFunds,
            card_id: CardId(6_000_000_000_000_123),
            atc: Atc(8),
            amount: Amount(0),
            balance_after: Amount(100),
            time_ms: 1_700_000_000_000,
            reference: 5,
            binding: Mac([4; 16]),
            other_card: CardId(0),
            key_version: KeyVersion(1),
            hotlist_version: 0,
            hotlist_change: HotlistChange::None,
            extra: 400,
            terminal: "reader-1".into(),
            prev_pos: Pos { segment: 2, offset: 64 },
            transit: Transit::NONE,
            product: None,
            numbered: Numbered::NONE,
        };
        let mut v2 = Vec::new();
        plain.encode(&mut v2);
        assert_eq!(v2[0], ENTRY_VERSION, "no transit fields: the version 2 layout");
        assert_eq!(v2.len(), FIXED_LEN + 8);
        assert_eq!(Entry::decode(&v2).ok(), Some(plain.clone()));

        let hold = Hold { atc: Atc(8), amount: Amount(400), expires_ms: 1_700_000_010_800 };
        let held =
            Entry { status: Status::Approved, transit: Transit { hold, ref_atc: Atc(8) }, ..plain };
        let mut v3 = Vec::new();
        held.encode(&mut v3);
        assert_eq!(v3[0], ENTRY_VERSION_TRANSIT);
        assert_eq!(v3.len(), FIXED_LEN + Transit::LEN + 8);
        assert_eq!(Entry::decode(&v3).ok(), Some(held));
        // Cut, lengthened, or a version 3 record without transit fields: refused.
        assert!(Entry::decode(&v3[..v3.len() - 1]).is_err());
        let mut longer = v3.clone();
        longer.push(0);
        assert!(Entry::decode(&longer).is_err());
        let mut empty_transit = v3.clone();
        let at = FIXED_LEN - 1;
        empty_transit[at..at + Transit::LEN].fill(0);
        assert!(Entry::decode(&empty_transit).is_err());
        // A version 2 record cannot be read as version 3.
        let mut relabelled = v2.clone();
        relabelled[0] = ENTRY_VERSION_TRANSIT;
        assert!(Entry::decode(&relabelled).is_err());
    }

    #[test]
    fn product_fields_use_version_4_and_leave_versions_2_and_3_alone() {
        use crate::engine::product::{CardProduct, Daily};
        let issue = Entry {
            kind: EntryKind::Issue,
            status: Status::Approved,
            card_id: CardId(6_000_000_000_000_123),
            atc: Atc(0),
            amount: Amount(1_000),
            balance_after: Amount(1_000),
            time_ms: 1_700_000_000_000,
            reference: 70,
            binding: Mac([0; 16]),
            other_card: CardId(0),
            key_version: KeyVersion(1),
            hotlist_version: 0,
            hotlist_change: HotlistChange::None,
            extra: 1_000,
            terminal: "counter-1".into(),
            prev_pos: Pos::NONE,
            transit: Transit::NONE,
            product: None,
            numbered: Numbered::NONE,
        };
        let mut v2 = Vec::new();
        issue.encode(&mut v2);
        assert_eq!((v2[0], v2.len()), (ENTRY_VERSION, FIXED_LEN + 9));
        let after = CardProduct { id: 1, deposit: Amount(2_000), daily: Daily::NONE };
        let with_product = Entry {
            product: Some(ProductFields { deposit_paid: 2_000, ..ProductFields::state(after) }),
            ..issue.clone()
        };
        assert_eq!(with_product.check(), Ok(()));
        let mut v4 = Vec::new();
        with_product.encode(&mut v4);
        assert_eq!(v4[0], ENTRY_VERSION_PRODUCT);
        assert_eq!(v4.len(), FIXED_LEN + Transit::LEN + ProductFields::LEN + 9);
        assert_eq!(Entry::decode(&v4).ok(), Some(with_product.clone()));
        // Version 2 and 3 bytes stay readable as they were; a cut version 4 record is refused.
        assert_eq!(Entry::decode(&v2).ok(), Some(issue.clone()));
        assert!(Entry::decode(&v4[..v4.len() - 1]).is_err());
        // A product id beyond the table, or a deposit moved by a purchase, breaks a rule.
        let mut beyond = v4.clone();
        beyond[FIXED_LEN - 1 + Transit::LEN] = 200;
        assert!(Entry::decode(&beyond).is_err());
        let purchase = Entry {
            kind: EntryKind::Purchase,
            atc: Atc(3),
            amount: Amount(-5),
            extra: 5,
            ..with_product
        };
        assert!(purchase.check().is_err());
    }
}
