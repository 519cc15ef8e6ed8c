//! One terminal's mutual-TLS connection to the server, with pipelined send and receive keyed by
//! request id.
//!
//! The TLS client configuration mirrors `citycard::tls::client_config` (rustls 0.23 with the ring
//! provider set explicitly, TLS 1.3 only, ALPN `citycard/1`, no resumption, no early data), so the
//! load tester does not depend on the server crate.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use citycard_protocol::frame::decode_frame;
use citycard_protocol::{
    DecodeError, ErrorCode, Frame, MessageType, Request, RequestId, Response, ServerInfo,
};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The single ALPN protocol spoken by citycard.
pub const ALPN: &[u8] = b"citycard/1";
/// The name the development server certificate is issued for.
pub const SERVER_NAME: &str = "localhost";
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A terminal identity: certificate file stem (= certificate CN = terminal id) and its config.
#[derive(Clone)]
pub struct Terminal {
    pub id: String,
    pub config: Arc<ClientConfig>,
}

/// Wall-clock milliseconds since the Unix epoch (the Hello's client time).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The name of an Error frame's code, or the number when it is not one we know.
pub fn code_name(code: u16) -> String {
    match ErrorCode::from_u16(code) {
        Some(c) => format!("{c:?}"),
        None => format!("code {code}"),
    }
}

/// Terminal ids (certificate file stems) in `keys/terminals` whose name starts with `prefix`,
/// in numeric order of their suffix.
pub fn terminals_with_prefix(keys: &Path, prefix: &str) -> anyhow::Result<Vec<String>> {
    let dir = keys.join("terminals");
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pem") {
            continue;
        }
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if stem.starts_with(prefix) && path.with_extension("key").is_file() {
            ids.push(stem.to_owned());
        }
    }
    ids.sort_by_key(|id| {
        let digits: String = id.chars().rev().take_while(char::is_ascii_digit).collect();
        let n: u64 = digits.chars().rev().collect::<String>().parse().unwrap_or(0);
        (n, id.clone())
    });
    Ok(ids)
}

/// Client config for terminal `terminal`: trusts `keys/ca.pem`, presents
/// `keys/terminals/<terminal>.pem` and `.key`.
pub fn client_config(keys: &Path, terminal: &str) -> anyhow::Result<Arc<ClientConfig>> {
    let ca = keys.join("ca.pem");
    let cert_path = keys.join("terminals").join(format!("{terminal}.pem"));
    let key_path = keys.join("terminals").join(format!("{terminal}.key"));
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&ca).with_context(|| format!("reading {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("parsing {}", ca.display()))?;
        roots.add(cert).with_context(|| format!("adding the CA from {}", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", ca.display());
    }
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .with_context(|| format!("client certificate of {terminal}"))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// Why a connection can no longer be used.
#[derive(Debug)]
pub enum ConnError {
    /// The server closed the connection.
    Closed,
    Io(std::io::Error),
    /// The byte stream was not valid framing; nothing after it can be trusted.
    Framing(DecodeError),
    /// A write did not complete in time.
    WriteTimeout,
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Closed => f.write_str("closed by the server"),
            ConnError::Io(e) => write!(f, "i/o error: {e}"),
            ConnError::Framing(e) => write!(f, "bad framing: {e}"),
            ConnError::WriteTimeout => f.write_str("write timed out"),
        }
    }
}

/// A frame read from the connection.
pub enum Incoming<T> {
    /// The answer to a request we sent: the frame, when the request was written, its tag.
    Answer(Frame, Instant, T),
    /// A frame whose request id is not in flight (connection-level Error frames carry id 0, or
    /// an answer arriving after its request timed out).
    Stray(Frame),
}

/// A terminal connection. `T` is what the caller wants back with each answer.
pub struct Conn<T> {
    pub terminal: String,
    stream: TlsStream<TcpStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_id: u32,
    in_flight: HashMap<u32, (Instant, T)>,
    write_timeout: Duration,
}

impl<T> Conn<T> {
    /// TCP connect, TLS handshake (bounded by `timeout`), ALPN check.
    pub async fn connect(
        addr: &str,
        config: Arc<ClientConfig>,
        terminal: &str,
        timeout: Duration,
    ) -> anyhow::Result<Conn<T>> {
        let connect = async {
            let tcp =
                TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME)?;
            let stream = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {addr} as {terminal}"))?;
            anyhow::Ok(stream)
        };
        let stream = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| anyhow!("connecting to {addr} as {terminal}: timed out"))??;
        if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
            bail!("server at {addr} did not agree to ALPN citycard/1");
        }
        Ok(Conn {
            terminal: terminal.to_owned(),
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            next_id: 1,
            in_flight: HashMap::new(),
            write_timeout: timeout,
        })
    }

    /// Requests sent and not yet answered (nor expired).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Encodes `request` into the write buffer under a fresh request id; [`Conn::flush`] sends.
    /// The send time recorded for the timeout is now.
    pub fn queue(&mut self, request: &Request, tag: T) -> anyhow::Result<RequestId> {
        let mut id = self.next_id;
        while id == 0 || self.in_flight.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        request
            .encode(RequestId(id), &mut self.wbuf)
            .map_err(|e| anyhow!("encoding a request: {e}"))?;
        self.in_flight.insert(id, (Instant::now(), tag));
        Ok(RequestId(id))
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(e)) => Err(ConnError::Io(e)),
            Err(_) => Err(ConnError::WriteTimeout),
        }
    }

    fn match_frame(&mut self, frame: Frame) -> Incoming<T> {
        match self.in_flight.remove(&frame.request_id.0) {
            Some((sent, tag)) => Incoming::Answer(frame, sent, tag),
            None => Incoming::Stray(frame),
        }
    }

    /// A frame already buffered, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Incoming<T>, ConnError>> {
        match decode_frame(&mut self.rbuf) {
            Ok(Some(frame)) => Some(Ok(self.match_frame(frame))),
            Ok(None) => None,
            Err(e) => Some(Err(ConnError::Framing(e))),
        }
    }

    /// The next frame. Cancel-safe: dropping the future loses no bytes.
    pub async fn next(&mut self) -> Result<Incoming<T>, ConnError> {
        loop {
            if let Some(result) = self.try_next() {
                return result;
            }
            self.rbuf.reserve(READ_CHUNK);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err(ConnError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(ConnError::Closed)
                }
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }

    /// Removes and returns the requests written before `cutoff` that are still unanswered.
    pub fn expire(&mut self, cutoff: Instant) -> Vec<T> {
        let old: Vec<u32> = self
            .in_flight
            .iter()
            .filter(|(_, (sent, _))| *sent < cutoff)
            .map(|(id, _)| *id)
            .collect();
        old.into_iter().filter_map(|id| self.in_flight.remove(&id).map(|(_, tag)| tag)).collect()
    }

    /// Removes and returns every request in flight (the connection failed).
    pub fn take_all(&mut self) -> Vec<T> {
        self.in_flight.drain().map(|(_, (_, tag))| tag).collect()
    }

    /// Sends Hello and waits for ServerInfo (before any other request is in flight).
    pub async fn hello(
        &mut self,
        now_ms: u64,
        timeout: Duration,
        tag: T,
    ) -> anyhow::Result<ServerInfo> {
        self.queue(&Request::Hello { client_time_ms: now_ms }, tag)?;
        self.flush().await.map_err(|e| anyhow!("{}: sending Hello: {e}", self.terminal))?;
        let frame = match tokio::time::timeout(timeout, self.next()).await {
            Err(_) => bail!("{}: no answer to Hello within {timeout:?}", self.terminal),
            Ok(Err(e)) => bail!("{}: waiting for ServerInfo: {e}", self.terminal),
            Ok(Ok(Incoming::Answer(frame, _, _))) | Ok(Ok(Incoming::Stray(frame))) => frame,
        };
        match Response::decode_body(frame.message_type, &frame.body) {
            Ok(Response::ServerInfo(info)) => Ok(info),
            Ok(Response::Error { code, message }) => {
                bail!("{}: Hello answered by error {code}: {message}", self.terminal)
            }
            Ok(other) => bail!("{}: Hello answered by {:?}", self.terminal, other.message_type()),
            Err(e) => bail!("{}: undecodable answer to Hello: {e}", self.terminal),
        }
    }
}

/// The response type that answers a request type.
pub fn response_type(request: MessageType) -> Option<MessageType> {
    Some(match request {
        MessageType::Hello => MessageType::ServerInfo,
        MessageType::Purchase => MessageType::PurchaseResult,
        MessageType::TopUp => MessageType::TopUpResult,
        MessageType::Balance => MessageType::BalanceResult,
        MessageType::History => MessageType::HistoryPage,
        MessageType::Identity => MessageType::IdentityResult,
        MessageType::Issue => MessageType::IssueResult,
        MessageType::Block => MessageType::BlockResult,
        MessageType::Unblock => MessageType::UnblockResult,
        MessageType::Replace => MessageType::ReplaceResult,
        MessageType::Close => MessageType::CloseResult,
        MessageType::OfflineBatch => MessageType::OfflineResults,
        MessageType::HotlistSync => MessageType::HotlistChanges,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_discovery_orders_by_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let terminals = dir.path().join("terminals");
        std::fs::create_dir(&terminals).expect("mkdir");
        for id in ["reader-10", "reader-2", "reader-1", "kiosk-1", "counter-1"] {
            std::fs::write(terminals.join(format!("{id}.pem")), "").expect("pem");
            std::fs::write(terminals.join(format!("{id}.key")), "").expect("key");
        }
        std::fs::write(terminals.join("reader-3.pem"), "").expect("pem without key");
        let readers = terminals_with_prefix(dir.path(), "reader").expect("list");
        assert_eq!(readers, vec!["reader-1", "reader-2", "reader-10"]);
    }
}
