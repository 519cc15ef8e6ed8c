//! The tokio driver of one terminal connection: the socket, the shard queues, the reply channel,
//! the server's close signals and the real clock, around the sans-IO [`Session`] that decides
//! everything the terminal sees.

use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use crossbeam::channel::TrySendError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::session::{CloseReason, Now, Session, SessionLimits, Submission};
use super::worker::{Job, Reply};
use super::Shared;
use crate::identity::Role;

pub use super::session::End;

pub struct Connection<S> {
    stream: S,
    session: Session,
    shared: Arc<Shared>,
    reply_tx: mpsc::UnboundedSender<Reply>,
    reply_rx: mpsc::UnboundedReceiver<Reply>,
    /// Cancelled when the server stops or fails (a child of [`Shared::stop_signal`]) or, when
    /// [`Self::closed_by`] gave one, when this terminal's certificate was revoked (a CRL
    /// reload): the connection answers what it accepted, then closes.
    close: CancellationToken,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, terminal: Arc<str>, role: Role, shared: Arc<Shared>) -> Self {
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let limits = SessionLimits::from_config(&shared.config);
        let session = Session::new(terminal, role, limits, shared.workers.clone(), Now::real());
        let close = shared.stop_signal.child_token();
        Connection { stream, session, shared, reply_tx, reply_rx, close }
    }

    /// Closes the connection (after draining) when `token` is cancelled. `token` must be a
    /// child of [`Shared::stop_signal`] (`shared.stop_signal.child_token()`), or the
    /// connection no longer hears of a shutdown or a storage failure while it is open.
    pub fn closed_by(mut self, token: CancellationToken) -> Self {
        self.close = token;
        self
    }

    pub async fn run(mut self) -> End {
        // The close signal and the timer live across loop turns: a `cancelled()` future made
        // anew each turn locks its token (twice) and its waiter list, and the shutdown token is
        // shared by every connection on every runtime thread; a `sleep` made anew each turn
        // takes the timer wheel's lock to register and again to deregister. Both were paid per
        // transaction (loadtest/profile.sh).
        let close = self.close.clone();
        let close = close.cancelled();
        tokio::pin!(close);
        let timer = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(timer);
        // The deadline the timer is set to, `None` once it fired (or before it was first set).
        let mut armed: Option<tokio::time::Instant> = None;
        // One clock reading per event: the routing after it happens at the same moment (no
        // await in between), so it takes that reading instead of its own (two clock reads were
        // about 500 instructions per transaction, loadtest/profile.sh callgrind).
        let mut now = Now::real();
        let end = loop {
            self.route(now);
            if let Some(end) = self.session.poll_end() {
                break end;
            }
            // postmortem: after a write timeout the unwritten rest of the buffer used to be
            // written again from its start, so a terminal that resumed reading got answers
            // twice and a frame cut in half, then a clean close_notify (found by a client
            // written from PROTOCOL.md alone). A stuck or broken socket now gets nothing more:
            // the connection is dropped without close_notify, so the terminal sees that it was
            // cut off.
            if let Err(end) = self.flush().await {
                return end;
            }
            // The timer is moved only to an earlier deadline. The idle deadline moves later
            // with every answer, and resetting for it would cost the timer lock per
            // transaction; a timer that fires early is harmless (the session checks the clock
            // against its own deadlines) and is set again to the deadline then due.
            let deadline = self.session.poll_timeout().map(tokio::time::Instant::from_std);
            if let Some(deadline) = deadline {
                if armed.is_none_or(|at| deadline < at) {
                    timer.as_mut().reset(deadline);
                    armed = Some(deadline);
                }
            }
            let timing = deadline.is_some();
            let can_read = self.session.wants_read();
            let open = self.session.is_open();
            // While open, a storage failure arrives through `close` (a child of the server's
            // stop signal); a draining connection watches the failure token itself.
            let watching_failure = !open && !self.session.has_failed();
            tokio::select! {
                read = self.stream.read_buf(self.session.read_buffer()), if can_read => {
                    now = Now::real();
                    match read {
                        Ok(n) => self.session.received(now, n),
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            self.session.received(now, 0)
                        }
                        Err(e) => return End::Io(e),
                    }
                }
                reply = self.reply_rx.recv() => {
                    // The connection holds a sender itself, so recv never yields None.
                    if let Some(reply) = reply {
                        now = Now::real();
                        self.session.reply(now, reply);
                        while let Ok(more) = self.reply_rx.try_recv() {
                            self.session.reply(now, more);
                        }
                    }
                }
                _ = &mut timer, if timing => {
                    armed = None;
                    now = Now::real();
                    self.session.handle_timeout(now);
                }
                _ = &mut close, if open => {
                    let reason = if self.shared.failed.is_cancelled() {
                        CloseReason::StorageFailed
                    } else if self.shared.shutdown.is_cancelled() {
                        CloseReason::Shutdown
                    } else {
                        CloseReason::Revoked
                    };
                    now = Now::real();
                    self.session.close(reason, now);
                }
                _ = self.shared.failed.cancelled(), if watching_failure => {
                    now = Now::real();
                    self.session.close(CloseReason::StorageFailed, now);
                }
            }
        };
        // The answers and the Error frame are in the buffer; then close_notify.
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        end
    }

    /// Hands the session's work to the shards' bounded queues; a full queue is `Busy`, a
    /// stopped shard `Unavailable`, and the session answers for it.
    fn route(&mut self, now: Now) {
        while let Some(Submission { shard, request_id, work }) = self.session.poll_submission(now) {
            let job = Job {
                terminal: self.session.terminal().clone(),
                request_id,
                work,
                reply: self.reply_tx.clone(),
            };
            let (job, status) = match self.shared.shards[shard].try_send(job) {
                Ok(()) => continue,
                Err(TrySendError::Full(job)) => (job, citycard_protocol::Status::Busy),
                Err(TrySendError::Disconnected(job)) => {
                    (job, citycard_protocol::Status::Unavailable)
                }
            };
            let submission = Submission { shard, request_id: job.request_id, work: job.work };
            self.session.refused(now, submission, status);
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.session.transmit().is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.shared.config.write_timeout_ms);
        let stream = &mut self.stream;
        let buffer = self.session.transmit();
        // Written bytes leave the buffer as they go, so a write that times out halfway never
        // sends its first part twice.
        let write = async {
            while !buffer.is_empty() {
                let n = stream.write(&buffer[..]).await?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
                }
                buffer.advance(n);
            }
            stream.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Io(e)),
            Err(_) => Err(End::WriteTimeout),
        }
    }
}
