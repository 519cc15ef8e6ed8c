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
    /// Cancelled when this terminal's certificate was revoked (a CRL reload): the connection
    /// answers what it accepted, then closes. Never cancelled unless [`Self::closed_by`] set it.
    close: CancellationToken,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, terminal: Arc<str>, role: Role, shared: Arc<Shared>) -> Self {
        let (reply_tx, reply_rx) = mpsc::unbounded_channel();
        let limits = SessionLimits::from_config(&shared.config);
        let session = Session::new(terminal, role, limits, shared.workers.clone(), Now::real());
        Connection { stream, session, shared, reply_tx, reply_rx, close: CancellationToken::new() }
    }

    /// Closes the connection (after draining) when `token` is cancelled.
    pub fn closed_by(mut self, token: CancellationToken) -> Self {
        self.close = token;
        self
    }

    pub async fn run(mut self) -> End {
        let end = loop {
            self.route();
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
            let deadline = self.session.poll_timeout().map(tokio::time::Instant::from_std);
            let can_read = self.session.wants_read();
            let open = self.session.is_open();
            let watching_failure = !self.session.has_failed();
            tokio::select! {
                read = self.stream.read_buf(self.session.read_buffer()), if can_read => {
                    match read {
                        Ok(n) => self.session.received(Now::real(), n),
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            self.session.received(Now::real(), 0)
                        }
                        Err(e) => return End::Io(e),
                    }
                }
                reply = self.reply_rx.recv() => {
                    // The connection holds a sender itself, so recv never yields None.
                    if let Some(reply) = reply {
                        let now = Now::real();
                        self.session.reply(now, reply);
                        while let Ok(more) = self.reply_rx.try_recv() {
                            self.session.reply(now, more);
                        }
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.session.handle_timeout(Now::real());
                }
                _ = self.shared.shutdown.cancelled(), if open => {
                    self.session.close(CloseReason::Shutdown, Now::real());
                }
                _ = self.close.cancelled(), if open => {
                    self.session.close(CloseReason::Revoked, Now::real());
                }
                _ = self.shared.failed.cancelled(), if watching_failure => {
                    self.session.close(CloseReason::StorageFailed, Now::real());
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
    fn route(&mut self) {
        let now = Now::real();
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

/// Sleeps until `deadline`; never resolves without one (its select branch is disabled then).
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
