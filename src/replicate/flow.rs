//! The decisions of a shard's replication task as a synchronous state machine, time passed in:
//! what to ship next, which held replies a confirmed commit releases, when the shard counts as
//! stalled, and what a head read after (re)connecting means. The server's task
//! ([`super::primary`]) and the simulator drive the same code.
//!
//! Time is microseconds on a monotonic clock of the caller's choosing (`now_us`). The flow
//! does no I/O: the caller sends the statements it asks for, reads the records they carry,
//! and reports each statement's result in order (PostgreSQL runs one connection's statements
//! one after another, so results come back in the order they were sent).

use std::collections::VecDeque;

use super::link::BACKLOG_RECORDS_MAX;
use super::{Mode, ReplicateError};

/// Statements in flight per shard connection while catching up (each a full
/// `STATEMENT_RECORDS_MAX`). In steady state only one is: PostgreSQL runs a connection's
/// statements one after another, each waiting for the standby's flush, so a second statement
/// sent at once would carry only what arrived in the meantime; waiting instead lets every group
/// commit decided during that flush ride in the next statement (measured at 64 terminals:
/// 8 in flight gave 0.08 of the unreplicated throughput, one at a time see the README).
pub const PIPELINE_DEPTH: usize = 8;
/// Most records one statement carries when several group commits are waiting (catching up
/// after an outage): whole group commits only, so one larger than this goes alone.
pub const STATEMENT_RECORDS_MAX: usize = 4_096;
/// An idle shard commits a heartbeat at least this often (its head row's commit time, under
/// its generation), so a stalled synchronous standby or a promotion elsewhere shows without
/// traffic.
pub const HEARTBEAT_MAX_US: u64 = 1_000_000;

/// One group commit's replies, held until PostgreSQL has every record up to `last_seq`.
#[derive(Debug)]
pub struct Group<R> {
    pub last_seq: u64,
    /// When the group commit was durable locally (the stall bound counts from here).
    pub at_us: u64,
    pub replies: Vec<R>,
}

/// A statement sent and not yet answered.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// Last seq it carries (a heartbeat: the confirmed seq when it was sent).
    last: u64,
    /// Rows PostgreSQL reports when it took the statement.
    expected: u64,
    sent_us: u64,
}

/// What PostgreSQL holds for a shard (its `citycard_shard` row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteHead {
    pub generation: u64,
    pub last_seq: u64,
    pub last_hash: [u8; 32],
}

/// The next statement to send: the records after `prev`, whole group commits, ending at
/// `available` or once [`STATEMENT_RECORDS_MAX`] records are in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shipment {
    pub prev: u64,
    pub available: u64,
}

/// What one statement's result did.
#[derive(Debug)]
pub enum Completion<R> {
    /// PostgreSQL took every record: these replies may go out now, in this order.
    Confirmed { expected: u64, sent_us: u64, released: Vec<R> },
    /// The statement failed or took fewer rows than sent (the head moved, the generation
    /// changed): the connection is given up; reconnect and read the head.
    Lost { expected: u64, sent_us: u64, rows: Option<u64> },
}

/// Why the shard became stalled in a [`Flow::check_stall`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallReason {
    /// A group commit's replies waited past the bound and were answered Unavailable.
    Answers,
    /// A statement in flight has not come back within the bound.
    Commit,
    /// The connection has been down for the bound.
    Down,
}

/// What a head read after (re)connecting told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    /// PostgreSQL's last seq: shipping goes on after it.
    pub from: u64,
    /// PostgreSQL holds records beyond what was confirmed: a commit succeeded whose answer was
    /// lost with the connection.
    pub late_success: bool,
    /// PostgreSQL holds fewer records than were sent: those after `from` are sent again.
    pub resend: bool,
}

/// A shard's replication decisions. `R` is a held reply (the server's is a reply and the
/// channel it goes to; the simulator's an answer it records).
#[derive(Debug)]
pub struct Flow<R> {
    shard: u16,
    stall_us: u64,
    /// Last seq durable locally, sent in a statement, and confirmed by PostgreSQL.
    durable: u64,
    sent: u64,
    confirmed: u64,
    held: VecDeque<Group<R>>,
    /// Statements sent, oldest first (results come back in this order).
    in_flight: VecDeque<InFlight>,
    stalled: bool,
    /// Last statement sent or completed (heartbeats go out after a quiet spell).
    last_activity_us: u64,
    ever_connected: bool,
    /// When the connection was lost (None while connected).
    down_since_us: Option<u64>,
}

impl<R> Flow<R> {
    /// A shard whose local journal ends at `durable`, not connected yet (so `sync` mode
    /// refuses card work until the first head read succeeded).
    pub fn new(shard: u16, durable: u64, stall_ms: u64, now_us: u64) -> Flow<R> {
        Flow {
            shard,
            stall_us: stall_ms.saturating_mul(1_000),
            durable,
            sent: 0,
            confirmed: 0,
            held: VecDeque::new(),
            in_flight: VecDeque::new(),
            stalled: false,
            last_activity_us: now_us,
            ever_connected: false,
            down_since_us: Some(now_us),
        }
    }

    pub fn durable(&self) -> u64 {
        self.durable
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Records durable locally that PostgreSQL has not confirmed.
    pub fn lag(&self) -> u64 {
        self.durable.saturating_sub(self.confirmed)
    }

    pub fn connected(&self) -> bool {
        self.down_since_us.is_none()
    }

    pub fn stalled(&self) -> bool {
        self.stalled
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Nothing held and nothing in flight (a closing task may end).
    pub fn idle(&self) -> bool {
        self.held.is_empty() && self.in_flight.is_empty()
    }

    /// The oldest held group's `last_seq` and the number held, for checks.
    pub fn held(&self) -> impl Iterator<Item = &Group<R>> {
        self.held.iter()
    }

    /// Card work is refused Unavailable: in `sync` mode while stalled, before the first
    /// connection, or with more than [`BACKLOG_RECORDS_MAX`] records unconfirmed.
    pub fn refusing(&self, mode: Mode) -> bool {
        mode == Mode::Sync
            && (self.stalled || !self.ever_connected || self.lag() > BACKLOG_RECORDS_MAX)
    }

    /// A group commit is durable locally: its replies wait for PostgreSQL (some may go at once
    /// if PostgreSQL already has its records).
    pub fn durable_group(&mut self, group: Group<R>, now_us: u64) -> Vec<R> {
        self.durable = self.durable.max(group.last_seq);
        self.held.push_back(group);
        self.release(now_us)
    }

    /// The statement to send next, if any: while connected, one at a time in steady state,
    /// up to [`PIPELINE_DEPTH`] full ones while catching up. `available` is the last seq the
    /// caller can read (durable, or handed over and following on).
    pub fn next_shipment(&self, available: u64) -> Option<Shipment> {
        if !self.connected() {
            return None;
        }
        let backlog = available.saturating_sub(self.sent);
        let room = self.in_flight.is_empty()
            || (self.in_flight.len() < PIPELINE_DEPTH && backlog >= STATEMENT_RECORDS_MAX as u64);
        (room && backlog > 0).then_some(Shipment { prev: self.sent, available })
    }

    /// A statement carrying `records` records up to `last` was sent.
    pub fn shipped(&mut self, last: u64, records: u64, now_us: u64) {
        self.sent = last;
        self.in_flight.push_back(InFlight { last, expected: records, sent_us: now_us });
        self.last_activity_us = now_us;
    }

    /// Whether a heartbeat is due: connected, nothing in flight or waiting to be sent, and
    /// quiet for half the stall bound (at most [`HEARTBEAT_MAX_US`]).
    pub fn heartbeat_due(&self, available: u64, now_us: u64) -> bool {
        let every = (self.stall_us / 2).min(HEARTBEAT_MAX_US);
        self.connected()
            && self.in_flight.is_empty()
            && self.sent >= available
            && now_us.saturating_sub(self.last_activity_us) >= every
    }

    /// A heartbeat was sent (it touches one row under the generation).
    pub fn heartbeat_sent(&mut self, now_us: u64) {
        self.in_flight.push_back(InFlight { last: self.confirmed, expected: 1, sent_us: now_us });
        self.last_activity_us = now_us;
    }

    /// The oldest statement in flight came back with `rows` rows (`None`: it failed).
    pub fn completed(&mut self, rows: Option<u64>, now_us: u64) -> Completion<R> {
        self.last_activity_us = now_us;
        let Some(done) = self.in_flight.pop_front() else {
            // The caller reports only statements it sent; nothing in flight means a bug there.
            // Treated as a lost connection, which re-reads the head and loses nothing.
            self.lost(now_us);
            return Completion::Lost { expected: 0, sent_us: now_us, rows };
        };
        match rows {
            Some(rows) if rows == done.expected => {
                self.confirmed = self.confirmed.max(done.last);
                let released = self.release(now_us);
                Completion::Confirmed { expected: done.expected, sent_us: done.sent_us, released }
            }
            rows => {
                self.lost(now_us);
                Completion::Lost { expected: done.expected, sent_us: done.sent_us, rows }
            }
        }
    }

    /// The connection is gone: whatever was in flight is unknown until the next head read,
    /// and shipping starts again after the confirmed seq.
    pub fn lost(&mut self, now_us: u64) {
        self.in_flight.clear();
        self.sent = self.confirmed;
        if self.down_since_us.is_none() {
            self.down_since_us = Some(now_us);
        }
    }

    /// A head read on a new connection, under `generation` (ours). `local_hash(seq)` gives
    /// the hash of our record `seq` (`None` if we do not have it). PostgreSQL ahead of what was
    /// confirmed is a late success; behind what was sent means re-sending; a newer generation
    /// fences us, and an older one, a missing row, a head beyond our journal or another hash at
    /// its seq is a divergence. On success the flow is connected and releases what it can.
    pub fn head_read<E>(
        &mut self,
        head: Option<RemoteHead>,
        generation: u64,
        available: u64,
        local_hash: impl FnOnce(u64) -> Result<Option<[u8; 32]>, E>,
        now_us: u64,
    ) -> Result<(Resume, Vec<R>), ReplicateError>
    where
        ReplicateError: From<E>,
    {
        let shard = self.shard;
        let Some(head) = head else {
            return Err(ReplicateError::Diverged {
                shard,
                reason: "its row vanished from citycard_shard".into(),
            });
        };
        if head.generation != generation {
            if head.generation > generation {
                return Err(ReplicateError::Fenced {
                    shard,
                    ours: generation,
                    found: head.generation,
                });
            }
            return Err(ReplicateError::Diverged {
                shard,
                reason: format!(
                    "postgresql records generation {}, older than ours {generation}",
                    head.generation
                ),
            });
        }
        if head.last_seq > available {
            return Err(ReplicateError::Diverged {
                shard,
                reason: format!(
                    "postgresql holds records up to seq {} but this journal ends at {available} \
                     (a batch shipped before its local sync was lost here, as in a power loss: \
                     fail over, or rebuild this site as a standby)",
                    head.last_seq
                ),
            });
        }
        if head.last_seq > 0 && local_hash(head.last_seq)? != Some(head.last_hash) {
            return Err(ReplicateError::Diverged {
                shard,
                reason: format!("record {} differs from the one postgresql holds", head.last_seq),
            });
        }
        let resume = Resume {
            from: head.last_seq,
            late_success: head.last_seq > self.confirmed,
            resend: head.last_seq < self.sent,
        };
        self.in_flight.clear();
        self.sent = head.last_seq;
        self.confirmed = head.last_seq;
        self.down_since_us = None;
        self.ever_connected = true;
        Ok((resume, self.release(now_us)))
    }

    /// The replies of every group commit PostgreSQL now has, oldest first; the shard serves
    /// again once connected, caught up and with nothing in flight past the bound.
    pub fn release(&mut self, now_us: u64) -> Vec<R> {
        let mut out = Vec::new();
        let mut released = false;
        while self.held.front().is_some_and(|h| h.last_seq <= self.confirmed) {
            if let Some(group) = self.held.pop_front() {
                out.extend(group.replies);
                released = true;
            }
        }
        if released && crate::sim_bugs::active(crate::sim_bugs::Bug::ReleaseEarly) {
            // The injected bug: the next group goes out with the ones PostgreSQL confirmed.
            if let Some(group) = self.held.pop_front() {
                out.extend(group.replies);
            }
        }
        let fresh =
            self.in_flight.front().is_none_or(|f| now_us.saturating_sub(f.sent_us) < self.stall_us);
        if self.stalled && self.connected() && self.confirmed >= self.durable && fresh {
            self.stalled = false;
        }
        out
    }

    /// Takes out, to be answered Unavailable, the replies that waited past the stall bound,
    /// and marks the shard stalled if any did, if a statement waits that long, or if the
    /// connection has been down that long. Returns the refused replies and the reason the shard
    /// became stalled in this call, if it did.
    pub fn check_stall(&mut self, now_us: u64) -> (Vec<R>, Option<StallReason>) {
        let was = self.stalled;
        let mut reason = None;
        let mut refused = Vec::new();
        while self.held.front().is_some_and(|h| now_us.saturating_sub(h.at_us) >= self.stall_us) {
            if let Some(group) = self.held.pop_front() {
                if !group.replies.is_empty() {
                    self.stalled = true;
                    reason = reason.or(Some(StallReason::Answers));
                }
                refused.extend(group.replies);
            }
        }
        let waiting = self
            .in_flight
            .front()
            .is_some_and(|f| now_us.saturating_sub(f.sent_us) >= self.stall_us);
        if waiting {
            self.stalled = true;
            reason = reason.or(Some(StallReason::Commit));
        }
        if self.down_since_us.is_some_and(|t| now_us.saturating_sub(t) >= self.stall_us) {
            self.stalled = true;
            reason = reason.or(Some(StallReason::Down));
        }
        (refused, if was { None } else { reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL_MS: u64 = 100;
    const MS: u64 = 1_000;

    fn group(last_seq: u64, at_ms: u64, replies: &[u32]) -> Group<u32> {
        Group { last_seq, at_us: at_ms * MS, replies: replies.to_vec() }
    }

    fn head(last_seq: u64) -> Option<RemoteHead> {
        Some(RemoteHead { generation: 1, last_seq, last_hash: [last_seq as u8; 32] })
    }

    /// Our record `seq` hashes to `[seq; 32]`.
    fn ours(seq: u64) -> Result<Option<[u8; 32]>, ReplicateError> {
        Ok(Some([seq as u8; 32]))
    }

    /// A flow connected at `now_ms` to a PostgreSQL that holds `last_seq`.
    fn connected(durable: u64, last_seq: u64) -> Flow<u32> {
        let mut flow = Flow::new(0, durable, STALL_MS, 0);
        let read = flow.head_read(head(last_seq), 1, durable, ours, 0);
        assert!(read.is_ok(), "{read:?}");
        flow
    }

    #[test]
    fn refuses_until_first_connected() {
        let flow: Flow<u32> = Flow::new(0, 5, STALL_MS, 0);
        assert!(flow.refusing(Mode::Sync));
        assert!(!flow.refusing(Mode::AsyncUnsafe));
        assert_eq!(flow.next_shipment(5), None, "nothing is shipped while not connected");
        let flow = connected(5, 5);
        assert!(!flow.refusing(Mode::Sync));
    }

    #[test]
    fn ships_from_the_head_then_one_statement_at_a_time() {
        let mut flow = connected(10, 4);
        assert_eq!(flow.next_shipment(10), Some(Shipment { prev: 4, available: 10 }));
        flow.shipped(10, 6, MS);
        assert_eq!(flow.next_shipment(12), None, "a small backlog waits for the one in flight");
        let big = 10 + STATEMENT_RECORDS_MAX as u64;
        assert_eq!(flow.next_shipment(big), Some(Shipment { prev: 10, available: big }));
        for i in 1..PIPELINE_DEPTH as u64 {
            flow.shipped(10 + i, 1, MS);
        }
        assert_eq!(flow.next_shipment(u64::MAX / 2), None, "the pipeline is full");
    }

    #[test]
    fn releases_in_journal_order_only_what_is_confirmed() {
        let mut flow = connected(0, 0);
        assert!(flow.durable_group(group(2, 0, &[1, 2]), 0).is_empty());
        assert!(flow.durable_group(group(3, 0, &[3]), 0).is_empty());
        assert!(flow.durable_group(group(5, 0, &[4]), 0).is_empty());
        flow.shipped(3, 3, MS);
        flow.shipped(5, 2, MS);
        match flow.completed(Some(3), 2 * MS) {
            Completion::Confirmed { released, .. } => assert_eq!(released, vec![1, 2, 3]),
            other => panic!("{other:?}"),
        }
        assert_eq!(flow.confirmed(), 3);
        match flow.completed(Some(2), 3 * MS) {
            Completion::Confirmed { released, .. } => assert_eq!(released, vec![4]),
            other => panic!("{other:?}"),
        }
        assert!(flow.idle());
    }

    #[test]
    fn fewer_rows_or_an_error_lose_the_connection_and_rewind_to_confirmed() {
        let mut flow = connected(6, 0);
        flow.shipped(3, 3, MS);
        flow.shipped(6, 3, MS);
        assert!(matches!(flow.completed(Some(3), 2 * MS), Completion::Confirmed { .. }));
        match flow.completed(Some(0), 3 * MS) {
            Completion::Lost { rows: Some(0), expected: 3, .. } => {}
            other => panic!("{other:?}"),
        }
        assert!(!flow.connected());
        assert_eq!((flow.sent(), flow.confirmed()), (3, 3));
        assert_eq!(flow.next_shipment(6), None);
        let mut flow = connected(6, 0);
        flow.shipped(6, 6, MS);
        assert!(matches!(flow.completed(None, 2 * MS), Completion::Lost { rows: None, .. }));
        assert_eq!(flow.sent(), 0);
    }

    #[test]
    fn a_head_ahead_of_confirmed_is_a_late_success_and_releases() {
        let mut flow = connected(0, 0);
        flow.durable_group(group(4, 0, &[7]), 0);
        flow.shipped(4, 4, MS);
        flow.lost(2 * MS);
        let (resume, released) = flow.head_read(head(4), 1, 4, ours, 3 * MS).expect("head read");
        assert_eq!(resume, Resume { from: 4, late_success: true, resend: false });
        assert_eq!(released, vec![7]);
        assert_eq!(flow.next_shipment(4), None, "nothing left to send");
    }

    #[test]
    fn a_head_behind_what_was_sent_resends_from_it() {
        let mut flow = connected(8, 2);
        flow.shipped(8, 6, MS);
        flow.lost(2 * MS);
        let (resume, _) = flow.head_read(head(2), 1, 8, ours, 3 * MS).expect("head read");
        assert_eq!(resume, Resume { from: 2, late_success: false, resend: false });
        assert_eq!(flow.next_shipment(8), Some(Shipment { prev: 2, available: 8 }));
        // Lost while in flight with no `lost` call first (a fresh handshake after an error).
        flow.shipped(8, 6, 4 * MS);
        let (resume, _) = flow.head_read(head(5), 1, 8, ours, 5 * MS).expect("head read");
        assert_eq!(resume, Resume { from: 5, late_success: true, resend: true });
        assert_eq!(flow.next_shipment(8), Some(Shipment { prev: 5, available: 8 }));
    }

    #[test]
    fn a_newer_generation_fences_and_other_disagreements_diverge() {
        let mut flow: Flow<u32> = Flow::new(3, 8, STALL_MS, 0);
        let newer = Some(RemoteHead { generation: 2, last_seq: 0, last_hash: [0; 32] });
        match flow.head_read(newer, 1, 8, ours, 0) {
            Err(ReplicateError::Fenced { shard: 3, ours: 1, found: 2 }) => {}
            other => panic!("{other:?}"),
        }
        let older = Some(RemoteHead { generation: 1, last_seq: 0, last_hash: [0; 32] });
        assert!(matches!(
            flow.head_read(older, 2, 8, ours, 0),
            Err(ReplicateError::Diverged { .. })
        ));
        assert!(matches!(
            flow.head_read(None, 1, 8, ours, 0),
            Err(ReplicateError::Diverged { .. })
        ));
        assert!(
            matches!(flow.head_read(head(9), 1, 8, ours, 0), Err(ReplicateError::Diverged { .. })),
            "postgresql ahead of the journal"
        );
        let other = |_| Ok::<_, ReplicateError>(Some([0xee; 32]));
        assert!(matches!(
            flow.head_read(head(5), 1, 8, other, 0),
            Err(ReplicateError::Diverged { .. })
        ));
        let missing = |_| Ok::<_, ReplicateError>(None);
        assert!(matches!(
            flow.head_read(head(5), 1, 8, missing, 0),
            Err(ReplicateError::Diverged { .. })
        ));
        assert!(!flow.connected() && flow.refusing(Mode::Sync), "still refusing");
    }

    #[test]
    fn replies_past_the_stall_bound_are_refused_and_the_shard_stalls_until_caught_up() {
        let mut flow = connected(0, 0);
        flow.durable_group(group(2, 0, &[1]), 0);
        flow.durable_group(group(3, 50, &[2]), 50 * MS);
        flow.shipped(3, 3, 0);
        assert_eq!(flow.check_stall(99 * MS), (vec![], None));
        let (refused, reason) = flow.check_stall(100 * MS);
        assert_eq!(refused, vec![1]);
        assert_eq!(reason, Some(StallReason::Answers));
        assert!(flow.refusing(Mode::Sync));
        assert_eq!(flow.check_stall(101 * MS).1, None, "reported once");
        // The commit comes back late: the rest is released, but the shard serves again only
        // when nothing in flight is older than the bound and everything is confirmed.
        flow.durable_group(group(4, 120, &[]), 120 * MS);
        match flow.completed(Some(3), 130 * MS) {
            Completion::Confirmed { released, .. } => assert_eq!(released, vec![2]),
            other => panic!("{other:?}"),
        }
        assert!(flow.stalled(), "record 4 is not confirmed yet");
        flow.shipped(4, 1, 130 * MS);
        assert!(matches!(flow.completed(Some(1), 140 * MS), Completion::Confirmed { .. }));
        assert!(!flow.stalled() && !flow.refusing(Mode::Sync));
    }

    #[test]
    fn a_group_without_replies_does_not_stall_but_a_slow_commit_does() {
        let mut flow = connected(0, 0);
        flow.durable_group(group(1, 0, &[]), 0);
        assert_eq!(flow.check_stall(200 * MS), (vec![], None));
        assert!(!flow.stalled());
        flow.shipped(1, 1, 200 * MS);
        assert_eq!(flow.check_stall(300 * MS).1, Some(StallReason::Commit));
        assert!(flow.refusing(Mode::Sync));
    }

    #[test]
    fn a_connection_down_past_the_bound_stalls_and_a_reconnect_caught_up_serves() {
        let mut flow = connected(2, 2);
        flow.lost(10 * MS);
        assert_eq!(flow.check_stall(109 * MS).1, None);
        assert_eq!(flow.check_stall(110 * MS).1, Some(StallReason::Down));
        assert!(flow.refusing(Mode::Sync));
        let read = flow.head_read(head(2), 1, 2, ours, 120 * MS);
        assert!(read.is_ok());
        assert!(!flow.refusing(Mode::Sync), "caught up on reconnect");
    }

    #[test]
    fn too_long_a_backlog_refuses_within_the_bound() {
        let mut flow = connected(0, 0);
        flow.durable_group(group(BACKLOG_RECORDS_MAX + 1, 0, &[]), 0);
        assert!(flow.refusing(Mode::Sync));
        assert!(!flow.refusing(Mode::AsyncUnsafe));
    }

    #[test]
    fn heartbeats_on_a_quiet_connection_only() {
        let mut flow = connected(3, 3);
        assert!(!flow.heartbeat_due(3, 49 * MS));
        assert!(flow.heartbeat_due(3, 50 * MS));
        assert!(!flow.heartbeat_due(4, 50 * MS), "records waiting go first");
        flow.heartbeat_sent(50 * MS);
        assert!(!flow.heartbeat_due(3, 200 * MS), "one in flight");
        assert!(matches!(flow.completed(Some(1), 60 * MS), Completion::Confirmed { .. }));
        assert_eq!(flow.confirmed(), 3);
        flow.heartbeat_sent(200 * MS);
        assert!(matches!(flow.completed(Some(0), 210 * MS), Completion::Lost { .. }));
    }
}
