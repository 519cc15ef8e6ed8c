//! The replication step: each shard's group commits go to a simulated PostgreSQL
//! ([`crate::remote`]) through the server's own decision code ([`citycard::replicate::flow`]),
//! with seeded faults on the way (a commit fails, stalls past the bound, takes effect but its
//! answer is lost or late, the connection drops, PostgreSQL is down for a while). Answers count
//! as acknowledged only when the flow releases them, and the invariants are checked as they go:
//! nothing released that PostgreSQL lacks, releases in journal order, a stall refuses card
//! work, everything is re-sent once PostgreSQL is back, and a failover to PostgreSQL's records
//! answers every acknowledged request as it was answered.

use std::collections::{BTreeMap, VecDeque};

use citycard::engine::{Op, Output, Shard};
use citycard::journal::{Journal, JournalOptions, MemDisk, RawRecord, RecordTail};
use citycard::replicate::flow::{Completion, Flow, Group, STATEMENT_RECORDS_MAX};
use citycard::replicate::{Mode, ReplicateError};
use citycard_protocol::Request;

use crate::model::WALK_DEPTH;
use crate::remote::{Remote, Rows};
use crate::world::{World, SHARDS};
use crate::Failure;

/// The sim's `replicate.stall_ms`: about ten steps of the replication clock.
pub const STALL_MS: u64 = 200;
/// Acknowledged answers kept for the failover check (the most recent; older ones were checked
/// at earlier failovers, and the chain check covers their records).
const ACKED_MAX: usize = 256;
/// Ticks a quiet spell may take to catch up (5 ms each: ten stall bounds).
const CATCH_UP_TICKS: u64 = 400;
const TICK_QUIET_MS: u64 = 5;

/// An answer held until PostgreSQL has its group commit.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Hand-over order within its shard (releases must keep it).
    order: u64,
    /// Last seq of the group commit it belongs to.
    group_seq: u64,
    pub terminal: String,
    pub request: Request,
    pub bytes: Vec<u8>,
}

/// What a statement in flight will do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Takes effect, and its answer comes back.
    Normal,
    /// Fails without taking effect.
    Error,
    /// Takes effect; its answer is lost and the connection drops.
    LostReply,
}

#[derive(Debug)]
struct Statement {
    prev: u64,
    generation: u64,
    /// `None`: a heartbeat.
    rows: Option<Rows>,
    sent_ms: u64,
    applied_at_ms: u64,
    reply_at_ms: u64,
    fate: Fate,
    /// Rows PostgreSQL took once it ran the statement (`Some(None)`: it failed).
    result: Option<Option<u64>>,
}

#[derive(Debug)]
struct Link {
    flow: Flow<Answer>,
    statements: VecDeque<Statement>,
    retry_at_ms: u64,
    /// The simulator's own view of the connection (for the stall invariant).
    down_since_ms: Option<u64>,
    /// The shard's records handed over (durable in its journal), by seq.
    store: BTreeMap<u64, RawRecord>,
    next_order: u64,
    /// Order of the last answer released or refused.
    last_out: Option<u64>,
    fenced: bool,
}

impl Link {
    fn new(shard: u16, durable: u64, now_ms: u64) -> Link {
        Link {
            flow: Flow::new(shard, durable, STALL_MS, now_ms * 1_000),
            statements: VecDeque::new(),
            retry_at_ms: now_ms,
            down_since_ms: Some(now_ms),
            store: BTreeMap::new(),
            next_order: 0,
            last_out: None,
            fenced: false,
        }
    }

    fn available(&self) -> u64 {
        self.store.keys().next_back().copied().unwrap_or(0).max(self.flow.durable())
    }
}

/// The replication side of the world.
#[derive(Debug)]
pub struct Replication {
    pub remote: Remote,
    links: Vec<Link>,
    /// A monotonic clock (the real task's `Instant`): the wall clock's jumps are not in it.
    pub clock_ms: u64,
    remote_down_until_ms: u64,
    /// Faults are injected (off while catching up).
    faults: bool,
    generation: u64,
    /// Another site was promoted: a fenced head read is the expected end.
    fence_expected: bool,
    acked: VecDeque<Answer>,
    pub released: u64,
    pub refused: u64,
    pub refused_steps: u64,
    pub failovers: u64,
    /// Acknowledged answers a failover site was asked again.
    pub failover_checked: u64,
    pub replication_faults: u64,
}

impl Replication {
    pub fn new(last_seqs: &[u64]) -> Replication {
        let links =
            last_seqs.iter().enumerate().map(|(i, &last)| Link::new(i as u16, last, 0)).collect();
        Replication {
            remote: Remote::new(SHARDS),
            links,
            clock_ms: 0,
            remote_down_until_ms: 0,
            faults: true,
            generation: 1,
            fence_expected: false,
            acked: VecDeque::new(),
            released: 0,
            refused: 0,
            refused_steps: 0,
            failovers: 0,
            failover_checked: 0,
            replication_faults: 0,
        }
    }

    /// Whether the shard refuses card work now.
    pub fn refusing(&self, shard: u16) -> bool {
        self.links[usize::from(shard)].flow.refusing(Mode::Sync)
    }
}

impl World {
    /// A shard's group commit is durable: its records and answers go to the flow (a hold
    /// sweep's records have no answers).
    pub fn hand_over(
        &mut self,
        shard: u16,
        bytes: &[u8],
        answers: Vec<(String, Request, Vec<u8>)>,
    ) -> Result<(), Failure> {
        let records =
            RawRecord::split(bytes).map_err(|e| self.fail(format!("handed-over records: {e}")))?;
        let now_us = self.repl.clock_ms * 1_000;
        let link = &mut self.repl.links[usize::from(shard)];
        for record in records {
            let expected = link.available() + 1;
            if record.seq != expected {
                let message = format!(
                    "shard {shard}: handed record {} over after {}",
                    record.seq,
                    expected - 1
                );
                return Err(self.fail(message));
            }
            link.store.insert(record.seq, record);
        }
        let last_seq = link.available();
        if last_seq == link.flow.durable() && answers.is_empty() {
            return Ok(());
        }
        let replies = answers
            .into_iter()
            .map(|(terminal, request, bytes)| {
                link.next_order += 1;
                Answer { order: link.next_order, group_seq: last_seq, terminal, request, bytes }
            })
            .collect();
        let released = link.flow.durable_group(Group { last_seq, at_us: now_us, replies }, now_us);
        self.out(shard, released, true)
    }

    /// Answers leaving the flow: released (acknowledged to the terminal) or refused.
    fn out(&mut self, shard: u16, answers: Vec<Answer>, released: bool) -> Result<(), Failure> {
        for answer in answers {
            let link = &mut self.repl.links[usize::from(shard)];
            if link.last_out.is_some_and(|o| o >= answer.order) {
                let message = format!(
                    "shard {shard}: answer {} left after answer {:?} (out of journal order)",
                    answer.order, link.last_out
                );
                return Err(self.fail(message));
            }
            link.last_out = Some(answer.order);
            if !released {
                self.repl.refused += 1;
                // The terminal got Unavailable and sends the same bytes again later.
                self.unanswered.push((answer.terminal, answer.request));
                continue;
            }
            let head = self.repl.remote.head(shard).map_or(0, |h| h.last_seq);
            let theirs = self.repl.remote.record(shard, answer.group_seq).map(|r| r.hash);
            let ours = link.store.get(&answer.group_seq).map(|r| r.hash);
            if answer.group_seq > 0 && (head < answer.group_seq || theirs != ours) {
                let message = format!(
                    "shard {shard}: an answer was acknowledged whose record {} PostgreSQL lacks \
                     (its head is at {head})",
                    answer.group_seq
                );
                return Err(self.fail(message));
            }
            self.repl.released += 1;
            self.repl.acked.push_back(answer);
            if self.repl.acked.len() > ACKED_MAX {
                self.repl.acked.pop_front();
            }
        }
        Ok(())
    }

    /// One replication step at the replication clock's `now`: faults, statements taking effect
    /// and answering in order, reconnecting, shipping, the stall bound; then the invariants.
    pub fn replicate(&mut self) -> Result<(), Failure> {
        let now = self.repl.clock_ms;
        if self.repl.faults && now >= self.repl.remote_down_until_ms && self.rng.chance(1) {
            // PostgreSQL (or its synchronous standby) is gone for a while.
            self.repl.remote_down_until_ms = now + STALL_MS / 2 + self.rng.below(4 * STALL_MS);
            self.repl.replication_faults += 1;
            self.hash(b"remote-down");
        }
        let remote_up = now >= self.repl.remote_down_until_ms;
        for shard in 0..SHARDS {
            if self.repl.links[usize::from(shard)].fenced {
                continue;
            }
            let connected = self.repl.links[usize::from(shard)].flow.connected();
            if connected && (!remote_up || (self.repl.faults && self.rng.chance(2))) {
                self.hash(format!("connection-drop-{shard}").as_bytes());
                self.drop_connection(shard, now);
            }
            self.run_statements(shard, now)?;
            self.reconnect(shard, now, remote_up)?;
            self.ship(shard, now);
            let (refused, _) = self.repl.links[usize::from(shard)].flow.check_stall(now * 1_000);
            let any_refused = !refused.is_empty();
            self.out(shard, refused, false)?;
            self.check_stall_refuses(shard, now, any_refused)?;
        }
        Ok(())
    }

    /// The connection breaks: statements PostgreSQL had received may still take effect (each
    /// by the seed, in order), and their answers are lost.
    fn drop_connection(&mut self, shard: u16, now: u64) {
        let statements = std::mem::take(&mut self.repl.links[usize::from(shard)].statements);
        for st in statements {
            if st.result.is_none() && st.fate != Fate::Error && self.rng.chance(500) {
                self.apply(shard, &st);
            }
        }
        let backoff = 5 + self.rng.below(50);
        let link = &mut self.repl.links[usize::from(shard)];
        link.flow.lost(now * 1_000);
        link.retry_at_ms = now + backoff;
        link.down_since_ms.get_or_insert(now);
    }

    fn apply(&mut self, shard: u16, st: &Statement) -> Option<u64> {
        if st.fate == Fate::Error {
            return None;
        }
        Some(match &st.rows {
            Some(rows) => self.repl.remote.commit(shard, st.prev, st.generation, rows),
            None => self.repl.remote.heartbeat(shard, st.generation),
        })
    }

    /// Statements take effect in the order sent, and their answers come back in that order.
    fn run_statements(&mut self, shard: u16, now: u64) -> Result<(), Failure> {
        let i = usize::from(shard);
        for k in 0..self.repl.links[i].statements.len() {
            let st = &self.repl.links[i].statements[k];
            if st.result.is_some() {
                continue;
            }
            if st.applied_at_ms > now {
                break;
            }
            let st = std::mem::replace(
                &mut self.repl.links[i].statements[k],
                Statement {
                    prev: 0,
                    generation: 0,
                    rows: None,
                    sent_ms: 0,
                    applied_at_ms: 0,
                    reply_at_ms: 0,
                    fate: Fate::Error,
                    result: None,
                },
            );
            let result = self.apply(shard, &st);
            self.repl.links[i].statements[k] = Statement { result: Some(result), ..st };
        }
        while let Some(st) = self.repl.links[i].statements.front() {
            let Some(result) = st.result else { break };
            if st.reply_at_ms > now {
                break;
            }
            if st.fate == Fate::LostReply {
                self.hash(format!("reply-lost-{shard}").as_bytes());
                self.drop_connection(shard, now);
                break;
            }
            self.repl.links[i].statements.pop_front();
            match self.repl.links[i].flow.completed(result, now * 1_000) {
                Completion::Confirmed { released, .. } => self.out(shard, released, true)?,
                Completion::Lost { .. } => {
                    self.hash(format!("commit-lost-{shard}").as_bytes());
                    self.drop_connection(shard, now);
                    break;
                }
            }
        }
        Ok(())
    }

    /// A new connection reads the head and goes on from it (as the real task's handshake).
    fn reconnect(&mut self, shard: u16, now: u64, remote_up: bool) -> Result<(), Failure> {
        let i = usize::from(shard);
        let link = &self.repl.links[i];
        if link.flow.connected() || now < link.retry_at_ms {
            return Ok(());
        }
        if !remote_up {
            self.repl.links[i].retry_at_ms = now + 10 + self.rng.below(40);
            return Ok(());
        }
        let head = self.repl.remote.head(shard);
        let generation = self.repl.generation;
        let link = &mut self.repl.links[i];
        let available = link.available();
        let store = &link.store;
        let local = |seq: u64| Ok::<_, ReplicateError>(store.get(&seq).map(|r| r.hash));
        match link.flow.head_read(head, generation, available, local, now * 1_000) {
            Ok((resume, released)) => {
                link.down_since_ms = None;
                self.hash(
                    format!("connected-{shard}-{}-{}", resume.from, resume.late_success).as_bytes(),
                );
                self.out(shard, released, true)
            }
            Err(ReplicateError::Fenced { .. }) if self.repl.fence_expected => {
                self.repl.links[i].fenced = true;
                self.hash(format!("fenced-{shard}").as_bytes());
                Ok(())
            }
            Err(e) => Err(self.fail(format!("shard {shard}: replication cannot go on: {e}"))),
        }
    }

    /// Statements for what the flow asks to ship (and heartbeats), each with its fate.
    fn ship(&mut self, shard: u16, now: u64) {
        let i = usize::from(shard);
        let now_us = now * 1_000;
        loop {
            let link = &self.repl.links[i];
            let available = link.available();
            let rows = if let Some(ship) = link.flow.next_shipment(available) {
                let mut rows: Rows = Vec::new();
                let mut seq = ship.prev + 1;
                while let Some(record) = link.store.get(&seq) {
                    let end = seq >= ship.available
                        || link.store.get(&(seq + 1)).is_none_or(|n| n.batch_start == n.seq);
                    rows.push((seq, end, record.bytes.clone(), record.hash));
                    if end && (seq >= ship.available || rows.len() >= STATEMENT_RECORDS_MAX) {
                        break;
                    }
                    seq += 1;
                }
                Some((ship.prev, rows))
            } else if link.flow.heartbeat_due(available, now_us) {
                None
            } else {
                return;
            };
            let st = self.statement(shard, now, rows);
            let link = &mut self.repl.links[i];
            match &st.rows {
                Some(rows) => {
                    let last = rows.last().map_or(st.prev, |r| r.0);
                    link.flow.shipped(last, rows.len() as u64, now_us);
                }
                None => link.flow.heartbeat_sent(now_us),
            }
            link.statements.push_back(st);
        }
    }

    /// A statement sent now, its fate and timing drawn from the seed; PostgreSQL runs one
    /// connection's statements one after another, so none finishes before the one ahead.
    fn statement(&mut self, shard: u16, now: u64, rows: Option<(u64, Rows)>) -> Statement {
        let (prev, rows) = match rows {
            Some((prev, rows)) => (prev, Some(rows)),
            None => (0, None),
        };
        let mut fate = Fate::Normal;
        let mut applied_at_ms = now + self.rng.below(8);
        let mut reply_at_ms = applied_at_ms + self.rng.below(8);
        if self.repl.faults {
            match self.rng.below(1000) {
                0..=9 => {
                    fate = Fate::Error;
                    self.hash(b"commit-error");
                }
                10..=14 => {
                    // No answer for longer than the bound (a stalled synchronous standby).
                    applied_at_ms = now + STALL_MS + self.rng.below(2 * STALL_MS);
                    reply_at_ms = applied_at_ms + self.rng.below(8);
                    self.hash(b"commit-stall");
                }
                15..=19 => {
                    fate = Fate::LostReply;
                    self.hash(b"commit-reply-lost");
                }
                20..=29 => {
                    // Took effect at once; the answer is late, sometimes past the bound.
                    reply_at_ms = applied_at_ms + STALL_MS / 2 + self.rng.below(2 * STALL_MS);
                    self.hash(b"commit-reply-late");
                }
                _ => {}
            }
            if fate != Fate::Normal || reply_at_ms > now + 16 {
                self.repl.replication_faults += 1;
            }
        }
        let link = &self.repl.links[usize::from(shard)];
        if let Some(ahead) = link.statements.back() {
            applied_at_ms = applied_at_ms.max(ahead.applied_at_ms);
            reply_at_ms = reply_at_ms.max(ahead.reply_at_ms);
        }
        reply_at_ms = reply_at_ms.max(applied_at_ms);
        Statement {
            prev,
            generation: self.repl.generation,
            rows,
            sent_ms: now,
            applied_at_ms,
            reply_at_ms,
            fate,
            result: None,
        }
    }

    /// While stalled (answers refused, a commit unanswered or the connection down for the
    /// bound) the shard refuses card work, and nothing is held longer than the bound.
    fn check_stall_refuses(&self, shard: u16, now: u64, refused: bool) -> Result<(), Failure> {
        let link = &self.repl.links[usize::from(shard)];
        let down = link.down_since_ms.is_some_and(|t| now - t >= STALL_MS);
        let waiting = link.statements.front().is_some_and(|s| now - s.sent_ms >= STALL_MS);
        let refusing = link.flow.refusing(Mode::Sync);
        if (down || waiting || refused) && !refusing {
            return Err(self.fail(format!(
                "shard {shard}: replication stalled (down {down}, commit waiting {waiting}, \
                 answers refused {refused}) but card work is not refused"
            )));
        }
        if let Some(g) = link.flow.held().find(|g| now * 1_000 - g.at_us >= STALL_MS * 1_000) {
            return Err(self.fail(format!(
                "shard {shard}: a group commit up to {} is held past the stall bound",
                g.last_seq
            )));
        }
        Ok(())
    }

    /// A restart of the server: the replication task starts over from the recovered journal;
    /// held answers were never sent (their terminals retry), and statements PostgreSQL had
    /// received may still take effect.
    pub fn restart_replication(&mut self) -> Result<(), Failure> {
        let now = self.repl.clock_ms;
        for shard in 0..SHARDS {
            let i = usize::from(shard);
            let statements = std::mem::take(&mut self.repl.links[i].statements);
            for st in statements {
                if st.result.is_none() && st.fate != Fate::Error && self.rng.chance(500) {
                    self.apply(shard, &st);
                }
            }
            let lost: Vec<(String, Request)> = self.repl.links[i]
                .flow
                .held()
                .flat_map(|g| g.replies.iter().map(|a| (a.terminal.clone(), a.request.clone())))
                .collect();
            self.unanswered.extend(lost);
            let last = self.last_seq(shard)?;
            let mut store = std::mem::take(&mut self.repl.links[i].store);
            // Only with an injected bug did a handed-over record not survive the crash.
            store.retain(|&seq, _| seq <= last);
            let from = store.keys().next_back().copied().unwrap_or(0) + 1;
            if from <= last {
                let dir = self.shard_dir(shard);
                let tail = RecordTail::open_at_on(
                    self.disk.storage(),
                    &dir.join("journal"),
                    &dir.join("archive"),
                    from,
                );
                let mut tail = tail.map_err(|e| self.fail(format!("reading the journal: {e}")))?;
                for _ in from..=last {
                    let record = tail.read_next();
                    let record =
                        record.map_err(|e| self.fail(format!("reading the journal: {e}")))?;
                    store.insert(record.seq, record);
                }
            }
            let mut link = Link::new(shard, last, now);
            link.store = store;
            link.next_order = self.repl.links[i].next_order;
            link.last_out = self.repl.links[i].last_out;
            self.repl.links[i] = link;
        }
        Ok(())
    }

    /// A quiet spell: no replication faults until every shard has caught up; then PostgreSQL's
    /// chain must be the journal's, record for record.
    pub fn catch_up(&mut self) -> Result<(), Failure> {
        self.repl.faults = false;
        self.repl.remote_down_until_ms = 0;
        let mut caught_up = false;
        for _ in 0..CATCH_UP_TICKS {
            self.repl.clock_ms += TICK_QUIET_MS;
            self.replicate()?;
            caught_up = self.repl.links.iter().all(|l| {
                l.flow.connected()
                    && l.flow.confirmed() == l.flow.durable()
                    && l.flow.idle()
                    && !l.flow.refusing(Mode::Sync)
            });
            if caught_up {
                break;
            }
        }
        self.repl.faults = true;
        if !caught_up {
            let lags: Vec<String> = self
                .repl
                .links
                .iter()
                .map(|l| format!("confirmed {} of {}", l.flow.confirmed(), l.flow.durable()))
                .collect();
            return Err(self.fail(format!(
                "replication did not catch up in a quiet spell: {}",
                lags.join(", ")
            )));
        }
        for shard in 0..SHARDS {
            let link = &self.repl.links[usize::from(shard)];
            let head = self.repl.remote.head(shard).map_or(0, |h| h.last_seq);
            if head != link.available() {
                return Err(self.fail(format!(
                    "shard {shard}: PostgreSQL's head is {head}, the journal's {}",
                    link.available()
                )));
            }
            let theirs: Vec<(u64, [u8; 32])> =
                self.repl.remote.records(shard).map(|(seq, r)| (seq, r.hash)).collect();
            let ours: Vec<(u64, [u8; 32])> =
                link.store.iter().map(|(&seq, r)| (seq, r.hash)).collect();
            if theirs != ours {
                return Err(self.fail(format!(
                    "shard {shard}: PostgreSQL's chain differs from the journal's"
                )));
            }
        }
        self.hash(b"caught-up");
        Ok(())
    }

    /// The journal itself (on the disk) holds exactly the records handed over.
    pub fn check_store_is_journal(&mut self) -> Result<(), Failure> {
        for shard in 0..SHARDS {
            let dir = self.shard_dir(shard);
            let storage = self.disk.storage();
            let archive = dir.join("archive");
            let start = citycard::journal::Start::Full { archive: Some(&archive) };
            let mut seen = Vec::new();
            citycard::journal::read_from_on(
                &storage,
                &dir.join("journal"),
                start,
                |seq, payload| {
                    seen.push((seq, payload.to_vec()));
                    Ok(())
                },
            )
            .map_err(|e| self.fail(format!("reading shard {shard}'s journal: {e}")))?;
            let link = &self.repl.links[usize::from(shard)];
            let ours: Vec<(u64, Vec<u8>)> =
                link.store.iter().map(|(&seq, r)| (seq, r.payload().to_vec())).collect();
            if seen != ours {
                return Err(self.fail(format!(
                    "shard {shard}: the records handed to replication are not the journal's"
                )));
            }
        }
        Ok(())
    }

    /// A failover drill: PostgreSQL's records become a new site (a standby's journal, then the
    /// engine's recovery), and every acknowledged answer the ledger says was journaled must
    /// come back byte for byte when its terminal sends the same request there.
    pub fn failover(&mut self) -> Result<(), Failure> {
        self.repl.failovers += 1;
        self.hash(b"failover");
        let disk = MemDisk::new(self.rng.fork());
        let root = tempfile::tempdir().map_err(|e| self.fail(format!("failover site: {e}")))?;
        let mut site: Vec<Shard> = Vec::new();
        for shard in 0..SHARDS {
            let dir = root.path().join(format!("shard-{shard}"));
            let options = JournalOptions {
                segment_bytes: self.segment_bytes(),
                storage: disk.storage(),
                ..Default::default()
            };
            let mut journal = Journal::open(&dir.join("journal"), options, |_, _| Ok(()))
                .map_err(|e| self.fail(format!("failover journal: {e}")))?;
            let records: Vec<(u64, crate::remote::Stored)> =
                self.repl.remote.records(shard).map(|(s, r)| (s, r.clone())).collect();
            for (seq, stored) in records {
                let record = RawRecord::check(stored.bytes)
                    .map_err(|e| self.fail(format!("PostgreSQL record {seq}: {e}")))?;
                let appended = journal.append(record.payload());
                let appended = appended.map_err(|e| self.fail(format!("failover append: {e}")))?;
                if appended != seq || journal.last_hash() != stored.hash {
                    return Err(self.fail(format!(
                        "shard {shard}: the failover site wrote record {seq} differently"
                    )));
                }
                if stored.batch_end {
                    journal.commit().map_err(|e| self.fail(format!("failover commit: {e}")))?;
                }
            }
            drop(journal);
            let options = self.shard_options(shard, dir, disk.storage(), None);
            let (opened, _) = Shard::open(options, self.secrets())
                .map_err(|e| self.fail(format!("failover shard {shard} did not open: {e}")))?;
            site.push(opened);
        }
        let acked: Vec<Answer> = self.repl.acked.iter().cloned().collect();
        for answer in acked {
            if !self.journaled_answer(&answer) {
                continue;
            }
            let index =
                citycard::server::route(&answer.request, &answer.terminal, usize::from(SHARDS));
            let out =
                site[index].execute(&answer.terminal, Op::Request(&answer.request), self.now_ms);
            let again = match out {
                Ok(Output::Response(a)) => crate::traffic::encode(&a.into_response()),
                Ok(_) => return Err(self.fail("the failover site answered with another output")),
                Err(e) => return Err(self.fail(format!("the failover site failed: {e}"))),
            };
            self.repl.failover_checked += 1;
            if again != answer.bytes {
                return Err(self.fail(format!(
                    "after a failover an acknowledged answer came back different: {:?}",
                    answer.request
                )));
            }
        }
        Ok(())
    }

    /// The ledger holds this answer as a journaled ATC use or staff operation, which a retry
    /// must get back (unless the card made more operations since than the chain walk reaches).
    fn journaled_answer(&self, answer: &Answer) -> bool {
        if let Some(auth) = answer.request.card_auth() {
            let Some(card) = self.model.cards.get(&auth.card_id) else { return false };
            let Some(used) = card.used.get(&auth.atc.0) else { return false };
            return used.terminal == answer.terminal
                && used.request.as_ref() == Some(&answer.request)
                && used.answer == answer.bytes
                && card.ops - used.ops_at < WALK_DEPTH;
        }
        self.model.staff.iter().any(|((terminal, _), s)| {
            *terminal == answer.terminal && s.request == answer.request && s.answer == answer.bytes
        })
    }

    /// The other site is promoted: the old primary's next commit finds the new generation, and
    /// its head read must fence it.
    pub fn check_fenced(&mut self) -> Result<(), Failure> {
        self.repl.remote.promote();
        self.repl.fence_expected = true;
        for _ in 0..CATCH_UP_TICKS {
            self.repl.clock_ms += TICK_QUIET_MS;
            self.repl.faults = false;
            self.replicate()?;
            if self.repl.links.iter().all(|l| l.fenced) {
                self.repl.faults = true;
                return Ok(());
            }
        }
        Err(self.fail("after a promotion elsewhere the old primary was not fenced"))
    }
}
