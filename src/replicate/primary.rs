//! The primary's replication: one task per shard ships committed journal records to PostgreSQL
//! on one connection, several statements in flight, and releases each group commit's replies
//! once PostgreSQL has every record up to it (so answers go out in journal order).
//!
//! A reply that waits past `stall_ms` is sent as Unavailable instead, and the shard refuses
//! card work until PostgreSQL has everything the journal has; on every (re)connection the task
//! asks PostgreSQL for the shard's head and re-sends the rest from the journal.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use super::connect::{self, Plan};
use super::flow::{
    Completion, Flow, Group, RemoteHead, Shipment, StallReason, STATEMENT_RECORDS_MAX,
};
use super::link::{Handed, Replication, ShardLink, ShardState};
use super::schema::{self, Head};
use super::{Mode, ReplicateConfig, ReplicateError};
use crate::journal::{RawRecord, RecordTail};
use crate::metrics::METRICS;
use crate::server::worker::Reply;

/// Most records kept as handed over ([`Handed::Written`]) until PostgreSQL confirms them: a few
/// seconds of a busy shard, a few MiB. Past it the oldest are dropped and read back from the
/// journal once durable, so an outage costs no more memory than this.
const EARLY_RECORDS_MAX: usize = 65_536;
/// Reconnection back-off bounds: quick after a blip, at most one attempt every two seconds
/// during an outage.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// What an idle shard commits now and then (its head row's commit time, under its generation;
/// how often: [`super::flow::HEARTBEAT_MAX_US`]).
const HEARTBEAT: &str = "UPDATE citycard_shard SET last_commit_ms = \
    (extract(epoch from clock_timestamp()) * 1000)::bigint WHERE shard = $1 AND generation = $2";

/// What the server knows about a shard when replication starts.
pub struct ShardSetup {
    pub index: u16,
    pub journal: PathBuf,
    pub archive: PathBuf,
    /// Last seq of the local journal after recovery.
    pub last_seq: u64,
}

/// Starts replication for every shard: returns the shared state and one link per worker.
/// Must be called inside the tokio runtime. Connecting happens in the background: until
/// PostgreSQL is reached and checked, `sync` mode refuses card work.
pub fn start(
    config: &ReplicateConfig,
    data_dir: &Path,
    count: u16,
    shards: Vec<ShardSetup>,
    failed: CancellationToken,
) -> Result<(Arc<Replication>, Vec<ShardLink>), ReplicateError> {
    let plan = Arc::new(connect::plan(config)?);
    let conninfo = super::config::redact(&config.conninfo);
    match config.mode {
        Mode::Sync => {
            tracing::info!(conninfo = %conninfo, stall_ms = config.stall_ms, "replication to postgresql: answers wait for the postgresql commit")
        }
        Mode::AsyncUnsafe => {
            tracing::warn!(conninfo = %conninfo, "REPLICATION IS ASYNC-UNSAFE: answers do not wait for postgresql; losing this site loses every acknowledged transaction not yet replicated")
        }
    }
    let states: Vec<Arc<ShardState>> = shards
        .iter()
        .map(|s| {
            let state = ShardState::default();
            state.durable_seq.store(s.last_seq, Ordering::Release);
            state.refusing.store(config.mode == Mode::Sync, Ordering::Release);
            Arc::new(state)
        })
        .collect();
    let replication = Arc::new(Replication {
        mode: config.mode,
        shards: states.clone(),
        fatal: std::sync::OnceLock::new(),
        generation: Default::default(),
    });
    let (generation_tx, generation_rx) = watch::channel(0u64);
    let mut links = Vec::new();
    for (setup, state) in shards.into_iter().zip(states) {
        let (to_task, inbox) = unbounded_channel();
        links.push(ShardLink {
            state: state.clone(),
            mode: config.mode,
            to_task,
            durable_seq: setup.last_seq,
        });
        let task = Task {
            index: setup.index,
            plan: plan.clone(),
            replication: replication.clone(),
            state,
            inbox,
            flow: Flow::new(setup.index, setup.last_seq, config.stall_ms, 0),
            origin: Instant::now(),
            early: VecDeque::new(),
            next_read: 1,
            journal: setup.journal,
            archive: setup.archive,
            tail: None,
            peeked: None,
            stall: Duration::from_millis(config.stall_ms),
            mode: config.mode,
            failed: failed.clone(),
            generation: generation_rx.clone(),
            was_stalled: false,
        };
        tokio::spawn(task.run());
    }
    let data_dir = data_dir.to_path_buf();
    let shared = replication.clone();
    tokio::spawn(async move {
        match establish(&plan, &data_dir, count).await {
            Ok(generation) => {
                tracing::info!(generation, "replication generation established");
                shared.generation.store(generation, Ordering::Release);
                let _ = generation_tx.send(generation);
            }
            Err(e) => fatal(&shared, &failed, &e),
        }
    });
    Ok((replication, links))
}

/// Stops the primary for good: a newer generation, a disagreement, or a local journal failure.
fn fatal(replication: &Replication, failed: &CancellationToken, error: &ReplicateError) {
    let why = error.to_string();
    tracing::error!(error = %why, "replication cannot go on; stopping without answering anything more");
    let _ = replication.fatal.set(why);
    for state in &replication.shards {
        state.refusing.store(true, Ordering::Release);
    }
    failed.cancel();
}

fn permanent(error: &ReplicateError) -> bool {
    matches!(
        error,
        ReplicateError::Fenced { .. }
            | ReplicateError::Diverged { .. }
            | ReplicateError::Site(_)
            | ReplicateError::Config(_)
            | ReplicateError::Journal(_)
    )
}

async fn establish(plan: &Plan, data_dir: &Path, count: u16) -> Result<u64, ReplicateError> {
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = async {
            let mut client = connect::connect(plan).await?;
            schema::establish(&mut client, data_dir, count).await
        };
        match attempt.await {
            Ok(generation) => return Ok(generation),
            Err(e) if permanent(&e) => return Err(e),
            Err(e) => {
                METRICS.replication_failure();
                tracing::warn!(error = %e, "cannot reach postgresql yet; card requests are refused Unavailable until it answers");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

type Commit = Pin<Box<dyn std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send>>;
type Handshake = tokio::task::JoinHandle<Result<(Client, Statement, Option<Head>), ReplicateError>>;
/// A held reply: the connection's channel and the answer.
type HeldReply = (UnboundedSender<Reply>, Reply);

struct Task {
    index: u16,
    plan: Arc<Plan>,
    replication: Arc<Replication>,
    state: Arc<ShardState>,
    inbox: UnboundedReceiver<Handed>,
    /// Every decision: what to ship, what to release, when the shard is stalled.
    flow: Flow<HeldReply>,
    /// Zero of the flow's clock.
    origin: Instant,
    /// Records handed over after their local sync, contiguous, oldest first, until PostgreSQL
    /// confirms them: shipped from here without reading the journal back.
    early: VecDeque<RawRecord>,
    /// Seq of the record `next_record` returns next (after `peeked`).
    next_read: u64,
    journal: PathBuf,
    archive: PathBuf,
    /// Reads the records after `sent` (one read ahead in `peeked`).
    tail: Option<RecordTail>,
    peeked: Option<RawRecord>,
    stall: Duration,
    mode: Mode,
    failed: CancellationToken,
    /// 0 until the generation is established.
    generation: watch::Receiver<u64>,
    /// The flow was stalled after the last event (to log when it serves again).
    was_stalled: bool,
}

async fn maybe<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn send_all(replies: Vec<HeldReply>) {
    for (to, reply) in replies {
        // A closed connection simply no longer wants its answer.
        let _ = to.send(reply);
    }
}

impl Task {
    fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64
    }

    async fn run(mut self) {
        let tick_every =
            (self.stall / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut conn: Option<(Arc<Client>, Statement)> = None;
        let mut in_flight: FuturesOrdered<Commit> = FuturesOrdered::new();
        let mut handshake: Option<Handshake> = None;
        let mut retry_at = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut closing = false;
        loop {
            if self.failed.is_cancelled() && self.replication.fatal.get().is_some() {
                return;
            }
            if let Some((client, statement)) = &conn {
                if let Err(e) = self.fill(client, statement, &mut in_flight) {
                    return fatal(&self.replication, &self.failed, &e);
                }
            }
            if closing && self.flow.idle() {
                return;
            }
            tokio::select! {
                handed = self.inbox.recv(), if !closing => match handed {
                    Some(Handed::Durable(held)) => {
                        let at_us = held.at.saturating_duration_since(self.origin).as_micros() as u64;
                        let group = Group { last_seq: held.last_seq, at_us, replies: held.replies };
                        let now = self.now_us();
                        let released = self.flow.durable_group(group, now);
                        self.released(released);
                    }
                    Some(Handed::Written(bytes)) => self.take_early(&bytes),
                    None => closing = true,
                },
                Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                    let now = self.now_us();
                    let rows = result.as_ref().ok().copied();
                    match self.flow.completed(rows, now) {
                        Completion::Confirmed { expected, sent_us, released } => {
                            METRICS.replication_commit(now.saturating_sub(sent_us), expected);
                            let confirmed = self.flow.confirmed();
                            while self.early.front().is_some_and(|r| r.seq <= confirmed) {
                                self.early.pop_front();
                            }
                            self.state.confirmed_seq.store(confirmed, Ordering::Release);
                            self.state.last_commit_ms.store(crate::now_ms(), Ordering::Release);
                            self.released(released);
                        }
                        Completion::Lost { expected, sent_us, rows } => {
                            METRICS.replication_commit(now.saturating_sub(sent_us), expected);
                            let why = match (rows, result) {
                                (_, Err(e)) => e.to_string(),
                                (rows, Ok(_)) => format!("postgresql took {} of {expected} records (its head moved); re-reading it", rows.unwrap_or(0)),
                            };
                            self.lost(&why, &mut conn, &mut in_flight);
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                },
                done = maybe(&mut handshake) => {
                    handshake = None;
                    let checked = match done {
                        Ok(Ok((client, statement, head))) => self.check_head(head).map(|released| (client, statement, released)),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(ReplicateError::Config(format!("handshake task: {e}"))),
                    };
                    match checked {
                        Ok((client, statement, released)) => {
                            conn = Some((Arc::new(client), statement));
                            backoff = BACKOFF_MIN;
                            self.state.connected.store(true, Ordering::Release);
                            tracing::info!(shard = self.index, confirmed_seq = self.flow.confirmed(), lag_records = self.flow.lag(), "replication connected");
                            self.released(released);
                        }
                        Err(e) if permanent(&e) => return fatal(&self.replication, &self.failed, &e),
                        Err(e) => {
                            METRICS.replication_failure();
                            tracing::warn!(shard = self.index, error = %e, "cannot reach postgresql");
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                },
                _ = tick.tick() => {
                    let generation = *self.generation.borrow();
                    if conn.is_none() && handshake.is_none() && generation != 0 && Instant::now() >= retry_at {
                        handshake = Some(tokio::spawn(handshake_with(self.plan.clone(), self.index)));
                    }
                    if let Some((client, _)) = &conn {
                        self.heartbeat(client, &mut in_flight);
                    }
                    self.check_stall();
                },
            }
            self.update_refusing();
        }
    }

    /// Sends what the flow released.
    fn released(&mut self, replies: Vec<HeldReply>) {
        send_all(replies);
    }

    /// Generation and head agree with this journal: positions the reader after PostgreSQL's
    /// last record and returns the replies that a late success released.
    fn check_head(&mut self, head: Option<Head>) -> Result<Vec<HeldReply>, ReplicateError> {
        let ours = *self.generation.borrow();
        let available = self.available();
        let remote = head.as_ref().map(|h| RemoteHead {
            generation: h.generation,
            last_seq: h.last_seq,
            last_hash: h.last_hash,
        });
        let (durable, early, journal, archive) =
            (self.flow.durable(), &self.early, &self.journal, &self.archive);
        let mut tail = None;
        let local_hash = |seq: u64| -> Result<Option<[u8; 32]>, ReplicateError> {
            if seq > durable {
                // Shipped before its local sync and committed there: it must be ours.
                return Ok(early.iter().find(|r| r.seq == seq).map(|r| r.hash));
            }
            let mut reader = RecordTail::open_at(journal, archive, seq)?;
            let record = reader.read_next()?;
            tail = Some(reader);
            Ok((record.seq == seq).then_some(record.hash))
        };
        let now = self.now_us();
        let (resume, released) = self.flow.head_read(remote, ours, available, local_hash, now)?;
        if resume.late_success {
            tracing::info!(
                shard = self.index,
                seq = resume.from,
                "postgresql already had records whose commit answer was lost"
            );
        }
        self.peeked = None;
        self.tail = tail;
        self.next_read = resume.from + 1;
        while self.early.front().is_some_and(|r| r.seq <= resume.from) {
            self.early.pop_front();
        }
        self.state.confirmed_seq.store(resume.from, Ordering::Release);
        if let Some(head) = head {
            self.state.last_commit_ms.store(head.last_commit_ms, Ordering::Release);
        }
        Ok(released)
    }

    fn lost(
        &mut self,
        why: &str,
        conn: &mut Option<(Arc<Client>, Statement)>,
        in_flight: &mut FuturesOrdered<Commit>,
    ) {
        METRICS.replication_failure();
        tracing::warn!(shard = self.index, error = %why, lag_records = self.flow.lag(), "replication to postgresql failed; reconnecting");
        *conn = None;
        *in_flight = FuturesOrdered::new();
        let now = self.now_us();
        self.flow.lost(now);
        self.tail = None;
        self.peeked = None;
        self.next_read = self.flow.confirmed() + 1;
        self.state.connected.store(false, Ordering::Release);
    }

    /// Keeps a group commit's records handed over after their local sync.
    fn take_early(&mut self, bytes: &[u8]) {
        let records = match RawRecord::split(bytes) {
            Ok(records) => records,
            Err(why) => {
                // The journal encoded these bytes itself: this is a bug, not bad input. Nothing
                // is lost: the records are read back from the journal once durable.
                tracing::error!(shard = self.index, error = %why, "a handed-over record does not parse; reading the journal instead");
                self.early.clear();
                return;
            }
        };
        for record in records {
            if self.early.back().is_some_and(|last| last.seq + 1 != record.seq) {
                self.early.clear();
            }
            self.early.push_back(record);
            if self.early.len() > EARLY_RECORDS_MAX {
                self.early.pop_front();
            }
        }
    }

    /// Last seq that may be shipped: durable locally, or handed over and
    /// following on without a gap.
    fn available(&self) -> u64 {
        let base = self.flow.durable().max(self.flow.sent());
        match (self.early.front(), self.early.back()) {
            (Some(first), Some(last)) if first.seq <= base + 1 => base.max(last.seq),
            _ => base,
        }
    }

    fn next_record(&mut self) -> Result<RawRecord, ReplicateError> {
        if let Some(record) = self.peeked.take() {
            return Ok(record);
        }
        let want = self.next_read;
        // Kept until PostgreSQL confirms them: a statement lost with its connection is sent
        // again from here without reading the journal.
        if let Some(first) = self.early.front().map(|r| r.seq) {
            if want >= first {
                if let Some(record) = self.early.get((want - first) as usize) {
                    self.next_read = want + 1;
                    return Ok(record.clone());
                }
            }
        }
        if want > self.flow.durable() {
            return Err(ReplicateError::Site(format!(
                "record {want} is neither durable nor handed over (a bug)"
            )));
        }
        if self.tail.as_ref().is_none_or(|t| t.next_seq() != want) {
            self.tail = Some(RecordTail::open_at(&self.journal, &self.archive, want)?);
        }
        let record = match self.tail.as_mut() {
            Some(tail) => tail.read_next()?,
            None => return Err(ReplicateError::Site("journal reader missing".into())),
        };
        if record.seq != want {
            return Err(ReplicateError::Diverged {
                shard: self.index,
                reason: format!("the journal gave record {} for {want}", record.seq),
            });
        }
        self.next_read = want + 1;
        Ok(record)
    }

    /// Puts statements in flight for the records after `sent`, whole group commits each, as
    /// the flow asks for them.
    fn fill(
        &mut self,
        client: &Arc<Client>,
        statement: &Statement,
        in_flight: &mut FuturesOrdered<Commit>,
    ) -> Result<(), ReplicateError> {
        let generation = *self.generation.borrow() as i64;
        while let Some(Shipment { prev, available }) = self.flow.next_shipment(self.available()) {
            let (mut seqs, mut ends, mut records, mut hashes) = (vec![], vec![], vec![], vec![]);
            let mut last;
            loop {
                let record = self.next_record()?;
                let seq = record.seq;
                let end = if seq >= available {
                    true
                } else {
                    let next = self.next_record()?;
                    let starts_batch = next.batch_start == next.seq;
                    self.peeked = Some(next);
                    starts_batch
                };
                seqs.push(seq as i64);
                ends.push(end);
                hashes.push(record.hash.to_vec());
                records.push(record.bytes);
                last = seq;
                if end && (seq >= available || records.len() >= STATEMENT_RECORDS_MAX) {
                    break;
                }
            }
            let last_hash = hashes.last().cloned().unwrap_or_default();
            let (client, statement) = (client.clone(), statement.clone());
            let shard = i32::from(self.index);
            let now = self.now_us();
            self.flow.shipped(last, seqs.len() as u64, now);
            in_flight.push_back(Box::pin(async move {
                client
                    .execute(
                        &statement,
                        &[
                            &shard,
                            &(prev as i64),
                            &(last as i64),
                            &last_hash,
                            &generation,
                            &seqs,
                            &ends,
                            &records,
                            &hashes,
                        ],
                    )
                    .await
            }));
        }
        Ok(())
    }

    /// On a quiet connection, one commit that needs the synchronous standby and the generation.
    fn heartbeat(&mut self, client: &Arc<Client>, in_flight: &mut FuturesOrdered<Commit>) {
        let now = self.now_us();
        if !self.flow.heartbeat_due(self.available(), now) {
            return;
        }
        let client = client.clone();
        let (shard, generation) = (i32::from(self.index), *self.generation.borrow() as i64);
        self.flow.heartbeat_sent(now);
        in_flight.push_back(Box::pin(async move {
            client.execute(HEARTBEAT, &[&shard, &generation]).await
        }));
    }

    /// Answers Unavailable whatever waited past the stall bound; a connection down that long
    /// stalls the shard too (so `/readyz` says so before the first request waits).
    fn check_stall(&mut self) {
        let now = self.now_us();
        let (refused, reason) = self.flow.check_stall(now);
        match reason {
            Some(StallReason::Answers) => tracing::warn!(
                shard = self.index,
                stall_ms = self.stall.as_millis() as u64,
                lag_records = self.flow.lag(),
                "replication stalled; answering Unavailable until postgresql has caught up"
            ),
            Some(StallReason::Commit) => tracing::warn!(
                shard = self.index,
                "postgresql has not confirmed a commit within the stall bound; refusing card work"
            ),
            Some(StallReason::Down) | None => {}
        }
        for (to, reply) in refused {
            let output = super::refusal::for_output(reply.output);
            let _ = to.send(crate::server::worker::Reply { output, ..reply });
        }
    }

    fn update_refusing(&mut self) {
        let stalled = self.flow.stalled();
        if self.was_stalled && !stalled {
            tracing::info!(shard = self.index, "replication caught up; serving again");
        }
        self.was_stalled = stalled;
        let refusing = self.replication.fatal.get().is_some() || self.flow.refusing(self.mode);
        self.state.refusing.store(refusing, Ordering::Release);
    }
}

async fn handshake_with(
    plan: Arc<Plan>,
    shard: u16,
) -> Result<(Client, Statement, Option<Head>), ReplicateError> {
    let client = connect::connect(&plan).await?;
    let statement = schema::prepare_commit(&client).await?;
    let head = schema::head(&client, shard).await?;
    Ok((client, statement, head))
}
