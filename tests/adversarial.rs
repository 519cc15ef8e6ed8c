//! Hardening: hostile and broken terminals against the real server over TLS on 127.0.0.1.
//!
//! Every case asserts what the server did (error code, request id, whether it closed, balances,
//! journal contents) and is bounded in count and time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, BytesMut};
use citycard::config::Config;
use citycard::engine::entry::Entry;
use citycard::journal::FaultInjector;
use citycard::keys::{Role, TerminalCertOptions, TerminalId};
use citycard::server::RunningServer;
use citycard_protocol::frame::{Frame, MAX_BODY_LEN};
use citycard_protocol::{
    decode_response, frame_to_request, Amount, ErrorCode, MessageType, Request, RequestId,
    Response, Status,
};
use common::{balance_of, issue, Card, Client, Env, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// What one bounded read of a raw connection saw.
#[derive(Debug)]
enum Read {
    Frame(RequestId, Response),
    Closed,
    Timeout,
}

/// A TLS connection driven byte by byte.
struct Raw {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Raw {
    async fn connect(keys: &Path, addr: SocketAddr, terminal: &str) -> Raw {
        let config = citycard::tls::client_config(keys, terminal).unwrap();
        Raw { stream: common::connect_with(addr, config).await.unwrap(), buf: BytesMut::new() }
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    async fn read(&mut self, timeout: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((id, response)) =
                decode_response(&mut self.buf).expect("server sent a malformed frame")
            {
                return Read::Frame(id, response);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Read::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next frame; panics on close or timeout.
    async fn frame(&mut self) -> (RequestId, Response) {
        match self.read(common::READ_TIMEOUT).await {
            Read::Frame(id, r) => (id, r),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Asserts the server closed the connection (no further frame).
    async fn assert_closed(&mut self) {
        match self.read(Duration::from_secs(5)).await {
            Read::Closed => {}
            other => panic!("expected the server to close, got {other:?}"),
        }
    }
}

fn encode(request: &Request, id: u32) -> Vec<u8> {
    let mut out = BytesMut::new();
    request.encode(RequestId(id), &mut out).unwrap();
    out.to_vec()
}

/// A frame header with every field chosen by the caller.
fn header(
    magic: [u8; 2],
    version: u8,
    ty: u8,
    flags: u16,
    reserved: u16,
    id: u32,
    len: u32,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&magic);
    h.push(version);
    h.push(ty);
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&reserved.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

fn frame_bytes(ty: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = header(*b"CC", 1, ty, 0, 0, id, body.len() as u32);
    f.extend_from_slice(body);
    f
}

fn error_code(response: &Response) -> Option<u16> {
    match response {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

fn card_result(response: &Response) -> citycard_protocol::CardResult {
    match response {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => *r,
        other => panic!("not a card result: {other:?}"),
    }
}

async fn hello_ok(client: &mut Client) {
    match client.call(&Request::Hello { client_time_ms: 1 }).await {
        Response::ServerInfo(_) => {}
        other => panic!("Hello not answered: {other:?}"),
    }
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line =
        status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn start(config: Config) -> RunningServer {
    RunningServer::start(config).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Slow and stuck clients.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_without_tls_is_dropped_by_the_handshake_timeout() {
    let env = Env::new();
    let config = Config { handshake_timeout_ms: 500, ..env.config() };
    let server = start(config).await;
    let addr = server.local_addr;
    // One connection that never starts TLS, one that sends half a TLS record header.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = Instant::now();
    // A normal terminal is served meanwhile.
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    hello_ok(&mut reader).await;
    for stream in [&mut silent, &mut partial] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("server kept a connection without TLS past the handshake timeout");
        let elapsed = started.elapsed();
        match read {
            Ok(0) | Err(_) => {}
            // rustls may answer the truncated record with an alert before closing.
            Ok(n) => {
                assert_eq!(buf[0], 0x15, "expected nothing or a TLS alert, got {:?}", &buf[..n])
            }
        }
        assert!(elapsed < Duration::from_millis(3_000), "dropped only after {elapsed:?}");
    }
    assert!(started.elapsed() >= Duration::from_millis(400), "dropped before the timeout");
    hello_ok(&mut reader).await;
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_then_stall_gets_frame_timeout_and_close() {
    let env = Env::new();
    let config = Config { frame_timeout_ms: 1_000, ..env.config() };
    let server = start(config).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 5_000).await;
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;

    let mut stalled = Raw::connect(&env.keys, addr, "reader-1").await;
    let hello = encode(&Request::Hello { client_time_ms: 0 }, 7);
    stalled.write(&hello[..8]).await.unwrap();
    let sent_at = Instant::now();
    let watcher = tokio::spawn(async move {
        let (id, response) = stalled.frame().await;
        let at = sent_at.elapsed();
        stalled.assert_closed().await;
        (id, response, at)
    });
    // The normal terminal keeps getting answers during the stall.
    let mut answered = 0;
    while sent_at.elapsed() < Duration::from_millis(800) {
        let r = card_result(&reader.call(&card.purchase(1, "reader-1")).await);
        assert_eq!(r.status, Status::Approved);
        answered += 1;
    }
    assert!(answered > 0);
    let (id, response, at) = watcher.await.unwrap();
    assert_eq!(error_code(&response), Some(ErrorCode::FrameTimeout as u16), "{response:?}");
    assert_eq!(id, RequestId(0));
    assert!(at >= Duration::from_millis(900), "cut before the frame timeout: {at:?}");
    assert!(at <= Duration::from_millis(2_500), "cut long after the frame timeout: {at:?}");
    assert_eq!(balance_of(&mut reader, &card).await, 5_000 - answered);
    server.stop().await.unwrap();
}

/// The connection's timer is only ever moved earlier (resetting it for every answer cost the
/// timer wheel's lock per transaction), so the idle deadline an answer pushed later is reached
/// by a timer that fires at the old one first: that early firing must not close the connection,
/// and the real idle deadline must still close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_moves_the_idle_deadline_and_idleness_still_closes() {
    let env = Env::new();
    let config = Config { idle_timeout_ms: 1_500, ..env.config() };
    let server = start(config).await;
    let mut raw = Raw::connect(&env.keys, server.local_addr, "reader-1").await;
    let started = Instant::now();
    // Five answers 600 ms apart: 2.4 s in all, past the first idle deadline (1.5 s after the
    // first answer), never 1.5 s without activity.
    for id in 1..=5u32 {
        if id > 1 {
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        raw.write(&encode(&Request::Hello { client_time_ms: 0 }, id)).await.unwrap();
        match raw.read(common::READ_TIMEOUT).await {
            Read::Frame(got, Response::ServerInfo(_)) => assert_eq!(got, RequestId(id)),
            other => panic!("Hello {id} not answered {:?} in: {other:?}", started.elapsed()),
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(2_000));
    // Now idle: closed with close_notify and no Error frame (PROTOCOL.md, timeouts: Idle).
    match raw.read(Duration::from_secs(10)).await {
        Read::Closed => {}
        other => panic!("an idle connection was not closed: {other:?}"),
    }
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_frame_is_cut_at_the_frame_timeout() {
    let env = Env::new();
    let config = Config { frame_timeout_ms: 1_000, ..env.config() };
    let server = start(config).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 5_000).await;
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;

    // A valid purchase, one byte per 200 ms: 60 bytes would take 12 s.
    let frame = encode(&card.purchase(100, "reader-1"), 9);
    assert_eq!(frame.len(), 60);
    let slow = Raw::connect(&env.keys, addr, "reader-1").await;
    let (mut rd, mut wr) = tokio::io::split(slow.stream);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let trickler = {
        let (done, sent) = (done.clone(), sent.clone());
        tokio::spawn(async move {
            for b in frame {
                if done.load(std::sync::atomic::Ordering::Acquire)
                    || wr.write_all(&[b]).await.is_err()
                    || wr.flush().await.is_err()
                {
                    return;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let watcher = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        loop {
            if let Some(f) = decode_response(&mut buf).unwrap() {
                frames.push((f, started.elapsed()));
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(15), rd.read_buf(&mut buf)).await {
                Err(_) => panic!("the trickling connection was never cut"),
                Ok(Ok(0)) | Ok(Err(_)) => return (frames, started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    });
    let mut answered = 0;
    while !watcher.is_finished() && started.elapsed() < Duration::from_secs(5) {
        let r = card_result(&reader.call(&card.purchase(1, "reader-1")).await);
        assert_eq!(r.status, Status::Approved);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (frames, closed_at) = watcher.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::Release);
    trickler.await.unwrap();
    assert!(answered > 0);
    assert_eq!(frames.len(), 1, "expected exactly one Error frame: {frames:?}");
    let ((id, response), at) = &frames[0];
    assert_eq!(error_code(response), Some(ErrorCode::FrameTimeout as u16), "{response:?}");
    assert_eq!(*id, RequestId(0));
    assert!(*at >= Duration::from_millis(900) && *at <= Duration::from_millis(2_500), "{at:?}");
    assert!(closed_at <= Duration::from_millis(3_000), "{closed_at:?}");
    assert!(sent.load(std::sync::atomic::Ordering::Acquire) < 60, "the frame completed");
    // The trickled purchase was never executed.
    assert_eq!(balance_of(&mut reader, &card).await, 5_000 - answered);
    server.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Oversized and malformed frames.

#[tokio::test]
async fn malformed_frames_get_the_right_error_and_close_only_when_they_must() {
    let env = Env::new();
    let server = env.start().await;
    let addr = server.local_addr;
    let hello_body = 5u64.to_be_bytes();
    let mut hotlist_65 = vec![0u8, 0, 65];
    hotlist_65.extend(std::iter::repeat_n(0u8, 65 * 8));
    let mut block_bad_reason = Vec::new();
    block_bad_reason.put_u64(1);
    block_bad_reason.put_u64(6_000_000_000_000_000);
    block_bad_reason.put_u8(9);
    // (name, bytes, expected code, expected request id, connection closes)
    let cases: Vec<(&str, Vec<u8>, ErrorCode, u32, bool)> = vec![
        (
            "length 0xFFFFFFFF",
            header(*b"CC", 1, 0x02, 0, 0, 41, u32::MAX),
            ErrorCode::FrameTooLarge,
            41,
            true,
        ),
        (
            "length 65537",
            header(*b"CC", 1, 0x02, 0, 0, 42, MAX_BODY_LEN as u32 + 1),
            ErrorCode::FrameTooLarge,
            42,
            true,
        ),
        ("bad magic", header(*b"XY", 1, 0x01, 0, 0, 43, 8), ErrorCode::BadMagic, 0, true),
        ("bad version", header(*b"CC", 2, 0x01, 0, 0, 44, 8), ErrorCode::BadVersion, 0, true),
        ("flags set", header(*b"CC", 1, 0x01, 1, 0, 45, 8), ErrorCode::BadHeader, 45, true),
        ("reserved set", header(*b"CC", 1, 0x01, 0, 0x8000, 46, 8), ErrorCode::BadHeader, 46, true),
        ("unknown type", header(*b"CC", 1, 0x42, 0, 0, 47, 8), ErrorCode::UnknownType, 47, true),
        (
            "response type as request",
            frame_bytes(0x82, 48, &[0u8; 45]),
            ErrorCode::UnknownType,
            48,
            true,
        ),
        (
            "error type as request",
            frame_bytes(0xFF, 49, &[0, 1, 0, 0]),
            ErrorCode::UnknownType,
            49,
            true,
        ),
        (
            "body too short",
            frame_bytes(0x01, 50, &hello_body[..7]),
            ErrorCode::BodyTooShort,
            50,
            false,
        ),
        (
            "purchase too short",
            frame_bytes(0x02, 51, &[0u8; 43]),
            ErrorCode::BodyTooShort,
            51,
            false,
        ),
        ("trailing bytes", frame_bytes(0x01, 52, &[0u8; 9]), ErrorCode::TrailingBytes, 52, false),
        (
            "bad enum value",
            frame_bytes(0x08, 53, &block_bad_reason),
            ErrorCode::BadValue,
            53,
            false,
        ),
        (
            "offline count 257",
            frame_bytes(0x0C, 54, &257u16.to_be_bytes()),
            ErrorCode::BadValue,
            54,
            false,
        ),
        (
            "hotlist cursor count 65",
            frame_bytes(0x0D, 55, &hotlist_65),
            ErrorCode::BadValue,
            55,
            false,
        ),
        ("empty purchase body", frame_bytes(0x02, 56, &[]), ErrorCode::BodyTooShort, 56, false),
    ];
    for (name, bytes, code, id, closes) in cases {
        let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
        conn.write(&bytes).await.unwrap();
        let (got_id, response) = conn.frame().await;
        assert_eq!(error_code(&response), Some(code as u16), "{name}: {response:?}");
        assert_eq!(got_id, RequestId(id), "{name}: request id");
        assert_eq!(code.closes_connection(), closes, "{name}: test table");
        if closes {
            conn.assert_closed().await;
        } else {
            // Still open and in sync: the next frame is answered normally.
            conn.write(&encode(&Request::Hello { client_time_ms: 0 }, 99)).await.unwrap();
            let (got_id, response) = conn.frame().await;
            assert_eq!(got_id, RequestId(99), "{name}");
            assert!(matches!(response, Response::ServerInfo(_)), "{name}: {response:?}");
        }
    }
    // The largest allowed length is accepted as a header (the body is awaited, not refused):
    // a body of exactly MAX_BODY_LEN bytes for Hello is answered TrailingBytes, connection open.
    let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
    let mut big = header(*b"CC", 1, 0x01, 0, 0, 60, MAX_BODY_LEN as u32);
    big.extend(std::iter::repeat_n(0u8, MAX_BODY_LEN));
    conn.write(&big).await.unwrap();
    let (got_id, response) = conn.frame().await;
    assert_eq!(
        (got_id, error_code(&response)),
        (RequestId(60), Some(ErrorCode::TrailingBytes as u16))
    );
    conn.write(&encode(&Request::Hello { client_time_ms: 0 }, 61)).await.unwrap();
    assert!(matches!(conn.frame().await, (RequestId(61), Response::ServerInfo(_))));
    server.stop().await.unwrap();
}

/// Kinds of frames the random test sends.
enum Fuzzed {
    /// Valid header, request type, random body of the declared length.
    Body(Vec<u8>, u32),
    /// Something the server must answer with a closing error.
    Closing(Vec<u8>, ErrorCode),
}

fn random_frame(rng: &mut Rng, id: u32) -> Fuzzed {
    match rng.below(100) {
        0..=84 => {
            let ty = 1 + rng.below(13) as u8;
            let len = match rng.below(4) {
                0 => rng.below(8) as usize,
                // Around the real sizes, so some decode.
                1 | 2 => [8usize, 16, 17, 36, 44, 46, 54][rng.below(7) as usize],
                _ => rng.below(200) as usize,
            };
            let mut body = rng.bytes(len);
            if ty == 0x0C && len >= 2 && rng.below(2) == 0 {
                // A plausible offline count so the count check is exercised.
                body[0] = 0;
                body[1] = rng.below(4) as u8;
            }
            Fuzzed::Body(frame_bytes(ty, id, &body), id)
        }
        85..=89 => {
            let n = 2 + rng.below(40) as usize;
            let mut junk = rng.bytes(n);
            if junk[0] == b'C' {
                junk[0] = b'X';
            }
            Fuzzed::Closing(junk, ErrorCode::BadMagic)
        }
        90..=92 => {
            let flags = 1 + rng.below(0xFFFF) as u16;
            Fuzzed::Closing(header(*b"CC", 1, 1, flags, 0, id, 8), ErrorCode::BadHeader)
        }
        93..=95 => {
            // Unassigned types and response types.
            let ty = loop {
                let t = rng.next() as u8;
                if MessageType::from_u8(t).is_none_or(|m| !m.is_request()) {
                    break t;
                }
            };
            Fuzzed::Closing(header(*b"CC", 1, ty, 0, 0, id, 0), ErrorCode::UnknownType)
        }
        96..=97 => {
            let len = MAX_BODY_LEN as u32
                + 1
                + (rng.next() as u32 % (u32::MAX - MAX_BODY_LEN as u32 - 1));
            Fuzzed::Closing(header(*b"CC", 1, 2, 0, 0, id, len), ErrorCode::FrameTooLarge)
        }
        _ => {
            let v = loop {
                let v = rng.next() as u8;
                if v != 1 {
                    break v;
                }
            };
            Fuzzed::Closing(header(*b"CC", v, 1, 0, 0, id, 0), ErrorCode::BadVersion)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_random_frames_change_nothing() {
    const FRAMES: usize = 3_000;
    let env = Env::new();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..4 {
        cards.push(issue(&mut counter, op_ref, 1_000 + op_ref as i64).await);
    }
    let rss_before = vm_rss_kib();
    let mut rng = Rng(0x5eed_c17c_a4d5);
    let terminals = ["reader-1", "kiosk-1", "counter-1"];
    let mut sent = 0usize;
    let mut closed_as_expected = 0usize;
    let mut decoded_ok = 0usize;
    let mut next_id = 1u32;
    let started = Instant::now();
    while sent < FRAMES {
        let terminal = terminals[rng.below(3) as usize];
        let mut conn = Raw::connect(&env.keys, addr, terminal).await;
        // A pipelined group of body-level frames, all answered, then maybe a closing one.
        let group = 1 + rng.below(24) as usize;
        let mut expected: HashMap<u32, Option<u16>> = HashMap::new();
        let mut closing = None;
        let mut out = Vec::new();
        while expected.len() < group && sent < FRAMES {
            let id = next_id;
            next_id += 1;
            sent += 1;
            match random_frame(&mut rng, id) {
                Fuzzed::Body(bytes, id) => {
                    let frame = Frame {
                        message_type: MessageType::from_u8(bytes[3]).unwrap(),
                        request_id: RequestId(id),
                        body: bytes::Bytes::copy_from_slice(&bytes[16..]),
                    };
                    let code = match frame_to_request(&frame) {
                        Ok(_) => {
                            decoded_ok += 1;
                            None
                        }
                        Err(e) => Some(e.code() as u16),
                    };
                    expected.insert(id, code);
                    out.extend_from_slice(&bytes);
                }
                Fuzzed::Closing(bytes, code) => {
                    closing = Some((bytes, code));
                    break;
                }
            }
        }
        conn.write(&out).await.unwrap();
        for _ in 0..expected.len() {
            let (id, response) = conn.frame().await;
            let want =
                expected.remove(&id.0).unwrap_or_else(|| panic!("answer to unknown id {id:?}"));
            match (want, &response) {
                (Some(code), Response::Error { code: got, .. }) => assert_eq!(*got, code),
                (Some(code), other) => panic!("expected error {code}, got {other:?}"),
                (None, Response::Error { code, .. }) => {
                    // Decodable requests: only role/shape refusals that keep the connection.
                    let code = ErrorCode::from_u16(*code).unwrap();
                    assert!(
                        matches!(code, ErrorCode::NotPermitted | ErrorCode::BadValue),
                        "decodable request answered {code:?}"
                    );
                }
                (None, other) => {
                    let status = match other {
                        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => {
                            Some(r.status)
                        }
                        Response::History(h) => Some(h.status),
                        Response::Identity(i) => Some(i.status),
                        Response::Issue(i) | Response::Replace(i) => Some(i.status),
                        Response::Block(s) | Response::Unblock(s) | Response::Close(s) => {
                            Some(s.status)
                        }
                        Response::OfflineBatch(results) => {
                            assert!(results.iter().all(|r| r.status != Status::Approved));
                            None
                        }
                        _ => None,
                    };
                    // A random body never authenticates; a random issue could in theory, but
                    // only with a deposit inside 0..=max_balance (checked below by totals).
                    if let Some(status) = status {
                        assert!(
                            status != Status::Approved || matches!(other, Response::Issue(_)),
                            "random request approved: {other:?}"
                        );
                    }
                }
            }
        }
        assert!(expected.is_empty());
        if let Some((bytes, code)) = closing {
            conn.write(&bytes).await.unwrap();
            let (_, response) = conn.frame().await;
            assert_eq!(error_code(&response), Some(code as u16), "{response:?}");
            conn.assert_closed().await;
            closed_as_expected += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "random frame test too slow");
    }
    eprintln!(
        "random frames: {sent} sent, {decoded_ok} decodable, {closed_as_expected} closing, {:?}",
        started.elapsed()
    );
    assert!(decoded_ok > 50, "the generator should produce some decodable requests");
    assert!(closed_as_expected > 50);
    // The server still answers others, and no known card moved.
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    for (i, card) in cards.iter().enumerate() {
        assert_eq!(balance_of(&mut reader, card).await, 1_000 + i as i64);
    }
    let rss_after = vm_rss_kib();
    eprintln!("VmRSS before {rss_before} KiB, after {rss_after} KiB");
    assert!(rss_after < 1024 * 1024, "RSS {rss_after} KiB");
    assert!(rss_after < rss_before + 256 * 1024, "RSS grew from {rss_before} to {rss_after} KiB");
    drop(reader);
    drop(counter);
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

// ---------------------------------------------------------------------------------------------
// Floods.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_error_10_and_the_first_keep_working() {
    let env = Env::new();
    let config = Config { max_connections: 8, ..env.config() };
    let server = start(config).await;
    let addr = server.local_addr;
    let mut first = Vec::new();
    for _ in 0..8 {
        let mut c = Client::connect(&env.keys, addr, "reader-1").await;
        hello_ok(&mut c).await;
        first.push(c);
    }
    for i in 0..6 {
        let mut extra = Raw::connect(&env.keys, addr, "reader-1").await;
        // Whatever the extra sends is not served.
        let _ = extra.write(&encode(&Request::Hello { client_time_ms: 0 }, 5)).await;
        let (id, response) = extra.frame().await;
        assert_eq!(
            error_code(&response),
            Some(ErrorCode::TooManyConnections as u16),
            "extra {i}: {response:?}"
        );
        assert_eq!(id, RequestId(0));
        extra.assert_closed().await;
    }
    for c in &mut first {
        hello_ok(c).await;
    }
    // A freed slot is reusable.
    first.pop().unwrap().close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Raw::connect(&env.keys, addr, "reader-1").await;
        c.write(&encode(&Request::Hello { client_time_ms: 0 }, 1)).await.unwrap();
        match c.frame().await {
            (RequestId(1), Response::ServerInfo(_)) => break,
            (_, Response::Error { code: 10, .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("slot not freed: {other:?}"),
        }
    }
    drop(first);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_max_in_flight_pipelined_are_all_answered_without_busy() {
    let env = Env::new();
    let config = Config { max_in_flight: 4, ..env.config() };
    let server = start(config).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..10 {
        cards.push(issue(&mut counter, op_ref, 1_000).await);
    }
    let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
    let mut out = Vec::new();
    let mut expected = HashMap::new();
    for round in 0..4 {
        for (i, card) in cards.iter_mut().enumerate() {
            let id = (round * 10 + i + 1) as u32;
            out.extend(encode(&card.purchase(10, "reader-1"), id));
            expected.insert(id, (card.id, 1_000 - 10 * (round as i64 + 1)));
        }
    }
    assert_eq!(expected.len(), 40);
    conn.write(&out).await.unwrap();
    for _ in 0..40 {
        let (id, response) = conn.frame().await;
        let r = card_result(&response);
        assert_ne!(r.status, Status::Busy, "Busy for in-flight back-pressure");
        let (card, balance) = expected.remove(&id.0).expect("unknown or duplicate answer");
        assert_eq!((r.status, r.card_id, r.balance.0), (Status::Approved, card, balance));
    }
    assert!(expected.is_empty());
    assert!(matches!(conn.read(Duration::from_millis(300)).await, Read::Timeout), "extra frames");
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    for card in &cards {
        assert_eq!(balance_of(&mut reader, card).await, 960);
    }
    server.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// TLS negatives.

/// With TLS 1.3 the client's handshake can complete before the server's verdict; the refusal
/// shows on the first read.
async fn assert_refused(addr: SocketAddr, config: Arc<rustls::ClientConfig>, what: &str) {
    let Ok(mut stream) = common::connect_with(addr, config).await else {
        return;
    };
    let _ = stream.write_all(&encode(&Request::Hello { client_time_ms: 0 }, 1)).await;
    let _ = stream.flush().await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(common::READ_TIMEOUT, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: no verdict"));
    assert!(matches!(read, Ok(0) | Err(_)), "{what}: server answered: {read:?}");
}

fn with_identity(keys: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    citycard::tls::client_config_from_files(&keys.join("ca.pem"), Some((cert, key))).unwrap()
}

#[tokio::test]
async fn bad_client_certificates_are_refused() {
    let env = Env::new();
    let day = Duration::from_secs(86_400);
    let now = SystemTime::now();
    let expired = TerminalId::new("reader-expired").unwrap();
    let (ec, ek) = citycard::keys::issue_terminal_with(
        &env.keys,
        &expired,
        Role::Reader,
        TerminalCertOptions {
            not_before: now - 10 * day,
            not_after: now - day,
            server_auth_only: false,
        },
    )
    .unwrap();
    let future = TerminalId::new("reader-future").unwrap();
    let (fc, fk) = citycard::keys::issue_terminal_with(
        &env.keys,
        &future,
        Role::Reader,
        TerminalCertOptions {
            not_before: now + day,
            not_after: now + 10 * day,
            server_auth_only: false,
        },
    )
    .unwrap();
    let server_auth = TerminalId::new("reader-srvauth").unwrap();
    let (sc, sk) = citycard::keys::issue_terminal_with(
        &env.keys,
        &server_auth,
        Role::Reader,
        TerminalCertOptions { server_auth_only: true, ..TerminalCertOptions::standard().unwrap() },
    )
    .unwrap();
    let revoked = TerminalId::new("reader-revoked").unwrap();
    let (rc, rk) = citycard::keys::issue_terminal(&env.keys, &revoked, Role::Reader).unwrap();
    let crl = citycard::keys::revoke(&env.keys, &revoked).unwrap();
    let server = start(Config { crl: Some(crl), ..env.config() }).await;
    let addr = server.local_addr;

    assert_refused(
        addr,
        citycard::tls::client_config_from_files(&env.keys.join("ca.pem"), None).unwrap(),
        "no client certificate",
    )
    .await;
    let other = tempfile::tempdir().unwrap();
    citycard::keys::init(other.path()).unwrap();
    assert_refused(
        addr,
        with_identity(
            &env.keys,
            &other.path().join("terminals/reader-1.pem"),
            &other.path().join("terminals/reader-1.key"),
        ),
        "another CA",
    )
    .await;
    assert_refused(addr, with_identity(&env.keys, &ec, &ek), "expired").await;
    assert_refused(addr, with_identity(&env.keys, &fc, &fk), "not yet valid").await;
    assert_refused(addr, with_identity(&env.keys, &sc, &sk), "ServerAuth-only").await;
    assert_refused(addr, with_identity(&env.keys, &rc, &rk), "revoked").await;
    // Legitimate terminals still work with the CRL in force.
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    hello_ok(&mut reader).await;
    server.stop().await.unwrap();
}

/// A TLS 1.2-only ClientHello (no supported_versions extension), built by hand because this
/// rustls build has no TLS 1.2 support.
fn tls12_client_hello() -> Vec<u8> {
    let mut ext = Vec::new();
    let mut push_ext = |ty: u16, data: &[u8]| {
        ext.extend_from_slice(&ty.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    };
    let name = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    push_ext(0x0000, &sni);
    push_ext(0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]); // x25519, secp256r1
    push_ext(0x000b, &[0x01, 0x00]); // uncompressed points
    push_ext(0x000d, &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01]); // sig algs
    let alpn = b"citycard/1";
    let mut alpn_ext = Vec::new();
    alpn_ext.extend_from_slice(&((alpn.len() + 1) as u16).to_be_bytes());
    alpn_ext.push(alpn.len() as u8);
    alpn_ext.extend_from_slice(alpn);
    push_ext(0x0010, &alpn_ext);
    let mut hello = Vec::new();
    hello.extend_from_slice(&[0x03, 0x03]); // client_version TLS 1.2
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    let suites: [u16; 4] = [0xc02b, 0xc02f, 0xc030, 0x009c];
    hello.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        hello.extend_from_slice(&s.to_be_bytes());
    }
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn a_tls12_only_client_gets_an_alert_not_a_server_hello() {
    let env = Env::new();
    let server = env.start().await;
    let mut tcp = TcpStream::connect(server.local_addr).await.unwrap();
    tcp.write_all(&tls12_client_hello()).await.unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
        .await
        .expect("server neither answered nor closed");
    // The server closes (EOF or reset); what it sent before must be an alert record.
    let _ = read;
    if !reply.is_empty() {
        assert_eq!(
            reply[0],
            0x15,
            "expected an alert record, got {:02x?}",
            &reply[..reply.len().min(16)]
        );
        assert!(reply.len() >= 7);
        assert_eq!(reply[5], 2, "alert level fatal");
        // protocol_version (70) or handshake_failure (40).
        assert!(matches!(reply[6], 70 | 40), "alert {}", reply[6]);
    }
    assert!(reply.len() <= 7, "more than one alert record: {:02x?}", &reply[..reply.len().min(32)]);
    // The server is fine afterwards.
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    hello_ok(&mut reader).await;
    server.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Forgery and replay.

/// Offsets in a purchase frame (16-byte header, then the body).
const CARD_AT: usize = 16;
const ATC_AT: usize = 24;
const CRYPTOGRAM_AT: usize = 36;
const AMOUNT_AT: usize = 52;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flipped_bit_is_declined_and_replays_get_the_original_answer() {
    let env = Env::new();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 1_000).await;
    let genuine_request = card.purchase(100, "reader-1");
    let genuine = encode(&genuine_request, 1);
    let mut forged = Vec::new();
    for (field, at, bits) in [
        ("cryptogram", CRYPTOGRAM_AT, 128),
        ("card id", CARD_AT, 64),
        ("amount", AMOUNT_AT, 64),
        ("ATC", ATC_AT, 32),
    ] {
        for bit in 0..bits {
            let mut f = genuine.clone();
            f[at + bit / 8] ^= 0x80 >> (bit % 8);
            let id = 1_000 + forged.len() as u32;
            f[8..12].copy_from_slice(&id.to_be_bytes());
            forged.push((field, bit, f));
        }
    }
    assert_eq!(forged.len(), 288);
    let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
    for chunk in forged.chunks(32) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|(_, _, f)| f.clone()).collect();
        conn.write(&bytes).await.unwrap();
        let mut seen = HashSet::new();
        for _ in 0..chunk.len() {
            let (id, response) = conn.frame().await;
            let (field, bit, _) = &forged[(id.0 - 1_000) as usize];
            assert!(seen.insert(id), "duplicate answer");
            let r = card_result(&response);
            let allowed: &[Status] = match *field {
                "card id" => &[Status::UnknownCard, Status::BadCryptogram],
                _ => &[Status::BadCryptogram],
            };
            assert!(allowed.contains(&r.status), "{field} bit {bit}: {r:?}");
            assert_eq!((r.journal_seq, r.balance), (0, Amount(0)), "{field} bit {bit}");
        }
    }
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    assert_eq!(balance_of(&mut reader, &card).await, 1_000);
    // The ATC was not burnt: the genuine request is approved now.
    conn.write(&genuine).await.unwrap();
    let (id, original) = conn.frame().await;
    assert_eq!(id, RequestId(1));
    let r = card_result(&original);
    assert_eq!((r.status, r.balance, r.atc.0), (Status::Approved, Amount(900), 1));
    // The same bytes again: the identical answer, money moved once.
    for _ in 0..3 {
        conn.write(&genuine).await.unwrap();
        assert_eq!(conn.frame().await, (RequestId(1), original.clone()));
    }
    assert_eq!(balance_of(&mut reader, &card).await, 900);
    drop(conn);
    drop(reader);
    drop(counter);
    server.stop().await.unwrap();

    // After a restart: still the original answer.
    let server = env.start().await;
    let mut conn = Raw::connect(&env.keys, server.local_addr, "reader-1").await;
    conn.write(&genuine).await.unwrap();
    assert_eq!(conn.frame().await, (RequestId(1), original.clone()));
    // The same ATC with a different amount is a replay.
    let reuse = Request::Purchase {
        auth: card.auth_at(MessageType::Purchase, 50, "reader-1", card.atc),
        amount: Amount(50),
    };
    conn.write(&encode(&reuse, 2)).await.unwrap();
    let (_, response) = conn.frame().await;
    let r = card_result(&response);
    assert_eq!((r.status, r.balance), (Status::Replay, Amount(900)));
    // A top-up that reuses the ATC is a replay too.
    let top_up = Request::TopUp {
        auth: card.auth_at(MessageType::TopUp, 50, "kiosk-1", card.atc),
        amount: Amount(50),
    };
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let r = card_result(&kiosk.call(&top_up).await);
    assert_eq!(r.status, Status::Replay);
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    assert_eq!(balance_of(&mut reader, &card).await, 900);
    let r = card_result(&reader.call(&card.purchase(1, "reader-1")).await);
    assert_eq!((r.status, r.balance, r.atc.0), (Status::Approved, Amount(899), 2));
    drop((conn, kiosk, reader));
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.purchases, 101);
}

// ---------------------------------------------------------------------------------------------
// Disk trouble.

/// (seq, batch_start) of every consistent record header in a journal directory, read from the
/// raw segment files without checking CRCs, so a half-written last record still shows its batch
/// (format in src/journal/mod.rs), and whether a header after them was unreadable.
fn raw_record_headers(dir: &Path) -> (Vec<(u64, u64)>, bool) {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for path in segments {
        let data = std::fs::read(&path).unwrap();
        let mut off = 32usize;
        while off + 56 <= data.len() {
            let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            let seq = u64::from_le_bytes(data[off + 8..off + 16].try_into().unwrap());
            let batch_start = u64::from_le_bytes(data[off + 16..off + 24].try_into().unwrap());
            let (prev_seq, prev_batch) = out.last().copied().unwrap_or((0, 0));
            if seq != prev_seq + 1 || !(batch_start == seq || batch_start == prev_batch) {
                return (out, true);
            }
            out.push((seq, batch_start));
            off += (56 + len).div_ceil(8) * 8;
        }
    }
    (out, false)
}

fn journal_entries(data: &Path, shard: u16) -> BTreeMap<u64, Entry> {
    let mut entries = BTreeMap::new();
    citycard::journal::read_all(&data.join(format!("shard-{shard}/journal")), |seq, payload| {
        entries.insert(seq, Entry::decode(payload).unwrap());
        Ok(())
    })
    .unwrap();
    entries
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum DiskFault {
    SyncEio,
    WriteEnospc,
}

async fn storage_failure_case(fault: DiskFault) {
    let env = Env::new();
    let faults = Arc::new(FaultInjector::new());
    // One shard: after its failure nothing at all may be acknowledged.
    let config = Config { shards: Some(1), journal_faults: Some(faults.clone()), ..env.config() };
    let server = start(config.clone()).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..4 {
        cards.push(issue(&mut counter, op_ref, 10_000).await);
    }
    let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
    // Every request: (card index, amount, bytes); answers by request id.
    let mut requests: Vec<(usize, i64, Vec<u8>)> = Vec::new();
    let mut answers: HashMap<u32, citycard_protocol::CardResult> = HashMap::new();
    let mut in_flight = 0usize;
    let mut armed = false;
    let mut internal = None;
    let started = Instant::now();
    while internal.is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "the fault never stopped the server");
        while in_flight < 8 && requests.len() < 5_000 {
            let i = requests.len() % cards.len();
            let amount = 1 + (requests.len() % 7) as i64;
            let id = requests.len() as u32 + 1;
            let bytes = encode(&cards[i].purchase(amount, "reader-1"), id);
            if conn.write(&bytes).await.is_err() {
                break;
            }
            requests.push((i, amount, bytes));
            in_flight += 1;
        }
        match conn.read(Duration::from_secs(10)).await {
            Read::Frame(id, Response::Error { code, .. }) => {
                assert_eq!(code, ErrorCode::Internal as u16, "unexpected error frame");
                assert_eq!(id, RequestId(0));
                internal = Some(requests.len());
            }
            Read::Frame(id, response) => {
                let r = card_result(&response);
                assert_eq!(r.status, Status::Approved, "{r:?}");
                assert!(answers.insert(id.0, r).is_none(), "two answers for {id:?}");
                in_flight -= 1;
            }
            Read::Closed => panic!("closed without Error Internal"),
            Read::Timeout => panic!("no answer and no Error Internal"),
        }
        if !armed && answers.len() >= 40 {
            match fault {
                DiskFault::SyncEio => faults.fail_next_sync_with(libc::EIO),
                DiskFault::WriteEnospc => faults.fail_next_write_with(libc::ENOSPC),
            }
            armed = true;
        }
    }
    // Nothing after the Error frame: the connection is closed.
    conn.assert_closed().await;
    assert_eq!(faults.triggered(), 1);
    assert!(server.has_failed());
    // Requests on a fresh connection are not approved either.
    let mut late = Client::connect(&env.keys, addr, "reader-1").await;
    let late_request = cards[0].clone().purchase(1, "reader-1");
    let late_id = late.send(&late_request).await;
    match late.recv().await {
        None => {}
        Some((_, Response::Error { code, .. })) => assert_eq!(code, ErrorCode::Internal as u16),
        Some((id, Response::Purchase(r))) => {
            assert_eq!(id, late_id);
            assert_ne!(r.status, Status::Approved, "approved after the storage failure");
        }
        Some(other) => panic!("{other:?}"),
    }
    drop((conn, counter, late));
    assert!(server.stop().await.is_err(), "stop must report the storage failure");

    // The failed batch is the last one in the journal; no answer came from it.
    let (headers, broken_header) = raw_record_headers(&env.data.join("shard-0/journal"));
    let last = headers.last().copied().expect("records in the journal");
    // The last readable header belongs to the failed batch, unless the failed write stopped
    // inside the header of its first record: then only "after the last record" is known.
    let failed_batch = if broken_header { last.0 + 1 } else { last.1 };
    let journal = journal_entries(&env.data, 0);
    for (id, r) in &answers {
        assert!(
            r.journal_seq < failed_batch,
            "request {id} answered from the failed batch {failed_batch}: {r:?}"
        );
        let e = journal.get(&r.journal_seq).unwrap_or_else(|| panic!("answer {r:?} not journaled"));
        assert_eq!(
            (e.status, e.card_id, e.atc, e.balance_after),
            (r.status, r.card_id, r.atc, r.balance)
        );
    }

    // Restart without faults: recovery, then every unanswered request retried unchanged.
    let server = start(Config { journal_faults: None, ..config }).await;
    let addr = server.local_addr;
    let mut retry = Raw::connect(&env.keys, addr, "reader-1").await;
    let unanswered: Vec<u32> =
        (1..=requests.len() as u32).filter(|id| !answers.contains_key(id)).collect();
    let mut resolved_approved = 0;
    let mut spent = vec![0i64; cards.len()];
    for id in answers.keys() {
        let (card, amount, _) = &requests[*id as usize - 1];
        spent[*card] += amount;
    }
    for id in &unanswered {
        let (card, amount, bytes) = &requests[*id as usize - 1];
        retry.write(bytes).await.unwrap();
        let (got, response) = retry.frame().await;
        assert_eq!(got.0, *id);
        let r = card_result(&response);
        match r.status {
            Status::Approved => {
                resolved_approved += 1;
                spent[*card] += amount;
            }
            other => panic!("retry of {id} declined: {other:?}"),
        }
    }
    for (id, r) in answers.iter().take(20) {
        retry.write(&requests[*id as usize - 1].2).await.unwrap();
        let (_, response) = retry.frame().await;
        assert_eq!(card_result(&response), *r, "retry of answered request {id}");
    }
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    for (i, card) in cards.iter().enumerate() {
        assert_eq!(balance_of(&mut reader, card).await, 10_000 - spent[i], "card {i}");
    }
    eprintln!(
        "{fault:?}: {} sent, {} answered before the failure, {} unanswered, all resolved by retry ({} approved); failed batch from seq {failed_batch}",
        requests.len(),
        answers.len(),
        unanswered.len(),
        resolved_approved
    );
    drop((retry, reader));
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.totals.purchases, spent.iter().sum::<i64>());
    assert_eq!(report.totals.balances, 40_000 - spent.iter().sum::<i64>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_stops_acknowledging_and_recovers_on_restart() {
    storage_failure_case(DiskFault::SyncEio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_stops_acknowledging_and_recovers_on_restart() {
    storage_failure_case(DiskFault::WriteEnospc).await;
}

/// With two shards, one shard's storage failure must stop the whole server from acknowledging:
/// connections opened afterwards get Error Internal, never an approval from the other shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_storage_failure_no_connection_gets_an_approval() {
    let env = Env::new();
    let faults = Arc::new(FaultInjector::new());
    let config = Config { journal_faults: Some(faults.clone()), ..env.config() };
    let server = start(config).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut cards: Vec<Card> = Vec::new();
    for op_ref in 0..8 {
        cards.push(issue(&mut counter, op_ref, 10_000).await);
    }
    let shard_of = |c: &Card| citycard::engine::shard_of(c.id, 2);
    assert!(cards.iter().any(|c| shard_of(c) == 0) && cards.iter().any(|c| shard_of(c) == 1));
    // Fail the next sync, caused by one purchase.
    faults.fail_next_sync_with(libc::EIO);
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    let first = cards[0].purchase(1, "reader-1");
    reader.send(&first).await;
    match reader.recv().await {
        Some((_, Response::Error { code, .. })) => assert_eq!(code, ErrorCode::Internal as u16),
        other => panic!("expected Error Internal, got {other:?}"),
    }
    assert!(server.has_failed());
    let mut approvals = Vec::new();
    for round in 0..20 {
        let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
        let mut out = Vec::new();
        for (i, card) in cards.iter_mut().enumerate() {
            out.extend(encode(&card.purchase(1, "reader-1"), i as u32 + 1));
        }
        let _ = conn.write(&out).await;
        loop {
            match conn.read(Duration::from_secs(5)).await {
                Read::Frame(_, Response::Purchase(r)) if r.status == Status::Approved => {
                    approvals.push((round, r.card_id, r.journal_seq))
                }
                Read::Frame(_, _) => {}
                Read::Closed => break,
                Read::Timeout => panic!("connection neither answered nor closed"),
            }
        }
    }
    drop((reader, counter));
    let _ = server.stop().await;
    assert!(
        approvals.is_empty(),
        "{} approvals after the storage failure, e.g. {:?}",
        approvals.len(),
        &approvals[..approvals.len().min(3)]
    );
}

/// Frames that arrived complete but wait because the connection is at its in-flight limit are
/// the server's back-pressure, not a slow client: the frame timeout must not cut them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_frames_waiting_behind_the_in_flight_limit_are_not_timed_out() {
    let env = Env::new();
    // A 1 ms frame timeout: any reply slower than that exposes a timer started on waiting frames.
    let config = Config { max_in_flight: 1, frame_timeout_ms: 1, ..env.config() };
    let server = start(config).await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..10 {
        cards.push(issue(&mut counter, op_ref, 1_000).await);
    }
    let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
    let mut out = Vec::new();
    for round in 0..20 {
        for (i, card) in cards.iter_mut().enumerate() {
            out.extend(encode(&card.purchase(1, "reader-1"), (round * 10 + i + 1) as u32));
        }
    }
    // 12,000 bytes: one TLS record, so every frame arrives complete at once.
    assert_eq!(out.len(), 200 * 60);
    conn.write(&out).await.unwrap();
    let mut answered = HashSet::new();
    for _ in 0..200 {
        let (id, response) = conn.frame().await;
        assert!(
            error_code(&response).is_none(),
            "after {} answers: {response:?} (request id {id:?})",
            answered.len()
        );
        assert_eq!(card_result(&response).status, Status::Approved);
        assert!(answered.insert(id.0));
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_id_already_in_flight_is_refused_without_closing() {
    let env = Env::new();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 1_000).await;
    let mut conn = Raw::connect(&env.keys, addr, "reader-1").await;
    // Two purchases with the same id in one write: the second is decoded while the first is
    // still at its shard.
    let mut out = encode(&card.purchase(10, "reader-1"), 5);
    out.extend(encode(&card.purchase(20, "reader-1"), 5));
    conn.write(&out).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(conn.frame().await);
    }
    assert!(got.iter().all(|(id, _)| *id == RequestId(5)));
    let codes: Vec<Option<u16>> = got.iter().map(|(_, r)| error_code(r)).collect();
    assert!(codes.contains(&Some(ErrorCode::DuplicateRequestId as u16)), "{got:?}");
    let approved = got.iter().find(|(_, r)| error_code(r).is_none()).expect("first answered");
    assert_eq!(card_result(&approved.1).balance, Amount(990));
    // Still open.
    conn.write(&encode(&Request::Hello { client_time_ms: 0 }, 6)).await.unwrap();
    assert!(matches!(conn.frame().await, (RequestId(6), Response::ServerInfo(_))));
    server.stop().await.unwrap();
}
