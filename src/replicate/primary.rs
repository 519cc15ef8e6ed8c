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
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

use super::connect::{self, Plan};
use super::link::{Handed, Held, Replication, ShardLink, ShardState, BACKLOG_RECORDS_MAX};
use super::schema::{self, Head};
use super::{Mode, ReplicateConfig, ReplicateError};
use crate::journal::{RawRecord, RecordTail};
use crate::metrics::METRICS;

/// Statements in flight per shard connection while catching up (each a full
/// `STATEMENT_RECORDS_MAX`). In steady state only one is: PostgreSQL runs a connection's
/// statements one after another, each waiting for the standby's flush, so a second statement
/// sent at once would carry only what arrived in the meantime; waiting instead lets every group
/// commit decided during that flush ride in the next statement (measured at 64 terminals:
/// 8 in flight gave 0.08 of the unreplicated throughput, one at a time see the README).
const PIPELINE_DEPTH: usize = 8;
/// Most records one statement carries when several group commits are waiting (catching up
/// after an outage): whole group commits only, so one larger than this goes alone.
const STATEMENT_RECORDS_MAX: usize = 4_096;
/// Most records kept as handed over ([`Handed::Written`]) until PostgreSQL confirms them: a few
/// seconds of a busy shard, a few MiB. Past it the oldest are dropped and read back from the
/// journal once durable, so an outage costs no more memory than this.
const EARLY_RECORDS_MAX: usize = 65_536;
/// Reconnection back-off bounds: quick after a blip, at most one attempt every two seconds
/// during an outage.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// An idle shard commits a heartbeat (its head row's commit time, under its generation) this
/// often, so a stalled synchronous standby or a promotion elsewhere shows without traffic.
const HEARTBEAT_MAX: Duration = Duration::from_secs(1);
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
            held: VecDeque::new(),
            early: VecDeque::new(),
            next_read: 1,
            journal: setup.journal,
            archive: setup.archive,
            durable: setup.last_seq,
            sent: 0,
            confirmed: 0,
            tail: None,
            peeked: None,
            stall: Duration::from_millis(config.stall_ms),
            mode: config.mode,
            failed: failed.clone(),
            generation: generation_rx.clone(),
            stalled: false,
            sent_at: VecDeque::new(),
            last_activity: Instant::now(),
            ever_connected: false,
            down_since: Some(Instant::now()),
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

type Commit = Pin<
    Box<dyn std::future::Future<Output = (u64, u64, Result<u64, tokio_postgres::Error>)> + Send>,
>;
type Handshake = tokio::task::JoinHandle<Result<(Client, Statement, Option<Head>), ReplicateError>>;

struct Task {
    index: u16,
    plan: Arc<Plan>,
    replication: Arc<Replication>,
    state: Arc<ShardState>,
    inbox: UnboundedReceiver<Handed>,
    held: VecDeque<Held>,
    /// Records handed over after their local sync, contiguous, oldest first, until PostgreSQL
    /// confirms them: shipped from here without reading the journal back.
    early: VecDeque<RawRecord>,
    /// Seq of the record `next_record` returns next (after `peeked`).
    next_read: u64,
    journal: PathBuf,
    archive: PathBuf,
    /// Last seq durable locally, sent in a statement, and confirmed by PostgreSQL.
    durable: u64,
    sent: u64,
    confirmed: u64,
    /// Reads the records after `sent` (one read ahead in `peeked`).
    tail: Option<RecordTail>,
    peeked: Option<RawRecord>,
    stall: Duration,
    mode: Mode,
    failed: CancellationToken,
    /// 0 until the generation is established.
    generation: watch::Receiver<u64>,
    stalled: bool,
    /// When each statement in flight was sent (oldest first, as they complete).
    sent_at: VecDeque<Instant>,
    /// Last statement sent or completed (heartbeats go out after a quiet `HEARTBEAT_MAX`).
    last_activity: Instant,
    ever_connected: bool,
    /// When the connection was lost (None while connected).
    down_since: Option<Instant>,
}

async fn maybe<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl Task {
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
            if closing && self.held.is_empty() && in_flight.is_empty() {
                return;
            }
            tokio::select! {
                handed = self.inbox.recv(), if !closing => match handed {
                    Some(Handed::Durable(held)) => {
                        self.durable = self.durable.max(held.last_seq);
                        self.held.push_back(held);
                        self.release();
                    }
                    Some(Handed::Written(bytes)) => self.take_early(&bytes),
                    None => closing = true,
                },
                Some((last, expected, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Some(sent) = self.sent_at.pop_front() {
                        METRICS.replication_commit(sent.elapsed().as_micros() as u64, expected);
                    }
                    self.last_activity = Instant::now();
                    match result {
                        Ok(rows) if rows == expected => {
                            let last = last.max(self.confirmed);
                            self.confirmed = last;
                            while self.early.front().is_some_and(|r| r.seq <= last) {
                                self.early.pop_front();
                            }
                            self.state.confirmed_seq.store(last, Ordering::Release);
                            self.state.last_commit_ms.store(crate::now_ms(), Ordering::Release);
                            self.release();
                        }
                        other => {
                            let why = match other {
                                Ok(rows) => format!("postgresql took {rows} of {expected} records (its head moved); re-reading it"),
                                Err(e) => e.to_string(),
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
                        Ok(Ok((client, statement, head))) => self.check_head(head).map(|()| (client, statement)),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(ReplicateError::Config(format!("handshake task: {e}"))),
                    };
                    match checked {
                        Ok((client, statement)) => {
                            conn = Some((Arc::new(client), statement));
                            backoff = BACKOFF_MIN;
                            self.down_since = None;
                            self.ever_connected = true;
                            self.state.connected.store(true, Ordering::Release);
                            tracing::info!(shard = self.index, confirmed_seq = self.confirmed, lag_records = self.durable.saturating_sub(self.confirmed), "replication connected");
                            self.release();
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

    /// Generation and head agree with this journal: positions the reader after PostgreSQL's
    /// last record.
    fn check_head(&mut self, head: Option<Head>) -> Result<(), ReplicateError> {
        let ours = *self.generation.borrow();
        let shard = self.index;
        let Some(head) = head else {
            return Err(ReplicateError::Diverged {
                shard,
                reason: "its row vanished from citycard_shard".into(),
            });
        };
        if head.generation != ours {
            if head.generation > ours {
                return Err(ReplicateError::Fenced { shard, ours, found: head.generation });
            }
            return Err(ReplicateError::Diverged {
                shard,
                reason: format!(
                    "postgresql records generation {}, older than ours {ours}",
                    head.generation
                ),
            });
        }
        if head.last_seq > self.available() {
            return Err(ReplicateError::Diverged {
                shard,
                reason: format!(
                    "postgresql holds records up to seq {} but this journal ends at {} (a \
                     batch shipped before its local sync was lost here, as in a power loss: \
                     fail over, or rebuild this site as a standby)",
                    head.last_seq,
                    self.available()
                ),
            });
        }
        self.peeked = None;
        self.tail = None;
        self.next_read = head.last_seq + 1;
        if head.last_seq > self.durable {
            // Shipped before its local sync and committed there: it must be ours.
            let ours = self.early.iter().find(|r| r.seq == head.last_seq).map(|r| r.hash);
            if ours != Some(head.last_hash) {
                return Err(ReplicateError::Diverged {
                    shard,
                    reason: format!(
                        "record {} differs from the one postgresql holds",
                        head.last_seq
                    ),
                });
            }
        } else if head.last_seq > 0 {
            let mut tail = RecordTail::open_at(&self.journal, &self.archive, head.last_seq)?;
            let record = tail.read_next()?;
            if record.hash != head.last_hash {
                return Err(ReplicateError::Diverged {
                    shard,
                    reason: format!(
                        "record {} differs from the one postgresql holds",
                        head.last_seq
                    ),
                });
            }
            self.tail = Some(tail);
        }
        self.sent = head.last_seq;
        self.confirmed = head.last_seq;
        while self.early.front().is_some_and(|r| r.seq <= head.last_seq) {
            self.early.pop_front();
        }
        self.state.confirmed_seq.store(head.last_seq, Ordering::Release);
        self.state.last_commit_ms.store(head.last_commit_ms, Ordering::Release);
        Ok(())
    }

    fn lost(
        &mut self,
        why: &str,
        conn: &mut Option<(Arc<Client>, Statement)>,
        in_flight: &mut FuturesOrdered<Commit>,
    ) {
        METRICS.replication_failure();
        tracing::warn!(shard = self.index, error = %why, lag_records = self.durable.saturating_sub(self.confirmed), "replication to postgresql failed; reconnecting");
        *conn = None;
        *in_flight = FuturesOrdered::new();
        self.sent_at.clear();
        self.tail = None;
        self.peeked = None;
        self.sent = self.confirmed;
        self.next_read = self.confirmed + 1;
        self.down_since = Some(Instant::now());
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
        let base = self.durable.max(self.sent);
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
        if want > self.durable {
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

    /// Puts statements in flight for the records after `sent`, whole group commits each.
    fn fill(
        &mut self,
        client: &Arc<Client>,
        statement: &Statement,
        in_flight: &mut FuturesOrdered<Commit>,
    ) -> Result<(), ReplicateError> {
        let generation = *self.generation.borrow() as i64;
        loop {
            let available = self.available();
            let backlog = available.saturating_sub(self.sent);
            let room = in_flight.is_empty()
                || (in_flight.len() < PIPELINE_DEPTH && backlog >= STATEMENT_RECORDS_MAX as u64);
            if !room || backlog == 0 {
                break;
            }
            let prev = self.sent;
            let (mut seqs, mut ends, mut records, mut hashes) = (vec![], vec![], vec![], vec![]);
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
                self.sent = seq;
                if end && (seq >= available || records.len() >= STATEMENT_RECORDS_MAX) {
                    break;
                }
            }
            let last_hash = hashes.last().cloned().unwrap_or_default();
            let (client, statement) = (client.clone(), statement.clone());
            let shard = i32::from(self.index);
            let expected = seqs.len() as u64;
            let last = self.sent;
            self.sent_at.push_back(Instant::now());
            self.last_activity = Instant::now();
            in_flight.push_back(Box::pin(async move {
                let result = client
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
                    .await;
                (last, expected, result)
            }));
        }
        Ok(())
    }

    /// On a quiet connection, one commit that needs the synchronous standby and the generation.
    fn heartbeat(&mut self, client: &Arc<Client>, in_flight: &mut FuturesOrdered<Commit>) {
        let every = (self.stall / 2).min(HEARTBEAT_MAX);
        if !in_flight.is_empty()
            || self.sent < self.available()
            || self.last_activity.elapsed() < every
        {
            return;
        }
        let client = client.clone();
        let (shard, generation) = (i32::from(self.index), *self.generation.borrow() as i64);
        let confirmed = self.confirmed;
        self.sent_at.push_back(Instant::now());
        self.last_activity = Instant::now();
        in_flight.push_back(Box::pin(async move {
            let result = client.execute(HEARTBEAT, &[&shard, &generation]).await;
            (confirmed, 1, result)
        }));
    }

    /// Sends the replies of every group commit PostgreSQL now has, oldest first.
    fn release(&mut self) {
        while self.held.front().is_some_and(|h| h.last_seq <= self.confirmed) {
            if let Some(held) = self.held.pop_front() {
                for (to, reply) in held.replies {
                    let _ = to.send(reply);
                }
            }
        }
        let fresh = self.sent_at.front().is_none_or(|t| t.elapsed() < self.stall);
        if self.stalled && self.down_since.is_none() && self.confirmed >= self.durable && fresh {
            self.stalled = false;
            tracing::info!(shard = self.index, "replication caught up; serving again");
        }
    }

    /// Answers Unavailable whatever waited past the stall bound; a connection down that long
    /// stalls the shard too (so `/readyz` says so before the first request waits).
    fn check_stall(&mut self) {
        let now = Instant::now();
        while self.held.front().is_some_and(|h| now.duration_since(h.at) >= self.stall) {
            if let Some(held) = self.held.pop_front() {
                if !held.replies.is_empty() && !self.stalled {
                    tracing::warn!(
                        shard = self.index,
                        stall_ms = self.stall.as_millis() as u64,
                        lag_records = self.durable.saturating_sub(self.confirmed),
                        "replication stalled; answering Unavailable until postgresql has caught up"
                    );
                }
                self.stalled |= !held.replies.is_empty();
                for (to, reply) in held.replies {
                    let output = super::refusal::for_output(reply.output);
                    let _ = to.send(crate::server::worker::Reply { output, ..reply });
                }
            }
        }
        let waiting = self.sent_at.front().is_some_and(|t| now.duration_since(*t) >= self.stall);
        if waiting && !self.stalled {
            tracing::warn!(
                shard = self.index,
                "postgresql has not confirmed a commit within the stall bound; refusing card work"
            );
        }
        if self.down_since.is_some_and(|t| now.duration_since(t) >= self.stall) || waiting {
            self.stalled = true;
        }
    }

    fn update_refusing(&self) {
        let refusing = self.replication.fatal.get().is_some()
            || (self.mode == Mode::Sync
                && (self.stalled
                    || !self.ever_connected
                    || self.durable.saturating_sub(self.confirmed) > BACKLOG_RECORDS_MAX));
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
