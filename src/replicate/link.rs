//! The shard worker's side of replication: refuse card work while replication is stalled, and
//! hand each group commit's replies to the shard's replication task instead of sending them.
//!
//! Nothing here blocks: the hand-over is an unbounded channel whose length is bounded by the
//! stall rule (past `stall_ms`, or past [`BACKLOG_RECORDS_MAX`] unreplicated records, the
//! worker refuses new work instead of deciding it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::Mode;
use crate::server::worker::{Job, Reply};

/// Most records a shard may have journaled but not yet replicated before it refuses new work
/// even within the stall bound: about a minute of a busy shard, a few tens of MiB re-read from
/// the journal when PostgreSQL returns.
pub const BACKLOG_RECORDS_MAX: u64 = 200_000;

/// What a worker hands its replication task, in journal order.
pub enum Handed {
    /// A group commit's records, handed over right after their local `fdatasync` so the task
    /// ships them without reading them back from the journal. Nothing is answered on this
    /// alone.
    Written(Vec<u8>),
    /// The same group commit is durable locally: its replies wait only for PostgreSQL now.
    Durable(Held),
}

/// Replies of one group commit, held until PostgreSQL has every record up to `last_seq`.
pub struct Held {
    pub last_seq: u64,
    pub at: Instant,
    pub replies: Vec<(UnboundedSender<Reply>, Reply)>,
}

/// What a shard's replication looks like from outside (metrics, `/readyz`, the worker).
#[derive(Default)]
pub struct ShardState {
    /// Last seq durable in the local journal (set by the worker at each hand-over).
    pub durable_seq: AtomicU64,
    /// Last seq PostgreSQL confirmed.
    pub confirmed_seq: AtomicU64,
    /// Unix ms of the last PostgreSQL commit that returned.
    pub last_commit_ms: AtomicU64,
    /// Card work is refused Unavailable (stalled, not yet connected, or fenced).
    pub refusing: AtomicBool,
    /// Connected and checked against PostgreSQL.
    pub connected: AtomicBool,
}

impl ShardState {
    pub fn lag_records(&self) -> u64 {
        self.durable_seq
            .load(Ordering::Acquire)
            .saturating_sub(self.confirmed_seq.load(Ordering::Acquire))
    }
}

/// Replication of every shard: shared by the tasks, the workers and the admin listener.
pub struct Replication {
    pub mode: Mode,
    pub shards: Vec<Arc<ShardState>>,
    /// Set when PostgreSQL recorded a newer generation (another site was promoted) or the
    /// journal and PostgreSQL disagree; the server stops.
    pub fatal: std::sync::OnceLock<String>,
    /// The generation this primary writes under (0 until established).
    pub generation: AtomicU64,
}

impl Replication {
    /// Why the server is not ready, if replication is the reason.
    pub fn not_ready(&self) -> Option<String> {
        if let Some(why) = self.fatal.get() {
            return Some(why.clone());
        }
        if self.mode == Mode::AsyncUnsafe {
            return None;
        }
        let refusing: Vec<String> = self
            .shards
            .iter()
            .enumerate()
            .filter(|(_, s)| s.refusing.load(Ordering::Acquire))
            .map(|(i, s)| format!("{i} (lag {} records)", s.lag_records()))
            .collect();
        if refusing.is_empty() {
            None
        } else {
            Some(format!(
                "replication to PostgreSQL stalled or not connected; shards {} answer Unavailable",
                refusing.join(", ")
            ))
        }
    }
}

/// One worker's handle.
pub struct ShardLink {
    pub state: Arc<ShardState>,
    pub mode: Mode,
    pub to_task: UnboundedSender<Handed>,
    /// Last durable seq, kept by the worker (the task learns it from each hand-over).
    pub durable_seq: u64,
}

impl ShardLink {
    /// While replication is stalled, answers every job but key reloads with Unavailable
    /// without deciding it (nothing journaled, the ATC stays unused), and leaves the reloads.
    pub fn refuse_while_stalled(&self, jobs: &mut Vec<Job>, shard: u16) {
        if !self.state.refusing.load(Ordering::Acquire) {
            return;
        }
        jobs.retain(|job| match super::refusal::for_work(&job.work) {
            Some(output) => {
                let reply = Reply { request_id: job.request_id, shard, output };
                // A closed connection simply no longer wants its answer.
                let _ = job.reply.send(reply);
                false
            }
            None => true,
        });
    }

    /// Called with a group commit's encoded records once the local sync of the journal has
    /// returned (see [`Handed::Written`]): PostgreSQL never holds a record the journal could
    /// still lose to a power cut.
    pub fn ship(&self, records: Vec<u8>) {
        if records.is_empty() {
            return;
        }
        // A closed channel: the task ended after a fatal error; nothing is answered anyway.
        let _ = self.to_task.send(Handed::Written(records));
    }

    /// Called after the local sync of a group commit that appended `records` records: the
    /// replies go to the replication task, which sends them once PostgreSQL has the batch (in
    /// `async-unsafe` mode they go out now).
    pub fn hand_over(&mut self, records: u64, replies: &mut Vec<(UnboundedSender<Reply>, Reply)>) {
        self.durable_seq += records;
        self.state.durable_seq.store(self.durable_seq, Ordering::Release);
        let replies = match self.mode {
            Mode::AsyncUnsafe => {
                for (to, reply) in replies.drain(..) {
                    let _ = to.send(reply);
                }
                Vec::new()
            }
            Mode::Sync => std::mem::take(replies),
        };
        if records == 0 && replies.is_empty() {
            return;
        }
        let held = Held { last_seq: self.durable_seq, at: Instant::now(), replies };
        if let Err(lost) = self.to_task.send(Handed::Durable(held)) {
            // The task ended (the server is stopping after a fatal replication error): these
            // answers are never sent, as after a crash; the terminals retry elsewhere.
            drop(lost);
        }
    }
}

/// The replication series of `/metrics`.
pub fn gauges(replication: &Replication) -> Vec<crate::metrics::Gauge> {
    use crate::metrics::Gauge;
    let mut out = Vec::new();
    for (i, s) in replication.shards.iter().enumerate() {
        out.push(Gauge::new(
            "citycard_replication_lag_records",
            "Journal records durable locally but not yet committed in PostgreSQL",
            &format!("shard=\"{i}\""),
            s.lag_records() as i64,
        ));
    }
    for (i, s) in replication.shards.iter().enumerate() {
        out.push(Gauge::new(
            "citycard_replication_last_commit_seconds",
            "Unix time of the shard's last PostgreSQL commit (0: none yet)",
            &format!("shard=\"{i}\""),
            (s.last_commit_ms.load(Ordering::Acquire) / 1000) as i64,
        ));
    }
    for (i, s) in replication.shards.iter().enumerate() {
        out.push(Gauge::new(
            "citycard_replication_refusing",
            "1 while the shard answers card requests Unavailable (replication stalled or fenced)",
            &format!("shard=\"{i}\""),
            i64::from(s.refusing.load(Ordering::Acquire)),
        ));
    }
    out.push(Gauge::new(
        "citycard_replication_generation",
        "Generation this primary writes under in PostgreSQL (raised by each promotion)",
        "",
        replication.generation.load(Ordering::Acquire) as i64,
    ));
    out
}
