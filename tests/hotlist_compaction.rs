//! Hotlist compaction at read time (PROTOCOL.md 6.5): a terminal starting from an empty cursor
//! gets no entry for a card listed and unlisted again, while a terminal whose cursor lies
//! between the listing and the unlisting still gets the unlisting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use citycard_protocol::{BlockReason, CardId, HotlistChanges, Request, Response, Status};
use common::{issue, Client, Env};

async fn sync(reader: &mut Client, mut cursor: Vec<u64>) -> (Vec<u64>, Vec<HotlistChanges>) {
    let mut pages = Vec::new();
    // Bounded: a handful of entries, one per shard and page at most.
    for _ in 0..64 {
        match reader.call(&Request::HotlistSync { cursor: cursor.clone(), max_entries: 2 }).await {
            Response::HotlistSync(h) => {
                cursor = h.cursor.clone();
                let more = h.more;
                pages.push(h);
                if !more {
                    return (cursor, pages);
                }
            }
            other => panic!("{other:?}"),
        }
    }
    panic!("the hotlist sync did not end");
}

fn mentions(pages: &[HotlistChanges], card: CardId) -> Vec<bool> {
    pages.iter().flat_map(|p| &p.entries).filter(|e| e.card_id == card).map(|e| e.listed).collect()
}

#[tokio::test]
async fn a_card_listed_and_unlisted_again_needs_no_entry_for_a_new_terminal() {
    let env = Env::new();
    let server = env.start().await;
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let mut cards = Vec::new();
    for op_ref in 1..=6 {
        cards.push(issue(&mut counter, op_ref, 100).await.id);
    }
    for (i, &card) in cards.iter().enumerate() {
        let block =
            Request::Block { op_ref: 100 + i as u64, card_id: card, reason: BlockReason::Lost };
        match counter.call(&block).await {
            Response::Block(s) => assert_eq!(s.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }
    let mut mid = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let (mid_cursor, _) = sync(&mut mid, vec![]).await;
    // Unblock all but the first card.
    for (i, &card) in cards.iter().enumerate().skip(1) {
        let unblock = Request::Unblock { op_ref: 200 + i as u64, card_id: card };
        match counter.call(&unblock).await {
            Response::Unblock(s) => assert_eq!(s.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }

    // A new terminal: only the card still listed, and a cursor at the shards' versions.
    let mut fresh = Client::connect(&env.keys, server.local_addr, "reader-1").await;
    let (cursor, pages) = sync(&mut fresh, vec![]).await;
    assert_eq!(mentions(&pages, cards[0]), [true]);
    for &card in &cards[1..] {
        assert!(mentions(&pages, card).is_empty(), "{pages:?}");
    }
    // The mid-way terminal gets every unlisting, and ends at the same cursor.
    let (mid_end, pages) = sync(&mut mid, mid_cursor).await;
    for &card in &cards[1..] {
        assert_eq!(mentions(&pages, card), [false], "{pages:?}");
    }
    assert_eq!(mid_end, cursor);
    // Nothing more for either.
    let (_, pages) = sync(&mut fresh, cursor).await;
    assert!(pages.iter().all(|p| p.entries.is_empty()), "{pages:?}");
    server.stop().await.unwrap();
}
