//! Process-wide counters and histograms, lock-free (relaxed atomics), rendered in the
//! Prometheus text format by the admin listener.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use citycard_protocol::{MessageType, Status};

/// Request types with metrics, in wire order (Hello = 0x01 ... HotlistSync = 0x0D).
/// Request types 0x01..=0x12 (protocol 1.2).
const OPS: usize = 18;
/// Statuses 0..=20; a 21st slot would only ever count an unknown value.
const STATUSES: usize = 21;
/// Histogram bucket upper bounds in microseconds.
const BOUNDS_US: [u64; 16] = [
    50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 20_000, 50_000,
    100_000, 1_000_000,
];

const OP_NAMES: [&str; OPS] = [
    "hello",
    "purchase",
    "top_up",
    "balance",
    "history",
    "identity",
    "issue",
    "block",
    "unblock",
    "replace",
    "close",
    "offline_batch",
    "hotlist_sync",
    "tap_in",
    "tap_out",
    "inquiry",
    "reversal",
    "funds",
];

pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BOUNDS_US.len() + 1],
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn record_us(&self, us: u64) {
        let i = BOUNDS_US.iter().position(|b| us <= *b).unwrap_or(BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// `per_unit`: recorded values per exported unit (1e6 for microseconds as seconds). Dividing
    /// (not multiplying by 1e-6) keeps bounds like 0.00005 exact in the text.
    fn render(&self, out: &mut String, name: &str, labels: &str, per_unit: f64) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in BOUNDS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                *bound as f64 / per_unit
            );
        }
        cumulative += self.buckets[BOUNDS_US.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(
            out,
            "{name}_sum{braced} {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / per_unit
        );
        let _ = writeln!(out, "{name}_count{braced} {}", self.count.load(Ordering::Relaxed));
    }
}

/// Why TLS handshakes failed, as counted.
pub const HANDSHAKE_REASONS: [&str; 10] = [
    "no_certificate",
    "unknown_ca",
    "expired",
    "revoked",
    "wrong_purpose",
    "no_alpn",
    "timeout",
    "no_identity",
    "wrong_role",
    "other",
];

/// A gauge sample the admin listener passes to [`Metrics::render`].
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    /// Rendered label pairs without braces (`shard="0"`), or empty.
    pub labels: String,
    pub value: i64,
}

impl Gauge {
    pub fn new(name: &'static str, help: &'static str, labels: &str, value: i64) -> Gauge {
        Gauge { name, help, labels: labels.to_owned(), value }
    }
}

/// `# HELP` and `# TYPE` lines of one family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub struct Metrics {
    transactions: [[AtomicU64; STATUSES]; OPS],
    latency: [Histogram; OPS],
    journal_sync: Histogram,
    batch_size: Histogram,
    /// One PostgreSQL replication statement, sent to confirmed, and the records it carried.
    replication_commit: Histogram,
    replication_records: Histogram,
    handshake_failures: [AtomicU64; HANDSHAKE_REASONS.len()],
    protocol_errors: [AtomicU64; 16],
    connections_total: AtomicU64,
    busy: AtomicU64,
    checkpoints: AtomicU64,
    trust_reloads: AtomicU64,
    trust_reload_failures: AtomicU64,
    revoked_connections_closed: AtomicU64,
    replication_failures: AtomicU64,
}

pub static METRICS: Metrics = Metrics {
    transactions: [const { [const { AtomicU64::new(0) }; STATUSES] }; OPS],
    latency: [const { Histogram::new() }; OPS],
    journal_sync: Histogram::new(),
    batch_size: Histogram::new(),
    replication_commit: Histogram::new(),
    replication_records: Histogram::new(),
    handshake_failures: [const { AtomicU64::new(0) }; HANDSHAKE_REASONS.len()],
    protocol_errors: [const { AtomicU64::new(0) }; 16],
    connections_total: AtomicU64::new(0),
    busy: AtomicU64::new(0),
    checkpoints: AtomicU64::new(0),
    trust_reloads: AtomicU64::new(0),
    trust_reload_failures: AtomicU64::new(0),
    revoked_connections_closed: AtomicU64::new(0),
    replication_failures: AtomicU64::new(0),
};

fn op_index(message_type: MessageType) -> Option<usize> {
    let v = message_type as u8;
    (1..=OPS as u8).contains(&v).then(|| usize::from(v - 1))
}

impl Metrics {
    /// One answered request: its type, result and latency from frame decode to answer.
    pub fn request(&self, message_type: MessageType, status: Option<Status>, latency_us: u64) {
        let Some(op) = op_index(message_type) else { return };
        let status = status.map_or(0, |s| s as usize).min(STATUSES - 1);
        self.transactions[op][status].fetch_add(1, Ordering::Relaxed);
        self.latency[op].record_us(latency_us);
        if status == Status::Busy as usize {
            self.busy.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn journal_sync_us(&self, us: u64) {
        self.journal_sync.record_us(us);
    }

    /// A replication statement confirmed by PostgreSQL after `us`, carrying `records`.
    pub fn replication_commit(&self, us: u64, records: u64) {
        self.replication_commit.record_us(us);
        self.replication_records.record_us(records);
    }

    pub fn batch(&self, jobs: u64) {
        self.batch_size.record_us(jobs);
    }

    pub fn handshake_failure(&self, reason: &str) {
        let i = HANDSHAKE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(HANDSHAKE_REASONS.len() - 1);
        self.handshake_failures[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn protocol_error(&self, code: u16) {
        self.protocol_errors[usize::from(code).min(15)].fetch_add(1, Ordering::Relaxed);
    }

    /// A checkpoint was written (any shard).
    pub fn checkpoint(&self, _seq: u64) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A CRL / TLS config reload on SIGHUP that succeeded or was refused (old trust kept).
    pub fn trust_reload(&self, ok: bool) {
        let counter = if ok { &self.trust_reloads } else { &self.trust_reload_failures };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A PostgreSQL connection or commit of replication failed (it is retried).
    pub fn replication_failure(&self) {
        self.replication_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// An open connection told to close because its certificate was revoked.
    pub fn revoked_connection_closed(&self) {
        self.revoked_connections_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition: every family with `# HELP` and `# TYPE`, then `gauges` as
    /// given (grouped by name, in order of first appearance).
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let mut out = String::with_capacity(16 * 1024);
        family(&mut out, "citycard_build_info", "gauge", "Version of the running citycard");
        let _ = writeln!(out, "citycard_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        family(
            &mut out,
            "citycard_transactions_total",
            "counter",
            "Answered requests by operation and result (Approved or the decline status)",
        );
        for (op, row) in self.transactions.iter().enumerate() {
            for (status, count) in row.iter().enumerate() {
                let n = count.load(Ordering::Relaxed);
                if n == 0 {
                    continue;
                }
                let name = Status::from_u8(status as u8)
                    .map_or_else(|| "other".to_owned(), |s| format!("{s:?}"));
                let _ = writeln!(
                    out,
                    "citycard_transactions_total{{op=\"{}\",result=\"{name}\"}} {n}",
                    OP_NAMES[op]
                );
            }
        }
        family(
            &mut out,
            "citycard_request_seconds",
            "histogram",
            "Request latency from frame decoded to answer queued, by operation",
        );
        for (op, h) in self.latency.iter().enumerate() {
            if h.count.load(Ordering::Relaxed) > 0 {
                h.render(
                    &mut out,
                    "citycard_request_seconds",
                    &format!("op=\"{}\"", OP_NAMES[op]),
                    1e6,
                );
            }
        }
        family(
            &mut out,
            "citycard_journal_sync_seconds",
            "histogram",
            "Duration of one journal group commit sync (fdatasync)",
        );
        self.journal_sync.render(&mut out, "citycard_journal_sync_seconds", "", 1e6);
        family(&mut out, "citycard_batch_jobs", "histogram", "Jobs covered by one group commit");
        self.batch_size.render(&mut out, "citycard_batch_jobs", "", 1.0);
        family(
            &mut out,
            "citycard_replication_commit_seconds",
            "histogram",
            "One replication statement from sent to committed in PostgreSQL (with its standby)",
        );
        self.replication_commit.render(&mut out, "citycard_replication_commit_seconds", "", 1e6);
        family(
            &mut out,
            "citycard_replication_statement_records",
            "histogram",
            "Journal records carried by one replication statement (a heartbeat counts as one)",
        );
        self.replication_records.render(
            &mut out,
            "citycard_replication_statement_records",
            "",
            1.0,
        );
        family(
            &mut out,
            "citycard_tls_handshake_failures_total",
            "counter",
            "Refused terminal TLS handshakes by reason",
        );
        for (i, reason) in HANDSHAKE_REASONS.iter().enumerate() {
            let n = self.handshake_failures[i].load(Ordering::Relaxed);
            let _ =
                writeln!(out, "citycard_tls_handshake_failures_total{{reason=\"{reason}\"}} {n}");
        }
        family(
            &mut out,
            "citycard_protocol_errors_total",
            "counter",
            "Malformed frames answered with an error frame, by error code",
        );
        for (code, count) in self.protocol_errors.iter().enumerate() {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "citycard_protocol_errors_total{{code=\"{code}\"}} {n}");
            }
        }
        let counters = [
            (
                "citycard_connections_total",
                "Terminal connections accepted since start",
                &self.connections_total,
            ),
            ("citycard_busy_total", "Requests answered Busy (a shard queue was full)", &self.busy),
            (
                "citycard_trust_reloads_total",
                "Successful CRL and TLS configuration reloads (SIGHUP)",
                &self.trust_reloads,
            ),
            (
                "citycard_trust_reload_failures_total",
                "Refused CRL or TLS configuration reloads; the previous trust stayed in force",
                &self.trust_reload_failures,
            ),
            (
                "citycard_checkpoints_total",
                "Checkpoints written (all shards): each bounds the next start's replay",
                &self.checkpoints,
            ),
            (
                "citycard_replication_failures_total",
                "Failed PostgreSQL connections or commits of replication (each is retried)",
                &self.replication_failures,
            ),
            (
                "citycard_revoked_connections_closed_total",
                "Open connections closed because their certificate was revoked",
                &self.revoked_connections_closed,
            ),
        ];
        for (name, help, counter) in counters {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
        let mut seen: Vec<&str> = Vec::new();
        for gauge in gauges {
            if seen.contains(&gauge.name) {
                continue;
            }
            seen.push(gauge.name);
            family(&mut out, gauge.name, "gauge", gauge.help);
            for g in gauges.iter().filter(|g| g.name == gauge.name) {
                if g.labels.is_empty() {
                    let _ = writeln!(out, "{} {}", g.name, g.value);
                } else {
                    let _ = writeln!(out, "{}{{{}}} {}", g.name, g.labels, g.value);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new();
        h.record_us(40);
        h.record_us(150);
        h.record_us(5_000_000);
        let mut out = String::new();
        h.render(&mut out, "x", "", 1.0);
        assert!(out.contains("x_bucket{le=\"50\"} 1"), "{out}");
        assert!(out.contains("x_bucket{le=\"200\"} 2"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3"), "{out}");
        assert!(out.contains("x_count 3"), "{out}");
    }
}
