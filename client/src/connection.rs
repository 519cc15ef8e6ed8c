//! One mutual-TLS connection: callers encode their requests into a shared outbox, a writer task
//! sends whatever the outbox holds in one write, and a reader task hands each answer to the
//! caller waiting for its request id.
//!
//! The outbox and the pending map are the shared state. Each sits behind a `std::sync::Mutex`
//! because every section is an append, a swap or a few map operations, and none `.await`s.
//! Callers that encode while a write is under way join the next write, so pipelined requests
//! leave in batches without a copy or an allocation per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use citycard_protocol::frame::decode_frame;
use citycard_protocol::{Frame, MessageType, Request, RequestId, Response};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::{Config, ALPN};
use crate::error::ClientError;
use crate::words::error_code_name;

/// Bytes read from the socket at a time: a few typical answers, well under the 64 KiB frame
/// limit (the buffer grows to a whole frame when one is larger).
const READ_CHUNK: usize = 16 * 1024;
/// A write that does not finish in this time means the server stopped reading: the
/// connection is given up (the server applies the same 10 s limit to its writes).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

type Waiter = oneshot::Sender<Result<Frame, ClientError>>;

struct Pending {
    waiters: HashMap<u32, Waiter>,
    next_id: u32,
    /// Set once the connection failed; later calls fail at once with this reason.
    dead: Option<String>,
}

fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // A panic while holding the lock can only come from a bug in a few map operations; the
    // map stays consistent, so go on with it.
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Fails every waiter with `reason` (or with the server's connection-level error).
fn fail_all(pending: &Mutex<Pending>, reason: String, error: Option<ClientError>) {
    let waiters: Vec<Waiter> = {
        let mut p = lock(pending);
        if p.dead.is_none() {
            p.dead = Some(reason.clone());
        }
        p.waiters.drain().map(|(_, w)| w).collect()
    };
    for waiter in waiters {
        let error = match &error {
            Some(ClientError::Server { code, name, message }) => {
                ClientError::Server { code: *code, name, message: message.clone() }
            }
            _ => ClientError::ConnectionLost(reason.clone()),
        };
        let _ = waiter.send(Err(error));
    }
}

/// Requests encoded and not yet handed to the socket. Its size is bounded by the client's
/// in-flight limit (a caller encodes only while holding one of its slots), so at most
/// `max_in_flight` frames of at most 13 KiB (the largest legitimate request) wait here.
struct Outbox {
    bytes: BytesMut,
    /// Set when the connection is dropped: the writer sends what is left, then close_notify.
    closing: bool,
}

/// What callers share with the writer task.
struct Writer {
    outbox: Mutex<Outbox>,
    /// Wakes the writer: notified by the caller that finds the outbox empty (later callers
    /// join the write that notification starts), and at close.
    wake: Notify,
}

fn lock_outbox(writer: &Writer) -> std::sync::MutexGuard<'_, Outbox> {
    // Appends and swaps cannot leave the buffer inconsistent, even after a panic elsewhere.
    writer.outbox.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct Connection {
    writer: Arc<Writer>,
    pending: Arc<Mutex<Pending>>,
    reader_task: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The writer task ends (and sends close_notify) once told; the reader would otherwise
        // wait for the server to close.
        lock_outbox(&self.writer).closing = true;
        self.writer.wake.notify_one();
        self.reader_task.abort();
    }
}

impl Connection {
    /// TCP connect and TLS handshake within `connect_timeout_ms`, ALPN checked.
    /// `late_answers` counts answers whose caller no longer waits.
    pub(crate) async fn open(
        config: &Config,
        late_answers: Arc<AtomicU64>,
    ) -> Result<Connection, ClientError> {
        let addr = config.server.clone();
        let name = ServerName::try_from(config.server_name.clone())
            .map_err(|e| ClientError::Config(format!("server_name: {e}")))?;
        let connector = TlsConnector::from(config.tls.clone());
        let handshake = async {
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
            tcp.set_nodelay(true)
                .map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
            connector
                .connect(name, tcp)
                .await
                .map_err(|source| ClientError::Connect { addr: addr.clone(), source })
        };
        let timeout_ms = config.connect_timeout_ms;
        let stream = tokio::time::timeout(Duration::from_millis(timeout_ms), handshake)
            .await
            .map_err(|_| ClientError::ConnectTimeout { addr: addr.clone(), timeout_ms })??;
        if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Err(ClientError::Alpn);
        }
        let (read, write) = tokio::io::split(stream);
        let pending =
            Arc::new(Mutex::new(Pending { waiters: HashMap::new(), next_id: 1, dead: None }));
        let writer = Arc::new(Writer {
            outbox: Mutex::new(Outbox {
                bytes: BytesMut::with_capacity(READ_CHUNK),
                closing: false,
            }),
            wake: Notify::new(),
        });
        tokio::spawn(write_loop(write, writer.clone(), pending.clone()));
        let reader_task = tokio::spawn(read_loop(read, pending.clone(), late_answers));
        Ok(Connection { writer, pending, reader_task })
    }

    /// False once the connection failed (the client then opens a new one).
    pub(crate) fn is_alive(&self) -> bool {
        lock(&self.pending).dead.is_none()
    }

    /// Sends `request` under a fresh request id and waits for its answer frame.
    pub(crate) async fn call(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Frame, ClientError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut p = lock(&self.pending);
            if let Some(reason) = &p.dead {
                return Err(ClientError::ConnectionLost(reason.clone()));
            }
            // Ids in flight are never reused (Error 11); 0 is left to connection-level errors.
            // The map holds at most max_in_flight entries, so this ends within 65 steps.
            let mut id = p.next_id;
            while id == 0 || p.waiters.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            p.next_id = id.wrapping_add(1);
            p.waiters.insert(id, tx);
            id
        };
        let forget = || {
            lock(&self.pending).waiters.remove(&id);
        };
        let encoded = {
            let mut outbox = lock_outbox(&self.writer);
            let first = outbox.bytes.is_empty();
            // On error `encode` writes nothing, so the outbox holds whole frames only.
            request.encode(RequestId(id), &mut outbox.bytes).map(|()| first)
        };
        match encoded {
            Ok(true) => self.writer.wake.notify_one(),
            Ok(false) => {}
            Err(e) => {
                forget();
                return Err(e.into());
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ClientError::ConnectionLost("reader stopped".into())),
            Err(_) => {
                forget();
                Err(ClientError::Timeout { timeout_ms: timeout.as_millis() as u64 })
            }
        }
    }
}

async fn write_loop(
    mut write: WriteHalf<TlsStream<TcpStream>>,
    writer: Arc<Writer>,
    pending: Arc<Mutex<Pending>>,
) {
    // Swapped with the outbox's buffer each round, so both keep their capacity.
    let mut batch = BytesMut::with_capacity(READ_CHUNK);
    loop {
        writer.wake.notified().await;
        let closing = {
            let mut outbox = lock_outbox(&writer);
            std::mem::swap(&mut outbox.bytes, &mut batch);
            outbox.closing
        };
        if !batch.is_empty() {
            let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                write.write_all(&batch).await?;
                write.flush().await
            })
            .await;
            batch.clear();
            let reason = match written {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("write failed: {e}")),
                Err(_) => Some(format!("write blocked for {} s", WRITE_TIMEOUT.as_secs())),
            };
            if let Some(reason) = reason {
                fail_all(&pending, reason, None);
                return;
            }
        }
        if closing {
            // The client dropped the connection: say goodbye properly (close_notify).
            let _ = tokio::time::timeout(WRITE_TIMEOUT, write.shutdown()).await;
            return;
        }
    }
}

async fn read_loop(
    mut read: ReadHalf<TlsStream<TcpStream>>,
    pending: Arc<Mutex<Pending>>,
    late_answers: Arc<AtomicU64>,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let reason = loop {
        match decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                if let Some(error) = dispatch(&pending, frame, &late_answers) {
                    let reason = error.to_string();
                    fail_all(&pending, reason, Some(error));
                    // The server closes after a connection-level error; stop reading now.
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break format!("server sent bad framing: {e}"),
        }
        buf.reserve(READ_CHUNK);
        match read.read_buf(&mut buf).await {
            Ok(0) => break "closed by the server".to_owned(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break "closed by the server".to_owned()
            }
            Err(e) => break format!("read failed: {e}"),
        }
    };
    fail_all(&pending, reason, None);
}

/// Hands a frame to its waiter. A connection-level Error frame (one whose request id is not in
/// flight, usually 0) is returned so the caller can fail everything still waiting with it.
fn dispatch(
    pending: &Mutex<Pending>,
    frame: Frame,
    late_answers: &AtomicU64,
) -> Option<ClientError> {
    let waiter = lock(pending).waiters.remove(&frame.request_id.0);
    match waiter {
        Some(waiter) => {
            let _ = waiter.send(Ok(frame));
            None
        }
        None if frame.message_type == MessageType::Error => {
            let (code, message) = match Response::decode_body(MessageType::Error, &frame.body) {
                Ok(Response::Error { code, message }) => (code, message),
                _ => (0, "undecodable error frame".to_owned()),
            };
            tracing::debug!(code, "connection-level error from the server");
            Some(ClientError::Server { code, name: error_code_name(code), message })
        }
        None => {
            // An answer to a request that timed out: its caller already retried.
            late_answers.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(request_id = frame.request_id.0, "answer nobody waits for");
            None
        }
    }
}
