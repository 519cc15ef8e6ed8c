//! Protocol 1.3 numbered offline uploads (PROTOCOL.md 6.13) over mutual TLS against the real
//! server: exactly-once per (terminal, seq), conflicting seqs refused across shards, the highest
//! seq kept across a restart, and what settlement makes of gaps, refusals and uncertain records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::BytesMut;
use citycard::engine::shard_of;
use citycard::keys::{self, Role, TerminalId};
use citycard::server::RunningServer;
use citycard_protocol::{
    crypto, Amount, Atc, CardResult, ErrorCode, MessageType, NumberedRecord, NumberedResults,
    OfflineRecord, Request, RequestId, Response, Status, FLAG_UNCERTAIN,
};
use common::{balance_of, issue, Card, Client, Env};

const READER: &str = "reader-1";
/// 2026-01-01T00:00:00Z: the time of use the records carry.
const USED_MS: u64 = 1_767_225_600_000;

/// The card's next offline record, numbered `seq` (the card counts its ATC up, as it does).
fn numbered(card: &mut Card, amount: i64, seq: u64, flags: u8) -> NumberedRecord {
    card.atc += 1;
    NumberedRecord { record: record_at(card, card.atc, amount), terminal_seq: seq, flags }
}

fn record_at(card: &Card, atc: u32, amount: i64) -> OfflineRecord {
    let (time_ms, nonce) = (USED_MS + u64::from(atc), 5_000 + u64::from(atc));
    let certificate =
        card.key.offline_certificate(card.id, Atc(atc), Amount(amount), time_ms, nonce, READER);
    OfflineRecord {
        card_id: card.id,
        atc: Atc(atc),
        amount: Amount(amount),
        time_ms,
        nonce,
        certificate,
    }
}

async fn upload(reader: &mut Client, records: &[NumberedRecord]) -> NumberedResults {
    match reader.call(&Request::NumberedOfflineBatch { records: records.to_vec() }).await {
        Response::NumberedOfflineBatch(results) => {
            assert_eq!(results.results.len(), records.len());
            for (sent, got) in records.iter().zip(&results.results) {
                assert_eq!(got.terminal_seq, sent.terminal_seq, "results in request order");
                assert_eq!(got.result.card_id, sent.record.card_id);
            }
            results
        }
        other => panic!("expected NumberedOfflineResults, got {other:?}"),
    }
}

/// Whether `result` carries the MAC of `card`'s key over its 29 bytes, type 0x94, bound to the
/// record's certificate (PROTOCOL.md 6.13).
fn mac_ok(card: &Card, record: &OfflineRecord, result: &CardResult) -> bool {
    let mut body = BytesMut::new();
    Response::Purchase(*result).encode_body(&mut body).unwrap();
    let t = MessageType::NumberedOfflineResults as u8;
    crypto::response_mac_ok(&card.key, t, &record.certificate, &body)
}

/// Cards issued until two live in different shards (2 shards in the test configuration).
async fn two_shards(counter: &mut Client) -> (Card, Card) {
    let first = issue(counter, 1, 1_000).await;
    for op_ref in 2..40 {
        let card = issue(counter, op_ref, 1_000).await;
        if shard_of(card.id, 2) != shard_of(first.id, 2) {
            return (first, card);
        }
    }
    panic!("no card landed in the second shard");
}

/// `env`'s server started, its counter and reader connected, and two cards in different
/// shards.
async fn start_with_two_shards(env: &Env) -> (RunningServer, Client, Client, Card, Card) {
    start_with_two_shards_on(env, env.config()).await
}

/// [`start_with_two_shards`] with `config`.
async fn start_with_two_shards_on(
    env: &Env,
    config: citycard::config::Config,
) -> (RunningServer, Client, Client, Card, Card) {
    let server = RunningServer::start(config).await.unwrap();
    let mut counter = Client::connect(&env.keys, server.local_addr, "counter-1").await;
    let reader = Client::connect(&env.keys, server.local_addr, READER).await;
    let (a, b) = two_shards(&mut counter).await;
    (server, counter, reader, a, b)
}

#[tokio::test]
async fn numbered_uploads_are_exactly_once_per_seq_and_survive_a_restart() {
    let env = Env::new();
    let (server, counter, mut reader, mut a, mut b) = start_with_two_shards(&env).await;

    // Nothing recorded yet: an empty batch answers highest 0.
    assert_eq!(upload(&mut reader, &[]).await.highest_seq, 0);

    // Seqs 1, 2 and 4 (3 is a gap), over both shards.
    let first =
        [numbered(&mut a, 100, 1, 0), numbered(&mut b, 200, 2, 0), numbered(&mut a, 50, 4, 0)];
    let answer = upload(&mut reader, &first).await;
    assert_eq!(answer.highest_seq, 4);
    for (record, got) in first.iter().zip(&answer.results) {
        assert_eq!(got.result.status, Status::Approved);
        assert_ne!(got.result.journal_seq, 0);
        let card = if record.record.card_id == a.id { &a } else { &b };
        assert!(mac_ok(card, &record.record, &got.result), "seq {}", record.terminal_seq);
    }
    assert_eq!(answer.results[2].result.balance, Amount(850));
    assert_eq!(balance_of(&mut reader, &a).await, 850);

    // The same records again: the first results, byte for byte, and no money moves twice.
    let again = upload(&mut reader, &first).await;
    assert_eq!(again, answer);
    assert_eq!(balance_of(&mut reader, &a).await, 850);
    assert_eq!(balance_of(&mut reader, &b).await, 800);

    // Seq 2 again with another record: of the same card's shard (card a is not in b's shard,
    // so this is the conflict only the first phase sees) and of the same card.
    let other_card = NumberedRecord { terminal_seq: 2, ..numbered(&mut a, 10, 0, 0) };
    let same_card = NumberedRecord { terminal_seq: 2, ..numbered(&mut b, 10, 0, 0) };
    let uncertain_now = NumberedRecord { flags: FLAG_UNCERTAIN, ..first[1] };
    for conflicting in [other_card, same_card, uncertain_now] {
        let got = upload(&mut reader, &[conflicting]).await;
        let r = got.results[0].result;
        assert_eq!(
            (r.status, r.balance, r.mac),
            (Status::SeqConflict, Amount(0), Default::default())
        );
        assert_ne!(r.journal_seq, 0, "a refusal is journaled as a note");
        assert_eq!(got.highest_seq, 4);
    }
    assert_eq!(balance_of(&mut reader, &a).await, 850, "a refused record moves nothing");
    assert_eq!(balance_of(&mut reader, &b).await, 800);
    // The ATCs those refused records carried stay unused: the cards' own later records go in.
    let later = [numbered(&mut b, 30, 5, FLAG_UNCERTAIN)];
    let got = upload(&mut reader, &later).await;
    assert_eq!(got.results[0].result.status, Status::Approved);
    assert_eq!(got.results[0].result.balance, Amount(770));

    // Refused records still take their seq: a forged certificate (6) and a replayed ATC (7).
    let mut forged = numbered(&mut a, 40, 6, 0);
    forged.record.certificate.0[0] ^= 1;
    let replayed = NumberedRecord { terminal_seq: 7, ..first[0] };
    let got = upload(&mut reader, &[forged, replayed]).await;
    let statuses: Vec<Status> = got.results.iter().map(|r| r.result.status).collect();
    assert_eq!(statuses, [Status::BadCryptogram, Status::Replay]);
    assert!(got.results.iter().all(|r| r.result.journal_seq != 0));
    assert!(mac_ok(&a, &replayed.record, &got.results[1].result), "a replay is authenticated");
    assert_eq!(got.highest_seq, 7);
    // And re-uploading a refused record answers its first refusal.
    let again = upload(&mut reader, &[forged, replayed]).await;
    assert_eq!(again, got);

    // A batch that numbers its records out of order is malformed (the connection stays open).
    let out_of_order = Request::NumberedOfflineBatch {
        records: vec![numbered(&mut a, 1, 9, 0), numbered(&mut a, 1, 8, 0)],
    };
    match reader.call(&out_of_order).await {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::BadValue as u16),
        other => panic!("expected BadValue, got {other:?}"),
    }
    // Another terminal's seqs are its own.
    let reader2_id = TerminalId::new("reader-2").unwrap();
    keys::issue_terminal(&env.keys, &reader2_id, Role::Reader).unwrap();
    let mut reader2 = Client::connect(&env.keys, server.local_addr, "reader-2").await;
    assert_eq!(upload(&mut reader2, &[]).await.highest_seq, 0);

    counter.close().await;
    reader.close().await;
    reader2.close().await;
    server.stop().await.unwrap();

    // After a restart: the highest seq, and the first answers, are still there.
    let server = env.start().await;
    let mut reader = Client::connect(&env.keys, server.local_addr, READER).await;
    assert_eq!(upload(&mut reader, &[]).await.highest_seq, 7);
    let after = upload(&mut reader, &first).await;
    assert_eq!((after.highest_seq, &after.results), (7, &answer.results));
    let got = upload(&mut reader, &[other_card]).await;
    assert_eq!(got.results[0].result.status, Status::SeqConflict);
    assert_eq!(balance_of(&mut reader, &a).await, 850);
    reader.close().await;
    server.stop().await.unwrap();

    // With the derived state gone, the seqs come back from the journal.
    for shard in 0..2 {
        let state = citycard::server::shard_dir(&env.data, shard).join("state");
        std::fs::remove_dir_all(state).unwrap();
    }
    let server = env.start().await;
    let mut reader = Client::connect(&env.keys, server.local_addr, READER).await;
    let rebuilt = upload(&mut reader, &first).await;
    assert_eq!((rebuilt.highest_seq, &rebuilt.results), (7, &answer.results));
    let got = upload(&mut reader, &[other_card, forged]).await;
    let statuses: Vec<Status> = got.results.iter().map(|r| r.result.status).collect();
    assert_eq!(statuses, [Status::SeqConflict, Status::BadCryptogram]);
    reader.close().await;
    server.stop().await.unwrap();
    let report = citycard::verify::verify(&env.data).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn a_second_numbered_batch_in_flight_is_busy() {
    let env = Env::new();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut card = issue(&mut counter, 1, 10_000).await;
    let mut reader = Client::connect(&env.keys, addr, READER).await;
    let records: Vec<NumberedRecord> =
        (1..=200).map(|seq| numbered(&mut card, 1, seq, 0)).collect();
    // Pipelined: the second batch may arrive while the first is in flight; it is then Busy and
    // nothing of it is decided. Either way, every record is decided exactly once.
    let first = reader.send(&Request::NumberedOfflineBatch { records: records.clone() }).await;
    let second = reader.send(&Request::NumberedOfflineBatch { records: records.clone() }).await;
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let (id, response) = reader.recv().await.unwrap();
        answers.insert(id, response);
    }
    let statuses = |id: RequestId| match &answers[&id] {
        Response::NumberedOfflineBatch(n) => n.results.iter().map(|r| r.result.status).collect(),
        other => panic!("{other:?}"),
    };
    let first: Vec<Status> = statuses(first);
    assert!(first.iter().all(|s| *s == Status::Approved));
    let second: Vec<Status> = statuses(second);
    assert!(
        second.iter().all(|s| *s == Status::Approved) || second.iter().all(|s| *s == Status::Busy),
        "{second:?}"
    );
    assert_eq!(balance_of(&mut reader, &card).await, 10_000 - 200);
    reader.close().await;
    counter.close().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn settlement_lists_gaps_refusals_and_uncertain_records() {
    let env = Env::new();
    let (server, counter, mut reader, mut a, mut b) = start_with_two_shards(&env).await;

    let mut forged = numbered(&mut a, 40, 7, 0);
    forged.record.certificate.0[0] ^= 1;
    a.atc -= 1; // the forged record did not use the card's ATC
    let records = [
        numbered(&mut a, 100, 1, 0),
        numbered(&mut b, 200, 2, 0),
        // Uncertain, and the card's counter goes on past it (seq 5): completed.
        numbered(&mut a, 50, 4, FLAG_UNCERTAIN),
        numbered(&mut a, 70, 5, 0),
        // Uncertain, and nothing later from card b: unresolved.
        numbered(&mut b, 30, 6, FLAG_UNCERTAIN),
        forged,
        // Uncertain and refused (amount 0): nothing to resolve.
        numbered(&mut a, 0, 9, FLAG_UNCERTAIN),
    ];
    let got = upload(&mut reader, &records).await;
    let statuses: Vec<Status> = got.results.iter().map(|r| r.result.status).collect();
    use Status::{Approved, BadCryptogram, InvalidAmount};
    assert_eq!(
        statuses,
        [Approved, Approved, Approved, Approved, Approved, BadCryptogram, InvalidAmount]
    );
    // Seq 2 again with another record: refused, and it fills no gap.
    let conflict = NumberedRecord { terminal_seq: 2, ..numbered(&mut a, 10, 0, 0) };
    assert_eq!(
        upload(&mut reader, &[conflict]).await.results[0].result.status,
        Status::SeqConflict
    );

    let day = citycard::report::Date::parse("2026-01-01").unwrap();
    let report = citycard::report::settlement(&env.data, day).unwrap();
    let csv = report.to_csv();
    assert!(report.reconciled(), "{csv}");
    assert_eq!((report.balances_start, report.balances_end), (0, -450), "{csv}");
    let row = report.row(READER, citycard::report::Operation::Offline);
    assert_eq!((row.count, row.amount, row.declined), (5, 450, 3), "{csv}");
    let mask = |card: &Card| card.id.masked();
    let expected = format!(
        "# offline_seqs reader-1 highest 9 recorded 7 gaps 3,8\n\
         # offline_refused reader-1 seq 2 card {a} atc 5 SeqConflict\n\
         # offline_refused reader-1 seq 7 card {a} atc 1 BadCryptogram\n\
         # offline_refused reader-1 seq 9 card {a} atc 4 InvalidAmount\n\
         # offline_uncertain reader-1 seq 4 card {a} atc 2 completed\n\
         # offline_uncertain reader-1 seq 6 card {b} atc 2 unresolved\n\
         # offline_uncertain reader-1 seq 9 card {a} atc 4 refused\n\
         # net ",
        a = mask(&a),
        b = mask(&b),
    );
    assert!(csv.contains(&expected), "{csv}");

    // A later ATC of card b, online, resolves its uncertain record.
    match reader.call(&b.purchase(5, READER)).await {
        Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
        other => panic!("{other:?}"),
    }
    let csv = citycard::report::settlement(&env.data, day).unwrap().to_csv();
    let line = format!("# offline_uncertain reader-1 seq 6 card {} atc 2 completed\n", mask(&b));
    assert!(csv.contains(&line), "{csv}");
    // Today's report (the issues, the purchase) still reconciles.
    let today = citycard::report::settlement(&env.data, citycard::report::Date::today()).unwrap();
    assert!(today.reconciled(), "{}", today.to_csv());
    reader.close().await;
    counter.close().await;
    server.stop().await.unwrap();
}

/// A seq whose record a prune removed stays used (PROTOCOL.md 6.13): a re-upload under it is
/// SeqConflict, never decided again, and highest_seq keeps counting it, whether the state
/// survived the prune or was rebuilt from the anchors (which keep every pruned seq).
#[tokio::test]
async fn a_pruned_seq_stays_used_after_a_rebuild_from_the_anchor() {
    use citycard::archive::{Anchor, PruneOptions};
    use citycard::report::Date;
    let env = Env::new();
    let mut config = env.config();
    config.segment_bytes = 64 * 1024;
    config.checkpoint = citycard::engine::CheckpointPolicy { records: 100, interval_ms: 60_000 };
    let (server, mut counter, mut reader, mut a, mut b) =
        start_with_two_shards_on(&env, config.clone()).await;
    let first = [numbered(&mut a, 100, 1, 0), numbered(&mut b, 200, 2, 0)];
    let answer = upload(&mut reader, &first).await;
    assert!(answer.results.iter().all(|r| r.result.status == Status::Approved), "{answer:?}");
    // Push them below the checkpoint and into the archive, on both shards.
    let mut fillers = Vec::new();
    for op_ref in 100..108 {
        fillers.push(issue(&mut counter, op_ref, 50_000).await);
    }
    assert!(
        fillers.iter().any(|c| shard_of(c.id, 2) == 0)
            && fillers.iter().any(|c| shard_of(c.id, 2) == 1)
    );
    for i in 0..3_000 {
        let card = &mut fillers[i % 8];
        match reader.call(&card.purchase(7, READER)).await {
            Response::Purchase(r) => assert_eq!(r.status, Status::Approved),
            other => panic!("{other:?}"),
        }
    }
    server.stop().await.unwrap();
    let now_ms = citycard::now_ms();
    let tomorrow = Date::from_days(Date::from_unix_ms(now_ms).days() + 1);
    let options =
        PruneOptions { before: tomorrow, dry_run: false, now_ms, stop_after_anchor: false };
    let done = citycard::archive::prune(&env.data, &env.keys, &options).unwrap();
    assert!(done.iter().all(|s| !s.segments.is_empty()), "{done:?}");
    let public = keys::load_assertion_public(&env.keys.join(keys::ASSERTION_PUB)).unwrap();
    let mut kept = Vec::new();
    for index in 0..2 {
        let dir = citycard::server::shard_dir(&env.data, index);
        let anchor = Anchor::load(&dir, &public).unwrap().unwrap();
        kept.extend(anchor.numbered_seqs.get(READER).into_iter().flatten().copied());
    }
    kept.sort_unstable();
    assert_eq!(kept, [1, 2], "each shard's anchor keeps the seqs of its removed records");

    let check = |answer: &NumberedResults| {
        assert_eq!(answer.highest_seq, 2);
        for got in &answer.results {
            assert_eq!(got.result.status, Status::SeqConflict, "{got:?}");
        }
    };
    // The state survived the prune, then the state rebuilt from the anchors: the same.
    let server = RunningServer::start(config.clone()).await.unwrap();
    let mut reader = Client::connect(&env.keys, server.local_addr, READER).await;
    check(&upload(&mut reader, &first).await);
    server.stop().await.unwrap();
    for index in 0..2 {
        std::fs::remove_dir_all(citycard::server::shard_dir(&env.data, index).join("state"))
            .unwrap();
    }
    let server = RunningServer::start(config).await.unwrap();
    let mut reader = Client::connect(&env.keys, server.local_addr, READER).await;
    assert_eq!(upload(&mut reader, &[]).await.highest_seq, 2, "a reader resuming after a reset");
    check(&upload(&mut reader, &first).await);
    // The next seq is decided as usual.
    let next = upload(&mut reader, &[numbered(&mut a, 5, 3, 0)]).await;
    assert_eq!((next.highest_seq, next.results[0].result.status), (3, Status::Approved));
    server.stop().await.unwrap();
    let report = citycard::verify::verify_with(&env.data, Some(&public)).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}
