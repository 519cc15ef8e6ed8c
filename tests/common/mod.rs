//! Shared test helpers: an in-process server on 127.0.0.1 with fresh keys, a TLS terminal
//! client, and a simulated card that computes its own cryptograms.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod pg;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use citycard::config::Config;
use citycard::server::RunningServer;
use citycard_protocol::crypto::CardKey;
use citycard_protocol::{
    decode_response, Amount, Atc, CardAuth, CardId, IssueResult, MessageType, Request, RequestId,
    Response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Every test read is bounded so a broken server fails the test instead of hanging it.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Env {
    pub dir: tempfile::TempDir,
    pub keys: PathBuf,
    pub data: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let data = dir.path().join("data");
        citycard::keys::init(&keys).unwrap();
        Env { dir, keys, data }
    }

    /// A test configuration: small journal segments, port chosen by the OS.
    pub fn config(&self) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            keys_dir: self.keys.clone(),
            data_dir: self.data.clone(),
            shards: Some(2),
            segment_bytes: 1024 * 1024,
            drain_timeout_ms: 2_000,
            ..Config::default()
        }
    }

    pub async fn start(&self) -> RunningServer {
        RunningServer::start(self.config()).await.unwrap()
    }
}

pub struct Client {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
    next_id: u32,
    pub terminal: String,
}

pub async fn connect_with(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

impl Client {
    pub async fn connect(keys: &Path, addr: std::net::SocketAddr, terminal: &str) -> Client {
        let config = citycard::tls::client_config(keys, terminal).unwrap();
        let stream = connect_with(addr, config).await.unwrap();
        Client { stream, buf: BytesMut::new(), next_id: 1, terminal: terminal.to_owned() }
    }

    pub async fn send(&mut self, request: &Request) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let mut out = BytesMut::new();
        request.encode(id, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
        self.stream.flush().await.unwrap();
        id
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next response, or None when the server closed the connection.
    pub async fn recv(&mut self) -> Option<(RequestId, Response)> {
        loop {
            if let Some(found) =
                decode_response(&mut self.buf).expect("server sent a malformed frame")
            {
                return Some(found);
            }
            let read = tokio::time::timeout(READ_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("server did not answer in time");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn call(&mut self, request: &Request) -> Response {
        let id = self.send(request).await;
        let (got, response) = self.recv().await.expect("connection closed");
        assert_eq!(got, id);
        response
    }

    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// A card as the terminal sees it: id, key and its own counter.
#[derive(Clone)]
pub struct Card {
    pub id: CardId,
    pub key: CardKey,
    pub atc: u32,
}

impl Card {
    pub fn from_issue(result: &IssueResult) -> Card {
        Card { id: result.card_id, key: CardKey::from_bytes(result.card_key), atc: 0 }
    }

    /// Card authentication for a request of `message_type` with `amount`, from `terminal`;
    /// increments the counter first, as a card does.
    pub fn auth(&mut self, message_type: MessageType, amount: i64, terminal: &str) -> CardAuth {
        self.atc += 1;
        self.auth_at(message_type, amount, terminal, self.atc)
    }

    pub fn auth_at(
        &self,
        message_type: MessageType,
        amount: i64,
        terminal: &str,
        atc: u32,
    ) -> CardAuth {
        let nonce = u64::from(atc) * 7919 + 13;
        let cryptogram = self.key.request_cryptogram(
            message_type as u8,
            self.id,
            Atc(atc),
            Amount(amount),
            nonce,
            terminal,
        );
        CardAuth { card_id: self.id, atc: Atc(atc), nonce, cryptogram }
    }

    pub fn purchase(&mut self, amount: i64, terminal: &str) -> Request {
        Request::Purchase {
            auth: self.auth(MessageType::Purchase, amount, terminal),
            amount: Amount(amount),
        }
    }

    pub fn top_up(&mut self, amount: i64, terminal: &str) -> Request {
        Request::TopUp {
            auth: self.auth(MessageType::TopUp, amount, terminal),
            amount: Amount(amount),
        }
    }

    pub fn balance(&self, terminal: &str) -> Request {
        Request::Balance { auth: self.auth_at(MessageType::Balance, 0, terminal, self.atc + 1) }
    }
}

/// Issues a card through `counter` with `deposit`.
pub async fn issue(counter: &mut Client, op_ref: u64, deposit: i64) -> Card {
    match counter.call(&Request::Issue { op_ref, deposit: Amount(deposit) }).await {
        Response::Issue(r) => {
            assert_eq!(r.status, citycard_protocol::Status::Approved, "issue declined: {r:?}");
            Card::from_issue(&r)
        }
        other => panic!("unexpected answer to issue: {other:?}"),
    }
}

/// The card's balance as the server reports it.
pub async fn balance_of(client: &mut Client, card: &Card) -> i64 {
    let terminal = client.terminal.clone();
    match client.call(&card.balance(&terminal)).await {
        Response::Balance(r) => {
            assert_eq!(r.status, citycard_protocol::Status::Approved, "balance declined: {r:?}");
            r.balance.0
        }
        other => panic!("unexpected answer to balance: {other:?}"),
    }
}

/// A small seeded generator (SplitMix64) so every run sends the same "random" bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
