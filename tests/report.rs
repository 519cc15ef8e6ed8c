//! The daily settlement report against a live in-process server: the report is computed while
//! the server runs (no lock conflict) and its per-terminal totals must equal what the terminals
//! counted from the answers they received; the signed CSV must check, and fail on any change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use citycard::keys::{self, Role, TerminalId};
use citycard::report::{self, Date, Operation, ReportError, Row, Settlement};
use citycard_protocol::{
    Amount, Atc, BlockReason, CardResult, MessageType, OfflineRecord, Request, Response, Status,
};
use common::{issue, Card, Client, Env};

type Rows = BTreeMap<(String, Operation), Row>;

/// What the terminals saw: approvals with their amounts, and journaled declines.
#[derive(Default)]
struct Tally {
    rows: Rows,
}

impl Tally {
    fn approved(&mut self, terminal: &str, operation: Operation, amount: i64) {
        let row = self.rows.entry((terminal.to_owned(), operation)).or_default();
        row.count += 1;
        row.amount += i128::from(amount);
    }

    fn declined(&mut self, terminal: &str, operation: Operation) {
        self.rows.entry((terminal.to_owned(), operation)).or_default().declined += 1;
    }

    /// Approved, or declined with a journal record (journal_seq > 0); declines refused before
    /// authentication are not journaled.
    fn count(
        &mut self,
        terminal: &str,
        operation: Operation,
        amount: i64,
        status: Status,
        seq: u64,
    ) {
        if status == Status::Approved {
            self.approved(terminal, operation, amount);
        } else if seq > 0 {
            self.declined(terminal, operation);
        }
    }

    fn card(&mut self, terminal: &str, operation: Operation, amount: i64, r: &CardResult) {
        self.count(terminal, operation, amount, r.status, r.journal_seq);
    }

    fn net(&self) -> i128 {
        self.rows
            .iter()
            .map(|((_, op), row)| match op {
                Operation::Deposit | Operation::TopUp | Operation::Reversal => row.amount,
                Operation::Purchase
                | Operation::Offline
                | Operation::Refund
                | Operation::TapOut
                | Operation::HoldExpired => -row.amount,
                Operation::Identity
                | Operation::Replacement
                | Operation::TapIn
                | Operation::ProductChange
                | Operation::CardDepositKept
                | Operation::CardDepositPaid
                | Operation::CardDepositRefunded => 0,
            })
            .sum()
    }
}

fn card_result(response: Response) -> CardResult {
    match response {
        Response::Purchase(r) | Response::TopUp(r) | Response::Balance(r) => r,
        other => panic!("not a card result: {other:?}"),
    }
}

/// A purchase at `client`'s terminal, counted in `tally`.
async fn purchase(
    tally: &mut Tally,
    client: &mut Client,
    card: &mut Card,
    amount: i64,
    want: Status,
) {
    let terminal = client.terminal.clone();
    let r = card_result(client.call(&card.purchase(amount, &terminal)).await);
    assert_eq!(r.status, want, "purchase of {amount} at {terminal}");
    tally.card(&terminal, Operation::Purchase, amount, &r);
}

/// A top-up at `client`'s terminal, counted in `tally`.
async fn top_up(
    tally: &mut Tally,
    client: &mut Client,
    card: &mut Card,
    amount: i64,
    want: Status,
) {
    let terminal = client.terminal.clone();
    let r = card_result(client.call(&card.top_up(amount, &terminal)).await);
    assert_eq!(r.status, want, "top-up of {amount} at {terminal}");
    tally.card(&terminal, Operation::TopUp, amount, &r);
}

/// Settlements of every day from `first` to `last` (two days only if the test crossed
/// midnight UTC), computed off the async runtime.
async fn settle(data: &Path, first: Date, last: Date) -> Vec<Settlement> {
    let data = data.to_path_buf();
    tokio::task::spawn_blocking(move || {
        (first.days()..=last.days())
            .map(|d| report::settlement(&data, Date::from_days(d)).unwrap())
            .collect()
    })
    .await
    .unwrap()
}

fn merged_rows(days: &[Settlement]) -> Rows {
    let mut rows = Rows::new();
    for day in days {
        for (key, row) in &day.rows {
            let mine = rows.entry(key.clone()).or_default();
            mine.count += row.count;
            mine.amount += row.amount;
            mine.declined += row.declined;
        }
    }
    rows
}

fn offline_record(card: &mut Card, amount: i64, time_ms: u64, terminal: &str) -> OfflineRecord {
    card.atc += 1;
    let nonce = 500 + u64::from(card.atc);
    OfflineRecord {
        card_id: card.id,
        atc: Atc(card.atc),
        amount: Amount(amount),
        time_ms,
        nonce,
        certificate: card.key.offline_certificate(
            card.id,
            Atc(card.atc),
            Amount(amount),
            time_ms,
            nonce,
            terminal,
        ),
    }
}

#[tokio::test]
async fn settlement_of_a_live_server_matches_what_the_terminals_saw() {
    let env = Env::new();
    keys::issue_terminal(&env.keys, &TerminalId::new("reader-2").unwrap(), Role::Reader).unwrap();
    let first_day = Date::today();
    let started_ms = citycard::now_ms();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut reader = Client::connect(&env.keys, addr, "reader-1").await;
    let mut reader2 = Client::connect(&env.keys, addr, "reader-2").await;
    let mut kiosk = Client::connect(&env.keys, addr, "kiosk-1").await;
    let mut tally = Tally::default();

    // Issues, one declined (over the balance cap).
    let mut cards = Vec::new();
    for (op_ref, deposit) in [(1u64, 1_000i64), (2, 500), (3, 100), (4, 0), (5, 2_000)] {
        cards.push(issue(&mut counter, op_ref, deposit).await);
        tally.approved("counter-1", Operation::Deposit, deposit);
    }
    let [mut a, mut b, mut c, mut d, mut e] = <[Card; 5]>::try_from(cards).ok().unwrap();
    match counter.call(&Request::Issue { op_ref: 6, deposit: Amount(100_001) }).await {
        Response::Issue(r) => {
            assert_eq!(r.status, Status::InvalidAmount);
            tally.count("counter-1", Operation::Deposit, 0, r.status, r.journal_seq);
        }
        other => panic!("{other:?}"),
    }

    // Purchases at two readers, with journaled declines.
    purchase(&mut tally, &mut reader, &mut a, 250, Status::Approved).await;
    purchase(&mut tally, &mut reader, &mut a, 100, Status::Approved).await;
    purchase(&mut tally, &mut reader, &mut a, 10_000, Status::InsufficientFunds).await;
    purchase(&mut tally, &mut reader2, &mut b, 50, Status::Approved).await;
    purchase(&mut tally, &mut reader2, &mut e, 1_999, Status::Approved).await;
    purchase(&mut tally, &mut reader2, &mut d, 1, Status::InsufficientFunds).await;
    // A replayed counter is refused unauthenticated: not journaled, not counted.
    let replay = Request::Purchase {
        auth: a.auth_at(MessageType::Purchase, 3, "reader-1", a.atc),
        amount: Amount(3),
    };
    let r = card_result(reader.call(&replay).await);
    assert_eq!((r.status, r.journal_seq), (Status::Replay, 0));

    // Top-ups, one above the per-transaction maximum.
    top_up(&mut tally, &mut kiosk, &mut a, 300, Status::Approved).await;
    top_up(&mut tally, &mut kiosk, &mut d, 40, Status::Approved).await;
    top_up(&mut tally, &mut kiosk, &mut a, 60_000, Status::InvalidAmount).await;

    // Identity checks; one on a blocked card is declined. Block/unblock have no rows.
    let auth = b.auth(MessageType::Identity, 0, "kiosk-1");
    match kiosk.call(&Request::Identity { auth }).await {
        Response::Identity(i) => {
            assert_eq!(i.status, Status::Approved);
            tally.count("kiosk-1", Operation::Identity, 0, i.status, i.journal_seq);
        }
        other => panic!("{other:?}"),
    }
    match counter
        .call(&Request::Block { op_ref: 7, card_id: d.id, reason: BlockReason::Lost })
        .await
    {
        Response::Block(s) => assert_eq!(s.status, Status::Approved),
        other => panic!("{other:?}"),
    }
    let auth = d.auth(MessageType::Identity, 0, "kiosk-1");
    match kiosk.call(&Request::Identity { auth }).await {
        Response::Identity(i) => {
            assert_eq!(i.status, Status::CardBlocked);
            tally.count("kiosk-1", Operation::Identity, 0, i.status, i.journal_seq);
        }
        other => panic!("{other:?}"),
    }
    match counter.call(&Request::Unblock { op_ref: 8, card_id: d.id }).await {
        Response::Unblock(s) => assert_eq!(s.status, Status::Approved),
        other => panic!("{other:?}"),
    }

    // Offline batch at reader-1, used at the start of the test: one record overdraws (still
    // approved), one has a zero amount (journaled decline), a forged one is refused before
    // authentication, and a duplicate returns the original answer without a new record.
    let first = offline_record(&mut c, 60, started_ms, "reader-1");
    let second = offline_record(&mut c, 80, started_ms, "reader-1");
    let zero = offline_record(&mut c, 0, started_ms, "reader-1");
    let third = offline_record(&mut e, 1, started_ms, "reader-1");
    let mut forged = offline_record(&mut b, 5, started_ms, "reader-1");
    forged.amount = Amount(4);
    let batch = Request::OfflineBatch { records: vec![first, second, zero, third, forged, first] };
    let results = match reader.call(&batch).await {
        Response::OfflineBatch(results) => results,
        other => panic!("{other:?}"),
    };
    let statuses: Vec<Status> = results.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            Status::Approved,
            Status::Approved,
            Status::InvalidAmount,
            Status::Approved,
            Status::BadCryptogram,
            Status::Approved
        ]
    );
    assert_eq!(results[1].balance, Amount(-40));
    assert_eq!(results[5], results[0]);
    for (record, result) in [first, second, zero, third, forged].iter().zip(&results) {
        tally.card("reader-1", Operation::Offline, record.amount.0, result);
    }

    // Replace: the balance moves to a new card; the old card's purchases are declined.
    let replaced = match counter.call(&Request::Replace { op_ref: 9, card_id: a.id }).await {
        Response::Replace(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((replaced.status, replaced.balance), (Status::Approved, Amount(950)));
    tally.count(
        "counter-1",
        Operation::Replacement,
        replaced.balance.0,
        replaced.status,
        replaced.journal_seq,
    );
    let mut a2 = Card::from_issue(&replaced);
    purchase(&mut tally, &mut reader, &mut a, 5, Status::CardClosed).await;
    purchase(&mut tally, &mut reader, &mut a2, 150, Status::Approved).await;

    // Close with refund; closing again is a journaled decline.
    for (op_ref, want, refund) in [(10u64, Status::Approved, 450i64), (11, Status::CardClosed, 0)] {
        match counter.call(&Request::Close { op_ref, card_id: b.id }).await {
            Response::Close(s) => {
                assert_eq!((s.status, s.refunded), (want, Amount(refund)));
                tally.count("counter-1", Operation::Refund, s.refunded.0, s.status, s.journal_seq);
            }
            other => panic!("{other:?}"),
        }
    }

    // Every operation had approvals, and all but the replacement a journaled decline.
    assert_eq!(tally.rows.len(), 8);
    assert_eq!(tally.rows.values().map(|r| r.declined).sum::<u64>(), 8);

    // The report, computed while the server runs.
    let last_day = Date::today();
    let days = settle(&env.data, first_day, last_day).await;
    assert_eq!(merged_rows(&days), tally.rows, "report rows != what the terminals saw");
    for day in &days {
        assert!(day.reconciled(), "{}", day.to_csv());
        assert_eq!(day.shards, 2);
    }
    let (start, end) = (days[0].balances_start, days[days.len() - 1].balances_end);
    assert_eq!(start, 0, "a fresh data directory starts at zero");
    assert_eq!(end - start, tally.net());
    assert_eq!(
        end,
        1_000 + 500 + 100 + 40 + 2_000 - 250 - 100 - 50 - 1_999 + 300 - 141 - 150 - 450
    );
    let today = &days[days.len() - 1];
    let csv = today.to_csv();
    assert!(csv.starts_with("date,terminal,operation,count,amount_minor,declined_count\n"));
    assert!(csv.ends_with("# reconciled yes\n"), "{csv}");
    if days.len() == 1 {
        assert!(csv.contains(&format!("\n{last_day},reader-1,offline,3,141,1\n")), "{csv}");
        assert!(csv.contains(&format!("\n{last_day},counter-1,replacement,1,950,0\n")), "{csv}");
        assert!(csv.contains(&format!("\n# balances_end {end}\n")), "{csv}");
    }

    // The CLI glue: signed file, checked with assertion.pub.
    let out = env.dir.path().join("settlement.csv");
    let reconciled =
        report::run_settlement(&env.data, &env.keys, &last_day.to_string(), Some(&out)).unwrap();
    assert!(reconciled);
    let signed = std::fs::read_to_string(&out).unwrap();
    assert!(signed.starts_with(&csv), "the file is the report plus its signature");
    assert_eq!(signed.lines().count(), csv.lines().count() + 1);
    let key = keys::load_assertion_key(&env.keys.join(keys::ASSERTION_KEY)).unwrap();
    assert_eq!(signed, report::sign(&csv, &key), "Ed25519 signatures are deterministic");
    let public = keys::load_assertion_public(&env.keys.join(keys::ASSERTION_PUB)).unwrap();
    report::check(&signed, &public).unwrap();
    report::run_check(&out, &env.keys).unwrap();

    // One flipped byte in the body, or in the signature, fails the check.
    let body_pos = signed.find(",counter-1,deposit,").unwrap() + 1;
    let sig_pos = signed.len() - 2;
    for pos in [body_pos, sig_pos, 0, csv.len() - 2] {
        let mut bytes = signed.clone().into_bytes();
        bytes[pos] = if bytes[pos] == b'1' { b'2' } else { b'1' };
        let altered = String::from_utf8(bytes).unwrap();
        assert_eq!(report::check(&altered, &public), Err(ReportError::BadSignature), "byte {pos}");
        let file = env.dir.path().join("altered.csv");
        std::fs::write(&file, &altered).unwrap();
        let err = report::run_check(&file, &env.keys).unwrap_err();
        assert!(format!("{err:#}").contains("does not match"), "{err:#}");
    }
    let unsigned = env.dir.path().join("unsigned.csv");
    std::fs::write(&unsigned, &csv).unwrap();
    assert!(report::run_check(&unsigned, &env.keys).is_err());

    // The server still runs and the next report sees new activity.
    let r = card_result(reader2.call(&a2.purchase(1, "reader-2")).await);
    assert_eq!(r.status, Status::Approved);
    tally.approved("reader-2", Operation::Purchase, 1);
    let last_day = Date::today();
    let days = settle(&env.data, first_day, last_day).await;
    assert_eq!(merged_rows(&days), tally.rows);
    assert!(days.iter().all(Settlement::reconciled));

    // Days without activity: zero rows, balances carried over, reconciled.
    let before = settle(
        &env.data,
        Date::from_days(first_day.days() - 1),
        Date::from_days(first_day.days() - 1),
    )
    .await;
    let after = settle(
        &env.data,
        Date::from_days(last_day.days() + 1),
        Date::from_days(last_day.days() + 1),
    )
    .await;
    let end = days[days.len() - 1].balances_end;
    for (quiet, balance) in [(&before[0], 0), (&after[0], end)] {
        assert!(quiet.rows.is_empty(), "{}", quiet.to_csv());
        assert_eq!(quiet.net(), 0);
        assert_eq!((quiet.balances_start, quiet.balances_end), (balance, balance));
        assert!(quiet.reconciled());
        assert!(quiet.to_csv().ends_with(&format!(
            "# net 0 = deposits 0 + top_ups 0 - purchases 0 - offline 0 - refunds 0\n\
             # balances_start {balance}\n# balances_end {balance}\n# reconciled yes\n"
        )));
    }

    for client in [counter, reader, reader2, kiosk] {
        client.close().await;
    }
    server.stop().await.unwrap();
    // The offline audit (which takes the lock) agrees with the report's closing balance.
    let audit = citycard::verify::verify(&env.data).unwrap();
    assert!(audit.ok(), "{:?}", audit.problems);
    assert_eq!(i128::from(audit.totals.balances), end);
}

#[tokio::test]
async fn settlement_reconciles_while_traffic_flows() {
    let env = Env::new();
    let first_day = Date::today();
    let server = env.start().await;
    let addr = server.local_addr;
    let mut counter = Client::connect(&env.keys, addr, "counter-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..8 {
        cards.push(issue(&mut counter, op_ref, 10_000).await);
    }
    let keys = env.keys.clone();
    let traffic = tokio::spawn(async move {
        let mut reader = Client::connect(&keys, addr, "reader-1").await;
        for round in 0..40 {
            for card in cards.iter_mut() {
                let r = card_result(reader.call(&card.purchase(1 + round % 3, "reader-1")).await);
                assert_eq!(r.status, Status::Approved);
            }
        }
        reader.close().await;
    });
    let data = env.data.clone();
    let scans = tokio::task::spawn_blocking(move || {
        let mut scans = 0;
        let mut records = 0;
        while scans < 200 {
            let s = report::settlement(&data, Date::today()).unwrap();
            assert!(s.reconciled(), "{}", s.to_csv());
            assert!(s.records >= records, "a later scan saw fewer records");
            records = s.records;
            scans += 1;
        }
        scans
    });
    traffic.await.unwrap();
    assert_eq!(scans.await.unwrap(), 200);
    let today = Date::today();
    let s = report::settlement(&env.data, today).unwrap();
    assert!(s.reconciled());
    // Each card paid 14 x 1 + 13 x 2 + 13 x 3 = 79.
    assert_eq!(s.balances_end, 8 * (10_000 - 79));
    if today == first_day {
        assert_eq!(
            s.row("reader-1", Operation::Purchase),
            Row { count: 320, amount: 632, declined: 0 }
        );
        assert_eq!(s.row("counter-1", Operation::Deposit).amount, 80_000);
    }
    counter.close().await;
    server.stop().await.unwrap();
}

#[test]
fn cli_glue_rejects_bad_input_clearly() {
    let env = Env::new();
    for bad in ["2024-02-30", "29.02.2024", "today", "2024-1-1", ""] {
        let err = report::run_settlement(&env.data, &env.keys, bad, None).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("YYYY-MM-DD"), "{bad}: {text}");
    }
    // Not a data directory: a clear error, and nothing is created.
    let out = env.dir.path().join("out.csv");
    let err = report::run_settlement(&env.data, &env.keys, "2024-02-29", Some(&out)).unwrap_err();
    assert!(format!("{err:#}").contains("shard count"), "{err:#}");
    assert!(!out.exists());
    assert!(!env.data.exists());
    // Missing report file.
    let err = report::run_check(&out, &env.keys).unwrap_err();
    assert!(format!("{err:#}").contains("out.csv"), "{err:#}");
}
