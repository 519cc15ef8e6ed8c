//! History retention over the real server (PROTOCOL.md 6.1): pages end before the first entry
//! older than `history_retention_days`, pointing at it, and a request for it is answered
//! BeyondRetention with the card's balance and a real MAC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use citycard::server::RunningServer;
use citycard_protocol::crypto::response_mac_ok;
use citycard_protocol::{
    Amount, Atc, EntryKind, HistoryPage, MessageType, OfflineRecord, Request, Response, Status,
};
use common::{issue, Card, Client, Env};

const DAY_MS: u64 = 86_400_000;

async fn history(kiosk: &mut Client, card: &Card, before_seq: u64) -> HistoryPage {
    let auth = card.auth_at(MessageType::History, 0, "kiosk-1", card.atc + 1);
    let page = match kiosk.call(&Request::History { auth, before_seq, limit: 16 }).await {
        Response::History(page) => page,
        other => panic!("{other:?}"),
    };
    let mut body = BytesMut::new();
    Response::History(page.clone()).encode_body(&mut body).unwrap();
    let mac_ok =
        response_mac_ok(&card.key, MessageType::HistoryPage as u8, &auth.cryptogram, &body);
    assert!(mac_ok, "the page is authenticated: {page:?}");
    page
}

#[tokio::test]
async fn history_past_the_retention_is_answered_beyond_retention() {
    let env = Env::new();
    let mut config = env.config();
    config.limits.history_retention_days = 2;
    let server = RunningServer::start(config).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let mut card = issue(&mut counter, 1, 1_000).await;

    // An offline record used three days ago (uploaded now), then two purchases today.
    card.atc += 1;
    let time_ms = citycard::now_ms() - 3 * DAY_MS;
    let certificate =
        card.key.offline_certificate(card.id, Atc(card.atc), Amount(100), time_ms, 9, "reader-1");
    let record = OfflineRecord {
        card_id: card.id,
        atc: Atc(card.atc),
        amount: Amount(100),
        time_ms,
        nonce: 9,
        certificate,
    };
    match reader.call(&Request::OfflineBatch { records: vec![record] }).await {
        Response::OfflineBatch(results) => assert_eq!(results[0].status, Status::Approved),
        other => panic!("{other:?}"),
    }
    for _ in 0..2 {
        match reader.call(&card.purchase(10, "reader-1")).await {
            Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }

    // The first page holds today's purchases and points at the old record.
    let page = history(&mut kiosk, &card, 0).await;
    assert_eq!(page.status, Status::Approved);
    let kinds: Vec<_> = page.entries.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EntryKind::Purchase, EntryKind::Purchase]);
    assert_eq!(page.next_before_seq, page.entries[1].journal_seq);
    // Asking past it: BeyondRetention, no entries, the balance, a MAC.
    let beyond = history(&mut kiosk, &card, page.next_before_seq).await;
    assert_eq!(beyond.status, Status::BeyondRetention);
    assert!(beyond.entries.is_empty());
    assert_eq!((beyond.balance, beyond.next_before_seq), (Amount(880), 0));

    // The card's issue was today too, but it lies behind the old record: the walk stops at
    // the first entry past the retention, newest first. With a longer retention it is all there.
    server.stop().await.unwrap();
    let mut config = env.config();
    config.limits.history_retention_days = 4;
    let server = RunningServer::start(config).await.unwrap();
    let mut kiosk = Client::connect(&env.keys, server.local_addr, "kiosk-1").await;
    let page = history(&mut kiosk, &card, 0).await;
    let kinds: Vec<_> = page.entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EntryKind::Purchase, EntryKind::Purchase, EntryKind::Offline, EntryKind::Issue]
    );
    assert_eq!((page.status, page.next_before_seq), (Status::Approved, 0));
    server.stop().await.unwrap();
}
