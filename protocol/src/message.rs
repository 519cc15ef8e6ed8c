//! Request and response types and their body encodings (all integers big-endian).

use bytes::{BufMut, BytesMut};

use crate::frame::{
    decode_frame, put_header, DecodeError, EncodeError, Frame, MessageType, RequestId,
    BODY_LEN_OFFSET, HEADER_LEN, MAX_BODY_LEN,
};

/// Card number. Only the last four digits may appear in logs (see [`CardId::masked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CardId(pub u64);

impl CardId {
    /// The form allowed in logs: `****1234`.
    pub fn masked(self) -> String {
        format!("****{:04}", self.0 % 10_000)
    }
}

/// Money in minor currency units (cents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Amount(pub i64);

/// The card's application transaction counter, incremented by the card for every transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Atc(pub u32);

/// Issuer master key version a card's key is derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct KeyVersion(pub u16);

/// Truncated HMAC-SHA256 tag (16 bytes): request cryptograms, response cryptograms and offline
/// certificates. Its Debug form hides the bytes so it cannot leak into logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 16]);

impl std::fmt::Debug for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mac(..)")
    }
}

/// Most offline records one upload may carry: bounds the frame (256 x 52 bytes) and the work one
/// request can queue on the shards.
pub const MAX_OFFLINE_RECORDS: usize = 256;
/// Most history entries in one page: 64 x 38 bytes keeps the answer small and the sled scan short.
pub const MAX_HISTORY_PAGE: usize = 64;
/// Most hotlist entries in one sync answer (18 bytes each).
pub const MAX_HOTLIST_ENTRIES: usize = 1024;
/// Most shards a hotlist cursor can describe; also the server's shard limit.
pub const MAX_SHARDS: usize = 64;
/// Longest error message text in bytes.
pub const MAX_ERROR_MESSAGE: usize = 256;
/// How far below a card's last ATC an online card request may still come, as long as that
/// (card, ATC) was never used (PROTOCOL.md 6.1, "late ATCs"). A request answered Busy or
/// Unavailable was not done, so its ATC must stay usable after later ATCs of the same card were
/// decided (pipelined on the same connection, or sent from another terminal). 64 covers a full
/// in-flight window of one connection (`max_in_flight`) and keeps the set of ATCs the server must
/// remember per card small and fixed.
pub const ATC_LATE_WINDOW: u32 = 64;
/// Longest original answer an InquiryResult embeds: the largest answer of a consuming card
/// request is an IdentityResult (117 bytes); 128 bounds the decoder's allocation.
pub const MAX_INQUIRY_ANSWER: usize = 128;

/// Result of a card or staff operation (one byte on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Approved = 0,
    /// No such card.
    UnknownCard = 1,
    /// The card is on the hotlist (blocked by staff, or overdrawn offline until topped up).
    CardBlocked = 2,
    /// The card was closed or replaced; it never works again.
    CardClosed = 3,
    /// The request cryptogram or offline certificate did not verify.
    BadCryptogram = 4,
    /// The ATC was already used by a different request, or is not above the last one.
    Replay = 5,
    InsufficientFunds = 6,
    /// The balance would exceed the configured maximum.
    OverBalanceCap = 7,
    /// The terminal's role may not perform this operation.
    NotPermitted = 8,
    /// The amount is zero, negative or above the per-transaction limit.
    InvalidAmount = 9,
    /// The shard's queue is full; retry later with the same request.
    Busy = 10,
    /// The card's key version is past its cut-off; the card must be replaced.
    KeyVersionRetired = 11,
    /// The operation reference was already used by this terminal for a different request.
    ReferenceReused = 12,
    /// The operation does not apply to the card's state (unblock of a card not blocked, ...).
    InvalidState = 13,
    /// The server is shutting down; retry with the same request elsewhere or later.
    Unavailable = 14,
    /// Protocol 1.2. A tap-out for a card without an open hold (never tapped in, already tapped
    /// out, or the hold expired and was settled at the missing tap-out fare).
    NoOpenHold = 15,
    /// Protocol 1.2. A tap-in for a card that already has an open hold.
    HoldExists = 16,
    /// Protocol 1.2. Inquiry: the request was never executed, and now never will be (its ATC is
    /// burnt). Reversal: no approved purchase of this terminal at that ATC.
    NotFound = 17,
    /// Protocol 1.2. The purchase is older than the reversal window.
    ReversalWindowClosed = 18,
    /// Protocol 1.2. The purchase was already reversed by another reversal.
    AlreadyReversed = 19,
    /// Protocol 1.2. Only in history entries: an approved purchase that was later reversed.
    Reversed = 20,
    /// History: the entries asked for are older than the server's online history retention
    /// (protocol 1.2, PROTOCOL.md 6.1); the operator's archive and settlement reports hold them.
    BeyondRetention = 21,
    /// Protocol 1.3. The balance would exceed the maximum balance of the card's product (below
    /// the server's cap, which stays OverBalanceCap).
    BalanceLimit = 22,
    /// Protocol 1.3. The amount is above the per-transaction maximum of the card's product
    /// (within the server's, which stays InvalidAmount).
    TransactionLimit = 23,
    /// Protocol 1.3. The card's product allows no more money spent online today (UTC day).
    DailyAmountLimit = 24,
    /// Protocol 1.3. The card's product allows no more online debits today (UTC day).
    DailyCountLimit = 25,
    /// Protocol 1.3. Issue or SetProduct named a product id the server's table does not have.
    UnknownProduct = 26,
    /// Protocol 1.3 (numbered offline uploads). This terminal already uploaded a different
    /// record under this `terminal_seq`; the record was not decided (PROTOCOL.md 6.13).
    SeqConflict = 28,
}

impl Status {
    pub fn from_u8(value: u8) -> Option<Self> {
        use Status::*;
        Some(match value {
            0 => Approved,
            1 => UnknownCard,
            2 => CardBlocked,
            3 => CardClosed,
            4 => BadCryptogram,
            5 => Replay,
            6 => InsufficientFunds,
            7 => OverBalanceCap,
            8 => NotPermitted,
            9 => InvalidAmount,
            10 => Busy,
            11 => KeyVersionRetired,
            12 => ReferenceReused,
            13 => InvalidState,
            14 => Unavailable,
            15 => NoOpenHold,
            16 => HoldExists,
            17 => NotFound,
            18 => ReversalWindowClosed,
            19 => AlreadyReversed,
            20 => Reversed,
            21 => BeyondRetention,
            22 => BalanceLimit,
            23 => TransactionLimit,
            24 => DailyAmountLimit,
            25 => DailyCountLimit,
            26 => UnknownProduct,
            28 => SeqConflict,
            _ => return None,
        })
    }

    /// Every status, for reports and exhaustive tests.
    pub const ALL: [Status; 28] = [
        Status::Approved,
        Status::UnknownCard,
        Status::CardBlocked,
        Status::CardClosed,
        Status::BadCryptogram,
        Status::Replay,
        Status::InsufficientFunds,
        Status::OverBalanceCap,
        Status::NotPermitted,
        Status::InvalidAmount,
        Status::Busy,
        Status::KeyVersionRetired,
        Status::ReferenceReused,
        Status::InvalidState,
        Status::Unavailable,
        Status::NoOpenHold,
        Status::HoldExists,
        Status::NotFound,
        Status::ReversalWindowClosed,
        Status::AlreadyReversed,
        Status::Reversed,
        Status::BeyondRetention,
        Status::BalanceLimit,
        Status::TransactionLimit,
        Status::DailyAmountLimit,
        Status::DailyCountLimit,
        Status::UnknownProduct,
        Status::SeqConflict,
    ];
}

/// A card's lifecycle state as reported to counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CardState {
    Active = 0,
    /// Blocked by staff (lost, stolen, ...); can be unblocked.
    Blocked = 1,
    /// Closed with refund; permanent.
    Closed = 2,
    /// Replaced by another card; permanent.
    Replaced = 3,
    /// Negative balance after offline use: on the hotlist until topped up.
    Overdrawn = 4,
}

impl CardState {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => CardState::Active,
            1 => CardState::Blocked,
            2 => CardState::Closed,
            3 => CardState::Replaced,
            4 => CardState::Overdrawn,
            _ => return None,
        })
    }
}

/// Why staff blocked a card, and why a card is on the hotlist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockReason {
    Lost = 1,
    Stolen = 2,
    Damaged = 3,
    FraudSuspected = 4,
    Other = 5,
    /// Set by the server: negative balance after an offline upload.
    Overdrawn = 6,
    /// Set by the server: the card was closed or replaced.
    Retired = 7,
}

impl BlockReason {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => BlockReason::Lost,
            2 => BlockReason::Stolen,
            3 => BlockReason::Damaged,
            4 => BlockReason::FraudSuspected,
            5 => BlockReason::Other,
            6 => BlockReason::Overdrawn,
            7 => BlockReason::Retired,
            _ => return None,
        })
    }
}

/// What a history entry (and a journal record) records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    Issue = 1,
    Purchase = 2,
    TopUp = 3,
    Identity = 4,
    Block = 5,
    Unblock = 6,
    /// On the old card: its balance moved to the replacement.
    ReplacedOut = 7,
    /// On the new card: the balance it received.
    ReplacedIn = 8,
    Close = 9,
    Offline = 10,
    /// Protocol 1.2: a hold placed at an entry gate (amount 0: the balance is unchanged).
    TapIn = 11,
    /// Protocol 1.2: a hold completed at an exit gate (amount = minus the fare).
    TapOut = 12,
    /// Protocol 1.2: a hold not completed in time, settled at the missing tap-out fare by the
    /// server (amount = minus that fare; ATC 0).
    HoldExpired = 13,
    /// Protocol 1.2: a purchase reversed by its terminal (amount = the refund).
    Reversal = 14,
    /// Protocol 1.2: an inquiry found nothing and burnt the ATC (amount 0, status NotFound).
    Inquiry = 15,
    /// Protocol 1.3: a counter changed the card's product (amount 0: the balance is unchanged;
    /// the deposit difference is paid or refunded apart from the balance).
    ProductChanged = 16,
}

impl EntryKind {
    pub fn from_u8(value: u8) -> Option<Self> {
        use EntryKind::*;
        Some(match value {
            1 => Issue,
            2 => Purchase,
            3 => TopUp,
            4 => Identity,
            5 => Block,
            6 => Unblock,
            7 => ReplacedOut,
            8 => ReplacedIn,
            9 => Close,
            10 => Offline,
            11 => TapIn,
            12 => TapOut,
            13 => HoldExpired,
            14 => Reversal,
            15 => Inquiry,
            16 => ProductChanged,
            _ => return None,
        })
    }
}

/// The part every card-authenticated request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardAuth {
    pub card_id: CardId,
    pub atc: Atc,
    /// Chosen by the terminal, fresh for each transaction.
    pub nonce: u64,
    /// Request cryptogram, see PROTOCOL.md "Request cryptogram".
    pub cryptogram: Mac,
}

/// One offline transaction as stored by a reader that had no connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfflineRecord {
    pub card_id: CardId,
    pub atc: Atc,
    /// Purchase amount, positive.
    pub amount: Amount,
    /// When the card was used, Unix milliseconds (terminal clock).
    pub time_ms: u64,
    pub nonce: u64,
    /// Offline transaction certificate, see PROTOCOL.md.
    pub certificate: Mac,
}

/// Protocol 1.3: `flags` bit 0 of a [`NumberedRecord`]: the reader is not sure the card
/// completed the transaction (the card left the field before the reader saw it finish).
pub const FLAG_UNCERTAIN: u8 = 0x01;

/// Protocol 1.3: an offline record with the number its terminal gave it (PROTOCOL.md 6.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumberedRecord {
    pub record: OfflineRecord,
    /// The terminal's own sequence number: per terminal, from 1, strictly increasing in the
    /// order the reader took its records.
    pub terminal_seq: u64,
    /// Bit 0: [`FLAG_UNCERTAIN`]; bits 1-7 must be zero.
    pub flags: u8,
}

/// Protocol 1.3: one numbered record's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NumberedResult {
    /// The record's `terminal_seq`, repeated.
    pub terminal_seq: u64,
    pub result: CardResult,
}

/// Protocol 1.3: the answer to a NumberedOfflineBatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumberedResults {
    /// The highest `terminal_seq` the server has recorded for this terminal after this batch
    /// (0: none yet).
    pub highest_seq: u64,
    /// One per record, in request order.
    pub results: Vec<NumberedResult>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello {
        client_time_ms: u64,
    },
    Purchase {
        auth: CardAuth,
        amount: Amount,
    },
    TopUp {
        auth: CardAuth,
        amount: Amount,
    },
    Balance {
        auth: CardAuth,
    },
    /// Entries with journal sequence below `before_seq` (0 = from the newest), newest first.
    History {
        auth: CardAuth,
        before_seq: u64,
        limit: u16,
    },
    Identity {
        auth: CardAuth,
    },
    Issue {
        op_ref: u64,
        deposit: Amount,
    },
    /// Protocol 1.3: an Issue with a product id (17-byte body). `deposit` keeps its meaning, the
    /// new card's initial balance; the product's card deposit is paid on top (PROTOCOL.md 6.12).
    IssueProduct {
        op_ref: u64,
        deposit: Amount,
        product: u8,
    },
    Block {
        op_ref: u64,
        card_id: CardId,
        reason: BlockReason,
    },
    Unblock {
        op_ref: u64,
        card_id: CardId,
    },
    Replace {
        op_ref: u64,
        card_id: CardId,
    },
    Close {
        op_ref: u64,
        card_id: CardId,
    },
    OfflineBatch {
        records: Vec<OfflineRecord>,
    },
    /// `cursor` is the one the previous answer returned (empty = from the beginning).
    HotlistSync {
        cursor: Vec<u64>,
        max_entries: u16,
    },
    /// Protocol 1.2: place a hold for the maximum fare at an entry gate.
    TapIn {
        auth: CardAuth,
    },
    /// Protocol 1.2: complete the card's open hold with the actual fare (at most the hold).
    TapOut {
        auth: CardAuth,
        fare: Amount,
    },
    /// Protocol 1.2: ask for the answer to an earlier request of this terminal. `auth` is that
    /// request's CardAuth, `original_type` and `amount` what its cryptogram covers.
    Inquiry {
        auth: CardAuth,
        original_type: MessageType,
        amount: Amount,
    },
    /// Protocol 1.2: reverse this terminal's approved purchase `original_atc` (whose request
    /// cryptogram was `original_cryptogram`) of `amount`.
    Reversal {
        auth: CardAuth,
        amount: Amount,
        original_atc: Atc,
        original_cryptogram: Mac,
    },
    /// Protocol 1.2: balance, holds and spendable balance.
    Funds {
        auth: CardAuth,
    },
    /// Protocol 1.3: Funds with a 37th byte of 1: answered with the card's product, deposit
    /// and today's counters besides the 1.2 fields (PROTOCOL.md 6.10, 6.12).
    FundsProduct {
        auth: CardAuth,
    },
    /// Protocol 1.3: a counter changes the card's product (PROTOCOL.md 6.12).
    SetProduct {
        op_ref: u64,
        card_id: CardId,
        product: u8,
    },
    /// Protocol 1.3: offline records numbered by their terminal (`terminal_seq` strictly
    /// increasing within the batch).
    NumberedOfflineBatch {
        records: Vec<NumberedRecord>,
    },
}

/// The request types an Inquiry may ask about: the consuming card requests.
pub const INQUIRABLE: [MessageType; 6] = [
    MessageType::Purchase,
    MessageType::TopUp,
    MessageType::Identity,
    MessageType::TapIn,
    MessageType::TapOut,
    MessageType::Reversal,
];

/// Protocol 1.2: the answer to TapIn, TapOut, Reversal and Funds (81 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransitResult {
    pub status: Status,
    pub card_id: CardId,
    pub atc: Atc,
    /// Balance after the operation (0 when the card was not authenticated).
    pub balance: Amount,
    /// TapIn: the hold placed. TapOut: the fare charged. Reversal: the refund. Funds: 0.
    pub amount: Amount,
    /// The card's open hold after the operation (0 when none).
    pub held: Amount,
    /// balance - held.
    pub spendable: Amount,
    /// TapOut: the ATC of the tap-in completed. Reversal: the purchase's ATC. Funds: the open
    /// hold's tap-in ATC. TapIn: 0.
    pub ref_atc: Atc,
    /// When the open hold (`held`) expires, server time in Unix ms; 0 when there is none (in
    /// every transit answer, as PROTOCOL.md 3.3 says).
    pub time_ms: u64,
    pub journal_seq: u64,
    pub mac: Mac,
}

/// Protocol 1.2: the answer to an Inquiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InquiryResult {
    pub status: Status,
    pub card_id: CardId,
    pub atc: Atc,
    /// The original answer, byte for byte as the original request got it (with its own MAC),
    /// when `status` is Approved; None otherwise.
    pub answer: Option<Box<Response>>,
    /// The journal sequence of the burn (NotFound) or 0.
    pub journal_seq: u64,
    pub mac: Mac,
}

/// Answer to a purchase, top-up or balance inquiry, and one offline record's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CardResult {
    pub status: Status,
    pub card_id: CardId,
    pub atc: Atc,
    /// Balance after the operation (the unchanged balance on an authenticated decline, 0 when
    /// the card could not be authenticated).
    pub balance: Amount,
    /// Journal sequence of the transaction; 0 when nothing was journaled.
    pub journal_seq: u64,
    pub mac: Mac,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub journal_seq: u64,
    pub kind: EntryKind,
    pub status: Status,
    /// Signed change of the balance (negative for purchases).
    pub amount: Amount,
    pub balance_after: Amount,
    pub time_ms: u64,
    /// The card's ATC for card transactions, 0 for staff operations.
    pub atc: Atc,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    pub status: Status,
    pub card_id: CardId,
    pub atc: Atc,
    pub balance: Amount,
    pub entries: Vec<HistoryEntry>,
    /// Pass as `before_seq` for the next page; 0 when there is none.
    pub next_before_seq: u64,
    pub mac: Mac,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityResult {
    pub status: Status,
    pub card_id: CardId,
    pub atc: Atc,
    pub journal_seq: u64,
    pub issued_ms: u64,
    pub expires_ms: u64,
    /// Ed25519 signature over the assertion bytes (zeros on a decline).
    pub signature: [u8; 64],
    pub mac: Mac,
}

/// Answer to issue and replace. The card key goes only to counter terminals, for
/// personalising the new card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssueResult {
    pub status: Status,
    pub card_id: CardId,
    pub key_version: KeyVersion,
    pub card_key: [u8; 32],
    pub balance: Amount,
    /// For replace: the card that was replaced; 0 for issue.
    pub replaced_card_id: CardId,
    pub journal_seq: u64,
    pub mac: Mac,
}

/// Protocol 1.3: the answer to a 37-byte Funds (102 bytes): the 1.2 FundsResult fields, then
/// the card's product, deposit and today's counters, then the MAC (in `funds.mac`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FundsProductResult {
    pub funds: TransitResult,
    /// The card's product (0 when the card was not authenticated).
    pub product: u8,
    /// The card deposit held for the card, apart from its balance.
    pub deposit: Amount,
    /// Money spent online today (UTC day) as the card's daily counters count it.
    pub spent_today: Amount,
    /// Online debits today (UTC day) as the card's daily counters count them.
    pub debits_today: u32,
}

/// Protocol 1.3: the answer to SetProduct (67 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProductResult {
    pub status: Status,
    pub card_id: CardId,
    /// The card's state after the operation (Active when the card is unknown).
    pub card_state: CardState,
    /// The card's product after the operation (on a decline: its product unchanged; 0 when the
    /// card is unknown).
    pub product: u8,
    pub balance: Amount,
    /// The card's deposit after the operation.
    pub deposit: Amount,
    /// Deposit money the clerk takes from the holder for this change (new deposit above old).
    pub deposit_paid: Amount,
    /// Deposit money the clerk pays out for this change (new deposit below old).
    pub deposit_refunded: Amount,
    pub journal_seq: u64,
    pub mac: Mac,
}

/// Answer to block, unblock and close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaffResult {
    pub status: Status,
    pub card_id: CardId,
    pub card_state: CardState,
    pub balance: Amount,
    /// Amount paid out by a close; 0 otherwise.
    pub refunded: Amount,
    /// The shard's hotlist version after the operation (0 when unchanged or declined).
    pub hotlist_version: u64,
    pub journal_seq: u64,
    pub mac: Mac,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HotlistEntry {
    pub card_id: CardId,
    /// True: deny this card. False: it was removed from the hotlist.
    pub listed: bool,
    pub reason: BlockReason,
    /// Version within the card's shard.
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotlistChanges {
    /// One version per shard; send it back on the next sync.
    pub cursor: Vec<u64>,
    /// True when more changes are waiting: sync again with the new cursor.
    pub more: bool,
    pub entries: Vec<HotlistEntry>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    pub protocol_version: u8,
    /// The role the server read from the terminal's certificate (1 reader, 2 kiosk, 3 counter).
    pub role: u8,
    pub server_time_ms: u64,
    /// Sum of all shards' hotlist versions: changes whenever the hotlist changes.
    pub hotlist_version: u64,
    pub shard_count: u16,
    pub max_in_flight: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    ServerInfo(ServerInfo),
    Purchase(CardResult),
    TopUp(CardResult),
    Balance(CardResult),
    History(HistoryPage),
    Identity(IdentityResult),
    Issue(IssueResult),
    Block(StaffResult),
    Unblock(StaffResult),
    Replace(IssueResult),
    Close(StaffResult),
    OfflineBatch(Vec<CardResult>),
    HotlistSync(HotlistChanges),
    TapIn(TransitResult),
    TapOut(TransitResult),
    Inquiry(InquiryResult),
    Reversal(TransitResult),
    Funds(TransitResult),
    SetProduct(ProductResult),
    /// Protocol 1.3: the answer to a 37-byte Funds (type FundsResult, 102-byte body).
    FundsProduct(FundsProductResult),
    NumberedOfflineBatch(NumberedResults),
    Error {
        code: u16,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Body reading.

/// A field value outside its domain; the request id is filled in from the frame header by
/// [`decode_request`], [`decode_response`] and [`frame_to_request`].
fn bad_value(field: &'static str, value: u64) -> DecodeError {
    DecodeError::BadValue { field, value, request_id: RequestId(0) }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    message_type: MessageType,
}

impl<'a> Reader<'a> {
    fn new(message_type: MessageType, data: &'a [u8]) -> Self {
        Reader { data, pos: 0, message_type }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.saturating_add(n);
        let Some(slice) = self.data.get(self.pos..end) else {
            return Err(DecodeError::BodyTooShort {
                message_type: self.message_type,
                needed: end,
                have: self.data.len(),
                request_id: RequestId(0),
            });
        };
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    fn card_id(&mut self) -> Result<CardId, DecodeError> {
        Ok(CardId(self.u64()?))
    }
    fn amount(&mut self) -> Result<Amount, DecodeError> {
        Ok(Amount(self.i64()?))
    }
    fn atc(&mut self) -> Result<Atc, DecodeError> {
        Ok(Atc(self.u32()?))
    }
    fn mac(&mut self) -> Result<Mac, DecodeError> {
        Ok(Mac(self.array()?))
    }
    fn status(&mut self) -> Result<Status, DecodeError> {
        let v = self.u8()?;
        Status::from_u8(v).ok_or(bad_value("status", v.into()))
    }

    /// A count field that must not exceed `max`; checked before anything is allocated.
    fn count(&mut self, field: &'static str, wide: bool, max: usize) -> Result<usize, DecodeError> {
        let n = if wide { usize::from(self.u16()?) } else { usize::from(self.u8()?) };
        if n > max {
            return Err(bad_value(field, n as u64));
        }
        Ok(n)
    }

    fn card_auth(&mut self) -> Result<CardAuth, DecodeError> {
        Ok(CardAuth {
            card_id: self.card_id()?,
            atc: self.atc()?,
            nonce: self.u64()?,
            cryptogram: self.mac()?,
        })
    }

    fn offline_record(&mut self) -> Result<OfflineRecord, DecodeError> {
        Ok(OfflineRecord {
            card_id: self.card_id()?,
            atc: self.atc()?,
            amount: self.amount()?,
            time_ms: self.u64()?,
            nonce: self.u64()?,
            certificate: self.mac()?,
        })
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.pos != self.data.len() {
            return Err(DecodeError::TrailingBytes {
                message_type: self.message_type,
                extra: self.data.len() - self.pos,
                request_id: RequestId(0),
            });
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Body writing.

fn put_auth(out: &mut BytesMut, auth: &CardAuth) {
    out.put_u64(auth.card_id.0);
    out.put_u32(auth.atc.0);
    out.put_u64(auth.nonce);
    out.put_slice(&auth.cryptogram.0);
}

fn put_offline_record(out: &mut BytesMut, rec: &OfflineRecord) {
    out.put_u64(rec.card_id.0);
    out.put_u32(rec.atc.0);
    out.put_i64(rec.amount.0);
    out.put_u64(rec.time_ms);
    out.put_u64(rec.nonce);
    out.put_slice(&rec.certificate.0);
}

/// Encoded length of a CardResult, its 16-byte MAC included (the MAC covers the first 29).
pub const CARD_RESULT_LEN: usize = 45;

pub(crate) fn put_card_result(out: &mut impl BufMut, r: &CardResult) {
    out.put_u8(r.status as u8);
    out.put_u64(r.card_id.0);
    out.put_u32(r.atc.0);
    out.put_i64(r.balance.0);
    out.put_u64(r.journal_seq);
    out.put_slice(&r.mac.0);
}

/// Encoded length of a TransitResult, its 16-byte MAC included.
pub const TRANSIT_RESULT_LEN: usize = 81;

fn put_transit_result(out: &mut BytesMut, r: &TransitResult) {
    put_transit_fields(out, r);
    out.put_slice(&r.mac.0);
}

/// Encoded length of the 1.3 FundsResult with product fields, its MAC included.
pub const FUNDS_PRODUCT_RESULT_LEN: usize = TRANSIT_RESULT_LEN + 21;

/// A TransitResult's fields before its MAC (65 bytes).
fn put_transit_fields(out: &mut BytesMut, r: &TransitResult) {
    out.put_u8(r.status as u8);
    out.put_u64(r.card_id.0);
    out.put_u32(r.atc.0);
    out.put_i64(r.balance.0);
    out.put_i64(r.amount.0);
    out.put_i64(r.held.0);
    out.put_i64(r.spendable.0);
    out.put_u32(r.ref_atc.0);
    out.put_u64(r.time_ms);
    out.put_u64(r.journal_seq);
}

/// A whole TransitResult: its fields, then its MAC.
fn read_transit_result(r: &mut Reader<'_>) -> Result<TransitResult, DecodeError> {
    let mut result = read_transit_result_fields(r)?;
    result.mac = r.mac()?;
    Ok(result)
}

/// A TransitResult's fields before its MAC; the MAC is read by the caller (zero until then).
fn read_transit_result_fields(r: &mut Reader<'_>) -> Result<TransitResult, DecodeError> {
    Ok(TransitResult {
        status: r.status()?,
        card_id: r.card_id()?,
        atc: r.atc()?,
        balance: r.amount()?,
        amount: r.amount()?,
        held: r.amount()?,
        spendable: r.amount()?,
        ref_atc: r.atc()?,
        time_ms: r.u64()?,
        journal_seq: r.u64()?,
        mac: Mac::default(),
    })
}

/// The response type that answers an inquirable request type.
pub fn answer_type_of(request: MessageType) -> Option<MessageType> {
    Some(match request {
        MessageType::Purchase => MessageType::PurchaseResult,
        MessageType::TopUp => MessageType::TopUpResult,
        MessageType::Identity => MessageType::IdentityResult,
        MessageType::TapIn => MessageType::TapInResult,
        MessageType::TapOut => MessageType::TapOutResult,
        MessageType::Reversal => MessageType::ReversalResult,
        _ => return None,
    })
}

fn read_card_result(r: &mut Reader<'_>) -> Result<CardResult, DecodeError> {
    Ok(CardResult {
        status: r.status()?,
        card_id: r.card_id()?,
        atc: r.atc()?,
        balance: r.amount()?,
        journal_seq: r.u64()?,
        mac: r.mac()?,
    })
}

fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), EncodeError> {
    if count > max {
        return Err(EncodeError::TooMany { field, count, max });
    }
    Ok(())
}

impl Request {
    pub fn message_type(&self) -> MessageType {
        match self {
            Request::Hello { .. } => MessageType::Hello,
            Request::Purchase { .. } => MessageType::Purchase,
            Request::TopUp { .. } => MessageType::TopUp,
            Request::Balance { .. } => MessageType::Balance,
            Request::History { .. } => MessageType::History,
            Request::Identity { .. } => MessageType::Identity,
            Request::Issue { .. } => MessageType::Issue,
            Request::Block { .. } => MessageType::Block,
            Request::Unblock { .. } => MessageType::Unblock,
            Request::Replace { .. } => MessageType::Replace,
            Request::Close { .. } => MessageType::Close,
            Request::OfflineBatch { .. } => MessageType::OfflineBatch,
            Request::HotlistSync { .. } => MessageType::HotlistSync,
            Request::TapIn { .. } => MessageType::TapIn,
            Request::TapOut { .. } => MessageType::TapOut,
            Request::Inquiry { .. } => MessageType::Inquiry,
            Request::Reversal { .. } => MessageType::Reversal,
            Request::Funds { .. } => MessageType::Funds,
            Request::IssueProduct { .. } => MessageType::Issue,
            Request::FundsProduct { .. } => MessageType::Funds,
            Request::SetProduct { .. } => MessageType::SetProduct,
            Request::NumberedOfflineBatch { .. } => MessageType::NumberedOfflineBatch,
        }
    }

    /// The card authentication of a card request.
    pub fn card_auth(&self) -> Option<&CardAuth> {
        match self {
            Request::Purchase { auth, .. }
            | Request::TopUp { auth, .. }
            | Request::Balance { auth }
            | Request::History { auth, .. }
            | Request::Identity { auth }
            | Request::TapIn { auth }
            | Request::TapOut { auth, .. }
            | Request::Inquiry { auth, .. }
            | Request::Reversal { auth, .. }
            | Request::Funds { auth }
            | Request::FundsProduct { auth } => Some(auth),
            _ => None,
        }
    }

    /// The amount the request cryptogram covers (0 for requests without an amount). For an
    /// Inquiry: the original request's amount.
    pub fn cryptogram_amount(&self) -> Amount {
        match self {
            Request::Purchase { amount, .. }
            | Request::TopUp { amount, .. }
            | Request::Inquiry { amount, .. }
            | Request::Reversal { amount, .. } => *amount,
            Request::TapOut { fare, .. } => *fare,
            _ => Amount(0),
        }
    }

    /// The type byte the request cryptogram covers: the request's own type, except for an
    /// Inquiry, which carries the original request's cryptogram.
    pub fn cryptogram_type(&self) -> MessageType {
        match self {
            Request::Inquiry { original_type, .. } => *original_type,
            other => other.message_type(),
        }
    }

    /// Appends the complete frame (header and body) to `out`. On error nothing is written.
    pub fn encode(&self, request_id: RequestId, out: &mut BytesMut) -> Result<(), EncodeError> {
        let mut body = BytesMut::with_capacity(64);
        match self {
            Request::Hello { client_time_ms } => body.put_u64(*client_time_ms),
            Request::Purchase { auth, amount } | Request::TopUp { auth, amount } => {
                put_auth(&mut body, auth);
                body.put_i64(amount.0);
            }
            Request::Balance { auth }
            | Request::Identity { auth }
            | Request::TapIn { auth }
            | Request::Funds { auth } => put_auth(&mut body, auth),
            Request::FundsProduct { auth } => {
                put_auth(&mut body, auth);
                body.put_u8(1);
            }
            Request::TapOut { auth, fare } => {
                put_auth(&mut body, auth);
                body.put_i64(fare.0);
            }
            Request::Inquiry { auth, original_type, amount } => {
                put_auth(&mut body, auth);
                body.put_u8(*original_type as u8);
                body.put_i64(amount.0);
            }
            Request::Reversal { auth, amount, original_atc, original_cryptogram } => {
                put_auth(&mut body, auth);
                body.put_i64(amount.0);
                body.put_u32(original_atc.0);
                body.put_slice(&original_cryptogram.0);
            }
            Request::History { auth, before_seq, limit } => {
                put_auth(&mut body, auth);
                body.put_u64(*before_seq);
                body.put_u16(*limit);
            }
            Request::Issue { op_ref, deposit } => {
                body.put_u64(*op_ref);
                body.put_i64(deposit.0);
            }
            Request::IssueProduct { op_ref, deposit, product } => {
                body.put_u64(*op_ref);
                body.put_i64(deposit.0);
                body.put_u8(*product);
            }
            Request::SetProduct { op_ref, card_id, product } => {
                body.put_u64(*op_ref);
                body.put_u64(card_id.0);
                body.put_u8(*product);
            }
            Request::Block { op_ref, card_id, reason } => {
                body.put_u64(*op_ref);
                body.put_u64(card_id.0);
                body.put_u8(*reason as u8);
            }
            Request::Unblock { op_ref, card_id }
            | Request::Replace { op_ref, card_id }
            | Request::Close { op_ref, card_id } => {
                body.put_u64(*op_ref);
                body.put_u64(card_id.0);
            }
            Request::OfflineBatch { records } => {
                check_count("records", records.len(), MAX_OFFLINE_RECORDS)?;
                body.put_u16(records.len() as u16);
                for rec in records {
                    put_offline_record(&mut body, rec);
                }
            }
            Request::NumberedOfflineBatch { records } => {
                check_count("records", records.len(), MAX_OFFLINE_RECORDS)?;
                body.put_u16(records.len() as u16);
                for numbered in records {
                    put_offline_record(&mut body, &numbered.record);
                    body.put_u64(numbered.terminal_seq);
                    body.put_u8(numbered.flags);
                }
            }
            Request::HotlistSync { cursor, max_entries } => {
                check_count("cursor", cursor.len(), MAX_SHARDS)?;
                body.put_u16(*max_entries);
                body.put_u8(cursor.len() as u8);
                for v in cursor {
                    body.put_u64(*v);
                }
            }
        }
        put_header(out, self.message_type(), request_id, body.len())?;
        out.put_slice(&body);
        Ok(())
    }

    /// Decodes a request body of the given type. Response types are `UnknownType`.
    pub fn decode_body(message_type: MessageType, body: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader::new(message_type, body);
        let request = match message_type {
            MessageType::Hello => Request::Hello { client_time_ms: r.u64()? },
            MessageType::Purchase => {
                Request::Purchase { auth: r.card_auth()?, amount: r.amount()? }
            }
            MessageType::TopUp => Request::TopUp { auth: r.card_auth()?, amount: r.amount()? },
            MessageType::Balance => Request::Balance { auth: r.card_auth()? },
            MessageType::History => {
                Request::History { auth: r.card_auth()?, before_seq: r.u64()?, limit: r.u16()? }
            }
            MessageType::Identity => Request::Identity { auth: r.card_auth()? },
            MessageType::Issue => {
                let op_ref = r.u64()?;
                let deposit = r.amount()?;
                // Protocol 1.3: a 17th byte names the product; 16 bytes mean product 0.
                if body.len() > 16 {
                    Request::IssueProduct { op_ref, deposit, product: r.u8()? }
                } else {
                    Request::Issue { op_ref, deposit }
                }
            }
            MessageType::SetProduct => {
                Request::SetProduct { op_ref: r.u64()?, card_id: r.card_id()?, product: r.u8()? }
            }
            MessageType::Block => {
                let op_ref = r.u64()?;
                let card_id = r.card_id()?;
                let v = r.u8()?;
                let reason = BlockReason::from_u8(v)
                    .filter(|reason| (*reason as u8) <= BlockReason::Other as u8)
                    .ok_or(bad_value("reason", v.into()))?;
                Request::Block { op_ref, card_id, reason }
            }
            MessageType::Unblock => Request::Unblock { op_ref: r.u64()?, card_id: r.card_id()? },
            MessageType::Replace => Request::Replace { op_ref: r.u64()?, card_id: r.card_id()? },
            MessageType::Close => Request::Close { op_ref: r.u64()?, card_id: r.card_id()? },
            MessageType::OfflineBatch => {
                let n = r.count("records", true, MAX_OFFLINE_RECORDS)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(r.offline_record()?);
                }
                Request::OfflineBatch { records }
            }
            MessageType::NumberedOfflineBatch => {
                let n = r.count("records", true, MAX_OFFLINE_RECORDS)?;
                let mut records: Vec<NumberedRecord> = Vec::with_capacity(n);
                for _ in 0..n {
                    let record = r.offline_record()?;
                    let terminal_seq = r.u64()?;
                    let previous = records.last().map_or(0, |p| p.terminal_seq);
                    // From 1, strictly increasing within the batch: a batch cannot carry one
                    // seq twice (PROTOCOL.md 6.13).
                    if terminal_seq <= previous {
                        return Err(bad_value("terminal_seq", terminal_seq));
                    }
                    let flags = r.u8()?;
                    if flags & !FLAG_UNCERTAIN != 0 {
                        return Err(bad_value("flags", flags.into()));
                    }
                    records.push(NumberedRecord { record, terminal_seq, flags });
                }
                Request::NumberedOfflineBatch { records }
            }
            MessageType::HotlistSync => {
                let max_entries = r.u16()?;
                let n = r.count("cursor", false, MAX_SHARDS)?;
                let mut cursor = Vec::with_capacity(n);
                for _ in 0..n {
                    cursor.push(r.u64()?);
                }
                Request::HotlistSync { cursor, max_entries }
            }
            MessageType::TapIn => Request::TapIn { auth: r.card_auth()? },
            MessageType::TapOut => Request::TapOut { auth: r.card_auth()?, fare: r.amount()? },
            MessageType::Inquiry => {
                let auth = r.card_auth()?;
                let v = r.u8()?;
                let original_type = MessageType::from_u8(v)
                    .filter(|t| INQUIRABLE.contains(t))
                    .ok_or(bad_value("original_type", v.into()))?;
                Request::Inquiry { auth, original_type, amount: r.amount()? }
            }
            MessageType::Reversal => Request::Reversal {
                auth: r.card_auth()?,
                amount: r.amount()?,
                original_atc: r.atc()?,
                original_cryptogram: r.mac()?,
            },
            MessageType::Funds => {
                let auth = r.card_auth()?;
                // Protocol 1.3: a 37th byte of 1 asks for the product fields too.
                if body.len() > 36 {
                    let v = r.u8()?;
                    if v != 1 {
                        return Err(bad_value("detail", v.into()));
                    }
                    Request::FundsProduct { auth }
                } else {
                    Request::Funds { auth }
                }
            }
            other => {
                return Err(DecodeError::UnknownType {
                    message_type: other as u8,
                    request_id: RequestId(0),
                })
            }
        };
        r.finish()?;
        Ok(request)
    }
}

impl Response {
    pub fn message_type(&self) -> MessageType {
        match self {
            Response::ServerInfo(_) => MessageType::ServerInfo,
            Response::Purchase(_) => MessageType::PurchaseResult,
            Response::TopUp(_) => MessageType::TopUpResult,
            Response::Balance(_) => MessageType::BalanceResult,
            Response::History(_) => MessageType::HistoryPage,
            Response::Identity(_) => MessageType::IdentityResult,
            Response::Issue(_) => MessageType::IssueResult,
            Response::Block(_) => MessageType::BlockResult,
            Response::Unblock(_) => MessageType::UnblockResult,
            Response::Replace(_) => MessageType::ReplaceResult,
            Response::Close(_) => MessageType::CloseResult,
            Response::OfflineBatch(_) => MessageType::OfflineResults,
            Response::HotlistSync(_) => MessageType::HotlistChanges,
            Response::TapIn(_) => MessageType::TapInResult,
            Response::TapOut(_) => MessageType::TapOutResult,
            Response::Inquiry(_) => MessageType::InquiryResult,
            Response::Reversal(_) => MessageType::ReversalResult,
            Response::Funds(_) => MessageType::FundsResult,
            Response::SetProduct(_) => MessageType::SetProductResult,
            Response::FundsProduct(_) => MessageType::FundsResult,
            Response::NumberedOfflineBatch(_) => MessageType::NumberedOfflineResults,
            Response::Error { .. } => MessageType::Error,
        }
    }

    /// The result status (the first record's for an offline batch); None for answers without a
    /// status field (ServerInfo, HotlistChanges, Error).
    pub fn status(&self) -> Option<Status> {
        match self {
            Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => Some(r.status),
            Response::History(h) => Some(h.status),
            Response::Identity(i) => Some(i.status),
            Response::Issue(i) | Response::Replace(i) => Some(i.status),
            Response::Block(s) | Response::Unblock(s) | Response::Close(s) => Some(s.status),
            Response::OfflineBatch(results) => results.first().map(|r| r.status),
            Response::NumberedOfflineBatch(n) => n.results.first().map(|r| r.result.status),
            Response::TapIn(t)
            | Response::TapOut(t)
            | Response::Reversal(t)
            | Response::Funds(t) => Some(t.status),
            Response::Inquiry(i) => Some(i.status),
            Response::SetProduct(p) => Some(p.status),
            Response::FundsProduct(f) => Some(f.funds.status),
            Response::ServerInfo(_) | Response::HotlistSync(_) | Response::Error { .. } => None,
        }
    }

    /// Sets the status (of every record, for an offline batch); no-op without a status field.
    pub fn set_status(&mut self, status: Status) {
        match self {
            Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => r.status = status,
            Response::History(h) => h.status = status,
            Response::Identity(i) => i.status = status,
            Response::Issue(i) | Response::Replace(i) => i.status = status,
            Response::Block(s) | Response::Unblock(s) | Response::Close(s) => s.status = status,
            Response::OfflineBatch(results) => results.iter_mut().for_each(|r| r.status = status),
            Response::NumberedOfflineBatch(n) => {
                n.results.iter_mut().for_each(|r| r.result.status = status)
            }
            Response::TapIn(t)
            | Response::TapOut(t)
            | Response::Reversal(t)
            | Response::Funds(t) => t.status = status,
            Response::Inquiry(i) => i.status = status,
            Response::SetProduct(p) => p.status = status,
            Response::FundsProduct(f) => f.funds.status = status,
            Response::ServerInfo(_) | Response::HotlistSync(_) | Response::Error { .. } => {}
        }
    }

    /// The response MAC of a single-card answer (the last 16 bytes of its body).
    pub fn mac_mut(&mut self) -> Option<&mut Mac> {
        match self {
            Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => Some(&mut r.mac),
            Response::History(h) => Some(&mut h.mac),
            Response::Identity(i) => Some(&mut i.mac),
            Response::Issue(i) | Response::Replace(i) => Some(&mut i.mac),
            Response::Block(s) | Response::Unblock(s) | Response::Close(s) => Some(&mut s.mac),
            Response::TapIn(t)
            | Response::TapOut(t)
            | Response::Reversal(t)
            | Response::Funds(t) => Some(&mut t.mac),
            Response::Inquiry(i) => Some(&mut i.mac),
            Response::SetProduct(p) => Some(&mut p.mac),
            Response::FundsProduct(f) => Some(&mut f.funds.mac),
            Response::OfflineBatch(_)
            | Response::NumberedOfflineBatch(_)
            | Response::ServerInfo(_)
            | Response::HotlistSync(_)
            | Response::Error { .. } => None,
        }
    }

    /// An error frame body for `code` with a short explanation (cut to the limit).
    pub fn error(code: crate::ErrorCode, message: &str) -> Response {
        let mut end = message.len().min(MAX_ERROR_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        Response::Error { code: code as u16, message: message[..end].to_owned() }
    }

    /// Appends the complete frame (header and body) to `out`. On error nothing is written.
    /// The body is written in place behind the header and its length patched in afterwards
    /// (rustls' `LengthPrefixedBuffer`), so it is encoded once and never copied.
    pub fn encode(&self, request_id: RequestId, out: &mut BytesMut) -> Result<(), EncodeError> {
        let start = out.len();
        put_header(out, self.message_type(), request_id, 0)?;
        let written = self.encode_body(out).and_then(|()| {
            let body_len = out.len() - start - HEADER_LEN;
            if body_len > MAX_BODY_LEN {
                return Err(EncodeError::TooLarge { len: body_len, max: MAX_BODY_LEN });
            }
            Ok(body_len)
        });
        match written {
            Ok(body_len) => {
                // Checked against MAX_BODY_LEN above, so it fits in u32.
                let at = start + BODY_LEN_OFFSET;
                out[at..at + 4].copy_from_slice(&(body_len as u32).to_be_bytes());
                Ok(())
            }
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Writes only the body. The response MAC covers the body bytes before the MAC field.
    pub fn encode_body(&self, body: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Response::ServerInfo(s) => {
                body.put_u8(s.protocol_version);
                body.put_u8(s.role);
                body.put_u64(s.server_time_ms);
                body.put_u64(s.hotlist_version);
                body.put_u16(s.shard_count);
                body.put_u16(s.max_in_flight);
            }
            Response::Purchase(c) | Response::TopUp(c) | Response::Balance(c) => {
                put_card_result(body, c)
            }
            Response::History(h) => {
                check_count("entries", h.entries.len(), MAX_HISTORY_PAGE)?;
                body.put_u8(h.status as u8);
                body.put_u64(h.card_id.0);
                body.put_u32(h.atc.0);
                body.put_i64(h.balance.0);
                body.put_u8(h.entries.len() as u8);
                for e in &h.entries {
                    body.put_u64(e.journal_seq);
                    body.put_u8(e.kind as u8);
                    body.put_u8(e.status as u8);
                    body.put_i64(e.amount.0);
                    body.put_i64(e.balance_after.0);
                    body.put_u64(e.time_ms);
                    body.put_u32(e.atc.0);
                }
                body.put_u64(h.next_before_seq);
                body.put_slice(&h.mac.0);
            }
            Response::Identity(i) => {
                body.put_u8(i.status as u8);
                body.put_u64(i.card_id.0);
                body.put_u32(i.atc.0);
                body.put_u64(i.journal_seq);
                body.put_u64(i.issued_ms);
                body.put_u64(i.expires_ms);
                body.put_slice(&i.signature);
                body.put_slice(&i.mac.0);
            }
            Response::Issue(i) | Response::Replace(i) => {
                body.put_u8(i.status as u8);
                body.put_u64(i.card_id.0);
                body.put_u16(i.key_version.0);
                body.put_slice(&i.card_key);
                body.put_i64(i.balance.0);
                body.put_u64(i.replaced_card_id.0);
                body.put_u64(i.journal_seq);
                body.put_slice(&i.mac.0);
            }
            Response::Block(s) | Response::Unblock(s) | Response::Close(s) => {
                body.put_u8(s.status as u8);
                body.put_u64(s.card_id.0);
                body.put_u8(s.card_state as u8);
                body.put_i64(s.balance.0);
                body.put_i64(s.refunded.0);
                body.put_u64(s.hotlist_version);
                body.put_u64(s.journal_seq);
                body.put_slice(&s.mac.0);
            }
            Response::OfflineBatch(results) => {
                check_count("results", results.len(), MAX_OFFLINE_RECORDS)?;
                body.put_u16(results.len() as u16);
                for c in results {
                    put_card_result(body, c);
                }
            }
            Response::NumberedOfflineBatch(n) => {
                check_count("results", n.results.len(), MAX_OFFLINE_RECORDS)?;
                body.put_u64(n.highest_seq);
                body.put_u16(n.results.len() as u16);
                for r in &n.results {
                    body.put_u64(r.terminal_seq);
                    put_card_result(body, &r.result);
                }
            }
            Response::HotlistSync(h) => {
                check_count("cursor", h.cursor.len(), MAX_SHARDS)?;
                check_count("entries", h.entries.len(), MAX_HOTLIST_ENTRIES)?;
                body.put_u8(h.cursor.len() as u8);
                for v in &h.cursor {
                    body.put_u64(*v);
                }
                body.put_u8(u8::from(h.more));
                body.put_u16(h.entries.len() as u16);
                for e in &h.entries {
                    body.put_u64(e.card_id.0);
                    body.put_u8(u8::from(e.listed));
                    body.put_u8(e.reason as u8);
                    body.put_u64(e.version);
                }
            }
            Response::TapIn(t)
            | Response::TapOut(t)
            | Response::Reversal(t)
            | Response::Funds(t) => put_transit_result(body, t),
            Response::FundsProduct(f) => {
                put_transit_fields(body, &f.funds);
                body.put_u8(f.product);
                body.put_i64(f.deposit.0);
                body.put_i64(f.spent_today.0);
                body.put_u32(f.debits_today);
                body.put_slice(&f.funds.mac.0);
            }
            Response::SetProduct(p) => {
                body.put_u8(p.status as u8);
                body.put_u64(p.card_id.0);
                body.put_u8(p.card_state as u8);
                body.put_u8(p.product);
                body.put_i64(p.balance.0);
                body.put_i64(p.deposit.0);
                body.put_i64(p.deposit_paid.0);
                body.put_i64(p.deposit_refunded.0);
                body.put_u64(p.journal_seq);
                body.put_slice(&p.mac.0);
            }
            Response::Inquiry(i) => {
                body.put_u8(i.status as u8);
                body.put_u64(i.card_id.0);
                body.put_u32(i.atc.0);
                body.put_u64(i.journal_seq);
                match &i.answer {
                    None => {
                        body.put_u8(0);
                        body.put_u16(0);
                    }
                    Some(answer) => {
                        let t = answer.message_type();
                        if !INQUIRABLE.iter().any(|r| answer_type_of(*r) == Some(t)) {
                            return Err(EncodeError::NotInquirable(t as u8));
                        }
                        let mut inner = BytesMut::with_capacity(MAX_INQUIRY_ANSWER);
                        answer.encode_body(&mut inner)?;
                        check_count("answer", inner.len(), MAX_INQUIRY_ANSWER)?;
                        body.put_u8(t as u8);
                        body.put_u16(inner.len() as u16);
                        body.put_slice(&inner);
                    }
                }
                body.put_slice(&i.mac.0);
            }
            Response::Error { code, message } => {
                check_count("message", message.len(), MAX_ERROR_MESSAGE)?;
                body.put_u16(*code);
                body.put_u16(message.len() as u16);
                body.put_slice(message.as_bytes());
            }
        }
        Ok(())
    }

    /// Decodes a response body of the given type. Request types are `UnknownType`.
    pub fn decode_body(message_type: MessageType, body: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader::new(message_type, body);
        let response = match message_type {
            MessageType::ServerInfo => Response::ServerInfo(ServerInfo {
                protocol_version: r.u8()?,
                role: r.u8()?,
                server_time_ms: r.u64()?,
                hotlist_version: r.u64()?,
                shard_count: r.u16()?,
                max_in_flight: r.u16()?,
            }),
            MessageType::PurchaseResult => Response::Purchase(read_card_result(&mut r)?),
            MessageType::TopUpResult => Response::TopUp(read_card_result(&mut r)?),
            MessageType::BalanceResult => Response::Balance(read_card_result(&mut r)?),
            MessageType::HistoryPage => {
                let status = r.status()?;
                let card_id = r.card_id()?;
                let atc = r.atc()?;
                let balance = r.amount()?;
                let n = r.count("entries", false, MAX_HISTORY_PAGE)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let journal_seq = r.u64()?;
                    let k = r.u8()?;
                    let kind = EntryKind::from_u8(k).ok_or(bad_value("kind", k.into()))?;
                    entries.push(HistoryEntry {
                        journal_seq,
                        kind,
                        status: r.status()?,
                        amount: r.amount()?,
                        balance_after: r.amount()?,
                        time_ms: r.u64()?,
                        atc: r.atc()?,
                    });
                }
                Response::History(HistoryPage {
                    status,
                    card_id,
                    atc,
                    balance,
                    entries,
                    next_before_seq: r.u64()?,
                    mac: r.mac()?,
                })
            }
            MessageType::IdentityResult => Response::Identity(IdentityResult {
                status: r.status()?,
                card_id: r.card_id()?,
                atc: r.atc()?,
                journal_seq: r.u64()?,
                issued_ms: r.u64()?,
                expires_ms: r.u64()?,
                signature: r.array()?,
                mac: r.mac()?,
            }),
            MessageType::IssueResult | MessageType::ReplaceResult => {
                let result = IssueResult {
                    status: r.status()?,
                    card_id: r.card_id()?,
                    key_version: KeyVersion(r.u16()?),
                    card_key: r.array()?,
                    balance: r.amount()?,
                    replaced_card_id: r.card_id()?,
                    journal_seq: r.u64()?,
                    mac: r.mac()?,
                };
                if message_type == MessageType::IssueResult {
                    Response::Issue(result)
                } else {
                    Response::Replace(result)
                }
            }
            MessageType::BlockResult | MessageType::UnblockResult | MessageType::CloseResult => {
                let status = r.status()?;
                let card_id = r.card_id()?;
                let v = r.u8()?;
                let card_state = CardState::from_u8(v).ok_or(bad_value("card_state", v.into()))?;
                let result = StaffResult {
                    status,
                    card_id,
                    card_state,
                    balance: r.amount()?,
                    refunded: r.amount()?,
                    hotlist_version: r.u64()?,
                    journal_seq: r.u64()?,
                    mac: r.mac()?,
                };
                match message_type {
                    MessageType::BlockResult => Response::Block(result),
                    MessageType::UnblockResult => Response::Unblock(result),
                    _ => Response::Close(result),
                }
            }
            MessageType::OfflineResults => {
                let n = r.count("results", true, MAX_OFFLINE_RECORDS)?;
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    results.push(read_card_result(&mut r)?);
                }
                Response::OfflineBatch(results)
            }
            MessageType::NumberedOfflineResults => {
                let highest_seq = r.u64()?;
                let n = r.count("results", true, MAX_OFFLINE_RECORDS)?;
                let mut results = Vec::with_capacity(n);
                for _ in 0..n {
                    results.push(NumberedResult {
                        terminal_seq: r.u64()?,
                        result: read_card_result(&mut r)?,
                    });
                }
                Response::NumberedOfflineBatch(NumberedResults { highest_seq, results })
            }
            MessageType::HotlistChanges => {
                let n = r.count("cursor", false, MAX_SHARDS)?;
                let mut cursor = Vec::with_capacity(n);
                for _ in 0..n {
                    cursor.push(r.u64()?);
                }
                let more = match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(bad_value("more", v.into())),
                };
                let n = r.count("entries", true, MAX_HOTLIST_ENTRIES)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let card_id = r.card_id()?;
                    let listed = match r.u8()? {
                        0 => false,
                        1 => true,
                        v => return Err(bad_value("listed", v.into())),
                    };
                    let v = r.u8()?;
                    let reason = BlockReason::from_u8(v).ok_or(bad_value("reason", v.into()))?;
                    entries.push(HotlistEntry { card_id, listed, reason, version: r.u64()? });
                }
                Response::HotlistSync(HotlistChanges { cursor, more, entries })
            }
            MessageType::TapInResult => Response::TapIn(read_transit_result(&mut r)?),
            MessageType::TapOutResult => Response::TapOut(read_transit_result(&mut r)?),
            MessageType::ReversalResult => Response::Reversal(read_transit_result(&mut r)?),
            MessageType::FundsResult if body.len() == FUNDS_PRODUCT_RESULT_LEN => {
                let mut funds = read_transit_result_fields(&mut r)?;
                let product = r.u8()?;
                let deposit = r.amount()?;
                let spent_today = r.amount()?;
                let debits_today = r.u32()?;
                funds.mac = r.mac()?;
                Response::FundsProduct(FundsProductResult {
                    funds,
                    product,
                    deposit,
                    spent_today,
                    debits_today,
                })
            }
            MessageType::FundsResult => Response::Funds(read_transit_result(&mut r)?),
            MessageType::SetProductResult => {
                let status = r.status()?;
                let card_id = r.card_id()?;
                let v = r.u8()?;
                let card_state = CardState::from_u8(v).ok_or(bad_value("card_state", v.into()))?;
                Response::SetProduct(ProductResult {
                    status,
                    card_id,
                    card_state,
                    product: r.u8()?,
                    balance: r.amount()?,
                    deposit: r.amount()?,
                    deposit_paid: r.amount()?,
                    deposit_refunded: r.amount()?,
                    journal_seq: r.u64()?,
                    mac: r.mac()?,
                })
            }
            MessageType::InquiryResult => {
                let status = r.status()?;
                let card_id = r.card_id()?;
                let atc = r.atc()?;
                let journal_seq = r.u64()?;
                let t = r.u8()?;
                let answer_type = match t {
                    0 => None,
                    v => Some(
                        MessageType::from_u8(v)
                            .filter(|t| INQUIRABLE.iter().any(|r| answer_type_of(*r) == Some(*t)))
                            .ok_or(bad_value("answer_type", v.into()))?,
                    ),
                };
                let n = r.count("answer", true, MAX_INQUIRY_ANSWER)?;
                let bytes = r.take(n)?;
                let answer = match answer_type {
                    None if n == 0 => None,
                    None => return Err(bad_value("answer", n as u64)),
                    Some(t) => Some(Box::new(
                        Response::decode_body(t, bytes)
                            .map_err(|_| bad_value("answer", u64::from(t as u8)))?,
                    )),
                };
                Response::Inquiry(InquiryResult {
                    status,
                    card_id,
                    atc,
                    answer,
                    journal_seq,
                    mac: r.mac()?,
                })
            }
            MessageType::Error => {
                let code = r.u16()?;
                let n = r.count("message", true, MAX_ERROR_MESSAGE)?;
                let text = r.take(n)?;
                let message = std::str::from_utf8(text)
                    .map_err(|_| bad_value("message", n as u64))?
                    .to_owned();
                Response::Error { code, message }
            }
            other => {
                return Err(DecodeError::UnknownType {
                    message_type: other as u8,
                    request_id: RequestId(0),
                })
            }
        };
        r.finish()?;
        Ok(response)
    }
}

/// Decodes one request frame from the front of `buf` (`Ok(None)` = need more bytes).
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<(RequestId, Request)>, DecodeError> {
    let Some(frame) = decode_frame(buf)? else {
        return Ok(None);
    };
    frame_to_request(&frame).map(|r| Some((frame.request_id, r)))
}

/// Decodes one response frame from the front of `buf` (`Ok(None)` = need more bytes).
pub fn decode_response(buf: &mut BytesMut) -> Result<Option<(RequestId, Response)>, DecodeError> {
    let Some(frame) = decode_frame(buf)? else {
        return Ok(None);
    };
    Response::decode_body(frame.message_type, &frame.body)
        .map(|r| Some((frame.request_id, r)))
        .map_err(|e| e.with_request_id(frame.request_id))
}

/// Interprets a frame as a request, rejecting response types with `UnknownType`.
pub fn frame_to_request(frame: &Frame) -> Result<Request, DecodeError> {
    if !frame.message_type.is_request() {
        return Err(DecodeError::UnknownType {
            message_type: frame.message_type as u8,
            request_id: frame.request_id,
        });
    }
    Request::decode_body(frame.message_type, &frame.body)
        .map_err(|e| e.with_request_id(frame.request_id))
}
