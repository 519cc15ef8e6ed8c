//! SIGKILL the real `citycard` binary under pipelined load, again and again, restart it, retry
//! every unanswered request unchanged, and check the journal against what the terminals were
//! told: exactly-once per (card, ATC), every approval durable, balances as reckoned.
//!
//! `CRASH_KILLS` sets the number of kills (default 10); `CRASH_SEED` the random seed;
//! `CRASH_BUDGET_S` (default: none) stops killing once that many seconds have passed, so a
//! soak on a busy machine ends in bounded time and reports how many kills it made.
//! scripts/crash_soak.sh runs it with 1,000 kills in release mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use citycard::engine::entry::Entry;
use citycard_protocol::{
    decode_response, Amount, CardId, CardResult, EntryKind, Request, RequestId, Response, Status,
};
use common::{Card, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const CARDS: usize = 50;
const DRIVERS: usize = 4;
const DEPOSIT: i64 = 5_000;
/// Requests one driver keeps in flight per connection (one per card at most).
const PIPELINE: usize = 8;

// ---------------------------------------------------------------------------------------------
// The server as a child process.

struct Server {
    child: Child,
    addr: SocketAddr,
    /// From spawn to the listening line (recovery done, serving).
    started_in: Duration,
}

fn spawn_server(keys: &Path, data: &Path, log: &Path) -> Server {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let spawned = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_citycard"))
        .args(["serve", "--keys"])
        .arg(keys)
        .arg("--data")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--shards", "2"])
        // Small segments and frequent checkpoints, so that kills land while a checkpoint is
        // written and segments move to the archive, and restarts read from checkpoints.
        .args(["--segment-bytes", "65536", "--checkpoint-records", "300"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(addr) = line.strip_prefix("citycard listening on ") {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => Server { child, addr: addr.parse().unwrap(), started_in: spawned.elapsed() },
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("server did not start ({status}); see {}", data.display());
        }
    }
}

impl Server {
    fn sigkill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn sigterm(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Terminals.

struct Conn {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Conn {
    async fn connect(keys: &Path, addr: SocketAddr, terminal: &str) -> Option<Conn> {
        let config = citycard::tls::client_config(keys, terminal).unwrap();
        let stream =
            tokio::time::timeout(Duration::from_secs(10), common::connect_with(addr, config))
                .await
                .ok()?
                .ok()?;
        Some(Conn { stream, buf: BytesMut::new() })
    }

    async fn send(&mut self, request: &Request, id: u32) -> bool {
        let mut out = BytesMut::new();
        request.encode(RequestId(id), &mut out).unwrap();
        self.stream.write_all(&out).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// The next frame, or None when the connection ended. Cancel-safe.
    async fn recv(&mut self) -> Option<(RequestId, Response)> {
        loop {
            if let Some(found) = decode_response(&mut self.buf).expect("malformed frame") {
                return Some(found);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

#[derive(Clone)]
struct Sent {
    request: Request,
    purchase: bool,
    amount: i64,
    /// Times it was sent (more than 1 = retried after a crash or a Busy).
    sends: u32,
}

/// What a terminal was told about one request.
#[derive(Clone, Debug)]
struct Told {
    card: CardId,
    result: CardResult,
    purchase: bool,
    amount: i64,
}

struct CardModel {
    card: Card,
    /// The balance as reckoned from the answers received.
    balance: i64,
    /// The one request of this card in flight (sent, not answered).
    pending: Option<Sent>,
}

#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    sent: u64,
    answered: u64,
    retries: u64,
    retried_answered: u64,
    retried_approved: u64,
    approved: u64,
    declined: u64,
    busy: u64,
}

struct Driver {
    index: usize,
    cards: Vec<CardModel>,
    rng: Rng,
    told: Vec<Told>,
    counts: Counts,
}

impl Driver {
    fn reader(&self) -> String {
        format!("reader-d{}", self.index)
    }
    fn kiosk(&self) -> String {
        format!("kiosk-d{}", self.index)
    }

    /// Sends and answers until the server goes away (or `stop` passes). Unanswered requests
    /// stay pending and are sent again, unchanged, next phase.
    async fn phase(mut self, keys: PathBuf, addr: SocketAddr, stop: Instant) -> Driver {
        let (reader_id, kiosk_id) = (self.reader(), self.kiosk());
        let Some(mut reader) = Conn::connect(&keys, addr, &reader_id).await else { return self };
        let Some(mut kiosk) = Conn::connect(&keys, addr, &kiosk_id).await else { return self };
        // Request id -> card index; ids are unique per connection and phase.
        let mut ids: [HashMap<u32, usize>; 2] = [HashMap::new(), HashMap::new()];
        let mut next_id = 1u32;
        // Retries first: exactly the bytes that went unanswered.
        for (i, model) in self.cards.iter_mut().enumerate() {
            if let Some(sent) = &mut model.pending {
                sent.sends += 1;
                self.counts.retries += 1;
                let conn = if sent.purchase { &mut reader } else { &mut kiosk };
                if !conn.send(&sent.request, next_id).await {
                    return self;
                }
                ids[usize::from(!sent.purchase)].insert(next_id, i);
                next_id += 1;
            }
        }
        loop {
            // Top up the pipeline with new requests for idle cards.
            if Instant::now() < stop {
                let in_flight = ids[0].len() + ids[1].len();
                for _ in in_flight..PIPELINE * 2 {
                    let idle: Vec<usize> = (0..self.cards.len())
                        .filter(|i| self.cards[*i].pending.is_none())
                        .collect();
                    if idle.is_empty() {
                        break;
                    }
                    let i = idle[self.rng.below(idle.len() as u64) as usize];
                    let purchase = self.rng.below(10) < 7;
                    let model = &mut self.cards[i];
                    let (request, amount) = if purchase {
                        let amount = 1 + self.rng.below(120) as i64;
                        (model.card.purchase(amount, &reader_id), amount)
                    } else {
                        let amount = 1 + self.rng.below(150) as i64;
                        (model.card.top_up(amount, &kiosk_id), amount)
                    };
                    model.pending =
                        Some(Sent { request: request.clone(), purchase, amount, sends: 1 });
                    self.counts.sent += 1;
                    let conn = if purchase { &mut reader } else { &mut kiosk };
                    if !conn.send(&request, next_id).await {
                        return self;
                    }
                    ids[usize::from(!purchase)].insert(next_id, i);
                    next_id += 1;
                }
            } else if ids[0].is_empty() && ids[1].is_empty() {
                return self;
            }
            let (which, got) = tokio::select! {
                got = reader.recv() => (0, got),
                got = kiosk.recv() => (1, got),
                _ = tokio::time::sleep(Duration::from_secs(20)) => panic!("driver {} stalled", self.index),
            };
            let Some((id, response)) = got else { return self };
            let i = ids[which].remove(&id.0).expect("answer to an unknown request id");
            let result = match response {
                Response::Purchase(r) | Response::TopUp(r) => r,
                other => panic!("unexpected answer {other:?}"),
            };
            self.answer(i, result);
        }
    }

    fn answer(&mut self, i: usize, result: CardResult) {
        let model = &mut self.cards[i];
        let sent = model.pending.clone().expect("answer for a card with nothing in flight");
        assert_eq!(
            (result.card_id, result.atc),
            (model.card.id, sent.request.card_auth().unwrap().atc)
        );
        if matches!(result.status, Status::Busy | Status::Unavailable) {
            // Nothing was done: stays pending, sent again next phase.
            self.counts.busy += 1;
            return;
        }
        model.pending = None;
        self.counts.answered += 1;
        if sent.sends > 1 {
            self.counts.retried_answered += 1;
        }
        // Per card one request at a time, so every answer is predictable from the reckoning.
        let expected = if sent.purchase {
            if model.balance >= sent.amount {
                Status::Approved
            } else {
                Status::InsufficientFunds
            }
        } else if model.balance + sent.amount > 100_000 {
            Status::OverBalanceCap
        } else {
            Status::Approved
        };
        assert_eq!(
            result.status, expected,
            "card {:?} atc {:?}: {result:?}",
            model.card.id, result.atc
        );
        if result.status == Status::Approved {
            model.balance += if sent.purchase { -sent.amount } else { sent.amount };
            self.counts.approved += 1;
            if sent.sends > 1 {
                self.counts.retried_approved += 1;
            }
        } else {
            self.counts.declined += 1;
        }
        assert_eq!(result.balance.0, model.balance, "balance after {result:?}");
        assert!(result.journal_seq > 0, "an authenticated answer is journaled: {result:?}");
        self.told.push(Told {
            card: model.card.id,
            result,
            purchase: sent.purchase,
            amount: sent.amount,
        });
    }
}

fn kills() -> usize {
    std::env::var("CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

fn seed() -> u64 {
    std::env::var("CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0xC1A5_4000)
}

/// The soak's time budget (`CRASH_BUDGET_S`), if any.
fn kill_budget() -> Option<Duration> {
    std::env::var("CRASH_BUDGET_S").ok().and_then(|v| v.parse().ok()).map(Duration::from_secs)
}

async fn issue_cards(keys: &Path, addr: SocketAddr) -> Vec<Card> {
    let mut counter = common::Client::connect(keys, addr, "counter-1").await;
    let mut cards = Vec::new();
    for op_ref in 0..CARDS as u64 {
        cards.push(common::issue(&mut counter, op_ref + 1, DEPOSIT).await);
    }
    counter.close().await;
    cards
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_and_doubles_nothing() {
    let kills = kills();
    let mut rng = Rng(seed());
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let data = dir.path().join("data");
    let log = dir.path().join("server.log");
    citycard::keys::init(&keys).unwrap();
    for d in 0..DRIVERS {
        let reader = citycard::keys::TerminalId::new(format!("reader-d{d}")).unwrap();
        citycard::keys::issue_terminal(&keys, &reader, citycard::keys::Role::Reader).unwrap();
        let kiosk = citycard::keys::TerminalId::new(format!("kiosk-d{d}")).unwrap();
        citycard::keys::issue_terminal(&keys, &kiosk, citycard::keys::Role::Kiosk).unwrap();
    }
    let started = Instant::now();
    let server = spawn_server(&keys, &data, &log);
    let cards = issue_cards(&keys, server.addr).await;
    let mut drivers: Vec<Driver> = (0..DRIVERS)
        .map(|d| Driver {
            index: d,
            cards: cards
                .iter()
                .enumerate()
                .filter(|(i, _)| i % DRIVERS == d)
                .map(|(_, c)| CardModel { card: c.clone(), balance: DEPOSIT, pending: None })
                .collect(),
            rng: Rng(rng.next()),
            told: Vec::new(),
            counts: Counts::default(),
        })
        .collect();

    let mut server = Some(server);
    let mut lost_at_kills = 0u64;
    let mut slowest_restart = Duration::ZERO;
    let budget = kill_budget();
    let mut made = 0usize;
    for kill in 0..=kills {
        let running = server.take().unwrap_or_else(|| spawn_server(&keys, &data, &log));
        if kill > 0 {
            slowest_restart = slowest_restart.max(running.started_in);
        }
        let addr = running.addr;
        let last = kill == kills || budget.is_some_and(|b| started.elapsed() >= b);
        // Load for a random moment, then SIGKILL; the last phase drains every retry instead.
        let load_ms = 50 + rng.below(450);
        let stop = if last { Instant::now() } else { Instant::now() + Duration::from_secs(3600) };
        let handles: Vec<_> =
            drivers.drain(..).map(|d| tokio::spawn(d.phase(keys.clone(), addr, stop))).collect();
        if last {
            for h in handles {
                drivers
                    .push(tokio::time::timeout(Duration::from_secs(60), h).await.unwrap().unwrap());
            }
            let status = running.sigterm();
            assert!(
                status.success(),
                "server exited {status} after SIGTERM; see {}",
                log.display()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(load_ms)).await;
        running.sigkill();
        made += 1;
        for h in handles {
            drivers.push(tokio::time::timeout(Duration::from_secs(30), h).await.unwrap().unwrap());
        }
        lost_at_kills += drivers
            .iter()
            .map(|d| d.cards.iter().filter(|c| c.pending.is_some()).count() as u64)
            .sum::<u64>();
    }
    for d in &drivers {
        for c in &d.cards {
            assert!(c.pending.is_none(), "card {:?} still has an unanswered request", c.card.id);
        }
    }

    // The journal, read independently of the server.
    let mut by_atc: HashMap<(CardId, u32), (u64, Entry)> = HashMap::new();
    let mut records = 0u64;
    for shard in 0..2 {
        let journal = data.join(format!("shard-{shard}/journal"));
        let archive = data.join(format!("shard-{shard}/archive"));
        let start = citycard::journal::Start::Full { archive: Some(&archive) };
        citycard::journal::read_from(&journal, start, |seq, payload| {
            records += 1;
            let entry = Entry::decode(payload).unwrap();
            if entry.uses_atc() {
                let key = (entry.card_id, entry.atc.0);
                if let Some((other, _)) = by_atc.get(&key) {
                    panic!(
                        "(card {:?}, ATC {}) journaled twice: seq {other} and {seq}",
                        key.0, key.1
                    );
                }
                by_atc.insert(key, (seq, entry));
            }
            Ok(())
        })
        .unwrap();
    }
    let mut counts = Counts::default();
    for d in &drivers {
        for told in &d.told {
            let (seq, entry) = by_atc
                .get(&(told.card, told.result.atc.0))
                .unwrap_or_else(|| panic!("answer {:?} is not in the journal", told.result));
            assert_eq!(*seq, told.result.journal_seq, "{:?}", told.result);
            assert_eq!(entry.status, told.result.status, "{:?}", told.result);
            assert_eq!(entry.balance_after, told.result.balance, "{:?}", told.result);
            let kind = if told.purchase { EntryKind::Purchase } else { EntryKind::TopUp };
            assert_eq!(entry.kind, kind);
            let moved = if told.result.status == Status::Approved {
                if told.purchase {
                    -told.amount
                } else {
                    told.amount
                }
            } else {
                0
            };
            assert_eq!(entry.amount, Amount(moved), "{:?}", told.result);
        }
        let c = d.counts;
        counts.sent += c.sent;
        counts.answered += c.answered;
        counts.retries += c.retries;
        counts.retried_answered += c.retried_answered;
        counts.retried_approved += c.retried_approved;
        counts.approved += c.approved;
        counts.declined += c.declined;
        counts.busy += c.busy;
    }
    // Every card transaction in the journal was answered to a terminal (none is orphaned:
    // every request was eventually answered, by its retry at the latest).
    let told_total: usize = drivers.iter().map(|d| d.told.len()).sum();
    assert_eq!(by_atc.len(), told_total, "journal card transactions vs answers");

    // Balances from the restarted server equal the reckoning, and the audit passes.
    let running = spawn_server(&keys, &data, &log);
    let mut reader = common::Client::connect(&keys, running.addr, "reader-1").await;
    let mut total = 0i64;
    for d in &drivers {
        for c in &d.cards {
            assert_eq!(
                common::balance_of(&mut reader, &c.card).await,
                c.balance,
                "card {:?}",
                c.card.id
            );
            total += c.balance;
        }
    }
    reader.close().await;
    assert!(running.sigterm().success());
    let verify = Command::new(env!("CARGO_BIN_EXE_citycard"))
        .arg("verify")
        .arg("--data")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "citycard verify: {stdout}");
    assert!(stdout.contains(&format!("sum of balances {total}")), "{stdout}");
    eprintln!(
        "crash test: {made} kills (of {kills} asked) in {:?}; {} requests ({} approved, {} declined), {} journal records; \
         {} unanswered at kills, {} retries sent, {} answered on retry ({} approved), {} busy/unavailable; \
         slowest restart after a kill {:?}",
        started.elapsed(),
        counts.sent,
        counts.approved,
        counts.declined,
        records,
        lost_at_kills,
        counts.retries,
        counts.retried_answered,
        counts.retried_approved,
        counts.busy,
        slowest_restart
    );
    assert!(counts.answered >= counts.sent, "every request answered in the end");
}
