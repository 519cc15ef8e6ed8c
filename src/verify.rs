//! `citycard verify`: an offline audit of a data directory. It re-reads every journal (CRC and
//! hash chain), re-derives every card's balance with its own small ledger (independent of the
//! engine's apply code), compares sled's state with that replay, and checks that the sum of
//! balances equals the journal's net money flow.
//!
//! Card deposits (protocol 1.3) are audited apart from balances the same way: every deposit a
//! record moves must follow from the card's deposit before it, sled's product and deposit of
//! each card must match the replay, and the deposits held must equal those paid minus those
//! paid back and kept. A debit counted against a daily limit must move the card's counters by
//! exactly itself (from zero on a new UTC day), and sled's counters must match the replay.
//!
//! A shard whose archive was pruned (`citycard archive prune`) has a signed anchor: its
//! signature is checked with `assertion.pub`, its own sums must agree, and the audit starts
//! from the cards and money it holds, with the chain required to continue from its hash.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use citycard_protocol::{CardId, EntryKind, Status};

use crate::archive::Anchor;
use crate::engine::entry::Entry;
use crate::engine::state;
use crate::journal;

/// The auditor's view of one card.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    balance: i64,
    last_atc: u32,
    /// Bit i set: ATC `last_atc - i` was used (the late-ATC window of PROTOCOL.md 6.1).
    recent_atcs: u64,
    retired: bool,
    /// The open tap-in hold (protocol 1.2), as the journal's transit entries leave it.
    hold: crate::engine::decide::transit::Hold,
    /// The card's product, the deposit held for it and its daily counters (protocol 1.3).
    product: u8,
    deposit: i64,
    daily: crate::engine::product::Daily,
}

impl Ledger {
    fn new(balance: i64) -> Ledger {
        Ledger { balance, ..Ledger::default() }
    }

    /// Records a use of `atc`, or says why it breaks the exactly-once rules. Online ATCs must
    /// be new and above `last_atc - ATC_LATE_WINDOW`; offline ATCs may be older, and only their
    /// reuse inside the window can be seen here (the engine's index checks the rest).
    fn use_atc(&mut self, atc: u32, online: bool) -> Result<(), String> {
        if atc > self.last_atc {
            let shift = atc - self.last_atc;
            self.recent_atcs = if shift >= 64 { 0 } else { self.recent_atcs << shift };
            self.recent_atcs |= 1;
            self.last_atc = atc;
            return Ok(());
        }
        let below = self.last_atc - atc;
        if online && (atc == 0 || below >= citycard_protocol::ATC_LATE_WINDOW) {
            return Err(format!("ATC {atc} too far below the last one {}", self.last_atc));
        }
        if below < 64 {
            if self.recent_atcs & (1 << below) != 0 {
                return Err(format!("ATC {atc} used twice"));
            }
            self.recent_atcs |= 1 << below;
        }
        Ok(())
    }
}

/// Money flows over all shards, in minor units.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub deposits: i64,
    pub top_ups: i64,
    pub purchases: i64,
    pub offline: i64,
    pub refunds: i64,
    pub balances: i64,
    pub records: u64,
    pub cards: u64,
    /// Card deposits (protocol 1.3), apart from balances: held by the cards at the start
    /// (a prune anchor's), paid, paid back and kept (Replace under `keep`), and held now.
    pub card_deposits_at_start: i64,
    pub card_deposits_paid: i64,
    pub card_deposits_refunded: i64,
    pub card_deposits_kept: i64,
    pub card_deposits: i64,
}

impl Totals {
    /// The card deposits the records say are held: at the start, plus paid, minus paid back and
    /// kept.
    pub fn card_deposits_expected(&self) -> i64 {
        self.card_deposits_at_start + self.card_deposits_paid
            - self.card_deposits_refunded
            - self.card_deposits_kept
    }

    fn add(&mut self, other: &Totals) {
        self.deposits += other.deposits;
        self.top_ups += other.top_ups;
        self.purchases += other.purchases;
        self.offline += other.offline;
        self.refunds += other.refunds;
        self.balances += other.balances;
        self.records += other.records;
        self.cards += other.cards;
        self.card_deposits_at_start += other.card_deposits_at_start;
        self.card_deposits_paid += other.card_deposits_paid;
        self.card_deposits_refunded += other.card_deposits_refunded;
        self.card_deposits_kept += other.card_deposits_kept;
        self.card_deposits += other.card_deposits;
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub totals: Totals,
    pub problems: Vec<String>,
    pub torn_tails: Vec<String>,
    /// `(shard, last seq, hash of the last record)`: equal on a primary and its standby.
    pub heads: Vec<(u16, u64, [u8; 32])>,
    /// What is worth knowing and is not a problem (anchors, segments an interrupted prune left).
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Audits `data_dir`. Errors are for an unreadable directory; findings are in the report.
/// A pruned shard is a finding here (its anchor cannot be checked without a key): see
/// [`verify_with`].
pub fn verify(data_dir: &Path) -> anyhow::Result<Report> {
    verify_with(data_dir, None)
}

/// [`verify`], checking prune anchors with the assertion public key.
pub fn verify_with(data_dir: &Path, anchor_key: Option<&[u8; 32]>) -> anyhow::Result<Report> {
    let _lock = crate::layout::lock_data_dir(data_dir)?;
    let count: u16 = std::fs::read_to_string(data_dir.join("shards"))
        .with_context(|| {
            format!("{} has no shard count: not a citycard data directory", data_dir.display())
        })?
        .trim()
        .parse()
        .context("shard count malformed")?;
    let mut report = Report::default();
    for index in 0..count {
        audit_shard(data_dir, index, count, anchor_key, &mut report)?;
    }
    let t = &report.totals;
    let net = t.deposits + t.top_ups - t.purchases - t.offline - t.refunds;
    if net != t.balances {
        report.problems.push(format!(
            "sum of balances {} != deposits {} + top-ups {} - purchases {} - offline {} - refunds {} = {}",
            t.balances, t.deposits, t.top_ups, t.purchases, t.offline, t.refunds, net
        ));
    }
    if t.card_deposits != t.card_deposits_expected() {
        report.problems.push(card_deposits_problem(t));
    }
    Ok(report)
}

/// The finding when the deposits the cards hold are not the ones the records moved.
pub(crate) fn card_deposits_problem(t: &Totals) -> String {
    format!(
        "card deposits held {} != at start {} + paid {} - paid back {} - kept {} = {}",
        t.card_deposits,
        t.card_deposits_at_start,
        t.card_deposits_paid,
        t.card_deposits_refunded,
        t.card_deposits_kept,
        t.card_deposits_expected()
    )
}

fn audit_shard(
    data_dir: &Path,
    index: u16,
    count: u16,
    anchor_key: Option<&[u8; 32]>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let dir = crate::layout::shard_dir(data_dir, index);
    let anchor = match (Anchor::exists(&dir), anchor_key) {
        (false, _) => None,
        (true, None) => {
            report.problems.push(format!(
                "shard {index}: pruned, and its anchor cannot be checked without assertion.pub \
                 (pass --keys)"
            ));
            return Ok(());
        }
        (true, Some(key)) => match Anchor::load(&dir, key) {
            Ok(anchor) => anchor,
            Err(e) => {
                report.problems.push(format!(
                    "shard {index}: {e}; the records it stands for are gone, so the shard \
                     cannot be audited"
                ));
                return Ok(());
            }
        },
    };
    let db = crate::engine::recovery::open_sled(
        &dir.join("state"),
        &mut crate::host::SystemHost::default(),
    );
    let db = match db {
        Ok(db) => Some(db),
        Err(e) if e.is_environment() => {
            report.problems.push(format!(
                "shard {index}: state cannot be opened ({e}); the server refuses to start until \
                 this is fixed"
            ));
            None
        }
        Err(e) => {
            report
                .problems
                .push(format!("shard {index}: state unreadable ({e}); a restart rebuilds it"));
            None
        }
    };
    let applied = match &db {
        Some(db) => db.get(state::META_APPLIED)?.and_then(|v| state::be_u64(&v)).unwrap_or(0),
        None => 0,
    };
    let mut ledger: BTreeMap<CardId, Ledger> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut totals = Totals::default();
    let archive_root = crate::layout::archive_root(data_dir, None)?;
    let archive = crate::layout::archive_dir(data_dir, archive_root.as_deref(), index);
    let start = match &anchor {
        Some(a) => {
            seed_from_anchor(index, count, a, &archive, &mut ledger, &mut totals, report)?;
            journal::Start::Pruned { anchor: a.link(), archive: Some(&archive) }
        }
        None => journal::Start::Full { archive: Some(&archive) },
    };
    let start_seq = anchor.as_ref().map_or(0, |a| a.seq);
    if applied != 0 && applied < start_seq {
        problems.push(format!(
            "shard {index}: state applied up to seq {applied}, below the prune anchor at {start_seq}"
        ));
    }
    let mut snapshot: Option<BTreeMap<CardId, Ledger>> =
        (applied <= start_seq).then(|| ledger.clone());
    let summary = journal::read_from(&dir.join("journal"), start, |seq, payload| {
        totals.records += 1;
        match Entry::decode(payload) {
            Ok(entry) => {
                check_entry(index, count, seq, &entry, &mut ledger, &mut totals, &mut problems)
            }
            Err(e) => problems.push(format!("shard {index} seq {seq}: {e}")),
        }
        if seq == applied {
            snapshot = Some(ledger.clone());
        }
        Ok(())
    });
    let summary = match summary {
        Ok(summary) => summary,
        Err(e) => {
            report.problems.push(format!("shard {index}: journal: {e}"));
            return Ok(());
        }
    };
    let visited = totals.records;
    totals.records += start_seq;
    if anchor.is_some() && visited == 0 {
        problems.push(format!("shard {index}: no journal records after the prune anchor"));
    }
    if let Some(torn) = &summary.torn_tail {
        report.torn_tails.push(format!("shard {index}: {torn:?} (truncated on next start)"));
    }
    match crate::replicate::standby::chain_head(&dir.join("journal"), &archive, summary.last_seq) {
        Some(head) => report.heads.push((index, summary.last_seq, head)),
        None => problems.push(format!("shard {index}: last record unreadable")),
    }
    check_checkpoint(index, &dir, applied, &mut problems);
    if applied > summary.last_seq {
        problems.push(format!(
            "shard {index}: state applied up to seq {applied} but the journal ends at {}",
            summary.last_seq
        ));
    }
    if let (Some(db), Some(snapshot)) = (&db, &snapshot) {
        compare_state(index, db, snapshot, &mut problems)?;
    }
    totals.balances = balances(&ledger);
    totals.card_deposits = card_deposits(&ledger);
    totals.cards = ledger.len() as u64;
    report.totals.add(&totals);
    report.problems.extend(problems);
    Ok(())
}

/// Sum of the balances of the cards in `ledger`.
pub(crate) fn balances(ledger: &BTreeMap<CardId, Ledger>) -> i64 {
    ledger.values().map(|l| l.balance).sum()
}

/// Sum of the card deposits held by the cards in `ledger`.
pub(crate) fn card_deposits(ledger: &BTreeMap<CardId, Ledger>) -> i64 {
    ledger.values().map(|l| l.deposit).sum()
}

/// Starts a pruned shard's audit from its anchor: the anchor must be this shard's, its cards
/// this shard's, and its own sums must agree (cards' balances = money flows = the net).
pub(crate) fn seed_from_anchor(
    index: u16,
    count: u16,
    anchor: &Anchor,
    archive: &Path,
    ledger: &mut BTreeMap<CardId, Ledger>,
    totals: &mut Totals,
    report: &mut Report,
) -> anyhow::Result<()> {
    let problems = &mut report.problems;
    if anchor.shard != index || anchor.shard_count != count {
        problems.push(format!(
            "shard {index}: the anchor is shard {}'s of {}",
            anchor.shard, anchor.shard_count
        ));
    }
    for (id, card) in &anchor.cards {
        if crate::engine::shard_of(*id, count) != index {
            problems
                .push(format!("shard {index}: anchor holds card {} of another shard", id.masked()));
        }
        ledger.insert(
            *id,
            Ledger {
                balance: card.record.balance.0,
                last_atc: card.record.last_atc.0,
                recent_atcs: card.recent_atcs,
                retired: card.record.retired(),
                hold: card.record.hold,
                product: card.record.product.id,
                deposit: card.record.product.deposit.0,
                daily: card.record.product.daily,
            },
        );
        totals.card_deposits_at_start += card.record.product.deposit.0;
    }
    let sums = anchor.totals();
    if anchor.balances() != sums.balance_change || sums.balance_change != sums.net() {
        problems.push(format!(
            "shard {index}: anchor sums disagree: cards hold {}, the days' amounts {}, their net {}",
            anchor.balances(),
            sums.balance_change,
            sums.net()
        ));
    }
    if sums.records != anchor.seq {
        problems.push(format!(
            "shard {index}: anchor accounts for {} records but stands for seq 1..={}",
            sums.records, anchor.seq
        ));
    }
    totals.deposits += sums.deposits;
    totals.top_ups += sums.top_ups;
    totals.purchases += sums.purchases;
    totals.offline += sums.offline;
    totals.refunds += sums.refunds;
    let leftovers =
        journal::list_segments(archive)?.iter().filter(|(first, _)| *first <= anchor.seq).count();
    let before = crate::report::Date::from_days(anchor.before_days);
    report.notes.push(format!(
        "shard {index}: pruned before {before}: records 1..={} are gone, their signed anchor \
         checks ({} cards, {} days)",
        anchor.seq,
        anchor.cards.len(),
        anchor.days.len()
    ));
    if leftovers > 0 {
        report.notes.push(format!(
            "shard {index}: {leftovers} archived segment(s) at or below the anchor remain (an \
             interrupted prune); `citycard archive prune` removes them"
        ));
    }
    Ok(())
}

/// Checks one record against the ledger and applies it. `count` 0: the shard count is not
/// known (an archive checked alone), so who owns an issued card is not checked.
pub(crate) fn check_entry(
    shard: u16,
    count: u16,
    seq: u64,
    e: &Entry,
    ledger: &mut BTreeMap<CardId, Ledger>,
    totals: &mut Totals,
    problems: &mut Vec<String>,
) {
    let at = |what: String| format!("shard {shard} seq {seq} card {}: {what}", e.card_id.masked());
    if e.is_note() {
        // A numbered offline record refused before it reached the card (protocol 1.3): it
        // touches no card, and may name one that does not exist (`Entry::check` holds the rest).
        if e.amount.0 != 0 || e.status == Status::Approved {
            problems.push(at(format!("refusal note ({:?}) moved {}", e.status, e.amount.0)));
        }
        return;
    }
    if e.status != Status::Approved {
        if e.amount.0 != 0 {
            problems.push(at(format!("declined ({:?}) but moved {}", e.status, e.amount.0)));
        }
        if let Some(l) = ledger.get_mut(&e.card_id) {
            if l.balance != e.balance_after.0 && e.kind != EntryKind::Issue {
                problems.push(at(format!(
                    "declined record shows balance {} but the card had {}",
                    e.balance_after.0, l.balance
                )));
            }
            if e.uses_atc() {
                if let Err(what) = l.use_atc(e.atc.0, e.kind != EntryKind::Offline) {
                    problems.push(at(what));
                }
            }
        }
        return;
    }
    if e.kind == EntryKind::Issue {
        if ledger.contains_key(&e.card_id) {
            problems.push(at("issued twice".into()));
        }
        if count != 0 && crate::engine::shard_of(e.card_id, count) != shard {
            problems.push(at("issued by a shard that does not own it".into()));
        }
        if e.amount.0 != e.balance_after.0 || e.amount.0 < 0 {
            problems.push(at(format!("deposit {} but balance {}", e.amount.0, e.balance_after.0)));
        }
        totals.deposits += e.amount.0;
        let mut card = Ledger::new(e.balance_after.0);
        if let Some(p) = &e.product {
            if p.after.deposit.0 != p.deposit_paid || p.deposit_refunded != 0 || p.deposit_kept != 0
            {
                problems.push(at(format!(
                    "issued with deposit {} but {} paid",
                    p.after.deposit.0, p.deposit_paid
                )));
            }
            card.product = p.after.id;
            card.deposit = p.after.deposit.0;
            card.daily = p.after.daily;
            totals.card_deposits_paid += p.deposit_paid;
        }
        ledger.insert(e.card_id, card);
        return;
    }
    let Some(l) = ledger.get_mut(&e.card_id) else {
        problems.push(at(format!("{:?} on a card never issued", e.kind)));
        return;
    };
    if l.balance + e.amount.0 != e.balance_after.0 {
        problems.push(at(format!(
            "balance chain broken: {} + {} != {}",
            l.balance, e.amount.0, e.balance_after.0
        )));
    }
    if l.retired && e.kind != EntryKind::Identity {
        problems.push(at(format!("{:?} approved on a closed or replaced card", e.kind)));
    }
    if e.uses_atc() {
        if let Err(what) = l.use_atc(e.atc.0, e.kind != EntryKind::Offline) {
            problems.push(at(what));
        }
    }
    l.balance = e.balance_after.0;
    match e.kind {
        EntryKind::TapIn if l.hold.is_open() => {
            problems.push(at("tap-in approved while a hold was open".into()))
        }
        EntryKind::TapOut | EntryKind::HoldExpired if !l.hold.is_open() => {
            problems.push(at(format!("{:?} approved without an open hold", e.kind)))
        }
        EntryKind::TapOut | EntryKind::HoldExpired if e.transit.ref_atc != l.hold.atc => {
            problems.push(at(format!("{:?} completes another hold than the open one", e.kind)))
        }
        _ => {}
    }
    if matches!(e.kind, EntryKind::TapIn | EntryKind::TapOut | EntryKind::HoldExpired) {
        l.hold = e.transit.hold;
    }
    let new_card = check_deposit(e, l, totals, problems, &at);
    let sign_ok = match e.kind {
        EntryKind::Purchase => {
            totals.purchases -= e.amount.0;
            e.amount.0 < 0
        }
        EntryKind::Offline => {
            totals.offline -= e.amount.0;
            e.amount.0 < 0
        }
        EntryKind::TopUp => {
            totals.top_ups += e.amount.0;
            e.amount.0 > 0
        }
        // Fares of holds are money spent like purchases; a reversal gives a purchase back.
        EntryKind::TapOut | EntryKind::HoldExpired => {
            totals.purchases -= e.amount.0;
            e.amount.0 <= 0
        }
        EntryKind::Reversal => {
            totals.purchases -= e.amount.0;
            e.amount.0 > 0
        }
        EntryKind::Close => {
            totals.refunds -= e.amount.0;
            l.retired = true;
            // A refund empties the card; a blocked debtor closes with its debt kept.
            let emptied = e.balance_after.0 == 0 || (e.balance_after.0 < 0 && e.amount.0 == 0);
            emptied && e.extra == -e.amount.0 && e.extra >= 0
        }
        EntryKind::ReplacedOut => {
            l.retired = true;
            let moved = -e.amount.0;
            if ledger.contains_key(&e.other_card) {
                problems.push(at("replacement card id already in use".into()));
            }
            let (product, deposit) = new_card.unwrap_or_default();
            ledger.insert(e.other_card, Ledger { product, deposit, ..Ledger::new(moved) });
            // The balance moved, or a blocked debtor's debt stayed on the old card.
            e.balance_after.0 == 0 || (e.balance_after.0 < 0 && e.amount.0 == 0)
        }
        _ => e.amount.0 == 0,
    };
    if !sign_ok {
        problems.push(at(format!(
            "{:?} with amount {} and balance after {}",
            e.kind, e.amount.0, e.balance_after.0
        )));
    }
}

/// Applies an approved record's product fields to its card (protocol 1.3: deposit, daily
/// counters), or says why they do not follow from the card's before it. Returns, for a
/// Replace, the new card's product and deposit (it starts without counters).
fn check_deposit(
    e: &Entry,
    l: &mut Ledger,
    totals: &mut Totals,
    problems: &mut Vec<String>,
    at: &dyn Fn(String) -> String,
) -> Option<(u8, i64)> {
    let Some(p) = &e.product else {
        // Without product fields nothing about the product changed; a card that holds a
        // deposit cannot be closed or replaced without saying where the deposit went.
        if matches!(e.kind, EntryKind::Close | EntryKind::ReplacedOut) && l.deposit != 0 {
            problems.push(at(format!(
                "{:?} left the card's deposit {} unaccounted",
                e.kind, l.deposit
            )));
        }
        return (e.kind == EntryKind::ReplacedOut).then_some((l.product, 0));
    };
    let before = l.deposit;
    let (paid, refunded, kept) = (p.deposit_paid, p.deposit_refunded, p.deposit_kept);
    totals.card_deposits_paid += paid;
    totals.card_deposits_refunded += refunded;
    totals.card_deposits_kept += kept;
    let after = p.after.deposit.0;
    let mut new_card = None;
    let consistent = match e.kind {
        EntryKind::ProductChanged => kept == 0 && after == before + paid - refunded,
        EntryKind::Close => after == 0 && refunded == before && paid == 0 && kept == 0,
        EntryKind::ReplacedOut => {
            // The old card ends with none; the new card holds what moved plus what was paid.
            new_card = Some((p.after.id, before - kept + paid));
            after == 0 && refunded == 0 && (kept == 0 || kept == before)
        }
        // Any other record only carries the card's product state: a debit counted against a
        // daily limit (PROTOCOL.md 6.12). A purchase counts its amount and one debit; a tap-in
        // one debit; a tap-out's or an expiry's fare its amount, on the day it is charged.
        _ => {
            let mut daily = l.daily.today(e.time_ms);
            let counted = match e.kind {
                EntryKind::Purchase => Some((-e.amount.0, 1)),
                EntryKind::TapIn => Some((0, 1)),
                EntryKind::TapOut | EntryKind::HoldExpired => Some((-e.amount.0, 0)),
                _ => None,
            };
            if let Some((amount, count)) = counted {
                daily.amount = daily.amount.saturating_add(amount);
                daily.count = daily.count.saturating_add(count);
            }
            if counted.is_none() || p.after.daily != daily {
                problems.push(at(format!(
                    "{:?} moved the daily counters {:?} to {:?}",
                    e.kind, l.daily, p.after.daily
                )));
            }
            paid == 0 && refunded == 0 && kept == 0 && after == before && p.after.id == l.product
        }
    };
    if !consistent {
        problems.push(at(format!(
            "{:?} deposit {before} -> {after} with {paid} paid, {refunded} paid back, {kept} kept",
            e.kind
        )));
    }
    l.product = p.after.id;
    l.deposit = after;
    l.daily = p.after.daily;
    new_card
}

/// A checkpoint must lie on the journal's chain, and the state must be at or past it.
fn check_checkpoint(index: u16, dir: &Path, applied: u64, problems: &mut Vec<String>) {
    let checkpoint = match crate::engine::checkpoint::Checkpoint::load(dir) {
        Ok(Some(cp)) => cp,
        Ok(None) => return,
        Err(e) => {
            problems.push(format!("shard {index}: {e}; a restart reads the whole journal"));
            return;
        }
    };
    let start = journal::Start::Anchor(checkpoint.anchor());
    if let Err(e) = journal::read_from(&dir.join("journal"), start, |_, _| Ok(())) {
        problems.push(format!("shard {index}: checkpoint at seq {}: {e}", checkpoint.seq));
    }
    if applied != 0 && applied < checkpoint.seq {
        problems.push(format!(
            "shard {index}: state applied up to seq {applied}, behind its checkpoint at {}",
            checkpoint.seq
        ));
    }
}

fn compare_state(
    shard: u16,
    db: &sled::Db,
    expected: &BTreeMap<CardId, Ledger>,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut seen = 0usize;
    for item in db.scan_prefix([state::CARD]) {
        let (k, v) = item?;
        let id = CardId(state::be_u64(&k[1..]).unwrap_or(0));
        seen += 1;
        let Ok(record) = crate::engine::store::codec::decode(&v) else {
            problems.push(format!("shard {shard} card {}: state record malformed", id.masked()));
            continue;
        };
        match expected.get(&id) {
            None => problems.push(format!("shard {shard} card {}: in state but not in the journal", id.masked())),
            Some(l) if l.daily != record.product.daily => problems.push(format!(
                "shard {shard} card {}: state and journal replay disagree on the daily counters",
                id.masked()
            )),
            Some(l) if l.product != record.product.id || l.deposit != record.product.deposit.0 => {
                problems.push(format!(
                    "shard {shard} card {}: state says product {} deposit {}, journal replay says \
                     product {} deposit {}",
                    id.masked(),
                    record.product.id,
                    record.product.deposit.0,
                    l.product,
                    l.deposit
                ))
            }
            Some(l) if l.hold != record.hold => problems.push(format!(
                "shard {shard} card {}: state and journal replay disagree on the open hold",
                id.masked()
            )),
            Some(l) if l.balance != record.balance.0 || l.last_atc != record.last_atc.0 => problems.push(format!(
                "shard {shard} card {}: state says balance {} ATC {}, journal replay says {} ATC {}",
                id.masked(),
                record.balance.0,
                record.last_atc.0,
                l.balance,
                l.last_atc
            )),
            Some(_) => {}
        }
    }
    if seen != expected.len() {
        problems.push(format!(
            "shard {shard}: state holds {seen} cards, journal replay {}",
            expected.len()
        ));
    }
    Ok(())
}
