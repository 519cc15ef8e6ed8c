//! One terminal connection as a sans-IO state machine: bytes in, work for the shards out (as
//! values the driver routes), answers in, bytes out, and its timers with `now` passed in.
//!
//! The tokio driver ([`super::connection`]) owns the socket, the shard queues and the clock. It
//! feeds events in ([`Session::received`], [`Session::reply`], [`Session::refused`],
//! [`Session::close`], [`Session::handle_timeout`]) and after each event drains the outputs:
//! [`Session::poll_submission`] until `None`, then [`Session::transmit`], [`Session::poll_end`]
//! and [`Session::poll_timeout`] (quinn-proto's `poll_transmit` / `poll_timeout` shape).
//!
//! The closing order (PROTOCOL.md 5.1): every request accepted before the end is answered
//! first (bounded by the drain timeout; a storage failure makes their outcome unknown), then the
//! Error frame that says why the connection ends, if any, then close_notify (the driver's).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use citycard_protocol::answer::{decline, decline_record};
use citycard_protocol::frame::decode_frame;
use citycard_protocol::{
    frame_to_request, Answer, CardResult, DecodeError, ErrorCode, HotlistChanges, HotlistEntry,
    MessageType, NumberedRecord, NumberedResult, NumberedResults, Request, RequestId, Response,
    ServerInfo, Status, MAX_HOTLIST_ENTRIES,
};

use super::worker::{Reply, Work, WorkerShared};
use super::{permitted, route};
use crate::config::Config;
use crate::engine::Output;
use crate::identity::Role;
use crate::int_hash::IntMap;
use crate::metrics::METRICS;

/// Bytes the read buffer grows by before each socket read.
pub const READ_CHUNK: usize = 16 * 1024;

/// Why a connection ended (for the log).
#[derive(Debug)]
pub enum End {
    ClientClosed,
    Idle,
    FrameTimeout,
    WriteTimeout,
    Protocol(ErrorCode),
    Io(std::io::Error),
    Shutdown,
    /// The terminal's certificate was revoked while it was connected.
    Revoked,
    ServerFailed,
}

/// Why the server closes a connection from outside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The server stops: answer what was accepted, then `ShuttingDown`.
    Shutdown,
    /// The terminal's certificate was revoked (CRL reload): answer, then `NotPermitted`.
    Revoked,
    /// A shard's storage failed: outcomes still owed are unknown, `Internal` at once.
    StorageFailed,
}

/// The clock readings an event carries: the monotonic instant for timers and latency, and Unix
/// milliseconds for what the terminal is told (Hello's server time).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub at: Instant,
    pub unix_ms: u64,
}

impl Now {
    /// The real clocks (the driver's edge).
    pub fn real() -> Now {
        Now { at: Instant::now(), unix_ms: crate::now_ms() }
    }
}

/// The limits a session enforces, from the server configuration.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// No frame and no answer for this long with nothing in flight ends the connection.
    pub idle: Duration,
    /// A frame started must be complete within this (while the server is reading).
    pub frame_timeout: Duration,
    /// Requests in flight at once; at the limit the session reads nothing (back-pressure).
    pub max_in_flight: usize,
    /// How long a closing connection waits for the answers it owes.
    pub drain: Duration,
}

impl SessionLimits {
    pub fn from_config(config: &Config) -> SessionLimits {
        SessionLimits {
            idle: Duration::from_millis(config.idle_timeout_ms),
            frame_timeout: Duration::from_millis(config.frame_timeout_ms),
            max_in_flight: config.max_in_flight,
            drain: Duration::from_millis(config.drain_timeout_ms),
        }
    }
}

/// Work for one shard, to be queued by the driver. A queue that refuses it hands it back
/// through [`Session::refused`].
pub struct Submission {
    pub shard: usize,
    pub request_id: RequestId,
    pub work: Work,
}

/// A request waiting for its answer.
struct InFlight {
    /// When its frame was decoded (request latency is measured from here).
    started: Instant,
    message_type: MessageType,
    gather: Gather,
}

/// How the answer is put together: one shard's reply, or parts from several shards.
enum Gather {
    Single,
    Offline {
        results: Vec<Option<CardResult>>,
        parts_left: usize,
    },
    Hotlist {
        cursor: Vec<u64>,
        entries: Vec<HotlistEntry>,
        more: bool,
        parts_left: usize,
    },
    /// Protocol 1.3, first phase: every shard says which of the batch's seqs it holds for this
    /// terminal. `held_by[i]` has bit s set when shard s holds record i's seq.
    SeqLookup {
        records: Vec<NumberedRecord>,
        held_by: Vec<u64>,
        highest: u64,
        parts_left: usize,
        /// Set when a shard could not look: the whole batch is declined with it.
        refused: Option<Status>,
        guard: UploadGuard,
    },
    /// Protocol 1.3, second phase: each card's shard decides its records.
    Numbered {
        results: Vec<Option<NumberedResult>>,
        highest: u64,
        parts_left: usize,
        /// Held until the answer is written (or the connection drops it).
        _guard: UploadGuard,
    },
}

/// A terminal's numbered batch in flight (see `WorkerShared::numbered_uploads`); dropping it,
/// with the answer or with the connection, lets the terminal's next numbered batch in.
struct UploadGuard {
    terminal: Arc<str>,
    registry: Arc<WorkerShared>,
}

impl UploadGuard {
    /// None when the terminal already has a numbered batch in flight.
    fn take(terminal: &Arc<str>, registry: &Arc<WorkerShared>) -> Option<UploadGuard> {
        // A poisoned lock only means another connection panicked while holding it; the set
        // itself is still a set of names.
        let mut set = registry.numbered_uploads.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(terminal.clone())
            .then(|| UploadGuard { terminal: terminal.clone(), registry: registry.clone() })
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let mut set = self.registry.numbered_uploads.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.terminal);
    }
}

/// Where the session is in its life.
enum State {
    /// Reading, deciding, answering.
    Open,
    /// Reading no more; waiting (until `deadline`) for the answers owed, then closing with `end`.
    Draining { end: End, deadline: Instant },
    /// Done: what is in the transmit buffer is the last the terminal gets, then close_notify.
    Closed(End),
    /// `poll_end` handed the end to the driver.
    Finished,
}

pub struct Session {
    terminal: Arc<str>,
    role: Role,
    limits: SessionLimits,
    /// The shards' hotlist versions (their sum answers Hello); one per shard.
    workers: Vec<Arc<WorkerShared>>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// At most `limits.max_in_flight` entries (nothing is read at the limit), so the unkeyed
    /// [`crate::int_hash`] is safe: ids a terminal picks to collide cost it at most that many
    /// probes per lookup, on its own connection.
    pending: IntMap<RequestId, InFlight>,
    /// Work decoded but not yet taken by the driver.
    submissions: VecDeque<Submission>,
    /// When the partial frame now in the read buffer started to wait (only while reading).
    frame_started: Option<Instant>,
    /// Last byte read or answer received: the idle timer runs from here.
    last_activity: Instant,
    /// The Error frame that ends the connection, sent after the answers still owed for the
    /// requests accepted before it (PROTOCOL.md 5.1: every accepted request gets its answer).
    closing: Option<(RequestId, ErrorCode, String)>,
    /// A storage failure was reported (it is reported once; later ones change nothing).
    failed: bool,
    state: State,
}

impl Session {
    pub fn new(
        terminal: Arc<str>,
        role: Role,
        limits: SessionLimits,
        workers: Vec<Arc<WorkerShared>>,
        now: Now,
    ) -> Session {
        Session {
            terminal,
            role,
            limits,
            workers,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(READ_CHUNK),
            pending: IntMap::default(),
            submissions: VecDeque::new(),
            frame_started: None,
            last_activity: now.at,
            closing: None,
            failed: false,
            state: State::Open,
        }
    }

    pub fn terminal(&self) -> &Arc<str> {
        &self.terminal
    }

    fn shard_count(&self) -> usize {
        self.workers.len()
    }

    /// Requests accepted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Whether the driver should read from the socket: open and below the in-flight limit.
    pub fn wants_read(&self) -> bool {
        matches!(self.state, State::Open) && self.pending.len() < self.limits.max_in_flight
    }

    /// Whether close reasons other than a storage failure still matter (the session is open).
    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    /// Whether a storage failure was already reported.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// The buffer a socket read appends to (room for [`READ_CHUNK`] reserved); follow a read
    /// with [`Session::received`].
    pub fn read_buffer(&mut self) -> &mut BytesMut {
        self.read_buf.reserve(READ_CHUNK);
        &mut self.read_buf
    }

    /// A socket read appended `n` bytes to the read buffer; 0 means the terminal closed.
    pub fn received(&mut self, now: Now, n: usize) {
        if n == 0 {
            self.begin_drain(End::ClientClosed, now);
        } else {
            self.last_activity = now.at;
        }
    }

    /// Appends `data` as read from the socket (an empty slice is the terminal closing).
    pub fn receive(&mut self, now: Now, data: &[u8]) {
        self.read_buf.extend_from_slice(data);
        self.received(now, data.len());
    }

    /// Bytes to write to the socket; the driver advances past what it wrote.
    pub fn transmit(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// When [`Session::handle_timeout`] must be called next; `None` while it waits on answers
    /// only (requests in flight are never timed out here: their shards answer or fail-stop).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Open => match self.frame_started {
                Some(start) => Some(start + self.limits.frame_timeout),
                None if self.pending.is_empty() => Some(self.last_activity + self.limits.idle),
                None => None,
            },
            State::Draining { deadline, .. } => Some(*deadline),
            State::Closed(_) | State::Finished => None,
        }
    }

    /// The clock reached (or passed) the time [`Session::poll_timeout`] gave.
    pub fn handle_timeout(&mut self, now: Now) {
        match &self.state {
            State::Open => {
                if let Some(start) = self.frame_started {
                    if now.at >= start + self.limits.frame_timeout {
                        let message = "frame not completed in time";
                        self.close_with(RequestId(0), ErrorCode::FrameTimeout, message);
                        self.begin_drain(End::FrameTimeout, now);
                    }
                } else if self.pending.is_empty() && now.at >= self.last_activity + self.limits.idle
                {
                    self.finish(End::Idle);
                }
            }
            State::Draining { deadline, .. } if now.at >= *deadline => {
                // The answers still owed are given up on; the Error frame goes out now.
                self.finish_drain();
            }
            _ => {}
        }
    }

    /// The server closes this connection (shutdown, revocation, storage failure).
    pub fn close(&mut self, reason: CloseReason, now: Now) {
        match reason {
            CloseReason::StorageFailed => {
                if self.failed {
                    return;
                }
                self.failed = true;
                self.close_with(RequestId(0), ErrorCode::Internal, "server storage failed");
                match std::mem::replace(&mut self.state, State::Finished) {
                    // The outcomes still owed are unknown: no draining, the Error frame now.
                    State::Open => self.finish(End::ServerFailed),
                    State::Draining { end, .. } => self.finish(end),
                    other => self.state = other,
                }
            }
            CloseReason::Shutdown if self.is_open() => {
                self.close_with(RequestId(0), ErrorCode::ShuttingDown, "server shutting down");
                self.begin_drain(End::Shutdown, now);
            }
            CloseReason::Revoked if self.is_open() => {
                let message = "terminal certificate revoked";
                self.close_with(RequestId(0), ErrorCode::NotPermitted, message);
                self.begin_drain(End::Revoked, now);
            }
            CloseReason::Shutdown | CloseReason::Revoked => {}
        }
    }

    /// The end of the connection, once: everything the terminal is to get is in the transmit
    /// buffer, and the driver then writes it and sends close_notify.
    pub fn poll_end(&mut self) -> Option<End> {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Closed(end) => Some(end),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// The next piece of work for a shard. Decodes buffered frames as needed (at most up to the
    /// in-flight limit), so call it until `None` after every event: a frame is decoded only
    /// after the work of the frames before it was routed, as each request's answer (Busy, say)
    /// may free its request id and its in-flight slot.
    pub fn poll_submission(&mut self, now: Now) -> Option<Submission> {
        loop {
            if let Some(submission) = self.submissions.pop_front() {
                return Some(submission);
            }
            if !self.wants_read() {
                self.frame_started = None;
                return None;
            }
            match decode_frame(&mut self.read_buf) {
                Ok(Some(frame)) => {
                    self.frame_started = None;
                    let request_id = frame.request_id;
                    // A request id in flight is refused before its body is looked at, so an
                    // error frame with that id can only mean this frame (PROTOCOL.md 5.2): a
                    // body error would otherwise carry the id of the request still running.
                    if frame.message_type.is_request() && self.pending.contains_key(&request_id) {
                        self.duplicate(request_id);
                        continue;
                    }
                    match frame_to_request(&frame) {
                        Ok(request) => self.dispatch(request_id, request, now),
                        Err(e) => self.protocol_error(&e, Some(request_id), now),
                    }
                }
                Ok(None) => {
                    // The frame timer runs only while the session reads and holds part of a
                    // frame. At the in-flight limit it does not read (back-pressure): waiting
                    // bytes are then the server's doing, not a slow client's.
                    // postmortem: bytes waiting behind the in-flight limit used to start the
                    // timer, so a pipelining terminal was cut with FrameTimeout when its
                    // answers took longer than the frame timeout (found by adversarial.rs).
                    if self.read_buf.is_empty() {
                        self.frame_started = None;
                    } else {
                        self.frame_started.get_or_insert(now.at);
                    }
                    return None;
                }
                Err(e) => self.protocol_error(&e, e.request_id(), now),
            }
        }
    }

    /// A shard's queue did not take `submission` (`Busy` when full, `Unavailable` when the shard
    /// stopped): its request, or its part of one, is declined with `status`.
    pub fn refused(&mut self, now: Now, submission: Submission, status: Status) {
        let request_id = submission.request_id;
        let Some(flight) = self.pending.get_mut(&request_id) else {
            tracing::error!(request_id = request_id.0, "refusal for a request not in flight");
            return;
        };
        match (&mut flight.gather, submission.work) {
            (Gather::Single, Work::Request(request)) => {
                let (started, message_type) = (flight.started, flight.message_type);
                self.pending.remove(&request_id);
                let answer = Answer::plain(decline(&request, status));
                self.answer(request_id, message_type, started, &answer, now);
                return;
            }
            (Gather::Offline { results, parts_left }, Work::Offline(part)) => {
                for (i, record) in part {
                    if let Some(slot) = results.get_mut(usize::from(i)) {
                        *slot = Some(decline_record(status, &record));
                    }
                }
                *parts_left -= 1;
            }
            (Gather::Numbered { results, parts_left, .. }, Work::Numbered(part)) => {
                for (i, numbered, _) in part {
                    if let Some(slot) = results.get_mut(usize::from(i)) {
                        let result = decline_record(status, &numbered.record);
                        *slot =
                            Some(NumberedResult { terminal_seq: numbered.terminal_seq, result });
                    }
                }
                *parts_left -= 1;
            }
            (Gather::SeqLookup { refused, parts_left, .. }, Work::SeqLookup(_)) => {
                *refused = Some(status);
                *parts_left -= 1;
            }
            (Gather::Hotlist { more, parts_left, .. }, Work::Hotlist { .. }) => {
                // That shard's cursor stays where it was, and `more` says to sync again.
                *more = true;
                *parts_left -= 1;
            }
            _ => tracing::error!(request_id = request_id.0, "refusal of the wrong kind"),
        }
        self.maybe_finish(request_id, now);
    }

    /// A shard's answer to work this session submitted (sent after its journal sync).
    pub fn reply(&mut self, now: Now, reply: Reply) {
        self.last_activity = now.at;
        let request_id = reply.request_id;
        let Some(InFlight { started, message_type, gather }) = self.pending.get_mut(&request_id)
        else {
            tracing::error!(request_id = request_id.0, "reply for a request not in flight");
            return;
        };
        match (gather, reply.output) {
            (Gather::Single, Output::Response(response)) => {
                let (started, message_type) = (*started, *message_type);
                self.pending.remove(&request_id);
                self.answer(request_id, message_type, started, &response, now);
                return;
            }
            (Gather::Offline { results, parts_left }, Output::Offline(part)) => {
                for (i, result) in part {
                    if let Some(slot) = results.get_mut(usize::from(i)) {
                        *slot = Some(result);
                    }
                }
                *parts_left -= 1;
            }
            (
                Gather::Numbered { results, highest, parts_left, .. },
                Output::Numbered { results: part, highest: part_highest },
            ) => {
                for (i, result) in part {
                    if let Some(slot) = results.get_mut(usize::from(i)) {
                        *slot = Some(result);
                    }
                }
                *highest = (*highest).max(part_highest);
                *parts_left -= 1;
            }
            (
                Gather::SeqLookup { records, held_by, highest, parts_left, refused, .. },
                Output::SeqLookup { held, highest: part_highest, complete },
            ) => {
                if !complete {
                    *refused = Some(Status::Unavailable);
                }
                for seq in held {
                    // Seqs are strictly increasing within a batch (the decoder checks).
                    if let Ok(i) = records.binary_search_by_key(&seq, |r| r.terminal_seq) {
                        held_by[i] |= 1u64 << (reply.shard % 64);
                    }
                }
                *highest = (*highest).max(part_highest);
                *parts_left -= 1;
            }
            (
                Gather::Hotlist { cursor, entries, more, parts_left },
                Output::Hotlist { version, entries: part, more: part_more },
            ) => {
                if let Some(slot) = cursor.get_mut(usize::from(reply.shard)) {
                    *slot = version;
                }
                entries.extend(part);
                *more |= part_more;
                *parts_left -= 1;
            }
            _ => tracing::error!(request_id = request_id.0, "reply of the wrong kind"),
        }
        self.maybe_finish(request_id, now);
    }

    // -----------------------------------------------------------------------------------------
    // Closing.

    /// Stops reading; the answers owed are awaited (bounded by the drain timeout), then `end`.
    fn begin_drain(&mut self, end: End, now: Now) {
        if !self.is_open() {
            return;
        }
        self.frame_started = None;
        self.state = State::Draining { end, deadline: now.at + self.limits.drain };
        self.maybe_end_drain();
    }

    fn maybe_end_drain(&mut self) {
        if matches!(self.state, State::Draining { .. }) && self.pending.is_empty() {
            self.finish_drain();
        }
    }

    fn finish_drain(&mut self) {
        if let State::Draining { end, .. } = std::mem::replace(&mut self.state, State::Finished) {
            self.finish(end);
        }
    }

    /// The last bytes: the Error frame, if the end has one, after every answer already written.
    fn finish(&mut self, end: End) {
        self.submissions.clear();
        if let Some((request_id, code, message)) = self.closing.take() {
            self.error_frame(request_id, code, &message);
        }
        self.state = State::Closed(end);
    }

    /// Sets the Error frame that ends the connection (the first reason wins, except that a
    /// storage failure overrides: the terminal must learn that outcomes are unknown).
    fn close_with(&mut self, request_id: RequestId, code: ErrorCode, message: &str) {
        if self.closing.is_none() || code == ErrorCode::Internal {
            self.closing = Some((request_id, code, message.to_owned()));
        }
    }

    // -----------------------------------------------------------------------------------------
    // Answers.

    /// Answers a request and records its metrics.
    fn answer(
        &mut self,
        request_id: RequestId,
        message_type: MessageType,
        started: Instant,
        answer: &Answer,
        now: Now,
    ) {
        let latency_us = now.at.saturating_duration_since(started).as_micros() as u64;
        METRICS.request(message_type, answer.status(), latency_us);
        self.respond(request_id, answer);
        self.maybe_end_drain();
    }

    fn respond(&mut self, request_id: RequestId, answer: &Answer) {
        if let Err(e) = answer.encode(request_id, &mut self.write_buf) {
            // Our own answers are built within the limits; this is a bug, not peer input.
            tracing::error!(error = %e, "could not encode a response");
            let _ = Response::error(ErrorCode::Internal, "response too large")
                .encode(request_id, &mut self.write_buf);
        }
    }

    fn duplicate(&mut self, request_id: RequestId) {
        METRICS.protocol_error(ErrorCode::DuplicateRequestId as u16);
        let message = format!("request id {} is already in flight", request_id.0);
        self.error_frame(request_id, ErrorCode::DuplicateRequestId, &message);
    }

    fn error_frame(&mut self, request_id: RequestId, code: ErrorCode, message: &str) {
        self.respond(request_id, &Answer::plain(Response::error(code, message)));
    }

    /// Answers a malformed frame; a code that closes the connection starts the drain.
    fn protocol_error(&mut self, error: &DecodeError, request_id: Option<RequestId>, now: Now) {
        let code = error.code();
        METRICS.protocol_error(code as u16);
        tracing::info!(terminal = %self.terminal, error = %error, "malformed frame");
        let request_id = request_id.unwrap_or(RequestId(0));
        if code.closes_connection() {
            // Sent after the answers to the requests accepted before this frame.
            self.close_with(request_id, code, &error.to_string());
            self.begin_drain(End::Protocol(code), now);
            return;
        }
        self.error_frame(request_id, code, &error.to_string());
    }

    // -----------------------------------------------------------------------------------------
    // Requests.

    fn dispatch(&mut self, request_id: RequestId, request: Request, now: Now) {
        let started = now.at;
        let message_type = request.message_type();
        if !permitted(self.role, &request) {
            tracing::warn!(terminal = %self.terminal, role = %self.role, request = ?message_type, "operation not permitted for the role");
            let answer = Answer::plain(decline(&request, Status::NotPermitted));
            self.answer(request_id, message_type, started, &answer, now);
            return;
        }
        let shard_count = self.shard_count();
        match request {
            Request::Hello { .. } => {
                let hello = self.server_info(now.unix_ms);
                let answer = Answer::plain(Response::ServerInfo(hello));
                self.answer(request_id, message_type, started, &answer, now);
            }
            Request::OfflineBatch { records } => {
                let mut parts: Vec<Vec<(u16, citycard_protocol::OfflineRecord)>> =
                    vec![Vec::new(); shard_count];
                for (i, record) in records.iter().enumerate() {
                    let shard =
                        usize::from(crate::engine::shard_of(record.card_id, shard_count as u16));
                    parts[shard].push((i as u16, *record));
                }
                let results = vec![None; records.len()];
                let mut parts_left = 0;
                for (shard, part) in parts.into_iter().enumerate() {
                    if !part.is_empty() {
                        parts_left += 1;
                        let work = Work::Offline(part);
                        self.submissions.push_back(Submission { shard, request_id, work });
                    }
                }
                let gather = Gather::Offline { results, parts_left };
                self.pending.insert(request_id, InFlight { started, message_type, gather });
                self.maybe_finish(request_id, now);
            }
            Request::NumberedOfflineBatch { records } => {
                let Some(guard) =
                    self.workers.first().and_then(|w| UploadGuard::take(&self.terminal, w))
                else {
                    // Another numbered batch of this terminal is in flight (PROTOCOL.md 6.13).
                    let answer = Answer::plain(decline(
                        &Request::NumberedOfflineBatch { records },
                        Status::Busy,
                    ));
                    self.answer(request_id, message_type, started, &answer, now);
                    return;
                };
                let held_by = vec![0; records.len()];
                let seqs: Vec<u64> = records.iter().map(|r| r.terminal_seq).collect();
                for shard in 0..shard_count {
                    let work = Work::SeqLookup(seqs.clone());
                    self.submissions.push_back(Submission { shard, request_id, work });
                }
                let gather = Gather::SeqLookup {
                    records,
                    held_by,
                    highest: 0,
                    parts_left: shard_count,
                    refused: None,
                    guard,
                };
                self.pending.insert(request_id, InFlight { started, message_type, gather });
            }
            Request::HotlistSync { cursor, max_entries } => {
                if !cursor.is_empty() && cursor.len() != shard_count {
                    self.error_frame(
                        request_id,
                        ErrorCode::BadValue,
                        "cursor does not match the server's shard count",
                    );
                    return;
                }
                let max = match usize::from(max_entries) {
                    0 => MAX_HOTLIST_ENTRIES,
                    n => n.min(MAX_HOTLIST_ENTRIES),
                };
                let per_shard = (max / shard_count).max(1);
                let since: Vec<u64> = if cursor.is_empty() { vec![0; shard_count] } else { cursor };
                for (shard, from) in since.iter().enumerate() {
                    let work = Work::Hotlist { since: *from, max: per_shard };
                    self.submissions.push_back(Submission { shard, request_id, work });
                }
                let gather = Gather::Hotlist {
                    cursor: since,
                    entries: Vec::new(),
                    more: false,
                    parts_left: shard_count,
                };
                self.pending.insert(request_id, InFlight { started, message_type, gather });
                self.maybe_finish(request_id, now);
            }
            request => {
                let shard = route(&request, &self.terminal, shard_count);
                let work = Work::Request(request);
                self.submissions.push_back(Submission { shard, request_id, work });
                let gather = Gather::Single;
                self.pending.insert(request_id, InFlight { started, message_type, gather });
            }
        }
    }

    fn server_info(&self, unix_ms: u64) -> ServerInfo {
        ServerInfo {
            protocol_version: citycard_protocol::frame::VERSION,
            role: role_byte(self.role),
            server_time_ms: unix_ms,
            hotlist_version: self
                .workers
                .iter()
                .map(|w| w.hotlist_version.load(Ordering::Acquire))
                .sum(),
            shard_count: self.shard_count() as u16,
            max_in_flight: self.limits.max_in_flight as u16,
        }
    }

    fn maybe_finish(&mut self, request_id: RequestId, now: Now) {
        let done = match self.pending.get(&request_id).map(|f| &f.gather) {
            Some(Gather::Offline { parts_left, .. })
            | Some(Gather::Hotlist { parts_left, .. })
            | Some(Gather::SeqLookup { parts_left, .. })
            | Some(Gather::Numbered { parts_left, .. }) => *parts_left == 0,
            _ => false,
        };
        if !done {
            return;
        }
        let Some(InFlight { started, message_type, gather }) = self.pending.remove(&request_id)
        else {
            return;
        };
        let response = match gather {
            Gather::Offline { results, .. } => {
                // Every position was filled by a shard or by a refusal above.
                Response::OfflineBatch(results.into_iter().flatten().collect())
            }
            Gather::Hotlist { cursor, entries, more, .. } => {
                Response::HotlistSync(HotlistChanges { cursor, more, entries })
            }
            Gather::SeqLookup { records, held_by, highest, refused, guard, .. } => {
                if let Some(status) = refused {
                    // Without every shard's word no seq can be known free: nothing is decided.
                    decline(&Request::NumberedOfflineBatch { records }, status)
                } else if records.is_empty() {
                    let results = Vec::new();
                    Response::NumberedOfflineBatch(NumberedResults {
                        highest_seq: highest,
                        results,
                    })
                } else {
                    self.numbered_phase_two(
                        request_id,
                        started,
                        message_type,
                        records,
                        &held_by,
                        highest,
                        guard,
                    );
                    return;
                }
            }
            Gather::Numbered { results, highest, .. } => {
                // Every position was filled by a shard or by a refusal above.
                let results = results.into_iter().flatten().collect();
                Response::NumberedOfflineBatch(NumberedResults { highest_seq: highest, results })
            }
            Gather::Single => return,
        };
        self.answer(request_id, message_type, started, &Answer::plain(response), now);
    }
}

impl Session {
    /// The second phase of a numbered batch: each record goes to its card's shard, told whether
    /// another shard holds its seq already.
    #[allow(clippy::too_many_arguments)]
    fn numbered_phase_two(
        &mut self,
        request_id: RequestId,
        started: Instant,
        message_type: MessageType,
        records: Vec<NumberedRecord>,
        held_by: &[u64],
        highest: u64,
        guard: UploadGuard,
    ) {
        let shard_count = self.shard_count();
        let mut parts: Vec<Vec<(u16, NumberedRecord, bool)>> = vec![Vec::new(); shard_count];
        for (i, record) in records.iter().enumerate() {
            let shard = crate::engine::shard_of(record.record.card_id, shard_count as u16);
            let elsewhere = held_by[i] & !(1u64 << (shard % 64)) != 0;
            parts[usize::from(shard)].push((i as u16, *record, elsewhere));
        }
        let mut parts_left = 0;
        for (shard, part) in parts.into_iter().enumerate() {
            if !part.is_empty() {
                parts_left += 1;
                let work = Work::Numbered(part);
                self.submissions.push_back(Submission { shard, request_id, work });
            }
        }
        let results = vec![None; records.len()];
        let gather = Gather::Numbered { results, highest, parts_left, _guard: guard };
        self.pending.insert(request_id, InFlight { started, message_type, gather });
    }
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::Reader => 1,
        Role::Kiosk => 2,
        Role::Counter => 3,
        // Refused before a connection is built (serve_connection); 0 is no role on the wire.
        Role::Monitor => 0,
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
