//! One terminal connection: reads frames, checks the role, routes work to shards, reassembles
//! split requests, and writes answers in whatever order they complete.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use citycard_protocol::frame::decode_frame;
use citycard_protocol::{
    frame_to_request, Amount, CardResult, DecodeError, ErrorCode, HotlistChanges, Mac, MessageType,
    Request, RequestId, Response, ServerInfo, Status, MAX_HOTLIST_ENTRIES,
};
use crossbeam::channel::TrySendError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::worker::{Job, Reply, Work};
use super::{declined, permitted, route, Shared};
use crate::engine::Output;
use crate::identity::Role;
use crate::metrics::METRICS;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

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
        entries: Vec<citycard_protocol::HotlistEntry>,
        more: bool,
        parts_left: usize,
    },
}

pub struct Connection<S> {
    stream: S,
    terminal: Arc<str>,
    role: Role,
    shared: Arc<Shared>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    pending: HashMap<RequestId, InFlight>,
    reply_tx: mpsc::UnboundedSender<Reply>,
    reply_rx: mpsc::UnboundedReceiver<Reply>,
    /// The Error frame that ends the connection, sent after the answers still owed for the
    /// requests accepted before it (PROTOCOL.md 5.1: every accepted request gets its answer).
    closing: Option<(RequestId, ErrorCode, String)>,
    /// Cancelled when this terminal's certificate was revoked (a CRL reload): the connection
    /// answers what it accepted, then closes. Never cancelled unless [`Self::closed_by`] set it.
    close: tokio_util::sync::CancellationToken,
}

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

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, terminal: Arc<str>, role: Role, shared: Arc<Shared>) -> Self {
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        Connection {
            stream,
            terminal,
            role,
            shared,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(READ_CHUNK),
            pending: HashMap::new(),
            reply_tx,
            reply_rx,
            closing: None,
            close: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Closes the connection (after draining) when `token` is cancelled.
    pub fn closed_by(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.close = token;
        self
    }

    pub async fn run(mut self) -> End {
        let end = self.serve().await;
        // Requests accepted before the end were (or are being) executed: answer them first.
        // Only a storage failure leaves their outcome unknown (Error Internal), and a broken
        // or stuck socket cannot carry answers at all.
        if matches!(
            end,
            End::Shutdown | End::Revoked | End::Protocol(_) | End::FrameTimeout | End::ClientClosed
        ) {
            self.drain().await;
        }
        // postmortem: after a write timeout the unwritten rest of the buffer used to be written
        // again from its start, so a terminal that resumed reading got answers twice and a
        // frame cut in half, then a clean close_notify (found by a client written from
        // PROTOCOL.md alone). A stuck or broken socket now gets nothing more: the connection is
        // dropped without close_notify, so the terminal sees that it was cut off.
        if matches!(end, End::WriteTimeout | End::Io(_)) {
            return end;
        }
        if let Some((request_id, code, message)) = self.closing.take() {
            self.error_frame(request_id, code, &message);
        }
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        end
    }

    async fn serve(&mut self) -> End {
        let config = &self.shared.config;
        let idle = Duration::from_millis(config.idle_timeout_ms);
        let frame_timeout = Duration::from_millis(config.frame_timeout_ms);
        let max_in_flight = config.max_in_flight;
        let mut frame_started: Option<Instant> = None;
        let mut last_activity = Instant::now();
        loop {
            // Answer every complete frame already buffered, as long as the in-flight limit allows.
            while self.pending.len() < max_in_flight {
                match decode_frame(&mut self.read_buf) {
                    Ok(Some(frame)) => {
                        frame_started = None;
                        let request_id = frame.request_id;
                        // A request id in flight is refused before its body is looked at, so
                        // an error frame with that id can only mean this frame (PROTOCOL.md
                        // 5.2): a body error would otherwise carry the id of the request still
                        // running.
                        if frame.message_type.is_request() && self.pending.contains_key(&request_id)
                        {
                            self.duplicate(request_id);
                            continue;
                        }
                        match frame_to_request(&frame) {
                            Ok(request) => self.dispatch(request_id, request),
                            Err(e) => {
                                if let Some(end) = self.protocol_error(&e, Some(request_id)) {
                                    return end;
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(end) = self.protocol_error(&e, e.request_id()) {
                            return end;
                        }
                    }
                }
            }
            // The frame timer runs only while the server is reading and holds part of a frame.
            // At the in-flight limit it does not read (back-pressure): waiting bytes are then
            // the server's doing, not a slow client's.
            // postmortem: bytes waiting behind the in-flight limit used to start the timer, so
            // a pipelining terminal was cut with FrameTimeout when its answers took longer
            // than the frame timeout (found by adversarial.rs).
            if self.pending.len() < max_in_flight && !self.read_buf.is_empty() {
                frame_started.get_or_insert_with(Instant::now);
            } else {
                frame_started = None;
            }
            if !self.write_buf.is_empty() {
                if let Err(end) = self.flush().await {
                    return end;
                }
            }
            let can_read = self.pending.len() < max_in_flight;
            let deadline = match frame_started {
                Some(start) => start + frame_timeout,
                None if self.pending.is_empty() => last_activity + idle,
                None => Instant::now() + idle,
            };
            self.read_buf.reserve(READ_CHUNK);
            tokio::select! {
                read = self.stream.read_buf(&mut self.read_buf), if can_read => {
                    match read {
                        Ok(0) => return End::ClientClosed,
                        Ok(_) => last_activity = Instant::now(),
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return End::ClientClosed,
                        Err(e) => return End::Io(e),
                    }
                }
                reply = self.reply_rx.recv() => {
                    // The connection holds a sender itself, so recv never yields None.
                    if let Some(reply) = reply {
                        self.accept_reply(reply);
                        while let Ok(more) = self.reply_rx.try_recv() {
                            self.accept_reply(more);
                        }
                        last_activity = Instant::now();
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if frame_started.is_some() {
                        self.close_with(RequestId(0), ErrorCode::FrameTimeout, "frame not completed in time");
                        return End::FrameTimeout;
                    }
                    if self.pending.is_empty() {
                        return End::Idle;
                    }
                }
                _ = self.shared.shutdown.cancelled() => {
                    self.close_with(RequestId(0), ErrorCode::ShuttingDown, "server shutting down");
                    return End::Shutdown;
                }
                _ = self.close.cancelled() => {
                    self.close_with(RequestId(0), ErrorCode::NotPermitted, "terminal certificate revoked");
                    return End::Revoked;
                }
                _ = self.shared.failed.cancelled() => {
                    self.close_with(RequestId(0), ErrorCode::Internal, "server storage failed");
                    return End::ServerFailed;
                }
            }
        }
    }

    /// Before closing: wait (bounded by the drain timeout) for the answers already owed. When
    /// the storage fails meanwhile their outcome is unknown, and the terminal is told so.
    async fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(self.shared.config.drain_timeout_ms);
        while !self.pending.is_empty() {
            tokio::select! {
                reply = self.reply_rx.recv() => match reply {
                    Some(reply) => self.accept_reply(reply),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.shared.failed.cancelled() => {
                    self.close_with(RequestId(0), ErrorCode::Internal, "server storage failed");
                    return;
                }
            }
        }
    }

    /// Sets the Error frame that ends the connection (the first reason wins, except that a
    /// storage failure overrides: the terminal must learn that outcomes are unknown).
    fn close_with(&mut self, request_id: RequestId, code: ErrorCode, message: &str) {
        if self.closing.is_none() || code == ErrorCode::Internal {
            self.closing = Some((request_id, code, message.to_owned()));
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.shared.config.write_timeout_ms);
        // Written bytes leave the buffer as they go, so a write that times out halfway never
        // sends its first part twice.
        let write = async {
            while !self.write_buf.is_empty() {
                let n = self.stream.write(&self.write_buf).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
                }
                self.write_buf.advance(n);
            }
            self.stream.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Io(e)),
            Err(_) => Err(End::WriteTimeout),
        }
    }

    /// Answers a request and records its metrics.
    fn finish(
        &mut self,
        request_id: RequestId,
        message_type: MessageType,
        started: Instant,
        response: &Response,
    ) {
        let latency_us = started.elapsed().as_micros() as u64;
        METRICS.request(message_type, response.status(), latency_us);
        self.respond(request_id, response);
    }

    fn respond(&mut self, request_id: RequestId, response: &Response) {
        if let Err(e) = response.encode(request_id, &mut self.write_buf) {
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
        self.respond(request_id, &Response::error(code, message));
    }

    /// Answers a malformed frame; returns `Some` when the connection must close.
    fn protocol_error(
        &mut self,
        error: &DecodeError,
        request_id: Option<RequestId>,
    ) -> Option<End> {
        let code = error.code();
        METRICS.protocol_error(code as u16);
        tracing::info!(terminal = %self.terminal, error = %error, "malformed frame");
        let request_id = request_id.unwrap_or(RequestId(0));
        if code.closes_connection() {
            // Sent after the answers to the requests accepted before this frame.
            self.close_with(request_id, code, &error.to_string());
            return Some(End::Protocol(code));
        }
        self.error_frame(request_id, code, &error.to_string());
        None
    }

    fn dispatch(&mut self, request_id: RequestId, request: Request) {
        let started = Instant::now();
        let message_type = request.message_type();
        if self.pending.contains_key(&request_id) {
            self.duplicate(request_id);
            return;
        }
        if !permitted(self.role, &request) {
            tracing::warn!(terminal = %self.terminal, role = %self.role, request = ?request.message_type(), "operation not permitted for the role");
            self.finish(
                request_id,
                message_type,
                started,
                &declined(&request, Status::NotPermitted),
            );
            return;
        }
        let shard_count = self.shared.shards.len();
        match request {
            Request::Hello { .. } => {
                let info = ServerInfo {
                    protocol_version: citycard_protocol::frame::VERSION,
                    role: role_byte(self.role),
                    server_time_ms: crate::now_ms(),
                    hotlist_version: self
                        .shared
                        .workers
                        .iter()
                        .map(|w| w.hotlist_version.load(Ordering::Acquire))
                        .sum(),
                    shard_count: shard_count as u16,
                    max_in_flight: self.shared.config.max_in_flight as u16,
                };
                self.finish(request_id, message_type, started, &Response::ServerInfo(info));
            }
            Request::OfflineBatch { records } => {
                let mut parts: Vec<Vec<(u16, citycard_protocol::OfflineRecord)>> =
                    vec![Vec::new(); shard_count];
                for (i, record) in records.iter().enumerate() {
                    let shard =
                        usize::from(crate::engine::shard_of(record.card_id, shard_count as u16));
                    parts[shard].push((i as u16, *record));
                }
                let mut results: Vec<Option<CardResult>> = vec![None; records.len()];
                let mut parts_left = 0;
                for (shard, part) in parts.into_iter().enumerate() {
                    if part.is_empty() {
                        continue;
                    }
                    let positions: Vec<u16> = part.iter().map(|(i, _)| *i).collect();
                    match self.submit(shard, request_id, Work::Offline(part)) {
                        Ok(()) => parts_left += 1,
                        Err(status) => {
                            for i in positions {
                                let r = &records[usize::from(i)];
                                results[usize::from(i)] = Some(CardResult {
                                    status,
                                    card_id: r.card_id,
                                    atc: r.atc,
                                    balance: Amount(0),
                                    journal_seq: 0,
                                    mac: Mac::default(),
                                });
                            }
                        }
                    }
                }
                let gather = Gather::Offline { results, parts_left };
                self.pending.insert(request_id, InFlight { started, message_type, gather });
                self.maybe_finish(request_id);
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
                let mut parts_left = 0;
                for (shard, from) in since.iter().enumerate() {
                    // On Busy that shard's cursor stays where it was and `more` is set.
                    if self
                        .submit(shard, request_id, Work::Hotlist { since: *from, max: per_shard })
                        .is_ok()
                    {
                        parts_left += 1;
                    }
                }
                let more = parts_left < shard_count;
                let gather =
                    Gather::Hotlist { cursor: since, entries: Vec::new(), more, parts_left };
                self.pending.insert(request_id, InFlight { started, message_type, gather });
                self.maybe_finish(request_id);
            }
            request => {
                let shard = route(&request, &self.terminal, shard_count);
                let mut refused = declined(&request, Status::Busy);
                match self.submit(shard, request_id, Work::Request(request)) {
                    Ok(()) => {
                        let gather = Gather::Single;
                        self.pending.insert(request_id, InFlight { started, message_type, gather });
                    }
                    Err(status) => {
                        refused.set_status(status);
                        self.finish(request_id, message_type, started, &refused);
                    }
                }
            }
        }
    }

    /// Queues work on a shard; a full queue is `Busy`, a stopped shard `Unavailable`.
    fn submit(&self, shard: usize, request_id: RequestId, work: Work) -> Result<(), Status> {
        let job =
            Job { terminal: self.terminal.clone(), request_id, work, reply: self.reply_tx.clone() };
        match self.shared.shards[shard].try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Status::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Status::Unavailable),
        }
    }

    fn accept_reply(&mut self, reply: Reply) {
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
                self.finish(request_id, message_type, started, &response);
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
        self.maybe_finish(request_id);
    }

    fn maybe_finish(&mut self, request_id: RequestId) {
        let done = match self.pending.get(&request_id).map(|f| &f.gather) {
            Some(Gather::Offline { parts_left, .. }) | Some(Gather::Hotlist { parts_left, .. }) => {
                *parts_left == 0
            }
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
                // Every position was filled by a shard or by a Busy decline above.
                Response::OfflineBatch(results.into_iter().flatten().collect())
            }
            Gather::Hotlist { cursor, entries, more, .. } => {
                Response::HotlistSync(HotlistChanges { cursor, more, entries })
            }
            Gather::Single => return,
        };
        self.finish(request_id, message_type, started, &response);
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
