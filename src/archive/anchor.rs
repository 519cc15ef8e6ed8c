//! The signed anchor a prune leaves per shard: where the removed records ended on the hash
//! chain, the state of every card and the hotlist at that point, and the money of every day
//! removed, so that what remains still verifies and still reconciles.
//!
//! # File `shard-N/anchor`
//!
//! Written crash-safely (temp file, fsync, rename, fsync of the directory) before any segment
//! is removed. Integers little-endian; money in signed minor units.
//!
//! | size | field |
//! |---:|---|
//! | 8 | magic `b"CITYANCR"` |
//! | 4 | format version, 3 (2: the same without the numbered seq table; 1: without either table; both still read) |
//! | 2 | shard index |
//! | 2 | shard count |
//! | 8 | `seq`: the last removed record; records `1..=seq` are gone |
//! | 32 | hash of record `seq` (the `prev_hash` of record `seq + 1`) |
//! | 8 | `before_days`: the `--before` date of the prune (days since 1970-01-01) |
//! | 8 | `created_ms`: when the prune wrote it |
//! | 8 | the shard's hotlist version at `seq` (the highest any record up to it created) |
//! | 4 | number of days `D`, then `D` × 80 bytes: day (i64), records (u64), deposits, top-ups, purchases, offline, refunds, replaced (i64 magnitudes), balance change (i64: the sum of the approved amounts, a replacement counting 0) |
//! | 4 | number of cards `C`, then per card: card id (u64), the card record's length (u8) and the record in the derived state's compact encoding (6 to 36 bytes), the late-ATC window bitmap (u64: bit i = ATC `last_atc - i` used) |
//! | 4 | number of hotlist entries `H`, then `H` × 18 bytes: hotlist version (u64), card id (u64), listed (u8: 1 listed, 0 unlisted), reason (u8): each card's latest hotlist change up to `seq` |
//! | 4 | (version 2) number of terminals `T`, then per terminal: name length (u8, 1..=255), the name (UTF-8), number of op_refs `N` (u32), then `N` ascending op_refs as LEB128 deltas (the first from 0, each later one from the one before it, never 0): every (terminal, op_ref) a removed staff record used |
//! | 4 | (version 3) the numbered seq table, in the staff op_ref table's form: per terminal, every terminal_seq a removed numbered offline record was recorded under (PROTOCOL.md 6.13; SeqConflict refusals claim none) |
//! | 64 | Ed25519 signature over [`SIGNATURE_CONTEXT`] followed by every byte before it |
//!
//! # Why every staff op_ref is kept
//!
//! (terminal, op_ref) is exactly-once (PROTOCOL.md 6.2). A state rebuilt from the anchor has no
//! record of the removed staff operations, so without this table a retry (or a reuse) of a
//! pruned op_ref would be executed as new: a second card issued, a card blocked twice. The
//! table keeps exactly which op_refs were used, and a rebuilt state marks each as used with its
//! record pruned, which answers ReferenceReused, the answer a state that survived the prune
//! gives too (its index points into a removed segment). Kept forever, like the cards: it costs
//! about 1 to 3 bytes per operation for terminals that count their op_refs (a few per card over
//! a card's life), 9 for terminals that draw them at random; a bounded window would instead
//! execute an old retry twice, which is the one thing the op_ref exists to prevent.
//!
//! The numbered seq table is kept for the same reason: a seq is recorded once per terminal
//! (PROTOCOL.md 6.13), and a rebuilt state without it would decide a re-upload of a pruned
//! record again (Replay by its ATC, never charged twice, but recorded as a second refusal) and
//! report a lower `highest_seq` to a reader resuming after a reset. Readers count their seqs, so
//! it costs about one byte per numbered record.
//!
//! # Why this key
//!
//! The anchor is signed with the server's Ed25519 assertion key (`keys/assertion.key`), the
//! key that already signs settlement reports for the same auditors, under its own context
//! string so neither signature can stand for the other. A public-key signature and not an
//! HMAC: whoever checks an anchor (`citycard verify`, an auditor with `assertion.pub`) must not
//! be able to forge one, and an HMAC key that can check can also sign.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use citycard_protocol::{BlockReason, CardId};
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};

use crate::engine::state::CardRecord;
use crate::engine::store::codec;
use crate::journal::RecordHash;

/// File name of a shard's anchor, next to its checkpoint.
pub const ANCHOR_FILE: &str = "anchor";
/// Domain separation: the Ed25519 message is this followed by the anchor's bytes.
pub const SIGNATURE_CONTEXT: &[u8] = b"citycard prune anchor v1\n";
const MAGIC: &[u8; 8] = b"CITYANCR";
const VERSION: u32 = 3;
/// The version before the numbered seq table, still read (its table is empty).
const VERSION_WITHOUT_SEQS: u32 = 2;
/// The version before the staff op_ref table, still read (both tables empty).
const VERSION_WITHOUT_STAFF_REFS: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 2 + 2 + 8 + 32 + 8 + 8 + 8;
const DAY_LEN: usize = 80;
/// Most bytes one card takes in the anchor: id, record length, record, recent-ATC bitmap.
const CARD_LEN: usize = 8 + 1 + codec::MAX_LEN + 8;
const HOTLIST_LEN: usize = 18;
const SIGNATURE_LEN: usize = 64;
/// Largest anchor file read: 64 million cards per shard at 60 bytes, far above what one
/// shard holds, so a damaged length field cannot make a reader allocate without bound.
pub const ANCHOR_BYTES_MAX: u64 = 4 << 30;

/// The money of one UTC day among the removed records, in the settlement report's terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayFlows {
    pub records: u64,
    pub deposits: i64,
    pub top_ups: i64,
    pub purchases: i64,
    pub offline: i64,
    pub refunds: i64,
    /// Moved between cards by replacements (not part of the net).
    pub replaced: i64,
    /// Sum of the approved amounts (a replacement counting 0): how the sum of all balances
    /// changed through the day's records.
    pub balance_change: i64,
}

impl DayFlows {
    /// `deposits + top_ups - purchases - offline - refunds`.
    pub fn net(&self) -> i64 {
        self.deposits + self.top_ups - self.purchases - self.offline - self.refunds
    }

    pub fn add(&mut self, other: &DayFlows) {
        self.records += other.records;
        self.deposits += other.deposits;
        self.top_ups += other.top_ups;
        self.purchases += other.purchases;
        self.offline += other.offline;
        self.refunds += other.refunds;
        self.replaced += other.replaced;
        self.balance_change += other.balance_change;
    }
}

/// A card's state at the anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnchorCard {
    pub record: CardRecord,
    /// Bit i set: ATC `last_atc - i` was used (the late-ATC window).
    pub recent_atcs: u64,
}

/// What a prune keeps of the records it removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub shard: u16,
    pub shard_count: u16,
    pub seq: u64,
    pub hash: RecordHash,
    pub before_days: i64,
    pub created_ms: u64,
    /// The highest hotlist version created up to `seq`: a state rebuilt from the anchor goes on
    /// from it, so no terminal's cursor is ever handed a version twice.
    pub hotlist_version: u64,
    /// By day (days since 1970-01-01, UTC).
    pub days: BTreeMap<i64, DayFlows>,
    pub cards: BTreeMap<CardId, AnchorCard>,
    /// The latest hotlist change of every card ever listed up to `seq`: its version, whether
    /// it listed the card, and the reason.
    pub hotlist: BTreeMap<CardId, (u64, bool, BlockReason)>,
    /// Every op_ref a staff record up to `seq` used, per terminal, ascending and without
    /// repeats (see "Why every staff op_ref is kept"). Empty in a version 1 anchor.
    pub staff_refs: BTreeMap<String, Vec<u64>>,
    /// Every terminal_seq a numbered offline record up to `seq` was recorded under, per
    /// terminal, ascending and without repeats. Empty in a version 1 or 2 anchor.
    pub numbered_seqs: BTreeMap<String, Vec<u64>>,
}

/// Why an anchor cannot be used.
#[derive(thiserror::Error, Debug)]
pub enum AnchorError {
    #[error("anchor {} unreadable: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("anchor {} is malformed: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "anchor {}: the signature does not match (altered, or signed by another key)",
        path.display()
    )]
    BadSignature { path: PathBuf },
}

impl Anchor {
    /// The journal's view of it: where the remaining chain must link.
    pub fn link(&self) -> crate::journal::Anchor {
        crate::journal::Anchor { seq: self.seq, hash: self.hash }
    }

    /// All removed days' flows together.
    pub fn totals(&self) -> DayFlows {
        let mut total = DayFlows::default();
        for day in self.days.values() {
            total.add(day);
        }
        total
    }

    /// Sum of the cards' balances at the anchor.
    pub fn balances(&self) -> i64 {
        self.cards.values().map(|c| c.record.balance.0).sum()
    }

    /// The signed bytes of the anchor.
    pub fn to_signed_bytes(&self, key: &Ed25519KeyPair) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN
                + 12
                + self.days.len() * DAY_LEN
                + self.cards.len() * CARD_LEN
                + self.hotlist.len() * HOTLIST_LEN
                + 8
                + (self.staff_refs.len() + self.numbered_seqs.len()) * (1 + 255 + 4)
                + (self.staff_ref_count() + self.numbered_seq_count()) * 3
                + SIGNATURE_LEN,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.shard.to_le_bytes());
        out.extend_from_slice(&self.shard_count.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.before_days.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&self.hotlist_version.to_le_bytes());
        // Counts fit in u32: a shard holds far fewer cards (see ANCHOR_BYTES_MAX).
        out.extend_from_slice(&(self.days.len() as u32).to_le_bytes());
        for (day, f) in &self.days {
            out.extend_from_slice(&day.to_le_bytes());
            out.extend_from_slice(&f.records.to_le_bytes());
            for v in [
                f.deposits,
                f.top_ups,
                f.purchases,
                f.offline,
                f.refunds,
                f.replaced,
                f.balance_change,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.cards.len() as u32).to_le_bytes());
        for (id, card) in &self.cards {
            out.extend_from_slice(&id.0.to_le_bytes());
            // The card record in the state's compact encoding, after its length.
            let record = codec::encode(&card.record);
            out.push(record.len() as u8);
            out.extend_from_slice(&record);
            out.extend_from_slice(&card.recent_atcs.to_le_bytes());
        }
        out.extend_from_slice(&(self.hotlist.len() as u32).to_le_bytes());
        for (id, (version, listed, reason)) in &self.hotlist {
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&id.0.to_le_bytes());
            out.push(u8::from(*listed));
            out.push(*reason as u8);
        }
        put_terminal_table(&mut out, &self.staff_refs);
        put_terminal_table(&mut out, &self.numbered_seqs);
        let signature = key.sign(&signed_message(&out));
        out.extend_from_slice(signature.as_ref());
        out
    }

    /// Parses and checks an anchor's bytes against the assertion public key.
    pub fn from_signed_bytes(
        bytes: &[u8],
        public_key: &[u8; 32],
        path: &Path,
    ) -> Result<Anchor, AnchorError> {
        let bad = |reason: &str| AnchorError::Malformed {
            path: path.to_path_buf(),
            reason: reason.to_owned(),
        };
        if bytes.len() < HEADER_LEN + 12 + SIGNATURE_LEN {
            return Err(bad("too short"));
        }
        let (body, signature) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&signed_message(body), signature)
            .map_err(|_| AnchorError::BadSignature { path: path.to_path_buf() })?;
        // Signed by our key: what follows can only fail on a bug, but is still checked.
        let mut r = Reader { bytes: body, at: 0 };
        if r.take(8) != Some(&MAGIC[..]) {
            return Err(bad("not an anchor file"));
        }
        let version = r.u32();
        let Some(version @ (VERSION | VERSION_WITHOUT_SEQS | VERSION_WITHOUT_STAFF_REFS)) = version
        else {
            return Err(bad("unknown format version"));
        };
        let header = (|| {
            let shard = r.u16()?;
            let shard_count = r.u16()?;
            let seq = r.u64()?;
            let hash: RecordHash = r.take(32)?.try_into().ok()?;
            let before_days = r.u64()? as i64;
            let created_ms = r.u64()?;
            let hotlist_version = r.u64()?;
            Some((shard, shard_count, seq, hash, before_days, created_ms, hotlist_version))
        })();
        let Some((shard, shard_count, seq, hash, before_days, created_ms, hotlist_version)) =
            header
        else {
            return Err(bad("header cut short"));
        };
        let mut anchor = Anchor {
            shard,
            shard_count,
            seq,
            hash,
            before_days,
            created_ms,
            hotlist_version,
            days: BTreeMap::new(),
            cards: BTreeMap::new(),
            hotlist: BTreeMap::new(),
            staff_refs: BTreeMap::new(),
            numbered_seqs: BTreeMap::new(),
        };
        let days = r.u32().ok_or_else(|| bad("day count"))?;
        for _ in 0..days {
            let day = (|| {
                let day = r.u64()? as i64;
                let records = r.u64()?;
                let mut v = [0i64; 7];
                for slot in &mut v {
                    *slot = r.u64()? as i64;
                }
                let [deposits, top_ups, purchases, offline, refunds, replaced, balance_change] = v;
                let flows = DayFlows {
                    records,
                    deposits,
                    top_ups,
                    purchases,
                    offline,
                    refunds,
                    replaced,
                    balance_change,
                };
                Some((day, flows))
            })()
            .ok_or_else(|| bad("day table cut short"))?;
            anchor.days.insert(day.0, day.1);
        }
        let cards = r.u32().ok_or_else(|| bad("card count"))?;
        for _ in 0..cards {
            let card = (|| {
                let id = CardId(r.u64()?);
                let len = usize::from(r.take(1)?[0]);
                let record = codec::decode(r.take(len)?).ok()?;
                let recent_atcs = r.u64()?;
                Some((id, AnchorCard { record, recent_atcs }))
            })()
            .ok_or_else(|| bad("card table malformed"))?;
            anchor.cards.insert(card.0, card.1);
        }
        let listed = r.u32().ok_or_else(|| bad("hotlist count"))?;
        for _ in 0..listed {
            let entry = (|| {
                let version = r.u64()?;
                let id = CardId(r.u64()?);
                let listed = match r.take(1)?.first()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let reason = BlockReason::from_u8(*r.take(1)?.first()?)?;
                Some((id, (version, listed, reason)))
            })()
            .ok_or_else(|| bad("hotlist table malformed"))?;
            anchor.hotlist.insert(entry.0, entry.1);
        }
        if version >= VERSION_WITHOUT_SEQS {
            anchor.staff_refs =
                read_terminal_table(&mut r).ok_or_else(|| bad("staff op_ref table malformed"))?;
        }
        if version >= VERSION {
            anchor.numbered_seqs =
                read_terminal_table(&mut r).ok_or_else(|| bad("numbered seq table malformed"))?;
        }
        if r.at != body.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(anchor)
    }

    /// The shard's anchor, `Ok(None)` when it was never pruned.
    pub fn load(shard_dir: &Path, public_key: &[u8; 32]) -> Result<Option<Anchor>, AnchorError> {
        Anchor::load_file(&shard_dir.join(ANCHOR_FILE), public_key)
    }

    /// [`Anchor::load`] from a file anywhere (an anchor copied beside an archive).
    pub fn load_file(path: &Path, public_key: &[u8; 32]) -> Result<Option<Anchor>, AnchorError> {
        let path = path.to_path_buf();
        let io = |source| AnchorError::Io { path: path.clone(), source };
        let len = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if len > ANCHOR_BYTES_MAX {
            return Err(AnchorError::Malformed {
                path: path.clone(),
                reason: format!("{len} bytes, more than the {ANCHOR_BYTES_MAX} an anchor may have"),
            });
        }
        let bytes = std::fs::read(&path).map_err(io)?;
        Anchor::from_signed_bytes(&bytes, public_key, &path).map(Some)
    }

    /// Whether the shard has an anchor file at all (without checking it).
    pub fn exists(shard_dir: &Path) -> bool {
        shard_dir.join(ANCHOR_FILE).exists()
    }

    /// Writes the anchor crash-safely: after a crash the file holds the old or the new one.
    pub fn store(&self, shard_dir: &Path, key: &Ed25519KeyPair) -> std::io::Result<()> {
        crate::durable_write(&shard_dir.join(ANCHOR_FILE), &self.to_signed_bytes(key))
    }

    /// Whether the staff op_ref and numbered seq tables can be written as the format says:
    /// every terminal id 1 to 255 bytes, every list ascending without repeats, and (seqs) none
    /// 0. Checked by a prune before it writes.
    pub fn check_tables(&self) -> Result<(), String> {
        check_terminal_table(&self.staff_refs, "op_refs")?;
        check_terminal_table(&self.numbered_seqs, "numbered seqs")?;
        if self.numbered_seqs.values().any(|seqs| seqs.first() == Some(&0)) {
            return Err("a numbered seq 0".into());
        }
        Ok(())
    }

    /// Number of (terminal, op_ref) pairs in the staff op_ref table.
    pub fn staff_ref_count(&self) -> usize {
        self.staff_refs.values().map(Vec::len).sum()
    }

    /// Number of (terminal, seq) pairs in the numbered seq table.
    pub fn numbered_seq_count(&self) -> usize {
        self.numbered_seqs.values().map(Vec::len).sum()
    }
}

fn check_terminal_table(table: &BTreeMap<String, Vec<u64>>, what: &str) -> Result<(), String> {
    for (terminal, values) in table {
        if terminal.is_empty() || terminal.len() > usize::from(u8::MAX) {
            return Err(format!("terminal id of {} bytes", terminal.len()));
        }
        if values.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("{what} of terminal {terminal} not ascending"));
        }
        if u32::try_from(values.len()).is_err() {
            return Err(format!("more than {} {what} for terminal {terminal}", u32::MAX));
        }
    }
    Ok(())
}

/// A per-terminal table of ascending u64s (staff op_refs, numbered seqs): terminal count,
/// then per terminal its name after its length, the count, and LEB128 deltas.
fn put_terminal_table(out: &mut Vec<u8>, table: &BTreeMap<String, Vec<u64>>) {
    out.extend_from_slice(&(table.len() as u32).to_le_bytes());
    for (terminal, values) in table {
        // Terminal ids are at most 255 bytes (the index keys store the length in one byte,
        // and certificates name shorter ones); `check_tables` refuses others.
        out.push(terminal.len() as u8);
        out.extend_from_slice(terminal.as_bytes());
        out.extend_from_slice(&(values.len() as u32).to_le_bytes());
        let mut prev = 0u64;
        for value in values {
            put_leb128(out, value - prev);
            prev = *value;
        }
    }
}

fn read_terminal_table(r: &mut Reader<'_>) -> Option<BTreeMap<String, Vec<u64>>> {
    let terminals = r.u32()?;
    let mut table = BTreeMap::new();
    for _ in 0..terminals {
        let (terminal, values) = read_terminal_entry(r)?;
        if table.insert(terminal, values).is_some() {
            // A terminal twice.
            return None;
        }
    }
    Some(table)
}

/// One terminal's entry of a per-terminal table.
fn read_terminal_entry(r: &mut Reader<'_>) -> Option<(String, Vec<u64>)> {
    let len = usize::from(*r.take(1)?.first()?);
    if len == 0 {
        return None;
    }
    let terminal = std::str::from_utf8(r.take(len)?).ok()?.to_owned();
    let count = usize::try_from(r.u32()?).ok()?;
    // Each value takes at least one byte: a count beyond the bytes left is damage, and must
    // not size an allocation.
    if count > r.bytes.len() - r.at {
        return None;
    }
    let mut values = Vec::with_capacity(count);
    let mut prev = 0u64;
    for k in 0..count {
        let delta = r.leb128()?;
        if k > 0 && delta == 0 {
            return None;
        }
        prev = prev.checked_add(delta)?;
        values.push(prev);
    }
    Some((terminal, values))
}

fn put_leb128(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + body.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(body);
    message
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// An unsigned LEB128 of at most 10 bytes, in its shortest form.
    fn leb128(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10u32 {
            let b = *self.take(1)?.first()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return None;
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                // A trailing zero byte would be a second spelling of the same number.
                if i > 0 && b == 0 {
                    return None;
                }
                return Some(v);
            }
        }
        None
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use citycard_protocol::{Amount, Atc, CardState, KeyVersion};
    use ring::rand::SystemRandom;

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn sample() -> Anchor {
        let record = CardRecord {
            state: CardState::Blocked,
            block_reason: BlockReason::Stolen,
            balance: Amount(-40),
            last_atc: Atc(9),
            key_version: KeyVersion(2),
            last_pos: crate::journal::Pos { segment: 1, offset: 96 },
            hold: crate::engine::decide::transit::Hold::NONE,
            product: crate::engine::product::CardProduct::DEFAULT,
        };
        let id = CardId(6_000_000_000_000_002);
        Anchor {
            shard: 1,
            shard_count: 2,
            seq: 42,
            hash: [7; 32],
            before_days: 20_000,
            created_ms: 1,
            hotlist_version: 4,
            days: BTreeMap::from([(
                19_999,
                DayFlows { records: 42, deposits: 10, ..Default::default() },
            )]),
            cards: BTreeMap::from([(id, AnchorCard { record, recent_atcs: 0b101 })]),
            hotlist: BTreeMap::from([(id, (3, true, BlockReason::Stolen))]),
            staff_refs: BTreeMap::from([
                ("counter-1".to_owned(), vec![0, 1, 2, 130, 20_000, u64::MAX]),
                ("counter-two".to_owned(), vec![7]),
            ]),
            numbered_seqs: BTreeMap::from([("reader-1".to_owned(), vec![1, 2, 3, 5, 300])]),
        }
    }

    #[test]
    fn round_trips_and_any_flipped_bit_is_refused() {
        let key = key();
        let public: [u8; 32] =
            ring::signature::KeyPair::public_key(&key).as_ref().try_into().unwrap();
        let anchor = sample();
        let bytes = anchor.to_signed_bytes(&key);
        let path = Path::new("anchor");
        assert_eq!(Anchor::from_signed_bytes(&bytes, &public, path).unwrap(), anchor);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(Anchor::from_signed_bytes(&bad, &public, path).is_err(), "flip at {i}");
        }
        assert!(Anchor::from_signed_bytes(&bytes[..bytes.len() - 1], &public, path).is_err());
        let other = key_public(&self::key());
        assert!(matches!(
            Anchor::from_signed_bytes(&bytes, &other, path),
            Err(AnchorError::BadSignature { .. })
        ));
    }

    /// Anchors of versions 1 (before the staff op_ref table) and 2 (before the numbered seq
    /// table) are still read, with those tables empty.
    #[test]
    fn version_1_and_2_anchors_still_read() {
        let key = key();
        let public = key_public(&key);
        // An older version is version 3 without the newer tables' counts (4 zero bytes each
        // before the signature), signed again.
        let older = |anchor: &Anchor, version: u32, tables: usize| {
            let v3 = anchor.to_signed_bytes(&key);
            let mut body = v3[..v3.len() - SIGNATURE_LEN - 4 * tables].to_vec();
            body[8..12].copy_from_slice(&version.to_le_bytes());
            let signature = key.sign(&signed_message(&body));
            body.extend_from_slice(signature.as_ref());
            Anchor::from_signed_bytes(&body, &public, Path::new("anchor")).unwrap()
        };
        let mut anchor = sample();
        anchor.numbered_seqs.clear();
        assert_eq!(older(&anchor, VERSION_WITHOUT_SEQS, 1), anchor);
        anchor.staff_refs.clear();
        let read = older(&anchor, VERSION_WITHOUT_STAFF_REFS, 2);
        assert_eq!(read, anchor);
        assert_eq!((read.staff_ref_count(), read.numbered_seq_count()), (0, 0));
    }

    #[test]
    fn malformed_staff_refs_and_seqs_are_refused() {
        let mut anchor = sample();
        assert_eq!(anchor.check_tables(), Ok(()));
        anchor.staff_refs.insert("counter-3".into(), vec![5, 5]);
        assert!(anchor.check_tables().is_err());
        anchor.staff_refs.insert("counter-3".into(), vec![]);
        anchor.staff_refs.insert("x".repeat(256), vec![1]);
        assert!(anchor.check_tables().is_err());
        let mut anchor = sample();
        anchor.numbered_seqs.insert("reader-2".into(), vec![0, 1]);
        assert!(anchor.check_tables().is_err(), "seqs start at 1");
        anchor.numbered_seqs.insert("reader-2".into(), vec![2, 1]);
        assert!(anchor.check_tables().is_err());
        // A non-shortest LEB128 (a second spelling of an op_ref) is refused on read.
        let mut r = Reader { bytes: &[0x81, 0x00], at: 0 };
        assert_eq!(r.leb128(), None);
        let mut r = Reader { bytes: &[0xff; 10], at: 0 };
        assert_eq!(r.leb128(), None);
        let mut r = Reader { bytes: &[0x80, 0x01], at: 0 };
        assert_eq!(r.leb128(), Some(128));
    }

    fn key_public(key: &Ed25519KeyPair) -> [u8; 32] {
        ring::signature::KeyPair::public_key(key).as_ref().try_into().unwrap()
    }
}
