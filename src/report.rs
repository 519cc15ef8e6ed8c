//! The signed daily settlement report for auditors: per terminal and operation, what was
//! approved and declined on one UTC day, and whether the day's money flows reconcile with the
//! sum of all card balances at the start and at the end of the day.
//!
//! # Source and safety
//!
//! The report is computed from the shard journals alone (`<data>/shards` holds the shard count,
//! `<data>/shard-N/journal/` each journal), with [`journal::read_all`], which never modifies a
//! file. It takes no lock and never opens sled, so it runs against the data directory of a
//! live server. On a live server a journal may end in a batch that is still being written: the
//! scan reports it as a torn tail and stops before it. A scan that meets a hole followed by
//! later records (which a read racing with the writer can produce) is retried a few times
//! before it is reported as corruption.
//!
//! # The day
//!
//! A [`Date`] is a civil (proleptic Gregorian) date; its day is `[00:00, 24:00)` UTC, i.e.
//! `[days * 86 400 000, (days + 1) * 86 400 000)` in Unix milliseconds, where `days` counts from
//! 1970-01-01. An entry belongs to the day when its `time_ms` falls in that interval. Online
//! operations carry the server's time of decision; **offline records carry the terminal's time
//! of use**, so an offline batch uploaded after midnight counts on the day the card was used,
//! and the report for a day can still change until every reader has uploaded its offline
//! records for that day.
//!
//! # Rows
//!
//! One row per (terminal, operation), sorted by terminal and then operation name:
//!
//! | operation | journal kind | `count` / `amount_minor` (approved entries) |
//! | --- | --- | --- |
//! | `deposit` | Issue | cards issued / deposits taken |
//! | `identity` | Identity | checks / balance change (always 0) |
//! | `offline` | Offline | records / amount spent |
//! | `purchase` | Purchase | purchases / amount spent |
//! | `refund` | Close | closures / amount refunded (`-amount`) |
//! | `replacement` | ReplacedOut | replacements / balance moved to the new card |
//! | `top_up` | TopUp | top-ups / amount loaded |
//! | `tap_in` | TapIn | holds opened / amount held (no money moves) |
//! | `tap_out` | TapOut | holds completed / fares charged |
//! | `hold_expired` | HoldExpired | holds settled at the missing tap-out fare / fares charged |
//! | `reversal` | Reversal | purchases reversed / amount refunded |
//!
//! In the net line, `purchases` counts every fare charged at readers: purchases, tap-out and
//! expired-hold fares, minus reversals (so the line keeps its protocol 1.1 form).
//!
//! Amounts are positive magnitudes in minor units. `declined_count` counts the journaled
//! declines of that operation at that terminal (requests refused before authentication —
//! unknown card, bad cryptogram — and answers to retries are not journaled and not counted).
//! Block and unblock carry no money and have no rows.
//!
//! # Reconciliation
//!
//! `balances_start` / `balances_end` are the sum of all card balances at the start / end of the
//! day, obtained by replaying the amount of every approved entry by its time (entries before
//! the start, entries before the end). A replacement takes its amount off the old card and puts
//! it on the new one: it nets to zero. The day reconciles when
//! `balances_end - balances_start == deposits + top_ups - purchases - offline - refunds`; it
//! fails when money moved through an entry the totals do not account for.
//!
//! # Pruned archives
//!
//! A shard whose archive was pruned (`citycard archive prune`) is read from its signed anchor
//! on: the anchor's per-day sums stand for the removed records in `balances_start`,
//! `balances_end` and, for a day that had records removed, in the money flows. Such a report
//! names every anchor in a line `# anchor shard N: records 1..=S pruned (before DATE); ...`
//! before the `# net` line, and a day with removed records adds
//! `# pruned yes: records of this day were removed on shard ...`: its rows show only the
//! records kept. Both lines are covered by the signature.
//!
//! # Offline records (protocol 1.3)
//!
//! Lines `# offline_seqs`, `# offline_refused` and `# offline_uncertain`, after the rows and the
//! anchor lines and before `# net`, list per terminal the gaps in its numbered offline records,
//! every refused offline record with its status, and the uncertain records with their
//! resolution: see [`numbered`]. They move no money and do not enter the reconciliation (a
//! refused record moved nothing; an approved one is in the `offline` row).
//!
//! # CSV and signature
//!
//! ```text
//! date,terminal,operation,count,amount_minor,declined_count
//! 2024-02-29,counter-1,deposit,2,1100,1
//! 2024-02-29,reader-1,purchase,3,420,1
//! # net 680 = deposits 1100 + top_ups 0 - purchases 420 - offline 0 - refunds 0
//! # balances_start 5000
//! # balances_end 5680
//! # reconciled yes
//! # signature ed25519 <128 lowercase hex digits>
//! ```
//!
//! [`sign`] appends the last line with the server's Ed25519 assertion key (`assertion.key`);
//! [`check`] verifies it with `assertion.pub`. The signature covers every byte before the
//! signature line; because the same key signs identity assertions, the signed message is
//! [`SIGNATURE_CONTEXT`] followed by those bytes, so neither kind of signature can be passed
//! off as the other. The signature line must be the last line, end with `\n`, and hold exactly
//! 128 lowercase hex digits.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use citycard_protocol::{EntryKind, Status};
use ring::signature::{Ed25519KeyPair, UnparsedPublicKey, ED25519};

use crate::engine::entry::Entry;
use crate::journal::{self, JournalError};
use crate::keys;

pub mod numbered;

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// CSV header line (without the newline).
pub const CSV_HEADER: &str = "date,terminal,operation,count,amount_minor,declined_count";

/// Prefix of the signature line: `# signature ed25519 ` then 128 lowercase hex digits.
pub const SIGNATURE_PREFIX: &str = "# signature ed25519 ";

/// Domain separation: the Ed25519 message is this followed by the report bytes.
pub const SIGNATURE_CONTEXT: &[u8] = b"citycard settlement report v1\n";

/// Scans of a journal that meet a hole followed by later records before giving up.
const SCAN_ATTEMPTS: u32 = 3;
const SCAN_RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Errors of dates and signatures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("invalid date {0:?}: expected YYYY-MM-DD, a calendar day such as 2024-02-29")]
    BadDate(String),
    #[error(
        "the report has no signature line (a last line `# signature ed25519 <128 hex digits>`)"
    )]
    MissingSignature,
    #[error("malformed signature line: {0}")]
    MalformedSignature(&'static str),
    #[error("the signature does not match the report: altered, or signed by another key")]
    BadSignature,
}

// ---------------------------------------------------------------------------------------------
// Civil dates

/// Largest year magnitude a [`Date`] holds (no arithmetic on it can overflow).
pub const MAX_YEAR: i64 = 1_000_000_000;
/// Largest day magnitude [`Date::from_days`] converts; larger values are clamped.
pub const MAX_DAYS: i64 = 365 * MAX_YEAR;

/// Whether `year` is a leap year in the proleptic Gregorian calendar.
pub fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days in `month` (1..=12) of `year`; 0 for a month out of range.
pub fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap_year(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days from 1970-01-01 to `year-month-day` (negative before). Expects a valid date
/// (month 1..=12, day 1..=31, `|year| <= MAX_YEAR`); H. Hinnant's `days_from_civil`.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    // Years start on March 1st so that the leap day is the last day of the year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let mp = (month + 9) % 12; // March = 0 .. February = 11
    let doy = (153 * mp + 2) / 5 + day - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era * 146_097 + doe - 719_468
}

/// The civil date `(year, month, day)` of day `days` since 1970-01-01; the inverse of
/// [`days_from_civil`] (for `|days| <= MAX_DAYS`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction.
    (year, month as u32, day as u32)
}

/// A civil date (proleptic Gregorian); its day is `[00:00, 24:00)` UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    year: i64,
    month: u32,
    day: u32,
}

impl Date {
    /// The date, if it exists in the calendar (and `|year| <= MAX_YEAR`).
    pub fn new(year: i64, month: u32, day: u32) -> Option<Date> {
        let valid =
            (-MAX_YEAR..=MAX_YEAR).contains(&year) && day >= 1 && day <= days_in_month(year, month);
        valid.then_some(Date { year, month, day })
    }

    /// Parses exactly `YYYY-MM-DD` (four-digit year, two-digit month and day).
    pub fn parse(text: &str) -> Result<Date, ReportError> {
        let bad = || {
            let shown: String = text.chars().take(40).collect();
            ReportError::BadDate(shown)
        };
        let b = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| -> Option<u32> {
            let part = b.get(range)?;
            part.iter().try_fold(0u32, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
            })
        };
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(bad());
        }
        let (Some(year), Some(month), Some(day)) = (digits(0..4), digits(5..7), digits(8..10))
        else {
            return Err(bad());
        };
        Date::new(i64::from(year), month, day).ok_or_else(bad)
    }

    /// The date of day `days` since 1970-01-01 (clamped to `±MAX_DAYS`).
    pub fn from_days(days: i64) -> Date {
        let (year, month, day) = civil_from_days(days.clamp(-MAX_DAYS, MAX_DAYS));
        Date { year, month, day }
    }

    /// The UTC date of a Unix time in milliseconds.
    pub fn from_unix_ms(ms: u64) -> Date {
        // u64 milliseconds / DAY_MS always fits in i64.
        Date::from_days((ms / DAY_MS as u64) as i64)
    }

    /// Today's UTC date.
    pub fn today() -> Date {
        Date::from_unix_ms(crate::now_ms())
    }

    pub fn year(self) -> i64 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    pub fn day(self) -> u32 {
        self.day
    }

    /// Days since 1970-01-01 (day 0).
    pub fn days(self) -> i64 {
        days_from_civil(self.year, self.month, self.day)
    }

    /// First Unix millisecond of the day (00:00 UTC).
    pub fn start_ms(self) -> i64 {
        self.days().saturating_mul(DAY_MS)
    }

    /// First Unix millisecond after the day (24:00 UTC, the next day's 00:00).
    pub fn end_ms(self) -> i64 {
        self.start_ms().saturating_add(DAY_MS)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl FromStr for Date {
    type Err = ReportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Date::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Settlement

/// An operation row of the report. Variants are in the alphabetical order of their names, so
/// sorting by the enum sorts the CSV by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    /// Protocol 1.3: card deposits the operator kept at a Replace (product rule `keep`).
    CardDepositKept,
    /// Protocol 1.3: card deposits taken at the counter (Issue, SetProduct, Replace `keep`).
    CardDepositPaid,
    /// Protocol 1.3: card deposits paid back (Close, SetProduct to a smaller deposit).
    CardDepositRefunded,
    /// Issue: the deposit taken with a new card.
    Deposit,
    /// HoldExpired: a hold not tapped out in time, settled at the missing tap-out fare.
    HoldExpired,
    Identity,
    Offline,
    /// Protocol 1.3: SetProduct (`amount` 0: the balance does not change; the deposit
    /// difference is in the card deposit rows).
    ProductChange,
    Purchase,
    /// Close: the balance refunded.
    Refund,
    /// ReplacedOut: the balance moved to the replacement card.
    Replacement,
    /// Reversal: a purchase refunded by its terminal.
    Reversal,
    /// TapIn: holds opened (`amount` = the sum held; no money moves).
    TapIn,
    /// TapOut: holds completed (`amount` = the fares charged).
    TapOut,
    TopUp,
}

impl Operation {
    pub const ALL: [Operation; 15] = [
        Operation::CardDepositKept,
        Operation::CardDepositPaid,
        Operation::CardDepositRefunded,
        Operation::Deposit,
        Operation::HoldExpired,
        Operation::Identity,
        Operation::Offline,
        Operation::ProductChange,
        Operation::Purchase,
        Operation::Refund,
        Operation::Replacement,
        Operation::Reversal,
        Operation::TapIn,
        Operation::TapOut,
        Operation::TopUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::CardDepositKept => "card_deposit_kept",
            Operation::CardDepositPaid => "card_deposit_paid",
            Operation::CardDepositRefunded => "card_deposit_refunded",
            Operation::Deposit => "deposit",
            Operation::ProductChange => "product_change",
            Operation::HoldExpired => "hold_expired",
            Operation::Identity => "identity",
            Operation::Offline => "offline",
            Operation::Purchase => "purchase",
            Operation::Refund => "refund",
            Operation::Replacement => "replacement",
            Operation::Reversal => "reversal",
            Operation::TapIn => "tap_in",
            Operation::TapOut => "tap_out",
            Operation::TopUp => "top_up",
        }
    }

    /// The row a journal entry kind is reported in; `None` for kinds without money or rows.
    pub fn of(kind: EntryKind) -> Option<Operation> {
        Some(match kind {
            EntryKind::Issue => Operation::Deposit,
            EntryKind::Identity => Operation::Identity,
            EntryKind::Offline => Operation::Offline,
            EntryKind::Purchase => Operation::Purchase,
            EntryKind::Close => Operation::Refund,
            EntryKind::ReplacedOut => Operation::Replacement,
            EntryKind::TopUp => Operation::TopUp,
            EntryKind::TapIn => Operation::TapIn,
            EntryKind::TapOut => Operation::TapOut,
            EntryKind::HoldExpired => Operation::HoldExpired,
            EntryKind::Reversal => Operation::Reversal,
            EntryKind::ProductChanged => Operation::ProductChange,
            EntryKind::Block | EntryKind::Unblock | EntryKind::ReplacedIn | EntryKind::Inquiry => {
                return None
            }
        })
    }

    /// The amount an approved entry contributes to its row (positive magnitudes).
    fn amount_of(self, entry: &Entry) -> i128 {
        let amount = i128::from(entry.amount.0);
        match self {
            Operation::Deposit | Operation::TopUp | Operation::Identity | Operation::Reversal => {
                amount
            }
            // The hold placed (journaled in `extra`); the balance does not change.
            Operation::TapIn => i128::from(entry.extra),
            Operation::ProductChange => 0,
            // Card deposit rows are added from the entry's product fields, not by kind.
            Operation::CardDepositKept
            | Operation::CardDepositPaid
            | Operation::CardDepositRefunded => 0,
            Operation::Purchase
            | Operation::Offline
            | Operation::Refund
            | Operation::Replacement
            | Operation::TapOut
            | Operation::HoldExpired => -amount,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One (terminal, operation) line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Row {
    /// Approved entries.
    pub count: u64,
    /// Sum over approved entries, minor units (see [`Operation`]).
    pub amount: i128,
    /// Journaled declines.
    pub declined: u64,
}

/// The day's money flows over all terminals, minor units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flows {
    pub deposits: i128,
    pub top_ups: i128,
    pub purchases: i128,
    pub offline: i128,
    pub refunds: i128,
    /// Moved between cards by replacements (not part of `net`).
    pub replaced: i128,
}

impl Flows {
    /// `deposits + top_ups - purchases - offline - refunds`.
    pub fn net(&self) -> i128 {
        self.deposits + self.top_ups - self.purchases - self.offline - self.refunds
    }

    fn add(&mut self, other: &Flows) {
        self.deposits += other.deposits;
        self.top_ups += other.top_ups;
        self.purchases += other.purchases;
        self.offline += other.offline;
        self.refunds += other.refunds;
        self.replaced += other.replaced;
    }
}

/// Protocol 1.3: the card deposits (kept apart from balances) over the day, minor units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deposits {
    /// Taken at counters: Issue, SetProduct to a larger deposit, Replace under `keep`.
    pub paid: i128,
    /// Paid back: Close, SetProduct to a smaller deposit.
    pub refunded: i128,
    /// Kept by the operator at a Replace under `keep` (the old card's deposit).
    pub kept: i128,
    /// Sum of all card deposits at 00:00 UTC.
    pub start: i128,
    /// Sum of all card deposits at 24:00 UTC.
    pub end: i128,
}

impl Deposits {
    /// `paid - refunded - kept`: how the sum of card deposits changed.
    pub fn net(&self) -> i128 {
        self.paid - self.refunded - self.kept
    }

    /// Whether any card deposit exists or moved (the CSV shows deposit lines only then, so a
    /// server without deposits writes the report of before protocol 1.3).
    pub fn any(&self) -> bool {
        *self != Deposits::default()
    }

    fn add(&mut self, other: &Deposits) {
        self.paid += other.paid;
        self.refunded += other.refunded;
        self.kept += other.kept;
        self.start += other.start;
        self.end += other.end;
    }
}

/// The settlement of one UTC day.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settlement {
    pub date: Date,
    /// Keyed by (terminal, operation); iteration order is the CSV order.
    pub rows: BTreeMap<(String, Operation), Row>,
    pub flows: Flows,
    /// Protocol 1.3: card deposits. A pruned shard's deposits before its anchor are not
    /// carried (anchors hold balances only), so `start` and `end` then count from the anchor
    /// on; their difference still reconciles with the day's deposit movements.
    pub deposits: Deposits,
    /// Sum of all card balances at 00:00 UTC.
    pub balances_start: i128,
    /// Sum of all card balances at 24:00 UTC.
    pub balances_end: i128,
    pub shards: u16,
    /// Journal records read (all days).
    pub records: u64,
    /// Shards whose archive was pruned: (shard, last removed seq, the prune's `--before`).
    pub anchors: Vec<(u16, u64, Date)>,
    /// Shards on which records of this day were pruned: the rows miss them, the money flows
    /// and balances include them through the anchor's day sums.
    pub pruned_on: Vec<u16>,
    /// Offline records: seq gaps, refusals, uncertain records (protocol 1.3).
    pub offline: numbered::OfflineSettlement,
}

impl Settlement {
    fn empty(date: Date) -> Settlement {
        Settlement {
            date,
            rows: BTreeMap::new(),
            flows: Flows::default(),
            deposits: Deposits::default(),
            balances_start: 0,
            balances_end: 0,
            shards: 0,
            records: 0,
            anchors: Vec::new(),
            pruned_on: Vec::new(),
            offline: numbered::OfflineSettlement::default(),
        }
    }

    /// Starts a pruned shard's part from its anchor: the balances at its seq, and this day's
    /// money among the removed records.
    fn seed(&mut self, anchor: &crate::archive::Anchor) {
        let today = self.date.days();
        for (day, flows) in &anchor.days {
            let change = i128::from(flows.balance_change);
            if *day < today {
                self.balances_start += change;
            }
            if *day <= today {
                self.balances_end += change;
            }
            if *day == today {
                self.flows.add(&Flows {
                    deposits: flows.deposits.into(),
                    top_ups: flows.top_ups.into(),
                    purchases: flows.purchases.into(),
                    offline: flows.offline.into(),
                    refunds: flows.refunds.into(),
                    replaced: flows.replaced.into(),
                });
                self.pruned_on.push(anchor.shard);
            }
        }
        self.anchors.push((anchor.shard, anchor.seq, Date::from_days(anchor.before_days)));
    }

    /// The row of `terminal` and `operation` (all zero when there was no such entry).
    pub fn row(&self, terminal: &str, operation: Operation) -> Row {
        self.rows.get(&(terminal.to_owned(), operation)).copied().unwrap_or_default()
    }

    /// The day's net inflow: `deposits + top_ups - purchases - offline - refunds`.
    pub fn net(&self) -> i128 {
        self.flows.net()
    }

    /// Whether `balances_end - balances_start == net` and (protocol 1.3) the card deposits
    /// changed by exactly what was paid, refunded and kept.
    pub fn reconciled(&self) -> bool {
        let d = &self.deposits;
        self.balances_end - self.balances_start == self.net() && d.end - d.start == d.net()
    }

    /// Adds one journal entry.
    fn add(&mut self, entry: &Entry) {
        self.records += 1;
        self.offline.add(entry, self.date.start_ms(), self.date.end_ms());
        let (start, end) = (i128::from(self.date.start_ms()), i128::from(self.date.end_ms()));
        let time = i128::from(entry.time_ms);
        let approved = entry.status == Status::Approved;
        if approved {
            // A replacement takes the amount off the old card and credits the new one.
            let net =
                if entry.kind == EntryKind::ReplacedOut { 0 } else { i128::from(entry.amount.0) };
            if time < start {
                self.balances_start += net;
            }
            if time < end {
                self.balances_end += net;
            }
        }
        // Protocol 1.3: card deposit movements, apart from the balances.
        let moved = entry.product.filter(|_| approved).map(|p| {
            (i128::from(p.deposit_paid), i128::from(p.deposit_refunded), i128::from(p.deposit_kept))
        });
        if let Some((paid, refunded, kept)) = moved {
            let change = paid - refunded - kept;
            if time < start {
                self.deposits.start += change;
            }
            if time < end {
                self.deposits.end += change;
            }
            if time >= start && time < end {
                self.deposits.paid += paid;
                self.deposits.refunded += refunded;
                self.deposits.kept += kept;
                for (operation, amount) in [
                    (Operation::CardDepositPaid, paid),
                    (Operation::CardDepositRefunded, refunded),
                    (Operation::CardDepositKept, kept),
                ] {
                    if amount != 0 {
                        let row = self.rows.entry((entry.terminal.clone(), operation)).or_default();
                        row.count += 1;
                        row.amount += amount;
                    }
                }
            }
        }
        if time < start || time >= end {
            return;
        }
        let Some(operation) = Operation::of(entry.kind) else {
            return;
        };
        let row = self.rows.entry((entry.terminal.clone(), operation)).or_default();
        if !approved {
            row.declined += 1;
            return;
        }
        let amount = operation.amount_of(entry);
        row.count += 1;
        row.amount += amount;
        let flows = &mut self.flows;
        match operation {
            Operation::Deposit => flows.deposits += amount,
            Operation::TopUp => flows.top_ups += amount,
            Operation::Purchase => flows.purchases += amount,
            Operation::Offline => flows.offline += amount,
            Operation::Refund => flows.refunds += amount,
            Operation::Replacement => flows.replaced += amount,
            // Fares are money spent at readers like purchases; a reversal gives a purchase back.
            Operation::TapOut | Operation::HoldExpired => flows.purchases += amount,
            Operation::Reversal => flows.purchases -= amount,
            Operation::Identity
            | Operation::TapIn
            | Operation::ProductChange
            | Operation::CardDepositKept
            | Operation::CardDepositPaid
            | Operation::CardDepositRefunded => {}
        }
    }

    /// Adds the settlement of another shard for the same day.
    fn merge(&mut self, other: Settlement) {
        for (key, row) in other.rows {
            let mine = self.rows.entry(key).or_default();
            mine.count += row.count;
            mine.amount += row.amount;
            mine.declined += row.declined;
        }
        self.flows.add(&other.flows);
        self.deposits.add(&other.deposits);
        self.balances_start += other.balances_start;
        self.balances_end += other.balances_end;
        self.records += other.records;
        self.anchors.extend(other.anchors);
        self.pruned_on.extend(other.pruned_on);
        self.offline.merge(other.offline);
    }

    /// The unsigned report: header, one line per row, then the summary lines.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        out.push_str(CSV_HEADER);
        out.push('\n');
        for ((terminal, operation), row) in &self.rows {
            out.push_str(&format!(
                "{},{},{},{},{},{}\n",
                self.date,
                csv_field(terminal),
                operation,
                row.count,
                row.amount,
                row.declined
            ));
        }
        for (shard, seq, before) in &self.anchors {
            out.push_str(&format!(
                "# anchor shard {shard}: records 1..={seq} pruned (before {before}); balances \
                 carried from its signed anchor\n"
            ));
        }
        if !self.pruned_on.is_empty() {
            let shards: Vec<String> = self.pruned_on.iter().map(u16::to_string).collect();
            out.push_str(&format!(
                "# pruned yes: records of this day were removed on shard {}; the rows show only \
                 the records kept, the totals and balances include the anchors' day sums\n",
                shards.join(",")
            ));
        }
        out.push_str(&self.offline.lines());
        let f = &self.flows;
        out.push_str(&format!(
            "# net {} = deposits {} + top_ups {} - purchases {} - offline {} - refunds {}\n",
            f.net(),
            f.deposits,
            f.top_ups,
            f.purchases,
            f.offline,
            f.refunds
        ));
        out.push_str(&format!("# balances_start {}\n", self.balances_start));
        out.push_str(&format!("# balances_end {}\n", self.balances_end));
        let d = &self.deposits;
        if d.any() {
            out.push_str(&format!(
                "# card_deposits net {} = paid {} - refunded {} - kept {}\n",
                d.net(),
                d.paid,
                d.refunded,
                d.kept
            ));
            out.push_str(&format!("# card_deposits_start {}\n", d.start));
            out.push_str(&format!("# card_deposits_end {}\n", d.end));
        }
        out.push_str(&format!("# reconciled {}\n", if self.reconciled() { "yes" } else { "no" }));
        out
    }
}

/// RFC 4180 quoting for a field that needs it (terminal ids normally never do).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// Reads `<data>/shards` without creating it.
fn read_shard_count(data_dir: &Path) -> anyhow::Result<u16> {
    let path = data_dir.join("shards");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{} has no shard count: not a citycard data directory", data_dir.display())
    })?;
    let count: u16 =
        text.trim().parse().with_context(|| format!("{} is malformed", path.display()))?;
    anyhow::ensure!(count > 0, "{} says 0 shards", path.display());
    Ok(count)
}

/// Computes the settlement of `date` from every shard's journal, read-only (no lock, no sled):
/// safe while the server runs. A pruned data directory needs [`settlement_with`].
pub fn settlement(data_dir: &Path, date: Date) -> anyhow::Result<Settlement> {
    settlement_with(data_dir, date, None)
}

/// [`settlement`], starting pruned shards from their anchors, whose signatures are checked
/// with the assertion public key.
pub fn settlement_with(
    data_dir: &Path,
    date: Date,
    anchor_key: Option<&[u8; 32]>,
) -> anyhow::Result<Settlement> {
    let shards = read_shard_count(data_dir)?;
    let mut total = Settlement::empty(date);
    total.shards = shards;
    let archive_root = crate::layout::archive_root(data_dir, None)?;
    let anchors = crate::archive::load_anchors(data_dir, shards, anchor_key)?;
    for (index, anchor) in (0..shards).zip(&anchors) {
        let dir = crate::layout::shard_dir(data_dir, index).join("journal");
        let archive = crate::layout::archive_dir(data_dir, archive_root.as_deref(), index);
        let shard = settle_journal(&dir, &archive, anchor.as_ref(), date)
            .with_context(|| format!("shard {index}: reading {}", dir.display()))?;
        total.merge(shard);
    }
    Ok(total)
}

/// One journal's part of the settlement, retrying scans that may have raced with the writer.
fn settle_journal(
    dir: &Path,
    archive: &Path,
    anchor: Option<&crate::archive::Anchor>,
    date: Date,
) -> anyhow::Result<Settlement> {
    let mut attempt = 1;
    loop {
        let mut part = Settlement::empty(date);
        let start = match anchor {
            Some(a) => {
                part.seed(a);
                journal::Start::Pruned { anchor: a.link(), archive: Some(archive) }
            }
            None => journal::Start::Full { archive: Some(archive) },
        };
        let scanned = journal::read_from(dir, start, |seq, payload| {
            let entry = Entry::decode(payload)
                .map_err(|e| JournalError::Rejected { seq, reason: e.to_string() })?;
            part.add(&entry);
            Ok(())
        });
        match scanned {
            Ok(summary) => {
                if let Some(torn) = &summary.torn_tail {
                    tracing::info!(
                        journal = %dir.display(),
                        seq = torn.seq,
                        "journal ends in a batch still being written (or torn); stopped before it"
                    );
                }
                return Ok(part);
            }
            // A segment the server archived between listing and reading shows as a gap or
            // as a file gone: read again.
            Err(e @ (JournalError::Corrupt { .. } | JournalError::Io { .. }))
                if attempt < SCAN_ATTEMPTS =>
            {
                tracing::info!(journal = %dir.display(), error = %e, attempt, "rescanning");
                attempt += 1;
                std::thread::sleep(SCAN_RETRY_PAUSE);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signature

use crate::hex::{decode_lower as from_lower_hex, encode as to_hex};

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + body.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(body);
    message
}

/// Appends the line `# signature ed25519 <128 hex>` (and a newline before it if `csv` does not
/// end with one). The signature covers every byte before that line.
pub fn sign(csv: &str, key: &Ed25519KeyPair) -> String {
    let mut out = String::with_capacity(csv.len() + SIGNATURE_PREFIX.len() + 130);
    out.push_str(csv);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let signature = key.sign(&signed_message(out.as_bytes()));
    out.push_str(SIGNATURE_PREFIX);
    out.push_str(&to_hex(signature.as_ref()));
    out.push('\n');
    out
}

/// `(everything up to and including the last newline, the rest)`.
fn split_last_line(text: &str) -> (&str, &str) {
    match text.rfind('\n') {
        Some(i) => text.split_at(i + 1),
        None => ("", text),
    }
}

/// Verifies a report produced by [`sign`] with the raw Ed25519 public key (`assertion.pub`).
/// Fails on any altered byte, and when the last line is missing or not exactly
/// `# signature ed25519 <128 lowercase hex digits>\n`.
pub fn check(signed: &str, public_key: &[u8; 32]) -> Result<(), ReportError> {
    let Some(without_newline) = signed.strip_suffix('\n') else {
        let (_, line) = split_last_line(signed);
        return Err(if line.starts_with("# signature") {
            ReportError::MalformedSignature("the signature line must end with a newline")
        } else {
            ReportError::MissingSignature
        });
    };
    let (body, line) = split_last_line(without_newline);
    if !line.starts_with("# signature") {
        return Err(ReportError::MissingSignature);
    }
    let hex = line
        .strip_prefix(SIGNATURE_PREFIX)
        .ok_or(ReportError::MalformedSignature("expected `# signature ed25519 <hex>`"))?;
    if hex.len() != 128 {
        return Err(ReportError::MalformedSignature("expected 128 hex digits"));
    }
    let signature = from_lower_hex(hex)
        .ok_or(ReportError::MalformedSignature("expected 128 lowercase hex digits"))?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signed_message(body.as_bytes()), &signature)
        .map_err(|_| ReportError::BadSignature)
}

// ---------------------------------------------------------------------------------------------
// CLI glue

/// CLI glue for the settlement report: computes the settlement of `date` (YYYY-MM-DD, UTC) from
/// `data`, signs it with `keys/assertion.key` and writes it to `out` (atomically) or stdout.
/// Returns whether the day reconciled.
pub fn run_settlement(
    data: &Path,
    keys: &Path,
    date: &str,
    out: Option<&Path>,
) -> anyhow::Result<bool> {
    let date = Date::parse(date)?;
    let key_path = keys.join(keys::ASSERTION_KEY);
    let key = keys::load_assertion_key(&key_path)
        .with_context(|| format!("loading the report signing key {}", key_path.display()))?;
    let public: [u8; 32] = ring::signature::KeyPair::public_key(&key)
        .as_ref()
        .try_into()
        .context("assertion key has no 32-byte public key")?;
    let report = settlement_with(data, date, Some(&public))?;
    let signed = sign(&report.to_csv(), &key);
    match out {
        Some(path) => crate::durable_write(path, signed.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(signed.as_bytes()).context("writing the report to stdout")?;
            stdout.flush().context("writing the report to stdout")?;
        }
    }
    Ok(report.reconciled())
}

/// CLI glue for checking a report: verifies the signature of a report file with
/// `keys/assertion.pub`. `Ok` means every byte is as signed.
pub fn run_check(file: &Path, keys: &Path) -> anyhow::Result<()> {
    let public = keys::load_assertion_public(&keys.join(keys::ASSERTION_PUB))?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{}: not a report (not UTF-8 text)", file.display()))?;
    check(&text, &public).with_context(|| format!("{}", file.display()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use citycard_protocol::{Amount, Atc, CardId, KeyVersion, Mac};
    use ring::rand::SystemRandom;

    use crate::engine::entry::HotlistChange;

    #[test]
    fn civil_days_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(1970, 1, 2), 1);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2000, 1, 1), 10_957);
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(2024, 3, 1), 19_783);
        // 2023-11-14T22:13:20Z is Unix second 1 700 000 000.
        assert_eq!(days_from_civil(2023, 11, 14), 1_700_000_000 / 86_400);
        assert_eq!(days_from_civil(0, 3, 1), -719_468);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let d = Date::parse("2024-02-29").unwrap();
        assert_eq!(d.start_ms(), 19_782 * DAY_MS);
        assert_eq!(d.end_ms(), Date::parse("2024-03-01").unwrap().start_ms());
        assert_eq!(Date::from_unix_ms(1_700_000_000_000).to_string(), "2023-11-14");
        assert_eq!(Date::from_unix_ms(0).to_string(), "1970-01-01");
        assert_eq!(Date::from_unix_ms(DAY_MS as u64 - 1).to_string(), "1970-01-01");
        assert_eq!(Date::from_unix_ms(DAY_MS as u64).to_string(), "1970-01-02");
        // Extremes neither panic nor overflow.
        let far = Date::from_unix_ms(u64::MAX);
        assert!(far.start_ms() > 0 && far.end_ms() >= far.start_ms());
        assert_eq!(Date::from_days(far.days()), far);
        for days in [i64::MIN, i64::MAX] {
            let d = Date::from_days(days);
            assert_eq!(Date::from_days(d.days()), d);
            let _ = (d.start_ms(), d.end_ms(), d.to_string());
        }
        assert!(Date::new(i64::MIN, 1, 1).is_none());
        assert!(Date::new(MAX_YEAR + 1, 1, 1).is_none());
    }

    #[test]
    fn civil_days_round_trip_over_centuries() {
        let mut expected = days_from_civil(1599, 1, 1);
        for year in 1599..=2401 {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month) {
                    assert_eq!(days_from_civil(year, month, day), expected, "{year}-{month}-{day}");
                    assert_eq!(civil_from_days(expected), (year, month, day));
                    expected += 1;
                }
            }
        }
    }

    #[test]
    fn leap_rules() {
        for leap in [1600, 2000, 2004, 2024, 2400] {
            assert!(is_leap_year(leap), "{leap}");
            assert!(Date::new(leap, 2, 29).is_some());
        }
        for common in [1700, 1800, 1900, 2023, 2100, 2200, 2300] {
            assert!(!is_leap_year(common), "{common}");
            assert!(Date::new(common, 2, 29).is_none());
        }
        let len = |y| days_from_civil(y + 1, 1, 1) - days_from_civil(y, 1, 1);
        assert_eq!(len(1900), 365);
        assert_eq!(len(2000), 366);
        assert_eq!(len(2023), 365);
        assert_eq!(len(2024), 366);
    }

    #[test]
    fn dates_parse_strictly() {
        for ok in ["1970-01-01", "2000-03-01", "2024-02-29", "9999-12-31", "0000-01-01"] {
            assert_eq!(Date::parse(ok).unwrap().to_string(), ok);
            assert_eq!(ok.parse::<Date>().unwrap().to_string(), ok);
        }
        for bad in [
            "",
            "2024-2-29",
            "2024-02-29 ",
            " 2024-02-29",
            "2024/02/29",
            "24-02-29",
            "2023-02-29",
            "1900-02-29",
            "2024-00-10",
            "2024-13-01",
            "2024-04-31",
            "2024-01-00",
            "2024-01-32",
            "+024-01-01",
            "2024-0a-01",
            "2024-01-1\n",
            "20240229",
            "2024-02-29T00:00",
            "２０２４-02-29",
        ] {
            let err = Date::parse(bad).expect_err(bad);
            assert!(matches!(err, ReportError::BadDate(_)), "{bad}");
            assert!(err.to_string().contains("YYYY-MM-DD"), "{err}");
        }
    }

    fn entry(kind: EntryKind, status: Status, amount: i64, time_ms: u64, terminal: &str) -> Entry {
        Entry {
            kind,
            status,
            card_id: CardId(6_000_000_000_000_001),
            atc: Atc(0),
            amount: Amount(amount),
            balance_after: Amount(0),
            time_ms,
            reference: 0,
            binding: Mac::default(),
            other_card: CardId(0),
            key_version: KeyVersion(1),
            hotlist_version: 0,
            hotlist_change: HotlistChange::None,
            extra: 0,
            terminal: terminal.into(),
            prev_pos: crate::journal::Pos::NONE,
            transit: crate::engine::decide::transit::Transit::NONE,
            product: None,
            numbered: crate::engine::entry::Numbered::NONE,
        }
    }

    fn write_journal(data: &Path, entries: &[Entry]) {
        std::fs::create_dir_all(data).unwrap();
        std::fs::write(data.join("shards"), "1\n").unwrap();
        let dir = crate::layout::shard_dir(data, 0).join("journal");
        let options = journal::JournalOptions { segment_bytes: 64 * 1024, ..Default::default() };
        let mut j = journal::Journal::open(&dir, options, |_, _| Ok(())).unwrap();
        let mut buf = Vec::new();
        for e in entries {
            e.encode(&mut buf);
            j.append(&buf).unwrap();
        }
        j.commit().unwrap();
    }

    #[test]
    fn settles_one_day_and_detects_money_outside_the_totals() {
        use EntryKind::*;
        let day = Date::parse("2024-02-29").unwrap();
        let t0 = day.start_ms() as u64;
        let before = t0 - 1;
        let last = day.end_ms() as u64 - 1;
        let after = day.end_ms() as u64;
        let approved = Status::Approved;
        let entries = vec![
            entry(Issue, approved, 1_000, before, "counter-1"),
            entry(Purchase, approved, -100, before, "reader-1"),
            entry(Issue, approved, 500, t0, "counter-1"),
            entry(Issue, Status::InvalidAmount, 0, t0, "counter-1"),
            entry(Purchase, approved, -30, t0 + 5, "reader-1"),
            entry(Purchase, Status::InsufficientFunds, 0, t0 + 6, "reader-1"),
            entry(Offline, approved, -20, last, "reader-2"),
            entry(TopUp, approved, 200, t0 + 7, "kiosk-1"),
            entry(Identity, approved, 0, t0 + 8, "kiosk-1"),
            entry(ReplacedOut, approved, -700, t0 + 9, "counter-1"),
            entry(Close, approved, -400, t0 + 10, "counter-1"),
            entry(Block, approved, 0, t0 + 11, "counter-1"),
            entry(Purchase, approved, -1, after, "reader-1"),
        ];
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        write_journal(&data, &entries);
        let s = settlement(&data, day).unwrap();
        assert_eq!(s.records, entries.len() as u64);
        assert_eq!(
            s.row("counter-1", Operation::Deposit),
            Row { count: 1, amount: 500, declined: 1 }
        );
        assert_eq!(
            s.row("reader-1", Operation::Purchase),
            Row { count: 1, amount: 30, declined: 1 }
        );
        assert_eq!(
            s.row("reader-2", Operation::Offline),
            Row { count: 1, amount: 20, declined: 0 }
        );
        assert_eq!(s.row("kiosk-1", Operation::TopUp), Row { count: 1, amount: 200, declined: 0 });
        assert_eq!(s.row("kiosk-1", Operation::Identity), Row { count: 1, amount: 0, declined: 0 });
        assert_eq!(s.row("counter-1", Operation::Replacement).amount, 700);
        assert_eq!(s.row("counter-1", Operation::Refund).amount, 400);
        assert_eq!(s.rows.len(), 7, "{:?}", s.rows);
        assert_eq!(s.balances_start, 900);
        assert_eq!(s.net(), 500 + 200 - 30 - 20 - 400);
        assert_eq!(s.balances_end, 900 + 250);
        assert!(s.reconciled());
        let csv = s.to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines[1], "2024-02-29,counter-1,deposit,1,500,1");
        assert_eq!(lines[2], "2024-02-29,counter-1,refund,1,400,0");
        assert_eq!(lines[3], "2024-02-29,counter-1,replacement,1,700,0");
        assert_eq!(lines[4], "2024-02-29,kiosk-1,identity,1,0,0");
        assert_eq!(lines[5], "2024-02-29,kiosk-1,top_up,1,200,0");
        assert_eq!(lines[6], "2024-02-29,reader-1,purchase,1,30,1");
        assert_eq!(lines[7], "2024-02-29,reader-2,offline,1,20,0");
        assert_eq!(
            lines[8],
            "# net 250 = deposits 500 + top_ups 200 - purchases 30 - offline 20 - refunds 400"
        );
        assert_eq!(
            &lines[9..],
            ["# balances_start 900", "# balances_end 1150", "# reconciled yes"]
        );

        // Money moved by an entry the totals do not cover: the day does not reconcile.
        let mut broken = entries.clone();
        broken.push(entry(Block, approved, -5, t0 + 12, "counter-1"));
        let data2 = tmp.path().join("data2");
        write_journal(&data2, &broken);
        let s = settlement(&data2, day).unwrap();
        assert!(!s.reconciled());
        assert!(s.to_csv().ends_with("# reconciled no\n"));

        // A quiet day: nothing but the balance carried over.
        let quiet = settlement(&data, Date::parse("2024-03-02").unwrap()).unwrap();
        assert!(quiet.rows.is_empty());
        assert_eq!((quiet.balances_start, quiet.balances_end), (1_149, 1_149));
        assert!(quiet.reconciled());
    }

    #[test]
    fn missing_or_malformed_data_dirs_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let day = Date::parse("2024-02-29").unwrap();
        let err = settlement(tmp.path(), day).unwrap_err();
        assert!(format!("{err:#}").contains("shard count"), "{err:#}");
        assert!(!tmp.path().join("shards").exists(), "the report must not create files");
        std::fs::write(tmp.path().join("shards"), "2\n").unwrap();
        let err = settlement(tmp.path(), day).unwrap_err();
        assert!(format!("{err:#}").contains("shard 0"), "{err:#}");
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("reader-1"), "reader-1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    fn key_pair() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    #[test]
    fn signature_covers_every_byte() {
        use ring::signature::KeyPair as _;
        let key = key_pair();
        let public: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
        let body = format!("{CSV_HEADER}\n2024-02-29,reader-1,purchase,1,30,1\n# reconciled yes\n");
        let signed = sign(&body, &key);
        assert!(signed.starts_with(&body));
        let last = signed.lines().last().unwrap();
        assert!(last.starts_with(SIGNATURE_PREFIX));
        assert_eq!(last.len(), SIGNATURE_PREFIX.len() + 128);
        assert_eq!(check(&signed, &public), Ok(()));

        // Flipping any bit of any byte fails (or makes the text invalid UTF-8).
        let bytes = signed.as_bytes();
        for i in 0..bytes.len() {
            for bit in [0x01u8, 0x20] {
                let mut altered = bytes.to_vec();
                altered[i] ^= bit;
                if let Ok(text) = String::from_utf8(altered) {
                    assert!(check(&text, &public).is_err(), "byte {i} bit {bit:#x} unnoticed");
                }
            }
        }
        // Removed or added bytes.
        assert!(check(&signed[1..], &public).is_err());
        assert_eq!(
            check(&signed[..signed.len() - 1], &public),
            Err(ReportError::MalformedSignature("the signature line must end with a newline"))
        );
        assert!(check(&format!("{signed}\n"), &public).is_err());
        assert!(check(&format!("{signed}x\n"), &public).is_err());
        assert_eq!(check(&format!(" {signed}"), &public), Err(ReportError::BadSignature));
        // Missing or malformed signature lines.
        assert_eq!(check(&body, &public), Err(ReportError::MissingSignature));
        assert_eq!(check("", &public), Err(ReportError::MissingSignature));
        let hex = &last[SIGNATURE_PREFIX.len()..];
        for line in [
            format!("# signature ed25519 {}", &hex[..126]),
            format!("# signature ed25519 {hex}00"),
            format!("# signature ed25519 {}", hex.to_uppercase()),
            format!("# signature ed25519  {hex}"),
            format!("# signature rsa {hex}"),
            "# signature".to_string(),
        ] {
            let text = format!("{body}{line}\n");
            assert!(
                matches!(check(&text, &public), Err(ReportError::MalformedSignature(_))),
                "{line}"
            );
        }
        // Another key.
        let other = key_pair();
        let other_public: [u8; 32] = other.public_key().as_ref().try_into().unwrap();
        assert_eq!(check(&signed, &other_public), Err(ReportError::BadSignature));
        // A body without a final newline gets one; an empty body is signable too.
        let signed = sign("no newline", &key);
        assert!(signed.starts_with("no newline\n# signature ed25519 "));
        assert_eq!(check(&signed, &public), Ok(()));
        let signed = sign("", &key);
        assert!(signed.starts_with(SIGNATURE_PREFIX));
        assert_eq!(check(&signed, &public), Ok(()));
        // The plain body bytes (without the context) are not what is signed.
        let raw = key.sign(body.as_bytes());
        let forged = format!("{body}{SIGNATURE_PREFIX}{}\n", to_hex(raw.as_ref()));
        assert_eq!(check(&forged, &public), Err(ReportError::BadSignature));
    }
}
