//! Counting a run: the latency histogram and the tally of answers, declines, errors and
//! mismatches that each worker keeps and the run merges.

use std::collections::BTreeMap;

use citycard_protocol::Status;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::mix::Op;

/// How many mismatch descriptions are kept for the report.
pub const MAX_SAMPLES: usize = 20;

/// Latency histogram in microseconds: 1 us to 1 hour, 3 significant digits.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| anyhow::anyhow!("creating a histogram: {e}"))
}

/// One second of the measured window: throughput and latency of the answers recorded in it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// End of the second, in seconds from the start of the measured window.
    pub t_s: f64,
    pub tps: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Sample {
    /// The sample of `h` (answers recorded over `seconds`), taken at `t_s`.
    pub fn of(h: &Histogram<u64>, t_s: f64, seconds: f64) -> Sample {
        let q = |quantile: f64| if h.is_empty() { 0 } else { h.value_at_quantile(quantile) };
        Sample {
            t_s,
            tps: if seconds > 0.0 { h.len() as f64 / seconds } else { 0.0 },
            p50_us: q(0.50),
            p99_us: q(0.99),
            max_us: h.max(),
        }
    }
}

/// Answers of one operation type.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpCounts {
    pub answered: u64,
    pub approved: u64,
    pub declined: u64,
}

/// What a worker (and, merged, the whole run) counted.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Latency of measured requests (intended in the measured window), microseconds.
    pub hist: Histogram<u64>,
    /// Answers that arrived within the measured window (throughput).
    pub throughput_count: u64,
    pub sent: u64,
    /// Approved and declined count measured requests only.
    pub approved: u64,
    pub declined: BTreeMap<String, u64>,
    pub per_op: BTreeMap<String, OpCounts>,
    /// Every failure of the whole run (warm-up and balance check included), by kind.
    pub errors: BTreeMap<String, u64>,
    pub bad_macs: u64,
    pub timeouts: u64,
    pub late_answers: u64,
    pub behind_schedule: u64,
    pub topups_skipped: u64,
    pub live_mismatches: u64,
    pub verify_checked: u64,
    pub verify_unchecked: u64,
    pub verify_mismatches: u64,
    pub mismatch_samples: Vec<String>,
    pub dead_cards: u64,
    pub first_connect_error: Option<String>,
}

impl Stats {
    pub fn new() -> anyhow::Result<Stats> {
        Ok(Stats {
            hist: new_histogram()?,
            throughput_count: 0,
            sent: 0,
            approved: 0,
            declined: BTreeMap::new(),
            per_op: BTreeMap::new(),
            errors: BTreeMap::new(),
            bad_macs: 0,
            timeouts: 0,
            late_answers: 0,
            behind_schedule: 0,
            topups_skipped: 0,
            live_mismatches: 0,
            verify_checked: 0,
            verify_unchecked: 0,
            verify_mismatches: 0,
            mismatch_samples: Vec::new(),
            dead_cards: 0,
            first_connect_error: None,
        })
    }

    /// One measured answer.
    pub fn count(&mut self, op: Op, status: Status) {
        let per = self.per_op.entry(op.name().to_owned()).or_default();
        per.answered += 1;
        if status == Status::Approved {
            per.approved += 1;
            self.approved += 1;
        } else {
            per.declined += 1;
            *self.declined.entry(format!("{status:?}")).or_insert(0) += 1;
        }
    }

    fn sample(&mut self, text: String) {
        if self.mismatch_samples.len() < MAX_SAMPLES {
            self.mismatch_samples.push(text);
        }
    }

    /// An answer during the load whose balance disagrees with the exact reckoning.
    pub fn live_mismatch(&mut self, text: String) {
        self.live_mismatches += 1;
        self.sample(format!("during load: {text}"));
    }

    /// A final balance that is none of the possible outcomes.
    pub fn verify_mismatch(&mut self, text: String) {
        self.verify_mismatches += 1;
        self.sample(format!("final check: {text}"));
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn declined_count(&self) -> u64 {
        self.declined.values().sum()
    }

    pub fn merge(&mut self, other: &Stats) {
        let _ = self.hist.add(&other.hist);
        self.throughput_count += other.throughput_count;
        self.sent += other.sent;
        self.approved += other.approved;
        for (k, v) in &other.declined {
            *self.declined.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &other.per_op {
            let mine = self.per_op.entry(k.clone()).or_default();
            mine.answered += v.answered;
            mine.approved += v.approved;
            mine.declined += v.declined;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += v;
        }
        self.bad_macs += other.bad_macs;
        self.timeouts += other.timeouts;
        self.late_answers += other.late_answers;
        self.behind_schedule += other.behind_schedule;
        self.topups_skipped += other.topups_skipped;
        self.live_mismatches += other.live_mismatches;
        self.verify_checked += other.verify_checked;
        self.verify_unchecked += other.verify_unchecked;
        self.verify_mismatches += other.verify_mismatches;
        self.dead_cards += other.dead_cards;
        for s in &other.mismatch_samples {
            self.sample(s.clone());
        }
        if self.first_connect_error.is_none() {
            self.first_connect_error.clone_from(&other.first_connect_error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_merge() {
        let mut a = Stats::new().expect("stats");
        a.count(Op::Purchase, Status::Approved);
        a.count(Op::Purchase, Status::InsufficientFunds);
        let mut b = Stats::new().expect("stats");
        b.count(Op::TopUp, Status::OverBalanceCap);
        *b.errors.entry("bad response MAC".into()).or_insert(0) += 2;
        a.merge(&b);
        assert_eq!(a.approved, 1);
        assert_eq!(a.declined_count(), 2);
        assert_eq!(a.declined.get("OverBalanceCap"), Some(&1));
        assert_eq!(a.error_count(), 2);
        assert_eq!(a.per_op.get("purchase").map(|p| p.answered), Some(2));
    }
}
