//! The offline part of a settlement (protocol 1.3, PROTOCOL.md 6.13): per terminal, the
//! terminal seqs recorded and the gaps among them (records taken but never uploaded), every
//! offline record refused with its status, and every record flagged uncertain with its
//! resolution by later ATCs of the same card.
//!
//! # Lines of the report
//!
//! After the rows and before `# net` (all covered by the signature), terminals in name order:
//!
//! ```text
//! # offline_seqs reader-1 highest 7 recorded 6 gaps 3
//! # offline_refused reader-1 seq 6 card ****0007 atc 3 BadCryptogram
//! # offline_refused reader-2 seq - card ****0012 atc 9 InvalidAmount
//! # offline_uncertain reader-1 seq 5 card ****0007 atc 2 completed
//! ```
//!
//! - `offline_seqs`: seqs recorded for the terminal by records used before the end of the day
//!   (a record's time is the terminal's time of use), the highest of them, and the gaps: every
//!   seq from 1 to the highest never recorded, as `a` or `a-b` ranges joined by `,` (`none`).
//!   SeqConflict refusals hold no seq and do not fill a gap.
//! - `offline_refused`: each offline record of the day that was journaled with a status other
//!   than Approved (`seq -` for a protocol 1.1 record, which has none).
//! - `offline_uncertain`: each record of the day flagged uncertain, `completed` when it was
//!   Approved and the journals read hold a card transaction of the same card with a higher ATC
//!   (the card's counter went past it), `refused` when it was not Approved, `unresolved`
//!   otherwise. A report made later can turn `unresolved` into `completed`.
//!
//! Cards are masked (last four digits). Each list keeps at most [`MAX_LISTED`] entries per
//! terminal; the rest is counted in a line `# offline_<list> TERMINAL N more not listed`.

use std::collections::{BTreeMap, HashMap};

use citycard_protocol::{Atc, CardId, EntryKind, Status};

use crate::engine::entry::Entry;

/// Most records (or gap ranges) listed per terminal and list: bounds the report of a reader
/// that lost its storage, while the count of the rest keeps the total true.
pub const MAX_LISTED: usize = 1_000;

/// A set of seqs kept as ranges (`start -> end`, inclusive, disjoint and not adjacent): a
/// terminal that uploads in order costs one range however many records it has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqSet {
    ranges: BTreeMap<u64, u64>,
}

impl SeqSet {
    pub fn insert(&mut self, seq: u64) {
        let below = self.ranges.range(..=seq).next_back().map(|(s, e)| (*s, *e));
        if below.is_some_and(|(_, end)| end >= seq) {
            return;
        }
        let mut start = seq;
        let mut end = seq;
        if let Some((s, e)) = below.filter(|(_, e)| e.checked_add(1) == Some(seq)) {
            start = s;
            end = e.max(seq);
        }
        if let Some(next_end) = seq.checked_add(1).and_then(|n| self.ranges.remove(&n)) {
            end = next_end;
        }
        self.ranges.insert(start, end);
    }

    fn union(&mut self, other: &SeqSet) {
        // Few ranges in practice; each range's seqs are added at its two ends and the rest
        // is filled by merging the ranges themselves.
        for (start, end) in &other.ranges {
            self.insert_range(*start, *end);
        }
    }

    fn insert_range(&mut self, start: u64, end: u64) {
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..=end.saturating_add(1))
            .filter(|(_, e)| e.saturating_add(1) >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        let (mut lo, mut hi) = (start, end);
        for (s, e) in overlapping {
            self.ranges.remove(&s);
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.ranges.insert(lo, hi);
    }

    /// The highest seq (0: none).
    pub fn highest(&self) -> u64 {
        self.ranges.values().next_back().copied().unwrap_or(0)
    }

    /// How many seqs.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s + 1).sum()
    }

    /// Every range of seqs from 1 to [`SeqSet::highest`] that is not in the set.
    pub fn gaps(&self) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut next = 1u64;
        for (start, end) in &self.ranges {
            if *start > next {
                gaps.push((next, start - 1));
            }
            next = end.saturating_add(1);
        }
        gaps
    }
}

/// How settlement resolves a record flagged uncertain (PROTOCOL.md 6.13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Approved, and the card has a later ATC: the card counted it.
    Completed,
    /// Not approved: nothing was charged.
    Refused,
    /// Approved, and no later ATC of the card has been seen.
    Unresolved,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Completed => "completed",
            Resolution::Refused => "refused",
            Resolution::Unresolved => "unresolved",
        }
    }
}

/// One listed offline record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its terminal seq; 0 for a protocol 1.1 record.
    pub seq: u64,
    pub card: CardId,
    pub atc: Atc,
    pub status: Status,
}

/// A bounded list of records, with the count of those left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bounded {
    pub listed: Vec<Listed>,
    pub more: u64,
}

impl Bounded {
    fn push(&mut self, item: Listed) {
        if self.listed.len() < MAX_LISTED {
            self.listed.push(item);
        } else {
            self.more += 1;
        }
    }

    fn extend(&mut self, other: Bounded) {
        self.more += other.more;
        for item in other.listed {
            self.push(item);
        }
        self.listed.sort_by_key(|l| (l.seq, l.card, l.atc));
    }
}

/// The offline part of one day's settlement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfflineSettlement {
    /// Per terminal: the seqs of numbered records used before the end of the day.
    pub seqs: BTreeMap<String, SeqSet>,
    /// Per terminal: the day's offline records journaled with a refusal.
    pub refused: BTreeMap<String, Bounded>,
    /// Per terminal: the day's records flagged uncertain.
    pub uncertain: BTreeMap<String, Bounded>,
    /// The highest ATC each card used, over every entry read (any day).
    last_atc: HashMap<CardId, u32>,
}

impl OfflineSettlement {
    /// Takes one journal entry into account (`start_ms..end_ms` is the day).
    pub fn add(&mut self, entry: &Entry, start_ms: i64, end_ms: i64) {
        let time = i128::from(entry.time_ms);
        let (start_ms, end_ms) = (i128::from(start_ms), i128::from(end_ms));
        if entry.uses_atc() {
            let last = self.last_atc.entry(entry.card_id).or_default();
            *last = (*last).max(entry.atc.0);
        }
        if entry.kind != EntryKind::Offline || time >= end_ms {
            return;
        }
        if entry.claims_seq() {
            self.seqs.entry(entry.terminal.clone()).or_default().insert(entry.numbered.seq);
        }
        if time < start_ms {
            return;
        }
        let listed = Listed {
            seq: entry.numbered.seq,
            card: entry.card_id,
            atc: entry.atc,
            status: entry.status,
        };
        if entry.status != Status::Approved {
            self.refused.entry(entry.terminal.clone()).or_default().push(listed);
        }
        if entry.numbered.uncertain {
            self.uncertain.entry(entry.terminal.clone()).or_default().push(listed);
        }
    }

    /// Adds another shard's part.
    pub fn merge(&mut self, other: OfflineSettlement) {
        for (terminal, seqs) in &other.seqs {
            self.seqs.entry(terminal.clone()).or_default().union(seqs);
        }
        for (terminal, list) in other.refused {
            self.refused.entry(terminal).or_default().extend(list);
        }
        for (terminal, list) in other.uncertain {
            self.uncertain.entry(terminal).or_default().extend(list);
        }
        // Cards belong to one shard each, so no card is in both maps.
        for (card, atc) in other.last_atc {
            let last = self.last_atc.entry(card).or_default();
            *last = (*last).max(atc);
        }
    }

    /// How an uncertain record stands.
    pub fn resolution(&self, record: &Listed) -> Resolution {
        if record.status != Status::Approved {
            Resolution::Refused
        } else if self.last_atc.get(&record.card).is_some_and(|last| *last > record.atc.0) {
            Resolution::Completed
        } else {
            Resolution::Unresolved
        }
    }

    /// The report lines (each ends in `\n`).
    pub fn lines(&self) -> String {
        let mut out = String::new();
        for (terminal, seqs) in &self.seqs {
            let gaps = seqs.gaps();
            let mut words: Vec<String> = gaps
                .iter()
                .take(MAX_LISTED)
                .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
                .collect();
            if words.is_empty() {
                words.push("none".into());
            }
            if gaps.len() > MAX_LISTED {
                words.push(format!("and {} more ranges", gaps.len() - MAX_LISTED));
            }
            out.push_str(&format!(
                "# offline_seqs {} highest {} recorded {} gaps {}\n",
                super::csv_field(terminal),
                seqs.highest(),
                seqs.count(),
                words.join(",")
            ));
        }
        for (terminal, list) in &self.refused {
            for l in &list.listed {
                out.push_str(&format!(
                    "# offline_refused {} seq {} card {} atc {} {:?}\n",
                    super::csv_field(terminal),
                    seq_word(l.seq),
                    l.card.masked(),
                    l.atc.0,
                    l.status
                ));
            }
            if list.more > 0 {
                let terminal = super::csv_field(terminal);
                out.push_str(&format!(
                    "# offline_refused {terminal} {} more not listed\n",
                    list.more
                ));
            }
        }
        for (terminal, list) in &self.uncertain {
            for l in &list.listed {
                out.push_str(&format!(
                    "# offline_uncertain {} seq {} card {} atc {} {}\n",
                    super::csv_field(terminal),
                    seq_word(l.seq),
                    l.card.masked(),
                    l.atc.0,
                    self.resolution(l).as_str()
                ));
            }
            if list.more > 0 {
                let terminal = super::csv_field(terminal);
                out.push_str(&format!(
                    "# offline_uncertain {terminal} {} more not listed\n",
                    list.more
                ));
            }
        }
        out
    }
}

fn seq_word(seq: u64) -> String {
    if seq == 0 {
        "-".into()
    } else {
        seq.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_sets_merge_ranges_and_name_their_gaps() {
        let mut set = SeqSet::default();
        for seq in [1, 2, 4, 9, 3, 7, 7, 8] {
            set.insert(seq);
        }
        assert_eq!((set.highest(), set.count()), (9, 7));
        assert_eq!(set.gaps(), vec![(5, 6)]);
        assert_eq!(set.ranges.len(), 2, "{:?}", set.ranges);
        let mut other = SeqSet::default();
        for seq in [5, 12] {
            other.insert(seq);
        }
        set.union(&other);
        assert_eq!(set.gaps(), vec![(6, 6), (10, 11)]);
        assert_eq!(set.count(), 9);
        let mut late = SeqSet::default();
        late.insert(u64::MAX);
        late.insert(u64::MAX - 1);
        assert_eq!(late.highest(), u64::MAX);
        assert_eq!(late.gaps(), vec![(1, u64::MAX - 2)]);
        assert_eq!(SeqSet::default().gaps(), vec![]);
    }

    #[test]
    fn bounded_lists_count_what_they_leave_out() {
        let mut list = Bounded::default();
        let item = Listed { seq: 1, card: CardId(7), atc: Atc(1), status: Status::Replay };
        for _ in 0..MAX_LISTED + 5 {
            list.push(item);
        }
        assert_eq!((list.listed.len(), list.more), (MAX_LISTED, 5));
    }
}
