//! The shard worker thread: drains a batch from its bounded queue, decides every job, syncs the
//! journal once, and only then sends the replies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use citycard_protocol::{NumberedRecord, OfflineRecord, Request, RequestId};
use crossbeam::channel::{Receiver, RecvTimeoutError};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::engine::{Op, Output, Shard};
use crate::metrics::METRICS;

use super::write_behind::ThreadWriteBehind;

/// What a connection asks a shard to do.
pub enum Work {
    Request(Request),
    Offline(Vec<(u16, OfflineRecord)>),
    /// Protocol 1.3: numbered records with their positions and whether another shard holds
    /// their seq (see `Op::Numbered`).
    Numbered(Vec<(u16, NumberedRecord, bool)>),
    /// Protocol 1.3: the first phase of a numbered batch, asked of every shard.
    SeqLookup(Vec<u64>),
    Hotlist {
        since: u64,
        max: usize,
    },
    /// New key material (issuer key rotation); applies to every later job of the shard.
    Reload(Arc<crate::engine::Secrets>),
}

pub struct Job {
    pub terminal: Arc<str>,
    pub request_id: RequestId,
    pub work: Work,
    pub reply: UnboundedSender<Reply>,
}

/// A shard's answer to one job, sent only after the journal sync covering it returned.
pub struct Reply {
    pub request_id: RequestId,
    pub shard: u16,
    pub output: Output,
}

/// State shared between a worker and the rest of the server.
pub struct WorkerShared {
    /// The shard's hotlist version, for Hello answers.
    pub hotlist_version: AtomicU64,
    /// Jobs in the current batch (a metric).
    pub last_batch: AtomicU64,
    /// Protocol 1.3: terminals with a numbered offline batch in flight (the session keeps it in
    /// the first shard's entry only). One at a time per terminal keeps the seq check of the
    /// first phase true until the second phase has decided (PROTOCOL.md 6.13). The lock is
    /// held only to insert or remove one name, never across an await.
    pub numbered_uploads: std::sync::Mutex<std::collections::HashSet<Arc<str>>>,
}

pub struct WorkerContext {
    pub shard: Shard,
    pub queue: Receiver<Job>,
    pub shared: Arc<WorkerShared>,
    pub max_batch: usize,
    /// Set when the server stops: the worker finishes what is queued and exits.
    pub stopping: Arc<AtomicBool>,
    /// Cancelled by a worker whose storage failed: the server stops without acknowledging more.
    pub failed: CancellationToken,
    pub pin_core: Option<core_affinity::CoreId>,
    /// `[replicate]`: replies wait for PostgreSQL (see [`crate::replicate::link`]).
    pub replication: Option<crate::replicate::ShardLink>,
}

/// How long a worker waits on an empty queue before re-checking for shutdown.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Most expired holds settled per batch or idle tick: bounds the extra journal records one
/// group commit carries, while 64 per 50 ms tick (over 1,000 a second) outruns any expiry rate.
const HOLD_SWEEP_MAX: usize = 64;

/// Turns a panic of the shard thread into the same fail-stop as a storage error: otherwise the
/// process would run on with one shard gone and its terminals waiting for answers.
struct FailOnPanic(CancellationToken);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("shard thread panicked; stopping without acknowledging anything more");
            self.0.cancel();
        }
    }
}

pub fn run(mut ctx: WorkerContext) {
    let _guard = FailOnPanic(ctx.failed.clone());
    if let Some(core) = ctx.pin_core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(shard = ctx.shard.index(), "could not pin the shard thread");
        }
    }
    // sled is written behind on a thread of its own, so the shard thread never waits on it
    // except when that bounded queue is full.
    let write_behind = match ThreadWriteBehind::start(ctx.shard.index()) {
        Ok(write_behind) => write_behind,
        Err(source) => {
            let error = crate::engine::StoreError::Io { path: "persister thread".into(), source };
            return fail(&ctx, "start the state write-behind", &error);
        }
    };
    if let Err(e) = ctx.shard.set_write_behind(Box::new(write_behind)) {
        return fail(&ctx, "start the state write-behind", &e);
    }
    let mut jobs: Vec<Job> = Vec::with_capacity(ctx.max_batch);
    let mut replies: Vec<(UnboundedSender<Reply>, Reply)> = Vec::with_capacity(ctx.max_batch);
    loop {
        match ctx.queue.recv_timeout(IDLE_POLL) {
            Ok(job) => jobs.push(job),
            Err(RecvTimeoutError::Timeout) => {
                if ctx.stopping.load(Ordering::Acquire) && ctx.queue.is_empty() {
                    break;
                }
                // Idle: settle holds the clock has passed, let old overlay entries reach sled.
                let now_ms = crate::now_ms();
                match ctx.shard.expire_holds(now_ms, HOLD_SWEEP_MAX) {
                    Ok(0) => {}
                    Ok(_) => {
                        let records = ctx.shard.pending() as u64;
                        let shipped =
                            ctx.replication.as_ref().map(|_| ctx.shard.pending_bytes().to_vec());
                        if let Err(e) = ctx.shard.commit() {
                            return fail(&ctx, "journal commit", &e);
                        }
                        if let (Some(link), Some(bytes)) = (&ctx.replication, shipped) {
                            link.ship(bytes);
                        }
                        // Replication must count these records too, or it would release the
                        // next batch's answers before PostgreSQL has that batch.
                        if let Some(link) = &mut ctx.replication {
                            link.hand_over(records, &mut replies);
                        }
                    }
                    Err(e) => return fail(&ctx, "hold sweep", &e),
                }
                if let Err(e) = ctx.shard.persist_due(now_ms) {
                    return fail(&ctx, "state persist", &e);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while jobs.len() < ctx.max_batch {
            match ctx.queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if ctx.failed.is_cancelled() {
            // Another shard's storage failed: the process is stopping, so decide nothing more
            // (nothing decided now could be answered anyway).
            break;
        }
        let now_ms = crate::now_ms();
        let index = ctx.shard.index();
        if let Some(link) = &ctx.replication {
            link.refuse_while_stalled(&mut jobs, index);
        }
        for job in jobs.drain(..) {
            let op = match &job.work {
                Work::Request(request) => Op::Request(request),
                Work::Offline(records) => Op::Offline(records),
                Work::Numbered(records) => Op::Numbered(records),
                Work::SeqLookup(seqs) => Op::SeqLookup(seqs),
                Work::Hotlist { since, max } => Op::Hotlist { since: *since, max: *max },
                Work::Reload(secrets) => {
                    ctx.shard.replace_secrets(secrets.clone());
                    tracing::info!(
                        shard = index,
                        current_version = secrets.current_version.0,
                        "issuer keys reloaded"
                    );
                    continue;
                }
            };
            match ctx.shard.execute(&job.terminal, op, now_ms) {
                Ok(output) => replies
                    .push((job.reply, Reply { request_id: job.request_id, shard: index, output })),
                Err(e) => return fail(&ctx, "decide", &e),
            }
        }
        if let Err(e) = ctx.shard.expire_holds(now_ms, HOLD_SWEEP_MAX) {
            return fail(&ctx, "hold sweep", &e);
        }
        ctx.shared.last_batch.store(replies.len() as u64, Ordering::Relaxed);
        METRICS.batch(replies.len() as u64);
        let sync_started = std::time::Instant::now();
        let records = ctx.shard.pending() as u64;
        // Shipped to PostgreSQL only after the local sync: shipping before it (PostgreSQL
        // committing while fdatasync runs) was measured on 2026-12-04 and saved nothing
        // measurable, and it let a power cut leave PostgreSQL holding a batch the journal lost,
        // which stops the primary with "diverged". The answers wait for both either way.
        let shipped = ctx.replication.as_ref().map(|_| ctx.shard.pending_bytes().to_vec());
        if let Err(e) = ctx.shard.commit() {
            return fail(&ctx, "journal commit", &e);
        }
        if let (Some(link), Some(bytes)) = (&ctx.replication, shipped) {
            link.ship(bytes);
        }
        METRICS.journal_sync_us(sync_started.elapsed().as_micros() as u64);
        if let Some(link) = &mut ctx.replication {
            link.hand_over(records, &mut replies);
        }
        for (to, reply) in replies.drain(..) {
            // A closed connection simply no longer wants its answer; the transaction stands.
            let _ = to.send(reply);
        }
        if let Err(e) = ctx.shard.persist_due(now_ms) {
            return fail(&ctx, "state persist", &e);
        }
        ctx.shared.hotlist_version.store(ctx.shard.hotlist_version(), Ordering::Release);
    }
    // Everything to sled, flushed, and a checkpoint at the last record: the next start reads
    // nothing but the tail of the journal.
    if let Err(e) = ctx.shard.checkpoint_now() {
        return fail(&ctx, "state persist at shutdown", &e);
    }
    tracing::info!(shard = ctx.shard.index(), "shard stopped");
}

fn fail(ctx: &WorkerContext, stage: &str, error: &crate::engine::StoreError) {
    tracing::error!(shard = ctx.shard.index(), stage, error = %error, "storage failed; stopping without acknowledging anything more");
    ctx.failed.cancel();
}
