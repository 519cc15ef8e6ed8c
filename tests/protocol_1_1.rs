//! Protocol 1.1: one test for each place where a client written from PROTOCOL.md 1.0 alone went
//! wrong (the spec's "Changes in 1.1" list), over mutual TLS against the real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::BytesMut;
use citycard_protocol::{
    decode_response, Amount, Atc, BlockReason, CardId, CardResult, CardState, ErrorCode,
    MessageType, OfflineRecord, Request, RequestId, Response, StaffResult, Status, ATC_LATE_WINDOW,
};
use common::{balance_of, issue, Card, Client, Env, READ_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn card_result(response: &Response) -> CardResult {
    match response {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => *r,
        other => panic!("expected a card result, got {other:?}"),
    }
}

fn staff_result(response: &Response) -> StaffResult {
    match response {
        Response::Block(r) | Response::Unblock(r) | Response::Close(r) => *r,
        other => panic!("expected a staff result, got {other:?}"),
    }
}

fn encode(request: &Request, id: u32) -> Vec<u8> {
    let mut out = BytesMut::new();
    request.encode(RequestId(id), &mut out).unwrap();
    out.to_vec()
}

fn purchase_at(card: &Card, atc: u32, amount: i64) -> Request {
    Request::Purchase {
        auth: card.auth_at(MessageType::Purchase, amount, "reader-1", atc),
        amount: Amount(amount),
    }
}

fn offline_record(card: &mut Card, amount: i64, terminal: &str) -> OfflineRecord {
    card.atc += 1;
    let (atc, time_ms, nonce) = (Atc(card.atc), 1_767_225_600_000, 900 + u64::from(card.atc));
    OfflineRecord {
        card_id: card.id,
        atc,
        amount: Amount(amount),
        time_ms,
        nonce,
        certificate: card.key.offline_certificate(
            card.id,
            atc,
            Amount(amount),
            time_ms,
            nonce,
            terminal,
        ),
    }
}

/// Reads frames until the server closes; returns them and whether the close was clean
/// (TLS close_notify) rather than a bare TCP close.
async fn read_to_close(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (Vec<(RequestId, Response)>, bool) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    loop {
        while let Some(found) = decode_response(&mut buf).expect("server sent a malformed frame") {
            frames.push(found);
        }
        let read = tokio::time::timeout(READ_TIMEOUT, stream.read_buf(&mut buf))
            .await
            .expect("server did not close in time");
        match read {
            Ok(0) => return (frames, true),
            Ok(_) => {}
            Err(_) => return (frames, false),
        }
    }
}

/// 1.1 item 1: four purchases pipelined, then in the same write a frame the server must close
/// on. All four were executed, so all four are answered before the Error frame.
#[tokio::test]
async fn closing_error_answers_requests_accepted_before_it() {
    let env = Env::new();
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let bad_frames: [(&str, Vec<u8>, ErrorCode); 4] = [
        ("bad magic", b"XX\x01\x02\0\0\0\0\0\0\0\x09\0\0\0\0".to_vec(), ErrorCode::BadMagic),
        ("bad version", b"CC\x07\x02\0\0\0\0\0\0\0\x09\0\0\0\0".to_vec(), ErrorCode::BadVersion),
        (
            "unassigned type",
            b"CC\x01\x7e\0\0\0\0\0\0\0\x09\0\0\0\0".to_vec(),
            ErrorCode::UnknownType,
        ),
        (
            "length over the maximum",
            b"CC\x01\x02\0\0\0\0\0\0\0\x09\xff\xff\xff\xff".to_vec(),
            ErrorCode::FrameTooLarge,
        ),
    ];
    for (n, (what, bad, code)) in bad_frames.into_iter().enumerate() {
        let mut card = issue(&mut counter, 100 + n as u64, 1_000).await;
        let config = citycard::tls::client_config(&env.keys, "reader-1").unwrap();
        let mut stream = common::connect_with(server.local_addr, config).await.unwrap();
        let mut bytes = Vec::new();
        for id in 1..=4 {
            bytes.extend(encode(&card.purchase(10, "reader-1"), id));
        }
        bytes.extend(bad);
        stream.write_all(&bytes).await.unwrap();
        stream.flush().await.unwrap();
        let (frames, clean) = read_to_close(&mut stream).await;
        assert_eq!(frames.len(), 5, "{what}: four answers and the Error: {frames:?}");
        let answered: BTreeSet<u32> = frames[..4]
            .iter()
            .map(|(id, r)| {
                assert_eq!(card_result(r).status, Status::Approved, "{what}");
                id.0
            })
            .collect();
        assert_eq!(answered, BTreeSet::from([1, 2, 3, 4]), "{what}");
        match &frames[4].1 {
            Response::Error { code: got, .. } => assert_eq!(*got, code as u16, "{what}"),
            other => panic!("{what}: expected the Error frame last, got {other:?}"),
        }
        assert!(clean, "{what}: the server ends with close_notify");
        assert_eq!(balance_of(&mut kiosk, &card).await, 960, "{what}");
    }
    server.stop().await.unwrap();
}

/// 1.1 item 2: an ATC answered Busy was never used, so it stays usable after a later ATC of the
/// same card was decided; it can be retried with the same bytes (the order Busy leaves behind is
/// reproduced here by sending ATC 2 before ATC 1). Used ATCs, ATC 0 and ATCs further below
/// than the late window stay Replay.
#[tokio::test]
async fn a_late_unused_atc_is_decided_and_retries_keep_their_answer() {
    let env = Env::new();
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let card = issue(&mut counter, 1, 10_000).await;

    let second = card_result(&reader.call(&purchase_at(&card, 2, 20)).await);
    assert_eq!((second.status, second.balance.0), (Status::Approved, 9_980));
    let first = purchase_at(&card, 1, 10);
    let late = reader.call(&first).await;
    assert_eq!(card_result(&late).status, Status::Approved, "the overtaken ATC is still usable");
    assert_eq!(card_result(&late).balance.0, 9_970);
    assert_eq!(reader.call(&first).await, late, "a retry of the late ATC gets its answer");
    let reused = card_result(&reader.call(&purchase_at(&card, 1, 11)).await);
    assert_eq!((reused.status, reused.journal_seq), (Status::Replay, 0));
    let zero = card_result(&reader.call(&purchase_at(&card, 0, 1)).await);
    assert_eq!(zero.status, Status::Replay, "ATC 0 is never valid online");

    // The window: ATC 200 decided, then ATC 200 - 64 is too old and 200 - 63 is not.
    let top = 200;
    assert_eq!(
        card_result(&reader.call(&purchase_at(&card, top, 1)).await).status,
        Status::Approved
    );
    let stale = card_result(&reader.call(&purchase_at(&card, top - ATC_LATE_WINDOW, 1)).await);
    assert_eq!(stale.status, Status::Replay);
    let inside = card_result(&reader.call(&purchase_at(&card, top - ATC_LATE_WINDOW + 1, 1)).await);
    assert_eq!(inside.status, Status::Approved);

    // Exactly-once holds across a restart, and the journal passes the audit.
    drop(reader);
    drop(counter);
    server.stop().await.unwrap();
    let server = env.start().await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    assert_eq!(reader.call(&first).await, late);
    drop(reader);
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "verify: {:?}", report.problems);
}

/// 1.1 item 2, under real Busy answers: a queue of one, one card's purchases pipelined; every
/// Busy one is retried with its same bytes until decided. None may end as Replay.
#[tokio::test]
async fn busy_answers_retried_with_the_same_bytes_are_never_replays() {
    let env = Env::new();
    let mut config = env.config();
    config.queue_depth = 1;
    let server = citycard::server::RunningServer::start(config).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 100_000).await;
    let config = citycard::tls::client_config(&env.keys, "reader-1").unwrap();
    let mut stream = common::connect_with(server.local_addr, config).await.unwrap();
    let requests: Vec<Request> = (0..48).map(|_| card.purchase(1, "reader-1")).collect();
    let mut waiting: BTreeSet<u32> = (0..requests.len() as u32).collect();
    let (mut busy, mut rounds) = (0, 0);
    let mut buf = BytesMut::new();
    while !waiting.is_empty() {
        rounds += 1;
        assert!(rounds <= 200, "still Busy after 200 rounds");
        let mut bytes = Vec::new();
        for i in &waiting {
            bytes.extend(encode(&requests[*i as usize], *i));
        }
        stream.write_all(&bytes).await.unwrap();
        stream.flush().await.unwrap();
        let (mut answers, sent) = (0, waiting.len());
        while answers < sent {
            if let Some((id, response)) = decode_response(&mut buf).unwrap() {
                answers += 1;
                let r = card_result(&response);
                match r.status {
                    Status::Busy => busy += 1,
                    Status::Approved => {
                        waiting.remove(&id.0);
                    }
                    other => panic!("request {} answered {other:?}", id.0),
                }
                continue;
            }
            let n = tokio::time::timeout(READ_TIMEOUT, stream.read_buf(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "server closed");
        }
    }
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    assert_eq!(balance_of(&mut kiosk, &card).await, 100_000 - 48);
    println!("{busy} Busy answers over {rounds} rounds, every one retried to Approved");
    drop((stream, kiosk, counter));
    server.stop().await.unwrap();
}

/// 1.1 item 3: a stolen card overdrawn offline can be closed (no refund, the debt stays on the
/// closed card) or replaced (the new card starts at 0, the debt stays on the old card), and it
/// stays on the hotlist. An overdrawn card that is not blocked still has to be topped up first.
#[tokio::test]
async fn a_blocked_debtor_is_closed_or_replaced_with_its_debt_kept() {
    let env = Env::new();
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let mut op_ref = 100;
    let mut next_ref = || {
        op_ref += 1;
        op_ref
    };

    let mut stolen = Vec::new();
    for _ in 0..2 {
        let mut card = issue(&mut counter, next_ref(), 100).await;
        let block =
            Request::Block { op_ref: next_ref(), card_id: card.id, reason: BlockReason::Stolen };
        assert_eq!(staff_result(&counter.call(&block).await).status, Status::Approved);
        let record = offline_record(&mut card, 300, "reader-1");
        match reader.call(&Request::OfflineBatch { records: vec![record] }).await {
            Response::OfflineBatch(results) => {
                assert_eq!((results[0].status, results[0].balance.0), (Status::Approved, -200))
            }
            other => panic!("{other:?}"),
        }
        let top_up = card_result(&kiosk.call(&card.top_up(500, "kiosk-1")).await);
        assert_eq!(top_up.status, Status::CardBlocked, "a blocked card cannot be topped up");
        stolen.push(card);
    }

    let close = staff_result(
        &counter.call(&Request::Close { op_ref: next_ref(), card_id: stolen[0].id }).await,
    );
    assert_eq!(close.status, Status::Approved);
    assert_eq!((close.refunded.0, close.balance.0, close.card_state), (0, -200, CardState::Closed));
    assert_ne!(close.hotlist_version, 0, "re-listed with reason Retired");

    match counter.call(&Request::Replace { op_ref: next_ref(), card_id: stolen[1].id }).await {
        Response::Replace(r) => {
            assert_eq!(r.status, Status::Approved);
            assert_eq!(r.balance.0, 0, "the debt does not move to the new card");
            assert_eq!(r.replaced_card_id, stolen[1].id);
            let mut fresh = Card::from_issue(&r);
            assert_eq!(balance_of(&mut kiosk, &fresh).await, 0);
            let r = card_result(&kiosk.call(&fresh.top_up(50, "kiosk-1")).await);
            assert_eq!((r.status, r.balance.0), (Status::Approved, 50));
        }
        other => panic!("{other:?}"),
    }
    for card in &mut stolen {
        let r = card_result(&kiosk.call(&card.top_up(500, "kiosk-1")).await);
        assert_eq!(r.status, Status::CardClosed);
    }

    // Both stay listed: the last hotlist entry of each says listed, reason Retired.
    match reader.call(&Request::HotlistSync { cursor: Vec::new(), max_entries: 0 }).await {
        Response::HotlistSync(changes) => {
            for card in &stolen {
                let last = changes
                    .entries
                    .iter()
                    .filter(|e| e.card_id == card.id)
                    .max_by_key(|e| e.version);
                let last = last.expect("the card is on the hotlist");
                assert!(last.listed);
                assert_eq!(last.reason, BlockReason::Retired);
            }
        }
        other => panic!("{other:?}"),
    }

    // Not blocked, overdrawn: InvalidState, top up first (the old rule).
    let mut debtor = issue(&mut counter, next_ref(), 100).await;
    let record = offline_record(&mut debtor, 150, "reader-1");
    reader.call(&Request::OfflineBatch { records: vec![record] }).await;
    let close = staff_result(
        &counter.call(&Request::Close { op_ref: next_ref(), card_id: debtor.id }).await,
    );
    assert_eq!((close.status, close.card_state), (Status::InvalidState, CardState::Overdrawn));

    drop((counter, reader, kiosk));
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.ok(), "verify: {:?}", report.problems);
    assert_eq!(report.totals.refunds, 0);
}

/// 1.1 item 4: requests of one card pipelined on one connection are executed in the order they
/// were sent (the ATCs climb, so no purchase is declined and balances fall in order).
#[tokio::test]
async fn one_cards_pipelined_requests_run_in_order() {
    let env = Env::new();
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 10_000).await;
    let config = citycard::tls::client_config(&env.keys, "reader-1").unwrap();
    let mut stream = common::connect_with(server.local_addr, config).await.unwrap();
    let mut bytes = Vec::new();
    for id in 1..=40u32 {
        bytes.extend(encode(&card.purchase(i64::from(id), "reader-1"), id));
    }
    stream.write_all(&bytes).await.unwrap();
    stream.flush().await.unwrap();
    let mut buf = BytesMut::new();
    let mut results = std::collections::BTreeMap::new();
    while results.len() < 40 {
        if let Some((id, response)) = decode_response(&mut buf).unwrap() {
            results.insert(id.0, card_result(&response));
            continue;
        }
        let n =
            tokio::time::timeout(READ_TIMEOUT, stream.read_buf(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "server closed");
    }
    let mut balance = 10_000;
    let mut seq = 0;
    for (id, r) in results {
        balance -= i64::from(id);
        assert_eq!((r.status, r.atc.0, r.balance.0), (Status::Approved, id, balance));
        assert!(r.journal_seq > seq, "journaled in the order sent");
        seq = r.journal_seq;
    }
    drop((stream, counter));
    server.stop().await.unwrap();
}

/// 1.1 item 5: journal_seq counts per shard; (shard, journal_seq) is the unique reference, with
/// the shard computed from the card id.
#[tokio::test]
async fn journal_seq_is_per_shard() {
    let env = Env::new();
    let mut config = env.config();
    config.shards = Some(4);
    let server = citycard::server::RunningServer::start(config).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut seen = BTreeSet::new();
    let mut seqs = Vec::new();
    for op_ref in 1..=16 {
        match counter.call(&Request::Issue { op_ref, deposit: Amount(1) }).await {
            Response::Issue(r) => {
                let shard = (r.card_id.0 - 6_000_000_000_000_000) % 4;
                assert_eq!(shard, u64::from(citycard::engine::shard_of(r.card_id, 4)));
                assert!(seen.insert((shard, r.journal_seq)), "(shard, seq) is unique");
                seqs.push(r.journal_seq);
            }
            other => panic!("{other:?}"),
        }
    }
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    assert!(distinct.len() < seqs.len(), "the same seq appears on different shards: {seqs:?}");
    drop(counter);
    server.stop().await.unwrap();
}

/// 1.1 item 6, the small ones that change what a terminal sees.
#[tokio::test]
async fn the_small_rules_hold() {
    let env = Env::new();
    let mut config = env.config();
    // Key version 1 is past its cut-off from the start.
    config.key_cutoffs = vec![(1, 1)];
    let server = citycard::server::RunningServer::start(config).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut card = issue(&mut counter, 1, 500).await;

    // Reads are exempt from the key cut-off; consuming requests are not.
    assert_eq!(balance_of(&mut kiosk, &card).await, 500);
    let history = Request::History {
        auth: card.auth_at(MessageType::History, 0, "kiosk-1", 1),
        before_seq: 0,
        limit: 0,
    };
    match kiosk.call(&history).await {
        Response::History(page) => assert_eq!(page.status, Status::Approved),
        other => panic!("{other:?}"),
    }
    let r = card_result(&reader.call(&card.purchase(1, "reader-1")).await);
    assert_eq!(r.status, Status::KeyVersionRetired);

    // A declined Replace echoes the requested card in replaced_card_id, card_id 0.
    let unknown = CardId(card.id.0 + 4_000);
    match counter.call(&Request::Replace { op_ref: 2, card_id: unknown }).await {
        Response::Replace(r) => {
            assert_eq!(
                (r.status, r.card_id, r.replaced_card_id),
                (Status::UnknownCard, CardId(0), unknown)
            )
        }
        other => panic!("{other:?}"),
    }
    drop((counter, kiosk, reader));
    server.stop().await.unwrap();

    // Check order: a blocked card that also lacks funds is CardBlocked; a top-up of a blocked
    // card over the cap is CardBlocked too.
    let env = Env::new();
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let cap = citycard::config::Config::default().limits.max_balance;
    let mut poor = issue(&mut counter, 1, 5).await;
    let mut full = issue(&mut counter, 2, cap - 10).await;
    for (op_ref, card) in [(3, &poor), (4, &full)] {
        let block = Request::Block { op_ref, card_id: card.id, reason: BlockReason::Lost };
        assert_eq!(staff_result(&counter.call(&block).await).status, Status::Approved);
    }
    let r = card_result(&reader.call(&poor.purchase(100, "reader-1")).await);
    assert_eq!(r.status, Status::CardBlocked, "CardBlocked before InsufficientFunds");
    let r = card_result(&kiosk.call(&full.top_up(50, "kiosk-1")).await);
    assert_eq!(r.status, Status::CardBlocked, "CardBlocked before OverBalanceCap");

    // A TLS connection without ALPN: closed after the handshake, no frame, no close_notify.
    let config = citycard::tls::client_config(&env.keys, "reader-1").unwrap();
    let mut no_alpn = (*config).clone();
    no_alpn.alpn_protocols.clear();
    let mut stream =
        common::connect_with(server.local_addr, std::sync::Arc::new(no_alpn)).await.unwrap();
    let _ = stream.write_all(&encode(&Request::Hello { client_time_ms: 0 }, 1)).await;
    let _ = stream.flush().await;
    let (frames, clean) = read_to_close(&mut stream).await;
    assert!(frames.is_empty(), "no frame: {frames:?}");
    assert!(!clean, "no close_notify");
    drop((counter, kiosk, reader, stream));
    server.stop().await.unwrap();
}

/// Found by a client written from PROTOCOL.md 1.1 alone: a terminal that stops reading until
/// the write timeout got, once it read again, answers twice and a frame cut in half, then a clean
/// close_notify. Now every request id comes at most once, frames are never garbled, and the
/// connection ends without close_notify. (This test guards the behaviour; the old failure needed
/// the terminal to resume reading inside the second write, which it does not hit reliably.)
#[tokio::test]
async fn a_write_timeout_never_repeats_or_garbles_answers() {
    let env = Env::new();
    let mut config = env.config();
    config.write_timeout_ms = 1_000;
    let server = citycard::server::RunningServer::start(config).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut card = issue(&mut counter, 1, 50_000).await;
    for _ in 0..70 {
        reader.call(&card.purchase(1, "reader-1")).await;
    }
    // A socket with a tiny receive buffer, so the server's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.local_addr).await.unwrap();
    let config = citycard::tls::client_config(&env.keys, "kiosk-1").unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    let history = Request::History {
        auth: card.auth_at(MessageType::History, 0, "kiosk-1", card.atc + 1),
        before_seq: 0,
        limit: 64,
    };
    let mut bytes = Vec::new();
    for id in 1..=2_000 {
        bytes.extend(encode(&history, id));
    }
    // The server stops reading at max_in_flight; keep writing in the background.
    let (mut read_half, mut write_half) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let _ = write_half.write_all(&bytes).await;
        write_half
    });
    // Read nothing until the server has given up on the stuck socket, however slowly a loaded
    // machine produces the answers: a fixed pause let a slow server still be writing when the
    // reads began, so its writes never blocked for the timeout and the test waited for a close
    // that had no reason to come. Three connections are open (counter, reader, this one) once
    // the server has counted this one, which it does a little after the handshake.
    let shared = server.shared();
    let open = || shared.connections.load(std::sync::atomic::Ordering::Relaxed);
    let waited = std::time::Instant::now();
    while open() < 3 {
        assert!(waited.elapsed() < Duration::from_secs(60), "the connection was never counted");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while open() > 2 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the write timeout never closed the connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut buf = BytesMut::new();
    let mut seen = BTreeSet::new();
    let clean = loop {
        while let Some((id, response)) =
            decode_response(&mut buf).expect("a garbled frame after the write timeout")
        {
            assert!(seen.insert(id.0), "request id {} answered twice", id.0);
            assert!(matches!(response, Response::History(_)), "{response:?}");
        }
        match tokio::time::timeout(READ_TIMEOUT, read_half.read_buf(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break false,
            Err(_) => panic!("the server neither answered nor closed"),
        }
    };
    assert!(!clean, "a connection cut for not reading ends without close_notify");
    assert!(seen.len() < 2_000, "the test must have hit the write timeout");
    writer.abort();
    drop((read_half, counter, reader));
    server.stop().await.unwrap();
}

/// Found by a client written from PROTOCOL.md 1.1 alone: a frame with a request id still in
/// flight and a malformed body got the body's error with that id, so the terminal could not tell
/// which request it belonged to. The id is checked first: DuplicateRequestId.
#[tokio::test]
async fn a_request_id_in_flight_is_refused_before_its_body_is_read() {
    let env = Env::new();
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 50_000).await;
    let config = citycard::tls::client_config(&env.keys, "reader-1").unwrap();
    let mut stream = common::connect_with(server.local_addr, config).await.unwrap();
    // Many purchases in flight, then a too-short Purchase body reusing the first one's id.
    let mut bytes = Vec::new();
    for id in 1..=32u32 {
        bytes.extend(encode(&card.purchase(1, "reader-1"), id));
    }
    let mut short = encode(&card.purchase(1, "reader-1"), 1);
    short.truncate(16 + 10);
    short[12..16].copy_from_slice(&10u32.to_be_bytes());
    bytes.extend(short);
    stream.write_all(&bytes).await.unwrap();
    stream.flush().await.unwrap();
    let mut buf = BytesMut::new();
    let mut errors = Vec::new();
    let mut answers = 0;
    while answers < 32 {
        if let Some((id, response)) = decode_response(&mut buf).unwrap() {
            match response {
                Response::Error { code, .. } => errors.push((id.0, code)),
                _ => answers += 1,
            }
            continue;
        }
        let n =
            tokio::time::timeout(READ_TIMEOUT, stream.read_buf(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
    }
    // The 33 frames arrive in one TLS record and are decoded before any answer is taken in, so
    // request 1 is in flight when the short frame is read.
    assert_eq!(errors, vec![(1, ErrorCode::DuplicateRequestId as u16)]);
    drop((stream, counter));
    server.stop().await.unwrap();
}
