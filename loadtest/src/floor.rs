//! The floor (`--floor`): an echo server with the real server's transport and nothing else, so
//! that citycard's throughput and CPU can be read as a ratio of what TLS, framing and the
//! sockets alone cost on this machine.
//!
//! It takes the same certificates as the real server (fresh ones made by `citycard keys init`),
//! speaks TLS 1.3 only with mutual TLS, ALPN `citycard/1`, no resumption and no early data
//! (PROTOCOL.md section 1, `src/tls.rs`), reads the same frames, and answers each request frame
//! with a response frame of the type and size the real server would send, echoing the request
//! id. It decides nothing (every card answer says Approved, with zero fields and no MAC) and
//! writes nothing to disk. It runs in this process on its own runtime, whose threads bear
//! [`THREAD_NAME`] so that its CPU time can be told apart from the load tester's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use citycard_protocol::frame::{decode_frame, encode_frame};
use citycard_protocol::{
    Amount, Atc, CardId, CardResult, ErrorCode, Frame, IdentityResult, IssueResult, KeyVersion,
    Mac, MessageType, Response, ServerInfo, Status,
};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::client::ALPN;
use crate::server;

/// The name of the floor server's threads (at most 15 bytes: Linux cuts thread names there).
pub const THREAD_NAME: &str = "floor-echo";
/// As the real server: a TCP connection whose TLS handshake takes longer is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// As the real server: a connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// As the real server: a terminal that does not read its answers is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; one more is closed at once. Far above any load tester run.
const MAX_CONNECTIONS: usize = 4096;
/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// How long stopping waits for the runtime's tasks.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Server config as the real server builds it (`citycard::tls::server_config`, without a CRL):
/// TLS 1.3 only, client certificate required and verified against `keys/ca.pem`, identity from
/// `server.pem` / `server.key`, ALPN `citycard/1`, no 0-RTT, no tickets, no session cache.
pub fn server_config(keys: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca = keys.join("ca.pem");
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(&ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let cert_path = keys.join("server.pem");
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    let key_path = keys.join("server.key");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.key_log = Arc::new(rustls::NoKeyLog {});
    Ok(Arc::new(config))
}

/// The answer to each request type the load sends: the response type and a body of the size
/// the real server sends (encoded once by the protocol crate, so the sizes cannot drift).
pub struct Answers {
    by_request: HashMap<u8, (MessageType, Bytes)>,
    other: Bytes,
}

impl Answers {
    pub fn new() -> anyhow::Result<Answers> {
        let card = CardResult {
            status: Status::Approved,
            card_id: CardId(0),
            atc: Atc(0),
            balance: Amount(0),
            journal_seq: 0,
            mac: Mac::default(),
        };
        let identity = IdentityResult {
            status: Status::Approved,
            card_id: CardId(0),
            atc: Atc(0),
            journal_seq: 0,
            issued_ms: 0,
            expires_ms: 0,
            signature: [0; 64],
            mac: Mac::default(),
        };
        let issue = IssueResult {
            status: Status::Approved,
            card_id: CardId(0),
            key_version: KeyVersion(0),
            card_key: [0; 32],
            balance: Amount(0),
            replaced_card_id: CardId(0),
            journal_seq: 0,
            mac: Mac::default(),
        };
        let info = ServerInfo {
            protocol_version: 1,
            role: 0,
            server_time_ms: 0,
            hotlist_version: 0,
            shard_count: 1,
            max_in_flight: 64,
        };
        let answers = [
            (MessageType::Hello, Response::ServerInfo(info)),
            (MessageType::Purchase, Response::Purchase(card)),
            (MessageType::TopUp, Response::TopUp(card)),
            (MessageType::Balance, Response::Balance(card)),
            (MessageType::Identity, Response::Identity(identity)),
            (MessageType::Issue, Response::Issue(issue)),
        ];
        let encode = |response: &Response| -> anyhow::Result<Bytes> {
            let mut body = BytesMut::new();
            response.encode_body(&mut body).map_err(|e| anyhow!("encoding an answer: {e}"))?;
            Ok(body.freeze())
        };
        let mut by_request = HashMap::new();
        for (request, response) in &answers {
            by_request.insert(*request as u8, (response.message_type(), encode(response)?));
        }
        let other = encode(&Response::Error {
            code: ErrorCode::NotPermitted as u16,
            message: "the floor answers only hello, purchase, top-up, balance, identity, issue"
                .into(),
        })?;
        Ok(Answers { by_request, other })
    }

    /// The frame that answers `request`.
    pub fn answer(&self, request: &Frame) -> Frame {
        let (message_type, body) = match self.by_request.get(&(request.message_type as u8)) {
            Some((t, body)) => (*t, body.clone()),
            None => (MessageType::Error, self.other.clone()),
        };
        Frame { message_type, request_id: request.request_id, body }
    }
}

/// Serves one connection: handshake, ALPN check, then answer every frame until the terminal
/// closes, sends bad framing, idles or stops reading.
async fn connection(tcp: TcpStream, acceptor: TlsAcceptor, answers: Arc<Answers>) {
    let _ = tcp.set_nodelay(true);
    let Ok(Ok(mut stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
    else {
        return;
    };
    if stream.get_ref().1.alpn_protocol() != Some(ALPN) {
        return;
    }
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        rbuf.reserve(READ_CHUNK);
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read_buf(&mut rbuf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        // Every whole frame read so far (decode_frame bounds the body length before buffering).
        loop {
            match decode_frame(&mut rbuf) {
                Ok(Some(frame)) => {
                    if encode_frame(&answers.answer(&frame), &mut wbuf).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if !wbuf.is_empty() {
            let write = async {
                stream.write_all(&wbuf).await?;
                stream.flush().await
            };
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(Ok(())) => wbuf.clear(),
                _ => return,
            }
        }
    }
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, answers: Arc<Answers>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            // Out of descriptors or similar: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let (acceptor, answers) = (acceptor.clone(), answers.clone());
        tokio::spawn(async move {
            connection(tcp, acceptor, answers).await;
            drop(permit);
        });
    }
}

/// A running floor server. Dropping it stops it.
pub struct Floor {
    pub addr: String,
    pub keys: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl Floor {
    /// Makes fresh keys with the citycard binary `bin` (as `--spawn` does: reader-1..`readers`,
    /// kiosk-1..`kiosks`, counter-1) and starts the echo server on 127.0.0.1, port chosen by
    /// the system, on its own runtime of one thread per core.
    pub fn start(bin: &Path, readers: usize, kiosks: usize) -> anyhow::Result<Floor> {
        let dir = tempfile::Builder::new()
            .prefix("citycard-floor-")
            .tempdir()
            .context("creating a temporary directory")?;
        let keys = dir.path().join("keys");
        server::make_keys(bin, &keys, readers, kiosks)?;
        Floor::start_with_keys(&keys, dir)
    }

    fn start_with_keys(keys: &Path, dir: tempfile::TempDir) -> anyhow::Result<Floor> {
        let acceptor = TlsAcceptor::from(server_config(keys)?);
        let answers = Arc::new(Answers::new()?);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(THREAD_NAME)
            .enable_all()
            .build()
            .context("starting the floor server's runtime")?;
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("binding the floor server to 127.0.0.1")?;
        let addr = listener.local_addr()?.to_string();
        if addr.is_empty() {
            bail!("the floor server has no address");
        }
        runtime.spawn(serve(listener, acceptor, answers));
        Ok(Floor { addr, keys: keys.to_path_buf(), runtime: Some(runtime), _dir: dir })
    }

    /// Stops the server (its connections are dropped) and says how.
    pub fn stop(mut self) -> String {
        match self.runtime.take() {
            Some(runtime) => {
                runtime.shutdown_timeout(STOP_GRACE);
                "floor server stopped".into()
            }
            None => "floor server already stopped".into(),
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use citycard_protocol::{CardAuth, Request, RequestId};

    #[test]
    fn answers_have_the_real_response_types_and_sizes() {
        let answers = Answers::new().expect("answers");
        let auth = CardAuth { card_id: CardId(5), atc: Atc(1), nonce: 9, cryptogram: Mac([1; 16]) };
        let cases = [
            (Request::Purchase { auth, amount: Amount(10) }, MessageType::PurchaseResult, 45),
            (Request::Balance { auth }, MessageType::BalanceResult, 45),
            (Request::TopUp { auth, amount: Amount(10) }, MessageType::TopUpResult, 45),
            (Request::Hello { client_time_ms: 1 }, MessageType::ServerInfo, 0),
            (Request::Identity { auth }, MessageType::IdentityResult, 0),
        ];
        for (request, want_type, want_len) in cases {
            let mut wire = BytesMut::new();
            request.encode(RequestId(77), &mut wire).expect("encode");
            let frame = decode_frame(&mut wire).expect("decode").expect("a frame");
            let answer = answers.answer(&frame);
            assert_eq!(answer.message_type, want_type);
            assert_eq!(answer.request_id, RequestId(77));
            if want_len > 0 {
                assert_eq!(answer.body.len(), want_len);
            }
            // The body decodes as the real response does.
            let decoded = Response::decode_body(answer.message_type, &answer.body).expect("body");
            assert_eq!(decoded.message_type(), want_type);
        }
    }
}
